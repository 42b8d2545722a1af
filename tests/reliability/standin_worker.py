"""``python -m tests.reliability.standin_worker SETTINGS_JSON``: a real worker process
(:class:`dicom_node.worker.Worker`: claims, heartbeats, recovery, stages, writers,
completion with deliveries) whose pipeline is a stand-in, so that a multi-process test
spends its time on the catalog and the network rather than on inference.

The stand-in labels seven slabs of the volume C1..C7 (probability 0.1 each) after
sleeping ``CSPINE_STANDIN_SECONDS`` (default 1.5 s), which gives a test a window to
SIGKILL a worker mid-job. Leases are short here: a heartbeat every second, a look for
dead workers' jobs every second.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np

from ai.types import VERTEBRAE, ModelIdentity, PipelineResult, VertebraResult


class StandInPipeline:
    """Seven slabs along z, C1..C7, no fracture."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def run(self, vol) -> PipelineResult:  # type: ignore[no-untyped-def]
        time.sleep(self.seconds)
        shape = vol.hu.shape
        labels = np.zeros(shape, np.uint8)
        step = max(1, shape[0] // 8)
        cy, cx = shape[1] // 2, shape[2] // 2
        for i in range(1, 8):
            labels[(i - 1) * step : i * step, cy - 4 : cy + 4, cx - 4 : cx + 4] = i
        verdicts = [VertebraResult(name, True, True, 0.1) for name in VERTEBRAE]
        model = ModelIdentity("stand-in", "0", "0" * 64, "test stand-in", demo=True)
        return PipelineResult(labels, verdicts, 0.1, [model], {"stage1": 0.0, "stage2": 0.0})


def main() -> None:
    from config import load_settings
    from dicom_node import worker as worker_module
    from dicom_node.cli.common import configure_logging
    from dicom_node.receive import open_node_storage

    worker_module.HEARTBEAT_SECONDS = 1
    worker_module.RECOVER_SECONDS = 1.0
    settings = load_settings(overrides=json.loads(sys.argv[1]), environ={})
    configure_logging(settings.logging.level)
    seconds = float(os.environ.get("CSPINE_STANDIN_SECONDS", "1.5"))
    catalog, store = open_node_storage(settings)
    w = worker_module.Worker(
        settings, catalog, store, pipeline_factory=lambda: StandInPipeline(seconds)
    )
    signal.signal(signal.SIGTERM, lambda *_: w.stop_event.set())
    try:
        w.run_forever()
    finally:
        catalog.dispose()


if __name__ == "__main__":
    main()
