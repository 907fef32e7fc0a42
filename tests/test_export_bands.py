"""Weights for another band set: the first convolution's input channels are selected by band name."""

from __future__ import annotations

import pytest
import torch
from timm.models import adapt_input_conv

from decur_lightning.encoder_set import EncoderSet
from decur_lightning.export import export_pretrained
from decur_lightning.modalities import Modality
from decur_lightning.models import create_encoder
from decur_lightning.weights import adapt_input_bands, load_pretrained_encoder

S2_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]


@pytest.fixture(scope="module")
def s2_export(tmp_path_factory):
    """A 13-band S2 resnet18 encoder (each input channel distinct), exported with its band names."""
    tmp = tmp_path_factory.mktemp("bands")
    encoder = create_encoder("resnet18", 13)
    with torch.no_grad():
        encoder.conv1.weight.copy_(torch.randn_like(encoder.conv1.weight))
    state_dict = {f"encoders.s2.{k}": v for k, v in encoder.state_dict().items()}
    modalities = {"s2": {"bands": 13, "encoder": "resnet18", "view": "optical", "band_names": S2_BANDS}}
    torch.save({"state_dict": state_dict, "hyper_parameters": {"modalities": modalities}}, tmp / "s2.ckpt")
    export_pretrained(tmp / "s2.ckpt", tmp / "out", ["pt", "hub"])
    return tmp, encoder.conv1.weight.detach().clone(), encoder.state_dict()


@pytest.mark.parametrize("where", ["s2.ckpt", "out", "out/encoder_s2.pt", "out/hub_s2"])
def test_subset_selects_channels_by_name(s2_export, where):
    tmp, pretrained, full = s2_export
    target = ["B02", "B03", "B04", "B08"]
    encoder = create_encoder("resnet18", 4)
    load_pretrained_encoder(encoder, tmp / where, "s2", band_names=target)
    for channel, band in enumerate(target):
        torch.testing.assert_close(
            encoder.conv1.weight[:, channel], pretrained[:, S2_BANDS.index(band)], rtol=0, atol=0
        )
    torch.testing.assert_close(encoder.layer4[1].conv2.weight, full["layer4.1.conv2.weight"], rtol=0, atol=0)


def test_reordering_and_torchgeo_spelling(s2_export):
    tmp, pretrained, _ = s2_export
    target = ["B8a", "B4", "B3", "B2"]  # torchgeo's spelling, reversed order
    encoder = create_encoder("resnet18", 4)
    load_pretrained_encoder(encoder, tmp / "out", "s2", band_names=target)
    for channel, source in enumerate(["B8A", "B04", "B03", "B02"]):
        torch.testing.assert_close(
            encoder.conv1.weight[:, channel], pretrained[:, S2_BANDS.index(source)], rtol=0, atol=0
        )


def test_unseen_bands_initialised_as_timm_adapts_with_a_warning(s2_export):
    tmp, pretrained, _ = s2_export
    target = ["B04", "NDVI", "B08", "SWIR_X"]
    encoder = create_encoder("resnet18", 4)
    with pytest.warns(UserWarning, match=r"Bands \['NDVI', 'SWIR_X'\] are not among"):
        load_pretrained_encoder(encoder, tmp / "out", "s2", band_names=target)
    adapted = adapt_input_conv(4, pretrained.clone(), base_chans=13)
    torch.testing.assert_close(encoder.conv1.weight[:, 0], pretrained[:, 3], rtol=0, atol=0)
    torch.testing.assert_close(encoder.conv1.weight[:, 2], pretrained[:, 7], rtol=0, atol=0)
    for channel in (1, 3):  # timm's channels for these positions: source channel repeated, scaled 13/4
        torch.testing.assert_close(encoder.conv1.weight[:, channel], adapted[:, channel], rtol=0, atol=0)
        torch.testing.assert_close(encoder.conv1.weight[:, channel], pretrained[:, channel] * 13 / 4)


def test_no_overlap_is_an_error_listing_both_sets(s2_export):
    tmp, _, _ = s2_export
    with pytest.raises(ValueError, match=r"\['VV', 'VH'\].*B01"):
        load_pretrained_encoder(create_encoder("resnet18", 2), tmp / "out", "s2", band_names=["VV", "VH"])


def test_same_bands_and_unknown_names_load_strictly(s2_export):
    tmp, _, full = s2_export
    encoder = create_encoder("resnet18", 13)
    load_pretrained_encoder(encoder, tmp / "out", "s2", band_names=S2_BANDS)
    torch.testing.assert_close(encoder.conv1.weight, full["conv1.weight"], rtol=0, atol=0)
    from decur_lightning.weights import EncoderWeightsMismatchError

    with pytest.raises(EncoderWeightsMismatchError, match="conv1.weight"):  # no target names: counts must match
        load_pretrained_encoder(create_encoder("resnet18", 4), tmp / "out", "s2")


def test_encoder_set_passes_the_modality_band_names(s2_export):
    tmp, pretrained, _ = s2_export
    spec = Modality(bands=3, encoder="resnet18", weights=str(tmp / "out"), band_names=["B04", "B03", "B02"])
    encoders = EncoderSet({"optical": Modality(**{**spec.__dict__, "weights_modality": "s2"})})
    for channel, band in enumerate(["B04", "B03", "B02"]):
        torch.testing.assert_close(
            encoders["optical"].conv1.weight[:, channel], pretrained[:, S2_BANDS.index(band)], rtol=0, atol=0
        )


def test_adapt_input_bands_checks_its_inputs():
    encoder = create_encoder("resnet18", 2)
    state_dict = create_encoder("resnet18", 3).state_dict()
    with pytest.raises(ValueError, match="record 2 bands"):
        adapt_input_bands(encoder, state_dict, ["VV", "VH"], ["VH", "VV"])
    with pytest.raises(ValueError, match="takes 2 channels but 3 band names"):
        adapt_input_bands(encoder, state_dict, ["R", "G", "B"], ["B", "G", "R"])
    out = adapt_input_bands(encoder, state_dict, ["R", "G", "B"], ["B", "R"])
    torch.testing.assert_close(out["conv1.weight"], state_dict["conv1.weight"][:, [2, 0]])
