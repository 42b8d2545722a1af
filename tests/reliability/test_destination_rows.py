"""Destinations as catalog rows: a destination keeps its deliveries by name, a removed
one holds them (never sent elsewhere or over another transport), and retries are
bounded, then dead-lettered, visible and revivable."""

from __future__ import annotations

import datetime as dt

from click.testing import CliRunner
from sqlalchemy import select, update

from dicom_node import destinations as destination_rows
from dicom_node.cli import main
from dicom_node.delivery import deliver_due
from dicom_node.reports import status_lines
from storage.jobs import resend_results, status_report
from storage.models import OutboxItem, OutboxState
from tests.dicom_node.pacs import LoopbackPACS
from tests.reliability.outbox import outbox_node, with_destinations

DOWN = 9  # a port nobody listens on (privileged, never bound by the tests)


def _rows(catalog) -> list[tuple[str, str, int, str | None]]:
    with catalog.read() as s:
        items = s.scalars(select(OutboxItem).order_by(OutboxItem.id))
        return [(i.destination.name, i.state.value, i.attempts, i.last_status) for i in items]


def _make_due(catalog) -> None:
    catalog.write(
        lambda s: s.execute(update(OutboxItem).values(next_attempt_at=dt.datetime(2000, 1, 1)))
    )


def _restart(node, tmp_path, dests, **sections):
    """What a restart of `cspine serve` with another configuration does."""
    settings = with_destinations(tmp_path, dests, **sections)
    destination_rows.sync(settings, node.catalog)
    return settings


def test_a_destination_that_keeps_its_name_keeps_its_deliveries_at_its_new_address(tmp_path):
    pacs = LoopbackPACS().start()
    try:
        node = outbox_node(
            tmp_path, [{"name": "archive", "ae_title": "PACS", "host": "127.0.0.1", "port": DOWN}]
        )
        assert deliver_due(node.settings, node.catalog, node.store) == 0  # nobody there
        assert [r[1:] for r in _rows(node.catalog)] == [("PENDING", 1, "no association")] * 3
        # the archive moved: same name, new port
        moved = {"name": "archive", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
        settings = _restart(node, tmp_path, [moved])
        _make_due(node.catalog)
        assert deliver_due(settings, node.catalog, node.store) == 3
        assert sorted(pacs.uids()) == sorted(node.sent)
        assert {r[0] for r in _rows(node.catalog)} == {"archive"}
    finally:
        pacs.stop()
        node.catalog.dispose()


def test_a_removed_destination_holds_its_deliveries_until_it_returns(tmp_path):
    pacs = LoopbackPACS().start()
    old = {"name": "old-pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
    try:
        pacs.statuses = [0xA700] * 3  # out of resources: every output stays PENDING
        node = outbox_node(tmp_path, [old])
        assert deliver_due(node.settings, node.catalog, node.store) == 0
        # renamed in the configuration: the same address under another name
        new = {**old, "name": "new-pacs"}
        settings = _restart(node, tmp_path, [new])
        _make_due(node.catalog)
        assert deliver_due(settings, node.catalog, node.store) == 0
        assert pacs.uids() == []  # nothing sent for the removed name
        rows = _rows(node.catalog)
        assert [r[:3] for r in rows] == [("old-pacs", "PENDING", 1)] * 3  # no attempt counted
        assert {r[3] for r in rows} == {"held"}
        lines = list(status_lines(status_report(node.catalog)))
        assert any("old-pacs" in line and "REMOVED" in line for line in lines)
        assert (
            sum("-> old-pacs: destination old-pacs is no longer configured" in x for x in lines)
            == 3
        )
        # back in the configuration: the held deliveries go
        settings = _restart(node, tmp_path, [old])
        _make_due(node.catalog)
        assert deliver_due(settings, node.catalog, node.store) == 3
        assert sorted(pacs.uids()) == sorted(node.sent)
    finally:
        pacs.stop()
        node.catalog.dispose()


def test_retries_are_bounded_then_dead_lettered_visible_and_revived_by_resend(tmp_path):
    down = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": DOWN}
    node = outbox_node(tmp_path, [down], delivery={"max_attempts": 2})
    try:
        assert deliver_due(node.settings, node.catalog, node.store) == 0
        _make_due(node.catalog)
        assert deliver_due(node.settings, node.catalog, node.store) == 0
        _make_due(node.catalog)
        assert deliver_due(node.settings, node.catalog, node.store) == 0  # nothing due: dead
        assert [r[1:3] for r in _rows(node.catalog)] == [("DEAD", 2)] * 3
        with node.catalog.read() as s:
            errors = {i.last_error for i in s.scalars(select(OutboxItem))}
        assert all(e.startswith("gave up after 2 attempts; last: ") for e in errors)
        lines = list(status_lines(status_report(node.catalog)))
        assert sum(" DEAD after 2 attempt(s)" in line for line in lines) == 3
        # the PACS is back: resend revives the dead letters with a fresh count
        pacs = LoopbackPACS().start()
        try:
            up = {**down, "port": pacs.port}
            settings = _restart(node, tmp_path, [up], delivery={"max_attempts": 2})
            assert resend_results(node.catalog, "1") == 3  # the only study
            assert [r[1:3] for r in _rows(node.catalog)] == [("PENDING", 0)] * 3
            assert deliver_due(settings, node.catalog, node.store) == 3
            assert sorted(pacs.uids()) == sorted(node.sent)
        finally:
            pacs.stop()
    finally:
        node.catalog.dispose()


def test_resend_to_an_unconfigured_destination_is_refused_with_the_reason(tmp_path):
    pacs = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": DOWN}
    node = outbox_node(tmp_path, [pacs])
    node.catalog.dispose()
    data = node.settings.storage.data_dir
    result = CliRunner().invoke(
        main, ["resend", "--data-dir", str(data), "1", "--to", "OTHER@10.9.9.9:104"]
    )
    assert result.exit_code == 2, result.output
    assert "'OTHER@10.9.9.9:104' is not an active destination (active: pacs)" in result.output
    ok = CliRunner().invoke(main, ["resend", "--data-dir", str(data), "1", "--to", "pacs"])
    assert ok.exit_code == 0, ok.output
    assert "queued 3 deliveries" in ok.output
    assert [r[1:3] for r in _rows(node.catalog)] == [(OutboxState.PENDING.value, 0)] * 3
