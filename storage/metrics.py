"""Read-only aggregates of the catalog for the node's metrics and status page.

One read transaction gives one consistent :class:`CatalogMetrics`: counts per state,
the age of the oldest waiting delivery, refusals per DIMSE status, and the result
records of finished jobs (stage timings, model identities). The catalog is shared by
every process of the node (receivers, worker), so a scrape sees all of them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import func, select

from storage.db import Catalog
from storage.models import (
    Instance,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    Output,
    Refusal,
    Study,
    StudyState,
)

FINISHED_STATES = (JobState.DONE, JobState.NOT_PROCESSED)
"""Job states whose result record holds stage timings and model identities."""


@dataclass(frozen=True)
class CatalogMetrics:
    """What the catalog holds now, counted in one read transaction.

    Attributes
    ----------
    instances
        Stored instances.
    studies
        Studies per state (reception still open, or complete).
    studies_processed
        Studies with at least one finished job (DONE or NOT_PROCESSED).
    jobs
        Jobs per state.
    outbox
        Deliveries per state (PENDING is the outbox depth, DEAD the dead letters).
    oldest_pending_since
        When the job behind the oldest PENDING delivery finished (UTC), or ``None``.
    refusals
        Refusals on receipt per DIMSE status, over the refusals the catalog keeps (the
        newest ``storage.catalog.REFUSALS_KEPT``).
    results
        ``result_json`` of finished jobs, newest first (at most ``results_limit``).
    """

    instances: int
    studies: dict[StudyState, int]
    studies_processed: int
    jobs: dict[JobState, int]
    outbox: dict[OutboxState, int]
    oldest_pending_since: dt.datetime | None
    refusals: dict[int, int]
    results: tuple[str, ...]


def catalog_metrics(catalog: Catalog, results_limit: int = 1000) -> CatalogMetrics:
    """Count the catalog for the metrics endpoint and the status page.

    Parameters
    ----------
    catalog
        The node's catalog.
    results_limit
        How many result records of finished jobs to return (newest first).

    Returns
    -------
    CatalogMetrics
        The counts, read in one transaction.
    """
    if results_limit < 0:
        raise ValueError(f'Argument "results_limit" must be >= 0, got {results_limit}.')
    with catalog.read() as session:
        instances = int(session.scalar(select(func.count(Instance.id))) or 0)
        studies = session.execute(
            select(Study.state, func.count(Study.id)).group_by(Study.state)
        ).all()
        processed = session.scalar(
            select(func.count(func.distinct(Job.study_id))).where(Job.state.in_(FINISHED_STATES))
        )
        jobs = session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)).all()
        outbox = session.execute(
            select(OutboxItem.state, func.count(OutboxItem.id)).group_by(OutboxItem.state)
        ).all()
        oldest = session.scalar(
            select(func.min(Job.updated_at))
            .select_from(OutboxItem)
            .join(Output, OutboxItem.output_id == Output.id)
            .join(Job, Output.job_id == Job.id)
            .where(OutboxItem.state == OutboxState.PENDING)
        )
        refusals = session.execute(
            select(Refusal.status, func.count(Refusal.id)).group_by(Refusal.status)
        ).all()
        results = session.scalars(
            select(Job.result_json)
            .where(Job.state.in_(FINISHED_STATES), Job.result_json.is_not(None))
            .order_by(Job.id.desc())
            .limit(results_limit)
        ).all()
    return CatalogMetrics(
        instances=instances,
        studies={StudyState(s): int(n) for s, n in studies},
        studies_processed=int(processed or 0),
        jobs={JobState(s): int(n) for s, n in jobs},
        outbox={OutboxState(s): int(n) for s, n in outbox},
        oldest_pending_since=oldest,
        refusals={int(s): int(n) for s, n in refusals},
        results=tuple(r for r in results if r),
    )


__all__ = ["FINISHED_STATES", "CatalogMetrics", "catalog_metrics"]
