"""Injected-error benchmark of the Cook's-distance outlier detector (``mlipops.quality.outliers``).

Takes a clean training set, corrupts k random frames in realistic ways and measures recall and
precision of the detector's quarantine decision, per kind of corruption, over several trials:

- ``energy_shift``: energy shifted by 0.05-1 eV/atom (a wrong reference, a mixed-up calculation);
- ``kcal_mol``: energy and forces in kcal/mol instead of eV (x 23.06);
- ``forces_swapped``: forces of another frame with the same number of atoms pasted in;
- ``forces_flipped``: every force sign-flipped (gradient instead of force);
- ``atom_displaced``: one atom moved by 0.2-0.5 Å without relabelling (stale labels).

    .venv/bin/python benchmarks/bench_outliers.py                # default EMT Cu set + mlearn Mo
    .venv/bin/python benchmarks/bench_outliers.py --trials 5 --k 10

Datasets: the default pipeline's training split (``data/curated/accepted.extxyz``, run
``dvc repro validate`` first) and the real DFT set ``../shared/datasets/mlearn/Mo_training.extxyz``
(skipped if absent). Only the outlier detector is measured here, not the great-expectations
checks in front of it (which catch some corruptions, e.g. kcal/mol energies, by range alone).
Prints a table and writes reports/bench/outliers.json.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["energy_shift", "kcal_mol", "forces_swapped", "forces_flipped", "atom_displaced"]


def _load(name: str):
    from mlipops.frames import read_extxyz

    if name == "cu_emt":
        path = ROOT / "data/curated/accepted.extxyz"
        if not path.is_file():
            return None, f"{path} missing: run `dvc repro validate`"
        frames, _ = read_extxyz(path)
        return [a for a in frames if a.info.get("split") == "train"], str(path)
    path = (ROOT / "../shared/datasets/mlearn/Mo_training.extxyz").resolve()
    if not path.is_file():
        return None, f"{path} missing"
    frames, _ = read_extxyz(path)
    return frames, str(path)


def _copy(frames):
    from mlipops.frames import labels, set_labels

    out = []
    for a in frames:
        b = a.copy()
        e, f, s = labels(a)
        set_labels(b, e, None if f is None else np.array(f, float), s)
        out.append(b)
    return out


def corrupt(frames, k: int, rng) -> dict[int, str]:
    """Corrupt k distinct frames in place; returns {index: kind}."""
    from mlipops.frames import labels, set_labels

    # force corruptions only where there are forces to corrupt: flipping the exactly-zero forces of a
    # perfect crystal changes nothing and is not an error
    forced = [i for i, a in enumerate(frames) if np.abs(labels(a)[1]).max() > 0.05]
    kinds = [KINDS[q % len(KINDS)] for q in range(min(k, len(frames)))]
    n_force = sum(kd in ("forces_swapped", "forces_flipped") for kd in kinds)
    fidx = list(rng.choice(forced, size=min(n_force, len(forced)), replace=False))
    rest = [i for i in range(len(frames)) if i not in fidx]
    eidx = list(rng.choice(rest, size=len(kinds) - len(fidx), replace=False))
    idx = []
    for kd in kinds:
        idx.append(int(fidx.pop()) if kd in ("forces_swapped", "forces_flipped") and fidx else int(eidx.pop()))
    done = {}
    for kind, i in zip(kinds, idx):
        a = frames[i]
        e, f, s = labels(a)
        if kind == "energy_shift":
            set_labels(a, e + rng.uniform(0.05, 1.0) * rng.choice([-1, 1]) * len(a), f, s)
        elif kind == "kcal_mol":
            set_labels(a, e * 23.0605, f * 23.0605, s)
        elif kind == "forces_swapped":
            others = [j for j, b in enumerate(frames) if j != i and len(b) == len(a) and j not in idx]
            if not others:
                kind = "forces_flipped"
                set_labels(a, e, -f, s)
            else:
                set_labels(a, e, labels(frames[int(rng.choice(others))])[1].copy(), s)
        elif kind == "forces_flipped":
            set_labels(a, e, -f, s)
        else:
            j = int(rng.integers(len(a)))
            d = rng.normal(size=3)
            a.positions[j] += rng.uniform(0.2, 0.5) * d / np.linalg.norm(d)
        done[int(i)] = kind
    return done


def run_dataset(name: str, trials: int, k: int, seed: int) -> dict:
    from mlipops.params import DescriptorParams
    from mlipops.quality.outliers import detect

    clean, path = _load(name)
    if clean is None:
        return {"skipped": path}
    species = sorted({s for a in clean for s in a.get_chemical_symbols()})
    settings = DescriptorParams().model_dump()
    t0 = time.perf_counter()
    base = detect(_copy(clean), species, settings).frames
    clean_s = time.perf_counter() - t0
    out = {"path": path, "n_frames": len(clean), "n_atoms": int(sum(len(a) for a in clean)),
           "false_positives_on_clean": int(base["quarantine"].sum()), "detect_clean_s": round(clean_s, 2),
           "trials": []}
    tp = fp = fn = 0
    per_kind = {kd: [0, 0] for kd in KINDS}  # found, injected
    for t in range(trials):
        rng = np.random.default_rng(seed + t)
        frames = _copy(clean)
        injected = corrupt(frames, k, rng)
        rep = detect(frames, species, settings).frames
        flagged = set(np.flatnonzero(rep["quarantine"].to_numpy()).tolist())
        hit = flagged & set(injected)
        tp += len(hit)
        fp += len(flagged - set(injected))
        fn += len(set(injected) - flagged)
        for i, kd in injected.items():
            per_kind[kd][1] += 1
            per_kind[kd][0] += int(i in flagged)
        out["trials"].append({"seed": seed + t, "injected": {str(i): kd for i, kd in injected.items()},
                              "flagged": sorted(int(i) for i in flagged)})
    out["recall"] = tp / max(tp + fn, 1)
    out["precision"] = tp / max(tp + fp, 1)
    out["per_kind_recall"] = {kd: (f / n if n else None) for kd, (f, n) in per_kind.items()}
    out["per_kind_counts"] = {kd: f"{f}/{n}" for kd, (f, n) in per_kind.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--k", type=int, default=10, help="corrupted frames per trial")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--datasets", nargs="+", default=["cu_emt", "mo_mlearn"])
    args = ap.parse_args()
    results = {name: run_dataset(name, args.trials, args.k, args.seed) for name in args.datasets}
    print(f"{'dataset':10s} {'frames':>7s} {'clean FP':>8s} {'recall':>7s} {'precision':>9s}  per-kind recall")
    for name, r in results.items():
        if "skipped" in r:
            print(f"{name:10s} skipped: {r['skipped']}")
            continue
        kinds = ", ".join(f"{kd} {c}" for kd, c in r["per_kind_counts"].items())
        print(f"{name:10s} {r['n_frames']:7d} {r['false_positives_on_clean']:8d} {r['recall']:7.3f} "
              f"{r['precision']:9.3f}  {kinds}")
    out = ROOT / "reports/bench/outliers.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "args": vars(args), "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
