"""Delivery from several hosts sharing one outbox (SQLite, and a real PostgreSQL): each
output reaches the PACS once, and a sender that died leaves its rows due again."""

from __future__ import annotations

import datetime as dt
import threading

from sqlalchemy import select

from dicom_node.delivery import CLAIM_LEASE_S, deliver_due
from storage import Catalog
from storage.models import OutboxItem, OutboxState, utcnow
from storage.outbox import claim_deliveries, due_deliveries
from tests.dicom_node.pacs import LoopbackPACS
from tests.reliability.outbox import outbox_node


def test_four_hosts_delivering_at_once_send_each_output_once(tmp_path, database_url):
    pacs = LoopbackPACS().start()
    try:
        dest = {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}
        node = outbox_node(tmp_path, [dest], storage={"database_url": database_url})
        hosts = [node.catalog] + [Catalog(database_url) for _ in range(3)]
        start = threading.Barrier(len(hosts))
        delivered: list[int] = []

        def sender(catalog: Catalog) -> None:
            start.wait()
            delivered.append(deliver_due(node.settings, catalog, node.store))

        threads = [threading.Thread(target=sender, args=(c,)) for c in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(delivered) == 3
        assert sorted(pacs.uids()) == sorted(node.sent)  # each output once
        with node.catalog.read() as s:
            items = list(s.scalars(select(OutboxItem)))
        assert [(i.state, i.attempts) for i in items] == [(OutboxState.SENT, 1)] * 3
        for catalog in hosts:
            catalog.dispose()
    finally:
        pacs.stop()


def test_claimed_rows_are_hidden_from_other_senders_until_the_lease_ends(tmp_path, database_url):
    node = outbox_node(
        tmp_path,
        [{"ae_title": "NOBODY", "host": "127.0.0.1", "port": 9}],
        storage={"database_url": database_url},
    )
    other = Catalog(database_url)
    first = claim_deliveries(node.catalog, "hostA:1", CLAIM_LEASE_S)
    assert len(first) == 3
    # another host: nothing due (it cannot tell whether hostA:1 runs)
    assert claim_deliveries(other, "hostB:2", CLAIM_LEASE_S) == []
    assert due_deliveries(other) == []
    # the first sender died without recording an outcome: after the lease, due again
    later = utcnow() + dt.timedelta(seconds=CLAIM_LEASE_S + 1)
    again = claim_deliveries(other, "hostB:2", CLAIM_LEASE_S, now=later)
    assert sorted(i.id for i in again) == sorted(i.id for i in first)
    # ... or at once, for a sender known to be dead (a process of this host that is gone)
    dead = claim_deliveries(
        node.catalog, "hostA:3", CLAIM_LEASE_S, is_dead=lambda who: who == "hostB:2"
    )
    assert sorted(i.id for i in dead) == sorted(i.id for i in first)
    with node.catalog.read() as s:
        assert set(s.scalars(select(OutboxItem.claimed_by))) == {"hostA:3"}
    other.dispose()
    node.catalog.dispose()


def test_receivers_starting_at_once_make_one_destination_row_per_name(tmp_path, database_url):
    from storage.models import DestinationRow
    from storage.outbox import sync_destinations
    from storage.records import DestinationSpec

    specs = [
        DestinationSpec(
            name=f"PACS{i}",
            kind="cstore",
            ae_title=f"PACS{i}",
            host="10.0.0.5",
            port=104 + i,
            tls=False,
            outputs=("seg", "sr", "summary"),
        )
        for i in range(5)
    ]
    hosts = [Catalog(database_url) for _ in range(4)]
    start = threading.Barrier(len(hosts))
    errors: list[BaseException] = []

    def serve(catalog: Catalog) -> None:
        start.wait()
        try:
            sync_destinations(catalog, specs)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(c,)) for c in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with hosts[0].read() as s:
        names = sorted(s.scalars(select(DestinationRow.name)))
    assert names == [f"PACS{i}" for i in range(5)]
    for catalog in hosts:
        catalog.dispose()
