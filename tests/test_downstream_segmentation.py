"""MultimodalSegmentationModule: the paper's FCN and CMX, frozen and fine-tuned, any input size."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from decur_lightning.downstream import (
    FCNHead,
    FeatureFusionModule,
    FeatureRectifyModule,
    MultimodalSegmentationModule,
)
from decur_lightning.modalities import Modality
from decur_lightning.models import create_encoder
from decur_lightning.models.encoders import encoder_feature_maps

IGNORE = 255
NUM_CLASSES = 3


# Tiny convolutions run several times faster on one thread when the cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


class EasyScenes(Dataset):
    """16 px blocks of classes 0..2: RGB band ``c`` is bright where the class is ``c``, the DEM
    holds ``class / 2`` (and a 2-band "SAR" the DEM and its complement); one block in eight is
    unlabelled (ignore index)."""

    def __init__(self, num_samples: int, seed: int, size: int = 64, block: int = 16) -> None:
        generator = torch.Generator().manual_seed(seed)
        cells = size // block
        classes = torch.randint(0, NUM_CLASSES, (num_samples, cells, cells), generator=generator)
        self.mask = classes.repeat_interleave(block, 1).repeat_interleave(block, 2)
        self.rgb = 0.2 * torch.rand(num_samples, 3, size, size, generator=generator)
        self.rgb += 0.6 * F.one_hot(self.mask, NUM_CLASSES).permute(0, 3, 1, 2)
        self.dem = self.mask[:, None].float() / 2 + 0.1 * torch.rand(num_samples, 1, size, size, generator=generator)
        self.sar = torch.cat([self.dem, 1 - self.dem], dim=1)  # a third modality
        unlabelled = torch.rand(num_samples, cells, cells, generator=generator) < 0.125
        self.mask[unlabelled.repeat_interleave(block, 1).repeat_interleave(block, 2)] = IGNORE

    def __len__(self) -> int:
        return len(self.mask)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {
            "image_rgb": self.rgb[index],
            "image_dem": self.dem[index],
            "image_sar": self.sar[index],
            "mask": self.mask[index],
        }


class EasyDataModule(L.LightningDataModule):
    def __init__(self, size: int = 64, num_train: int = 48, num_val: int = 16, batch_size: int = 8) -> None:
        super().__init__()
        self.train, self.val = EasyScenes(num_train, 0, size), EasyScenes(num_val, 1, size)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size)


RGB_DEM = {"rgb": {"bands": 3}, "dem": {"bands": 1}}
RGB_ONLY = {"rgb": {"bands": 3}}


def make_fcn(**overrides) -> MultimodalSegmentationModule:
    kwargs = dict(modalities=RGB_DEM, encoder="resnet18", num_classes=NUM_CLASSES, ignore_index=IGNORE)
    kwargs.update(overrides)
    return MultimodalSegmentationModule(**kwargs)


def fit(model: L.LightningModule, data: L.LightningDataModule, steps: int, tmp_path) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    return trainer


def evaluate(model: L.LightningModule, data: L.LightningDataModule) -> dict[str, float]:
    validator = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return validator.validate(model, data, verbose=False)[0]


def encoder_state(model: MultimodalSegmentationModule) -> dict[str, Tensor]:
    return {f"{name}.{k}": v.clone() for name, e in model.encoders.items() for k, v in e.state_dict().items()}


# ------------------------------------------------------------------ FCN
@pytest.mark.parametrize("size", [250, 64])
def test_fcn_output_has_the_input_size(size):
    for model in (make_fcn(), make_fcn(modalities=RGB_ONLY)):
        inputs = {name: torch.rand(2, spec.bands, size, size) for name, spec in model.encoders.specs.items()}
        assert model(inputs).shape == (2, NUM_CLASSES, size, size)


def test_fcn_head_equals_the_papers_upsample_then_convolve_order():
    head = FCNHead([8, 16, 32], num_classes=5)
    levels = [torch.randn(2, 8, 32, 32), torch.randn(2, 16, 16, 16), torch.randn(2, 32, 8, 8)]
    size = (250, 250)
    reference = sum(
        F.conv2d(F.interpolate(level, size=size, mode="bilinear", align_corners=False), conv.weight, conv.bias)
        for level, conv in zip(levels, head.classifiers)
    )
    torch.testing.assert_close(head(levels, size), reference, rtol=1e-4, atol=1e-4)


def test_fcn_levels_concatenate_both_modalities():
    model = make_fcn()
    channels = [conv.in_channels for conv in model.head.classifiers]
    assert channels == [128 + 128, 256 + 256, 512 + 512]  # ResNet-18 layer2/3/4, both modalities
    assert [conv.in_channels for conv in make_fcn(modalities=RGB_ONLY).head.classifiers] == [128, 256, 512]
    three = make_fcn(modalities={**RGB_DEM, "sar": {"bands": 2}})
    assert [conv.in_channels for conv in three.head.classifiers] == [3 * 128, 3 * 256, 3 * 512]


def test_every_pixel_of_a_250px_patch_is_evaluated():
    model = make_fcn().eval()
    data = EasyScenes(2, 3, size=250, block=25)
    batch = {"image_rgb": data.rgb, "image_dem": data.dem, "mask": data.mask}
    with torch.no_grad():
        model.validation_step(batch, 0)
    counted = model.val_metrics["miou"].confmat.sum()
    assert counted == (data.mask != IGNORE).sum() and counted > 0.8 * 2 * 250 * 250


def test_fcn_finetune_learns_the_easy_scenes(tmp_path):
    model = make_fcn(freeze_encoders=False, lr=1e-3)
    data = EasyDataModule()
    before = evaluate(model, data)
    fit(model, data, 30, tmp_path)
    after = evaluate(model, data)
    assert after["val/miou"] > 0.7 and after["val/miou"] > before["val/miou"] + 0.3, (before, after)
    assert after["val/oa"] > 0.85 and after["val/loss"] < before["val/loss"]


def test_frozen_encoders_stay_unchanged(tmp_path):
    model = make_fcn(freeze_encoders=True, lr=1e-2)
    before, head_before = encoder_state(model), model.head.classifiers[0].weight.clone()
    modes = []

    class RecordModes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append([e.training for e in pl_module.encoders.values()] + [pl_module.head.training])

    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[RecordModes()],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, EasyDataModule())
    for key, value in encoder_state(model).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(model.head.classifiers[0].weight, head_before)
    assert modes and all(m == [False, False, True] for m in modes)


def test_finetuned_encoders_change(tmp_path):
    model = make_fcn(freeze_encoders=False, modalities=RGB_ONLY)
    before = encoder_state(model)
    fit(model, EasyDataModule(), 2, tmp_path)
    after = encoder_state(model)
    assert not torch.equal(after["rgb.conv1.weight"], before["rgb.conv1.weight"])
    assert not torch.equal(after["rgb.bn1.running_mean"], before["rgb.bn1.running_mean"])


def test_adamw_decays_weights_only_and_poly_schedule(tmp_path):
    model = make_fcn(modalities=RGB_ONLY, lr_schedule="poly", warmup_epochs=0.0)
    trainer = fit(model, EasyDataModule(num_train=16), 4, tmp_path)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim <= 1 for p in plain["params"])
    assert decayed["initial_lr"] == 1e-4
    assert decayed["lr"] == pytest.approx(0.0)  # (1 - 4/4) ** 0.9 after the last step


# ------------------------------------------------------------------ CMX
def test_feature_rectify_and_fusion_modules():
    x1, x2 = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    frm = FeatureRectifyModule(16, lambda_c=0.0, lambda_s=0.0)
    out1, out2 = frm(x1, x2)
    torch.testing.assert_close(out1, x1)
    torch.testing.assert_close(out2, x2)
    out1, out2 = FeatureRectifyModule(16)(x1, torch.zeros_like(x2))
    torch.testing.assert_close(out1, x1)  # nothing to add from an empty other modality
    assert not torch.equal(out2, torch.zeros_like(x2))
    assert FeatureFusionModule(16, num_heads=2)(x1, x2).shape == (2, 16, 8, 8)


@pytest.fixture(scope="module")
def cmx_model() -> MultimodalSegmentationModule:
    return MultimodalSegmentationModule(
        {"rgb": {"bands": 3}, "hha": {"bands": 3}},
        encoder="mit_b0",
        num_classes=5,
        head="cmx",
        decoder_channels=64,
        optimizer="adamw",
        lr=6e-5,
        lr_schedule="poly",
    )


def test_cmx_forward_shape(cmx_model):
    for size in ((64, 64), (60, 70)):
        inputs = {"rgb": torch.rand(2, 3, *size), "hha": torch.rand(2, 3, *size)}
        assert cmx_model(inputs).shape == (2, 5, *size)
    assert len(cmx_model.head.rectify) == len(cmx_model.head.fuse) == 4


def test_cmx_training_step_updates_branches_and_fusion(cmx_model):
    batch = {
        "image_rgb": torch.rand(2, 3, 64, 64),
        "image_hha": torch.rand(2, 3, 64, 64),
        "mask": torch.randint(0, 5, (2, 64, 64)),
    }
    batch["mask"][:, :8] = IGNORE
    cmx_model.train()
    optimizer = torch.optim.AdamW([p for p in cmx_model.parameters() if p.requires_grad], lr=1e-3)
    watched = {
        "rgb branch": cmx_model.encoders["rgb"].block1[0].attn.q.weight,
        "hha branch": cmx_model.encoders["hha"].patch_embed1.proj.weight,
        "frm": cmx_model.head.rectify[2].spatial_mlp[0].weight,
        "ffm": cmx_model.head.fuse[1].cross_attention.kv2.weight,
        "decoder": cmx_model.head.decode_head.classifier.weight,
    }
    before = {name: p.detach().clone() for name, p in watched.items()}
    loss = cmx_model.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    for name, param in watched.items():
        assert not torch.equal(param, before[name]), name
    assert not cmx_model.encoders["rgb"].head.weight.requires_grad  # the pretraining head is unused


def test_cmx_branches_start_from_pretrained_mit(tmp_path):
    rgb, hha = create_encoder("mit_b0", 3), create_encoder("mit_b0", 3)
    model = {f"module.backbone_{i}.{k}": v for i, enc in ((1, rgb), (2, hha)) for k, v in enc.state_dict().items()}
    torch.save({"epoch": 199, "model": model, "optimizer": {}}, tmp_path / "checkpoint.pth")
    source = str(tmp_path / "checkpoint.pth")
    cmx = MultimodalSegmentationModule(
        {
            "rgb": {"bands": 3, "weights": source, "weights_modality": 1},
            "hha": {"bands": 3, "weights": source, "weights_modality": 2},
        },
        encoder="mit_b0",
        num_classes=5,
        head="cmx",
        decoder_channels=64,
    )
    torch.testing.assert_close(cmx.encoders["rgb"].block2[0].attn.q.weight, rgb.block2[0].attn.q.weight)
    torch.testing.assert_close(cmx.encoders["hha"].block2[0].attn.q.weight, hha.block2[0].attn.q.weight)


def test_cmx_is_rgb_x_and_says_so():
    for modalities in (RGB_ONLY, {**RGB_DEM, "hha": {"bands": 3}}, ["rgb", "hha", "dem"]):
        with pytest.raises(
            ValueError, match=r"head='cmx' fuses RGB with one other modality \(RGB-X\): give exactly two"
        ):
            make_fcn(head="cmx", modalities=modalities, encoder="mit_b0")
    with pytest.raises(TypeError, match="mit_b0 ... mit_b5"):
        make_fcn(head="cmx")


def test_cmx_from_the_datamodule_checks_the_count_when_it_builds(tmp_path):
    class ThreeModalities(EasyDataModule):
        modality_specs = {"rgb": Modality(bands=3), "dem": Modality(bands=1), "hha": Modality(bands=3)}

    model = make_fcn(head="cmx", modalities=None, encoder="mit_b0", decoder_channels=32)
    with pytest.raises(ValueError, match=r"give exactly two modalities, RGB first .*got 3: \['rgb', 'dem', 'hha'\]"):
        fit(model, ThreeModalities(), 1, tmp_path)


def test_cmx_needs_both_modalities_at_evaluation(cmx_model):
    cmx_model.eval()
    batch = {"image_rgb": torch.rand(1, 3, 32, 32), "mask": torch.zeros(1, 32, 32, dtype=torch.long)}
    with pytest.raises(
        ValueError, match=r"CMX fuses RGB and X stage by stage and needs both; the batch has no \['image_hha'\]"
    ):
        cmx_model.validation_step(batch, 0)


def test_configuration_errors_say_what_to_do():
    with pytest.raises(TypeError, match="freeze_encoders must be true or false"):
        make_fcn(freeze_encoders="frozen")
    with pytest.raises(ValueError, match="lr_schedule must be"):
        make_fcn(lr_schedule="step")
    with pytest.raises(KeyError, match=r"The batch has no \['image_dem'\]"):
        make_fcn().training_step({"image_rgb": torch.rand(1, 3, 32, 32), "mask": torch.zeros(1, 32, 32)}, 0)


def test_unused_parameters_are_frozen_for_ddp():
    model = make_fcn(modalities=RGB_ONLY)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoders.rgb.layer4") for n in trainable) and any(n.startswith("head.") for n in trainable)


# ------------------------------------------------------------------ test-time scales and flip (CMX's MS & flip)
def _rgb_dem(height: int = 40, width: int = 56) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(4)
    return {
        "rgb": torch.rand(1, 3, height, width, generator=generator),
        "dem": torch.rand(1, 1, height, width, generator=generator),
    }


def test_single_scale_testing_is_the_forward():
    model = make_fcn().eval()
    inputs = _rgb_dem()
    with torch.no_grad():
        assert torch.equal(model.test_logits(inputs), model(inputs))


def test_multi_scale_flip_testing_averages_the_views_probabilities():
    model = make_fcn(test_scales=(0.5, 1.0), test_flip=True).eval()
    inputs = _rgb_dem()
    with torch.no_grad():
        out = model.test_logits(inputs)
        mirrored = model.test_logits({name: x.flip(-1) for name, x in inputs.items()})
        probabilities = []
        for scale in (0.5, 1.0):
            scaled = {
                name: F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
                for name, x in inputs.items()
            }
            for logits in (model(scaled), model({name: x.flip(-1) for name, x in scaled.items()}).flip(-1)):
                resized = F.interpolate(logits, size=(40, 56), mode="bilinear", align_corners=False)
                probabilities.append(resized.softmax(1))
        reference = torch.stack(probabilities).mean(0).log()
    assert out.shape == (1, NUM_CLASSES, 40, 56)
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(mirrored, out.flip(-1))  # flip averaging makes the prediction mirror-symmetric
    assert not torch.allclose(out, model(inputs).log_softmax(1), atol=1e-3)


def test_multi_scale_test_step_scores_every_pixel_once():
    model = make_fcn(test_scales=(0.75, 1.0, 1.25), test_flip=True).eval()
    inputs = _rgb_dem(30, 44)
    mask = torch.randint(0, NUM_CLASSES, (1, 30, 44))
    mask[:, :5] = IGNORE
    with torch.no_grad():
        loss = model.test_step({"image_rgb": inputs["rgb"], "image_dem": inputs["dem"], "mask": mask}, 0)
    assert torch.isfinite(loss)
    assert model.test_metrics["miou"].confmat.sum() == (mask != IGNORE).sum()
    assert model.val_metrics["miou"].confmat.sum() == 0
    with pytest.raises(ValueError, match="test_scales"):
        make_fcn(test_scales=())


# ------------------------------------------------------------------ a modality missing at evaluation
def test_fcn_missing_modality_gets_constant_maps_of_its_running_means():
    model = make_fcn(freeze_encoders=True)  # frozen, batch norm in eval: maps are a fixed function of the input
    data = EasyScenes(8, 0, size=64)
    batches = [
        {"image_rgb": data.rgb[i : i + 4], "image_dem": data.dem[i : i + 4], "mask": data.mask[i : i + 4]}
        for i in (0, 4)
    ]
    for index, batch in enumerate(batches):
        model.training_step(batch, index)
    model.eval()
    dem_encoder = model.encoders["dem"]
    with torch.no_grad():
        per_batch = [
            torch.cat([m.mean(dim=(0, 2, 3)) for m in encoder_feature_maps(dem_encoder, b["image_dem"])[-3:]])
            for b in batches
        ]
        expected = torch.stack(per_batch).mean(0)
        torch.testing.assert_close(model.feature_means.mean("dem"), expected)
        assert expected.shape == (128 + 256 + 512,)

        rgb = EasyScenes(2, 1, size=50, block=25).rgb  # 50 px: padded to 64 inside, cropped back
        with pytest.warns(UserWarning, match="Modality 'dem' is missing"):
            logits = model({"rgb": rgb})
        # reference: the paper's FCN on the RGB maps and constant DEM maps of the means
        padded = F.pad(rgb, (0, 14, 0, 14))
        rgb_maps = encoder_feature_maps(model.encoders["rgb"], padded)[-3:]
        dem_means = expected.split([128, 256, 512])
        levels = [
            torch.cat([m, mean[None, :, None, None].expand(2, -1, *m.shape[-2:])], dim=1)
            for m, mean in zip(rgb_maps, dem_means)
        ]
        reference = model.head(levels, (64, 64))[..., :50, :50]
    assert logits.shape == (2, NUM_CLASSES, 50, 50) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference)
    # the test step scores it too, over the test scales
    mask = torch.randint(0, NUM_CLASSES, (2, 50, 50))
    with torch.no_grad():
        assert torch.isfinite(model.test_step({"image_rgb": rgb, "mask": mask}, 0))
    assert model.test_metrics["miou"].confmat.sum() == 2 * 50 * 50


def test_fcn_over_three_modalities_trains_with_a_datamodule_stub(tmp_path):
    class ThreeModalities(EasyDataModule):
        modality_specs = {"rgb": Modality(bands=3), "dem": Modality(bands=1), "sar": Modality(bands=2)}

    data = ThreeModalities(num_train=16, num_val=4)
    model = make_fcn(modalities=None, freeze_encoders=False)
    before = model.hparams.modalities
    fit(model, data, 2, tmp_path)
    assert before is None and model.modalities == ("rgb", "dem", "sar")
    assert [conv.in_channels for conv in model.head.classifiers] == [128 + 128 + 128, 3 * 256, 3 * 512]
    assert model.feature_means.batches("sar") == 2
    metrics = evaluate(model, data)
    assert 0.0 <= metrics["val/miou"] <= 1.0


@pytest.mark.parametrize("schedule, warmup_epochs", [("poly", 10.0), ("poly", 0.0), ("constant", 2.5)])
def test_schedule_equals_the_former_warmup_then(schedule, warmup_epochs):
    """optim.warmup_schedule gives the learning rates of the former segmentation-only warmup_then."""
    from types import SimpleNamespace

    total, epochs = 200, 50
    model = make_fcn(modalities=RGB_ONLY, lr_schedule=schedule, warmup_epochs=warmup_epochs, lr=6e-5)
    model._trainer = SimpleNamespace(estimated_stepping_batches=total, max_epochs=epochs)
    configured = model.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    warmup = min(total - 1, round(warmup_epochs * total / epochs))

    def former(step: int) -> float:  # warmup_then as it was
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return (1.0 - min(1.0, (step - warmup) / max(1, total - warmup))) ** 0.9

    for step in range(total + 1):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(6e-5 * former(step), rel=1e-12, abs=1e-20), step
        optimizer.step()
        scheduler.step()
