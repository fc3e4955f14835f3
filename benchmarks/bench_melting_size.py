"""Finite-size study of the coexistence melting point (issue 23): lateral cross-section and slab length.

For each cell (``--cells``, default 4x4x8 5x5x8 6x6x8 4x4x12 4x4x16, conventional fcc cells of the reference
oracle's element, EMT Cu by default) runs ``--seeds`` seeds, each started above and below the guess, with the
converged protocol of :mod:`mlipops.evaluate.melting` (late window, extended while it drifts), all runs at once
through Dask (``compute`` params), and prints per cell: atoms, accepted seeds / runs converged, Tm at the cells'
own P_zz, P_zz, Tm at P = 0 (every run shifted with dTm/dP = Tm ΔV/L from one pure-solid / pure-liquid run of the
oracle at the first cell's Tm: :func:`~mlipops.evaluate.melting.phase_properties`), the two starts' mean
difference and the wall time. Settings other than the supercell come from ``evaluate.melting`` (``--preset``);
``--production-steps`` overrides production (and its maximum: 2x) for a short smoke run.

    .venv/bin/python benchmarks/bench_melting_size.py                              # the full study
    .venv/bin/python benchmarks/bench_melting_size.py --cells 4x4x8 --seeds 1 --production-steps 200   # minimal

Cost on this machine (2 workers, EMT): a 512-atom run of the quick preset is ~1 ms/atom-step of wall time per
worker under load; the full study (5 cells, 2 seeds x 2 starts, production preset, 1.3-3.4k atoms) is of the
order of hours here, minutes per cell on a cluster. Writes reports/bench/melting_size.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cell(text: str) -> tuple[int, int, int]:
    parts = tuple(int(x) for x in text.lower().split("x"))
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"a cell is NXxNYxNZ, e.g. 4x4x8 (got {text!r})")
    return parts


def _stored_run(d: dict):
    """A run of an earlier invocation (its ``summary()``) as a :class:`CoexistenceRun` without traces: enough
    for :func:`~mlipops.evaluate.melting.summarize`."""
    import numpy as np

    from mlipops.evaluate.melting import CoexistenceRun

    nan = float("nan")
    fields = set(CoexistenceRun.__dataclass_fields__)
    return CoexistenceRun(**{k: (nan if v is None and k not in ("rejected_reason", "converged", "order_calibration")
                                 else v) for k, v in d.items() if k in fields},
                          temperatures=np.zeros(0), times_fs=np.zeros(0), solid_fraction=np.zeros(0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=_cell, nargs="+", default=[(4, 4, 8), (5, 5, 8), (6, 6, 8), (4, 4, 12),
                                                              (4, 4, 16)])
    ap.add_argument("--seeds", type=int, default=2, help="seeds per cell (each runs above and below the guess)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="index of the first seed (seed = evaluate.melting.seed + 700 + index): with --append, "
                         "--first-seed 1 adds a second seed to a cell measured with one")
    ap.add_argument("--preset", choices=["quick", "production"], default="production")
    ap.add_argument("--production-steps", type=int, default=None, help="override (smoke runs)")
    ap.add_argument("--append", action="store_true",
                    help="keep the cells already in reports/bench/melting_size.json (same preset) and add these")
    args = ap.parse_args()
    os.chdir(ROOT)

    from dataclasses import replace

    import numpy as np

    from mlipops.evaluate.melting import clausius_clapeyron, phase_properties, summarize
    from mlipops.evaluate.melting_reference import OracleFactory, coexistence_specs, melting_crystal, run_many
    from mlipops.params import load_params
    from mlipops.report import jsonable, md_table

    p = load_params(ROOT / "params.yaml")
    m = p.evaluate.melting.model_copy(update={"preset": args.preset})
    element, lattice = melting_crystal(p)
    base = m.settings(element, lattice)
    if args.production_steps:
        base = replace(base, production_steps=args.production_steps,
                       max_production_steps=2 * args.production_steps).validate()
    factory = OracleFactory(p.generate.oracle.calculator, p.generate.oracle.kwargs)
    seeds = [m.seed + 700 + k for k in range(args.first_seed, args.first_seed + args.seeds)]
    rows, out, dtm_dp = [], {"element": element, "lattice": lattice, "preset": args.preset,
                             "production_steps": base.production_steps, "cells": []}, None
    path = ROOT / "reports/bench/melting_size.json"
    if args.append and path.is_file():  # a long study in parts: the earlier cells and their dTm/dP
        old = json.loads(path.read_text())
        if (old.get("element"), old.get("lattice"), old.get("preset"), old.get("production_steps")) != (
                element, lattice, args.preset, base.production_steps):
            raise SystemExit(f"--append: {path} holds another study ({old.get('element')} {old.get('lattice')}, "
                             f"preset {old.get('preset')}, production {old.get('production_steps')})")
        out, dtm_dp = old, old.get("dtm_dp_K_per_GPa")
    for cell in args.cells:
        s = replace(base, supercell=cell).validate()
        t0 = time.perf_counter()
        runs = run_many(coexistence_specs(factory, s, seeds), p.compute)
        wall = time.perf_counter() - t0
        earlier = [c for c in out["cells"] if c["supercell"] == list(cell)]
        if earlier:  # --append to a measured cell: its stored runs (scalars, no traces) join the new seeds
            done = {r["seed"] for c in earlier for r in c["runs"]}
            if done & set(seeds):
                raise SystemExit(f"--append: cell {cell} already has seeds {sorted(done & set(seeds))}; "
                                 "choose --first-seed past them")
            runs = [_stored_run(r) for c in earlier for r in c["runs"]] + list(runs)
            wall += sum(c["wall_s"] for c in earlier)
            out["cells"] = [c for c in out["cells"] if c["supercell"] != list(cell)]
        raw = summarize(runs, s.agree_sigma, require_agreement=s.require_agreement)
        if dtm_dp is None and any(r.accepted for r in runs):
            tm = float(np.mean([r.tm for r in runs if r.accepted]))
            ph = phase_properties(factory, s, tm, m.phase_steps, 1, seed=m.seed)
            dtm_dp = clausius_clapeyron(tm, ph["delta_v_A3_per_atom"], ph["latent_heat_eV_per_atom"],
                                        0.0)["dtm_dp_K_per_GPa"]
            out |= {"dtm_dp_K_per_GPa": dtm_dp, "latent_heat_eV_per_atom": ph["latent_heat_eV_per_atom"],
                    "delta_v_A3_per_atom": ph["delta_v_A3_per_atom"], "phases_at_K": tm}
        p0 = summarize(runs, s.agree_sigma, dtm_dp, s.require_agreement) if dtm_dp is not None else raw
        diffs = [sd.get("difference_K") for sd in p0["seeds"] if sd.get("difference_K") is not None]
        entry = {"supercell": list(cell), "n_atoms": runs[0].n_atoms, "wall_s": round(wall, 1),
                 "tm_raw": raw["tm_mean"], "tm_raw_stderr": raw["tm_stderr"], "n_accepted_raw": raw["n_accepted"],
                 "tm_p0": p0["tm_mean"], "tm_p0_stderr": p0["tm_stderr"], "n_accepted": p0["n_accepted"],
                 "n_seeds": len({r.seed for r in runs}), "n_runs_converged": p0["n_runs_converged"],
                 "n_runs": p0["n_runs"],
                 "pressure_zz_GPa": p0["pressure_zz_GPa"], "start_difference_K": diffs,
                 "runs": [r.summary() for r in runs]}
        out["cells"].append(entry)

        def f(v, e=None):
            return ("n/a" if v is None or not math.isfinite(v)
                    else (f"{v:.0f} ± {e:.0f}" if e is not None else f"{v:.2f}"))
        rows.append(("x".join(map(str, cell)), entry["n_atoms"], f"{raw['n_accepted']}/{entry['n_seeds']}",
                     f"{p0['n_runs_converged']}/{p0['n_runs']}", f(raw["tm_mean"], raw["tm_stderr"]),
                     f(p0["pressure_zz_GPa"]), f(p0["tm_mean"], p0["tm_stderr"]),
                     " ".join(f"{d:+.0f}" for d in diffs) or "-", f"{wall:.0f}"))
        print(rows[-1], flush=True)
        # written after every cell: a long study keeps what it has measured
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(jsonable(out), indent=2) + "\n")
    print(md_table(("cell", "atoms", "seeds accepted (at P_zz)", "runs converged", "Tm at P_zz (K)", "P_zz (GPa)",
                    "Tm at P = 0 (K)", "above − below (K)", "wall s"), rows))
    print(f"dTm/dP = {dtm_dp if dtm_dp is None else round(dtm_dp, 1)} K/GPa; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
