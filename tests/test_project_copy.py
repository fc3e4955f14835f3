"""A project can be copied, moved or cloned: nothing it writes holds an absolute path, and a copy
(or a moved project) writes into its own MLflow store and artifacts, never the original's.

Real components: a real sqlite MLflow store made through ``mlipops.tracking`` as the train stage
makes it, a small untrained ensemble saved the way train saves it, the ``mlipops promote`` CLI entry
point, MLflow's own sqlite file read back with sqlite3. (``run.json`` as the train stage itself writes
it: ``tests/test_physics_training.py::test_curriculum_phases_are_nested_mlflow_runs``.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import sys
from pathlib import Path

import yaml

from mlipops.provenance import model_identity, write_provenance
from mlipops import tracking

SMALL_D = {"cutoff": 4.0, "n_radial": 3, "n_angular": 2, "max_l": 1}
URI = "sqlite:///mlflow.db"  # the params' default: relative to the project root


def _finished_project(root: Path, monkeypatch) -> Path:
    """A trained model as the train stage leaves it (weights, config, run.json; its MLflow run with the
    model as artifacts in the project's mlflow.db / mlartifacts/) and the evaluation reports promote
    reads, kept minimal: one metric under a gate it passes, the uncertainty report."""
    import torch

    from mlipops.models import Ensemble, Potential

    root.mkdir(parents=True)
    monkeypatch.chdir(root)
    (root / "params.yaml").write_text(yaml.safe_dump({
        "ingest": {"sources": [{"path": "x.extxyz"}]}, "validate": {"allowed_species": ["Cu"]},
        "train": {"model_name": "cu"}, "promote": {"gates": {"val.force_mae": 1.0}}}))
    torch.manual_seed(0)
    ens = Ensemble([Potential(["Cu"], SMALL_D, [4]) for _ in range(2)])
    model_dir = ens.save(root / "data/models/cu", extra={"model_name": "cu"})
    c = tracking.client(URI)
    exp = tracking.experiment_id(URI, "mlipops", "mlartifacts")
    run = c.create_run(exp, run_name="cu-ensemble", tags={"stage": "train"})
    c.log_artifacts(run.info.run_id, str(model_dir), "model")
    c.set_terminated(run.info.run_id)
    (model_dir / "run.json").write_text(json.dumps({  # the train stage's run.json (src/mlipops/train/run.py)
        "run_id": run.info.run_id, "experiment_id": exp, "tracking_uri": URI, "data_md5": "0" * 32,
        "member_run_ids": []}))
    ev = root / "reports/evaluate"
    (ev / "uncertainty").mkdir(parents=True)
    (ev / "metrics.json").write_text(json.dumps({"val.force_mae": 0.5, "n_nonfinite_predictions": 0}))
    (ev / "uncertainty/uncertainty.json").write_text(json.dumps(
        {"available": False, "reason": "not computed", "gate": {"passed": True, "value": None}}))
    ids = model_identity(model_dir, "cu")  # the reports were computed for this model (promote checks it)
    write_provenance(ev, "evaluate", **ids)
    write_provenance(ev / "uncertainty", "evaluate", **ids)
    return root


def _cli(root: Path, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``mlipops <args>`` in ``root`` (the CLI's entry point, in this process): exit code, stdout, stderr."""
    from mlipops.cli import main

    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", ["mlipops", *args])
    capsys.readouterr()
    try:
        main()
        rc = 0
    except SystemExit as exc:
        rc = exc.code or 0
    out, err = capsys.readouterr()
    return rc, out, err


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _tree(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*")}


def _strings(doc):
    if isinstance(doc, dict):
        for v in doc.values():
            yield from _strings(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _strings(v)
    elif isinstance(doc, str):
        yield doc


def _assert_no_absolute_path(run_json: Path, *roots: Path) -> None:
    text = run_json.read_text()
    for r in roots:
        assert str(r) not in text, run_json
    doc = json.loads(text)
    assert doc["tracking_uri"] == "sqlite:///mlflow.db"  # as configured: resolved against the project root
    for s in _strings(doc):
        assert not s.startswith(("/", "file:", "sqlite:////")), (run_json, s)


def _locations(db: Path) -> list[str]:
    """Every artifact location MLflow recorded in the sqlite file (the columns relocate() rewrites)."""
    con = sqlite3.connect(db)
    try:
        out = []
        for table, col, where in tracking.LOCATION_COLUMNS:
            if col in {r[1] for r in con.execute(f"PRAGMA table_info({table})")}:
                out += [v for (v,) in con.execute(f"SELECT {col} FROM {table}" + (f" WHERE {where}" if where else ""))
                        if v]
        return out
    finally:
        con.close()


def test_a_copied_project_promotes_into_its_own_store_and_leaves_the_original_untouched(tmp_path, monkeypatch,
                                                                                           capsys):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a = _finished_project(tmp_path / "a", monkeypatch)
    md5_a, tree_a = _md5(a / "mlflow.db"), _tree(a / "mlartifacts")
    shutil.copytree(a, tmp_path / "b")
    b = tmp_path / "b"
    assert any(str(a) in loc for loc in _locations(b / "mlflow.db"))  # MLflow's own records: absolute, a's

    rc, out, err = _cli(b, monkeypatch, capsys, "promote")
    assert rc == 0, out + err
    assert f"copied or moved from {a}" in err  # logged (mlipops.log: standard error)
    assert json.loads((b / "reports/promote/metrics.json").read_text())["promoted"]

    # the original: byte-identical store, no new artifact, no registry
    assert _md5(a / "mlflow.db") == md5_a
    assert _tree(a / "mlartifacts") == tree_a
    assert not (a / "registry").exists()
    # the copy: the version is registered in its store, from its artifacts; nothing points at a any more
    client = MlflowClient(tracking_uri=f"sqlite:///{b / 'mlflow.db'}")
    (mv,) = client.search_model_versions("name='cu'")
    run_id = json.loads((b / "data/models/cu/run.json").read_text())["run_id"]
    assert mv.run_id == run_id and client.get_registered_model("cu").aliases == {"champion": mv.version}
    assert mv.source.startswith("models:/m-")  # the MLflow pyfunc logged into the copy's training run
    logged = client.get_logged_model(mv.source.removeprefix("models:/"))
    assert logged.source_run_id == run_id and logged.artifact_location.startswith((b / "mlartifacts").as_uri() + "/")
    loc = logged.artifact_location.split("/mlartifacts/", 1)[1]
    assert (b / "mlartifacts" / loc / "artifacts/model/weights.pt").is_file()
    locs = _locations(b / "mlflow.db")
    assert locs and not [loc for loc in locs if str(a) in loc]
    for r in (a / "data/models/cu/run.json", b / "data/models/cu/run.json", b / "registry/cu/v1/run.json"):
        _assert_no_absolute_path(r, a, b)

    # promoting again: the store is already this project's (no second relocation), the version is the same one
    rc, out, err = _cli(b, monkeypatch, capsys, "promote")
    assert rc == 0 and "copied or moved" not in out + err, out + err
    assert [v.version for v in client.search_model_versions("name='cu'")] == [mv.version]
    assert _md5(a / "mlflow.db") == md5_a

    # a clone (the model's files without the store it was trained in): a one-line error, not a registration
    c = tmp_path / "c"
    shutil.copytree(a, c, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    rc, out, err = _cli(c, monkeypatch, capsys, "promote")
    assert rc == 2 and "Traceback" not in err, out + err
    assert f"MLflow run {run_id} is not in the tracking store" in err and "run.json" in err
    assert _md5(a / "mlflow.db") == md5_a
    assert os.environ.get("MLFLOW_TRACKING_URI") is None  # MLflow's export of the store undone: no leak


def _store_with_a_run(root: Path, monkeypatch) -> tuple[str, str]:
    root.mkdir()
    monkeypatch.chdir(root)
    c = tracking.client("sqlite:///mlflow.db")
    exp = tracking.experiment_id("sqlite:///mlflow.db", "mlipops", "mlartifacts")
    run = c.create_run(exp)
    (root / "w.txt").write_text("weights")
    c.log_artifact(run.info.run_id, str(root / "w.txt"), "model")
    return exp, run.info.run_id


def test_a_moved_project_logs_into_its_new_place_and_other_stores_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    exp, run_id = _store_with_a_run(tmp_path / "p1", monkeypatch)
    # a store made before the experiment tag existed (legacy): relocated on the default layout
    con = sqlite3.connect(tmp_path / "p1/mlflow.db")
    with con:
        assert con.execute("DELETE FROM experiment_tags WHERE key = ?", (tracking.ARTIFACT_TAG,)).rowcount == 1
    con.close()
    os.rename(tmp_path / "p1", tmp_path / "p2 moved")  # a space: percent-encoded in the file:// URIs
    p2 = tmp_path / "p2 moved"
    monkeypatch.chdir(p2)
    assert tracking.relocate("sqlite:///mlflow.db") == [tmp_path / "p1"]
    c = tracking.client("sqlite:///mlflow.db")
    assert tracking.experiment_id("sqlite:///mlflow.db", "mlipops", "mlartifacts") == exp
    assert c.get_experiment(exp).tags[tracking.ARTIFACT_TAG] == "mlartifacts"  # tagged now
    (p2 / "x.txt").write_text("plot")
    c.log_artifact(run_id, str(p2 / "x.txt"), "plots")
    assert not (tmp_path / "p1").exists()  # nothing written at the old place
    assert {a.path for a in c.list_artifacts(run_id)} == {"model", "plots"}
    assert len(list((p2 / "mlartifacts").rglob("x.txt"))) == 1
    assert not [loc for loc in _locations(p2 / "mlflow.db") if "/p1/" in loc]

    # a store made elsewhere (here: in p2) but named by MLFLOW_TRACKING_URI, by an absolute sqlite path or
    # from outside the project: never rewritten
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(p2 / "mlflow.db", other / "mlflow.db")
    md5 = _md5(other / "mlflow.db")
    monkeypatch.chdir(other)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    assert tracking.project_store("sqlite:///mlflow.db") is None and tracking.relocate("sqlite:///mlflow.db") == []
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.relocate(f"sqlite:///{other / 'mlflow.db'}") == []
    monkeypatch.chdir(p2)
    assert tracking.project_store("sqlite:///../other/mlflow.db") is None
    assert tracking.relocate("sqlite:///../other/mlflow.db") == []
    assert _md5(other / "mlflow.db") == md5
    monkeypatch.chdir(other)  # the control: as this project's own store it is relocated
    assert tracking.relocate("sqlite:///mlflow.db") == [p2]
    assert _md5(other / "mlflow.db") != md5


def test_an_active_campaign_resumes_in_a_copied_project(tmp_path, monkeypatch):
    """The campaign's fingerprint (data/active/state.json) names the seed model relative to the project
    root: the same campaign in a copy, another campaign for another model."""
    from mlipops.active.loop import params_fingerprint
    from mlipops.params import ActiveParams

    p = ActiveParams.model_validate({"index": None})
    fps = []
    for name in ("a", "b"):
        (tmp_path / name / "data/models/cu").mkdir(parents=True)
        (tmp_path / name / "data/models/cu/weights.pt").write_bytes(b"weights")
        monkeypatch.chdir(tmp_path / name)
        fps += [params_fingerprint(p, "data/models/cu"), params_fingerprint(p, tmp_path / name / "data/models/cu")]
    assert len(set(fps)) == 1
    (tmp_path / "b/data/models/cu2").mkdir()
    (tmp_path / "b/data/models/cu2/weights.pt").write_bytes(b"weights")
    assert params_fingerprint(p, "data/models/cu2") != fps[0]
