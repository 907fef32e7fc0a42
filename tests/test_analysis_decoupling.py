"""Linear probes of known factors (decoupling.py) by modality name, for three modalities."""

from __future__ import annotations

import torch
from test_analysis_alignment import THREE, three_batch

from decur_lightning.analysis import extract_features, probe_factors

from helpers import tiny_decur


def factors(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Shared factors, one private block per modality, and a block only sar and dem see."""
    out = {"shared": torch.randn(n, 2, generator=generator), "shared_sar_dem": torch.randn(n, 2, generator=generator)}
    out.update({f"private_{name}": torch.randn(n, 2, generator=generator) for name in THREE})
    return out


def features(values: dict[str, torch.Tensor], mixing: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each modality's features: a fixed linear map of |factors| it sees (probes target |f|)."""
    out = dict(values)
    for name in THREE:
        seen = [values["shared"], values[f"private_{name}"]]
        if name in ("sar", "dem"):
            seen.append(values["shared_sar_dem"])
        x = torch.cat(seen, 1).abs()
        out[f"features_{name}"] = x @ mixing[name][: x.shape[1]]
    return out


def test_probes_of_three_modalities_with_a_subset_shared_factor():
    generator = torch.Generator().manual_seed(0)
    mixing = {name: torch.randn(6, 12, generator=generator) for name in THREE}
    train = features(factors(600, generator), mixing)
    test = features(factors(300, generator), mixing)
    result = probe_factors(train, test, alpha=1e-3)
    assert list(result) == list(THREE)
    for name in THREE:
        assert result[name]["shared"] > 0.95 and result[name]["private_own"] > 0.95
        # the private factors of both other modalities are invisible to this one
        assert abs(result[name]["private_other"]) < 0.05
    assert result["sar"]["subset_shared"]["sar_dem"] > 0.95 and result["dem"]["subset_shared"]["sar_dem"] > 0.95
    assert abs(result["optical"]["subset_shared"]["sar_dem"]) < 0.05


def test_extract_features_by_name():
    model = tiny_decur(modalities=THREE)
    batch = {
        **three_batch(4),
        "shared": torch.randn(4, 2),
        "shared_sar_dem": torch.randn(4, 1),
        "label": torch.zeros(4),
    }
    out = extract_features(model, [batch])
    assert set(out) == {"features_sar", "features_optical", "features_dem", "shared", "shared_sar_dem"}
    model.eval()
    with torch.no_grad():
        expected = model(batch["image_dem"], "dem")
    torch.testing.assert_close(out["features_dem"], expected)
    assert out["features_sar"].shape == (4, 512)


def test_two_modalities_keep_their_keys():
    generator = torch.Generator().manual_seed(1)
    values = {
        "shared": torch.randn(200, 2, generator=generator),
        "private_sar": torch.randn(200, 2, generator=generator),
        "private_optical": torch.randn(200, 2, generator=generator),
    }
    for name in ("sar", "optical"):
        values[f"features_{name}"] = torch.cat([values["shared"], values[f"private_{name}"]], 1).abs()
    result = probe_factors(values, values)  # penalty selected on a hold-out
    assert set(result["sar"]) == {"shared", "private_own", "private_other"}  # no subsets: unchanged output
