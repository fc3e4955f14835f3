"""Energy conservation of the trained model in a short NVE run (a promotion gate).

A potential whose energy is not a smooth function of the positions (a kink at the cutoff, a
neighbour list missing pairs, non-conservative forces) heats or cools an NVE simulation: the total
energy E = K + U drifts. We run velocity-Verlet MD of the ensemble's mean potential (what a user
runs, ``MlipopsCalculator`` in float64 with its Verlet-skin neighbour list) on a hot crystal, and the
same run with the reference oracle. The crystal is the data's own (:func:`mlipops.crystal.resolve`: the
``crystal`` params, their nulls from the curated training data; ``evaluate.nve.element``/``structure``
override it) at the model's own 0 K lattice constant (E(a) scanned with the model, as the melting stage
does), so the run starts at the model's equilibrium whatever the element and lattice. A reference oracle
that cannot compute the element stops the stage in one line before any MD
(:func:`mlipops.oracles.require_element`).

- ``energy_drift_meV_per_atom_per_ps``: slope of a least-squares line through E_tot(t)/N, over
  the run after the first ``discard_fs`` (the start-up transient of the MB velocities);
- ``energy_rms_meV_per_atom``: RMS of E_tot/N about that line (the integrator's bounded
  fluctuation, ∝ dt² for a smooth potential);
- the same two for the reference at the same time step. Velocity Verlet is symplectic: with a
  smooth potential its energy error stays bounded and does not drift, so a model drift well above
  the reference's is the model's own (non-smooth) fault, not the time step's.

Non-finite energies or forces at any step make the drift NaN, which fails the gate. Reports:
``reports/evaluate/nve/{metrics.json, summary.md, energy.png}``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from mlipops.crystal import Crystal, bulk_cell, resolve, train_frames, unit_cell
from mlipops.errors import MlipopsError, StageInputError
from mlipops.oracles import get_oracle, require_element
from mlipops.params import CrystalParams, NveParams, OracleParams
from mlipops.report import progress, write_markdown, write_metrics
# DATA: the curated data whose training split gives the crystal
from mlipops.pipeline import ACCEPTED as DATA, MODELS_DIR, NVE_REPORTS as REPORT_DIR



def nve_trace(atoms, calc, temperature_K: float, timestep_fs: float, steps: int, seed: int, advance=None) -> dict:
    """Velocity-Verlet run of ``atoms`` with ``calc``: time (fs) and E_tot, E_pot per atom (eV) per step.

    Velocities: Maxwell-Boltzmann at 2 T (equipartition brings the crystal to about T), zero total
    momentum. Stops at the first non-finite energy or force, or exception of the calculator
    (``finite`` False, ``error`` the reason, ``n_steps_done`` where). ``advance``: a :func:`~mlipops.report.progress`
    callback, given the step count.
    """
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    a = atoms.copy()
    a.calc = calc
    MaxwellBoltzmannDistribution(a, temperature_K=2 * temperature_K, rng=np.random.default_rng(seed))
    Stationary(a)
    n = len(a)
    t, e_tot, e_pot, temp = [], [], [], []

    dyn = VelocityVerlet(a, timestep=timestep_fs * units.fs)

    def record():
        if t and dyn.nsteps * timestep_fs == t[-1]:
            return  # ASE calls the observers at the start of run() too: step 0 is already recorded
        ep = a.get_potential_energy()
        f = a.get_forces()
        ek = a.get_kinetic_energy()
        if not (math.isfinite(ep) and np.isfinite(f).all()):
            raise FloatingPointError(f"non-finite energy or force at step {dyn.nsteps}")
        t.append(dyn.nsteps * timestep_fs)
        e_tot.append((ep + ek) / n)
        e_pot.append(ep / n)
        temp.append(a.get_temperature())
        if advance is not None:
            advance(completed=dyn.nsteps)

    dyn.attach(record, interval=1)
    t0 = time.perf_counter()
    error = None
    try:
        record()
        dyn.run(steps)
    except Exception as exc:  # noqa: BLE001 - a potential that fails mid-run fails the gate, with the reason
        error = f"{type(exc).__name__}: {exc}"
    wall = time.perf_counter() - t0
    return {"t_fs": t, "e_tot": e_tot, "e_pot": e_pot, "temperature": temp, "finite": error is None,
            "error": error, "n_steps_done": max(len(t) - 1, 0), "wall_s": wall}


def drift(trace: dict, discard_fs: float) -> dict:
    """Drift (meV/atom/ps, least-squares slope) and RMS about the line (meV/atom) after ``discard_fs``."""
    t = np.asarray(trace["t_fs"], dtype=float)
    e = np.asarray(trace["e_tot"], dtype=float)
    keep = t >= discard_fs
    if not trace["finite"] or keep.sum() < 3:
        return {"drift": float("nan"), "rms": float("nan"), "mean_temperature": float("nan")}
    slope, icpt = np.polyfit(t[keep], e[keep], 1)
    rms = float(np.sqrt(np.mean((e[keep] - (slope * t[keep] + icpt)) ** 2)))
    return {"drift": float(slope) * 1e3 * 1e3, "rms": rms * 1e3,  # eV/fs -> meV/ps; eV -> meV
            "mean_temperature": float(np.mean(np.asarray(trace["temperature"])[keep]))}


def _plot(traces: dict[str, dict], path: Path, discard_fs: float) -> None:
    from mlipops.report import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, tr in traces.items():
        e = np.asarray(tr["e_tot"])
        if len(e):
            ax.plot(np.asarray(tr["t_fs"]) / 1000, (e - e[0]) * 1e3, label=name)
    ax.axvline(discard_fs / 1000, color="grey", lw=0.8, ls=":", label="fit starts")
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("E_tot − E_tot(0) (meV/atom)")
    ax.set_title("NVE energy conservation (velocity Verlet)")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def nve_crystal(q: NveParams, cp: CrystalParams, data: Path) -> Crystal:
    """The crystal of the run: ``crystal`` params ``cp`` with ``evaluate.nve.element``/``structure`` (``q``) where
    set (a given ``crystal.a``/``c`` is dropped when they name another element or lattice), nulls from ``data``."""
    upd = {}
    if q.element is not None and q.element != cp.element:
        upd |= {"element": q.element, "a": None, "c": None}
    if q.structure is not None and q.structure != cp.lattice:
        upd |= {"lattice": q.structure, "a": None, "c": None}
    return resolve(cp.model_copy(update=upd), train_frames(data))


def model_lattice_constant(cr: Crystal, calc) -> tuple[float, str]:
    """(a Å, where it comes from): the calculator's own 0 K lattice constant of ``cr``'s lattice, by the melting
    stage's E(a) scan (parabola through the lowest points of ±6 %, recentred, then ±2 %) started from ``cr.a``;
    ``cr.a`` itself, with the reason, when the calculator's E(a) has no minimum there (an untrained model: the
    drift is still measured, from the data's crystal)."""
    from mlipops.evaluate.melting import _scan

    a = cr.a
    try:
        for _ in range(4):  # recentre while the minimum lies near the edge of the scan
            a_min, _ = _scan(cr.element, cr.lattice, calc, a, 0.06)
            if abs(a_min / a - 1.0) < 0.05:
                break
            a = a_min
        return _scan(cr.element, cr.lattice, calc, a_min, 0.02)[0], "the model's own"
    except MlipopsError as exc:
        return cr.a, f"the crystal's ({exc.detail.split(' (curvature')[0]} for the model)"


def run(q: NveParams, crystal: CrystalParams, reference: OracleParams, model_name: str, trusted_calculators=None,
        model_dir: Path | None = None, out: Path = REPORT_DIR, data: Path | None = None) -> dict:
    """The ``nve`` stage: ``evaluate.nve`` (``q``), ``crystal``, the reference oracle (``generate.oracle``), the
    model ``train.model_name`` and the calculators its config may name (:func:`mlipops.models.schema.
    trusted_calculators`)."""
    import torch

    from mlipops.models.calculator import MlipopsCalculator
    from mlipops.models.ensemble import load_model

    t0 = time.perf_counter()
    model_dir = Path(model_dir or MODELS_DIR / model_name)
    if not (model_dir / "config.json").is_file():
        raise StageInputError("trained model missing: run `dvc repro train` first", file=str(model_dir))
    cr = nve_crystal(q, crystal, Path(data or DATA))
    element = cr.element
    oracle = None
    if q.reference:
        oracle = get_oracle(reference.calculator, reference.kwargs)
        require_element(oracle, element, probe=unit_cell(cr), field="evaluate.nve.reference",
                        remedy="set evaluate.nve.reference: false or name an oracle that can")
    model = MlipopsCalculator(load_model(model_dir, dtype=torch.float64, trusted_calculators=trusted_calculators),
                              dtype=torch.float64, skin=q.skin)
    a_model, a_source = model_lattice_constant(cr, model)
    atoms = bulk_cell(cr.with_a(a_model), q.supercell)
    with progress("NVE MD of the model (steps)", q.steps) as advance:
        traces = {"model": nve_trace(atoms, model, q.temperature_K, q.timestep_fs, q.steps, q.seed, advance)}
    if oracle is not None:
        with progress("NVE MD of the reference (steps)", q.steps) as advance:
            traces["reference"] = nve_trace(atoms, oracle.calculator(), q.temperature_K, q.timestep_fs, q.steps, q.seed,
                                            advance)
    stats = {k: drift(tr, q.discard_fs) for k, tr in traces.items()}
    out.mkdir(parents=True, exist_ok=True)
    _plot(traces, out / "energy.png", q.discard_fs)
    m = stats["model"]
    metrics = {"energy_drift_meV_per_atom_per_ps": m["drift"],
               "abs_energy_drift_meV_per_atom_per_ps": abs(m["drift"]),
               "energy_rms_meV_per_atom": m["rms"], "mean_temperature_K": m["mean_temperature"],
               "finite": int(traces["model"]["finite"]), "n_steps_done": traces["model"]["n_steps_done"],
               "n_atoms": len(atoms), "lattice_constant_A": a_model, "timestep_fs": q.timestep_fs, "steps": q.steps,
               "model_ms_per_step": 1e3 * traces["model"]["wall_s"] / max(traces["model"]["n_steps_done"], 1)}
    if "reference" in stats:
        r = stats["reference"]
        metrics |= {"reference.energy_drift_meV_per_atom_per_ps": r["drift"],
                    "reference.energy_rms_meV_per_atom": r["rms"],
                    "reference.mean_temperature_K": r["mean_temperature"]}
    metrics["wall_s"] = round(time.perf_counter() - t0, 2)
    write_metrics(out, metrics)
    from mlipops.provenance import model_identity, write_provenance

    write_provenance(out, "nve", **model_identity(model_dir))  # its weights; data: what it was trained on
    rows = [(name, s["drift"], s["rms"], s["mean_temperature"], traces[name]["n_steps_done"],
             "yes" if traces[name]["finite"] else "NO") for name, s in stats.items()]
    verdict = (f"The model stopped after step {traces['model']['n_steps_done']}: {traces['model']['error']}."
               if not traces["model"]["finite"] else
               f"The model's total energy drifts by {m['drift']:+.3g} meV/atom/ps"
               + (f" against {stats['reference']['drift']:+.3g} for the reference at the same time step"
                  if "reference" in stats else "") + ".")
    write_markdown(out / "summary.md", "NVE energy conservation", [
        f"{len(atoms)}-atom {element} {cr.lattice} crystal at {a_source} a = {a_model:.4f} Å (crystal: {cr.source}), "
        f"Maxwell–Boltzmann velocities at 2 × {q.temperature_K:g} K, "
        f"velocity Verlet at {q.timestep_fs:g} fs for {q.steps} steps ({q.steps * q.timestep_fs / 1000:g} ps); drift = "
        f"least-squares slope of E_tot/N after the first {q.discard_fs:g} fs; RMS about that line.",
        verdict, "![E_tot(t)](energy.png)",
    ], table=(("calculator", "drift (meV/atom/ps)", "RMS (meV/atom)", "mean T (K)", "steps", "finite"), rows))
    return metrics


__all__ = ["drift", "model_lattice_constant", "nve_crystal", "nve_trace", "run"]
