"""Influential outliers: a linear surrogate of the labels and its Cook's distances (statsmodels).

A wrong DFT label rarely looks wrong on its own; it looks wrong *next to its neighbours in
descriptor space*. Two linear surrogates make that precise, fitted by ordinary least squares on
the frames of the training split:

- energy, per atom:  E/N ≈ Σ_s b_s n_s/N + Σ_k w_k S_k/N,  with n_s the count of species s and
  S = Σ_i G_i the frame's summed atom-centred descriptor (the potential's and the index's own);
- forces, per Cartesian component of every atom:  F_iα ≈ −Σ_k v_k ∂S_k/∂r_iα, the force the same
  kind of linear energy model would give (the derivatives by autograd through the descriptor).

For every row statsmodels' ``OLSInfluence`` gives the leverage h (how unusual the row's
descriptor is, relative to the rest) and Cook's distance D = r² h / (p (1 − h)) (r the internally
studentized residual), which combines leverage and residual. The residual itself is measured on a
robust scale, t = e / (σ_g √(1 − h)) with σ_g = 1.4826 × the median absolute residual of the row's
config_type (:func:`robust_t`): a gross error would inflate the least-squares scale and mask
smaller ones, and a linear surrogate fits liquids worse than crystals. A frame is quarantined as
``influential_outlier`` only when D exceeds the threshold (default 4/n) *and* |t| exceeds the
residual threshold: a rare but correct configuration (a liquid frame among crystals, a strained
cell at the edge of the data) has high leverage but a small residual, which raises D without being
an error; it is kept and listed as "high leverage, consistent label".

Limits: a linear surrogate is a coarse model. Frames it cannot fit for physical reasons
(far-from-equilibrium geometries it has never seen) show up with large residuals too, which is
why only the training split is examined and the thresholds are parameters; the report gives the
numbers behind every decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from ase import Atoms

from mlipops.descriptors import AtomCentredDescriptor, frame_edges


@dataclass
class Surrogate:
    """One OLS fit and its influence measures (rows = frames or force components)."""

    y: np.ndarray
    fitted: np.ndarray
    leverage: np.ndarray
    cooks: np.ndarray
    t_external: np.ndarray
    dffit: np.ndarray  # change of the row's own prediction when the row is dropped: h e / (1 − h)
    n: int
    p: int
    rmse: float
    cols: np.ndarray | None = None  # the independent columns of x used
    beta: np.ndarray | None = None  # coefficients over ``cols``
    xtx_inv: np.ndarray | None = None  # (X'X)^-1 over ``cols``: leverage of new rows

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prediction and prediction leverage x (X'X)^-1 x' of rows not in the fit."""
        xr = x[:, self.cols]
        return xr @ self.beta, np.einsum("ij,jk,ik->i", xr, self.xtx_inv, xr)


@dataclass
class OutlierReport:
    frames: pd.DataFrame  # one row per examined frame: the decision and its numbers
    energy: Surrogate | None = None
    forces: Surrogate | None = None
    rounds: int = 0
    notes: list[str] = field(default_factory=list)


def _independent_columns(x: np.ndarray, rel_tol: float = 1e-10) -> np.ndarray:
    """Indices of a maximal set of linearly independent columns (QR with column pivoting)."""
    from scipy.linalg import qr

    if x.shape[1] == 0:
        return np.zeros(0, dtype=int)
    scale = np.linalg.norm(x, axis=0)
    xs = x / np.where(scale > 0, scale, 1.0)
    _, r, piv = qr(xs, mode="economic", pivoting=True)
    d = np.abs(np.diag(r))
    rank = int((d > rel_tol * max(d[0], 1e-300)).sum()) if len(d) else 0
    return np.sort(piv[:rank])


def ols_influence(y: np.ndarray, x: np.ndarray) -> Surrogate:
    """OLS of y on x (collinear columns dropped) with statsmodels' influence measures."""
    import statsmodels.api as sm
    from statsmodels.stats.outliers_influence import OLSInfluence

    cols = _independent_columns(x)
    xr = x[:, cols]
    res = sm.OLS(y, xr).fit()
    infl = OLSInfluence(res)
    h = infl.hat_matrix_diag
    e = res.resid
    n, p = xr.shape
    r = infl.resid_studentized_internal
    with np.errstate(divide="ignore", invalid="ignore"):
        dffit = np.where(h < 1, h * e / (1 - h), np.nan)
        # externally studentized (leave-one-out scale) from the internal one, in closed form:
        # statsmodels' resid_studentized_external refits per row, O(n²), minutes for 10⁴ force rows
        t_ext = r * np.sqrt((n - p - 1) / np.maximum(n - p - r**2, 1e-300))
    return Surrogate(y=y, fitted=res.fittedvalues, leverage=h, cooks=infl.cooks_distance[0],
                     t_external=t_ext, dffit=dffit, n=n, p=p, rmse=float(np.sqrt(np.mean(e**2))),
                     cols=cols, beta=np.asarray(res.params), xtx_inv=np.linalg.pinv(xr.T @ xr))


def design(frames: list[Atoms], species: list[str], settings: dict, forces: bool = True,
           chunk_atoms: int = 4000) -> dict[str, np.ndarray]:
    """Rows of both surrogates.

    Returns x_energy [n_frames, n_species + F] (per atom), y_energy [n_frames] (eV/atom), and with
    ``forces``: x_forces [3 N_total, F] (−∂S/∂r), y_forces [3 N_total], force_frame / force_atom /
    force_axis [3 N_total] (which frame, atom and axis each row is).
    """
    from ase.data import atomic_numbers

    from mlipops.frames import labels

    z_to_index = {atomic_numbers[s]: k for k, s in enumerate(species)}
    desc = AtomCentredDescriptor(len(species), **settings).double()
    n_feat = desc.n_features
    xe, ye, xf, yf, ff, fa, fx = [], [], [], [], [], [], []

    def flush(chunk):
        if not chunk:
            return
        sps, ii, jj, shift, pos, owner = [], [], [], [], [], []
        off = 0
        for k, a in chunk:
            sp, i, j, vec, _ = frame_edges(a.numbers, np.asarray(a.positions, np.float64), a.cell.array,
                                           a.pbc, desc.cutoff, z_to_index)
            p_ = np.asarray(a.positions, np.float64)
            sps.append(sp), ii.append(i + off), jj.append(j + off)
            shift.append(vec - (p_[j] - p_[i]))
            pos.append(p_), owner.append(np.full(len(a), len(owner)))
            off += len(a)
        pos_t = torch.tensor(np.concatenate(pos), requires_grad=forces)
        i_t, j_t = torch.from_numpy(np.concatenate(ii)), torch.from_numpy(np.concatenate(jj))
        vec = pos_t[j_t] - pos_t[i_t] + torch.from_numpy(np.concatenate(shift))
        g = desc(torch.from_numpy(np.concatenate(sps)), i_t, j_t, vec)  # [N, F]
        own = torch.from_numpy(np.concatenate(owner))
        s = g.new_zeros(len(chunk), n_feat).index_add_(0, own, g)  # per-frame summed descriptors
        for q, (k, a) in enumerate(chunk):
            counts = np.array([np.sum(a.numbers == atomic_numbers[sp]) for sp in species], float)
            e, _, _ = labels(a)
            xe.append(np.concatenate([counts, s[q].detach().numpy()]) / len(a))
            ye.append(e / len(a))
        if forces:
            # each atom moves only its own frame's S: one batched backward gives every ∂S_k/∂r_iα
            total = g.sum(0)
            jac = torch.stack([torch.autograd.grad(total[q], pos_t, retain_graph=q < n_feat - 1)[0]
                               for q in range(n_feat)])  # [F, N, 3]
            xf.append(-jac.permute(1, 2, 0).reshape(-1, n_feat).numpy())
            start = 0
            for k, a in chunk:
                _, f, _ = labels(a)
                yf.append(np.asarray(f, np.float64).reshape(-1))
                ff.append(np.full(3 * len(a), k)), fa.append(np.repeat(np.arange(len(a)), 3))
                fx.append(np.tile(np.arange(3), len(a)))
                start += len(a)

    chunk, n_chunk = [], 0
    for k, a in enumerate(frames):
        chunk.append((k, a))
        n_chunk += len(a)
        if n_chunk >= chunk_atoms:
            flush(chunk)
            chunk, n_chunk = [], 0
    flush(chunk)
    out = {"x_energy": np.array(xe).reshape(len(xe), len(species) + n_feat), "y_energy": np.array(ye, float)}
    if forces:
        out |= {"x_forces": np.concatenate(xf) if xf else np.zeros((0, n_feat)),
                "y_forces": np.concatenate(yf) if yf else np.zeros(0),
                "force_frame": np.concatenate(ff) if ff else np.zeros(0, int),
                "force_atom": np.concatenate(fa) if fa else np.zeros(0, int),
                "force_axis": np.concatenate(fx) if fx else np.zeros(0, int)}
    return out


def robust_t(residual: np.ndarray, leverage: np.ndarray, groups: np.ndarray, min_group: int = 10) -> np.ndarray:
    """Residuals in units of a robust scale: r / (σ_g √(1 − h)), σ_g = 1.4826 MAD of the residuals of
    the row's group (config_type), or of all rows for groups smaller than ``min_group``.

    Why not the OLS scale: one gross error inflates it and masks the others, and a linear
    surrogate fits some kinds of structure (liquids) much worse than others (crystals), so one
    scale for all would flag every liquid frame."""
    scale = _group_scale(residual, groups, min_group)
    sigma = np.array([scale.get(g, scale[None]) for g in groups])
    return residual / (sigma * np.sqrt(np.clip(1.0 - leverage, 1e-12, None)))


def detect(frames: list[Atoms], species: list[str], settings: dict, cooks_threshold: float | None = None,
           energy_residual_threshold: float = 12.0, force_residual_threshold: float = 25.0,
           forces: bool = True, max_rounds: int = 5) -> OutlierReport:
    """Examine ``frames`` (the training split, all labelled) and decide which are influential outliers.

    A frame is quarantined when one of its rows (its energy, or a force component of one of its
    atoms) has Cook's distance above ``cooks_threshold`` (None: 4/n, n the rows of that surrogate)
    and a robust residual (:func:`robust_t`) above the energy or force threshold.
    """
    n = len(frames)
    cts = np.array([str(a.info.get("config_type")) for a in frames], dtype=object)
    rows = pd.DataFrame({"frame": np.arange(n), "config_type": cts,
                         "frame_id": [a.info.get("frame_id") for a in frames]})
    for c in ("energy_cooks", "energy_t", "energy_leverage", "energy_residual", "energy_dffit",
              "force_cooks", "force_t", "force_residual", "force_dffit"):
        rows[c] = np.nan
    rows["force_atom"] = pd.array([pd.NA] * n, dtype="Int64")
    rows["flag_round"] = pd.array([pd.NA] * n, dtype="Int64")
    report = OutlierReport(frames=rows)
    d = design(frames, species, settings, forces=forces) if n else None
    if n <= (d["x_energy"].shape[1] + 2 if d else 0) or d is None:
        report.notes.append(f"{n} training frames are too few for the surrogate: not examined")
        rows["quarantine"], rows["kind"], rows["reason"] = False, "not examined", None
        return report
    rows["energy_flag"] = False
    rows["force_flag"] = False
    keep = np.ones(n, dtype=bool)
    for rnd in range(1, max_rounds + 1):
        # least squares is not robust: a gross error (kcal/mol energies) drags the fit and hides the
        # others, so refit without the frames already flagged until nothing new is found
        report.rounds = rnd
        idx = np.flatnonzero(keep)
        if len(idx) <= d["x_energy"].shape[1] + 2:
            report.notes.append(f"round {rnd}: {len(idx)} frames left, too few for the surrogate")
            break
        es = ols_influence(d["y_energy"][idx], d["x_energy"][idx])
        report.energy = es
        thr_e = cooks_threshold if cooks_threshold is not None else 4.0 / es.n
        t_e = robust_t(es.y - es.fitted, es.leverage, cts[idx])
        rows.loc[idx, "energy_cooks"], rows.loc[idx, "energy_t"] = es.cooks, t_e
        rows.loc[idx, "energy_leverage"] = es.leverage
        rows.loc[idx, "energy_residual"], rows.loc[idx, "energy_dffit"] = es.y - es.fitted, es.dffit
        new_e = np.zeros(n, dtype=bool)
        new_e[idx] = (es.cooks > thr_e) & (np.abs(t_e) > energy_residual_threshold)
        new_f = np.zeros(n, dtype=bool)
        if forces and len(d["y_forces"]):
            rmask = keep[d["force_frame"]]
            fs = ols_influence(d["y_forces"][rmask], d["x_forces"][rmask])
            report.forces = fs
            thr_f = cooks_threshold if cooks_threshold is not None else 4.0 / fs.n
            fr = d["force_frame"][rmask]
            t_f = robust_t(fs.y - fs.fitted, fs.leverage, cts[fr])
            score = pd.DataFrame({"frame": fr, "atom": d["force_atom"][rmask], "cooks": fs.cooks, "t": t_f,
                                  "res": fs.y - fs.fitted, "dffit": fs.dffit,
                                  "bad": (fs.cooks > thr_f) & (np.abs(t_f) > force_residual_threshold)})
            score["abs_t"] = np.abs(score.t)
            worst = score.loc[score.groupby("frame")["abs_t"].idxmax()]
            at = worst.frame.to_numpy()
            rows.loc[at, "force_cooks"] = worst.cooks.to_numpy()
            rows.loc[at, "force_t"] = worst.t.to_numpy()
            rows.loc[at, "force_residual"] = worst.res.to_numpy()
            rows.loc[at, "force_dffit"] = worst.dffit.to_numpy()
            rows.loc[at, "force_atom"] = worst.atom.to_numpy()
            new_f[np.unique(fr[score.bad.to_numpy()])] = True
        rows.loc[new_e, "energy_flag"] = True
        rows.loc[new_f, "force_flag"] = True
        new = new_e | new_f
        if not new.any():
            break
        rows.loc[new, "flag_round"] = rnd
        keep &= ~new
    _recheck(rows, d, keep, report, cts, energy_residual_threshold, force_residual_threshold)
    rows["quarantine"] = rows["energy_flag"] | rows["force_flag"]
    es = report.energy
    thr_e = cooks_threshold if cooks_threshold is not None else 4.0 / es.n
    rows["kind"] = [_kind(r, es, energy_residual_threshold, thr_e) for r in rows.itertuples()]
    rows["reason"] = [_reason(r) if r.quarantine else None for r in rows.itertuples()]
    report.frames = rows
    return report


def _group_scale(residual: np.ndarray, groups: np.ndarray, min_group: int = 10) -> dict:
    """{group: 1.4826 MAD of its residuals} for groups of at least ``min_group`` rows with a nonzero
    spread, and {None: the same over all rows} as the fallback."""
    def mad(x):
        return 1.4826 * float(np.median(np.abs(x - np.median(x)))) if len(x) else np.nan

    overall = mad(residual)
    out = {None: overall if overall > 0 else 1e-12}
    for g in pd.unique(groups):
        m = groups == g
        if m.sum() >= min_group and mad(residual[m]) > 0:
            out[g] = mad(residual[m])
    return out


def _recheck(rows: pd.DataFrame, d: dict, keep: np.ndarray, report: OutlierReport, cts: np.ndarray,
             t_e: float, t_f: float) -> None:
    """Frames flagged in an early round were judged against a fit that gross errors still dragged;
    re-judge them against the final fit (which excludes every flagged frame), as predictions with
    their prediction leverage, and release those the clean fit explains."""
    flagged = np.flatnonzero(~keep)
    if not len(flagged) or report.energy is None or report.energy.beta is None:
        return
    es = report.energy
    kept = np.flatnonzero(keep)
    scale_e = _group_scale(es.y - es.fitted, cts[kept])
    pred, h = es.predict(d["x_energy"][flagged])
    r = d["y_energy"][flagged] - pred
    sig = np.array([scale_e.get(c, scale_e[None]) for c in cts[flagged]])
    te = r / (sig * np.sqrt(1.0 + h))
    still_e = np.abs(te) > t_e
    still_f = np.zeros(len(flagged), dtype=bool)
    fs = report.forces
    if fs is not None and fs.beta is not None and "x_forces" in d:
        rmask = keep[d["force_frame"]]
        scale_f = _group_scale(fs.y - fs.fitted, cts[d["force_frame"][rmask]])
        for q, k in enumerate(flagged):
            m = d["force_frame"] == k
            pf, hf = fs.predict(d["x_forces"][m])
            sf = scale_f.get(cts[k], scale_f[None])
            tf = (d["y_forces"][m] - pf) / (sf * np.sqrt(1.0 + hf))
            still_f[q] = np.abs(tf).max(initial=0.0) > t_f
    rows.loc[flagged, "energy_flag"] = rows.loc[flagged, "energy_flag"].to_numpy() & still_e
    rows.loc[flagged, "force_flag"] = rows.loc[flagged, "force_flag"].to_numpy() & still_f


def _kind(r, es: Surrogate, t_thr: float, cooks_thr: float) -> str:
    if r.quarantine:
        return "influential_outlier"
    high_leverage = r.energy_leverage > 2.0 * es.p / es.n
    if r.energy_cooks > cooks_thr or high_leverage:
        return "high leverage, consistent label" if abs(r.energy_t) <= t_thr else "large residual, low influence"
    return "ok"


def _reason(r) -> str:
    parts = []
    if r.energy_flag:
        parts.append(f"energy {r.energy_residual:+.4f} eV/atom off the surrogate (robust t = {r.energy_t:.1f}, "
                     f"Cook's D = {r.energy_cooks:.3g}, leverage {r.energy_leverage:.3f}; dropping the frame "
                     f"moves its prediction by {r.energy_dffit:+.4f} eV/atom)")
    if r.force_flag:
        parts.append(f"force on atom {int(r.force_atom)} {r.force_residual:+.3f} eV/Å off the surrogate "
                     f"(robust t = {r.force_t:.1f}, Cook's D = {r.force_cooks:.3g}; dropping it moves the "
                     f"prediction by {r.force_dffit:+.3f} eV/Å)")
    return "; ".join(parts)
