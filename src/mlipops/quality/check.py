"""``mlipops check FILE...``: what the pipeline would do with the frames of some files, touching no dataset.

The verdict on each frame is the decision ``ingest`` + ``validate`` would make for it with the files
listed after the project's sources, taken step by step from the same code:

- read by the ingest readers (``unreadable``: the reader's reason; a repeated structure among the checked
  frames is a ``duplicate``, as ingest records it);
- its split: a frame already in the dataset (``data/curated``: accepted or quarantined by validate; the
  dataset's identity of a frame is its frame_id, the hash of its structure) keeps its recorded split and is
  judged as that frame with the labels given; a new frame gets the split ingest's rule
  (:func:`mlipops.ingest.draw_splits`) gives it next to the dataset's frames;
- the great-expectations suites (per frame, so independent of the others);
- the outlier test, only for frames of the training split that pass the suites, fitted together with the
  dataset's training frames that passed them (accepted, or quarantined as outliers alone), with the same
  rule for a kind the training data lacks (:func:`mlipops.quality.validate.outlier_candidates`);
- the quarantine releases of ``data/quarantine_releases.yaml``.

So on the project's own sources, checked in the same order, ``check`` and ``validate`` agree frame by
frame, and on an empty project ``check FILES`` is ``ingest`` + ``validate`` of FILES. Nothing is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mlipops.errors import MlipopsError
from mlipops.params import DescriptorParams, IngestParams, ValidateParams
from mlipops.pipeline import CURATED_DIR as CURATED

COLUMNS = ["file", "frame", "config_type", "split", "n_atoms", "verdict", "checks", "reason"]


def _source_entry(path: Path, ingest: IngestParams | None):
    """The ingest.sources entry naming ``path`` (its format and default config_type), if any."""
    for src in ingest.sources if ingest is not None else []:
        try:
            if Path(src.path).resolve() == path.resolve():
                return src
        except OSError:
            continue
    return None


def _dataset(curated: Path, p: ValidateParams, ingest: IngestParams | None, releases: dict):
    """What the current dataset says: {frame_id: (config_type, split, order key)} of every ingested frame
    (accepted or quarantined by validate), and its training frames that passed the suites (accepted and not
    released from a suite check, or quarantined as outliers alone) as [(order key, frame)]."""
    from mlipops.frames import Rejected, iter_extxyz, parse_extxyz_text, source_name

    rank = {source_name(s.path): k for k, s in enumerate(ingest.sources)} if ingest is not None else {}
    split_key = p.outliers.training_split
    known: dict[str, tuple] = {}
    train: list[tuple[tuple, object]] = []

    def key(source, index):  # ingest's order: the sources in params order, each file in order
        return (rank.get(str(source), len(rank)), -1 if index is None or pd.isna(index) else int(index))

    def gx_released(fid) -> bool:
        entry = releases.get(fid)
        return bool(entry) and any(c != "influential_outlier" for c in entry["checks"])

    accepted = curated / "accepted.extxyz"
    if accepted.is_file() and accepted.stat().st_size:
        for a in iter_extxyz(accepted):
            if isinstance(a, Rejected):
                raise MlipopsError(f"curated data is corrupt: {a.reason}", file=str(accepted))
            fid = a.info["frame_id"]
            k = key(a.info.get("source"), a.info.get("source_index"))
            known[fid] = (a.info.get("config_type"), a.info.get("split"), k)
            if a.info.get("split") == split_key and not gx_released(fid):
                train.append((k, a))
    quarantine = curated / "quarantine.parquet"
    if quarantine.is_file():
        q = pd.read_parquet(quarantine)
        for r in q[q["stage"] == "validate"].itertuples(index=False):
            k = key(r.source, r.source_index)
            known[r.frame_id] = (r.config_type, r.split, k)
            if r.split == split_key and r.check == "influential_outlier":  # it passed the suites
                got = parse_extxyz_text(r.extxyz, source=str(r.source), name=str(quarantine))
                if len(got) != 1 or isinstance(got[0], Rejected):
                    raise MlipopsError(f"quarantined frame {r.source} #{r.source_index} is not one readable frame",
                                       file=str(quarantine), field="extxyz")
                train.append((k, got[0]))
    return known, train


def check_files(paths: list[Path], p: ValidateParams, descriptors: DescriptorParams,
                ingest: IngestParams | None = None, curated: Path = CURATED) -> pd.DataFrame:
    """One row per frame of ``paths`` (COLUMNS): the verdict ingest + validate would give it, with its split
    and, for a frame not accepted, the checks and reasons the quarantine would record (module doc).
    ``ingest``: the project's ingest params (split rule, sources order); ``curated``: the current dataset."""
    from mlipops.frames import Rejected, iter_frames, source_name
    from mlipops.ingest import draw_splits, stress_field
    from mlipops.quality.releases import RELEASES, covering_release, load_releases
    from mlipops.quality.validate import build_tables, decide_tables

    rows, frames, where, modes = [], [], [], []
    seen: dict[str, tuple[str, int]] = {}
    for path in map(Path, paths):
        src = _source_entry(path, ingest)  # a missing or non-regular file: iter_frames says so in one line
        try:
            got = list(iter_frames(path, src.format if src is not None else "auto", source=source_name(path),
                                   default_config_type=src.config_type if src is not None else None,
                                   stress_field=stress_field(src) if src is not None else None))
        except MlipopsError as exc:  # the whole file is unreadable (ingest would stop): say so, go on
            rows.append({"file": str(path), "frame": exc.frame, "verdict": "unreadable", "checks": "parse",
                         "reason": str(exc)})
            continue
        for a in got:
            if isinstance(a, Rejected):
                rows.append({"file": str(path), "frame": a.source_index, "config_type": a.config_type,
                             "verdict": "unreadable", "checks": a.check, "reason": a.reason})
                continue
            fid = a.info["frame_id"]
            if fid in seen:  # ingest keeps the first of a structure and rejects the others
                first = seen[fid]
                rows.append({"file": str(path), "frame": a.info["source_index"], "config_type": a.info["config_type"],
                             "n_atoms": len(a), "verdict": "would be quarantined", "checks": "duplicate",
                             "reason": f"same structure as {first[0]} frame {first[1]} (frame_id {fid[:12]})"})
                continue
            seen[fid] = (a.info["source"], a.info["source_index"])
            frames.append(a)
            where.append((str(path), int(a.info["source_index"])))
            modes.append(src.split if src is not None else "auto")
    releases = load_releases(RELEASES)
    known, train = _dataset(Path(curated), p, ingest, releases) if frames else ({}, [])
    # splits: a frame already in the dataset keeps its own; a new one gets ingest's draw next to the dataset
    new = [k for k, a in enumerate(frames) if a.info["frame_id"] not in known]
    if new:
        ids = list(known) + [frames[k].info["frame_id"] for k in new]
        cts = [str(v[0]) for v in known.values()] + [frames[k].info["config_type"] for k in new]
        rule = ingest.split if ingest is not None else None
        n_src = len(ingest.sources) if ingest is not None else 0  # known frames: their source's split (by rank)
        mode = [ingest.sources[v[2][0]].split if v[2][0] < n_src else "auto" for v in known.values()] \
            + [modes[k] for k in new]
        for k, s in zip(new, draw_splits(ids, cts, rule, mode)[len(known):] if rule is not None else []):
            frames[k].info["split"] = s
    for a in frames:
        if a.info["frame_id"] in known:
            a.info["split"] = known[a.info["frame_id"]][1]
    failures, not_examined = {}, {}
    if frames:
        table, atoms = build_tables(frames, p)
        # the outlier test's training frames in the order ingest gives them: the dataset's (a checked frame
        # of the same structure in its place) and the checked frames new to it, after them. The dataset's
        # passed the suites already: they enter the decision as rows past the checked frames' table rows.
        mine = {a.info["frame_id"]: k for k, a in enumerate(frames)
                if a.info.get("split") == p.outliers.training_split}
        checked = {a.info["frame_id"] for a in frames}
        members = [(key, mine.get(a.info["frame_id"]), a) for key, a in train
                   if a.info["frame_id"] in mine or a.info["frame_id"] not in checked]
        in_dataset = {a.info["frame_id"] for _, _, a in members}
        members += [(known[frames[k].info["frame_id"]][2] if frames[k].info["frame_id"] in known
                     else (float("inf"), q), k, frames[k]) for q, k in enumerate(sorted(mine.values()))
                    if frames[k].info["frame_id"] not in in_dataset]
        members.sort(key=lambda m: m[0])
        pool, train_rows, extra = [], [], len(frames)
        for _, k, a in members:
            if k is None:  # a dataset frame: a row past the table's
                pool.append(a)
                train_rows.append(extra)
                extra += 1
            else:
                pool.append(frames[k])
                train_rows.append(k)
        dec = decide_tables(table, atoms, pool, np.array(train_rows, dtype=np.int64), p, descriptors)
        failures = {k: v for k, v in dec.failures.items() if k < len(frames)}
        not_examined = {k: v for k, v in dec.not_examined.items() if k < len(frames)}
    for k, a in enumerate(frames):
        checks = failures.get(k, [])
        note = not_examined.get(k)
        if a.info.get("split") != p.outliers.training_split and p.outliers.enabled and descriptors is not None:
            note = (f"split {a.info.get('split')!r}: the outlier test examines the "
                    f"{p.outliers.training_split!r} split only")
        entry = covering_release(releases, a.info["frame_id"], checks) if checks else None
        if entry:
            note = f"released by hand from {','.join(c for c, _ in checks)}: {entry['why']}"
            checks = []
        rows.append({"file": where[k][0], "frame": where[k][1], "config_type": a.info.get("config_type"),
                     "split": a.info.get("split"), "n_atoms": len(a),
                     "verdict": "would be quarantined" if checks else "accepted",
                     "checks": ",".join(c for c, _ in checks) or None,
                     "reason": "; ".join(r for _, r in checks) or note})
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["frame"] = df["frame"].astype("Int64")
    df["n_atoms"] = df["n_atoms"].astype("Int64")
    return df.sort_values(["file", "frame"], kind="stable").reset_index(drop=True)
