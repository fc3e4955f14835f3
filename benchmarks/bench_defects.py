"""Perfect → imperfect transfer on the embedded EMT copper and on real DFT molybdenum (mlearn).

Runs ``mlipops.evaluate.defects.transfer`` twice and prints one table:

* **Cu (EMT)**: the curated pipeline data (``data/curated/accepted.extxyz``, run ``dvc repro validate``
  first) with the ``evaluate.defects`` params of params.yaml: perfect = the five crystal structures of the
  train split, imperfect = vacancy cells, (100)/(110)/(111) slabs, adatoms; control = new rattled vacancy
  cells and slabs labelled by EMT.
* **Mo (PBE, mlearn)**: ``Mo_training.extxyz`` + ``Mo_test.extxyz`` from ``../shared/datasets/mlearn``;
  perfect = ``Elastic`` + ``AIMD-NVT`` at or below 500 K, imperfect = ``Vacancy`` (300 K and 6000 K AIMD)
  + ``Surface``; there is no oracle for new DFT labels, so the control is ``held_out``: the imperfect frames
  are split in two by content hash, the recommended config_types of one half join training and the other
  half is the test. Coordination cutoff 2.95 Å (bcc Mo: first shell 2.73 Å, second 3.15 Å).

Same architecture and training settings as params.yaml (``train``, ``descriptors``), single potentials,
``evaluate.defects.epochs`` epochs each. Writes reports/bench/defects.json and the full reports (summary.md,
plots) under reports/bench/defects_cu/ and reports/bench/defects_mo/.

    .venv/bin/python benchmarks/bench_defects.py              # both, about 3 min on a quiet 2-core machine
    .venv/bin/python benchmarks/bench_defects.py --only Mo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MLEARN = (ROOT / "../shared/datasets/mlearn").resolve()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["Cu", "Mo"], default=None)
    ap.add_argument("--epochs", type=int, default=None, help="override evaluate.defects.epochs")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when sharing the cores)")
    args = ap.parse_args()

    import os

    os.chdir(ROOT)
    import torch

    torch.set_num_threads(args.threads)
    from mlipops.evaluate import defects as dx
    from mlipops.frames import read_extxyz
    from mlipops.params import load_params
    from mlipops.report import jsonable, md_table

    params = load_params(ROOT / "params.yaml")
    p = params.evaluate.defects
    if args.epochs:
        p = p.model_copy(update={"epochs": args.epochs})
    out_json = ROOT / "reports/bench/defects.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    cases = []
    if args.only in (None, "Cu"):
        frames, _ = read_extxyz(ROOT / "data/curated/accepted.extxyz")
        cases.append(("Cu", frames, p, params.index, params.generate))
    if args.only in (None, "Mo"):
        if not (MLEARN / "Mo_training.extxyz").is_file():
            print(f"skip Mo: {MLEARN} not found", file=sys.stderr)
        else:
            frames = []
            for f in ("Mo_training.extxyz", "Mo_test.extxyz"):
                frames += read_extxyz(MLEARN / f)[0]
            pm = p.model_copy(update={"perfect_config_types": ["Elastic", "AIMD-NVT"],
                                      "imperfect_config_types": ["Vacancy", "Surface"],
                                      "perfect_max_temperature_K": 500.0, "control": "held_out"})
            ip = params.index.model_copy(update={"coordination_cutoff": 2.95})
            cases.append(("Mo", frames, pm, ip, None))
    rows = []
    for name, frames, pp, ip, g in cases:
        t0 = time.perf_counter()
        rep = dx.transfer(frames, pp, params.train, params.descriptors, ip, g)
        wall = time.perf_counter() - t0
        out_dir = ROOT / f"reports/bench/defects_{name.lower()}"
        metrics = dx.write_report(rep, out_dir, f"Perfect → imperfect transfer: {name}")
        results[name] = {"wall_time_s": round(wall, 1), "metrics": metrics, "conclusion": rep.conclusion,
                         "recommendations": rep.recommendations, "control": rep.control,
                         "settings": pp.model_dump() | {"coordination_cutoff": ip.coordination_cutoff}}
        for ct, d in rep.diagnosis.items():
            pc = rep.control.get("per_config_type", {}).get(ct, {})
            rows.append((name, ct, d["n_atoms"], d["force_mae_atom"], 1000 * d["energy_mae_per_atom"],
                         d["atoms"].get("share_z"), d["atoms"].get("share_angle"), d["fraction_outside_hull"],
                         pc.get("force_mae_atom_after", float("nan")),
                         1000 * pc.get("energy_mae_per_atom_after", float("nan"))))
        print(f"{name}: {wall:.0f} s", file=sys.stderr)
        for line in rep.conclusion:
            print("  " + line, file=sys.stderr)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(jsonable(results), indent=2) + "\n")
    print(md_table(("data", "config_type", "atoms", "|ΔF_i| (eV/Å)", "E (meV/atom)", "share z", "share angle",
                    "outside hull", "|ΔF_i| control", "E control"), rows))
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
