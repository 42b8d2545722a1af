"""``cspine synth``: synthetic cervical-spine CT studies (owned by the synthetic-data work)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from config import NodeError, parse_ae_spec
from dicom_node.cli.common import make_settings, quiet_client_logging, settings_options

if TYPE_CHECKING:
    from ai.synthetic.spec import SyntheticStudy

LOGGER = logging.getLogger(__name__)


@click.command("synth")
@settings_options
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder (created).",
)
@click.option(
    "--studies",
    default=1,
    show_default=True,
    type=click.IntRange(1, 100000),
    help="Number of studies.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=click.IntRange(0, None),
    help="Seed of the first study; study i uses seed + i.",
)
@click.option(
    "--layout",
    type=click.Choice(["rsna", "plain"]),
    default="plain",
    show_default=True,
    help="rsna: RSNA 2022 layout with CSVs and segmentations; plain: one folder per "
    "study with complete headers.",
)
@click.option(
    "--fracture-rate",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Fraction of studies with at least one fracture.",
)
@click.option(
    "--vertebra-fracture-rate",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Mean fraction of C1..C7 fractured per study.",
)
@click.option(
    "--transfer-syntax",
    type=click.Choice(["explicit", "jpeg-lossless", "j2k-lossless", "rle", "mixed"]),
    default=None,
    help="Encoding of the images (default: explicit for plain, mixed for rsna).",
)
@click.option(
    "--rows",
    default=512,
    show_default=True,
    type=click.IntRange(16, 2048),
    help="Rows and columns of each image.",
)
@click.option(
    "--slices",
    "n_slices",
    default=None,
    type=click.IntRange(8, 4000),
    help="Slices per study (default: from the field of view and spacing).",
)
@click.option(
    "--segmentation-fraction",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="rsna layout: fraction of studies with a NIfTI.",
)
@click.option(
    "--extra-series",
    is_flag=True,
    help="plain layout: also write a scout and a soft-tissue-kernel series.",
)
@click.option(
    "--generator",
    type=click.Choice(["v1", "v2"]),
    default="v1",
    show_default=True,
    help="v1: the generator the shipped demo models were trained on; v2: phantoms from "
    "anatomical parts with cortex, marrow texture, soft tissue and CT-like noise.",
)
@click.option(
    "--field",
    "body_field",
    type=click.Choice(["neck", "head", "thorax", "lumbar", "abdomen", "random"]),
    default="neck",
    show_default=True,
    help="v2 only: body region; head, thorax, lumbar and abdomen carry no cervical labels "
    "(out-of-scope negatives); random: neck 80 %, the others 5 % each.",
)
@click.option(
    "--send",
    "send_to",
    default=None,
    metavar="AE@HOST:PORT",
    help="C-STORE every written file to this node afterwards.",
)
@click.option(
    "--calling-ae", default="CSPINE-SCU", show_default=True, help="Our AE title when sending."
)
def synth(
    config_file: str | None,
    data_dir: str | None,
    out_dir: str,
    studies: int,
    seed: int,
    layout: str,
    fracture_rate: float,
    vertebra_fracture_rate: float,
    transfer_syntax: str | None,
    rows: int,
    n_slices: int | None,
    segmentation_fraction: float,
    extra_series: bool,
    generator: str,
    body_field: str,
    send_to: str | None,
    calling_ae: str,
) -> None:
    """Generate synthetic neck CT studies with known vertebra and fracture truth."""
    from tqdm import tqdm

    from ai.synthetic import StudySpec, generate_study, write_rsna_dataset, write_study
    from ai.synthetic.rsna_writer import manifest_entry, write_manifest
    from ai.synthetic.v2 import V2Options, generate_study_v2

    settings = make_settings(config_file, data_dir)
    target = parse_ae_spec(send_to) if send_to else None
    ts = transfer_syntax or ("mixed" if layout == "rsna" else "explicit")
    if layout == "plain" and ts == "mixed":
        raise click.BadParameter(
            "'mixed' is only for --layout rsna", param_hint="--transfer-syntax"
        )
    if target is not None and layout == "rsna":
        raise click.BadParameter(
            "RSNA-layout files have no SOP Class UID in the dataset (as the real ones), so a "
            "node cannot store them; use --layout plain to send",
            param_hint="--send",
        )
    if generator == "v1" and body_field != "neck":
        raise click.BadParameter("fields other than neck need --generator v2", param_hint="--field")
    if extra_series and layout == "rsna":
        raise click.BadParameter(
            "extra series exist only in the plain layout", param_hint="--extra-series"
        )
    try:
        spec = StudySpec(
            rows=rows,
            cols=rows,
            n_slices=n_slices,
            fracture_rate=fracture_rate,
            vertebra_fracture_rate=vertebra_fracture_rate,
            extra_series=extra_series,
            fov_mm=(128.0, 358.0) if rows >= 384 else (120.0, 180.0),
            slice_spacing=(0.5, 1.25) if rows >= 256 else (1.0, 3.0),
        )
        options = V2Options(body_field=body_field)
    except ValueError as exc:
        raise NodeError(str(exc)) from exc
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    written: list[Path] = []
    bar = tqdm(total=studies, unit="study", desc="synth", disable=None)

    def generated() -> Iterator[SyntheticStudy]:
        for i in range(studies):
            if generator == "v2":
                study: SyntheticStudy = generate_study_v2(seed + i, spec, options)
            else:
                study = generate_study(seed + i, spec)
            yield study
            bar.update(1)

    n_fractured = 0
    try:
        if layout == "rsna":
            flags: list[int] = []

            def counted() -> Iterator[SyntheticStudy]:
                for study in generated():
                    flags.append(study.patient_overall)
                    yield study

            uids = write_rsna_dataset(
                out, counted(), transfer_syntax=ts, segmentation_fraction=segmentation_fraction
            )
            n_fractured = sum(flags)
            written = sorted((out / "train_images").rglob("*.dcm"))
            summary = f"{len(uids)} studies in RSNA layout"
        else:
            entries = []
            for study in generated():
                n_fractured += study.patient_overall
                written += write_study(study, out / study.patient_id, ts)
                entries.append(manifest_entry(study, folder=study.patient_id, transfer_syntax=ts))
            write_manifest(out, entries)
            summary = f"{studies} studies in plain layout"
    finally:
        bar.close()
    click.echo(
        f"synth: {summary} under {out} ({len(written)} files, {n_fractured} fractured, "
        f"{time.monotonic() - started:.1f} s)"
    )
    if target is not None:
        from dicom_node.scu import send_paths

        quiet_client_logging(settings)
        ae, host, port = target
        result = send_paths(written, ae, host, port, calling_ae=calling_ae)
        click.echo(
            f"synth: sent {result.sent} of {len(written)} files to {send_to} "
            f"({result.failed} failed)"
        )
        if result.failed:
            raise NodeError(f"{result.failed} file(s) were not stored by {send_to}")


COMMANDS: list[click.Command] = [synth]
