"""Destinations and the outbox: what is to be sent where, and what came of each try.

A destination is a catalog row with an id and its transport; an outbox row refers to
it by id. The rows are made from the receiver's configuration when it starts
(:func:`sync_destinations`): a destination that keeps its name keeps its id and its
waiting deliveries, whatever else changes; one that leaves the configuration is
marked inactive, and its waiting deliveries are **held** (visible in ``cspine
status``, refused by the sender) rather than sent over another transport.

Retries are bounded: a delivery that failed ``max_attempts`` times in a row is
dead-lettered (``DEAD``), shown by ``cspine status`` and revived by ``cspine resend``.

Senders on several hosts share the outbox: :func:`claim_deliveries` takes the due rows
with ``SELECT ... FOR UPDATE SKIP LOCKED`` (PostgreSQL; on SQLite the write lock
serialises it), names itself in ``claimed_by`` and moves their next attempt a lease
ahead in the same transaction, so no other sender sees them as due while this one
sends; the attempt's outcome then sets the row's state (and its real next attempt) and
clears the claim. Rows of a sender that died mid-send are due again at once when it is
known dead (a process of this host that is gone), otherwise when the lease ends: they
are sent again, with the same SOP Instance UIDs and bytes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from storage.db import Catalog
from storage.models import DestinationRow, OutboxItem, OutboxState, Output, utcnow
from storage.records import DeliveryInfo, DestinationInfo, DestinationSpec


def _apply(row: DestinationRow, spec: DestinationSpec) -> bool:
    values = {
        "kind": spec.kind,
        "ae_title": spec.ae_title,
        "host": spec.host,
        "port": spec.port,
        "tls": spec.tls,
        "outputs": ",".join(spec.outputs),
        "url": spec.url,
        "active": True,
    }
    changed = False
    for key, value in values.items():
        if getattr(row, key) != value:
            setattr(row, key, value)
            changed = True
    return changed


def sync_destinations(catalog: Catalog, specs: Sequence[DestinationSpec]) -> list[DestinationInfo]:
    """Make the destination rows match the configuration; returns the active rows.

    A spec whose name has a row updates that row (same id: its waiting deliveries now
    go to the new address, over the new transport); a new name gets a new row; rows
    whose name is no longer configured become inactive (never deleted). Receivers of
    several hosts starting at once end with one row per name (the name is unique).

    Raises
    ------
    ValueError
        When two specs have the same name.
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"destination names must be unique; repeated: {', '.join(dup)}")

    def change(session: Session) -> list[DestinationInfo]:
        rows = {r.name: r for r in session.scalars(select(DestinationRow))}
        now = utcnow()
        for spec in specs:
            row = rows.get(spec.name)
            if row is None:
                row = DestinationRow(name=spec.name, created_at=now, updated_at=now)
                _apply(row, spec)
                session.add(row)
                rows[spec.name] = row
            elif _apply(row, spec):
                row.updated_at = now
        for name, row in rows.items():
            if name not in names and row.active:
                row.active = False
                row.updated_at = now
        session.flush()
        return [DestinationInfo.of(rows[n]) for n in names]

    try:
        return catalog.write(change)
    except IntegrityError:
        # a receiver on another host inserted the same name at the same moment: its row
        # is committed now, and is updated rather than inserted
        return catalog.write(change)


def list_destinations(catalog: Catalog, *, active_only: bool = False) -> list[DestinationInfo]:
    """Every destination row (or only the active ones), by id."""
    with catalog.read() as session:
        stmt = select(DestinationRow).order_by(DestinationRow.id)
        if active_only:
            stmt = stmt.where(DestinationRow.active.is_(True))
        return [DestinationInfo.of(r) for r in session.scalars(stmt)]


def queue_deliveries(
    session: Session,
    outputs: Sequence[Output],
    destinations: Sequence[DestinationInfo] | None = None,
) -> int:
    """Queue (or re-queue) each output to each destination that takes its kind.

    ``destinations`` defaults to every active row. A re-queued row (``cspine resend``,
    or a dead letter revived) starts its attempt count afresh. Returns how many rows
    were queued. For use inside a :meth:`Catalog.write` of this package.
    """
    if destinations is None:
        destinations = [
            DestinationInfo.of(r)
            for r in session.scalars(select(DestinationRow).where(DestinationRow.active.is_(True)))
        ]
    n = 0
    for dest in destinations:
        for out in outputs:
            if out.kind not in dest.outputs:
                continue
            item = session.scalar(
                select(OutboxItem).where(
                    OutboxItem.output_id == out.id, OutboxItem.destination_id == dest.id
                )
            )
            if item is None:
                item = OutboxItem(output_id=out.id, destination_id=dest.id)
                session.add(item)
            item.state = OutboxState.PENDING
            item.attempts = 0
            item.next_attempt_at = utcnow()
            item.claimed_by = None
            n += 1
    return n


def _loaded() -> tuple[object, object]:
    return selectinload(OutboxItem.output), selectinload(OutboxItem.destination)


def due_deliveries(catalog: Catalog, now: dt.datetime | None = None) -> list[DeliveryInfo]:
    """PENDING outbox rows whose next attempt is due, oldest first."""
    when = now or utcnow()
    with catalog.read() as session:
        rows = session.scalars(
            select(OutboxItem)
            .options(*_loaded())  # type: ignore[arg-type]
            .where(OutboxItem.state == OutboxState.PENDING, OutboxItem.next_attempt_at <= when)
            .order_by(OutboxItem.id)
        )
        return [DeliveryInfo.of(i) for i in rows]


def claim_deliveries(
    catalog: Catalog,
    sender: str,
    lease_s: float,
    *,
    is_dead: Callable[[str], bool] = lambda _sender: False,
    now: dt.datetime | None = None,
    limit: int = 500,
) -> list[DeliveryInfo]:
    """Claim the due PENDING rows (oldest first, at most ``limit``) for ``sender``.

    Each row is marked ``claimed_by = sender`` and its next attempt moves ``lease_s``
    ahead, committed before this returns: another sender (another host) skips the rows
    while this one sends them, and :func:`record_delivery` or :func:`hold_delivery` ends
    the claim. Rows still claimed by a sender for which ``is_dead`` is true are due at
    once.
    """

    def claim(session: Session) -> list[DeliveryInfo]:
        when = now or utcnow()
        pending = OutboxItem.state == OutboxState.PENDING
        dead = [
            who
            for who in session.scalars(
                select(OutboxItem.claimed_by)
                .where(
                    pending, OutboxItem.claimed_by.is_not(None), OutboxItem.next_attempt_at > when
                )
                .distinct()
            )
            if who is not None and who != sender and is_dead(who)
        ]
        due = OutboxItem.next_attempt_at <= when
        if dead:
            due = due | OutboxItem.claimed_by.in_(dead)
        rows = list(
            session.scalars(
                select(OutboxItem)
                .options(*_loaded())  # type: ignore[arg-type]
                .where(pending, due)
                .order_by(OutboxItem.id)
                .limit(limit)
                .with_for_update(skip_locked=True, of=OutboxItem)
            )
        )
        infos = [DeliveryInfo.of(i) for i in rows]
        until = when + dt.timedelta(seconds=lease_s)
        for item in rows:
            item.next_attempt_at = until
            item.claimed_by = sender
        return infos

    return catalog.write(claim)


def record_delivery(
    catalog: Catalog,
    item_id: int,
    state: OutboxState,
    status: str,
    error: str | None = None,
    retry_in_s: float | None = None,
    *,
    max_attempts: int | None = None,
) -> OutboxState:
    """Record one delivery attempt; returns the state the row is left in.

    A PENDING outcome on the ``max_attempts``-th attempt dead-letters the row, its
    error saying so.
    """

    def change(session: Session) -> OutboxState:
        item = session.get(OutboxItem, item_id)
        assert item is not None
        item.claimed_by = None
        item.attempts += 1
        item.state = state
        item.last_status = status
        item.last_error = error
        gave_up = max_attempts is not None and item.attempts >= max_attempts
        if state is OutboxState.PENDING and gave_up:
            item.state = OutboxState.DEAD
            item.last_error = f"gave up after {item.attempts} attempts; last: {error or status}"
            return item.state
        if state is OutboxState.SENT:
            item.sent_at = utcnow()
        if retry_in_s is not None:
            item.next_attempt_at = utcnow() + dt.timedelta(seconds=retry_in_s)
            item.wait_seconds = retry_in_s
        return item.state

    return catalog.write(change)


def hold_delivery(catalog: Catalog, item_id: int, reason: str, retry_in_s: float) -> None:
    """Keep a row PENDING without counting an attempt (its destination is inactive)."""

    def change(session: Session) -> None:
        item = session.get(OutboxItem, item_id)
        assert item is not None
        item.claimed_by = None
        item.last_status = "held"
        item.last_error = reason
        item.next_attempt_at = utcnow() + dt.timedelta(seconds=retry_in_s)

    catalog.write(change)


def outbox_counts(session: Session) -> dict[OutboxState, int]:
    """Rows per state."""
    rows = session.execute(
        select(OutboxItem.state, func.count(OutboxItem.id)).group_by(OutboxItem.state)
    ).all()
    return {OutboxState(s): int(n) for s, n in rows}


def dead_deliveries(session: Session, limit: int) -> list[DeliveryInfo]:
    """The newest dead letters."""
    rows = session.scalars(
        select(OutboxItem)
        .options(*_loaded())  # type: ignore[arg-type]
        .where(OutboxItem.state == OutboxState.DEAD)
        .order_by(OutboxItem.id.desc())
        .limit(limit)
    )
    return [DeliveryInfo.of(i) for i in rows]


def held_deliveries(session: Session, limit: int) -> list[DeliveryInfo]:
    """PENDING rows whose destination left the configuration."""
    rows = session.scalars(
        select(OutboxItem)
        .join(OutboxItem.destination)
        .options(*_loaded())  # type: ignore[arg-type]
        .where(OutboxItem.state == OutboxState.PENDING, DestinationRow.active.is_(False))
        .order_by(OutboxItem.id)
        .limit(limit)
    )
    return [DeliveryInfo.of(i) for i in rows]
