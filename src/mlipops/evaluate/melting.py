"""Melting point by solid–liquid coexistence molecular dynamics (Morris et al., PRB 49, 3109 (1994)).

One elongated periodic cell of ``supercell = (nx, ny, nz)`` conventional cells is split along z: the lower
``nz // 2`` cells stay crystal, the others are melted, so the cell holds two (001) solid–liquid interfaces (one
through the periodic boundary) and no free surface. Any ASE calculator (EMT, ``MlipopsCalculator``) drives ASE's MD.
Any element and lattice: fcc, bcc, diamond, sc (cubic conventional cells of 4, 2, 8, 1 atoms) and hcp (the
orthorhombic 4-atom cell, c along z, ideal c/a to start), built by :mod:`mlipops.crystal`.

1. **Lattice.** ``a`` is given, or minimises the calculator's energy per atom (isotropic scan ±6 %, then ±2 %,
   parabola through the 5 lowest points, like ``generate.recipes.equilibrium_nn_distance``; the scan starts at
   ASE's reference lattice constant when the element's reference state is this lattice, else at twice the
   covalent radius as nearest-neighbour distance: a = 2r/NN_PER_A, diamond nn = a√3/4). The parabola's
   curvature gives the 0 K bulk modulus B = V E''(V) = 2c₂/(9κa) (V_atom = κa³), used only as the barostat's
   compressibility. EMT Cu: a = 3.590 Å, B = 133 GPa.
2. **Build** (:func:`build_coexistence_cell`). The crystal is scaled by 1 + ``expansion_guess`` (0.03: EMT Cu at
   1300 K, zero pressure, Berendsen NPT: 12.65 Å³/atom, a = 3.70 Å) and the liquid half is stretched (or
   compressed) along z so that its volume changes by ``liquid_volume_change`` (signed; default 0.09: EMT liquid Cu
   at 1300 K, 13.85 Å³/atom). Volume change on melting ΔV_m/V_s: Cu +4 % in experiment (EMT +9 %), Mo about
   +5 %, Si −10 % (liquid Si is denser than diamond Si: give a negative value). Only the start is set here: the
   NPH equilibration (item 3) relaxes the z length toward zero pressure, but only part of the way before the
   start has decided the run (EMT Cu, 3 x 3 x 8, seed 0, 250 NPH steps: a start of 0 % went 12.64 → 12.83
   Å³/atom and froze completely; +9 % 13.21 → 13.23, coexisting at 0.53 solid; +18 % 13.78 → 13.56, coexisting,
   still at −0.7 GPa): give the potential's own ΔV_m/V_s to within a few %. The solid half is frozen
   (``FixAtoms``); the other half gets Maxwell–Boltzmann velocities at ``t_melt`` and is melted by Langevin
   (100 fs friction) at ``t_melt`` = 2.5 t_guess (2/3 of ``melt_steps``; at 2 t_guess a 3-cell slab next to the
   frozen crystal stayed ~50 % ordered after 400 fs) and cooled to ``t_liquid`` (last 1/3). Before cooling, the
   middle of the liquid half (a quarter of its length from either interface) is checked: more than
   :data:`MELT_MAX_SOLID` of it solid-like and the hot phase is repeated 1.5 times hotter, up to 3 passes, else
   the attempt is rejected "did not melt" (a superheated crystal melts slowly, and how slowly at 2.5 t_guess
   depends on the element, the time step and the slab: EMT Cu 4x4x8, 100 steps at 3250 K: 0 and 0.8 %; at 1400
   K 99 %, then 13 % at 2100 K; a 2x2x4 cell after 40 steps at 3250 K often 100 %). The constraint goes,
   and the solid gets Maxwell–Boltzmann velocities at 2 ``t_solid``: it starts on its perfect lattice, and
   equipartition moves half of that kinetic energy into potential energy within a phonon period.
3. **Equilibrate** (``equilibration_steps``): NPH with ASE's ``Inhomogeneous_NPTBerendsen`` (the three cell
   lengths relax independently to zero stress, time constant ``taup_fs``, acting once per ``sample_interval``
   steps with that many steps, :func:`sparse_berendsen`; its thermostat is switched off with taut = 10¹² fs).
   The liquid carries no shear, so this sets the solid's lateral lattice constant at the
   coexistence temperature and the z length at zero pressure: the guesses of item 2 need not be exact, but a
   liquid start far from its density can freeze or melt the cell before the barostat has caught up (item 2).
4. **Production** (``production_steps``): NVE (velocity Verlet; default) in the equilibrated cell, or NPH with the
   same Berendsen barostat on z only (``ensemble: nph``, mask (0, 0, 1): the solid's lateral lattice stays as
   equilibrated, the interface normal relaxes to P_zz = 0). The energy (enthalpy) is conserved, so a two-phase
   system's temperature is pinned at Tm: a hotter system melts some solid and cools, a colder one freezes some
   liquid and warms. NVE is an exact ensemble whose conserved energy checks the integrator and the calculator
   (``drift_meV_per_atom_ps``; EMT Cu at 5 fs: |drift| < 0.05), while Berendsen NPH is not a true ensemble
   (all three lengths: 0.25–0.4 meV/atom/ps). But a fixed cell pins Tm at its own pressure, and that depends on
   how much melted (ΔV > 0): the normal pressure ``pressure_zz_GPa`` = ⟨−σ_zz⟩ (ASE sign, ideal gas included)
   over the window is recorded, and Clausius–Clapeyron dTm/dP = Tm ΔV/L (:func:`clausius_clapeyron`; EMT Cu
   ≈ 75 K/GPa: ΔV ≈ 1.2 Å³/atom, L ≈ 0.13 eV) gives the shift to P = 0 (issue 23: NVE runs end at −0.3 to
   +0.4 GPa, ±25 K). The reference stage takes L and ΔV from its own pure solid and liquid at Tm
   (:func:`phase_properties`) and, for NVE, shifts every run to P = 0 (:func:`run_tm`) before a seed's two
   starts are compared; the members use the reference's slope. With NPH on z (the stage's default,
   ``evaluate.melting.ensemble``) only the residual P_zz is left, and its shift is a stated systematic. EMT Cu
   (4 x 4 x 8, 4 ps, seed 0; L = 0.144 eV, ΔV = 1.09 Å³/atom at 1300 K: 61.5 K/GPa): NVE ended at P_zz
   +0.60 and +0.16 GPa (above / below start; −37 and −10 K to P = 0) with |drift| ≤ 0.002 meV/atom/ps; NPH
   on z at +0.08 and −0.07 GPa (∓4.5 K) with drift −0.06 and −0.08 meV/atom/ps (~1 K of T over a 2 ps
   window); the starts ended 48 K (NVE at P = 0) and 38 K (NPH) apart. NPH needs no L and ΔV, so it also
   serves members against a given reference.
   **Late window.** The two-phase temperature relaxes over 5–10 ps, so the mean over all of production leans
   toward the start. Tm = ⟨T⟩ over the last ``window_fraction`` (½) of production (kinetic T = 2E_kin/(3N k_B)
   every ``sample_interval`` steps; ``tm_full_production`` keeps the old reading). Converged
   (:func:`window_stats`) when the drift over the window (least-squares slope × length) is within
   ``drift_sigma`` (2) of its own standard error (a line through 4–10 block means of ≥ 2τ samples); else
   production is extended by ``production_steps``/2 and the test repeated, up to ``max_production_steps``
   (default 2 × production). A run that never converges is kept, ``converged`` False, and rejected with the
   drift in its reason (not rerun: another start does not make a slow relaxation faster). The drift is not
   tested against the mean's block error: se(drift) ≈ √12 × that error for any window length, so such a test
   would pass a stationary series only 23 % of the time (with 2 se(drift): 91 % on an AR(1) test series).
5. **Error of one run.** Block averaging: the integrated autocorrelation time τ of the production T series
   (initial-positive-sequence sum) bounds the block length from below (⌈2τ⌉ samples), and the series is cut
   into 5 blocks (4 at least; fewer, longer blocks than 2τ allows, because the interfaces relax on a 5–10 ps
   scale that the autocorrelation sum of a short series misses); stderr = std(block means)/√n_blocks.
6. **Coexistence check and retries.** Per atom, the Lechner–Dellago averaged q̄_l (:func:`order_parameter`: freud
   ``Steinhardt(l, average=True)`` over the k nearest neighbours from a ``freud.locality.AABBQuery`` on a freud
   box built from the ASE cell's lengths and angles), (l, k) per lattice (:data:`ORDER_PARAMETER`): fcc and hcp
   q̄₆ with 12, sc q̄₄ with 6 (the first shell); bcc q̄₆ with 14 (first and second shell, 8 + 6: they lie only
   13 % apart and mix in a hot crystal) and diamond q̄₄ with 16 (4 + 12: the second shell is diamond's fcc
   sublattice). Measured as separation (μ_s − μ_l)/(σ_s + σ_l) between a crystal with Lindemann-limit
   displacements (rms 0.12 nn) and a random packing at its density (minimum distance 0.7 nn): fcc q̄₆ 8.0
   (q̄₄ 4.7); bcc q̄₆ with 14 neighbours 13.1, with 8 only 6.4; hcp q̄₆ 8.8; sc q̄₄ 7.5 (q̄₆ 1.4); diamond
   with 16 neighbours q̄₄ 10.6, q̄₆ 8.4, with 4 (tetrahedral) q̄₃ 5.9, q̄₄ 3.5, q̄₆ 3.1 (averaging over the atom
   and its 4 neighbours cancels part of the odd-l order of a crystal with inversion between the two sites:
   perfect diamond q̄₃ = 0.447 = 3/5 q₃). On real MD of Si (ASE's Tersoff calculator, Tersoff 1988 Si(C), 216
   atoms, diamond at 2230 K against the liquid at 2680 K): q̄₄ with 16 neighbours 0.235 ± 0.008 (min 0.212)
   against 0.055 ± 0.018 (max 0.129), separation 6.8; q̄₃ with 4: 0.428 ± 0.006 against 0.204 ± 0.057,
   separation 3.5 (its liquid keeps much tetrahedral order).
   Solid-like: q̄_l > a threshold calibrated per run (``q6_solid_threshold`` None; a given value overrides it) on the
   calculator's own pure solid and pure liquid at ``t_guess`` (:func:`calibrate_order`): the point equally many
   standard deviations from both means, so a potential whose liquid is more or less ordered than EMT's gets its own.
   At t_guess below the model's Tm the small pure liquid may crystallise while it is sampled (mlearn Li, t_guess 450
   K against the members' ~560 K: one member's liquid read 0.26 against the others' 0.13-0.18, and its threshold
   moved with it; LJ argon's 108 atoms at 85 K); :func:`liquid_ordering` detects it and the liquid is melted hotter
   and sampled at t_liquid, then 1.4 t_guess. EMT Cu (256 atoms), where the old fixed 0.32 was measured: perfect fcc
   0.567; fcc at 1300 K mean 0.471, sd 0.029, min 0.373; liquid at 1300 K mean 0.158, sd 0.032, max 0.254 (equal-σ
   point 0.322); liquid at 1600 K mean 0.153, sd 0.040, max 0.262. The calibration of the quick preset (144 + 144
   atoms, 100 + 150 + 100 steps: ~10 % of a run) gave 0.319 and 0.336 for seeds 0 and 1 (seed 0: solid 0.459 ± 0.029,
   liquid 0.155 ± 0.034, separation 4.8) and the same two reference runs, Tm bit for bit, as the fixed 0.32 (1290.0 ±
   6.7 and 1269.7 ± 11.8 K). Tersoff Si at 2500 K (64 + 64 atoms, 2 fs, melt 400 and 150 steps): solid 0.239 ± 0.006,
   liquid 0.045 ± 0.011, threshold 0.169, separation 11.4. The run is accepted when the mean solid fraction over the
   last 10 % of the production samples lies in [f_min, 1 − f_min] (``min_phase_fraction``). Otherwise it is rejected
   with its reason and rerun (new random stream) from shifted start temperatures (:func:`next_attempt`): fully melted
   → ``t_solid`` and ``t_liquid`` both lowered by ``retry_step_K`` (default 11.5 % of t_guess; too much energy),
   fully crystallised → raised; the step halves when the direction flips.
   The energy balance (3k_B/2)(T_s + T_l) + L/2 = 3k_B Tm + (1 − f)L shows why the defaults
   T_s = 0.8 t_guess, T_l = 1.2 t_guess end near f = 1/2 when t_guess ≈ Tm, and that a shift δ of both moves
   f by 3k_B δ/L ≈ δ/500 K for copper (L ≈ 0.13 eV/atom).
   **Bracketing starts.** Every seed runs twice (:data:`STARTS`): both start temperatures shifted by
   +``start_offset`` · t_guess (above) and by − that (below). With ΔS_m = L/Tm ≈ 1.2 k_B (Richard's rule: EMT
   Cu 1.16, Lennard-Jones 1.3) the shift moves the final solid fraction by 3δ/(1.2 Tm) ≈ 2.5 δ/Tm: the default
   0.05 (65 K for Cu) gives ±0.13, so both starts still end in coexistence when the guess does. The seed is
   accepted (:func:`seed_result`) only when both runs are (two phases, converged) and agree within
   ``agree_sigma`` (2) × their combined error; its Tm is their mean. A retry still shifts a run's start to
   reach coexistence (``history`` keeps every attempt), but the value is read from a converged window and set
   against the other start's, so it does not inherit the shift. Measured: the two starts end further apart
   than their block errors say, both ways round (the interfaces wander on a longer time scale than a window
   resolves, item 7): Lennard-Jones argon (288 atoms, 6-12 ps) NVE 80.7 ± 0.3 (above) and 74.2 ± 0.7 K
   (below), NPH on z 75.0 ± 0.6 and 82.6 ± 0.4 K; EMT Cu (4 x 4 x 8, 4 ps, at P = 0 with 61.5 K/GPa) 1301 ±
   3 and 1253 ± 6 K (seed 0), 1347 ± 11 and 1294 ± 6 K (seed 1). Hence ``require_agreement`` (default False
   in both presets): False keeps a seed whose starts disagree as a bracket, Tm = their mean with half the gap
   in its error (``bracketed``); True rejects it, for a cell and run length shown to converge.
7. **Several seeds** (:func:`melting_point`): tm_mean and tm_std (ddof = 1) over the accepted seeds, and the
   combined standard error sqrt((tm_std² + mean_k stderr_k²)/n): the scatter between seeds plus the within-run
   error, so that two or three seeds cannot report a spuriously small error (it overcounts by at most √2).
   On EMT Cu the seeds scatter far more than one run's stderr says (item 5): 288 atoms, 5 ps: 1310 ± 5,
   1265 ± 13, 1359 ± 4 K; 512 atoms, 8–10 ps: 1299 ± 3, 1330 ± 8, 1279 ± 4 K. Seeds are the error bar.

Sizes. The liquid slab must be thicker than two interface widths: with 3 cells per phase (3 x 3 x 6) the
liquid froze through at 1340–1450 K, above Tm. The cross-section must exceed the liquid's correlation length: with
2 x 2 cells (7.4 Å) Tm came out 1360–1460 K, and 3 x 3 still melts ~100 K below 4 x 4 (issue 23: 1218–1278 K
against 1357 K at P = 0). Use ≥ 4 x 4 lateral and ≥ 4 cells per phase: 4 x 4 x 8 (512 atoms) in both presets.

Time step: 5 fs. Copper is heavy (63.5 u), its fastest phonon period is ~140 fs, ASE's Cu/EMT MD examples use
5 fs, and the NVE drift above is negligible. Lighter elements or stiffer potentials need less (Si: 1–2 fs, Li:
~1 fs); the step counts (``melt_steps``, ``calibration_steps``, equilibration, production) count steps, not
time, so they must grow with it: a melt shorter than ~0.7 ps leaves the liquid half partly ordered (Tersoff Si,
150 steps of 1 fs: q̄₄ of the liquid half 0.19, against 0.06 for its liquid and 0.24 for its hot crystal).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from ase.constraints import FixAtoms
from ase.data import atomic_numbers, covalent_radii, reference_states

from mlipops.crystal import LATTICES, NN_PER_A, Crystal, bulk_cell, unit_cell
from mlipops.errors import MlipopsError, ParamsError


# The averaged order parameter q̄_l per lattice: (l, number of nearest neighbours: the first shell, crystal
# COORDINATION; bcc and diamond the first two shells, which separate far better). Measured: module doc, item 6.
ORDER_PARAMETER = {"fcc": (6, 12), "hcp": (6, 12), "bcc": (6, 14), "sc": (4, 6), "diamond": (4, 16)}
# a rerun's shift of both start temperatures, as a fraction of t_guess (retry_step_K None): copper's 150 K of
# 1300 K, the step that moved an EMT Cu run from fully melted to coexisting; Mo 333 K, Li 52 K
RETRY_STEP_FRACTION = 0.115
MIN_WINDOW_SAMPLES = 8  # late-window samples window_stats needs for a drift error (4 blocks of 2)
# the liquid half after melting (module doc, item 2): at most this share of the atoms in its middle (a quarter of
# its length away from either interface) solid-like, else it is melted again MELT_HOTTER times hotter, at most
# MELT_PASSES passes in all. Measured after one pass at 2.5 t_guess: EMT Cu 4x4x8 0.0 and 0.8 %, LJ argon 3x3x6
# 3-6 %; with the interface layers (q̄ averaged over crystal neighbours) the whole half reads 27-40 %
MELT_MAX_SOLID = 0.25
MELT_HOTTER = 1.5
MELT_PASSES = 3
# calibrate_order's pure liquid has begun to crystallise when more than this share of its atoms in one sample
# lies above mu_s - 3 sigma_s of the pure solid (a liquid has none there: EMT Cu's lies 6 of its own sd below);
# it is then melted MELT_HOTTER times hotter and sampled at t_liquid, the coexistence cell's liquid start
RECRYSTALLISED = 0.05
LIQUID_RISE = 0.1  # ... or when its mean q̄ rises by more than this share of its gap to the solid (liquid_ordering)


@dataclass
class CoexistenceSettings:
    """Every knob of one coexistence run; the defaults are a quick run on EMT copper (see module doc)."""

    element: str = "Cu"
    lattice: str = "fcc"  # fcc | bcc | diamond | sc (cubic conventional cell), hcp (orthorhombic cell)
    a: float | None = None  # Å, 0 K lattice constant; None: minimise the calculator's energy
    supercell: tuple[int, int, int] = (3, 3, 8)  # conventional cells; z is split: solid | liquid (module doc)
    t_guess: float = 1300.0  # K, initial guess of Tm
    t_solid: float | None = None  # K, solid half's start temperature; None: 0.8 t_guess
    t_liquid: float | None = None  # K, liquid half's start temperature; None: 1.2 t_guess
    t_melt: float | None = None  # K, the liquid half is melted at it first; None: 2.5 t_guess
    timestep_fs: float = 5.0
    melt_steps: int = 150
    equilibration_steps: int = 250
    production_steps: int = 1000  # 5 ps at 5 fs
    max_production_steps: int | None = None  # extended in chunks of production_steps/2 up to it; None: 2x production
    window_fraction: float = 0.5  # Tm is read from this last share of production (module doc, item 4)
    drift_sigma: float = 2.0  # converged: |drift over the window| <= drift_sigma x its standard error
    start_offset: float = 0.05  # ± shift of both start temperatures of the above / below starts, × t_guess (item 6)
    agree_sigma: float = 2.0  # a seed's two starts must agree within agree_sigma x their combined error
    require_agreement: bool = True  # False: starts that disagree bracket Tm (mean ± half the gap), not rejected
    sample_interval: int = 5  # steps between recorded samples (T, solid fraction)
    ensemble: Literal["nph", "nve"] = "nve"
    q6_solid_threshold: float | None = None  # solid-like above it; None: calibrated per run (module doc, item 6)
    order_l: int | None = None  # l of the averaged q̄_l; None: ORDER_PARAMETER[lattice]
    order_neighbors: int | None = None  # nearest neighbours of q̄_l; None: ORDER_PARAMETER[lattice]
    calibration_steps: int = 100  # MD steps of the pure solid and of the pure liquid that calibrate the threshold
    min_phase_fraction: float = 0.15
    max_retries: int = 2
    retry_step_K: float | None = None  # None: RETRY_STEP_FRACTION x t_guess (Cu 150 K at 1300 K, Mo 333 K at 2900 K)
    expansion_guess: float = 0.03  # start lattice = a (1 + it); the NPH equilibration corrects it
    liquid_volume_change: float = 0.09  # start volume of the liquid half / that of the solid half − 1 (item 2)
    taup_fs: float = 500.0  # Berendsen barostat time constant
    seed: int = 0

    def temperatures(self) -> tuple[float, float, float]:
        """(t_solid, t_liquid, t_melt) with the defaults filled in."""
        g = self.t_guess
        return (self.t_solid if self.t_solid is not None else 0.8 * g,
                self.t_liquid if self.t_liquid is not None else 1.2 * g,
                self.t_melt if self.t_melt is not None else 2.5 * g)

    def retry_step(self) -> float:
        """K by which a rerun shifts both start temperatures: ``retry_step_K``, else :data:`RETRY_STEP_FRACTION`
        of ``t_guess`` (the solid fraction moves by about 3 k_B δ / L, and L scales with Tm: the same shift in
        K is too small a move for Mo and too large for Li)."""
        return self.retry_step_K if self.retry_step_K is not None else RETRY_STEP_FRACTION * self.t_guess

    def production_limit(self) -> int:
        """The most production steps one attempt may run (the late-window test extends it up to this)."""
        return self.max_production_steps if self.max_production_steps is not None else 2 * self.production_steps

    def production_chunk(self) -> int:
        """Steps of one extension of production: half of ``production_steps``, in whole samples."""
        k = self.sample_interval
        return max(k, (self.production_steps // 2) // k * k)

    def order(self) -> tuple[int, int]:
        """(l, number of neighbours) of the order parameter q̄_l."""
        l, n = ORDER_PARAMETER[self.lattice]
        return (self.order_l or l, self.order_neighbors or n)

    def calibrating(self) -> bool:
        """True when the solid-like threshold is calibrated per run (no ``q6_solid_threshold`` given)."""
        return self.q6_solid_threshold is None

    def calibration_md_steps(self) -> int:
        """MD steps of one run's calibration (0 with a given threshold): solid, melting, liquid."""
        return 2 * self.calibration_steps + self.melt_steps if self.calibrating() else 0

    def validate(self) -> "CoexistenceSettings":
        def bad(name, why):
            raise ParamsError(f"{why} (got {getattr(self, name)!r})", field=f"melting.{name}")
        if self.lattice not in LATTICES:
            bad("lattice", f"must be one of {', '.join(LATTICES)}")
        if self.element not in atomic_numbers:
            bad("element", "unknown chemical symbol")
        if len(self.supercell) != 3 or min(self.supercell) < 1 or self.supercell[2] < 2:
            bad("supercell", "needs three positive counts and at least 2 cells along z")
        if self.ensemble not in ("nph", "nve"):
            bad("ensemble", "must be 'nve' or 'nph'")
        if self.sample_interval < 1:
            bad("sample_interval", "must be >= 1")
        for name in ("equilibration_steps", "production_steps"):
            if getattr(self, name) % self.sample_interval or getattr(self, name) < 0:
                bad(name, f"must be a non-negative multiple of sample_interval={self.sample_interval}")
        if self.production_steps < 4 * self.sample_interval:
            bad("production_steps", "needs at least 4 samples")
        if self.max_production_steps is not None and (self.max_production_steps < self.production_steps
                                                      or self.max_production_steps % self.sample_interval):
            bad("max_production_steps", f"must be >= production_steps={self.production_steps} and a multiple of "
                f"sample_interval={self.sample_interval}")
        if not 0.0 < self.window_fraction <= 1.0:
            bad("window_fraction", "must be in (0, 1]")
        if self.window_fraction * self.production_steps < MIN_WINDOW_SAMPLES * self.sample_interval:
            # window_stats fits the drift through >= 4 block means of >= 2 samples: with fewer the drift has no
            # error, and the run could never pass the convergence test
            bad("window_fraction", f"the late window (window_fraction x production_steps) needs at least "
                f"{MIN_WINDOW_SAMPLES} samples of sample_interval={self.sample_interval} steps")
        for name in ("drift_sigma", "agree_sigma"):
            if getattr(self, name) <= 0:
                bad(name, "must be positive")
        if not 0.0 <= self.start_offset < 0.5:
            bad("start_offset", "must be a fraction of t_guess in [0, 0.5)")
        if not 0.0 <= self.min_phase_fraction < 0.5:
            bad("min_phase_fraction", "must be in [0, 0.5)")
        if self.retry_step_K is not None and self.retry_step_K <= 0:
            bad("retry_step_K", "must be positive, or None: RETRY_STEP_FRACTION x t_guess")
        if self.timestep_fs <= 0 or self.t_guess <= 0:
            bad("timestep_fs" if self.timestep_fs <= 0 else "t_guess", "must be positive")
        if self.q6_solid_threshold is not None and not 0.0 < self.q6_solid_threshold < 1.0:
            bad("q6_solid_threshold", "must be in (0, 1), or None: calibrated per run")
        if self.calibrating() and self.calibration_steps < 2 * self.sample_interval:
            bad("calibration_steps", f"needs at least 2 samples (2 x sample_interval={self.sample_interval})")
        if not -0.5 < self.liquid_volume_change < 1.0:
            bad("liquid_volume_change", "must be a fraction in (-0.5, 1)")
        if (self.order_l is not None and self.order_l < 1) or (self.order_neighbors is not None
                                                              and self.order_neighbors < 1):
            bad("order_l" if self.order_l is not None and self.order_l < 1 else "order_neighbors", "must be >= 1")
        return self


@dataclass
class CoexistenceRun:
    """One accepted (or finally rejected) coexistence run; the arrays start when the halves are joined."""

    seed: int
    t_start_liquid: float  # K
    temperatures: np.ndarray  # K, [n_samples]
    times_fs: np.ndarray  # fs since joining, [n_samples]
    solid_fraction: np.ndarray  # [n_samples]
    tm: float  # K, mean T over the late window of production (item 4)
    tm_stderr: float  # K, block-averaging standard error of tm
    coexisting: bool
    rejected_reason: str | None
    attempts: int
    wall_s: float
    n_atoms: int
    t_start_solid: float = float("nan")  # K
    production_start_fs: float = 0.0
    final_solid_fraction: float = float("nan")  # mean over the last 10 % of production
    pressure_GPa: float = float("nan")  # mean over production (ASE sign: positive = compressed)
    drift_meV_per_atom_ps: float = float("nan")  # of the conserved energy over production: integrator check
    volume_start: float = float("nan")  # Å³/atom when the halves are joined (the guesses of item 2)
    volume_per_atom: float = float("nan")  # Å³/atom, mean over production (after the NPH equilibration)
    order_threshold: float = float("nan")  # the solid-like threshold of q̄_l used (given or calibrated)
    order_calibration: dict | None = None  # the calibration (:func:`calibrate_order`); None: threshold given
    history: list[dict] = field(default_factory=list)  # every attempt: temperatures, fraction, reason
    start: int = 0  # +1: started above the guess (t_solid, t_liquid + start_offset t_guess), -1: below, 0: at it
    converged: bool | None = None  # the late window's drift below its error (None: not tested, e.g. a failed run)
    window_start_fs: float = float("nan")  # fs since joining: the late window Tm is read from
    window_end_fs: float = float("nan")
    drift_K: float = float("nan")  # K, linear-fit slope of T over the window x its length
    drift_se_K: float = float("nan")  # K, standard error of drift_K (block errors, item 5)
    pressure_zz_GPa: float = float("nan")  # mean over the window of P_zz = -σ_zz (z: the interfaces' normal)
    pressure_zz_stderr: float = float("nan")  # GPa, its block standard error
    tm_full_production: float = float("nan")  # K, mean T over all of production (the old reading, for comparison)
    production_steps_run: int = 0  # production steps of the accepted (last) attempt, extensions included

    @property
    def accepted(self) -> bool:
        """Both phases remained and the window converged (or was not tested)."""
        return bool(self.coexisting and self.converged is not False)

    def summary(self) -> dict:
        """JSON-ready scalars (no traces)."""
        keys = ("seed", "start", "t_start_solid", "t_start_liquid", "tm", "tm_stderr", "coexisting", "converged",
                "rejected_reason", "attempts", "wall_s", "n_atoms", "final_solid_fraction", "pressure_GPa",
                "pressure_zz_GPa", "pressure_zz_stderr", "window_start_fs", "window_end_fs", "drift_K", "drift_se_K",
                "tm_full_production", "production_steps_run", "drift_meV_per_atom_ps", "volume_start",
                "volume_per_atom", "order_threshold", "order_calibration", "history")
        return {k: getattr(self, k) for k in keys} | {"accepted": self.accepted}


def lattice_constant(element: str, lattice: str, calc: Calculator, a: float | None = None) -> tuple[float, float]:
    """(a, B): the 0 K lattice constant (Å) minimising the energy per atom and the bulk modulus (eV/Å³).

    The scan starts from ASE's reference lattice constant when its reference state is this lattice, else from
    the covalent radii: nearest-neighbour distance 2 r_cov = ``NN_PER_A[lattice]`` · a (diamond: a√3/4; hcp:
    the ideal c/a). With ``a`` given only B is computed (a ±2 % scan around it)."""
    if a is not None:
        return float(a), _scan(element, lattice, calc, a, 0.02)[1]
    ref = reference_states[atomic_numbers[element]] or {}
    if ref.get("symmetry") == lattice and "a" in ref:
        a_guess = float(ref["a"])
    else:
        a_guess = 2.0 * covalent_radii[atomic_numbers[element]] / NN_PER_A[lattice]
    for _ in range(4):  # recentre while the minimum lies near the edge of the ±6 % scan
        a_min, _ = _scan(element, lattice, calc, a_guess, 0.06)
        if abs(a_min / a_guess - 1.0) < 0.05:
            break
        a_guess = a_min
    return _scan(element, lattice, calc, a_min, 0.02)  # refine around the minimum


def _scan(element: str, lattice: str, calc: Calculator, center: float, span: float) -> tuple[float, float]:
    """Parabola E(a) through the 5 lowest of 9 points in center (1 ± span): (a_min, B = V E''(V))."""
    scan = center * np.linspace(1.0 - span, 1.0 + span, 9)
    e = np.array([_energy_per_atom(_unit_cell(element, lattice, x), calc) for x in scan])
    k = int(np.clip(np.argmin(e), 2, len(scan) - 3))
    c2, c1, _ = np.polyfit(scan[k - 2:k + 3], e[k - 2:k + 3], 2)
    a = float(-c1 / (2 * c2)) if c2 > 0 else float(scan[int(np.argmin(e))])
    if not (math.isfinite(a) and a > 0 and c2 > 0):
        raise MlipopsError(f"the calculator's energy of {element} {lattice} has no minimum near a = {center:.3f} Å "
                           f"(curvature {c2:.3g} eV/Å²)", field="melting.a")
    cell = _unit_cell(element, lattice, a)
    kappa = cell.get_volume() / len(cell) / a**3  # V_atom = kappa a^3
    bulk_modulus = float(2 * c2 / (9 * kappa * a))
    return a, bulk_modulus


def _unit_cell(element: str, lattice: str, a: float) -> Atoms:
    """The conventional cell of :func:`mlipops.crystal.unit_cell` (hcp: ideal c/a, orthorhombic)."""
    return unit_cell(Crystal(element, lattice, float(a)))


def _energy_per_atom(atoms: Atoms, calc: Calculator) -> float:
    atoms.calc = calc
    return float(atoms.get_potential_energy()) / len(atoms)


def _maxwell_boltzmann(masses: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """Momenta [n, 3] (ASE units) drawn at ``temperature`` (K)."""
    return rng.standard_normal((len(masses), 3)) * np.sqrt(masses * units.kB * temperature)[:, None]


def build_coexistence_cell(s: CoexistenceSettings, calc: Calculator, rng: np.random.Generator) -> Atoms:
    """The two-phase cell: solid (lower half of z, ``info['solid_mask']``) | melted liquid, velocities set."""
    s.validate()
    t_solid, t_liquid, t_melt = s.temperatures()
    a0, bulk_modulus = lattice_constant(s.element, s.lattice, calc, s.a)
    a_t = a0 * (1.0 + s.expansion_guess)
    atoms = bulk_cell(Crystal(s.element, s.lattice, a_t), s.supercell)
    nz = s.supercell[2]
    lz = atoms.cell[2, 2]
    z_split = lz * (nz // 2) / nz
    z = atoms.positions[:, 2]
    solid = z < z_split - 1e-6
    stretch = 1.0 + s.liquid_volume_change  # along z only: the liquid half's volume changes by this factor
    atoms.positions[~solid, 2] = z_split + (z[~solid] - z_split) * stretch
    cell = atoms.cell.array.copy()
    cell[2] *= (z_split + (lz - z_split) * stretch) / lz
    atoms.set_cell(cell, scale_atoms=False)
    atoms.calc = calc
    atoms.set_constraint(FixAtoms(mask=solid))
    p = np.zeros((len(atoms), 3))
    p[~solid] = _maxwell_boltzmann(atoms.get_masses()[~solid], t_melt, rng)
    atoms.set_momenta(p)
    melt_log = _melt_until_molten(atoms, s, solid, z_split, t_melt, t_liquid, rng)
    atoms.set_constraint()
    p = atoms.get_momenta()
    p[solid] = _maxwell_boltzmann(atoms.get_masses()[solid], 2.0 * t_solid, rng)  # equipartition: half -> PE
    p -= atoms.get_masses()[:, None] * (p.sum(axis=0) / atoms.get_masses().sum())  # no centre-of-mass drift
    atoms.set_momenta(p)
    atoms.info.update(solid_mask=solid, a0=a0, bulk_modulus=bulk_modulus, t_solid=t_solid, t_liquid=t_liquid,
                      melt=melt_log)
    return atoms


def liquid_middle_solid_fraction(atoms: Atoms, solid: np.ndarray, z_split: float, s: CoexistenceSettings) -> float:
    """Share of the atoms in the middle of the liquid half (farther than a quarter of its length from both
    interfaces: those next to the crystal average q̄ over crystal neighbours) that read solid-like."""
    l, n_nb = s.order()
    q = order_parameter(atoms, l, n_nb)
    z = atoms.positions[:, 2] % atoms.cell[2, 2]
    w = atoms.cell[2, 2] - z_split
    middle = ~solid & (z > z_split + 0.25 * w) & (z < z_split + 0.75 * w)
    return float(np.mean(q[middle] > s.q6_solid_threshold)) if middle.any() else 0.0


def _melt_until_molten(atoms: Atoms, s: CoexistenceSettings, solid: np.ndarray, z_split: float, t_melt: float,
                       t_end: float, rng: np.random.Generator) -> list[dict]:
    """:func:`_melt` the liquid half, checking it at the end of the hot phase (:func:`liquid_middle_solid_fraction`
    at most :data:`MELT_MAX_SOLID`; needs the threshold) and repeating the hot phase :data:`MELT_HOTTER` times
    hotter while it has not melted, up to :data:`MELT_PASSES` passes (a superheated crystal melts slowly: how
    fast at 2.5 t_guess depends on the element and the time step), then cooling it to ``t_end``. Returns one
    entry per pass; MlipopsError when the last pass still has not melted it."""
    log, t = [], t_melt
    while True:
        _melt(atoms, s, t, None, rng)
        if s.q6_solid_threshold is None:
            break
        f = liquid_middle_solid_fraction(atoms, solid, z_split, s)
        log.append({"t_melt_K": float(t), "middle_solid_fraction": f})
        if f <= MELT_MAX_SOLID:
            break
        if len(log) == MELT_PASSES:
            raise MlipopsError(f"the liquid half did not melt: {f:.0%} of its middle still solid-like after "
                               f"{MELT_PASSES} passes of {(2 * s.melt_steps) // 3} steps up to {t:.0f} K (raise "
                               "t_melt or melt_steps)", field="melting.t_melt")
        t *= MELT_HOTTER
    _melt(atoms, s, None, t_end, rng)
    return log


def order_parameter(atoms: Atoms, l: int = 6, num_neighbors: int = 12) -> np.ndarray:
    """Lechner–Dellago averaged q̄_l per atom [n]: freud ``Steinhardt(l, average=True)`` over the
    ``num_neighbors`` nearest neighbours (an ``AABBQuery`` on a freud box built from the ASE cell's lengths and
    angles, so any cell shape works). The average runs over the atom and its neighbours; for odd l it cancels
    part of the order of a crystal with inversion between neighbouring sites (diamond: q̄₃ = 3/5 q₃)."""
    import freud

    lengths_angles = atoms.cell.cellpar()
    box = freud.box.Box.from_box_lengths_and_angles(*lengths_angles[:3], *np.radians(lengths_angles[3:]))
    points = box.wrap(atoms.get_scaled_positions(wrap=True) @ box.to_matrix().T)  # same frame as freud's box
    ql = freud.order.Steinhardt(l=int(l), average=True)
    ql.compute(freud.locality.AABBQuery(box, points), neighbors={"num_neighbors": int(num_neighbors),
                                                                 "exclude_ii": True})
    return np.asarray(ql.particle_order, dtype=float)


def solid_fraction(atoms: Atoms, threshold: float, l: int = 6, num_neighbors: int = 12) -> tuple[float, np.ndarray]:
    """(fraction of atoms with averaged q̄_l > threshold, q̄_l per atom [n]); :func:`order_parameter`."""
    q = order_parameter(atoms, l, num_neighbors)
    return float(np.mean(q > threshold)), q


def stress_with_forces(calc: Calculator) -> Calculator:
    """``calc``, made to compute the stress with every calculation of a periodic cell (when it can).

    A Berendsen barostat asks for the stress at the positions of the last force call; ASE's calculators answer a
    forces-only call without it, so each such request was a second full calculation (EMT, ``MlipopsCalculator``:
    the stress comes out of the same pass for a small extra cost)."""
    if "stress" not in getattr(calc, "implemented_properties", ()) or getattr(calc, "_stress_with_forces", False):
        return calc
    inner = calc.calculate

    def calculate(atoms=None, properties=("energy",), system_changes=all_changes):
        a = atoms if atoms is not None else calc.atoms
        if a is not None and a.pbc.all() and "stress" not in properties:
            properties = [*properties, "stress"]
        return inner(atoms, properties, system_changes)

    calc.calculate = calculate
    calc._stress_with_forces = True
    return calc


def sparse_berendsen(atoms: Atoms, timestep_fs: float, temperature_K: float, taut_fs: float, taup_fs: float,
                     bulk_modulus: float, every: int, mask: tuple[int, int, int] | None = None):
    """ASE's Berendsen NPT at P = 0 (``Inhomogeneous_NPTBerendsen`` with ``mask``, the isotropic ``NPTBerendsen``
    without) whose barostat acts every ``every`` steps with that many time steps: the same coupling (the cell
    relaxes with ``taup_fs``), a fraction of the cost. A cell change makes the next step evaluate the forces
    twice (ASE rescales the cell before the first half-kick and recomputes the forces there; EMT and Lennard-Jones
    rebuild their neighbour lists too): a barostat on every step made each step 3-4 times dearer (EMT Cu,
    512 atoms: 0.29 against 0.09 s per step). With ``taut_fs`` of 10¹² fs the thermostat is off (NPH)."""
    from ase.md.nptberendsen import Inhomogeneous_NPTBerendsen, NPTBerendsen

    class Sparse(Inhomogeneous_NPTBerendsen if mask is not None else NPTBerendsen):
        count = 0

        def scale_positions_and_cell(self):
            self.count += 1
            if self.count % every == 0:
                dt, self.dt = self.dt, self.dt * every
                try:
                    super().scale_positions_and_cell()
                finally:
                    self.dt = dt

    kw = {"mask": mask} if mask is not None else {}
    return Sparse(atoms, timestep_fs * units.fs, temperature_K=temperature_K, taut=taut_fs * units.fs,
                  pressure_au=0.0, taup=taup_fs * units.fs, compressibility_au=1.0 / bulk_modulus, **kw)


def _melt(atoms: Atoms, s: CoexistenceSettings, t_melt: float | None, t_end: float | None,
          rng: np.random.Generator) -> None:
    """The melting protocol of the liquid half (module doc, item 2): Langevin (100 fs friction) at ``t_melt`` for
    2/3 of ``melt_steps``, then at ``t_end`` for the rest (a None temperature skips its phase); momenta start
    from Maxwell–Boltzmann at ``t_melt`` for the atoms that are not fixed."""
    from ase.md.langevin import Langevin

    n_hot = (2 * s.melt_steps) // 3
    for temp, steps in ((t_melt, n_hot), (t_end, s.melt_steps - n_hot)):
        if steps > 0 and temp is not None:
            Langevin(atoms, s.timestep_fs * units.fs, temperature_K=temp, friction=0.01 / units.fs, fixcm=False,
                     rng=rng).run(steps)


def liquid_ordering(samples: list[np.ndarray], solid_mean: float, solid_like: float) -> dict:
    """Is a pure liquid's q̄ (one array per sample, equally spaced) crystallising? Yes when more than
    :data:`RECRYSTALLISED` of its atoms in one sample lie above ``solid_like`` (μ_s − 3σ_s), or when its mean
    rises over the samples both significantly (the drift of :func:`window_stats`, more than 3 times its error)
    and materially (more than :data:`LIQUID_RISE` of the way from its start to ``solid_mean``). A liquid's is
    stationary (EMT Cu 0.15 ± 0.01 over 1 ps); LJ argon's 108 atoms at 85 K rose 0.27 → 0.33 in 2 ps."""
    means = np.array([float(x.mean()) for x in samples])
    fraction = max(float(np.mean(x > solid_like)) for x in samples)
    w = window_stats(np.arange(len(means), dtype=float), means)
    gap = max(solid_mean - float(means[: max(1, len(means) // 3)].mean()), 1e-9)
    rising = w["drift_K"] > 3.0 * w["drift_se_K"] and w["drift_K"] > LIQUID_RISE * gap
    return {"solid_like_fraction": fraction, "rise": w["drift_K"], "rise_se": w["drift_se_K"], "gap": gap,
            "crystallising": bool(fraction > RECRYSTALLISED or rising)}


def calibrate_order(calc_factory: Callable[[], Calculator], s: CoexistenceSettings, rng: np.random.Generator,
                    on_steps: Callable[[int], None] | None = None) -> dict:
    """The solid-like threshold of q̄_l from the calculator's own pure solid and pure liquid at ``t_guess``.

    Each phase is the coexistence cell's solid half (``nx × ny × nz//2`` cells) as a periodic bulk at the start
    lattice a₀(1 + ``expansion_guess``), NVT (Langevin, 100 fs friction) at ``t_guess``: the solid from
    Maxwell–Boltzmann at 2 t_guess for ``calibration_steps``; the liquid at (1 + ``liquid_volume_change``) times
    that volume, melted as the coexistence cell's liquid (:func:`_melt`, ending at t_guess), then
    ``calibration_steps``. q̄_l of every atom over the second half of each run (every ``sample_interval`` steps)
    gives mean μ and standard deviation σ per phase; the threshold is the point equally many σ from both means,
    θ = (μ_l σ_s + μ_s σ_l)/(σ_s + σ_l) (the midpoint when σ_s = σ_l), and ``separation`` = (μ_s − μ_l)/(σ_s +
    σ_l) is that number of σ. Below 1 (a sixth of each phase misread) the order parameter cannot tell the
    model's phases apart at t_guess (a solid that melted: t_guess far above the model's Tm): MlipopsError.
    A liquid that begins to crystallise (more than :data:`RECRYSTALLISED` of its atoms in one sample above
    μ_s − 3σ_s, or its mean q̄ rising: :func:`liquid_ordering`; LJ argon's 108-atom box at 85 K within 2 ps)
    is melted again :data:`MELT_HOTTER` times hotter and sampled at ``t_liquid`` (1.2 t_guess), the coexistence
    cell's liquid start, then once more at 1.4 t_guess; ``liquid.recrystallised`` records where it did; one that
    crystallises at all three is a MlipopsError (give ``q6_solid_threshold``)."""
    from ase.md.langevin import Langevin

    l, n_nb = s.order()
    calc = calc_factory()
    a0, _ = lattice_constant(s.element, s.lattice, calc, s.a)
    t = s.t_guess
    _, t_retry, t_melt = s.temperatures()
    reps = (s.supercell[0], s.supercell[1], max(1, s.supercell[2] // 2))
    dt = s.timestep_fs * units.fs
    done = [0]
    out: dict = {"l": l, "neighbors": n_nb, "temperature_K": t}

    def sample(phase: str, temp: float, t_melt: float = t_melt) -> tuple[list[np.ndarray], dict]:
        atoms = bulk_cell(Crystal(s.element, s.lattice, a0 * (1.0 + s.expansion_guess)), reps)
        atoms.calc = calc
        if phase == "liquid":
            atoms.set_cell(atoms.cell * (1.0 + s.liquid_volume_change) ** (1.0 / 3.0), scale_atoms=True)
            atoms.set_momenta(_maxwell_boltzmann(atoms.get_masses(), t_melt, rng))
            _melt(atoms, s, t_melt, temp, rng)
            done[0] += s.melt_steps
        else:
            atoms.set_momenta(_maxwell_boltzmann(atoms.get_masses(), 2.0 * temp, rng))
        dyn = Langevin(atoms, dt, temperature_K=temp, friction=0.01 / units.fs, fixcm=False, rng=rng)
        k = s.sample_interval
        q = []
        for i in range(s.calibration_steps // k):
            dyn.run(k)
            done[0] += k
            if on_steps is not None:
                on_steps(done[0])
            if (i + 1) * k > s.calibration_steps // 2:
                q.append(order_parameter(atoms, l, n_nb))
        if not all(np.all(np.isfinite(x)) for x in q) or not np.all(np.isfinite(atoms.positions)):
            raise MlipopsError(f"the pure {phase} at {temp:.0f} K blew up (non-finite positions)",
                               field="melting.t_guess")
        return q, {"n_atoms": len(atoms), "temperature_K": float(atoms.get_temperature())}

    samples, info = sample("solid", t)
    q = np.concatenate(samples)
    out["solid"] = {"mean": float(q.mean()), "std": float(q.std())} | info
    solid_like = out["solid"]["mean"] - 3.0 * out["solid"]["std"]
    recrystallised = []
    temps = (t, t_retry, 2.0 * t_retry - t)  # t_guess, t_liquid, then as far again above it
    for i, temp in enumerate(temps):  # a small liquid box commensurate with the crystal, below the model's Tm,
        hot = t_melt * MELT_HOTTER**i  # crystallises; one melted too cool never was a liquid (LJ argon)
        samples, info = sample("liquid", temp, hot)
        q = np.concatenate(samples)
        if (out["solid"]["mean"] - q.mean()) < out["solid"]["std"] + q.std():
            break  # no solid to crystallise into: the two do not separate (raised below)
        check = liquid_ordering(samples, out["solid"]["mean"], solid_like)
        if not check["crystallising"]:
            break
        recrystallised.append({"temperature_K": float(temp), "t_melt_K": float(hot)} | check)
    else:
        raise MlipopsError(f"the calculator's pure liquid crystallised at {', '.join(f'{x:.0f}' for x in temps)} K "
                           f"(at the last: {check['solid_like_fraction']:.0%} of its atoms solid-like, its mean "
                           f"q̄ rose {check['rise']:.3f}): give q6_solid_threshold", field="melting.q6_solid_threshold")
    out["liquid"] = {"mean": float(q.mean()), "std": float(q.std())} | info | {"recrystallised": recrystallised}
    ms, ss = out["solid"]["mean"], out["solid"]["std"]
    ml, sl = out["liquid"]["mean"], out["liquid"]["std"]
    width = max(ss + sl, 1e-9)
    out["threshold"] = float((ml * ss + ms * sl) / width)
    out["separation"] = float((ms - ml) / width)
    if out["separation"] < 1.0:
        raise MlipopsError(f"q̄{l} ({n_nb} neighbours) does not separate the calculator's solid ({ms:.3f} ± {ss:.3f}) "
                           f"from its liquid ({ml:.3f} ± {sl:.3f}) at t_guess = {t:.0f} K (separation "
                           f"{out['separation']:.2f} sd < 1): is t_guess near this model's Tm? Or give "
                           "q6_solid_threshold", field="melting.t_guess")
    return out


def block_stderr(x: np.ndarray) -> tuple[float, float]:
    """(standard error of mean(x), integrated autocorrelation time in samples) by block averaging."""
    err, tau, _ = _blocks(x)
    return err, tau


def _blocks(x: np.ndarray) -> tuple[float, float, int]:
    """:func:`block_stderr` and the number of blocks it used."""
    x = np.asarray(x, dtype=float)
    n = len(x)
    d = x - x.mean()
    if n < 4 or not np.any(d):
        return 0.0, 1.0, 4
    acf = np.correlate(d, d, mode="full")[n - 1:] / (d @ d)
    tau = 1.0
    for k in range(1, n // 2):  # initial positive sequence: stop at the first non-positive value
        if acf[k] <= 0:
            break
        tau += 2.0 * acf[k]
    n_blocks = max(4, min(n // max(1, math.ceil(2 * tau)), 5))  # few, long blocks: see module doc, item 5
    means = np.array([b.mean() for b in np.array_split(x, n_blocks)])
    return float(means.std(ddof=1) / math.sqrt(n_blocks)), float(tau), n_blocks


def window_stats(times_fs: np.ndarray, temps: np.ndarray, drift_sigma: float = 2.0) -> dict:
    """Tm and its convergence from the late window's temperatures (module doc, item 4).

    ``tm`` = mean, ``tm_stderr`` its block error (:func:`block_stderr`); ``drift_K`` = least-squares slope ×
    window length; ``drift_se_K`` = its standard error from a line through block means: blocks of at least 2τ
    samples (τ of the residual about the line: a trend left in would look like correlation), 4 to 10 of them,
    se² = Σ residual² / (n − 2) / Σ (t_b − t̄)², times the length. ``converged``: |drift_K| ≤ drift_sigma ·
    drift_se_K. (A test of the drift against tm_stderr itself, |drift| < tm_stderr, would pass a stationary
    series only P(|N(0, 3.5)| < 1) ≈ 23 % of the time, since se(drift) ≈ sqrt(12) tm_stderr: no window length
    helps, both shrink alike.)"""
    t, x = np.asarray(times_fs, dtype=float), np.asarray(temps, dtype=float)
    err, _, _ = _blocks(x)
    length = float(t[-1] - t[0]) if len(t) > 1 else 0.0
    fit = np.polyfit(t, x, 1) if len(t) > 1 and length > 0 else np.array([0.0, float(x.mean())])
    drift = float(fit[0]) * length
    _, tau, _ = _blocks(x - np.polyval(fit, t))
    n = max(4, min(len(x) // max(1, math.ceil(2 * tau)), 10))
    if len(x) >= 2 * n and length > 0:
        tb = np.array([b.mean() for b in np.array_split(t, n)])
        xb = np.array([b.mean() for b in np.array_split(x, n)])
        c = np.polyfit(tb, xb, 1)
        res = xb - np.polyval(c, tb)
        drift_se = float(math.sqrt(np.sum(res**2) / (n - 2) / np.sum((tb - tb.mean())**2))) * length
    else:
        drift_se = 0.0
    return {"tm": float(x.mean()), "tm_stderr": err, "drift_K": drift, "drift_se_K": drift_se,
            "converged": bool(abs(drift) <= drift_sigma * drift_se), "window_start_fs": float(t[0]),
            "window_end_fs": float(t[-1])}


# 1 GPa in eV/Å³: dTm/dP = Tm ΔV / L with ΔV in Å³/atom and L in eV/atom gives K per (eV/Å³)
EV_PER_A3_PER_GPA = 1.0 / 160.21766208


def clausius_clapeyron(tm: float, delta_v_A3: float, latent_eV: float, pressure_GPa: float) -> dict:
    """The shift of a melting point measured at ``pressure_GPa`` to P = 0 (module doc, item 4).

    dTm/dP = Tm ΔV / L (Clausius–Clapeyron; ΔV = V_liquid − V_solid per atom in Å³, L the latent heat per atom
    in eV, 1 GPa = 1/160.218 eV/Å³), so Tm(0) = Tm(P) − dTm/dP · P: ``dtm_dp_K_per_GPa`` and
    ``correction_K`` = −dTm/dP · P (add it to the measured Tm). EMT Cu: 1300 K × 1.2 Å³ / 0.13 eV = 75 K/GPa."""
    if not (latent_eV and math.isfinite(latent_eV) and latent_eV > 0 and math.isfinite(delta_v_A3)
            and math.isfinite(pressure_GPa)):
        return {"dtm_dp_K_per_GPa": None, "correction_K": None, "pressure_GPa": pressure_GPa}
    slope = tm * delta_v_A3 / latent_eV * EV_PER_A3_PER_GPA
    return {"dtm_dp_K_per_GPa": float(slope), "correction_K": float(-slope * pressure_GPa),
            "pressure_GPa": float(pressure_GPa)}


def next_attempt(final_fraction: float, t_solid: float, t_liquid: float, step: float, last_direction: int,
                 min_phase_fraction: float) -> tuple[str | None, float, float, float, int]:
    """The rejection rule: (reason or None, next t_solid, next t_liquid, next step, direction).

    Fully melted (solid fraction < f_min): too much energy, both start temperatures go down by ``step``;
    fully crystallised (> 1 − f_min): up. The step halves when the direction flips (bisection)."""
    if final_fraction < min_phase_fraction:
        reason, direction = f"fully melted (solid fraction {final_fraction:.2f} < {min_phase_fraction})", -1
    elif final_fraction > 1.0 - min_phase_fraction:
        reason, direction = (f"fully crystallised (solid fraction {final_fraction:.2f} > "
                             f"{1.0 - min_phase_fraction:.2f})"), +1
    else:
        return None, t_solid, t_liquid, step, 0
    if last_direction and direction != last_direction:
        step *= 0.5
    return reason, t_solid + direction * step, t_liquid + direction * step, step, direction


def _one_attempt(calc_factory, s: CoexistenceSettings, rng: np.random.Generator, on_steps=None) -> dict:
    """Build, equilibrate (NPH), produce; production is extended by :meth:`~CoexistenceSettings.production_chunk`
    while the late window has not converged (and both phases remain), up to ``production_limit()`` steps."""
    from ase.md.verlet import VelocityVerlet

    atoms = build_coexistence_cell(s, stress_with_forces(calc_factory()), rng)
    dt = s.timestep_fs * units.fs

    def nph(mask=(1, 1, 1)):  # thermostat off; the barostat acts once per sample (sparse_berendsen)
        return sparse_berendsen(atoms, s.timestep_fs, s.t_guess, 1e12, s.taup_fs, atoms.info["bulk_modulus"],
                                s.sample_interval, mask)

    temps, times, fracs, press, pzz, etot, vols = [], [], [], [], [], [], []
    l, n_nb = s.order()
    volume_start = atoms.get_volume() / len(atoms)

    def record(t_fs: float, production: bool):
        temps.append(atoms.get_temperature())
        times.append(t_fs)
        fracs.append(solid_fraction(atoms, s.q6_solid_threshold, l, n_nb)[0])
        if production:
            sigma = atoms.get_stress(voigt=False, include_ideal_gas=True) / units.GPa
            press.append(-np.trace(sigma) / 3)
            pzz.append(-sigma[2, 2])  # z: the interfaces' normal
            etot.append(atoms.get_total_energy() / len(atoms))  # NVE: E; NPH at P = 0: H = E + PV = E
            vols.append(atoms.get_volume() / len(atoms))

    record(0.0, False)
    k = s.sample_interval
    n_eq = s.equilibration_steps // k
    dyn = nph()
    for i in range(n_eq):
        dyn.run(k)
        record((i + 1) * k * s.timestep_fs, False)
        if on_steps is not None:
            on_steps((i + 1) * k, 0)
    # production: NVE, or NPH with the barostat on z only (the solid's lateral lattice stays as equilibrated)
    dyn = nph((0, 0, 1)) if s.ensemble == "nph" else VelocityVerlet(atoms, dt)
    done, target = 0, s.production_steps
    while True:
        while done < target:
            dyn.run(k)
            done += k
            record((n_eq + done // k) * k * s.timestep_fs, True)
            if on_steps is not None:
                on_steps(n_eq * k + done, done - s.production_steps)
        t_arr, f_arr = np.array(temps), np.array(fracs)
        n_prod = done // k
        n_win = max(4, int(round(s.window_fraction * n_prod)))
        if np.all(np.isfinite(t_arr)):
            win = window_stats(np.array(times[-n_win:]), t_arr[-n_win:], s.drift_sigma)
        else:  # the MD blew up: rejected by the caller
            win = {"tm": float("nan"), "tm_stderr": float("nan"), "drift_K": float("nan"),
                   "drift_se_K": float("nan"), "converged": False, "window_start_fs": float("nan"),
                   "window_end_fs": float("nan")}
        final = float(f_arr[-max(1, n_prod // 10):].mean())
        both = s.min_phase_fraction <= final <= 1.0 - s.min_phase_fraction
        if win["converged"] or not both or not np.all(np.isfinite(t_arr)) or target >= s.production_limit():
            break
        target = min(target + s.production_chunk(), s.production_limit())
    prod_t = np.array(times[n_eq + 1:])
    drift = (float(np.polyfit(prod_t / 1000.0, etot, 1)[0]) * 1000.0 if np.all(np.isfinite(etot))
             else float("nan"))  # meV/atom/ps of the conserved E (NVE) or H
    pzz_w = np.array(pzz[-n_win:])
    return dict(temperatures=t_arr, times_fs=np.array(times), solid_fraction=f_arr, tm=win["tm"],
                tm_stderr=win["tm_stderr"], converged=win["converged"], drift_K=win["drift_K"],
                drift_se_K=win["drift_se_K"], window_start_fs=win["window_start_fs"],
                window_end_fs=win["window_end_fs"], tm_full_production=float(t_arr[n_eq + 1:].mean()),
                final_solid_fraction=final, drift_meV_per_atom_ps=drift,
                pressure_GPa=float(np.mean(press[-n_win:])), pressure_zz_GPa=float(pzz_w.mean()),
                pressure_zz_stderr=block_stderr(pzz_w)[0], volume_start=volume_start,
                volume_per_atom=float(np.mean(vols[-n_win:])), production_start_fs=n_eq * k * s.timestep_fs,
                production_steps_run=done, n_atoms=len(atoms), melt=atoms.info["melt"])


def start_temperatures(s: CoexistenceSettings, start: int) -> tuple[float, float]:
    """(t_solid, t_liquid) of a start above (+1), below (−1) or at (0) the guess: both shifted by
    start · ``start_offset`` · t_guess (module doc, item 6)."""
    t_solid, t_liquid, _ = s.temperatures()
    d = start * s.start_offset * s.t_guess
    return t_solid + d, t_liquid + d


def run_coexistence(calc_factory: Callable[[], Calculator], s: CoexistenceSettings, seed: int,
                    on_steps: Callable[[int, int], None] | None = None, start: int = 0) -> CoexistenceRun:
    """One coexistence run for ``seed`` from the ``start`` (+1 above, −1 below, 0 at the guess:
    :func:`start_temperatures`), rerun (new seed stream, shifted temperatures) while it does not coexist; a run
    whose late window does not converge within ``production_limit()`` steps is rejected (no rerun: another start
    does not make a slow relaxation faster). Without a given ``q6_solid_threshold`` the run first calibrates it
    (:func:`calibrate_order`, own random stream per seed, so both starts of a seed share it; a failed
    calibration is a rejected run with its reason). ``on_steps(done, expected)`` (progress): every
    ``sample_interval`` steps, the calibration + equilibration + production MD steps done in this run and those
    expected so far (one attempt's; a rerun or an extension adds its steps)."""
    s.validate()
    t0 = time.perf_counter()
    t_solid, t_liquid = start_temperatures(s, start)
    step, direction, history = s.retry_step(), 0, []
    cal = s.calibration_md_steps()
    per = s.equilibration_steps + s.production_steps  # MD steps of one attempt (progress)
    calibration, threshold = None, s.q6_solid_threshold
    if s.calibrating():
        try:
            calibration = calibrate_order(calc_factory, s, np.random.default_rng([seed, 0]),
                                          on_steps and (lambda n: on_steps(n, cal + per)))
        except MlipopsError as exc:
            run = failed_run(seed, f"order parameter calibration: {exc.detail}", time.perf_counter() - t0)
            run.start = start
            return run
        threshold = calibration["threshold"]
    base = cal
    for attempt in range(1, s.max_retries + 2):
        rng = np.random.default_rng([seed, attempt] if start == 0 else [seed, attempt, start + 2])
        trial = CoexistenceSettings(**{**s.__dict__, "t_solid": t_solid, "t_liquid": t_liquid, "seed": seed,
                                       "q6_solid_threshold": threshold})
        try:
            out = _one_attempt(calc_factory, trial, rng, on_steps and (
                lambda n, extra, b=base: on_steps(b + n, b + per + max(0, extra))))
        except MlipopsError as exc:  # the liquid half would not melt (_melt_until_molten)
            run = failed_run(seed, exc.detail, time.perf_counter() - t0)
            run.start, run.attempts, run.order_calibration, run.order_threshold = start, attempt, calibration, threshold
            run.history = history + [{"attempt": attempt, "t_start_solid": t_solid, "t_start_liquid": t_liquid,
                                      "rejected_reason": exc.detail}]
            return run
        base += s.equilibration_steps + out["production_steps_run"]
        entry = {"attempt": attempt, "t_start_solid": t_solid, "t_start_liquid": t_liquid, "tm": out["tm"],
                 "tm_stderr": out["tm_stderr"], "converged": out["converged"], "drift_K": out["drift_K"],
                 "production_steps": out["production_steps_run"],
                 "final_solid_fraction": out["final_solid_fraction"], "melt": out.pop("melt")}
        if not (np.all(np.isfinite(out["temperatures"])) and math.isfinite(out["tm"])):
            reason = "MD unstable: non-finite temperature (the calculator's forces blew up)"
            history.append(entry | {"tm": None, "final_solid_fraction": None, "rejected_reason": reason})
            break  # another start temperature does not make a broken potential stable
        reason, ts_next, tl_next, step, direction = next_attempt(
            out["final_solid_fraction"], t_solid, t_liquid, step, direction, s.min_phase_fraction)
        if reason is None and not out["converged"]:
            reason = (f"not converged: T drifted {out['drift_K']:+.1f} K over the late window "
                      f"({out['window_start_fs'] / 1000:.1f}-{out['window_end_fs'] / 1000:.1f} ps), more than "
                      f"{s.drift_sigma:g} x its error {out['drift_se_K']:.1f} K, after "
                      f"{out['production_steps_run']} production steps (max_production_steps)")
            history.append(entry | {"rejected_reason": reason})
            break
        history.append(entry | {"rejected_reason": reason})
        if reason is None or attempt == s.max_retries + 1:
            break
        t_solid, t_liquid = ts_next, tl_next
    coexisting = reason is None or reason.startswith("not converged")
    return CoexistenceRun(seed=seed, start=start, t_start_liquid=t_liquid, t_start_solid=t_solid,
                          coexisting=coexisting, rejected_reason=reason, attempts=attempt,
                          wall_s=time.perf_counter() - t0, history=history, order_threshold=float(threshold),
                          order_calibration=calibration, **out)


STARTS = (1, -1)  # every seed runs once above and once below the guess (module doc, item 6)


def melting_point(calc_factory: Callable[[], Calculator], s: CoexistenceSettings, seeds: Sequence[int],
                  starts: Sequence[int] = STARTS) -> dict:
    """Independent runs, one per seed and start (one after another); statistics over the accepted seeds
    (:func:`summarize`, module doc, items 6-7)."""
    from mlipops.report import progress

    runs = []
    with progress(f"coexistence runs ({s.element})", len(seeds) * len(starts)) as advance:
        for seed in seeds:
            for start in starts:
                runs.append(run_coexistence(calc_factory, s, int(seed), start=start))
                advance()
    return summarize(runs, agree_sigma=s.agree_sigma, require_agreement=s.require_agreement)


def run_tm(r: CoexistenceRun, dtm_dp: float | None = None) -> tuple[float, float]:
    """(Tm, error) of one run: its late-window mean, or with ``dtm_dp`` (K/GPa) that mean shifted to P = 0 by
    Clausius–Clapeyron from the window's P_zz, Tm − dtm_dp · P_zz, with dtm_dp · se(P_zz) added in quadrature."""
    if dtm_dp is None or not math.isfinite(r.pressure_zz_GPa):
        return r.tm, r.tm_stderr
    pse = r.pressure_zz_stderr if math.isfinite(r.pressure_zz_stderr) else 0.0
    return r.tm - dtm_dp * r.pressure_zz_GPa, math.hypot(r.tm_stderr, dtm_dp * pse)


def seed_result(runs: Sequence[CoexistenceRun], agree_sigma: float = 2.0, dtm_dp: float | None = None,
                require_agreement: bool = True) -> dict:
    """One seed's Tm from its runs (module doc, item 6). Started above and below the guess: accepted only when
    both runs are accepted (coexisting, converged) and agree, |Tm_above − Tm_below| ≤ agree_sigma ·
    sqrt(e_above² + e_below²); Tm = their mean, error sqrt(e_above² + e_below²)/2. Without
    ``require_agreement`` (the quick preset, too short to converge) starts that disagree are kept as a bracket:
    Tm = their mean, error sqrt((e_above² + e_below²)/4 + (gap/2)²), ``bracketed`` True. A single run (start
    0): that run's. With ``dtm_dp`` every run's Tm is first shifted to P = 0 (:func:`run_tm`)."""
    seed = runs[0].seed
    vals = [run_tm(r, dtm_dp) for r in runs]
    out: dict = {"seed": seed, "starts": [r.start for r in runs], "tm_runs": [v[0] for v in vals],
                 "tm_stderr_runs": [v[1] for v in vals], "pressure_zz_runs": [r.pressure_zz_GPa for r in runs]}
    bad = [r for r in runs if not r.accepted]
    if bad:
        why = "; ".join(f"start {r.start:+d}: {r.rejected_reason}" if len(runs) > 1 else str(r.rejected_reason)
                        for r in bad)
        return out | {"tm": float("nan"), "tm_stderr": float("nan"), "accepted": False, "rejected_reason": why}
    tms, errs = np.array([v[0] for v in vals]), np.array([v[1] for v in vals])
    err = float(math.sqrt(np.sum(errs**2))) / len(runs)
    out |= {"tm": float(tms.mean()), "tm_stderr": err, "accepted": True, "rejected_reason": None}
    if len(runs) == 2:
        diff, comb = float(tms[0] - tms[1]), float(math.sqrt(np.sum(errs**2)))
        out |= {"difference_K": diff, "difference_se_K": comb}
        out["bracketed"] = bool(abs(diff) > agree_sigma * comb)
        if out["bracketed"] and not require_agreement:
            out |= {"tm_stderr": float(math.hypot(comb / 2, diff / 2)),
                    "note": f"the starts disagree by {abs(diff):.0f} K (> {agree_sigma:g} x {comb:.0f} K): Tm "
                            "bracketed between them, half the gap counted in its error"}
        elif out["bracketed"]:
            out |= {"tm": float("nan"), "tm_stderr": float("nan"), "accepted": False,
                    "rejected_reason": f"the starts disagree: Tm {tms[0]:.0f} ± {errs[0]:.0f} K (start "
                                       f"{runs[0].start:+d}) vs {tms[1]:.0f} ± {errs[1]:.0f} K (start "
                                       f"{runs[1].start:+d}): {abs(diff):.0f} K > {agree_sigma:g} x {comb:.0f} K"}
    return out


def summarize(runs: Sequence[CoexistenceRun], agree_sigma: float = 2.0, dtm_dp: float | None = None,
              require_agreement: bool = True) -> dict:
    """Statistics over the accepted seeds (see :func:`melting_point`): the runs are grouped by seed
    (:func:`seed_result`; with ``dtm_dp`` (K/GPa) each run's Tm shifted to P = 0 first),
    then tm_mean, tm_std (ddof 1) and tm_stderr = sqrt((tm_std² + mean err_k²)/n) over
    the n accepted seeds (NaN when none). ``n_accepted`` / ``n_rejected`` count seeds, ``gaussians``
    [(tm_k, err_k)] the accepted seeds, ``seeds`` every seed's result, ``runs`` every run (``summary()``)."""
    groups: dict[int, list[CoexistenceRun]] = {}
    for r in runs:
        groups.setdefault(r.seed, []).append(r)
    seeds = [seed_result(sorted(g, key=lambda r: -r.start), agree_sigma, dtm_dp, require_agreement)
             for g in groups.values()]
    ok = [sd for sd in seeds if sd["accepted"]]
    tms = np.array([sd["tm"] for sd in ok])
    errs = np.array([sd["tm_stderr"] for sd in ok])
    n = len(ok)
    std = float(tms.std(ddof=1)) if n > 1 else 0.0
    conv = [r for r in runs if r.converged is not None]
    return {"tm_mean": float(tms.mean()) if n else float("nan"), "tm_std": std if n else float("nan"),
            "tm_stderr": float(math.sqrt((std**2 + np.mean(errs**2)) / n)) if n else float("nan"),
            "n_accepted": n, "n_rejected": len(seeds) - n, "gaussians": [(sd["tm"], sd["tm_stderr"]) for sd in ok],
            "n_runs": len(runs), "n_runs_converged": sum(bool(r.converged) for r in conv),
            "pressure_zz_GPa": float(np.mean([r.pressure_zz_GPa for r in runs if r.accepted]))
            if any(r.accepted for r in runs) else float("nan"),
            "n_bracketed": sum(bool(sd.get("bracketed")) and sd["accepted"] for sd in seeds),
            "dtm_dp_K_per_GPa": dtm_dp, "seeds": seeds, "runs": list(runs)}


def failed_run(seed: int, reason: str, wall_s: float = 0.0) -> CoexistenceRun:
    """A run that could not be carried out (the calculator raised, the MD blew up): rejected with the reason."""
    empty = np.zeros(0)
    return CoexistenceRun(seed=seed, t_start_liquid=float("nan"), temperatures=empty, times_fs=empty,
                          solid_fraction=empty, tm=float("nan"), tm_stderr=float("nan"), coexisting=False,
                          rejected_reason=reason, attempts=1, wall_s=wall_s, n_atoms=0, converged=False,
                          history=[{"attempt": 1, "rejected_reason": reason}])


def prob_within(samples_or_gaussians, t_ref: float, window: float) -> float:
    """P(|Tm − t_ref| ≤ window) under the combined distribution of Tm.

    ``samples_or_gaussians``: a list of (mean, std) pairs — an equal-weight mixture of N(mean_k, std_k²), e.g.
    one pair per ensemble member (its tm_mean and tm_stderr) — giving exactly
    P = (1/K) Σ_k [Φ((t_ref + w − μ_k)/σ_k) − Φ((t_ref − w − μ_k)/σ_k)] (σ_k = 0: a point mass);
    or a flat sequence of samples, giving the fraction of samples inside the window."""
    from scipy.stats import norm

    x = np.asarray(samples_or_gaussians, dtype=float)
    if x.size == 0:
        return float("nan")
    if x.ndim == 1:
        return float(np.mean(np.abs(x - t_ref) <= window))
    if x.ndim != 2 or x.shape[1] != 2 or np.any(x[:, 1] < 0):
        raise ValueError("expected samples or a list of (mean, std>=0) pairs")
    mu, sd = x[:, 0], x[:, 1]
    lo, hi = t_ref - window, t_ref + window
    point = (mu >= lo) & (mu <= hi)
    safe = np.where(sd > 0, sd, 1.0)
    p = np.where(sd > 0, norm.cdf((hi - mu) / safe) - norm.cdf((lo - mu) / safe), point.astype(float))
    return float(p.mean())


def phase_properties(calc_factory: Callable[[], Calculator], s: CoexistenceSettings, temperature: float,
                     steps: int = 600, snapshots: int = 10, seed: int = 0,
                     supercell: tuple[int, int, int] | None = None, threshold: float | None = None,
                     on_steps: Callable[[int], None] | None = None) -> dict:
    """Pure solid and pure liquid at ``temperature`` (Tm): the latent heat, ΔS_m and labelled snapshots.

    Each phase: ``supercell`` (default nx x ny x nx of the coexistence cell's lateral size) conventional cells,
    NPT (ASE's isotropic ``NPTBerendsen``, P = 0, taut 100 fs, taup ``s.taup_fs``, the barostat acting once per
    sample: :func:`sparse_berendsen`) for ``steps``; the first half
    equilibrates, the second half gives the mean potential energy and volume per atom (sampled every
    ``s.sample_interval`` steps) and ``snapshots`` evenly spaced frames labelled by the same calculator (energy,
    forces, stress; ``config_type`` ``melting_solid`` / ``melting_liquid``, ``temperature_K``). The liquid is
    melted first exactly as the coexistence cell's liquid half (Langevin at ``t_melt``, then at ``temperature``).

    L = ⟨e_liquid⟩ − ⟨e_solid⟩ + P ΔV with P = 0 (equal temperatures: the kinetic energies cancel) and
    ΔS_m = L / T. A model whose liquid energy relative to the solid is off by δ per atom melts at
    Tm + δ / ΔS_m to first order (G_l − G_s = ΔH − TΔS vanishes at Tm). Each phase also reports the mean and
    standard deviation of q̄_l and its solid fraction over the sampled half (solid-like above ``threshold``, else
    ``s.q6_solid_threshold``, else the equal-σ point of these two phases, as :func:`calibrate_order`), so a
    liquid that froze or a solid that melted is visible. ``on_steps(done)``: MD steps done (progress), of
    2 (``steps`` + solid) + ``melt_steps``."""
    from ase.calculators.singlepoint import SinglePointCalculator

    s.validate()
    rng = np.random.default_rng([seed, 7])
    calc = stress_with_forces(calc_factory())
    a0, bulk_modulus = lattice_constant(s.element, s.lattice, calc, s.a)
    n = supercell or (s.supercell[0], s.supercell[1], s.supercell[0])
    _, _, t_melt = s.temperatures()
    half = steps // 2
    k = max(1, min(s.sample_interval, half))
    l, n_nb = s.order()
    out: dict = {"temperature_K": float(temperature), "supercell": list(n), "steps": int(steps), "a0": a0}
    frames: list[Atoms] = []
    order: dict[str, list[np.ndarray]] = {}
    done = 0
    for phase in ("solid", "liquid"):
        atoms = bulk_cell(Crystal(s.element, s.lattice, a0 * (1.0 + s.expansion_guess)), n)
        atoms.calc = calc
        if phase == "liquid":
            atoms.set_cell(atoms.cell * (1.0 + s.liquid_volume_change) ** (1.0 / 3.0), scale_atoms=True)
            atoms.set_momenta(_maxwell_boltzmann(atoms.get_masses(), t_melt, rng))
            _melt(atoms, s, t_melt, temperature, rng)
            done += s.melt_steps
        else:
            atoms.set_momenta(_maxwell_boltzmann(atoms.get_masses(), 2.0 * temperature, rng))
        dyn = sparse_berendsen(atoms, s.timestep_fs, temperature, 100.0, s.taup_fs, bulk_modulus, k)
        for i in range(0, half, max(k, 10)):
            dyn.run(min(max(k, 10), half - i))
            if on_steps is not None:
                on_steps(done + min(i + max(k, 10), half))
        done += half
        chunks = [min(k, steps - i) for i in range(half, steps, k)]
        take = set(np.linspace(0, len(chunks) - 1, min(snapshots, len(chunks))).round().astype(int).tolist())
        e, v, t, q = [], [], [], order.setdefault(phase, [])
        for j, m in enumerate(chunks):
            dyn.run(m)
            done += m
            if on_steps is not None:
                on_steps(done)
            e.append(atoms.get_potential_energy() / len(atoms))
            v.append(atoms.get_volume() / len(atoms))
            t.append(atoms.get_temperature())
            q.append(order_parameter(atoms, l, n_nb))
            if j in take:
                snap = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions.copy(), cell=atoms.cell.copy(),
                             pbc=True)
                snap.calc = SinglePointCalculator(snap, energy=float(atoms.get_potential_energy()),
                                                  forces=atoms.get_forces().copy(), stress=atoms.get_stress().copy())
                snap.info.update(config_type=f"melting_{phase}", temperature_K=float(t[-1]))
                frames.append(snap)
        if not np.all(np.isfinite(e)):
            raise MlipopsError(f"the {phase} NPT run at {temperature:.0f} K gave non-finite energies",
                               field="melting.phase_steps")
        out[phase] = {"energy_per_atom": float(np.mean(e)), "energy_stderr": block_stderr(np.array(e))[0],
                      "volume_per_atom": float(np.mean(v)), "temperature": float(np.mean(t)), "n_atoms": len(atoms)}
    qs, ql = np.concatenate(order["solid"]), np.concatenate(order["liquid"])
    if threshold is None:
        threshold = s.q6_solid_threshold
    if threshold is None:
        threshold = float((ql.mean() * qs.std() + qs.mean() * ql.std()) / max(qs.std() + ql.std(), 1e-9))
    out["order_parameter"] = {"l": l, "neighbors": n_nb, "threshold": float(threshold)}
    for phase, q in (("solid", qs), ("liquid", ql)):
        out[phase] |= {"order_mean": float(q.mean()), "order_std": float(q.std()),
                       "solid_fraction": float(np.mean(q > threshold))}
    latent = out["liquid"]["energy_per_atom"] - out["solid"]["energy_per_atom"]
    out |= {"latent_heat_eV_per_atom": float(latent), "delta_s_eV_per_atom_K": float(latent / temperature),
            "delta_s_kB": float(latent / temperature / units.kB),
            "delta_v_A3_per_atom": out["liquid"]["volume_per_atom"] - out["solid"]["volume_per_atom"],
            "frames": frames}
    return out


def plot_traces(runs: Sequence[CoexistenceRun], path: str | Path, title: str = "",
                labels: Sequence[str] | None = None, colors: Sequence[str] | None = None,
                empty_note: str = "no run") -> Path:
    """Temperature and solid fraction vs time, one colour per run (or ``colors``), production shaded, Tm dashed
    (PNG). ``labels`` name the runs (default: their seeds); runs without a trace (failed) are left out; with no
    trace at all the figure says ``empty_note``."""
    from mlipops.report import pyplot, save_figure

    plt = pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    shaded = False
    for i, r in enumerate(runs):
        if len(r.times_fs) == 0:
            continue
        c = colors[i] if colors is not None else f"C{i % 10}"
        t_ps = np.asarray(r.times_fs) / 1000.0
        name = labels[i] if labels is not None else f"seed {r.seed}"
        if r.start:
            name += " above" if r.start > 0 else " below"
        label = f"{name}: Tm = {r.tm:.0f} ± {r.tm_stderr:.0f} K" + ("" if r.accepted else " (rejected)")
        ax.plot(t_ps, r.temperatures, color=c, lw=0.8, label=label, ls="-" if r.accepted else ":")
        if math.isfinite(r.window_start_fs):  # Tm over the late window it was read from
            ax.hlines(r.tm, r.window_start_fs / 1000.0, r.window_end_fs / 1000.0, color=c, ls="--", lw=1.2)
        else:
            ax.axhline(r.tm, color=c, ls="--", lw=1.0)
        ax2.plot(t_ps, r.solid_fraction, color=c, lw=0.8)
        if not shaded:
            shaded = True
            for a in (ax, ax2):
                a.axvspan(r.production_start_fs / 1000.0, t_ps[-1], color="0.9", zorder=0,
                          label="production" if a is ax else None)
    if not shaded:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("temperature (K)")
    ax2.set_ylabel("solid fraction (q̄_l rule)")
    ax2.set_xlabel("time since joining the phases (ps)")
    ax2.set_ylim(0, 1)
    ax.set_title(title or "solid–liquid coexistence")
    if shaded:
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)
    return path
