"""multimodal_decur_loss (eq. 6 over M >= 2 modalities) against a loop-based transcription."""

from __future__ import annotations

import pytest
import torch

from decur_lightning import losses
from decur_lightning.losses import (
    MultimodalDeCURTerms,
    decur_loss,
    multimodal_decur_loss,
)

NAMES = ("s1", "s2", "dem", "rgb")


def _reference(views, common_dims, lmb=0.0051):
    """L = sum_m L_BT(z_m', z_m'') + sum_{m<n} [L_com(C_mn[:Kc,:Kc]) + L_uni(C_mn[Kc:,Kc:])].

    Plain loops, dense correlation matrices built explicitly, in float64.
    """

    def bn(z):
        z = z.double()
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)

    def corr(a, b):
        return bn(a).T @ bn(b) / a.shape[0]

    def loss(c, target):
        total = c.new_zeros(())
        for i in range(c.shape[0]):
            for j in range(c.shape[1]):
                if i == j:
                    total = total + (target - c[i, i]) ** 2
                else:
                    total = total + lmb * c[i, j] ** 2
        return total

    names = list(views)
    terms = {}
    for m in names:
        if views[m][1] is not None:
            terms[f"intra_{m}"] = loss(corr(*views[m]), 1.0)
    for i, m in enumerate(names):
        for n in names[i + 1 :]:
            kc = common_dims if isinstance(common_dims, int) else common_dims[(m, n)]
            c = corr(views[m][0], views[n][0])
            terms[f"common_{m}_{n}"] = loss(c[:kc, :kc], 1.0)
            terms[f"unique_{m}_{n}"] = loss(c[kc:, kc:], 0.0)
    terms["total"] = sum(terms.values())
    return terms


def _views(num_modalities, n=12, k=16, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, k, generator=g)
    views = {}
    for name in NAMES[:num_modalities]:
        own = torch.randn(n, k, generator=g)
        pair = [shared + own + 0.5 * torch.randn(n, k, generator=g) for _ in range(2)]
        views[name] = tuple(t.requires_grad_(requires_grad) for t in pair)
    return views


def _leaves(views):
    return [t for pair in views.values() for t in pair if t is not None]


@pytest.mark.parametrize("num_modalities", [2, 3, 4])
@pytest.mark.parametrize("method", ["dense", "cheap"])
@pytest.mark.parametrize("per_pair", [False, True])
def test_equals_loop_transcription_value_and_gradient(num_modalities, method, per_pair):
    views = _views(num_modalities, requires_grad=True)
    names = list(views)
    pairs = [(m, n) for i, m in enumerate(names) for n in names[i + 1 :]]
    common_dims = {p: kc for p, kc in zip(pairs, [12, 16, 5, 9, 1, 14])} if per_pair else 12
    out = multimodal_decur_loss(views, common_dims, method=method)
    expected = _reference(views, common_dims)

    got = out.terms()
    assert set(got) == set(expected)
    assert len(got) == 1 + num_modalities + 2 * len(pairs)
    for name, value in got.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-5, atol=1e-5, msg=name)

    leaves = _leaves(views)
    grads = torch.autograd.grad(out.total, leaves)
    grads_ref = torch.autograd.grad(expected["total"], leaves)
    for g, e in zip(grads, grads_ref):
        assert float((g.double() - e).norm() / e.norm()) < 1e-5


@pytest.mark.parametrize("method", ["dense", "cheap"])
@pytest.mark.parametrize("with_intra", [True, False])
def test_two_modalities_equal_decur_loss_every_term(method, with_intra):
    views = _views(2, n=16, k=32)
    if not with_intra:
        views = {m: (za, None) for m, (za, _) in views.items()}
    (z1a, z1b), (z2a, z2b) = views.values()
    ref = decur_loss(z1a, z1b, z2a, z2b, common_dims=24, method=method, intra=with_intra)
    out = multimodal_decur_loss(views, common_dims=24, method=method)
    pair = ("s1", "s2")
    torch.testing.assert_close(out.total, ref.total)
    torch.testing.assert_close(out.common[pair], ref.common)
    torch.testing.assert_close(out.unique[pair], ref.unique)
    torch.testing.assert_close(out.cross_diagonal[pair], ref.cross_diagonal)
    if with_intra:
        torch.testing.assert_close(out.intra["s1"], ref.intra1)
        torch.testing.assert_close(out.intra["s2"], ref.intra2)
    else:
        assert out.intra == {}
        assert ref.intra1 == 0 and ref.intra2 == 0


def test_per_pair_common_dims_only_change_their_pair():
    views = _views(3)
    base = multimodal_decur_loss(views, 12)
    changed = multimodal_decur_loss(views, {("s1", "s2"): 12, ("s1", "dem"): 4, ("s2", "dem"): 12})
    assert torch.equal(changed.common[("s1", "s2")], base.common[("s1", "s2")])
    assert torch.equal(changed.common[("s2", "dem")], base.common[("s2", "dem")])
    assert torch.equal(changed.intra["dem"], base.intra["dem"])
    assert not torch.isclose(changed.common[("s1", "dem")], base.common[("s1", "dem")])
    # K_c = K: no unique block, a zero term, and the diagonal still has all K entries
    full = multimodal_decur_loss(views, {("s1", "s2"): 16, ("s1", "dem"): 4, ("s2", "dem"): 12})
    assert full.unique[("s1", "s2")] == 0
    assert full.cross_diagonal[("s1", "s2")].shape == (16,)


@pytest.mark.parametrize("method", ["dense", "cheap"])
def test_view2_none_drops_only_that_intra_term(method):
    views = _views(3)
    views["dem"] = (views["dem"][0], None)
    out = multimodal_decur_loss(views, 10, method=method)
    assert list(out.intra) == ["s1", "s2"]
    assert "intra_dem" not in out.terms()
    assert "common_s2_dem" in out.terms()
    expected = _reference(views, 10)
    torch.testing.assert_close(out.total.double(), expected["total"], rtol=1e-5, atol=1e-5)
    full = multimodal_decur_loss(_views(3), 10, method=method)
    torch.testing.assert_close(out.total, full.total - full.intra["dem"], rtol=1e-6, atol=1e-5)


def test_cheap_computes_each_modality_gram_once(monkeypatch):
    calls = []
    real = losses._gram

    def spy(z):
        calls.append(tuple(z.shape))
        return real(z)

    monkeypatch.setattr(losses, "_gram", spy)
    views = _views(4, n=8, k=16)
    multimodal_decur_loss(views, 12, method="cheap")
    # per modality: the common and unique blocks of view 1 (shared by its 3 pairs and its intra
    # term) and view 2 -> 3 * 4 = 12, not 2 Gram matrices per pair and view 1 again per intra term
    assert len(calls) == 12
    assert sorted(calls) == sorted([(8, 12)] * 4 + [(8, 4)] * 4 + [(8, 16)] * 4)

    calls.clear()
    views["rgb"] = (views["rgb"][0], None)
    multimodal_decur_loss(views, 12, method="cheap")
    assert len(calls) == 11

    calls.clear()
    multimodal_decur_loss(views, 12, method="dense")
    assert calls == []


def test_bf16_autocast_gives_float32_value():
    views = _views(3, n=32, k=64)
    for method in ("dense", "cheap"):
        reference = multimodal_decur_loss(views, 48, method=method)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = multimodal_decur_loss(views, 48, method=method)
            bf16_inputs = multimodal_decur_loss(
                {m: tuple(t.bfloat16() for t in pair) for m, pair in views.items()}, 48, method=method
            )
        for name, value in under_autocast.terms().items():
            assert value.dtype == torch.float32
            torch.testing.assert_close(value, reference.terms()[name], rtol=1e-6, atol=1e-5)
        assert bf16_inputs.total.dtype == torch.float32
        torch.testing.assert_close(bf16_inputs.total, reference.total, rtol=2e-2, atol=0)


def test_result_type_and_terms_order():
    out = multimodal_decur_loss(_views(3), 12)
    assert isinstance(out, MultimodalDeCURTerms)
    assert list(out.terms()) == [
        "total",
        "intra_s1",
        "intra_s2",
        "intra_dem",
        "common_s1_s2",
        "common_s1_dem",
        "common_s2_dem",
        "unique_s1_s2",
        "unique_s1_dem",
        "unique_s2_dem",
    ]
    torch.testing.assert_close(out.total, sum(v for k, v in out.terms().items() if k != "total"))


def test_errors():
    z = torch.randn(8, 16)
    with pytest.raises(ValueError, match="at least 2 modalities; got 1"):
        multimodal_decur_loss({"s1": (z, z)}, 8)
    with pytest.raises(TypeError, match="must be a mapping"):
        multimodal_decur_loss([(z, z), (z, z)], 8)
    with pytest.raises(TypeError, match=r"views\['s2'\] must be a pair"):
        multimodal_decur_loss({"s1": (z, z), "s2": z}, 8)
    with pytest.raises(ValueError, match=r"views\['dem'\]\[0\] must have the same shape"):
        multimodal_decur_loss({"s1": (z, z), "s2": (z, z), "dem": (torch.randn(8, 12), None)}, 8)
    with pytest.raises(ValueError, match=r"views\['s2'\]\[1\] must have the same shape"):
        multimodal_decur_loss({"s1": (z, z), "s2": (z, torch.randn(4, 16))}, 8)
    with pytest.raises(ValueError, match="at least 2 samples"):
        multimodal_decur_loss({"s1": (z[:1], None), "s2": (z[:1], None)}, 8)
    for kc in (0, -1, 17):
        with pytest.raises(ValueError, match=rf"pair \('s1', 's2'\) must satisfy 0 < common_dims <= K = 16.*got {kc}"):
            multimodal_decur_loss({"s1": (z, z), "s2": (z, z)}, kc)
    three = {"s1": (z, z), "s2": (z, z), "dem": (z, z)}
    with pytest.raises(ValueError, match=r"missing \[\('s2', 'dem'\)\], unknown \[\('dem', 's2'\)\]"):
        multimodal_decur_loss(three, {("s1", "s2"): 8, ("s1", "dem"): 8, ("dem", "s2"): 8})
    with pytest.raises(ValueError, match=r"pair \('s1', 'dem'\) must satisfy"):
        multimodal_decur_loss(three, {("s1", "s2"): 8, ("s1", "dem"): 0, ("s2", "dem"): 8})
    with pytest.raises(TypeError, match="must be an int"):
        multimodal_decur_loss(three, 8.0)
    with pytest.raises(ValueError, match="method must be one of"):
        multimodal_decur_loss(three, 8, method="fast")
