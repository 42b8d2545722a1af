"""Peak RSS of the worker processing one N-slice 512x512 study, stage by stage (not a test).

Run: ``.venv/bin/python -m tests.bench.bench_worker_memory [--truth] [SLICES ...]`` (default
600 1200). With ``--truth`` the label map the demo model returns is replaced, before the
writers run, by the synthetic truth (all seven vertebrae, so the SEG has 7 x SLICES frames:
the writers' worst case; the demo model finds fewer vertebrae on large series).

For each size the parent writes a synthetic study (the series of
:func:`tests.bench.turnaround.write_study`, cached in ``$CSPINE_BENCH_TMP`` or the system
temp folder), ingests it into a fresh node folder with :class:`dicom_node.receive.Receiver`
and queues its job. A fresh child process (``--child DATA_DIR``) then builds the worker
exactly as ``cspine worker`` does (shipped demo models, CPU), loads the models and runs
one job with :meth:`dicom_node.worker.Worker.run_once`.

In the child, the worker's steps are wrapped so that the kernel's peak resident set size
(``VmHWM``) is read and reset (``/proc/self/clear_refs`` = 5) at every step boundary: each
row is the peak reached *during* that step (``until X`` rows: between the previous step and
X), with the resident size and the wall seconds at its end. The process peak is the largest
row. Linux only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROC_STATUS = Path("/proc/self/status")
ROOT = Path(__file__).resolve().parents[2]
TMP = Path(os.environ.get("CSPINE_BENCH_TMP") or tempfile.gettempdir()) / "cspine-bench-wmem"


def _status_mb() -> tuple[float, float]:
    """``(VmHWM, VmRSS)`` of this process in MB (10^6 bytes)."""
    values = {}
    for line in PROC_STATUS.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(value.split()[0]) * 1024 / 1e6
    return values["VmHWM"], values["VmRSS"]


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class Marks:
    """Peak RSS per step: :meth:`mark` closes the current step and starts the next."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, float]] = []
        self._t = time.perf_counter()
        _reset_peak()

    def mark(self, label: str) -> None:
        """Record the peak since the last mark under ``label`` and reset it."""
        peak, rss = _status_mb()
        now = time.perf_counter()
        self.rows.append((label, peak, rss, now - self._t))
        self._t = now
        _reset_peak()

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        """Replace ``owner.attr`` by a wrapper that marks before and after each call."""
        func = getattr(owner, attr, None)
        if func is None:  # not in this checkout
            return

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.mark(f"until {label}")
            try:
                return func(*args, **kwargs)
            finally:
                self.mark(label)

        setattr(owner, attr, wrapper)


def _settings(data: Path):  # type: ignore[no-untyped-def]
    from config import load_settings

    return load_settings(
        overrides={
            "storage": {"data_dir": str(data), "min_free_bytes": 0},
            "models": {"device": "cpu"},
        },
        environ={},
    )


def truth_labels(slices: int) -> Path:
    """The synthetic truth label map (0 or C1..C7) of the ``slices`` study, as ``.npy``."""
    import numpy as np

    from ai.synthetic import StudySpec, generate_study

    path = TMP / f"truth{slices}.npy"
    if not path.exists():
        study = generate_study(300 + slices, StudySpec(n_slices=slices, fracture_rate=1.0))
        np.save(path, np.where(study.labels <= 7, study.labels, 0).astype(np.uint8))
    return path


def prepare(slices: int) -> Path:
    """Write (or reuse) the series and ingest it into a fresh node folder with a queued job."""
    from dicom_node.receive import Receiver, open_node_storage
    from storage.catalog import mark_complete
    from storage.models import Study
    from tests.bench.turnaround import write_study

    series = TMP / f"series{slices}"
    if not (series / "done").exists():
        shutil.rmtree(series, ignore_errors=True)
        write_study(series, slices, 300 + slices)
        (series / "done").write_text("")
    data = TMP / f"node{slices}"
    shutil.rmtree(data, ignore_errors=True)
    settings = _settings(data)
    catalog, store = open_node_storage(settings)
    receiver = Receiver(settings, catalog, store)
    for path in sorted(series.glob("*.dcm")):
        status = receiver.accept(path, consume=False).status
        assert status == 0, f"{path.name} refused: {status:#06x}"
    with catalog.read() as session:
        count = session.get(Study, 1).received_count
    assert mark_complete(catalog, 1, count, "bench")
    return data


def child(data: Path, truth: Path | None = None) -> dict[str, Any]:
    """Run one job in this process; return the per-step peaks and the job's timings."""
    import torch

    torch.set_num_threads(2)
    import ai.volume
    import dicom_node.worker as worker_mod
    from dicom_node import writers
    from dicom_node.receive import open_node_storage
    from storage.models import Job

    settings = _settings(data)
    catalog, store = open_node_storage(settings)
    worker = worker_mod.Worker(settings, catalog, store)
    pipeline = worker.pipeline  # models loaded, as in run_forever
    if truth is not None:
        import dataclasses

        import numpy as np

        run_pipeline = pipeline.run

        def run_with_truth(vol):  # type: ignore[no-untyped-def]
            result = run_pipeline(vol)
            labels = np.load(truth)
            assert labels.shape == result.label_map.shape
            return dataclasses.replace(result, label_map=labels)

        pipeline.run = run_with_truth
    marks = Marks()
    marks.wrap(ai.volume, "load_series", "load_series")
    import dicom_node.stages.load as load_stage
    import dicom_node.stages.store as store_stage

    # the job path's stages (older checkouts: the worker module)
    marks.wrap(load_stage, "implausible_fraction", "implausible_fraction")
    marks.wrap(worker_mod, "implausible_fraction", "implausible_fraction")
    marks.wrap(pipeline.seg, "predict", "stage 1 (seg.predict)")
    marks.wrap(pipeline.cls, "predict", "stage 2 (cls.predict)")
    # write_summary: what the worker called before it rendered first (older checkouts)
    for name in ("render_summary", "write_seg", "write_sr", "write_summary", "write_summary_image"):
        marks.wrap(writers, name, name)
    marks.wrap(store_stage.JobStorage, "save", "save (encode + store)")
    marks.wrap(worker_mod.Worker, "_save", "_save (encode + store)")
    t0 = time.perf_counter()
    assert worker.run_once(), "no job queued"
    seconds = time.perf_counter() - t0
    marks.mark("until job end")
    with catalog.read() as session:
        job = session.get(Job, 1)
        state, reason = job.state.value, job.reason
        timings = json.loads(job.result_json or "{}").get("timings", {})
    return {
        "state": state,
        "reason": reason,
        "seconds": seconds,
        "timings": timings,
        "rows": marks.rows,
        "peak_mb": max(r[1] for r in marks.rows),
    }


def run(slices: int, truth: bool = False) -> dict[str, Any]:
    """Prepare an ``slices`` study and run the job in a fresh child process."""
    data = prepare(slices)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    extra = [str(truth_labels(slices))] if truth else []
    out = subprocess.run(
        [sys.executable, "-m", "tests.bench.bench_worker_memory", "--child", str(data), *extra],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    shutil.rmtree(data, ignore_errors=True)
    return result


def main(argv: list[str]) -> None:
    """Print the per-step peaks for each size."""
    if argv[:1] == ["--child"]:
        print(json.dumps(child(Path(argv[1]), Path(argv[2]) if len(argv) > 2 else None)))
        return
    truth = "--truth" in argv
    for slices in [int(a) for a in argv if a != "--truth"] or [600, 1200]:
        r = run(slices, truth)
        labels = "truth labels" if truth else "demo-model labels"
        state = f"job {r['state']} ({r['reason']}) in {r['seconds']:.1f} s"
        print(f"\n{slices} slices ({labels}): {state}")
        print(f"  {'step':<32} {'peak MB':>9} {'RSS after MB':>13} {'seconds':>8}")
        for label, peak, rss, seconds in r["rows"]:
            print(f"  {label:<32} {peak:>9.0f} {rss:>13.0f} {seconds:>8.2f}")
        timings = ", ".join(f"{k} {v:.2f}" for k, v in r["timings"].items())
        print(f"  worker peak RSS (VmHWM) {r['peak_mb']:.0f} MB; timings s: {timings}")


if __name__ == "__main__":
    main(sys.argv[1:])
