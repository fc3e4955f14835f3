"""`mlipops gates init`: gates generated from the data's own config_types, splits and force scale; and gates
that name a config_type the data does not have fail saying so (issue 24 item 4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COPPER = {"vacancy", "surface_100", "surface_110", "surface_111", "adatom", "liquid", "path_adatom", "path_dimer",
          "crystal_fcc", "crystal_bcc", "crystal_sc", "crystal_diamond", "crystal_hcp"}


def _small_set(path: Path) -> dict[str, np.ndarray]:
    """EMT copper: `crystal` (rattled 0.02 Å) and `hot` (0.25 Å) in train/val/test, `vacancy` in test only
    (held out of training). Returns every config_type's force components."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from mlipops.frames import set_labels, write_extxyz

    frames, forces = [], {}
    rng = np.random.default_rng(0)
    plan = [("crystal", 0.02, ["train"] * 6 + ["val"] * 2 + ["test"] * 2),
            ("hot", 0.25, ["train"] * 6 + ["val"] * 2 + ["test"] * 2),
            ("vacancy", 0.05, ["test"] * 3)]
    for ct, stdev, splits in plan:
        for k, split in enumerate(splits):
            a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
            if ct == "vacancy":
                del a[0]
            a.positions += rng.normal(0, stdev, a.positions.shape)
            a.calc = EMT()
            e, f = a.get_potential_energy(), a.get_forces()
            a.calc = None
            set_labels(a, e, f)
            a.info.update(config_type=ct, split=split, frame_id=f"{ct}{k}")
            frames.append(a)
            forces.setdefault(ct, []).append(f.ravel())
    write_extxyz(path, frames)
    return {ct: np.concatenate(f) for ct, f in forces.items()}


def _project(tmp_path: Path) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from mlipops.cli import app

    return CliRunner().invoke(app, args)


def test_gates_init_scales_with_each_config_type_and_writes_params(tmp_path, monkeypatch):
    from mlipops.params import PromoteParams, load_params
    from mlipops.promote import gateset

    proj = _project(tmp_path)
    forces = _small_set(proj / "accepted.extxyz")
    monkeypatch.chdir(proj)
    r = _cli(["gates", "init", "--data", "accepted.extxyz"])
    assert r.exit_code == 0, r.output
    gates = yaml.safe_load(r.output)["promote"]["gates"]
    PromoteParams(gates=gates)  # what promote reads
    rms = {ct: float(np.sqrt(np.mean(f * f))) for ct, f in forces.items()}
    assert rms["hot"] > 4 * rms["crystal"]

    def want(ct, factor=1.0):
        return float(f"{max(gateset.FORCE_FLOOR, gateset.FORCE_FRACTION * rms[ct]) * factor:.3g}")

    # forces from each config_type's own scale: the hot frames do not get the crystal's bound
    for split in ("val", "test"):
        assert gates[f"{split}.hot.force_mae"] == pytest.approx(want("hot"), rel=1e-9)
        assert gates[f"{split}.crystal.force_mae"] == pytest.approx(want("crystal"), rel=1e-9)
        assert gates[f"{split}.hot.force_mae"] > gates[f"{split}.crystal.force_mae"]
        assert gates[f"{split}.crystal.energy_mae_per_atom"] >= gateset.ENERGY_FLOOR
    # held out of training: a looser force gate, no energy gate, no split total over it
    assert gates["test.vacancy.force_mae"] == pytest.approx(want("vacancy", gateset.HELD_OUT_FACTOR), rel=1e-9)
    assert "test.vacancy.energy_mae_per_atom" not in gates and "test.force_mae" not in gates
    assert {"val.force_mae", "val.energy_mae_per_atom"} <= set(gates)
    assert gates["val.force_mae"] > gates["val.crystal.force_mae"]  # weighted with the hot frames
    # only this data's config_types; the copper reaction paths are not applicable, with the reason
    named = {k.split(".")[1] for k in gates if k.startswith(("val.", "test.")) and k.count(".") == 2}
    assert named == {"crystal", "hot", "vacancy"}
    assert "no reaction path" in gates["path.*.exit_coordinate"]["not_applicable"]
    # EMT copper: melting (the oracle labels Cu) and nve apply; a single member: no ensemble σ
    assert gates["melting:n_members_accepted"] == {"min": 3} and gates["nve:finite"] == {"min": 1}
    assert gates["uncertainty:test.all.force_spearman"] == {"min": 0.3}
    # every bounded gate documents its rule
    for line in r.output.splitlines():
        if line.startswith('    "') and "not_applicable" not in line:
            assert "   # " in line, line

    # --write: the gates block replaced in place, every other line of params.yaml kept, the result valid
    before = (proj / "params.yaml").read_text()
    r = _cli(["gates", "init", "--data", "accepted.extxyz", "--write"])
    assert r.exit_code == 0, r.output
    after = (proj / "params.yaml").read_text()
    p = load_params(proj / "params.yaml")
    assert {k: v.model_dump(exclude_none=True) for k, v in p.promote.gates.items()} == \
        {k: v.model_dump(exclude_none=True) for k, v in PromoteParams(gates=gates).gates.items()}
    old_head = before.split("\n    val.energy_mae_per_atom")[0]
    old_tail = before.split("path.path_adatom.exit_coordinate: {min: 1.4}\n")[1]
    assert after.startswith(old_head) and after.endswith(old_tail) and "test.surface_" not in after
    r = _cli(["gates", "init", "--data", "accepted.extxyz", "--write"])
    assert (proj / "params.yaml").read_text() == after  # idempotent

    # a promote section in flow style is not edited: gates.yaml to paste instead
    flow = before.split("\npromote:")[0] + '\npromote: {registry_dir: registry, gates: {"val.force_mae": 0.1}}\n' \
        + "\nactive:" + before.split("\nactive:")[1]
    (proj / "params.yaml").write_text(flow)
    r = _cli(["gates", "init", "--data", "accepted.extxyz", "--write"])
    assert r.exit_code == 0 and (proj / "gates.yaml").is_file()
    assert yaml.safe_load((proj / "gates.yaml").read_text())["promote"]["gates"] == gates
    assert (proj / "params.yaml").read_text() == flow


def test_gates_init_user_errors_one_line(tmp_path, monkeypatch):
    import subprocess
    import sys

    proj = _project(tmp_path)
    r = subprocess.run([sys.executable, "-m", "mlipops.cli", "gates", "init", "--data", "none.extxyz"], cwd=proj,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "none.extxyz" in r.stderr and "curated data missing" in r.stderr
    assert "Traceback" not in r.stderr


def _mlearn_accepted(mlearn: Path, out: Path) -> None:
    """The mlearn Mo files as the curated data of a project splitting by file: Mo_test.extxyz is the test split,
    every 10th training frame validation."""
    from mlipops.frames import read_extxyz, write_extxyz

    train, _ = read_extxyz(mlearn / "Mo_training.extxyz")
    test, _ = read_extxyz(mlearn / "Mo_test.extxyz")
    for k, a in enumerate(train):
        a.info["split"] = "val" if k % 10 == 0 else "train"
    for a in test:
        a.info["split"] = "test"
    write_extxyz(out, train + test)


def test_gates_init_on_real_mlearn_mo(tmp_path, u_mlearn_dir):
    from mlipops.params import PromoteParams, load_params
    from mlipops.promote.gateset import FORCE_FLOOR, data_stats, generate, melting_reason, nve_reason

    _mlearn_accepted(u_mlearn_dir, tmp_path / "accepted.extxyz")
    stats = data_stats(tmp_path / "accepted.extxyz")
    assert stats.species == {"Mo"} and stats.n_frames == 194 + 23
    assert set(stats.split_cts("test")) == {"AIMD-NVT", "Elastic", "Vacancy", "Surface"}
    p = load_params(REPO / "params.yaml")
    gates = yaml.safe_load("promote:\n  gates:\n" + generate(p, stats))["promote"]["gates"]
    PromoteParams(gates=gates)
    # the AIMD-NVT frames (300-6000 K, RMS force ~2 eV/Å) are not held to the crystal's bound
    assert gates["test.AIMD-NVT.force_mae"] > 3 * gates["test.Elastic.force_mae"]
    assert gates["test.Elastic.force_mae"] == FORCE_FLOOR and gates["test.Surface.force_mae"] == FORCE_FLOOR
    # the test file holds only trained-on config_types: split totals and energy gates for all of them
    assert {"test.force_mae", "test.energy_mae_per_atom", "test.Vacancy.energy_mae_per_atom"} <= set(gates)
    assert not any(ct in k for k in gates for ct in COPPER)
    # the copper params: melting simulates Cu (validate.allowed_species), which this data does not hold; nve
    # builds the data's own crystal (crystal.element null), so its gates apply
    for k in ("melting:bias_significance_excess_K", "melting:n_members_accepted"):
        assert "Cu" in gates[k]["not_applicable"] and "not in this data" in gates[k]["not_applicable"]
    assert gates["nve:finite"] == {"min": 1}
    # Mo params with EMT as the oracle: no reference melting point can be computed; nve runs a Mo crystal
    mo = p.model_copy(update={"validate_": p.validate_.model_copy(update={"allowed_species": ["Mo"]})})
    why = melting_reason(mo, stats, reference=tmp_path / "none.json")
    assert why.startswith("no reference melting point") and "EMT" in why and "Mo" in why
    assert nve_reason(mo, stats) is None
    # a reference already computed for Mo makes the melting gates apply; one that failed says why not
    ref = tmp_path / "reference.json"
    ref.write_text(json.dumps({"element": "Mo", "available": True}))
    assert melting_reason(mo, stats, reference=ref) is None
    ref.write_text(json.dumps({"element": "Mo", "available": False, "reason": "no reference run coexisted"}))
    assert "no reference run coexisted" in melting_reason(mo, stats, reference=ref)


# --------------------------------------------------------------------------- gates naming absent config_types
MO_CTS = {"train": {"AIMD-NVT", "Elastic", "Vacancy", "Surface"}, "val": {"AIMD-NVT", "Elastic", "Vacancy", "Surface"},
          "test": {"AIMD-NVT", "Elastic", "Surface"}}


def _mo_report(tmp_path: Path) -> Path:
    """reports/evaluate/metrics.json as the evaluate stage names it for Mo-like data (every value passing)."""
    m = {"n_nonfinite_predictions": 0}
    for split in ("val", "test"):
        m |= {f"{split}.energy_mae_per_atom": 0.005, f"{split}.force_mae": 0.05}
        for ct in MO_CTS[split]:
            m |= {f"{split}.{ct}.energy_mae_per_atom": 0.005, f"{split}.{ct}.force_mae": 0.05,
                  f"{split}.{ct}.n_frames": 3}
    d = tmp_path / "reports/evaluate"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(m))
    return d


def test_default_copper_gates_on_other_data_fail_naming_the_absent_config_type(tmp_path):
    from mlipops.params import load_params
    from mlipops.promote.gates import check_gates

    d = _mo_report(tmp_path)
    gates = load_params(REPO / "params.yaml").promote.gates
    for config_types in (MO_CTS, None):  # the index's config_types, or (no index) the report's own keys
        rows = {r["gate"]: r for r in check_gates(gates, d, config_types=config_types)}
        absent = {k for k, r in rows.items() if "`mlipops gates init`" in (r.get("note") or "")}
        assert absent == {"test.liquid.energy_mae_per_atom", "test.liquid.force_mae", "test.vacancy.force_mae",
                          "test.crystal_*.energy_mae_per_atom", "test.crystal_*.force_mae", "test.surface_*.force_mae",
                          "test.adatom.force_mae", "path.path_adatom.exit_coordinate"}
        for k in absent:  # still failing (never passed by default), with the way out
            assert rows[k]["passed"] is False
            assert "remove the gate or mark it not_applicable" in rows[k]["note"]
            assert "`mlipops gates init`" in rows[k]["note"]
        assert rows["test.vacancy.force_mae"]["note"].endswith(
            "config_type vacancy is not in this data: remove the gate or mark it not_applicable "
            "(`mlipops gates init` writes a gate set for this data)")
        assert "no config_type of this data matches crystal_*" in rows["test.crystal_*.force_mae"]["note"]
        assert rows["val.AIMD-NVT.force_mae"]["passed"] and rows["val.force_mae"]["passed"]
    # in the data but not in that split: said so, with where it is
    rows = {r["gate"]: r for r in check_gates({**gates, **_bound("test.Vacancy.force_mae")}, d, config_types=MO_CTS)}
    note = rows["test.Vacancy.force_mae"]["note"]
    assert "config_type Vacancy has no frames in the test split of this data (it is in: train, val)" in note
    # a metric missing for another reason keeps the plain note
    rows = {r["gate"]: r for r in check_gates(_bound("val.Elastic.force_rmse"), d, config_types=MO_CTS)}
    assert rows["val.Elastic.force_rmse"]["note"] == f"metric missing in {d / 'metrics.json'}"


def _bound(key: str) -> dict:
    from mlipops.params import PromoteParams

    return PromoteParams(gates={key: 0.1}).gates


def test_data_config_types_from_a_real_index(tmp_path):
    import duckdb

    from mlipops.promote.gates import data_config_types

    assert data_config_types(tmp_path / "none.duckdb") is None
    path = tmp_path / "index.duckdb"
    con = duckdb.connect(str(path))
    con.execute((REPO / "src/mlipops/index/schema.sql").read_text())
    con.execute("INSERT INTO datasets VALUES ('d', 'a.extxyz', 3, 1, now(), 'x')")
    for fid, status, split, ct in (("a", "accepted", "train", "Elastic"), ("b", "accepted", "test", "Surface"),
                                   ("c", "accepted", "train", "Surface"), ("d", "quarantined", "test", "Liquid")):
        con.execute("INSERT INTO frames (frame_id, dataset_id, status, split, config_type) VALUES (?, 'd', ?, ?, ?)",
                    [fid, status, split, ct])
    con.close()
    assert data_config_types(path) == {"train": {"Elastic", "Surface"}, "test": {"Surface"}}
