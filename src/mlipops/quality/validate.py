"""Run the great-expectations suites (``suite.json``) on the ingested data.

Three tables, one GX batch each, in one ephemeral Data Context: the frame table (one row per
frame: labels, shapes, energy window, net force, cell, box, closest approach), the atom table (one
row per atom: species, force norm, finite force, nearest-neighbour distance) and, after those, the
frames that passed (dataset-level checks such as the test split's config_types).

Every frame that fails a frame-level expectation, or has an atom failing an atom-level one, goes to
``data/curated/quarantine.parquet`` with the failing ``check`` and a ``reason`` naming the values
(and the atom); the rest go to ``accepted.extxyz``. Frames rejected earlier by ingest (unparseable,
duplicates) join the quarantine too, so accepted + quarantined = every frame read from the sources.
Nothing is deleted. A failing schema (table-level) expectation is a bug upstream and stops the
stage; a failing dataset-level expectation is a warning and a metric (``dataset_checks_failed``).

Physics conventions of the checks:

- net force: translation invariance makes the forces of any isolated system sum to zero, periodic
  or not (bulk, slab, molecule), so ``|sum_i F_i| <= net_force_tolerance`` applies to every frame
  with forces. It fails only under an external field or when forces were zeroed on constrained
  atoms before storing; neither is a correct label of the bare potential energy surface.
- Born–Oppenheimer breakdown: a frame labelled by an oracle with excited states carries
  ``bo_gap`` = ΔE₀₁ = E₁ − E₀ (eV). Where it is below ε_BO = max(``bo_gap_min_eV``, the frame's own
  ``bo_epsilon``) the ground state is no single surface to fit, so the frame is quarantined with
  check ``bo_breakdown``, as is any frame its generator flagged ``bo_breakdown`` (the inside of a
  region found by ``mlipops generate bo-scan``). Frames without a gap are not affected.
- cell: the periodic cell vectors must span a non-zero volume (area, length for 2, 1 periodic
  directions); along a non-periodic direction that has a cell vector, no atom may lie more than
  ``box_margin`` outside the cell (distance perpendicular to the face).
"""

from __future__ import annotations

import logging
import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from ase import Atoms
from ase.data import chemical_symbols
from ase.geometry.cell import complete_cell
from ase.geometry.minkowski_reduction import minkowski_reduce

from mlipops.descriptor_store import write_no_saved_descriptors
from mlipops.neighbors import neighbor_list
from mlipops.errors import StageInputError
from mlipops.frames import labels
from mlipops.ingest import made_dirs, remove_empty
from mlipops.params import DescriptorParams, IngestParams, ValidateParams, composition_key
from mlipops.paths import atomic_path
from mlipops.quality.releases import RELEASES, covering_release, load_releases
from mlipops.quarantine import REJECT_COLUMNS, quarantine_row, typed
from mlipops.report import md_table, progress, trim_memory, write_markdown, write_metrics
from mlipops.pipeline import (ACCEPTED, CURATED_DIR as CURATED, INGEST_REJECTED, INGESTED, QUARANTINE,
                              TRAINING_DESCRIPTORS, VALIDATE_REPORTS as REPORT_DIR)

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

SUITE = Path(__file__).with_name("suite.json")


# dtypes of the frame table (checked by the suite's schema expectations)
FRAME_DTYPES = {
    "frame_id": "str", "source": "str", "source_index": "int64", "config_type": "str", "split": "str",
    "n_atoms": "int64", "composition": "str", "has_energy": "bool", "has_forces": "bool",
    "forces_shape": "str", "forces_shape_ok": "bool", "stress_shape": "str", "stress_shape_ok": "bool",
    "labels_finite": "bool", "bad_label": "str", "energy": "float64", "energy_per_atom": "float64",
    "max_abs_force": "float64", "net_force": "float64", "min_distance": "float64", "n_periodic": "int64",
    "cell_volume": "float64", "box_excess": "float64", "box_atom": "int64", "species": "str",
    "species_allowed": "bool", "bo_gap": "float64", "bo_epsilon": "float64", "bo_flagged": "bool",
}
_DEGENERATE = 1e-9  # a cell measure below this fraction of the product of its vector lengths is zero

logger = logging.getLogger(__name__)


def _cell_measure(a: Atoms) -> tuple[float, int]:
    """(measure, k) of the k periodic cell vectors: volume (k=3), area (2), length (1); NaN for k=0.

    sqrt(det G) of their Gram matrix G; 0 when a periodic vector is zero or they are (numerically)
    linearly dependent, which no neighbour search or volume can work with.
    """
    vectors = a.cell.array[np.asarray(a.pbc, dtype=bool)]
    k = len(vectors)
    if k == 0:
        return math.nan, 0
    lengths = np.linalg.norm(vectors, axis=1)
    if not np.all(lengths > 0):
        return 0.0, k
    m = math.sqrt(max(float(np.linalg.det(vectors @ vectors.T)), 0.0))
    return (0.0 if m <= _DEGENERATE * float(np.prod(lengths)) else m), k


def _box_excess(a: Atoms) -> tuple[float, int]:
    """Largest distance (Å) of an atom outside the cell along a non-periodic direction with a cell
    vector, and that atom; (NaN, -1) when the frame has no such direction.

    Distances are perpendicular to the cell faces: the fractional excess times the face spacing
    1/|b_i| (b_i the reciprocal vector; = |a_i| for an orthogonal cell).
    """
    cell = a.cell.array
    lengths = np.linalg.norm(cell, axis=1)
    dirs = [i for i in range(3) if not a.pbc[i] and lengths[i] > 0]
    if not dirs:
        return math.nan, -1
    full = complete_cell(cell)
    if abs(np.linalg.det(full)) <= _DEGENERATE * float(np.prod(np.linalg.norm(full, axis=1))):
        return math.nan, -1  # collinear vectors: no box to be outside of
    recip = np.linalg.inv(full)[:, dirs]  # columns b_i with a_j . b_i = delta_ij
    s = a.positions @ recip
    excess = (np.maximum(np.maximum(-s, s - 1.0), 0.0) / np.linalg.norm(recip, axis=0)).max(axis=1)
    k = int(np.argmax(excess))
    return float(excess[k]), k


def _nearest(a: Atoms, probe: float) -> np.ndarray:
    """Per-atom distance to the nearest other atom or periodic image (NaN: none within ``probe``).

    All NaN for a degenerate periodic cell (the cell_volume expectation reports it). A periodic
    cell whose shortest lattice vector is below ``probe / 20`` (a cell in the wrong unit, say) is
    not searched, which would list millions of images: every atom gets that vector's length, the
    distance to its own image.
    """
    near = np.full(len(a), np.nan)
    if a.pbc.any():
        if not _cell_measure(a)[0] > 0:
            return near
        # |n·V| ≥ σ_min(V) for every nonzero integer n: a cell whose smallest singular value clears the bar
        # needs no Minkowski reduction (0.4 ms a frame, most of this function's time) to know that it does
        mask = np.asarray(a.pbc, dtype=bool)
        if not np.linalg.svd(a.cell.array[mask], compute_uv=False).min() >= probe / 20.0:
            reduced = np.asarray(minkowski_reduce(a.cell.array, pbc=a.pbc)[0])
            shortest = float(np.linalg.norm(reduced[mask], axis=1).min())
            if shortest < probe / 20.0:
                return np.full(len(a), shortest)
    if len(a) < 2 and not a.pbc.any():
        return near
    i, _, _, d = neighbor_list(a.positions, a.cell.array, a.pbc, probe)
    if len(d):
        np.fmin.at(near, i, d)
    return near


def _info_float(a: Atoms, key: str) -> float:
    """``info[key]`` as a float, NaN when absent or not a number."""
    try:
        return float(a.info[key])
    except (KeyError, TypeError, ValueError):
        return math.nan


def _labels(frames: list[Atoms]) -> list[tuple[float | None, np.ndarray | None, np.ndarray | None]]:
    return [labels(a) for a in frames]


def frame_table(frames: list[Atoms], allowed_species: list[str], distance_probe: float, *,
                nearest: list[np.ndarray] | None = None,
                _labelled: list[tuple] | None = None) -> pd.DataFrame:
    """One row per frame with the columns the frame suite checks (labels, shapes, geometry, species).

    ``nearest``: per-atom nearest-neighbour distances per frame (computed here when not given).
    The energy window columns (``energy_per_atom_min/max``, ``energy_range_key``) come from the
    params and are added by :func:`validate_frames`.
    """
    allowed = set(allowed_species)
    lab = _labelled or _labels(frames)
    rows = []
    for k, a in enumerate(frames):
        e, f, s = lab[k]
        bad = [name for name, v in (("energy", e), ("forces", f), ("stress", s))
               if v is not None and not np.all(np.isfinite(v))]
        symbols = a.get_chemical_symbols()
        near = nearest[k] if nearest is not None else _nearest(a, distance_probe)
        f_ok = f is not None and f.size and np.all(np.isfinite(f))
        volume, n_periodic = _cell_measure(a)
        box, box_atom = _box_excess(a)
        rows.append({
            "frame_id": a.info["frame_id"], "source": a.info.get("source"),
            "source_index": int(a.info.get("source_index", -1)), "config_type": a.info.get("config_type"),
            "split": a.info.get("split"), "n_atoms": len(a), "composition": composition_key(symbols),
            "has_energy": e is not None, "has_forces": f is not None or "forces_shape" in a.info,
            "forces_shape": a.info.get("forces_shape", f"{len(a)}x3" if f is not None else None),
            "forces_shape_ok": "forces_shape" not in a.info,
            "stress_shape": a.info.get("stress_shape", "6" if s is not None else None),
            "stress_shape_ok": "stress_shape" not in a.info,
            "labels_finite": not bad, "bad_label": ",".join(bad) or None,
            "energy": math.nan if e is None else e,
            "energy_per_atom": e / len(a) if e is not None and math.isfinite(e) else math.nan,
            "max_abs_force": float(np.max(np.abs(f))) if f_ok else math.nan,
            "net_force": float(np.linalg.norm(f.sum(axis=0))) if f_ok else math.nan,
            "min_distance": (float(np.nanmin(near)) if np.isfinite(near).any()
                             else math.nan if a.pbc.any() and not volume > 0 else float(distance_probe)),
            "n_periodic": n_periodic, "cell_volume": volume, "box_excess": box, "box_atom": box_atom,
            "species": ",".join(sorted(set(symbols))), "species_allowed": set(symbols) <= allowed,
            "bo_gap": _info_float(a, "bo_gap"), "bo_epsilon": _info_float(a, "bo_epsilon"),
            "bo_flagged": bool(a.info.get("bo_breakdown", False)),
        })
    return pd.DataFrame(rows, columns=list(FRAME_DTYPES)).astype(FRAME_DTYPES)


def atom_table(frames: list[Atoms], distance_probe: float, *, nearest: list[np.ndarray] | None = None,
               _labelled: list[tuple] | None = None) -> pd.DataFrame:
    """One row per atom: ``frame`` (row of the frame table), ``atom`` (index in the frame),
    ``species``, force components ``fx fy fz`` and norm ``force_norm`` (eV/Å; NaN where the frame
    has no forces or a component is not finite), ``force_finite`` (NA where the frame has no
    forces: that is the frame check ``has_forces``), ``min_distance`` (Å to the nearest atom or
    image; NaN when none is within ``distance_probe``). Built with array operations per frame.
    """
    lab = _labelled or _labels(frames)
    counts = np.array([len(a) for a in frames], dtype=np.int64)
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    frame = np.repeat(np.arange(len(frames), dtype=np.int64), counts)
    atom = np.arange(total, dtype=np.int64) - np.repeat(starts, counts)
    numbers = np.concatenate([a.numbers for a in frames]) if frames else np.zeros(0, dtype=int)
    forces = [f if f is not None and f.shape == (len(a), 3) else None for a, (_, f, _) in zip(frames, lab)]
    F = (np.concatenate([f if f is not None else np.full((len(a), 3), np.nan) for a, f in zip(frames, forces)])
         if frames else np.zeros((0, 3)))
    has = np.repeat(np.array([f is not None for f in forces], dtype=bool), counts)
    finite = np.isfinite(F).all(axis=1)
    if nearest is None:
        nearest = [_nearest(a, distance_probe) for a in frames]
    out = pd.DataFrame({
        "frame": frame, "atom": atom,
        "species": pd.array(np.asarray(chemical_symbols, dtype=object)[numbers], dtype="str"),
        "fx": F[:, 0], "fy": F[:, 1], "fz": F[:, 2],
        "force_norm": np.where(finite, np.linalg.norm(np.where(finite[:, None], F, 0.0), axis=1), np.nan),
        "force_finite": pd.array(np.where(has, finite, False), dtype="boolean", copy=True),
        "min_distance": np.concatenate(nearest) if frames else np.zeros(0),
    })
    out.loc[~has, "force_finite"] = pd.NA
    return out


def build_tables(frames: list[Atoms], p: ValidateParams) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The frame table and the atom table of ``frames`` (one neighbour search per frame)."""
    probe = distance_probe(p)
    lab = _labels(frames)
    nearest = [_nearest(a, probe) for a in frames]
    return (frame_table(frames, p.allowed_species, probe, nearest=nearest, _labelled=lab),
            atom_table(frames, probe, nearest=nearest, _labelled=lab))


def distance_probe(p: ValidateParams) -> float:
    """Radius of the neighbour search behind ``min_distance`` (beyond it the exact value is moot)."""
    return max(2.0 * p.min_interatomic_distance, 3.0)


def energy_bounds(table: pd.DataFrame, p: ValidateParams) -> pd.DataFrame:
    """``table`` plus each row's energy-per-atom window from ``validate.energy_per_atom_range``."""
    ranges = p.energy_per_atom_range
    key = table["composition"].where(table["composition"].isin(list(ranges)), "default")
    out = table.copy()
    out["energy_range_key"] = key.astype("str")
    out["energy_per_atom_min"] = key.map({k: float(v[0]) for k, v in ranges.items()}).astype("float64")
    out["energy_per_atom_max"] = key.map({k: float(v[1]) for k, v in ranges.items()}).astype("float64")
    return out


def bo_bounds(table: pd.DataFrame, p: ValidateParams) -> pd.DataFrame:
    """``table`` plus ``bo_gap_min``: the ε_BO each row's gap must reach, max(validate.bo_gap_min_eV, the
    frame's own ``bo_epsilon``): a generator that chose a stricter ε for its physics keeps it, and no
    frame goes below the project-wide floor."""
    out = table.copy()
    out["bo_gap_min"] = np.fmax(float(p.bo_gap_min_eV), out["bo_epsilon"].to_numpy(dtype=float))
    return out


def _suite_spec() -> dict[str, dict]:
    return {s["table"]: s for s in json.loads(SUITE.read_text())["suites"]}


def _suite(context, spec: dict):
    import great_expectations as gx

    suite = gx.ExpectationSuite(name=spec["name"], expectations=spec["expectations"])
    if len(suite.expectations) != len(spec["expectations"]):  # GX logs and drops an invalid one
        raise StageInputError(f"great-expectations rejected an expectation of suite {spec['name']} "
                              f"({len(suite.expectations)} of {len(spec['expectations'])} loaded)", file=str(SUITE))
    return context.suites.add(suite)


def _context():
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # older/newer GX without this knob: progress bars are cosmetic
        pass
    return context


def _suite_parameters(p: ValidateParams) -> dict:
    return {"min_interatomic_distance": p.min_interatomic_distance, "max_abs_force": p.max_abs_force,
            "net_force_tolerance": p.net_force_tolerance, "box_margin": p.box_margin,
            "allowed_species": list(p.allowed_species),
            "expected_test_config_types": list(p.expected_test_config_types)}


def _describe(cfg) -> str:
    kw = cfg.kwargs
    if "column_A" in kw:
        return f"{kw['column_A']} ≥ {kw['column_B']}"
    return kw.get("column") or "(table)"


def _reason(template: str, row: dict, p: ValidateParams, extra: dict | None = None) -> str:
    try:
        return template.format(**row, **(extra or {}), p=p)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError):
        return template


class _Suites:
    """The great-expectations suites of :data:`SUITE` run on pandas frames in one ephemeral context: each
    suite's success and statistics, and every expectation's result as a JSON record (``results``)."""

    def __init__(self, p: ValidateParams):
        self.context = _context()
        self.source = self.context.data_sources.add_pandas("mlipops")
        self.specs = _suite_spec()
        self.params = _suite_parameters(p)
        self.suites: dict[str, dict] = {}
        self.results: list[dict] = []

    def run(self, kind: str, df: pd.DataFrame):
        spec = self.specs[kind]
        batch = self.source.add_dataframe_asset(name=kind).add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": df})
        res = batch.validate(_suite(self.context, spec), expectation_parameters=self.params,
                             result_format={"result_format": "COMPLETE"})
        self.suites[spec["name"]] = {"success": bool(res.success), "statistics": res.statistics}
        # a schema failure first: it explains any expectation that could not run on a bad column
        for r in res.results:
            cfg = r.expectation_config
            if not r.success and cfg.meta.get("level") == "table":
                detail = {k: v for k, v in r.result.items()
                          if k in ("observed_value", "details", "unexpected_count", "partial_unexpected_list")}
                raise StageInputError(f"the {kind} table fails schema check {cfg.type} ({_describe(cfg)}): "
                                      f"{cfg.meta.get('reason')} {json.dumps(detail, default=str)}")
        for r in res.results:
            cfg = r.expectation_config
            if r.exception_info and r.exception_info.get("raised_exception"):
                raise StageInputError(f"great-expectations could not run {cfg.type} on {kind} column "
                                      f"{_describe(cfg)}: {r.exception_info.get('exception_message')}")
        return res

    def record(self, kind: str, r, n_rows: int, n_frames: int | None, extra: dict | None = None) -> None:
        d = r.to_json_dict()
        cfg = r.expectation_config
        d["mlipops"] = {"table": kind, "level": cfg.meta.get("level"), "check": cfg.meta.get("check"),
                        "target": _describe(cfg), "failing_rows": n_rows, "failing_frames": n_frames,
                        **(extra or {})}
        self.results.append(d)

    def close(self) -> None:
        _release_batches(self.context, self.source)


def _frame_failures(suites: _Suites, table: pd.DataFrame, p: ValidateParams, failures: dict) -> None:
    """The frames suite: each failing row is quarantined (its check and reason added to ``failures``)."""
    res = suites.run("frames", table)
    for r in res.results:
        m = r.expectation_config.meta
        idx = sorted(int(i) for i in (r.result.get("unexpected_index_list") or []))
        if m.get("level") == "frame":
            for i in idx:
                failures.setdefault(i, []).append((m["check"], _reason(m["reason"], table.iloc[i].to_dict(), p)))
        suites.record("frames", r, len(idx), len(idx) if m.get("level") == "frame" else None)


def _atom_failures(suites: _Suites, atoms: pd.DataFrame, p: ValidateParams, failures: dict) -> None:
    """The atoms suite: a failing atom quarantines its frame; one reason per (frame, check), naming the first
    failing atom and how many more there are."""
    atoms = atoms.reset_index(drop=True)
    res = suites.run("atoms", atoms)
    for r in res.results:
        m = r.expectation_config.meta
        idx = np.sort(np.asarray(r.result.get("unexpected_index_list") or [], dtype=np.int64))
        n_frames = 0
        if m.get("level") == "frame" and len(idx):
            frame_of = atoms["frame"].to_numpy()[idx]
            rows, first, count = np.unique(frame_of, return_index=True, return_counts=True)
            n_frames = len(rows)
            for row, k, n in zip(rows.tolist(), first.tolist(), count.tolist()):
                text = _reason(m["reason"], atoms.iloc[int(idx[k])].to_dict(), p)
                if n > 1:
                    text += f" (+{n - 1} more atom{'s' if n > 2 else ''})"
                failures.setdefault(int(row), []).append((m["check"], text))
        suites.record("atoms", r, len(idx), n_frames if m.get("level") == "frame" else None)


def _dataset_checks(suites: _Suites, accepted: pd.DataFrame, p: ValidateParams) -> list[dict]:
    """The dataset suite on the frames that passed: its failed checks with their reasons (reported, never
    quarantined)."""
    dataset_failed: list[dict] = []
    res = suites.run("accepted_frames", accepted)
    for r in res.results:
        m = r.expectation_config.meta
        extra = {}
        if not r.success:
            order = {v: i for i, v in enumerate(p.expected_test_config_types)}
            missing = sorted(r.result.get("partial_missing_list") or [], key=lambda v: order.get(v, len(order)))
            more = int(r.result.get("missing_count") or len(missing)) - len(missing)
            text = _reason(m["reason"], {}, p, {"missing": ", ".join(map(str, missing))
                                                + (f" and {more} more" if more > 0 else "")})
            dataset_failed.append({"check": m["check"], "reason": text})
            extra = {"reason": text}
        suites.record("accepted_frames", r, 0 if r.success else 1, None, extra)
    return dataset_failed


def validate_frames(table: pd.DataFrame, p: ValidateParams, atoms: pd.DataFrame | None = None
                    ) -> tuple[dict[int, list[tuple[str, str]]], dict]:
    """Run the suites through great-expectations; return {row: [(check, reason)]} and the results.

    ``table``: :func:`frame_table` rows; ``atoms``: :func:`atom_table` rows of the same frames
    (its ``frame`` column is a row of ``table``), or None to skip the per-atom suite. A failing
    frame-level expectation quarantines the row, a failing atom its frame (one reason per check
    naming the first failing atom), a failing table-level (schema) expectation raises
    :class:`StageInputError`; dataset-level expectations run on the rows that passed and are only
    reported (``result["dataset_checks_failed"]``). Each check appears once per row.
    """
    suites = _Suites(p)
    table = bo_bounds(energy_bounds(table.reset_index(drop=True), p), p)
    failures: dict[int, list[tuple[str, str]]] = {}
    _frame_failures(suites, table, p, failures)
    if atoms is not None and len(atoms):
        _atom_failures(suites, atoms, p, failures)
    dataset_failed = _dataset_checks(suites, table.drop(index=list(failures)).reset_index(drop=True), p)
    merged: dict[int, list[tuple[str, str]]] = {}
    for row in sorted(failures):
        by_check: dict[str, list[str]] = {}
        for check, text in failures[row]:
            by_check.setdefault(check, []).append(text)
        merged[row] = [(c, "; ".join(t)) for c, t in by_check.items()]
    quarantining = [s for s in suites.suites if s != suites.specs["accepted_frames"]["name"]]
    result = {"success": all(suites.suites[s]["success"] for s in quarantining),
              "dataset_success": not dataset_failed, "dataset_checks_failed": dataset_failed,
              "suites": suites.suites, "results": suites.results}
    suites.close()
    return merged, result


def _release_batches(context, source) -> None:
    """Drop great-expectations' references to the tables it validated: its pandas execution engine caches every
    batch's DataFrame (3M atoms rows: ~0.7 GB with its metrics) for as long as the data source lives."""
    try:
        engine = source.get_execution_engine()
        engine.batch_manager._batch_data_cache.clear()
        engine.batch_manager.reset_batch_cache()
        context.data_sources.delete(source.name)
    except Exception:  # another GX version's internals: memory, not correctness
        pass


def outlier_candidates(config_types, splits, p: ValidateParams) -> tuple[np.ndarray, dict[int, str]]:
    """The frames the outlier test examines, of frames that passed the suite (their config_type and split):
    those of the ``training_split`` whose config_type at least one other of them shares. The surrogate
    compares a frame with training frames of its kind: a kind the training data lacks (a dimer among
    crystals) is new physics to a linear model, not a wrong label, so a lone frame of its config_type is
    neither fitted nor judged. Returns (indices, {index: why a training frame is not examined})."""
    o = p.outliers
    train = np.flatnonzero(np.asarray(splits, dtype=object) == o.training_split)
    kinds = Counter(config_types[k] for k in train)
    lone = {int(k): f"outlier test not applicable: no other training frame of config_type {config_types[k]!r}"
            for k in train if kinds[config_types[k]] < 2}
    return np.array([k for k in train if int(k) not in lone], dtype=np.int64), lone


def find_outliers(frames, p: ValidateParams, descriptors: DescriptorParams | None, spill_dir: Path | None = None,
                  among: np.ndarray | None = None, save_descriptors: Path | None = None):
    """Cook's-distance outliers among the training-split frames that passed the suite (a list of ase.Atoms
    or a :class:`~mlipops.quality.outliers.FramePool`; ``among``: the indices of those that passed, default
    all), examined as :func:`outlier_candidates` says.

    Returns ({frame index in ``frames``: reason}, report or None, note, {frame index: note} of the training
    frames not examined)."""
    from mlipops.quality.outliers import FramePool, detect

    o = p.outliers
    if not o.enabled or descriptors is None:
        return {}, None, "outlier detection disabled (validate.outliers.enabled)", {}
    pool = FramePool.from_atoms(frames)
    among = np.arange(len(pool)) if among is None else np.asarray(among, dtype=np.int64)
    cts = np.array([None if c is None else str(c) for c in pool.info["config_type"][among]], dtype=object)
    idx, lone = outlier_candidates(cts, pool.info["split"][among], p)
    idx, lone = among[idx], {int(among[k]): note for k, note in lone.items()}
    if not len(idx):
        what = f"no frame of the {o.training_split!r} split" if not lone else \
            f"no two frames of one config_type in the {o.training_split!r} split"
        return {}, None, f"{what}: nothing to examine", lone
    sub = pool.take(idx)
    rep = detect(sub, sub.species(), descriptors.model_dump(), o, spill_dir=spill_dir,
                 save_descriptors=save_descriptors)
    flagged = {int(idx[int(r.frame)]): r.reason for r in rep.frames.itertuples() if r.quarantine}
    at = rep.frames.frame.to_numpy(dtype=np.int64)
    rep.frames.insert(0, "source_index", [-1 if v is None else int(v) for v in sub.info["source_index"][at]])
    rep.frames.insert(0, "source", sub.info["source"][at])
    return flagged, rep, "; ".join(rep.notes), lone


def _cooks_plot(rep, path: Path, threshold: float | None) -> None:
    from mlipops.report import pyplot, save_figure

    plt = pyplot()

    df = rep.frames
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (col, surrogate, title) in zip(axes, (("energy_cooks", rep.energy, "energy per atom"),
                                                  ("force_cooks", rep.forces, "forces (largest |t| component)"))):
        val = df[col].astype(float).clip(lower=1e-12)  # log axis: exact zeros drawn at the floor
        for ct in sorted(df.config_type.astype(str).unique()):
            m = (df.config_type.astype(str) == ct) & val.notna()
            ax.scatter(df.index[m], val[m], s=10, label=ct)
        q = df.quarantine.to_numpy(bool) & val.notna().to_numpy()
        ax.scatter(df.index[q], val[q], s=60, facecolors="none", edgecolors="red", label="quarantined")
        if surrogate is not None:
            ax.axhline(threshold if threshold is not None else 4.0 / surrogate.n, color="k", ls="--", lw=0.8,
                       label="Cook's threshold")
        if val.notna().any():
            ax.set_yscale("log")
        ax.set_xlabel("training frame")
        ax.set_ylabel("Cook's distance")
        ax.set_title(f"Cook's distance: {title}")
    axes[0].legend(fontsize=6, markerscale=1.2)
    save_figure(fig, path, dpi=110)


@dataclass
class Decision:
    """What the validate stage decides about a list of frames (see :func:`decide`)."""

    failures: dict[int, list[tuple[str, str]]]  # frame index -> [(check, reason)], one entry per check
    table: pd.DataFrame  # the frame table the suite ran on
    atoms: pd.DataFrame | None  # the atom table (None once the stage has let it go)
    gx_result: dict  # the great-expectations results (as written to validation_result.json)
    outliers: dict[int, str]  # frame index -> reason, the frames the outlier test quarantined
    outlier_report: object | None  # mlipops.quality.outliers.OutlierReport, None when not run
    outlier_note: str
    not_examined: dict[int, str] = field(default_factory=dict)  # training frames the outlier test left out, why

    def quarantined(self, frames: list[Atoms]) -> pd.DataFrame:
        """One row per quarantined frame: ``frame`` (index), ``frame_id``, ``check`` (comma-joined)
        and ``reason``, as the quarantine file records them."""
        rows = [{"frame": k, "frame_id": frames[k].info.get("frame_id"), "check": ",".join(c for c, _ in v),
                 "reason": "; ".join(r for _, r in v)} for k, v in sorted(self.failures.items())]
        return pd.DataFrame(rows, columns=["frame", "frame_id", "check", "reason"])


_NO_GX = {"success": True, "dataset_success": True, "dataset_checks_failed": [], "suites": {}, "results": []}


def suite_decision(table: pd.DataFrame, atoms: pd.DataFrame, p: ValidateParams) -> tuple[dict, dict]:
    """The great-expectations suites on the frame and atom tables: ({row: [(check, reason)]}, results)."""
    return validate_frames(table, p, atoms) if len(table) else ({}, dict(_NO_GX))


def outlier_decision(failures: dict, train, train_rows: np.ndarray, p: ValidateParams,
                     descriptors: DescriptorParams | None, spill_dir: Path | None = None,
                     save_descriptors: Path | None = None):
    """The outlier test on the training frames that passed the suites (``failures``, updated in place):
    ``train`` (a list of ase.Atoms or a FramePool) holds the frames of rows ``train_rows``, at least every
    frame of the training split. Returns ({row: reason}, report, note, {row: why not examined})."""
    from mlipops.quality.outliers import FramePool

    train = FramePool.from_atoms(train)
    train_rows = np.asarray(train_rows, dtype=np.int64)
    ok = np.flatnonzero([int(k) not in failures for k in train_rows])
    found, out_rep, out_note, lone = find_outliers(train, p, descriptors, spill_dir, among=ok,
                                                   save_descriptors=save_descriptors)
    outliers = {int(train_rows[j]): reason for j, reason in found.items()}
    for k, reason in outliers.items():
        failures.setdefault(k, []).append(("influential_outlier", reason))
    return outliers, out_rep, out_note, {int(train_rows[j]): note for j, note in lone.items()}


def decide_tables(table: pd.DataFrame, atoms: pd.DataFrame, train, train_rows: np.ndarray, p: ValidateParams,
                  descriptors: DescriptorParams | None, spill_dir: Path | None = None) -> Decision:
    """The decision on the frames of ``table``/``atoms`` (:func:`build_tables`), writing nothing: the
    great-expectations suites (:func:`suite_decision`), then the outlier test on the ``training_split``
    frames that passed them (:func:`outlier_decision`; ``train``: the frames of rows ``train_rows``, at
    least every frame of the training split; the suites need only the tables)."""
    failures, gx_result = suite_decision(table, atoms, p)
    outliers, out_rep, out_note, lone = outlier_decision(failures, train, train_rows, p, descriptors, spill_dir)
    return Decision(failures, table, atoms, gx_result, outliers, out_rep, out_note, lone)


def decide(frames: list[Atoms], p: ValidateParams, descriptors: DescriptorParams | None = None) -> Decision:
    """The validate stage's quarantine decision on ``frames``, writing nothing: the great-expectations
    suites (frame and atom tables), then the Cook's-distance outlier test on the ``training_split``
    frames that passed them. Quarantine releases (``data/quarantine_releases.yaml``) are not applied."""
    table, atoms = build_tables(frames, p)
    rows = [k for k, a in enumerate(frames) if a.info.get("split") == p.outliers.training_split]
    return decide_tables(table, atoms, [frames[k] for k in rows], np.array(rows, dtype=np.int64), p, descriptors)


class _Info(NamedTuple):
    """What the outputs record of a frame besides its text (a tuple: 100,000 frames in ~15 MB)."""

    frame_id: str
    source: str | None
    source_index: int | None
    config_type: str | None
    split: str | None


class _Spool:
    """The extxyz text of every frame (as it stands in the ingested file), in a file
    beside the outputs, so that accepted.extxyz and the quarantine are written after the decision without
    holding the frames: one frame's text in memory at a time."""

    def __init__(self, directory: Path):
        import tempfile

        self.fh = tempfile.TemporaryFile(dir=directory)  # no name: nothing is left behind, even after kill -9
        self.offsets = [0]

    def add(self, text: str) -> None:
        data = text.encode("utf-8")
        self.fh.write(data)
        self.offsets.append(self.offsets[-1] + len(data))

    def texts(self):
        """(index, text) of every frame, in order."""
        self.fh.flush()
        self.fh.seek(0)
        for k in range(len(self.offsets) - 1):
            yield k, self.fh.read(self.offsets[k + 1] - self.offsets[k]).decode("utf-8")

    def close(self) -> None:
        self.fh.close()


def _validate_chunk(items: list, ctx: dict) -> dict:
    """One chunk of ingested frames (``map_extxyz`` items): its frame and atom tables, the training frames as a
    FramePool (for the outlier test) and their rows in the chunk, the info the outputs record, the texts."""
    from mlipops.frames import Rejected
    from mlipops.quality.pool import FramePool

    p, probe = ctx["params"], ctx["probe"]
    frames, texts = [], []
    for a, text in items:
        if isinstance(a, Rejected):  # ingest wrote this file: a frame it cannot read back is corruption
            return {"error": a.reason}
        frames.append(a)
        texts.append(text)
    lab = _labels(frames)
    nearest = [_nearest(a, probe) for a in frames]
    train = [q for q, a in enumerate(frames) if a.info.get("split") == p.outliers.training_split]
    return {"table": frame_table(frames, p.allowed_species, probe, nearest=nearest, _labelled=lab),
            "atoms": atom_table(frames, probe, nearest=nearest, _labelled=lab),
            "pool": FramePool.from_atoms([frames[q] for q in train]) if p.outliers.enabled and train else None,
            "train": train, "info": [_Info(*(a.info.get(k) for k in _Info._fields)) for a in frames],
            "texts": texts}


_CHUNK_FRAMES = 500  # frames read and tabled at a time (by one worker process, for a large file)


def _stream_tables(path: Path, p: ValidateParams, spool: _Spool, chunk: int | None = None):
    """Read the ingested frames as a stream, a chunk at a time (in worker processes for a large file:
    :func:`mlipops.frames.map_extxyz`): their frame and atom tables, their extxyz text (to ``spool``), the info
    the outputs record, and the training split as a FramePool (for the outlier test). Memory: the tables
    (~70 bytes an atom) and the training frames' arrays (~60 bytes an atom)."""
    from mlipops.frames import map_extxyz
    from mlipops.quality.pool import FramePool

    tables, atom_parts, pools, train_rows, info = [], [], [], [], []
    size = path.stat().st_size
    n = 0
    if size:
        with progress("validate: reading the ingested frames (MiB)", max(1, round(size / 2**20)),
                      quiet_start=True) as advance:
            for res in map_extxyz(path, _validate_chunk, {"params": p, "probe": distance_probe(p)},
                                  chunk_frames=chunk or _CHUNK_FRAMES,
                                  progress=lambda pos: advance(completed=round(pos / 2**20), note=f"{n} frames")):
                if "error" in res:
                    raise StageInputError(f"ingest output is corrupt: {res['error']}", file=str(path))
                tables.append(res["table"])
                at = res["atoms"]
                at["frame"] += n
                atom_parts.append(at)
                if res["pool"] is not None:
                    pools.append(res["pool"])
                    train_rows.extend(n + q for q in res["train"])
                for text in res["texts"]:
                    # ingest wrote it: the frame's own text (ASE writes a read frame back to these bytes)
                    spool.add(text)
                info.extend(res["info"])
                n += len(res["info"])
            advance(completed=max(1, round(size / 2**20)), note=f"{n} frames")
    probe = distance_probe(p)
    table = pd.concat(tables, ignore_index=True) if tables else frame_table([], p.allowed_species, probe)
    atoms = pd.concat(atom_parts, ignore_index=True) if atom_parts else atom_table([], probe)
    del tables, atom_parts
    trim_memory()
    return table, atoms, FramePool.concat(pools), np.array(train_rows, dtype=np.int64), info


def expectation_from_test_files(p: ValidateParams, table: pd.DataFrame, ingest: IngestParams | None
                          ) -> tuple[ValidateParams, str | None]:
    """The config_types the test split must hold, from the data when the test split is given by file.

    With a source of ``split: test`` (:mod:`mlipops.ingest`), ``expected_test_config_types`` (a list written
    for the rule's held-out config_types, e.g. copper's vacancy and surfaces) is replaced by the
    config_types that the test source(s) brought in: the check then says whether every kind of the user's
    test file still has an accepted test frame. Returns (params to check with, a note for the summary)."""
    from mlipops.frames import source_name

    tests = [s for s in (ingest.sources if ingest is not None else []) if s.split == "test"]
    if not tests:
        return p, None
    names = {source_name(s.path) for s in tests}
    kinds = sorted(set(table.loc[table["source"].isin(names), "config_type"].astype(str)))
    note = (f"Test split given by file ({', '.join(f'`{s.path}`' for s in tests)}): the dataset check "
            f"test_split_config_types expects the config_types those files hold, {kinds}, in place of "
            f"validate.expected_test_config_types {list(p.expected_test_config_types)}.")
    return p.model_copy(update={"expected_test_config_types": kinds}), note


_EXPECTED_KEY = "(validate.expected_test_config_types)"


def run(p: ValidateParams, descriptors: DescriptorParams | None = None, ingest: IngestParams | None = None) -> dict:
    """The stage. ``ingest``: the sources, for a test split given by file (:func:`expectation_from_test_files`)."""
    t0 = time.perf_counter()
    if not INGESTED.is_file():
        raise StageInputError("ingested frames missing: run `dvc repro ingest` first", file=str(INGESTED))
    created = made_dirs(CURATED)
    CURATED.mkdir(parents=True, exist_ok=True)
    spool = _Spool(CURATED)
    try:
        # an empty file: ingest rejected every frame read (they are all in INGEST_REJECTED)
        table, atoms, train, train_rows, info = _stream_tables(INGESTED, p, spool)
        timings = {"read_s": time.perf_counter() - t0}
        p, test_note = expectation_from_test_files(p, table, ingest)
        with progress("validate: checks (steps)", 3, quiet_start=True) as advance:
            advance(completed=0, note=f"great-expectations suites on {len(table)} frames, {len(atoms)} atoms")
            t1 = time.perf_counter()
            failures, gx_result = suite_decision(table, atoms, p)
            timings["suites_s"] = time.perf_counter() - t1
            if test_note is not None:  # the expected set is the test files' config_types, not the params list
                for d in gx_result["dataset_checks_failed"]:
                    d["reason"] = d["reason"].replace(_EXPECTED_KEY, "(the config_types of the test file(s))")
                for r in gx_result["results"]:
                    m = r.get("mlipops", {})
                    if isinstance(m.get("reason"), str):
                        m["reason"] = m["reason"].replace(_EXPECTED_KEY, "(the config_types of the test file(s))")
            n_atoms_checked = len(atoms)
            del atoms  # the atom table (~70 bytes an atom) is not needed any more
            trim_memory()
            advance(completed=1, note=f"outlier test on {len(train)} training frames")
            t1 = time.perf_counter()
            outliers, out_rep, out_note, lone = outlier_decision(failures, train, train_rows, p, descriptors,
                                                                 spill_dir=CURATED,
                                                                 save_descriptors=TRAINING_DESCRIPTORS)
            del train
            timings["outliers_s"] = time.perf_counter() - t1
            if out_rep is not None:
                timings.update({f"outliers.{k}": v for k, v in out_rep.timings.items()})
            if out_rep is not None and out_rep.forces is not None:  # its per-row arrays (six floats a force
                f = out_rep.forces  # component: 0.3 GB at 2M training atoms) are neither written nor read again
                f.y = f.fitted = f.leverage = f.cooks = f.t_external = f.dffit = np.zeros(0)
            trim_memory()
            decision = Decision(failures, table, None, gx_result, outliers, out_rep, out_note, lone)
            advance(completed=2, note="writing accepted.extxyz and the quarantine")
            t1 = time.perf_counter()
            metrics, accepted_md5 = _write_outputs(decision, info, spool, p, t0, n_atoms_checked)
            saved = out_rep.saved if out_rep is not None else None
            if saved is not None:
                saved.finish(accepted_md5)
            else:
                write_no_saved_descriptors(TRAINING_DESCRIPTORS, out_note or "no outlier test: no descriptors made")
            timings["write_s"] = time.perf_counter() - t1
            metrics.update({f"time.{k}": round(v, 2) for k, v in timings.items()})
            write_metrics(REPORT_DIR, metrics)
            if test_note is not None:
                with (REPORT_DIR / "summary.md").open("a") as fh:
                    fh.write(f"\n{test_note}\n")
            advance(completed=3, note="")
    except BaseException:
        remove_empty(created)  # nothing half-made is left: the directories this run made go again
        raise
    finally:
        spool.close()
    return metrics


def _write_outputs(decision: Decision, info: list["_Info"], spool: _Spool, p: ValidateParams, t0: float,
                   n_atoms_checked: int) -> tuple[dict, str]:
    """accepted.extxyz, the quarantine and the reports but metrics.json; returns (the metrics, which the caller
    writes with its timings, and accepted.extxyz's md5)."""
    failures, table, gx_result = decision.failures, decision.table, decision.gx_result
    outliers, out_rep, out_note = decision.outliers, decision.outlier_report, decision.outlier_note
    released = []  # frames released by hand: accepted despite the checks their release names
    releases = load_releases(RELEASES)
    for k in list(failures):
        entry = covering_release(releases, info[k].frame_id, failures[k])
        if entry:
            released.append({"source": info[k].source, "source_index": info[k].source_index,
                             "checks": ",".join(c for c, _ in failures[k]), "why": entry["why"],
                             "released_by": entry.get("released_by"), "released_at": entry.get("released_at")})
            del failures[k]
    quarantined = []
    n_accepted = 0
    md5 = hashlib.md5()  # of the bytes written: accepted.extxyz's md5 (mlipops.frames.file_md5) without reading it
    with atomic_path(ACCEPTED) as tmp, tmp.open("wb") as out:
        for k, text in spool.texts():
            if k in failures:
                a = info[k]
                quarantined.append(quarantine_row(a.frame_id, a.source, a.source_index, a.config_type, a.split,
                                                  failures[k], text))
            else:
                data = text.encode("utf-8")
                out.write(data)
                md5.update(data)
                n_accepted += 1
    earlier = pd.read_parquet(INGEST_REJECTED) if INGEST_REJECTED.is_file() else pd.DataFrame(columns=REJECT_COLUMNS)
    quarantine = pd.concat([earlier, pd.DataFrame(quarantined, columns=REJECT_COLUMNS)], ignore_index=True)
    quarantine["stage"] = ["ingest"] * len(earlier) + ["validate"] * len(quarantined)
    quarantine = typed(quarantine)
    QUARANTINE.parent.mkdir(parents=True, exist_ok=True)
    quarantine.to_parquet(QUARANTINE, index=False)
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    (REPORT_DIR / "validation_result.json").write_text(json.dumps(gx_result, indent=1, default=str))
    dataset_failed = gx_result["dataset_checks_failed"]
    for d in dataset_failed:  # dataset-level: a warning, nothing quarantined, the stage goes on
        logger.warning(f"dataset check {d['check']}: {d['reason']}")
    n_in = len(info) + len(earlier)
    by_check = Counter(c for cs in quarantine["check"].fillna("") for c in cs.split(",") if c)
    metrics = {"n_ingested": n_in, "n_accepted": n_accepted, "n_quarantined": len(quarantine),
               "n_atoms_checked": n_atoms_checked, "gx_success": bool(gx_result["success"]),
               "dataset_checks_failed": len(dataset_failed), "wall_time_s": round(time.perf_counter() - t0, 2)}
    metrics.update({f"n_quarantined.{c}": n for c, n in sorted(by_check.items())})
    metrics.update({f"dataset_check_failed.{d['check']}": 1 for d in dataset_failed})
    cols = ["source", "source_index", "config_type", "kind", "quarantine", "energy_residual", "energy_t",
            "energy_leverage", "energy_cooks", "force_atom", "force_residual", "force_t", "force_cooks",
            "force_chi2", "force_chi2_z", "force_rel", "force_frame_cooks", "atom_chi2_atom", "atom_residual",
            "atom_chi2", "atom_chi2_z", "reason"]
    if out_rep is not None:
        out_rep.frames[cols].to_csv(REPORT_DIR / "outliers.csv", index=False)
        _cooks_plot(out_rep, REPORT_DIR / "cooks_distance.png", p.outliers.cooks_threshold)
        metrics.update({"outliers.n_examined": len(out_rep.frames), "outliers.n_quarantined": len(outliers),
                        "outliers.n_high_leverage_consistent": int((out_rep.frames.kind ==
                                                                    "high leverage, consistent label").sum()),
                        "outliers.energy_rmse_per_atom": out_rep.energy.rmse if out_rep.energy else None,
                        "outliers.force_rmse": out_rep.forces.rmse if out_rep.forces else None,
                        "outliers.rounds": out_rep.rounds})
    else:
        pd.DataFrame(columns=cols).to_csv(REPORT_DIR / "outliers.csv", index=False)
        _empty_plot(REPORT_DIR / "cooks_distance.png", out_note)
    metrics["n_released"] = len(released)  # metrics.json: written by the caller, with the phase timings
    _write_summary(gx_result, quarantine, n_in, n_accepted, len(table), n_atoms_checked)
    _append_outlier_summary(out_rep, out_note, p)
    if released:
        with (REPORT_DIR / "summary.md").open("a") as fh:
            fh.write(f"\n## Released by hand ({len(released)}, from `{RELEASES}`)\n\n")
            fh.write(md_table(("source", "index", "checks", "why", "by", "at"),
                              [tuple(r.values()) for r in released]) + "\n")
    return metrics, md5.hexdigest()


def _empty_plot(path: Path, note: str) -> None:
    from mlipops.report import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 2))
    ax.text(0.5, 0.5, note or "no outlier analysis", ha="center", va="center", wrap=True)
    ax.set_axis_off()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _append_outlier_summary(rep, note: str, p: ValidateParams) -> None:
    path = REPORT_DIR / "summary.md"
    o = p.outliers
    lines = ["", "## Influential outliers (Cook's distance of a linear surrogate, training split)", ""]
    if rep is None or rep.energy is None:
        lines.append(f"Not run: {note or 'no training frame to examine'}.")
    else:
        df = rep.frames
        lines.append(
            f"{len(df)} training frames examined. Surrogates (OLS, statsmodels): energy per atom RMSE "
            f"{rep.energy.rmse:.4g} eV/atom over {rep.energy.p} coefficients"
            + (f", forces RMSE {rep.forces.rmse:.4g} eV/Å over {rep.forces.n} components" if rep.forces else "")
            + f". A frame is quarantined when Cook's D > {o.cooks_threshold or '4/n'} **and** its robust residual "
            f"|t| > {o.energy_residual_threshold} (energy) or > {o.force_residual_threshold} (a force component), "
            f"or when its forces as a whole are off (χ² per component over the level expected at its force scale "
            f"more than z = {o.frame_z_threshold} robust SDs into the tail of its config_type, and residual > "
            f"{o.frame_min_relative_residual} × the predicted forces) or the residual is concentrated on one atom "
            f"(z > {o.atom_z_threshold}); see `src/mlipops/quality/outliers.py`. All numbers per frame: "
            "`reports/validate/outliers.csv`, "
            "plot: `cooks_distance.png`.")
        q = df[df.quarantine]
        lines += ["", f"**Quarantined ({len(q)})**: the label disagrees with what every other frame implies "
                  "(large residual) and it moves the fit (influence)."]
        if len(q):
            lines.append(md_table(("source", "index", "config_type", "reason"),
                                  q[["source", "source_index", "config_type", "reason"]].itertuples(index=False)))
        hl = df[df.kind == "high leverage, consistent label"].sort_values("energy_leverage", ascending=False)
        lines += ["", f"**Kept: high leverage, consistent label ({len(hl)})**: rare configurations far from the "
                  "rest in descriptor space whose labels agree with the surrogate. Not errors; more data like "
                  "them would make the potential more reliable there."]
        if len(hl):
            t = hl[["source", "source_index", "config_type", "energy_leverage", "energy_t", "energy_cooks"]].head(20)
            lines.append(md_table(("source", "index", "config_type", "leverage", "robust t", "Cook's D"),
                                  [(a, b, c, f"{d:.3f}", f"{e:+.2f}", f"{f:.3g}") for a, b, c, d, e, f
                                   in t.itertuples(index=False)]))
    with path.open("a") as fh:
        fh.write("\n".join(lines) + "\n")


def _write_summary(gx_result: dict, quarantine: pd.DataFrame, n_in: int, n_accepted: int,
                   n_frames: int, n_atoms: int) -> None:
    """reports/validate/summary.md: every expectation of every suite with its outcome and counts."""
    sections = {"frames": f"## Frame table ({n_frames} rows)", "atoms": f"## Atom table ({n_atoms} rows)",
                "accepted_frames": "## Dataset checks (on the frames that passed; reported, never quarantined)"}
    paragraphs = [
        f"{n_in} frames in, {n_accepted} accepted, {len(quarantine)} quarantined "
        f"(kept with their raw text in `{QUARANTINE}`). Expectations of level `table` (schema) stop the "
        "stage when they fail; `frame` expectations quarantine the failing frames (an atom failure "
        "quarantines its frame); `dataset` expectations are warnings.",
    ]
    for kind, title in sections.items():
        rows = []
        for r in gx_result["results"]:
            m = r["mlipops"]
            if m["table"] != kind:
                continue
            failing = m["failing_rows"] if kind != "accepted_frames" else m.get("reason", "")
            row = [r["expectation_config"]["type"], m["target"], m["level"], m["check"],
                   "pass" if r["success"] else "FAIL", failing]
            if kind == "atoms":
                row.append("" if m["failing_frames"] is None else m["failing_frames"])
            rows.append(row)
        header = ["expectation", "column", "level", "check", "result",
                  "failing frames" if kind == "frames" else "failing atoms" if kind == "atoms" else "detail"]
        if kind == "atoms":
            header.append("frames quarantined")
        paragraphs += [title, md_table(header, rows) if rows else "(not run: no frames)"]
    sample = quarantine[["source", "source_index", "config_type", "check", "reason"]].head(30).copy()
    sample["reason"] = sample["reason"].str.replace("|", "\\|", regex=False)  # |F| inside a table cell
    paragraphs.append("## Quarantined frames (first 30)")
    write_markdown(REPORT_DIR / "summary.md", "Validation (great-expectations)", paragraphs,
                   table=(tuple(sample.columns), sample.itertuples(index=False)))
