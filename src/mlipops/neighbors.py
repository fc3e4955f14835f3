"""Neighbour lists by vesin, for any cell (no torch here: the stages' reading workers import this alone)."""

from __future__ import annotations

import math

import numpy as np

SINGULAR_CELL = "cell is singular (volume 0) with periodic boundaries"


def singular_cell(cell: np.ndarray, pbc) -> bool:
    """True when the periodic cell vectors are zero or (numerically) linearly dependent: the volume
    (area, length) they span, sqrt(det G) of their Gram matrix, is below 1e-9 of the product of their
    lengths. No neighbour search works with such a cell (vesin fails or dies with SIGFPE)."""
    pbc = np.asarray(pbc, dtype=bool).reshape(-1)
    vectors = np.asarray(cell, dtype=np.float64).reshape(3, 3)[np.repeat(pbc, 3) if pbc.size == 1 else pbc]
    if len(vectors) == 0:
        return False
    lengths = np.linalg.norm(vectors, axis=1)
    if not np.all(lengths > 0):
        return True
    return math.sqrt(max(float(np.linalg.det(vectors @ vectors.T)), 0.0)) <= 1e-9 * float(np.prod(lengths))


def neighbor_list(positions: np.ndarray, cell: np.ndarray, pbc, cutoff: float):
    """Full neighbour list (i, j, integer cell shifts S, distances d) by vesin, any cell.

    Vector i→j is ``positions[j] - positions[i] + S @ cell``. Non-periodic directions need no cell;
    the periodic ones must span a volume (ValueError :data:`SINGULAR_CELL` otherwise).
    """
    from vesin import NeighborList

    pbc = np.asarray(pbc, dtype=bool).reshape(-1)
    pbc = np.repeat(pbc, 3) if pbc.size == 1 else pbc
    box = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    if singular_cell(box, pbc):
        raise ValueError(SINGULAR_CELL)
    if not pbc.any():
        box = np.zeros((3, 3))
    nl = NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, S, d = nl.compute(points=np.asarray(positions, dtype=np.float64), box=box,
                            periodic=pbc.tolist(), quantities="ijSd")
    return i.astype(np.int64), j.astype(np.int64), S.astype(np.int64), d
