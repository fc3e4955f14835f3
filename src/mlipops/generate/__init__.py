"""The ``generate`` stage: the embedded default dataset, built from recipes and labelled by the oracle."""

from mlipops.generate.recipes import build_dataset, run

__all__ = ["build_dataset", "run"]
