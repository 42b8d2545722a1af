"""``make bench``: run the benchmarks and write docs/performance.md.

Benchmarks are not tests: they measure, print ratios against the reference tools run in
the same session, and record the machine, versions and commands.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from tests.bench import ingest, turnaround

DOC = Path(__file__).resolve().parents[2] / "docs" / "performance.md"


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).splitlines()[0].strip()
    except Exception:
        return "not installed"


def main() -> None:
    results = ingest.main()
    lines = [
        "# Performance",
        "",
        f"Written by `make bench` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        "## Machine and versions",
        "",
        f"- {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        f"- pynetdicom {version('pynetdicom')}, pydicom {version('pydicom')}, "
        f"torch {version('torch')}, SQLAlchemy {version('sqlalchemy')}",
        f"- dcmtk: {_tool_version(['storescp', '--version'])}",
        "",
        "## Ingest",
        "",
        f"dcmtk `storescu -xs` sends the same synthetic {ingest.SLICES}-slice 512x512 series to "
        "each receiver, one after another in the same run (`TCP_NODELAY=1` for dcmtk). Our node "
        "runs `cspine serve --no-worker` with fsync and the catalog on (every 0x0000 is "
        "fsynced, renamed and committed); dcmtk `storescp +xa -od DIR` stores files without "
        f"fsync. {ingest.RUNS} runs each; median, min and max seconds.",
        "",
        "| receiver | transfer syntax | senders | img/s (median) | MB/s "
        "| median s | min s | max s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.syntax} | {r.senders} | {r.rate:.1f} | {r.mbytes / r.median:.1f} "
            f"| {r.median:.2f} | {min(r.seconds):.2f} | {max(r.seconds):.2f} |"
        )
    lines += ["", "Ratios (ours / reference, images per second):", ""]
    for r in results:
        if r.name != "cspine":
            continue
        ref = [
            x
            for x in results
            if x.name == "storescp" and x.syntax == r.syntax and x.senders == r.senders
        ]
        if ref:
            lines.append(
                f"- {r.syntax}, {r.senders} sender(s): {r.rate / ref[0].rate:.2f} x storescp"
            )
    sizes = [int(x) for x in os.environ.get("CSPINE_BENCH_STUDIES", "150,300").split(",")]
    rows = turnaround.main([str(n) for n in sizes])
    keys = [k for k in rows[0] if k != "slices"]
    lines += [
        "",
        "## Turnaround",
        "",
        "Last instance acknowledged (dcmtk `storescu`) to last output acknowledged by a "
        f"loopback PACS, `cspine serve --stable-seconds {turnaround.STABLE:g}` with the shipped "
        "demo models on the CPU. One run per size; seconds.",
        "",
        "| slices | " + " | ".join(k.removesuffix("_s") for k in keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for row in rows:
        lines.append(f"| {row['slices']} | " + " | ".join(f"{row[k]:.2f}" for k in keys) + " |")
    lines += ["", "No GPU was available to this run: there is no GPU figure."]
    lines += [
        "",
        "Command: `make bench` (`python -m tests.bench`); "
        "`CSPINE_BENCH_RUNS` and `CSPINE_BENCH_SLICES` change the run count and size.",
        "",
    ]
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text("\n".join(lines))
    print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
