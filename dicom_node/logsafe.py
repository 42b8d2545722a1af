"""Keep patient identifiers out of every log line.

The node never formats datasets into log messages; it logs catalog ids, AE titles,
peer addresses and short UID hashes. This module is the safety net:

* pynetdicom's identifier logging is switched off;
* a filter on the root handlers redacts any line that carries a patient-module
  element dump (``(0010,xxxx)``, ``PatientName``, ``PatientID``, ``PatientBirthDate``,
  ``AccessionNumber``).
"""

from __future__ import annotations

import hashlib
import logging
import re

_PHI_LINE = re.compile(
    r"\(0010,\s*[0-9A-Fa-f]{4}\)|\(0008,\s*0050\)|PatientName|PatientID|PatientBirthDate"
    r"|AccessionNumber|Patient's Name|Patient ID|Patient's Birth Date|Accession Number",
)
REDACTED = "[line redacted: it carried patient identifiers]"


class PHIFilter(logging.Filter):
    """Redact records whose rendered message carries patient identifiers."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a broken format string must not break logging
            return True
        if _PHI_LINE.search(text):
            record.msg, record.args = REDACTED, None
        return True


def install_log_safety() -> None:
    """Switch off pynetdicom identifier logging and add :class:`PHIFilter` to root handlers."""
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, PHIFilter) for f in handler.filters):
            handler.addFilter(PHIFilter())


def short_uid(uid: str) -> str:
    """Return a 10-character hash of a UID, for DEBUG logs."""
    return hashlib.sha256(uid.encode()).hexdigest()[:10]
