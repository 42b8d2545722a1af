"""Many senders at once: 16 concurrent associations, each sending one CT series.

Nothing is lost, the server's memory (RSS) stays bounded, and the node answers a
C-ECHO from another peer throughout. ``make test`` runs 16 x 10 small slices;
``make reliability`` sets ``CSPINE_RELIABILITY_FULL=1`` for 16 x 200 slices of 512x512.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select

from config import load_settings
from dicom_node.receive import open_node_storage
from storage.models import Instance
from tests.conftest import free_port
from tests.dicom_node.proc import Server, echo_ok
from tests.dicom_node.scu_tools import serves_no_requests
from tests.helpers import CT, ct_slice

FULL = os.environ.get("CSPINE_RELIABILITY_FULL") == "1"
SENDERS = 16
SLICES, SIZE, RSS_LIMIT_MB = (200, 512, 400) if FULL else (10, 64, 150)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _sender(port: int, index: int, barrier: threading.Barrier, out: dict) -> None:
    ae = AE(ae_title=f"SENDER{index:02d}")
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = serves_no_requests(ae.associate("127.0.0.1", port, ae_title="CSPINE"))
    out[index] = statuses = []
    try:
        barrier.wait(60)  # every association is established before anyone sends
    except threading.BrokenBarrierError:
        statuses.append("barrier broken")
    if not assoc.is_established:
        statuses.append("not established")
        return
    study, series = generate_uid(), generate_uid()
    try:
        for i in range(SLICES):
            ds = ct_slice(study, series, i, rows=SIZE, cols=SIZE, seed=index)
            rsp = assoc.send_c_store(ds)
            statuses.append(int(rsp.Status) if "Status" in rsp else None)
    finally:
        if assoc.is_established:
            assoc.release()


def test_sixteen_concurrent_senders_lose_nothing_and_echo_is_answered(tmp_path):
    data_dir = tmp_path / "var"
    port = free_port()
    server = Server(
        data_dir,
        port,
        "--no-worker",
        "--stable-seconds",
        "600",
        env={"CSPINE_NODE__MAX_ASSOCIATIONS": str(SENDERS + 4)},
    ).start()
    assert server.proc is not None
    try:
        baseline = _rss_mb(server.proc.pid)
        barrier = threading.Barrier(SENDERS)
        results: dict[int, list] = {}
        threads = [
            threading.Thread(target=_sender, args=(port, i, barrier, results))
            for i in range(SENDERS)
        ]
        peak, echoes = baseline, []
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, _rss_mb(server.proc.pid))
            echoes.append(_echo(port))  # another peer, during the load
            time.sleep(0.1)
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        assert echo_ok(port)
    finally:
        server.stop()
    settings = load_settings(overrides={"storage": {"data_dir": str(data_dir)}}, environ={})
    catalog, _store = open_node_storage(settings)
    with catalog.read() as s:
        stored = s.scalar(select(func.count(Instance.id)))
    catalog.dispose()
    print(
        f"\n{SENDERS} associations x {SLICES} slices {SIZE}x{SIZE}: {elapsed:.1f} s, "
        f"RSS {baseline:.0f} -> peak {peak:.0f} MB, {len(echoes)} echoes during load"
    )
    assert sorted(results) == list(range(SENDERS))
    assert all(v == [0] * SLICES for v in results.values()), results
    assert stored == SENDERS * SLICES  # nothing lost
    assert echoes and all(echoes)  # the node kept answering another peer
    assert peak - baseline < RSS_LIMIT_MB
    assert "Traceback" not in server.log()


def _echo(port: int) -> bool:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="CSPINE")
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().get("Status") == 0
    assoc.release()
    return ok
