"""Large-input benchmark: `mlipops ingest`, `validate` and `index` on a 100,000-frame, ~3M-atom extxyz file.

    .venv/bin/python benchmarks/bench_large_input.py                 # 100,000 frames (generated once, cached)
    .venv/bin/python benchmarks/bench_large_input.py --frames 5000   # a quick small run first
    .venv/bin/python benchmarks/bench_large_input.py --work /tmp/x --stages ingest,validate

The file is synthetic but physical, ~31 atoms per frame: Cu fcc 2x2x2 conventional supercells (32 atoms),
fcc with one vacancy (31), bcc 2x2x3 (24) and hcp 3x3x2 (36), each under a random strain (every component of
the symmetric strain tensor uniform in ±3 %, ±1 % off the diagonal) and rattled by 0.02-0.1 Å (atoms kept
1.8 Å apart), labelled by ASE's EMT (energy, forces, stress) and carrying ``temperature_K``, the Einstein-model
temperature of its rattle (k_B T = K σ², K = 6.5 eV/Å² for Cu). It is deterministic (seeded per frame) and
cached in ``--work``; generating 100,000 frames takes ~20 minutes on 2 cores and is not measured.

The stages then run as the user runs them, each a separate ``mlipops`` process under ``/usr/bin/time -v``
(peak RSS of the process), in a fresh project inside ``--work`` whose params.yaml is the repository's with
``ingest.sources`` pointing at the file (hard-linked into the project's ``data/raw/``). Target (issue 30, 2
cores): ingest + validate + index <= 10 minutes in all and each stage <= 2 GiB of memory, with progress lines
in the logs of ingest and validate. A stage's memory is the larger of its largest process's peak RSS and its
process tree's peak PSS (sampled every 0.5 s from /proc: a large file is read by worker processes, whose shared
library pages PSS counts once). Prints a table (stage, wall s, memory, frames, progress lines) and
writes reports/bench/large_input.json; a missed target does not change the exit code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GEN_VERSION = 1  # bump when the recipe below changes: the cached file is then rebuilt
EINSTEIN_K = 6.5  # eV/Å², m ω_E² of Cu: σ² = k_B T / K per Cartesian component
D_MIN = 1.8  # Å: rattles are redrawn until no two atoms are closer (validate's limit is 1.5 Å)
K_B = 8.617333e-5  # eV/K
# config_type -> share of the frames (vacancy is a held-out test config_type of the default params)
MIX = {"crystal_fcc": 0.45, "vacancy": 0.10, "crystal_bcc": 0.25, "crystal_hcp": 0.20}
TARGET_S = 600.0
TARGET_RSS_MIB = 2048.0
STAGES = ("ingest", "validate", "index")


# ------------------------------------------------------------------------------------- dataset
def _base_cell(kind: str, rng: np.random.Generator):
    from ase.build import bulk

    a_fcc = 3.59  # Å, EMT Cu
    if kind == "crystal_fcc":
        return bulk("Cu", "fcc", a=a_fcc, cubic=True).repeat(2)  # 32
    if kind == "vacancy":
        a = bulk("Cu", "fcc", a=a_fcc, cubic=True).repeat(2)
        del a[int(rng.integers(len(a)))]
        return a  # 31
    if kind == "crystal_bcc":
        return bulk("Cu", "bcc", a=2.86, cubic=True).repeat((2, 2, 3))  # 24
    return bulk("Cu", "hcp", a=2.54, c=2.54 * math.sqrt(8.0 / 3.0)).repeat((3, 3, 2))  # 36


def _rattle(atoms, sigma: float, rng: np.random.Generator) -> None:
    """Gaussian displacements; those of atoms closer than D_MIN to another are redrawn."""
    from mlipops.descriptors import neighbor_list

    ref = atoms.positions.copy()
    disp = rng.normal(0.0, sigma, ref.shape)
    for _ in range(200):
        atoms.positions = ref + disp
        i, j, _, _ = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, D_MIN)
        if not len(i):
            return
        bad = np.unique(np.maximum(i, j))
        disp[bad] = rng.normal(0.0, sigma, (len(bad), 3))
    raise RuntimeError(f"could not rattle {atoms.get_chemical_formula()} by {sigma} Å without overlaps")


def make_frame(kind: str, rng: np.random.Generator):
    a = _base_cell(kind, rng)
    eps = np.diag(rng.uniform(-0.03, 0.03, 3))
    off = rng.uniform(-0.01, 0.01, 3)
    eps[0, 1] = eps[1, 0] = off[0]
    eps[0, 2] = eps[2, 0] = off[1]
    eps[1, 2] = eps[2, 1] = off[2]
    a.set_cell(a.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    sigma = float(rng.uniform(0.02, 0.1))
    _rattle(a, sigma, rng)
    a.info.update({"config_type": kind, "rattle_stdev": round(sigma, 4),
                   "temperature_K": round(EINSTEIN_K * sigma**2 / K_B, 1)})
    return a


def _generate_chunk(args) -> tuple[str, float]:
    """Worker: build and EMT-label frames [start, stop) (each seeded by its index) and write them."""
    import ase.io

    from mlipops.oracles import get_oracle

    path, start, kinds, seed = args
    t0 = time.perf_counter()
    frames = [make_frame(k, np.random.default_rng([seed, start + q])) for q, k in enumerate(kinds)]
    labelled = get_oracle("emt").label(frames)
    tmp = Path(path + ".tmp")
    with tmp.open("w") as fh:
        for a in labelled:
            ase.io.write(fh, a, format="extxyz")
    tmp.replace(path)
    return path, time.perf_counter() - t0


def build_dataset(work: Path, n_frames: int, seed: int, jobs: int) -> tuple[Path, dict]:
    """The cached file (built with ``jobs`` worker processes when missing; resumes from finished chunks)."""
    from concurrent.futures import ProcessPoolExecutor

    path = work / f"cu_large_{n_frames}_s{seed}_v{GEN_VERSION}.extxyz"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        return path, json.loads(meta_path.read_text()) | {"cached": True}
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    names = list(MIX)
    kinds = rng.choice(names, size=n_frames, p=np.array(list(MIX.values()))).tolist()
    chunk = 1000
    parts = work / f"parts_{n_frames}_s{seed}_v{GEN_VERSION}"
    parts.mkdir(parents=True, exist_ok=True)
    tasks = [(str(parts / f"{c:05d}.extxyz"), s, kinds[s:s + chunk], seed)
             for c, s in enumerate(range(0, n_frames, chunk))]
    todo = [t for t in tasks if not Path(t[0]).is_file()]
    print(f"generating {n_frames} frames in {len(tasks)} chunks ({len(tasks) - len(todo)} cached), "
          f"{jobs} process(es)", flush=True)
    cpu = 0.0
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as ex:
        for k, (_, dt) in enumerate(ex.map(_generate_chunk, todo), 1):
            cpu += dt
            if k % 10 == 0 or k == len(todo):
                print(f"  {k}/{len(todo)} chunks, {time.perf_counter() - t0:.0f} s", flush=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as out:
        for t in tasks:
            with open(t[0], "rb") as fh:
                shutil.copyfileobj(fh, out)
    tmp.replace(path)
    shutil.rmtree(parts, ignore_errors=True)
    n_atoms = 0
    with path.open() as fh:  # count atoms from the natoms lines
        for line in fh:
            n = int(line)
            n_atoms += n
            fh.readline()
            for _ in range(n):
                fh.readline()
    meta = {"path": str(path), "n_frames": n_frames, "n_atoms": n_atoms, "seed": seed,
            "generator_version": GEN_VERSION, "config_types": {k: kinds.count(k) for k in names}, "jobs": jobs,
            "generation_wall_s": round(time.perf_counter() - t0, 1), "generation_cpu_s": round(cpu, 1),
            "file_mib": round(path.stat().st_size / 2**20, 1)}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return path, meta | {"cached": False}


# ------------------------------------------------------------------------------------ pipeline
def make_project(work: Path, data: Path) -> Path:
    """A fresh project: the repository's params.yaml with ingest.sources = [data/raw/large.extxyz]."""
    import yaml

    proj = work / "project"
    shutil.rmtree(proj, ignore_errors=True)
    (proj / "data" / "raw").mkdir(parents=True)
    target = proj / "data" / "raw" / "large.extxyz"
    try:
        os.link(data, target)
    except OSError:
        shutil.copy(data, target)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"]["sources"] = [{"path": "data/raw/large.extxyz"}]
    params["validate"]["allowed_species"] = ["Cu"]
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return proj


def _time_v(stderr: str) -> dict:
    out = {}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if m:
        out["peak_rss_mib"] = round(int(m.group(1)) / 1024.0, 1)
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr)
    if m:
        parts = [float(x) for x in m.group(1).split(":")]
        out["time_v_wall_s"] = round(sum(v * 60 ** k for k, v in enumerate(reversed(parts))), 2)
    for key, name in (("User time (seconds)", "user_s"), ("System time (seconds)", "system_s")):
        m = re.search(re.escape(key) + r": ([\d.]+)", stderr)
        if m:
            out[name] = float(m.group(1))
    return out


def _tree_memory_mib(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MiB of ``pid`` and its descendants (the stage and its worker processes), from /proc.
    PSS counts a page shared by k processes (torch's libraries in each worker) as 1/k in each: the sum is
    what the tree takes of the machine's memory; the RSS sum counts shared pages once per process."""
    rss, pss, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                rss += next((int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS:")), 0)
            with open(f"/proc/{p}/smaps_rollup") as fh:
                pss += next((int(ln.split()[1]) for ln in fh if ln.startswith("Pss:")), 0)
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo += [int(c) for c in fh.read().split()]
        except (OSError, ValueError):
            continue
    return rss / 1024.0, pss / 1024.0


def _run_sampled(cmd: list[str], cwd: Path, env: dict, every_s: float = 0.5):
    """Run ``cmd``; sample the process tree's memory every ``every_s`` and timestamp each output line.
    Returns (CompletedProcess-like, [(t, RSS MiB, PSS MiB)], [(t, output line)])."""
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, timeline, out, err = [], [], [], []

    def read_err():
        for ln in proc.stderr:
            err.append(ln)
            lines.append((time.perf_counter() - t0, ln.rstrip("\n")))

    def read_out():
        for ln in proc.stdout:
            out.append(ln)
            lines.append((time.perf_counter() - t0, ln.rstrip("\n")))

    threads = [threading.Thread(target=read_err, daemon=True), threading.Thread(target=read_out, daemon=True)]
    for th in threads:
        th.start()
    while proc.poll() is None:
        timeline.append((time.perf_counter() - t0, *_tree_memory_mib(proc.pid)))
        time.sleep(every_s)
    for th in threads:
        th.join()
    res = subprocess.CompletedProcess(cmd, proc.returncode, "".join(out), "".join(err))
    return res, timeline, lines


def run_stage(proj: Path, stage: str, interval_s: float, profile: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MLIPOPS_PROGRESS_INTERVAL_S=str(interval_s), GX_ANALYTICS_ENABLED="False")
    cmd = [sys.executable, "-c", "from mlipops.cli import main; main()", stage]
    if profile:  # cProfile runs a script: a tiny one calling the CLI
        script = proj / "_cli.py"
        script.write_text("from mlipops.cli import main\nmain()\n")
        cmd = [sys.executable, "-m", "cProfile", "-o", str(proj / f"{stage}.prof"), str(script), stage]
    timev = shutil.which("time") or "/usr/bin/time"
    if os.path.exists(timev):
        cmd = [timev, "-v"] + cmd
    t0 = time.perf_counter()
    res, timeline, lines = _run_sampled(cmd, proj, env)
    wall = time.perf_counter() - t0
    (proj / f"{stage}.stdout.log").write_text(res.stdout)
    (proj / f"{stage}.stderr.log").write_text(res.stderr)
    out = {"stage": stage, "wall_s": round(wall, 1), "returncode": res.returncode} | _time_v(res.stderr)
    progress = [ln for ln in (res.stdout + res.stderr).splitlines() if re.search(r": \d+(/\d+)? ", ln)
                and ("elapsed" in ln)]
    out["progress_lines"] = len(progress)
    if timeline:  # the process tree's memory (the stage and its workers), and where it peaks
        t_peak, _, pss_peak = max(timeline, key=lambda x: x[2])
        before = [ln for t, ln in lines if t <= t_peak]
        out["tree_peak_pss_mib"] = round(pss_peak, 1)
        out["tree_peak_rss_mib"] = round(max(r for _, r, _ in timeline), 1)
        out["pss_peak_at_s"] = round(t_peak, 1)
        out["pss_peak_after_line"] = before[-1] if before else None
        step = max(1, len(timeline) // 60)  # ~60 buckets, each its largest sample (the peaks stay visible)
        out["memory_timeline_mib"] = [max(((round(t, 1), round(r), round(q)) for t, r, q in timeline[b:b + step]),
                                          key=lambda x: x[2]) for b in range(0, len(timeline), step)]
    metrics = proj / "reports" / stage / "metrics.json"
    out["metrics"] = json.loads(metrics.read_text()) if metrics.is_file() and res.returncode == 0 else {}
    m = out["metrics"]
    out["frames"] = {"ingest": m.get("n_frames"), "validate": m.get("n_accepted"), "index": m.get("n_frames")}[stage]
    if res.returncode != 0:
        out["error"] = "\n".join([ln for ln in res.stderr.splitlines() if "mlipops" in ln or "Error" in ln][-5:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mlipops_large"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes generating the file")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in order")
    ap.add_argument("--progress-interval", type=float, default=30.0, help="MLIPOPS_PROGRESS_INTERVAL_S (s)")
    ap.add_argument("--profile", action="store_true", help="run each stage under cProfile (<work>/project/*.prof)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "large_input.json")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--project", type=Path, default=None,
                    help="run the stages in this existing project (e.g. a copy of <work>/project after ingest and "
                         "validate, with --stages index) instead of a fresh one")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    args.work.mkdir(parents=True, exist_ok=True)
    data, meta = build_dataset(args.work, args.frames, args.seed, args.jobs)
    print(f"dataset: {data} ({meta['n_frames']} frames, {meta['n_atoms']} atoms, {meta['file_mib']} MiB"
          f"{', cached' if meta.get('cached') else ''})", flush=True)
    if args.generate_only:
        return
    proj = args.project or make_project(args.work, data)
    rows = []
    for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
        print(f"running mlipops {stage} ...", flush=True)
        r = run_stage(proj, stage, args.progress_interval, args.profile)
        rows.append(r)
        print(f"  {r['wall_s']} s, peak RSS {r.get('peak_rss_mib')} MiB (largest process), process tree peak PSS "
              f"{r.get('tree_peak_pss_mib')} MiB, rc {r['returncode']}", flush=True)
        if r["returncode"] != 0:
            print(r.get("error", ""), flush=True)
            break
    total = sum(r["wall_s"] for r in rows)
    # the memory a stage takes: its largest process's peak RSS or its process tree's peak PSS (workers included)
    for r in rows:
        r["memory_mib"] = max(r.get("peak_rss_mib") or 0.0, r.get("tree_peak_pss_mib") or 0.0)
    peak = max(r["memory_mib"] for r in rows) if rows else 0.0
    print()
    print(f"{'stage':<10} {'wall s':>8} {'memory MiB':>11} {'max RSS MiB':>12} {'tree PSS MiB':>13} {'frames':>8} "
          f"{'progress lines':>15}")
    for r in rows:
        print(f"{r['stage']:<10} {r['wall_s']:>8.1f} {r['memory_mib']:>11.0f} "
              f"{r.get('peak_rss_mib') or float('nan'):>12.0f} "
              f"{r.get('tree_peak_pss_mib') or float('nan'):>13.0f} "
              f"{str(r['frames']):>8} {r['progress_lines']:>15}")
    print(f"{'total':<10} {total:>8.1f} {peak:>11.0f}")
    ok_time, ok_rss = total <= TARGET_S, peak <= TARGET_RSS_MIB
    print(f"target: total <= {TARGET_S:.0f} s ({'pass' if ok_time else 'FAIL'}), each stage <= "
          f"{TARGET_RSS_MIB:.0f} MiB ({'pass' if ok_rss else 'FAIL'})"
          + ("" if args.frames == 100_000 else f" (the target is for 100,000 frames; this run has {args.frames})"))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {"dataset": meta, "stages": rows, "total_wall_s": round(total, 1), "max_memory_mib": peak,
              "target_total_s": TARGET_S, "target_rss_mib": TARGET_RSS_MIB, "pass_time": ok_time, "pass_rss": ok_rss,
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                          "loadavg_after": load, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
