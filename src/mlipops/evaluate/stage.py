"""The ``evaluate`` stage: energy/force MAE and RMSE on the held-out splits, per config_type, parity plots (PNG),
the reaction paths followed to the training hull's exit point, and the ensemble's uncertainty
(``reports/evaluate/``). The prediction and error code is :mod:`mlipops.evaluate.predict`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from mlipops import tracking
from mlipops.errors import StageInputError
from mlipops.evaluate.predict import errors, split_metrics
from mlipops.frames import load_split
from mlipops.models.ensemble import load_model
from mlipops.params import EvaluateParams
from mlipops.paths import safe_remove
from mlipops.pipeline import (ACCEPTED, EVALUATE_REPORTS as REPORT_DIR, INDEX, MODELS_DIR, PARITY_COLUMNS,
                              PARITY_CSV_DIR, PATHS_JSON, PATHS_REPORTS, UNCERTAINTY_REPORTS)
from mlipops.report import jsonable, parity_plot, write_csv, write_markdown, write_metrics


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
    from mlipops.index.build import load_hull_index

    paths = collect_paths(curated, p.paths.config_types)
    for f in p.paths.files:
        name, frames = read_user_path(f)
        if name in paths:
            raise StageInputError(f"path name {name!r} (the file stem) is also a config_type path", file=str(f),
                                  field="evaluate.paths.files")
        paths[name] = frames
    plot_dir = PATHS_REPORTS
    safe_remove(plot_dir)
    plot_dir.mkdir(parents=True)
    results = evaluate_paths(model, paths, load_hull_index(INDEX) if paths else None, p.paths.tolerance_per_atom,
                             p.paths.sigma_k, plot_dir) if paths else {}
    out = {name: {"summary": r.summary(), "metrics": r.metrics(),
                  "points": {"s": r.s.tolist(), "n_atoms": r.n_atoms.tolist(), "e_ref": r.e_ref.tolist(),
                             "e_pred": r.e_pred.tolist(), "sigma": r.sigma.tolist(),
                             "max_gamma": [float(g) if np.isfinite(g) else None for g in r.max_gamma]}}
           for name, r in results.items()}
    PATHS_JSON.write_text(json.dumps(jsonable(out), indent=2) + "\n")
    return results


def _provenance(model_dir: Path, model_name: str) -> None:
    """What reports/evaluate/ (metrics, reaction paths) and its uncertainty/ report were computed for: this
    model's weights and the curated data it was scored on (the promote stage checks both)."""
    from mlipops.evaluate import uncertainty
    from mlipops.frames import file_md5
    from mlipops.provenance import model_fingerprint, write_provenance

    ids = {"model_name": model_name, "model_weights_sha256": model_fingerprint(model_dir),
           "data_md5": file_md5(ACCEPTED)}
    write_provenance(REPORT_DIR, "evaluate", **ids)
    write_provenance(uncertainty.REPORT_DIR, "evaluate", **ids)


def without_paths(ft, fc, path_types) -> dict:
    """The split's errors without its reaction-path frames (``evaluate.paths.config_types``: followed out of the
    training hull on purpose, so their errors grow without bound and would dominate the split's MAE), under
    ``without_paths.``: the test error a user compares between models (the headline). No path frames: the same
    numbers as the whole split."""
    keep_f, keep_c = ~ft.config_type.isin(list(path_types)), ~fc.config_type.isin(list(path_types))
    if not keep_f.any():
        return {"without_paths.n_frames": 0}
    f, c = ft[keep_f], fc[keep_c]
    m = errors((f.e_pred_per_atom - f.e_ref_per_atom).to_numpy(), (c.f_pred - c.f_ref).to_numpy())
    return {f"without_paths.{k}": v for k, v in m.items()} | {"without_paths.n_frames": int(keep_f.sum())}


MAX_PARITY_FORCES = 4000  # force components per parity CSV: every k-th, so a DVC plot stays light


def parity_csv(split: str, e_ref, e_pred, e_ct, f_ref, f_pred, f_ct) -> list[Path]:
    """The parity data of a split as the CSVs of the DVC plots ``parity_<split>_energy|forces``
    (mlipops.pipeline.DATA_PLOTS), with the config_type of each point: every frame's energy per atom, and every
    k-th force component (k = ceil(n / MAX_PARITY_FORCES), the same components in two commits of the same data,
    so ``dvc plots diff`` overlays like with like)."""
    f_ref, f_pred, f_ct = np.asarray(f_ref), np.asarray(f_pred), np.asarray(f_ct)
    k = max(1, -(-len(f_ref) // MAX_PARITY_FORCES))
    out = []
    for q, (ref, pred, ct) in (("energy", (np.asarray(e_ref), np.asarray(e_pred), np.asarray(e_ct))),
                               ("forces", (f_ref[::k], f_pred[::k], f_ct[::k]))):
        cols = dict(zip(PARITY_COLUMNS[q], (ref, pred))) | {"config_type": ct}
        out.append(write_csv(PARITY_CSV_DIR / f"{split}_{q}.csv", cols))
    return out


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
            parity_csv(split, [], [], [], [], [], [])  # a DVC plot of no points, not a missing output
            continue
        m, ft, fc = split_metrics(model, frames)
        m |= without_paths(ft, fc, p.paths.config_types)
        metrics |= {f"{split}.{k}": v for k, v in m.items()}
        parity_plot(REPORT_DIR / f"parity_{split}_energy.png", ft.e_ref_per_atom, ft.e_pred_per_atom,
                    ft.config_type, "energy per atom", "eV/atom", f"{model_name}: {split} energies")
        parity_plot(REPORT_DIR / f"parity_{split}_forces.png", fc.f_ref, fc.f_pred, fc.config_type,
                    "force component", "eV/Å", f"{model_name}: {split} forces")
        parity_csv(split, ft.e_ref_per_atom, ft.e_pred_per_atom, ft.config_type, fc.f_ref, fc.f_pred, fc.config_type)
        for ct in sorted(ft.config_type.unique()):
            table.append((split, ct, m[f"{ct}.n_frames"], m[f"{ct}.energy_mae_per_atom"],
                          m[f"{ct}.energy_rmse_per_atom"],
                          m[f"{ct}.force_mae"], m[f"{ct}.force_rmse"]))
        table.append((split, "**all**", m["n_frames"], m["energy_mae_per_atom"], m["energy_rmse_per_atom"],
                      m["force_mae"], m["force_rmse"]))
        if 0 < m["without_paths.n_frames"] < m["n_frames"]:
            table.append((split, "**all but the reaction paths** (headline)", m["without_paths.n_frames"],
                          *(m[f"without_paths.{k}"] for k in ("energy_mae_per_atom", "energy_rmse_per_atom",
                                                              "force_mae", "force_rmse"))))
    metrics["n_nonfinite_predictions"] = int(sum(v for k, v in metrics.items()
                                                 if k.endswith("n_nonfinite_predictions")))
    path_results = _reaction_paths(p, model, [a for s in splits.values() for a in s])
    unc = _uncertainty(p, model, {s: splits.get(s, []) for s in p.splits})
    for name, r in path_results.items():
        metrics |= {f"path.{name}.{k}": v for k, v in r.metrics().items()}
    metrics["wall_time_s"] = round(time.perf_counter() - t0, 2)
    write_metrics(REPORT_DIR, metrics)
    _provenance(model_dir, model_name)
    tracking.log_metrics(model_dir / "run.json", metrics | {f"uncertainty.{k}": v for k, v in unc.items()})
    tracking.log_headline(model_dir / "run.json", {REPORT_DIR / "metrics.json": metrics,
                                                   UNCERTAINTY_REPORTS / "metrics.json": unc})
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
