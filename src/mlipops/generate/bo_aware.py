"""Born–Oppenheimer-aware sampling: find where the ground state meets the first excited state along a
path, sample training frames densely *up to* that cliff and label the frames beyond it.

A ground-state potential is one adiabatic surface E₀(R). Where the first excited state comes close,
ΔE₀₁(R) = E₁ − E₀ → 0, there is no single surface to fit (non-adiabatic coupling ∝ 1/ΔE₀₁, thermal
population of E₁, a multi-reference ground state). ``mlipops generate bo-scan``

1. maps ΔE₀₁(s) along a path s ∈ [s_min, s_max] with an **adaptive scan**: a coarse uniform grid
   (``coarse_points``), then bisection of every interval where

   - the gap crosses ε_BO (until the interval is ≤ ``resolution`` wide), or
   - linear interpolation of the gap errs by more than ``gap_tolerance_eV``, estimated from the
     local curvature as h²/8 · |Δ²g/Δs²| (no extra oracle call to decide), down to ``resolution``;

   the oracle is called once per distinct s (a cache), and the count is compared with a uniform
   grid of the same resolution, ``ceil((s_max − s_min)/resolution) + 1``;
2. marks the **breakdown regions** {s : ΔE₀₁(s) < ε_BO}: maximal runs of scanned points below ε;
   a region's start/end is its first/last scanned point below ε (the crossing lies within one
   resolution before it; the linearly interpolated crossing is reported too). Regions may lie on
   either side of the path or in the middle (an avoided crossing is an interval), several of them;
3. samples **training frames** on the safe side, never closer than ``margin`` (≥ resolution) to a
   region, with spacing Δs = clip(spacing_per_eV · (ΔE₀₁(s) − ε), min_spacing, max_spacing):
   denser as the gap closes, walked from the region outwards so the closest frame sits at the
   margin; the margin itself gets no frames (a guard band, not a grey zone);
4. samples ``breakdown_frames`` evenly spaced frames **inside** each region and labels them
   ``info['bo_breakdown'] = True`` (their config_type stays the path's, so the flag, not a name,
   carries the meaning). The validate stage quarantines them with check ``bo_breakdown``: kept,
   indexed, never trained on. A training frame whose own gap came out below ε is flagged too.

ε_BO = ``gap_kT`` · k_B · ``target_temperature_K`` (default 10 k_B · 1000 K = 0.862 eV), or
``epsilon_eV`` when given: at a gap of n k_BT the excited state's Boltzmann weight is e⁻ⁿ
(4.5·10⁻⁵ for n = 10), so the frames an MD run at the target temperature visits stay on one
surface to that accuracy. Every frame stores ``bo_epsilon`` so that validate applies at least this ε.

Every sampled frame is a real oracle call (energy, forces of the ground state, the excited
energies, ``bo_gap``) with ``path_coordinate`` = s (Å). Outputs: ``data/raw/bo_scan_<name>.extxyz``
and ``reports/generate/bo_scan/`` (``gap.png``, ``summary.md``, ``metrics.json``, ``gap_curve.csv``).

Paths: ``diatomic`` (bond length of two atoms along z, Å; default H–H 0.5–6.0 Å) or ``images`` (an
extxyz of ordered images of the same atoms; s is the Cartesian arc length in Å along the polyline
through them, structures in between are linear interpolations). Limitation: a region narrower than
the coarse spacing whose edges show no curvature between coarse points can be missed; raise
``coarse_points`` for paths with sharp avoided crossings.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from ase import Atoms

from mlipops.errors import FrameFormatError, OracleError, ParamsError
from mlipops.frames import labels, set_labels, write_extxyz, write_manifest
from mlipops.oracles import Oracle, get_oracle
from mlipops.params import BoPathParams, BoScanParams
from mlipops.paths import ensure_writable
from mlipops.report import md_table, write_markdown, write_metrics
from mlipops.pipeline import BO_SCAN_REPORTS as REPORT_DIR, RAW_DIR

_DIATOMIC_RANGE = (0.5, 6.0)


# ------------------------------------------------------------------------------------------ paths
@dataclass
class ScanPath:
    """s -> Atoms on [s_min, s_max] (Å)."""

    s_min: float
    s_max: float
    make: Callable[[float], Atoms]
    config_type: str
    description: str

    def __call__(self, s: float) -> Atoms:
        return self.make(float(s))


def diatomic_path(elements: list[str], s_range: tuple[float, float] | None = None,
                  config_type: str = "h2_dissociation") -> ScanPath:
    lo, hi = s_range or _DIATOMIC_RANGE
    symbols = "".join(elements)

    def make(s: float) -> Atoms:
        return Atoms(symbols, positions=[[0.0, 0.0, 0.0], [0.0, 0.0, s]], pbc=False)

    return ScanPath(float(lo), float(hi), make, config_type, f"{elements[0]}–{elements[1]} bond length")


def images_path(file: str | Path, s_range: tuple[float, float] | None = None,
                config_type: str = "path") -> ScanPath:
    """Linear interpolation between consecutive images of an extxyz; s = Cartesian arc length (Å)."""
    import ase.io

    file = Path(file)
    if not file.is_file():
        raise FrameFormatError("path images file not found", file=str(file), field="bo_scan.path.file")
    try:
        images = ase.io.read(file, index=":", format="extxyz")
    except Exception as exc:
        raise FrameFormatError(f"cannot read the path images: {exc}", file=str(file)) from None
    if len(images) < 2:
        raise FrameFormatError(f"a path needs at least 2 images (found {len(images)})", file=str(file))
    for k, a in enumerate(images[1:], 1):
        if list(a.numbers) != list(images[0].numbers):
            raise FrameFormatError("every image must hold the same atoms in the same order", file=str(file),
                                   frame=k, field="species")
    pos = np.array([a.positions for a in images])  # [n_images, n_atoms, 3]
    seg = np.linalg.norm((pos[1:] - pos[:-1]).reshape(len(images) - 1, -1), axis=1)
    if np.any(seg <= 0):
        k = int(np.argmin(seg)) + 1
        raise FrameFormatError("two consecutive images are identical", file=str(file), frame=k, field="positions")
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    lo, hi = s_range or (0.0, float(arc[-1]))
    if lo < 0 or hi > arc[-1] + 1e-9:
        raise ParamsError(f"bo_scan.path.range {[lo, hi]} leaves the path [0, {arc[-1]:.4f}] Å of {file}")
    numbers, pbc, cell = images[0].numbers, images[0].pbc, images[0].cell

    def make(s: float) -> Atoms:
        k = int(np.clip(np.searchsorted(arc, s, side="right") - 1, 0, len(seg) - 1))
        t = (s - arc[k]) / seg[k]
        return Atoms(numbers=numbers, positions=(1 - t) * pos[k] + t * pos[k + 1], cell=cell, pbc=pbc)

    return ScanPath(float(lo), float(hi), make, config_type, f"arc length along {file.name}")


def build_path(p: BoPathParams) -> ScanPath:
    if p.kind == "diatomic":
        return diatomic_path(p.elements, p.range, p.config_type)
    return images_path(p.file, p.range, p.config_type)


# ------------------------------------------------------------------------------------------ scan
class CachedOracle:
    """Labels the path at s, each distinct s once (rounded to 1e-9 Å); ``n_calls`` counts oracle calls."""

    def __init__(self, oracle: Oracle, path: ScanPath):
        self.oracle = oracle
        self.path = path
        self.cache: dict[float, Atoms] = {}
        self.n_calls = 0

    def __call__(self, s: float) -> Atoms:
        key = round(float(s), 9)
        if key not in self.cache:
            a = self.path(key)
            a.info["path_coordinate"] = key
            (labelled,) = self.oracle.label([a])
            if "bo_gap" not in labelled.info:
                raise OracleError(f"oracle {self.oracle.name!r} returns no excited states, so it has no gap to "
                                  "scan (use calculator: pyscf)", field="bo_scan.oracle.calculator")
            self.cache[key] = labelled
            self.n_calls += 1
        return self.cache[key]

    def gap(self, s: float) -> float:
        return float(self(s).info["bo_gap"])


@dataclass
class Region:
    start: float          # first scanned s with gap < ε
    end: float            # last scanned s with gap < ε
    crossing_start: float | None  # linearly interpolated s where the gap crosses ε (None at the path's end)
    crossing_end: float | None
    bracket_start: float | None   # width of the bracket around the crossing (≤ resolution)
    bracket_end: float | None


@dataclass
class ScanResult:
    s: np.ndarray         # scanned points, ascending (Å)
    gap: np.ndarray       # ΔE₀₁ at s (eV)
    energies: np.ndarray  # [n, n_states] root energies at s (eV)
    epsilon: float
    regions: list[Region]
    n_calls: int
    n_calls_uniform: int
    resolution: float
    n_refine_rounds: int
    hit_call_limit: bool = False
    notes: list[str] = field(default_factory=list)

    def gap_at(self, s: float | np.ndarray) -> np.ndarray:
        return np.interp(s, self.s, self.gap)

    def inside(self, s: float) -> bool:
        return any(r.start - 1e-12 <= s <= r.end + 1e-12 for r in self.regions)


def uniform_calls(s_min: float, s_max: float, resolution: float) -> int:
    """Oracle calls of a uniform grid with spacing ≤ ``resolution`` on [s_min, s_max]."""
    return int(math.ceil((s_max - s_min) / resolution - 1e-9)) + 1


def _curvature(s: np.ndarray, g: np.ndarray) -> np.ndarray:
    """|g''| estimated at every node by the second divided difference (ends: their neighbour's)."""
    if len(s) < 3:
        return np.zeros(len(s))
    d1 = np.diff(g) / np.diff(s)
    d2 = np.abs(2.0 * np.diff(d1) / (s[2:] - s[:-2]))
    return np.concatenate([[d2[0]], d2, [d2[-1]]])


def find_regions(s: np.ndarray, g: np.ndarray, eps: float) -> list[Region]:
    below = g < eps
    regions = []
    k = 0
    while k < len(s):
        if not below[k]:
            k += 1
            continue
        j = k
        while j + 1 < len(s) and below[j + 1]:
            j += 1

        def cross(a: int, b: int) -> float:  # linear interpolation of g = ε between nodes a and b
            return float(s[a] + (eps - g[a]) * (s[b] - s[a]) / (g[b] - g[a]))

        regions.append(Region(
            start=float(s[k]), end=float(s[j]),
            crossing_start=cross(k - 1, k) if k > 0 else None, crossing_end=cross(j, j + 1) if j + 1 < len(s) else None,
            bracket_start=float(s[k] - s[k - 1]) if k > 0 else None,
            bracket_end=float(s[j + 1] - s[j]) if j + 1 < len(s) else None))
        k = j + 1
    return regions


def adaptive_gap_scan(gap: Callable[[float], float], s_min: float, s_max: float, eps: float, *,
                      coarse_points: int = 12, resolution: float = 0.01, gap_tolerance: float = 0.1,
                      max_calls: int = 400, n_calls: Callable[[], int] | None = None) -> ScanResult:
    """Map ΔE₀₁(s) on [s_min, s_max]: coarse grid, then bisection where the gap crosses ``eps`` or
    bends (interpolation error h²/8·|g''| > ``gap_tolerance``), intervals no narrower than ``resolution``.

    ``gap(s)`` is called once per point (the caller caches); ``n_calls`` reports the caller's count."""
    pts: dict[float, float] = {}
    calls = 0

    def evaluate(s: float) -> None:
        nonlocal calls
        s = round(float(s), 9)
        if s not in pts:
            pts[s] = gap(s)
            calls += 1

    for s in np.linspace(s_min, s_max, coarse_points):
        evaluate(s)
    rounds, hit_limit, notes = 0, False, []
    while True:
        s = np.array(sorted(pts))
        g = np.array([pts[x] for x in s])
        h = np.diff(s)
        splittable = h > resolution * (1 + 1e-9)
        crossing = (g[:-1] - eps) * (g[1:] - eps) <= 0
        curv = _curvature(s, g)
        bend = h ** 2 / 8.0 * np.maximum(curv[:-1], curv[1:]) > gap_tolerance
        todo = np.flatnonzero(splittable & (crossing | bend))
        if not len(todo):
            break
        if calls + len(todo) > max_calls:
            hit_limit = True
            # crossings first: the region's bounds matter more than the curve's shape
            todo = sorted(todo, key=lambda i: (not crossing[i], -h[i]))[:max(0, max_calls - calls)]
            notes.append(f"stopped at max_oracle_calls = {max_calls}: the gap curve is not refined everywhere")
            for i in todo:
                evaluate(0.5 * (s[i] + s[i + 1]))
            break
        for i in todo:
            evaluate(0.5 * (s[i] + s[i + 1]))
        rounds += 1
    s = np.array(sorted(pts))
    g = np.array([pts[x] for x in s])
    return ScanResult(s=s, gap=g, energies=np.zeros((len(s), 0)), epsilon=eps, regions=find_regions(s, g, eps),
                      n_calls=n_calls() if n_calls else calls, n_calls_uniform=uniform_calls(s_min, s_max, resolution),
                      resolution=resolution, n_refine_rounds=rounds, hit_call_limit=hit_limit, notes=notes)


# -------------------------------------------------------------------------------------- sampling
def _safe_intervals(s_min: float, s_max: float, regions: list[Region], margin: float
                    ) -> list[tuple[float, float, bool, bool]]:
    """(lo, hi, region_below, region_above) of the parts of [s_min, s_max] at least ``margin`` from every
    region; the flags say whether a region bounds the interval at that end."""
    out = []
    lo, lo_region = s_min, False
    for r in sorted(regions, key=lambda r: r.start):
        hi = r.start - margin
        if hi >= lo:
            out.append((lo, hi, lo_region, True))
        lo, lo_region = r.end + margin, True
    if s_max >= lo:
        out.append((lo, s_max, lo_region, False))
    return out


def training_points(scan: ScanResult, s_min: float, s_max: float, p: BoScanParams) -> list[float]:
    """s of the training frames: every safe interval walked from its region end(s) outwards with
    spacing clip(spacing_per_eV·(gap − ε), min_spacing, max_spacing)."""
    eps = scan.epsilon

    def step(s: float) -> float:
        return float(np.clip(p.spacing_per_eV * (float(scan.gap_at(s)) - eps), p.min_spacing, p.max_spacing))

    def walk(start: float, stop: float) -> list[float]:
        sign = 1.0 if stop >= start else -1.0
        out, s = [start], start
        while True:
            s = s + sign * step(s)
            if sign * (stop - s) < -1e-12:
                break
            out.append(s)
        return out

    points: list[float] = []
    for lo, hi, below, above in _safe_intervals(s_min, s_max, scan.regions, p.margin):
        if below and above:
            mid = 0.5 * (lo + hi)
            left, right = walk(lo, mid), walk(hi, mid)
            # drop the walk's last points where the two walks meet closer than min_spacing
            while left and right and abs(right[-1] - left[-1]) < p.min_spacing:
                right.pop()
            pts = left + right
        elif above:
            pts = walk(hi, lo)
        else:
            pts = walk(lo, hi)
        points += pts
    return sorted(set(round(x, 9) for x in points))


def breakdown_points(scan: ScanResult, p: BoScanParams) -> list[float]:
    pts: list[float] = []
    for r in scan.regions:
        n = p.breakdown_frames if r.end > r.start else 1
        pts += np.linspace(r.start, r.end, n).tolist()
    return sorted(set(round(x, 9) for x in pts))


@dataclass
class BoScan:
    scan: ScanResult
    frames: list[Atoms]
    train: list[Atoms]
    breakdown: list[Atoms]
    path: ScanPath
    oracle: Oracle
    n_oracle_calls: int


def bo_scan(p: BoScanParams, path: ScanPath | None = None, oracle: Oracle | None = None) -> BoScan:
    """Scan, find the regions, sample and label the frames (no files written)."""
    path = path or build_path(p.path)
    oracle = oracle or get_oracle(p.oracle.calculator, p.oracle.kwargs)
    labeller = CachedOracle(oracle, path)
    eps = p.epsilon
    scan = adaptive_gap_scan(labeller.gap, path.s_min, path.s_max, eps, coarse_points=p.coarse_points,
                             resolution=p.resolution, gap_tolerance=p.gap_tolerance_eV,
                             max_calls=p.max_oracle_calls, n_calls=lambda: labeller.n_calls)
    scan.energies = np.array([np.concatenate([[labeller(s).get_potential_energy()],
                                              labeller(s).info["excited_energies"]]) for s in scan.s])
    train_s = training_points(scan, path.s_min, path.s_max, p)
    brk_s = breakdown_points(scan, p)
    source = f"bo_scan_{p.name}"
    frames, train, breakdown = [], [], []
    for s in sorted(set(train_s) | set(brk_s)):
        a = labeller(s).copy()
        set_labels(a, *labels(labeller(s)))  # copy() drops the labels' calculator
        a.info.update({"config_type": path.config_type, "source": source, "bo_epsilon": eps})
        flagged = s in brk_s or scan.inside(s) or float(a.info["bo_gap"]) < eps
        a.info["bo_breakdown"] = bool(flagged)
        (breakdown if flagged else train).append(a)
        frames.append(a)
    return BoScan(scan, frames, train, breakdown, path, oracle, labeller.n_calls)


# -------------------------------------------------------------------------------------- report
def _plot(res: BoScan, path: Path, margin: float) -> None:
    from mlipops.report import pyplot, save_figure

    plt = pyplot()

    sc = res.scan
    floor = max(1e-12, 0.5 * float(np.nanmin(sc.gap[sc.gap > 0]))) if np.any(sc.gap > 0) else 1e-12
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, r in enumerate(sc.regions):
        for a in (ax, ax2):
            a.axvspan(r.start, r.end, color="red", alpha=0.12, label="BO breakdown region" if k == 0 else None)
            for lo, hi in ((r.start - margin, r.start), (r.end, r.end + margin)):
                if hi > lo and lo < res.path.s_max and hi > res.path.s_min:
                    a.axvspan(max(lo, res.path.s_min), min(hi, res.path.s_max), color="orange", alpha=0.15,
                              label="margin (no frames)" if k == 0 and lo < r.start else None)
    ax.semilogy(sc.s, np.clip(sc.gap, floor, None), "-", color="0.3", lw=1, label="ΔE₀₁ (scan)")
    ax.semilogy(sc.s, np.clip(sc.gap, floor, None), ".", color="0.3", ms=4, label=f"scan points ({sc.n_calls} calls)")
    ax.axhline(sc.epsilon, color="red", ls="--", lw=1, label=f"ε_BO = {sc.epsilon:.3f} eV")
    for frames, style, label in ((res.train, dict(marker="o", color="tab:green", ls=""), "training frames"),
                                 (res.breakdown, dict(marker="x", color="tab:red", ls=""), "bo_breakdown frames")):
        if frames:
            ax.semilogy([a.info["path_coordinate"] for a in frames],
                        [max(float(a.info["bo_gap"]), floor) for a in frames], ms=7, label=label, **style)
    ax.set_xlabel(f"s: {res.path.description} (Å)")
    ax.set_ylabel("gap ΔE₀₁ = E₁ − E₀ (eV)")
    ax.set_title("Ground/first-excited gap along the path")
    ax.legend(fontsize=7)
    for k in range(sc.energies.shape[1]):
        ax2.plot(sc.s, sc.energies[:, k], "-" if k == 0 else "--", lw=1.2, label=f"E{k} (root {k})")
    if res.train:
        ax2.plot([a.info["path_coordinate"] for a in res.train], [a.get_potential_energy() for a in res.train],
                 "o", color="tab:green", ms=5, label="training frames")
    if res.breakdown:
        ax2.plot([a.info["path_coordinate"] for a in res.breakdown],
                 [a.get_potential_energy() for a in res.breakdown], "x", color="tab:red", ms=7,
                 label="bo_breakdown frames")
    ax2.set_xlabel(f"s: {res.path.description} (Å)")
    ax2.set_ylabel("total energy (eV)")
    ax2.set_title("State energies")
    ax2.legend(fontsize=7)
    save_figure(fig, path, dpi=110)


def run(p: BoScanParams) -> dict:
    """The ``bo_scan`` stage: scan, sample, write the frames and the report."""
    t0 = time.perf_counter()
    out = ensure_writable(RAW_DIR / f"bo_scan_{p.name}.extxyz", what="write", follow=False)  # tmp + rename
    res = bo_scan(p)
    sc = res.scan
    write_extxyz(out, res.frames)
    write_manifest(out, res.frames, "mlipops generate bo-scan")  # its oracle_* survive ingest (mlipops.frames)
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    _plot(res, REPORT_DIR / "gap.png", p.margin)
    import pandas as pd

    curve = pd.DataFrame({"s": sc.s, "gap_eV": sc.gap} | {f"E{k}_eV": sc.energies[:, k]
                                                          for k in range(sc.energies.shape[1])})
    curve.to_csv(REPORT_DIR / "gap_curve.csv", index=False)
    first = sc.regions[0] if sc.regions else None
    train_gaps = [float(a.info["bo_gap"]) for a in res.train]
    metrics = {
        "n_oracle_calls": res.n_oracle_calls, "n_scan_calls": sc.n_calls, "n_calls_uniform": sc.n_calls_uniform,
        "resolution": sc.resolution, "epsilon_eV": sc.epsilon, "n_regions": len(sc.regions),
        "region_start": first.start if first else None, "region_end": first.end if first else None,
        "crossing_start": first.crossing_start if first else None,
        "n_frames": len(res.frames), "n_train": len(res.train), "n_breakdown": len(res.breakdown),
        "min_train_gap_eV": min(train_gaps) if train_gaps else None,
        "closest_train_s": (max((a.info["path_coordinate"] for a in res.train
                                 if a.info["path_coordinate"] < first.start), default=None) if first else None),
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }
    for k, r in enumerate(sc.regions):
        metrics.update({f"region.{k}.start": r.start, f"region.{k}.end": r.end,
                        f"region.{k}.crossing_start": r.crossing_start, f"region.{k}.crossing_end": r.crossing_end})
    write_metrics(REPORT_DIR, metrics)
    eps_how = (f"epsilon_eV = {p.epsilon_eV} eV (given)" if p.epsilon_eV is not None else
               f"gap_kT · k_B · T = {p.gap_kT:g} × k_B × {p.target_temperature_K:g} K = {sc.epsilon:.4f} eV "
               f"(the excited state's Boltzmann weight at the gap is e^-{p.gap_kT:g})")
    rows = [(k, f"{r.start:.4f}", f"{r.end:.4f}",
             "-" if r.crossing_start is None else f"{r.crossing_start:.4f}",
             "-" if r.crossing_end is None else f"{r.crossing_end:.4f}") for k, r in enumerate(sc.regions)]
    paragraphs = [
        f"Path: {res.path.description}, s ∈ [{res.path.s_min:g}, {res.path.s_max:g}] Å, config_type "
        f"`{res.path.config_type}`. Oracle `{res.oracle.name}` ({res.oracle.version}), settings "
        f"`{res.oracle.settings}`.",
        f"ε_BO: {eps_how}.",
        f"Adaptive scan: {sc.n_calls} oracle calls ({p.coarse_points} coarse points, {sc.n_refine_rounds} "
        f"refinement rounds) against {sc.n_calls_uniform} for a uniform grid at the same resolution "
        f"({sc.resolution:g} Å); {res.n_oracle_calls} calls in all with the sampled frames.",
        f"Frames: {len(res.frames)} written to `{out}`: {len(res.train)} training frames (gap ≥ "
        f"{min(train_gaps):.4g} eV, none within {p.margin:g} Å of a region) and {len(res.breakdown)} frames inside "
        "the region(s), labelled `bo_breakdown` (quarantined by validate, never trained on)."
        if train_gaps else f"Frames: {len(res.frames)} written to `{out}`, {len(res.breakdown)} labelled bo_breakdown.",
        "Breakdown regions (gap < ε; start/end = first/last scanned point below ε, crossing = linear interpolation):",
        md_table(("region", "start (Å)", "end (Å)", "crossing in (Å)", "crossing out (Å)"), rows) if rows
        else "_none: the gap stays above ε on the whole path_",
        "![gap](gap.png)",
        "Use the frames in a molecular project: list the file under `ingest.sources` (and as a dep of the "
        "ingest stage), allow the species in `validate.allowed_species` and a `min_interatomic_distance` below "
        "the shortest bond. The default copper pipeline does not ingest it.",
    ] + sc.notes
    write_markdown(REPORT_DIR / "summary.md", f"Born–Oppenheimer-aware scan `{p.name}`", paragraphs,
                   table=(("s (Å)", "gap (eV)", "bo_breakdown", "energy (eV)", "largest force component (eV/Å)"),
                          [(f"{a.info['path_coordinate']:.4f}", f"{a.info['bo_gap']:.4g}",
                            str(a.info["bo_breakdown"]), f"{a.get_potential_energy():.5f}",
                            f"{np.abs(a.get_forces()).max():.4g}") for a in res.frames]))
    return metrics
