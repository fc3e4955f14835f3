"""The ``train`` stage: fit the torch potential to the curated training split, tracked in MLflow."""

from mlipops.train.loop import TrainResult, fit, run

__all__ = ["fit", "run", "TrainResult"]
