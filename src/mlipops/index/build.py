"""Build ``data/index.duckdb`` (schema in ``schema.sql``) and run read-only queries on it."""

from __future__ import annotations

import functools
import io
import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from ase import Atoms

from mlipops import __version__
from mlipops.descriptors import DescriptorBatcher, compute_descriptors, neighbor_list
from mlipops.errors import MlipopsError, StageInputError
from mlipops.frames import file_md5, formula, frame_id, labels
from mlipops.index.hull import HullIndex, SpeciesHull, fit_hull_index
from mlipops.params import DescriptorParams, IndexParams
from mlipops.report import md_table, progress, trim_memory, write_markdown, write_metrics
from mlipops.pipeline import ACCEPTED, INDEX, INDEX_REPORTS as REPORT_DIR, QUARANTINE, TRAINING_DESCRIPTORS

SCHEMA = Path(__file__).with_name("schema.sql")
NN_PROBE = 6.0  # Å, radius searched for the nearest neighbour
_INSERT_ROWS = 1 << 18  # atoms rows converted to Arrow and inserted at a time
_BUILD_MEMORY = "256MB"  # DuckDB's buffer pool while the index is written
ATOM_GEOMETRY_COLUMNS = ["frame_id", "atom_index", "split", "config_type", "species", "coordination", "nn_distance",
                         "bond_angle_deviation", "nearest_crystal"]


def _bo_gap(a: Atoms) -> float | None:
    """ΔE₀₁ (eV) of a frame labelled with excited states, else None."""
    try:
        g = float(a.info["bo_gap"])
    except (KeyError, TypeError, ValueError):
        return None
    return g if np.isfinite(g) else None


def _finite(v) -> float | None:
    """A number as a float; None for a missing, non-numeric or non-finite one (NULL in the index, never NaN)."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


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
        "temperature_K": _finite(t), "periodic": periodic, "bo_gap": _bo_gap(a),
        "quarantine_check": None, "quarantine_reason": None,
    }


def _geometry(items: list[tuple[Atoms, tuple]], coordination_cutoff: float) -> dict[str, np.ndarray]:
    """Per-atom geometry of several frames at once, from their neighbour lists (i, j, S, d):
    coordination number, nearest-neighbour distance (NaN if none in the list), first-shell
    bond-angle deviation. Batched over frames: the per-frame numpy overhead dominates otherwise."""
    from mlipops.index.angles import deviation_from_bonds

    offset, all_i, all_d, first_i, first_vec = 0, [], [], [], []
    for a, (i, j, S, d) in items:
        all_i.append(i + offset)
        all_d.append(d)
        f = (d < coordination_cutoff) & (d > 0.0)
        first_i.append(i[f] + offset)
        first_vec.append(a.positions[j[f]] - a.positions[i[f]] + S[f] @ a.cell.array)
        offset += len(a)
    n = offset
    i, d = np.concatenate(all_i), np.concatenate(all_d)
    fi, fvec = np.concatenate(first_i), np.concatenate(first_vec)
    coordination = np.bincount(fi, minlength=n).astype(np.int32)
    nn = np.full(n, np.inf)
    np.minimum.at(nn, i, d)  # the nearest neighbour's distance (no sort: one pass over the edges)
    nn[np.isinf(nn)] = np.nan
    order = np.argsort(fi, kind="stable")
    dev, crystal = deviation_from_bonds(n, fi[order], fvec[order])
    return {"coordination": coordination, "nn_distance": nn, "bond_angle_deviation": dev,
            "nearest_crystal": crystal}


def _atom_columns(items: list[tuple[Atoms, tuple]], coordination_cutoff: float) -> dict[str, np.ndarray]:
    """All ``atoms`` table columns but the hull's, for a batch of (frame, neighbour list)."""
    frames = [a for a, _ in items]
    counts = [len(a) for a in frames]
    rep = lambda key: np.repeat(np.array([a.info.get(key) for a in frames], dtype=object), counts)  # noqa: E731
    return {"frame_id": rep("frame_id"), "atom_index": np.concatenate([np.arange(c, dtype=np.int32) for c in counts]),
            "split": rep("split"), "config_type": rep("config_type"),
            "species": np.array([s for a in frames for s in a.get_chemical_symbols()], dtype=object),
            **_geometry(items, coordination_cutoff)}


def atom_rows(a: Atoms, coordination_cutoff: float, probe: float = NN_PROBE) -> pd.DataFrame:
    """Geometry columns of one frame's atoms (neighbours searched within ``probe``)."""
    nl = neighbor_list(a.positions, a.cell.array, a.pbc, max(coordination_cutoff, probe))
    return pd.DataFrame(_atom_columns([(a, nl)], coordination_cutoff))


def _quarantined_rows(q: pd.DataFrame, dataset_id: str) -> list[dict]:
    import ase.io

    rows = []
    for r in q.itertuples(index=False):
        try:
            a = ase.io.read(io.StringIO(r.extxyz), format="extxyz")
            fid = r.frame_id if isinstance(r.frame_id, str) and r.frame_id else frame_id(a)
            a.info.update({"frame_id": fid, "split": r.split, "config_type": r.config_type,
                           "source": r.source, "source_index": r.source_index})
            row = _frame_row(a, dataset_id, "quarantined")
        except Exception:  # unparseable frame: its identity and reason are still indexed
            row = {"frame_id": r.frame_id if isinstance(r.frame_id, str) else f"unparsed:{r.source}#{r.source_index}",
                   "dataset_id": dataset_id, "status": "quarantined", "split": r.split,
                   "config_type": r.config_type, "source": r.source, "source_index": r.source_index}
        row.update({"quarantine_check": r.check, "quarantine_reason": r.reason})
        rows.append(row)
    return rows


def _list_array(values: np.ndarray, null_rows: np.ndarray | None = None):
    """[n, m] float array -> an Arrow list<float32> column (NULL where ``null_rows``)."""
    import pyarrow as pa

    values = np.ascontiguousarray(values, dtype=np.float32)
    n, m = values.shape
    offsets = np.arange(0, (n + 1) * m, m, dtype=np.int32)
    mask = None if null_rows is None or not null_rows.any() else pa.array(null_rows)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1)), mask=mask)


def _hull_tables(h: HullIndex, training_split: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, points = [], []
    for s, sh in h.hulls.items():
        rows.append({"species": s, "method": sh.method, "k": sh.k, "rank": sh.rank,
                     "n_train_atoms": sh.n_train_atoms, "n_extreme_points": len(sh.points),
                     "explained_variance": float(sh.explained_variance_ratio.sum()),
                     "explained_variance_ratio": sh.explained_variance_ratio.tolist(),
                     "training_split": training_split, "species_channels": list(h.species),
                     "descriptor_settings": json.dumps(h.descriptor, sort_keys=True),
                     "feature_mean": sh.feature_mean.tolist(), "feature_std": sh.feature_std.tolist(),
                     "components": sh.components.tolist(), "centroid": sh.centroid.tolist()})
        points += [{"species": s, "point_index": q, "coords": row.tolist()} for q, row in enumerate(sh.points)]
    return pd.DataFrame(rows), pd.DataFrame(points, columns=["species", "point_index", "coords"])


def extrapolation_reason(inside: np.ndarray, gamma: np.ndarray, unseen: np.ndarray) -> np.ndarray:
    reason = np.where(inside, None, np.where(np.isinf(gamma), "off_training_subspace", "outside_hull"))
    reason[unseen] = "unseen_species"
    return reason.astype(object)


class _RowSpool:
    """Rows of descriptors, kept as float32 in an anonymous temporary file in ``directory`` as they come and
    read back into one array at the end (no list of chunks and concatenated copy). Float32 is what the index
    stores: the hull is fitted on, and judges, exactly the descriptors a query reads back (3M atoms x 24
    features: 0.3 GB, not 0.6)."""

    def __init__(self, directory: Path):
        import tempfile

        directory.mkdir(parents=True, exist_ok=True)
        self._fh = tempfile.TemporaryFile(dir=directory)  # no name: nothing left behind, even after kill -9
        self._rows, self._width = 0, None

    def add(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        self._width = rows.shape[1] if self._width is None else self._width
        self._fh.write(rows.tobytes())
        self._rows += len(rows)

    def result(self) -> np.ndarray:
        out = np.empty((self._rows, self._width or 0), dtype=np.float32)
        self._fh.seek(0)
        self._fh.readinto(memoryview(out).cast("B"))
        return out

    def close(self) -> None:
        self._fh.close()


_CHUNK_FRAMES = 1000  # frames a worker reads and indexes at a time


def _index_chunk(items: list, ctx: dict) -> dict:
    """One chunk of accepted frames (``map_extxyz`` items): their frame rows, atom geometry columns (with
    ``ctx['geometry']``) and descriptors with ``ctx['species']`` as channels (None, the first chunk: its
    training species, else every species it holds; returned as ``species``)."""
    from mlipops.frames import Rejected

    clock = {"nl": 0.0, "geometry": 0.0, "descriptors": 0.0, "saved_atoms": 0}
    rows, pending, train, seen, keys = [], [], set(), set(), None
    for a, _ in items:
        if isinstance(a, Rejected):
            return {"error": a.reason}
        t = time.perf_counter()
        nl = neighbor_list(a.positions, a.cell.array, a.pbc, ctx["radius"])
        clock["nl"] += time.perf_counter() - t
        symbols = a.get_chemical_symbols()
        seen.update(symbols)
        if a.info.get("split") == ctx["training_split"]:
            train.update(symbols)
        if ctx["geometry"]:
            row = _frame_row(a, ctx["dataset_id"], "accepted")
            keys = keys or list(row)
            rows.append(tuple(row.values()))  # a tuple: a third of a dict's memory
        pending.append((a, nl))
    species = ctx["species"] or sorted(train or seen)
    t = time.perf_counter()
    columns = _atom_columns(pending, ctx["coordination_cutoff"]) if ctx["geometry"] else None
    clock["geometry"] += time.perf_counter() - t
    t = time.perf_counter()
    # the frames validate saved the descriptors of (the training frames, for this file, species and settings)
    # are read, the others computed; float32, as the index stores them
    saved = _saved_descriptors(ctx.get("saved")) if species == ctx.get("saved_species") else None
    where = [saved.where.get(a.info["frame_id"]) if saved is not None else None for a, _ in pending]
    where = [w if w is not None and w[1] == len(a) else None for w, (a, _) in zip(where, pending)]
    counts = np.array([len(a) for a, _ in pending], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    g = np.empty((int(starts[-1]), _n_features(len(species), ctx["settings"])), dtype=np.float32)
    unseen = np.zeros(len(g), dtype=bool)
    hits = [q for q, w in enumerate(where) if w is not None]
    if hits:
        lo = min(where[q][0] for q in hits)
        try:  # one read: the chunk's training frames are one span of the saved rows
            block = saved.read(lo, max(where[q][0] + where[q][1] for q in hits))
        except (OSError, ValueError):  # a damaged folder: these frames are computed like the others
            block, where, hits = None, [None] * len(pending), []
        for q in hits:
            s0, n = where[q]
            g[starts[q]:starts[q] + n] = block[s0 - lo:s0 - lo + n]
        clock["saved_atoms"] += int(counts[hits].sum())
    todo = [q for q, w in enumerate(where) if w is None]
    if todo:
        batcher = DescriptorBatcher(species, ctx["settings"], n_atoms=int(counts[todo].sum()))
        for q in todo:
            batcher.add(*pending[q])
        g_new, u_new = batcher.result()
        at = 0
        for q in todo:
            n = int(counts[q])
            g[starts[q]:starts[q] + n] = g_new[at:at + n]
            unseen[starts[q]:starts[q] + n] = u_new[at:at + n]
            at += n
    clock["descriptors"] += time.perf_counter() - t
    return {"rows": rows, "keys": keys, "columns": columns, "g": g, "unseen": unseen, "train_species": train,
            "species": species, "clock": clock}


def _n_features(n_species: int, settings: dict) -> int:
    return _n_features_of(n_species, json.dumps(settings, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _n_features_of(n_species: int, settings_json: str) -> int:
    """Built once per process and species count: the descriptor module is a torch module."""
    from mlipops.descriptors import AtomCentredDescriptor

    return AtomCentredDescriptor(n_species, **json.loads(settings_json)).n_features


_SAVED_OPEN: dict = {}  # a worker's SavedDescriptors, opened once per folder


def _saved_descriptors(directory: str | None):
    """The SavedDescriptors of ``directory`` (checked by the parent), opened once per process."""
    from mlipops.descriptor_store import SavedDescriptors

    if directory is None:
        return None
    if directory not in _SAVED_OPEN:
        _SAVED_OPEN.clear()
        try:  # the parent opened it (build_index): a folder changed since is computed, not an error
            _SAVED_OPEN[directory] = SavedDescriptors(directory,
                                                      json.loads((Path(directory) / "meta.json").read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            _SAVED_OPEN[directory] = None
    return _SAVED_OPEN[directory]


def build_path(out: Path = INDEX) -> Path:
    """The file the index is built into before it is renamed over ``out``."""
    return out.with_suffix(".tmp.duckdb")


def _wal(db: Path) -> Path:
    return db.with_name(db.name + ".wal")


def _spill_dir(db: Path) -> Path:
    """DuckDB's default directory for data spilled to disk: ``<database>.tmp/``."""
    return db.with_name(db.name + ".tmp")


def clear_build_leftovers(out: Path = INDEX) -> None:
    """Remove what a failed or killed (kill -9) build leaves beside ``out``: the half-built file, its WAL and
    its spill directory; and ``<out>.tmp/``, where queries of earlier mlipops versions spilled."""
    import shutil

    tmp = build_path(out)
    for f in (tmp, _wal(tmp)):
        f.unlink(missing_ok=True)
    for d in (_spill_dir(tmp), _spill_dir(out)):
        if d.is_symlink():
            d.unlink()
        elif d.is_dir():
            shutil.rmtree(d)


def _check_inputs(accepted: Path, quarantine: Path, training_split: str) -> None:
    """The curated files exist, and some frame was accepted (else the hull would have no training atoms)."""
    for path in (accepted, quarantine):
        if not path.is_file():
            raise StageInputError("curated data missing: run `dvc repro validate` first", file=str(path))
    if accepted.stat().st_size == 0:
        raise StageInputError(f"no accepted frames, so the {training_split!r} split is empty and the hull has "
                              f"no training atoms (every frame is quarantined: see {quarantine})",
                              file=str(accepted))


def _usable_saved_descriptors(saved: Path | None, dataset_id: str, settings: dict) -> tuple[dict | None, str | None]:
    """The saved descriptors' meta where they can be taken for ``dataset_id`` and ``settings`` (the rows file's
    header checked against it, once, here), else None; and the note saying why not."""
    from mlipops.descriptor_store import SavedDescriptors

    meta, note = SavedDescriptors.check(saved, dataset_id, None, settings)
    if meta is not None:
        try:  # the rows file's header against its meta: a damaged folder is computed, with the note
            SavedDescriptors(saved, meta)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            meta, note = None, f"{Path(saved) / 'rows.npy'} unreadable ({exc})"
    return meta, note


def _write_index(out: Path, tables: dict) -> None:
    """The tables (name -> DataFrames or Arrow tables, inserted in turn) into a new DuckDB file beside ``out``,
    renamed over it when complete: readers (and a failed or killed build) see the old index or the new, never
    half."""
    import duckdb

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = build_path(out)
    clear_build_leftovers(out)
    # a bounded buffer pool: the inserted atoms rows (3M rows: ~1 GB in DuckDB's blocks) are written out to the
    # database file as the pool fills, instead of being held until the checkpoint
    con = duckdb.connect(str(tmp), config={"temp_directory": str(_spill_dir(tmp)), "memory_limit": _BUILD_MEMORY})
    try:
        con.execute(SCHEMA.read_text())
        for name, dfs in tables.items():
            for df in dfs:
                con.register("df_in", df)
                con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM df_in")
                con.unregister("df_in")
                del df
        con.execute("CHECKPOINT")
        con.close()
        _wal(out).unlink(missing_ok=True)  # a WAL beside the old index would be replayed into the new one
        tmp.replace(out)  # atomic: readers (and a failed or killed build) see the old index or the new, never half
    finally:
        con.close()
        clear_build_leftovers(out)


def _split_shares(split: np.ndarray, inside: np.ndarray) -> dict:
    """Atoms per split and the share of each split's atoms outside the hull."""
    by_split = {}
    for sname in sorted(set(split.tolist())):
        m = split == sname
        by_split[f"n_{sname}_atoms"] = int(m.sum())
        by_split[f"fraction_{sname}_atoms_outside_hull"] = round(float((~inside[m]).mean()), 4)
    return by_split


def _hull_stats(hidx: HullIndex) -> dict:
    """Per species: the hull's extreme points, the variance its projection explains, the LPs solved."""
    hull_stats = {}
    for s, sh in hidx.hulls.items():
        hull_stats[f"hull.{s}.n_extreme_points"] = len(sh.points)
        hull_stats[f"hull.{s}.explained_variance"] = round(float(sh.explained_variance_ratio.sum()), 4)
        hull_stats[f"hull.{s}.n_lp_solves"] = sh.solver().n_lp
    return hull_stats


def _read_accepted(accepted: Path, ctx: dict, training_split: str, spill_dir: Path) -> tuple:
    """One streaming pass over the accepted frames (a chunk of Atoms in memory at a time, in worker processes):
    frame rows, the atoms' geometry columns, descriptors and unseen-species flags, from one neighbour list per
    frame. The descriptors' species channels are the training split's species, known only at the end: taken
    from ``ctx["species"]`` (the saved descriptors' species) or the first chunk's training frames, and confirmed
    at the end; should a later training frame bring another species, a second pass recomputes the descriptors.

    Returns (frame_rows, row_keys, atom_df, g, unseen, species, clock, t_read, t1): t1, when the columns
    started to be joined (its time counts as geometry)."""
    from mlipops.frames import map_extxyz

    clock = {"nl": 0.0, "geometry": 0.0, "descriptors": 0.0, "saved_atoms": 0}
    parts, frame_rows, unseen_parts = [], [], []
    train_species: set[str] = set()
    row_keys = None
    spool = _RowSpool(spill_dir)
    guess: list[str] | None = None

    def chunk_results(context, label, progress_note):
        size = accepted.stat().st_size
        first = None if context["species"] else (lambda res: context | {"species": res["species"]})
        with progress(label, max(1, round(size / 2**20)), quiet_start=True) as adv:
            for res in map_extxyz(accepted, _index_chunk, context, chunk_frames=_CHUNK_FRAMES,
                                  progress=lambda pos: adv(completed=round(pos / 2**20), note=progress_note()),
                                  first_context=first):
                if "error" in res:
                    raise StageInputError(f"curated data is corrupt: {res['error']}", file=str(accepted))
                for key in clock:
                    clock[key] += res["clock"][key]
                yield res

    try:
        # the progress note: the number of frames read so far (the list, bound as a default argument)
        for res in chunk_results(ctx, "index: reading the accepted frames (MiB)",
                                 lambda rows=frame_rows: f"{len(rows)} frames"):
            guess = guess or res["species"]
            row_keys = row_keys or res["keys"]
            frame_rows.extend(res["rows"])
            parts.append(res["columns"])
            train_species |= res["train_species"]
            spool.add(res["g"])
            unseen_parts.append(res["unseen"])
        t_read = time.perf_counter()
        if not train_species:
            raise StageInputError(f"the {training_split!r} split is empty: the hull needs training atoms "
                                  "(check ingest.split and the quarantine)", file=str(accepted), field="split")
        species = sorted(train_species)
        if species != guess:  # a training species appeared after the first chunk: descriptors again, every channel
            spool.close()
            spool, unseen_parts = _RowSpool(spill_dir), []
            for res in chunk_results(ctx | {"species": species, "geometry": False},
                                     "index: descriptors again, with every training species (MiB)", lambda: ""):
                spool.add(res["g"])
                unseen_parts.append(res["unseen"])
        g = spool.result()
    finally:
        spool.close()
    unseen = np.concatenate(unseen_parts) if unseen_parts else np.zeros(0, dtype=bool)
    del unseen_parts
    trim_memory()
    t1 = time.perf_counter()
    columns = {}
    for c in ATOM_GEOMETRY_COLUMNS:  # a column at a time, each chunk's part freed once copied
        columns[c] = np.concatenate([pt.pop(c) for pt in parts])
    del parts
    atom_df = pd.DataFrame(columns, copy=False)
    del columns
    trim_memory()
    return frame_rows, row_keys, atom_df, g, unseen, species, clock, t_read, t1


def build_index(p: IndexParams, descriptors: DescriptorParams, accepted: Path = ACCEPTED,
                quarantine: Path = QUARANTINE, out: Path = INDEX, saved: Path | None = None) -> dict:
    """Build the whole index into a new file, then rename it over ``out`` (readers never see half). ``saved``:
    the training frames' descriptors validate saved (:mod:`mlipops.descriptor_store`), taken where they belong to
    ``accepted`` as it is now, with this descriptor's settings and species; None: compute every frame."""
    t0 = time.perf_counter()
    _check_inputs(accepted, quarantine, p.training_split)
    q = pd.read_parquet(quarantine)
    dataset_id = file_md5(accepted)
    # one pass, streaming the accepted frames (_read_accepted), to max(cutoff, coordination_cutoff)
    settings = descriptors.model_dump()
    meta, saved_note = _usable_saved_descriptors(saved, dataset_id, settings)
    ctx = {"radius": max(descriptors.cutoff, p.coordination_cutoff), "coordination_cutoff": p.coordination_cutoff,
           "training_split": p.training_split, "dataset_id": dataset_id, "settings": settings, "species": None,
           "geometry": True, "saved": None if meta is None else str(saved),
           "saved_species": None if meta is None else meta["species"]}
    if meta is not None:  # the training species as validate saw them: the likely channels, no first chunk alone
        ctx["species"] = meta["species"]
    frame_rows, row_keys, atom_df, g, unseen, species, clock, t_read, t1 = _read_accepted(
        accepted, ctx, p.training_split, out.parent)
    t_desc = time.perf_counter()
    clock["geometry"] += t_desc - t1
    split = atom_df["split"].to_numpy().astype(str)
    is_train = split == p.training_split
    symbols = atom_df["species"].to_numpy().astype(str)
    hidx = fit_hull_index(symbols, g, is_train, species, settings, p.pca_components)
    ev = hidx.evaluate(symbols, g, unseen)
    t_hull = time.perf_counter()

    inside, gamma = ev["inside_hull"], ev["extrapolation_grade"]
    atom_df["inside_hull"] = inside
    atom_df["extrapolation_grade"] = gamma
    atom_df["hull_distance"] = ev["hull_distance"]
    atom_df["extrapolation_reason"] = extrapolation_reason(inside, gamma, unseen)
    per_frame = pd.DataFrame({"frame_id": atom_df["frame_id"], "outside": ~inside, "grade": gamma}).groupby(
        "frame_id", sort=False).agg(n_atoms_outside_hull=("outside", "sum"), max_extrapolation_grade=("grade", "max"))
    frame_df = pd.DataFrame([dict(zip(row_keys, r)) for r in frame_rows] + _quarantined_rows(q, dataset_id))
    n_accepted = len(frame_rows)
    del frame_rows
    frame_df = frame_df.drop(columns=[c for c in per_frame.columns if c in frame_df]) \
        .merge(per_frame, how="left", left_on="frame_id", right_index=True)
    quarantined = frame_df["status"] != "accepted"  # a quarantined duplicate shares its twin's frame_id
    frame_df.loc[quarantined, ["n_atoms_outside_hull", "max_extrapolation_grade"]] = np.nan
    frame_df["n_atoms_outside_hull"] = frame_df["n_atoms_outside_hull"].astype("Int64")
    datasets = pd.DataFrame([{"dataset_id": dataset_id, "accepted_path": str(accepted),
                              "n_accepted": n_accepted, "n_quarantined": len(q),
                              "created_at": datetime.now(timezone.utc).replace(tzinfo=None),
                              "mlipops_version": __version__}])
    hull_df, points_df = _hull_tables(hidx, p.training_split)

    import pyarrow as pa

    desc32 = np.ascontiguousarray(g, dtype=np.float32)  # as stored (already float32: no copy)
    n_features = int(g.shape[1])
    del g
    proj_null = np.isnan(ev["projection"]).any(axis=1)
    proj32 = np.nan_to_num(ev["projection"]).astype(np.float32)
    k_proj = int(ev["projection"].shape[1])
    n_atoms = len(atom_df)
    del ev

    def atom_slices():  # the atoms table as Arrow a slice of rows at a time, not all 3M rows' strings and lists
        for lo in range(0, max(n_atoms, 1), _INSERT_ROWS):
            hi = min(lo + _INSERT_ROWS, n_atoms)
            yield pa.Table.from_pandas(atom_df.iloc[lo:hi], preserve_index=False) \
                .append_column("descriptor", _list_array(desc32[lo:hi])) \
                .append_column("projection", _list_array(proj32[lo:hi], proj_null[lo:hi]))

    _write_index(out, {"datasets": [datasets], "frames": [frame_df], "hull": [hull_df], "hull_points": [points_df],
                       "atoms": atom_slices()})
    t_end = time.perf_counter()
    by_split, hull_stats = _split_shares(split, inside), _hull_stats(hidx)
    return {"n_frames": len(frame_df), "n_accepted": n_accepted, "n_quarantined": len(q),
            "n_atoms": n_atoms, "n_features": n_features, "k": k_proj,
            "dataset_id": dataset_id, **by_split, **hull_stats,
            "n_atoms_descriptors_from_validate": int(clock["saved_atoms"]),
            "descriptors_from_validate_note": saved_note or "taken where frame, species and settings match",
            "time.read_s": round(t_read - t0, 2), "time.neighbour_lists_s": round(clock["nl"], 2),
            "time.geometry_s": round(clock["geometry"], 2), "time.descriptors_s": round(clock["descriptors"], 2),
            "time.hull_s": round(t_hull - t_desc, 2),
            "time.write_s": round(t_end - t_hull, 2)}


def load_hull_index(path: Path = INDEX) -> HullIndex:
    """The hulls stored in an index file (read-only), ready to evaluate new structures."""
    con = connect_read_only(path)
    try:
        hull_df = con.execute("SELECT * FROM hull ORDER BY species").df()
        pts = con.execute("SELECT species, coords FROM hull_points ORDER BY species, point_index").df()
    finally:
        con.close()
    if hull_df.empty:
        raise MlipopsError("the index holds no hull", file=str(path))
    hulls = {}
    for r in hull_df.itertuples(index=False):
        p_s = np.array(pts.loc[pts.species == r.species, "coords"].tolist(), dtype=np.float64)
        hulls[r.species] = SpeciesHull(
            species=r.species, k=int(r.k), feature_mean=np.asarray(r.feature_mean, np.float64),
            feature_std=np.asarray(r.feature_std, np.float64),
            components=np.array([np.asarray(c, np.float64) for c in r.components]),
            explained_variance_ratio=np.asarray(r.explained_variance_ratio, np.float64),
            centroid=np.asarray(r.centroid, np.float64), points=p_s.reshape(-1, int(r.k)),
            n_train_atoms=int(r.n_train_atoms), rank=int(r.rank), method=r.method)
    first = hull_df.iloc[0]
    return HullIndex(species=list(first.species_channels), descriptor=json.loads(first.descriptor_settings),
                     hulls=hulls)


def check_structures(frames: list[Atoms], path: Path = INDEX) -> pd.DataFrame:
    """γ, membership and distance of every atom of new structures against the index's hulls."""
    hidx = load_hull_index(path)
    if not frames:
        return pd.DataFrame(columns=["frame", "atom_index", "species", "inside_hull", "extrapolation_grade",
                                     "hull_distance", "extrapolation_reason"])
    g, unseen = compute_descriptors(frames, hidx.species, hidx.descriptor)
    symbols = np.concatenate([np.array(a.get_chemical_symbols(), dtype=str) for a in frames])
    ev = hidx.evaluate(symbols, g, unseen)
    return pd.DataFrame({
        "frame": np.concatenate([np.full(len(a), k) for k, a in enumerate(frames)]),
        "atom_index": np.concatenate([np.arange(len(a)) for a in frames]),
        "species": symbols, "inside_hull": ev["inside_hull"],
        "extrapolation_grade": ev["extrapolation_grade"], "hull_distance": ev["hull_distance"],
        "extrapolation_reason": extrapolation_reason(ev["inside_hull"], ev["extrapolation_grade"], unseen)})


QUERY_TIMEOUT_S = 60.0  # s, default time a query may run before it is interrupted
QUERY_MEMORY_LIMIT = "1GB"  # DuckDB's memory limit for reading the index (nothing spills to disk)
QUERY_THREADS = 2
_MEMORY = re.compile(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", re.IGNORECASE)


def connect_read_only(path: Path = INDEX, memory_limit: str = QUERY_MEMORY_LIMIT):
    """A read-only connection whose configuration SQL cannot change: no file, network or extension access,
    memory bounded, no spilling (DuckDB writes ``<db>.tmp/`` otherwise, and a kill -9 leaves it behind),
    at most QUERY_THREADS threads; ``lock_configuration`` then refuses every SET/RESET/PRAGMA of a setting."""
    import duckdb

    if not Path(path).is_file():
        raise MlipopsError("index not found: run `dvc repro index` first", file=str(path))
    if not _MEMORY.fullmatch(str(memory_limit).strip()):
        raise MlipopsError(f"memory limit {memory_limit!r} is not a size such as 500MB or 2GB", field="memory_limit")
    config = {"enable_external_access": False, "autoinstall_known_extensions": False,
              "autoload_known_extensions": False, "memory_limit": str(memory_limit).strip(),
              "threads": min(QUERY_THREADS, os.cpu_count() or 1), "temp_directory": "",
              "max_temp_directory_size": "0B", "lock_configuration": True}
    try:
        return duckdb.connect(str(path), read_only=True, config=config)
    except duckdb.Error as exc:
        raise MlipopsError(f"cannot open the index: {_first_line(exc)}", file=str(path)) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _one_select(statements: list, path: Path):
    """The one statement of a query, if it is a SELECT (WITH ..., FROM ..., VALUES, DESCRIBE, SHOW, SUMMARIZE
    included): DuckDB's own parser says what each statement is, so no text trick passes a second one."""
    import duckdb

    if not statements:
        raise MlipopsError("query refused: no SQL statement given", file=str(path), field="sql")
    kinds = [s.type.name for s in statements]
    if len(statements) > 1:
        raise MlipopsError(f"query refused: {len(statements)} statements ({', '.join(kinds)}); "
                           "give exactly one SELECT statement", file=str(path), field="sql")
    (stmt,) = statements
    if stmt.type != duckdb.StatementType.SELECT:
        text = " ".join(stmt.query.split()).rstrip(";")
        text = text if len(text) <= 60 else text[:57] + "..."
        raise MlipopsError(f"query refused: {kinds[0]} statement {text!r}; only one read-only SELECT "
                           "(or WITH ... SELECT) statement is run", file=str(path), field="sql")
    return stmt


def query(sql: str, path: Path = INDEX, *, limit: int | None = None, timeout_s: float | None = QUERY_TIMEOUT_S,
          memory_limit: str = QUERY_MEMORY_LIMIT) -> pd.DataFrame:
    """Run one read-only SELECT statement on the index, bounded.

    Refused before it runs: several statements, any statement but a SELECT (CREATE TEMP TABLE/MACRO, SET,
    PRAGMA, ATTACH, COPY, INSTALL/LOAD, ...). While it runs: file and network access are off, the memory
    limit holds (nothing spills to disk), the configuration is locked, and a timer interrupts it after
    ``timeout_s`` seconds (None: no timeout). With ``limit``, at most ``limit`` rows are fetched (the rest
    is never computed into memory) and ``df.attrs["truncated"]`` says whether there were more.
    """
    import threading

    import duckdb

    where = {"file": str(path), "field": "sql"}
    if limit is not None and limit < 1:
        raise MlipopsError(f"row limit must be at least 1, got {limit}", field="limit")
    if timeout_s is not None and not timeout_s > 0:
        raise MlipopsError(f"timeout must be positive, got {timeout_s} s", field="timeout")
    con = connect_read_only(path, memory_limit)
    timer = None
    try:
        try:
            statements = con.extract_statements(sql)
        except duckdb.Error as exc:
            raise MlipopsError(f"query failed: {_first_line(exc)}", **where) from None
        stmt = _one_select(statements, path)
        if timeout_s is not None:
            def interrupt():  # DuckDB has no statement timeout: stop it from another thread
                try:
                    con.interrupt()
                except duckdb.Error:  # finished and closed meanwhile
                    pass

            timer = threading.Timer(timeout_s, interrupt)
            timer.daemon = True
            timer.start()
        cur = con.execute(stmt.query)  # streams: rows are computed as they are fetched
        types = [str(d[1]) for d in (cur.description or [])]
        truncated = False
        if limit is None:
            df = cur.df()
        else:
            parts, n = [], 0
            while n <= limit:  # one more row than shown tells whether there are more
                chunk = cur.fetch_df_chunk(1)  # one vector: 2048 rows
                if not len(chunk):
                    parts = parts or [chunk]  # an empty result keeps its columns
                    break
                parts.append(chunk)
                n += len(chunk)
            truncated = n > limit
            df = pd.concat(parts, ignore_index=True).head(limit).copy()
        if timer is not None:
            timer.cancel()
        for col, t in zip(list(df.columns), types):  # pandas turns HUGEINT (e.g. sum of integers) into
            if t in ("HUGEINT", "UHUGEINT") and df[col].dtype.kind == "f":  # float: keep them integers
                df[col] = df[col].astype("Int64")
        df.attrs["truncated"] = truncated
        return df
    except duckdb.InterruptException:
        raise MlipopsError(f"query interrupted after {timeout_s:g} s (--timeout)", **where) from None
    except duckdb.OutOfMemoryException:
        raise MlipopsError(f"query needs more memory than its limit of {memory_limit} (--memory-limit; nothing "
                           "spills to disk): add a LIMIT, aggregate, or select fewer columns", **where) from None
    except duckdb.Error as exc:
        raise MlipopsError(f"query failed: {_first_line(exc)}", **where) from None
    finally:
        if timer is not None:
            timer.cancel()
        con.close()


def _plots(db: Path, report_dir: Path) -> list[str]:
    """PC1-PC2 projection (training vs the other splits, by inside_hull) and γ histograms per split."""
    from mlipops.report import pyplot, save_figure

    plt = pyplot()

    con = connect_read_only(db)
    try:
        df = con.execute("""SELECT species, split, inside_hull, extrapolation_grade,
                                   projection[1] AS pc1, projection[2] AS pc2 FROM atoms""").df()
        hull = con.execute("SELECT species, explained_variance_ratio FROM hull ORDER BY species").df()
    finally:
        con.close()
    made = []
    rng = np.random.default_rng(0)
    species = hull.species.tolist()
    fig, axes = plt.subplots(1, len(species), figsize=(5.5 * len(species), 5), squeeze=False)
    for ax, (s, evr) in zip(axes[0], zip(species, hull.explained_variance_ratio)):
        d = df[(df.species == s) & df.pc1.notna()]
        if len(d) > 30000:
            d = d.iloc[rng.choice(len(d), 30000, replace=False)]
        tr = d[d.split == "train"]
        ax.scatter(tr.pc1, tr.pc2, s=3, c="0.7", label=f"train (n={len(tr)})")
        other = d[d.split != "train"]
        for inside, colour in ((True, "tab:blue"), (False, "tab:red")):
            o = other[other.inside_hull == inside]
            ax.scatter(o.pc1, o.pc2, s=5, c=colour, alpha=0.6,
                       label=f"val/test {'inside' if inside else 'outside'} hull (n={len(o)})")
        evr = list(evr) + [0.0, 0.0]
        ax.set_xlabel(f"PC1 ({100 * evr[0]:.1f} % of variance)")
        ax.set_ylabel(f"PC2 ({100 * evr[1]:.1f} % of variance)")
        ax.set_title(f"{s}: descriptor space (first 2 of k PCs)")
        ax.legend(fontsize=7, markerscale=2)
    save_figure(fig, report_dir / "projection.png", dpi=110)
    made.append("projection.png")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    fin = df[np.isfinite(df.extrapolation_grade)]
    lo = max(float(fin.extrapolation_grade.min()) if len(fin) else 1e-3, 1e-3)
    hi = max(float(fin.extrapolation_grade.max()) if len(fin) else 10.0, 2.0)
    bins = np.logspace(np.log10(lo), np.log10(hi), 50)
    for split in sorted(df.split.dropna().unique()):
        v = fin[fin.split == split].extrapolation_grade
        ax.hist(v, bins=bins, histtype="step", density=True, label=f"{split} (n={len(v)})")
    ax.axvline(1.0, color="k", ls="--", lw=0.8, label="hull boundary γ = 1")
    ax.set_xscale("log")
    ax.set_xlabel("extrapolation grade γ")
    ax.set_ylabel("density of atoms")
    ax.set_title("extrapolation grade per split")
    ax.legend(fontsize=7)
    save_figure(fig, report_dir / "gamma_histogram.png", dpi=110)
    made.append("gamma_histogram.png")
    return made


def run(p: IndexParams, descriptors: DescriptorParams) -> dict:
    t0 = time.perf_counter()
    stats = build_index(p, descriptors, saved=TRAINING_DESCRIPTORS)
    by_config = query("SELECT * FROM coverage_by_config")
    hull = query("""SELECT species, k, rank, n_train_atoms, n_extreme_points, round(explained_variance, 4)
                    AS explained_variance FROM hull ORDER BY species""")
    by_z = query("""SELECT species, coordination, split, n_atoms, n_outside_hull, mean_nn_distance,
                           mean_bond_angle_deviation, median_extrapolation_grade
                    FROM coverage_by_species_coordination""")
    by_t = query("SELECT * FROM coverage_by_temperature")
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    plots = _plots(INDEX, REPORT_DIR)
    metrics = {k: v for k, v in stats.items() if k not in ("dataset_id", "descriptors_from_validate_note")} | {
        "wall_time_s": round(time.perf_counter() - t0, 2)}
    write_metrics(REPORT_DIR, metrics)

    def table(df):
        return md_table(tuple(df.columns), df.itertuples(index=False))

    fractions = ", ".join(f"{k.split('_')[1]} {100 * v:.1f} %" for k, v in stats.items()
                          if k.startswith("fraction_") and k.endswith("_outside_hull"))
    write_markdown(REPORT_DIR / "coverage.md", "Coverage index", [
        f"`{INDEX}` for dataset `{stats['dataset_id']}`: {stats['n_frames']} frames "
        f"({stats['n_accepted']} accepted, {stats['n_quarantined']} quarantined), {stats['n_atoms']} atoms, "
        f"{stats['n_features']} descriptor features projected on k = {stats['k']} principal components.",
        f"Atoms outside the convex hull of the training atoms: {fractions}.",
        f"Descriptors of {stats['n_atoms_descriptors_from_validate']} training atoms were taken from validate's "
        f"outlier surrogate (`{TRAINING_DESCRIPTORS}`: {stats['descriptors_from_validate_note']}); the others "
        "were computed here.",
        "Query it with `mlipops query \"SELECT * FROM coverage_by_config\"`; "
        "the method and its limits are in docs/coverage-index.md.",
    ], extra=["## Hull", table(hull), "## By split and config_type", table(by_config),
              "## By species and coordination number", table(by_z),
              "## By temperature (250 K bins)", table(by_t) if len(by_t) else "_no frame has a temperature_",
              "## Plots", *[f"![{name}]({name})" for name in plots]])
    return metrics
