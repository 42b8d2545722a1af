"""Storage errors."""

from __future__ import annotations

from config.errors import NodeError


class StorageError(NodeError):
    """Base class of storage errors."""


class CatalogBusyError(StorageError):
    """The catalog stayed locked by another writer for longer than allowed (transient)."""


class OutOfSpaceError(StorageError):
    """Free space on the store is below the configured threshold (transient)."""


class NotFoundError(StorageError):
    """A catalog object named on the command line does not exist."""


class LeaseLostError(StorageError):
    """A worker's claim on a job ended (re-queued after its heartbeat went stale, and
    perhaps claimed by another worker): its result is not recorded."""
