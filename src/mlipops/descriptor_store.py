"""Per-atom descriptors saved by one stage for the next, so that they are computed once.

validate's outlier surrogate is made of the training frames' descriptors; the index needs the same numbers for
its hull. validate saves them (``data/curated/training_descriptors/``: ``rows.npy`` float32 [atoms, features]
and ``meta.json``), keyed to the md5 of the ``accepted.extxyz`` it writes, its species channels and descriptor
settings; the index takes a frame's rows from there only when all three match its own, and computes every other
frame itself. No torch here: the index's reading workers import it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from mlipops.paths import atomic_write_text

SAVED_FORMAT = "mlipops.saved_descriptors/1"
_SAVED_ROWS, _SAVED_META = "rows.npy", "meta.json"


class SavedDescriptorsWriter:
    """Per-atom descriptors of whole frames, saved by one stage for the next (validate's outlier surrogate
    computes those of the training frames; the index would compute them again): ``rows.npy`` (float32
    [n_atoms, n_features], the frames' atoms in the order given) and ``meta.json`` (the format, species
    channels, descriptor settings, each saved frame's ``frame_id``, first row and atom count, and the md5 of
    the file the frames end up in, set by :meth:`finish`). Rows are written to the file as they come (not
    held, not memory-mapped); a frame never given (a design served from the in-process cache) is not listed,
    so a reader computes it.

    A reader takes a frame's rows only when the md5, species and settings match its own
    (:class:`SavedDescriptors`): float32 descriptors of the same atoms, equal to what it computes itself to
    float32 rounding (the float64 values agree to a few ulps: summation orders)."""

    def __init__(self, directory: str | Path, species: list[str], settings: dict, n_features: int, frame_ids,
                 counts):
        self.dir = Path(directory)
        if self.dir.is_dir():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.species, self.settings = list(species), dict(settings)
        self.frame_ids = [str(f) for f in frame_ids]
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.written = np.zeros(len(self.counts), dtype=bool)
        self.shape = (int(self.starts[-1]), n_features)
        self._fh = (self.dir / _SAVED_ROWS).open("wb")
        np.lib.format.write_array_header_1_0(self._fh, {"descr": "<f4", "fortran_order": False, "shape": self.shape})
        self._base = self._fh.tell()

    def add(self, frames: np.ndarray, rows: np.ndarray) -> None:
        """The rows of frames ``frames`` (their indices in the order given at construction), in that order; a run
        of consecutive frames is written as one span of the file."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        frames = np.asarray(frames, dtype=np.int64)
        n_rows = int(self.counts[frames].sum())
        if rows.shape != (n_rows, self.shape[1]):
            raise ValueError(f"rows {rows.shape} for {len(frames)} frames of {n_rows} atoms x {self.shape[1]}")
        breaks = np.flatnonzero(np.diff(frames) != 1) + 1
        at = 0
        for run in np.split(frames, breaks):
            n = int(self.counts[run].sum())
            self._fh.seek(self._base + int(self.starts[run[0]]) * self.shape[1] * 4)
            self._fh.write(rows[at:at + n].tobytes())
            at += n
        self.written[frames] = True

    def finish(self, dataset_md5: str) -> None:
        """Close the rows and write the meta: the frames given, for the file whose md5 is ``dataset_md5``."""
        self._fh.close()
        k = np.flatnonzero(self.written)
        meta = {"format": SAVED_FORMAT, "dataset_md5": dataset_md5, "species": self.species,
                "settings": self.settings, "n_features": self.shape[1], "n_rows": self.shape[0],
                "frame_id": [self.frame_ids[q] for q in k.tolist()], "start": self.starts[k].tolist(),
                "count": self.counts[k].tolist()}
        atomic_write_text(self.dir / _SAVED_META, json.dumps(meta, default=str))


def write_no_saved_descriptors(directory: str | Path, why: str) -> None:
    """An empty saved-descriptor folder (no frame listed: the reader computes every frame), saying ``why``."""
    d = Path(directory)
    if d.is_dir():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    np.save(d / _SAVED_ROWS, np.zeros((0, 0), dtype=np.float32))
    (d / _SAVED_META).write_text(json.dumps({"format": SAVED_FORMAT, "dataset_md5": None, "note": why,
                                             "frame_id": [], "start": [], "count": []}))


class SavedDescriptors:
    """The frames a :class:`SavedDescriptorsWriter` saved, for a reader whose data file has md5 ``dataset_md5``
    and whose descriptor has ``species`` and ``settings`` (:meth:`check` says whether they may be taken, and why
    not). Opening checks the rows file's header against the meta (ValueError when they disagree)."""

    def __init__(self, directory: str | Path, meta: dict):
        self.dir = Path(directory)
        self.species, self.n_features = list(meta["species"]), int(meta["n_features"])
        self.where = {f: (s, c) for f, s, c in zip(meta["frame_id"], meta["start"], meta["count"])}
        with (self.dir / _SAVED_ROWS).open("rb") as fh:
            if np.lib.format.read_magic(fh) != (1, 0):
                raise ValueError(f"{self.dir / _SAVED_ROWS}: not the .npy version 1.0 file it writes")
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            self._base = fh.tell()
        if dtype != np.float32 or shape != (int(meta["n_rows"]), self.n_features):
            raise ValueError(f"{self.dir / _SAVED_ROWS}: {dtype} {shape}, not the float32 rows its meta lists")

    @staticmethod
    def check(directory: str | Path | None, dataset_md5: str, species: list[str] | None, settings: dict
              ) -> tuple[dict | None, str]:
        """(the meta, "") when the folder's frames may be taken, else (None, why not)."""
        if directory is None:
            return None, "none saved"
        d = Path(directory)
        try:
            meta = json.loads((d / _SAVED_META).read_text())
        except (OSError, ValueError) as exc:
            return None, f"{d / _SAVED_META} unreadable ({type(exc).__name__})"
        if not isinstance(meta, dict) or meta.get("format") != SAVED_FORMAT:
            return None, f"{d / _SAVED_META}: not {SAVED_FORMAT}"
        if not meta.get("frame_id"):
            return None, meta.get("note") or "no frame saved"
        if meta.get("dataset_md5") != dataset_md5:
            return None, "saved for another version of the data file"
        if species is not None and meta.get("species") != list(species):
            return None, f"saved with species {meta.get('species')}, not {list(species)}"
        if json.dumps(meta.get("settings"), sort_keys=True) != json.dumps(dict(settings), sort_keys=True):
            return None, "saved with other descriptor settings"
        return meta, ""

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop (float32 [stop - start, n_features]), read from the file (no memory map)."""
        out = np.empty((stop - start, self.n_features), dtype=np.float32)
        with (self.dir / _SAVED_ROWS).open("rb") as fh:
            fh.seek(self._base + start * self.n_features * 4)
            if fh.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise ValueError(f"{self.dir / _SAVED_ROWS}: shorter than its meta says")
        return out
