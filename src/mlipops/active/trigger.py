"""When to ask the oracle: committee statistics of one MD step, the trigger, and de-duplication.

Committee statistics (:func:`committee_stats`) of an ensemble of M members at one MD step, from the
members' forces F_i^k (eV/Å, atom i, member k) and the atoms' velocities v_i:

- σ_F,i = ‖std_k(F_i^k)‖ (eV/Å): the Euclidean norm of the per-component sample standard deviation
  over members (ddof = 1), i.e. sqrt(Σ_c std_k(F_ic^k)²). This is exactly the norm of the
  ``forces_std`` row that :class:`~mlipops.models.MlipopsCalculator` returns for atom i.
- the power of member k, P_k = Σ_i F_i^k · v_i (eV/fs): the rate at which member k's forces change
  the kinetic energy, i.e. minus the rate of change of its potential energy along the trajectory.
- the velocity-projected uncertainty σ_proj = std_k(P_k) · Δt (eV, sample std, ddof = 1): the
  spread of the members' predictions of the energy change the next step of length Δt makes. Force
  disagreement perpendicular to every velocity, or zero velocities, give σ_proj = 0 however large
  σ_F is; disagreement along the velocities gives the largest σ_proj.
  Per atom, σ_proj,i = std_k(F_i^k · v_i) · Δt (eV).

Units: ASE velocities are in Å per ASE time unit (Å·sqrt(amu/eV)); ``ase.units.fs`` is one
femtosecond in that unit, so v[Å/fs] = v[ASE] · ``ase.units.fs``.

The :class:`Trigger` fires on one of three criteria (``mode``): the projected uncertainty
(``projected``, σ_proj > ``sigma_projected_eV``), a DP-GEN-style trust level on the largest
per-atom force disagreement (``force``, max_i σ_F,i > ``sigma_force_eVA``) or the hull's
extrapolation grade (``gamma``, max_i γ_i > ``gamma_max``); ``random`` makes every step a candidate
(the selection is then a random draw: the baseline the benchmark compares the triggers with).

De-duplication (:func:`deduplicate`) works on per-frame fingerprints (:func:`fingerprint`): the
per-species mean and standard deviation of the atoms' descriptors (:mod:`mlipops.descriptors`),
compared by the root-mean-square difference of those vectors; frames of different composition are
never duplicates of each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from ase import Atoms
from ase import units

from mlipops.errors import MlipopsError

MODES = ("projected", "force", "gamma", "random")


def committee_stats(member_forces: np.ndarray, velocities: np.ndarray, dt_fs: float) -> dict:
    """Committee statistics of one MD step (see the module docstring for the definitions).

    ``member_forces``: [M, N, 3] eV/Å; ``velocities``: [N, 3] in ASE units (``atoms.get_velocities()``);
    ``dt_fs``: the time step in fs. Returns ``sigma_f`` [N] (eV/Å), ``max_sigma_f`` (eV/Å),
    ``power`` [M] (eV/fs), ``sigma_projected`` (eV), ``sigma_projected_per_atom`` [N] (eV) and
    ``max_sigma_projected_per_atom`` (eV). With one member every spread is 0."""
    f = np.asarray(member_forces, dtype=np.float64)
    v = np.asarray(velocities, dtype=np.float64)
    if f.ndim != 3 or f.shape[2] != 3 or v.shape != f.shape[1:]:
        raise MlipopsError(f"member forces must be [M, N, 3] and velocities [N, 3] (got {f.shape} and {v.shape})",
                           field="member_forces")
    m, n = f.shape[:2]
    v_fs = v * units.fs  # Å/fs
    per_atom_power = np.einsum("kic,ic->ki", f, v_fs)  # [M, N] eV/fs
    power = per_atom_power.sum(axis=1)  # [M] eV/fs
    if m > 1:
        sigma_f = np.linalg.norm(f.std(axis=0, ddof=1), axis=1)  # [N]
        sigma_proj = float(power.std(ddof=1)) * float(dt_fs)
        sigma_proj_i = per_atom_power.std(axis=0, ddof=1) * float(dt_fs)
    else:
        sigma_f, sigma_proj, sigma_proj_i = np.zeros(n), 0.0, np.zeros(n)
    return {"sigma_f": sigma_f, "max_sigma_f": float(sigma_f.max(initial=0.0)), "power": power,
            "sigma_projected": sigma_proj, "sigma_projected_per_atom": sigma_proj_i,
            "max_sigma_projected_per_atom": float(sigma_proj_i.max(initial=0.0))}


@dataclass(frozen=True)
class Trigger:
    """Fires on ``mode``: ``projected`` (σ_proj > ``sigma_projected_eV``, eV), ``force``
    (max σ_F > ``sigma_force_eVA``, eV/Å) or ``gamma`` (max γ > ``gamma_max``)."""

    mode: str = "projected"
    sigma_projected_eV: float = 0.002
    sigma_force_eVA: float = 0.1
    gamma_max: float = 2.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise MlipopsError(f"unknown trigger mode {self.mode!r} (expected one of {', '.join(MODES)})",
                               field="active.mode")

    def check(self, stats: dict, gamma_max: float | None = None) -> tuple[bool, str]:
        """(fires, reason): the reason names the statistic, its value and the threshold."""
        if self.mode == "projected":
            x, t, what = stats["sigma_projected"], self.sigma_projected_eV, "sigma_projected"
        elif self.mode == "force":
            x, t, what = stats["max_sigma_f"], self.sigma_force_eVA, "max_sigma_f"
        elif self.mode == "random":
            return True, "random"
        else:
            if gamma_max is None:
                raise MlipopsError("trigger mode 'gamma' needs the hull's γ (an index)", field="active.mode")
            x, t, what = gamma_max, self.gamma_max, "gamma_max"
        fires = bool(x > t)
        return fires, f"{what}={x:.4g} {'>' if fires else '<='} {t:.4g}"

    def fires(self, stats: dict, gamma_max: float | None = None) -> bool:
        return self.check(stats, gamma_max)[0]


# ----------------------------------------------------------------------------------- de-duplication
@dataclass(frozen=True)
class Fingerprint:
    """A frame's composition (sorted (Z, count) pairs) and descriptor vector (per-species
    mean and std of the atoms' descriptors, species in ``species`` order)."""

    composition: tuple
    vector: np.ndarray

    def distance(self, other: "Fingerprint") -> float:
        """RMS difference of the descriptor vectors; inf between different compositions."""
        if self.composition != other.composition or self.vector.shape != other.vector.shape:
            return float("inf")
        return float(np.sqrt(np.mean((self.vector - other.vector) ** 2)))


def fingerprints(frames: Sequence[Atoms], species: list[str], descriptor: dict) -> list[Fingerprint]:
    """Fingerprints of frames with the descriptor of ``species``/``descriptor`` (a potential's
    ``species`` and ``descriptor_params``)."""
    from mlipops.descriptors import compute_descriptors

    if not frames:
        return []
    g, _ = compute_descriptors(list(frames), species, descriptor)
    out, start = [], 0
    for a in frames:
        ga = g[start:start + len(a)]
        start += len(a)
        sym = np.array(a.get_chemical_symbols())
        parts = []
        for s in species:
            gs = ga[sym == s]
            if len(gs):
                parts += [gs.mean(axis=0), gs.std(axis=0)]
            else:
                parts += [np.zeros(ga.shape[1]), np.zeros(ga.shape[1])]
        z, c = np.unique(a.numbers, return_counts=True)
        out.append(Fingerprint(tuple(zip(z.tolist(), c.tolist())), np.concatenate(parts)))
    return out


def deduplicate(candidates: Sequence, fps: Sequence[Fingerprint], min_distance: float, max_batch: int,
                previous: Iterable[Fingerprint] = (), scores: Sequence[float] | None = None) -> list[int]:
    """Indices of the candidates to label: greedy, in order of decreasing ``scores`` (default: the
    given order), a candidate is taken when its fingerprint is at least ``min_distance`` from every
    frame taken so far and from every ``previous`` (already selected) frame; at most ``max_batch``."""
    if len(candidates) != len(fps):
        raise MlipopsError(f"{len(candidates)} candidates but {len(fps)} fingerprints", field="fingerprints")
    if max_batch < 0 or min_distance < 0:
        raise MlipopsError("max_batch and min_distance must be ≥ 0", field="active.max_batch")
    order = range(len(fps)) if scores is None else np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    taken: list[Fingerprint] = list(previous)
    chosen: list[int] = []
    for k in order:
        if len(chosen) >= max_batch:
            break
        if all(fps[k].distance(t) >= min_distance for t in taken):
            chosen.append(int(k))
            taken.append(fps[k])
    return chosen
