"""Promotion: gates, the MLflow Model Registry and registry/ kept in agreement, aliases, concurrency, CLI.

Every test uses a real MLflow sqlite store and real (small, untrained) ensembles saved the way the
train stage saves them; the evaluation reports are the project's own committed ones (reports/evaluate).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlipops.errors import ParamsError
from mlipops.params import GateBound, PromoteParams, load_params
from mlipops.promote.gates import check_gates

ROOT = Path(__file__).resolve().parents[1]
SMALL_D = {"cutoff": 4.0, "n_radial": 3, "n_angular": 2, "max_l": 1}


# ------------------------------------------------------------------------------------------- gates
def _reports(tmp_path: Path, **reports: dict) -> Path:
    d = tmp_path / "reports/evaluate"
    for name, metrics in reports.items():
        p = d / "metrics.json" if name == "main" else d / name / "metrics.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(metrics))
    return d


def _by_gate(rows):
    return {r["gate"]: r for r in rows}


def test_gates_max_min_and_per_config_type_patterns(tmp_path):
    d = _reports(tmp_path, main={"val.force_mae": 0.05, "val.fcc.force_mae": 0.01, "val.bcc.force_mae": 0.3,
                                 "val.fcc.energy_mae_per_atom": 0.001, "n_nonfinite_predictions": 0},
                 melting={"p_within_window": 0.1, "tm_mean": 1300.0})
    gates = PromoteParams(gates={"val.force_mae": 0.1, "val.*.force_mae": 0.1,
                                 "melting:p_within_window": {"min": 0.2}, "melting:tm_mean": {"min": 1200, "max": 1400}}).gates
    rows = _by_gate(check_gates(gates, d))
    assert rows["val.force_mae"]["passed"] and rows["val.force_mae"]["bound"] == "max"
    # the pattern matches one dotted part: one gate per config_type, the force key of each
    assert {"val.fcc.force_mae", "val.bcc.force_mae"} <= set(rows) and "val.fcc.energy_mae_per_atom" not in rows
    assert rows["val.fcc.force_mae"]["passed"] and not rows["val.bcc.force_mae"]["passed"]
    assert "exceeds the maximum by 0.2" in rows["val.bcc.force_mae"]["note"]
    p = rows["melting:p_within_window"]
    assert not p["passed"] and p["bound"] == "min" and "below the minimum by 0.1 (50 %)" in p["note"]
    tm = [r for r in check_gates(gates, d) if r["gate"] == "melting:tm_mean"]
    assert [(r["bound"], r["passed"]) for r in tm] == [("max", True), ("min", True)]
    assert rows["n_nonfinite_predictions"]["passed"]  # always checked


def test_missing_or_non_finite_metrics_fail_never_pass_by_default(tmp_path):
    d = _reports(tmp_path, main={"val.force_mae": float("nan"), "flag": True, "n_nonfinite_predictions": 3})
    gates = PromoteParams(gates={"val.force_mae": 0.1, "val.energy_mae_per_atom": 0.1, "flag": {"min": 0},
                                 "test.*.force_mae": 0.1, "nve:abs_energy_drift_meV_per_atom_per_ps": 1.0}).gates
    rows = _by_gate(check_gates(gates, d))
    assert not any(r["passed"] for r in rows.values())
    assert rows["val.force_mae"]["note"] == "not a finite number"
    assert rows["flag"]["note"] == "not a finite number"  # a boolean is not a measurement
    assert rows["val.energy_mae_per_atom"]["note"].startswith("metric missing")
    assert rows["test.*.force_mae"]["note"].startswith("no metric of")
    assert rows["nve:abs_energy_drift_meV_per_atom_per_ps"]["note"].startswith("report missing")
    assert rows["n_nonfinite_predictions"]["value"] == 3  # NaN predictions fail whatever the params say


def test_gate_params_forms(tmp_path):
    p = PromoteParams(gates={"a": 0.5, "b": {"min": 1}, "c": {"min": 0, "max": 2}})
    assert p.gates == {"a": GateBound(max=0.5), "b": GateBound(min=1), "c": GateBound(min=0, max=2)}
    base = {"ingest": {"sources": [{"path": "x.extxyz"}]}, "validate": {"allowed_species": ["Cu"]}}
    f = tmp_path / "params.yaml"
    for bad in ({"x": {}}, {"x": {"maximum": 1}}, {"x": "low"}):
        f.write_text(yaml.safe_dump(base | {"promote": {"gates": bad}}))
        with pytest.raises(ParamsError) as err:
            load_params(f)
        assert "promote" in str(err.value)


# ------------------------------------------------------------------------------- promotion, for real
def _project(root: Path, store: Path, registry: Path, gates: dict, seed: int) -> Path:
    """A project with evaluation reports (the repo's own), and a small ensemble logged to a real MLflow run."""
    import mlflow
    import torch
    from mlflow import MlflowClient

    from mlipops.models import Ensemble, Potential

    root.mkdir(parents=True)
    shutil.copytree(ROOT / "reports/evaluate", root / "reports/evaluate",
                    ignore=shutil.ignore_patterns("melting_sweep"))
    (root / "params.yaml").write_text(yaml.safe_dump({
        "ingest": {"sources": [{"path": "x.extxyz"}]}, "validate": {"allowed_species": ["Cu"]}, "train": {"model_name": "cu"},
        "promote": {"registry_dir": str(registry), "gates": gates}}))
    torch.manual_seed(seed)
    members = [Potential(["Cu"], SMALL_D, [8]) for _ in range(2)]
    with torch.no_grad():  # a fresh output layer is zero: give the members distinct, non-zero outputs
        for m in members:
            for mlp in m.mlps:
                mlp.net[-1].weight.normal_(0.0, 0.3)
    ens = Ensemble(members)
    model_dir = ens.save(root / "data/models/cu", extra={"model_name": "cu"})
    uri = f"sqlite:///{store}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("mlipops")
    exp_id = exp.experiment_id if exp else client.create_experiment(
        "mlipops", artifact_location=(store.parent / "mlartifacts").as_uri())
    run = client.create_run(exp_id, run_name=f"cu-ensemble-{seed}", tags={"stage": "train"})
    client.log_param(run.info.run_id, "train.epochs", "3")
    client.log_artifacts(run.info.run_id, str(model_dir), "model")
    client.set_terminated(run.info.run_id)
    mlflow.set_tracking_uri(uri)
    (model_dir / "run.json").write_text(json.dumps({
        "run_id": run.info.run_id, "experiment_id": exp_id, "artifact_uri": run.info.artifact_uri,
        "tracking_uri": uri, "data_md5": f"{seed:032x}", "member_run_ids": []}))
    return root


def _promote(project: Path, monkeypatch) -> dict:
    from mlipops.promote import run

    monkeypatch.chdir(project)
    p = load_params(project / "params.yaml")
    return run(p.promote, "cu")


GOOD = {"val.force_mae": 0.1, "val.*.energy_mae_per_atom": 0.02, "melting:p_within_window": {"min": 0.2},
        "uncertainty:test.all.force_spearman": {"min": 0.3}}

# the files a promoted version holds, given the repo's reports (defects, paths, uncertainty, melting, nve)
EXPECTED = {"weights.pt", "config.json", "run.json", "gates.json", "model_card.md", "uncertainty.json",
            "melting_point.json", "reaction_paths.json",
            *[f"parity_{s}_{q}.png" for s in ("val", "test") for q in ("energy", "forces")],
            *[f"uncertainty/{f}" for f in ("calibration.png", "sigma_vs_error.png", "summary.md", "metrics.json")],
            *[f"defects/{f}" for f in ("defects.json", "summary.md", "metrics.json", "decomposition.png",
                                       "force_error_vs_geometry.png")],
            *[f"melting/{f}" for f in ("distribution.png", "traces_members.png", "traces_reference.png",
                                       "summary.md", "metrics.json")],
            *[f"paths/{f}" for f in ("path_adatom.png", "path_dimer.png")]}


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


def _assert_mlflow_agrees(store: Path, registry: Path) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    index = json.loads((registry / "index.json").read_text())
    entry = index["models"]["cu"]
    mvs = {int(v.version): v for v in client.search_model_versions("name='cu'")}
    assert [v["version"] for v in entry["versions"]] == sorted(mvs)
    for v in entry["versions"]:
        assert v["run_id"] == mvs[v["version"]].run_id and (registry / v["path"] / "weights.pt").is_file()
        assert mvs[v["version"]].tags["data.dvc_md5"] == v["data_md5"]
    assert entry["aliases"] == {a: int(n) for a, n in client.get_registered_model("cu").aliases.items()}
    assert set(entry["aliases"].values()) <= set(mvs)
    return entry


def test_promotion_files_aliases_and_a_failed_gate(tmp_path, monkeypatch):
    if not (ROOT / "reports/evaluate/nve/metrics.json").is_file():
        pytest.skip("the repo's reports/evaluate/nve is missing: run `dvc repro nve`")
    EXPECTED.update({"nve/energy.png", "nve/summary.md", "nve/metrics.json"})
    store, registry = tmp_path / "mlflow.db", tmp_path / "registry"
    a = _project(tmp_path / "a", store, registry, GOOD, seed=1)
    m = _promote(a, monkeypatch)
    assert m["promoted"] and m["version"] == 1
    assert _files(registry / "cu/v1") == EXPECTED
    assert not list((registry / "cu").glob(".v*"))  # no temporary folder left
    gates = json.loads((registry / "cu/v1/gates.json").read_text())
    assert {g["gate"] for g in gates} >= {"val.force_mae", "val.liquid.energy_mae_per_atom", "melting:p_within_window",
                                         "n_nonfinite_predictions", "uncertainty.val.all.force_spearman (minimum)"}
    card = (registry / "cu/v1/model_card.md").read_text()
    for section in ("## Gates", "## Training settings", "## Data coverage", "## Known limits", "## Uncertainty",
                    "## Melting point", "## Energy conservation", "![Tm distribution](melting/distribution.png)"):
        assert section in card, section
    assert "| epochs | 3 |" in card  # from the MLflow run's params
    assert _assert_mlflow_agrees(store, registry)["aliases"] == {"champion": 1}

    b = _project(tmp_path / "b", store, registry, GOOD, seed=2)
    assert _promote(b, monkeypatch)["version"] == 2
    entry = _assert_mlflow_agrees(store, registry)
    assert entry["aliases"] == {"champion": 2, "previous": 1}  # the alias moved; v1 kept as previous
    assert (registry / "cu/v1/weights.pt").is_file()

    from mlipops.models.calculator import resolve_model

    assert resolve_model("cu@champion", registry) == registry / "cu/v2"
    assert resolve_model("cu@previous", registry) == registry / "cu/v1"

    c = _project(tmp_path / "c", store, registry, GOOD | {"val.force_mae": 1e-9}, seed=3)
    m = _promote(c, monkeypatch)
    assert not m["promoted"] and m["version"] is None and m["n_gates_failed"] == 1
    decision = (c / "reports/promote/decision.md").read_text()
    assert "REJECTED" in decision and "`val.force_mae`" in decision and "still v2" in decision
    assert "exceeds the maximum by" in decision
    entry = _assert_mlflow_agrees(store, registry)
    assert entry["aliases"] == {"champion": 2, "previous": 1} and len(entry["versions"]) == 2


def _env() -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return env


# Each process imports everything first, waits for a common start time, then runs `mlipops promote`
# with every file copy slowed down: the critical sections of the three really overlap (without the
# registry's file lock the aliases, index.json or the registered model's creation race; checked by hand).
RACER = """
import shutil, sys, time
import mlflow, mlipops.promote.registry
from mlipops.cli import main
copy2 = shutil.copy2
def slow(*a, **k):
    time.sleep(0.02)
    return copy2(*a, **k)
shutil.copy2 = slow
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
sys.argv = ["mlipops", "promote"]
main()
"""


def test_concurrent_promotions_leave_a_consistent_registry(tmp_path):
    """Three `mlipops promote` processes at once, three models, one registry and one MLflow store."""
    import time

    store, registry = tmp_path / "mlflow.db", tmp_path / "registry"
    projects = [_project(tmp_path / f"p{k}", store, registry, GOOD, seed=10 + k) for k in range(3)]
    start = time.time() + 25  # after every process's imports (2 cores, 3 processes)
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(start)], cwd=p, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in projects]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    assert time.time() > start
    versions = sorted(json.loads((p / "reports/promote/metrics.json").read_text())["version"] for p in projects)
    assert versions == [1, 2, 3]  # unique
    entry = _assert_mlflow_agrees(store, registry)  # index.json valid, complete and equal to MLflow's view
    assert len(entry["versions"]) == 3
    aliases = entry["aliases"]
    assert set(aliases) == {"champion", "previous"} and aliases["champion"] != aliases["previous"]
    # serialised (a version is created inside the lock): the champion is the last one promoted, the
    # previous the one before it
    assert aliases["champion"] == 3 and aliases["previous"] == 2
    for v in (1, 2, 3):
        assert _files(registry / f"cu/v{v}") >= {"weights.pt", "config.json", "model_card.md", "gates.json"}
    assert not list((registry / "cu").glob(".v*"))


def test_registry_cli_list_show_load(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mlipops.cli import app

    store, registry = tmp_path / "mlflow.db", tmp_path / "registry"
    _promote(_project(tmp_path / "a", store, registry, GOOD, seed=1), monkeypatch)
    _promote(_project(tmp_path / "b", store, registry, GOOD, seed=2), monkeypatch)
    runner = CliRunner()
    r = runner.invoke(app, ["registry", "list", "--registry", str(registry), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [(x["version"], x["aliases"]) for x in rows] == [(1, "previous"), (2, "champion")]
    assert rows[1]["gates"].split("/")[0] == rows[1]["gates"].split("/")[1]  # all passed
    r = runner.invoke(app, ["registry", "show", "cu", "--registry", str(registry)])
    assert r.exit_code == 0 and "Model card: cu v2" in r.stdout and "weights.pt" in r.stdout

    from ase.build import bulk
    from ase.io import write

    s = tmp_path / "s.extxyz"
    write(s, [bulk("Cu", "fcc", a=3.6, cubic=True), bulk("Cu", "fcc", a=3.7, cubic=True).repeat(2)])
    r = runner.invoke(app, ["registry", "load", "cu@v1", "--registry", str(registry), "-s", str(s), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [x["n_atoms"] for x in out] == [4, 32] and all(math.isfinite(x["energy"]) for x in out)
    assert all(x["energy_std"] > 0 for x in out)  # two different members
    from mlipops.models import MlipopsCalculator

    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.calc = MlipopsCalculator.from_registry("cu@v1", registry_dir=registry)
    assert a.get_potential_energy() == pytest.approx(out[0]["energy"], rel=1e-12)

    # user errors through the real entry point: one line, exit 2, no traceback
    for args, msg in ((["load", "cu@v7", "--registry", str(registry)], "has no version 7"),
                      (["show", "cu@best", "--registry", str(registry)], "has no alias 'best'"),
                      (["list", "--registry", str(tmp_path / "none")], "registry index missing")):
        r = subprocess.run([sys.executable, "-m", "mlipops.cli", "registry", *args], cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
