"""Pretraining data in Lightning's ``litdata`` streaming format: write once, stream from a folder or
object storage (issue 14, sections 2 and 3).

At the paper's scale the GeoTIFF reader is the bottleneck (SSL4EO-S12 pairs: 15 files per sample,
decoded and reassembled every time); the authors converted their data to LMDB for this reason.
:func:`write_stream` (the ``decur prepare`` command, :mod:`decur_lightning.prepare`) writes the
training samples of any pretraining datamodule of this package into ``litdata``'s optimised chunks
with ``litdata.optimize``; :class:`StreamingPretrainDataModule` reads them back with
``litdata.StreamingDataset`` / ``StreamingDataLoader`` from a local folder or an ``s3://``-style
URL, sharded across ranks and nodes, and gives the batches the source datamodule would give.

What is stored is a *record* per sample, made by a :class:`SampleCodec` chosen from the source's
training dataset:

* :class:`SSL4EOCodec` (:class:`~decur_lightning.datamodules.SSL4EOS12MM`): one record per
  location with **all** its seasons of both modalities in their native types (Sentinel-1 float32
  dB, Sentinel-2 L1C uint16 digital numbers) and their acquisition times. The seasons are drawn
  at read time exactly as the source draws them (a pure function of seed, epoch, location,
  modality and view), so every epoch sees new seasons, as in the paper (Section 4).
* :class:`GeoNRWCodec` (:class:`~decur_lightning.datamodules.GeoNRWMM`): one record per patch,
  RGB uint8 and the raw float32 elevation; the per-patch DEM normalisation runs at read time.
* :class:`GenericCodec` (any other data set, e.g. own rasters): the training dataset's samples as
  it returns them (tensors stored as numpy arrays in their dtype), no further normalisation.

Arrays are stored as numpy arrays (litdata's ``numpy`` serializer), which round-trip uint16 bit
for bit (litdata has had trouble with uint16 *tensors*, Lightning-AI/litData issue 596).

``quantize="uint8"`` (off by default; lossy): the source's normalisation is applied at write time
and its ``[0, 1]`` result stored as ``round(255 x)``, what the authors' LMDB files held (paper
B.1: bands "compressed to 8-bit"); reading divides by 255 (error at most 1/510). For SSL4EO-S12 the
per-season normalisation is applied to every stored season. The metadata says so.

Normalisation at read time is the source's own (the same functions on the same raw values):
``normalize_on="loader"`` (default) applies it per sample in the loader workers, as the source
datamodules do; ``normalize_on="device"`` ships the native types (uint16 S2 is half the bytes of
float32) and normalises after the transfer to the accelerator
(:meth:`StreamingPretrainDataModule.on_after_batch_transfer`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from litdata import StreamingDataLoader, StreamingDataset
from torch import Tensor
from torch.utils.data import Subset

from ..modalities import Modality, datamodule_modalities, modalities_to_hparams
from ._common import (
    DescribesModalities,
    ReadErrorGuard,
    normalize_sar,
    percentile_min_max,
    scale_mean_std,
)

METADATA_FILE = "decur_stream.json"
"""Name of the metadata file :func:`write_stream` writes next to litdata's ``index.json``."""

FORMAT_VERSION = 1
"""Version of the record layout described in the metadata."""

QUANTIZE_CHOICES = (None, "uint8")
"""Allowed values of ``quantize``."""

NORMALIZE_ON_CHOICES = ("loader", "device")
"""Allowed values of :class:`StreamingPretrainDataModule`'s ``normalize_on``."""


# ------------------------------------------------------------------------------------------------
# Codecs: source dataset -> stored record -> the source's sample


def unwrap_dataset(dataset: Any) -> tuple[Any, list[int] | None]:
    """The file-backed data set under :class:`ReadErrorGuard` / :class:`~torch.utils.data.Subset`
    wrappers, and the indices into it the wrappers select (``None``: all of them)."""
    indices: list[int] | None = None
    while True:
        if isinstance(dataset, ReadErrorGuard):
            dataset = dataset.guarded
        elif isinstance(dataset, Subset):
            outer = list(dataset.indices)
            indices = outer if indices is None else [outer[i] for i in indices]
            dataset = dataset.dataset
        else:
            return dataset, indices


def _to_record_value(value: Any) -> Any:
    """A sample value as stored: tensors become numpy arrays of the same dtype; scalars stay."""
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (bool, int, float, str, np.generic)):
        return value
    return None


def _to_tensor(value: Any) -> Any:
    """A stored value as the sample holds it: numpy arrays (also 0-d) become tensors."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return torch.from_numpy(np.asarray(value))
    return value


def quantize_uint8(image: Tensor) -> np.ndarray:
    """``round(255 x)`` of a normalised image in ``[0, 1]`` as uint8 (lossy; error <= 1/510)."""
    if image.numel() and (float(image.min()) < 0.0 or float(image.max()) > 1.0):
        raise ValueError(
            f"quantize='uint8' stores normalised images in [0, 1]; got values in [{float(image.min())}, "
            f"{float(image.max())}]. Prepare without quantize (native types) for this data."
        )
    return (image.float() * 255.0).round_().to(torch.uint8).numpy()


class SampleCodec:
    """How the samples of one kind of source dataset are stored and turned back into samples.

    A codec is described by JSON-able :attr:`params` (kept in the metadata), so the reading side
    needs no access to the source files. Subclasses implement :meth:`read`, :meth:`sample` and
    :meth:`normalize_sample`; :meth:`read_quantized` is derived from them.

    Args:
        quantized: records hold uint8 images ``round(255 x)`` of the normalised sample.
        params: codec-specific parameters (see the subclasses).
    """

    name: ClassVar[str] = "base"

    def __init__(self, quantized: bool = False, **params: Any) -> None:
        self.quantized = quantized
        self.params = params

    @classmethod
    def matches(cls, dataset: Any) -> bool:
        """Whether this codec knows ``dataset`` (the unwrapped training dataset)."""
        return False

    @classmethod
    def for_dataset(cls, dataset: Any) -> SampleCodec:
        """The codec of a (unwrapped) source dataset, its parameters taken from it."""
        return cls()

    def read(self, dataset: Any, index: Any) -> dict[str, Any]:
        """The record of source item ``index``: numpy arrays in native dtypes and scalars."""
        raise NotImplementedError

    def sample(self, record: Mapping[str, Any], epoch: int, seed: int) -> dict[str, Any]:
        """The source's sample (before normalisation, native dtypes) of a record at ``epoch``."""
        raise NotImplementedError

    def normalize_sample(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """The source's normalisation of one sample (any device); uint8 records: divide by 255."""
        if self.quantized:
            return {k: v.float().div_(255.0) if _is_image(k, v) else v for k, v in sample.items()}
        return self._normalize(sample)

    def _normalize(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        return dict(sample)

    def normalize_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """:meth:`normalize_sample` of every sample of a collated batch (leading batch dim)."""
        keys = [k for k, v in batch.items() if _is_image(k, v)]
        if not keys:
            return dict(batch)
        size = batch[keys[0]].shape[0]
        normalised = [self.normalize_sample({k: batch[k][i] for k in keys}) for i in range(size)]
        return {**batch, **{k: torch.stack([n[k] for n in normalised]) for k in keys}}

    def read_quantized(self, dataset: Any, index: Any) -> dict[str, Any]:
        """The uint8 record of ``index``: every stored image normalised and stored as ``round(255 x)``."""
        record = self.read(dataset, index)
        return self._quantize_record(record)

    def _quantize_record(self, record: dict[str, Any]) -> dict[str, Any]:
        sample = {k: _to_tensor(v) for k, v in record.items()}
        normalised = self._normalize(sample)
        return {k: quantize_uint8(v) if _is_image(k, v) else record[k] for k, v in normalised.items()}

    def metadata(self) -> dict[str, Any]:
        """JSON-able description, inverse of :func:`codec_from_metadata`."""
        return {"name": self.name, "quantized": self.quantized, "params": self.params}


def _is_image(key: str, value: Any) -> bool:
    return key.startswith("image") and isinstance(value, (Tensor, np.ndarray))


class GenericCodec(SampleCodec):
    """Any map-style dataset: its samples as returned (tensors as numpy arrays of their dtype).

    Normalisation is whatever the source applied (nothing more at read time). Values that are
    neither tensors, arrays nor scalars (e.g. a CRS object) are not stored; ``dropped_keys`` in the
    metadata names them. Random choices the source makes per epoch are frozen at the write.
    """

    name = "generic"

    @classmethod
    def matches(cls, dataset: Any) -> bool:
        return True

    def read(self, dataset: Any, index: Any) -> dict[str, Any]:
        sample = dataset[index]
        if not isinstance(sample, Mapping):
            raise TypeError(f"expected the training dataset to return dict samples, got {type(sample).__name__}")
        record = {}
        for key, value in sample.items():
            stored = _to_record_value(value)
            if stored is not None:
                record[key] = stored
        return record

    def sample(self, record: Mapping[str, Any], epoch: int, seed: int) -> dict[str, Any]:
        return {k: _to_tensor(v) for k, v in record.items()}


class SSL4EOCodec(SampleCodec):
    """SSL4EO-S12 pairs (:class:`~decur_lightning.datamodules.SSL4EOS12MM`): all seasons stored.

    Record of a location: ``location`` (int), per modality ``scenes_<name>`` ``(S, C, H, W)`` in the
    files' dtype (S1 float32 dB, S2 L1C uint16) for all ``S`` scene folders (4 in SSL4EO-S12), sorted
    by name (date) as the source sorts them, and ``times_<name>`` float64 ``(S,)`` (POSIX seconds, the
    middle of the date's range, as the source computes it). :meth:`sample` draws the seasons with the
    source's rule (``numpy.random.default_rng([seed, epoch, location, modality number, view])``
    choosing ``seasons`` of the ``S`` scenes without replacement) and stacks them season-major.

    Params: ``seasons``, ``season_per_view``, ``normalize`` (the source's settings),
    ``modalities`` (output name -> torchgeo split).
    """

    name = "ssl4eo_s12"

    @classmethod
    def matches(cls, dataset: Any) -> bool:
        from .ssl4eo import SSL4EOS12MM

        return isinstance(dataset, SSL4EOS12MM)

    @classmethod
    def for_dataset(cls, dataset: Any) -> SampleCodec:
        return cls(
            seasons=dataset.seasons,
            season_per_view=dataset.season_per_view,
            normalize=dataset.normalize,
            modalities=dict(dataset.modalities),
        )

    def read(self, dataset: Any, index: Any) -> dict[str, Any]:
        import re

        import rasterio
        from torchgeo.datasets import SSL4EOS12, Sentinel1, Sentinel2
        from torchgeo.datasets.utils import disambiguate_timestamp

        location = dataset.locations[int(index)]
        record: dict[str, Any] = {"location": int(location)}
        for name, split in self.params["modalities"].items():
            source = dataset.datasets[name]
            regex = SSL4EOS12.metadata[split]["filename_regex"]
            date_format = Sentinel1.date_format if split == "s1" else Sentinel2.date_format
            scenes, times = [], []
            for scene in dataset.scene_folders(split, location):
                match = re.match(regex, os.path.basename(scene))
                assert match is not None  # scene_folders keeps matching names only
                mint, maxt = disambiguate_timestamp(match.group("date"), date_format)
                bands = []
                for band in source.bands:
                    with rasterio.open(os.path.join(scene, f"{band}.tif")) as src:
                        bands.append(src.read(out_shape=(1, source.size, source.size)))
                scenes.append(np.concatenate(bands))
                times.append((mint.timestamp() + maxt.timestamp()) / 2)
            if len(scenes) < self.params["seasons"]:
                raise FileNotFoundError(
                    f"{os.path.join(dataset.root, split, f'{location:07d}')} holds {len(scenes)} scene folder(s), "
                    f"fewer than seasons={self.params['seasons']}"
                )
            if len({s.dtype for s in scenes}) != 1:
                raise ValueError(f"location {location}: the {split} scenes differ in dtype")
            record[f"scenes_{name}"] = np.stack(scenes)
            record[f"times_{name}"] = np.asarray(times, dtype=np.float64)
        return record

    def _draw(self, seed: int, epoch: int, location: int, modality: int, view: int, available: int) -> list[int]:
        # SSL4EOS12MM.draw_seasons, as a function of its arguments (tests check they agree)
        rng = np.random.default_rng([seed, epoch, location, modality, view])
        return [int(i) for i in rng.choice(available, size=self.params["seasons"], replace=False)]

    def sample(self, record: Mapping[str, Any], epoch: int, seed: int) -> dict[str, Any]:
        location = int(record["location"])
        sample: dict[str, Any] = {"location": torch.tensor(location)}
        views = (("image", "t"), ("image2", "t2")) if self.params["season_per_view"] else (("image", "t"),)
        for modality, name in enumerate(self.params["modalities"]):
            scenes = record[f"scenes_{name}"]
            times = record[f"times_{name}"]
            for view, (image_key, time_key) in enumerate(views):
                chosen = self._draw(seed, epoch, location, modality, view, len(scenes))
                image = scenes[chosen]  # (seasons, C, H, W), a copy
                sample[f"{image_key}_{name}"] = torch.from_numpy(image.reshape(-1, *image.shape[-2:]))
                sample[f"{time_key}_{name}"] = torch.tensor([float(times[i]) for i in chosen])
        return sample

    def _normalize(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        from .ssl4eo import S1_MEAN, S1_STD, S2C_MEAN, S2C_STD

        out = dict(sample)
        if not self.params["normalize"]:
            return {k: v.float() if _is_image(k, v) else v for k, v in out.items()}
        for key, value in sample.items():
            if not _is_image(key, value):
                continue
            name = key.split("_", 1)[1]
            image = value.float()
            per_season = image.view(-1, *self._bands_of(name, image), *image.shape[-2:])
            if self.params["modalities"][name] == "s1":
                seasons = [normalize_sar(season, S1_MEAN, S1_STD) for season in per_season]
            else:
                seasons = [scale_mean_std(season, S2C_MEAN, S2C_STD) for season in per_season]
            out[key] = torch.cat(seasons)
        return out

    def normalize_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """:meth:`normalize_sample` of every sample, vectorised over the batch (one set of kernels per
        key on the accelerator instead of one per sample; the same values: the quantiles are taken
        row by row, each row one band of one season of one sample, as in
        :func:`~decur_lightning.datamodules._common.clip_outliers`)."""
        from .ssl4eo import S1_MEAN, S1_STD, S2C_MEAN, S2C_STD

        if self.quantized or not self.params["normalize"]:
            return super().normalize_batch(batch)
        out = dict(batch)
        for key, value in batch.items():
            if not _is_image(key, value):
                continue
            name = key.split("_", 1)[1]
            image = value.float()
            bands = self._bands_of(name, image)[0]
            seasons = image.reshape(-1, bands, *image.shape[-2:])  # (B * S, C, H, W)
            if self.params["modalities"][name] == "s1":
                flat = seasons.reshape(-1, seasons.shape[-2] * seasons.shape[-1])  # one row per band image
                quantiles = torch.tensor([0.01, 0.99], dtype=flat.dtype, device=flat.device)
                rows_per_call = max(1, (2**24 - 1) // flat.shape[1])  # torch.nanquantile's input size limit
                low, high = torch.cat(
                    [torch.nanquantile(part, quantiles, dim=1) for part in flat.split(rows_per_call)], dim=1
                )
                shape = (*seasons.shape[:2], 1, 1)
                seasons = torch.maximum(torch.minimum(seasons, high.view(shape)), low.view(shape))
                normalised = scale_mean_std(seasons, S1_MEAN, S1_STD)
            else:
                normalised = scale_mean_std(seasons, S2C_MEAN, S2C_STD)
            out[key] = normalised.reshape(image.shape)
        return out

    def _bands_of(self, name: str, image: Tensor) -> tuple[int]:
        from torchgeo.datasets import SSL4EOS12

        split = self.params["modalities"][name]
        return (len(SSL4EOS12.metadata[split]["bands"]),)

    def _quantize_record(self, record: dict[str, Any]) -> dict[str, Any]:
        if not self.params["normalize"]:
            raise ValueError("quantize='uint8' needs the source's normalisation (normalize=True)")
        out = dict(record)
        for name in self.params["modalities"]:
            scenes = torch.from_numpy(record[f"scenes_{name}"])  # (S, C, H, W): normalise every season
            normalised = self._normalize({f"image_{name}": scenes.reshape(-1, *scenes.shape[-2:])})
            out[f"scenes_{name}"] = quantize_uint8(normalised[f"image_{name}"]).reshape(scenes.shape)
        return out


class GeoNRWCodec(SampleCodec):
    """GeoNRW RGB + DEM patches (:class:`~decur_lightning.datamodules.GeoNRWMM`).

    Record of a patch: ``index`` (the patch index), ``image_rgb`` uint8 ``(3, p, p)``, ``image_dem``
    float32 ``(1, p, p)`` (metres), ``mask`` int64 ``(p, p)`` if the source reads masks. Read time:
    RGB / 255, the DEM clipped to its 1st/99th percentile and min-max scaled per patch, repeated to
    ``dem_channels`` (the source's normalisation).
    """

    name = "geonrw"

    @classmethod
    def matches(cls, dataset: Any) -> bool:
        from .geonrw import GeoNRWMM

        return isinstance(dataset, GeoNRWMM)

    @classmethod
    def for_dataset(cls, dataset: Any) -> SampleCodec:
        return cls(dem_channels=dataset.dem_channels, include_mask=dataset.include_mask)

    def read(self, dataset: Any, index: Any) -> dict[str, Any]:
        from .geonrw import read_window

        rgb_path, window = dataset.patch_location(int(index))
        utm_coords = os.path.basename(rgb_path).split("_")[:2]
        tile_dir = os.path.dirname(rgb_path)

        def path_of(modality: str) -> str:
            return os.path.join(tile_dir, dataset.modality_filenames[modality](utm_coords))

        rgb = read_window(rgb_path, window, dataset.tile_size)
        if rgb.shape[0] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"{rgb_path}: expected 3 uint8 bands, got {rgb.shape[0]} {rgb.dtype}")
        record: dict[str, Any] = {
            "index": int(index),
            "image_rgb": rgb,
            "image_dem": read_window(path_of("dem"), window, dataset.tile_size).astype(np.float32),
        }
        if self.params["include_mask"]:
            seg = torch.from_numpy(read_window(path_of("seg"), window, dataset.tile_size)[0].astype(np.int64))
            record["mask"] = dataset.labels_to_mask(seg, path_of("seg")).numpy()
        return record

    def sample(self, record: Mapping[str, Any], epoch: int, seed: int) -> dict[str, Any]:
        return {k: _to_tensor(v) for k, v in record.items()}

    def _normalize(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(sample)
        out["image_rgb"] = sample["image_rgb"].float().div_(255.0)
        dem = percentile_min_max(sample["image_dem"].float())
        out["image_dem"] = dem.expand(self.params["dem_channels"], -1, -1).contiguous()
        return out


CODECS: dict[str, type[SampleCodec]] = {c.name: c for c in (SSL4EOCodec, GeoNRWCodec, GenericCodec)}
"""Codec name -> class; :func:`codec_for` tries them in this order (the generic codec last)."""


def codec_for(dataset: Any) -> SampleCodec:
    """The codec of a training dataset (wrappers looked through): the first of :data:`CODECS` that
    :meth:`~SampleCodec.matches` it, with its parameters read from the dataset."""
    base, _ = unwrap_dataset(dataset)
    for codec_class in CODECS.values():
        if codec_class.matches(base):
            return codec_class.for_dataset(base)
    raise AssertionError("unreachable: the generic codec matches everything")


def codec_from_metadata(description: Mapping[str, Any]) -> SampleCodec:
    """Rebuild a codec from :meth:`SampleCodec.metadata`."""
    name = description.get("name")
    if name not in CODECS:
        raise ValueError(f"unknown sample codec {name!r} in the stream metadata; known: {sorted(CODECS)}")
    return CODECS[name](quantized=bool(description.get("quantized", False)), **description.get("params", {}))


# ------------------------------------------------------------------------------------------------
# Writing


class _RecordWriter:
    """``litdata.optimize``'s ``fn``: source item -> record (picklable; runs in its workers)."""

    def __init__(self, codec: SampleCodec, dataset: Any, quantize: str | None) -> None:
        self.codec = codec
        self.dataset = dataset
        self.quantize = quantize

    def __call__(self, item: Any) -> dict[str, Any]:
        if torch.get_num_threads() != 1:
            # one intra-op thread per writer process: the writers are the parallelism, and torch's
            # OpenMP pool is not fork-safe (a forked writer could hang in its first parallel op)
            torch.set_num_threads(1)
        if self.quantize == "uint8":
            return self.codec.read_quantized(self.dataset, item)
        return self.codec.read(self.dataset, item)


def training_items(datamodule: Any) -> tuple[Any, list[Any], SampleCodec]:
    """The training dataset of a set-up datamodule, the items to write and their codec.

    Items: for the codecs that read files themselves, the indices into the unwrapped dataset
    (a :class:`~torch.utils.data.Subset`'s own indices); for a torchgeo ``GeoDataModule`` with a
    ``train_sampler`` (own rasters), the sampler's queries, in its order; else ``range(len(dataset))``.
    """
    dataset = getattr(datamodule, "train_dataset", None)
    if dataset is None:
        raise ValueError(
            f"{type(datamodule).__name__} has no train_dataset after setup('fit'): prepare writes the training "
            "samples of a pretraining datamodule"
        )
    codec = codec_for(dataset)
    if not isinstance(codec, GenericCodec):
        base, indices = unwrap_dataset(dataset)
        return base, list(range(len(base))) if indices is None else indices, codec
    sampler = getattr(datamodule, "train_sampler", None)
    if sampler is not None:
        return dataset, list(sampler), codec
    return dataset, list(range(len(dataset))), codec


def write_stream(
    datamodule: Any,
    output_dir: str,
    *,
    quantize: str | None = None,
    chunk_bytes: str | int = "64MB",
    compression: str | None = None,
    num_workers: int = 1,
    overwrite: bool = False,
    start_method: str | None = None,
) -> dict[str, Any]:
    """Write the training samples of a pretraining datamodule in litdata's format (see the module).

    Calls ``litdata.optimize``, which switches its process's multiprocessing start method to
    ``spawn`` (or ``start_method``): call this in a process of its own (:func:`decur_lightning.prepare.prepare` does).

    Args:
        datamodule: any datamodule of this package with ``modality_specs`` and a training dataset
            (``setup('fit')`` is called here).
        output_dir: local folder to create (litdata chunks, ``index.json`` and :data:`METADATA_FILE`).
        quantize: ``None`` (default): native types, lossless; ``"uint8"``: lossy 8-bit copies of
            the normalised images (the authors' LMDB scheme).
        chunk_bytes: target chunk size (litdata).
        compression: litdata chunk compression (``None`` or ``"zstd"``).
        num_workers: litdata writer processes.
        overwrite: replace an existing ``output_dir``.
        start_method: multiprocessing start method of litdata's writer processes (litdata's
            default, ``spawn``, if ``None``); it becomes this process's start method.

    Returns:
        the metadata written to :data:`METADATA_FILE`.
    """
    import litdata

    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    if "://" in str(output_dir):
        raise ValueError(
            f"output_dir={output_dir!r}: prepare writes a local folder; copy it to object storage afterwards "
            "(e.g. `aws s3 sync DIR s3://bucket/prefix`) and stream from the URL"
        )
    if os.path.exists(output_dir) and os.listdir(output_dir):
        if not overwrite:
            raise FileExistsError(
                f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
            )
        shutil.rmtree(output_dir)
    specs = datamodule_modalities(datamodule)
    if not specs:
        raise ValueError(f"{type(datamodule).__name__} does not describe its modalities (modality_specs)")
    datamodule.setup("fit")
    dataset, items, codec = training_items(datamodule)
    if not items:
        raise ValueError(f"{type(datamodule).__name__}'s training dataset is empty")
    codec.quantized = quantize == "uint8"
    writer = _RecordWriter(codec, dataset, quantize)
    litdata.optimize(
        fn=writer,
        inputs=items,
        output_dir=str(output_dir),
        chunk_bytes=chunk_bytes,
        compression=compression,
        num_workers=num_workers,
        verbose=False,
        reorder_files=False,
        start_method=start_method,
    )
    first = StreamingDataset(str(output_dir))[0]  # read back after the writers (no torch work before forking)
    dropped: list[str] = []
    if isinstance(codec, GenericCodec):
        dropped = sorted(k for k in dataset[items[0]] if k not in first)
    metadata = {
        "format_version": FORMAT_VERSION,
        "litdata_version": litdata.__version__,
        "source": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
        "source_hparams": _jsonable(dict(getattr(datamodule, "hparams", {}) or {})),
        "num_samples": len(items),
        "modality_specs": modalities_to_hparams(specs),
        "codec": codec.metadata(),
        "quantize": quantize,
        "lossy": quantize is not None,
        "quantize_note": (
            "images hold round(255 * x) of the source's normalised [0, 1] values (error <= 1/510); raw values are lost"
            if quantize == "uint8"
            else "native dtypes, bit-exact copies of the source's values"
        ),
        "dropped_keys": dropped,
        "record_keys": {k: [str(np.asarray(v).dtype), list(np.shape(v))] for k, v in first.items()},
        "compression": compression,
    }
    with open(os.path.join(output_dir, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2)
    return metadata


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        if isinstance(value, Mapping):
            return {str(k): _jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        return str(value)


def read_metadata(input_dir: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The :data:`METADATA_FILE` of a prepared folder or URL (remote files via litdata's downloader).

    Raises:
        FileNotFoundError: if the folder holds no metadata (not written by ``decur prepare``).
    """
    input_dir = str(input_dir)
    if "://" not in input_dir or input_dir.startswith("local:"):
        path = os.path.join(input_dir.removeprefix("local:"), METADATA_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} not found: input_dir must be a folder written by `decur prepare` (litdata chunks plus "
                f"{METADATA_FILE})"
            )
        with open(path) as f:
            return json.load(f)
    import tempfile

    from litdata.streaming.downloader import get_downloader

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, METADATA_FILE)
        downloader = get_downloader(input_dir, tmp, [], dict(storage_options or {}))
        downloader.download_file(f"{input_dir.rstrip('/')}/{METADATA_FILE}", local)
        with open(local) as f:
            return json.load(f)


# ------------------------------------------------------------------------------------------------
# Reading


class StreamingRecords(StreamingDataset):
    """litdata's ``StreamingDataset`` turning each stored record into the source's sample.

    The epoch of the source's per-epoch draws (SSL4EO-S12 seasons) is litdata's
    ``current_epoch - 1`` (litdata counts from 1; Lightning from 0); a restored loader state carries
    it, so a resumed run draws the same seasons.

    Args:
        input_dir: prepared folder or URL.
        codec: the records' :class:`SampleCodec`.
        seed: seed of the source's random choices (and, as ``seed``, of litdata's shuffle).
        normalize: apply the source's normalisation here (in the loader).
        **kwargs: litdata ``StreamingDataset`` arguments.
    """

    def __init__(self, input_dir: str, *, codec: SampleCodec, seed: int, normalize: bool, **kwargs: Any) -> None:
        super().__init__(input_dir, seed=seed, **kwargs)
        self.codec = codec
        self.sample_seed = seed
        self.normalize = normalize

    def __getitem__(self, index: Any) -> dict[str, Any]:
        record = super().__getitem__(index)
        sample = self.codec.sample(record, epoch=max(int(self.current_epoch) - 1, 0), seed=self.sample_seed)
        return self.codec.normalize_sample(sample) if self.normalize else sample


class StreamingPretrainDataModule(DescribesModalities, LightningDataModule):
    """Pretraining batches streamed from a folder written by ``decur prepare`` (litdata format).

    The batches equal the source datamodule's (the same keys, pixels, locations and seasons for the
    same seed and epoch; see the module), in litdata's order: chunks and the samples within a
    worker's chunks are shuffled per epoch from :attr:`shuffle_seed`. Under DDP every rank and node
    reads its own shard (litdata's ``StreamingDataset`` splits the chunks by rank; it is built in
    :meth:`setup`, after the process group exists) and equal-length shards are kept (``drop_last``).
    The loader is litdata's ``StreamingDataLoader``, whose position Lightning stores in checkpoints:
    a run resumed inside an epoch continues with the next batch. Like the other pretraining
    datamodules there is no validation split.

    Args:
        input_dir: the prepared folder, or its copy on object storage (``s3://bucket/prefix``, also
            ``gs://``, ``azure://``; credentials as litdata/``storage_options`` take them).
        batch_size: samples per batch (per rank).
        num_workers: loader worker processes.
        normalize_on: ``"loader"`` (default; as the source datamodules) or ``"device"`` (ship native
            types, normalise after the transfer to the accelerator).
        shuffle: shuffle chunks and samples every epoch.
        cache_dir: local cache of remote chunks (litdata's default if ``None``).
        max_cache_size: most disk the cache of remote chunks may use (litdata's argument).
        storage_options: passed to litdata (e.g. an endpoint URL for S3-compatible storage).

    Example YAML::

        data:
          class_path: decur_lightning.datamodules.StreamingPretrainDataModule
          init_args: {input_dir: s3://bucket/ssl4eo-s12-litdata, batch_size: 256, num_workers: 8}
    """

    val_dataloader = LightningDataModule.val_dataloader

    def __init__(
        self,
        input_dir: str,
        batch_size: int = 256,
        num_workers: int = 0,
        normalize_on: str = "loader",
        shuffle: bool = True,
        cache_dir: str | None = None,
        max_cache_size: str | int = "100GB",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if normalize_on not in NORMALIZE_ON_CHOICES:
            raise ValueError(f"normalize_on must be one of {NORMALIZE_ON_CHOICES}, got {normalize_on!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.save_hyperparameters()
        self.input_dir = str(input_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.normalize_on = normalize_on
        self.shuffle = shuffle
        self.cache_dir = cache_dir
        self.max_cache_size = max_cache_size
        self.storage_options = dict(storage_options or {})
        self.metadata = read_metadata(self.input_dir, self.storage_options)
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.input_dir}: stream format version {self.metadata.get('format_version')}, this library reads "
                f"{FORMAT_VERSION}; prepare the data again with this version"
            )
        self.codec = codec_from_metadata(self.metadata["codec"])
        self.train_dataset: Any = None

    @property
    def modality_specs(self) -> dict[str, Modality]:
        """The source datamodule's modalities, as recorded by ``decur prepare``."""
        return {name: Modality(**fields) for name, fields in self.metadata["modality_specs"].items()}

    @property
    def shuffle_seed(self) -> int:
        """Seed of the order and of the source's random choices (SSL4EO-S12 seasons), fixed at the
        first call (after ``seed_everything``) and kept in checkpoints, as in the other datamodules."""
        if not hasattr(self, "_shuffle_seed"):
            self._shuffle_seed = int(torch.initial_seed() % 2**31)
        return self._shuffle_seed

    def state_dict(self) -> dict[str, Any]:
        """The seed (Lightning stores it in checkpoints; the loader position is stored separately)."""
        return {"shuffle_seed": self.shuffle_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the seed from a checkpoint."""
        if "shuffle_seed" in state_dict:
            self._shuffle_seed = int(state_dict["shuffle_seed"])

    def make_dataset(self, normalize: bool | None = None) -> StreamingRecords:
        """A fresh :class:`StreamingRecords` over ``input_dir`` (sharded by the current distributed
        environment); ``normalize`` defaults to ``normalize_on == "loader"``."""
        return StreamingRecords(
            self.input_dir,
            codec=self.codec,
            seed=self.shuffle_seed,
            normalize=self.normalize_on == "loader" if normalize is None else normalize,
            cache_dir=self.cache_dir,
            shuffle=self.shuffle,
            drop_last=True,
            max_cache_size=self.max_cache_size,
            storage_options=self.storage_options,
        )

    def setup(self, stage: str) -> None:
        """Check that this rank's shard fills a batch (the stream is opened by :meth:`train_dataloader`).

        Raises:
            ValueError: in the fit stage, if the shard holds fewer samples than ``batch_size``.
        """
        if stage == "fit":
            shard = len(self.make_dataset())
            if shard < self.batch_size:
                raise ValueError(
                    f"the streamed training data holds {shard} sample(s) for this rank, fewer than batch_size="
                    f"{self.batch_size}: no training batch. Lower batch_size."
                )

    def train_dataloader(self) -> StreamingDataLoader:
        """litdata's ``StreamingDataLoader`` over a fresh dataset (stateful: Lightning checkpoints its
        position). Built here, not in :meth:`setup`: Lightning restores :attr:`shuffle_seed` from a
        checkpoint after ``setup`` and before asking for the loader."""
        self.train_dataset = self.make_dataset()
        return StreamingDataLoader(
            self.train_dataset, batch_size=self.batch_size, num_workers=self.num_workers, drop_last=True
        )

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """With ``normalize_on="device"``: the source's normalisation, on the batch's device."""
        if self.normalize_on == "device":
            return self.codec.normalize_batch(batch)
        return batch
