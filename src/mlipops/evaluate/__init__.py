"""The ``evaluate`` stage: errors of the trained potential per split and config_type, parity plots."""

from mlipops.evaluate.errors import predict, run, split_metrics

__all__ = ["predict", "run", "split_metrics"]
