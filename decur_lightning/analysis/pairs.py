"""Modalities by name and pairs of modalities, as the analyses address them.

Every analysis takes modality *names* (the batch keys ``image_<name>``); cross-modal analyses
(eq. 7 alignment, GradCAM overlap) are made for every pair ``(m, n)`` of a model's modalities,
``m`` before ``n`` in the model's order (the order of
:meth:`~decur_lightning.encoder_set.EncoderSet.pairs`). Files, logger tags and the keys of
``statistics.json`` name a pair ``"<m>_<n>"`` (:func:`pair_label`), as the logged DeCUR terms
``common_<m>_<n>`` do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from torch import nn

__all__ = [
    "check_modality",
    "modality_mapping",
    "require_images",
    "model_pairs",
    "pair_common_dims",
    "pair_label",
    "pair_suffix",
]

Pair = tuple[str, str]
V = TypeVar("V")


def _names(model: nn.Module) -> tuple[str, ...]:
    names = getattr(model, "modalities", None)
    if names is None:
        raise TypeError(
            f"{type(model).__name__} has no 'modalities': the analyses take a module of this package "
            "(e.g. DeCURModule) whose modalities are named."
        )
    return tuple(names)


def require_images(batch: Mapping[str, Any], names: Iterable[str]) -> None:
    """Raise a ``KeyError`` naming the ``image_<name>`` entries ``batch`` lacks for the modalities ``names``."""
    names = list(names)
    missing = [f"image_{name}" for name in names if f"image_{name}" not in batch]
    if missing:
        raise KeyError(
            f"The batch has no {missing}; it has keys {sorted(batch)}. The data must deliver every modality the "
            f"analysis uses ({names}), under the keys image_<name>."
        )


def check_modality(model: nn.Module, name: Any) -> str:
    """``name`` if it names a modality of ``model``; else a TypeError / ValueError listing them.

    The one place where the analyses check a modality argument: modalities are addressed by
    name only (the numbered ``1`` / ``2`` of version 0.1 are gone).
    """
    names = _names(model)
    if not isinstance(name, str):
        raise TypeError(
            f"Modalities are addressed by name, one of {list(names)}; got {name!r} ({type(name).__name__}). "
            "Numbered modalities (1, 2) were removed in version 0.2."
        )
    if name not in names:
        raise ValueError(f"No modality {name!r}: the model's modalities are {list(names)}.")
    return name


def modality_mapping(model: nn.Module, value: V | Mapping[str, V] | None, what: str) -> dict[str, V | None]:
    """One value per modality of ``model`` from a single value (for all) or a mapping by name.

    Names the mapping gives that are no modality of ``model`` raise a ValueError listing the
    modalities; modalities it leaves out get ``None``.
    """
    names = _names(model)
    if value is None or not isinstance(value, Mapping):
        return {name: value for name in names}  # type: ignore[misc]
    unknown = [key for key in value if key not in names]
    if unknown:
        raise ValueError(f"{what} names {unknown}, which are not modalities of the model; they are {list(names)}.")
    return {name: value.get(name) for name in names}


def model_pairs(model: nn.Module) -> list[Pair]:
    """Every pair ``(m, n)`` of the model's modalities, ``m`` before ``n`` in the model's order."""
    names = _names(model)
    return [(m, n) for i, m in enumerate(names) for n in names[i + 1 :]]


def pair_label(pair: Pair) -> str:
    """``"<m>_<n>"``: how files, logger tags and ``statistics.json`` name the pair ``(m, n)``."""
    m, n = pair
    return f"{m}_{n}"


def pair_suffix(pair: Pair, num_pairs: int) -> str:
    """The file-name suffix of a pair's figure: ``""`` for two modalities (one pair, the file
    names of version 0.1, e.g. ``alignment_histogram.png``), else ``"_<m>_<n>"``."""
    return "" if num_pairs == 1 else f"_{pair_label(pair)}"


def pair_common_dims(model: nn.Module, m: str, n: str) -> int | None:
    """``K_c`` of the pair ``(m, n)`` of a DeCUR model (``common_dims_of``); ``None`` for models
    without common dimensions (baselines such as cross-modal Barlow Twins)."""
    common_dims_of = getattr(model, "common_dims_of", None)
    if common_dims_of is None:
        return None
    return int(common_dims_of(check_modality(model, m), check_modality(model, n)))
