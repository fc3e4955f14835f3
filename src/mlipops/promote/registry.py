"""Gate a trained model on its evaluation metrics; register a passing one.

A passing model becomes a new version of the registered model in the MLflow Model Registry (tags:
gates, data hash, git commit), gets alias ``champion`` (the previous champion keeps its version and
gets alias ``previous``) and is copied to ``registry/<model>/v<N>/`` with its weights, JSON config,
``model_card.md``, ``gates.json``, ``coverage.json`` (the coverage index's tables) and ``report.html`` (one
self-contained page: card, gates, plots, coverage; :mod:`mlipops.promote.html_report`); ``registry/index.json``
lists versions and aliases. A failing
model is not registered; ``reports/promote/decision.md`` says which gates failed and by how much.

A rejection is a result, not an error: every declared output is written either way (``registry/``, created
with an empty ``index.json`` when missing; ``decision.md``, ``gates.json``, ``metrics.json`` with
``promoted`` 0 or 1, and ``headline.json``: the headline metrics of :mod:`mlipops.headline`) and the training
run in MLflow gets tags ``promotion`` (``promoted``/``rejected``), ``mlipops.promotion.failed_gates`` and
``mlipops.promotion.version``, the ``promoted``/``gates_failed`` headline metrics, and the decision and gates
as artifacts (``promotion/``). The gates only read reports computed for this model and data version
(``provenance.json``, see :mod:`mlipops.provenance`).

The card's "Training data sources" table counts the index's frames per source file and split; a source that
``mlipops active graduate`` wrote names its campaign (id, iterations, MLflow run, date), read from the source's
DVC-tracked manifest ``data/raw/<source>.extxyz.provenance.json`` (where it verifies). That manifest is no DVC dep
of promote: it changes only with its file, whose frames reach promote through the index.

In MLflow a promoted version is the model itself, not a folder of files: an MLflow pyfunc
(:mod:`mlipops.models.pyfunc`, models-from-code, weights loaded with ``weights_only``) logged into the training
run with its σ recalibration, so ``mlflow.pyfunc.load_model("models:/<name>@champion")`` predicts and ``mlflow
models serve`` serves it. The version's description is the model card (cut at a section to MLflow's 5,000
characters, the full card an artifact); one tag per gate, ``gate.<gate>`` = ``pass: value ≤ bound`` (``FAIL``,
``n/a: reason``); the version folder (card, gates, every validation report and plot) is logged into the run as
``registry/v<N>/``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock

from mlipops import headline
from mlipops.errors import MlipopsError, StageInputError
from mlipops.params import PromoteParams
from mlipops.paths import atomic_write_text, ensure_writable, read_registry_index, safe_remove
from mlipops.promote.gates import check_gates, data_config_types
from mlipops.promote.html_report import COVERAGE, write_report
from mlipops.provenance import FILE as PROVENANCE, mismatch, model_fingerprint
from mlipops.report import jsonable, md_table, read_metrics, write_markdown, write_metrics
from mlipops import tracking
from mlipops.pipeline import (DEFECTS_REPORTS as DEFECTS_DIR, EVALUATE_REPORTS as EVAL_DIR, INDEX, RAW_DIR,
                              MELTING_REPORTS as MELTING_DIR, MODELS_DIR, NVE_REPORTS as NVE_DIR, PATHS_JSON,
                              PATHS_REPORTS as PATHS_DIR, PROMOTE_REPORTS as REPORT_DIR,
                              UNCERTAINTY_REPORTS as UNCERTAINTY_DIR, HEADLINE_JSON)



UNCERTAINTY_GATE = "uncertainty.val.all.force_spearman (minimum)"
logger = logging.getLogger(__name__)
TAG = "mlipops.promotion."  # tags on the training run: failed_gates, version
DECISION_TAG = "promotion"  # the training run's decision: promoted / rejected (a column of the runs list)
DESCRIPTION_LIMIT = 5000  # characters: MLflow's model-version description column (String(5000) on SQL servers)


def uncertainty_gate(expect: dict | None = None) -> dict:
    """The uncertainty report's own gate (σ must rank the errors): a missing report, or one computed for
    another model or data version (``expect``: the promoted model's identity), fails."""
    path = UNCERTAINTY_DIR / "uncertainty.json"
    if not path.is_file():
        return {"gate": UNCERTAINTY_GATE, "value": None, "threshold": None,
                "bound": "min", "passed": False, "note": f"{path} missing"}
    rep = json.loads(path.read_text())
    g = rep["gate"]
    note = rep.get("reason", "") if not rep.get("available", True) else (
        "" if g["passed"] else f"below the minimum {g.get('min')}: σ does not rank the errors")
    row = {"gate": UNCERTAINTY_GATE, "value": g.get("value"),
           "threshold": g.get("min"), "bound": "min", "passed": bool(g["passed"]), "note": note}
    wrong = mismatch(UNCERTAINTY_DIR, expect) if expect is not None else None
    if wrong:
        row |= {"passed": False, "provenance": wrong, "note": wrong + (f"; {note}" if note else "")}
    return row


def _copy_report(report_json: Path, target: Path, subdir: str) -> None:
    """The report's JSON next to the model, its plots, summary and metrics in ``target/subdir``."""
    shutil.copy2(report_json, target / report_json.name)
    d = target / subdir
    d.mkdir()
    for f in report_json.parent.iterdir():
        if f.suffix in (".png", ".md") or f.name in ("metrics.json", PROVENANCE):
            shutil.copy2(f, d / f.name)


def _validation_reports(target: Path, expect: dict) -> list[str]:
    """Copy the physics-validation reports next to the model; their conclusions for the model card. A report
    computed for another model or data version (one no gate read: its gate not applicable or not configured)
    is left out, and the card says so."""
    def foreign(d: Path, title: str) -> list[str]:
        """The card's section for a report (present) of another model or data version, else []."""
        why = mismatch(d, expect) if (d / "metrics.json").is_file() else None
        return [f"## {title}", f"_not included: {why}_"] if why else []

    lines = []
    unc = UNCERTAINTY_DIR / "uncertainty.json"
    if skip := foreign(UNCERTAINTY_DIR, "Uncertainty"):
        lines += skip
    elif unc.is_file():
        _copy_report(unc, target, "uncertainty")  # uncertainty.json is read by MlipopsCalculator: σ recalibration
        u = json.loads(unc.read_text())
        if u.get("available", True):
            m = u["metrics"]

            def f(key: str, digits: int = 2) -> str:  # JSON null (a NaN metric) -> n/a
                v = m.get(key) if key in m else u["scale"].get(key)
                return "n/a" if v is None else f"{v:.{digits}f}"

            lines += ["## Uncertainty (`uncertainty.json`, `uncertainty/`)",
                      f"Ensemble σ recalibrated on {u['fit_split']}: σ_E × {f('energy', 3)}, σ_F × {f('forces', 3)} "
                      f"(applied by `MlipopsCalculator`). Spearman ρ(σ, |error|) on validation: energies "
                      f"{f('val.all.energy_spearman')}, forces {f('val.all.force_spearman')}; test forces "
                      f"{f('test.all.force_spearman')}. Force 1σ coverage on test "
                      f"{f('test.all.force_coverage_1sigma')} raw, "
                      f"{f('test.all.force_coverage_1sigma_recalibrated')} recalibrated (0.68 ideal)."]
    if skip := foreign(DEFECTS_DIR, "Trained on perfect crystals, tested on defects"):
        lines += skip
    elif (DEFECTS_DIR / "defects.json").is_file():
        d = target / "defects"
        d.mkdir()
        for f in ["defects.json", "summary.md", "metrics.json", PROVENANCE,
                  *[q.name for q in DEFECTS_DIR.glob("*.png")]]:
            if (DEFECTS_DIR / f).is_file():
                shutil.copy2(DEFECTS_DIR / f, d / f)
        rep = json.loads((DEFECTS_DIR / "defects.json").read_text())
        lines += ["## Trained on perfect crystals, tested on defects (`defects/`)",
                  "A single potential of this architecture trained on the perfect crystals only; its error on "
                  "vacancies and surfaces diagnosed (full report: `defects/summary.md`).", *rep.get("conclusion", [])]
    else:
        lines += ["## Trained on perfect crystals, tested on defects", "_not produced (run `dvc repro defects`)_"]
    melt = MELTING_DIR / "melting_point.json"
    if skip := foreign(MELTING_DIR, "Melting point"):
        lines += skip
    elif melt.is_file():
        _copy_report(melt, target, "melting")
        rep = json.loads(melt.read_text())
        lines += ["## Melting point (`melting_point.json`, `melting/`)",
                  f"Solid–liquid coexistence MD, preset `{rep.get('preset')}`, every ensemble member against the "
                  + ("given reference" if (rep.get("reference") or {}).get("given") else "reference oracle")
                  + " (full report: `melting/summary.md`).", *rep.get("conclusion", []),
                  "![Tm distribution](melting/distribution.png)"]
    else:
        lines += ["## Melting point", "_not produced (run `dvc repro melting`): `melting_point.json` is missing, "
                  "not faked_"]
    if skip := foreign(NVE_DIR, "Energy conservation"):
        lines += skip
    elif (NVE_DIR / "metrics.json").is_file():
        d = target / "nve"
        d.mkdir()
        for f in NVE_DIR.iterdir():
            if f.suffix in (".png", ".md", ".json"):
                shutil.copy2(f, d / f.name)
        m = read_metrics(NVE_DIR)
        ref = m.get("reference.energy_drift_meV_per_atom_per_ps")
        lines += ["## Energy conservation (`nve/`)",
                  f"NVE velocity Verlet, {m.get('n_atoms')} atoms at "
                  f"~{m.get('mean_temperature_K', float('nan')):.0f} K, "
                  f"{m.get('timestep_fs')} fs × {m.get('steps')} steps: drift "
                  f"{m.get('energy_drift_meV_per_atom_per_ps', float('nan')):+.3g} meV/atom/ps"
                  + (f" (reference oracle at the same time step: {ref:+.3g})." if ref is not None else ".")]
    else:
        lines += ["## Energy conservation", "_not produced (run `dvc repro nve`)_"]
    if PATHS_JSON.is_file():
        paths = json.loads(PATHS_JSON.read_text())
        shutil.copy2(PATHS_JSON, target / PATHS_JSON.name)
        if PATHS_DIR.is_dir():
            shutil.copytree(PATHS_DIR, target / "paths")
        lines += ["## Reaction paths: where the model leaves its training hull (`reaction_paths.json`, `paths/`)",
                  *[f"**{name}**: {r.get('summary', '')}" for name, r in paths.items()]]
    else:
        lines += ["## Reaction paths", "_not produced (run `dvc repro evaluate`)_"]
    return lines


def _coverage_summary(index_path: Path) -> str:
    if not index_path.is_file():
        return "_coverage index missing_"
    from mlipops.index.build import query

    df = query("SELECT split, config_type, n_frames, n_atoms, n_atoms_outside_hull, fraction_outside_hull, "
               "round(max_extrapolation_grade, 3) AS max_extrapolation_grade "
               "FROM coverage_by_config WHERE status = 'accepted'", index_path)
    return md_table(tuple(df.columns), df.itertuples(index=False))


# the index's coverage tables a version keeps in coverage.json (its report.html shows them)
COVERAGE_TABLES = {
    "By split and config_type": "SELECT * FROM coverage_by_config",
    "By species and coordination number": "SELECT * FROM coverage_by_species_coordination",
    "By temperature (MD snapshots)": "SELECT * FROM coverage_by_temperature",
    "Training hull per species": "SELECT species, method, k, rank, n_train_atoms, n_extreme_points, "
                                 "explained_variance, training_split FROM hull ORDER BY species",
}


def _coverage_tables(index_path: Path) -> dict:
    """What the data covered when the model was promoted (the index changes with the data): the tables of
    :data:`COVERAGE_TABLES` and the index's dataset id, for the version's ``coverage.json``."""
    if not index_path.is_file():
        return {"available": False, "reason": f"the coverage index {index_path} was missing at promotion"}
    from mlipops.index.build import query

    ids = query("SELECT dataset_id FROM datasets", index_path)["dataset_id"].tolist()
    tables = {}
    for title, sql in COVERAGE_TABLES.items():
        try:
            df = query(sql, index_path, limit=10_000)
        except Exception as exc:  # an index of another version (a view missing, a value it cannot convert)
            tables[title] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            continue
        cells = df.astype(object).where(df.notna(), None)  # NULL, NaN, pd.NA -> null
        tables[title] = {"columns": list(df.columns), "rows": jsonable(cells.values.tolist()),
                         "truncated": bool(df.attrs.get("truncated"))}
    return {"available": True, "index": index_path.as_posix(), "dataset_id": ids[0] if len(ids) == 1 else ids,
            "tables": tables}


def _campaign(source: str) -> str:
    """The active-learning campaign a graduated source came from (``mlipops active graduate``): the ``campaign``
    of its manifest ``data/raw/<source>.extxyz.provenance.json`` where that verifies; "" for any other source."""
    from mlipops.frames import verified_manifest

    c = (verified_manifest(RAW_DIR / f"{source}.extxyz") or {}).get("campaign")
    if not isinstance(c, dict):
        return ""
    its = c.get("iterations") or []
    return (f"active campaign `{c.get('id')}`, iterations {its[0]}..{its[-1]}" if its else
            f"active campaign `{c.get('id')}`") + (f", MLflow run `{c['mlflow_run_id']}`" if c.get("mlflow_run_id")
                                                   else "") + f", graduated {c.get('graduated', '?')}"


def _data_sources(index_path: Path) -> str:
    """Frames per source (the file a frame was ingested from) by split, quarantined apart, from the index; a
    graduated source names its campaign."""
    if not index_path.is_file():
        return "_coverage index missing_"
    from mlipops.index.build import query

    df = query("SELECT source, count(*) FILTER (WHERE status = 'accepted' AND split = 'train') AS train, "
               "count(*) FILTER (WHERE status = 'accepted' AND split = 'val') AS val, "
               "count(*) FILTER (WHERE status = 'accepted' AND split = 'test') AS test, "
               "count(*) FILTER (WHERE status = 'quarantined') AS quarantined "
               "FROM frames GROUP BY source ORDER BY source", index_path)
    return md_table(("source", "train", "val", "test", "quarantined", "from"),
                    [(*row, _campaign(str(row[0]))) for row in df.itertuples(index=False)])


def _known_limits(index_path: Path, threshold: float = 0.2) -> str:
    """The config_types whose atoms lie outside the training hull (the model extrapolates there)."""
    if not index_path.is_file():
        return "_coverage index missing_"
    from mlipops.index.build import query

    df = query("SELECT config_type, string_agg(DISTINCT split, ',' ORDER BY split) AS splits, "
               "sum(n_atoms_outside_hull) * 1.0 / sum(n_atoms) AS fraction_outside_hull, "
               "round(max(max_extrapolation_grade), 3) AS max_extrapolation_grade FROM coverage_by_config "
               f"WHERE status = 'accepted' GROUP BY config_type HAVING fraction_outside_hull > {threshold} "
               "ORDER BY fraction_outside_hull DESC", index_path)
    if df.empty:
        return f"No config_type has more than {threshold:.0%} of its atoms outside the training hull."
    return (f"Config_types with more than {threshold:.0%} of their atoms outside the training hull (γ > 1: "
            "the model extrapolates there, trust its σ rather than its value):\n\n"
            + md_table(tuple(df.columns), df.itertuples(index=False)))


def _version_entry(registry_dir: Path, name: str, mv) -> dict:
    d = registry_dir / name / f"v{mv.version}"
    gates = json.loads((d / "gates.json").read_text()) if (d / "gates.json").is_file() else []
    applicable = [g for g in gates if not g.get("not_applicable")]
    return {"version": int(mv.version), "path": f"{name}/v{mv.version}", "run_id": mv.run_id,
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000,
                                              timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "data_md5": (mv.tags or {}).get("data.dvc_md5"), "git_commit": (mv.tags or {}).get("git.commit"),
            "n_gates": len(applicable), "n_gates_passed": sum(bool(g.get("passed")) for g in applicable),
            "n_gates_not_applicable": len(gates) - len(applicable)}


def _update_index(registry_dir: Path, name: str, client) -> dict:
    """Rewrite registry/index.json from the MLflow registry (the source of truth for versions and aliases);
    versions without their folder are left out. Written to a temporary file and renamed (atomic)."""
    path = registry_dir / "index.json"
    try:
        index = read_registry_index(registry_dir)
    except MlipopsError:  # missing or unreadable: rebuilt from MLflow below
        index = {"models": {}}  # (other models: re-added on their next promotion)
    rm = client.get_registered_model(name)
    mvs = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    index.setdefault("models", {})[name] = {
        "versions": [_version_entry(registry_dir, name, mv) for mv in mvs
                     if (registry_dir / name / f"v{mv.version}").is_dir()],
        "aliases": {a: int(v) for a, v in (rm.aliases or {}).items()},
    }
    atomic_write_text(path, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def _result(g: dict) -> str:
    return "n/a" if g.get("not_applicable") else "pass" if g["passed"] else "FAIL"


def _gate_rows(gates: list[dict], note: bool = True) -> tuple:
    header = ("gate", "bound", "value", "threshold", "result") + (("note",) if note else ())
    rows = [(g["gate"], g.get("bound", "max"), g["value"], g["threshold"], _result(g))
            + ((g.get("note", ""),) if note else ()) for g in gates]
    return header, rows


def _not_applicable(gates: list[dict]) -> list[str]:
    """The gates declared not applicable, with their reasons (decision.md and the model card)."""
    na = [g for g in gates if g.get("not_applicable")]
    return ["Not applicable (declared in `promote.gates`; neither passed nor failed): "
            + "; ".join(f"`{g['gate']}`: {g['not_applicable']}" for g in na) + "."] if na else []


def headline_values(expect: dict, skip: tuple[Path, ...] = ()) -> dict[str, float]:
    """The headline metrics (:func:`mlipops.headline.collect`) of the reports computed for this model and data
    version: a report whose ``provenance.json`` names another (:func:`~mlipops.provenance.mismatch`) is left out."""
    stale = tuple(h.source for h in headline.HEADLINE
                  if (h.source.parent / PROVENANCE).is_file() and mismatch(h.source.parent, expect))
    return headline.collect(skip=skip + stale)


def _model_card(path: Path, name: str, version: int, run_info: dict, config: dict, gates: list[dict],
                metrics: dict, coverage: str, limits: str, validation: list[str], training: dict,
                expect: dict, sources: str = "_not recorded_") -> None:
    per_ct = sorted({k.split(".")[1] for k in metrics if k.startswith("test.") and k.count(".") == 2})
    ct_rows = [(ct, metrics.get(f"test.{ct}.energy_mae_per_atom"), metrics.get(f"test.{ct}.force_mae"))
               for ct in per_ct]
    write_markdown(path, f"Model card: {name} v{version}", [
        f"Registered {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} from MLflow run `{run_info['run_id']}` "
        f"(git commit `{tracking.git_commit()}`).",
        f"Data version (md5 of data/curated/accepted.extxyz, as in dvc.lock): `{run_info['data_md5']}`; weights "
        f"sha256 `{model_fingerprint(path.parent)}`. Every report a gate read, and every report below, was "
        "computed for these weights and this data version (their `provenance.json`).",
        f"Species {config['species']}; descriptor {json.dumps(config['descriptor'])}; "
        f"hidden layers {config['hidden']}; "
        + (f"an ensemble of {config['n_members']} members (mean prediction; `energy_std`/`forces_std` in the "
           "calculator's results)." if config.get("n_members") else "a single potential (no uncertainty)."),
        "## Headline metrics (`reports/promote/headline.json`; the same names in the MLflow run)",
        md_table(("metric", "value", "meaning"), [(name, _num(values[name]), meaning)
                                                  for name, meaning in headline.meanings() if name in values])
        if (values := headline_values(expect, skip=(REPORT_DIR / "metrics.json",))) else "_none produced_",
        "## Training settings (`train.*` params of the MLflow run)",
        md_table(("param", "value"), sorted(training.items())) if training else "_not recorded in MLflow_",
        "## Training data sources (frames per source file and split, from the coverage index)", sources,
        "## Gates", md_table(*_gate_rows(gates, note=False)), *_not_applicable(gates),
        "## Test errors per config_type", md_table(("config_type", "E MAE (eV/atom)", "F MAE (eV/Å)"), ct_rows),
        "## Data coverage (accepted frames; hull = convex hull of the training atoms in descriptor space)", coverage,
        "## Known limits", limits,
        *validation,
        "## Load", f"```python\nfrom mlipops.models import MlipopsCalculator\n"
        f"atoms.calc = MlipopsCalculator(\"registry/{name}/v{version}\")  "
        f"# or MlipopsCalculator.from_registry(\"{name}@champion\")\n```",
        "As an MLflow model (a pyfunc: one structure per row, `extxyz` text or `numbers`/`positions`/`cell`/`pbc`; "
        "energy, forces and their σ out):",
        f"```python\nimport mlflow\nmodel = mlflow.pyfunc.load_model(\"models:/{name}/{version}\")  "
        f"# or \"models:/{name}@champion\"\npred = model.predict(pandas.DataFrame({{\"extxyz\": [text]}}))\n```",
    ])


def _write_version(target: Path, model_dir: Path, gates: list[dict], expect: dict) -> list[str]:
    """The version's folder: weights, config, run info, gates, parity plots, validation reports."""
    for f in ("weights.pt", "config.json", "run.json"):
        shutil.copy2(model_dir / f, target / f)
    (target / "gates.json").write_text(json.dumps(gates, indent=2) + "\n")
    (target / COVERAGE).write_text(json.dumps(_coverage_tables(INDEX), indent=2) + "\n")
    for png in sorted(EVAL_DIR.glob("parity_*.png")):
        shutil.copy2(png, target / png.name)
    return _validation_reports(target, expect)


def _ensure_registry(registry_dir: Path) -> None:
    """The declared out ``registry`` exists whatever the decision: created, with an empty but valid
    ``index.json``, when missing; otherwise left as it is (under the registry's lock: never over a real index)."""
    registry_dir.mkdir(parents=True, exist_ok=True)
    path = registry_dir / "index.json"
    if path.exists():
        return
    with FileLock(str(registry_dir / ".lock"), timeout=600):
        if not path.exists():
            atomic_write_text(path, json.dumps({"models": {}}, indent=2) + "\n")


def _join_limited(items: list[str], limit: int) -> str:
    """Comma-joined, cut at a whole item to fit ``limit`` characters, ending ``…(+N more)`` when cut."""
    text = ",".join(items)
    if len(text) <= limit:
        return text
    kept: list[str] = []
    for k, item in enumerate(items):
        if len(",".join(kept + [item])) + len(f",…(+{len(items) - k - 1} more)") > limit:
            break
        kept.append(item)
    return ",".join(kept + [f"…(+{len(items) - len(kept)} more)"])


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def tag_key(name: str) -> str:
    """An MLflow tag key from a gate's name: alphanumerics, ``_ - . : /`` and spaces only."""
    return re.sub(r"\s+", " ", re.sub(r"[^A-Za-z0-9_\-.:/ ]", " ", name)).strip()


def gate_tags(gates: list[dict]) -> dict[str, str]:
    """One model-version tag per gate: ``gate.<gate>`` = ``pass: 0.00345 ≤ 0.1`` / ``FAIL: …`` / ``n/a: why``."""
    out = {}
    for g in gates:
        if g.get("not_applicable"):
            value = f"n/a: {g['not_applicable']}"
        else:
            op = "≥" if g.get("bound") == "min" else "≤"
            value = f"{'pass' if g['passed'] else 'FAIL'}: {_num(g['value'])} {op} {_num(g['threshold'])}"
            value += f" ({g['note']})" if g.get("note") else ""
        out[f"gate.{tag_key(g['gate'])}"] = value[:DESCRIPTION_LIMIT]
    return out


def card_description(card: str, full: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """The model card as an MLflow description: whole when it fits ``limit`` characters, else its sections in
    order while they fit, then a line naming the sections left out and where the full card is (``full``)."""
    if len(card) <= limit:
        return card
    parts = re.split(r"(?m)^(?=## )", card)
    tail = "\n\n_Cut to MLflow's {n:,}-character description; left out: {left}. Full card: {full}._\n"
    kept, left = [], []
    for part in parts:
        title = part.splitlines()[0].lstrip("# ").strip() if part.strip() else ""
        budget = limit - len(tail.format(n=limit, left=", ".join(left + [title]), full=full)) - 50
        if not left and sum(map(len, kept)) + len(part) <= budget:
            kept.append(part)
        else:
            left.append(title)
    return "".join(kept).rstrip() + tail.format(n=limit, left=", ".join(left), full=full)


def _log_run_files(client, run_id: str, folder: Path, artifact_path: str) -> str | None:
    """``folder`` into the run's artifacts; None when done, else why not."""
    from mlflow.exceptions import MlflowException

    try:
        client.log_artifacts(run_id, str(folder), artifact_path=artifact_path)
    except (MlflowException, OSError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _tag_training_run(run_info: dict, promoted: bool, failed: list[str], version: int | None) -> str | None:
    """The decision as tags of the MLflow training run; None when set, else why not (for decision.md)."""
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    try:
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH
    except ImportError:  # pragma: no cover - older MLflow
        MAX_TAG_VAL_LENGTH = 5000
    try:
        client = tracking.client(run_info["tracking_uri"])
        tags = {TAG + "failed_gates": _join_limited(failed, MAX_TAG_VAL_LENGTH),
                DECISION_TAG: "promoted" if promoted else "rejected"}
        if version is not None:
            tags[TAG + "version"] = str(version)
        client.log_batch(run_info["run_id"], tags=[RunTag(k, v) for k, v in tags.items()])
        if version is None:  # a rejected run no longer names the version an earlier promotion gave it
            try:
                client.delete_tag(run_info["run_id"], TAG + "version")
            except MlflowException:
                pass  # it had none
    except MlflowException as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def run(p: PromoteParams, model_name: str, trusted_calculators=None) -> dict:
    """Check the gates; register a passing model. Always writes registry/, decision.md, gates.json and
    metrics.json (``promoted`` 0/1); a rejection returns normally (``mlipops promote --strict`` exits 3).
    The model's config.json is checked as loading checks it (its baseline among the built-ins or
    ``trusted_calculators``, the params' one): the registry never holds a model that cannot be loaded."""
    from mlipops.models.ensemble import read_config

    t0 = time.perf_counter()
    model_dir = MODELS_DIR / model_name
    run_json = model_dir / "run.json"
    if not run_json.is_file():
        raise StageInputError("trained model missing: run `dvc repro train` first", file=str(run_json))
    eval_metrics = read_metrics(EVAL_DIR)
    if not eval_metrics:
        raise StageInputError("evaluation metrics missing: run `dvc repro evaluate` first",
                              file=str(EVAL_DIR / "metrics.json"))
    run_info = json.loads(run_json.read_text())
    config = read_config(model_dir, trusted_calculators)
    expect = {"model_name": model_name, "model_weights_sha256": model_fingerprint(model_dir),
              "data_md5": run_info.get("data_md5")}
    gates = check_gates(p.gates, EVAL_DIR, expect=expect, config_types=data_config_types(INDEX)) \
        + [uncertainty_gate(expect)]
    applicable = [g for g in gates if not g.get("not_applicable")]
    failed = [g for g in applicable if not g["passed"]]
    passed = not failed
    registry_dir = ensure_writable(p.registry_dir, what="write the registry to", strict=False)
    _ensure_registry(registry_dir)
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    header, gate_rows = _gate_rows(gates)
    metrics = {"promoted": int(passed), "n_gates": len(applicable), "n_gates_passed": len(applicable) - len(failed),
               "n_gates_failed": len(failed), "n_gates_not_applicable": len(gates) - len(applicable)}
    if not passed:
        champion = _champion(registry_dir, model_name)
        tag_error = _tag_training_run(run_info, False, [g["gate"] for g in failed], None)
        stale = [g for g in failed if g.get("provenance")]
        write_markdown(REPORT_DIR / "decision.md", f"Promotion of `{model_name}`: REJECTED", [
            f"MLflow run `{run_info['run_id']}` failed {len(failed)} of {len(applicable)} gate(s); it was "
            "not registered" + (f"; `{model_name}@champion` is still v{champion}." if champion else "."),
            "Failed: " + "; ".join(f"`{g['gate']}` = {g['value']} ({g['note']})" for g in failed) + ".",
            *(["Reports not computed for this model or data version (rerun their stages): "
               + "; ".join(sorted({g["provenance"] for g in stale})) + "."] if stale else []),
            *_not_applicable(gates),
            "A rejection is a result: every output is written and the stage exits 0 (`mlipops promote --strict` "
            "exits 3).",
            (f"The MLflow training run was NOT tagged with this decision: {tag_error}." if tag_error else
             f"The MLflow training run is tagged `{DECISION_TAG}=rejected` with its failed gates "
             f"(`{TAG}failed_gates`); this decision and the gates are its artifacts `promotion/`."),
        ], table=(header, gate_rows))
        metrics["version"] = None
        metrics["wall_time_s"] = round(time.perf_counter() - t0, 2)
        _finish(run_json, metrics, gates, expect)
        return metrics

    client = tracking.client(run_info["tracking_uri"])
    run_id = run_info["run_id"]
    with FileLock(str(registry_dir / ".lock"), timeout=600):
        from mlflow.exceptions import MlflowException

        from mlipops.models.pyfunc import log_pyfunc

        try:
            client.get_registered_model(model_name)
        except MlflowException:
            client.create_registered_model(model_name, description="mlipops potential")
        existing = client.search_model_versions(f"name='{model_name}' and run_id='{run_id}'")
        n_ok = f"{len(applicable)}/{len(applicable)}"
        tags = {"data.dvc_md5": run_info["data_md5"], "git.commit": tracking.git_commit(), "gates.passed": n_ok,
                "weights.sha256": expect["model_weights_sha256"]} | gate_tags(gates)
        # the version's files first (into a temporary folder, renamed once the version number is known), the
        # aliases last: an alias never points at a version whose folder is incomplete, even if this dies between
        tmp = registry_dir / model_name / f".new.{os.getpid()}.tmp"
        safe_remove(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        validation = _write_version(tmp, model_dir, gates, expect)
        tracking.get_run(client, run_id, run_json)  # a run this store does not hold: a clear error, not MLflow's
        if existing:
            mv = existing[0]
            for k, v in tags.items():
                client.set_model_version_tag(model_name, mv.version, k, v)
        else:  # the model as an MLflow pyfunc of the training run (with the σ recalibration the folder holds)
            info = log_pyfunc(tmp, tmp / "uncertainty.json", run_id=run_id,
                              tags={"mlipops.model_name": model_name, "weights.sha256": tags["weights.sha256"]})
            mv = client.create_model_version(model_name, source=f"models:/{info.model_id}", run_id=run_id,
                                             tags=tags, model_id=info.model_id,
                                             description=f"promoted by mlipops; gates {n_ok} passed")
        version = int(mv.version)
        target = registry_dir / model_name / f"v{version}"
        card = tmp / "model_card.md"
        _model_card(card, model_name, version, run_info, config, gates, eval_metrics,
                    _coverage_summary(INDEX), _known_limits(INDEX), validation, _training_params(client, run_info),
                    expect, _data_sources(INDEX))
        safe_remove(target)
        tmp.rename(target)
        client.update_model_version(model_name, version, description=card_description(
            (target / "model_card.md").read_text(), f"`registry/{model_name}/v{version}/model_card.md`, also the "
            f"training run's artifact `registry/v{version}/model_card.md`"))
        aliases = client.get_registered_model(model_name).aliases or {}
        previous = aliases.get("champion")
        if previous is not None and int(previous) != version:
            client.set_registered_model_alias(model_name, "previous", str(previous))
        client.set_registered_model_alias(model_name, "champion", str(version))
        index = _update_index(registry_dir, model_name, client)
        html_error = _write_html(target)
    artifact_error = _log_run_files(client, run_id, target, f"registry/v{version}")
    tag_error = _tag_training_run(run_info, True, [], version)
    write_markdown(REPORT_DIR / "decision.md", f"Promotion of `{model_name}`: PROMOTED as v{version}", [
        f"MLflow run `{run_id}` passed all {len(applicable)} gates; registered model `{model_name}` "
        f"version {version} has alias `champion`"
        + (f"; v{previous} is now `previous`." if previous and int(previous) != version else "."),
        *_not_applicable(gates),
        f"Files: `{target}` (also the training run's artifacts `registry/v{version}/`"
        + (f": NOT logged, {artifact_error})." if artifact_error else ").")
        + (f" Its page `report.html` was NOT written: {html_error}." if html_error else
           f" Its page: `{target / 'report.html'}` (self-contained HTML: card, gates, plots, coverage)."),
        f"Load: `mlflow.pyfunc.load_model(\"models:/{model_name}@champion\")` or "
        f"`MlipopsCalculator.from_registry(\"{model_name}@champion\")`.",
        *([f"The MLflow training run was NOT tagged with this decision: {tag_error}."] if tag_error else []),
    ], table=(header, gate_rows))
    metrics |= {"version": version, "wall_time_s": round(time.perf_counter() - t0, 2),
                "n_versions": len(index["models"][model_name]["versions"])}
    _finish(run_json, metrics, gates, expect)
    return metrics


def _write_html(target: Path) -> str | None:
    """The version's ``report.html`` (:mod:`mlipops.promote.html_report`); None when written, else why not: the
    version is registered by now, and ``mlipops report`` rewrites the page."""
    try:
        write_report(target)
    except (MlipopsError, OSError, ValueError) as exc:
        logger.warning(f"{target}/report.html not written: {type(exc).__name__}: {exc}")
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _finish(run_json: Path, metrics: dict, gates: list[dict], expect: dict) -> None:
    """The stage's metrics, gates and headline files; every headline metric (those of stages that do not log to
    MLflow too: defects, nve), the decision and the gates into the training run."""
    write_metrics(REPORT_DIR, metrics)
    (REPORT_DIR / "gates.json").write_text(json.dumps(gates, indent=2) + "\n")
    values = headline_values(expect)
    atomic_write_text(HEADLINE_JSON, json.dumps(values, indent=2) + "\n")
    tracking.log_metrics(run_json, values, into=None)
    info = json.loads(Path(run_json).read_text())
    try:
        c = tracking.client(info["tracking_uri"])
        if tracking.find_run(c, info["run_id"]) is not None:
            for f in ("decision.md", "gates.json"):
                c.log_artifact(info["run_id"], str(REPORT_DIR / f), artifact_path="promotion")
    except Exception as exc:  # noqa: BLE001 - the decision stands in the reports; MLflow is told when it can be
        logger.warning(f"the decision was not logged into MLflow run {info['run_id']}: {type(exc).__name__}: {exc}")


def _training_params(client, run_info: dict) -> dict:
    from mlflow.exceptions import MlflowException

    try:
        params = client.get_run(run_info["run_id"]).data.params
    except MlflowException:
        return {}
    return {k.removeprefix("train."): v for k, v in params.items() if k.startswith("train.")}


def _champion(registry_dir: Path, name: str) -> int | None:
    try:
        return read_registry_index(registry_dir)["models"][name]["aliases"].get("champion")
    except (MlipopsError, KeyError):
        return None
