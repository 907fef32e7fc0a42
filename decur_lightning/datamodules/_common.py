"""Helpers shared by the multimodal datamodules: modality descriptions, normalisation, subsets,
paired augmentation.

Every datamodule of this package describes the modalities its batches hold
(:class:`DescribesModalities`: the :attr:`~DescribesModalities.modality_specs` contract).

Normalisation follows the DeCUR paper (Appendix B.1/B.2): optical bands are "compressed to 8-bit
by band-wise mean and standard deviation", i.e. ``[mean - 2 std, mean + 2 std]`` is mapped
linearly to ``[0, 255]`` and clipped. We keep the result in float and divide by 255, so every
normalised band lies in ``[0, 1]`` (what the authors' ``ToTensor`` produced from their uint8
files, without the 8-bit quantisation). SAR images first have their 2 % outliers cut per image
(1st and 99th percentile of each band, as in the authors' loaders) and are then mapped the same
way with SAR statistics. Missing values (NaN) do not enter the percentiles and become 0 after
normalisation, the value the authors' cast to uint8 gives them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import kornia.augmentation as K
import numpy as np
import rasterio
import torch
from lightning.pytorch import LightningDataModule
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchgeo.datamodules import NonGeoDataModule

from ..modalities import Modality
from .samplers import EpochIndex, EpochSeededDistributedSampler, EpochSeededRandomSampler

S1_BANDS: tuple[str, ...] = ("VV", "VH")
"""Sentinel-1 GRD polarisations, in the order the datamodules deliver them."""

S2_L1C_BANDS: tuple[str, ...] = (
    "B01",
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B07",
    "B08",
    "B8A",
    "B09",
    "B10",
    "B11",
    "B12",
)
"""Sentinel-2 L1C bands as SSL4EO-S12 orders them (B8A after B08, B10 present), zero-padded names."""

RGB_BANDS: tuple[str, ...] = ("R", "G", "B")
"""Red, green, blue."""

HHA_BANDS: tuple[str, ...] = ("horizontal_disparity", "height_above_ground", "angle_with_gravity")
"""HHA depth encoding (Gupta et al., ECCV 2014) in the channel order of its files read as RGB: its
tools store disparity in the red, height in the green and angle in the blue channel."""


def seasonal_band_names(bands: Sequence[str], seasons: int) -> list[str]:
    """Band names of ``seasons`` stacked acquisitions: the names as they are for one, else
    ``<band>_season<k>`` (``k = 1..seasons``) in stacking order (season-major)."""
    if seasons == 1:
        return list(bands)
    return [f"{band}_season{k}" for k in range(1, seasons + 1) for band in bands]


class DescribesModalities:
    """The contract every datamodule of this package keeps: it describes its modalities.

    :attr:`modality_specs` is an ordered ``dict`` *modality name -> :class:`~decur_lightning.modalities.Modality`*:

    * one entry per modality, named as in the batch keys (``image_<name>``), in the order of the
      paper's modality 1, 2, ... (SAR before optical, RGB before DEM/HHA);
    * ``bands``: the channel count of ``image_<name>`` in this datamodule's batches, following its
      band selection arguments (e.g. SSL4EO-S12's ``seasons``, GeoNRW's ``dem_channels``);
    * ``view``: the kind of view pipeline that suits the modality
      (:data:`~decur_lightning.augmentations.VIEW_KINDS`; paper Appendix B.1);
    * ``band_names``: the bands in channel order where known, else ``None``;
    * ``encoder``, ``weights`` and the other fields are ``None``: they are the module's choice.

    It is known from the constructor's arguments alone (no ``setup()``, no file read), so a
    LightningModule can build its encoders from it
    (:func:`~decur_lightning.modalities.resolve_modalities`) and a YAML run states the modalities
    once. Every access returns new objects: changing them does not change the datamodule.
    """

    @property
    def modality_specs(self) -> dict[str, Modality]:
        """Ordered modality name -> :class:`~decur_lightning.modalities.Modality` (see the class)."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its modalities (modality_specs).")


def _band_stats(values: Sequence[float] | Tensor, image: Tensor) -> Tensor:
    """Turn per-band statistics into a ``(C, 1, 1)`` tensor on ``image``'s device and dtype."""
    stats = torch.as_tensor(values, dtype=image.dtype, device=image.device)
    if stats.ndim != 1 or stats.numel() != image.shape[-3]:
        raise ValueError(
            f"expected {image.shape[-3]} per-band statistics for an image of shape "
            f"{tuple(image.shape)}, got {tuple(stats.shape)}"
        )
    return stats.view(-1, 1, 1)


def scale_mean_std(image: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """Map ``[mean - 2 std, mean + 2 std]`` of every band to ``[0, 1]`` and clip (paper B.1).

    Args:
        image: ``(C, H, W)`` float tensor in the statistics' units.
        mean: per-band means, length ``C``.
        std: per-band standard deviations, length ``C``.

    Returns:
        float tensor of the same shape with values in ``[0, 1]`` (NaN pixels become 0).
    """
    mean_t = _band_stats(mean, image)
    std_t = _band_stats(std, image)
    low = mean_t - 2 * std_t
    return ((image - low) / (4 * std_t)).clamp_(0.0, 1.0).nan_to_num_(nan=0.0)


def clip_outliers(image: Tensor, fraction: float = 0.02) -> Tensor:
    """Clip each band of one image to its ``[fraction/2, 1 - fraction/2]`` quantiles.

    The paper (B.1, B.2) "cut[s] out 2% outliers for each image" of SAR data; the authors' loaders
    clip every band at its own 1st and 99th percentile. ``fraction=0`` returns the image unchanged.
    NaN pixels are ignored by the quantiles and stay NaN.

    Args:
        image: ``(C, H, W)`` float tensor.
        fraction: total share of pixels treated as outliers, split evenly between both tails.

    Returns:
        the clipped image (a new tensor).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"outlier fraction must lie in [0, 1), got {fraction}")
    if fraction == 0.0:
        return image.clone()
    flat = image.reshape(image.shape[0], -1)
    quantiles = torch.tensor([fraction / 2, 1 - fraction / 2], dtype=image.dtype, device=image.device)
    low, high = torch.nanquantile(flat, quantiles, dim=1)
    return torch.maximum(torch.minimum(image, high.view(-1, 1, 1)), low.view(-1, 1, 1))


def normalize_sar(
    image: Tensor,
    mean: Sequence[float] | Tensor,
    std: Sequence[float] | Tensor,
    outlier_fraction: float = 0.02,
) -> Tensor:
    """Cut per-image SAR outliers, then apply :func:`scale_mean_std` (paper B.1, B.2)."""
    return scale_mean_std(clip_outliers(image, outlier_fraction), mean, std)


def percentile_min_max(image: Tensor, lower: float = 0.01, upper: float = 0.99, eps: float = 1e-5) -> Tensor:
    """Clip every band to its ``[lower, upper]`` quantiles and rescale that range to ``[0, 1]``.

    Used for elevation (GeoNRW DEM), whose absolute values vary by hundreds of metres between
    regions: the authors' RGB-DEM pretraining loader normalises each 250 px patch this way
    (1st/99th percentile). A flat patch maps to zeros instead of dividing by zero; NaN pixels are
    ignored by the quantiles and become 0.
    """
    flat = image.reshape(image.shape[0], -1)
    quantiles = torch.tensor([lower, upper], dtype=image.dtype, device=image.device)
    low, high = torch.nanquantile(flat, quantiles, dim=1)
    low, high = low.view(-1, 1, 1), high.view(-1, 1, 1)
    clipped = torch.maximum(torch.minimum(image, high), low)
    return ((clipped - low) / (high - low + eps)).nan_to_num_(nan=0.0)


def seeded_subset(num_items: int, fraction: float, seed: int) -> list[int]:
    """Sorted indices of a reproducible random subset of ``round(fraction * num_items)`` items.

    Drawn without replacement from ``numpy.random.default_rng(seed)``, so the same seed always
    yields the same subset and a subset never holds an item twice. At least one item is kept.

    Args:
        num_items: size of the set to draw from.
        fraction: share to keep, in ``(0, 1]``.
        seed: seed of the generator.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    if num_items == 0:
        return []
    if fraction == 1.0:
        return list(range(num_items))
    size = max(1, round(fraction * num_items))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(num_items, size=size, replace=False))


def is_data_key(key: str) -> bool:
    """Whether kornia treats a batch key as spatial data (``image*`` / ``mask*``)."""
    return key.startswith("image") or key.startswith("mask")


class PairedAugmentation(nn.Module):
    """One kornia pipeline applied with the same random parameters to every image and the mask.

    kornia's ``AugmentationSequential(data_keys=None)`` reads a dict and treats keys named
    ``image*`` as images and ``mask*`` as masks (nearest interpolation, integer dtype kept); it
    draws the parameters once and applies them to all such keys. torchgeo's GeoNRW datamodule
    stores the DEM under ``dem`` and so leaves it un-augmented; here every modality is an
    ``image_<modality>`` key, so geometric augmentations move RGB, DEM/HHA and mask together.
    Only the spatial keys are passed to kornia (it would otherwise cast e.g. ``label`` to float);
    the other keys are returned untouched.

    Args:
        *augmentations: kornia augmentation modules, applied in order. None: identity.
    """

    def __init__(self, *augmentations: nn.Module) -> None:
        super().__init__()
        self.augmentations = (
            K.AugmentationSequential(*augmentations, data_keys=None, keepdim=True) if augmentations else None
        )

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Augment the ``image*``/``mask*`` tensors of a batch dict; return a new dict."""
        if self.augmentations is None:
            return dict(batch)
        spatial = {key: value for key, value in batch.items() if is_data_key(key)}
        if not spatial:
            return dict(batch)
        augmented = self.augmentations(spatial)
        return {**batch, **augmented}


class PretrainDataModule(DescribesModalities, NonGeoDataModule):
    """Base of the pretraining datamodules: a training set only, batches passed through as read.

    DeCUR pretraining has no validation split (the paper judges encoders downstream):
    ``val_dataloader`` is Lightning's unimplemented default again (torchgeo's base defines one),
    so the Trainer skips validation. No augmentation runs here: the SSL module makes the two views
    per modality on the device, choosing each modality's pipeline from the ``view`` kind of
    :attr:`modality_specs` (paper B.1), which every subclass defines
    (:class:`DescribesModalities`).
    """

    val_dataloader = LightningDataModule.val_dataloader

    def train_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        """torchgeo's training loader (``drop_last``), shuffled per epoch from a fixed seed.

        The order depends only on the seed in force when the datamodule was built (set by
        ``seed_everything``) and the epoch. The loader is torchdata's ``StatefulDataLoader``,
        whose position Lightning saves in every checkpoint, so a run resumed from a checkpoint
        taken at any step (also inside an epoch) reads the data in the order of an uninterrupted
        run. Under a distributed strategy each rank reads its shard of the same permutation
        (:class:`~decur_lightning.datamodules.samplers.EpochSeededDistributedSampler`, which
        Lightning keeps, so epoch-indexed data sets still learn the epoch).
        """
        dataset = self._valid_attribute("train_dataset", "dataset")
        trainer = self.trainer
        world_size = getattr(trainer, "world_size", 1) if trainer is not None else 1
        sampler: EpochSeededRandomSampler | EpochSeededDistributedSampler
        if world_size > 1:
            sampler = EpochSeededDistributedSampler(
                dataset,
                num_replicas=world_size,
                rank=trainer.global_rank,
                shuffle=True,
                seed=self.shuffle_seed,  # type: ignore[union-attr]
            )
        else:
            sampler = EpochSeededRandomSampler(dataset, self.shuffle_seed)
        return StatefulDataLoader(
            dataset,
            batch_size=self._valid_attribute("train_batch_size", "batch_size"),
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            drop_last=True,
            persistent_workers=self.num_workers > 0,
        )

    @property
    def shuffle_seed(self) -> int:
        """Seed of the training order, fixed at the first call (after ``seed_everything``).

        Saved in checkpoints (:meth:`state_dict`), so a resumed run keeps the order of the run
        it continues even under another global seed: a position restored inside an epoch would
        otherwise point into a different permutation (samples seen twice or not at all).
        """
        if not hasattr(self, "_shuffle_seed"):
            self._shuffle_seed = int(torch.initial_seed() % 2**31)
        return self._shuffle_seed

    def state_dict(self) -> dict[str, Any]:
        """The training order's seed (Lightning stores it in checkpoints)."""
        return {"shuffle_seed": self.shuffle_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the training order's seed from a checkpoint (before the loader is built)."""
        if "shuffle_seed" in state_dict:
            self._shuffle_seed = int(state_dict["shuffle_seed"])

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Return the batch unchanged: views are made by the LightningModule (B.1)."""
        return batch


# --------------------------------------------------------------------------------------------
# Early checks and unreadable files (issue 16 items 1 and 6). Kept apart from PretrainDataModule's
# DataLoader construction on purpose.

READ_ERROR_POLICIES = ("raise", "skip")
"""Allowed values of the datamodules' ``on_read_error`` argument."""

DEFAULT_MAX_READ_ERRORS = 100
"""Default ``max_read_errors``: how many distinct unreadable samples ``on_read_error='skip'``
tolerates per process before failing. A few corrupt files among SSL4EO-S12's 251k locations or
BigEarthNet's 590k patches are a nuisance; a hundred mean an incomplete download or extraction,
which should stop the run rather than silently shrink the data."""


def check_read_error_policy(on_read_error: str, max_read_errors: int) -> None:
    """Reject an unknown ``on_read_error`` policy or a negative ``max_read_errors``."""
    if on_read_error not in READ_ERROR_POLICIES:
        raise ValueError(
            f"on_read_error must be one of {READ_ERROR_POLICIES}, got {on_read_error!r}: 'raise' stops at the "
            "first unreadable file, 'skip' replaces its sample by the next readable one"
        )
    if isinstance(max_read_errors, bool) or not isinstance(max_read_errors, int) or max_read_errors < 0:
        raise ValueError(f"max_read_errors must be a non-negative int, got {max_read_errors!r}")


def check_enough_for_a_batch(split: str, size: int, batch_size: int, hint: str) -> None:
    """Fail early when a ``drop_last`` training split cannot fill a single batch.

    Lightning would otherwise warn "No training batches", train nothing and exit normally.

    Args:
        split: name of the split, for the message (e.g. ``'GeoNRW train (cities ...)'``).
        size: number of samples in the split.
        batch_size: the training batch size.
        hint: what the user can change (data set specific), appended to the message.

    Raises:
        ValueError: if ``size < batch_size``.
    """
    if size < batch_size:
        raise ValueError(
            f"the {split} split has {size} sample(s), fewer than batch_size={batch_size}: with drop_last "
            f"it yields no training batch and the run would train nothing. Lower batch_size to at most "
            f"{size}{', or ' + hint if hint else ''}."
        )


def unreadable_files(paths: Sequence[str]) -> list[str]:
    """The files among ``paths`` that rasterio cannot open or read completely."""
    bad = []
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(path) as src:
                    src.read()
        except (RasterioError, OSError):
            bad.append(path)
    return bad


class ReadErrorGuard(torch.utils.data.Dataset):
    """Wrap a file-backed data set with a policy for unreadable files (corrupt, truncated, missing).

    ``on_read_error='raise'`` re-raises the reader's error as an :class:`OSError` that names the
    data set, the sample index and the unreadable file(s), and says how to skip them.
    ``on_read_error='skip'`` replaces the sample by the next readable one (index ``i + 1``,
    ``i + 2``, ... modulo the length; an :class:`~decur_lightning.datamodules.samplers.EpochIndex`
    keeps its epoch), so the replacement is deterministic; it warns once per unreadable sample
    naming the file(s), counts the distinct unreadable samples in :attr:`skipped` and raises once
    more than ``max_read_errors`` were seen.
    The count is kept per process: with ``num_workers > 0`` each DataLoader worker counts the
    samples it read.

    To name the culprit, the wrapped data set (or the data set under a
    :class:`~torch.utils.data.Subset`) may define ``sample_files(index) -> list[str]``;
    on an error those files are opened and read to find the unreadable ones (only on the error
    path). Errors caught: :class:`OSError` (rasterio's ``RasterioIOError`` is one, so is PIL's)
    and rasterio's ``RasterioError``.

    The wrapped data set is :attr:`guarded`; other attribute access is forwarded to it (so a
    guarded :class:`~torch.utils.data.Subset` still has ``indices`` and ``dataset``, and the
    ``epoch_indexed`` flag of :class:`~decur_lightning.datamodules.samplers.EpochSeededRandomSampler`
    is seen through the guard).

    Args:
        dataset: the data set to guard.
        on_read_error: ``'raise'`` (default) or ``'skip'``.
        max_read_errors: most distinct unreadable samples tolerated by ``'skip'``
            (:data:`DEFAULT_MAX_READ_ERRORS`).
        name: data set name for messages (default: the class name).
    """

    def __init__(
        self,
        dataset: Any,
        on_read_error: str = "raise",
        max_read_errors: int = DEFAULT_MAX_READ_ERRORS,
        name: str | None = None,
    ) -> None:
        check_read_error_policy(on_read_error, max_read_errors)
        self.guarded = dataset
        self.on_read_error = on_read_error
        self.max_read_errors = max_read_errors
        self.name = name or type(dataset).__name__
        self.skipped: dict[int, list[str]] = {}
        """Unreadable sample index (within the epoch) -> its unreadable files, in this process."""

    def __len__(self) -> int:
        return len(self.guarded)

    def __getattr__(self, name: str) -> Any:
        if name == "guarded":  # not yet set (e.g. during unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.guarded, name)

    def _culprits(self, index: int) -> list[str]:
        dataset = self.guarded
        while isinstance(dataset, Subset):  # look through subsets to the file-backed data set
            index, dataset = dataset.indices[index], dataset.dataset
        sample_files = getattr(dataset, "sample_files", None)
        if sample_files is None:
            return []
        try:
            return unreadable_files(sample_files(index))
        except Exception:  # naming the file is best effort; the original error is reported anyway
            return []

    def __getitem__(self, index: int) -> Any:
        length = len(self.guarded)
        epoch = getattr(index, "epoch", None)
        for offset in range(length):
            key = (int(index) + offset) % length
            candidate = key if epoch is None else EpochIndex(key, epoch)
            try:
                return self.guarded[candidate]
            except (RasterioError, OSError) as error:
                culprits = self._culprits(candidate)
                files = ", ".join(culprits) if culprits else "(file not identified; see the error above)"
                where = f"sample {key} of {self.name}"
                if self.on_read_error == "raise":
                    raise OSError(
                        f"cannot read {where}: unreadable file(s) {files}: {error}. Replace or delete the "
                        "file(s), or pass on_read_error='skip' to the datamodule to replace such samples by "
                        "readable ones (up to max_read_errors of them)."
                    ) from error
                if key not in self.skipped:
                    self.skipped[key] = culprits
                    warnings.warn(
                        f"{self.name}: skipping unreadable {where}: {files} ({error}); "
                        f"{len(self.skipped)} unreadable sample(s) so far (max_read_errors={self.max_read_errors})",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                if len(self.skipped) > self.max_read_errors:
                    raise OSError(
                        f"{self.name}: {len(self.skipped)} unreadable samples, more than max_read_errors="
                        f"{self.max_read_errors}; the last one: {where}, file(s) {files}. Check that the data "
                        "set is completely downloaded and extracted, or raise max_read_errors."
                    ) from error
        raise OSError(f"{self.name}: no readable sample at all ({length} tried)")
