"""Storage errors."""

from __future__ import annotations

from config.errors import NodeError


class StorageError(NodeError):
    """Base class of storage errors."""


class CatalogBusyError(StorageError):
    """The catalog stayed locked by another writer for longer than allowed (transient)."""


class RecordRaceError(StorageError):
    """A batch lost a unique-constraint race to a writer elsewhere (another host
    inserted one of its instances, studies or series first): nothing of it was
    recorded; record its items one by one, which see the winner's rows."""


class OutOfSpaceError(StorageError):
    """Free space on the store is below the configured threshold (transient)."""


class NotFoundError(StorageError):
    """A catalog object named on the command line does not exist."""


class LeaseLostError(StorageError):
    """A worker's claim on a job ended (re-queued after its heartbeat went stale, and
    perhaps claimed by another worker): its result is not recorded."""
