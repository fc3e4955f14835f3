"""Bond-angle deviation from the nearest ideal crystal (mlipops.index.angles)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc100
from scipy.spatial.transform import Rotation
from scipy.stats import wasserstein_distance

from mlipops.descriptors import neighbor_list
from mlipops.index.angles import bond_angle_deviation, reference_angles

A_FCC = 3.6
# name -> (atoms, cutoff half-way between the first and second neighbour shells)
IDEAL = {
    "fcc": (lambda: bulk("Cu", "fcc", a=A_FCC, cubic=True), A_FCC * (1 / math.sqrt(2) + 1) / 2),
    "fcc-primitive": (lambda: bulk("Cu", "fcc", a=A_FCC), A_FCC * (1 / math.sqrt(2) + 1) / 2),
    "bcc": (lambda: bulk("Fe", "bcc", a=2.87, cubic=True), 2.87 * (math.sqrt(3) / 2 + 1) / 2),
    "sc": (lambda: bulk("Po", "sc", a=3.35), 3.35 * (1 + math.sqrt(2)) / 2),
    "diamond": (lambda: bulk("Si", "diamond", a=5.43, cubic=True),
                5.43 * (math.sqrt(3) / 4 + 1 / math.sqrt(2)) / 2),
    "hcp": (lambda: bulk("Mg", "hcp", a=3.2, c=3.2 * math.sqrt(8 / 3)),
            3.2 * (1 + math.sqrt(2)) / 2),
}


def _run(atoms: Atoms, cutoff: float):
    return bond_angle_deviation(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)


def _coordination(atoms: Atoms, cutoff: float) -> np.ndarray:
    i, *_ = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    return np.bincount(i, minlength=len(atoms))


def _rattled_fcc(amplitude: float, seed: int = 0, reps=(3, 3, 3)) -> Atoms:
    a = bulk("Cu", "fcc", a=A_FCC, cubic=True).repeat(reps)
    a.positions += np.random.default_rng(seed).normal(scale=amplitude, size=a.positions.shape)
    return a


def test_reference_angle_counts():
    ref = reference_angles()
    assert list(ref) == ["fcc", "bcc", "sc", "diamond", "hcp"]
    assert {k: len(v) for k, v in ref.items()} == {"fcc": 66, "bcc": 28, "sc": 15, "diamond": 6,
                                                   "hcp": 66}
    for v in ref.values():
        assert np.all(np.diff(v) >= 0)
    tetra = math.degrees(math.acos(-1 / 3))
    np.testing.assert_allclose(ref["diamond"], tetra, atol=1e-9)
    np.testing.assert_allclose(np.unique(ref["sc"].round(6)), [90, 180])
    assert reference_angles() is not reference_angles()  # fresh dict, cached arrays
    assert not ref["fcc"].flags.writeable


@pytest.mark.parametrize("name", list(IDEAL))
def test_ideal_crystals_have_zero_deviation(name):
    make, cutoff = IDEAL[name]
    atoms = make().repeat((2, 2, 2))
    dev, nearest = _run(atoms, cutoff)
    assert dev.dtype == np.float64 and nearest.dtype == object and dev.shape == (len(atoms),)
    assert np.all(dev < 1e-6), dev.max()
    assert set(nearest) == {name.split("-")[0]}


def test_rattle_gives_small_positive_growing_deviation():
    cutoff = IDEAL["fcc"][1]
    means = []
    for amp in (0.01, 0.03, 0.08):
        atoms = _rattled_fcc(amp)
        assert np.all(_coordination(atoms, cutoff) == 12)
        dev, nearest = _run(atoms, cutoff)
        assert np.all(np.isfinite(dev)) and np.all(dev > 0)
        means.append(dev.mean())
        if amp <= 0.03:
            assert set(nearest) == {"fcc"}
    assert means[0] < 1.0  # degrees
    assert means[0] < means[1] < means[2]


def test_slab_surface_atoms_deviate_bulk_layers_do_not():
    slab = fcc100("Cu", size=(3, 3, 5), a=A_FCC, vacuum=8.0, periodic=False)
    slab.pbc = (True, True, False)
    cutoff = IDEAL["fcc"][1]
    z = _coordination(slab, cutoff)
    height = slab.positions[:, 2]
    surface = np.isclose(height, height.min()) | np.isclose(height, height.max())
    assert surface.sum() == 18 and np.all(z[surface] == 8) and np.all(z[~surface] == 12)
    dev, nearest = _run(slab, cutoff)
    assert np.all(dev[~surface] < 1e-6) and set(nearest[~surface]) == {"fcc"}
    assert np.all(dev[surface] > 1.0)
    np.testing.assert_allclose(dev[surface], dev[surface][0])  # all surface sites equivalent


def test_too_few_neighbours_give_nan_and_none():
    single = Atoms("Cu", positions=[[0, 0, 0]])
    dev, nearest = _run(single, 3.0)
    assert np.isnan(dev).all() and list(nearest) == [None]

    dimer = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]])
    dev, nearest = _run(dimer, 3.0)
    assert np.isnan(dev).all() and list(nearest) == [None, None]

    # linear trimer: ends have one neighbour, the centre one 180° angle
    trimer = Atoms("Cu3", positions=[[0, 0, 0], [0, 0, 2.5], [0, 0, 5.0]])
    dev, nearest = _run(trimer, 3.0)
    assert np.isnan(dev[[0, 2]]).all() and nearest[0] is None and nearest[2] is None
    assert np.isfinite(dev[1]) and isinstance(nearest[1], str)

    dev, nearest = bond_angle_deviation(np.zeros((0, 3)), None, False, 3.0)
    assert dev.shape == (0,) and nearest.shape == (0,)


def test_matches_scipy_wasserstein():
    atoms = _rattled_fcc(0.15, seed=3, reps=(2, 2, 2))
    atoms.positions[:5] += np.random.default_rng(4).normal(scale=0.4, size=(5, 3))
    cutoff = IDEAL["fcc"][1]
    dev, nearest = _run(atoms, cutoff)
    i, j, S, d = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    vec = atoms.positions[j] - atoms.positions[i] + S @ atoms.cell.array
    refs = reference_angles()
    for k in range(len(atoms)):
        u = vec[i == k] / d[i == k, None]
        c = np.clip(u @ u.T, -1, 1)[np.triu_indices(len(u), 1)]
        ang = np.degrees(np.arccos(c))
        w = {n: wasserstein_distance(ang, r) for n, r in refs.items()}
        best = min(w, key=w.get)
        assert dev[k] == pytest.approx(w[best], abs=1e-6)
        assert nearest[k] == best


def test_rotation_and_permutation_invariance():
    atoms = _rattled_fcc(0.08, seed=1, reps=(2, 2, 2))
    cutoff = IDEAL["fcc"][1]
    dev, nearest = _run(atoms, cutoff)

    R = Rotation.random(random_state=7).as_matrix()
    dev_r, nearest_r = bond_angle_deviation(atoms.positions @ R.T, atoms.cell.array @ R.T,
                                            atoms.pbc, cutoff)
    np.testing.assert_allclose(dev_r, dev, atol=1e-9)
    assert list(nearest_r) == list(nearest)

    perm = np.random.default_rng(2).permutation(len(atoms))
    dev_p, nearest_p = bond_angle_deviation(atoms.positions[perm], atoms.cell.array, atoms.pbc,
                                            cutoff)
    np.testing.assert_allclose(dev_p, dev[perm], atol=1e-9)
    assert list(nearest_p) == list(nearest[perm])
