"""Cross-modal alignment per embedding dimension (paper eq. 7, Fig. 5a)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..losses import standardize

__all__ = ["alignment_loss_per_dimension", "collect_embeddings", "plot_alignment_histogram"]


def alignment_loss_per_dimension(z1: Tensor, z2: Tensor) -> Tensor:
    """``L_i = (1 - C_ii)^2`` for every embedding dimension ``i`` (eq. 7).

    ``C`` is the cross-modal correlation of the standardised embeddings ``z1, z2`` (``(N, K)``
    each). 0 means the two modalities agree perfectly in that dimension; 1 means they are
    uncorrelated (what DeCUR asks of the unique dimensions).

    Example:
        >>> z = torch.randn(64, 8)
        >>> alignment_loss_per_dimension(z, z).abs().max() < 1e-5
        tensor(True)
    """
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(
            f"Expected two embedding batches of the same shape (N >= 2, K); got {tuple(z1.shape)} and {tuple(z2.shape)}."
        )
    diag = (standardize(z1) * standardize(z2)).mean(0)
    return (1.0 - diag).pow(2)


@torch.no_grad()
def collect_embeddings(
    model: nn.Module, batches: Iterable[dict[str, Tensor]], max_samples: int = 512
) -> tuple[Tensor, Tensor]:
    """Projector embeddings of both modalities for up to ``max_samples`` samples (no views).

    ``model`` is a :class:`~decur_lightning.ssl.base.MultimodalSSLModule`; the batches are
    dicts with its two ``image_<modality>`` keys. The model is run in eval mode and restored.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    z1, z2, count = [], [], 0
    try:
        for batch in batches:
            x1, x2 = (batch[f"image_{name}"].to(device) for name in model.modalities)
            z1.append(model.embed(x1, 1).float().cpu())
            z2.append(model.embed(x2, 2).float().cpu())
            count += x1.shape[0]
            if count >= max_samples:
                break
    finally:
        model.train(was_training)
    if not z1:
        raise ValueError("No batches to embed: the dataloader is empty.")
    return torch.cat(z1)[:max_samples], torch.cat(z2)[:max_samples]


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = alignment.detach().float().cpu()
    edges = torch.linspace(0.0, max(1.5, float(values.max()) if values.numel() else 1.5), bins + 1).tolist()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if common_dims is None:
        ax.hist(values.numpy(), bins=edges, color="tab:gray", alpha=0.8, label="all dimensions")
    else:
        ax.hist(values[:common_dims].numpy(), bins=edges, color="tab:red", alpha=0.7, label=f"common ({common_dims})")
        if common_dims < values.numel():
            unique = values[common_dims:]
            ax.hist(unique.numpy(), bins=edges, color="tab:blue", alpha=0.7, label=f"unique ({unique.numel()})")
    if comparison is not None:
        ax.hist(comparison.detach().float().cpu().numpy(), bins=edges, histtype="step", color="black", label=comparison_label)
    ax.set_xlabel(r"alignment loss $(1 - C_{ii})^2$")
    ax.set_ylabel("number of dimensions")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
