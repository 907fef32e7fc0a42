"""Cross-modal alignment per embedding dimension (paper eq. 7, Fig. 5a, Fig. 7).

``L_i = (1 - C_ii)^2`` for every dimension ``i`` of the cross-modal correlation ``C`` of
un-augmented embeddings of two modalities (Algorithm 2, ``alignment_histogram``), for every
pair of a model's modalities (:func:`alignment_for_model`). For
DeCUR the common dimensions should sit near 0 and the unique ones near 1; a cross-modal
Barlow Twins model, which treats every dimension as common, keeps a tail of badly aligned
dimensions (Fig. 5a).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from ..losses import standardize
from .pairs import check_modality, model_pairs, require_images
from .plotting import COLORS, new_figure, save_figure

__all__ = [
    "alignment_for_model",
    "alignment_histogram_figure",
    "alignment_loss_per_dimension",
    "alignment_per_pair",
    "alignment_statistics",
    "collect_embeddings",
    "plot_alignment_histogram",
    "summarize",
]


def alignment_loss_per_dimension(z_m: Tensor, z_n: Tensor) -> Tensor:
    """``L_i = (1 - C_ii)^2`` for every embedding dimension ``i`` (eq. 7).

    ``C`` is the cross-modal correlation of the standardised embeddings ``z_m, z_n`` (``(N, K)``
    each) of the same samples by two modalities. 0 means the two modalities agree perfectly in
    that dimension; 1 means they are uncorrelated (what DeCUR asks of the unique dimensions).

    Example:
        >>> z = torch.randn(64, 8)
        >>> alignment_loss_per_dimension(z, z).abs().max() < 1e-5
        tensor(True)
    """
    if not isinstance(z_m, Tensor) or not isinstance(z_n, Tensor):
        raise TypeError(
            f"Expected two embedding tensors (N, K); got {type(z_m).__name__} and {type(z_n).__name__}. "
            "collect_embeddings returns a dict name -> embeddings: pass embeddings['<m>'], embeddings['<n>'], "
            "or use alignment_per_pair(embeddings)."
        )
    if z_m.shape != z_n.shape or z_m.ndim != 2 or z_m.shape[0] < 2:
        raise ValueError(
            f"Expected two embedding batches of the same shape (N >= 2, K); got {tuple(z_m.shape)} and {tuple(z_n.shape)}."
        )
    diag = (standardize(z_m) * standardize(z_n)).mean(0)
    return (1.0 - diag).pow(2)


@torch.no_grad()
def collect_embeddings(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    max_samples: int = 512,
    modalities: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Projector embeddings ``{name: (N, K)}`` of up to ``max_samples`` samples (no views).

    ``model`` is a :class:`~decur_lightning.ssl.base.MultimodalSSLModule`; the batches are
    dicts with an ``image_<name>`` tensor per modality. The model is run in eval mode and
    restored.

    Args:
        model: the module.
        batches: un-augmented batches (a dataloader).
        max_samples: number of samples to embed.
        modalities: names of the modalities to embed (default: all of the model's, in order).
    """
    names = [check_modality(model, name) for name in modalities] if modalities is not None else list(model.modalities)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: dict[str, list[Tensor]] = {name: [] for name in names}
    count = 0
    try:
        for batch in batches:
            require_images(batch, names)
            for name in names:
                parts[name].append(model.embed(batch[f"image_{name}"].to(device), name).float().cpu())
            count += parts[names[0]][-1].shape[0]
            if count >= max_samples:
                break
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("No batches to embed: the dataloader is empty.")
    return {name: torch.cat(values)[:max_samples] for name, values in parts.items()}


def alignment_per_pair(
    embeddings: Mapping[str, Tensor], pairs: Sequence[tuple[str, str]] | None = None
) -> dict[tuple[str, str], Tensor]:
    """Eq. 7 for every pair of modalities: ``{(m, n): (K,)}``.

    Args:
        embeddings: ``{name: (N, K)}`` embeddings of the same samples (:func:`collect_embeddings`).
        pairs: the pairs (default: every pair, in the mapping's order).
    """
    names = list(embeddings)
    if pairs is None:
        pairs = [(m, n) for i, m in enumerate(names) for n in names[i + 1 :]]
    if not pairs:
        raise ValueError(f"Cross-modal alignment needs at least two modalities; got {names}.")
    result = {}
    for m, n in pairs:
        for name in (m, n):
            if name not in embeddings:
                raise ValueError(f"No embeddings of modality {name!r}; there are {names}.")
        result[(m, n)] = alignment_loss_per_dimension(embeddings[m], embeddings[n])
    return result


def alignment_for_model(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]], max_samples: int = 512
) -> dict[tuple[str, str], Tensor]:
    """Eq. 7 for every embedding dimension and every pair of modalities of ``model``:
    ``{(m, n): (K,)}``, on up to ``max_samples`` samples.

    Works for any :class:`~decur_lightning.ssl.base.MultimodalSSLModule` (DeCUR or a
    baseline such as cross-modal Barlow Twins), so a DeCUR model and a comparison model can
    be measured on the same batches and drawn together (Fig. 5a):

    Example:
        >>> decur = alignment_for_model(decur_model, loader)[("sar", "optical")]  # doctest: +SKIP
        >>> barlow = alignment_for_model(barlow_model, loader)[("sar", "optical")]  # doctest: +SKIP
        >>> plot_alignment_histogram(decur, decur_model.common_dims, "fig5a.png",
        ...                          comparison=barlow, comparison_label="cross-modal BT")  # doctest: +SKIP
    """
    pairs = model_pairs(model)
    if not pairs:
        raise ValueError(
            f"{type(model).__name__} has one modality ({list(model.modalities)}): cross-modal alignment needs two or more."
        )
    embeddings = collect_embeddings(model, batches, max_samples)
    count = next(iter(embeddings.values())).shape[0]
    if count < 2:
        raise ValueError(
            f"Got {count} sample: the correlation of eq. 7 needs at least 2 (use max_samples >= 2 "
            "and a dataloader with at least 2 samples)."
        )
    return alignment_per_pair(embeddings, pairs)


def summarize(values: Tensor) -> dict[str, float | int]:
    """Count, mean, std, min, quartiles and max of the finite values of a tensor (JSON-ready
    floats; NaNs, e.g. undefined overlap scores, are left out of all of them)."""
    values = values.detach().double().flatten().cpu()
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return {"count": 0}
    quantiles = torch.quantile(values, torch.tensor([0.25, 0.5, 0.75], dtype=values.dtype)).tolist()
    return {
        "count": int(values.numel()),
        "mean": float(values.mean()),
        "std": float(values.std(unbiased=False)),
        "min": float(values.min()),
        "q25": quantiles[0],
        "median": quantiles[1],
        "q75": quantiles[2],
        "max": float(values.max()),
    }


def alignment_statistics(alignment: Tensor, common_dims: int | None) -> dict[str, dict[str, float | int]]:
    """Summaries of eq. 7 over all, common (first ``K_c``) and unique (the rest) dimensions.

    ``common_dims=None`` (a model without decoupling) gives only ``"all"``.
    """
    stats = {"all": summarize(alignment)}
    if common_dims is not None:
        stats["common"] = summarize(alignment[:common_dims])
        stats["unique"] = summarize(alignment[common_dims:])
    return stats


def alignment_histogram_figure(
    alignment: Tensor,
    common_dims: int | None,
    comparison: Tensor | None = None,
    comparison_label: str = "comparison",
    title: str = "Cross-modal alignment per dimension (eq. 7)",
    bins: int = 40,
) -> Figure:
    """The histogram of :func:`plot_alignment_histogram` as a figure (for notebooks and loggers)."""
    values = alignment.detach().float().cpu()
    top = max(1.5, float(values.max()) if values.numel() else 1.5)
    if comparison is not None and comparison.numel():
        top = max(top, float(comparison.detach().float().max()))
    edges = torch.linspace(0.0, top, bins + 1).tolist()
    fig, ax = new_figure()
    if common_dims is None:
        ax.hist(values.numpy(), bins=edges, color=COLORS["all"], alpha=0.8, label=f"all dimensions ({values.numel()})")
    else:
        common = values[:common_dims]
        ax.hist(common.numpy(), bins=edges, color=COLORS["common"], alpha=0.7, label=f"common ({common.numel()})")
        if common_dims < values.numel():
            unique = values[common_dims:]
            ax.hist(unique.numpy(), bins=edges, color=COLORS["unique"], alpha=0.7, label=f"unique ({unique.numel()})")
    if comparison is not None:
        ax.hist(
            comparison.detach().float().cpu().numpy(),
            bins=edges,
            histtype="step",
            linewidth=1.5,
            color=COLORS["comparison"],
            label=comparison_label,
        )
    ax.set_xlabel(r"alignment loss $(1 - C_{ii})^2$")
    ax.set_ylabel("number of dimensions")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_alignment_histogram(
    alignment: Tensor,
    common_dims: int | None,
    path: str | Path,
    comparison: Tensor | None = None,
    comparison_label: str = "comparison",
    title: str = "Cross-modal alignment per dimension (eq. 7)",
    bins: int = 40,
) -> Path:
    """Histogram of per-dimension alignment losses, common and unique dimensions apart (Fig. 5a).

    Args:
        alignment: ``(K,)`` output of :func:`alignment_loss_per_dimension`.
        common_dims: ``K_c``; the first ``K_c`` dimensions are drawn as "common", the rest as
            "unique". ``None`` draws all dimensions as one group.
        path: the PNG to write.
        comparison: optional ``(K,)`` alignment of another model (e.g. cross-modal Barlow
            Twins, all dimensions common), drawn as an outline.
        comparison_label: legend label of ``comparison``.

    Returns:
        The path written.
    """
    fig = alignment_histogram_figure(alignment, common_dims, comparison, comparison_label, title, bins)
    return save_figure(fig, path)
