"""The ``train`` stage: an ensemble of torch potentials fitted to the curated training split in
parallel through Dask, tracked in MLflow, resumable from checkpoints."""

from mlipops.train.loop import TrainResult, fit
from mlipops.train.run import run

__all__ = ["fit", "run", "TrainResult"]
