"""Catalog (SQLAlchemy 2.0; SQLite, or PostgreSQL for scale-out) and file store of cspine-node.

Never imports pynetdicom or torch.
"""

from storage.catalog import (
    IngestOutcome,
    IngestResult,
    InstanceHeader,
    PlacedInstance,
    ingest,
    ingest_placed,
    reconcile,
    stored_paths,
)
from storage.db import Catalog
from storage.errors import (
    CatalogBusyError,
    NotFoundError,
    OutOfSpaceError,
    RecordRaceError,
    StorageError,
)
from storage.filestore import FileStore

__all__ = [
    "Catalog",
    "CatalogBusyError",
    "FileStore",
    "IngestOutcome",
    "IngestResult",
    "InstanceHeader",
    "NotFoundError",
    "OutOfSpaceError",
    "PlacedInstance",
    "RecordRaceError",
    "StorageError",
    "ingest",
    "ingest_placed",
    "reconcile",
    "stored_paths",
]
