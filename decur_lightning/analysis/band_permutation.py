"""Band permutation importance of the common and unique embedding blocks.

The paper's band importance (Fig. 6b, Algorithm 2, :func:`~decur_lightning.analysis.saliency_analysis`)
attributes one scalar per block, the mean of the block's standardised dimensions, with Integrated
Gradients. Embedding dimensions carry their information with either sign, so that mean is a
near-arbitrary projection of the block, and gradients along one path say which bands move that
projection, not which bands the block's information comes from. Measured on the trained quickstart
(``examples/configs/quickstart.yaml``, 256 validation samples): of the 384 common dimensions, 119
correlate with the shared factor at r > 0.3 and 117 at r < -0.3; the block mean explains R^2 0.15
of the shared factor where a ridge probe of the block explains 0.99 (held out). Scored against the
data's known bands (:func:`~decur_lightning.analysis.band_truth_score`), the Integrated Gradients
importance reaches skill 0.09 / ranking 0.50 against 0.05 / 0.38 untrained.

:func:`band_permutation_importance` asks instead how much of the block's content depends on each
band: scramble one band across samples (every other band untouched) and measure how far the whole
block moves. On the same model: skill 0.27 / ranking 0.81 against 0.00 / 0.56 untrained (the
common blocks of both modalities sit on the shared bands; the optical unique block spreads over all
bands). It needs no gradients and no optional dependency (captum's ``FeaturePermutation`` scores the
difference of one scalar output per example, not the change of a block of dimensions).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .pairs import check_modality, modality_mapping, require_images
from .saliency import OUTPUT_NAMES, modality_common_dims

__all__ = ["band_permutation_importance"]


def _inputs(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], max_samples: int) -> dict[str, Tensor]:
    """Up to ``max_samples`` inputs ``{modality: (N, C, H, W)}`` of every modality of the model."""
    modalities = tuple(model.modalities)
    parts: dict[str, list[Tensor]] = {m: [] for m in modalities}
    count = 0
    for batch in batches:
        if count >= max_samples:
            break
        require_images(batch, modalities)
        take = max_samples - count
        for m in modalities:
            parts[m].append(batch[f"image_{m}"][:take].detach().cpu())
        count += parts[modalities[0]][-1].shape[0]
    if count < 2:
        raise ValueError(
            f"Band permutation importance permutes bands across samples: it needs at least 2 samples, got {count} "
            "(an empty dataloader, or max_samples < 2)."
        )
    return {m: torch.cat(parts[m]) for m in modalities}


def _cycle(n: int, generator: torch.Generator) -> Tensor:
    """A random permutation of ``n >= 2`` items without fixed points (one random cycle): every
    sample receives the band of another sample, so no permutation is wasted on the identity."""
    order = torch.randperm(n, generator=generator)
    permutation = torch.empty(n, dtype=torch.long)
    permutation[order] = order.roll(-1)
    return permutation


@torch.no_grad()
def _embed(model: nn.Module, x: Tensor, modality: str, chunk: int) -> Tensor:
    device = next(model.parameters()).device
    return torch.cat(
        [model.embed(x[i : i + chunk].to(device), modality).float().cpu() for i in range(0, len(x), chunk)]
    )


def band_permutation_importance(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    max_samples: int = 256,
    reference: Mapping[str, Tensor] | Tensor | None = None,
    repeats: int = 5,
    common_dims: int | Mapping[str, int] | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, dict[str, Tensor]]:
    """How much each input band drives the common and the unique block of each modality's
    embedding: permutation importance, the information-use counterpart of Fig. 6b.

    For modality ``m`` with standardised embedding ``z = (f_m(x) - mean) / std`` (``BN`` of
    Algorithm 2), common block ``z[:, :K_c]`` and unique block ``z[:, K_c:]``: for each band
    ``c``, band ``c`` of the ``N`` samples is permuted across the samples (a random cycle: each
    sample receives band ``c`` of another sample; the other bands stay),
    and the importance of ``c`` for a block is the block's mean squared change
    ``mean_i mean_{k in block} (z_k(x_perm)_i - z_k(x)_i)^2``, normalised over the bands (each
    row sums to 1, as :func:`~decur_lightning.analysis.band_importance`). A band the block
    ignores scores 0 whatever its values; a band whose content the block encodes scores high.

    How it differs from the paper's Algorithm 2 (Integrated Gradients of the *mean* of the
    block's standardised dimensions, :func:`~decur_lightning.analysis.saliency_analysis`): the
    dimensions encode factors with either sign, so their mean is a near-random projection of the
    block (it can even cancel a factor every dimension encodes), and its gradient along the path
    from a zero image measures local sensitivity of that projection, not where the block's
    information comes from. The permutation change uses every dimension of the block (squared,
    so signs cannot cancel) and the data's own distribution of each band (no out-of-distribution
    baseline). It is a population statistic (one value per band and permutation), not a
    per-sample map. The Algorithm-2 importance stays the paper's statistic (Fig. 6b); this one is
    the check against data with a known answer (:func:`~decur_lightning.analysis.band_truth_score`).

    Args:
        model: a :class:`~decur_lightning.ssl.DeCURModule` (``modalities``, ``embed``, common
            dimensions). Run in eval mode and restored.
        batches: un-augmented batches (a dataloader) with an ``image_<modality>`` per modality.
        max_samples: samples used (collected from the first batches); the permutations mix them.
        reference: ``{modality: (M, K)}`` embeddings (or one tensor for every modality) whose
            per-dimension mean and standard deviation standardise the embedding; default: the
            statistics of the ``max_samples`` unpermuted samples themselves.
        repeats: independent permutations; each gives one normalised row.
        common_dims: ``K_c`` of every modality, or ``{modality: K_c}``; default: the model's
            (:func:`~decur_lightning.analysis.modality_common_dims`).
        batch_size: samples per forward pass.
        seed: seed of the permutations (a local generator: the global random state is untouched).

    Returns:
        ``{modality: {"common": (repeats, C), "unique": (repeats, C)}}``, rows normalised to sum
        to 1 (a row of zeros when no band changes the block), in the form that
        :func:`~decur_lightning.analysis.band_truth_score` and
        :func:`~decur_lightning.analysis.band_importance_figure` take.

    Example:
        >>> scores = band_truth_score(band_permutation_importance(model, dm.val_dataloader()),
        ...                           dm.band_truth)  # doctest: +SKIP
    """
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"repeats must be a positive int (the number of permutations); got {repeats!r}.")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
    modalities = tuple(model.modalities)
    reference_of = modality_mapping(model, reference, "reference")
    counts_given = modality_mapping(model, common_dims, "common_dims")
    inputs = _inputs(model, batches, max_samples)
    generator = torch.Generator().manual_seed(int(seed))
    was_training = model.training
    model.eval()
    result: dict[str, dict[str, Tensor]] = {}
    try:
        for modality in modalities:
            name = check_modality(model, modality)
            x = inputs[name]
            kc = counts_given[name] if counts_given[name] is not None else modality_common_dims(model, name)
            z = _embed(model, x, name, batch_size)
            if not 0 < kc < z.shape[1]:
                raise ValueError(
                    f"common_dims={kc} of modality {name!r} must lie in [1, {z.shape[1] - 1}]: both a common and a "
                    "unique block are needed."
                )
            ref: Any = reference_of[name]
            stats = z if ref is None else torch.as_tensor(ref).detach().float().cpu()
            if stats.ndim != 2 or stats.shape[1] != z.shape[1]:
                raise ValueError(
                    f"reference of {name!r} must be (M, {z.shape[1]}) embeddings of this modality; got shape "
                    f"{tuple(stats.shape)}."
                )
            mean, std = stats.mean(0), (stats.var(0, unbiased=False) + 1e-5).sqrt()
            z = (z - mean) / std
            changes = torch.zeros(2, repeats, x.shape[1], dtype=torch.float64)
            for r in range(repeats):
                for c in range(x.shape[1]):
                    permuted = x.clone()
                    permuted[:, c] = x[_cycle(len(x), generator), c]
                    squared = ((_embed(model, permuted, name, batch_size) - mean) / std - z).double().pow(2)
                    changes[0, r, c] = squared[:, :kc].mean()
                    changes[1, r, c] = squared[:, kc:].mean()
            total = changes.sum(-1, keepdim=True)
            normalised = torch.where(total > 0, changes / total.clamp_min(1e-300), torch.zeros_like(changes))
            result[name] = {out: normalised[i].float() for i, out in enumerate(OUTPUT_NAMES)}
    finally:
        model.train(was_training)
    return result
