"""The crystal every structure-building stage builds from (mlipops.crystal): classification of the data's
lattice, resolution from params and data, builders (vacancy cells, slabs) for any lattice, the oracle check."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.lj import LennardJones
from ase.calculators.singlepoint import SinglePointCalculator

from mlipops import crystal as C
from mlipops.crystal import Crystal
from mlipops.errors import OracleError, ParamsError, StageInputError
from mlipops.params import CrystalParams

LATTICE_CASES = [("Cu", "fcc", 3.6), ("Mo", "bcc", 3.15), ("Mg", "hcp", 3.2), ("Si", "diamond", 5.43),
                 ("Po", "sc", 3.35)]
# Tersoff (1988) silicon, LAMMPS Si.tersoff order: m gamma lambda3 c d h n beta lambda2 B R D lambda1 A
TERSOFF_SI = (3.0, 1.0, 1.3258, 4.8381, 2.0417, 0.0, 22.956, 0.33675, 1.3258, 95.373, 3.0, 0.2, 3.2394, 3264.7)


def _labelled(frames, calc):
    out = []
    for a in frames:
        b = a.copy()
        b.calc = calc
        e, f = b.get_potential_energy(), b.get_forces()
        b.calc = SinglePointCalculator(b, energy=e, forces=f)
        out.append(b)
    return out


def _lj():
    return LennardJones(sigma=2.5, epsilon=0.5, rc=6.0)


@pytest.mark.parametrize("element,lattice,a", LATTICE_CASES)
def test_classify_finds_each_lattice_and_its_constant_also_rattled_and_strained(element, lattice, a):
    rng = np.random.default_rng(0)
    cell = C.bulk_cell(Crystal(element, lattice, a), 2)
    cell.positions += rng.normal(0, 0.04, cell.positions.shape)
    got, a_got = C.classify(cell)
    assert got == lattice and a_got == pytest.approx(a, rel=1e-9)  # rattling keeps the volume
    strained = cell.copy()
    strained.set_cell(cell.cell * 1.03, scale_atoms=True)
    assert C.classify(strained) == (lattice, pytest.approx(1.03 * a, rel=1e-9))
    scores = C.lattice_scores(cell)
    assert scores[lattice] > 0.9 and sorted(scores.values())[-2] < 0.1  # no other lattice is close


def test_a_liquid_and_a_slab_are_no_lattice():
    rng = np.random.default_rng(1)
    liquid = bulk("Cu", "fcc", a=3.7, cubic=True).repeat(3)
    liquid.positions += rng.normal(0, 0.5, liquid.positions.shape)
    assert C.classify(liquid) == (None, pytest.approx(float("nan"), nan_ok=True))
    slab = C.slab(Crystal("Cu", "fcc", 3.6), "111", 4, (2, 2), 6.0)
    slab.pbc = True  # a slab stored fully periodic with vacuum, as DFT codes write it
    assert C.classify(slab)[0] is None


def test_resolve_real_dft_mo_and_li_are_bcc(u_mlearn_dir):
    mo = C.resolve(CrystalParams(), C.train_frames(u_mlearn_dir / "Mo_training.extxyz"))
    assert (mo.element, mo.lattice) == ("Mo", "bcc") and mo.a == pytest.approx(3.16, abs=0.015)
    assert "element Mo: the training data" in mo.source and "20 bcc" in mo.source
    li = C.resolve(CrystalParams(), C.train_frames(u_mlearn_dir / "Li_training.extxyz"))
    assert (li.element, li.lattice) == ("Li", "bcc") and li.a == pytest.approx(3.43, abs=0.015)


def test_resolve_the_embedded_emt_copper_is_fcc_at_emts_lattice_constant():
    """EMT puts hcp copper 1 meV/atom below fcc: within the degeneracy window the experimental fcc is taken."""
    from mlipops.generate.recipes import build_dataset
    from mlipops.params import GenerateParams

    g = GenerateParams.model_validate({
        "crystals": {"rattles_per_strain": 1},
        "defects": {"vacancy_cells": 1, "vacancy_supercell": 2, "slab_rattles": 0},
        "liquid": {"snapshots": 2, "equilibration_steps": 10, "interval": 5, "supercell": 2},
        "paths": {"adatom_points": 2, "dimer_points": 2}})
    frames, meta = build_dataset(g)
    cr = C.resolve(CrystalParams(), frames)
    assert (cr.element, cr.lattice) == ("Cu", "fcc") and cr.a == pytest.approx(meta["fcc_lattice_constant"], rel=1e-4)
    assert "experimental structure among the near-degenerate" in cr.source and "hcp" in cr.source
    hcp = C.resolve(CrystalParams(lattice="hcp"), frames)  # asked for: EMT's own hcp at its volume
    assert hcp.lattice == "hcp" and hcp.a == pytest.approx(meta["nn_distance"]["hcp"], rel=1e-3)
    bcc_only = [a for a in frames if a.info["config_type"] == "crystal_bcc"]
    assert C.resolve(CrystalParams(), bcc_only).lattice == "bcc"


def test_resolve_tersoff_silicon_is_diamond():
    from ase.calculators.tersoff import Tersoff, TersoffParameters

    calc = Tersoff({("Si", "Si", "Si"): TersoffParameters(*TERSOFF_SI)})
    rng = np.random.default_rng(2)
    built = []
    for lattice, a0 in (("diamond", 5.43), ("fcc", 3.9), ("sc", 2.6)):  # diamond lowest, then sc and fcc
        for s in (-0.02, 0.0, 0.02):
            at = bulk("Si", lattice, a=a0 * (1 + s), cubic=True)
            at.positions += rng.normal(0, 0.02, at.positions.shape)
            built.append(at)
    cr = C.resolve(CrystalParams(), _labelled(built, calc))
    assert (cr.element, cr.lattice) == ("Si", "diamond") and cr.a == pytest.approx(5.43, rel=1e-6)


def test_resolve_says_what_to_set_when_the_data_cannot_tell():
    cu = _labelled([bulk("Cu", "fcc", a=3.6, cubic=True)], _lj())
    two = cu + _labelled([bulk("Mo", "bcc", a=3.15, cubic=True)], _lj())
    with pytest.raises(StageInputError, match="2 species .*set crystal.element") as e:
        C.resolve(CrystalParams(), two)
    assert e.value.field == "crystal.element"
    assert C.resolve(CrystalParams(element="Mo"), two).lattice == "bcc"  # named: the other species is ignored
    dimer = _labelled([Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.3]])], _lj())
    with pytest.raises(StageInputError, match="no fully periodic Cu frame") as e:
        C.resolve(CrystalParams(), dimer)
    assert e.value.field == "crystal.lattice"
    rng = np.random.default_rng(3)
    liquid = bulk("Cu", "fcc", a=3.7, cubic=True).repeat(2)
    liquid.positions += rng.normal(0, 0.5, liquid.positions.shape)
    with pytest.raises(StageInputError, match="none of the 1 lowest-energy .* set crystal.lattice") as e:
        C.resolve(CrystalParams(), _labelled([liquid], _lj()))
    assert e.value.field == "crystal.lattice" and len(str(e.value).splitlines()) == 1
    # fcc and hcp Mo at the same energy: neither is Mo's experimental bcc, so the data cannot tell
    same = []
    for lattice, a in (("fcc", 4.0), ("hcp", 2.83)):
        at = C.unit_cell(Crystal("Mo", lattice, a))
        at.calc = SinglePointCalculator(at, energy=-10.0 * len(at), forces=np.zeros((len(at), 3)))
        same.append(at)
    with pytest.raises(StageInputError, match="fcc, hcp lie within 5 meV/atom") as e:
        C.resolve(CrystalParams(), same)
    assert e.value.field == "crystal.lattice"
    assert C.resolve(CrystalParams(lattice="hcp"), same).a == pytest.approx(2.83, rel=1e-9)
    with pytest.raises(ParamsError, match="'Xx' is not a chemical symbol"):
        C.resolve(CrystalParams(element="Xx"), cu)


def test_resolve_from_complete_params_reads_no_frame():
    def frames():
        raise AssertionError("read")
        yield

    cr = C.resolve(CrystalParams(element="Mo", lattice="bcc", a=3.16), frames())
    assert cr == Crystal("Mo", "bcc", 3.16, None, "params")
    # a null is filled from the data; the given values are kept
    got = C.resolve(CrystalParams(a=3.0), _labelled([bulk("Mo", "bcc", a=3.15, cubic=True)], _lj()))
    assert (got.element, got.lattice, got.a) == ("Mo", "bcc", 3.0) and "a: params" in got.source


def test_train_frames_streams_the_training_split_only(tmp_path):
    from mlipops.frames import write_extxyz

    fcc = _labelled([bulk("Mo", "fcc", a=4.0, cubic=True)], _lj())[0]
    bcc = _labelled([bulk("Mo", "bcc", a=3.15, cubic=True)], _lj())[0]
    assert fcc.get_potential_energy() / 4 < bcc.get_potential_energy() / 2  # LJ: fcc is lower
    fcc.info["split"], bcc.info["split"] = "val", "train"
    write_extxyz(tmp_path / "accepted.extxyz", [fcc, bcc])
    assert [a.info["split"] for a in C.train_frames(tmp_path / "accepted.extxyz")] == ["train"]
    assert C.resolve(CrystalParams(), C.train_frames(tmp_path / "accepted.extxyz")).lattice == "bcc"
    with pytest.raises(StageInputError, match="curated data missing"):
        C.resolve(CrystalParams(), C.train_frames(tmp_path / "missing.extxyz"))


# ------------------------------------------------------------------------------------ builders
def _planes(atoms):
    return C._planes(atoms.positions[:, 2])


@pytest.mark.parametrize("element,lattice,a", LATTICE_CASES)
def test_slab_any_lattice_has_the_layers_vacuum_and_open_surfaces(element, lattice, a):
    from mlipops.descriptors import neighbor_list

    cr = Crystal(element, lattice, a)
    for miller in (["0001", "100", "010"] if lattice == "hcp" else ["100", "110", "111", "210"]):
        s = C.slab(cr, miller, 5, (2, 2), 7.0)
        assert tuple(s.pbc) == (True, True, False) and set(s.get_chemical_symbols()) == {element}
        assert len(_planes(s)) == 5, miller
        z = s.positions[:, 2]
        assert z.min() == pytest.approx(7.0) and s.cell[2, 2] - z.max() == pytest.approx(7.0)
        i = neighbor_list(s.positions, s.cell.array, s.pbc, cr.nn_distance * 1.05)[0]
        coord = np.bincount(i, minlength=len(s))
        assert coord.max() <= cr.z and coord.min() < cr.z  # no atom closer than nn; the top layer is open
        assert np.min(s.get_all_distances(mic=True) + np.eye(len(s)) * 99) == pytest.approx(cr.nn_distance, rel=1e-6)
    if lattice == "hcp":  # the basal plane: every plane one height, spaced c/2
        s = C.slab(cr, "0001", 4, (1, 1), 6.0)
        assert np.diff(_planes(s)) == pytest.approx([C.IDEAL_C_OVER_A * a / 2] * 3)


def test_fcc_slabs_are_the_embedded_datasets_own_and_bad_millers_are_refused():
    cr = Crystal("Cu", "fcc", 3.59)
    ref = fcc111("Cu", size=(2, 2, 5), a=3.59, vacuum=6.0)
    s = C.slab(cr, "111", 5, (2, 2), 6.0)
    assert np.array_equal(s.positions, ref.positions) and np.array_equal(s.cell.array, ref.cell.array)
    for bad in ("11", "0001", "000", "1x1"):
        with pytest.raises(ValueError, match="three digits"):
            C.slab(cr, bad, 4, (1, 1), 6.0)
    with pytest.raises(ValueError, match="layers >= 1"):
        C.slab(cr, "100", 0, (1, 1), 6.0)


def test_vacancy_cell_removes_one_atom_drawn_by_the_generator():
    cr = Crystal("Si", "diamond", 5.43)
    a = C.vacancy_cell(cr, 2, np.random.default_rng(5))
    b = C.vacancy_cell(cr, 2, np.random.default_rng(5))
    full = C.bulk_cell(cr, 2)
    assert len(a) == len(full) - 1 == 63 and np.array_equal(a.positions, b.positions)
    missing = [k for k in range(len(full))
               if not np.isclose(np.linalg.norm(a.positions - full.positions[k], axis=1), 0).any()]
    assert len(missing) == 1
    others = {len(C.vacancy_cell(cr, 2, np.random.default_rng(s))) for s in range(3)}
    assert others == {63}


# ------------------------------------------------------------------------------- oracle check
def test_an_oracle_that_cannot_compute_the_element_is_named_in_one_line():
    from mlipops.oracles import cannot_compute, get_oracle, require_element

    emt = get_oracle("emt")
    assert cannot_compute(emt, "Cu") is None
    assert cannot_compute(emt, "Mo") == "NotImplementedError: No EMT-potential for Mo"
    assert cannot_compute(get_oracle("ase.calculators.lj.LennardJones"), "Mo") is None
    with pytest.raises(OracleError) as e:
        require_element(emt, "Mo", probe=C.unit_cell(Crystal("Mo", "bcc", 3.16)), field="evaluate.nve.reference",
                        remedy="set evaluate.nve.reference: false or name an oracle that can")
    msg = str(e.value)
    assert msg == ("field 'evaluate.nve.reference': the reference oracle emt cannot compute Mo: NotImplementedError: "
                   "No EMT-potential for Mo; set evaluate.nve.reference: false or name an oracle that can")
    assert "nan" not in msg and len(msg.splitlines()) == 1


def test_crystal_params_validate():
    from pydantic import ValidationError

    assert CrystalParams().model_dump() == {"element": None, "lattice": None, "a": None, "c": None}
    for bad in ({"lattice": "bct"}, {"a": 0.0}, {"c": -1.0}, {"elements": "Cu"}):
        with pytest.raises(ValidationError):
            CrystalParams.model_validate(bad)
    assert math.isclose(Crystal("Mg", "hcp", 3.2).nn_distance, 3.2)
