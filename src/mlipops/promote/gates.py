"""Promotion gates: every metric the validation stages report, checked against ``promote.gates``.

A gate key is ``[report:]metric``: ``report`` names a folder of ``reports/evaluate/`` (``defects``,
``melting``, ``nve``, ``uncertainty``), none means ``reports/evaluate/metrics.json`` itself. A ``*``
matches one dotted part of the key (``test.*.force_mae``: one gate per config_type); a pattern
that matches nothing fails. Each gate row: ``gate`` (the resolved key), ``value``, ``threshold``,
``bound`` (``max``/``min``), ``passed`` and a ``note`` saying why it failed and by how much.

A missing report or metric, or a non-finite value, fails: a gate is never passed by default. A gate
whose config_type (``<split>.<config_type>.*``, ``path.<config_type>.*``, ``defects:<config_type>.*``) is
not in this data, or has no frames in that split, says so (the data's config_types per split: the index's
accepted frames, else the report's own keys) and points to ``mlipops gates init``, which writes a gate set
for the data at hand.
``n_nonfinite_predictions ≤ 0`` is always checked (no NaN in any prediction of the evaluate stage).

With ``expect`` (the promoted model's :func:`mlipops.provenance.model_identity`), every report's
``provenance.json`` must name that model's weights and data version: a report of another model or data
version, or without provenance, fails all its gates with a note saying so (``provenance`` in the row).
A gate declared ``{not_applicable: reason}`` is neither passed nor failed: ``passed`` None, ``bound``
``n/a``, ``not_applicable`` the reason; it never blocks a promotion (the always-checked gate cannot be
declared not applicable).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from mlipops.params import GateBound
from mlipops.pipeline import EVALUATE_REPORTS as EVAL_DIR

ALWAYS = {"n_nonfinite_predictions": GateBound(max=0)}


def _pattern(metric: str) -> re.Pattern:
    return re.compile("^" + r"[^.]+".join(re.escape(part) for part in metric.split("*")) + "$")


def _load(report: str, eval_dir: Path, cache: dict) -> tuple[dict | None, Path]:
    path = eval_dir / report / "metrics.json" if report else eval_dir / "metrics.json"
    if report not in cache:
        try:
            cache[report] = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            cache[report] = None
    return cache[report], path


def _row(key: str, value, bound: GateBound) -> list[dict]:
    rows = []
    for side, limit in (("max", bound.max), ("min", bound.min)):
        if limit is None:
            continue
        r = {"gate": key, "value": value, "threshold": limit, "bound": side}
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            r |= {"passed": False, "note": "not a finite number"}
        else:
            ok = value <= limit if side == "max" else value >= limit
            by = value - limit
            rel = f" ({abs(by / limit) * 100:.0f} %)" if limit else ""
            r |= {"passed": ok, "note": "" if ok else
                  (f"exceeds the maximum by {by:.4g}{rel}" if side == "max"
                   else f"below the minimum by {-by:.4g}{rel}")}
        rows.append(r)
    return rows


def _missing(key: str, bound: GateBound, note: str) -> dict:
    return {"gate": key, "value": None, "threshold": bound.max if bound.max is not None else bound.min,
            "bound": "max" if bound.max is not None else "min", "passed": False, "note": note}


SPLITS = ("train", "val", "test")
# parts of report keys where a config_type would stand that are not one (uncertainty, defects, melting reports)
NOT_CONFIG_TYPES = {"all", "control", "time", "member", "reference", "gate", "scale"}
ADVICE = "remove the gate or mark it not_applicable (`mlipops gates init` writes a gate set for this data)"


def data_config_types(index_path: Path) -> dict[str, set[str]] | None:
    """The data's config_types per split (accepted frames of the coverage index); None without an index."""
    if not Path(index_path).is_file():
        return None
    from mlipops.errors import MlipopsError
    from mlipops.index.build import query

    try:
        df = query("SELECT DISTINCT split, config_type FROM frames WHERE status = 'accepted'", index_path)
    except MlipopsError:
        return None
    out: dict[str, set[str]] = {}
    for split, ct in df.itertuples(index=False):
        out.setdefault(str(split), set()).add(str(ct))
    return out


def _report_config_types(metrics: dict) -> dict[str, set[str]]:
    """Config_types per split as a report's keys name them (``<split>.<config_type>.<metric>``)."""
    out: dict[str, set[str]] = {}
    for k in metrics:
        parts = k.split(".")
        if len(parts) >= 3 and parts[0] in SPLITS + ("path",) and parts[1] not in NOT_CONFIG_TYPES:
            out.setdefault(parts[0], set()).add(parts[1])
    return out


def absent_config_type(report: str, metric: str, metrics: dict, data: dict[str, set[str]] | None) -> str | None:
    """Why a gate's metric cannot exist in this data (its config_type is not there), or None."""
    parts = metric.split(".")
    split = None
    if report in ("", "uncertainty") and len(parts) >= 3 and parts[0] in SPLITS + ("path",):
        split, ct = (parts[0] if parts[0] in SPLITS else None), parts[1]
    elif report == "defects" and len(parts) == 2:
        ct = parts[0]
    else:
        return None
    if ct in NOT_CONFIG_TYPES:
        return None
    if data is None:
        data = _report_config_types(metrics)
        if not data:
            return None
    everywhere = set().union(*data.values()) if data else set()
    pat = _pattern(ct)
    if not any(pat.match(c) for c in everywhere):
        if "*" in ct:
            return f"no config_type of this data matches {ct}: {ADVICE}"
        return f"config_type {ct} is not in this data: {ADVICE}"
    if split is not None and not any(pat.match(c) for c in data.get(split, ())):
        where = ", ".join(sorted(s for s, cs in data.items() if any(pat.match(c) for c in cs)))
        if "*" in ct:
            return f"no config_type of the {split} split matches {ct} (they are in: {where}): {ADVICE}"
        return f"config_type {ct} has no frames in the {split} split of this data (it is in: {where}): {ADVICE}"
    return None


def not_applicable_row(key: str, reason: str) -> dict:
    return {"gate": key, "value": None, "threshold": None, "bound": "n/a", "passed": None,
            "not_applicable": reason, "note": f"not applicable: {reason}"}


def report_dir(report: str, eval_dir: Path = EVAL_DIR) -> Path:
    """The folder of a gate's report (``""``: reports/evaluate itself)."""
    return eval_dir / report if report else eval_dir


def check_gates(gates: dict[str, GateBound], eval_dir: Path = EVAL_DIR, always: bool = True,
                expect: dict | None = None, config_types: dict[str, set[str]] | None = None) -> list[dict]:
    """One row per (resolved key, bound); see the module doc. ``config_types``: the data's config_types per
    split (:func:`data_config_types`), which a missing metric's note is judged against (None: the report's keys)."""
    from mlipops.provenance import mismatch

    cache: dict = {}
    wrong: dict = {}  # report -> why its provenance is not the promoted model's (None: it is)
    rows = []
    merged = {**gates, **{k: v for k, v in ALWAYS.items() if k not in gates or gates[k].not_applicable}} \
        if always else gates
    for key, bound in merged.items():
        if bound.not_applicable:
            rows.append(not_applicable_row(key, bound.not_applicable))
            continue
        report, _, metric = key.rpartition(":")
        metrics, path = _load(report, eval_dir, cache)
        if metrics is None:
            rows.append(_missing(key, bound, f"report missing: {path}"))
            continue
        if "*" in metric:
            pat = _pattern(metric)
            keys = sorted(k for k in metrics if pat.match(k))
            why = None if keys else absent_config_type(report, metric, metrics, config_types)
            new = [] if keys else [_missing(key, bound, f"no metric of {path} matches" + (f": {why}" if why else ""))]
            for k in keys:
                new += _row(f"{report}:{k}" if report else k, metrics[k], bound)
        elif metric not in metrics:
            why = absent_config_type(report, metric, metrics, config_types)
            new = [_missing(key, bound, f"metric missing in {path}" + (f": {why}" if why else ""))]
        else:
            new = _row(key, metrics[metric], bound)
        if expect is not None:
            if report not in wrong:
                wrong[report] = mismatch(report_dir(report, eval_dir), expect)
            if wrong[report]:
                for r in new:
                    r |= {"passed": False, "provenance": wrong[report],
                          "note": wrong[report] + (f"; {r['note']}" if r.get("note") else "")}
        rows += new
    return rows
