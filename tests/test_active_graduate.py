"""`mlipops active graduate` on a tiny synthetic campaign (a state.json and label files with their manifests, EMT
labels) in a temporary git + DVC repository: the graduated file and its manifest, DVC tracking, params.yaml and
dvc.yaml edited with their comments kept, idempotence, and the one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from mlipops.active.state import ActiveState
from mlipops.errors import MlipopsError
from mlipops.frames import oracle_info, read_extxyz, verified_manifest, write_extxyz, write_manifest

DVC_YAML = """\
stages:
  ingest:
    cmd: mlipops ingest
    deps:
      - src/mlipops/ingest
      - data/raw/cu_emt.extxyz    # the embedded dataset
    params:
      - ingest
    outs:
      - data/ingested/frames.extxyz
"""
FP = "0123456789abcdef"
ROOT = Path(__file__).resolve().parents[1]


def _label(k: int, it: int) -> object:
    a = bulk("Cu", "fcc", a=3.61, cubic=True)
    a.rattle(0.05, seed=100 * it + k)
    a.calc = EMT()
    e, f = a.get_potential_energy(), a.get_forces()
    a.calc = SinglePointCalculator(a, energy=e, forces=f)
    a.info.update(config_type="active_force", source="active", temperature_K=900.0, active_iteration=it,
                  active_run=0, active_step=k + 1, max_sigma_f=0.2, trigger_reason="max_sigma_f 0.2 > 0.1",
                  **oracle_info("emt", "1", {}))
    return a


def _campaign(root: Path, iterations: int = 2, per: int = 2, phase: str = "md") -> None:
    out = root / "data/raw/active"
    for it in range(iterations):
        f = out / f"active_{it}.extxyz"
        frames = [_label(k, it) for k in range(per)]
        write_extxyz(f, frames)
        write_manifest(f, frames, "mlipops active run")
    st = ActiveState(params_fingerprint=FP, iteration=iterations, phase=phase,
                     history=[{"iteration": i, "labelled": per, "curate.n_accepted_new": per - 1,
                               "file": f"data/raw/active/active_{i}.extxyz"} for i in range(iterations)],
                     mlflow={"parent_run_id": "abc123"}, path=str(root / "data/active/state.json"))
    st.save()


@pytest.fixture
def project(tmp_path, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = tmp_path / "proj"
    (root / "data/raw").mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")  # the project's own, with its comments
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "data/raw/cu_emt.extxyz").write_text("")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    monkeypatch.chdir(root)
    return root


def test_graduate_writes_a_tracked_source_and_registers_it(project):
    from mlipops.active.graduate import graduate

    _campaign(project)
    g = graduate()
    name = f"active_{FP[:8]}"
    assert g.data == Path(f"data/raw/{name}.extxyz") and g.changed and g.params_added
    frames, bad = read_extxyz(g.data)
    assert not bad and len(frames) == 4
    assert [a.info["active_iteration"] for a in frames] == [0, 0, 1, 1]
    a = frames[0]
    assert (a.info["source"], a.info["source_index"], a.info["active_campaign"]) == (name, 0, FP)
    assert a.info["trigger_reason"].startswith("max_sigma_f") and a.info["oracle_name"] == "emt"
    assert "split" not in a.info
    m = verified_manifest(g.data)  # ingest keeps the frames' oracle_* from it
    assert m["writer"] == "mlipops active graduate" and m["n_frames"] == 4 and m["oracles"][0]["oracle_name"] == "emt"
    c = m["campaign"]
    assert (c["id"], c["iterations"], c["n_frames"], c["n_accepted_by_campaign"], c["mlflow_run_id"]) == (
        FP, [0, 1], 4, 2, "abc123")
    # DVC tracks both files; params.yaml and dvc.yaml name them, comments kept
    for f in (g.data, g.manifest):
        assert Path(f"{f}.dvc").is_file()
    assert {f"/{g.data.name}", f"/{g.manifest.name}"} <= set((project / "data/raw/.gitignore").read_text().split())
    text = (project / "params.yaml").read_text()
    assert "# every file listed here must also be a dep of the ingest stage" in text
    assert "# config_type: test_config_types held out; or random" in text
    assert yaml.safe_load(text)["ingest"]["sources"] == [{"path": "data/raw/cu_emt.extxyz"},
                                                         {"path": g.data.as_posix(), "split": "train"}]
    dvc = (project / "dvc.yaml").read_text()
    assert "# the embedded dataset" in dvc
    assert yaml.safe_load(dvc)["stages"]["ingest"]["deps"][-2:] == [g.data.as_posix(), g.manifest.as_posix()]


def test_graduate_again_is_idempotent_and_a_later_iteration_updates(project):
    from mlipops.active.graduate import graduate

    _campaign(project)
    g = graduate(iteration=0)
    assert g.campaign["iterations"] == [0] and g.campaign["n_frames"] == 2
    snapshot = {p: p.read_bytes() for p in (Path("params.yaml"), Path("dvc.yaml"), g.data, g.manifest,
                                             Path(f"{g.data}.dvc"), Path(f"{g.manifest}.dvc"))}
    again = graduate(iteration=0)
    assert not again.changed and not again.params_added and not again.deps_added
    assert {p: p.read_bytes() for p in snapshot} == snapshot  # not a byte changed
    later = graduate()  # the last labelled iteration: 1
    assert later.changed and later.campaign["iterations"] == [0, 1] and len(read_extxyz(later.data)[0]) == 4
    assert verified_manifest(later.data)["n_frames"] == 4
    assert Path(f"{later.data}.dvc").read_bytes() != snapshot[Path(f"{g.data}.dvc")]  # DVC tracks the new version
    params = yaml.safe_load(Path("params.yaml").read_text())
    assert [s["path"] for s in params["ingest"]["sources"]].count(later.data.as_posix()) == 1
    deps = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]["ingest"]["deps"]
    assert deps.count(later.data.as_posix()) == 1 and deps.count(later.manifest.as_posix()) == 1


def test_an_iteration_being_labelled_is_not_graduated(project):
    from mlipops.active.graduate import graduate

    _campaign(project, iterations=1)
    st = json.loads((project / "data/active/state.json").read_text())
    st["phase"] = "label"  # iteration 1 is being labelled
    (project / "data/active/state.json").write_text(json.dumps(st))
    with pytest.raises(MlipopsError, match="iteration 1 is not labelled yet") as e:
        graduate(iteration=1)
    assert e.value.field == "iteration" and e.value.file.endswith("state.json")
    st["phase"] = "train"  # its labels are written: it graduates
    (project / "data/active/state.json").write_text(json.dumps(st))
    (project / "data/raw/active/active_1.extxyz").write_bytes(b"")
    frames = [_label(0, 1)]
    write_extxyz(project / "data/raw/active/active_1.extxyz", frames)
    write_manifest(project / "data/raw/active/active_1.extxyz", frames, "mlipops active run")
    assert graduate().campaign["iterations"] == [0, 1]


def test_errors_name_the_file_and_field(project, tmp_path, monkeypatch):
    from mlipops.active.graduate import graduate

    with pytest.raises(MlipopsError, match="no active-learning campaign") as e:
        graduate()
    assert e.value.file == "data/active/state.json"
    _campaign(project, iterations=1)
    with pytest.raises(MlipopsError, match="iteration 3 is not labelled yet"):
        graduate(iteration=3)
    # a name that would overwrite a file graduate did not write
    with pytest.raises(MlipopsError, match="not written by `mlipops active graduate`") as e:
        graduate(name="cu_emt")
    assert e.value.field == "name" and e.value.file == "data/raw/cu_emt.extxyz"
    with pytest.raises(MlipopsError, match="no file name"):
        graduate(name="../x")
    # a label file changed after the campaign wrote it: its oracle provenance is not vouched for
    f = project / "data/raw/active/active_0.extxyz"
    f.write_text(f.read_text() + "\n")
    with pytest.raises(MlipopsError, match="does not verify") as e:
        graduate()
    assert e.value.file == "data/raw/active/active_0.extxyz"
    assert not list((project / "data/raw").glob("active_*.extxyz"))  # nothing written on an error
    # not a DVC repository
    bare = tmp_path / "bare"
    bare.mkdir()
    monkeypatch.chdir(bare)
    with pytest.raises(MlipopsError, match="not a DVC repository"):
        graduate()


def test_the_cli_prints_what_it_did_and_the_next_command(project):
    _campaign(project, iterations=1)
    res = subprocess.run([sys.executable, "-m", "mlipops.cli", "active", "graduate", "--name", "al_cu"],
                         cwd=project, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "data/raw/al_cu.extxyz" in res.stderr and "dvc repro" in res.stderr
    res = subprocess.run([sys.executable, "-m", "mlipops.cli", "active", "graduate", "--iteration", "5"],
                         cwd=project, capture_output=True, text=True)
    assert res.returncode == 2 and "iteration 5 is not labelled yet" in res.stderr
