"""All explainability analyses of a trained DeCUR checkpoint in one call (paper Section 7,
Appendix D): :func:`analyze` writes the figures and ``statistics.json``, for every modality and
every pair of modalities of the checkpoint.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning import LightningDataModule, LightningModule
from torch.utils.data import DataLoader

from .alignment import (
    alignment_histogram_figure,
    alignment_per_pair,
    alignment_statistics,
    collect_embeddings,
    summarize,
)
from .band_permutation import band_permutation_importance
from .pairs import modality_mapping, model_pairs, pair_common_dims, pair_label, pair_suffix
from .plotting import save_figure
from .saliency import (
    OUTPUT_NAMES,
    band_importance_figure,
    band_truth_score,
    overlap_histogram_figure,
    saliency_analysis,
    saliency_examples_figure,
)
from .tsne import dimension_tsne, dimension_tsne_figure, tsne_groups

__all__ = ["analyze", "load_ssl_module"]

Split = Literal["val", "test"]


def _resolve_class(module_class: type[LightningModule] | str | None) -> type[LightningModule]:
    if module_class is None:
        from ..ssl import DeCURModule

        return DeCURModule
    if not isinstance(module_class, str):
        return module_class
    if "." not in module_class:
        from .. import ssl

        found = getattr(ssl, module_class, None)
        if found is None:
            raise ValueError(
                f"No module class {module_class!r} in decur_lightning.ssl; give its full import path "
                "(e.g. 'decur_lightning.ssl.DeCURModule' or 'my_package.MyModule')."
            )
        return found
    module_name, _, class_name = module_class.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"Cannot import the module class {module_class!r}: {err}") from err


def load_ssl_module(
    checkpoint_path: str | Path,
    module_class: type[LightningModule] | str | None = None,
    device: str | torch.device = "cpu",
) -> LightningModule:
    """Load a multimodal SSL checkpoint written by ``Trainer.fit`` / ``decur fit``, in eval mode.

    The file is unpickled (its hyper-parameters are Python objects): load only checkpoints you trust.

    Args:
        checkpoint_path: the ``.ckpt`` file.
        module_class: the LightningModule class that wrote it: a class, its name in
            :mod:`decur_lightning.ssl`, or an import path; ``None`` means
            :class:`~decur_lightning.ssl.DeCURModule`.
        device: where to put the model.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No checkpoint at {path}. Pass the .ckpt file written by Trainer.fit (e.g. .../checkpoints/last.ckpt)."
        )
    cls = _resolve_class(module_class)
    try:
        # Lightning checkpoints hold pickled hyper-parameters: load only files you trust.
        model = cls.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    except (KeyError, TypeError, RuntimeError) as err:
        _raise_if_numbered(path, err)
        raise ValueError(
            f"Could not load {path} as a {cls.__name__}: {err}. If another module class wrote it (e.g. a "
            "baseline), pass its class as module_class / --comparison_class."
        ) from err
    return model.to(device).eval()


def _raise_if_numbered(path: Path, err: Exception) -> None:
    """A clear error for checkpoints of version 0.1 (numbered hyper-parameters ``modality<i>`` / ``encoder<i>``)."""
    try:
        hparams = torch.load(path, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    except Exception:  # noqa: BLE001 - the original error is the one to report
        return
    if isinstance(hparams, Mapping) and any(f"modality{i}" in hparams or f"encoder{i}" in hparams for i in (1, 2)):
        raise ValueError(
            f"{path} was written by decur-lightning 0.1 (numbered modalities): it cannot be analysed as a module "
            "by this version. Its encoders load as weights: DeCURModule(modalities={'<name>': {'weights': "
            f"'{path}', 'weights_modality': '<its modality name>'}}, ...)."
        ) from err


def _dataloader(datamodule: LightningDataModule, split: Split) -> DataLoader:
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test'; got {split!r}.")
    datamodule.prepare_data()
    datamodule.setup("validate" if split == "val" else "test")
    loader = getattr(datamodule, f"{split}_dataloader")()
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()))
    elif isinstance(loader, (list, tuple)):
        loader = loader[0]
    return loader


def _band_names(model: LightningModule, band_names: Mapping[str, Sequence[str]] | None) -> dict[str, list[str] | None]:
    """Band names by modality: the given ones, else those the module's modality descriptions record."""
    given = modality_mapping(model, band_names, "band_names")
    specs = getattr(getattr(model, "encoders", None), "specs", {})
    recorded = {name: getattr(specs.get(name), "band_names", None) for name in model.modalities}
    return {name: list(given[name] or recorded[name] or []) or None for name in model.modalities}


def analyze(
    checkpoint_path: str | Path,
    datamodule: LightningDataModule,
    out_dir: str | Path,
    *,
    split: Split = "val",
    max_samples: int = 512,
    saliency_samples: int = 64,
    ig_steps: int = 50,
    ig_internal_batch_size: int | None = None,
    layers: str | Mapping[str, str | None] | None = None,
    comparison_checkpoint: str | Path | None = None,
    comparison_class: type[LightningModule] | str | None = None,
    comparison_label: str = "comparison",
    tsne: bool = True,
    tsne_perplexity: float = 30.0,
    tsne_threads: int | None = None,
    band_names: Mapping[str, Sequence[str]] | None = None,
    permutation_repeats: int = 5,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Run the explainability analyses of paper Section 7 on a DeCUR checkpoint, for every
    modality and every pair of modalities.

    On up to ``max_samples`` un-augmented samples of the datamodule's ``split``:

    1. cross-modal alignment per dimension, eq. 7, common and unique apart, for every pair of
       modalities, optionally beside a comparison model such as cross-modal Barlow Twins
       (Fig. 5a): ``alignment_histogram.png`` for two modalities, one
       ``alignment_histogram_<m>_<n>.png`` per pair for more;
    2. t-SNE of the embedding dimensions of all modalities in one map (Fig. 1, 8):
       ``embedding_tsne.png`` (one map per pair, ``embedding_tsne_<m>_<n>.png``, when the
       pairs have different common-dimension counts);

    and on the first ``saliency_samples`` of them (Algorithm 2, Fig. 6):

    3. GradCAM overlap scores of every pair of modalities for the common and unique outputs:
       ``saliency_overlap.png`` and example maps ``saliency_examples.png`` (with the suffix
       ``_<m>_<n>`` per pair for more than two modalities). The layer and its map size are
       recorded (``saliency.gradcam_layers``); samples whose maps are zero or constant are
       left out of the overlap statistics and counted (``undefined``, ``degenerate``, with a
       ``note``), and the figure says so;
    4. Integrated Gradients band importances, one panel per modality: ``band_importance.png``;
       when the datamodule knows which bands carry shared and private factors (a
       ``band_truth`` attribute, as the synthetic data's), the importance is scored against it
       (``saliency.band_truth``, :func:`~decur_lightning.analysis.band_truth_score`);
    5. band permutation importance of the common and unique blocks on the same samples
       (:func:`~decur_lightning.analysis.band_permutation_importance`: how far each block moves
       when one band is permuted across samples), ``band_permutation_importance.png``, and with a
       band truth its score (``saliency.band_permutation``). Unlike the Integrated Gradients
       importance of Algorithm 2 (the paper's statistic, kept as it is), it measures which bands
       each block's information comes from.

    Everything numeric goes to ``statistics.json`` (summaries; per-pair entries keyed
    ``"<m>_<n>"``, per-modality entries by name) and ``analysis.npz`` (the per-dimension
    alignments ``alignment_<m>_<n>``, t-SNE coordinates, per-sample overlap scores
    ``overlap_<m>_<n>_<output>``, band importances ``band_importance_<modality>_<output>`` and
    ``band_permutation_importance_<modality>_<output>``, for re-plotting).

    Args:
        checkpoint_path: a DeCURModule ``.ckpt``; the modalities are read from it.
        datamodule: a datamodule with the model's ``image_<modality>`` keys.
        out_dir: folder for the outputs (created).
        split: ``"val"`` or ``"test"``.
        max_samples: samples for the alignment and t-SNE.
        saliency_samples: samples for GradCAM and Integrated Gradients (each costs about
            ``2 * (ig_steps + 2)`` forward-backward passes per modality).
        ig_steps: Integrated Gradients steps.
        ig_internal_batch_size: inputs per forward pass inside IG (``None``: the loader's batch
            size).
        layers: GradCAM layer name of every encoder, or ``{modality: name}`` (``None``, or a
            modality left out: the deepest stage whose maps are at least 4 x 4 for the data's
            image size, e.g. ``layer2`` of a ResNet at 32 px; recorded in
            ``statistics.json`` under ``saliency.gradcam_layers``).
        comparison_checkpoint: optional checkpoint of a comparison model with the same
            modalities (Fig. 5a).
        comparison_class: its LightningModule class (class, name in :mod:`decur_lightning.ssl`
            or import path; default DeCURModule).
        comparison_label: legend label of the comparison model.
        tsne: run the t-SNE (it dominates the run time for large ``K``).
        tsne_perplexity: t-SNE perplexity.
        tsne_threads: cap on scikit-learn's threads for t-SNE (``1`` helps on busy machines).
        band_names: ``{modality: [band names]}`` for the band importance plot (default: the
            band names the checkpoint's modality descriptions record, else ``b1, b2, ...``).
        permutation_repeats: permutations per band of the band permutation importance (each
            costs one forward pass of the ``saliency_samples`` per band); 0 skips it.
        device: ``"cpu"``, ``"cuda"``, ...
        seed: t-SNE seed.

    Returns:
        The content of ``statistics.json``, plus ``"figures"``: ``{name: path}`` (names are
        the file names without ``.png``).

    Example:
        >>> from decur_lightning.datamodules import SyntheticMultimodalDataModule
        >>> stats = analyze("runs/quickstart/version_0/checkpoints/last.ckpt",
        ...                 SyntheticMultimodalDataModule(), "analysis")  # doctest: +SKIP
        >>> stats["alignment"]["sar_optical"]["unique"]["mean"]  # doctest: +SKIP
    """
    if isinstance(permutation_repeats, bool) or not isinstance(permutation_repeats, int) or permutation_repeats < 0:
        raise ValueError(
            f"permutation_repeats must be an int >= 0 (0 skips the band permutation importance); got {permutation_repeats!r}."
        )
    out = Path(out_dir)
    model = load_ssl_module(checkpoint_path, None, device)
    modalities = tuple(model.modalities)
    pairs = model_pairs(model)
    if not pairs:
        raise ValueError(
            f"The checkpoint's model has one modality ({list(modalities)}): the analyses compare two or more."
        )
    layer_of = modality_mapping(model, layers, "layers")
    bands_of = _band_names(model, band_names)
    loader = _dataloader(datamodule, split)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    arrays: dict[str, np.ndarray] = {}

    def save(name: str, figure: Any) -> None:
        figures[name] = str(save_figure(figure, out / f"{name}.png"))

    embeddings = collect_embeddings(model, loader, max_samples)
    first = embeddings[modalities[0]]
    if first.shape[0] < 2:
        raise ValueError(f"The {split} split gave {first.shape[0]} sample; the analyses need at least 2.")
    alignment = alignment_per_pair(embeddings, pairs)
    common = {pair: pair_common_dims(model, *pair) for pair in pairs}
    statistics: dict[str, Any] = {
        "checkpoint": str(checkpoint_path),
        "split": split,
        "modalities": list(modalities),
        "pairs": [pair_label(pair) for pair in pairs],
        "embedding_dim": int(first.shape[1]),
        "common_dims": {pair_label(pair): common[pair] for pair in pairs},
        "num_samples": int(first.shape[0]),
        "alignment": {pair_label(pair): alignment_statistics(alignment[pair], common[pair]) for pair in pairs},
    }
    comparison: dict[tuple[str, str], Any] = {}
    if comparison_checkpoint is not None:
        comparison_model = load_ssl_module(comparison_checkpoint, comparison_class, device)
        lacking = sorted(set(modalities) - set(comparison_model.modalities))
        if lacking:
            raise ValueError(
                f"The comparison model has the modalities {list(comparison_model.modalities)}, not {lacking}: "
                "compare models of the same modalities."
            )
        comparison_embeddings = collect_embeddings(comparison_model, loader, max_samples, modalities)
        comparison = alignment_per_pair(comparison_embeddings, pairs)
        statistics["comparison"] = {
            "checkpoint": str(comparison_checkpoint),
            "label": comparison_label,
            "alignment": {
                pair_label(pair): alignment_statistics(comparison[pair], pair_common_dims(comparison_model, *pair))
                for pair in pairs
            },
        }
    for pair in pairs:
        label = pair_label(pair)
        arrays[f"alignment_{label}"] = alignment[pair].numpy()
        if pair in comparison:
            arrays[f"comparison_alignment_{label}"] = comparison[pair].numpy()
        title = f"Cross-modal alignment per dimension (eq. 7): {pair[0]}-{pair[1]}"
        figure = alignment_histogram_figure(
            alignment[pair], common[pair], comparison.get(pair), comparison_label, title
        )
        save(f"alignment_histogram{pair_suffix(pair, len(pairs))}", figure)

    if tsne:
        for suffix, (names, kc) in tsne_groups(modalities, common).items():
            result = dimension_tsne(
                {name: embeddings[name] for name in names},
                kc,
                perplexity=tsne_perplexity,
                seed=seed,
                num_threads=tsne_threads,
            )
            arrays[f"tsne_coordinates{suffix}"] = result.coordinates
            arrays[f"tsne_modality{suffix}"] = result.modality
            arrays[f"tsne_common{suffix}"] = result.common
            save(f"embedding_tsne{suffix}", dimension_tsne_figure(result))

    if saliency_samples > 0:
        saliency = saliency_analysis(
            model,
            loader,
            max_samples=saliency_samples,
            reference=embeddings,
            layers=layer_of,
            ig_steps=ig_steps,
            ig_internal_batch_size=ig_internal_batch_size,
        )
        statistics["saliency"] = _saliency_statistics(saliency, bands_of, ig_steps)
        truth = _band_truth(datamodule, modalities)
        if truth is not None:
            statistics["saliency"]["band_truth"] = band_truth_score(saliency.band_importance, truth)
        for pair in pairs:
            label, suffix = pair_label(pair), pair_suffix(pair, len(pairs))
            for name in OUTPUT_NAMES:
                arrays[f"overlap_{label}_{name}"] = saliency.overlap[pair][name].numpy()
                arrays[f"overlap_degenerate_{label}_{name}"] = saliency.degenerate[pair][name].numpy()
            title = f"Spatial saliency statistics: {pair[0]}-{pair[1]}"
            note = "GradCAM at " + ", ".join(f"{m} {_layer_text(saliency.layers[m])}" for m in pair)
            figure = overlap_histogram_figure(
                saliency.overlap[pair], title=title, degenerate=saliency.degenerate[pair], note=note
            )
            save(f"saliency_overlap{suffix}", figure)
            save(f"saliency_examples{suffix}", saliency_examples_figure(saliency, pair=pair))
        for modality in modalities:
            for name in OUTPUT_NAMES:
                arrays[f"band_importance_{modality}_{name}"] = saliency.band_importance[modality][name].numpy()
        title = "Spectral saliency statistics"
        if truth is not None and statistics["saliency"]["band_truth"]["skill"] is not None:
            score = statistics["saliency"]["band_truth"]
            title += f" (known bands found: skill {score['skill']:.2f}, ranking {score['ranking']:.2f}; chance 0, 0.5)"
        save("band_importance", band_importance_figure(saliency.band_importance, bands_of, title=title))
        if permutation_repeats > 0:
            permutation = band_permutation_importance(
                model,
                loader,
                max_samples=saliency_samples,
                reference=embeddings,
                repeats=permutation_repeats,
                seed=seed,
            )
            section: dict[str, Any] = {
                "num_samples": saliency.num_samples,  # the same first samples of the loader
                "repeats": permutation_repeats,
                "importance": _importance_statistics(permutation, bands_of),
            }
            title = "Band permutation importance (block change when one band is permuted)"
            if truth is not None:
                section["band_truth"] = band_truth_score(permutation, truth)
                if section["band_truth"]["skill"] is not None:
                    score = section["band_truth"]
                    title += (
                        f"\nknown bands found: skill {score['skill']:.2f}, ranking {score['ranking']:.2f}"
                        " (chance 0, 0.5)"
                    )
            statistics["saliency"]["band_permutation"] = section
            for modality in modalities:
                for name in OUTPUT_NAMES:
                    arrays[f"band_permutation_importance_{modality}_{name}"] = permutation[modality][name].numpy()
            figure = band_importance_figure(
                permutation, bands_of, title=title, ylabel="normalised block change (mean, std over permutations)"
            )
            save("band_permutation_importance", figure)

    np.savez(out / "analysis.npz", **arrays)
    (out / "statistics.json").write_text(json.dumps(statistics, indent=2))
    return {**statistics, "figures": figures}


def _layer_text(layer: Any) -> str:
    size = "not spatial" if layer.map_size is None else f"{layer.map_size[0]}x{layer.map_size[1]}"
    return f"{layer.name} ({size})"


def _band_truth(datamodule: LightningDataModule, modalities: Sequence[str]) -> dict[str, Any] | None:
    """The datamodule's band truth (data with a known answer, e.g. the synthetic data), if any."""
    truth = getattr(datamodule, "band_truth", None)
    if not isinstance(truth, Mapping) or not all(name in truth for name in modalities):
        return None
    return {name: truth[name] for name in modalities}


def _overlap_summary(values: torch.Tensor, degenerate: torch.Tensor) -> dict[str, Any]:
    """Summary of the defined, non-degenerate overlap scores, with the counts left out."""
    undefined = values.isnan()
    flat = degenerate.bool() & ~undefined
    kept = values[~undefined & ~flat]
    summary: dict[str, Any] = {**summarize(kept), "undefined": int(undefined.sum()), "degenerate": int(flat.sum())}
    if kept.numel() == 0:
        summary["note"] = "no sample with spatially informative maps of both modalities: no overlap statistic"
    elif int(undefined.sum()) + int(flat.sum()):
        summary["note"] = (
            f"over {kept.numel()} of {values.numel()} samples; left out: {int(undefined.sum())} with a map zero "
            f"everywhere (undefined), {int(flat.sum())} with a constant map (no spatial information)"
        )
    return summary


def _importance_statistics(
    importance: Mapping[str, Mapping[str, torch.Tensor]], band_names: Mapping[str, Sequence[str] | None]
) -> dict[str, Any]:
    """Per modality: band names, and mean and std over rows of each output's band importance."""
    bands: dict[str, Any] = {}
    for modality, per_output in importance.items():
        num_bands = per_output["common"].shape[1]
        names = list(band_names.get(modality) or [f"b{i + 1}" for i in range(num_bands)])
        bands[modality] = {"bands": names}
        for name, scores in per_output.items():
            bands[modality][name] = {
                "mean": scores.mean(0).tolist(),
                "std": scores.std(0, unbiased=False).tolist(),
            }
    return bands


def _saliency_statistics(
    saliency: Any, band_names: Mapping[str, Sequence[str] | None], ig_steps: int
) -> dict[str, Any]:
    bands = _importance_statistics(saliency.band_importance, band_names)
    return {
        "num_samples": saliency.num_samples,
        "gradcam_layers": {
            modality: {
                "name": layer.name,
                "map_size": None if layer.map_size is None else list(layer.map_size),
                "degenerate": layer.degenerate,
            }
            for modality, layer in saliency.layers.items()
        },
        "overlap": {
            pair_label(pair): {
                name: _overlap_summary(values, saliency.degenerate[pair][name]) for name, values in per_output.items()
            }
            for pair, per_output in saliency.overlap.items()
        },
        "band_importance": bands,
        "integrated_gradients": {
            "steps": ig_steps,
            "median_relative_convergence_delta": {
                modality: {name: float(values.median()) for name, values in per_output.items()}
                for modality, per_output in saliency.relative_delta.items()
            },
        },
    }
