"""The shared multimodal self-supervised LightningModule.

Encoders, projectors, on-device views, optimiser and logging live here; a method (DeCUR or a
baseline) only defines :meth:`MultimodalSSLModule.compute_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import ProjectionHead
from lightning import Callback, LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ..augmentations import RGB_KINDS, VIEW_KINDS, Asymmetry, ViewPair, make_view_pair
from ..models.encoders import create_encoder
from ..monitors import default_callbacks
from ..nonfinite import NanPolicy, NonFiniteGuard, finite_flag
from ..optim import OptimizerName, build_optimizer, warmup_schedule

__all__ = ["MultimodalSSLModule", "build_projector"]


def build_projector(in_dim: int, dims: Sequence[int]) -> nn.Module:
    """Barlow Twins projector: ``Linear-BN-ReLU`` for all but the last layer, then ``Linear``.

    The paper uses ``dims = (8192, 8192, 8192)`` (Section 4). Linear layers have no bias, as in
    Barlow Twins and the authors' code (the loss standardises every dimension, so a bias on the
    last layer would cancel). Empty ``dims`` gives no projector (``nn.Identity``): the loss then
    acts on the encoder features themselves (the "w/o projector" ablation of Fig. 3b).
    """
    dims = [int(d) for d in dims]
    if not dims:
        return nn.Identity()
    if min(dims) < 1:
        raise ValueError(f"projector_dims must be positive sizes (or empty for no projector), got {dims}.")
    blocks = []
    widths = [in_dim, *dims]
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        last = i == len(dims) - 1
        bn = None if last else nn.BatchNorm1d(d_out)
        act = None if last else nn.ReLU(inplace=True)
        blocks.append((d_in, d_out, bn, act, False))
    return ProjectionHead(blocks)


class MultimodalSSLModule(LightningModule):
    """Modality-specific encoders and projectors trained on augmented views.

    A batch is a dict with ``image_<modality1>`` and ``image_<modality2>`` tensors
    ``(N, C, H, W)`` in [0, 1]. In each step, :attr:`views_per_modality` views per modality are
    made on the device under ``no_grad`` (:mod:`decur_lightning.augmentations`), each view goes
    through its modality's encoder and projector (separate passes, as Algorithm 1), and the
    method's :meth:`compute_loss` turns the embedding batches (modality-major order:
    ``z1a, z1b, z2a, z2b`` for two views) into a dict of scalar terms with the key ``"loss"``.
    A method is a subclass that defines :meth:`compute_loss` (and, if it needs them,
    :attr:`views_per_modality` and :attr:`two_modalities_required`).

    Args:
        encoder1, encoder2: encoder names (timm names, or see
            :func:`decur_lightning.models.create_encoder`).
        in_channels1, in_channels2: band counts of the two modalities.
        modality1, modality2: modality names; the batch keys are ``image_<name>``. Single-modal
            methods take ``modality2=None`` (no second encoder is built).
        weights1, weights2: optional pretrained encoder weights (path, torchgeo weight enum
            or its name).
        projector_dims: widths of the projector layers; the last is the embedding size ``K``.
            Empty (``[]``) means no projector: the loss acts on the encoder features, and ``K``
            is the encoders' feature width (Fig. 3b ablation; the encoders must then have the
            same width).
        augmentation1, augmentation2: view pipeline per modality: a kind (``"optical"``,
            ``"rgb"``, ``"aerial_rgb"``, ``"indoor_rgb"``, ``"sar"``, ``"dem"``, ``"hha"``,
            ``"generic"``), ``"auto"`` (the
            datamodule's ``modality_kinds``, else the modality name if it is a kind, else
            ``"generic"``), a :class:`~decur_lightning.augmentations.ViewPair`, or any module
            applied twice.
        crop_size: side of the views in pixels (the paper: 224 from 264 px images); ``None``
            keeps the input size.
        crop_scale: area range of the random resized crop.
        optimizer: ``"lars"`` (paper, ResNets) or ``"adamw"`` (paper, MiT/ViT with lr 1e-4).
        lr: learning rate of the weights (LARS: 0.2 at batch 256; Barlow Twins scales it
            linearly with the global batch size).
        lr_bias: LARS learning rate of biases and norm parameters (0.0048).
        weight_decay: weight decay of the weights (1e-6).
        momentum: LARS momentum (0.9).
        warmup_epochs: linear warm-up length before the cosine decay (paper: 0).
        nan_policy: what to do when a training batch, an embedding or the loss is not finite:
            ``"raise"`` (default; names the step and the modality), ``"skip"`` (no optimiser
            step for that batch on any rank; counted and logged as ``train/skipped_batches``),
            or ``"off"`` (no check: saves two host synchronisations per step). Inputs are
            checked before the forward pass, so a skipped bad batch leaves no trace in the
            batch-norm statistics; a non-finite loss from finite inputs (divergence) is
            detected after the forward pass.
        collapse_threshold: warn once when a modality's embedding standard deviation
            (:func:`embedding_std`, about 1 when healthy) falls below this value.
        channels_last: run the encoders in channels-last memory format (faster convolutions
            on recent GPUs with bf16; see ``benchmarks/run.py`` for the measured effect).
        compile_encoders: compile the encoders with ``torch.compile`` (in place, so state-dict
            keys and checkpoints are unchanged); the first steps pay the compilation.
        encoder_kwargs: extra keyword arguments for every encoder
            (:func:`~decur_lightning.models.create_encoder`), e.g. the residual deformable
            attention switches of ``*_rda`` encoders.
        view_asymmetry: ``"byol"`` (default; the paper follows BYOL: blur p=1.0 / 0.1 and
            solarize p=0 / 0.2 for views 1 / 2) or ``"symmetric"`` (the released code: blur
            p=0.5 and solarize p=0.2 on both views). Only for views built from a kind.

    Second-view sources: when a batch also holds ``image2_<modality>`` (same shape as
    ``image_<modality>``), view 2 of that modality is made from it instead of from
    ``image_<modality>`` (e.g. another season of the same location, as the authors'
    SSL4EO-S12 pretraining does; see ``SSL4EOS12MMDataModule(season_per_view=True)``).
    """

    #: Views made of each modality per step (2 for DeCUR and Barlow Twins, 1 for cross-modal baselines).
    views_per_modality: int = 2
    #: Whether the method needs both modalities (single-modal baselines set it False).
    two_modalities_required: bool = True

    def __init__(
        self,
        encoder1: str = "resnet50",
        encoder2: str = "resnet50",
        in_channels1: int = 2,
        in_channels2: int = 13,
        modality1: str = "s1",
        modality2: str | None = "s2",
        weights1: str | None = None,
        weights2: str | None = None,
        projector_dims: Sequence[int] = (8192, 8192, 8192),
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
        super().__init__()
        self.nonfinite = NonFiniteGuard(nan_policy)
        if modality1 == modality2:
            raise ValueError(f"modality1 and modality2 must differ (they name batch keys); got {modality1!r} twice.")
        if modality2 is None and self.two_modalities_required:
            raise ValueError(f"{type(self).__name__} learns across two modalities: set modality2.")
        for name, aug in (("augmentation1", augmentation1), ("augmentation2", augmentation2)):
            if isinstance(aug, str) and aug != "auto" and aug not in VIEW_KINDS:
                raise ValueError(f"{name}={aug!r}: expected 'auto', one of {VIEW_KINDS}, or an nn.Module.")
        if optimizer not in ("lars", "adamw"):
            raise ValueError(f"optimizer must be 'lars' or 'adamw', got {optimizer!r}.")
        augmentations = {"augmentation1": augmentation1, "augmentation2": augmentation2}
        self.save_hyperparameters(ignore=[k for k, v in augmentations.items() if isinstance(v, nn.Module)])
        self.modalities: tuple[str, ...] = (modality1,) if modality2 is None else (modality1, modality2)
        self.in_channels: tuple[int, ...] = (in_channels1, in_channels2)[: len(self.modalities)]
        extra = dict(encoder_kwargs or {})
        self.encoder1 = create_encoder(encoder1, in_channels1, weights1, **extra)
        self.projector1 = build_projector(self.encoder1.num_features, projector_dims)
        if modality2 is not None:
            self.encoder2 = create_encoder(encoder2, in_channels2, weights2, **extra)
            self.projector2 = build_projector(self.encoder2.num_features, projector_dims)
        for encoder in self.encoders:
            if channels_last:
                encoder.to(memory_format=torch.channels_last)
            if compile_encoders:
                encoder.compile()
        self.embedding_dim = self._embedding_dim(projector_dims)
        self._augmentations: list[str | nn.Module] = [augmentation1, augmentation2][: len(self.modalities)]
        # Views hold no learnable state; kept out of the state dict (built at the first batch).
        self._views: list[ViewPair] | None = None
        # Views are drawn from a seed per batch (not from the global RNG), so that a resumed run
        # makes the same views as an uninterrupted one. Saved in checkpoints.
        self.view_seed = int(torch.initial_seed() % 2**31)
        self._collapse_warned = False
        self._warned_small_val_batch = False

    def _embedding_dim(self, projector_dims: Sequence[int]) -> int:
        """``K``: the projector's output width, or the encoders' feature width without projector."""
        if len(projector_dims):
            return int(projector_dims[-1])
        widths = {name: int(encoder.num_features) for name, encoder in zip(self.modalities, self.encoders)}
        if len(set(widths.values())) > 1:
            raise ValueError(
                f"projector_dims=[] (no projector) makes the loss compare encoder features directly, but the "
                f"encoders' feature widths differ: {widths}. Use encoders of the same width, or a projector."
            )
        return next(iter(widths.values()))

    # ------------------------------------------------------------------ models
    def forward(self, x: Tensor, modality: int | str = 1) -> Tensor:
        """Encoder features ``(N, num_features)`` of one modality (the transferable representation)."""
        index = self._modality_index(modality)
        return self.encoders[index](x)

    def embed(self, x: Tensor, modality: int | str = 1) -> Tensor:
        """Projector embeddings ``(N, K)`` of one modality (the space the loss acts on)."""
        index = self._modality_index(modality)
        return self.projectors[index](self.encoders[index](x))

    @property
    def encoders(self) -> list[nn.Module]:
        """The encoders, one per modality (``encoder1``, ``encoder2``)."""
        return [getattr(self, f"encoder{i + 1}") for i in range(len(self.modalities))]

    @property
    def projectors(self) -> list[nn.Module]:
        """The projectors, one per modality (``projector1``, ``projector2``)."""
        return [getattr(self, f"projector{i + 1}") for i in range(len(self.modalities))]

    def _modality_index(self, modality: int | str) -> int:
        if modality in self.modalities:
            return self.modalities.index(modality)
        if isinstance(modality, int) and 1 <= modality <= len(self.modalities):
            return modality - 1
        raise ValueError(
            f"modality must be one of {list(range(1, len(self.modalities) + 1))} or {self.modalities}; got {modality!r}."
        )

    # ------------------------------------------------------------------ views
    def _resolve_kind(self, index: int) -> str:
        name = self.modalities[index]
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        kinds = getattr(datamodule, "modality_kinds", None) or {}
        if name in kinds:
            return kinds[name]
        return name if name in VIEW_KINDS else "generic"

    def _build_views(self, inputs: Sequence[Tensor]) -> list[ViewPair]:
        pairs = []
        for index, (aug, x) in enumerate(zip(self._augmentations, inputs)):
            if isinstance(aug, ViewPair):
                pairs.append(aug)
            elif isinstance(aug, nn.Module):
                pairs.append(ViewPair(aug, aug))
            else:
                kind = self._resolve_kind(index) if aug == "auto" else aug
                if kind in RGB_KINDS and x.shape[1] != 3:
                    raise ValueError(
                        f"augmentation{index + 1}={kind!r} (RGB colour jitter) needs 3 bands, but "
                        f"image_{self.modalities[index]} has {x.shape[1]}. Use 'optical' for multispectral data."
                    )
                size = self.hparams.crop_size or min(x.shape[-2:])
                pairs.append(make_view_pair(kind, size, tuple(self.hparams.crop_scale), self.hparams.view_asymmetry))
        return pairs

    def make_views(self, batch: dict[str, Tensor], seed: int | None = None) -> tuple[Tensor, ...]:
        """Views of a batch in modality-major order (``x1a, x1b, x2a, x2b``), made under ``no_grad``.

        :attr:`views_per_modality` views per modality. With ``seed``, the random draws come
        from that seed and the global RNG is left as it was.
        """
        inputs = self.get_inputs(batch)
        return tuple(x for views in self._views_of(inputs, seed, self.get_second_sources(batch, inputs)) for x in views)

    def _views_of(
        self, inputs: Sequence[Tensor], seed: int | None, second: Sequence[Tensor | None] | None = None
    ) -> list[tuple[Tensor, ...]]:
        if self._views is None:
            self._views = self._build_views(inputs)
        second = second if second is not None else [None] * len(inputs)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            views = [pair(x, x2) for pair, x, x2 in zip(self._views, inputs, second)]
        return [v[: self.views_per_modality] for v in views]

    def get_second_sources(self, batch: dict[str, Tensor], inputs: Sequence[Tensor]) -> list[Tensor | None]:
        """The ``image2_<modality>`` tensors of a batch (sources of view 2), ``None`` where absent.

        Only used when the method makes two views per modality. Each must have the shape of its
        ``image_<modality>``.
        """
        if self.views_per_modality < 2:
            return [None] * len(inputs)
        second: list[Tensor | None] = []
        for name, x in zip(self.modalities, inputs):
            x2 = batch.get(f"image2_{name}")
            if x2 is not None and x2.shape != x.shape:
                raise ValueError(
                    f"image2_{name} (the source of view 2) has shape {tuple(x2.shape)}, but image_{name} has "
                    f"{tuple(x.shape)}: both views of a modality need images of the same bands and size."
                )
            second.append(x2)
        return second

    def _batch_seed(self, stage: str, batch_idx: int) -> int:
        stage_id = {"train": 0, "val": 1, "test": 2}.get(stage, 3)
        rank = self.global_rank if self._trainer is not None else 0
        key = (self.view_seed, stage_id, self.current_epoch if self._trainer is not None else 0, batch_idx, rank)
        return hash(key) % 2**63

    def get_inputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
        """The modality tensors of a batch, checked against the encoders' expectations."""
        if not isinstance(batch, dict):
            raise TypeError(
                f"Expected a batch dict with keys {self._keys()}; got {type(batch).__name__}. "
                "Datamodules of this package return such dicts."
            )
        missing = [key for key in self._keys() if key not in batch]
        if missing:
            raise KeyError(
                f"The batch has no {missing}; it has keys {sorted(batch)}. Set modality1/modality2 to "
                "the names in the batch keys image_<name>."
            )
        inputs = tuple(batch[key] for key in self._keys())
        for key, x, channels in zip(self._keys(), inputs, self.in_channels):
            if x.ndim != 4 or x.shape[1] != channels:
                raise ValueError(
                    f"{key} has shape {tuple(x.shape)}, but its encoder expects (N, {channels}, H, W). "
                    f"Set in_channels{self._keys().index(key) + 1}={x.shape[1] if x.ndim == 4 else '?'} "
                    "or select the right bands in the datamodule."
                )
        if self.training and inputs[0].shape[0] < 2:
            raise ValueError(
                f"Got a training batch of {inputs[0].shape[0]} sample: the projector's batch norm and "
                "the loss need batch statistics. Use batch_size >= 2 and drop_last=True."
            )
        return inputs

    def _keys(self) -> list[str]:
        return [f"image_{name}" for name in self.modalities]

    # ------------------------------------------------------------------ steps
    def compute_loss(self, *embeddings: Tensor) -> dict[str, Tensor]:
        """The method's loss terms from the embedding batches; must contain ``"loss"``.

        ``embeddings`` are in modality-major order: ``z1a, z1b, z2a, z2b`` with two views per
        modality, ``z1, z2`` with one.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss.")

    def shared_step(self, batch: dict[str, Tensor], stage: str, batch_idx: int = 0) -> Tensor | None:
        """Views, one encoder+projector pass per view, the method's loss, checks and logging."""
        inputs = self.get_inputs(batch)
        if stage != "train" and inputs[0].shape[0] < 2:
            return self._skip_small_eval_batch(stage)
        check = self.nonfinite.enabled
        second = self.get_second_sources(batch, inputs)
        # Inputs are checked before the forward pass, so a bad batch never reaches the batch-norm statistics.
        if check:
            input_flags = [(f"the input {key}", finite_flag(x)) for key, x in zip(self._keys(), inputs)]
            input_flags += [
                (f"the input image2_{name}", finite_flag(x2)) for name, x2 in zip(self.modalities, second) if x2 is not None
            ]
            if not self.nonfinite.check(self, stage, batch_idx, input_flags):
                return None
        views = self._views_of(inputs, self._batch_seed(stage, batch_idx), second)
        embeddings = [[self._embed_view(x, index + 1) for x in modality_views] for index, modality_views in enumerate(views)]
        terms = self.compute_loss(*(z for zs in embeddings for z in zs))
        if check:
            flags = [
                (f"the embeddings of '{name}'", torch.stack([finite_flag(z) for z in zs]).all())
                for name, zs in zip(self.modalities, embeddings)
            ]
            if not self.nonfinite.check(self, stage, batch_idx, [*flags, ("the loss", finite_flag(terms["loss"]))]):
                return None
        batch_size = inputs[0].shape[0]
        on_step = stage == "train"
        self.log(f"{stage}/loss", terms["loss"], prog_bar=True, batch_size=batch_size, on_step=on_step, on_epoch=True)
        for name, value in terms.items():
            if name != "loss":
                self.log(f"{stage}/{name}", value, batch_size=batch_size, on_step=on_step, on_epoch=True)
        stds = [embedding_std(zs[0]) for zs in embeddings]
        for name, std in zip(self.modalities, stds):
            self.log(f"{stage}/embedding_std_{name}", std, batch_size=batch_size, on_step=on_step, on_epoch=True)
        if stage == "train":
            self._check_collapse(stds)
        return terms["loss"]

    def _embed_view(self, x: Tensor, index: int) -> Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            return self.embed(x, index)
        except (RuntimeError, ValueError, AssertionError) as err:  # timm asserts on input sizes
            name = self.modalities[index - 1]
            raise ValueError(
                f"The encoder of modality '{name}' ({self.hparams[f'encoder{index}']}) failed on views of "
                f"shape {tuple(x.shape)}: {err}\nIf the views are too small for this encoder, raise "
                "crop_size (or the image size of the datamodule)."
            ) from err

    @property
    def skipped_batches(self) -> int:
        """Training batches skipped under ``nan_policy="skip"``."""
        return self.nonfinite.skipped_batches

    def _check_collapse(self, stds: Sequence[Tensor]) -> None:
        if self._collapse_warned or self._trainer is None:
            return
        if self.global_step % max(1, self.trainer.log_every_n_steps) != 0:
            return
        values = torch.stack([s.detach() for s in stds]).tolist()
        low = [(name, v) for name, v in zip(self.modalities, values) if v < self.hparams.collapse_threshold]
        if low:
            self._collapse_warned = True
            detail = ", ".join(f"'{name}': {v:.3f}" for name, v in low)
            rank_zero_warn(
                f"Embedding collapse at step {self.global_step}: embedding std {detail} is below "
                f"{self.hparams.collapse_threshold} (about 1 when healthy). Likely causes: a learning rate "
                "too high for the batch size, too few unique or common dimensions, or views that are "
                "too easy (check the augmentations)."
            )

    def _skip_small_eval_batch(self, stage: str) -> None:
        if not self._warned_small_val_batch:
            self._warned_small_val_batch = True
            rank_zero_warn(
                f"A {stage} batch of 1 sample has no batch statistics; its loss is not computed. "
                "Choose a batch size that divides the split to evaluate every sample."
            )
        return None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        return self.shared_step(batch, "train", batch_idx)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        return self.shared_step(batch, "val", batch_idx)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["decur_lightning"] = {
            "method": type(self).__name__,
            "encoders": self._encoder_names(),
            "in_channels": list(self.in_channels),
            "embedding_dim": self.embedding_dim,
            "view_seed": self.view_seed,
            "skipped_batches": self.skipped_batches,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("decur_lightning")
        if meta is None:
            return
        mine = {
            "method": type(self).__name__,
            "encoders": self._encoder_names(),
            "in_channels": list(self.in_channels),
            "embedding_dim": self.embedding_dim,
        }
        differences = [f"{key}: checkpoint {meta[key]!r}, this module {value!r}" for key, value in mine.items() if meta.get(key) != value]
        if differences:
            raise ValueError(
                "This checkpoint does not fit this module:\n  " + "\n  ".join(differences) + "\n"
                f"Load it with {meta['method']}.load_from_checkpoint(path) (which rebuilds the module from the "
                "checkpoint's hyper-parameters), or build the module with the checkpoint's encoders and sizes."
            )
        self.view_seed = int(meta.get("view_seed", self.view_seed))
        self.nonfinite.skipped_batches = int(meta.get("skipped_batches", 0))

    def _encoder_names(self) -> list[str]:
        return [self.hparams[f"encoder{i + 1}"] for i in range(len(self.modalities))]

    def configure_callbacks(self) -> list[Callback]:
        """Default monitors (empty training, small batch, divergence) and exact mid-epoch resume.

        See :func:`decur_lightning.monitors.default_callbacks`; a Trainer callback of the same class wins.
        """
        return default_callbacks(self._trainer)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = build_optimizer(
            [self],  # encoders, projectors and any loss parameter (e.g. CLIP's temperature)
            name=hp.optimizer,
            lr=hp.lr,
            lr_bias=hp.lr_bias,
            weight_decay=hp.weight_decay,
            momentum=hp.momentum,
        )
        total_steps = int(self.trainer.estimated_stepping_batches)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        warmup_steps = int(round(hp.warmup_epochs * total_steps / epochs))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(total_steps, warmup_steps, "cosine"))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def embedding_std(z: Tensor) -> Tensor:
    """Collapse monitor: mean per-dimension std of the L2-normalised embeddings, times sqrt(K).

    About 1 for well-spread embeddings, 0 when the embeddings collapse to a point (the
    SimSiam monitor, rescaled so that it does not depend on ``K``).
    """
    z = F.normalize(z.detach().float(), dim=1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[1])
