"""Lightning callbacks of the package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure

from .analysis.alignment import alignment_histogram_figure, alignment_per_pair, collect_embeddings
from .analysis.pairs import model_pairs, pair_common_dims, pair_suffix
from .analysis.plotting import figure_to_array, save_figure
from .analysis.tsne import dimension_tsne, dimension_tsne_figure, tsne_groups
from .monitors import DivergenceMonitor, EmptyTrainingCheck, LoaderStateRestore, SmallBatchWarning

__all__ = [
    "AlignmentHistogram",
    "DivergenceMonitor",
    "EmptyTrainingCheck",
    "LoaderStateRestore",
    "SmallBatchWarning",
    "log_figure",
]


def log_figure(trainer: Trainer, tag: str, figure: Figure, step: int | None = None) -> int:
    """Send a figure as an image to every logger of ``trainer`` that takes images.

    TensorBoard gets ``experiment.add_image``; any other logger with a ``log_image(key, images,
    step)`` method (e.g. ``WandbLogger``) gets that. Loggers without images (CSVLogger) are
    skipped. Call it from rank zero only.

    Returns:
        The number of loggers the image went to.
    """
    image = None
    step = trainer.global_step if step is None else step
    count = 0
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            image = figure_to_array(figure) if image is None else image
            logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
        elif callable(getattr(type(logger), "log_image", None)):
            image = figure_to_array(figure) if image is None else image
            logger.log_image(key=tag, images=[image], step=step)
        else:
            continue
        count += 1
    return count


class AlignmentHistogram(Callback):
    """Cross-modal alignment histograms (eq. 7, Fig. 5a) of every pair of modalities, and
    optionally the t-SNE of embedding dimensions (Fig. 1), as PNGs in the log folder and as
    images in the loggers.

    Embeds up to ``max_samples`` validation samples (un-augmented; training samples when the
    run has no validation data) with every modality's encoder and projector, and plots
    ``(1 - C_ii)^2`` per dimension for each pair ``(m, n)`` of modalities, common and unique
    dimensions apart (the pair's ``K_c``).

    - At the end of fit: ``alignment_histogram.png`` for two modalities, one
      ``alignment_histogram_<m>_<n>.png`` per pair for more (``filename`` with the pair
      inserted before ``.png``), and ``embedding_tsne.png`` (all modalities in one map), in
      ``trainer.log_dir or trainer.default_root_dir``, logged as images at the last step under
      the same names (``analysis/alignment_histogram``, ``analysis/alignment_histogram_<m>_<n>``).
    - Every ``every_n_epochs`` validation epochs, when set: the same with ``_epoch<E>``
      appended (``alignment_histogram_epoch<E>.png``, ``alignment_histogram_<m>_<n>_epoch<E>.png``),
      logged at the current step.

    Images go to TensorBoard (``add_image``) and to any logger with a ``log_image`` method (e.g.
    WandbLogger); CSVLogger takes none, so there are only the PNGs. Only rank zero embeds,
    writes and logs. A module with one modality (a single-modal baseline) has no pair: the
    callback then writes nothing.

    Args:
        every_n_epochs: also run after every n-th validation epoch (``None``: only at the end).
        max_samples: number of samples to embed.
        filename: name of the final histogram PNG (for more than two modalities the pair is
            inserted before the extension).
        log_images: send the figures to the loggers.
        tsne: also draw the t-SNE of the embedding dimensions (a few seconds for ``K`` = 512,
            minutes for ``K`` = 8192); one map of all modalities when every pair has the same
            ``K_c``, else one per pair.
        tsne_perplexity: t-SNE perplexity.
        tsne_threads: cap on scikit-learn's threads for the t-SNE (``None``: its default).

    Attributes:
        last_paths: ``{figure name: path}`` of the last figures written (names are the file
            names without ``.png`` and epoch suffix, e.g. ``"alignment_histogram_sar_dem"``).
        last_path: the last histogram of the first pair.
    """

    def __init__(
        self,
        every_n_epochs: int | None = None,
        max_samples: int = 512,
        filename: str = "alignment_histogram.png",
        log_images: bool = True,
        tsne: bool = False,
        tsne_perplexity: float = 30.0,
        tsne_threads: int | None = None,
    ) -> None:
        super().__init__()
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive number of epochs or None; got {every_n_epochs}.")
        if max_samples < 2:
            raise ValueError(f"max_samples must be at least 2 (eq. 7 is a correlation); got {max_samples}.")
        if not filename.endswith(".png"):
            raise ValueError(f"filename must end in .png; got {filename!r}.")
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.filename = filename
        self.log_images = log_images
        self.tsne = tsne
        self.tsne_perplexity = tsne_perplexity
        self.tsne_threads = tsne_threads
        self.last_path: Path | None = None
        self.last_paths: dict[str, Path] = {}

    def figures(self, module: LightningModule, loader: Any) -> dict[str, Figure]:
        """The figures of ``module`` on up to ``max_samples`` samples of ``loader``:
        ``{name: figure}`` (empty for a module with one modality)."""
        pairs = model_pairs(module)
        if not pairs:
            return {}
        embeddings = collect_embeddings(module, loader, self.max_samples)
        common = {pair: pair_common_dims(module, *pair) for pair in pairs}
        alignment = alignment_per_pair(embeddings, pairs)
        figures: dict[str, Figure] = {}
        for pair in pairs:
            title = f"Cross-modal alignment per dimension (eq. 7): {pair[0]}-{pair[1]}"
            figures[f"alignment_histogram{pair_suffix(pair, len(pairs))}"] = alignment_histogram_figure(
                alignment[pair], common[pair], title=title
            )
        if self.tsne:
            for suffix, (names, kc) in tsne_groups(tuple(embeddings), common).items():
                result = dimension_tsne(
                    {name: embeddings[name] for name in names},
                    kc,
                    perplexity=self.tsne_perplexity,
                    num_threads=self.tsne_threads,
                )
                figures[f"embedding_tsne{suffix}"] = dimension_tsne_figure(result)
        return figures

    def _write(self, trainer: Trainer, module: LightningModule, suffix: str = "") -> dict[str, Path]:
        loaders = trainer.val_dataloaders or trainer.train_dataloader
        if loaders is None:
            return {}
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        figures = self.figures(module, loader)
        if not figures:
            return {}
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        stem = self.filename.removesuffix(".png")
        paths = {}
        for name, figure in figures.items():
            filename = f"{name}{suffix}.png"
            if name.startswith("alignment_histogram"):
                filename = f"{stem}{name.removeprefix('alignment_histogram')}{suffix}.png"
            paths[name] = save_figure(figure, log_dir / filename)
            if self.log_images:
                log_figure(trainer, f"analysis/{name}", figure)
        self.last_paths = paths
        self.last_path = next(path for name, path in paths.items() if name.startswith("alignment_histogram"))
        return paths

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self.every_n_epochs or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._write(trainer, pl_module, f"_epoch{trainer.current_epoch}")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self._write(trainer, pl_module)
