"""The methods the paper compares DeCUR with (Tables 1-4), on the same shared base.

Each baseline is only its loss: encoders, projectors, views, optimiser and logging are those of
:class:`~decur_lightning.ssl.base.MultimodalSSLModule`, so switching method in a YAML config is
one line (``model.class_path``). The constructor arguments of the base (modalities, encoder,
projector, views, optimiser...) are accepted as keyword arguments. The cross-modal losses are
defined for a pair of modalities; with more than two, a baseline sums its loss over every pair
(and logs each as ``loss_<m>_<n>``), the natural generalisation that DeCUR's cross-modal terms
follow too.

=============================  ========================================================  =======
module                         loss                                                      views
=============================  ========================================================  =======
CrossModalBarlowTwinsModule    Barlow Twins between the modalities (all dims common)     1 + 1
SingleModalBarlowTwinsModule   Barlow Twins between two views of one modality (BT-SAR)   2
SimCLRCrossModule              NT-Xent / InfoNCE between the modalities, both directions 1 + 1
CLIPModule                     symmetric InfoNCE with a learnable temperature            1 + 1
VICRegCrossModule              VICReg between the modalities                             1 + 1
=============================  ========================================================  =======

Distributed runs: every loss here is computed on embeddings gathered from all ranks with
gradient (:func:`~decur_lightning.losses.gather_with_grad`), so it equals the single-process
loss on the global batch. lightly's ``NTXentLoss`` and ``VICRegLoss`` are used on the gathered
batch with their own ``gather_distributed`` off: lightly's NT-Xent gathers only negatives (exact
too, but per-rank), its VICReg gathers only for the variance/covariance terms, and its Barlow
Twins all-reduces the correlation matrix after per-rank standardisation, which changes the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss, VICRegLoss
from torch import Tensor, nn

from ..losses import DEFAULT_LAMBDA, barlow_twins_loss, gather_with_grad
from ..modalities import Modality
from .base import MultimodalSSLModule

__all__ = [
    "CLIPModule",
    "CrossModalBarlowTwinsModule",
    "SimCLRCrossModule",
    "SingleModalBarlowTwinsModule",
    "VICRegCrossModule",
    "clip_loss",
]


def _first_views(embeddings: Mapping[str, Sequence[Tensor]]) -> dict[str, Tensor]:
    """Each modality's first-view embeddings, gathered across ranks with gradient."""
    return {name: gather_with_grad(zs[0]) for name, zs in embeddings.items()}


def _over_pairs(
    embeddings: Mapping[str, Sequence[Tensor]], loss: Callable[[Tensor, Tensor], Tensor]
) -> dict[str, Tensor]:
    """``loss`` of every pair of modalities (``loss_<m>_<n>`` when more than one) and their sum as ``"loss"``."""
    z = _first_views(embeddings)
    names = list(z)
    per_pair = {f"loss_{m}_{n}": loss(z[m], z[n]) for i, m in enumerate(names) for n in names[i + 1 :]}
    out = {"loss": torch.stack(list(per_pair.values())).sum()}
    return {**out, **per_pair} if len(per_pair) > 1 else out


class CrossModalBarlowTwinsModule(MultimodalSSLModule):
    """Cross-modal Barlow Twins: the modalities are the views (paper's "Barlow Twins").

    Equals DeCUR with ``intra=False, decouple=False``: with more than two modalities, the sum
    of the Barlow Twins losses of every pair.

    Args:
        lambd: off-diagonal weight (0.0051).
        **kwargs: see :class:`~decur_lightning.ssl.base.MultimodalSSLModule`.
    """

    views_per_modality = 1

    def __init__(self, lambd: float = DEFAULT_LAMBDA, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lambd = lambd

    def compute_loss(self, embeddings: Mapping[str, Sequence[Tensor]]) -> dict[str, Tensor]:
        return _over_pairs(embeddings, lambda a, b: barlow_twins_loss(a, b, self.lambd))


class SingleModalBarlowTwinsModule(MultimodalSSLModule):
    """Barlow Twins on two views of one modality alone (the paper's "BT-SAR"); one encoder.

    The datamodule (or ``modalities``) may describe more modalities, so that a DeCUR config
    becomes this baseline by its class path alone: the one named by ``modality`` (default: the
    first) is used, and batches need only its ``image_<name>``.

    Args:
        modality: the modality to learn (default: the first).
        lambd: off-diagonal weight (0.0051).
        **kwargs: see :class:`~decur_lightning.ssl.base.MultimodalSSLModule`.
    """

    min_modalities = 1
    max_modalities = 1

    def __init__(self, modality: str | None = None, lambd: float = DEFAULT_LAMBDA, **kwargs: Any) -> None:
        self._single = modality
        super().__init__(**kwargs)
        self.lambd = lambd

    def select_modalities(self, specs: dict[str, Modality]) -> dict[str, Modality]:
        name = self._single if self._single is not None else next(iter(specs))
        if name not in specs:
            raise ValueError(f"modality={name!r} is not one of the modalities {list(specs)}.")
        return {name: specs[name]}

    def compute_loss(self, embeddings: Mapping[str, Sequence[Tensor]]) -> dict[str, Tensor]:
        ((za, zb),) = ([gather_with_grad(z) for z in zs] for zs in embeddings.values())
        return {"loss": barlow_twins_loss(za, zb, self.lambd)}


class SimCLRCrossModule(MultimodalSSLModule):
    """SimCLR across modalities (the paper's "SimCLR-cross"): NT-Xent with the modalities as views.

    lightly's ``NTXentLoss``: each sample's positive is the other modality of the same scene;
    negatives are all other embeddings of both modalities in the (global) batch; symmetric.
    With more than two modalities, the sum over every pair.

    Args:
        temperature: softmax temperature (0.1, the SSL4EO setting).
        **kwargs: see :class:`~decur_lightning.ssl.base.MultimodalSSLModule`.
    """

    views_per_modality = 1

    def __init__(self, temperature: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.criterion = NTXentLoss(temperature=temperature)

    def compute_loss(self, embeddings: Mapping[str, Sequence[Tensor]]) -> dict[str, Tensor]:
        def loss(a: Tensor, b: Tensor) -> Tensor:
            with torch.autocast(device_type=a.device.type, enabled=False):
                return self.criterion(a.float(), b.float())

        return _over_pairs(embeddings, loss)


def clip_loss(z1: Tensor, z2: Tensor, logit_scale: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE: cross-entropy of ``exp(logit_scale) * cos(z1_i, z2_j)`` both ways.

    Example:
        >>> z = torch.randn(8, 16)
        >>> float(clip_loss(z, z, torch.tensor(math.log(100.0)))) < 0.1
        True
    """
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    logits = logit_scale.float().exp() * z1 @ z2.T
    target = torch.arange(z1.shape[0], device=z1.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class CLIPModule(MultimodalSSLModule):
    """CLIP between modalities: symmetric InfoNCE with a learnable temperature (summed over pairs).

    The temperature is learned as ``logit_scale = log(1 / T)``, initialised at ``T = 0.07`` and
    clamped to ``T >= 0.01`` as in CLIP; one temperature for all pairs. It is optimised with the
    biases (no weight decay).

    Args:
        init_temperature: initial temperature (0.07).
        **kwargs: see :class:`~decur_lightning.ssl.base.MultimodalSSLModule`.
    """

    views_per_modality = 1
    MAX_LOGIT_SCALE = math.log(100.0)

    def __init__(self, init_temperature: float = 0.07, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if init_temperature <= 0:
            raise ValueError(f"init_temperature must be positive, got {init_temperature}.")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def compute_loss(self, embeddings: Mapping[str, Sequence[Tensor]]) -> dict[str, Tensor]:
        scale = self.logit_scale.clamp(max=self.MAX_LOGIT_SCALE)

        def loss(a: Tensor, b: Tensor) -> Tensor:
            with torch.autocast(device_type=a.device.type, enabled=False):
                return clip_loss(a, b, scale)

        return {**_over_pairs(embeddings, loss), "temperature": (-scale.detach()).exp()}


class VICRegCrossModule(MultimodalSSLModule):
    """VICReg between the modalities (lightly's ``VICRegLoss``: invariance 25, variance 25, covariance 1).

    With more than two modalities, the sum over every pair.

    Args:
        lambda_param, mu_param, nu_param: weights of the invariance, variance and covariance terms.
        **kwargs: see :class:`~decur_lightning.ssl.base.MultimodalSSLModule`.
    """

    views_per_modality = 1

    def __init__(
        self, lambda_param: float = 25.0, mu_param: float = 25.0, nu_param: float = 1.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.criterion = VICRegLoss(lambda_param=lambda_param, mu_param=mu_param, nu_param=nu_param)

    def compute_loss(self, embeddings: Mapping[str, Sequence[Tensor]]) -> dict[str, Tensor]:
        def loss(a: Tensor, b: Tensor) -> Tensor:
            with torch.autocast(device_type=a.device.type, enabled=False):
                return self.criterion(a.float(), b.float())

        return _over_pairs(embeddings, loss)
