"""``cspine train seg`` and ``cspine evaluate seg``."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dicom_node.cli.common import configure_logging, rsna_data_option

if TYPE_CHECKING:
    from ai.seg.model import PostSpec


def _command_line(prefix: str) -> str:
    """The invocation as ``cspine ...`` with every option value (defaults included)."""
    ctx = click.get_current_context()
    parts = [prefix]
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if value is None or not isinstance(param, click.Option):
            continue
        flag = param.opts[0]
        if param.is_flag:
            if param.secondary_opts:
                parts.append(flag if value else param.secondary_opts[0])
            elif value:
                parts.append(flag)
            continue
        parts.extend([flag, shlex.quote(str(value))])
    return " ".join(parts)


def _post_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--bone-hu``, ``--region-threshold`` and ``--fill-holes`` (stage-1 post-processing)."""
    f = click.option(
        "--fill-holes/--no-fill-holes",
        "fill_holes",
        default=None,
        help="With --bone-hu: fill marrow that a vertebra encloses. [default: fill]",
    )(f)
    f = click.option(
        "--region-threshold",
        type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
        default=None,
        help="With --bone-hu: probability that defines the candidate region. [default: 0.05]",
    )(f)
    return click.option(
        "--bone-hu",
        default=None,
        metavar="HU|off",
        help="Bone refinement on the source grid: label only voxels of at least this HU; "
        "'off' maps back by the probability threshold alone. [default: off]",
    )(f)


def _post_spec(
    bone_hu: str | None, region_threshold: float | None, fill_holes: bool | None
) -> PostSpec | None:
    """The post-processing the options ask for; ``None`` when none was given."""
    from ai.seg.model import PostSpec

    if bone_hu is None and region_threshold is None and fill_holes is None:
        return None
    if bone_hu is None or (bone_hu == "off" and (region_threshold, fill_holes) != (None, None)):
        raise click.BadParameter("--region-threshold and --fill-holes need --bone-hu HU")
    base = PostSpec()
    if bone_hu == "off":
        return base
    try:
        hu = float(bone_hu)
    except ValueError:
        raise click.BadParameter(f"--bone-hu takes a number or 'off', got {bone_hu!r}") from None
    try:
        return PostSpec(
            bone_hu=hu,
            region_threshold=(
                base.region_threshold if region_threshold is None else region_threshold
            ),
            fill_holes=base.fill_holes if fill_holes is None else fill_holes,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _size(value: str) -> tuple[int, int, int]:
    parts = [int(p) for p in value.lower().replace("x", ",").split(",") if p.strip()]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise click.BadParameter("size is N or DxHxW")
    return (parts[0], parts[1], parts[2])


@click.command("seg")
@rsna_data_option
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Model package folder to write.",
)
@click.option("--epochs", default=40, show_default=True, type=int)
@click.option(
    "--size", default="64", show_default=True, help="Working size N or DxHxW (multiples of 16)."
)
@click.option(
    "--backbone",
    default="efficientnet-b0",
    show_default=True,
    help="FlexibleUNet backbone (efficientnet-b0..b8, resnet10..).",
)
@click.option("--decoder-channels", default="64,32,16,8,4", show_default=True)
@click.option(
    "--normalization",
    type=click.Choice(["bone_window", "minmax"]),
    default="bone_window",
    show_default=True,
)
@click.option(
    "--two-pass/--single-pass",
    "two_pass",
    default=True,
    show_default=True,
    help="Coarse full-view pass, then a pass on the spine region.",
)
@click.option(
    "--folds",
    default=5,
    show_default=True,
    type=int,
    help="k of the k-fold split; 1 trains on everything.",
)
@click.option("--fold", default=0, show_default=True, type=int, help="Validation fold.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-size", default=2, show_default=True, type=int)
@click.option("--lr", default=2e-3, show_default=True, type=float)
@click.option(
    "--pos-weight",
    default=1.0,
    show_default=True,
    type=float,
    help="BCE weight of foreground voxels (speeds up learning small structures).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option(
    "--domain-randomisation/--no-domain-randomisation",
    "domain_randomisation",
    default=False,
    show_default=True,
    help="Randomise contrast per tissue, bias field, resolution, gamma and noise on the fly "
    "(ai.seg.augment).",
)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --work-dir.")
@click.option(
    "--init",
    "init",
    default=None,
    help="Start from this stage-1 package's weights (folder or installed name; fine-tuning). "
    "Its architecture and input spec must match this run's.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Preprocessed-volume cache (default: next to --out).",
)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Checkpoint folder (default: next to --out).",
)
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps.")
@click.option("--max-minutes", type=float, default=None, help="Stop after this wall time.")
@click.option("--name", default="seg-demo", show_default=True)
@click.option("--version", "version", default="0.1.0", show_default=True)
@click.option(
    "--demo/--not-demo",
    "demo",
    default=None,
    help="Label the package as synthetic demo weights (default: auto-detect).",
)
@_post_options
@click.option("--fp32", is_flag=True, help="Store float32 weights (default float16).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def train_seg(
    data: str,
    out: str,
    epochs: int,
    size: str,
    backbone: str,
    decoder_channels: str,
    normalization: str,
    two_pass: bool,
    folds: int,
    fold: int,
    seed: int,
    batch_size: int,
    lr: float,
    pos_weight: float,
    device: str,
    domain_randomisation: bool,
    resume: bool,
    init: str | None,
    cache_dir: str | None,
    work_dir: str | None,
    max_steps: int | None,
    max_minutes: float | None,
    name: str,
    version: str,
    demo: bool | None,
    bone_hu: str | None,
    region_threshold: float | None,
    fill_holes: bool | None,
    fp32: bool,
    no_progress: bool,
) -> None:
    """Train the stage-1 C1-C7 segmentation network and write a model package."""
    from ai.errors import ModelLoadError
    from ai.seg.augment import DomainRandomisation
    from ai.seg.model import PostSpec
    from ai.seg.train import TrainConfig, train

    configure_logging("INFO")
    post = _post_spec(bone_hu, region_threshold, fill_holes)
    cfg = TrainConfig(
        data=Path(data),
        out=Path(out),
        size=_size(size),
        backbone=backbone,
        decoder_channels=tuple(int(c) for c in decoder_channels.split(",")),
        normalization=normalization,
        two_pass=two_pass,
        epochs=epochs,
        folds=folds,
        fold=fold,
        seed=seed,
        batch_size=batch_size,
        lr=lr,
        pos_weight=pos_weight,
        device=device,
        resume=resume,
        init=init,
        post=post or PostSpec(),
        cache_dir=Path(cache_dir) if cache_dir else None,
        work_dir=Path(work_dir) if work_dir else None,
        max_steps=max_steps,
        max_minutes=max_minutes,
        name=name,
        version=version,
        demo=demo,
        half=not fp32,
        command=_command_line("cspine train seg"),
        progress=not no_progress,
        domain_randomisation=DomainRandomisation() if domain_randomisation else None,
    )
    try:
        path = train(cfg)
    except (ValueError, ModelLoadError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"model package written to {path}")


@click.command("seg")
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="RSNA 2022 layout root with segmentations.",
)
@click.option(
    "--model",
    "model",
    default="seg-demo",
    show_default=True,
    help="Package folder or installed package name.",
)
@click.option(
    "--registry",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder of installed packages (default: the shipped ones).",
)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the full report as JSON here.",
)
@click.option(
    "--markdown",
    "md_out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the Markdown table here.",
)
@click.option(
    "--record",
    is_flag=True,
    help="Also store the mean/per-vertebra Dice in the package's model.json.",
)
@_post_options
@click.option(
    "--gate/--no-gate",
    default=True,
    show_default=True,
    help="Apply stage 1's intended use and the plausibility checks, as the node does.",
)
@click.option("--no-progress", is_flag=True)
def evaluate_seg(
    data: str,
    model: str,
    registry: str | None,
    device: str,
    json_out: str | None,
    md_out: str | None,
    record: bool,
    bone_hu: str | None,
    region_threshold: float | None,
    fill_holes: bool | None,
    gate: bool,
    no_progress: bool,
) -> None:
    """Per-vertebra Dice of a stage-1 model on the original grid (JSON + Markdown).

    --bone-hu/--region-threshold/--fill-holes replace the package's post-processing for
    this evaluation only (to compare settings on a validation set).
    """
    from ai.modelpkg import META_FILE, resolve_package
    from ai.seg.train import evaluate, markdown_table

    configure_logging("WARNING")
    post = _post_spec(bone_hu, region_threshold, fill_holes)
    if record and post is not None:
        raise click.UsageError(
            "--record stores the package's own held-out metrics; "
            "it cannot be combined with post-processing overrides"
        )
    report = evaluate(
        Path(data),
        model,
        registry=registry,
        device=device,
        progress=not no_progress,
        post=post,
        gate=gate,
    )
    table = markdown_table(report)
    click.echo(table)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
    if md_out:
        Path(md_out).write_text(table)
    if record:
        meta_path = resolve_package(model, registry) / META_FILE
        meta = json.loads(meta_path.read_text())
        meta.setdefault("metrics", {})["heldout_dice_original_grid"] = {
            "data": str(data),
            "n_studies": report["n_studies"],
            **report["dice"],
            "gate": {k: v for k, v in report["gate"].items() if k != "by_check"},
            "command": _command_line("cspine evaluate seg"),
        }
        meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


@click.command("anatomy")
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Folder of real CTs with cord contours: ct/*_ct.nii.gz, structures/*_structures.nii.gz "
    "(the OpenKBP layout).",
)
@click.option(
    "--negative",
    "negatives",
    multiple=True,
    type=click.Path(exists=True),
    help="A real non-cervical CT (NIfTI file or DICOM series folder): no voxel may be C1-C7.",
)
@click.option("--model", default="seg-demo", show_default=True, help="Stage-1 package.")
@click.option("--registry", type=click.Path(file_okay=False), default=None)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--gate/--no-gate",
    default=True,
    show_default=True,
    help="Judge what the node reports (intended use and plausibility checks applied) or the "
    "raw label map.",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
def evaluate_anatomy(
    data: str,
    negatives: tuple[str, ...],
    model: str,
    registry: str | None,
    device: str,
    gate: bool,
    json_out: str | None,
) -> None:
    """Stage 1 on real CT without vertebra labels, judged against the spinal cord.

    Per study: levels found, each body's distance anterior of the cord and beside it,
    craniocaudal order; a study passes with at least 6 levels, all 5-45 mm anterior
    and within 20 mm left-right. See ai/real_anatomy.py.
    """
    import numpy as np

    from ai.pipeline import Pipeline
    from ai.real_anatomy import evaluate_folder

    configure_logging("WARNING")
    pipe = Pipeline.load(seg=model, registry=registry, device=device)

    def predict(vol: Any) -> Any:
        if gate:
            return pipe.run(vol).label_map
        return np.asarray(pipe.seg.predict(vol).label_map)

    report = evaluate_folder(Path(data), predict, negatives=[Path(n) for n in negatives])
    report.update(model=model, gate=gate, command=_command_line("cspine evaluate anatomy"))
    for case in report["cases"]:
        verdict = "pass" if case["passed"] else "FAIL"
        click.echo(f"{case['case']:<8} {case['found']} levels  {verdict}  {case['note']}")
    for neg in report["negatives"]:
        verdict = "pass" if neg["passed"] else "FAIL"
        click.echo(f"negative {neg['file']}: {neg['c1_c7_voxels']} C1-C7 voxels  {verdict}")
    med = report["anterior_mm_median"]
    click.echo(
        f"passed {report['passed']}/{report['studies']} studies; levels found per study "
        f"{report['mean_levels_found'] or 0:.1f}; levels placed right "
        f"{report['levels_placed_ok']}/{report['levels_found']}; median body "
        f"{'-' if med is None else f'{med:.1f}'} mm anterior of the cord"
    )
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n")


TRAIN: dict[str, click.Command] = {"seg": train_seg}
EVALUATE: dict[str, click.Command] = {"seg": evaluate_seg, "anatomy": evaluate_anatomy}
