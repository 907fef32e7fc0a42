"""Pretrained encoders that load where users already work, with what they need to use them right.

:func:`export_pretrained` turns a checkpoint of this package (SSL or downstream) into files that
other libraries load with their own code, one encoder per modality (paper Sections 5.1-5.3
transfer these encoders):

===================================  ======================================================================
file                                 loads with
===================================  ======================================================================
``encoder_<m>.pt``                   ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...),``
                                     ``in_chans=C, num_classes=0)``; ``smp.Unet(encoder_name=name, in_channels=C).encoder``
                                     ``.load_state_dict(torch.load(...))``; plain ``load_state_dict``
``encoder_<m>.safetensors``          the same tensors, no unpickling (``safetensors.torch.load_file``; timm's ``file=``)
``encoder_<m>_torchgeo.ckpt``        ``torchgeo.trainers.ClassificationTask(model=name, weights=<file>, in_channels=C)``
                                     and ``SemanticSegmentationTask(model="unet", backbone=name, weights=<file>, ...)``
``hub_<m>/``                         a Hugging Face Hub model folder (``config.json``, ``model.safetensors``,
                                     ``README.md`` model card): ``timm.create_model("local-dir:hub_<m>")``, offline
``encoders.json``                    every modality in order, with its metadata (below)
===================================  ======================================================================

Metadata shipped with the weights (in ``encoders.json``, the Hub folder's ``config.json``
``decur`` section, the torchgeo file's ``hyper_parameters["decur"]`` and the model card):
modality name and position, encoder name, band names in order, the normalisation the
datamodule applied with its statistics (``Modality.normalization``, recorded in the
checkpoint's resolved ``hyper_parameters["modalities"]``; never guessed), its equivalent
per-band ``mean`` / ``std`` in timm's ``pretrained_cfg`` (``(x - mean) / std`` on the stored
values, see :func:`timm_mean_std`), the patch size, the pretraining run's hyper-parameters
(module and datamodule) and its last metrics where the checkpoint or its logger folder has them.

torchgeo, smp and the Hub folder need a timm model name (torchgeo builds its models with
timm / smp); encoders of this package's own families (``*_rda``, ``mit_b*``) are exported as
``.pt`` and ``.safetensors`` (they load into :func:`~decur_lightning.models.create_encoder`)
and the other formats are skipped with a warning.

Every file, and the folder, is again a weight source of this package
(:func:`~decur_lightning.weights.load_encoder_state_dict`), e.g.
``MultimodalClassificationModule(modalities={"s1": {"weights": "exported/hub_s1"}})``.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .weights import (
    _entry_state_dict,
    _export_name,
    _load_lightning_checkpoint,
    _state_dict_entries,
)

__all__ = ["EXPORT_FORMATS", "export_pretrained", "timm_mean_std"]

#: What :func:`export_pretrained` can write: ``pt`` (plain state dict), ``safetensors``,
#: ``torchgeo`` (Lightning-style checkpoint torchgeo's trainers read), ``hub`` (a Hugging Face
#: Hub model folder with a model card).
EXPORT_FORMATS: tuple[str, ...] = ("pt", "safetensors", "torchgeo", "hub")
#: Formats that need a timm model name (the libraries build the model from it).
_TIMM_FORMATS: tuple[str, ...] = ("torchgeo", "hub")


def timm_mean_std(normalization: Mapping[str, Any] | None, bands: int) -> tuple[list[float], list[float], str]:
    """Per-band ``mean`` / ``std`` with ``(x - mean) / std`` on the stored values equal to the
    datamodule's normalisation (before its clipping), for timm's ``pretrained_cfg``.

    ``mean_2std`` (paper B.1/B.2: ``[mean - 2 std, mean + 2 std] -> [0, 1]``, clipped) gives
    ``mean - 2 std`` and ``4 std``; ``scale`` gives ``0`` and ``divisor``; ``mean_std``
    gives ``divisor * mean`` and ``divisor * std``; ``none`` and the per-image
    ``percentile_min_max`` (no fixed affine map) give ``0`` and ``1``.

    Returns:
        ``(mean, std, note)``, ``note`` saying what the affine map leaves out (clipping, SAR
        outlier cuts, per-image scaling), ``""`` if nothing.
    """
    if not normalization:
        return [0.0] * bands, [1.0] * bands, "the normalisation is not recorded: mean 0, std 1 are placeholders"
    method = normalization.get("method")
    if method == "mean_2std":
        mean, std = list(normalization["mean"]), list(normalization["std"])
        note = "then clip to [0, 1]"
        if normalization.get("outlier_fraction"):
            share = float(normalization["outlier_fraction"])
            note = f"first clip each image's band to its {share / 2:g} / {1 - share / 2:g} quantiles, " + note
        return [m - 2 * s for m, s in zip(mean, std)], [4 * s for s in std], note
    if method == "scale":
        return [0.0] * bands, [float(normalization["divisor"])] * bands, ""
    if method == "mean_std":
        divisor = float(normalization.get("divisor", 1.0))
        return (
            [divisor * m for m in normalization["mean"]],
            [divisor * s for s in normalization["std"]],
            "",
        )
    if method == "percentile_min_max":
        return (
            [0.0] * bands,
            [1.0] * bands,
            f"no fixed map: clip each image's band to its {normalization.get('lower')} / "
            f"{normalization.get('upper')} quantiles and min-max scale it to [0, 1] first",
        )
    if method == "none":
        return [0.0] * bands, [1.0] * bands, ""
    raise ValueError(
        f"Unknown normalization method {method!r}; expected mean_2std, scale, mean_std, percentile_min_max or none."
    )


def _formats(formats: str | Iterable[str]) -> list[str]:
    if isinstance(formats, str):
        formats = [f for f in formats.replace(",", " ").split() if f]
    chosen = list(dict.fromkeys(formats))
    if chosen == ["all"]:
        return list(EXPORT_FORMATS)
    unknown = [f for f in chosen if f not in EXPORT_FORMATS]
    if unknown or not chosen:
        raise ValueError(f"Unknown export format(s) {unknown or chosen}; choose from {list(EXPORT_FORMATS)} or 'all'.")
    return chosen


def _json_safe(value: Any) -> Any:
    """Plain JSON values (paths, tuples and other objects become strings or lists)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def _last_metrics(checkpoint: Mapping[str, Any], path: Path | None) -> dict[str, Any]:
    """The run's last metrics: the checkpoint's ``metrics`` (if a module stores them), its
    ModelCheckpoint scores, and the last value of every column of the CSV logger's
    ``metrics.csv`` beside the checkpoint folder."""
    metrics: dict[str, Any] = {}
    if isinstance(checkpoint.get("metrics"), Mapping):
        metrics.update(_json_safe(checkpoint["metrics"]))
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if isinstance(state, Mapping) and "best_model_score" in state and state.get("monitor"):
            metrics[f"{state['monitor']} (best, {str(key).split('{')[0]})"] = _json_safe(state["best_model_score"])
    if path is not None:
        for candidate in (path.parent / "metrics.csv", path.parent.parent / "metrics.csv"):
            if candidate.is_file():
                with candidate.open(newline="") as handle:
                    for row in csv.DictReader(handle):
                        metrics.update({k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"})
                break
    return metrics


def _patch_size(hparams: Mapping[str, Any], data_hparams: Mapping[str, Any]) -> int | list[int] | None:
    for source in (hparams, data_hparams):
        for key in ("crop_size", "patch_size", "image_size", "size"):
            value = source.get(key)
            if value is not None:
                return _json_safe(value)
    return None


def _is_timm_name(name: str | None) -> bool:
    if not name:
        return False
    import timm

    return bool(timm.is_model(name))


def export_pretrained(
    checkpoint: str | Path | Mapping[str, Any],
    out_dir: str | Path,
    formats: str | Sequence[str] = EXPORT_FORMATS,
    *,
    metrics: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Path]]:
    """Export every modality's encoder of a checkpoint in the formats other libraries load.

    See the module docstring for the files and what loads them.

    Args:
        checkpoint: a ``.ckpt`` written by ``Trainer.fit`` on a module of this package (SSL or
            downstream), or the loaded dict.
        out_dir: folder to write into (created).
        formats: any of :data:`EXPORT_FORMATS` (a list, or a comma-separated string), or
            ``"all"``; default all. ``encoders.json`` is always written.
        metrics: metrics to record with the weights (e.g. a linear-probe accuracy), merged over
            those found in the checkpoint and its logger folder.

    Returns:
        ``{modality: {format: path}}`` in modality order.

    Example:
        >>> files = export_pretrained("last.ckpt", "exported")  # doctest: +SKIP
        >>> task = torchgeo.trainers.ClassificationTask(  # doctest: +SKIP
        ...     model="resnet50", weights=str(files["s1"]["torchgeo"]), in_channels=2, num_classes=19)
    """
    chosen = _formats(formats)
    path = None if isinstance(checkpoint, Mapping) else Path(checkpoint)
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
    hparams = dict(loaded.get("hyper_parameters") or {})
    data_hparams = dict(loaded.get("datamodule_hyper_parameters") or {})
    entries = _state_dict_entries(loaded["state_dict"], hparams, where)
    run = {
        "method": (loaded.get("decur_lightning") or {}).get("method"),
        "epoch": loaded.get("epoch"),
        "global_step": loaded.get("global_step"),
        "hyper_parameters": _json_safe(hparams),
        "datamodule_hyper_parameters": _json_safe(data_hparams),
        "metrics": {**_last_metrics(loaded, path), **_json_safe(dict(metrics or {}))},
        "weight_sources": _json_safe(loaded.get("weight_sources") or {}),
    }
    patch_size = _patch_size(hparams, data_hparams)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {}
    written: dict[str, dict[str, Path]] = {}
    skipped: list[str] = []
    for entry in entries:
        name = _export_name(entry)
        state_dict = {
            k: v.detach().cpu().contiguous() for k, v in _entry_state_dict(loaded["state_dict"], entry).items()
        }
        description = entry.description
        encoder = description.get("encoder")
        bands = description.get("bands") or _input_channels(state_dict)
        mean, std, note = timm_mean_std(description.get("normalization"), int(bands))
        meta = {
            "modality": name,
            "position": entry.position,
            **description,
            "bands": bands,
            "patch_size": patch_size,
            "pretrained_cfg": {"mean": mean, "std": std, "note": note},
        }
        files: dict[str, Path] = {}
        for fmt in chosen:
            if fmt in _TIMM_FORMATS and not _is_timm_name(encoder):
                skipped.append(f"{name} ({encoder}): {fmt}")
                continue
            files[fmt] = _WRITERS[fmt](out, name, state_dict, meta, run)
        if "pt" not in files and "safetensors" not in files:  # encoders.json names a state-dict file
            files["pt"] = _write_pt(out, name, state_dict, meta, run)
        written[name] = files
        manifest[name] = {
            "file": (files.get("pt") or files["safetensors"]).name,
            "files": {fmt: (p.name if p.parent == out else str(p.relative_to(out))) for fmt, p in files.items()},
            **meta,
            "pretraining": run,
        }
    if skipped:
        warnings.warn(
            f"Not exported: {skipped}. torchgeo and Hub-folder exports need a timm model name; this package's own "
            "encoders (*_rda, mit_b*) load from the .pt / .safetensors files with decur_lightning.models.create_encoder.",
            stacklevel=2,
        )
    (out / "encoders.json").write_text(json.dumps(manifest, indent=2))
    return written


def _input_channels(state_dict: Mapping[str, torch.Tensor]) -> int:
    first = next(v for v in state_dict.values() if v.ndim == 4)
    return int(first.shape[1])


# ------------------------------------------------------------------------------------- writers
def _write_pt(out: Path, name: str, state_dict: dict[str, torch.Tensor], meta: dict, run: dict) -> Path:
    path = out / f"encoder_{name}.pt"
    torch.save(state_dict, path)
    return path


def _safetensors_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    return {"format": "pt", "decur": json.dumps(_json_safe(meta))}


def _write_safetensors(out: Path, name: str, state_dict: dict[str, torch.Tensor], meta: dict, run: dict) -> Path:
    from safetensors.torch import save_file

    path = out / f"encoder_{name}.safetensors"
    save_file(state_dict, str(path), metadata=_safetensors_metadata(meta))
    return path


def _write_torchgeo(out: Path, name: str, state_dict: dict[str, torch.Tensor], meta: dict, run: dict) -> Path:
    """torchgeo's ``extract_backbone`` layout: ``hyper_parameters['backbone']`` names the model,
    the weights are ``model.backbone.model.<key>``; with no ``'model'`` hyper-parameter both
    ``ClassificationTask`` (timm model) and ``SemanticSegmentationTask`` (smp encoder) take
    this branch. Only plain values, so ``torch.load``'s default ``weights_only=True`` reads it."""
    path = out / f"encoder_{name}_torchgeo.ckpt"
    checkpoint = {
        "hyper_parameters": {
            "backbone": meta["encoder"],
            "in_channels": meta["bands"],
            "decur": _json_safe({**meta, "pretraining": run}),
        },
        "state_dict": {f"model.backbone.model.{k}": v for k, v in state_dict.items()},
    }
    torch.save(checkpoint, path)
    return path


def _hub_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    """timm's Hub ``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg``) plus ``decur``."""
    import timm

    encoder, bands = str(meta["encoder"]), int(meta["bands"])
    default = timm.create_model(encoder, pretrained=False, num_classes=0).pretrained_cfg
    size = meta.get("patch_size")
    side = list(size)[-2:] if isinstance(size, (list, tuple)) else [size or 224, size or 224]
    cfg = meta["pretrained_cfg"]
    pretrained_cfg = {
        "input_size": [bands, *side],
        "mean": cfg["mean"],
        "std": cfg["std"],
        "crop_pct": 1.0,
        "interpolation": default.get("interpolation", "bilinear"),
        "num_classes": 0,
        "first_conv": default.get("first_conv"),
        "classifier": default.get("classifier"),
    }
    return {
        "architecture": encoder,
        "num_classes": 0,
        "model_args": {"in_chans": bands, "num_classes": 0},
        "pretrained_cfg": {k: v for k, v in pretrained_cfg.items() if v is not None},
        "decur": _json_safe(meta),
    }


def _write_hub(out: Path, name: str, state_dict: dict[str, torch.Tensor], meta: dict, run: dict) -> Path:
    from safetensors.torch import save_file

    folder = out / f"hub_{name}"
    folder.mkdir(exist_ok=True)
    save_file(state_dict, str(folder / "model.safetensors"), metadata=_safetensors_metadata(meta))
    (folder / "config.json").write_text(json.dumps(_hub_config(meta), indent=2))
    (folder / "README.md").write_text(model_card(meta, run))
    return folder


_WRITERS = {"pt": _write_pt, "safetensors": _write_safetensors, "torchgeo": _write_torchgeo, "hub": _write_hub}


def _normalization_lines(meta: Mapping[str, Any]) -> list[str]:
    norm = meta.get("normalization")
    bands = meta.get("band_names") or [str(i) for i in range(int(meta["bands"]))]
    cfg = meta["pretrained_cfg"]
    if not norm:
        return ["The checkpoint does not record the normalisation these weights saw: ask whoever trained them."]
    lines = [f"Stored values: {norm.get('input', 'not recorded')}.", f"Method: `{norm['method']}`."]
    method = norm["method"]
    if method == "mean_2std":
        lines.append(
            "Each band maps `[mean - 2 std, mean + 2 std]` linearly to `[0, 1]` and is clipped (DeCUR paper, "
            "Appendix B.1/B.2: the 8-bit compression by band-wise mean and standard deviation, kept in float)."
        )
        if norm.get("outlier_fraction"):
            lines.append(
                f"SAR: each image's band is first clipped to its {norm['outlier_fraction'] / 2:g} / "
                f"{1 - norm['outlier_fraction'] / 2:g} quantiles (the paper's 2 % outlier cut)."
            )
    elif method == "scale":
        lines.append(f"`x / {norm['divisor']:g}`.")
    elif method == "mean_std":
        lines.append(f"`(x / {norm.get('divisor', 1):g} - mean) / std`.")
    elif method == "percentile_min_max":
        lines.append(
            f"Each image's band is clipped to its {norm.get('lower')} / {norm.get('upper')} quantiles and min-max "
            "scaled to `[0, 1]` (per image: no fixed statistics)."
        )
    lines += [
        "",
        "| band | " + " | ".join(k for k in ("mean", "std") if k in norm) + " | timm mean | timm std |",
        "|---|" + "---|" * (sum(k in norm for k in ("mean", "std")) + 2),
    ]
    for i, band in enumerate(bands):
        stats = [f"{norm[k][i]:.6g}" for k in ("mean", "std") if k in norm]
        lines.append(f"| {band} | " + " | ".join([*stats, f"{cfg['mean'][i]:.6g}", f"{cfg['std'][i]:.6g}"]) + " |")
    lines += [
        "",
        "timm's `pretrained_cfg` mean/std give the same affine map as `(x - mean) / std` on the stored "
        "values" + (f" ({cfg['note']})." if cfg.get("note") else "."),
    ]
    return lines


def model_card(meta: Mapping[str, Any], run: Mapping[str, Any]) -> str:
    """The model card (README.md) of a Hub folder: what the encoder is, its inputs and how to load it."""
    encoder, bands, name = meta["encoder"], meta["bands"], meta["modality"]
    band_names = meta.get("band_names")
    lines = [
        "---",
        "library_name: timm",
        "tags: [decur, self-supervised, multimodal, image-feature-extraction]",
        "---",
        "",
        f"# DeCUR {encoder} encoder of modality `{name}`",
        "",
        "Pretrained with decur-lightning (DeCUR: Decoupling Common and Unique Representations, ECCV 2024, "
        f"https://arxiv.org/abs/2309.05300). Modality `{name}` (position {meta.get('position')} of the run), "
        f"view kind `{meta.get('view')}`, encoder `{encoder}` with {bands} input bands, no classifier "
        "(`num_classes=0`).",
        "",
        "## Input",
        "",
        f"Bands, in this order: {', '.join(f'`{b}`' for b in band_names) if band_names else 'not recorded'}.",
        f"Patch size in pretraining: {meta.get('patch_size') or 'not recorded'} px.",
        "",
        *_normalization_lines(meta),
        "",
        "## Load",
        "",
        "```python",
        "import timm",
        f'encoder = timm.create_model("local-dir:<this folder>", pretrained=True)  # {bands} bands, num_classes=0, offline',
        "cfg = encoder.pretrained_cfg  # mean / std / band_names above",
        "```",
        "",
        "The export folder beside it also holds `encoder_<modality>.pt` / `.safetensors` (timm `pretrained_cfg_overlay=dict(file=...)`,",
        "smp `Unet(encoder_name=...).encoder.load_state_dict`) and `encoder_<modality>_torchgeo.ckpt` (torchgeo",
        "`ClassificationTask(model=..., weights=...)` / `SemanticSegmentationTask(backbone=..., weights=...)`).",
        "",
        "## Pretraining",
        "",
        f"Method {run.get('method')}, epoch {run.get('epoch')}, step {run.get('global_step')}.",
        "",
        "Last metrics:",
        "",
        "```json",
        json.dumps(run.get("metrics") or {}, indent=2),
        "```",
        "",
        "Module hyper-parameters:",
        "",
        "```json",
        json.dumps(run.get("hyper_parameters") or {}, indent=2),
        "```",
        "",
        "Datamodule hyper-parameters:",
        "",
        "```json",
        json.dumps(run.get("datamodule_hyper_parameters") or {}, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ command
def build_parser() -> Any:
    """The argument parser of ``decur export``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="decur export",
        description=(
            "Export every modality's encoder of a decur-lightning checkpoint so that torchgeo, smp, timm and "
            "Hugging Face tooling load it with their own code, with its bands, normalisation and pretraining run "
            "(encoders.json, a model card)."
        ),
    )
    parser.add_argument("--ckpt", required=True, help="A .ckpt written by `decur fit` (SSL or downstream module).")
    parser.add_argument("--out", required=True, help="Folder to write into (created).")
    parser.add_argument(
        "--format",
        dest="formats",
        action="append",
        help=f"Format(s) to write, repeatable or comma-separated: {', '.join(EXPORT_FORMATS)} or all (default all).",
    )
    return parser


def main(args: Sequence[str] | None = None) -> dict[str, dict[str, Path]]:
    """``decur export --ckpt CKPT --out DIR [--format pt,safetensors,torchgeo,hub]``: prints what it wrote."""
    config = build_parser().parse_args(None if args is None else list(args))
    formats = ",".join(config.formats) if config.formats else list(EXPORT_FORMATS)
    written = export_pretrained(config.ckpt, config.out, formats)
    for name, files in written.items():
        for fmt, path in files.items():
            print(f"{name}\t{fmt}\t{path}")
    print(f"{Path(config.out) / 'encoders.json'} describes them.")
    return written
