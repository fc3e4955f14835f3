"""The analytic D2 dispersion term: equals the textbook formula beyond the network's cutoff, its forces
and stress are derivatives, it is switched off smoothly, and the network is trained on E_ref - E_disp."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

from mlipops.errors import MlipopsError
from mlipops.frames import set_labels
from mlipops.models import Potential, load_model
from mlipops.models.dispersion import D2_C6, D2_R0, J_NM6_PER_MOL_TO_EV_A6, d2_settings
from mlipops.params import DescriptorParams, DispersionParams, TrainParams
from mlipops.train.loop import fit_reference_energies, init_model, physics_energies, prepare

from conftest import randomize_output

D = dict(cutoff=4.0, n_radial=4, r_min=0.8, angular_cutoff=3.5, n_angular=2, max_l=2)


def d2_reference(pos_a, pos_b, el="Cu", s6=0.75, d=20.0, rc=12.0, width=2.0):
    """E and forces of the D2 interaction between two groups of atoms, independently in numpy."""
    c6 = D2_C6[el] * J_NM6_PER_MOL_TO_EV_A6
    R = 2 * D2_R0[el]
    e, fa = 0.0, np.zeros_like(pos_a)
    for ia, ra in enumerate(pos_a):
        for rb in pos_b:
            v = rb - ra
            r = np.linalg.norm(v)
            def pair(r):
                x = min(max((r - (rc - width)) / width, 0.0), 1.0)
                sw = 0.5 * (1 + np.cos(np.pi * x)) if r < rc else 0.0
                return -s6 * c6 / r**6 / (1 + np.exp(-d * (r / R - 1))) * sw
            e += pair(r)
            h = 1e-6
            dedr = (pair(r + h) - pair(r - h)) / (2 * h)
            fa[ia] += dedr * v / r  # -dE/dr_a = dE/dr · (r_b - r_a)/r
    return e, fa


def _model(dispersion: bool, seed: int = 0) -> Potential:
    torch.manual_seed(seed)
    m = randomize_output(Potential(["Cu"], D, [8, 8], d2_settings(["Cu"]) if dispersion else None)).double().eval()
    with torch.no_grad():
        m.e0.fill_(-0.1)
    return m


def _eval(m, atoms, stress=False):
    out = m(Potential.collate([m.graph(atoms)], torch.float64), forces=True, stress=stress)
    return {k: v.detach().numpy() for k, v in out.items()}


@pytest.fixture
def clusters():
    a = Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [1.2, 1.2, 2.0]])
    b = a.copy()
    b.translate([1.0, 0.5, 7.5])  # the closest A-B pair is > 5 Å apart: beyond the network's 4 Å cutoff
    return a, b


def test_energy_and_forces_of_separated_clusters_are_the_analytic_d2_term(clusters):
    a, b = clusters
    ab = a + b
    d_min = min(np.linalg.norm(p - q) for p in a.positions for q in b.positions)
    assert d_min > D["cutoff"]
    e_ref, f_ref = d2_reference(a.positions, b.positions)
    assert abs(e_ref) > 1e-4  # a real interaction, not rounding
    m = _model(True)
    o_ab, o_a, o_b = _eval(m, ab), _eval(m, a), _eval(m, b)
    assert abs(o_ab["energy"][0] - o_a["energy"][0] - o_b["energy"][0] - e_ref) < 1e-8
    np.testing.assert_allclose(o_ab["forces"][:4] - o_a["forces"], f_ref, atol=1e-8)
    # Newton's third law between the clusters
    assert abs((o_ab["forces"][:4] - o_a["forces"]).sum(0) + (o_ab["forces"][4:] - o_b["forces"]).sum(0)).max() < 1e-10
    # without the term the energy is flat beyond the cutoff: the clusters do not feel each other
    m0 = _model(False)
    o_ab, o_a, o_b = _eval(m0, ab), _eval(m0, a), _eval(m0, b)
    assert abs(o_ab["energy"][0] - o_a["energy"][0] - o_b["energy"][0]) < 1e-12
    np.testing.assert_allclose(o_ab["forces"][:4], o_a["forces"], atol=1e-12)


def test_periodic_forces_and_stress_are_derivatives_with_dispersion():
    m = _model(True)
    at = bulk("Cu", "fcc", a=3.7, cubic=True)
    at.rattle(0.05, seed=2)
    out = _eval(m, at, stress=True)
    e = lambda x: float(_eval(m, x)["energy"][0])  # noqa: E731
    h = 1e-5
    for atom, k in [(0, 0), (2, 2)]:
        p, q = at.copy(), at.copy()
        p.positions[atom, k] += h
        q.positions[atom, k] -= h
        assert abs(-(e(p) - e(q)) / (2 * h) - out["forces"][atom, k]) < 1e-6
    for (i, j), v in [((0, 0), 0), ((0, 1), 5)]:
        eps = np.zeros((3, 3))
        eps[i, j] = eps[j, i] = h if i == j else h / 2
        ep = []
        for sgn in (1, -1):
            x = at.copy()
            x.set_cell(at.cell.array @ (np.eye(3) + sgn * eps), scale_atoms=True)
            ep.append(e(x))
        assert abs((ep[0] - ep[1]) / (2 * h) / at.get_volume() - out["stress"][0, v]) < 1e-6


def test_switched_off_smoothly_at_its_cutoff():
    m = _model(True)
    r = torch.tensor([9.99, 10.0, 11.0, 11.99999, 12.0, 13.0], dtype=torch.float64, requires_grad=True)
    s = torch.zeros(6, dtype=torch.long)
    e = m.dispersion.pair_energy(r, s, s)
    (g,) = torch.autograd.grad(e.sum(), r)
    e = e.detach()
    assert float(e[4]) == 0.0 and float(e[5]) == 0.0 and abs(float(e[3])) < 1e-13 < abs(float(e[2]))
    assert abs(float(g[3])) < 1e-9  # zero slope at the cutoff: forces continuous
    c6 = D2_C6["Cu"] * J_NM6_PER_MOL_TO_EV_A6
    assert abs(float(e[0]) - (-0.75 * c6 / 9.99**6)) < 1e-12  # undamped and unswitched at 10 Å


def test_save_load_keeps_the_term(tmp_path, clusters):
    m = _model(True)
    m.save(tmp_path / "m")
    assert not any("dispersion" in k for k in torch.load(tmp_path / "m/weights.pt", weights_only=True))
    back = load_model(tmp_path / "m")
    ab = clusters[0] + clusters[1]
    np.testing.assert_allclose(_eval(back, ab)["forces"], _eval(m, ab)["forces"], atol=1e-12)


def test_reference_energies_are_fitted_on_e_ref_minus_dispersion():
    """Labels made as short-range (EMT) + D2: the fitted E0 are those of the EMT energies alone,
    so the network is asked for the short-range rest and nothing is counted twice."""
    p = TrainParams(hidden=[8], dtype="float64", device="cpu", dispersion=DispersionParams(enabled=True))
    d = DescriptorParams(**D)
    frames, emt_e = [], []
    for k, a0 in enumerate([3.5, 3.6, 3.7, 3.8]):
        at = bulk("Cu", "fcc", a=a0, cubic=True).repeat((1, 1, 1 + k % 2))
        at.calc = EMT()
        emt_e.append(at.get_potential_energy())
        frames.append(at)
    m = init_model(prepare(_model(True), frames), ["Cu"], p, d, torch.float64, "cpu")  # for E_disp
    data = prepare(m, frames)
    e_disp = physics_energies(m, data, torch.float64)
    assert (e_disp < 0).all()
    for at, e_emt, ed in zip(frames, emt_e, e_disp):
        set_labels(at, e_emt + ed, np.zeros((len(at), 3)))
    data = prepare(m, frames)
    fitted = init_model(data, ["Cu"], p, d, torch.float64, "cpu").e0.numpy()
    only_emt = fit_reference_energies(m, type(data)(data.graphs, np.array(emt_e), data.forces, data.stress,
                                                   data.n_atoms, data.config_type))
    np.testing.assert_allclose(fitted, only_emt, rtol=1e-10)


def test_missing_parameters_name_the_params_key():
    with pytest.raises(MlipopsError, match="train.dispersion"):
        d2_settings(["Cu", "Xe"])
    assert d2_settings(["Xe"], c6={"Xe": 29.99}, r0={"Xe": 1.881})["c6_eV_A6"][0] == pytest.approx(29.99 * 10.364, 1e-3)


def test_training_and_the_ensemble_run_with_the_term(tmp_path):
    from mlipops.models import Ensemble
    from mlipops.train.loop import fit

    frames = []
    for k, a0 in enumerate([3.55, 3.6, 3.65, 3.7, 3.62, 3.58]):
        at = bulk("Cu", "fcc", a=a0, cubic=True)
        at.rattle(0.05, seed=k)
        at.calc = EMT()
        set_labels(at, at.get_potential_energy(), at.get_forces())
        at.info.update(config_type="fcc")
        frames.append(at)
    p = TrainParams(hidden=[8], epochs=2, batch_size=2, dtype="float64", device="cpu",
                    dispersion=DispersionParams(enabled=True, cutoff=8.0))
    r = fit(frames[:4], frames[4:], p, DescriptorParams(**D))
    assert r.model.dispersion is not None and np.isfinite(r.history[-1]["val_force_mae"])
    ens = Ensemble([r.model, r.model])
    ens.save(tmp_path / "e")
    back = load_model(tmp_path / "e")
    assert back.members[0].dispersion_params["cutoff"] == 8.0
    out = _eval(back, frames[0])
    assert float(np.abs(out["forces_std"]).max()) == 0.0


def test_no_double_counting_the_network_learns_exactly_the_short_range_part():
    """Labels made as short-range (EMT) + D2: the model with the D2 term trains the very same network,
    weight for weight, as a model without it trained on the EMT labels alone."""
    from mlipops.train.loop import fit

    sr, full = [], []
    for k, a0 in enumerate([3.55, 3.6, 3.65, 3.7, 3.62, 3.58]):
        at = bulk("Cu", "fcc", a=a0, cubic=True)
        at.rattle(0.05, seed=k)
        at.calc = EMT()
        e, f = at.get_potential_energy(), at.get_forces()
        at.calc = None
        set_labels(at, e, f)
        at.info.update(config_type="fcc")
        sr.append(at)
    m = _model(True)  # its D2 term has the default settings, as the trained model's below
    for at in sr:  # labels + the analytic D2 energy and forces
        b = Potential.collate([m.graph(at)], torch.float64)
        pos, cell, inputs = m.strained_inputs(b, True, False)
        ed = m.physics_energies(b, pos, cell).sum()
        fd = -torch.autograd.grad(ed, inputs)[0]
        a2 = at.copy()
        set_labels(a2, at.calc.results["energy"] + float(ed.detach()), at.calc.results["forces"] + fd.numpy())
        a2.info.update(at.info)
        full.append(a2)
    kw = dict(hidden=[8], epochs=4, batch_size=2, dtype="float64", device="cpu", learning_rate=0.01)
    with_d2 = fit(full[:4], full[4:], TrainParams(**kw, dispersion=DispersionParams(enabled=True)),
                  DescriptorParams(**D))
    plain = fit(sr[:4], sr[4:], TrainParams(**kw), DescriptorParams(**D))
    for (k, v), w in zip(plain.model.state_dict().items(), with_d2.model.state_dict().values()):
        torch.testing.assert_close(w, v, rtol=0, atol=1e-9, msg=k)
    assert with_d2.history[-1]["val_force_mae"] == pytest.approx(plain.history[-1]["val_force_mae"], rel=1e-7)
