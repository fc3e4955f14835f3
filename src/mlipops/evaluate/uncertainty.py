"""Does the ensemble's spread σ know when the model is wrong? Ranking, calibration, recalibration.

On the validation and test splits, overall and per ``config_type``, for energies (per frame, per atom:
σ_E/N against |E_model − E_ref|/N) and forces (per atom: ‖σ_F,i‖ against ‖ΔF_i‖ for the ranking, per
Cartesian component for the calibration):

- **Spearman ρ(σ, |error|)**: does σ rank the errors? A committee whose σ does not rank its errors
  (ρ below ``evaluate.uncertainty.min_spearman`` on validation forces) fails the promotion gate.
- **Calibration curve**: for expected coverage p, the observed fraction of errors inside ±z_p σ with
  z_p = Φ⁻¹((1 + p)/2) (a Gaussian error model N(0, σ²)); **miscalibration area** ∫₀¹ |obs(p) − p| dp
  (trapezoid on 99 points, 0 for perfect calibration, at most 0.5).
- **NLL**: mean Gaussian negative log-likelihood ½ ln(2πσ²) + err²/(2σ²).
- **Recalibration**: one scale factor per quantity, s² = ⟨err²/σ²⟩ on the validation split, the
  minimiser of the NLL over σ → sσ. It is reported with the test metrics before and after, stored in
  ``uncertainty.json`` next to the promoted model, and applied by ``MlipopsCalculator`` to ``energy_std``
  and ``forces_std``.

σ is floored at the resolution of the labels and of float32 inference (``SIGMA_FLOOR``: 1e-4 eV/atom,
1e-3 eV/Å) inside the NLL and the scale fit, so a zero spread cannot produce an infinite likelihood; the
ranking and coverage use σ as it is. Components where the committee is *blind* (σ below the floor while
the error is more than ten times it: e.g. a dimer stretched beyond the cutoff, where every member predicts
exactly zero force) are counted separately (``*_n_blind``): no recalibration can fix them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from ase import Atoms

from mlipops.evaluate.predict import predict_committee, spearman
from mlipops.frames import labels
from mlipops.pipeline import UNCERTAINTY_REPORTS as REPORT_DIR

P_GRID = np.linspace(0.01, 0.99, 99)
SIGMA_FLOOR = {"energy": 1e-4, "force": 1e-3}  # eV/atom, eV/Å


def tables(model, frames: list[Atoms]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-frame energy table and per-atom force table (errors, σ, config_type)."""
    e, se, f, sf = predict_committee(model, frames)
    rows, arows = [], []
    for a, ei, sei, fi, sfi in zip(frames, e, se, f, sf):
        e_ref, f_ref, _ = labels(a)
        n = len(a)
        ct = a.info.get("config_type")
        rows.append({"config_type": ct, "err": (ei - e_ref) / n, "sigma": sei / n})
        arows.append(pd.DataFrame({"config_type": ct, "err_vec": list(fi - f_ref), "sigma_vec": list(sfi)}))
    return pd.DataFrame(rows), pd.concat(arows, ignore_index=True)


def calibration_curve(err: np.ndarray, sigma: np.ndarray, p: np.ndarray = P_GRID) -> np.ndarray:
    """Observed fraction of |err| ≤ z_p σ for each expected coverage p."""
    from scipy.stats import norm

    z = norm.ppf(0.5 * (1.0 + p))
    ratio = np.abs(err) / np.where(sigma > 0, sigma, np.inf)
    ratio = np.where(sigma > 0, ratio, np.where(err == 0, 0.0, np.inf))
    return (ratio[None, :] <= z[:, None]).mean(axis=1)


def miscalibration_area(observed: np.ndarray, p: np.ndarray = P_GRID) -> float:
    """∫₀¹ |obs(p) − p| dp, the curve closed with (0, 0) and (1, 1)."""
    x = np.concatenate([[0.0], p, [1.0]])
    y = np.abs(np.concatenate([[0.0], observed, [1.0]]) - x)
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


def nll(err: np.ndarray, sigma: np.ndarray, floor: float = 0.0) -> float:
    s = np.maximum(sigma, floor) if floor > 0 else sigma
    return float(np.mean(0.5 * np.log(2 * np.pi * s**2) + err**2 / (2 * s**2)))


def fit_scale(err: np.ndarray, sigma: np.ndarray, floor: float = 0.0) -> float:
    """s minimising the Gaussian NLL of (err, sσ): s² = ⟨err²/σ²⟩."""
    if not err.size:
        return 1.0
    s = np.maximum(sigma, floor) if floor > 0 else sigma
    return float(np.sqrt(np.mean(err**2 / s**2)))


def _quantities(ft: pd.DataFrame, at: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(ranking |err|, ranking σ, calibration err, calibration σ) for energy and forces."""
    ev = np.stack(at.err_vec.to_numpy()) if len(at) else np.zeros((0, 3))  # [n_atoms, 3]
    sv = np.stack(at.sigma_vec.to_numpy()) if len(at) else np.zeros((0, 3))
    return {"energy": (np.abs(ft.err.to_numpy()), ft.sigma.to_numpy(), ft.err.to_numpy(), ft.sigma.to_numpy()),
            "force": (np.linalg.norm(ev, axis=1), np.linalg.norm(sv, axis=1), ev.ravel(), sv.ravel())}


def group_metrics(ft: pd.DataFrame, at: pd.DataFrame, scale: dict[str, float] | None = None) -> dict[str, float]:
    out = {}
    for q, (rank_err, rank_sig, err, sig) in _quantities(ft, at).items():
        s = (scale or {}).get(q, 1.0)
        obs = calibration_curve(err, s * sig)
        floor = SIGMA_FLOOR[q]
        out |= {f"{q}_spearman": spearman(rank_sig, rank_err), f"{q}_miscalibration_area": miscalibration_area(obs),
                f"{q}_nll": nll(err, s * sig, floor),
                f"{q}_coverage_1sigma": float(calibration_curve(err, s * sig, np.array([0.6827]))[0]),
                f"{q}_n": int(err.size), f"{q}_n_blind": int(((sig < floor) & (np.abs(err) > 10 * floor)).sum())}
    return out


def analyse(model, splits: dict[str, list[Atoms]], fit_split: str = "val") -> dict:
    """Everything the report needs: per split and config_type, before and after recalibration."""
    data = {name: tables(model, frames) for name, frames in splits.items() if frames}
    if fit_split not in data:
        raise ValueError(f"no {fit_split} frames to fit the recalibration on")
    q = _quantities(*data[fit_split])
    scale = {name: fit_scale(v[2], v[3], SIGMA_FLOOR[name]) for name, v in q.items()}
    out = {"scale": scale, "fit_split": fit_split, "metrics": {}, "curves": {}}
    for name, (ft, at) in data.items():
        for ct, ft_g, at_g in [("all", ft, at)] + [(c, ft[ft.config_type == c], at[at.config_type == c])
                                                  for c in sorted(ft.config_type.unique())]:
            before, after = group_metrics(ft_g, at_g), group_metrics(ft_g, at_g, scale)
            out["metrics"] |= {f"{name}.{ct}.{k}": v for k, v in before.items()}
            out["metrics"] |= {f"{name}.{ct}.{k}_recalibrated": v for k, v in after.items()
                               if "spearman" not in k and not k.endswith(("_n", "_n_blind"))}
        quant = _quantities(ft, at)
        out["curves"][name] = {qn: {"p": P_GRID.tolist(), "observed": calibration_curve(v[2], v[3]).tolist(),
                                    "observed_recalibrated": calibration_curve(v[2], scale[qn] * v[3]).tolist()}
                               for qn, v in quant.items()}
        out.setdefault("_points", {})[name] = quant
    return out


def plot(result: dict, report_dir: Path) -> list[Path]:
    from mlipops.report import pyplot

    plt = pyplot()

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, (q, unit) in zip(axes, (("energy", "eV/atom"), ("force", "eV/Å"))):
        for split, quant in result["_points"].items():
            rank_err, rank_sig = quant[q][0], quant[q][1]
            m = (rank_err > 0) & (rank_sig > 0)
            rho = result["metrics"].get(f"{split}.all.{q}_spearman", float("nan"))
            ax.loglog(rank_sig[m], rank_err[m], ".", ms=3, alpha=0.5, label=f"{split} (ρ = {rho:.2f})")
        lim = ax.get_xlim()
        ax.plot(lim, lim, "k--", lw=0.8, label="|error| = σ")
        ax.set_xlabel(f"ensemble σ ({unit})")
        ax.set_ylabel(f"|error| ({unit})")
        ax.set_title("energies (per frame, per atom)" if q == "energy" else "forces (per atom, norm)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(report_dir / "sigma_vs_error.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, q in zip(axes, ("energy", "force")):
        for split, curves in result["curves"].items():
            c = curves[q]
            ax.plot(c["p"], c["observed"], label=f"{split}, raw σ")
            ax.plot(c["p"], c["observed_recalibrated"], "--", label=f"{split}, σ × {result['scale'][q]:.2f}")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfect calibration")
        ax.set_xlabel("expected coverage of ±z σ (Gaussian)")
        ax.set_ylabel("observed coverage")
        ax.set_title(f"{q}: calibration before/after (scale fitted on {result['fit_split']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(report_dir / "calibration.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def run(model, splits: dict[str, list[Atoms]], min_spearman: float, report_dir: Path = REPORT_DIR) -> dict:
    """Write reports/evaluate/uncertainty/{metrics.json, uncertainty.json, *.png, summary.md}; returns metrics."""
    from mlipops.report import jsonable, write_markdown, write_metrics

    report_dir.mkdir(parents=True, exist_ok=True)
    res = analyse(model, splits)
    rho = res["metrics"].get("val.all.force_spearman", float("nan"))
    passed = bool(np.isfinite(rho) and rho >= min_spearman)
    metrics = dict(res["metrics"]) | {"scale.energy": res["scale"]["energy"], "scale.force": res["scale"]["force"],
                                      "gate.min_spearman": min_spearman, "gate.passed": int(passed)}
    write_metrics(report_dir, metrics)
    doc = {"format": "mlipops.uncertainty/1",
           "scale": {"energy": res["scale"]["energy"], "forces": res["scale"]["force"]},
           "fit_split": res["fit_split"], "gate": {"metric": "val.all.force_spearman", "value": rho,
                                                   "min": min_spearman, "passed": passed},
           "metrics": res["metrics"], "curves": res["curves"]}
    (report_dir / "uncertainty.json").write_text(json.dumps(jsonable(doc), indent=1) + "\n")
    plot(res, report_dir)
    rows = []
    for split in res["curves"]:
        cts = sorted({k.split(".")[1] for k in res["metrics"] if k.startswith(f"{split}.")})
        for ct in cts:
            g = lambda k: res["metrics"].get(f"{split}.{ct}.{k}", float("nan"))  # noqa: E731
            rows.append((split, ct, g("energy_spearman"), g("force_spearman"), g("force_miscalibration_area"),
                         g("force_miscalibration_area_recalibrated"), g("force_nll"), g("force_nll_recalibrated"),
                         g("force_coverage_1sigma"), g("force_coverage_1sigma_recalibrated")))
    write_markdown(report_dir / "summary.md", "Ensemble uncertainty: ranking and calibration", [
        f"Recalibration fitted on `{res['fit_split']}`: σ_E × {res['scale']['energy']:.3f}, "
        f"σ_F × {res['scale']['force']:.3f} "
        "(stored in `uncertainty.json`, applied by `MlipopsCalculator` to `energy_std` / `forces_std`).",
        f"Gate: Spearman ρ(σ_F, |ΔF|) on validation = {rho:.3f}, minimum {min_spearman:g}: "
        + ("**passed**." if passed else "**FAILED**: σ does not rank the errors."),
    ], table=(("split", "config_type", "ρ energy", "ρ force", "F miscal. area", "after", "F NLL", "after",
               "F 1σ coverage", "after"), rows),
        extra=["![σ vs error](sigma_vs_error.png)", "![calibration](calibration.png)"])
    return metrics


def unavailable(reason: str, report_dir: Path = REPORT_DIR) -> None:
    """The same files, saying why there is no uncertainty report (the promotion gate then fails)."""
    from mlipops.report import pyplot

    plt = pyplot()

    from mlipops.report import write_markdown, write_metrics

    report_dir.mkdir(parents=True, exist_ok=True)
    write_metrics(report_dir, {"available": 0, "gate.passed": 0})
    (report_dir / "uncertainty.json").write_text(json.dumps({
        "format": "mlipops.uncertainty/1", "available": False, "reason": reason,
        "gate": {"metric": "val.all.force_spearman", "value": None, "passed": False}}, indent=1) + "\n")
    for name in ("sigma_vs_error.png", "calibration.png"):
        fig = plt.figure(figsize=(6, 1.5))
        fig.text(0.5, 0.5, f"no uncertainty report: {reason}", ha="center", va="center")
        fig.savefig(report_dir / name, dpi=80)
        plt.close(fig)
    write_markdown(report_dir / "summary.md", "Ensemble uncertainty: not available",
                   [f"No uncertainty report: {reason}. Promotion requires one."])
