"""Shared pieces of the output writers: codes, validation, identity and dates.

Codes used by every writer, with where they were verified:

- cervical vertebrae C1..C7: SNOMED CT concepts shipped in pydicom's DICOM code tables
  (``pydicom.sr.codedict.codes.SCT.C1Vertebra`` .. ``C7Vertebra``; members of DICOM
  CID 7151 "Segmentation Property Types" among others);
- segmented property category: SCT 91723000 "Anatomical Structure" (CID 7150);
- algorithm family: DCM 123110 "Artificial Intelligence" (CID 7162).
"""

from __future__ import annotations

import copy
import datetime
import logging
import re
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.charset import python_encoding
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, TM

from ai.types import VERTEBRAE, ModelIdentity, PipelineResult
from dicom_node.uids import device_uid

logger = logging.getLogger(__name__)

MANUFACTURER = "cspine-node"
"""Manufacturer written into every output."""

DEMO_DISCLAIMER = "synthetic demo weights, not for clinical use"
"""Text carried by every output made with a demo model (same text as ``ai.modelpkg.DEMO_LABEL``)."""

VERTEBRA_CODES: dict[str, Code] = {
    name: getattr(codes.cid7603, f"{name}Vertebra") for name in VERTEBRAE
}
"""SNOMED CT code of each cervical vertebra, e.g. ``C1`` -> SCT 14806007 "C1 vertebra",
taken from DICOM CID 7603 "Vertebra" (the finding sites IHE AIR asks for)."""

AI_PRODUCED = "produced by the cspine-node AI algorithm, not verified by a physician"
"""How an output says that an algorithm made it (summary image Derivation Description)."""

VERTEBRA_COLORS: dict[str, tuple[int, int, int]] = {
    "C1": (230, 25, 75),
    "C2": (60, 180, 75),
    "C3": (255, 225, 25),
    "C4": (0, 130, 200),
    "C5": (245, 130, 48),
    "C6": (145, 30, 180),
    "C7": (70, 240, 240),
}
"""sRGB display colour of each vertebra, shared by the SEG and the summary image."""

_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

_PATIENT_STUDY_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)

_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
"""Type 2 attributes of the Patient and General Study modules that every output carries:
copied from the source, empty when the source lacks them (highdicom reads each of them
from the first source and would stop on a missing one)."""

_PATIENT_SEX_VALUES = frozenset({"M", "F", "O"})
"""Enumerated values of Patient's Sex (0010,0040); anything else is written empty."""

PLANE_KEYWORDS = (
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
)
"""What places an image as a plane in a frame of reference."""
_GEOMETRY_KEYWORDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    *PLANE_KEYWORDS,
)


def has_plane(image: Dataset) -> bool:
    """Whether ``image`` is a plane in a frame of reference (every :data:`PLANE_KEYWORDS`
    present and not empty)."""
    return all(
        keyword in image and image[keyword].value not in (None, "") for keyword in PLANE_KEYWORDS
    )


def is_demo(result: PipelineResult) -> bool:
    """Return whether any model that produced ``result`` carries demo weights."""
    return any(model.demo for model in result.models)


def check_uid(value: str, name: str) -> str:
    """Return ``value`` if it is a valid DICOM UID, else raise ``ValueError``."""
    if not isinstance(value, str) or len(value) > 64 or not _UID_PATTERN.fullmatch(value):
        raise ValueError(f'Argument "{name}" must be a valid DICOM UID, got {value!r}.')
    return value


def check_positive_int(value: int, name: str, upper: int = 2**31 - 1) -> int:
    """Return ``value`` if it is an integer in ``[1, upper]``, else raise."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f'Argument "{name}" must be an integer.')
    if not 1 <= int(value) <= upper:
        raise ValueError(f'Argument "{name}" must be an integer in [1, {upper}], got {value}.')
    return int(value)


def check_threshold(threshold: float) -> float:
    """Return ``threshold`` as float if it lies in the open interval (0, 1), else raise."""
    value = float(threshold)
    if not 0.0 < value < 1.0 or not np.isfinite(value):
        raise ValueError(f'Argument "threshold" must lie in the open interval (0, 1), got {value}.')
    return value


def check_software_version(software_version: str) -> str:
    """Return ``software_version`` if it is a non-empty string of at most 64 characters."""
    if not isinstance(software_version, str) or not software_version.strip():
        raise ValueError('Argument "software_version" must be a non-empty string.')
    if len(software_version) > 64:
        raise ValueError('Argument "software_version" must have at most 64 characters.')
    return software_version


def check_identity(
    sources: Sequence[Dataset],
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    software_version: str,
) -> tuple[int, int]:
    """Validate the identity arguments every writer takes.

    Returns
    -------
    tuple of int
        The checked ``(series_number, instance_number)``.

    Raises
    ------
    ValueError
        When a UID is invalid, the series UID is one of the sources', a number is not a
        positive integer, or the software version is empty.
    """
    check_uid(series_instance_uid, "series_instance_uid")
    check_uid(sop_instance_uid, "sop_instance_uid")
    if series_instance_uid in {ds.SeriesInstanceUID for ds in sources}:
        raise ValueError('Argument "series_instance_uid" must differ from the source series UID.')
    check_software_version(software_version)
    return (
        check_positive_int(series_number, "series_number"),
        check_positive_int(instance_number, "instance_number"),
    )


def check_sources(source_datasets: Sequence[Dataset], *, geometry: bool = True) -> list[Dataset]:
    """Validate the source CT slices and return them as a list.

    Parameters
    ----------
    source_datasets
        CT slices of one series in volume slice order (ascending along the slice normal).
    geometry
        Also require the image-plane attributes and check the slice order.

    Returns
    -------
    list[pydicom.Dataset]
        The same datasets.

    Raises
    ------
    ValueError
        If the list is empty, the slices come from several studies or series, lack a
        required attribute, differ in Rows/Columns/orientation/frame of reference, or
        are not ordered ascending along the slice normal.
    """
    sources = list(source_datasets)
    if not sources:
        raise ValueError('Argument "source_datasets" must contain at least one dataset.')
    for ds in sources:
        if not isinstance(ds, Dataset):
            raise TypeError('Items of "source_datasets" must be pydicom Datasets.')
    required = _GEOMETRY_KEYWORDS if geometry else _GEOMETRY_KEYWORDS[:4]
    for index, ds in enumerate(sources):
        missing = [kw for kw in required if kw not in ds or ds[kw].value in (None, "")]
        if missing:
            raise ValueError(
                f"Source dataset #{index} lacks required attribute(s): {', '.join(missing)}."
            )
    sources = [_with_patient_study_type2(_without_empty_charset(ds)) for ds in sources]
    first = sources[0]
    if len({ds.StudyInstanceUID for ds in sources}) != 1:
        raise ValueError("All source datasets must belong to the same study.")
    if not geometry:
        return sources
    for kw in ("SeriesInstanceUID", "FrameOfReferenceUID", "Rows", "Columns"):
        if len({str(ds[kw].value) for ds in sources}) != 1:
            raise ValueError(f"All source datasets must share the same {kw}.")
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    for ds in sources[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, float), orientation, atol=1e-4):
            raise ValueError("All source datasets must share the same ImageOrientationPatient.")
    if len(sources) > 1:
        normal = np.cross(orientation[:3], orientation[3:])
        positions = np.array(
            [np.asarray(ds.ImagePositionPatient, float) @ normal for ds in sources]
        )
        if not np.all(np.diff(positions) > 0):
            raise ValueError(
                "Source datasets must be in volume slice order: strictly ascending position "
                "along the slice normal (label_map[k] belongs to source_datasets[k])."
            )
        spacing = float(np.median(np.diff(positions)))
    else:
        spacing = 1.0
    # highdicom reads SliceThickness (type 2 in the CT Image module, so it may be empty)
    # for the SEG pixel measures; fall back to the slice spacing
    return [_with_slice_thickness(ds, spacing) for ds in sources]


def _with_slice_thickness(ds: Dataset, spacing: float) -> Dataset:
    if ds.get("SliceThickness") not in (None, ""):
        return ds
    clone = _shallow_clone(ds)
    if "SliceThickness" in clone:
        del clone.SliceThickness  # a new element below, the caller's stays as it is
    clone.SliceThickness = round(spacing, 6)
    return clone


def _without_empty_charset(ds: Dataset) -> Dataset:
    """``ds``, or a shallow copy with a Specific Character Set highdicom accepts.

    * empty: removed (it means the default repertoire, the same as absent);
    * a single code-extension term such as ``ISO 2022 IR 100`` (PS3.3 C.12.1.1.2 allows
      it for one single-byte repertoire): written as its plain term ``ISO_IR 100``, the
      same characters without the escape-sequence machinery, which highdicom refuses
      alone; ``ISO 2022 IR 6`` (the default repertoire) is removed.
    """
    if "SpecificCharacterSet" not in ds:
        return ds
    value = ds.SpecificCharacterSet
    if value in ("", None):
        clone = _shallow_clone(ds)
        del clone.SpecificCharacterSet
        return clone
    terms = [value] if isinstance(value, str) else list(value)
    if len(terms) != 1 or not str(terms[0]).startswith("ISO 2022 IR "):
        return ds
    number = str(terms[0]).removeprefix("ISO 2022 IR ").strip()
    clone = _shallow_clone(ds)
    if number == "6":
        del clone.SpecificCharacterSet
    elif f"ISO_IR {number}" in python_encoding:
        del clone.SpecificCharacterSet  # a new element: the clone shares the source's
        clone.SpecificCharacterSet = f"ISO_IR {number}"
    else:  # a multi-byte set that only exists with code extensions: leave it as it is
        return ds
    return clone


def _with_patient_study_type2(ds: Dataset) -> Dataset:
    """``ds``, or a shallow copy in which every Type 2 Patient/General Study attribute the
    outputs carry is present, empty where ``ds`` lacks it or holds a value that cannot be
    written (an unparseable date or time, a Patient's Sex outside M, F, O).

    Empty is what the standard prescribes for an unknown Type 2 value; ``ds`` itself is
    left untouched (its elements are replaced on the copy, never changed).
    """
    blank = [kw for kw in _TYPE2_PATIENT_STUDY if kw not in ds or not _writable(ds, kw)]
    if not blank:
        return ds
    clone = _shallow_clone(ds)
    for keyword in blank:
        if keyword in clone:
            del clone[keyword]  # a new element below, the caller's stays as it is
        setattr(clone, keyword, None)
    return clone


def _writable(ds: Dataset, keyword: str) -> bool:
    """Whether the value of ``keyword`` in ``ds`` can be copied into an output as it is."""
    value = ds[keyword].value
    if value in (None, ""):
        return True
    if keyword == "PatientSex":
        return str(value) in _PATIENT_SEX_VALUES
    parse = {"StudyDate": DA, "PatientBirthDate": DA, "StudyTime": TM}.get(keyword)
    if parse is None:
        return True
    try:
        parse(str(value))
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def _shallow_clone(ds: Dataset) -> Dataset:
    """A new Dataset holding the same elements; deleting or adding elements on it leaves
    ``ds`` untouched (``Dataset(ds)`` and ``copy.copy`` would share the element dict)."""
    clone = Dataset({elem.tag: elem for elem in ds})
    if hasattr(ds, "file_meta"):
        clone.file_meta = ds.file_meta
    return clone


def check_result(result: PipelineResult, n_slices: int, rows: int, columns: int) -> None:
    """Validate a :class:`ai.types.PipelineResult` against the source geometry.

    Raises
    ------
    ValueError
        If the label map has the wrong shape or values, the vertebra verdicts are not
        C1..C7 in order, a probability is outside [0, 1], or ``assessed`` and
        ``probability`` disagree.
    TypeError
        If ``result`` is not a ``PipelineResult``.
    """
    if not isinstance(result, PipelineResult):
        raise TypeError('Argument "result" must be an ai.types.PipelineResult.')
    label_map = result.label_map
    if not isinstance(label_map, np.ndarray) or label_map.ndim != 3:
        raise ValueError("result.label_map must be a 3D numpy array [slice, row, column].")
    if label_map.shape != (n_slices, rows, columns):
        raise ValueError(
            f"result.label_map shape {label_map.shape} must equal (number of source datasets, "
            f"Rows, Columns) = {(n_slices, rows, columns)}."
        )
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError("result.label_map must have an integer dtype (uint8 expected).")
    if label_map.size and (int(label_map.min()) < 0 or int(label_map.max()) > len(VERTEBRAE)):
        raise ValueError(
            f"result.label_map values must lie in 0..{len(VERTEBRAE)} (0 = background)."
        )
    labels = [v.label for v in result.vertebrae]
    if labels != list(VERTEBRAE):
        raise ValueError(
            f"result.vertebrae must hold one verdict per vertebra C1..C7 in order, got {labels}."
        )
    for verdict in result.vertebrae:
        if verdict.assessed:
            p = verdict.probability
            if p is None or not np.isfinite(p) or not 0.0 <= p <= 1.0:
                raise ValueError(
                    f"Probability of assessed vertebra {verdict.label} must lie in [0, 1], got {p}."
                )
        elif verdict.probability is not None:
            raise ValueError(
                f"Vertebra {verdict.label} is not assessed, so its probability must be None."
            )
    p = result.patient_probability
    if p is not None and (not np.isfinite(p) or not 0.0 <= p <= 1.0):
        raise ValueError(f"result.patient_probability must be None or lie in [0, 1], got {p}.")
    if p is not None and not any(v.assessed for v in result.vertebrae):
        raise ValueError(
            "result.patient_probability must be None when no vertebra was assessed "
            "(a patient probability cannot come from nothing)."
        )
    refused = {"implausible", "no_cervical_spine"}
    for verdict in result.vertebrae:
        if verdict.reason_code in refused and label_map.size:
            value = VERTEBRAE.index(verdict.label) + 1
            if np.any(label_map == value):
                raise ValueError(
                    f"Vertebra {verdict.label} was refused ({verdict.reason_code}) but still "
                    "has voxels in result.label_map; it must not become a segment labelled "
                    f"{verdict.label}."
                )
    if not result.models:
        raise ValueError("result.models must name at least one model.")
    for model in result.models:
        if not isinstance(model, ModelIdentity):
            raise TypeError("result.models must hold ai.types.ModelIdentity items.")


def present_vertebrae(label_map: np.ndarray) -> list[str]:
    """Names of the vertebrae with at least one voxel in ``label_map``, in C1..C7 order.

    One pass of :func:`scipy.ndimage.find_objects` over the array as it is: no copy (a
    ``bincount`` would first cast a 1,200-slice uint8 map to 2.5 GB of int64).
    """
    from scipy import ndimage

    labels = np.asarray(label_map)
    if labels.size == 0:
        return []
    if labels.dtype.kind not in "ui":
        labels = labels.astype(np.int32)
    boxes = ndimage.find_objects(labels, max_label=len(VERTEBRAE))
    return [name for name, box in zip(VERTEBRAE, boxes, strict=True) if box is not None]


def models_text(models: Sequence[ModelIdentity]) -> str:
    """``"name version, name version"`` for the models."""
    return ", ".join(f"{m.name} {m.version}" for m in models)


def truncate(text: str, length: int = 64) -> str:
    """Cut ``text`` to ``length`` characters (LO values hold at most 64)."""
    return text if len(text) <= length else text[: length - 3] + "..."


def algorithm_identification(models: Sequence[ModelIdentity]) -> hd.AlgorithmIdentificationSequence:
    """The SEG Segment Algorithm Identification for the pipeline.

    One item naming all models (``name+name``), their versions (``version+version``),
    family Artificial Intelligence, and one parameter per model with its sha256 prefix.
    """
    return hd.AlgorithmIdentificationSequence(
        name=truncate("+".join(m.name for m in models)),
        family=codes.cid7162.ArtificialIntelligence,
        version=truncate("+".join(m.version for m in models)),
        source=MANUFACTURER,
        parameters={m.name: f"{m.version} sha256:{m.sha256[:16]}" for m in models},
    )


def model_device_uid(model: ModelIdentity) -> str:
    """Device UID of one model package (:func:`dicom_node.uids.device_uid`)."""
    return device_uid(model.name, model.version, model.sha256)


def contributing_equipment(
    models: Sequence[ModelIdentity], when: datetime.datetime
) -> list[hd.ContributingEquipment]:
    """One Contributing Equipment item (Processing Equipment) per model.

    As IHE AIR asks of each algorithm: Manufacturer, Manufacturer's Model Name (the
    package name), Software Versions (its version) and a Device UID that changes with
    every model package (:func:`model_device_uid`).
    """
    items = []
    for model in models:
        description = f"model {model.name} {model.version} sha256:{model.sha256[:16]}"
        if model.demo:
            description += f" ({DEMO_DISCLAIMER})"
        item = hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=truncate(model.name),
            software_versions=truncate(model.version),
            contribution_datetime=when,
            contribution_description=truncate(description),
        )
        item.DeviceUID = model_device_uid(model)
        items.append(item)
    return items


def resolve_datetime(content_datetime: datetime.datetime | None) -> datetime.datetime:
    """The content date/time to stamp: the given one, or now (whole seconds)."""
    when = content_datetime if content_datetime is not None else datetime.datetime.now()
    return when.replace(microsecond=0)


def stamp(ds: Dataset, when: datetime.datetime) -> None:
    """Make every creation date/time of ``ds`` equal ``when`` so output is deterministic.

    highdicom stamps ``datetime.now()`` into InstanceCreation/Content dates and its own
    Contributing Equipment item; re-writing them means the same inputs, UIDs and
    ``content_datetime`` give identical datasets.
    """
    date, time = DA(when.date()), TM(when.time())
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    if "ContentDate" in ds:
        ds.ContentDate = date
        ds.ContentTime = time
    ds.SeriesDate = date
    ds.SeriesTime = time
    if "DateOfSecondaryCapture" in ds:
        ds.DateOfSecondaryCapture = date
        ds.TimeOfSecondaryCapture = time
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(when)


def blank_invalid_dates(ds: Dataset) -> Dataset:
    """Blank top-level DA, TM and DT values of ``ds`` that are not valid dates or times.

    Some senders write placeholders such as ``00000000``; the writers copy and parse the
    source's study dates, and an unparseable one would stop every output. The values
    are blanked in place (they are Type 2 in the modules the writers copy); the stored
    source file is not touched. Returns ``ds``.
    """
    from pydicom.datadict import dictionary_VR
    from pydicom.valuerep import DA, DT, TM

    parsers = {"DA": DA, "TM": TM, "DT": DT}
    date_tags = []
    for raw in ds.elements():  # as stored: only date and time elements get decoded below
        vr = raw.VR
        if vr in (None, "UN"):  # implicit VR, or unknown: decoding uses the dictionary VR
            try:
                vr = dictionary_VR(raw.tag)
            except KeyError:
                continue
        if vr in parsers:
            date_tags.append(raw.tag)
    for tag in date_tags:
        elem = ds[tag]
        parse = parsers.get(elem.VR)
        if parse is None or elem.VM != 1 or not elem.value:
            continue
        try:
            parse(str(elem.value))
        except (ValueError, TypeError, OverflowError):
            ds[elem.tag].value = None
    return ds


def copy_patient_study(source: Dataset, target: Dataset) -> None:
    """Copy the Patient and General Study attributes of ``source`` onto ``target``.

    Type 2 attributes (``_TYPE2_PATIENT_STUDY``) are always written, empty when
    ``source`` lacks them; Type 3 attributes are written only when ``source`` has a
    value, and removed from ``target`` otherwise.
    """
    for keyword in _PATIENT_STUDY_KEYWORDS:
        present = keyword in source and source[keyword].value not in (None, "", [])
        if present:
            target[keyword] = copy.deepcopy(source[keyword])
        elif keyword in _TYPE2_PATIENT_STUDY:
            if keyword in target:
                del target[keyword]
            setattr(target, keyword, None)
        elif keyword in target and keyword not in ("StudyInstanceUID", "SpecificCharacterSet"):
            del target[keyword]


def tracking_uid(*parts: str) -> str:
    """A deterministic UID from ``parts`` (same parts, same UID)."""
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def series_description(kind: str, demo: bool) -> str:
    """SeriesDescription text, with the demo disclaimer when needed (at most 64 chars)."""
    return truncate(f"{kind} ({DEMO_DISCLAIMER})" if demo else kind)
