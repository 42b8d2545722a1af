"""Destination URLs: the DICOMweb base URL of a STOW-RS destination, the URL of a webhook.

``destinations.url`` is null for C-STORE destinations (existing rows). Credentials
(bearer tokens, passwords, webhook secrets) stay in the configuration, never in the
catalog.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("destinations", sa.Column("url", sa.String(1024), nullable=True))
