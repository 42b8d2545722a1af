"""The node as a C-STORE requestor: its reactor must never take a response."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # set at import

from dicom_node import scu
from tests.helpers import CT, write_series


def test_the_reactor_polls_get_nothing_the_waiting_caller_gets_the_message(node):
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = scu.serve_no_requests(ae.associate("127.0.0.1", node.port, ae_title="CSPINE"))
    try:
        assert assoc.is_established
        message = (1, object())
        assoc.dimse.msg_queue.put(message)
        assert assoc.dimse.get_msg(block=False) == (None, None)  # what the reactor calls
        assert assoc.dimse.get_msg(block=True) == message  # what send_c_store calls
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()


def test_send_paths_guards_its_association(node, tmp_path, monkeypatch):
    guarded: list[Association] = []
    guard = scu.serve_no_requests

    def spy(assoc):
        guarded.append(assoc)
        return guard(assoc)

    monkeypatch.setattr(scu, "serve_no_requests", spy)
    paths = write_series(tmp_path / "in", 3)
    summary = scu.send_paths(paths, "CSPINE", "127.0.0.1", node.port)
    assert summary.sent == 3 and summary.failed == 0
    assert len(guarded) == 1
    assert guarded[0].dimse.get_msg.__name__ == "only_waiting_callers"
    assert guarded[0].release.__name__ == "release_unless_lost"


@pytest.fixture
def hangs_up():
    """A Storage SCP that closes the connection on every C-STORE request, unanswered (as
    a PACS does when its process dies mid-request)."""

    def hang_up(event: evt.Event) -> int:
        event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        return 0xC000  # never reaches the requestor

    ae = AE(ae_title="HANGSUP")
    ae.add_supported_context(CT, ExplicitVRLittleEndian)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, hang_up)]
    )
    assert server is not None
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def _reactor_late(assoc: Association, hold: threading.Event) -> Association:
    """Stall the requestor's reactor thread once an abort indication is queued, before
    it acts on it: the moment a caller may return from a request that got no answer
    while the reactor has not yet marked the association aborted."""
    is_release_requested = assoc.acse.is_release_requested

    def late() -> bool:
        if assoc.acse.is_aborted():
            hold.wait(30)
        return is_release_requested()

    assoc.acse.is_release_requested = late  # type: ignore[method-assign]
    return assoc


def _within(seconds: float, call: Callable[[], object]) -> None:
    done = threading.Event()

    def run() -> None:
        call()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(seconds), f"still waiting after {seconds} s"


def test_a_request_left_unanswered_is_aborted_not_released(hangs_up, tmp_path):
    path = write_series(tmp_path / "in", 1)[0]
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    hold = threading.Event()
    assoc = scu.serve_no_requests(ae.associate("127.0.0.1", hangs_up, ae_title="HANGSUP"))
    _reactor_late(assoc, hold)
    try:
        assert assoc.is_established
        assert "Status" not in assoc.send_c_store(path)  # the connection closed unanswered
        assert scu.association_lost(assoc)
        # pynetdicom's own release() would wait here for a reactor that has not caught up
        # (and, with its pause flag left set by the request, for an A-RELEASE-RP until the
        # ACSE timeout): the guarded one aborts at once
        _within(5, assoc.release)
        assert assoc.is_aborted and not assoc.is_released and not assoc.is_established
    finally:
        hold.set()


def test_send_paths_stops_at_the_first_request_left_unanswered(hangs_up, tmp_path, monkeypatch):
    hold = threading.Event()
    guard = scu.serve_no_requests
    monkeypatch.setattr(scu, "serve_no_requests", lambda a: _reactor_late(guard(a), hold))
    paths = write_series(tmp_path / "in", 3)
    result: list[scu.SendSummary] = []
    try:
        _within(
            5,
            lambda: result.append(
                scu.send_paths(paths, "HANGSUP", "127.0.0.1", hangs_up, "TESTSCU", timeout=20)
            ),
        )
    finally:
        hold.set()
    summary = result[0]
    assert list(summary.statuses.values()) == [None, None, None]
    assert [summary.errors[p] for p in paths[1:]] == ["association lost"] * 2
