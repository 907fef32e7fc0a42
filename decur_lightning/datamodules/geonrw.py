"""GeoNRW aerial RGB + lidar DEM: RGB-DEM pretraining and segmentation (paper Section 4, B.1, B.2).

Built on torchgeo's :class:`~torchgeo.datasets.GeoNRW` (city lists, file names, download and
verification). Added here: the 250 x 250 patch grid the paper uses ("We crop the raw 6,942
training scenes to 111k patches with size 250x250", i.e. 16 patches per 1000 px tile), windowed
reads, DEM normalisation, a class mapping that ignores the background, and datamodules whose
augmentations move RGB, DEM and mask together.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import ClassVar

import kornia.augmentation as K
import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from torchgeo.datamodules import NonGeoDataModule
from torchgeo.datamodules.utils import group_shuffle_split
from torchgeo.datasets import GeoNRW
from torchgeo.datasets.utils import Path

from ..modalities import Modality
from ._common import (
    DEFAULT_MAX_READ_ERRORS,
    RGB_BANDS,
    DescribesModalities,
    PairedAugmentation,
    PretrainDataModule,
    ReadErrorGuard,
    check_enough_for_a_batch,
    check_read_error_policy,
    percentile_min_max,
    seeded_subset,
)


def read_window(path: str, window: Window, expected_size: int) -> np.ndarray:
    """Read one window of a raster (all bands) without decoding the rest of the file.

    GeoTIFFs are read strip by strip; JPEG 2000 goes through GDAL's OpenJPEG driver, which
    decodes only the requested area. On a 1000 x 1000 RGB jp2 that is about 2x faster than
    decoding the whole tile with PIL and cropping (0.17 s vs 0.32 s here), and reading the 16
    patches of a tile never decodes the full tile 16 times at full cost.

    Args:
        path: raster file.
        window: pixel window to read.
        expected_size: the tile's expected width and height in pixels.

    Returns:
        ``(bands, height, width)`` array in the file's dtype.

    Raises:
        ValueError: if the raster is not ``expected_size`` pixels square.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            if (src.height, src.width) != (expected_size, expected_size):
                raise ValueError(
                    f"{path} is {src.height}x{src.width} px, expected {expected_size}x{expected_size}: "
                    "GeoNRW tiles are 1000 px; pass tile_size= to match your files"
                )
            return src.read(window=window)


def _geonrw_specs(dem_channels: int) -> dict[str, Modality]:
    """GeoNRW's modalities: ``rgb`` (aerial RGB, bands R, G, B) then ``dem`` (``dem_channels``
    copies of the lidar elevation band ``DEM``), with their view kinds (paper B.1) and the
    normalisation :class:`GeoNRWMM` applies (recorded in checkpoints, shipped with exports)."""
    dem_normalization = {
        "method": "percentile_min_max",
        "lower": 0.01,
        "upper": 0.99,
        "input": "float32 lidar elevation (m)",
    }
    return {
        "rgb": Modality(
            bands=3,
            view="aerial_rgb",
            band_names=list(RGB_BANDS),
            normalization={"method": "scale", "divisor": 255.0, "input": "uint8 aerial RGB"},
        ),
        "dem": Modality(
            bands=dem_channels, view="dem", band_names=["DEM"] * dem_channels, normalization=dem_normalization
        ),
    }


class GeoNRWMM(GeoNRW):
    """GeoNRW cut into square patches, with RGB, DEM and (optionally) the segmentation mask.

    Layout (torchgeo's)::

        root/<city>/<x>_<y>_rgb.jp2   3 x 1000 x 1000 uint8 aerial orthophoto (1 m)
        root/<city>/<x>_<y>_dem.tif   1 x 1000 x 1000 float32 lidar elevation (m)
        root/<city>/<x>_<y>_seg.tif   1 x 1000 x 1000 uint8 labels 0..10 (0 = background)

    ``split='train'`` holds torchgeo's 40 training cities, ``'test'`` Duesseldorf, Herne and
    Neuss. Each tile is a ``tile_size / patch_size`` square grid of patches; patch ``i`` is tile
    ``i // n**2``, grid row ``(i % n**2) // n``, column ``i % n`` (``n`` patches per side). Only
    the patch's window is read from each file (:func:`read_window`), so shuffled patches never
    need a whole tile in memory.

    Sample keys:

    * ``image_rgb``: float32 ``(3, p, p)``, RGB divided by 255, in [0, 1]
    * ``image_dem``: float32 ``(dem_channels, p, p)`` in [0, 1]. Absolute elevation varies by
      hundreds of metres across North Rhine-Westphalia and says little about the land cover, so
      each patch is normalised on its own: clipped to its 1st/99th percentile and min-max scaled
      (the authors' RGB-DEM pretraining loader). ``dem_channels=3`` repeats the band for a
      standard 3-channel ResNet-50, as the paper does (B.1).
    * ``mask`` (``include_mask=True``): int64 ``(p, p)``, the 10 land-cover classes as 0..9
      (torchgeo class ``k`` becomes ``k - 1``: forest, water, agricultural, residential/commercial/
      industrial, grassland/swamp/shrubbery, railway/trainstation, highway/squares, airport/
      shipyard, roads, buildings); background (0) becomes :attr:`ignore_index` (255).

    Args:
        root: dataset directory (see layout).
        split: ``'train'`` or ``'test'``.
        patch_size: patch side in pixels (250 in the paper).
        tile_size: tile side in pixels (1000 for GeoNRW); must be a multiple of ``patch_size``.
        include_mask: also read the segmentation mask (not needed for pretraining).
        dem_channels: 1, or 3 to repeat the DEM band.
        transforms: callable applied to the finished sample dict.
        download: download and extract the archive if missing.
        checksum: verify the archive's MD5.

    Raises:
        DatasetNotFoundError: if the data is missing and ``download`` is False (torchgeo).
    """

    num_classes: ClassVar[int] = 10
    ignore_index: ClassVar[int] = 255
    class_names: ClassVar[tuple[str, ...]] = GeoNRW.classes[1:]

    def __init__(
        self,
        root: Path = "data",
        split: str = "train",
        patch_size: int = 250,
        tile_size: int = 1000,
        include_mask: bool = True,
        dem_channels: int = 1,
        transforms: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
        download: bool = False,
        checksum: bool = False,
    ) -> None:
        if patch_size <= 0 or tile_size % patch_size:
            raise ValueError(f"tile_size ({tile_size}) must be a positive multiple of patch_size ({patch_size})")
        if dem_channels not in (1, 3):
            raise ValueError(f"dem_channels must be 1 or 3, got {dem_channels}")
        super().__init__(root, split, transforms=transforms, download=download, checksum=checksum)
        self.patch_size = patch_size
        self.tile_size = tile_size
        self.patches_per_side = tile_size // patch_size
        self.include_mask = include_mask
        self.dem_channels = dem_channels

    def __len__(self) -> int:
        """Number of patches: tiles times patches per tile."""
        return len(self.file_list) * self.patches_per_side**2

    def patch_location(self, index: int) -> tuple[str, Window]:
        """The RGB tile path and pixel window of patch ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"patch index {index} out of range for {len(self)} patches")
        tile, patch = divmod(index, self.patches_per_side**2)
        row, col = divmod(patch, self.patches_per_side)
        window = Window(col * self.patch_size, row * self.patch_size, self.patch_size, self.patch_size)
        return self.file_list[tile], window

    def sample_files(self, index: int) -> list[str]:
        """The files patch ``index`` reads: RGB, DEM and (with ``include_mask``) labels."""
        rgb_path = self.patch_location(index)[0]
        utm_coords = os.path.basename(rgb_path).split("_")[:2]
        tile_dir = os.path.dirname(rgb_path)
        modalities = ("dem", "seg") if self.include_mask else ("dem",)
        return [rgb_path] + [os.path.join(tile_dir, self.modality_filenames[m](utm_coords)) for m in modalities]

    def patch_city(self, index: int) -> str:
        """City (folder name) of patch ``index``."""
        return os.path.basename(os.path.dirname(self.patch_location(index)[0]))

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """Read the RGB, DEM (and mask) windows of patch ``index``."""
        rgb_path, window = self.patch_location(index)
        utm_coords = os.path.basename(rgb_path).split("_")[:2]
        tile_dir = os.path.dirname(rgb_path)

        def path_of(modality: str) -> str:
            return os.path.join(tile_dir, self.modality_filenames[modality](utm_coords))

        rgb = read_window(rgb_path, window, self.tile_size)
        if rgb.shape[0] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"{rgb_path}: expected 3 uint8 bands, got {rgb.shape[0]} {rgb.dtype}")
        dem = torch.from_numpy(read_window(path_of("dem"), window, self.tile_size).astype(np.float32))
        dem = percentile_min_max(dem)
        sample: dict[str, Tensor] = {
            "image_rgb": torch.from_numpy(rgb).float().div_(255.0),
            "image_dem": dem.expand(self.dem_channels, -1, -1).contiguous(),
        }
        if self.include_mask:
            seg = torch.from_numpy(read_window(path_of("seg"), window, self.tile_size)[0].astype(np.int64))
            sample["mask"] = self.labels_to_mask(seg, path_of("seg"))
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample

    @classmethod
    def labels_to_mask(cls, seg: Tensor, source: str = "mask") -> Tensor:
        """Map GeoNRW labels 0..10 to classes 0..9, background to :attr:`ignore_index`."""
        if seg.numel() and (seg.min() < 0 or seg.max() > cls.num_classes):
            raise ValueError(
                f"{source}: GeoNRW labels must lie in 0..{cls.num_classes}, found {int(seg.min())}..{int(seg.max())}"
            )
        return torch.where(seg == 0, torch.full_like(seg, cls.ignore_index), seg - 1)


class GeoNRWMMPretrainDataModule(PretrainDataModule):
    """GeoNRW training split as 250 px RGB + DEM patches for DeCUR pretraining (paper B.1).

    Batches hold ``image_rgb`` ``(B, 3, p, p)`` and ``image_dem`` ``(B, dem_channels, p, p)`` in
    [0, 1]; no mask and no augmentation (the SSL module makes the views). All 40 training cities
    are used, as in the paper. Modalities (:attr:`modality_specs`): ``rgb`` (view kind
    ``"aerial_rgb"``, bands R, G, B) then ``dem`` (``"dem"``, ``dem_channels`` bands ``DEM``).

    Args:
        root: dataset directory (see :class:`GeoNRWMM`).
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        patch_size: patch side (250 in the paper).
        tile_size: tile side (1000).
        dem_channels: 1, or 3 to repeat the DEM for a standard ResNet-50 (the paper's choice).
        download: download the data if missing.
        checksum: verify the archive checksum.
        on_read_error: ``'raise'`` (default) stops at an unreadable file naming it; ``'skip'``
            replaces its patch by the next readable one and warns (see
            :class:`~decur_lightning.datamodules._common.ReadErrorGuard`).
        max_read_errors: most unreadable patches ``'skip'`` tolerates per process (default 100).
    """

    def __init__(
        self,
        root: Path = "data",
        batch_size: int = 256,
        num_workers: int = 0,
        patch_size: int = 250,
        tile_size: int = 1000,
        dem_channels: int = 1,
        download: bool = False,
        checksum: bool = False,
        on_read_error: str = "raise",
        max_read_errors: int = DEFAULT_MAX_READ_ERRORS,
    ) -> None:
        check_read_error_policy(on_read_error, max_read_errors)
        self.on_read_error = on_read_error
        self.max_read_errors = max_read_errors
        super().__init__(
            GeoNRWMM,
            batch_size,
            num_workers,
            root=root,
            patch_size=patch_size,
            tile_size=tile_size,
            dem_channels=dem_channels,
            download=download,
            checksum=checksum,
        )

    @property
    def modality_specs(self) -> dict[str, Modality]:
        """``rgb`` (aerial RGB) then ``dem`` (``dem_channels`` bands); see :class:`DescribesModalities`."""
        return _geonrw_specs(int(self.kwargs["dem_channels"]))

    def setup(self, stage: str) -> None:
        """Create the training dataset (train split, no mask).

        Raises:
            ValueError: in the fit stage, if there are fewer patches than ``batch_size``.
        """
        dataset = GeoNRWMM(split="train", include_mask=False, **self.kwargs)
        if stage == "fit":
            check_enough_for_a_batch(
                "GeoNRW pretraining (train)", len(dataset), self.train_batch_size or self.batch_size, "lower patch_size"
            )
        self.train_dataset = ReadErrorGuard(dataset, self.on_read_error, self.max_read_errors, "GeoNRWMM train")


class GeoNRWMMDataModule(DescribesModalities, NonGeoDataModule):
    """GeoNRW RGB + DEM semantic segmentation on 250 px patches (paper Section 4, B.2).

    Splits: the test split's cities (Duesseldorf, Herne, Neuss) for testing; the 40 training
    cities are divided into train and validation *by city* (no patch of a validation city is
    trained on) with torchgeo's ``group_shuffle_split(test_size=val_fraction,
    random_state=seed)``, so a seed fixes the split. ``val_fraction=0`` means no validation
    split: every training city is trained on and ``val_dataloader`` returns no loader (Lightning
    then skips validation). Training batches are augmented on the device
    with RandomResizedCrop(``crop_size``, scale 0.2-1) and a random horizontal flip (B.2), applied
    with identical parameters to ``image_rgb``, ``image_dem`` and ``mask`` (nearest for the mask).
    Validation and test patches are not augmented.

    Batch keys: ``image_rgb``, ``image_dem``, ``mask`` (see :class:`GeoNRWMM`); ignore label
    :attr:`ignore_index` (background), :attr:`num_classes` = 10. Modalities
    (:attr:`modality_specs`): ``rgb`` (R, G, B) then ``dem`` (``dem_channels`` bands), as in
    :class:`GeoNRWMMPretrainDataModule`.

    Args:
        root: dataset directory.
        batch_size: samples per batch (256 in the paper).
        num_workers: DataLoader worker processes.
        val_fraction: share of training cities held out for validation, in ``[0, 1)``; 0: none.
        seed: seed of the city split and of the label fraction.
        train_fraction: share of the training patches used (the paper's 1 % setting: 0.01),
            drawn reproducibly from ``seed`` after the city split; validation is not reduced.
        patch_size: patch side (250).
        tile_size: tile side (1000).
        crop_size: output side of the training RandomResizedCrop.
        dem_channels: 1, or 3 to repeat the DEM.
        download: download the data if missing.
        checksum: verify the archive checksum.
        on_read_error: ``'raise'`` (default) or ``'skip'`` (see
            :class:`~decur_lightning.datamodules._common.ReadErrorGuard`); a skipped patch is
            replaced by the next readable one of the same split.
        max_read_errors: most unreadable patches ``'skip'`` tolerates per split and process (100).
    """

    num_classes: ClassVar[int] = GeoNRWMM.num_classes
    ignore_index: ClassVar[int] = GeoNRWMM.ignore_index

    def __init__(
        self,
        root: Path = "data",
        batch_size: int = 256,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        seed: int = 0,
        train_fraction: float = 1.0,
        patch_size: int = 250,
        tile_size: int = 1000,
        crop_size: int = 224,
        dem_channels: int = 1,
        download: bool = False,
        checksum: bool = False,
        on_read_error: str = "raise",
        max_read_errors: int = DEFAULT_MAX_READ_ERRORS,
    ) -> None:
        super().__init__(
            GeoNRWMM,
            batch_size,
            num_workers,
            root=root,
            patch_size=patch_size,
            tile_size=tile_size,
            dem_channels=dem_channels,
            download=download,
            checksum=checksum,
        )
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(
                f"train_fraction must lie in (0, 1] (0.01 for the paper's 1 % labels), got {train_fraction}"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(
                f"val_fraction must lie in [0, 1) (share of training cities held out for validation; 0 for no "
                f"validation split), got {val_fraction}"
            )
        check_read_error_policy(on_read_error, max_read_errors)
        self.on_read_error = on_read_error
        self.max_read_errors = max_read_errors
        self.val_fraction = val_fraction
        self.seed = seed
        self.train_fraction = train_fraction
        self.train_aug = PairedAugmentation(
            K.RandomResizedCrop((crop_size, crop_size), scale=(0.2, 1.0)),
            K.RandomHorizontalFlip(p=0.5),
        )
        self.aug = PairedAugmentation()

    @property
    def modality_specs(self) -> dict[str, Modality]:
        """``rgb`` (aerial RGB) then ``dem`` (``dem_channels`` bands); see :class:`DescribesModalities`."""
        return _geonrw_specs(int(self.kwargs["dem_channels"]))

    def split_indices(self, dataset: GeoNRWMM) -> tuple[list[int], list[int]]:
        """Train and validation patch indices of the training split, grouped by city.

        Raises:
            ValueError: if ``val_fraction`` leaves no training or no validation city.
        """
        if self.val_fraction == 0.0:
            return list(range(len(dataset))), []
        cities = [dataset.patch_city(index) for index in range(len(dataset))]
        num_cities = len(set(cities))
        num_val = round(num_cities * self.val_fraction)
        if not 0 < num_val < num_cities:
            raise ValueError(
                f"val_fraction={self.val_fraction} of {num_cities} GeoNRW training cities with data leaves "
                f"{num_val} validation and {num_cities - num_val} training cities: choose val_fraction between "
                f"{0.5 / num_cities:.3g} and {1 - 0.5 / num_cities:.3g} (exclusive), or 0 for no validation split"
            )
        return group_shuffle_split(cities, test_size=self.val_fraction, random_state=self.seed)

    def setup(self, stage: str) -> None:
        """Create the city-wise train/val subsets and the test split.

        Raises:
            ValueError: in the fit stage, if the training subset cannot fill one batch.
        """
        if stage in ("fit", "validate"):
            dataset = GeoNRWMM(split="train", **self.kwargs)
            train_indices, val_indices = self.split_indices(dataset)
            kept = seeded_subset(len(train_indices), self.train_fraction, self.seed)
            if stage == "fit":
                check_enough_for_a_batch(
                    f"GeoNRW train ({len(train_indices)} patches of the training cities, train_fraction="
                    f"{self.train_fraction})",
                    len(kept),
                    self.train_batch_size or self.batch_size,
                    "raise train_fraction or lower val_fraction",
                )
            self.train_dataset = self._guard(Subset(dataset, [train_indices[i] for i in kept]), "train")
            if val_indices:
                self.val_dataset = self._guard(Subset(dataset, val_indices), "val")
        if stage == "test":
            self.test_dataset = self._guard(GeoNRWMM(split="test", **self.kwargs), "test")

    def _guard(self, dataset: GeoNRWMM | Subset[dict[str, Tensor]], split: str) -> ReadErrorGuard:
        return ReadErrorGuard(dataset, self.on_read_error, self.max_read_errors, f"GeoNRWMM {split}")

    def val_dataloader(self) -> DataLoader[dict[str, Tensor]] | list[DataLoader[dict[str, Tensor]]]:
        """The validation loader; none (an empty list) with ``val_fraction=0``."""
        if self.val_fraction == 0.0:
            return []
        return super().val_dataloader()
