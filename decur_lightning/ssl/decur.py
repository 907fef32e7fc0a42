"""DeCURModule: Decoupling Common and Unique Representations (paper Section 3, Algorithm 1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ..losses import DEFAULT_LAMBDA, DeCURLoss, Method, Weighting
from .base import MultimodalSSLModule

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
    """DeCUR pretraining of modality-specific encoders (paper Fig. 2, Algorithm 1), for ``M >= 2`` modalities.

    Each modality has its own encoder and projector; two views per modality are embedded and
    the loss is, with ``z_m', z_m''`` the two views' embeddings of modality ``m``,

    ``L = sum_m L_BT(z_m', z_m'') + sum_{m<n} [L_com(C(z_m', z_n')[:Kc, :Kc]) + L_uni(C(z_m', z_n')[Kc:, Kc:])]``,

    which is eq. 6 for two modalities: intra-modal Barlow Twins terms on all ``K`` dimensions
    (eq. 4, 5), and on every cross-modal correlation of first views the first ``K_c`` (common)
    dimensions pushed to identity (eq. 2) and the remaining ``K_u`` (unique) dimensions pushed
    to zero (eq. 3). More than two modalities is the paper's future work; the common dimensions
    are then common to every pair (see :func:`~decur_lightning.losses.multimodal_decur_loss`).

    Logged per step and epoch: ``loss``; ``intra_<m>``; ``common_<m>_<n>`` and ``unique_<m>_<n>``
    per pair; the mean on-diagonal cross-modal correlation of the common block
    (``common_corr_<m>_<n>``, towards 1) and of the unique block (``unique_corr_<m>_<n>``,
    towards 0); ``embedding_std_<m>`` (collapse monitor, see
    :func:`decur_lightning.ssl.base.embedding_std`).

    Args:
        common_ratio: share of common dimensions ``K_c / K`` (0.875 SAR-optical, 0.75 RGB-DEM
            and RGB-depth); ignored when ``common_dims`` is given. A mapping ``{"m-n": ratio}``
            gives one per pair.
        common_dims: ``K_c`` directly (an int, or ``{"m-n": K_c}`` for every pair).
        lambd: weight of every off-diagonal term (0.0051).
        loss_method: ``"auto"``, ``"dense"`` or ``"cheap"`` (see :mod:`decur_lightning.losses`).
        intra: keep the intra-modal terms (Table 5 ablation "w/o intra": False; then one view
            per modality is made).
        decouple: split common and unique dimensions (Table 5 ablation "w/o decoup.": False,
            all ``K`` dimensions common, no unique term).
        loss_weighting: ``"paper"`` (eq. 6) or ``"authors"``: the released code's
            ``(L_M1 + L_M2 + (L_com + L_uni) / 2) / 3`` (two modalities), to compare with
            published checkpoints.
        **kwargs: the arguments of :class:`~decur_lightning.ssl.base.MultimodalSSLModule`
            (``modalities``, ``encoder``, ``projector_dims``, views, optimiser, ...).

    Example:
        >>> import lightning as L
        >>> from decur_lightning.datamodules import SyntheticMultimodalDataModule
        >>> model = DeCURModule(encoder="resnet18", projector_dims=(256, 256))
        >>> L.Trainer(max_epochs=1).fit(model, SyntheticMultimodalDataModule())  # doctest: +SKIP
    """

    def __init__(
        self,
        common_ratio: float | Mapping[str, float] = 0.875,
        common_dims: int | Mapping[str, int] | None = None,
        lambd: float = DEFAULT_LAMBDA,
        loss_method: Method = "auto",
        intra: bool = True,
        decouple: bool = True,
        loss_weighting: Weighting = "paper",
        **kwargs: Any,
    ) -> None:
        # Without intra-modal terms one view per modality is all the loss uses.
        self.views_per_modality = 2 if intra else 1
        super().__init__(**kwargs)

    def configure_loss(self) -> None:
        hp = self.hparams
        k = self.embedding_dim
        pairs = self.encoders.pairs()
        if hp.decouple:
            self.pair_common_dims = {
                pair: resolve_common_dims(
                    k, _per_pair(hp.common_ratio, pair, "common_ratio"), _per_pair(hp.common_dims, pair, "common_dims")
                )
                for pair in pairs
            }
        else:
            self.pair_common_dims = {pair: k for pair in pairs}
        self.criterion = DeCURLoss(
            dict(self.pair_common_dims), hp.lambd, method=hp.loss_method, weighting=hp.loss_weighting
        )

    @property
    def common_dims(self) -> int:
        """``K_c``, the common-dimension count of every pair (see :meth:`common_dims_of` when they differ)."""
        values = set(self.pair_common_dims.values())
        if len(values) != 1:
            raise ValueError(
                f"The pairs have different common-dimension counts {self.pair_common_dims}: use common_dims_of(m, n)."
            )
        return next(iter(values))

    def common_dims_of(self, m: str, n: str) -> int:
        """``K_c`` of the pair of modalities ``m`` and ``n`` (either order)."""
        for pair in ((m, n), (n, m)):
            if pair in self.pair_common_dims:
                return self.pair_common_dims[pair]
        raise ValueError(f"No pair ({m!r}, {n!r}); the pairs are {list(self.pair_common_dims)}.")

    def compute_loss(self, embeddings: Mapping[str, Sequence[Tensor]]) -> dict[str, Tensor]:
        """The objective and its terms, plus the mean cross-modal correlation of each block."""
        views = {name: (zs[0], zs[1] if len(zs) > 1 else None) for name, zs in embeddings.items()}
        terms = self.criterion(views)
        out = {"loss": terms.total}
        out.update({k: v for k, v in terms.terms().items() if k != "total"})
        for (m, n), diag in terms.cross_diagonal.items():
            kc = self.pair_common_dims[(m, n)]
            diag = diag.detach()
            out[f"common_corr_{m}_{n}"] = diag[:kc].mean()
            if kc < diag.numel():
                out[f"unique_corr_{m}_{n}"] = diag[kc:].mean()
        if not self.hparams.decouple:
            out = {k: v for k, v in out.items() if not k.startswith("unique")}
        return out


def _per_pair(value: Any, pair: tuple[str, str], what: str) -> Any:
    """The value of a pair from a scalar or a ``{"m-n": value}`` mapping (either order)."""
    if not isinstance(value, Mapping):
        return value
    m, n = pair
    for key in (f"{m}-{n}", f"{n}-{m}"):
        if key in value:
            return value[key]
    raise ValueError(
        f"{what} gives no value for the pair {m}-{n}: expected keys 'm-n' for every pair, got {sorted(value)}."
    )
