"""Melting point by the interface-velocity (bracketing) method: a second method, independent of the coexistence
run's temperature reading (:mod:`mlipops.evaluate.melting`).

The same two-phase cell (:func:`~mlipops.evaluate.melting.build_coexistence_cell`: solid | liquid along z, two
(001) interfaces) is held at a fixed temperature T and zero pressure on the interface normal. Below Tm the solid
grows and the potential energy falls by the latent heat L per atom that freezes; above Tm it melts. The rate of
change is linear in T − Tm near Tm (the interface velocity v = μ (Tm − T), μ the kinetic coefficient), so its
sign over a grid of temperatures brackets Tm, and a weighted straight line through the rates near the sign change
puts Tm where it crosses zero. Nothing here reads a temperature from a run: T is imposed, only the direction and
speed of the interfaces are measured, so the biases of the coexistence reading (a start-dependent energy, the
slow relaxation of the two-phase temperature) do not enter.

1. **Cell and order parameter.** The coexistence cell builder with ``t_solid = t_liquid = T`` (its liquid half is
   melted at ``t_melt`` = 2.5 t_guess, then cooled to T; the solid gets Maxwell–Boltzmann velocities at 2T), and
   one solid-like threshold of q̄_l for every temperature: :func:`~mlipops.evaluate.melting.calibrate_order` at
   ``t_guess`` (or the given ``q6_solid_threshold``).
2. **Dynamics.** ASE's ``Inhomogeneous_NPTBerendsen`` (velocity-Verlet with a Berendsen thermostat, time constant
   ``taut_fs`` = 100 fs, and a Berendsen barostat at P = 0, ``taup_fs``, compressibility 1/B from the lattice scan):
   first ``relax_steps`` with all three cell lengths free (the solid sets the lateral lattice constant at T: the
   liquid carries no shear), then ``steps`` with the barostat on z only (mask (0, 0, 1)): the lateral size stays the
   solid's at T while the solid fraction changes, and the liquid pressure on the interface normal, which sets Tm,
   is held at zero. Why Berendsen and not Langevin: it is the one ASE integrator with a per-axis barostat (a
   Langevin run would need a hand-written z barostat), it adds no friction to the interface kinetics, and its
   global velocity rescaling cannot move the crossing: at v = 0 no latent heat is released, so whether the
   thermostat removes it locally or evenly only changes |v| away from Tm, not where v changes sign. Its wrong
   kinetic-energy fluctuations do not enter a mean rate. Note that ASE's Berendsen barostat divides by 3 (the
   isotropic formula): the z length relaxes with 3 ``taup_fs``. The barostat acts every ``sample_interval`` steps
   with that many time steps (:func:`_berendsen`: a cell change costs the calculator a neighbour-list rebuild).
3. **Rate per temperature.** Every ``sample_interval`` steps of the z-only stage: the potential energy per atom E,
   the solid fraction f (q̄_l above the threshold), the temperature and Pzz. The fit window ends where f leaves
   [f_min, 1 − f_min] (``min_phase_fraction``: an interface that ran into the other stops moving); with fewer than
   ``min_fit_samples`` samples left the point is *saturated*: its direction is known (fully grown or fully melted)
   but not its rate, and it enters the bracket, not the fit. Growth rate r = −dE/dt (meV/atom/ps, positive: the
   solid grows; E is far less noisy than f: it needs no classification of interface atoms) and df/dt (1/ps), each
   the least-squares slope over the window, its standard error the ordinary one times √τ (τ the integrated
   autocorrelation time of the residuals, :func:`~mlipops.evaluate.melting.block_stderr`: consecutive samples are
   correlated). The interface velocity is v = (df/dt) N / (2 A n_s) (two interfaces, A the cross-section, n_s the
   solid's number density at the lattice constant reached), in m/s. The latent heat of the runs themselves is the
   ratio of the two rates' slopes in T, L = (d r/dT)/(d(df/dt)/dT) (a regression of E on the noisy f within a run
   would be biased toward zero): a check that f counts what E measures.
4. **Bracket and Tm.** A point's direction is decided when |r| > ``significance`` × its own standard error (2σ),
   or by where a saturated run went. The bracket is [T_low, T_high]: the highest temperature where the solid grew
   and the lowest where it melted; a growth above a melting point is reported (``bracket_consistent`` false). Tm
   is the zero of a weighted (1/σ²) straight line r(T) = a + b (T − T̄) through the unsaturated points (within
   ``fit_window_K`` of the first fit's zero when given), σ_Tm² = (σ_a² + (Tm − T̄)² σ_b²)/b² (a and b are
   uncorrelated about the weighted mean T̄), the covariance scaled by χ²/dof when above 1 (``error_scale`` =
   its square root). On EMT Cu and LJ argon χ²/dof was 4–12: one run's slope error misses the slow wandering of
   an interface across a 4×4 (or 3×3) cross-section, so the rates scatter 2–3.5 times more than each run says.
   The Tm error includes that scatter; the directions do not (scaled, runs at 5σ of their own error became
   undecided): read a bracket edge as one run's verdict. With two points (no degree of freedom) the scatter is not
   measured and the error is the runs' own: too small by that factor. The same fit of df/dt gives ``tm_fraction``.
5. **Pressure.** The z barostat lags the volume change of the moving interfaces: with ``taup_fs`` = 500 fs
   (the coexistence cell's) EMT Cu held Pzz at −0.9 GPa while freezing at 1150 K and +0.9 GPa while melting at
   1450 K (−0.6, +0.24, +0.39 GPa at 1250, 1300, 1350 K). The lag is proportional to v and vanishes with it, so
   it slows both directions (Tm(P) moves against the motion: dTm/dP ≈ 60 K/GPa) without moving the crossing;
   100 fs (default) kept it within ±0.2 GPa (−0.15, −0.18, +0.11, +0.11, +0.14 GPa at 1200–1400 K). The mean
   Pzz of each run is in the report.

Measured on EMT Cu, 4×4×8 cells (512 atoms), 200 melt + 200 all-axes + 1600 z-only steps of 5 fs per temperature
(``mlipops evaluate melting-bracket``, params.yaml's section; 2 Dask workers on 2 cores shared with other jobs at
load 9–12, nice 5):

| seed | barostat | temperatures (K) | bracket (K) | Tm fit (K) | χ²/dof | wall |
|---|---|---|---|---|---|---|
| 0 | 500 fs | 1150–1450 every 50 | [1250, 1300] | 1291 ± 12 | 12.5 | 26 min |
| 1 | 100 fs | 1200–1400 every 50 | [1250, 1300] | 1254 ± 32 | 15.2 | 15 min |
| 2 | 100 fs | 1275, 1325 | [1275, 1325] | 1310 ± 4 (2 points) | – | 6 min |
| 0 + 1 + 2 pooled | | 14 runs | [1275, 1300] | 1283 ± 11 | 14.5 | |

Growth rates −dE/dt (meV/atom/ps; seed 0 | seed 1): 1200 K +6.0 | +6.0, 1250 K +4.8 | +5.9, 1300 K −3.3 |
−5.9, 1350 K −3.1 | −5.6, 1400 K −8.4 | −12.2 (1150 K +14.8, 1450 K −12.5; seed 2: 1275 K +6.7, 1325 K −3.0): a step
between 1275 and 1300 K more than a line, hence χ²/dof ≫ 1 and a fitted zero that moves with the weights; the
bracket is the firmer result. Every run at 1300 K and above melted the solid completely within 8 ps (seeds 1, 2).
Interface velocity ≈ 70 m/s at 25–50 K from Tm, kinetic coefficient ≈ 1 m/s/K (slope of v(T) over the grid).
Latent heat from the rates 0.118 ± 0.029 eV/atom (the reference's pure phases at 1280 K: 0.145). The barostat's
lag (item 5) slowed seed 0's melting at 1300 and 1350 K to about half of seed 1's. Against the coexistence method:
the quick reference (3×3×8, 2 seeds, 1280 ± 12 K) agrees (z = +0.2); the 4×4×8 NVE seeds of :mod:`melting` (1299,
1330, 1279 K: 1303 ± 15) agree (z = −1.1); the one-seed 4×4×8 value at P = 0 of issue 23 (1357 ± 12 K) does not
(z = −4.5): here the solid melted outright at 1300, 1325 and 1350 K at Pzz ≈ +0.1 GPa, which if anything raises
Tm by ~6 K.

LJ argon (ASE LennardJones, ε = 0.0104 eV, σ = 3.40 Å, smooth cutoff 2.5–3 σ; 3×3×6, 216 atoms, 10 fs, 100 +
400 steps, threshold 0.37; tests/test_melting_bracket.py, 14 min for both seeds at load 10): seed 0 bracket [85,
95] K, Tm 88.6 ± 1.8 K; seed 1 [85, 90] K, 86.8 ± 3.5 K (k_B Tm/ε = 0.73; the full LJ potential: 0.69).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from ase import units
from ase.calculators.calculator import Calculator

from mlipops.crystal import Crystal, unit_cell
from mlipops.errors import MlipopsError, ParamsError
from mlipops.evaluate.melting import (CoexistenceSettings, block_stderr, build_coexistence_cell, calibrate_order,
                                      solid_fraction, sparse_berendsen, stress_with_forces)
from mlipops.pipeline import MELTING_BRACKET_REPORTS as REPORT_DIR, MELTING_POINT_JSON, MELTING_REFERENCE

# where the coexistence reference is looked for (the first that exists with a Tm): melting_reference's output,
# then the melting stage's report, which carries it under "reference"
COEXISTENCE_SOURCES = (MELTING_REFERENCE, MELTING_POINT_JSON)


@dataclass
class BracketSettings:
    """Every knob of a bracketing run; ``cell`` builds the two-phase cell and sets the order parameter (its
    ``t_guess``, ``supercell``, ``timestep_fs``, ``melt_steps``, ``taup_fs``, thresholds and guesses are used; its
    coexistence-only fields are not)."""

    cell: CoexistenceSettings = field(default_factory=lambda: CoexistenceSettings(supercell=(4, 4, 8)))
    relax_steps: int = 200  # NPT, all axes free: the lateral lattice at T (module doc, item 2)
    steps: int = 1600  # NPT, barostat on z only: the rate is fitted over these
    sample_interval: int = 10  # steps between samples
    taut_fs: float = 100.0  # Berendsen thermostat time constant
    taup_fs: float = 100.0  # Berendsen barostat time constant (the cell's taup_fs is not used; module doc, item 2)
    min_phase_fraction: float = 0.1  # the fit window ends where the solid fraction leaves [f, 1 - f]
    min_fit_samples: int = 8  # fewer samples in the window: saturated (direction only)
    significance: float = 2.0  # |rate| above this many standard errors decides a direction
    fit_window_K: float | None = None  # points within this of the first fit's zero enter the final fit; None: all

    def validate(self) -> "BracketSettings":
        def bad(name, why):
            raise ParamsError(f"{why} (got {getattr(self, name)!r})", field=f"melting.bracket.{name}")
        self.cell.validate()
        if self.sample_interval < 1:
            bad("sample_interval", "must be >= 1")
        for name in ("relax_steps", "steps"):
            if getattr(self, name) < 0 or getattr(self, name) % self.sample_interval:
                bad(name, f"must be a non-negative multiple of sample_interval={self.sample_interval}")
        if self.steps < self.min_fit_samples * self.sample_interval:
            bad("steps", f"needs at least min_fit_samples={self.min_fit_samples} samples")
        if self.min_fit_samples < 3:
            bad("min_fit_samples", "must be >= 3 (a slope and its error)")
        if not self.taut_fs > 0:
            bad("taut_fs", "must be positive (the thermostat holds T)")
        if not self.taup_fs > 0:
            bad("taup_fs", "must be positive (the barostat holds Pzz = 0)")
        if not 0.0 <= self.min_phase_fraction < 0.5:
            bad("min_phase_fraction", "must be in [0, 0.5)")
        if not self.significance > 0:
            bad("significance", "must be positive")
        if self.fit_window_K is not None and not self.fit_window_K > 0:
            bad("fit_window_K", "must be positive, or None: every unsaturated point")
        return self


def check_temperatures(temperatures: Sequence[float]) -> list[float]:
    """The grid, sorted; at least two distinct positive temperatures, else ParamsError."""
    ts = sorted(float(t) for t in temperatures)
    if len(set(ts)) < 2 or len(set(ts)) != len(ts) or not all(math.isfinite(t) and t > 0 for t in ts):
        raise ParamsError(f"needs at least two distinct positive temperatures (K) (got {list(temperatures)})",
                          field="melting.bracket.temperatures")
    return ts


# ------------------------------------------------------------------------------------------ one temperature
def _berendsen(atoms, s: BracketSettings, temperature: float, mask=(1, 1, 1)):
    """Berendsen NPT at ``temperature`` whose barostat acts every ``sample_interval`` steps with that many time
    steps (:func:`~mlipops.evaluate.melting.sparse_berendsen`: the same coupling, a fraction of the cost)."""
    return sparse_berendsen(atoms, s.cell.timestep_fs, temperature, s.taut_fs, s.taup_fs, atoms.info["bulk_modulus"],
                            s.sample_interval, mask)


def slope(t: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(least-squares slope of y(t), its standard error × √τ of the residuals' autocorrelation time)."""
    t, y = np.asarray(t, float), np.asarray(y, float)
    n = len(t)
    if n < 3:
        return float("nan"), float("nan")
    b, a = np.polyfit(t, y, 1)
    res = y - (a + b * t)
    sxx = float(np.sum((t - t.mean()) ** 2))
    se = math.sqrt(float(res @ res) / (n - 2) / sxx) if sxx > 0 else float("nan")
    tau = block_stderr(res)[1]
    return float(b), float(se * math.sqrt(max(tau, 1.0)))


def run_point(calc_factory: Callable[[], Calculator], s: BracketSettings, temperature: float, seed: int,
              threshold: float) -> dict:
    """One temperature: build the cell, relax all axes, then the z-only NPT stage; the traces and the rates."""
    t0 = time.perf_counter()
    T = float(temperature)
    cs = dataclasses.replace(s.cell, t_solid=T, t_liquid=T, q6_solid_threshold=float(threshold), seed=seed)
    rng = np.random.default_rng([int(seed), int(round(T * 1000))])  # one stream per (seed, temperature)
    atoms = build_coexistence_cell(cs, stress_with_forces(calc_factory()), rng)
    n = len(atoms)
    l, n_nb = cs.order()
    k = s.sample_interval
    dyn = _berendsen(atoms, s, T)
    tr = {k_: [] for k_ in ("time_ps", "energy", "fraction", "temperature", "pzz_GPa", "lz")}

    def record(step: int):
        tr["time_ps"].append(step * cs.timestep_fs / 1000.0)
        tr["energy"].append(atoms.get_potential_energy() / n)
        tr["fraction"].append(solid_fraction(atoms, threshold, l, n_nb)[0])
        tr["temperature"].append(atoms.get_temperature())
        tr["pzz_GPa"].append(-atoms.get_stress(voigt=False, include_ideal_gas=True)[2, 2] / units.GPa)
        tr["lz"].append(atoms.cell[2, 2])

    record(0)
    n_relax = s.relax_steps // k
    for i in range(n_relax):
        dyn.run(k)
        record((i + 1) * k)
    dyn.mask = (0, 0, 1)  # from here the lateral size is the solid's at T; z holds Pzz = 0
    for i in range(s.steps // k):
        dyn.run(k)
        record(s.relax_steps + (i + 1) * k)
    tr = {k_: np.asarray(v, dtype=float) for k_, v in tr.items()}
    out = {"temperature_K": T, "seed": int(seed), "n_atoms": n, "threshold": float(threshold),
           "production_start_ps": s.relax_steps * cs.timestep_fs / 1000.0, "production_index": n_relax + 1,
           "traces": {k_: v.tolist() for k_, v in tr.items()}}
    if not all(np.all(np.isfinite(v)) for v in tr.values()):
        return out | {"failed": "MD unstable: non-finite energy or positions (the calculator's forces blew up)",
                      "saturated": None, "wall_s": time.perf_counter() - t0}
    prod = slice(n_relax + 1, None)
    t, e, f = tr["time_ps"][prod], tr["energy"][prod] * 1000.0, tr["fraction"][prod]
    fmin = s.min_phase_fraction
    outside = np.flatnonzero((f < fmin) | (f > 1.0 - fmin))
    end = int(outside[0]) if len(outside) else len(f)
    f_before = tr["fraction"][n_relax]  # at the end of the relaxation
    saturated = end < s.min_fit_samples
    area = float(np.linalg.norm(np.cross(atoms.cell[0], atoms.cell[1])))
    a_t = atoms.info["a0"] * (1.0 + cs.expansion_guess)  # the solid's lattice when built; scaled with the area
    uc = unit_cell(Crystal(cs.element, cs.lattice, a_t))
    built_area = float(np.linalg.norm(np.cross(uc.cell[0], uc.cell[1]))) * cs.supercell[0] * cs.supercell[1]
    n_solid = len(uc) / uc.get_volume() * (built_area / area) ** 1.5  # atoms/Å³
    rate, rate_se = slope(t[:end], -e[:end]) if end >= 3 else (float("nan"), float("nan"))
    frate, frate_se = slope(t[:end], f[:end]) if end >= 3 else (float("nan"), float("nan"))
    to_v = n / (2.0 * area * n_solid) * 100.0  # df/dt (1/ps) -> interface velocity (m/s): Å/ps = 100 m/s
    # saturated: the interfaces ran into each other; the phase they left says the direction
    saturated_direction = (1 if f[end] > 0.5 else -1) if saturated else 0
    return out | {
        "failed": None, "saturated": bool(saturated), "saturated_direction": saturated_direction,
        "growth_rate_meV_per_atom_ps": rate, "growth_rate_stderr": rate_se,
        "fraction_rate_per_ps": frate, "fraction_rate_stderr": frate_se,
        "velocity_m_per_s": frate * to_v, "velocity_stderr": frate_se * to_v,
        "fit_window_ps": [float(t[0]), float(t[end - 1])] if end else None, "fit_samples": int(end),
        "fraction_start": float(f_before), "fraction_end": float(tr["fraction"][-1]),
        "temperature_mean_K": float(tr["temperature"][prod].mean()),
        "pzz_mean_GPa": float(tr["pzz_GPa"][prod].mean()), "area_A2": area, "n_solid_per_A3": float(n_solid),
        "wall_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------ analysis
def weighted_line_zero(x: Sequence[float], y: Sequence[float], sy: Sequence[float]) -> dict:
    """Zero of the weighted (1/σ²) straight line through (x, y ± σ): ``x0``, ``x0_stderr``, ``slope``,
    ``slope_stderr``, ``chi2_per_dof`` (the covariance is scaled by it when above 1); NaN x0 with ``reason`` when
    the line is flat or rising (a rate must fall with T) or fewer than two points."""
    x, y, sy = (np.asarray(v, float) for v in (x, y, sy))
    if len(x) < 2 or len(set(x.tolist())) < 2:
        return {"x0": float("nan"), "x0_stderr": float("nan"), "n": len(x), "reason": "fewer than two temperatures"}
    w = 1.0 / np.maximum(sy, 1e-12 * max(1.0, float(np.abs(y).max()))) ** 2
    xm = float(np.sum(w * x) / np.sum(w))
    d = x - xm
    b = float(np.sum(w * d * y) / np.sum(w * d * d))
    a = float(np.sum(w * y) / np.sum(w))
    dof = len(x) - 2
    chi2 = float(np.sum(w * (y - a - b * d) ** 2))
    scale = max(1.0, chi2 / dof) if dof > 0 else 1.0
    var_a, var_b = scale / float(np.sum(w)), scale / float(np.sum(w * d * d))
    out = {"slope": b, "slope_stderr": math.sqrt(var_b), "intercept_at_mean": a, "x_mean": xm, "n": len(x),
           "chi2_per_dof": chi2 / dof if dof > 0 else None}
    if not b < 0:
        return out | {"x0": float("nan"), "x0_stderr": float("nan"),
                      "reason": f"the rate does not fall with temperature (slope {b:.3g})"}
    x0 = xm - a / b
    return out | {"x0": float(x0), "x0_stderr": float(math.sqrt(var_a + (x0 - xm) ** 2 * var_b) / abs(b)),
                  "reason": None}


def analyse(points: Sequence[dict], s: BracketSettings) -> dict:
    """The bracket, Tm from the weighted fit of the growth rate (and of df/dt), the latent heat; ``points``
    again, each with its ``direction`` (+1 grows, −1 melts, 0 undecided) decided here (module doc, item 4)."""
    points = [dict(p) for p in points]
    ok = [p for p in points if not p.get("failed")]
    fit_pts = [p for p in ok if not p["saturated"] and math.isfinite(p["growth_rate_meV_per_atom_ps"])]

    def fit(key: str, err: str) -> dict:
        pts = fit_pts
        res = weighted_line_zero([p["temperature_K"] for p in pts], [p[key] for p in pts], [p[err] for p in pts])
        if s.fit_window_K is not None and math.isfinite(res["x0"]):
            near = [p for p in pts if abs(p["temperature_K"] - res["x0"]) <= s.fit_window_K]
            if len(near) >= 2:
                pts = near
                res = weighted_line_zero([p["temperature_K"] for p in pts], [p[key] for p in pts],
                                         [p[err] for p in pts])
        return res | {"temperatures_K": [p["temperature_K"] for p in pts]}

    energy_fit = fit("growth_rate_meV_per_atom_ps", "growth_rate_stderr")
    fraction_fit = fit("fraction_rate_per_ps", "fraction_rate_stderr")
    # rates that scatter about the line more than their errors say (χ²/dof > 1) have larger errors than each run
    # estimates: Tm's error is scaled by this Birge ratio (weighted_line_zero), the directions are not (scaled,
    # a run whose rate is 5σ of its own error came out undecided on EMT Cu and LJ argon): module doc, item 4
    birge = math.sqrt(max(1.0, energy_fit.get("chi2_per_dof") or 1.0))
    for p in points:
        if p.get("failed"):
            p["direction"] = 0
        elif p["saturated"]:
            p["direction"] = p["saturated_direction"]
        else:
            r, se = p["growth_rate_meV_per_atom_ps"], p["growth_rate_stderr"]
            p["direction"] = int(np.sign(r)) if math.isfinite(r) and abs(r) > s.significance * se else 0
    grow = [p["temperature_K"] for p in ok if p["direction"] > 0]
    melt = [p["temperature_K"] for p in ok if p["direction"] < 0]
    t_low, t_high = (max(grow) if grow else None), (min(melt) if melt else None)
    consistent = t_low is None or t_high is None or t_low < t_high
    if t_low is not None and t_high is not None:
        reason = None if consistent else (f"the solid grew at {t_low:.0f} K but melted at {t_high:.0f} K: rates "
                                          "not monotonic (noise, or a run that froze or melted by its start)")
    elif t_low is None and t_high is None:
        reason = "no temperature decided a direction (every rate within its error of zero): widen the grid"
    elif t_low is None:
        reason = f"the solid melted at every decided temperature: Tm lies below {t_high:.0f} K"
    else:
        reason = f"the solid grew at every decided temperature: Tm lies above {t_low:.0f} K"
    # latent heat per atom: the energy rate over the fraction rate, both linear in T (their slopes' ratio;
    # a regression of E on the noisy f within a run would be biased toward zero)
    be, bf = energy_fit.get("slope", float("nan")), fraction_fit.get("slope", float("nan"))
    latent = be / bf / 1000.0 if bf and math.isfinite(be) and math.isfinite(bf) else float("nan")
    latent_se = abs(latent) * math.hypot(energy_fit.get("slope_stderr", float("nan")) / be,
                                         fraction_fit.get("slope_stderr", float("nan")) / bf) \
        if math.isfinite(latent) else float("nan")
    tm, tm_se = energy_fit["x0"], energy_fit["x0_stderr"]
    return {"bracket": [t_low, t_high], "bracket_consistent": consistent, "bracket_reason": reason,
            "tm": tm, "tm_stderr": tm_se, "tm_reason": energy_fit.get("reason"),
            "tm_in_bracket": bool(math.isfinite(tm) and t_low is not None and t_high is not None
                                  and t_low <= tm <= t_high),
            "fit": energy_fit, "error_scale": birge, "tm_fraction": fraction_fit["x0"],
            "tm_fraction_stderr": fraction_fit["x0_stderr"], "fit_fraction": fraction_fit,
            "latent_heat_eV_per_atom": latent, "latent_heat_stderr": latent_se, "points": points}


# ------------------------------------------------------------------------------------------ the method
def _point_task(spec: dict) -> dict:
    """One temperature on a worker (Dask): any failure of the calculator or the MD becomes a failed point."""
    from mlipops.evaluate.melting_reference import _single_thread

    _single_thread()
    t0 = time.perf_counter()
    try:
        return run_point(spec["factory"], spec["settings"], spec["temperature"], spec["seed"], spec["threshold"])
    except MlipopsError as exc:
        why = f"failed: {exc}"
    except Exception as exc:  # noqa: BLE001 - a broken potential must not stop the other temperatures
        why = f"MD failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return {"temperature_K": float(spec["temperature"]), "seed": spec["seed"], "failed": why, "saturated": None,
            "wall_s": time.perf_counter() - t0}


def bracket(calc_factory: Callable[[], Calculator], settings: BracketSettings, temperatures: Sequence[float],
            seed: int = 0, map_fn: Callable | None = None) -> dict:
    """The interface-velocity method over ``temperatures`` (K): one run per temperature (module doc).

    ``calc_factory()`` gives a fresh ASE calculator (picklable for ``map_fn``, e.g. a Dask client's map +
    gather; default: one after another here). The solid-like threshold is calibrated once at ``t_guess`` unless
    ``settings.cell.q6_solid_threshold`` is given. Returns a JSON-ready dict: ``points`` (one per temperature,
    rates and traces), ``bracket`` [T_low, T_high] (None where no side was found), ``tm`` ± ``tm_stderr`` (NaN
    with ``tm_reason`` when the fit cannot place it), ``latent_heat_eV_per_atom``, the calibration, the settings
    and ``wall_s``."""
    s = settings.validate()
    ts = check_temperatures(temperatures)
    t0 = time.perf_counter()
    calibration, threshold = None, s.cell.q6_solid_threshold
    if threshold is None:
        calibration = calibrate_order(calc_factory, s.cell, np.random.default_rng([seed, 0]))
        threshold = calibration["threshold"]
    specs = [{"factory": calc_factory, "settings": s, "temperature": t, "seed": int(seed), "threshold": threshold}
             for t in ts]
    points = list(map_fn(_point_task, specs)) if map_fn is not None else [_point_task(sp) for sp in specs]
    out = {"method": "interface velocity (bracketing), NPT at fixed T, Pzz = 0",
           "element": s.cell.element, "lattice": s.cell.lattice, "supercell": list(s.cell.supercell),
           "n_atoms": next((p["n_atoms"] for p in points if "n_atoms" in p), None), "seed": int(seed),
           "temperatures_K": ts, "threshold": float(threshold), "order_calibration": calibration,
           "settings": {k: v for k, v in dataclasses.asdict(s).items() if k != "cell"} | {"cell": s.cell.__dict__},
           **analyse(points, s)}
    out["wall_s"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------ the report
def settings_from_params(p) -> tuple[BracketSettings, list[float], int]:
    """(settings, temperatures in K, seed) of ``evaluate.melting.bracket`` for the melting runs' element and
    lattice (:func:`~mlipops.evaluate.melting_reference.melting_crystal`); the cell's other knobs (t_guess, time
    step, threshold, calibration, liquid volume) are ``evaluate.melting``'s."""
    from mlipops.evaluate.melting_reference import melting_crystal

    m = p.evaluate.melting
    b = m.bracket
    element, lattice = melting_crystal(p)
    cell = dataclasses.replace(m.settings(element, lattice), supercell=tuple(b.supercell), melt_steps=b.melt_steps)
    s = BracketSettings(cell=cell, relax_steps=b.relax_steps, steps=b.steps, sample_interval=b.sample_interval,
                        taut_fs=b.taut_fs, taup_fs=b.taup_fs, fit_window_K=b.fit_window_K)
    ts = [float(t) if b.absolute else m.t_guess + float(t) for t in b.temperatures]
    try:
        return s.validate(), check_temperatures(ts), b.seed
    except ParamsError as exc:
        raise ParamsError(exc.detail, field=f"evaluate.{exc.field}" if exc.field else None) from None


def coexistence_reference(paths: Sequence[Path] = COEXISTENCE_SOURCES) -> dict | None:
    """The coexistence method's Tm of the oracle (``tm``, ``tm_stderr``, ``source``, ``preset``, ``supercell``)
    from the first of ``paths`` that holds one from a run (a given reference is no coexistence result); None."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            continue
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        ref = d.get("reference", d) if "tm_ref" in d else d
        tm, se = ref.get("tm_mean"), ref.get("tm_stderr")
        if ref.get("given") or tm is None or se is None or not ref.get("available", True):
            continue
        cell = (ref.get("settings") or {}).get("supercell") or (d.get("settings") or {}).get("supercell")
        return {"tm": float(tm), "tm_stderr": float(se), "source": str(path), "preset": ref.get("preset"),
                "supercell": list(cell) if cell else None, "n_accepted": ref.get("n_accepted")}
    return None


def compare(result: dict, coex: dict | None) -> dict | None:
    """Do the two methods agree? z = ΔTm / √(σ₁² + σ₂²), agreement when |z| ≤ 2."""
    if coex is None or not math.isfinite(result.get("tm", float("nan"))):
        return None
    diff = result["tm"] - coex["tm"]
    comb = math.hypot(result["tm_stderr"], coex["tm_stderr"])
    z = diff / comb if comb > 0 else float("inf")
    return {"difference_K": diff, "combined_stderr_K": comb, "z": z, "agree": bool(abs(z) <= 2.0)}


def summary_md(result: dict, coex: dict | None) -> str:
    """The report: the bracket, Tm ± error, one row per temperature, and the coexistence method beside it."""
    from mlipops.report import md_table

    def k(x, fmt="{:.0f}"):
        return fmt.format(x) if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"

    lo, hi = result["bracket"]
    lines = [f"# Melting point of {result['element']} ({result['lattice']}) by the interface-velocity method", "",
             f"NPT at fixed temperatures (Berendsen, τ_T = {result['settings']['taut_fs']:g} fs; P = 0 on the "
             f"interface normal after {result['settings']['relax_steps']} steps with all axes free), "
             f"{'×'.join(map(str, result['supercell']))} cells ({result['n_atoms']} atoms), "
             f"{result['settings']['steps']} steps of {result['settings']['cell']['timestep_fs']:g} fs per "
             "temperature: below Tm the solid grows and the potential energy falls, above it melts.", "",
             f"**Bracket:** [{k(lo)}, {k(hi)}] K" + (f" ({result['bracket_reason']})" if result["bracket_reason"]
                                                       else ""), "",
             (f"**Tm = {k(result['tm'])} ± {k(result['tm_stderr'])} K** (zero of the weighted line through the "
              f"growth rates at {', '.join(k(t) for t in result['fit'].get('temperatures_K', []))} K"
              + (f"; χ²/dof {result['fit']['chi2_per_dof']:.1f}" if result["fit"].get("chi2_per_dof") is not None
                 else "") + ")"
              + ("" if result["tm_in_bracket"] else " — outside the bracket")
              if math.isfinite(result["tm"]) else f"**Tm: not placed** ({result['tm_reason']})"),
             "", f"From the solid fraction's rate instead: {k(result['tm_fraction'])} ± "
             f"{k(result['tm_fraction_stderr'])} K. Latent heat of the runs (energy rate / fraction rate): "
             f"{k(result['latent_heat_eV_per_atom'], '{:.3f}')} ± {k(result.get('latent_heat_stderr'), '{:.3f}')} "
             f"eV/atom. Wall time {k(result['wall_s'])} s.", ""]
    lines.append("## Both methods")
    lines.append("")
    if coex is None:
        lines.append("No coexistence result of the oracle found (run `mlipops evaluate melting --reference`, the "
                     "`melting_reference` stage).")
    else:
        c = compare(result, coex)
        cell = "×".join(map(str, coex["supercell"])) if coex.get("supercell") else "?"
        lines += [md_table(["method", "Tm (K)", "± (K)", "cell", "source"], [
            ["interface velocity", k(result["tm"]), k(result["tm_stderr"]), "×".join(map(str, result["supercell"])),
             "this report"],
            ["coexistence (NVE, mean T)", k(coex["tm"]), k(coex["tm_stderr"]), cell,
             f"{coex['source']} ({coex.get('preset')})"]]), ""]
        if c is None:
            lines.append("No Tm from the fit: the methods cannot be compared.")
        else:
            lines.append(f"Difference {c['difference_K']:+.0f} K, combined standard error {c['combined_stderr_K']:.0f}"
                         f" K (z = {c['z']:+.1f}): the two methods "
                         + ("agree within their combined errors (|z| ≤ 2)." if c["agree"] else
                            "do **not** agree within their combined errors (|z| > 2)."))
            if coex.get("supercell") and list(coex["supercell"][:2]) != list(result["supercell"][:2]):
                lines.append(f"The cross-sections differ ({cell} against "
                             f"{'×'.join(map(str, result['supercell']))}): issue 23 measured ~100 K lower Tm for 3×3 "
                             "than for 4×4 with EMT Cu.")
    lines += ["", "## Per temperature", "",
              md_table(["T (K)", "⟨T⟩ (K)", "−dE/dt (meV/atom/ps)", "df/dt (1/ps)", "v (m/s)", "f start → end",
                        "Pzz (GPa)", "direction", "wall (s)"],
                       [[k(q["temperature_K"]), k(q.get("temperature_mean_K"), "{:.1f}"),
                         f"{k(q.get('growth_rate_meV_per_atom_ps'), '{:+.3f}')} ± "
                         f"{k(q.get('growth_rate_stderr'), '{:.3f}')}",
                         f"{k(q.get('fraction_rate_per_ps'), '{:+.4f}')} ± "
                         f"{k(q.get('fraction_rate_stderr'), '{:.4f}')}",
                         k(q.get("velocity_m_per_s"), "{:+.1f}"),
                         f"{k(q.get('fraction_start'), '{:.2f}')} → {k(q.get('fraction_end'), '{:.2f}')}",
                         k(q.get("pzz_mean_GPa"), "{:+.3f}"),
                         q["failed"] if q.get("failed") else
                         {1: "grows", -1: "melts", 0: "undecided"}[q["direction"]]
                         + (" (saturated)" if q.get("saturated") else ""), k(q.get("wall_s"))]
                        for q in result["points"]]), "",
              "Rates are least-squares slopes over the z-only stage until the solid fraction leaves "
              f"[{result['settings']['min_phase_fraction']:g}, {1 - result['settings']['min_phase_fraction']:g}]; "
              "a saturated point (the interfaces met within a few samples) gives its direction only. "
              "Errors: standard error × √τ (autocorrelation of the residuals).", "", "![rates](bracket.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> Path:
    """Potential energy per atom against time per temperature (left) and the growth rate against T with the
    fitted line and Tm (right); PNG."""
    from mlipops.report import pyplot, save_figure

    plt = pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    pts = [q for q in result["points"] if (q.get("traces") or {}).get("time_ps")]
    cmap = plt.get_cmap("coolwarm")
    ts = [q["temperature_K"] for q in pts]
    for q in pts:
        c = cmap((q["temperature_K"] - min(ts)) / max(1e-9, max(ts) - min(ts)))
        tr = q["traces"]
        e = np.asarray(tr["energy"]) * 1000.0
        ax.plot(tr["time_ps"], e - e[q["production_index"]], color=c, lw=0.9, label=f"{q['temperature_K']:.0f} K")
    if pts:
        ax.axvline(pts[0]["production_start_ps"], color="0.5", ls=":", lw=1)
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("E_pot − E_pot(z-only start) (meV/atom)")
    ax.set_title("potential energy: falls where the solid grows")
    ax.legend(fontsize=7, ncol=2)
    fit = [q for q in result["points"] if not q.get("failed") and not q.get("saturated")]
    sat = [q for q in result["points"] if q.get("saturated")]
    ax2.errorbar([q["temperature_K"] for q in fit], [q["growth_rate_meV_per_atom_ps"] for q in fit],
                 yerr=[q["growth_rate_stderr"] for q in fit], fmt="o", color="C0", capsize=3, label="rate ± σ")
    for q in sat:
        ax2.annotate("grown" if q["direction"] > 0 else "melted", (q["temperature_K"], 0.0), ha="center",
                     va="bottom" if q["direction"] > 0 else "top", fontsize=8, color="C3")
    f = result["fit"]
    if math.isfinite(result["tm"]):
        x = np.linspace(min(ts), max(ts), 50)
        ax2.plot(x, f["intercept_at_mean"] + f["slope"] * (x - f["x_mean"]), color="C1", lw=1)
        ax2.axvspan(result["tm"] - result["tm_stderr"], result["tm"] + result["tm_stderr"], color="C1", alpha=0.2,
                    label=f"Tm = {result['tm']:.0f} ± {result['tm_stderr']:.0f} K")
    lo, hi = result["bracket"]
    for t in (lo, hi):
        if t is not None:
            ax2.axvline(t, color="0.4", ls="--", lw=0.8)
    ax2.axhline(0.0, color="k", lw=0.6)
    ax2.set_xlabel("T (K)")
    ax2.set_ylabel("growth rate −dE/dt (meV/atom/ps)")
    ax2.set_title("bracket (dashed) and Tm")
    ax2.legend(fontsize=8)
    save_figure(fig, path, dpi=110)
    return path


def run(p, out_dir: str | Path = REPORT_DIR, reference_paths: Sequence[Path] = COEXISTENCE_SOURCES) -> dict:
    """`mlipops evaluate melting-bracket`: the oracle's Tm by this method (temperatures in parallel through Dask),
    ``bracket.json``, ``summary.md`` (both methods when a coexistence result of the oracle exists) and
    ``bracket.png`` in ``out_dir``."""
    from mlipops.compute import dask_client
    from mlipops.evaluate.melting_reference import OracleFactory, check_oracle
    from mlipops.report import jsonable, progress

    s, ts, seed = settings_from_params(p)
    factory = OracleFactory(p.generate.oracle.calculator, p.generate.oracle.kwargs)
    check_oracle(factory, s.cell.element, s.cell.lattice)
    with dask_client(p.compute, len(ts)) as client:
        with progress(f"interface velocity at {len(ts)} temperatures ({s.cell.element})", len(ts)) as advance:
            def map_fn(fn, specs):
                futures = client.map(fn, specs, pure=False)
                for _ in __import__("distributed").as_completed(futures):
                    advance()
                return client.gather(futures)

            result = bracket(factory, s, ts, seed, map_fn=map_fn)
    result["oracle"] = p.generate.oracle.model_dump()
    coex = coexistence_reference(reference_paths)
    result["coexistence"] = coex
    result["comparison"] = compare(result, coex)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bracket.json").write_text(json.dumps(jsonable(result), indent=1) + "\n")
    (out / "summary.md").write_text(summary_md(result, coex))
    plot(result, out / "bracket.png")
    c = result["comparison"] or {}
    return {"tm": result["tm"], "tm_stderr": result["tm_stderr"], "bracket_low": result["bracket"][0],
            "bracket_high": result["bracket"][1], "coexistence_tm": coex and coex["tm"], "agree": c.get("agree"),
            "wall_s": round(result["wall_s"], 1)}
