"""A faulty destination PACS: retry what is transient, dead-letter what is permanent,
deliver everything once the destination recovers, never two contents for one UID.

dcmtk ``storescp`` supplies the network faults (``--refuse``, ``--reject``,
``--abort-during``, ``--abort-after``, ``--sleep-during``); it has no switch for a
failure status, so a pynetdicom SCP answers 0xA700, 0xA900 and 0xC000.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import select, update

from dicom_node.delivery import deliver_due
from storage.models import OutboxItem
from tests.dicom_node.pacs import LoopbackPACS
from tests.reliability.outbox import Storescp, content_key, outbox_node


def _states(catalog) -> list[tuple[str, int, str | None]]:
    with catalog.read() as s:
        rows = s.scalars(select(OutboxItem).order_by(OutboxItem.id))
        return [(r.state.value, r.attempts, r.last_status) for r in rows]


def _make_due(catalog) -> None:
    catalog.write(
        lambda s: s.execute(update(OutboxItem).values(next_attempt_at=dt.datetime(2000, 1, 1)))
    )


# (storescp switch, outbox status recorded for the failed attempt)
NETWORK_FAULTS = {
    "refuse": (("--refuse",), "no association"),
    "abort-during": (("--abort-during",), "no response"),
    "abort-after": (("--abort-after",), "no response"),
    "sleep-during": (("--sleep-during", "3"), "no response"),
}


@pytest.mark.parametrize("fault", sorted(NETWORK_FAULTS))
def test_network_fault_is_retried_then_delivered_once(tmp_path, fault):
    switches, label = NETWORK_FAULTS[fault]
    pacs = Storescp(tmp_path / "pacs")
    node = outbox_node(tmp_path, [pacs.destination], node={"dimse_timeout": 1})
    pacs.start(*switches)
    try:
        assert deliver_due(node.settings, node.catalog, node.store) == 0
        states = _states(node.catalog)
        # transient: every output stays PENDING with one attempt and a backoff
        assert [s[0] for s in states] == ["PENDING"] * 3
        assert states[0] == ("PENDING", 1, label)
        assert deliver_due(node.settings, node.catalog, node.store) == 0  # not due yet
    finally:
        pacs.stop()
    pacs.start()  # the destination recovers
    try:
        _make_due(node.catalog)
        assert deliver_due(node.settings, node.catalog, node.store) == 3
        _make_due(node.catalog)
        assert deliver_due(node.settings, node.catalog, node.store) == 0  # nothing left
        received = pacs.received()
    finally:
        pacs.stop()
        node.catalog.dispose()
    assert [s[0] for s in _states(node.catalog)] == ["SENT"] * 3
    # every output arrived; a UID that arrived twice (sleep-during) has one content
    assert set(received) == set(node.sent)
    assert all(keys == {node.sent[uid]} for uid, keys in received.items())


def test_reject_switch_accepts_a_peer_with_an_implementation_uid(tmp_path):
    """``storescp --reject`` only rejects peers without an Implementation Class UID.

    The node always sends one, so it is delivered at once: documented, not a fault.
    """
    pacs = Storescp(tmp_path / "pacs")
    node = outbox_node(tmp_path, [pacs.destination])
    pacs.start("--reject")
    try:
        assert deliver_due(node.settings, node.catalog, node.store) == 3
        received = pacs.received()
    finally:
        pacs.stop()
        node.catalog.dispose()
    assert set(received) == set(node.sent)


def test_failure_statuses_retry_a700_dead_letter_a900_c000(tmp_path):
    pacs = LoopbackPACS().start()
    dest = {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
    node = outbox_node(tmp_path, [dest])
    try:
        pacs.statuses = [0xA900, 0xC000, 0xA700]  # seg refused, sr failed, summary busy
        assert deliver_due(node.settings, node.catalog, node.store) == 0
        assert _states(node.catalog) == [
            ("DEAD", 1, "0xA900"),
            ("DEAD", 1, "0xC000"),
            ("PENDING", 1, "0xA700"),
        ]
        _make_due(node.catalog)
        assert deliver_due(node.settings, node.catalog, node.store) == 1  # only the A700 one
        _make_due(node.catalog)
        assert deliver_due(node.settings, node.catalog, node.store) == 0  # dead stay dead
    finally:
        pacs.stop()
        node.catalog.dispose()
    assert [s[0] for s in _states(node.catalog)] == ["DEAD", "DEAD", "SENT"]
    assert len(pacs.received) == 1 and pacs.uids()[0] in node.sent


class BlockingPACS(LoopbackPACS):
    """Records each dataset, then holds the first response until released."""

    def __init__(self) -> None:
        super().__init__()
        self.first = threading.Event()
        self.release = threading.Event()

    def _store(self, event):  # type: ignore[no-untyped-def]
        status = super()._store(event)
        if not self.first.is_set():
            self.first.set()
            self.release.wait(30)
        return status


def test_sigkill_during_sending_delivers_each_uid_with_one_content(tmp_path):
    pacs = BlockingPACS().start()
    dest = {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
    node = outbox_node(tmp_path, [dest])
    script = (
        "import json, sys\n"
        "from config import load_settings\n"
        "from dicom_node.delivery import deliver_due\n"
        "from dicom_node.receive import open_node_storage\n"
        "settings = load_settings(overrides=json.loads(sys.argv[1]), environ={})\n"
        "catalog, store = open_node_storage(settings)\n"
        "deliver_due(settings, catalog, store)\n"
    )
    sender = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(node.settings.model_dump(mode="json"))],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert pacs.first.wait(60), "the sender never reached the PACS"
        os.kill(sender.pid, signal.SIGKILL)  # killed mid-send, before any response
        assert sender.wait(10) == -9
    finally:
        pacs.release.set()
    try:
        # nothing was recorded as sent; the node process (restarted) sends again
        assert [s[0] for s in _states(node.catalog)] == ["PENDING"] * 3
        assert deliver_due(node.settings, node.catalog, node.store) == 3
        time.sleep(0.2)
    finally:
        pacs.stop()
        node.catalog.dispose()
    assert [s[0] for s in _states(node.catalog)] == ["SENT"] * 3
    by_uid: dict[str, set[str]] = {}
    for ds in pacs.received:
        by_uid.setdefault(str(ds.SOPInstanceUID), set()).add(content_key(ds))
    assert set(by_uid) == set(node.sent)
    # the output in flight at the kill arrived twice: same UID, same content
    assert all(keys == {node.sent[uid]} for uid, keys in by_uid.items())
    assert len(pacs.received) == 4
