"""The descriptor-space hull: LP membership and γ against independent checks, pruning, degenerate
clouds, distances, PCA bookkeeping; descriptor invariances and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial import ConvexHull, Delaunay

from mlipops.errors import MlipopsError
from mlipops.index.hull import GammaSolver, extreme_points, fit_hull_index, fit_species_hull, hull_distance


def _cloud(rng, n, k):
    return rng.standard_normal((n, k)) * np.linspace(1.0, 0.4, k)


@pytest.mark.parametrize("k", [2, 3])
def test_membership_matches_delaunay(u_rng, k):
    pts = _cloud(u_rng, 400, k)
    ext, rank = extreme_points(pts)
    assert rank == k
    assert set(map(tuple, ext)) == set(map(tuple, pts[ConvexHull(pts).vertices]))
    queries = np.vstack([_cloud(u_rng, 3000, k) * 1.3, pts])
    truth = Delaunay(pts).find_simplex(queries) >= 0
    for seed_facets in (True, False):  # cached facet bases and pure HiGHS solves must agree
        gamma = GammaSolver(ext, pts.mean(axis=0), seed_facets=seed_facets).gamma(queries)
        assert ((gamma <= 1 + 1e-7) == truth).all()


def test_gamma_equals_scale_along_boundary_rays(u_rng):
    pts = _cloud(u_rng, 300, 4)
    ext, _ = extreme_points(pts)
    c = pts.mean(axis=0)
    solver = GammaSolver(ext, c)
    scales = np.array([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 7.0])
    for v in ext[:10]:  # every extreme point lies on the boundary: c + s (v - c) has γ = s
        np.testing.assert_allclose(solver.gamma(c + scales[:, None] * (v - c)), scales, atol=1e-9)
    np.testing.assert_allclose(solver.gamma(ext), 1.0, atol=1e-9)  # vertices: inside, on the boundary


def test_cached_bases_give_the_lp_optimum(u_rng):
    pts = _cloud(u_rng, 2000, 5)
    ext, _ = extreme_points(pts)
    c = pts.mean(axis=0)
    q = _cloud(u_rng, 400, 5) * 1.5
    cached = GammaSolver(ext, c)
    g_cached = cached.gamma(q)
    pure = GammaSolver(ext, c, seed_facets=False)
    g_lp = np.array([pure.solve_lp(x) for x in q])
    assert pure.n_lp == len(q)
    np.testing.assert_allclose(g_cached, g_lp, rtol=1e-9, atol=1e-9)
    # the explicit membership LP x = Σλv, λ ≥ 0, Σλ = 1 (scipy's HiGHS) agrees with γ ≤ 1
    from scipy.optimize import linprog

    for x, g in zip(q[:60], g_lp[:60]):
        a_eq = np.vstack([ext.T, np.ones(len(ext))])
        res = linprog(np.zeros(len(ext)), A_eq=a_eq, b_eq=np.append(x, 1.0), bounds=(0, None), method="highs")
        assert (res.status == 0) == (g <= 1 + 1e-7)


def test_pruning_keeps_the_hull(u_rng):
    pts = _cloud(u_rng, 5000, 3)
    ext, _ = extreme_points(pts)
    assert len(ext) < 0.1 * len(pts)
    q = _cloud(u_rng, 2000, 3) * 1.2
    full = Delaunay(pts).find_simplex(q) >= 0
    pruned = Delaunay(ext).find_simplex(q) >= 0
    assert (full == pruned).all()


def test_degenerate_clouds():
    # a square in the z = 0 plane of 3-D: inside in-plane, γ = ∞ off the plane
    sq = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0.5, 0.5, 0.0]], float)
    ext, rank = extreme_points(sq)
    assert rank == 2 and len(ext) == 4
    s = GammaSolver(ext, sq.mean(axis=0))
    g = s.gamma(np.array([[0.5, 0.5, 0.0], [0.9, 0.1, 0.0], [2.0, 0.5, 0.0], [0.5, 0.5, 0.1]]))
    assert g[0] < 1e-6 and g[1] <= 1 and 1 < g[2] < np.inf and np.isinf(g[3])
    # collinear points: the two ends
    line = np.outer(np.linspace(-1, 2, 7), [1.0, 2.0, -1.0])
    ext, rank = extreme_points(line)
    assert rank == 1 and {tuple(e) for e in ext} == {tuple(line[0]), tuple(line[-1])}
    # identical points: one point, only itself is inside
    same = np.ones((10, 3))
    ext, rank = extreme_points(same)
    assert rank == 0 and len(ext) == 1
    g = GammaSolver(ext, same.mean(axis=0)).gamma(np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.1]]))
    assert g[0] == 0.0 and np.isinf(g[1])


def test_hull_distance_against_polygon_geometry(u_rng):
    square = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], float)
    d = hull_distance(square, np.array([[2.0, 0.5], [0.5, -3.0], [2.0, 2.0], [0.5, 0.5]]))
    np.testing.assert_allclose(d, [1.0, 3.0, np.sqrt(2.0), 0.0], atol=1e-7)
    pts = _cloud(u_rng, 60, 2)
    hull = ConvexHull(pts)
    q = _cloud(u_rng, 50, 2) * 3
    q = q[Delaunay(pts).find_simplex(q) < 0]

    def seg_dist(p, a, b):
        t = np.clip(np.dot(p - a, b - a) / np.dot(b - a, b - a), 0, 1)
        return np.linalg.norm(p - (a + t * (b - a)))

    brute = [min(seg_dist(p, pts[i], pts[j]) for i, j in hull.simplices) for p in q]
    np.testing.assert_allclose(hull_distance(pts[hull.vertices], q), brute, atol=1e-6)


def test_species_hull_pca_bookkeeping(u_rng):
    g = u_rng.standard_normal((500, 6)) @ u_rng.standard_normal((6, 10))  # rank-6 features in 10-D
    g[:, 3] = 7.0  # a constant feature
    h = fit_species_hull("Cu", g, 4)
    assert h.k == 4 and h.components.shape == (4, 10)
    assert 0 < h.explained_variance_ratio.sum() <= 1 + 1e-12
    assert (np.diff(h.explained_variance_ratio) <= 1e-12).all()
    np.testing.assert_allclose(h.components @ h.components.T, np.eye(4), atol=1e-10)
    x, inside, gamma, dist = h.evaluate(g)
    assert inside.all() and (gamma <= 1 + 1e-7).all() and (dist == 0).all()
    np.testing.assert_allclose(h.centroid, x.mean(axis=0), atol=1e-10)
    far = g[:3] + 100 * (g[:3] - g.mean(axis=0))
    _, inside, gamma, dist = h.evaluate(far)
    assert not inside.any() and (gamma > 1).all() and (dist > 0).all()
    # k cannot exceed the number of features (3 of them here: the extreme points of 500 points in 10-D take a minute)
    assert fit_species_hull("Cu", g[:, :3], 50).k == 3


def test_fit_hull_index_errors(u_rng):
    g = u_rng.standard_normal((20, 5))
    sym = np.array(["Cu"] * 20)
    with pytest.raises(MlipopsError, match="training split is empty"):
        fit_hull_index(sym, g, np.zeros(20, bool), ["Cu"], {}, 3)
    with pytest.raises(MlipopsError, match="pca_components"):
        fit_hull_index(sym, g, np.ones(20, bool), ["Cu"], {}, 7)


def test_unseen_species_are_fully_extrapolating(u_rng):
    g = u_rng.standard_normal((50, 5))
    sym = np.array(["Cu"] * 40 + ["Ni"] * 10)
    unseen = np.zeros(50, bool)
    unseen[-12:] = True  # the Ni atoms and two Cu atoms with a Ni neighbour
    h = fit_hull_index(sym, g, np.arange(50) < 30, ["Cu"], {}, 3)
    ev = h.evaluate(sym, g, unseen)
    assert not ev["inside_hull"][-12:].any() and np.isinf(ev["extrapolation_grade"][-12:]).all()
    assert np.isnan(ev["projection"][-12:]).all() and np.isnan(ev["hull_distance"][-12:]).all()
    assert ev["inside_hull"][:30].all()


# ------------------------------------------------------------------------------------ descriptors
def _cluster(rng, n=7):
    from ase import Atoms

    pos = rng.uniform(0, 4.0, (n, 3))
    return Atoms(["Cu", "Ni"] * (n // 2) + ["Cu"] * (n % 2), positions=pos)


def test_descriptor_gradients_by_finite_differences(u_rng):
    from mlipops.descriptors import AtomCentredDescriptor, frame_edges

    a = _cluster(u_rng)
    desc = AtomCentredDescriptor(2, cutoff=5.0, n_radial=4, r_min=0.8, angular_cutoff=4.0, n_angular=2,
                                 max_l=2).to(torch.float64)
    sp, i, j, vec, _ = frame_edges(a.numbers, a.positions, a.cell.array, a.pbc, 5.0, {29: 0, 28: 1})
    v = torch.tensor(vec, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: desc(torch.tensor(sp), torch.tensor(i), torch.tensor(j), x), (v,), eps=1e-6, atol=1e-6)


def test_compute_descriptors_invariances_and_unseen(u_rng):
    from mlipops.descriptors import compute_descriptors
    from mlipops.params import DescriptorParams
    from scipy.spatial.transform import Rotation

    settings = DescriptorParams().model_dump()
    a = _cluster(u_rng, 9)
    g0, unseen = compute_descriptors([a], ["Cu", "Ni"], settings)
    assert g0.shape[0] == 9 and not unseen.any()
    b = a.copy()
    b.positions = Rotation.random(random_state=1).apply(a.positions) + [3.0, -1.0, 2.0]
    perm = u_rng.permutation(9)
    c = a[perm]
    g1, _ = compute_descriptors([b, c], ["Cu", "Ni"], settings, chunk_atoms=5)  # two chunks
    np.testing.assert_allclose(g1[:9], g0, atol=1e-10)
    np.testing.assert_allclose(g1[9:], g0[perm], atol=1e-10)
    # a Cu-only hull: a Ni atom, and the Cu atom within the cutoff of it, cannot be represented
    from ase import Atoms

    far = a[a.symbols == "Cu"] + Atoms("NiCu", positions=[[30.0, 30.0, 30.0], [32.2, 30.0, 30.0]])
    _, unseen = compute_descriptors([far], ["Cu"], settings)
    assert unseen.tolist() == [False] * (len(far) - 2) + [True, True]


@pytest.mark.parametrize("k,n_start", [(5, 32), (5, 2), (3, 1)])
def test_hull_distance_working_set_gives_the_full_answer(u_rng, monkeypatch, k, n_start):
    """The working-set solve (nearest points first, grown by the points that violate optimality) gives the
    distance of the NNLS over every extreme point, also when it has to start from one or two points."""
    import mlipops.index.hull as hull_mod

    pts, _ = extreme_points(u_rng.normal(size=(4000, k)))
    q = u_rng.normal(size=(300, k)) * 2.0
    monkeypatch.setattr(hull_mod, "_CANDIDATES", 10**9)  # every point from the start: the plain NNLS
    full = hull_distance(pts, q)
    monkeypatch.setattr(hull_mod, "_CANDIDATES", n_start)
    fast = hull_distance(pts, q)
    outside = full > 1e-6
    assert outside.sum() > 50 and len(pts) > 5 * max(n_start, 3)
    np.testing.assert_allclose(fast[outside], full[outside], rtol=1e-9, atol=1e-9)
    assert np.all(fast[~outside] < 1e-6)


def test_hull_distance_in_worker_processes_is_bit_identical(u_rng):
    """The rows shared by worker processes (as the index does from ``_PARALLEL_MIN_ROWS`` outside atoms) give the
    same distances, bit for bit, as one process: the problem's scale is that of all rows, not of a worker's piece."""
    pts, _ = extreme_points(u_rng.normal(size=(2000, 4)))
    q = u_rng.normal(size=(400, 4)) * np.linspace(1.0, 4.0, 400)[:, None]  # the pieces' largest |x| differ
    one = hull_distance(pts, q, workers=1)
    two = hull_distance(pts, q, workers=2)
    assert (one > 1e-6).sum() > 100
    assert np.array_equal(one, two)
