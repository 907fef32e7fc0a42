"""One encoder per modality: built, loaded, checked and run by one component.

Both the self-supervised modules (:class:`~decur_lightning.ssl.MultimodalSSLModule`) and the
downstream modules (:class:`~decur_lightning.downstream.MultimodalDownstreamModule`) hold their
encoders in an :class:`EncoderSet`, so a checkpoint of either is a weight source for the other
(state-dict keys ``encoders.<modality>.*``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .modalities import Modality, datamodule_modalities, modalities_to_hparams, resolve_modalities
from .models.encoders import create_encoder, is_imagenet_source
from .weights import load_pretrained_encoder

__all__ = ["EncoderSet", "FrozenBatchNorm", "NamedModalitiesMixin"]

#: Batch-norm behaviour of frozen encoders in training steps: ``"eval"`` (running statistics
#: fixed, the standard protocol) or ``"train"`` (statistics adapt to the new data, as the
#: authors' linear-probe and frozen-FCN scripts do with ``net.train()``).
FrozenBatchNorm = Literal["eval", "train"]


class EncoderSet(nn.ModuleDict):
    """The encoders of a run, keyed by modality name in modality order.

    Builds each encoder from its resolved :class:`~decur_lightning.modalities.Modality`
    (``encoder``, ``bands``, ``encoder_kwargs``), loads its ``weights`` (ImageNet at
    construction; any other source with :func:`~decur_lightning.weights.load_pretrained_encoder`,
    taking the source's encoder named ``weights_modality`` or this modality's name; with the
    modality's ``band_names``, a source recorded with other bands has its input channels
    selected by band name, see :func:`~decur_lightning.weights.adapt_input_bands`), and checks
    batches against the encoders' band counts.

    Args:
        modalities: ordered mapping name -> resolved :class:`Modality` (``bands`` and
            ``encoder`` set; see :func:`~decur_lightning.modalities.resolve_modalities`).
        encoder_kwargs: keyword arguments for every encoder (a modality's own
            ``encoder_kwargs`` are merged over them).
        channels_last: run the encoders in channels-last memory format.
        compile: compile each encoder in place with ``torch.compile`` (state-dict keys unchanged).

    Example:
        >>> encoders = EncoderSet({"sar": Modality(bands=2, encoder="resnet18"),
        ...                        "optical": Modality(bands=4, encoder="resnet18")})
        >>> batch = {"image_sar": torch.rand(2, 2, 32, 32), "image_optical": torch.rand(2, 4, 32, 32)}
        >>> {name: f.shape[1] for name, f in encoders(encoders.inputs(batch)).items()}
        {'sar': 512, 'optical': 512}
    """

    def __init__(
        self,
        modalities: Mapping[str, Modality],
        encoder_kwargs: Mapping[str, Any] | None = None,
        *,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not modalities:
            raise ValueError("An EncoderSet needs at least one modality.")
        self.specs: dict[str, Modality] = dict(modalities)
        self.channels_last = channels_last
        self.frozen = False
        self.frozen_batch_norm: FrozenBatchNorm = "eval"
        for name, spec in self.specs.items():
            if spec.bands is None or spec.encoder is None:
                raise ValueError(f"Modality {name!r} is not resolved (bands={spec.bands}, encoder={spec.encoder}).")
            kwargs = {**(encoder_kwargs or {}), **(spec.encoder_kwargs or {})}
            imagenet = is_imagenet_source(spec.weights)
            encoder = create_encoder(spec.encoder, int(spec.bands), spec.weights if imagenet else None, **kwargs)
            if spec.weights is not None and not imagenet:
                selector = spec.weights_modality if spec.weights_modality is not None else name
                load_pretrained_encoder(encoder, spec.weights, selector, band_names=spec.band_names)
            if channels_last:
                encoder.to(memory_format=torch.channels_last)
            if compile:
                encoder.compile()
            if hasattr(self, name):
                raise ValueError(f"{name!r} cannot name a modality: it is an attribute of EncoderSet. Rename it.")
            self[name] = encoder

    # ------------------------------------------------------------------ description
    @property
    def names(self) -> tuple[str, ...]:
        """Modality names in order."""
        return tuple(self.specs)

    @property
    def num_features(self) -> dict[str, int]:
        """Pooled feature width of each encoder."""
        return {name: int(encoder.num_features) for name, encoder in self.items()}

    @staticmethod
    def key(name: str) -> str:
        """The batch key of a modality: ``image_<name>``."""
        return f"image_{name}"

    def pairs(self) -> list[tuple[str, str]]:
        """Every pair ``(m, n)`` of modalities, ``m`` before ``n``."""
        names = self.names
        return [(m, n) for i, m in enumerate(names) for n in names[i + 1 :]]

    # ------------------------------------------------------------------ inputs
    def inputs(
        self, batch: Mapping[str, Any], *, allow_missing: bool = False, min_batch_size: int = 1
    ) -> dict[str, Tensor]:
        """The modality tensors of a batch, in modality order, checked against the encoders.

        Args:
            batch: a dict with ``image_<name>`` tensors ``(N, C, H, W)``.
            allow_missing: leave out modalities the batch lacks (a missing modality at test
                time) instead of raising; at least one must be present.
            min_batch_size: smallest accepted ``N`` (2 where batch statistics are needed).

        Raises:
            TypeError, KeyError, ValueError: with what was expected and how to fix it.
        """
        keys = [self.key(name) for name in self.names]
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"Expected a batch dict with keys {keys}; got {type(batch).__name__}. Datamodules of this "
                "package return such dicts."
            )
        missing = [key for key in keys if key not in batch]
        if missing and not (allow_missing and len(missing) < len(keys)):
            raise KeyError(
                f"The batch has no {missing}; it has keys {sorted(batch)}. Name the modalities as in the batch "
                "keys image_<name> (or leave them unset to take the datamodule's)."
            )
        inputs = {name: batch[self.key(name)] for name in self.names if self.key(name) in batch}
        for name, x in inputs.items():
            bands = int(self.specs[name].bands)  # type: ignore[arg-type]
            if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != bands:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                got = x.shape[1] if isinstance(x, Tensor) and x.ndim == 4 else "?"
                raise ValueError(
                    f"{self.key(name)} has shape {shape}, but its encoder expects (N, {bands}, H, W). Set "
                    f"modalities={{'{name}': {{'bands': {got}}}}} or select the right bands in the datamodule."
                )
        sizes = {name: x.shape[0] for name, x in inputs.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"The modalities of a batch have different batch sizes: {sizes}.")
        size = next(iter(sizes.values()))
        if size < min_batch_size:
            raise ValueError(
                f"Got a training batch of {size} sample(s): batch norm and the loss need batch statistics. "
                f"Use batch_size >= {min_batch_size} and drop_last=True."
            )
        return inputs

    # ------------------------------------------------------------------ forward
    def encode(self, x: Tensor, name: str) -> Tensor:
        """Pooled features ``(N, num_features)`` of modality ``name``."""
        if name not in self.specs:
            raise KeyError(f"No modality {name!r}; the modalities are {list(self.names)}.")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            return self[name](x)
        except (RuntimeError, ValueError, AssertionError) as err:  # timm asserts on input sizes
            raise ValueError(
                f"The encoder of modality '{name}' ({self.specs[name].encoder}) failed on input of shape "
                f"{tuple(x.shape)}: {err}\nIf the images are too small for this encoder, raise the crop or "
                "image size."
            ) from err

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Pooled features of every given modality: ``{name: (N, num_features)}``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return {name: self.encode(x, name) for name, x in inputs.items()}

    # ------------------------------------------------------------------ freezing
    def freeze(self, frozen_batch_norm: FrozenBatchNorm = "eval") -> EncoderSet:
        """Freeze every encoder: no gradient; batch norm in training steps per ``frozen_batch_norm``.

        ``"eval"`` keeps the encoders in eval mode during training (running statistics fixed);
        ``"train"`` puts only their batch-norm layers in training mode in training steps (batch
        statistics, running statistics adapt), every other layer (dropout, drop-path) in eval
        mode: the authors' released linear-probe and frozen-FCN behaviour for ResNets.
        """
        if frozen_batch_norm not in ("eval", "train"):
            raise ValueError(
                "frozen_batch_norm must be 'eval' (running statistics fixed, the standard protocol) or 'train' "
                f"(statistics adapt to the new data, as the authors' released scripts); got {frozen_batch_norm!r}."
            )
        self.frozen = True
        self.frozen_batch_norm = frozen_batch_norm
        self.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> EncoderSet:
        """Set training mode; frozen encoders follow ``frozen_batch_norm`` (see :meth:`freeze`)."""
        super().train(mode)
        if self.frozen:
            for encoder in self.values():
                encoder.eval()
                if mode and self.frozen_batch_norm == "train":
                    for layer in encoder.modules():
                        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                            layer.train()
        return self


class NamedModalitiesMixin:
    """LightningModule mixin: the module's :class:`EncoderSet`, from ``hparams.modalities``.

    The module's hyper-parameters hold ``modalities`` (:data:`~decur_lightning.modalities.ModalitiesArg`),
    ``encoder`` (the default encoder name) and ``encoder_kwargs``. When every modality's band
    count is given, the encoders are built at once (:meth:`build_modalities` from ``__init__``);
    otherwise at the start of ``fit`` / ``validate`` / ``test`` / ``predict``
    (:meth:`configure_model`), from the datamodule's
    :attr:`modality_specs`. Either way the resolved descriptions replace ``hparams.modalities``,
    so checkpoints rebuild the same module with ``load_from_checkpoint``. Subclasses build what
    sits on the encoders (projectors, heads, the loss) in :meth:`configure_heads`.
    """

    encoders: EncoderSet

    def build_modalities(self, *, channels_last: bool = False, compile: bool = False) -> None:
        """Build the encoders now if the hyper-parameters describe every modality; else at fit start."""
        self._encoder_options = {"channels_last": channels_last, "compile": compile}
        hp = self.hparams  # type: ignore[attr-defined]
        if hp.modalities is None:
            return
        # Checks names and fields now, even when the band counts come from the datamodule later.
        partial = resolve_modalities(hp.modalities, None, hp.encoder, need_bands=False)
        if isinstance(hp.modalities, Mapping) and all(spec.bands is not None for spec in partial.values()):
            self._build_encoders(resolve_modalities(hp.modalities, None, hp.encoder))

    @property
    def built(self) -> bool:
        """Whether the encoders exist (else they are built at the start of the fit)."""
        return "encoders" in getattr(self, "_modules", {})

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names in order."""
        if not self.built:
            raise RuntimeError(
                f"{type(self).__name__} builds its encoders at the start of the fit, from the datamodule's modalities. "
                "To use it before, give every modality's band count: modalities={'<name>': {'bands': C}, ...}."
            )
        return self.encoders.names

    def configure_model(self) -> None:
        """Build the encoders from the datamodule's modality descriptions (or check them against it)."""
        trainer = getattr(self, "_trainer", None)
        data = datamodule_modalities(getattr(trainer, "datamodule", None) if trainer is not None else None)
        hp = self.hparams  # type: ignore[attr-defined]
        specs = resolve_modalities(hp.modalities, data, hp.encoder)
        if not self.built:
            self._build_encoders(specs)

    def _build_encoders(self, specs: Mapping[str, Modality]) -> None:
        self.hparams["modalities"] = modalities_to_hparams(specs)  # type: ignore[attr-defined]
        self.encoders = EncoderSet(specs, self.hparams.encoder_kwargs, **self._encoder_options)  # type: ignore[attr-defined]
        self.configure_heads()

    def configure_heads(self) -> None:
        """Build what sits on the encoders (called once, right after they are built)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the last logged metrics; move the weight sources out of the hyper-parameters.

        The checkpoint holds the trained weights, so ``load_from_checkpoint`` must not read the
        pretrained sources again (they may be gone, or be a download). They are kept, for the
        record, under ``checkpoint["weight_sources"]``.
        """
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:  # the last logged values, for exports and model cards
            checkpoint["metrics"] = {
                key: float(value)
                for key, value in trainer.callback_metrics.items()
                if getattr(value, "numel", lambda: 1)() == 1
            }
        hparams = checkpoint.get("hyper_parameters")
        modalities = hparams.get("modalities") if isinstance(hparams, Mapping) else None
        if not isinstance(modalities, Mapping):
            return
        sources = {
            name: spec["weights"]
            for name, spec in modalities.items()
            if isinstance(spec, Mapping) and spec.get("weights")
        }
        if not sources:
            return
        stripped = {
            name: {k: v for k, v in spec.items() if k not in ("weights", "weights_modality")}
            if isinstance(spec, Mapping)
            else spec
            for name, spec in modalities.items()
        }
        checkpoint["hyper_parameters"] = {**hparams, "modalities": stripped}
        checkpoint["weight_sources"] = sources
