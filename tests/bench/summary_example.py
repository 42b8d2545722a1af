"""Regenerate the README's summary screenshot from the shipped demo models (plain script).

Run: ``.venv/bin/python tests/bench/summary_example.py docs/images/summary_example.png 4242``

It generates synthetic study SEED (256x256, full field of view, head first, fractured),
runs :func:`ai.pipeline.run` with the installed demo models on the CPU and renders the
summary image the node would send, printing the truth and the probabilities.
"""

from __future__ import annotations

import sys

import torch

from ai import pipeline
from ai.synthetic import StudySpec, generate_study
from dicom_node.writers import render_summary_png


def main(out: str, seed: int) -> None:
    torch.set_num_threads(2)
    spec = StudySpec(
        rows=256, cols=256, fracture_rate=1.0, field_of_view="full", patient_position="HFS"
    )
    study = generate_study(seed, spec)
    result = pipeline.run(study.volume)
    print("truth fractured:", study.vertebra_fractured)
    print("probabilities:", {v.label: v.probability for v in result.vertebrae})
    print("patient:", result.patient_probability)
    render_summary_png(
        out, study.volume.hu, study.volume.affine, result, threshold=0.5, software_version="0.1.0"
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
