"""Export and import of pretrained encoders, one per modality, any number of modalities.

A checkpoint of this package's modules (SSL and downstream) holds one encoder per modality under
``encoders.<name>.*``, and ``hyper_parameters["modalities"]`` describes them in order (name ->
``bands``, ``encoder``, ``view``, ...). :func:`export_encoders` writes each as a plain state dict
that ``timm.create_model(name, in_chans=C, num_classes=0)`` loads strictly, so a pretrained
encoder can be used in any project without this package, and ``encoders.json`` names every
modality in order.

:func:`load_encoder_state_dict` reads one modality's encoder back from any source: this
package's checkpoints (also those of version 0.1, ``encoder{1,2}.*``) and exports, torchgeo's
DeCUR weights, and every layout of the authors' released checkpoints; a modality is selected by
its name or by its 1-based position. :func:`load_state_dict_strictly` loads it into an encoder
and lists the keys when it does not fit.

Encoder families keep their own checkpoint knowledge (timm's ``checkpoint_filter_fn``
pattern); this module dispatches to it without knowing the families:

- an encoder's ``checkpoint_filter_fn(state_dict, source)`` and ``optional_keys(state_dict,
  source)`` methods (:class:`~decur_lightning.models.MiTEncoder`'s head rules,
  :class:`~decur_lightning.models.ResNetRDA`'s plain-trunk rule);
- :data:`decur_lightning.models.AUTHORS_STATE_DICT_CONVERTERS` for the authors' released layouts
  (the RDA blocks ``da{k}_l3/l4``).
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models.encoders import AUTHORS_STATE_DICT_CONVERTERS

__all__ = [
    "EncoderWeightsMismatchError",
    "ModalitySelector",
    "adapt_input_bands",
    "WeightsSource",
    "encoder_state_dict_from_checkpoint",
    "export_encoders",
    "load_encoder_state_dict",
    "load_pretrained_encoder",
    "load_state_dict_strictly",
    "source_modalities",
]

#: A weight source: a file or folder path, a torchgeo weight (``WeightsEnum`` member or its
#: name, e.g. ``"ResNet50_Weights.SENTINEL1_ALL_DECUR"``), or an already loaded dict.
WeightsSource = str | Path | Mapping[str, Any] | Any
#: Which encoder of a source holding several: a modality name the source records, or the
#: modality's 1-based position (the n-th modality in order; for the authors' joint checkpoints,
#: which record no names, 1 = SAR and 2 = optical); ``None`` only for sources with one encoder.
ModalitySelector = int | str | None

_CLASSIFIER_PREFIXES: tuple[str, ...] = ("fc.",)
_MAX_LISTED_KEYS = 20
#: Version 0.1 layout: ``encoder<k>.*`` keys and ``modality<k>`` / ``encoder<k>`` /
#: ``in_channels<k>`` hyper-parameters, k = 1, 2 (built from the position, not spelled out).
_LEGACY_POSITIONS: tuple[int, ...] = (1, 2)
_AUTHORS_BACKBONE = re.compile(r"^backbone_(\d+)\.")
#: Parts of the authors' joint DeCUR checkpoints that are not encoders (projectors, the
#: cross-correlation batch norm).
_AUTHORS_NOT_ENCODER: tuple[str, ...] = ("projector", "bn.")


class EncoderWeightsMismatchError(RuntimeError):
    """Weights that do not fit an encoder; lists the missing, unexpected and mis-shaped keys.

    Attributes:
        missing_keys: encoder keys the weights lack.
        unexpected_keys: weight keys the encoder lacks.
        mismatched_shapes: ``(key, weights shape, encoder shape)`` for keys present in both.
    """

    def __init__(
        self,
        source: str,
        missing_keys: list[str],
        unexpected_keys: list[str],
        mismatched_shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.missing_keys = missing_keys
        self.unexpected_keys = unexpected_keys
        self.mismatched_shapes = mismatched_shapes
        lines = [f"The weights from {source} do not fit this encoder."]
        for label, items in (
            ("missing keys", missing_keys),
            ("unexpected keys", unexpected_keys),
            ("shape mismatches (key, weights, encoder)", mismatched_shapes),
        ):
            if items:
                shown = items[:_MAX_LISTED_KEYS]
                more = f" ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
                lines.append(f"  {label} ({len(items)}): {shown}{more}")
        lines.append(
            "Check the encoder name (e.g. resnet50 vs resnet50_rda vs mit_b2), the band count, and which "
            "modality of the source you asked for (its name or its 1-based position)."
        )
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# The encoders a source holds
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    """One encoder of a source: its modality name (``None`` if unrecorded), 1-based position,
    where its weights are (a key prefix, or a file of an export), and its description."""

    name: str | None
    position: int
    prefix: str = ""
    file: str | None = None
    description: dict[str, Any] = field(default_factory=dict)
    files: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return (
            f"{self.name!r} ({self.position})"
            if self.name is not None
            else f"{self.prefix or self.file} ({self.position})"
        )


def _state_dict_entries(state_dict: Mapping[str, Any], hparams: Mapping[str, Any], where: str) -> list[_Entry]:
    """The encoders of a module's state dict: ``encoders.<name>.*`` (described by ``hparams``'s
    ``modalities``), or version 0.1's ``encoder{1,2}.*`` (``modality{1,2}`` names them)."""
    keyed = list(
        dict.fromkeys(k.split(".", 2)[1] for k in state_dict if k.startswith("encoders.") and k.count(".") >= 2)
    )
    if keyed:
        recorded = hparams.get("modalities")
        if isinstance(recorded, Mapping):
            described = {str(n): dict(d) if isinstance(d, Mapping) else {} for n, d in recorded.items()}
        elif isinstance(recorded, (list, tuple)):
            described = {str(n): {} for n in recorded}
        else:
            described = {}
        order = [n for n in described if n in keyed] + [n for n in keyed if n not in described]
        default = {"encoder": hparams.get("encoder")}  # the module's default encoder name
        return [
            _Entry(
                name, position, prefix=f"encoders.{name}.", description=_description(described.get(name, {}), default)
            )
            for position, name in enumerate(order, start=1)
        ]
    entries = []
    for position in _LEGACY_POSITIONS:
        prefix = f"encoder{position}."
        if any(k.startswith(prefix) for k in state_dict):
            name = hparams.get(f"modality{position}")
            description = _description(
                {"encoder": hparams.get(f"encoder{position}"), "bands": hparams.get(f"in_channels{position}")}
            )
            entries.append(
                _Entry(None if name is None else str(name), position, prefix=prefix, description=description)
            )
    if not entries:
        raise ValueError(
            f"{where} has no encoder weights: expected 'encoders.<modality>.*' keys (a module of this package) or "
            f"version 0.1's 'encoder<k>.*'; its key prefixes are {_prefixes(state_dict)}."
        )
    return entries


def _description(spec: Mapping[str, Any], default: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``encoder``, ``bands``, ``view`` (``None`` where unknown) and ``band_names`` where known."""
    spec = {**(default or {}), **{k: v for k, v in spec.items() if v is not None}}
    out = {"encoder": spec.get("encoder"), "bands": spec.get("bands"), "view": spec.get("view")}
    if spec.get("band_names") is not None:
        out["band_names"] = list(spec["band_names"])
    if isinstance(spec.get("normalization"), Mapping):
        out["normalization"] = dict(spec["normalization"])
    return out


def _select(entries: list[_Entry], modality: ModalitySelector, where: str) -> _Entry:
    """The entry ``modality`` names (a recorded name or a 1-based position); errors list them all."""
    listing = ", ".join(e.label for e in entries)
    if modality is None:
        if len(entries) == 1:
            return entries[0]
        raise ValueError(
            f"{where} holds {len(entries)} encoders: {listing}. Pass modality=<name> or its position "
            f"(1..{len(entries)})."
        )
    if isinstance(modality, bool) or not isinstance(modality, (int, str)):
        raise TypeError(f"modality must be a modality name (str) or a 1-based position (int); got {modality!r}.")
    if isinstance(modality, str):
        matches = [e for e in entries if e.name == modality]
        if not matches:
            if all(e.name is None for e in entries):
                raise ValueError(
                    f"{where} records no modality names, so modality {modality!r} cannot be resolved; it holds "
                    f"{listing}: pass the position (in the authors' SAR-optical checkpoints 1 is SAR, 2 optical; "
                    f"modules: modalities={{'{modality}': {{'weights_modality': 1}}}})."
                )
            raise ValueError(f"{where} has no modality {modality!r}; its modalities are {listing}.")
        return matches[0]
    matches = [e for e in entries if e.position == modality]
    if not matches:
        raise ValueError(
            f"{where} has no modality at position {modality} (positions count from 1); its modalities are {listing}."
        )
    return matches[0]


def _entry_state_dict(state_dict: Mapping[str, Any], entry: _Entry) -> dict[str, torch.Tensor]:
    return {k[len(entry.prefix) :]: v for k, v in state_dict.items() if k.startswith(entry.prefix)}


def encoder_state_dict_from_checkpoint(
    checkpoint: Mapping[str, Any], modality: ModalitySelector = None
) -> dict[str, torch.Tensor]:
    """One modality's encoder state dict from a loaded Lightning checkpoint, prefix stripped.

    Args:
        checkpoint: ``torch.load`` of a checkpoint of a module of this package (``state_dict``
            keys ``encoders.<name>.*``; version 0.1's ``encoder{1,2}.*`` also read).
        modality: a modality name, its 1-based position, or ``None`` when the checkpoint holds
            one encoder.
    """
    where = "the checkpoint"
    entries = _state_dict_entries(checkpoint["state_dict"], checkpoint.get("hyper_parameters") or {}, where)
    return _entry_state_dict(checkpoint["state_dict"], _select(entries, modality, where))


def source_modalities(source: WeightsSource) -> dict[str, dict[str, Any]]:
    """The modalities a checkpoint of this package or an export folder holds, in order.

    Returns:
        ``{name: {"encoder", "bands", "view", ["band_names"], "position"}}`` (``None`` where the
        source does not say).

    Example:
        >>> source_modalities("runs/pretrain/last.ckpt")  # doctest: +SKIP
        {'s1': {'encoder': 'resnet50', 'bands': 2, 'view': 'sar', 'position': 1}, 's2': {...}}
    """
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        entries, _ = _export_entries(Path(source))
    else:
        checkpoint = source if isinstance(source, Mapping) else _load_lightning_checkpoint(source)
        entries = _state_dict_entries(
            checkpoint["state_dict"], checkpoint.get("hyper_parameters") or {}, _describe(source)
        )
    return {_export_name(e): {**e.description, "position": e.position} for e in entries}


def _export_name(entry: _Entry) -> str:
    return entry.name if entry.name is not None else str(entry.position)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def _load_lightning_checkpoint(checkpoint_path: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}. Pass the .ckpt file written by Trainer.fit.")
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(
            f"{path} is not a Lightning checkpoint of a decur-lightning module (it has no 'state_dict' and "
            "'hyper_parameters'). For the authors' released files use decur_lightning.weights.load_encoder_state_dict."
        )
    return checkpoint


def export_encoders(checkpoint: str | Path | Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write one encoder state dict per modality of a checkpoint of this package, for every modality.

    :func:`decur_lightning.export.export_pretrained` (``decur export``) writes these files too,
    plus safetensors, torchgeo and Hugging Face Hub formats and the weights' metadata
    (normalisation, pretraining run); this function writes only the ``.pt`` files.

    Files: ``<out_dir>/encoder_<name>.pt`` (a plain ``state_dict``) for each of the M
    modalities, and ``<out_dir>/encoders.json`` naming them in order (the first is the one the
    paper calls modality 1), each with its description::

        {"s1": {"file": "encoder_s1.pt", "encoder": "resnet50", "bands": 2, "view": "sar",
                "band_names": ["VV", "VH"], "position": 1},
         "s2": {...}}

    (``band_names`` only where known; ``encoder`` / ``bands`` / ``view`` ``null`` where the
    checkpoint does not record them). Plain timm encoders load into
    ``timm.create_model(name, in_chans=C, num_classes=0)`` strictly; encoders of this package
    (``*_rda``, ``mit_b*``) into ``decur_lightning.models.create_encoder(name, C)``. The folder
    or one file is a weight source again (:func:`load_encoder_state_dict`, by name or position).

    Args:
        checkpoint: a ``.ckpt`` written by ``Trainer.fit`` on a module of this package (SSL or
            downstream; version 0.1 checkpoints too), or the loaded dict.
        out_dir: folder to write into (created).

    Returns:
        ``{modality: path}`` of the written state dicts, in modality order.

    Example:
        >>> paths = export_encoders("last.ckpt", "exported")  # doctest: +SKIP
        >>> enc = timm.create_model("resnet50", in_chans=2, num_classes=0)  # doctest: +SKIP
        >>> enc.load_state_dict(torch.load(paths["s1"]))  # doctest: +SKIP
    """
    if isinstance(checkpoint, Mapping):
        if "state_dict" not in checkpoint:
            raise ValueError(
                "The given dict is not a Lightning checkpoint of a decur-lightning module (no 'state_dict')."
            )
        loaded: Mapping[str, Any] = checkpoint
        where = "the given checkpoint"
    else:
        loaded = _load_lightning_checkpoint(checkpoint)
        where = str(checkpoint)
    entries = _state_dict_entries(loaded["state_dict"], loaded.get("hyper_parameters") or {}, where)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    manifest: dict[str, dict[str, Any]] = {}
    for entry in entries:
        name = _export_name(entry)
        path = out / f"encoder_{name}.pt"
        torch.save(_entry_state_dict(loaded["state_dict"], entry), path)
        paths[name] = path
        manifest[name] = {"file": path.name, **entry.description, "position": entry.position}
    (out / "encoders.json").write_text(json.dumps(manifest, indent=2))
    return paths


# ---------------------------------------------------------------------------------------------
# Import: one modality's encoder weights from any source
# ---------------------------------------------------------------------------------------------
def load_encoder_state_dict(
    source: WeightsSource,
    modality: ModalitySelector = None,
    *,
    rda_blocks: int | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict of one modality's encoder, in this package's encoder layout.

    The returned keys are those of :func:`decur_lightning.models.create_encoder`'s encoders:
    bare timm/torchvision ResNet keys (``conv1.weight``, ``layer4.2.bn3.running_var``, no
    ``fc``), plus ``da_l3.*`` / ``da_l4.*`` for ``*_rda`` encoders, or the official MiT keys
    (plus ``head.*`` when the source has DeCUR's 2048-wide head). Load them with
    :func:`load_state_dict_strictly` (or :func:`load_pretrained_encoder` in one call).

    ``modality`` selects the encoder in every source that holds several: a modality name the
    source records, or the 1-based position (the n-th modality in order); ``None`` only when
    the source holds one encoder. Errors list the modalities the source has.

    Sources (paper Sections 5.1-5.3 transfer these encoders):

    - a Lightning checkpoint of a module of this package (SSL or downstream): ``state_dict``
      keys ``encoders.<name>.*``, ``hyper_parameters["modalities"]`` their order; version 0.1
      checkpoints (``encoder{1,2}.*``, named by ``modality{1,2}``) are read too;
    - what :func:`export_encoders` writes: the folder (``encoders.json`` names the modalities
      and their positions) or one ``encoder_<name>.pt`` file;
    - a torchgeo weight, e.g. ``ResNet50_Weights.SENTINEL1_ALL_DECUR`` (2-band SAR) or
      ``SENTINEL2_ALL_DECUR`` (13-band optical), or its name (downloaded by torchgeo);
    - the authors' released files (github.com/zhu-xlab/DeCUR), which record no names:

      * a joint checkpoint ``{'epoch', 'model', 'optimizer'}`` whose ``model`` holds
        ``module.backbone_1.*`` (position 1; SAR in SAR-optical) and ``module.backbone_2.*``,
        projectors, and with RDA ``module.da1_l3.*``, ``module.da1_l4.*``, ``module.da2_*``;
      * a backbone-only file: bare ResNet keys (SAR file from ``backbone_1``, optical from
        ``backbone_2``) or MiT keys (``module.backbone_{1,2}.`` stripped, ``head`` dropped);
      * an RDA backbone file: ``backbone.*`` plus ``da1_l3/l4.*`` and/or ``da2_l3/l4.*``.

      Layouts of an encoder family are mapped by its converter
      (:data:`decur_lightning.models.AUTHORS_STATE_DICT_CONVERTERS`): the RDA blocks become
      ``da_l3.*`` / ``da_l4.*`` with DAT's reference grid (``_extra_state`` = ``"dat"``, a
      warning says so), so the loaded encoder uses ``rda_reference_points="dat"``, also after
      it is saved and reloaded.

    Files are read with ``torch.load(weights_only=True)``; a checkpoint holding other Python
    objects (a Lightning checkpoint's hyper-parameters may) is then unpickled in full: load only
    files you trust.

    A classifier (``fc.*``) in a ResNet file (torchvision's 1000-class layer, or torchgeo's) is
    not part of an encoder and is left out, with a warning.

    Residual deformable attention: the authors' pretraining ran modality 2 through modality 1's
    blocks (``da1_*``) and never trained ``da2_*``. By default the modality at position ``k``
    gets ``da{k}_*`` (its own blocks; a warning says that ``da2_*`` are untrained);
    ``rda_blocks=1`` takes ``da1_*``, the blocks modality 2 actually ran through during their
    pretraining.

    Args:
        source: a path (file or export folder), a torchgeo ``WeightsEnum`` member or its name,
            or an already loaded checkpoint / state dict.
        modality: a modality name the source records, or a 1-based position; ``None`` for
            sources holding one encoder.
        rda_blocks: which attention blocks (``1``: ``da1_*``, ``2``: ``da2_*``) to take from
            the authors' RDA files; ``None``: the modality's own. Other sources ignore it.

    Returns:
        The encoder's state dict (tensors on the CPU).

    Raises:
        FileNotFoundError: if a path does not exist and is not a torchgeo weight name either.
        ValueError: if ``modality`` is needed and missing or unknown (the message lists the
            source's modalities), or the source's layout is not one of the above (the message
            lists what it found).

    Example:
        >>> sd = load_encoder_state_dict("runs/pretrain/version_0/checkpoints/last.ckpt", "s1")  # doctest: +SKIP
        >>> encoder = create_encoder("resnet50", in_channels=2)  # doctest: +SKIP
        >>> load_state_dict_strictly(encoder, sd)  # doctest: +SKIP
    """
    return _load(source, modality, rda_blocks)[0]


def _load(
    source: WeightsSource, modality: ModalitySelector, rda_blocks: int | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`load_encoder_state_dict` plus what the source says about the encoder
    (``band_names``, ``normalization``, ... where recorded; ``{}`` otherwise)."""
    if rda_blocks is not None and (isinstance(rda_blocks, bool) or not isinstance(rda_blocks, int) or rda_blocks < 1):
        raise ValueError(
            f"rda_blocks must be None or a block-group number k >= 1 (the authors' da<k>_* blocks); got {rda_blocks!r}."
        )
    options = {"rda_blocks": rda_blocks}
    if isinstance(source, Mapping):
        return _from_loaded(source, modality, "the given dict", options)
    if hasattr(source, "get_state_dict"):
        return _from_torchgeo(source)
    if not isinstance(source, (str, Path)):
        raise TypeError(
            f"Weight source must be a path, a torchgeo WeightsEnum member or its name, or a dict; "
            f"got {type(source).__name__}."
        )
    path = Path(source)
    if path.is_dir():
        if not (path / "encoders.json").is_file() and (path / "config.json").is_file():
            return _from_hub_folder(path, modality)
        return _from_export_folder(path, modality)
    if path.is_file():
        described = _check_export_file_modality(path, modality)
        if path.suffix == ".safetensors":
            return _load_safetensors(path), described
        state_dict, description = _from_loaded(_torch_load(path), modality, str(path), options)
        return state_dict, {**description, **described}
    return _from_torchgeo(_torchgeo_weight_by_name(str(source)))


def load_state_dict_strictly(
    encoder: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "the state dict"
) -> None:
    """Load ``state_dict`` into ``encoder``, every key accounted for.

    Raises :class:`EncoderWeightsMismatchError` with the missing, unexpected and mis-shaped keys
    when the weights do not fit. An encoder family may relax this through two hooks (methods
    of the encoder, looked up by name), each warning where weights stay at their
    initialisation:

    - ``encoder.checkpoint_filter_fn(state_dict, source) -> state_dict`` adapts the weights
      first (:class:`~decur_lightning.models.MiTEncoder` drops a classifier ``head`` of another
      shape, e.g. ImageNet's 1000 classes);
    - ``encoder.optional_keys(state_dict, source) -> prefixes`` names keys the weights may lack
      (:class:`~decur_lightning.models.ResNetRDA` given a plain ResNet: the attention blocks;
      :class:`~decur_lightning.models.MiTEncoder` given a head-less MiT file: the head).

    A module's ``_extra_state`` (an RDA block's reference grid) may be missing too: the module
    then keeps what it was built with.
    """
    state_dict = dict(state_dict)
    filter_fn = getattr(encoder, "checkpoint_filter_fn", None)
    if callable(filter_fn):
        state_dict = dict(filter_fn(state_dict, source))
    optional_fn = getattr(encoder, "optional_keys", None)
    optional = tuple(optional_fn(state_dict, source)) if callable(optional_fn) else ()
    expected = encoder.state_dict()
    missing = [
        k for k in expected if k not in state_dict and not k.startswith(optional) and not k.endswith("._extra_state")
    ]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in state_dict.items()
        if k in expected and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise EncoderWeightsMismatchError(source, missing, unexpected, mismatched)
    # Every key is checked above; strict=False only lets the documented optional keys stay.
    encoder.load_state_dict(state_dict, strict=False)


def load_pretrained_encoder(
    encoder: nn.Module,
    source: WeightsSource,
    modality: ModalitySelector = None,
    *,
    rda_blocks: int | None = None,
    band_names: Sequence[str] | None = None,
) -> None:
    """:func:`load_encoder_state_dict` followed by :func:`load_state_dict_strictly`.

    This is how a built encoder gets weights from any source but ImageNet (which
    ``create_encoder(..., weights="imagenet")`` applies at construction); modules do it for
    ``modalities={name: {"weights": source, "weights_modality": ...}}``.

    With ``band_names`` (the encoder's input bands in order) and a source that records its own
    (checkpoints and exports of this package, torchgeo weights), the first convolution's input
    channels are selected by band name when the two differ (:func:`adapt_input_bands`): a subset
    or a reordering of the pretrained bands loads; bands the weights never saw are initialised
    as timm adapts input channels, with a warning naming them. Without either, the band count
    must match.

    Example:
        >>> encoder = create_encoder("resnet50", in_channels=2)  # doctest: +SKIP
        >>> load_pretrained_encoder(encoder, "ResNet50_Weights.SENTINEL1_ALL_DECUR")  # doctest: +SKIP
        >>> load_pretrained_encoder(encoder, "exported/", "s1")  # doctest: +SKIP
    """
    state_dict, description = _load(source, modality, rda_blocks)
    where = _describe(source) + (f" (modality {modality!r})" if modality is not None else "")
    source_bands = description.get("band_names")
    if band_names is not None and source_bands is not None:
        state_dict = adapt_input_bands(encoder, state_dict, source_bands, band_names, where)
    load_state_dict_strictly(encoder, state_dict, where)


def _canonical_band(name: str) -> str:
    """Band names compare without case and leading zeros: ``B01`` = ``B1``, ``B8a`` = ``B8A``."""
    return re.sub(r"(?<=[A-Za-z])0+(?=\d)", "", str(name)).upper()


def _first_conv(encoder: nn.Module) -> tuple[str, nn.Conv2d]:
    """The encoder's input convolution: its first ``Conv2d`` in module order."""
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError(f"{type(encoder).__name__} has no Conv2d, so its input bands cannot be selected by name.")


def adapt_input_bands(
    encoder: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source_bands: Sequence[str],
    target_bands: Sequence[str],
    source: str = "the weights",
) -> dict[str, torch.Tensor]:
    """Select the first convolution's input channels of ``state_dict`` by band name.

    Weights pretrained on ``source_bands`` (e.g. the 13 Sentinel-2 L1C bands) become weights
    for ``target_bands`` (e.g. ``["B02", "B03", "B04", "B08"]``): the input channel of every
    target band the weights saw is copied unchanged from that band's channel (names compare
    without case and leading zeros, so torchgeo's ``B1``/``B8a`` match ``B01``/``B8A``). A
    target band the weights never saw gets the channel that
    ``timm.models.adapt_input_conv(len(target_bands), weight, base_chans=len(source_bands))``
    gives its position (source channels repeated cyclically and scaled by
    ``len(source_bands) / len(target_bands)``; summed for a one-band target), and a warning
    names these bands. Other keys are returned unchanged.

    Args:
        encoder: the encoder the weights are for (its first ``Conv2d`` is the input layer).
        state_dict: the weights, in the encoder's layout.
        source_bands: the bands the weights were pretrained on, in order.
        target_bands: the encoder's input bands, in order.
        source: a description of the weights for messages.

    Raises:
        ValueError: the two band sets share no band (the message lists both), or the weights'
            input layer does not have ``len(source_bands)`` channels.
    """
    source_bands, target_bands = [str(b) for b in source_bands], [str(b) for b in target_bands]
    if source_bands == target_bands:
        return dict(state_dict)
    conv_name, conv = _first_conv(encoder)
    key = f"{conv_name}.weight"
    if key not in state_dict:
        raise ValueError(f"{source} has no {key!r}, the input convolution of this encoder.")
    weight = state_dict[key]
    if weight.ndim != 4 or weight.shape[1] != len(source_bands):
        raise ValueError(
            f"{source}: {key} has {tuple(weight.shape)} but the weights record {len(source_bands)} bands "
            f"{source_bands}; the recorded band names do not describe this layer."
        )
    if conv.in_channels != len(target_bands):
        raise ValueError(
            f"The encoder's input layer {conv_name} takes {conv.in_channels} channels but {len(target_bands)} band "
            f"names were given ({target_bands})."
        )
    index = {}
    for position, band in enumerate(source_bands):
        index.setdefault(_canonical_band(band), position)
    seen = [index.get(_canonical_band(band)) for band in target_bands]
    unseen = [band for band, position in zip(target_bands, seen) if position is None]
    if len(unseen) == len(target_bands):
        raise ValueError(
            f"None of the encoder's bands {target_bands} is among the bands {source} was pretrained on "
            f"({source_bands}). Check the band names (modalities={{name: {{'band_names': [...]}}}}) or use other weights."
        )
    from timm.models import adapt_input_conv

    adapted = adapt_input_conv(len(target_bands), weight.clone(), base_chans=len(source_bands)) if unseen else None
    channels = [
        weight[:, position] if position is not None else adapted[:, target]  # type: ignore[index]
        for target, position in enumerate(seen)
    ]
    if unseen:
        warnings.warn(
            f"Bands {unseen} are not among the bands {source} was pretrained on ({source_bands}); their input "
            "channels are initialised as timm.models.adapt_input_conv adapts channels (source channels repeated, "
            f"scaled by {len(source_bands)}/{len(target_bands)}).",
            stacklevel=2,
        )
    out = dict(state_dict)
    out[key] = torch.stack(channels, dim=1).contiguous()
    return out


# ------------------------------------------------------------------------------ source readers
def _describe(source: WeightsSource) -> str:
    if isinstance(source, Mapping):
        return "the given dict"
    if hasattr(source, "get_state_dict"):
        return f"torchgeo weight {source}"
    return str(source)


def _torch_load(path: Path) -> Any:
    """Load tensors safely; fall back to full unpickling for checkpoints with Python objects.

    Lightning checkpoints may hold hyper-parameters that ``weights_only`` refuses (e.g. paths);
    only load files you trust.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", weights_only=False)


def _torchgeo_weight_by_name(name: str) -> Any:
    from torchgeo.models import get_weight

    try:
        return get_weight(name)
    except (ValueError, KeyError, AttributeError) as err:
        raise FileNotFoundError(
            f"Weight source {name!r} is neither an existing file or folder nor a torchgeo weight name "
            "such as 'ResNet50_Weights.SENTINEL1_ALL_DECUR'. Pass a Lightning checkpoint of this package (.ckpt), "
            "a folder or file written by export_encoders, an authors' checkpoint (.pth), or a torchgeo weight."
        ) from err


def _from_torchgeo(weights: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta = dict(getattr(weights, "meta", None) or {})
    description = {"band_names": list(meta["bands"])} if meta.get("bands") else {}
    state_dict = _drop_classifier(dict(weights.get_state_dict(progress=True)), f"torchgeo weight {weights}")
    return state_dict, description


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return dict(load_file(str(path), device="cpu"))


def _from_hub_folder(folder: Path, modality: ModalitySelector) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A Hugging Face Hub model folder written by :func:`decur_lightning.export.export_pretrained`
    (``config.json`` with a ``decur`` section, ``model.safetensors``)."""
    config = json.loads((folder / "config.json").read_text())
    decur = config.get("decur") if isinstance(config, Mapping) else None
    weights_path = folder / "model.safetensors"
    if not isinstance(decur, Mapping) or not weights_path.is_file():
        raise ValueError(
            f"{folder} has a config.json but is not a model folder written by decur export (a config.json with a "
            "'decur' section and model.safetensors); pass the export folder with encoders.json or a file."
        )
    name = decur.get("modality")
    if modality is not None and modality not in (name, decur.get("position")):
        raise ValueError(
            f"{folder} holds the encoder of modality {name!r} (position {decur.get('position')}), but modality "
            f"{modality!r} was asked for."
        )
    return _load_safetensors(weights_path), _description(decur)


def _export_entries(folder: Path) -> tuple[list[_Entry], Path]:
    """The entries of an export folder's ``encoders.json`` (also version 0.1's ``modality_index``)."""
    manifest_path = folder / "encoders.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{folder} is a folder without encoders.json: pass the folder export_encoders wrote, or a file."
        )
    manifest = json.loads(manifest_path.read_text())
    if not isinstance(manifest, Mapping) or not all(isinstance(e, Mapping) and "file" in e for e in manifest.values()):
        raise ValueError(
            f"{manifest_path} is not an encoders.json written by export_encoders (name -> {{'file', ...}})."
        )
    entries = []
    for order, (name, entry) in enumerate(manifest.items(), start=1):
        position = entry.get("position", entry.get("modality_index", order))
        description = _description({**entry, "bands": entry.get("bands", entry.get("in_channels"))})
        others = entry.get("files") if isinstance(entry.get("files"), Mapping) else {}
        files = tuple(str(f) for f in others.values() if isinstance(f, str))
        entries.append(_Entry(str(name), int(position), file=str(entry["file"]), description=description, files=files))
    return entries, manifest_path


def _from_export_folder(folder: Path, modality: ModalitySelector) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    entries, _ = _export_entries(folder)
    entry = _select(entries, modality, str(folder))
    path = folder / str(entry.file)
    if path.suffix == ".safetensors":
        return _load_safetensors(path), entry.description
    return dict(torch.load(path, map_location="cpu", weights_only=True)), entry.description


def _check_export_file_modality(path: Path, modality: ModalitySelector) -> dict[str, Any]:
    """Refuse an exported ``encoder_<m>.*`` asked for as another modality (its encoders.json says);
    returns the file's description from that encoders.json (``{}`` if none)."""
    if not (path.parent / "encoders.json").is_file():
        return {}
    try:
        entries, manifest_path = _export_entries(path.parent)
    except ValueError:
        return {}  # an encoders.json of something else: the file speaks for itself
    for entry in entries:
        if path.name == entry.file or path.name in entry.files:
            if modality is not None and modality not in (entry.name, entry.position):
                raise ValueError(
                    f"{path} is the encoder of modality {entry.name!r} (position {entry.position}) according to "
                    f"{manifest_path}, but modality {modality!r} was asked for."
                )
            return entry.description
    return {}


def _from_loaded(
    obj: Mapping[str, Any], modality: ModalitySelector, where: str, options: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} holds a {type(obj).__name__}, not a checkpoint or state dict.")
    if "state_dict" in obj and "hyper_parameters" in obj:
        torchgeo = _from_torchgeo_layout(obj, modality, where)
        if torchgeo is not None:
            return torchgeo
        entries = _state_dict_entries(obj["state_dict"], obj["hyper_parameters"] or {}, where)
        entry = _select(entries, modality, where)
        return _entry_state_dict(obj["state_dict"], entry), entry.description
    if isinstance(obj.get("model"), Mapping):  # the authors' {'epoch', 'model', 'optimizer'}
        return _from_loaded(obj["model"], modality, f"{where} ['model']", options)
    if isinstance(obj.get("state_dict"), Mapping):
        return _from_loaded(obj["state_dict"], modality, f"{where} ['state_dict']", options)
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors or not obj:
        raise ValueError(
            f"{where} is not a state dict nor a known checkpoint layout: top-level keys {list(obj)[:20]}. "
            "Expected a Lightning checkpoint, an authors' checkpoint {'epoch', 'model', 'optimizer'}, or a "
            "state dict of tensors."
        )
    state_dict = _strip_prefix(dict(obj), "module.")
    if any(_AUTHORS_BACKBONE.match(k) for k in state_dict):
        return _from_authors_joint(state_dict, modality, where, options), {}
    legacy = tuple(f"encoder{p}." for p in _LEGACY_POSITIONS)
    if _has_prefix(state_dict, ("encoders.", *legacy)):  # a module's state dict without hyper-parameters
        entries = _state_dict_entries(state_dict, {}, where)
        return _entry_state_dict(state_dict, _select(entries, modality, where)), {}
    if _has_prefix(state_dict, ("backbone.",)):
        return _from_authors_backbone(state_dict, modality, where, options), {}
    return _drop_classifier(state_dict, where), {}


#: torchgeo's checkpoint layouts (``torchgeo.trainers.utils.extract_backbone``): the prefix of
#: the encoder keys, by the hyper-parameter that names the encoder.
_TORCHGEO_PREFIXES: dict[str, str] = {"backbone": "model.backbone.model.", "model": "model."}


def _from_torchgeo_layout(
    obj: Mapping[str, Any], modality: ModalitySelector, where: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """A checkpoint in torchgeo's layout (``decur export``'s ``*_torchgeo.ckpt``, or a torchgeo
    ``ClassificationTask`` checkpoint): ``None`` when ``obj`` is not one. A modality asked for
    must be the one ``decur export`` recorded (files of torchgeo itself record none)."""
    hparams = obj.get("hyper_parameters") or {}
    state_dict = obj["state_dict"]
    if not isinstance(hparams, Mapping) or _has_prefix(
        state_dict, ("encoders.", *(f"encoder{p}." for p in _LEGACY_POSITIONS))
    ):
        return None
    for hparam, prefix in _TORCHGEO_PREFIXES.items():
        if isinstance(hparams.get(hparam), str) and state_dict and all(k.startswith(prefix) for k in state_dict):
            stripped = {k[len(prefix) :]: v for k, v in state_dict.items()}
            decur = hparams.get("decur") if isinstance(hparams.get("decur"), Mapping) else {}
            if modality is not None and decur.get("modality") is not None:
                if modality not in (decur.get("modality"), decur.get("position")):
                    raise ValueError(
                        f"{where} holds the encoder of modality {decur['modality']!r} (position "
                        f"{decur.get('position')}), but modality {modality!r} was asked for."
                    )
            return _drop_classifier(stripped, where), _description(decur) if decur else {}
    return None


def _from_authors_joint(
    state_dict: dict[str, torch.Tensor], modality: ModalitySelector, where: str, options: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The authors' joint checkpoint: ``backbone_<k>.*`` per modality (k = position, no names)."""
    positions = sorted({int(m.group(1)) for k in state_dict if (m := _AUTHORS_BACKBONE.match(k))})
    entries = [_Entry(None, k, prefix=f"backbone_{k}.") for k in positions]
    entry = _select(entries, modality, where)
    trunk = _entry_state_dict(state_dict, entry)
    # One modality's view of the file: its backbone as 'backbone.*' beside the family parts
    # (e.g. RDA blocks) that the converters may claim; the other backbones and the projectors go.
    single = {f"backbone.{k}": v for k, v in trunk.items()}
    single.update(
        {
            k: v
            for k, v in state_dict.items()
            if not _AUTHORS_BACKBONE.match(k) and not k.startswith(_AUTHORS_NOT_ENCODER)
        }
    )
    converted = _convert_authors(single, entry.position, f"{where} ({entry.prefix}*)", options)
    return _drop_classifier(trunk if converted is None else converted, where)


def _from_authors_backbone(
    state_dict: dict[str, torch.Tensor], modality: ModalitySelector, where: str, options: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """An authors' backbone file with ``backbone.*`` keys (plus a family's parts, e.g. RDA blocks)."""
    converted = _convert_authors(state_dict, modality, where, options)
    if converted is not None:
        return _drop_classifier(converted, where)
    others = [k for k in state_dict if not k.startswith("backbone.")]
    if others:
        raise ValueError(
            f"{where} looks like an authors' backbone file (backbone.*) but also holds {others[:20]}, which no "
            "encoder family's converter claims; nothing is dropped silently: remove them or map the file yourself."
        )
    return _drop_classifier({k[len("backbone.") :]: v for k, v in state_dict.items()}, where)


def _convert_authors(
    state_dict: dict[str, torch.Tensor], position: ModalitySelector, where: str, options: Mapping[str, Any]
) -> dict[str, torch.Tensor] | None:
    for converter in AUTHORS_STATE_DICT_CONVERTERS:
        converted = converter(state_dict, position, source=where, **options)
        if converted is not None:
            return converted
    return None


def _drop_classifier(state_dict: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    dropped = [k for k in state_dict if k.startswith(_CLASSIFIER_PREFIXES)]
    if not dropped:
        return state_dict
    warnings.warn(f"Leaving out {dropped} of {where}: a classifier, not part of the encoder.", stacklevel=3)
    return {k: v for k, v in state_dict.items() if k not in dropped}


def _has_prefix(state_dict: Mapping[str, Any], prefixes: tuple[str, ...]) -> bool:
    return any(k.startswith(prefixes) for k in state_dict)


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def _prefixes(state_dict: Mapping[str, Any]) -> list[str]:
    return sorted({k.split(".", 1)[0] for k in state_dict})
