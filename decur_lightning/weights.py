"""Export and import of pretrained encoders.

A DeCUR checkpoint holds both modalities' encoders under ``encoder1.*`` and ``encoder2.*``.
:func:`export_encoders` writes each as a plain state dict that
``timm.create_model(name, in_chans=C, num_classes=0)`` loads strictly, so a pretrained encoder
can be used in any project without this package.

:func:`load_encoder_state_dict` reads one modality's encoder back from any source: this
package's checkpoints and exports, torchgeo's DeCUR weights, and every layout of the authors'
released checkpoints; :func:`load_state_dict_strictly` loads it into an encoder and lists the
keys when it does not fit.
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from .models.mit import MiTEncoder
from .models.rda import reference_points_state
from .models.resnet_rda import ResNetRDA

__all__ = [
    "EncoderWeightsMismatchError",
    "ModalitySelector",
    "WeightsSource",
    "encoder_state_dict_from_checkpoint",
    "export_encoders",
    "load_encoder_state_dict",
    "load_pretrained_encoder",
    "load_state_dict_strictly",
]


def _load_lightning_checkpoint(checkpoint_path: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}. Pass the .ckpt file written by Trainer.fit.")
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(
            f"{path} is not a Lightning checkpoint of a decur-lightning SSL module (it has no "
            "'state_dict' and 'hyper_parameters'). For the authors' released files use "
            "decur_lightning.weights.load_encoder_state_dict."
        )
    return checkpoint


def _encoder_indices(checkpoint: Mapping[str, Any]) -> list[int]:
    """Which of ``encoder1`` / ``encoder2`` a Lightning checkpoint holds (single-modal methods: one)."""
    return [i for i in (1, 2) if any(k.startswith(f"encoder{i}.") for k in checkpoint["state_dict"])]


def encoder_state_dict_from_checkpoint(checkpoint: dict[str, Any], index: int) -> dict[str, torch.Tensor]:
    """The state dict of encoder ``index`` (1 or 2) of a loaded Lightning checkpoint, prefix stripped."""
    prefix = f"encoder{index}."
    state_dict = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state_dict:
        raise ValueError(
            f"The checkpoint has no '{prefix}*' weights: it was not written by a decur-lightning "
            "multimodal SSL module (DeCURModule or a baseline)."
        )
    return state_dict


def export_encoders(checkpoint_path: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write one encoder state dict per modality from a DeCURModule checkpoint.

    Files: ``<out_dir>/encoder_<modality>.pt`` (a plain ``state_dict``) and
    ``<out_dir>/encoders.json`` describing each (encoder name, ``in_channels``, modality).
    Plain timm encoders load into ``timm.create_model(name, in_chans=C, num_classes=0)``
    strictly; encoders of this package (``*_rda``, ``mit_b*``) into
    ``decur_lightning.models.create_encoder(name, C)``.

    Args:
        checkpoint_path: a ``.ckpt`` written by ``Trainer.fit`` on a DeCURModule (or a baseline).
        out_dir: folder to write into (created).

    Returns:
        ``{modality: path}`` of the written state dicts.

    Example:
        >>> paths = export_encoders("last.ckpt", "exported")  # doctest: +SKIP
        >>> enc = timm.create_model("resnet50", in_chans=2, num_classes=0)  # doctest: +SKIP
        >>> enc.load_state_dict(torch.load(paths["s1"]))  # doctest: +SKIP
    """
    checkpoint = _load_lightning_checkpoint(checkpoint_path)
    hparams = checkpoint["hyper_parameters"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    manifest = {}
    # [1] when none: encoder_state_dict_from_checkpoint then says what is missing.
    for index in _encoder_indices(checkpoint) or [1]:
        modality = hparams.get(f"modality{index}", str(index))
        path = out / f"encoder_{modality}.pt"
        torch.save(encoder_state_dict_from_checkpoint(checkpoint, index), path)
        paths[modality] = path
        manifest[modality] = {
            "file": path.name,
            "encoder": hparams.get(f"encoder{index}"),
            "in_channels": hparams.get(f"in_channels{index}"),
            "modality_index": index,
        }
    (out / "encoders.json").write_text(json.dumps(manifest, indent=2))
    return paths


# ---------------------------------------------------------------------------------------------
# Import: one modality's encoder weights from any source
# ---------------------------------------------------------------------------------------------

#: A weight source: a file or folder path, a torchgeo weight (``WeightsEnum`` member or its
#: name, e.g. ``"ResNet50_Weights.SENTINEL1_ALL_DECUR"``), or an already loaded dict.
WeightsSource = Union[str, Path, Mapping[str, Any], Any]
#: Which encoder of a two-encoder source: ``1``, ``2``, a modality name the source records, or
#: ``None`` for sources that hold one encoder only.
ModalitySelector = Union[int, str, None]

_RDA_LEVELS: tuple[str, ...] = ("l3", "l4")
_CLASSIFIER_PREFIXES: tuple[str, ...] = ("fc.",)
_MAX_LISTED_KEYS = 20


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
            "Check the encoder name (e.g. resnet50 vs resnet50_rda vs mit_b2), in_channels, and which "
            "modality of the source you asked for (1, 2 or its name)."
        )
        super().__init__("\n".join(lines))


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

    Sources (paper Sections 5.1-5.3 transfer these encoders):

    - a Lightning checkpoint of a DeCURModule (or a baseline or downstream module of this
      package): ``state_dict`` keys ``encoder1.*`` / ``encoder2.*``; ``hyper_parameters``
      ``modality1`` / ``modality2`` name them, so ``modality`` may be a name;
    - what :func:`export_encoders` writes: the folder (``encoders.json`` names the modalities)
      or one ``encoder_<modality>.pt`` file;
    - a torchgeo weight, e.g. ``ResNet50_Weights.SENTINEL1_ALL_DECUR`` (2-band SAR) or
      ``SENTINEL2_ALL_DECUR`` (13-band optical), or its name (downloaded by torchgeo);
    - the authors' released files (github.com/zhu-xlab/DeCUR):

      * a joint checkpoint ``{'epoch', 'model', 'optimizer'}`` whose ``model`` holds
        ``module.backbone_1.*`` (modality 1; SAR in SAR-optical) and ``module.backbone_2.*``,
        projectors, and with RDA ``module.da1_l3.*``, ``module.da1_l4.*``, ``module.da2_*``;
        ``modality`` must be ``1`` or ``2`` (the file records no names);
      * a backbone-only file: bare ResNet keys (SAR file from ``backbone_1``, optical from
        ``backbone_2``) or MiT keys (``module.backbone_{1,2}.`` stripped, ``head`` dropped);
      * an RDA backbone file: ``backbone.*`` plus ``da1_l3/l4.*`` and/or ``da2_l3/l4.*``,
        mapped to the trunk and ``da_l3.*`` / ``da_l4.*``.

      The authors' attention blocks were trained with DAT's reference grid: the returned state
      dict sets ``da_l3._extra_state`` / ``da_l4._extra_state`` to ``"dat"`` (a warning says
      so), so the loaded encoder uses ``rda_reference_points="dat"``, also after it is saved and
      reloaded.

    Files are read with ``torch.load(weights_only=True)``; a checkpoint holding other Python
    objects (a Lightning checkpoint's hyper-parameters may) is then unpickled in full: load only
    files you trust.

    A classifier (``fc.*``) in a ResNet file (torchvision's 1000-class layer, or torchgeo's) is
    not part of an encoder and is left out, with a warning.

    Residual deformable attention: the authors' pretraining ran modality 2 through modality 1's
    blocks (``da1_*``) and never trained ``da2_*``. By default modality ``i`` gets ``da{i}_*``
    (its own blocks; a warning says that ``da2_*`` are untrained); ``rda_blocks=1`` takes
    ``da1_*``, the blocks modality 2 actually ran through during their pretraining.

    Args:
        source: a path (file or export folder), a torchgeo ``WeightsEnum`` member or its name,
            or an already loaded checkpoint / state dict.
        modality: ``1`` or ``2``, or a modality name where the source records names (Lightning
            checkpoints, export folders). ``None`` for sources holding one encoder.
        rda_blocks: which attention blocks (``1``: ``da1_*``, ``2``: ``da2_*``) to take from
            the authors' RDA files; ``None``: the modality's own.

    Returns:
        The encoder's state dict (tensors on the CPU).

    Raises:
        FileNotFoundError: if a path does not exist and is not a torchgeo weight name either.
        ValueError: if ``modality`` is needed and missing or unknown, or the source's layout is
            not one of the above (the message lists what it found).

    Example:
        >>> sd = load_encoder_state_dict("runs/pretrain/version_0/checkpoints/last.ckpt", "s1")  # doctest: +SKIP
        >>> encoder = create_encoder("resnet50", in_channels=2)  # doctest: +SKIP
        >>> load_state_dict_strictly(encoder, sd)  # doctest: +SKIP
    """
    if rda_blocks not in (None, 1, 2):
        raise ValueError(f"rda_blocks must be None, 1 or 2; got {rda_blocks!r}.")
    if isinstance(source, Mapping):
        return _from_loaded(source, modality, "the given dict", rda_blocks)
    if hasattr(source, "get_state_dict"):
        return _from_torchgeo(source)
    if not isinstance(source, (str, Path)):
        raise TypeError(
            f"Weight source must be a path, a torchgeo WeightsEnum member or its name, or a dict; "
            f"got {type(source).__name__}."
        )
    path = Path(source)
    if path.is_dir():
        return _from_export_folder(path, modality)
    if path.is_file():
        _check_export_file_modality(path, modality)
        return _from_loaded(_torch_load(path), modality, str(path), rda_blocks)
    return _from_torchgeo(_torchgeo_weight_by_name(str(source)))


def load_state_dict_strictly(
    encoder: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "the state dict"
) -> None:
    """Load ``state_dict`` into ``encoder``, every key accounted for.

    Raises :class:`EncoderWeightsMismatchError` with the missing, unexpected and mis-shaped keys
    when the weights do not fit. Two documented exceptions, each with a warning where weights
    stay at their initialisation:

    - a ``*_rda`` encoder (:class:`~decur_lightning.models.ResNetRDA`) given plain ResNet
      weights (no ``da_*`` keys): the trunk is loaded, the attention blocks keep their
      initialisation (close to the identity);
    - a MiT encoder (:class:`~decur_lightning.models.MiTEncoder`) given trunk-only MiT weights
      (the authors' MiT files drop the head; the head only serves the pooled ``forward``, not
      the segmentation feature maps) or ImageNet weights with a 1000-class ``head``: the head
      keeps its initialisation.
    """
    state_dict = dict(state_dict)
    expected = encoder.state_dict()
    optional: tuple[str, ...] = ()
    if isinstance(encoder, ResNetRDA) and not any(k.startswith(("da_l3.", "da_l4.")) for k in state_dict):
        optional = ("da_l3.", "da_l4.")
        warnings.warn(
            f"{source} holds a plain ResNet (no da_l3/da_l4 attention blocks): loading the trunk; the "
            "residual deformable attention blocks keep their initialisation (close to the identity).",
            stacklevel=2,
        )
    if isinstance(encoder, MiTEncoder):
        head = state_dict.get("head.weight")
        if head is not None and head.shape != expected["head.weight"].shape:
            warnings.warn(
                f"{source} has a MiT head of shape {tuple(head.shape)} (a classifier), not this encoder's "
                f"{tuple(expected['head.weight'].shape)} projection: the head keeps its initialisation.",
                stacklevel=2,
            )
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        if not any(k.startswith("head.") for k in state_dict):
            optional = ("head.",)
    # '<block>._extra_state' (an RDA block's reference grid) is optional: without it the block
    # keeps the grid it was built with (state dicts from before the switch, plain trunks).
    missing = [
        k for k in expected if k not in state_dict and not k.startswith(optional) and not k.endswith("._extra_state")
    ]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise EncoderWeightsMismatchError(source, missing, unexpected, mismatched)
    # Every key is checked above; strict=False only lets the documented optional blocks stay.
    encoder.load_state_dict(state_dict, strict=False)


def load_pretrained_encoder(
    encoder: nn.Module, source: WeightsSource, modality: ModalitySelector = None, *, rda_blocks: int | None = None
) -> None:
    """:func:`load_encoder_state_dict` followed by :func:`load_state_dict_strictly`."""
    state_dict = load_encoder_state_dict(source, modality, rda_blocks=rda_blocks)
    where = _describe(source) + (f" (modality {modality!r})" if modality is not None else "")
    load_state_dict_strictly(encoder, state_dict, where)


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
            "such as 'ResNet50_Weights.SENTINEL1_ALL_DECUR'. Pass a DeCUR Lightning checkpoint (.ckpt), "
            "a folder or file written by export_encoders, an authors' checkpoint (.pth), or a torchgeo weight."
        ) from err


def _from_torchgeo(weights: Any) -> dict[str, torch.Tensor]:
    return _drop_classifier(dict(weights.get_state_dict(progress=True)), f"torchgeo weight {weights}")


def _from_export_folder(folder: Path, modality: ModalitySelector) -> dict[str, torch.Tensor]:
    manifest_path = folder / "encoders.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{folder} is a folder without encoders.json: pass the folder export_encoders wrote, or a file."
        )
    manifest: dict[str, dict[str, Any]] = json.loads(manifest_path.read_text())
    if modality is None:
        if len(manifest) != 1:
            raise ValueError(
                f"{folder} holds the encoders of {sorted(manifest)}: pass modality=1, 2 or one of these names."
            )
        entry = next(iter(manifest.values()))
    elif isinstance(modality, str):
        if modality not in manifest:
            raise ValueError(f"{folder} has no encoder for modality {modality!r}; it has {sorted(manifest)}.")
        entry = manifest[modality]
    else:
        matches = [e for e in manifest.values() if e.get("modality_index") == modality]
        if len(matches) != 1:
            raise ValueError(f"{folder} has no encoder number {modality}; encoders.json lists {manifest}.")
        entry = matches[0]
    return dict(torch.load(folder / entry["file"], map_location="cpu", weights_only=True))


def _check_export_file_modality(path: Path, modality: ModalitySelector) -> None:
    """Refuse an exported ``encoder_<m>.pt`` asked for as another modality (its encoders.json says)."""
    manifest_path = path.parent / "encoders.json"
    if modality is None or not manifest_path.is_file():
        return
    for name, entry in json.loads(manifest_path.read_text()).items():
        if entry.get("file") != path.name:
            continue
        if modality not in (name, entry.get("modality_index")):
            raise ValueError(
                f"{path} is the encoder of modality {name!r} (number {entry.get('modality_index')}) according "
                f"to {manifest_path}, but modality {modality!r} was asked for."
            )


def _from_loaded(
    obj: Mapping[str, Any], modality: ModalitySelector, where: str, rda_blocks: int | None
) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} holds a {type(obj).__name__}, not a checkpoint or state dict.")
    if "state_dict" in obj and "hyper_parameters" in obj:
        return _from_lightning(obj, modality, where)
    if isinstance(obj.get("model"), Mapping):  # the authors' {'epoch', 'model', 'optimizer'}
        return _from_loaded(obj["model"], modality, f"{where} ['model']", rda_blocks)
    if isinstance(obj.get("state_dict"), Mapping):
        return _from_loaded(obj["state_dict"], modality, f"{where} ['state_dict']", rda_blocks)
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors or not obj:
        raise ValueError(
            f"{where} is not a state dict nor a known checkpoint layout: top-level keys {list(obj)[:20]}. "
            "Expected a Lightning checkpoint, an authors' checkpoint {'epoch', 'model', 'optimizer'}, or a "
            "state dict of tensors."
        )
    state_dict = _strip_prefix(dict(obj), "module.")
    if _has_prefix(state_dict, ("backbone_1.", "backbone_2.")):
        return _from_authors_joint(state_dict, modality, where, rda_blocks)
    if _has_prefix(state_dict, ("encoder1.", "encoder2.")):
        index = _index_without_names(modality, where, "encoder1.* / encoder2.*")
        return encoder_state_dict_from_checkpoint({"state_dict": state_dict}, index)
    if _has_prefix(state_dict, ("backbone.",)):
        return _from_authors_rda_backbone(state_dict, modality, where, rda_blocks)
    return _drop_classifier(state_dict, where)


def _from_lightning(checkpoint: Mapping[str, Any], modality: ModalitySelector, where: str) -> dict[str, torch.Tensor]:
    hparams = checkpoint["hyper_parameters"]
    names = {index: hparams.get(f"modality{index}") for index in (1, 2)}
    present = _encoder_indices(checkpoint)
    if modality is None:
        if len(present) != 1:
            raise ValueError(
                f"{where} holds two encoders ({names[1]!r}, {names[2]!r}): pass modality=1, 2 or a name."
            )
        index = present[0]
    elif isinstance(modality, str):
        matches = [i for i, name in names.items() if name == modality]
        if not matches:
            raise ValueError(
                f"{where} has no modality {modality!r}; its modalities are {names[1]!r} (1) and {names[2]!r} (2)."
            )
        index = matches[0]
    else:
        index = _check_index(modality)
    return encoder_state_dict_from_checkpoint(checkpoint, index)


def _from_authors_joint(
    state_dict: dict[str, torch.Tensor], modality: ModalitySelector, where: str, rda_blocks: int | None
) -> dict[str, torch.Tensor]:
    index = _index_without_names(modality, where, "the authors' backbone_1 / backbone_2")
    prefix = f"backbone_{index}."
    trunk = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not trunk:
        raise ValueError(f"{where} has no '{prefix}*' weights; its prefixes are {_prefixes(state_dict)}.")
    return {**_drop_classifier(trunk, where), **_rda_blocks(state_dict, index, where, rda_blocks)}


def _from_authors_rda_backbone(
    state_dict: dict[str, torch.Tensor], modality: ModalitySelector, where: str, rda_blocks: int | None
) -> dict[str, torch.Tensor]:
    trunk = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    groups = [i for i in (1, 2) if _has_prefix(state_dict, (f"da{i}_l3.", f"da{i}_l4."))]
    known = ("backbone.", "da1_l3.", "da1_l4.", "da2_l3.", "da2_l4.")
    others = [k for k in state_dict if not k.startswith(known)]
    if others:
        raise ValueError(
            f"{where} looks like an authors' RDA backbone file (backbone.*, da1_*/da2_*) but also holds "
            f"{others[:20]}; nothing is dropped silently: remove them or map the file yourself."
        )
    if rda_blocks is not None or len(groups) != 1:
        index = rda_blocks if rda_blocks is not None else _index_without_names(
            modality, where, "the blocks da1_* / da2_*"
        )
    else:
        index = groups[0]
    blocks = _rda_blocks(state_dict, index, where, rda_blocks=index) if groups else {}
    return {**_drop_classifier(trunk, where), **blocks}


def _rda_blocks(
    state_dict: dict[str, torch.Tensor], index: int, where: str, rda_blocks: int | None
) -> dict[str, torch.Tensor]:
    """``da{k}_l3.* / da{k}_l4.*`` renamed to ``da_l3.* / da_l4.*`` (k = ``rda_blocks`` or ``index``)."""
    if not _has_prefix(state_dict, ("da1_", "da2_")):
        return {}
    source_index = rda_blocks if rda_blocks is not None else index
    blocks: dict[str, torch.Tensor] = {}
    for level in _RDA_LEVELS:
        prefix = f"da{source_index}_{level}."
        blocks.update({f"da_{level}.{k[len(prefix):]}": v for k, v in state_dict.items() if k.startswith(prefix)})
    if not blocks:
        raise ValueError(f"{where} has no 'da{source_index}_l3.*' / 'da{source_index}_l4.*' attention blocks.")
    for level in _RDA_LEVELS:
        if any(k.startswith(f"da_{level}.") for k in blocks):
            blocks[f"da_{level}._extra_state"] = reference_points_state("dat")
    warnings.warn(
        f"The attention blocks of {where} were trained with DAT's reference grid ((i + 0.5) / (H_G - 1)): "
        "the encoder switches to rda_reference_points='dat' (saved with its state dict).",
        stacklevel=3,
    )
    if source_index == 2:
        warnings.warn(
            f"Loading the da2_* attention blocks of {where}: the authors' pretraining code ran modality 2 "
            "through modality 1's blocks (da1_*) and never trained da2_*, so these are untrained. "
            "Use load_encoder_state_dict(..., rda_blocks=1) for the blocks modality 2 ran through.",
            stacklevel=3,
        )
    return blocks


def _drop_classifier(state_dict: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    dropped = [k for k in state_dict if k.startswith(_CLASSIFIER_PREFIXES)]
    if not dropped:
        return state_dict
    warnings.warn(
        f"Leaving out {dropped} of {where}: a classifier, not part of the encoder.", stacklevel=3
    )
    return {k: v for k, v in state_dict.items() if k not in dropped}


def _check_index(modality: int) -> int:
    if modality not in (1, 2) or isinstance(modality, bool):
        raise ValueError(f"modality must be 1, 2 or a modality name; got {modality!r}.")
    return int(modality)


def _index_without_names(modality: ModalitySelector, where: str, what: str) -> int:
    if modality is None or isinstance(modality, str):
        raise ValueError(
            f"{where} holds two encoders ({what}) and records no modality names, so modality "
            f"{modality!r} cannot be resolved: pass modality=1 or 2 (in the authors' SAR-optical "
            "checkpoints 1 is SAR, 2 optical; downstream modules: weights_modality1/2)."
        )
    return _check_index(modality)


def _has_prefix(state_dict: Mapping[str, Any], prefixes: tuple[str, ...]) -> bool:
    return any(k.startswith(prefixes) for k in state_dict)


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def _prefixes(state_dict: Mapping[str, Any]) -> list[str]:
    return sorted({k.split(".", 1)[0] for k in state_dict})
