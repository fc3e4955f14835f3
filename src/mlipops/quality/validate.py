"""Run the great-expectations suite (``suite.json``) on the per-frame table of the ingested data.

Every frame that fails any expectation goes to ``data/curated/quarantine.parquet`` with the
failing ``check`` and a ``reason`` naming the values; the rest go to ``accepted.extxyz``. Frames
rejected earlier by ingest (unparseable, duplicates) join the quarantine too, so
accepted + quarantined = every frame read from the sources. Nothing is deleted.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from ase import Atoms

from mlipops.descriptors import neighbor_list
from mlipops.errors import StageInputError
from mlipops.frames import labels, read_extxyz, to_extxyz_string, write_extxyz
from mlipops.ingest import FRAMES as INGESTED, REJECTED as INGEST_REJECTED, REJECT_COLUMNS
from mlipops.params import ValidateParams
from mlipops.report import md_table, write_markdown, write_metrics

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

SUITE = Path(__file__).with_name("suite.json")
CURATED = Path("data/curated")
ACCEPTED = CURATED / "accepted.extxyz"
QUARANTINE = CURATED / "quarantine.parquet"
REPORT_DIR = Path("reports/validate")


def _min_distance(a: Atoms, cutoff: float) -> float:
    if len(a) < 2:
        return float(cutoff)
    _, _, _, d = neighbor_list(a.positions, a.cell.array, a.pbc, cutoff)
    return float(d.min()) if len(d) else float(cutoff)


def frame_table(frames: list[Atoms], allowed_species: list[str], distance_probe: float) -> pd.DataFrame:
    """One row per frame with the columns the suite checks (labels, shapes, geometry, species)."""
    allowed = set(allowed_species)
    rows = []
    for a in frames:
        e, f, s = labels(a)
        bad = [name for name, v in (("energy", e), ("forces", f), ("stress", s))
               if v is not None and not np.all(np.isfinite(v))]
        species = sorted(set(a.get_chemical_symbols()))
        rows.append({
            "frame_id": a.info["frame_id"], "source": a.info.get("source"),
            "source_index": int(a.info.get("source_index", -1)), "config_type": a.info.get("config_type"),
            "split": a.info.get("split"), "n_atoms": len(a),
            "has_energy": e is not None, "has_forces": f is not None or "forces_shape" in a.info,
            "forces_shape": a.info.get("forces_shape", f"{len(a)}x3" if f is not None else None),
            "forces_shape_ok": "forces_shape" not in a.info,
            "labels_finite": not bad, "bad_label": ",".join(bad) or None,
            "energy": e, "energy_per_atom": None if e is None else e / len(a),
            "max_abs_force": float(np.max(np.abs(f))) if f is not None and f.size and np.all(np.isfinite(f)) else None,
            "min_distance": _min_distance(a, distance_probe),
            "species": ",".join(species), "species_allowed": set(species) <= allowed,
        })
    return pd.DataFrame(rows)


def _suite(context):
    import great_expectations as gx

    spec = json.loads(SUITE.read_text())
    suite = gx.ExpectationSuite(name=spec["name"], expectations=spec["expectations"])
    return context.suites.add(suite)


def validate_frames(table: pd.DataFrame, p: ValidateParams) -> tuple[dict[int, list[tuple[str, str]]], dict]:
    """Run the suite through great-expectations; return {row: [(check, reason)]} and the GX result."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # older/newer GX without this knob: progress bars are cosmetic
        pass
    source = context.data_sources.add_pandas("mlipops")
    asset = source.add_dataframe_asset(name="frames")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
        batch_parameters={"dataframe": table.reset_index(drop=True)})
    suite = _suite(context)
    params = {"min_interatomic_distance": p.min_interatomic_distance, "max_abs_force": p.max_abs_force}
    result = batch.validate(suite, expectation_parameters=params,
                            result_format={"result_format": "COMPLETE"})
    meta = {e.get("kwargs", {}).get("column") + ":" + e["type"]: e["meta"]
            for e in json.loads(SUITE.read_text())["expectations"]}
    failures: dict[int, list[tuple[str, str]]] = {}
    table = table.reset_index(drop=True)
    for r in result.results:
        cfg = r.expectation_config
        m = meta[f"{cfg.kwargs['column']}:{cfg.type}"]
        if r.exception_info and r.exception_info.get("raised_exception"):
            raise StageInputError(f"great-expectations could not run {cfg.type} on column "
                                  f"{cfg.kwargs['column']}: {r.exception_info.get('exception_message')}")
        for idx in r.result.get("unexpected_index_list") or []:
            row = table.iloc[int(idx)].to_dict()
            values = row | {"min_interatomic_distance": p.min_interatomic_distance,
                            "max_abs_force_limit": p.max_abs_force}
            try:
                reason = m["reason"].format(**values)
            except (KeyError, ValueError, TypeError):
                reason = m["reason"]
            failures.setdefault(int(idx), []).append((m["check"], reason))
    return failures, result.to_json_dict()


def run(p: ValidateParams) -> dict:
    t0 = time.perf_counter()
    if not INGESTED.is_file():
        raise StageInputError("ingested frames missing: run `dvc repro ingest` first", file=str(INGESTED))
    # an empty file: ingest rejected every frame read (they are all in INGEST_REJECTED)
    frames, unreadable = read_extxyz(INGESTED) if INGESTED.stat().st_size else ([], [])
    if unreadable:
        raise StageInputError(f"ingest output is corrupt: {unreadable[0].reason}", file=str(INGESTED))
    table = frame_table(frames, p.allowed_species, max(2.0 * p.min_interatomic_distance, 3.0))
    failures, gx_result = validate_frames(table, p) if frames else ({}, {"success": True, "results": []})
    accepted, quarantined = [], []
    for k, a in enumerate(frames):
        if k in failures:
            checks = failures[k]
            quarantined.append({
                "frame_id": a.info["frame_id"], "source": a.info.get("source"),
                "source_index": int(a.info.get("source_index", -1)), "config_type": a.info.get("config_type"),
                "split": a.info.get("split"), "check": ",".join(c for c, _ in checks),
                "reason": "; ".join(r for _, r in checks), "extxyz": to_extxyz_string(a)})
        else:
            accepted.append(a)
    earlier = pd.read_parquet(INGEST_REJECTED) if INGEST_REJECTED.is_file() else pd.DataFrame(columns=REJECT_COLUMNS)
    quarantine = pd.concat([earlier, pd.DataFrame(quarantined, columns=REJECT_COLUMNS)], ignore_index=True)
    quarantine["stage"] = ["ingest"] * len(earlier) + ["validate"] * len(quarantined)
    quarantine = quarantine.astype({c: "string" for c in REJECT_COLUMNS if c != "source_index"} | {"stage": "string"})
    quarantine["source_index"] = quarantine["source_index"].astype("int64")
    write_extxyz(ACCEPTED, accepted)
    QUARANTINE.parent.mkdir(parents=True, exist_ok=True)
    quarantine.to_parquet(QUARANTINE, index=False)
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    (REPORT_DIR / "validation_result.json").write_text(json.dumps(gx_result, indent=1, default=str))
    n_in = len(frames) + len(earlier)
    by_check = Counter(c for cs in quarantine["check"].fillna("") for c in cs.split(",") if c)
    metrics = {"n_ingested": n_in, "n_accepted": len(accepted), "n_quarantined": len(quarantine),
               "gx_success": bool(gx_result["success"]), "wall_time_s": round(time.perf_counter() - t0, 2)}
    metrics.update({f"n_quarantined.{c}": n for c, n in sorted(by_check.items())})
    write_metrics(REPORT_DIR, metrics)
    exp_rows = [(r["expectation_config"]["type"], r["expectation_config"]["kwargs"].get("column"),
                 "pass" if r["success"] else "FAIL", r["result"].get("unexpected_count", 0))
                for r in gx_result["results"]]
    sample = quarantine[["source", "source_index", "config_type", "check", "reason"]].head(30)
    write_markdown(REPORT_DIR / "summary.md", "Validation (great-expectations)", [
        f"{n_in} frames in, {len(accepted)} accepted, {len(quarantine)} quarantined "
        f"(kept with their raw text in `{QUARANTINE}`).",
        md_table(("expectation", "column", "result", "failing frames"), exp_rows),
        "## Quarantined frames (first 30)",
    ], table=(tuple(sample.columns), sample.itertuples(index=False)))
    return metrics
