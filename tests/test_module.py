"""DeCURModule: steps, logging, optimiser groups, input checks."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightly.utils.lars import LARS

from decur_lightning.datamodules import SyntheticMultimodalDataModule
from decur_lightning.optim import warmup_schedule
from decur_lightning.ssl import resolve_common_dims
from decur_lightning.ssl.base import build_projector

from helpers import quiet_trainer, tiny_batch, tiny_decur


def test_common_dims_from_ratio_or_count():
    assert resolve_common_dims(8192, 0.875, None) == 7168
    assert resolve_common_dims(8192, 0.75, None) == 6144
    assert resolve_common_dims(64, 0.5, 10) == 10
    assert tiny_decur(common_ratio=0.5).common_dims == 32
    assert tiny_decur(common_dims=60).criterion.common_dims == {("sar", "optical"): 60}
    with pytest.raises(ValueError, match=r"common_ratio must lie in \(0, 1\]"):
        tiny_decur(common_ratio=1.5)
    with pytest.raises(ValueError, match="common_dims must satisfy"):
        tiny_decur(common_dims=65)


def test_projectors_are_separate_barlow_twins_mlps():
    model = tiny_decur(projector_dims=(32, 48, 16))
    sar, optical = model.projectors["sar"], model.projectors["optical"]
    layers = [type(m).__name__ for m in sar.layers]
    assert layers == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert sar.layers[-1].out_features == 16
    assert all(p1.data_ptr() != p2.data_ptr() for p1, p2 in zip(sar.parameters(), optical.parameters()))
    assert model.embed(torch.rand(3, 2, 32, 32), "sar").shape == (3, 16)
    with pytest.raises(ValueError, match="positive sizes"):
        build_projector(8, [16, 0])


def test_no_projector_ablation_puts_the_loss_on_encoder_features():
    """Fig. 3b: ``projector_dims=[]`` -> no projector, K = the encoders' feature width."""
    model = tiny_decur(projector_dims=[], common_ratio=0.75)
    assert all(isinstance(p, torch.nn.Identity) for p in model.projectors.values())
    assert model.embedding_dim == 512 and model.common_dims == 384
    x = torch.rand(4, 2, 32, 32)
    model.eval()
    torch.testing.assert_close(model.embed(x, "sar"), model.encoders["sar"](x))
    model.train()
    loss = model.training_step(tiny_batch(n=8), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.encoders["sar"].conv1.weight.grad is not None
    with pytest.raises(ValueError, match="feature widths differ"):
        tiny_decur(projector_dims=[], modalities={"sar": 2, "optical": {"bands": 4, "encoder": "vit_tiny_patch16_224"}})


def test_second_view_source_image2_feeds_view_two():
    """``image2_<name>`` (e.g. another season) is the source of view 2 of that modality."""
    from torch import nn

    from decur_lightning.augmentations import ViewPair

    identity = ViewPair(nn.Identity(), nn.Identity())
    model = tiny_decur(views={"sar": identity, "optical": identity})
    batch = tiny_batch(n=4)
    batch["image2_sar"] = torch.rand(4, 2, 32, 32)
    views = model.make_views(batch, seed=0)
    (x1a, x1b), (x2a, x2b) = views["sar"], views["optical"]
    assert torch.equal(x1a, batch["image_sar"]) and torch.equal(x1b, batch["image2_sar"])
    assert torch.equal(x2a, batch["image_optical"]) and torch.equal(x2b, batch["image_optical"])
    batch["image2_sar"][0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="image2_sar"):
        model.training_step(batch, 0)
    batch["image2_sar"] = torch.rand(4, 2, 16, 16)
    with pytest.raises(ValueError, match="image2_sar .* same bands and size"):
        model.make_views(batch)


def test_training_step_returns_loss_and_logs_every_term():
    model = tiny_decur()
    logged: dict[str, torch.Tensor] = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, value)  # type: ignore[method-assign]
    loss = model.training_step(tiny_batch(n=8), 0)
    assert loss.ndim == 0 and loss.requires_grad and torch.isfinite(loss)
    expected = {
        "train/loss",
        "train/intra_sar",
        "train/intra_optical",
        "train/common_sar_optical",
        "train/unique_sar_optical",
        "train/common_corr_sar_optical",
        "train/unique_corr_sar_optical",
        "train/embedding_std_sar",
        "train/embedding_std_optical",
    }
    assert expected <= set(logged)
    torch.testing.assert_close(
        logged["train/loss"],
        logged["train/intra_sar"]
        + logged["train/intra_optical"]
        + logged["train/common_sar_optical"]
        + logged["train/unique_sar_optical"],
    )
    assert -1 <= float(logged["train/common_corr_sar_optical"]) <= 1
    loss.backward()
    assert all(p.grad is not None for p in model.encoders.parameters())


def test_views_have_crop_size_and_differ():
    model = tiny_decur(crop_size=24)
    views = model.make_views(tiny_batch(n=4, size=40))
    (x1a, x1b), (_x2a, x2b) = views["sar"], views["optical"]
    assert x1a.shape == (4, 2, 24, 24) and x2b.shape == (4, 4, 24, 24)
    assert not torch.equal(x1a, x1b)
    assert not x1a.requires_grad


def test_view_kind_defaults_to_the_name_when_it_is_a_kind():
    model = tiny_decur(modalities={"dem": 2, "rgb": 3})
    assert [spec.view for spec in model.encoders.specs.values()] == ["dem", "rgb"]
    model = tiny_decur(modalities={"a": 2, "b": {"bands": 4, "view": "optical"}})
    assert [spec.view for spec in model.encoders.specs.values()] == ["generic", "optical"]


def test_missing_key_wrong_channels_and_batch_of_one():
    model = tiny_decur()
    with pytest.raises(KeyError, match=r"has keys \['image_optical', 'image_s1'\]"):
        model.training_step({"image_s1": torch.rand(4, 2, 32, 32), "image_optical": torch.rand(4, 4, 32, 32)}, 0)
    with pytest.raises(
        ValueError,
        match=r"image_optical has shape \(4, 13, 32, 32\).*expects \(N, 4, H, W\).*'optical': \{'bands': 13\}",
    ):
        model.training_step(tiny_batch(channels=(2, 13)), 0)
    with pytest.raises(ValueError, match="batch of 1 sample"):
        model.training_step(tiny_batch(n=1), 0)
    with pytest.raises(ValueError, match="must differ"):
        tiny_decur(modalities=["sar", "sar"])
    with pytest.raises(ValueError, match="view='colour'"):
        tiny_decur(modalities={"sar": {"bands": 2, "view": "colour"}, "optical": 4})
    with pytest.raises(ValueError, match="needs 3 bands.*image_optical has 4"):
        tiny_decur(modalities={"sar": 2, "optical": {"bands": 4, "view": "rgb"}}).training_step(tiny_batch(), 0)
    with pytest.raises(ValueError, match="learns from at least 2 modalities; got 1"):
        tiny_decur(modalities={"sar": 2})
    with pytest.raises(ValueError, match="Modality names are identifiers"):
        tiny_decur(modalities={"s-1": 2, "optical": 4})


def test_lars_groups_exclude_biases_and_norms(tmp_path):
    model = tiny_decur()
    trainer = quiet_trainer(tmp_path, 1)
    trainer.fit(model, SyntheticMultimodalDataModule(num_train=32, batch_size=16))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, LARS)
    weights, others = optimizer.param_groups
    assert weights["initial_lr"] == pytest.approx(0.2) and weights["weight_decay"] == pytest.approx(1e-6)
    assert others["initial_lr"] == pytest.approx(0.0048) and others["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in others["params"])
    n_params = sum(1 for m in (model.encoders, model.projectors) for _ in m.parameters())
    assert len(weights["params"]) + len(others["params"]) == n_params


def test_adamw_option():
    model = tiny_decur(optimizer="adamw", lr=1e-4, weight_decay=0.05)
    from decur_lightning.optim import build_optimizer

    opt = build_optimizer([model.encoders["sar"]], "adamw", lr=1e-4, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_cosine_schedule_with_warmup():
    f = warmup_schedule(100, 10, "cosine")
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    g = warmup_schedule(10, 0, "cosine")
    assert g(0) == pytest.approx(1.0) and g(5) == pytest.approx(0.5)


def test_fit_on_synthetic_reduces_loss(tmp_path):
    L.seed_everything(0)
    model = tiny_decur(projector_dims=(64, 32), optimizer="adamw", lr=2e-3, crop_scale=(0.5, 1.0))
    dm = SyntheticMultimodalDataModule(num_train=256, num_val=64, batch_size=64)
    trainer = L.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    dm.setup()
    batch = next(iter(dm.val_dataloader()))

    def held_out_loss() -> torch.Tensor:  # batch statistics, the same views each time
        with torch.no_grad():
            views = model.make_views(batch, seed=7)
            return model.compute_loss({n: [model.embed(v, n) for v in vs] for n, vs in views.items()})["loss"]

    before = held_out_loss()
    trainer.fit(model, dm)
    model.train()
    assert held_out_loss() < 0.9 * before


def test_channels_last_gives_the_same_loss():
    reference = tiny_decur(projector_dims=(32, 32))
    fast = tiny_decur(projector_dims=(32, 32), channels_last=True)
    fast.load_state_dict(reference.state_dict())
    assert fast.encoders["sar"].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    batch = tiny_batch(n=8)
    losses = []
    for model in (reference, fast):
        views = model.make_views(batch, seed=1)
        losses.append(model.compute_loss({n: [model.embed(v, n) for v in vs] for n, vs in views.items()})["loss"])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-4)


def test_compiled_encoders_keep_their_state_dict_keys():
    plain = tiny_decur(projector_dims=(32, 32))
    compiled = tiny_decur(projector_dims=(32, 32), compile_encoders=True)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert compiled.encoders["sar"]._compiled_call_impl is not None


@pytest.mark.slow
def test_compiled_encoders_give_the_same_loss():
    reference = tiny_decur(projector_dims=(32, 32))
    compiled = tiny_decur(projector_dims=(32, 32), compile_encoders=True)
    compiled.load_state_dict(reference.state_dict())
    batch = tiny_batch(n=8)
    losses = [
        m.compute_loss({n: [m.embed(v, n) for v in vs] for n, vs in m.make_views(batch, seed=1).items()})["loss"]
        for m in (reference, compiled)
    ]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-3)


def test_encoder_kwargs_reach_every_encoder_in_pretraining_and_downstream():
    """The RDA switches (Tables 4/7 "DA" ablation, DAT's grid) are set from a config."""
    from decur_lightning.downstream import MultimodalClassificationModule

    kwargs = {"rda_residual": False, "rda_reference_points": "dat"}
    model = tiny_decur(encoder="resnet18_rda", encoder_kwargs=kwargs)
    blocks = [enc.da_l3 for enc in model.encoders.values()] + [enc.da_l4 for enc in model.encoders.values()]
    assert all(not block.residual and block.reference_points == "dat" for block in blocks)
    downstream = MultimodalClassificationModule(
        modalities={"sar": 2, "optical": 4},
        encoder="resnet18_rda",
        num_classes=3,
        encoder_kwargs={"rda_residual": False},
    )
    assert all(
        not enc.da_l3.residual and enc.da_l3.reference_points == "centre" for enc in downstream.encoders.values()
    )
    per_modality = tiny_decur(
        encoder="resnet18_rda",
        modalities={"sar": {"bands": 2, "encoder_kwargs": {"rda_residual": False}}, "optical": 4},
    )
    assert [enc.da_l3.residual for enc in per_modality.encoders.values()] == [False, True]
    with pytest.raises(TypeError):
        tiny_decur(encoder_kwargs={"no_such_argument": 1})


def test_view_asymmetry_and_datamodule_kinds_reach_the_view_pipelines():
    """``view_asymmetry="symmetric"`` (released code) gives both views blur p=0.5, solarize p=0.2."""

    def probabilities(pipeline, name):
        return [op.p for op in pipeline if type(op).__name__ == name]

    model = tiny_decur(view_asymmetry="symmetric")
    model.make_views(tiny_batch(n=4), seed=0)
    pair = model._views["optical"]
    for view in (pair.view1, pair.view2):
        assert probabilities(view, "RandomGaussianBlur") == [0.5] and probabilities(view, "RandomSolarize") == [0.2]
    default = tiny_decur()
    default.make_views(tiny_batch(n=4), seed=0)
    assert probabilities(default._views["optical"].view1, "RandomSolarize") == []
    assert probabilities(default._views["optical"].view2, "RandomSolarize") == [0.2]
    with pytest.raises(ValueError, match="'indoor_rgb' .* needs 3 bands"):
        tiny_decur(modalities={"sar": 2, "optical": {"bands": 4, "view": "indoor_rgb"}}).make_views(tiny_batch(n=4))
