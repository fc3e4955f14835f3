"""The great-expectations suites of the validate stage (src/mlipops/quality/suite.json).

Every expectation fails on a frame built to violate it and passes on clean data: EMT-labelled
ase.build structures (periodic bulk, a slab, a cluster in a non-periodic box, a dimer without a
cell, a one-atom primitive cell). All violating frames go through ONE great-expectations run
together with the clean ones (module fixture), and each test reads its part of the outcome: every
bad frame must be quarantined for exactly its own check(s) and every clean frame accepted. The
real mlearn Mo and Li training sets pass every expectation with the repository's params.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ase import Atoms
from ase.build import bulk, fcc111

from mlipops.errors import StageInputError
from mlipops.frames import canonicalize, labels, read_extxyz, set_labels
from mlipops.params import ValidateParams, composition_key, load_params
from mlipops.quality.validate import (
    SUITE,
    atom_table,
    build_tables,
    energy_bounds,
    frame_table,
    validate_frames,
)

REPO = Path(__file__).resolve().parents[1]

P = ValidateParams(allowed_species=["Cu"], min_interatomic_distance=1.5, max_abs_force=50.0,
                   energy_per_atom_range={"Cu": (-1.0, 5.0)}, net_force_tolerance=0.05, box_margin=5.0,
                   expected_test_config_types=[])


# ------------------------------------------------------------------------------------ building
def _emt(frames: list[Atoms]) -> list[Atoms]:
    from mlipops.oracles import get_oracle

    return get_oracle("emt").label(frames)


def _canon(a: Atoms, name: str, split: str = "train") -> Atoms:
    a.info["config_type"] = name
    out = canonicalize(a, source="unit", source_index=0)
    out.info["split"] = split
    out.info["case"] = name
    return out


def _clean_structures() -> list[Atoms]:
    rng = np.random.default_rng(7)
    b = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))  # 32 atoms
    b.positions += rng.normal(0.0, 0.08, b.positions.shape)
    b.info["config_type"] = "bulk"
    slab = fcc111("Cu", (2, 2, 3), vacuum=6.0)  # pbc T T F, cell vector along z
    slab.positions += rng.normal(0.0, 0.05, slab.positions.shape)
    slab.info["config_type"] = "slab"
    cluster = Atoms("Cu4", positions=[[5.0, 5.0, 5.0], [7.5, 5.0, 5.0], [6.2, 7.2, 5.0], [6.2, 5.8, 7.1]],
                    cell=[12.0, 12.0, 12.0], pbc=False)  # a molecule in a non-periodic box
    cluster.info["config_type"] = "cluster"
    dimer = Atoms("Cu2", positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 2.4]])  # no cell at all
    dimer.info["config_type"] = "dimer"
    prim = bulk("Cu", "fcc", a=3.61)  # one atom, periodic images at 2.55 Å
    prim.info["config_type"] = "primitive"
    big = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 4))  # 64 atoms: a donor of forces
    big.positions += rng.normal(0.0, 0.08, big.positions.shape)
    big.info["config_type"] = "big"
    return _emt([b, slab, cluster, dimer, prim, big])


def _variant(a: Atoms, name: str, shift: float, *, energy=None, forces=None, stress=None,
             keep_stress: bool = True) -> Atoms:
    """A copy translated rigidly by ``shift`` Å along x (a new frame_id, the same physics: labels
    stay correct), with the given labels replaced."""
    e0, f0, s0 = labels(a)
    b = Atoms(numbers=a.numbers, positions=a.positions + [shift, 0.0, 0.0], cell=a.cell, pbc=a.pbc)
    set_labels(b, e0 if energy is None else energy, f0 if forces is None else forces,
               (s0 if keep_stress else None) if stress is None else stress)
    return _canon(b, name)


def _bad_frames(clean: dict[str, Atoms]) -> list[tuple[Atoms, str]]:
    """(frame, the check it must fail) for every expectation of the frame and atom suites."""
    bulk32, slab, cluster, dimer, big = (clean[k] for k in ("bulk", "slab", "cluster", "dimer", "big"))
    n = len(bulk32)
    e, f, _ = labels(bulk32)
    out: list[tuple[Atoms, str]] = []
    # energy per atom, 10x out of the Cu window (-1, 5) either way
    out.append((_variant(bulk32, "energy_high", 0.01, energy=50.0 * n), "energy_range"))
    out.append((_variant(bulk32, "energy_low", 0.02, energy=-10.0 * n), "energy_range"))
    # net force: one atom's force replaced by another's, one atom's sign flipped, forces of a
    # bigger frame pasted in (its first n rows), a dimer (isolated molecule) with one force flipped
    g = f.copy()
    g[3] = f[10]
    out.append((_variant(bulk32, "force_replaced", 0.03, forces=g), "net_force"))
    g = f.copy()
    k = int(np.argmax(np.linalg.norm(f, axis=1)))
    g[k] = -g[k]
    out.append((_variant(bulk32, "force_sign_flip", 0.04, forces=g), "net_force"))
    out.append((_variant(bulk32, "forces_pasted", 0.05, forces=labels(big)[1][:n]), "net_force"))
    gd = labels(dimer)[1].copy()
    gd[1] = -gd[1]
    out.append((_variant(dimer, "dimer_flip", 0.06, forces=gd), "net_force"))
    # cell: collinear lattice vectors, an all-zero periodic cell, a slab with a zero periodic vector
    for name, cell, pbc in (
        ("collinear_cell", [[7.22, 0, 0], [7.22, 0, 0], [0, 0, 7.22]], True),
        ("zero_cell", np.zeros((3, 3)), True),
        ("slab_zero_vector", [slab.cell[0], [0, 0, 0], slab.cell[2]], [True, True, False]),
    ):
        src = slab if name.startswith("slab") else bulk32
        b = Atoms(numbers=src.numbers, positions=src.positions, cell=cell, pbc=pbc)
        set_labels(b, *labels(src)[:2])
        out.append((_canon(b, name), "cell_volume"))
    # an atom 6 Å beyond the top face of the cluster's box; a slab atom 5.5 Å below the cell
    c = cluster.copy()
    c.positions[3, 2] = 12.0 + 6.0
    set_labels(c, *labels(cluster)[:2])
    out.append((_canon(c, "outside_box"), "box_margin"))
    s = slab.copy()
    s.positions[0, 2] = -5.5
    set_labels(s, *labels(slab)[:2])
    out.append((_canon(s, "slab_outside"), "box_margin"))
    # stress: wrong shape (recorded by canonicalize), non-finite
    out.append((_variant(bulk32, "stress_shape", 0.07, stress=np.zeros((2, 3))), "stress_shape"))
    out.append((_variant(bulk32, "stress_nan", 0.08, stress=np.array([0.0, 0.0, np.nan, 0.0, 0.0, 0.0])),
                "finite_labels"))
    # per atom: |F_17| = |F_18| = 80 eV/Å (net force kept zero), a NaN force, a disallowed species
    g = f.copy()
    g[17], g[18] = [80.0, 0.0, 0.0], [-80.0, 0.0, 0.0]
    g[17] += f[17] + f[18]
    out.append((_variant(bulk32, "atom_force", 0.09, forces=g), "max_force"))
    g = f.copy()
    g[7, 0] = np.nan
    out.append((_variant(bulk32, "atom_nan", 0.10, forces=g), "finite_labels"))
    ag = bulk32.copy()
    ag.numbers[5] = 47
    set_labels(ag, *labels(bulk32)[:2])
    out.append((_canon(ag, "atom_species"), "species_allowed"))
    # the checks that were there before: overlap, missing labels, forces of the wrong shape
    o = bulk32.copy()
    o.positions[1] = o.positions[0] + [0.5, 0.0, 0.0]
    set_labels(o, *labels(bulk32)[:2])
    out.append((_canon(o, "overlap"), "min_distance"))
    out.append((_variant(bulk32, "nan_energy", 0.11, energy=float("nan")), "finite_labels"))
    b = Atoms(numbers=bulk32.numbers, positions=bulk32.positions + [0.12, 0, 0], cell=bulk32.cell, pbc=True)
    set_labels(b, None, f)
    out.append((_canon(b, "missing_energy"), "has_energy"))
    b = Atoms(numbers=bulk32.numbers, positions=bulk32.positions + [0.13, 0, 0], cell=bulk32.cell, pbc=True)
    set_labels(b, e, None)
    out.append((_canon(b, "missing_forces"), "has_forces"))
    out.append((_variant(bulk32, "forces_shape", 0.14, forces=f[:, :2]), "forces_shape"))
    return out


@pytest.fixture(scope="module")
def suite_run():
    clean = [_canon(a, a.info["config_type"]) for a in _clean_structures()]
    # controls close to the limits, which must pass: an atom 4 Å outside the box (margin 5 Å)
    near = clean[2].copy()
    near.positions[3, 2] = 12.0 + 4.0
    set_labels(near, *labels(clean[2])[:2])
    clean.append(_canon(near, "inside_margin"))
    by_name = {a.info["case"]: a for a in clean}
    bad = _bad_frames(by_name)
    frames = clean + [a for a, _ in bad]
    table, atoms = build_tables(frames, P)
    failures, result = validate_frames(table, P, atoms)
    return {"frames": frames, "clean": clean, "bad": bad, "table": table, "atoms": atoms,
            "failures": failures, "result": result}


def _outcome(run, name: str) -> list[tuple[str, str]] | None:
    k = next(i for i, a in enumerate(run["frames"]) if a.info["case"] == name)
    return run["failures"].get(k)


# ------------------------------------------------------------------------------------- clean
def test_clean_frames_pass_every_expectation(suite_run):
    for a in suite_run["clean"]:
        assert _outcome(suite_run, a.info["case"]) is None, (a.info["case"], _outcome(suite_run, a.info["case"]))
    clean_ids = set(range(len(suite_run["clean"])))
    assert not clean_ids & set(suite_run["failures"])
    net = suite_run["table"]["net_force"].iloc[: len(suite_run["clean"])]
    assert (net < 1e-8).all()  # EMT forces sum to zero, periodic or not


@pytest.mark.parametrize("case", [
    "energy_high", "energy_low", "force_replaced", "force_sign_flip", "forces_pasted", "dimer_flip",
    "collinear_cell", "zero_cell", "slab_zero_vector", "outside_box", "slab_outside", "stress_shape",
    "stress_nan", "atom_force", "atom_nan", "atom_species", "overlap", "nan_energy", "missing_energy",
    "missing_forces", "forces_shape"])
def test_each_expectation_fails_on_its_violation(suite_run, case):
    expected = {a.info["case"]: check for a, check in suite_run["bad"]}[case]
    got = _outcome(suite_run, case)
    assert got is not None, f"{case} was accepted"
    assert [c for c, _ in got] == [expected], got
    assert all("\n" not in r and r for _, r in got)


def test_reasons_name_values_ranges_and_atoms(suite_run):
    def reason(case):
        return _outcome(suite_run, case)[0][1]

    assert reason("energy_high") == ("energy 50 eV/atom above the range [-1, 5] eV/atom of Cu "
                                     "(validate.energy_per_atom_range.Cu)")
    assert reason("energy_low").startswith("energy -10 eV/atom below the range [-1, 5] eV/atom of Cu")
    assert reason("force_sign_flip").startswith("net force |ΣF| = ")
    assert "above 0.05 eV/Å" in reason("force_sign_flip")
    assert reason("zero_cell").startswith("periodic cell is degenerate: the 3 periodic cell vector(s) span 0 Å^3")
    assert "the 2 periodic cell vector(s) span 0 Å^2" in reason("slab_zero_vector")
    assert reason("outside_box") == ("atom 3 lies 6 Å outside the cell along a non-periodic direction "
                                     "(margin 5.0 Å)")
    assert reason("slab_outside").startswith("atom 0 lies 5.5") and "(margin 5.0 Å)" in reason("slab_outside")
    assert reason("stress_shape") == "stress has shape 2x3, expected 6 (Voigt) or 3x3"
    assert reason("stress_nan") == "non-finite label (NaN or inf) in stress"
    assert re.fullmatch(r"atom 17: \|F\| = 80(\.\d)? eV/Å above 50\.0 eV/Å \(\+1 more atom\)", reason("atom_force"))
    assert reason("atom_species") == "atom 5: species Ag not in validate.allowed_species ['Cu']"
    # frame-level and atom-level finite checks merge into one entry of the same check
    assert reason("atom_nan") == ("non-finite label (NaN or inf) in forces; "
                                  "atom 7: force (nan, " + f"{labels(_frame(suite_run, 'atom_nan'))[1][7, 1]:g}, "
                                  f"{labels(_frame(suite_run, 'atom_nan'))[1][7, 2]:g}) not finite")


def _frame(run, name):
    return next(a for a in run["frames"] if a.info["case"] == name)


def test_net_force_cannot_see_a_whole_frame_swap(suite_run):
    """Forces of another frame of the same size pasted whole still sum to zero: invisible to the
    net-force expectation (the Cook's-distance outlier test is the one for that)."""
    bulk32 = _frame(suite_run, "bulk")
    other = bulk32.copy()
    other.positions += np.random.default_rng(3).normal(0.0, 0.05, other.positions.shape)
    other = _emt([other])[0]
    swapped = _variant(bulk32, "swapped", 0.2, forces=labels(other)[1])
    table = frame_table([swapped], ["Cu"], 3.0)
    assert table["net_force"].iloc[0] < P.net_force_tolerance


def test_suite_loads_every_expectation(suite_run):
    spec = json.loads(SUITE.read_text())
    n = sum(len(s["expectations"]) for s in spec["suites"])
    assert len(suite_run["result"]["results"]) == n
    assert {r["mlipops"]["table"] for r in suite_run["result"]["results"]} == {"frames", "atoms", "accepted_frames"}
    assert suite_run["result"]["success"] is False and suite_run["result"]["dataset_success"] is True
    # every threshold is a suite parameter filled from params.yaml (0 is the positive-volume bound)
    for s in spec["suites"]:
        for e in s["expectations"]:
            for key in ("min_value", "max_value"):
                v = e["kwargs"].get(key)
                assert v is None or v == 0 or set(v) == {"$PARAMETER"}, e


# ------------------------------------------------------------------------------ table level
@pytest.mark.parametrize("breakage, message", [
    (lambda t: t.drop(columns=["net_force"]), "schema check expect_table_columns_to_match_set"),
    (lambda t: t.assign(n_atoms=t["n_atoms"].astype("float64").where(t.index != 0)), "n_atoms"),
    (lambda t: t.assign(energy_per_atom=t["energy_per_atom"].astype("str")), "energy_per_atom"),
    (lambda t: t.assign(frame_id=t["frame_id"].str.slice(0, 12)), "frame_id"),
])
def test_schema_failure_stops_the_stage(suite_run, breakage, message):
    table = breakage(suite_run["table"].iloc[:3].copy())
    with pytest.raises(StageInputError, match="fails schema check") as info:
        validate_frames(table, P, suite_run["atoms"][suite_run["atoms"]["frame"] < 3])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_atom_table_schema_failure_stops_the_stage(suite_run):
    atoms = suite_run["atoms"][suite_run["atoms"]["frame"] < 3].drop(columns=["force_norm"])
    with pytest.raises(StageInputError, match="atoms table fails schema check"):
        validate_frames(suite_run["table"].iloc[:3].copy(), P, atoms)


# ----------------------------------------------------------------------------- dataset level
def test_test_split_must_hold_its_declared_config_types(suite_run):
    clean = suite_run["clean"]
    table, atoms = build_tables(clean, P)
    table["split"] = np.where(table["config_type"].isin(["slab", "cluster"]), "test", "train")
    ok = P.model_copy(update={"expected_test_config_types": ["slab", "cluster"]})
    failures, result = validate_frames(table, ok, atoms)
    assert failures == {} and result["dataset_checks_failed"] == [] and result["dataset_success"]

    want = P.model_copy(update={"expected_test_config_types": ["slab", "cluster", "vacancy", "liquid"]})
    failures, result = validate_frames(table, want, atoms)
    assert failures == {}  # dataset-level: nothing quarantined
    assert result["success"] is True and result["dataset_success"] is False
    assert result["dataset_checks_failed"] == [{
        "check": "test_split_config_types",
        "reason": "the test split holds no accepted frame of config_type(s) vacancy, liquid "
                  "(validate.expected_test_config_types)"}]

    # it looks at the frames that pass: the only test slab quarantined -> the split lacks 'slab'
    slab = next(a for a in clean if a.info["case"] == "slab")
    s = slab.copy()
    s.positions[0, 2] = -7.0
    set_labels(s, *labels(slab)[:2])
    frames = [a for a in clean if a.info["case"] != "slab"] + [_canon(s, "slab")]
    table, atoms = build_tables(frames, P)
    table["split"] = np.where(table["config_type"].isin(["slab", "cluster"]), "test", "train")
    failures, result = validate_frames(table, ok, atoms)
    assert [c for c, _ in failures[len(frames) - 1]] == ["box_margin"]
    assert "config_type(s) slab " in result["dataset_checks_failed"][0]["reason"]


def test_params_yaml_declares_the_test_split_once():
    p = load_params(REPO / "params.yaml")
    assert p.validate_.expected_test_config_types == p.ingest.split.test_config_types
    assert "*test_config_types" in (REPO / "params.yaml").read_text()


# --------------------------------------------------------------------------- params, tables
def test_energy_window_by_composition():
    p = ValidateParams(allowed_species=["Cu", "Ag"],
                       energy_per_atom_range={"Cu": (-1.0, 5.0), "AgCu": (-4.0, 1.0)})
    assert p.energy_per_atom_range["default"] == (-20.0, 5.0)
    assert composition_key(["Mo", "Li", "Mo"]) == "LiMo"
    t = energy_bounds(pd.DataFrame({"composition": ["Cu", "AgCu", "Mo"]}), p)
    assert t["energy_range_key"].tolist() == ["Cu", "AgCu", "default"]
    assert t["energy_per_atom_min"].tolist() == [-1.0, -4.0, -20.0]
    assert t["energy_per_atom_max"].tolist() == [5.0, 1.0, 5.0]
    for bad, msg in (({"MoLi": (0, 1)}, "alphabetical"), ({"Cu2": (0, 1)}, "alphabetical"),
                     ({"Cu": (1, 0)}, "low < high"), ({"Xx": (0, 1)}, "alphabetical")):
        with pytest.raises(ValueError, match=msg):
            ValidateParams(allowed_species=["Cu"], energy_per_atom_range=bad)


def test_atom_table_rows_and_columns(suite_run):
    frames, atoms, table = suite_run["frames"], suite_run["atoms"], suite_run["table"]
    assert len(atoms) == sum(len(a) for a in frames) == table["n_atoms"].sum()
    k = next(i for i, a in enumerate(frames) if a.info["case"] == "bulk")
    rows = atoms[atoms["frame"] == k]
    f = labels(frames[k])[1]
    assert rows["atom"].tolist() == list(range(len(frames[k])))
    np.testing.assert_allclose(rows["force_norm"], np.linalg.norm(f, axis=1))
    assert rows["force_finite"].all()
    # nearest-neighbour distance per atom, the frame's min_distance its minimum
    d = frames[k].get_all_distances(mic=True) + np.eye(len(frames[k])) * 1e9
    np.testing.assert_allclose(rows["min_distance"], d.min(axis=1), rtol=1e-10)
    assert table["min_distance"].iloc[k] == pytest.approx(d.min())
    # frames without forces: force_finite is NA (the frame check has_forces), not a failure
    m = next(i for i, a in enumerate(frames) if a.info["case"] == "missing_forces")
    assert atoms[atoms["frame"] == m]["force_finite"].isna().all()
    # a one-atom periodic cell measures its images
    p1 = next(i for i, a in enumerate(frames) if a.info["case"] == "primitive")
    assert table["min_distance"].iloc[p1] == pytest.approx(3.61 / np.sqrt(2))


def test_atom_table_is_built_without_per_atom_loops():
    """A large table in well under a second per 100k atoms (no Python loop over atoms)."""
    import time

    a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((10, 10, 10))  # 4000 atoms
    set_labels(a, 0.0, np.zeros((len(a), 3)))
    frames = [a] * 50  # 200k atoms
    nearest = [np.full(len(a), 2.55)] * len(frames)
    t0 = time.perf_counter()
    atoms = atom_table(frames, 3.0, nearest=nearest)
    assert len(atoms) == 200_000 and atoms["frame"].iloc[-1] == 49 and atoms["atom"].iloc[-1] == 3999
    assert time.perf_counter() - t0 < 5.0


# ------------------------------------------------------------------------------- real data
@pytest.mark.parametrize("element", ["Mo", "Li"])
def test_mlearn_training_sets_pass_every_expectation(u_mlearn_dir, element):
    frames, rejected = read_extxyz(u_mlearn_dir / f"{element}_training.extxyz")
    assert rejected == []
    repo = load_params(REPO / "params.yaml").validate_
    p = repo.model_copy(update={"allowed_species": [element], "expected_test_config_types": []})
    table, atoms = build_tables(frames, p)
    failures, result = validate_frames(table, p, atoms)
    assert failures == {}, list(failures.items())[:3]
    assert result["success"] is True
    # the measured margins behind the defaults
    assert table["net_force"].max() < 1e-6 < p.net_force_tolerance
    low, high = p.energy_per_atom_range[element]
    assert low + 0.5 < table["energy_per_atom"].min() and table["energy_per_atom"].max() < high - 0.5


def test_decide_is_the_stage_decision_and_writes_nothing(suite_run, tmp_path, monkeypatch):
    """``decide`` (what ``mlipops validate`` and the injected-error benchmark call) gives the
    suite's verdicts frame by frame, with check and reason, and touches no file."""
    from mlipops.quality.validate import decide

    monkeypatch.chdir(tmp_path)
    dec = decide(suite_run["frames"], P, None)  # no descriptors: the outlier test is off
    assert dec.failures == suite_run["failures"]
    assert dec.outliers == {} and dec.outlier_report is None and "disabled" in dec.outlier_note
    q = dec.quarantined(suite_run["frames"])
    assert list(q.frame) == sorted(suite_run["failures"])
    assert list(q.frame_id) == [suite_run["frames"][k].info["frame_id"] for k in q.frame]
    for k, check in zip(q.frame, q.check):
        assert check == ",".join(c for c, _ in suite_run["failures"][k])
    assert list(tmp_path.iterdir()) == []


def test_nearest_short_lattice_vector_found_behind_long_cell_vectors():
    """A cell whose vectors are all long but whose lattice has a very short vector (b − a = 0.1 Å: a cell
    typed wrong) is not searched (millions of images): every atom gets that vector's length. The fast test that
    skips the Minkowski reduction for ordinary cells (smallest singular value) must not skip it here."""
    from ase import Atoms

    from mlipops.quality.validate import _nearest

    skew = Atoms("Cu2", positions=[[0, 0, 0], [1.5, 1.5, 1.5]], pbc=True,
                 cell=[[10.0, 0, 0], [10.1, 0.01, 0], [0, 0, 10.0]])
    near = _nearest(skew, 3.0)
    assert np.allclose(near, np.hypot(0.1, 0.01))
    ordinary = Atoms("Cu4", positions=[[0, 0, 0], [0, 1.8, 1.8], [1.8, 0, 1.8], [1.8, 1.8, 0]], cell=[3.6] * 3,
                     pbc=True)
    assert np.allclose(_nearest(ordinary, 3.0), 3.6 / np.sqrt(2))
