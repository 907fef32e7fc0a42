"""SUN-RGBD and NYU-Depth v2 as RGB + HHA: RGB-depth pretraining and segmentation (Section 4, B).

torchgeo has no indoor RGB-D dataset, so this module reads the preprocessed release that CMX
(Zhang et al., the RGB-X segmentation code the paper follows for HHA and evaluation,
github.com/huaaaliu/RGBX_Semantic_Segmentation) distributes for NYUDepthv2 and SUNRGBD.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import kornia.augmentation as K
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Subset
from torchgeo.datamodules import NonGeoDataModule
from torchgeo.datasets import DatasetNotFoundError, NonGeoDataset
from torchgeo.datasets.utils import Path

from ._common import PairedAugmentation, PretrainDataModule, seeded_subset

DatasetName = Literal["sunrgbd", "nyudv2"]
SplitName = Literal["train", "test", "all"]

_HOW_TO_GET = (
    "Expected CMX's preprocessed layout: root/RGB/<name>.jpg, root/HHA/<name>.jpg (or .png), "
    "root/Label/<name>.png, root/train.txt and root/test.txt. Download the NYUDepthv2 or SUNRGBD "
    "archive linked in the README of github.com/huaaaliu/RGBX_Semantic_Segmentation (CMX) and "
    "extract it so that root points at the folder holding RGB/, HHA/ and Label/."
)


def _split_names(list_file: str) -> list[str]:
    """Sample names listed in a CMX split file, one per line.

    A line may also hold a relative path or a file extension (``RGB/0001.jpg``); the base name
    without extension is used. Blank lines are skipped.
    """
    with open(list_file) as f:
        tokens = [line.split()[0] for line in f if line.strip()]
    return [os.path.splitext(os.path.basename(token))[0] for token in tokens]


class RGBDMM(NonGeoDataset):
    """Indoor RGB + HHA (+ semantic mask) from CMX's SUN-RGBD / NYU-Depth v2 release.

    Layout (CMX, ``root`` = ``.../SUNRGBD`` or ``.../NYUDepthv2``)::

        root/RGB/<name>.jpg      RGB image
        root/HHA/<name>.jpg      HHA encoding of depth (3 channels; .png also accepted)
        root/Label/<name>.png    uint8 labels: 0 = unlabelled, 1..N = classes
        root/train.txt           one <name> per line (SUN-RGBD 5,285; NYUDv2 795)
        root/test.txt            (SUN-RGBD 5,050; NYUDv2 654)

    Depth is used as HHA (horizontal disparity, height above ground, angle with gravity), the
    paper's choice following CMX (B.1).

    Sample keys:

    * ``image_rgb``: float32 ``(3, H, W)`` in [0, 1] (divided by 255)
    * ``image_hha``: float32 ``(3, H, W)`` in [0, 1]
    * ``mask`` (``include_mask=True``): int64 ``(H, W)``, classes ``0..N-1`` (N = 37 SUN-RGBD,
      40 NYUDv2) and :attr:`ignore_index` = 255 for unlabelled pixels. This is CMX's convention
      (``gt - 1`` on uint8 labels: label ``k`` becomes class ``k - 1``, label 0 wraps to 255).

    SUN-RGBD images come in several sizes; every sample is resized to ``image_size`` (default
    480 x 480 for SUN-RGBD, CMX's training size; NYUDv2's native 480 x 640) so samples batch:
    bilinear with antialiasing for images, nearest for the mask.

    Args:
        root: dataset directory (see layout).
        dataset: ``'sunrgbd'`` or ``'nyudv2'`` (sets the class count and default size).
        split: ``'train'``, ``'test'``, or ``'all'`` (train then test; the paper pretrains on
            all 10,335 SUN-RGBD pairs).
        image_size: ``(height, width)`` of every sample; None: the dataset's default.
        include_mask: also read the label image (not needed for pretraining).
        transforms: callable applied to the finished sample dict.

    Raises:
        DatasetNotFoundError: if the folders or split files are missing (message says where to
            get the data).
        FileNotFoundError: if a listed sample lacks its RGB, HHA or label file.
    """

    num_classes_of: ClassVar[dict[str, int]] = {"sunrgbd": 37, "nyudv2": 40}
    default_size: ClassVar[dict[str, tuple[int, int]]] = {"sunrgbd": (480, 480), "nyudv2": (480, 640)}
    ignore_index: ClassVar[int] = 255
    image_extensions: ClassVar[tuple[str, ...]] = (".jpg", ".png")

    def __init__(
        self,
        root: Path = "data",
        dataset: DatasetName = "sunrgbd",
        split: SplitName = "train",
        image_size: Sequence[int] | None = None,
        include_mask: bool = True,
        transforms: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
    ) -> None:
        if dataset not in self.num_classes_of:
            raise ValueError(f"dataset must be one of {sorted(self.num_classes_of)}, got {dataset!r}")
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        self.root = root
        self.dataset = dataset
        self.split = split
        self.num_classes = self.num_classes_of[dataset]
        self.image_size = tuple(image_size) if image_size is not None else self.default_size[dataset]
        if len(self.image_size) != 2:
            raise ValueError(f"image_size must be (height, width), got {image_size}")
        self.include_mask = include_mask
        self.transforms = transforms
        self._verify()
        self.names = self._load_names()
        self.files = [self._sample_files(name) for name in self.names]

    def _verify(self) -> None:
        """Raise DatasetNotFoundError, with instructions, when the layout is incomplete."""
        needed = ["RGB", "HHA", *(["Label"] if self.include_mask else [])]
        needed += [f"{split}.txt" for split in self._list_splits()]
        missing = [name for name in needed if not os.path.exists(os.path.join(self.root, name))]
        if missing:
            error = DatasetNotFoundError(self)
            error.args = (f"{error.args[0]} Missing under root: {', '.join(missing)}. {_HOW_TO_GET}",)
            raise error

    def _list_splits(self) -> list[str]:
        return ["train", "test"] if self.split == "all" else [self.split]

    def _load_names(self) -> list[str]:
        return [name for split in self._list_splits() for name in _split_names(os.path.join(self.root, f"{split}.txt"))]

    def _find(self, folder: str, name: str, extensions: Sequence[str]) -> str:
        for extension in extensions:
            path = os.path.join(self.root, folder, name + extension)
            if os.path.exists(path):
                return path
        raise FileNotFoundError(
            f"sample {name!r} of {self.split}: no {folder}/{name}{{{','.join(extensions)}}} under {self.root}. "
            f"{_HOW_TO_GET}"
        )

    def _sample_files(self, name: str) -> dict[str, str]:
        files = {
            "rgb": self._find("RGB", name, self.image_extensions),
            "hha": self._find("HHA", name, self.image_extensions),
        }
        if self.include_mask:
            files["label"] = self._find("Label", name, (".png",))
        return files

    def __len__(self) -> int:
        """Number of samples listed in the split file(s)."""
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """Read, resize and scale one RGB / HHA (/ mask) sample."""
        files = self.files[index]
        sample = {
            "image_rgb": self._read_image(files["rgb"]),
            "image_hha": self._read_image(files["hha"]),
        }
        if self.include_mask:
            sample["mask"] = self._read_mask(files["label"])
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample

    def _read_image(self, path: str) -> Tensor:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        if tuple(tensor.shape[-2:]) != self.image_size:
            resized = F.interpolate(
                tensor[None], size=self.image_size, mode="bilinear", align_corners=False, antialias=True
            )
            tensor = resized[0].clamp_(0.0, 1.0)
        return tensor

    def _read_mask(self, path: str) -> Tensor:
        with Image.open(path) as image:
            labels = torch.from_numpy(np.asarray(image).astype(np.int64))
        if labels.ndim != 2:
            raise ValueError(f"{path}: expected a single-channel label image, got shape {tuple(labels.shape)}")
        if labels.max() > self.num_classes:
            raise ValueError(
                f"{path}: label {int(labels.max())} exceeds {self.num_classes} classes of "
                f"dataset={self.dataset!r}; is dataset= set right?"
            )
        if tuple(labels.shape) != self.image_size:
            labels = F.interpolate(labels[None, None].float(), size=self.image_size, mode="nearest-exact")[0, 0].long()
        return torch.where(labels == 0, torch.full_like(labels, self.ignore_index), labels - 1)


class RGBDMMPretrainDataModule(PretrainDataModule):
    """RGB + HHA pairs for DeCUR RGB-depth pretraining (paper Section 4, B.1).

    Batches hold ``image_rgb`` and ``image_hha`` ``(B, 3, H, W)`` in [0, 1]; no mask and no
    augmentation (DeCURModule makes the views and reads :attr:`modality_kinds`). The paper
    pretrains on all 10,335 SUN-RGBD pairs: ``split='all'``; the default ``'train'`` keeps the
    test images out of pretraining.

    Args:
        root: dataset directory (see :class:`RGBDMM`).
        batch_size: samples per batch (128 in the paper).
        num_workers: DataLoader worker processes.
        dataset: ``'sunrgbd'`` or ``'nyudv2'``.
        split: ``'train'``, ``'test'`` or ``'all'``.
        image_size: ``(height, width)``; None: the dataset's default.
    """

    modality_kinds: ClassVar[dict[str, str]] = {"rgb": "rgb", "hha": "hha"}

    def __init__(
        self,
        root: Path = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        dataset: DatasetName = "sunrgbd",
        split: SplitName = "train",
        image_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(
            RGBDMM,  # type: ignore[arg-type]
            batch_size,
            num_workers,
            root=root,
            dataset=dataset,
            image_size=image_size,
        )
        self.split = split

    def setup(self, stage: str) -> None:
        """Create the training dataset (no mask)."""
        self.train_dataset = RGBDMM(split=self.split, include_mask=False, **self.kwargs)


class RGBDMMDataModule(NonGeoDataModule):
    """SUN-RGBD / NYU-Depth v2 RGB + HHA semantic segmentation (paper Section 4, B.2).

    Training batches get RandomResizedCrop(``crop_size``, scale 0.2-1) and a random horizontal
    flip on the device, with identical parameters for ``image_rgb``, ``image_hha`` and ``mask``
    (nearest for the mask). CMX's releases have train and test lists only: with
    ``val_fraction=0`` (default) validation runs on the test split, as CMX evaluates; with
    ``val_fraction > 0`` a seeded share of the training list is held out instead (disjoint from
    the training subset). Test batches always come from the test split. Evaluation batches are
    not augmented.

    Batch keys: ``image_rgb``, ``image_hha``, ``mask`` (255 = ignore); :attr:`num_classes` is 37
    (SUN-RGBD) or 40 (NYUDv2).

    Args:
        root: dataset directory (see :class:`RGBDMM`).
        batch_size: samples per batch (8 in the paper's FCN runs).
        num_workers: DataLoader worker processes.
        dataset: ``'sunrgbd'`` or ``'nyudv2'``.
        image_size: ``(height, width)`` of samples; None: the dataset's default.
        crop_size: ``(height, width)`` of the training crops; None: ``image_size``.
        val_fraction: share of the training list held out for validation; 0 validates on test.
        seed: seed of the held-out share.
    """

    ignore_index: ClassVar[int] = RGBDMM.ignore_index

    def __init__(
        self,
        root: Path = "data",
        batch_size: int = 8,
        num_workers: int = 0,
        dataset: DatasetName = "sunrgbd",
        image_size: tuple[int, int] | None = None,
        crop_size: tuple[int, int] | None = None,
        val_fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        super().__init__(
            RGBDMM,  # type: ignore[arg-type]
            batch_size,
            num_workers,
            root=root,
            dataset=dataset,
            image_size=image_size,
        )
        self.num_classes = RGBDMM.num_classes_of[dataset]
        self.val_fraction = val_fraction
        self.seed = seed
        size = crop_size or image_size or RGBDMM.default_size[dataset]
        self.train_aug = PairedAugmentation(
            K.RandomResizedCrop(tuple(size), scale=(0.2, 1.0)),
            K.RandomHorizontalFlip(p=0.5),
        )
        self.aug = PairedAugmentation()

    def split_indices(self, num_train: int) -> tuple[list[int], list[int]]:
        """Indices of the training list kept for training and held out for validation."""
        if self.val_fraction == 0.0:
            return list(range(num_train)), []
        held_out = set(seeded_subset(num_train, self.val_fraction, self.seed))
        return [i for i in range(num_train) if i not in held_out], sorted(held_out)

    def setup(self, stage: str) -> None:
        """Create the training subset, the validation set and the test split."""
        if stage in ("fit", "validate"):
            train = RGBDMM(split="train", **self.kwargs)
            train_indices, val_indices = self.split_indices(len(train))
            self.train_dataset = Subset(train, train_indices)
            self.val_dataset = Subset(train, val_indices) if val_indices else RGBDMM(split="test", **self.kwargs)
        if stage == "test":
            self.test_dataset = RGBDMM(split="test", **self.kwargs)
