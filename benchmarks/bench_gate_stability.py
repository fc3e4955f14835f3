"""Gate stability: does a default promotion gate pass or fail by chance?

Reruns the whole default pipeline (`dvc repro promote`) from `generate` in fresh clones of this
repository, once per seed (every seed of params.yaml set to it: data, split, training, defects
control, melting, NVE) and once with the default seed under a restricted CPU (numpy's SIMD dispatch
off, OpenBLAS pinned to an old kernel: what another machine looks like to floating point). Each run's
evaluation reports are kept under ``reports/bench/gate_stability/<run>/``; the gates are evaluated
on every run with the promotion code of this checkout and ``promote.gates`` of its params.yaml.

Per gate it reports the metric over the runs, its spread (standard deviation over the runs) and the
worst margin: the smallest distance to the threshold on the passing side (negative: a run failed),
in units of the spread. A gate is *stable* when every run passes it and its worst margin exceeds the
spread of its metric over the runs (the issue's criterion; the table shows how many spreads).

    .venv/bin/python benchmarks/bench_gate_stability.py --seeds 1 2 3 --restricted 0
    .venv/bin/python benchmarks/bench_gate_stability.py --keep seed0 .       # add this checkout's `make repro`
    .venv/bin/python benchmarks/bench_gate_stability.py --analyse-only      # re-evaluate stored runs

Prints a table and writes reports/bench/gate_stability.json. A run takes about the time of
`make repro` (15–20 min on 2 cores); runs go one after another.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports/bench/gate_stability"
SEED_KEYS = [("generate", "seed"), ("ingest", "split", "seed"), ("train", "seed"),
             ("evaluate", "defects", "control_seed"), ("evaluate", "nve", "seed"), ("evaluate", "melting", "seed")]


def _restricted_env() -> dict:
    code = ("from numpy._core._multiarray_umath import __cpu_dispatch__ as d, __cpu_features__ as f;"
            "print(' '.join(x for x in d if f.get(x)))")
    feats = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    return {"NPY_DISABLE_CPU_FEATURES": " ".join(feats), "OPENBLAS_CORETYPE": "Prescott"}


def _set_seeds(params_file: Path, seed: int) -> None:
    params = yaml.safe_load(params_file.read_text())
    for keys in SEED_KEYS:
        d = params
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = seed + (1234 if keys[-1] == "control_seed" else 0)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def run_one(name: str, seed: int, restricted: bool) -> dict:
    """One `dvc repro promote` in a fresh clone; keeps its reports/evaluate and promote outputs."""
    work = Path(tempfile.mkdtemp(prefix=f"mlipops-gates-{name}-"))
    repo = work / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    if (ROOT.parent / "shared").exists():
        (work / "shared").symlink_to(ROOT.parent / "shared")
    if seed != 0:
        _set_seeds(repo / "params.yaml", seed)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(repo / "src")  # the clone's code, not this checkout's (the venv's install is editable)
    if restricted:
        env |= _restricted_env()
    t0 = time.perf_counter()
    log = OUT / f"{name}.log"
    OUT.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        rc = subprocess.run([sys.executable, "-m", "dvc", "repro", "promote"], cwd=repo, env=env,
                            stdout=fh, stderr=subprocess.STDOUT).returncode
    info = keep_run(name, repo, seed=seed, restricted_simd=restricted, returncode=rc,
                    wall_s=round(time.perf_counter() - t0, 1),
                    env={k: env[k] for k in ("NPY_DISABLE_CPU_FEATURES", "OPENBLAS_CORETYPE") if k in env})
    shutil.rmtree(work, ignore_errors=True)
    return info


def keep_run(name: str, project: Path, **info) -> dict:
    """Copy a finished project's reports (no plots) to ``OUT/name`` with what is known of the run."""
    from mlipops.frames import file_md5

    dest = OUT / name
    shutil.rmtree(dest, ignore_errors=True)
    for sub in ("reports/evaluate", "reports/promote", "reports/train", "reports/validate", "reports/generate"):
        if (project / sub).is_dir():
            shutil.copytree(project / sub, dest / sub, ignore=shutil.ignore_patterns("*.png"))
    info = {"name": name, **info}
    gen = project / "data/raw/cu_emt.extxyz"
    if gen.is_file():
        info["generate_md5"] = file_md5(gen)
    (dest / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _rederive_melting(eval_dir: Path, window: float) -> None:
    """The melting gate's metrics recomputed from the run's member and reference numbers with this
    checkout's formula and ``evaluate.melting.window_K`` (a run made before a change of either is judged by
    the current ones; the members' and the reference's Tm do not depend on them)."""
    import numpy as np

    from mlipops.evaluate.melting_stage import bias_significance

    mp, mj = eval_dir / "melting/metrics.json", eval_dir / "melting/melting_point.json"
    if not (mp.is_file() and mj.is_file()):
        return
    m, rep = json.loads(mp.read_text()), json.loads(mj.read_text())
    members = [pm for pm in rep.get("members", []) if pm.get("tm_mean") is not None]
    if m.get("bias") is None or not members:
        return
    n_ref = int((rep.get("reference") or {}).get("n_accepted") or 2)
    m |= bias_significance(m["bias"], np.array([pm["tm_mean"] for pm in members]),
                           np.array([pm["tm_stderr"] for pm in members]), m["tm_ref_stderr"], window, n_ref)
    m["window_K"] = window
    mp.write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")


def _gate_rows(run_dir: Path) -> list[dict]:
    """The gates of this checkout's params on one run's stored reports (threshold logic only: a run's
    reports are its own model's by construction)."""
    from mlipops.params import load_params
    from mlipops.promote.gates import check_gates

    p = load_params(ROOT / "params.yaml")
    _rederive_melting(run_dir / "reports/evaluate", p.evaluate.melting.window_K)
    return check_gates(p.promote.gates, run_dir / "reports/evaluate")


def analyse() -> dict:
    runs = sorted(d for d in OUT.iterdir() if (d / "run.json").is_file()) if OUT.is_dir() else []
    per_gate: dict[tuple, dict] = {}
    infos = []
    for d in runs:
        infos.append(json.loads((d / "run.json").read_text()))
        for r in _gate_rows(d):
            g = per_gate.setdefault((r["gate"], r["bound"]), {"gate": r["gate"], "bound": r["bound"],
                                                               "threshold": r["threshold"], "values": {}})
            v = r["value"]
            g["values"][d.name] = (v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                   else None)
    rows = []
    for g in per_gate.values():
        vals = [v for v in g["values"].values() if v is not None]
        thr = g["threshold"]
        sign = 1.0 if g["bound"] == "min" else -1.0
        margins = [sign * (v - thr) for v in vals] if thr is not None else []
        spread = float(_std(vals)) if len(vals) > 1 else float("nan")
        worst = min(margins) if margins else float("nan")
        g |= {"n_runs": len(g["values"]), "n_finite": len(vals),
              "mean": sum(vals) / len(vals) if vals else None, "spread": spread, "worst_margin": worst,
              "worst_margin_in_spreads": worst / spread if spread and spread > 0 else (math.inf if worst > 0 else None),
              "all_pass": bool(margins) and all(m >= 0 for m in margins) and len(vals) == len(g["values"])}
        g["stable"] = bool(g["all_pass"] and (g["worst_margin_in_spreads"] is None or g["worst_margin_in_spreads"] > 1))
        rows.append(g)
    rows.sort(key=lambda g: (g["stable"],
                             g["worst_margin_in_spreads"] if g["worst_margin_in_spreads"] is not None else 0))
    info = {}
    for key in INFO:  # the numbers behind the melting gate, over the runs
        report, _, metric = key.rpartition(":")
        vals = {}
        for d in runs:
            f = d / "reports/evaluate" / report / "metrics.json"
            vals[d.name] = json.loads(f.read_text()).get(metric) if f.is_file() else None
        xs = [v for v in vals.values() if isinstance(v, (int, float))]
        info[key] = {"values": vals, "mean": sum(xs) / len(xs) if xs else None,
                     "spread": _std(xs) if len(xs) > 1 else None}
    return {"runs": infos, "gates": rows, "info": info}


INFO = ["melting:tm_ref", "melting:tm_ref_stderr", "melting:tm_mean", "melting:tm_std", "melting:bias",
        "melting:bias_combined_se", "melting:bias_t_factor", "melting:bias_bound_K"]


def _std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _fmt(x, digits=4):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3])
    ap.add_argument("--restricted", type=int, nargs="*", default=[0], help="seeds to run with restricted SIMD")
    ap.add_argument("--analyse-only", action="store_true")
    ap.add_argument("--keep", nargs=2, action="append", default=[], metavar=("NAME", "PROJECT"),
                    help="add a project that already ran `make repro` (e.g. this checkout: seed 0) as run NAME; "
                         "NAME ending in -restricted marks a restricted-SIMD run")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    for name, project in a.keep:
        print(keep_run(name, Path(project).resolve(), seed=0, restricted_simd=name.endswith("-restricted"),
                       returncode=0, wall_s=None), flush=True)
    if a.keep:
        a.analyse_only = True
    if not a.analyse_only:
        for s in a.seeds:
            print(run_one(f"seed{s}", s, False), flush=True)
        for s in a.restricted:
            print(run_one(f"seed{s}-restricted", s, True), flush=True)
    res = analyse()
    print(f"{'gate':58s} {'bound':5s} {'thr':>8s} {'mean':>9s} {'spread':>9s} {'worst margin':>12s} "
          f"{'/spread':>8s} stable")
    for g in res["gates"]:
        print(f"{g['gate'][:58]:58s} {g['bound']:5s} {_fmt(g['threshold']):>8s} {_fmt(g['mean']):>9s} "
              f"{_fmt(g['spread']):>9s} {_fmt(g['worst_margin']):>12s} {_fmt(g['worst_margin_in_spreads'], 3):>8s} "
              f"{'yes' if g['stable'] else 'NO'}")
    for key, v in res["info"].items():
        print(f"{key:40s} " + "  ".join(f"{n}={_fmt(x)}" for n, x in v["values"].items())
              + f"   spread {_fmt(v['spread'])}")
    for r in res["runs"]:
        print(f"run {r['name']}: exit {r['returncode']}, {r['wall_s']} s, generate md5 {r.get('generate_md5')}")
    path = ROOT / "reports/bench/gate_stability.json"
    path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
