"""Curation of an iteration's labels: the pipeline's ingest, validate and index steps, on the grown data.

An active-learning campaign never writes the pipeline's own ``data/curated`` or ``data/index.duckdb``
(they are outputs of other stages). It keeps its own curated copy per iteration,
``<work_dir>/iter_<i>/curated/{accepted.extxyz, quarantine.parquet, index.duckdb}``, grown from the
previous iteration's (the first from ``active.base_data`` / ``active.base_quarantine``):

1. **ingest**: the labelled file is read like any source (canonical frames, content ``frame_id``;
   an unreadable frame is a quarantine row with the reader's check), a frame already in the data is a
   quarantine row (check ``duplicate``), and the rest get their split by ``ingest.split`` (a hash of
   the frame id: the same rule, so the same frame always lands in the same split);
2. **validate**: :func:`mlipops.quality.validate.decide` (the great-expectations suites and the
   Cook's-distance outlier test) runs on the old accepted frames *and* the new ones, so a new label
   is judged against all the data; only new frames are quarantined (the old ones were decided by the
   validate stage). Releases in ``data/quarantine_releases.yaml`` apply as in the validate stage.
   A quarantined frame keeps its raw text, its checks and the reason, with ``stage`` ``active``;
3. **index**: :func:`mlipops.index.build.build_index` over the grown accepted data and quarantine
   (coverage and hull of the campaign's data; the next iteration's γ uses it).

Nothing is dropped: labelled frames = accepted new + quarantined new.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pandas as pd

from mlipops.errors import StageInputError
from mlipops.frames import Rejected, read_extxyz, read_frames, to_extxyz_string, write_extxyz
from mlipops.ingest import assign_splits
from mlipops.params import Params
from mlipops.paths import atomic_path
from mlipops.quarantine import REJECT_COLUMNS, quarantine_row, rejected_frame, typed


def _read_accepted(path: Path):
    if not path.is_file():
        raise StageInputError("curated data missing: run `dvc repro validate` first", file=str(path))
    frames, bad = read_extxyz(path) if path.stat().st_size else ([], [])
    if bad:
        raise StageInputError(f"curated data is corrupt: {bad[0].reason}", file=str(path), frame=bad[0].source_index)
    return frames


def _read_quarantine(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise StageInputError("quarantine file missing: run `dvc repro validate` first", file=str(path))
    return pd.read_parquet(path)


def curate(new_file: str | Path, prev_accepted: str | Path, prev_quarantine: str | Path, p: Params,
           out_dir: str | Path) -> dict:
    """Ingest, validate and index ``new_file`` on top of the previous curated data, into ``out_dir``.
    Returns counts (``n_labelled``, ``n_accepted_new``, ``n_quarantined_new``, ``n_quarantined.<check>``,
    ``n_accepted``, ``n_train``, ``n_new.<split>``) and the paths written."""
    from mlipops.index.build import build_index
    from mlipops.pipeline import RELEASES
    from mlipops.quality.releases import covering_release, load_releases
    from mlipops.quality.validate import decide

    t0 = time.perf_counter()
    new_file, out_dir = Path(new_file), Path(out_dir)
    prev = _read_accepted(Path(prev_accepted))
    q_prev = _read_quarantine(Path(prev_quarantine))
    frames, rejected = read_frames(new_file, "extxyz", source=new_file.stem) if new_file.is_file() else ([], [])
    known = {a.info["frame_id"]: a for a in prev} | {str(fid): None for fid in q_prev["frame_id"].dropna()}
    fresh = []
    for a in frames:
        fid = a.info["frame_id"]
        if fid in known:
            rejected.append(Rejected(a.info["source"], a.info["source_index"], "duplicate",
                                     f"same structure as a frame already in the data (frame_id {fid[:12]})",
                                     to_extxyz_string(a), fid, a.info["config_type"]))
            continue
        known[fid] = a
        fresh.append(a)
    assign_splits(fresh, p.ingest.split)
    n_prev = len(prev)
    decision = decide(prev + fresh, p.validate_, p.descriptors)
    releases = load_releases(RELEASES)
    accepted_new, rows = [], []
    for j, a in enumerate(fresh):
        checks = decision.failures.get(n_prev + j)
        if checks and not covering_release(releases, a.info["frame_id"], checks):
            rows.append(quarantine_row(a.info["frame_id"], a.info.get("source"), a.info.get("source_index", -1),
                                       a.info.get("config_type"), a.info.get("split"), checks, to_extxyz_string(a)))
        else:
            accepted_new.append(a)
    new_q = pd.concat([rejected_frame(rejected), pd.DataFrame(rows, columns=REJECT_COLUMNS)], ignore_index=True)
    new_q["stage"] = "active"
    quarantine = pd.concat([q_prev, new_q], ignore_index=True) if len(new_q) else q_prev.copy()
    quarantine = typed(quarantine)
    out_dir.mkdir(parents=True, exist_ok=True)
    accepted = prev + accepted_new
    acc_path, q_path, idx_path = out_dir / "accepted.extxyz", out_dir / "quarantine.parquet", out_dir / "index.duckdb"
    write_extxyz(acc_path, accepted)
    with atomic_path(q_path) as tmp:
        quarantine.to_parquet(tmp, index=False)
    index_stats = build_index(p.index, p.descriptors, accepted=acc_path, quarantine=q_path, out=idx_path)
    by_check = Counter(c for cs in new_q["check"].fillna("") for c in cs.split(",") if c)
    by_split = Counter(a.info["split"] for a in accepted_new)
    n_read = len(frames) + sum(1 for r in rejected if r.check != "duplicate")
    return ({"n_labelled": n_read, "n_accepted_new": len(accepted_new), "n_quarantined_new": len(new_q),
             "n_accepted": len(accepted), "n_train": sum(a.info.get("split") == "train" for a in accepted),
             "index.n_atoms": index_stats["n_atoms"],
             "wall_time_s": round(time.perf_counter() - t0, 2)}
            | {f"n_quarantined.{c}": n for c, n in sorted(by_check.items())}
            | {f"n_new.{s}": n for s, n in sorted(by_split.items())}
            | {"accepted": str(acc_path), "quarantine": str(q_path), "index": str(idx_path)})
