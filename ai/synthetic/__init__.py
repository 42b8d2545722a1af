"""Synthetic cervical-spine CT studies with known truth, and their DICOM / RSNA writers.

>>> from ai.synthetic import StudySpec, generate_study
>>> study = generate_study(7, StudySpec.small(fracture_rate=1.0))
>>> sorted(study.vertebra_fractured) == ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]
True
"""

from ai.synthetic.dicom_writer import TRANSFER_SYNTAXES, write_series, write_study
from ai.synthetic.generate import generate_study, uid_for
from ai.synthetic.preview import render_previews
from ai.synthetic.rsna_writer import segmentation_nifti, write_rsna_dataset
from ai.synthetic.spec import (
    FIELDS_OF_VIEW,
    FRACTURE_KINDS,
    LABEL_NAMES,
    MANDIBLE_LABEL,
    SKULL_LABEL,
    ExtraSeries,
    Fracture,
    StudySpec,
    SyntheticStudy,
)

__all__ = [
    "FIELDS_OF_VIEW",
    "FRACTURE_KINDS",
    "LABEL_NAMES",
    "MANDIBLE_LABEL",
    "SKULL_LABEL",
    "TRANSFER_SYNTAXES",
    "ExtraSeries",
    "Fracture",
    "StudySpec",
    "SyntheticStudy",
    "generate_study",
    "render_previews",
    "segmentation_nifti",
    "uid_for",
    "write_rsna_dataset",
    "write_series",
    "write_study",
]
