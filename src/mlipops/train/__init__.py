"""The ``train`` stage: an ensemble of torch potentials fitted to the curated training split in
parallel through Dask, tracked in MLflow, resumable from checkpoints.

The stage's entry point is :func:`mlipops.train.run.run`; the fitting library (one potential, one split) is
:mod:`mlipops.train.loop`. Nothing is imported here, so that importing the library does not pull in the stage
(Dask, MLflow) nor make it a code dep of every stage that fits a model."""
