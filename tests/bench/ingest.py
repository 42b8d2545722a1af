"""Ingest benchmark: dcmtk storescu sends the same series to our node and to dcmtk storescp.

Run with ``make bench`` (or ``python -m tests.bench.ingest``). Prints images/s, MB/s,
and our ratio to each reference measured in the same run.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# dcmtk reads TCP_NODELAY from the environment: without it Nagle's algorithm and
# delayed ACKs cap every receiver near 22 images/s.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
EXTRA_ENV = {k: v for k, v in os.environ.items() if k.startswith("CSPINE_STORAGE__")}
RUNS = int(os.environ.get("CSPINE_BENCH_RUNS", "3"))
SLICES = int(os.environ.get("CSPINE_BENCH_SLICES", "300"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} never opened")


def make_series(root: Path, syntax: str) -> Path:
    """A synthetic 512x512 neck CT series of SLICES slices."""
    from ai.synthetic import StudySpec, generate_study, write_series

    study = generate_study(2024, StudySpec(n_slices=SLICES, extra_series=False))
    out = root / syntax
    write_series(study, out, syntax)
    return out


@dataclass
class Result:
    name: str
    syntax: str
    senders: int
    seconds: list[float]
    images: int
    mbytes: float

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float:
        return self.images / self.median


def send(folder: Path, port: int, called: str, senders: int) -> float:
    files = sorted(folder.iterdir())
    chunks = [files[i::senders] for i in range(senders)]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", called, "-xs", "127.0.0.1", str(port), *map(str, chunk)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=DCMTK_ENV,
        )
        for chunk in chunks
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - t0


def run_receiver(kind: str, folder: Path, senders: int, work: Path) -> Result:
    files = list(folder.iterdir())
    mbytes = sum(f.stat().st_size for f in files) / 1e6
    seconds = []
    for run in range(RUNS):
        port = free_port()
        target = work / f"{kind}-{run}-{senders}"
        target.mkdir()
        if kind == "cspine":
            cmd = [
                sys.executable,
                "-m",
                "dicom_node",
                "serve",
                "--data-dir",
                str(target),
                "--port",
                str(port),
                "--no-worker",
                "--stable-seconds",
                "3600",
            ]
            called = "CSPINE"
        else:
            cmd = [
                "storescp",
                "+xa",
                "--fork" if senders > 1 else "-v",
                "-od",
                str(target),
                str(port),
            ]
            cmd = [c for c in cmd if c != "-v"]
            called = "STORESCP"
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**DCMTK_ENV, "CSPINE_LOGGING__LEVEL": "WARNING", **EXTRA_ENV},
        )
        try:
            wait_port(port)
            seconds.append(send(folder, port, called, senders))
        finally:
            proc.terminate()
            proc.wait(30)
            shutil.rmtree(target, ignore_errors=True)
    return Result(kind, folder.name, senders, seconds, len(files), mbytes)


def main() -> list[Result]:
    work = Path(tempfile.mkdtemp(prefix="cspine-bench-"))
    try:
        results = []
        for syntax in ("explicit", "jpeg-lossless"):
            folder = make_series(work / "series", syntax)
            for senders in (1, 4) if syntax == "explicit" else (1,):
                for kind in ("storescp", "cspine"):
                    r = run_receiver(kind, folder, senders, work)
                    results.append(r)
                    runs = " ".join(f"{s:.2f}" for s in r.seconds)
                    print(
                        f"{r.name:<9} {r.syntax:<14} senders={senders} {r.rate:7.1f} img/s "
                        f"{r.mbytes / r.median:7.1f} MB/s  runs={runs}",
                        flush=True,
                    )
        print()
        for syntax in ("explicit", "jpeg-lossless"):
            for senders in (1, 4):
                ours = [
                    r
                    for r in results
                    if r.name == "cspine" and r.syntax == syntax and r.senders == senders
                ]
                ref = [
                    r
                    for r in results
                    if r.name == "storescp" and r.syntax == syntax and r.senders == senders
                ]
                if ours and ref:
                    print(
                        f"ratio cspine/storescp {syntax} senders={senders}: "
                        f"{ours[0].rate / ref[0].rate:.2f}"
                    )
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
