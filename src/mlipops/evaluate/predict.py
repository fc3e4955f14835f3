"""The committee's predictions on frames and their errors against the labels: the one batched prediction
of the evaluation code (:func:`predict_committee`), per-split and per-config_type MAE/RMSE
(:func:`split_metrics`), and Spearman's rank correlation. A library: the evaluate, defects, melting and
uncertainty code and the benchmarks use it."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd
import torch
from ase import Atoms

from mlipops.frames import labels
from mlipops.models.baseline import add_baseline
from mlipops.models.potential import Potential


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


def errors(de: np.ndarray, df: np.ndarray) -> dict[str, float]:
    """MAE and RMSE of per-atom energy errors ``de`` (eV/atom) and force-component errors ``df`` (eV/Å)."""
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
    out |= errors((ft.e_pred_per_atom - ft.e_ref_per_atom).to_numpy(), (fc.f_pred - fc.f_ref).to_numpy())
    groups = defaultdict(dict)
    for ct, g in ft.groupby("config_type"):
        groups[ct]["frames"] = g
    for ct, g in fc.groupby("config_type"):
        groups[ct]["forces"] = g
    for ct, g in sorted(groups.items()):
        m = errors((g["frames"].e_pred_per_atom - g["frames"].e_ref_per_atom).to_numpy(),
                    (g["forces"].f_pred - g["forces"].f_ref).to_numpy())
        out |= {f"{ct}.{k}": v for k, v in m.items()} | {f"{ct}.n_frames": len(g["frames"])}
    return out, ft, fc
