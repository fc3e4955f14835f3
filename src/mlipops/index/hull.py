"""Descriptor-space convex hull of the training atoms: membership, extrapolation grade γ, distance.

Method (per species s, on the atoms of the training split):

1. The atom-centred descriptors G (``mlipops.descriptors``, the potential's own) are standardized
   with the training atoms' mean and standard deviation and projected on the first k principal
   components (PCA by SVD). Hulls in the full descriptor space are useless: with d features and n
   atoms, every point is a vertex once d is comparable to log n, and LP/qhull costs explode. k is a
   resolution: directions beyond the k-th component, in which the training atoms hardly vary, are
   ignored, so an atom that differs from the training data only there still counts as inside. The
   explained variance of the k components is recorded in the ``hull`` table for that reason.
2. The training points are pruned to the extreme points of their hull (qhull vertices, in the affine
   subspace the points span when they are degenerate). Pruning never changes the hull.
3. For every atom x, the extrapolation grade is the optimum of the linear program

       γ(x) = min Σᵢ μᵢ   s.t.  Σᵢ μᵢ (vᵢ − c) = x − c,  μ ≥ 0

   over the extreme points vᵢ, c the centroid of the training atoms. It is the smallest γ with
   x ∈ c + γ (hull − c): γ ≤ 1 inside, > 1 outside, γ = 2 twice as far from c as the hull boundary in
   that direction, and ``inside_hull`` ⇔ γ ≤ 1 is exactly membership x = Σ λᵢ vᵢ, λ ≥ 0, Σλ = 1
   (λ = μ/γ, completed with c). A point off the affine hull of a degenerate (flat) training cloud
   gets γ = ∞. Its dual is max w·(x − c) s.t. (vᵢ − c)·w ≤ 1: the optimal bases are the hull's
   facets. Solving it:
   - a basis B (k extreme points: a facet of the hull, with dual w_B solving (vᵢ − c)·w = 1, i ∈ B)
     is optimal for x exactly when it is primal feasible, μ_B = (V_B − c)⁻ᵀ (x − c) ≥ 0 (primal and
     dual feasible with equal objective). The facets come from qhull, with their adjacency, and a
     stochastic visibility walk across them (the pivot of the simplex method, done for many x at
     once in numpy) finds the certified facet of each x in a few steps (their number grows only
     slowly with the number of facets);
   - every x that no facet certifies (a degenerate or ill-conditioned facet, a flat training cloud,
     more facets than we keep) is solved by HiGHS, warm-started from the previous basis, and its
     optimal basis is cached. Either way the answer is the LP optimum; the tests compare both paths
     with plain HiGHS solves and with scipy's Delaunay point location.
4. ``hull_distance`` is the Euclidean distance in the projected space from x to the hull, 0 inside,
   from a non-negative least-squares problem (min ‖Σλᵢvᵢ − x‖, λ ≥ 0, Σλ = 1).

Atoms of an element that the training split never had, or with such an element within the
descriptor cutoff, cannot be placed in any hull: they are fully extrapolating (γ = ∞, outside).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mlipops.errors import MlipopsError

INSIDE_TOL = 1e-7  # γ ≤ 1 + tol counts as inside (HiGHS' primal feasibility tolerance)
MAX_K = 6  # qhull: 100k atoms take ~10 s at k = 6, ~5 min at k = 7 (measured), facets explode


@dataclass
class SpeciesHull:
    species: str
    k: int
    feature_mean: np.ndarray  # [F]
    feature_std: np.ndarray  # [F]
    components: np.ndarray  # [k, F]
    explained_variance_ratio: np.ndarray  # [k]
    centroid: np.ndarray  # [k]
    points: np.ndarray  # [n_extreme, k]
    n_train_atoms: int
    rank: int  # dimension of the affine hull of the projected training atoms (≤ k)
    method: str = "pca+lp"
    _solver: "GammaSolver | None" = field(default=None, repr=False, compare=False)

    def project(self, g: np.ndarray) -> np.ndarray:
        """Descriptors [n, F] in the hull's k coordinates. They are rounded to float32 first, as the index stores
        and fits them: a structure of the training set, computed again, lands on its own training point."""
        return ((as_stored(g) - self.feature_mean) / self.feature_std) @ self.components.T

    def solver(self) -> "GammaSolver":
        if self._solver is None:
            self._solver = GammaSolver(self.points, self.centroid)
        return self._solver

    def evaluate(self, g: np.ndarray, distance: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Descriptors [n, F] -> (projected [n, k], inside [n], γ [n], hull_distance [n]); without ``distance``,
        hull_distance is NaN outside (0 inside), for the caller to fill."""
        x = self.project(g)
        gamma = self.solver().gamma(x)
        inside = gamma <= 1.0 + INSIDE_TOL
        dist = np.zeros(len(x))
        out = ~inside
        if out.any():
            dist[out] = hull_distance(self.points, x[out]) if distance else np.nan
        return x, inside, gamma, dist


def as_stored(g: np.ndarray) -> np.ndarray:
    """Descriptors as the index stores them (float32), in float64 for the arithmetic: the hull is fitted on and
    judges these, so a training structure computed again lands exactly on its own training point."""
    return np.asarray(g, dtype=np.float32).astype(np.float64)


def fit_species_hull(species: str, g_train: np.ndarray, k: int) -> SpeciesHull:
    """Standardize, project (PCA, k components) and prune the training descriptors of one species."""
    if len(g_train) == 0:
        raise MlipopsError(f"no training atoms of species {species}: cannot build its hull", field="split")
    g_train = as_stored(g_train)
    k = int(min(k, g_train.shape[1]))
    mean = g_train.mean(axis=0)
    std = g_train.std(axis=0)
    std = np.where(std > 1e-12 * max(1.0, float(np.abs(mean).max(initial=0.0))), std, 1.0)
    z = (g_train - mean) / std
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    var = s**2
    total = var.sum()
    evr = var[:k] / total if total > 0 else np.zeros(k)
    comps = vt[:k]
    if comps.shape[0] < k:  # fewer training atoms than components: pad with unused directions
        comps = np.vstack([comps, np.zeros((k - comps.shape[0], comps.shape[1]))])
        evr = np.concatenate([evr, np.zeros(k - len(evr))])
    # a deterministic sign per component, so reruns give the same coordinates
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    p = z @ comps.T
    pts, rank = extreme_points(p)
    return SpeciesHull(species=species, k=k, feature_mean=mean, feature_std=std, components=comps,
                       explained_variance_ratio=evr, centroid=p.mean(axis=0), points=pts,
                       n_train_atoms=len(g_train), rank=rank)


_CHUNK_ROWS = 1 << 18  # rows of descriptors standardized/projected at a time at scale
_LARGE_CELLS = 1 << 23  # training descriptor cells (atoms x features) above which the fit runs in chunks


def _fit_species_hull_chunked(species: str, g: np.ndarray, idx: np.ndarray, k: int) -> SpeciesHull:
    """:func:`fit_species_hull` on the rows ``idx`` of ``g``, a chunk of rows at a time (no copy of the
    training descriptors, no n x F matrix but g): mean and standard deviation in two passes, the principal
    components from the SVD of the R factor of the standardized rows (a tall-skinny QR: the singular
    values and right singular vectors of z are those of R), the projection chunk by chunk."""
    from scipy.linalg import qr

    n, f = len(idx), g.shape[1]
    k = int(min(k, f))
    blocks = [idx[lo:lo + _CHUNK_ROWS] for lo in range(0, n, _CHUNK_ROWS)]
    mean = sum(as_stored(g[b]).sum(axis=0) for b in blocks) / n
    std = np.sqrt(sum(np.square(as_stored(g[b]) - mean).sum(axis=0) for b in blocks) / n)
    std = np.where(std > 1e-12 * max(1.0, float(np.abs(mean).max(initial=0.0))), std, 1.0)
    r = np.zeros((0, f))
    for b in blocks:
        r = qr(np.vstack([r, (as_stored(g[b]) - mean) / std]), mode="r")[0][:f]
    _, s, vt = np.linalg.svd(r, full_matrices=False)
    var = s**2
    total = var.sum()
    evr = var[:k] / total if total > 0 else np.zeros(k)
    comps = vt[:k]
    if comps.shape[0] < k:
        comps = np.vstack([comps, np.zeros((k - comps.shape[0], comps.shape[1]))])
        evr = np.concatenate([evr, np.zeros(k - len(evr))])
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    p = np.concatenate([((as_stored(g[b]) - mean) / std) @ comps.T for b in blocks])
    pts, rank = extreme_points(p)
    return SpeciesHull(species=species, k=k, feature_mean=mean, feature_std=std, components=comps,
                       explained_variance_ratio=evr, centroid=p.mean(axis=0), points=pts, n_train_atoms=n, rank=rank)


def _affine_frame(p: np.ndarray, rel_tol: float = 1e-9):
    """Mean, orthonormal basis [r, k] and rank r of the affine subspace spanned by the points."""
    mu = p.mean(axis=0)
    if len(p) < 2:
        return mu, np.zeros((0, p.shape[1])), 0
    _, s, vt = np.linalg.svd(p - mu, full_matrices=False)
    r = int((s > rel_tol * max(s[0], 1e-300)).sum()) if s[0] > 1e-12 else 0
    return mu, vt[:r], r


_QHULL_POINTS = 1 << 18  # points given to qhull at once: more are pruned a chunk at a time


def extreme_points(p: np.ndarray) -> tuple[np.ndarray, int]:
    """The extreme points of the point set (a superset within qhull's precision) and its affine rank.

    Millions of points (the training atoms of a large set) are pruned a chunk at a time: the extreme points
    of a union are those of (the extreme points found so far + the next chunk), so qhull never holds more
    than :data:`_QHULL_POINTS` points and their facets."""
    if len(p) > _QHULL_POINTS:
        kept = p[:0]
        for lo in range(0, len(p), _QHULL_POINTS):
            kept, rank = _extreme_points(np.vstack([kept, p[lo:lo + _QHULL_POINTS]]))
        return kept, rank
    return _extreme_points(p)


def _extreme_points(p: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy.spatial import ConvexHull, QhullError

    u = np.unique(p, axis=0)
    mu, basis, r = _affine_frame(u)
    if r == 0:
        return u[:1], 0
    y = (u - mu) @ basis.T
    if r == 1:
        return u[[int(y[:, 0].argmin()), int(y[:, 0].argmax())]], 1
    if len(u) <= r + 1:
        return u, r
    try:
        hull = ConvexHull(y, qhull_options="Qt Qx" if r >= 5 else "Qt")
    except QhullError:
        hull = ConvexHull(y, qhull_options="QJ")  # joggled: nearly-coplanar points may be dropped
    return u[np.sort(hull.vertices)], r


class GammaSolver:
    """γ(x) for many x against one hull: HiGHS LPs with a cache of certified optimal bases."""

    def __init__(self, points: np.ndarray, centroid: np.ndarray, seed_facets: bool = True):
        self.points = np.asarray(points, dtype=np.float64)
        self.c = np.asarray(centroid, dtype=np.float64)
        self.D = self.points - self.c  # [n, k]
        self.n, self.k = self.D.shape
        scale = float(np.abs(self.D).max(initial=0.0))
        self.tol = 1e-9 * max(1.0, scale)
        self.W = np.zeros((0, self.k))  # cached duals w_B (rows)
        self.Binv_t = np.zeros((0, self.k, self.k))  # (V_B − c)^-T per cached basis
        self._bases: set[tuple[int, ...]] = set()
        self._highs = None
        self.fan_W = None
        self.n_lp = 0
        if seed_facets:
            self._seed_from_facets()

    def _seed_from_facets(self, max_facets: int = 500000) -> None:
        """Precompute the hull's facets (qhull, triangulated) as LP bases with their adjacency.

        The cones from c over the facets partition space; the ray from c through x leaves the hull
        through the facet whose basis is primal feasible for x. :meth:`_walk` finds it by walking
        across facets (the basis change of a simplex pivot), so most x need no LP solve at all.
        """
        from scipy.spatial import ConvexHull, QhullError

        if self.n <= self.k or _affine_frame(self.points)[2] < self.k:
            return  # flat hull: its facets are not LP bases in k dimensions; HiGHS does it all
        try:
            hull = ConvexHull(self.points, qhull_options="Qt Qx" if self.k >= 5 else "Qt")
        except QhullError:
            return
        if len(hull.simplices) > max_facets:
            return
        db = self.D[hull.simplices]  # [m, k, k], rows v_B − c
        bad = ~(np.linalg.cond(db) < 1e10)  # slivers: not trusted, walkers hop over them
        db[bad] = np.eye(self.k)  # placeholders: a walker reaching a bad facet goes to HiGHS
        w = np.linalg.solve(db, np.ones((len(db), self.k, 1)))[..., 0]  # duals: (v_B − c)·w = 1
        bad |= (self.D @ w.T).max(axis=0) > 1.0 + 1e-7  # not dual feasible (round-off): not trusted
        self.fan_W = w
        self.fan_Binv_t = np.linalg.inv(np.transpose(db, (0, 2, 1)))
        self.fan_neighbors = hull.neighbors  # [m, k]: the facet opposite each vertex
        self.fan_bad = bad
        self._rng = np.random.default_rng(0)

    def _walk(self, xc: np.ndarray, max_steps: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """Facet whose basis certifies each row of xc, by a stochastic visibility walk over the fan.

        Start at the facet with the largest dual objective among a sample, then repeatedly cross
        the ridge opposite a vertex whose μ is negative (chosen at random among them, which cannot
        cycle forever; Devillers et al., 2002). Returns (γ [n] NaN where not certified, ok [n])."""
        m = len(self.fan_W)
        sample = np.unique(np.linspace(0, m - 1, min(m, 256)).astype(np.int64))
        facet = sample[(xc @ self.fan_W[sample].T).argmax(axis=1)]
        gamma = np.full(len(xc), np.nan)
        ok = np.zeros(len(xc), dtype=bool)
        active = np.arange(len(xc))
        for _ in range(max_steps):
            if not len(active):
                break
            f = facet[active]
            bad = self.fan_bad[f]
            if bad.any():  # a sliver (qhull's triangulation makes zero-volume ones): hop over it at random
                facet[active[bad]] = self.fan_neighbors[f[bad], self._rng.integers(0, self.k, int(bad.sum()))]
            walking, f = active[~bad], f[~bad]
            mu = np.einsum("qij,qj->qi", self.fan_Binv_t[f], xc[walking])
            neg = mu < -self.tol
            done = ~neg.any(axis=1)
            fin = walking[done]
            gamma[fin] = np.einsum("qj,qj->q", self.fan_W[f[done]], xc[fin])
            ok[fin] = True
            walking, f, neg = walking[~done], f[~done], neg[~done]
            pick = (self._rng.random(neg.shape) * neg).argmax(axis=1)
            facet[walking] = self.fan_neighbors[f, pick]
            active = np.concatenate([active[bad], walking])
        return gamma, ok

    # ---------------------------------------------------------------------------------- HiGHS
    def _model(self):
        if self._highs is None:
            import highspy
            import scipy.sparse as sp

            h = _quiet_highs(highspy)
            h.setOptionValue("presolve", "off")  # tiny dense LPs, re-solved warm from the last basis
            h.setOptionValue("solver", "simplex")
            lp = highspy.HighsLp()
            lp.num_col_, lp.num_row_ = self.n, self.k
            lp.col_cost_ = np.ones(self.n)
            lp.col_lower_ = np.zeros(self.n)
            lp.col_upper_ = np.full(self.n, highspy.kHighsInf)
            lp.row_lower_ = np.zeros(self.k)
            lp.row_upper_ = np.zeros(self.k)
            m = sp.csc_matrix(self.D.T)
            lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
            lp.a_matrix_.start_ = m.indptr
            lp.a_matrix_.index_ = m.indices
            lp.a_matrix_.value_ = m.data
            h.passModel(lp)
            self._highs = h
            self._rows = np.arange(self.k, dtype=np.int32)
        return self._highs

    def solve_lp(self, x: np.ndarray) -> float:
        """One LP solve for γ(x) by HiGHS; caches the optimal basis when it is a proper facet."""
        import highspy

        h = self._model()
        b = np.asarray(x, dtype=np.float64) - self.c
        h.changeRowsBounds(self.k, self._rows, b, b)
        h.run()
        self.n_lp += 1
        status = h.getModelStatus()
        if status == highspy.HighsModelStatus.kInfeasible:
            return float("inf")  # off the affine hull of a flat training cloud
        if status != highspy.HighsModelStatus.kOptimal:
            h.clearSolver()  # a failed warm start: retry cold once
            h.run()
            status = h.getModelStatus()
            if status == highspy.HighsModelStatus.kInfeasible:
                return float("inf")
            if status != highspy.HighsModelStatus.kOptimal:
                raise MlipopsError(f"hull LP did not solve: HiGHS status {h.modelStatusToString(status)}")
        gamma = float(h.getInfo().objective_function_value)
        basis = h.getBasis()
        cols = [i for i, s in enumerate(basis.col_status) if s == highspy.HighsBasisStatus.kBasic]
        if len(cols) == self.k:
            self._add_basis(tuple(cols))
        return max(gamma, 0.0)

    def _add_basis(self, cols: tuple[int, ...]) -> None:
        cols = tuple(sorted(cols))
        if cols in self._bases:
            return
        db = self.D[list(cols)]  # [k, k], rows v_B − c
        if np.linalg.cond(db) > 1e10:
            return
        w = np.linalg.solve(db, np.ones(self.k))  # dual: (v_B − c)·w = 1
        if (self.D @ w).max() > 1.0 + 1e-9:  # not dual feasible: not a facet of the hull
            return
        self._bases.add(cols)
        self.W = np.vstack([self.W, w])
        self.Binv_t = np.concatenate([self.Binv_t, np.linalg.inv(db.T)[None]])

    # ------------------------------------------------------------------------------- batches
    def _certify(self, xc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """γ for the rows of xc (x − c) that a known basis certifies; NaN elsewhere."""
        gamma = np.full(len(xc), np.nan)
        ok = np.zeros(len(xc), dtype=bool)
        zero = ~(np.abs(xc).max(axis=1) > 0)  # x = c
        gamma[zero], ok[zero] = 0.0, True
        if self.fan_W is not None and (~ok).any():
            rest = np.flatnonzero(~ok)
            g, o = self._walk(xc[rest])
            gamma[rest[o]], ok[rest[o]] = g[o], True
        if len(self.W) and (~ok).any():  # bases found by earlier LP solves
            rest = np.flatnonzero(~ok)
            score = xc[rest] @ self.W.T  # dual objectives: lower bounds of γ
            best = score.argmax(axis=1)
            mu = np.einsum("qij,qj->qi", self.Binv_t[best], xc[rest])
            o = mu.min(axis=1) >= -self.tol
            gamma[rest[o]], ok[rest[o]] = score[np.arange(len(rest)), best][o], True
        return gamma, ok

    def gamma(self, x: np.ndarray, batch: int = 4096) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        out = np.empty(len(x))
        if self.n == 1:  # a single training point: only that point is inside
            d = np.linalg.norm(x - self.c, axis=1)
            return np.where(d <= self.tol, 0.0, np.inf)
        for s in range(0, len(x), batch):
            xb = x[s:s + batch]
            xc = xb - self.c
            g, ok = self._certify(xc)
            for q in np.flatnonzero(~ok):  # their optimal bases join the cache for the next batches
                g[q] = self.solve_lp(xb[q])
            out[s:s + batch] = g
        return np.maximum(out, 0.0)


def _quiet_highs(highspy):
    """A Highs instance; its constructor prints a banner on the C-level stdout, which would corrupt
    CSV/JSON output of the CLI, so fd 1 is pointed at /dev/null meanwhile."""
    import os
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            h = highspy.Highs()
            h.setOptionValue("output_flag", False)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    return h


def check_cells(frames, file: str) -> None:
    """One-line error naming the file and frame of the first structure whose periodic cell is singular
    (zero volume with periodic boundaries): no descriptor, hence no γ, exists for it."""
    from mlipops.descriptors import SINGULAR_CELL, singular_cell
    from mlipops.errors import FrameFormatError

    for k, a in enumerate(frames):
        if singular_cell(a.cell.array, a.pbc):
            pbc = " ".join("T" if x else "F" for x in a.pbc)
            raise FrameFormatError(f"{SINGULAR_CELL} (pbc {pbc}): periodic cell vectors zero or linearly dependent",
                                   file=file, frame=int(a.info.get("source_index", k)), field="cell")


_CANDIDATES = 32  # nearest extreme points each distance starts from; more join only where optimality fails
_PARALLEL_MIN_ROWS = 20_000  # distances from which worker processes share them (below: start-up costs more)
_PIECES_PER_WORKER = 4  # pieces of the rows per worker (the rows differ in cost: a late piece evens the load)


def hull_distance(points: np.ndarray, x: np.ndarray, workers: int | None = None) -> np.ndarray:
    """Euclidean distance from each row of x to conv(points), by NNLS with Σλ = 1 as a stiff row.

    Each problem is solved on a small working set of points (the nearest :data:`_CANDIDATES`), which grows by
    the points that violate optimality: y, the nearest point of the working set's hull, is the nearest point of
    the whole hull exactly when no point p lies beyond the plane through y normal to x − y, (p − y)·(x − y) ≤ 0
    for all p. The answer is the full problem's; the work is that of a few dozen points, not thousands.

    The rows are independent problems: from :data:`_PARALLEL_MIN_ROWS` rows they are shared by worker processes
    (``workers``; None: :func:`mlipops.frames.read_workers`), with the same numbers, bit for bit."""
    points = np.asarray(points, dtype=np.float64)
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    # the scale of the problem (the Σλ = 1 row's weight, the tolerance): of all rows, however they are shared
    scale = 1.0 + float(np.abs(points).max(initial=0.0)) + float(np.abs(x).max(initial=0.0))
    if workers is None:
        from mlipops.frames import read_workers

        workers = read_workers(1 << 62) if len(x) >= _PARALLEL_MIN_ROWS else 1
    if workers <= 1 or len(x) < 2 * workers:
        return _hull_distance(points, x, scale)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    bounds = np.linspace(0, len(x), workers * _PIECES_PER_WORKER + 1).astype(int)
    # spawned workers import numpy and scipy only (no torch: ~2 s and ~100 MiB each), for small serial solves
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        parts = [ex.submit(_hull_distance, points, x[lo:hi], scale) for lo, hi in zip(bounds[:-1], bounds[1:])]
        return np.concatenate([f.result() for f in parts])


def _hull_distance(points: np.ndarray, x: np.ndarray, scale: float) -> np.ndarray:
    """:func:`hull_distance` of the rows x in this process."""
    from scipy.optimize import nnls
    from scipy.spatial import cKDTree

    out = np.empty(len(x))
    if not len(x):
        return out
    weight = 1e4 * scale
    a = np.vstack([points.T, np.full(len(points), weight)])
    m = min(len(points), _CANDIDATES)
    _, near = cKDTree(points).query(x, k=m)
    near = np.sort(np.asarray(near).reshape(len(x), m), axis=1)  # the k nearest are distinct points
    in_work = np.zeros(len(points), dtype=bool)  # membership of the working set (cleared after each row)
    for q, xq in enumerate(x):
        b = np.concatenate([xq, [weight]])
        work = near[q]
        in_work[work] = True
        while True:
            lam, _ = nnls(a[:, work], b, maxiter=50 * len(work))
            lam = lam / lam.sum() if lam.sum() > 0 else np.full(len(work), 1.0 / len(work))
            y = lam @ points[work]
            d = xq - y
            dist = float(np.linalg.norm(d))
            if len(work) == len(points):
                break
            beyond = (points - y) @ d  # > 0: p lies on x's side of the plane through y
            tol = 1e-9 * scale * max(dist, 1e-300)
            bad = np.flatnonzero(beyond > tol)
            bad = bad[~in_work[bad]]
            if not len(bad):
                break
            add = bad[np.argsort(-beyond[bad])[:4 * m]]
            in_work[add] = True
            work = np.sort(np.concatenate([work, add]))  # as a sorted union: the same columns in the same order
        in_work[work] = False
        out[q] = dist
    return out


@dataclass
class HullIndex:
    """The hulls of all training species, with the descriptor settings they were built with."""

    species: list[str]  # descriptor species channels, in order
    descriptor: dict
    hulls: dict[str, SpeciesHull]

    def evaluate(self, symbols: np.ndarray, g: np.ndarray, unseen: np.ndarray) -> dict[str, np.ndarray]:
        """Per atom: projection [n, k] (NaN rows where no hull applies), inside_hull,
        extrapolation_grade (inf where no hull applies), hull_distance (NaN there)."""
        n = len(symbols)
        k = max((h.k for h in self.hulls.values()), default=0)
        inside = np.zeros(n, dtype=bool)
        gamma = np.full(n, np.inf)
        dist = np.full(n, np.nan)
        proj = np.full((n, k), np.nan)
        symbols = np.asarray(symbols)
        unseen = np.asarray(unseen, dtype=bool)
        for s, h in self.hulls.items():
            rows = np.flatnonzero((symbols == s) & ~unseen)
            for lo in range(0, len(rows), _CHUNK_ROWS):  # bounded temporaries on millions of atoms
                b = rows[lo:lo + _CHUNK_ROWS]
                proj[b], inside[b], gamma[b], dist[b] = h.evaluate(g[b], distance=False)
            out = rows[~inside[rows]]  # the distances of all its atoms outside at once (in worker processes)
            dist[out] = hull_distance(h.points, proj[out, :h.k])
        return {"projection": proj, "inside_hull": inside, "extrapolation_grade": gamma, "hull_distance": dist}


def fit_hull_index(symbols: np.ndarray, g: np.ndarray, is_train: np.ndarray, species: list[str],
                   descriptor: dict, k: int) -> HullIndex:
    if k < 1 or k > MAX_K:
        raise MlipopsError(f"pca_components must be within 1..{MAX_K}, got {k}", field="index.pca_components")
    symbols = np.asarray(symbols)
    if not is_train.any():
        raise MlipopsError("the training split is empty: no hull can be built (check ingest.split)",
                           field="split")
    hulls = {}
    for s in species:
        m = is_train & (symbols == s)
        if m.any():
            rows = np.flatnonzero(m)
            hulls[s] = (fit_species_hull(s, g[rows], k) if len(rows) * g.shape[1] <= _LARGE_CELLS
                        else _fit_species_hull_chunked(s, g, rows, k))
    return HullIndex(species=list(species), descriptor=dict(descriptor), hulls=hulls)
