"""CUDA check and timing of the potential: energy + forces (+ stress) and a training step on the GPU
against the CPU, and that both give the same numbers.

    python benchmarks/bench_cuda.py                      # model from data/models/cu if present
    python benchmarks/bench_cuda.py --model registry/cu/v1 --sizes 4000 32000

Runs on a machine without a GPU too (CPU rows only). Prints a table and writes
reports/bench/cuda.json (and $OUT/cuda.json when $OUT is set, for a remote device run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median(fn, device: str, repeat: int = 5) -> float:
    fn()  # warm-up (kernels, allocator)
    _sync(device)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _cell(n_atoms: int, seed: int = 0):
    from ase.build import bulk

    reps = max(1, round((n_atoms / 4) ** (1 / 3)))
    a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(reps)
    a.rattle(0.05, seed=seed)
    return a


def _model(path: str | None):
    from mlipops.models import Potential

    if path and (Path(path) / "weights.pt").is_file():
        from mlipops.models.ensemble import load_model

        return load_model(path, dtype=torch.float64), path
    from mlipops.params import DescriptorParams

    torch.manual_seed(0)
    return Potential(["Cu"], DescriptorParams().model_dump(), [32, 32]).double().eval(), "untrained (seed 0)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "data/models/cu"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[4000, 32000])
    args = ap.parse_args()

    from mlipops.models import Potential

    base, source = _model(args.model)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows, out = [], {"model": source, "torch": torch.__version__, "platform": platform.platform(),
                     "cpu_threads": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                     "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "results": {}}
    for n in args.sizes:
        atoms = _cell(n)
        graph = base.graph(atoms)
        ref = {}
        for dev in devices:
            for dtype in (torch.float64, torch.float32):  # float64 first: the reference
                m = _copy(base, dtype, dev)
                batch = Potential.collate([graph], dtype, dev)

                def run():
                    return m(batch, forces=True, stress=True)

                t = _median(run, dev)
                res = run()
                e, f = float(res["energy"][0].detach()), res["forces"].detach().double().cpu().numpy()
                key = f"{dev}/{str(dtype).split('.')[-1]}/{len(atoms)}"
                if dev == "cpu" and dtype == torch.float64:
                    ref = {"e": e, "f": f}
                diff_e = abs(e - ref["e"]) / len(atoms) if ref else float("nan")
                diff_f = float(np.abs(f - ref["f"]).max()) if ref else float("nan")
                out["results"][key] = {"energy_forces_stress_s": t, "atoms_per_s": len(atoms) / t,
                                       "d_energy_per_atom_vs_cpu64": diff_e, "max_d_force_vs_cpu64": diff_f}
                rows.append((f"E+F+stress {len(atoms)} atoms", dev, str(dtype).split(".")[-1], f"{t * 1e3:.1f} ms",
                             f"{diff_e:.1e} eV/atom, {diff_f:.1e} eV/Å"))
    # one training step (energy + force loss, double backward) on 8 frames of 108 atoms
    frames = [_cell(108, seed=s) for s in range(8)]
    for dev in devices:
        m = _copy(base, torch.float32, dev).train()
        batch = Potential.collate([m.graph(a) for a in frames], torch.float32, dev)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)

        def step():
            opt.zero_grad()
            res = m(batch, forces=True, create_graph=True)
            loss = (res["energy"] ** 2).mean() + (res["forces"] ** 2).mean()
            loss.backward()
            opt.step()

        t = _median(step, dev)
        out["results"][f"{dev}/train_step/8x108"] = {"step_s": t}
        rows.append(("train step, 8 frames x 108 atoms", dev, "float32", f"{t * 1e3:.1f} ms", ""))
    print(f"model: {source}; torch {torch.__version__}; GPU: {out['gpu']}")
    print(f"{'quantity':40s} {'device':6s} {'dtype':8s} {'time':>10s}  agreement with CPU float64")
    for r in rows:
        print(f"{r[0]:40s} {r[1]:6s} {r[2]:8s} {r[3]:>10s}  {r[4]}")
    for d in [ROOT / "reports/bench"] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
        d.mkdir(parents=True, exist_ok=True)
        (d / "cuda.json").write_text(json.dumps(out, indent=2) + "\n")


def _copy(model, dtype, device):
    import copy

    return copy.deepcopy(model).to(dtype=dtype, device=device).eval()


if __name__ == "__main__":
    main()
