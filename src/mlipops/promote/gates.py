"""Promotion gates: every metric the validation stages report, checked against ``promote.gates``.

A gate key is ``[report:]metric``: ``report`` names a folder of ``reports/evaluate/`` (``defects``,
``melting``, ``nve``, ``uncertainty``), none means ``reports/evaluate/metrics.json`` itself. A ``*``
matches one dotted part of the key (``test.*.force_mae``: one gate per config_type); a pattern
that matches nothing fails. Each gate row: ``gate`` (the resolved key), ``value``, ``threshold``,
``bound`` (``max``/``min``), ``passed`` and a ``note`` saying why it failed and by how much.

A missing report or metric, or a non-finite value, fails: a gate is never passed by default.
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

EVAL_DIR = Path("reports/evaluate")
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
                  (f"exceeds the maximum by {by:.4g}{rel}" if side == "max" else f"below the minimum by {-by:.4g}{rel}")}
        rows.append(r)
    return rows


def _missing(key: str, bound: GateBound, note: str) -> dict:
    return {"gate": key, "value": None, "threshold": bound.max if bound.max is not None else bound.min,
            "bound": "max" if bound.max is not None else "min", "passed": False, "note": note}


def not_applicable_row(key: str, reason: str) -> dict:
    return {"gate": key, "value": None, "threshold": None, "bound": "n/a", "passed": None,
            "not_applicable": reason, "note": f"not applicable: {reason}"}


def report_dir(report: str, eval_dir: Path = EVAL_DIR) -> Path:
    """The folder of a gate's report (``""``: reports/evaluate itself)."""
    return eval_dir / report if report else eval_dir


def check_gates(gates: dict[str, GateBound], eval_dir: Path = EVAL_DIR, always: bool = True,
                expect: dict | None = None) -> list[dict]:
    """One row per (resolved key, bound); see the module doc."""
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
            new = [] if keys else [_missing(key, bound, f"no metric of {path} matches")]
            for k in keys:
                new += _row(f"{report}:{k}" if report else k, metrics[k], bound)
        elif metric not in metrics:
            new = [_missing(key, bound, f"metric missing in {path}")]
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
