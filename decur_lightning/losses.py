"""The cross-correlation loss family of DeCUR (paper Section 3.1, Algorithm 1, eq. 1-6).

Everything here is a pure function of embedding batches, usable without Lightning:

- :func:`barlow_twins_loss`: the Barlow Twins loss of two views (eq. 4/5 for one modality).
- :func:`decur_loss`: the four DeCUR terms of eq. 6 from four embedding batches (Algorithm 1).
- :func:`multimodal_decur_loss`: eq. 6 generalised to ``M >= 2`` named modalities (one
  intra-modal term per modality, a common and a unique term per pair of modalities); equals
  :func:`decur_loss` for ``M = 2``.
- :class:`DeCURLoss`: an ``nn.Module`` around :func:`multimodal_decur_loss` that gathers
  embeddings across ranks (with gradient) before standardising, so that a distributed run
  computes the loss of the global batch exactly.

Two exact computations of every cross-correlation term are available:

``"dense"``
    Builds ``C = za.T @ zb / N`` (``K x K``), as Algorithm 1 writes it. Cost ``O(N K^2)``
    time and ``O(K^2)`` memory.
``"cheap"``
    Never builds ``C``. With standardised ``za, zb`` of shape ``(N, K)``:
    ``diag(C) = sum_n za * zb / N`` and
    ``||C||_F^2 = sum((za za^T) * (zb zb^T)) / N^2`` (two ``N x N`` Gram matrices),
    so that the off-diagonal sum is ``||C||_F^2 - sum(diag(C)^2)``. Cost ``O(N^2 K)`` time and
    ``O(N^2 + N K)`` memory; a block of ``C`` uses the same identity on column slices.
    For ``N < K`` (the paper's regime: ``N = 256``, ``K = 8192``) it is much faster.

``"auto"`` (the default) picks ``"cheap"`` when ``N < K`` and ``"dense"`` otherwise. Both
run in float32, also inside ``torch.autocast``: a bf16 correlation matrix is off by about
3e-3 off the diagonal, and fp16 sums of squares overflow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DeCURLoss",
    "DeCURLossTerms",
    "MultimodalDeCURTerms",
    "barlow_twins_loss",
    "decur_loss",
    "gather_with_grad",
    "multimodal_decur_loss",
    "standardize",
]

Method = Literal["auto", "dense", "cheap"]
Weighting = Literal["paper", "authors"]
DEFAULT_LAMBDA = 0.0051
_METHODS = ("auto", "dense", "cheap")


class DeCURLossTerms(NamedTuple):
    """The terms of the DeCUR objective (eq. 6), each a float32 scalar tensor.

    Attributes:
        total: ``common + unique + intra1 + intra2`` (eq. 6).
        intra1: intra-modal Barlow Twins term of modality 1, ``L_M1`` (eq. 4).
        intra2: intra-modal Barlow Twins term of modality 2, ``L_M2`` (eq. 5).
        common: cross-modal common term ``L_com`` (eq. 2), common block of ``C_m`` to identity.
        unique: cross-modal unique term ``L_uni`` (eq. 3), unique block of ``C_m`` to zero.
        cross_diagonal: the ``K`` on-diagonal entries of the cross-modal correlation matrix
            ``C_m`` (first ``common_dims`` are the common dimensions); ``(1 - C_ii)^2`` is the
            per-dimension alignment loss of eq. 7.
    """

    total: Tensor
    intra1: Tensor
    intra2: Tensor
    common: Tensor
    unique: Tensor
    cross_diagonal: Tensor


def standardize(z: Tensor) -> Tensor:
    """Standardise each embedding dimension over the batch, in float32.

    Equals ``BatchNorm1d(K, affine=False)`` in training mode (biased variance, eps 1e-5),
    the ``BN`` of Algorithm 1.
    """
    z = z.float()
    return F.batch_norm(z, None, None, training=True, eps=1e-5)


def _check_method(method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")


def _use_cheap(method: Method, n: int, k: int) -> bool:
    return method == "cheap" or (method == "auto" and n < k)


def _check_pair(za: Tensor, zb: Tensor, names: tuple[str, str]) -> None:
    if za.ndim != 2 or zb.ndim != 2:
        raise ValueError(
            f"{names[0]} and {names[1]} must be embedding batches of shape (N, K); "
            f"got {tuple(za.shape)} and {tuple(zb.shape)}."
        )
    if za.shape != zb.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape (N, K); got {tuple(za.shape)} and {tuple(zb.shape)}."
        )
    if za.shape[0] < 2:
        raise ValueError(
            f"The DeCUR / Barlow Twins loss standardises each dimension over the batch, which needs "
            f"at least 2 samples; got a batch of {za.shape[0]}. Use a larger batch_size (and "
            "drop_last=True in the training DataLoader)."
        )


def _redundancy_loss(diag: Tensor, frob_sq: Tensor, target_one: bool, lambd: float) -> Tensor:
    """``sum_i (t - C_ii)^2 + lambd * sum_{i != j} C_ij^2`` from the diagonal and ``||C||_F^2``."""
    on_diag = (1.0 - diag).pow(2).sum() if target_one else diag.pow(2).sum()
    off_diag = frob_sq - diag.pow(2).sum()
    return on_diag + lambd * off_diag


class _CorrelationStats(NamedTuple):
    diag: Tensor  # (K,) on-diagonal entries of C
    frob_sq: Tensor  # ||C||_F^2 restricted to the block


def _dense_stats(za: Tensor, zb: Tensor) -> _CorrelationStats:
    c = za.T @ zb / za.shape[0]
    return _CorrelationStats(torch.diagonal(c), c.pow(2).sum())


def _gram(z: Tensor) -> Tensor:
    return z @ z.T


def _cheap_stats(za: Tensor, zb: Tensor, gram_a: Tensor, gram_b: Tensor) -> _CorrelationStats:
    n = za.shape[0]
    return _CorrelationStats((za * zb).sum(0) / n, (gram_a * gram_b).sum() / (n * n))


def barlow_twins_loss(za: Tensor, zb: Tensor, lambd: float = DEFAULT_LAMBDA, method: Method = "auto") -> Tensor:
    """Barlow Twins loss of two embedding batches (paper eq. 4/5, Algorithm 1 ``loss_c``).

    ``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2`` with ``C`` the cross-correlation of the
    per-dimension standardised embeddings. Computed in float32 even under autocast.

    Args:
        za: embeddings of view 1, shape ``(N, K)``.
        zb: embeddings of view 2, shape ``(N, K)``.
        lambd: weight of the redundancy-reduction (off-diagonal) term.
        method: ``"dense"``, ``"cheap"`` or ``"auto"`` (see the module docstring).

    Example:
        >>> za, zb = torch.randn(8, 32), torch.randn(8, 32)
        >>> barlow_twins_loss(za, zb).shape
        torch.Size([])
    """
    _check_method(method)
    _check_pair(za, zb, ("za", "zb"))
    with torch.autocast(device_type=za.device.type, enabled=False):
        za, zb = standardize(za), standardize(zb)
        if _use_cheap(method, *za.shape):
            stats = _cheap_stats(za, zb, _gram(za), _gram(zb))
        else:
            stats = _dense_stats(za, zb)
        return _redundancy_loss(stats.diag, stats.frob_sq, True, lambd)


def decur_loss(
    z1a: Tensor,
    z1b: Tensor | None,
    z2a: Tensor,
    z2b: Tensor | None,
    common_dims: int,
    lambd: float = DEFAULT_LAMBDA,
    *,
    lambd_intra1: float | None = None,
    lambd_intra2: float | None = None,
    lambd_common: float | None = None,
    lambd_unique: float | None = None,
    method: Method = "auto",
    intra: bool = True,
    weighting: Weighting = "paper",
) -> DeCURLossTerms:
    """The DeCUR objective of Algorithm 1 (eq. 2-6).

    The four embedding batches are standardised per dimension (``BN`` in Algorithm 1), then

    - ``intra1 = loss_c(C1)``, ``C1 = corr(z1a, z1b)`` over all ``K`` dims (eq. 4),
    - ``intra2 = loss_c(C2)``, ``C2 = corr(z2a, z2b)`` (eq. 5),
    - ``common = loss_c(Cm[:Kc, :Kc])`` and ``unique = loss_u(Cm[Kc:, Kc:])`` with
      ``Cm = corr(z1a, z2a)`` (eq. 2, 3); the off-diagonal blocks of ``Cm`` are not penalised,
    - ``total = common + unique + intra1 + intra2`` (eq. 6).

    Args:
        z1a, z1b: embeddings of the two augmented views of modality 1, each ``(N, K)``.
        z2a, z2b: embeddings of the two augmented views of modality 2, each ``(N, K)``.
        common_dims: ``K_c``, the number of common dimensions (the first ``K_c``);
            ``0 < common_dims <= K``. ``common_dims == K`` leaves no unique dimensions.
        lambd: default weight of every off-diagonal term (paper: 0.0051).
        lambd_intra1, lambd_intra2, lambd_common, lambd_unique: optional per-term weights
            (``lambda_M1``, ``lambda_M2``, ``lambda_c``, ``lambda_u``); ``None`` uses ``lambd``.
        method: ``"dense"``, ``"cheap"`` or ``"auto"`` (see the module docstring); all give the
            same value and gradient up to float32 rounding.
        intra: include the intra-modal terms (Table 5 ablation "w/o intra-modal" sets it False;
            then ``z1b`` and ``z2b`` may be ``None`` and ``intra1 = intra2 = 0``).
        weighting: ``"paper"`` (eq. 6, the sum) or ``"authors"``, the weighting of the authors'
            released code, ``(L_M1 + L_M2 + (L_com + L_uni) / 2) / 3``, to compare with their
            published checkpoints. The terms themselves are the same.

    Returns:
        :class:`DeCURLossTerms` with float32 scalars (and the cross-modal diagonal).

    Example:
        >>> z = [torch.randn(16, 64) for _ in range(4)]
        >>> terms = decur_loss(*z, common_dims=48)
        >>> bool(torch.isclose(terms.total, terms.common + terms.unique + terms.intra1 + terms.intra2))
        True
    """
    _check_method(method)
    if weighting not in ("paper", "authors"):
        raise ValueError(f"weighting must be 'paper' or 'authors', got {weighting!r}.")
    _check_pair(z1a, z2a, ("z1a", "z2a"))
    if intra:
        if z1b is None or z2b is None:
            raise ValueError("The intra-modal terms need the second views z1b and z2b; pass them or set intra=False.")
        _check_pair(z1a, z1b, ("z1a", "z1b"))
        _check_pair(z2a, z2b, ("z2a", "z2b"))
    n, k = z1a.shape
    if not 0 < common_dims <= k:
        raise ValueError(
            f"common_dims must satisfy 0 < common_dims <= K = {k} (the embedding size); "
            f"got {common_dims}. The paper uses 87.5% of K for SAR-optical and 75% for RGB-DEM/RGB-D."
        )
    lambdas = {
        name: lambd if value is None else value
        for name, value in (
            ("intra1", lambd_intra1),
            ("intra2", lambd_intra2),
            ("common", lambd_common),
            ("unique", lambd_unique),
        )
    }
    with torch.autocast(device_type=z1a.device.type, enabled=False):
        z1a, z2a = standardize(z1a), standardize(z2a)
        zb = (standardize(z1b), standardize(z2b)) if intra else None  # type: ignore[arg-type]
        if _use_cheap(method, n, k):
            cross, intra_stats = _cheap_terms(z1a, z2a, zb, common_dims)
        else:
            cross, intra_stats = _dense_terms(z1a, z2a, zb, common_dims)
        cc, cu = cross
        zero = z1a.new_zeros(())
        intra1 = _redundancy_loss(*intra_stats[0], True, lambdas["intra1"]) if intra else zero
        intra2 = _redundancy_loss(*intra_stats[1], True, lambdas["intra2"]) if intra else zero
        common = _redundancy_loss(*cc, True, lambdas["common"])
        unique = _redundancy_loss(*cu, False, lambdas["unique"]) if common_dims < k else zero
        if weighting == "paper":
            total = common + unique + intra1 + intra2
        else:
            total = (intra1 + intra2 + (common + unique) / 2) / 3
        return DeCURLossTerms(
            total=total,
            intra1=intra1,
            intra2=intra2,
            common=common,
            unique=unique,
            cross_diagonal=torch.cat([cc.diag, cu.diag]),
        )


_Stats = tuple[_CorrelationStats, _CorrelationStats]


def _dense_terms(
    z1a: Tensor, z2a: Tensor, zb: tuple[Tensor, Tensor] | None, common_dims: int
) -> tuple[_Stats, _Stats | None]:
    n = z1a.shape[0]
    cm = z1a.T @ z2a / n
    cc, cu = cm[:common_dims, :common_dims], cm[common_dims:, common_dims:]
    cross = (
        _CorrelationStats(torch.diagonal(cc), cc.pow(2).sum()),
        _CorrelationStats(torch.diagonal(cu), cu.pow(2).sum()),
    )
    intra = None if zb is None else (_dense_stats(z1a, zb[0]), _dense_stats(z2a, zb[1]))
    return cross, intra


def _cheap_terms(
    z1a: Tensor, z2a: Tensor, zb: tuple[Tensor, Tensor] | None, common_dims: int
) -> tuple[_Stats, _Stats | None]:
    # Gram matrices of the common and unique column blocks of the cross-modal pair; their sums
    # are the full Gram matrices that the intra-modal terms need, so z1a and z2a cost one
    # N x N x K product each in total.
    c = common_dims
    g1c, g1u = _gram(z1a[:, :c]), _gram(z1a[:, c:])
    g2c, g2u = _gram(z2a[:, :c]), _gram(z2a[:, c:])
    cross = (
        _cheap_stats(z1a[:, :c], z2a[:, :c], g1c, g2c),
        _cheap_stats(z1a[:, c:], z2a[:, c:], g1u, g2u),
    )
    if zb is None:
        return cross, None
    intra = (
        _cheap_stats(z1a, zb[0], g1c + g1u, _gram(zb[0])),
        _cheap_stats(z2a, zb[1], g2c + g2u, _gram(zb[1])),
    )
    return cross, intra


Pair = tuple[str, str]
CommonDims = int | Mapping[Pair, int]


@dataclass(frozen=True)
class MultimodalDeCURTerms:
    """The terms of the DeCUR objective for ``M >= 2`` modalities, each a float32 scalar tensor.

    With ``z_m', z_m''`` the two views' embeddings of modality ``m`` and ``C(a, b)`` the
    cross-correlation of the batch-standardised embeddings,

    ``total = sum_m L_BT(z_m', z_m'') + sum_{m<n} [L_com(C(z_m', z_n')[:Kc, :Kc])
    + L_uni(C(z_m', z_n')[Kc:, Kc:])]``,

    which is eq. 6 of the paper for ``M = 2``.

    Attributes:
        total: the sum of every term below.
        intra: ``{m: L_BT(z_m', z_m'')}`` (eq. 4/5), only for modalities given a second view.
        common: ``{(m, n): L_com}`` (eq. 2) for every pair ``m < n`` in the order of ``views``.
        unique: ``{(m, n): L_uni}`` (eq. 3); zero for a pair with ``K_c = K``.
        cross_diagonal: ``{(m, n): diag C(z_m', z_n')}``, the ``K`` on-diagonal entries (first
            ``K_c`` common), as :attr:`DeCURLossTerms.cross_diagonal`.
    """

    total: Tensor
    intra: dict[str, Tensor]
    common: dict[Pair, Tensor]
    unique: dict[Pair, Tensor]
    cross_diagonal: dict[Pair, Tensor]

    def terms(self) -> dict[str, Tensor]:
        """Every scalar term under a flat name, for logging.

        Keys: ``"total"``, ``"intra_<m>"``, ``"common_<m>_<n>"``, ``"unique_<m>_<n>"``.
        """
        flat = {"total": self.total}
        flat.update({f"intra_{m}": v for m, v in self.intra.items()})
        flat.update({f"common_{m}_{n}": v for (m, n), v in self.common.items()})
        flat.update({f"unique_{m}_{n}": v for (m, n), v in self.unique.items()})
        return flat


def _check_views(views: Mapping[str, Sequence[Tensor | None]]) -> dict[str, tuple[Tensor, Tensor | None]]:
    if not isinstance(views, Mapping):
        raise TypeError(
            "views must be a mapping modality name -> (view 1, view 2) embeddings, e.g. "
            f"{{'s1': (z1a, z1b), 's2': (z2a, z2b)}}; got {type(views).__name__}."
        )
    if len(views) < 2:
        raise ValueError(
            f"multimodal_decur_loss needs at least 2 modalities; got {len(views)} ({list(views)}). "
            "For one modality use barlow_twins_loss."
        )
    checked: dict[str, tuple[Tensor, Tensor | None]] = {}
    for name, pair in views.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"Modality names must be non-empty strings; got {name!r}.")
        if isinstance(pair, Tensor) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(
                f"views[{name!r}] must be a pair (view 1, view 2) of embedding batches (view 2 may be "
                f"None); got {type(pair).__name__}."
            )
        za, zb = pair
        if not isinstance(za, Tensor) or not (zb is None or isinstance(zb, Tensor)):
            raise TypeError(
                f"views[{name!r}] must hold tensors (view 2 may be None); got "
                f"({type(za).__name__}, {type(zb).__name__})."
            )
        checked[name] = (za, zb)
    names = list(checked)
    first = names[0]
    for name in names:
        za, zb = checked[name]
        # Every view-1 batch against the first modality's: the cross terms need equal (N, K).
        _check_pair(checked[first][0], za, (f"views[{first!r}][0]", f"views[{name!r}][0]"))
        if zb is not None:
            _check_pair(za, zb, (f"views[{name!r}][0]", f"views[{name!r}][1]"))
    return checked


def _check_common_dims(common_dims: CommonDims, pairs: list[Pair], k: int) -> dict[Pair, int]:
    if isinstance(common_dims, Mapping):
        missing = [p for p in pairs if p not in common_dims]
        unknown = [p for p in common_dims if p not in pairs]
        if missing or unknown:
            raise ValueError(
                "common_dims as a mapping needs one K_c for every pair (m, n) of modalities, m before n "
                f"in the order of views: expected keys {pairs}; missing {missing}, unknown {unknown}."
            )
        per_pair = {p: common_dims[p] for p in pairs}
    else:
        per_pair = {p: common_dims for p in pairs}
    for pair, kc in per_pair.items():
        if isinstance(kc, bool) or not isinstance(kc, int):
            raise TypeError(f"common_dims for pair {pair} must be an int; got {type(kc).__name__}.")
        if not 0 < kc <= k:
            raise ValueError(
                f"common_dims for pair {pair} must satisfy 0 < common_dims <= K = {k} (the embedding size); got {kc}."
            )
    return per_pair


def multimodal_decur_loss(
    views: Mapping[str, Sequence[Tensor | None]],
    common_dims: CommonDims,
    lambd: float = DEFAULT_LAMBDA,
    method: Method = "auto",
) -> MultimodalDeCURTerms:
    """The DeCUR objective for ``M >= 2`` named modalities (eq. 6 generalised over pairs).

    ``L = sum_m L_BT(z_m', z_m'') + sum_{m<n} [L_com(C(z_m', z_n')[:Kc, :Kc])
    + L_uni(C(z_m', z_n')[Kc:, Kc:])]`` with ``L_BT`` the Barlow Twins loss (eq. 4/5), ``L_com``
    and ``L_uni`` eq. 2 and 3, and ``C`` the cross-correlation of the per-dimension standardised
    embeddings (Algorithm 1). For ``M = 2`` every term equals :func:`decur_loss`'s.

    With ``method="cheap"`` each modality's view-1 Gram matrices (of its common and unique column
    blocks) are computed once and reused for all its ``M - 1`` pairs and its intra-modal term.
    Everything runs in float32, also under ``torch.autocast``.

    Args:
        views: ordered mapping modality name -> ``(view 1, view 2)``, each ``(N, K)``; all the
            same shape. View 2 may be ``None``: that modality then has no intra-modal term.
            The order fixes the pairs ``(m, n)``, ``m`` before ``n``.
        common_dims: ``K_c``, one int for every pair, or a mapping ``{(m, n): K_c}`` with one
            entry per pair (keys in the order of ``views``); ``0 < K_c <= K``.
        lambd: weight of every off-diagonal term (paper: 0.0051).
        method: ``"dense"``, ``"cheap"`` or ``"auto"`` (cheap when ``N < K``; see the module
            docstring); the same value and gradient up to float32 rounding.

    Returns:
        :class:`MultimodalDeCURTerms`; ``.terms()`` flattens it for logging.

    Example:
        >>> views = {m: (torch.randn(16, 64), torch.randn(16, 64)) for m in ("s1", "s2", "dem")}
        >>> out = multimodal_decur_loss(views, common_dims=48)
        >>> list(out.common)
        [('s1', 's2'), ('s1', 'dem'), ('s2', 'dem')]
        >>> list(out.terms())[:5]
        ['total', 'intra_s1', 'intra_s2', 'intra_dem', 'common_s1_s2']
    """
    _check_method(method)
    checked = _check_views(views)
    names = list(checked)
    pairs = [(m, n) for i, m in enumerate(names) for n in names[i + 1 :]]
    n_samples, k = checked[names[0]][0].shape
    per_pair = _check_common_dims(common_dims, pairs, k)
    cheap = _use_cheap(method, n_samples, k)

    with torch.autocast(device_type=checked[names[0]][0].device.type, enabled=False):
        za = {m: standardize(v[0]) for m, v in checked.items()}
        zb = {m: standardize(v[1]) for m, v in checked.items() if v[1] is not None}
        zero = za[names[0]].new_zeros(())
        # cheap: Gram matrices of the (common, unique) column blocks of each view-1 batch, one
        # pair of N x N products per modality and distinct K_c, shared by all its pairs.
        block_grams: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}

        def grams(m: str, kc: int) -> tuple[Tensor, Tensor]:
            if (m, kc) not in block_grams:
                block_grams[(m, kc)] = (_gram(za[m][:, :kc]), _gram(za[m][:, kc:]))
            return block_grams[(m, kc)]

        common: dict[Pair, Tensor] = {}
        unique: dict[Pair, Tensor] = {}
        cross_diagonal: dict[Pair, Tensor] = {}
        for m, n in pairs:
            kc = per_pair[(m, n)]
            if cheap:
                (gmc, gmu), (gnc, gnu) = grams(m, kc), grams(n, kc)
                cc = _cheap_stats(za[m][:, :kc], za[n][:, :kc], gmc, gnc)
                cu = _cheap_stats(za[m][:, kc:], za[n][:, kc:], gmu, gnu)
            else:
                (cc, cu), _ = _dense_terms(za[m], za[n], None, kc)
            common[(m, n)] = _redundancy_loss(cc.diag, cc.frob_sq, True, lambd)
            unique[(m, n)] = _redundancy_loss(cu.diag, cu.frob_sq, False, lambd) if kc < k else zero
            cross_diagonal[(m, n)] = torch.cat([cc.diag, cu.diag])

        intra: dict[str, Tensor] = {}
        for m in names:
            if m not in zb:
                continue
            if cheap:
                gc, gu = next(v for key, v in block_grams.items() if key[0] == m)
                stats = _cheap_stats(za[m], zb[m], gc + gu, _gram(zb[m]))
            else:
                stats = _dense_stats(za[m], zb[m])
            intra[m] = _redundancy_loss(stats.diag, stats.frob_sq, True, lambd)

        total = zero
        for term in (*intra.values(), *common.values(), *unique.values()):
            total = total + term
        return MultimodalDeCURTerms(total, intra, common, unique, cross_diagonal)


def gather_with_grad(z: Tensor) -> Tensor:
    """Concatenate ``z`` from all ranks along the batch, keeping the gradient.

    The backward pass sums the gradients that every rank computes for each shard, so that,
    since every rank computes the same global loss, DDP's gradient average yields exactly the
    single-process gradient of the global batch. Returns ``z`` unchanged outside a
    multi-process run. Every rank must hold the same batch size (use ``drop_last=True``).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    from torch.distributed import nn as dist_nn

    return torch.cat(dist_nn.functional.all_gather(z.contiguous()), dim=0)


class DeCURLoss(nn.Module):
    """The DeCUR objective for ``M >= 2`` named modalities as a module, exact under any world size.

    Computes :func:`multimodal_decur_loss` (eq. 6 for two modalities, summed over every pair of
    modalities for more). With ``gather_distributed=True`` every embedding batch is gathered
    with gradient across ranks before standardisation, so with ``W`` ranks each holding
    ``N / W`` samples the loss equals the single-process loss on the global batch of ``N``, and
    the gradient that DDP applies equals the single-process gradient. (Reducing ``C`` across
    ranks instead, as Barlow Twins' and the authors' code do, standardises per rank and changes
    the loss.)

    Args:
        common_dims: ``K_c``, one int for every pair, or ``{(m, n): K_c}`` per pair.
        lambd: weight of every off-diagonal term (0.0051).
        method: ``"auto"``, ``"dense"`` or ``"cheap"``.
        weighting: ``"paper"`` (eq. 6, the sum of the terms) or ``"authors"`` (two modalities
            only: the released code's ``(L_M1 + L_M2 + (L_com + L_uni) / 2) / 3``).
        gather_distributed: gather embeddings across ranks (default on).

    Example:
        >>> criterion = DeCURLoss(common_dims=6)
        >>> views = {m: (torch.randn(8, 8, requires_grad=True), torch.randn(8, 8)) for m in ("s1", "s2", "dem")}
        >>> terms = criterion(views)
        >>> terms.total.backward()
        >>> sorted(terms.intra)
        ['dem', 's1', 's2']
    """

    def __init__(
        self,
        common_dims: CommonDims,
        lambd: float = DEFAULT_LAMBDA,
        *,
        method: Method = "auto",
        weighting: Weighting = "paper",
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        _check_method(method)
        if weighting not in ("paper", "authors"):
            raise ValueError(f"weighting must be 'paper' or 'authors', got {weighting!r}.")
        values = common_dims.values() if isinstance(common_dims, Mapping) else [common_dims]
        if any(int(v) <= 0 for v in values):
            raise ValueError(f"common_dims must be positive, got {common_dims}.")
        self.common_dims = common_dims
        self.lambd = lambd
        self.method: Method = method
        self.weighting: Weighting = weighting
        self.gather_distributed = gather_distributed

    def forward(self, views: Mapping[str, Sequence[Tensor | None]]) -> MultimodalDeCURTerms:
        """:class:`MultimodalDeCURTerms` of the (global) batch from ``{name: (view 1, view 2 or None)}``."""
        if self.gather_distributed:
            views = {
                name: tuple(None if z is None else gather_with_grad(z) for z in pair) for name, pair in views.items()
            }
        terms = multimodal_decur_loss(views, self.common_dims, self.lambd, self.method)
        if self.weighting == "paper":
            return terms
        if len(views) != 2:
            raise ValueError(
                f"weighting='authors' reproduces the released two-modality code; got {len(views)} modalities. "
                "Use weighting='paper'."
            )
        intra = sum(terms.intra.values(), terms.total.new_zeros(()))
        cross = sum(terms.common.values(), intra.new_zeros(())) + sum(terms.unique.values(), intra.new_zeros(()))
        return replace(terms, total=(intra + cross / 2) / 3)

    def extra_repr(self) -> str:
        return (
            f"common_dims={self.common_dims}, lambd={self.lambd}, method={self.method!r}, weighting={self.weighting!r}"
        )
