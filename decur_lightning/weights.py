"""Export and import of pretrained encoders.

A DeCUR checkpoint holds both modalities' encoders under ``encoder1.*`` and ``encoder2.*``.
:func:`export_encoders` writes each as a plain state dict that
``timm.create_model(name, in_chans=C, num_classes=0)`` loads strictly, so a pretrained encoder
can be used in any project without this package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["encoder_state_dict_from_checkpoint", "export_encoders"]


def _load_lightning_checkpoint(checkpoint_path: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}. Pass the .ckpt file written by Trainer.fit.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(
            f"{path} is not a Lightning checkpoint of a decur-lightning SSL module (it has no "
            "'state_dict' and 'hyper_parameters'). For the authors' released files use "
            "decur_lightning.weights.load_encoder_state_dict."
        )
    return checkpoint


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

    Args:
        checkpoint_path: a ``.ckpt`` written by ``Trainer.fit`` on a DeCURModule.
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
    for index in (1, 2):
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
