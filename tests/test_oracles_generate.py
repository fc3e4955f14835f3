"""Oracles (EMT, any ASE calculator by import path) and the dataset recipes."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

import mlipops.generate.recipes as recipes
from mlipops.errors import MlipopsError, OracleError
from mlipops.frames import frame_id, labels
from mlipops.generate.recipes import build_dataset, equilibrium_nn_distance
from mlipops.oracles import get_oracle
from mlipops.params import GenerateParams

PROVENANCE = ("oracle_name", "oracle_version", "oracle_settings")


# ------------------------------------------------------------------------------------ oracles
def test_emt_oracle_labels_energy_forces_stress_and_provenance(u_rng):
    import ase

    crystal = bulk("Cu", "fcc", a=3.6, cubic=True)
    crystal.positions += u_rng.normal(0, 0.05, crystal.positions.shape)
    crystal.info["config_type"] = "crystal_fcc"
    dimer = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.3]])
    oracle = get_oracle("emt")
    out = oracle.label([crystal, dimer])
    assert len(out) == 2
    assert crystal.calc is None  # the input frames are not modified
    e, f, s = labels(out[0])
    ref = crystal.copy()
    ref.calc = EMT()
    assert e == pytest.approx(ref.get_potential_energy(), abs=1e-12)
    np.testing.assert_allclose(f, ref.get_forces(), atol=1e-12)
    np.testing.assert_allclose(s, ref.get_stress(voigt=True), atol=1e-12)
    assert s.shape == (6,)
    np.testing.assert_allclose(f.sum(0), 0.0, atol=1e-10)
    assert out[0].info["config_type"] == "crystal_fcc"
    e2, f2, s2 = labels(out[1])
    assert s2 is None  # no stress for a non-periodic frame
    assert f2[0, 2] == pytest.approx(-f2[1, 2]) and f2[0, 2] != 0.0
    for a in out:
        assert set(PROVENANCE) <= set(a.info)
        assert a.info["oracle_name"] == "emt"
        assert a.info["oracle_version"] == f"ase-{ase.__version__}"
        assert json.loads(a.info["oracle_settings"]) == {}
        assert a.calc.__class__.__name__ == "SinglePointCalculator"


def test_import_path_oracle_with_kwargs_gives_lennard_jones():
    kwargs = {"sigma": 2.3, "epsilon": 0.4, "rc": 6.0}
    oracle = get_oracle("ase.calculators.lj.LennardJones", kwargs)
    r = 2.5
    (d,) = oracle.label([Atoms("Cu2", positions=[[0, 0, 0], [0, 0, r]])])
    e, f, _ = labels(d)

    def lj(x):
        return 4 * 0.4 * ((2.3 / x) ** 12 - (2.3 / x) ** 6)

    assert e == pytest.approx(lj(r) - lj(6.0), rel=1e-10)  # ASE shifts the pair energy to 0 at rc
    dlj = (lj(r + 1e-6) - lj(r - 1e-6)) / 2e-6
    assert f[1, 2] == pytest.approx(-dlj, rel=1e-6)
    assert d.info["oracle_name"] == "ase.calculators.lj.LennardJones"
    assert d.info["oracle_version"].startswith("ase-")
    assert json.loads(d.info["oracle_settings"]) == kwargs


@pytest.mark.parametrize("path", ["no.such.module.Calculator", "ase.calculators.emt.NoSuchClass", "vasp"])
def test_bad_import_path_raises_oracle_error(path):
    with pytest.raises(OracleError) as info:
        get_oracle(path)
    assert isinstance(info.value, MlipopsError)
    assert "generate.oracle.calculator" in str(info.value)


def test_calculator_failure_raises_oracle_error():
    oracle = get_oracle("emt")
    with pytest.raises(OracleError) as info:
        oracle.label([Atoms("U", positions=[[0, 0, 0]])])  # EMT has no uranium parameters
    assert info.value.frame == 0


# ------------------------------------------------------------------------------------ recipes
def _tiny(seed: int = 0) -> GenerateParams:
    return GenerateParams.model_validate({
        "seed": seed,
        "crystals": {"isotropic_strains": [-0.02, 0.0, 0.02], "shear_strains": [0.02],
                     "rattles_per_strain": 0, "min_atoms": 4},
        "defects": {"vacancy_cells": 1, "vacancy_supercell": 2, "slab_size": [2, 2, 3], "slab_rattles": 0},
        "liquid": {"snapshots": 2, "equilibration_steps": 5, "interval": 2, "supercell": 2},
        "paths": {"adatom_points": 2, "dimer_points": 3},
    })


def _docstring_config_types() -> set[str]:
    doc = recipes.__doc__
    names = set()
    for line in doc.splitlines():
        m = re.match(r"^``([a-z0-9_<>]+)``", line.strip())
        if not m:
            continue
        name = m.group(1)
        if "<s>" in name:
            inside = re.search(r"\{([^}]*)\}", line).group(1)
            for s in re.findall(r"([a-z]+)\s*\(", inside):
                names.add(name.replace("<s>", s))
        elif "<hkl>" in name:
            for hkl in re.findall(r"\((\d{3})\)", line):
                names.add(name.replace("<hkl>", hkl))
        else:
            names.add(name)
    return names


@pytest.fixture(scope="module")
def u_tiny_dataset():
    return build_dataset(_tiny(seed=0))


def test_docstring_lists_the_recipes():
    names = _docstring_config_types()
    assert {"crystal_fcc", "crystal_bcc", "crystal_sc", "crystal_diamond", "crystal_hcp", "vacancy",
            "surface_100", "surface_110", "surface_111", "adatom", "liquid", "path_adatom",
            "path_dimer"} == names


def test_build_dataset_yields_every_documented_config_type(u_tiny_dataset):
    frames, meta = u_tiny_dataset
    counts = Counter(a.info["config_type"] for a in frames)
    assert set(counts) == _docstring_config_types()
    assert counts["crystal_fcc"] == 4  # 3 isotropic + 1 shear strain, no rattles
    assert counts["liquid"] == 2 and counts["path_dimer"] == 3 and counts["path_adatom"] == 2
    for a in frames:
        e, f, s = labels(a)
        assert e is not None and np.isfinite(e)
        assert f.shape == (len(a), 3) and np.all(np.isfinite(f))
        periodic = a.pbc.all()
        assert (s is not None) == bool(periodic)
        assert set(PROVENANCE) <= set(a.info) and a.info["oracle_name"] == "emt"
        assert a.info["source"] == "cu_emt"
        assert "frame_id" not in a.info  # ingest computes it from what the file stores
        assert set(a.get_chemical_symbols()) == {"Cu"}
    for a in frames:
        if a.info["config_type"] == "liquid":
            assert a.info["temperature_K"] == 2200.0
            assert len(a) == 4 * 2**3
    dimers = [a for a in frames if a.info["config_type"] == "path_dimer"]
    np.testing.assert_allclose([a.get_distance(0, 1) for a in dimers], [1.8, 3.9, 6.0])
    np.testing.assert_allclose([a.info["path_coordinate"] for a in dimers], [1.8, 3.9, 6.0])
    # a vacancy cell is the 2x2x2 conventional supercell less one atom
    (vac,) = [a for a in frames if a.info["config_type"] == "vacancy"]
    assert len(vac) == 4 * 8 - 1


def test_build_dataset_is_deterministic_per_seed(u_tiny_dataset):
    frames, _ = u_tiny_dataset
    again, _ = build_dataset(_tiny(seed=0))
    ids = [frame_id(a) for a in frames]
    assert ids == [frame_id(a) for a in again]
    assert len(set(ids)) == len(ids)  # no two recipes produce the same structure
    other, _ = build_dataset(_tiny(seed=1))
    changed = {a.info["config_type"] for a, b in zip(frames, other) if frame_id(a) != frame_id(b)}
    assert {"vacancy", "liquid"} <= changed  # the random parts follow the seed
    assert "crystal_fcc" not in changed  # unrattled perfect crystals do not


def test_emt_equilibrium_geometry(u_tiny_dataset):
    _, meta = u_tiny_dataset
    a_fcc = meta["fcc_lattice_constant"]
    assert a_fcc == pytest.approx(3.59, rel=0.01)
    nn = meta["nn_distance"]
    assert nn["fcc"] == pytest.approx(a_fcc / math.sqrt(2.0), rel=1e-12)
    # bonds shorten as coordination drops: diamond (4) < sc (6) < bcc (8) < fcc (12) ~ hcp (12)
    assert nn["diamond"] < nn["sc"] < nn["bcc"] < nn["fcc"]
    assert nn["hcp"] == pytest.approx(nn["fcc"], abs=0.01)
    # the minimum really is a minimum of the EMT energy per atom
    calc = EMT()

    def epa(a):
        atoms = bulk("Cu", "fcc", a=a, cubic=True)
        atoms.calc = calc
        return atoms.get_potential_energy() / len(atoms)

    assert epa(a_fcc) < epa(a_fcc * 0.99) and epa(a_fcc) < epa(a_fcc * 1.01)
    # an unstrained perfect fcc crystal in the dataset is (nearly) stress-free at that constant
    frames, _ = u_tiny_dataset
    (perfect,) = [a for a in frames if a.info["config_type"] == "crystal_fcc"
                  and a.info["strain_kind"] == "iso" and a.info["strain"] == 0.0]
    _, f, s = labels(perfect)
    assert np.abs(f).max() < 1e-8
    assert np.abs(s).max() < 1e-3  # eV/Å^3 (≈ 0.16 GPa): a parabola fit, not an exact minimum


def test_equilibrium_nn_distance_with_lennard_jones():
    """For LJ the fcc nearest-neighbour distance is close to 2^(1/6) σ (exactly 1.09 σ with all shells)."""
    sigma = 2.3
    oracle = get_oracle("ase.calculators.lj.LennardJones", {"sigma": sigma, "epsilon": 0.4, "rc": 4 * sigma})
    d = equilibrium_nn_distance("Cu", "fcc", oracle)
    assert d / sigma == pytest.approx(1.09, abs=0.015)
