"""One description of a modality, used by every module, datamodule, export and analysis.

A run's modalities are an ordered mapping *name -> :class:`Modality`*. The name is the batch key
suffix (``image_<name>``), the first modality is the one the paper calls modality 1, and there
may be any number ``M >= 2`` of them (``M = 1`` for single-modal baselines).

A datamodule describes what it delivers (:attr:`modality_specs`: band count, band names, view
kind); a module says what it builds on top (encoder, weights). :func:`resolve_modalities` merges
the two, so a YAML run states each modality once, and from Python
``Trainer.fit(DeCURModule(), datamodule)`` needs no modality arguments at all.

Example:
    >>> specs = resolve_modalities({"s1": {"encoder": "resnet18"}, "s2": None},
    ...                            data={"s1": Modality(bands=2, view="sar"), "s2": Modality(bands=13, view="optical")},
    ...                            encoder="resnet50")
    >>> [(name, m.encoder, m.bands, m.view) for name, m in specs.items()]
    [('s1', 'resnet18', 2, 'sar'), ('s2', 'resnet50', 13, 'optical')]
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, TypeVar

from .augmentations import VIEW_KINDS

__all__ = [
    "Modality",
    "ModalitiesArg",
    "datamodule_modalities",
    "modalities_to_hparams",
    "resolve_modalities",
]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class Modality:
    """What the library knows about one modality. Fields left ``None`` are filled in elsewhere.

    Args:
        bands: band count (the encoder's input channels); ``None``: from the datamodule.
        encoder: encoder name (:func:`~decur_lightning.models.create_encoder`: timm names,
            ``*_rda``, ``mit_b*``); ``None``: the module's ``encoder`` argument.
        weights: pretrained weights of this modality's encoder: ``"imagenet"`` (or
            ``"imagenet:<file>"``), a checkpoint or export of this package, a torchgeo weight
            name, or an authors' file (:func:`~decur_lightning.weights.load_encoder_state_dict`).
        weights_modality: which encoder of a multi-encoder weight source to take: a modality
            name the source records, or a 1-based position for sources that record no names
            (the authors' joint checkpoints: 1 = SAR, 2 = optical). ``None``: this modality's name.
        view: view pipeline kind (:data:`~decur_lightning.augmentations.VIEW_KINDS`); ``None``:
            the datamodule's kind, else the name if it is a kind, else ``"generic"``.
        band_names: names of the bands in order (e.g. ``["VV", "VH"]``), where known.
        encoder_kwargs: extra keyword arguments of this modality's encoder (merged over the
            module's ``encoder_kwargs``).
        normalization: how the datamodule turns the stored values into the encoder's input, as
            a plain dict (recorded in checkpoints and shipped with exported weights, see
            :mod:`decur_lightning.export`). ``method`` is one of

            * ``"mean_2std"``: ``(x - (mean - 2 std)) / (4 std)`` clipped to ``[0, 1]`` per band
              (paper B.1/B.2), with ``mean`` and ``std`` lists; ``outlier_fraction`` (SAR) cuts
              that share of each image's outliers first (its 1st/99th percentiles);
            * ``"percentile_min_max"``: each image's band clipped to its ``lower``/``upper``
              quantiles and min-max scaled to ``[0, 1]``;
            * ``"scale"``: ``x / divisor``;
            * ``"mean_std"``: ``(x / divisor - mean) / std`` (e.g. ImageNet statistics);
            * ``"none"``: the values are used as stored.

            ``input`` says what the stored values are (dtype and units). ``None``: unknown.
    """

    bands: int | None = None
    encoder: str | None = None
    weights: str | None = None
    weights_modality: str | int | None = None
    view: str | None = None
    band_names: list[str] | None = None
    encoder_kwargs: dict[str, Any] | None = field(default=None)
    normalization: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.bands is not None and (isinstance(self.bands, bool) or int(self.bands) < 1):
            raise ValueError(f"bands must be a positive band count; got {self.bands!r}.")
        if self.view is not None and self.view not in VIEW_KINDS:
            raise ValueError(f"view={self.view!r}: expected one of {VIEW_KINDS}.")
        if self.band_names is not None:
            self.band_names = [str(b) for b in self.band_names]
            if self.bands is not None and len(self.band_names) != self.bands:
                raise ValueError(
                    f"band_names lists {len(self.band_names)} bands ({self.band_names}) but bands={self.bands}."
                )
        if self.normalization is not None:
            if not isinstance(self.normalization, Mapping) or "method" not in self.normalization:
                raise ValueError(
                    f"normalization must be a dict with a 'method' (e.g. {{'method': 'scale', 'divisor': 255}}); "
                    f"got {self.normalization!r}."
                )
            self.normalization = dict(self.normalization)


#: How a module's ``modalities`` argument may be given: ``None`` (every modality of the
#: datamodule), a list of names (those of the datamodule, in this order), or a mapping name ->
#: :class:`Modality` / dict of its fields / band count / ``None``.
ModalitiesArg = Mapping[str, Modality | Mapping[str, Any] | int | None] | Sequence[str] | None


T = TypeVar("T")


def from_fields(cls: type[T], value: Mapping[str, Any], what: str, one: str) -> T:
    """The dataclass ``cls`` built from the mapping ``value`` of its fields; an unknown field raises a
    ``ValueError`` naming it (``what``: the thing described, ``one``: "a modality", "a source") and
    listing the fields ``cls`` has."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {unknown}; {one} has {sorted(known)}.")
    return cls(**value)


def _as_modality(name: str, value: Modality | Mapping[str, Any] | int | None) -> Modality:
    if isinstance(value, Modality):
        return replace(value)
    if value is None:
        return Modality()
    if isinstance(value, int) and not isinstance(value, bool):
        return Modality(bands=value)
    if isinstance(value, Mapping):
        return from_fields(Modality, value, f"modality {name!r}", "a modality")
    raise TypeError(
        f"modality {name!r}: expected a Modality, a dict of its fields, a band count or None; got {type(value).__name__}."
    )


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"Modality names are identifiers (letters, digits, '_'; they name batch keys image_<name> and "
            f"module attributes); got {name!r}."
        )
    return name


def _requested(modalities: ModalitiesArg, data: Mapping[str, Modality] | None) -> dict[str, Modality]:
    if modalities is None:
        if not data:
            raise ValueError(
                "No modalities: pass modalities={'<name>': {'bands': C}, ...} (names as in the batch keys "
                "image_<name>), or fit with a datamodule that describes its modalities (modality_specs)."
            )
        return {name: Modality() for name in data}
    if isinstance(modalities, str):
        raise TypeError(f"modalities must be a list of names or a mapping, not the string {modalities!r}.")
    if isinstance(modalities, Mapping):
        return {_check_name(name): _as_modality(name, value) for name, value in modalities.items()}
    names = [_check_name(name) for name in modalities]
    if len(set(names)) != len(names):
        raise ValueError(f"Modality names must differ (they name batch keys); got {names}.")
    return {name: Modality() for name in names}


def resolve_modalities(
    modalities: ModalitiesArg,
    data: Mapping[str, Modality] | None = None,
    encoder: str = "resnet50",
    *,
    need_bands: bool = True,
) -> dict[str, Modality]:
    """Complete a module's modality descriptions with the datamodule's.

    A field the module gives wins; otherwise the datamodule's value; the encoder defaults to
    ``encoder`` and the view kind to the name when it is a kind, else ``"generic"``.

    Args:
        modalities: the module's ``modalities`` argument (:data:`ModalitiesArg`).
        data: the datamodule's :attr:`modality_specs`, or ``None`` without a datamodule.
        encoder: the default encoder name.
        need_bands: raise when a band count is unknown.

    Raises:
        ValueError: a modality the datamodule does not have, band counts that disagree, or a
            band count that nobody gives.
    """
    requested = _requested(modalities, data)
    data = dict(data or {})
    resolved: dict[str, Modality] = {}
    for name, spec in requested.items():
        if data and name not in data:
            raise ValueError(
                f"Modality {name!r} is not in the datamodule, which has {list(data)}. Use those names "
                "(batch keys image_<name>), or leave modalities unset to take all of them."
            )
        known = data.get(name, Modality())
        if spec.bands is not None and known.bands is not None and int(spec.bands) != int(known.bands):
            raise ValueError(
                f"Modality {name!r}: the module expects {spec.bands} bands but the datamodule delivers "
                f"{known.bands}. Remove 'bands' from the module's modalities (it is read from the datamodule) "
                "or select the bands in the datamodule."
            )
        merged = Modality(
            bands=spec.bands if spec.bands is not None else known.bands,
            encoder=spec.encoder or known.encoder or encoder,
            weights=spec.weights if spec.weights is not None else known.weights,
            weights_modality=spec.weights_modality,
            view=spec.view or known.view or (name if name in VIEW_KINDS else "generic"),
            band_names=spec.band_names if spec.band_names is not None else known.band_names,
            encoder_kwargs=spec.encoder_kwargs if spec.encoder_kwargs is not None else known.encoder_kwargs,
            normalization=spec.normalization if spec.normalization is not None else known.normalization,
        )
        if need_bands and merged.bands is None:
            raise ValueError(
                f"Modality {name!r} has no band count: give modalities={{'{name}': {{'bands': C}}}}, or fit with a "
                "datamodule that describes its modalities (Trainer.fit(model, datamodule)); the module then "
                "builds its encoders at the start of the fit."
            )
        resolved[name] = merged
    return resolved


def datamodule_modalities(datamodule: Any) -> dict[str, Modality] | None:
    """The :attr:`modality_specs` of a datamodule (``None`` if it has none)."""
    specs = getattr(datamodule, "modality_specs", None) if datamodule is not None else None
    if specs is None:
        return None
    return {name: _as_modality(name, value) for name, value in dict(specs).items()}


def modalities_to_hparams(specs: Mapping[str, Modality]) -> dict[str, dict[str, Any]]:
    """Plain dicts (YAML- and checkpoint-friendly) of resolved descriptions, ``None`` fields left out."""
    return {name: {k: v for k, v in asdict(spec).items() if v is not None} for name, spec in specs.items()}
