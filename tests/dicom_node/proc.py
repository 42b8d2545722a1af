"""Run ``cspine`` as a real subprocess, as an administrator would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from storage.journal import Journal

CSPINE = [sys.executable, "-m", "dicom_node"]


def cspine(
    *args: str, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run one CLI command and capture its output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [*CSPINE, *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )


def echo_ok(port: int, called: str = "CSPINE") -> bool:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().get("Status") == 0
    assoc.release()
    return ok


class Server:
    """``cspine serve`` in a subprocess, logging to a file."""

    def __init__(self, data_dir: Path, port: int, *args: str, env: dict | None = None) -> None:
        self.data_dir = data_dir
        self.port = port
        self.args = args
        self.env = dict(os.environ)
        self.env.update(env or {})
        self.log_path = data_dir.parent / f"serve-{port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Server:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                *CSPINE,
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cspine serve exited: {self.log_path.read_text()[-2000:]}")
            if echo_ok(self.port):
                return self
            time.sleep(0.2)
        raise RuntimeError("cspine serve did not start listening")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_journal_empty(data_dir: Path, timeout: float = 30) -> None:
    """Wait until the appliers have applied every answered instance (the ingest journal
    under ``<data_dir>/store`` is empty)."""
    journal = Journal(data_dir / "store")
    deadline = time.monotonic() + timeout
    while journal.count() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert journal.count() == 0, "the appliers applied the journal"
