"""A private Orthanc (Debian's ``orthanc`` package) on free loopback ports, driven over REST.

Each :class:`Orthanc` writes its own JSON configuration, storage and index folders in a
temporary folder, listens on 127.0.0.1 only, with no plugins, no HTTP authentication
and no remote access, and is stopped by :meth:`Orthanc.stop`. The system service of the
Debian package (ports 4242/8042) is never used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import free_port

ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")


def orthanc_binary() -> str:
    """Path of the Orthanc server binary (Debian installs it as ``/usr/sbin/Orthanc``)."""
    found = shutil.which("Orthanc")
    if found:
        return found
    for path in ORTHANC_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    raise RuntimeError("Orthanc is not installed: apt-get install -y orthanc (make test does it)")


def orthanc_version() -> str:
    """The version Orthanc prints (``Orthanc --version``), e.g. ``"1.10.1"``."""
    out = subprocess.run(
        [orthanc_binary(), "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    return out.stdout.split()[1] if len(out.stdout.split()) > 1 else out.stdout.strip()


@dataclass
class Orthanc:
    """One Orthanc process.

    Parameters
    ----------
    workdir
        Folder for the configuration, the storage area, the index and the log.
    modalities
        ``{name: (AE title, host, port)}`` of the DICOM peers Orthanc knows.
    aet
        Orthanc's own AE title.
    extra
        More configuration keys (they override the defaults written here).
    env
        More environment variables for the process (e.g. ``{"TCP_NODELAY": "1"}``: Orthanc's
        DICOM server is dcmtk's, which reads Nagle's setting from the environment; Orthanc
        has no configuration option for it, ``TcpNoDelay`` is for its HTTP server only).
    """

    workdir: Path
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    aet: str = "ORTHANC"
    extra: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def configuration(self) -> dict[str, Any]:
        """The JSON configuration this instance runs with."""
        config: dict[str, Any] = {
            "Name": "cspine-interop",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "Plugins": [],
            "ConcurrentJobs": 2,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            # only the modalities below may store, and only from their declared host
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {
                name: {"AET": ae, "Host": host, "Port": port}
                for name, (ae, host, port) in self.modalities.items()
            },
            "DicomScuTimeout": 30,
            "DicomAssociationCloseDelay": 0,
            "SaveJobs": False,
            "StableAge": 60,
            "HttpTimeout": 60,
        }
        config.update(self.extra)
        return config

    def start(self, timeout: float = 30.0) -> Orthanc:
        """Write the configuration, start Orthanc and wait for its REST API."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.configuration(), indent=2))
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [orthanc_binary(), str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited:\n{self.log()[-3000:]}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc REST API did not answer:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _request(self, method: str, path: str, body: bytes | None, ctype: str) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", ctype)
        with urllib.request.urlopen(req, timeout=120) as rsp:
            data = rsp.read()
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        """GET a REST resource and decode its JSON."""
        return self._request("GET", path, None, "")

    def post(self, path: str, payload: Any) -> Any:
        """POST JSON to a REST resource and decode the JSON answer."""
        return self._request("POST", path, json.dumps(payload).encode(), "application/json")

    def upload(self, path: Path) -> dict[str, Any]:
        """``POST /instances`` with a DICOM file; returns Orthanc's answer (ID, ParentStudy...)."""
        return self._request("POST", "/instances", path.read_bytes(), "application/dicom")
