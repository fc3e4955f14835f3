"""The headline metrics: the dozen numbers a user compares between two models, with units in their names.

Every stage writes its detailed metrics (``reports/<stage>/metrics.json``: hundreds of keys per config_type,
path, member and epoch) and logs them to the model's MLflow training run under their stage's prefix
(``final_``, ``eval_``, ``eval_melting_`` ...). A few of them are what a model is judged by: validation and test
errors in meV, the calibration of σ, the melting point and its bias, NVE stability, the promotion decision. This
module names them once (:data:`HEADLINE`), so that

* each stage logs its own headline numbers into the training run as they are computed (:func:`pick`, through
  :func:`mlipops.tracking.log_headline`): the MLflow runs list and compare view show them as plain columns;
* ``promote`` writes all of them into one small flat DVC metrics file (:data:`~mlipops.pipeline.HEADLINE_JSON`,
  :func:`collect`), which ``dvc metrics show`` / ``dvc exp show`` show across commits and experiments.

A number that a stage did not produce (no melting run, a NaN) is left out, never written as 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from mlipops.pipeline import (DEFECTS_REPORTS, EVALUATE_REPORTS, MELTING_REPORTS, NVE_REPORTS, PROMOTE_REPORTS,
                              TRAIN_REPORTS, UNCERTAINTY_REPORTS)


DIGITS = 4  # significant digits: numbers to read in a table column (the detailed metrics keep full precision)


@dataclass(frozen=True)
class Headline:
    name: str  # the MLflow metric and the headline.json key: units in the name
    source: Path  # the stage's flat metrics.json it is read from
    key: str  # its key there
    scale: float = 1.0  # name's units per source units
    meaning: str = ""


HEADLINE: tuple[Headline, ...] = (
    Headline("val_energy_mae_meV_per_atom", TRAIN_REPORTS / "metrics.json", "val.energy_mae_per_atom", 1000.0,
             "ensemble mean, validation split"),
    Headline("val_force_mae_meV_per_A", TRAIN_REPORTS / "metrics.json", "val.force_mae", 1000.0,
             "ensemble mean, validation split, per force component"),
    Headline("train_wall_time_min", TRAIN_REPORTS / "metrics.json", "wall_time_s", 1.0 / 60.0,
             "the train stage, all members"),
    Headline("test_energy_mae_meV_per_atom", EVALUATE_REPORTS / "metrics.json",
             "test.without_paths.energy_mae_per_atom", 1000.0,
             "test split, every config_type (held-out ones included) but the reaction paths followed out of the "
             "hull (evaluate.paths.config_types)"),
    Headline("test_force_mae_meV_per_A", EVALUATE_REPORTS / "metrics.json", "test.without_paths.force_mae", 1000.0,
             "test split but the reaction paths, per force component"),
    Headline("force_miscalibration_area", UNCERTAINTY_REPORTS / "metrics.json",
             "test.all.force_miscalibration_area_recalibrated", 1.0,
             "σ_F as the promoted calculator reports it (recalibrated on val), test split: 0 = calibrated"),
    Headline("defect_force_mae_meV_per_A", DEFECTS_REPORTS / "metrics.json", "all.force_mae_atom", 1000.0,
             "vacancies, surfaces and adatoms of a model trained on the same data"),
    Headline("nve_energy_drift_meV_per_atom_per_ps", NVE_REPORTS / "metrics.json",
             "abs_energy_drift_meV_per_atom_per_ps", 1.0, "|drift| of the conserved energy in NVE MD"),
    Headline("tm_K", MELTING_REPORTS / "metrics.json", "tm_mean", 1.0, "ensemble melting point (coexistence)"),
    Headline("tm_bias_K", MELTING_REPORTS / "metrics.json", "bias", 1.0, "ensemble Tm − reference Tm"),
    Headline("tm_p_within_window", MELTING_REPORTS / "metrics.json", "p_within_window", 1.0,
             "P(|Tm − Tm_ref| ≤ evaluate.melting.window_K)"),
    Headline("promoted", PROMOTE_REPORTS / "metrics.json", "promoted", 1.0, "1: registered, 0: rejected"),
    Headline("gates_failed", PROMOTE_REPORTS / "metrics.json", "n_gates_failed", 1.0, "applicable gates failed"),
)


def pick(source: Path | str, metrics: dict) -> dict[str, float]:
    """The headline numbers among one stage's flat ``metrics`` (those read from ``source``), in their units;
    missing and non-finite ones left out."""
    source = Path(source)
    out = {}
    for h in HEADLINE:
        v = metrics.get(h.key) if h.source == source else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[h.name] = float(f"{float(v) * h.scale:.{DIGITS}g}")
        elif isinstance(v, bool) and h.source == source:
            out[h.name] = float(v)
    return out


def collect(root: Path | str = ".", skip: tuple[Path, ...] = ()) -> dict[str, float]:
    """Every headline number the reports under ``root`` hold (one flat dict, :data:`HEADLINE`'s order), those
    read from the sources ``skip`` left out."""
    root = Path(root)
    out: dict[str, float] = {}
    for source in dict.fromkeys(h.source for h in HEADLINE if h.source not in skip):
        path = root / source
        try:
            metrics = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            metrics = {}
        out |= pick(source, metrics) if isinstance(metrics, dict) else {}
    return {h.name: out[h.name] for h in HEADLINE if h.name in out}


def meanings() -> list[tuple[str, str]]:
    """(name, what it is) for the docs and the model card."""
    return [(h.name, h.meaning) for h in HEADLINE]
