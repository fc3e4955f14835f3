"""Per-atom bond-angle deviation from the ideal of the nearest crystal (coverage-index column).

Definition. For atom i with neighbours j = 1..z inside ``cutoff`` (periodic images included, from
:func:`mlipops.descriptors.neighbor_list`), take its z(z-1)/2 bond angles
θ_jik = ∠(r_ij, r_ik) in degrees, i.e. the empirical distribution P_i of angles. Each ideal
reference crystal c ∈ {fcc, bcc, sc, diamond, hcp (ideal c/a = √(8/3))} has its own first-shell
angle distribution R_c (:func:`reference_angles`: 66, 28, 15, 6 and 66 angles). Then::

    deviation_i       = min_c W1(P_i, R_c)          (degrees)
    nearest_crystal_i = argmin_c W1(P_i, R_c)

with W1 the 1-D Wasserstein-1 (earth mover's) distance between two distributions on the line,
W1(P, R) = ∫_0^1 |Q_P(q) - Q_R(q)| dq, Q the quantile function (inverse CDF). Empirical quantile
functions are step functions with steps at k/m (m = number of angles), so the integral is
evaluated *exactly*: on the union of both sets of step positions (kept as integers over the
common denominator lcm(m_P, m_R), so no floating-point ties) each interval has one sorted angle
of each side, and W1 = Σ width × |difference|. This is the "common grid of mid-point quantiles"
scheme with the grid chosen so that it is exact rather than approximate (agrees with
``scipy.stats.wasserstein_distance`` to rounding). Angles come from atan2(|u×v|, u·v), which keeps
full precision near 0° and 180° where arccos does not, so ideal crystals give ~1e-14°, not ~1e-7°.

Atoms with fewer than 2 neighbours have no angle: deviation NaN, nearest_crystal None.

Limits, read before using the number:

- angles only: bond lengths, and hence strain, compression and the coordination number itself,
  do not enter. W1 compares *distributions*, so an fcc atom next to a vacancy (z = 11, a subset of
  the fcc angles) gets a small deviation, and a uniformly scaled crystal gets exactly 0.
- the "first shell" is whatever lies inside the ``cutoff`` passed in (the index passes its
  ``coordination_cutoff``). It must fall between the first and second neighbour shells of the
  material for the comparison with the references (first shells within 1.05 × the nearest-neighbour
  distance, so bcc has 8 neighbours, not 14) to mean anything; a cutoff that catches the bcc second
  shell makes ideal bcc look deviated.
- the five references are the usual elemental lattices; any other environment (liquids, amorphous,
  molecules, compounds) is simply reported against the closest of them, and the name is only a
  label for the closest match, not a phase classification. Species are ignored.
- z = 2 and z = 3 environments have one and three angles: the number is well defined but says
  little (e.g. a linear chain matches the 180° tail of whichever reference is closest).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from mlipops.descriptors import neighbor_list

SHELL_TOL = 1.05  # first shell of a reference crystal: d <= SHELL_TOL * nearest-neighbour distance
HCP_COVERA = math.sqrt(8.0 / 3.0)  # ideal c/a: the 12 neighbours are equidistant
_PAIR_BUDGET = 1_000_000  # angle pairs processed per chunk (bounds memory for large z)


@functools.lru_cache(maxsize=64)
def _pairs(z: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.triu_indices(z, k=1)
    a.setflags(write=False)
    b.setflags(write=False)
    return a, b


def _angles_deg(u: np.ndarray) -> np.ndarray:
    """Sorted bond angles (degrees) of each row of neighbour vectors: [n, z, 3] -> [n, z(z-1)/2]."""
    a, b = _pairs(u.shape[1])
    x, y, z = (np.ascontiguousarray(u[..., k]) for k in range(3))  # component-wise: ~5x np.cross
    xa, xb, ya, yb, za, zb = x[:, a], x[:, b], y[:, a], y[:, b], z[:, a], z[:, b]
    dot = xa * xb + ya * yb + za * zb
    cx, cy, cz = ya * zb - za * yb, za * xb - xa * zb, xa * yb - ya * xb
    ang = np.arctan2(np.sqrt(cx * cx + cy * cy + cz * cz), dot)  # exact near 0° and 180°
    return np.sort(np.degrees(ang), axis=1)


def _bond_vectors(positions, cell, pbc, cutoff: float):
    """Neighbour list sorted by centre atom: (centre index i [e], vectors i->j [e, 3])."""
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    box = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64).reshape(3, 3)
    i, j, S, d = neighbor_list(pos, box, pbc, cutoff)
    keep = d > 0.0  # coincident atoms have no direction
    i, j, S = i[keep], j[keep], S[keep]
    vec = pos[j] - pos[i] + S @ box
    order = np.argsort(i, kind="stable")
    return i[order], vec[order]


@functools.lru_cache(maxsize=1)
def _reference_cache() -> tuple[tuple[str, np.ndarray], ...]:
    from ase.build import bulk

    structures = {  # lattice constants ~1; the angles do not depend on scale
        "fcc": bulk("Cu", "fcc", a=1.0, cubic=True),
        "bcc": bulk("Fe", "bcc", a=1.0, cubic=True),
        "sc": bulk("Po", "sc", a=1.0),
        "diamond": bulk("Si", "diamond", a=1.0, cubic=True),
        "hcp": bulk("Mg", "hcp", a=1.0, c=HCP_COVERA),
    }
    out = []
    for name, atoms in structures.items():
        # probe radius 1.5 > every nearest-neighbour distance at a = 1 (at most 1, sc and hcp)
        i, vec = _bond_vectors(atoms.positions, atoms.cell.array, atoms.pbc, 1.5)
        d = np.linalg.norm(vec, axis=1)
        first = (i == 0) & (d <= SHELL_TOL * d[i == 0].min())
        ang = _angles_deg(vec[first][None])[0]
        ang.setflags(write=False)
        out.append((name, ang))
    return tuple(out)


def reference_angles() -> dict[str, np.ndarray]:
    """Sorted first-shell bond angles (degrees) of the ideal crystals fcc, bcc, sc, diamond, hcp.

    Computed once (cached) from ``ase.build.bulk`` cells with lattice constant 1 (hcp with the
    ideal c/a = √(8/3)); first shell = neighbours of atom 0 within 1.05 × its nearest-neighbour
    distance, so fcc 12 → 66 angles, bcc 8 → 28, sc 6 → 15, diamond 4 → 6, hcp 12 → 66. The
    arrays are read-only (shared by the cache); the dict is a fresh copy on every call.
    """
    return dict(_reference_cache())


@functools.lru_cache(maxsize=256)
def _w1_plan(m: int, m_ref: int):
    """Exact W1 between step quantile functions with m and m_ref steps: (idx, idx_ref, weights)."""
    L = math.lcm(m, m_ref)
    edges = np.union1d(np.arange(m + 1, dtype=np.int64) * (L // m),
                       np.arange(m_ref + 1, dtype=np.int64) * (L // m_ref))
    lo = edges[:-1]
    plan = (lo // (L // m), lo // (L // m_ref), np.diff(edges) / L)
    for arr in plan:
        arr.setflags(write=False)
    return plan


def bond_angle_deviation(positions, cell, pbc, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Per atom: (deviation_deg float64 [n], nearest_crystal object array of str/None [n]).

    Neighbours are all atoms within ``cutoff`` (periodic images included), from
    :func:`mlipops.descriptors.neighbor_list` (vector i→j = positions[j] - positions[i] + S @ cell;
    ``cell`` may be None or zeros for a non-periodic system). For an atom with z >= 2 neighbours the
    deviation is the minimum over the reference crystals of the Wasserstein-1 distance (degrees)
    between its z(z-1)/2 bond angles and the reference's first-shell angles, and nearest_crystal is
    that reference's name; atoms with z < 2 get NaN and None. See the module docstring.

    Vectorized: atoms are grouped by z (one Python iteration per distinct z, chunked to bound
    memory); no loop over atoms.
    """
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if len(pos) == 0:
        return np.full(0, np.nan), np.full(0, None, dtype=object)
    i, vec = _bond_vectors(pos, cell, pbc, cutoff)
    return deviation_from_bonds(len(pos), i, vec)


def deviation_from_bonds(n: int, i: np.ndarray, vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`bond_angle_deviation` from a neighbour list already at hand: centre indices ``i``
    (sorted ascending) and bond vectors ``vec`` [e, 3] of the first shell (no zero vectors)."""
    dev = np.full(n, np.nan)
    name = np.full(n, None, dtype=object)
    if n == 0:
        return dev, name
    z = np.bincount(i, minlength=n)
    start = np.concatenate(([0], np.cumsum(z)[:-1]))
    refs = _reference_cache()
    names = np.array([r[0] for r in refs], dtype=object)
    for zv in np.unique(z[z >= 2]):
        zv = int(zv)
        m = zv * (zv - 1) // 2
        plans = [_w1_plan(m, len(r)) for _, r in refs]
        atoms = np.flatnonzero(z == zv)
        chunk = max(1, _PAIR_BUDGET // m)
        for c0 in range(0, len(atoms), chunk):
            sel = atoms[c0:c0 + chunk]
            ang = _angles_deg(vec[start[sel, None] + np.arange(zv)])  # [n_sel, m]
            w1 = np.stack([np.abs(ang[:, ia] - r[ir]) @ w
                           for (_, r), (ia, ir, w) in zip(refs, plans)])  # [n_refs, n_sel]
            best = np.argmin(w1, axis=0)
            dev[sel] = w1[best, np.arange(len(sel))]
            name[sel] = names[best]
    return dev, name
