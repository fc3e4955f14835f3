"""A quantum-chemistry oracle with excited states: PySCF state-averaged CASSCF as an ASE calculator.

``PySCF(basis=..., active_space=(n_el, n_orb), n_states=..., states=...)`` labels a molecule or
cluster (non-periodic) with

- ``energy`` (eV): the total energy of the lowest root E₀,
- ``forces`` (eV/Å): minus the analytic nuclear gradient of that root,
- ``excited_energies`` (eV): the total energies E₁ … E_{n-1} of the other roots, ascending,
- ``state_spin_square``: ⟨S²⟩ of every root 0 … n-1 (0 singlet, 0.75 doublet, 2 triplet).

The oracle factory (:func:`mlipops.oracles.get_oracle`, ``calculator: pyscf``) turns these into
``info['bo_gap']`` (ΔE₀₁ = E₁ − E₀, eV), ``info['excited_energies']`` and
``info['state_spin_square']`` of every labelled frame, with the full settings and the PySCF version
as its provenance (``oracle_settings``, ``oracle_version``).

Method: state-averaged CASSCF(n_el, n_orb), equal weights over ``n_states`` roots
------------------------------------------------------------------------------------
The point of this oracle is to find where the ground state stops being a single, isolated surface,
and there the ground state itself is multi-configurational: a bond breaking into a diradical
(H₂ → 2 H·), an ionic/covalent avoided crossing (LiF). Single-reference excited-state methods
(TDDFT, TDHF/CIS, EOM-CCSD) are built on one reference determinant that is qualitatively wrong
exactly there: restricted HF/DFT dissociate H₂ into H⁺H⁻ + H·H· halves and their triplet response
turns unstable (imaginary excitation energies) before the gap closes. State-averaged CASSCF treats
the near-degenerate configurations on an equal footing with one set of orbitals for all roots,
which is the standard choice for conical intersections and avoided crossings; PySCF gives
analytic gradients of a single root of an SA-CASSCF wavefunction (Lagrangian/Z-vector method,
``pyscf.grad.sacasscf``), used here for the forces of root 0. For H₂ in a minimal basis,
CAS(2,2) *is* full CI, so the oracle is exact within the basis. TDDFT is not offered: it is the
wrong tool for this job (above) and would give a gap that is an artefact of the reference.

Which excited states: ``states``
--------------------------------
- ``"same_ms"`` (default): every state with the ground state's S_z (PySCF's spin-free
  ``direct_spin1`` CI solver without a spin constraint), which includes the M_s = 0 components of
  higher-spin states. For H₂ this makes root 1 the ³Σu⁺ triplet (σg¹σu¹), which becomes degenerate
  with the ¹Σg⁺ ground state at dissociation. In a minimal basis the *singlet* excited states
  (¹Σu⁺, the second ¹Σg⁺) go to the ionic limit H⁺H⁻ and stay ~10 eV up, so a singlet-only scan of
  H₂ would never see the cliff. The singlet-triplet degeneracy *is* a breakdown of a single
  ground-state potential: near dissociation the ground state is a diradical whose two spin
  couplings cost the same energy, so spin-orbit coupling, an external field or a neighbouring
  molecule mixes them at no cost, the true electronic state is no longer one adiabatic surface,
  and the reference labels a potential would be trained on (RHF, RKS-DFT, even CCSD) fail there
  through static correlation.
- ``"same_spin"``: only states with the ground state's total spin S² (e.g. the ¹Σ⁺ ionic/covalent
  avoided crossing of LiF). For a singlet ground state the spin-adapted ``direct_spin0`` solver is
  used (it cannot represent odd-S states); otherwise a spin penalty (``fix_spin_``) with
  ``spin_shift``. Every root's ⟨S²⟩ is checked against the ground state's afterwards.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.units import Bohr, Hartree

from mlipops.errors import OracleError

METHODS = ("casscf",)
STATES = ("same_ms", "same_spin")
DEFAULTS: dict[str, Any] = {
    "basis": "sto-3g",
    "method": "casscf",
    "active_space": [2, 2],    # [n_electrons, n_orbitals]
    "n_states": 2,             # roots, equally weighted in the state average; root 0 is the labelled surface
    "states": "same_ms",
    "charge": 0,
    "spin": 0,                 # 2S = N_alpha - N_beta, PySCF's convention
    "conv_tol": 1e-10,         # Hartree, CASSCF energy convergence (forces are checked against finite differences)
    "spin_shift": 1.0,         # Hartree, the spin penalty of same_spin for a non-singlet ground state
    "spin_tolerance": 0.05,    # |<S²> - S(S+1)| allowed for same_spin roots
    "num_threads": 1,          # OpenMP threads of PySCF during a call: small molecules run fastest on one
                               # (10-30x faster than 2 contended threads, measured on H2)
}


def resolve_settings(kwargs: dict[str, Any] | None, where: str = "oracle.kwargs") -> dict[str, Any]:
    """The full settings of the oracle (defaults filled in), validated; raises OracleError naming the key."""
    out = dict(DEFAULTS)
    for k, v in (kwargs or {}).items():
        if k not in DEFAULTS:
            raise OracleError(f"unknown PySCF oracle setting {k!r} (known: {', '.join(DEFAULTS)})",
                              field=f"{where}.{k}")
        out[k] = v
    if out["method"] not in METHODS:
        raise OracleError(f"method {out['method']!r} is not supported (use one of {METHODS}; see "
                          "mlipops.oracles.pyscf for why not TDDFT)", field=f"{where}.method")
    if out["states"] not in STATES:
        raise OracleError(f"states {out['states']!r} must be one of {STATES}", field=f"{where}.states")
    try:
        n_el, n_orb = (int(x) for x in out["active_space"])
    except (TypeError, ValueError):
        raise OracleError(f"active_space must be [n_electrons, n_orbitals] (got {out['active_space']!r})",
                          field=f"{where}.active_space") from None
    if n_el < 1 or n_orb < 1 or n_el > 2 * n_orb:
        raise OracleError(f"active_space [{n_el}, {n_orb}] is impossible (need 1 <= n_electrons <= 2 n_orbitals)",
                          field=f"{where}.active_space")
    out["active_space"] = [n_el, n_orb]
    for key, low in (("n_states", 2), ("spin", 0), ("num_threads", 1)):
        if not isinstance(out[key], (int, np.integer)) or isinstance(out[key], bool) or out[key] < low:
            raise OracleError(f"{key} must be an integer >= {low} (got {out[key]!r})", field=f"{where}.{key}")
    if not isinstance(out["charge"], (int, np.integer)) or isinstance(out["charge"], bool):
        raise OracleError(f"charge must be an integer (got {out['charge']!r})", field=f"{where}.charge")
    if not isinstance(out["basis"], str):
        raise OracleError(f"basis must be a basis-set name such as 'sto-3g' (got {out['basis']!r})",
                          field=f"{where}.basis")
    for key in ("conv_tol", "spin_shift", "spin_tolerance"):
        if not isinstance(out[key], (int, float)) or not out[key] > 0:
            raise OracleError(f"{key} must be a positive number (got {out[key]!r})", field=f"{where}.{key}")
    return out


def pyscf_version() -> str:
    try:
        import pyscf
    except ImportError:
        raise OracleError("PySCF is not installed: install the qc extra, pip install -e '.[qc]'",
                          field="oracle.calculator") from None
    return pyscf.__version__


class PySCF(Calculator):
    """ASE calculator: SA-CASSCF energies of ``n_states`` roots and analytic forces of root 0 (PySCF)."""

    implemented_properties = ["energy", "forces", "excited_energies", "state_spin_square"]
    name = "pyscf"

    def __init__(self, **kwargs):
        pyscf_version()
        self.settings = resolve_settings(kwargs)
        super().__init__()

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        if a.pbc.any():
            raise OracleError(f"PySCF oracle labels molecules and clusters only; this frame is periodic "
                              f"(pbc={a.pbc.tolist()})", field="pbc")
        energies, spin_sq, grad = run_casscf(a, self.settings)
        self.results = {
            "energy": float(energies[0]),
            "forces": -grad * Hartree / Bohr,  # [n_atoms, 3] eV/Å
            "excited_energies": np.asarray(energies[1:], dtype=float),
            "state_spin_square": np.asarray(spin_sq, dtype=float),
        }


def _mole(atoms: Atoms, s: dict[str, Any]):
    from pyscf import gto

    try:
        return gto.M(atom=[(sym, tuple(map(float, pos))) for sym, pos in zip(atoms.get_chemical_symbols(),
                                                                             atoms.positions)],
                     unit="Angstrom", basis=s["basis"], charge=int(s["charge"]), spin=int(s["spin"]),
                     verbose=0, output="/dev/null")
    except Exception as exc:  # bad basis name, impossible charge/spin parity, unknown element
        raise OracleError(f"PySCF cannot build the molecule {atoms.get_chemical_formula()} "
                          f"(basis {s['basis']!r}, charge {s['charge']}, spin {s['spin']}): {exc}",
                          field="oracle.kwargs") from None


def run_casscf(atoms: Atoms, s: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SA-CASSCF on ``atoms``: (root energies eV [n_states], <S²> [n_states], gradient of root 0 Ha/Bohr [n, 3])."""
    from pyscf import lib

    before = lib.num_threads()
    lib.num_threads(int(s["num_threads"]))
    try:
        return _run_casscf(atoms, s)
    finally:
        lib.num_threads(before)


def _run_casscf(atoms: Atoms, s: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from pyscf import fci, mcscf, scf

    mol = _mole(atoms, s)
    n_el, n_orb = s["active_space"]
    n = int(s["n_states"])
    mf = scf.RHF(mol)  # ROHF for an open-shell ground state (mol.spin > 0)
    mf.conv_tol = min(1e-12, float(s["conv_tol"]) * 1e-2)
    mf.kernel()
    if not mf.converged:
        raise OracleError(f"the SCF reference of {atoms.get_chemical_formula()} did not converge",
                          field="oracle.kwargs")
    try:
        mc = mcscf.CASSCF(mf, n_orb, n_el)
    except Exception as exc:
        raise OracleError(f"active space {s['active_space']} does not fit {atoms.get_chemical_formula()} in "
                          f"basis {s['basis']!r}: {exc}", field="oracle.kwargs.active_space") from None
    target = 0.5 * s["spin"] * (0.5 * s["spin"] + 1.0)
    if s["states"] == "same_spin":
        if s["spin"] == 0:
            mc.fcisolver = fci.direct_spin0.FCISolver(mol)  # symmetric CI vectors: even S only
        else:
            mc.fix_spin_(shift=float(s["spin_shift"]), ss=target)
    else:
        mc.fcisolver = fci.direct_spin1.FCISolver(mol)  # every M_s = spin/2 state
    mc = mc.state_average_([1.0 / n] * n)
    mc.conv_tol = float(s["conv_tol"])
    mc.verbose = 0
    try:
        mc.kernel()
    except Exception as exc:
        raise OracleError(f"SA-CASSCF{tuple(s['active_space'])} failed on {atoms.get_chemical_formula()}: {exc}",
                          field="oracle.kwargs") from None
    if not mc.converged:
        raise OracleError(f"SA-CASSCF{tuple(s['active_space'])} did not converge on {atoms.get_chemical_formula()}",
                          field="oracle.kwargs")
    e = np.asarray(mc.e_states, dtype=float)
    ss = np.round([fci.spin_op.spin_square0(c, n_orb, mc.nelecas)[0] for c in mc.ci], 8)
    order = np.argsort(e, kind="stable")
    if order[0] != 0:  # roots come ascending from the CI solver; keep the labelled root the lowest
        raise OracleError(f"SA-CASSCF roots are not in ascending order ({e.tolist()} Ha)", field="oracle.kwargs")
    if s["states"] == "same_spin":
        bad = [k for k, v in enumerate(ss) if abs(v - target) > s["spin_tolerance"]]
        if bad:
            raise OracleError(f"states 'same_spin': root {bad[0]} has <S²> = {ss[bad[0]]:.3f}, the ground state "
                              f"{target:.3f} (raise spin_shift or n_states)", field="oracle.kwargs.states")
    try:
        grad = np.asarray(mc.nuc_grad_method().kernel(state=0), dtype=float)
    except Exception as exc:
        raise OracleError(f"SA-CASSCF analytic gradient of root 0 failed: {exc}", field="oracle.kwargs") from None
    return e * Hartree, ss, grad
