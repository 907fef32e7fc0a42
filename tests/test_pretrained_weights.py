"""Pretrained encoder weights from a path, a torchgeo weight enum, its name, or ImageNet (no network).

Modules hold their encoders in an EncoderSet (one per named modality); these tests build it
directly, as every module does from ``modalities={name: {"weights": ...}}``.
"""

from __future__ import annotations

import huggingface_hub
import pytest
import timm
import torch
from timm.models import adapt_input_conv
from torchgeo.models import ResNet50_Weights

from decur_lightning.encoder_set import EncoderSet
from decur_lightning.modalities import Modality
from decur_lightning.models import MiTEncoder, create_encoder
from decur_lightning.models.encoders import ImageNetWeightsError
from decur_lightning.weights import load_pretrained_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_weights_from_a_state_dict_file(tmp_path):
    source = timm.create_model("resnet18", in_chans=3, num_classes=0)
    path = tmp_path / "enc.pt"
    torch.save(source.state_dict(), path)
    encoder = create_encoder("resnet18", 3)
    load_pretrained_encoder(encoder, str(path))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(encoder.state_dict()[key], value)
    # the same through a module's encoder set (the modality's name is ignored by a one-encoder file)
    encoders = EncoderSet({"rgb": Modality(bands=3, encoder="resnet18", weights=str(path))})
    torch.testing.assert_close(encoders["rgb"].layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    # create_encoder itself only builds ImageNet weights in
    with pytest.raises(ValueError, match="load_pretrained_encoder"):
        create_encoder("resnet18", 3, weights=str(path))


def test_weights_that_do_not_fit_list_the_keys(tmp_path):
    path = tmp_path / "enc.pt"
    torch.save(timm.create_model("resnet18", in_chans=3, num_classes=0).state_dict(), path)
    with pytest.raises(RuntimeError, match=r"(?s)do not fit this encoder.*missing keys \(\d+\): \['layer1.2"):
        load_pretrained_encoder(create_encoder("resnet34", 3), str(path))
    with pytest.raises(RuntimeError, match=r"(?s)do not fit this encoder.*missing keys \(\d+\): \['layer1.2"):
        EncoderSet({"rgb": Modality(bands=3, encoder="resnet34", weights=str(path))})
    with pytest.raises(FileNotFoundError, match="neither an existing file or folder nor a torchgeo weight name"):
        load_pretrained_encoder(create_encoder("resnet18", 3), "no/such/file.pt")


def test_torchgeo_decur_weights_by_enum_and_by_name(monkeypatch):
    """The authors' SENTINEL1_ALL_DECUR ResNet-50 has plain torchvision/timm keys plus `fc`."""
    reference = timm.create_model("resnet50", in_chans=2, num_classes=0)
    released = dict(reference.state_dict())
    released["fc.weight"], released["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    calls = []

    def fake_get_state_dict(self, progress=True):  # stands in for the download
        calls.append(self.name)
        return released

    monkeypatch.setattr(type(ResNet50_Weights.SENTINEL1_ALL_DECUR), "get_state_dict", fake_get_state_dict)
    for weights in (ResNet50_Weights.SENTINEL1_ALL_DECUR, "ResNet50_Weights.SENTINEL1_ALL_DECUR"):
        encoders = EncoderSet(
            {"s1": Modality(bands=2, encoder="resnet50", weights=weights), "rgb": Modality(bands=3, encoder="resnet18")}
        )
        torch.testing.assert_close(encoders["s1"].conv1.weight, reference.conv1.weight)
        torch.testing.assert_close(encoders["s1"].layer4[2].bn3.running_mean, reference.layer4[2].bn3.running_mean)
    assert calls == ["SENTINEL1_ALL_DECUR", "SENTINEL1_ALL_DECUR"]


# ------------------------------------------------------------------ ImageNet initialisation
def test_adapt_input_conv_semantics_on_a_known_tensor():
    """timm's rule, which weights='imagenet' uses: sum for 1 band, else repeat R,G,B,... and scale by 3/C."""
    rgb = torch.tensor([1.0, 2.0, 4.0]).reshape(1, 3, 1, 1)
    assert adapt_input_conv(1, rgb).flatten().tolist() == [7.0]
    assert adapt_input_conv(2, rgb).flatten().tolist() == [1.5, 3.0]
    assert adapt_input_conv(3, rgb).flatten().tolist() == [1.0, 2.0, 4.0]
    torch.testing.assert_close(adapt_input_conv(4, rgb).flatten(), torch.tensor([1.0, 2.0, 4.0, 1.0]) * 0.75)
    thirteen = adapt_input_conv(13, rgb).flatten()
    torch.testing.assert_close(thirteen, torch.tensor([1.0, 2.0, 4.0] * 4 + [1.0]) * 3 / 13)
    # a constant image keeps the RGB model's first-layer response when the band count is a multiple of 3
    assert adapt_input_conv(6, rgb).sum() == pytest.approx(rgb.sum().item())


def _imagenet_file(name: str, tmp_path) -> tuple[str, dict[str, torch.Tensor], str]:
    """A 3-band 'ImageNet' state dict as the libraries publish it (with its 1000-class classifier)."""
    if name == "mit_b0":
        state = dict(MiTEncoder("mit_b0", in_channels=3).trunk_state_dict())
        state["head.weight"], state["head.bias"] = torch.randn(1000, 256), torch.randn(1000)
        stem = "patch_embed1.proj.weight"
    else:
        state = timm.create_model(name.removesuffix("_rda"), in_chans=3, num_classes=1000).state_dict()
        stem = "conv1.weight"
    state = {k: v + torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path / f"{name}_imagenet.pth"
    torch.save(state, path)
    return str(path), state, stem


@pytest.mark.parametrize("name", ["resnet18", "resnet18_rda", "mit_b0"])
def test_imagenet_weights_load_with_the_first_convolution_adapted(name, tmp_path):
    path, imagenet, stem = _imagenet_file(name, tmp_path)
    for bands in (2, 13):
        encoder = create_encoder(name, bands, weights=f"imagenet:{path}")
        loaded = encoder.state_dict()
        torch.testing.assert_close(loaded[stem], adapt_input_conv(bands, imagenet[stem]), rtol=0, atol=0)
        assert loaded[stem].shape[1] == bands
        compared = 0
        for key, value in imagenet.items():
            if key.startswith(("fc.", "head.")) or key == stem:
                continue
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
            compared += 1
        assert compared == len([k for k in loaded if not k.startswith(("da_l3.", "da_l4.", "head."))]) - 1
    if name.endswith("_rda"):  # the attention blocks keep their own (small, non-zero) initialisation
        fresh = create_encoder(name, bands)
        for block in ("da_l3", "da_l4"):
            own = getattr(encoder, block).proj_out.weight
            assert own.abs().sum() > 0 and own.shape == getattr(fresh, block).proj_out.weight.shape
            assert own.norm() < 0.2 * getattr(fresh, block).proj_q.weight.norm()  # gain 0.1 x default init


def test_imagenet_weights_with_rda_switches(tmp_path):
    """The rda_* switches configure the attention blocks and are not passed on to timm's trunk."""
    path, imagenet, _ = _imagenet_file("resnet18_rda", tmp_path)
    encoder = create_encoder(
        "resnet18_rda", 2, weights=f"imagenet:{path}", rda_residual=False, rda_reference_points="dat"
    )
    assert not encoder.da_l3.residual and encoder.da_l4.reference_points == "dat"
    torch.testing.assert_close(encoder.layer4[0].conv1.weight, imagenet["layer4.0.conv1.weight"], rtol=0, atol=0)


def test_imagenet_weights_in_modules(tmp_path):
    """Per-modality ImageNet weights in a module's encoder set: each modality's first convolution adapted."""
    path, imagenet, _ = _imagenet_file("resnet18", tmp_path)
    encoders = EncoderSet(
        {
            "s1": Modality(bands=2, encoder="resnet18", weights=f"imagenet:{path}"),
            "s2": Modality(bands=13, encoder="resnet18"),
            "rgb": Modality(bands=3, encoder="resnet18", weights=f"imagenet:{path}"),
        }
    )
    torch.testing.assert_close(encoders["s1"].conv1.weight, adapt_input_conv(2, imagenet["conv1.weight"]))
    torch.testing.assert_close(encoders["s1"].layer1[0].conv1.weight, imagenet["layer1.0.conv1.weight"])
    assert not torch.equal(encoders["s2"].layer1[0].conv1.weight, imagenet["layer1.0.conv1.weight"])  # random
    torch.testing.assert_close(encoders["rgb"].conv1.weight, imagenet["conv1.weight"])


def test_imagenet_weights_without_network_say_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for name, tried in (("resnet18", "'timm/resnet18.a1_in1k'"), ("mit_b0", "'smp-hub/mit_b0.imagenet'")):
        with pytest.raises(ImageNetWeightsError, match=rf"(?s)of '{name}': tried .*{tried}.*weights='imagenet:/path"):
            create_encoder(name, 2, weights="imagenet")
    with pytest.raises(FileNotFoundError, match="is not a file.*'imagenet:/path/to/file'"):
        create_encoder("resnet18", 2, weights=f"imagenet:{tmp_path / 'missing.pth'}")


def test_imagenet_weights_of_another_architecture_are_refused(tmp_path):
    path, _, _ = _imagenet_file("resnet18", tmp_path)
    with pytest.raises(ImageNetWeightsError, match=r"do not fit the timm model 'resnet34': Missing keys \(layer1.2"):
        create_encoder("resnet34", 2, weights=f"imagenet:{path}")
    with pytest.raises(ImageNetWeightsError, match="(?s)Could not load.*mit_b0"):
        create_encoder("mit_b0", 2, weights=f"imagenet:{path}")
