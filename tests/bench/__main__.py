"""``make bench``: run the benchmarks and write docs/performance.md.

Benchmarks are not tests: they measure, print ratios against the reference tools run in
the same session, and record the machine, versions and commands.

Environment (defaults are the full benchmark)::

    CSPINE_BENCH_RUNS=3               ingest runs per receiver and configuration
    CSPINE_BENCH_SLICES=300           slices of the ingest series
    CSPINE_BENCH_STUDIES=150,300,600,1200   turnaround study sizes
    CSPINE_BENCH_RSS_STUDIES=10       studies in the receiver-RSS series
    CSPINE_BENCH_RSS_SLICES=300       slices of each study of the RSS series
    CSPINE_BENCH_STABLE=2             stable window of the turnaround node (seconds)
    CSPINE_BENCH_DOC=docs/performance.md    where the report is written
    CSPINE_BENCH_TMP=                 folder for series and receivers' storage

A quick functional run (not a measurement)::

    CSPINE_BENCH_RUNS=1 CSPINE_BENCH_SLICES=30 CSPINE_BENCH_STUDIES=150 \\
    CSPINE_BENCH_RSS_STUDIES=3 CSPINE_BENCH_RSS_SLICES=40 CSPINE_BENCH_DOC=/tmp/perf.md \\
    python -m tests.bench

Turnaround studies must show a whole cervical spine: shorter ones are not processed by
the node (series selection needs 40 mm of coverage, and the plausibility gate refuses a
40-slice synthetic study whose C2 the field of view cuts), so use 150 slices or more.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

from config.settings import AUTO_RECEIVERS_MAX, auto_receivers
from tests.bench import ingest, ingest_costs, turnaround

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = {
    "CSPINE_BENCH_RUNS": "3",
    "CSPINE_BENCH_SLICES": "300",
    "CSPINE_BENCH_STUDIES": "150,300,600,1200",
    "CSPINE_BENCH_RSS_STUDIES": "10",
    "CSPINE_BENCH_RSS_SLICES": "300",
    "CSPINE_BENCH_STABLE": "2",
}
DOC = Path(os.environ.get("CSPINE_BENCH_DOC") or ROOT / "docs" / "performance.md")

# targets of issue #9
INGEST_VS_ORTHANC = 1.0
INGEST_VS_STORESCP = 0.5  # stretch
TURNAROUND_CPU_300_S = 20.0
TURNAROUND_GPU_300_S = 3.0
LINEAR_EXPONENT_MAX = 1.2
WORKER_PEAK_1200_MB = 2500.0
RSS_FLAT_FRACTION = 0.05

STAGE_LABELS = {
    "wait_for_stability_s": "stable window",
    "queue_s": "queue",
    "select_s": "select",
    "load_s": "load/decode",
    "stage1_s": "stage 1",
    "gate_s": "gate",
    "stage2_s": "stage 2",
    "write_s": "write",
    "send_s": "send",
    "total_excl_stable_s": "total excl. stable",
}


def _env(name: str) -> str:
    return os.environ.get(name) or DEFAULTS[name]


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).splitlines()[0].strip()
    except Exception:
        return "not installed"


def _cpuinfo() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mem_total_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def _filesystem(path: str) -> str:
    try:
        out = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", path],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return " ".join(out.stdout.split()) or "unknown"
    except Exception:
        return "unknown"


def _orthanc_version() -> str:
    try:
        from tests.interop.orthanc import orthanc_version

        return orthanc_version()
    except Exception as exc:
        return f"not available ({exc})"


def _exponent(sizes: list[int], times: list[float]) -> float | None:
    """Least-squares slope of log(time) against log(slices); None if undefined."""
    pts = [(math.log(n), math.log(t)) for n, t in zip(sizes, times, strict=True) if t > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None


def _verdict_at_least(measured: float | None, target: float) -> str:
    if measured is None:
        return "not measured"
    if measured >= target:
        return "met"
    return f"missed: {measured / target:.2f} of the target (needs {target / measured:.1f}x)"


def _verdict_below(measured: float | None, target: float, unit: str) -> str:
    if measured is None:
        return "not measured"
    if measured < target:
        return "met"
    return f"missed by {measured - target:.2f} {unit} ({measured / target:.2f}x the target)"


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def ingest_section(results: list[ingest.Result]) -> list[str]:
    lines = [
        "## Ingest",
        "",
        f"dcmtk `storescu -xs` sends the same synthetic {ingest.SLICES}-slice 512x512 series "
        "to the receivers one after another in the same run (the order rotates from run to "
        "run; each receiver starts fresh on an empty folder of the same disk; `TCP_NODELAY=1` "
        "for every dcmtk process, Orthanc's DICOM server included). With 4 senders the files "
        "are split round-robin over 4 concurrent `storescu` processes. Time: first "
        "association request to the last C-STORE response; afterwards the bench checks that "
        f"each receiver holds every instance. {ingest.RUNS} run(s) per cell.",
        "",
        "- **cspine**: `cspine serve --no-worker` with the defaults: two receiver processes "
        f"per usable core (`node.receivers = 0`: {auto_receivers()} here), "
        'fsync on, `storage.acknowledge = "journal"` (every 0x0000 is answered once the '
        "validated file is flushed into the ingest journal, file and folder; the applier "
        "process hashes, places and catalogs it behind the answer).",
        "- **cspine-catalog**: the same with `CSPINE_STORAGE__ACKNOWLEDGE=catalog` (every "
        "0x0000 waits for the file at its content address and the SQLite commit, all "
        "flushed): the node before the journal, measured in the same run.",
        "- **cspine-1r**: the defaults with `CSPINE_NODE__RECEIVERS=1` (one receiver "
        "process); with several senders only.",
        "- **cspine-syncfs**: the defaults with `CSPINE_STORAGE__JOURNAL_FLUSH=filesystem` "
        "(each journal entry made durable by one `syncfs(2)` of the store's filesystem "
        "after its rename, instead of a flush of the file and one of the folder: meant "
        "for a store on a filesystem of its own).",
        "- **storescp**: dcmtk `storescp +xa [--fork] -od DIR`: writes files, no fsync, no index.",
        "- **orthanc**: Debian's Orthanc with a generated configuration: SQLite index, "
        "`SyncStorageArea: true` (fsync of every file, the default since 1.7.4), "
        "`StorageCompression: false`, no plugins, `DicomThreadsCount` default (4), storage "
        "and index on the same disk. Orthanc 1.10.1 has no configuration option for "
        "Nagle's algorithm on its DICOM port (`TcpNoDelay` is for its HTTP server); its "
        "DICOM server is dcmtk's and reads `TCP_NODELAY=1` from the environment.",
        "",
        "The last column (ours) is the time from the first association request until the "
        "catalog holds every instance (polled every 5 ms).",
        "",
        "| receiver | transfer syntax | senders | img/s median | img/s min | img/s max "
        "| MB/s median | s median | s min | s max | all cataloged, s median |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        med, lo, hi = r.rates
        cataloged = f"{statistics.median(r.cataloged):.2f}" if r.cataloged else ""
        lines.append(
            f"| {r.name} | {r.syntax} | {r.senders} | {med:.1f} | {lo:.1f} | {hi:.1f} "
            f"| {r.mbytes / r.median:.1f} | {r.median:.2f} | {min(r.seconds):.2f} "
            f"| {max(r.seconds):.2f} | {cataloged} |"
        )
    lines += [
        "",
        "Ratios, ours / reference (images per second at the median time):",
        "",
        "| receiver | transfer syntax | senders | ours / storescp | ours / Orthanc |",
        "|---|---|---|---|---|",
    ]
    table: dict[tuple[str, str, int], dict[str, float]] = {}
    for syntax, senders, ref, ratio, ours in ingest.ratios(results):
        table.setdefault((ours, syntax, senders), {})[ref] = ratio
    for (ours, syntax, senders), refs in table.items():
        lines.append(
            f"| {ours} | {syntax} | {senders} | {_fmt(refs.get('storescp'))} "
            f"| {_fmt(refs.get('orthanc'))} |"
        )
    return lines + INGEST_LIMITS


INGEST_LIMITS = [
    "",
    "### What limits ingest",
    "",
    (
        "- **Python CPU per instance.** The receiver spends a few ms of CPU per 512x512 "
        "instance reading PDUs, spooling, parsing the header with pydicom and flushing "
        "(the cost table below); a plain C-STORE no longer passes through pynetdicom's "
        "state machine, queues and events. With one sender each instance waits for the "
        "receiver's CPU, then for its two flushes; with four, one receiver process is "
        "CPU-bound on one core (one interpreter lock)."
    ),
    (
        '- **The ingest journal (the default, `storage.acknowledge = "journal"`).** The '
        "answer waits for one data flush of the validated file and one flush of the "
        "journal's folder; hashing, placing the file at its content address and the "
        "catalog commit run behind the answer in the applier process, "
        "`storage.apply_batch` entries at a time (64: their names flushed together, one "
        "commit for all). While instances keep arriving it holds back (after a 50 ms "
        "pause in arrivals it applies, or once its oldest entry waited "
        "`storage.apply_delay_seconds`, 2 s), so during a burst the receivers keep the "
        "cores and the disk, and it runs at `storage.applier_nice` (19). The "
        "cspine-catalog rows are the "
        "same node answering after the commit: the difference between the two rows is "
        "what the journal bought. The last column shows when the catalog caught up."
    ),
    (
        "- **One interpreter lock per process.** By default (`node.receivers = 0`) "
        "`cspine serve` starts two receiver processes per usable core (at most "
        f"{AUTO_RECEIVERS_MAX}), which spread the associations: a busier receiver lets a "
        "less busy one accept first. The cspine-1r rows are one process for all senders. "
        "On two cores the receivers share the CPU with the applier and the senders; the "
        "model in the next section projects more cores from the measured costs."
    ),
    (
        "- **Durability per 0x0000.** cspine answers 0x0000 only after the file's data and "
        "its name in the journal are flushed (a power cut loses nothing acknowledged): two "
        'flushes by default, one `syncfs` with `storage.journal_flush = "filesystem"` '
        "(the cspine-syncfs rows); Orthanc flushes each stored file (not its folder) and "
        "its SQLite index only at checkpoints. Count "
        "it with `.venv/bin/python -m tests.bench.sync_calls 100` (strace of Orthanc, the "
        "receiver and the applier, and the catalog mode, over the same 100 instances)."
    ),
    (
        "- **Done in this code** (measure with `make bench`): the ingest journal with its "
        "applier process (batched, held back while instances arrive) and start-up "
        "replay, two receiver processes per usable core by "
        "default with one association count shared by them (`dicom_node/assoc_count.py`), "
        "a plain C-STORE served on the thread that "
        "reads its association (`dicom_node/scp.py` `InlineStore`: no state machine, "
        "queue hand-offs, primitives or events; anything else goes through pynetdicom), "
        "plain header values decoded from their raw bytes (`dicom_node/validate.py`), "
        "a C-STORE success response written directly "
        "(`dicom_node/store_rsp.py`, byte-identical to pynetdicom's, without its two "
        "pydicom encodes), C-STORE data sets spooled with plain descriptor writes and a "
        "directly encoded File Meta (`dicom_node/store_rq.py`, byte-identical to "
        "pynetdicom's), the catalog look-up before each answer as one compiled read on a "
        "pooled SQLite connection, an optional single `syncfs` per journal entry "
        "(`storage.journal_flush`), whole-PDU socket reads and an event wake-up instead of "
        "pynetdicom's 1 ms polls, folder and file fsyncs issued in parallel, group commit "
        "of concurrent catalog writes, a cross-process writer queue, balanced accepts over "
        "receivers, prebuilt SQL on the hot path, success statuses without a status data "
        "set, and capped glibc malloc arenas with periodic trimming in the receiver. Tried "
        "and dropped, no gain within the run-to-run spread: hashing the file in a thread "
        "beside the header parse (the two contend for the interpreter lock), folder fsyncs "
        "after the file's instead of beside it, and the journal's two flushes issued "
        "together after the rename (no gain beyond the spread; it would also let a crash "
        "leave a renamed entry whose data never reached the disk)."
    ),
]


def turnaround_table(rows: list[dict]) -> list[str]:
    keys = ["receive_s", *STAGE_LABELS, "turnaround_s"]
    labels = ["receive", *STAGE_LABELS.values(), "turnaround"]
    lines = [
        "| slices | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    for row in rows:
        lines.append(
            f"| {row['slices']} | " + " | ".join(f"{row.get(k, 0.0):.2f}" for k in keys) + " |"
        )
    for row in rows:
        if "not_processed" in row:
            lines.append(
                f"\n{row['slices']} slices: the node ended the study NOT_PROCESSED (its "
                f"one output, the not-processed SR, timed): {row['not_processed']}"
            )
    return lines


def growth_lines(rows: list[dict]) -> tuple[list[str], dict[str, float | None]]:
    """Seconds per 100 slices per stage across sizes and exponents b (time ~ slices^b)."""
    sizes = [int(r["slices"]) for r in rows]
    header = " / ".join(str(n) for n in sizes)
    lines = [
        f"Cost growth, seconds per 100 slices at {header} slices; `b` is the exponent of "
        "time ~ slices^b fitted over all sizes, `b (last two)` between the two largest "
        "(b = 1 is linear; a fixed cost gives b < 1; superlinear stages have b > 1):",
        "",
        "| stage | s per 100 slices | b | b (last two) |",
        "|---|---|---|---|",
    ]
    tail: dict[str, float | None] = {}
    for key, label in STAGE_LABELS.items():
        times = [float(r.get(key, 0.0)) for r in rows]
        per100 = " / ".join(f"{100 * t / n:.3f}" for t, n in zip(times, sizes, strict=True))
        b_all = _exponent(sizes, times)
        b_tail = _exponent(sizes[-2:], times[-2:]) if len(sizes) >= 2 else None
        tail[key] = b_tail
        lines.append(f"| {label} | {per100} | {_fmt(b_all)} | {_fmt(b_tail)} |")
    return lines, tail


def memory_section(cpu_rows: list[dict], gpu_rows: list[dict], rss: dict) -> list[str]:
    lines = [
        "## Memory",
        "",
        "Peak resident set size (`VmHWM` in `/proc/<pid>/status`, MB = 10^6 bytes) of the "
        "receiver (`cspine serve`) and of its worker child (found through the process tree), "
        "one fresh node per study size, read after the last output was acknowledged; models "
        "loaded included.",
        "",
        "| slices | device | receiver peak MB | worker peak MB |",
        "|---|---|---|---|",
    ]
    for row in cpu_rows + gpu_rows:
        lines.append(
            f"| {row['slices']} | {row['device']} | {row['receiver_peak_mb']:.0f} "
            f"| {row['worker_peak_mb']:.0f} |"
        )
    after = rss["after"]
    lines += [
        "",
        f"Receiver and worker RSS (`VmRSS`, MB) over {rss['studies']} consecutive studies "
        f"into one node: the same {rss['slices']}-slice series each time with new Study, "
        "Series and SOP Instance UIDs, read after each study's three outputs were delivered "
        "to the loopback PACS.",
        "",
        "| after study | receiver MB | worker MB |",
        "|---|---|---|",
        f"| start (models loaded) | {rss['start'].get('receiver_mb', 0):.1f} "
        f"| {rss['start'].get('worker_mb', 0):.1f} |",
    ]
    for i, sample in enumerate(after, 1):
        lines.append(
            f"| {i} | {sample.get('receiver_mb', 0):.1f} | {sample.get('worker_mb', 0):.1f} |"
        )
    growth = _rss_growth(rss)
    lines += [
        "",
        f"Receiver growth: start to last {growth['from_start']:+.1f} MB; after study 1 to "
        f"after study {len(after)} {growth['steady']:+.1f} MB "
        f"({100 * growth['steady_fraction']:+.1f} %). Peaks over the series: receiver "
        f"{rss['receiver_peak_mb']:.0f} MB, worker {rss['worker_peak_mb']:.0f} MB.",
    ]
    return lines


def _rss_growth(rss: dict) -> dict[str, float]:
    after = [s.get("receiver_mb", 0.0) for s in rss["after"]]
    start = rss["start"].get("receiver_mb", 0.0)
    steady = after[-1] - after[0] if after else 0.0
    return {
        "from_start": (after[-1] - start) if after else 0.0,
        "steady": steady,
        "steady_fraction": steady / after[0] if after and after[0] else 0.0,
    }


def _row(rows: list[dict], slices: int) -> dict | None:
    found = [r for r in rows if int(r["slices"]) == slices]
    return found[0] if found else None


def targets_section(
    results: list[ingest.Result],
    cpu_rows: list[dict],
    gpu_rows: list[dict],
    gpu_name: str | None,
    tail: dict[str, float | None],
    rss: dict,
    processed: list[dict],
) -> list[str]:
    """The targets table; ``processed``: the CPU rows the growth was fitted over."""
    lines = [
        "## Targets",
        "",
        "Issue #9's targets against this run's figures.",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
    ]
    by_reference = sorted(ingest.ratios(results), key=lambda r: r[2] != "orthanc")
    for syntax, senders, ref, ratio, ours in by_reference:
        target = INGEST_VS_ORTHANC if ref == "orthanc" else INGEST_VS_STORESCP
        name = "Orthanc" if ref == "orthanc" else "storescp (stretch)"
        lines.append(
            f"| ingest ({ours}) {syntax}, {senders} sender(s) >= {target:.1f}x {name} "
            f"| {ratio:.2f}x | {_verdict_at_least(ratio, target)} |"
        )
    sizes = ", ".join(str(r["slices"]) for r in cpu_rows)
    cpu300 = _row(cpu_rows, 300)
    t300 = float(cpu300["total_excl_stable_s"]) if cpu300 else None
    lines.append(
        f"| turnaround 300 slices, CPU, excl. stable window < {TURNAROUND_CPU_300_S:g} s "
        f"| {f'{t300:.2f} s' if t300 is not None else f'not run (sizes {sizes})'} "
        f"| {_verdict_below(t300, TURNAROUND_CPU_300_S, 's')} |"
    )
    gpu300 = _row(gpu_rows, 300)
    if gpu_name is None:
        lines.append(
            f"| turnaround 300 slices, H100, excl. stable window < {TURNAROUND_GPU_300_S:g} s "
            "| n/a: no GPU in this run | n/a |"
        )
    else:
        note = "" if "H100" in gpu_name else f" (on {gpu_name}, not an H100)"
        measured = gpu300["total_excl_stable_s"] if gpu300 else None
        lines.append(
            f"| turnaround 300 slices, H100, excl. stable window < {TURNAROUND_GPU_300_S:g} s "
            f"| {_fmt(measured)} s{note} "
            f"| {_verdict_below(measured, TURNAROUND_GPU_300_S, 's')} |"
        )
    if len(processed) >= 2:
        last = processed[-1]
        big = int(last["slices"])
        relevant = {
            k: b
            for k, b in tail.items()
            if b is not None and k != "wait_for_stability_s" and float(last.get(k, 0.0)) >= 0.5
        }
        worst = max(relevant, key=lambda k: relevant[k]) if relevant else None
        total_b = tail.get("total_excl_stable_s")
        measured = f"total b = {_fmt(total_b)}" + (
            f"; steepest stage of >= 0.5 s: {STAGE_LABELS[worst]} b = {relevant[worst]:.2f}"
            if worst
            else ""
        )
        b_max = max(relevant.values()) if relevant else (total_b or 0.0)
        verdict = (
            "met"
            if b_max <= LINEAR_EXPONENT_MAX
            else f"missed: b = {b_max:.2f} > {LINEAR_EXPONENT_MAX}"
        )
        lines.append(
            f"| cost growth close to linear (b <= {LINEAR_EXPONENT_MAX} between the two "
            f"largest sizes processed, CPU, {int(processed[-2]['slices'])} -> {big} slices) "
            f"| {measured} | {verdict} |"
        )
    else:
        lines.append("| cost growth close to linear | not measured (one size) | not measured |")
    cpu1200 = _row(cpu_rows, 1200)
    peak = cpu1200["worker_peak_mb"] if cpu1200 else None
    lines.append(
        f"| worker peak RSS at 1,200 slices < {WORKER_PEAK_1200_MB / 1000:g} GB "
        f"| {_fmt(peak, '.0f') + ' MB' if peak is not None else f'not run (sizes {sizes})'} "
        f"| {_verdict_below(peak, WORKER_PEAK_1200_MB, 'MB')} |"
    )
    growth = _rss_growth(rss)
    n = rss["studies"]
    excess = 100 * (abs(growth["steady_fraction"]) - RSS_FLAT_FRACTION)
    flat = excess <= 0
    lines.append(
        f"| receiver RSS flat over 10 studies (after study 1 to the last within "
        f"{100 * RSS_FLAT_FRACTION:g} %) | {growth['steady']:+.1f} MB "
        f"({100 * growth['steady_fraction']:+.1f} %) over {n} studies "
        f"| {'met' if flat else f'missed by {excess:.1f} percentage points'}"
        f"{'' if n >= 10 else f' (only {n} studies)'} |"
    )
    return lines


def scale_out_section() -> list[str]:
    """SQLite against PostgreSQL, 1 and 2 receivers, 1, 2 and 4 workers, in this same run
    (``python -m tests.bench.scale_out``, which starts its own PostgreSQL)."""
    cmd = [sys.executable, "-m", "tests.bench.scale_out"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    lines = ["## Scale-out on PostgreSQL", "", "`python -m tests.bench.scale_out`, same run.", ""]
    if out.returncode != 0:
        return [*lines, f"Not measured: it exited {out.returncode}: {out.stderr.strip()[-300:]}"]
    return [*lines, *out.stdout.rstrip().splitlines()]


def main() -> None:
    sizes = [int(x) for x in _env("CSPINE_BENCH_STUDIES").split(",")]
    rss_studies = int(_env("CSPINE_BENCH_RSS_STUDIES"))
    rss_slices = int(_env("CSPINE_BENCH_RSS_SLICES"))
    started = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()
    gpu_name = turnaround.cuda_device()

    results = ingest.main()
    costs = ingest_costs.main([])
    cpu_rows = turnaround.main([str(n) for n in sizes], devices=["cpu"])
    gpu_rows = turnaround.main([str(n) for n in sizes], devices=["cuda"]) if gpu_name else []
    rss = turnaround.main_rss(rss_studies, rss_slices)
    load_end = os.getloadavg()

    quick = {k: os.environ[k] for k in DEFAULTS if os.environ.get(k, DEFAULTS[k]) != DEFAULTS[k]}
    knobs = " ".join(f"{k}={v}" for k, v in quick.items())
    lines = ["# Performance", ""]
    if quick:
        lines += [
            f"**Quick functional run ({knobs}): not the benchmark; figures are not "
            "comparable with the targets.**",
            "",
        ]
    lines += [
        f"Written by `make bench` on {started:%Y-%m-%d %H:%M} UTC "
        f"(finished {dt.datetime.now(dt.UTC):%H:%M} UTC).",
        "",
        "## Machine and versions",
        "",
        f"- {platform.platform()}; {_cpuinfo()}, {os.cpu_count()} logical CPUs, "
        f"{_mem_total_gb():.1f} GB memory; Python {platform.python_version()}",
        f"- bench folder on {_filesystem(ingest.TMP or tempfile.gettempdir())}",
        f"- load average (1 min) {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end",
        f"- GPU: {gpu_name or 'none (torch.cuda.is_available() is False)'}",
        f"- pynetdicom {version('pynetdicom')}, pydicom {version('pydicom')}, "
        f"torch {version('torch')}, monai {version('monai')}, numpy {version('numpy')}, "
        f"SQLAlchemy {version('sqlalchemy')}",
        f"- dcmtk: {_tool_version(['storescp', '--version'])}",
        f"- Orthanc: {_orthanc_version()} (Debian package)",
        "",
        "## Commands",
        "",
        "`make bench` (= `.venv/bin/python -m tests.bench`) with "
        + (f"`{knobs}`" if knobs else "the defaults")
        + ". Knobs: `CSPINE_BENCH_RUNS` (ingest runs, default 3), `CSPINE_BENCH_SLICES` "
        "(ingest series, default 300), `CSPINE_BENCH_STUDIES` (turnaround sizes, "
        "default 150,300,600,1200), `CSPINE_BENCH_RSS_STUDIES` (default 10), "
        "`CSPINE_BENCH_RSS_SLICES` (default 300), "
        "`CSPINE_BENCH_STABLE` (default 2), `CSPINE_BENCH_DOC` (output, default "
        "docs/performance.md), `CSPINE_BENCH_TMP` (work folder). Parts: "
        "`python -m tests.bench.ingest`, `python -m tests.bench.ingest_costs`, "
        "`python -m tests.bench.turnaround 300 1200`.",
        "",
        "Processes run by the bench (all on 127.0.0.1, `TCP_NODELAY=1` for dcmtk):",
        "",
        "- `python -m dicom_node serve --data-dir DIR --port P --no-worker "
        "--stable-seconds 3600` (ingest)",
        "- `storescp +xa [--fork] -od DIR P`",
        "- `Orthanc orthanc.json` (configuration generated by `tests/interop/orthanc.py` "
        f"plus `{json.dumps(ingest.ORTHANC_BENCH_CONFIG)}`, environment `TCP_NODELAY=1`)",
        "- `storescu -aec AET -xs 127.0.0.1 P FILES...` (1 or 4 at once)",
        "- `python -m dicom_node serve --data-dir DIR --port P --stable-seconds "
        f"{turnaround.STABLE:g} --destination PACS@127.0.0.1:P` with "
        "`CSPINE_MODELS__DEVICE=cpu` (or `cuda`), and `storescu -aec CSPINE +sd 127.0.0.1 "
        "P FOLDER` (turnaround, memory)",
        "",
    ]
    lines += ingest_section(results)
    lines += ["", *costs]
    lines += [
        "",
        "## Turnaround",
        "",
        "Last instance acknowledged (dcmtk `storescu`) to last output (SEG, SR, summary) "
        "acknowledged by a loopback pynetdicom PACS; `cspine serve --stable-seconds "
        f"{turnaround.STABLE:g}` with the shipped demo models, a fresh node per size whose "
        "worker has loaded its models before the study is sent. One run per size; seconds. "
        "Stable window, queue and send come from the catalog's timestamps; select, "
        "load/decode, stage 1, stage 2 and write from the job's own timings; total excl. "
        "stable = turnaround - stable window.",
        "",
        "### CPU",
        "",
    ]
    lines += turnaround_table(cpu_rows)
    # growth is fitted over the studies the node processed: a NOT_PROCESSED one skips
    # stage 2 and the writers, and would fake a flat cost
    processed = [r for r in cpu_rows if "not_processed" not in r]
    growth, tail = growth_lines(processed)
    if len(processed) < len(cpu_rows):
        left_out = ", ".join(str(r["slices"]) for r in cpu_rows if "not_processed" in r)
        growth = [f"Left out of the growth fit (not processed): {left_out} slices.", "", *growth]
    lines += ["", *growth, ""]
    lines += ["### GPU", ""]
    if gpu_rows:
        lines += [f"Same runs with `CSPINE_MODELS__DEVICE=cuda` on {gpu_name}.", ""]
        lines += turnaround_table(gpu_rows)
        gpu_growth, _ = growth_lines(gpu_rows)
        lines += ["", *gpu_growth]
    else:
        lines += ["No GPU was available to this run: there is no GPU figure."]
    lines += [""]
    lines += memory_section(cpu_rows, gpu_rows, rss)
    lines += [""]
    lines += targets_section(results, cpu_rows, gpu_rows, gpu_name, tail, rss, processed)
    lines += [""]
    lines += scale_out_section()
    lines += [""]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines))
    print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
