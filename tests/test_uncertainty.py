"""Ensemble uncertainty metrics (mlipops.evaluate.uncertainty) against hand computations, and the
recalibration carried by the calculator."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from ase.build import bulk
from scipy.stats import norm

from mlipops.evaluate import uncertainty as unc


def test_coverage_nll_and_scale_by_hand():
    err = np.array([0.5, -1.0, 2.0, 0.1])
    sigma = np.ones(4)
    # ±1σ (p = 0.6827): |err| ≤ 1 for 3 of 4; ±2σ (p = 0.9545): all but none above 2 -> 4 of 4
    obs = unc.calibration_curve(err, sigma, np.array([norm.cdf(1) - norm.cdf(-1), norm.cdf(2) - norm.cdf(-2)]))
    assert obs.tolist() == [0.75, 1.0]
    hand = np.mean([0.5 * math.log(2 * math.pi) + e**2 / 2 for e in err])
    assert unc.nll(err, sigma) == pytest.approx(hand, rel=1e-12)
    assert unc.nll(np.array([1.0, 0.0]), np.array([1.0, 2.0])) == pytest.approx(
        np.mean([0.5 * math.log(2 * math.pi) + 0.5, 0.5 * math.log(2 * math.pi * 4)]), rel=1e-12)
    assert unc.fit_scale(err, sigma) == pytest.approx(math.sqrt(np.mean(err**2)), rel=1e-12)
    # the fitted scale minimises the NLL
    s = unc.fit_scale(err, sigma)
    assert unc.nll(err, s * sigma) < min(unc.nll(err, 0.9 * s * sigma), unc.nll(err, 1.1 * s * sigma))


def test_miscalibration_area_matches_the_analytic_value():
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.5, 2.0, 200_000)
    err = rng.normal(0, sigma)
    assert unc.miscalibration_area(unc.calibration_curve(err, sigma)) < 0.005  # calibrated
    # σ twice too large: observed(p) = 2Φ(2 z_p) − 1; the area is ∫|observed − p| dp
    p = np.linspace(0, 1, 20001)[1:-1]
    analytic = np.trapezoid(np.abs(2 * norm.cdf(2 * norm.ppf(0.5 * (1 + p))) - 1 - p), p)
    assert unc.miscalibration_area(unc.calibration_curve(err, 2 * sigma)) == pytest.approx(analytic, abs=0.005)
    assert unc.fit_scale(err, 2 * sigma) == pytest.approx(0.5, rel=0.01)
    assert unc.fit_scale(3 * err, sigma) == pytest.approx(3.0, rel=0.01)


def test_spearman_ranks():
    rng = np.random.default_rng(1)
    e = rng.exponential(1.0, 500)
    assert unc.spearman(e * rng.uniform(0.9, 1.1, 500), e) > 0.95
    assert abs(unc.spearman(rng.exponential(1.0, 500), e)) < 0.15
    assert math.isnan(unc.spearman(np.zeros(5), e[:5]))


@pytest.fixture
def ensemble_and_frames(u_make_potential):
    from mlipops.models.ensemble import Ensemble
    from mlipops.oracles import get_oracle

    d = dict(n_radial=4, n_angular=2, max_l=2)
    model = Ensemble([u_make_potential(hidden=(8,), seed=k, **d) for k in range(3)]).to(torch.float64)
    rng = np.random.default_rng(2)
    frames = []
    for k in range(8):
        a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
        a.positions += rng.normal(0, 0.05 + 0.02 * k, a.positions.shape)
        a.info["config_type"] = "crystal_fcc" if k % 2 else "rattled"
        frames.append(a)
    return model, get_oracle("emt", {}).label(frames)


def test_report_files_metrics_and_gate(ensemble_and_frames, tmp_path):
    model, frames = ensemble_and_frames
    m = unc.run(model, {"val": frames[:4], "test": frames[4:]}, min_spearman=-1.0, report_dir=tmp_path)
    for key in ("val.all.force_spearman", "test.rattled.force_nll", "test.all.force_nll_recalibrated",
                "val.crystal_fcc.energy_miscalibration_area", "scale.force"):
        assert key in m
    assert m["gate.passed"] == 1
    doc = json.loads((tmp_path / "uncertainty.json").read_text())
    assert doc["scale"]["forces"] == pytest.approx(m["scale.force"]) and doc["gate"]["passed"]
    # after recalibration on val, the val NLL cannot be worse (the scale is its minimiser)
    assert m["val.all.force_nll_recalibrated"] <= m["val.all.force_nll"] + 1e-12
    for f in ("sigma_vs_error.png", "calibration.png", "summary.md", "metrics.json"):
        assert (tmp_path / f).stat().st_size > 0
    strict = unc.run(model, {"val": frames[:4], "test": frames[4:]}, min_spearman=0.999, report_dir=tmp_path / "b")
    assert strict["gate.passed"] == 0 and "FAILED" in (tmp_path / "b/summary.md").read_text()


def test_calculator_applies_the_stored_scale(ensemble_and_frames, tmp_path):
    from mlipops.models import MlipopsCalculator

    model, frames = ensemble_and_frames
    model.save(tmp_path / "m")
    a = frames[0].copy()
    a.calc = MlipopsCalculator(tmp_path / "m")
    raw = a.get_forces(), a.calc.results["forces_std"].copy(), a.calc.results["energy_std"]
    (tmp_path / "m/uncertainty.json").write_text(json.dumps({"scale": {"energy": 2.0, "forces": 3.0}}))
    b = frames[0].copy()
    b.calc = MlipopsCalculator(tmp_path / "m")
    assert np.allclose(b.get_forces(), raw[0])
    assert (np.allclose(b.calc.results["forces_std"], 3.0 * raw[1])
            and b.calc.results["energy_std"] == pytest.approx(2.0 * raw[2]))
    assert b.calc.sigma_scale == {"energy": 2.0, "forces": 3.0}
    (tmp_path / "m/uncertainty.json").write_text("{not json")
    from mlipops.errors import MlipopsError

    with pytest.raises(MlipopsError, match="uncertainty.json"):
        MlipopsCalculator(tmp_path / "m")


def test_not_an_ensemble_writes_an_explicit_report(tmp_path):
    unc.unavailable("the model is not an ensemble", tmp_path)
    doc = json.loads((tmp_path / "uncertainty.json").read_text())
    assert doc["available"] is False and doc["gate"]["passed"] is False
    assert json.loads((tmp_path / "metrics.json").read_text())["gate.passed"] == 0


def test_the_headline_test_error_leaves_out_the_reaction_paths():
    """Reaction-path frames (followed out of the hull on purpose) do not enter the split's headline errors; with
    none, the numbers are the whole split's."""
    import pandas as pd

    from mlipops.evaluate.stage import without_paths

    ft = pd.DataFrame({"config_type": ["crystal", "crystal", "path_dimer"], "e_ref_per_atom": [0.0, 0.0, 0.0],
                       "e_pred_per_atom": [0.001, -0.003, 5.0]})
    fc = pd.DataFrame({"config_type": ["crystal"] * 3 + ["path_dimer"] * 3, "f_ref": [0.0] * 6,
                       "f_pred": [0.1, -0.1, 0.1, 9.0, 9.0, 9.0]})
    m = without_paths(ft, fc, ["path_dimer", "path_adatom"])
    assert m["without_paths.n_frames"] == 2
    assert m["without_paths.energy_mae_per_atom"] == pytest.approx(0.002)
    assert m["without_paths.force_mae"] == pytest.approx(0.1)
    assert without_paths(ft, fc, [])["without_paths.energy_mae_per_atom"] == pytest.approx(5.004 / 3)
    assert without_paths(ft[ft.config_type == "path_dimer"], fc, ["path_dimer"]) == {"without_paths.n_frames": 0}
