"""Send outputs to a DICOMweb server by STOW-RS (``[[destinations]] kind = "stow"``).

The request goes through ``dicomweb-client`` with its own retries off: the outbox owns
the retries (:mod:`dicom_node.delivery`), so a STOW-RS destination is retried, bounded
and dead-lettered exactly like a C-STORE one. Credentials (a bearer token, or a user
name and password) and the HTTPS checks (``ca_file``, ``tls_verify``) come from the
configuration; the catalog row holds the URL only.

Outcomes per instance, mapped onto C-STORE statuses so :func:`delivery.classify`
judges both transports alike:

* the instance is in the response's Referenced SOP Sequence: ``0x0000`` (SENT);
* it is in the Failed SOP Sequence: its Failure Reason (``0xA7xx`` retried, others
  dead-lettered);
* no answer (refused connection, timeout, a certificate not trusted):
  :class:`SendError`, retried; HTTP 401, 403, 408, 425, 429 or 5xx: :class:`StowRetry`,
  retried;
* any other HTTP error (400, 404, 409, 413, 415 ...) with no per-instance answer:
  ``0xC000`` for each instance (dead-lettered: the server refused it for good).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from requests.adapters import HTTPAdapter

from config.settings import Destination
from dicom_node.scu import SendError

LOGGER = logging.getLogger(__name__)
REFUSED = 0xC000
"""The status given to each instance of a request the server refused as a whole."""
_TRANSIENT_HTTP = {401, 403, 408, 425, 429}
"""Answers retried besides 5xx: a refused credential may be fixed by the server's
operator (or by ours, with a restart); the waiting outputs then go."""


class StowRetry(SendError):
    """The server answered, but with an HTTP status worth retrying (``label``)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"STOW-RS answered HTTP {code}")
        self.label = f"HTTP {code}"


@dataclass
class StowSummary:
    """Per-file outcome of one STOW-RS request (statuses as C-STORE status codes)."""

    statuses: dict[Path, int] = field(default_factory=dict)
    errors: dict[Path, str] = field(default_factory=dict)


class _PinnedVerify(HTTPAdapter):
    """Checks certificates as configured, whatever the environment says.

    ``requests`` lets ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` override a session's
    ``verify``; the adapter sets it on each request instead, so ``ca_file`` and
    ``tls_verify`` always hold.
    """

    def __init__(self, verify: bool | str) -> None:
        super().__init__()
        self._verify = verify

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float | None, float | None] | None = None,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
        proxies: dict[str, str] | None = None,
    ) -> requests.Response:
        return super().send(request, stream, timeout, self._verify, cert, proxies)


def session_for(dest: Destination) -> requests.Session:
    """An HTTP session with the destination's credentials and certificate checks."""
    session = requests.Session()
    if dest.bearer_token is not None:
        session.headers["Authorization"] = f"Bearer {dest.bearer_token.get_secret_value()}"
    elif dest.username is not None and dest.password is not None:
        session.auth = (dest.username, dest.password.get_secret_value())
    if not dest.tls_verify:
        session.mount("https://", _PinnedVerify(False))
    elif dest.ca_file is not None:
        session.mount("https://", _PinnedVerify(str(dest.ca_file)))
    return session


def stow_paths(paths: list[Path], dest: Destination) -> StowSummary:
    """Store ``paths`` (DICOM files) at ``dest.url`` in one STOW-RS request per study.

    Raises
    ------
    SendError
        When the server did not answer, or answered 401, 403, 408, 425, 429 or 5xx.
    """
    by_study: dict[str, dict[str, tuple[Path, pydicom.Dataset]]] = {}
    for path in paths:
        ds = pydicom.dcmread(path)
        by_study.setdefault(str(ds.StudyInstanceUID), {})[str(ds.SOPInstanceUID)] = (path, ds)
    summary = StowSummary()
    with session_for(dest) as session:
        client = DICOMwebClient(str(dest.url), session=session, timeout=dest.timeout_s)
        client.set_http_retry_params(retry=False)
        for study_uid, items in by_study.items():
            _store_study(client, study_uid, items, summary)
    return summary


def _store_study(
    client: DICOMwebClient,
    study_uid: str,
    items: dict[str, tuple[Path, pydicom.Dataset]],
    summary: StowSummary,
) -> None:
    try:
        answer = client.store_instances([ds for _, ds in items.values()], study_uid)
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        if code in _TRANSIENT_HTTP or code >= 500:
            raise StowRetry(code) from exc
        for path, _ in items.values():
            summary.statuses[path] = REFUSED
            summary.errors[path] = f"STOW-RS answered HTTP {code}"
        return
    except requests.RequestException as exc:
        raise SendError(f"no STOW-RS answer: {type(exc).__name__}") from exc
    for item in answer.get("ReferencedSOPSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        if uid in items:
            summary.statuses[items[uid][0]] = 0x0000
    for item in answer.get("FailedSOPSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        if uid in items:
            reason = int(item.get("FailureReason", REFUSED))
            summary.statuses[items[uid][0]] = reason
            summary.errors[items[uid][0]] = f"STOW-RS failure reason 0x{reason:04X}"
