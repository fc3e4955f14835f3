"""Neighbour lists, descriptor invariances and the potential's physics (forces, stress, I/O, MD)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc100, fcc111
from ase.neighborlist import neighbor_list as ase_neighbor_list

from mlipops.descriptors import neighbor_list
from mlipops.errors import MlipopsError
from mlipops.models import MlipopsCalculator, Potential
from mlipops.models.ensemble import load_model
from mlipops.models.potential import CONFIG, WEIGHTS


# ------------------------------------------------------------------------------ neighbour lists
def _nl_cases():
    return {
        # cutoff > half the box in every case: several periodic images of the same atom count
        "fcc_primitive": (bulk("Cu", "fcc", a=3.6), 5.0, 12 + 6 + 24),
        "sc": (bulk("Cu", "sc", a=2.5), 5.0, None),
        "slab": (fcc111("Cu", size=(1, 1, 3), a=3.6, vacuum=4.0), 5.0, None),
        "slab100": (fcc100("Cu", size=(1, 1, 4), a=3.6, vacuum=5.0), 4.0, None),
        "dimer": (Atoms("Cu2", positions=[[0, 0, 0], [0.3, 0.1, 2.2]]), 3.0, 2),
        "triclinic": (Atoms("Cu2", positions=[[0, 0, 0], [1.1, 0.9, 1.2]],
                            cell=[[2.7, 0, 0], [0.9, 2.5, 0], [0.4, 0.7, 2.6]], pbc=True), 4.5, None),
    }


@pytest.mark.parametrize("case", list(_nl_cases()))
def test_vesin_neighbour_list_matches_ase(case):
    atoms, cutoff, n_expected = _nl_cases()[case]
    if atoms.pbc.any():  # small cells: the cutoff exceeds half of some periodic box length
        assert cutoff > 0.5 * min(np.linalg.norm(atoms.cell.array, axis=1)[atoms.pbc])
    i, j, S, d = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    ai, aj, aS, ad = ase_neighbor_list("ijSd", atoms, cutoff)
    assert len(i) == len(ai)
    if n_expected is not None:
        assert len(i) == n_expected
    # same pairs with the same images and distances
    ours = sorted(zip(i.tolist(), j.tolist(), map(tuple, S.tolist()), np.round(d, 8).tolist()))
    theirs = sorted(zip(ai.tolist(), aj.tolist(), map(tuple, aS.tolist()), np.round(ad, 8).tolist()))
    assert ours == theirs
    # the documented vector convention: r_j - r_i + S @ cell has length d
    vec = atoms.positions[j] - atoms.positions[i] + S @ atoms.cell.array
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), d, atol=1e-10)
    assert np.all(d < cutoff) and np.all(d > 0)


def test_fcc_first_shell_has_twelve_neighbours():
    a = 3.6
    atoms = bulk("Cu", "fcc", a=a)
    i, _, _, d = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 0.5 * (a / 2**0.5 + a))
    assert len(i) == 12
    np.testing.assert_allclose(d, a / 2**0.5)


# ---------------------------------------------------------------------------------- descriptors
def _features(model: Potential, atoms: Atoms) -> np.ndarray:
    b = Potential.collate([model.graph(atoms)], torch.float64)
    with torch.no_grad():
        return model.features(b, b["positions"], b["cell"]).numpy()


def _rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


@pytest.fixture
def u_binary_cell(u_rng) -> Atoms:
    a = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 1, 1))
    a.numbers[[1, 4, 6]] = 79  # Au
    a.set_cell(a.cell.array @ (np.eye(3) + [[0.0, 0.05, 0.0], [0.0, 0.0, 0.03], [0.02, 0.0, 0.0]]),
               scale_atoms=True)
    a.positions += u_rng.normal(0.0, 0.1, a.positions.shape)
    return a


def test_descriptors_invariant_under_rotation_and_translation(u_make_potential, u_binary_cell, u_rng):
    model = u_make_potential(species=("Cu", "Au"))
    g0 = _features(model, u_binary_cell)
    assert g0.shape == (len(u_binary_cell), model.descriptor.n_features)
    assert np.abs(g0).max() > 0.1  # non-trivial features
    R = _rotation(u_rng)
    moved = u_binary_cell.copy()
    moved.set_cell(u_binary_cell.cell.array @ R.T, scale_atoms=False)
    moved.positions = u_binary_cell.positions @ R.T + np.array([0.7, -1.3, 2.9])
    np.testing.assert_allclose(_features(model, moved), g0, rtol=1e-9, atol=1e-9)
    # wrapping atoms back into the cell changes nothing either
    moved.wrap()
    np.testing.assert_allclose(_features(model, moved), g0, rtol=1e-9, atol=1e-9)


def test_descriptors_equivariant_under_same_species_permutation(u_make_potential, u_binary_cell, u_rng):
    model = u_make_potential(species=("Cu", "Au"))
    g0 = _features(model, u_binary_cell)
    perm = np.arange(len(u_binary_cell))
    cu = np.flatnonzero(u_binary_cell.numbers == 29)
    au = np.flatnonzero(u_binary_cell.numbers == 79)
    perm[cu] = u_rng.permutation(cu)
    perm[au] = u_rng.permutation(au)
    assert not np.array_equal(perm, np.arange(len(perm)))
    g1 = _features(model, u_binary_cell[perm])
    np.testing.assert_allclose(g1, g0[perm], rtol=1e-10, atol=1e-10)
    # swapping a Cu and an Au *does* change the environment of the others
    swapped = u_binary_cell.copy()
    swapped.numbers[[cu[0], au[0]]] = swapped.numbers[[au[0], cu[0]]]
    assert not np.allclose(_features(model, swapped), g0)


def test_descriptor_counts_fcc_shells(u_make_potential):
    """The l=0 angular invariant of one species equals (Σ_j R_n(r_j))², i.e. the square of G^rad."""
    model = u_make_potential(n_radial=4, n_angular=4, angular_cutoff=4.0, cutoff=4.0)
    atoms = bulk("Cu", "fcc", a=3.6)
    g = _features(model, atoms)[0]
    rad, ang0 = g[:4], g[4:8]
    np.testing.assert_allclose(ang0, rad**2, rtol=1e-12)
    # radial basis by hand: 12 neighbours at a/√2 and 6 at a, Gaussian on [0.8, 4) with cosine cutoff
    r = np.array([3.6 / 2**0.5] * 12 + [3.6] * 6)
    mu = np.linspace(0.8, 4.0, 5)[:-1]
    sigma = (4.0 - 0.8) / 4
    fc = 0.5 * (np.cos(np.pi * r / 4.0) + 1)
    expected = (np.exp(-((r[:, None] - mu) ** 2) / (2 * sigma**2)) * fc[:, None]).sum(0)
    # (the basis centres are float32 constants promoted to float64, hence rtol 1e-6, not 1e-12)
    np.testing.assert_allclose(rad, expected, rtol=1e-6)


# ------------------------------------------------------------------------------------- potential
@pytest.fixture
def u_strained_cell(u_rng) -> Atoms:
    a = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))  # 8 atoms, box < 2 × cutoff
    a.positions += u_rng.normal(0.0, 0.1, a.positions.shape)
    a.set_cell(a.cell.array @ (np.eye(3) + [[0.01, 0.02, 0.0], [0.0, -0.01, 0.03], [0.0, 0.0, 0.02]]),
               scale_atoms=True)
    return a


def _energy(calc, atoms: Atoms) -> float:
    b = atoms.copy()
    b.calc = calc
    return b.get_potential_energy()


def test_forces_are_minus_energy_gradient(u_make_potential, u_strained_cell):
    calc = MlipopsCalculator(u_make_potential())
    a = u_strained_cell
    a.calc = calc
    forces = a.get_forces()
    assert np.abs(forces).max() > 1e-3
    h = 1e-5
    fd = np.zeros_like(forces)
    for k in range(len(a)):
        for c in range(3):
            p, m = a.copy(), a.copy()
            p.positions[k, c] += h
            m.positions[k, c] -= h
            fd[k, c] = -(_energy(calc, p) - _energy(calc, m)) / (2 * h)
    np.testing.assert_allclose(forces, fd, atol=1e-6 * np.abs(forces).max())
    # Newton's third law: no net force on a periodic cell
    np.testing.assert_allclose(forces.sum(0), 0.0, atol=1e-10)


def test_stress_is_strain_derivative_over_volume(u_make_potential, u_strained_cell):
    calc = MlipopsCalculator(u_make_potential())
    a = u_strained_cell
    a.calc = calc
    stress = a.get_stress(voigt=True)  # ASE: xx yy zz yz xz xy, σ = (1/V) ∂E/∂ε
    assert np.abs(stress[3:]).max() > 1e-5  # the shear components are exercised too
    h, vol = 1e-5, a.get_volume()
    fd = []
    for p, q in [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]:
        e = []
        for sign in (1, -1):
            eps = np.zeros((3, 3))
            eps[p, q] += sign * h / 2
            eps[q, p] += sign * h / 2
            b = a.copy()
            b.set_cell(a.cell.array @ (np.eye(3) + eps), scale_atoms=True)
            e.append(_energy(calc, b))
        fd.append((e[0] - e[1]) / (2 * h * vol))
    np.testing.assert_allclose(stress, fd, atol=1e-6 * np.abs(stress).max())


def test_energy_and_forces_continuous_across_cutoff(u_make_potential):
    model = u_make_potential()
    calc = MlipopsCalculator(model)
    rc = model.cutoff

    def dimer(r):
        d = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, r]])
        d.calc = calc
        return d.get_potential_energy(), d.get_forces()

    e_far, f_far = dimer(rc + 1.0)
    e_in, f_in = dimer(rc - 1e-4)
    e_out, f_out = dimer(rc + 1e-4)
    assert e_out == pytest.approx(e_far, abs=1e-12)  # beyond the cutoff: isolated atoms
    np.testing.assert_allclose(f_far, 0.0, atol=1e-14)
    assert abs(e_in - e_out) < 1e-7
    assert np.abs(f_in).max() < 1e-5
    e_mid, f_mid = dimer(rc - 1.0)
    assert abs(e_mid - e_far) > 1e-5  # the test is not vacuous: the pair does interact inside (jumps: < 1e-7)
    assert np.abs(f_mid).max() > 1e-4
    # periodic cells where a whole neighbour shell crosses the cutoff under a tiny expansion:
    # the second fcc shell (distance a) at the radial cutoff, the first (a/√2) at the angular one
    # (the inner shells move too, so the change is linear in the step: a jump would not shrink)
    for a0 in (rc, model.descriptor.angular_cutoff * 2**0.5):
        def step(delta):
            return _energy(calc, bulk("Cu", "fcc", a=a0 * (1 + delta))) - _energy(
                calc, bulk("Cu", "fcc", a=a0 * (1 - delta)))

        big, small = step(1e-5), step(1e-7)
        assert abs(small) < 1e-7
        assert big / small == pytest.approx(100.0, rel=0.01)
        assert abs(step(0.05)) > 1e-4


def test_save_load_round_trip(u_make_potential, u_strained_cell, tmp_path):
    model = u_make_potential(hidden=(8, 8), seed=7)
    with torch.no_grad():  # non-default buffers must survive the round trip too
        model.e0.fill_(-3.7)
        model.feature_mean.normal_()
        model.feature_std.uniform_(0.5, 2.0)
    model.save(tmp_path / "m", extra={"model_name": "cu"})
    assert (tmp_path / "m" / WEIGHTS).is_file() and (tmp_path / "m" / CONFIG).is_file()
    state = torch.load(tmp_path / "m" / WEIGHTS, weights_only=True)
    assert set(state) == set(model.state_dict())
    assert torch.equal(state["e0"], torch.full((1,), -3.7, dtype=torch.float64))
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, Potential)
    assert loaded.species == ["Cu"] and loaded.hidden == [8, 8]
    frames = [u_strained_cell, bulk("Cu", "fcc", a=3.55, cubic=True), Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.4]])]
    for a in frames:
        e1, e2 = _energy(MlipopsCalculator(model), a), _energy(MlipopsCalculator(loaded), a)
        assert e1 == e2
    calc = MlipopsCalculator(tmp_path / "m")  # from a directory path, as the registry uses it
    assert _energy(calc, frames[0]) == _energy(MlipopsCalculator(model), frames[0])


def test_load_refuses_missing_or_foreign_files(u_make_potential, tmp_path):
    with pytest.raises(MlipopsError, match="missing"):
        load_model(tmp_path / "nothing")
    u_make_potential().save(tmp_path / "m")
    (tmp_path / "m" / CONFIG).write_text('{"format": "other/9"}')
    with pytest.raises(MlipopsError, match="unsupported model format"):
        load_model(tmp_path / "m")


def test_calculator_runs_velocity_verlet(u_make_potential, u_rng):
    from ase import units
    from ase.md.verlet import VelocityVerlet
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
    atoms.positions += u_rng.normal(0.0, 0.05, atoms.positions.shape)
    atoms.calc = MlipopsCalculator(u_make_potential())
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(1))
    start = atoms.positions.copy()
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    epot, ekin = [], []
    dyn.attach(lambda: (epot.append(atoms.get_potential_energy()), ekin.append(atoms.get_kinetic_energy())),
               interval=1)
    dyn.run(8)
    epot, ekin = np.array(epot), np.array(ekin)
    totals = epot + ekin
    assert len(totals) == 9
    assert np.all(np.isfinite(totals))
    assert np.all(np.isfinite(atoms.get_stress()))
    assert not np.allclose(atoms.positions, start)
    # the forces are the gradient of the energy, so Verlet conserves the total energy
    assert np.ptp(epot) > 1e-6
    assert np.ptp(totals) < 0.01 * np.ptp(epot)
    energies = atoms.calc.results["energies"]
    assert energies.shape == (len(atoms),)
    assert energies.sum() == pytest.approx(atoms.get_potential_energy(), rel=1e-12)


def test_unknown_element_refused(u_make_potential):
    model = u_make_potential(species=("Cu",))
    au = Atoms("CuAu", positions=[[0, 0, 0], [0, 0, 2.5]])
    with pytest.raises(MlipopsError, match="Au"):
        model.graph(au)
    au.calc = MlipopsCalculator(model)
    with pytest.raises(MlipopsError):
        au.get_potential_energy()


def test_descriptor_forward_without_gradient_equals_the_training_path_also_without_edges():
    """The no-grad forward (sums by a sparse product) gives the forward with gradients (index_add_), also for a
    lone atom (no edges at all) and a dimer beyond the angular cutoff (radial edges, no angular ones)."""
    import torch
    from ase import Atoms

    from mlipops.descriptors import AtomCentredDescriptor, frame_edges

    desc = AtomCentredDescriptor(1).double()
    for a in (Atoms("Cu", positions=[[0, 0, 0]]), Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 4.5]]),
              Atoms("Cu3", positions=[[0, 0, 0], [0, 0, 2.4], [0, 2.3, 0.2]])):
        sp, i, j, vec, _ = frame_edges(a.numbers, a.positions, a.cell.array, a.pbc, desc.cutoff, {29: 0})
        args = (torch.from_numpy(sp), torch.from_numpy(i), torch.from_numpy(j))
        with torch.no_grad():
            plain = desc(*args, torch.from_numpy(vec))
        v = torch.from_numpy(vec).requires_grad_(True)
        graded = desc(*args, v)
        assert plain.shape == graded.shape == (len(a), desc.n_features)
        torch.testing.assert_close(plain, graded.detach(), rtol=1e-12, atol=1e-14)
