"""The shipped examples on real DFT data (examples/<name>/): generated files in sync, and the mlearn-Mo
example's whole pipeline (`dvc repro promote` inside the example, a DVC sub-project) on a tiny subset."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_env import merge_params as _merge
from pipeline_env import pipeline_env as _env

from mlipops import examples
from mlipops.errors import ParamsError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mlearn-mo"


def test_every_example_is_in_sync_with_the_project():
    found = examples.examples(ROOT)
    assert EXAMPLE in found and (ROOT / "examples" / "mlearn-li") in found
    for folder in found:
        stale = examples.sync(ROOT, folder, check=True)
        assert not stale, f"{stale} out of date: run `mlipops example sync` and commit the result"


def test_example_dvc_points_at_the_project_sources_and_its_own_data():
    ex = examples.load_example(EXAMPLE)
    dvc = yaml.safe_load(examples.example_dvc(ROOT, EXAMPLE, ex))["stages"]
    root = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(dvc) == set(root) - set(ex["drop_stages"]) and "generate" not in dvc and "train" in dvc
    for name, st in dvc.items():
        for d in st.get("deps", []):
            assert not d.startswith("src/") and "cu_emt" not in d, (name, d)
        n_src = sum(str(d).startswith("src/") for d in root[name].get("deps", []))
        assert sum(str(d).startswith("../../src/") for d in st.get("deps", [])) == n_src, name
    sources = [s["path"] for s in ex["params"]["ingest"]["sources"]]
    assert [d for d in dvc["ingest"]["deps"] if d in sources] == sources
    for s in sources:  # the paths resolve from the example folder to ../shared/datasets/mlearn
        assert (EXAMPLE / s).resolve() == (ROOT / "../shared/datasets/mlearn" / Path(s).name).resolve()
    params = yaml.safe_load(examples.example_params(ROOT, ex))
    assert params["validate"]["allowed_species"] == ["Mo"] and params["train"]["model_name"] == "mo"
    assert params["descriptors"] == yaml.safe_load((ROOT / "params.yaml").read_text())["descriptors"]


def test_a_bad_example_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "example.yaml").write_text("drop_stages: [generate]\nparamz: {}\n")
    with pytest.raises(ParamsError, match=r"example\.yaml: only `drop_stages`"):
        examples.load_example(tmp_path)
    (tmp_path / "example.yaml").write_text("drop_stages: [no_such_stage]\nparams: {}\n")
    with pytest.raises(ParamsError, match="no_such_stage"):
        examples.example_dvc(ROOT, tmp_path, examples.load_example(tmp_path))


# ----------------------------------------------------------------------------- the whole pipeline, tiny
TINY = {
    "train": {"epochs": 3, "hidden": [8], "batch_size": 4, "ensemble": {"members": 2}},
    "descriptors": {"n_radial": 4, "n_angular": 2, "max_l": 2},
    "evaluate": {"defects": {"epochs": 5},
                 "uncertainty": {"min_spearman": -1.0},
                 # 32 atoms, a few hundred fs: the plumbing, not a melting point (runs may well be rejected)
                 "melting": {"quick": {"supercell": [2, 2, 4], "melt_steps": 60, "equilibration_steps": 10,
                                       "production_steps": 40, "max_production_steps": 40,
                                       "reference_seeds": 1, "member_seeds": 1},
                             "max_retries": 0, "calibration_steps": 10, "phase_steps": 20, "phase_snapshots": 2,
                             # the whole production (8 samples, the fewest the drift test needs) as the window
                             "window_fraction": 1.0, "drift_sigma": 1.0e6},
                 "nve": {"supercell": 2, "steps": 30, "discard_fs": 10.0}},
    "promote": {"gates": {"val.force_mae": 50.0, "nve:finite": {"min": 1}}},
}


def _subset(src: Path, dst: Path, per_config_type: int) -> int:
    """The first ``per_config_type`` frames of each (config_type, temperature) group of a real mlearn file."""
    import ase.io

    seen, keep = {}, []
    for a in ase.io.iread(str(src), format="extxyz"):
        key = (a.info.get("config_type"), a.info.get("temperature_K"))
        if seen.get(key, 0) < per_config_type:
            seen[key] = seen.get(key, 0) + 1
            keep.append(a)
    ase.io.write(str(dst), keep, format="extxyz")
    return len(keep)


def _run(cmd, cwd):
    res = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, (f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n"
                                 f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


@pytest.fixture(scope="module")
def mo_example(tmp_path_factory):
    """tmp/repo (this project's sources, the example) beside tmp/shared/datasets/mlearn (a subset of the real data)."""
    mlearn = (ROOT / "../shared/datasets/mlearn").resolve()
    if not (mlearn / "Mo_training.extxyz").is_file():
        pytest.skip(f"mlearn data not found at {mlearn} (../shared/datasets/mlearn relative to the project root)")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    base = tmp_path_factory.mktemp("example")
    data = base / "shared" / "datasets" / "mlearn"
    data.mkdir(parents=True)
    n_train = _subset(mlearn / "Mo_training.extxyz", data / "Mo_training.extxyz", 3)
    n_test = _subset(mlearn / "Mo_test.extxyz", data / "Mo_test.extxyz", 1)
    repo = base / "repo"
    repo.mkdir()
    for f in ("params.yaml", "dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / f, repo / f)
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    ex = repo / "examples" / "mlearn-mo"
    shutil.copytree(EXAMPLE, ex, ignore=shutil.ignore_patterns("data", "reports", "registry", "mlflow.db",
                                                                "mlartifacts", "dvc.lock", ".dvc"))
    (ex / "data").mkdir()
    shutil.copy(EXAMPLE / "data" / "quarantine_releases.yaml", ex / "data" / "quarantine_releases.yaml")
    doc = yaml.safe_load((ex / "example.yaml").read_text())
    doc["params"] = _merge(doc["params"], TINY)
    (ex / "example.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    examples.sync(repo, ex)  # params.yaml and dvc.yaml with the tiny settings
    _run(["git", "init", "-q"], repo)
    _run([sys.executable, "-m", "dvc", "init", "-q", "--subdir"], ex)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "tiny example"], repo)
    res = _run([sys.executable, "-m", "dvc", "repro", "promote"], ex)  # = make repro EXAMPLE=mlearn-mo
    return {"dir": ex, "log": res.stdout, "n": n_train + n_test, "n_test": n_test}


@pytest.mark.e2e
def test_mo_example_runs_every_stage(mo_example):
    ex, log = mo_example["dir"], mo_example["log"]
    for stage in ("ingest", "validate", "index", "train", "evaluate", "defects", "melting_reference", "melting",
                  "nve", "promote"):
        assert f"Running stage '{stage}'" in log, stage
    assert "Running stage 'generate'" not in log and not (ex / "data/raw").exists()
    ingest = json.loads((ex / "reports/ingest/metrics.json").read_text())
    assert ingest["n_frames"] == mo_example["n"]
    validate = json.loads((ex / "reports/validate/metrics.json").read_text())
    assert validate["n_accepted"] + validate["n_quarantined"] == mo_example["n"]


@pytest.mark.e2e
def test_mo_example_test_split_is_the_test_file(mo_example):
    import duckdb

    con = duckdb.connect(str(mo_example["dir"] / "data/index.duckdb"), read_only=True)
    n = con.execute("SELECT count(*) FROM frames WHERE split = 'test'").fetchone()[0]
    assert n == mo_example["n_test"]


@pytest.mark.e2e
def test_mo_example_melting_runs_the_models_own_phases_at_the_given_reference(mo_example):
    """No DFT solid and liquid at Tm: the model's own at 2896 K give the coverage and the pressure slope."""
    out = mo_example["dir"] / "reports/evaluate/melting"
    result = json.loads((out / "melting_point.json").read_text())
    own = result["model_phases"]
    assert own["temperature_K"] == 2896.0 and own["solid"]["n_atoms"] == 16  # 2 x 2 x 2 bcc cells
    assert math.isfinite(own["latent_heat_eV_per_atom"]) and math.isfinite(own["delta_v_A3_per_atom"])
    assert 0.0 <= result["coverage_solid_at_tm"] <= 1.0 and 0.0 <= result["coverage_liquid_at_tm"] <= 1.0
    assert 0.0 <= result["coverage_test_atoms"] <= 1.0
    assert "given Tm_ref" in result["pressure"]["source"]
    summary = (out / "summary.md").read_text()
    assert "The model's own solid and liquid at the given Tm_ref = 2896 K" in summary
    assert "inside the training hull" in summary and "nan" not in summary.lower()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "coverage_liquid_at_tm" in metrics and "model.latent_heat_eV_per_atom" in metrics


@pytest.mark.e2e
def test_mo_example_registry_card(mo_example):
    ex = mo_example["dir"]
    card = (ex / "registry/mo/v1/model_card.md").read_text() if (ex / "registry/mo/v1").is_dir() else None
    decision = (ex / "reports/promote/decision.md").read_text()
    assert card is not None, decision
    for ct in ("Elastic", "AIMD-NVT", "Vacancy", "Surface"):
        assert ct in card, ct
    assert "2896" in card  # the melting point against the given reference
    assert (ex / "registry/mo/v1/defects/defects.json").is_file()
    assert (ex / "registry/mo/v1/uncertainty.json").is_file()
