"""The canonical frame: content hash, extxyz round trip, mlearn JSON and ASE db readers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from mlipops.frames import (
    Rejected,
    frame_id,
    labels,
    oracle_info,
    read_db,
    read_extxyz,
    read_frames,
    read_mlearn_json,
    set_labels,
    write_extxyz,
)

EV_PER_A3_PER_GPA = 1.0 / 160.21766208  # 1 GPa in eV/Å^3, written out independently of ase.units


def _lattice_cu() -> Atoms:
    # positions are exact multiples of 1.8 Å: far from any rounding boundary of the 1e-6 Å grid
    return bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))


# ------------------------------------------------------------------------------------ frame_id
@pytest.mark.parametrize("noise", [1e-12, 1e-9, 1e-7])
def test_frame_id_stable_under_noise_below_resolution(noise, u_rng):
    a = _lattice_cu()
    b = a.copy()
    b.positions += u_rng.uniform(-noise, noise, b.positions.shape)
    b.cell = b.cell.array + u_rng.uniform(-noise, noise, (3, 3))
    assert not np.array_equal(a.positions, b.positions) or noise < 1e-15
    assert frame_id(a) == frame_id(b)


def test_frame_id_ignores_labels_and_info():
    a = _lattice_cu()
    b = a.copy()
    set_labels(b, -3.0, np.ones((len(b), 3)))
    b.info["config_type"] = "something"
    assert frame_id(a) == frame_id(b)


def test_frame_id_is_sha256_hex():
    fid = frame_id(_lattice_cu())
    assert len(fid) == 64 and int(fid, 16) >= 0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_frame_id_changes_when_one_atom_moves_1e4(axis):
    a = _lattice_cu()
    b = a.copy()
    b.positions[3, axis] += 1e-4
    assert frame_id(a) != frame_id(b)


def test_frame_id_changes_with_cell_pbc_and_species():
    a = _lattice_cu()
    ref = frame_id(a)
    c = a.copy()
    c.cell = c.cell.array * (1 + 1e-4)  # same positions, bigger box
    assert frame_id(c) != ref
    p = a.copy()
    p.pbc = (True, True, False)
    assert frame_id(p) != ref
    s = a.copy()
    s.numbers[0] = 79  # Au
    assert frame_id(s) != ref


# ------------------------------------------------------------------------------------ extxyz
def _labelled_frame(rng) -> Atoms:
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.positions = np.round(a.positions + rng.normal(0, 0.05, a.positions.shape), 5)
    forces = np.round(rng.normal(0, 0.3, (len(a), 3)), 6)
    stress = np.array([1.0e-3, -2.0e-3, 3.0e-3, -4.0e-4, 5.0e-4, -6.0e-4])
    set_labels(a, -14.123456789012, forces, stress)
    a.info["config_type"] = "crystal_fcc"
    a.info.update(oracle_info("ase.calculators.lj.LennardJones", "ase-3.29.0",
                              {"sigma": 2.3, "epsilon": 0.4, "rc": 6.0}))
    a.info["temperature_K"] = 300.0
    a.info["frame_id"] = frame_id(a)
    return a


def test_extxyz_round_trip_keeps_labels_and_provenance(tmp_path, u_rng):
    frames = [_labelled_frame(u_rng) for _ in range(3)]
    path = tmp_path / "sub" / "frames.extxyz"
    assert write_extxyz(path, frames) == 3
    assert [p.name for p in path.parent.iterdir()] == ["frames.extxyz"]  # no temporary file left
    back, rejected = read_extxyz(path)
    assert rejected == []
    assert len(back) == 3
    for k, (a, b) in enumerate(zip(frames, back)):
        ea, fa, sa = labels(a)
        eb, fb, sb = labels(b)
        assert eb == pytest.approx(ea, abs=1e-10)
        np.testing.assert_allclose(fb, fa, atol=1e-8)
        assert sb.shape == (6,)
        np.testing.assert_allclose(sb, sa, atol=1e-12)
        np.testing.assert_allclose(b.positions, a.positions, atol=1e-8)
        np.testing.assert_allclose(b.cell.array, a.cell.array, atol=1e-8)
        assert b.pbc.tolist() == [True, True, True]
        assert b.info["config_type"] == "crystal_fcc"
        assert b.info["oracle_name"] == "ase.calculators.lj.LennardJones"
        assert b.info["oracle_version"] == "ase-3.29.0"
        assert json.loads(b.info["oracle_settings"]) == {"sigma": 2.3, "epsilon": 0.4, "rc": 6.0}
        assert float(b.info["temperature_K"]) == 300.0
        assert b.info["source"] == "frames"
        assert b.info["source_index"] == k
        assert b.info["frame_id"] == a.info["frame_id"] == frame_id(b)
        assert isinstance(b.calc, SinglePointCalculator)


def test_atomic_path_replaces_a_file_whole_or_not_at_all(tmp_path):
    from mlipops.paths import atomic_path, atomic_write_text

    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed half-way")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # the temporary file is gone
    with atomic_path(target) as one, atomic_path(target, fsync=True) as two:
        assert one != two and one.parent == two.parent == tmp_path and one.name.startswith(".f.txt.")
        one.write_text("first")
        two.write_text("second")
    assert target.read_text() == "first"  # the outer block ends last: its file is the one left
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_extxyz_without_config_type_gets_default_or_unknown(tmp_path):
    a = bulk("Cu", "fcc", a=3.6)
    set_labels(a, -1.0, np.zeros((1, 3)))
    write_extxyz(tmp_path / "a.extxyz", [a])
    (b,), _ = read_extxyz(tmp_path / "a.extxyz")
    assert b.info["config_type"] == "unknown"
    (c,), _ = read_extxyz(tmp_path / "a.extxyz", default_config_type="bulk")
    assert c.info["config_type"] == "bulk"


def test_extxyz_bad_frame_is_rejected_not_lost(tmp_path):
    good = bulk("Cu", "fcc", a=3.6)
    set_labels(good, -1.0, np.zeros((1, 3)))
    write_extxyz(tmp_path / "g.extxyz", [good, good])
    text = (tmp_path / "g.extxyz").read_text().splitlines(keepends=True)
    text[2] = "Cu  not_a_number 0.0 0.0 0.0 0.0 0.0\n"  # corrupt the atom line of frame 0
    (tmp_path / "b.extxyz").write_text("".join(text))
    frames, rejected = read_extxyz(tmp_path / "b.extxyz")
    assert len(frames) == 1 and frames[0].info["source_index"] == 1
    assert len(rejected) == 1
    r = rejected[0]
    assert isinstance(r, Rejected)
    assert r.source_index == 0 and r.check == "parse"
    assert "not_a_number" in r.raw


# ------------------------------------------------------------------------------------ mlearn
def _mlearn_doc():
    cell = [[3.2, 0.0, 0.0], [0.1, 3.1, 0.0], [0.0, 0.2, 3.3]]
    return {
        "structure": {
            "@module": "pymatgen.core.structure",
            "lattice": {"matrix": cell},
            "sites": [
                {"species": [{"element": "Mo", "occu": 1}], "xyz": [0.0, 0.0, 0.0], "abc": [0, 0, 0]},
                {"species": [{"element": "Mo", "occu": 1}], "xyz": [1.65, 1.65, 1.65],
                 "abc": [0.5, 0.5, 0.5]},
            ],
        },
        "outputs": {
            "energy": -21.5,
            "forces": [[0.1, -0.2, 0.3], [-0.1, 0.2, -0.3]],
            # VASP kBar, order xx yy zz xy yz zx
            "virial_stress": [10.0, 20.0, 30.0, 4.0, 5.0, 6.0],
        },
        "group": "Elastic",
        "description": "strained bcc cell",
    }


def test_read_mlearn_json_converts_units_order_and_sign(tmp_path):
    doc = _mlearn_doc()
    frac_doc = _mlearn_doc()
    for s in frac_doc["structure"]["sites"]:
        del s["xyz"]  # positions only as fractional coordinates
    (tmp_path / "mo.json").write_text(json.dumps([doc, frac_doc]))
    frames, rejected = read_mlearn_json(tmp_path / "mo.json")
    assert rejected == []
    assert len(frames) == 2
    a = frames[0]
    assert a.get_chemical_symbols() == ["Mo", "Mo"]
    np.testing.assert_allclose(a.cell.array, doc["structure"]["lattice"]["matrix"])
    np.testing.assert_allclose(a.positions, [[0, 0, 0], [1.65, 1.65, 1.65]])
    assert a.pbc.all()
    e, f, s = labels(a)
    assert e == -21.5
    np.testing.assert_allclose(f, doc["outputs"]["forces"])
    # ASE: eV/Å^3, tension positive (VASP's sign flipped), Voigt xx yy zz yz xz xy; 1 kBar = 0.1 GPa
    expected = -0.1 * EV_PER_A3_PER_GPA * np.array([10.0, 20.0, 30.0, 5.0, 6.0, 4.0])
    np.testing.assert_allclose(s, expected, rtol=1e-8)
    assert s[0] == pytest.approx(-6.2415091e-3, rel=1e-6)  # 10 kBar = 1 GPa
    assert a.info["config_type"] == "Elastic"
    assert a.info["description"] == "strained_bcc_cell"
    assert a.info["source"] == "mo" and a.info["source_index"] == 0
    assert a.info["frame_id"] == frame_id(a)
    # fractional sites give the same Cartesian structure (abc @ lattice)
    b = frames[1]
    np.testing.assert_allclose(b.positions, np.array([[0, 0, 0], [0.5, 0.5, 0.5]]) @ np.array(
        doc["structure"]["lattice"]["matrix"]))


def test_read_frames_autodetects_mlearn_json_and_keeps_bad_docs(tmp_path):
    bad = {"outputs": {"energy": 1.0}}  # no structure
    (tmp_path / "mix.json").write_text(json.dumps([_mlearn_doc(), bad]))
    frames, rejected = read_frames(tmp_path / "mix.json")
    assert len(frames) == 1
    assert len(rejected) == 1 and rejected[0].source_index == 1 and rejected[0].check == "parse"
    assert "structure" in rejected[0].reason
    assert json.loads(rejected[0].raw) == bad


# ------------------------------------------------------------------------------------ ASE db
@pytest.mark.parametrize("suffix", [".db", ".json"])
def test_read_db_keeps_labels_and_key_value_pairs(tmp_path, suffix, u_rng):
    import ase.db

    path = tmp_path / f"frames{suffix}"
    con = ase.db.connect(str(path))
    written = []
    for k in range(3):
        a = bulk("Cu", "fcc", a=3.6 + 0.01 * k, cubic=True)
        a.positions += u_rng.normal(0, 0.02, a.positions.shape)
        forces = u_rng.normal(0, 0.1, (len(a), 3))
        stress = u_rng.normal(0, 1e-3, 6)
        a.calc = SinglePointCalculator(a, energy=-3.5 - k, forces=forces, stress=stress)
        con.write(a, config_type=f"crystal_{k}")
        written.append((a.copy(), -3.5 - k, forces, stress))
    frames, rejected = read_frames(path)
    assert rejected == []
    assert len(frames) == 3
    for k, (b, (a, e, f, s)) in enumerate(zip(frames, written)):
        eb, fb, sb = labels(b)
        assert eb == pytest.approx(e)
        np.testing.assert_allclose(fb, f)
        np.testing.assert_allclose(sb, s)
        np.testing.assert_allclose(b.positions, a.positions)
        assert b.info["config_type"] == f"crystal_{k}"
        assert b.info["source"] == "frames" and b.info["source_index"] == k
        assert b.info["frame_id"] == frame_id(a)


def test_read_db_direct_and_default_config_type(tmp_path):
    import ase.db

    con = ase.db.connect(str(tmp_path / "x.db"))
    a = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.2]])
    a.calc = SinglePointCalculator(a, energy=0.5, forces=[[0, 0, 1.0], [0, 0, -1.0]])
    con.write(a)
    frames, rejected = read_db(tmp_path / "x.db", default_config_type="dimer", source="mine")
    assert rejected == []
    (b,) = frames
    assert b.info["config_type"] == "dimer" and b.info["source"] == "mine"
    assert not b.pbc.any()
    e, f, s = labels(b)
    assert e == 0.5 and s is None
    np.testing.assert_allclose(f, [[0, 0, 1.0], [0, 0, -1.0]])
