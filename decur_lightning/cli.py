"""The ``decur`` command: LightningCLI over every module and datamodule of the package, plus tools.

Examples:
    decur fit --config examples/configs/quickstart.yaml
    decur fit --config examples/configs/quickstart.yaml --trainer.max_epochs 1
    decur fit --model DeCURModule --data SyntheticMultimodalDataModule --print_config
    decur export --ckpt runs/pretrain/last.ckpt --out exported [--format pt,safetensors,torchgeo,hub]
    decur analyze --config examples/configs/quickstart.yaml --checkpoint last.ckpt --out analysis
    decur prepare --config my_pretrain.yaml --output /data/ssl4eo-litdata

``fit`` / ``validate`` / ``test`` / ``predict`` are LightningCLI's subcommands. The package's
own tools (:data:`TOOLS`: ``export``, ``analyze``, ``prepare``) are dispatched before LightningCLI sees the
arguments; ``decur-analyze`` stays as an alias of ``decur analyze``.

Classes can be named by class name (``DeCURModule``) or full path in YAML, since the CLI runs
in subclass mode and this module imports every LightningModule and LightningDataModule of the
package.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import decur_lightning.callbacks  # noqa: F401  (callbacks usable by class name)
import decur_lightning.datamodules  # noqa: F401  (datamodules usable by class name)
import decur_lightning.downstream  # noqa: F401  (downstream modules usable by class name)
import decur_lightning.ssl  # noqa: F401  (modules usable by class name)

__all__ = ["TOOLS", "main"]

#: The package's own subcommands: name -> (``"module:function"`` taking the remaining
#: arguments, one-line help). Add a tool with one line here.
TOOLS: dict[str, tuple[str, str]] = {
    "export": ("decur_lightning.export:main", "export encoders for torchgeo, smp, timm and the Hugging Face Hub"),
    "analyze": ("decur_lightning.analysis.cli:main", "explainability analyses of a checkpoint (alias: decur-analyze)"),
    "prepare": ("decur_lightning.prepare:main", "write a pretraining data set in litdata's streaming format"),
}


def _tool(name: str) -> Callable[[list[str]], Any]:
    module, function = TOOLS[name][0].split(":")
    return getattr(importlib.import_module(module), function)


def main(args: Sequence[str] | None = None) -> None:
    """Run the ``decur`` CLI (``args`` defaults to ``sys.argv[1:]``): a tool of :data:`TOOLS`,
    else LightningCLI (``fit``, ``validate``, ``test``, ``predict``)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in TOOLS:
        _tool(argv[0])(argv[1:])
        return
    if argv and argv[0] in ("-h", "--help"):
        print("decur tools (before LightningCLI's help below):")
        for name, (_, text) in TOOLS.items():
            print(f"  decur {name:<10} {text}")
        print()
    LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=None if args is None else argv,  # None: LightningCLI reads sys.argv itself (no warning)
    )


if __name__ == "__main__":
    main()
