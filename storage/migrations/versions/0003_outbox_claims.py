"""Outbox claims: which sender holds a row while it sends it.

``claimed_by`` names the sender (``host:pid``) that claimed a due row; the row's next
attempt is moved a lease ahead at the same time. An outcome recorded clears it. A row
still claimed by a sender known to be dead is due again at once (a restarted node
re-sends what was in flight); one claimed by a sender of another host waits for the
lease to end. Existing rows are unclaimed.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("claimed_by", sa.String(64), nullable=True))
