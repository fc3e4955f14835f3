"""The interface-velocity (bracketing) melting method (evaluate/melting_bracket.py) on Lennard-Jones argon: real
ASE MD with ASE's LennardJones calculator, the project's coexistence cell builder and order parameter."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from mlipops.errors import ParamsError
from mlipops.evaluate import melting_bracket as mb
from mlipops.evaluate.melting import CoexistenceSettings
from mlipops.params import load_params

SIGMA, EPSILON = 3.40, 0.0104  # Å, eV: argon


class ArgonLJ:
    """Picklable factory of ASE's Lennard-Jones argon: smooth cutoff between 2.5 σ and 3 σ."""

    def __call__(self):
        from ase.calculators.lj import LennardJones

        return LennardJones(epsilon=EPSILON, sigma=SIGMA, rc=3.0 * SIGMA, ro=2.5 * SIGMA, smooth=True)


def argon(supercell=(3, 3, 6), **kw) -> mb.BracketSettings:
    """A small argon cell (216 atoms), 10 fs steps, the bracket's barostat (100 fs). The liquid half is melted
    at 340 K (4 × t_guess: at 2.5 × t_guess a 3-cell slab kept q̄6 ≈ 0.23 after 2 ps). The threshold is given,
    which saves the calibration's MD: its liquid (108 atoms in the commensurate 3×3×3 box) crystallises at 85 K
    within 2 ps (q̄6 0.16 -> 0.34), which calibrate_order detects and redoes hotter (test_melting). Measured: fcc
    at 85 K q̄6 = 0.48 ± 0.02, the melted liquid 0.16 ± 0.04; equal-σ point 0.37."""
    cell = CoexistenceSettings(element="Ar", lattice="fcc", supercell=supercell, t_guess=85.0, timestep_fs=10.0,
                               melt_steps=150, t_melt=340.0, expansion_guess=0.04, liquid_volume_change=0.13,
                               q6_solid_threshold=0.37)
    return mb.BracketSettings(cell=cell, **kw)


# ------------------------------------------------------------------------------------------ real MD
def test_solid_grows_well_below_and_melts_well_above_tm():
    """Argon (Tm about 88 K for this potential at P = 0): at 65 K the solid grows, at 115 K it melts (at 105 K a
    3×3×4 cell's last solid layers survived 1.5 ps: too close for a short run)."""
    s = argon(relax_steps=50, steps=250, min_fit_samples=10)
    out = mb.bracket(ArgonLJ(), s, [65.0, 115.0], seed=0)
    cold, hot = out["points"]
    assert not cold["failed"] and not hot["failed"]
    assert cold["direction"] == 1 and hot["direction"] == -1, (cold, hot)
    assert cold["fraction_end"] > 0.8 and hot["fraction_end"] < 0.2
    for p in (cold, hot):
        if not p["saturated"]:  # a measured rate agrees with the direction
            assert np.sign(p["growth_rate_meV_per_atom_ps"]) == p["direction"]
        assert abs(p["temperature_mean_K"] - p["temperature_K"]) < 0.1 * p["temperature_K"]  # the thermostat
    assert out["bracket"] == [65.0, 115.0] and out["bracket_consistent"]


def test_a_point_whose_liquid_half_does_not_melt_fails_alone():
    """Three hot passes of 2 steps cannot melt the liquid half: that temperature is a failed point with the
    reason, the others still run, and the bracket reports what it has (no exception)."""
    s = argon(supercell=(3, 3, 4), relax_steps=10, steps=40, sample_interval=5, min_fit_samples=3)
    s = mb.BracketSettings(**{**s.__dict__, "cell": mb.dataclasses.replace(s.cell, melt_steps=3, t_melt=90.0)})
    out = mb.bracket(ArgonLJ(), s, [65.0, 115.0], seed=0)
    assert [p["temperature_K"] for p in out["points"]] == [65.0, 115.0]
    for p in out["points"]:
        assert p["failed"] and "did not melt" in p["failed"] and p["direction"] == 0, p
    assert out["bracket"] == [None, None] and "no temperature decided" in out["bracket_reason"]


@pytest.mark.slow
def test_bracket_contains_tm_and_two_seeds_agree():
    """A grid around Tm: the sign change brackets the fitted Tm, and a second seed's Tm agrees within errors."""
    s = argon(supercell=(3, 3, 6), relax_steps=100, steps=400)
    grid = [75.0, 80.0, 85.0, 90.0, 95.0, 100.0]
    runs = [mb.bracket(ArgonLJ(), s, grid, seed=seed) for seed in (0, 1)]
    for r in runs:
        print(f"seed {r['seed']}: bracket {r['bracket']}, Tm {r['tm']:.1f} ± {r['tm_stderr']:.1f} K, from df/dt "
              f"{r['tm_fraction']:.1f} ± {r['tm_fraction_stderr']:.1f}, L {r['latent_heat_eV_per_atom']:.4f} eV, "
              f"error scale {r['error_scale']:.2f}, {r['wall_s']:.0f} s; rates "
              + ", ".join(f"{p['temperature_K']:.0f}: {p.get('growth_rate_meV_per_atom_ps', float('nan')):+.2f}"
                          f"±{p.get('growth_rate_stderr', float('nan')):.2f}{'s' if p['saturated'] else ''}"
                          for p in r["points"]))
        lo, hi = r["bracket"]
        assert r["bracket_consistent"] and lo is not None and hi is not None and hi - lo <= 15.0, r["bracket"]
        assert math.isfinite(r["tm"]) and r["tm_in_bracket"], (r["tm"], r["bracket"])
        assert 0 < r["tm_stderr"] < 6.0
        assert 70.0 < r["tm"] < 100.0  # LJ at P = 0: T* = k_B Tm / ε ≈ 0.7 (81 K) for the full potential
    (a, b) = runs
    assert abs(a["tm"] - b["tm"]) <= 3.0 * math.hypot(a["tm_stderr"], b["tm_stderr"]), (a["tm"], b["tm"])


# ------------------------------------------------------------------------------------------ analysis
def test_weighted_line_zero_matches_numpy_and_propagation():
    rng = np.random.default_rng(3)
    x = np.array([1300.0, 1350.0, 1400.0, 1450.0])
    sy = np.array([0.3, 0.2, 0.25, 0.4])
    y = -0.05 * (x - 1380.0) + rng.normal(0, sy)
    res = mb.weighted_line_zero(x, y, sy)
    (b, a), cov = np.polyfit(x, y, 1, w=1.0 / sy, cov="unscaled")  # y = a + b x
    chi2 = float(np.sum(((y - a - b * x) / sy) ** 2))
    cov = cov * max(1.0, chi2 / (len(x) - 2))
    x0 = -a / b
    jac = np.array([a / b**2, -1.0 / b])  # d x0 / d(b, a)
    assert res["x0"] == pytest.approx(x0, rel=1e-9)
    assert res["x0_stderr"] == pytest.approx(math.sqrt(jac @ cov @ jac), rel=1e-6)
    assert res["slope"] == pytest.approx(b, rel=1e-9)
    rising = mb.weighted_line_zero(x, -y, sy)
    assert math.isnan(rising["x0"]) and "does not fall" in rising["reason"]


def _point(t, rate=float("nan"), se=float("nan"), saturated=0):
    return {"temperature_K": t, "failed": None, "saturated": bool(saturated), "saturated_direction": saturated,
            "growth_rate_meV_per_atom_ps": rate, "growth_rate_stderr": se, "fraction_rate_per_ps": rate / 150.0,
            "fraction_rate_stderr": se / 150.0, "production_index": 0, "fit_samples": 0,
            "traces": {"energy": [], "fraction": []}}


def test_bracket_from_directions_saturated_points_only_bound_it():
    s = mb.BracketSettings()
    pts = [_point(1150, saturated=1), _point(1300, 2.0, 0.3), _point(1350, 0.2, 0.3), _point(1400, -2.0, 0.3),
           _point(1500, saturated=-1)]
    out = mb.analyse(pts, s)
    assert out["bracket"] == [1300, 1400] and out["bracket_consistent"] and out["bracket_reason"] is None
    assert out["fit"]["temperatures_K"] == [1300, 1350, 1400]  # saturated points give no rate
    assert [p["direction"] for p in out["points"]] == [1, 1, 0, -1, -1]
    assert 1300 < out["tm"] < 1400 and out["tm_in_bracket"]
    assert out["latent_heat_eV_per_atom"] == pytest.approx(0.150)  # energy rate / fraction rate (meV -> eV)
    bad = mb.analyse([_point(1300, -1.0, 0.2), _point(1400, 1.0, 0.2), _point(1450, 2.0, 0.2)], s)
    assert not bad["bracket_consistent"] and "not monotonic" in bad["bracket_reason"]
    assert math.isnan(bad["tm"]) and "does not fall" in bad["tm_reason"]
    only_melt = mb.analyse([_point(1300, -1.0, 0.2), _point(1400, -2.0, 0.2)], s)
    assert only_melt["bracket"] == [None, 1300] and "below 1300 K" in only_melt["bracket_reason"]


# ------------------------------------------------------------------------------------------ bad input
def test_bad_settings_raise_params_error():
    with pytest.raises(ParamsError, match="min_fit_samples") as e:
        argon(steps=30, sample_interval=10).validate()
    assert e.value.field == "melting.bracket.steps" and "\n" not in str(e.value)
    with pytest.raises(ParamsError, match="taut_fs"):
        argon(taut_fs=0.0).validate()
    with pytest.raises(ParamsError, match="two distinct positive"):
        mb.check_temperatures([85.0])
    with pytest.raises(ParamsError, match="two distinct positive"):
        mb.check_temperatures([85.0, -10.0])


def test_bad_params_name_the_key(tmp_path, u_repo_root):
    raw = yaml.safe_load((u_repo_root / "params.yaml").read_text())
    raw["evaluate"]["melting"]["bracket"]["temperatures"] = [-1400.0, -1300.0]  # offsets below 0 K
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError) as e:
        mb.settings_from_params(load_params(path))
    assert e.value.field == "evaluate.melting.bracket.temperatures"
    raw["evaluate"]["melting"]["bracket"]["steps"] = 0
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="evaluate.melting.bracket.steps"):
        load_params(path)
    env = os.environ | {"PYTHONPATH": str(u_repo_root / "src")}
    r = subprocess.run([sys.executable, "-c", "from mlipops.cli import main; main()", "evaluate", "melting-bracket",
                        "-p", str(path), "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "evaluate.melting.bracket.steps" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_report_sets_both_methods_side_by_side(tmp_path):
    pts = [_point(1250, saturated=1), _point(1300, 2.0, 0.3), _point(1350, 0.4, 0.3), _point(1400, -1.6, 0.3)]
    res = {"element": "Cu", "lattice": "fcc", "supercell": [4, 4, 8], "n_atoms": 512, "wall_s": 10.0,
           "settings": {"taut_fs": 100.0, "relax_steps": 200, "steps": 1600, "min_phase_fraction": 0.1,
                        "cell": {"timestep_fs": 5.0}}} | mb.analyse(pts, mb.BracketSettings())
    ref = tmp_path / "reference.json"
    ref.write_text('{"available": true, "given": false, "tm_mean": 1357.0, "tm_stderr": 12.0, "preset": "x", '
                   '"settings": {"supercell": [4, 4, 8]}}')
    given = tmp_path / "given.json"
    given.write_text('{"available": true, "given": true, "tm_mean": 1358.0, "tm_stderr": 5.0}')
    coex = mb.coexistence_reference([tmp_path / "missing.json", given, ref])  # a given value is no coexistence
    assert coex["tm"] == 1357.0 and coex["source"] == str(ref)
    c = mb.compare(res, coex)
    assert c["difference_K"] == pytest.approx(res["tm"] - 1357.0)
    assert c["combined_stderr_K"] == pytest.approx(math.hypot(res["tm_stderr"], 12.0))
    assert c["agree"] == (abs(c["z"]) <= 2.0)
    md = mb.summary_md(res, coex)
    assert "| interface velocity |" in md and "| coexistence" in md and "**Bracket:** [1300, 1400] K" in md
    assert ("agree within" in md) and "nan" not in md and "{" not in md
    assert "No coexistence result" in mb.summary_md(res, None)
    res["points"][1]["traces"] = {"time_ps": [0.0, 1.0], "energy": [0.0, -0.001]}
    res["points"][1] |= {"production_index": 0, "production_start_ps": 0.0}
    assert mb.plot(res, tmp_path / "b.png").stat().st_size > 1000
