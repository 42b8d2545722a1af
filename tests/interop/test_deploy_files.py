"""Syntax and consistency of the deployment files, checked without a container engine.

* systemd unit: parsed, hardening keys asserted, and ``systemd-analyze verify`` when
  the host has it (it reports unknown keys and bad values);
* environment file: ``KEY=VALUE`` lines whose ``CSPINE_`` keys are real settings;
* Dockerfile: stages, non-root USER, HEALTHCHECK, COPY sources that exist and pass
  the Dockerfile-specific ignore file;
* docker-compose.yml: YAML with the expected services, whose mounted node and Orthanc
  configurations agree on AE titles, addresses and ports;
* example site configuration: loads with :func:`config.load_settings`.
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from config import check_bind_safety, load_settings
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "cspine.service"
ENV_FILE = DEPLOY / "systemd" / "cspine.env"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
SITE = DEPLOY / "config" / "site.example.toml"


def _load_yaml(path: Path) -> Any:
    """Parse YAML with PyYAML (a test extra)."""
    import yaml

    with path.open() as fh:
        return yaml.safe_load(fh)


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_unit_is_hardened_and_restarts_on_failure():
    unit = _unit()
    assert unit.sections() == ["Unit", "Service", "Install"]
    svc = unit["Service"]
    assert svc["User"] == "cspine" and svc["Group"] == "cspine"
    expected = {
        "NoNewPrivileges": "true",
        "ProtectSystem": "strict",
        "ProtectHome": "true",
        "PrivateTmp": "true",
        "PrivateDevices": "true",
        "ProtectKernelTunables": "true",
        "ProtectKernelModules": "true",
        "ProtectControlGroups": "true",
        "RestrictSUIDSGID": "true",
        "LockPersonality": "true",
        "Restart": "on-failure",
        "StateDirectory": "cspine",
        "StateDirectoryMode": "0750",
        "UMask": "0027",
        "StandardOutput": "journal",
        "StandardError": "journal",
    }
    assert {k: svc.get(k) for k in expected} == expected
    assert svc["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert svc["SystemCallFilter"] == "@system-service"
    assert svc["EnvironmentFile"] == "/etc/cspine/cspine.env"
    # the only writable path is the state directory, which is the node's data dir
    assert svc["ReadWritePaths"] == "/var/lib/cspine"
    argv = shlex.split(svc["ExecStart"])
    assert argv[0].endswith("/bin/cspine") and argv[1] == "serve"
    assert argv[argv.index("--data-dir") + 1] == "/var/lib/cspine"
    assert argv[argv.index("--config") + 1] == "/etc/cspine/cspine.toml"
    assert int(svc["TimeoutStopSec"]) >= 30
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_verifies(tmp_path):
    # The check systemd itself makes, where the host has systemd-analyze: it reports
    # unknown keys, bad values and a missing ExecStart binary (pointed at this venv).
    analyze = shutil.which("systemd-analyze")
    text = UNIT.read_text()
    cspine = Path(sys.executable).with_name("cspine")
    assert cspine.exists()
    text = text.replace("/opt/cspine/venv/bin/cspine", str(cspine))
    unit = tmp_path / "cspine.service"
    unit.write_text(text)
    if analyze is None:  # still a parse, by the same rules as the test above
        parser = configparser.ConfigParser(strict=True, interpolation=None)
        parser.read_string(text)
        return
    run = subprocess.run(
        [analyze, "verify", str(unit)],
        capture_output=True,
        text=True,
        env={"SYSTEMD_LOG_LEVEL": "warning", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    complaints = [ln for ln in (run.stdout + run.stderr).splitlines() if "cspine.service" in ln]
    assert complaints == []


def test_environment_file_holds_real_settings():
    env = {}
    for line in ENV_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and key.isidentifier() and key.upper() == key, line
        env[key] = value
    assert "CSPINE_LOGGING__LEVEL" in env
    settings = load_settings(SITE, environ=env)
    assert settings.logging.level == env["CSPINE_LOGGING__LEVEL"]
    # a misspelt CSPINE_ key would be refused the same way
    bad = dict(env, CSPINE_LOGGING__LEVL="INFO")
    try:
        load_settings(SITE, environ=bad)
    except Exception as exc:
        assert "logging.levl" in str(exc)
    else:
        raise AssertionError("an unknown CSPINE_ key was accepted")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "dangling line continuation"
    return out


def _ignored(rel: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        hit = fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat + "/*") or pat == "**"
        if hit:
            ignored = not negate
    return ignored


def test_dockerfile_stages_user_healthcheck_and_copy_sources():
    known = {
        "ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "HEALTHCHECK",
        "EXPOSE", "VOLUME", "ENTRYPOINT", "CMD", "STOPSIGNAL", "LABEL",
    }  # fmt: skip
    steps = _instructions(DOCKERFILE)
    assert {word for word, _ in steps} <= known
    # only ARGs before the first FROM
    first_from = next(i for i, (w, _) in enumerate(steps) if w == "FROM")
    assert all(w == "ARG" for w, _ in steps[:first_from])
    global_args = dict(a.split("=", 1) for w, a in steps[:first_from])
    assert global_args["VARIANT"] == "cpu"
    stages = {}
    for word, args in steps:
        if word == "FROM":
            image, _, name = args.partition(" AS ")
            stages[name.strip()] = image.strip()
    assert stages["base"] == "${PYTHON_IMAGE}"
    assert global_args["PYTHON_IMAGE"].startswith("python:3.11")
    assert stages["torch-cpu"] == stages["torch-cuda"] == "base"
    assert stages["runtime"] == "torch-${VARIANT}"
    # the final stage: non-root user, health check, the node's port
    final = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM") :]
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (health,) = [a for w, a in final if w == "HEALTHCHECK"]
    assert "CMD" in health and "echo" in health and "HEALTHCHECK" in health
    assert ("EXPOSE", "11112") in final
    cmd = json.loads(dict(final)["CMD"])
    assert cmd[0] == "serve" and "--config" in cmd
    # every COPY source exists and is inside the build context the ignore file leaves
    patterns = [
        ln.strip()
        for ln in DOCKERIGNORE.read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    for word, args in final:
        if word != "COPY":
            continue
        sources = args.split()[:-1]
        for src in sources:
            assert (ROOT / src).exists(), src
            assert not _ignored(src, patterns), f"{src} is excluded by {DOCKERIGNORE.name}"
    assert _ignored(".venv", patterns) and _ignored("var", patterns)
    assert _ignored("tests", patterns)


def test_compose_file_services_and_configurations_agree():
    compose = _load_yaml(COMPOSE)
    assert set(compose["services"]) == {"orthanc", "cspine"}
    orthanc, node = compose["services"]["orthanc"], compose["services"]["cspine"]
    assert orthanc["image"].startswith("orthancteam/orthanc:")
    build = node["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert build["args"]["VARIANT"] == "cpu"
    for service in (orthanc, node):
        for volume in service["volumes"]:
            src = volume.split(":")[0]
            if src.startswith("./"):
                assert (DEPLOY / src).is_file(), src
            else:
                assert src in compose["volumes"], src
    assert node["read_only"] is True and node["cap_drop"] == ["ALL"]
    ip = {
        name: service["networks"]["dicom"]["ipv4_address"]
        for name, service in compose["services"].items()
    }
    # the node's configuration (as mounted) knows Orthanc as a peer and as destination
    node_toml = DEPLOY / "compose" / "cspine.toml"
    settings = load_settings(node_toml, environ={})
    check_bind_safety(settings)
    peers = {p.ae_title: p for p in settings.node.peers}
    orthanc_conf = json.loads((DEPLOY / "compose" / "orthanc.json").read_text())
    assert peers[orthanc_conf["DicomAet"]].matches(orthanc_conf["DicomAet"], ip["orthanc"])
    assert peers["HEALTHCHECK"].matches("HEALTHCHECK", "127.0.0.1")
    (dest,) = settings.destinations
    assert (dest.ae_title, dest.host, dest.port) == (
        orthanc_conf["DicomAet"],
        ip["orthanc"],
        orthanc_conf["DicomPort"],
    )
    # ... and Orthanc knows the node as modality "cspine" at its address and port
    modality = orthanc_conf["DicomModalities"]["cspine"]
    assert (modality["AET"], modality["Host"], modality["Port"]) == (
        settings.node.ae_title,
        ip["cspine"],
        settings.node.port,
    )
    assert f"{settings.node.port}:{settings.node.port}" in node["ports"]
    assert f"{orthanc_conf['DicomPort']}:{orthanc_conf['DicomPort']}" in orthanc["ports"]
    gpu = _load_yaml(COMPOSE_GPU)
    assert gpu["services"]["cspine"]["build"]["args"]["VARIANT"] == "cuda"
    (device,) = gpu["services"]["cspine"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_site_example_loads_with_allow_list_destination_and_tls_keys():
    settings = load_settings(SITE, environ={})
    check_bind_safety(settings)  # 0.0.0.0 is allowed because peers are configured
    assert settings.node.host == "0.0.0.0" and not settings.node.allow_any_peer
    peers = {p.ae_title: p for p in settings.node.peers}
    assert set(peers) == {"CT01", "PACS", "HEALTHCHECK"}
    assert peers["CT01"].matches("CT01", "10.20.1.15")
    assert not peers["CT01"].matches("CT01", "10.20.1.16")
    (dest,) = settings.destinations
    assert dest.ae_title == "PACS" and set(dest.outputs) == {"seg", "sr", "summary"}
    assert peers["PACS"].matches("PACS", dest.host)
    raw = tomllib.loads(SITE.read_text())
    assert set(raw["node"]["tls"]) == {
        "enabled",
        "certificate",
        "private_key",
        "ca_bundle",
        "require_client_certificate",
    }
    assert settings.storage.data_dir == Path("/var/lib/cspine")
    assert settings.models.registry == "/opt/cspine/models"
