"""Study completion: a study is COMPLETE once no new instance arrived for a stable window.

The window is measured on an injected monotonic clock, per study, from the moment
the checker last saw its ``received_count`` change. A wall-clock jump therefore
neither completes a study early nor keeps it open; after a restart every open study
starts a fresh window (late, never early). Any writer process (SCP, import) bumps
``received_count``, so the checker needs no message from them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from storage import Catalog
from storage.catalog import mark_complete, receiving_studies, study_ids

LOGGER = logging.getLogger(__name__)


class CompletionChecker:
    """Decide which RECEIVING studies are complete.

    Parameters
    ----------
    catalog
        The process's catalog.
    stable_seconds
        Quiet period after the last new instance.
    clock
        Monotonic clock in seconds; tests inject a fake one.
    on_complete
        Called with the study id after a study became COMPLETE (e.g. to queue a job).
    waiting_studies
        Study Instance UIDs of the instances answered but not yet cataloged (the ingest
        journal), or ``None`` when some are unknown. A study with such an instance is
        not quiet: its stable window starts again once they are cataloged. ``None``
        holds every study.
    """

    def __init__(
        self,
        catalog: Catalog,
        stable_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        on_complete: Callable[[int], None] | None = None,
        waiting_studies: Callable[[], set[str] | None] | None = None,
    ) -> None:
        self.catalog = catalog
        self.stable_seconds = stable_seconds
        self.clock = clock
        self.on_complete = on_complete
        self.waiting_studies = waiting_studies
        self._seen: dict[int, tuple[int, float]] = {}
        self._held = False

    def tick(self) -> list[int]:
        """Check every open study once.

        Returns
        -------
        list of int
            Ids of the studies completed by this tick.
        """
        now = self.clock()
        waiting = self.waiting_studies() if self.waiting_studies is not None else set()
        if waiting is None:
            if not self._held:
                LOGGER.warning("completion held: ingest journal entries of unknown studies")
            self._held = True
            self._seen = {sid: (count, now) for sid, (count, _t) in self._seen.items()}
            return []
        self._held = False
        held = study_ids(self.catalog, waiting)
        done: list[int] = []
        open_ids = set()
        for study_id, count in receiving_studies(self.catalog):
            open_ids.add(study_id)
            seen = self._seen.get(study_id)
            if seen is None or seen[0] != count or study_id in held:
                self._seen[study_id] = (count, now)
                continue
            quiet = now - seen[1]
            if quiet >= self.stable_seconds and mark_complete(
                self.catalog, study_id, count, f"no new instance for {quiet:.1f} s"
            ):
                LOGGER.info("study complete study_id=%d instances_seen=%d", study_id, count)
                done.append(study_id)
                self._seen.pop(study_id, None)
                if self.on_complete is not None:
                    self.on_complete(study_id)
        for stale in set(self._seen) - open_ids:
            self._seen.pop(stale, None)
        return done
