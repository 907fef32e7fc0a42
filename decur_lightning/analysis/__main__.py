"""``python -m decur_lightning.analysis``: see :mod:`decur_lightning.analysis.cli`."""

from .cli import main

main()
