"""Perfect → imperfect transfer diagnosis (mlipops.evaluate.defects).

The diagnosis is tested on cases whose answer is known by construction: a pair-potential model evaluated
on structures labelled by the same pair potential plus an explicit three-body (bond-angle) term must blame
the angles; plus an embedding term that depends only on the neighbour count (no angles) must blame z.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc100, fcc111
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.singlepoint import SinglePointCalculator

from mlipops.descriptors import neighbor_list
from mlipops.errors import MlipopsError
from mlipops.evaluate import defects as dx
from mlipops.params import DefectParams, DescriptorParams, IndexParams, TrainParams

A_CU = 3.61
R_ON, R_OFF = 2.75, 3.15  # the toy potential acts on the first shell only (Cu fcc: 2.55 | 3.61 Å)
IDEAL_COS = (0.5, 0.0, -0.5, -1.0)  # fcc first-shell bond angles 60, 90, 120, 180 degrees


def _switch(r: torch.Tensor) -> torch.Tensor:
    """1 below R_ON, 0 above R_OFF, cosine in between (C1)."""
    x = ((r - R_ON) / (R_OFF - R_ON)).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(torch.pi * x))


class ToyCalculator(Calculator):
    """Morse pairs + ``three_body`` x Σ_i Σ_{j<k} f f Π_c (cos θ_jik − c)² (zero at every ideal fcc angle)
    + ``embedding`` x Σ_i −√(Σ_j exp(−2(r_ij − 2.55)) f(r_ij)) (depends on the neighbour count, not on angles).
    Forces by autograd."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, three_body: float = 0.0, embedding: float = 0.0):
        super().__init__()
        self.three_body, self.embedding = three_body, embedding

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        i, j, S, _ = neighbor_list(a.positions, a.cell.array, a.pbc, R_OFF)
        pos = torch.tensor(a.positions, dtype=torch.float64, requires_grad=True)
        vec = pos[j] - pos[i] + torch.as_tensor(S @ a.cell.array, dtype=torch.float64)
        r = vec.norm(dim=1)
        f = _switch(r)
        x = torch.exp(-1.3588 * (r - 2.866))
        energy = 0.5 * (0.3429 * (x * x - 2 * x) * f).sum()
        if self.embedding:
            rho = torch.zeros(len(a), dtype=torch.float64).index_add(0, torch.as_tensor(i),
                                                                     torch.exp(-2.0 * (r - 2.55)) * f)
            energy = energy - self.embedding * torch.sqrt(rho + 1e-12).sum()
        if self.three_body:
            e1, e2 = [], []
            for c in range(len(a)):
                edges = np.flatnonzero(i == c)
                u, v = np.triu_indices(len(edges), 1)
                e1.append(edges[u])
                e2.append(edges[v])
            e1, e2 = torch.as_tensor(np.concatenate(e1)), torch.as_tensor(np.concatenate(e2))
            cos = (vec[e1] * vec[e2]).sum(1) / (r[e1] * r[e2])
            h = torch.ones_like(cos)
            for c0 in IDEAL_COS:
                h = h * (cos - c0) ** 2
            energy = energy + self.three_body * (f[e1] * f[e2] * h).sum()
        energy.backward()
        self.results = {"energy": float(energy.detach()), "forces": -pos.grad.numpy().copy()}


def _label(frames: list[Atoms], calc: Calculator) -> tuple[np.ndarray, list[np.ndarray]]:
    e, f = [], []
    for a in frames:
        a.calc = calc
        e.append(a.get_potential_energy())
        f.append(a.get_forces())
        a.calc = SinglePointCalculator(a, energy=e[-1], forces=f[-1])
    return np.array(e), f


def _structures(rng) -> tuple[list[Atoms], list[Atoms]]:
    """Perfect fcc cells (the 'training' crystals) and imperfect ones: rattled bulk and vacancy cells at
    several amplitudes, slabs."""
    base = bulk("Cu", "fcc", a=A_CU, cubic=True).repeat((2, 2, 2))
    perfect = []
    for s in (0.98, 1.0, 1.02):
        a = base.copy()
        a.set_cell(a.cell * s, scale_atoms=True)
        a.positions += rng.normal(0, 0.01, a.positions.shape)
        a.info["config_type"] = "crystal_fcc"
        perfect.append(a)
    imperfect = []
    for amp in (0.02, 0.04, 0.06, 0.08):
        a = base.copy()
        a.positions += rng.normal(0, amp, a.positions.shape)
        a.info["config_type"] = "rattled"
        imperfect.append(a)
        v = base.copy()
        del v[int(rng.integers(len(v)))]
        v.positions += rng.normal(0, amp, v.positions.shape)
        v.info["config_type"] = "vacancy"
        imperfect.append(v)
    for builder, amp in ((fcc100, 0.02), (fcc111, 0.02), (fcc100, 0.06), (fcc111, 0.06)):
        s = builder("Cu", size=(2, 2, 4), a=A_CU, vacuum=5.0)
        s.positions += rng.normal(0, amp, s.positions.shape)
        s.info["config_type"] = "surface"
        imperfect.append(s)
    return perfect, imperfect


def _diagnose_toy(reference: ToyCalculator) -> dict:
    rng = np.random.default_rng(3)
    perfect, imperfect = _structures(rng)
    _label(perfect, reference)
    _label(imperfect, reference)
    e_pred, f_pred = _label([a.copy() for a in imperfect], ToyCalculator())  # the pair-only "model"
    d = DescriptorParams(n_radial=4, n_angular=2, max_l=2).model_dump()
    hull = dx.hull_of(perfect, ["Cu"], d, 3)
    z_full = dx.full_coordination(perfect, 2.8)
    at, fr = dx.atom_table(imperfect, e_pred, f_pred, hull, 2.8, z_full)
    assert z_full == 12
    return dx.diagnose(at, fr)


def test_three_body_error_is_attributed_to_angles():
    diag = _diagnose_toy(ToyCalculator(three_body=10.0))["all"]
    a = diag["atoms"]
    assert a["r2_full"] > 0.5 and a["share_angle"] > 2 * a["share_z"], a
    assert dx.dominant(diag) == "angle"


def test_coordination_error_is_attributed_to_z():
    diag = _diagnose_toy(ToyCalculator(embedding=1.0))["all"]
    a = diag["atoms"]
    assert a["r2_full"] > 0.5 and a["share_z"] > 1.5 * a["share_angle"], a
    assert a["r2_z_only"] > 0.95 * a["r2_full"]  # once z is known the angles add next to nothing
    assert dx.dominant(diag) == "z"


def test_lmg_shares_add_up_and_find_the_true_factor():
    rng = np.random.default_rng(0)
    n = 400
    z = rng.integers(8, 13, n)
    ang = rng.uniform(0, 10, n)
    y = 0.3 * (12 - z) + rng.normal(0, 0.05, n)  # depends on z only
    r = dx.lmg_two(y, dx._z_design(z), dx._angle_design(ang))
    assert r["share_z"] + r["share_angle"] == pytest.approx(r["r2_full"], abs=1e-12)
    assert r["share_z"] > 0.95 and r["share_angle"] < 0.01
    assert r["p_z_added_last"] < 1e-10 and r["p_angle_added_last"] > 1e-3
    y2 = 0.05 * ang**2 + rng.normal(0, 0.05, n)  # angles only
    r2 = dx.lmg_two(y2, dx._z_design(z), dx._angle_design(ang))
    assert r2["share_angle"] > 0.95 and r2["share_z"] < 0.01
    # collinear factors share the variance instead of one taking it all by order of entry
    y3 = (12 - z) + rng.normal(0, 0.1, n)
    r3 = dx.lmg_two(y3, dx._z_design(z), dx._angle_design(12.0 - z + rng.normal(0, 0.01, n)))
    assert 0.3 < r3["share_z"] / r3["r2_full"] < 0.7


def _frame(ct, split=None, t=None, seed=0):
    a = bulk("Cu", "fcc", a=A_CU, cubic=True)
    a.positions += np.random.default_rng(seed).normal(0, 0.02, a.positions.shape)
    a.info["config_type"] = ct
    if split:
        a.info["split"] = split
    if t is not None:
        a.info["temperature_K"] = t
    return a


def test_select_perfect_imperfect_held_out_and_temperature():
    frames = ([_frame("crystal", "train", seed=k) for k in range(6)] + [_frame("crystal", "val", seed=10)]
              + [_frame("crystal", "train", t=3000.0, seed=11)]
              + [_frame("vacancy", "test", seed=20 + k) for k in range(40)])
    p = DefectParams(perfect_config_types=["crystal"], imperfect_config_types=["vacancy"],
                     perfect_max_temperature_K=500)
    s = dx.select(frames, p)
    assert len(s.train) == 6 and len(s.val) == 1 and len(s.test) == 40 and not s.pool  # the 3000 K frame left out
    h = dx.select(frames, p.model_copy(update={"control": "held_out"}))
    assert len(h.test) + len(h.pool) == 40 and 10 <= len(h.pool) <= 30
    assert not {id(a) for a in h.test} & {id(a) for a in h.pool}
    assert ([id(a) for a in dx.select(frames, p.model_copy(update={"control": "held_out"})).pool]
            == [id(a) for a in h.pool])
    nosplit = [_frame("crystal", seed=k) for k in range(30)] + [_frame("vacancy", seed=99)]
    s2 = dx.select(nosplit, p)
    assert len(s2.train) + len(s2.val) == 30 and len(s2.train) > len(s2.val)
    with pytest.raises(MlipopsError, match="no imperfect test frames"):
        dx.select(frames[:7], p)
    with pytest.raises(MlipopsError, match="both perfect and imperfect"):
        dx.select(frames, p.model_copy(update={"imperfect_config_types": ["crystal"]}))


def test_recommendation_follows_the_numbers():
    def group(ratio, outside, sz, sa, vacancies):
        return {"force_mae_atom": 0.01 * ratio, "fraction_outside_hull": outside,
                "worst_quarter_median_vacancy_equivalents": vacancies, "atoms": {"share_z": sz, "share_angle": sa}}

    diag = {"all": {}, "vacancy": group(10, 0.5, 0.1, 0.6, 1.1), "surface": group(30, 0.9, 0.7, 0.1, 2.2),
            "fine": group(1.2, 0.05, 0.3, 0.3, 0)}
    recs = dx.recommend(diag, 0.01)
    assert [r["config_type"] for r in recs] == ["surface", "vacancy"]
    assert [r["recipe"] for r in recs] == ["slab", "rattled_vacancy"]
    assert recs[1]["dominant_factor"] == "angle" and "angle" in recs[1]["reason"]
    assert dx.recommend({"all": {}, "fine": diag["fine"]}, 0.01) == []
    hot = group(20, 0.6, 0.1, 0.5, 4) | {"hot": True}  # molten frames
    assert dx.recommend({"all": {}, "vacancy_hot": hot}, 0.01)[0]["recipe"] == "high_temperature_md"
    assert dx.group_of(_frame("vacancy", t=6000.0), 500.0) == "vacancy_hot"
    assert dx.group_of(_frame("vacancy", t=300.0), 500.0) == dx.group_of(_frame("vacancy"), 500.0) == "vacancy"


def test_transfer_end_to_end_on_emt_copper(tmp_path):
    """The whole experiment on tiny EMT copper: perfect crystals -> vacancy + slab, recipes control."""
    from mlipops.oracles import get_oracle
    from mlipops.params import GenerateParams

    rng = np.random.default_rng(1)
    emt = get_oracle("emt", {})
    train = []
    for s in (0.97, 1.0, 1.03):
        for k in range(3):
            a = bulk("Cu", "fcc", a=A_CU * s, cubic=True).repeat((2, 1, 1))
            a.positions += rng.normal(0, 0.03, a.positions.shape)
            a.info |= {"config_type": "crystal_fcc", "split": "val" if k == 2 and s == 1.0 else "train"}
            train.append(a)
    test = []
    for k in range(2):
        v = bulk("Cu", "fcc", a=A_CU, cubic=True).repeat((2, 2, 2))
        del v[k]
        v.positions += rng.normal(0, 0.05, v.positions.shape)
        v.info |= {"config_type": "vacancy", "split": "test"}
        s = fcc111("Cu", size=(2, 2, 3), a=A_CU, vacuum=5.0)
        s.info |= {"config_type": "surface_111", "split": "test"}
        test += [v, s]
    frames = emt.label(train + test)
    g = GenerateParams(element="Cu", defects={"vacancy_supercell": 2, "slabs": ["111"], "slab_size": [2, 2, 3]})
    p = DefectParams(perfect_config_types=["crystal_fcc"], imperfect_config_types=["vacancy", "surface_111"],
                     epochs=60, control_vacancy_cells=2, control_slabs=2)
    tp = TrainParams(hidden=[16], epochs=60, batch_size=4, learning_rate=0.005, patience=None)
    d = DescriptorParams(n_radial=4, n_angular=2, max_l=2)
    rep = dx.transfer(frames, p, tp, d, IndexParams(pca_components=3), g)
    recipes = {r["recipe"] for r in rep.recommendations}
    assert "slab" in recipes  # slab atoms are far below the bulk z the crystals had
    assert rep.diagnosis["surface_111"]["fraction_outside_hull"] > 0.3
    c = rep.control
    assert c["crystal"]["lattice"] == "fcc" and c["crystal"]["element"] == "Cu"  # resolved from the training crystals
    assert c["n_added_frames"] >= 2 and c["force_mae_atom_after"] < c["force_mae_atom_before"]
    assert (c["per_config_type"]["surface_111"]["force_mae_atom_after"]
            < c["per_config_type"]["surface_111"]["force_mae_atom_before"])
    m = dx.write_report(rep, tmp_path, "tiny")
    for f in ("summary.md", "metrics.json", "defects.json", "force_error_vs_geometry.png", "decomposition.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert m["control.force_error_drop"] > 0
    assert "explains" in (tmp_path / "summary.md").read_text()
    assert isinstance(rep.atoms, pd.DataFrame) and set(rep.atoms.config_type) == {"vacancy", "surface_111"}


def _cli(cwd, *args):
    import os
    import subprocess
    import sys

    env = dict(os.environ, MLIPOPS_DEBUG="")
    return subprocess.run([sys.executable, "-m", "mlipops.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_bad_input_is_one_line_naming_the_file(tmp_path, u_repo_root):
    import shutil

    shutil.copy(u_repo_root / "params.yaml", tmp_path / "params.yaml")
    r = _cli(tmp_path, "evaluate", "defects", "--data", "missing.extxyz")
    assert r.returncode == 2 and "missing.extxyz" in r.stderr and "Traceback" not in r.stderr
    # frames of none of the configured config_types: the error names the params field
    a = bulk("Cu", "fcc", a=A_CU, cubic=True)
    a.calc = SinglePointCalculator(a, energy=-1.0, forces=np.zeros((4, 3)))
    a.info["config_type"] = "something_else"
    import ase.io

    ase.io.write(tmp_path / "other.extxyz", [a], format="extxyz")
    r = _cli(tmp_path, "evaluate", "defects", "--data", "other.extxyz", "--out", "rep")
    assert r.returncode == 2 and "evaluate.defects.perfect_config_types" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "rep").exists()


# ------------------------------------------------------------------- any lattice: recommendation, control
@pytest.mark.parametrize("element,lattice,a", [("Cu", "fcc", 3.61), ("Mo", "bcc", 3.16), ("Si", "diamond", 5.43)])
def test_vacancy_equivalents_tell_a_vacancy_from_a_surface_on_every_lattice(element, lattice, a):
    """The first shell cannot (diamond: a vacancy neighbour and a (111) surface atom both lose 1 of 4 bonds); the
    neighbour sphere within the descriptor cutoff can: ≈ 1 vacancy next to a vacancy, > VACANCY_LIKE at a surface."""
    from mlipops.crystal import Crystal, bulk_cell, slab, vacancy_cell
    from mlipops.descriptors import neighbor_list

    cr, cutoff = Crystal(element, lattice, a), 5.0
    perfect = bulk_cell(cr, 2)
    perfect.calc = SinglePointCalculator(perfect, energy=0.0, forces=np.zeros((len(perfect), 3)))
    ref = dx.vacancy_asymmetry([perfect], cutoff)
    assert 0.05 < ref < 0.25
    assert dx.neighbour_asymmetry(bulk_cell(cr, 3), cutoff)[0].max() < 1e-9  # complete shells cancel

    def z_of(atoms):
        return np.bincount(neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 1.1 * cr.nn_distance)[0],
                           minlength=len(atoms))

    rng = np.random.default_rng(0)
    v = vacancy_cell(cr, 3, rng)
    z = z_of(v)
    v.positions += rng.normal(0, 0.08, v.positions.shape)
    next_to = z == cr.z - 1
    eq = dx.neighbour_asymmetry(v, cutoff)[0] / ref
    assert next_to.sum() == cr.z and 0.7 < np.median(eq[next_to]) < 1.4 < dx.VACANCY_LIKE
    for miller in ("100", "110", "111"):
        s = slab(cr, miller, 6, (2, 2), 6.0)
        top = s.positions[:, 2] > s.positions[:, 2].max() - 0.05
        eq_s = dx.neighbour_asymmetry(s, cutoff)[0][top] / ref
        assert np.median(eq_s) > dx.VACANCY_LIKE + 0.3, (miller, np.median(eq_s))  # measured >= 2.0 (diamond 111)
        if lattice == "diamond" and miller == "111":  # same first-shell deficit as a vacancy neighbour: 1 of 4
            assert set(cr.z - z_of(s)[top]) == {1} and set(cr.z - z[next_to]) == {1}


def _lj_generate(element="Mo", **defects):
    from mlipops.params import GenerateParams

    return GenerateParams(element=element, oracle={"calculator": "ase.calculators.lj.LennardJones",
                                                    "kwargs": {"sigma": 2.5, "epsilon": 0.5, "rc": 6.0}},
                          defects={"vacancy_supercell": 2, "slabs": ["110", "111"], "slab_size": [1, 1, 4]} | defects)


def test_recipes_control_slabs_of_an_hcp_crystal_include_the_basal_plane():
    from mlipops.crystal import Crystal

    cr = Crystal("Ti", "hcp", 2.95)
    g = _lj_generate("Ti")
    out = dx.control_recipes({"slab"}, DefectParams(control_slabs=1), g, cr)
    assert [a.info["config_type"] for a in out] == ["control_slab_0001", "control_slab_100", "control_slab_010"]
    basal = out[0]
    z = np.sort(basal.positions[:, 2])
    planes = z[np.r_[True, np.diff(z) > 0.3]]  # rattled by 0.08 Å: planes 2.4 Å apart (c/2, ideal c/a)
    assert len(planes) == g.defects.slab_size[2] and np.allclose(np.diff(planes), 2.95 * np.sqrt(8 / 3) / 2, atol=0.5)
    assert all(tuple(a.pbc) == (True, True, False) and np.isfinite(a.get_potential_energy()) for a in out)
    # given orientations win, for any lattice
    mine = DefectParams(control_slabs=1, control_slab_millers=["0001"])
    assert [a.info["config_type"] for a in dx.control_recipes({"slab"}, mine, g, cr)] == ["control_slab_0001"]
    assert dx.control_slab_millers(DefectParams(), g, "bcc") == ["110", "111"]  # generate.defects.slabs
    with pytest.raises(ValueError):
        DefectParams(control_slab_millers=["1-10"])


def test_recipes_control_builds_the_resolved_crystal_and_refuses_an_oracle_without_the_element():
    from mlipops.crystal import Crystal
    from mlipops.params import GenerateParams

    cr = Crystal("Mo", "bcc", 3.16)
    p = DefectParams(control_vacancy_cells=2, control_slabs=1)
    out = dx.control_recipes({"rattled_vacancy", "slab"}, p, _lj_generate(), cr)
    kinds = [a.info["config_type"] for a in out]
    assert kinds == ["control_rattled_vacancy"] * 2 + ["control_slab_110", "control_slab_111"]
    assert [len(a) for a in out[:2]] == [15, 15]  # bcc 2 x 2^3 - 1
    assert (all(tuple(a.pbc) == (True, True, False) for a in out[2:])
            and all(a.get_chemical_symbols()[0] == "Mo" for a in out))
    assert all(np.isfinite(a.get_potential_energy()) for a in out)
    # EMT has no Mo: the recipes control stops before any training, in one line naming the way out
    rng = np.random.default_rng(0)
    frames = []
    for k in range(4):
        c = bulk("Mo", "bcc", a=3.16, cubic=True).repeat(2)
        c.positions += rng.normal(0, 0.03, c.positions.shape)
        c.info |= {"config_type": "crystal", "split": "train"}
        frames.append(c)
    v = bulk("Mo", "bcc", a=3.16, cubic=True).repeat(2)
    del v[0]
    v.info |= {"config_type": "vacancy", "split": "test"}
    for a in frames + [v]:
        a.calc = SinglePointCalculator(a, energy=-10.0 * len(a), forces=np.zeros((len(a), 3)))
    q = DefectParams(perfect_config_types=["crystal"], imperfect_config_types=["vacancy"], control="recipes")
    with pytest.raises(MlipopsError) as e:
        dx.transfer(frames + [v], q, TrainParams(), DescriptorParams(), IndexParams(), GenerateParams(element="Mo"))
    assert e.value.field == "evaluate.defects.control" and len(str(e.value).splitlines()) == 1
    assert "the control's oracle emt cannot compute Mo: NotImplementedError: No EMT-potential for Mo; set " \
           "evaluate.defects.control: held_out" in str(e.value)


def test_the_perfect_only_fit_is_the_same_bits_whatever_the_threads():
    """The study's own fit runs on one thread (torch's float32 sums depend on the thread count): the process's
    thread setting does not change the model, and is restored afterwards."""
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(0)
    frames = []
    for k in range(6):  # cells and batches big enough that torch splits its kernels across threads
        a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(3)
        a.rattle(0.05, seed=k)
        a.calc = EMT()
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
        a.info.update(config_type="crystal_fcc", frame_id=f"f{k}")
        frames.append(a)
    rng.shuffle(frames)
    d = DescriptorParams()
    tp = TrainParams(batch_size=4)
    before = torch.get_num_threads()
    weights = []
    for threads in (2, 1):
        torch.set_num_threads(threads)
        model = dx._train(frames[:4], frames[4:], ["Cu"], DefectParams(epochs=3), tp, d)
        assert torch.get_num_threads() == threads
        weights.append(torch.cat([w.detach().flatten() for w in model.parameters()]))
    torch.set_num_threads(before)
    assert torch.equal(weights[0], weights[1])
