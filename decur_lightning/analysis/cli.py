"""Command line for :func:`decur_lightning.analysis.analyze`.

Examples:
    python -m decur_lightning.analysis --config examples/configs/quickstart.yaml \\
        --checkpoint runs/quickstart/version_0/checkpoints/last.ckpt --out analysis

    python -m decur_lightning.analysis --checkpoint last.ckpt --out analysis \\
        --data SyntheticMultimodalDataModule --data.num_val 128 --saliency_samples 32 \\
        --layer sar=layer3 --layer optical=layer3

``--config`` takes the YAML of the ``decur fit`` run (its ``data`` section is used; the
``trainer`` and ``model`` sections are ignored, the model comes from the checkpoint) or a YAML
with only a ``data`` section (``class_path`` / ``init_args``) and any of the options below.
The modalities are read from the checkpoint's module; options that take one value per modality
(``--layer``, ``--band_names``) name them, and a name the checkpoint lacks is an error that
lists its modalities. Cross-modal figures are made for every pair of modalities.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser
from lightning import LightningDataModule

import decur_lightning.datamodules  # noqa: F401  (datamodules usable by class name)

from .rda import rda_figure_for_checkpoint
from .report import analyze

__all__ = ["build_parser", "main"]

#: ``NAME=LAYER``: a modality name (an identifier) and a layer name.
_NAMED_LAYER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[^=]*$")

#: Sections of a ``decur fit`` config that the analysis accepts and ignores.
_FIT_SECTIONS = ("seed_everything", "trainer", "model", "ckpt_path", "optimizer", "lr_scheduler")


def build_parser() -> ArgumentParser:
    """The argument parser of ``python -m decur_lightning.analysis``."""
    parser = ArgumentParser(
        prog="python -m decur_lightning.analysis",
        description=(
            "Explainability analyses of a DeCUR checkpoint (paper Section 7), for every pair of its modalities: "
            "alignment histogram (eq. 7), t-SNE of embedding dimensions, GradCAM overlap, Integrated Gradients "
            "band importance and band permutation importance, and for RDA "
            "encoders the first principal component of the feature map with the deformable points (Fig. 5b). "
            "Writes PNG figures, statistics.json and analysis.npz into --out."
        ),
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML: a `decur fit` config or a `data:` section.")
    parser.add_argument("--checkpoint", type=str, required=True, help="DeCURModule .ckpt file.")
    parser.add_argument("--out", type=str, required=True, help="Output folder.")
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    parser.add_argument("--split", type=Literal["val", "test"], default="val")
    parser.add_argument("--max_samples", type=int, default=512, help="Samples for alignment and t-SNE.")
    parser.add_argument("--saliency_samples", type=int, default=64, help="Samples for GradCAM and IG (0 skips them).")
    parser.add_argument("--ig_steps", type=int, default=50)
    parser.add_argument("--ig_internal_batch_size", type=int | None, default=None)
    parser.add_argument(
        "--layer",
        type=str | dict[str, str | None] | None,
        default=None,
        help=(
            "GradCAM layer by modality name: --layer sar=layer3 --layer optical=layer2 (repeatable), "
            "--layer.sar=layer3, or a YAML mapping {sar: layer3}; --layer layer3 for every modality. "
            "Default: each encoder's deepest stage with maps of at least 4x4 for the data's image size "
            "(statistics.json records the choice under saliency.gradcam_layers)."
        ),
    )
    parser.add_argument("--comparison_checkpoint", type=str | None, default=None)
    parser.add_argument("--comparison_class", type=str | None, default=None, help="Class of the comparison module.")
    parser.add_argument("--comparison_label", type=str, default="comparison")
    parser.add_argument("--tsne", type=bool, default=True)
    parser.add_argument("--tsne_perplexity", type=float, default=30.0)
    parser.add_argument("--tsne_threads", type=int | None, default=None)
    parser.add_argument(
        "--band_names",
        type=dict[str, list[str]] | None,
        default=None,
        help="Band names by modality name, e.g. '{optical: [B2, B3, B4, B8]}' (default: those the checkpoint records).",
    )
    parser.add_argument(
        "--permutation_repeats",
        type=int,
        default=5,
        help=(
            "Permutations per band of the band permutation importance of the common and unique blocks, on the "
            "saliency samples (band_permutation_importance.png; 0 skips it)."
        ),
    )
    parser.add_argument(
        "--rda_samples",
        type=int,
        default=4,
        help="Images in rda_feature_points.png (Fig. 5b; RDA encoders only; 0 skips it).",
    )
    parser.add_argument(
        "--rda_layer",
        type=Literal["l3", "l4"],
        default="l3",
        help="Attention block for the RDA figure: after ResNet layer3 (l3) or layer4 (l4).",
    )
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    for section in _FIT_SECTIONS:
        # Plain values (not Any): jsonargparse would instantiate class specs given to Any.
        parser.add_argument(
            f"--{section}",
            type=dict | list | str | int | float | bool | None,
            default=None,
            help="Ignored (a section of a `decur fit` config).",
        )
    return parser


def expand_layer_flags(args: Sequence[str]) -> list[str]:
    """Rewrite ``--layer NAME=LAYER`` (and ``--layer=NAME=LAYER``) into jsonargparse's
    ``--layer.NAME=LAYER``, so that the flag can be repeated, one modality each."""
    out: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--layer" and index + 1 < len(args) and _NAMED_LAYER.match(args[index + 1]):
            name, layer = args[index + 1].split("=", 1)
            out.append(f"--layer.{name}={layer}")
            index += 2
            continue
        if arg.startswith("--layer=") and _NAMED_LAYER.match(arg.removeprefix("--layer=")):
            name, layer = arg.removeprefix("--layer=").split("=", 1)
            out.append(f"--layer.{name}={layer}")
        else:
            out.append(arg)
        index += 1
    return out


def main(args: list[str] | None = None) -> None:
    """The ``decur-analyze`` command: :func:`run`, exit status 0 on success."""
    run(args)


def run(args: list[str] | None = None) -> dict[str, Any]:
    """Parse ``args`` (default ``sys.argv[1:]``), run :func:`analyze`, print where the outputs are.

    For checkpoints with RDA encoders it also writes ``rda_feature_points.png``
    (:func:`~decur_lightning.analysis.rda.rda_figure_for_checkpoint`, Fig. 5b).

    Returns the statistics that :func:`analyze` returns (``figures`` including the RDA figure).
    """
    parser = build_parser()
    config = parser.parse_args(expand_layer_flags(sys.argv[1:] if args is None else list(args)))
    # jsonargparse >= 4.49 names it instantiate (instantiate_classes is deprecated).
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    datamodule = instantiate(config).data
    statistics = analyze(
        config.checkpoint,
        datamodule,
        config.out,
        split=config.split,
        max_samples=config.max_samples,
        saliency_samples=config.saliency_samples,
        ig_steps=config.ig_steps,
        ig_internal_batch_size=config.ig_internal_batch_size,
        layers=config.layer,
        comparison_checkpoint=config.comparison_checkpoint,
        comparison_class=config.comparison_class,
        comparison_label=config.comparison_label,
        tsne=config.tsne,
        tsne_perplexity=config.tsne_perplexity,
        tsne_threads=config.tsne_threads,
        band_names=config.band_names,
        permutation_repeats=config.permutation_repeats,
        device=config.device,
        seed=config.seed,
    )
    if config.rda_samples > 0:
        path = rda_figure_for_checkpoint(
            config.checkpoint,
            datamodule,
            config.out,
            split=config.split,
            samples=config.rda_samples,
            layer=config.rda_layer,
            device=config.device,
        )
        if path is None:
            print("No encoder of the checkpoint has residual deformable attention: rda_feature_points.png is skipped.")
        else:
            statistics["figures"]["rda_feature_points"] = str(path)
    summary = {key: statistics[key] for key in ("alignment", "figures")}
    saliency = statistics.get("saliency", {})
    scores = {
        "integrated_gradients": saliency.get("band_truth"),
        "band_permutation": saliency.get("band_permutation", {}).get("band_truth"),
    }
    if any(scores.values()):  # data with known bands: how well each importance finds them
        summary["band_truth"] = {
            name: {key: score[key] for key in ("skill", "ranking")} for name, score in scores.items() if score
        }
    print(json.dumps(summary, indent=2))
    print(f"Wrote {config.out}/statistics.json and analysis.npz")
    return statistics


if __name__ == "__main__":
    main()
