"""Measuring decoupling on data with known factors (issue: the paper's claim, tested).

The synthetic datamodule renders each sample from *shared* factors (seen by both modalities)
and *private* factors (seen by one). A good multimodal representation should let a linear
probe on a modality's frozen encoder features recover the shared factors **and** that
modality's private factors. The paper's claim (Sections 1, 3.1, Fig. 5) is that cross-modal
objectives lose modality-private information that DeCUR keeps through its unique dimensions
and intra-modal terms.

The probes are closed-form ridge regressions from standardised features to the factors, fit on
one split and scored (R^2) on another: to their magnitudes ``|f|`` for ``rendering="texture"``
(the texture strength each factor controls; the sign is a phase, which the views' crops and
flips do not preserve), to their signed values for ``rendering="structure"`` (which keeps the
sign in each band's brightness). :func:`probe_fusion` is the late-fusion probe: both
modalities' features together predict every factor (the downstream task of the decoupling
benchmark's ratio sweep).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "ALPHAS",
    "ProbeTarget",
    "extract_features",
    "is_factor_key",
    "probe_factors",
    "probe_fusion",
    "ridge_r2",
    "select_alpha",
    "standardize",
]

#: What the probes predict: the factors' ``"magnitude"`` ``|f|`` or their signed ``"value"``.
ProbeTarget = Literal["magnitude", "value"]


def is_factor_key(key: str) -> bool:
    """Whether a synthetic batch entry holds latent factors: ``shared``, ``private_<m>``, ``shared_<subset>``."""
    return key == "shared" or key.startswith(("private_", "shared_"))


def standardize(train: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """``train`` and ``others`` standardised (float64) with ``train``'s per-column mean and scale.

    Scales are floored at 1 % of the mean scale: near-constant columns (dead units) would
    otherwise blow up on the other splits.
    """
    train = train.double()
    std = train.std(0)
    mean, std = train.mean(0), std.clamp_min(max(1e-2 * float(std.mean()), 1e-12))
    return tuple((x.double() - mean) / std for x in (train, *others))


@torch.no_grad()
def extract_features(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Frozen encoder features of every modality of ``model`` and the factor values, un-augmented.

    Returns a dict with ``features_<modality>`` ``(N, D)`` for each modality of the model and
    every factor entry of the batches (``shared``, ``private_<modality>``, ``shared_<subset>``
    for factors that only a subset of the modalities sees). The model runs in eval mode and is
    restored.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list[Tensor]] = {}
    try:
        for batch in batches:
            for name in model.modalities:
                feats = model(batch[f"image_{name}"].to(device), name).float().cpu()
                out.setdefault(f"features_{name}", []).append(feats)
            for key, value in batch.items():
                if is_factor_key(key):
                    out.setdefault(key, []).append(value.float().cpu())
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("No batches: the dataloader is empty.")
    return {key: torch.cat(values) for key, values in out.items()}


def ridge_r2(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, alpha: float = 1.0) -> Tensor:
    """Closed-form ridge regression fit on ``train``; R^2 per target column on ``test``.

    Features are standardised with the training statistics (scales floored at 1 % of the mean
    scale, so that dead units do not explode on the test split); ``alpha`` is the ridge penalty
    relative to the number of training samples. R^2 = 1 - SSE / SST can be negative when the
    probe predicts worse than the test mean.

    Example:
        >>> x = torch.randn(200, 5)
        >>> y = x[:, :2] * 3.0
        >>> ridge_r2(x[:150], y[:150], x[150:], y[150:], alpha=1e-3).min() > 0.99
        tensor(True)
    """
    if train_x.shape[0] != train_y.shape[0] or test_x.shape[0] != test_y.shape[0]:
        raise ValueError("Features and targets must have the same number of samples.")
    x_tr, x_te = standardize(train_x, test_x)
    y_tr, y_te = train_y.double(), test_y.double()
    y_mean = y_tr.mean(0)
    gram = x_tr.T @ x_tr + alpha * x_tr.shape[0] * torch.eye(x_tr.shape[1], dtype=x_tr.dtype)
    weights = torch.linalg.solve(gram, x_tr.T @ (y_tr - y_mean))
    residual = ((x_te @ weights + y_mean - y_te) ** 2).sum(0)
    total = ((y_te - y_te.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    return (1.0 - residual / total).float()


ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def select_alpha(
    x: Tensor, y: Tensor, alphas: tuple[float, ...] = ALPHAS, holdout: float = 0.25, weights: Tensor | None = None
) -> float:
    """The ridge penalty with the best R^2 on the last ``holdout`` share of the fitting split.

    The score is the mean R^2 over the targets, or with ``weights`` (one per target column) the
    weighted sum of the R^2 clipped to [0, 1].
    """
    cut = int(round(x.shape[0] * (1 - holdout)))
    if cut < 2 or cut >= x.shape[0]:
        raise ValueError(f"Need at least a few samples on both sides of the hold-out; got {x.shape[0]}.")

    def score(r2: Tensor) -> float:
        return float(r2.mean()) if weights is None else float((r2.clamp(0, 1) * weights).sum())

    scores = [score(ridge_r2(x[:cut], y[:cut], x[cut:], y[cut:], a)) for a in alphas]
    return alphas[max(range(len(alphas)), key=scores.__getitem__)]


def _target(values: Tensor, target: ProbeTarget) -> Tensor:
    if target not in ("magnitude", "value"):
        raise ValueError(f"target must be 'magnitude' or 'value'; got {target!r}.")
    return values.abs() if target == "magnitude" else values


def probe_factors(
    train: dict[str, Tensor], test: dict[str, Tensor], alpha: float | None = None, target: ProbeTarget = "magnitude"
) -> dict[str, Any]:
    """R^2 of linear probes from each modality's features to shared and private factors.

    Args:
        train, test: outputs of :func:`extract_features` on two disjoint splits.
        alpha: ridge penalty; ``None`` selects it per probe from :data:`ALPHAS` on a hold-out
            part of ``train`` (never on ``test``).
        target: ``"magnitude"`` (``|f|``, for ``rendering="texture"``, whose sign is a random
            phase) or ``"value"`` (the signed factors, for ``rendering="structure"``).

    Returns:
        ``{modality: {"shared": R2, "private_own": R2, "private_other": R2 | None}}`` with the
        mean R^2 over the factors of each group (``private_other``: the private factors of
        every other modality, which a modality cannot see; near 0 or below is expected;
        ``None`` when no other modality has private factors). With subset-shared factors
        (``shared_<subset>`` entries) each modality also gets ``"subset_shared": {subset: R2}``:
        high where the modality belongs to the subset, near 0 where it does not.
    """
    modalities = [key.removeprefix("features_") for key in train if key.startswith("features_")]
    all_private = [key.removeprefix("private_") for key in train if key.startswith("private_")]
    subsets = [key for key in train if key.startswith("shared_")]
    results: dict[str, Any] = {}
    for name in modalities:
        x_tr, x_te = train[f"features_{name}"], test[f"features_{name}"]

        def r2(keys: list[str], x_tr: Tensor = x_tr, x_te: Tensor = x_te) -> float:
            y_tr = _target(torch.cat([train[key] for key in keys], 1), target)
            y_te = _target(torch.cat([test[key] for key in keys], 1), target)
            if y_tr.shape[1] == 0:  # e.g. no private factors (private_share=0)
                return float("nan")
            penalty = select_alpha(x_tr, y_tr) if alpha is None else alpha
            return float(ridge_r2(x_tr, y_tr, x_te, y_te, penalty).mean())

        others = [f"private_{m}" for m in all_private if m != name]
        results[name] = {
            "shared": r2(["shared"]),
            "private_own": r2([f"private_{name}"]),
            "private_other": r2(others) if others else None,
        }
        if subsets:
            results[name]["subset_shared"] = {key.removeprefix("shared_"): r2([key]) for key in subsets}
    return results


def probe_fusion(
    train: dict[str, Tensor], test: dict[str, Tensor], alpha: float | None = None, target: ProbeTarget = "value"
) -> dict[str, float]:
    """Late-fusion linear probe: every modality's features together predict every factor.

    The features of all modalities (``features_<m>`` of :func:`extract_features`) are
    concatenated, as the paper's late-fusion downstream heads do (Section 4.1), and one ridge
    regression predicts all factors (shared, each modality's private, subset-shared).

    Args:
        train, test: outputs of :func:`extract_features` on two disjoint splits (slice ``train``
            for a few-label probe).
        alpha: ridge penalty; ``None`` selects it on a hold-out of ``train``.
        target: ``"value"`` (default; signed factors) or ``"magnitude"``.

    Returns:
        ``{"all": mean R^2 over every factor, <group>: mean R^2 over the group's factors}`` for the
        groups ``shared``, ``private_<m>`` and ``shared_<subset>`` present.
    """
    features = sorted(key for key in train if key.startswith("features_"))
    groups = [key for key in train if is_factor_key(key) and train[key].shape[1]]
    if not features or not groups:
        raise ValueError(f"Need features_<modality> and factor entries; got {sorted(train)}.")
    x_tr = torch.cat([train[key] for key in features], 1)
    x_te = torch.cat([test[key] for key in features], 1)
    y_tr = _target(torch.cat([train[key] for key in groups], 1), target)
    y_te = _target(torch.cat([test[key] for key in groups], 1), target)
    penalty = select_alpha(x_tr, y_tr) if alpha is None else alpha
    r2 = ridge_r2(x_tr, y_tr, x_te, y_te, penalty)
    out = {"all": float(r2.mean())}
    start = 0
    for key in groups:
        width = train[key].shape[1]
        out[key] = float(r2[start : start + width].mean())
        start += width
    return out
