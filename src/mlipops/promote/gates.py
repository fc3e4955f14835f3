"""Promotion gates: every metric the validation stages report, checked against ``promote.gates``.

A gate key is ``[report:]metric``: ``report`` names a folder of ``reports/evaluate/`` (``defects``,
``melting``, ``nve``, ``uncertainty``), none means ``reports/evaluate/metrics.json`` itself. A ``*``
matches one dotted part of the key (``test.*.force_mae``: one gate per config_type); a pattern
that matches nothing fails. Each gate row: ``gate`` (the resolved key), ``value``, ``threshold``,
``bound`` (``max``/``min``), ``passed`` and a ``note`` saying why it failed and by how much.

A missing report or metric, or a non-finite value, fails: a gate is never passed by default.
``n_nonfinite_predictions ≤ 0`` is always checked (no NaN in any prediction of the evaluate stage).
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


def check_gates(gates: dict[str, GateBound], eval_dir: Path = EVAL_DIR, always: bool = True) -> list[dict]:
    """One row per (resolved key, bound); see the module doc."""
    cache: dict = {}
    rows = []
    for key, bound in ({**gates, **{k: v for k, v in ALWAYS.items() if k not in gates}} if always else gates).items():
        report, _, metric = key.rpartition(":")
        metrics, path = _load(report, eval_dir, cache)
        if metrics is None:
            rows.append({"gate": key, "value": None, "threshold": bound.max if bound.max is not None else bound.min,
                         "bound": "max" if bound.max is not None else "min", "passed": False,
                         "note": f"report missing: {path}"})
            continue
        if "*" in metric:
            pat = _pattern(metric)
            keys = sorted(k for k in metrics if pat.match(k))
            if not keys:
                rows.append({"gate": key, "value": None, "threshold": bound.max if bound.max is not None else bound.min,
                             "bound": "max" if bound.max is not None else "min", "passed": False,
                             "note": f"no metric of {path} matches"})
            for k in keys:
                rows += _row(f"{report}:{k}" if report else k, metrics[k], bound)
            continue
        if metric not in metrics:
            rows.append({"gate": key, "value": None, "threshold": bound.max if bound.max is not None else bound.min,
                         "bound": "max" if bound.max is not None else "min", "passed": False,
                         "note": f"metric missing in {path}"})
            continue
        rows += _row(key, metrics[metric], bound)
    return rows
