"""``cspine serve``: open storage, repair after a crash, serve, deliver, supervise the worker.

With ``node.receivers`` > 1, ``cspine serve`` binds the listening socket once and starts
``receivers - 1`` receiver child processes (``python -m dicom_node.service``) that
inherit it: every process accepts associations on the same port with its own catalog
connection (SQLite WAL; writers of different processes wait on the busy timeout and
:meth:`storage.Catalog.write` retries), so C-STORE handling is spread over several
interpreters instead of one GIL. Only this (parent) process sweeps the spool at start-up
and runs the completion checker, the delivery and the worker supervisor; it restarts a
receiver that died, and the kernel kills the receivers when it dies.

The process also caps glibc's malloc arenas and returns freed heap memory to the
system periodically (:func:`tune_malloc`, :func:`trim_malloc`), so the resident size of
a long-running receiver stays flat instead of growing with every study it handles.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from config import Settings, check_bind_safety
from dicom_node import destinations, memory
from dicom_node.apply import replay
from dicom_node.assoc_count import AssociationCount
from dicom_node.memory import trim_malloc
from dicom_node.receive import Receiver, open_journal, open_node_storage
from dicom_node.scp import StorageNode
from storage import reconcile

LOGGER = logging.getLogger(__name__)

MALLOC_ARENA_MAX = 2
"""Arenas for all threads: each association thread would otherwise get its own."""
MALLOC_MMAP_THRESHOLD = 1024 * 1024
"""Blocks of this size and larger are mmapped, hence returned to the system when freed.

Setting it also stops glibc from raising the threshold after each large free (up to
32 MiB by default), which left large buffers (PDUs, delivered outputs) in the heaps."""
MALLOC_TRIM_THRESHOLD = 4 * 1024 * 1024
TRIM_INTERVAL_S = 30.0


def tune_malloc() -> bool:
    """Cap glibc malloc arenas and fix the mmap/trim thresholds of a receiver process.

    Returns
    -------
    bool
        Whether the settings were applied (glibc only; elsewhere nothing is done).
    """
    return memory.tune_malloc(
        mmap_threshold=MALLOC_MMAP_THRESHOLD,
        trim_threshold=MALLOC_TRIM_THRESHOLD,
        arena_max=MALLOC_ARENA_MAX,
    )


APPLIER_STOP_GRACE_S = 5.0
"""How long a stop waits for an applier after SIGTERM (see :class:`ApplierSupervisor`)."""


class ChildSupervisor:
    """Keep ``count`` child processes of one command running, restarting those that die.

    Parameters
    ----------
    name
        What the log lines call a child (``worker``).
    command
        The child's argument vector.
    count
        How many children to keep.
    pass_fds
        File descriptors the children inherit (the shared listener of the receivers).
    numbered
        Log the children as ``name 1``, ``name 2`` ... (``receiver 1``).
    index_arg
        When set, child ``i`` (0-based) gets ``index_arg i`` appended to its command.
    stop_grace_s
        How long :meth:`stop` waits for a child after SIGTERM before it kills it.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        count: int = 1,
        *,
        pass_fds: Sequence[int] = (),
        numbered: bool = False,
        index_arg: str | None = None,
        stop_grace_s: float = 30.0,
    ) -> None:
        self.name = name
        self.stop_grace_s = stop_grace_s
        self.numbered = numbered
        self.index_arg = index_arg
        self.command = list(command)
        self.pass_fds = tuple(pass_fds)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self.restarts = 0
        self._lock = threading.Lock()
        self._stopped = False

    def _label(self, index: int) -> str:
        return f"{self.name} {index + 1}" if self.numbered else self.name

    def ensure_running(self) -> None:
        """Start missing children, or restart those that died (nothing after :meth:`stop`)."""
        with self._lock:
            if self._stopped:
                return
            for i, proc in enumerate(self.procs):
                if proc is not None and proc.poll() is None:
                    continue
                if proc is not None:
                    self.restarts += 1
                    LOGGER.warning("%s exited code=%s; restarting", self._label(i), proc.returncode)
                command = self.command
                if self.index_arg is not None:
                    command = [*command, self.index_arg, str(i)]
                started = subprocess.Popen(command, pass_fds=self.pass_fds)
                self.procs[i] = started
                LOGGER.info("%s started pid=%d", self._label(i), started.pid)

    def stop(self) -> None:
        """Terminate every child and wait for them (:attr:`stop_grace_s`, then kill)."""
        with self._lock:
            self._stopped = True
            running = [p for p in self.procs if p is not None and p.poll() is None]
            for proc in running:
                proc.terminate()
            deadline = time.monotonic() + self.stop_grace_s
            for i, child in enumerate(self.procs):
                if child is None or child not in running:
                    continue
                try:
                    child.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    LOGGER.warning(
                        "%s did not stop within %g s; killing it", self._label(i), self.stop_grace_s
                    )
                    child.kill()
                    child.wait()


class WorkerSupervisor(ChildSupervisor):
    """Keep one ``cspine worker`` child process running."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.settings_file = write_settings_file(settings)
        super().__init__("worker", child_command(("dicom_node", "worker"), self.settings_file))


class ApplierSupervisor(ChildSupervisor):
    """Keep ``storage.appliers`` journal applier processes running (journal mode).

    They apply, on other cores than the receivers', what the receivers acknowledged;
    applier ``i`` takes share ``i`` of the entries. A restarted applier takes up its
    share where the one that died left it. At a stop an applier gets
    :data:`APPLIER_STOP_GRACE_S` to end its pass, then it is killed: at its niceness
    (``storage.applier_nice``) it may be starved of CPU, and ``cspine serve`` applies
    what it left itself (:func:`dicom_node.apply.replay`), as after a crash.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings_file = write_settings_file(settings)
        super().__init__(
            "applier",
            child_command(("dicom_node.apply",), self.settings_file),
            settings.storage.appliers,
            numbered=settings.storage.appliers > 1,
            index_arg="--share",
            stop_grace_s=APPLIER_STOP_GRACE_S,
        )


def child_command(module: Sequence[str], settings_file: Path, *extra: str) -> list[str]:
    """``python -m MODULE... --settings-file FILE [EXTRA...] --parent-pid <this process>``."""
    return [
        sys.executable,
        "-m",
        *module,
        "--settings-file",
        str(settings_file),
        *extra,
        "--parent-pid",
        str(os.getpid()),
    ]


def run_dir(settings: Settings) -> Path:
    """``<data_dir>/run``: what ``cspine serve`` shares with its child processes."""
    folder = Path(settings.storage.data_dir) / "run"
    folder.mkdir(parents=True, exist_ok=True, mode=0o750)
    return folder


def write_settings_file(settings: Settings) -> Path:
    """Write the settings as JSON to ``<data_dir>/run/settings.json`` for child processes."""
    path = run_dir(settings) / "settings.json"
    path.write_text(settings.model_dump_json())
    os.chmod(path, 0o640)
    return path


def open_listener(settings: Settings) -> socket.socket:
    """Bind and listen on ``node.host``:``node.port`` for several receiver processes.

    The socket is non-blocking: the processes that woke up for one connection and lost
    the race to accept it get ``EAGAIN`` and go back to waiting.
    """
    node = settings.node
    family = socket.AF_INET6 if ":" in node.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _bind_when_free(sock, (node.host, node.port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


LISTENER_WAIT_S = 10.0
"""How long :func:`open_listener` waits for the port of a killed ``cspine serve``."""


def _bind_when_free(sock: socket.socket, address: tuple[str, int]) -> None:
    """Bind, waiting up to :data:`LISTENER_WAIT_S` while the port is in use.

    The receiver children of a ``cspine serve`` that was SIGKILLed hold its listening
    socket until they die: at once when they run (``PR_SET_PDEATHSIG``), but a child
    still starting (its interpreter importing) only notices when it checks its parent,
    about a second later. A restart in that moment would fail with ``EADDRINUSE``.
    """
    deadline = time.monotonic() + LISTENER_WAIT_S
    waited = False
    while True:
        try:
            sock.bind(address)
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            if not waited:
                LOGGER.warning(
                    "port %d in use; waiting for it (a previous serve's receivers?)", address[1]
                )
                waited = True
            time.sleep(0.1)


class ReceiverPool(ChildSupervisor):
    """Keep ``node.receivers - 1`` receiver child processes on the shared listener.

    Child ``i`` counts its associations in slot ``i + 1`` of ``associations`` (see
    :mod:`dicom_node.assoc_count`; slot 0 is ``cspine serve``'s own).
    """

    def __init__(
        self, settings: Settings, listener: socket.socket, count: int, associations: Path
    ) -> None:
        self.settings_file = write_settings_file(settings)
        self.listener = listener
        super().__init__(
            "receiver",
            child_command(
                ("dicom_node.service",),
                self.settings_file,
                "--listen-fd",
                str(listener.fileno()),
                "--associations-file",
                str(associations),
            ),
            count,
            pass_fds=(listener.fileno(),),
            numbered=True,
            index_arg="--index",
        )


def run_service(settings: Settings, *, config_file: str | None = None) -> None:
    """Run the node until interrupted.

    Start-up order: refuse an unsafe bind, open the catalog and store, sweep orphans
    left by a crash, make the destination rows match the configuration, start the
    status page (``web.enabled``) and the worker, then listen (and start the other
    receivers).
    """
    from dicom_node.delivery import deliver_due

    tune_malloc()
    check_bind_safety(settings)
    catalog, store = open_node_storage(settings)
    journal = open_journal(settings, store)
    if journal is not None:
        replay(settings, catalog, store, journal)  # acknowledged before a crash
    repaired = reconcile(catalog, store, grace_s=settings.storage.orphan_grace_seconds)
    LOGGER.info("store ready tmp_swept=%d orphans_removed=%d", repaired["tmp"], repaired["orphans"])
    for dest in destinations.sync(settings, catalog):
        LOGGER.info(
            "destination id=%d name=%s transport=%s outputs=%s",
            dest.id,
            dest.name,
            "tls" if dest.tls else "plain",
            ",".join(dest.outputs),
        )
    receiver = Receiver(settings, catalog, store, journal=journal)
    node = StorageNode(settings, receiver)
    applier = ApplierSupervisor(settings) if journal is not None else None
    supervisor = WorkerSupervisor(settings) if settings.worker.enabled else None
    web = None
    if settings.web.enabled:
        from dicom_node.web import WebServer

        web = WebServer(catalog, settings.web)
        web.start()

    def deliver() -> None:
        if deliver_due(settings, catalog, store):
            trim_malloc()  # the outputs were read into memory to be sent

    extra = [(deliver, 1.0, "delivery"), (trim_malloc, TRIM_INTERVAL_S, "malloc-trim")]
    listener = pool = associations = None
    if settings.node.receivers > 1:
        listener = open_listener(settings)
        count_file = AssociationCount.create(
            run_dir(settings) / "associations", settings.node.receivers
        )
        associations = AssociationCount(count_file, 0, settings.node.max_associations)
        pool = ReceiverPool(settings, listener, settings.node.receivers - 1, count_file)
        extra.append((pool.ensure_running, 2.0, "receiver-supervisor"))
    if applier is not None:
        applier.ensure_running()
        extra.append((applier.ensure_running, 1.0, "applier-supervisor"))
    if supervisor is not None:
        supervisor.ensure_running()
        extra.append((supervisor.ensure_running, 5.0, "worker-supervisor"))
    try:
        if pool is not None:
            pool.ensure_running()
        node.start(block=True, extra_jobs=extra, listener=listener, associations=associations)
    finally:
        node.stop()
        if web is not None:
            web.stop()
        if pool is not None:
            pool.stop()
        if listener is not None:
            listener.close()
        if supervisor is not None:
            supervisor.stop()
        if applier is not None:
            applier.stop()
        if journal is not None:  # what a stopped (or still starting) applier left
            try:
                replay(settings, catalog, store, journal)
            except Exception as exc:  # applied at the next start instead
                LOGGER.error("journal not drained at stop: %s", type(exc).__name__)
        catalog.dispose()


def run_receiver(
    settings: Settings, listener: socket.socket, associations: AssociationCount | None = None
) -> None:
    """A receiver child: serve C-STOREs on the inherited listener until terminated.

    No spool sweep (the parent did it before starting receivers, and a sweep now would
    delete the other processes' transfers in flight), no completion checker, no
    delivery, no worker.
    """
    tune_malloc()
    catalog, store = open_node_storage(settings)
    journal = open_journal(settings, store)
    node = StorageNode(settings, Receiver(settings, catalog, store, journal=journal))
    try:
        node.start(
            block=True,
            listener=listener,
            completion=False,
            extra_jobs=[(trim_malloc, TRIM_INTERVAL_S, "malloc-trim")],
            associations=associations,
        )
    finally:
        node.stop()
        catalog.dispose()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of a receiver child process (started by :class:`ReceiverPool`)."""
    import signal

    from dicom_node.cli.common import configure_logging
    from dicom_node.cli.job_cmds import die_with_parent

    parser = argparse.ArgumentParser(prog="python -m dicom_node.service")
    parser.add_argument("--settings-file", required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--associations-file", type=Path, required=True)
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)
    settings = Settings.model_validate_json(Path(args.settings_file).read_text())
    configure_logging(settings.logging.level)
    listener = socket.socket(fileno=args.listen_fd)
    listener.setblocking(False)

    def _term(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _term)
    associations = AssociationCount(
        args.associations_file, args.index + 1, settings.node.max_associations
    )
    run_receiver(settings, listener, associations)


if __name__ == "__main__":
    main()
