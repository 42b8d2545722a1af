"""A node catalog with a finished job whose outputs wait in the outbox, and a dcmtk PACS."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from config import Settings, load_settings
from dicom_node import destinations as destination_rows
from dicom_node.receive import Receiver, open_node_storage
from storage import Catalog, FileStore
from storage.catalog import mark_complete, receiving_studies
from storage.jobs import NewOutput, claim_next, complete_job
from storage.models import JobState
from tests.conftest import free_port
from tests.dicom_node.conftest import make_settings
from tests.helpers import ct_slice, write_series

KINDS = ("seg", "sr", "summary")


def content_key(ds: pydicom.Dataset) -> str:
    """sha256 of a received dataset's pixel bytes and UID: equal for identical objects."""
    return hashlib.sha256(bytes(ds.PixelData) + str(ds.SOPInstanceUID).encode()).hexdigest()


@dataclass
class OutboxNode:
    settings: Settings
    catalog: Catalog
    store: FileStore
    sent: dict[str, str]  # SOP Instance UID -> content key of each output


def with_destinations(tmp_path: Path, destinations: list[dict], **sections: dict) -> Settings:
    base = make_settings(tmp_path, **sections).model_dump(mode="json")
    return load_settings(overrides={**base, "destinations": destinations}, environ={})


def complete_study(settings, folder: Path, slices: int) -> tuple:
    """Import a ``slices``-slice series and mark its study complete (its job is queued).

    Returns ``(catalog, store)``.
    """
    catalog, store = open_node_storage(settings)
    destination_rows.sync(settings, catalog)  # what `cspine serve` does when it starts
    receiver = Receiver(settings, catalog, store, environ={})
    for path in write_series(folder, slices):
        assert receiver.accept(path, consume=False).status == 0
    ((study_id, seen),) = receiving_studies(catalog)
    assert mark_complete(catalog, study_id, seen, "test")
    return catalog, store


def outbox_node(tmp_path: Path, destinations: list[dict], **sections: dict) -> OutboxNode:
    """Receive a small study, finish its job with three outputs queued for delivery."""
    settings = with_destinations(tmp_path, destinations, **sections)
    catalog, store = complete_study(settings, tmp_path / "source", 3)
    job = claim_next(catalog, "test-host:1")
    assert job is not None
    outputs, sent = [], {}
    series_uid = generate_uid()
    for i, kind in enumerate(KINDS):
        ds = ct_slice(generate_uid(), series_uid, i, seed=7)
        data = _encode(ds)
        rel = store.write_output(job.id, f"{kind}.dcm", data)
        outputs.append(
            NewOutput(
                kind=kind,
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                series_instance_uid=series_uid,
                file_path=rel,
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
        sent[str(ds.SOPInstanceUID)] = content_key(ds)
    complete_job(catalog, job.id, JobState.DONE, "test", outputs)
    return OutboxNode(settings, catalog, store, sent)


def _encode(ds: pydicom.Dataset) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class Storescp:
    """dcmtk ``storescp`` as a destination PACS, optionally with a fault switch."""

    def __init__(self, out: Path, port: int | None = None) -> None:
        self.out = out
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def destination(self) -> dict:
        return {"ae_title": "DCMTKPACS", "host": "127.0.0.1", "port": self.port}

    def start(self, *fault: str) -> Storescp:
        self.out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["storescp", "+uf", "-aet", "DCMTKPACS", "-od", str(self.out), *fault, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # listening (an echo might be refused)
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("storescp did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def received(self) -> dict[str, set[str]]:
        """SOP Instance UID -> content keys of every file stored."""
        out: dict[str, set[str]] = {}
        for path in self.out.rglob("*"):
            if path.is_file():
                ds = pydicom.dcmread(path)
                out.setdefault(str(ds.SOPInstanceUID), set()).add(content_key(ds))
        return out
