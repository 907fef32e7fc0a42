"""The AlignmentHistogram callback: PNGs in the log folder, images in loggers, rank zero only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from test_analysis_alignment import THREE, assert_png, modality_data, synthetic_data

from decur_lightning.callbacks import AlignmentHistogram, log_figure

from helpers import tiny_decur

pytestmark = pytest.mark.usefixtures("one_thread")


class ImageRecorder(Logger):
    """A logger with a WandbLogger-style ``log_image`` that records its calls."""

    def __init__(self, save_dir: Path) -> None:
        super().__init__()
        self._save_dir = str(save_dir)
        self.images: list[tuple[str, Any, int | None]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str:
        return self._save_dir

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: Any) -> None:
        self.images.append((key, images, step))


def fit(
    tmp_path: Path, callback: AlignmentHistogram, logger: Any, epochs: int = 2, model: Any = None, data: Any = None
) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    data = data or synthetic_data(num_train=32, num_val=16, batch_size=8)
    trainer.fit(model or tiny_decur(), data)
    return trainer


def test_tensorboard_gets_histogram_and_tsne_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = AlignmentHistogram(every_n_epochs=1, max_samples=16, tsne=True, tsne_threads=1)
    trainer = fit(tmp_path, callback, logger)
    log_dir = Path(trainer.log_dir)
    for name in (
        "alignment_histogram.png",
        "alignment_histogram_epoch0.png",
        "alignment_histogram_epoch1.png",
        "embedding_tsne.png",
        "embedding_tsne_epoch1.png",
    ):
        assert_png(log_dir / name)
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    assert {"analysis/alignment_histogram", "analysis/embedding_tsne"} <= set(events.Tags()["images"])
    steps = [event.step for event in events.Images("analysis/alignment_histogram")]
    assert steps == [2, 4, 4]  # after epoch 0, after epoch 1, at fit end
    assert events.Images("analysis/alignment_histogram")[0].width > 100


def test_log_image_loggers_and_csv_logger(tmp_path):
    recorder = ImageRecorder(tmp_path)
    csv = CSVLogger(tmp_path, name="csv")
    callback = AlignmentHistogram(max_samples=16)
    trainer = fit(tmp_path, callback, [csv, recorder], epochs=1)
    assert [(key, step) for key, _, step in recorder.images] == [("analysis/alignment_histogram", 2)]
    image = recorder.images[0][1][0]
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8"
    assert callback.last_path == Path(trainer.log_dir) / "alignment_histogram.png"
    assert_png(callback.last_path)


def test_no_images_when_disabled(tmp_path):
    recorder = ImageRecorder(tmp_path)
    callback = AlignmentHistogram(max_samples=16, log_images=False)
    fit(tmp_path, callback, recorder, epochs=1)
    assert recorder.images == [] and callback.last_path.is_file()


def test_nothing_on_other_ranks(tmp_path, monkeypatch):
    recorder = ImageRecorder(tmp_path)
    trainer = L.Trainer(logger=recorder, accelerator="cpu", default_root_dir=tmp_path)
    monkeypatch.setattr(L.Trainer, "is_global_zero", property(lambda self: False))
    callback = AlignmentHistogram(every_n_epochs=1, max_samples=16)
    callback.on_validation_epoch_end(trainer, tiny_decur())
    callback.on_fit_end(trainer, tiny_decur())
    assert recorder.images == [] and callback.last_path is None
    assert not list(tmp_path.rglob("*.png"))


def test_log_figure_counts_loggers(tmp_path):
    import torch

    from decur_lightning.analysis import alignment_histogram_figure

    recorder = ImageRecorder(tmp_path)
    trainer = L.Trainer(logger=[CSVLogger(tmp_path), recorder, TensorBoardLogger(tmp_path)], accelerator="cpu")
    assert log_figure(trainer, "x", alignment_histogram_figure(torch.rand(8), 4), step=3) == 2
    assert recorder.images[0][0] == "x" and recorder.images[0][2] == 3


def test_three_modalities_every_pair_gets_its_histogram(tmp_path):
    """A 3-modality run: one histogram per pair (file and logger tag name the pair), each
    showing that pair's common / unique split; one t-SNE map of all modalities."""
    recorder = ImageRecorder(tmp_path)
    callback = AlignmentHistogram(max_samples=16, tsne=True, tsne_threads=1)
    trainer = fit(tmp_path, callback, recorder, epochs=1, model=tiny_decur(modalities=THREE), data=modality_data())
    log_dir = Path(trainer.log_dir)
    pairs = ["sar_optical", "sar_dem", "optical_dem"]
    for pair in pairs:
        assert_png(log_dir / f"alignment_histogram_{pair}.png")
    assert not (log_dir / "alignment_histogram.png").exists()
    assert_png(log_dir / "embedding_tsne.png")
    names = [f"alignment_histogram_{pair}" for pair in pairs] + ["embedding_tsne"]
    assert [(key, step) for key, _, step in recorder.images] == [(f"analysis/{name}", 2) for name in names]
    assert list(callback.last_paths) == names
    assert callback.last_path == log_dir / "alignment_histogram_sar_optical.png"
    # each figure is its own pair's: common 48 + unique 16 dimensions of K = 64, titled with the pair
    figures = AlignmentHistogram(max_samples=16).figures(trainer.lightning_module, trainer.val_dataloaders)
    assert list(figures) == names[:3]
    for pair in pairs:
        axes = figures[f"alignment_histogram_{pair}"].axes[0]
        assert [t.get_text() for t in axes.get_legend().get_texts()] == ["common (48)", "unique (16)"]
        assert axes.get_title().endswith(pair.replace("_", "-"))
    epoch_file = AlignmentHistogram(every_n_epochs=1, max_samples=16, log_images=False)
    epoch_file.on_validation_epoch_end(trainer, trainer.lightning_module)
    assert {path.name for path in epoch_file.last_paths.values()} == {
        f"alignment_histogram_{p}_epoch{trainer.current_epoch}.png" for p in pairs
    }


def test_one_modality_writes_nothing(tmp_path):
    from decur_lightning.ssl import SingleModalBarlowTwinsModule

    model = SingleModalBarlowTwinsModule(
        modalities={"sar": 2}, encoder="resnet18", projector_dims=(64, 64), crop_size=32
    )
    callback = AlignmentHistogram(max_samples=16)
    assert callback.figures(model, [{"image_sar": torch.rand(4, 2, 32, 32)}]) == {}


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="every_n_epochs"):
        AlignmentHistogram(every_n_epochs=0)
    with pytest.raises(ValueError, match="max_samples"):
        AlignmentHistogram(max_samples=1)
    with pytest.raises(ValueError, match=".png"):
        AlignmentHistogram(filename="histogram.jpg")
