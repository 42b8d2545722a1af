"""``cspine serve``: open storage, repair after a crash, serve, and supervise the worker."""

from __future__ import annotations

import logging

from config import Settings, check_bind_safety
from dicom_node.receive import Receiver, open_node_storage
from dicom_node.scp import StorageNode
from storage import reconcile

LOGGER = logging.getLogger(__name__)


def run_service(settings: Settings, *, config_file: str | None = None) -> None:
    """Run the node until interrupted.

    Start-up order: refuse an unsafe bind, open the catalog and store, sweep orphans
    left by a crash, then listen.
    """
    check_bind_safety(settings)
    catalog, store = open_node_storage(settings)
    repaired = reconcile(catalog, store)
    LOGGER.info("store ready tmp_swept=%d orphans_removed=%d", repaired["tmp"], repaired["orphans"])
    receiver = Receiver(settings, catalog, store)
    node = StorageNode(settings, receiver)
    try:
        node.start(block=True)
    finally:
        node.stop()
        catalog.dispose()
