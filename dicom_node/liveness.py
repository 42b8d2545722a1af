"""Which process holds a job: worker ids as ``host:pid`` and whether one still runs.

A worker of another host cannot be probed from here: :func:`known_dead` is true only
for an id of this host whose process is gone, and a job of another host's worker is
judged by its heartbeat (:data:`storage.jobs.STALE_AFTER_S`).
"""

from __future__ import annotations

import os
import socket


def worker_id() -> str:
    """``host:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def is_alive(worker: str) -> bool:
    """Whether a worker id names a live process on this host."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def known_dead(worker: str) -> bool:
    """Whether a worker id names a process of this host that no longer runs."""
    host, _, pid = worker.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not is_alive(worker)
