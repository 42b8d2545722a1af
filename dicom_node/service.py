"""``cspine serve``: open storage, repair after a crash, serve, deliver, supervise the worker."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from config import Settings, check_bind_safety
from dicom_node.receive import Receiver, open_node_storage
from dicom_node.scp import StorageNode
from storage import reconcile

LOGGER = logging.getLogger(__name__)


class WorkerSupervisor:
    """Keep one ``cspine worker`` child process running."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        run_dir = Path(settings.storage.data_dir) / "run"
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.settings_file = run_dir / "settings.json"
        self.settings_file.write_text(settings.model_dump_json())
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._lock = threading.Lock()

    def ensure_running(self) -> None:
        """Start the worker, or restart it if it died."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                return
            if self.proc is not None:
                self.restarts += 1
                LOGGER.warning("worker exited code=%s; restarting", self.proc.returncode)
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dicom_node",
                    "worker",
                    "--settings-file",
                    str(self.settings_file),
                    "--parent-pid",
                    str(os.getpid()),
                ],
            )
            LOGGER.info("worker started pid=%d", self.proc.pid)

    def stop(self) -> None:
        """Terminate the worker."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()


def run_service(settings: Settings, *, config_file: str | None = None) -> None:
    """Run the node until interrupted.

    Start-up order: refuse an unsafe bind, open the catalog and store, sweep orphans
    left by a crash, start the worker, then listen.
    """
    from dicom_node.delivery import deliver_due

    check_bind_safety(settings)
    catalog, store = open_node_storage(settings)
    repaired = reconcile(catalog, store)
    LOGGER.info("store ready tmp_swept=%d orphans_removed=%d", repaired["tmp"], repaired["orphans"])
    receiver = Receiver(settings, catalog, store)
    node = StorageNode(settings, receiver)
    supervisor = WorkerSupervisor(settings) if settings.worker.enabled else None
    extra = [(lambda: deliver_due(settings, catalog, store), 1.0, "delivery")]
    if supervisor is not None:
        supervisor.ensure_running()
        extra.append((supervisor.ensure_running, 5.0, "worker-supervisor"))
    try:
        node.start(block=True, extra_jobs=extra)
    finally:
        node.stop()
        if supervisor is not None:
            supervisor.stop()
        catalog.dispose()
