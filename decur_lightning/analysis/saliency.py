"""Spatial and spectral saliency of the common and unique representations (paper Section 7,
Fig. 6; Appendix D, Algorithm 2 steps 3-5).

For each modality, the projector embedding is reduced to two outputs: the mean of its common
dimensions (output 0) and the mean of its unique dimensions (output 1)
(:class:`CommonUniqueOutput`). Attributions of each output give one "common" and one "unique"
saliency map per modality:

- spatial: GradCAM (captum :class:`~captum.attr.LayerGradCam`) on the deepest encoder stage
  whose maps are at least 4 x 4 for the data's image size (the last stage at the paper's
  224 px; an earlier one at small sizes, :func:`select_target_layer`), upsampled to the input
  size; per sample, the overlap score of two modalities' maps (:func:`saliency_overlap`) is
  counted for the common and for the unique output, for every pair (Fig. 6a). Samples whose
  maps cannot locate anything (zero or constant, :func:`degenerate_maps`) are left out of the
  statistics and counted;
- spectral: Integrated Gradients (captum :class:`~captum.attr.IntegratedGradients`) averaged
  per input band and normalised (:func:`band_importance`, Fig. 6b); on data with known band
  content, :func:`band_truth_score` checks it against the truth. On the quickstart's synthetic
  data this importance scores near chance, trained or not (the block mean it attributes mixes
  dimensions of both signs); :func:`~decur_lightning.analysis.band_permutation_importance`
  (which bands each block's information comes from) finds the known bands.

captum is an optional dependency: ``pip install decur-lightning[analysis]``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from .pairs import check_modality, modality_mapping, model_pairs, pair_common_dims, require_images
from .plotting import COLORS, new_figure

__all__ = [
    "COMMON",
    "MIN_MAP_SIZE",
    "OUTPUT_NAMES",
    "UNIQUE",
    "CommonUniqueOutput",
    "SaliencyResult",
    "TargetLayer",
    "band_importance",
    "band_importance_figure",
    "band_truth_score",
    "default_target_layer",
    "degenerate_maps",
    "gradcam",
    "integrated_gradients",
    "modality_common_dims",
    "overlap_histogram_figure",
    "saliency_analysis",
    "saliency_examples_figure",
    "saliency_overlap",
    "select_target_layer",
    "stage_layers",
]

#: Output index of the mean of the common dimensions (Algorithm 2: ``target=0``).
COMMON = 0
#: Output index of the mean of the unique dimensions (Algorithm 2: ``target=1``).
UNIQUE = 1
#: Names of the two outputs, in output order.
OUTPUT_NAMES: tuple[str, str] = ("common", "unique")

_CAPTUM_HINT = "Saliency maps need captum, an optional dependency: pip install decur-lightning[analysis]"


def _captum_attr() -> Any:
    """``captum.attr``, imported lazily with an install hint when it is missing."""
    try:
        import captum.attr
    except ImportError as err:
        raise ImportError(_CAPTUM_HINT) from err
    return captum.attr


class CommonUniqueOutput(nn.Module):
    """One modality's encoder and projector reduced to ``(N, 2)``: mean common, mean unique.

    Algorithm 2 (``gradcam_vis``): ``z = BN(f(x))``, ``out = [mean(z[:, :K_c]), mean(z[:, K_c:])]``.
    Attributing output :data:`COMMON` (0) or :data:`UNIQUE` (1) gives the "common" or "unique"
    saliency of the modality.

    ``BN`` here is a fixed per-dimension standardisation with the ``mean`` and ``std`` of
    reference embeddings (what a batch norm does in eval mode): unlike batch statistics it
    keeps every sample's output independent of the rest of the batch, which per-sample
    GradCAM maps and the completeness of Integrated Gradients need. Without ``mean``/``std``
    the raw projector embeddings are averaged (the authors' released notebooks).

    Args:
        encoder: the modality's encoder (``model.encoders[name]``).
        projector: the modality's projector.
        common_dims: ``K_c``; needs ``0 < K_c < K`` (there must be unique dimensions).
        mean, std: optional ``(K,)`` statistics of reference embeddings.
    """

    def __init__(
        self,
        encoder: nn.Module,
        projector: nn.Module,
        common_dims: int,
        mean: Tensor | None = None,
        std: Tensor | None = None,
    ) -> None:
        super().__init__()
        if common_dims < 1:
            raise ValueError(f"common_dims must be at least 1; got {common_dims}.")
        if (mean is None) != (std is None):
            raise ValueError("Give both mean and std of the reference embeddings, or neither.")
        self.encoder = encoder
        self.projector = projector
        self.common_dims = int(common_dims)
        self.register_buffer("mean", None if mean is None else mean.detach().float().flatten())
        self.register_buffer("std", None if std is None else std.detach().float().flatten())

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        modality: str,
        reference: Tensor | None = None,
        common_dims: int | None = None,
    ) -> CommonUniqueOutput:
        """The head of the modality named ``modality`` of a DeCUR model.

        Args:
            model: a :class:`~decur_lightning.ssl.DeCURModule` (``encoders``, ``projectors``
                and common dimensions).
            modality: the modality's name.
            reference: optional ``(M, K)`` embeddings of this modality (e.g. from
                :func:`~decur_lightning.analysis.collect_embeddings`) whose per-dimension mean and
                standard deviation standardise the embedding, as ``BN`` in Algorithm 2.
            common_dims: ``K_c``; default: the model's ``K_c`` of every pair with this
                modality (:func:`modality_common_dims`).
        """
        name = check_modality(model, modality)
        if common_dims is None:
            common_dims = modality_common_dims(model, name)
        embedding_dim = getattr(model, "embedding_dim", None)
        if embedding_dim is not None and common_dims >= embedding_dim:
            raise ValueError(
                f"The model has common_dims={common_dims} of {embedding_dim} dimensions for modality {name!r}, so no "
                "unique dimensions: there is no 'unique' output to attribute. Use a model trained with common_ratio < 1."
            )
        mean = std = None
        if reference is not None:
            reference = reference.detach().float()
            mean = reference.mean(0)
            std = (reference.var(0, unbiased=False) + 1e-5).sqrt()
            device = next(model.parameters()).device
            mean, std = mean.to(device), std.to(device)
        return cls(model.encoders[name], model.projectors[name], common_dims, mean, std)

    def forward(self, x: Tensor) -> Tensor:
        z = self.projector(self.encoder(x)).float()
        if self.mean is not None:
            z = (z - self.mean) / self.std
        if self.common_dims >= z.shape[1]:
            raise ValueError(
                f"common_dims={self.common_dims} leaves no unique dimension in a {z.shape[1]}-dimensional embedding."
            )
        return torch.stack([z[:, : self.common_dims].mean(1), z[:, self.common_dims :].mean(1)], dim=1)


def modality_common_dims(model: nn.Module, modality: str) -> int:
    """``K_c`` of a modality's embedding: the common-dimension count of every pair it belongs to.

    Raises a ValueError for models without common dimensions (baselines) and where the pairs
    of the modality have different counts (``common_dims={"m-n": ...}``): the common and unique
    outputs of its embedding then depend on the pair; pass ``common_dims`` explicitly.
    """
    name = check_modality(model, modality)
    if getattr(model, "common_dims_of", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no common dimensions: common/unique saliency needs a DeCUR model "
            "(DeCURModule), whose first common_dims embedding dimensions are common."
        )
    counts = {pair: pair_common_dims(model, *pair) for pair in model_pairs(model) if name in pair}
    values = set(counts.values())
    if len(values) != 1:
        raise ValueError(
            f"The pairs of modality {name!r} have different common-dimension counts {counts}, so its common and "
            "unique outputs depend on the pair. Pass common_dims={'<modality>': K_c} to choose one."
        )
    return int(values.pop())  # type: ignore[arg-type]


#: Smallest side (in feature-map pixels) of a GradCAM map that the automatic layer choice accepts.
MIN_MAP_SIZE = 4


def stage_layers(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """The encoder's spatial stages, deepest first, as ``(name, module)``.

    ResNet (timm/torchvision): ``layer4`` .. ``layer1`` (with residual deformable attention,
    ``da_l4`` / ``da_l3`` in place of ``layer4`` / ``layer3``: their outputs are the stage outputs);
    MiT: ``norm4`` .. ``norm1``; other timm models: ``stages.<i>``, last first. Empty when none is
    found.
    """
    found: list[tuple[str, nn.Module]] = []
    for index in (4, 3, 2, 1):
        for name in (f"da_l{index}", f"layer{index}", f"norm{index}"):
            layer = getattr(encoder, name, None)
            if isinstance(layer, nn.Module):
                found.append((name, layer))
                break
    if found:
        return found
    stages = getattr(encoder, "stages", None)
    if isinstance(stages, (nn.Sequential, nn.ModuleList)):
        return [(f"stages.{i}", stages[i]) for i in reversed(range(len(stages)))]
    return []


def default_target_layer(encoder: nn.Module) -> nn.Module:
    """The encoder's last spatial stage (the paper's GradCAM layer for 224 px inputs).

    ``da_l4`` (ResNet with residual deformable attention), ``layer4`` (timm/torchvision
    ResNet), ``norm4`` (MiT) or the last of ``stages`` (ConvNeXt and other timm models). At
    small input sizes its maps can be 1 x 1: :func:`select_target_layer` picks by map size.
    """
    stages = stage_layers(encoder)
    if stages:
        return stages[0][1]
    raise ValueError(
        f"Cannot find the last convolutional stage of a {type(encoder).__name__} encoder. Pass layer= "
        "(a module of the encoder, or its name such as 'layer4'): GradCAM needs a layer whose output "
        "is a spatial map (N, C, h, w). Token-based encoders (ViT) have none."
    )


@dataclass
class TargetLayer:
    """The layer GradCAM is taken on, and the size of its maps.

    Attributes:
        name: the layer's name in the encoder (``"layer2"``), or its class name when a module
            was given.
        module: the layer.
        map_size: ``(h, w)`` of its output for the inputs it was chosen on (``None`` when the
            output is not a spatial map).
    """

    name: str
    module: nn.Module
    map_size: tuple[int, int] | None

    @property
    def degenerate(self) -> bool:
        """True when the maps cannot locate anything (a 1 x 1 map upsamples to a constant)."""
        return self.map_size is None or min(self.map_size) < 2


@torch.no_grad()
def _output_sizes(encoder: nn.Module, layers: Sequence[nn.Module], inputs: Tensor) -> list[tuple[int, int] | None]:
    """Spatial size of each layer's output on one input sample (eval mode, restored afterwards)."""
    sizes: dict[int, tuple[int, int] | None] = {}
    hooks = []
    for index, layer in enumerate(layers):

        def hook(_module: nn.Module, _args: Any, output: Any, index: int = index) -> None:
            output = output[0] if isinstance(output, (tuple, list)) else output
            sizes[index] = tuple(output.shape[-2:]) if isinstance(output, Tensor) and output.ndim == 4 else None

        hooks.append(layer.register_forward_hook(hook))
    states = {m: m.training for m in encoder.modules()}
    encoder.eval()
    try:
        parameter = next(encoder.parameters())
        encoder(inputs[:1].detach().to(device=parameter.device, dtype=parameter.dtype))
    finally:
        for h in hooks:
            h.remove()
        for m, training in states.items():
            m.training = training
    return [sizes.get(index) for index in range(len(layers))]


def select_target_layer(
    encoder: nn.Module, inputs: Tensor, layer: nn.Module | str | None = None, min_size: int = MIN_MAP_SIZE
) -> TargetLayer:
    """The GradCAM layer for ``inputs`` of this size: the deepest stage whose maps are at least
    ``min_size x min_size`` (or ``layer`` when given), with its map size.

    The paper attributes the last stage at 224 px (7 x 7 maps). At small inputs the last stages
    shrink to 2 x 2 or 1 x 1 (a ResNet at 32 px: ``layer1`` 8 x 8, ``layer2`` 4 x 4, ``layer3``
    2 x 2, ``layer4`` 1 x 1), where GradCAM cannot locate anything; the choice then moves to an
    earlier stage (``layer2`` at 32 px). When no stage reaches ``min_size``, the one with the
    largest maps is taken, and :attr:`TargetLayer.degenerate` says when even it has no extent.

    Args:
        encoder: the modality's encoder.
        inputs: ``(N, C, H, W)`` inputs of the size to attribute (one sample is run).
        layer: a module or name to use instead of choosing (its map size is still measured).
        min_size: smallest accepted map side.
    """
    if layer is not None:
        module = _resolve_layer(encoder, layer)
        name = (
            layer
            if isinstance(layer, str)
            else next((n for n, m in encoder.named_modules() if m is module), type(module).__name__)
        )
        (size,) = _output_sizes(encoder, [module], inputs)
        return TargetLayer(name, module, size)
    stages = stage_layers(encoder)
    if not stages:
        default_target_layer(encoder)  # raises the explanatory error
    sizes = _output_sizes(encoder, [module for _, module in stages], inputs)
    for (name, module), size in zip(stages, sizes):
        if size is not None and min(size) >= min_size:
            return TargetLayer(name, module, size)
    spatial = [(min(size), index) for index, size in enumerate(sizes) if size is not None]
    if not spatial:
        name, module = stages[0]
        return TargetLayer(name, module, None)
    _, index = max(spatial, key=lambda item: (item[0], -item[1]))
    return TargetLayer(stages[index][0], stages[index][1], sizes[index])


def _resolve_layer(encoder: nn.Module, layer: nn.Module | str | None) -> nn.Module:
    if layer is None:
        return default_target_layer(encoder)
    if isinstance(layer, str):
        try:
            return encoder.get_submodule(layer)
        except AttributeError as err:
            raise ValueError(f"The encoder has no submodule {layer!r}: {err}") from err
    return layer


@contextlib.contextmanager
def _attribution_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode (batch norm with running statistics) and gradients on, restored afterwards.

    Works inside ``torch.no_grad`` and ``torch.inference_mode`` blocks (e.g. Lightning's
    validation hooks).
    """
    states = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for m, training in states.items():
            m.training = training


def _prepare_input(x: Tensor, module: nn.Module) -> Tensor:
    parameter = next(module.parameters())
    return x.detach().clone().to(device=parameter.device, dtype=parameter.dtype).requires_grad_(True)


def gradcam(
    head: nn.Module, inputs: Tensor, target: int, layer: nn.Module | str | None = None, upsample: bool = True
) -> Tensor:
    """GradCAM maps ``(N, H, W)`` of output ``target`` of ``head`` (Algorithm 2, ``gradcam_vis``).

    captum's :class:`~captum.attr.LayerGradCam` on ``layer`` (default: the deepest stage of
    ``head.encoder`` whose maps are at least 4 x 4 for these inputs, :func:`select_target_layer`;
    the last stage at 128 px and above), with the ReLU of GradCAM applied (maps are
    non-negative), bilinearly upsampled to the input size (``upsample=False`` keeps the layer's
    ``h x w``). The head runs in eval mode.

    Args:
        head: a :class:`CommonUniqueOutput` (or any module mapping ``(N, C, H, W)`` to outputs).
        inputs: ``(N, C, H, W)`` images of the head's modality.
        target: :data:`COMMON` or :data:`UNIQUE`.
        layer: the attributed layer: a module, its name in ``head.encoder`` (``"layer3"``), or
            ``None`` for :func:`select_target_layer`'s choice.
    """
    attr = _captum_attr()
    layer = select_target_layer(head.encoder, inputs).module if layer is None else _resolve_layer(head.encoder, layer)
    with _attribution_mode(head):
        x = _prepare_input(inputs, head)
        maps = attr.LayerGradCam(head, layer).attribute(x, target=target, relu_attributions=True)
    if maps.ndim != 4:
        raise ValueError(
            f"GradCAM of {type(layer).__name__} has shape {tuple(maps.shape)}; it needs a layer with a "
            "spatial output (N, C, h, w). Pass another layer."
        )
    if maps.shape[-2:].numel() == 1:
        warnings.warn(
            f"The GradCAM map of {type(layer).__name__} is 1 x 1 for {tuple(x.shape[-2:])} px inputs, so it "
            "carries no spatial information: pass a shallower layer (e.g. layer='layer3') or larger images.",
            stacklevel=2,
        )
    if upsample:
        maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return maps[:, 0].detach()


def saliency_overlap(map_m: Tensor, map_n: Tensor) -> Tensor:
    """Per-sample overlap score of two modalities' saliency maps (Algorithm 2, ``gradcam_stat``).

    ``norm(att1) x norm(att2)`` of Algorithm 2: each map is flattened and scaled to unit L2 norm, and the
    score is their inner product, i.e. the cosine similarity of the two maps. For non-negative
    (GradCAM) maps it lies in [0, 1]: 1 when the maps are equal up to scale, 0 when they have
    disjoint support. It is undefined (NaN) when a map is zero everywhere, which GradCAM's ReLU
    gives when an output has no positive evidence in the image; statistics skip those samples
    and count them. Maps of different sizes are compared at the size of ``map_m`` (bilinear
    resampling of ``map_n``).

    Args:
        map_m, map_n: ``(N, H, W)`` maps of the same samples.

    Returns:
        ``(N,)`` scores.
    """
    if map_m.ndim != 3 or map_n.ndim != 3 or map_m.shape[0] != map_n.shape[0]:
        raise ValueError(
            f"Expected two (N, H, W) map batches of the same N; got {tuple(map_m.shape)} and {tuple(map_n.shape)}."
        )
    map_m, map_n = map_m.float(), map_n.float().to(map_m.device)
    if map_m.shape[-2:] != map_n.shape[-2:]:
        map_n = F.interpolate(map_n[:, None], size=map_m.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    flat_m, flat_n = map_m.flatten(1), map_n.flatten(1)
    norm_m, norm_n = flat_m.norm(dim=1), flat_n.norm(dim=1)
    score = (flat_m * flat_n).sum(1) / (norm_m * norm_n)
    return score.masked_fill((norm_m == 0) | (norm_n == 0), float("nan"))


def degenerate_maps(maps: Tensor, tolerance: float = 1e-6) -> Tensor:
    """``(N,)`` True where a saliency map cannot locate anything: zero everywhere (GradCAM's ReLU
    found no positive evidence; the overlap is undefined) or constant over the image (e.g. an
    upsampled 1 x 1 map, whose overlap with any constant map is exactly 1).

    Args:
        maps: ``(N, H, W)`` maps.
        tolerance: a map is constant when ``max - min <= tolerance * max``.
    """
    if maps.ndim != 3:
        raise ValueError(f"Expected (N, H, W) maps; got {tuple(maps.shape)}.")
    flat = maps.detach().float().flatten(1)
    high, low = flat.amax(1), flat.amin(1)
    return (high <= 0) | ((high - low) <= tolerance * high.abs())


def integrated_gradients(
    head: nn.Module,
    inputs: Tensor,
    target: int,
    baseline: float | Tensor = 0.0,
    n_steps: int = 50,
    method: str = "gausslegendre",
    internal_batch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Integrated Gradients ``(N, C, H, W)`` of output ``target`` and their convergence deltas.

    captum's :class:`~captum.attr.IntegratedGradients` from ``baseline`` (default: a zero
    image) to ``inputs``, in eval mode. By completeness, the attributions of a sample sum to
    ``head(x)[target] - head(baseline)[target]`` up to the returned ``(N,)`` convergence delta
    (it shrinks with ``n_steps``).
    """
    attr = _captum_attr()
    with _attribution_mode(head):
        x = _prepare_input(inputs, head)
        baselines = baseline.to(x.device).expand_as(x) if isinstance(baseline, Tensor) else float(baseline)
        attributions, delta = attr.IntegratedGradients(head).attribute(
            x,
            baselines=baselines,
            target=target,
            n_steps=n_steps,
            method=method,
            internal_batch_size=internal_batch_size,
            return_convergence_delta=True,
        )
    return attributions.detach(), delta.detach()


def band_importance(attributions: Tensor) -> Tensor:
    """Normalised importance of every input band, ``(N, C)`` (Algorithm 2, ``IG_stat``; Fig. 6b).

    The Integrated Gradients map of each band is averaged over the image (Algorithm 2), taken in
    absolute value and normalised to sum to 1 over the bands of each sample. By completeness
    the band mean is proportional to the band's contribution to the output change, so the
    score is the band's share of it (when all bands push the output the same way).
    """
    if attributions.ndim != 4:
        raise ValueError(f"Expected attributions (N, C, H, W); got {tuple(attributions.shape)}.")
    scores = attributions.float().mean(dim=(2, 3)).abs()
    return scores / scores.sum(1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


@dataclass
class SaliencyResult:
    """Per-sample saliency statistics of a DeCUR model (Fig. 6), per modality and pair of modalities.

    Attributes:
        modalities: the modality names, in the model's order.
        overlap: ``{(m, n): {"common": (N,), "unique": (N,)}}`` GradCAM overlap scores of every
            pair of modalities (NaN where a map is zero everywhere, see :func:`saliency_overlap`).
        band_importance: ``{modality: {"common": (N, C), "unique": (N, C)}}`` normalised IG band
            importances.
        relative_delta: ``{modality: {"common": (N,), "unique": (N,)}}`` IG convergence delta
            divided by ``|output - baseline output|`` (a check of the integration).
        examples: the first samples' images and GradCAM maps for plotting:
            ``{"images": {modality: (E, C, H, W)}, "maps": {modality: {"common": (E, H, W), ...}}}``.
        layers: ``{modality: TargetLayer}``: the GradCAM layer of each encoder and its map size.
        degenerate: ``{(m, n): {"common": (N,) bool, "unique": ...}}``: samples whose overlap
            score says nothing (a map of either modality zero everywhere or constant, see
            :func:`degenerate_maps`); statistics leave them out and count them.
    """

    modalities: tuple[str, ...]
    overlap: dict[tuple[str, str], dict[str, Tensor]]
    band_importance: dict[str, dict[str, Tensor]]
    relative_delta: dict[str, dict[str, Tensor]]
    examples: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, TargetLayer] = field(default_factory=dict)
    degenerate: dict[tuple[str, str], dict[str, Tensor]] = field(default_factory=dict)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The pairs of modalities, in order."""
        return list(self.overlap)

    @property
    def num_samples(self) -> int:
        return int(next(iter(self.relative_delta.values()))["common"].numel())


def saliency_analysis(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    max_samples: int = 64,
    reference: Mapping[str, Tensor] | None = None,
    layers: nn.Module | str | Mapping[str, nn.Module | str | None] | None = None,
    ig_steps: int = 50,
    ig_internal_batch_size: int | None = None,
    num_examples: int = 4,
    common_dims: int | Mapping[str, int] | None = None,
) -> SaliencyResult:
    """GradCAM overlap per pair and IG band importance per modality over up to ``max_samples``
    samples (Fig. 6).

    Args:
        model: a DeCUR model (``encoders``, ``projectors``, ``common_dims_of``, ``modalities``).
        batches: dicts with the model's ``image_<modality>`` keys (un-augmented data).
        max_samples: number of samples to attribute.
        reference: optional ``{modality: (M, K)}`` embeddings whose statistics standardise the
            embeddings (``BN`` of Algorithm 2; see :class:`CommonUniqueOutput`), e.g. the output
            of :func:`~decur_lightning.analysis.collect_embeddings`.
        layers: GradCAM layer: one for every encoder, or ``{modality: layer}`` (a module, a
            name such as ``"layer3"``, or ``None``: the deepest stage with maps of at least 4 x 4
            for the data's image size, :func:`select_target_layer`). The choice is recorded in
            :attr:`SaliencyResult.layers`.
        ig_steps: Integrated Gradients steps.
        ig_internal_batch_size: inputs per forward pass inside IG (bounds memory; ``None``: the
            data batch size, so IG needs the memory of one training-size batch).
        num_examples: samples kept in ``examples`` for :func:`saliency_examples_figure`.
        common_dims: ``K_c`` of every modality, or ``{modality: K_c}``; default: the model's
            (:func:`modality_common_dims`).
    """
    modalities = tuple(model.modalities)
    pairs = model_pairs(model)
    if not pairs:
        raise ValueError(f"Saliency overlap needs two or more modalities; the model has {list(modalities)}.")
    layer_of = modality_mapping(model, layers, "layers")
    reference_of = modality_mapping(model, reference, "reference")
    counts = modality_mapping(model, common_dims, "common_dims")
    heads = {m: CommonUniqueOutput.from_model(model, m, reference_of[m], counts[m]) for m in modalities}
    chosen: dict[str, TargetLayer] = {}
    maps: dict[str, dict[str, list[Tensor]]] = {m: {name: [] for name in OUTPUT_NAMES} for m in modalities}
    importance: dict[str, dict[str, list[Tensor]]] = {m: {name: [] for name in OUTPUT_NAMES} for m in modalities}
    deltas: dict[str, dict[str, list[Tensor]]] = {m: {name: [] for name in OUTPUT_NAMES} for m in modalities}
    images: dict[str, list[Tensor]] = {m: [] for m in modalities}
    count = 0
    for batch in batches:
        remaining = max_samples - count
        if remaining <= 0:
            break
        require_images(batch, modalities)
        for modality in modalities:
            x = batch[f"image_{modality}"][:remaining]
            if modality not in chosen:
                chosen[modality] = select_target_layer(heads[modality].encoder, x, layer_of[modality])
                if chosen[modality].degenerate:
                    warnings.warn(
                        f"The GradCAM maps of {modality!r} at layer {chosen[modality].name!r} are "
                        f"{chosen[modality].map_size} for {tuple(x.shape[-2:])} px inputs: they carry no spatial "
                        "information, so the overlap statistics are left out (pass a shallower layer or larger images).",
                        stacklevel=2,
                    )
            head, layer = heads[modality], chosen[modality].module
            if sum(t.shape[0] for t in images[modality]) < num_examples:
                images[modality].append(x[:num_examples].detach().cpu())
            for target, name in enumerate(OUTPUT_NAMES):
                maps[modality][name].append(gradcam(head, x, target, layer).cpu())
                attributions, delta = integrated_gradients(
                    head, x, target, n_steps=ig_steps, internal_batch_size=ig_internal_batch_size or x.shape[0]
                )
                importance[modality][name].append(band_importance(attributions).cpu())
                deltas[modality][name].append(_relative_delta(head, x, target, delta).cpu())
        count += min(remaining, batch[f"image_{modalities[0]}"].shape[0])
    if count == 0:
        raise ValueError("No samples to attribute: the dataloader is empty (or max_samples < 1).")
    cat = {m: {name: torch.cat(maps[m][name]) for name in OUTPUT_NAMES} for m in modalities}
    flat = {
        m: {name: degenerate_maps(cat[m][name]) | chosen[m].degenerate for name in OUTPUT_NAMES} for m in modalities
    }
    return SaliencyResult(
        modalities=modalities,
        layers=chosen,
        degenerate={(m, n): {name: flat[m][name] | flat[n][name] for name in OUTPUT_NAMES} for m, n in pairs},
        overlap={
            (m, n): {name: saliency_overlap(cat[m][name], cat[n][name]) for name in OUTPUT_NAMES} for m, n in pairs
        },
        band_importance={m: {name: torch.cat(importance[m][name]) for name in OUTPUT_NAMES} for m in modalities},
        relative_delta={m: {name: torch.cat(deltas[m][name]) for name in OUTPUT_NAMES} for m in modalities},
        examples={
            "images": {m: torch.cat(images[m])[:num_examples] for m in modalities},
            "maps": {m: {name: cat[m][name][:num_examples] for name in OUTPUT_NAMES} for m in modalities},
        }
        if num_examples > 0
        else {},
    )


@torch.no_grad()
def _relative_delta(head: nn.Module, x: Tensor, target: int, delta: Tensor) -> Tensor:
    """``|delta| / |head(x) - head(0)|`` for output ``target`` (eval mode)."""
    states = {m: m.training for m in head.modules()}
    head.eval()
    try:
        device = next(head.parameters()).device
        x = x.detach().float().to(device)
        change = head(x)[:, target] - head(torch.zeros_like(x))[:, target]
    finally:
        for m, training in states.items():
            m.training = training
    return delta.abs().to(change.device) / change.abs().clamp_min(1e-12)


def overlap_histogram_figure(
    overlap: Mapping[str, Tensor],
    bins: int = 20,
    title: str | None = None,
    degenerate: Mapping[str, Tensor] | None = None,
    note: str | None = None,
) -> Figure:
    """Histogram of one pair's per-sample GradCAM overlap scores, common vs unique (Fig. 6a).

    Args:
        overlap: ``{"common": (N,), "unique": (N,)}``, e.g. ``result.overlap[("sar", "optical")]``
            of :func:`saliency_analysis`.
        bins: histogram bins over [0, 1].
        title: axes title.
        degenerate: ``{"common": (N,) bool, ...}`` samples to leave out (maps without spatial
            information, ``result.degenerate[pair]``); counted in the legend.
        note: a line under the title (e.g. which layer the maps come from).

    Undefined scores (NaN, a map zero everywhere) and degenerate samples are left out and
    counted in the legend; when no sample is left, the axes say so instead of drawing bars.
    """
    if any(isinstance(key, tuple) for key in overlap):
        raise ValueError(
            "overlap_histogram_figure draws one pair: pass result.overlap[(m, n)], not the mapping of every pair "
            f"({list(overlap)})."
        )
    fig, ax = new_figure()
    edges = np.linspace(0.0, 1.0, bins + 1)
    shown = 0
    for name in OUTPUT_NAMES:
        if name not in overlap:
            continue
        values = overlap[name].detach().float().cpu().numpy()
        undefined = ~np.isfinite(values)
        flat = np.zeros_like(undefined)
        if degenerate is not None and name in degenerate:
            flat = degenerate[name].detach().cpu().numpy().astype(bool) & ~undefined
        finite = values[~undefined & ~flat]
        shown += finite.size
        label = f"{name} (mean {finite.mean():.2f}, n={finite.size})" if finite.size else f"{name}"
        if undefined.any():
            label += f", {int(undefined.sum())} undefined"
        if flat.any():
            label += f", {int(flat.sum())} without spatial information"
        ax.hist(finite, bins=edges, color=COLORS[name], alpha=0.6, label=label)
    if shown == 0:
        ax.text(
            0.5,
            0.5,
            "no overlap statistic: every map is degenerate\n(zero or constant; see statistics.json)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="tab:red",
        )
    ax.set_xlabel("overlap score of the two modalities' GradCAM maps")
    ax.set_ylabel("number of samples")
    heading = title or "Spatial saliency statistics"
    ax.set_title(f"{heading}\n{note}" if note else heading, fontsize=10 if note else None)
    ax.legend()
    fig.tight_layout()
    return fig


def band_truth_score(
    importance: Mapping[str, Mapping[str, Tensor]], truth: Mapping[str, Mapping[str, Tensor]]
) -> dict[str, Any]:
    """How well band importance (Fig. 6b) finds the bands that carry each output's factors.

    Data with a known answer (:attr:`SyntheticMultimodalDataModule.band_truth
    <decur_lightning.datamodules.SyntheticMultimodalDataModule.band_truth>`) says, per band, which
    share of its signal comes from shared factors and which from the modality's private ones.
    The common output should draw on the shared bands, the unique output on the private ones.
    Per modality and output, with ``p`` the mean normalised importance (sums to 1) and ``t`` the
    truth (``"shared"`` for common, ``"private"`` for unique):

    - ``on_truth = sum_c p_c t_c``: the importance mass on the right bands;
    - ``chance = mean_c t_c``: the same for importance spread evenly;
    - ``skill = (on_truth - chance) / (max_c t_c - chance)``: 0 at chance, 1 when all the
      importance sits on the band(s) with most of the output's factors, negative when the
      wrong bands rank higher; ``None`` when every band has the same truth (nothing to find);
    - ``ranking``: the share of band pairs with different truth whose importance is ordered as
      their truth (0.5 at chance).

    Returns:
        ``{"per_modality": {modality: {"common": {...}, "unique": {...}}}, "skill": mean skill,
        "ranking": mean ranking}`` (means over the defined entries; ``None`` if none).
    """
    pairs = {"common": "shared", "unique": "private"}
    per_modality: dict[str, Any] = {}
    skills: list[float] = []
    rankings: list[float] = []
    for modality, outputs in importance.items():
        if modality not in truth:
            continue
        per_modality[modality] = {}
        for output, truth_key in pairs.items():
            if output not in outputs:
                continue
            p = outputs[output].detach().double().cpu().mean(0)
            t = torch.as_tensor(truth[modality][truth_key]).double().cpu()
            if p.shape != t.shape:
                raise ValueError(
                    f"band truth of {modality!r} has {t.numel()} bands, the importance {p.numel()}: give the truth of "
                    "the data the importance was computed on."
                )
            on_truth, chance, best = float((p * t).sum()), float(t.mean()), float(t.max())
            skill = None if best - chance < 1e-9 else (on_truth - chance) / (best - chance)
            ordered = [
                (1.0 if p[c] > p[d] else 0.5 if p[c] == p[d] else 0.0)
                for c in range(t.numel())
                for d in range(t.numel())
                if t[c] > t[d] + 1e-9
            ]
            ranking = float(np.mean(ordered)) if ordered else None
            per_modality[modality][output] = {
                "truth": truth_key,
                "on_truth": on_truth,
                "chance": chance,
                "skill": skill,
                "ranking": ranking,
            }
            if skill is not None:
                skills.append(skill)
            if ranking is not None:
                rankings.append(ranking)
    return {
        "per_modality": per_modality,
        "skill": float(np.mean(skills)) if skills else None,
        "ranking": float(np.mean(rankings)) if rankings else None,
    }


def band_importance_figure(
    importance: Mapping[str, Mapping[str, Tensor]],
    band_names: Mapping[str, Sequence[str]] | None = None,
    title: str = "Spectral saliency statistics",
    ylabel: str = "normalised saliency score",
) -> Figure:
    """Mean (bars) and standard deviation (error bars) of the normalised band importances,
    common vs unique, one panel per modality (Fig. 6b; also for
    :func:`~decur_lightning.analysis.band_permutation_importance`, whose rows are permutations)."""
    modalities = list(importance)
    fig, axes = new_figure(ncols=len(modalities), width=5.0)
    axes = np.atleast_1d(axes)
    for ax, modality in zip(axes, modalities):
        num_bands = next(iter(importance[modality].values())).shape[1]
        names = list((band_names or {}).get(modality) or [f"b{i + 1}" for i in range(num_bands)])
        if len(names) != num_bands:
            raise ValueError(f"band_names[{modality!r}] has {len(names)} names for {num_bands} bands.")
        positions = np.arange(num_bands)
        for offset, name in zip((-0.2, 0.2), OUTPUT_NAMES):
            scores = importance[modality][name].detach().float().cpu()
            ax.bar(
                positions + offset,
                scores.mean(0).numpy(),
                0.4,
                yerr=scores.std(0, unbiased=False).numpy(),
                color=COLORS[name],
                alpha=0.8,
                capsize=2,
                label=name,
            )
        ax.set_xticks(positions)
        ax.set_xticklabels(names, rotation=45 if num_bands > 6 else 0)
        ax.set_xlabel(f"{modality} bands")
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _display_image(image: Tensor) -> np.ndarray:
    """A grey image in [0, 1] (band mean, 2-98 % stretch) for overlays."""
    grey = image.float().mean(0)
    low, high = torch.quantile(grey.flatten(), torch.tensor([0.02, 0.98])).tolist()
    return ((grey - low) / max(high - low, 1e-8)).clamp(0, 1).numpy()


def saliency_examples_figure(
    result: SaliencyResult, max_examples: int = 4, pair: tuple[str, str] | None = None
) -> Figure:
    """Per sample: the images of a pair of modalities with their common and unique GradCAM
    maps overlaid, titled with the pair's overlap scores (the visual counterpart of Fig. 6a).

    Args:
        result: :func:`saliency_analysis` output with examples.
        max_examples: rows (the first samples).
        pair: the two modalities ``(m, n)`` (default: the first pair).
    """
    if not result.examples:
        raise ValueError("The saliency result holds no example samples: run saliency_analysis with num_examples >= 1.")
    pair = result.pairs[0] if pair is None else tuple(pair)  # type: ignore[assignment]
    if pair not in result.overlap:
        raise ValueError(f"No pair {pair}; the pairs are {result.pairs}.")
    images, maps = result.examples["images"], result.examples["maps"]
    num = min(max_examples, *(images[m].shape[0] for m in pair))
    fig, axes = new_figure(ncols=6, nrows=num, width=2.0, height=2.1)
    axes = np.atleast_2d(axes)
    for row in range(num):
        for block, modality in enumerate(pair):
            picture = _display_image(images[modality][row])
            axes[row, 3 * block].imshow(picture, cmap="gray")
            axes[row, 3 * block].set_title(modality, fontsize=8)
            for col, name in enumerate(OUTPUT_NAMES, start=1):
                ax = axes[row, 3 * block + col]
                ax.imshow(picture, cmap="gray")
                ax.imshow(maps[modality][name][row].numpy(), cmap="jet", alpha=0.5)
                score = float(result.overlap[pair][name][row])
                text = "undefined" if np.isnan(score) else f"{score:.2f}"
                ax.set_title(f"{modality} {name}\noverlap {text}", fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig
