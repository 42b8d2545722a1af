"""``cspine train cls``, ``cspine evaluate cls`` and ``cspine calibrate cls``."""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dicom_node.cli.common import rsna_data_option

if TYPE_CHECKING:
    from tqdm import tqdm

    from ai.cls.crops import CropConfig
    from ai.cls.data import StudyCrops
    from ai.cls.train import TrainConfig


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/cspine/cls`` (read when a command runs, not at import)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cspine" / "cls"


def _int_list(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",")]
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from exc


def _setup_torch(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


_cache_option = click.option(
    "--cache",
    "cache",
    type=click.Path(file_okay=False),
    default=None,
    help="Crop cache folder, outside the repository [default: $XDG_CACHE_HOME/cspine/cls].",
)
_crop_source_option = click.option(
    "--crop-source",
    type=click.Choice(["stage1", "truth"]),
    default="stage1",
    show_default=True,
    help="Label maps from stage-1 predictions or ground truth.",
)
_threads_option = click.option(
    "--threads", default=None, type=click.IntRange(1), help="torch CPU threads."
)


@click.command("cls")
@rsna_data_option
@click.option(
    "--seg-model",
    default="seg-demo",
    show_default=True,
    help="Stage-1 package (folder or installed name) that labels the studies.",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Model package folder to write.",
)
@_cache_option
@_crop_source_option
@click.option(
    "--epochs",
    default=10,
    show_default=True,
    type=click.IntRange(0),
    help="End-to-end epochs (after any pre-training and head epochs; 0 with --head-epochs).",
)
@click.option(
    "--batch-size",
    default=4,
    show_default=True,
    type=click.IntRange(1),
    help="Studies per batch (7 vertebrae x slices each).",
)
@click.option("--lr", default=5e-4, show_default=True, type=float)
@click.option(
    "--size", default=224, show_default=True, type=click.IntRange(32), help="Crop size in pixels."
)
@click.option("--slices", default=15, show_default=True, type=click.IntRange(1))
@click.option("--folds", default=5, show_default=True, type=click.IntRange(1))
@click.option("--fold", default=0, show_default=True, type=click.IntRange(0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--mixup",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Probability of mixup per batch.",
)
@click.option(
    "--variant",
    default="atto",
    show_default=True,
    type=click.Choice(["atto", "femto", "pico", "nano", "tiny"]),
)
@click.option("--depths", default=None, help="Custom ConvNeXt depths, e.g. 2,2,6,2.")
@click.option("--dims", default=None, help="Custom ConvNeXt widths, e.g. 32,64,128,256.")
@click.option("--lstm-hidden", default=128, show_default=True, type=click.IntRange(1))
@click.option(
    "--threshold",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Operating threshold recorded in the package.",
)
@click.option("--name", default="cls-demo", show_default=True)
@click.option("--version", "version", default="0.1.0", show_default=True)
@click.option(
    "--demo/--no-demo",
    default=None,
    help="Label as synthetic demo weights (default: when the data is synthetic).",
)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
@click.option(
    "--init",
    "init",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Start from the weights of this stage-2 package (fine-tuning).",
)
@click.option(
    "--layer-scale",
    default=1e-6,
    show_default=True,
    type=float,
    help="Initial ConvNeXt layer scale.",
)
@click.option(
    "--pooling",
    type=click.Choice(["mean", "lse"]),
    default="mean",
    show_default=True,
    help="Slice logits to vertebra logit.",
)
@click.option(
    "--encoder-pool",
    type=click.Choice(["mean", "max"]),
    default="mean",
    show_default=True,
    help="Spatial pooling of the ConvNeXt features.",
)
@click.option(
    "--stem",
    type=click.Choice(["patch", "conv"]),
    default="patch",
    show_default=True,
    help="ConvNeXt stem: the paper's 4x4 patchify, or a convolutional stem of the same "
    "stride that sees fine detail at full resolution.",
)
@click.option(
    "--slice-loss",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Weight of the per-slice loss from train_bounding_boxes.csv (0: off).",
)
@click.option(
    "--box-loss",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Weight of the box-map loss during slice pre-training (where the fracture boxes "
    "are, on a ConvNeXt feature map; 0: off).",
)
@click.option(
    "--box-stage",
    default=1,
    show_default=True,
    type=click.IntRange(0, 3),
    help="ConvNeXt stage whose output map predicts the box map (0: stride 4 .. 3: stride 32).",
)
@click.option(
    "--pretrain-steps",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Steps of balanced single-slice encoder pre-training before the study-level epochs.",
)
@click.option("--pretrain-batch", default=64, show_default=True, type=click.IntRange(2))
@click.option("--pretrain-lr", default=3e-4, show_default=True, type=float)
@click.option(
    "--head-epochs",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Epochs of LSTM and head training on frozen encoder features, after pre-training.",
)
@click.option("--head-lr", default=1e-3, show_default=True, type=float)
@click.option("--head-batch", default=16, show_default=True, type=click.IntRange(1))
@click.option("--device", default="auto", show_default=True)
@_threads_option
def train_cls(
    data: str,
    seg_model: str,
    out: str,
    cache: str | None,
    crop_source: str,
    epochs: int,
    batch_size: int,
    lr: float,
    size: int,
    slices: int,
    folds: int,
    fold: int,
    seed: int,
    mixup: float,
    variant: str,
    depths: str | None,
    dims: str | None,
    lstm_hidden: int,
    threshold: float,
    name: str,
    version: str,
    demo: bool | None,
    resume: bool,
    init: str | None,
    layer_scale: float,
    pooling: str,
    encoder_pool: str,
    stem: str,
    slice_loss: float,
    box_loss: float,
    box_stage: int,
    pretrain_steps: int,
    pretrain_batch: int,
    pretrain_lr: float,
    head_epochs: int,
    head_lr: float,
    head_batch: int,
    device: str,
    threads: int | None,
) -> None:
    """Train the stage-2 fracture classifier and write a model package."""
    cache = cache or str(default_cache())
    _setup_torch(threads)
    from ai.cls.crops import CropConfig
    from ai.cls.train import train
    from ai.modelpkg import select_device

    _check_phases(epochs, head_epochs, folds, fold)
    dev = select_device(device)
    crop = CropConfig(size=size, n_slices=slices)
    items, seg_identity = _crop_items(data, cache, crop, crop_source, seg_model, device)
    meta = _train_meta(data, name, version, demo, len(items), crop_source, seg_identity, threads)
    cfg = _train_config(click.get_current_context().params)
    full = train(
        items,
        crop,
        cfg,
        out,
        device=dev,
        meta=meta,
        resume=resume,
        init=init,
        progress=_StderrProgress(),
    )
    click.echo(json.dumps(_summary(full, out), indent=2))


def _check_phases(epochs: int, head_epochs: int, folds: int, fold: int) -> None:
    """Refuse a run with nothing to train or a validation fold out of range.

    Raises
    ------
    click.BadParameter
        When both ``--epochs`` and ``--head-epochs`` are 0, or ``--fold`` >= ``--folds``.
    """
    if epochs == 0 and head_epochs == 0:
        raise click.BadParameter(
            "give --epochs or --head-epochs (both are 0)", param_hint="--epochs"
        )
    if fold >= folds:
        raise click.BadParameter(f"--fold must be < --folds ({folds})", param_hint="--fold")


def _crop_items(
    data: str, cache: str, crop: CropConfig, crop_source: str, seg_model: str, device: str
) -> tuple[list[StudyCrops], dict[str, Any] | None]:
    """The cached crops of every study (:func:`ai.cls.data.build_crop_cache`).

    With ``crop_source == "stage1"`` the label maps come from the ``seg_model`` package,
    whose identity is returned with the crops (``None`` for ground-truth crops).
    """
    from tqdm import tqdm

    from ai.cls.data import build_crop_cache

    seg = None
    seg_identity = None
    if crop_source == "stage1":
        from ai.seg import SegModel

        seg = SegModel.load(seg_model, device=device)
        seg_identity = vars(seg.identity)
    click.echo(f"building crop cache ({crop_source}) under {cache}", err=True)
    items = build_crop_cache(
        data,
        cache,
        crop,
        seg_model=seg,
        source=crop_source,
        progress=lambda x: tqdm(x, desc="crops", file=sys.stderr),
    )
    return items, seg_identity


def _train_meta(
    data: str,
    name: str,
    version: str,
    demo: bool | None,
    n_studies: int,
    crop_source: str,
    seg_identity: dict[str, Any] | None,
    threads: int | None,
) -> dict[str, Any]:
    """The package metadata the command adds to what :func:`ai.cls.train.train` records.

    ``demo`` of ``None`` labels the package as demo weights when the data is synthetic.
    """
    from ai.modelpkg import DEMO_LABEL

    synthetic = _is_synthetic(Path(data))
    is_demo = synthetic if demo is None else demo
    return {
        "name": name,
        "version": version,
        "description": DEMO_LABEL if is_demo else f"stage-2 fracture classifier trained on {data}",
        "demo": bool(is_demo),
        "training": {
            "data": str(Path(data).resolve()),
            "data_synthetic": synthetic,
            "n_studies": n_studies,
            "crop_source": "stage-1 predictions" if crop_source == "stage1" else "ground truth",
            "seg_model": seg_identity,
            "command": _command_line(click.get_current_context()),
            "torch_threads": threads,
        },
    }


def _train_config(options: Mapping[str, Any]) -> TrainConfig:
    """The training hyper-parameters of ``cspine train cls``'s options.

    Each option named like a field of :class:`ai.cls.train.TrainConfig` sets that field
    (``--depths`` and ``--dims`` parsed into lists); the others keep their defaults.
    """
    from ai.cls.train import TrainConfig

    given = {f.name: options[f.name] for f in fields(TrainConfig) if f.name in options}
    given.update(depths=_int_list(options["depths"]), dims=_int_list(options["dims"]))
    return TrainConfig(**given)


class _StderrProgress:
    """``tqdm`` bars and messages on stderr, as :func:`ai.cls.train.train` takes them."""

    def __call__(self, it: list[Any], desc: str) -> tqdm[Any]:
        from tqdm import tqdm

        return tqdm(it, desc=desc, file=sys.stderr)

    def write(self, s: str) -> None:
        from tqdm import tqdm

        tqdm.write(s, file=sys.stderr)


def _summary(full: dict[str, Any], out: str) -> dict[str, Any]:
    """What the command prints: the package, its patient mode and validation scores."""
    val = full.get("metrics", {}).get("validation")
    summary = {"package": str(out), "patient_mode": full["inference"]["patient_mode"]}
    if val:
        summary.update(
            {k: val[k] for k in ("weighted_log_loss", "patient_auc", "vertebra_auc_mean")}
        )
    return summary


def _command_line(ctx: click.Context, prefix: list[str] | None = None) -> str:
    """The full command (``cspine train cls`` by default) with every option spelled out."""
    parts = list(prefix or ["cspine", "train", "cls"])
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        value = ctx.params.get(param.name)
        if value is None:
            continue
        if param.is_flag:
            if param.secondary_opts:
                parts.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                parts.append(param.opts[0])
            continue
        parts += [param.opts[0], shlex.quote(str(value))]
    return " ".join(parts)


def _is_synthetic(root: Path) -> bool:
    """Whether a dataset root says it is synthetic (a marker file written by ``cspine synth``)."""
    for marker in ("SYNTHETIC", "synthetic.json", "SYNTHETIC.md", "README.synthetic"):
        if (root / marker).exists():
            return True
    readme = root / "README.md"
    return readme.is_file() and "synthetic" in readme.read_text(errors="replace").lower()


@click.command("cls")
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="RSNA 2022 layout root.",
)
@click.option("--seg-model", default="seg-demo", show_default=True)
@click.option("--cls-model", default="cls-demo", show_default=True)
@_cache_option
@_crop_source_option
@click.option(
    "--threshold",
    default=None,
    type=click.FloatRange(0, 1),
    help="Operating threshold (default: the package's).",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
@click.option("--markdown", "md_out", type=click.Path(dir_okay=False), default=None)
@click.option("--device", default="auto", show_default=True)
@_threads_option
def evaluate_cls(
    data: str,
    seg_model: str,
    cls_model: str,
    cache: str | None,
    crop_source: str,
    threshold: float | None,
    json_out: str | None,
    md_out: str | None,
    device: str,
    threads: int | None,
) -> None:
    """Score a stage-2 package: weighted log loss, AUCs, operating point, calibration."""
    cache = cache or str(default_cache())
    _setup_torch(threads)
    from tqdm import tqdm

    from ai.cls import ClsModel
    from ai.cls.evaluate import evaluate_dataset, markdown_report

    model = ClsModel.load(cls_model, device=device)
    seg = None
    if crop_source == "stage1":
        from ai.seg import SegModel

        seg = SegModel.load(seg_model, device=device)
    result = evaluate_dataset(
        data,
        model,
        cache,
        seg_model=seg,
        source=crop_source,
        threshold=threshold,
        progress=lambda x: tqdm(x, desc="crops", file=sys.stderr),
    )
    text = json.dumps(result, indent=2)
    if json_out:
        Path(json_out).write_text(text + "\n")
    report = markdown_report(result)
    if md_out:
        Path(md_out).write_text(report)
    click.echo(report)


@click.command("cls")
@click.option(
    "--data",
    "data",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="The dataset the package was trained on; split into its training and validation "
    "studies with the package's recorded --folds/--fold/--seed (or the ones given here).",
)
@click.option(
    "--train-data",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Studies the classifier was trained on (OOD statistics); with --validation-data.",
)
@click.option(
    "--validation-data",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Studies never trained on (OOD threshold and temperatures).",
)
@click.option("--folds", default=None, type=click.IntRange(1), help="With --data.")
@click.option("--fold", default=None, type=click.IntRange(0), help="With --data.")
@click.option("--seed", default=None, type=int, help="With --data.")
@click.option(
    "--max-train-studies",
    default=None,
    type=click.IntRange(2),
    help="Fit the OOD statistics on the first N training studies only (time).",
)
@click.option("--seg-model", default="seg-demo", show_default=True)
@click.option("--cls-model", default="cls-demo", show_default=True, help="Source package.")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="New package folder (same weights, model.json extended).",
)
@click.option("--version", "version", required=True, help="Version of the new package.")
@click.option(
    "--rate",
    default=0.01,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Tolerated false-abstention rate on in-distribution validation crops.",
)
@_cache_option
@_crop_source_option
@_threads_option
def calibrate_cls(
    data: str | None,
    train_data: str | None,
    validation_data: str | None,
    folds: int | None,
    fold: int | None,
    seed: int | None,
    max_train_studies: int | None,
    seg_model: str,
    cls_model: str,
    out: str,
    version: str,
    rate: float,
    cache: str | None,
    crop_source: str,
    threads: int | None,
) -> None:
    """Add OOD statistics and temperature calibration to a package, without retraining."""
    cache = cache or str(default_cache())
    _setup_torch(threads)
    from tqdm import tqdm

    from ai.cls import ClsModel
    from ai.cls.calibrate import calibrate_package, split_items
    from ai.cls.data import build_crop_cache

    if (data is None) == (train_data is None and validation_data is None):
        raise click.UsageError("give --data, or --train-data with --validation-data")
    if data is None and (train_data is None or validation_data is None):
        raise click.UsageError("--train-data and --validation-data go together")
    source = ClsModel.load(cls_model, device="cpu")
    seg = None
    if crop_source == "stage1":
        from ai.seg import SegModel

        seg = SegModel.load(seg_model, device="cpu")

    def crops(root: str) -> list:
        return build_crop_cache(
            root,
            cache,
            source.crop_config,
            seg_model=seg,
            source=crop_source,
            progress=lambda x: tqdm(x, desc=f"crops {Path(root).name}", file=sys.stderr),
        )

    record: dict[str, object] = {
        "command": _command_line(click.get_current_context(), ["cspine", "calibrate", "cls"]),
        "crop_source": "stage-1 predictions" if crop_source == "stage1" else "ground truth",
        "seg_model": vars(seg.identity) if seg is not None else None,
        "torch_threads": threads,
    }
    if data is not None:
        training = source.meta.get("training", {})
        folds = int(training.get("folds", 5)) if folds is None else folds
        fold = int(training.get("fold", 0)) if fold is None else fold
        seed = int(training.get("seed", 0)) if seed is None else seed
        if fold >= folds or folds < 2:
            raise click.BadParameter(f"need --folds >= 2 and --fold < --folds, got {folds}, {fold}")
        train_items, val_items = split_items(crops(data), folds, fold, seed)
        record.update(
            {
                "data": str(Path(data).resolve()),
                "split": f"ai.cls.train.fold_split(n, folds={folds}, fold={fold}, seed={seed}) "
                "over the studies with an assessed vertebra, in train.csv order",
            }
        )
    else:
        assert train_data is not None and validation_data is not None
        train_items = [it for it in crops(train_data) if it.present.any()]
        val_items = [it for it in crops(validation_data) if it.present.any()]
        record.update(
            {
                "train_data": str(Path(train_data).resolve()),
                "validation_data": str(Path(validation_data).resolve()),
            }
        )
    n_train = len(train_items)
    if max_train_studies is not None and max_train_studies < n_train:
        train_items = train_items[:max_train_studies]
    record["ood_fit_studies"] = (
        f"the first {len(train_items)} of the {n_train} training studies (in split order)"
    )
    meta = calibrate_package(
        cls_model, out, train_items, val_items, version=version, rate=rate, record=record
    )
    ClsModel.load(out, device="cpu")  # the written package loads and verifies
    summary = {
        "package": str(out),
        "version": version,
        "ood_threshold": meta["ood"]["threshold"],
        "validation_false_abstention_rate": meta["ood"]["validation"]["false_abstention_rate"],
        "vertebra_temperature": meta["calibration"]["vertebra_temperature"],
        "patient_temperature": meta["calibration"]["patient_temperature"],
        **{
            k: meta["calibration"]["validation"][k]
            for k in (
                "vertebra_ece_before",
                "vertebra_ece_after",
                "patient_ece_before",
                "patient_ece_after",
            )
        },
    }
    click.echo(json.dumps(summary, indent=2))


TRAIN: dict[str, click.Command] = {"cls": train_cls}
EVALUATE: dict[str, click.Command] = {"cls": evaluate_cls}
CALIBRATE: dict[str, click.Command] = {"cls": calibrate_cls}
