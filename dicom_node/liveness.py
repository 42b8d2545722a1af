"""Which process holds a job: worker ids as ``host:pid`` and whether one still runs."""

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
