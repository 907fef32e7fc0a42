"""t-SNE of embedding *dimensions* (paper Fig. 1, Fig. 8; Algorithm 2, ``tsne_vis``).

Each embedding dimension is one point: ``N`` samples are embedded by every modality,
``(N, K)`` each, these are concatenated to ``(N, M K)`` and transposed, so every dimension of
every modality becomes a point with ``N`` features (its values over the samples). Points are
then marked common / unique and by modality name. For DeCUR the common dimensions of the
modalities overlap, while the unique dimensions form a separate cluster per modality.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..losses import standardize
from .pairs import pair_suffix
from .plotting import new_figure

__all__ = ["DimensionTSNE", "dimension_tsne", "dimension_tsne_figure", "tsne_groups"]


@dataclass
class DimensionTSNE:
    """A 2-d t-SNE map of the ``M x K`` embedding dimensions of ``M`` modalities.

    Attributes:
        coordinates: ``(M K, 2)`` t-SNE coordinates; rows ``i K .. (i + 1) K - 1`` are the
            dimensions of modality ``modalities[i]``, in embedding order.
        modality: ``(M K,)`` name of the modality of each point.
        common: ``(M K,)`` ``True`` for the common dimensions (index below ``K_c``).
        common_dims: ``K_c`` (``None`` when no decoupling: all points are drawn alike).
        modalities: the modality names, in order.
    """

    coordinates: np.ndarray
    modality: np.ndarray
    common: np.ndarray
    common_dims: int | None
    modalities: tuple[str, ...]


def dimension_tsne(
    embeddings: Mapping[str, Tensor],
    common_dims: int | None,
    perplexity: float = 30.0,
    seed: int = 0,
    max_iter: int = 1000,
    num_threads: int | None = None,
) -> DimensionTSNE:
    """t-SNE of the embedding dimensions of every given modality, in one map (Algorithm 2).

    Each modality's ``(N, K)`` embeddings of the same ``N`` samples are concatenated to
    ``(N, M K)`` and transposed, so each dimension of each modality is one point described by
    its ``N`` values. Each dimension is standardised over the samples (the ``BN`` of
    Algorithm 2), so a point's position depends on the pattern of its values across samples,
    not on their scale. Uses scikit-learn's :class:`~sklearn.manifold.TSNE` (PCA
    initialisation, fixed seed); the perplexity is capped at ``(M K - 1) / 3`` so small
    embeddings work.

    Args:
        embeddings: ``{name: (N, K)}`` un-augmented embeddings of two or more modalities
            (:func:`~decur_lightning.analysis.collect_embeddings`), in the order to draw them.
        common_dims: ``K_c``: the first ``K_c`` dimensions of every modality are common
            (``None``: no decoupling).
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
        raise ImportError("The t-SNE analysis needs scikit-learn: pip install decur-lightning[analysis]") from err
    if not isinstance(embeddings, Mapping):
        raise TypeError(
            f"embeddings must be a mapping modality name -> (N, K) embeddings (what collect_embeddings returns); "
            f"got {type(embeddings).__name__}."
        )
    names = tuple(embeddings)
    shapes = {name: tuple(z.shape) for name, z in embeddings.items()}
    first = next(iter(embeddings.values()), None)
    if len(names) < 2 or len(set(shapes.values())) != 1 or first.ndim != 2 or first.shape[0] < 2:
        raise ValueError(
            f"Expected embeddings of two or more modalities with the same shape (N >= 2, K); got {shapes}."
        )
    num_dims = first.shape[1]
    if common_dims is not None and not 0 < common_dims <= num_dims:
        raise ValueError(f"common_dims must lie in 1..{num_dims} (the embedding size); got {common_dims}.")
    num_points = len(names) * num_dims
    if num_points < 4:
        raise ValueError(f"t-SNE needs at least 4 points; got {len(names)} x {num_dims} dimensions.")
    points = torch.cat([standardize(embeddings[name]) for name in names], dim=1).T.contiguous()  # (M K, N)
    perplexity = min(float(perplexity), (num_points - 1) / 3.0)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=max_iter)
    with threadpool_limits(limits=num_threads, user_api="openmp"):
        coordinates = tsne.fit_transform(points.double().cpu().numpy())
    is_common = np.arange(num_dims) < (num_dims if common_dims is None else common_dims)
    return DimensionTSNE(
        coordinates=coordinates,
        modality=np.repeat(np.array(names), num_dims),
        common=np.tile(is_common, len(names)),
        common_dims=common_dims,
        modalities=names,
    )


def tsne_groups(
    modalities: Sequence[str], common: Mapping[tuple[str, str], int | None]
) -> dict[str, tuple[tuple[str, ...], int | None]]:
    """Which t-SNE maps to draw: ``{file suffix: (modalities, K_c)}``.

    One map of every modality (suffix ``""``) when all pairs share one ``K_c`` (or none has
    common dimensions); else one map per pair (suffix ``"_<m>_<n>"``), since the common block
    of a modality then depends on the pair.

    Args:
        modalities: the names, in order.
        common: ``K_c`` of every pair ``(m, n)`` (``None`` without decoupling).
    """
    counts = set(common.values())
    if len(counts) <= 1:
        return {"": (tuple(modalities), next(iter(counts), None))}
    return {pair_suffix(pair, len(common)): (pair, kc) for pair, kc in common.items()}


#: Markers of the modalities, in order.
MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")
#: Colours of the first two modalities' common / unique points (the paper's Fig. 1); more
#: modalities get shades of the ``Reds`` / ``Blues`` colour maps.
_TWO = {"common": ("tab:red", "lightcoral"), "unique": ("tab:blue", "lightskyblue")}


def _shades(kind: str, count: int) -> list[Any]:
    if count <= 2:
        return list(_TWO[kind][:count])
    cmap = matplotlib.colormaps["Reds" if kind == "common" else "Blues"]
    return [cmap(value) for value in np.linspace(0.95, 0.4, count)]


def dimension_tsne_figure(result: DimensionTSNE, title: str = "t-SNE of embedding dimensions") -> Figure:
    """Scatter plot of :func:`dimension_tsne` (Fig. 1, Fig. 8).

    Common dimensions in red shades, unique in blue shades, one shade and one marker per
    modality (circles, triangles, squares, ...); legend entries ``"<modality> common"`` /
    ``"<modality> unique"`` (``"<modality>"`` without decoupling).
    """
    names = result.modalities
    kinds = ["common"] if result.common_dims is None else ["common", "unique"]
    colors = {kind: _shades(kind, len(names)) for kind in kinds}
    fig, ax = new_figure(width=6.0, height=5.0)
    for kind in kinds:
        for index, name in enumerate(names):
            mask = result.modality == name
            if result.common_dims is not None:
                mask &= result.common == (kind == "common")
            if not mask.any():
                continue
            label = name if result.common_dims is None else f"{name} {kind}"
            ax.scatter(
                *result.coordinates[mask].T,
                s=10,
                color=colors[kind][index],
                marker=MARKERS[index % len(MARKERS)],
                alpha=0.7,
                label=label,
                linewidths=0,
            )
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=2, fontsize="small")
    fig.tight_layout()
    return fig
