"""The outlier test's frames as flat arrays (no torch here: the validate stage's reading workers import this)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

@dataclass
class FramePool:
    """Frames as flat arrays: what the outlier test reads of each frame (positions, cell, labels,
    config_type, identity). A list of ase.Atoms costs ~10 KB a frame; this ~60 bytes an atom, so the
    training split of a 100,000-frame set fits in ~150 MB. Every frame has energy and forces."""

    counts: np.ndarray  # [n] atoms per frame
    numbers: np.ndarray  # [N] atomic numbers, frame after frame
    positions: np.ndarray  # [N, 3] Å
    forces: np.ndarray  # [N, 3] eV/Å
    cells: np.ndarray  # [n, 3, 3] Å
    pbcs: np.ndarray  # [n, 3] bool
    energy: np.ndarray  # [n] eV
    info: dict[str, np.ndarray]  # [n] object arrays: frame_id, config_type, split, source, source_index

    INFO = ("frame_id", "config_type", "split", "source", "source_index")

    @classmethod
    def from_atoms(cls, frames) -> "FramePool":
        from mlipops.frames import labels

        if isinstance(frames, FramePool):
            return frames
        lab = [labels(a) for a in frames]
        counts = np.array([len(a) for a in frames], dtype=np.int64)
        cat = (lambda parts, shape: np.concatenate(parts) if parts else np.zeros(shape))  # noqa: E731
        return cls(counts=counts, numbers=cat([a.numbers for a in frames], (0,)).astype(np.int64),
                   positions=cat([np.asarray(a.positions, np.float64) for a in frames], (0, 3)),
                   forces=cat([np.full((len(a), 3), np.nan) if f is None else np.asarray(f, np.float64).reshape(-1, 3)
                               for a, (_, f, _) in zip(frames, lab)], (0, 3)),
                   cells=np.array([a.cell.array for a in frames], dtype=np.float64).reshape(-1, 3, 3),
                   pbcs=np.array([a.pbc for a in frames], dtype=bool).reshape(-1, 3),
                   energy=np.array([np.nan if e is None else e for e, _, _ in lab], dtype=np.float64),
                   info={k: np.array([a.info.get(k) for a in frames] + [None], dtype=object)[:-1] for k in cls.INFO})

    @classmethod
    def concat(cls, pools: list["FramePool"]) -> "FramePool":
        if not pools:
            return cls.from_atoms([])
        return cls(counts=np.concatenate([q.counts for q in pools]), numbers=np.concatenate([q.numbers for q in pools]),
                   positions=np.concatenate([q.positions for q in pools]),
                   forces=np.concatenate([q.forces for q in pools]), cells=np.concatenate([q.cells for q in pools]),
                   pbcs=np.concatenate([q.pbcs for q in pools]), energy=np.concatenate([q.energy for q in pools]),
                   info={k: np.concatenate([q.info[k] for q in pools]) for k in cls.INFO})

    def __post_init__(self):
        self.starts = np.cumsum(self.counts) - self.counts  # [n] first atom of each frame

    def __len__(self) -> int:
        return len(self.counts)

    def take(self, idx) -> "FramePool":
        """The frames ``idx`` (in that order)."""
        idx = np.asarray(idx, dtype=np.int64)
        atoms = np.concatenate([np.arange(s, s + c) for s, c in zip(self.starts[idx], self.counts[idx])]) \
            if len(idx) else np.zeros(0, dtype=np.int64)
        return FramePool(counts=self.counts[idx], numbers=self.numbers[atoms], positions=self.positions[atoms],
                         forces=self.forces[atoms], cells=self.cells[idx], pbcs=self.pbcs[idx], energy=self.energy[idx],
                         info={k: v[idx] for k, v in self.info.items()})

    def frame(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(numbers, positions, cell, pbc) of frame k."""
        lo = int(self.starts[k])
        hi = lo + int(self.counts[k])
        return self.numbers[lo:hi], self.positions[lo:hi], self.cells[k], self.pbcs[k]

    def species(self) -> list[str]:
        from ase.data import chemical_symbols

        return sorted({chemical_symbols[z] for z in np.unique(self.numbers).tolist()})
