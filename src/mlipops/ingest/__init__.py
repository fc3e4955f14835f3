"""The ``ingest`` stage: read every source, canonicalize, de-duplicate, assign splits.

Outputs ``data/ingested/frames.extxyz`` (every usable frame, with ``split``) and
``data/ingested/rejected.parquet`` (every frame read but not usable: unparseable frames and exact
duplicates, each with ``check``, ``reason`` and its raw text). Nothing read is ever dropped:
frames read = frames written + rows rejected.

Provenance is the pipeline's (:mod:`mlipops.frames`): a frame's ``source`` is its file's name (no
two sources may share one), ``source_index`` its position there, ``split`` drawn here; ``oracle_*``
is kept only from a source whose ``<file>.provenance.json`` manifest verifies (written by
``mlipops generate`` / ``active run``); whatever else a file claims is kept as ``file_<key>``.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path

import pandas as pd
from ase import Atoms

from mlipops.errors import FrameFormatError
from mlipops.frames import Rejected, read_frames, source_name, to_extxyz_string, verified_manifest, write_extxyz
from mlipops.params import IngestParams, SplitParams
from mlipops.report import write_markdown, write_metrics

OUT_DIR = Path("data/ingested")
FRAMES = OUT_DIR / "frames.extxyz"
REJECTED = OUT_DIR / "rejected.parquet"
REPORT_DIR = Path("reports/ingest")
REJECT_COLUMNS = ["frame_id", "source", "source_index", "config_type", "split", "check", "reason", "extxyz"]


def rejected_frame(records: list[Rejected]) -> pd.DataFrame:
    rows = [{"frame_id": r.frame_id, "source": r.source, "source_index": r.source_index,
             "config_type": r.config_type, "split": None, "check": r.check, "reason": r.reason,
             "extxyz": r.raw} for r in records]
    return pd.DataFrame(rows, columns=REJECT_COLUMNS).astype(
        {"source_index": "int64", "frame_id": "string", "source": "string", "config_type": "string",
         "split": "string", "check": "string", "reason": "string", "extxyz": "string"})


def _stable_unit(frame_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by the frame's content and the seed (splits stable under reordering)."""
    h = hashlib.sha256(f"{seed}:{frame_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def assign_splits(frames: list[Atoms], rule: SplitParams) -> None:
    """Set ``info['split']`` in place by the declared rule.

    ``config_type``: frames whose config_type is in ``test_config_types`` are test; the rest are
    split train/val/test by ``val_fraction`` / ``test_fraction``. ``random``: every frame by the
    fractions. The draw is a hash of (seed, frame_id), so a frame keeps its split when others are
    added or the sources are reordered. A config_type of 3 frames or more that drew fewer than
    ``min_per_config_type`` val or test frames gets them from its training draws nearest to the cut.

    ``keep_in_train`` {config_type: f}: of that config_type's training and validation frames a stable (hashed)
    fraction f stays and the rest get split ``unused`` (kept and indexed, never trained on, never used to pick
    the best epoch: validation frames of a kind the model never sees would stop training early); the test
    frames do not change, so a sweep over f is judged on the same frames.
    """
    held_out = set(rule.test_config_types) if rule.method == "config_type" else set()
    groups: dict[str, list[tuple[float, Atoms]]] = {}
    for a in frames:
        if a.info["config_type"] in held_out:
            a.info["split"] = "test"
            continue
        u = _stable_unit(a.info["frame_id"], rule.seed)
        a.info["split"] = ("test" if u < rule.test_fraction
                           else "val" if u < rule.test_fraction + rule.val_fraction else "train")
        groups.setdefault(a.info["config_type"], []).append((u, a))
    # at least min_per_config_type of every config_type (of 3 frames or more) in val and in test: taken from the
    # training draws nearest to the cut (u just above it), else from the other evaluation split, never a split's
    # last frame; the choice is as stable as the draw itself
    for group in groups.values():
        if len(group) < 3:
            continue
        for split, frac in (("test", rule.test_fraction), ("val", rule.val_fraction)):
            need = rule.min_per_config_type - sum(a.info["split"] == split for _, a in group) if frac > 0 else 0
            while need > 0:
                counts = Counter(a.info["split"] for _, a in group)
                donors = [ua for ua in group if ua[1].info["split"] != split and counts[ua[1].info["split"]] > 1]
                if not donors:
                    break
                _, a = min(donors, key=lambda ua: (ua[1].info["split"] != "train", ua[0]))
                a.info["split"] = split
                need -= 1
    for a in frames:
        keep = rule.keep_in_train.get(a.info["config_type"])
        if (a.info["split"] in ("train", "val") and keep is not None
                and _stable_unit("keep:" + a.info["frame_id"], rule.seed) >= keep):
            a.info["split"] = "unused"


def ingest(p: IngestParams) -> tuple[list[Atoms], pd.DataFrame, dict]:
    frames: list[Atoms] = []
    rejected: list[Rejected] = []
    n_read = 0
    names: dict[str, int] = {}
    for k, src in enumerate(p.sources):
        path = Path(src.path)
        if not path.exists():
            raise FrameFormatError(f"source listed in params.yaml ingest.sources[{k}] not found",
                                   file=str(path))
        name = source_name(path)  # each frame's `source`: (source, source_index) names one frame
        if name in names:
            raise FrameFormatError(f"ingest.sources[{k}] has the source name {name!r} (the file's name) of "
                                   f"ingest.sources[{names[name]}]: rename one file", file=str(path))
        names[name] = k
        got, bad = read_frames(path, src.format, source=name, default_config_type=src.config_type)
        n_read += len(got) + len(bad)
        frames += got
        rejected += bad
    seen: dict[str, Atoms] = {}
    unique: list[Atoms] = []
    for a in frames:
        fid = a.info["frame_id"]
        if fid in seen:
            first = seen[fid]
            rejected.append(Rejected(
                a.info["source"], a.info["source_index"], "duplicate",
                f"same structure as {first.info['source']} frame {first.info['source_index']} "
                f"(frame_id {fid[:12]})", to_extxyz_string(a), fid, a.info["config_type"]))
            continue
        seen[fid] = a
        unique.append(a)
    assign_splits(unique, p.split)
    stats = {"n_read": n_read, "n_frames": len(unique), "n_rejected": len(rejected)}
    return unique, rejected_frame(rejected), stats


def run(p: IngestParams) -> dict:
    t0 = time.perf_counter()
    frames, rejected, stats = ingest(p)
    write_extxyz(FRAMES, frames)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    rejected.to_parquet(REJECTED, index=False)
    by_split = Counter(a.info["split"] for a in frames)
    by_check = Counter(rejected["check"].tolist())
    metrics = dict(stats)
    metrics.update({f"n_frames.{s}": by_split.get(s, 0) for s in ("train", "val", "test", "unused")})
    metrics.update({f"n_rejected.{c}": n for c, n in sorted(by_check.items())})
    metrics["wall_time_s"] = round(time.perf_counter() - t0, 2)
    write_metrics(REPORT_DIR, metrics)
    table = Counter((a.info["config_type"], a.info["split"]) for a in frames)
    write_markdown(REPORT_DIR / "summary.md", "Ingest", [
        f"Read {stats['n_read']} frames from {len(p.sources)} source(s): "
        + ", ".join(f"`{s.path}`" for s in p.sources) + ".",
        f"Kept {stats['n_frames']}; rejected {stats['n_rejected']} "
        f"({dict(by_check) or 'none'}), kept with their raw text in `{REJECTED}`.",
        f"Split rule: `{p.split.method}`, test config_types {p.split.test_config_types}, "
        f"val {p.split.val_fraction}, test {p.split.test_fraction}, seed {p.split.seed}.",
        "Provenance: `source` is the file's name, `source_index` the frame's position; `oracle_*` kept from "
        + (", ".join(f"`{s.path}`" for s in p.sources if verified_manifest(s.path)) or "no source")
        + " (its manifest verifies: written by mlipops); other values a file gave are kept as `file_<key>`.",
    ], table=(("config_type", "split", "frames"), [(c, s, n) for (c, s), n in sorted(table.items())]))
    return metrics
