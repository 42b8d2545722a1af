"""Write: the output datasets (SEG, SR, summary image, or a not-processed SR).

The stage yields the datasets one at a time for the store stage to encode and store:
the SEG is stored before the SR is built, and its frames are dropped once stored (the
SR needs its identity and segments only). The CT volume is released before the SEG
is built, after the summary image is drawn from it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pydicom

from dicom_node.stages.context import JobContext, PendingOutput
from dicom_node.stages.heap import release_memory
from dicom_node.uids import output_ids, software_version
from dicom_node.writers.common import blank_invalid_dates, has_plane

LOGGER = logging.getLogger(__name__)


class WriteStage:
    """Draw the summary, release the volume, and set the outputs to store."""

    name: ClassVar[str] = "write"
    after_end: ClassVar[bool] = True

    def __call__(self, ctx: JobContext) -> None:
        if ctx.end is not None:
            ctx.pending = _not_processed_sr(ctx) if ctx.end.send_sr else ()
            return
        from dicom_node import writers

        ctx.write_started = time.perf_counter()  # "write" lasts until the last is stored
        vol, result = ctx.volume, ctx.result
        assert vol is not None and result is not None
        # Draw the summary image now, then let the volume go: it is the largest array of
        # the job (0.6 GB at 1,200 slices) and the SEG and SR need only the label map.
        ctx.summary_pixels = writers.render_summary(
            vol.hu,
            vol.affine,
            result,
            threshold=ctx.settings.models.fracture_threshold,
            software_version=software_version(),
        )
        ctx.slices, ctx.geometry_issues = int(vol.hu.shape[0]), [i.message for i in vol.issues]
        source_uids = vol.source_sop_instance_uids
        ctx.volume = None
        del vol
        release_memory()
        by_uid = {str(ds.get("SOPInstanceUID", "")): ds for ds in ctx.headers.values()}
        ctx.sources = [blank_invalid_dates(by_uid[uid]) for uid in source_uids]
        ctx.pending = _outputs(ctx)


def _outputs(ctx: JobContext) -> Iterator[PendingOutput]:
    """SEG (when anything was segmented), SR and summary image, built one at a time."""
    from dicom_node import writers

    result, when, pixels = ctx.result, ctx.job.when, ctx.summary_pixels
    assert result is not None and pixels is not None

    def ids(kind: str) -> dict[str, Any]:
        return output_ids(ctx.study_key, ctx.job.version, kind)

    seg = None
    if result.label_map.any():  # no whole-map boolean temporary
        seg = writers.write_seg(ctx.sources, result, content_datetime=when, **ids("seg"))
        yield PendingOutput("seg", "seg", seg)
        # stored: the SR needs the SEG's identity and segments, not its frames
        del seg.PixelData
        release_memory(collect=False)
    sr = writers.write_sr(
        ctx.sources,
        seg,
        result,
        threshold=ctx.settings.models.fracture_threshold,
        selection_note=ctx.selection.note if ctx.selection else "",
        content_datetime=when,
        **ids("sr"),
    )
    del seg
    yield PendingOutput("sr", "sr", sr)
    del sr
    summary = writers.write_summary_image(
        ctx.sources, pixels, result, content_datetime=when, **ids("summary")
    )
    yield PendingOutput("summary", "summary", summary)


_GEOMETRY = (
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
)


def _first_source(ctx: JobContext) -> pydicom.Dataset | None:
    """The header the not-processed SR is written from (``None``: none reads).

    The first readable header of each series, in series order; the first of them that is
    an image placed in a frame of reference is preferred, so that the SR can locate its
    finding on the examined field of view (a viewer such as OHIF needs a location for
    every finding), else the first readable one.
    """
    if not ctx.candidates:  # the job failed before its series were read
        ctx.study_key, ctx.candidates = ctx.storage.study_series(ctx.job.study_id)
    fallback: pydicom.Dataset | None = None
    for cand in ctx.candidates:
        for path in cand.paths:
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            if has_plane(header):
                return blank_invalid_dates(header)
            if fallback is None:
                fallback = blank_invalid_dates(header)
            break  # one header per series: a series is one kind of object
    return fallback


def _not_processed_sr(ctx: JobContext) -> Iterator[PendingOutput]:
    """The not-processed SR of a job that ended early; nothing when no source reads."""
    from dicom_node import writers

    end = ctx.end
    assert end is not None
    source = _first_source(ctx)
    if source is None:
        return
    ids = output_ids(ctx.study_key, ctx.job.version, "sr", name=end.sr_name)
    sr = writers.write_not_processed_sr(
        [source], end.sr_words, content_datetime=ctx.job.when, **ids
    )
    yield PendingOutput(end.sr_name.replace("-", "_"), "sr", sr)
