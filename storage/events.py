"""The audit trail of a study, written by every part of the catalog that changes one.

Its own module so that :mod:`storage.catalog` (ingest, completion) and
:mod:`storage.jobs` (jobs, deliveries) both write it without importing each other.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from storage.models import StudyEvent


def add_event(session: Session, study_id: int, kind: str, detail: str | None = None) -> None:
    """Append one line to a study's audit trail (inside the caller's transaction)."""
    session.add(StudyEvent(study_id=study_id, kind=kind, detail=detail))
