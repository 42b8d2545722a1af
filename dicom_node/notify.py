"""Notifications of findings: a signed JSON body posted to ``kind = "webhook"``
destinations through the outbox.

When a job ends DONE with a patient-level probability at or above the threshold
(``notifications.threshold``, default ``models.fracture_threshold``), or ends
NOT_PROCESSED and ``notifications.on_not_processed`` is set, the complete stage stores
the body (:func:`body_for`) as an output of kind ``notification``; the outbox queues it
to every webhook destination, and :func:`post` sends it.

Signature: ``X-Cspine-Signature: sha256=<hex>``, the HMAC-SHA256 with the destination's
``secret`` over ``<timestamp>.<body>`` (the body's bytes as sent), ``<timestamp>`` being
the ``X-Cspine-Timestamp`` header (Unix seconds of this attempt). A receiver recomputes
it, compares in constant time, and refuses old timestamps. The body never holds a
patient identifier unless ``notifications.include_identifiers`` is set.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests

from config import Settings
from config.settings import Destination
from dicom_node.result import JobResult
from dicom_node.scu import SendError

SCHEMA = "cspine.notification/1"
"""The ``schema`` of the body; a change that breaks a receiver changes its number."""
TIMESTAMP_HEADER = "X-Cspine-Timestamp"
SIGNATURE_HEADER = "X-Cspine-Signature"
DELIVERY_HEADER = "X-Cspine-Delivery"
_RETRIED_HTTP = {401, 403, 408, 425, 429}
"""Answers retried (with the backoff) besides 5xx: a refused signature or credential
may be fixed by the receiver's operator; other 4xx answers are final."""


def enabled(settings: Settings) -> bool:
    """Whether any webhook destination is configured."""
    return any(d.kind == "webhook" for d in settings.destinations)


def verdict_of(settings: Settings, record: JobResult) -> str | None:
    """``"POSITIVE"``, ``"NOT_PROCESSED"`` or ``None`` (nothing to notify)."""
    if record.outcome == "not_processed":
        return "NOT_PROCESSED" if settings.notifications.on_not_processed else None
    if record.outcome != "done" or record.patient_probability is None:
        return None
    threshold = settings.notifications.threshold
    if threshold is None:
        threshold = settings.models.fracture_threshold
    return "POSITIVE" if record.patient_probability >= threshold else None


def body_for(
    settings: Settings,
    job_id: int,
    study_id: int,
    record: JobResult,
    identifiers: Mapping[str, str] | None = None,
) -> bytes | None:
    """The notification body of a job's result, or ``None`` when none is due.

    ``identifiers`` (Study Instance UID, Accession Number, Patient ID) go into the body
    only when ``notifications.include_identifiers`` is set.
    """
    verdict = verdict_of(settings, record)
    if verdict is None or not enabled(settings):
        return None
    threshold = settings.notifications.threshold
    body: dict[str, Any] = {
        "schema": SCHEMA,
        "job_id": job_id,
        "study_id": study_id,
        "verdict": verdict,
        "patient_probability": record.patient_probability,
        "threshold": settings.models.fracture_threshold if threshold is None else threshold,
        "vertebrae": [
            {
                "label": v.label,
                "assessed": v.assessed,
                "probability": v.probability,
                "reason_code": v.reason_code,
            }
            for v in record.vertebrae
        ],
        "models": [
            {"name": m.name, "version": m.version, "sha256": m.sha256} for m in record.models
        ],
    }
    if verdict == "NOT_PROCESSED":
        body["reason"] = record.reason
    if settings.notifications.include_identifiers and identifiers:
        body["identifiers"] = dict(identifiers)
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 with ``secret`` over ``<timestamp>.<body>``."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


@dataclass(frozen=True)
class PostResult:
    """What a webhook answered: its HTTP status, and whether to try again later."""

    status: int
    retry: bool


def post(dest: Destination, body: bytes, delivery_id: int) -> PostResult:
    """POST ``body`` to the webhook ``dest``, signed, in one attempt.

    Raises
    ------
    SendError
        When the receiver did not answer (refused connection, timeout).
    """
    assert dest.secret is not None and dest.url is not None
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: signature(dest.secret.get_secret_value().encode(), timestamp, body),
        DELIVERY_HEADER: str(delivery_id),
    }
    verify: bool | str = str(dest.ca_file) if dest.ca_file else dest.tls_verify
    try:
        rsp = requests.post(
            dest.url, data=body, headers=headers, timeout=dest.timeout_s, verify=verify
        )
    except requests.RequestException as exc:
        raise SendError(f"no webhook answer: {type(exc).__name__}") from exc
    code = rsp.status_code
    return PostResult(code, code >= 500 or code in _RETRIED_HTTP)
