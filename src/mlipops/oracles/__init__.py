"""Reference ("oracle") calculators behind one interface: ``label(frames) -> frames``.

The default is ASE's EMT. Any ASE calculator can be plugged in from ``params.yaml``::

    oracle:
      calculator: ase.calculators.lj.LennardJones     # or ase.calculators.vasp.Vasp, ...
      kwargs: {sigma: 2.3, epsilon: 0.4, rc: 6.0}

``calculator: pyscf`` is the quantum-chemistry oracle of :mod:`mlipops.oracles.pyscf` (molecules and
clusters, with excited states; the ``qc`` extra)::

    oracle:
      calculator: pyscf
      kwargs: {basis: sto-3g, active_space: [2, 2], n_states: 2, states: same_ms}

Every labelled frame gets energy, forces and (for periodic cells) stress in a
SinglePointCalculator, plus its provenance: ``oracle_name``, ``oracle_version``, ``oracle_settings``.
An oracle whose calculator also returns ``excited_energies`` (eV, total energies of the roots above
the labelled one) gives each frame ``info['bo_gap']`` = ΔE₀₁ = E₁ − E₀ (eV) and
``info['excited_energies']`` (and ``info['state_spin_square']`` where the calculator returns it), which
the validate stage checks against ``validate.bo_gap_min_eV``, whatever the oracle.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator

from mlipops.calculators import calculator_version, import_calculator
from mlipops.errors import OracleError
from mlipops.frames import oracle_info, set_labels


class Oracle:
    """An ASE calculator factory plus provenance; ``label`` computes reference labels."""

    def __init__(self, name: str, factory, settings: dict[str, Any], version: str):
        self.name = name
        self._factory = factory
        self.settings = dict(settings)
        self.version = version

    def calculator(self) -> Calculator:
        try:
            return self._factory(**self.settings)
        except Exception as exc:
            raise OracleError(f"cannot build calculator {self.name!r} with {self.settings}: {exc}",
                              field="generate.oracle") from None

    def label(self, frames: Iterable[Atoms]) -> list[Atoms]:
        """Return copies of ``frames`` labelled with energy, forces and (periodic) stress."""
        calc = self.calculator()
        prov = oracle_info(self.name, self.version, self.settings)
        out = []
        for k, atoms in enumerate(frames):
            a = atoms.copy()
            a.calc = calc
            try:
                energy = a.get_potential_energy()
                forces = a.get_forces()
                stress = a.get_stress(voigt=True) if a.pbc.all() and a.cell.rank == 3 else None
            except OracleError as exc:
                raise OracleError(f"{self.name}: {exc.detail}", frame=k, field=exc.field) from None
            except Exception as exc:
                raise OracleError(f"{self.name} failed: {exc}", frame=k,
                                  field=str(atoms.info.get("config_type"))) from None
            extra = excited_state_info(calc, energy)
            a.calc = None
            set_labels(a, energy, np.array(forces), None if stress is None else np.array(stress))
            a.info.update(prov)
            a.info.update(extra)
            out.append(a)
        return out


def excited_state_info(calc: Calculator, energy: float) -> dict[str, Any]:
    """``bo_gap`` (ΔE₀₁, eV), ``excited_energies`` and ``state_spin_square`` of the calculator's last
    results, for a calculator that returns ``excited_energies``; {} for any other."""
    res = getattr(calc, "results", None) or {}
    exc = res.get("excited_energies")
    if exc is None or not len(np.atleast_1d(exc)):
        return {}
    exc = np.sort(np.atleast_1d(np.asarray(exc, dtype=float)))
    out: dict[str, Any] = {"bo_gap": float(exc[0] - energy), "excited_energies": exc}
    if res.get("state_spin_square") is not None:
        out["state_spin_square"] = np.atleast_1d(np.asarray(res["state_spin_square"], dtype=float))
    return out


def cannot_compute(oracle: Oracle, element: str, probe: Atoms | None = None) -> str | None:
    """Why ``oracle`` cannot compute ``element`` (one line), or None when it can: one tiny labelled calculation.

    ``probe``: the structure to try (a stage passes the unit cell it will build); default a periodic 2-atom
    bcc cell with nearest neighbours at twice the covalent radius. The calculator's own exception (EMT:
    "No EMT-potential for Mo"), or a non-finite energy or force, is the reason."""
    from ase.data import atomic_numbers, covalent_radii

    if probe is None:
        a = 2.0 * covalent_radii[atomic_numbers[element]] * 2.0 / np.sqrt(3.0)
        probe = Atoms(f"{element}2", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=[a, a, a], pbc=True)
    atoms = probe.copy()
    try:
        atoms.calc = oracle.calculator()
        e = atoms.get_potential_energy()
        f = atoms.get_forces()
    except OracleError as exc:
        return exc.detail
    except Exception as exc:  # noqa: BLE001 - any calculator's refusal is the answer
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}"[:300]
    if not (np.isfinite(e) and np.isfinite(f).all()):
        return f"a non-finite energy or force on a {len(atoms)}-atom {element} cell"
    return None


def require_element(oracle: Oracle, element: str, *, field: str, remedy: str, probe: Atoms | None = None,
                    what: str = "the reference oracle") -> None:
    """Stop a stage in one line (:class:`OracleError` naming ``field``, exit 2) when ``oracle`` cannot compute
    ``element`` (:func:`cannot_compute`), before any work: "the reference oracle emt cannot compute Mo:
    NotImplementedError: No EMT-potential for Mo; <remedy>"."""
    why = cannot_compute(oracle, element, probe)
    if why is not None:
        raise OracleError(f"{what} {oracle.name} cannot compute {element}: {why}; {remedy}", field=field)


def _import(path: str):
    if not path.rpartition(".")[0]:
        raise OracleError(f"calculator {path!r} is neither 'emt', 'pyscf' nor an import path "
                          "'package.module.Class'",
                          field="generate.oracle.calculator")
    return import_calculator(path, error=OracleError, field="generate.oracle.calculator")


def get_oracle(calculator: str = "emt", kwargs: dict[str, Any] | None = None) -> Oracle:
    """Build the oracle named in params: 'emt', 'pyscf' or any ASE calculator by import path."""
    import ase

    kwargs = dict(kwargs or {})
    if calculator.lower() == "emt":
        from ase.calculators.emt import EMT

        return Oracle("emt", EMT, kwargs, f"ase-{ase.__version__}")
    if calculator.lower() == "pyscf":
        from mlipops.oracles.pyscf import PySCF, pyscf_version, resolve_settings

        version = pyscf_version()
        # the full settings (defaults filled in) are the provenance: method, basis, active space, states
        return Oracle("pyscf", PySCF, resolve_settings(kwargs), f"pyscf-{version}")
    return Oracle(calculator, _import(calculator), kwargs, calculator_version(calculator))
