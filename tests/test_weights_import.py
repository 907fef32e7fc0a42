"""load_encoder_state_dict: every weight source lands in the right encoder, or fails with the keys."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
from torch import nn
from torchgeo.models import ResNet50_Weights

from decur_lightning.datamodules import SyntheticMultimodalDataModule
from decur_lightning.models import create_encoder
from decur_lightning.weights import (
    EncoderWeightsMismatchError,
    export_encoders,
    load_encoder_state_dict,
    load_pretrained_encoder,
    load_state_dict_strictly,
)

from helpers import tiny_decur


# Tiny convolutions run several times faster on one thread when the cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_weights(encoder: nn.Module, reference: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Every entry of ``reference`` (keys under ``prefix``) equals the encoder's."""
    state = encoder.state_dict()
    checked = 0
    for key, value in reference.items():
        if key.startswith(prefix):
            torch.testing.assert_close(state[key[len(prefix):]], value, rtol=0, atol=0)
            checked += 1
    assert checked > 0


def randomized(module: nn.Module) -> nn.Module:
    """Perturb every parameter and buffer so that fresh encoders never match by chance."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.1)
    return module


@pytest.fixture(scope="module")
def decur_checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("decur")
    model = tiny_decur()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp)
    trainer.fit(model, SyntheticMultimodalDataModule(num_train=16, batch_size=8))
    path = tmp / "decur.ckpt"
    trainer.save_checkpoint(path)
    return path


# ------------------------------------------------------------------ (a) Lightning checkpoints
def test_lightning_checkpoint_by_name_and_by_index(decur_checkpoint):
    state = torch.load(decur_checkpoint, weights_only=False)["state_dict"]
    for selectors, channels, prefix in (((1, "sar"), 2, "encoder1."), ((2, "optical"), 4, "encoder2.")):
        for selector in selectors:
            encoder = create_encoder("resnet18", channels)
            load_pretrained_encoder(encoder, decur_checkpoint, selector)
            assert_same_weights(encoder, state, prefix)
    # BN running statistics are part of what lands
    assert any(k.endswith("running_var") for k in load_encoder_state_dict(decur_checkpoint, "sar"))


def test_lightning_checkpoint_needs_a_known_modality(decur_checkpoint):
    with pytest.raises(ValueError, match="two encoders"):
        load_encoder_state_dict(decur_checkpoint)
    with pytest.raises(ValueError, match=r"no modality 's2'.*'sar' \(1\) and 'optical' \(2\)"):
        load_encoder_state_dict(decur_checkpoint, "s2")


# ------------------------------------------------------------------ (b) export_encoders output
def test_export_folder_and_single_files(decur_checkpoint, tmp_path):
    paths = export_encoders(decur_checkpoint, tmp_path / "exported")
    state = torch.load(decur_checkpoint, weights_only=False)["state_dict"]
    for source, selector, channels, prefix in (
        (tmp_path / "exported", "sar", 2, "encoder1."),
        (tmp_path / "exported", 2, 4, "encoder2."),
        (paths["optical"], None, 4, "encoder2."),
        (str(paths["sar"]), "sar", 2, "encoder1."),
    ):
        encoder = create_encoder("resnet18", channels)
        load_pretrained_encoder(encoder, source, selector)
        assert_same_weights(encoder, state, prefix)
    with pytest.raises(ValueError, match="holds the encoders of"):
        load_encoder_state_dict(tmp_path / "exported")
    with pytest.raises(ValueError, match="is the encoder of modality 'sar'"):
        load_encoder_state_dict(paths["sar"], "optical")


# ------------------------------------------------------------------ (c) torchgeo weights
def test_torchgeo_weights_by_enum_and_by_name(monkeypatch):
    reference = randomized(create_encoder("resnet18", 2)).state_dict()
    released = {**reference, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    calls = []

    def fake_get_state_dict(self, progress=True):  # stands in for the download
        calls.append(self.name)
        return released

    monkeypatch.setattr(type(ResNet50_Weights.SENTINEL1_ALL_DECUR), "get_state_dict", fake_get_state_dict)
    for source in (ResNet50_Weights.SENTINEL1_ALL_DECUR, "ResNet50_Weights.SENTINEL2_ALL_DECUR"):
        with pytest.warns(UserWarning, match=r"Leaving out \['fc.weight', 'fc.bias'\]"):
            state_dict = load_encoder_state_dict(source)
        assert "fc.weight" not in state_dict
        encoder = create_encoder("resnet18", 2)
        load_state_dict_strictly(encoder, state_dict)
        assert_same_weights(encoder, reference)
    assert calls == ["SENTINEL1_ALL_DECUR", "SENTINEL2_ALL_DECUR"]


def test_unknown_source_says_what_is_accepted():
    with pytest.raises(FileNotFoundError, match="neither an existing file or folder nor a torchgeo weight"):
        load_encoder_state_dict("no/such/checkpoint.pth", 1)


# ------------------------------------------------------------------ (d) the authors' files
def _authors_joint(backbones: dict[int, nn.Module], extra: dict[str, torch.Tensor] | None = None) -> dict:
    model = {}
    for index, backbone in backbones.items():
        model.update({f"module.backbone_{index}.{k}": v.clone() for k, v in backbone.state_dict().items()})
    model["module.projector1.0.weight"] = torch.randn(16, 512)
    model["module.bn.running_mean"] = torch.zeros(16)
    model.update(extra or {})
    return {"epoch": 99, "model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 0.2}]}}


def test_authors_joint_checkpoint_resnet(tmp_path):
    sar, optical = randomized(create_encoder("resnet18", 2)), randomized(create_encoder("resnet18", 13))
    path = tmp_path / "checkpoint_0099.pth"
    torch.save(_authors_joint({1: sar, 2: optical}), path)
    for index, reference, channels in ((1, sar, 2), (2, optical, 13)):
        encoder = create_encoder("resnet18", channels)
        load_pretrained_encoder(encoder, path, index)
        assert_same_weights(encoder, reference.state_dict())
    with pytest.raises(ValueError, match="records no modality names"):
        load_encoder_state_dict(path, "s1")


def tensors_only(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (no RDA '_extra_state'): what the authors' files hold."""
    return {k: v for k, v in encoder.state_dict().items() if not k.endswith("_extra_state")}


def test_authors_joint_checkpoint_with_rda_blocks(tmp_path):
    sar, optical = randomized(create_encoder("resnet18_rda", 2)), randomized(create_encoder("resnet18_rda", 3))
    blocks = {}
    for index, encoder in ((1, sar), (2, optical)):
        blocks.update({f"module.da{index}_{k[3:]}": v for k, v in tensors_only(encoder).items() if k.startswith("da_")})
    trunks = {1: _Trunk(sar), 2: _Trunk(optical)}
    torch.save(_authors_joint(trunks, blocks), tmp_path / "rda.pth")

    encoder = create_encoder("resnet18_rda", 2)
    with pytest.warns(UserWarning, match="DAT's reference grid"):
        load_pretrained_encoder(encoder, tmp_path / "rda.pth", 1)
    assert_same_weights(encoder, tensors_only(sar))
    assert encoder.da_l3.reference_points == encoder.da_l4.reference_points == "dat"

    encoder = create_encoder("resnet18_rda", 3)
    with pytest.warns(UserWarning, match="never trained da2_"):
        load_pretrained_encoder(encoder, tmp_path / "rda.pth", 2)
    assert_same_weights(encoder, tensors_only(optical))

    shared = load_encoder_state_dict(tmp_path / "rda.pth", 2, rda_blocks=1)
    torch.testing.assert_close(shared["da_l3.proj_q.weight"], sar.da_l3.proj_q.weight)
    torch.testing.assert_close(shared["conv1.weight"], optical.conv1.weight)


def test_authors_joint_checkpoint_mit(tmp_path):
    rgb, hha = randomized(create_encoder("mit_b0", 3)), randomized(create_encoder("mit_b0", 3))
    torch.save(_authors_joint({1: rgb, 2: hha}), tmp_path / "mit.pth")
    encoder = create_encoder("mit_b0", 3)
    load_pretrained_encoder(encoder, tmp_path / "mit.pth", 2)
    assert_same_weights(encoder, hha.state_dict())  # trunk and the 2048-wide head


def test_authors_backbone_only_resnet_file(tmp_path):
    """Bare torchvision keys, no fc: the authors' SAR (backbone_1) / optical (backbone_2) files."""
    backbone = torchvision.models.resnet18()
    backbone.conv1 = nn.Conv2d(2, 64, kernel_size=7, stride=2, padding=3, bias=False)
    randomized(backbone)
    released = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    torch.save(released, tmp_path / "B2_rn18_decur_sar.pth")

    encoder = create_encoder("resnet18", 2)
    load_pretrained_encoder(encoder, tmp_path / "B2_rn18_decur_sar.pth")
    assert_same_weights(encoder, released)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(torch.rand(1, 2, 64, 64) * 0 + 0.5),
                                   nn.Sequential(*list(backbone.eval().children())[:-1])(
                                       torch.full((1, 2, 64, 64), 0.5)).flatten(1))

    rda = create_encoder("resnet18_rda", 2)
    assert rda.da_l3.reference_points == "centre"
    with pytest.warns(UserWarning, match="keep their initialisation"):
        load_pretrained_encoder(rda, tmp_path / "B2_rn18_decur_sar.pth")
    assert_same_weights(rda, released)
    assert rda.da_l3.reference_points == "centre"  # a plain trunk says nothing about the grid


def test_authors_rda_backbone_file(tmp_path):
    reference = randomized(create_encoder("resnet18_rda", 13))
    trunk = {f"backbone.{k}": v for k, v in _Trunk(reference).state_dict().items()}
    da2 = {f"da2_{k[3:]}": v for k, v in tensors_only(reference).items() if k.startswith("da_")}
    torch.save({**trunk, **da2}, tmp_path / "rda_s2.pth")
    encoder = create_encoder("resnet18_rda", 13)
    with pytest.warns(UserWarning, match="never trained da2_"), pytest.warns(UserWarning, match="DAT's reference grid"):
        load_pretrained_encoder(encoder, tmp_path / "rda_s2.pth")
    assert_same_weights(encoder, tensors_only(reference))
    assert encoder.da_l3.reference_points == encoder.da_l4.reference_points == "dat"

    other = randomized(create_encoder("resnet18_rda", 13))
    da1 = {f"da1_{k[3:]}": v for k, v in tensors_only(other).items() if k.startswith("da_")}
    torch.save({**trunk, **da1, **da2}, tmp_path / "rda_both.pth")
    with pytest.raises(ValueError, match="pass modality=1 or 2"):
        load_encoder_state_dict(tmp_path / "rda_both.pth")
    state_dict = load_encoder_state_dict(tmp_path / "rda_both.pth", 1)
    torch.testing.assert_close(state_dict["da_l4.rpe_table"], other.da_l4.rpe_table)


def test_authors_mit_file_without_head(tmp_path):
    reference = randomized(create_encoder("mit_b0", 3))
    released = {k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}
    torch.save(released, tmp_path / "mit_b0_rgb.pth")
    encoder = create_encoder("mit_b0", 3)
    head_before = encoder.head.weight.clone()
    load_pretrained_encoder(encoder, tmp_path / "mit_b0_rgb.pth")
    assert_same_weights(encoder, released)
    torch.testing.assert_close(encoder.head.weight, head_before)


# ------------------------------------------------------------------ files that do not fit
def test_wrong_files_fail_with_key_lists(tmp_path):
    torch.save(create_encoder("resnet18", 3).state_dict(), tmp_path / "rn18.pt")
    with pytest.raises(EncoderWeightsMismatchError) as excinfo:
        load_pretrained_encoder(create_encoder("resnet34", 3), tmp_path / "rn18.pt")
    assert "layer1.2.conv1.weight" in excinfo.value.missing_keys
    assert "missing keys" in str(excinfo.value) and "layer1.2.conv1.weight" in str(excinfo.value)

    with pytest.raises(EncoderWeightsMismatchError) as excinfo:
        load_pretrained_encoder(create_encoder("resnet18", 13), tmp_path / "rn18.pt")
    assert excinfo.value.mismatched_shapes == [("conv1.weight", (64, 3, 7, 7), (64, 13, 7, 7))]

    torch.save({"backbone_1.conv1.weight": torch.zeros(64, 3, 7, 7), "backbone_1.extra.weight": torch.zeros(2)},
               tmp_path / "odd.pth")
    with pytest.raises(EncoderWeightsMismatchError) as excinfo:
        load_pretrained_encoder(create_encoder("resnet18", 3), tmp_path / "odd.pth", 1)
    assert excinfo.value.unexpected_keys == ["extra.weight"]
    assert "bn1.weight" in excinfo.value.missing_keys

    torch.save({"epoch": 1, "args": "not a state dict"}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="top-level keys"):
        load_encoder_state_dict(tmp_path / "junk.pth")


class _Trunk(nn.Module):
    """A ResNetRDA without its attention blocks: the authors' plain backbone layout."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        for name, child in encoder.named_children():
            if not name.startswith("da_"):
                self.add_module(name, child)
