"""Resident memory of the node's processes, read from ``/proc`` (nothing in the product changes).

``cspine serve`` is the receiver; its child ``python -m dicom_node worker`` is the worker.
``VmHWM`` is the kernel's peak resident set size of a process since it started, so one
read before the process ends gives its peak; the poller reads every ``interval`` seconds
so that a worker that is restarted (new pid) still counts. The process tree is scanned
only until the worker is found, and again once that pid is no longer its child.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")


def status_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of ``pid`` in KiB (empty if the process is gone)."""
    out: dict[str, int] = {}
    try:
        text = (PROC / str(pid) / "status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def parent(pid: int) -> int | None:
    """Parent pid of ``pid`` (None if the process is gone)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name may hold spaces or parentheses: fields start after the last ")"
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (scan of ``/proc/*/stat``)."""
    found = []
    for entry in PROC.iterdir():
        if entry.name.isdigit() and parent(int(entry.name)) == pid:
            found.append(int(entry.name))
    return found


def worker_pid(serve_pid: int) -> int | None:
    """The ``dicom_node worker`` child of a ``cspine serve`` process, if it runs."""
    for pid in children(serve_pid):
        try:
            argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if b"worker" in argv:
            return pid
    return None


@dataclass
class NodeMemory:
    """Polls the receiver and its worker; peaks and current values in MB (10^6 bytes)."""

    serve_pid: int
    interval: float = 0.5
    receiver_peak_mb: float = 0.0
    worker_peak_mb: float = 0.0
    worker_pids: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> dict[str, float]:
        """Read both processes now; update the peaks; return current ``VmRSS`` in MB."""
        now: dict[str, float] = {}
        rec = status_kib(self.serve_pid)
        if rec:
            self.receiver_peak_mb = max(self.receiver_peak_mb, rec["VmHWM"] * 1024 / 1e6)
            now["receiver_mb"] = rec["VmRSS"] * 1024 / 1e6
        known = [p for p in self.worker_pids if parent(p) == self.serve_pid]
        wpid = known[0] if known else worker_pid(self.serve_pid)
        if wpid is not None:
            self.worker_pids.add(wpid)
            wrk = status_kib(wpid)
            if wrk:
                self.worker_peak_mb = max(self.worker_peak_mb, wrk["VmHWM"] * 1024 / 1e6)
                now["worker_mb"] = wrk["VmRSS"] * 1024 / 1e6
        return now

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> NodeMemory:
        """Start polling in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take a last sample and stop polling (call before the processes end)."""
        self.sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
