"""Lightning callbacks of the package."""

from __future__ import annotations

from pathlib import Path

from lightning import Callback, LightningModule, Trainer

from .analysis.alignment import alignment_loss_per_dimension, collect_embeddings, plot_alignment_histogram

__all__ = ["AlignmentHistogram"]


class AlignmentHistogram(Callback):
    """Write the cross-modal alignment histogram (eq. 7, Fig. 5a) as a PNG in the log folder.

    Embeds up to ``max_samples`` validation samples (un-augmented) with both modalities'
    encoders and projectors and plots ``(1 - C_ii)^2`` per dimension, common and unique
    dimensions apart. Written at the end of fit as ``alignment_histogram.png``, and every
    ``every_n_epochs`` epochs as ``alignment_histogram_epoch<E>.png`` when set.

    Args:
        every_n_epochs: also write after every n-th validation epoch (``None``: only at the end).
        max_samples: number of validation samples to embed.
        filename: name of the final PNG.
    """

    def __init__(self, every_n_epochs: int | None = None, max_samples: int = 512, filename: str = "alignment_histogram.png") -> None:
        super().__init__()
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.filename = filename
        self.last_path: Path | None = None

    def _write(self, trainer: Trainer, module: LightningModule, filename: str) -> Path | None:
        # Validation samples when the run has them, else training samples (un-augmented).
        loaders = trainer.val_dataloaders or trainer.train_dataloader
        if loaders is None:
            return None
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        z1, z2 = collect_embeddings(module, loader, self.max_samples)
        alignment = alignment_loss_per_dimension(z1, z2)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self.last_path = plot_alignment_histogram(alignment, getattr(module, "common_dims", None), log_dir / filename)
        return self.last_path

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self.every_n_epochs or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._write(trainer, pl_module, f"alignment_histogram_epoch{trainer.current_epoch}.png")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self._write(trainer, pl_module, self.filename)
