"""Lightning callbacks of the package."""

from __future__ import annotations

from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure

from .analysis.alignment import alignment_histogram_figure, alignment_loss_per_dimension, collect_embeddings
from .analysis.plotting import figure_to_array, save_figure
from .analysis.tsne import dimension_tsne, dimension_tsne_figure
from .monitors import DivergenceMonitor, EmptyTrainingCheck, LoaderStateRestore, SmallBatchWarning

__all__ = ["AlignmentHistogram", "DivergenceMonitor", "EmptyTrainingCheck", "LoaderStateRestore", "SmallBatchWarning", "log_figure"]


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
    """Cross-modal alignment histogram (eq. 7, Fig. 5a), and optionally the t-SNE of embedding
    dimensions (Fig. 1), as PNGs in the log folder and as images in the loggers.

    Embeds up to ``max_samples`` validation samples (un-augmented; training samples when the
    run has no validation data) with both modalities' encoders and projectors, and plots
    ``(1 - C_ii)^2`` per dimension, common and unique dimensions apart.

    - At the end of fit: ``alignment_histogram.png`` (and ``embedding_tsne.png``) in
      ``trainer.log_dir or trainer.default_root_dir``, logged as images at the last step.
    - Every ``every_n_epochs`` validation epochs, when set: ``alignment_histogram_epoch<E>.png``
      (and ``embedding_tsne_epoch<E>.png``), logged at the current step.

    Images go to TensorBoard (``add_image``) and to any logger with a ``log_image`` method (e.g.
    WandbLogger); CSVLogger takes none, so there are only the PNGs. Only rank zero embeds,
    writes and logs.

    Args:
        every_n_epochs: also run after every n-th validation epoch (``None``: only at the end).
        max_samples: number of samples to embed.
        filename: name of the final histogram PNG.
        log_images: send the figures to the loggers.
        tsne: also draw the t-SNE of the embedding dimensions (a few seconds for ``K`` = 512,
            minutes for ``K`` = 8192).
        tsne_perplexity: t-SNE perplexity.
        tsne_threads: cap on scikit-learn's threads for the t-SNE (``None``: its default).
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
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.filename = filename
        self.log_images = log_images
        self.tsne = tsne
        self.tsne_perplexity = tsne_perplexity
        self.tsne_threads = tsne_threads
        self.last_path: Path | None = None
        self.last_paths: dict[str, Path] = {}

    def _write(self, trainer: Trainer, module: LightningModule, suffix: str = "") -> dict[str, Path]:
        loaders = trainer.val_dataloaders or trainer.train_dataloader
        if loaders is None:
            return {}
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        z1, z2 = collect_embeddings(module, loader, self.max_samples)
        common_dims = getattr(module, "common_dims", None)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        figures = {"alignment_histogram": alignment_histogram_figure(alignment_loss_per_dimension(z1, z2), common_dims)}
        if self.tsne:
            result = dimension_tsne(
                z1, z2, common_dims, perplexity=self.tsne_perplexity, num_threads=self.tsne_threads
            )
            figures["embedding_tsne"] = dimension_tsne_figure(result, tuple(module.modalities))
        paths = {}
        for name, figure in figures.items():
            filename = self.filename if name == "alignment_histogram" and not suffix else f"{name}{suffix}.png"
            paths[name] = save_figure(figure, log_dir / filename)
            if self.log_images:
                log_figure(trainer, f"analysis/{name}", figure)
        self.last_paths = paths
        self.last_path = paths["alignment_histogram"]
        return paths

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self.every_n_epochs or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._write(trainer, pl_module, f"_epoch{trainer.current_epoch}")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self._write(trainer, pl_module)
