"""Pretrained encoder weights from a path, a torchgeo weight enum, or its name (no network)."""

from __future__ import annotations

import pytest
import timm
import torch
from torchgeo.models import ResNet50_Weights

from decur_lightning import DeCURModule
from decur_lightning.models import create_encoder


def test_weights_from_a_state_dict_file(tmp_path):
    source = timm.create_model("resnet18", in_chans=3, num_classes=0)
    path = tmp_path / "enc.pt"
    torch.save(source.state_dict(), path)
    encoder = create_encoder("resnet18", 3, weights=str(path))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(encoder.state_dict()[key], value)


def test_weights_that_do_not_fit_list_the_keys(tmp_path):
    path = tmp_path / "enc.pt"
    torch.save(timm.create_model("resnet18", in_chans=3, num_classes=0).state_dict(), path)
    with pytest.raises(RuntimeError, match=r"(?s)do not fit this encoder.*missing keys \(\d+\): \['layer1.2"):
        create_encoder("resnet34", 3, weights=str(path))
    with pytest.raises(FileNotFoundError, match="neither an existing file or folder nor a torchgeo weight name"):
        create_encoder("resnet18", 3, weights="no/such/file.pt")


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
        model = DeCURModule("resnet50", "resnet18", in_channels1=2, in_channels2=3, modality1="s1",
                            modality2="rgb", projector_dims=(32,), weights1=weights)
        torch.testing.assert_close(model.encoder1.conv1.weight, reference.conv1.weight)
    assert calls == ["SENTINEL1_ALL_DECUR", "SENTINEL1_ALL_DECUR"]
