"""The scale-out compose file (deploy/docker-compose.scale.yml) and its configurations,
checked without a container engine: the roles, the shared store, the catalog URL, the
DICOM balancer in front of the receivers, and Orthanc knowing every sending address."""

from __future__ import annotations

import json
import re

from config import check_bind_safety, load_settings
from tests.interop.test_deploy_files import DEPLOY, DOCKERFILE, _load_yaml

SCALE = DEPLOY / "docker-compose.scale.yml"
NODE_TOML = DEPLOY / "compose" / "cspine-scale.toml"


def test_scale_compose_roles_share_one_catalog_and_one_store():
    compose = _load_yaml(SCALE)
    services = compose["services"]
    assert set(services) == {
        "postgres",
        "orthanc",
        "dicom-lb",
        "receiver-1",
        "receiver-2",
        "worker",
    }
    nodes = {k: v for k, v in services.items() if k.startswith(("receiver", "worker"))}
    build = services["receiver-1"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    pg = services["postgres"]["environment"]
    settings = load_settings(NODE_TOML, environ={})
    for name, svc in nodes.items():
        command = svc["command"]
        if name.startswith("receiver"):
            assert command[:1] == ["serve"] and "--no-worker" in command, name
        else:
            assert command[:1] == ["worker"] and svc["deploy"]["replicas"] >= 2
        assert "/etc/cspine/cspine.toml" in command
        url = svc["environment"]["CSPINE_STORAGE__DATABASE_URL"]
        match = re.fullmatch(r"postgresql\+psycopg://(\w+):\$\{[^}]+\}@postgres:5432/(\w+)", url)
        assert match and match.groups() == (pg["POSTGRES_USER"], pg["POSTGRES_DB"]), url
        mounts = dict(v.split(":")[:2] for v in svc["volumes"])
        assert mounts["store"] == str(settings.storage.store_path), name  # the shared store
        assert mounts["./compose/cspine-scale.toml"] == "/etc/cspine/cspine.toml"
        data = [src for src, dst in mounts.items() if dst == "/var/lib/cspine"]
        assert len(data) == 1 and data[0] in compose["volumes"]
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
    receivers_data = {
        src
        for name, svc in nodes.items()
        for src, dst in (v.split(":")[:2] for v in svc["volumes"])
        if dst == "/var/lib/cspine"
    }
    assert len(receivers_data) == len(nodes)  # each role its own run/ folder
    for src in ("catalog-db", "orthanc-db", "store"):
        assert src in compose["volumes"]


def test_scale_balancer_receivers_and_orthanc_agree():
    compose = _load_yaml(SCALE)
    services = compose["services"]
    ip = {
        name: svc["networks"]["dicom"]["ipv4_address"]
        for name, svc in services.items()
        if isinstance(svc["networks"], dict)
    }
    settings = load_settings(NODE_TOML, environ={})
    check_bind_safety(settings)
    port = settings.node.port
    lb_conf = (DEPLOY / "compose" / "dicom-lb.conf").read_text()
    upstream = re.findall(r"server (receiver-\d+):(\d+)", lb_conf)
    assert sorted(upstream) == [("receiver-1", str(port)), ("receiver-2", str(port))]
    assert f"listen {port};" in lb_conf
    assert f"{port}:{port}" in services["dicom-lb"]["ports"]
    assert services["dicom-lb"]["volumes"] == ["./compose/dicom-lb.conf:/etc/nginx/nginx.conf:ro"]
    orthanc = json.loads((DEPLOY / "compose" / "orthanc-scale.json").read_text())
    peers = {p.ae_title: p for p in settings.node.peers}
    # associations arrive from the balancer's address
    assert peers[orthanc["DicomAet"]].matches(orthanc["DicomAet"], ip["dicom-lb"])
    assert not peers[orthanc["DicomAet"]].matches(orthanc["DicomAet"], ip["receiver-1"])
    (dest,) = settings.destinations
    assert (dest.ae_title, dest.host, dest.port) == (
        orthanc["DicomAet"],
        ip["orthanc"],
        orthanc["DicomPort"],
    )
    # Orthanc sends to the balancer and accepts results from each receiver's address
    modalities = {(m["AET"], m["Host"], m["Port"]) for m in orthanc["DicomModalities"].values()}
    for name in ("dicom-lb", "receiver-1", "receiver-2"):
        assert (settings.node.ae_title, ip[name], port) in modalities, name
