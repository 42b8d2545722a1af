"""The connection count shared by the receiver processes of one ``cspine serve``."""

from __future__ import annotations

import pytest

from dicom_node.assoc_count import AssociationCount


def test_the_limit_holds_over_the_slots_and_a_restarted_process_starts_from_zero(tmp_path):
    path = AssociationCount.create(tmp_path / "associations", 2)
    first, second = AssociationCount(path, 0, 3), AssociationCount(path, 1, 3)
    try:
        first.opened()
        first.opened()
        second.opened()
        assert not second.over_limit() and first.total() == 3
        second.opened()  # a fourth connection: its request is refused
        assert second.over_limit() and first.over_limit()
        second.closed()
        first.closed()
        assert not first.over_limit() and second.total() == 2
        # slot 1's process dies with its connection; its replacement zeroes the slot
        second.close()
        second = AssociationCount(path, 1, 3)
        assert second.total() == 1
        # a process recounts its own slot from its live connections at each request
        assert not first.over_limit(here=0) and first.total() == 0
        first.closed()  # never below zero
        assert first.total() == 0
    finally:
        first.close()
        second.close()


def test_a_slot_outside_the_file_is_refused(tmp_path):
    path = AssociationCount.create(tmp_path / "associations", 2)
    with pytest.raises(ValueError, match="no slot 2"):
        AssociationCount(path, 2, 3)
