"""Stage-2 network, loss, training smoke test and the loaded ClsModel."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ai import metrics
from ai.cls import ClsModel, CropConfig
from ai.cls.convnext import VARIANTS, ConvNeXt, convnext
from ai.cls.data import StudyCrops
from ai.cls.net import FractureNet
from ai.cls.train import (
    TrainConfig,
    encode_items,
    fold_split,
    pretrain_encoder,
    train,
    train_heads,
    weighted_bce,
)
from ai.errors import ModelLoadError
from ai.modelpkg import DEMO_LABEL
from tests.ai.toy_crops import cached_crops, toy_study

TINY = {"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16], "lstm_hidden": 8}


def test_convnext_variants_follow_the_paper_family() -> None:
    assert VARIANTS["atto"] == ((2, 2, 6, 2), (40, 80, 160, 320))
    assert VARIANTS["nano"] == ((2, 2, 8, 2), (80, 160, 320, 640))
    assert VARIANTS["tiny"] == ((3, 3, 9, 3), (96, 192, 384, 768))
    net = convnext("atto", in_chans=6)
    assert net.out_dim == 320
    assert sum(len(s) for s in net.stages) == 12
    out = ConvNeXt(6, [1, 1, 1, 1], [8, 8, 16, 16])(torch.zeros(3, 6, 64, 64))
    assert out.shape == (3, 16)
    with pytest.raises(ValueError, match="variant"):
        convnext("huge")
    # max pooling: one bright spot moves the pooled feature however small it is
    torch.manual_seed(0)
    mx = ConvNeXt(6, [1, 1, 1, 1], [8, 8, 16, 16], pool="max").eval()
    mean = ConvNeXt(6, [1, 1, 1, 1], [8, 8, 16, 16], pool="mean").eval()
    mean.load_state_dict(mx.state_dict())
    flat = 0.2 + 0.05 * torch.rand(1, 6, 64, 64)
    spot = flat.clone()
    spot[..., 30:32, 30:32] = 1.0
    with torch.no_grad():
        assert not torch.allclose(mx(flat), mean(flat))
        d_max = (mx(spot) - mx(flat)).abs().sum()
        d_mean = (mean(spot) - mean(flat)).abs().sum()
    assert d_max > d_mean
    with pytest.raises(ValueError, match="pool"):
        ConvNeXt(6, pool="sum")
    net = FractureNet(in_chans=6, encoder_pool="max", **TINY)
    assert net.encoder.pool == "max"
    assert "encoder_pool" not in TrainConfig(**TINY).net_params(6)
    assert TrainConfig(encoder_pool="max", **TINY).net_params(6)["encoder_pool"] == "max"


def test_conv_stem_keeps_the_stage_grids_and_starts_at_full_resolution() -> None:
    torch.manual_seed(0)
    patch = ConvNeXt(6, [1, 1, 1, 1], [8, 8, 16, 16])
    conv = ConvNeXt(6, [1, 1, 1, 1], [8, 8, 16, 16], stem="conv")
    x = torch.rand(2, 6, 64, 64)
    shapes = [tuple(m.shape) for m in patch.feature_maps(x)]
    assert shapes == [(2, 8, 16, 16), (2, 8, 8, 8), (2, 16, 4, 4), (2, 16, 2, 2)]
    assert [tuple(m.shape) for m in conv.feature_maps(x)] == shapes
    assert conv(x).shape == (2, 16)
    # the conv stem's first layer works at full resolution (stride 1, 3x3)
    first = conv.downsample[0][0]
    assert isinstance(first, torch.nn.Conv2d) and first.stride == (1, 1)
    assert first.kernel_size == (3, 3)
    with pytest.raises(ValueError, match="stem"):
        ConvNeXt(6, stem="pixel")
    assert "stem" not in TrainConfig(**TINY).net_params(6)  # old packages keep their params
    params = TrainConfig(stem="conv", **TINY).net_params(6)
    assert params["stem"] == "conv"
    net = FractureNet(**params)
    assert isinstance(net.encoder.downsample[0][0], torch.nn.Conv2d)
    assert net.encoder.downsample[0][0].stride == (1, 1)


def test_network_handles_missing_vertebrae() -> None:
    torch.manual_seed(0)
    net = FractureNet(in_chans=6, **TINY).eval()
    present = torch.tensor([[1, 1, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    crops = torch.rand(int(present.sum()), 3, 6, 32, 32)
    out = net(crops, present)
    assert out["slice_logits"].shape == (8, 3)
    assert out["vertebra_logits"].shape == (2, 7)
    assert out["patient_logits"].shape == (2,)
    assert torch.all(out["vertebra_logits"][~present] == 0)
    assert torch.all(torch.isfinite(out["patient_logits"]))
    # a study's result does not depend on another study in the batch
    alone = net(crops[6:], present[1:])
    assert torch.allclose(alone["patient_logits"], out["patient_logits"][1:], atol=1e-5)
    with pytest.raises(ValueError, match="crops given"):
        net(crops[:3], present)


def test_weighted_bce_equals_the_competition_metric() -> None:
    torch.manual_seed(1)
    vert = torch.randn(3, 7)
    pat = torch.randn(3)
    labels = torch.tensor(
        [[0, 0, 1, 0, 0, 0, 0, 1], [0] * 8, [1, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.float32
    )
    present = torch.ones(3, 7, dtype=torch.bool)
    loss = float(weighted_bce(vert, pat, labels, present))
    probs = torch.sigmoid(torch.cat([vert, pat[:, None]], 1)).numpy()
    assert loss == pytest.approx(metrics.weighted_log_loss(labels.numpy(), probs), rel=1e-5)
    # an absent vertebra carries no loss: changing its logit changes nothing
    present[0, 2] = False
    a = float(weighted_bce(vert, pat, labels, present))
    vert2 = vert.clone()
    vert2[0, 2] = 100.0
    assert float(weighted_bce(vert2, pat, labels, present)) == pytest.approx(a)


def test_fold_split_partitions_studies() -> None:
    seen = []
    for f in range(3):
        tr, va = fold_split(10, 3, f, seed=4)
        assert set(tr).isdisjoint(va) and len(tr) + len(va) == 10
        seen.extend(va.tolist())
    assert sorted(seen) == list(range(10))
    tr, va = fold_split(5, 1, 0, seed=0)
    assert len(tr) == 5 and len(va) == 0
    with pytest.raises(ValueError, match="fold"):
        fold_split(5, 2, 2, seed=0)


def test_training_smoke_writes_a_loadable_package(tmp_path: Path) -> None:
    torch.manual_seed(0)
    crop = CropConfig(size=32, n_slices=3, min_volume_mm3=10)
    items = []
    for i in range(6):
        vol, lm, labels = toy_study(i, i % 7 if i % 2 else None)
        if i == 0:
            lm[lm == 7] = 0  # C7 missing in one study
        items.append(cached_crops(i, vol, lm, labels, crop))
    cfg = TrainConfig(epochs=2, batch_size=2, folds=3, fold=1, seed=3, mixup=1.0, **TINY)
    out = tmp_path / "pkg"
    meta = train(
        items,
        crop,
        cfg,
        out,
        device=torch.device("cpu"),
        meta={"name": "cls-test", "version": "0.0.1", "demo": True, "training": {"seed": 3}},
    )
    assert (out / "model.json").is_file() and (out / "checkpoint.pt").is_file()
    written = json.loads((out / "model.json").read_text())
    assert written["description"] == DEMO_LABEL and written["demo"] is True
    assert written["inference"]["patient_mode"] in ("head", "noisy_or")
    comparison = written["metrics"]["patient_mode_comparison"]["weighted_log_loss"]
    assert set(comparison) == {"head", "noisy_or"}
    assert written["training"]["n_validation_studies"] == 2
    assert len(written["training"]["history"]) == 2
    assert meta["input"]["crop"]["size"] == 32

    model = ClsModel.load(out, device="cpu")
    assert model.identity.name == "cls-test" and model.identity.demo
    vol, lm, _ = toy_study(99, 3)
    lm[lm == 1] = 0
    verdicts, patient = model.predict(vol, lm)
    assert [v.label for v in verdicts] == ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]
    assert not verdicts[0].assessed and verdicts[0].probability is None
    assert verdicts[0].reason == "not in the field of view"
    for v in verdicts[1:]:
        assert v.assessed and v.visible and 0.0 <= v.probability <= 1.0
    assert patient is not None and 0.0 <= patient <= 1.0 and math.isfinite(patient)

    # nothing to assess: no probability at all, never a number
    verdicts, patient = model.predict(vol, np.zeros_like(lm))
    assert patient is None and all(v.probability is None for v in verdicts)

    # resume continues from the checkpoint instead of starting over
    cfg3 = TrainConfig(epochs=3, batch_size=2, folds=3, fold=1, seed=3, **TINY)
    meta3 = train(
        items,
        crop,
        cfg3,
        out,
        device=torch.device("cpu"),
        resume=True,
        meta={"name": "cls-test", "version": "0.0.2"},
    )
    assert [h["epoch"] for h in meta3["training"]["history"]] == [1, 2, 3]

    (out / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(ModelLoadError, match="sha256"):
        ClsModel.load(out)


def _slice_labelled_items(*, unknown_first_slice: bool) -> list[StudyCrops]:
    """8 tiny cached studies, every other one with a fracture seen on the middle slice."""
    crop = CropConfig(size=32, n_slices=3, min_volume_mm3=10)
    items = []
    for i in range(8):
        fractured = i % 7 if i % 2 else None
        vol, lm, labels = toy_study(i, fractured)
        slice_labels = np.zeros((7, 3), np.float32)
        if fractured is not None:
            slice_labels[fractured, 1] = 1.0  # the middle slice shows the gap
            if unknown_first_slice:
                slice_labels[fractured, 0] = -1.0  # unknown: never used
        items.append(cached_crops(i, vol, lm, labels, crop, slice_labels))
    return items


def test_slice_pretraining_learns_fractured_slices_and_keeps_the_encoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    items = _slice_labelled_items(unknown_first_slice=True)
    cfg = TrainConfig(pretrain_steps=150, pretrain_batch=16, pretrain_lr=3e-3, seed=1, **TINY)
    net = FractureNet(in_chans=6, **TINY)
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    history = pretrain_encoder(net, items, cfg, torch.device("cpu"))
    assert [h["step"] for h in history] == [50, 100, 150]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"], history
    after = net.encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # no usable slice labels: nothing happens
    for it in items:
        it.slice_labels = None
    assert pretrain_encoder(net, items, cfg, torch.device("cpu")) == []


def test_head_phase_trains_lstm_and_heads_on_a_frozen_encoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    crop = CropConfig(size=32, n_slices=3, min_volume_mm3=10)
    items = _slice_labelled_items(unknown_first_slice=False)
    net = FractureNet(in_chans=6, **TINY)
    # features through the split forward equal the full forward
    x = items[0].crops.float() / 255.0
    present = torch.from_numpy(items[0].present[None])
    net.eval()
    with torch.inference_mode():
        full = net(x, present)
        feats = encode_items(net, items[:1], torch.device("cpu"))[0]
        split = net.forward_features(feats, present)
    assert torch.allclose(full["patient_logits"], split["patient_logits"], atol=1e-5)
    mirrored = encode_items(net, items[:1], torch.device("cpu"), flip=True)[0]
    assert mirrored.shape == feats.shape and not torch.allclose(mirrored, feats)

    encoder_before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    lstm_before = {k: v.clone() for k, v in net.lstm.state_dict().items()}
    cfg = TrainConfig(head_epochs=40, head_lr=1e-2, head_batch=4, folds=4, fold=0, seed=2, **TINY)
    prior = np.full(8, 0.3)
    history = train_heads(net, items[:6], items[6:], cfg, torch.device("cpu"), prior)
    assert [h["head_epoch"] for h in history] == list(range(1, 41))
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"], history
    assert all("val_loss_head" in h and "val_loss_noisy_or" in h for h in history)
    after = net.encoder.state_dict()
    assert all(torch.equal(encoder_before[k], after[k]) for k in encoder_before)
    assert any(not torch.equal(lstm_before[k], v) for k, v in net.lstm.state_dict().items())

    # through train(): the head phase is recorded in model.json, no end-to-end epoch needed
    cfg2 = TrainConfig(epochs=0, head_epochs=3, head_batch=4, folds=4, fold=0, seed=2, **TINY)
    meta = train(
        items,
        crop,
        cfg2,
        tmp_path / "pkg",
        device=torch.device("cpu"),
        meta={"name": "cls-head", "version": "0"},
    )
    assert [h["head_epoch"] for h in meta["training"]["head_history"]] == [1, 2, 3]
    assert meta["training"]["history"] == []
    assert meta["training"]["seconds"] > 0  # the run's time counts the head phase too
    assert ClsModel.load(tmp_path / "pkg", device="cpu").identity.name == "cls-head"


def _with_box_maps(items: list[StudyCrops], crop: CropConfig) -> list[StudyCrops]:
    """Box maps for the toy items: the gap columns (18:21 of 40) on the labelled slices."""
    for it in items:
        n, s = it.crops.shape[:2]
        maps = torch.zeros((n, s, crop.size, crop.size), dtype=torch.uint8)
        assert it.slice_labels is not None
        rows, cols = np.nonzero(it.slice_labels == 1)
        for v, k in zip(rows, cols, strict=True):
            # crop box: bone 12:28 grown by the margins, clipped to 0:40 -> whole slice
            maps[v, k, :, int(18 / 40 * crop.size) : int(np.ceil(21 / 40 * crop.size))] = 1
        it.box_maps = maps
    return items


def test_box_loss_pretraining_trains_both_terms_and_reports_val_auc() -> None:
    torch.manual_seed(0)
    crop = CropConfig(size=32, n_slices=3, min_volume_mm3=10)
    items = _with_box_maps(_slice_labelled_items(unknown_first_slice=False), crop)
    cfg = TrainConfig(
        pretrain_steps=150, pretrain_batch=16, pretrain_lr=3e-3, seed=1, box_loss=1.0, **TINY
    )
    net = FractureNet(in_chans=6, **TINY)
    history = pretrain_encoder(net, items[:6], cfg, torch.device("cpu"), val_items=items[6:])
    assert history[-1]["loss"] < 0.5 * history[0]["loss"], history
    # the box-map term is trained too (recorded separately)
    assert history[-1]["box_loss"] < 0.5 * history[0]["box_loss"], history
    # the validation slice AUC is measured at the end (both classes are in items[6:])
    assert "val_slice_auc" in history[-1]
    assert 0.0 <= history[-1]["val_slice_auc"] <= 1.0
    # the package's encoder keeps no trace of the temporary heads
    assert set(net.encoder.state_dict()) == set(ConvNeXt(6, [1] * 4, [8, 8, 16, 16]).state_dict())
    # box loss without box maps, or on a stage that does not exist, is refused
    for it in items:
        it.box_maps = None
    with pytest.raises(ValueError, match="box maps"):
        pretrain_encoder(net, items, cfg, torch.device("cpu"))
    _with_box_maps(items, crop)
    bad = TrainConfig(pretrain_steps=5, box_loss=1.0, box_stage=4, **TINY)
    with pytest.raises(ValueError, match="box_stage"):
        pretrain_encoder(net, items, bad, torch.device("cpu"))


def test_box_maps_survive_the_crop_cache_round_trip(tmp_path: Path) -> None:
    from ai.cls.data import _load, _save

    crop = CropConfig(size=32, n_slices=3, min_volume_mm3=10)
    item = _with_box_maps(_slice_labelled_items(unknown_first_slice=False)[1:2], crop)[0]
    _save(tmp_path / "a.npz", item)
    back = _load(tmp_path / "a.npz", "a")
    assert back.box_maps is not None and torch.equal(back.box_maps, item.box_maps)
    item.box_maps = None
    _save(tmp_path / "b.npz", item)
    assert _load(tmp_path / "b.npz", "b").box_maps is None
