"""The fixed held-out trajectory of an active-learning campaign, and a model's error on it.

The trajectory is the oracle's own Langevin MD (:class:`~mlipops.params.ActiveHoldoutParams`): each
structure is heated through ``temperatures_K`` and a frame is kept every ``sample_every`` steps, with
the oracle's energy and forces. It is generated once per campaign, from its own seed, never from a
model, and never trained on, so every iteration is scored on the same frames.

Each frame records its ``temperature_K``, ``structure`` and ``phase``: ``liquid`` when the Lindemann
ratio (RMS minimum-image displacement of the atoms from their starting lattice sites, after removing
the mean displacement, over the nearest-neighbour distance) exceeds 0.15, else ``solid``. A solid
oscillates at 0.05-0.12; a liquid's atoms leave their sites (ratio 0.3 and more within a picosecond).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from ase import Atoms, units

from mlipops.crystal import Crystal
from mlipops.errors import StageInputError
from mlipops.frames import labels, read_extxyz, write_extxyz
from mlipops.params import ActiveHoldoutParams

LINDEMANN_LIQUID = 0.15


def lindemann_ratio(atoms: Atoms, reference: Atoms) -> float:
    """RMS minimum-image displacement from ``reference`` (mean displacement removed) / NN distance."""
    from ase.geometry import find_mic
    from ase.neighborlist import neighbor_list

    d, _ = find_mic(atoms.positions - reference.positions, atoms.cell, atoms.pbc)
    d -= d.mean(axis=0)
    dist = neighbor_list("d", reference, 3.5)
    nn = float(dist.min()) if len(dist) else 1.0
    return float(np.sqrt((d**2).sum(axis=1).mean()) / nn)


def holdout_fingerprint(p: ActiveHoldoutParams, crystal: Crystal, oracle) -> str:
    doc = {"params": p.model_dump(mode="json"), "element": crystal.element,
           "crystal": [crystal.lattice, round(crystal.a, 6), crystal.c], "oracle": oracle.name,
           "settings": oracle.settings, "version": oracle.version}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def generate(p: ActiveHoldoutParams, crystal: Crystal, oracle) -> list[Atoms]:
    """The oracle's heating trajectories, sampled and labelled (see the module docstring)."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    from mlipops.active.structures import build_structure

    frames = []
    for run, s in enumerate(p.structures):
        rng = np.random.default_rng([p.seed, run])
        atoms = build_structure(s, crystal)
        ref = atoms.copy()
        MaxwellBoltzmannDistribution(atoms, temperature_K=p.temperatures_K[0], rng=rng)
        Stationary(atoms)
        atoms.calc = oracle.calculator()
        atoms.set_constraint(FixCom())
        dyn = Langevin(atoms, p.timestep_fs * units.fs, temperature_K=p.temperatures_K[0],
                       friction=p.friction / units.fs, fixcm=False, rng=rng)
        for t in p.temperatures_K:
            dyn.set_temperature(temperature_K=t)
            for k in range(1, p.steps_per_temperature + 1):
                dyn.run(1)
                if k % p.sample_every:
                    continue
                a = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
                e, f = float(atoms.get_potential_energy()), atoms.get_forces().copy()
                if not (np.isfinite(e) and np.isfinite(f).all()):
                    raise StageInputError(f"the oracle returned a non-finite label on the held-out trajectory "
                                          f"({s.kind}, {t} K, step {k})", field="active.holdout")
                ratio = lindemann_ratio(a, ref)
                a.info.update(config_type=f"holdout_{s.kind}", structure=s.kind, temperature_K=float(t),
                              holdout_run=run, holdout_step=k, lindemann=ratio,
                              phase="liquid" if ratio > LINDEMANN_LIQUID else "solid")
                a.calc = SinglePointCalculator(a, energy=e, forces=f)
                frames.append(a)
    return frames


def load_or_generate(p: ActiveHoldoutParams, crystal: Crystal, oracle,
                     work_dir: str | Path) -> tuple[list[Atoms], Path]:
    """The campaign's held-out frames: ``p.file`` when given, else ``<work_dir>/holdout.extxyz``,
    generated when missing or made with other settings (its fingerprint is in ``holdout.json``)."""
    if p.file:
        frames, bad = read_extxyz(p.file)
        if bad:
            raise StageInputError(f"unreadable held-out frame: {bad[0].reason}", file=p.file, frame=bad[0].source_index)
        if not frames or any(labels(a)[1] is None for a in frames):
            raise StageInputError("the held-out file needs frames with reference forces", file=p.file,
                                  field="forces")
        return frames, Path(p.file)
    work_dir = Path(work_dir)
    path, meta = work_dir / "holdout.extxyz", work_dir / "holdout.json"
    key = holdout_fingerprint(p, crystal, oracle)
    if path.is_file() and meta.is_file():
        try:
            ok = json.loads(meta.read_text()).get("fingerprint") == key
        except json.JSONDecodeError:
            ok = False
        if ok:
            return read_extxyz(path)[0], path
    frames = generate(p, crystal, oracle)
    work_dir.mkdir(parents=True, exist_ok=True)
    write_extxyz(path, frames)
    meta.write_text(json.dumps({"fingerprint": key, "n_frames": len(frames),
                                "n_liquid": sum(a.info["phase"] == "liquid" for a in frames)}, indent=1) + "\n")
    return read_extxyz(path)[0], path


def errors(model, frames: list[Atoms], trusted_calculators=None) -> dict:
    """The model's (ensemble mean's) errors on labelled ``frames``: force MAE/RMSE (eV/Å, per component),
    energy MAE per atom (eV/atom), overall and per ``phase`` (solid/liquid) and per ``structure``.
    ``model``: a model directory, NAME@alias or a loaded model (a directory's baseline among the built-ins
    or ``trusted_calculators``)."""
    from mlipops.models import MlipopsCalculator

    calc = MlipopsCalculator(model, trusted_calculators=trusted_calculators)
    groups: dict[str, list] = {}
    for a in frames:
        e_ref, f_ref, _ = labels(a)
        b = Atoms(numbers=a.numbers, positions=a.positions, cell=a.cell, pbc=a.pbc)
        b.calc = calc
        e, f = b.get_potential_energy(), b.get_forces()
        row = (abs(e - e_ref) / len(a), np.abs(f - f_ref).ravel())
        for g in ("all", f"phase.{a.info.get('phase', 'unknown')}", f"structure.{a.info.get('structure', 'unknown')}"):
            groups.setdefault(g, []).append(row)
    out = {}
    for g, rows in groups.items():
        df = np.concatenate([r[1] for r in rows])
        prefix = "" if g == "all" else f"{g}."
        out[f"{prefix}force_mae"] = float(df.mean())
        out[f"{prefix}force_rmse"] = float(np.sqrt((df**2).mean()))
        out[f"{prefix}energy_mae_per_atom"] = float(np.mean([r[0] for r in rows]))
        out[f"{prefix}n_frames"] = len(rows)
    return out
