"""The file store: atomic, content-addressed files under one root.

Layout under the root::

    tmp/           spool of incoming data (same filesystem, so renames are atomic)
    instances/ab/cd/<sha256>.dcm
    quarantine/ab/cd/<sha256>.dcm
    outputs/<job id>/<kind>.dcm

Paths come from content hashes and catalog ids, never from DICOM values. Folders
are ``0o750`` and files ``0o640``: nothing is world-readable or executable.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LOGGER = logging.getLogger(__name__)
DIR_MODE = 0o750
FILE_MODE = 0o640


def fsync_dir(path: Path) -> None:
    """Flush a folder (its entries: names created, renamed or removed)."""
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def fsync_file(path: Path) -> None:
    """Flush a file's data and metadata (its size, its link count)."""
    _fsync(path, os.O_RDONLY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _libc_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _libc_syncfs()
HAS_SYNCFS = _SYNCFS is not None
"""Whether ``syncfs(2)`` can be called here (Linux; glibc 2.14 or later)."""


def syncfs(path: Path) -> None:
    """Flush the whole filesystem that holds ``path``: every file's data and every name.

    One call (one journal commit and device flush) where a file and its folder would
    take two. It waits for everything dirty on that filesystem, other programs' writes
    included, so it suits a store on a filesystem of its own. Since Linux 5.8 it
    reports write-back errors of any file there.

    Raises
    ------
    OSError
        The call failed, or the platform has no ``syncfs``.
    """
    if _SYNCFS is None:
        raise OSError(errno.ENOSYS, "syncfs is not available on this platform")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:  # ctypes releases the GIL for the call
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


# Folder fsyncs run here while the calling thread fsyncs the file: concurrent fsyncs on
# one filesystem share the journal commit and the device flush (ext4/jbd2, xfs), so a
# file plus its folders cost about one flush instead of one each.
_FSYNC_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cspine-fsync")


class FileStore:
    """Atomic file operations under one root folder.

    Parameters
    ----------
    root
        Root of the store; created with mode ``0o750``.
    fsync
        Flush files and folders to stable storage before a rename is reported done.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root).resolve()
        self.fsync = fsync
        for sub in ("", "tmp", "instances", "quarantine", "outputs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            os.chmod(self.root / sub, DIR_MODE)

    @property
    def tmp_dir(self) -> Path:
        """Spool folder on the store's filesystem."""
        return self.root / "tmp"

    def abspath(self, rel: str) -> Path:
        """Absolute path of a store-relative path; refuses anything outside the root."""
        path = (self.root / rel).resolve()
        if self.root not in path.parents:
            raise ValueError(f"path {rel!r} is outside the store")
        return path

    def free_bytes(self) -> int:
        """Bytes free for unprivileged writers on the store's filesystem."""
        return shutil.disk_usage(self.root).free

    def new_temp(self, suffix: str = ".part") -> Path:
        """Create an empty temp file in the spool and return its path."""
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, suffix=suffix)
        os.close(fd)
        return Path(name)

    def sweep_tmp(self, older_than_s: float = 0.0) -> int:
        """Delete the files in the spool (call at start-up, before serving).

        Parameters
        ----------
        older_than_s
            Keep files modified less than this long ago: on a store shared by several
            hosts they may be another receiver's transfers in flight.

        Returns
        -------
        int
            How many orphans were removed.
        """
        removed = 0
        limit = time.time() - older_than_s
        for entry in os.scandir(self.tmp_dir):
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if older_than_s and entry.stat(follow_symlinks=False).st_mtime > limit:
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:  # another process on the store renamed it meanwhile
                continue
            removed += 1
        if removed:
            LOGGER.info("swept orphan temp files count=%d", removed)
        return removed

    def _link(self, src: Path, area: str, sha256: str) -> tuple[str, bool, set[Path]]:
        """Hard-link ``src`` at its content address, never replacing a file; not flushed.

        Returns
        -------
        tuple
            The relative path; whether this call made the name (``False``: the name
            existed, identical bytes placed earlier); the folders whose entries changed
            (the destination, and the parent of each folder created here).
        """
        rel = f"{area}/{sha256[:2]}/{sha256[2:4]}/{sha256}.dcm"
        dest = self.root / rel
        changed = {dest.parent}
        if not dest.parent.is_dir():
            for folder in (dest.parent.parent, dest.parent):
                try:
                    folder.mkdir(mode=DIR_MODE)
                except FileExistsError:
                    continue
                changed.add(folder.parent)
        os.chmod(src, FILE_MODE)
        try:
            os.link(src, dest)
        except FileExistsError:
            return rel, False, {dest.parent}
        return rel, True, changed

    def flush(self, files: Collection[Path], folders: Collection[Path]) -> None:
        """Flush files and folders, concurrently; nothing when the store does not fsync.

        Concurrent fsyncs on one filesystem share the journal commit and the device
        flush, so a batch of names costs about one flush, not one each.
        """
        if not self.fsync:
            return
        calls = [(fsync_dir, f) for f in folders] + [(fsync_file, f) for f in files]
        if not calls:
            return
        (fn, path), rest = calls[-1], calls[:-1]
        pending = [_FSYNC_POOL.submit(f, p) for f, p in rest]
        try:
            fn(path)  # one on this thread
        finally:
            for done in pending:
                done.result()

    def _place(self, src: Path, area: str, sha256: str) -> str:
        """Move ``src`` to its content address; durable when this returns.

        ``src`` is hard-linked to the new name first (which never replaces a file), then
        the file and every folder whose entries changed (the destination, and the parent
        of each folder created here) are fsynced concurrently; only when all of them are
        done does this return, so a caller commits its catalog row after the file and its
        name are on stable storage. Should power fail earlier, the file is at most an
        unrecorded orphan, which :func:`storage.catalog.reconcile` removes at start-up.
        When the name exists already (identical bytes placed by a racing association,
        committed or about to be), that file is kept as it is and fsynced, and ``src``
        is dropped: a file another row may own is never swapped for one not yet on disk.
        """
        rel, _created, changed = self._link(src, area, sha256)
        src.unlink()
        self.flush([self.root / rel], changed)
        return rel

    def link_instance(self, src: Path, sha256: str) -> tuple[str, bool, set[Path]]:
        """Give ``src`` a second name at its content address in ``instances/``; ``src`` stays.

        Nothing is flushed: a caller placing many files links them all, then flushes
        the files and changed folders together (:meth:`flush`) before its catalog commit.

        Returns
        -------
        tuple
            The relative path, whether this call made the name, the folders changed
            (see :meth:`_link`).
        """
        return self._link(src, "instances", sha256)

    def commit_instance(self, src: Path, sha256: str) -> str:
        """Move ``src`` durably into ``instances/`` (see :meth:`_place`); its relative path."""
        return self._place(src, "instances", sha256)

    def quarantine(self, src: Path, sha256: str) -> str:
        """Move ``src`` durably into ``quarantine/`` (see :meth:`_place`); its relative path."""
        return self._place(src, "quarantine", sha256)

    def write_output(self, job_id: int, name: str, data: bytes) -> str:
        """Write an output file atomically under ``outputs/<job_id>/``."""
        folder = self.root / "outputs" / str(int(job_id))
        folder.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        if not name.replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"output name {name!r} must be alphanumeric")
        tmp = self.new_temp()
        with tmp.open("wb") as fh:
            fh.write(data)
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, folder / name)
        if self.fsync:
            fsync_dir(folder)
        return f"outputs/{int(job_id)}/{name}"

    def iter_instance_files(self) -> list[str]:
        """Relative paths of every file under ``instances/`` and ``quarantine/``."""
        out = []
        for area in ("instances", "quarantine"):
            base = self.root / area
            for dirpath, _dirs, files in os.walk(base):
                for name in files:
                    out.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        return out
