"""Summary image: sagittal + coronal reformats with coloured C1..C7 and a results table.

The image is an RGB Secondary Capture (highdicom ``SCImage``), the one output that
every viewer and PACS can show. Layout of :func:`render_summary` (``SUMMARY_SHAPE``,
1280 x 720 pixels, RGB)::

    +-----------------------------------------------------------------------+
    | title bar                                                             |
    +------------------+------------------+---------------------------------+
    | sagittal         | coronal          | table: vertebra, probability,   |
    | (mid-sagittal    | (through the     | verdict / not assessed + reason,|
    | through label    | label centroid)  | patient probability, threshold, |
    | centroid)        |                  | models + versions, disclaimer   |
    +------------------+------------------+---------------------------------+

Both reformats keep the physical aspect ratio (voxel spacing), use a bone window
(level 400 HU, width 1800 HU), show head up, anterior left (sagittal) and patient
right on the viewer's left (coronal), and overlay the vertebrae in
``VERTEBRA_COLORS`` with their names.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sr.codedict import codes

from ai.types import REASON_CODES, VERTEBRAE, ModelIdentity, PipelineResult, VertebraResult
from dicom_node.writers.common import (
    AI_PRODUCED,
    DEMO_DISCLAIMER,
    MANUFACTURER,
    VERTEBRA_COLORS,
    check_identity,
    check_result,
    check_sources,
    check_threshold,
    contributing_equipment,
    copy_patient_study,
    is_demo,
    resolve_datetime,
    series_description,
    stamp,
    truncate,
)

logger = logging.getLogger(__name__)

SUMMARY_SHAPE: tuple[int, int, int] = (720, 1280, 3)
"""Shape (rows, columns, samples) of the summary image."""
BONE_WINDOW: tuple[float, float] = (400.0, 1800.0)
"""Window level and width in HU."""
SUMMARY_SERIES_DESCRIPTION = "C-spine summary"
OVERLAY_ALPHA = 0.3
"""Opacity of the vertebra fill; the outline is drawn opaque."""

_TITLE_H = 48
_PANEL_W = 340
_MARGIN = 10
_CROP_MARGIN_MM = 25.0
_SLAB_MM = 6.0
_BG = (0, 0, 0)
_FG = (235, 235, 235)
_MUTED = (160, 160, 160)
_ALERT = (255, 80, 80)
_OK = (120, 220, 120)
_WARN = (255, 200, 60)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _axes(affine: np.ndarray) -> tuple[int, int, int]:
    """Voxel axes (of ``[slice,row,col]``) closest to patient L-R, A-P and S-I."""
    directions = np.abs(affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0))
    order = []
    for patient_axis in (0, 1, 2):  # x (L), y (P), z (S)
        order.append(int(np.argmax(directions[patient_axis])))
    if len(set(order)) != 3:
        return 2, 1, 0  # axial default: columns L-R, rows A-P, slices S-I
    return order[0], order[1], order[2]


def _reformat(
    volume: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    fixed_axis: int,
    horizontal_axis: int,
    vertical_axis: int,
    flip_horizontal: bool,
    index: int,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """A plane at ``index`` along ``fixed_axis``: grey, labels (slab-filled), mm per row/col."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    half = max(1, round(_SLAB_MM / 2.0 / spacing[fixed_axis]))
    n = volume.shape[fixed_axis]
    grey = np.take(volume, index, axis=fixed_axis)
    lab = np.take(labels, index, axis=fixed_axis).copy()
    for offset in range(1, half + 1):
        for other in (index + offset, index - offset):
            if 0 <= other < n:
                extra = np.take(labels, other, axis=fixed_axis)
                lab = np.where(lab == 0, extra, lab)
    # remaining axes of the 2D plane, in original order
    remaining = [a for a in range(3) if a != fixed_axis]
    if remaining.index(vertical_axis) != 0:
        grey, lab = grey.T, lab.T
    # head up: flip rows when the vertical index increases towards superior
    if affine[2, vertical_axis] > 0:
        grey, lab = grey[::-1], lab[::-1]
    if flip_horizontal:
        grey, lab = grey[:, ::-1], lab[:, ::-1]
    return grey, lab, float(spacing[vertical_axis]), float(spacing[horizontal_axis])


def _label_centroid(labels: np.ndarray, slab: int = 16) -> np.ndarray | None:
    """Mean voxel index of the non-zero labels (``None`` when there is none).

    Counted slab by slab along the first axis from per-axis projections, in exact
    integer arithmetic (the same value as ``np.argwhere(labels > 0).mean(axis=0)``
    without its whole-volume mask and N x 3 index array).
    """
    n0, n1, n2 = labels.shape
    sums = np.zeros(3, dtype=np.int64)
    total = 0
    idx1, idx2 = np.arange(n1, dtype=np.int64), np.arange(n2, dtype=np.int64)
    for start in range(0, n0, slab):
        mask = labels[start : start + slab] != 0
        per_slice = np.count_nonzero(mask, axis=(1, 2)).astype(np.int64)
        count = int(per_slice.sum())
        if count == 0:
            continue
        total += count
        sums[0] += int(per_slice @ np.arange(start, start + mask.shape[0], dtype=np.int64))
        sums[1] += int(np.count_nonzero(mask, axis=(0, 2)).astype(np.int64) @ idx1)
        sums[2] += int(np.count_nonzero(mask, axis=(0, 1)).astype(np.int64) @ idx2)
    if total == 0:
        return None
    return sums / total


def _crop(grey: np.ndarray, lab: np.ndarray, row_mm: float, col_mm: float):
    if not lab.any():
        return grey, lab
    rows = np.flatnonzero(lab.any(axis=1))
    cols = np.flatnonzero(lab.any(axis=0))
    mr, mc = round(_CROP_MARGIN_MM / row_mm), round(_CROP_MARGIN_MM / col_mm)
    r0, r1 = max(rows[0] - mr, 0), min(rows[-1] + mr + 1, grey.shape[0])
    c0, c1 = max(cols[0] - mc, 0), min(cols[-1] + mc + 1, grey.shape[1])
    return grey[r0:r1, c0:c1], lab[r0:r1, c0:c1]


def _panel(
    grey: np.ndarray,
    lab: np.ndarray,
    row_mm: float,
    col_mm: float,
    box: tuple[int, int],
    caption: str,
) -> Image.Image:
    """Window, colour, scale to the physical aspect ratio and label one reformat."""
    grey, lab = _crop(grey, lab, row_mm, col_mm)
    level, width = BONE_WINDOW
    g = np.clip((grey.astype(np.float32) - (level - width / 2)) / width, 0, 1) * 255
    rgb = np.repeat(g[..., None], 3, axis=2)
    colors = np.zeros((len(VERTEBRAE) + 1, 3), np.float32)
    for n, name in enumerate(VERTEBRAE, start=1):
        colors[n] = VERTEBRA_COLORS[name]
    mask = lab > 0
    rgb[mask] = (1 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * colors[lab[mask]]
    height_mm, width_mm = grey.shape[0] * row_mm, grey.shape[1] * col_mm
    box_w, box_h = box
    scale = min(box_w / width_mm, (box_h - 24) / height_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    image = Image.fromarray(rgb.astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    label_image = Image.fromarray(lab.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
    lab_small = np.asarray(label_image)
    # opaque 1-pixel outline of each vertebra
    edge = np.zeros(lab_small.shape, bool)
    edge[1:] |= lab_small[1:] != lab_small[:-1]
    edge[:-1] |= lab_small[:-1] != lab_small[1:]
    edge[:, 1:] |= lab_small[:, 1:] != lab_small[:, :-1]
    edge[:, :-1] |= lab_small[:, :-1] != lab_small[:, 1:]
    edge &= lab_small > 0
    outlined = np.asarray(image).copy()
    outlined[edge] = colors[lab_small[edge]].astype(np.uint8)
    image = Image.fromarray(outlined)
    panel = Image.new("RGB", box, _BG)
    x0, y0 = (box_w - size[0]) // 2, 24 + (box_h - 24 - size[1]) // 2
    panel.paste(image, (x0, y0))
    draw = ImageDraw.Draw(panel)
    draw.text((box_w // 2, 2), caption, fill=_MUTED, font=_font(16), anchor="ma")
    font = _font(18)
    for n, name in enumerate(VERTEBRAE, start=1):
        ys, xs = np.nonzero(lab_small == n)
        if ys.size == 0:
            continue
        y = y0 + int(np.median(ys))
        x = x0 + int(xs.min()) - 6
        bbox = draw.textbbox((0, 0), name, font=font, anchor="rm")
        x = max(x, -bbox[0] + 2)
        draw.text(
            (x, y),
            name,
            fill=VERTEBRA_COLORS[name],
            font=font,
            anchor="rm",
            stroke_width=3,
            stroke_fill=(0, 0, 0),
        )
    return panel


def _fmt(p: float | None) -> str:
    return "  -  " if p is None else f"{p:.3f}"


def _table(
    result: PipelineResult, threshold: float, box: tuple[int, int], software_version: str | None
) -> Image.Image:
    panel = Image.new("RGB", box, _BG)
    draw = ImageDraw.Draw(panel)
    head, body, small = _font(20), _font(19), _font(15)
    x_name, x_prob, x_verdict = 16, 80, 190
    y = 8
    draw.text((x_name, y), "Level", fill=_MUTED, font=head)
    draw.text((x_prob, y), "P(fracture)", fill=_MUTED, font=head)
    draw.text((x_verdict + 10, y), "Result", fill=_MUTED, font=head)
    y += 32
    draw.line((x_name, y - 4, box[0] - 16, y - 4), fill=(90, 90, 90), width=1)
    for verdict in result.vertebrae:
        draw.rectangle((x_name, y + 4, x_name + 12, y + 16), fill=VERTEBRA_COLORS[verdict.label])
        draw.text((x_name + 18, y), verdict.label, fill=_FG, font=body)
        draw.text((x_prob + 12, y), _fmt(verdict.probability), fill=_FG, font=body)
        if not verdict.assessed or verdict.probability is None:
            text, color = f"not assessed: {_short_reason(verdict)}", _WARN
        elif verdict.probability >= threshold:
            text, color = "FRACTURE", _ALERT
        else:
            text, color = "no fracture", _OK
        lines = _wrap(draw, text, body, box[0] - x_verdict - 26)
        for line in lines:
            draw.text((x_verdict + 10, y), line, fill=color, font=body)
            y += 26
        y += 4
    draw.line((x_name, y, box[0] - 16, y), fill=(90, 90, 90), width=1)
    y += 8
    p = result.patient_probability
    if p is None:
        text, color = "not assessed", _WARN
    elif p < threshold and result.incomplete:
        text, color = "incomplete", _WARN
    elif p >= threshold:
        text, color = "FRACTURE", _ALERT
    else:
        text, color = "no fracture", _OK
    draw.text((x_name, y), "Patient", fill=_FG, font=head)
    draw.text((x_prob + 12, y), _fmt(p), fill=_FG, font=head)
    draw.text((x_verdict + 10, y), text, fill=color, font=head)
    y += 34
    draw.text((x_name, y), f"Threshold: P >= {threshold:.2f} means fracture", fill=_FG, font=body)
    y += 34
    reasons = _detailed_reasons(result)
    if reasons:
        draw.text((x_name, y), "Why not assessed:", fill=_WARN, font=small)
        y += 20
        room = box[1] - 64 - 130 if is_demo(result) else box[1] - 130
        for reason in reasons:
            for line in _wrap(draw, reason, small, box[0] - 40):
                if y > room:
                    break
                draw.text((x_name + 10, y), line, fill=_FG, font=small)
                y += 19
        y += 6
    draw.text((x_name, y), "Models:", fill=_MUTED, font=small)
    y += 20
    for model in result.models:
        for line in _wrap(draw, _model_line(model), small, box[0] - 40):
            draw.text((x_name + 10, y), line, fill=_FG, font=small)
            y += 19
    if software_version:
        draw.text((x_name, y + 2), f"{MANUFACTURER} {software_version}", fill=_MUTED, font=small)
        y += 22
    if is_demo(result):
        y = max(y + 8, box[1] - 64)
        draw.rectangle((x_name - 6, y, box[0] - 10, y + 54), outline=_ALERT, width=3)
        draw.text(
            (box[0] // 2, y + 27),
            DEMO_DISCLAIMER.upper().replace(", ", ",\n"),
            fill=_ALERT,
            font=_font(18),
            anchor="mm",
            align="center",
        )
    return panel


def _short_reason(verdict: VertebraResult) -> str:
    """The reason in a few words ("input outside intended use"); details go below."""
    return REASON_CODES.get(verdict.reason_code or "", verdict.reason or "no reason given")


def _detailed_reasons(result: PipelineResult) -> list[str]:
    """Each distinct reason with its measured values, once (not-in-view levels aside)."""
    out: list[str] = []
    for verdict in result.vertebrae:
        if verdict.assessed or verdict.reason_code in (None, "not_in_fov", "too_small"):
            continue
        text = verdict.reason or ""
        if verdict.reason_code == "implausible" and not text.startswith(verdict.label):
            text = f"{verdict.label}: {text}"
        if text and text not in out:
            out.append(text)
    return out


def _model_line(model: ModelIdentity) -> str:
    demo = " (demo)" if model.demo else ""
    return f"{model.name} {model.version}{demo}  sha256:{model.sha256[:12]}"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    return lines


def render_summary(
    volume_hu: np.ndarray,
    affine: np.ndarray,
    result: PipelineResult,
    *,
    threshold: float,
    software_version: str | None = None,
) -> np.ndarray:
    """Draw the summary image.

    Parameters
    ----------
    volume_hu
        CT volume in HU, ``[slice, row, column]``, same shape as ``result.label_map``.
    affine
        4x4 voxel-to-LPS affine of the volume (see :mod:`ai.types`).
    result
        Pipeline output.
    threshold
        Decision threshold in (0, 1).
    software_version
        Shown in the table when given.

    Returns
    -------
    numpy.ndarray
        uint8 RGB image of shape ``SUMMARY_SHAPE`` (720, 1280, 3).

    Raises
    ------
    ValueError
        If the volume and label map differ in shape, the affine is not 4x4 and
        invertible, or the result or threshold is invalid.
    """
    volume = np.asarray(volume_hu)
    if volume.ndim != 3:
        raise ValueError("volume_hu must be a 3D array [slice, row, column].")
    check_result(result, *volume.shape)
    threshold = check_threshold(threshold)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ValueError("affine must be an invertible 4x4 voxel-to-patient matrix.")
    labels = np.asarray(result.label_map)
    lr, ap, si = _axes(affine)
    centroid = _label_centroid(labels)
    if centroid is None:
        centroid = (np.array(volume.shape) - 1) / 2.0
    height, width, _ = SUMMARY_SHAPE
    box = (_PANEL_W, height - _TITLE_H - _MARGIN)
    # sagittal: anterior on the left, i.e. index increasing towards posterior (+y)
    sag = _reformat(volume, labels, affine, lr, ap, si, affine[1, ap] < 0, round(centroid[lr]))
    # coronal: patient right on the viewer's left, i.e. index increasing towards left (+x)
    cor = _reformat(volume, labels, affine, ap, lr, si, affine[0, lr] < 0, round(centroid[ap]))
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    title = "Cervical spine fracture AI - summary"
    draw.text((_MARGIN + 6, _TITLE_H // 2), title, fill=_FG, font=_font(26), anchor="lm")
    if is_demo(result):
        draw.text(
            (width - _MARGIN - 6, _TITLE_H // 2),
            DEMO_DISCLAIMER,
            fill=_ALERT,
            font=_font(20),
            anchor="rm",
        )
    draw.line((0, _TITLE_H - 1, width, _TITLE_H - 1), fill=(90, 90, 90), width=1)
    canvas.paste(_panel(*sag, box=box, caption="sagittal (A left)"), (_MARGIN, _TITLE_H))
    canvas.paste(_panel(*cor, box=box, caption="coronal (R left)"), (_MARGIN + _PANEL_W, _TITLE_H))
    table_x = 2 * _MARGIN + 2 * _PANEL_W
    canvas.paste(
        _table(result, threshold, (width - table_x - _MARGIN, box[1]), software_version),
        (table_x, _TITLE_H),
    )
    out = np.asarray(canvas, dtype=np.uint8)
    assert out.shape == SUMMARY_SHAPE
    return out


def render_summary_png(
    path: str | Path,
    volume_hu: np.ndarray,
    affine: np.ndarray,
    result: PipelineResult,
    *,
    threshold: float,
    software_version: str | None = None,
) -> Path:
    """Render the summary image (see :func:`render_summary`) and save it as PNG at ``path``."""
    path = Path(path)
    image = render_summary(
        volume_hu, affine, result, threshold=threshold, software_version=software_version
    )
    Image.fromarray(image).save(path, format="PNG")
    return path


def write_summary(
    source_datasets: Sequence[Dataset],
    volume_hu: np.ndarray,
    affine: np.ndarray,
    result: PipelineResult,
    *,
    threshold: float,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    software_version: str,
    instance_number: int = 1,
    content_datetime: datetime.datetime | None = None,
) -> hd.sc.SCImage:
    """Write the summary image as an RGB Secondary Capture in the source study.

    Renders with :func:`render_summary` and wraps the image with
    :func:`write_summary_image`.

    Parameters
    ----------
    source_datasets
        CT slices of the selected series in volume slice order (headers are enough).
    volume_hu, affine
        The volume the pipeline ran on (same grid as ``result.label_map``).
    result
        Pipeline output.
    threshold
        Decision threshold in (0, 1).
    series_instance_uid, sop_instance_uid, series_number, instance_number
        Identity of the new instance, chosen by the caller.
    software_version
        Version of cspine-node.
    content_datetime
        Creation date/time to record; ``None`` means now.

    Returns
    -------
    highdicom.sc.SCImage
        RGB Secondary Capture of shape ``SUMMARY_SHAPE`` with no burned-in patient
        identifiers (``BurnedInAnnotation`` NO); the disclaimer, when demo, is also in
        ImageComments and SeriesDescription.

    Raises
    ------
    ValueError
        On invalid arguments (see :func:`render_summary`).
    """
    sources = check_sources(source_datasets)
    first = sources[0]
    check_result(result, len(sources), int(first.Rows), int(first.Columns))
    if np.shape(volume_hu) != result.label_map.shape:
        raise ValueError(
            f"volume_hu shape {np.shape(volume_hu)} must equal result.label_map shape "
            f"{result.label_map.shape}."
        )
    check_identity(
        sources,
        series_instance_uid,
        sop_instance_uid,
        series_number,
        instance_number,
        software_version,
    )
    pixels = render_summary(
        volume_hu, affine, result, threshold=threshold, software_version=software_version
    )
    return write_summary_image(
        sources,
        pixels,
        result,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        series_number=series_number,
        software_version=software_version,
        instance_number=instance_number,
        content_datetime=content_datetime,
    )


def write_summary_image(
    source_datasets: Sequence[Dataset],
    pixels: np.ndarray,
    result: PipelineResult,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    software_version: str,
    instance_number: int = 1,
    content_datetime: datetime.datetime | None = None,
) -> hd.sc.SCImage:
    """Wrap an image drawn by :func:`render_summary` as an RGB Secondary Capture.

    The worker renders first and writes later, so that the CT volume can be released
    before the SEG is built (it is the largest array of a job). Arguments and result as
    :func:`write_summary`, with ``pixels`` the rendered image.

    Raises
    ------
    ValueError
        On invalid identity arguments, sources or result, or when ``pixels`` is not a
        uint8 array of shape ``SUMMARY_SHAPE``.
    """
    sources = check_sources(source_datasets)
    first = sources[0]
    check_result(result, len(sources), int(first.Rows), int(first.Columns))
    series_number, instance_number = check_identity(
        sources,
        series_instance_uid,
        sop_instance_uid,
        series_number,
        instance_number,
        software_version,
    )
    if (
        not isinstance(pixels, np.ndarray)
        or pixels.dtype != np.uint8
        or pixels.shape != SUMMARY_SHAPE
    ):
        raise ValueError(
            f"pixels must be a uint8 array of shape {SUMMARY_SHAPE} drawn by render_summary, "
            f"got {getattr(pixels, 'dtype', type(pixels).__name__)} "
            f"{getattr(pixels, 'shape', '')}."
        )
    when = resolve_datetime(content_datetime)
    demo = is_demo(result)
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=first.StudyInstanceUID,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=("P", "F"),
        contributing_equipment=contributing_equipment(result.models, when),
    )
    # The image holds a sagittal and a coronal panel, so no single orientation applies:
    # Patient Orientation is type 2 in the General Image module and is left empty.
    sc.PatientOrientation = []  # written as an empty value
    sc.Modality = "OT"
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "NO"
    sc.BodyPartExamined = "CSPINE"  # unpaired, so Laterality (type 2C) is absent
    sc.SeriesDescription = series_description(SUMMARY_SERIES_DESCRIPTION, demo)
    sc.ManufacturerModelName = MANUFACTURER
    sc.SoftwareVersions = software_version
    sc.ImageType = ["DERIVED", "SECONDARY"]
    # marked as made by the algorithm (IHE AIR): derivation and Contributing Equipment;
    # Burned In Annotation stays NO, as it speaks of identifying the patient, which the
    # drawn text never does
    sc.RecognizableVisualFeatures = "NO"
    models = ", ".join(f"{m.name} {m.version}" for m in result.models)
    sc.DerivationDescription = truncate(f"{AI_PRODUCED} (models: {models})", 1024)
    sc.DerivationCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.cid7203.MultiplanarReformatting),
        hd.sr.CodedConcept.from_code(codes.cid7203.SegmentationImageDerivation),
    ]
    comment = f"{AI_PRODUCED}; models: {models}"
    sc.ImageComments = f"{DEMO_DISCLAIMER}; {comment}" if demo else comment
    copy_patient_study(first, sc)
    stamp(sc, when)
    return sc
