"""Where the receive path's time goes per instance, and what more cores would give.

Usage::

    .venv/bin/python -m tests.bench.ingest_costs [SENDERS ...]   # default: 1 4

Runs the node's own receive path in this process (the :class:`dicom_node.scp.StorageNode`
and :class:`dicom_node.receive.Receiver` that ``cspine serve`` runs, with its defaults:
fsync on, answered from the ingest journal), wraps each phase with a timer that records
wall time and the calling thread's CPU time (``time.thread_time``), and sends the ingest
bench's 300-slice 512x512 series with dcmtk ``storescu`` (``TCP_NODELAY=1``). Then it
applies the journal the way the applier process does (:class:`dicom_node.apply.Applier`),
timed the same way. Prints, per sender count, Markdown tables of the phases in
milliseconds per instance (wall, CPU, and the difference: waiting for the disk, the lock
or the GIL), the receiver's process CPU, the applier's CPU, the senders' CPU and the time
the catalog's writer lock is held.

From the 4-sender run it builds a throughput model and projects it for 8 and 16 cores
with one receiver process and one applier process per core (``node.receivers``,
``storage.appliers``)::

    rate <= cores / (receiver CPU + applier CPU + sender CPU)   every core busy
    rate <= receivers / receiver CPU            a process runs about one core (its GIL)
    rate <= appliers / applier CPU              an applier runs about one core
    rate <= 1 / catalog lock hold               one SQLite writer at a time

The receiver CPU is taken under load (the 4-sender run: threads contending for one
interpreter lock cost CPU of their own). It prints the 2-core prediction beside the rate
measured in the same run, so the model's error is visible. One sender is latency-bound
(one instance in flight): its rate is 1 / the sum of the phases on the response path,
whatever the core count; the applier works behind the answers, on the other core.

A plain script, not a test; ``make bench`` includes its output in docs/performance.md.
"""

from __future__ import annotations

import functools
import inspect
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.ingest import (  # noqa: E402
    DCMTK_ENV,
    ORTHANC_BENCH_CONFIG,
    TMP,
    free_port,
    make_series,
    wait_port,
)

CORES = (2, 8, 16)
RUNS = int(os.environ.get("CSPINE_BENCH_RUNS", "3"))


@dataclass
class Phase:
    """A timed call site: where it is, what it is called in the table."""

    label: str
    owner: Any
    name: str


@dataclass
class Costs:
    """Measured per-instance costs of one run (milliseconds per instance)."""

    senders: int
    instances: int
    wall_s: float
    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    process_user: float = 0.0
    process_sys: float = 0.0
    sender_cpu: float = 0.0
    lock_hold: float = 0.0
    applier_wall: dict[str, float] = field(default_factory=dict)
    applier_cpu: dict[str, float] = field(default_factory=dict)
    applier_total: float = 0.0
    """CPU of applying the journal (the applier process's work), ms per instance."""

    @property
    def rate(self) -> float:
        """Images per second in this run."""
        return self.instances / self.wall_s

    @property
    def process_cpu(self) -> float:
        return self.process_user + self.process_sys


HANDLER_TOTAL = "  handler total (Receiver.accept)"
JOURNAL_APPEND = "    journal: flush the file, rename, flush the folder"


def _phases() -> list[Phase]:
    """The receiver's phases: the answer waits for every one of them.

    All of them run on the association's reading thread (the DUL's): a plain C-STORE
    is served where its last fragment is read (:class:`dicom_node.scp.InlineStore`).
    """
    import dicom_node.receive as receive
    import dicom_node.scp as scp
    import dicom_node.store_rq as store_rq
    import dicom_node.store_rsp as store_rsp
    from storage.journal import Journal

    return [
        Phase("reader total: PDUs and all done on them", scp.FastAssociationSocket, "read_pdu"),
        Phase("  read: PDU bytes from the socket", scp.FastAssociationSocket, "recv"),
        Phase("  spool: preamble, File Meta, fragments", store_rq.SpoolFile, "write"),
        Phase(HANDLER_TOTAL, receive.Receiver, "accept"),
        Phase("    check: parse and validate the header", receive, "inspect_file"),
        Phase("    lookup: is the UID in the catalog (a read)", receive, "is_known"),
        Phase(JOURNAL_APPEND, Journal, "append"),
        Phase("  response: encode and send the C-STORE-RSP", store_rsp, "send_store_success"),
    ]


APPLY_TOTAL = "applier total (Applier.apply_batch, per entry)"


def _applier_phases() -> list[Phase]:
    """The applier's phases, behind the answers (its own process in ``cspine serve``).

    Entries are applied ``storage.apply_batch`` at a time: the look-up, the flush and
    the catalog transaction are one per batch, shown per entry.
    """
    import dicom_node.apply as apply
    from storage.db import Catalog
    from storage.filestore import FileStore
    from storage.journal import Journal

    return [
        Phase(APPLY_TOTAL, apply.Applier, "apply_batch"),
        Phase("  header: the receiver's, kept with the entry", Journal, "header"),
        Phase("  look-up: which UIDs are cataloged (one read per batch)", apply, "stored_paths"),
        Phase("  hash: sha256 of the file", apply, "sha256_file"),
        Phase("  link: a name at its content address", FileStore, "link_instance"),
        Phase("  flush: the new names, fsynced together (per batch)", FileStore, "flush"),
        Phase("  catalog: one transaction per batch (fsync of the WAL)", Catalog, "write"),
        Phase("  drop: remove the journal entry", Journal, "drop"),
    ]


@contextmanager
def _timed(
    phases: list[Phase], wall: dict[str, float], cpu: dict[str, float], calls: dict[str, int]
) -> Iterator[None]:
    lock = threading.Lock()
    originals = []
    for phase in phases:
        original = getattr(phase.owner, phase.name)
        raw = inspect.getattr_static(phase.owner, phase.name)  # a staticmethod stays one
        originals.append((phase, raw))

        def timed(
            *args: Any, _f: Callable[..., Any] = original, _k: str = phase.label, **kwargs: Any
        ) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return _f(*args, **kwargs)
            finally:
                dt, dc = time.perf_counter() - t0, time.thread_time() - c0
                with lock:
                    wall[_k] += dt
                    cpu[_k] += dc
                    calls[_k] += 1

        wrapped = functools.wraps(original)(timed)
        setattr(
            phase.owner,
            phase.name,
            staticmethod(wrapped) if isinstance(raw, staticmethod) else wrapped,
        )
    try:
        yield
    finally:
        for phase, original in originals:
            setattr(phase.owner, phase.name, original)


@contextmanager
def _lock_hold(into: list[float]) -> Iterator[None]:
    """Sum the wall time spent in ``Catalog._commit_batch`` (run under the writer lock)."""
    from storage.db import Catalog

    original = Catalog._commit_batch

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            into[0] += time.perf_counter() - t0

    Catalog._commit_batch = timed  # type: ignore[method-assign]
    try:
        yield
    finally:
        Catalog._commit_batch = original  # type: ignore[method-assign]


@dataclass
class Reference:
    """Orthanc's costs in the same run (milliseconds per instance)."""

    senders: int
    instances: int
    wall_s: float
    process_cpu: float
    sender_cpu: float

    @property
    def rate(self) -> float:
        """Images per second in this run."""
        return self.instances / self.wall_s


def _proc_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of ``pid`` and its threads (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send(files: list[Path], port: int, called: str, senders: int) -> float:
    """``storescu`` x ``senders`` (files split round-robin); seconds until all are done."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                "storescu",
                "-aec",
                called,
                "-xs",
                "127.0.0.1",
                str(port),
                *map(str, files[i::senders]),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=DCMTK_ENV,
        )
        for i in range(senders)
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-300:]}")
    return time.perf_counter() - t0


def measure_orthanc(series: Path, senders: int, work: Path) -> Reference:
    """Orthanc (the ingest bench's configuration) receiving ``series``: its process CPU."""
    from tests.interop.orthanc import Orthanc

    orthanc = Orthanc(
        work / f"orthanc-{senders}", extra=ORTHANC_BENCH_CONFIG, env={"TCP_NODELAY": "1"}
    )
    orthanc.start()
    files = sorted(series.iterdir())
    try:
        wait_port(orthanc.dicom_port)
        assert orthanc.proc is not None
        time.sleep(1.0)
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu0 = _proc_cpu_s(orthanc.proc.pid)
        seconds = send(files, orthanc.dicom_port, orthanc.aet, senders)
        cpu1 = _proc_cpu_s(orthanc.proc.pid)
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        stored = int(orthanc.get("/statistics")["CountInstances"])
    finally:
        orthanc.stop()
    if stored != len(files):
        raise RuntimeError(f"Orthanc stored {stored} of {len(files)} instances")
    per = 1000.0 / len(files)
    return Reference(
        senders,
        len(files),
        seconds,
        (cpu1 - cpu0) * per,
        (kids1.ru_utime - kids0.ru_utime + kids1.ru_stime - kids0.ru_stime) * per,
    )


def measure(series: Path, senders: int, work: Path) -> Costs:
    """Send ``series`` with ``senders`` storescu to a fresh in-process node; its costs."""
    from config.settings import load_settings
    from dicom_node.apply import Applier
    from dicom_node.receive import Receiver, open_journal, open_node_storage
    from dicom_node.scp import StorageNode

    port = free_port()
    data = work / f"node-{senders}"
    settings = load_settings(
        overrides={
            "storage": {"data_dir": str(data)},
            "node": {"port": port, "host": "127.0.0.1"},
            "completion": {"stable_seconds": 3600},
        },
        environ={"CSPINE_LOGGING__LEVEL": "WARNING"},
    )
    catalog, store = open_node_storage(settings)
    journal = open_journal(settings, store)
    if journal is None:
        raise RuntimeError("the defaults must answer from the ingest journal")
    node = StorageNode(settings, Receiver(settings, catalog, store, journal=journal))
    files = sorted(series.iterdir())
    wall: dict[str, float] = defaultdict(float)
    cpu: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    held = [0.0]
    a_wall: dict[str, float] = defaultdict(float)
    a_cpu: dict[str, float] = defaultdict(float)
    a_calls: dict[str, int] = defaultdict(int)
    spool_dir = tempfile.tempdir  # the node points tempfile at its spool: put it back
    node.start()
    try:
        time.sleep(1.0)  # the scheduler's first ticks, not the instances' cost
        with _timed(_phases(), wall, cpu, calls):
            self0 = resource.getrusage(resource.RUSAGE_SELF)
            kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            seconds = send(files, port, "CSPINE", senders)
            self1 = resource.getrusage(resource.RUSAGE_SELF)
            kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        node.stop()
        # what the applier process does behind the answers, timed alone
        applier = Applier(settings, catalog, store, journal, environ={})
        with _timed(_applier_phases(), a_wall, a_cpu, a_calls), _lock_hold(held):
            c0 = time.thread_time()
            applied = applier.apply_pending()
            applier_cpu_s = time.thread_time() - c0
    finally:
        node.stop()
        catalog.dispose()
        tempfile.tempdir = spool_dir
    n = len(files)
    accepted = calls.get(HANDLER_TOTAL, 0)
    if accepted != n or applied != {"stored": n}:
        raise RuntimeError(f"the node handled {accepted} of {n} instances, applied {applied}")
    per = 1000.0 / n
    return Costs(
        senders=senders,
        instances=n,
        wall_s=seconds,
        wall={k: v * per for k, v in wall.items()},
        cpu={k: v * per for k, v in cpu.items()},
        calls=dict(calls),
        process_user=(self1.ru_utime - self0.ru_utime) * per,
        process_sys=(self1.ru_stime - self0.ru_stime) * per,
        sender_cpu=(kids1.ru_utime - kids0.ru_utime + kids1.ru_stime - kids0.ru_stime) * per,
        lock_hold=held[0] * per,
        applier_wall={k: v * per for k, v in a_wall.items()},
        applier_cpu={k: v * per for k, v in a_cpu.items()},
        applier_total=applier_cpu_s * per,
    )


def median_costs(runs: list[Costs]) -> Costs:
    """Each figure's median over ``runs`` (same sender count)."""

    def med(values: list[float]) -> float:
        return float(statistics.median(values))

    keys = runs[0].wall.keys()
    return Costs(
        senders=runs[0].senders,
        instances=runs[0].instances,
        wall_s=med([r.wall_s for r in runs]),
        wall={k: med([r.wall[k] for r in runs]) for k in keys},
        cpu={k: med([r.cpu[k] for r in runs]) for k in keys},
        calls=runs[0].calls,
        process_user=med([r.process_user for r in runs]),
        process_sys=med([r.process_sys for r in runs]),
        sender_cpu=med([r.sender_cpu for r in runs]),
        lock_hold=med([r.lock_hold for r in runs]),
        applier_wall={k: med([r.applier_wall[k] for r in runs]) for k in runs[0].applier_wall},
        applier_cpu={k: med([r.applier_cpu[k] for r in runs]) for k in runs[0].applier_cpu},
        applier_total=med([r.applier_total for r in runs]),
    )


def median_reference(runs: list[Reference]) -> Reference:
    """Each figure's median over ``runs``."""
    return Reference(
        runs[0].senders,
        runs[0].instances,
        float(statistics.median(r.wall_s for r in runs)),
        float(statistics.median(r.process_cpu for r in runs)),
        float(statistics.median(r.sender_cpu for r in runs)),
    )


def _phase_table(phases: list[Phase], wall: dict[str, float], cpu: dict[str, float]) -> list[str]:
    lines = [
        "| phase | wall ms/instance | CPU ms/instance | waiting ms/instance |",
        "|---|---|---|---|",
    ]
    for phase in phases:
        k = phase.label
        if k in wall:
            w, c = wall[k], cpu[k]
            lines.append(f"| {k} | {w:.3f} | {c:.3f} | {max(0.0, w - c):.3f} |")
    return lines


def table(costs: Costs) -> list[str]:
    """The phases of one run as Markdown."""
    lines = [
        f"### {costs.senders} sender(s): {costs.rate:.0f} images/s "
        f"({1000 / costs.rate:.2f} ms per instance)",
        "",
        *_phase_table(_phases(), costs.wall, costs.cpu),
        "",
        "Behind the answers, the applier (timed alone, after the send):",
        "",
        *_phase_table(_applier_phases(), costs.applier_wall, costs.applier_cpu),
    ]
    lines += [
        "",
        f"- receiver process CPU: {costs.process_cpu:.2f} ms per instance "
        f"(user {costs.process_user:.2f}, system {costs.process_sys:.2f})",
        f"- applier CPU: {costs.applier_total:.2f} ms per instance",
        f"- storescu CPU: {costs.sender_cpu:.2f} ms per instance",
        f"- catalog writer lock held (by the applier): {costs.lock_hold:.3f} ms per instance",
    ]
    if costs.senders == 1:
        lines += latency_bounds(costs)
    return lines


def latency_bounds(costs: Costs) -> list[str]:
    """What one sender (one instance in flight) would gain without parts of the path.

    Every phase of the handler is on the response path, so removing one saves at most
    its wall time per instance.
    """
    per = 1000 / costs.rate
    key = JOURNAL_APPEND
    flush_wait = max(0.0, costs.wall.get(key, 0.0) - costs.cpu.get(key, 0.0))
    return [
        "- upper bound for one sender, from this table: with no flush before the answer "
        f"({flush_wait:.2f} ms of waiting per instance) at most "
        f"{1000 / (per - flush_wait):.0f} images/s",
    ]


def project(costs: Costs, serial: Costs, orthanc: Reference | None) -> list[str]:
    """The throughput model of the module docstring: CPU from ``costs`` (several senders),
    the catalog writer's serial time from ``serial`` (one sender); Orthanc by its CPU."""
    cpu_total = costs.process_cpu + costs.applier_total + costs.sender_cpu
    bounds_of: dict[str, Callable[[int], float]] = {
        "CPU": lambda cores: cores * 1000 / cpu_total,
        "one process per core": lambda cores: cores * 1000 / costs.process_cpu,
        "appliers": lambda cores: cores * 1000 / serial.applier_total,
        "catalog writer": lambda cores: 1000 / serial.lock_hold,
    }
    lines = [
        "",
        "### Model and projection",
        "",
        f"Receiver CPU {costs.process_cpu:.2f} ms, applier CPU {costs.applier_total:.2f} ms "
        f"and sender CPU {costs.sender_cpu:.2f} ms per instance ({costs.senders}-sender "
        f"run); applier CPU {serial.applier_total:.2f} ms and catalog writer lock "
        f"{serial.lock_hold:.3f} ms per instance ({serial.senders}-sender run, applied "
        "alone). One receiver process and one applier process per core (`node.receivers`, "
        "`storage.appliers`), sharing the cores, enough senders to keep them busy, one "
        "SQLite catalog.",
    ]
    if orthanc is not None:
        lines += [
            "",
            f"Orthanc in the same run ({orthanc.senders} senders): {orthanc.rate:.0f} "
            f"images/s, process CPU {orthanc.process_cpu:.2f} ms and sender CPU "
            f"{orthanc.sender_cpu:.2f} ms per instance. Its projection is its CPU bound "
            "alone (cores / its CPU plus the senders'), which flatters Orthanc: its own "
            "index is a single SQLite writer too, and its DICOM threads "
            "(`DicomThreadsCount`) must be raised with the cores.",
        ]
    head = "| cores | CPU bound img/s | process bound img/s | applier bound img/s "
    head += "| catalog bound img/s | ours img/s "
    head += "| binding limit |"
    rule = "|---|---|---|---|---|---|---|"
    if orthanc is not None:
        head += " Orthanc img/s (CPU bound) | ours / Orthanc |"
        rule += "---|---|"
    lines += ["", head, rule]
    for cores in CORES:
        bounds = {name: f(cores) for name, f in bounds_of.items()}
        limit = min(bounds, key=lambda b: bounds[b])
        values = " | ".join(f"{v:.0f}" for v in bounds.values())
        row = f"| {cores} | {values} | {bounds[limit]:.0f} | {limit} |"
        if orthanc is not None:
            theirs = cores * 1000 / (orthanc.process_cpu + orthanc.sender_cpu)
            row += f" {theirs:.0f} | {bounds[limit] / theirs:.2f} |"
        lines.append(row)
    predicted = min(
        f(1) if name in ("one process per core", "appliers") else f(2)
        for name, f in bounds_of.items()
    )  # this run: one receiver process and one applier on 2 cores
    lines += [
        "",
        f"Check against this run ({os.cpu_count()} cores, one receiver process): the "
        f"model gives {predicted:.0f} images/s; {costs.rate:.0f} were measured.",
    ]
    if orthanc is not None:
        theirs2 = 2 * 1000 / (orthanc.process_cpu + orthanc.sender_cpu)
        lines.append(
            f"Orthanc's CPU bound on 2 cores is {theirs2:.0f} images/s; it measured "
            f"{orthanc.rate:.0f}."
        )
    return lines


def main(argv: list[str]) -> list[str]:
    """Run the sender counts in ``argv`` (default 1 and 4); the Markdown lines."""
    counts = [int(a) for a in argv] or [1, 4]
    work = Path(tempfile.mkdtemp(prefix="cspine-costs-", dir=TMP))
    try:
        series = make_series(work / "series", "explicit")
        runs = [
            median_costs([measure(series, n, work / f"{n}-{k}") for k in range(RUNS)])
            for n in counts
        ]
        several = [c for c in runs if c.senders > 1]
        orthanc = (
            median_reference(
                [measure_orthanc(series, several[-1].senders, work / f"o-{k}") for k in range(RUNS)]
            )
            if several
            else None
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        "## Ingest: where the time goes",
        "",
        "`python -m tests.bench.ingest_costs`: the node's receive path in one process, "
        "each phase timed (wall and the thread's CPU time), the same 300-slice series "
        f"sent by dcmtk `storescu`; every figure is the median of {RUNS} runs. "
        "Phases nest (indented rows are inside the row above them): everything up to the "
        "answer runs on the association's reading thread, a plain C-STORE being served "
        "where its last fragment is read. The applier's phases are "
        "measured applying the same run's journal afterwards, alone.",
        "",
    ]
    for costs in runs:
        lines += [*table(costs), ""]
    single = [c for c in runs if c.senders == 1]
    if several and single:
        lines += project(several[-1], single[0], orthanc)
    return lines


if __name__ == "__main__":
    print("\n".join(main(sys.argv[1:])))
