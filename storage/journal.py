"""The ingest journal: acknowledged instances whose catalog row is still to be written.

With ``storage.acknowledge = "journal"`` a receiver answers 0x0000 once the validated
instance is durable here, and an applier (another process) hashes it, places it at its
content address and commits its catalog row behind the acknowledgement. After a crash
the entries left here are applied again before the node serves (applying is idempotent:
an entry whose row exists already is a duplicate and is dropped).

Layout, under the store root (same filesystem as the spool, so the rename is atomic)::

    journal/<ns>-<pid>-<seq>-<ae hex>.dcm   one entry: the instance as received
    journal/bad/<name>                      entries that could not be applied (kept)

The name carries the arrival time (nanoseconds since the epoch, which orders replay),
the receiving process and a counter (unique names without a lookup), and the calling AE
title in hexadecimal (any AE character survives a file name). Appending is: flush the
spool file's data, rename it into ``journal/``, flush the folder: two flushes, and
nothing else on the acknowledgement path. With ``flush="filesystem"``
(``storage.journal_flush``) it is: rename, then one ``syncfs(2)`` of the store's
filesystem, which makes the data and the name durable in one journal commit (and
flushes whatever else is dirty there, so it is meant for a store on a filesystem of its
own). A crash between that rename and the flush can leave an entry whose data did not
reach the disk; it was never acknowledged, and the applier sets it aside when it cannot
be parsed (its kept size does not match).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from storage.catalog import InstanceHeader
from storage.filestore import HAS_SYNCFS, fsync_dir, syncfs

SUFFIX = ".dcm"
HEADER_XATTR = "user.cspine.header"
"""Extended attribute of an entry holding its validated header as JSON."""


@dataclass(frozen=True)
class JournalEntry:
    """One acknowledged instance waiting in the journal."""

    path: Path
    received_ns: int
    calling_ae: str | None


class Journal:
    """Append acknowledged instances; list, apply and drop them in arrival order.

    Parameters
    ----------
    store_root
        Root of the file store (the journal is its ``journal/`` folder).
    fsync
        Flush the entry and the folder before :meth:`append` returns (the durability
        promise of a 0x0000; off only in tests and benchmarks of the unsafe case).
    """

    def __init__(
        self, store_root: str | os.PathLike[str], *, fsync: bool = True, flush: str = "file"
    ) -> None:
        if flush not in ("file", "filesystem"):
            raise ValueError(f"journal flush must be 'file' or 'filesystem', not {flush!r}")
        if fsync and flush == "filesystem" and not HAS_SYNCFS:
            raise ValueError("journal flush 'filesystem' needs syncfs(2) (Linux)")
        self.root = Path(store_root).resolve() / "journal"
        self.bad_dir = self.root / "bad"
        self.fsync = fsync
        self.flush = flush
        for folder in (self.root, self.bad_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._seq = itertools.count()
        self._seq_lock = threading.Lock()

    def _name(self, calling_ae: str | None) -> str:
        with self._seq_lock:
            seq = next(self._seq)
        ae = "" if calling_ae is None else calling_ae.encode("ascii", "replace").hex()
        return f"{time.time_ns():020d}-{os.getpid()}-{seq:08d}-{ae}{SUFFIX}"

    def append(
        self,
        spool: Path,
        calling_ae: str | None,
        header: InstanceHeader | None = None,
        *,
        checkpoint: Callable[[str], None] | None = None,
    ) -> Path:
        """Make a closed, validated spool file a journal entry; durable when this returns.

        Parameters
        ----------
        spool
            The instance, a closed file on the store's filesystem; it is moved.
        calling_ae
            The sender's AE title.
        header
            The attributes the receiver validated, kept with the entry (an extended
            attribute, :data:`HEADER_XATTR`) so the applier need not parse the file
            again; where the filesystem has no extended attributes, it parses.
        checkpoint
            Fault-injection hook called with ``"before-journal-rename"`` once the data
            is flushed (with ``flush="filesystem"``: once the header is kept; tests
            only, ``None`` in production).

        Returns
        -------
        Path
            The entry.
        """
        if header is not None:
            kept = {"header": asdict(header), "size": spool.stat().st_size}
            with contextlib.suppress(OSError):  # ENOTSUP: the applier parses instead
                os.setxattr(spool, HEADER_XATTR, json.dumps(kept).encode())
        flush = self.flush if self.fsync else None
        if flush == "file":
            fd = os.open(spool, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        if checkpoint is not None:
            checkpoint("before-journal-rename")
        os.chmod(spool, 0o640)
        entry = self.root / self._name(calling_ae)
        os.rename(spool, entry)
        if flush == "file":
            fsync_dir(self.root)
        elif flush == "filesystem":
            syncfs(self.root)  # the data and the new name, in one flush
        return entry

    @staticmethod
    def header(entry: JournalEntry) -> InstanceHeader | None:
        """The header the receiver kept with ``entry``, or ``None`` (parse the file).

        ``None`` too when the entry's size is not the size the receiver validated (an
        entry torn by a power cut with fsync off): parsing it then sets it aside.
        """
        try:
            kept = json.loads(os.getxattr(entry.path, HEADER_XATTR))
            if kept["size"] != entry.path.stat().st_size:
                return None
            return InstanceHeader(**kept["header"])
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def pending(
        self, limit: int | None = None, *, share: tuple[int, int] = (0, 1)
    ) -> list[JournalEntry]:
        """Entries waiting to be applied, oldest first (at most ``limit``).

        Parameters
        ----------
        share
            ``(i, k)``: only the entries of applier ``i`` of ``k`` (by a hash of the
            name, so every entry belongs to exactly one share).
        """
        names = sorted(self._names(share))
        if limit is not None:
            names = names[:limit]
        return [parse_entry(self.root / name) for name in names]

    def arrivals(self, *, share: tuple[int, int] = (0, 1)) -> tuple[int, int] | None:
        """Arrival times (ns since the epoch) of the oldest and newest entries of a share,
        from their names; ``None`` when none waits."""
        times = [
            int(stem) for name in self._names(share) if (stem := name.split("-", 1)[0]).isdigit()
        ]
        return (min(times), max(times)) if times else None

    def _names(self, share: tuple[int, int]) -> Iterator[str]:
        """Names of the entry files of share ``(i, k)`` (by a hash of the name)."""
        index, count = share
        for e in os.scandir(self.root):
            if (
                e.name.endswith(SUFFIX)
                and (count == 1 or zlib.crc32(e.name.encode()) % count == index)
                and e.is_file()
            ):
                yield e.name

    def count(self) -> int:
        """How many entries wait (the backlog ``cspine status`` shows)."""
        return sum(1 for e in os.scandir(self.root) if e.name.endswith(SUFFIX))

    def waiting_studies(self) -> set[str] | None:
        """Study Instance UIDs of the entries waiting now; ``None`` when an entry's is
        unknown (no kept header: a filesystem without extended attributes)."""
        uids = set()
        for entry in self.pending():
            header = self.header(entry)
            if header is None:
                if entry.path.exists():
                    return None
                continue  # applied meanwhile
            uids.add(header.study_instance_uid)
        return uids

    def drop(self, entry: JournalEntry) -> None:
        """Remove an applied entry (its bytes are in the store and its row committed)."""
        entry.path.unlink(missing_ok=True)

    def set_aside(self, entry: JournalEntry) -> Path:
        """Move an entry that cannot be applied to ``journal/bad/``; nothing is deleted."""
        dest = self.bad_dir / entry.path.name
        os.replace(entry.path, dest)
        if self.fsync:
            fsync_dir(self.bad_dir)
            fsync_dir(self.root)
        return dest

    def bad_count(self) -> int:
        """How many entries were set aside."""
        return sum(1 for _ in os.scandir(self.bad_dir))

    @contextmanager
    def applying(self, *, wait: bool = True, share: tuple[int, int] = (0, 1)) -> Iterator[bool]:
        """Hold the lock of one share (``journal/.apply-<i>-of-<k>.lock``); whether taken.

        One pass of one applier per share at a time: the appliers of ``cspine serve``
        and of other hosts on the same store. With ``wait=False`` the lock is only tried.
        """
        fd = os.open(
            self.root / f".apply-{share[0]}-of-{share[1]}.lock", os.O_RDWR | os.O_CREAT, 0o640
        )
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # releases the lock


def parse_entry(path: Path) -> JournalEntry:
    """Read the arrival time and calling AE title from an entry's name.

    Raises
    ------
    ValueError
        When the name is not ``<ns>-<pid>-<seq>-<ae hex>.dcm``.
    """
    stem = path.name.removesuffix(SUFFIX)
    parts = stem.split("-", 3)
    if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]):
        raise ValueError(f"journal entry name {path.name!r} is not <ns>-<pid>-<seq>-<ae>.dcm")
    ae_hex = parts[3]
    if ae_hex == "":
        calling_ae: str | None = None
    else:
        try:
            calling_ae = bytes.fromhex(ae_hex).decode("ascii")
        except ValueError as exc:
            raise ValueError(f"journal entry name {path.name!r} has a bad AE title") from exc
    return JournalEntry(path, int(parts[0]), calling_ae)
