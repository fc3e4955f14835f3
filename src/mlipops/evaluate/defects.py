"""Trained on perfect, tested on imperfect: the transfer error of a potential, diagnosed.

The experiment (``mlipops evaluate defects``, the ``defects`` stage):

1. **Perfect-only model.** A single potential (the ``train`` params' architecture, ``evaluate.defects.epochs``
   epochs) is trained on the perfect crystals only: the ``perfect_config_types`` of the train split
   (for the embedded copper: fcc, bcc, sc, diamond, hcp; for DFT data e.g. its elastic and AIMD cells),
   optionally below a
   temperature. A convex hull of its training atoms in descriptor space (the index's method,
   :mod:`mlipops.index.hull`) gives every test atom its extrapolation grade γ.
2. **Imperfect test.** It predicts the ``imperfect_config_types`` (vacancies, slabs, adatoms). Per atom:
   the force error |ΔF_i| (eV/Å), the coordination number z and the first-shell bond-angle deviation from
   the nearest ideal crystal (degrees), computed by the index's own code (``index.build.atom_rows``,
   the ``atoms`` table's columns), and γ. Per frame: |ΔE|/N (eV/atom), mean z and mean angle deviation.
3. **Diagnosis.** The force error is regressed (OLS, statsmodels) on z (categorical: any dependence on
   the coordination number, i.e. on the position along the coordination series the model saw) and on
   the angle deviation (linear + quadratic). Each factor's share of the variance is its LMG share
   (Lindeman, Merenda & Gold 1980: the R² a factor adds, averaged over both orders of entry; the two shares
   add up to the full model's R², so correlated factors are split fairly), with the F-test p-value of
   adding it last. The same on frame energies (mean z, mean angle) where there are enough frames.
4. **Conclusion and recommendation**, generated from the numbers: per imperfect config_type, its error
   relative to the perfect crystals' validation error, the dominant factor and the share of its atoms
   outside the training hull; config_types whose error is elevated are recommended, with the recipe that
   supplies what is missing: ``high_temperature_md`` (the liquid recipe) for frames hotter than any training
   crystal (judged as their own group, ``<config_type>_hot``),
   else ``rattled_vacancy`` (bulk-like atoms missing a neighbour,
   with distorted bond angles) or ``slab`` (surface-like atoms: a side of their neighbour sphere missing), from the
   worst quarter of its atoms' *vacancy equivalents* (:func:`neighbour_asymmetry`). The first shell alone
   cannot tell the two apart for every lattice (a diamond atom next to a vacancy and a diamond (111) surface
   atom both lose 1 of 4 bonds), so the measure looks at every neighbour within the descriptor cutoff: the
   cutoff-weighted mean of the unit vectors to them, |Σ_j w_j r̂_ij| / Σ_j w_j, is 0 in a bulk crystal, small
   next to a vacancy and ≈ 0.3–0.5 at a surface; divided by its value for a neighbour of one vacancy in the
   lowest-energy perfect training cell (same cutoff), it counts vacancies' worth of missing neighbours. Measured
   on built cells (:mod:`mlipops.crystal`, ``tests/test_defects.py``), cutoff 5 Å: neighbours of a vacancy
   (rattled by 0.08 Å) 0.9–1.1 (fcc 1.13, bcc 0.98, diamond 0.95, hcp 0.90); surface atoms of 6-layer slabs,
   fcc (100)/(110)/(111) 5.1/6.2/4.6, bcc 4.8/3.7/6.0, diamond 3.0/2.2/2.0, hcp (0001) 3.2 (6 Å: all ≥ 3.7).
   A worst-quarter median above :data:`VACANCY_LIKE` = 1.6 is surface-like. At a 4 Å cutoff diamond (110)
   and (111) surface atoms (1.05, 1.04) look like vacancy neighbours: the cutoff must reach well past the second
   shell (Si: 3.8 Å). The first-shell deficit as a fraction of the bulk coordination, (z_bulk − z)/z_bulk, is
   reported beside it (``worst_quarter_median_z_deficit_fraction``).
5. **Control.** The perfect-only model is retrained with the recommended structures added and the same
   test is repeated: the error must drop where the diagnosis said. ``control: recipes`` generates
   them with the dataset's oracle (``generate.oracle``) from the data's own crystal (:func:`mlipops.crystal.resolve`:
   the ``crystal`` params, their nulls from the training frames) at the oracle's lattice constant: rattled
   vacancy cells, rattled slabs (:func:`control_slab_millers`; hcp: basal and prism planes), the liquid recipe;
   new structures, not the test frames. An oracle that cannot compute the element stops the stage before
   any training, in one line naming ``evaluate.defects.control``; ``held_out`` (real DFT data, no
   oracle) splits the imperfect frames in two by content hash, adds one half of the recommended
   config_types to training and tests on the other half.

Outputs: ``reports/evaluate/defects/{metrics.json, summary.md, defects.json, *.png}``; the promote stage
copies ``defects.json`` and the plots next to the registered model.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from ase import Atoms

from mlipops.crystal import NN_PER_A, Crystal, resolve, unit_cell
from mlipops.errors import MlipopsError, StageInputError
from mlipops.evaluate.predict import predict, spearman
from mlipops.frames import frame_id, labels
from mlipops.params import CrystalParams, DefectParams, DescriptorParams, GenerateParams, IndexParams, TrainParams
from mlipops.pipeline import ACCEPTED as DATA, DEFECTS_REPORTS as REPORT_DIR, FIT_KEYS

ELEVATED = 2.0  # an imperfect config_type whose force MAE exceeds ELEVATED x the perfect validation MAE ...
OUTSIDE = 0.2  # ... or with more than this share of atoms outside the hull needs more data
VACANCY_LIKE = 1.6  # worst-quarter median vacancy equivalents up to this: vacancy-like, above: surface-like
HOTTER_K = 200.0  # a test frame this much hotter than the hottest perfect training frame is "hotter than training"


def group_of(a: Atoms, t_hot: float) -> str:
    """The frame's diagnosis group: its config_type, with ``_hot`` when it is hotter than ``t_hot`` (K), so that
    e.g. molten AIMD vacancy cells are judged apart from the cold ones."""
    ct = str(a.info.get("config_type"))
    t = a.info.get("temperature_K")
    return f"{ct}_hot" if t is not None and float(t) > t_hot else ct
MIN_ATOMS_FIT = 12  # fewer atoms (rows) than this: no regression
MIN_FRAMES_FIT = 5


# ----------------------------------------------------------------------------------------- data
def _hash_half(a: Atoms) -> bool:
    """A deterministic coin from the frame's content hash (the held-out control's split)."""
    fid = a.info.get("frame_id") or frame_id(a)
    return int(hashlib.sha256(fid.encode()).hexdigest()[:8], 16) % 2 == 0


@dataclass
class Sets:
    train: list[Atoms]
    val: list[Atoms]
    test: list[Atoms]
    pool: list[Atoms] = field(default_factory=list)  # held_out control: imperfect frames that may join training


def select(frames: list[Atoms], p: DefectParams) -> Sets:
    """Perfect train/val (from each frame's ``split`` when present, else 9:1 by content hash), imperfect
    test (and the held-out control's pool)."""
    perfect, imperfect = set(p.perfect_config_types), set(p.imperfect_config_types)
    if perfect & imperfect:
        raise MlipopsError(f"config_types both perfect and imperfect: {sorted(perfect & imperfect)}",
                           field="evaluate.defects")
    s = Sets([], [], [])
    for a in frames:
        ct = a.info.get("config_type")
        if ct in perfect:
            t = a.info.get("temperature_K")
            if p.perfect_max_temperature_K is not None and t is not None and float(t) > p.perfect_max_temperature_K:
                continue
            split = a.info.get("split")
            if split is None:
                fid = a.info.get("frame_id") or frame_id(a)
                split = "val" if int(hashlib.sha256(fid.encode()).hexdigest()[8:16], 16) % 10 == 0 else "train"
            if split == "train":
                s.train.append(a)
            elif split == "val":
                s.val.append(a)
        elif ct in imperfect:
            (s.pool if p.control == "held_out" and not _hash_half(a) else s.test).append(a)
    if not s.train:
        raise StageInputError(f"no perfect training frames (config_types {sorted(perfect)})",
                              field="evaluate.defects.perfect_config_types")
    if not s.test:
        raise StageInputError(f"no imperfect test frames (config_types {sorted(imperfect)})",
                              field="evaluate.defects.imperfect_config_types")
    return s


def hull_of(frames: list[Atoms], species: list[str], descriptor: dict, k: int):
    """The convex hull (index method) of the atoms of ``frames``."""
    from mlipops.descriptors import compute_descriptors
    from mlipops.index.hull import fit_hull_index

    g, _ = compute_descriptors(frames, species, descriptor)
    symbols = np.concatenate([a.get_chemical_symbols() for a in frames])
    return fit_hull_index(symbols, g, np.ones(len(symbols), bool), species, descriptor, min(k, 6))


def full_coordination(frames: list[Atoms], coordination_cutoff: float) -> int:
    """The bulk coordination number of the training crystals (99th percentile of their atoms' z)."""
    from mlipops.index.build import atom_rows

    z = np.concatenate([atom_rows(a, coordination_cutoff)["coordination"].to_numpy() for a in frames])
    return int(np.percentile(z, 99))


def neighbour_asymmetry(atoms: Atoms, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Per atom: (|Σ_j w_j r̂_ij| / Σ_j w_j, the number of neighbours within ``cutoff``), w the cosine cutoff
    0.5 (1 + cos(π r/cutoff)). 0 in a perfect crystal (complete shells cancel), ≈ w_1/W for an atom that lost
    one nearest neighbour (a vacancy), ≈ 0.3–0.5 for a surface atom (half its sphere empty); 0 without neighbours."""
    from mlipops.descriptors import neighbor_list

    i, j, S, d = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    keep = d > 0
    i, j, S, d = i[keep], j[keep], S[keep], d[keep]
    w = 0.5 * (1.0 + np.cos(np.pi * d / cutoff))
    u = (atoms.positions[j] - atoms.positions[i] + S @ atoms.cell.array) * (w / d)[:, None]
    n = len(atoms)
    s = np.stack([np.bincount(i, weights=u[:, k], minlength=n) for k in range(3)], axis=1)
    wsum = np.bincount(i, weights=w, minlength=n)
    asym = np.divide(np.linalg.norm(s, axis=1), wsum, out=np.zeros(n), where=wsum > 0)
    return asym, np.bincount(i, minlength=n)


def vacancy_asymmetry(frames: list[Atoms], cutoff: float) -> float:
    """:func:`neighbour_asymmetry` of the neighbours of one vacancy (atoms within 1.1 x the nearest distance of
    the removed site) in the lowest-energy fully periodic frame of ``frames`` (the perfect training crystals),
    repeated until the vacancy does not see its images; nan when no such frame exists."""
    cells = [a for a in frames if a.pbc.all() and a.cell.rank == 3 and labels(a)[0] is not None and len(a) > 0]
    if not cells:
        return float("nan")
    a = min(cells, key=lambda x: labels(x)[0] / len(x))
    a = Atoms(a.numbers, positions=a.positions, cell=a.cell, pbc=True)
    heights = a.cell.volume / np.linalg.norm(np.cross(a.cell[[1, 2, 0]], a.cell[[2, 0, 1]]), axis=1)
    a = a.repeat([max(1, math.ceil(2.0 * cutoff / h) + 1) for h in heights])
    site = a.positions[0].copy()
    del a[0]
    from ase.geometry import get_distances

    d = get_distances(site[None], a.positions, cell=a.cell, pbc=True)[1][0]
    first = d <= 1.1 * d.min()
    return float(np.median(neighbour_asymmetry(a, cutoff)[0][first]))


def atom_table(frames: list[Atoms], e_pred: np.ndarray, f_pred: list[np.ndarray], hull, coordination_cutoff: float,
               z_full: int, t_hot: float = float("inf"),
               vacancy_ref: float = float("nan")) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-atom (force error, z, z deficit from the training crystals' bulk z and as a fraction of it, angle
    deviation, neighbours within the descriptor cutoff, their asymmetry and vacancy equivalents (asymmetry /
    ``vacancy_ref``, :func:`vacancy_asymmetry`), γ) and per-frame (energy error, means) tables."""
    from mlipops.descriptors import compute_descriptors
    from mlipops.index.build import atom_rows

    g, unseen = compute_descriptors(frames, hull.species, hull.descriptor)
    symbols = np.concatenate([a.get_chemical_symbols() for a in frames])
    ev = hull.evaluate(symbols, g, unseen)
    rows, frows = [], []
    for k, (a, e, f) in enumerate(zip(frames, e_pred, f_pred)):
        e_ref, f_ref, _ = labels(a)
        if e_ref is None or f_ref is None:
            raise StageInputError("an imperfect test frame has no energy/forces", frame=k, field="energy")
        geo = atom_rows(a, coordination_cutoff)
        asym, n_within = neighbour_asymmetry(a, float(hull.descriptor["cutoff"]))
        rows.append(pd.DataFrame({
            "frame": k, "config_type": group_of(a, t_hot), "species": geo["species"].to_numpy(),
            "z": geo["coordination"].to_numpy(), "angle_deviation": geo["bond_angle_deviation"].to_numpy(float),
            "nearest_crystal": geo["nearest_crystal"].to_numpy(),
            "z_deficit": z_full - geo["coordination"].to_numpy(),
            "z_deficit_fraction": (z_full - geo["coordination"].to_numpy()) / max(z_full, 1),
            "n_within_cutoff": n_within, "asymmetry": asym, "vacancy_equivalents": asym / vacancy_ref,
            "force_error": np.linalg.norm(np.asarray(f) - f_ref, axis=1)}))
        t = a.info.get("temperature_K")
        rows[-1]["temperature_K"] = np.nan if t is None else float(t)
        frows.append({"frame": k, "config_type": group_of(a, t_hot), "n_atoms": len(a),
                      "energy_error_per_atom": abs(float(e) - e_ref) / len(a)})
    at = pd.concat(rows, ignore_index=True)
    at["gamma"] = ev["extrapolation_grade"]
    at["inside_hull"] = ev["inside_hull"]
    fr = pd.DataFrame(frows)
    agg = at.groupby("frame").agg(mean_z=("z", "mean"), mean_angle_deviation=("angle_deviation", "mean"),
                                  fraction_outside_hull=("inside_hull", lambda x: 1.0 - x.mean()),
                                  max_gamma=("gamma", "max"))
    return at, fr.join(agg, on="frame")


# ------------------------------------------------------------------------------------ diagnosis
def _r2(y: np.ndarray, X: np.ndarray):
    import warnings

    import statsmodels.api as sm

    with warnings.catch_warnings():  # collinear z levels: the pseudo-inverse fit is still the least-squares R²
        warnings.simplefilter("ignore")
        return sm.OLS(y, sm.add_constant(X, has_constant="add")).fit()


def lmg_two(y: np.ndarray, X_z: np.ndarray, X_a: np.ndarray) -> dict:
    """Shares of the variance of ``y`` explained by the two groups of regressors (LMG, averaged over
    both orders of entry), the full R² and the F-test p-value of each group added last."""
    full, z_only, a_only = _r2(y, np.hstack([X_z, X_a])), _r2(y, X_z), _r2(y, X_a)
    r2f, r2z, r2a = (max(m.rsquared, 0.0) if np.isfinite(m.rsquared) else 0.0 for m in (full, z_only, a_only))
    share_z = 0.5 * (r2z + (r2f - r2a))
    share_a = 0.5 * (r2a + (r2f - r2z))

    def p_added(small) -> float:
        try:
            if full.df_model <= small.df_model:
                return float("nan")
            return float(full.compare_f_test(small)[1])
        except (ValueError, np.linalg.LinAlgError, ZeroDivisionError):
            return float("nan")

    return {"r2_full": r2f, "r2_z_only": r2z, "r2_angle_only": r2a, "share_z": max(share_z, 0.0),
            "share_angle": max(share_a, 0.0), "p_z_added_last": p_added(a_only), "p_angle_added_last": p_added(z_only),
            "n": int(len(y))}


def _z_design(z: np.ndarray) -> np.ndarray:
    levels = np.unique(z)
    return np.stack([(z == v).astype(float) for v in levels[1:]], axis=1) if len(levels) > 1 else np.zeros((len(z), 0))


def _angle_design(a: np.ndarray) -> np.ndarray:
    s = a.std() or 1.0
    x = (a - a.mean()) / s
    return np.stack([x, x * x], axis=1)


def decompose_atoms(at: pd.DataFrame) -> dict:
    """Force error explained by z (categorical) vs angle deviation (quadratic), LMG shares."""
    ok = at.dropna(subset=["angle_deviation"])
    out = {"n_atoms": int(len(at)), "n_atoms_without_angle": int(len(at) - len(ok))}
    if len(ok) < MIN_ATOMS_FIT or ok.force_error.var() == 0:
        return out | {"r2_full": float("nan"), "share_z": float("nan"), "share_angle": float("nan")}
    y = ok.force_error.to_numpy(float)
    Xz, Xa = _z_design(ok.z.to_numpy()), _angle_design(ok.angle_deviation.to_numpy(float))
    res = lmg_two(y, Xz, Xa)
    # what the first shell cannot see: the neighbour count within the descriptor cutoff (2nd, 3rd shells)
    Xn = _angle_design(ok.n_within_cutoff.to_numpy(float))
    r2n = _r2(y, np.hstack([Xz, Xa, Xn])).rsquared if ok.n_within_cutoff.std() > 0 else res["r2_full"]
    return out | res | {"r2_gain_beyond_first_shell": max(float(r2n) - res["r2_full"], 0.0)}


def decompose_frames(fr: pd.DataFrame) -> dict:
    ok = fr.dropna(subset=["mean_angle_deviation"])
    if len(ok) < MIN_FRAMES_FIT or ok.energy_error_per_atom.var() == 0:
        return {"n": int(len(ok)), "r2_full": float("nan"), "share_z": float("nan"), "share_angle": float("nan")}
    return lmg_two(ok.energy_error_per_atom.to_numpy(float), ok[["mean_z"]].to_numpy(float),
                   ok[["mean_angle_deviation"]].to_numpy(float))


def diagnose(at: pd.DataFrame, fr: pd.DataFrame) -> dict[str, dict]:
    """Per group (``all`` and each config_type, hot frames apart: :func:`group_of`): errors, hull statistics
    and the decomposition."""
    out = {}
    groups = [("all", at, fr)] + [(ct, at[at.config_type == ct], fr[fr.config_type == ct])
                                  for ct in sorted(at.config_type.unique())]
    for name, a, f in groups:
        worst = a.force_error >= a.force_error.quantile(0.75)
        g = {"n_frames": int(len(f)), "n_atoms": int(len(a)),
             "force_mae_atom": float(a.force_error.mean()),  # mean |ΔF_i| (vector norm), eV/Å
             "energy_mae_per_atom": float(f.energy_error_per_atom.mean()),
             "fraction_outside_hull": float(1.0 - a.inside_hull.mean()),
             "fraction_outside_hull_worst_quarter": float(1.0 - a.inside_hull[worst].mean()),
             "force_error_inside_hull": (float(a.force_error[a.inside_hull].mean()) if a.inside_hull.any()
                                         else float("nan")),
             "force_error_outside_hull": (float(a.force_error[~a.inside_hull].mean()) if (~a.inside_hull).any()
                                          else float("nan")),
             "spearman_force_error_gamma": spearman(np.where(np.isinf(a.gamma), 1e300, a.gamma), a.force_error),
             "mean_z": float(a.z.mean()), "mean_angle_deviation": float(a.angle_deviation.mean()),
             "worst_quarter_median_z_deficit": float(np.nanmedian(a.z_deficit[worst])) if worst.any() else float("nan"),
             "worst_quarter_median_z_deficit_fraction": (float(np.nanmedian(a.z_deficit_fraction[worst]))
                                                         if worst.any() else float("nan")),
             "worst_quarter_median_vacancy_equivalents": (float(np.nanmedian(a.vacancy_equivalents[worst]))
                                                          if worst.any() and a.vacancy_equivalents[worst].notna().any()
                                                          else float("nan")),
             "hot": bool(name.endswith("_hot")),
             "atoms": decompose_atoms(a)}
        if name == "all":
            g["frames"] = decompose_frames(f)
        out[name] = g
    return out


def dominant(d: dict) -> str | None:
    """``angle``, ``z`` or ``outer_shells`` (the neighbour count within the cutoff adds more than either
    first-shell factor); None when nothing explains the error."""
    sz, sa = d["atoms"].get("share_z"), d["atoms"].get("share_angle")
    if sz is None or sa is None or not (np.isfinite(sz) and np.isfinite(sa)):
        return None
    outer = d["atoms"].get("r2_gain_beyond_first_shell", 0.0)
    if outer > max(sz, sa) and outer >= 0.1:
        return "outer_shells"
    if sz + sa < 0.05:
        return None
    return "angle" if sa >= sz else "z"


def recommend(diag: dict[str, dict], perfect_force_mae: float) -> list[dict]:
    """Config_types that need data, with the recipe that supplies what the diagnosis says is missing."""
    recs = []
    for ct, d in diag.items():
        if ct == "all":
            continue
        ratio = d["force_mae_atom"] / perfect_force_mae if perfect_force_mae > 0 else float("inf")
        if ratio < ELEVATED and d["fraction_outside_hull"] <= OUTSIDE:
            continue
        dom = dominant(d)
        # frames hotter than any training crystal: hot MD (the liquid recipe); else bulk-like atoms with a
        # neighbour missing need vacancy cells, surface-like atoms (a side of the sphere empty) slabs; without a
        # vacancy reference (no periodic training cell), the first-shell deficit: up to a quarter of z is vacancy-like
        if d.get("hot"):
            recipe = "high_temperature_md"
        else:
            veq = d.get("worst_quarter_median_vacancy_equivalents", float("nan"))
            vacancy_like = (veq <= VACANCY_LIKE if np.isfinite(veq)
                            else d.get("worst_quarter_median_z_deficit_fraction", 1.0) <= 0.25)
            recipe = "rattled_vacancy" if vacancy_like else "slab"
        why = (f"force error {ratio:.1f}x the perfect crystals', {100 * d['fraction_outside_hull']:.0f} % of its atoms "
               f"outside the training hull; " + {"angle": "bond-angle distortion dominates",
                                                  "z": "missing neighbours (low z) dominate",
                                                  "outer_shells": "neighbours missing beyond the first shell dominate",
                                                  None: "neither z nor angles explain it (add it as is)"}[dom]
               + ("; its frames are hotter than any training crystal" if d.get("hot") else ""))
        recs.append({"config_type": ct, "recipe": recipe, "dominant_factor": dom, "error_ratio": ratio, "reason": why})
    return sorted(recs, key=lambda r: -r["error_ratio"])


def _pct(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.0f} %"


def conclusion(diag: dict[str, dict], perfect_force_mae: float, recs: list[dict]) -> list[str]:
    """The diagnosis in words, generated from the numbers."""
    lines = []
    for ct, d in diag.items():
        if ct == "all":
            continue
        at = d["atoms"]
        dom = dominant(d)
        lines.append(
            f"**{ct}**: force error {d['force_mae_atom']:.3f} eV/Å per atom "
            f"({d['force_mae_atom'] / perfect_force_mae:.1f}x the perfect crystals'), energy "
            f"{1000 * d['energy_mae_per_atom']:.1f} meV/atom. "
            f"Bond-angle deviation explains {_pct(at.get('share_angle'))} of the force-error variance, coordination "
            f"{_pct(at.get('share_z'))} (together {_pct(at.get('r2_full'))}); "
            f"{_pct(d['fraction_outside_hull'])} of its atoms lie outside the training hull "
            f"({_pct(d['fraction_outside_hull_worst_quarter'])} of its worst quarter)."
            + (" The error comes mainly from " + {
                "angle": "angular distortion the perfect crystals never showed.",
                "z": "coordination numbers between or below those seen.",
                "outer_shells": "neighbours missing beyond the first shell "
                                "(a surface or vacancy within the cutoff)."}[dom]
               if dom else "")
            + (f" Another {_pct(at['r2_gain_beyond_first_shell'])} is explained by the number of neighbours within the "
               "descriptor cutoff: "
               "atoms whose first shell is complete but whose outer shells are cut by a surface or vacancy."
               if at.get("r2_gain_beyond_first_shell", 0) >= 0.1 else ""))
    a = diag["all"]
    lines.append(
        f"**All imperfect atoms**: {_pct(a['atoms'].get('share_angle'))} of the force-error variance is explained by "
        f"bond-angle deviation and {_pct(a['atoms'].get('share_z'))} by coordination; atoms outside the hull have "
        f"{a['force_error_outside_hull']:.3f} eV/Å mean error vs {a['force_error_inside_hull']:.3f} inside "
        f"(Spearman ρ(error, γ) = {a['spearman_force_error_gamma']:.2f}).")
    if recs:
        lines.append("**Recommended additions**: " + "; ".join(
            f"`{r['recipe']}` for `{r['config_type']}` ({r['reason']})" for r in recs) + ".")
    else:
        lines.append("**No additions recommended**: every imperfect config_type is within "
                     f"{ELEVATED:g}x the perfect crystals' error and mostly inside the hull.")
    return lines


# ------------------------------------------------------------------------------------- control
CONTROL_REMEDY = ("set evaluate.defects.control: held_out (half of the data's own imperfect frames join training) "
                  "or name an oracle that can")


def control_oracle(g: GenerateParams, cr: Crystal):
    """The oracle of ``control: recipes`` (``generate.oracle``), checked on ``cr``'s element: one line naming
    ``evaluate.defects.control`` (exit 2) when it cannot compute it."""
    from mlipops.oracles import get_oracle, require_element

    oracle = get_oracle(g.oracle.calculator, g.oracle.kwargs)
    require_element(oracle, cr.element, probe=unit_cell(cr), field="evaluate.defects.control",
                    what="the control's oracle", remedy=CONTROL_REMEDY)
    return oracle


HCP_CONTROL_SLABS = ("0001", "100", "010")  # basal and the two prism planes of the orthorhombic hcp cell


def control_slab_millers(p: DefectParams, g: GenerateParams, lattice: str) -> list[str]:
    """The control's slab orientations: ``evaluate.defects.control_slab_millers``, else for hcp its basal and
    two prism planes (:data:`HCP_CONTROL_SLABS`), else ``generate.defects.slabs`` (the cubic low-index set)."""
    if p.control_slab_millers is not None:
        return list(p.control_slab_millers)
    return list(HCP_CONTROL_SLABS) if lattice == "hcp" else list(g.defects.slabs)


def control_recipes(recipes: set[str], p: DefectParams, g: GenerateParams, cr: Crystal) -> list[Atoms]:
    """New labelled structures for the recommended recipes, from the dataset's oracle, built from the data's
    crystal ``cr`` at the oracle's own lattice constant: vacancy cells (``generate.defects.vacancy_supercell``
    conventional cells), slabs (:func:`control_slab_millers`, ``generate.defects.slab_size`` [nx, ny, layers],
    ``vacuum``: :func:`mlipops.crystal.slab`), the liquid recipe (``generate.liquid``, started at the crystal's
    density)."""
    from mlipops.crystal import a_from_volume, rattle, slab, vacancy_cell
    from mlipops.generate.recipes import equilibrium_nn_distance

    oracle = control_oracle(g, cr)
    rng = np.random.default_rng(p.control_seed)
    nn = equilibrium_nn_distance(cr.element, cr.lattice, oracle)  # the oracle's own, as generate's crystals
    co = cr.with_a(nn / NN_PER_A[cr.lattice], source=f"{oracle.name}'s equilibrium")
    out = []
    if "rattled_vacancy" in recipes:
        for _ in range(p.control_vacancy_cells):
            v = rattle(vacancy_cell(co, g.defects.vacancy_supercell, rng), p.control_rattle_stdev, rng)
            v.info["config_type"] = "control_rattled_vacancy"
            out.append(v)
    if "high_temperature_md" in recipes:
        from mlipops.generate.recipes import liquid

        cell = unit_cell(co)  # the recipe starts from fcc at the crystal's density
        a_fcc = co.a if co.lattice == "fcc" else a_from_volume("fcc", cell.get_volume() / len(cell))
        # the oracle's own MD, with generate.liquid's settings (the recipe reads those and the element only)
        for a in liquid(GenerateParams(element=cr.element, liquid=g.liquid), oracle, a_fcc, rng):
            a.info["config_type"] = "control_high_temperature_md"
            out.append(a)
    if "slab" in recipes:
        size = g.defects.slab_size
        for hkl in control_slab_millers(p, g, co.lattice):
            base = slab(co, hkl, size[2], size[:2], g.defects.vacuum)
            for _ in range(p.control_slabs):
                s = rattle(base.copy(), p.control_rattle_stdev, rng)
                s.info["config_type"] = f"control_slab_{hkl}"
                out.append(s)
    return oracle.label(out)


def _train(train: list[Atoms], val: list[Atoms], species: list[str], p: DefectParams, tp: TrainParams,
           d: DescriptorParams, what: str = "perfect-only"):
    from mlipops.report import progress
    from mlipops.train.loop import fit

    # the train keys that change a fitted model (the stage's declared params), where it runs, and this study's
    # epochs; no curriculum (mlipops.pipeline.FIT_KEYS, UNTRACKED)
    q = TrainParams(**{k: getattr(tp, k) for k in (*FIT_KEYS, "device", "precompute_descriptors")},
                    epochs=p.epochs)
    import torch

    # one thread: torch's multi-threaded float32 kernels sum in an order that depends on the thread count (and
    # varied from run to run: the study's numbers moved at 1e-6, on mlearn Mo 1e-3); single-threaded the fit is
    # the same bits on every machine, and on these small models barely slower (measured: 4.7-4.9 s vs 4.4-4.9 s
    # for 15 epochs of the embedded data's perfect crystals)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with progress(f"defects: training the {what} potential (epochs)", p.epochs) as advance:
            return fit(train, val, q, d, species=species,
                       progress_cb=lambda epoch, row: advance(completed=epoch)).model
    finally:
        torch.set_num_threads(threads)


def _predict(model, frames):
    """Energies and forces in float64 (the Δ-learning baseline added back)."""
    import torch

    return predict(model.to(dtype=torch.float64), frames)


@dataclass
class DefectReport:
    diagnosis: dict
    recommendations: list[dict]
    conclusion: list[str]
    perfect_val_force_mae_atom: float
    control: dict
    atoms: pd.DataFrame
    frames: pd.DataFrame
    control_atoms: pd.DataFrame | None
    timings: dict

    def metrics(self) -> dict:
        m = {"perfect_val_force_mae_atom": self.perfect_val_force_mae_atom, "n_recommended": len(self.recommendations)}
        for ct, d in self.diagnosis.items():
            for k in ("force_mae_atom", "energy_mae_per_atom", "fraction_outside_hull", "spearman_force_error_gamma"):
                m[f"{ct}.{k}"] = d[k]
            for k in ("share_z", "share_angle", "r2_full", "r2_gain_beyond_first_shell"):
                m[f"{ct}.{k}"] = d["atoms"].get(k)
        for k, v in self.control.items():
            if isinstance(v, (int, float)):
                m[f"control.{k}"] = v
        return m | {f"time.{k}": v for k, v in self.timings.items()}

    def to_json(self) -> dict:
        return {"diagnosis": self.diagnosis, "recommendations": self.recommendations, "conclusion": self.conclusion,
                "perfect_val_force_mae_atom": self.perfect_val_force_mae_atom, "control": self.control}


def _perfect_force_mae(model, val: list[Atoms]) -> float:
    if not val:
        return float("nan")
    _, f = _predict(model, val)
    return float(np.mean([np.linalg.norm(fp - labels(a)[1], axis=1).mean() for a, fp in zip(val, f)]))


def _control(s: Sets, p: DefectParams, tp: TrainParams, d: DescriptorParams, ip: IndexParams,
             g: GenerateParams | None, crystal: Crystal | None, species: list[str], diag: dict, recs: list[dict],
             z_full: int, t_hot: float, vac_ref: float) -> tuple[dict, pd.DataFrame | None, list[str]]:
    """The control: the perfect-only model retrained with the recommended structures added (built by the
    oracle from the crystal, ``recipes``, or taken from the held-out pool, ``held_out``), the test set diagnosed
    again. Returns the control's numbers, its atom table (None when skipped) and its sentence for the
    conclusion."""
    words: list[str] = []
    descriptor = d.model_dump()
    control: dict = {"mode": p.control}
    control_at = None
    added: list[Atoms] = []
    if p.control == "recipes" and recs:
        added = control_recipes({r["recipe"] for r in recs}, p, g, crystal)
    elif p.control == "held_out" and recs:
        want = {r["config_type"] for r in recs}
        added = [a for a in s.pool if group_of(a, t_hot) in want]
    if added:
        model2 = _train(s.train + added, s.val, species, p, tp, d, "control")
        hull2 = hull_of(s.train + added, species, descriptor, ip.pca_components)
        e2, f2 = _predict(model2, s.test)
        control_at, fr2 = atom_table(s.test, e2, f2, hull2, ip.coordination_cutoff, z_full, t_hot, vac_ref)
        diag2 = diagnose(control_at, fr2)
        if crystal is not None and p.control == "recipes":
            control["crystal"] = {"element": crystal.element, "lattice": crystal.lattice, "source": crystal.source}
        control |= {"n_added_frames": len(added), "n_added_atoms": int(sum(len(a) for a in added)),
                    "added_config_types": sorted({group_of(a, t_hot) for a in added}),
                    "perfect_val_force_mae_atom_after": _perfect_force_mae(model2, s.val or s.train),
                    "per_config_type": {ct: {
                        "force_mae_atom_before": diag[ct]["force_mae_atom"],
                        "force_mae_atom_after": diag2[ct]["force_mae_atom"],
                        "energy_mae_per_atom_before": diag[ct]["energy_mae_per_atom"],
                        "energy_mae_per_atom_after": diag2[ct]["energy_mae_per_atom"],
                        "fraction_outside_hull_before": diag[ct]["fraction_outside_hull"],
                        "fraction_outside_hull_after": diag2[ct]["fraction_outside_hull"]} for ct in diag}}
        b, a_ = diag["all"], diag2["all"]
        control |= {"force_mae_atom_before": b["force_mae_atom"], "force_mae_atom_after": a_["force_mae_atom"],
                    "force_error_drop": 1.0 - a_["force_mae_atom"] / b["force_mae_atom"],
                    "energy_mae_per_atom_before": b["energy_mae_per_atom"],
                    "energy_mae_per_atom_after": a_["energy_mae_per_atom"],
                    "energy_error_drop": 1.0 - a_["energy_mae_per_atom"] / b["energy_mae_per_atom"]
                    if b["energy_mae_per_atom"] > 0 else float("nan")}
        words.append(f"**Control**: retrained with {len(added)} added frames "
                     f"({', '.join(control['added_config_types'])}): "
                     f"imperfect force error {b['force_mae_atom']:.3f} → {a_['force_mae_atom']:.3f} eV/Å "
                     f"({_pct(control['force_error_drop'])} lower), energy {1000 * b['energy_mae_per_atom']:.1f} → "
                     f"{1000 * a_['energy_mae_per_atom']:.1f} meV/atom; atoms outside the hull "
                     f"{_pct(b['fraction_outside_hull'])} → {_pct(a_['fraction_outside_hull'])}.")
    else:
        control["skipped"] = ("control disabled" if p.control == "none" else "nothing recommended" if not recs
                              else "no frames of the recommended config_types in the held-out pool")
    return control, control_at, words


def transfer(frames: list[Atoms], p: DefectParams, tp: TrainParams, d: DescriptorParams, ip: IndexParams,
             g: GenerateParams | None = None, cp: CrystalParams | None = None) -> DefectReport:
    """The whole experiment on labelled frames: train perfect-only, diagnose, recommend, control. ``cp``: the
    crystal params (``control: recipes`` builds from :func:`mlipops.crystal.resolve` of them and the
    training frames; its oracle is checked on the element before any training)."""
    from mlipops.train.loop import species_of

    t0 = time.perf_counter()
    s = select(frames, p)
    crystal = None
    if p.control == "recipes":
        if g is None:
            raise MlipopsError("control: recipes needs the generate params (element, oracle)",
                               field="evaluate.defects.control")
        crystal = resolve(cp or CrystalParams(), (a for a in frames if str(a.info.get("split", "train")) == "train"))
        control_oracle(g, crystal)  # fail now, not after training
    species = species_of(s.train + s.val + s.test + s.pool)
    descriptor = d.model_dump()
    model = _train(s.train, s.val, species, p, tp, d)
    t_train = time.perf_counter()
    hull = hull_of(s.train, species, descriptor, ip.pca_components)
    e, f = _predict(model, s.test)
    z_full = full_coordination(s.train, ip.coordination_cutoff)
    temps = [float(a.info["temperature_K"]) for a in s.train if a.info.get("temperature_K") is not None]
    t_max = max(temps, default=0.0)  # 0 K: static crystals
    t_hot = t_max + HOTTER_K
    vac_ref = vacancy_asymmetry(s.train, float(d.cutoff))
    at, fr = atom_table(s.test, e, f, hull, ip.coordination_cutoff, z_full, t_hot, vac_ref)
    perfect_mae = _perfect_force_mae(model, s.val or s.train)
    diag = diagnose(at, fr)
    diag["all"] |= {"bulk_z": z_full, "perfect_max_temperature_K": t_max, "vacancy_neighbour_asymmetry": vac_ref}
    recs = recommend(diag, perfect_mae)
    words = conclusion(diag, perfect_mae, recs)
    t_diag = time.perf_counter()
    control, control_at, control_words = _control(s, p, tp, d, ip, g, crystal, species, diag, recs, z_full, t_hot,
                                                  vac_ref)
    words += control_words
    t_end = time.perf_counter()
    timings = {"train_s": round(t_train - t0, 1), "diagnose_s": round(t_diag - t_train, 1),
               "control_s": round(t_end - t_diag, 1)}
    return DefectReport(diag, recs, words, perfect_mae, control, at, fr, control_at, timings)


# ---------------------------------------------------------------------------------------- plots
def plot_geometry(at: pd.DataFrame, path: Path) -> Path:
    from mlipops.report import pyplot, save_figure

    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    cts = sorted(at.config_type.unique())
    colours = {ct: plt.cm.tab10(k % 10) for k, ct in enumerate(cts)}
    rng = np.random.default_rng(0)
    for ct in cts:
        a = at[at.config_type == ct]
        for inside, marker in ((True, "o"), (False, "x")):
            b = a[a.inside_hull == inside]
            if len(b):
                ax1.scatter(b.z + rng.uniform(-0.25, 0.25, len(b)), b.force_error, s=9, marker=marker,
                            color=colours[ct], alpha=0.6, label=f"{ct} ({'in' if inside else 'out of'} hull)")
                ax2.scatter(b.angle_deviation, b.force_error, s=9, marker=marker, color=colours[ct], alpha=0.6)
    ax1.set_xlabel("coordination number z")
    ax2.set_xlabel("bond-angle deviation from the nearest crystal (degrees)")
    for ax in (ax1, ax2):
        ax.set_ylabel("|ΔF_i| (eV/Å)")
        ax.set_yscale("log")
    ax1.legend(fontsize=6, ncol=2)
    fig.suptitle("Perfect-only model on imperfect atoms: force error vs coordination and bond angles")
    save_figure(fig, path, dpi=110)
    return path


def plot_decomposition(diag: dict, control: dict, path: Path) -> Path:
    from mlipops.report import pyplot, save_figure

    plt = pyplot()

    names = list(diag)
    sz = [diag[n]["atoms"].get("share_z", np.nan) for n in names]
    sa = [diag[n]["atoms"].get("share_angle", np.nan) for n in names]
    rest = [1 - (np.nan_to_num(z) + np.nan_to_num(a)) for z, a in zip(sz, sa)]
    fig, axes = plt.subplots(1, 2 if "per_config_type" in control else 1, figsize=(11, 4.2), squeeze=False)
    ax = axes[0, 0]
    x = np.arange(len(names))
    ax.bar(x, np.nan_to_num(sz), label="coordination z")
    ax.bar(x, np.nan_to_num(sa), bottom=np.nan_to_num(sz), label="bond-angle deviation")
    ax.bar(x, rest, bottom=np.nan_to_num(sz) + np.nan_to_num(sa), color="lightgrey", label="unexplained")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("share of force-error variance")
    ax.legend(fontsize=8)
    ax.set_title("What explains the error (LMG shares)")
    if "per_config_type" in control:
        ax = axes[0, 1]
        pc = control["per_config_type"]
        before = [pc[n]["force_mae_atom_before"] for n in names]
        after = [pc[n]["force_mae_atom_after"] for n in names]
        ax.bar(x - 0.2, before, 0.4, label="perfect only")
        ax.bar(x + 0.2, after, 0.4, label="+ recommended structures")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylabel("mean |ΔF_i| (eV/Å)")
        ax.legend(fontsize=8)
        ax.set_title("Control: error before and after adding the recommendation")
    save_figure(fig, path, dpi=110)
    return path


def write_report(rep: DefectReport, out_dir: Path, title: str) -> dict:
    from mlipops.report import jsonable, md_table, write_markdown, write_metrics

    out_dir.mkdir(parents=True, exist_ok=True)
    plot_geometry(rep.atoms, out_dir / "force_error_vs_geometry.png")
    plot_decomposition(rep.diagnosis, rep.control, out_dir / "decomposition.png")
    metrics = rep.metrics()
    write_metrics(out_dir, metrics)
    (out_dir / "defects.json").write_text(json.dumps(jsonable(rep.to_json()), indent=2) + "\n")
    rows = [(ct, d["n_frames"], d["n_atoms"], d["force_mae_atom"], 1000 * d["energy_mae_per_atom"],
             d["atoms"].get("share_z"), d["atoms"].get("share_angle"), d["atoms"].get("r2_full"),
             d["fraction_outside_hull"]) for ct, d in rep.diagnosis.items()]
    extra = [md_table(("config_type", "frames", "atoms", "mean |ΔF_i| (eV/Å)", "E MAE (meV/atom)", "share z",
                       "share angle", "R²", "outside hull"), rows)]
    pc = rep.control.get("per_config_type")
    if pc:
        extra += ["## Control", md_table(("config_type", "|ΔF| before", "|ΔF| after", "E before (meV/atom)",
                                          "E after (meV/atom)", "outside hull before", "after"),
                                         [(ct, v["force_mae_atom_before"], v["force_mae_atom_after"],
                                           1000 * v["energy_mae_per_atom_before"],
                                           1000 * v["energy_mae_per_atom_after"],
                                           v["fraction_outside_hull_before"], v["fraction_outside_hull_after"])
                                          for ct, v in pc.items()])]
    extra += ["![force error vs geometry](force_error_vs_geometry.png)", "![decomposition](decomposition.png)"]
    write_markdown(out_dir / "summary.md", title, [
        "A single potential trained on perfect crystals only, tested on imperfect structures. "
        f"Perfect-crystal validation error: {rep.perfect_val_force_mae_atom:.4f} eV/Å (mean |ΔF_i|). "
        "Shares: LMG decomposition of the per-atom force-error variance between coordination number "
        "(categorical) and bond-angle deviation (quadratic); hull: the perfect training atoms' descriptor hull.",
        *rep.conclusion], extra=extra)
    return metrics


def run(params, data: list[Path] | None = None, out_dir: Path = REPORT_DIR) -> dict:
    """The ``defects`` stage: the curated data (or ``data`` files, e.g. real DFT sets) through
    :func:`transfer`; reports in ``out_dir``."""
    from mlipops.frames import read_extxyz

    paths = list(data) if data else [DATA]
    frames = []
    for path in paths:
        if not Path(path).is_file():
            raise StageInputError("data file missing" + (": run `dvc repro validate` first" if not data else ""),
                                  file=str(path))
        fr, rejected = read_extxyz(path)
        if rejected:
            raise StageInputError(f"{len(rejected)} unreadable frame(s); first: {rejected[0].reason}", file=str(path))
        frames += fr
    p = params.evaluate.defects
    rep = transfer(frames, p, params.train, params.descriptors, params.index, params.generate, params.crystal)
    metrics = write_report(rep, Path(out_dir), "Perfect → imperfect transfer: " + ", ".join(str(x) for x in paths))
    from mlipops.frames import file_md5
    from mlipops.provenance import write_provenance

    # about the architecture, not the promoted weights: the model judged here is trained by this stage itself
    write_provenance(out_dir, "defects", model_name=None, model_weights_sha256=None, applies_to="architecture",
                     data_md5=",".join(file_md5(x) for x in paths), data=[str(x) for x in paths],
                     architecture={"hidden": list(params.train.hidden), "descriptors": params.descriptors.model_dump()})
    log_to_mlflow(params, metrics, paths, Path(out_dir))
    return metrics


def log_to_mlflow(params, metrics: dict, data: list[Path], out_dir: Path) -> str:
    """One MLflow run per study (tag ``stage=defects``): its settings, numbers and report files."""
    from mlflow.entities import Metric, Param, RunTag

    from mlipops.frames import file_md5
    from mlipops.params import flatten
    from mlipops import tracking

    t = params.train
    c = tracking.client(t.tracking_uri)
    exp = tracking.experiment_id(t.tracking_uri, t.experiment, t.artifact_location)
    run = c.create_run(exp, run_name="defects-transfer", tags={
        "mlipops.stage": "defects", "git.commit": tracking.git_commit(),
        "data": ", ".join(str(x) for x in data), "data.md5": ", ".join(file_md5(x) for x in data)})
    ts = int(time.time() * 1000)
    settings = flatten(params.evaluate.defects, "defects.") | {f"train.{k}": getattr(t, k)
                                                               for k in ("seed", "hidden", "learning_rate")}
    batch = [Metric(k.replace(".", "_"), float(v), ts, 0) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    c.log_batch(run.info.run_id, metrics=batch[:1000], params=[Param(k, str(v)[:6000]) for k, v in settings.items()],
                tags=[RunTag("mlipops.n_recommended", str(metrics.get("n_recommended")))])
    c.log_artifacts(run.info.run_id, str(out_dir), artifact_path="defects")
    c.set_terminated(run.info.run_id)
    return run.info.run_id
