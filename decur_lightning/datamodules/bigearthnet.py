"""BigEarthNet-MM (v1) Sentinel-1 + Sentinel-2 multi-label classification (paper Section 4, B.2).

Built on torchgeo's :class:`~torchgeo.datasets.BigEarthNet` (v1 layout, split CSVs, download,
extraction, 43 -> 19 class mapping). Added here: separate ``image_s1``/``image_s2`` keys, S1 in
the order VV, VH read as float (torchgeo's reader casts every band to int32, which rounds the
Sentinel-1 dB values to whole decibels), an empty B10 so the 12 L2A bands feed a 13-band L1C encoder,
the paper's normalisation, and a seeded training fraction.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable

import kornia.augmentation as K
import numpy as np
import rasterio
import torch
from rasterio.enums import Resampling
from torch import Tensor
from torch.utils.data import Subset
from torchgeo.datamodules import NonGeoDataModule
from torchgeo.datasets import BigEarthNet
from torchgeo.datasets.utils import Path

from ..modalities import Modality
from ._common import (
    DEFAULT_MAX_READ_ERRORS,
    S1_BANDS,
    S2_L1C_BANDS,
    DescribesModalities,
    PairedAugmentation,
    ReadErrorGuard,
    check_enough_for_a_batch,
    check_read_error_policy,
    normalize_sar,
    scale_mean_std,
    seeded_subset,
)

NUM_CLASSES: tuple[int, ...] = (19, 43)
"""Label sets of BigEarthNet v1: the 19-class nomenclature (the paper's) and the original 43."""
SPLITS: tuple[str, ...] = ("train", "val", "test")


def check_num_classes(num_classes: int) -> None:
    """Refuse a class count BigEarthNet has no label set for (torchgeo only asserts)."""
    if num_classes not in NUM_CLASSES:
        raise ValueError(
            "num_classes must be 19 (the paper's nomenclature) or 43 (BigEarthNet's original labels), "
            f"got {num_classes!r}"
        )


S2_L2A_BANDS: tuple[str, ...] = tuple(band for band in S2_L1C_BANDS if band != "B10")
"""The 12 Sentinel-2 L2A bands of BigEarthNet (no cirrus band B10), in file order."""
B10_INDEX: int = S2_L1C_BANDS.index("B10")
"""Position of the inserted empty cirrus band: after B09, before B11 (index 10)."""

# BigEarthNet-S1 backscatter in dB, (VV, VH). Source: zhu-xlab/DeCUR,
# src/transfer_classification_BE/datasets/BigEarthNet/bigearthnet_dataset_lmdb_B14.py
# (MEAN_S1 = [-19.22, -12.59], STD_S1 = [5.42, 5.04], listed there as VH, VV).
S1_MEAN: tuple[float, ...] = (-12.59, -19.22)
S1_STD: tuple[float, ...] = (5.04, 5.42)

# BigEarthNet-S2 L2A digital numbers, bands in S2_L2A_BANDS order. Source: SeCo's BigEarthNet
# band statistics (ServiceNow/seasonal-contrast), as used for the 8-bit BigEarthNet files of
# zhu-xlab/SSL4EO-S12 (src/benchmark/transfer_classification/datasets/BigEarthNet/
# bigearthnet_dataset_seco_lmdb_s2_uint8.py, BAND_STATS) that DeCUR's transfer code reads.
S2_MEAN: tuple[float, ...] = (
    340.76769064,
    429.9430203,
    614.21682446,
    590.23569706,
    950.68368468,
    1792.46290469,
    2075.46795189,
    2218.94553375,
    2266.46036911,
    2246.0605464,
    1594.42694882,
    1009.32729131,
)
S2_STD: tuple[float, ...] = (
    554.81258967,
    572.41639287,
    582.87945694,
    675.88746967,
    729.89827633,
    1096.01480586,
    1273.45393088,
    1365.45589904,
    1356.13789355,
    1302.3292881,
    1079.19066363,
    818.86747235,
)


class BigEarthNetMM(BigEarthNet):
    """BigEarthNet-MM v1 with separate, encoder-ready Sentinel-1 and Sentinel-2 images.

    Layout (torchgeo's BigEarthNet v1)::

        root/bigearthnet-{train,val,test}.csv                 "<S2 patch>,<S1 patch>" per line
        root/BigEarthNet-v1.0/<S2 patch>/<S2 patch>_B01.tif .. _B12.tif   (12 L2A bands)
        root/BigEarthNet-S1-v1.0/<S1 patch>/<S1 patch>_VV.tif, _VH.tif
        root/BigEarthNet-S1-v1.0/<S1 patch>/<S1 patch>_labels_metadata.json

    Sample keys:

    * ``image_s1``: float32 ``(2, 120, 120)``, bands VV, VH (torchgeo's ``bands='all'`` image
      starts VH, VV: its S1 files are sorted by name). Read as float32 dB.
    * ``image_s2``: float32 ``(13, 120, 120)``, bands :data:`S2_L1C_BANDS` = B01..B08, B8A, B09,
      **B10**, B11, B12: the 12 L2A bands (resampled to 120 px, bilinear, as torchgeo does) with
      an all-zero B10 inserted at index :data:`B10_INDEX`, so the data feed an encoder pretrained
      on 13-band L1C (paper B.2: "we insert one empty band").
    * ``label``: int64 ``(num_classes,)`` multi-hot (19 classes by default).

    Normalisation (paper B.2, ``normalize=True``): S2 bands map ``[mean - 2 std, mean + 2 std]``
    to [0, 1] and clip; S1 bands first clip 2 % per-image outliers (1st/99th percentile per
    band), then map the same way. Statistics: :data:`S1_MEAN`/:data:`S1_STD`,
    :data:`S2_MEAN`/:data:`S2_STD`. The inserted B10 is zero either way.

    Args:
        root: dataset directory (see layout).
        split: ``'train'``, ``'val'`` or ``'test'``.
        num_classes: 19 or 43.
        normalize: apply the paper's normalisation.
        transforms: callable applied to the finished sample dict.
        download: download and extract the data if missing (about 66 GB).
        checksum: verify archive checksums.

    Raises:
        ValueError: if ``split`` or ``num_classes`` is not one of the values above.
        DatasetNotFoundError: if the data is missing and ``download`` is False (torchgeo).
        FileNotFoundError: if a patch folder lacks one of the expected band files.
    """

    def __init__(
        self,
        root: Path = "data",
        split: str = "train",
        num_classes: int = 19,
        normalize: bool = True,
        transforms: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
        download: bool = False,
        checksum: bool = False,
    ) -> None:
        check_num_classes(num_classes)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        super().__init__(
            root,
            split,
            bands="all",
            num_classes=num_classes,
            transforms=transforms,
            download=download,
            checksum=checksum,
        )
        self.normalize = normalize

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """Return ``image_s1``, ``image_s2`` (13 bands) and the multi-hot ``label``."""
        folders = self.folders[index]
        s1 = self._read_bands(folders["s1"], S1_BANDS, np.float32)
        s2 = self._read_bands(folders["s2"], S2_L2A_BANDS, np.int32)
        if self.normalize:
            s1 = normalize_sar(s1, S1_MEAN, S1_STD)
            s2 = scale_mean_std(s2, S2_MEAN, S2_STD)
        empty_b10 = torch.zeros(1, *s2.shape[-2:], dtype=s2.dtype)
        s2 = torch.cat([s2[:B10_INDEX], empty_b10, s2[B10_INDEX:]])
        sample: dict[str, Tensor] = {"image_s1": s1, "image_s2": s2, "label": self._load_target(index)}
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample

    def sample_files(self, index: int) -> list[str]:
        """The band files sample ``index`` reads (v1 names: ``<folder>/<folder name>_<band>.tif``)."""
        folders = self.folders[index]
        return [
            os.path.join(folders[key], f"{os.path.basename(os.path.normpath(folders[key]))}_{band}.tif")
            for key, bands in (("s1", S1_BANDS), ("s2", S2_L2A_BANDS))
            for band in bands
        ]

    def _read_bands(self, folder: str, bands: tuple[str, ...], dtype: type[np.generic]) -> Tensor:
        """Read ``<folder>/*_<band>.tif`` for each band, resampled to 120 x 120, as float32."""
        arrays = []
        for band in bands:
            matches = glob.glob(os.path.join(folder, f"*_{band}.tif"))
            if len(matches) != 1:
                raise FileNotFoundError(
                    f"expected exactly one file matching *_{band}.tif in {folder}, found {len(matches)}: "
                    "is the BigEarthNet v1 archive fully extracted?"
                )
            with rasterio.open(matches[0]) as src:
                arrays.append(src.read(1, out_shape=self.image_size, out_dtype=dtype, resampling=Resampling.bilinear))
        return torch.from_numpy(np.stack(arrays).astype(np.float32))


class BigEarthNetMMDataModule(DescribesModalities, NonGeoDataModule):
    """BigEarthNet-MM S1 + S2 multi-label classification datamodule (paper Section 4, B.2).

    Uses the official train/val/test CSV splits. ``train_fraction`` (the paper reports 1 %,
    10 % and 100 % label settings) keeps a random subset of the *training* split drawn without
    replacement from ``numpy.random.default_rng(seed)``: the same seed gives the same subset;
    val and test are never subsampled. Training batches get RandomResizedCrop(``size``, scale
    0.8-1) and a random horizontal flip on the device (B.2), identical for S1 and S2; validation
    and test batches are resized to ``size``. The authors' code trains at 224 px (120 px patches
    upsampled) and validates with Resize(256) + CenterCrop(224); here validation resizes the
    whole patch to ``size`` without cropping.

    Batch keys: ``image_s1`` ``(B, 2, size, size)``, ``image_s2`` ``(B, 13, size, size)``,
    ``label`` ``(B, num_classes)`` int64. Modalities (:attr:`modality_specs`): ``s1`` (view kind
    ``"sar"``, bands VV, VH) then ``s2`` (``"optical"``, :data:`S2_L1C_BANDS`, B10 empty).

    Args:
        root: dataset directory (see :class:`BigEarthNetMM`).
        batch_size: samples per batch (256 in the paper).
        num_workers: DataLoader worker processes.
        num_classes: 19 or 43.
        train_fraction: share of the training split to use, in (0, 1].
        seed: seed of the training subset.
        size: side of the images given to the model.
        normalize: apply the paper's normalisation.
        download: download the data if missing.
        checksum: verify archive checksums.
        on_read_error: ``'raise'`` (default) stops at an unreadable GeoTIFF naming it; ``'skip'``
            replaces its sample by the next readable one of the same split and warns (see
            :class:`~decur_lightning.datamodules._common.ReadErrorGuard`).
        max_read_errors: most unreadable samples ``'skip'`` tolerates per split and process (100).
    """

    def __init__(
        self,
        root: Path = "data",
        batch_size: int = 256,
        num_workers: int = 0,
        num_classes: int = 19,
        train_fraction: float = 1.0,
        seed: int = 0,
        size: int = 224,
        normalize: bool = True,
        download: bool = False,
        checksum: bool = False,
        on_read_error: str = "raise",
        max_read_errors: int = DEFAULT_MAX_READ_ERRORS,
    ) -> None:
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction must lie in (0, 1], got {train_fraction}")
        check_num_classes(num_classes)
        check_read_error_policy(on_read_error, max_read_errors)
        self.on_read_error = on_read_error
        self.max_read_errors = max_read_errors
        super().__init__(
            BigEarthNetMM,  # type: ignore[arg-type]
            batch_size,
            num_workers,
            root=root,
            num_classes=num_classes,
            normalize=normalize,
            download=download,
            checksum=checksum,
        )
        self.num_classes = num_classes
        self.train_fraction = train_fraction
        self.seed = seed
        self.train_aug = PairedAugmentation(
            K.RandomResizedCrop((size, size), scale=(0.8, 1.0)),
            K.RandomHorizontalFlip(p=0.5),
        )
        self.aug = PairedAugmentation(K.Resize((size, size)))

    @property
    def modality_specs(self) -> dict[str, Modality]:
        """``s1`` (SAR: VV, VH) then ``s2`` (optical: 13 L1C bands, B10 empty); see :class:`DescribesModalities`."""
        # What BigEarthNetMM applies (recorded in checkpoints and shipped with exported weights);
        # the inserted empty B10 is 0 either way (its statistics: mean 0, std 1 placeholders).
        inputs = {
            "s1": "float32 backscatter in dB (BigEarthNet-S1)",
            "s2": "uint16 Sentinel-2 L2A digital numbers (reflectance x 10000), B10 inserted as zeros",
        }
        s2_mean = list(S2_MEAN[:B10_INDEX]) + [0.0] + list(S2_MEAN[B10_INDEX:])
        s2_std = list(S2_STD[:B10_INDEX]) + [1.0] + list(S2_STD[B10_INDEX:])
        if self.kwargs.get("normalize", True):
            normalization = {
                "s1": {"method": "mean_2std", "mean": list(S1_MEAN), "std": list(S1_STD), "outlier_fraction": 0.02},
                "s2": {"method": "mean_2std", "mean": s2_mean, "std": s2_std, "zero_bands": ["B10"]},
            }
        else:
            normalization = {"s1": {"method": "none"}, "s2": {"method": "none"}}
        return {
            "s1": Modality(
                bands=len(S1_BANDS),
                view="sar",
                band_names=list(S1_BANDS),
                normalization={**normalization["s1"], "input": inputs["s1"]},
            ),
            "s2": Modality(
                bands=len(S2_L1C_BANDS),
                view="optical",
                band_names=list(S2_L1C_BANDS),
                normalization={**normalization["s2"], "input": inputs["s2"]},
            ),
        }

    def setup(self, stage: str) -> None:
        """Create the (subsampled) training split and the official val/test splits.

        Raises:
            ValueError: in the fit stage, if the (subsampled) training split cannot fill a batch.
        """
        if stage == "fit":
            train = BigEarthNetMM(split="train", **self.kwargs)
            kept = seeded_subset(len(train), self.train_fraction, self.seed)
            check_enough_for_a_batch(
                f"BigEarthNet train ({len(train)} samples, train_fraction={self.train_fraction})",
                len(kept),
                self.train_batch_size or self.batch_size,
                "raise train_fraction",
            )
            self.train_dataset = self._guard(Subset(train, kept), "train")
        if stage in ("fit", "validate"):
            self.val_dataset = self._guard(BigEarthNetMM(split="val", **self.kwargs), "val")
        if stage == "test":
            self.test_dataset = self._guard(BigEarthNetMM(split="test", **self.kwargs), "test")

    def _guard(self, dataset: BigEarthNetMM | Subset[dict[str, Tensor]], split: str) -> ReadErrorGuard:
        return ReadErrorGuard(dataset, self.on_read_error, self.max_read_errors, f"BigEarthNetMM {split}")
