"""A synthetic multimodal dataset (M >= 2 modalities) with known shared and private factors.

Generated in memory from a seed (no files, no network), it lets the quickstart run anywhere
and lets decoupling be measured: every sample carries the factor values it was rendered from.

Rendering: each latent factor ``f_j`` (uniform in [-1, 1]) owns a sinusoidal grating with its
own spatial frequency and orientation, and a per-channel loading vector for each modality that
sees it. Factors come in three groups:

* **shared** factors are seen by every modality (with different loadings: the modalities are
  different sensors of the same scene), the common information DeCUR aligns (paper Section 3);
* **private** factors are seen by one modality only (``num_private`` per modality), the unique
  information DeCUR decouples;
* optional **subset-shared** factors are seen by some modalities but not all (e.g. SAR and
  elevation both see surface roughness, optical does not), ``num_subset_shared`` per subset.

Two renderings (``rendering``):

* ``"texture"`` (default, version 0.1's data): a modality's image is
  ``0.5 + sum_j f_j * (a_j[c] * grating_j + b_j[c]) + noise`` over the factors it sees, clipped
  to [0, 1], with random signed loadings in every band. The grating phase is random per sample,
  so the factors are properties of the texture and of the band means, not of pixel positions,
  and survive crops and flips. But ``f_j * grating_j`` with a random phase only shows ``|f_j|``
  (the sign lives in the faint band means, ``b ~ 0.08``), and every band mixes every factor: a
  linear probe of the shared factors reaches R^2 of about 0.35 at best. With two modalities and
  no subsets the tensors are exactly those of version 0.1 for the same seeds.
* ``"structure"`` (the quickstart's): strong, sign-preserving structure in known bands. Each
  factor ``f_j`` sets both the brightness of its bands (``f_j``, signed) and the contrast
  ``(f_j + 1) / 2`` of its own grating (orientations 30 degrees apart, two frequencies; a flip
  maps an orientation to its mirror, so the orientations are distinct up to flips). Factors
  of one group (shared, or one modality's private ones) each have a home band (loading 1;
  0.2-0.3 in the group's other bands). Band ``c`` of a modality shows
  ``(1 - w_c) * shared structure + w_c * private structure`` with private weights ``w_c`` set by
  ``private_share`` (:func:`private_band_weights`), scaled to 0.5 +- 0.42 (no clipping before
  noise). The **share of private information** of a modality is the mean of its ``w_c``: the
  share of its bands (band-units) given to its private factors. 0: no private information (the
  modalities differ only by their loadings and noise), 0.25: a quarter of the bands (4 bands:
  the last one; 2 bands: half of the last one), 0.5: half of them (default). The truth is
  recorded per band (:attr:`SyntheticMultimodalDataset.band_truth`), so analyses can be
  checked against it (:func:`~decur_lightning.analysis.band_truth_score`).

  For a share that means the same in factors, bands and signal variance, give every factor a
  home band of its own: ``bands = num_shared + num_private`` and
  ``private_share = num_private / bands``. The decoupling benchmark
  (``examples/decoupling_benchmark.py``, ``docs/decoupling.md``) uses 4 bands per modality:
  2 shared + 2 private factors for ``private_share=0.5``, 3 + 1 for 0.25, 4 + 0 for 0 (then
  ``num_private=0``). Its common share ``1 - private_share`` is the ``common_ratio`` the data
  calls for; a linear probe on a trained resnet18's features recovers every factor at
  R^2 > 0.9 after 64 steps.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from ..augmentations import VIEW_KINDS
from ..modalities import Modality
from ._common import DescribesModalities
from .samplers import EpochSeededRandomSampler

__all__ = [
    "DEFAULT_MODALITIES",
    "DEFAULT_PRIVATE_SHARE",
    "RENDERINGS",
    "Rendering",
    "SyntheticModalities",
    "SyntheticMultimodalDataModule",
    "SyntheticMultimodalDataset",
    "private_band_weights",
]

#: How the synthetic data's modalities are given: an ordered mapping name -> band count, or
#: name -> dict of the data-side :class:`~decur_lightning.modalities.Modality` fields
#: (``bands``, required; ``view``; ``band_names``), e.g. ``{"sar": 2, "elevation": {"bands": 1, "view": "dem"}}``.
SyntheticModalities = Mapping[str, int | Mapping[str, Any]]

#: The default modalities: a 2-band "sar" and a 4-band "optical" sensor (the quickstart's).
DEFAULT_MODALITIES: dict[str, int] = {"sar": 2, "optical": 4}

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DATA_FIELDS = ("bands", "view", "band_names")
_EXAMPLE = "{'sar': 2, 'optical': 4, 'elevation': {'bands': 1, 'view': 'dem'}}"


def _identifier(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{what} names are identifiers (letters, digits, '_'; they name batch keys); got {name!r}.")
    return name


def _synthetic_specs(modalities: SyntheticModalities | None = None) -> dict[str, Modality]:
    """Check the synthetic data's ``modalities`` argument and describe each modality.

    Args:
        modalities: :data:`SyntheticModalities`; ``None``: :data:`DEFAULT_MODALITIES`.

    Returns:
        ordered name -> :class:`~decur_lightning.modalities.Modality` with ``bands``, ``view``
        (given, else the name when it is a view kind, else ``"generic"``) and ``band_names``
        (given, else ``None``).

    Raises:
        TypeError: ``modalities`` is not a mapping (e.g. the 0.1 form ``("sar", "optical")`` with
            ``channels=(2, 4)``), or a value is neither a band count nor a dict.
        ValueError: fewer than two modalities, a name that is not an identifier, a band count
            below 1, an unknown view kind, or a field that is not the data's to give.
    """
    if modalities is None:
        modalities = DEFAULT_MODALITIES
    if not isinstance(modalities, Mapping):
        raise TypeError(
            "modalities must be an ordered mapping name -> band count (or dict with 'bands', 'view', "
            f"'band_names'), e.g. {_EXAMPLE}; got {modalities!r}. (Version 0.1's modalities=('sar', "
            "'optical') with channels=(2, 4) is now {'sar': 2, 'optical': 4}: the datamodule's modality_specs, "
            "the dataset's modalities.)"
        )
    specs: dict[str, Modality] = {}
    for name, value in modalities.items():
        _identifier(name, "Modality")
        default_view = name if name in VIEW_KINDS else "generic"
        if isinstance(value, int) and not isinstance(value, bool):
            fields: dict[str, Any] = {"bands": value}
        elif isinstance(value, Mapping):
            fields = dict(value)
            extra = sorted(set(fields) - set(_DATA_FIELDS))
            if extra:
                raise ValueError(
                    f"Synthetic modality {name!r}: {extra} are not the data's to give (encoder and weights "
                    f"belong in the model's modalities); give {list(_DATA_FIELDS)}."
                )
            if "bands" not in fields:
                raise ValueError(f"Synthetic modality {name!r}: give its band count, e.g. {{'bands': 1}}.")
        else:
            raise TypeError(
                f"Synthetic modality {name!r}: expected a band count or a dict with 'bands'; got {value!r}."
            )
        bands = fields["bands"]
        if isinstance(bands, bool) or not isinstance(bands, int) or bands < 1:
            raise ValueError(f"Synthetic modality {name!r}: bands must be a positive int; got {bands!r}.")
        specs[name] = Modality(
            bands=bands, view=fields.get("view") or default_view, band_names=fields.get("band_names")
        )
    if len(specs) < 2:
        raise ValueError(
            f"The synthetic data needs at least two modalities (it is multimodal); got {list(specs)}. "
            f"Give e.g. modalities={_EXAMPLE}."
        )
    return specs


def _check_subsets(
    subset_shared: Mapping[str, Sequence[str]] | None, modalities: Sequence[str]
) -> dict[str, tuple[str, ...]]:
    """Check ``subset_shared`` (subset name -> the modalities that share its factors).

    Each subset names at least two different modalities and not all of them (factors every
    modality sees are the ``num_shared`` ones); two subsets may not name the same modalities.

    Returns:
        subset name -> member names in the order given.

    Raises:
        ValueError: an unknown or repeated modality, too few or too many members, a subset name
            that is not an identifier, or two subsets of the same modalities.
        TypeError: members not given as a list of names.
    """
    if not subset_shared:
        return {}
    if not isinstance(subset_shared, Mapping):
        raise TypeError(
            "subset_shared must be a mapping subset name -> list of modality names, e.g. "
            f"{{'sar_elevation': ['sar', 'elevation']}}; got {subset_shared!r}."
        )
    subsets: dict[str, tuple[str, ...]] = {}
    seen: dict[frozenset[str], str] = {}
    for name, members in subset_shared.items():
        _identifier(name, "Subset")
        if isinstance(members, str) or not isinstance(members, Sequence):
            raise TypeError(f"subset_shared[{name!r}] must be a list of modality names; got {members!r}.")
        members = tuple(members)
        unknown = [m for m in members if m not in modalities]
        if unknown:
            raise ValueError(f"subset_shared[{name!r}] names {unknown}, not among the modalities {list(modalities)}.")
        if len(set(members)) != len(members):
            raise ValueError(f"subset_shared[{name!r}] names a modality more than once: {list(members)}.")
        if not 2 <= len(members) < len(modalities):
            raise ValueError(
                f"subset_shared[{name!r}] = {list(members)}: a subset shares factors between at least two "
                f"modalities and not all {len(modalities)} (factors all see are num_shared)."
            )
        key = frozenset(members)
        if key in seen:
            raise ValueError(
                f"subset_shared[{name!r}] and [{seen[key]!r}] name the same modalities; use one subset "
                "and num_subset_shared for more factors."
            )
        seen[key] = name
        subsets[name] = members
    return subsets


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int; got {value!r}.")


#: How the synthetic factors become pixels: ``"texture"`` (version 0.1's faint signed grating
#: amplitudes, the default, unchanged) or ``"structure"`` (strong, sign-preserving structure
#: with shared and private factors in known bands; see :class:`SyntheticMultimodalDataset`).
Rendering = Literal["texture", "structure"]
RENDERINGS: tuple[str, ...] = get_args(Rendering)

#: Default share of private information per modality with ``rendering="structure"``.
DEFAULT_PRIVATE_SHARE = 0.5

# Grating "channels" of the structure rendering: orientations 30 degrees apart in [0, 90]
# (a flip maps an orientation theta to -theta, so only |theta| is a property of the scene) and
# two frequencies (cycles per image) further apart than random resized crops stretch them.
_ORIENTATIONS = (0.0, math.pi / 6, math.pi / 3, math.pi / 2)
_FREQUENCIES = (2.5, 5.5)
# Peak amplitude of a band's structure (0.5 +- 0.42 stays inside [0, 1] before noise).
_STRUCTURE_AMPLITUDE = 0.42
# Weight of a factor's band level (brightness, signed) beside its grating contrast.
_LEVEL = 1.5


def _check_rendering(rendering: Any) -> str:
    if rendering not in RENDERINGS:
        raise ValueError(f"rendering must be one of {RENDERINGS}; got {rendering!r}.")
    return rendering


def _check_private_share(
    share: float | Mapping[str, float] | None, rendering: str, modalities: Sequence[str]
) -> dict[str, float]:
    """Per-modality share of private information (``rendering="structure"`` only)."""
    if rendering != "structure":
        if share is not None:
            raise ValueError(
                f"private_share applies to rendering='structure' (bands of known content); got private_share={share!r} "
                f"with rendering={rendering!r}. Set rendering='structure' or leave private_share out."
            )
        return {}
    if share is None:
        share = DEFAULT_PRIVATE_SHARE
    if isinstance(share, Mapping):
        unknown = sorted(set(share) - set(modalities))
        if unknown:
            raise ValueError(f"private_share names {unknown}, not among the modalities {list(modalities)}.")
        shares = {name: share.get(name, DEFAULT_PRIVATE_SHARE) for name in modalities}
    else:
        shares = dict.fromkeys(modalities, share)
    for name, value in shares.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(
                f"private_share of {name!r} must be a number in [0, 1) (0: no private information, 0.5: half the "
                f"bands); got {value!r}."
            )
    return {name: float(value) for name, value in shares.items()}


def private_band_weights(bands: int, share: float) -> Tensor:
    """Private weight ``w_c`` of each band for a modality's share of private information.

    The private information fills the last bands: ``share * bands`` band-units, whole bands
    first (``w = 1``), then one mixed band (``0 < w < 1``); the first bands stay shared
    (``w = 0``). E.g. 4 bands: 0.25 -> ``[0, 0, 0, 1]``, 0.5 -> ``[0, 0, 1, 1]``; 2 bands: 0.25 ->
    ``[0, 0.5]``. The mean of the weights is ``share``.
    """
    remaining = share * bands
    weights = torch.zeros(bands, dtype=torch.float64)
    for c in reversed(range(bands)):
        weights[c] = min(max(remaining, 0.0), 1.0)
        remaining -= weights[c].item()
    return weights


def _structure_channels(
    num_shared: int, num_private: int, num_modalities: int, num_subsets: int, num_subset_shared: int
) -> tuple[Tensor, Tensor]:
    """(frequency, angle) of every factor's grating for ``rendering="structure"``.

    Factors of one group get distinct channels (the shared ones the first, each modality's
    private ones the next, reused across modalities since they live in different images).
    """

    def channel(k: int) -> tuple[float, float]:
        orientation = _ORIENTATIONS[k % len(_ORIENTATIONS)]
        level = k // len(_ORIENTATIONS)
        frequency = _FREQUENCIES[level % len(_FREQUENCIES)] * (1.0 + 0.15 * (level // len(_FREQUENCIES)))
        return frequency, orientation

    channels = [channel(k) for k in range(num_shared)]
    channels += [channel(num_shared + k) for _ in range(num_modalities) for k in range(num_private)]
    start = num_shared + num_private
    channels += [
        channel(start + j * num_subset_shared + k) for j in range(num_subsets) for k in range(num_subset_shared)
    ]
    if not channels:
        return torch.zeros(0), torch.zeros(0)
    freq, angle = zip(*channels)
    return torch.tensor(freq), torch.tensor(angle)


def _render_structure(
    bands: int,
    share: float,
    common: tuple[Tensor, Tensor],
    private: tuple[Tensor, Tensor],
    num_subset: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """One modality's noiseless image for ``rendering="structure"``.

    Each factor ``f`` in [-1, 1] sets the contrast ``(f + 1) / 2`` of its own grating (so the
    sign survives the random phase) and, with weight 1.5, the brightness ``f`` of its bands; a
    band's structure is the loading-weighted sum over its group (each factor's home band, the
    ``(j mod n)``-th of the ``n`` bands that show the group, loads it 1, the others 0.2-0.3;
    loadings normalised per band), scaled to a
    peak amplitude of 0.42 around 0.5; band ``c`` mixes the common structure (shared and
    subset-shared factors) and the private one as ``(1 - w_c) * common + w_c * private``
    (:func:`private_band_weights`).

    Returns:
        image ``(N, bands, H, W)``, private weights ``w`` ``(bands,)``, and the subset factors'
        part of each band's common loadings ``(bands,)``.
    """
    weights = private_band_weights(bands, share)

    def structure(factors: Tensor, gratings: Tensor, group: list[int]) -> tuple[Tensor, Tensor]:
        count = factors.shape[1]
        # Each factor has a home band among the bands that show its group (the j-th factor the
        # (j mod n)-th of them) with loading 1; the other bands see it at 0.2-0.3 (sensors
        # overlap), so every band is a mix with one dominant factor.
        loadings = 0.2 + 0.1 * torch.rand(count, bands, generator=generator, dtype=torch.float64)
        if count == 0:
            return torch.zeros(gratings.shape[0], bands, *gratings.shape[-2:]), loadings
        group = group or list(range(bands))
        for j in range(count):
            loadings[j, group[j % len(group)]] = 1.0
        loadings = loadings / loadings.sum(0, keepdim=True)
        contrast = (factors.double() + 1) / 2
        texture = torch.einsum("nf,fc,nfhw->nchw", contrast, loadings, gratings.double())
        level = (factors.double() @ loadings)[:, :, None, None]
        return (texture + _LEVEL * level) / (1 + _LEVEL), loadings

    common_structure, common_loadings = structure(*common, [c for c in range(bands) if weights[c] < 1])
    private_structure, _ = structure(*private, [c for c in range(bands) if weights[c] > 0])
    if private[0].shape[1] == 0 and bool((weights > 0).any()):
        raise ValueError(
            f"private_share={share} gives bands to private factors, but num_private=0: set num_private >= 1 or "
            "private_share=0."
        )
    mix = weights[None, :, None, None]
    image = 0.5 + _STRUCTURE_AMPLITUDE * ((1 - mix) * common_structure + mix * private_structure)
    subset_part = common_loadings[common_loadings.shape[0] - num_subset :].sum(0) if num_subset else torch.zeros(bands)
    return image.float(), weights, subset_part.double()


class SyntheticMultimodalDataset(Dataset[dict[str, Tensor]]):
    """M >= 2 modalities rendered from shared, subset-shared and modality-private latent factors.

    Each sample is a dict with ``image_<name>`` (float32 ``(bands, size, size)`` in [0, 1]) per
    modality, ``shared`` (``num_shared`` factors every modality sees), ``private_<name>``
    (``num_private`` factors only modality ``name`` sees) and, per subset, ``shared_<subset>``
    (``num_subset_shared`` factors only the subset's modalities see).

    Args:
        num_samples: dataset length.
        modalities: ordered name -> band count (or dict; :data:`SyntheticModalities`); batch keys
            ``image_<name>``. ``None``: :data:`DEFAULT_MODALITIES` (``{"sar": 2, "optical": 4}``).
        size: image side in pixels.
        num_shared: number of factors every modality sees.
        num_private: number of factors each modality sees alone.
        subset_shared: subset name -> the modalities (at least two, not all) that share its
            factors, e.g. ``{"sar_elevation": ["sar", "elevation"]}``; ``None``: no subsets.
        num_subset_shared: number of factors of each subset.
        noise: standard deviation of the additive pixel noise.
        seed: the seed of the samples (factors, phases, noise).
        render_seed: the seed of the rendering (gratings and loadings). Keep it equal across
            splits so that train and validation data come from the same "sensors".
        rendering: ``"texture"`` (default; version 0.1's data, unchanged) or ``"structure"``
            (strong sign-preserving structure in known bands; see the module docstring).
        private_share: with ``rendering="structure"``, the share of private information of
            every modality in [0, 1) (``None``: 0.5), or ``{name: share}`` (modalities left out:
            0.5). Must be ``None`` with ``"texture"``.

    Attributes:
        specs: name -> :class:`~decur_lightning.modalities.Modality` (bands, view kind).
        modalities: the names, in order.
        images: name -> ``(N, bands, size, size)`` images.
        shared: ``(N, num_shared)`` factors; private: name -> ``(N, num_private)``;
        subsets: subset name -> its modalities; subset_shared: subset name -> ``(N, num_subset_shared)``.
        band_truth: name -> ``{"shared": (bands,), "private": (bands,), "subset_shared": (bands,)}``,
            each band's share of signal from each group of factors (sums to 1 per band; see
            :attr:`SyntheticMultimodalDataModule.band_truth`).

    Example:
        >>> ds = SyntheticMultimodalDataset(num_samples=4, modalities={"sar": 2, "optical": 4, "elevation": 1},
        ...                                 subset_shared={"sar_elevation": ["sar", "elevation"]})
        >>> sorted(ds[0])  # doctest: +NORMALIZE_WHITESPACE
        ['image_elevation', 'image_optical', 'image_sar', 'private_elevation', 'private_optical',
         'private_sar', 'shared', 'shared_sar_elevation']
    """

    def __init__(
        self,
        num_samples: int = 512,
        modalities: SyntheticModalities | None = None,
        size: int = 32,
        num_shared: int = 4,
        num_private: int = 2,
        subset_shared: Mapping[str, Sequence[str]] | None = None,
        num_subset_shared: int = 2,
        noise: float = 0.05,
        seed: int = 0,
        render_seed: int = 0,
        rendering: Rendering = "texture",
        private_share: float | Mapping[str, float] | None = None,
    ) -> None:
        self.specs = _synthetic_specs(modalities)
        self.modalities = tuple(self.specs)
        self.subsets = _check_subsets(subset_shared, self.modalities)
        _check_counts(num_shared=num_shared, num_private=num_private, num_subset_shared=num_subset_shared)
        if num_samples < 1 or size < 4:
            raise ValueError(f"Need num_samples >= 1 and size >= 4; got {num_samples} and {size}.")
        self.rendering = _check_rendering(rendering)
        shares = _check_private_share(private_share, self.rendering, self.modalities)
        render = torch.Generator().manual_seed(render_seed)
        sample = torch.Generator().manual_seed(seed + 1_000_003)

        # Factor ids: shared, then num_private per modality, then num_subset_shared per subset. The
        # random draws keep version 0.1's order, so two modalities without subsets give its tensors.
        num_modalities = len(self.modalities)
        num_factors = num_shared + num_modalities * num_private + len(self.subsets) * num_subset_shared
        # Distinct frequencies/orientations per factor, so each factor is a separable texture.
        freq = 2.0 + 4.0 * torch.rand(num_factors, generator=render)
        angle = math.pi * (torch.arange(num_factors) + torch.rand(num_factors, generator=render)) / num_factors
        if self.rendering == "structure":
            freq, angle = _structure_channels(
                num_shared, num_private, num_modalities, len(self.subsets), num_subset_shared
            )
        ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        coord = (xs[None] * torch.cos(angle)[:, None, None] + ys[None] * torch.sin(angle)[:, None, None]) / size

        self.shared = torch.rand(num_samples, num_shared, generator=sample) * 2 - 1
        self.private = {
            name: torch.rand(num_samples, num_private, generator=sample) * 2 - 1 for name in self.modalities
        }
        self.subset_shared = {
            name: torch.rand(num_samples, num_subset_shared, generator=sample) * 2 - 1 for name in self.subsets
        }
        phase = 2 * math.pi * torch.rand(num_samples, num_factors, generator=sample)
        # (N, F, H, W) gratings with per-sample phase.
        gratings = torch.cos(2 * math.pi * freq[None, :, None, None] * coord[None] + phase[:, :, None, None])

        subset_start = num_shared + num_modalities * num_private
        self.images: dict[str, Tensor] = {}
        self.band_truth: dict[str, dict[str, Tensor]] = {}
        for m, (name, spec) in enumerate(self.specs.items()):
            private_start = num_shared + m * num_private
            private_ids = list(range(private_start, private_start + num_private))
            shared_ids = list(range(num_shared))
            seen = [self.shared]
            subset_ids: list[int] = []
            subset_seen: list[Tensor] = []
            for k, (subset, members) in enumerate(self.subsets.items()):
                if name in members:
                    start = subset_start + k * num_subset_shared
                    subset_ids += list(range(start, start + num_subset_shared))
                    subset_seen.append(self.subset_shared[subset])
            if self.rendering == "texture":
                factor_ids = shared_ids + private_ids + subset_ids
                factors = torch.cat([*seen, self.private[name], *subset_seen], dim=1)  # (N, F_m)
                texture = torch.randn(len(factor_ids), spec.bands, generator=render) * 0.35
                offset = torch.randn(len(factor_ids), spec.bands, generator=render) * 0.08
                g = gratings[:, factor_ids]  # (N, F_m, H, W)
                image = 0.5 + torch.einsum("nf,fc,nfhw->nchw", factors, texture, g)
                image = image + (factors @ offset)[:, :, None, None]
                # Signal variance per factor and band (factors uniform in [-1, 1]: variance 1/3; a
                # grating of random phase: mean square 1/2), for the band truth.
                power = (texture**2 / 2 + offset**2) / 3  # (F_m, bands)
                groups = {
                    "shared": power[:num_shared].sum(0),
                    "private": power[num_shared : num_shared + num_private].sum(0),
                    "subset_shared": power[num_shared + num_private :].sum(0),
                }
                total = sum(groups.values()).clamp_min(torch.finfo(torch.float32).tiny)
                self.band_truth[name] = {key: (value / total).float() for key, value in groups.items()}
            else:
                image, weights, subset_part = _render_structure(
                    spec.bands,
                    shares[name],
                    common=(torch.cat([*seen, *subset_seen], dim=1), gratings[:, shared_ids + subset_ids]),
                    private=(self.private[name], gratings[:, private_ids]),
                    num_subset=len(subset_ids),
                    generator=render,
                )
                self.band_truth[name] = {
                    "shared": ((1 - weights) * (1 - subset_part)).float(),
                    "private": weights.float(),
                    "subset_shared": ((1 - weights) * subset_part).float(),
                }
            image = image + noise * torch.randn(image.shape, generator=sample)
            self.images[name] = image.clamp_(0.0, 1.0).float()

    def __len__(self) -> int:
        return self.shared.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = {f"image_{name}": images[index] for name, images in self.images.items()}
        sample["shared"] = self.shared[index]
        sample.update({f"private_{name}": factors[index] for name, factors in self.private.items()})
        sample.update({f"shared_{name}": factors[index] for name, factors in self.subset_shared.items()})
        return sample


class SyntheticMultimodalDataModule(DescribesModalities, LightningDataModule):
    """Datamodule over :class:`SyntheticMultimodalDataset`: train / val / test from one seed.

    The three splits share the rendering (same "sensors") and draw disjoint samples. Training
    batches drop the last incomplete batch, since the loss needs batch statistics; the training
    order depends only on ``seed`` and the epoch, and the loaders are torchdata's
    ``StatefulDataLoader``, so a run resumed from a checkpoint taken at any step (also inside an
    epoch) sees the batches of an uninterrupted run.

    :attr:`modality_specs` describes the modalities (band counts, view kinds; see
    :class:`~decur_lightning.datamodules._common.DescribesModalities`), so a module fitted on
    this datamodule needs no modality arguments.

    Args:
        modality_specs: the modalities to render: ordered name -> band count, or name -> dict
            with ``bands`` and optionally ``view`` (view kind; default: the name when it is a
            kind, else ``"generic"``) and ``band_names``. At least two. Default
            ``{"sar": 2, "optical": 4}``. (Not called ``modalities``: Lightning refuses a
            datamodule hyper-parameter of the same name as a module's with another value, and
            the modules' ``modalities`` says what to build on each.)
        size, num_shared, num_private, subset_shared, num_subset_shared, noise, rendering,
            private_share: see :class:`SyntheticMultimodalDataset` (``rendering="structure"``
            for data a short run can learn, with the share of private information set by
            ``private_share``).
        num_train, num_val, num_test: split sizes.
        batch_size, num_workers: DataLoader settings.
        seed: the seed of everything.

    Example:
        >>> dm = SyntheticMultimodalDataModule(num_train=64, batch_size=16)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["image_sar"].shape, batch["image_optical"].shape
        (torch.Size([16, 2, 32, 32]), torch.Size([16, 4, 32, 32]))

    Three modalities in YAML (LightningCLI)::

        data:
          class_path: decur_lightning.datamodules.SyntheticMultimodalDataModule
          init_args:
            modality_specs: {sar: 2, optical: 4, elevation: {bands: 1, view: dem}}
            subset_shared: {sar_elevation: [sar, elevation]}
    """

    def __init__(
        self,
        modality_specs: dict[str, int | dict[str, Any]] = DEFAULT_MODALITIES,  # noqa: B006 (never mutated)
        size: int = 32,
        num_shared: int = 4,
        num_private: int = 2,
        subset_shared: dict[str, list[str]] | None = None,
        num_subset_shared: int = 2,
        noise: float = 0.05,
        rendering: Rendering = "texture",
        private_share: float | dict[str, float] | None = None,
        num_train: int = 512,
        num_val: int = 128,
        num_test: int = 128,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # Checked here, so a wrong configuration fails when the datamodule is built, not at setup.
        self._specs = _synthetic_specs(modality_specs)
        self._subsets = _check_subsets(subset_shared, tuple(self._specs))
        _check_counts(num_shared=num_shared, num_private=num_private, num_subset_shared=num_subset_shared)
        _check_private_share(private_share, _check_rendering(rendering), tuple(self._specs))
        self.save_hyperparameters()
        self.hparams["modality_specs"] = copy.deepcopy(dict(modality_specs))  # not the shared default object
        self.modalities = tuple(self._specs)
        """The modality names, in order."""
        self.datasets: dict[str, SyntheticMultimodalDataset] = {}

    @property
    def modality_specs(self) -> dict[str, Modality]:
        """Name -> :class:`~decur_lightning.modalities.Modality` (bands, view kind, band names if given)."""
        return {
            name: Modality(bands=spec.bands, view=spec.view, band_names=spec.band_names)
            for name, spec in self._specs.items()
        }

    @property
    def band_truth(self) -> dict[str, dict[str, Tensor]]:
        """Which bands carry which factors: ``{modality: {"shared": (bands,), "private": (bands,),
        "subset_shared": (bands,)}}``, each band's share of its signal from the factors every
        modality sees, from the modality's private factors, and from subset-shared factors (the
        three sum to 1 per band). The same for every split (it depends on the rendering only).

        With ``rendering="structure"`` the shares are the band's mixing weights (e.g. 2 bands,
        ``private_share=0.5``: ``shared [1, 0]``, ``private [0, 1]``); with ``"texture"`` the
        signal-variance shares implied by the random loadings (every band mixes both).
        Compared with the band importance of the common and unique outputs by
        :func:`~decur_lightning.analysis.band_truth_score`.
        """
        dataset = self.datasets.get("train") or self._make(1, 0)
        return {
            name: {key: value.clone() for key, value in truth.items()} for name, truth in dataset.band_truth.items()
        }

    def _make(self, num_samples: int, offset: int) -> SyntheticMultimodalDataset:
        hp = self.hparams
        return SyntheticMultimodalDataset(
            num_samples=num_samples,
            modalities=hp.modality_specs,
            size=hp.size,
            num_shared=hp.num_shared,
            num_private=hp.num_private,
            subset_shared=hp.subset_shared,
            num_subset_shared=hp.num_subset_shared,
            noise=hp.noise,
            seed=hp.seed * 3 + offset,
            render_seed=hp.seed,
            rendering=hp.rendering,
            private_share=hp.private_share,
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
