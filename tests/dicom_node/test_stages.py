"""The job path as named stages: order, early endings, one read of each header, one
door to storage, and the result record the worker writes and ``cspine results`` reads."""

from __future__ import annotations

import ast
import json
from collections import Counter
from pathlib import Path

import pydicom
import pytest

from dicom_node import stages
from dicom_node.jobs import job_result_lines, result_lines
from dicom_node.result import JobResult
from dicom_node.stages import JobContext, JobFacts
from storage.jobs import study_jobs
from storage.models import JobState
from tests.dicom_node.test_jobs import TruthPipeline, _complete, _node

ROOT = Path(__file__).resolve().parents[2]

DONE_ROW = {
    "series_instance_uid": "1.2.3",
    "selection": "series #2 chosen",
    "patient_probability": 0.9,
    "threshold": 0.5,
    "vertebrae": [
        {
            "label": "C1",
            "visible": True,
            "assessed": True,
            "probability": 0.9,
            "reason": None,
            "reason_code": None,
            "ood_score": None,
        },
        {
            "label": "C2",
            "visible": True,
            "assessed": False,
            "probability": None,
            "reason": "input unlike the training data",
            "reason_code": "ood",
            "ood_score": 3.0,
        },
    ],
    "findings": [{"code": "ood", "stage": "stage2", "check": "ood", "message": "C2 3.0 > 2.0"}],
    "models": [
        {"name": "seg", "version": "1", "sha256": "ab" * 32, "description": "d", "demo": True}
    ],
    "timings": {"select": 0.1, "load": 0.2, "stage1": 1.0, "stage2": 0.5, "write": 0.3},
    "geometry_issues": ["gap"],
    "slices": 40,
    "outputs": {"seg": "1.1", "sr": "1.2", "summary": "1.3"},
}
NOT_PROCESSED_ROWS = [
    {"not_processed": "no eligible series (no series)"},
    {
        "not_processed": "no cervical spine found",
        "series_instance_uid": "1.2.3",
        "selection": "series #2 chosen",
        "findings": [],
        "models": DONE_ROW["models"],
        "timings": {"select": 0.1},
    },
]
FAILED_ROW = {"failed": "internal error", "job_id": 7}


@pytest.mark.parametrize("row", [DONE_ROW, *NOT_PROCESSED_ROWS, FAILED_ROW])
def test_result_record_reads_and_writes_the_stored_json_unchanged(row):
    text = json.dumps(row)
    record = JobResult.from_json(text)
    assert record.to_json() == text  # same keys, same order, same values


def test_result_record_of_an_older_row_reads_with_defaults():
    old = {k: v for k, v in DONE_ROW.items() if k not in ("geometry_issues", "slices")}
    old["vertebrae"] = [{"label": "C3", "assessed": False, "probability": None}]
    record = JobResult.from_json(json.dumps(old))
    assert record.outcome == "done" and record.slices is None and record.geometry_issues == ()
    (v,) = record.vertebrae
    assert v.label == "C3" and v.visible is None and v.reason_code is None
    assert JobResult.from_json(None).outcome == "done"


class _Job:
    def __init__(self, state: JobState, result_json: str | None) -> None:
        self.id, self.version, self.state, self.result_json = 3, 2, state, result_json


def test_results_table_from_a_record():
    lines = list(job_result_lines(_Job(JobState.DONE, json.dumps(DONE_ROW))))
    assert lines[0] == "job 3 version 2: DONE"
    assert "C1        yes             0.900  FRACTURE" in lines
    assert any(
        line.startswith("C2        no") and "not assessed: input unlike" in line for line in lines
    )
    assert "threshold: 0.5" in lines
    assert "check failed (stage2, ood): C2 3.0 > 2.0" in lines
    assert any("[synthetic demo weights, not for clinical use]" in line for line in lines)
    assert lines[-1].startswith("timings: select 0.10s")
    refused = list(
        job_result_lines(_Job(JobState.NOT_PROCESSED, json.dumps(NOT_PROCESSED_ROWS[1])))
    )
    assert refused[1:] == ["not processed: no cervical spine found"]
    assert list(job_result_lines(None, _Job(JobState.RUNNING, None))) == ["no result yet (RUNNING)"]
    assert list(job_result_lines(None)) == ["no result yet (no job)"]


def test_the_job_path_is_six_named_stages():
    names = [s.name for s in stages.job_path(lambda: None)]
    assert names == ["select", "load", "infer", "write", "store", "complete"]
    assert [s.name for s in stages.ENDING] == ["write", "store", "complete"]


def test_a_job_ended_early_skips_the_analysis_stages(tmp_path):
    ran: list[str] = []

    class Probe:
        def __init__(self, name: str, after_end: bool, end: bool = False) -> None:
            self.name, self.after_end, self._end = name, after_end, end

        def __call__(self, ctx: JobContext) -> None:
            ran.append(self.name)
            if self._end:
                ctx.not_processed("stop here")

    settings, _catalog, _store, worker = _node_without_study(tmp_path)
    import datetime as dt

    ctx = JobContext(JobFacts(1, 1, 1, dt.datetime(2024, 1, 1)), settings, worker.storage)
    probes = [
        Probe("a", False),
        Probe("b", False, end=True),
        Probe("c", False),
        Probe("d", True),
    ]
    stages.run(ctx, probes)  # type: ignore[arg-type]
    assert ran == ["a", "b", "d"]
    assert ctx.end is not None and ctx.end.reason == "stop here"
    assert ctx.end.state is JobState.NOT_PROCESSED


def _node_without_study(tmp_path):  # type: ignore[no-untyped-def]
    from dicom_node.receive import open_node_storage
    from dicom_node.worker import Worker
    from tests.dicom_node.conftest import make_settings

    settings = make_settings(tmp_path)
    catalog, store = open_node_storage(settings)
    return settings, catalog, store, Worker(settings, catalog, store, lambda: None)


def test_each_header_is_parsed_once_per_job(tmp_path, monkeypatch, study):
    _settings, catalog, store, worker = _node(tmp_path, study)
    _complete(catalog)
    headers: Counter[Path] = Counter()
    pixels: Counter[Path] = Counter()
    real = pydicom.dcmread

    def counting(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(path, Path) and store.root in path.parents:
            (headers if kwargs.get("stop_before_pixels") else pixels)[path] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    assert worker.run_once()
    (job,) = study_jobs(catalog, 1)
    assert job.state is JobState.DONE, job.reason
    stored = {p for p in (store.root).rglob("*.dcm") if "outputs" not in p.parts}
    assert set(headers) == stored  # every stored file's header read (by the selection) ...
    assert set(headers.values()) == {1}  # ... once
    chosen = set(pixels)
    assert chosen and set(pixels.values()) == {1}  # the chosen series' pixels, once each
    lines = list(result_lines(catalog, 1))
    assert lines[0] == f"job {job.id} version 1: DONE"
    assert JobResult.from_json(job.result_json).slices == len(chosen)


def test_failed_job_record_names_only_the_job(tmp_path, study):
    class Broken:
        def run(self, vol):  # type: ignore[no-untyped-def]
            raise RuntimeError("stage 1 exploded")

    settings, catalog, store, _ = _node(tmp_path, study)
    from dicom_node.worker import Worker

    worker = Worker(settings, catalog, store, pipeline_factory=Broken)
    _complete(catalog)
    assert worker.run_once()
    (job,) = study_jobs(catalog, 1)
    assert job.state is JobState.FAILED
    assert json.loads(job.result_json or "") == {"failed": "internal error", "job_id": job.id}
    assert list(result_lines(catalog, 1)) == ["no result yet (FAILED)"]


def test_pipeline_refusal_keeps_its_details_in_the_record(tmp_path, study):
    class Refusing(TruthPipeline):
        def run(self, vol):  # type: ignore[no-untyped-def]
            result = super().run(vol)
            result.not_processed = "no cervical spine found"
            return result

    settings, catalog, store, _ = _node(tmp_path, study)
    from dicom_node.worker import Worker

    worker = Worker(settings, catalog, store, pipeline_factory=lambda: Refusing(study))
    _complete(catalog)
    assert worker.run_once()
    (job,) = study_jobs(catalog, 1)
    assert job.state is JobState.NOT_PROCESSED and job.reason == "no cervical spine found"
    row = json.loads(job.result_json or "")
    assert list(row) == [
        "not_processed",
        "series_instance_uid",
        "selection",
        "findings",
        "models",
        "timings",
    ]
    assert job.series_instance_uid == row["series_instance_uid"]
    assert [o.kind for o in job.outputs] == ["sr"]


def _storage_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] == "storage"
        ):
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "storage"}
    return found


def test_the_job_path_reaches_storage_through_one_module():
    types_only = {
        "storage.Catalog",
        "storage.FileStore",
        "storage.models.JobState",
        "storage.jobs.NewOutput",
    }
    files = [
        ROOT / "dicom_node" / "worker.py",
        *sorted((ROOT / "dicom_node" / "stages").glob("*.py")),
    ]
    calls = {
        str(f.relative_to(ROOT)): sorted(_storage_imports(f) - types_only)
        for f in files
        if _storage_imports(f) - types_only
    }
    assert list(calls) == ["dicom_node/stages/store.py"]


@pytest.fixture
def study():  # type: ignore[no-untyped-def]
    from ai.synthetic import StudySpec, generate_study

    return generate_study(
        11, StudySpec.small(fracture_rate=1.0, extra_series=True, patient_position="FFS")
    )
