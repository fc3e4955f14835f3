"""Influential outliers: a linear surrogate of the labels and its Cook's distances (statsmodels).

A wrong DFT label rarely looks wrong on its own; it looks wrong *next to its neighbours in
descriptor space*. Two linear surrogates make that precise, fitted by ordinary least squares on
the frames of the training split:

- energy, per atom:  E/N ≈ Σ_s b_s n_s/N + Σ_k w_k S_k/N,  with n_s the count of species s and
  S = Σ_i G_i the frame's summed atom-centred descriptor (the potential's and the index's own);
- forces, per Cartesian component of every atom:  F_iα ≈ −Σ_k v_k ∂S_k/∂r_iα, the force the same
  kind of linear energy model would give (the derivatives by autograd through the descriptor).

For every row statsmodels' ``OLSInfluence`` gives the leverage h (how unusual the row's
descriptor is, relative to the rest) and Cook's distance D = r² h / (p (1 − h)) (r the internally
studentized residual), which combines leverage and residual. The residual itself is measured on a
robust scale, t = e / (σ_g √(1 − h)) with σ_g = 1.4826 × the median absolute residual of the row's
config_type (:func:`robust_t`): a gross error would inflate the least-squares scale and mask
smaller ones, and a linear surrogate fits liquids worse than crystals. A frame is quarantined as
``influential_outlier`` only when D exceeds the threshold (default 4/n) *and* |t| exceeds the
residual threshold: a rare but correct configuration (a liquid frame among crystals, a strained
cell at the edge of the data) has high leverage but a small residual, which raises D without being
an error; it is kept and listed as "high leverage, consistent label".

One wrong force component is one row among thousands; a whole frame of wrong forces (sign-flipped,
another frame's, a displaced atom whose labels were not recomputed) is many rows each only
moderately off. Two frame-level tests of the force residuals catch those (:func:`force_frame_stats`):

- the frame's χ² per force component over the residual level expected for a frame of its
  config_type *at its force scale* (the level grows with the forces: hot frames are fitted worse,
  in proportion), together with a residual that is a sizeable fraction of the predicted forces;
- the largest per-atom χ² of the frame over the same level: a residual concentrated on one atom.

Their thresholds are not constants in eV/Å: each statistic is compared with the frames of the same
config_type in the data itself, in robust standard deviations of its logarithm (:func:`tail_z`,
corrected for small groups), so the tail of the clean frames' own distribution sets the cut. The
frame-block Cook's distance (:func:`frame_cooks`) is reported with them.

Masking: least squares follows gross errors. Before the first fit, energies grossly off a robust
(Tukey biweight) fit are set aside (:func:`gross_errors`); every frame flagged early is re-judged
against the final fit (:func:`_recheck`), with the Cook's distance it would have if added back.

Limits: a linear surrogate is a coarse model. Frames it cannot fit for physical reasons
(far-from-equilibrium geometries it has never seen) show up with large residuals too, which is
why only the training split is examined and the thresholds are parameters; the report gives the
numbers behind every decision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from ase import Atoms

from mlipops.descriptors import AtomCentredDescriptor, frame_edges
from mlipops.params import OutlierParams
from mlipops.quality.pool import FramePool  # noqa: F401  (re-exported)
from mlipops.report import trim_memory


@dataclass
class Surrogate:
    """One OLS fit and its influence measures (rows = frames or force components)."""

    y: np.ndarray
    fitted: np.ndarray
    leverage: np.ndarray
    cooks: np.ndarray
    t_external: np.ndarray
    dffit: np.ndarray  # change of the row's own prediction when the row is dropped: h e / (1 − h)
    n: int
    p: int
    rmse: float
    cols: np.ndarray | None = None  # the independent columns of x used
    beta: np.ndarray | None = None  # coefficients over ``cols``
    xtx_inv: np.ndarray | None = None  # (X'X)^-1 over ``cols``: leverage of new rows

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prediction and prediction leverage x (X'X)^-1 x' of rows not in the fit."""
        xr = x[:, self.cols]
        return xr @ self.beta, np.einsum("ij,jk,ik->i", xr, self.xtx_inv, xr)


@dataclass
class OutlierReport:
    frames: pd.DataFrame  # one row per examined frame: the decision and its numbers
    energy: Surrogate | None = None
    forces: Surrogate | None = None
    rounds: int = 0
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds: design, fits, recheck
    saved: object = None  # the SavedDescriptorsWriter of detect(save_descriptors=...), to be finished


def _independent_columns(x: np.ndarray, rel_tol: float = 1e-10) -> np.ndarray:
    """Indices of a maximal set of linearly independent columns (QR with column pivoting)."""
    from scipy.linalg import qr

    if x.shape[1] == 0:
        return np.zeros(0, dtype=int)
    scale = np.linalg.norm(x, axis=0)
    xs = x / np.where(scale > 0, scale, 1.0)
    _, r, piv = qr(xs, mode="economic", pivoting=True)
    d = np.abs(np.diag(r))
    rank = int((d > rel_tol * max(d[0], 1e-300)).sum()) if len(d) else 0
    return np.sort(piv[:rank])


_STATSMODELS_MAX_CELLS = 4_000_000  # rows x columns fitted by statsmodels in memory; larger fits run in chunks


def ols_influence(y: np.ndarray, x, rows: np.ndarray | None = None, r_cache: dict | None = None) -> Surrogate:
    """OLS of y on x (collinear columns dropped) with statsmodels' influence measures.

    ``rows`` (boolean, default all) selects the rows fitted; ``x`` is an array or a :class:`RowStore`.
    Up to :data:`_STATSMODELS_MAX_CELLS` cells statsmodels fits it; a larger fit (the force surrogate of
    a large training set: 7M rows) runs in chunks with the same closed forms (:func:`_ols_chunked`), never
    holding more than one chunk of x and no n x n or p x n matrix. ``r_cache`` (a dict kept between fits
    of the same y and x on fewer and fewer rows: the rounds of :func:`detect`) lets the chunked fit reuse the R
    factor of every chunk whose rows did not change."""
    n_rows = int(np.count_nonzero(rows)) if rows is not None else len(y)
    if isinstance(x, RowStore) or n_rows * x.shape[1] > _STATSMODELS_MAX_CELLS:
        return _ols_chunked(y, x, rows, r_cache=r_cache)
    if rows is not None:
        y, x = y[rows], x[rows]
    import statsmodels.api as sm
    from statsmodels.stats.outliers_influence import OLSInfluence

    cols = _independent_columns(x)
    if not len(cols):
        return _no_fit(y)
    xr = x[:, cols]
    res = sm.OLS(y, xr).fit()
    infl = OLSInfluence(res)
    h = infl.hat_matrix_diag
    e = res.resid
    n, p = xr.shape
    r = infl.resid_studentized_internal
    with np.errstate(divide="ignore", invalid="ignore"):
        dffit = np.where(h < 1, h * e / (1 - h), np.nan)
        # externally studentized (leave-one-out scale) from the internal one, in closed form:
        # statsmodels' resid_studentized_external refits per row, O(n²), minutes for 10⁴ force rows
        t_ext = r * np.sqrt((n - p - 1) / np.maximum(n - p - r**2, 1e-300))
    return Surrogate(y=y, fitted=res.fittedvalues, leverage=h, cooks=infl.cooks_distance[0],
                     t_external=t_ext, dffit=dffit, n=n, p=p, rmse=float(np.sqrt(np.mean(e**2))),
                     cols=cols, beta=np.asarray(res.params), xtx_inv=np.linalg.pinv(xr.T @ xr))


def _ols_chunked(y: np.ndarray, x, rows: np.ndarray | None, chunk: int = 1 << 16,
                 r_cache: dict | None = None) -> Surrogate:
    """:func:`ols_influence` for many rows, in two passes over chunks of x: the R factor of [X y] by a
    tall-skinny QR (the R of each chunk's rows, then the R of the stacked chunk factors; a chunk whose rows
    are those of the last fit keeps its factor from ``r_cache``), then per row the fit, the residual e and the
    leverage h = |x R⁻¹|²; Cook's D = r² h / (p (1 − h)) with r = e / (s √(1 − h)), s² = Σe² / (n − p),
    as statsmodels defines them. Collinear columns are dropped as :func:`_independent_columns` does,
    from R (X and R have the same column geometry: X'X = R'R)."""
    from scipy.linalg import qr, solve_triangular

    mask = np.ones(len(y), dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
    p_all = x.shape[1]
    cache = {} if r_cache is None else r_cache
    if cache.get("key") != (id(x), id(y), len(y), chunk):  # another design: nothing to reuse
        cache.clear()
        cache["key"] = (id(x), id(y), len(y), chunk)
    factors = []
    for lo in range(0, len(y), chunk):
        hi = min(lo + chunk, len(y))
        m = mask[lo:hi]
        hit = cache.get(lo)
        if hit is None or not np.array_equal(hit[0], m):
            block = x.read(lo, hi) if isinstance(x, RowStore) else x[lo:hi]
            # (a copy: mode "r" gives an M x N array, which the cache would otherwise keep whole)
            rc = qr(np.column_stack([block[m], y[lo:hi][m]]), mode="r")[0][:p_all + 1].copy() if m.any() \
                else np.zeros((0, p_all + 1))
            hit = cache[lo] = (m.copy(), rc)
        factors.append(hit[1])
    R = qr(np.vstack(factors), mode="r")[0][:p_all + 1] if factors else np.zeros((0, p_all + 1))
    del factors
    if len(R) < p_all + 1:
        R = np.vstack([R, np.zeros((p_all + 1 - len(R), p_all + 1))])
    rx = R[:p_all, :p_all]
    scale = np.linalg.norm(rx, axis=0)
    _, rr, piv = qr(rx / np.where(scale > 0, scale, 1.0), mode="economic", pivoting=True)
    d = np.abs(np.diag(rr))
    rank = int((d > 1e-10 * max(d[0], 1e-300)).sum()) if len(d) else 0
    cols = np.sort(piv[:rank])
    if not rank:
        return _no_fit(y[mask])
    rc = qr(R[:, list(cols) + [p_all]], mode="r")[0]
    r_x, z = rc[:rank, :rank], rc[:rank, rank]
    beta = solve_triangular(r_x, z)
    n, p = int(mask.sum()), rank
    ys, fitted, h = np.empty(n), np.empty(n), np.empty(n)
    k = 0
    for lo, hi, block in _row_chunks(x, chunk):
        m = mask[lo:hi]
        xb = _columns(block if m.all() else block[m], cols)
        q = len(xb)
        ys[k:k + q] = y[lo:hi][m]
        fitted[k:k + q] = xb @ beta
        h[k:k + q] = np.square(solve_triangular(r_x, xb.T, trans="T")).sum(axis=0)
        k += q
    e = ys - fitted
    s2 = float(e @ e) / max(n - p, 1)
    with np.errstate(divide="ignore", invalid="ignore"):  # in place where it can be: 7M rows at scale
        omh = 1.0 - h
        r = np.sqrt(s2 * omh)
        np.divide(e, r, out=r)  # internally studentized residual
        cooks = np.square(r)
        cooks *= h
        cooks /= p * omh
        dffit = h * e
        dffit /= omh
        dffit[~(h < 1)] = np.nan
        t_ext = np.square(r)
        np.subtract(n - p, t_ext, out=t_ext)
        np.maximum(t_ext, 1e-300, out=t_ext)
        np.divide(n - p - 1, t_ext, out=t_ext)
        np.sqrt(t_ext, out=t_ext)
        t_ext *= r
        del omh, r, e
    inv = solve_triangular(r_x, np.eye(p))
    return Surrogate(y=ys, fitted=fitted, leverage=h, cooks=cooks, t_external=t_ext, dffit=dffit, n=n, p=p,
                     rmse=float(np.sqrt(s2 * max(n - p, 1) / n)) if n else 0.0, cols=cols, beta=beta,
                     xtx_inv=inv @ inv.T)


_LIGHT_REFIT_CELLS = 1_000_000  # rows x columns above which a refit without influence measures is used


def _ols_fit(y: np.ndarray, x: np.ndarray) -> Surrogate:
    """The least-squares fit of :func:`ols_influence` (same columns, coefficients, (X'X)⁻¹) without the
    influence measures, by QR: what a refit that only predicts needs (leverage, Cook's D: NaN)."""
    from scipy.linalg import qr, solve_triangular

    cols = _independent_columns(x)
    if not len(cols):
        return _no_fit(y)
    xr = x[:, cols]
    q, r = qr(xr, mode="economic")
    beta = solve_triangular(r, q.T @ y)
    fitted = xr @ beta
    e = y - fitted
    inv = solve_triangular(r, np.eye(len(cols)))
    nan = np.full(len(y), np.nan)
    return Surrogate(y=y, fitted=fitted, leverage=nan, cooks=nan, t_external=nan, dffit=nan, n=len(y), p=len(cols),
                     rmse=float(np.sqrt(np.mean(e**2))), cols=cols, beta=beta, xtx_inv=inv @ inv.T)


class _GrowingFit:
    """The least-squares fit of y on every column of x over a set of rows that grows one row at a time (the energy
    releases of :func:`_recheck`): R and Qᵀy of the rows' QR are updated by one small QR of [R, Qᵀy; x_k, y_k] per
    added row (as stable as a refit, O(p²) instead of O(n p²)). :meth:`surrogate` gives what :func:`_ols_fit`
    gives for the rows in the order they were added (to rounding)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, rows: list[int]):
        from scipy.linalg import qr

        self.x, self.y, self.rows = x, y, list(rows)
        # the fit's rows, in order, in arrays with room for every row: a surrogate costs one product, no gather
        n = len(self.rows)
        self._x, self._y = np.empty_like(x), np.empty_like(y)
        self._x[:n], self._y[:n] = x[self.rows], y[self.rows]
        q, r = qr(self._x[:n], mode="economic")
        self.r, self.z = r, q.T @ self._y[:n]

    def add(self, k: int) -> None:
        from scipy.linalg import qr

        p = self.x.shape[1]
        stacked = np.vstack([np.column_stack([self.r, self.z]), np.r_[self.x[k], self.y[k]][None]])
        r = qr(stacked, mode="r")[0]
        self.r, self.z = r[:p, :p], r[:p, p]
        self._x[len(self.rows)], self._y[len(self.rows)] = self.x[k], self.y[k]
        self.rows.append(k)

    def surrogate(self) -> Surrogate:
        from scipy.linalg import solve_triangular

        p = self.x.shape[1]
        beta = solve_triangular(self.r, self.z)
        y = self._y[:len(self.rows)]  # a view: later rows are appended after it, never over it
        fitted = self._x[:len(self.rows)] @ beta
        inv = solve_triangular(self.r, np.eye(p))
        nan = np.full(len(y), np.nan)
        return Surrogate(y=y, fitted=fitted, leverage=nan, cooks=nan, t_external=nan, dffit=nan, n=len(y), p=p,
                         rmse=float(np.sqrt(np.mean((y - fitted) ** 2))), cols=np.arange(p), beta=beta,
                         xtx_inv=inv @ inv.T)


def _no_fit(y: np.ndarray) -> Surrogate:
    """The surrogate of a design without one nonzero column (every row the same zero descriptor, e.g. forces
    that vanish by symmetry in every frame): it predicts 0 and no row has influence."""
    n = len(y)
    zero = np.zeros(n)
    return Surrogate(y=y, fitted=zero, leverage=zero, cooks=zero, t_external=np.full(n, np.nan), dffit=zero, n=n, p=0,
                     rmse=float(np.sqrt(np.mean(y**2))) if n else 0.0, cols=np.zeros(0, dtype=int), beta=np.zeros(0),
                     xtx_inv=np.zeros((0, 0)))


class RowStore:
    """Float64 rows [n, m] in an anonymous temporary file, appended in blocks and read back in slices:
    the force surrogate's design at scale (7M rows x 24 features = 1.4 GB) then lives in the page cache,
    not in the process. Deleted when closed or garbage-collected (and by the OS if the process dies)."""

    def __init__(self, n_cols: int, directory: str | Path | None = None):
        import tempfile

        self.fh = tempfile.TemporaryFile(dir=directory)
        self.shape = (0, n_cols)

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=np.float64).reshape(-1, self.shape[1])
        self.fh.seek(0, 2)
        self.fh.write(block.tobytes())
        self.shape = (self.shape[0] + len(block), self.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, lo: int, hi: int) -> np.ndarray:
        lo, hi = max(lo, 0), min(hi, self.shape[0])
        out = np.empty((max(hi - lo, 0), self.shape[1]))
        self.fh.seek(lo * self.shape[1] * 8)
        self.fh.readinto(memoryview(out).cast("B"))
        return out

    def __getitem__(self, index):
        """Rows by slice, by sorted integer indices (read as one span) or by a boolean mask."""
        if isinstance(index, slice):
            lo, hi, step = index.indices(self.shape[0])
            return self.read(lo, hi)[::step]
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        if not len(index):
            return np.zeros((0, self.shape[1]))
        lo = int(index.min())
        return self.read(lo, int(index.max()) + 1)[index - lo]

    def close(self) -> None:
        self.fh.close()


def _row_chunks(x, chunk: int):
    """(lo, hi, rows lo:hi) of an array or a RowStore, ``chunk`` rows at a time."""
    for lo in range(0, len(x), chunk):
        hi = min(lo + chunk, len(x))
        yield lo, hi, x.read(lo, hi) if isinstance(x, RowStore) else x[lo:hi]


def _columns(block: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """block[:, cols], without the copy when cols are all the columns in order (the usual case)."""
    return block if len(cols) == block.shape[1] and np.array_equal(cols, np.arange(len(cols))) else block[:, cols]


def predict_rows(x, cols: np.ndarray, beta: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """x[:, cols] @ beta for every row of an array or a RowStore, a chunk at a time."""
    out = np.empty(len(x))
    for lo, hi, block in _row_chunks(x, chunk):
        out[lo:hi] = _columns(block, cols) @ beta
    return out


# Descriptor rows depend on the structure only (not on the labels): kept per structure so that a
# second examination of the same frames in one process (``mlipops check`` next to the training
# data, repeated trials of a benchmark) does not recompute them. Bounded; cleared by clear_design_cache().
_DESIGN_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray | None]] = {}
_DESIGN_CACHE_ROWS = 500_000  # force rows kept at most (× F features × 8 bytes: 96 MB for F = 24)
_cached_rows = [0]


def clear_design_cache() -> None:
    _DESIGN_CACHE.clear()
    _cached_rows[0] = 0


def _structure_key(numbers, positions, cell, pbc) -> str:
    """:func:`mlipops.frames.frame_id` of a frame given as arrays."""
    from ase import Atoms

    from mlipops.frames import frame_id

    return frame_id(Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc))


_SPILL_CELLS = 32 << 20  # force design cells (rows x F) above which x_forces goes to a RowStore (256 MB)


def _design_rows(desc, pool: "FramePool", chunk: list[int], z_to_index: dict, species: list[str], forces: bool,
                 keep_descriptors: bool = False) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The energy rows [len(chunk), n_species + F] and force rows [3 N_chunk, F] (None without ``forces``) of
    the frames ``chunk`` of ``pool``, in one descriptor call (:func:`design`), and with ``keep_descriptors`` the
    atoms' descriptors as float32 [N_chunk, F] (else None)."""
    from ase.data import atomic_numbers

    from mlipops.descriptors import summed_descriptor_gradient

    n_feat = desc.n_features
    sps, ii, jj, vv, owner = [], [], [], [], []
    off = 0
    for q, k in enumerate(chunk):
        numbers, pos, cell, pbc = pool.frame(k)
        sp, i, j, vec, _ = frame_edges(numbers, pos, cell, pbc, desc.cutoff, z_to_index)
        dpos = pos[j] - pos[i]
        sps.append(sp), ii.append(i + off), jj.append(j + off)
        vv.append(dpos + (vec - dpos))  # as positions[j] - positions[i] + shift: the energy rows' exact bits
        owner.append(np.full(len(numbers), q))
        off += len(numbers)
    sp_t, i_t, j_t = (torch.from_numpy(np.concatenate(v)) for v in (sps, ii, jj))
    vec = torch.from_numpy(np.concatenate(vv))
    with torch.no_grad():
        if forces:  # the descriptors and their gradient in one pass over the edges
            g, jac = summed_descriptor_gradient(desc, sp_t, i_t, j_t, vec, with_descriptors=True)
            jac = -jac.reshape(-1, n_feat).numpy()  # [3N, F], row 3 a + α
        else:
            g, jac = desc(sp_t, i_t, j_t, vec), None  # [N, F]
        own = torch.from_numpy(np.concatenate(owner))
        s = g.new_zeros(len(chunk), n_feat).index_add_(0, own, g).numpy()  # per-frame summed descriptors
    rows = np.empty((len(chunk), len(species) + n_feat))
    for q, k in enumerate(chunk):
        numbers = pool.frame(k)[0]
        cnt = np.array([np.sum(numbers == atomic_numbers[sp]) for sp in species], float)
        rows[q] = np.concatenate([cnt, s[q]]) / len(numbers)
    return rows, jac, (g.numpy().astype(np.float32) if keep_descriptors else None)


_PARALLEL_MIN_ATOMS = 200_000  # training atoms from which the design rows are made by worker processes
_TASK_CHUNKS = 32  # chunks (of ~1000 atoms) a worker makes at a time


def _design_workers(n_atoms: int) -> int:
    """Worker processes for the design rows of ``n_atoms`` atoms: those reading a large file gets
    (:func:`mlipops.frames.read_workers`), from :data:`_PARALLEL_MIN_ATOMS` atoms; else 1 (this process)."""
    from mlipops.frames import read_workers

    return read_workers(1 << 62) if n_atoms >= _PARALLEL_MIN_ATOMS else 1


def _design_task(sub: "FramePool", chunks: list[list[int]], species: list[str], settings: dict, forces: bool,
                 keep_descriptors: bool = False):
    from ase.data import atomic_numbers

    desc = AtomCentredDescriptor(len(species), **settings).double()
    z_to_index = {atomic_numbers[s]: k for k, s in enumerate(species)}
    out = [_design_rows(desc, sub, c, z_to_index, species, forces, keep_descriptors) for c in chunks]
    return (np.concatenate([r for r, _, _ in out]), (np.concatenate([j for _, j, _ in out]) if forces else None),
            np.concatenate([g for _, _, g in out]) if keep_descriptors else None)


def _design_in_workers(pool: "FramePool", chunks: list[list[int]], species: list[str], settings: dict,
                       forces: bool, n_workers: int, xe: np.ndarray, xf, store, saved=None) -> None:
    """:func:`design`'s rows made by ``n_workers`` spawned processes (one thread each), ``_TASK_CHUNKS`` chunks
    a task, at most two tasks per worker in flight; written in order into ``xe`` and ``xf`` or ``store``."""
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    from mlipops.frames import _worker_init

    groups = [chunks[q:q + _TASK_CHUNKS] for q in range(0, len(chunks), _TASK_CHUNKS)]
    with ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as ex:
        pending: deque = deque()

        def collect():
            frames, fut = pending.popleft()
            rows, jac, g = fut.result()
            xe[frames] = rows
            if saved is not None:
                saved.add(frames, g)
            if jac is not None:
                if store is not None:
                    store.append(jac)
                else:
                    lo = 3 * pool.starts[frames[0]]
                    xf[lo:lo + len(jac)] = jac

        for group in groups:
            frames = np.concatenate([np.asarray(c, dtype=np.int64) for c in group])
            local, q = [], 0
            for c in group:
                local.append(list(range(q, q + len(c))))
                q += len(c)
            pending.append((frames, ex.submit(_design_task, pool.take(frames), local, species, settings, forces,
                                              saved is not None)))
            if len(pending) >= 2 * n_workers:
                collect()
        while pending:
            collect()


def design(frames, species: list[str], settings: dict, forces: bool = True,
           chunk_atoms: int = 1000, spill_dir: str | Path | None = None, save_descriptors: str | Path | None = None
           ) -> dict[str, np.ndarray]:
    """Rows of both surrogates, for ``frames`` (a list of ase.Atoms or a :class:`FramePool`).

    Returns x_energy [n_frames, n_species + F] (per atom), y_energy [n_frames] (eV/atom), and with
    ``forces``: x_forces [3 N_total, F] (−∂S/∂r; a :class:`RowStore` in ``spill_dir`` (None: the system's
    temporary directory) when larger than 256 MB), y_forces [3 N_total], force_frame / force_atom / force_axis
    [3 N_total] (which frame, atom and axis each row is; frame-major, so a frame's rows are contiguous) and
    force_start [n_frames + 1] (the first row of each frame).

    The force rows come from :func:`mlipops.descriptors.summed_descriptor_gradient` (analytic, one pass
    over the edges); each atom moves only its own frame's S, so the gradient of the chunk's summed S is
    every frame's.

    ``save_descriptors``: a folder the atoms' descriptors (which the rows are made of) are saved to, for the
    index (:class:`mlipops.descriptors.SavedDescriptorsWriter`; returned as ``saved``, to be finished by the
    caller once the data file they belong to is written).
    """
    import json

    from ase.data import atomic_numbers

    from mlipops.descriptor_store import SavedDescriptorsWriter

    pool = FramePool.from_atoms(frames)
    n = len(pool)
    z_to_index = {atomic_numbers[s]: k for k, s in enumerate(species)}
    desc = AtomCentredDescriptor(len(species), **settings).double()
    n_feat = desc.n_features
    counts, starts = pool.counts, pool.starts
    total_rows = 3 * int(counts.sum())
    # the cache serves repeated examinations of small sets (check, benchmarks); a large set skips it
    use_cache = total_rows <= _DESIGN_CACHE_ROWS and save_descriptors is None  # (the cache keeps no descriptors)
    context = (tuple(species), json.dumps(settings, sort_keys=True, default=str))
    keys = [(_structure_key(*pool.frame(k)), *context) for k in range(n)] if use_cache else [None] * n
    spill = forces and total_rows * n_feat > _SPILL_CELLS
    store = RowStore(n_feat, spill_dir) if spill else None
    xe = np.zeros((n, len(species) + n_feat))
    xf = None if not forces or spill else np.zeros((total_rows, n_feat))
    saved = None if save_descriptors is None else \
        SavedDescriptorsWriter(save_descriptors, species, settings, n_feat, pool.info["frame_id"], counts)
    done = np.zeros(n, dtype=bool)
    for k in range(n):
        hit = _DESIGN_CACHE.get(keys[k]) if use_cache else None
        if hit is not None and (hit[1] is not None or not forces):
            xe[k] = hit[0]
            if forces:
                xf[3 * starts[k]:3 * (starts[k] + counts[k])] = hit[1]
            done[k] = True

    def flush(chunk):
        if not chunk:
            return
        rows, jac, g = _design_rows(desc, pool, chunk, z_to_index, species, forces, saved is not None)
        if saved is not None:
            saved.add(np.asarray(chunk, dtype=np.int64), g)
        start = 0
        for q, k in enumerate(chunk):
            n_k = int(counts[k])
            xe[k] = rows[q]
            xf_k = None if jac is None else jac[3 * start:3 * (start + n_k)]
            start += n_k
            if xf is not None:
                xf[3 * starts[k]:3 * (starts[k] + counts[k])] = xf_k
            if use_cache:
                n_rows = 0 if xf_k is None else len(xf_k)
                old = _DESIGN_CACHE.get(keys[k])
                if (old is None or (old[1] is None and xf_k is not None)) and \
                        _cached_rows[0] + n_rows <= _DESIGN_CACHE_ROWS:
                    _DESIGN_CACHE[keys[k]] = (xe[k].copy(), None if xf_k is None else xf_k.copy())
                    _cached_rows[0] += n_rows
        if store is not None:
            store.append(jac)

    chunks, chunk, n_chunk = [], [], 0  # the frames not served by the cache, ~chunk_atoms atoms a chunk
    for k in range(n):
        if done[k]:
            continue
        chunk.append(k)
        n_chunk += int(counts[k])
        if n_chunk >= chunk_atoms:
            chunks.append(chunk)
            chunk, n_chunk = [], 0
    if chunk:
        chunks.append(chunk)
    n_workers = 1 if use_cache else _design_workers(total_rows // 3)
    if n_workers > 1:  # worker processes, a group of chunks each; the same rows as below, chunk by chunk
        _design_in_workers(pool, chunks, species, settings, forces, n_workers, xe, xf, store, saved)
    else:
        for q, chunk in enumerate(chunks):
            flush(chunk)
            if (q + 1) % 64 == 0:  # the chunks' temporaries fragment the heap: give it back now and then
                trim_memory()
    out = {"x_energy": xe, "y_energy": pool.energy / np.maximum(counts, 1), "saved": saved}
    if forces:
        n_atoms = int(counts.sum())
        small = np.int32 if n_atoms < 2**31 // 3 else np.int64  # one index per force row: 7M rows at scale
        frame_of_atom = np.repeat(np.arange(n, dtype=small), counts)
        out |= {"x_forces": store if store is not None else xf,
                "y_forces": pool.forces.reshape(-1).astype(np.float64),
                "force_frame": np.repeat(frame_of_atom, 3),
                "force_atom": np.repeat((np.arange(n_atoms, dtype=np.int64)
                                         - np.repeat(starts, counts)).astype(small), 3),
                "force_axis": np.tile(np.arange(3, dtype=np.int8), n_atoms),
                "force_start": np.concatenate([3 * starts, [3 * n_atoms]]).astype(np.int64)}
    return out


def _factorize(groups) -> tuple[np.ndarray, np.ndarray]:
    """(code of each row, the distinct groups): integer groups (codes already: one per force row, 7M at scale)
    as they are, anything else as objects."""
    g = np.asarray(groups)
    return pd.factorize(g if g.dtype.kind in "iu" else g.astype(object), use_na_sentinel=False)


def robust_t(residual: np.ndarray, leverage: np.ndarray, groups: np.ndarray, min_group: int = 10,
             informative: np.ndarray | None = None) -> np.ndarray:
    """Residuals in units of a robust scale: r / (σ_g √(1 − h)), σ_g = 1.4826 MAD of the residuals of
    the row's group (config_type), or of all rows for groups smaller than ``min_group``; only the
    ``informative`` rows (default all) set the scale.

    Why not the OLS scale: one gross error inflates it and masks the others, and a linear
    surrogate fits some kinds of structure (liquids) much worse than others (crystals), so one
    scale for all would flag every liquid frame. Why ``informative``: force components that are zero
    by symmetry in label and surrogate alike (unrattled strained crystals) have zero residual; when they
    are the majority of a group, its MAD is zero and every real force in it looks infinitely wrong."""
    scale = _group_scale(residual, groups, min_group, informative)
    codes, names = _factorize(groups)
    den = np.subtract(1.0, leverage, dtype=float)  # in place: one array per force row (7M at scale)
    np.clip(den, 1e-12, None, out=den)
    np.sqrt(den, out=den)
    den *= np.array([scale.get(g, scale[None]) for g in names], dtype=float)[codes] if len(codes) else 0.0
    return residual / den


def force_frame_stats(res: np.ndarray, pred: np.ndarray, frame: np.ndarray, atom: np.ndarray,
                      groups: np.ndarray, reference: np.ndarray, min_group: int = 5) -> pd.DataFrame:
    """Per-frame statistics of the force residuals ``res`` = label − surrogate ``pred`` (rows =
    force components; ``frame``/``atom`` of each row; ``groups`` the config_type *per frame*).

    How large a frame's residuals should be depends on how hot it is: a linear surrogate misses a
    roughly constant fraction of the force, so the mean squared residual per component R_f of the
    frames of one config_type grows with their mean squared predicted force P_f (mlearn Mo AIMD:
    R ≈ 0.02 + 0.025 P eV²/Å², from 300 to 6000 K). The expected level v_f = a_g + b_g P_f is fitted
    per config_type g on the ``reference`` frames (Theil–Sen, robust to a minority of bad frames;
    never below the 5th percentile of R in the group), from predicted forces only, which a wrong
    label does not change. Then

    - ``force_chi2`` = R_f / v_f: the frame's χ² per component on its expected level (≈ 1);
      sign-flipped forces give ≈ 4 P_f / v_f, another frame's forces ≈ (P_f + P_f') / v_f;
    - ``force_rel`` = Σ r² / Σ F̂²: the residual relative to the predicted forces (for the report);
    - ``atom_chi2`` and ``atom_chi2_atom``: the largest |r_i|² / (3 v_f) over the frame's atoms and
      that atom (``atom_residual`` = its |r_i|, eV/Å): a residual concentrated on one atom (a
      displaced atom whose labels were not recomputed, one wrong force row).

    NaN for frames without rows or whose forces are all (numerically) zero, in the labels and the
    surrogate alike (a perfect crystal: nothing to test). The leverage of a single force row
    (≈ p / rows) is negligible here.
    """
    n_frames = len(groups)
    out = pd.DataFrame(np.nan, index=np.arange(n_frames),
                       columns=["force_ms_residual", "force_ms_predicted", "force_level", "force_chi2",
                                "force_rel", "atom_chi2", "atom_chi2_atom", "atom_residual"])
    if not len(res):
        return out
    cnt = np.bincount(frame, minlength=n_frames).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.bincount(frame, res**2, minlength=n_frames)
        p2 = np.bincount(frame, pred**2, minlength=n_frames)
        y2 = np.bincount(frame, (res + pred) ** 2, minlength=n_frames)
        big_r, big_p = r2 / cnt, p2 / cnt
        rel = np.where(r2 > 0, r2 / p2, 0.0)
        # forces that are zero in label and surrogate alike (a perfect crystal) have nothing to test
        has = (cnt > 0) & ((y2 / cnt > _ZERO_FORCE**2) | (big_p > _ZERO_FORCE**2))
    level, _ = residual_level(big_r, big_p, groups, reference & has, min_group)
    # rows of the design are frame-major and atom-minor already: sort only what is not
    ordered = _is_sorted(frame) and bool(np.all((frame[1:] != frame[:-1]) | (atom[1:] >= atom[:-1])))
    order = None if ordered else np.lexsort((atom, frame))
    f_sorted, a_sorted = (frame, atom) if ordered else (frame[order], atom[order])
    start = np.flatnonzero(np.r_[True, (f_sorted[1:] != f_sorted[:-1]) | (a_sorted[1:] != a_sorted[:-1])])
    atom_r2 = np.add.reduceat(np.square(res if ordered else res[order]), start)  # [atoms with rows]
    atom_frame, atom_index = f_sorted[start], a_sorted[start]
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = atom_r2 / (3.0 * level[atom_frame])
    worst = pd.DataFrame({"frame": atom_frame, "atom": atom_index, "stat": stat, "r2": atom_r2})
    # a frame whose group has no level (no reference frame to set it) has no statistic: not tested, as above
    worst = worst[has[worst["frame"].to_numpy()] & np.isfinite(worst["stat"].to_numpy())]
    worst = worst.loc[worst.groupby("frame")["stat"].idxmax()]
    fr = worst["frame"].to_numpy()
    out.loc[has, "force_ms_residual"] = big_r[has]
    out.loc[has, "force_ms_predicted"] = big_p[has]
    out.loc[has, "force_level"] = level[has]
    with np.errstate(divide="ignore", invalid="ignore"):
        out.loc[has, "force_chi2"] = big_r[has] / level[has]
    out.loc[has, "force_rel"] = rel[has]
    out.loc[fr, "atom_chi2"] = worst["stat"].to_numpy()
    out.loc[fr, "atom_chi2_atom"] = worst["atom"].to_numpy()
    out.loc[fr, "atom_residual"] = np.sqrt(worst["r2"].to_numpy())
    return out


_ZERO_FORCE = 1e-6  # eV/Å: an rms force below this is zero (a symmetric structure)


_THEIL_SEN_MAX = 2000  # frames a Theil–Sen line is fitted to at most (4·10⁶ pairs)


def residual_level(big_r: np.ndarray, big_p: np.ndarray, groups: np.ndarray, reference: np.ndarray,
                   min_group: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Expected mean squared force residual per component of each frame: a_g + b_g P_f, with a_g,
    b_g a Theil–Sen line of R on P over the ``reference`` frames of its group g (all reference frames
    for a group with fewer than ``min_group``), slope ≥ 0, never below the group's 5th percentile of R
    (nor zero). Returns the levels and, per frame, its group's (a_g, b_g, floor)."""
    groups = np.asarray(groups, dtype=object)
    ok = reference & np.isfinite(big_r) & np.isfinite(big_p)
    level = np.full(len(big_r), np.nan)
    coef = np.full((len(big_r), 3), np.nan)  # a_g, b_g, floor of each frame's group

    def line(m):
        r, p = big_r[m], big_p[m]
        if len(r) >= 3 and np.ptp(p) > 0:
            # Theil–Sen takes every pair: O(m²) time and memory (10⁴ frames: 10⁸ slopes). Above
            # _THEIL_SEN_MAX frames its slope is taken over that many, evenly spread over the group's P
            # (the sorted P at equal steps), which keeps the range the slope is read from
            sub = np.argsort(p, kind="stable")[np.round(np.linspace(0, len(p) - 1, _THEIL_SEN_MAX)).astype(int)] \
                if len(p) > _THEIL_SEN_MAX else slice(None)
            b = max(theil_sen_slope(r[sub], p[sub]), 0.0)
            a = float(np.median(r - b * p))  # the intercept for the clipped slope
        else:
            b, a = 0.0, float(np.median(r)) if len(r) else np.nan
        floor = float(np.quantile(r, 0.05)) if len(r) else np.nan
        return a, b, max(floor, 1e-12)

    everything = line(ok)
    for gname in pd.unique(groups):
        m = groups == gname
        a, b, floor = line(ok & m) if (ok & m).sum() >= min_group else everything
        level[m] = np.maximum(a + b * big_p[m], floor)
        coef[m] = a, b, floor
    return level, coef


def theil_sen_slope(y: np.ndarray, x: np.ndarray) -> float:
    """The Theil–Sen slope of y on x: the median of the slopes of all pairs with distinct x (scipy's
    ``theilslopes(y, x).slope``, the same number, without the sort of every slope its confidence interval
    needs: most of its time for 2000 points)."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    dx = x[:, None] - x
    pos = dx > 0
    return float(np.median((y[:, None] - y)[pos] / dx[pos]))


def tail_z(values: np.ndarray, groups: np.ndarray, reference: np.ndarray, min_group: int = 5,
           floor: float = 1e-12) -> np.ndarray:
    """How far each value lies in the upper tail of the reference frames of its group, robustly:
    z = (log v − median_g log v) / (1.4826 MAD_g log v), over the ``reference`` frames of group g
    (config_type) with a value above ``floor`` (frames with nothing to measure, e.g. exactly zero
    forces, say nothing about the spread), or of all reference frames for a group with fewer than
    ``min_group`` of them. The scale is never below the pooled within-group scale, so a group whose
    frames happen to agree closely does not turn small differences into large z.

    The reference is the data itself (the frames not flagged so far), so a threshold on z is a
    threshold on the tail of the clean frames' own distribution, in units of its spread.
    """
    v = np.asarray(values, dtype=float)
    lv = np.log10(np.clip(v, floor, None))
    use = reference & np.isfinite(lv) & (v > floor)
    z = np.full(len(v), np.nan)
    if use.sum() < 3:
        return z
    groups = np.asarray(groups, dtype=object)
    overall = float(np.median(lv[use]))
    centre = {}
    for gname in pd.unique(groups):
        m = use & (groups == gname)
        centre[gname] = float(np.median(lv[m])) if m.sum() >= min_group else None
    c = np.array([overall if centre[gname] is None else centre[gname] for gname in groups])
    dev = lv - c
    pooled = max(1.4826 * float(np.median(np.abs(dev[use]))), 1e-6)
    scale = np.full(len(v), pooled)
    for gname, cg in centre.items():
        m = groups == gname
        if cg is not None:
            scale[m] = max(1.4826 * float(np.median(np.abs(dev[use & m]))), pooled)
    z = dev / scale
    # a centre and a scale estimated from m frames are themselves uncertain: read z as a Student t
    # with m − 1 degrees of freedom and return the normal deviate of the same tail probability
    # (no change for large groups; a group of 6 frames needs z ≈ 7 for what 100 frames call 4)
    from scipy.stats import norm, t as student

    n_ref = {gname: int((use & (groups == gname)).sum()) if cg is not None else int(use.sum())
             for gname, cg in centre.items()}
    m_ref = np.array([n_ref[gname] for gname in groups], dtype=float)
    with np.errstate(invalid="ignore"):
        z = np.where(np.isfinite(z), norm.isf(student.sf(z, np.maximum(m_ref - 1, 1))), z)
    z[~np.isfinite(lv)] = np.nan
    return z


_COOKS_BLOCK_ROWS = 1 << 16  # force rows read (one span) and evaluated at a time by frame_cooks


def frame_cooks(x, res: np.ndarray, frame: np.ndarray, fit: Surrogate,
                frames: np.ndarray, deleted: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Frame-block influence of the rows ``x`` (residuals ``res``, frame of each row ``frame``) of
    ``fit``, for each frame in ``frames``: Cook's distance of deleting all its rows at once,
    D_f = Δβ' X'X Δβ / (p s²) with Δβ = (X'X)⁻¹ (I − X_f'X_f (X'X)⁻¹)⁻¹ X_f' e_f the change of the
    coefficients when its rows X_f are dropped, and its deleted residuals e_f + X_f Δβ (the label
    minus the prediction of a fit without the frame). Closed forms, no refit; returns
    (D per frame, deleted residual per row).

    Rows in frame order (the design's) are read a block of consecutive frames at a time (one span of ``x``,
    which may be a :class:`RowStore`) and the frames of a block with equal row counts are solved as one stack;
    a stack with a singular frame, and rows in another order, go frame by frame."""
    out = np.full(len(frames), np.nan)
    deleted = np.array(res, dtype=float, copy=True) if deleted else None
    if fit.xtx_inv is None or fit.n <= fit.p or not fit.p:
        return out, deleted
    a = fit.xtx_inv
    xtx = np.linalg.pinv(a)
    s2 = float(np.sum((fit.y - fit.fitted) ** 2)) / (fit.n - fit.p)
    denom = fit.p * max(s2, 1e-300)
    in_order = _is_sorted(frame)
    order = np.arange(len(frame)) if in_order else np.argsort(frame, kind="stable")
    frames = np.asarray(frames)
    lo_all = np.searchsorted(frame[order], frames, side="left")
    hi_all = np.searchsorted(frame[order], frames, side="right")

    def one(q: int, xf: np.ndarray, e: np.ndarray):  # frame q's rows xf [r, p], residuals e [r]
        m = np.eye(fit.p) - xf.T @ xf @ a
        try:
            db = a @ np.linalg.solve(m, xf.T @ e)
        except np.linalg.LinAlgError:
            return None
        out[q] = float(db @ xtx @ db) / denom
        return e + xf @ db

    if not in_order or not _is_sorted(frames):
        for q, (lo, hi) in enumerate(zip(lo_all, hi_all)):
            rows = order[lo:hi]
            if len(rows):
                d_rows = one(q, x[rows][:, fit.cols], res[rows])
                if deleted is not None and d_rows is not None:
                    deleted[rows] = d_rows
        return out, deleted
    q = 0
    while q < len(frames):
        q0, r0 = q, int(lo_all[q])
        while q < len(frames) and (q == q0 or hi_all[q] - r0 <= _COOKS_BLOCK_ROWS):
            q += 1
        r1 = int(hi_all[q - 1])
        if r1 <= r0:
            continue
        xb = _columns(x[r0:r1], fit.cols)  # one read of the block's span
        eb = res[r0:r1]
        count = hi_all[q0:q] - lo_all[q0:q]
        for c in np.unique(count[count > 0]):
            sel = np.flatnonzero(count == c)
            idx = (lo_all[q0 + sel] - r0)[:, None] + np.arange(c)  # [B, c]
            xf, e = xb[idx], eb[idx]  # [B, c, p], [B, c]
            xft = xf.transpose(0, 2, 1)
            try:
                sol = np.linalg.solve(np.eye(fit.p) - (xft @ xf) @ a, (xft @ e[..., None]))[..., 0]
            except np.linalg.LinAlgError:  # a singular frame in the stack: frame by frame
                for b, k in enumerate(sel):
                    d_rows = one(q0 + k, xf[b], e[b])
                    if deleted is not None and d_rows is not None:
                        deleted[r0 + idx[b]] = d_rows
                continue
            db = sol @ a.T  # a is symmetric: (a @ sol_b) for every b
            out[q0 + sel] = np.einsum("bi,ij,bj->b", db, xtx, db) / denom
            if deleted is not None:
                deleted[r0 + idx] = e + (xf @ db[..., None])[..., 0]
    return out, deleted


def _is_sorted(a: np.ndarray) -> bool:
    return bool(len(a) < 2 or np.all(a[1:] >= a[:-1]))


def _first_max_per_run(values: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Index of the first largest value (NaN ignored, as pandas' idxmax) in each run of equal ``key``
    (sorted, e.g. the frame of frame-major rows): one index per distinct key, in key order."""
    if not len(values):
        return np.zeros(0, dtype=np.int64)
    if not _is_sorted(key):
        order = np.argsort(key, kind="stable")
        return order[_first_max_per_run(values[order], key[order])]
    start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    run = np.repeat(np.arange(len(start), dtype=np.int32), np.diff(np.r_[start, len(key)]))
    v = np.where(np.isnan(values), -np.inf, values)
    best = np.maximum.reduceat(v, start)
    hit = np.flatnonzero(v == best[run])
    del v
    first = np.unique(run[hit], return_index=True)[1]
    return hit[first]


def detect(frames: list[Atoms], species: list[str], settings: dict, o: OutlierParams | None = None, *,
           spill_dir: str | Path | None = None, save_descriptors: str | Path | None = None) -> OutlierReport:
    """Examine ``frames`` (the training split, all labelled) and decide which are influential outliers, with the
    thresholds of ``o`` (``validate.outliers`` of params.yaml; None: :class:`~mlipops.params.OutlierParams`'
    defaults, which equal params.yaml's).

    A frame is quarantined when

    - one of its rows (its energy, or a force component of one of its atoms) has Cook's distance
      above ``cooks_threshold`` (None: 4/n, n the rows of that surrogate) and a robust residual
      (:func:`robust_t`) above the energy or force threshold; or
    - its forces as a whole disagree with the surrogate: ``force_chi2`` of :func:`force_frame_stats`
      lies more than ``frame_z_threshold`` robust standard deviations into the upper tail of the
      frames of its config_type (:func:`tail_z`) *and* the residual is a sizeable part of the force
      the surrogate predicts for it (``force_rel`` > ``frame_min_relative_residual``; sign-flipped
      forces give 4, another frame's forces ≥ 1): a frame the surrogate explains to 99 % is not
      mislabelled, however unusual its small residual; or
    - its force residual is concentrated on one atom: ``atom_chi2`` more than ``atom_z_threshold``
      into the tail of its config_type's frames.

    Before the first least-squares fit, frames whose energy is grossly off a robust fit (Tukey
    biweight M-estimator, statsmodels ``RLM``: robust t above ``energy_gross_threshold``) are left
    out of it: one kcal/mol energy drags an ordinary least-squares fit so far that it hides itself
    and the others (masking). They are flagged provisionally and, like every frame flagged in an
    early round, re-judged against the final fit (:func:`_recheck`).

    None for a threshold switches that test off. ``save_descriptors``: see :func:`design` (the writer is
    ``report.saved``, None when no design was made).
    """
    o = o if o is not None else OutlierParams()
    cooks_threshold, energy_residual_threshold, force_residual_threshold = \
        o.cooks_threshold, o.energy_residual_threshold, o.force_residual_threshold
    forces, max_rounds, frame_z_threshold, atom_z_threshold = o.forces, o.max_rounds, o.frame_z_threshold, \
        o.atom_z_threshold
    min_group_frames, energy_gross_threshold, frame_min_relative_residual = \
        o.min_group_frames, o.energy_gross_threshold, o.frame_min_relative_residual
    pool = FramePool.from_atoms(frames)
    n = len(pool)
    cts = np.array([str(c) for c in pool.info["config_type"]], dtype=object)
    cts_code = pd.factorize(cts)[0].astype(np.int32)  # the groups of cts as integers (per force row: 7M at scale)
    rows = pd.DataFrame({"frame": np.arange(n), "config_type": cts, "frame_id": pool.info["frame_id"]})
    for c in ("energy_cooks", "energy_t", "energy_leverage", "energy_residual", "energy_dffit",
              "force_cooks", "force_t", "force_residual", "force_dffit", "force_frame_cooks", "force_chi2",
              "force_chi2_z", "force_rel", "force_level", "atom_chi2", "atom_chi2_z", "atom_residual"):
        rows[c] = np.nan
    rows["force_atom"] = pd.array([pd.NA] * n, dtype="Int64")
    rows["atom_chi2_atom"] = pd.array([pd.NA] * n, dtype="Int64")
    rows["flag_round"] = pd.array([pd.NA] * n, dtype="Int64")
    report = OutlierReport(frames=rows)
    t0 = time.perf_counter()
    d = design(pool, species, settings, forces=forces, spill_dir=spill_dir, save_descriptors=save_descriptors) \
        if n else None
    report.saved = d["saved"] if d else None
    trim_memory()  # the descriptor pass's temporaries
    report.timings["design_s"] = time.perf_counter() - t0
    if n <= (d["x_energy"].shape[1] + 2 if d else 0) or d is None:
        report.notes.append(f"{n} training frames are too few for the surrogate: not examined")
        rows["quarantine"], rows["kind"], rows["reason"] = False, "not examined", None
        for c in ("energy_flag", "force_flag", "frame_flag", "atom_flag"):
            rows[c] = False
        return report
    for c in ("energy_flag", "force_flag", "frame_flag", "atom_flag"):
        rows[c] = False
    keep = np.ones(n, dtype=bool)
    if energy_gross_threshold is not None:
        gross = gross_errors(d["y_energy"], d["x_energy"], cts, energy_gross_threshold)
        if gross.any() and (~gross).sum() > d["x_energy"].shape[1] + 2:
            rows.loc[gross, "energy_flag"] = True
            rows.loc[gross, "flag_round"] = 0
            keep &= ~gross
    tests = _FrameTests(d, cts, n, frame_z_threshold, atom_z_threshold, min_group_frames, frame_min_relative_residual)
    d["force_r_cache"] = {}  # the chunks' R factors of the force fit: a round refactors only the chunks it changed
    for rnd in range(1, max_rounds + 1):
        # least squares is not robust: a gross error (kcal/mol energies) drags the fit and hides the
        # others, so refit without the frames already flagged until nothing new is found
        report.rounds = rnd
        idx = np.flatnonzero(keep)
        if len(idx) <= d["x_energy"].shape[1] + 2:
            report.notes.append(f"round {rnd}: {len(idx)} frames left, too few for the surrogate")
            break
        es = ols_influence(d["y_energy"][idx], d["x_energy"][idx])
        report.energy = es
        thr_e = cooks_threshold if cooks_threshold is not None else 4.0 / es.n
        t_e = robust_t(es.y - es.fitted, es.leverage, cts[idx])
        rows.loc[idx, "energy_cooks"], rows.loc[idx, "energy_t"] = es.cooks, t_e
        rows.loc[idx, "energy_leverage"] = es.leverage
        rows.loc[idx, "energy_residual"], rows.loc[idx, "energy_dffit"] = es.y - es.fitted, es.dffit
        new_e = np.zeros(n, dtype=bool)
        new_e[idx] = (es.cooks > thr_e) & (np.abs(t_e) > energy_residual_threshold)
        new_f = np.zeros(n, dtype=bool)
        new_frame = np.zeros(n, dtype=bool)
        new_atom = np.zeros(n, dtype=bool)
        if forces and len(d["y_forces"]):
            rmask = keep[d["force_frame"]]
            fs = ols_influence(d["y_forces"], d["x_forces"], rmask, d.get("force_r_cache"))
            report.forces = fs
            thr_f = cooks_threshold if cooks_threshold is not None else 4.0 / fs.n
            fr = d["force_frame"][rmask]
            res = fs.y - fs.fitted
            t_f = robust_t(res, fs.leverage, cts_code[fr], informative=_nonzero_force_rows(fs.y, fs.fitted))
            bad = (fs.cooks > thr_f) & (np.abs(t_f) > force_residual_threshold)
            w = _first_max_per_run(np.abs(t_f), fr)  # each frame's row of largest |t| (rows are frame-major)
            at = fr[w]
            rows.loc[at, "force_cooks"] = fs.cooks[w]
            rows.loc[at, "force_t"] = t_f[w]
            rows.loc[at, "force_residual"] = res[w]
            rows.loc[at, "force_dffit"] = fs.dffit[w]
            rows.loc[at, "force_atom"] = d["force_atom"][rmask][w]
            new_f[np.unique(fr[bad])] = True
            del res, t_f, bad
            # what the rest of the test uses of the force fit: y, fitted, coefficients; the per-row influence
            # measures (4 arrays of a float per force row, 7M rows at scale) are done with
            fs.leverage = fs.cooks = fs.t_external = fs.dffit = None
            flag_frame, flag_atom = tests.judge(fs, keep, rows)
            new_frame, new_atom = flag_frame & keep, flag_atom & keep
        rows.loc[new_e, "energy_flag"] = True
        rows.loc[new_f, "force_flag"] = True
        rows.loc[new_frame, "frame_flag"] = True
        rows.loc[new_atom, "atom_flag"] = True
        new = new_e | new_f | new_frame | new_atom
        if not new.any():
            break
        rows.loc[new, "flag_round"] = rnd
        keep &= ~new
    t1 = time.perf_counter()
    report.timings["fits_s"] = t1 - t0 - report.timings["design_s"]
    _recheck(rows, d, keep, report, cts, energy_residual_threshold, force_residual_threshold, tests, cooks_threshold,
             cts_code)
    report.timings["recheck_s"] = time.perf_counter() - t1
    rows["quarantine"] = rows["energy_flag"] | rows["force_flag"] | rows["frame_flag"] | rows["atom_flag"]
    es = report.energy
    thr_e = cooks_threshold if cooks_threshold is not None else 4.0 / es.n
    rows["kind"] = [_kind(r, es, energy_residual_threshold, thr_e) for r in rows.itertuples()]
    rows["reason"] = [_reason(r, tests) if r.quarantine else None for r in rows.itertuples()]
    report.frames = rows
    return report


class _FrameTests:
    """The frame-level force tests of :func:`detect` (``force_chi2`` & ``force_rel``, ``atom_chi2``),
    judged against the current force fit for every frame, kept or already flagged."""

    def __init__(self, d: dict, cts: np.ndarray, n: int, frame_z: float | None, atom_z: float | None,
                 min_group: int, min_rel: float = 0.0):
        self.d, self.cts, self.n, self.min_rel = d, cts, n, min_rel
        self.frame_z, self.atom_z, self.min_group = frame_z, atom_z, min_group
        self.last: pd.DataFrame | None = None

    def judge(self, fs: Surrogate, keep: np.ndarray, rows: pd.DataFrame | None = None):
        d, cts, n = self.d, self.cts, self.n
        if fs.beta is None or (self.frame_z is None and self.atom_z is None):
            return np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        ff = d["force_frame"]
        pred = predict_rows(d["x_forces"], fs.cols, fs.beta)
        res = d["y_forces"] - pred
        st = force_frame_stats(res, pred, ff, d["force_atom"], cts, keep, self.min_group)
        ref = keep.copy()
        for c in ("force_chi2", "atom_chi2"):
            st[c + "_z"] = tail_z(st[c].to_numpy(float), cts, ref, self.min_group)
        kept = np.flatnonzero(keep)
        st["force_frame_cooks"] = np.nan
        # every row of a kept frame is in the fit: the frames' rows are found in the whole design
        st.loc[kept, "force_frame_cooks"] = frame_cooks(d["x_forces"], res, ff, fs, kept, deleted=False)[0]
        del pred, res
        self.last = st
        if rows is not None:
            for c in ("force_chi2", "force_chi2_z", "force_rel", "force_level", "atom_chi2", "atom_chi2_z",
                      "atom_residual"):
                rows[c] = st[c].to_numpy()
            # Cook's D exists for the frames in this fit; a flagged frame keeps the value it had when flagged
            fitted = st["force_frame_cooks"].notna().to_numpy()
            rows.loc[fitted, "force_frame_cooks"] = st.loc[fitted, "force_frame_cooks"].to_numpy()
            rows["atom_chi2_atom"] = pd.array(st["atom_chi2_atom"].to_numpy(), dtype="Int64") \
                if st["atom_chi2_atom"].notna().all() else st["atom_chi2_atom"].round().astype("Int64")
        zf, za = (st[c].to_numpy(float) for c in ("force_chi2_z", "atom_chi2_z"))
        with np.errstate(invalid="ignore"):
            frame = (np.nan_to_num(zf, nan=-np.inf) > self.frame_z) & (st["force_rel"].to_numpy(float) > self.min_rel) \
                if self.frame_z is not None else np.zeros(n, dtype=bool)
            atom = np.nan_to_num(za, nan=-np.inf) > self.atom_z if self.atom_z is not None else np.zeros(n, dtype=bool)
        return frame, atom


def gross_errors(y: np.ndarray, x: np.ndarray, groups: np.ndarray, threshold: float) -> np.ndarray:
    """Rows whose label is grossly off a robust fit of y on x: statsmodels' RLM with Tukey's
    biweight (which gives a gross error zero weight instead of following it), residuals as
    :func:`robust_t` with the least-squares leverage; True where |t| > ``threshold``."""
    import statsmodels.api as sm

    cols = _independent_columns(x)
    xr = x[:, cols]
    if len(y) <= xr.shape[1] + 2:
        return np.zeros(len(y), dtype=bool)
    try:
        fit = sm.RLM(y, xr, M=sm.robust.norms.TukeyBiweight()).fit()
    except (ValueError, np.linalg.LinAlgError):  # a degenerate robust fit: no provisional flags
        return np.zeros(len(y), dtype=bool)
    h = np.einsum("ij,jk,ik->i", xr, np.linalg.pinv(xr.T @ xr), xr)
    t = robust_t(np.asarray(fit.resid), h, groups)
    return np.abs(t) > threshold


def _mad(x: np.ndarray) -> float:
    return 1.4826 * float(np.median(np.abs(x - np.median(x)))) if len(x) else np.nan


def _group_scale(residual: np.ndarray, groups: np.ndarray | None, min_group: int = 10,
                 informative: np.ndarray | None = None, members: dict | None = None) -> dict:
    """{group: 1.4826 MAD of its residuals} for groups of at least ``min_group`` (informative) rows with a
    nonzero spread, and {None: the same over all rows} as the fallback; only ``informative`` rows count.
    ``members`` ({group: its rows, ascending integer array}) in place of ``groups``: the grouping known already
    (with ``informative``, only its informative rows count, as with ``groups``)."""
    use = None if informative is None else np.asarray(informative, dtype=bool)
    overall = _mad(residual if use is None else residual[use])
    out = {None: overall if overall > 0 else 1e-12}
    if members is not None:
        for g, rows in members.items():
            if use is not None:
                rows = rows[use[rows]]
            if len(rows) >= min_group:
                scale = _mad(residual[rows])
                if scale > 0:
                    out[g] = scale
        return out
    codes, names = _factorize(groups)
    for c, g in enumerate(names):
        m = codes == c if use is None else (codes == c) & use
        if m.sum() >= min_group:
            scale = _mad(residual[m])
            if scale > 0:
                out[g] = scale
    return out


def _nonzero_force_rows(y: np.ndarray, fitted: np.ndarray) -> np.ndarray:
    """Force rows not zero by symmetry in both label and surrogate (see :func:`robust_t`)."""
    return (np.abs(y) > _ZERO_FORCE) | (np.abs(fitted) > _ZERO_FORCE)


def added_influence(e0: np.ndarray, h0: np.ndarray, fit: Surrogate) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Influence measures of rows *not* in ``fit`` as if each were added to it alone: from the
    prediction residual e0 and prediction leverage h0 = x (X'X)⁻¹ x', the row's leverage in the
    augmented fit h = h0 / (1 + h0), its Cook's distance D = e0² h0 / (p s² (1 + h0)) (s² of ``fit``)
    and the change of its own prediction when it is dropped again, h0 e0 / (1 + h0). Closed forms of
    the rank-one update; no refit."""
    s2 = fit.__dict__.get("_s2")  # one per fit: the force fit's s² is a sum over millions of rows
    if s2 is None:
        s2 = fit.__dict__["_s2"] = float(np.sum((fit.y - fit.fitted) ** 2)) / max(fit.n - fit.p, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cooks = e0**2 * h0 / (fit.p * max(s2, 1e-300) * (1.0 + h0))
    return cooks, h0 / (1.0 + h0), h0 * e0 / (1.0 + h0)


def _recheck(rows: pd.DataFrame, d: dict, keep: np.ndarray, report: OutlierReport, cts: np.ndarray,
             t_e: float, t_f: float, tests: _FrameTests | None = None, cooks_threshold: float | None = None,
             cts_code: np.ndarray | None = None) -> None:
    """Frames flagged in an early round (or left out from the start as gross errors) were judged
    against a fit that gross errors still dragged; re-judge every test against the final fit (which
    excludes every flagged frame), as predictions with their prediction leverage, and release those
    the clean fit explains. The Cook's distances recorded for them are those of adding each alone
    back to the final fit (:func:`added_influence`)."""
    flagged = np.flatnonzero(~keep)
    if not len(flagged) or report.energy is None or report.energy.beta is None:
        return
    # energies: released one at a time, the most consistent first, each joining the fit before the
    # next is judged. Rare frames vouch for each other: a high-leverage frame judged against a fit
    # that also lacks its few neighbours in descriptor space looks wrong for leverage alone.
    es = report.energy
    fit_idx = list(np.flatnonzero(keep))
    pending = list(flagged)
    verdict: dict[int, tuple] = {}
    # every column already in the fit: a released frame's row can only add to it (rank never drops), so the fit
    # grows by a QR row update; else (a column left out as dependent might join) it is refitted
    n_cols = d["x_energy"].shape[1]
    growing = _GrowingFit(d["x_energy"], d["y_energy"], fit_idx) \
        if len(fit_idx) > n_cols and len(_independent_columns(d["x_energy"][fit_idx])) == n_cols else None
    # the config_types as integer codes (a string gather and factorize per release: minutes at 100k frames)
    codes = pd.factorize(cts)[0] if cts_code is None else cts_code
    # each config_type's rows of the fit (positions in fit_idx, ascending): a release appends one
    members = {int(c): np.flatnonzero(codes[fit_idx] == c) for c in np.unique(codes[fit_idx])}
    while pending:
        if len(fit_idx) != es.n:  # a release (or the last round flagged frames after its fit)
            if growing is not None:
                if len(growing.rows) < len(fit_idx):
                    growing.add(fit_idx[-1])
                es = growing.surrogate()
            else:  # refit (the fit alone at scale)
                es = ols_influence(d["y_energy"][fit_idx], d["x_energy"][fit_idx]) \
                    if len(fit_idx) * d["x_energy"].shape[1] <= _LIGHT_REFIT_CELLS else \
                    _ols_fit(d["y_energy"][fit_idx], d["x_energy"][fit_idx])
        scale_e = _group_scale(es.y - es.fitted, None, members=members)
        pred, h = es.predict(d["x_energy"][pending])
        r = d["y_energy"][pending] - pred
        sig = np.array([scale_e.get(c, scale_e[None]) for c in codes[pending].tolist()])
        te = r / (sig * np.sqrt(1.0 + h))
        cooks, lev, dffit = added_influence(r, h, es)
        thr_e = cooks_threshold if cooks_threshold is not None else 4.0 / (es.n + 1)
        bad = (np.abs(te) > t_e) & (cooks > thr_e)
        for q, k in enumerate(pending):
            verdict[k] = (bad[q], te[q], r[q], cooks[q], lev[q], dffit[q])
        if bad.all():
            break
        q = int(np.argmin(np.where(bad, np.inf, np.abs(te))))
        c = int(codes[pending[q]])
        members[c] = np.append(members.get(c, np.zeros(0, dtype=np.int64)), len(fit_idx))
        fit_idx.append(pending.pop(q))
    report.energy = es
    still_e = np.array([verdict[k][0] for k in flagged], dtype=bool)
    # the numbers behind the verdict (for a released frame: when it was released)
    for j, col in enumerate(("energy_t", "energy_residual", "energy_cooks", "energy_leverage", "energy_dffit"), 1):
        rows.loc[flagged, col] = [verdict[k][j] for k in flagged]
    still_f = np.zeros(len(flagged), dtype=bool)
    fs = report.forces
    if fs is not None and fs.beta is not None and "x_forces" in d:
        rmask = keep[d["force_frame"]]
        if int(rmask.sum()) != fs.n:  # the last round flagged frames after its fit (or stopped early): refit
            fs = ols_influence(d["y_forces"], d["x_forces"], rmask, d.get("force_r_cache"))
            report.forces = fs
        scale_f = _group_scale(fs.y - fs.fitted, codes[d["force_frame"][rmask]],
                               informative=_nonzero_force_rows(fs.y, fs.fitted))
        thr_f = cooks_threshold if cooks_threshold is not None else 4.0 / (fs.n + 1)
        start = d.get("force_start")
        for q, k in enumerate(flagged):
            m = np.arange(start[k], start[k + 1]) if start is not None else np.flatnonzero(d["force_frame"] == k)
            if not len(m):
                continue
            pf, hf = fs.predict(d["x_forces"][m])
            sf = scale_f.get(codes[k], scale_f[None])
            rf = d["y_forces"][m] - pf
            tf = rf / (sf * np.sqrt(1.0 + hf))
            cf, _, df_ = added_influence(rf, hf, fs)
            w = int(np.argmax(np.abs(tf)))
            still_f[q] = bool(np.any((np.abs(tf) > t_f) & (cf > thr_f)))
            # the numbers behind the verdict: the worst component against the final fit
            rows.loc[k, ["force_t", "force_residual", "force_cooks", "force_dffit"]] = [tf[w], rf[w], cf[w], df_[w]]
            rows.loc[k, "force_atom"] = int(d["force_atom"][m[w]])
    # every test again: a frame flagged early for one reason may be cleared of it and still fail
    # another (swapped forces first seen as one large component, say)
    rows.loc[flagged, "energy_flag"] = still_e
    rows.loc[flagged, "force_flag"] = still_f
    if tests is not None and fs is not None:
        # the frame tests of every frame against the final fit, the kept frames as the reference
        frame, atom = tests.judge(fs, keep, rows)
        rows.loc[flagged, "frame_flag"] = frame[flagged]
        rows.loc[flagged, "atom_flag"] = atom[flagged]


def _kind(r, es: Surrogate, t_thr: float, cooks_thr: float) -> str:
    if r.quarantine:
        return "influential_outlier"
    high_leverage = r.energy_leverage > 2.0 * es.p / es.n
    if r.energy_cooks > cooks_thr or high_leverage:
        return "high leverage, consistent label" if abs(r.energy_t) <= t_thr else "large residual, low influence"
    return "ok"


def _reason(r, tests: _FrameTests | None = None) -> str:
    parts = []
    if r.energy_flag:
        parts.append(f"energy {r.energy_residual:+.4f} eV/atom off the surrogate (robust t = {r.energy_t:.1f}, "
                     f"Cook's D = {r.energy_cooks:.3g}, leverage {r.energy_leverage:.3f}; dropping the frame "
                     f"moves its prediction by {r.energy_dffit:+.4f} eV/atom)")
    if r.force_flag:
        parts.append(f"force on atom {int(r.force_atom)} {r.force_residual:+.3f} eV/Å off the surrogate "
                     f"(robust t = {r.force_t:.1f}, Cook's D = {r.force_cooks:.3g}; dropping it moves the "
                     f"prediction by {r.force_dffit:+.3f} eV/Å)")
    zf = tests.frame_z if tests is not None else None
    za = tests.atom_z if tests is not None else None
    if r.frame_flag:
        parts.append(f"forces of the whole frame off the surrogate: χ² per component {r.force_chi2:.3g} × the level "
                     f"expected for its config_type and force scale (z = {r.force_chi2_z:.1f} > {zf}; residual "
                     f"{r.force_rel:.2g} × the predicted forces: sign-flipped, swapped or mis-scaled forces?"
                     + ("" if pd.isna(r.force_frame_cooks) else f"; frame Cook's D = {r.force_frame_cooks:.3g}")
                     + ")")
    if r.atom_flag:
        parts.append(f"force residual concentrated on atom {int(r.atom_chi2_atom)}: "
                     f"|ΔF| = {r.atom_residual:.3g} eV/Å, "
                     f"{r.atom_chi2:.3g} × the frame's residual level (z = {r.atom_chi2_z:.1f} > {za}: a displaced "
                     f"atom whose labels were not recomputed, or one wrong force row?)")
    return "; ".join(parts)
