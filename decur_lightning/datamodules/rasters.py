"""Your own co-registered rasters for DeCUR pretraining: any ``M >= 2`` torchgeo raster sources.

Each modality is a torchgeo :class:`~torchgeo.datasets.RasterDataset`: one you built (e.g.
``torchgeo.datasets.Sentinel2(paths, bands=...)``) or one built here from a folder, a file glob
and the names of the files' bands (:class:`RasterSource`). The sources are joined with torchgeo's
:class:`~torchgeo.datasets.IntersectionDataset` (``a & b & c``): every source is read in the
first source's CRS (or ``crs``) and at one resolution (``res``, default the first source's), so
rasters in different projections and resolutions are sampled over the same place; patches
(``patch_size`` pixels at that resolution) are located with torchgeo's
:class:`~torchgeo.samplers.RandomGeoSampler` (``sampling="random"``) or
:class:`~torchgeo.samplers.GridGeoSampler` (``sampling="grid"``).

What is added here: named batch keys ``image_<name>``, per-band normalisation to ``[0, 1]`` with
statistics computed once from a sample of patches and cached in a JSON file (or given), patches
that are mostly nodata skipped and counted rather than read as zeros, clear errors for missing
files, wrong band names and sources that do not overlap, and a map-style training set whose
``i``-th patch of epoch ``e`` is a pure function of ``(seed, e, i)`` (so a resumed run, every
DataLoader worker and ``decur prepare`` read the same patches).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import rasterio
import rasterio.merge
import rasterio.warp
import shapely
import torch
from rasterio.vrt import WarpedVRT
from torch import Tensor
from torch.utils.data import Dataset
from torchgeo.datasets import GeoDataset, IntersectionDataset, RasterDataset
from torchgeo.samplers import GridGeoSampler, RandomGeoSampler

from ..augmentations import VIEW_KINDS
from ..modalities import Modality, _check_name, from_fields
from ._common import PretrainDataModule, check_enough_for_a_batch, clip_outliers, percentile_min_max, scale_mean_std

__all__ = [
    "NORMALIZATIONS",
    "RasterPatches",
    "RasterPretrainDataModule",
    "RasterSource",
    "join_sources",
]

log = logging.getLogger(__name__)

Normalization = Literal["mean_std", "sar", "percentile"]
NORMALIZATIONS: tuple[str, ...] = ("mean_std", "sar", "percentile")
"""Per-band normalisations to ``[0, 1]``: ``"mean_std"`` maps ``[mean - 2 std, mean + 2 std]`` to
``[0, 1]`` and clips (paper B.1, optical); ``"sar"`` first clips each patch's 2 % outliers per band
(paper B.1/B.2, SAR; the statistics suit backscatter in dB, as SSL4EO-S12 stores it, rather than
linear power); ``"percentile"`` maps each patch's 1st..99th percentile per band to ``[0, 1]``
(the authors' DEM loader). The first two use the data set's band statistics."""

_DEFAULT_NORMALIZATION = {"sar": "sar", "dem": "percentile"}


@dataclass
class RasterSource:
    """One modality of :class:`RasterPretrainDataModule`: a torchgeo raster dataset or files.

    Give either ``dataset`` (a torchgeo :class:`~torchgeo.datasets.RasterDataset` instance, e.g.
    ``Sentinel2(paths, bands=[...])``, which also covers one file per band) or ``paths`` with
    ``band_names`` (and ``filename_glob``): every file matching the glob under the folders
    (recursively) or among the listed files is one tile of a mosaic whose bands are, in order,
    ``band_names``.

    Args:
        paths: folder(s) searched recursively, or file(s).
        band_names: names of the files' bands, in file order (as many as the files have bands).
            With ``dataset``: names for a dataset that has none (``all_bands`` empty).
        bands: the bands to read, in this order (default: all of ``band_names``, or the dataset's).
        filename_glob: file name pattern (fnmatch), e.g. ``"*_S2.tif"``.
        nodata: value of missing pixels (default: the files' nodata tag). A pixel is missing when
            every band equals it or any band is NaN; for sources from ``paths`` also where no file
            covers it (read as NaN, not 0).
        view: view pipeline kind of the modality (:data:`~decur_lightning.augmentations.VIEW_KINDS`;
            default: the name if it is a kind, else ``"generic"``).
        normalization: one of :data:`NORMALIZATIONS` (default ``"sar"`` for view ``sar``,
            ``"percentile"`` for ``dem``, else ``"mean_std"``).
        mean: per-band means of the bands read (skips the statistics pass for this source).
        std: per-band standard deviations (with ``mean``).
        dataset: a torchgeo ``RasterDataset`` instead of ``paths``.
    """

    paths: str | list[str] | None = None
    band_names: list[str] | None = None
    bands: list[str] | None = None
    filename_glob: str = "*.tif"
    nodata: float | None = None
    view: str | None = None
    normalization: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    dataset: RasterDataset | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.paths is None) == (self.dataset is None):
            raise ValueError("A raster source takes either paths (with band_names) or a torchgeo dataset, exactly one.")
        if self.dataset is not None and not isinstance(self.dataset, RasterDataset):
            raise TypeError(f"dataset must be a torchgeo RasterDataset, got {type(self.dataset).__name__}.")
        if self.paths is not None and not self.band_names:
            raise ValueError(
                f"A raster source from paths ({self.paths}) needs band_names: the names of the files' bands in order, "
                "e.g. band_names: [VV, VH]."
            )
        if self.view is not None and self.view not in VIEW_KINDS:
            raise ValueError(f"view={self.view!r}: expected one of {VIEW_KINDS}.")
        if self.normalization is not None and self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={self.normalization!r}: expected one of {NORMALIZATIONS}.")
        if (self.mean is None) != (self.std is None):
            raise ValueError("Give both mean and std of a raster source, or neither (then they are computed).")
        if self.band_names is not None:
            self.band_names = [str(b) for b in self.band_names]
        if self.bands is not None:
            self.bands = [str(b) for b in self.bands]

    @classmethod
    def coerce(cls, name: str, value: RasterSource | RasterDataset | Mapping[str, Any]) -> RasterSource:
        """A :class:`RasterSource` from itself, a ``RasterDataset`` or a dict of its fields."""
        if isinstance(value, RasterSource):
            return value
        if isinstance(value, RasterDataset):
            return cls(dataset=value)
        if isinstance(value, Mapping):
            return from_fields(cls, value, f"raster source {name!r}", "a source")
        raise TypeError(
            f"raster source {name!r}: expected a RasterSource, a torchgeo RasterDataset or a dict of RasterSource "
            f"fields; got {type(value).__name__}."
        )

    def all_band_names(self) -> list[str]:
        """Names of every band the source's files hold (reads one file header only if nothing names them)."""
        if self.dataset is None:
            return list(self.band_names or [])
        if self.dataset.all_bands:
            return list(self.dataset.all_bands)
        if self.band_names:
            return list(self.band_names)
        with rasterio.open(self.dataset.files[0]) as src:
            return [f"B{i}" for i in range(1, src.count + 1)]

    def selected_bands(self, name: str) -> list[str]:
        """The bands this source delivers, in order; a ValueError names both lists if one is unknown."""
        available = self.all_band_names()
        if self.bands is None:
            if self.dataset is not None and self.dataset.all_bands:
                return list(self.dataset.bands)
            return available
        unknown = [b for b in self.bands if b not in available]
        if unknown:
            raise ValueError(
                f"raster source {name!r}: band(s) {unknown} of bands={self.bands} are not among the source's bands "
                f"{available}. Choose bands from that list (or fix band_names to name the files' bands in order)."
            )
        return list(self.bands)

    def view_kind(self, name: str) -> str:
        """The view kind: given, else the name if it is a kind, else ``"generic"``."""
        return self.view or (name if name in VIEW_KINDS else "generic")

    def normalization_kind(self, name: str) -> str:
        """The normalisation: given, else by view kind (see :data:`NORMALIZATIONS`)."""
        return self.normalization or _DEFAULT_NORMALIZATION.get(self.view_kind(name), "mean_std")


def _files(paths: str | Sequence[str], pattern: str) -> list[str]:
    """Files matching ``pattern`` under the folders (recursively) or among the files, as torchgeo finds them."""
    import fnmatch

    found: set[str] = set()
    for path in [paths] if isinstance(paths, str | os.PathLike) else paths:
        path = str(path)
        if os.path.isdir(path):
            found |= set(glob.iglob(os.path.join(path, "**", pattern), recursive=True))
        elif os.path.isfile(path) and fnmatch.fnmatch(os.path.basename(path), pattern):
            found.add(path)
    return sorted(found)


def _build_dataset(name: str, source: RasterSource) -> RasterDataset:
    """The torchgeo ``RasterDataset`` of a source (the given one, or one over its files)."""
    if source.dataset is not None:
        dataset = source.dataset
        if source.bands is not None and not dataset.all_bands:
            raise ValueError(
                f"raster source {name!r}: bands={source.bands} cannot select from a {type(dataset).__name__} without "
                "all_bands; build the dataset with its bands, or give paths and band_names instead."
            )
        if source.bands is not None and list(dataset.bands) != source.selected_bands(name):
            raise ValueError(
                f"raster source {name!r}: bands={source.bands} differ from the dataset's bands {list(dataset.bands)}; "
                "select bands when building the torchgeo dataset (its bands argument)."
            )
        return dataset
    assert source.paths is not None and source.band_names is not None
    files = _files(source.paths, source.filename_glob)
    if not files:
        where = [source.paths] if isinstance(source.paths, str) else list(source.paths)
        missing = [p for p in where if not os.path.exists(p)]
        raise FileNotFoundError(
            f"raster source {name!r}: no file matches filename_glob={source.filename_glob!r} in {where} (folders "
            f"are searched recursively)"
            + (f"; {missing} do(es) not exist" if missing else "")
            + ". Fix paths or filename_glob."
        )
    with rasterio.open(files[0]) as src:
        count = src.count
    if count != len(source.band_names):
        raise ValueError(
            f"raster source {name!r}: band_names lists {len(source.band_names)} bands {source.band_names} but "
            f"{files[0]} has {count}. band_names names every band of the files in order; select bands with bands."
        )
    selected = source.selected_bands(name)
    cls = type(
        f"RasterFiles_{name}",
        (_RasterFiles,),
        {
            "filename_glob": source.filename_glob,
            "all_bands": tuple(source.band_names),
            "nodata_value": None if source.nodata is None else float(source.nodata),
            "__module__": __name__,
        },
    )
    return cls(paths=source.paths, bands=selected)


class _RasterFiles(RasterDataset):
    """torchgeo's RasterDataset over the files of a :class:`RasterSource`, reading missing pixels as NaN.

    Two changes to torchgeo 0.8.1's reading, both about where the data is:

    * Reprojection resamples like the reads (bilinear for images). torchgeo warps a file through
      a ``WarpedVRT`` with rasterio's default nearest resampling and then resamples that
      bilinearly to the query grid: a source in another CRS lands up to half of its pixel off
      (measured on the tests' rasters: 5.5 m mean, 10 m max for 14 x 22 m pixels read at 10 m;
      0.5 m mean with this change).
    * Missing pixels are NaN: the mosaic is merged into float32 with NaN as its fill, so pixels
      outside every file (and the footprint corners of a reprojected file) and pixels equal to the
      files' (or the source's) nodata value come out NaN instead of 0; a given ``nodata`` also keeps
      nodata pixels out of the resampling kernel.
    """

    nodata_value: float | None = None

    def _load_warp_file(self, filepath: Any) -> Any:
        src = rasterio.open(filepath)
        left, right = sorted((src.bounds.left, src.bounds.right))
        bottom, top = sorted((src.bounds.bottom, src.bounds.top))
        transform, width, height = rasterio.warp.calculate_default_transform(
            src.crs, self.crs, src.width, src.height, left, bottom, right, top
        )
        if src.crs == self.crs and src.transform == transform and self.nodata_value is None:
            return src
        vrt = WarpedVRT(
            src,
            crs=self.crs,
            transform=transform,
            height=height,
            width=width,
            resampling=self.resampling,
            src_nodata=self.nodata_value if self.nodata_value is not None else src.nodata,
            add_alpha=self.nodata_value is None and src.nodata is None,
        )
        src.close()
        return vrt

    def _merge_files(self, filepaths: Sequence[str], query: Any, band_indexes: Sequence[int] | None = None) -> Tensor:
        handles = [self._cached_load_warp_file(fp) if self.cache else self._load_warp_file(fp) for fp in filepaths]
        x, y, _ = self._disambiguate_slice(query)
        dest, _ = rasterio.merge.merge(
            handles,
            (x.start, y.start, x.stop, y.stop),
            (x.step, y.step),
            indexes=band_indexes,
            resampling=self.resampling,
            nodata=np.nan,
            dtype="float32",
        )
        return torch.from_numpy(dest)


def _describe(dataset: GeoDataset) -> str:
    x, y, _ = dataset.bounds
    crs = dataset.crs.to_string() if dataset.crs is not None else None
    return f"bounds x [{x.start:.6g}, {x.stop:.6g}], y [{y.start:.6g}, {y.stop:.6g}] in CRS {crs}"


def _native(dataset: RasterDataset) -> str:
    """The dataset's bounds in its files' own CRS (before any reprojection), for error messages."""
    with rasterio.open(dataset.index.filepath.iloc[0]) as src:
        crs = src.crs
    bounds = dataset.index.to_crs(crs).total_bounds
    return f"bounds x [{bounds[0]:.6g}, {bounds[2]:.6g}], y [{bounds[1]:.6g}, {bounds[3]:.6g}] in CRS {crs.to_string()}"


def join_sources(
    datasets: Mapping[str, RasterDataset],
    crs: Any = None,
    res: float | tuple[float, float] | None = None,
    spatial_only: bool = False,
) -> IntersectionDataset:
    """Join ``M >= 2`` raster datasets with torchgeo's intersection (``a & b & c ...``).

    Every dataset is reprojected to ``crs`` (default: the first one's) and read at ``res``
    (default: the first one's), so each query returns the same place from every source.

    Args:
        datasets: name -> torchgeo raster dataset, in modality order.
        crs: target CRS (anything ``rasterio.crs.CRS.from_user_input`` takes, e.g. ``"EPSG:32632"``).
        res: resolution in units of ``crs``.
        spatial_only: ignore the files' dates when intersecting (torchgeo's ``spatial_only``).

    Raises:
        ValueError: if two sources (or one source and the overlap of those before it) do not
            overlap; the message gives both bounds and CRSs.
    """
    names = list(datasets)
    if len(names) < 2:
        raise ValueError(f"DeCUR needs at least two raster sources (modalities); got {names}.")
    first = datasets[names[0]]
    if crs is not None:
        first.crs = rasterio.crs.CRS.from_user_input(crs)
    if res is not None:
        first.res = res
    joined: GeoDataset = first
    for k, name in enumerate(names[1:], start=1):
        described = _describe(joined)
        label = repr(names[0]) if k == 1 else f"the overlap of {names[:k]}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # geopandas' empty-overlay notices
                joined = IntersectionDataset(joined, datasets[name], spatial_only=spatial_only)
        except RuntimeError as error:
            temporal = "temporal" in str(error)
            raise ValueError(
                f"raster sources do not overlap{' in time' if temporal else ''}: {label} has {described}; {name!r} has "
                f"{_describe(datasets[name])} (its files: {_native(datasets[name])})."
                + (
                    " The files' dates do not overlap: pass spatial_only=True to pair them by place only."
                    if temporal
                    else " Check that the rasters cover the same area (and their CRS tags)."
                )
            ) from error
        if spatial_only:  # torchgeo 0.8.1 leaves a RangeIndex here, which its samplers cannot read
            joined.index.index = pd.IntervalIndex.from_arrays(
                [pd.Timestamp.min] * len(joined.index),
                [pd.Timestamp.max] * len(joined.index),
                closed="both",
                name="datetime",
            )
    assert isinstance(joined, IntersectionDataset)
    return joined


def _seed_of(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


class RasterPatches(Dataset[dict[str, Tensor]]):
    """Map-style training set of co-registered patches from joined raster sources.

    Index ``i`` (epoch 0) or :class:`~decur_lightning.datamodules.samplers.EpochIndex` ``(i,
    epoch)`` is one patch location: with ``sampling="random"`` torchgeo's
    :class:`~torchgeo.samplers.RandomGeoSampler` draws it under a torch RNG seeded from ``(seed,
    epoch, i, attempt)`` (new places every epoch, the same in every process and on resume);
    with ``sampling="grid"`` it is the ``i``-th cell of torchgeo's
    :class:`~torchgeo.samplers.GridGeoSampler` (the same every epoch) among those whose area the
    sources' joint footprint covers to at least ``1 - max_nodata_fraction``. A patch in which any
    modality has more than ``max_nodata_fraction`` of its pixels missing is skipped: random
    sampling draws again (attempt + 1), grid sampling takes the next cell (so a grid sample may
    repeat a cell where the files hold nodata inside the footprint); skips are counted in
    :attr:`skipped` (this process) and in each sample's ``nodata_skipped``.

    Sample keys: ``image_<name>`` float32 ``(C, patch_size, patch_size)`` (normalised to
    ``[0, 1]`` when :attr:`normalize`, else the raw values as torchgeo reads them, float32,
    missing pixels NaN), ``bounds`` float64 ``(4,)`` = ``(xmin, ymin, xmax, ymax)`` of the patch
    in :attr:`crs`, ``nodata_skipped`` int64 (patches skipped before this one was found).
    Remaining missing pixels of an accepted patch become 0 after normalisation.

    For writing the samples elsewhere (``decur prepare``): ``len(dataset)`` patches, sample ``i``
    is ``dataset[i]`` (epoch 0, deterministic; ``EpochIndex(i, e)`` for epoch ``e``);
    :meth:`location` gives its query without reading; set ``dataset.normalize = False`` (or build
    it with ``RasterPretrainDataModule.build_dataset(normalize=False)``) for raw values, apply
    :meth:`normalize_sample` later, and see :meth:`file_dtypes` for the files' data types.

    Args:
        joined: the sources joined by :func:`join_sources`.
        datasets: name -> torchgeo raster dataset (those joined), in modality order.
        patch_size: patch side in pixels at the joined resolution.
        sampling: ``"random"`` or ``"grid"``.
        length: random patches per epoch (default: torchgeo's estimate, the number of
            non-overlapping patches that fit); ignored by grid sampling.
        stride: grid stride in pixels (default ``patch_size``).
        seed: seed of the random locations.
        nodata: name -> missing-pixel value (``None``: only NaN is missing).
        max_nodata_fraction: most missing pixels a modality's patch may have, in ``[0, 1)``.
        max_tries: draws (or grid cells) tried for one sample before failing.
        normalizations: name -> one of :data:`NORMALIZATIONS`.
        stats: name -> ``(mean, std)`` per band (needed by ``"mean_std"`` and ``"sar"``).
        normalize: normalise the images (else raw values).
    """

    epoch_indexed: ClassVar[bool] = True
    """Indices may carry the epoch (:class:`~decur_lightning.datamodules.samplers.EpochIndex`)."""

    def __init__(
        self,
        joined: IntersectionDataset,
        datasets: Mapping[str, RasterDataset],
        patch_size: int,
        sampling: str = "random",
        length: int | None = None,
        stride: int | None = None,
        seed: int = 0,
        nodata: Mapping[str, float | None] | None = None,
        max_nodata_fraction: float = 0.5,
        max_tries: int = 100,
        normalizations: Mapping[str, str] | None = None,
        stats: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
        normalize: bool = True,
    ) -> None:
        if sampling not in ("random", "grid"):
            raise ValueError(f"sampling must be 'random' or 'grid', got {sampling!r}.")
        if not 0.0 <= max_nodata_fraction < 1.0:
            raise ValueError(f"max_nodata_fraction must lie in [0, 1), got {max_nodata_fraction}.")
        self.joined = joined
        self.datasets = dict(datasets)
        self.patch_size = int(patch_size)
        self.sampling = sampling
        self.seed = int(seed)
        self.nodata = dict(nodata or {})
        self.max_nodata_fraction = max_nodata_fraction
        self.max_tries = int(max_tries)
        self.normalizations = {name: (normalizations or {}).get(name, "mean_std") for name in self.datasets}
        self.stats = {name: (list(m), list(s)) for name, (m, s) in (stats or {}).items()}
        self.normalize = normalize
        self.skipped = 0
        """Patches skipped for missing pixels in this process."""
        self._pid = os.getpid()
        x, y, _ = joined.bounds
        width, height = (x.stop - x.start) / joined.res[0], (y.stop - y.start) / joined.res[1]
        if width < self.patch_size or height < self.patch_size:
            raise ValueError(
                f"the sources overlap over {width:.0f} x {height:.0f} px at resolution {joined.res}, less than "
                f"patch_size={self.patch_size}: lower patch_size or res."
            )
        if sampling == "random":
            self.sampler: RandomGeoSampler | GridGeoSampler = RandomGeoSampler(joined, self.patch_size, length)
            self.grid: list[tuple[slice, slice, slice]] = []
            self.length = len(self.sampler) if length is None else int(length)
        else:
            self.sampler = GridGeoSampler(joined, self.patch_size, stride or self.patch_size)
            self.grid = self._covered(list(self.sampler))
            self.length = len(self.grid)
        if self.length < 1:
            raise ValueError(f"no patch of {self.patch_size} px fits in the joined sources ({_describe(joined)}).")

    def _covered(self, cells: list[tuple[slice, slice, slice]]) -> list[tuple[slice, slice, slice]]:
        """The grid cells that the sources' joint footprint covers enough (torchgeo's last row and
        column of cells overhang it); a geometric test, no pixel read."""
        footprint = shapely.union_all(self.joined.index.geometry.values)
        kept = []
        for cell in cells:
            box = shapely.box(cell[0].start, cell[1].start, cell[0].stop, cell[1].stop)
            if box.intersection(footprint).area >= (1 - self.max_nodata_fraction) * box.area:
                kept.append(cell)
        return kept

    @property
    def names(self) -> tuple[str, ...]:
        """Modality names, in order."""
        return tuple(self.datasets)

    @property
    def crs(self) -> Any:
        """CRS of the patches' bounds."""
        return self.joined.crs

    def __len__(self) -> int:
        return self.length

    def file_dtypes(self) -> dict[str, str]:
        """The files' data type per source (e.g. ``"uint16"``), from the first file's header.

        Raw samples are float32 (torchgeo's reads); a writer may store a source in its file type
        where the raw values are whole and finite (a source read on its own grid, no missing pixels).
        """
        dtypes = {}
        for name, dataset in self.datasets.items():
            with rasterio.open(dataset.index.filepath.iloc[0]) as src:
                dtypes[name] = str(src.dtypes[0])
        return dtypes

    def location(self, index: int, epoch: int = 0, attempt: int = 0) -> tuple[slice, slice, slice]:
        """The torchgeo query (x, y, t slices) of sample ``index`` of ``epoch`` at ``attempt`` (no read)."""
        if not 0 <= int(index) < self.length:
            raise IndexError(f"index {int(index)} out of range for {self.length} patches")
        if self.sampling == "grid":
            return self.grid[(int(index) + attempt) % self.length]
        assert isinstance(self.sampler, RandomGeoSampler)
        self.sampler.length = 1
        with torch.random.fork_rng(devices=[]):  # torchgeo draws the tile with the global RNG
            torch.manual_seed(_seed_of(self.seed, epoch, int(index), attempt))
            return next(iter(self.sampler))

    def read(self, query: tuple[slice, slice, slice]) -> dict[str, Tensor]:
        """Raw images (float32, missing pixels NaN) of every source at ``query``."""
        if self._pid != os.getpid():
            # file handles opened before a DataLoader forked its workers share their file offsets
            # with the parent: every process opens its own (torchgeo caches them per function)
            RasterDataset._cached_load_warp_file.cache_clear()
            self._pid = os.getpid()
        x, y, t = query
        res = self.joined.res
        x, y = slice(x.start, x.stop, res[0]), slice(y.start, y.stop, res[1])
        images = {}
        for name, dataset in self.datasets.items():
            image = dataset[x, y, t]["image"].float()
            missing = torch.isnan(image).any(dim=0)
            value = self.nodata.get(name)
            if value is not None:
                missing |= (image == value).all(dim=0)
            image[:, missing] = float("nan")
            images[name] = image
        return images

    def missing_fraction(self, images: Mapping[str, Tensor]) -> dict[str, float]:
        """Share of missing pixels per modality of raw images from :meth:`read`."""
        return {name: float(torch.isnan(image).any(dim=0).float().mean()) for name, image in images.items()}

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        epoch = int(getattr(index, "epoch", 0))
        for attempt in range(self.max_tries):
            query = self.location(index, epoch, attempt)
            images = self.read(query)
            missing = self.missing_fraction(images)
            if max(missing.values()) <= self.max_nodata_fraction:
                break
            if self.skipped == 0:
                log.info(
                    "RasterPatches: skipping a patch with missing fractions %s (max %s)",
                    missing,
                    self.max_nodata_fraction,
                )
            self.skipped += 1
        else:
            raise ValueError(
                f"{self.max_tries} patches in a row for sample {int(index)} had more than max_nodata_fraction="
                f"{self.max_nodata_fraction} of their pixels missing (last: {missing}). Check each source's nodata "
                "value, raise max_nodata_fraction or max_tries, or restrict the sources to where they hold data."
            )
        sample = {f"image_{name}": image for name, image in images.items()}
        x, y, _ = query
        sample["bounds"] = torch.tensor([x.start, y.start, x.stop, y.stop], dtype=torch.float64)
        sample["nodata_skipped"] = torch.tensor(attempt, dtype=torch.int64)
        return self.normalize_sample(sample) if self.normalize else sample

    def normalize_sample(self, sample: dict[str, Tensor]) -> dict[str, Tensor]:
        """Normalise every ``image_<name>`` of a raw sample to ``[0, 1]`` (missing pixels -> 0)."""
        out = dict(sample)
        for name in self.names:
            image = sample[f"image_{name}"]
            kind = self.normalizations[name]
            if kind == "percentile":
                out[f"image_{name}"] = percentile_min_max(image)
                continue
            if name not in self.stats:
                raise ValueError(f"no band statistics for modality {name!r} (normalization {kind!r}).")
            mean, std = self.stats[name]
            if kind == "sar":
                image = clip_outliers(image, 0.02)
            out[f"image_{name}"] = scale_mean_std(image, mean, std)
        return out

    def band_statistics(self, num_patches: int, seed: int = 0) -> dict[str, tuple[list[float], list[float]]]:
        """Per-band mean and standard deviation over the valid pixels of ``num_patches`` random patches.

        The patches are drawn like training patches (skipping mostly-missing ones) from ``seed``,
        independent of the training seed, so the result depends only on the data and settings.
        """
        sums: dict[str, np.ndarray] = {}
        squares: dict[str, np.ndarray] = {}
        counts: dict[str, np.ndarray] = {}
        sampler = RandomGeoSampler(self.joined, self.patch_size, 1)
        for i in range(num_patches):
            for attempt in range(self.max_tries):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_seed_of(seed, 2**31 - 1, i, attempt))
                    query = next(iter(sampler))
                images = self.read(query)
                if max(self.missing_fraction(images).values()) <= self.max_nodata_fraction:
                    break
            else:
                raise ValueError(
                    f"no patch with at most max_nodata_fraction={self.max_nodata_fraction} missing pixels in "
                    f"{self.max_tries} draws while computing band statistics; check the sources' nodata values."
                )
            for name, image in images.items():
                flat = image.reshape(image.shape[0], -1).double().numpy()
                valid = ~np.isnan(flat)
                values = np.where(valid, flat, 0.0)
                sums[name] = sums.get(name, 0) + values.sum(1)
                squares[name] = squares.get(name, 0) + (values**2).sum(1)
                counts[name] = counts.get(name, 0) + valid.sum(1)
        stats = {}
        for name in self.names:
            n = np.maximum(counts[name], 1)
            mean = sums[name] / n
            std = np.sqrt(np.maximum(squares[name] / n - mean**2, 0.0))
            flat = std <= 1e-12
            if flat.any():
                warnings.warn(
                    f"modality {name!r}: band(s) {np.flatnonzero(flat).tolist()} are constant in the statistics sample; "
                    "their std is set to 1 (they normalise to 0 or 1).",
                    RuntimeWarning,
                    stacklevel=2,
                )
                std = np.where(flat, 1.0, std)
            stats[name] = (mean.tolist(), std.tolist())
        return stats


class RasterPretrainDataModule(PretrainDataModule):
    """DeCUR pretraining on your own co-registered rasters: any ``M >= 2`` sources (modalities).

    Each entry of ``sources`` is one modality, named as in the batch keys (``image_<name>``) and
    in the order of the paper's modality 1, 2, ...; its value is a :class:`RasterSource`, a dict
    of its fields (YAML) or a torchgeo ``RasterDataset``. The sources are joined with torchgeo's
    intersection (:func:`join_sources`), patches located with torchgeo's random or grid sampler
    and served by :class:`RasterPatches`. Batches: ``image_<name>`` ``(B, C, patch_size,
    patch_size)`` in ``[0, 1]``, ``bounds`` ``(B, 4)`` in the joined CRS. No augmentation runs
    here: the SSL module makes the views (paper B.1) from :attr:`modality_specs`.

    Normalisation (per source, :data:`NORMALIZATIONS`) uses per-band statistics given in the
    source (``mean``, ``std``) or computed once over the valid pixels of ``stats_patches`` random
    patches and cached in the JSON file ``stats_file`` (default ``decur_raster_stats.json``
    beside the first source's data), keyed by a hash of everything they depend on (files with
    sizes and modification times, bands, nodata, CRS, resolution, patch size, sample size).

    Patches where a modality misses more than ``max_nodata_fraction`` of its pixels are skipped
    (another one is drawn); the running count is logged as ``data/nodata_skipped`` to the
    trainer's loggers and kept in :attr:`nodata_skipped`.

    Args:
        sources: modality name -> source (see above); at least two.
        patch_size: patch side in pixels at resolution ``res``.
        batch_size: patches per batch.
        num_workers: DataLoader worker processes.
        length: random patches per epoch (default: about the number of non-overlapping patches
            in the overlap, torchgeo's default).
        sampling: ``"random"`` (torchgeo's RandomGeoSampler, new places every epoch) or
            ``"grid"`` (GridGeoSampler, a fixed tiling).
        stride: grid stride in pixels (default ``patch_size``).
        crs: CRS all sources are read in (default: the first source's), e.g. ``"EPSG:32632"``.
        res: resolution in units of ``crs`` (default: the first source's).
        spatial_only: pair files by place only, ignoring their dates.
        max_nodata_fraction: most missing pixels per modality and patch, in ``[0, 1)``.
        max_tries: draws tried per sample before failing.
        stats_patches: patches the band statistics are computed from.
        stats_file: JSON cache of the statistics; ``None``: beside the first source's data;
            ``""``: no cache.

    Example YAML::

        data:
          class_path: decur_lightning.datamodules.RasterPretrainDataModule
          init_args:
            sources:
              s1: {paths: /data/s1, band_names: [VV, VH], view: sar, nodata: 0}
              s2: {paths: /data/s2, band_names: [B02, B03, B04, B08], view: optical, nodata: 0}
            patch_size: 256
    """

    def __init__(
        self,
        sources: dict[str, RasterSource],
        patch_size: int = 256,
        batch_size: int = 64,
        num_workers: int = 0,
        length: int | None = None,
        sampling: str = "random",
        stride: int | None = None,
        crs: str | None = None,
        res: float | None = None,
        spatial_only: bool = False,
        max_nodata_fraction: float = 0.5,
        max_tries: int = 100,
        stats_patches: int = 64,
        stats_file: str | None = None,
    ) -> None:
        if not isinstance(sources, Mapping) or len(sources) < 2:
            raise ValueError(
                "sources must map at least two modality names to raster sources, e.g. {'s1': {'paths': ..., "
                f"'band_names': [VV, VH]}}, 's2': {{...}}}}; got {sources!r}."
            )
        self.sources = {_check_name(name): RasterSource.coerce(name, value) for name, value in sources.items()}
        if sampling not in ("random", "grid"):
            raise ValueError(f"sampling must be 'random' or 'grid', got {sampling!r}.")
        if not 0.0 <= max_nodata_fraction < 1.0:
            raise ValueError(f"max_nodata_fraction must lie in [0, 1), got {max_nodata_fraction}.")
        if int(patch_size) < 1 or int(stats_patches) < 1:
            raise ValueError(f"patch_size and stats_patches must be positive; got {patch_size}, {stats_patches}.")
        super().__init__(RasterPatches, batch_size, num_workers)  # type: ignore[arg-type]
        self.patch_size = int(patch_size)
        self.length = length
        self.sampling = sampling
        self.stride = stride
        self.crs = crs
        self.res = res
        self.spatial_only = spatial_only
        self.max_nodata_fraction = max_nodata_fraction
        self.max_tries = max_tries
        self.stats_patches = int(stats_patches)
        self.stats_file = stats_file
        self.nodata_skipped = 0
        """Patches skipped for missing pixels, summed over the batches this process received."""
        for name, source in self.sources.items():
            bands = source.selected_bands(name)
            if source.mean is not None and not (len(source.mean) == len(source.std or []) == len(bands)):
                raise ValueError(
                    f"raster source {name!r}: mean and std need one value per band read ({len(bands)}: {bands}); got "
                    f"{len(source.mean)} and {len(source.std or [])}."
                )

    @property
    def modality_specs(self) -> dict[str, Modality]:
        """One modality per source: its bands read, band names and view kind (see :class:`RasterSource`)."""
        specs = {}
        for name, source in self.sources.items():
            bands = source.selected_bands(name)
            specs[name] = Modality(bands=len(bands), view=source.view_kind(name), band_names=bands)
        return specs

    def _nodata(self, name: str, dataset: RasterDataset) -> float | None:
        source = self.sources[name]
        if source.nodata is not None:
            return float(source.nodata)
        with rasterio.open(dataset.index.filepath.iloc[0]) as src:
            value = src.nodata
        if value is not None and not np.isnan(value):
            return float(value)
        if source.dataset is not None:
            warnings.warn(
                f"raster source {name!r}: its files declare no nodata value and none was given: torchgeo's "
                f"{type(source.dataset).__name__} reads pixels outside the files' footprint as 0, which will count "
                "as data. Give the source a nodata value if the data has one (or give paths instead of a dataset: "
                "such sources read missing pixels as NaN).",
                UserWarning,
                stacklevel=3,
            )
        return None

    def build_dataset(self, seed: int = 0, normalize: bool = True) -> RasterPatches:
        """Build the joined sources and the patch data set (statistics computed or read from the cache)."""
        datasets = {name: _build_dataset(name, source) for name, source in self.sources.items()}
        joined = join_sources(datasets, self.crs, self.res, self.spatial_only)
        dataset = RasterPatches(
            joined,
            datasets,
            self.patch_size,
            sampling=self.sampling,
            length=self.length,
            stride=self.stride,
            seed=seed,
            nodata={name: self._nodata(name, ds) for name, ds in datasets.items()},
            max_nodata_fraction=self.max_nodata_fraction,
            max_tries=self.max_tries,
            normalizations={name: s.normalization_kind(name) for name, s in self.sources.items()},
            normalize=normalize,
        )
        dataset.stats = self._statistics(dataset)
        return dataset

    def _cache_key(self, dataset: RasterPatches) -> str:
        described = {
            "sources": {
                name: {
                    "files": [
                        (path, os.path.getsize(path), int(os.path.getmtime(path)))
                        for path in sorted(ds.index.filepath.unique())
                        if os.path.exists(path)
                    ],
                    "bands": list(ds.bands),
                    "nodata": dataset.nodata.get(name),
                }
                for name, ds in dataset.datasets.items()
            },
            "crs": dataset.crs.to_wkt(),
            "res": list(dataset.joined.res),
            "patch_size": self.patch_size,
            "stats_patches": self.stats_patches,
            "max_nodata_fraction": self.max_nodata_fraction,
            "spatial_only": self.spatial_only,
        }
        return hashlib.sha1(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()

    def statistics_path(self, dataset: RasterPatches) -> str | None:
        """Where the statistics cache lives (``None``: not cached)."""
        if self.stats_file == "":
            return None
        if self.stats_file is not None:
            return str(self.stats_file)
        first = next(iter(dataset.datasets.values()))
        paths = first.paths
        path = str(paths if isinstance(paths, str | os.PathLike) else next(iter(paths)))
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        return os.path.join(folder, "decur_raster_stats.json")

    def _statistics(self, dataset: RasterPatches) -> dict[str, tuple[list[float], list[float]]]:
        stats = {name: (list(s.mean), list(s.std or [])) for name, s in self.sources.items() if s.mean is not None}
        needed = [name for name in dataset.names if name not in stats and dataset.normalizations[name] != "percentile"]
        if not needed:
            return stats
        path = self.statistics_path(dataset)
        key = self._cache_key(dataset)
        cache: dict[str, Any] = {}
        if path is not None and os.path.exists(path):
            try:
                with open(path) as f:
                    cache = json.load(f)
            except (OSError, ValueError):
                warnings.warn(f"cannot read the statistics cache {path}; recomputing.", UserWarning, stacklevel=3)
        if key in cache and all(name in cache[key] for name in needed):
            computed = {name: (cache[key][name]["mean"], cache[key][name]["std"]) for name in needed}
        else:
            computed = dataset.band_statistics(self.stats_patches)
            log.info("band statistics of %s from %d patches: %s", list(computed), self.stats_patches, computed)
            if path is not None:
                cache[key] = {
                    name: {"mean": m, "std": s, "bands": list(dataset.datasets[name].bands)}
                    for name, (m, s) in computed.items()
                }
                try:
                    tmp = f"{path}.{os.getpid()}.tmp"
                    with open(tmp, "w") as f:
                        json.dump(cache, f, indent=1)
                    os.replace(tmp, path)
                except OSError as error:
                    warnings.warn(
                        f"cannot write the statistics cache {path} ({error}); pass stats_file=<writable path>.",
                        UserWarning,
                        stacklevel=3,
                    )
        stats.update({name: computed[name] for name in needed})
        return stats

    def setup(self, stage: str) -> None:
        """Join the sources, build the patch set and its statistics.

        Raises:
            FileNotFoundError: a source's glob matches no file.
            ValueError: wrong band names, sources that do not overlap, or fewer patches than
                ``batch_size`` in the fit stage.
        """
        dataset = self.build_dataset(seed=self.shuffle_seed)
        if stage == "fit":
            check_enough_for_a_batch(
                "own-raster training",
                len(dataset),
                self.train_batch_size or self.batch_size,
                "raise length (random sampling) or lower patch_size",
            )
        self.train_dataset = dataset

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Count and log the skipped mostly-nodata patches; drop the per-sample count from the batch."""
        skipped = batch.pop("nodata_skipped", None)
        if skipped is not None:
            self.nodata_skipped += int(skipped.sum())
            trainer = self.trainer
            if trainer is not None and trainer.loggers and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
                for logger in trainer.loggers:
                    logger.log_metrics({"data/nodata_skipped": float(self.nodata_skipped)}, step=trainer.global_step)
        return batch
