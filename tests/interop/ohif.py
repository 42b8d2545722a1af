"""OHIF's built viewer, served locally in front of a loopback Orthanc, driven by Chromium.

The parts a browser test of the node's outputs in a real viewer needs:

* :func:`ohif_dist`: OHIF's prebuilt ``dist/`` from npm's ``@ohif/app``, unpacked under the
  git-ignored ``.cache/ohif/<version>/`` (``make test`` puts it there with ``npm pack``).
* :func:`dicomweb_orthanc`: an :class:`~tests.interop.orthanc.Orthanc` with Debian's
  DICOMweb plugin (``orthanc-dicomweb``) at ``/dicom-web/``.
* :class:`ViewerServer`: OHIF's files from Python's standard library with the fallback to
  ``index.html`` a single-page app needs, an ``app-config.js`` whose DICOMweb data source
  is ``/dicom-web`` on the same origin, and ``/dicom-web/`` passed through to Orthanc (the
  reverse proxy a site puts in front of both; Orthanc sends no CORS headers).
* :class:`Chromium`: headless Chromium over the DevTools protocol (``websocket-client``):
  console messages, exceptions and failed requests recorded, DOM read, mouse clicks,
  screenshots.
* :func:`build_study`: a synthetic CT study, the shipped pipeline run on it and the node's
  own writers (SEG, TID 1500 SR, summary image) called as the worker calls them.
"""

from __future__ import annotations

import base64
import datetime
import functools
import http.server
import itertools
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from tests.conftest import ROOT, in_ci
from tests.interop.orthanc import Orthanc

OHIF_VERSION = "3.13.2"
"""The ``@ohif/app`` release whose ``dist/`` is served (the Makefile's ``OHIF_VERSION``)."""

OHIF_CACHE = ROOT / ".cache" / "ohif"
DICOMWEB_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


class ToolMissing(RuntimeError):
    """A tool the viewer test needs is not installed (``make test`` installs them)."""


def ohif_dist(version: str = OHIF_VERSION) -> Path:
    """Folder of OHIF's built viewer (``index.html``, bundles, ``app-config.js``).

    Raises
    ------
    ToolMissing
        When ``.cache/ohif/<version>/dist`` is absent.
    """
    dist = OHIF_CACHE / version / "dist"
    if not (dist / "index.html").is_file():
        raise ToolMissing(
            f"OHIF {version} is not unpacked in {dist} (make ohif: npm pack @ohif/app@{version})"
        )
    return dist


def dicomweb_plugin() -> str:
    """Path of Orthanc's DICOMweb plugin (Debian's ``orthanc-dicomweb``)."""
    for path in DICOMWEB_PLUGIN_CANDIDATES:
        if os.path.exists(path):
            return path
    raise ToolMissing("Orthanc's DICOMweb plugin is missing: apt-get install -y orthanc-dicomweb")


def chromium_binary() -> str:
    """Path of the Chromium browser (Debian's ``chromium``)."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise ToolMissing("Chromium is missing: apt-get install -y chromium")


def require_viewer_tools() -> tuple[Path, str, str]:
    """OHIF's dist, the DICOMweb plugin and Chromium, or a skip (a failure with ``CI=true``)."""
    import pytest

    try:
        return ohif_dist(), dicomweb_plugin(), chromium_binary()
    except ToolMissing as exc:
        if in_ci():
            pytest.fail(f"{exc} (CI=true: the viewer test must run)", pytrace=False)
        pytest.skip(str(exc))


def dicomweb_orthanc(workdir: Path) -> Orthanc:
    """A loopback Orthanc (not started) with the DICOMweb plugin at ``/dicom-web/``."""
    return Orthanc(
        workdir,
        extra={
            "Plugins": [dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        },
    )


APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  disableConfirmationPrompts: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (loopback)',
        name: 'orthanc',
        wadoUriRoot: '/wado',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        dicomUploadEnabled: false,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
"""
"""OHIF's configuration: one DICOMweb data source, ``/dicom-web`` on the page's origin."""


class _ViewerHandler(http.server.SimpleHTTPRequestHandler):
    """OHIF's files, ``app-config.js`` from memory, ``/dicom-web/`` proxied to Orthanc."""

    upstream = ""
    app_config = APP_CONFIG.encode()
    proxied = ("/dicom-web/", "/dicom-web?", "/wado")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: a viewer load makes hundreds of requests

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if self.path.startswith(self.proxied):
            self._proxy()
        elif path == "/app-config.js":
            self._send(200, "application/javascript", self.app_config)
        elif path != "/" and Path(self.translate_path(path)).is_file():
            super().do_GET()
        else:  # a route of the single-page app (/viewer, /segmentation, ...)
            self.path = "/index.html"
            super().do_GET()

    def end_headers(self) -> None:
        # OHIF's wasm decoders and workers want cross-origin isolation for SharedArrayBuffer
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def _send(self, status: int, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _proxy(self) -> None:
        req = urllib.request.Request(self.upstream + self.path, method="GET")
        for name in ("Accept", "Range"):
            if self.headers.get(name):
                req.add_header(name, self.headers[name])
        try:
            rsp = urllib.request.urlopen(req, timeout=60)
        except urllib.error.HTTPError as err:
            rsp = err
        with rsp:
            body = rsp.read()
            self.send_response(rsp.status)
            for name in ("Content-Type", "Content-Disposition"):
                if rsp.headers.get(name):
                    self.send_header(name, rsp.headers[name])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


@dataclass
class ViewerServer:
    """OHIF's ``dist`` on a free loopback port, in front of Orthanc's DICOMweb API.

    Parameters
    ----------
    dist
        OHIF's built files (:func:`ohif_dist`).
    orthanc_url
        Base URL of the Orthanc whose ``/dicom-web/`` the viewer reads.
    """

    dist: Path
    orthanc_url: str
    port: int = 0
    _server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ViewerServer:
        handler = type("ViewerHandler", (_ViewerHandler,), {"upstream": self.orthanc_url})
        factory = functools.partial(handler, directory=str(self.dist))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), factory)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@dataclass
class ConsoleEntry:
    """One console message, uncaught exception or failed request seen by the page."""

    kind: str  # "console", "exception", "log", "network"
    level: str
    text: str

    def __str__(self) -> str:
        return f"[{self.kind}:{self.level}] {self.text}"


@dataclass
class Chromium:
    """Headless Chromium with one page, driven over the DevTools protocol.

    Parameters
    ----------
    workdir
        Folder for the browser profile and its log.
    width, height
        Size of the page's viewport in CSS pixels (device scale factor 1).
    """

    workdir: Path
    width: int = 1600
    height: int = 1000
    entries: list[ConsoleEntry] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    _ws: Any = None
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def start(self, timeout: float = 30.0) -> Chromium:
        import websocket  # websocket-client

        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "chromium.log").open("wb")
        self.proc = subprocess.Popen(
            [
                chromium_binary(),
                "--headless=new",
                "--no-sandbox",  # the suite may run as root
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-dev-shm-usage",
                # cornerstone3D renders with WebGL: Chromium's software GL in a headless box
                "--use-angle=swiftshader",
                "--enable-unsafe-swiftshader",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.workdir / 'profile'}",
                f"--window-size={self.width},{self.height}",
                "about:blank",
            ],
            stdout=log,
            stderr=log,
        )
        port_file = self.workdir / "profile" / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not port_file.is_file() or not port_file.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Chromium did not start: {self.log()[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as rsp:
            targets = json.loads(rsp.read())
        page = next(t for t in targets if t["type"] == "page")
        self._ws = websocket.create_connection(
            page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True
        )
        for method in ("Runtime.enable", "Log.enable", "Network.enable", "Page.enable"):
            self.call(method)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )
        return self

    def stop(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        path = self.workdir / "chromium.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and wait for its answer (events seen meanwhile are kept)."""
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))
            self._event(msg)

    def _event(self, msg: dict[str, Any]) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(
                str(a.get("value", a.get("description", a.get("type", ""))))
                for a in params.get("args", [])
            )
            self.entries.append(ConsoleEntry("console", params.get("type", ""), text))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.entries.append(ConsoleEntry("exception", "error", str(text)))
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            text = f"{entry.get('text', '')} {entry.get('url', '')}".strip()
            self.entries.append(ConsoleEntry("log", entry.get("level", ""), text))
        elif method == "Network.loadingFailed":
            text = f"{params.get('errorText', '')} {params.get('requestId', '')}"
            if not params.get("canceled"):
                self.entries.append(ConsoleEntry("network", "error", text))
        elif method == "Network.responseReceived":
            rsp = params.get("response", {})
            if int(rsp.get("status", 0)) >= 400:
                text = f"HTTP {rsp.get('status')} {rsp.get('url', '')}"
                self.entries.append(ConsoleEntry("network", "error", text))

    def pump(self, seconds: float) -> None:
        """Read events for ``seconds`` (console messages keep arriving while a page works)."""
        self._ws.settimeout(0.05)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                try:
                    self._event(json.loads(self._ws.recv()))
                except Exception as exc:  # websocket timeout: nothing arrived
                    if type(exc).__name__ != "WebSocketTimeoutException":
                        raise
        finally:
            self._ws.settimeout(30)

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        """Value of a JavaScript expression in the page (JSON-serialisable)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f} s waiting for {what}; console:\n"
                    + "\n".join(str(e) for e in self.entries[-40:])
                )
            self.pump(0.25)

    def click(self, x: float, y: float, count: int = 1) -> None:
        """A left click (``count=2``: double click) at page coordinates."""
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for n in range(1, count + 1):
            for kind in ("mousePressed", "mouseReleased"):
                self.call(
                    "Input.dispatchMouseEvent",
                    type=kind,
                    x=x,
                    y=y,
                    button="left",
                    clickCount=n,
                )

    def screenshot(self, path: Path | None = None) -> np.ndarray:
        """The page as an RGB array (and a PNG at ``path``)."""
        import io

        import PIL.Image

        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
        return np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB"))

    def text(self) -> str:
        return str(self.evaluate("document.body ? document.body.innerText : ''"))


@dataclass
class ViewerStudy:
    """A synthetic CT study and the node's outputs for it, as files."""

    study_uid: str
    ct_paths: list[Path]
    seg_path: Path
    sr_path: Path
    summary_path: Path
    labels: np.ndarray  # truth, volume order (slices ascending along the slice normal)
    label_map: np.ndarray  # the pipeline's, same grid
    affine: np.ndarray
    sop_uids: list[str]  # CT SOP Instance UIDs in volume order
    probabilities: dict[str, float | None]
    patient_probability: float | None
    uids: dict[str, str]  # "seg", "sr", "summary" -> SOP Instance UID
    result: Any = None  # the pipeline's PipelineResult

    @property
    def outputs(self) -> dict[str, Path]:
        return {"seg": self.seg_path, "sr": self.sr_path, "summary": self.summary_path}


def build_study(out: Path, seed: int = 7, *, threshold: float = 0.5) -> ViewerStudy:
    """Write a synthetic CT study and the node's SEG, SR and summary image for it.

    The study is :class:`ai.synthetic.StudySpec.small` at 176 x 176 pixels, full field of
    view, head first supine, fractured; the shipped demo models run on it
    (:func:`ai.pipeline.run`, a few seconds on a CPU) and the writers are called with the
    identities the worker gives them (:func:`dicom_node.uids.output_ids`).
    """
    import torch

    from ai import pipeline
    from ai.synthetic import StudySpec, generate_study, write_study
    from dicom_node import writers
    from dicom_node.uids import output_ids

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    spec = StudySpec.small(
        rows=176, cols=176, fracture_rate=1.0, field_of_view="full", patient_position="HFS"
    )
    study = generate_study(seed, spec)
    ct_paths = write_study(study, out / "ct")
    vol = study.volume
    result = pipeline.run(vol)
    headers = {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in ct_paths)
    }
    sources = [headers[uid] for uid in vol.source_sop_instance_uids]
    study_uid = str(sources[0].StudyInstanceUID)
    key = f"{study_uid}@viewer-check"
    when = datetime.datetime(2026, 1, 2, 3, 4, 5)
    seg = writers.write_seg(sources, result, content_datetime=when, **output_ids(key, 1, "seg"))
    sr = writers.write_sr(
        sources,
        seg,
        result,
        threshold=threshold,
        selection_note="series 2: the only axial bone-kernel series",
        content_datetime=when,
        **output_ids(key, 1, "sr"),
    )
    pixels = writers.render_summary(
        vol.hu, vol.affine, result, threshold=threshold, software_version="viewer-check"
    )
    summary = writers.write_summary_image(
        sources, pixels, result, content_datetime=when, **output_ids(key, 1, "summary")
    )
    paths = {}
    for name, ds in (("seg", seg), ("sr", sr), ("summary", summary)):
        paths[name] = out / f"{name}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    return ViewerStudy(
        study_uid=study_uid,
        ct_paths=ct_paths,
        seg_path=paths["seg"],
        sr_path=paths["sr"],
        summary_path=paths["summary"],
        labels=study.labels,
        label_map=result.label_map,
        affine=vol.affine,
        sop_uids=list(vol.source_sop_instance_uids),
        probabilities={v.label: v.probability for v in result.vertebrae},
        patient_probability=result.patient_probability,
        uids={
            "seg": str(seg.SOPInstanceUID),
            "sr": str(sr.SOPInstanceUID),
            "summary": str(summary.SOPInstanceUID),
        },
        result=result,
    )


@dataclass
class UnplacedCase:
    """A study whose SR has findings with no place on a slice (:func:`build_unplaced_cases`)."""

    study_uid: str
    paths: list[Path]  # the CT copy and the node's outputs, to upload
    sr_path: Path
    sop_uids: list[str]  # the copy's CT slices in volume order
    outlined: dict[str, str]  # finding -> SOP Instance UID of its outline's CT slice
    located: list[str]  # findings located at the field of view examined (SCOORD3D)
    texts: list[str]  # comments the SR holds (the not-assessed reasons)


UNPLACED_CASES = ("vertebra not found", "none assessed", "not processed")
"""The SRs OHIF 3.13.2 failed on while their findings without a place had no coordinates."""


def build_unplaced_cases(study: ViewerStudy, out: Path) -> dict[str, UnplacedCase]:
    """For each of :data:`UNPLACED_CASES`, a copy of the study's CT as a new study (new
    study, series, instance and frame of reference UIDs) with the SR the node writes:

    * ``vertebra not found``: C7 without voxels, "not in the field of view" (SEG and SR
      written from the pipeline's result with C7's voxels removed);
    * ``none assessed``: every vertebra segmented but refused as unlike the training data,
      no patient probability (SEG and SR);
    * ``not processed``: the not-processed SR of a study whose cervical spine was not found,
      written from the CT's first slice as the worker does.
    """
    import dataclasses

    from ai.types import REASON_CODES, VERTEBRAE, VertebraResult
    from dicom_node import writers
    from dicom_node.uids import output_ids

    base = study.result
    when = datetime.datetime(2026, 1, 2, 3, 4, 5)
    cases = {}
    for case in UNPLACED_CASES:
        folder = out / case.replace(" ", "-")
        folder.mkdir(parents=True, exist_ok=True)
        new: dict[str, str] = {}

        def uid(old: str, case: str = case, new: dict[str, str] = new) -> str:
            if old not in new:
                new[old] = str(pydicom.uid.generate_uid(entropy_srcs=[case, old]))
            return new[old]

        by_sop, paths = {}, []
        for path in study.ct_paths:
            ds = pydicom.dcmread(path)
            for keyword in (
                "StudyInstanceUID",
                "SeriesInstanceUID",
                "SOPInstanceUID",
                "FrameOfReferenceUID",
            ):
                setattr(ds, keyword, uid(str(ds[keyword].value)))
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            paths.append(folder / path.name)
            ds.save_as(paths[-1], enforce_file_format=True)
            del ds.PixelData
            by_sop[str(ds.SOPInstanceUID)] = ds
        sop_uids = [uid(u) for u in study.sop_uids]
        sources = [by_sop[u] for u in sop_uids]
        key = f"{sources[0].StudyInstanceUID}@viewer-check"
        outputs: dict[str, Any] = {}
        located: list[str]
        if case == "not processed":
            reason = REASON_CODES["no_cervical_spine"]
            outputs["sr"] = writers.write_not_processed_sr(
                sources[:1],
                reason,
                models=base.models,
                content_datetime=when,
                **output_ids(key, 1, "sr", name="not-processed"),
            )
            texts, located = [f"not processed: {reason}"], ["study not processed"]
        else:
            if case == "vertebra not found":
                label_map = np.where(base.label_map == 7, 0, base.label_map)
                reason = REASON_CODES["not_in_fov"]
                vertebrae = [
                    VertebraResult("C7", False, False, None, reason, "not_in_fov")
                    if v.label == "C7"
                    else v
                    for v in base.vertebrae
                ]
                result = dataclasses.replace(base, label_map=label_map, vertebrae=vertebrae)
                texts, located = [f"not assessed: {reason}"], ["C7"]
            else:
                reason = f"{REASON_CODES['ood']} (score 40.1, threshold 31.0)"
                vertebrae = [
                    VertebraResult(name, True, False, None, reason, "ood", 40.1)
                    for name in VERTEBRAE
                ]
                result = dataclasses.replace(base, vertebrae=vertebrae, patient_probability=None)
                texts, located = [f"not assessed: {reason}"], ["patient"]
            outputs["seg"] = writers.write_seg(
                sources, result, content_datetime=when, **output_ids(key, 1, "seg")
            )
            outputs["sr"] = writers.write_sr(
                sources,
                outputs["seg"],
                result,
                threshold=0.5,
                selection_note="series 2: the only axial bone-kernel series",
                content_datetime=when,
                **output_ids(key, 1, "sr"),
            )
        for name, ds in outputs.items():
            paths.append(folder / f"{name}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
        sr_path = folder / "sr.dcm"
        cases[case] = UnplacedCase(
            study_uid=str(sources[0].StudyInstanceUID),
            paths=paths,
            sr_path=sr_path,
            sop_uids=sop_uids,
            outlined=outline_slices(sr_path, skip=located),
            located=located,
            texts=texts,
        )
    return cases


def upload(orthanc: Orthanc, paths: list[Path]) -> None:
    """``POST /instances`` each file (Orthanc's REST API, as a PACS import would)."""
    for path in paths:
        answer = orthanc.upload(path)
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise RuntimeError(f"Orthanc refused {path.name}: {answer}")


LOAD_FAILURE = re.compile(r"Error Boundary|Something went wrong|failed to load|TypeError", re.I)
"""What OHIF logs when a display set fails to load: its route's error boundary writes the
exception at *debug* level, so the level alone does not find it."""


def load_errors(entries: list[ConsoleEntry]) -> list[ConsoleEntry]:
    """Console errors, uncaught exceptions, failed requests and OHIF's load failures."""
    return [e for e in entries if e.level in ("error", "assert") or LOAD_FAILURE.search(e.text)]


# --- what a radiologist sees: the study opened, the SEG over the CT, the summary ---------

FIND_TEXT = """((text) => {
  const hits = [...document.querySelectorAll('body *')].filter(
    (e) => e.children.length === 0 && e.textContent.trim() === text);
  if (!hits.length) return null;
  const r = hits[0].getBoundingClientRect();
  return [r.x + r.width / 2, r.y + r.height / 2];
})(%s)"""
"""Centre of the first leaf element whose text is exactly the argument (``null``: none)."""

VIEWPORT_STATE = """(() => {
  const els = window.cornerstone ? window.cornerstone.getEnabledElements() : [];
  if (!els.length) return null;
  const v = els[0].viewport;
  const imageId = v.getCurrentImageId ? v.getCurrentImageId() : null;
  if (!imageId) return null;
  const r = v.canvas.getBoundingClientRect();
  const points = %s;
  return {imageId, index: v.getCurrentImageIdIndex(), count: v.getImageIds().length,
          rect: [r.left, r.top, r.width, r.height],
          scale: v.canvas.width / r.width,
          canvas: points.map((p) => v.worldToCanvas(p)),
          segmentations: window.cornerstoneTools
            ? window.cornerstoneTools.segmentation.state.getSegmentations().length : 0};
})()"""
"""The first viewport: image shown, canvas rectangle, and world points mapped to the canvas."""

SEGMENTATION_SHOWN = (
    "window.cornerstoneTools && "
    "window.cornerstoneTools.segmentation.state.getSegmentations().length > 0"
)
"""True once the viewer holds a segmentation (the SEG opened over its CT)."""

SR_LOADED = (
    "(() => { const d = window.services.displaySetService.getActiveDisplaySets()"
    ".find((x) => x.Modality === 'SR'); return Boolean(d && d.isLoaded); })()"
)
"""True once OHIF has read the SR (its measurements parsed)."""


def shows_image(sop_uid: str) -> str:
    """JavaScript: true while the first viewport shows the instance ``sop_uid``."""
    return (
        f"(() => {{ const s = {VIEWPORT_STATE % '[]'}; "
        f"return Boolean(s && s.imageId.includes({json.dumps(sop_uid)})); }})()"
    )


SCROLLED_TEXT = """(async (needle) => {
  const lists = [...document.querySelectorAll('body *')].filter((e) =>
    e.scrollHeight > e.clientHeight + 10 && e.innerText.includes(needle));
  const list = lists.pop();
  if (!list) return document.body.innerText;
  const parts = [];
  const frame = () => new Promise((done) => requestAnimationFrame(done));
  for (let top = 0; ; top += list.clientHeight / 2) {
    list.scrollTop = top;
    await frame();
    await frame();  // the virtual list renders the rows now in view
    await new Promise((done) => setTimeout(done, 30));
    parts.push(list.innerText);
    if (list.scrollTop + list.clientHeight >= list.scrollHeight - 1) break;
  }
  list.scrollTop = 0;
  return parts.join(String.fromCharCode(10));
})(%s)"""
"""Text of the innermost scrolled element showing the argument, read while scrolling it
from top to bottom (a virtual list keeps only the rows in view in the page); it is left
scrolled to the top."""


SOP_IN_IMAGE_ID = re.compile(r"/instances/([0-9.]+)/frames/")
SR_DRAWN = """(() => ({
  lines: [...document.querySelectorAll('svg polyline')]
    .filter((e) => (e.getAttribute('stroke') || '').startsWith('rgb('))
    .map((e) => { const r = e.ownerSVGElement.getBoundingClientRect();
                  return [r.left, r.top, e.getAttribute('points')]; }),
  texts: [...document.querySelectorAll('svg text')].map((e) => e.textContent),
}))()"""
"""What OHIF's SR display tool drew: its outlines (each the SVG element's page offset and
its points) and its text boxes. OHIF's own icons are SVG too, stroked ``currentColor``."""

SR_NEXT = '[data-cy="viewport-action-arrows-right"]'
"""The SR viewport's arrow to its next finding."""


def outline_slices(sr_path: Path, skip: Sequence[str] = ()) -> dict[str, str]:
    """Vertebra -> SOP Instance UID of the CT slice its outline (TID 1410 group) lies on;
    the findings in ``skip`` (located at a field of view, SCOORD3D) are left out."""
    import highdicom as hd

    report = hd.sr.srread(sr_path).content
    assert isinstance(report, hd.sr.MeasurementReport), "not a TID 1500 report"
    slices = {}
    for group in report.get_planar_roi_measurement_groups():
        if str(group.tracking_identifier) in skip:
            continue
        region = group.roi
        assert region is not None, f"{group.tracking_identifier}: no Image Region"
        ref = region.ContentSequence[0].ReferencedSOPSequence[0]
        slices[str(group.tracking_identifier)] = str(ref.ReferencedSOPInstanceUID)
    return slices


def outline_on_edge(line: list[Any], state: dict[str, Any], study: ViewerStudy, name: str) -> float:
    """Fraction of the vertices of a drawn outline that fall on the edge of a vertebra.

    ``line`` is an entry of :data:`SR_DRAWN` ``lines``; ``state`` is :data:`VIEWPORT_STATE`
    with the plane points of the shown slice (as in :func:`check_overlay`). Each vertex is
    mapped back to the slice's pixel grid; it is on the edge when it lies within 0.2 pixel
    of a pixel corner that touches both pixels of the vertebra in the pipeline's label
    map (what the SEG and the SR were written from) and pixels of something else.
    """
    k = slice_index_of(state, study)
    left, top = float(state["rect"][0]), float(state["rect"][1])
    scale = float(state["scale"])
    origin, along_col, along_row = (np.array(p, float) / scale for p in state["canvas"])
    inverse = np.linalg.inv(np.stack([along_col - origin, along_row - origin], axis=1))
    numbers = [float(v) for v in re.split(r"[ ,]+", str(line[2]).strip()) if v]
    page = np.array(numbers).reshape(-1, 2) + np.array([float(line[0]), float(line[1])])
    col, row = inverse @ (page - [left, top] - origin).T
    corners = np.stack([col + 0.5, row + 0.5], axis=1)  # SCOORD: pixel corners are integers
    mask = np.pad(study.label_map[k] == int(name[1]), 1)
    # corner (x, y) touches pixels (y - 1 .. y, x - 1 .. x): index y .. y + 1 once padded
    near = np.abs(corners - np.rint(corners)).max(axis=1) < 0.2
    on_edge = 0
    for x, y in np.rint(corners[near]).astype(int):
        if 0 <= x < mask.shape[1] - 1 and 0 <= y < mask.shape[0] - 1:
            touching = mask[y : y + 2, x : x + 2]
            on_edge += bool(touching.any() and not touching.all())
    return on_edge / len(corners)


@dataclass
class OverlayCheck:
    """Coloured pixels of each segment in a screenshot, judged against the truth."""

    slice_index: int  # volume slice shown
    pixels: dict[str, int]  # segment -> coloured pixels seen
    inside: dict[str, float]  # segment -> fraction inside that vertebra's bone (truth)


EDGE = 40
"""Pixels along the canvas edges left out of :func:`check_overlay`."""


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in [0, 1) of RGB pixels (an alpha blend with grey keeps the hue)."""
    rgb = rgb.astype(float)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = np.where(mx - mn == 0, 1, mx - mn)
    h = np.where(mx == r, (g - b) / d % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return np.asarray(h / 6.0 % 1.0)


def check_overlay(
    shot: np.ndarray, state: dict[str, Any], study: ViewerStudy, *, dilate: int = 1
) -> OverlayCheck:
    """Where the viewer drew each segment's colour, against the truth of the shown slice.

    ``state`` is :data:`VIEWPORT_STATE` evaluated with the world positions of voxels
    (0, 0), (0, 1) and (1, 0) of the shown slice: the canvas mapping of the slice plane
    follows from them. Every screen pixel of the image is mapped back to its voxel; a
    pixel is coloured when its channels differ by more than 60 (the CT is grey) and it
    belongs to the segment whose colour has the nearest hue (within 0.04). Its truth is
    the phantom's label of that vertebra, grown by ``dilate`` voxels in plane (an outline
    is drawn on the edge of the segment). A band of ``EDGE`` pixels along the canvas edges
    is left out: the viewer draws its frame and buttons there, in blue.
    """
    from scipy import ndimage

    from dicom_node.writers.common import VERTEBRA_COLORS

    k = slice_index_of(state, study)
    left, top, width, height = state["rect"]
    scale = float(state["scale"])
    origin, along_col, along_row = (np.array(p, float) / scale for p in state["canvas"])
    # canvas = origin + col * (along_col - origin) + row * (along_row - origin)
    basis = np.stack([along_col - origin, along_row - origin], axis=1)  # 2x2: (x, y) per (c, r)
    inverse = np.linalg.inv(basis)
    ys, xs = np.mgrid[0 : int(height), 0 : int(width)]
    canvas_xy = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5]) - origin[:, None]
    col, row = np.rint(inverse @ canvas_xy)
    truth = study.labels[k]
    rows, cols = truth.shape
    ok = (row >= 0) & (row < rows) & (col >= 0) & (col < cols)
    ys, xs = ys.ravel(), xs.ravel()
    ok &= (xs >= EDGE) & (xs < int(width) - EDGE) & (ys >= EDGE) & (ys < int(height) - EDGE)
    y0, x0 = round(top), round(left)
    region = shot[y0 : y0 + int(height), x0 : x0 + int(width)].reshape(-1, 3)
    chroma = region.max(1).astype(int) - region.min(1)
    hue = _hue(region)
    pixels, inside = {}, {}
    for n, name in enumerate(VERTEBRA_COLORS, start=1):
        colour = np.array(VERTEBRA_COLORS[name], float)[None]
        dh = np.abs(hue - _hue(colour)[0])
        mine = ok & (chroma > 60) & (np.minimum(dh, 1 - dh) < 0.04)
        if not mine.any():
            continue
        grown = ndimage.binary_dilation(truth == n, iterations=dilate) if dilate else truth == n
        hits = grown[row[mine].astype(int), col[mine].astype(int)]
        pixels[name], inside[name] = int(mine.sum()), float(hits.mean())
    return OverlayCheck(k, pixels, inside)


def slice_index_of(state: dict[str, Any], study: ViewerStudy) -> int:
    """Volume slice index of the image a viewport shows (from its SOP Instance UID)."""
    match = SOP_IN_IMAGE_ID.search(str(state["imageId"]))
    if not match or match.group(1) not in study.sop_uids:
        raise AssertionError(f"the viewport shows {state['imageId']}, not a slice of the study")
    return study.sop_uids.index(match.group(1))


def plane_points(study: ViewerStudy, k: int) -> list[list[float]]:
    """World positions (mm) of voxels (k, 0, 0), (k, 0, 1) and (k, 1, 0)."""
    return [
        [float(v) for v in (study.affine @ np.array([k, r, c, 1.0]))[:3]]
        for r, c in ((0, 0), (0, 1), (1, 0))
    ]


@dataclass
class ViewerSession:
    """Orthanc with DICOMweb, OHIF in front of it and Chromium, for one study.

    ``with ViewerSession(workdir) as s:`` builds the study (:func:`build_study`), stores
    the CT and the node's outputs in Orthanc and starts the browser; everything stops
    on exit.
    """

    workdir: Path
    seed: int = 7
    study: ViewerStudy | None = None
    orthanc: Orthanc | None = None
    server: ViewerServer | None = None
    browser: Chromium | None = None
    tour_checked: bool = False
    """The welcome tour was waited for once (a skipped tour stays away for the profile)."""

    def __enter__(self) -> ViewerSession:
        dist = ohif_dist()
        self.study = build_study(self.workdir / "study", self.seed)
        try:
            self.orthanc = dicomweb_orthanc(self.workdir / "orthanc").start()
            upload(self.orthanc, [*self.study.ct_paths, *self.study.outputs.values()])
            self.server = ViewerServer(dist, self.orthanc.url).start()
            self.browser = Chromium(self.workdir / "chromium").start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for part in (self.browser, self.server, self.orthanc):
            if part is not None:
                part.stop()

    @property
    def page(self) -> Chromium:
        assert self.browser is not None
        return self.browser

    @property
    def truth(self) -> ViewerStudy:
        assert self.study is not None
        return self.study

    def open_study(self, timeout: float = 45.0, study_uid: str | None = None) -> None:
        """The viewer's URL for the study (or another one stored in the same Orthanc);
        waits for the first image and, the first time, skips the tour (later calls click
        it away only if it shows; :meth:`open_series` does the same)."""
        assert self.server is not None
        uid = study_uid or self.truth.study_uid
        self.page.navigate(f"{self.server.url}/viewer?StudyInstanceUIDs={uid}")
        self.page.wait_for(VIEWPORT_STATE % "[]", timeout, "the study's first image")
        skip_all = FIND_TEXT % json.dumps("Skip all")
        try:  # a fresh profile gets OHIF's welcome tour over the viewport
            if self.tour_checked:
                tour = self.page.evaluate(skip_all)
                if not tour:
                    return
            else:
                self.tour_checked = True
                tour = self.page.wait_for(skip_all, 10, "the tour")
        except AssertionError:
            return
        self.page.click(*tour)
        self.page.pump(0.5)

    def open_series(self, modality: str, shown: str, timeout: float = 45.0) -> None:
        """Double-click the study browser's entry of a series (by its modality label), as
        a radiologist does, until the JavaScript expression ``shown`` holds
        (:func:`shows_image`, :data:`SEGMENTATION_SHOWN`, :data:`SR_LOADED`).

        A double-click that lands while the page is still busy (the welcome tour, a
        thumbnail being laid out) is lost; it is tried again every few seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            tour = self.page.evaluate(FIND_TEXT % json.dumps("Skip all"))
            if tour:
                self.page.click(*tour)
                self.page.pump(0.5)
            where = self.page.evaluate(FIND_TEXT % json.dumps(modality))
            if where:
                x, y = where
                self.page.click(x, y, count=2)
            last = time.monotonic() + 6.0 >= deadline
            try:
                wait = max(min(6.0, deadline - time.monotonic()), 0.1)
                self.page.wait_for(shown, wait, f"the {modality} series opened in the viewer")
            except AssertionError:
                if last:
                    raise
                continue
            self.settle()
            return

    def open_tag_browser(self, modality: str, search: str) -> str:
        """OHIF's Tag Browser for a series (the study browser entry's ``...`` menu), its
        search box filled with ``search``; the text of all its rows (the list is virtual,
        so it is scrolled through and read part by part)."""
        row = (
            "[...document.querySelectorAll('[data-cy^=\"study-browser-thumbnail\"]')]"
            f".find((e) => e.innerText.trim().startsWith({json.dumps(modality + chr(10))}))"
        )
        centre = (
            "const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2];"
        )
        search_box = (
            "(() => { const e = document.querySelector('input[placeholder=\"Search metadata\"]');"
            f" if (!e) return null; {centre} }})()"
        )
        menu_item = (
            "(() => { const e = [...document.querySelectorAll('body *')].filter((x) =>"
            " x.innerText && x.innerText.trim() === 'Tag Browser'"
            " && x.getBoundingClientRect().width > 0).pop();"
            f" if (!e) return null; {centre} }})()"
        )
        for _ in range(4):  # a click while the page is busy is lost: try again
            where = self.page.wait_for(
                f"(() => {{ const e = {row}; if (!e) return null; {centre} }})()", 10, modality
            )
            # the menu button shows while the pointer is over the entry
            self.page.call("Input.dispatchMouseEvent", type="mouseMoved", x=1, y=1)
            self.page.call("Input.dispatchMouseEvent", type="mouseMoved", x=where[0], y=where[1])
            try:
                button = self.page.wait_for(
                    f"(() => {{ const e = ({row} || document.body).querySelector("
                    f"'[data-cy$=\"-btn\"]'); if (!e || !e.getBoundingClientRect().width)"
                    f" return null; {centre} }})()",
                    3,
                    "",
                )
            except AssertionError:
                button = None
            if button:
                self.page.click(*button)
                self.page.pump(0.5)
            item = self.page.evaluate(menu_item)
            if item:
                self.page.click(*item)
                self.page.pump(1.0)
            box = self.page.evaluate(search_box)
            if box:
                break
            self.page.call("Input.dispatchKeyEvent", type="keyDown", key="Escape")
            self.page.pump(0.5)
        else:
            box = self.page.wait_for(search_box, 5, f"the Tag Browser of the {modality}")
        self.page.click(*box)
        self.page.call("Input.insertText", text=search)
        self.page.pump(1.5)
        return str(self.page.evaluate(SCROLLED_TEXT % json.dumps(search)))

    def close_dialog(self) -> None:
        """Close an open dialog (the Tag Browser) with its Close button."""
        where = self.page.evaluate(FIND_TEXT % json.dumps("Close"))
        if where:
            self.page.click(*where)
            self.page.pump(0.5)

    def state(self, k: int | None = None) -> dict[str, Any]:
        """:data:`VIEWPORT_STATE`, with the plane points of slice ``k`` (the shown one)."""
        if k is None:
            k = slice_index_of(self.page.evaluate(VIEWPORT_STATE % "[]"), self.truth)
        return dict(self.page.evaluate(VIEWPORT_STATE % json.dumps(plane_points(self.truth, k))))

    def show_slice(self, k: int) -> None:
        """Scroll the viewport to volume slice ``k`` (the mouse wheel's effect)."""
        sop = self.truth.sop_uids[k]
        self.page.evaluate(
            "(() => { const v = window.cornerstone.getEnabledElements()[0].viewport;"
            f" const i = v.getImageIds().findIndex((id) => id.includes({json.dumps(sop)}));"
            " return v.setImageIdIndex(i).then(() => i); })()"
        )
        self.settle()

    def settle(self) -> None:
        """Let the page draw what it was told to: a few animation frames, then a moment
        for the segmentation layer, which follows the image by a frame or two."""
        for _ in range(3):
            self.page.evaluate(
                "new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))"
            )
            self.page.pump(0.3)

    def sr_placements(self) -> dict[str, list[Any]]:
        """Where OHIF put each SR finding: tracking identifier -> [placed on an image,
        the SOP Instance UID of that image (``None`` for a 3D one), SCOORD value type]."""
        found = self.page.evaluate(
            "(() => { const ds = window.services.displaySetService.getActiveDisplaySets()"
            ".find((d) => d.Modality === 'SR');"
            " if (!ds || !ds.measurements) return null;"
            " return ds.measurements.map((m) => [m.TrackingIdentifier, [m.loaded,"
            " m.ReferencedSOPInstanceUID || null, (m.coords[0] || {}).ValueType || null]]);"
            " })()"
        )
        return {str(name): list(where) for name, where in found or []}

    def sr_measurements(self) -> dict[str, list[str]]:
        """What OHIF read from the SR: tracking identifier -> its labels (``label value``)."""
        found = self.page.evaluate(
            "(() => { const ds = window.services.displaySetService.getActiveDisplaySets()"
            ".find((d) => d.Modality === 'SR');"
            " if (!ds || !ds.measurements) return null;"
            " return ds.measurements.map((m) => [m.TrackingIdentifier,"
            " (m.labels || []).map((l) => `${l.label} ${l.value}`)]); })()"
        )
        return {str(name): [str(x) for x in labels] for name, labels in found or []}


SUMMARY_BOX = """(() => {
  const v = window.cornerstone.getEnabledElements()[0].viewport;
  const d = v.getImageData();
  const [cols, rows] = d.dimensions;
  const r = v.canvas.getBoundingClientRect();
  const s = v.canvas.width / r.width;
  const a = v.worldToCanvas(d.imageData.indexToWorld([-0.5, -0.5, 0]));
  const b = v.worldToCanvas(d.imageData.indexToWorld([cols - 0.5, rows - 0.5, 0]));
  return [r.left + a[0] / s, r.top + a[1] / s, r.left + b[0] / s, r.top + b[1] / s, rows, cols];
})()"""
"""Page rectangle (left, top, right, bottom) where the viewport draws its image, and the
image's size."""


def summary_difference(shot: np.ndarray, box: list[float], summary: np.ndarray) -> float:
    """Mean absolute difference (0-255) between the summary image the node wrote and the
    part of the screenshot where the viewer drew it (resampled to the same size)."""
    import PIL.Image

    left, top, right, bottom = (round(x) for x in box[:4])
    drawn = shot[top:bottom, left:right].astype(float)
    wanted = PIL.Image.fromarray(summary).resize(
        (drawn.shape[1], drawn.shape[0]), PIL.Image.Resampling.BILINEAR
    )
    return float(np.abs(drawn - np.asarray(wanted, float)).mean())


def click_selector(page: Chromium, selector: str, timeout: float = 10.0) -> None:
    """Click the centre of the first element matching a CSS selector."""
    where = page.wait_for(
        f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
        " if (!e) return null; const r = e.getBoundingClientRect();"
        " return [r.x + r.width / 2, r.y + r.height / 2]; })()",
        timeout,
        selector,
    )
    page.click(*where)
    page.pump(1.0)
