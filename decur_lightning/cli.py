"""The ``decur`` command: LightningCLI over every module and datamodule of the package.

Examples:
    decur fit --config examples/configs/quickstart.yaml
    decur fit --config examples/configs/quickstart.yaml --trainer.max_epochs 1
    decur fit --model DeCURModule --data SyntheticMultimodalDataModule --print_config

Classes can be named by class name (``DeCURModule``) or full path in YAML, since the CLI runs
in subclass mode and this module imports every LightningModule and LightningDataModule of the
package.
"""

from __future__ import annotations

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import decur_lightning.callbacks  # noqa: F401  (callbacks usable by class name)
import decur_lightning.datamodules  # noqa: F401  (datamodules usable by class name)
import decur_lightning.downstream  # noqa: F401  (downstream modules usable by class name)
import decur_lightning.ssl  # noqa: F401  (modules usable by class name)

__all__ = ["main"]


def main(args: list[str] | None = None) -> None:
    """Run the ``decur`` CLI (``args`` defaults to ``sys.argv[1:]``)."""
    LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
