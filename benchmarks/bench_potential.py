"""Speed of the mlipops potential: energy + forces of fcc Cu cells, side by side with ASE's EMT.

For each cell (256, 1,000 and 4,000 atoms by default; add e.g. ``--sizes 100000`` on a GPU) and each
device (CPU, and CUDA when present):

- ``call``: a full calculator call from scratch (neighbour list by vesin + descriptors + networks +
  backward for the forces), in ms and atom-steps per second;
- ``md step``: the same with the neighbour list reused (a Verlet list with a skin, as
  ``MlipopsCalculator(skin=...)`` does in MD: the list is rebuilt only every few tens of steps);
- a profile of one call: neighbour list, descriptor forward, network forward, backward;
- the 5-member ensemble (descriptors shared by the members) when the model is one;
- EMT on the same cell (CPU), the reference oracle of the default data.

    .venv/bin/python benchmarks/bench_potential.py                       # 256, 1000, 4000 atoms
    .venv/bin/python benchmarks/bench_potential.py --sizes 4000 32000 108000 --dtype float32

The model is ``data/models/cu`` (``dvc repro train``), or an untrained one of the default
architecture if absent (speed does not depend on the weights). Prints a table and writes
reports/bench/potential.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def cell(n: int):
    """fcc Cu with about n atoms: cubic 4·k³ cells, or the primitive cell repeated (1,000 = 10³)."""
    from ase.build import bulk

    k = round((n / 4) ** (1 / 3))
    if 4 * k**3 == n:
        a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(k)
    else:
        k = round(n ** (1 / 3))
        a = bulk("Cu", "fcc", a=3.61).repeat(k)
    a.rattle(0.05, seed=0)
    return a


def load(path: Path):
    from mlipops.models import Ensemble, Potential, load_model

    if (path / "weights.pt").is_file():
        m = load_model(path, dtype=torch.float64)
        src = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    else:
        from mlipops.params import load_params

        d = load_params(ROOT / "params.yaml").descriptors
        torch.manual_seed(0)
        m = Potential(["Cu"], d.model_dump(), [32, 32]).double().eval()
        src = "untrained default architecture"
    single = m.members[0] if isinstance(m, Ensemble) else m
    if not isinstance(m, Ensemble):  # time a 5-member committee all the same (speed does not need distinct weights)
        import copy

        m = Ensemble([copy.deepcopy(single) for _ in range(5)])
    return single, m, src


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: str, repeat: int, budget_s: float = 20.0) -> float:
    fn()  # warm-up (allocations, CUDA kernels)
    _sync(device)
    times = []
    t_start = time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > budget_s:
            break
    return float(np.median(times))


def profile(model, atoms, device: str, dtype, repeat: int) -> dict:
    from mlipops.models import Potential

    t = {}
    t["neighbour_list"] = _time(lambda: model.graph(atoms), "cpu", repeat)
    g = model.graph(atoms)
    t["collate_transfer"] = _time(lambda: Potential.collate([g], dtype, device), device, repeat)
    b = Potential.collate([g], dtype, device)
    pos = b["positions"].detach().requires_grad_(True)

    def desc():
        return model.features(b, pos, b["cell"])

    t["descriptor_forward"] = _time(desc, device, repeat)
    feats = desc()
    t["network_forward"] = _time(lambda: model.energies_from_features(b, feats), device, repeat)

    def backward():
        e = model.energies_from_features(b, model.features(b, pos, b["cell"])).sum()
        torch.autograd.grad(e, pos)

    t["backward"] = max(0.0, _time(backward, device, repeat) - t["descriptor_forward"] - t["network_forward"])
    return t


def bench(model, ensemble, atoms, device: str, dtype, repeat: int) -> dict:
    from mlipops.models import Potential

    n = len(atoms)
    m = model.to(device=device, dtype=dtype)
    out = {"n_atoms": n, "device": device, "dtype": str(dtype).replace("torch.", "")}

    def full():
        m(Potential.collate([m.graph(atoms)], dtype, device), forces=True)

    out["call_s"] = _time(full, device, repeat)
    b = Potential.collate([m.graph(atoms, skin=0.5)], dtype, device)
    out["md_step_s"] = _time(lambda: m(b, forces=True), device, repeat)
    out["n_edges"] = int(b["edge_i"].numel())
    out["profile_s"] = profile(m, atoms, device, dtype, max(3, repeat // 2))
    if ensemble is not None:
        e = ensemble.to(device=device, dtype=dtype)
        be = Potential.collate([e.graph(atoms, skin=0.5)], dtype, device)
        out["ensemble_members"] = len(e)
        out["ensemble_md_step_s"] = _time(lambda: e(be, forces=True), device, max(2, repeat // 2))
        e.to("cpu", dtype=torch.float64)
    m.to("cpu", dtype=torch.float64)
    if device == "cuda":
        out["cuda_max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        torch.cuda.empty_cache()
    for k in ("call", "md_step", "ensemble_md_step"):
        if f"{k}_s" in out:
            out[f"{k}_atom_steps_per_s"] = n / out[f"{k}_s"]
    return out


def train_step(model, frames, device: str, dtype, repeat: int, batch_size: int = 8) -> dict:
    """One optimizer step of the energy + force loss (forces need a double backward) on a batch."""
    from mlipops.frames import labels
    from mlipops.models import Potential

    m = model.to(device=device, dtype=dtype).train()
    frames = frames[:batch_size]
    b = Potential.collate([m.graph(a) for a in frames], dtype, device)
    e = torch.tensor([labels(a)[0] for a in frames], dtype=dtype, device=device)
    f = torch.as_tensor(np.concatenate([labels(a)[1] for a in frames]), dtype=dtype, device=device)
    n = b["n_atoms"].to(dtype)
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)

    def step():
        out = m(b, forces=True, create_graph=True)
        loss = (((out["energy"] - e) / n) ** 2).mean() + 10 * ((out["forces"] - f) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    t = _time(step, device, repeat)
    m.to("cpu", dtype=torch.float64).eval()
    n_atoms = int(b["species"].numel())
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "batch_frames": len(frames),
            "batch_atoms": n_atoms, "step_s": t, "atoms_per_s": n_atoms / t}


def emt(atoms, repeat: int) -> float:
    from ase.calculators.emt import EMT

    a = atoms.copy()
    a.calc = EMT()

    def call():
        a.calc.reset()
        a.get_forces()

    return _time(call, "cpu", repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "data/models/cu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1000, 4000])
    ap.add_argument("--dtype", choices=["float32", "float64"], nargs="+", default=["float32", "float64"])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    ap.add_argument("--no-emt", action="store_true")
    ap.add_argument("--train-step", action="store_true", help="also time one training step on a batch of 8 frames")
    ap.add_argument("--out", type=Path, default=ROOT / "reports/bench/potential.json")
    args = ap.parse_args()

    model, ensemble, src = load(args.model)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    rec = {"model": src, "torch": torch.__version__, "platform": platform.platform(),
           "cpu_threads": torch.get_num_threads(), "cpu_count": len(__import__("os").sched_getaffinity(0)),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "results": []}
    print(f"model: {src}; torch {torch.__version__}, {rec['cpu_threads']} CPU threads; GPU: {rec['gpu']}")
    hdr = (f"{'atoms':>7} {'device':>6} {'dtype':>8} {'call ms':>9} {'step ms':>9} {'atom-steps/s':>13} "
           f"{'ens5 step ms':>12} {'EMT ms':>8}  profile ms (NL / desc / net / backward)")
    print(hdr)
    for n in args.sizes:
        atoms = cell(n)
        t_emt = None if args.no_emt or n > 20000 else emt(atoms, max(2, args.repeat // 2))
        for device in devices:
            for dt in args.dtype:
                r = bench(model, ensemble, atoms, device, getattr(torch, dt), args.repeat)
                r["emt_s"] = t_emt
                rec["results"].append(r)
                p = r["profile_s"]
                ens = f"{r['ensemble_md_step_s'] * 1e3:12.1f}" if "ensemble_md_step_s" in r else f"{'-':>12}"
                emt_txt = f"{t_emt * 1e3:8.1f}" if t_emt else f"{'-':>8}"
                print(f"{len(atoms):7d} {device:>6} {dt:>8} {r['call_s'] * 1e3:9.1f} {r['md_step_s'] * 1e3:9.1f} "
                      f"{r['md_step_atom_steps_per_s']:13.3g} {ens} {emt_txt}  "
                      f"{p['neighbour_list'] * 1e3:.1f} / {p['descriptor_forward'] * 1e3:.1f} / "
                      f"{p['network_forward'] * 1e3:.1f} / {p['backward'] * 1e3:.1f}", flush=True)
    data = ROOT / "data/curated/accepted.extxyz"
    if args.train_step and data.is_file():
        from mlipops.frames import read_extxyz

        frames = [a for a in read_extxyz(data)[0] if a.info.get("split") == "train"]
        frames.sort(key=len, reverse=True)  # the largest training frames: a heavy batch
        rec["train_step"] = []
        for device in devices:
            for dt in args.dtype:
                r = train_step(model, frames, device, getattr(torch, dt), args.repeat)
                rec["train_step"].append(r)
                print(f"train step ({r['batch_frames']} frames, {r['batch_atoms']} atoms) {device} {dt}: "
                      f"{r['step_s'] * 1e3:.1f} ms, {r['atoms_per_s']:.3g} atoms/s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
