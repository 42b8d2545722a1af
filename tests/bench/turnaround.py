"""Turnaround: last instance acknowledged -> last output acknowledged by a loopback PACS.

``python -m tests.bench.turnaround [SLICES ...]`` sends a synthetic 512x512 study of each
size with dcmtk storescu to ``cspine serve`` (demo models, CPU unless a GPU is present)
and prints the stage breakdown: receive, stable window, selection, load, stage 1,
stage 2, writing and sending.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.ingest import DCMTK_ENV, free_port, wait_port
from tests.dicom_node.pacs import LoopbackPACS

STABLE = float(os.environ.get("CSPINE_BENCH_STABLE", "2"))


def run(slices: int, work: Path) -> dict[str, float]:
    from ai.synthetic import StudySpec, generate_study, write_series

    study = generate_study(300 + slices, StudySpec(n_slices=slices, fracture_rate=1.0))
    folder = work / f"study{slices}"
    write_series(study, folder, "explicit")
    pacs = LoopbackPACS().start()
    arrivals: list[float] = []
    original = pacs._store

    def timed(event):  # type: ignore[no-untyped-def]
        status = original(event)
        arrivals.append(time.monotonic())
        return status

    pacs._store = timed  # type: ignore[method-assign]
    pacs.stop()
    pacs.start()
    port = free_port()
    data = work / f"var{slices}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "serve",
            "--data-dir",
            str(data),
            "--port",
            str(port),
            "--stable-seconds",
            str(STABLE),
            "--destination",
            pacs.spec,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**DCMTK_ENV, "CSPINE_LOGGING__LEVEL": "WARNING"},
    )
    try:
        wait_port(port)
        time.sleep(8)  # let the worker load its models before the study arrives
        t0 = time.monotonic()
        subprocess.run(
            ["storescu", "-aec", "CSPINE", "+sd", "127.0.0.1", str(port), str(folder)],
            check=True,
            env=DCMTK_ENV,
            capture_output=True,
        )
        t_last_ack = time.monotonic()
        wall_last_ack = time.time()
        deadline = t_last_ack + 900
        while len(arrivals) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        if len(arrivals) < 3:
            raise RuntimeError("outputs did not arrive")
        t_done = max(arrivals)
    finally:
        proc.terminate()
        proc.wait(30)
        pacs.stop()
    con = sqlite3.connect(data / "catalog.sqlite")
    job_id, result_json = con.execute(
        "select id, result_json from jobs order by id desc"
    ).fetchone()
    timings = json.loads(result_json)["timings"]

    def at(sql: str) -> float:
        import datetime as dt

        text = con.execute(sql, (job_id,)).fetchone()[0]
        return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()

    queued = at("select min(at) from job_events where job_id=? and state='QUEUED'")
    running = at("select max(at) from job_events where job_id=? and state='RUNNING'")
    done = at("select max(at) from job_events where job_id=? and state='DONE'")
    sent = at(
        "select max(sent_at) from outbox o join outputs u on o.output_id=u.id where u.job_id=?"
    )
    out = {
        "slices": slices,
        "receive_s": t_last_ack - t0,
        "turnaround_s": t_done - t_last_ack,
        "wait_for_stability_s": queued - wall_last_ack,
        "queue_s": running - queued,
        **{f"{k}_s": v for k, v in timings.items()},
        "send_s": sent - done,
    }
    return out


def main(argv: list[str]) -> list[dict[str, float]]:
    sizes = [int(a) for a in argv] or [300]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cspine-turnaround-") as tmp:
        for n in sizes:
            row = run(n, Path(tmp))
            rows.append(row)
            print(
                json.dumps(
                    {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}
                ),
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
