"""Deformable feature visualisation (paper Section 6, Fig. 5b).

The first principal component of an RDA encoder's feature map (per image, PCA over the
channels, as in the paper's reference [12]) with the sampling points that the residual
deformable attention block learned, overlaid on the input image and on the component map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning import LightningDataModule
from matplotlib.figure import Figure
from torch import Tensor, nn

from ..models.resnet_rda import ResNetRDA
from .pairs import check_modality, require_images
from .plotting import new_figure, save_figure
from .report import _dataloader, load_ssl_module

__all__ = [
    "RDAFeaturePoints",
    "first_principal_component",
    "is_rda_encoder",
    "rda_feature_points",
    "rda_feature_points_figure",
    "rda_feature_points_for_module",
    "rda_figure_for_checkpoint",
]

RDALayer = Literal["l3", "l4"]


@dataclass
class RDAFeaturePoints:
    """What Fig. 5b shows for one encoder and a batch of images.

    Attributes:
        images: the inputs ``(N, C, H, W)``.
        principal_component: first principal component of the block's output map ``(N, h, w)``.
        points: the block's sampling points ``(N, groups, H_G, W_G, 2)`` as ``(y, x)`` in
            ``[-1, 1]`` (the ``align_corners=True`` frame of the ``h x w`` map).
        layer: ``"l3"`` or ``"l4"``, the block after ResNet layer3 / layer4.
    """

    images: Tensor
    principal_component: Tensor
    points: Tensor
    layer: str


def is_rda_encoder(encoder: nn.Module) -> bool:
    """Whether ``encoder`` has residual deformable attention blocks (a ``*_rda`` encoder)."""
    return isinstance(encoder, ResNetRDA)


def first_principal_component(feature_map: Tensor) -> Tensor:
    """Per image, the positions' scores on the top principal direction over channels.

    Each image's ``h * w`` positions are samples of a ``C``-dimensional vector; after removing
    their mean, the scores on the first right singular vector (the top principal component)
    form an ``h x w`` map. The sign, arbitrary in a PCA, is chosen so that the map correlates
    positively with the channel-mean activation.

    Args:
        feature_map: ``(N, C, h, w)``.

    Returns:
        ``(N, h, w)`` in float32.
    """
    if feature_map.ndim != 4:
        raise ValueError(f"feature_map must be (N, C, h, w); got shape {tuple(feature_map.shape)}.")
    batch, _, height, width = feature_map.shape
    samples = feature_map.detach().float().flatten(2).transpose(1, 2)  # (N, hw, C)
    centred = samples - samples.mean(dim=1, keepdim=True)
    _, _, right = torch.linalg.svd(centred, full_matrices=False)
    scores = (centred @ right[:, 0, :, None]).squeeze(-1)  # (N, hw)
    activation = samples.mean(dim=2)
    agreement = ((scores - scores.mean(1, keepdim=True)) * (activation - activation.mean(1, keepdim=True))).sum(1)
    sign = torch.where(agreement < 0, -1.0, 1.0)
    return (scores * sign[:, None]).reshape(batch, height, width)


def rda_feature_points(encoder: nn.Module, images: Tensor, layer: RDALayer = "l3") -> RDAFeaturePoints:
    """First principal component and deformable sampling points of an RDA encoder (Fig. 5b).

    Runs ``encoder`` in eval mode without gradients (its mode is restored afterwards), takes
    the output of the attention block after ResNet ``layer3`` (``"l3"``, 14x14 at 224 px) or
    ``layer4`` (``"l4"``, 7x7), and returns its first principal component
    (:func:`first_principal_component`) and the block's sampling points
    (:meth:`~decur_lightning.models.rda.ResidualDeformableAttention.attention`).

    Args:
        encoder: a ``*_rda`` encoder (:class:`~decur_lightning.models.ResNetRDA`).
        images: ``(N, C, H, W)``, normalised as for training.
        layer: ``"l3"`` or ``"l4"``.

    Example:
        >>> enc = create_encoder("resnet18_rda", in_channels=2)  # doctest: +SKIP
        >>> result = rda_feature_points(enc, torch.rand(2, 2, 64, 64))  # doctest: +SKIP
        >>> result.principal_component.shape, result.points.shape  # doctest: +SKIP
        (torch.Size([2, 4, 4]), torch.Size([2, 4, 2, 2, 2]))
    """
    if not is_rda_encoder(encoder):
        raise TypeError(
            f"rda_feature_points needs a residual deformable attention encoder (create_encoder('resnet50_rda', ...)), "
            f"got a {type(encoder).__name__}."
        )
    if layer not in ("l3", "l4"):
        raise ValueError(f"layer must be 'l3' (after ResNet layer3) or 'l4' (after layer4); got {layer!r}.")
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W); got shape {tuple(images.shape)}.")
    block = getattr(encoder, f"da_{layer}")
    captured: dict[str, Tensor] = {}
    handle = block.register_forward_hook(lambda module, inputs, output: captured.update(x=inputs[0], y=output))
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            encoder.forward_feature_maps(images)
            _, points = block.attention(captured["x"])
    finally:
        handle.remove()
        encoder.train(was_training)
    return RDAFeaturePoints(
        images=images.detach().cpu(),
        principal_component=first_principal_component(captured["y"]).cpu(),
        points=points.float().cpu(),
        layer=layer,
    )


def rda_feature_points_for_module(
    model: nn.Module, batch: Mapping[str, Tensor], layer: RDALayer = "l3", modalities: Sequence[str] | None = None
) -> dict[str, RDAFeaturePoints]:
    """:func:`rda_feature_points` for the RDA encoders of a multimodal module, by modality name.

    Args:
        model: a module with ``modalities`` and ``encoders`` (a DeCURModule or baseline).
        batch: ``{"image_<modality>": (N, C, H, W)}`` (only the analysed modalities are needed).
        layer: ``"l3"`` or ``"l4"``.
        modalities: names of the modalities to analyse (default: every modality whose encoder
            is an RDA encoder). A named modality whose encoder is not one raises a TypeError.

    Returns:
        ``{modality: result}`` in the model's order (empty when no encoder is an RDA encoder).
    """
    if modalities is None:
        names = [name for name in model.modalities if is_rda_encoder(model.encoders[name])]
    else:
        names = [check_modality(model, name) for name in modalities]
        plain = [name for name in names if not is_rda_encoder(model.encoders[name])]
        if plain:
            raise TypeError(
                f"The encoders of {plain} have no residual deformable attention (RDA encoders: "
                f"{[n for n in model.modalities if is_rda_encoder(model.encoders[n])]})."
            )
    require_images(batch, names)
    device = next(model.parameters()).device
    return {name: rda_feature_points(model.encoders[name], batch[f"image_{name}"].to(device), layer) for name in names}


def _display_image(image: Tensor, bands: Sequence[int] | None) -> tuple[np.ndarray, str | None]:
    """An ``(H, W, 3)`` or ``(H, W)`` array in ``[0, 1]`` (2-98 % stretch) and its colour map."""
    channels = image.shape[0]
    if bands is None:
        # Sentinel-2 L1C true colour is B4, B3, B2; other images with 3+ bands show their first
        # three; SAR and single bands are grey (the paper shows SAR in grey, optical in colour).
        bands = (3, 2, 1) if channels >= 13 else (0, 1, 2) if channels >= 3 else (0,)
    picked = image[list(bands)].float()
    low, high = torch.quantile(picked.flatten(), torch.tensor([0.02, 0.98]))
    picked = ((picked - low) / (high - low).clamp_min(1e-12)).clamp(0, 1).numpy()
    if picked.shape[0] == 1:
        return picked[0], "gray"
    return picked.transpose(1, 2, 0), None


def _points_in_pixels(
    points: Tensor, map_size: tuple[int, int], image_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Map ``(y, x)`` points from the feature map's ``[-1, 1]`` frame to image pixel coordinates."""
    (map_h, map_w), (image_h, image_w) = map_size, image_size
    ys = (points[..., 0].flatten() + 1) / 2 * (map_h - 1)
    xs = (points[..., 1].flatten() + 1) / 2 * (map_w - 1)
    return ((xs + 0.5) * image_w / map_w - 0.5).numpy(), ((ys + 0.5) * image_h / map_h - 0.5).numpy()


def rda_feature_points_figure(
    results: Mapping[str, RDAFeaturePoints] | RDAFeaturePoints,
    max_images: int = 4,
    rgb_bands: Mapping[str, Sequence[int]] | None = None,
) -> Figure:
    """Fig. 5b: per image (row) and modality, the input with the sampling points and the first
    principal component with the same points.

    Args:
        results: ``{modality: RDAFeaturePoints}`` (from :func:`rda_feature_points_for_module`)
            or one result.
        max_images: rows (the first images of the batch).
        rgb_bands: ``{modality: band indices}`` to show (1 band: grey, 3: colour); default:
            Sentinel-2 true colour for 13+ bands, the first three bands for 3-12, else grey.
    """
    if isinstance(results, RDAFeaturePoints):
        results = {"": results}
    if not results:
        raise ValueError("No results to plot: none of the encoders is an RDA encoder.")
    rows = min(max_images, min(r.images.shape[0] for r in results.values()))
    fig, axes = new_figure(ncols=2 * len(results), nrows=rows, width=3.0, height=3.0)
    axes = np.asarray(axes).reshape(rows, 2 * len(results))
    for column, (modality, result) in enumerate(results.items()):
        image_h, image_w = result.images.shape[-2:]
        extent = (-0.5, image_w - 0.5, image_h - 0.5, -0.5)
        for row in range(rows):
            image, cmap = _display_image(result.images[row], (rgb_bands or {}).get(modality))
            xs, ys = _points_in_pixels(
                result.points[row], tuple(result.principal_component.shape[-2:]), (image_h, image_w)
            )
            image_ax, pc_ax = axes[row, 2 * column], axes[row, 2 * column + 1]
            image_ax.imshow(image, cmap=cmap, extent=extent)
            pc_ax.imshow(result.principal_component[row].numpy(), cmap="viridis", extent=extent)
            for ax in (image_ax, pc_ax):
                ax.scatter(xs, ys, s=10, c="red", marker="o", edgecolors="white", linewidths=0.4)
                ax.set_xlim(extent[0], extent[1])
                ax.set_ylim(extent[2], extent[3])
                ax.set_xticks([])
                ax.set_yticks([])
            if row == 0:
                label = f"{modality} " if modality else ""
                image_ax.set_title(f"{label}input + points ({result.layer})")
                pc_ax.set_title(f"{label}PC1 + points ({result.layer})")
    fig.tight_layout()
    return fig


def rda_figure_for_checkpoint(
    checkpoint_path: str | Path,
    datamodule: LightningDataModule,
    out_dir: str | Path,
    *,
    split: Literal["val", "test"] = "val",
    samples: int = 4,
    layer: RDALayer = "l3",
    rgb_bands: Mapping[str, Sequence[int]] | None = None,
    device: str = "cpu",
    module_class: Any = None,
) -> Path | None:
    """Write ``rda_feature_points.png`` (Fig. 5b) for a checkpoint's RDA encoders.

    Uses the first ``samples`` images of the datamodule's ``split``. Returns the figure's path,
    or ``None`` when no encoder of the checkpoint is an RDA encoder (nothing is written).
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1; got {samples}.")
    model = load_ssl_module(checkpoint_path, module_class, device)
    names = [name for name in model.modalities if is_rda_encoder(model.encoders[name])]
    if not names:
        return None
    parts: dict[str, list[Tensor]] = {}
    count = 0
    for batch in _dataloader(datamodule, split):
        for key in (f"image_{m}" for m in names):
            parts.setdefault(key, []).append(batch[key])
        count += next(iter(parts.values()))[-1].shape[0]
        if count >= samples:
            break
    batch = {key: torch.cat(values)[:samples] for key, values in parts.items()}
    results = rda_feature_points_for_module(model, batch, layer)
    return save_figure(rda_feature_points_figure(results, samples, rgb_bands), Path(out_dir) / "rda_feature_points.png")
