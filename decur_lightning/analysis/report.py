"""All explainability analyses of a trained DeCUR checkpoint in one call (paper Section 7,
Appendix D): :func:`analyze` writes the figures and ``statistics.json``.
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
    alignment_for_model,
    alignment_histogram_figure,
    alignment_loss_per_dimension,
    alignment_statistics,
    collect_embeddings,
    summarize,
)
from .plotting import save_figure
from .saliency import (
    OUTPUT_NAMES,
    band_importance_figure,
    overlap_histogram_figure,
    saliency_analysis,
    saliency_examples_figure,
)
from .tsne import dimension_tsne, dimension_tsne_figure

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
    checkpoint_path: str | Path, module_class: type[LightningModule] | str | None = None, device: str | torch.device = "cpu"
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
        raise FileNotFoundError(f"No checkpoint at {path}. Pass the .ckpt file written by Trainer.fit (e.g. .../checkpoints/last.ckpt).")
    cls = _resolve_class(module_class)
    try:
        # Lightning checkpoints hold pickled hyper-parameters: load only files you trust.
        model = cls.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    except (KeyError, TypeError, RuntimeError) as err:
        raise ValueError(
            f"Could not load {path} as a {cls.__name__}: {err}. If another module class wrote it (e.g. a "
            "baseline), pass its class as module_class / --comparison_class."
        ) from err
    return model.to(device).eval()


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
    layers: Sequence[str | None] = (None, None),
    comparison_checkpoint: str | Path | None = None,
    comparison_class: type[LightningModule] | str | None = None,
    comparison_label: str = "comparison",
    tsne: bool = True,
    tsne_perplexity: float = 30.0,
    tsne_threads: int | None = None,
    band_names: Mapping[str, Sequence[str]] | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Run the explainability analyses of paper Section 7 on a DeCUR checkpoint.

    On up to ``max_samples`` un-augmented samples of the datamodule's ``split``:

    1. cross-modal alignment per dimension, eq. 7, common and unique apart, optionally beside a
       comparison model such as cross-modal Barlow Twins (Fig. 5a): ``alignment_histogram.png``;
    2. t-SNE of the embedding dimensions (Fig. 1, 8): ``embedding_tsne.png``;

    and on the first ``saliency_samples`` of them (Algorithm 2, Fig. 6):

    3. GradCAM overlap scores between the modalities for the common and unique outputs:
       ``saliency_overlap.png`` and example maps ``saliency_examples.png``;
    4. Integrated Gradients band importances: ``band_importance.png``.

    Everything numeric goes to ``statistics.json`` (summaries) and ``analysis.npz`` (the
    per-dimension alignments, t-SNE coordinates, per-sample overlap scores and band
    importances, for re-plotting).

    Args:
        checkpoint_path: a DeCURModule ``.ckpt``.
        datamodule: a datamodule with the model's ``image_<modality>`` keys.
        out_dir: folder for the outputs (created).
        split: ``"val"`` or ``"test"``.
        max_samples: samples for the alignment and t-SNE.
        saliency_samples: samples for GradCAM and Integrated Gradients (each costs about
            ``2 * (ig_steps + 2)`` forward-backward passes per modality).
        ig_steps: Integrated Gradients steps.
        ig_internal_batch_size: inputs per forward pass inside IG (``None``: the loader's batch
            size).
        layers: GradCAM layer name per modality (``None``: the encoder's last stage; use
            ``"layer3"`` for images so small that the last stage is 1 x 1).
        comparison_checkpoint: optional checkpoint of a comparison model (Fig. 5a).
        comparison_class: its LightningModule class (class, name in :mod:`decur_lightning.ssl`
            or import path; default DeCURModule).
        comparison_label: legend label of the comparison model.
        tsne: run the t-SNE (it dominates the run time for large ``K``).
        tsne_perplexity: t-SNE perplexity.
        tsne_threads: cap on scikit-learn's threads for t-SNE (``1`` helps on busy machines).
        band_names: ``{modality: [band names]}`` for the band importance plot.
        device: ``"cpu"``, ``"cuda"``, ...
        seed: t-SNE seed.

    Returns:
        The content of ``statistics.json``, plus ``"figures"``: ``{name: path}``.

    Example:
        >>> from decur_lightning.datamodules import SyntheticMultimodalDataModule
        >>> stats = analyze("runs/quickstart/version_0/checkpoints/last.ckpt",
        ...                 SyntheticMultimodalDataModule(), "analysis")  # doctest: +SKIP
        >>> stats["alignment"]["unique"]["mean"]  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_ssl_module(checkpoint_path, None, device)
    common_dims = getattr(model, "common_dims", None)
    modalities = tuple(model.modalities)
    loader = _dataloader(datamodule, split)
    figures: dict[str, str] = {}
    arrays: dict[str, np.ndarray] = {}

    z1, z2 = collect_embeddings(model, loader, max_samples)
    if z1.shape[0] < 2:
        raise ValueError(f"The {split} split gave {z1.shape[0]} sample; the analyses need at least 2.")
    alignment = alignment_loss_per_dimension(z1, z2)
    arrays["alignment"] = alignment.numpy()
    statistics: dict[str, Any] = {
        "checkpoint": str(checkpoint_path),
        "split": split,
        "modalities": list(modalities),
        "embedding_dim": int(z1.shape[1]),
        "common_dims": common_dims,
        "num_samples": int(z1.shape[0]),
        "alignment": alignment_statistics(alignment, common_dims),
    }
    comparison = None
    if comparison_checkpoint is not None:
        comparison_model = load_ssl_module(comparison_checkpoint, comparison_class, device)
        comparison = alignment_for_model(comparison_model, loader, max_samples)
        arrays["comparison_alignment"] = comparison.numpy()
        statistics["comparison"] = {
            "checkpoint": str(comparison_checkpoint),
            "label": comparison_label,
            "alignment": alignment_statistics(comparison, getattr(comparison_model, "common_dims", None)),
        }
    fig = alignment_histogram_figure(alignment, common_dims, comparison, comparison_label)
    figures["alignment_histogram"] = str(save_figure(fig, out / "alignment_histogram.png"))

    if tsne:
        result = dimension_tsne(z1, z2, common_dims, perplexity=tsne_perplexity, seed=seed, num_threads=tsne_threads)
        arrays["tsne_coordinates"] = result.coordinates
        arrays["tsne_modality"] = result.modality
        arrays["tsne_common"] = result.common
        figures["embedding_tsne"] = str(save_figure(dimension_tsne_figure(result, modalities), out / "embedding_tsne.png"))

    if saliency_samples > 0:
        saliency = saliency_analysis(
            model,
            loader,
            max_samples=saliency_samples,
            reference=(z1, z2),
            layers=layers,
            ig_steps=ig_steps,
            ig_internal_batch_size=ig_internal_batch_size,
        )
        statistics["saliency"] = _saliency_statistics(saliency, band_names, ig_steps)
        for name in OUTPUT_NAMES:
            arrays[f"overlap_{name}"] = saliency.overlap[name].numpy()
            for modality in modalities:
                arrays[f"band_importance_{modality}_{name}"] = saliency.band_importance[modality][name].numpy()
        figures["saliency_overlap"] = str(save_figure(overlap_histogram_figure(saliency.overlap), out / "saliency_overlap.png"))
        figures["band_importance"] = str(
            save_figure(band_importance_figure(saliency.band_importance, band_names), out / "band_importance.png")
        )
        figures["saliency_examples"] = str(save_figure(saliency_examples_figure(saliency), out / "saliency_examples.png"))

    np.savez(out / "analysis.npz", **arrays)
    (out / "statistics.json").write_text(json.dumps(statistics, indent=2))
    return {**statistics, "figures": figures}


def _saliency_statistics(saliency: Any, band_names: Mapping[str, Sequence[str]] | None, ig_steps: int) -> dict[str, Any]:
    bands: dict[str, Any] = {}
    for modality, per_output in saliency.band_importance.items():
        num_bands = per_output["common"].shape[1]
        names = list((band_names or {}).get(modality) or [f"b{i + 1}" for i in range(num_bands)])
        bands[modality] = {"bands": names}
        for name, scores in per_output.items():
            bands[modality][name] = {
                "mean": scores.mean(0).tolist(),
                "std": scores.std(0, unbiased=False).tolist(),
            }
    return {
        "num_samples": saliency.num_samples,
        "overlap": {
            name: {**summarize(values), "undefined": int(values.isnan().sum())}
            for name, values in saliency.overlap.items()
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
