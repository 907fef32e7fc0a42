"""DeCURModule: Decoupling Common and Unique Representations (paper Section 3, Algorithm 1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ..augmentations import Asymmetry
from ..losses import DEFAULT_LAMBDA, DeCURLoss, Method, Weighting
from .base import MultimodalSSLModule, NanPolicy
from ..optim import OptimizerName

__all__ = ["DeCURModule", "resolve_common_dims"]


def resolve_common_dims(embedding_dim: int, common_ratio: float, common_dims: int | None) -> int:
    """Number of common dimensions ``K_c`` from an explicit count or a ratio of ``K``."""
    if common_dims is not None:
        if not 0 < common_dims <= embedding_dim:
            raise ValueError(
                f"common_dims must satisfy 0 < common_dims <= {embedding_dim} (the embedding size: "
                f"projector_dims[-1], or the encoders' feature width without projector); got {common_dims}."
            )
        return int(common_dims)
    if not 0 < common_ratio <= 1:
        raise ValueError(
            f"common_ratio must lie in (0, 1]; got {common_ratio}. The paper uses 0.875 for "
            "SAR-optical and 0.75 for RGB-DEM and RGB-depth."
        )
    return max(1, int(round(common_ratio * embedding_dim)))


class DeCURModule(MultimodalSSLModule):
    """DeCUR pretraining of two modality-specific encoders (paper Fig. 2, Algorithm 1).

    Each modality has its own encoder and projector; two views per modality are embedded and
    the loss of eq. 6 is ``L_com + L_uni + L_M1 + L_M2``: intra-modal Barlow Twins terms on all
    ``K`` dimensions (eq. 4, 5), and on the cross-modal correlation of ``(z1', z2')`` the first
    ``K_c`` (common) dimensions pushed to identity (eq. 2) and the remaining ``K_u`` (unique)
    dimensions pushed to zero (eq. 3).

    Logged per step and epoch: ``loss`` and the terms ``intra1, intra2, common, unique``; the
    mean on-diagonal cross-modal correlation of the common block (``common_corr``, towards 1)
    and of the unique block (``unique_corr``, towards 0); ``embedding_std_<modality>`` (collapse
    monitor, see :func:`decur_lightning.ssl.base.embedding_std`).

    Args:
        common_ratio: share of common dimensions ``K_c / K`` (0.875 SAR-optical, 0.75 RGB-DEM
            and RGB-depth); ignored when ``common_dims`` is given.
        common_dims: ``K_c`` directly.
        lambd: weight of every off-diagonal term (0.0051).
        loss_method: ``"auto"``, ``"dense"`` or ``"cheap"`` (see :mod:`decur_lightning.losses`).
        intra: keep the intra-modal terms ``L_M1 + L_M2`` (Table 5 ablation "w/o intra": False;
            then one view per modality is made).
        decouple: split common and unique dimensions (Table 5 ablation "w/o decoup.": False,
            all ``K`` dimensions common, no unique term).
        loss_weighting: ``"paper"`` (eq. 6) or ``"authors"``: the released code's
            ``(L_M1 + L_M2 + (L_com + L_uni) / 2) / 3``, to compare with published checkpoints.
        **others: see :class:`~decur_lightning.ssl.base.MultimodalSSLModule`.

    Example:
        >>> import lightning as L
        >>> from decur_lightning.datamodules import SyntheticMultimodalDataModule
        >>> model = DeCURModule("resnet18", "resnet18", in_channels1=2, in_channels2=4,
        ...                     modality1="sar", modality2="optical", projector_dims=(256, 256))
        >>> L.Trainer(max_epochs=1).fit(model, SyntheticMultimodalDataModule())  # doctest: +SKIP
    """

    def __init__(
        self,
        encoder1: str = "resnet50",
        encoder2: str = "resnet50",
        in_channels1: int = 2,
        in_channels2: int = 13,
        modality1: str = "s1",
        modality2: str = "s2",
        weights1: str | None = None,
        weights2: str | None = None,
        projector_dims: Sequence[int] = (8192, 8192, 8192),
        common_ratio: float = 0.875,
        common_dims: int | None = None,
        lambd: float = DEFAULT_LAMBDA,
        loss_method: Method = "auto",
        intra: bool = True,
        decouple: bool = True,
        loss_weighting: Weighting = "paper",
        augmentation1: str | nn.Module = "auto",
        augmentation2: str | nn.Module = "auto",
        crop_size: int | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        optimizer: OptimizerName = "lars",
        lr: float = 0.2,
        lr_bias: float = 0.0048,
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        warmup_epochs: float = 0.0,
        nan_policy: NanPolicy = "raise",
        collapse_threshold: float = 0.1,
        channels_last: bool = False,
        compile_encoders: bool = False,
        encoder_kwargs: dict[str, Any] | None = None,
        view_asymmetry: Asymmetry = "byol",
    ) -> None:
        super().__init__(
            encoder1=encoder1,
            encoder2=encoder2,
            in_channels1=in_channels1,
            in_channels2=in_channels2,
            modality1=modality1,
            modality2=modality2,
            weights1=weights1,
            weights2=weights2,
            projector_dims=projector_dims,
            augmentation1=augmentation1,
            augmentation2=augmentation2,
            crop_size=crop_size,
            crop_scale=crop_scale,
            optimizer=optimizer,
            lr=lr,
            lr_bias=lr_bias,
            weight_decay=weight_decay,
            momentum=momentum,
            warmup_epochs=warmup_epochs,
            nan_policy=nan_policy,
            collapse_threshold=collapse_threshold,
            channels_last=channels_last,
            compile_encoders=compile_encoders,
            encoder_kwargs=encoder_kwargs,
            view_asymmetry=view_asymmetry,
        )
        embedding_dim = self.embedding_dim
        self.common_dims = resolve_common_dims(embedding_dim, common_ratio, common_dims) if decouple else embedding_dim
        # Without intra-modal terms one view per modality is all the loss uses.
        self.views_per_modality = 2 if intra else 1
        self.criterion = DeCURLoss(self.common_dims, lambd, method=loss_method, intra=intra, weighting=loss_weighting)

    def compute_loss(self, *embeddings: Tensor) -> dict[str, Tensor]:
        """Eq. 6 and its terms, plus the mean cross-modal correlation of each block.

        ``embeddings`` are ``(z1a, z1b, z2a, z2b)``, or ``(z1a, z2a)`` with ``intra=False``.
        """
        if self.criterion.intra:
            z1a, z1b, z2a, z2b = embeddings
        else:
            (z1a, z2a), z1b, z2b = embeddings, None, None
        terms = self.criterion(z1a, z1b, z2a, z2b)
        diag = terms.cross_diagonal.detach()
        out = {
            "loss": terms.total,
            "intra1": terms.intra1,
            "intra2": terms.intra2,
            "common": terms.common,
            "unique": terms.unique,
            "common_corr": diag[: self.common_dims].mean(),
        }
        if self.common_dims < diag.numel():
            out["unique_corr"] = diag[self.common_dims :].mean()
        return out
