"""The shared multimodal self-supervised LightningModule.

Encoders, projectors, on-device views, optimiser and logging live here; a method (DeCUR or a
baseline) only defines :meth:`MultimodalSSLModule.compute_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import ProjectionHead
from lightning import Callback, LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ..augmentations import RGB_KINDS, Asymmetry, ViewPair, make_view_pair
from ..encoder_set import NamedModalitiesMixin
from ..modalities import ModalitiesArg, Modality
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


class MultimodalSSLModule(NamedModalitiesMixin, LightningModule):
    """Modality-specific encoders and projectors trained on augmented views, for ``M`` named modalities.

    A batch is a dict with one ``image_<name>`` tensor ``(N, C, H, W)`` in [0, 1] per modality.
    In each step :attr:`views_per_modality` views per modality are made on the device under
    ``no_grad`` (:mod:`decur_lightning.augmentations`), each view goes through its modality's
    encoder and projector (separate passes, as Algorithm 1), and the method's
    :meth:`compute_loss` turns the embeddings ``{name: [z', z'']}`` into a dict of scalar terms
    with the key ``"loss"``. A method is a subclass that defines :meth:`compute_loss` (and, if it
    needs them, :attr:`views_per_modality`, :attr:`min_modalities`, :attr:`max_modalities`).

    The modalities are described once (:class:`~decur_lightning.modalities.Modality`): by the
    datamodule (band counts, band names, view kinds: its ``modality_specs``) and, where the
    module needs more, by ``modalities`` (encoder, weights). Without band counts the encoders
    are built at the start of the fit from the datamodule, so ``Trainer.fit(DeCURModule(),
    datamodule)`` is a complete call.

    Args:
        modalities: which modalities and what to build for each (``None``: every modality of
            the datamodule, in its order; a list of names; or a mapping name ->
            :class:`~decur_lightning.modalities.Modality` / dict of its fields, e.g.
            ``{"s1": {"weights": "imagenet"}, "s2": {"encoder": "resnet50_rda"}}``). The first
            modality is the paper's modality 1.
        encoder: encoder of every modality that names none (timm names, or see
            :func:`decur_lightning.models.create_encoder`).
        projector_dims: widths of the projector layers; the last is the embedding size ``K``.
            Empty (``[]``) means no projector: the loss acts on the encoder features, and ``K``
            is the encoders' feature width (Fig. 3b ablation; the encoders must then have the
            same width).
        crop_size: side of the views in pixels (the paper: 224 from 264 px images); ``None``
            keeps the input size.
        crop_scale: area range of the random resized crop.
        view_asymmetry: ``"byol"`` (default; the paper follows BYOL: blur p=1.0 / 0.1 and
            solarize p=0 / 0.2 for views 1 / 2) or ``"symmetric"`` (the released code: blur
            p=0.5 and solarize p=0.2 on both views).
        views: custom view pipelines by modality name (a
            :class:`~decur_lightning.augmentations.ViewPair`, or any module applied for each
            view) instead of the pipeline of the modality's view kind. Not saved in checkpoints.
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
        channels_last: run the encoders in channels-last memory format (faster convolutions
            on recent GPUs with bf16; see ``benchmarks/run.py`` for the measured effect).
        compile_encoders: compile the encoders with ``torch.compile`` (in place, so state-dict
            keys and checkpoints are unchanged); the first steps pay the compilation.
        encoder_kwargs: extra keyword arguments for every encoder
            (:func:`~decur_lightning.models.create_encoder`), e.g. the residual deformable
            attention switches of ``*_rda`` encoders.

    Second-view sources: when a batch also holds ``image2_<name>`` (same shape as
    ``image_<name>``), view 2 of that modality is made from it instead of from ``image_<name>``
    (e.g. another season of the same location, as the authors' SSL4EO-S12 pretraining does;
    see ``SSL4EOS12MMDataModule(season_per_view=True)``).

    Monitoring: the collapse, divergence, small-batch and empty-training monitors are callbacks
    (:mod:`decur_lightning.monitors`) that the module adds by default.
    """

    #: Views made of each modality per step (2 for DeCUR and Barlow Twins, 1 for cross-modal baselines).
    views_per_modality: int = 2
    #: Fewest modalities the method learns from (1 for single-modal baselines).
    min_modalities: int = 2
    #: Most modalities the method is defined for (``None``: any number).
    max_modalities: int | None = None

    def __init__(
        self,
        modalities: ModalitiesArg = None,
        encoder: str = "resnet50",
        projector_dims: Sequence[int] = (8192, 8192, 8192),
        crop_size: int | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        view_asymmetry: Asymmetry = "byol",
        views: Mapping[str, nn.Module] | None = None,
        optimizer: OptimizerName = "lars",
        lr: float = 0.2,
        lr_bias: float = 0.0048,
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        warmup_epochs: float = 0.0,
        nan_policy: NanPolicy = "raise",
        channels_last: bool = False,
        compile_encoders: bool = False,
        encoder_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.nonfinite = NonFiniteGuard(nan_policy)
        if optimizer not in ("lars", "adamw"):
            raise ValueError(f"optimizer must be 'lars' or 'adamw' for pretraining, got {optimizer!r}.")
        if view_asymmetry not in ("byol", "symmetric"):
            raise ValueError(f"view_asymmetry must be 'byol' or 'symmetric', got {view_asymmetry!r}.")
        self.save_hyperparameters(ignore=["views"])
        self._custom_views = dict(views or {})
        for name, module in self._custom_views.items():
            if not isinstance(module, nn.Module):
                raise TypeError(f"views[{name!r}] must be an nn.Module (e.g. a ViewPair); got {type(module).__name__}.")
        # Views hold no learnable state; kept out of the state dict (built at the first batch).
        self._views: dict[str, ViewPair] | None = None
        # Views are drawn from a seed per batch (not from the global RNG), so that a resumed run
        # makes the same views as an uninterrupted one. Saved in checkpoints.
        self.view_seed = int(torch.initial_seed() % 2**31)
        self._warned_small_val_batch = False
        #: The last training step's :func:`embedding_std` per modality (read by the collapse monitor).
        self.embedding_stds: dict[str, Tensor] = {}
        self.build_modalities(channels_last=channels_last, compile=compile_encoders)

    def select_modalities(self, specs: dict[str, Modality]) -> dict[str, Modality]:
        """The modalities the method uses, from the resolved ones (all by default)."""
        return specs

    def configure_heads(self) -> None:
        """Projectors (one per modality) and the embedding size; then :meth:`configure_loss`."""
        names = self.encoders.names
        count = len(names)
        if count < self.min_modalities or (self.max_modalities is not None and count > self.max_modalities):
            wanted = (
                f"at least {self.min_modalities}"
                if self.max_modalities is None
                else f"{self.min_modalities}"
                if self.min_modalities == self.max_modalities
                else f"{self.min_modalities} to {self.max_modalities}"
            )
            raise ValueError(
                f"{type(self).__name__} learns from {wanted} modalities; got {count} ({list(names)}). "
                "Choose them with modalities=[...]."
            )
        unknown = sorted(set(self._custom_views) - set(names))
        if unknown:
            raise ValueError(f"views names {unknown}, which are not modalities of this module ({list(names)}).")
        dims = self.hparams.projector_dims
        self.projectors = nn.ModuleDict(
            {name: build_projector(width, dims) for name, width in self.encoders.num_features.items()}
        )
        self.embedding_dim = self._embedding_dim(dims)
        self.configure_loss()

    def configure_loss(self) -> None:
        """Build the method's loss (called once, after the encoders and projectors)."""

    def _build_encoders(self, specs: Mapping[str, Modality]) -> None:
        super()._build_encoders(self.select_modalities(dict(specs)))

    def _embedding_dim(self, projector_dims: Sequence[int]) -> int:
        """``K``: the projector's output width, or the encoders' feature width without projector."""
        if len(projector_dims):
            return int(projector_dims[-1])
        widths = self.encoders.num_features
        if len(set(widths.values())) > 1:
            raise ValueError(
                f"projector_dims=[] (no projector) makes the loss compare encoder features directly, but the "
                f"encoders' feature widths differ: {widths}. Use encoders of the same width, or a projector."
            )
        return next(iter(widths.values()))

    # ------------------------------------------------------------------ models
    def forward(self, x: Tensor, modality: str) -> Tensor:
        """Encoder features ``(N, num_features)`` of one modality (the transferable representation)."""
        return self.encoders.encode(x, self._check_modality(modality))

    def embed(self, x: Tensor, modality: str) -> Tensor:
        """Projector embeddings ``(N, K)`` of one modality (the space the loss acts on)."""
        return self.projectors[modality](self.encoders.encode(x, self._check_modality(modality)))

    def _check_modality(self, modality: str) -> str:
        if modality not in self.modalities:
            raise ValueError(f"modality must be one of {list(self.modalities)}; got {modality!r}.")
        return modality

    # ------------------------------------------------------------------ views
    def _build_views(self, inputs: Mapping[str, Tensor]) -> dict[str, ViewPair]:
        pairs: dict[str, ViewPair] = {}
        for name, x in inputs.items():
            custom = self._custom_views.get(name)
            if isinstance(custom, ViewPair):
                pairs[name] = custom
            elif custom is not None:
                pairs[name] = ViewPair(custom, custom)
            else:
                kind = self.encoders.specs[name].view or "generic"
                if kind in RGB_KINDS and x.shape[1] != 3:
                    raise ValueError(
                        f"Modality '{name}' has view kind {kind!r} (RGB colour jitter), which needs 3 bands, but "
                        f"image_{name} has {x.shape[1]}. Set modalities={{'{name}': {{'view': 'optical'}}}} for "
                        "multispectral data."
                    )
                size = self.hparams.crop_size or min(x.shape[-2:])
                pairs[name] = make_view_pair(kind, size, tuple(self.hparams.crop_scale), self.hparams.view_asymmetry)
        return pairs

    def make_views(self, batch: dict[str, Tensor], seed: int | None = None) -> dict[str, tuple[Tensor, ...]]:
        """Views of a batch, ``{name: (view 1, view 2)}`` (one view for one-view methods), under ``no_grad``.

        With ``seed``, the random draws come from that seed and the global RNG is left as it was.
        """
        inputs = self.get_inputs(batch)
        return self._views_of(inputs, seed, self.get_second_sources(batch, inputs))

    def _views_of(
        self, inputs: Mapping[str, Tensor], seed: int | None, second: Mapping[str, Tensor | None] | None = None
    ) -> dict[str, tuple[Tensor, ...]]:
        if self._views is None:
            self._views = self._build_views(inputs)
        second = second or {}
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            views = {name: self._views[name](x, second.get(name)) for name, x in inputs.items()}
        return {name: tuple(v[: self.views_per_modality]) for name, v in views.items()}

    def get_second_sources(self, batch: Mapping[str, Tensor], inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The ``image2_<name>`` tensors of a batch (sources of view 2), where present.

        Only used when the method makes two views per modality. Each must have the shape of its
        ``image_<name>``.
        """
        if self.views_per_modality < 2:
            return {}
        second: dict[str, Tensor] = {}
        for name, x in inputs.items():
            x2 = batch.get(f"image2_{name}")
            if x2 is None:
                continue
            if x2.shape != x.shape:
                raise ValueError(
                    f"image2_{name} (the source of view 2) has shape {tuple(x2.shape)}, but image_{name} has "
                    f"{tuple(x.shape)}: both views of a modality need images of the same bands and size."
                )
            second[name] = x2
        return second

    def _batch_seed(self, stage: str, batch_idx: int) -> int:
        stage_id = {"train": 0, "val": 1, "test": 2}.get(stage, 3)
        rank = self.global_rank if self._trainer is not None else 0
        key = (self.view_seed, stage_id, self.current_epoch if self._trainer is not None else 0, batch_idx, rank)
        return hash(key) % 2**63

    def get_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The modality tensors of a batch ``{name: (N, C, H, W)}``, checked against the encoders."""
        return self.encoders.inputs(batch, min_batch_size=2 if self.training else 1)

    # ------------------------------------------------------------------ steps
    def compute_loss(self, embeddings: Mapping[str, Sequence[Tensor]]) -> dict[str, Tensor]:
        """The method's loss terms from the embeddings ``{name: [z', z'']}``; must contain ``"loss"``.

        Each list holds :attr:`views_per_modality` embedding batches ``(N, K)`` of the local batch;
        a method gathers them across ranks itself (:func:`~decur_lightning.losses.gather_with_grad`).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss.")

    def shared_step(self, batch: dict[str, Tensor], stage: str, batch_idx: int = 0) -> Tensor | None:
        """Views, one encoder+projector pass per view, the method's loss, checks and logging."""
        inputs = self.get_inputs(batch)
        batch_size = next(iter(inputs.values())).shape[0]
        if stage != "train" and batch_size < 2:
            return self._skip_small_eval_batch(stage)
        check = self.nonfinite.enabled
        second = self.get_second_sources(batch, inputs)
        # Inputs are checked before the forward pass, so a bad batch never reaches the batch-norm statistics.
        if check:
            flags = [(f"the input image_{name}", finite_flag(x)) for name, x in inputs.items()]
            flags += [(f"the input image2_{name}", finite_flag(x2)) for name, x2 in second.items()]
            if not self.nonfinite.check(self, stage, batch_idx, flags):
                return None
        views = self._views_of(inputs, self._batch_seed(stage, batch_idx), second)
        embeddings = {name: [self.embed(x, name) for x in modality_views] for name, modality_views in views.items()}
        terms = self.compute_loss(embeddings)
        if check:
            flags = [
                (f"the embeddings of '{name}'", torch.stack([finite_flag(z) for z in zs]).all())
                for name, zs in embeddings.items()
            ]
            if not self.nonfinite.check(self, stage, batch_idx, [*flags, ("the loss", finite_flag(terms["loss"]))]):
                return None
        on_step = stage == "train"
        self.log(f"{stage}/loss", terms["loss"], prog_bar=True, batch_size=batch_size, on_step=on_step, on_epoch=True)
        for name, value in terms.items():
            if name != "loss":
                self.log(f"{stage}/{name}", value, batch_size=batch_size, on_step=on_step, on_epoch=True)
        stds = {name: embedding_std(zs[0]) for name, zs in embeddings.items()}
        for name, std in stds.items():
            self.log(f"{stage}/embedding_std_{name}", std, batch_size=batch_size, on_step=on_step, on_epoch=True)
        if stage == "train":
            self.embedding_stds, self.embedding_stds_step = stds, self.global_step
        return terms["loss"]

    @property
    def skipped_batches(self) -> int:
        """Training batches skipped under ``nan_policy="skip"``."""
        return self.nonfinite.skipped_batches

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
    def _signature(self) -> dict[str, Any]:
        return {
            "method": type(self).__name__,
            "modalities": {name: [spec.encoder, spec.bands] for name, spec in self.encoders.specs.items()},
            "embedding_dim": self.embedding_dim,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["decur_lightning"] = {
            **self._signature(),
            "view_seed": self.view_seed,
            "nonfinite_guard": self.nonfinite.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("decur_lightning")
        if meta is None:
            return
        if "modalities" not in meta:
            raise ValueError(
                "This checkpoint was written by decur-lightning 0.1 (numbered modalities): it cannot be resumed "
                "by this version. Its encoders load as weights: modalities={'<name>': {'weights': '<file.ckpt>'}}."
            )
        mine = self._signature()
        meta_modalities = {name: list(value) for name, value in meta["modalities"].items()}
        differences = [
            f"{key}: checkpoint {meta_modalities if key == 'modalities' else meta[key]!r}, this module {value!r}"
            for key, value in mine.items()
            if (meta_modalities if key == "modalities" else meta.get(key)) != value
        ]
        if differences:
            raise ValueError(
                "This checkpoint does not fit this module:\n  " + "\n  ".join(differences) + "\n"
                f"Load it with {meta['method']}.load_from_checkpoint(path) (which rebuilds the module from the "
                "checkpoint's hyper-parameters), or build the module with the checkpoint's modalities and sizes."
            )
        self.view_seed = int(meta.get("view_seed", self.view_seed))
        self.nonfinite.load_state_dict(meta.get("nonfinite_guard", {}))

    def configure_callbacks(self) -> list[Callback]:
        """Default monitors (empty training, small batch, divergence, collapse) and exact mid-epoch resume.

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
