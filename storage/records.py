"""Plain records the storage package hands out: no ORM object or session leaves it.

Every query of :mod:`storage` returns these frozen dataclasses, read inside the
session that loaded them; callers never hold a live ORM object, so nothing is lazily
loaded after its session closed and nothing outside ``storage`` depends on
SQLAlchemy.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from storage.models import (
    DestinationRow,
    Job,
    JobEvent,
    JobState,
    OutboxItem,
    OutboxState,
    Output,
    Refusal,
    Series,
    Study,
    StudyEvent,
    StudyState,
)


@dataclass(frozen=True)
class DestinationSpec:
    """A destination as the configuration names it (the input of ``sync_destinations``).

    ``name`` identifies it across restarts: change its host, port or transport under
    the same name and the waiting deliveries follow; give it another name (or drop it)
    and they are held for the old one.
    """

    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False
    outputs: tuple[str, ...] = ("seg", "sr", "summary")
    kind: str = "cstore"
    url: str | None = None


@dataclass(frozen=True)
class DestinationInfo:
    """One destination row."""

    id: int
    name: str
    kind: str
    ae_title: str
    host: str
    port: int
    tls: bool
    outputs: tuple[str, ...]
    active: bool
    url: str | None = None

    @property
    def address(self) -> str:
        """``AE@HOST:PORT`` (the URL of a STOW-RS or webhook destination)."""
        if self.kind != "cstore" and self.url:
            return self.url
        return f"{self.ae_title}@{self.host}:{self.port}"

    @classmethod
    def of(cls, row: DestinationRow) -> DestinationInfo:
        """The record of a row."""
        return cls(
            id=row.id,
            name=row.name,
            kind=row.kind,
            ae_title=row.ae_title,
            host=row.host,
            port=row.port,
            tls=bool(row.tls),
            outputs=tuple(x for x in row.outputs.split(",") if x),
            active=bool(row.active),
            url=row.url,
        )


@dataclass(frozen=True)
class DeliveryInfo:
    """One outbox row: one output for one destination."""

    id: int
    output_id: int
    kind: str
    file_path: str
    destination: DestinationInfo
    state: OutboxState
    attempts: int
    last_status: str | None
    last_error: str | None

    @classmethod
    def of(cls, item: OutboxItem) -> DeliveryInfo:
        """The record of a row (its output and destination loaded)."""
        return cls(
            id=item.id,
            output_id=item.output_id,
            kind=item.output.kind,
            file_path=item.output.file_path,
            destination=DestinationInfo.of(item.destination),
            state=item.state,
            attempts=item.attempts,
            last_status=item.last_status,
            last_error=item.last_error,
        )


@dataclass(frozen=True)
class OutputInfo:
    """A DICOM object the node produced, with its deliveries."""

    id: int
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    file_path: str
    sha256: str
    deliveries: tuple[DeliveryInfo, ...] = ()

    @classmethod
    def of(cls, out: Output, items: list[OutboxItem]) -> OutputInfo:
        """The record of an output row and its outbox rows."""
        return cls(
            id=out.id,
            kind=out.kind,
            sop_class_uid=out.sop_class_uid,
            sop_instance_uid=out.sop_instance_uid,
            series_instance_uid=out.series_instance_uid,
            file_path=out.file_path,
            sha256=out.sha256,
            deliveries=tuple(DeliveryInfo.of(i) for i in items),
        )


@dataclass(frozen=True)
class JobEventInfo:
    """A job state change."""

    at: dt.datetime
    state: JobState
    reason: str | None

    @classmethod
    def of(cls, ev: JobEvent) -> JobEventInfo:
        """The record of a row."""
        return cls(at=ev.at, state=ev.state, reason=ev.reason)


@dataclass(frozen=True)
class JobInfo:
    """One job; ``events`` and ``outputs`` are filled where the query says so."""

    id: int
    study_id: int
    version: int
    state: JobState
    reason: str | None
    attempts: int
    worker: str | None
    heartbeat_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    series_instance_uid: str | None
    selection_note: str | None
    result_json: str | None
    events: tuple[JobEventInfo, ...] = ()
    outputs: tuple[OutputInfo, ...] = ()

    @classmethod
    def of(
        cls,
        job: Job,
        *,
        events: list[JobEvent] | None = None,
        outputs: tuple[OutputInfo, ...] = (),
    ) -> JobInfo:
        """The record of a row."""
        return cls(
            id=job.id,
            study_id=job.study_id,
            version=job.version,
            state=job.state,
            reason=job.reason,
            attempts=job.attempts,
            worker=job.worker,
            heartbeat_at=job.heartbeat_at,
            created_at=job.created_at,
            updated_at=job.updated_at,
            series_instance_uid=job.series_instance_uid,
            selection_note=job.selection_note,
            result_json=job.result_json,
            events=tuple(JobEventInfo.of(e) for e in events or ()),
            outputs=outputs,
        )


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a study."""

    id: int
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    lossy: bool
    instance_count: int

    @classmethod
    def of(cls, se: Series) -> SeriesInfo:
        """The record of a row."""
        return cls(
            id=se.id,
            series_instance_uid=se.series_instance_uid,
            modality=se.modality,
            series_number=se.series_number,
            series_description=se.series_description,
            lossy=bool(se.lossy),
            instance_count=se.instance_count,
        )


@dataclass(frozen=True)
class StudyEventInfo:
    """One line of a study's audit trail."""

    at: dt.datetime
    kind: str
    detail: str | None


@dataclass(frozen=True)
class StudyInfo:
    """One study; ``series`` and ``events`` are filled where the query says so."""

    id: int
    study_instance_uid: str
    state: StudyState
    study_date: str | None
    study_description: str | None
    instance_count: int
    series_count: int
    flagged: bool
    flag_reason: str | None
    created_at: dt.datetime
    last_received_at: dt.datetime
    series: tuple[SeriesInfo, ...] = ()
    events: tuple[StudyEventInfo, ...] = ()

    @property
    def key(self) -> str:
        """Names this catalog row for ever: the UID and the row's creation time (a study
        purged and received again gets another key)."""
        return f"{self.study_instance_uid}/{self.created_at.isoformat()}"

    @classmethod
    def of(
        cls,
        study: Study,
        *,
        series: list[Series] | None = None,
        events: list[StudyEvent] | None = None,
        series_count: int | None = None,
    ) -> StudyInfo:
        """The record of a row."""
        return cls(
            id=study.id,
            study_instance_uid=study.study_instance_uid,
            state=study.state,
            study_date=study.study_date,
            study_description=study.study_description,
            instance_count=study.instance_count,
            series_count=len(series) if series is not None else (series_count or 0),
            flagged=bool(study.flagged),
            flag_reason=study.flag_reason,
            created_at=study.created_at,
            last_received_at=study.last_received_at,
            series=tuple(SeriesInfo.of(s) for s in series or ()),
            events=tuple(StudyEventInfo(e.at, e.kind, e.detail) for e in events or ()),
        )


@dataclass(frozen=True)
class InstanceFile:
    """Where one stored instance lies (relative to the store root)."""

    sop_instance_uid: str
    file_path: str


@dataclass(frozen=True)
class SeriesFiles:
    """The stored files of one series, in the order they were received."""

    series_instance_uid: str
    series_number: int | None
    files: tuple[InstanceFile, ...]


@dataclass(frozen=True)
class StudyFiles:
    """A study and the stored files of each of its series (what a job reads)."""

    study: StudyInfo
    series: tuple[SeriesFiles, ...]


@dataclass(frozen=True)
class RefusalInfo:
    """One refusal on receipt."""

    refused_at: dt.datetime
    calling_ae: str | None
    status: int
    reason: str

    @classmethod
    def of(cls, ref: Refusal) -> RefusalInfo:
        """The record of a row."""
        return cls(ref.refused_at, ref.calling_ae, ref.status, ref.reason)


@dataclass(frozen=True)
class StatusReport:
    """What ``cspine status`` shows: queue, workers, outbox, recent failures."""

    job_counts: dict[JobState, int]
    running: tuple[JobInfo, ...]
    outbox_counts: dict[OutboxState, int]
    failed_jobs: tuple[JobInfo, ...]
    dead_deliveries: tuple[DeliveryInfo, ...]
    held_deliveries: tuple[DeliveryInfo, ...]
    refusals: tuple[RefusalInfo, ...]
    destinations: tuple[DestinationInfo, ...] = field(default=())
