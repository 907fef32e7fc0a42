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
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Subset, default_collate
from torchgeo.datamodules import NonGeoDataModule
from torchgeo.datasets import DatasetNotFoundError, NonGeoDataset
from torchgeo.datasets.utils import Path

from ..modalities import Modality
from ._common import (
    DEFAULT_MAX_READ_ERRORS,
    HHA_BANDS,
    RGB_BANDS,
    DescribesModalities,
    PairedAugmentation,
    PretrainDataModule,
    ReadErrorGuard,
    check_enough_for_a_batch,
    check_read_error_policy,
    is_data_key,
    seeded_subset,
)

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


def check_dataset(dataset: str) -> None:
    """Raise a ValueError naming the allowed values unless ``dataset`` is a known dataset name."""
    if dataset not in RGBDMM.num_classes_of:
        raise ValueError(
            f"dataset must be one of {sorted(RGBDMM.num_classes_of)} (SUN-RGBD or NYU-Depth v2 in CMX's "
            f"layout), got {dataset!r}"
        )


#: ImageNet statistics CMX normalises RGB *and* HHA with (its ``config.norm_mean`` / ``norm_std``).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: CMX's training scales (``config.train_scale_array``): one is drawn per sample.
CMX_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

#: CMX's training crop ``(image_height, image_width)`` per dataset.
CMX_CROP_SIZE: dict[str, tuple[int, int]] = {"sunrgbd": (480, 480), "nyudv2": (480, 640)}

_IMAGE_KEYS = ("image_rgb", "image_hha")

Sample = dict[str, Tensor]


class ImageNetNormalize:
    """Subtract the ImageNet mean and divide by its std, per channel, for ``image_rgb`` and ``image_hha``.

    Inputs are in [0, 1]; CMX applies the same statistics to RGB and to 3-channel HHA
    (``normalize(img / 255, norm_mean, norm_std)`` in its ``TrainPre`` and evaluator).
    Works on ``(3, H, W)`` samples and ``(N, 3, H, W)`` batches; other keys pass through.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        for key in _IMAGE_KEYS:
            if key in out:
                image = out[key]
                out[key] = (image - self.mean.to(image)) / self.std.to(image)
        return out


class CMXTrainTransform:
    """CMX's training augmentation of one sample: random scale, horizontal flip, random crop with padding.

    As CMX's ``TrainPre`` (``dataloader/dataloader.py``): one scale ``s`` is drawn from ``scales``
    and the sample is resized to ``(int(H * s), int(W * s))`` (bilinear for images, nearest for the
    mask); with probability ``flip_p`` it is mirrored left-right; then a ``crop_size`` window at a
    uniformly random position is cut out, and a side shorter than the crop is padded to it,
    centred, with ``image_fill`` for images (0: the mean after ImageNet normalisation, CMX's value)
    and :attr:`RGBDMM.ignore_index` for the mask (CMX's 255). Runs per sample (sizes differ),
    before batching; random numbers come from torch's generator (seeded per DataLoader worker).

    Args:
        crop_size: ``(height, width)`` of the output.
        scales: scale factors to draw from (CMX: 0.5, 0.75, ..., 1.75).
        flip_p: probability of a horizontal flip.
        image_fill: value of padded image pixels.
    """

    def __init__(
        self,
        crop_size: Sequence[int],
        scales: Sequence[float] = CMX_SCALES,
        flip_p: float = 0.5,
        image_fill: float = 0.0,
    ) -> None:
        self.crop_size = _pair(crop_size, "crop_size")
        self.scales = tuple(float(scale) for scale in scales)
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be a non-empty list of positive factors, got {scales}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must lie in [0, 1], got {flip_p}")
        self.flip_p = flip_p
        self.image_fill = image_fill

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        height, width = out["image_rgb"].shape[-2:]
        scale = self.scales[int(torch.randint(len(self.scales), ()))]
        size = (max(1, int(height * scale)), max(1, int(width * scale)))
        flip = bool(torch.rand(()) < self.flip_p)
        crop_h, crop_w = self.crop_size
        top = int(torch.randint(max(size[0] - crop_h, 0) + 1, ()))
        left = int(torch.randint(max(size[1] - crop_w, 0) + 1, ()))
        pad_h, pad_w = max(crop_h - size[0], 0), max(crop_w - size[1], 0)
        padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)  # CMX: centred
        for key, value in out.items():
            if key.startswith("image"):
                value = F.interpolate(value[None], size=size, mode="bilinear", align_corners=False)[0]
                fill = self.image_fill
            elif key.startswith("mask"):
                value = F.interpolate(value[None, None].float(), size=size, mode="nearest")[0, 0].to(value.dtype)
                fill = RGBDMM.ignore_index
            else:
                continue
            if flip:
                value = value.flip(-1)
            value = value[..., top : top + crop_h, left : left + crop_w]
            out[key] = F.pad(value, padding, value=fill)
        return out


class ResizedCropTransform:
    """RandomResizedCrop + horizontal flip of one sample (paper B.2's "RandomResizedCrop and RandomHorizontalFlip").

    kornia's ``RandomResizedCrop(crop_size, scale)`` and ``RandomHorizontalFlip`` with one set of
    parameters for ``image_rgb``, ``image_hha`` and ``mask`` (nearest), on a batch of one so
    samples of any size come out ``crop_size``.
    """

    def __init__(self, crop_size: Sequence[int], scale: tuple[float, float] = (0.2, 1.0)) -> None:
        self.crop_size = _pair(crop_size, "crop_size")
        self.augmentation = PairedAugmentation(
            K.RandomResizedCrop(self.crop_size, scale=scale), K.RandomHorizontalFlip(p=0.5)
        )

    def __call__(self, sample: Sample) -> Sample:
        batch = {key: value[None] if is_data_key(key) else value for key, value in sample.items()}
        with torch.no_grad():
            out = self.augmentation(batch)
        return {key: value[0] if is_data_key(key) else value for key, value in out.items()}


class Compose:
    """Apply sample transforms in order (picklable, for DataLoader workers)."""

    def __init__(self, *transforms: Callable[[Sample], Sample]) -> None:
        self.transforms = transforms

    def __call__(self, sample: Sample) -> Sample:
        for transform in self.transforms:
            sample = transform(sample)
        return sample


def pad_collate(samples: list[Sample], image_fill: float = 0.0, ignore_index: int = 255) -> Sample:
    """Stack samples of different sizes: pad each on the bottom and right to the largest size.

    Images are padded with ``image_fill`` (0: the ImageNet mean after normalisation), masks with
    ``ignore_index``, so padded pixels are neither trained on nor scored. Samples of one size are
    stacked unchanged (``torch.utils.data.default_collate``).
    """
    sizes = {tuple(sample[key].shape[-2:]) for sample in samples for key in sample if is_data_key(key)}
    if len(sizes) > 1:
        height = max(size[0] for size in sizes)
        width = max(size[1] for size in sizes)
        padded = []
        for sample in samples:
            out = dict(sample)
            for key, value in sample.items():
                if is_data_key(key):
                    fill = ignore_index if key.startswith("mask") else image_fill
                    out[key] = F.pad(value, (0, width - value.shape[-1], 0, height - value.shape[-2]), value=fill)
            padded.append(out)
        samples = padded
    return default_collate(samples)


def _pair(size: Sequence[int], name: str) -> tuple[int, int]:
    size = tuple(int(side) for side in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name} must be (height, width) with positive sides, got {size}")
    return size  # type: ignore[return-value]


def _rgbd_specs() -> dict[str, Modality]:
    """``rgb`` (indoor RGB: R, G, B) then ``hha`` (depth as HHA, 3 bands), with their view kinds."""
    return {
        "rgb": Modality(bands=3, view="indoor_rgb", band_names=list(RGB_BANDS)),
        "hha": Modality(bands=3, view="hha", band_names=list(HHA_BANDS)),
    }


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

    * ``image_rgb``: float32 ``(3, H, W)`` in [0, 1] (divided by 255; :class:`RGBDMMDataModule`
      then applies ImageNet normalisation, as CMX)
    * ``image_hha``: float32 ``(3, H, W)`` in [0, 1]
    * ``mask`` (``include_mask=True``): int64 ``(H, W)``, classes ``0..N-1`` (N = 37 SUN-RGBD,
      40 NYUDv2) and :attr:`ignore_index` = 255 for unlabelled pixels. This is CMX's convention
      (``gt - 1`` on uint8 labels: label ``k`` becomes class ``k - 1``, label 0 wraps to 255).

    SUN-RGBD images come in several sizes; by default every sample is resized to ``image_size``
    (480 x 480 for SUN-RGBD, CMX's training size; NYUDv2's native 480 x 640) so samples batch:
    bilinear with antialiasing for images, nearest for the mask. ``image_size="original"`` keeps
    every sample at its native size (what :class:`RGBDMMDataModule` uses to follow CMX).

    Args:
        root: dataset directory (see layout).
        dataset: ``'sunrgbd'`` or ``'nyudv2'`` (sets the class count and default size).
        split: ``'train'``, ``'test'``, or ``'all'`` (train then test; the paper pretrains on
            all 10,335 SUN-RGBD pairs).
        image_size: ``(height, width)`` of every sample; None: the dataset's default;
            ``"original"``: no resizing (sizes vary on SUN-RGBD).
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
        image_size: Sequence[int] | Literal["original"] | None = None,
        include_mask: bool = True,
        transforms: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
    ) -> None:
        check_dataset(dataset)
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        self.root = root
        self.dataset = dataset
        self.split = split
        self.num_classes = self.num_classes_of[dataset]
        self.image_size: tuple[int, ...] | None
        if isinstance(image_size, str):
            if image_size != "original":
                raise ValueError(f"image_size must be (height, width), None or 'original', got {image_size!r}")
            self.image_size = None
        else:
            self.image_size = tuple(image_size) if image_size is not None else self.default_size[dataset]
            if len(self.image_size) != 2 or min(self.image_size) < 1:
                raise ValueError(f"image_size must be (height, width) with positive sides, got {image_size}")
        self.include_mask = include_mask
        self.transforms = transforms
        self._verify()
        self.names = self._load_names()
        self.files = [self._sample_files(name) for name in self.names]

    def sample_files(self, index: int) -> list[str]:
        """The files sample ``index`` is read from (RGB, HHA and, with masks, the label)."""
        files = self.files[index]
        return [path for key, path in files.items() if key != "mask" or self.include_mask]

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
        if self.image_size is not None and tuple(tensor.shape[-2:]) != self.image_size:
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
        if self.image_size is not None and tuple(labels.shape) != self.image_size:
            labels = F.interpolate(labels[None, None].float(), size=self.image_size, mode="nearest-exact")[0, 0].long()
        return torch.where(labels == 0, torch.full_like(labels, self.ignore_index), labels - 1)


class RGBDMMPretrainDataModule(PretrainDataModule):
    """RGB + HHA pairs for DeCUR RGB-depth pretraining (paper Section 4, B.1).

    Batches hold ``image_rgb`` and ``image_hha`` ``(B, 3, H, W)`` in [0, 1]; no mask and no
    augmentation (the SSL module makes the views). Modalities (:attr:`modality_specs`): ``rgb``
    (view kind ``"indoor_rgb"``, bands R, G, B) then ``hha`` (``"hha"``, bands
    :data:`~decur_lightning.datamodules._common.HHA_BANDS`). The paper
    pretrains on all 10,335 SUN-RGBD pairs: ``split='all'``; the default ``'train'`` keeps the
    test images out of pretraining.

    Args:
        root: dataset directory (see :class:`RGBDMM`).
        batch_size: samples per batch (128 in the paper).
        num_workers: DataLoader worker processes.
        dataset: ``'sunrgbd'`` or ``'nyudv2'``.
        split: ``'train'``, ``'test'`` or ``'all'``.
        image_size: ``(height, width)``; None: the dataset's default.
        on_read_error: ``'raise'`` (default) stops at an unreadable file naming it; ``'skip'``
            replaces the sample by the next readable one, warns and counts (see
            :class:`~decur_lightning.datamodules._common.ReadErrorGuard`).
        max_read_errors: most unreadable samples ``'skip'`` tolerates per process (default 100).
    """

    def __init__(
        self,
        root: Path = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        dataset: DatasetName = "sunrgbd",
        split: SplitName = "train",
        image_size: tuple[int, int] | None = None,
        on_read_error: str = "raise",
        max_read_errors: int = DEFAULT_MAX_READ_ERRORS,
    ) -> None:
        check_dataset(dataset)
        check_read_error_policy(on_read_error, max_read_errors)
        self.on_read_error = on_read_error
        self.max_read_errors = max_read_errors
        super().__init__(
            RGBDMM,  # type: ignore[arg-type]
            batch_size,
            num_workers,
            root=root,
            dataset=dataset,
            image_size=image_size,
        )
        self.split = split

    @property
    def modality_specs(self) -> dict[str, Modality]:
        """``rgb`` (indoor RGB) then ``hha`` (3 bands); see :class:`DescribesModalities`."""
        specs = _rgbd_specs()
        # What RGBDMM applies (recorded in checkpoints and shipped with exported weights).
        for name, spec in specs.items():
            spec.normalization = {"method": "scale", "divisor": 255.0, "input": f"uint8 {name.upper()} image"}
        return specs

    def setup(self, stage: str) -> None:
        """Create the training dataset (no mask).

        Raises:
            ValueError: in the fit stage, if the split has fewer pairs than ``batch_size``.
        """
        dataset = RGBDMM(split=self.split, include_mask=False, **self.kwargs)
        if stage == "fit":
            check_enough_for_a_batch(
                f"RGB-D pretraining ({self.split})", len(dataset), self.train_batch_size or self.batch_size, ""
            )
        self.train_dataset = ReadErrorGuard(dataset, self.on_read_error, self.max_read_errors, f"RGBDMM {self.split}")


class RGBDMMDataModule(DescribesModalities, NonGeoDataModule):
    """SUN-RGBD / NYU-Depth v2 RGB + HHA semantic segmentation (paper Section 4, B.2).

    The paper's CMX runs "follow the same settings of CMX" (B.2); by default this module follows
    CMX's released pipeline (github.com/huaaaliu/RGBX_Semantic_Segmentation, ``config.py``,
    ``dataloader/dataloader.py``, ``engine/evaluator.py``):

    * **Training** (``augmentation="cmx"``, :class:`CMXTrainTransform`): per sample, a scale drawn
      from ``scales`` (0.5, 0.75, ..., 1.75), a horizontal flip (p = 0.5) and a random
      ``crop_size`` crop (480 x 480 SUN-RGBD, 480 x 640 NYUDv2), padded with the ignore label
      where the scaled image is smaller.
      ``augmentation="resized_crop"`` (:class:`ResizedCropTransform`): RandomResizedCrop(``crop_size``,
      scale 0.2-1) + horizontal flip per sample, the paper's wording for its FCN runs (B.2).
    * **Normalisation** (``normalization="imagenet"``): RGB and HHA both minus the ImageNet mean,
      divided by its std, as CMX; ``"none"`` keeps both in [0, 1].
    * **Evaluation** at the original image size: validation and test samples are not resized
      (unless ``image_size`` is set) and come in batches of ``eval_batch_size`` = 1, so every
      pixel of every test image is predicted once, on the whole image at a single scale, and
      scored once. Larger ``eval_batch_size``: samples are padded on the bottom and right to the
      largest in the batch (images with 0, the mask with 255 = ignored), so metrics still count
      each original pixel once, but predictions near the border may change with the padding.
      Predictions (``predict_step``) of a padded batch cover the padding too. Under a
      distributed strategy each evaluation image goes to exactly one process
      (Lightning's ``UnrepeatedDistributedSampler``), where Lightning's default sampler would
      repeat a few images to even out the processes.
      CMX evaluates whole images when a side is at most its crop size (all of NYUDv2) and
      otherwise with a sliding 480 x 480 window (stride 2/3) -- some SUN-RGBD images; not
      reproduced here.

    The segmentation module pads its input to a multiple of 32 and crops the logits back, so any
    size works. CMX's releases have train and test lists only: with ``val_fraction=0`` (default)
    validation runs on the test split, as CMX evaluates; with ``val_fraction > 0`` a seeded share
    of the training list is held out instead (disjoint from the training subset, evaluated
    without augmentation). Test batches always come from the test split. Augmentation and
    normalisation run in the DataLoader (per sample), not on the device.

    Batch keys: ``image_rgb``, ``image_hha``, ``mask`` (255 = ignore); :attr:`num_classes` is 37
    (SUN-RGBD) or 40 (NYUDv2). Modalities (:attr:`modality_specs`): ``rgb`` then ``hha``, as in
    :class:`RGBDMMPretrainDataModule`.

    Args:
        root: dataset directory (see :class:`RGBDMM`).
        batch_size: training samples per batch (8 in the paper and CMX).
        num_workers: DataLoader worker processes.
        dataset: ``'sunrgbd'`` or ``'nyudv2'``.
        augmentation: ``"cmx"`` (default) or ``"resized_crop"`` (see above).
        image_size: None (default): samples keep their original size; ``(height, width)``:
            every sample of every split is first resized (stretched) to it.
        crop_size: ``(height, width)`` of the training crops; None: CMX's (480 x 480 SUN-RGBD,
            480 x 640 NYUDv2).
        scales: scale factors drawn by ``augmentation="cmx"``.
        normalization: ``"imagenet"`` (default, CMX) or ``"none"`` (inputs in [0, 1]).
        eval_batch_size: validation/test/predict samples per batch (1: no padding).
        val_fraction: share of the training list held out for validation; 0 validates on test.
        seed: seed of the held-out share.
        on_read_error: ``'raise'`` (default) or ``'skip'`` (see
            :class:`~decur_lightning.datamodules._common.ReadErrorGuard`).
        max_read_errors: most unreadable samples ``'skip'`` tolerates per split and process (100).
    """

    ignore_index: ClassVar[int] = RGBDMM.ignore_index

    def __init__(
        self,
        root: Path = "data",
        batch_size: int = 8,
        num_workers: int = 0,
        dataset: DatasetName = "sunrgbd",
        augmentation: Literal["cmx", "resized_crop"] = "cmx",
        image_size: tuple[int, int] | None = None,
        crop_size: tuple[int, int] | None = None,
        scales: Sequence[float] = CMX_SCALES,
        normalization: Literal["imagenet", "none"] = "imagenet",
        eval_batch_size: int = 1,
        val_fraction: float = 0.0,
        seed: int = 0,
        on_read_error: str = "raise",
        max_read_errors: int = DEFAULT_MAX_READ_ERRORS,
    ) -> None:
        check_dataset(dataset)
        check_read_error_policy(on_read_error, max_read_errors)
        self.on_read_error = on_read_error
        self.max_read_errors = max_read_errors
        if augmentation not in ("cmx", "resized_crop"):
            raise ValueError(f"augmentation must be 'cmx' or 'resized_crop', got {augmentation!r}")
        if normalization not in ("imagenet", "none"):
            raise ValueError(f"normalization must be 'imagenet' or 'none', got {normalization!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        if eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be at least 1, got {eval_batch_size}")
        super().__init__(
            RGBDMM,  # type: ignore[arg-type]
            batch_size,
            num_workers,
            root=root,
            dataset=dataset,
            image_size=_pair(image_size, "image_size") if image_size is not None else "original",
        )
        self.num_classes = RGBDMM.num_classes_of[dataset]
        self.augmentation = augmentation
        self.normalization = normalization
        self.val_fraction = val_fraction
        self.seed = seed
        self.crop_size = _pair(crop_size or CMX_CROP_SIZE[dataset], "crop_size")
        train_transform: Callable[[Sample], Sample] = (
            CMXTrainTransform(self.crop_size, scales) if augmentation == "cmx" else ResizedCropTransform(self.crop_size)
        )
        if normalization == "imagenet":
            # Normalised first, so that CMX's padding value 0 is the mean colour, as in CMX.
            self.train_transform: Callable[[Sample], Sample] = Compose(ImageNetNormalize(), train_transform)
            self.eval_transform: Callable[[Sample], Sample] | None = ImageNetNormalize()
        else:
            self.train_transform, self.eval_transform = train_transform, None
        self.val_batch_size = self.test_batch_size = self.predict_batch_size = eval_batch_size
        self.collate_fn = pad_collate
        # Everything runs per sample in the DataLoader: no batch augmentation on the device.
        self.aug = PairedAugmentation()

    @property
    def modality_specs(self) -> dict[str, Modality]:
        """``rgb`` (indoor RGB) then ``hha`` (3 bands); see :class:`DescribesModalities`."""
        specs = _rgbd_specs()
        # What the transforms apply (recorded in checkpoints and shipped with exported weights).
        for name, spec in specs.items():
            spec.normalization = (
                {"method": "mean_std", "divisor": 255.0, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
                if self.normalization == "imagenet"
                else {"method": "scale", "divisor": 255.0}
            )
            spec.normalization["input"] = f"uint8 {name.upper()} image"
        return specs

    def _dataloader_factory(self, split: str) -> DataLoader[dict[str, Tensor]]:
        """torchgeo's loaders; evaluation loaders shard without repeats when distributed."""
        trainer = self.trainer
        world_size = getattr(trainer, "world_size", 1) if trainer is not None else 1
        if split == "train" or world_size <= 1:
            return super()._dataloader_factory(split)
        dataset = self._valid_attribute(f"{split}_dataset", "dataset")
        sampler = UnrepeatedDistributedSampler(
            dataset,
            num_replicas=world_size,
            rank=trainer.global_rank,
            shuffle=False,  # type: ignore[union-attr]
        )
        return DataLoader(
            dataset,
            batch_size=self._valid_attribute(f"{split}_batch_size", "batch_size"),
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            persistent_workers=self.num_workers > 0,
        )

    def split_indices(self, num_train: int) -> tuple[list[int], list[int]]:
        """Indices of the training list kept for training and held out for validation."""
        if self.val_fraction == 0.0:
            return list(range(num_train)), []
        held_out = set(seeded_subset(num_train, self.val_fraction, self.seed))
        return [i for i in range(num_train) if i not in held_out], sorted(held_out)

    def setup(self, stage: str) -> None:
        """Create the training subset, the validation set and the test split."""
        if stage in ("fit", "validate"):
            train = RGBDMM(split="train", transforms=self.train_transform, **self.kwargs)
            train_indices, val_indices = self.split_indices(len(train))
            if stage == "fit":
                check_enough_for_a_batch(
                    "RGB-D train", len(train_indices), self.batch_size, "lower val_fraction" if val_indices else ""
                )
            self.train_dataset = self._guard(Subset(train, train_indices), "train")
            if val_indices:
                held_out = RGBDMM(split="train", transforms=self.eval_transform, **self.kwargs)
                self.val_dataset = self._guard(Subset(held_out, val_indices), "val")
            else:
                self.val_dataset = self._guard(
                    RGBDMM(split="test", transforms=self.eval_transform, **self.kwargs), "test"
                )
        if stage in ("test", "predict"):
            self.test_dataset = self._guard(RGBDMM(split="test", transforms=self.eval_transform, **self.kwargs), "test")
            self.predict_dataset = self.test_dataset

    def _guard(self, dataset: RGBDMM | Subset[dict[str, Tensor]], split: str) -> ReadErrorGuard:
        return ReadErrorGuard(dataset, self.on_read_error, self.max_read_errors, f"RGBDMM {split}")
