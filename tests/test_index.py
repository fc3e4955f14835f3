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
from mlipops.ingest import rejected_frame
from mlipops.oracles import get_oracle
from mlipops.params import IndexParams

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
    stats = build_index(IndexParams(coordination_cutoff=3.0), d / "accepted.extxyz",
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
                      "coverage": "VIEW"}
    assert cols["atoms"] == ["frame_id", "atom_index", "species", "coordination", "nn_distance"]
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
    cov = query("SELECT * FROM coverage", u_index["db"])
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
    total = query("SELECT sum(n_frames) AS n FROM coverage WHERE status = 'accepted'", u_index["db"])
    assert int(total.loc[0, "n"]) == 4


@pytest.mark.parametrize("sql", [
    "CREATE TABLE evil (a INTEGER)",
    "INSERT INTO atoms VALUES ('x', 0, 'Cu', 12, 2.5)",
    "DELETE FROM frames",
    "DROP VIEW coverage",
])
def test_query_refuses_writes(u_index, sql):
    with pytest.raises(MlipopsError, match="query failed"):
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
        build_index(IndexParams(), tmp_path / "accepted.extxyz", tmp_path / "quarantine.parquet",
                    tmp_path / "index.duckdb")
    assert not (tmp_path / "index.duckdb").exists()
