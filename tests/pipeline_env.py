"""Helpers of the tests that run the real `dvc repro` in a temporary repository (test_e2e, test_examples)."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def merge_params(base: dict, over: dict) -> dict:
    """``over`` into ``base``: mappings key by key, anything else (and ``gates`` as a whole) replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = (merge_params(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "gates"
                  else v)
    return out


def pipeline_env() -> dict:
    """The environment of a stage run: this venv's tools first, no outside MLflow store, a git identity."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("MLFLOW_TRACKING_URI", None)
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "mlipops-test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@mlipops.invalid"
    return env
