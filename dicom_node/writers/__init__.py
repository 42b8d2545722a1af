"""DICOM outputs of the node: SEG, TID 1500 SR and the summary Secondary Capture.

All writers take the source CT slices in volume slice order, an
:class:`ai.types.PipelineResult` and explicit identity arguments (UIDs, series and
instance numbers) chosen by the caller, validate eagerly, and return a
``pydicom.Dataset`` in the source study with the source patient module, a new series,
Manufacturer ``"cspine-node"`` and the model names and versions. With demo weights
every output says ``"synthetic demo weights, not for clinical use"``.
"""

from dicom_node.writers.common import (
    DEMO_DISCLAIMER,
    MANUFACTURER,
    VERTEBRA_CODES,
    VERTEBRA_COLORS,
    has_plane,
)
from dicom_node.writers.seg import segment_numbers, write_seg
from dicom_node.writers.sr import read_sr_result, write_not_processed_sr, write_sr
from dicom_node.writers.summary import (
    SUMMARY_SHAPE,
    render_summary,
    render_summary_png,
    write_summary,
    write_summary_image,
)

__all__ = [
    "DEMO_DISCLAIMER",
    "MANUFACTURER",
    "SUMMARY_SHAPE",
    "VERTEBRA_CODES",
    "VERTEBRA_COLORS",
    "has_plane",
    "read_sr_result",
    "render_summary",
    "render_summary_png",
    "segment_numbers",
    "write_not_processed_sr",
    "write_seg",
    "write_sr",
    "write_summary",
    "write_summary_image",
]
