"""The quarantine table: one row per frame kept out of the data, with the check(s) it failed and why, and its
extxyz text (nothing is dropped). Ingest writes the frames it could not read or found twice
(``rejected_frame``); the validate stage adds the frames that failed its checks (:func:`quarantine_row`) and
writes the whole table (:func:`typed`), as an active-learning campaign does for its own curated data."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from mlipops.frames import Rejected

REJECT_COLUMNS = ["frame_id", "source", "source_index", "config_type", "split", "check", "reason", "extxyz"]


def rejected_frame(records: list[Rejected]) -> pd.DataFrame:
    rows = [{"frame_id": r.frame_id, "source": r.source, "source_index": r.source_index,
             "config_type": r.config_type, "split": None, "check": r.check, "reason": r.reason,
             "extxyz": r.raw} for r in records]
    return pd.DataFrame(rows, columns=REJECT_COLUMNS).astype(
        {"source_index": "int64", "frame_id": "string", "source": "string", "config_type": "string",
         "split": "string", "check": "string", "reason": "string", "extxyz": "string"})


def quarantine_row(frame_id, source, source_index, config_type, split, checks: Iterable[tuple[str, str]],
                   extxyz: str) -> dict:
    """The row of a frame that failed the validate checks ``checks`` ((check, reason) pairs): the checks
    comma-joined, the reasons joined by "; ", a missing ``source_index`` -1."""
    checks = list(checks)
    return {"frame_id": frame_id, "source": source,
            "source_index": int(source_index if source_index is not None else -1),
            "config_type": config_type, "split": split, "check": ",".join(c for c, _ in checks),
            "reason": "; ".join(r for _, r in checks), "extxyz": extxyz}


def typed(quarantine: pd.DataFrame) -> pd.DataFrame:
    """The quarantine table (:data:`REJECT_COLUMNS` and ``stage``) with the column types it is written with:
    strings, ``source_index`` int64."""
    quarantine = quarantine.astype({c: "string" for c in REJECT_COLUMNS if c != "source_index"} | {"stage": "string"})
    quarantine["source_index"] = quarantine["source_index"].astype("int64")
    return quarantine
