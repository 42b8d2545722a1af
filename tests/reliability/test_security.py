"""Security of the node over real loopback connections (issue #7, part A).

DICOM TLS (pynetdicom and dcmtk peers, the node's own delivery), the peer
allow-list and its A-ASSOCIATE-RJ reasons, the association limit (2, 3, 2), user
identity over TLS, slow-drip and silent peers, declared PDU lengths of 0xFFFFFFFF,
instance-size caps during receipt, stored-file safety and model loading.

Certificates are made per test module with the ``openssl`` command-line tool
(``tests/pki.py``).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import Verification
from sqlalchemy import select, update

from config import ConfigError, load_settings
from config.settings import TLSSettings, hash_password
from dicom_node import destinations as destination_rows
from dicom_node.delivery import deliver_due
from dicom_node.reports import status_lines
from dicom_node.scp import handle_user_id
from dicom_node.tls import client_context, server_context
from storage.jobs import status_report
from storage.models import Instance, OutboxItem, OutboxState
from tests.conftest import ROOT, free_port
from tests.dicom_node.scu_tools import store_file
from tests.helpers import CT, ct_slice, write_series
from tests.pki import make_pki
from tests.reliability.outbox import outbox_node, with_destinations

# ---------------------------------------------------------------------------
# a throwaway PKI (tests/pki.py)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """site-ca signs node, pacs and scanner; rogue-ca signs an untrusted client."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls(pki: Path, cert: str = "node", **extra) -> dict:
    return {
        "certificate": str(pki / f"{cert}.crt"),
        "private_key": str(pki / f"{cert}.key"),
        "ca_bundle": str(pki / "site-ca.crt"),
        **extra,
    }


def _client_ctx(pki: Path, cert: str | None = "scanner", ca: str = "site-ca") -> ssl.SSLContext:
    if cert is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(pki / f"{ca}.crt")
        return ctx
    return client_context(TLSSettings(**_tls(pki, cert, ca_bundle=str(pki / f"{ca}.crt"))))


def _tls_node(start_node, pki: Path, **node):
    return start_node(node={"tls": _tls(pki, enabled=True), **node})


# ---------------------------------------------------------------------------
# helpers


def _associate(port: int, *, calling="TESTSCU", called="CSPINE", tls=None, identity=None):
    """Associate (CT + Verification); return (association, A-ASSOCIATE-RJ triple or None)."""
    rejection: list[tuple[int, int, int]] = []

    def on_acse(event):
        p = event.primitive
        if getattr(p, "result", None) in (1, 2) and getattr(p, "result_source", None):
            rejection.append((int(p.result), int(p.result_source), int(p.diagnostic)))

    ae = AE(ae_title=calling)
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title=called,
        tls_args=(tls, "127.0.0.1") if tls is not None else None,
        ext_neg=[identity] if identity is not None else None,
        evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)],
    )
    return assoc, (rejection[0] if rejection else None)


def _echo_ok(port: int, **kw) -> bool:
    assoc, _ = _associate(port, **kw)
    if not assoc.is_established:
        return False
    try:
        return assoc.send_c_echo().Status == 0
    finally:
        assoc.release()


def _instances(running) -> list[Instance]:
    with running.receiver.catalog.read() as s:
        return list(s.scalars(select(Instance)))


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _closed_after(sock: socket.socket, limit: float, drip: bytes | None = None) -> float | None:
    """Seconds until the peer closes ``sock`` (None if still open after ``limit``)."""
    t0 = time.monotonic()
    sock.settimeout(0.25)
    while time.monotonic() - t0 < limit:
        try:
            if drip:
                sock.sendall(drip)
            if sock.recv(4096) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - t0
    return None


def _running(running) -> int:
    return len(running.node._server.active_associations)


# ---------------------------------------------------------------------------
# DICOM TLS


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_tls_store_over_tls12_and_tls13(start_node, pki, tmp_path, version):
    running = _tls_node(start_node, pki)
    ctx = _client_ctx(pki)
    ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
    assoc, rj = _associate(running.port, tls=ctx)
    assert assoc.is_established and rj is None
    sock = assoc.dul.socket.socket
    assert isinstance(sock, ssl.SSLSocket)
    assert sock.version() == version.replace("_", ".")
    assert sock.cipher()[0] in {
        "TLS_AES_256_GCM_SHA384",
        "TLS_AES_128_GCM_SHA256",
        "TLS_CHACHA20_POLY1305_SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    }
    (path,) = write_series(tmp_path / "in", 1)
    assert assoc.send_c_store(path).Status == 0
    assoc.release()
    (row,) = _instances(running)
    assert row.sop_instance_uid == pydicom.dcmread(path).SOPInstanceUID
    assert (running.store_root / row.file_path).is_file()


def test_tls_refuses_missing_or_untrusted_client_certificate(start_node, pki, tmp_path):
    running = _tls_node(start_node, pki)
    (path,) = write_series(tmp_path / "in", 1)
    for ctx in (_client_ctx(pki, cert=None), _client_ctx(pki, cert="intruder")):
        assoc, _ = _associate(running.port, tls=ctx)
        if assoc.is_established:  # TLS 1.3: the alert may come after the client's Finished
            assert "Status" not in assoc.send_c_store(path)
        assert not assoc.is_established
    assert _instances(running) == []
    assert _echo_ok(running.port, tls=_client_ctx(pki))  # a trusted client still gets in


def test_tls_client_certificate_optional_when_not_required(start_node, pki):
    running = start_node(node={"tls": _tls(pki, enabled=True, require_client_certificate=False)})
    assert _echo_ok(running.port, tls=_client_ctx(pki, cert=None))
    assoc, _ = _associate(running.port, tls=_client_ctx(pki, cert="intruder"))
    assert not assoc.is_established  # a presented certificate must still be trusted


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_tls_refuses_protocols_below_tls12(start_node, pki, version):
    running = _tls_node(start_node, pki)
    ctx = _client_ctx(pki)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client really offer the old protocol
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
    with (
        socket.create_connection(("127.0.0.1", running.port), timeout=5) as raw,
        pytest.raises(ssl.SSLError) as info,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.do_handshake()
    # the server answered with a protocol_version alert (not a client-side refusal)
    assert info.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"
    assert _echo_ok(running.port, tls=_client_ctx(pki))


def test_plain_tcp_to_tls_port_fails_and_idle_tcp_blocks_nobody(start_node, pki):
    running = _tls_node(start_node, pki, acse_timeout=5, network_timeout=5)
    assoc, _ = _associate(running.port)  # plain DICOM to the TLS port
    assert not assoc.is_established
    # a TCP peer that never starts the handshake must not stall the listener
    with socket.create_connection(("127.0.0.1", running.port)):
        t0 = time.monotonic()
        assert _echo_ok(running.port, tls=_client_ctx(pki))
        assert time.monotonic() - t0 < 3


def test_dcmtk_storescu_over_tls(start_node, pki, tmp_path):
    running = _tls_node(start_node, pki)
    paths = write_series(tmp_path / "in", 2)
    run = subprocess.run(
        [
            "storescu", "-aec", "CSPINE", "+tls", str(pki / "scanner.key"),
            str(pki / "scanner.crt"), "+cf", str(pki / "site-ca.crt"),
            "127.0.0.1", str(running.port), *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert len(_instances(running)) == 2
    # without a client certificate dcmtk is refused too
    anon = subprocess.run(
        [
            "storescu", "-aec", "CSPINE", "+tla", "+cf", str(pki / "site-ca.crt"),
            "127.0.0.1", str(running.port), str(paths[0]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert anon.returncode != 0


def test_delivery_to_a_tls_destination(tmp_path, pki):
    received: list[tuple[str, str]] = []

    def on_store(event):
        sock = event.assoc.dul.socket.socket
        received.append((str(event.request.AffectedSOPInstanceUID), describe_tls(sock)))
        return 0x0000

    pacs_ae = AE(ae_title="TLSPACS")
    pacs_ae.add_supported_context(CT, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    pacs_tls = TLSSettings(**_tls(pki, "pacs"))
    server = pacs_ae.start_server(
        ("127.0.0.1", port),
        block=False,
        ssl_context=server_context(pacs_tls),
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    try:
        dest = {"ae_title": "TLSPACS", "host": "127.0.0.1", "port": port, "tls": True}
        box = outbox_node(tmp_path, [dest], node={"tls": _tls(pki, "node")})
        assert deliver_due(box.settings, box.catalog, box.store) == 3
        assert {uid for uid, _ in received} == set(box.sent)
        assert all(transport.startswith("TLSv1.3") for _, transport in received)
    finally:
        server.shutdown()
    # the same destination without TLS on its side: the association fails, rows wait
    plain_port = free_port()
    plain = pacs_ae.start_server(
        ("127.0.0.1", plain_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        dest = {"ae_title": "TLSPACS", "host": "127.0.0.1", "port": plain_port, "tls": True}
        box = outbox_node(tmp_path / "b", [dest], node={"tls": _tls(pki, "node")})
        assert deliver_due(box.settings, box.catalog, box.store) == 0
        with box.catalog.read() as s:
            states = {item.state for item in s.scalars(select(OutboxItem))}
        assert states == {OutboxState.PENDING}
    finally:
        plain.shutdown()
        box.catalog.dispose()


def test_deliveries_queued_for_tls_are_never_sent_in_plain_tcp_after_a_rename(tmp_path, pki):
    """The transport belongs to the destination row, not to whatever entry of the
    configuration now has the same address: rows queued for a TLS destination that
    was renamed (same AE, host and port, ``tls = false`` under another name) are held."""
    received: list[str] = []

    def on_store(event):
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    pacs_ae = AE(ae_title="PACS")
    pacs_ae.add_supported_context(CT, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    plain = pacs_ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    node_tls = {"tls": _tls(pki, "node")}
    try:
        addr = {"ae_title": "PACS", "host": "127.0.0.1", "port": port}
        box = outbox_node(tmp_path, [{**addr, "name": "secure", "tls": True}], node=node_tls)
        assert deliver_due(box.settings, box.catalog, box.store) == 0  # TLS to a plain peer
        settings = with_destinations(tmp_path, [{**addr, "name": "insecure"}], node=node_tls)
        destination_rows.sync(settings, box.catalog)
        with box.catalog.read() as s:
            for item in s.scalars(select(OutboxItem)):
                assert item.destination.name == "secure" and item.destination.tls
        box.catalog.write(
            lambda s: s.execute(update(OutboxItem).values(next_attempt_at=dt.datetime(2000, 1, 1)))
        )
        assert deliver_due(settings, box.catalog, box.store) == 0
        assert received == []  # never downgraded to plain TCP
        with box.catalog.read() as s:
            states = {(i.state, i.last_status) for i in s.scalars(select(OutboxItem))}
        assert states == {(OutboxState.PENDING, "held")}
        lines = list(status_lines(status_report(box.catalog)))
        assert any(f"secure (PACS@127.0.0.1:{port}, TLS" in line for line in lines)
    finally:
        plain.shutdown()
        box.catalog.dispose()


def test_delivery_to_dcmtk_storescp_over_tls(tmp_path, pki):
    """A third-party TLS PACS (dcmtk storescp, BCP 195 profile) that requires our certificate."""
    port, out = free_port(), tmp_path / "pacs"
    out.mkdir()
    pacs = subprocess.Popen(
        [
            "storescp", "-aet", "TLSPACS", "+tls", str(pki / "pacs.key"), str(pki / "pacs.crt"),
            "+cf", str(pki / "site-ca.crt"), "-rc", "-od", str(out), str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert _wait(lambda: _port_open(port), 10), "storescp did not start"
        dest = {"ae_title": "TLSPACS", "host": "127.0.0.1", "port": port, "tls": True}
        box = outbox_node(tmp_path, [dest], node={"tls": _tls(pki, "node")})
        assert deliver_due(box.settings, box.catalog, box.store) == 3
        box.catalog.dispose()
        stored = {str(pydicom.dcmread(p).SOPInstanceUID) for p in out.iterdir()}
        assert stored == set(box.sent)
    finally:
        pacs.terminate()
        pacs.wait(10)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def describe_tls(sock) -> str:
    return sock.version() if isinstance(sock, ssl.SSLSocket) else "plain"


def test_tls_settings_are_validated_at_load(tmp_path, pki):
    with pytest.raises(ConfigError, match=r"certificate.*private_key.*ca_bundle"):
        load_settings(overrides={"node": {"tls": {"enabled": True}}}, environ={})
    missing = _tls(pki, ca_bundle=str(tmp_path / "nope.pem"), enabled=True)
    with pytest.raises(ConfigError, match=r"ca_bundle \(.*nope\.pem\)"):
        load_settings(overrides={"node": {"tls": missing}}, environ={})
    dest = {"ae_title": "PACS", "host": "10.0.0.5", "port": 104, "tls": True}
    with pytest.raises(
        ConfigError, match=re.escape("destination PACS@10.0.0.5:104 has tls = true")
    ):
        load_settings(overrides={"destinations": [dest]}, environ={})
    ok = load_settings(overrides={"node": {"tls": _tls(pki, enabled=True)}}, environ={})
    assert ok.node.tls.enabled
    # a key that does not belong to the certificate is refused when the context is built
    wrong = TLSSettings(**_tls(pki, private_key=str(pki / "pacs.key")))
    with pytest.raises(ConfigError, match=re.escape("cannot load node.tls.certificate")):
        server_context(wrong)


def test_tls_contexts_follow_bcp195():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    from dicom_node.tls import BCP195_CIPHERS

    ctx.set_ciphers(BCP195_CIPHERS)
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    for c in tls12:
        assert c["kea"] == "kx-ecdhe", c["name"]
        assert c["aead"], c["name"]  # no CBC, no SHA-1 MAC


# ---------------------------------------------------------------------------
# allow-list and association limit


def test_reject_reasons_calling_called_and_network(start_node):
    running = start_node(
        node={
            "peers": [
                {"ae_title": "GOODSCU", "host": "127.0.0.0/8"},
                {"ae_title": "FARSCU", "host": "10.0.0.0/8"},
            ]
        }
    )
    assoc, rj = _associate(running.port, calling="EVILSCU")
    assert assoc.is_rejected and rj == (1, 1, 3)  # calling AE not recognised
    assoc, rj = _associate(running.port, calling="FARSCU")
    assert assoc.is_rejected and rj == (1, 1, 3)  # known AE, wrong network
    assoc, rj = _associate(running.port, calling="GOODSCU", called="NOTME")
    assert assoc.is_rejected and rj == (1, 1, 7)  # called AE not recognised
    assert _echo_ok(running.port, calling="GOODSCU")


def test_too_many_associations_rejected_transient(start_node):
    running = start_node(node={"max_associations": 2, "acse_timeout": 1, "network_timeout": 5})
    held = [_associate(running.port)[0] for _ in range(2)]
    assert all(a.is_established for a in held)
    assoc, rj = _associate(running.port)
    assert assoc.is_rejected and rj == (2, 3, 2)  # rejected-transient, provider, local limit
    for a in held:
        a.release()
    assert _wait(lambda: _running(running) == 0, 5)
    assert _echo_ok(running.port)
    # idle TCP connections that never send A-ASSOCIATE-RQ count too, until acse_timeout
    idle = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(2)]
    assert _wait(lambda: _running(running) == 2, 5)
    _, rj = _associate(running.port)
    assert rj == (2, 3, 2)
    assert all(_closed_after(s, 5) is not None for s in idle)  # ACSE timeout closes them
    assert _wait(lambda: _running(running) == 0, 5)
    assert _echo_ok(running.port)
    for s in idle:
        s.close()


def test_connection_flood_is_cut_at_the_socket(start_node):
    running = start_node(node={"max_associations": 1, "acse_timeout": 2, "network_timeout": 2})
    cap = 2 * 1 + 2
    idle = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(cap)]
    assert _wait(lambda: _running(running) == cap, 5)
    with socket.create_connection(("127.0.0.1", running.port)) as extra:
        closed = _closed_after(extra, 3)
        assert closed is not None and closed < 2  # refused at once, no thread
    assert _running(running) == cap
    for s in idle:
        s.close()
    assert _wait(lambda: _running(running) == 0, 10)
    assert _echo_ok(running.port)


# ---------------------------------------------------------------------------
# user identity


def _identity(username: bytes, passcode: bytes) -> UserIdentityNegotiation:
    item = UserIdentityNegotiation()
    item.user_identity_type = 2
    item.primary_field = username
    item.secondary_field = passcode
    return item


def test_user_identity_over_tls(start_node, pki, caplog):
    users = [{"username": "scanner", "password_hash": hash_password("s3cret-pass")}]
    running = _tls_node(start_node, pki, user_identity={"enabled": True, "users": users})
    ctx = _client_ctx(pki)
    caplog.set_level("INFO")
    assoc, rj = _associate(running.port, tls=ctx, identity=_identity(b"scanner", b"s3cret-pass"))
    assert assoc.is_established and rj is None
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assoc, rj = _associate(running.port, tls=ctx, identity=_identity(b"scanner", b"wrong"))
    assert assoc.is_rejected and rj == (2, 2, 1)
    assoc, rj = _associate(running.port, tls=ctx, identity=_identity(b"nobody", b"s3cret-pass"))
    assert assoc.is_rejected and rj == (2, 2, 1)
    assoc, rj = _associate(running.port, tls=ctx)  # no identity at all
    assert assoc.is_rejected and rj == (1, 1, 1)
    assert "s3cret-pass" not in caplog.text and "wrong" not in caplog.text
    assert "user identity accepted username=scanner" in caplog.text


def test_user_identity_needs_tls(pki):
    users = [{"username": "scanner", "password_hash": hash_password("x")}]
    with pytest.raises(ConfigError, match=re.escape("user_identity needs node.tls.enabled")):
        load_settings(
            overrides={"node": {"user_identity": {"enabled": True, "users": users}}}, environ={}
        )
    with pytest.raises(ConfigError, match="never a plain passcode"):
        load_settings(
            overrides={
                "node": {
                    "tls": _tls(pki, enabled=True),
                    "user_identity": {
                        "enabled": True,
                        "users": [{"username": "a", "password_hash": "plaintext"}],
                    },
                }
            },
            environ={},
        )
    # the handler refuses an identity that arrives over plain TCP, even a right one
    settings = load_settings(
        overrides={
            "node": {
                "tls": _tls(pki, enabled=True),
                "user_identity": {"enabled": True, "users": users},
            }
        },
        environ={},
    )
    with socket.socket() as plain, socket.socket() as other:
        fake = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        fake.check_hostname, fake.verify_mode = False, ssl.CERT_NONE
        tls_sock = fake.wrap_socket(other, do_handshake_on_connect=False)

        def event(sock):
            assoc = SimpleNamespace(
                requestor=SimpleNamespace(address="192.0.2.1"),
                dul=SimpleNamespace(socket=SimpleNamespace(socket=sock)),
            )
            return SimpleNamespace(
                assoc=assoc, user_id_type=2, primary_field=b"scanner", secondary_field=b"x"
            )

        assert handle_user_id(event(plain), settings) == (False, None)
        assert handle_user_id(event(tls_sock), settings) == (True, None)


# ---------------------------------------------------------------------------
# slow, silent and oversized peers


def test_slow_drip_peer_is_cut_and_others_are_served(start_node):
    running = start_node(
        node={"network_timeout": 1, "acse_timeout": 1, "max_association_seconds": 2}
    )
    with socket.create_connection(("127.0.0.1", running.port)) as drip:
        # an A-ASSOCIATE-RQ header announcing 1000 bytes, then one byte every 0.25 s
        drip.sendall(struct.pack(">BBL", 0x01, 0, 1000))
        result: list[float | None] = []
        t = threading.Thread(target=lambda: result.append(_closed_after(drip, 8, b"\0")))
        t.start()
        time.sleep(0.5)
        assert _echo_ok(running.port)  # served while the drip goes on
        t.join()
    assert result[0] is not None and 1.5 < result[0] < 4.0, result
    assert _wait(lambda: _running(running) == 0, 3)
    with socket.create_connection(("127.0.0.1", running.port)) as silent:
        closed = _closed_after(silent, 5)
        assert closed is not None and closed < 2.5  # idle timeout, nothing sent
    assert _echo_ok(running.port)


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("in_association", [False, True])
def test_pdu_length_ffffffff_is_refused_without_allocating(start_node, in_association):
    running = start_node(node={"max_pdu_size": 16384, "acse_timeout": 1})
    before = _rss_bytes()
    if in_association:
        assoc, _ = _associate(running.port)
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == 16384  # the node advertises its limit
        sock = assoc.dul.socket.socket
        header = struct.pack(">BBL", 0x04, 0, 0xFFFFFFFF)  # P-DATA-TF of 4 GiB
    else:
        sock = socket.create_connection(("127.0.0.1", running.port))
        header = struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF)  # A-ASSOCIATE-RQ of 4 GiB
    sock.settimeout(5)
    sent, block = 0, b"\xab" * (1 << 20)
    with pytest.raises(OSError):  # the node closes the connection under our feet
        sock.sendall(header)
        while sent < 256 * (1 << 20):
            sock.sendall(block)
            sent += len(block)
    assert sent < 64 * (1 << 20)  # far less than announced got through
    sock.close()
    assert _rss_bytes() - before < 64 * (1 << 20)
    assert _wait(lambda: _running(running) == 0, 5)
    assert _echo_ok(running.port)


def test_instance_over_the_size_limit_is_cut_during_receipt(start_node, tmp_path):
    running = start_node(node={"max_instance_bytes": 100_000})
    ds = ct_slice(generate_uid(), generate_uid(), 0, rows=256, cols=256)  # 128 KiB pixels
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    assert store_file(running.port, big) is None  # no response: the transfer was cut
    small = write_series(tmp_path / "small", 1)[0]
    assert store_file(running.port, small).Status == 0
    (row,) = _instances(running)
    assert row.sop_instance_uid == pydicom.dcmread(small).SOPInstanceUID
    assert _wait(lambda: list((running.store_root / "tmp").iterdir()) == [], 5)


# ---------------------------------------------------------------------------
# stored files and model loading


def test_stored_files_have_zero_preamble_no_exec_bit_private_dirs(start_node, tmp_path):
    running = start_node()
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    ds.preamble = b"MZ\x90\x00" + b"\xcc" * 124  # a PE header in the sender's preamble
    polyglot = tmp_path / "polyglot.dcm"
    ds.save_as(polyglot, enforce_file_format=True)
    os.chmod(polyglot, 0o755)
    assert polyglot.read_bytes()[:2] == b"MZ"
    run = subprocess.run(
        ["storescu", "-aec", "CSPINE", "127.0.0.1", str(running.port), str(polyglot)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    (row,) = _instances(running)
    stored = running.store_root / row.file_path
    assert stored.read_bytes()[:132] == b"\0" * 128 + b"DICM"
    assert stored.stat().st_mode & 0o111 == 0  # never executable
    assert stored.stat().st_mode & 0o007 == 0  # not world-readable
    # the store, its spool (tmp), instances, quarantine and outputs folders
    for folder in (running.store_root, *running.store_root.iterdir()):
        assert folder.is_dir()
        assert folder.stat().st_mode & 0o007 == 0, folder
    # the catalog and its WAL files are not world-readable either (whatever the umask)
    for name in ("catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm"):
        path = running.store_root.parent / name
        assert path.is_file() and path.stat().st_mode & 0o007 == 0, path


def test_model_weights_never_go_through_unrestricted_pickle():
    offenders = []
    for package in ("ai", "dicom_node", "storage", "config"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
                if "weights_only=True" not in match.group(1):
                    offenders.append(f"{path}: {match.group(0)}")
            if re.search(r"^\s*(import pickle|from pickle|import dill)", text, re.M):
                offenders.append(f"{path}: pickle import")
            if "torch.jit.load" in text:
                offenders.append(f"{path}: torch.jit.load")
    assert offenders == []
    modelpkg = (ROOT / "ai" / "modelpkg.py").read_text()
    assert "safetensors" in modelpkg


def test_cli_echo_and_send_over_tls(start_node, pki, tmp_path):
    from tests.dicom_node.proc import cspine

    running = _tls_node(start_node, pki)
    tls = _tls(pki, "scanner", enabled=True)
    cfg = tmp_path / "scanner.toml"
    cfg.write_text(
        "[node]\nae_title = \"SCANNER\"\n[node.tls]\n"
        + "".join(f'{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}\n'
                  for k, v in tls.items())
    )  # fmt: skip
    target = f"CSPINE@127.0.0.1:{running.port}"
    common = ["--config", str(cfg), "--data-dir", str(tmp_path / "cli-var")]
    ok = cspine("echo", *common, "--tls", target)
    assert ok.returncode == 0 and "success" in ok.stdout, ok.stderr
    plain = cspine("echo", *common, "--no-tls", target)
    assert plain.returncode != 0
    paths = write_series(tmp_path / "in", 2)
    sent = cspine("send", *common, "--tls", "--to", target, *map(str, paths))
    assert sent.returncode == 0 and "sent 2 of 2" in sent.stdout, sent.stderr
    assert len(_instances(running)) == 2


def test_imported_files_get_a_zero_preamble_too(tmp_path):
    from tests.dicom_node.proc import cspine

    ds = ct_slice(generate_uid(), generate_uid(), 0)
    ds.preamble = b"MZ\x90\x00" + b"\xcc" * 124
    folder = tmp_path / "in"
    folder.mkdir()
    ds.save_as(folder / "polyglot.dcm", enforce_file_format=True)
    original = (folder / "polyglot.dcm").read_bytes()
    run = cspine("import", "--data-dir", str(tmp_path / "var"), str(folder))
    assert run.returncode == 0, run.stderr
    (stored,) = (tmp_path / "var" / "store" / "instances").rglob("*.dcm")
    data = stored.read_bytes()
    assert data[:132] == b"\0" * 128 + b"DICM"
    assert data[128:] == original[128:]  # everything after the preamble is kept as sent
    assert (folder / "polyglot.dcm").read_bytes() == original  # the source is not modified
