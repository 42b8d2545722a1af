"""Baseline: the catalog as every release before destination rows created it.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "refusals",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("refused_at", sa.DateTime, nullable=False),
        sa.Column("calling_ae", sa.String(16)),
        sa.Column("sop_instance_uid", sa.String(64)),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.create_index("ix_refusals_refused_at", "refusals", ["refused_at"])
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("state", sa.String(9), nullable=False),
        sa.Column("study_date", sa.String(8)),
        sa.Column("study_description", sa.String(64)),
        sa.Column("received_count", sa.Integer, nullable=False),
        sa.Column("instance_count", sa.Integer, nullable=False),
        sa.Column("flagged", sa.Boolean, nullable=False),
        sa.Column("flag_reason", sa.Text),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("last_received_at", sa.DateTime, nullable=False),
        sa.Column("completed_at", sa.DateTime),
        sa.Column("completion_count", sa.Integer, nullable=False),
    )
    op.create_index("ix_studies_state", "studies", ["state"])
    op.create_index("ix_studies_study_instance_uid", "studies", ["study_instance_uid"], unique=True)
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.String(13), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("series_instance_uid", sa.String(64)),
        sa.Column("selection_note", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("worker", sa.String(64)),
        sa.Column("heartbeat_at", sa.DateTime),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("result_json", sa.Text),
        sa.UniqueConstraint("study_id", "version"),
    )
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index("ix_jobs_study_id", "jobs", ["study_id"])
    op.create_table(
        "quarantine",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("file_path", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("calling_ae", sa.String(16)),
        sa.Column("received_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_quarantine_study_id", "quarantine", ["study_id"])
    op.create_index("ix_quarantine_sop_instance_uid", "quarantine", ["sop_instance_uid"])
    op.create_table(
        "series",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16)),
        sa.Column("series_number", sa.Integer),
        sa.Column("series_description", sa.String(64)),
        sa.Column("lossy", sa.Boolean, nullable=False),
        sa.Column("instance_count", sa.Integer, nullable=False),
    )
    op.create_index("ix_series_series_instance_uid", "series", ["series_instance_uid"], unique=True)
    op.create_index("ix_series_study_id", "series", ["study_id"])
    op.create_table(
        "study_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text),
    )
    op.create_index("ix_study_events_study_id", "study_events", ["study_id"])
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("series_id", sa.Integer, sa.ForeignKey("series.id"), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("instance_number", sa.Integer),
        sa.Column("file_path", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("calling_ae", sa.String(16)),
        sa.Column("received_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_instances_series_id", "instances", ["series_id"])
    op.create_index("ix_instances_sop_instance_uid", "instances", ["sop_instance_uid"], unique=True)
    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("state", sa.String(13), nullable=False),
        sa.Column("reason", sa.Text),
    )
    op.create_index("ix_job_events_job_id", "job_events", ["job_id"])
    op.create_table(
        "outputs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("file_path", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
    )
    op.create_index("ix_outputs_job_id", "outputs", ["job_id"])
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("output_id", sa.Integer, sa.ForeignKey("outputs.id"), nullable=False),
        sa.Column("destination", sa.String(128), nullable=False),
        sa.Column("state", sa.String(7), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.DateTime, nullable=False),
        sa.Column("last_status", sa.String(32)),
        sa.Column("last_error", sa.Text),
        sa.Column("sent_at", sa.DateTime),
        sa.Column("wait_seconds", sa.Float),
        sa.UniqueConstraint("output_id", "destination"),
    )
    op.create_index("ix_outbox_output_id", "outbox", ["output_id"])
    op.create_index("ix_outbox_state", "outbox", ["state"])
