"""Energy/force MAE and RMSE on the held-out splits, per config_type; parity plots (PNG)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from ase import Atoms

from mlipops.errors import StageInputError
from mlipops.frames import labels
from mlipops.models.baseline import add_baseline
from mlipops.models.ensemble import load_model
from mlipops.models.potential import Potential
from mlipops.params import EvaluateParams
from mlipops.paths import safe_remove
from mlipops.report import jsonable, parity_plot, write_markdown, write_metrics
from mlipops.train.loop import DATA, MODELS_DIR, load_split

REPORT_DIR = Path("reports/evaluate")


def predict_committee(model, frames: list[Atoms], forces: bool = True, batch_size: int = 16):
    """The one batched prediction of the evaluate code, float64 arrays: energies [n_frames] and their
    committee spread σ_E [n_frames] (0 for a single potential); with ``forces``, forces and σ_F (lists of
    [n_atoms, 3]), else None. The Δ-learning baseline is added to the means (it has no spread)."""
    param = next(model.parameters())
    e, se, f, sf = [], [], [], []
    with torch.set_grad_enabled(forces):
        for k in range(0, len(frames), batch_size):
            chunk = frames[k:k + batch_size]
            out = model(Potential.collate([model.graph(a) for a in chunk], param.dtype, param.device), forces=forces)
            e.append(out["energy"].detach().cpu().numpy())
            std = out.get("energy_std")
            se.append(np.zeros(len(chunk)) if std is None else std.detach().cpu().numpy())
            if forces:
                splits = np.cumsum([len(a) for a in chunk])[:-1]
                fk = out["forces"].detach().cpu().numpy()
                f += np.split(fk, splits)
                fs = out.get("forces_std")
                sf += np.split(np.zeros_like(fk) if fs is None else fs.detach().cpu().numpy(), splits)
    energies = np.concatenate(e).astype(np.float64) if e else np.zeros(0)
    sigma = np.concatenate(se).astype(np.float64) if se else np.zeros(0)
    energies, f_total = add_baseline(model, frames, energies, f if forces else [np.zeros((len(a), 3)) for a in frames])
    return energies, sigma, (f_total if forces else None), (sf if forces else None)


def predict(model, frames: list[Atoms], batch_size: int = 16) -> tuple[np.ndarray, list[np.ndarray]]:
    """Energies [n_frames] and forces (list of [n_atoms, 3]), committee means, baseline included."""
    energies, _, forces, _ = predict_committee(model, frames, True, batch_size)
    return energies, forces


def spearman(x, y) -> float:
    """Spearman rank correlation over the pairs where both are finite; NaN with fewer than 3 pairs or a
    constant side."""
    import warnings

    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(x[ok], y[ok]).statistic)


def _errors(de: np.ndarray, df: np.ndarray) -> dict[str, float]:
    return {"energy_mae_per_atom": float(np.mean(np.abs(de))), "energy_rmse_per_atom": float(np.sqrt(np.mean(de**2))),
            "force_mae": float(np.mean(np.abs(df))) if df.size else float("nan"),
            "force_rmse": float(np.sqrt(np.mean(df**2))) if df.size else float("nan")}


def split_metrics(model, frames: list[Atoms]) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Per-split and per-config_type errors; frame table and force-component table for plots."""
    e_pred, f_pred = predict(model, frames)
    rows, frows = [], []
    for a, e, f in zip(frames, e_pred, f_pred):
        e_ref, f_ref, _ = labels(a)
        n = len(a)
        rows.append({"frame_id": a.info["frame_id"], "config_type": a.info["config_type"], "n_atoms": n,
                     "e_ref_per_atom": e_ref / n, "e_pred_per_atom": e / n})
        frows.append(pd.DataFrame({"config_type": a.info["config_type"], "f_ref": f_ref.ravel(), "f_pred": f.ravel()}))
    ft = pd.DataFrame(rows)
    fc = pd.concat(frows, ignore_index=True) if frows else pd.DataFrame(columns=["config_type", "f_ref", "f_pred"])
    out: dict[str, float] = {}
    nonfinite = int((~np.isfinite(ft["e_pred_per_atom"])).sum() + (~np.isfinite(fc["f_pred"])).sum())
    out["n_nonfinite_predictions"] = nonfinite
    out["n_frames"] = len(ft)
    out |= _errors((ft.e_pred_per_atom - ft.e_ref_per_atom).to_numpy(), (fc.f_pred - fc.f_ref).to_numpy())
    groups = defaultdict(dict)
    for ct, g in ft.groupby("config_type"):
        groups[ct]["frames"] = g
    for ct, g in fc.groupby("config_type"):
        groups[ct]["forces"] = g
    for ct, g in sorted(groups.items()):
        m = _errors((g["frames"].e_pred_per_atom - g["frames"].e_ref_per_atom).to_numpy(),
                    (g["forces"].f_pred - g["forces"].f_ref).to_numpy())
        out |= {f"{ct}.{k}": v for k, v in m.items()} | {f"{ct}.n_frames": len(g["frames"])}
    return out, ft, fc


def _log_to_mlflow(run_json: Path, metrics: dict) -> None:
    from mlipops.train import tracking

    info = json.loads(run_json.read_text())
    c = tracking.client(info["tracking_uri"])
    if tracking.find_run(c, info["run_id"]) is None:  # e.g. a `dvc exp run --temp` copy: reports only
        print(f"mlipops: MLflow run {info['run_id']} ({run_json}) is not in the store {c.tracking_uri}: "
              "the metrics are in the reports only")
        return
    ts = int(time.time() * 1000)
    from mlflow.entities import Metric

    safe = {"eval_" + k.replace(".", "_"): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and np.isfinite(v)}
    batch = [Metric(k, v, ts, 0) for k, v in safe.items()]
    for k in range(0, len(batch), 500):
        c.log_batch(info["run_id"], metrics=batch[k:k + 500])


def _uncertainty(p: EvaluateParams, model, splits: dict[str, list[Atoms]]) -> dict:
    """Ensemble σ against the errors (reports/evaluate/uncertainty/); a single potential has no σ."""
    from mlipops.evaluate import uncertainty
    from mlipops.models.ensemble import Ensemble

    if not isinstance(model, Ensemble) or len(model) < 2 or not splits.get("val"):
        safe_remove(uncertainty.REPORT_DIR)
        uncertainty.REPORT_DIR.mkdir(parents=True)
        why = "no validation frames" if not splits.get("val") else "the model is not an ensemble of 2 or more members"
        uncertainty.unavailable(why)
        return {}
    return uncertainty.run(model, splits, p.uncertainty.min_spearman)


def _reaction_paths(p: EvaluateParams, model, curated: list[Atoms]) -> dict:
    """Every configured path (curated config_types and user files) followed along its coordinate;
    plots in reports/evaluate/paths/, the results in reports/evaluate/reaction_paths.json."""
    from mlipops.evaluate.reaction_path import collect_paths, evaluate_paths, read_user_path
    from mlipops.index.build import INDEX, load_hull_index

    paths = collect_paths(curated, p.paths.config_types)
    for f in p.paths.files:
        name, frames = read_user_path(f)
        if name in paths:
            raise StageInputError(f"path name {name!r} (the file stem) is also a config_type path", file=str(f),
                                  field="evaluate.paths.files")
        paths[name] = frames
    plot_dir = REPORT_DIR / "paths"
    safe_remove(plot_dir)
    plot_dir.mkdir(parents=True)
    results = evaluate_paths(model, paths, load_hull_index(INDEX) if paths else None, p.paths.tolerance_per_atom,
                             p.paths.sigma_k, plot_dir) if paths else {}
    out = {name: {"summary": r.summary(), "metrics": r.metrics(),
                  "points": {"s": r.s.tolist(), "n_atoms": r.n_atoms.tolist(), "e_ref": r.e_ref.tolist(),
                             "e_pred": r.e_pred.tolist(), "sigma": r.sigma.tolist(),
                             "max_gamma": [float(g) if np.isfinite(g) else None for g in r.max_gamma]}}
           for name, r in results.items()}
    (REPORT_DIR / "reaction_paths.json").write_text(json.dumps(jsonable(out), indent=2) + "\n")
    return results


def _provenance(model_dir: Path, model_name: str) -> None:
    """What reports/evaluate/ (metrics, reaction paths) and its uncertainty/ report were computed for: this
    model's weights and the curated data it was scored on (the promote stage checks both)."""
    from mlipops.evaluate import uncertainty
    from mlipops.frames import file_md5
    from mlipops.provenance import model_fingerprint, write_provenance

    ids = {"model_name": model_name, "model_weights_sha256": model_fingerprint(model_dir), "data_md5": file_md5(DATA)}
    write_provenance(REPORT_DIR, "evaluate", **ids)
    write_provenance(uncertainty.REPORT_DIR, "evaluate", **ids)


def run(p: EvaluateParams, model_name: str, trusted_calculators=None) -> dict:
    """``trusted_calculators``: the params' baseline calculator (:func:`mlipops.models.schema.trusted_calculators`)."""
    t0 = time.perf_counter()
    model_dir = MODELS_DIR / model_name
    if not (model_dir / "config.json").is_file():
        raise StageInputError("trained model missing: run `dvc repro train` first", file=str(model_dir))
    model = load_model(model_dir, dtype=torch.float64, trusted_calculators=trusted_calculators)
    splits = load_split()
    metrics: dict = {}
    table = []
    for split in p.splits:
        frames = splits.get(split, [])
        if not frames:
            metrics[f"{split}.n_frames"] = 0
            continue
        m, ft, fc = split_metrics(model, frames)
        metrics |= {f"{split}.{k}": v for k, v in m.items()}
        parity_plot(REPORT_DIR / f"parity_{split}_energy.png", ft.e_ref_per_atom, ft.e_pred_per_atom,
                    ft.config_type, "energy per atom", "eV/atom", f"{model_name}: {split} energies")
        parity_plot(REPORT_DIR / f"parity_{split}_forces.png", fc.f_ref, fc.f_pred, fc.config_type,
                    "force component", "eV/Å", f"{model_name}: {split} forces")
        for ct in sorted(ft.config_type.unique()):
            table.append((split, ct, m[f"{ct}.n_frames"], m[f"{ct}.energy_mae_per_atom"],
                          m[f"{ct}.energy_rmse_per_atom"],
                          m[f"{ct}.force_mae"], m[f"{ct}.force_rmse"]))
        table.append((split, "**all**", m["n_frames"], m["energy_mae_per_atom"], m["energy_rmse_per_atom"],
                      m["force_mae"], m["force_rmse"]))
    metrics["n_nonfinite_predictions"] = int(sum(v for k, v in metrics.items()
                                                 if k.endswith("n_nonfinite_predictions")))
    path_results = _reaction_paths(p, model, [a for s in splits.values() for a in s])
    unc = _uncertainty(p, model, {s: splits.get(s, []) for s in p.splits})
    for name, r in path_results.items():
        metrics |= {f"path.{name}.{k}": v for k, v in r.metrics().items()}
    metrics["wall_time_s"] = round(time.perf_counter() - t0, 2)
    write_metrics(REPORT_DIR, metrics)
    _provenance(model_dir, model_name)
    _log_to_mlflow(model_dir / "run.json", metrics | {f"uncertainty.{k}": v for k, v in unc.items()})
    plots = [f"![{s} {q}](parity_{s}_{q}.png)" for s in p.splits if metrics.get(f"{s}.n_frames")
             for q in ("energy", "forces")]
    if path_results:
        plots += ["## Reaction paths: where the model leaves its training hull",
                  f"Tolerance {1000 * p.paths.tolerance_per_atom:g} meV/atom; "
                  "the ensemble alarm is the first point where "
                  f"{p.paths.sigma_k:g} σ_E/N reaches it; γ from the index's hull (`data/index.duckdb`)."]
        for name, r in path_results.items():
            plots += [f"**{name}**: {r.summary()}", f"![{name}](paths/{name}.png)"]
    write_markdown(REPORT_DIR / "summary.md", f"Evaluation of `{model_name}`", [
        "Errors against the reference labels; energies per atom (eV/atom), forces per Cartesian component (eV/Å).",
    ], table=(("split", "config_type", "frames", "E MAE", "E RMSE", "F MAE", "F RMSE"), table), extra=plots)
    return metrics
