"""Reaction paths followed to where the model leaves its training hull, and what its error does there.

A path is an ordered list of labelled frames with a coordinate s (``info["reaction_coordinate"]``; the
generator's ``path_coordinate`` or ``path_index`` for curated frames). Along it we compute the reference
energy E_ref (the frame's labels), the model energy E_model (Δ-learning baseline included) and the
ensemble spread σ_E (sample standard deviation of the members' energies; 0 for a single potential), the
per-frame maximum of the per-atom extrapolation grade γ (:mod:`mlipops.index.hull`: γ ≤ 1 inside the
descriptor-space hull of the training atoms, > 1 outside, ∞ off a flat hull) and the error
err = |E_model − E_ref| / N (eV/atom). Points are taken in path order, never re-sorted; "after" means
later in that order.

- **exit point**: the first point with max γ > 1 + ``INSIDE_TOL``; None when the path stays inside.
- **tolerance point**: the first point with err > ``tolerance_per_atom``; a non-finite error (a NaN
  or infinite prediction) counts as beyond tolerance. None when the error never exceeds it.
- **lead/lag**: tolerance point − exit point, in coordinate units (signed along the path, > 0 when
  the error breaks after the exit) and in points; None when either point is missing.
- **error growth**: least squares of ln err against the distance along the path from the exit,
  x = |s − s_exit|, over the points at and after the exit (finite, non-zero errors; at least 2):
  ln err ≈ a + r x gives the growth rate r per unit of s and the e-folding length 1/r (NaN when
  r ≤ 0); a straight line err ≈ b + m x gives the slope m (eV/atom per unit of s).
- **σ alarm point**: the first point with ``sigma_k`` · σ_E / N ≥ ``tolerance_per_atom``;
  ``sigma_rose_before_error`` is alarm index ≤ tolerance index (None without a tolerance point).
  The Spearman rank correlation of σ_E/N and err is taken over the points where both are finite.
- **barrier**: the point of highest reference energy; interpolated when all its atoms are inside
  the hull, extrapolated otherwise. When it is the first or last point the path has no interior
  barrier (``barrier_at_endpoint``) and the verdict says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms

from mlipops.errors import FrameFormatError, MlipopsError, StageInputError
from mlipops.evaluate.predict import spearman
from mlipops.frames import labels, read_extxyz, safe_name
from mlipops.index.hull import INSIDE_TOL

COORDINATE_KEYS = ("reaction_coordinate", "path_coordinate", "path_index")  # by preference


def _index(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


@dataclass
class PathResult:
    name: str
    s: np.ndarray  # [n] coordinate, path order
    n_atoms: np.ndarray  # [n]
    e_ref: np.ndarray  # [n] eV
    e_pred: np.ndarray  # [n] eV
    sigma: np.ndarray  # [n] eV, ensemble std of the energy
    max_gamma: np.ndarray  # [n] NaN without a hull index
    tolerance_per_atom: float
    sigma_k: float
    unit: str
    exit_index: int | None
    tolerance_index: int | None
    alarm_index: int | None
    growth_rate: float  # per unit of s; NaN without a fit
    growth_intercept: float  # ln(eV/atom) at the exit
    growth_n_points: int
    error_slope_per_atom: float  # eV/atom per unit of s
    lead_lag_coordinate: float | None
    lead_lag_points: int | None
    sigma_rose_before_error: bool | None
    sigma_error_spearman: float
    barrier_index: int | None
    barrier_inside: bool | None
    barrier_at_endpoint: bool
    verdict: str

    @property
    def error_per_atom(self) -> np.ndarray:
        return np.abs(self.e_pred - self.e_ref) / self.n_atoms

    def coordinate(self, index: int | None) -> float | None:
        return None if index is None else float(self.s[index])

    exit_coordinate = property(lambda self: self.coordinate(self.exit_index))
    tolerance_coordinate = property(lambda self: self.coordinate(self.tolerance_index))
    alarm_coordinate = property(lambda self: self.coordinate(self.alarm_index))
    barrier_coordinate = property(lambda self: self.coordinate(self.barrier_index))

    @property
    def efold_length(self) -> float:
        return 1.0 / self.growth_rate if self.growth_rate > 0 else float("nan")

    def metrics(self) -> dict:
        """Flat metrics: floats, ints, 0/1 for booleans, None where undefined or not finite."""
        err, gamma = self.error_per_atom, self.max_gamma
        assessed = ~np.isnan(gamma)
        m = {"n_points": len(self.s),
             "n_points_outside_hull": int((gamma[assessed] > 1.0 + INSIDE_TOL).sum()) if assessed.any() else None,
             "max_abs_error_per_atom": float(err[np.isfinite(err)].max()) if np.isfinite(err).any() else None,
             "n_nonfinite_errors": int((~np.isfinite(err)).sum()),
             "exit_index": self.exit_index, "exit_coordinate": self.exit_coordinate,
             "exit_max_gamma": None if self.exit_index is None else float(gamma[self.exit_index]),
             "tolerance_index": self.tolerance_index, "tolerance_coordinate": self.tolerance_coordinate,
             "lead_lag_coordinate": self.lead_lag_coordinate, "lead_lag_points": self.lead_lag_points,
             "error_growth_rate": self.growth_rate, "error_efold_length": self.efold_length,
             "error_slope_per_atom": self.error_slope_per_atom, "error_growth_n_points": self.growth_n_points,
             "sigma_alarm_index": self.alarm_index, "sigma_alarm_coordinate": self.alarm_coordinate,
             "sigma_rose_before_error": self.sigma_rose_before_error,
             "sigma_error_spearman": self.sigma_error_spearman,
             "barrier_index": self.barrier_index, "barrier_coordinate": self.barrier_coordinate,
             "barrier_inside_hull": self.barrier_inside, "barrier_at_endpoint": self.barrier_at_endpoint}
        return {k: int(v) if isinstance(v, (bool, np.bool_)) else
                (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}

    def summary(self) -> str:
        """What happens along the path, in 2-4 sentences generated from the numbers."""
        def at(x: float) -> str:
            return f"{x:.3g} {self.unit}".rstrip()

        tol = f"{1000 * self.tolerance_per_atom:g} meV/atom"
        err, gamma, n = self.error_per_atom, self.max_gamma, len(self.s)
        if np.isnan(gamma).all():
            text = f"{self.name}: extrapolation not assessed (no hull index)"
        elif self.exit_index is None:
            text = (f"{self.name} stays inside the training hull along the whole path "
                    f"(largest max γ {np.nanmax(gamma):.3g})")
        else:
            text = (f"{self.name} leaves the training hull at s = {at(self.s[self.exit_index])} "
                    f"(point {self.exit_index + 1} of {n}, max γ {gamma[self.exit_index]:.3g})")
        if self.tolerance_index is None:
            text += f"; the error never exceeds {tol} (largest {1000 * np.nanmax(err):.3g} meV/atom)."
        else:
            text += f"; the error exceeds {tol} at s = {at(self.s[self.tolerance_index])}"
            if self.lead_lag_points is not None:
                d, k = self.lead_lag_coordinate, self.lead_lag_points
                text += (", at the exit point itself" if k == 0 else
                         f", {at(abs(d))} ({abs(k)} point{'s' * (abs(k) != 1)}) {'after' if k > 0 else 'before'} "
                         "the exit")
            text += "."
        if math.isfinite(self.growth_rate):
            per = f"per {self.unit}" if self.unit else "per unit of s"
            text += (f" Past the exit the error grows by a factor e every {at(self.efold_length)} "
                     f"(rate {self.growth_rate:.3g} {per})." if self.growth_rate > 0 else
                     f" Past the exit the error does not grow (fitted rate {self.growth_rate:.3g} {per}).")
        level = f"{self.sigma_k:g}σ/N ≥ {tol}"
        if not (np.nan_to_num(self.sigma) > 0).any():
            text += " The ensemble σ is zero along the path (a single model): it can give no alarm."
        elif self.alarm_index is None:
            text += f" The ensemble σ never reaches the alarm level ({level})."
        else:
            when = {True: "before or with the error", False: "after the error",
                    None: "though the error stays within tolerance"}[self.sigma_rose_before_error]
            rho = self.sigma_error_spearman
            text += (f" The ensemble σ rose {when}: {level} from s = {at(self.s[self.alarm_index])}"
                     + (f" (Spearman ρ of σ and |error| {rho:.2f})." if math.isfinite(rho) else "."))
        return f"{text} {self.verdict[0].upper()}{self.verdict[1:]}."


def _growth_fit(x: np.ndarray, err: np.ndarray) -> tuple[float, float, float, int]:
    """(rate, ln-intercept, linear slope, n points) of err(x) past the exit; NaN with < 2 usable points."""
    ok = np.isfinite(x) & np.isfinite(err) & (err > 0)
    if ok.sum() < 2 or np.ptp(x[ok]) == 0:
        return float("nan"), float("nan"), float("nan"), int(ok.sum())
    rate, intercept = np.polyfit(x[ok], np.log(err[ok]), 1)
    slope = np.polyfit(x[ok], err[ok], 1)[0]
    return float(rate), float(intercept), float(slope), int(ok.sum())


def _verdict(s: str, first_or_last: str | None, inside: bool | None, gamma: float) -> str:
    where = ("hull membership not assessed (no hull index)" if inside is None else
             f"{'inside' if inside else 'outside'} the training hull (max γ {gamma:.3g})")
    how = "" if inside is None else f"{'interpolated' if inside else 'extrapolated'}, "
    if first_or_last is not None:
        return (f"no interior barrier: the highest reference energy is at the path's {first_or_last} point "
                f"(s = {s}), {how}{where}")
    if inside is None:
        return f"barrier at s = {s}: {where}"
    return f"barrier {how}the highest point (s = {s}) is {where}"


def analyse_path(name: str, s, n_atoms, e_ref, e_pred, sigma, max_gamma, tolerance_per_atom: float = 0.010,
                 sigma_k: float = 2.0, unit: str = "Å") -> PathResult:
    """Exit, tolerance and σ-alarm points, error growth and barrier verdict of one path (see module doc)."""
    arrays = [np.asarray(v, dtype=np.float64).ravel() for v in (s, n_atoms, e_ref, e_pred, sigma, max_gamma)]
    s, n_atoms, e_ref, e_pred, sigma, max_gamma = arrays
    if len({len(a) for a in arrays}) != 1:
        raise MlipopsError(f"path {name}: arrays of different lengths {[len(a) for a in arrays]}")
    n = len(s)
    if n < 2:
        raise MlipopsError(f"path {name} has {n} frame(s): a path needs at least 2", field="reaction_coordinate")
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.abs(e_pred - e_ref) / n_atoms
        outside = max_gamma > 1.0 + INSIDE_TOL  # NaN (no hull) is never outside
        i_exit = _index(outside)
        i_tol = _index(~(err <= tolerance_per_atom))
        i_alarm = _index(sigma_k * sigma / n_atoms >= tolerance_per_atom)
    direction = -1.0 if s[-1] < s[0] else 1.0  # distances along the path, whichever way s runs
    rate = intercept = slope = float("nan")
    n_fit, lag_s, lag_k = 0, None, None
    if i_exit is not None:
        rate, intercept, slope, n_fit = _growth_fit(np.abs(s[i_exit:] - s[i_exit]), err[i_exit:])
        if i_tol is not None:
            lag_s, lag_k = float(direction * (s[i_tol] - s[i_exit])), i_tol - i_exit
    finite_ref = np.isfinite(e_ref)
    i_bar = int(np.argmax(np.where(finite_ref, e_ref, -np.inf))) if finite_ref.any() else None
    inside = None if i_bar is None or np.isnan(max_gamma[i_bar]) else bool(not outside[i_bar])
    at_end = i_bar is not None and i_bar in (0, n - 1)
    end = ("first" if i_bar == 0 else "last") if at_end else None
    verdict = ("no finite reference energy: no barrier" if i_bar is None else
               _verdict(f"{s[i_bar]:.3g} {unit}".rstrip(), end, inside, max_gamma[i_bar]))
    return PathResult(
        name=name, s=s, n_atoms=n_atoms, e_ref=e_ref, e_pred=e_pred, sigma=sigma, max_gamma=max_gamma,
        tolerance_per_atom=float(tolerance_per_atom), sigma_k=float(sigma_k), unit=unit, exit_index=i_exit,
        tolerance_index=i_tol, alarm_index=i_alarm, growth_rate=rate, growth_intercept=intercept,
        growth_n_points=n_fit, error_slope_per_atom=slope, lead_lag_coordinate=lag_s, lead_lag_points=lag_k,
        sigma_rose_before_error=None if i_tol is None else (i_alarm is not None and i_alarm <= i_tol),
        sigma_error_spearman=spearman(sigma / n_atoms, err), barrier_index=i_bar, barrier_inside=inside,
        barrier_at_endpoint=at_end, verdict=verdict)


def path_arrays(model, frames: list[Atoms], hull_index, batch_size: int = 16) -> dict[str, np.ndarray]:
    """n_atoms, e_ref, e_pred (baseline included), sigma (ensemble energy std; 0 for one potential) and
    max_gamma (per-frame max of the atoms' γ; NaN when ``hull_index`` is None) of a path's frames."""
    from mlipops.descriptors import compute_descriptors
    from mlipops.evaluate.predict import predict_committee

    if not frames:
        raise MlipopsError("a path with no frames", field="reaction_coordinate")
    e_ref = np.empty(len(frames))
    for k, a in enumerate(frames):
        try:
            e = labels(a)[0]
        except ValueError as exc:
            raise MlipopsError(str(exc), frame=k, field="energy") from None
        if e is None:
            raise MlipopsError("reference energy missing: path frames must be labelled", frame=k, field="energy")
        e_ref[k] = e
    e_pred, sigma, _, _ = predict_committee(model, frames, forces=False, batch_size=batch_size)
    n_atoms = np.array([len(a) for a in frames])
    max_gamma = np.full(len(frames), np.nan)
    if hull_index is not None:
        g, unseen = compute_descriptors(frames, hull_index.species, hull_index.descriptor)
        symbols = np.concatenate([np.array(a.get_chemical_symbols(), dtype=str) for a in frames])
        gamma = hull_index.evaluate(symbols, g, unseen)["extrapolation_grade"]
        max_gamma = np.maximum.reduceat(gamma, np.concatenate([[0], np.cumsum(n_atoms)[:-1]]))
    return {"n_atoms": n_atoms, "e_ref": e_ref, "e_pred": np.asarray(e_pred, dtype=np.float64),
            "sigma": sigma, "max_gamma": max_gamma}


def _coordinate(a: Atoms, key: str) -> float:
    """The frame's info[key] as a finite float; ValueError saying what is wrong."""
    if key not in a.info:
        raise ValueError(f"missing info '{key}': path frames need their coordinate")
    try:
        value = float(a.info[key])
    except (TypeError, ValueError):
        raise ValueError(f"info '{key}' is not a number: {a.info[key]!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"info '{key}' is not finite: {value}")
    return value


def _path_coordinates(frames: list[Atoms], indices: list[int] | None = None) -> tuple[np.ndarray, str]:
    """(s, key): the first of COORDINATE_KEYS that every frame has; errors name frame ``indices[k]``."""
    indices = list(range(len(frames))) if indices is None else indices
    key = next((c for c in COORDINATE_KEYS if all(c in a.info for a in frames)), None)
    if key is None:  # the first frame without any coordinate, else (keys mixed) the first without the preferred
        k = next((k for k, a in enumerate(frames) if not any(c in a.info for c in COORDINATE_KEYS)),
                 next(k for k, a in enumerate(frames) if COORDINATE_KEYS[0] not in a.info))
        raise StageInputError(f"no coordinate common to all frames of the path: give each frame info "
                              f"{' or '.join(COORDINATE_KEYS)}", frame=indices[k], field="reaction_coordinate")
    s = np.empty(len(frames))
    for k, a in enumerate(frames):
        try:
            s[k] = _coordinate(a, key)
        except ValueError as exc:
            raise StageInputError(str(exc), frame=indices[k], field="reaction_coordinate") from None
    return s, key


def collect_paths(frames: list[Atoms], config_types: list[str]) -> dict[str, list[Atoms]]:
    """Curated frames grouped into one path per listed config_type, ordered by their coordinate."""
    out = {}
    for ct in config_types:
        idx = [k for k, a in enumerate(frames) if a.info.get("config_type") == ct]
        if not idx:
            continue
        s, _ = _path_coordinates([frames[k] for k in idx], idx)
        out[ct] = [frames[idx[k]] for k in np.argsort(s, kind="stable")]
    return out


def read_user_path(path: str | Path) -> tuple[str, list[Atoms]]:
    """A user's path: extxyz of ordered, labelled frames with a monotonic info ``reaction_coordinate``."""
    path = Path(path)
    frames, rejected = read_extxyz(path)
    if rejected:
        r = rejected[0]
        raise FrameFormatError(r.reason.removeprefix(f"{path} frame {r.source_index}: "), file=str(path),
                               frame=r.source_index)
    s = np.empty(len(frames))
    for k, a in enumerate(frames):
        try:
            energy = labels(a)[0]
        except ValueError as exc:
            raise FrameFormatError(str(exc), file=str(path), frame=k, field="energy") from None
        if energy is None:
            raise FrameFormatError("reference energy missing: path frames must be labelled", file=str(path),
                                   frame=k, field="energy")
        try:
            s[k] = _coordinate(a, "reaction_coordinate")
        except ValueError as exc:
            raise FrameFormatError(str(exc), file=str(path), frame=k, field="reaction_coordinate") from None
    if len(s) < 2:
        raise FrameFormatError(f"a path needs at least 2 frames, found {len(s)}", file=str(path))
    step = np.sign(np.diff(s))
    bad = _index(step != step[0]) if step[0] != 0 else 0
    if bad is not None:
        raise FrameFormatError(f"reaction_coordinate is not strictly monotonic along the file: {s[bad]:g} at frame "
                               f"{bad} then {s[bad + 1]:g}", file=str(path), frame=bad + 1, field="reaction_coordinate")
    return path.stem, frames


def evaluate_paths(model, paths: dict[str, list[Atoms]], hull_index, tolerance_per_atom: float = 0.010,
                   sigma_k: float = 2.0, plot_dir: Path | None = None) -> dict[str, PathResult]:
    """Analyse every path (and plot it to ``plot_dir/<name>.png``). The coordinate's unit is Å, or the
    frames' info ``reaction_coordinate_unit``; none for ``path_index``."""
    results = {}
    for name, frames in paths.items():
        if len(frames) < 2:
            raise StageInputError(f"path {name} has {len(frames)} frame(s): a path needs at least 2",
                                  field="reaction_coordinate")
        s, key = _path_coordinates(frames)
        unit = "" if key == "path_index" else str(frames[0].info.get("reaction_coordinate_unit", "Å"))
        results[name] = r = analyse_path(name, s, **path_arrays(model, frames, hull_index),
                                         tolerance_per_atom=tolerance_per_atom, sigma_k=sigma_k, unit=unit)
        if plot_dir is not None:
            plot_path(r, Path(plot_dir) / f"{safe_name(name)}.png")
    return results


def plot_path(result: PathResult, path: Path) -> Path:
    """Energies (±σ), |error| with the tolerance and growth fit, and max γ against the coordinate (PNG)."""
    from mlipops.report import pyplot, save_figure

    plt = pyplot()

    r, path = result, Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    s, n = r.s, r.n_atoms
    ref_per_atom = r.e_ref / n
    e0 = ref_per_atom[np.isfinite(ref_per_atom)][0] if np.isfinite(ref_per_atom).any() else 0.0
    u = f" {r.unit}" if r.unit else ""
    ref, pred, sig = r.e_ref / n - e0, r.e_pred / n - e0, r.sigma / n
    fig, (ax_e, ax_err, ax_g) = plt.subplots(3, 1, figsize=(6.5, 8.5), sharex=True,
                                             gridspec_kw={"height_ratios": [3, 2, 2]})
    ax_e.plot(s, ref, "k-o", ms=3, label="reference")
    ax_e.plot(s, pred, "-s", color="tab:blue", ms=3, label="model")
    ax_e.fill_between(s, pred - sig, pred + sig, color="tab:blue", alpha=0.25, label="model ± σ (ensemble)")
    ax_e.set_ylabel("E/N − reference E/N at s₀ (eV/atom)")
    err = 1000 * r.error_per_atom
    ax_err.semilogy(s, np.where(err > 0, err, np.nan), "-o", color="tab:red", ms=3, label="|E_model − E_ref|/N")
    ax_err.axhline(1000 * r.tolerance_per_atom, color="k", ls="--", lw=0.8, label="tolerance")
    if r.exit_index is not None and math.isfinite(r.growth_rate):
        xs = s[r.exit_index:]
        ax_err.plot(xs, 1000 * np.exp(r.growth_intercept + r.growth_rate * np.abs(xs - xs[0])), ":",
                    color="tab:purple", label=f"growth fit (e-fold length {r.efold_length:.3g}{u})")
    ax_err.set_ylabel("|error| (meV/atom)")
    gamma = r.max_gamma
    fin = gamma[np.isfinite(gamma)]
    cap = max(2.0, 2.0 * float(fin.max(initial=0.0)))
    ax_g.semilogy(s, np.clip(np.where(np.isinf(gamma), np.nan, gamma), 1e-2, None), "-o", color="tab:green", ms=3,
                  label="max γ over atoms")
    if np.isinf(gamma).any():
        ax_g.plot(s[np.isinf(gamma)], np.full(int(np.isinf(gamma).sum()), cap), "^", color="tab:green",
                  label=f"γ = ∞ (drawn at {cap:.3g})")
    ax_g.axhline(1.0, color="k", ls="--", lw=0.8, label="hull boundary γ = 1")
    ax_g.set_ylabel("max extrapolation grade γ")
    ax_g.set_xlabel(f"reaction coordinate s ({r.unit})" if r.unit else "reaction coordinate s (dimensionless)")
    marks = (("exit", r.exit_index, "tab:red", "--"), ("tolerance", r.tolerance_index, "k", ":"),
             ("σ alarm", r.alarm_index, "tab:purple", "-."))
    for label, i, colour, ls in marks:
        if i is None:
            continue
        for ax in (ax_e, ax_err, ax_g):
            ax.axvline(s[i], color=colour, ls=ls, lw=1.0, label=f"{label} point" if ax is ax_e else None)
    for ax in (ax_e, ax_err, ax_g):
        ax.legend(fontsize=7)
    ax_e.set_title(r.name)
    save_figure(fig, path, dpi=110)
    return path
