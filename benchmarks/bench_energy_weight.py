r"""The energy weight of the training loss, measured on real DFT (mlearn Mo) and on the embedded EMT copper.

The loss (``mlipops.train.loop.fit``) is ``w_E <(ΔE/N)²> + w_F <ΔF²>``: energy errors per atom (eV/atom)²,
force errors per Cartesian component (eV/Å)², each averaged over the batch; the validation score that picks the
best epoch uses the same weights. An energy error of 5 meV/atom weighs 2.5e-5 w_E against a force error of
0.1 eV/Å weighing 1e-2 w_F: with w_E = 1, w_F = 10 the forces outweigh the energy ~4000 times and DFT
energies, whose per-atom spread is tiny next to their force scale, are fitted last.

Mo: mlearn ``Mo_training.extxyz`` (PBE) split 90/10 by config_type (seed 0) into train / val,
``Mo_test.extxyz`` as test. Cu: the embedded dataset (``generate`` defaults: EMT copper), split by the
ingest rule of params.yaml (defects, surfaces, adatom and paths held out as test); the gates' metrics are the
val split's (every config_type trained on) and the test crystals/liquid: its gates are 0.02 eV/atom and
0.1 eV/Å. One member per run (no ensemble, no bootstrap), params.yaml's training settings but ``--epochs``
and patience off, energy weight in ``--weights``, force weight ``--force-weight``.

    .venv/bin/python benchmarks/bench_energy_weight.py                       # Mo and Cu, 4 weights, 400 epochs: ~30 min
    .venv/bin/python benchmarks/bench_energy_weight.py --elements Mo --weights 30 100 --seeds 1 2 \
        --out reports/bench/energy_weight_seeds.json
    .venv/bin/python benchmarks/bench_energy_weight.py --quick               # smoke run: numbers mean nothing

Prints a table; writes reports/bench/energy_weight.json (``--quick``: energy_weight_quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MLEARN = ROOT.parent / "shared" / "datasets" / "mlearn"
OUT = ROOT / "reports" / "bench"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import stratified_split  # noqa: E402  (the accuracy benchmark's split, per config_type)


def thin(frames, fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    keep = sorted(rng.choice(len(frames), max(4, int(round(fraction * len(frames)))), replace=False))
    return [frames[k] for k in keep]


def load(element: str, quick: bool, mlearn: Path = MLEARN) -> dict:
    from mlipops.frames import read_extxyz

    if element == "Cu":
        from mlipops.frames import frame_id
        from mlipops.generate.recipes import build_dataset
        from mlipops.ingest import assign_splits
        from mlipops.params import load_params

        p = load_params(ROOT / "params.yaml")
        frames, _ = build_dataset(p.generate)
        for a in frames:
            a.info["frame_id"] = frame_id(a)
        assign_splits(frames, p.ingest.split)
        split = {s: [a for a in frames if a.info["split"] == s] for s in ("train", "val", "test")}
        # the gates' test metrics: crystals and liquid (defects are held out; paths are the exit report's)
        split["test"] = [a for a in split["test"] if not str(a.info["config_type"]).startswith("path_")]
    else:
        tr, te = mlearn / f"{element}_training.extxyz", mlearn / f"{element}_test.extxyz"
        if not tr.is_file():
            raise SystemExit(f"{tr} missing: the mlearn data live in ../shared/datasets/mlearn/ (or pass --mlearn)")
        train, val = stratified_split(read_extxyz(tr)[0], 0.1, 0)
        split = {"train": train, "val": val, "test": read_extxyz(te)[0]}
    if quick:
        split = {k: thin(v, 0.15, 1) for k, v in split.items()}
    return split


def run_one(split: dict, weight: float, force_weight: float, epochs: int, seed: int) -> dict:
    import torch

    from mlipops.params import load_params
    from mlipops.train.loop import evaluate_split, fit, prepare

    p = load_params(ROOT / "params.yaml")
    tp = p.train.model_copy(update={"energy_weight": weight, "force_weight": force_weight, "epochs": epochs,
                                    "patience": None, "seed": seed, "device": "cpu"})
    t0 = time.perf_counter()
    res = fit(split["train"], split["val"], tp, p.descriptors)
    dtype = torch.float32 if tp.dtype == "float32" else torch.float64
    out = {"energy_weight": weight, "force_weight": force_weight, "epochs": epochs, "best_epoch": res.best_epoch,
           "time_s": round(time.perf_counter() - t0, 1)}
    for name in ("val", "test"):
        m = evaluate_split(res.model, prepare(res.model, split[name]), dtype, by_config=True)
        out[name] = {"energy_mae_meV_per_atom": 1e3 * m["energy_mae_per_atom"], "force_mae": m["force_mae"],
                     "by_config": {ct: {"energy_mae_meV_per_atom": 1e3 * mm["energy_mae_per_atom"],
                                        "force_mae": mm["force_mae"], "n_frames": mm["n_frames"]}
                                   for ct, mm in m["by_config"].items()}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--elements", nargs="+", default=["Mo", "Cu"])
    ap.add_argument("--weights", nargs="+", type=float, default=[1.0, 10.0, 30.0, 100.0])
    ap.add_argument("--cu-weights", nargs="+", type=float, default=None,
                    help="energy weights for Cu (default: --weights)")
    ap.add_argument("--force-weight", type=float, default=10.0)
    ap.add_argument("--epochs", type=int, default=400, help="params.yaml's train.epochs")
    ap.add_argument("--cu-epochs", type=int, default=None, help="Cu epochs (default: --epochs)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (one run per weight and seed)")
    ap.add_argument("--out", type=Path, default=None, help="JSON written (default reports/bench/energy_weight.json)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mlearn", type=Path, default=MLEARN, help="folder of the mlearn extxyz files")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.epochs = min(args.epochs, 3)
    import torch

    torch.set_num_threads(args.threads)
    result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": {}}
    path = args.out or OUT / ("energy_weight_quick.json" if args.quick else "energy_weight.json")
    for element in args.elements:
        split = load(element, args.quick, args.mlearn)
        weights = args.cu_weights if element == "Cu" and args.cu_weights else args.weights
        epochs = args.cu_epochs if element == "Cu" and args.cu_epochs else args.epochs
        result["runs"][element] = {"n_frames": {k: len(v) for k, v in split.items()}, "runs": []}
        for w, seed in ((w, sd) for w in weights for sd in args.seeds):
            r = run_one(split, w, args.force_weight, epochs, seed) | {"seed": seed}
            result["runs"][element]["runs"].append(r)
            print(f"{element} w_E {w:6g} w_F {args.force_weight:g} seed {seed}: "
                  f"test E {r['test']['energy_mae_meV_per_atom']:7.2f} "
                  f"meV/atom F {r['test']['force_mae']:.4f} eV/Å | val E {r['val']['energy_mae_meV_per_atom']:7.2f} "
                  f"F {r['val']['force_mae']:.4f} | best epoch {r['best_epoch']}/{epochs}, {r['time_s']:.0f} s",
                  flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1))
    print("\n| element | w_E | w_F | seed | test E MAE (meV/atom) | test F MAE (eV/Å) | val E MAE (meV/atom) | "
          "val F MAE (eV/Å) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for element, block in result["runs"].items():
        for r in block["runs"]:
            print(f"| {element} | {r['energy_weight']:g} | {r['force_weight']:g} | {r.get('seed', 0)} | "
                  f"{r['test']['energy_mae_meV_per_atom']:.2f} | {r['test']['force_mae']:.4f} | "
                  f"{r['val']['energy_mae_meV_per_atom']:.2f} | {r['val']['force_mae']:.4f} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
