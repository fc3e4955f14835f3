"""The NVE energy-conservation check behind the `nve:*` promotion gates."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from mlipops.evaluate.nve import drift, nve_trace


class NoisyEMT(Calculator):
    """EMT with a random force added at every call: not the gradient of any energy, so it heats NVE MD."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, sigma: float, nan_after: int | None = None):
        super().__init__()
        self.sigma, self.nan_after, self.calls = sigma, nan_after, 0
        self.emt = EMT()
        self.rng = np.random.default_rng(0)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms.copy()
        a.calc = self.emt
        self.calls += 1
        e = a.get_potential_energy()
        if self.nan_after is not None and self.calls > self.nan_after:
            e = math.nan
        self.results = {"energy": e, "forces": a.get_forces() + self.rng.normal(0, self.sigma, (len(a), 3))}


def _cell():
    return bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)


def test_smooth_potential_conserves_energy_and_a_non_conservative_force_drifts():
    smooth = nve_trace(_cell(), EMT(), temperature_K=600, timestep_fs=2.0, steps=300, seed=1)
    s = drift(smooth, discard_fs=50)
    assert smooth["finite"] and smooth["n_steps_done"] == 300 and len(smooth["e_tot"]) == 301
    assert abs(s["drift"]) < 0.05  # meV/atom/ps: velocity Verlet on a smooth potential does not drift
    assert 300 < s["mean_temperature"] < 900  # MB at 2T, equipartition -> about T
    noisy = drift(nve_trace(_cell(), NoisyEMT(sigma=0.1), 600, 2.0, 300, seed=1), discard_fs=50)
    # random kicks do random work: E_tot random-walks away (either sign over 0.5 ps), far beyond the smooth run
    assert abs(noisy["drift"]) > 20 * max(abs(s["drift"]), 1e-3) and abs(noisy["drift"]) > 0.5
    assert noisy["rms"] > 10 * s["rms"]


def test_drift_is_the_fitted_slope_in_mev_per_atom_per_ps():
    t = np.arange(0, 1001, 2.0)  # fs
    trace = {"t_fs": t, "e_tot": 0.5 + 2e-6 * t, "temperature": np.full_like(t, 300.0), "finite": True}
    d = drift(trace, discard_fs=100)
    assert d["drift"] == pytest.approx(2.0)  # 2e-6 eV/fs = 2 meV/ps
    assert d["rms"] == pytest.approx(0.0, abs=1e-9) and d["mean_temperature"] == 300.0


def test_a_non_finite_energy_stops_the_run_and_fails_the_drift():
    tr = nve_trace(_cell(), NoisyEMT(sigma=0.0, nan_after=20), 300, 2.0, 100, seed=0)
    assert not tr["finite"] and tr["n_steps_done"] < 100
    assert math.isnan(drift(tr, 0.0)["drift"])


class Exploding(EMT):
    def __init__(self, after: int):
        super().__init__()
        self.after, self.calls = after, 0

    def calculate(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("atoms too close")
        super().calculate(*args, **kwargs)


def test_a_calculator_that_fails_mid_run_fails_the_gate_with_its_reason():
    tr = nve_trace(_cell(), Exploding(after=10), 300, 2.0, 100, seed=0)
    assert not tr["finite"] and "RuntimeError: atoms too close" in tr["error"] and 0 < tr["n_steps_done"] < 100
    assert math.isnan(drift(tr, 0.0)["drift"])


def test_the_report_records_the_model_it_was_computed_for(tmp_path):
    """provenance.json next to metrics.json: the weights' sha256 and the data the model was trained on; the
    promotion gates of another model's weights reject it."""
    import json

    import torch
    import yaml

    from mlipops.evaluate.nve import run
    from mlipops.models import Ensemble, Potential
    from mlipops.params import load_params
    from mlipops.provenance import mismatch, model_fingerprint, read_provenance

    torch.manual_seed(0)
    d = {"cutoff": 4.0, "n_radial": 3, "n_angular": 2, "max_l": 1}
    model_dir = Ensemble([Potential(["Cu"], d, [8]) for _ in range(2)]).save(tmp_path / "cu",
                                                                             extra={"model_name": "cu"})
    (model_dir / "run.json").write_text(json.dumps({"run_id": "r", "data_md5": "a" * 32}))
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"ingest": {"sources": [{"path": "x.extxyz"}]}, "validate": {"allowed_species": ["Cu"]},
                                 "crystal": {"element": "Cu", "lattice": "fcc", "a": 3.61},
                                 "evaluate": {"nve": {"supercell": 1, "steps": 10, "discard_fs": 0.0,
                                                      "reference": False}}}))
    p = load_params(f)
    run(p.evaluate.nve, p.crystal, p.generate.oracle, "cu", model_dir=model_dir, out=tmp_path / "nve")
    prov = read_provenance(tmp_path / "nve")
    assert prov["stage"] == "nve" and prov["applies_to"] == "model" and prov["model_name"] == "cu"
    assert prov["model_weights_sha256"] == model_fingerprint(model_dir) and prov["data_md5"] == "a" * 32
    assert mismatch(tmp_path / "nve", {"model_weights_sha256": model_fingerprint(model_dir),
                                       "data_md5": "a" * 32}) is None
    assert "was computed for model sha256" in mismatch(tmp_path / "nve", {"model_weights_sha256": "b" * 64,
                                                                          "data_md5": "a" * 32})
    assert "computed for data md5" in mismatch(tmp_path / "nve", {"model_weights_sha256": model_fingerprint(model_dir),
                                                                   "data_md5": "c" * 32})


def _tiny_model(path, element):
    import torch

    from mlipops.models import Ensemble, Potential

    torch.manual_seed(0)
    d = {"cutoff": 4.0, "n_radial": 3, "n_angular": 2, "max_l": 1}
    return Ensemble([Potential([element], d, [8]) for _ in range(2)]).save(path, extra={"model_name": "cu"})


def _params(path, **sections):
    import yaml

    from mlipops.params import load_params

    doc = {"ingest": {"sources": [{"path": "x.extxyz"}]}, "validate": {"allowed_species": ["Cu", "Mo"]}} | sections
    path.write_text(yaml.safe_dump(doc))
    return load_params(path)


def test_the_crystal_is_the_datas_own_at_the_calculators_lattice_constant(tmp_path):
    """structure/element null: the curated training frames' crystal (bcc Mo here, not fcc copper); the lattice
    constant is the calculator's own E(a) minimum, for diamond too."""
    from ase.calculators.lj import LennardJones
    from ase.calculators.singlepoint import SinglePointCalculator

    from mlipops.crystal import Crystal
    from mlipops.evaluate.nve import model_lattice_constant, nve_crystal, run
    from mlipops.frames import write_extxyz
    from mlipops.generate.recipes import equilibrium_nn_distance
    from mlipops.oracles import get_oracle

    frames = []
    for s in (0.99, 1.0, 1.01):
        a = bulk("Mo", "bcc", a=3.16 * s, cubic=True).repeat(2)
        a.calc = LennardJones(sigma=2.5, epsilon=0.5, rc=6.0)
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
        a.info["split"] = "train"
        frames.append(a)
    write_extxyz(tmp_path / "accepted.extxyz", frames)
    nve = {"supercell": 2, "steps": 10, "discard_fs": 0.0, "reference": False}
    p = _params(tmp_path / "params.yaml", evaluate={"nve": nve})
    cr = nve_crystal(p.evaluate.nve, p.crystal, tmp_path / "accepted.extxyz")
    assert (cr.element, cr.lattice, cr.a) == ("Mo", "bcc", pytest.approx(3.16, rel=1e-9))
    m = run(p.evaluate.nve, p.crystal, p.generate.oracle, "mo", model_dir=_tiny_model(tmp_path / "mo", "Mo"),
            out=tmp_path / "nve", data=tmp_path / "accepted.extxyz")
    assert m["n_atoms"] == 16 and m["lattice_constant_A"] > 0  # 2 x 2^3: bcc, not fcc's 32
    assert "16-atom Mo bcc crystal" in (tmp_path / "nve/summary.md").read_text()
    q = _params(tmp_path / "p2.yaml", evaluate={"nve": nve | {"structure": "fcc"}})
    # params override the data
    assert nve_crystal(q.evaluate.nve, q.crystal, tmp_path / "accepted.extxyz").lattice == "fcc"
    emt = EMT()
    assert model_lattice_constant(Crystal("Cu", "fcc", 3.8), emt)[0] == pytest.approx(
        equilibrium_nn_distance("Cu", "fcc", get_oracle("emt")) * math.sqrt(2.0), rel=2e-3)
    a_dia, src = model_lattice_constant(Crystal("Cu", "diamond", 5.0), emt)
    assert src == "the model's own" and a_dia == pytest.approx(
        equilibrium_nn_distance("Cu", "diamond", get_oracle("emt")) * 4 / math.sqrt(3.0), rel=2e-3)


def test_a_reference_oracle_that_cannot_compute_the_element_stops_in_one_line(tmp_path):
    """EMT has no molybdenum: one line, exit 2, naming the field and the way out; no MD, no nan."""
    import os
    import subprocess
    import sys

    _tiny_model(tmp_path / "data/models/cu", "Mo")
    _params(tmp_path / "params.yaml", crystal={"element": "Mo", "lattice": "bcc", "a": 3.16},
            evaluate={"nve": {"supercell": 1, "steps": 10}})
    r = subprocess.run([sys.executable, "-m", "mlipops.cli", "evaluate", "nve"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, MLIPOPS_DEBUG=""))
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "nan" not in err
    assert ("the reference oracle emt cannot compute Mo: NotImplementedError: No EMT-potential for Mo; "
            "set evaluate.nve.reference: false or name an oracle that can") in err
    assert "evaluate.nve.reference" in err and not (tmp_path / "reports/evaluate/nve/metrics.json").exists()
