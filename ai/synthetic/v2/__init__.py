"""Synthetic neck-CT generator v2: phantoms from anatomical parts that look like CT.

>>> from ai.synthetic.spec import StudySpec
>>> from ai.synthetic.v2 import generate_study_v2
>>> study = generate_study_v2(3, StudySpec.small(fracture_rate=1.0))
>>> study.generator, study.body_field
('v2', 'neck')
"""

from ai.synthetic.v2.generate import (
    BODY_FIELDS,
    V2_FRACTURE_KINDS,
    SyntheticStudyV2,
    V2Options,
    generate_study_v2,
)

__all__ = ["BODY_FIELDS", "V2_FRACTURE_KINDS", "SyntheticStudyV2", "V2Options", "generate_study_v2"]
