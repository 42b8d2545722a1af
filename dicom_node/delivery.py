"""Deliver outputs from the persistent outbox by C-STORE or STOW-RS, retrying what is
transient.

A STOW-RS destination (:mod:`dicom_node.stow`) maps its answers onto the same statuses:
no answer or HTTP 401/403/408/425/429/5xx is retried like a refused association, an instance in the
Failed SOP Sequence takes its Failure Reason, and a request refused as a whole (HTTP
4xx) is dead-lettered. A webhook (:mod:`dicom_node.notify`) gets one signed POST per
notification: 2xx is SENT; no answer, 401, 403, 408, 425, 429 and 5xx are retried with
the backoff (dead-lettered after ``delivery.max_attempts``); other answers are DEAD.

* success (0x0000) or a warning status (0xBxxx, 0x0001, 0x0107, 0x0116): SENT;
* association refused, rejected or aborted, no response, 0xA7xx: retried with
  exponential backoff (1 s, 2 s, 4 s ... capped at ``delivery.max_backoff_s``), at most
  ``delivery.max_attempts`` times, then dead-lettered;
* 0xA9xx, 0xCxxx and any other failure status: DEAD (dead-lettered, visible in
  ``cspine status``), never retried automatically; ``cspine resend`` queues it again.

Each outbox row names a destination row (:mod:`storage.outbox`), and the transport
comes from that row: a destination with ``tls = true`` is reached over DICOM TLS with
the node's certificate (``node.tls``), and a TLS set-up error is retried like a refused
association, never sent in plain TCP instead. Deliveries whose destination has left the
configuration are held, not sent. Re-sends use the same files, hence the same SOP
Instance UIDs and bytes.

Every receiver host may run the delivery: each round claims its due rows first
(:func:`storage.outbox.claim_deliveries`, a lease of :data:`CLAIM_LEASE_S` in the
sender's ``host:pid``), so two hosts never send the same row at once; the rows of a
sender process of this host that died are sent again at once.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from config import ConfigError, Settings
from config.settings import DeliverySettings
from dicom_node import notify
from dicom_node.destinations import configured
from dicom_node.liveness import known_dead, worker_id
from dicom_node.scu import SendError, out_of_resources, send_paths, stored
from dicom_node.stow import stow_paths
from dicom_node.tls import client_context
from storage import Catalog, FileStore
from storage.models import OutboxState
from storage.outbox import claim_deliveries, hold_delivery, record_delivery
from storage.records import DeliveryInfo, DestinationInfo

LOGGER = logging.getLogger(__name__)
HOLD_RECHECK_S = 60.0
"""How often a held delivery (destination removed) is looked at again."""
CLAIM_LEASE_S = 600.0
"""How long claimed rows are hidden from other senders (longer than any one round)."""
SENDERS = ("cstore", "stow", "webhook")
"""Destination kinds this module sends to."""


def backoff(attempts: int, cap: float) -> float:
    """Seconds to wait after ``attempts`` failed attempts (doubling, at most ``cap``)."""
    return min(cap, 2.0 ** max(0, attempts))


def classify(status: int | None) -> OutboxState:
    """Map a C-STORE outcome to the outbox state it leads to."""
    if status is None or out_of_resources(status):
        return OutboxState.PENDING
    if stored(status):
        return OutboxState.SENT
    return OutboxState.DEAD


def _record_outcome(
    catalog: Catalog,
    item: DeliveryInfo,
    state: OutboxState,
    label: str,
    error: str | None,
    limits: DeliverySettings,
) -> OutboxState:
    """Record one delivery's answer; a retryable one waits its backoff (the state the
    catalog ends with: PENDING past the attempt bound becomes DEAD)."""
    retry = backoff(item.attempts, limits.max_backoff_s)
    return record_delivery(
        catalog,
        item.id,
        state,
        label,
        error,
        retry_in_s=retry if state is OutboxState.PENDING else None,
        max_attempts=limits.max_attempts,
    )


def _send_one_destination(
    settings: Settings,
    catalog: Catalog,
    store: FileStore,
    dest: DestinationInfo,
    items: list[DeliveryInfo],
) -> int:
    limits = settings.delivery
    paths = {store.root / item.file_path: item for item in items}
    statuses: Mapping[Path, int | None]
    errors: Mapping[Path, str]
    try:
        if dest.kind == "stow":
            config = configured(settings, dest.name)
            if config is None or config.kind != "stow":
                raise ConfigError(f"destination {dest.name} has no stow configuration")
            stowed = stow_paths(list(paths), config)
            statuses, errors = stowed.statuses, stowed.errors
        else:
            # ConfigError: a TLS file became unreadable after start-up; retried like a
            # refused association so the outputs wait for the fix (never plain TCP)
            ssl_context = client_context(settings.node.tls) if dest.tls else None
            summary = send_paths(
                list(paths),
                dest.ae_title,
                dest.host,
                dest.port,
                settings.node.ae_title,
                timeout=settings.node.dimse_timeout,
                ssl_context=ssl_context,
            )
            statuses, errors = summary.statuses, summary.errors
    except (SendError, ConfigError) as exc:
        label = "no association" if dest.kind == "cstore" else "no answer"
        label = getattr(exc, "label", label)
        for item in items:
            record_delivery(
                catalog,
                item.id,
                OutboxState.PENDING,
                label,
                str(exc),
                retry_in_s=backoff(item.attempts, limits.max_backoff_s),
                max_attempts=limits.max_attempts,
            )
        LOGGER.warning(
            "delivery failed destination=%s retry_in=%.0fs reason=%s",
            dest.name,
            backoff(items[0].attempts, limits.max_backoff_s),
            exc,
        )
        return 0
    delivered = 0
    for path, item in paths.items():
        status = statuses.get(path)
        state = classify(status)
        label = "no response" if status is None else f"0x{status:04X}"
        state = _record_outcome(catalog, item, state, label, errors.get(path), limits)
        if state is OutboxState.SENT:
            delivered += 1
        LOGGER.info(
            "delivery destination=%s output_id=%d kind=%s status=%s state=%s",
            dest.name,
            item.output_id,
            item.kind,
            label,
            state.value,
        )
    return delivered


def _post_webhook(
    settings: Settings,
    catalog: Catalog,
    store: FileStore,
    dest: DestinationInfo,
    items: list[DeliveryInfo],
) -> int:
    """POST each notification (:mod:`dicom_node.notify`), one request per row."""
    limits = settings.delivery
    config = configured(settings, dest.name)
    delivered = 0
    for item in items:
        retry = backoff(item.attempts, limits.max_backoff_s)
        try:
            if config is None or config.kind != "webhook":
                raise ConfigError(f"destination {dest.name} has no webhook configuration")
            body = (store.root / item.file_path).read_bytes()
            answer = notify.post(config, body, item.id)
        except (SendError, ConfigError, OSError) as exc:
            record_delivery(
                catalog,
                item.id,
                OutboxState.PENDING,
                "no answer",
                str(exc),
                retry_in_s=retry,
                max_attempts=limits.max_attempts,
            )
            LOGGER.warning(
                "notification failed destination=%s retry_in=%.0fs reason=%s",
                dest.name,
                retry,
                exc,
            )
            continue
        label = f"HTTP {answer.status}"
        if 200 <= answer.status < 300:
            state = OutboxState.SENT
        elif answer.retry:
            state = OutboxState.PENDING
        else:
            state = OutboxState.DEAD
        error = None if state is OutboxState.SENT else f"webhook answered {label}"
        state = _record_outcome(catalog, item, state, label, error, limits)
        if state is OutboxState.SENT:
            delivered += 1
        LOGGER.info(
            "notification destination=%s output_id=%d status=%s state=%s",
            dest.name,
            item.output_id,
            label,
            state.value,
        )
    return delivered


def deliver_due(settings: Settings, catalog: Catalog, store: FileStore) -> int:
    """Try every due outbox row once; one association per destination.

    Returns
    -------
    int
        How many rows were delivered.
    """
    by_dest: dict[int, list[DeliveryInfo]] = defaultdict(list)
    dests: dict[int, DestinationInfo] = {}
    for item in claim_deliveries(catalog, worker_id(), CLAIM_LEASE_S, is_dead=known_dead):
        by_dest[item.destination.id].append(item)
        dests[item.destination.id] = item.destination
    delivered = 0
    for dest_id, items in by_dest.items():
        dest = dests[dest_id]
        if not dest.active:
            why = (
                f"destination {dest.name} is no longer configured; held until it is "
                "configured again (cspine status lists these)"
            )
            for item in items:
                hold_delivery(catalog, item.id, why, HOLD_RECHECK_S)
            LOGGER.warning("deliveries held destination=%s count=%d", dest.name, len(items))
            continue
        if dest.kind not in SENDERS:
            for item in items:
                hold_delivery(catalog, item.id, f"no sender for kind {dest.kind!r}", HOLD_RECHECK_S)
            continue
        if dest.kind == "webhook":
            delivered += _post_webhook(settings, catalog, store, dest, items)
        else:
            delivered += _send_one_destination(settings, catalog, store, dest, items)
    return delivered
