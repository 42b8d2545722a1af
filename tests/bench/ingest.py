"""Ingest benchmark: dcmtk storescu sends the same series to our node, storescp and Orthanc.

Run with ``make bench`` (or ``python -m tests.bench.ingest``). For each transfer syntax
(explicit VR little endian, JPEG Lossless) and each sender count (1, 4), every run sends
the series to each of the three receivers one after another (the order rotates from run
to run), each receiver freshly started on an empty folder of the same disk. Prints
images/s and MB/s (median, min, max of the runs) and our ratio to each reference.

Environment: ``CSPINE_BENCH_RUNS`` (default 3), ``CSPINE_BENCH_SLICES`` (default 300),
``CSPINE_BENCH_TMP`` (folder for the series and the receivers' storage; default the
system temporary folder).
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from config.settings import auto_receivers

# dcmtk reads TCP_NODELAY from the environment: without it Nagle's algorithm and
# delayed ACKs cap every receiver near 22 images/s. Orthanc's DICOM server is dcmtk's
# (Debian links the system libdcmnet), so it gets the same variable.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
EXTRA_ENV = {k: v for k, v in os.environ.items() if k.startswith("CSPINE_STORAGE__")}
RUNS = int(os.environ.get("CSPINE_BENCH_RUNS", "3"))
SLICES = int(os.environ.get("CSPINE_BENCH_SLICES", "300"))
TMP = os.environ.get("CSPINE_BENCH_TMP") or None
RECEIVERS = (
    "cspine",
    "cspine-catalog",
    "cspine-1r",
    "cspine-syncfs",
    "storescp",
    "orthanc",
)
OURS = ("cspine", "cspine-catalog", "cspine-1r", "cspine-syncfs")
"""``cspine``: ``cspine serve`` with the defaults (answered from the ingest journal; two
receiver processes per usable core, ``node.receivers = 0``); ``cspine-catalog``: with
``storage.acknowledge = "catalog"`` (answered once the catalog row is committed);
``cspine-1r``: the defaults with ``node.receivers = 1`` (measured with several senders
only: one association is served by one process either way); ``cspine-syncfs``: the
defaults with ``storage.journal_flush = "filesystem"`` (one ``syncfs`` per entry instead
of a file and a folder flush)."""
ENV_OF = {
    "cspine-catalog": {"CSPINE_STORAGE__ACKNOWLEDGE": "catalog"},
    "cspine-1r": {"CSPINE_NODE__RECEIVERS": "1"},
    "cspine-syncfs": {"CSPINE_STORAGE__JOURNAL_FLUSH": "filesystem"},
}
ONE_RECEIVER = ("cspine-1r",)
"""Kinds measured with several senders only (with one sender they equal ``cspine``)."""
REFERENCES = ("storescp", "orthanc")
SYNTAXES = ("explicit", "jpeg-lossless")
SENDERS = (1, 4)

# Orthanc with its default durability, stated explicitly: SQLite index, every file
# fsynced (SyncStorageArea, the default since 1.7.4), no compression, no plugins.
# Anyone may store (the bench's storescu calls as STORESCU from loopback).
ORTHANC_BENCH_CONFIG = {
    "SyncStorageArea": True,
    "StorageCompression": False,
    "Plugins": [],
    "DicomAlwaysAllowStore": True,
    "DicomCheckModalityHost": False,
}


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


def _wait_listening(log: Path, processes: int, timeout: float = 60) -> None:
    """Until ``processes`` receiver processes have logged that they listen."""
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count("listening ae_title") < processes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{processes} receiver(s) never listened: see {log}")
        time.sleep(0.1)


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
    cataloged: list[float] = field(default_factory=list)
    """Ours: seconds from the first association to the last instance in the catalog."""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float:
        """Images per second at the median time."""
        return self.images / self.median

    @property
    def rates(self) -> tuple[float, float, float]:
        """Images per second: median, min, max over the runs."""
        return self.rate, self.images / max(self.seconds), self.images / min(self.seconds)


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


@dataclass
class Running:
    """A started receiver: where to send, how many instances it holds, how to stop it."""

    port: int
    called: str
    count: Callable[[], int]
    stop: Callable[[], None]


def _stop_proc(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def start_receiver(kind: str, target: Path, senders: int) -> Running:
    """Start ``kind`` storing into ``target`` and wait until it accepts associations."""
    if kind == "orthanc":
        from tests.interop.orthanc import Orthanc

        orthanc = Orthanc(target, extra=ORTHANC_BENCH_CONFIG, env={"TCP_NODELAY": "1"})
        orthanc.start()
        wait_port(orthanc.dicom_port)
        return Running(
            orthanc.dicom_port,
            orthanc.aet,
            lambda: int(orthanc.get("/statistics")["CountInstances"]),
            orthanc.stop,
        )
    port = free_port()
    extra_env = ENV_OF.get(kind, {})
    if kind in OURS:
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
    elif kind == "storescp":
        cmd = ["storescp", "+xa", *(["--fork"] if senders > 1 else []), "-od", str(target)]
        cmd.append(str(port))
        called = "STORESCP"
    else:
        raise ValueError(f"receiver must be one of {RECEIVERS}, got {kind!r}")
    # INFO: the node logs one line per association and per listening process (the
    # instances are logged at DEBUG), so the bench can wait for every receiver
    log_path = target.with_name(target.name + ".log")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**DCMTK_ENV, "CSPINE_LOGGING__LEVEL": "INFO", **EXTRA_ENV, **extra_env},
        )
    try:
        wait_port(port)
        if kind in OURS:
            _wait_listening(log_path, 1 if kind in ONE_RECEIVER else auto_receivers())
    except RuntimeError:
        _stop_proc(proc)
        raise

    def count() -> int:
        if kind == "storescp":
            return sum(1 for p in target.rglob("*") if p.is_file())
        con = sqlite3.connect(target / "catalog.sqlite")
        try:
            return int(con.execute("select count(*) from instances").fetchone()[0])
        finally:
            con.close()

    return Running(port, called, count, lambda: _stop_proc(proc))


def measure(kind: str, folder: Path, senders: int, target: Path) -> tuple[float, float | None]:
    """One timed send of ``folder`` to a fresh ``kind``; checks every instance was stored.

    Returns
    -------
    tuple
        Seconds to the last C-STORE response, and (ours) to the last catalog row.
    """
    expected = sum(1 for _ in folder.iterdir())
    target.mkdir(parents=True)
    running = start_receiver(kind, target, senders)
    stopped = False
    cataloged = None
    try:
        t0 = time.perf_counter()
        seconds = send(folder, running.port, running.called, senders)
        if kind in OURS:
            deadline = time.perf_counter() + 60
            while running.count() < expected and time.perf_counter() < deadline:
                time.sleep(0.005)
            cataloged = time.perf_counter() - t0
            running.stop()  # the final count is read once the node has closed its catalog
            stopped = True
        stored = running.count()
    finally:
        if not stopped:
            running.stop()
        shutil.rmtree(target, ignore_errors=True)
    if stored != expected:
        raise RuntimeError(f"{kind} stored {stored} of {expected} instances")
    return seconds, cataloged


def ratios(results: list[Result]) -> list[tuple[str, int, str, float, str]]:
    """``(syntax, senders, reference, ours/reference, ours)`` in images per second
    (medians); ``ours`` is one of :data:`OURS`."""
    out = []
    for r in results:
        if r.name not in OURS:
            continue
        for ref_name in REFERENCES:
            ref = [
                x
                for x in results
                if x.name == ref_name and x.syntax == r.syntax and x.senders == r.senders
            ]
            if ref:
                out.append((r.syntax, r.senders, ref_name, r.rate / ref[0].rate, r.name))
    return out


def main() -> list[Result]:
    work = Path(tempfile.mkdtemp(prefix="cspine-bench-", dir=TMP))
    try:
        results = []
        for syntax in SYNTAXES:
            folder = make_series(work / "series", syntax)
            images = sum(1 for _ in folder.iterdir())
            mbytes = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
            for senders in SENDERS:
                kinds = tuple(k for k in RECEIVERS if senders > 1 or k not in ONE_RECEIVER)
                seconds: dict[str, list[float]] = {k: [] for k in kinds}
                cataloged: dict[str, list[float]] = {k: [] for k in kinds}
                for run in range(RUNS):
                    k = run % len(kinds)
                    order = kinds[k:] + kinds[:k]
                    for kind in order:
                        target = work / f"{kind}-{syntax}-{senders}-{run}"
                        sent, in_catalog = measure(kind, folder, senders, target)
                        seconds[kind].append(sent)
                        if in_catalog is not None:
                            cataloged[kind].append(in_catalog)
                for kind in kinds:
                    r = Result(
                        kind, syntax, senders, seconds[kind], images, mbytes, cataloged[kind]
                    )
                    results.append(r)
                    med, lo, hi = r.rates
                    runs = " ".join(f"{s:.2f}" for s in r.seconds)
                    print(
                        f"{r.name:<9} {r.syntax:<14} senders={senders} {med:7.1f} img/s "
                        f"(min {lo:.1f}, max {hi:.1f}) {r.mbytes / r.median:7.1f} MB/s  "
                        f"runs={runs} s"
                        + (
                            f" cataloged after {statistics.median(r.cataloged):.2f} s"
                            if r.cataloged
                            else ""
                        ),
                        flush=True,
                    )
        print()
        for syntax, senders, ref, ratio, ours in ratios(results):
            print(f"ratio {ours}/{ref} {syntax} senders={senders}: {ratio:.2f}")
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
