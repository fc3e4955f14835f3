"""Build ``data/index.duckdb`` (schema in ``schema.sql``) and run read-only queries on it."""

from __future__ import annotations

import io
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from ase import Atoms

from mlipops import __version__
from mlipops.descriptors import neighbor_list
from mlipops.errors import MlipopsError, StageInputError
from mlipops.frames import file_md5, formula, labels, read_extxyz
from mlipops.params import IndexParams
from mlipops.quality.validate import ACCEPTED, QUARANTINE
from mlipops.report import write_markdown, write_metrics

SCHEMA = Path(__file__).with_name("schema.sql")
INDEX = Path("data/index.duckdb")
REPORT_DIR = Path("reports/index")
NN_PROBE = 6.0  # Å, radius searched for the nearest neighbour


def _frame_row(a: Atoms, dataset_id: str, status: str) -> dict:
    e, f, _ = labels(a)
    periodic = bool(a.pbc.all() and a.cell.rank == 3)
    t = a.info.get("temperature_K")
    return {
        "frame_id": a.info["frame_id"], "dataset_id": dataset_id, "status": status,
        "split": a.info.get("split"), "config_type": a.info.get("config_type"),
        "source": a.info.get("source"), "source_index": a.info.get("source_index"),
        "n_atoms": len(a), "formula": formula(a), "energy": e,
        "energy_per_atom": None if e is None else e / len(a),
        "max_force": None if f is None or not len(f) else float(np.linalg.norm(f, axis=1).max()),
        "volume_per_atom": a.get_volume() / len(a) if periodic else None,
        "temperature_K": None if t is None else float(t), "periodic": periodic,
        "quarantine_check": None, "quarantine_reason": None,
    }


def atom_rows(a: Atoms, coordination_cutoff: float) -> pd.DataFrame:
    probe = max(coordination_cutoff, NN_PROBE)
    i, _, _, d = neighbor_list(a.positions, a.cell.array, a.pbc, probe)
    n = len(a)
    coordination = np.bincount(i[d < coordination_cutoff], minlength=n)
    nn = np.full(n, np.inf)
    np.minimum.at(nn, i, d)
    return pd.DataFrame({"frame_id": a.info["frame_id"], "atom_index": np.arange(n, dtype=np.int32),
                         "species": a.get_chemical_symbols(), "coordination": coordination.astype(np.int32),
                         "nn_distance": np.where(np.isfinite(nn), nn, np.nan)})


def _quarantined_rows(q: pd.DataFrame, dataset_id: str) -> list[dict]:
    import ase.io

    rows = []
    for r in q.itertuples(index=False):
        try:
            a = ase.io.read(io.StringIO(r.extxyz), format="extxyz")
            a.info.update({"frame_id": r.frame_id, "split": r.split, "config_type": r.config_type,
                           "source": r.source, "source_index": r.source_index})
            row = _frame_row(a, dataset_id, "quarantined")
        except Exception:  # unparseable frame: its identity and reason are still indexed
            row = {"frame_id": r.frame_id if isinstance(r.frame_id, str) else f"unparsed:{r.source}#{r.source_index}",
                   "dataset_id": dataset_id, "status": "quarantined", "split": r.split,
                   "config_type": r.config_type, "source": r.source, "source_index": r.source_index}
        row.update({"quarantine_check": r.check, "quarantine_reason": r.reason})
        rows.append(row)
    return rows


def build_index(p: IndexParams, accepted: Path = ACCEPTED, quarantine: Path = QUARANTINE,
                out: Path = INDEX) -> dict:
    import duckdb

    for path in (accepted, quarantine):
        if not path.is_file():
            raise StageInputError("curated data missing: run `dvc repro validate` first", file=str(path))
    frames, bad = read_extxyz(accepted)
    if bad:
        raise StageInputError(f"curated data is corrupt: {bad[0].reason}", file=str(accepted))
    q = pd.read_parquet(quarantine)
    dataset_id = file_md5(accepted)
    frame_df = pd.DataFrame([_frame_row(a, dataset_id, "accepted") for a in frames]
                            + _quarantined_rows(q, dataset_id))
    atom_df = pd.concat([atom_rows(a, p.coordination_cutoff) for a in frames], ignore_index=True) \
        if frames else pd.DataFrame(columns=["frame_id", "atom_index", "species", "coordination", "nn_distance"])
    datasets = pd.DataFrame([{"dataset_id": dataset_id, "accepted_path": str(accepted),
                              "n_accepted": len(frames), "n_quarantined": len(q),
                              "created_at": datetime.now(timezone.utc).replace(tzinfo=None),
                              "mlipops_version": __version__}])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.duckdb")
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
    try:
        con.execute(SCHEMA.read_text())
        for name, df in (("datasets", datasets), ("frames", frame_df), ("atoms", atom_df)):
            con.register("df_in", df)
            con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM df_in")
            con.unregister("df_in")
        con.execute("CHECKPOINT")
    finally:
        con.close()
    tmp.replace(out)
    return {"n_frames": len(frame_df), "n_accepted": len(frames), "n_quarantined": len(q),
            "n_atoms": len(atom_df), "dataset_id": dataset_id}


def connect_read_only(path: Path = INDEX):
    import duckdb

    if not Path(path).is_file():
        raise MlipopsError("index not found: run `dvc repro index` first", file=str(path))
    return duckdb.connect(str(path), read_only=True, config={"enable_external_access": False})


def query(sql: str, path: Path = INDEX) -> pd.DataFrame:
    """Run one read-only SQL statement on the index; writes and file access are refused."""
    import duckdb

    con = connect_read_only(path)
    try:
        return con.execute(sql).df()
    except duckdb.Error as exc:
        msg = str(exc).splitlines()[0]
        raise MlipopsError(f"query failed: {msg}", file=str(path), field="sql") from None
    finally:
        con.close()


def run(p: IndexParams) -> dict:
    t0 = time.perf_counter()
    stats = build_index(p)
    cov = query("SELECT * FROM coverage")
    metrics = {k: v for k, v in stats.items() if k != "dataset_id"} | {
        "wall_time_s": round(time.perf_counter() - t0, 2)}
    write_metrics(REPORT_DIR, metrics)
    write_markdown(REPORT_DIR / "coverage.md", "Coverage index", [
        f"`{INDEX}` for dataset `{stats['dataset_id']}`: {stats['n_frames']} frames "
        f"({stats['n_accepted']} accepted, {stats['n_quarantined']} quarantined), {stats['n_atoms']} atoms.",
        "Query it with `mlipops query \"SELECT * FROM coverage\"`.",
    ], table=(tuple(cov.columns), cov.itertuples(index=False)))
    return metrics
