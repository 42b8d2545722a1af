"""Typed SQLAlchemy 2.0 models of the catalog.

The catalog keeps no patient identifiers: PatientName, PatientID, BirthDate and
AccessionNumber stay in the stored files. The admin CLI identifies a study by its
catalog id and Study Instance UID.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    """Aware UTC now (stored as naive UTC by SQLite)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    """Declarative base of every catalog table."""


class StudyState(enum.StrEnum):
    """Lifecycle of a study on the node."""

    RECEIVING = "RECEIVING"
    COMPLETE = "COMPLETE"


class JobState(enum.StrEnum):
    """Lifecycle of a processing job."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    NOT_PROCESSED = "NOT_PROCESSED"
    SUPERSEDED = "SUPERSEDED"


class OutboxState(enum.StrEnum):
    """Delivery state of one output to one destination."""

    PENDING = "PENDING"
    SENT = "SENT"
    DEAD = "DEAD"


class Study(Base):
    """One study, keyed by Study Instance UID, however many associations brought it."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    state: Mapped[StudyState] = mapped_column(Enum(StudyState, native_enum=False), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    received_count: Mapped[int] = mapped_column(Integer, default=0)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    flag_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    completion_count: Mapped[int] = mapped_column(Integer, default=0)

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")
    events: Mapped[list[StudyEvent]] = relationship(
        back_populates="study", order_by="StudyEvent.id"
    )

    def __repr__(self) -> str:
        return f"Study(id={self.id}, state={self.state})"


class Series(Base):
    """One series of a study."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    lossy: Mapped[bool] = mapped_column(Boolean, default=False)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(
        back_populates="series", order_by="Instance.id"
    )

    def __repr__(self) -> str:
        return f"Series(id={self.id}, instances={self.instance_count})"


class Instance(Base):
    """One stored instance; its file path comes from its content hash."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    file_path: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")

    def __repr__(self) -> str:
        return f"Instance(id={self.id})"


class QuarantinedInstance(Base):
    """A newcomer that reused a stored SOP Instance UID with different content."""

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    file_path: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Refusal(Base):
    """An instance refused on receipt (nothing of it is kept): who sent it and why.

    ``sop_instance_uid`` is recorded only when it is a valid UID; a hostile value
    never reaches the catalog.
    """

    __tablename__ = "refusals"

    id: Mapped[int] = mapped_column(primary_key=True)
    refused_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)


class StudyEvent(Base):
    """Audit trail of a study: what happened, when, and why."""

    __tablename__ = "study_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)

    study: Mapped[Study] = relationship(back_populates="events")


class Job(Base):
    """One processing run of a completed study; each re-completion gets a new version."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("study_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[JobState] = mapped_column(Enum(JobState, native_enum=False), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    selection_note: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(64))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    result_json: Mapped[str | None] = mapped_column(Text)

    events: Mapped[list[JobEvent]] = relationship(order_by="JobEvent.id")
    outputs: Mapped[list[Output]] = relationship(order_by="Output.id")


class JobEvent(Base):
    """A job state change with its time and reason."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    state: Mapped[JobState] = mapped_column(Enum(JobState, native_enum=False))
    reason: Mapped[str | None] = mapped_column(Text)


class Output(Base):
    """A DICOM object the node produced for a job."""

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    file_path: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))


class DestinationRow(Base):
    """A place the node sends its results to, with its transport.

    Rows are made from the ``[[destinations]]`` of the receiver's settings when it
    starts (:func:`storage.outbox.sync_destinations`) and never deleted: a destination
    removed from the configuration keeps its row, marked inactive, so the deliveries
    that still wait for it stay visible and are refused rather than sent elsewhere or
    over another transport.
    """

    __tablename__ = "destinations"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16), default="cstore")
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    outputs: Mapped[str] = mapped_column(String(128), default="seg,sr,summary")
    url: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class OutboxItem(Base):
    """One output to deliver to one destination, with its attempts."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("output_id", "destination_id", name="uq_outbox_output_destination"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id"), index=True)
    destination_id: Mapped[int] = mapped_column(ForeignKey("destinations.id"), index=True)
    state: Mapped[OutboxState] = mapped_column(Enum(OutboxState, native_enum=False), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_status: Mapped[str | None] = mapped_column(String(32))
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    wait_seconds: Mapped[float | None] = mapped_column(Float)
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    """The sender (``host:pid``) sending the row now; ``None`` once an outcome is recorded."""

    output: Mapped[Output] = relationship()
    destination: Mapped[DestinationRow] = relationship()
