"""A synthetic two-modality dataset with known shared and private factors.

Generated in memory from a seed (no files, no network), it lets the quickstart run anywhere
and lets decoupling be measured: every sample carries the factor values it was rendered from.

Rendering: each latent factor ``f_j`` (uniform in [-1, 1]) owns a sinusoidal grating with its
own spatial frequency and orientation, and a per-channel loading vector for each modality that
sees it. Shared factors are seen by both modalities (with different loadings: the modalities
are different sensors of the same scene); a private factor is seen by one modality only. A
modality's image is ``0.5 + sum_j f_j * (a_j[c] * grating_j + b_j[c]) + noise`` clipped to
[0, 1]; the grating phase is random per sample, so the factors are properties of the texture
and of the band means, not of pixel positions, and survive crops and flips.
"""

from __future__ import annotations

import math

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from ..augmentations import VIEW_KINDS
from .samplers import EpochSeededRandomSampler

__all__ = ["SyntheticMultimodalDataModule", "SyntheticMultimodalDataset"]


class SyntheticMultimodalDataset(Dataset[dict[str, Tensor]]):
    """Two modalities rendered from shared and modality-private latent factors.

    Each sample is a dict with ``image_<name>`` (float32 ``(C, H, W)`` in [0, 1]) per modality,
    ``shared`` (``num_shared`` factors) and ``private_<name>`` (``num_private`` factors per
    modality).

    Args:
        num_samples: dataset length.
        modalities: the two modality names (batch keys ``image_<name>``).
        channels: band count of each modality.
        size: image side in pixels.
        num_shared: number of factors both modalities see.
        num_private: number of factors each modality sees alone.
        noise: standard deviation of the additive pixel noise.
        seed: the seed of the samples (factors, phases, noise).
        render_seed: the seed of the rendering (gratings and loadings). Keep it equal across
            splits so that train and validation data come from the same "sensors".

    Example:
        >>> ds = SyntheticMultimodalDataset(num_samples=4, modalities=("sar", "optical"), channels=(2, 4))
        >>> sorted(ds[0])
        ['image_optical', 'image_sar', 'private_optical', 'private_sar', 'shared']
    """

    def __init__(
        self,
        num_samples: int = 512,
        modalities: tuple[str, str] = ("sar", "optical"),
        channels: tuple[int, int] = (2, 4),
        size: int = 32,
        num_shared: int = 4,
        num_private: int = 2,
        noise: float = 0.05,
        seed: int = 0,
        render_seed: int = 0,
    ) -> None:
        if len(modalities) != 2 or len(channels) != 2:
            raise ValueError(
                f"Give exactly two modality names and two channel counts; got {modalities} and {channels}."
            )
        if modalities[0] == modalities[1]:
            raise ValueError(f"The two modality names must differ; got {modalities}.")
        if num_samples < 1 or size < 4 or min(channels) < 1:
            raise ValueError(
                f"Need num_samples >= 1, size >= 4 and channels >= 1; got {num_samples}, {size}, {channels}."
            )
        self.modalities = tuple(modalities)
        self.channels = tuple(channels)
        render = torch.Generator().manual_seed(render_seed)
        sample = torch.Generator().manual_seed(seed + 1_000_003)

        num_factors = num_shared + 2 * num_private
        # Distinct frequencies/orientations per factor, so each factor is a separable texture.
        freq = 2.0 + 4.0 * torch.rand(num_factors, generator=render)
        angle = math.pi * (torch.arange(num_factors) + torch.rand(num_factors, generator=render)) / num_factors
        ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        coord = (xs[None] * torch.cos(angle)[:, None, None] + ys[None] * torch.sin(angle)[:, None, None]) / size

        self.shared = torch.rand(num_samples, num_shared, generator=sample) * 2 - 1
        self.private = [torch.rand(num_samples, num_private, generator=sample) * 2 - 1 for _ in range(2)]
        phase = 2 * math.pi * torch.rand(num_samples, num_factors, generator=sample)
        # (N, F, H, W) gratings with per-sample phase.
        gratings = torch.cos(2 * math.pi * freq[None, :, None, None] * coord[None] + phase[:, :, None, None])

        self.images: list[Tensor] = []
        for m, num_channels in enumerate(self.channels):
            private_slice = slice(num_shared + m * num_private, num_shared + (m + 1) * num_private)
            factor_ids = list(range(num_shared)) + list(range(private_slice.start, private_slice.stop))
            factors = torch.cat([self.shared, self.private[m]], dim=1)  # (N, F_m)
            texture = torch.randn(len(factor_ids), num_channels, generator=render) * 0.35
            offset = torch.randn(len(factor_ids), num_channels, generator=render) * 0.08
            g = gratings[:, factor_ids]  # (N, F_m, H, W)
            image = 0.5 + torch.einsum("nf,fc,nfhw->nchw", factors, texture, g)
            image = image + (factors @ offset)[:, :, None, None]
            image = image + noise * torch.randn(image.shape, generator=sample)
            self.images.append(image.clamp_(0.0, 1.0).float())

    def __len__(self) -> int:
        return self.shared.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        m1, m2 = self.modalities
        return {
            f"image_{m1}": self.images[0][index],
            f"image_{m2}": self.images[1][index],
            "shared": self.shared[index],
            f"private_{m1}": self.private[0][index],
            f"private_{m2}": self.private[1][index],
        }


class SyntheticMultimodalDataModule(LightningDataModule):
    """Datamodule over :class:`SyntheticMultimodalDataset`: train / val / test from one seed.

    The three splits share the rendering (same "sensors") and draw disjoint samples. Training
    batches drop the last incomplete batch, since the loss needs batch statistics; the training
    order depends only on ``seed`` and the epoch, and the loaders are torchdata's
    ``StatefulDataLoader``, so a run resumed from a checkpoint taken at any step (also inside an
    epoch) sees the batches of an uninterrupted run.

    Args:
        modalities: the two modality names.
        channels: band count of each modality.
        modality_kinds: view augmentation kind per modality (see
            :mod:`decur_lightning.augmentations`); defaults to the modality names when they
            are kinds, else ``"generic"``.
        size, num_shared, num_private, noise: see :class:`SyntheticMultimodalDataset`.
        num_train, num_val, num_test: split sizes.
        batch_size, num_workers: DataLoader settings.
        seed: the seed of everything.

    Example:
        >>> dm = SyntheticMultimodalDataModule(num_train=64, batch_size=16)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["image_sar"].shape, batch["image_optical"].shape
        (torch.Size([16, 2, 32, 32]), torch.Size([16, 4, 32, 32]))
    """

    def __init__(
        self,
        modalities: tuple[str, str] = ("sar", "optical"),
        channels: tuple[int, int] = (2, 4),
        modality_kinds: dict[str, str] | None = None,
        size: int = 32,
        num_shared: int = 4,
        num_private: int = 2,
        noise: float = 0.05,
        num_train: int = 512,
        num_val: int = 128,
        num_test: int = 128,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.modalities = tuple(modalities)
        self.modality_kinds = modality_kinds or {
            name: name if name in VIEW_KINDS else "generic" for name in self.modalities
        }
        self.datasets: dict[str, SyntheticMultimodalDataset] = {}

    def _make(self, num_samples: int, offset: int) -> SyntheticMultimodalDataset:
        hp = self.hparams
        return SyntheticMultimodalDataset(
            num_samples=num_samples,
            modalities=self.modalities,
            channels=tuple(hp.channels),
            size=hp.size,
            num_shared=hp.num_shared,
            num_private=hp.num_private,
            noise=hp.noise,
            seed=hp.seed * 3 + offset,
            render_seed=hp.seed,
        )

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if not self.datasets:
            self.datasets = {
                "train": self._make(hp.num_train, 0),
                "val": self._make(hp.num_val, 1),
                "test": self._make(hp.num_test, 2),
            }

    def _loader(self, split: str, shuffle: bool, drop_last: bool) -> StatefulDataLoader:
        self.setup()
        dataset = self.datasets[split]
        # A StatefulDataLoader: Lightning saves its position in checkpoints (exact mid-epoch resume).
        return StatefulDataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=EpochSeededRandomSampler(dataset, self.hparams.seed) if shuffle else None,
            drop_last=drop_last,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader("train", shuffle=True, drop_last=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader("val", shuffle=False, drop_last=False)

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader("test", shuffle=False, drop_last=False)

    def predict_dataloader(self) -> StatefulDataLoader:
        return self._loader("test", shuffle=False, drop_last=False)
