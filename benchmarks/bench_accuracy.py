"""Accuracy on real DFT data (mlearn Mo and Li), side by side with a real peer (MACE), in one run.

For each element: the mlearn training file is split 90/10 into train/val (seeded, stratified by
``config_type``); the mlipops 5-member ensemble (``mlipops.train.run.train_ensemble``: Dask
LocalCluster, 2 single-threaded workers, bootstrap members) and one MACE model (mace-torch's own
``mace_run_train``, CPU, 2 threads) train on exactly that split with the same 5.0 Å cutoff; both
are evaluated on the matching mlearn test file, overall and per ``config_type`` (Elastic, AIMD-NVT,
Vacancy, Surface), with the same metric code (``mlipops.evaluate.predict.split_metrics`` for ours;
the same formulas on MACE's predictions, checked against split_metrics on our predictions).

Columns: energy MAE (meV/atom), force-component MAE (eV/Å), training wall time (s: ours is the
whole ``train_ensemble`` call, Dask start-up and graph building included; MACE's is the whole
``mace_run_train`` process, its start-up, statistics and final error tables included), and CPU
inference time per atom (µs/atom, energy + forces, one call per structure with the neighbour list
built inside the call, 2 torch threads, float32) over the test structures and over one 2,000-atom
rattled bcc cell. MACE's inference is timed on its model with ``compute_stress=False`` (our calls
do not compute stress either), batch built by its calculator; the full ``MACECalculator`` call
(which always adds the stress) is recorded too.

Settings (full run) and why
---------------------------
mlipops (``TrainParams`` / ``DescriptorParams`` below, ``ComputeParams(n_workers=2, threads_per_worker=1)``):
  descriptors cutoff 5.0 Å (params.yaml), n_radial 12, r_min 0.8, angular_cutoff 5.0, n_angular 8,
  max_l 4 -> 52 features per atom (the default 24 features plateau at a force MAE of about 0.165 eV/Å
  on Mo validation; these reach about 0.157 in 40 epochs); networks [64, 64]; 300 epochs, batch 8,
  Adam lr 3e-3 with cosine decay, patience 60, loss weights energy 1 / forces 10 (params.yaml),
  float32. Cost: training runs on frozen descriptors (descriptors and their exact Jacobians computed
  once per member, about 7 s for Mo), about 0.3 s per member-epoch on one core (174 frames, ~9,000
  atoms; through plain autograd, a double backward through the descriptors, it was 1.9 s alone and
  6.4-7.2 s with two members sharing the 2 cores: the first full run, 100 epochs, took 2185 s), 5
  members on 2 workers = 3 rounds, so about 3 x (7 + 300 x 0.3 s) = 5 min per element (goal: < 15 min).
MACE (mace-torch 0.3.x, ``pip install -e '.[peers]'``): MACE model, r_max 5.0, 8 Bessel radial
  functions, hidden irreps 32x0e+32x1o (num_channels 32, max_L 1), max_ell 3, correlation 3,
  2 interactions, radial MLP [32, 32, 32], E0s "average" (least squares per species, as ours),
  loss "weighted" (energy 1, forces 100), batch 5, lr 0.01, amsgrad, EMA 0.99, stage two (SWA:
  energy weight raised) for the last quarter, float32, CPU, 2 threads, 25 epochs (``--mace-epochs``)
  so that its wall time is about ours: one epoch of this model costs about 5.5 ms per training atom
  on one core, about 30 s for the ~9,000 Mo training atoms on 2 threads, so 25 epochs ≈ 13 min.
  This is a "small" MACE (the MACE papers use 128-256 channels and hundreds of epochs): at equal
  wall time it is not converged; ``--mace-epochs 200`` (about 1.7 h per element) comes closer.

``--quick`` (smoke run, < 3 min for both elements on a quiet machine): a fifth of the training
frames, 2 epochs of the default descriptors with [16, 16] networks, 1 MACE epoch of 8x0e (max_L 0,
correlation 2), timing on 6 test structures with one repeat. Its errors and timings mean nothing;
it checks that everything runs.

    .venv/bin/pip install -e '.[peers]'                       # mace-torch, once
    .venv/bin/python benchmarks/bench_accuracy.py              # Mo and Li, full: about 95 min on 2 cores
    .venv/bin/python benchmarks/bench_accuracy.py --quick --elements Mo
    .venv/bin/python benchmarks/bench_accuracy.py --skip-mace

Run the full benchmark on a quiet machine: two torch threads that share their cores with another
job wait at every OpenMP barrier for the descheduled sibling (measured here under another 2-core
job: a 54-atom call of 5-10 ms on one thread took 300 ms on two, and a MACE epoch of 10 s on one
thread took 50-80 s on two); ``--threads 1`` is robust to that.

MACE runs in subprocesses only: importing ``mace`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in
the process environment (every later ``torch.load`` without an explicit ``weights_only`` would
unpickle code, and Dask workers started afterwards would inherit it), and its model files are full
pickles. Writes reports/bench/accuracy.json (``--quick``: accuracy_quick.json; ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "datasets" / "mlearn"
THREADS = 2
LATTICE = {"Mo": 3.16, "Li": 3.43}  # bcc, Å (PBE): the 2,000-atom timing cell
CONFIG_ORDER = ["Elastic", "AIMD-NVT", "Vacancy", "Surface"]

# ------------------------------------------------------------------------------------- settings
OURS = {
    "full": {"descriptors": dict(cutoff=5.0, n_radial=12, r_min=0.8, angular_cutoff=5.0, n_angular=8, max_l=4),
             "train": dict(hidden=[64, 64], epochs=300, batch_size=8, learning_rate=3e-3, scheduler="cosine",
                           patience=60, energy_weight=1.0, force_weight=10.0, dtype="float32", device="cpu")},
    "quick": {"descriptors": dict(cutoff=5.0, n_radial=8, r_min=0.8, angular_cutoff=4.0, n_angular=4, max_l=3),
              "train": dict(hidden=[16, 16], epochs=2, batch_size=8, learning_rate=3e-3, scheduler="cosine",
                            patience=None, energy_weight=1.0, force_weight=10.0, dtype="float32", device="cpu")},
}
MACE = {
    "full": dict(model="MACE", r_max=5.0, num_radial_basis=8, num_channels=32, max_L=1, max_ell=3, correlation=3,
                 num_interactions=2, radial_MLP="[32, 32, 32]", E0s="average", loss="weighted", energy_weight=1.0,
                 forces_weight=100.0, batch_size=5, valid_batch_size=10, lr=0.01, max_num_epochs=25,
                 ema=True, ema_decay=0.99, amsgrad=True, swa=True, default_dtype="float32", device="cpu"),
    "quick": dict(model="MACE", r_max=5.0, num_radial_basis=8, num_channels=8, max_L=0, max_ell=2, correlation=2,
                  num_interactions=2, radial_MLP="[16, 16]", E0s="average", loss="weighted", energy_weight=1.0,
                  forces_weight=100.0, batch_size=10, valid_batch_size=20, lr=0.01, max_num_epochs=1,
                  ema=False, amsgrad=True, swa=False, default_dtype="float32", device="cpu"),
}


# ----------------------------------------------------------------------------------------- data
def stratified_split(frames, val_fraction: float, seed: int):
    """(train, val): per config_type, round(val_fraction * n) frames (at least 1 where n >= 5) to val."""
    rng = np.random.default_rng(seed)
    by_ct = defaultdict(list)
    for k, a in enumerate(frames):
        by_ct[a.info.get("config_type", "unknown")].append(k)
    val = set()
    for ct in sorted(by_ct):
        idx = by_ct[ct]
        n_val = int(round(val_fraction * len(idx)))
        if n_val == 0 and len(idx) >= 5:
            n_val = 1
        val.update(rng.choice(idx, n_val, replace=False).tolist())
    train = [a for k, a in enumerate(frames) if k not in val]
    return train, [a for k, a in enumerate(frames) if k in val]


def subsample(frames, fraction: float, seed: int):
    """Every config_type thinned to ``fraction`` (at least 2 frames each): the --quick data."""
    rng = np.random.default_rng(seed)
    by_ct = defaultdict(list)
    for k, a in enumerate(frames):
        by_ct[a.info.get("config_type", "unknown")].append(k)
    keep = sorted(k for idx in by_ct.values()
                  for k in rng.choice(idx, min(len(idx), max(2, int(round(fraction * len(idx))))), replace=False))
    return [frames[k] for k in keep]


def write_mace_xyz(path: Path, frames) -> None:
    """Copies of the frames with labels as ``REF_energy`` (info) and ``REF_forces`` (arrays), no
    calculator: mace-torch renames a calculator-stored ``energy`` with a warning (ASE >= 3.23 would
    otherwise mix reference and predicted values)."""
    import ase.io

    from mlipops.frames import labels

    out = []
    for a in frames:
        e, f, _ = labels(a)
        b = a.copy()
        b.calc = None
        b.info = {"REF_energy": float(e), "config_type": a.info.get("config_type", "unknown")}
        b.arrays["REF_forces"] = np.asarray(f, dtype=float)
        out.append(b)
    ase.io.write(path, out, format="extxyz")


def big_cell(element: str, n_rep: int = 10):
    """bcc cubic cell repeated n_rep³ (2,000 atoms for 10), rattled 0.05 Å."""
    from ase.build import bulk

    a = bulk(element, "bcc", a=LATTICE.get(element, 3.3), cubic=True).repeat(n_rep)
    a.rattle(0.05, seed=0)
    return a


# -------------------------------------------------------------------------------------- metrics
def metrics_from_predictions(frames, e_pred, f_pred) -> dict:
    """The keys and formulas of ``mlipops.evaluate.predict.split_metrics`` from predicted energies
    [n_frames] and forces (list of [n_atoms, 3]): overall and ``<config_type>.*``."""
    from mlipops.frames import labels

    def errors(de, df):
        return {"energy_mae_per_atom": float(np.mean(np.abs(de))),
                "energy_rmse_per_atom": float(np.sqrt(np.mean(de**2))),
                "force_mae": float(np.mean(np.abs(df))), "force_rmse": float(np.sqrt(np.mean(df**2)))}

    de, df, cts = [], [], []
    for a, e, f in zip(frames, e_pred, f_pred):
        e_ref, f_ref, _ = labels(a)
        de.append((float(e) - e_ref) / len(a))
        df.append((np.asarray(f, float) - f_ref).ravel())
        cts.append(a.info.get("config_type", "unknown"))
    de, cts = np.array(de), np.array(cts)
    out = {"n_nonfinite_predictions": int((~np.isfinite(de)).sum() + sum((~np.isfinite(x)).sum() for x in df)),
           "n_frames": len(frames)}
    out |= errors(de, np.concatenate(df))
    for ct in sorted(set(cts)):
        sel = np.flatnonzero(cts == ct)
        out |= {f"{ct}.{k}": v for k, v in errors(de[sel], np.concatenate([df[k] for k in sel])).items()}
        out[f"{ct}.n_frames"] = len(sel)
    return out


def _time(fn, repeat: int, budget_s: float) -> tuple[float, float]:
    """(best, median) seconds of ``fn`` over up to ``repeat`` calls after one warm-up, stopping once
    ``budget_s`` is spent. The best is the headline: on a shared machine other jobs only add time
    (torch's OpenMP threads wait at barriers for a descheduled sibling), never remove it."""
    fn()  # warm-up
    times, t_start = [], time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > budget_s:
            break
    return float(np.min(times)), float(np.median(times))


def time_per_atom(call, frames, cell, repeat: int, budget_s: float) -> dict:
    """µs/atom of energy+forces: one ``call(atoms)`` per test structure, and on the big cell."""
    n_test = sum(len(a) for a in frames)
    t_test, t_test_med = _time(lambda: [call(a) for a in frames], repeat, budget_s)
    t_cell, t_cell_med = _time(lambda: call(cell), repeat, budget_s)
    return {"test_us_per_atom": 1e6 * t_test / n_test, "cell_us_per_atom": 1e6 * t_cell / len(cell),
            "test_us_per_atom_median": 1e6 * t_test_med / n_test,
            "cell_us_per_atom_median": 1e6 * t_cell_med / len(cell),
            "test_s_per_pass": t_test, "cell_s_per_call": t_cell, "test_atoms": n_test, "cell_atoms": len(cell),
            "test_structures": len(frames)}


# ----------------------------------------------------------------------------------------- ours
def run_ours(element: str, data_path: Path, train_frames, test_frames, settings: dict, seed: int,
             repeat: int, budget_s: float, timing_frames) -> dict:
    import torch

    from mlipops.evaluate.predict import predict, split_metrics
    from mlipops.models import Potential
    from mlipops.params import ComputeParams, DescriptorParams, EnsembleParams, TrainParams
    from mlipops.train.loop import species_of
    from mlipops.train.run import train_ensemble

    d = DescriptorParams(**settings["descriptors"])
    p = TrainParams(**settings["train"], model_name=f"bench-{element.lower()}", seed=seed,
                    ensemble=EnsembleParams(members=5, bootstrap=True))
    c = ComputeParams(n_workers=2, threads_per_worker=1)
    species = species_of(train_frames)
    t0 = time.perf_counter()
    ensemble, members, timing = train_ensemble(data_path, species, p, d, c)
    train_wall = time.perf_counter() - t0
    torch.set_num_threads(THREADS)
    ensemble.eval()
    dtype = next(ensemble.parameters()).dtype
    single = ensemble.members[0]
    out = {"settings": {"descriptors": d.model_dump(), "train": p.model_dump(), "compute": c.model_dump()},
           "train_wall_s": train_wall, "train_timing_s": timing,
           "members": [{"member": r["member"], "best_epoch": r["best_epoch"], "stopped_early": r["stopped_early"],
                        "wall_time_s": r["wall_time_s"], "n_train_unique": r["n_train_unique"],
                        "val": {k: v for k, v in r["metrics"].get("val", {}).items() if k != "by_config"}}
                       for r in members]}
    # same numbers from split_metrics and from the formulas applied to MACE: check once on ours
    # (float32 predictions of two calls differ in the last bits: index_add_ on 2 threads)
    m_ens = split_metrics(ensemble, test_frames)[0]
    e_pred, f_pred = predict(ensemble, test_frames)
    check = metrics_from_predictions(test_frames, e_pred, f_pred)
    for k in ("energy_mae_per_atom", "force_mae"):
        if not np.isclose(check[k], m_ens[k], rtol=1e-4, atol=1e-9):
            raise RuntimeError(f"metric mismatch on {k}: split_metrics {m_ens[k]} vs {check[k]}")
    out["ensemble"] = {"metrics": m_ens}
    out["single"] = {"metrics": split_metrics(single, test_frames)[0]}
    cell = big_cell(element)
    for name, model in (("single", single), ("ensemble", ensemble)):
        def call(a, model=model):
            model(Potential.collate([model.graph(a)], dtype), forces=True)

        out[name]["inference"] = time_per_atom(call, timing_frames, cell, repeat, budget_s)
    out["ensemble"]["train_wall_s"] = out["single"]["train_wall_s"] = train_wall
    out["n_parameters_per_member"] = int(sum(q.numel() for q in single.parameters()))
    out["n_features"] = int(single.descriptor.n_features) if hasattr(single, "descriptor") else None
    return out


# ----------------------------------------------------------------------------------------- MACE
def mace_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mace-torch")
    except PackageNotFoundError:
        return None


def _mace_args(settings: dict) -> list[str]:
    s = dict(settings)
    args = []
    for flag in ("ema", "amsgrad", "swa"):
        if s.pop(flag, False):
            args.append(f"--{flag}")
    if "--swa" in args:
        args += [f"--start_swa={max(1, int(0.75 * s['max_num_epochs']))}"]
    if not settings.get("ema"):
        s.pop("ema_decay", None)
    args += [f"--{k}={v}" for k, v in s.items()]
    return args


def run_mace_training(element: str, work: Path, settings: dict, seed: int, log_path: Path) -> dict:
    name = f"mace_{element.lower()}"
    cmd = [sys.executable, "-m", "mace.cli.run_train", f"--name={name}", f"--seed={seed}",
           f"--work_dir={work}", f"--train_file={work / 'train.xyz'}", f"--valid_file={work / 'valid.xyz'}",
           f"--test_file={work / 'test.xyz'}", "--energy_key=REF_energy", "--forces_key=REF_forces",
           "--error_table=PerAtomMAE", "--eval_interval=1", "--save_cpu", "--plot=False",
           f"--patience={settings['max_num_epochs']}", *_mace_args(settings)]
    env = os.environ | {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    t0 = time.perf_counter()
    epoch_re = re.compile(r"Epoch (\d+):.*")
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=work)
        for line in proc.stdout:
            log.write(line)
            m = epoch_re.search(line)
            if m:
                print(f"  MACE {element}: {m.group(0)[:150]}", flush=True)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    model = next((p for p in (work / f"{name}_stagetwo.model", work / f"{name}.model") if p.is_file()), None)
    if rc != 0 or model is None:
        tail = log_path.read_text().splitlines()[-25:]
        return {"error": f"mace_run_train exited {rc}" + ("" if model else ", no model file"),
                "log_tail": tail, "command": cmd, "train_wall_s": wall}
    return {"model_path": str(model), "train_wall_s": wall, "command": cmd}


def mace_eval_main(spec_path: Path) -> None:
    """Subprocess: predictions of a trained MACE model on the test frames and its timings."""
    import torch

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    from ase.calculators.calculator import all_changes

    from mace.calculators import MACECalculator
    from mlipops.frames import read_extxyz

    frames, _ = read_extxyz(spec["test_file"])
    calc = MACECalculator(model_paths=spec["model_path"], device="cpu", default_dtype="float32")
    model = calc.models[0]
    e_pred, f_pred = [], []
    for a in frames:
        calc.calculate(a, ["energy", "forces"], all_changes)
        e_pred.append(float(calc.results["energy"]))
        f_pred.append(np.asarray(calc.results["forces"], float).tolist())

    def call_ef(a):  # energy + forces only: MACE's own batch construction (matscipy neighbour list)
        batch = calc._atoms_to_batch(a)
        model(batch.to_dict(), compute_stress=False, training=False)

    def call_calc(a):  # the whole ASE calculator call (always adds the stress)
        calc.calculate(a, ["energy", "forces"], all_changes)

    cell = big_cell(spec["element"])
    timing_frames = frames[:spec["n_timing_frames"]]
    try:
        call_ef(frames[0])
        ef_path = "model(compute_stress=False)"
    except Exception as exc:  # noqa: BLE001 - a private helper of mace-torch: fall back to the calculator
        print(f"MACE energy+forces-only call failed ({exc!r}); timing the calculator instead", file=sys.stderr)
        call_ef, ef_path = call_calc, "MACECalculator (with stress)"
    out = {"e_pred": e_pred, "f_pred": f_pred, "inference_path": ef_path,
           "inference": time_per_atom(call_ef, timing_frames, cell, spec["repeat"], spec["budget_s"]),
           "inference_calculator": time_per_atom(call_calc, timing_frames, cell, max(1, spec["repeat"] // 2),
                                                 spec["budget_s"]),
           "n_parameters": int(sum(p.numel() for p in model.parameters()))}
    Path(spec["out"]).write_text(json.dumps(out))


def run_mace(element: str, work: Path, train, val, test_path: Path, test_frames, settings: dict, seed: int,
             repeat: int, budget_s: float, n_timing_frames: int) -> dict:
    write_mace_xyz(work / "train.xyz", train)
    write_mace_xyz(work / "valid.xyz", val)
    write_mace_xyz(work / "test.xyz", test_frames)
    res = run_mace_training(element, work, settings, seed, work / "train.log")
    res["settings"] = settings
    if "error" in res:
        return res
    spec = {"model_path": res["model_path"], "test_file": str(test_path), "element": element, "repeat": repeat,
            "budget_s": budget_s, "out": str(work / "eval.json"), "threads": THREADS,
            "n_timing_frames": n_timing_frames}
    (work / "eval_spec.json").write_text(json.dumps(spec))
    env = os.environ | {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    proc = subprocess.run([sys.executable, __file__, "--mace-eval", str(work / "eval_spec.json")],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return res | {"error": f"MACE evaluation exited {proc.returncode}",
                      "log_tail": (proc.stdout + proc.stderr).splitlines()[-25:]}
    ev = json.loads((work / "eval.json").read_text())
    res["metrics"] = metrics_from_predictions(test_frames, ev["e_pred"], [np.array(f) for f in ev["f_pred"]])
    res["inference"] = ev["inference"]
    res["inference_calculator"] = ev["inference_calculator"]
    res["n_parameters"] = ev["n_parameters"]
    res["inference_path"] = ev["inference_path"]
    return res


# -------------------------------------------------------------------------------------- printing
def print_element(element: str, r: dict) -> None:
    rows = [("mlipops single (member 0)", r["ours"]["single"]), ("mlipops ensemble (5, mean)", r["ours"]["ensemble"])]
    if "mace" in r:
        rows.append(("MACE", r["mace"]))
    print(f"\n== {element}: {r['n_train']} train / {r['n_val']} val frames -> test {r['n_test']} frames "
          f"({r['n_test_atoms']} atoms) ==")
    hdr = (f"{'model':<28} {'E MAE meV/at':>12} {'F MAE eV/Å':>11} {'train s':>8} "
           f"{'infer µs/at test':>16} {'µs/at 2000-cell':>16}")
    print(hdr)
    for name, m in rows:
        if "error" in m:
            print(f"{name:<28} FAILED: {m['error']}")
            continue
        mm, inf = m["metrics"], m["inference"]
        print(f"{name:<28} {mm['energy_mae_per_atom'] * 1e3:12.2f} {mm['force_mae']:11.4f} {m['train_wall_s']:8.1f} "
              f"{inf['test_us_per_atom']:16.1f} {inf['cell_us_per_atom']:16.1f}")
    cts = [ct for ct in CONFIG_ORDER if f"{ct}.n_frames" in r["ours"]["ensemble"]["metrics"]]
    cts += sorted({k.split(".")[0] for k in r["ours"]["ensemble"]["metrics"] if k.endswith(".n_frames")} - set(cts))
    print("per config_type (E MAE meV/atom / F MAE eV/Å):")
    print(f"{'model':<28} "
          + " ".join(f"{ct + ' (' + str(r['ours']['ensemble']['metrics'][ct + '.n_frames']) + ')':>18}"
                     for ct in cts))
    for name, m in rows:
        if "error" in m:
            continue
        mm = m["metrics"]
        print(f"{name:<28} " + " ".join(f"{mm[ct + '.energy_mae_per_atom'] * 1e3:8.2f} / {mm[ct + '.force_mae']:7.4f}"
                                          for ct in cts))
    o = r["ours"]
    t = o["settings"]["train"]
    print(f"mlipops: {o['n_features']} descriptor features, networks {t['hidden']}, {o['n_parameters_per_member']} "
          f"parameters per member, up to {t['epochs']} epochs (best epochs {[m['best_epoch'] for m in o['members']]})")
    if "mace" in r and "error" not in r["mace"]:
        ms = r["mace"]["settings"]
        print(f"MACE: {ms['num_channels']} channels, max_L {ms['max_L']}, correlation {ms['correlation']}, "
              f"{ms['num_interactions']} interactions, {r['mace']['n_parameters']} parameters, "
              f"{ms['max_num_epochs']} epochs; inference timed through {r['mace']['inference_path']}")
    if "goal" in r:
        g = r["goal"]
        print("goal (ensemble vs MACE): " + "; ".join(f"{k} {v}" for k, v in g.items()))


def goal(r: dict, quick: bool) -> dict:
    ours, mace = r["ours"], r.get("mace")
    g = {"ensemble_train_under_900s": ours["train_wall_s"] < 900}
    if quick:
        g["note"] = "--quick smoke run: its errors and timings are not measurements"
    if mace is None or "error" in mace:
        return g
    e, m = ours["ensemble"], mace
    g["energy_mae_ratio_ours_over_mace"] = round(e["metrics"]["energy_mae_per_atom"]
                                                 / m["metrics"]["energy_mae_per_atom"], 3)
    g["force_mae_ratio_ours_over_mace"] = round(e["metrics"]["force_mae"] / m["metrics"]["force_mae"], 3)
    for who in ("single", "ensemble"):
        for where in ("test", "cell"):
            g[f"speedup_{who}_{where}"] = round(m["inference"][f"{where}_us_per_atom"]
                                                / ours[who]["inference"][f"{where}_us_per_atom"], 1)
    g["met"] = None if quick else bool(g["energy_mae_ratio_ours_over_mace"] <= 1
                    and g["force_mae_ratio_ours_over_mace"] <= 1
                    and g["speedup_ensemble_test"] >= 10 and g["speedup_ensemble_cell"] >= 10
                    and g["ensemble_train_under_900s"])
    return g


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", nargs="+", default=["Mo", "Li"])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1/5 of the training frames, tiny epochs (< 3 min)")
    ap.add_argument("--skip-mace", action="store_true")
    ap.add_argument("--epochs", type=int, default=None, help="override our epochs")
    ap.add_argument("--mace-epochs", type=int, default=None, help="override MACE's max_num_epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=THREADS,
                    help="torch threads for inference and for MACE's training (ours: 2 workers x 1 thread)")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--keep", type=Path, default=None, help="keep the split files, MACE logs and models here")
    ap.add_argument("--out", type=Path, default=None,
                    help="default reports/bench/accuracy.json (--quick: reports/bench/accuracy_quick.json)")
    ap.add_argument("--mace-eval", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mace_eval is not None:
        mace_eval_main(args.mace_eval)
        return

    import torch

    from mlipops.frames import read_extxyz, write_extxyz

    THREADS = args.threads
    torch.set_num_threads(THREADS)
    mode = "quick" if args.quick else "full"
    out_path = args.out or ROOT / "reports/bench" / ("accuracy_quick.json" if args.quick else "accuracy.json")
    ours_settings = json.loads(json.dumps(OURS[mode]))
    if args.epochs:
        ours_settings["train"]["epochs"] = args.epochs
    mace_settings = dict(MACE[mode])
    if args.mace_epochs:
        mace_settings["max_num_epochs"] = args.mace_epochs
    run_mace_too = not args.skip_mace
    if run_mace_too and mace_version() is None:
        print("mace-torch is not installed (pip install -e '.[peers]'): MACE skipped")
        run_mace_too = False
    repeat, budget = (1, 2.0) if args.quick else (7, 20.0)
    rec = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mode": mode,
           "platform": platform.platform(), "torch": torch.__version__, "mace_torch": mace_version(),
           "cpu_count": len(os.sched_getaffinity(0)), "threads": THREADS, "elements": {}}
    print(f"mode {mode}; torch {torch.__version__}, mace-torch {rec['mace_torch']}; {rec['cpu_count']} CPUs, "
          f"{THREADS} threads")
    t_all = time.perf_counter()
    for element in args.elements:
        train_path, test_path = args.data_dir / f"{element}_training.extxyz", args.data_dir / f"{element}_test.extxyz"
        frames, rej = read_extxyz(train_path)
        test, rej_test = read_extxyz(test_path)
        if rej or rej_test:
            raise SystemExit(f"{element}: unreadable frames in {train_path} or {test_path}")
        if args.quick:
            frames = subsample(frames, 1 / 5, args.seed)
        train, val = stratified_split(frames, 0.1, args.seed)
        timing_frames = test[:6] if args.quick else test  # --quick: time 6 test structures only
        for a in train:
            a.info["split"] = "train"
        for a in val:
            a.info["split"] = "val"
        with tempfile.TemporaryDirectory(prefix=f"bench-acc-{element.lower()}-") as tmp:
            work = Path(tmp) if args.keep is None else args.keep / element
            work.mkdir(parents=True, exist_ok=True)
            data_path = work / "split.extxyz"
            write_extxyz(data_path, train + val)
            r = {"n_train": len(train), "n_val": len(val), "n_test": len(test),
                 "n_test_atoms": sum(len(a) for a in test), "train_file": str(train_path), "test_file": str(test_path),
                 "val_frame_ids": sorted(a.info["frame_id"] for a in val)}
            print(f"\n{element}: training the mlipops ensemble ({len(train)} train / {len(val)} val frames)",
                  flush=True)
            r["ours"] = run_ours(element, data_path, train, test, ours_settings, args.seed, repeat, budget,
                                 timing_frames)
            if run_mace_too:
                print(f"{element}: training MACE on the same split", flush=True)
                r["mace"] = run_mace(element, work, train, val, test_path, test, mace_settings, args.seed,
                                     repeat, budget, len(timing_frames))
            r["goal"] = goal(r, args.quick)
            rec["elements"][element] = r
            print_element(element, r)
            out_path.parent.mkdir(parents=True, exist_ok=True)  # after each element: a long run keeps its part
            out_path.write_text(json.dumps(rec, indent=2, default=float) + "\n")
    rec["wall_time_s"] = time.perf_counter() - t_all
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(rec, indent=2, default=float) + "\n")
    print(f"\ntotal {rec['wall_time_s']:.0f} s; wrote {out_path}")


if __name__ == "__main__":
    main()
