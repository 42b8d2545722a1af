"""Durability work per stored instance: cspine vs Orthanc, counted with strace.

Usage::

    .venv/bin/python -m tests.bench.sync_calls [N]

Sends the same synthetic N-slice (default 100) 512x512 series with dcmtk ``storescu``
(one association, ``TCP_NODELAY=1``) to Orthanc (the ingest bench's configuration) and
to ``cspine serve --no-worker`` (the defaults: the ingest journal; and with
``storage.acknowledge = "catalog"``), each traced with ``strace -f -e trace=<sync and rename
calls>``, and prints per receiver how many ``fsync``/``fdatasync`` calls hit which kind
of file (stored instance, folder, SQLite database or WAL). Orthanc flushes every stored
file and its index only at checkpoints. cspine's receiver flushes the file and the
journal's folder before it answers 0x0000 (the name is durable too, not just the bytes);
its applier then flushes the file's content address, folders and the catalog's WAL behind
the answer. With ``storage.journal_flush = "filesystem"`` (``cspine-syncfs``) the
receiver's two flushes are one ``syncfs``. With ``storage.acknowledge = "catalog"`` all
of that precedes the answer.
A plain script, not a test; needs ``strace``.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.ingest import send, start_receiver  # noqa: E402

CALLS = "fsync,fdatasync,sync_file_range,syncfs"


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _parents() -> dict[int, int]:
    """Parent pid of every process."""
    parent_of: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            parent_of[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parent_of


def _pid_of(marker: str) -> int:
    """The outermost process whose command line mentions ``marker`` (the receiver's
    folder): ``cspine serve`` itself, not one of its children (whose settings file is
    under the folder too)."""
    parent_of = _parents()
    found = {
        pid
        for pid in parent_of
        if marker in (cmd := _cmdline(pid)) and "strace" not in cmd and APPLIER not in cmd
    }
    for pid in sorted(found):
        if parent_of.get(pid) not in found:
            return pid
    raise RuntimeError(f"no process for {marker}")


def _family(root: int) -> list[int]:
    """``root`` and every process descended from it (``cspine serve`` and its receiver
    and applier children)."""
    parent_of = _parents()
    family = [root]
    for pid in family:
        family += [child for child, parent in parent_of.items() if parent == pid]
    return family


APPLIER = "dicom_node.apply"


def _kind(path: str) -> str:
    """What a synced path is (checked after the run, while the receiver's folder exists)."""
    if path.endswith("-wal"):
        return "SQLite WAL"
    if path.endswith((".sqlite", "/index", "-journal")):
        return "SQLite database"
    return "folder" if Path(path).is_dir() else "stored file"


def trace(kind: str, series: Path, work: Path) -> tuple[float, collections.Counter]:
    """Send ``series`` to a fresh ``kind`` under strace; images/s and sync calls by target.

    For cspine every process of ``cspine serve`` is traced (its receiver processes and
    its applier); the receivers, whose flushes the answer waits for, and the applier,
    which flushes behind the answer, are counted apart.
    """
    target = work / kind
    running = start_receiver(kind, target, 1)
    tracers = []
    logs = []
    try:
        family = _family(_pid_of(str(target)))
        pids = [
            (" (applier, behind the answer)" if APPLIER in _cmdline(pid) else "", pid)
            for pid in family
        ]
        for label, pid in pids:
            log = work / f"strace-{kind}-{pid}.txt"
            logs.append((label, log))
            cmd = ["strace", "-f", "-y", "-qq", "-o", str(log), "-e", f"trace={CALLS}"]
            tracers.append(subprocess.Popen([*cmd, "-p", str(pid)]))
        time.sleep(1.5)  # strace attaches to every thread
        seconds = send(series, running.port, running.called, 1)
        time.sleep(1.0)  # the applier catches up
        for tracer in tracers:
            tracer.terminate()
            tracer.wait()
    finally:
        running.stop()
    counts: collections.Counter = collections.Counter()
    for label, log in logs:
        for call, path in re.findall(r"(\w+)\(\d+<([^>]*)>", log.read_text()):
            what = "of the store's filesystem" if call == "syncfs" else _kind(path)
            counts[f"{call} {what}{label}"] += 1
    n = sum(1 for _ in series.iterdir())
    return n / seconds, counts


def main() -> None:
    from ai.synthetic import StudySpec, generate_study, write_series

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    if shutil.which("strace") is None:
        raise SystemExit("strace is not installed (apt-get install -y strace)")
    work = Path(tempfile.mkdtemp(prefix="cspine-sync-"))
    try:
        series = work / "series"
        write_series(generate_study(2024, StudySpec(n_slices=n)), series, "explicit")
        for kind in ("orthanc", "cspine", "cspine-syncfs", "cspine-catalog"):
            rate, counts = trace(kind, series, work)
            print(f"{kind}: {n} instances, {rate:.0f} img/s under strace")
            for key, value in sorted(counts.items()):
                print(f"  {value:6d} {key} ({value / n:.2f} per instance)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
