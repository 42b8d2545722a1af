"""The journal applier: catalog what was acknowledged from the ingest journal.

With ``storage.acknowledge = "journal"`` the receivers answer 0x0000 once an instance is
durable in :class:`storage.journal.Journal`; this applier then does what the answer no
longer waits for, ``storage.apply_batch`` entries at a time: hash each, link it at its
content address, flush the new names together, commit the rows in one transaction, and
only then drop the entries. ``cspine serve`` applies every entry left by a crash before it
listens and after it stops (:func:`replay`), and keeps ``storage.appliers`` applier
child processes (``python -m dicom_node.apply``) running beside its receivers, on
other cores than theirs.

Applying is idempotent, so a crash anywhere in it is repaired by applying again: an
entry whose row was committed is a duplicate (same bytes) and is dropped; a file placed
without its row is placed again (the name exists; the file is kept). An entry that can
never be applied (unreadable, or its UID stored in another series or study) is moved to
``journal/bad/`` and logged; nothing acknowledged is deleted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from config import Settings
from config.digest import sha256_file
from dicom_node.receive import arm_kill_switch
from dicom_node.validate import Limits, Rejection, inspect_file
from storage import (
    Catalog,
    CatalogBusyError,
    FileStore,
    IngestOutcome,
    InstanceHeader,
    PlacedInstance,
    RecordRaceError,
    ingest,
    ingest_placed,
    stored_paths,
)
from storage.journal import Journal, JournalEntry

LOGGER = logging.getLogger(__name__)

IDLE_S = (0.005, 0.05)
"""Wait between looks at an empty journal: from the first to the second, doubling
while it stays empty (an idle node looks 20 times a second; a busy one every 5 ms)."""
QUIET_S = 0.05
"""An applier with ``storage.apply_delay_seconds`` set waits for a pause this long in
arrivals before it applies (or for its oldest entry to wait that long)."""
RETRY_S = 1.0
"""Wait after an entry failed for a passing reason (catalog busy, disk error)."""


class Applier:
    """Apply journal entries to the store and the catalog, oldest first.

    Parameters
    ----------
    settings
        Node settings (the limits the entries are checked against again).
    catalog, store, journal
        The node's catalog, file store and journal.
    environ
        Where ``CSPINE_FAULT_KILL_AT`` is read (tests only; default ``os.environ``).
    share
        ``(i, k)``: apply the entries of share ``i`` of ``k`` (``storage.appliers``
        processes, each with its own share and lock).
    """

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        store: FileStore,
        journal: Journal,
        environ: Mapping[str, str] | None = None,
        share: tuple[int, int] = (0, 1),
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.journal = journal
        self.share = share
        self.limits = Limits.of(settings.node)
        self.batch = settings.storage.apply_batch
        self.delay_s = settings.storage.apply_delay_seconds
        self._checkpoint = arm_kill_switch(environ, applier=True)

    def apply(self, entry: JournalEntry) -> str:
        """Apply one entry; the outcome (``stored``, ``duplicate``, ``quarantined``, ``bad``).

        Raises
        ------
        OSError, storage.CatalogBusyError
            A passing failure: the entry stays and is tried again.
        """
        # an entry another applier (a start-up replay beside it) took meanwhile is
        # "gone": its file vanishes under one of the steps below
        header = self.journal.header(entry)  # validated by the receiver
        if header is None:
            try:
                header = inspect_file(
                    entry.path,
                    affected_sop_instance_uid=None,
                    affected_sop_class_uid=None,
                    limits=self.limits,
                )
            except FileNotFoundError:
                return "gone"
            except Rejection as exc:
                return self._set_aside(entry, exc.reason)
        # ingest consumes its file; it gets a second name of the entry's bytes, so the
        # entry stays until its row is committed
        link = self.store.tmp_dir / f"apply-{uuid.uuid4().hex}.part"
        try:
            os.link(entry.path, link)
        except FileNotFoundError:
            return "gone"
        received = _received(entry)
        try:
            result = ingest(
                self.catalog,
                self.store,
                link,
                header,
                entry.calling_ae,
                checkpoint=self._hook,
                received_at=received,
            )
        finally:
            link.unlink(missing_ok=True)
        if result.outcome is IngestOutcome.CONFLICT:
            return self._set_aside(entry, result.detail)
        if self._checkpoint is not None:
            self._checkpoint("apply-before-drop")
        self.journal.drop(entry)
        return result.outcome.value.lower()

    def _hook(self, point: str) -> None:
        if point == "before-commit" and self._checkpoint is not None:
            self._checkpoint("apply-before-commit")

    def _set_aside(self, entry: JournalEntry, reason: str) -> str:
        try:
            dest = self.journal.set_aside(entry)
        except FileNotFoundError:
            return "gone"  # another applier decided it first
        LOGGER.error("journal entry set aside entry=%s reason=%s", dest.name, reason)
        return "bad"

    def apply_batch(self, entries: Sequence[JournalEntry]) -> list[str]:
        """Apply entries in their order; the outcome of each, as :meth:`apply` gives it.

        Entries with new SOP Instance UIDs go together (:meth:`_apply_new`): hashed,
        linked at their content addresses, flushed together, then recorded in one
        transaction. An entry without a kept header, with a UID the catalog holds
        already, or with one seen earlier in ``entries`` goes through :meth:`apply`
        alone, after what came before it is recorded, so the order of arrival decides
        duplicates and quarantines as it does one by one.
        """
        headers = [self.journal.header(entry) for entry in entries]
        stored = stored_paths(self.catalog, [h.sop_instance_uid for h in headers if h])
        outcomes: list[str] = []
        group: list[tuple[JournalEntry, InstanceHeader]] = []
        seen: set[str] = set()
        for entry, header in zip(entries, headers, strict=True):
            uid = None if header is None else header.sop_instance_uid
            if header is None or uid in stored or uid in seen:
                outcomes += self._apply_new(group)
                group = []
                outcomes.append(self.apply(entry))
            else:
                group.append((entry, header))
            if uid is not None:
                seen.add(uid)
        outcomes += self._apply_new(group)
        return outcomes

    def _apply_new(self, group: Sequence[tuple[JournalEntry, InstanceHeader]]) -> list[str]:
        """Apply entries whose UIDs were new when looked up, in one catalog commit.

        Raises
        ------
        OSError, storage.CatalogBusyError
            A passing failure: nothing of the group is recorded, the names this call
            made are removed again, and every entry stays to be tried again.
        """
        outcomes: list[str | None] = [None] * len(group)
        placed: list[tuple[int, PlacedInstance, bool]] = []  # (index, item, name made)
        files: set[Path] = set()
        folders: set[Path] = set()
        try:
            for i, (entry, header) in enumerate(group):
                try:
                    sha = sha256_file(entry.path)
                    size = entry.path.stat().st_size
                    rel, made, changed = self.store.link_instance(entry.path, sha)
                except FileNotFoundError:  # another applier took it
                    outcomes[i] = "gone"
                    continue
                item = PlacedInstance(header, rel, sha, size, entry.calling_ae, _received(entry))
                placed.append((i, item, made))
                files.add(self.store.root / rel)
                folders |= changed
            # the entries' data were flushed when they were journaled; their new names
            # (and link counts) are flushed here, all at once, before the rows commit
            self.store.flush(files, folders)
            if self._checkpoint is not None:
                for _ in placed:
                    self._checkpoint("apply-before-commit")
            results = ingest_placed(self.catalog, [item for _i, item, _m in placed])
        except RecordRaceError:
            # a writer elsewhere inserted one of these first: one by one, each sees its
            # rows (the names made here are content addresses, reused by each ingest)
            return [
                self.apply(entry) if done is None else done
                for done, (entry, _header) in zip(outcomes, group, strict=True)
            ]
        except BaseException:
            for _i, item, made in placed:
                if made:
                    (self.store.root / item.file_path).unlink(missing_ok=True)
            raise
        for (i, item, made), result in zip(placed, results, strict=True):
            entry = group[i][0]
            if result is None:  # stored meanwhile by a writer elsewhere: one by one
                uid = item.header.sop_instance_uid
                if made and stored_paths(self.catalog, [uid]).get(uid) != item.file_path:
                    (self.store.root / item.file_path).unlink(missing_ok=True)
                outcomes[i] = self.apply(entry)
            elif result.outcome is IngestOutcome.CONFLICT:
                if made:
                    (self.store.root / item.file_path).unlink(missing_ok=True)
                outcomes[i] = self._set_aside(entry, result.detail)
            else:
                if self._checkpoint is not None:
                    self._checkpoint("apply-before-drop")
                self.journal.drop(entry)
                outcomes[i] = "stored"
        return [o for o in outcomes if o is not None]

    def apply_pending(
        self, limit: int | None = None, stop: threading.Event | None = None
    ) -> dict[str, int]:
        """Apply the entries waiting now, oldest first, ``storage.apply_batch`` at a
        time; counts per outcome.

        A passing failure stops the pass (the entries stay; the next pass retries them).
        Once ``stop`` is set the pass ends after the batch in hand: what is left is
        applied by ``cspine serve`` itself (:func:`replay`), at its own priority.
        """
        counts: dict[str, int] = {}
        entries = self.journal.pending(limit, share=self.share)
        for start in range(0, len(entries), self.batch):
            if stop is not None and stop.is_set():
                break
            for outcome in self.apply_batch(entries[start : start + self.batch]):
                counts[outcome] = counts.get(outcome, 0) + 1
        return counts

    def due(self, now_ns: int | None = None) -> bool:
        """Whether to apply now: entries wait, and arrivals paused for :data:`QUIET_S` or
        the oldest has waited ``storage.apply_delay_seconds`` (0: whenever entries wait).

        The receivers' answers go first during a burst: the applier's hashing, flushes
        and commits would share the cores and the disk with them; it catches up in the
        pause after the burst, or within the delay under a steady stream. An arrival
        time ahead of this host's clock (a store shared with a host whose clock is
        ahead) counts as due, so a skewed clock cannot hold entries back.
        """
        span = self.journal.arrivals(share=self.share)
        if span is None:
            return False
        if self.delay_s == 0:
            return True
        now = time.time_ns() if now_ns is None else now_ns
        oldest, newest = span
        return (
            now - newest >= QUIET_S * 1e9
            or now - oldest >= self.delay_s * 1e9
            or newest > now + self.delay_s * 1e9
        )

    def run(self, stop: threading.Event) -> None:
        """Apply entries as they arrive until ``stop`` is set.

        Each pass holds its share's lock, so the appliers of several hosts on one store
        take turns. What waits at a stop is applied by ``cspine serve`` itself once its
        appliers have stopped (:func:`replay`), or at the next start.
        """
        idle = IDLE_S[0]
        while not stop.is_set():
            try:
                done: dict[str, int] = {}
                if self.due():  # else held back: instances are arriving
                    with self.journal.applying(share=self.share):
                        done = self.apply_pending(limit=256, stop=stop)
            except (OSError, CatalogBusyError) as exc:  # passing: log, wait, retry
                LOGGER.error("journal apply failed, retrying: %s", type(exc).__name__)
                stop.wait(RETRY_S)
                continue
            except Exception:  # a defect: logged whole (no identifiers), then retried
                LOGGER.exception("journal apply failed, retrying")
                stop.wait(RETRY_S)
                continue
            if done:
                idle = IDLE_S[0]
            else:
                stop.wait(idle)
                idle = min(idle * 2, IDLE_S[1])


def _received(entry: JournalEntry) -> dt.datetime:
    """When the entry was acknowledged (naive UTC, as the catalog keeps times)."""
    return dt.datetime.fromtimestamp(entry.received_ns / 1e9, dt.UTC).replace(tzinfo=None)


def replay(settings: Settings, catalog: Catalog, store: FileStore, journal: Journal) -> int:
    """Apply every entry waiting (at start: what a crash left); how many were applied.

    Raises
    ------
    OSError, storage.CatalogBusyError
        When an entry cannot be applied now: the node must not serve with acknowledged
        instances missing from its catalog.
    """
    applier = Applier(settings, catalog, store, journal, environ={})
    counts = applier.apply_pending()  # every share, before any applier starts
    total = sum(counts.values())
    if total:
        LOGGER.info(
            "journal replayed entries=%d %s",
            total,
            " ".join(f"{k}={v}" for k, v in sorted(counts.items())),
        )
    return total


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the applier child process of ``cspine serve``."""
    import signal

    from dicom_node.cli.common import configure_logging
    from dicom_node.cli.job_cmds import die_with_parent
    from dicom_node.receive import open_node_storage

    parser = argparse.ArgumentParser(prog="python -m dicom_node.apply")
    parser.add_argument("--settings-file", required=True)
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument(
        "--once", action="store_true", help="apply what waits now, then exit (a replay)"
    )
    parser.add_argument("--share", type=int, default=0, help="this applier's share, 0-based")
    args = parser.parse_args(argv)
    if args.parent_pid:
        die_with_parent(args.parent_pid)
    settings = Settings.model_validate_json(Path(args.settings_file).read_text())
    if not args.once:
        # background work: the receivers, whose answers senders wait for, go first when
        # the cores are busy; the applier catches up in their gaps
        os.nice(settings.storage.applier_nice)
    configure_logging(settings.logging.level)
    catalog, store = open_node_storage(settings)
    journal = Journal(store.root, fsync=settings.storage.fsync)  # it never appends
    stop = threading.Event()

    def _term(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)  # Ctrl-C reaches the whole process group
    try:
        if args.once:  # every share
            applier = Applier(settings, catalog, store, journal)
            counts = applier.apply_pending()
            LOGGER.info("journal applied %s", counts)
        else:
            share = (args.share, settings.storage.appliers)
            if not 0 <= share[0] < share[1]:
                parser.error(f"--share must be below storage.appliers ({share[1]})")
            Applier(settings, catalog, store, journal, share=share).run(stop)
    finally:
        catalog.dispose()


if __name__ == "__main__":
    main()
