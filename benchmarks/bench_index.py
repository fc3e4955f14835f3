"""Coverage-index benchmark: ingest + descriptors + convex hull of 10,000 Cu frames (~500k atoms),
the coverage views' query latency, and 10,000 hull tests against 100,000 training atoms.

    .venv/bin/python benchmarks/bench_index.py                  # 10,000 frames (generated once, cached)
    .venv/bin/python benchmarks/bench_index.py --frames 500     # a quick small run first
    .venv/bin/python benchmarks/bench_index.py --workdir /tmp/x --regenerate

The dataset is synthetic but physical: fcc / bcc / hcp / sc / diamond Cu supercells of 48-54 atoms
under random isotropic strain (±4 %) and rattles (0.02-0.1 Å), "liquid-like" heavily rattled fcc
(0.3 Å, at 5 % lower density), fcc with one or two vacancies and rattled (100)/(110)/(111) slabs,
all labelled by ASE's EMT. Each frame gets a nominal ``temperature_K``: the Einstein-model
temperature of its rattle amplitude (k_B T = K σ², K = 6.5 eV/Å² for Cu), so that the
``coverage_by_temperature`` view has rows. It is written once to ``--workdir`` (generation is not
part of the measurement; its time is reported separately), then the ingest, validate and index
stages run on it in a fresh working directory inside ``--workdir``.

Targets (2 CPU cores):
  1. ingest + descriptors + hull of 10,000 frames (~500k atoms) in under 60 s,
  2. each coverage view under 50 ms,
  3. 10,000 hull tests against 100,000 training atoms under 10 s.

Prints a table (quantity | measured | target | pass) and writes reports/bench/index.json. A missed
target does not change the exit code: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GEN_VERSION = 1  # bump when the recipe below changes: the cached dataset is then rebuilt
VIEWS = ["coverage_by_config", "coverage_by_species_coordination", "coverage_by_temperature",
         "extrapolating_atoms"]
EINSTEIN_K = 6.5  # eV/Å², m ω_E² of Cu (θ_E ≈ 240 K): σ² = k_B T / K per Cartesian component
D_MIN = 1.8  # Å: rattles are redrawn until no two atoms are closer (validate's limit is 1.5 Å)

# config_type -> share of the frames
MIX = {"crystal_fcc": 0.24, "crystal_bcc": 0.12, "crystal_hcp": 0.12, "crystal_sc": 0.08,
       "crystal_diamond": 0.08, "liquid_like": 0.12, "vacancy": 0.10, "surface_100": 0.047,
       "surface_110": 0.047, "surface_111": 0.046}


def _n_facets(solver) -> int:
    """Facet bases the γ solver knows: qhull's fan (walked) plus any found by LP solves."""
    return (0 if solver.fan_W is None else len(solver.fan_W)) + len(solver.W)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def machine_info() -> dict:
    import duckdb
    import torch

    from importlib.metadata import PackageNotFoundError, version

    try:
        highs = version("highspy")
    except PackageNotFoundError:
        highs = None
    import ase
    import scipy

    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "duckdb": duckdb.__version__, "scipy": scipy.__version__, "ase": ase.__version__,
            "highspy": highs, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# ------------------------------------------------------------------------------------- dataset
def _base_cell(kind: str, nn: dict[str, float], rng: np.random.Generator):
    """Unrattled, unstrained 46-54 atom cell of one config_type."""
    from ase.build import bulk, fcc100, fcc110, fcc111

    a_fcc = nn["fcc"] * math.sqrt(2.0)
    if kind == "crystal_fcc":
        return bulk("Cu", "fcc", a=a_fcc, cubic=True).repeat((2, 2, 3))  # 48
    if kind == "crystal_bcc":
        return bulk("Cu", "bcc", a=nn["bcc"] * 2.0 / math.sqrt(3.0), cubic=True).repeat((3, 3, 3))  # 54
    if kind == "crystal_hcp":
        d = nn["hcp"]
        return bulk("Cu", "hcp", a=d, c=d * math.sqrt(8.0 / 3.0), orthorhombic=True).repeat((3, 2, 2))  # 48
    if kind == "crystal_sc":
        return bulk("Cu", "sc", a=nn["sc"]).repeat((4, 4, 3))  # 48
    if kind == "crystal_diamond":
        return bulk("Cu", "diamond", a=nn["diamond"] * 4.0 / math.sqrt(3.0), cubic=True).repeat((3, 2, 1))  # 48
    if kind == "liquid_like":
        return bulk("Cu", "fcc", a=a_fcc * 1.05 ** (1 / 3), cubic=True).repeat((2, 2, 3))  # 48
    if kind == "vacancy":
        a = bulk("Cu", "fcc", a=a_fcc, cubic=True).repeat((2, 2, 3))
        for _ in range(int(rng.integers(1, 3))):
            del a[int(rng.integers(len(a)))]
        return a  # 46-47
    builder = {"surface_100": fcc100, "surface_110": fcc110, "surface_111": fcc111}[kind]
    slab = builder("Cu", size=(3, 4, 4), a=a_fcc, vacuum=6.0)  # 48
    slab.info.pop("adsorbate_info", None)
    return slab


def _rattle(atoms, sigma: float, rng: np.random.Generator) -> None:
    """Gaussian displacements; those of atoms closer than D_MIN to another are redrawn."""
    from mlipops.descriptors import neighbor_list

    ref = atoms.positions.copy()
    disp = rng.normal(0.0, sigma, ref.shape)
    for _ in range(200):
        atoms.positions = ref + disp
        i, j, _, d = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, D_MIN)
        if not len(i):
            return
        bad = np.unique(np.maximum(i, j))
        disp[bad] = rng.normal(0.0, sigma, (len(bad), 3))
    raise RuntimeError(f"could not rattle {atoms.get_chemical_formula()} by {sigma} Å without overlaps")


def make_frame(kind: str, nn: dict[str, float], rng: np.random.Generator):
    a = _base_cell(kind, nn, rng)
    strain = float(rng.uniform(-0.04, 0.04))
    a.set_cell(a.cell.array * (1.0 + strain), scale_atoms=True)
    sigma = 0.3 if kind == "liquid_like" else float(rng.uniform(0.02, 0.1))
    _rattle(a, sigma, rng)
    a.info.update({"config_type": kind, "strain": round(strain, 5), "rattle_stdev": round(sigma, 4),
                   "temperature_K": round(EINSTEIN_K * sigma**2 / 8.617333e-5, 1)})
    return a


def _generate_chunk(args) -> tuple[str, float]:
    """Worker: build and EMT-label frames [start, stop) and write them to their own file."""
    path, kinds, nn, seed = args
    from mlipops.frames import write_extxyz
    from mlipops.oracles import get_oracle

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    frames = [make_frame(k, nn, rng) for k in kinds]
    labelled = get_oracle("emt").label(frames)
    for a in labelled:
        a.info["source"] = "bench_cu"
    write_extxyz(path, labelled)
    return path, time.perf_counter() - t0


def build_dataset(workdir: Path, n_frames: int, seed: int, jobs: int, regenerate: bool) -> tuple[Path, dict]:
    """The cached synthetic dataset (built with ``jobs`` worker processes when missing)."""
    from concurrent.futures import ProcessPoolExecutor

    from mlipops.generate.recipes import equilibrium_nn_distance
    from mlipops.oracles import get_oracle

    path = workdir / f"cu_bench_{n_frames}_s{seed}_v{GEN_VERSION}.extxyz"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file() and not regenerate:
        meta = json.loads(meta_path.read_text())
        meta["cached"] = True
        return path, meta
    t0 = time.perf_counter()
    oracle = get_oracle("emt")
    nn = {s: equilibrium_nn_distance("Cu", s, oracle) for s in ("fcc", "bcc", "hcp", "sc", "diamond")}
    rng = np.random.default_rng(seed)
    names = list(MIX)
    kinds = rng.choice(names, size=n_frames, p=np.array(list(MIX.values())) / sum(MIX.values())).tolist()
    chunk = 250
    seeds = np.random.SeedSequence(seed).spawn(math.ceil(n_frames / chunk))
    parts = workdir / f"parts_{n_frames}"
    parts.mkdir(parents=True, exist_ok=True)
    tasks = [(str(parts / f"{c:05d}.extxyz"), kinds[s:s + chunk], nn, seeds[c])
             for c, s in enumerate(range(0, n_frames, chunk))]
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as ex:
        results = list(ex.map(_generate_chunk, tasks))
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as out:
        for p, _ in results:
            with open(p, "rb") as fh:
                shutil.copyfileobj(fh, out)
    tmp.replace(path)
    shutil.rmtree(parts, ignore_errors=True)
    counts = {k: kinds.count(k) for k in names}
    meta = {"path": str(path), "n_frames": n_frames, "seed": seed, "generator_version": GEN_VERSION,
            "nn_distance": nn, "config_types": counts, "jobs": jobs,
            "generation_wall_s": round(time.perf_counter() - t0, 2),
            "generation_cpu_s_sum": round(sum(t for _, t in results), 2),
            "file_mib": round(path.stat().st_size / 2**20, 1)}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    meta["cached"] = False
    return path, meta


# ------------------------------------------------------------------------------------ pipeline
def bench_pipeline(data: Path, run_dir: Path) -> dict:
    """ingest, validate and build_index, timed separately, in a fresh working directory."""
    # imports outside the timed regions (great_expectations alone takes seconds to import)
    t0 = time.perf_counter()
    import duckdb  # noqa: F401
    import great_expectations  # noqa: F401
    import torch  # noqa: F401

    from mlipops import quality
    from mlipops.index.build import build_index
    from mlipops.ingest import run as ingest_run
    from mlipops.params import DescriptorParams, IndexParams, IngestParams, ValidateParams
    imports_s = time.perf_counter() - t0

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(run_dir)
    try:
        out: dict = {"imports_s": round(imports_s, 2), "run_dir": str(run_dir)}
        t0 = time.perf_counter()
        m = ingest_run(IngestParams(sources=[{"path": str(data)}],
                                    split={"method": "random", "val_fraction": 0.1, "test_fraction": 0.1,
                                           "seed": 0}))
        out["ingest_s"] = time.perf_counter() - t0
        out["ingest_metrics"] = m
        out["rss_after_ingest_mib"] = peak_rss_mib()

        t0 = time.perf_counter()
        m = quality.run(ValidateParams(allowed_species=["Cu"], min_interatomic_distance=1.5, max_abs_force=50.0,
                                       expected_test_config_types=[]))
        out["validate_s"] = time.perf_counter() - t0
        out["validate_metrics"] = m
        out["rss_after_validate_mib"] = peak_rss_mib()

        t0 = time.perf_counter()
        m = build_index(IndexParams(coordination_cutoff=2.8, pca_components=5), DescriptorParams())
        out["index_s"] = time.perf_counter() - t0
        out["index_metrics"] = m
        out["rss_after_index_mib"] = peak_rss_mib()
        out["index_path"] = str(run_dir / "data" / "index.duckdb")
        out["index_mib"] = round((run_dir / "data" / "index.duckdb").stat().st_size / 2**20, 1)
    finally:
        os.chdir(cwd)
    out["ingest_plus_index_s"] = out["ingest_s"] + out["index_s"]
    out["ingest_plus_descriptors_plus_hull_s"] = (out["ingest_s"] + m["time.neighbour_lists_s"]
                                                  + m["time.descriptors_s"] + m["time.hull_s"])
    return out


# --------------------------------------------------------------------------------------- views
def _median_time(fn, repeat: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def bench_views(db: Path, repeat: int = 5) -> dict:
    from mlipops.index.build import query
    from mlipops.index.build import connect_read_only

    out: dict = {}
    t0 = time.perf_counter()
    con = connect_read_only(db)
    out["connect_s"] = time.perf_counter() - t0
    try:
        for v in VIEWS:
            sql = f"SELECT * FROM {v}"
            med, ts = _median_time(lambda: con.execute(sql).df(), repeat)
            rows = len(con.execute(sql).df())
            med_q, ts_q = _median_time(lambda: query(sql, db), repeat)
            out[v] = {"rows": rows, "connection_median_s": med, "connection_runs_s": ts,
                      "query_median_s": med_q, "query_runs_s": ts_q}
        sql = "SELECT count(*) FROM extrapolating_atoms"
        med, ts = _median_time(lambda: con.execute(sql).df(), repeat)
        med_q, ts_q = _median_time(lambda: query(sql, db), repeat)
        out["count_extrapolating_atoms"] = {"value": int(con.execute(sql).fetchone()[0]),
                                            "connection_median_s": med, "connection_runs_s": ts,
                                            "query_median_s": med_q, "query_runs_s": ts_q}
        # the cost of query()'s per-call connection alone
        med, ts = _median_time(lambda: query("SELECT 1", db), repeat)
        out["query_select_1_median_s"] = med
    finally:
        con.close()
    return out


# ---------------------------------------------------------------------------------------- hull
HARD = {"liquid_like", "vacancy", "surface_100", "surface_110", "surface_111"}


def _take_atoms(frames, idx_frames, n_atoms: int) -> list[int]:
    """Indices of frames, in the given order, until they hold at least n_atoms atoms."""
    chosen, total = [], 0
    for f in idx_frames:
        if total >= n_atoms:
            break
        chosen.append(f)
        total += len(frames[f])
    return chosen


def _hull_case(g_train: np.ndarray, g_query: np.ndarray, ct: np.ndarray, n_check: int, seed: int) -> dict:
    """Fit one hull on g_train, then time a cold evaluate() of g_query, whole and phase by phase,
    and check γ against a cold pure-LP solver on n_check atoms (half outside where there are)."""
    from mlipops.index.hull import GammaSolver, INSIDE_TOL, fit_species_hull, hull_distance

    t0 = time.perf_counter()
    sh = fit_species_hull("Cu", g_train, 5)
    fit_s = time.perf_counter() - t0

    # the full, cold evaluate(): projection, γ (cached facets + LPs) and hull_distance of the outside
    sh._solver = None
    t0 = time.perf_counter()
    x, inside, gamma, dist = sh.evaluate(g_query)
    evaluate_s = time.perf_counter() - t0
    solver = sh.solver()
    n_lp, n_bases_after = solver.n_lp, _n_facets(solver)

    # the same, cold again, phase by phase
    sh._solver = None
    t0 = time.perf_counter()
    x2 = sh.project(g_query)
    project_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    solver = sh.solver()  # qhull facets of the extreme points -> cached bases
    seed_s = time.perf_counter() - t0
    n_seeded = _n_facets(solver)
    t0 = time.perf_counter()
    gamma2 = solver.gamma(x2)
    gamma_s = time.perf_counter() - t0
    out_mask = ~(gamma2 <= 1.0 + INSIDE_TOL)
    t0 = time.perf_counter()
    dist2 = hull_distance(sh.points, x2[out_mask]) if out_mask.any() else np.zeros(0)
    dist_s = time.perf_counter() - t0

    # correctness: γ against a cold pure-LP solver (no facet seeding, one HiGHS solve per atom)
    rng = np.random.default_rng(seed)
    out_idx, in_idx = np.flatnonzero(~inside), np.flatnonzero(inside)
    n_out = min(len(out_idx), n_check // 2)
    pick = np.concatenate([rng.choice(out_idx, n_out, replace=False),
                           rng.choice(in_idx, min(len(in_idx), n_check - n_out), replace=False)])
    cold = GammaSolver(sh.points, sh.centroid, seed_facets=False)
    t0 = time.perf_counter()
    g_lp = np.array([cold.solve_lp(xq) for xq in x[pick]])
    lp_s = time.perf_counter() - t0
    g_ev = gamma[pick]
    fin = np.isfinite(g_lp) & np.isfinite(g_ev)
    diff = np.abs(g_lp[fin] - g_ev[fin])
    # and through cold.gamma() (batched: bases learnt from its own LPs certify later atoms)
    cold2 = GammaSolver(sh.points, sh.centroid, seed_facets=False)
    g_lp_batch = cold2.gamma(x[pick])
    fin_b = np.isfinite(g_lp_batch) & np.isfinite(g_ev)

    by_ct = {}
    for c in sorted(set(ct.tolist())):
        m = ct == c
        by_ct[c] = {"n_atoms": int(m.sum()), "n_outside": int((~inside[m]).sum())}
    return {
        "n_train_atoms": int(len(g_train)), "n_query_atoms": int(len(g_query)), "query_by_config_type": by_ct,
        "fit_s": fit_s, "n_extreme_points": int(len(sh.points)), "rank": int(sh.rank),
        "explained_variance": float(sh.explained_variance_ratio.sum()),
        "evaluate_s": evaluate_s, "n_outside": int((~inside).sum()), "n_lp": int(n_lp),
        "n_cached_bases_after": int(n_bases_after), "n_seeded_facets": int(n_seeded),
        "gamma_max_finite": float(gamma[np.isfinite(gamma)].max()) if np.isfinite(gamma).any() else None,
        "hull_distance_max": float(dist.max()) if len(dist) else 0.0,
        "phases": {"project_s": project_s, "seed_facets_s": seed_s, "gamma_s": gamma_s,
                   "hull_distance_s": dist_s, "n_hull_distance": int(out_mask.sum()),
                   "hull_distance_per_atom_ms": 1e3 * dist_s / max(1, int(out_mask.sum())),
                   "repeat_matches_evaluate": bool(np.array_equal(gamma2, gamma)
                                                   and np.allclose(dist2, dist[out_mask]))},
        "check": {"n": int(len(pick)), "n_outside_in_sample": int(n_out),
                  "max_abs_diff_gamma": float(diff.max()) if len(diff) else 0.0,
                  "n_inf_mismatch": int((np.isfinite(g_lp) != np.isfinite(g_ev)).sum()),
                  "n_inside_mismatch": int(((g_lp <= 1.0 + INSIDE_TOL) != inside[pick]).sum()),
                  "pure_lp_s": lp_s, "pure_lp_per_atom_ms": 1e3 * lp_s / max(1, len(pick)),
                  "batched_cold_max_abs_diff": float(np.abs(g_lp_batch[fin_b] - g_ev[fin_b]).max())
                  if fin_b.any() else 0.0, "batched_cold_n_lp": int(cold2.n_lp)},
    }


def bench_hull(data: Path, n_train: int, n_query: int, n_check: int, seed: int) -> dict:
    """Two training sets of n_train atoms from the first frames, one query set of n_query atoms from
    later frames (half from liquid-like / vacancy / slab frames, half from bulk crystals):

    ``all``:      training atoms from frames of every config_type (most query atoms inside),
    ``crystals``: training atoms from the crystal_* frames only (the hard query atoms fall outside).
    """
    from mlipops.descriptors import compute_descriptors
    from mlipops.frames import read_extxyz
    from mlipops.params import DescriptorParams

    t0 = time.perf_counter()
    frames, bad = read_extxyz(data)
    read_s = time.perf_counter() - t0
    if bad:
        raise SystemExit(f"{data}: {len(bad)} unreadable frames")
    cts = [a.info["config_type"] for a in frames]
    crystal = [f for f in range(len(frames)) if cts[f] not in HARD]
    # the training pool ends where the crystal frames reach n_train atoms, or at half the frames
    train_c = _take_atoms(frames, crystal, n_train)
    cut = min(train_c[-1] + 1, len(frames) // 2)
    train_c = [f for f in train_c if f < cut]
    train_a = _take_atoms(frames, range(cut), n_train)
    rest = range(cut, len(frames))
    q_hard = _take_atoms(frames, [f for f in rest if cts[f] in HARD], n_query // 2)
    q_easy = _take_atoms(frames, [f for f in rest if cts[f] not in HARD],
                         n_query - sum(len(frames[f]) for f in q_hard))
    query_f = q_hard + q_easy

    settings = DescriptorParams().model_dump()
    t0 = time.perf_counter()
    need = sorted(set(train_a) | set(train_c) | set(query_f))
    g_all, _ = compute_descriptors([frames[f] for f in need], ["Cu"], settings)
    desc_s = time.perf_counter() - t0
    starts = dict(zip(need, np.cumsum([0] + [len(frames[f]) for f in need])[:-1].tolist()))

    def rows(fs, limit):
        idx = np.concatenate([np.arange(starts[f], starts[f] + len(frames[f])) for f in fs])[:limit]
        return g_all[idx]

    g_query = rows(query_f, n_query)
    ct = np.concatenate([np.full(len(frames[f]), cts[f]) for f in query_f])[:n_query]
    out = {"read_s": read_s, "descriptors_s": desc_s, "n_features": int(g_all.shape[1]),
           "n_query_frames": len(query_f), "training_pool_frames": cut}
    for name, fs in (("all", train_a), ("crystals", train_c)):
        case = _hull_case(rows(fs, n_train), g_query, ct, n_check, seed)
        case["n_train_frames"] = len(fs)
        out[name] = case
    return out


def bench_index_hull(db: Path, training_split: str = "train", k: int = 5) -> dict:
    """What the index's ``time.hull_s`` is made of: the hull of the index's training atoms refitted
    from the descriptors stored in the index (float32 there), then a cold evaluate of every atom,
    phase by phase."""
    from mlipops.index.build import connect_read_only
    from mlipops.index.hull import INSIDE_TOL, fit_species_hull, hull_distance

    con = connect_read_only(db)
    try:
        t0 = time.perf_counter()
        tbl = con.sql("SELECT f.split, a.descriptor FROM atoms a JOIN frames f USING (frame_id) "
                      "WHERE a.species = 'Cu'").to_arrow_table()
    finally:
        con.close()
    col = tbl.column("descriptor").combine_chunks()
    g = col.values.to_numpy().reshape(len(col), -1).astype(np.float64)
    is_train = np.asarray(tbl.column("split").to_pylist()) == training_split
    out = {"load_s": time.perf_counter() - t0, "n_atoms": int(len(g)), "n_train_atoms": int(is_train.sum())}
    t0 = time.perf_counter()
    sh = fit_species_hull("Cu", g[is_train], k)
    out["fit_s"] = time.perf_counter() - t0
    out["n_extreme_points"] = int(len(sh.points))
    t0 = time.perf_counter()
    x = sh.project(g)
    out["project_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    solver = sh.solver()
    out["seed_facets_s"] = time.perf_counter() - t0
    out["n_seeded_facets"] = int(_n_facets(solver))
    t0 = time.perf_counter()
    gamma = solver.gamma(x)
    out["gamma_s"] = time.perf_counter() - t0
    out["gamma_us_per_atom"] = 1e6 * out["gamma_s"] / max(1, len(x))
    out["n_lp"] = int(solver.n_lp)
    outside = ~(gamma <= 1.0 + INSIDE_TOL)
    t0 = time.perf_counter()
    if outside.any():
        hull_distance(sh.points, x[outside])
    out["hull_distance_s"] = time.perf_counter() - t0
    out["n_outside"] = int(outside.sum())
    return out


# ---------------------------------------------------------------------------------------- main
def _row(name, value, target="", ok=None):
    return (name, value, target, "" if ok is None else ("yes" if ok else "NO"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=10000, help="frames of the synthetic dataset (10000)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mlipops-bench-index"),
                    help="dataset cache and stage working directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes for EMT labelling")
    ap.add_argument("--regenerate", action="store_true", help="rebuild the cached dataset")
    ap.add_argument("--train-atoms", type=int, default=100_000)
    ap.add_argument("--query-atoms", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per view (after one warm-up)")
    ap.add_argument("--skip-index-hull", action="store_true",
                    help="skip refitting the index's hull phase by phase (takes about as long as time.hull_s)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "index.json")
    args = ap.parse_args()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    result: dict = {"machine": machine_info(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(f"dataset: {args.frames} frames under {workdir} ...", flush=True)
    data, meta = build_dataset(workdir, args.frames, args.seed, args.jobs, args.regenerate)
    result["dataset"] = meta
    result["rss_before_pipeline_mib"] = peak_rss_mib()
    print(f"  {'cached' if meta['cached'] else 'generated'} ({meta['generation_wall_s']} s to generate); "
          "ingest / validate / index ...", flush=True)
    result["pipeline"] = pipe = bench_pipeline(data, workdir / "run")
    print("  views ...", flush=True)
    result["views"] = views = bench_views(Path(pipe["index_path"]), args.repeat)
    result["rss_after_views_mib"] = peak_rss_mib()
    if not args.skip_index_hull:
        print("  the index's hull phase by phase ...", flush=True)
        result["index_hull_phases"] = bench_index_hull(Path(pipe["index_path"]))
    print("  hull tests ...", flush=True)
    result["hull"] = hull = bench_hull(data, args.train_atoms, args.query_atoms, 200, args.seed)
    result["peak_rss_mib"] = peak_rss_mib()

    m = pipe["index_metrics"]
    n_atoms, n_frames = m["n_atoms"], m["n_accepted"]
    scale = f" ({n_frames} frames, {n_atoms} atoms)"
    phase_rows = []
    for k in ("time.read_s", "time.neighbour_lists_s", "time.geometry_s", "time.descriptors_s", "time.hull_s",
              "time.write_s"):
        phase_rows.append(_row(f"  {k[5:]}", f"{m[k]:.2f} s"))
        ih = result.get("index_hull_phases")
        if k == "time.hull_s" and ih:  # refitted outside the timed stage, phase by phase
            phase_rows += [
                _row(f"    refit: {ih['n_train_atoms']} train atoms -> {ih['n_extreme_points']} extreme pts",
                     f"{ih['fit_s']:.2f} s"),
                _row(f"    qhull facet seeding ({ih['n_seeded_facets']} facets)", f"{ih['seed_facets_s']:.2f} s"),
                _row(f"    gamma of {ih['n_atoms']} atoms ({ih['n_lp']} LPs)", f"{ih['gamma_s']:.2f} s"),
                _row(f"    hull_distance of {ih['n_outside']} outside atoms", f"{ih['hull_distance_s']:.2f} s"),
            ]
    rows = [
        _row("dataset generation + EMT (not timed)", f"{meta['generation_wall_s']:.1f} s"
             + (" (cached)" if meta["cached"] else "")),
        _row("ingest", f"{pipe['ingest_s']:.2f} s"),
        _row("validate (not in target)", f"{pipe['validate_s']:.2f} s"),
        _row("build_index", f"{pipe['index_s']:.2f} s"),
        *phase_rows,
        _row("ingest + descriptors + hull" + scale, f"{pipe['ingest_plus_descriptors_plus_hull_s']:.2f} s",
             "< 60 s", pipe["ingest_plus_descriptors_plus_hull_s"] < 60),
        _row("ingest + whole build_index", f"{pipe['ingest_plus_index_s']:.2f} s", "< 60 s",
             pipe["ingest_plus_index_s"] < 60),
        _row("  hull extreme points / LP solves",
             f"{m.get('hull.Cu.n_extreme_points')} / {m.get('hull.Cu.n_lp_solves')}"),
        _row("  fraction of val / test atoms outside",
             f"{m.get('fraction_val_atoms_outside_hull')} / {m.get('fraction_test_atoms_outside_hull')}"),
        _row("peak RSS after index", f"{pipe['rss_after_index_mib']:.0f} MiB"),
    ]
    for v in VIEWS:
        r = views[v]
        rows.append(_row(f"view {v} ({r['rows']} rows), one connection",
                         f"{1e3 * r['connection_median_s']:.1f} ms", "< 50 ms", r["connection_median_s"] < 0.05))
        rows.append(_row("  same via index.query() (new connection)", f"{1e3 * r['query_median_s']:.1f} ms",
                         "< 50 ms", r["query_median_s"] < 0.05))
    c = views["count_extrapolating_atoms"]
    rows += [_row(f"count(*) extrapolating_atoms (= {c['value']})", f"{1e3 * c['connection_median_s']:.1f} ms"
                  f" / {1e3 * c['query_median_s']:.1f} ms"),
             _row("  index.query('SELECT 1') (connection cost)", f"{1e3 * views['query_select_1_median_s']:.1f} ms")]
    for name, label in (("all", "train: all config types"), ("crystals", "train: crystal_* only")):
        h = hull[name]
        ph, ck = h["phases"], h["check"]
        rows += [
            _row(f"hull [{label}] fit: {h['n_train_atoms']} atoms -> {h['n_extreme_points']} extreme pts",
                 f"{h['fit_s']:.2f} s"),
            _row(f"  {h['n_query_atoms']} hull tests, cold evaluate()", f"{h['evaluate_s']:.2f} s", "< 10 s",
                 h["evaluate_s"] < 10),
            _row("  fit + evaluate", f"{h['fit_s'] + h['evaluate_s']:.2f} s", "< 10 s",
                 h["fit_s"] + h["evaluate_s"] < 10),
            _row("  outside / LP solves / seeded facets", f"{h['n_outside']} / {h['n_lp']} / {h['n_seeded_facets']}"),
            _row("  phase: qhull facet seeding", f"{ph['seed_facets_s']:.3f} s"),
            _row("  phase: gamma (cached facets + LPs)", f"{ph['gamma_s']:.3f} s"),
            _row(f"  phase: hull_distance ({ph['n_hull_distance']} outside)", f"{ph['hull_distance_s']:.3f} s"),
            _row(f"  max |γ - pure-LP γ| ({ck['n']} atoms, {ck['n_outside_in_sample']} outside)",
                 f"{ck['max_abs_diff_gamma']:.1e}", "< 1e-6", ck["max_abs_diff_gamma"] < 1e-6
                 and ck["n_inf_mismatch"] == 0 and ck["n_inside_mismatch"] == 0),
            _row("  pure LP per atom (cold HiGHS, no cache)", f"{ck['pure_lp_per_atom_ms']:.2f} ms"),
        ]
    rows.append(_row("peak RSS (whole run)", f"{result['peak_rss_mib']:.0f} MiB"))
    result["table"] = [dict(zip(("quantity", "measured", "target", "pass"), r)) for r in rows]
    w = [max(len(str(r[i])) for r in rows + [("quantity", "measured", "target", "pass")]) for i in range(4)]
    print(f"{'quantity':<{w[0]}}  {'measured':>{w[1]}}  {'target':<{w[2]}}  pass")
    for name, val, target, ok in rows:
        print(f"{name:<{w[0]}}  {val:>{w[1]}}  {target:<{w[2]}}  {ok}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
