"""Destinations as rows; the outbox refers to them by id.

Every ``AE@HOST:PORT`` string of the old outbox becomes a destination row named by
that string, **inactive** and without TLS: what transport it had lived only in the
configuration. When the receiver next starts, :func:`storage.outbox.sync_destinations`
re-activates each row whose name a configured destination still has (a destination
without a ``name`` is named ``AE@HOST:PORT``) and gives it that entry's transport; the
rows of destinations no longer configured stay inactive, and their pending deliveries
are held and shown by ``cspine status``, never sent over plain TCP by default.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _split(spec: str) -> tuple[str, str, int]:
    ae, _, rest = spec.partition("@")
    host, _, port = rest.rpartition(":")
    return ae[:16], host, int(port) if port.isdigit() else 0


def upgrade() -> None:
    destinations = op.create_table(
        "destinations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("ae_title", sa.String(16), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("tls", sa.Boolean, nullable=False),
        sa.Column("outputs", sa.String(128), nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    bind = op.get_bind()
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    names = [row[0] for row in bind.execute(sa.text("SELECT DISTINCT destination FROM outbox"))]
    rows = []
    for name in sorted(names):
        ae, host, port = _split(name)
        rows.append(
            {
                "name": name,
                "kind": "cstore",
                "ae_title": ae,
                "host": host,
                "port": port,
                "tls": False,
                "outputs": "seg,sr,summary",
                "active": False,
                "created_at": now,
                "updated_at": now,
            }
        )
    if rows:
        op.bulk_insert(destinations, rows)

    op.create_table(
        "outbox_new",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("output_id", sa.Integer, sa.ForeignKey("outputs.id"), nullable=False),
        sa.Column("destination_id", sa.Integer, sa.ForeignKey("destinations.id"), nullable=False),
        sa.Column("state", sa.String(7), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.DateTime, nullable=False),
        sa.Column("last_status", sa.String(32)),
        sa.Column("last_error", sa.Text),
        sa.Column("sent_at", sa.DateTime),
        sa.Column("wait_seconds", sa.Float),
        sa.UniqueConstraint("output_id", "destination_id", name="uq_outbox_output_destination"),
    )
    op.execute(
        "INSERT INTO outbox_new (id, output_id, destination_id, state, attempts, "
        "next_attempt_at, last_status, last_error, sent_at, wait_seconds) "
        "SELECT o.id, o.output_id, d.id, o.state, o.attempts, o.next_attempt_at, "
        "o.last_status, o.last_error, o.sent_at, o.wait_seconds "
        "FROM outbox o JOIN destinations d ON d.name = o.destination"
    )
    op.drop_index("ix_outbox_output_id", "outbox")
    op.drop_index("ix_outbox_state", "outbox")
    op.drop_table("outbox")
    op.rename_table("outbox_new", "outbox")
    op.create_index("ix_outbox_output_id", "outbox", ["output_id"])
    op.create_index("ix_outbox_state", "outbox", ["state"])
    op.create_index("ix_outbox_destination_id", "outbox", ["destination_id"])
    if bind.dialect.name == "postgresql":
        # the rows kept their ids: move the id sequence past them
        op.execute(
            "SELECT setval(pg_get_serial_sequence('outbox', 'id'), "
            "COALESCE((SELECT MAX(id) FROM outbox), 0) + 1, false)"
        )
