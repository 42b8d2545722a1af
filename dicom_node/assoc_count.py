"""One association limit for all receiver processes of a ``cspine serve``.

With ``node.receivers`` > 1 the processes accept from one listening socket, and the
kernel, not the node, decides which process gets a connection. ``node.max_associations``
holds for the node as a whole, as pynetdicom holds it in one process (every accepted
connection counts, one that has not yet sent its A-ASSOCIATE-RQ too): each process
counts its connections in its own slot of a small shared file
(``<data_dir>/run/associations``, memory-mapped, updated under an ``flock``), and an
A-ASSOCIATE-RQ is refused while the sum of the slots exceeds the limit. A process that
starts (or restarts after a crash) zeroes its slot, and recounts it from its live
associations at each request: the connections of a dead process died with it, and one
whose close went unseen cannot hold a place for ever.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_SLOT = struct.Struct("<q")


class AssociationCount:
    """Running associations of one process, in its slot of the node's shared count.

    Parameters
    ----------
    path
        The shared file, made by :meth:`create` before the processes start.
    slot
        This process's slot: 0 for ``cspine serve`` itself, ``i + 1`` for receiver
        child ``i``.
    limit
        ``node.max_associations``.
    """

    def __init__(self, path: Path, slot: int, limit: int) -> None:
        self.path = path
        self.limit = limit
        self._fd = os.open(path, os.O_RDWR)
        size = os.fstat(self._fd).st_size
        if size == 0 or size % _SLOT.size or not 0 <= slot < size // _SLOT.size:
            os.close(self._fd)
            raise ValueError(f"{path}: no slot {slot} in a count of {size} bytes")
        self._slots = size // _SLOT.size
        self._offset = slot * _SLOT.size
        self._map = mmap.mmap(self._fd, size)
        with self._locked():
            _SLOT.pack_into(self._map, self._offset, 0)

    @staticmethod
    def create(path: Path, processes: int) -> Path:
        """Write a zeroed count with one slot per receiver process (replacing any old one)."""
        part = path.with_name(path.name + ".part")
        with open(part, "wb") as f:
            f.write(bytes(_SLOT.size * processes))
        os.chmod(part, 0o640)
        os.replace(part, path)
        return path

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _total(self) -> int:
        return sum(_SLOT.unpack_from(self._map, i * _SLOT.size)[0] for i in range(self._slots))

    def total(self) -> int:
        """Connections counted in all the processes now."""
        with self._locked():
            return self._total()

    def _add(self, delta: int) -> None:
        with self._locked():
            (own,) = _SLOT.unpack_from(self._map, self._offset)
            _SLOT.pack_into(self._map, self._offset, max(0, own + delta))

    def opened(self) -> None:
        """Count a connection this process accepted."""
        self._add(1)

    def closed(self) -> None:
        """Count one connection fewer here (one counted by :meth:`opened` has closed)."""
        self._add(-1)

    def over_limit(self, here: int | None = None) -> bool:
        """Whether the node runs more than ``limit`` connections (the asking one counted).

        ``here``: the connections this process runs now, if known; its slot is set to it
        first.
        """
        with self._locked():
            if here is not None:
                _SLOT.pack_into(self._map, self._offset, here)
            return self._total() > self.limit

    def close(self) -> None:
        """Unmap and close the file (this process's slot keeps its last value)."""
        self._map.close()
        os.close(self._fd)
