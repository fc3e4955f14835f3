"""The melting point of each ensemble member against the reference oracle's (:mod:`melting_reference`).

``mlipops evaluate melting`` (stage ``melting``) runs every ensemble member (``MlipopsCalculator`` over that one
member's potential) for ``member_seeds`` seeds, all runs in parallel through Dask (``compute``), and reports:

- per member: Tm (mean over its accepted seeds) and its statistical error (the combined standard error of
  :func:`mlipops.evaluate.melting.summarize`: seed scatter and within-run block error);
- the ensemble: mean and standard deviation (ddof 1) of the members' Tm, and the combined distribution, an
  equal-weight mixture of N(Tm_k, err_k² + err_ref²) (the reference's own error widens every component), from
  which P(|Tm − Tm_ref| ≤ ``window_K``) is exact (:func:`~mlipops.evaluate.melting.prob_within`);
- the bias's significance (:func:`bias_significance`, the promotion gate): |Tm_mean − Tm_ref| against
  max(``window_K``, 2 × its combined standard error);
- the cause: each member's energy error on the reference's solid and liquid snapshots at Tm_ref, δ_k =
  ⟨ΔE/N⟩_liquid − ⟨ΔE/N⟩_solid, predicts its bias δ_k / ΔS_m (see ``phase_properties``), set against the
  measured Tm_k − Tm_ref;
- coverage: the fraction of the index's liquid test atoms inside the training hull (SQL on
  ``data/index.duckdb``), and the fraction of the Tm snapshots' atoms inside it (γ ≤ 1, ``check_structures``).

Against a given reference (``evaluate.melting.reference``: a value, its standard uncertainty and source) the bias,
P and the gate metrics use that value and uncertainty (with infinitely many degrees of freedom); the energy cause
needs the reference's own energies of a solid and a liquid at Tm and reads "n/a: given reference". In its place
the model's own pure solid and liquid at the given Tm_ref (:func:`model_phases`) give the Tm snapshots' coverage
of the training hull (does the bias trace to missing data?) and the latent heat and ΔV of the pressure
systematic. Element and lattice come from :func:`~mlipops.evaluate.melting_reference.melting_crystal`,
as the reference's; a reference.json made for another crystal is refused.

Reports in ``reports/evaluate/melting/`` (``melting_point.json``, ``metrics.json``, ``summary.md``, the traces and
distribution plots); metrics ``melting.*`` on the model's MLflow run (``eval_melting_*``). The promote stage
copies the JSON and the plots next to the registered model.

``mlipops evaluate melting-sweep`` links coverage to the property: one ``dvc exp run`` per
``evaluate.melting.sweep.fractions`` value of ``ingest.split.keep_in_train.<config_type>`` (liquid frames removed,
a few, all), then Tm bias and spread against liquid coverage (``reports/evaluate/melting_sweep/``).
"""

from __future__ import annotations

import logging
import json
import math
import time
from pathlib import Path

import numpy as np
from ase import Atoms

from mlipops.errors import MlipopsError, StageInputError
from mlipops.evaluate.melting import CoexistenceRun, plot_traces, prob_within, summarize
from mlipops.evaluate.melting_reference import (PHASES, REFERENCE_JSON, MemberFactory, _run_from_json, _stats,
                                                coexistence_specs, melting_crystal, pressure_systematic, run_many)
from mlipops.params import Params
from mlipops.paths import safe_remove
from mlipops.report import jsonable, write_markdown, write_metrics
from mlipops.pipeline import INDEX, MELTING_REPORTS as REPORT_DIR, MELTING_SWEEP_REPORTS as SWEEP_DIR, MODELS_DIR



# ------------------------------------------------------------------------------------------ members
def read_reference() -> dict:
    if not REFERENCE_JSON.is_file():
        raise StageInputError("reference melting point missing: run `dvc repro melting_reference` first",
                              file=str(REFERENCE_JSON))
    try:
        return json.loads(REFERENCE_JSON.read_text())
    except json.JSONDecodeError as exc:
        raise StageInputError(f"unreadable: {exc}", file=str(REFERENCE_JSON)) from None

logger = logging.getLogger(__name__)


def phase_errors(model, frames: list[Atoms]) -> list[dict]:
    """Per member: the mean energy error per atom on the solid and the liquid snapshots at Tm_ref (eV/atom)."""
    from mlipops.evaluate.predict import predict_committee
    from mlipops.models.ensemble import Ensemble

    members = list(model.members) if isinstance(model, Ensemble) else [model]
    e_ref = np.array([a.get_potential_energy() for a in frames])
    n = np.array([len(a) for a in frames], dtype=float)
    ct = np.array([a.info.get("config_type") for a in frames])
    out = []
    for mem in members:
        e, _, _, _ = predict_committee(mem, frames, forces=False)
        err = (e - e_ref) / n
        out.append({ph: float(err[ct == f"melting_{ph}"].mean()) if (ct == f"melting_{ph}").any() else float("nan")
                    for ph in ("solid", "liquid")})
    return out


def liquid_coverage(index_path: Path, config_type: str = "liquid") -> dict:
    """From the index: the fraction of ``config_type`` test atoms inside the training hull (the test split does
    not change with ``keep_in_train``), and the number of its training frames."""
    from mlipops.index.build import query

    if not Path(index_path).is_file():
        return {"liquid_coverage": None, "n_liquid_train_frames": None}
    ct = config_type.replace("'", "''")
    df = query(f"""SELECT avg(CASE WHEN inside_hull THEN 1.0 ELSE 0.0 END) AS inside, count(*) AS n
                   FROM atoms WHERE config_type = '{ct}' AND split = 'test'""", index_path)
    nt = query(f"SELECT count(*) AS n FROM frames WHERE config_type = '{ct}' AND split = 'train' "
               "AND status = 'accepted'", index_path)
    inside = df.inside.iloc[0]
    return {"liquid_coverage": None if inside is None or (isinstance(inside, float) and math.isnan(inside))
            else float(inside), "n_liquid_atoms_assessed": int(df.n.iloc[0]),
            "n_liquid_train_frames": int(nt.n.iloc[0])}


def snapshot_coverage(frames: list[Atoms], index_path: Path) -> dict:
    """Fraction of the Tm snapshots' atoms inside the training hull, per phase (γ ≤ 1)."""
    from mlipops.index.build import check_structures, query

    if not frames or not Path(index_path).is_file():
        return {}
    df = check_structures(frames, index_path)
    ct = np.array([frames[i].info.get("config_type") for i in df["frame"]])
    out = {f"coverage_{ph}_at_tm": float(df.inside_hull[ct == f"melting_{ph}"].mean())
           for ph in ("solid", "liquid") if (ct == f"melting_{ph}").any()}
    # the yardstick: the test split's own atoms (held-out frames of the data the model predicts well or not)
    test = query("SELECT avg(CASE WHEN inside_hull THEN 1.0 ELSE 0.0 END) AS inside FROM atoms WHERE split = 'test'",
                 index_path).inside.iloc[0]
    if test is not None and not (isinstance(test, float) and math.isnan(test)):
        out["coverage_test_atoms"] = float(test)
    return out


def model_phases(factory, s, tm_ref: float, m, runs: list[CoexistenceRun]) -> tuple[dict, list[Atoms]]:
    """Against a given reference (no reference solid and liquid): the model's own pure solid and pure liquid at
    the given Tm_ref (the ensemble mean's, :func:`~mlipops.evaluate.melting.phase_properties`, NPT at P = 0,
    ``phase_steps``, ``phase_snapshots`` per phase) and their snapshots (config_type ``melting_solid`` /
    ``melting_liquid``). The snapshots' share of atoms inside the training hull (:func:`snapshot_coverage`) says
    whether the liquid and the solid the members melt between lie in the data at all; the model's latent heat
    and ΔV give the pressure systematic's dTm/dP. The solid-like threshold is the members' runs' own calibration
    (their mean), so a solid that melts or a liquid that freezes at Tm_ref shows in its solid fraction."""
    from mlipops.evaluate.melting import phase_properties
    from mlipops.evaluate.melting_reference import _single_thread
    from mlipops.report import progress

    _single_thread()
    cal = [r.order_threshold for r in runs if math.isfinite(r.order_threshold)]
    threshold = s.q6_solid_threshold if s.q6_solid_threshold is not None else (float(np.mean(cal)) if cal else None)
    total = 2 * m.phase_steps + s.melt_steps
    with progress(f"the model's own solid and liquid at the given Tm_ref = {tm_ref:.0f} K (MD steps)", total) as adv:
        ph = phase_properties(factory, s, tm_ref, m.phase_steps, m.phase_snapshots, seed=m.seed, threshold=threshold,
                              on_steps=lambda n: adv(completed=n))
    frames = ph.pop("frames")
    return ph, frames


def run(p: Params, model_name: str | None = None, model_dir: Path | None = None,
        index_path: Path = INDEX) -> dict:
    """Every member's Tm against the reference's; reports, plots and MLflow metrics (module doc)."""
    import torch

    from mlipops.frames import read_extxyz
    from mlipops.models.ensemble import Ensemble, load_model

    t0 = time.perf_counter()
    m = p.evaluate.melting
    model_name = model_name or p.train.model_name
    model_dir = Path(model_dir or MODELS_DIR / model_name)
    if not (model_dir / "config.json").is_file():
        raise StageInputError("trained model missing: run `dvc repro train` first", file=str(model_dir))
    ref = read_reference()
    s = m.settings(*melting_crystal(p))
    if ref.get("element") and (ref.get("element"), ref.get("lattice")) != (s.element, s.lattice):
        raise StageInputError(f"the reference is for {ref.get('lattice')} {ref.get('element')}, the members run "
                              f"{s.lattice} {s.element}: run `dvc repro melting_reference` first",
                              file=str(REFERENCE_JSON))
    preset = getattr(m, m.preset)
    from mlipops.models.schema import trusted_calculators

    trusted = trusted_calculators(p)
    model = load_model(model_dir, dtype=torch.float64, trusted_calculators=trusted)
    n_members = len(model) if isinstance(model, Ensemble) else 1
    members = list(range(n_members)) if isinstance(model, Ensemble) else [None]
    specs = [sp for i, k in enumerate(members) for sp in coexistence_specs(
        MemberFactory(model_dir, k, trusted), s, [m.seed + 1000 * (i + 1) + j for j in range(preset.member_seeds)],
        member=i)]
    runs = run_many(specs, p.compute)
    # NVE: every run shifted to P = 0 with the reference's dTm/dP (its L and ΔV), as the reference's runs were
    dtm_dp = (ref.get("pressure") or {}).get("dtm_dp_K_per_GPa") if s.ensemble == "nve" else None
    per_member = [member_stats(i, [r for r, sp in zip(runs, specs) if sp["member"] == i], ref, s.agree_sigma, dtm_dp,
                               s.require_agreement) for i in range(n_members)]

    # empty when the reference has no phases (a given reference, or no oracle run coexisted)
    frames, bad = read_extxyz(PHASES) if PHASES.is_file() and PHASES.stat().st_size else ([], [])
    if bad:
        raise StageInputError(f"{len(bad)} unreadable frame(s): {bad[0].reason}", file=str(PHASES))
    phases = ref.get("phases") or {}
    own = None
    if ref.get("given") and not frames:
        # no reference solid and liquid: the model's own at the given Tm_ref, for coverage and dTm/dP
        own, frames = model_phases(MemberFactory(model_dir, None, trusted), s, ref["tm_mean"], m, runs)
    if frames and phases:
        for pm, err in zip(per_member, phase_errors(model, frames)):
            d = err["liquid"] - err["solid"]
            pm |= {"energy_error_solid": err["solid"], "energy_error_liquid": err["liquid"],
                   "delta_liquid_minus_solid": d, "bias_estimate": d / phases["delta_s_eV_per_atom_K"]}
    result = combine(per_member, ref, m.window_K)
    # the pressure systematic: each member's P_zz with the reference's dTm/dP (its L and ΔV; a member's own would
    # need its own solid and liquid runs)
    pz = [pm["pressure_zz_GPa"] for pm in per_member if pm["n_accepted"] and math.isfinite(pm["pressure_zz_GPa"])]
    result["pressure"] = pressure_systematic(
        result["tm_mean"] if result.get("tm_mean") is not None else math.nan,
        float(np.mean(pz)) if pz else math.nan, phases or own,
        "the reference's solid and liquid at Tm_ref (phase_properties), applied to the members' P_zz" if phases else
        "the model's own solid and liquid at the given Tm_ref (the ensemble mean, phase_properties), applied to the "
        "members' P_zz")
    if own is not None:
        result["model_phases"] = own
    result["pressure"]["applied"] = dtm_dp is not None
    if ((ref.get("pressure") or {}).get("correction_K") is not None
            and result["pressure"].get("correction_K") is not None):
        result["pressure"]["bias_correction_K"] = result["pressure"]["correction_K"] - ref["pressure"]["correction_K"]
    result |= liquid_coverage(index_path, m.sweep.config_type) | snapshot_coverage(frames, index_path)
    result |= {"model": model_name, "preset": m.preset, "settings": s.__dict__, "members": per_member,
               "finite_size": preset.finite_size.model_dump() if preset.finite_size is not None else None,
               "reference": {k: ref.get(k) for k in ("available", "given", "source", "reason", "phases_reason",
                                                    "oracle",
                                                    "tm_mean", "tm_std", "tm_stderr", "n_accepted", "n_rejected",
                                                    "phases", "preset", "element", "lattice")},
               "wall_s": round(time.perf_counter() - t0, 1)}
    write_report(result, runs, specs, ref)
    from mlipops.provenance import model_identity, write_provenance

    write_provenance(REPORT_DIR, "melting", **model_identity(model_dir, model_name))  # data: the model's training data
    from mlipops import tracking

    if (model_dir / "run.json").is_file():
        tracking.log_metrics(model_dir / "run.json", flat_metrics(result), prefix="melting/")
        tracking.log_headline(model_dir / "run.json", {REPORT_DIR / "metrics.json": flat_metrics(result)})
    return flat_metrics(result)


def member_stats(member: int, runs: list[CoexistenceRun], ref: dict, agree_sigma: float = 2.0,
                 dtm_dp: float | None = None, require_agreement: bool = True) -> dict:
    """A member's Tm and statistical error. Two or more accepted seeds: :func:`summarize` (their scatter and the
    block errors). One: its block error combined with the reference's seed-to-seed scatter (same cell, same
    protocol; one run's block error alone misses the scatter between seeds, see the melting module doc)."""
    out = {"member": member, **_stats(summarize(runs, agree_sigma, dtm_dp, require_agreement)),
           "runs": [r.summary() for r in runs]}
    scatter = ref.get("tm_std") if ref.get("available") and (ref.get("n_accepted") or 0) >= 2 else None
    if out["n_accepted"] == 1 and scatter is not None:
        out["tm_stderr"] = float(math.hypot(out["tm_stderr"], scatter))
        out["error_method"] = "one seed: block error and the reference's seed scatter"
    elif out["n_accepted"] == 1:
        out["error_method"] = "one seed: block error only (no reference scatter): an underestimate"
    else:
        out["error_method"] = "seed scatter and block errors"
    return out


def combine(per_member: list[dict], ref: dict, window: float) -> dict:
    """Ensemble statistics and P(|Tm − Tm_ref| ≤ window) of the mixture N(Tm_k, err_k² + err_ref²)."""
    ok = [pm for pm in per_member if pm["n_accepted"] > 0]
    tms = np.array([pm["tm_mean"] for pm in ok])
    errs = np.array([pm["tm_stderr"] for pm in ok])
    tm_ref = ref.get("tm_mean") if ref.get("available") else None
    ref_err = float(ref.get("tm_stderr") or 0.0) if tm_ref is not None else 0.0
    out = {"tm_mean": float(tms.mean()) if len(ok) else None,
           "tm_std": float(tms.std(ddof=1)) if len(ok) > 1 else (0.0 if ok else None),
           "n_members": len(per_member), "n_members_accepted": len(ok), "window_K": window,
           # what the members' statistical errors alone would scatter their Tm by, and the disagreement beyond it
           "noise_std": float(np.sqrt(np.mean(errs**2))) if ok else None,
           "model_spread": float(np.sqrt(max(0.0, tms.var(ddof=1) - np.mean(errs**2)))) if len(ok) > 1 else None,
           "tm_ref": tm_ref, "tm_ref_stderr": ref_err if tm_ref is not None else None}
    if tm_ref is not None and ok:
        sd = np.sqrt(errs**2 + ref_err**2)
        out |= {"bias": out["tm_mean"] - tm_ref,
                "p_within_window": prob_within(np.column_stack([tms, sd]), tm_ref, window),
                "mixture": [[float(a), float(b)] for a, b in zip(tms, sd)]}
        # a given reference's uncertainty is a stated standard uncertainty, not a few runs' estimate: infinite dof
        n_ref = None if ref.get("given") else int(ref.get("n_accepted") or 2)
        out |= bias_significance(out["bias"], tms, errs, ref_err, window, n_ref)
    else:
        out |= {"bias": None, "p_within_window": None,
                "p_reason": "no reference Tm" if tm_ref is None else "no member run coexisted"}
    est = [pm.get("bias_estimate") for pm in ok if pm.get("bias_estimate") is not None]
    out["bias_estimate"] = float(np.mean(est)) if est else None
    return out


def bias_significance(bias: float, tms: np.ndarray, errs: np.ndarray, ref_err: float, window: float,
                      n_ref: int | None = 2) -> dict:
    """Is the ensemble's bias Tm_mean − Tm_ref larger than the window *and* than its own noise?

    Standard error of the ensemble mean over n accepted members: se_ens² = max(s², mean(err_k²)) / n, s the
    members' standard deviation (ddof 1). The members are independent runs, so s² already estimates the model
    spread plus the runs' noise (adding mean(err_k²) again would count the noise twice); with 3-5 members s is
    itself uncertain, and 0 for one member, so it is floored at the noise their own errors predict.
    σ² = se_ens² + se_ref². Both errors are estimated from few runs (the quick preset's reference from 2 seeds:
    one degree of freedom; its se varied 12–41 K between otherwise equal runs), so 2σ is no 95 % bound: the
    bound is Student's t quantile t₀.₉₇₅(ν) · σ with the Welch–Satterthwaite ν = σ⁴ / (se_ens⁴/(n−1) +
    se_ref⁴/(n_ref−1)) (the floored se_ens has the errors' n_ref − 1).
    ``bias_significance_excess_K`` = |bias| − max(window, t·σ): positive only when the bias
    exceeds both the window and its 95 % bound (the promotion gate: ≤ 0). Unlike P(|Tm − Tm_ref| ≤ window),
    whose quick-preset noise is of the order of any useful threshold, it does not flip on a bias within the
    measurement's error; the price is honesty about what few runs can resolve (``bias_bound_K``)."""
    from scipy.stats import t as student_t

    n = len(tms)
    s2 = float(tms.var(ddof=1)) if n > 1 else 0.0
    se_ens = math.sqrt(max(s2, float(np.mean(errs**2))) / n)
    combined = math.hypot(se_ens, ref_err)
    # se_ens has n−1 degrees of freedom when the members' spread rules, else those of the errors it is floored
    # at (a one-seed member's error is the reference seeds' scatter: n_ref − 1)
    # (n_ref None: a given reference, whose stated uncertainty has infinitely many; the floor then keeps n − 1)
    if n_ref is None:
        terms = [(se_ens**4, n - 1), (ref_err**4, math.inf)]
    else:
        terms = [(se_ens**4, n - 1 if s2 >= float(np.mean(errs**2)) else n_ref - 1), (ref_err**4, n_ref - 1)]
    denom = sum(v / max(d, 1) for v, d in terms if v > 0)
    dof = combined**4 / denom if denom > 0 else math.inf
    factor = float(student_t.ppf(0.975, dof)) if math.isfinite(dof) else 1.959963984540054
    bound = max(window, factor * combined)
    return {"tm_se_ensemble": se_ens, "bias_combined_se": combined, "bias_dof": dof, "bias_t_factor": factor,
            "bias_bound_K": factor * combined, "abs_bias": abs(bias), "bias_significance_excess_K": abs(bias) - bound}


def flat_metrics(result: dict) -> dict:
    keys = ("tm_mean", "tm_std", "noise_std", "model_spread", "tm_ref", "tm_ref_stderr", "bias", "bias_estimate",
            "p_within_window", "window_K", "tm_se_ensemble", "bias_combined_se", "bias_dof", "bias_t_factor",
            "bias_bound_K", "abs_bias",
            "bias_significance_excess_K",
            "n_members_accepted", "liquid_coverage", "n_liquid_train_frames", "coverage_solid_at_tm",
            "coverage_liquid_at_tm", "coverage_test_atoms", "wall_s")
    out = {k: result.get(k) for k in keys if k in result}
    pr = result.get("pressure") or {}
    for k in ("pressure_zz_GPa", "dtm_dp_K_per_GPa", "correction_K", "bias_correction_K"):
        if pr.get(k) is not None and math.isfinite(pr[k]):
            out[f"pressure.{k}"] = pr[k]
    ph = (result.get("reference") or {}).get("phases") or {}
    if ph:
        out["latent_heat_eV_per_atom"] = ph.get("latent_heat_eV_per_atom")
        out["delta_s_kB"] = ph.get("delta_s_kB")
    own = result.get("model_phases") or {}
    if own:  # given reference: the model's own phases at Tm_ref
        out["model.latent_heat_eV_per_atom"] = own.get("latent_heat_eV_per_atom")
        out["model.delta_v_A3_per_atom"] = own.get("delta_v_A3_per_atom")
        out["model.liquid_volume_per_atom"] = own["liquid"]["volume_per_atom"]
        out["model.solid_volume_per_atom"] = own["solid"]["volume_per_atom"]
    for pm in result["members"]:
        for k in ("tm_mean", "tm_stderr", "bias_estimate", "n_rejected"):
            if pm.get(k) is not None:
                out[f"member.{pm['member']}.{k}"] = pm[k]
    return {k: v for k, v in out.items() if v is not None}


# ------------------------------------------------------------------------------------------ reports
def plot_distribution(result: dict, path: Path) -> Path:
    """The members' Tm (each a Gaussian of its error), their mixture, the reference with ±window."""
    from mlipops.report import pyplot, save_figure

    plt = pyplot()
    from scipy.stats import norm

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ok = [pm for pm in result["members"] if pm["n_accepted"] > 0]
    tm_ref, w = result.get("tm_ref"), result["window_K"]
    centres = [pm["tm_mean"] for pm in ok] + ([tm_ref] if tm_ref is not None else [])
    if centres:
        spread = max([pm["tm_stderr"] or 0.0 for pm in ok] + [w, 30.0])
        x = np.linspace(min(centres) - 4 * spread, max(centres) + 4 * spread, 600)
        mix = result.get("mixture") or [[pm["tm_mean"], pm["tm_stderr"]] for pm in ok]
        total = np.zeros_like(x)
        for i, (mu, sd) in enumerate(mix):
            sd = max(sd, 1.0)
            y = norm.pdf(x, mu, sd) / len(mix)
            total += y
            ax.plot(x, y, lw=0.8, color=f"C{i % 10}", label=f"member {ok[i]['member']}: {ok[i]['tm_mean']:.0f} ± "
                    f"{ok[i]['tm_stderr']:.0f} K")
        ax.plot(x, total, color="k", lw=1.6, label="combined")
        if tm_ref is not None:
            ax.axvline(tm_ref, color="crimson", lw=1.5,
                       label=f"reference {tm_ref:.0f} ± {result['tm_ref_stderr']:.0f} K")
            ax.axvspan(tm_ref - w, tm_ref + w, color="crimson", alpha=0.12,
                       label=f"±{w:g} K: P = {result['p_within_window']:.2f}" if result.get("p_within_window")
                       is not None else f"±{w:g} K")
    ax.set_xlabel("melting point (K)")
    ax.set_ylabel("probability density (1/K)")
    ax.set_title(f"{result['model']}: Tm = {result['tm_mean']:.0f} ± {result['tm_std']:.0f} K (ensemble)"
                 if result.get("tm_mean") is not None else f"{result['model']}: no member run coexisted")
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)
    return path


def _fmt(v, digits: int = 0) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def conclusion(result: dict) -> list[str]:
    """The results in words (summary and model card)."""
    lines = []
    if result.get("tm_ref") is None:
        lines.append(f"No reference melting point: {result['reference'].get('reason', 'reference unavailable')}.")
    else:
        err = result["tm_ref_stderr"]
        lines.append(f"Reference ({reference_name(result['reference'])}): Tm = {_fmt(result['tm_ref'])} ± "
                     f"{_fmt(err, 1 if err is not None and 0 < err < 1 else 0)} K.")
    if result.get("tm_mean") is None:
        lines.append("No member run kept both phases: no model melting point.")
        return lines + own_phases_lines(result)
    lines.append(f"Ensemble ({result['n_members_accepted']}/{result['n_members']} members): Tm = "
                 f"{_fmt(result['tm_mean'])} ± {_fmt(result['tm_std'])} K (mean ± standard deviation over members)"
                 + (f"; bias {result['bias']:+.0f} K; P(|Tm − Tm_ref| ≤ {result['window_K']:g} K) = "
                    f"{result['p_within_window']:.2f}." if result.get("bias") is not None else "."))
    if result.get("bias_significance_excess_K") is not None:
        x = result["bias_significance_excess_K"]
        lines.append(f"Combined standard error of the bias {_fmt(result['bias_combined_se'])} K (ensemble mean "
                     f"{_fmt(result['tm_se_ensemble'])} K, reference {_fmt(result['tm_ref_stderr'])} K): |bias| "
                     + (f"exceeds both the ±{result['window_K']:g} K window and its 95 % bound "
                        f"t·σ = {_fmt(result['bias_bound_K'])} K by {x:.0f} K (significant)." if x > 0 else
                        f"is within max(±{result['window_K']:g} K, t·σ = {_fmt(result['bias_bound_K'])} K) by "
                        f"{-x:.0f} K (t = {result['bias_t_factor']:.2f} for {result['bias_dof']:.1f} degrees of "
                        "freedom)."))
    if result.get("model_spread") is not None:
        lines.append(f"The members' statistical errors alone scatter Tm by {_fmt(result['noise_std'])} K; the "
                     f"disagreement between members beyond that is {_fmt(result['model_spread'])} K"
                     + (" (the committee's spread is within the noise of this preset)."
                        if result["model_spread"] < 0.5 * result["noise_std"] else "."))
    if result.get("bias_estimate") is not None:
        lines.append(f"Energy cause: the members' liquid-minus-solid energy error at Tm_ref predicts a bias of "
                     f"{result['bias_estimate']:+.0f} K (δE/ΔS_m), against {result['bias']:+.0f} K measured.")
    elif (result.get("reference") or {}).get("given"):
        lines.append("Energy cause (δE/ΔS_m): n/a: given reference (no reference energies of a solid and a liquid "
                     "at Tm to compare the members' energies with).")
    lines += own_phases_lines(result)
    pr = result.get("pressure") or {}
    if pr.get("correction_K") is not None:
        lines.append(f"Pressure: the members' liquid–solid cells end at P_zz = {pr['pressure_zz_GPa']:+.2f} GPa "
                     f"(normal to the interfaces); dTm/dP = Tm ΔV/L = {pr['dtm_dp_K_per_GPa']:.0f} K/GPa (ΔV, L: "
                     f"{pr['source']}) "
                     + (f"shifted every run to P = 0 (the members' mean shift {pr['correction_K']:+.0f} K"
                        + (f", the bias {pr['bias_correction_K']:+.0f} K" if pr.get("bias_correction_K") is not None
                           else "") + "; first-order Clausius–Clapeyron with L and ΔV of the reference: its "
                        "error is a systematic of the order of a quarter of that shift)."
                        if pr.get("applied") else
                        f"would move Tm at P = 0 by {pr['correction_K']:+.0f} K"
                        + (f", the bias by {pr['bias_correction_K']:+.0f} K" if pr.get("bias_correction_K")
                           is not None else "") + ": a stated systematic, not applied."))
    elif pr:
        lines.append(f"Pressure: P_zz = {_fmt(pr.get('pressure_zz_GPa'), 2)} GPa; its Clausius–Clapeyron "
                     f"correction to P = 0: {pr.get('reason', 'n/a')}.")
    lines.append(preset_statement(result))
    if result.get("liquid_coverage") is not None:
        lines.append(f"Liquid coverage: {100 * result['liquid_coverage']:.0f} % of the liquid test atoms "
                     f"lie inside the training hull ({result['n_liquid_train_frames']} liquid training frames)"
                     + (f"; of the Tm snapshots' atoms {100 * result['coverage_liquid_at_tm']:.0f} % (liquid) and "
                        f"{100 * result['coverage_solid_at_tm']:.0f} % (solid)." if "coverage_liquid_at_tm" in result
                        else "."))
    return lines


def own_phases_lines(result: dict) -> list[str]:
    """The model's own solid and liquid at a given Tm_ref (:func:`model_phases`), in words; [] without them."""
    own = result.get("model_phases")
    if not own:
        return []
    cov = [f"{100 * result[f'coverage_{ph}_at_tm']:.0f} % of the {ph}'s atoms"
           for ph in ("solid", "liquid") if result.get(f"coverage_{ph}_at_tm") is not None]
    text = (f"The model's own solid and liquid at the given Tm_ref = {_fmt(own['temperature_K'])} K (ensemble mean, "
            f"NPT at P = 0, {own['solid']['n_atoms']} atoms each): latent heat "
            f"{1000 * own['latent_heat_eV_per_atom']:.0f} meV/atom (ΔS_m = {own['delta_s_kB']:.2f} k_B), ΔV = "
            f"{own['delta_v_A3_per_atom']:+.2f} Å³/atom ({own['solid']['volume_per_atom']:.2f} → "
            f"{own['liquid']['volume_per_atom']:.2f}); solid fraction {own['solid']['solid_fraction']:.2f} (solid) "
            f"and {own['liquid']['solid_fraction']:.2f} (liquid); inside the training hull: "
            + (" and ".join(cov) if cov else "n/a (no index)")
            + (f" (the test split's atoms: {100 * result['coverage_test_atoms']:.0f} %)"
               if result.get("coverage_test_atoms") is not None else "") + ". " + coverage_verdict(result))
    return [text.rstrip()]


def coverage_verdict(result: dict, inside: float = 0.9) -> str:
    """One sentence on what the Tm snapshots' hull coverage means for the bias (model_phases; γ ≤ 1 atoms): a
    phase lies outside the data when fewer than ``inside`` x the test split's share of its atoms (all of them
    without that yardstick) are inside the training hull."""
    cs, cl = result.get("coverage_solid_at_tm"), result.get("coverage_liquid_at_tm")
    if cs is None or cl is None:
        return ""
    bar = inside * (result.get("coverage_test_atoms") or 1.0)
    out = [ph for ph, c in (("solid", cs), ("liquid", cl)) if c < bar]
    given = (result.get("reference") or {}).get("given")
    physics = (" or the reference's: a measured Tm also holds what the DFT functional and classical nuclei miss"
               if given else "")
    if not out:
        return ("Both phases lie inside the training data, so the bias is not missing data: it is the fit's (more "
                f"epochs, a larger model, more weight on these configurations){physics}.")
    return (f"The {' and the '.join(out)} at Tm_ref lie{'s' if len(out) == 1 else ''} largely outside the training "
            f"hull: the members extrapolate there, so missing data is the first suspect (label such "
            f"configurations: {', '.join(out)} at {result['model_phases']['temperature_K']:.0f} K and P = 0).")


def preset_statement(result: dict) -> str:
    """What the numbers are (issue 23): the quick preset's estimate with its stated finite-size systematic, or
    the production preset's numbers to quote."""
    fs = result.get("finite_size")
    st = result.get("settings") or {}
    cell = "×".join(str(c) for c in st.get("supercell", ())) or "?"
    size = (f"finite size: this {cell} cell melts {fs['bias_K']:+.0f} ± {fs['error_K']:.0f} K from the largest cell "
            f"studied ({fs['source']}; a stated systematic, not applied)" if fs else
            f"finite size: not measured for the {cell} cell (evaluate.melting.<preset>.finite_size)")
    if result.get("preset") == "quick":
        return (f"Preset `quick`: an estimate within `make repro`'s budget, not the number to quote; {size}. The "
                "number to quote: `dvc exp run -S evaluate.melting.preset=production` (≥ 4 runs per member, "
                "longer windows).")
    return f"Preset `{result.get('preset')}`: {size}."


def reference_name(ref: dict) -> str:
    """How the reference came about, in words: ``given: <source>`` or the oracle's calculator."""
    if ref.get("given"):
        return f"given: {ref.get('source')}"
    return str((ref.get("oracle") or {}).get("calculator"))


def threshold_text(runs: list[CoexistenceRun], s: dict) -> str:
    """The solid-like rule of the runs, in words: the given threshold or the range of the calibrated ones."""
    from mlipops.evaluate.melting import ORDER_PARAMETER

    l, n = ORDER_PARAMETER[s["lattice"]]
    l, n = s.get("order_l") or l, s.get("order_neighbors") or n
    if s.get("q6_solid_threshold") is not None:
        return f"averaged q̄{l} ({n} neighbours) > {s['q6_solid_threshold']}"
    th = [r.order_threshold for r in runs if math.isfinite(r.order_threshold)]
    rng = (f"{min(th):.3f}" if max(th) - min(th) < 5e-4 else f"{min(th):.3f}–{max(th):.3f}") if th else "n/a"
    return f"averaged q̄{l} ({n} neighbours) above a threshold calibrated per run on its own solid and liquid: {rng}"


def write_report(result: dict, runs: list[CoexistenceRun], specs: list[dict], ref: dict) -> None:
    safe_remove(REPORT_DIR)
    REPORT_DIR.mkdir(parents=True)
    ref_runs = [_run_from_json(r) for r in ref.get("runs", [])]
    plot_traces(ref_runs, REPORT_DIR / "traces_reference.png",
                title=f"reference ({reference_name(ref)}): coexistence runs",
                empty_note=f"n/a: given reference, Tm = {_fmt(ref.get('tm_mean'))} ± {_fmt(ref.get('tm_stderr'))} K"
                if ref.get("given") else "no reference run")
    plot_traces(runs, REPORT_DIR / "traces_members.png", title=f"{result['model']} members: coexistence runs",
                labels=[f"member {sp['member']} seed {sp['seed']}" for sp in specs],
                colors=[f"C{sp['member'] % 10}" for sp in specs])
    plot_distribution(result, REPORT_DIR / "distribution.png")
    result["conclusion"] = conclusion(result)
    (REPORT_DIR / "melting_point.json").write_text(json.dumps(jsonable(result), indent=2) + "\n")
    write_metrics(REPORT_DIR, flat_metrics(result))
    rows = [(pm["member"], _fmt(pm["tm_mean"]), _fmt(pm["tm_stderr"]), pm["n_accepted"], pm["n_rejected"],
             _fmt(pm.get("energy_error_liquid") and 1000 * pm["energy_error_liquid"], 1),
             _fmt(pm.get("energy_error_solid") and 1000 * pm["energy_error_solid"], 1), _fmt(pm.get("bias_estimate")),
             "; ".join(r["rejected_reason"] for r in pm["runs"] if r["rejected_reason"]) or "")
            for pm in result["members"]]
    ph = (ref.get("phases") or {})
    s = result["settings"]
    write_markdown(REPORT_DIR / "summary.md", f"Melting point of `{result['model']}` (solid–liquid coexistence)", [
        *result["conclusion"],
        f"Preset `{result['preset']}`: "
        f"{s['supercell'][0]}×{s['supercell'][1]}×{s['supercell'][2]} {s['lattice']} cells "
        f"({runs[0].n_atoms if runs and runs[0].n_atoms else '?'} atoms), {s['timestep_fs']:g} fs steps: melt "
        f"{s['melt_steps']}, NPH {s['equilibration_steps']}, "
        f"{s['ensemble'].upper()} production {s['production_steps']} "
        f"(extended to at most {s['max_production_steps'] or 2 * s['production_steps']} while the late window drifts). "
        f"Tm is the mean T over the last {100 * s['window_fraction']:.0f} % of production; a run counts only when "
        f"that window's drift is within {s['drift_sigma']:g} x its error ({sum(1 for r in runs if r.converged)}/"
        f"{len(runs)} member runs converged) and both phases remain (solid fraction by {threshold_text(runs, s)}, "
        f"in [{s['min_phase_fraction']}, {1 - s['min_phase_fraction']:.2f}] at the end). Every seed runs twice, from "
        f"start temperatures {s['start_offset'] * s['t_guess']:g} K above and below the guess; "
        "it is accepted when both runs "
        f"count and agree within {s['agree_sigma']:g} x their combined error, and its Tm is their mean"
        + ("." if s.get("require_agreement", True) else
           f" (this preset keeps starts that disagree as a bracket, half the gap in the error: "
           f"{sum(int(pm.get('n_bracketed') or 0) for pm in result['members'])} member seed(s) bracketed)."),
        (f"Reference phases at Tm_ref: latent heat {ph['latent_heat_eV_per_atom']:.4f} eV/atom, ΔS_m = "
         f"{ph['delta_s_kB']:.2f} k_B, ΔV = {ph['delta_v_A3_per_atom']:.2f} Å³/atom." if ph else
         f"Reference phases at Tm_ref: {ref.get('phases_reason') or ref.get('reason') or 'n/a'}."),
        "Energy errors (meV/atom) are the members' mean (E_model − E_ref)/N on the reference's snapshots at Tm_ref; "
        "the estimate is (liquid − solid)/ΔS_m.",
    ], table=(("member", "Tm (K)", "error (K)", "accepted", "rejected", "ΔE liquid", "ΔE solid", "bias estimate (K)",
               "rejections"), rows),
        extra=["![distribution](distribution.png)", "![members](traces_members.png)",
               "![reference](traces_reference.png)"])


# ------------------------------------------------------------------------------------------ sweep
def _git(*args: str) -> str:
    import subprocess

    r = subprocess.run(["git", *args], capture_output=True, text=True)
    if r.returncode:
        raise MlipopsError(f"git {' '.join(args)} failed: "
                           f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return r.stdout


def _exp_file(ref: str, path: Path) -> dict | None:
    try:
        return json.loads(_git("show", f"{ref}:{path.as_posix()}"))
    except (MlipopsError, json.JSONDecodeError):
        return None


def sweep_point(fraction: float, metrics: dict, result: dict | None, source: str) -> dict:
    return {"fraction": fraction, "source": source, **{k: metrics.get(k) for k in (
        "tm_mean", "tm_std", "tm_ref", "tm_ref_stderr", "bias", "bias_estimate", "p_within_window",
        "window_K", "liquid_coverage", "n_liquid_train_frames", "coverage_liquid_at_tm", "coverage_solid_at_tm",
        "n_members_accepted")},
        "members": [{k: pm.get(k) for k in ("member", "tm_mean", "tm_stderr", "bias_estimate")}
                    for pm in (result or {}).get("members", [])]}


def run_sweep(p: Params, fractions: list[float] | None = None, run_experiments: bool = True) -> dict:
    """One ``dvc exp run --temp`` per fraction of ``ingest.split.keep_in_train.<config_type>`` (up to the
    ``melting`` stage; the workspace's own value is read from the workspace), then the table and plot.

    Experiments are named ``<config_type>-keep-<f>``; an existing one of that name on this commit is re-run
    with ``--force`` (DVC's run cache restores every stage whose inputs did not change). The temporary
    workspace imports ``mlipops`` from this checkout's ``src`` (editable install): do not edit it meanwhile."""
    import os
    import subprocess

    sw = p.evaluate.melting.sweep
    fractions = list(fractions if fractions is not None else sw.fractions)
    key = f"ingest.split.keep_in_train.{sw.config_type}"
    current = p.ingest.split.keep_in_train.get(sw.config_type, 1.0)
    head = _git("rev-parse", "HEAD").strip()
    points = []
    t0 = time.perf_counter()
    for f in fractions:
        if abs(f - current) < 1e-12:
            metrics_path = REPORT_DIR / "metrics.json"
            if not metrics_path.is_file():
                raise StageInputError("the workspace's melting report is missing: run `dvc repro melting` first",
                                      file=str(metrics_path))
            result = json.loads((REPORT_DIR / "melting_point.json").read_text())
            points.append(sweep_point(f, json.loads(metrics_path.read_text()), result, "workspace"))
            continue
        name = f"{sw.config_type}-keep-{f:g}".replace(".", "p")
        ref = f"refs/exps/{head[:2]}/{head[2:]}/{name}"
        if run_experiments:
            env = os.environ | {"PYTHONPATH": str(Path("src").resolve())}
            cmd = ["dvc", "exp", "run", "--temp", "--force", "-n", name, "-S", f"{key}={f}", "melting"]
            logger.info("$ " + " ".join(cmd))
            r = subprocess.run(cmd, env=env)
            if r.returncode:
                raise MlipopsError(f"`{' '.join(cmd)}` failed with exit code {r.returncode}", field=key)
        metrics = _exp_file(ref, REPORT_DIR / "metrics.json")
        if metrics is None:
            raise MlipopsError(f"experiment {name} has no melting metrics (ref {ref}); run without --no-run first",
                               field=key)
        points.append(sweep_point(f, metrics, _exp_file(ref, REPORT_DIR / "melting_point.json"), f"dvc exp {name}"))
    out = {"config_type": sw.config_type, "param": key, "points": points, "commit": head,
           "wall_s": round(time.perf_counter() - t0, 1)}
    write_sweep(out)
    return out


def write_sweep(out: dict) -> None:
    from mlipops.report import pyplot, save_figure

    plt = pyplot()

    SWEEP_DIR.mkdir(parents=True, exist_ok=True)
    pts = sorted(out["points"], key=lambda q: q["fraction"])
    (SWEEP_DIR / "sweep.json").write_text(json.dumps(jsonable(out), indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ok = [q for q in pts if q.get("tm_mean") is not None and q.get("liquid_coverage") is not None]
    tm_ref = next((q["tm_ref"] for q in pts if q.get("tm_ref") is not None), None)
    windows = sorted({q["window_K"] for q in pts if q.get("window_K") is not None})
    window = f"{windows[0]:g}" if len(windows) == 1 else "window"  # older points may lack it
    if tm_ref is not None:
        ax.axhline(tm_ref, color="crimson", lw=1.2, label=f"reference {tm_ref:.0f} K")
        if len(windows) == 1:
            ax.axhspan(tm_ref - windows[0], tm_ref + windows[0], color="crimson", alpha=0.1, label=f"±{window} K")
    if ok:
        x = [100 * q["liquid_coverage"] for q in ok]
        ax.errorbar(x, [q["tm_mean"] for q in ok], yerr=[q["tm_std"] or 0 for q in ok], fmt="o", color="k",
                    capsize=4, label="ensemble Tm (± member std)")
        for q, xi in zip(ok, x):
            for mem in q["members"]:
                if mem.get("tm_mean") is not None:
                    ax.plot(xi, mem["tm_mean"], ".", color="0.5", ms=4)
            ax.annotate(f"{q['n_liquid_train_frames']} liquid\ntraining frames", (xi, q["tm_mean"]), fontsize=7,
                        xytext=(6, 6), textcoords="offset points")
        est = [(xi, tm_ref + q["bias_estimate"]) for q, xi in zip(ok, x)
               if q.get("bias_estimate") is not None and tm_ref is not None]
        if est:
            ax.plot(*zip(*est), "s", mfc="none", color="C0", label="Tm_ref + δE_liquid/ΔS_m")
    ax.set_xlabel(f"{out['config_type']} coverage: test atoms inside the training hull (%)")
    ax.set_ylabel("melting point (K)")
    ax.set_title("melting point against liquid coverage")
    ax.legend(fontsize=7)
    save_figure(fig, SWEEP_DIR / "sweep.png", dpi=110)
    rows = [(q["fraction"], q.get("n_liquid_train_frames"),
             _fmt(q.get("liquid_coverage") and 100 * q["liquid_coverage"]),
             _fmt(q.get("coverage_liquid_at_tm") and 100 * q["coverage_liquid_at_tm"]),
             f"{_fmt(q.get('tm_mean'))} ± {_fmt(q.get('tm_std'))}", _fmt(q.get("bias")), _fmt(q.get("bias_estimate")),
             _fmt(q.get("p_within_window"), 2), q["source"]) for q in pts]
    write_markdown(SWEEP_DIR / "sweep.md", f"Melting point against {out['config_type']} coverage", [
        f"Each row trains the ensemble with `{out['param']}` = "
        "fraction of its training and validation frames kept (the rest "
        "become split `unused`), then runs the coexistence melting point for every member. Coverage from the "
        "index: the share of the liquid test atoms inside the training hull; at Tm: the share of "
        "the reference's liquid snapshots at Tm_ref inside it.",
    ], table=(("fraction kept", "liquid train frames", "liquid coverage (%)", "liquid at Tm inside (%)",
               "Tm ± std (K)", "bias (K)", "δE/ΔS_m (K)", f"P(±{window} K)", "source"), rows),
        extra=["![sweep](sweep.png)"])
