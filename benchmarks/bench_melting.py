"""Cost of the melting-point presets: the coexistence runs of one seed per calculator, timed, per preset.

For each preset (``evaluate.melting.quick`` / ``.production`` of params.yaml) runs ``--seeds`` seeds, each from
both starts (above and below the guess, as the stages do), with the reference oracle (EMT) and with ensemble
member 0 of ``data/models/<train.model_name>`` (run ``dvc repro train`` first), all at once through Dask
(``compute`` params: 2 workers on this machine), and prints per run: atoms, MD steps (calibration, then melt +
equilibration + production of every attempt, extensions included), wall time, ms per atom-step, Tm ± block
error. The stage's full cost follows from the seed counts of the preset (reported as ``stage_estimate_s``: both
starts of every seed packed onto the workers, plus the reference's phase runs at ``phase_steps``).

    .venv/bin/python benchmarks/bench_melting.py                       # quick and production, 1 seed each
    .venv/bin/python benchmarks/bench_melting.py --preset production --seeds 2

Writes reports/bench/melting.json (merged per preset).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["quick", "production"], action="append", default=None)
    ap.add_argument("--seeds", type=int, default=1, help="runs per calculator and preset")
    ap.add_argument("--member", type=int, default=0, help="ensemble member to run")
    args = ap.parse_args()
    os.chdir(ROOT)

    from mlipops.evaluate.melting import STARTS
    from mlipops.evaluate.melting_reference import MemberFactory, OracleFactory, coexistence_specs, run_many
    from mlipops.params import load_params
    from mlipops.report import jsonable, md_table

    p = load_params(ROOT / "params.yaml")
    m = p.evaluate.melting
    model_dir = ROOT / "data/models" / p.train.model_name
    if not (model_dir / "config.json").is_file():
        print(f"no trained model in {model_dir}: run `dvc repro train` first", file=sys.stderr)
        return 2
    workers = p.compute.n_workers or min(2, os.cpu_count() or 1)
    out_json = ROOT / "reports/bench/melting.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    rows = []
    for preset in args.preset or ["quick", "production"]:
        mp = m.model_copy(update={"preset": preset})
        s = mp.settings(p.generate.element)
        pr = getattr(mp, preset)
        calcs = {"reference (EMT)": OracleFactory(p.generate.oracle.calculator, p.generate.oracle.kwargs),
                 f"member {args.member}": MemberFactory(model_dir, args.member)}
        specs = [sp for name, f in calcs.items()
                 for sp in coexistence_specs(f, s, [m.seed + 500 + k for k in range(args.seeds)], name=name)]
        t0 = time.perf_counter()
        runs = run_many(specs, p.compute)
        wall = time.perf_counter() - t0
        entry = {"preset": preset, "supercell": list(s.supercell), "seeds": args.seeds, "workers": workers,
                 "wall_s": round(wall, 1), "runs": []}
        per_run = {}
        for sp, r in zip(specs, runs):
            steps = s.calibration_md_steps() + sum(s.melt_steps + s.equilibration_steps
                                                   + (h.get("production_steps") or 0)
                                                   for h in r.history) if r.history else \
                (s.melt_steps + s.equilibration_steps + s.production_steps) * r.attempts
            ms = 1000 * r.wall_s / max(1, steps * r.n_atoms)
            entry["runs"].append({"calculator": sp["name"], "seed": sp["seed"], "start": sp["start"],
                                  "n_atoms": r.n_atoms, "steps": steps,
                                  "attempts": r.attempts, "wall_s": round(r.wall_s, 1), "ms_per_atom_step": ms,
                                  "tm": r.tm, "tm_stderr": r.tm_stderr, "coexisting": r.coexisting,
                                  "rejected_reason": r.rejected_reason})
            per_run.setdefault(sp["name"], []).append(r.wall_s)  # as run: calibration, retries, extensions
            rows.append((preset, f"{sp['name']} {'above' if sp['start'] > 0 else 'below'}", r.n_atoms, steps,
                         f"{r.wall_s:.0f}", f"{ms:.3f}",
                         f"{r.tm:.0f} ± {r.tm_stderr:.0f}" if math.isfinite(r.tm) else "-",
                         "yes" if r.coexisting else r.rejected_reason))
        # the stages: reference seeds (then its two phase runs, ~ phase_steps * 2 * 108 atoms, one worker) and
        # members x member_seeds, each seed from both starts (STARTS), packed onto the workers; a run costs what
        # these runs cost, retries and extensions included
        ref_t = sum(per_run["reference (EMT)"]) / len(per_run["reference (EMT)"])
        mem_t = sum(per_run[f"member {args.member}"]) / len(per_run[f"member {args.member}"])
        n_members = p.train.ensemble.members
        phase_t = ref_t / (s.melt_steps + s.equilibration_steps + s.production_steps) / entry["runs"][0]["n_atoms"] \
            * (2 * mp.phase_steps + s.melt_steps) * 108 * 1.5  # NPT rebuilds EMT's neighbour list each step
        entry["stage_estimate_s"] = {
            "melting_reference": round(math.ceil(pr.reference_seeds * len(STARTS) / workers) * ref_t + phase_t),
            "melting": round(math.ceil(n_members * pr.member_seeds * len(STARTS) / workers) * mem_t)}
        results[preset] = entry
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(jsonable(results), indent=2) + "\n")
    print(md_table(("preset", "calculator", "atoms", "MD steps", "wall s", "ms/atom-step", "Tm (K)", "coexisting"),
                   rows))
    for preset, e in results.items():
        print(f"{preset}: stage estimates {e['stage_estimate_s']} (s, {e['workers']} workers)")
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
