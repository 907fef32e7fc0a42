"""Small builders shared by the tests."""

from __future__ import annotations

from typing import Any

import torch

from decur_lightning import DeCURModule


def tiny_decur(**overrides: Any) -> DeCURModule:
    """A resnet18 DeCURModule with a 64-wide projector on 2-band 'sar' + 4-band 'optical'."""
    kwargs: dict[str, Any] = dict(
        modalities={"sar": 2, "optical": 4},
        encoder="resnet18",
        projector_dims=(64, 64),
        common_ratio=0.75,
        crop_size=32,
    )
    kwargs.update(overrides)
    return DeCURModule(**kwargs)


def tiny_batch(n: int = 4, size: int = 32, channels: tuple[int, int] = (2, 4)) -> dict[str, torch.Tensor]:
    return {
        "image_sar": torch.rand(n, channels[0], size, size),
        "image_optical": torch.rand(n, channels[1], size, size),
    }
