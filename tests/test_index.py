"""The DuckDB coverage index: tables, coordination numbers, coverage view, read-only queries."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111

from mlipops.errors import MlipopsError, StageInputError
from mlipops.frames import Rejected, file_md5, frame_id, to_extxyz_string, write_extxyz
from mlipops.index.build import atom_rows, build_index, query
from mlipops.oracles import get_oracle
from mlipops.params import DescriptorParams, IndexParams
from mlipops.quarantine import rejected_frame

A = 3.61  # Å, fcc Cu lattice constant used throughout


def _frames():
    bulk_cu = bulk("Cu", "fcc", a=A, cubic=True).repeat((2, 2, 2))  # 32 atoms
    bulk_cu.info.update(config_type="crystal_fcc", split="train")
    slab = fcc111("Cu", size=(2, 2, 4), a=A, vacuum=6.0)  # 16 atoms, 4 layers
    slab.info.pop("adsorbate_info", None)  # a dict: extxyz cannot store it
    slab.info.update(config_type="surface_111", split="val")
    hot = bulk("Cu", "fcc", a=A * 1.02, cubic=True).repeat((2, 2, 2))
    hot.positions += np.random.default_rng(0).normal(0, 0.05, hot.positions.shape)
    hot.info.update(config_type="liquid", split="train", temperature_K=2200.0)
    dimer = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.3]])
    dimer.info.update(config_type="path_dimer", split="test")
    frames = get_oracle("emt").label([bulk_cu, slab, hot, dimer])
    for k, a in enumerate(frames):
        a.info.update(frame_id=frame_id(a), source="unit", source_index=k)
    return frames


@pytest.fixture(scope="module")
def u_index(tmp_path_factory):
    d = tmp_path_factory.mktemp("index")
    frames = _frames()
    write_extxyz(d / "accepted.extxyz", frames)
    overlap = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 0.5]])
    (overlap,) = get_oracle("emt").label([overlap])
    overlap.info.update(config_type="path_dimer", frame_id=frame_id(overlap))
    q = rejected_frame([
        Rejected("unit", 10, "min_distance", "atoms 0 and 1 are 0.50 Å apart", to_extxyz_string(overlap),
                 overlap.info["frame_id"], "path_dimer"),
        Rejected("unit", 11, "parse", "unit frame 11: ValueError: bad line", "3\nnot a frame\n"),
    ])
    q.to_parquet(d / "quarantine.parquet", index=False)
    stats = build_index(IndexParams(coordination_cutoff=3.0), DescriptorParams(), d / "accepted.extxyz",
                        d / "quarantine.parquet", d / "index.duckdb")
    return {"dir": d, "db": d / "index.duckdb", "stats": stats, "frames": frames}


def test_build_stats_and_dataset_row(u_index):
    s = u_index["stats"]
    assert s["n_accepted"] == 4 and s["n_quarantined"] == 2 and s["n_frames"] == 6
    assert s["n_atoms"] == 32 + 16 + 32 + 2
    assert s["dataset_id"] == file_md5(u_index["dir"] / "accepted.extxyz")
    assert not (u_index["dir"] / "index.tmp.duckdb").exists()
    ds = query("SELECT * FROM datasets", u_index["db"])
    assert len(ds) == 1
    assert ds.loc[0, "dataset_id"] == s["dataset_id"]
    assert ds.loc[0, "n_accepted"] == 4 and ds.loc[0, "n_quarantined"] == 2


def test_tables_and_columns(u_index):
    import duckdb

    con = duckdb.connect(str(u_index["db"]), read_only=True)
    try:
        tables = {r[0]: r[1] for r in con.execute(
            "SELECT table_name, table_type FROM information_schema.tables").fetchall()}
        cols = {}
        for t, c in con.execute("SELECT table_name, column_name FROM information_schema.columns").fetchall():
            cols.setdefault(t, []).append(c)
    finally:
        con.close()
    assert tables == {"datasets": "BASE TABLE", "frames": "BASE TABLE", "atoms": "BASE TABLE",
                      "hull": "BASE TABLE", "hull_points": "BASE TABLE",
                      "coverage_by_config": "VIEW", "coverage_by_species_coordination": "VIEW",
                      "coverage_by_temperature": "VIEW", "extrapolating_atoms": "VIEW"}
    assert cols["atoms"] == ["frame_id", "atom_index", "split", "config_type", "species", "coordination", "nn_distance",
                             "bond_angle_deviation", "nearest_crystal", "descriptor", "projection",
                             "inside_hull", "extrapolation_grade", "hull_distance", "extrapolation_reason"]
    assert {"species", "method", "k", "n_extreme_points", "explained_variance"} <= set(cols["hull"])
    assert {"frame_id", "dataset_id", "status", "split", "config_type", "n_atoms", "energy",
            "energy_per_atom", "max_force", "volume_per_atom", "temperature_K", "periodic",
            "quarantine_check", "quarantine_reason"} <= set(cols["frames"])


def test_frame_rows_hold_labels(u_index):
    df = query("SELECT * FROM frames WHERE status = 'accepted' ORDER BY source_index", u_index["db"])
    assert df["config_type"].tolist() == ["crystal_fcc", "surface_111", "liquid", "path_dimer"]
    assert df["split"].tolist() == ["train", "val", "train", "test"]
    for row, a in zip(df.itertuples(), u_index["frames"]):
        assert row.frame_id == a.info["frame_id"]
        assert row.n_atoms == len(a)
        assert row.energy == pytest.approx(a.get_potential_energy(), abs=1e-8)
        assert row.energy_per_atom == pytest.approx(row.energy / row.n_atoms)
        assert row.max_force == pytest.approx(np.linalg.norm(a.get_forces(), axis=1).max(), abs=1e-8)
    assert df.loc[0, "formula"] == "Cu32"
    assert df.loc[0, "volume_per_atom"] == pytest.approx(A**3 / 4)
    assert df.loc[0, "periodic"] and not df.loc[1, "periodic"] and not df.loc[3, "periodic"]
    assert np.isnan(df.loc[1, "volume_per_atom"])  # slab: not a bulk volume
    assert df.loc[2, "temperature_K"] == 2200.0
    q = query("SELECT * FROM frames WHERE status = 'quarantined' ORDER BY source_index", u_index["db"])
    assert q["quarantine_check"].tolist() == ["min_distance", "parse"]
    assert q.loc[0, "n_atoms"] == 2 and q.loc[0, "energy"] > 10.0  # overlapping atoms: huge energy
    assert q.loc[1, "frame_id"] == "unparsed:unit#11"


def test_coordination_numbers(u_index):
    db = u_index["db"]
    fid = {a.info["config_type"]: a.info["frame_id"] for a in u_index["frames"]}
    bulk_atoms = query(f"SELECT * FROM atoms WHERE frame_id = '{fid['crystal_fcc']}'", db)
    assert len(bulk_atoms) == 32
    assert (bulk_atoms["coordination"] == 12).all()
    np.testing.assert_allclose(bulk_atoms["nn_distance"], A / math.sqrt(2.0), atol=1e-6)
    slab = query(f"SELECT * FROM atoms WHERE frame_id = '{fid['surface_111']}' ORDER BY atom_index", db)
    z = np.array([p[2] for p in u_index["frames"][1].positions])
    top, bottom = np.isclose(z, z.max()), np.isclose(z, z.min())
    inner = ~(top | bottom)
    cn = slab["coordination"].to_numpy()
    assert (cn[top | bottom] == 9).all()  # (111) surface: 6 in-plane + 3 below (or above)
    assert (cn[inner] == 12).all()
    assert cn[top].max() < cn[inner].min()
    dimer = query(f"SELECT coordination, nn_distance FROM atoms WHERE frame_id = '{fid['path_dimer']}'", db)
    assert dimer["coordination"].tolist() == [1, 1]
    np.testing.assert_allclose(dimer["nn_distance"], 2.3)


def test_atom_rows_isolated_atom_has_no_neighbour():
    a = Atoms("Cu", positions=[[0, 0, 0]])
    a.info["frame_id"] = frame_id(a)
    rows = atom_rows(a, 3.0)
    assert rows["coordination"].tolist() == [0]
    assert np.isnan(rows["nn_distance"].iloc[0])


def test_coverage_view(u_index):
    cov = query("SELECT * FROM coverage_by_config", u_index["db"])
    key = {(r.split, r.config_type, r.status): r for r in cov.itertuples()}
    fcc = key[("train", "crystal_fcc", "accepted")]
    assert fcc.n_frames == 1 and fcc.n_atoms == 32
    assert fcc.min_volume_per_atom == pytest.approx(A**3 / 4)
    liquid = key[("train", "liquid", "accepted")]
    assert liquid.min_temperature_K == liquid.max_temperature_K == 2200.0
    assert liquid.min_volume_per_atom == pytest.approx((A * 1.02) ** 3 / 4)
    assert np.isnan(key[("val", "surface_111", "accepted")].min_volume_per_atom)
    assert cov["n_frames"].sum() == 6
    assert (cov["status"] == "quarantined").sum() >= 1
    total = query("SELECT sum(n_frames) AS n FROM coverage_by_config WHERE status = 'accepted'", u_index["db"])
    assert int(total.loc[0, "n"]) == 4


@pytest.mark.parametrize("sql", [
    "CREATE TABLE evil (a INTEGER)",
    "INSERT INTO frames (frame_id, dataset_id, status) VALUES ('x', 'y', 'accepted')",
    "DELETE FROM frames",
    "DROP VIEW coverage_by_config",
    "UPDATE atoms SET inside_hull = true",
])
def test_query_refuses_writes(u_index, sql):
    with pytest.raises(MlipopsError, match="query refused: (CREATE|INSERT|DELETE|DROP|UPDATE) statement"):
        query(sql, u_index["db"])
    assert len(query("SELECT * FROM atoms", u_index["db"])) == u_index["stats"]["n_atoms"]


def test_query_refuses_file_access(u_index, tmp_path):
    csv = tmp_path / "secret.csv"
    csv.write_text("a,b\n1,2\n")  # the file exists: only the configuration can refuse it
    with pytest.raises(MlipopsError):
        query(f"SELECT * FROM read_csv('{csv}')", u_index["db"])
    with pytest.raises(MlipopsError):
        query(f"SELECT * FROM '{csv}'", u_index["db"])
    out = tmp_path / "dump.csv"
    with pytest.raises(MlipopsError):
        query(f"COPY frames TO '{out}'", u_index["db"])
    assert not out.exists()


def test_query_on_missing_index(tmp_path):
    with pytest.raises(MlipopsError, match="index not found"):
        query("SELECT 1", tmp_path / "none.duckdb")


def test_build_index_requires_inputs(tmp_path):
    with pytest.raises(StageInputError):
        build_index(IndexParams(), DescriptorParams(), tmp_path / "accepted.extxyz", tmp_path / "quarantine.parquet",
                    tmp_path / "index.duckdb")
    assert not (tmp_path / "index.duckdb").exists()


# ------------------------------------------------------------------------------ hull in the index
def test_hull_rows_and_training_atoms_inside(u_index):
    db = u_index["db"]
    hull = query("SELECT * FROM hull", db)
    assert hull["species"].tolist() == ["Cu"]
    h = hull.iloc[0]
    assert h["k"] == 5 and h["method"] == "pca+lp" and h["training_split"] == "train"
    assert h["n_train_atoms"] == 64 and 1 <= h["n_extreme_points"] <= 64
    assert 0 < h["explained_variance"] <= 1 and len(h["explained_variance_ratio"]) == 5
    n_pts = query("SELECT count(*) AS n FROM hull_points", db).loc[0, "n"]
    assert n_pts == h["n_extreme_points"]
    at = query("SELECT * FROM atoms", db)
    assert (at["descriptor"].map(len) == 24).all() and (at["projection"].map(len) == 5).all()
    train = at[at.split == "train"]
    assert train["inside_hull"].all() and (train["extrapolation_grade"] <= 1 + 1e-7).all()
    assert (train["hull_distance"] == 0).all() and train["extrapolation_reason"].isna().all()


def test_dimer_and_surface_extrapolate(u_index):
    db = u_index["db"]
    ex = query("SELECT * FROM extrapolating_atoms", db)
    assert set(ex["config_type"]) <= {"path_dimer", "surface_111"}
    dimer = ex[ex.config_type == "path_dimer"]
    assert len(dimer) == 2 and (dimer["extrapolation_grade"] > 1).all() and (dimer["hull_distance"] > 0).all()
    assert (dimer["extrapolation_reason"] == "outside_hull").all()
    assert ex["extrapolation_grade"].is_monotonic_decreasing
    fr = query("SELECT config_type, n_atoms_outside_hull, max_extrapolation_grade FROM frames "
               "WHERE status = 'accepted'", db).set_index("config_type")
    assert fr.loc["path_dimer", "n_atoms_outside_hull"] == 2
    assert fr.loc["crystal_fcc", "n_atoms_outside_hull"] == 0


def test_views_species_coordination_and_temperature(u_index):
    db = u_index["db"]
    z = query("SELECT * FROM coverage_by_species_coordination", db)
    key = {(r.coordination, r.split): r for r in z.itertuples()}
    assert key[(12, "train")].n_atoms >= 32 and key[(1, "test")].n_atoms == 2
    assert key[(1, "test")].n_outside_hull == 2
    assert z["n_atoms"].sum() == u_index["stats"]["n_atoms"]
    t = query("SELECT * FROM coverage_by_temperature", db)
    assert t[["temperature_bin_K", "config_type", "n_frames", "n_atoms"]].values.tolist() == [[2000, "liquid", 1, 32]]
    by_cfg = query("SELECT * FROM coverage_by_config WHERE status = 'accepted'", db).set_index("config_type")
    assert by_cfg.loc["path_dimer", "fraction_outside_hull"] == 1.0
    assert by_cfg.loc["crystal_fcc", "n_atoms_outside_hull"] == 0


def test_bond_angle_deviation_column(u_index):
    db = u_index["db"]
    fid = {a.info["config_type"]: a.info["frame_id"] for a in u_index["frames"]}
    fcc = query(f"SELECT * FROM atoms WHERE frame_id = '{fid['crystal_fcc']}'", db)
    assert (fcc["bond_angle_deviation"] < 1e-6).all() and (fcc["nearest_crystal"] == "fcc").all()
    slab = query(f"SELECT * FROM atoms WHERE frame_id = '{fid['surface_111']}'", db)
    assert (slab.loc[slab.coordination == 9, "bond_angle_deviation"] > 1.0).all()


def test_check_structures_new_and_unseen(u_index):
    from mlipops.index.build import check_structures

    frames = u_index["frames"]
    df = check_structures([frames[0], frames[3]], u_index["db"])  # bulk fcc (trained on), dimer
    assert len(df) == 34 and df["inside_hull"].iloc[:32].all() and not df["inside_hull"].iloc[32:].any()
    ref = query("SELECT extrapolation_grade FROM atoms WHERE config_type = 'path_dimer' ORDER BY atom_index",
                u_index["db"])
    np.testing.assert_allclose(df["extrapolation_grade"].iloc[32:], ref["extrapolation_grade"], rtol=1e-5)
    alloy = bulk("Cu", "fcc", a=A, cubic=True)
    alloy[0].symbol = "Au"  # an element the index has never seen
    df = check_structures([alloy], u_index["db"])
    assert not df["inside_hull"].any() and np.isinf(df["extrapolation_grade"]).all()
    assert set(df["extrapolation_reason"]) == {"unseen_species"}


def test_empty_training_split_is_a_clear_error(tmp_path):
    frames = _frames()
    for a in frames:
        a.info["split"] = "test"
    write_extxyz(tmp_path / "accepted.extxyz", frames)
    rejected_frame([]).to_parquet(tmp_path / "quarantine.parquet", index=False)
    with pytest.raises(StageInputError, match="'train' split is empty"):
        build_index(IndexParams(), DescriptorParams(), tmp_path / "accepted.extxyz",
                    tmp_path / "quarantine.parquet", tmp_path / "index.duckdb")
    assert not (tmp_path / "index.duckdb").exists()


def test_rebuild_is_atomic(u_index, tmp_path):
    import shutil

    db = tmp_path / "index.duckdb"
    shutil.copy(u_index["db"], db)
    before = db.read_bytes()
    bad = tmp_path / "accepted.extxyz"
    bad.write_text("2\nthis is not extxyz\nCu 0 0 0\n")
    rejected_frame([]).to_parquet(tmp_path / "quarantine.parquet", index=False)
    with pytest.raises(MlipopsError, match="accepted.extxyz"):
        build_index(IndexParams(), DescriptorParams(), bad, tmp_path / "quarantine.parquet", db)
    assert db.read_bytes() == before and not (tmp_path / "index.tmp.duckdb").exists()


def test_cli_query_file_json_and_hull_check(u_index, tmp_path):
    import json
    import subprocess
    import sys

    exe = [sys.executable, "-c", "from mlipops.cli import main; main()"]
    db = str(u_index["db"])
    sql = tmp_path / "q.sql"
    sql.write_text("SELECT config_type, n_atoms_outside_hull FROM coverage_by_config\n"
                   "WHERE status = 'accepted' ORDER BY config_type")
    res = subprocess.run([*exe, "query", "--file", str(sql), "--db", db, "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert {r["config_type"]: r["n_atoms_outside_hull"] for r in rows}["path_dimer"] == 2
    res = subprocess.run([*exe, "query", f"COPY frames TO '{tmp_path / 'x.csv'}'", "--db", db],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "query refused: COPY statement" in res.stderr
    structure = tmp_path / "new.extxyz"
    alloy = bulk("Cu", "fcc", a=A, cubic=True)
    alloy[0].symbol = "Au"
    write_extxyz(structure, [u_index["frames"][3], alloy])
    res = subprocess.run([*exe, "hull", "check", str(structure), "--db", db, "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)  # stdout is pure JSON (HiGHS' banner must not leak into it)
    assert len(rows) == 6 and all(not r["inside_hull"] for r in rows)
    assert [r["extrapolation_grade"] is None for r in rows] == [False, False, True, True, True, True]
    assert "6 of 6 atoms outside" in res.stderr
    res = subprocess.run([*exe, "hull", "check", str(tmp_path / "missing.extxyz"), "--db", db],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "missing.extxyz" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("late_split,workers", [("train", 1), ("val", 1), ("train", 2)])
def test_descriptors_from_the_one_neighbour_list_pass(tmp_path, monkeypatch, late_split, workers):
    """The index computes the descriptors in its one streaming pass, with the species channels of the training
    frames of the first chunk; a training species first seen later (``train``) makes it compute them again with
    every channel. Either way the stored descriptors are those of the training split's species, as computed
    directly; with 2 worker processes reading the chunks as well."""
    import duckdb
    import pandas as pd

    from mlipops.descriptors import compute_descriptors
    from mlipops.index import build

    monkeypatch.setattr(build, "_CHUNK_FRAMES", 50)
    monkeypatch.setenv("MLIPOPS_READ_WORKERS", str(workers))
    monkeypatch.setenv("MLIPOPS_READ_MIN_BYTES", "0")

    rng = np.random.default_rng(7)
    frames = []
    for k in range(140):  # 3 chunks of 50 frames
        a = bulk("Cu", "fcc", a=A, cubic=True).repeat((2, 2, 2))
        a.positions += rng.normal(0, 0.06, a.positions.shape)
        a.info.update(config_type="crystal_fcc", split="train" if k % 5 else "val")
        frames.append(a)
    frames[-3][5].symbol = "Ag"  # a species the first chunk has not seen
    frames[-3].info["split"] = late_split
    frames[-2][0].symbol = "Ni"  # a species no training frame has
    frames[-2].info["split"] = "test"
    frames = get_oracle("emt").label(frames)
    for k, a in enumerate(frames):
        a.info.update(frame_id=frame_id(a), source="unit", source_index=k)
    write_extxyz(tmp_path / "accepted.extxyz", frames)
    rejected_frame([]).to_parquet(tmp_path / "quarantine.parquet", index=False)
    build_index(IndexParams(pca_components=3), DescriptorParams(), tmp_path / "accepted.extxyz",
                tmp_path / "quarantine.parquet", tmp_path / "index.duckdb")
    species = ["Ag", "Cu"] if late_split == "train" else ["Cu"]
    g, unseen = compute_descriptors(frames, species, DescriptorParams().model_dump())
    con = duckdb.connect(str(tmp_path / "index.duckdb"), read_only=True)
    try:
        got = con.execute("SELECT descriptor, extrapolation_reason FROM atoms ORDER BY rowid").df()
        channels = con.execute("SELECT species_channels FROM hull LIMIT 1").fetchone()[0]
    finally:
        con.close()
    assert list(channels) == species
    # float32 in the index; the neighbour lists' edge order (to the coordination radius there) rounds differently
    np.testing.assert_allclose(np.array(got.descriptor.tolist()), g, rtol=1e-5, atol=1e-6)
    assert np.array_equal(pd.Series(got.extrapolation_reason).eq("unseen_species").to_numpy(), unseen)


def test_index_read_by_worker_processes_is_the_same(tmp_path, monkeypatch):
    """Worker processes reading the chunks build the same index, row for row and bit for bit, as one process."""
    import duckdb
    import pandas as pd

    from mlipops.index import build

    frames = _frames()
    write_extxyz(tmp_path / "accepted.extxyz", frames)
    rejected_frame([]).to_parquet(tmp_path / "quarantine.parquet", index=False)
    monkeypatch.setattr(build, "_CHUNK_FRAMES", 2)
    monkeypatch.setenv("MLIPOPS_READ_MIN_BYTES", "0")
    tables = {}
    for workers in (1, 2):
        monkeypatch.setenv("MLIPOPS_READ_WORKERS", str(workers))
        db = tmp_path / f"index{workers}.duckdb"
        build_index(IndexParams(coordination_cutoff=3.0), DescriptorParams(), tmp_path / "accepted.extxyz",
                    tmp_path / "quarantine.parquet", db)
        con = duckdb.connect(str(db), read_only=True)
        try:
            tables[workers] = {t: con.execute(f"SELECT * {'EXCLUDE (created_at)' if t == 'datasets' else ''} "
                                              f"FROM {t} ORDER BY rowid").df()
                               for t in ("datasets", "frames", "atoms", "hull", "hull_points")}
        finally:
            con.close()
    assert len(tables[1]["atoms"]) == sum(len(a) for a in frames)
    for t in tables[1]:
        pd.testing.assert_frame_equal(tables[1][t], tables[2][t], check_exact=True, obj=t)


@pytest.mark.parametrize("workers", [1, 2])
def test_descriptors_saved_by_validate_are_taken_bit_for_bit(tmp_path, monkeypatch, workers):
    """The training frames' descriptors that validate's outlier surrogate saves (``design(save_descriptors=)``)
    are taken by the index for exactly those frames: the same index, table for table and bit for bit, as one
    that computes every descriptor itself (to the rounding noise of features that vanish by symmetry). They are
    not taken for another accepted file (its md5), for other descriptor settings, or from a folder without
    frames."""
    import duckdb
    import pandas as pd

    from mlipops.descriptor_store import write_no_saved_descriptors
    from mlipops.index import build
    from mlipops.quality.outliers import design

    monkeypatch.setattr(build, "_CHUNK_FRAMES", 7)
    monkeypatch.setenv("MLIPOPS_READ_WORKERS", str(workers))
    monkeypatch.setenv("MLIPOPS_READ_MIN_BYTES", "0")
    rng = np.random.default_rng(11)
    frames = []
    for k in range(30):
        a = bulk("Cu", "fcc", a=A, cubic=True).repeat((2, 2, 1 + k % 2))
        a.positions += rng.normal(0, 0.08, a.positions.shape)
        a.info.update(config_type="crystal_fcc", split=("train", "train", "val", "test")[k % 4])
        frames.append(a)
    frames = get_oracle("emt").label(frames) + _frames()
    for k, a in enumerate(frames):
        a.info.update(frame_id=frame_id(a), source="unit", source_index=k)
    accepted = tmp_path / "accepted.extxyz"
    write_extxyz(accepted, frames)
    rejected_frame([]).to_parquet(tmp_path / "quarantine.parquet", index=False)
    from mlipops.frames import read_extxyz

    # as validate has them: read back from the file whose text it copies (one training frame not saved: computed)
    train = [a for a in read_extxyz(accepted)[0] if a.info["split"] == "train"][1:]
    saved = tmp_path / "training_descriptors"
    settings = DescriptorParams().model_dump()
    design(train, ["Cu"], settings, save_descriptors=saved)["saved"].finish(file_md5(accepted))

    def build_and_read(name, **kw):
        db = tmp_path / f"{name}.duckdb"
        stats = build_index(IndexParams(coordination_cutoff=3.0), DescriptorParams(**kw.pop("desc", {})), accepted,
                            tmp_path / "quarantine.parquet", db, **kw)
        con = duckdb.connect(str(db), read_only=True)
        try:
            return stats, {t: con.execute(f"SELECT * {'EXCLUDE (created_at)' if t == 'datasets' else ''} "
                                          f"FROM {t} ORDER BY rowid").df()
                           for t in ("datasets", "frames", "atoms", "hull", "hull_points")}
        finally:
            con.close()

    s0, computed = build_and_read("computed")
    s1, taken = build_and_read("taken", saved=saved)
    assert s0["n_atoms_descriptors_from_validate"] == 0
    assert s1["n_atoms_descriptors_from_validate"] == sum(len(a) for a in train) > 0
    # bit for bit but for features that vanish by symmetry (the perfect crystal's odd-l angular moments): rounding
    # noise of ~1e-30 either way, summed in another order by the surrogate's pass
    ga, gb = (np.array(tables["atoms"].pop("descriptor").tolist()) for tables in (computed, taken))
    assert (ga != gb).any(axis=1).mean() < 0.05
    np.testing.assert_allclose(ga, gb, rtol=1e-6, atol=1e-20)
    for t in computed:
        pd.testing.assert_frame_equal(computed[t], taken[t], check_exact=True, obj=t)
    s2, _ = build_and_read("other_settings", saved=saved, desc={"n_radial": 6})
    assert s2["n_atoms_descriptors_from_validate"] == 0 and "settings" in s2["descriptors_from_validate_note"]
    rows = saved / "rows.npy"
    good = rows.read_bytes()
    rows.write_bytes(b"garbage!" + good[8:])  # a damaged header: every frame computed, with the note, no error
    s5, damaged = build_and_read("damaged", saved=saved)
    assert s5["n_atoms_descriptors_from_validate"] == 0 and "unreadable" in s5["descriptors_from_validate_note"]
    np.testing.assert_array_equal(np.array(damaged["atoms"].pop("descriptor").tolist()), ga)
    pd.testing.assert_frame_equal(computed["atoms"], damaged["atoms"], check_exact=True)
    rows.write_bytes(good)
    write_extxyz(accepted, frames[:-1])  # another accepted file: its md5 differs
    s3, _ = build_and_read("other_file", saved=saved)
    assert s3["n_atoms_descriptors_from_validate"] == 0 and "another version" in s3["descriptors_from_validate_note"]
    write_no_saved_descriptors(saved, "outlier detection disabled")
    s4, _ = build_and_read("none", saved=saved)
    assert s4["n_atoms_descriptors_from_validate"] == 0
    assert s4["descriptors_from_validate_note"] == "outlier detection disabled"
