"""The one receive path shared by the SCP and ``cspine import``.

:meth:`Receiver.accept` turns a file into a DIMSE status: it checks free space,
validates the instance, makes it durable and records it. It never raises.

Fault injection (tests only): when the environment variable ``CSPINE_FAULT_KILL_AT``
is set to ``<point>`` or ``<point>:<n>`` when a :class:`Receiver` is built, the process
SIGKILLs itself when the n-th instance (default 1) reaches that point of the receive
path. The points, in order, are :data:`KILL_POINTS`. Unset (always, in production),
the hook is a no-op.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from config import Settings
from dicom_node.logsafe import short_uid
from dicom_node.validate import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    OUT_OF_RESOURCES,
    SUCCESS,
    Limits,
    Rejection,
    inspect_file,
    valid_uid,
)
from storage import Catalog, CatalogBusyError, FileStore, IngestOutcome, ingest
from storage.catalog import is_known, record_refusal
from storage.journal import Journal

LOGGER = logging.getLogger(__name__)

FAULT_ENV = "CSPINE_FAULT_KILL_AT"
KILL_POINTS: tuple[str, ...] = (
    "after-temp-write",  # the spool file is complete, nothing checked yet
    "before-rename",  # validated and hashed, not yet renamed into the store
    "before-commit",  # renamed into the store, catalog transaction not committed
    "before-response",  # committed (or journaled), the status not yet returned
)
JOURNAL_KILL_POINTS: tuple[str, ...] = (
    "before-journal-rename",  # validated and flushed, not yet renamed into the journal
    "apply-before-commit",  # the applier placed an entry, its row not committed
    "apply-before-drop",  # the applier committed an entry's row, the entry not removed
)
"""Points of ``storage.acknowledge = "journal"``: the receiver's, then the applier's."""


def parse_kill_point(spec: str | None) -> tuple[str, int] | None:
    """Parse a ``CSPINE_FAULT_KILL_AT`` value, ``<point>`` or ``<point>:<n>``.

    Returns
    -------
    tuple or None
        ``(point, n)``, or ``None`` for an empty value.

    Raises
    ------
    ValueError
        When the point is not one of :data:`KILL_POINTS` or ``n`` is not a positive integer.
    """
    if not spec:
        return None
    point, _, count = spec.partition(":")
    points = KILL_POINTS + JOURNAL_KILL_POINTS
    if point not in points:
        raise ValueError(f"{FAULT_ENV} point must be one of {', '.join(points)}")
    if count and (not count.isdigit() or int(count) < 1):
        raise ValueError(f"{FAULT_ENV} count must be a positive integer, got {count!r}")
    return point, int(count or 1)


class KillSwitch:
    """SIGKILL this process when the n-th instance reaches a named receive point."""

    def __init__(self, point: str, nth: int) -> None:
        self.point = point
        self.nth = nth
        self._seen = 0
        self._lock = threading.Lock()

    def __call__(self, point: str) -> None:
        if point != self.point:
            return
        with self._lock:
            self._seen += 1
            if self._seen != self.nth:
                return
        LOGGER.warning("fault injection: SIGKILL at %s (instance %d)", point, self.nth)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def arm_kill_switch(
    environ: Mapping[str, str] | None, *, applier: bool
) -> Callable[[str], None] | None:
    """The kill switch ``CSPINE_FAULT_KILL_AT`` asks for, or ``None`` (production).

    Parameters
    ----------
    environ
        Where the variable is read (``None``: ``os.environ``).
    applier
        Arm only the journal applier's points (``apply-...``); else the receiver's.
    """
    kill = parse_kill_point((os.environ if environ is None else environ).get(FAULT_ENV))
    if kill is None or kill[0].startswith("apply-") != applier:
        return None
    LOGGER.warning("fault injection armed: %s=%s:%d", FAULT_ENV, *kill)
    return KillSwitch(*kill)


@dataclass(frozen=True)
class Outcome:
    """Status answered for one instance and why."""

    status: int
    reason: str = ""
    study_id: int | None = None
    instance_id: int | None = None


def zero_preamble(path: Path) -> None:
    """Overwrite the 128-byte preamble of a Part-10 file with zeros, in place.

    A preamble may carry an executable header (CVE-2019-11687); the node never keeps one.
    Files without the ``DICM`` prefix at offset 128 are left alone (they have no preamble).
    """
    with open(path, "r+b") as fh:
        head = fh.read(132)
        if len(head) == 132 and head[128:132] == b"DICM" and head[:128] != bytes(128):
            fh.seek(0)
            fh.write(bytes(128))


class Receiver:
    """Validate, store and catalog instances.

    Parameters
    ----------
    settings
        Node settings (limits, free-space threshold).
    catalog, store
        The process's catalog and file store.
    free_bytes
        Free-space probe; defaults to the store's filesystem. Tests inject a fake.
    environ
        Where ``CSPINE_FAULT_KILL_AT`` is read, once, here (defaults to ``os.environ``).
    journal
        With ``storage.acknowledge = "journal"``, the journal that new instances from a
        network peer go to (answered once durable there; the applier catalogs them).
        ``None``: every instance is placed and cataloged before it is answered.
    """

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        store: FileStore,
        free_bytes: Callable[[], int] | None = None,
        environ: Mapping[str, str] | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.store = store
        self.journal = journal
        self.limits = Limits.of(settings.node)
        self._free_bytes = free_bytes or store.free_bytes
        self._checkpoint = arm_kill_switch(environ, applier=False)

    def accept(
        self,
        path: Path,
        *,
        affected_sop_instance_uid: str | None = None,
        affected_sop_class_uid: str | None = None,
        calling_ae: str | None = None,
        consume: bool = True,
    ) -> Outcome:
        """Take one instance; return the status to answer. Never raises.

        Parameters
        ----------
        path
            The instance in DICOM file format.
        affected_sop_instance_uid, affected_sop_class_uid
            From the C-STORE request, or ``None`` for imports.
        calling_ae
            The sender's AE title, or ``None`` for imports.
        consume
            The file is a spool file that may be moved or deleted (the SCP case).
            When false (imports), the file is copied to the spool first.
        """
        spool: Path | None = None
        try:
            if self._free_bytes() < self.settings.storage.min_free_bytes:
                return Outcome(OUT_OF_RESOURCES, "not enough free disk space")
            if consume and path.parent.resolve() == self.store.tmp_dir:
                spool = path
            else:
                spool = self.store.new_temp()
                shutil.copyfile(path, spool)
                zero_preamble(spool)
            if self._checkpoint is not None:
                self._checkpoint("after-temp-write")
            header = inspect_file(
                spool,
                affected_sop_instance_uid=affected_sop_instance_uid,
                affected_sop_class_uid=affected_sop_class_uid,
                limits=self.limits,
            )
            if (
                self.journal is not None
                and calling_ae is not None
                and not is_known(self.catalog, header.sop_instance_uid)
            ):
                # a new instance: durable in the journal now, cataloged behind the answer
                self.journal.append(spool, calling_ae, header, checkpoint=self._checkpoint)
                spool = None  # consumed by the journal
                if self._checkpoint is not None:
                    self._checkpoint("before-response")
                return Outcome(SUCCESS, "journaled")
            # known UIDs (duplicates, re-sends with other content) and imports: in line
            result = ingest(
                self.catalog, self.store, spool, header, calling_ae, checkpoint=self._checkpoint
            )
            spool = None  # consumed by ingest
            if self._checkpoint is not None:
                self._checkpoint("before-response")
        except Rejection as exc:
            LOGGER.info("instance refused status=0x%04X reason=%s", exc.status, exc.reason)
            self._record(exc.status, exc.reason, calling_ae, affected_sop_instance_uid)
            return Outcome(exc.status, exc.reason)
        except CatalogBusyError as exc:
            LOGGER.error("instance refused status=0x%04X reason=%s", OUT_OF_RESOURCES, exc)
            return Outcome(OUT_OF_RESOURCES, "catalog busy")
        except OSError as exc:
            LOGGER.error(
                "instance refused status=0x%04X reason=%s", OUT_OF_RESOURCES, exc.strerror or exc
            )
            return Outcome(OUT_OF_RESOURCES, "storage error")
        except Exception as exc:
            LOGGER.exception(
                "instance refused status=0x%04X unexpected %s",
                CANNOT_UNDERSTAND,
                type(exc).__name__,
            )
            return Outcome(CANNOT_UNDERSTAND, f"unexpected {type(exc).__name__}")
        finally:
            if spool is not None:  # refused: the spool file is not kept
                spool.unlink(missing_ok=True)
        if result.outcome is IngestOutcome.CONFLICT:
            LOGGER.warning(
                "instance refused status=0x%04X study_id=%s reason=%s",
                DATASET_MISMATCH,
                result.study_id,
                result.detail,
            )
            self._record(DATASET_MISMATCH, result.detail, calling_ae, header.sop_instance_uid)
            return Outcome(DATASET_MISMATCH, result.detail, result.study_id)
        LOGGER.debug(
            "instance %s study_id=%s instance_id=%s uid=%s ae=%s",
            result.outcome.value.lower(),
            result.study_id,
            result.instance_id,
            short_uid(header.sop_instance_uid),
            calling_ae,
        )
        if result.outcome is IngestOutcome.QUARANTINED:
            LOGGER.warning(
                "instance quarantined study_id=%s reason=%s", result.study_id, result.detail
            )
        return Outcome(SUCCESS, result.outcome.value, result.study_id, result.instance_id)

    def _record(self, status: int, reason: str, calling_ae: str | None, uid: str | None) -> None:
        """Keep the reason of a refusal in the catalog; never raises (it is best effort)."""
        uid = uid.rstrip("\0 ") if uid else None
        try:
            record_refusal(
                self.catalog, status, reason, calling_ae, uid if valid_uid(uid) else None
            )
        except Exception as exc:
            LOGGER.warning("refusal not recorded: %s", type(exc).__name__)


def open_node_storage(settings: Settings) -> tuple[Catalog, FileStore]:
    """Open the catalog and the file store named by the settings."""
    store = FileStore(settings.storage.store_path, fsync=settings.storage.fsync)
    catalog = Catalog(settings.storage.url)
    return catalog, store


def open_journal(settings: Settings, store: FileStore) -> Journal | None:
    """The ingest journal when ``storage.acknowledge = "journal"``, else ``None``."""
    if settings.storage.acknowledge != "journal":
        return None
    return Journal(store.root, fsync=settings.storage.fsync, flush=settings.storage.journal_flush)
