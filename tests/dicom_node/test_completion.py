"""Study completion with an injected clock: no sleeps."""

from __future__ import annotations

import time

from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.completion import CompletionChecker
from dicom_node.receive import Receiver, open_node_storage
from storage.models import Study, StudyState
from tests.dicom_node.conftest import FakeClock, make_settings
from tests.helpers import write_series


def _setup(tmp_path, stable=10.0):
    settings = make_settings(tmp_path, completion={"stable_seconds": stable})
    catalog, store = open_node_storage(settings)
    receiver = Receiver(settings, catalog, store)
    clock = FakeClock()
    completed: list[int] = []
    checker = CompletionChecker(catalog, stable, clock, completed.append)
    return receiver, checker, clock, completed


def _state(receiver) -> StudyState:
    with receiver.catalog.read() as s:
        return s.scalars(select(Study)).one().state


def test_study_completes_after_quiet_window_only(tmp_path):
    receiver, checker, clock, completed = _setup(tmp_path)
    study_uid = generate_uid()
    paths = write_series(tmp_path / "a", 3, study_uid=study_uid)
    for p in paths[:2]:
        assert receiver.accept(p, consume=False).status == 0
    checker.tick()
    clock.advance(9.9)
    assert checker.tick() == []
    assert receiver.accept(paths[2], consume=False).status == 0  # new arrival resets the window
    clock.advance(5)
    assert checker.tick() == []
    clock.advance(9.9)
    assert checker.tick() == []
    assert _state(receiver) is StudyState.RECEIVING
    clock.advance(0.2)
    done = checker.tick()
    assert len(done) == 1 and completed == done
    assert _state(receiver) is StudyState.COMPLETE


def test_late_series_reopens_and_recompletes(tmp_path):
    receiver, checker, clock, completed = _setup(tmp_path)
    study_uid = generate_uid()
    for p in write_series(tmp_path / "a", 2, study_uid=study_uid):
        receiver.accept(p, consume=False)
    checker.tick()
    clock.advance(11)
    assert len(checker.tick()) == 1
    for p in write_series(tmp_path / "late", 2, study_uid=study_uid):
        assert receiver.accept(p, consume=False).status == 0
    assert _state(receiver) is StudyState.RECEIVING
    checker.tick()
    clock.advance(5)
    assert checker.tick() == []
    clock.advance(6)
    assert len(checker.tick()) == 1
    with receiver.catalog.read() as s:
        study = s.scalars(select(Study)).one()
        kinds = [e.kind for e in study.events]
    assert study.completion_count == 2 and len(completed) == 2
    assert kinds == ["created", "complete", "job-queued", "reopened", "complete", "job-queued"]


def test_wall_clock_jumps_do_not_complete_early_or_block(tmp_path, monkeypatch):
    receiver, checker, clock, _ = _setup(tmp_path)
    for p in write_series(tmp_path / "a", 2):
        receiver.accept(p, consume=False)
    checker.tick()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # wall clock jumps forward 1 h
    clock.advance(1)
    assert checker.tick() == []
    monkeypatch.setattr(time, "time", lambda: real() - 3600)  # and back 1 h
    clock.advance(9.5)
    assert len(checker.tick()) == 1


def test_restart_starts_a_fresh_window(tmp_path):
    receiver, checker, clock, _ = _setup(tmp_path)
    for p in write_series(tmp_path / "a", 2):
        receiver.accept(p, consume=False)
    checker.tick()
    clock.advance(8)
    fresh = CompletionChecker(receiver.catalog, 10.0, clock)  # a restarted process
    assert fresh.tick() == []
    clock.advance(9)
    assert fresh.tick() == []
    clock.advance(2)
    assert len(fresh.tick()) == 1
