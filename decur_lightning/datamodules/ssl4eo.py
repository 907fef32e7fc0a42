"""SSL4EO-S12 Sentinel-1/Sentinel-2 pairs for SAR-optical DeCUR pretraining (paper Section 4, B.1).

torchgeo 0.8.1's :class:`~torchgeo.datasets.SSL4EOS12` serves one modality per instance. This
module pairs two of them (``s1`` and ``s2c``) by location index: download, extraction, checksum,
band lists and scene-name parsing are torchgeo's; what is added here is the pairing, a length
computed from the location folders on disk (torchgeo's is hard-coded to 251,079), the paper's
normalisation and season draws that are a pure function of (seed, epoch, location) (torchgeo draws
with Python's global ``random``), optionally one per view as in the authors' released code. The
scenes are read here, the way torchgeo reads them, once the seasons are chosen.
"""

from __future__ import annotations

import glob
import os
import re
import warnings
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import rasterio
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchgeo.datasets import SSL4EOS12, NonGeoDataset, Sentinel1, Sentinel2
from torchgeo.datasets.utils import Path, disambiguate_timestamp

from ..modalities import Modality
from ._common import (
    DEFAULT_MAX_READ_ERRORS,
    S1_BANDS,
    PretrainDataModule,
    ReadErrorGuard,
    check_enough_for_a_batch,
    check_read_error_policy,
    normalize_sar,
    scale_mean_std,
    seasonal_band_names,
)

# Sentinel-1 GRD (VV, VH) in dB, as stored in SSL4EO-S12's s1 GeoTIFFs (Earth Engine's
# COPERNICUS/S1_GRD is log-scaled). The rounded SSL4EO-S12 statistics that the project's
# REFERENCE.md lists for DeCUR. zhu-xlab/DeCUR's src/pretrain/datasets/SSL4EO/
# ssl4eo_dataset_lmdb_mm_norm.py uses the SSL4EO-S12 50k-sample estimate
# [-12.548, -20.192] / [5.257, 5.912] instead: the same to within 0.07 dB.
S1_MEAN: tuple[float, ...] = (-12.59, -20.26)
S1_STD: tuple[float, ...] = (5.26, 5.91)

# Sentinel-2 L1C (13 bands B1, B2, B3, B4, B5, B6, B7, B8, B8A, B9, B10, B11, B12), digital
# numbers (reflectance x 10000). Source: SSL4EO-S12 authors, zhu-xlab/SSL4EO-S12,
# src/benchmark/pretrain_ssl/datasets/SSL4EO/ssl4eo_dataset.py (S2C_MEAN / S2C_STD, "calculated
# from 50k data"); the same lists appear in zhu-xlab/DeCUR src/pretrain/datasets/SSL4EO/.
S2C_MEAN: tuple[float, ...] = (
    1605.57504906,
    1390.78157673,
    1314.8729939,
    1363.52445545,
    1549.44374991,
    2091.74883118,
    2371.7172463,
    2299.90463006,
    2560.29504086,
    830.06605044,
    22.10351321,
    2177.07172323,
    1524.06546312,
)
S2C_STD: tuple[float, ...] = (
    786.78685367,
    850.34818441,
    875.06484736,
    1138.84957046,
    1122.17775652,
    1161.59187054,
    1274.39184232,
    1248.42891965,
    1345.52684884,
    577.31607053,
    51.15431158,
    1336.09932639,
    1136.53823676,
)

_LOCATION_FOLDER = re.compile(r"^\d{7}$")


def sentinel2_band_names(bands: list[str] | tuple[str, ...]) -> list[str]:
    """Sentinel-2 band names with zero-padded numbers (``B1`` -> ``B01``, ``B8A`` stays), in the given order."""
    return [f"B{int(band[1:]):02d}" if band[1:].isdigit() else band for band in bands]


class SSL4EOS12MM(NonGeoDataset):
    """Paired SSL4EO-S12 dataset: Sentinel-1 GRD and Sentinel-2 L1C of the same location.

    On-disk layout (torchgeo's, as extracted from the Hugging Face release)::

        root/s1/{index:07d}/{scene}/{VV,VH}.tif                  float32, dB
        root/s2c/{index:07d}/{scene}/{B1,...,B8A,...,B12}.tif    uint16 digital numbers

    Each location folder holds four seasonal scenes per modality. Following the paper (Section 4:
    "One random season is selected for each image and modality"), every ``__getitem__`` draws the
    season(s) of S1 and of S2 independently, so the two images of a pair share the location but
    usually not the date.

    Season draws are a pure function of ``(seed, epoch, location, modality, view)``: each comes from
    ``numpy.random.default_rng([seed, epoch, location, modality number, view])`` choosing
    ``seasons`` of the location's scene folders (sorted by name, i.e. by date) without
    replacement. They do not depend on Python's or a worker's RNG, so a run resumed mid-epoch
    reads the same seasons. The epoch comes in with the index (:attr:`epoch_indexed`): the
    datamodule's :class:`~decur_lightning.datamodules.samplers.EpochSeededRandomSampler` yields
    :class:`~decur_lightning.datamodules.samplers.EpochIndex` values carrying it; a plain ``int``
    index is epoch 0. (Under a distributed strategy Lightning replaces that sampler by its
    ``DistributedSampler``, whose plain indices make every epoch draw the seasons of epoch 0.)

    Season per view (``season_per_view=True``, the authors' released code,
    ``TwoCropsTransform_SSL4EO(season='augment')``, which draws ``np.random.choice([0,1,2,3])``
    once per view, so both views may share a season): each modality also gets a second,
    independently drawn season under ``image2_<name>``, from which the LightningModule makes that
    modality's second view; the intra-modal terms then see seasonal change too. With
    ``season_per_view=False`` (default) both views of a modality are cropped from ``image_<name>``.
    ``image_<name>`` is the same in both settings.

    Sample keys:

    * ``image_s1``: float32 ``(2 * seasons, 264, 264)``, bands VV, VH (per season), in [0, 1]
    * ``image_s2``: float32 ``(13 * seasons, 264, 264)``, bands B1..B12 with B8A and B10, in [0, 1]
    * ``location``: int64 scalar, the location index (folder name)
    * ``t_s1``, ``t_s2``: float32 ``(seasons,)``, acquisition times (POSIX seconds) of the drawn
      scenes
    * with ``season_per_view=True`` also ``image2_s1``, ``image2_s2`` (same shapes as ``image_s1``,
      ``image_s2``) and ``t2_s1``, ``t2_s2``: the second view's independently drawn season(s)

    torchgeo's per-modality ``x``/``y`` (scene centre), ``wavelength`` and ``res`` (10 m) entries
    are not returned: they are constant per modality or implied by ``location``.

    Normalisation (paper B.1, ``normalize=True``): S2 bands map ``[mean - 2 std, mean + 2 std]``
    to ``[0, 1]`` and clip (the authors' 8-bit scheme, kept in float); S1 bands first clip 2 %
    per-image outliers (1st/99th percentile per band), then map the same way. Statistics:
    :data:`S1_MEAN`/:data:`S1_STD`, :data:`S2C_MEAN`/:data:`S2C_STD`. With ``normalize=False`` the
    raw dB values and digital numbers are returned. The paper's 224 px crop is not taken here:
    views are cropped on the device by :class:`~decur_lightning.DeCURModule`.

    Args:
        root: directory holding ``s1/`` and ``s2c/`` (or their ``.tar.gz.part*`` archives).
        seasons: number of seasons drawn per modality and stacked along channels (1 in the paper).
        normalize: apply the paper's normalisation (see above).
        transforms: callable applied to the finished sample dict (torchgeo convention).
        download: download the ``s1`` and ``s2c`` archives if missing (about 1.5 TB compressed).
        checksum: verify the MD5 of downloaded archives.
        season_per_view: also return a second, independently drawn season per modality
            (``image2_<name>``, ``t2_<name>``), as the authors' released code does (see above).
        seed: non-negative seed of the season draws.

    Raises:
        DatasetNotFoundError: if ``root`` holds neither the extracted files nor the archives and
            ``download`` is False (raised by torchgeo, with instructions).
        ValueError: if no location holds both modalities, or if only Sentinel-2 L2A (``s2a/``)
            is present where L1C (``s2c/``) is required.
        FileNotFoundError: from ``__getitem__``, if a location has fewer scene folders than
            ``seasons`` or a scene lacks a band file.
    """

    modalities: ClassVar[dict[str, str]] = {"s1": "s1", "s2": "s2c"}
    """Output modality name -> torchgeo ``SSL4EOS12`` split."""

    epoch_indexed: ClassVar[bool] = True
    """Indices may carry the epoch (:class:`~decur_lightning.datamodules.samplers.EpochIndex`)."""

    def __init__(
        self,
        root: Path = "data",
        seasons: int = 1,
        normalize: bool = True,
        transforms: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
        download: bool = False,
        checksum: bool = False,
        season_per_view: bool = False,
        seed: int = 0,
    ) -> None:
        if seasons not in (1, 2, 3, 4):
            raise ValueError(f"seasons must be 1, 2, 3 or 4 (SSL4EO-S12 has 4 per location), got {seasons}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.root = root
        self.seasons = seasons
        self.normalize = normalize
        self.transforms = transforms
        self.season_per_view = season_per_view
        self.seed = seed
        if not download:
            self._check_l1c_present()
        self.datasets = {
            name: SSL4EOS12(root, split=split, seasons=seasons, download=download, checksum=checksum)  # type: ignore[arg-type]
            for name, split in self.modalities.items()
        }
        self.locations = self._paired_locations()

    def _check_l1c_present(self) -> None:
        """Say that L1C (``s2c/``) is required when only L2A (``s2a/``) is on disk."""
        split = self.modalities["s2"]
        has_files = glob.glob(os.path.join(self.root, split, "00000*", "*", "*.tif"))
        has_archives = glob.glob(os.path.join(self.root, f"{SSL4EOS12.filenames[split]}.tar.gz.part*"))
        if has_files or has_archives:
            return
        found = [name for name in ("s2a", "s2c") if os.path.isdir(os.path.join(self.root, name))]
        if "s2a" in found:
            raise ValueError(
                f"SSL4EO-S12: found {os.path.join(self.root, 's2a')} (Sentinel-2 L2A) but no L1C data in "
                f"{os.path.join(self.root, split)}: DeCUR pretrains on the 13-band Sentinel-2 L1C product "
                "(s2c/, paper Section 4). Download or extract s2c/ next to s1/ (or pass download=True)."
            )

    def _paired_locations(self) -> list[int]:
        """Location indices whose folder exists for every modality, sorted."""
        folders = {
            split: {name for name in os.listdir(os.path.join(self.root, split)) if _LOCATION_FOLDER.match(name)}
            for split in self.modalities.values()
        }
        paired = set.intersection(*folders.values())
        unpaired = {split: len(names - paired) for split, names in folders.items() if names - paired}
        if unpaired:
            warnings.warn(
                f"SSL4EOS12MM: {unpaired} location folder(s) under {self.root} exist for only one "
                "modality and are skipped; extract both archives fully to use them.",
                stacklevel=3,
            )
        if not paired:
            raise ValueError(
                f"no SSL4EO-S12 location under {self.root} has both s1/ and s2c/ data: expected "
                "folders root/s1/<7-digit index>/ and root/s2c/<same index>/"
            )
        return sorted(int(name) for name in paired)

    def __len__(self) -> int:
        """Number of locations present for both modalities."""
        return len(self.locations)

    def decode_index(self, index: int) -> tuple[int, int]:
        """``(epoch, location)`` of an index (an ``EpochIndex`` carries its epoch; an ``int`` is epoch 0)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {int(index)} out of range for {len(self)} locations")
        return int(getattr(index, "epoch", 0)), self.locations[int(index)]

    def scene_folders(self, split: str, location: int) -> list[str]:
        """The scene folders of ``location`` for torchgeo split ``split``, sorted by name (date)."""
        directory = os.path.join(self.root, split, f"{location:07d}")
        regex = SSL4EOS12.metadata[split]["filename_regex"]
        return sorted(os.path.join(directory, name) for name in os.listdir(directory) if re.match(regex, name))

    def draw_seasons(self, epoch: int, location: int, modality: int, view: int, available: int) -> list[int]:
        """Which of ``available`` scenes to read: a pure function of its arguments and the seed."""
        rng = np.random.default_rng([self.seed, epoch, location, modality, view])
        return [int(i) for i in rng.choice(available, size=self.seasons, replace=False)]

    def _read_scenes(self, split: str, scenes: list[str]) -> tuple[Tensor, Tensor]:
        """Read the bands of ``scenes`` like torchgeo's SSL4EOS12: ``(image, t)``."""
        dataset = self.datasets[next(name for name, s in self.modalities.items() if s == split)]
        date_format = Sentinel1.date_format if split == "s1" else Sentinel2.date_format
        regex = SSL4EOS12.metadata[split]["filename_regex"]
        images, times = [], []
        for scene in scenes:
            match = re.match(regex, os.path.basename(scene))
            assert match is not None  # scene_folders keeps matching names only
            mint, maxt = disambiguate_timestamp(match.group("date"), date_format)
            for band in dataset.bands:
                with rasterio.open(os.path.join(scene, f"{band}.tif")) as src:
                    image = src.read(out_shape=(1, dataset.size, dataset.size))
                images.append(torch.from_numpy(image.astype(np.float32)))
            times.append((mint.timestamp() + maxt.timestamp()) / 2)
        return torch.cat(images), torch.tensor(times)

    def sample_files(self, index: int) -> list[str]:
        """Every band file of every scene of the sample's location (for error reports)."""
        location = self.decode_index(index)[1]
        return [
            os.path.join(scene, f"{band}.tif")
            for name, split in self.modalities.items()
            for scene in self.scene_folders(split, location)
            for band in self.datasets[name].bands
        ]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """Return S1 and S2 of a location, seasons drawn independently per modality (and view).

        Args:
            index: ``i`` (epoch 0) or ``EpochIndex(i, epoch)`` for location ``self.locations[i]``.
        """
        epoch, location = self.decode_index(index)
        sample: dict[str, Tensor] = {"location": torch.tensor(location)}
        views = (("image", "t"), ("image2", "t2")) if self.season_per_view else (("image", "t"),)
        for modality, (name, split) in enumerate(self.modalities.items()):
            scenes = self.scene_folders(split, location)
            if len(scenes) < self.seasons:
                raise FileNotFoundError(
                    f"{os.path.join(self.root, split, f'{location:07d}')} holds {len(scenes)} scene folder(s), "
                    f"fewer than seasons={self.seasons}"
                )
            read: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}  # a season drawn twice is read once
            for view, (image_key, time_key) in enumerate(views):
                chosen = tuple(self.draw_seasons(epoch, location, modality, view, len(scenes)))
                if chosen not in read:
                    image, times = self._read_scenes(split, [scenes[i] for i in chosen])
                    read[chosen] = (self._normalize(name, image) if self.normalize else image, times)
                image, times = read[chosen]
                sample[f"{image_key}_{name}"] = image
                sample[f"{time_key}_{name}"] = times
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample

    def _normalize(self, name: str, image: Tensor) -> Tensor:
        """Normalise a ``(seasons * C, H, W)`` stack season by season (paper B.1)."""
        per_season = image.view(self.seasons, -1, *image.shape[-2:])
        if name == "s1":
            seasons = [normalize_sar(season, S1_MEAN, S1_STD) for season in per_season]
        else:
            seasons = [scale_mean_std(season, S2C_MEAN, S2C_STD) for season in per_season]
        return torch.cat(seasons)


class SSL4EOS12MMDataModule(PretrainDataModule):
    """SSL4EO-S12 S1/S2 pairs for DeCUR SAR-optical pretraining (paper Section 4, B.1).

    Serves :class:`SSL4EOS12MM` as the training set; there is no validation split (pretraining is
    judged on downstream tasks). Batches are dicts with ``image_s1`` ``(B, 2, 264, 264)`` and
    ``image_s2`` ``(B, 13, 264, 264)`` in [0, 1]; no augmentation runs here: DeCURModule makes the
    views on the device, each modality's pipeline chosen from its ``view`` kind in
    :attr:`modality_specs`.
    With ``season_per_view=True`` batches also hold ``image2_s1``/``image2_s2``, the second views'
    independently drawn seasons (the authors' released code; see :class:`SSL4EOS12MM`). Season
    draws are seeded by the datamodule's :attr:`shuffle_seed` and the epoch.

    Modalities (:attr:`modality_specs`): ``s1`` (view kind ``"sar"``, bands VV, VH) then ``s2``
    (``"optical"``, the 13 L1C bands B01..B12 with B8A after B08, as SSL4EO-S12 orders them), each
    stacked ``seasons`` times (band names ``<band>_season<k>`` when ``seasons > 1``).

    Args:
        root: dataset directory (see :class:`SSL4EOS12MM`).
        batch_size: samples per batch (the paper uses 256).
        num_workers: DataLoader worker processes.
        seasons: seasons stacked per modality (1 in the paper).
        normalize: apply the paper's normalisation.
        download: download the data if missing.
        checksum: verify archive checksums.
        season_per_view: draw a season per view, not per modality (released code).
        on_read_error: ``'raise'`` (default) stops at an unreadable GeoTIFF naming it; ``'skip'``
            replaces its sample by the next readable one and warns (see
            :class:`~decur_lightning.datamodules._common.ReadErrorGuard`).
        max_read_errors: most unreadable samples ``'skip'`` tolerates per process (default 100).

    Example YAML (LightningCLI)::

        data:
          class_path: decur_lightning.datamodules.SSL4EOS12MMDataModule
          init_args: {root: /data/ssl4eo-s12, batch_size: 256, num_workers: 8}
    """

    _VIEWS: ClassVar[dict[str, str]] = {"s1": "sar", "s2": "optical"}

    def __init__(
        self,
        root: Path = "data",
        batch_size: int = 256,
        num_workers: int = 0,
        seasons: int = 1,
        normalize: bool = True,
        download: bool = False,
        checksum: bool = False,
        season_per_view: bool = False,
        on_read_error: str = "raise",
        max_read_errors: int = DEFAULT_MAX_READ_ERRORS,
    ) -> None:
        check_read_error_policy(on_read_error, max_read_errors)
        super().__init__(
            SSL4EOS12MM,  # type: ignore[arg-type]
            batch_size,
            num_workers,
            root=root,
            seasons=seasons,
            normalize=normalize,
            download=download,
            checksum=checksum,
            season_per_view=season_per_view,
        )
        self.on_read_error = on_read_error
        self.max_read_errors = max_read_errors

    @property
    def modality_specs(self) -> dict[str, Modality]:
        """``s1`` (SAR: VV, VH) and ``s2`` (optical: 13 L1C bands), times ``seasons`` (see the class)."""
        seasons = int(self.kwargs["seasons"])
        bands = {"s1": S1_BANDS, "s2": sentinel2_band_names(SSL4EOS12.metadata["s2c"]["bands"])}
        # What _normalize applies (recorded in checkpoints and shipped with exported weights).
        normalize = bool(self.kwargs.get("normalize", True))
        normalization = {
            "s1": {
                "method": "mean_2std",
                "mean": list(S1_MEAN) * seasons,
                "std": list(S1_STD) * seasons,
                "outlier_fraction": 0.02,
                "input": "float32 backscatter in dB (Sentinel-1 GRD, log-scaled)",
            },
            "s2": {
                "method": "mean_2std",
                "mean": list(S2C_MEAN) * seasons,
                "std": list(S2C_STD) * seasons,
                "input": "uint16 Sentinel-2 L1C digital numbers (top-of-atmosphere reflectance x 10000)",
            },
        }
        return {
            name: Modality(
                bands=len(bands[name]) * seasons,
                view=view,
                band_names=seasonal_band_names(bands[name], seasons),
                normalization=normalization[name]
                if normalize
                else {"method": "none", "input": normalization[name]["input"]},
            )
            for name, view in self._VIEWS.items()
        }

    def setup(self, stage: str) -> None:
        """Create the training dataset (every stage uses the same pairs).

        Raises:
            ValueError: in the fit stage, if there are fewer locations than ``batch_size``
                (no training batch with ``drop_last``).
        """
        dataset = SSL4EOS12MM(**self.kwargs, seed=self.shuffle_seed)
        if stage == "fit":
            check_enough_for_a_batch(
                f"SSL4EO-S12 training ({dataset.root})",
                len(dataset),
                self.train_batch_size or self.batch_size,
                "extract more locations (both s1/ and s2c/)",
            )
        self.train_dataset = ReadErrorGuard(dataset, self.on_read_error, self.max_read_errors)

    def train_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        """As :class:`PretrainDataModule`'s, with the season draws seeded by :attr:`shuffle_seed`.

        Lightning calls ``setup`` before it restores the datamodule's state from a checkpoint,
        so the seed is applied again here: a resumed run draws the seasons of the run it
        continues, also under another global seed.
        """
        self.train_dataset.guarded.seed = self.shuffle_seed
        return super().train_dataloader()
