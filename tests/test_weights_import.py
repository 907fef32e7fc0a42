"""load_encoder_state_dict: every weight source lands in the right encoder, or fails with the keys.

Checkpoints of this package's modules are built here as dicts in their layout (``encoders.<name>.*``,
``projectors.<name>.*``, ``hyper_parameters["modalities"]``), so these tests do not depend on the
modules themselves.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchgeo.models import ResNet50_Weights

import decur_lightning.models.encoders as encoders_module
from decur_lightning.models import create_encoder
from decur_lightning.weights import (
    EncoderWeightsMismatchError,
    encoder_state_dict_from_checkpoint,
    export_encoders,
    load_encoder_state_dict,
    load_pretrained_encoder,
    load_state_dict_strictly,
    source_modalities,
)

# Tiny convolutions run several times faster on one thread when the cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")

PACKAGE = Path(__file__).resolve().parents[1] / "decur_lightning"


def assert_same_weights(encoder: nn.Module, reference: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Every entry of ``reference`` (keys under ``prefix``) equals the encoder's."""
    state = encoder.state_dict()
    checked = 0
    for key, value in reference.items():
        if key.startswith(prefix):
            torch.testing.assert_close(state[key[len(prefix) :]], value, rtol=0, atol=0)
            checked += 1
    assert checked > 0


def randomized(module: nn.Module) -> nn.Module:
    """Perturb every parameter and buffer so that fresh encoders never match by chance."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.1)
    return module


#: name -> (encoder, bands, view, band names): three modalities, as the paper's future work.
THREE = {
    "sar": ("resnet18", 2, "sar", ["VV", "VH"]),
    "optical": ("resnet18", 4, "optical", None),
    "dem": ("resnet18", 1, "generic", None),
}


def module_checkpoint(
    specs: dict = THREE, *, key_order: list[str] | None = None, head: str = "projectors"
) -> tuple[dict, dict[str, nn.Module]]:
    """A checkpoint of a module of this package: ``encoders.<name>.*`` and ``<head>.<name>.*`` keys (in
    ``key_order``), ``hyper_parameters["modalities"]`` in ``specs`` order."""
    encoders = {name: randomized(create_encoder(enc, bands)) for name, (enc, bands, _, _) in specs.items()}
    state_dict = {}
    for name in key_order or list(specs):
        encoder = encoders[name]
        state_dict.update({f"encoders.{name}.{k}": v.clone() for k, v in encoder.state_dict().items()})
        state_dict[f"{head}.{name}.0.weight"] = torch.randn(16, encoder.num_features)
    modalities = {}
    for name, (enc, bands, view, band_names) in specs.items():
        modalities[name] = {"bands": bands, "encoder": enc, "view": view}
        if band_names is not None:
            modalities[name]["band_names"] = band_names
    hparams = {"modalities": modalities, "encoder": "resnet50", "encoder_kwargs": None, "projector_dims": [16]}
    return {"epoch": 0, "global_step": 1, "state_dict": state_dict, "hyper_parameters": hparams}, encoders


def version_0_1_checkpoint() -> tuple[dict, dict[int, nn.Module]]:
    """A checkpoint of version 0.1's DeCURModule: encoder1.* / encoder2.*, modality1 / modality2."""
    encoders = {1: randomized(create_encoder("resnet18", 2)), 2: randomized(create_encoder("resnet18", 4))}
    state_dict = {}
    for k in (1, 2):
        state_dict.update({f"encoder{k}.{key}": v.clone() for key, v in encoders[k].state_dict().items()})
        state_dict[f"projector{k}.0.weight"] = torch.randn(16, 512)
    hparams = {
        "encoder1": "resnet18",
        "encoder2": "resnet18",
        "in_channels1": 2,
        "in_channels2": 4,
        "modality1": "sar",
        "modality2": "optical",
        "projector_dims": [16],
    }
    return {"epoch": 0, "state_dict": state_dict, "hyper_parameters": hparams}, encoders


@pytest.fixture(scope="module")
def three_modalities(tmp_path_factory) -> tuple[Path, dict, dict[str, nn.Module]]:
    checkpoint, encoders = module_checkpoint()
    path = tmp_path_factory.mktemp("ckpt") / "decur3.ckpt"
    torch.save(checkpoint, path)
    return path, checkpoint, encoders


# ------------------------------------------------------------------ (a) Lightning checkpoints
def test_module_checkpoint_by_name_and_by_position(three_modalities):
    path, checkpoint, encoders = three_modalities
    for position, (name, (enc, bands, _, _)) in enumerate(THREE.items(), start=1):
        for source in (path, str(path), checkpoint):
            for selector in (name, position):
                encoder = create_encoder(enc, bands)
                load_pretrained_encoder(encoder, source, selector)
                assert_same_weights(encoder, encoders[name].state_dict())
        torch.testing.assert_close(
            encoder_state_dict_from_checkpoint(checkpoint, name),
            encoder_state_dict_from_checkpoint(checkpoint, position),
        )
    # BN running statistics are part of what lands; nothing of the projectors does
    state_dict = load_encoder_state_dict(path, "dem")
    assert any(k.endswith("running_var") for k in state_dict)
    assert set(state_dict) == set(encoders["dem"].state_dict())


def test_module_checkpoint_errors_list_its_modalities(three_modalities):
    path, _, _ = three_modalities
    listing = r"'sar' \(1\), 'optical' \(2\), 'dem' \(3\)"
    with pytest.raises(
        ValueError, match=rf"holds 3 encoders: {listing}\. Pass modality=<name> or its position \(1\.\.3\)"
    ):
        load_encoder_state_dict(path)
    with pytest.raises(ValueError, match=rf"no modality 's2'; its modalities are {listing}"):
        load_encoder_state_dict(path, "s2")
    with pytest.raises(ValueError, match=rf"no modality at position 4 \(positions count from 1\).*{listing}"):
        load_encoder_state_dict(path, 4)
    with pytest.raises(ValueError, match="no modality at position 0"):
        load_encoder_state_dict(path, 0)
    with pytest.raises(TypeError, match="a modality name \\(str\\) or a 1-based position"):
        load_encoder_state_dict(path, True)
    # the EncoderSet error a module shows for a wrong weights_modality
    with pytest.raises(EncoderWeightsMismatchError, match=r"modality 'optical'"):
        load_pretrained_encoder(create_encoder("resnet18", 2), path, "optical")


def test_position_follows_the_recorded_modality_order_not_the_key_order():
    checkpoint, encoders = module_checkpoint(key_order=["dem", "optical", "sar"])
    assert list(source_modalities(checkpoint)) == ["sar", "optical", "dem"]
    for position, name in enumerate(THREE, start=1):
        torch.testing.assert_close(load_encoder_state_dict(checkpoint, position), encoders[name].state_dict())
    # without recorded names (a module's bare state dict) the key order is the modality order
    bare = load_encoder_state_dict(checkpoint["state_dict"], 1)
    torch.testing.assert_close(bare, encoders["dem"].state_dict())
    torch.testing.assert_close(
        load_encoder_state_dict(checkpoint["state_dict"], "optical"), encoders["optical"].state_dict()
    )


def test_downstream_checkpoint_and_single_encoder_checkpoint():
    """A downstream module's checkpoint (encoders.<name>.* beside its head) is a weight source too."""
    checkpoint, encoders = module_checkpoint(head="heads")
    encoder = create_encoder("resnet18", 4)
    load_pretrained_encoder(encoder, checkpoint, "optical")
    assert_same_weights(encoder, encoders["optical"].state_dict())

    # a modality without its own encoder name uses the module's default encoder
    del checkpoint["hyper_parameters"]["modalities"]["dem"]["encoder"]
    checkpoint["hyper_parameters"]["encoder"] = "resnet18"
    assert source_modalities(checkpoint)["dem"] == {"encoder": "resnet18", "bands": 1, "view": "generic", "position": 3}

    single, single_encoders = module_checkpoint({"optical": THREE["optical"]})
    torch.testing.assert_close(load_encoder_state_dict(single), single_encoders["optical"].state_dict())
    with pytest.raises(ValueError, match=r"no modality 'rgb'; its modalities are 'optical' \(1\)"):
        load_encoder_state_dict(single, "rgb")


def test_version_0_1_checkpoints_stay_readable(tmp_path):
    checkpoint, encoders = version_0_1_checkpoint()
    path = tmp_path / "v01.ckpt"
    torch.save(checkpoint, path)
    for position, name in ((1, "sar"), (2, "optical")):
        for selector in (name, position):
            torch.testing.assert_close(load_encoder_state_dict(path, selector), encoders[position].state_dict())
    with pytest.raises(ValueError, match=r"no modality 's1'; its modalities are 'sar' \(1\), 'optical' \(2\)"):
        load_encoder_state_dict(path, "s1")
    # exported under the names its hyper-parameters give
    paths = export_encoders(path, tmp_path / "exported")
    assert list(paths) == ["sar", "optical"]
    manifest = json.loads((tmp_path / "exported" / "encoders.json").read_text())
    assert manifest["optical"] == {
        "file": "encoder_optical.pt",
        "encoder": "resnet18",
        "bands": 4,
        "view": None,
        "position": 2,
    }
    torch.testing.assert_close(torch.load(paths["optical"]), encoders[2].state_dict())
    # version 0.1's raw state dict (no hyper-parameters): positions only
    raw = {f"module.{k}": v for k, v in checkpoint["state_dict"].items()}
    torch.testing.assert_close(load_encoder_state_dict(raw, 2), encoders[2].state_dict())
    with pytest.raises(ValueError, match="records no modality names"):
        load_encoder_state_dict(raw, "sar")


# ------------------------------------------------------------------ (b) export_encoders output
def test_export_writes_every_modality_in_order(three_modalities, tmp_path):
    path, checkpoint, encoders = three_modalities
    paths = export_encoders(path, tmp_path / "exported")
    assert list(paths) == ["sar", "optical", "dem"]
    assert [p.name for p in paths.values()] == ["encoder_sar.pt", "encoder_optical.pt", "encoder_dem.pt"]
    manifest = json.loads((tmp_path / "exported" / "encoders.json").read_text())
    assert list(manifest) == ["sar", "optical", "dem"]
    assert manifest["sar"] == {
        "file": "encoder_sar.pt",
        "encoder": "resnet18",
        "bands": 2,
        "view": "sar",
        "band_names": ["VV", "VH"],
        "position": 1,
    }
    assert manifest["dem"] == {
        "file": "encoder_dem.pt",
        "encoder": "resnet18",
        "bands": 1,
        "view": "generic",
        "position": 3,
    }
    assert source_modalities(tmp_path / "exported") == source_modalities(path)
    for name, state in encoders.items():
        torch.testing.assert_close(torch.load(paths[name], weights_only=True), state.state_dict())
    # the loaded dict exports the same files
    again = export_encoders(checkpoint, tmp_path / "again")
    torch.testing.assert_close(torch.load(again["dem"]), torch.load(paths["dem"]))


def test_export_folder_and_single_files_by_name_and_position(three_modalities, tmp_path):
    path, _, encoders = three_modalities
    paths = export_encoders(path, tmp_path / "exported")
    folder = tmp_path / "exported"
    for source, selector, name in (
        (folder, "sar", "sar"),
        (folder, 2, "optical"),
        (str(folder), 3, "dem"),
        (paths["optical"], None, "optical"),
        (str(paths["sar"]), "sar", "sar"),
        (paths["dem"], 3, "dem"),
    ):
        enc, bands, _, _ = THREE[name]
        encoder = create_encoder(enc, bands)
        load_pretrained_encoder(encoder, source, selector)
        assert_same_weights(encoder, encoders[name].state_dict())
    with pytest.raises(ValueError, match=r"holds 3 encoders: 'sar' \(1\), 'optical' \(2\), 'dem' \(3\)"):
        load_encoder_state_dict(folder)
    with pytest.raises(ValueError, match=r"no modality 'rgb'; its modalities are 'sar' \(1\)"):
        load_encoder_state_dict(folder, "rgb")
    with pytest.raises(ValueError, match=r"is the encoder of modality 'sar' \(position 1\)"):
        load_encoder_state_dict(paths["sar"], "optical")
    with pytest.raises(ValueError, match=r"is the encoder of modality 'sar' \(position 1\)"):
        load_encoder_state_dict(paths["sar"], 2)


def test_export_folder_of_version_0_1_is_read(tmp_path):
    """encoders.json of version 0.1: in_channels and modality_index instead of bands and position."""
    sar, optical = randomized(create_encoder("resnet18", 2)), randomized(create_encoder("resnet18", 4))
    torch.save(sar.state_dict(), tmp_path / "encoder_sar.pt")
    torch.save(optical.state_dict(), tmp_path / "encoder_optical.pt")
    manifest = {
        "sar": {"file": "encoder_sar.pt", "encoder": "resnet18", "in_channels": 2, "modality_index": 1},
        "optical": {"file": "encoder_optical.pt", "encoder": "resnet18", "in_channels": 4, "modality_index": 2},
    }
    (tmp_path / "encoders.json").write_text(json.dumps(manifest))
    torch.testing.assert_close(load_encoder_state_dict(tmp_path, 2), optical.state_dict())
    torch.testing.assert_close(load_encoder_state_dict(tmp_path, "sar"), sar.state_dict())
    assert source_modalities(tmp_path)["optical"] == {"encoder": "resnet18", "bands": 4, "view": None, "position": 2}


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
    with pytest.raises(ValueError, match=r"records no modality names.*backbone_1\. \(1\), backbone_2\. \(2\)"):
        load_encoder_state_dict(path, "s1")
    with pytest.raises(ValueError, match=r"holds 2 encoders: backbone_1\. \(1\), backbone_2\. \(2\)"):
        load_encoder_state_dict(path)
    with pytest.raises(ValueError, match=r"no modality at position 3"):
        load_encoder_state_dict(path, 3)


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
        torch.testing.assert_close(
            encoder.eval()(torch.rand(1, 2, 64, 64) * 0 + 0.5),
            nn.Sequential(*list(backbone.eval().children())[:-1])(torch.full((1, 2, 64, 64), 0.5)).flatten(1),
        )

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

    torch.save(
        {"backbone_1.conv1.weight": torch.zeros(64, 3, 7, 7), "backbone_1.extra.weight": torch.zeros(2)},
        tmp_path / "odd.pth",
    )
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


# ------------------------------------------------------------------ generic dispatch to encoder families
class _HookedEncoder(nn.Module):
    """An encoder family of someone else's: a linear layer, an optional 'aux' part and a classifier
    that its own hooks drop, as MiTEncoder and ResNetRDA do."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.aux = nn.Linear(4, 4)

    def checkpoint_filter_fn(self, state_dict, source="the state dict"):
        return {k: v for k, v in state_dict.items() if not k.startswith("classifier.")}

    def optional_keys(self, state_dict, source="the state dict"):
        return ("aux.",)


def test_strict_loading_dispatches_to_the_encoders_hooks():
    reference = randomized(_HookedEncoder())
    weights = {k: v for k, v in reference.state_dict().items() if k.startswith("proj.")}
    weights["classifier.weight"] = torch.zeros(10, 4)
    encoder = _HookedEncoder()
    aux_before = encoder.aux.weight.detach().clone()
    load_state_dict_strictly(encoder, weights)  # classifier filtered, aux optional
    torch.testing.assert_close(encoder.proj.weight, reference.proj.weight)
    torch.testing.assert_close(encoder.aux.weight, aux_before)
    # without the hooks, the same weights are refused with the keys
    plain = nn.Module()
    plain.proj, plain.aux = nn.Linear(3, 4), nn.Linear(4, 4)
    with pytest.raises(EncoderWeightsMismatchError) as excinfo:
        load_state_dict_strictly(plain, weights)
    assert excinfo.value.unexpected_keys == ["classifier.weight"]
    assert excinfo.value.missing_keys == ["aux.weight", "aux.bias"]


def test_authors_layouts_of_a_new_family_through_a_registered_converter(monkeypatch, tmp_path):
    """The authors' layouts reach the families' converters (AUTHORS_STATE_DICT_CONVERTERS), in
    order; weights.py knows none of them."""
    seen = []

    def convert_extra(state_dict, position, *, source, **options):
        seen.append((sorted({k.split(".")[0] for k in state_dict}), position, options))
        if not any(k.startswith("extra_") for k in state_dict):
            return None
        trunk = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        return {
            **trunk,
            "aux.weight": state_dict[f"extra_{position}.weight"],
            "aux.bias": state_dict[f"extra_{position}.bias"],
        }

    monkeypatch.setattr(
        encoders_module,
        "AUTHORS_STATE_DICT_CONVERTERS",
        [*encoders_module.AUTHORS_STATE_DICT_CONVERTERS, convert_extra],
    )
    import decur_lightning.weights as weights_module

    monkeypatch.setattr(weights_module, "AUTHORS_STATE_DICT_CONVERTERS", encoders_module.AUTHORS_STATE_DICT_CONVERTERS)
    first, second = randomized(_HookedEncoder()), randomized(_HookedEncoder())
    model = {}
    for k, encoder in ((1, first), (2, second)):
        model.update({f"module.backbone_{k}.proj.{n}": v for n, v in encoder.proj.state_dict().items()})
        model.update({f"module.extra_{k}.{n}": v for n, v in encoder.aux.state_dict().items()})
    model["module.projector1.0.weight"] = torch.zeros(2, 2)
    state_dict = load_encoder_state_dict({"epoch": 1, "model": model}, 2, rda_blocks=None)
    encoder = _HookedEncoder()
    load_state_dict_strictly(encoder, state_dict)
    torch.testing.assert_close(encoder.aux.weight, second.aux.weight)
    torch.testing.assert_close(encoder.proj.weight, second.proj.weight)
    # one modality's view: its backbone as backbone.*, the family parts; no other backbone, no projector
    assert seen[-1] == (["backbone", "extra_1", "extra_2"], 2, {"rda_blocks": None})


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.extend(f"{'.' * node.level}{node.module or ''}:{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
    return names


def test_models_do_not_import_weights_and_weights_knows_no_family():
    for path in (PACKAGE / "models").glob("*.py"):
        assert not [i for i in _imports(path) if "weights" in i], path
    weights_imports = _imports(PACKAGE / "weights.py")
    for family in ("ResNetRDA", "MiTEncoder", "resnet_rda", "mit", "rda"):
        assert not [i for i in weights_imports if i.endswith(f":{family}") or f".{family}:" in i], family
    tree = ast.parse((PACKAGE / "weights.py").read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not names & {"ResNetRDA", "MiTEncoder", "reference_points_state"}
    # no family's keys in code (docstrings may describe them)
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    strings = [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    ]
    assert not [s for s in strings if "da_l3" in s or "da1_" in s or "head." in s]


def test_create_encoder_takes_only_imagenet_weights(tmp_path):
    path = tmp_path / "enc.pt"
    torch.save(create_encoder("resnet18", 3).state_dict(), path)
    for weights in (str(path), path, "ResNet50_Weights.SENTINEL1_ALL_DECUR"):
        with pytest.raises(
            ValueError,
            match=r"(?s)'imagenet' or 'imagenet:<file>' only.*"
            r"decur_lightning\.weights\.load_pretrained_encoder\(encoder, source, modality\)"
            r".*modalities=\{name: \{'weights': source\}\}",
        ):
            create_encoder("resnet18", 3, weights=weights)


def test_encoder_set_takes_each_modality_from_a_checkpoint_or_export(three_modalities, tmp_path):
    """What a downstream module does with modalities={name: {weights, weights_modality}}: by default the
    source's encoder of the same name, else the named or numbered one."""
    from decur_lightning.encoder_set import EncoderSet
    from decur_lightning.modalities import Modality

    path, _, encoders = three_modalities
    export_encoders(path, tmp_path / "exported")
    built = EncoderSet(
        {
            "sar": Modality(bands=2, encoder="resnet18", weights=str(path)),
            "elevation": Modality(bands=1, encoder="resnet18", weights=str(path), weights_modality="dem"),
            "s2": Modality(bands=4, encoder="resnet18", weights=str(tmp_path / "exported"), weights_modality=2),
        }
    )
    assert_same_weights(built["sar"], encoders["sar"].state_dict())
    assert_same_weights(built["elevation"], encoders["dem"].state_dict())
    assert_same_weights(built["s2"], encoders["optical"].state_dict())
    with pytest.raises(
        ValueError, match=r"no modality 's2'; its modalities are 'sar' \(1\), 'optical' \(2\), 'dem' \(3\)"
    ):
        EncoderSet({"s2": Modality(bands=4, encoder="resnet18", weights=str(path))})


def test_authors_rda_blocks_of_one_group_only(tmp_path):
    """A joint checkpoint that kept only da1_* (the blocks both modalities ran through): position 2 gets them,
    with a warning; rda_blocks names a group the file lacks: a clear error."""
    sar, optical = randomized(create_encoder("resnet18_rda", 2)), randomized(create_encoder("resnet18_rda", 3))
    blocks = {f"module.da1_{k[3:]}": v for k, v in tensors_only(sar).items() if k.startswith("da_")}
    checkpoint = _authors_joint({1: _Trunk(sar), 2: _Trunk(optical)}, blocks)
    with pytest.warns(
        UserWarning, match=r"holds only the attention blocks da1_\*: taking them for the modality at position 2"
    ):
        state_dict = load_encoder_state_dict(checkpoint, 2)
    torch.testing.assert_close(state_dict["da_l4.proj_out.weight"], sar.da_l4.proj_out.weight)
    torch.testing.assert_close(state_dict["conv1.weight"], optical.conv1.weight)
    with pytest.raises(ValueError, match=r"rda_blocks=2: .* holds the attention blocks of groups \[1\]"):
        load_encoder_state_dict(checkpoint, 2, rda_blocks=2)
