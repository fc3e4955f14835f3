"""An mlipops ensemble as an MLflow model (mlipops.models.pyfunc): logged from code (nothing pickled), loaded by
``mlflow.pyfunc.load_model("models:/cu@champion")`` and served by the real ``mlflow models serve`` on a free
loopback port, answering an HTTP request with what MlipopsCalculator computes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from httpwait import free_port, stop, wait_http

SMALL_D = {"cutoff": 4.0, "n_radial": 3, "n_angular": 2, "max_l": 1}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A 2-member ensemble with a σ recalibration, logged as a pyfunc into a run of a real sqlite store and
    registered as cu v1 with alias champion."""
    import mlflow
    import torch
    from mlflow import MlflowClient

    from mlipops.models import Ensemble, Potential
    from mlipops.models.pyfunc import log_pyfunc

    root = tmp_path_factory.mktemp("pyfunc")
    torch.manual_seed(0)
    members = [Potential(["Cu"], SMALL_D, [8]) for _ in range(2)]
    with torch.no_grad():
        for m in members:
            for mlp in m.mlps:
                mlp.net[-1].weight.normal_(0.0, 0.3)
    model_dir = Ensemble(members).save(root / "model", extra={"model_name": "cu"})
    scale = root / "uncertainty.json"
    scale.write_text(json.dumps({"scale": {"energy": 2.0, "forces": 3.0}}))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("mlipops", artifact_location=(root / "mlartifacts").as_uri())
    run = client.create_run(exp)
    info = log_pyfunc(model_dir, scale, run_id=run.info.run_id)
    client.create_registered_model("cu")
    mv = client.create_model_version("cu", source=f"models:/{info.model_id}", run_id=run.info.run_id,
                                     model_id=info.model_id)
    client.set_registered_model_alias("cu", "champion", mv.version)
    return {"root": root, "uri": uri, "model_dir": model_dir, "info": info}


def _structure():
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=7)
    return atoms


def _expected(model_dir: Path, atoms):
    from mlipops.models.calculator import MlipopsCalculator

    atoms = atoms.copy()
    atoms.calc = MlipopsCalculator(model_dir, sigma_scale={"energy": 2.0, "forces": 3.0})
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.calc.results["energy_std"]


def test_logged_from_code_nothing_pickled(registered):
    import mlflow
    import yaml

    local = Path(mlflow.artifacts.download_artifacts(registered["info"].model_uri))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # models-from-code, no cloudpickle
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    assert {"artifacts/model/weights.pt", "artifacts/model/config.json",
            "artifacts/model/uncertainty.json"} <= files
    assert "mlipops.models.pyfunc" in (local / "pyfunc_entry.py").read_text()
    assert "saved_input_example_info" in mlmodel  # the example the UI and the serving docs show


def test_load_model_by_alias_predicts_energy_forces_and_recalibrated_sigma(registered):
    import mlflow
    import pandas as pd
    from ase.io import write

    mlflow.set_tracking_uri(registered["uri"])
    model = mlflow.pyfunc.load_model("models:/cu@champion")
    atoms = _structure()
    text = io.StringIO()
    write(text, atoms, format="extxyz")
    out = model.predict(pd.DataFrame({"extxyz": [text.getvalue(), text.getvalue()]}))
    e, f, s = _expected(registered["model_dir"], atoms)
    assert len(out) == 2 and out["energy"][1] == pytest.approx(e, abs=1e-9)
    assert np.allclose(np.array(out["forces"][0]), f, atol=1e-9) and out["energy_std"][0] == pytest.approx(s)
    for bad, match in (({"extxyz": ["2\n\nCu 0 0 0\n"]}, "row 0, field extxyz"),
                       ({"numbers": [[29]], "positions": [[[0.0, 0.0]]]}, "row 0: positions must be")):
        with pytest.raises(Exception, match=match):
            model.predict(pd.DataFrame(bad))


def test_mlflow_models_serve_answers_a_request(registered, tmp_path):
    """The real `mlflow models serve` (local environment) of models:/cu@champion on a free loopback port."""
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=registered["uri"])
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/cu@champion",
                                 "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/ping", proc, log, "mlflow models serve", timeout=180)
        atoms = _structure()
        body = {"dataframe_split": {"columns": ["numbers", "positions", "cell", "pbc"],
                                    "data": [[atoms.numbers.tolist(), atoms.positions.tolist(),
                                              atoms.cell.array.tolist(), [True, True, True]]]}}
        req = urllib.request.Request(url + "/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
    finally:
        stop(proc)
    pred = answer["predictions"][0]
    e, f, s = _expected(registered["model_dir"], atoms)
    assert pred["energy"] == pytest.approx(e, abs=1e-9) and pred["n_atoms"] == len(atoms)
    assert np.allclose(np.array(pred["forces"]), f, atol=1e-9) and pred["energy_std"] == pytest.approx(s)
