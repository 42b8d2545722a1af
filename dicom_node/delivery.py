"""Deliver outputs from the persistent outbox by C-STORE, retrying what is transient.

* success (0x0000) or a warning status (0xBxxx, 0x0001, 0x0107, 0x0116): SENT;
* association refused, rejected or aborted, no response, 0xA7xx: retried with
  exponential backoff (1 s, 2 s, 4 s ... capped at ``MAX_BACKOFF_S``);
* 0xA9xx, 0xCxxx and any other failure status: DEAD (dead-lettered, visible in
  ``cspine status``), never retried automatically.

Re-sends use the same files, hence the same SOP Instance UIDs and bytes. A
destination configured with ``tls = true`` is reached over DICOM TLS with the node's
certificate (``node.tls``); a TLS failure counts as a failed association (retried).
"""

from __future__ import annotations

import logging
from collections import defaultdict

from config import ConfigError, Settings, parse_ae_spec
from dicom_node.scu import SendError, out_of_resources, send_paths, stored
from dicom_node.tls import destination_context
from storage import Catalog, FileStore
from storage.jobs import due_deliveries, record_delivery
from storage.models import OutboxState

LOGGER = logging.getLogger(__name__)
MAX_BACKOFF_S = 300.0


def backoff(attempts: int) -> float:
    """Seconds to wait after ``attempts`` failed attempts."""
    return min(MAX_BACKOFF_S, 2.0 ** max(0, attempts))


def classify(status: int | None) -> OutboxState:
    """Map a C-STORE outcome to the outbox state it leads to."""
    if status is None or out_of_resources(status):
        return OutboxState.PENDING
    if stored(status):
        return OutboxState.SENT
    return OutboxState.DEAD


def deliver_due(settings: Settings, catalog: Catalog, store: FileStore) -> int:
    """Try every due outbox row once; one association per destination.

    Returns
    -------
    int
        How many rows were delivered.
    """
    by_dest = defaultdict(list)
    for item in due_deliveries(catalog):
        by_dest[item.destination].append(item)
    delivered = 0
    for dest, items in by_dest.items():
        ae, host, port = parse_ae_spec(dest)
        paths = {store.root / item.output.file_path: item for item in items}
        try:
            # ConfigError: a TLS file became unreadable after start-up; retried like a
            # refused association so the outputs wait for the fix
            ssl_context = destination_context(settings, ae, host, port)
            summary = send_paths(
                list(paths),
                ae,
                host,
                port,
                settings.node.ae_title,
                timeout=settings.node.dimse_timeout,
                ssl_context=ssl_context,
            )
        except (SendError, ConfigError) as exc:
            for item in items:
                wait = backoff(item.attempts)
                record_delivery(
                    catalog,
                    item.id,
                    OutboxState.PENDING,
                    "no association",
                    str(exc),
                    retry_in_s=wait,
                )
            LOGGER.warning(
                "delivery failed destination=%s retry_in=%.0fs reason=%s",
                dest,
                backoff(items[0].attempts),
                exc,
            )
            continue
        for path, item in paths.items():
            status = summary.statuses.get(path)
            state = classify(status)
            label = "no response" if status is None else f"0x{status:04X}"
            if state is OutboxState.PENDING:
                record_delivery(
                    catalog,
                    item.id,
                    state,
                    label,
                    summary.errors.get(path),
                    retry_in_s=backoff(item.attempts),
                )
            else:
                record_delivery(catalog, item.id, state, label, summary.errors.get(path))
            if state is OutboxState.SENT:
                delivered += 1
            LOGGER.info(
                "delivery destination=%s output_id=%d kind=%s status=%s state=%s",
                dest,
                item.output_id,
                item.output.kind,
                label,
                state.value,
            )
    return delivered
