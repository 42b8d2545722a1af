"""Alembic environment of the catalog: runs on the connection the node hands it.

:func:`storage.migrate.upgrade` puts an open connection in
``config.attributes["connection"]``; the ``alembic`` command line is not needed (and
not configured) to migrate a catalog.
"""

from __future__ import annotations

from alembic import context

from storage.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite cannot ALTER most constraints in place
)
with context.begin_transaction():
    context.run_migrations()
