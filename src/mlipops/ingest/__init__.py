"""The ``ingest`` stage: read every source, canonicalize, de-duplicate, assign splits.

Outputs ``data/ingested/frames.extxyz`` (every usable frame, with ``split``) and
``data/ingested/rejected.parquet`` (every frame read but not usable: unparseable frames and exact
duplicates, each with ``check``, ``reason`` and its raw text). Nothing read is ever dropped:
frames read = frames written + rows rejected.

Provenance is the pipeline's (:mod:`mlipops.frames`): a frame's ``source`` is its file's name (no
two sources may share one), ``source_index`` its position there, ``split`` set here (by the source's
``split``: ``test`` for a held-out test file, ``train`` for train/val, ``auto`` by the rule; never from
the file); ``oracle_*``
is kept only from a source whose ``<file>.provenance.json`` manifest verifies (written by
``mlipops generate`` / ``active run``); whatever else a file claims is kept as ``file_<key>``.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from ase import Atoms

from mlipops.errors import FrameFormatError
from mlipops.frames import Rejected, StressField, map_frames, source_name, to_extxyz_string, verified_manifest
from mlipops.params import IngestParams, SourceParams, SplitParams
from mlipops.paths import atomic_path
from mlipops.quarantine import rejected_frame
from mlipops.report import progress, write_markdown, write_metrics
from mlipops.pipeline import INGEST_REJECTED as REJECTED, INGEST_REPORTS as REPORT_DIR, INGESTED as FRAMES, \
    INGESTED_DIR as OUT_DIR

def _stable_unit(frame_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by the frame's content and the seed (splits stable under reordering)."""
    h = hashlib.sha256(f"{seed}:{frame_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def stress_field(src: SourceParams) -> StressField | None:
    """The source's stress field (``stress_key`` and its units, sign, order), or None."""
    if src.stress_key is None:
        return None
    return StressField(src.stress_key, src.stress_units, src.stress_sign, src.stress_order)


def draw_splits(frame_ids: list[str], config_types: list[str], rule: SplitParams,
                modes: list[str] | None = None) -> list[str]:
    """The split of each frame (given by its frame_id and config_type, in ingest order) by the declared rule.

    ``modes``: the ``split`` of each frame's source (default all ``auto``). ``test``: the frame is test
    (a held-out test file). ``train``: train or val, val with probability ``val_fraction`` (the
    validation frames come from the training files), never test whatever its config_type. ``auto``:
    the rule: ``config_type``: frames whose config_type is in ``test_config_types`` are test; the rest are
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
    modes = list(modes) if modes is not None else ["auto"] * len(frame_ids)
    split: list[str] = [""] * len(frame_ids)
    groups: dict[str, list[tuple[float, int]]] = {}
    for q, (fid, ct, mode) in enumerate(zip(frame_ids, config_types, modes)):
        if mode == "test" or (mode == "auto" and ct in held_out):
            split[q] = "test"
            continue
        u = _stable_unit(fid, rule.seed)
        if mode == "train":
            split[q] = "val" if u < rule.val_fraction else "train"
        else:
            split[q] = ("test" if u < rule.test_fraction
                        else "val" if u < rule.test_fraction + rule.val_fraction else "train")
        groups.setdefault(ct, []).append((u, q))
    # at least min_per_config_type of every config_type (of 3 frames or more) in val and in test: taken from the
    # training draws nearest to the cut (u just above it), else from the other evaluation split, never a split's
    # last frame; the choice is as stable as the draw itself
    for group in groups.values():
        if len(group) < 3:
            continue
        for name, frac in (("test", rule.test_fraction), ("val", rule.val_fraction)):
            need = rule.min_per_config_type - sum(split[q] == name for _, q in group) if frac > 0 else 0
            while need > 0:
                counts = Counter(split[q] for _, q in group)
                donors = [uq for uq in group if split[uq[1]] != name and counts[split[uq[1]]] > 1
                          and (name != "test" or modes[uq[1]] == "auto")]  # a training file's frame: never test
                if not donors:
                    break
                _, q = min(donors, key=lambda uq: (split[uq[1]] != "train", uq[0]))
                split[q] = name
                need -= 1
    for q, (fid, ct) in enumerate(zip(frame_ids, config_types)):
        keep = rule.keep_in_train.get(ct)
        if split[q] in ("train", "val") and keep is not None and _stable_unit("keep:" + fid, rule.seed) >= keep:
            split[q] = "unused"
    return split


def assign_splits(frames: list[Atoms], rule: SplitParams) -> None:  # frames of `auto` sources
    """Set ``info['split']`` of ``frames`` in place by the declared rule (:func:`draw_splits`)."""
    splits = draw_splits([a.info["frame_id"] for a in frames], [a.info["config_type"] for a in frames], rule)
    for a, s in zip(frames, splits):
        a.info["split"] = s


# the split is not known until every frame is read: frames are written with this value in its place
_SPLIT_MARK = "__mlipops_split__"
_MARK_RE = re.compile(r"(?:(?<=\s)|^)split=" + _SPLIT_MARK + r"(?=\s|$)")


_CHUNK_FRAMES = 100  # frames read (by a worker process, for a large file) at a time: ~1 MB of text


class _Read(NamedTuple):
    """A frame read by :func:`_ingest_chunk`: its identity, its text with the split mark (None: the mark is
    not found exactly once, e.g. a value of the frame holds it: ``atoms`` is then the frame itself) and its
    text without ``split`` (for a duplicate's record)."""

    frame_id: str
    source: str
    source_index: int
    config_type: str
    marked: bytes | None
    plain: str
    atoms: Atoms | None


def _ingest_chunk(items: list, ctx: dict) -> list:
    """Frames of a chunk (``map_frames`` items) as Rejected records and :class:`_Read` records; with
    ``ctx['atoms']`` each record keeps its frame (the in-memory :func:`ingest`)."""
    out = []
    for a, _ in items:
        if isinstance(a, Rejected):
            out.append(a)
            continue
        a.info["split"] = _SPLIT_MARK
        text = to_extxyz_string(a)
        del a.info["split"]
        lines = text.split("\n", 2)
        once = len(lines) == 3 and len(_MARK_RE.findall(lines[1])) == 1
        marked = text.encode("utf-8") if once else None
        plain = ("\n".join((lines[0], _MARK_RE.sub("", lines[1]).replace("  ", " ").strip(), lines[2]))
                 if once and lines[1].count("  ") == 0 else to_extxyz_string(a))
        out.append(_Read(a.info["frame_id"], a.info["source"], a.info["source_index"], a.info["config_type"],
                         marked, plain, a if ctx.get("atoms") or marked is None else None))
    return out


class _Spool:
    """The unique frames as extxyz text, written as they are read (split marked), in an unnamed temporary
    file beside the output; :meth:`write` copies them to ``path`` with their splits filled in. Holds one
    frame in memory (and any frame whose own values contain the mark, kept to be written at the end)."""

    def __init__(self, directory: Path):
        import tempfile

        self.fh = tempfile.TemporaryFile(dir=directory)  # no name: nothing is left behind, even after kill -9
        self.sizes: list[int] = []
        self.kept: dict[int, Atoms] = {}

    def add(self, r: _Read) -> None:
        if r.marked is None:
            self.kept[len(self.sizes)] = r.atoms
            self.sizes.append(0)
            return
        self.fh.write(r.marked)
        self.sizes.append(len(r.marked))

    def write(self, path: Path, splits: list[str]) -> None:
        self.fh.flush()
        self.fh.seek(0)
        with atomic_path(path) as tmp, tmp.open("wb") as out:
            for k, (size, split) in enumerate(zip(self.sizes, splits)):
                if k in self.kept:
                    self.kept[k].info["split"] = split
                    text = to_extxyz_string(self.kept[k])
                else:
                    head, comment, body = self.fh.read(size).decode("utf-8").split("\n", 2)
                    text = "\n".join((head, _MARK_RE.sub("split=" + split, comment), body))
                out.write(text.encode("utf-8"))

    def close(self) -> None:
        self.fh.close()


def _read_sources(p: IngestParams, keep, with_atoms: bool = False
                  ) -> tuple[list[Rejected], list[str], list[str], list[int], int]:
    """Read every source as a stream (a large extxyz file by worker processes, a chunk of frames each) and
    de-duplicate: ``keep(record)`` gets each unique frame's :class:`_Read` in order (``with_atoms``: with
    the frame).
    Returns (rejected: the unreadable frames, then the duplicates; frame_ids, config_types and source
    (its position in ``p.sources``) of the unique frames; frames read). Memory: one frame, and the
    identity of every frame kept."""
    names: dict[str, int] = {}
    for k, src in enumerate(p.sources):
        if not Path(src.path).exists():
            raise FrameFormatError(f"source listed in params.yaml ingest.sources[{k}] not found",
                                   file=str(src.path))
        name = source_name(src.path)  # each frame's `source`: (source, source_index) names one frame
        if name in names:
            raise FrameFormatError(f"ingest.sources[{k}] has the source name {name!r} (the file's name) of "
                                   f"ingest.sources[{names[name]}]: rename one file", file=str(src.path))
        names[name] = k
    sizes = [Path(src.path).stat().st_size for src in p.sources]
    unreadable: list[Rejected] = []
    duplicates: list[Rejected] = []
    seen: dict[str, tuple[str, int]] = {}  # frame_id -> (source, source_index) of its first occurrence
    ids: list[str] = []
    cts: list[str] = []
    origin: list[int] = []
    n_read = 0
    with progress("ingest (MiB read)", max(1, round(sum(sizes) / 2**20)), quiet_start=True) as advance:
        for k, src in enumerate(p.sources):
            path = Path(src.path)
            done = sum(sizes[:k])

            def moved(pos: int, done=done) -> None:
                advance(completed=round((done + pos) / 2**20), note=f"{n_read} frames, {len(ids)} unique")

            chunks = map_frames(path, src.format, _ingest_chunk, {"atoms": with_atoms}, chunk_frames=_CHUNK_FRAMES,
                                source=source_name(path),
                                default_config_type=src.config_type, progress=moved, stress_field=stress_field(src))
            for r in (r for chunk in chunks for r in chunk):
                n_read += 1
                if isinstance(r, Rejected):
                    unreadable.append(r)
                    continue
                fid = r.frame_id
                if fid in seen:
                    first = seen[fid]
                    duplicates.append(Rejected(
                        r.source, r.source_index, "duplicate",
                        f"same structure as {first[0]} frame {first[1]} (frame_id {fid[:12]})",
                        r.plain, fid, r.config_type))
                    continue
                seen[fid] = (r.source, r.source_index)
                ids.append(fid)
                cts.append(r.config_type)
                origin.append(k)
                keep(r)
            moved(sizes[k])
    return unreadable + duplicates, ids, cts, origin, n_read


def _modes(p: IngestParams, origin: list[int]) -> list[str]:
    """The ``split`` of each frame's source (:func:`draw_splits`)."""
    return [p.sources[k].split for k in origin]


def ingest(p: IngestParams) -> tuple[list[Atoms], pd.DataFrame, dict]:
    """Read, de-duplicate and split every source in memory (writes nothing): (frames, rejected table, stats)."""
    frames: list[Atoms] = []
    rejected, ids, cts, origin, n_read = _read_sources(p, lambda r: frames.append(r.atoms), with_atoms=True)
    for a, s in zip(frames, draw_splits(ids, cts, p.split, _modes(p, origin))):
        a.info["split"] = s
    stats = {"n_read": n_read, "n_frames": len(frames), "n_rejected": len(rejected)}
    return frames, rejected_frame(rejected), stats


def split_notes(p: IngestParams, cts: list[str], splits: list[str], origin: list[int]) -> list[str]:
    """The summary's account of the splits, from the data: the sources split by file (their frames and
    config_types) and the rule the others follow (with the declared test config_types the data lacks)."""
    notes = []
    by_file = [k for k, s in enumerate(p.sources) if s.split != "auto"]
    for k in by_file:
        mine = [q for q, o in enumerate(origin) if o == k]
        kinds = sorted({cts[q] for q in mine})
        where = ("test: all of them (a held-out test file)" if p.sources[k].split == "test" else
                 f"train/val: {sum(splits[q] == 'val' for q in mine)} drawn into val (val_fraction "
                 f"{p.split.val_fraction}), never test")
        notes.append(f"Split by file: `{p.sources[k].path}`, {len(mine)} frames of config_types {kinds}, {where}.")
    auto = {k for k, s in enumerate(p.sources) if s.split == "auto"}
    if auto:
        present = {c for c, o in zip(cts, origin) if o in auto}
        absent = [c for c in p.split.test_config_types if c not in present] if p.split.method == "config_type" else []
        notes.append(f"Split rule{' of the other sources' if by_file else ''}: `{p.split.method}`, test config_types "
                     f"{p.split.test_config_types}"
                     + (f" (not in the data: {absent})" if absent and present else "")
                     + f", val {p.split.val_fraction}, test {p.split.test_fraction}, seed {p.split.seed}.")
    return notes


def remove_empty(dirs: list[Path]) -> None:
    """Remove those of ``dirs`` (deepest first, as :func:`made_dirs` lists them) that are empty."""
    for d in dirs:
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def made_dirs(path: Path) -> list[Path]:
    """The directories ``path.mkdir(parents=True)`` is about to create (to remove them if the stage fails)."""
    out = []
    for d in [path, *path.parents]:
        if d.exists():
            break
        out.append(d)
    return out


def run(p: IngestParams) -> dict:
    """The stage: frames are written as they are read (bounded memory), then given their splits."""
    t0 = time.perf_counter()
    created = made_dirs(OUT_DIR)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    spool = _Spool(OUT_DIR)
    try:
        rejected, ids, cts, origin, n_read = _read_sources(p, spool.add)
        splits = draw_splits(ids, cts, p.split, _modes(p, origin))
        spool.write(FRAMES, splits)
    except BaseException:
        remove_empty(created)  # nothing half-made is left: the directories this run made go again
        raise
    finally:
        spool.close()
    stats = {"n_read": n_read, "n_frames": len(ids), "n_rejected": len(rejected)}
    rejected = rejected_frame(rejected)
    rejected.to_parquet(REJECTED, index=False)
    table = Counter(zip(cts, splits))
    by_split = Counter(splits)
    by_check = Counter(rejected["check"].tolist())
    metrics = dict(stats)
    metrics.update({f"n_frames.{s}": by_split.get(s, 0) for s in ("train", "val", "test", "unused")})
    metrics.update({f"n_rejected.{c}": n for c, n in sorted(by_check.items())})
    metrics["wall_time_s"] = round(time.perf_counter() - t0, 2)
    write_metrics(REPORT_DIR, metrics)
    write_markdown(REPORT_DIR / "summary.md", "Ingest", [
        f"Read {stats['n_read']} frames from {len(p.sources)} source(s): "
        + ", ".join(f"`{s.path}`" for s in p.sources) + ".",
        f"Kept {stats['n_frames']}; rejected {stats['n_rejected']} "
        f"({dict(by_check) or 'none'}), kept with their raw text in `{REJECTED}`.",
        *split_notes(p, cts, splits, origin),
        "Provenance: `source` is the file's name, `source_index` the frame's position; `oracle_*` kept from "
        + (", ".join(f"`{s.path}`" for s in p.sources if verified_manifest(s.path)) or "no source")
        + " (its manifest verifies: written by mlipops); other values a file gave are kept as `file_<key>`.",
    ], table=(("config_type", "split", "frames"), [(c, s, n) for (c, s), n in sorted(table.items())]))
    return metrics
