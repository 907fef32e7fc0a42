"""Residual deformable attention block (paper Section 3.2, Appendix B.1)."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch import nn

from decur_lightning import DeCURModule
from decur_lightning.losses import barlow_twins_loss
from decur_lightning.models import create_encoder
from decur_lightning.models.rda import ResidualDeformableAttention
from decur_lightning.optim import build_optimizer
from decur_lightning.ssl.base import build_projector
from decur_lightning.weights import load_pretrained_encoder

from helpers import tiny_decur

# Appendix B.1 settings at a small width: (heads, groups, offset stride, kernel, map size).
LAYER3 = {"num_heads": 8, "num_groups": 4, "offset_stride": 2, "offset_kernel_size": 5}
LAYER4 = {"num_heads": 16, "num_groups": 8, "offset_stride": 1, "offset_kernel_size": 3}


def make_block(settings: dict[str, int] = LAYER3, channels: int = 64, fmap: int = 14) -> ResidualDeformableAttention:
    torch.manual_seed(0)
    return ResidualDeformableAttention(channels, fmap_size=fmap, **settings)


def activate(block: ResidualDeformableAttention) -> ResidualDeformableAttention:
    """Give proj_out non-zero weights (a trained block), so the attention branch contributes."""
    nn.init.normal_(block.proj_out.weight, std=0.2)
    nn.init.normal_(block.proj_out.bias, std=0.2)
    return block


@pytest.mark.parametrize(
    ("settings", "fmap", "size"),
    [
        (LAYER3, 14, (14, 14)),  # layer3 of ResNet-50 at 224 px
        (LAYER4, 7, (7, 7)),  # layer4 of ResNet-50 at 224 px
        (LAYER3, 14, (5, 9)),  # other sizes: the bias table is sampled
        (LAYER4, 7, (9, 5)),
        (LAYER3, 14, (2, 2)),  # the smallest map
        (LAYER4, 7, (16, 3)),
    ],
)
def test_keeps_shape_at_any_size(settings, fmap, size):
    block = activate(make_block(settings, fmap=fmap))
    x = torch.randn(2, 64, *size)
    y = block(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert not torch.allclose(y, x)


def test_starts_close_to_identity_with_no_zero_norm_weight():
    """proj_out is 0.1x PyTorch's default: a small branch, but every tensor has a norm for LARS."""
    block = make_block()
    x = torch.randn(2, 64, 14, 14)
    branch, _ = block.attention(x)
    assert 0 < branch.norm() / x.norm() < 0.1
    torch.testing.assert_close(block(x), x + branch)
    for name, param in block.named_parameters():
        if param.ndim > 1:  # the weights LARS adapts (biases and norms are excluded from it)
            assert param.norm() > 0, name
    torch.manual_seed(0)
    default = nn.Conv2d(64, 64, kernel_size=1)
    authors = ResidualDeformableAttention(64, fmap_size=14, init_gain=1.0, **LAYER3)
    # Same layer-shape statistics as PyTorch's default (kaiming-uniform bound 1/sqrt(fan_in)).
    assert authors.proj_out.weight.abs().max() <= 1 / 64**0.5
    assert block.proj_out.weight.abs().max() <= 0.1 / 64**0.5
    assert float(authors.proj_out.weight.detach().std()) == pytest.approx(float(default.weight.detach().std()), rel=0.1)


def test_without_residual_returns_the_attention_alone():
    """residual=False: the "DA" ablation of Tables 4 and 7."""
    block = activate(make_block(LAYER4, fmap=7))
    plain = ResidualDeformableAttention(64, fmap_size=7, residual=False, **LAYER4)
    plain.load_state_dict(block.state_dict())
    x = torch.randn(2, 64, 7, 7)
    branch, _ = block.attention(x)
    torch.testing.assert_close(plain(x), branch)
    torch.testing.assert_close(block(x), x + branch)
    assert not torch.allclose(plain(x), block(x))
    assert "residual=False" in repr(plain)


@pytest.mark.parametrize("gain", [0.0, -1.0, float("nan"), True])
def test_non_positive_init_gain_raises(gain):
    with pytest.raises(ValueError, match="init_gain must be a positive number"):
        ResidualDeformableAttention(64, init_gain=gain, **LAYER3)


def test_output_is_input_plus_attention():
    block = activate(make_block(LAYER4, fmap=7))
    x = torch.randn(2, 64, 7, 7)
    branch, _ = block.attention(x)
    assert branch.abs().mean() > 1e-3
    torch.testing.assert_close(block(x), x + branch)


def test_gradients_reach_every_parameter_and_the_input():
    block = activate(make_block())
    x = torch.randn(2, 64, 14, 14, requires_grad=True)
    block(x).square().mean().backward()
    for name, param in block.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert x.grad.abs().sum() > 0


def test_at_init_every_parameter_learns_from_the_first_step():
    """No zero proj_out: queries, keys, values and offsets get gradients from step 1."""
    block = make_block()
    block(torch.randn(2, 64, 14, 14)).square().mean().backward()
    for name, param in block.named_parameters():
        assert param.grad.abs().sum() > 0, name


def test_parameter_names_and_shapes_follow_dat():
    block = make_block(channels=64, fmap=14)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    group_channels = 64 // 4
    assert shapes == {
        "rpe_table": (8, 27, 27),
        **{f"proj_{p}.weight": (64, 64, 1, 1) for p in "qkv"},
        **{f"proj_{p}.bias": (64,) for p in "qkv"},
        "proj_out.weight": (64, 64, 1, 1),
        "proj_out.bias": (64,),
        "conv_offset.0.weight": (group_channels, 1, 5, 5),
        "conv_offset.0.bias": (group_channels,),
        "conv_offset.1.norm.weight": (group_channels,),
        "conv_offset.1.norm.bias": (group_channels,),
        "conv_offset.3.weight": (2, group_channels, 1, 1),
        "_extra_state": (),  # the reference grid mode
    }


def test_sampling_points_are_clamped_and_downsampled():
    block = make_block()
    nn.init.normal_(block.conv_offset[3].weight, std=10.0)  # huge offsets
    _, points = block.attention(torch.randn(2, 64, 14, 14))
    assert points.shape == (2, 4, 7, 7, 2)  # stride 2: 7x7 points per group
    assert points.abs().max() <= 1.0
    assert (points.abs() == 1.0).any()


def test_reference_points_are_cell_centres():
    ref = ResidualDeformableAttention._reference_points(14, 14, 7, 7, torch.device("cpu"))
    # Cell i of 7 covers pixels 2i, 2i+1: centre 2i + 0.5, normalised over 13 pixel steps.
    expected = (torch.arange(7) * 2 + 0.5) / 13 * 2 - 1
    torch.testing.assert_close(ref[:, 0, 0], expected)
    torch.testing.assert_close(ref[0, :, 1], expected)
    # Stride 1: the pixel centres themselves; one cell: the map centre.
    torch.testing.assert_close(
        ResidualDeformableAttention._reference_points(5, 5, 5, 5, torch.device("cpu"))[:, 0, 0],
        torch.linspace(-1, 1, 5),
    )
    assert ResidualDeformableAttention._reference_points(2, 2, 1, 1, torch.device("cpu")).abs().max() == 0


def test_matches_plain_attention_with_relative_bias_when_offsets_are_zero():
    """Stride 1, zero offsets: keys sit on the pixels, and the bias of query (i, j) on key
    (k, l) is rpe_table[h, i - k + H - 1, j - l + W - 1] (Swin-style relative position bias)."""
    torch.manual_seed(0)
    channels, heads, height, width = 16, 4, 4, 5
    block = ResidualDeformableAttention(
        channels, num_heads=heads, num_groups=2, offset_stride=1, offset_kernel_size=3, fmap_size=(height, width)
    )
    activate(block)
    nn.init.normal_(block.rpe_table, std=1.0)
    nn.init.zeros_(block.conv_offset[3].weight)  # no offsets
    x = torch.randn(2, channels, height, width)

    head_dim = channels // heads
    q = block.proj_q(x).reshape(2, heads, head_dim, -1)
    k = block.proj_k(x).reshape(2, heads, head_dim, -1)
    v = block.proj_v(x).reshape(2, heads, head_dim, -1)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    rows = ys[:, None] - ys[None, :] + height - 1
    cols = xs[:, None] - xs[None, :] + width - 1
    bias = block.rpe_table[:, rows, cols]  # (heads, HW, HW)
    logits = torch.einsum("bhcm,bhcn->bhmn", q, k) / head_dim**0.5 + bias
    out = torch.einsum("bhmn,bhcn->bhcm", logits.softmax(-1), v).reshape_as(x)
    expected = x + block.proj_out(out)
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_samples_do_not_mix_across_the_batch():
    block = activate(make_block())
    x = torch.randn(3, 64, 10, 12)
    torch.testing.assert_close(block(x)[1:2], block(x[1:2]), rtol=1e-4, atol=1e-5)


def test_offsets_change_the_output():
    block = activate(make_block(LAYER4, fmap=7))
    x = torch.randn(1, 64, 7, 7)
    before = block(x)
    nn.init.normal_(block.conv_offset[3].weight, std=1.0)
    assert not torch.allclose(before, block(x))


def test_too_small_map_raises_with_the_needed_size():
    block = make_block()
    with pytest.raises(ValueError, match="at least 2x2, got 1x1"):
        block(torch.randn(1, 64, 1, 1))
    block.feature_stride = 32
    with pytest.raises(ValueError, match="stride 32.*at least 64x64 pixels"):
        block(torch.randn(1, 64, 1, 3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": 60, "num_heads": 8, "num_groups": 4}, "divisible by num_heads"),
        ({"channels": 64, "num_heads": 8, "num_groups": 3}, "divisible by num_groups"),
    ],
)
def test_invalid_widths_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResidualDeformableAttention(offset_stride=1, offset_kernel_size=3, **kwargs)


def test_wrong_channel_count_raises():
    with pytest.raises(ValueError, match="built for 64 channels, got 32"):
        make_block()(torch.randn(1, 32, 4, 4))


# ------------------------------------------------------------------ DAT's reference grid
def dat_reference_points(key_h: int, key_w: int) -> torch.Tensor:
    """A plain transcription of DAT's ``_get_ref_points`` (DAttentionBaseline, ``(y, x)``)."""
    ref_y, ref_x = torch.meshgrid(
        torch.linspace(0.5, key_h - 0.5, key_h), torch.linspace(0.5, key_w - 0.5, key_w), indexing="ij"
    )
    ref = torch.stack((ref_y, ref_x), -1)
    ref[..., 1].div_(key_w - 1.0).mul_(2.0).sub_(1.0)
    ref[..., 0].div_(key_h - 1.0).mul_(2.0).sub_(1.0)
    return ref


def test_dat_reference_points_follow_dats_formula_and_change_the_output():
    torch.testing.assert_close(
        ResidualDeformableAttention._reference_points(14, 10, 7, 5, torch.device("cpu"), "dat"),
        dat_reference_points(7, 5),
    )
    centre = activate(make_block())
    dat = ResidualDeformableAttention(64, fmap_size=14, reference_points="dat", **LAYER3)
    dat.load_state_dict({**centre.state_dict(), "_extra_state": torch.tensor(1)})
    assert dat.reference_points == "dat"
    nn.init.zeros_(dat.conv_offset[3].weight)  # zero offsets: the points are the clamped grid
    nn.init.zeros_(centre.conv_offset[3].weight)
    x = torch.randn(2, 64, 14, 14)
    _, points = dat.attention(x)
    expected = dat_reference_points(7, 7).clamp(-1, 1)
    torch.testing.assert_close(points, expected.expand(2, 4, 7, 7, 2))
    assert not torch.allclose(dat(x), centre(x), atol=1e-4)


def test_dat_grid_needs_two_points_per_side():
    block = ResidualDeformableAttention(64, fmap_size=2, reference_points="dat", **LAYER3)
    with pytest.raises(ValueError, match="at least 2x2 reference points, got 1x1"):
        block(torch.randn(1, 64, 2, 2))
    with pytest.raises(ValueError, match="'centre'.*'dat'"):
        ResidualDeformableAttention(64, reference_points="center", **LAYER3)


def test_reference_grid_survives_a_state_dict_round_trip_and_old_state_dicts_load_strictly():
    dat = activate(ResidualDeformableAttention(64, fmap_size=14, reference_points="dat", **LAYER3))
    state = dat.state_dict()
    assert int(state["_extra_state"]) == 1
    fresh = make_block()
    fresh.load_state_dict(state, strict=True)
    assert fresh.reference_points == "dat"
    x = torch.randn(1, 64, 14, 14)
    torch.testing.assert_close(fresh(x), dat(x))
    # A state dict written before the switch existed: loads strictly, the mode stays as built.
    old = {k: v for k, v in state.items() if k != "_extra_state"}
    for mode in ("centre", "dat"):
        block = ResidualDeformableAttention(64, fmap_size=14, reference_points=mode, **LAYER3)
        block.load_state_dict(old, strict=True)
        assert block.reference_points == mode


# ------------------------------------------------------------------ ResNetRDA switches
def authors_rda_file(path, encoder) -> None:
    """An authors' RDA backbone file (``backbone.*`` + ``da1_*``) of ``encoder``'s weights."""
    trunk = {f"backbone.{k}": v for k, v in encoder.trunk_state_dict().items()}
    blocks = {
        f"da1_{k[3:]}": v
        for k, v in encoder.state_dict().items()
        if k.startswith("da_") and not k.endswith("_extra_state")
    }
    torch.save({**trunk, **blocks}, path)


def test_resnet_rda_passes_its_switches_to_both_blocks():
    encoder = create_encoder("resnet18_rda", 2, rda_reference_points="dat", rda_residual=False, rda_init_gain=1.0)
    for block in (encoder.da_l3, encoder.da_l4):
        assert block.reference_points == "dat" and block.residual is False
    default = create_encoder("resnet18_rda", 2)
    assert default.da_l3.reference_points == "centre" and default.da_l4.residual is True
    # init_gain 1.0 is PyTorch's default init: ten times the default block's scale.
    with torch.no_grad():
        ratio = encoder.da_l4.proj_out.weight.abs().max() / default.da_l4.proj_out.weight.abs().max()
    assert 5 < float(ratio) < 20
    with pytest.raises(ValueError, match="init_gain"):
        create_encoder("resnet18_rda", 2, rda_init_gain=0.0)


def test_authors_rda_weights_switch_to_dats_grid_and_keep_it_through_save_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    authors_rda_file(tmp_path / "rda_s1.pth", create_encoder("resnet18_rda", 2))
    with pytest.warns(UserWarning, match="DAT's reference grid"):
        encoder = create_encoder("resnet18_rda", 2)
        load_pretrained_encoder(encoder, tmp_path / "rda_s1.pth")
    assert encoder.da_l3.reference_points == encoder.da_l4.reference_points == "dat"

    torch.save(encoder.state_dict(), tmp_path / "encoder.pt")  # this package's export
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clone = create_encoder("resnet18_rda", 2)
        load_pretrained_encoder(clone, tmp_path / "encoder.pt")
    assert clone.da_l3.reference_points == clone.da_l4.reference_points == "dat"

    with pytest.warns(UserWarning, match="DAT's reference grid"):
        module = tiny_decur(
            modalities={
                "sar": {"bands": 2, "encoder": "resnet18_rda", "weights": str(tmp_path / "rda_s1.pth")},
                "optical": 4,
            },
            crop_size=64,
        )
    hparams = {**module.hparams, "modalities": {**module.hparams.modalities}}
    hparams["modalities"]["sar"] = {
        k: v for k, v in hparams["modalities"]["sar"].items() if k != "weights"
    }  # the file is gone
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": hparams,
        "pytorch-lightning_version": L.__version__,
    }
    torch.save(checkpoint, tmp_path / "decur.ckpt")
    reloaded = DeCURModule.load_from_checkpoint(tmp_path / "decur.ckpt", weights_only=False)
    sar = reloaded.encoders["sar"]
    assert sar.da_l3.reference_points == sar.da_l4.reference_points == "dat"
    x = torch.rand(1, 2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(sar.eval()(x), module.encoders["sar"].eval()(x))


def test_lars_trains_the_attention_sanely_from_the_first_step():
    """Regression: a zero proj_out got a raw SGD step at lr 0.2 under LARS (no trust ratio for
    norm 0); with it the branch after layer3 reached 7.6x its input within these four steps."""
    torch.manual_seed(0)
    encoder = create_encoder("resnet18_rda", in_channels=3)
    projector = build_projector(encoder.num_features, (128, 128))
    optimizer = build_optimizer([encoder, projector])  # the paper's LARS, lr 0.2
    ratios = []
    encoder.da_l3.register_forward_hook(
        lambda m, i, o: ratios.append(float((o - i[0]).detach().norm() / i[0].detach().norm()))
    )
    blocks = (encoder.da_l3, encoder.da_l4)
    start_norms = [float(block.proj_out.weight.norm()) for block in blocks]
    x = torch.rand(4, 3, 64, 64)
    for _ in range(4):
        views = (x + 0.05 * torch.randn_like(x), x + 0.05 * torch.randn_like(x))
        loss = barlow_twins_loss(*(projector(encoder(v)) for v in views))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        encoder(x)
    assert max(ratios) < 0.1, ratios
    for block, start_norm in zip(blocks, start_norms):
        assert float(block.proj_out.weight.norm()) < 1.1 * start_norm  # LARS: small relative steps
