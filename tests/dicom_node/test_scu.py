"""The node as a C-STORE requestor: its reactor must never take a response."""

from __future__ import annotations

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # set at import

from dicom_node import scu
from tests.helpers import write_series


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
