"""Estimating DeCUR's share of common dimensions without the grid search (paper, Section 5).

DeCUR splits each modality's ``K`` embedding dimensions into ``K_c`` common and ``K - K_c``
unique ones; the paper finds the share ``K_c / K`` by a grid search of full pretraining runs
(Fig. 3a, 4) and names "a more efficient discovering strategy" as future work. The share that
suits a pair of modalities is the share of each modality's information the other one also
carries. :func:`estimate_common_ratio` measures that share on features or embeddings of the two
modalities for the same samples, from one network (even an untrained one), in seconds:

* ``"predictability"`` (default): the share of a modality's feature variance that the other
  modality's features predict linearly on held-out samples (ridge regression, both directions,
  averaged). With features that are (close to) linear in the latent factors, the variance of
  modality ``m`` splits into a part from shared factors, which ``n``'s features predict, a part
  from ``m``'s private factors and noise, which they do not. It measures the *variance* share,
  which equals the share of information when the factors contribute comparable variance.
* ``"alignment"``: the share of embedding dimensions whose cross-modal correlation reaches
  ``threshold`` (eq. 7's ``C_ii``), e.g. on the embeddings of one cross-modal Barlow Twins or
  DeCUR-without-decoupling run, which push every dimension towards alignment: the dimensions
  that stay unaligned are what the other modality cannot explain.

Both are measured against the known answer and the grid search's best on synthetic data in
``docs/decoupling.md`` (``python examples/decoupling_benchmark.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from .alignment import alignment_loss_per_dimension
from .decoupling import ridge_r2, select_alpha, standardize

__all__ = ["CommonRatioEstimate", "EstimatorMethod", "estimate_common_ratio"]

#: How :func:`estimate_common_ratio` measures the common share.
EstimatorMethod = Literal["predictability", "alignment"]


@dataclass
class CommonRatioEstimate:
    """The result of :func:`estimate_common_ratio`.

    Attributes:
        ratio: the estimated share of common dimensions ``K_c / K`` in [0, 1] (for
            :class:`~decur_lightning.ssl.DeCURModule`'s ``common_ratio``, which needs > 0).
        per_direction: ``{"m<-n": share, "n<-m": share}`` for ``"predictability"`` (the share of
            the first modality's variance predicted by the second); empty for ``"alignment"``.
        per_dimension: ``"alignment"``: the ``(K,)`` cross-modal correlations ``C_ii``;
            ``"predictability"``: the held-out ``R^2`` of each principal component of the first
            modality predicted from the second (``(P,)``).
        method: the method used.
    """

    ratio: float
    method: str
    per_direction: dict[str, float] = field(default_factory=dict)
    per_dimension: Tensor | None = None

    def common_ratio(self, minimum: float = 1.0 / 16) -> float:
        """``ratio`` floored at ``minimum`` (DeCUR needs at least one common dimension)."""
        return max(float(self.ratio), minimum)


def _principal_components(train: Tensor, test: Tensor, variance: float) -> tuple[Tensor, Tensor, Tensor]:
    """Standardised features projected on the principal components that explain ``variance``."""
    train, test = standardize(train, test)
    _, s, vh = torch.linalg.svd(train, full_matrices=False)
    explained = s.pow(2) / s.pow(2).sum()
    keep = int(torch.searchsorted(explained.cumsum(0), torch.tensor(variance, dtype=explained.dtype)).item()) + 1
    keep = min(keep, vh.shape[0])
    return train @ vh[:keep].T, test @ vh[:keep].T, explained[:keep]


def _predicted_share(
    x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, variance: float, alpha: float | None
) -> tuple[float, Tensor]:
    """Share of ``y``'s variance (on its principal components) that ``x`` predicts on the test split."""
    y_tr, y_te, weight = _principal_components(y_train, y_test, variance)
    if alpha is None:  # ridge penalty chosen on a hold-out of the fitting split, never on the test split
        alpha = select_alpha(x_train, y_tr, weights=weight)
    r2 = ridge_r2(x_train, y_tr, x_test, y_te, alpha).double().clamp(0.0, 1.0)
    return float((r2 * weight).sum() / weight.sum()), r2.float()


def estimate_common_ratio(
    z_m: Tensor,
    z_n: Tensor,
    method: EstimatorMethod = "predictability",
    threshold: float = 0.5,
    holdout: float = 0.5,
    variance: float = 0.99,
    alpha: float | None = None,
    z_m_view: Tensor | None = None,
    z_n_view: Tensor | None = None,
) -> CommonRatioEstimate:
    """Estimate the share of common dimensions ``K_c / K`` for two modalities from their features.

    DeCUR (eq. 6, Algorithm 1) asks ``K_c`` dimensions to align across modalities and the other
    ``K - K_c`` to decorrelate; the right share is the share of a modality's information the
    other modality also carries (the paper finds it by grid search, Fig. 3a and 4, and leaves a
    cheaper strategy to future work). This estimates it from features of the same samples in
    both modalities (un-augmented), e.g. the frozen encoder features of one run or of untrained
    encoders (:func:`~decur_lightning.analysis.decoupling.extract_features`), or embeddings
    (:func:`~decur_lightning.analysis.collect_embeddings`).

    Args:
        z_m, z_n: ``(N, D_m)`` and ``(N, D_n)`` features of the same ``N`` samples (use several
            times more samples than feature dimensions for ``"predictability"``).
        method: ``"predictability"``: the share of each modality's feature variance (over its
            principal components explaining ``variance`` of it) that a ridge regression from the
            other modality's features predicts on the held-out ``holdout`` share of the samples
            (``R^2`` per component, clipped to [0, 1], weighted by the component's variance),
            averaged over both directions. ``"alignment"``: the share of dimensions whose
            cross-modal correlation ``C_ii`` (eq. 7, on all samples) is at least ``threshold``;
            needs embeddings of equal width trained to align (cross-modal Barlow Twins, or
            DeCUR with ``common_ratio=1``).
        threshold: the ``"alignment"`` method's correlation threshold.
        holdout: the share of samples the ``"predictability"`` regression is scored on (the
            first ``1 - holdout`` share fits it; shuffle the samples beforehand if their order
            means something).
        variance: the share of each modality's variance whose principal components are kept.
        alpha: ridge penalty (relative to the number of samples); ``None`` selects it from
            :data:`~decur_lightning.analysis.decoupling.ALPHAS` on a hold-out of the fitting part
            (:func:`~decur_lightning.analysis.decoupling.select_alpha`, scored as the estimate is).
        z_m_view, z_n_view: optional features of another view of the same samples in each
            modality (e.g. cropped and rotated; ``"predictability"`` only). Then each
            modality's share predicted by the other modality is divided by the share predicted
            by its own other view: the share of the *reliable* variance (what survives a change
            of view) that the other modality explains, so that noise and view-specific variance
            (pixel phase, position) do not count as private information.

    Returns:
        a :class:`CommonRatioEstimate`; ``.common_ratio()`` floors it for ``DeCURModule``.

    Raises:
        ValueError: different numbers of samples, too few samples, an unknown method, or
            (``"alignment"``) embeddings of different widths.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> shared, own_m, own_n = (torch.randn(2000, 3, generator=g) for _ in range(3))
        >>> mix = torch.randn(6, 32, generator=g)
        >>> z_m = torch.cat([shared, own_m], 1) @ mix  # half of each modality's factors shared
        >>> z_n = torch.cat([shared, own_n], 1) @ torch.randn(6, 32, generator=g)
        >>> round(estimate_common_ratio(z_m, z_n).ratio, 1)
        0.5
    """
    if method not in get_args(EstimatorMethod):
        raise ValueError(f"method must be one of {get_args(EstimatorMethod)}; got {method!r}.")
    if z_m.ndim != 2 or z_n.ndim != 2 or z_m.shape[0] != z_n.shape[0]:
        raise ValueError(
            f"Expected features (N, D) of the same N samples in both modalities; got {tuple(z_m.shape)} and "
            f"{tuple(z_n.shape)}."
        )
    z_m, z_n = z_m.detach().double().cpu(), z_n.detach().double().cpu()
    if method == "alignment":
        if z_m.shape != z_n.shape:
            raise ValueError(
                f"The alignment method compares dimension i of one modality with dimension i of the other: give "
                f"embeddings of equal width; got {tuple(z_m.shape)} and {tuple(z_n.shape)}."
            )
        corr = 1.0 - alignment_loss_per_dimension(z_m.float(), z_n.float()).sqrt()
        return CommonRatioEstimate(
            ratio=float((corr >= threshold).double().mean()), method=method, per_dimension=corr.float()
        )
    n = z_m.shape[0]
    cut = int(round(n * (1.0 - holdout)))
    if cut < 8 or n - cut < 8:
        raise ValueError(f"Need at least 8 samples on each side of the hold-out; got {n} samples, holdout={holdout}.")

    def split(x: Tensor) -> tuple[Tensor, Tensor]:
        return standardize(x[:cut], x[cut:])

    if (z_m_view is None) != (z_n_view is None):
        raise ValueError("Give the other view of both modalities (z_m_view and z_n_view), or of neither.")
    for view, z in ((z_m_view, z_m), (z_n_view, z_n)):
        if view is not None and view.shape != z.shape:
            raise ValueError(
                f"A view's features must have the shape of the modality's; got {tuple(view.shape)} and {tuple(z.shape)}."
            )
    (m_tr, m_te), (n_tr, n_te) = split(z_m), split(z_n)
    share_m, r2_m = _predicted_share(n_tr, z_m[:cut], n_te, z_m[cut:], variance, alpha)
    share_n, _ = _predicted_share(m_tr, z_n[:cut], m_te, z_n[cut:], variance, alpha)
    directions = {"m<-n": share_m, "n<-m": share_n}
    if z_m_view is not None and z_n_view is not None:
        (mv_tr, mv_te), (nv_tr, nv_te) = split(z_m_view.detach().cpu()), split(z_n_view.detach().cpu())
        reliable_m, _ = _predicted_share(mv_tr, z_m[:cut], mv_te, z_m[cut:], variance, alpha)
        reliable_n, _ = _predicted_share(nv_tr, z_n[:cut], nv_te, z_n[cut:], variance, alpha)
        directions.update({"m<-m_view": reliable_m, "n<-n_view": reliable_n})
        share_m = min(share_m / max(reliable_m, 1e-12), 1.0)
        share_n = min(share_n / max(reliable_n, 1e-12), 1.0)
    return CommonRatioEstimate(
        ratio=(share_m + share_n) / 2,
        method=method,
        per_direction=directions,
        per_dimension=r2_m,
    )
