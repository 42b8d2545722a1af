"""The association count shared by the receiver processes of one ``cspine serve``."""

from __future__ import annotations

import pytest

from dicom_node.assoc_count import AssociationCount


def test_the_limit_holds_over_the_slots_and_a_restarted_process_starts_from_zero(tmp_path):
    path = AssociationCount.create(tmp_path / "associations", 2)
    first, second = AssociationCount(path, 0, 3), AssociationCount(path, 1, 3)
    try:
        assert first.try_acquire() and first.try_acquire() and second.try_acquire()
        assert not second.try_acquire() and not first.try_acquire()
        assert first.total() == 3
        first.release()
        assert second.try_acquire() and second.total() == 3
        # slot 1's process dies with its two associations; its replacement zeroes the slot
        second.close()
        second = AssociationCount(path, 1, 3)
        assert second.total() == 1
        # a process recounts its own slot from its live associations at each request
        assert first.try_acquire(here=0) and first.total() == 1
        first.release()
        first.release()  # never below zero
        assert first.total() == 0
    finally:
        first.close()
        second.close()


def test_a_slot_outside_the_file_is_refused(tmp_path):
    path = AssociationCount.create(tmp_path / "associations", 2)
    with pytest.raises(ValueError, match="no slot 2"):
        AssociationCount(path, 2, 3)
