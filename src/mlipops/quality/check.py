"""``mlipops check FILE...``: what the pipeline would do with new frames, touching no dataset.

Runs the ingest readers, the whole great-expectations suite and, against the current training
data (``data/curated/accepted.extxyz``, training split), the Cook's-distance outlier test on the
given files, and returns one verdict per frame: ``accepted``, ``would be quarantined`` (with the
checks and reasons the validate stage would record) or ``unreadable`` (the ingest reader's
reason). Nothing is written: the new frames are examined next to the training frames in memory.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mlipops.errors import MlipopsError
from mlipops.frames import read_frames
from mlipops.params import DescriptorParams, ValidateParams

COLUMNS = ["file", "frame", "config_type", "n_atoms", "verdict", "checks", "reason"]


def check_files(paths: list[Path], p: ValidateParams, descriptors: DescriptorParams,
                training: Path | None = Path("data/curated/accepted.extxyz")) -> pd.DataFrame:
    from mlipops.quality.validate import build_tables, find_outliers, validate_frames

    rows, frames, where = [], [], []
    for path in paths:
        if not Path(path).is_file():
            raise MlipopsError("no such file", file=str(path))
        try:
            good, bad = read_frames(path, source=str(path))
        except MlipopsError as exc:  # the whole file is unreadable: say so, go on with the others
            rows.append({"file": str(path), "frame": exc.frame, "config_type": None, "n_atoms": None,
                         "verdict": "unreadable", "checks": "parse", "reason": str(exc)})
            continue
        for r in bad:
            rows.append({"file": str(path), "frame": r.source_index, "config_type": r.config_type,
                         "n_atoms": None, "verdict": "unreadable", "checks": r.check, "reason": r.reason})
        for a in good:
            frames.append(a)
            where.append((str(path), int(a.info.get("source_index", len(where)))))
    failures: dict[int, list[tuple[str, str]]] = {}
    notes: dict[int, str] = {}
    if frames:
        table, atoms = build_tables(frames, p)
        failures, _ = validate_frames(table, p, atoms)
        passed = [k for k in range(len(frames)) if k not in failures]
        train = []
        if training is not None and Path(training).is_file() and Path(training).stat().st_size:
            from mlipops.frames import read_extxyz

            current, _ = read_extxyz(training)
            train = [a for a in current if a.info.get("split") == p.outliers.training_split]
        # the surrogate compares a frame with training frames of its kind: a config_type the training
        # data lacks (a dimer among crystals) is new physics to a linear model, not a wrong label
        kinds = {a.info.get("config_type") for a in train}
        examined = [k for k in passed if frames[k].info.get("config_type") in kinds]
        for k in passed:
            if k not in examined:
                notes[k] = (f"outlier test not applicable: no training frame of config_type "
                            f"{frames[k].info.get('config_type')!r}")
        if p.outliers.enabled and train and examined:
            pool = train + [frames[k].copy() for k in examined]
            for a, k in zip(pool[len(train):], examined):
                a.calc = frames[k].calc
                a.info["split"] = p.outliers.training_split
            flagged, _, _ = find_outliers(pool, p, descriptors)
            for j, reason in flagged.items():
                if j >= len(train):
                    failures.setdefault(examined[j - len(train)], []).append(("influential_outlier", reason))
    for k, a in enumerate(frames):
        checks = failures.get(k, [])
        rows.append({"file": where[k][0], "frame": where[k][1], "config_type": a.info.get("config_type"),
                     "n_atoms": len(a), "verdict": "would be quarantined" if checks else "accepted",
                     "checks": ",".join(c for c, _ in checks) or None,
                     "reason": "; ".join(r for _, r in checks) or notes.get(k)})
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["frame"] = df["frame"].astype("Int64")
    df["n_atoms"] = df["n_atoms"].astype("Int64")
    return df.sort_values(["file", "frame"], kind="stable").reset_index(drop=True)
