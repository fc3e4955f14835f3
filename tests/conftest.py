"""Shared fixtures for the unit tests (all prefixed ``u_`` to stay clear of other test modules)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def u_no_mlflow_store_leak():
    """Whatever store a test pointed MLflow at stays in that test: ``mlflow.set_tracking_uri`` also exports
    ``MLFLOW_TRACKING_URI``, which mlipops reads as the user's override, so a later test in the same process
    (another order, or another pytest-xdist worker's share of the files) would log to the earlier test's store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    if "mlflow" in sys.modules:  # the fluent API's store, back to "not set" (as a fresh process has it)
        from mlflow.tracking._tracking_service import utils

        utils._tracking_uri = None


@pytest.fixture
def u_repo_root() -> Path:
    """The project root (holds params.yaml)."""
    return REPO


@pytest.fixture
def u_mlearn_dir() -> Path:
    """The shared mlearn DFT data directory; the test is skipped when it is absent."""
    d = (Path(__file__).parents[1] / "../shared/datasets/mlearn").resolve()
    if not (d / "Mo_test.extxyz").is_file():
        pytest.skip(f"mlearn data not found at {d} (expected ../shared/datasets/mlearn/Mo_test.extxyz "
                    "relative to the project root)")
    return d


@pytest.fixture
def u_rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def randomize_output(model):
    """A fresh Potential predicts exactly E0 (its output layers start at zero): give the output layers
    random weights, as a trained network has, so that the physics tests see non-trivial forces."""
    import torch

    with torch.no_grad():
        for mlp in model.mlps:
            out = mlp.net[-1]
            out.weight.normal_(0.0, out.in_features ** -0.5)
            out.bias.normal_(0.0, 0.1)
    return model


@pytest.fixture
def u_make_potential():
    """Factory: a freshly initialised float64 Potential (seeded, default descriptor settings)."""
    import torch

    from mlipops.models import Potential
    from mlipops.params import DescriptorParams

    def make(species=("Cu",), hidden=(16, 16), seed=0, **descriptor):
        torch.manual_seed(seed)
        d = DescriptorParams(**descriptor).model_dump()
        return randomize_output(Potential(list(species), d, list(hidden))).to(torch.float64).eval()

    return make
