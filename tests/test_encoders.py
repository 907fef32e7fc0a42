"""The paper's encoders through create_encoder (Section 3.2, Section 4, Appendix B.1)."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn

from decur_lightning.models import (
    SPECIAL_ENCODER_NAMES,
    MiTEncoder,
    ResNetRDA,
    create_encoder,
    encoder_feature_channels,
    encoder_feature_maps,
    encoder_feature_strides,
)
from decur_lightning.weights import load_pretrained_encoder

# (name, in_channels, image side, num_features): tiny inputs, any channel count.
ENCODERS = [
    ("resnet18", 2, 64, 512),
    ("resnet18_rda", 13, 64, 512),
    ("vit_small_patch16_224", 13, 32, 384),
    ("mit_b0", 4, 64, 2048),
]


def perturb_attention(encoder: ResNetRDA) -> None:
    """Non-zero proj_out in both blocks (a trained encoder), so every RDA parameter gets gradients."""
    for block in (encoder.da_l3, encoder.da_l4):
        nn.init.normal_(block.proj_out.weight, std=0.02)


@pytest.mark.parametrize(("name", "channels", "side", "num_features"), ENCODERS)
def test_pooled_features_and_backward(name, channels, side, num_features):
    torch.manual_seed(0)
    encoder = create_encoder(name, in_channels=channels)
    assert encoder.num_features == num_features
    x = torch.randn(2, channels, side, side)
    features = encoder(x)
    assert features.shape == (2, num_features)
    features.square().mean().backward()
    first_weight = next(p for p in encoder.parameters() if p.ndim == 4)
    assert first_weight.shape[1] == channels
    assert first_weight.grad is not None and first_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("side", [32, 64])
def test_vit_small_gives_cls_token_features_at_small_sizes(side):
    encoder = create_encoder("vit_small_patch16_224", in_channels=13)
    encoder.eval()
    x = torch.randn(2, 13, side, side)
    with torch.no_grad():
        tokens = encoder.forward_features(x)
        features = encoder(x)
    assert tokens.shape == (2, 1 + (side // 16) ** 2, 384)
    torch.testing.assert_close(features, tokens[:, 0])


def test_resnet50_rda_has_the_paper_attention_settings_and_runs_at_64px():
    encoder = create_encoder("resnet50_rda", in_channels=13)
    l3, l4 = encoder.da_l3, encoder.da_l4
    assert (l3.channels, l3.num_heads, l3.head_dim, l3.num_groups) == (1024, 8, 128, 4)
    assert (l4.channels, l4.num_heads, l4.head_dim, l4.num_groups) == (2048, 16, 128, 8)
    assert l3.conv_offset[0].stride == (2, 2) and l3.conv_offset[0].kernel_size == (5, 5)
    assert l4.conv_offset[0].stride == (1, 1) and l4.conv_offset[0].kernel_size == (3, 3)
    assert l3.rpe_table.shape == (8, 27, 27)  # 14x14 map at 224 px
    assert l4.rpe_table.shape == (16, 13, 13)  # 7x7 map at 224 px
    with torch.no_grad():
        assert encoder(torch.randn(1, 13, 64, 64)).shape == (1, 2048)


def test_resnet18_rda_uses_head_dim_channels_over_heads():
    encoder = create_encoder("resnet18_rda", in_channels=2)
    assert (encoder.da_l3.channels, encoder.da_l3.num_heads, encoder.da_l3.head_dim) == (256, 8, 32)
    assert (encoder.da_l4.channels, encoder.da_l4.num_heads, encoder.da_l4.head_dim) == (512, 16, 32)


def test_resnet_rda_is_close_to_its_trunk_at_init_and_exports_plain_timm_keys():
    """proj_out at 0.1x the default init: near the trunk's function, but not exactly (LARS needs norms)."""
    torch.manual_seed(0)
    encoder = create_encoder("resnet18_rda", in_channels=2).eval()
    plain = timm.create_model("resnet18", in_chans=2, num_classes=0).eval()
    plain.load_state_dict(encoder.trunk_state_dict(), strict=True)
    x = torch.randn(2, 2, 64, 64)
    with torch.no_grad():
        difference = (encoder(x) - plain(x)).norm() / plain(x).norm()
    assert 0 < difference < 0.1
    keys = encoder.state_dict().keys()
    assert "conv1.weight" in keys and "layer4.1.bn2.weight" in keys
    assert {k.split(".")[0] for k in keys if k.startswith("da_")} == {"da_l3", "da_l4"}


def test_two_modalities_own_their_attention_and_both_learn():
    torch.manual_seed(0)
    sar = create_encoder("resnet18_rda", in_channels=2)
    optical = create_encoder("resnet18_rda", in_channels=13)
    sar_pointers = {p.data_ptr() for n, p in sar.named_parameters() if n.startswith("da_")}
    optical_pointers = {p.data_ptr() for n, p in optical.named_parameters() if n.startswith("da_")}
    assert sar_pointers.isdisjoint(optical_pointers)
    perturb_attention(sar)
    perturb_attention(optical)

    loss = (sar(torch.randn(2, 2, 64, 64)) * optical(torch.randn(2, 13, 64, 64))).mean()
    loss.backward()
    for encoder in (sar, optical):
        for name, param in encoder.named_parameters():
            if name.startswith("da_"):
                assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_resnet_rda_loads_plain_resnet_weights_into_its_trunk(tmp_path):
    source = timm.create_model("resnet18", in_chans=2, num_classes=10)  # with a classifier to drop
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    encoder = create_encoder("resnet18_rda", in_channels=2)
    with pytest.warns(UserWarning, match="keep their initialisation"):
        load_pretrained_encoder(encoder, path)
    torch.testing.assert_close(encoder.layer3[0].conv1.weight, source.layer3[0].conv1.weight)


def test_resnet_rda_full_state_dict_round_trips_and_wrong_weights_fail(tmp_path):
    torch.manual_seed(0)
    encoder = create_encoder("resnet18_rda", in_channels=2)
    perturb_attention(encoder)
    path = tmp_path / "rda.pth"
    torch.save(encoder.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clone = create_encoder("resnet18_rda", in_channels=2)
        load_pretrained_encoder(clone, path)
    torch.testing.assert_close(clone.da_l4.proj_out.weight, encoder.da_l4.proj_out.weight)

    wrong = {k: v for k, v in encoder.state_dict().items() if k != "da_l3.rpe_table"}
    wrong["da_l3.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"(?s)Missing key.*da_l3\.rpe_table.*Unexpected key.*da_l3\.extra"):
        clone.load_pretrained_state_dict(wrong)
    resnet34 = timm.create_model("resnet34", in_chans=2, num_classes=0).state_dict()
    with pytest.raises(RuntimeError, match="plain resnet18"):
        clone.load_pretrained_state_dict(resnet34)


def official_mit_state_dict(variant: str, in_channels: int) -> dict[str, torch.Tensor]:
    """An official-layout MiT checkpoint: smp's keys plus an ImageNet-style 1000-class head."""
    state_dict = dict(get_encoder(variant, in_channels=in_channels, weights=None).state_dict())
    width = state_dict["norm4.weight"].shape[0]
    state_dict["head.weight"] = torch.zeros(1000, width)
    state_dict["head.bias"] = torch.zeros(1000)
    return state_dict


def test_mit_keys_are_the_official_segformer_keys():
    keys = create_encoder("mit_b0", in_channels=3).state_dict().keys()
    for key in (
        "patch_embed1.proj.weight",
        "patch_embed4.norm.bias",
        "block1.0.attn.q.weight",
        "block1.0.attn.kv.weight",
        "block1.0.attn.sr.weight",
        "block2.1.mlp.dwconv.dwconv.weight",
        "norm4.weight",
        "head.weight",
    ):
        assert key in keys


@pytest.mark.parametrize(("variant", "width"), [("mit_b0", 256), ("mit_b2", 512)])
def test_mit_loads_official_weights_strictly(variant, width):
    official = official_mit_state_dict(variant, in_channels=3)
    encoder = create_encoder(variant, in_channels=3)
    head_before = encoder.head.weight.detach().clone()
    encoder.load_mit_state_dict(official)
    for key, value in encoder.trunk_state_dict().items():
        torch.testing.assert_close(value, official[key], msg=key)
    torch.testing.assert_close(encoder.head.weight, head_before)
    assert encoder.head.weight.shape == (2048, width)


def test_mit_rejects_a_wrong_state_dict_listing_the_keys():
    official = official_mit_state_dict("mit_b0", in_channels=3)
    encoder = create_encoder("mit_b0", in_channels=3)
    prefixed = {f"module.backbone_1.{k}": v for k, v in official.items()}
    expected = r"(?s)official MiT layout.*Missing key.*patch_embed1\.proj\.weight.*Unexpected key.*module\.backbone_1\."
    with pytest.raises(RuntimeError, match=expected):
        encoder.load_mit_state_dict(prefixed)
    del official["norm4.bias"]
    with pytest.raises(RuntimeError, match=r"Missing key.*norm4\.bias"):
        encoder.load_mit_state_dict(official)


def test_mit_full_state_dict_with_head_round_trips(tmp_path):
    torch.manual_seed(0)
    encoder = create_encoder("mit_b0", in_channels=4)
    path = tmp_path / "mit.pth"
    torch.save(encoder.state_dict(), path)
    clone = create_encoder("mit_b0", in_channels=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the 2048-wide head is this encoder's: no head rule applies
        load_pretrained_encoder(clone, path)
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(x), encoder.eval()(x))


def test_mit_weights_load_back_into_smp_and_give_the_same_maps():
    encoder = create_encoder("mit_b0", in_channels=4).eval()
    smp_encoder = get_encoder("mit_b0", in_channels=4, weights=None).eval()
    smp_encoder.load_state_dict(dict(encoder.state_dict()))  # smp drops head.* and loads strictly
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        for ours, theirs in zip(encoder_feature_maps(encoder, x), smp_encoder(x)[2:]):
            torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(
    ("name", "channels", "strides"),
    [
        ("resnet18", (128, 256, 512), (8, 16, 32)),
        ("resnet18_rda", (128, 256, 512), (8, 16, 32)),
        ("resnet50", (512, 1024, 2048), (8, 16, 32)),
        ("mit_b0", (32, 64, 160, 256), (4, 8, 16, 32)),
        ("vit_small_patch16_224", (384, 384, 384), (16, 16, 16)),
    ],
)
def test_feature_maps_channels_and_strides(name, channels, strides):
    encoder = create_encoder(name, in_channels=3).eval()
    side = 64
    with torch.no_grad():
        maps = encoder_feature_maps(encoder, torch.randn(1, 3, side, side))
    assert [m.shape[1] for m in maps] == list(channels) == encoder_feature_channels(encoder)
    assert [side // m.shape[-1] for m in maps] == list(strides) == encoder_feature_strides(encoder)
    assert all(m.shape[-2] == m.shape[-1] for m in maps)


def test_resnet_rda_feature_maps_include_the_attention():
    torch.manual_seed(0)
    encoder = create_encoder("resnet18_rda", in_channels=3).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = encoder_feature_maps(encoder, x)
        perturb_attention(encoder)
        after = encoder_feature_maps(encoder, x)
    torch.testing.assert_close(before[0], after[0])  # layer2: no attention
    assert not torch.allclose(before[1], after[1]) and not torch.allclose(before[2], after[2])


def test_unknown_names_list_the_special_names():
    for name in ("resnet51", "resnet51_rda"):
        with pytest.raises(ValueError, match=r"Unknown encoder.*resnet50_rda.*mit_b5") as info:
            create_encoder(name, in_channels=3)
        assert all(special in str(info.value) for special in SPECIAL_ENCODER_NAMES)
    with pytest.raises(ValueError, match="needs a timm ResNet trunk"):
        create_encoder("vit_small_patch16_224_rda", in_channels=3)
    with pytest.raises(ValueError, match="Unknown MiT variant"):
        MiTEncoder("mit_b7")


def test_resnet_rda_input_too_small_says_which_size_is_needed():
    encoder = create_encoder("resnet18_rda", in_channels=2)
    with pytest.raises(ValueError, match="at least 64x64 pixels"):
        encoder(torch.randn(2, 2, 32, 32))  # layer4 map 1x1


def _decur_step(name: str) -> None:
    """One DeCUR loss step (eq. 6) through an EncoderSet, the encoders of every module."""
    from decur_lightning.encoder_set import EncoderSet
    from decur_lightning.losses import decur_loss
    from decur_lightning.modalities import Modality

    torch.manual_seed(0)
    encoders = EncoderSet({"a": Modality(bands=2, encoder=name), "b": Modality(bands=3, encoder=name)})
    projectors = nn.ModuleDict({m: nn.Linear(width, 64) for m, width in encoders.num_features.items()})
    batch = {"image_a": torch.rand(4, 2, 64, 64), "image_b": torch.rand(4, 3, 64, 64)}
    views = {
        m: [projectors[m](encoders.encode(x + 0.05 * k * torch.randn_like(x), m)) for k in (0, 1)]
        for m, x in encoders.inputs(batch).items()
    }
    loss = decur_loss(*views["a"], *views["b"], common_dims=48).total
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for encoder in encoders.values():
        grads = [p.grad for p in encoder.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", [name for name, *_ in ENCODERS])
def test_every_encoder_runs_a_decur_training_step(name):
    _decur_step(name)


@pytest.mark.slow
def test_resnet50_rda_runs_a_decur_training_step():
    _decur_step("resnet50_rda")
