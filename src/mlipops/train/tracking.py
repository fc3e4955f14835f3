"""MLflow plumbing: the project's store (sqlite + local artifacts by default), provenance tags."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from mlipops.frames import file_md5  # noqa: F401  (re-exported: the DVC hash of a data file)

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def tracking_uri(uri: str) -> str:
    """Resolve ``sqlite:///relative.db`` against the current directory so every stage agrees."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def client(uri: str):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri(uri))
    return MlflowClient(tracking_uri=tracking_uri(uri))


def experiment_id(uri: str, name: str, artifact_location: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    loc = artifact_location
    if "://" not in loc:
        loc = Path(loc).resolve().as_uri()
    return c.create_experiment(name, artifact_location=loc)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
