"""estimate_common_ratio and probe_fusion on data whose answer is known by construction."""

from __future__ import annotations

import pytest
import torch

from decur_lightning.analysis import estimate_common_ratio, probe_fusion


def _factor_features(shared: int, total: int = 4, n: int = 2000, dim: int = 32, seed: int = 0, extra: float = 0.0):
    """Two modalities' features, linear in ``total`` unit-variance factors each, ``shared`` of them common.

    Every feature sees every factor with weight +-1/2 (random signs), so every factor has the same
    variance in every feature and the share of variance the other modality predicts is
    ``shared / total`` before and after standardising the features. ``extra`` adds a
    view-specific component of that standard deviation, redrawn for the second view.
    """
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(n, shared, generator=g)

    def modality() -> tuple[torch.Tensor, torch.Tensor]:
        own = torch.randn(n, total - shared, generator=g)
        signs = torch.randint(0, 2, (total + 8, dim), generator=g).float() * 2 - 1
        signal = torch.cat([common, own], 1) @ signs[:total] / 2

        def view() -> torch.Tensor:
            nuisance = extra * torch.randn(n, 8, generator=g) @ signs[total:] / 8**0.5
            return signal + nuisance + 0.05 * torch.randn(n, dim, generator=g)

        return view(), view()

    (m, m_view), (o, o_view) = modality(), modality()
    return m, o, m_view, o_view


@pytest.mark.parametrize("shared", [0, 1, 2, 3, 4])
def test_predictability_finds_the_share_of_common_factors(shared):
    m, o, _, _ = _factor_features(shared)
    estimate = estimate_common_ratio(m, o)
    assert estimate.method == "predictability"
    assert estimate.ratio == pytest.approx(shared / 4, abs=0.05), estimate.per_direction
    assert set(estimate.per_direction) == {"m<-n", "n<-m"}


def test_views_discount_variance_that_does_not_survive_a_change_of_view():
    # Half of the factors shared, plus view-specific variance as large as the signal: counted as
    # private without views, discounted with them.
    m, o, m_view, o_view = _factor_features(2, extra=1.0)
    plain = estimate_common_ratio(m, o)
    with_views = estimate_common_ratio(m, o, z_m_view=m_view, z_n_view=o_view)
    assert plain.ratio < 0.35
    assert with_views.ratio == pytest.approx(0.5, abs=0.07), with_views.per_direction
    assert {"m<-m_view", "n<-n_view"} <= set(with_views.per_direction)


def test_alignment_counts_the_dimensions_the_other_modality_matches():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(512, 16, generator=g)
    other = torch.randn(512, 16, generator=g)
    other[:, :12] = z[:, :12] + 0.1 * torch.randn(512, 12, generator=g)  # 12 of 16 dims aligned
    estimate = estimate_common_ratio(z, other, method="alignment")
    assert estimate.ratio == pytest.approx(12 / 16)
    assert estimate.per_dimension.shape == (16,)
    assert bool((estimate.per_dimension[:12] > 0.9).all()) and bool((estimate.per_dimension[12:].abs() < 0.2).all())
    assert estimate.common_ratio() == pytest.approx(0.75)
    assert estimate_common_ratio(z, torch.randn(512, 16, generator=g), method="alignment").common_ratio() == 1 / 16


def test_bad_input_is_explained():
    z = torch.randn(64, 8)
    with pytest.raises(ValueError, match="same N samples"):
        estimate_common_ratio(z, torch.randn(32, 8))
    with pytest.raises(ValueError, match="method must be one of"):
        estimate_common_ratio(z, z, method="cca")
    with pytest.raises(ValueError, match="equal width"):
        estimate_common_ratio(z, torch.randn(64, 4), method="alignment")
    with pytest.raises(ValueError, match="of both modalities"):
        estimate_common_ratio(z, z, z_m_view=z)
    with pytest.raises(ValueError, match="at least 8 samples"):
        estimate_common_ratio(z[:10], z[:10])


def test_probe_fusion_uses_both_modalities_for_every_factor():
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> dict[str, torch.Tensor]:
        shared, private_a, private_b = (torch.rand(n, k, generator=g) * 2 - 1 for k in (2, 1, 1))
        mix = torch.tensor([[1.0, 0.5, -0.3], [0.2, -1.0, 0.7], [0.4, 0.1, 1.0]])
        return {
            "features_a": torch.cat([shared, private_a], 1) @ mix + 0.01 * torch.randn(n, 3, generator=g),
            "features_b": torch.cat([shared, private_b], 1) @ mix.T + 0.01 * torch.randn(n, 3, generator=g),
            "shared": shared,
            "private_a": private_a,
            "private_b": private_b,
        }

    train, test = split(400), split(400)
    both = probe_fusion(train, test)
    assert set(both) == {"all", "shared", "private_a", "private_b"}
    assert min(both.values()) > 0.99
    # One modality alone cannot predict the other's private factor.
    only_a = probe_fusion(
        {k: v for k, v in train.items() if k != "features_b"}, {k: v for k, v in test.items() if k != "features_b"}
    )
    assert only_a["private_a"] > 0.99 and only_a["private_b"] < 0.05
    with pytest.raises(ValueError, match="features_<modality>"):
        probe_fusion({"shared": train["shared"]}, test)
