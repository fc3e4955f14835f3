"""Pipeline benchmark: `dvc repro` from a fresh clone (wall time, peak memory), a no-op `dvc repro`,
per-stage wall times, and the potential's energy+forces speed on a 4,000-atom Cu cell vs ASE's EMT.

    .venv/bin/python benchmarks/bench_pipeline.py            # full pipeline on the embedded defaults
    .venv/bin/python benchmarks/bench_pipeline.py --skip-repro   # only the inference timing

Prints a table and writes reports/bench/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["generate", "ingest", "validate", "index", "train", "evaluate", "promote"]


def _env():
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def timed(cmd, cwd) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of a child process tree, via GNU time when available."""
    gnu_time = shutil.which("time") or "/usr/bin/time"
    if Path(gnu_time).exists():
        with tempfile.NamedTemporaryFile("r", suffix=".txt") as fh:
            t0 = time.perf_counter()
            subprocess.run([gnu_time, "-f", "%M", "-o", fh.name, *cmd], cwd=cwd, env=_env(), check=True,
                           stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            peak_kb = int(Path(fh.name).read_text().strip().splitlines()[-1])
        return wall, peak_kb / 2**20
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=_env(), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def bench_repro() -> dict:
    work = Path(tempfile.mkdtemp(prefix="mlipops-bench-"))
    repo = work / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    shared = ROOT.parent / "shared"
    if shared.exists():
        (work / "shared").symlink_to(shared)
    try:
        wall, peak = timed([sys.executable, "-m", "dvc", "repro"], repo)
        noop, noop_peak = timed([sys.executable, "-m", "dvc", "repro"], repo)
        stages = {s: json.loads((repo / "reports" / s / "metrics.json").read_text()).get("wall_time_s")
                  for s in STAGES}
        promote = json.loads((repo / "reports/promote/metrics.json").read_text())
        evaluate = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"repro_wall_s": wall, "repro_peak_rss_gib": peak, "noop_repro_wall_s": noop,
            "noop_peak_rss_gib": noop_peak, "stage_wall_s": stages, "promoted": promote.get("promoted"),
            "val_force_mae": evaluate.get("val.force_mae"),
            "val_energy_mae_per_atom": evaluate.get("val.energy_mae_per_atom")}


def bench_inference(n_repeat: int = 3) -> dict:
    """Energy+forces on fcc Cu 10x10x10 conventional cells (4,000 atoms): mlipops potential vs EMT."""
    import torch
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from mlipops.models import Potential
    from mlipops.params import load_params

    d = load_params(ROOT / "params.yaml").descriptors
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((10, 10, 10))
    atoms.rattle(0.02, seed=0)
    out = {"n_atoms": len(atoms), "torch_threads": torch.get_num_threads()}
    atoms.calc = EMT()
    t0 = time.perf_counter()
    for _ in range(n_repeat):
        atoms.calc.reset()
        atoms.get_forces()
    out["emt_s"] = (time.perf_counter() - t0) / n_repeat
    for dtype in (torch.float32, torch.float64):
        model = Potential(["Cu"], d.model_dump(), [32, 32]).to(dtype).eval()
        t0 = time.perf_counter()
        g = model.graph(atoms)
        out["neighbour_list_s"] = time.perf_counter() - t0
        batch = Potential.collate([g], dtype)
        model(batch, forces=True)  # warm-up
        t0 = time.perf_counter()
        for _ in range(n_repeat):
            model(Potential.collate([model.graph(atoms)], dtype), forces=True)
        name = str(dtype).split(".")[-1]
        out[f"mlipops_{name}_s"] = (time.perf_counter() - t0) / n_repeat
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-repro", action="store_true", help="only time inference")
    args = ap.parse_args()
    result = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "platform": platform.platform()}}
    if not args.skip_repro:
        result["pipeline"] = bench_repro()
    result["inference_4000_atoms"] = bench_inference()
    rows = []
    if "pipeline" in result:
        p = result["pipeline"]
        rows += [("dvc repro (fresh clone)", f"{p['repro_wall_s']:.1f} s", "< 1200 s"),
                 ("peak memory of dvc repro", f"{p['repro_peak_rss_gib']:.2f} GiB", "< 4 GiB"),
                 ("no-op dvc repro", f"{p['noop_repro_wall_s']:.2f} s", "< 10 s")]
        rows += [(f"  stage {s}", f"{t} s", "") for s, t in p["stage_wall_s"].items()]
        rows += [("val force MAE", f"{p['val_force_mae']:.4f} eV/Å", ""),
                 ("promoted (metrics.json: 0/1)", str(p["promoted"]), "1")]
    i = result["inference_4000_atoms"]
    rows += [("EMT energy+forces, 4000 atoms", f"{i['emt_s']:.3f} s", ""),
             ("mlipops float32 energy+forces", f"{i['mlipops_float32_s']:.3f} s", "< EMT"),
             ("mlipops float64 energy+forces", f"{i['mlipops_float64_s']:.3f} s", ""),
             ("  of which vesin neighbour list", f"{i['neighbour_list_s']:.3f} s", "")]
    width = max(len(r[0]) for r in rows)
    print(f"{'quantity':<{width}}  {'measured':>16}  target")
    for name, val, target in rows:
        print(f"{name:<{width}}  {val:>16}  {target}")
    out = ROOT / "reports" / "bench" / "pipeline.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
