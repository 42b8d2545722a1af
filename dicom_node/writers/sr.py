"""Comprehensive 3D SR with a TID 1500 Measurement Report of the fracture verdicts.

Content tree written by :func:`write_sr` (all codes verified in pydicom's DICOM code
tables, except SCT 125605004 which is the SNOMED CT concept "Fracture of bone
(disorder)")::

    CONTAINER Imaging Measurement Report (DCM 126000, TID 1500)
      language, observation context (device observer "cspine-node"),
      procedure reported LN 25045-6 "CT unspecified body region" (CID 100)
      CONTAINER Imaging Measurements (DCM 126010)
        per vertebra C1..C7, one Measurement Group with
          tracking identifier "C1".. and a tracking UID (the same UID as the SEG segment),
          finding type SCT 125605004 "Fracture of bone",
          finding site the vertebra's SNOMED CT code from CID 7603 "Vertebra"
            (e.g. SCT 14806007 "C1 vertebra"),
          algorithm identification (model names + versions, parameter "threshold=<t>"),
          NUM DCM 122157 "Probability", unit UCUM "{probability}" (dimensionless, 0..1),
          CODE "Fracture of bone" = SCT 52101004 "Present" | SCT 272519000 "Absent"
            (probability >= threshold means present),
        a vertebra that was not assessed has no NUM; its CODE is
          SCT 373121007 "Not Evaluated" and a TEXT DCM 121106 "Comment" holds
          "not assessed: <reason>".
        A vertebra with voxels in the SEG is a TID 1411 Volumetric ROI group that
        references its segment; one without voxels (e.g. outside the field of view)
        has no segment to reference and is a TID 1501 group (tracking ID + finding site).
        A vertebra with voxels also has, right after its TID 1411 group, a TID 1410
          Planar ROI group with the same tracking identifier and UID, finding type, site
          and algorithm, and no values: its Image Region is a POLYLINE SCOORD of the
          vertebra's outline on the CT slice nearest its centroid (largest part, holes
          filled, along the pixel edges). It places the finding on an image, which
          viewers such as OHIF need to show a TID 1500 finding at all.
        A vertebra without voxels (no place on any slice) has instead, right after its
          TID 1501 group, a TID 1410 group with the same tracking identifier and UID,
          finding type, site and algorithm, and no values, whose Image Region is the field
          of view it was sought in: a closed POLYLINE SCOORD3D along the outer edges of the
          middle CT slice (corners and middles of the edges), in the CT's frame of
          reference. It says where the node looked,
          never where the vertebra is.
        one patient-level TID 1501 group "patient" with finding site SCT 122494005
          "Cervical spine", NUM "Probability" (INFERRED FROM a SCOORD3D in the CT's
          frame of reference: the line through the assessed vertebrae, one point per
          vertebra at the centre of its outline, C1 down), NUM DCM 122411 "Threshold
          Value", the present/absent/not-evaluated CODE, and TEXT comments (demo
          disclaimer, series-selection note, "not assessed: <reason>"). Without a patient
          probability (no vertebra assessed) it is followed by a TID 1410 group of the
          same finding at the field of view examined, as for a vertebra without voxels.

The not-processed SR (:func:`write_not_processed_sr`) holds one TID 1501 group "study not
processed" and, when one of its sources is an image with a plane in a frame of reference
(a CT slice), a TID 1410 group of the same finding at that image's field of view.

OHIF 3.13.2 shows a finding only through its spatial coordinates and fails on a TID
1500 finding without any (``docs/operations.md`` section 8, step 9): with the TID 1410
groups and the patient's SCOORD3D every finding has them, whether the node found it or
not; only a not-processed SR whose sources hold no such image still has none.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from typing import TypeAlias, cast

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage

from ai.types import VERTEBRAE, ModelIdentity, PipelineResult, VertebraResult
from dicom_node.uids import pipeline_device_uid
from dicom_node.writers.common import (
    DEMO_DISCLAIMER,
    MANUFACTURER,
    VERTEBRA_CODES,
    check_identity,
    check_result,
    check_sources,
    check_threshold,
    contributing_equipment,
    copy_patient_study,
    has_plane,
    is_demo,
    model_device_uid,
    present_vertebrae,
    resolve_datetime,
    series_description,
    stamp,
    tracking_uid,
    truncate,
)
from dicom_node.writers.seg import segment_numbers

logger = logging.getLogger(__name__)

FRACTURE = hd.sr.CodedConcept("125605004", "SCT", "Fracture of bone")
"""Finding type and qualitative-evaluation name: SNOMED CT "Fracture of bone (disorder)"."""
PROBABILITY = codes.DCM.Probability
"""Measurement name of a fracture probability: DCM 122157 "Probability"."""
PROBABILITY_UNIT = hd.sr.CodedConcept("{probability}", "UCUM", "probability")
"""UCUM annotation for a dimensionless probability in [0, 1]."""
THRESHOLD = codes.DCM.ThresholdValue
"""Measurement name of the decision threshold: DCM 122411 "Threshold Value"."""
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
NOT_EVALUATED = codes.SCT.NotEvaluated
COMMENT = codes.DCM.Comment
PROCEDURE = codes.cid100.CTUnspecifiedBodyRegion
PATIENT_TRACKING_ID = "patient"
NOT_PROCESSED_TRACKING_ID = "study not processed"

MeasurementGroup: TypeAlias = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
)
"""A TID 1501 or TID 1411 measurement group: the one that holds a finding's values."""

SR_SERIES_DESCRIPTION = "C-spine SR"
NOT_PROCESSED_SERIES_DESCRIPTION = "C-spine no result"


def _verdict(probability: float | None, threshold: float) -> hd.sr.CodedConcept:
    if probability is None:
        return NOT_EVALUATED
    return PRESENT if probability >= threshold else ABSENT


def _observation_context(
    models: Sequence[ModelIdentity], software_version: str
) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        # the pipeline's UID: changes with the node version and with every model package
        uid=pipeline_device_uid([model_device_uid(m) for m in models], software_version),
        name=MANUFACTURER,
        manufacturer_name=MANUFACTURER,
        model_name=truncate("+".join(m.name for m in models) or MANUFACTURER),
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )


def _algorithm(
    models: Sequence[ModelIdentity], threshold: float | None
) -> hd.sr.AlgorithmIdentification:
    parameters = [f"{m.name} {m.version} sha256:{m.sha256[:16]}" for m in models]
    if threshold is not None:
        parameters.insert(0, f"threshold={threshold:g}")
    return hd.sr.AlgorithmIdentification(
        name=truncate("+".join(m.name for m in models)),
        version=truncate("+".join(m.version for m in models)),
        parameters=parameters,
        family=codes.cid7162.ArtificialIntelligence,
        manufacturer=MANUFACTURER,
    )


def _add_comments(group: MeasurementGroup, texts: Sequence[str]) -> None:
    for text in texts:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=COMMENT,
                value=text,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )


def _outline(mask: np.ndarray) -> np.ndarray:
    """Closed polygon along the pixel edges around the largest part of a 2D mask.

    The largest 4-connected part of ``mask``, its holes filled, is traced along its
    outer pixel edges; the vertices where the outline keeps its direction are dropped.
    Written here because no dependency traces pixel edges (scikit-image's
    ``find_contours``, not a dependency, draws iso-lines through pixel centres, which
    cut the corner pixels of a segment).

    Parameters
    ----------
    mask
        2D boolean array [row, column] with at least one true pixel.

    Returns
    -------
    numpy.ndarray
        ``(n, 2)`` float array of (column, row) pixel-corner coordinates as SCOORD writes
        them (0.0\\0.0 is the top left corner of the top left pixel); the last vertex
        repeats the first (a closed polyline).

    Raises
    ------
    ValueError
        If ``mask`` has no true pixel.
    """
    from scipy import ndimage

    parts, count = ndimage.label(np.asarray(mask, dtype=bool))
    if count == 0:
        raise ValueError("The mask has no pixel to outline.")
    largest = int(np.argmax(np.bincount(parts.ravel())[1:])) + 1
    padded = np.pad(ndimage.binary_fill_holes(parts == largest), 1)
    rows, cols = padded.shape
    inside = padded[1:-1, 1:-1]
    # pixel edges with the part on their right, clockwise on screen (x right, y down)
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for (dr, dc), (x0, y0), (x1, y1) in (
        ((-1, 0), (0, 0), (1, 0)),  # top edge: the pixel above is outside
        ((0, 1), (1, 0), (1, 1)),  # right edge
        ((1, 0), (1, 1), (0, 1)),  # bottom edge
        ((0, -1), (0, 1), (0, 0)),  # left edge
    ):
        outside = ~padded[1 + dr : rows - 1 + dr, 1 + dc : cols - 1 + dc]
        for r, c in zip(*np.nonzero(inside & outside), strict=True):
            edges.setdefault((int(c) + x0, int(r) + y0), []).append((int(c) + x1, int(r) + y1))
    loops = []
    while edges:  # every vertex has as many edges in as out: each walk comes back
        start = min(edges)
        here, heading, loop = start, (0, 0), [start]
        while True:
            options = edges[here]
            # where the part touches itself diagonally, turn left: one loop round it all
            nxt = min(
                options,
                key=lambda o: heading[0] * (o[1] - here[1]) - heading[1] * (o[0] - here[0]),
            )
            options.remove(nxt)
            if not options:
                del edges[here]
            heading, here = (nxt[0] - here[0], nxt[1] - here[1]), nxt
            if here == start:
                break
            loop.append(here)
        loops.append(np.array(loop, dtype=float))

    def area(points: np.ndarray) -> float:
        x, y = points[:, 0], points[:, 1]
        return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)

    points = max(loops, key=area)
    before = points - np.roll(points, 1, axis=0)
    after = np.roll(points, -1, axis=0) - points
    corners = points[np.any(before != after, axis=1)]
    return np.vstack([corners, corners[:1]])


def _outlines(
    label_map: np.ndarray, sources: Sequence[Dataset]
) -> dict[str, tuple[np.ndarray, Dataset]]:
    """Per vertebra with voxels, its outline on the CT slice nearest its centroid.

    The slice is the one, among those holding voxels of the vertebra, whose index is
    nearest the mean slice index of all its voxels; the outline is :func:`_outline` of
    the vertebra's pixels there.

    Parameters
    ----------
    label_map
        Label map [slice, row, column] on the grid of ``sources`` (value ``n`` is
        ``VERTEBRAE[n - 1]``).
    sources
        CT slices in volume slice order.

    Returns
    -------
    dict
        Vertebra name -> (outline as SCOORD graphic data, the CT slice it lies on), for
        the vertebrae present, in C1..C7 order.
    """
    from scipy import ndimage

    labels = np.asarray(label_map)
    if labels.dtype.kind not in "ui":
        labels = labels.astype(np.int32)
    outlines = {}
    boxes = ndimage.find_objects(labels, max_label=len(VERTEBRAE))
    for number, (name, box) in enumerate(zip(VERTEBRAE, boxes, strict=True), start=1):
        if box is None:
            continue
        voxels = labels[box] == number
        counts = voxels.sum(axis=(1, 2))
        centroid = float(np.dot(counts, np.arange(len(counts))) / counts.sum())
        held = np.nonzero(counts)[0]
        k = int(held[np.argmin(np.abs(held - centroid))])
        points = _outline(voxels[k]) + np.array([box[2].start, box[1].start])
        outlines[name] = (_with_edge_midpoints(points), sources[box[0].start + k])
    return outlines


def _with_edge_midpoints(points: np.ndarray) -> np.ndarray:
    """A closed outline of four corners (a rectangular segment) with the middle of each
    edge added: OHIF reads a closed 4- or 5-point polyline as its own rectangle tool and
    fails to rebuild it; any other outline is returned as it is."""
    if len(points) > 5:
        return points
    mids = (points[:-1] + points[1:]) / 2
    out = np.empty((2 * len(points) - 1, 2), dtype=points.dtype)
    out[0::2] = points
    out[1::2] = mids
    return out


def _centreline(
    outlines: dict[str, tuple[np.ndarray, Dataset]], names: Sequence[str]
) -> hd.sr.CoordinatesForMeasurement3D | None:
    """The cervical spine as a line through the given vertebrae, in patient coordinates.

    One point per vertebra, in the order of ``names``: the centre of the area inside the
    vertebra's outline (:func:`_outlines`) on its CT slice, in the frame of reference of
    the CT. A POLYLINE SCOORD3D from two vertebrae on, a POINT for one.

    Parameters
    ----------
    outlines
        :func:`_outlines` of the label map.
    names
        Vertebrae to join (those without an outline are left out).

    Returns
    -------
    highdicom.sr.CoordinatesForMeasurement3D or None
        ``None`` when no named vertebra has an outline.
    """
    points = []
    image = None
    for name in names:
        if name not in outlines:
            continue
        polygon, image = outlines[name]
        points.append(_in_patient(image, np.array([_centre(polygon)]))[0])
    if image is None:
        return None
    return hd.sr.CoordinatesForMeasurement3D(
        graphic_type=(
            hd.sr.GraphicTypeValues3D.POLYLINE
            if len(points) > 1
            else hd.sr.GraphicTypeValues3D.POINT
        ),
        graphic_data=np.array(points),  # (n, 3): (1, 3) for a POINT
        frame_of_reference_uid=image.FrameOfReferenceUID,
    )


def _centre(polygon: np.ndarray) -> tuple[float, float]:
    """Centroid (column, row) of the area of a closed polygon (SCOORD coordinates)."""
    x, y = polygon[:-1, 0], polygon[:-1, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    column = ((x + xn) * cross).sum() / (6 * area)
    row = ((y + yn) * cross).sum() / (6 * area)
    return float(column), float(row)


def _in_patient(image: Dataset, scoord: np.ndarray) -> np.ndarray:
    """Patient coordinates (mm, the image's frame of reference) of SCOORD points.

    ``scoord`` is ``(n, 2)`` (column, row) as SCOORD writes them: 0.0\\0.0 is the top left
    corner of the top left pixel, so a pixel's centre is half a pixel further.
    """
    position = np.asarray(image.ImagePositionPatient, dtype=np.float64)
    orientation = np.asarray(image.ImageOrientationPatient, dtype=np.float64)
    spacing = np.asarray(image.PixelSpacing, dtype=np.float64)
    column, row = scoord[:, :1] - 0.5, scoord[:, 1:] - 0.5
    return np.asarray(
        position + orientation[:3] * spacing[1] * column + orientation[3:] * spacing[0] * row
    )


def _field_of_view(image: Dataset) -> hd.sr.ImageRegion3D:
    """The field of view of a CT slice: its whole pixel area as a closed POLYLINE SCOORD3D.

    Along the outer edges of the image, clockwise on screen from the top left corner:
    each corner and the middle of each edge (nine vertices, the first repeated last), in
    the patient coordinates of the image's frame of reference. The middles change nothing
    of the region; without them the polyline would have 5 vertices, which OHIF takes for a
    rectangle drawn with its own tool and tries, and fails, to rebuild as one.
    """
    rows, columns = int(image.Rows), int(image.Columns)
    x, y = np.array([0, columns / 2, columns]), np.array([0, rows / 2, rows])
    around = [(0, 0), (1, 0), (2, 0), (2, 1), (2, 2), (1, 2), (0, 2), (0, 1), (0, 0)]
    corners = np.array([[x[i], y[j]] for i, j in around], float)
    return hd.sr.ImageRegion3D(
        graphic_type=hd.sr.GraphicTypeValues3D.POLYLINE,
        graphic_data=_in_patient(image, corners),
        frame_of_reference_uid=image.FrameOfReferenceUID,
    )


def _examined_group(
    tracking: hd.sr.TrackingIdentifier,
    site: hd.sr.CodedConcept | Code,
    image: Dataset,
    algorithm: hd.sr.AlgorithmIdentification | None,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The TID 1410 group that locates a finding with no place of its own where it was sought.

    For a finding the node could not place on the image (a vertebra without voxels, the
    patient when no vertebra is placed, a study not processed): same tracking identifier
    and UID as the finding's TID 1501 group, its finding type, site and algorithm, no
    values; its Image Region is the field of view of ``image`` (:func:`_field_of_view`), a
    SCOORD3D in the CT's frame of reference. That is the region examined, not where the
    finding lies: it never says where a vertebra that was not found is. A viewer that
    needs every finding of a TID 1500 report located (OHIF) reads the two groups as one
    finding through their shared tracking UID.

    Parameters
    ----------
    tracking
        The tracking identifier and UID of the finding's TID 1501 group.
    site
        Its finding site.
    image
        The examined image whose field of view locates it (:func:`has_plane` holds).
    algorithm
        The algorithm identification of the report, if any.

    Returns
    -------
    highdicom.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        The group.
    """
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=_field_of_view(image),
        finding_type=FRACTURE,
        finding_sites=[hd.sr.FindingSite(site)],
        algorithm_id=algorithm,
    )


def _same_finding(group: MeasurementGroup) -> hd.sr.TrackingIdentifier:
    """A tracking identifier with the identifier and UID of ``group`` (a second group of
    the same finding)."""
    return hd.sr.TrackingIdentifier(
        uid=group.tracking_uid, identifier=str(group.tracking_identifier)
    )


def _source_image(image: Dataset) -> hd.sr.SourceImageForRegion:
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=image.SOPClassUID,
        referenced_sop_instance_uid=image.SOPInstanceUID,
    )


def _vertebra_group(
    verdict: VertebraResult,
    seg_dataset: Dataset | None,
    segment_number: int | None,
    source_series_uid: str,
    sop_instance_uid: str,
    threshold: float,
    algorithm: hd.sr.AlgorithmIdentification,
) -> MeasurementGroup:
    name = verdict.label
    measurements = []
    if verdict.assessed and verdict.probability is not None:
        measurements.append(
            hd.sr.Measurement(
                name=PROBABILITY, value=float(verdict.probability), unit=PROBABILITY_UNIT
            )
        )
    evaluations = [
        hd.sr.QualitativeEvaluation(name=FRACTURE, value=_verdict(verdict.probability, threshold))
    ]
    sites = [hd.sr.FindingSite(VERTEBRA_CODES[name])]
    group: MeasurementGroup
    if seg_dataset is not None and segment_number is not None:
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=tracking_uid(seg_dataset.SOPInstanceUID, name), identifier=name
            ),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg_dataset.SOPClassUID,
                sop_instance_uid=seg_dataset.SOPInstanceUID,
                segment_number=segment_number,
                source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
            ),
            finding_type=FRACTURE,
            finding_sites=sites,
            algorithm_id=algorithm,
            measurements=measurements,
            qualitative_evaluations=evaluations,
        )
    else:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=tracking_uid(sop_instance_uid, name), identifier=name
            ),
            finding_type=FRACTURE,
            finding_sites=sites,
            algorithm_id=algorithm,
            measurements=measurements,
            qualitative_evaluations=evaluations,
        )
    if not verdict.assessed:
        _add_comments(group, [f"not assessed: {verdict.reason or 'no reason given'}"])
    return group


def _planar_group(
    verdict: VertebraResult,
    outline: tuple[np.ndarray, Dataset],
    tracking: hd.sr.TrackingIdentifier,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The TID 1410 group that places a vertebra's finding on a CT slice.

    Same tracking identifier and UID as the vertebra's TID 1411 group (and its SEG
    segment), same finding type, site and algorithm; its Image Region is a POLYLINE SCOORD
    of the vertebra's outline on the CT slice nearest its centroid (:func:`_outlines`). It
    holds no value of its own: the probability and the verdict are written once, in the
    TID 1411 group. A viewer that needs every finding of a TID 1500 report on an image
    (OHIF) reads the two groups as one finding through their shared tracking UID.

    Parameters
    ----------
    verdict
        The vertebra's result (its label names the finding site).
    outline
        The vertebra's outline and the CT slice it lies on (:func:`_outlines`).
    tracking
        The tracking identifier and UID of the vertebra's TID 1411 group.
    algorithm
        The algorithm identification of the report.

    Returns
    -------
    highdicom.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        The group.
    """
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=outline[0],
            source_image=_source_image(outline[1]),
        ),
        finding_type=FRACTURE,
        finding_sites=[hd.sr.FindingSite(VERTEBRA_CODES[verdict.label])],
        algorithm_id=algorithm,
    )


def _patient_verdict(result: PipelineResult, threshold: float) -> hd.sr.CodedConcept:
    """Present, absent, or not evaluated: "absent" never covers a refused vertebra in view."""
    verdict = _verdict(result.patient_probability, threshold)
    if verdict == ABSENT and result.incomplete:
        return NOT_EVALUATED
    return verdict


def incomplete_reason(result: PipelineResult) -> str:
    """``"incomplete: no fracture in the assessed levels; C7 not assessed (...)"``."""
    refused = "; ".join(f"{v.label} not assessed ({v.reason})" for v in result.incomplete)
    return f"incomplete: no fracture in the assessed levels; {refused}"


def patient_reason(result: PipelineResult) -> str:
    """Why the patient-level finding is not assessed, in the words the outputs use.

    The stage-2 intended-use finding when there is one; the vertebrae's common reason when
    they all share one; otherwise "no vertebra could be assessed".
    """
    stage2 = [f for f in result.findings if f.stage == "stage2"]
    if stage2:
        return "; ".join(f.text for f in stage2)
    if result.not_processed:
        return result.not_processed
    reasons = {v.reason for v in result.vertebrae if not v.assessed and v.reason}
    codes_ = {v.reason_code for v in result.vertebrae if not v.assessed}
    if len(reasons) == 1 and len(codes_) == 1 and codes_ != {"not_in_fov"}:
        return next(iter(reasons))
    return "no vertebra could be assessed"


def write_sr(
    source_datasets: Sequence[Dataset],
    seg_dataset: Dataset | None,
    result: PipelineResult,
    *,
    threshold: float,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    software_version: str,
    selection_note: str | None = None,
    instance_number: int = 1,
    content_datetime: datetime.datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Write the fracture verdicts as a Comprehensive 3D SR (TID 1500 Measurement Report).

    See the module docstring for the content tree and the codes. Each vertebra C1..C7
    gets one measurement group with its values (in order) whose tracking identifier is
    its name; the group references the vertebra's segment in ``seg_dataset`` when the
    vertebra has voxels, and is then followed by a TID 1410 group of the same finding
    that outlines the vertebra on the CT slice nearest its centroid (one without voxels:
    at the field of view of the middle slice, where it was sought). A patient-level
    group ``"patient"`` holds the patient probability (inferred from the line through
    the assessed vertebrae), the threshold and the comments (without a probability: also
    followed by a TID 1410 group at the field of view).

    Parameters
    ----------
    source_datasets
        CT slices of the selected series in volume slice order (headers are enough).
    seg_dataset
        The SEG written by :func:`dicom_node.writers.write_seg` for the same result, or
        ``None`` when the label map holds no vertebra (no SEG can be written then; every
        group is a TID 1501 group without a segment reference).
    result
        Pipeline output.
    threshold
        Decision threshold in (0, 1): probability >= threshold means fracture present.
    series_instance_uid, sop_instance_uid, series_number, instance_number
        Identity of the new instance, chosen by the caller.
    software_version
        Version of cspine-node.
    selection_note
        Optional text recorded as a comment (e.g. why this series was chosen).
    content_datetime
        Creation date/time to record; ``None`` means now.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The SR instance: same study and patient as the source, new series, with the
        source slices and the SEG as evidence.

    Raises
    ------
    ValueError
        On invalid arguments, a threshold outside (0, 1), probabilities outside [0, 1],
        or a SEG that does not belong to the study or lacks a segment for a vertebra
        that has voxels in ``result.label_map``.
    """
    sources = check_sources(source_datasets)
    first = sources[0]
    check_result(result, len(sources), int(first.Rows), int(first.Columns))
    threshold = check_threshold(threshold)
    series_number, instance_number = check_identity(
        sources,
        series_instance_uid,
        sop_instance_uid,
        series_number,
        instance_number,
        software_version,
    )
    if seg_dataset is None:
        numbers: dict[str, int] = {}
        evidence = list(sources)
    else:
        if (
            not isinstance(seg_dataset, Dataset)
            or seg_dataset.get("SOPClassUID") != SegmentationStorage
        ):
            raise ValueError('Argument "seg_dataset" must be a DICOM Segmentation instance.')
        if seg_dataset.StudyInstanceUID != first.StudyInstanceUID:
            raise ValueError(
                'Argument "seg_dataset" must belong to the study of the source datasets.'
            )
        numbers = segment_numbers(seg_dataset)
        evidence = [*sources, seg_dataset]
    if series_instance_uid in (
        first.SeriesInstanceUID,
        None if seg_dataset is None else seg_dataset.SeriesInstanceUID,
    ):
        raise ValueError('Argument "series_instance_uid" must name a new series.')
    missing = [name for name in present_vertebrae(result.label_map) if name not in numbers]
    if missing:
        raise ValueError(
            f"seg_dataset has no segment for vertebra(e) {', '.join(missing)} present in "
            "result.label_map; write the SEG from the same result."
        )
    if selection_note is not None and not str(selection_note).strip():
        raise ValueError('Argument "selection_note" must be None or non-empty text.')
    when = resolve_datetime(content_datetime)
    demo = is_demo(result)

    algorithm = _algorithm(result.models, threshold)
    outlines = _outlines(result.label_map, sources) if seg_dataset is not None else {}
    examined = sources[len(sources) // 2]  # where a finding without a place was sought
    groups: list[MeasurementGroup | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
    for verdict in result.vertebrae:
        group = _vertebra_group(
            verdict,
            seg_dataset,
            numbers.get(verdict.label),
            first.SeriesInstanceUID,
            sop_instance_uid,
            threshold,
            algorithm,
        )
        groups.append(group)
        if verdict.label in outlines and isinstance(
            group, hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        ):
            outline = outlines[verdict.label]
            groups.append(_planar_group(verdict, outline, _same_finding(group), algorithm))
        else:  # not on any slice: located at the field of view it was sought in
            site = VERTEBRA_CODES[verdict.label]
            groups.append(_examined_group(_same_finding(group), site, examined, algorithm))
    patient_measurements = []
    centreline = None
    if result.patient_probability is not None:
        # inferred from the assessed vertebrae: the line through them, C1 down
        centreline = _centreline(
            outlines,
            [v.label for v in result.vertebrae if v.assessed and v.probability is not None],
        )
        patient_measurements.append(
            hd.sr.Measurement(
                name=PROBABILITY,
                value=float(result.patient_probability),
                unit=PROBABILITY_UNIT,
                referenced_coordinates=None if centreline is None else [centreline],
            )
        )
    patient_measurements.append(
        hd.sr.Measurement(name=THRESHOLD, value=threshold, unit=PROBABILITY_UNIT)
    )
    patient = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(sop_instance_uid, PATIENT_TRACKING_ID), identifier=PATIENT_TRACKING_ID
        ),
        finding_type=FRACTURE,
        finding_sites=[hd.sr.FindingSite(codes.SCT.CervicalSpine)],
        algorithm_id=algorithm,
        measurements=patient_measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=FRACTURE, value=_patient_verdict(result, threshold))
        ],
    )
    comments = []
    if result.patient_probability is None:
        comments.append(f"not assessed: {patient_reason(result)}")
    elif _patient_verdict(result, threshold) == NOT_EVALUATED:
        comments.append(f"not assessed: {incomplete_reason(result)}")
    comments += [f"{f.stage} check failed: {f.text}" for f in result.findings]
    if demo:
        comments.append(DEMO_DISCLAIMER)
    if selection_note:
        comments.append(str(selection_note))
    _add_comments(patient, comments)
    groups.append(patient)
    if centreline is None:  # no probability, or no assessed vertebra on a slice
        site = codes.SCT.CervicalSpine
        groups.append(_examined_group(_same_finding(patient), site, examined, algorithm))

    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(result.models, software_version),
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=True,
        contributing_equipment=contributing_equipment(result.models, when),
    )
    _finish(sr, first, software_version, series_description(SR_SERIES_DESCRIPTION, demo), when)
    return sr


def write_not_processed_sr(
    source_datasets: Sequence[Dataset],
    reason: str,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    software_version: str,
    models: Sequence[ModelIdentity] = (),
    instance_number: int = 1,
    content_datetime: datetime.datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Write an SR saying that the study was not processed, and why.

    The TID 1500 report holds one TID 1501 group ``"study not processed"`` with finding
    type "Fracture of bone", finding site "Cervical spine", qualitative evaluation
    SCT 373121007 "Not Evaluated" and a TEXT comment ``"not processed: <reason>"``. When a
    source is an image with a plane in a frame of reference (the first such one), a TID
    1410 group of the same finding (same tracking identifier and UID, no values) follows:
    its Image Region is that image's field of view, a SCOORD3D (viewers such as OHIF need
    every finding located).

    Parameters
    ----------
    source_datasets
        Instances of the study (any series; headers are enough); the SR joins their study
        and lists them as evidence.
    reason
        Why no series was eligible.
    series_instance_uid, sop_instance_uid, series_number, instance_number
        Identity of the new instance, chosen by the caller.
    software_version
        Version of cspine-node.
    models
        Configured models, named in the report (and the demo disclaimer if any is demo).
    content_datetime
        Creation date/time to record; ``None`` means now.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The SR instance.

    Raises
    ------
    ValueError
        If ``reason`` is empty, the sources are empty or span several studies, or an
        identity argument is invalid.
    """
    sources = check_sources(source_datasets, geometry=False)
    first = sources[0]
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError('Argument "reason" must be a non-empty string.')
    series_number, instance_number = check_identity(
        sources,
        series_instance_uid,
        sop_instance_uid,
        series_number,
        instance_number,
        software_version,
    )
    models = list(models)
    when = resolve_datetime(content_datetime)
    demo = any(m.demo for m in models)

    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(sop_instance_uid, NOT_PROCESSED_TRACKING_ID),
            identifier=NOT_PROCESSED_TRACKING_ID,
        ),
        finding_type=FRACTURE,
        finding_sites=[hd.sr.FindingSite(codes.SCT.CervicalSpine)],
        algorithm_id=_algorithm(models, None) if models else None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=FRACTURE, value=NOT_EVALUATED)],
    )
    comments = [f"not processed: {reason.strip()}"]
    if demo:
        comments.append(DEMO_DISCLAIMER)
    _add_comments(group, comments)
    groups: list[MeasurementGroup | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = [group]
    examined = next((ds for ds in sources if has_plane(ds)), None)
    if examined is not None:  # the study's image it was received with: located there
        algorithm = _algorithm(models, None) if models else None
        site = codes.SCT.CervicalSpine
        groups.append(_examined_group(_same_finding(group), site, examined, algorithm))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(models, software_version),
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources,
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=True,
        contributing_equipment=contributing_equipment(models, when) or None,
    )
    _finish(
        sr,
        first,
        software_version,
        series_description(NOT_PROCESSED_SERIES_DESCRIPTION, demo),
        when,
    )
    return sr


def _finish(
    sr: Dataset, first: Dataset, software_version: str, description: str, when: datetime.datetime
) -> None:
    sr.SeriesDescription = description
    sr.ManufacturerModelName = MANUFACTURER
    sr.SoftwareVersions = software_version
    copy_patient_study(first, sr)
    stamp(sr, when)


__all__ = ["write_not_processed_sr", "write_sr"]


def _evaluation_name(code: hd.sr.CodedConcept) -> str:
    if code == PRESENT:
        return "present"
    if code == ABSENT:
        return "absent"
    if code == NOT_EVALUATED:
        return "not assessed"
    raise ValueError(f"Unexpected fracture evaluation {code.value} {code.meaning!r}.")


def _group_summary(group: MeasurementGroup) -> dict[str, object]:
    probabilities = group.get_measurements(name=PROBABILITY)
    thresholds = group.get_measurements(name=THRESHOLD)
    evaluations = group.get_qualitative_evaluations(name=FRACTURE)
    if len(evaluations) != 1:
        raise ValueError("Each measurement group must hold one fracture evaluation.")
    comments = [
        str(item.TextValue)
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT"
        and hd.sr.CodedConcept.from_dataset(item.ConceptNameCodeSequence[0]) == COMMENT
    ]
    reasons = [
        c.split(": ", 1)[1] for c in comments if c.startswith(("not assessed: ", "not processed: "))
    ]
    segment = None
    if isinstance(group, hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations):
        ref = group.referenced_segment
        if ref is not None:
            segment = int(ref[0].ReferencedSOPSequence[0].ReferencedSegmentNumber)
    return {
        "probability": float(probabilities[0].value) if probabilities else None,
        "threshold": float(thresholds[0].value) if thresholds else None,
        # highdicom annotates QualitativeEvaluation.value as a number; it is the coded value
        "evaluation": _evaluation_name(cast(hd.sr.CodedConcept, evaluations[0].value)),
        "reason": reasons[0] if reasons else None,
        "comments": comments,
        "segment_number": segment,
    }


def read_sr_result(dataset: Dataset) -> dict[str, dict[str, object]]:
    """Read back an SR written by :func:`write_sr` or :func:`write_not_processed_sr`.

    Parameters
    ----------
    dataset
        The SR (e.g. from ``pydicom.dcmread``).

    Returns
    -------
    dict
        Tracking identifier (``"C1"``.. ``"C7"``, ``"patient"`` or
        ``"study not processed"``) -> ``{"probability": float | None, "threshold":
        float | None, "evaluation": "present" | "absent" | "not assessed", "reason":
        str | None, "comments": list[str], "segment_number": int | None}``.
    """
    sr = hd.sr.Comprehensive3DSR.from_dataset(dataset, copy=True)
    report = sr.content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise ValueError("The SR content is not a TID 1500 Measurement Report.")
    out: dict[str, dict[str, object]] = {}
    groups: list[MeasurementGroup] = [
        *report.get_volumetric_roi_measurement_groups(),
        *report.get_image_measurement_groups(),
    ]
    for group in groups:
        out[str(group.tracking_identifier)] = _group_summary(group)
    return out
