"""Promotion: gates, the MLflow Model Registry and registry/ kept in agreement, aliases, concurrency, CLI;
a rejection as a result (every output, exit 0, --strict), reports of another model, gates not applicable.

Every test uses a real MLflow sqlite store and real (small, untrained) ensembles saved the way the
train stage saves them. Hermetic: each test builds its own project in tmp_path, with evaluation reports
in the evaluate stages' formats (metrics, provenance.json, uncertainty.json, ...) for that project's model;
nothing is read from the working tree's reports/, data/ or registry/.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mlipops.errors import ParamsError
from mlipops.params import GateBound, PromoteParams, load_params
from mlipops.promote.gates import check_gates
from mlipops.provenance import model_identity, write_provenance

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
                                 "melting:p_within_window": {"min": 0.2},
                                 "melting:tm_mean": {"min": 1200, "max": 1400}}).gates
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
    na = PromoteParams(gates={"melting:tm_mean": {"not_applicable": "no reference oracle for Si"}}).gates
    assert na["melting:tm_mean"] == GateBound(not_applicable="no reference oracle for Si")
    for bad in ({"x": {}}, {"x": {"maximum": 1}}, {"x": "low"}, {"x": {"not_applicable": ""}},
                {"x": {"max": 1, "not_applicable": "why"}}, {"x": {"not_applicable": 3}}):
        f.write_text(yaml.safe_dump(base | {"promote": {"gates": bad}}))
        with pytest.raises(ParamsError) as err:
            load_params(f)
        assert "promote" in str(err.value)


# ------------------------------------------------------------------------------- promotion, for real
PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)  # the promote stage copies plots, it does not read them


def _eval_reports(root: Path, model_dir: Path, main: dict | None = None, melting_bias: float = 20.0) -> Path:
    """reports/evaluate/ for the model in ``model_dir``, in the formats the evaluate, uncertainty, defects, melting
    and nve stages write, each with the provenance.json its stage writes (the melting report through the stage's
    own combine/flat_metrics/conclusion)."""
    from mlipops.evaluate import melting_stage
    from mlipops.report import write_metrics

    d = root / "reports/evaluate"
    ids = model_identity(model_dir, "cu")
    write_metrics(d, {"val.force_mae": 0.05, "val.energy_mae_per_atom": 0.004, "val.liquid.energy_mae_per_atom": 0.006,
                      "val.crystal_fcc.energy_mae_per_atom": 0.002, "test.vacancy.force_mae": 0.06,
                      "test.liquid.force_mae": 0.07, "test.force_mae": 0.03, "test.without_paths.force_mae": 0.03,
                      "n_nonfinite_predictions": 0,
                      "path.path_adatom.exit_coordinate": 1.47} | (main or {}))
    (d / "reaction_paths.json").write_text(json.dumps({"path_adatom": {"summary": "leaves its hull at 1.47 Å"}}))
    for s in ("val", "test"):
        for q in ("energy", "forces"):
            (d / f"parity_{s}_{q}.png").write_bytes(PNG)
    (d / "paths").mkdir()
    (d / "paths/path_adatom.png").write_bytes(PNG)
    write_provenance(d, "evaluate", **ids)

    u = d / "uncertainty"
    m = {"val.all.force_spearman": 0.6, "val.all.energy_spearman": 0.5, "test.all.force_spearman": 0.55,
         "test.all.force_coverage_1sigma": 0.6, "test.all.force_coverage_1sigma_recalibrated": 0.67}
    write_metrics(u, m | {"gate.passed": 1})
    (u / "uncertainty.json").write_text(json.dumps({
        "format": "mlipops.uncertainty/1", "scale": {"energy": 1.2, "forces": 1.5}, "fit_split": "val",
        "gate": {"metric": "val.all.force_spearman", "value": 0.6, "min": 0.3, "passed": True}, "metrics": m}))
    (u / "summary.md").write_text("# uncertainty\n")
    for f in ("sigma_vs_error.png", "calibration.png"):
        (u / f).write_bytes(PNG)
    write_provenance(u, "evaluate", **ids)

    x = d / "defects"
    write_metrics(x, {"vacancy.force_mae_atom": 0.05, "n_recommended": 1})
    (x / "defects.json").write_text(json.dumps({"conclusion": ["Vacancies: the error follows coordination."]}))
    (x / "summary.md").write_text("# defects\n")
    for f in ("force_error_vs_geometry.png", "decomposition.png"):
        (x / f).write_bytes(PNG)
    write_provenance(x, "defects", model_name=None, model_weights_sha256=None, data_md5=ids["data_md5"],
                     applies_to="architecture")

    ml = d / "melting"
    members = [{"member": k, "tm_mean": 1300.0 + melting_bias + dt, "tm_stderr": 20.0, "tm_std": 0.0, "n_accepted": 1,
                "n_rejected": 0, "runs": []} for k, dt in enumerate((-10.0, 0.0, 10.0))]
    ref = {"available": True, "tm_mean": 1300.0, "tm_stderr": 12.0, "oracle": {"calculator": "emt"}}
    result = melting_stage.combine(members, ref, 50.0) | {"members": members, "model": "cu", "preset": "quick",
                                                          "reference": ref}
    result["conclusion"] = melting_stage.conclusion(result)
    write_metrics(ml, melting_stage.flat_metrics(result))
    (ml / "melting_point.json").write_text(json.dumps(result))
    (ml / "summary.md").write_text("# melting\n")
    for f in ("distribution.png", "traces_members.png", "traces_reference.png"):
        (ml / f).write_bytes(PNG)
    write_provenance(ml, "melting", **ids)

    n = d / "nve"
    write_metrics(n, {"energy_drift_meV_per_atom_per_ps": 0.01, "abs_energy_drift_meV_per_atom_per_ps": 0.01,
                      "finite": 1, "n_atoms": 32, "mean_temperature_K": 600.0, "timestep_fs": 2.0, "steps": 500})
    (n / "summary.md").write_text("# nve\n")
    (n / "energy.png").write_bytes(PNG)
    write_provenance(n, "nve", **ids)
    return d


def _shared(tmp_path: Path, *names: str) -> tuple[Path, Path, dict[str, Path]]:
    """An MLflow store, a registry and the roots of the projects ``names`` that share them. A project's
    ``promote.registry_dir`` lies inside it (below data/, registry/ or reports/), so each project lies in the
    data/ folder of the one before, and the registry in the last one."""
    roots, parent = {}, tmp_path
    for n in names:
        roots[n] = parent / n
        parent = roots[n] / "data"
    return tmp_path / "mlflow.db", roots[names[-1]] / "registry", roots


def _project(root: Path, store: Path, registry: Path, gates: dict, seed: int, reports: bool = True, **kw) -> Path:
    """A project: a small ensemble logged to a real MLflow run, saved as the train stage saves it (run.json),
    and (``reports``) its own evaluation reports (:func:`_eval_reports`, ``kw`` passed on)."""
    import mlflow
    import torch
    from mlflow import MlflowClient

    from mlipops.models import Ensemble, Potential

    root.mkdir(parents=True, exist_ok=True)  # a project inside another's data/ may hold the shared registry already
    (root / "params.yaml").write_text(yaml.safe_dump({
        "ingest": {"sources": [{"path": "x.extxyz"}]}, "validate": {"allowed_species": ["Cu"]},
        "train": {"model_name": "cu"},
        "promote": {"registry_dir": os.path.relpath(registry, root), "gates": gates}}))
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
        "run_id": run.info.run_id, "experiment_id": exp_id, "tracking_uri": uri, "data_md5": f"{seed:032x}",
        "member_run_ids": []}))
    if reports:
        _eval_reports(root, model_dir, **kw)
    return root


def _promote(project: Path, monkeypatch) -> dict:
    from mlipops.promote import run

    monkeypatch.chdir(project)
    p = load_params(project / "params.yaml")
    return run(p.promote, "cu")


GOOD = {"val.force_mae": 0.1, "val.*.energy_mae_per_atom": 0.02, "melting:bias_significance_excess_K": 0.0,
        "melting:n_members_accepted": {"min": 3}, "uncertainty:test.all.force_spearman": {"min": 0.3},
        "nve:abs_energy_drift_meV_per_atom_per_ps": 0.1, "defects:vacancy.force_mae_atom": 0.1,
        "path.path_adatom.exit_coordinate": {"min": 1.4}}

# the files a promoted version holds, given _eval_reports (defects, paths, uncertainty, melting, nve)
EXPECTED = {"weights.pt", "config.json", "run.json", "gates.json", "model_card.md", "uncertainty.json",
            "coverage.json", "report.html",
            "melting_point.json", "reaction_paths.json",
            *[f"parity_{s}_{q}.png" for s in ("val", "test") for q in ("energy", "forces")],
            *[f"uncertainty/{f}" for f in ("calibration.png", "sigma_vs_error.png", "summary.md", "metrics.json",
                                           "provenance.json")],
            *[f"defects/{f}" for f in ("defects.json", "summary.md", "metrics.json", "decomposition.png",
                                       "force_error_vs_geometry.png", "provenance.json")],
            *[f"melting/{f}" for f in ("distribution.png", "traces_members.png", "traces_reference.png",
                                       "summary.md", "metrics.json", "provenance.json")],
            *[f"nve/{f}" for f in ("energy.png", "summary.md", "metrics.json", "provenance.json")],
            "paths/path_adatom.png"}


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
    store, registry, at = _shared(tmp_path, "a", "b", "c")
    a = _project(at["a"], store, registry, GOOD, seed=1)
    m = _promote(a, monkeypatch)
    assert m["promoted"] and m["version"] == 1
    assert _files(registry / "cu/v1") == EXPECTED
    assert not list((registry / "cu").glob(".v*"))  # no temporary folder left
    gates = json.loads((registry / "cu/v1/gates.json").read_text())
    assert {g["gate"] for g in gates} >= {"val.force_mae", "val.liquid.energy_mae_per_atom",
                                         "melting:bias_significance_excess_K", "n_nonfinite_predictions",
                                         "uncertainty.val.all.force_spearman (minimum)"}
    assert all(g["passed"] for g in gates) and m["promoted"] == 1 and m["n_gates"] == len(gates)
    card = (registry / "cu/v1/model_card.md").read_text()
    for section in ("## Gates", "## Training settings", "## Data coverage", "## Known limits", "## Uncertainty",
                    "## Melting point", "## Energy conservation", "![Tm distribution](melting/distribution.png)"):
        assert section in card, section
    assert "| epochs | 3 |" in card  # from the MLflow run's params
    assert model_identity(a / "data/models/cu")["model_weights_sha256"] in card
    page = (registry / "cu/v1/report.html").read_text()  # the version's own page (tests/test_report_html.py)
    assert "<title>cu v1: model report</title>" in page and page.count('<tr class="pass">') == len(gates)
    n_png = len([f for f in EXPECTED if f.endswith(".png")])  # each a figure; the card's Tm distribution again
    assert page.count("<figure ") == n_png and page.count('src="data:image/png;base64,') == n_png + 1
    assert json.loads((registry / "cu/v1/coverage.json").read_text())["available"] is False  # no index here
    assert _assert_mlflow_agrees(store, registry)["aliases"] == {"champion": 1}
    assert _tags(store, a)[:2] == ("promoted", "1")
    _assert_version_explains_itself(store, registry, a)

    b = _project(at["b"], store, registry, GOOD, seed=2)
    assert _promote(b, monkeypatch)["version"] == 2
    entry = _assert_mlflow_agrees(store, registry)
    assert entry["aliases"] == {"champion": 2, "previous": 1}  # the alias moved; v1 kept as previous
    assert (registry / "cu/v1/weights.pt").is_file()

    from mlipops.models.calculator import resolve_model

    assert resolve_model("cu@champion", registry) == registry / "cu/v2"
    assert resolve_model("cu@previous", registry) == registry / "cu/v1"

    c = _project(at["c"], store, registry, GOOD | {"val.force_mae": 1e-9}, seed=3)
    m = _promote(c, monkeypatch)
    assert not m["promoted"] and m["version"] is None and m["n_gates_failed"] == 1
    decision = (c / "reports/promote/decision.md").read_text()
    assert "REJECTED" in decision and "`val.force_mae`" in decision and "still v2" in decision
    assert "exceeds the maximum by" in decision
    entry = _assert_mlflow_agrees(store, registry)
    assert entry["aliases"] == {"champion": 2, "previous": 1} and len(entry["versions"]) == 2
    assert _tags(store, c) == ("rejected", None, "val.force_mae")


def _assert_version_explains_itself(store: Path, registry: Path, project: Path) -> None:
    """v1 in MLflow: an MLflow pyfunc (the registry folder's weights and σ recalibration, loaded and predicting
    what MlipopsCalculator predicts), the model card as description, one tag per gate with value and bound, the
    version folder and the decision as the run's artifacts, the headline metrics in the run and headline.json."""
    import io

    import mlflow
    import pandas as pd
    from ase.build import bulk
    from ase.io import write

    from mlipops.models.calculator import MlipopsCalculator

    c = _client(store)
    mv = c.get_model_version("cu", "1")
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    logged = mlflow.get_logged_model(mv.source.removeprefix("models:/")) if mv.source.startswith("models:/m-") \
        else None  # the pyfunc logged from code into the training run (mlflow.set_tracking_uri below)
    assert logged is not None and logged.source_run_id == mv.run_id
    model = mlflow.pyfunc.load_model("models:/cu@champion")
    assert [s.name for s in model.metadata.get_input_schema().inputs] == ["extxyz", "numbers", "positions", "cell",
                                                                           "pbc"]
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=3)
    text = io.StringIO()
    write(text, atoms, format="extxyz")
    pred = model.predict(pd.DataFrame({"extxyz": [text.getvalue()]}))
    arrays = model.predict(pd.DataFrame({"numbers": [atoms.numbers.tolist()], "positions": [atoms.positions.tolist()],
                                         "cell": [atoms.cell.array.tolist()], "pbc": [[True, True, True]]}))
    atoms.calc = MlipopsCalculator(registry / "cu/v1")
    e = atoms.get_potential_energy()
    for out in (pred, arrays):
        assert out["energy"][0] == pytest.approx(e, abs=1e-9) and out["n_atoms"][0] == len(atoms)
        assert np.allclose(np.array(out["forces"][0]), atoms.get_forces(), atol=1e-9)
        assert out["energy_std"][0] == pytest.approx(atoms.calc.results["energy_std"], rel=1e-9)  # recalibrated
    assert atoms.calc.sigma_scale["energy"] == pytest.approx(1.2)  # the folder's uncertainty.json, not 1
    with pytest.raises(Exception, match="row 0, field extxyz"):
        model.predict(pd.DataFrame({"extxyz": ["not a structure"]}))

    assert mv.description.startswith("# Model card: cu v1") and len(mv.description) <= 5000
    assert "## Gates" in mv.description
    gates = json.loads((registry / "cu/v1/gates.json").read_text())
    assert mv.tags["gate.val.force_mae"].startswith("pass: ") and "≤ 0.1" in mv.tags["gate.val.force_mae"]
    assert mv.tags["gate.uncertainty.val.all.force_spearman minimum"].startswith("pass: ")
    assert sum(k.startswith("gate.") for k in mv.tags) == len(gates) and "gates" not in mv.tags
    run = c.get_run(mv.run_id)
    arts = {a.path for a in c.list_artifacts(mv.run_id, "registry/v1")}
    assert {"registry/v1/model_card.md", "registry/v1/gates.json", "registry/v1/melting",
            "registry/v1/report.html"} <= arts
    assert {a.path for a in c.list_artifacts(mv.run_id, "promotion")} == {"promotion/decision.md",
                                                                          "promotion/gates.json"}
    head = json.loads((project / "reports/promote/headline.json").read_text())
    assert head["promoted"] == 1 and head["gates_failed"] == 0 and head["tm_bias_K"] == pytest.approx(20.0)
    assert head["test_force_mae_meV_per_A"] == pytest.approx(1000 * 0.03)
    assert {k: run.data.metrics[k] for k in head} == pytest.approx(head)  # the same numbers in the run


def _client(store: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store}")


def _tags(store: Path, project: Path) -> tuple:
    """The promotion tags of the project's training run: decision, version, failed gates."""
    run_id = json.loads((project / "data/models/cu/run.json").read_text())["run_id"]
    t = _client(store).get_run(run_id).data.tags
    return (t.get("promotion"), *(t.get(f"mlipops.promotion.{k}") for k in ("version", "failed_gates")))


def test_a_rejection_writes_every_output_exits_0_and_tags_the_run(tmp_path, monkeypatch):
    """No registry yet, a gate fails: registry/ is created with an empty index (DVC's declared out), decision.md,
    gates.json and metrics.json (promoted 0) are written, the exit status is 0 (3 with --strict), and the
    training run is tagged with the decision and the failed gates."""
    from typer.testing import CliRunner

    from mlipops.cli import app

    store, registry, at = _shared(tmp_path, "a")
    bad = GOOD | {"val.force_mae": 1e-9, "test.*.force_mae": 0.065}  # test.liquid fails as well
    a = _project(at["a"], store, registry, bad, seed=1)
    monkeypatch.chdir(a)
    for args, code in ((["promote"], 0), (["promote", "--strict"], 3)):
        for f in (a / "reports/promote").glob("*"):
            f.unlink()
        r = CliRunner().invoke(app, args)
        assert r.exit_code == code, r.output
        assert json.loads((registry / "index.json").read_text()) == {"models": {}}
        assert {f.name for f in (a / "reports/promote").iterdir()} == {"decision.md", "gates.json", "metrics.json",
                                                                        "headline.json"}
        m = json.loads((a / "reports/promote/metrics.json").read_text())
        assert m["promoted"] == 0 and type(m["promoted"]) is int and m["version"] is None
        assert m["n_gates_failed"] == 2 and m["n_gates_passed"] == m["n_gates"] - 2
        gates = json.loads((a / "reports/promote/gates.json").read_text())
        assert sorted(g["gate"] for g in gates if not g["passed"]) == ["test.liquid.force_mae", "val.force_mae"]
        decision = (a / "reports/promote/decision.md").read_text()
        assert ("REJECTED" in decision and "failed 2 of" in decision
                and "tagged `promotion=rejected`" in decision)
    assert "--strict" in r.output and "rejected" in r.output
    decision_tag, version_tag, failed_tag = _tags(store, a)
    assert (decision_tag, version_tag) == ("rejected", None)
    assert sorted(failed_tag.split(",")) == ["test.liquid.force_mae", "val.force_mae"]
    assert not _client(store).search_registered_models()  # nothing registered

    # a run MLflow does not know (e.g. another store): still a written decision, the failed tag said, no crash
    info = json.loads((a / "data/models/cu/run.json").read_text())
    (a / "data/models/cu/run.json").write_text(json.dumps(info | {"run_id": "0" * 32}))
    m = _promote(a, monkeypatch)
    assert m["promoted"] == 0
    assert "was NOT tagged with this decision: MlflowException" in (a / "reports/promote/decision.md").read_text()


def test_a_promotion_after_a_rejection_retags_the_run_and_keeps_the_registry(tmp_path, monkeypatch):
    store, registry, at = _shared(tmp_path, "a")
    a = _project(at["a"], store, registry, GOOD | {"val.force_mae": 1e-9}, seed=1)
    assert _promote(a, monkeypatch)["promoted"] == 0 and _tags(store, a)[0] == "rejected"
    (a / "params.yaml").write_text((a / "params.yaml").read_text().replace("1.0e-09", "0.1"))
    assert _promote(a, monkeypatch)["version"] == 1
    assert _tags(store, a) == ("promoted", "1", "")
    index = json.loads((registry / "index.json").read_text())
    (a / "params.yaml").write_text((a / "params.yaml").read_text().replace("val.force_mae: 0.1",
                                                                           "val.force_mae: 1.0e-09"))
    assert _promote(a, monkeypatch)["promoted"] == 0
    assert json.loads((registry / "index.json").read_text()) == index  # the registry unchanged by a rejection
    assert _tags(store, a) == ("rejected", None, "val.force_mae")


def test_failed_gates_tag_is_cut_to_mlflow_limit():
    from mlipops.promote.registry import _join_limited

    keys = [f"test.config_{k:03d}.force_mae" for k in range(400)]
    out = _join_limited(keys, 500)
    assert len(out) <= 500 and out.startswith("test.config_000.force_mae,") and out.endswith(" more)")
    kept = out.split(",")[:-1]
    assert kept == keys[:len(kept)] and out.split(",")[-1] == f"…(+{400 - len(kept)} more)"
    assert _join_limited(keys[:3], 500) == ",".join(keys[:3])


def test_reports_of_another_model_or_data_version_fail_their_gates(tmp_path, monkeypatch):
    """The melting report of another model (other weights), an nve report without provenance and a defects
    report of other data: each fails all its gates and says why; the other reports' gates still pass."""
    store, registry, at = _shared(tmp_path, "other", "a")
    other = _project(at["other"], store, registry, GOOD, seed=7)
    a = _project(at["a"], store, registry, GOOD, seed=1)
    ev = a / "reports/evaluate"
    shutil.rmtree(ev / "melting")
    shutil.copytree(other / "reports/evaluate/melting", ev / "melting")  # passes on its own numbers
    (ev / "nve/provenance.json").unlink()
    write_provenance(ev / "defects", "defects", model_name=None, model_weights_sha256=None, data_md5="f" * 32,
                     applies_to="architecture")
    m = _promote(a, monkeypatch)
    assert m["promoted"] == 0 and not (registry / "cu").exists()
    rows = _by_gate(json.loads((a / "reports/promote/gates.json").read_text()))
    mine, theirs = (model_identity(p / "data/models/cu")["model_weights_sha256"] for p in (a, other))
    for gate in ("melting:bias_significance_excess_K", "melting:n_members_accepted"):
        r = rows[gate]
        assert not r["passed"] and r["value"] is not None  # the value is shown, but it is not this model's
        assert (f"report reports/evaluate/melting was computed for model sha256 {theirs[:12]}… (cu) but the promoted "
                f"model is {mine[:12]}… (cu)") in r["note"]
    assert not rows["nve:abs_energy_drift_meV_per_atom_per_ps"]["passed"]
    assert "reports/evaluate/nve has no provenance.json" in rows["nve:abs_energy_drift_meV_per_atom_per_ps"]["note"]
    d = rows["defects:vacancy.force_mae_atom"]
    assert not d["passed"] and "computed for data md5 ffffffffffff…" in d["note"]
    assert {k for k, r in rows.items() if not r["passed"]} == {
        "melting:bias_significance_excess_K", "melting:n_members_accepted", "nve:abs_energy_drift_meV_per_atom_per_ps",
        "defects:vacancy.force_mae_atom"}
    decision = (a / "reports/promote/decision.md").read_text()
    assert "Reports not computed for this model or data version" in decision and theirs[:12] in decision

    # the evaluate report of other weights fails the main gates and the uncertainty report's own gate too
    shutil.rmtree(ev)
    _eval_reports(a, other / "data/models/cu")
    rows = _by_gate(check_gates(PromoteParams(gates=GOOD).gates, ev, expect=model_identity(a / "data/models/cu", "cu")))
    assert not any(r["passed"] for r in rows.values())
    from mlipops.promote.registry import uncertainty_gate

    monkeypatch.chdir(a)
    u = uncertainty_gate(model_identity(a / "data/models/cu", "cu"))
    assert not u["passed"] and "reports/evaluate/uncertainty was computed for model sha256" in u["note"]
    assert uncertainty_gate()["passed"]  # its own numbers pass: only the provenance fails it


def test_a_gate_not_applicable_is_shown_with_its_reason_and_does_not_block(tmp_path, monkeypatch):
    store, registry, at = _shared(tmp_path, "a", "other")
    why = "no reference oracle for Si"
    gates = GOOD | {"melting:bias_significance_excess_K": {"not_applicable": why},
                    "melting:n_members_accepted": {"not_applicable": why},
                    "n_nonfinite_predictions": {"not_applicable": "cannot be switched off"}}
    a = _project(at["a"], store, registry, gates, seed=1)
    # the melting report left there is another model's (the copper one, for a Si model): no gate reads it, and
    # it does not travel with this model either
    other = _project(at["other"], store, registry, GOOD, seed=7)
    shutil.rmtree(a / "reports/evaluate/melting")
    shutil.copytree(other / "reports/evaluate/melting", a / "reports/evaluate/melting")
    m = _promote(a, monkeypatch)
    assert m["promoted"] == 1 and m["n_gates_not_applicable"] == 2 and m["n_gates_failed"] == 0
    rows = _by_gate(json.loads((a / "reports/promote/gates.json").read_text()))
    na = rows["melting:bias_significance_excess_K"]
    assert na["passed"] is None and na["bound"] == "n/a" and na["not_applicable"] == why
    assert rows["n_nonfinite_predictions"]["passed"] is True  # the always-checked gate is checked anyway
    decision = (a / "reports/promote/decision.md").read_text()
    assert ("| melting:bias_significance_excess_K | n/a | None | None | n/a "
            "| not applicable: no reference oracle for Si |" in decision)
    card = (registry / "cu/v1/model_card.md").read_text()
    assert "| melting:bias_significance_excess_K | n/a | None | None | n/a |" in card
    assert f"`melting:bias_significance_excess_K`: {why}" in card and "Not applicable" in card
    assert "## Melting point\n\n_not included: report reports/evaluate/melting was computed for model sha256" in card
    assert not (registry / "cu/v1/melting").exists() and not (registry / "cu/v1/melting_point.json").exists()
    assert (registry / "cu/v1/nve/provenance.json").is_file()  # this model's reports do
    entry = json.loads((registry / "index.json").read_text())["models"]["cu"]["versions"][0]
    assert (entry["n_gates_passed"], entry["n_gates_not_applicable"]) == (entry["n_gates"], 2)


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

    store, registry, at = _shared(tmp_path, "p0", "p1", "p2")
    projects = [_project(at[f"p{k}"], store, registry, GOOD, seed=10 + k) for k in range(3)]
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

    store, registry, at = _shared(tmp_path, "a", "b")
    _promote(_project(at["a"], store, registry, GOOD, seed=1), monkeypatch)
    _promote(_project(at["b"], store, registry, GOOD, seed=2), monkeypatch)
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
