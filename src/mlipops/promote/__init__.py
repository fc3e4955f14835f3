"""The ``promote`` stage: gates, MLflow Model Registry, model cards in ``registry/``."""

from mlipops.promote.registry import check_gates, run

__all__ = ["check_gates", "run"]
