"""Hostile paths and params files (issue 30, items 2, 6 and 7 for params.yaml): every path from params or a
registry reference stays inside the project, nothing outside data/, registry/, reports/ is removed, and a
hostile params.yaml (duplicate keys, a billion laughs, megabytes) gets a short one-line error.

Each CLI case runs ``python -m mlipops.cli`` in a temporary project beside a ``victim`` folder holding a
marker file; the assertion is the one-line error (exit 2, the key named) and the victim still there.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlipops.errors import MlipopsError, ParamsError
from mlipops.params import load_params

REPO = Path(__file__).resolve().parents[1]


def _limit_memory():  # a runaway child (the old code on a billion laughs) dies instead of filling the machine
    resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))


def cli(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLIPOPS_DEBUG"} | {"GX_ANALYTICS_ENABLED": "False"}
    return subprocess.run([sys.executable, "-m", "mlipops.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=_limit_memory)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The CLI's user-error contract: one short line on stderr, exit status 2, no traceback."""
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlipops: error: "), r.stderr[-3000:]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert len(lines[0]) < 800, len(lines[0])  # at most ~200 characters of user content quoted
    return lines[0]


def _set(doc: dict, key: str, value) -> None:
    *head, last = key.split(".")
    for k in head:
        doc = doc.setdefault(k, {})
    doc[last] = value


def project(root: Path, **values) -> Path:
    """The repository's params.yaml with ``values`` (dotted keys, ``__`` for ``.``) in ``root``."""
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    for k, v in values.items():
        _set(doc, k.replace("__", "."), v)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root


def victim(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "marker.txt").write_text("still here\n")
    return path


def curated_data(root: Path) -> None:
    """A few labelled frames with splits (what `mlipops train` reads before it touches its folders), and the
    folders a project that trained before has."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    from mlipops.frames import frame_id, write_extxyz

    frames = []
    for k in range(4):
        a = bulk("Cu", "fcc", a=3.6, cubic=True)
        a.rattle(0.02, seed=k)
        a.calc = EMT()
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
        a.info.update(config_type="crystal_fcc", split="val" if k == 3 else "train", frame_id=frame_id(a),
                      source="unit", source_index=k)
        frames.append(a)
    for d in ("data/curated", "data/checkpoints", "data/models"):
        (root / d).mkdir(parents=True, exist_ok=True)
    write_extxyz(root / "data/curated/accepted.extxyz", frames)


# ------------------------------------------------------------------------------------ item 2: names, paths
@pytest.mark.parametrize("name, where", [("../../victim", "victim"), ("../../../victim", "../victim")])
def test_train_model_name_escaping_the_project_is_refused_and_nothing_removed(tmp_path, name, where):
    """``train.model_name: ../../victim`` made `mlipops train` delete data/checkpoints/../../victim; the
    tracking URI below stops the old code right after that deletion (nothing is trained)."""
    root = project(tmp_path / "proj", train__model_name=name, train__tracking_uri="nosuchscheme://x")
    curated_data(root)
    v = victim((root / where).resolve())
    r = cli(root, "train")
    assert (v / "marker.txt").is_file(), "the victim folder was removed"
    line = one_line_error(r)
    assert "train.model_name" in line and "not a name" in line


def test_train_model_name_absolute_is_refused_and_nothing_removed(tmp_path):
    v = victim(tmp_path / "victim")
    root = project(tmp_path / "proj", train__model_name=str(v), train__tracking_uri="nosuchscheme://x")
    curated_data(root)
    r = cli(root, "train")
    assert (v / "marker.txt").is_file(), "the victim folder was removed"
    line = one_line_error(r)
    assert "train.model_name" in line


@pytest.mark.parametrize("key, value", [
    ("promote.registry_dir", "/"), ("promote.registry_dir", "../registry"), ("promote.registry_dir", "src"),
    ("active.out_dir", "/"), ("active.out_dir", "../outside"), ("active.work_dir", "/"),
    ("active.work_dir", "data"), ("active.work_dir", "data/../.."), ("generate.name", "../../../.."),
    ("generate.name", "a/b"), ("generate.name", ""), ("bo_scan.name", "../h2"), ("train.model_name", "/etc"),
    ("train.model_name", "cu/../.."), ("train.artifact_location", "/tmp/mlartifacts"),
    ("train.artifact_location", "file:///etc"), ("evaluate.melting.sweep.config_type", "liquid/../x"),
])
def test_a_path_or_name_leading_out_of_the_project_fails_validation(tmp_path, key, value):
    root = project(tmp_path / "proj", **{key.replace(".", "__"): value})
    with pytest.raises(ParamsError) as exc:
        load_params(root / "params.yaml")
    assert key in str(exc.value) and "\n" not in str(exc.value)


def test_the_cli_refuses_registry_dir_root_in_one_line(tmp_path):
    root = project(tmp_path / "proj", promote__registry_dir="/")
    line = one_line_error(cli(root, "registry", "list"))
    assert "promote.registry_dir" in line and "absolute path" in line


def test_legitimate_paths_still_validate(tmp_path):
    """Defaults, folders below data/, a read-only input outside the project, a remote artifact store."""
    root = project(tmp_path / "proj", active__out_dir="data/raw/al", active__work_dir="reports/al",
                   promote__registry_dir="data/registry", ingest__sources=[{"path": "../shared/x.extxyz"}],
                   active__base_data="/elsewhere/accepted.extxyz", evaluate__paths__files=["/elsewhere/p.extxyz"],
                   train__artifact_location="s3://bucket/mlflow", train__model_name="cu_v2-b")
    p = load_params(root / "params.yaml")
    assert (p.active.work_dir, p.promote.registry_dir, p.train.model_name) == ("reports/al", "data/registry", "cu_v2-b")
    assert load_params(REPO / "params.yaml").promote.registry_dir == "registry"


def test_a_symlink_leading_out_of_the_project_is_refused(tmp_path):
    outside = victim(tmp_path / "victim")
    root = project(tmp_path / "proj", promote__registry_dir="registry")
    (root / "registry").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ParamsError, match="promote.registry_dir"):
        load_params(root / "params.yaml")
    (root / "data").mkdir()
    (root / "data/active").symlink_to(outside, target_is_directory=True)
    (root / "registry").unlink()
    with pytest.raises(ParamsError, match="active.work_dir"):
        load_params(root / "params.yaml")
    assert (outside / "marker.txt").is_file()


def test_long_hostile_values_are_clipped_in_the_error(tmp_path):
    root = project(tmp_path / "proj", train__model_name="../" * 5000 + "x")
    line = one_line_error(cli(root, "registry", "list"))
    assert "train.model_name" in line and len(line) < 800


# -------------------------------------------------------------- item 2: the guard on removal and moves
def test_the_guard_refuses_everything_outside_data_registry_reports(tmp_path, monkeypatch):
    from mlipops.paths import ensure_writable, safe_move, safe_remove

    root = tmp_path / "proj"
    (root / "data/models/cu").mkdir(parents=True)
    (root / "src").mkdir()
    (root / "params.yaml").write_text("x: 1\n")
    outside = victim(tmp_path / "victim")
    monkeypatch.chdir(root)
    for bad in ("/", str(tmp_path), str(outside), "..", "../victim", ".", "src", "params.yaml", "data", "registry",
                "reports", "data/../src", "data/../../victim", str(root)):
        with pytest.raises(MlipopsError, match="refusing to remove"):
            safe_remove(bad)
    with pytest.raises(MlipopsError, match="refusing to move"):
        safe_move(outside, "data/x")
    with pytest.raises(MlipopsError, match="refusing to move to"):
        safe_move("data/models/cu", outside / "cu")
    assert (outside / "marker.txt").is_file() and (root / "src").is_dir() and (root / "params.yaml").is_file()
    # a symlink inside data/ is removed itself, its target is not followed; `link/..` is judged as the file
    # system resolves it (the parent of the link's target), not as text
    (outside / "sub").mkdir()
    (root / "data/link").symlink_to(outside / "sub", target_is_directory=True)
    for bad in ("data/link/../marker.txt", "data/link/..", "data/models/..", "data/models/cu/../.."):
        with pytest.raises(MlipopsError, match="refusing to remove"):
            safe_remove(bad)
    assert (outside / "marker.txt").is_file() and (root / "data/models").is_dir()
    safe_remove("data/link")
    assert not (root / "data/link").exists() and (outside / "marker.txt").is_file()
    # data/ itself a symlink out of the project: nothing is removed through it
    (root / "data/models/cu/w.pt").write_text("w")
    safe_remove(root / "data/models/cu")
    assert not (root / "data/models/cu").exists()
    (root / "reports").symlink_to(outside, target_is_directory=True)
    with pytest.raises(MlipopsError, match="refusing to remove"):
        safe_remove("reports/marker.txt")
    assert (outside / "marker.txt").is_file()
    assert ensure_writable("registry", strict=False) == Path("registry")
    with pytest.raises(MlipopsError):
        ensure_writable("registry")  # the folder itself: never removed
    (root / "data/out").symlink_to(outside, target_is_directory=True)  # written through: where it leads counts
    with pytest.raises(MlipopsError, match="refusing to write to"):
        ensure_writable("data/out")
    with pytest.raises(MlipopsError, match="refusing to move to"):
        safe_move("data/models", "data/out/models")
    safe_remove("data/out")  # removed: the link itself
    assert (outside / "marker.txt").is_file() and not (root / "data/out").exists()


def test_train_refuses_to_remove_outside_even_with_validation_bypassed(tmp_path, monkeypatch):
    """``model_construct`` skips validation: the guard at the removal site still holds."""
    from mlipops.params import ComputeParams, DescriptorParams, TrainParams
    from mlipops.train.run import run

    root = tmp_path / "proj"
    root.mkdir()
    curated_data(root)
    v = victim(tmp_path / "victim")
    monkeypatch.chdir(root)
    p = TrainParams.model_construct(**(TrainParams().__dict__ | {"model_name": "../../../victim",
                                                                 "tracking_uri": "nosuchscheme://x"}))
    with pytest.raises(MlipopsError, match="refusing to remove"):
        run(p, DescriptorParams(), ComputeParams())
    assert (v / "marker.txt").is_file()


# ---------------------------------------------------------------------- item 2: registry references
def _registry(root: Path, path_in_index: str = "cu/v1") -> Path:
    reg = root / "registry"
    v1 = reg / "cu/v1"
    v1.mkdir(parents=True)
    for f in ("weights.pt", "config.json", "gates.json"):
        (v1 / f).write_text("{}")
    (v1 / "model_card.md").write_text("# Model card: cu v1\n")
    (reg / "index.json").write_text(json.dumps({"models": {"cu": {
        "aliases": {"champion": 1}, "versions": [{"version": 1, "path": path_in_index}]}}}))
    return reg


OUTSIDE_REFS = ["../../etc", "../../../../etc", "/etc", "registry/cu/../../..", "cu/../..", "..", ".", "registry/cu",
                "registry/cu/v1/../../../victim", "victim", "registry:../x@v1", "../cu@v1", "cu@../../v1", "cu/v1@x"]


def _outside_layout(tmp_path: Path) -> Path:
    """A project four levels down with a registry; every ``etc`` the references below reach lies outside the
    project and holds a marker file (the old code listed the files of any folder: `registry show
    ../../../../etc` printed 1,043 files of /etc)."""
    root = project(tmp_path / "a/b/c/proj")
    _registry(root)
    for d in (tmp_path / "etc", tmp_path / "a/b/etc", tmp_path / "victim"):
        victim(d)
    (root / "cu").mkdir()
    (root / "victim").symlink_to(tmp_path / "victim")
    return root


@pytest.mark.parametrize("ref", OUTSIDE_REFS[:3])
def test_registry_show_refuses_references_outside_the_registry(tmp_path, ref):
    root = _outside_layout(tmp_path)
    r = cli(root, "registry", "show", ref)
    line = one_line_error(r)
    assert "marker.txt" not in r.stdout + line and "passwd" not in r.stdout + line
    assert "registry" in line


def test_no_reference_resolves_outside_the_registry(tmp_path, monkeypatch):
    """In process, every form: paths, '..', absolute, NAME with '/', alias with '..' (the last four were
    already refused by the old reference pattern)."""
    from mlipops.promote.catalog import load, show

    root = _outside_layout(tmp_path)
    monkeypatch.chdir(root)
    for ref in OUTSIDE_REFS:
        for f in (show, load):
            with pytest.raises(MlipopsError) as exc:
                f(ref, Path("registry"))
            assert "\n" not in str(exc.value) and "marker" not in str(exc.value), (ref, str(exc.value))


def test_a_tampered_index_path_does_not_lead_out_of_the_registry(tmp_path):
    """index.json is data: its ``path`` is not followed; the folder is <registry>/NAME/vN."""
    root = project(tmp_path / "proj")
    reg = _registry(root, path_in_index="../../victim")
    v = victim(tmp_path / "victim")
    for f in ("weights.pt", "config.json", "gates.json", "model_card.md"):
        (v / f).write_text("outside")
    r = cli(root, "registry", "show", "cu")
    assert r.returncode == 0, r.stderr
    assert "Model card: cu v1" in r.stdout and "marker.txt" not in r.stdout
    (reg / "cu/v1/model_card.md").unlink()  # no longer a version folder: refused, not listed
    line = one_line_error(cli(root, "registry", "show", "cu"))
    assert "not a registry version folder" in line and "model_card.md" in line


def test_a_version_folder_symlinked_out_of_the_registry_is_refused(tmp_path):
    root = project(tmp_path / "proj")
    reg = _registry(root)
    v = victim(tmp_path / "victim")
    for f in ("weights.pt", "config.json", "gates.json", "model_card.md"):
        (v / f).write_text("outside")
    (reg / "cu/v2").symlink_to(v, target_is_directory=True)
    index = json.loads((reg / "index.json").read_text())
    index["models"]["cu"]["versions"].append({"version": 2, "path": "cu/v2"})
    (reg / "index.json").write_text(json.dumps(index))
    line = one_line_error(cli(root, "registry", "show", "cu@v2"))
    assert "leads out of the registry" in line


def test_registry_references_and_version_folders_still_resolve(tmp_path, monkeypatch):
    from mlipops.models.calculator import resolve_model
    from mlipops.promote.catalog import resolve

    root = project(tmp_path / "proj")
    reg = _registry(root)
    monkeypatch.chdir(root)
    for ref in ("cu", "cu@champion", "cu@v1", "registry:cu@v1", "registry/cu/v1", str(reg / "cu/v1")):
        assert resolve(ref, Path("registry")).resolve() == (reg / "cu/v1").resolve(), ref
    assert resolve_model("cu@champion", "registry") == Path("registry/cu/v1")
    r = cli(root, "registry", "show", "registry/cu/v1")
    assert r.returncode == 0 and "Model card: cu v1" in r.stdout and "4 files" in r.stdout, r.stderr


# ------------------------------------------------------------------ items 6, 7: a hostile params.yaml
def test_duplicate_keys_name_the_key_and_both_lines(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    text = (REPO / "params.yaml").read_text().replace("  model_name: cu\n", "  model_name: cu\n  epochs: 3\n", 1)
    (root / "params.yaml").write_text(text)
    lines = text.splitlines()
    first = lines.index("  epochs: 400") + 1
    again = lines.index("  epochs: 3") + 1
    line = one_line_error(cli(root, "registry", "list"))
    assert "duplicate key 'epochs'" in line and f"line {first}" in line and f"line {again}" in line
    with pytest.raises(ParamsError, match="duplicate key 'epochs'"):
        load_params(root / "params.yaml")


def test_merge_keys_and_anchors_are_still_allowed(tmp_path):
    from mlipops.params import read_yaml

    (tmp_path / "m.yaml").write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\nlist: *b\n")
    assert read_yaml(tmp_path / "m.yaml") == {"base": {"x": 1, "y": 2}, "other": {"x": 3, "y": 2},
                                              "list": {"x": 1, "y": 2}}
    assert load_params(REPO / "params.yaml").validate_.expected_test_config_types  # the file's own alias


# nine levels of nine aliases: 9^9 = 387 million strings once expanded (the old loader echoed them all)
BILLION_LAUGHS = "lols: [&a0 [" + ", ".join(['"lol"'] * 9) + "], " + ", ".join(
    f"&a{k} [" + ", ".join([f"*a{k - 1}"] * 9) + "]" for k in range(1, 10)) + "]\n"


def test_a_billion_laughs_is_refused_at_once(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text() + BILLION_LAUGHS)
    try:
        r = cli(root, "registry", "list", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("no answer in 60 s to a billion-laughs params.yaml")
    line = one_line_error(r)
    assert "billion laughs" in line and "params.yaml" in line


def test_a_recursive_alias_and_a_huge_file_are_refused(tmp_path):
    (tmp_path / "rec.yaml").write_text("a: &x [1, *x]\n")
    with pytest.raises(ParamsError, match="recursive"):
        load_params(tmp_path / "rec.yaml")
    big = tmp_path / "big.yaml"
    big.write_text((REPO / "params.yaml").read_text() + ("# padding\n" * 150_000))
    with pytest.raises(ParamsError, match="larger than 1 MB"):
        load_params(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 20_000 + "]" * 20_000 + "\n")
    with pytest.raises(ParamsError, match="nested too deeply"):
        load_params(deep)
