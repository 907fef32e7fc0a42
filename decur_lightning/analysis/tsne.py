"""t-SNE of embedding *dimensions* (paper Fig. 1, Fig. 8; Algorithm 2, ``tsne_vis``).

Each embedding dimension is one point: ``N`` samples are embedded by both modalities,
``(N, K)`` each, the two are concatenated to ``(N, 2K)`` and transposed, so every dimension of
every modality becomes a point with ``N`` features (its values over the samples). Points are
then marked common / unique x modality 1 / 2. For DeCUR the common dimensions of the two
modalities overlap, while the unique dimensions form a separate cluster per modality.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..losses import standardize
from .plotting import new_figure

__all__ = ["DimensionTSNE", "dimension_tsne", "dimension_tsne_figure"]


@dataclass
class DimensionTSNE:
    """A 2-d t-SNE map of the ``2K`` embedding dimensions of two modalities.

    Attributes:
        coordinates: ``(2K, 2)`` t-SNE coordinates; rows ``0..K-1`` are modality 1's dimensions,
            rows ``K..2K-1`` modality 2's, in embedding order.
        modality: ``(2K,)`` modality index of each point, 1 or 2.
        common: ``(2K,)`` ``True`` for the common dimensions (index below ``K_c``).
        common_dims: ``K_c`` (``None`` when no decoupling: all points are drawn alike).
    """

    coordinates: np.ndarray
    modality: np.ndarray
    common: np.ndarray
    common_dims: int | None


def dimension_tsne(
    z1: Tensor,
    z2: Tensor,
    common_dims: int | None,
    perplexity: float = 30.0,
    seed: int = 0,
    max_iter: int = 1000,
    num_threads: int | None = None,
) -> DimensionTSNE:
    """t-SNE of the ``2K`` embedding dimensions of ``z1, z2`` (``(N, K)`` each; Algorithm 2).

    Each dimension is standardised over the ``N`` samples (the ``BN`` of Algorithm 2), so a
    point's position depends on the pattern of its values across samples, not on their scale.
    Uses scikit-learn's :class:`~sklearn.manifold.TSNE` (PCA initialisation, fixed seed); the
    perplexity is capped at ``(2K - 1) / 3`` so small embeddings work.

    Args:
        z1, z2: un-augmented embeddings of the same ``N`` samples by modality 1 and 2
            (:func:`~decur_lightning.analysis.collect_embeddings`).
        common_dims: ``K_c``: the first ``K_c`` dimensions are common.
        perplexity: t-SNE perplexity.
        seed: t-SNE random state.
        max_iter: t-SNE iterations.
        num_threads: cap on scikit-learn's OpenMP threads (threadpoolctl); ``None`` keeps its
            default. On shared or busy machines ``1`` can be many times faster.
    """
    try:
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits
    except ImportError as err:
        raise ImportError(
            "The t-SNE analysis needs scikit-learn: pip install decur-lightning[analysis]"
        ) from err
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(
            f"Expected two embedding batches of the same shape (N >= 2, K); got {tuple(z1.shape)} and {tuple(z2.shape)}."
        )
    num_dims = z1.shape[1]
    if common_dims is not None and not 0 < common_dims <= num_dims:
        raise ValueError(f"common_dims must lie in 1..{num_dims} (the embedding size); got {common_dims}.")
    if 2 * num_dims < 4:
        raise ValueError(f"t-SNE needs at least 4 points; got 2 x {num_dims} dimensions.")
    points = torch.cat([standardize(z1), standardize(z2)], dim=1).T.contiguous()  # (2K, N)
    perplexity = min(float(perplexity), (2 * num_dims - 1) / 3.0)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=max_iter)
    with threadpool_limits(limits=num_threads, user_api="openmp"):
        coordinates = tsne.fit_transform(points.double().cpu().numpy())
    index = np.arange(num_dims)
    is_common = index < (num_dims if common_dims is None else common_dims)
    return DimensionTSNE(
        coordinates=coordinates,
        modality=np.repeat(np.array([1, 2]), num_dims),
        common=np.concatenate([is_common, is_common]),
        common_dims=common_dims,
    )


def dimension_tsne_figure(
    result: DimensionTSNE,
    modality_names: tuple[str, str] = ("modality 1", "modality 2"),
    title: str = "t-SNE of embedding dimensions",
) -> Figure:
    """Scatter plot of :func:`dimension_tsne` (Fig. 1, Fig. 8).

    Common dimensions in red shades, unique in blue shades; modality 1 as circles, modality 2
    as triangles.
    """
    styles = {
        (1, True): ("tab:red", "o"),
        (2, True): ("lightcoral", "^"),
        (1, False): ("tab:blue", "o"),
        (2, False): ("lightskyblue", "^"),
    }
    fig, ax = new_figure(width=6.0, height=5.0)
    groups = [(1, True), (2, True)] if result.common_dims is None else list(styles)
    for modality, common in groups:
        mask = result.modality == modality
        if result.common_dims is not None:
            mask &= result.common == common
        if not mask.any():
            continue
        color, marker = styles[(modality, common)]
        kind = "" if result.common_dims is None else ("common" if common else "unique")
        label = f"{modality_names[modality - 1]} {kind}".strip()
        ax.scatter(*result.coordinates[mask].T, s=10, c=color, marker=marker, alpha=0.7, label=label, linewidths=0)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=2, fontsize="small")
    fig.tight_layout()
    return fig
