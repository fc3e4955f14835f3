"""Δ-learning: a cheap physical baseline (any ASE calculator) under the network.

The network learns E_ref − E_baseline (and F_ref − F_baseline, σ_ref − σ_baseline); every prediction adds
the baseline back. The model's ``config.json`` holds the baseline as data (``{"calculator": ..., "kwargs":
...}``); loading builds the named ASE calculator, it never unpickles anything.

``calculator`` is ``emt``, ``lj`` (``ase.calculators.lj.LennardJones``), ``morse``
(``ase.calculators.morse.MorsePotential``) or, in ``params.yaml``, an import path ``package.module.Class``
of any ASE calculator. A model folder is data: its config.json may name only the built-ins, or the
calculator params.yaml names when the caller passes it as trusted (:mod:`mlipops.models.schema`).
Baseline labels of training frames are computed once per frame and cached under
``data/cache/baseline/<settings key>/``; the key hashes the calculator, its kwargs and the version of the
package that provides it, so changing any of them recomputes the labels.

Literature pair potentials that make good baselines for the project's metals (Girifalco & Weizer,
Phys. Rev. 114, 687 (1959); ASE's ``rho0`` = α r0)::

    Cu: morse {epsilon: 0.3429, r0: 2.866, rho0: 3.894}
    Mo: morse {epsilon: 0.8032, r0: 2.976, rho0: 4.487}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from ase import Atoms

from mlipops.calculators import calculator_version, import_calculator, unknown_keywords
from mlipops.errors import MlipopsError
from mlipops.paths import atomic_path
from mlipops.pipeline import BASELINE_CACHE


BUILTIN = {"emt": "ase.calculators.emt.EMT", "lj": "ase.calculators.lj.LennardJones",
           "morse": "ase.calculators.morse.MorsePotential"}


def baseline_spec(calculator: str, kwargs: dict | None = None) -> dict:
    """The model-config dict of a baseline (validated: the calculator can be built)."""
    name = str(calculator).strip()
    path = BUILTIN.get(name.lower(), name)
    if "." not in path:
        raise MlipopsError(f"baseline calculator {calculator!r} is neither one of {sorted(BUILTIN)} nor an import "
                           "path 'package.module.Class'", field="train.baseline.calculator")
    spec = {"calculator": path, "kwargs": dict(kwargs or {}), "version": calculator_version(path)}
    Baseline(spec).calculator()  # fail now, with the settings named, not in a Dask worker later
    return spec


def frame_key(atoms: Atoms) -> str:
    """Content hash of what a calculator sees: numbers, positions, cell, pbc (not labels or info)."""
    h = hashlib.sha256()
    for arr in (np.asarray(atoms.numbers, np.int64), np.asarray(atoms.positions, np.float64),
                np.asarray(atoms.cell.array, np.float64), np.asarray(atoms.pbc, bool)):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:32]


class Baseline:
    """An ASE calculator named by a spec dict, with per-frame cached labels."""

    def __init__(self, spec: dict):
        self.spec = {"calculator": spec["calculator"], "kwargs": dict(spec.get("kwargs") or {}),
                     "version": spec.get("version") or calculator_version(spec["calculator"])}
        self.key = hashlib.sha256(json.dumps(self.spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.n_computed = 0  # frames actually sent to the calculator (cache misses)
        self._calc = None

    def __eq__(self, other) -> bool:
        return isinstance(other, Baseline) and other.spec == self.spec

    def __repr__(self) -> str:
        return f"Baseline({self.spec['calculator']}, {self.spec['kwargs']})"

    def calculator(self):
        if self._calc is None:
            factory = import_calculator(self.spec["calculator"], what="baseline calculator",
                                        field="train.baseline.calculator")
            unknown, known = unknown_keywords(factory, self.spec["kwargs"])
            if unknown:
                raise MlipopsError(f"cannot build baseline {self.spec['calculator']}: unknown parameter(s) {unknown} "
                                   f"(known: {known})", field="train.baseline.kwargs")
            try:
                self._calc = factory(**self.spec["kwargs"])
            except Exception as exc:  # noqa: BLE001
                raise MlipopsError(f"cannot build baseline {self.spec['calculator']} with {self.spec['kwargs']}: "
                                   f"{exc}", field="train.baseline.kwargs") from None
        return self._calc

    def compute(self, atoms: Atoms, stress: bool | None = None, energies: bool = False) -> dict:
        """Baseline energy, forces, stress (periodic cells) and optionally per-atom energies of ``atoms``."""
        a = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        a.calc = self.calculator()
        periodic = bool(a.pbc.all() and a.cell.rank == 3)
        try:
            out = {"energy": float(a.get_potential_energy()), "forces": np.array(a.get_forces(), dtype=float)}
            if periodic if stress is None else (stress and periodic):
                out["stress"] = np.array(a.get_stress(voigt=True), dtype=float)
            if energies:
                try:
                    out["energies"] = np.array(a.get_potential_energies(), dtype=float)
                except Exception:  # noqa: BLE001 - a calculator without per-atom energies
                    pass
        except Exception as exc:  # noqa: BLE001
            raise MlipopsError(f"baseline {self.spec['calculator']} failed: {exc}",
                               field="train.baseline") from None
        self.n_computed += 1
        return out

    def labels(self, frames: list[Atoms], cache_dir: str | Path | None = BASELINE_CACHE) -> list[dict]:
        """Baseline labels of each frame ({energy, forces[, stress]}), from the cache where present."""
        out = []
        cdir = Path(cache_dir) / self.key if cache_dir is not None else None
        if cdir is not None:
            cdir.mkdir(parents=True, exist_ok=True)
            spec_file = cdir / "baseline.json"
            if not spec_file.is_file():
                spec_file.write_text(json.dumps(self.spec, indent=2, sort_keys=True) + "\n")
        for a in frames:
            path = cdir / f"{frame_key(a)}.npz" if cdir is not None else None
            if path is not None and path.is_file():
                try:
                    with np.load(path) as z:
                        out.append({k: (float(z[k]) if k == "energy" else np.array(z[k])) for k in z.files})
                    continue
                except Exception:  # noqa: BLE001 - a torn cache file: recompute it
                    pass
            res = self.compute(a)
            if path is not None:
                with atomic_path(path) as tmp, tmp.open("wb") as fh:
                    np.savez(fh, **res)
            out.append(res)
        return out


def plus_baseline(pred: dict, base: dict) -> dict:
    """The totals of a Δ-learning model (the network predicts what the baseline leaves): each quantity of the
    network's ``pred`` plus the baseline's in ``base`` (energy, forces, stress, per-atom energies; of one frame,
    or of several: an array of energies, lists of per-frame arrays added pairwise), the network's first. A
    quantity the baseline lacks is left out (no per-atom split of the baseline: no per-atom energies rather
    than wrong ones)."""
    return {k: [p + b for p, b in zip(v, base[k])] if isinstance(v, (list, tuple)) else v + base[k]
            for k, v in pred.items() if k in base}


def add_baseline(model, frames: list[Atoms], energies: np.ndarray, forces: list[np.ndarray],
                 cache_dir: str | Path | None = BASELINE_CACHE) -> tuple[np.ndarray, list[np.ndarray]]:
    """Total predictions: the network's ``energies``/``forces`` of ``frames`` plus the model's baseline
    (:func:`plus_baseline`, its labels from the cache in ``cache_dir``)."""
    base = getattr(model, "baseline", None)
    if base is None:
        return energies, forces
    labs = base.labels(frames, cache_dir)
    total = plus_baseline({"energy": np.asarray(energies), "forces": forces},
                          {"energy": np.array([x["energy"] for x in labs]), "forces": [x["forces"] for x in labs]})
    return total["energy"], total["forces"]
