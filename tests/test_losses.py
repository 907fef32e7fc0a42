"""The DeCUR loss against a plain transcription of the paper's Algorithm 1."""

from __future__ import annotations

import pytest
import torch
from lightly.loss import BarlowTwinsLoss
from torch import nn

from decur_lightning.losses import DeCURLoss, barlow_twins_loss, decur_loss


def _algorithm1(z1_1, z1_2, z2_1, z2_2, k_c, lmb=0.0051):
    """Algorithm 1 of the paper, line by line."""
    n, k = z1_1.shape
    bn = nn.BatchNorm1d(k, affine=False).train().to(z1_1.dtype)

    def on_diag(c):
        return torch.diagonal(c)

    def off_diag(c):
        return c[~torch.eye(c.shape[0], dtype=torch.bool)]

    def loss_c(c, lmb):
        return (on_diag(c) - 1).pow(2).sum() + lmb * off_diag(c).pow(2).sum()

    def loss_u(c, lmb):
        return on_diag(c).pow(2).sum() + lmb * off_diag(c).pow(2).sum()

    z1_1, z1_2, z2_1, z2_2 = bn(z1_1), bn(z1_2), bn(z2_1), bn(z2_2)
    c1 = z1_1.T @ z1_2 / n
    c2 = z2_1.T @ z2_2 / n
    cm = z1_1.T @ z2_1 / n
    cc = cm[:k_c, :k_c]
    cu = cm[k_c:, k_c:]
    l1, l2, lc, lu = loss_c(c1, lmb), loss_c(c2, lmb), loss_c(cc, lmb), loss_u(cu, lmb)
    return l1 + l2 + lc + lu, l1, l2, lc, lu


def _embeddings(n, k, correlated=True, dtype=torch.float64):
    base = torch.randn(n, k, dtype=dtype)
    if not correlated:
        return [torch.randn(n, k, dtype=dtype) for _ in range(4)]
    return [base + 0.5 * torch.randn(n, k, dtype=dtype) for _ in range(4)]


@pytest.mark.parametrize("n", [8, 64, 256])
@pytest.mark.parametrize(("k", "common_dims"), [(16, 12), (64, 56), (128, 96), (32, 32)])
@pytest.mark.parametrize("method", ["dense", "cheap"])
def test_decur_loss_equals_algorithm1(n, k, common_dims, method):
    z = _embeddings(n, k)
    expected = _algorithm1(*z, common_dims)
    terms = decur_loss(*[t.float() for t in z], common_dims=common_dims, method=method)
    got = (terms.total, terms.intra1, terms.intra2, terms.common, terms.unique)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), e, rtol=2e-5, atol=1e-4)
    assert torch.isclose(terms.total, terms.common + terms.unique + terms.intra1 + terms.intra2)


def test_intra_terms_equal_lightly_barlow_twins():
    z1a, z1b, z2a, z2b = (t.float() for t in _embeddings(32, 64))
    terms = decur_loss(z1a, z1b, z2a, z2b, common_dims=48)
    lightly_loss = BarlowTwinsLoss(lambda_param=0.0051)
    torch.testing.assert_close(terms.intra1, lightly_loss(z1a, z1b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(terms.intra2, lightly_loss(z2a, z2b), rtol=1e-5, atol=1e-4)
    for method in ("dense", "cheap"):
        torch.testing.assert_close(
            barlow_twins_loss(z1a, z1b, method=method), lightly_loss(z1a, z1b), rtol=1e-5, atol=1e-4
        )


@pytest.mark.parametrize(("n", "k", "common_dims"), [(8, 64, 48), (32, 256, 224), (64, 512, 384), (256, 1024, 896)])
def test_dense_equals_cheap_value_and_gradient(n, k, common_dims):
    z = [t.float().requires_grad_() for t in _embeddings(n, k)]
    dense = decur_loss(*z, common_dims=common_dims, method="dense")
    grads_dense = torch.autograd.grad(dense.total, z)
    cheap = decur_loss(*z, common_dims=common_dims, method="cheap")
    grads_cheap = torch.autograd.grad(cheap.total, z)
    for a, b in zip(dense[:5], cheap[:5]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(dense.total.detach()))
    for a, b in zip(grads_dense, grads_cheap):
        assert float((a - b).norm() / a.norm()) < 1e-5


def test_auto_method_picks_cheap_below_k_and_agrees():
    z = [t.float() for t in _embeddings(16, 128)]
    auto = decur_loss(*z, common_dims=100)
    dense = decur_loss(*z, common_dims=100, method="dense")
    torch.testing.assert_close(auto.total, dense.total, rtol=1e-5, atol=1e-4)


def test_bf16_autocast_gives_float32_value():
    z = [t.float() for t in _embeddings(64, 128)]
    reference = decur_loss(*z, common_dims=96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # embeddings as a bf16 projector would return them
        under_autocast = decur_loss(*z, common_dims=96)
        bf16_inputs = decur_loss(*[t.bfloat16() for t in z], common_dims=96)
    assert under_autocast.total.dtype == torch.float32
    torch.testing.assert_close(under_autocast.total, reference.total, rtol=1e-6, atol=1e-4)
    # bf16 inputs are rounded, but the statistics are computed in float32
    assert bf16_inputs.total.dtype == torch.float32
    torch.testing.assert_close(bf16_inputs.total, reference.total, rtol=2e-2, atol=0)


def test_per_term_lambdas():
    z = [t.float() for t in _embeddings(16, 32)]
    base = decur_loss(*z, common_dims=24, lambd=0.0051)
    only_unique = decur_loss(*z, common_dims=24, lambd=0.0051, lambd_unique=0.5)
    assert torch.equal(base.intra1, only_unique.intra1)
    assert torch.equal(base.common, only_unique.common)
    assert only_unique.unique > base.unique
    _, _, _, _, lu = _algorithm1(*[t.double() for t in z], 24, lmb=0.5)
    torch.testing.assert_close(only_unique.unique.double(), lu, rtol=1e-5, atol=1e-5)


def test_all_common_dims_leaves_no_unique_term():
    z = [t.float() for t in _embeddings(16, 32)]
    terms = decur_loss(*z, common_dims=32)
    assert terms.unique == 0
    assert terms.cross_diagonal.shape == (32,)


def test_perfectly_aligned_embeddings_have_zero_common_loss_on_diagonal():
    z = torch.randn(128, 16)
    terms = decur_loss(z, z, z, z, common_dims=16)
    torch.testing.assert_close(terms.cross_diagonal, torch.ones(16), atol=1e-4, rtol=0)


@pytest.mark.parametrize("common_dims", [0, -1, 33])
def test_common_dims_out_of_range(common_dims):
    z = [torch.randn(8, 32) for _ in range(4)]
    with pytest.raises(ValueError, match="common_dims must satisfy 0 < common_dims <= K = 32"):
        decur_loss(*z, common_dims=common_dims)


def test_shape_mismatch_and_small_batch():
    with pytest.raises(ValueError, match="same shape"):
        decur_loss(torch.randn(8, 32), torch.randn(8, 32), torch.randn(8, 16), torch.randn(8, 16), common_dims=8)
    with pytest.raises(ValueError, match="same shape"):
        decur_loss(torch.randn(8, 32), torch.randn(4, 32), torch.randn(8, 32), torch.randn(8, 32), common_dims=8)
    with pytest.raises(ValueError, match="at least 2 samples"):
        decur_loss(*[torch.randn(1, 32) for _ in range(4)], common_dims=8)
    with pytest.raises(ValueError, match=r"shape \(N, K\)"):
        barlow_twins_loss(torch.randn(8), torch.randn(8))
    with pytest.raises(ValueError, match="method must be one of"):
        decur_loss(*[torch.randn(4, 8) for _ in range(4)], common_dims=4, method="fast")


def test_module_matches_function_without_process_group():
    z = [torch.randn(16, 32) for _ in range(4)]
    module = DeCURLoss(common_dims=24, lambd=0.01)
    views = {"s1": (z[0], z[1]), "s2": (z[2], z[3])}
    torch.testing.assert_close(module(views).total, decur_loss(*z, common_dims=24, lambd=0.01).total)
    authors = DeCURLoss(common_dims=24, lambd=0.01, weighting="authors")(views).total
    torch.testing.assert_close(authors, decur_loss(*z, common_dims=24, lambd=0.01, weighting="authors").total)
