"""Differentiable atom-centred descriptors (radial + angular) in torch, neighbour lists by vesin.

For atom i with neighbours j (species s_j) within the cutoff, r_ij = |r_j - r_i| (minimum-image
free: periodic images come from vesin's shifts, so any cell and any cutoff work):

- radial, per neighbour species s and basis function n (Behler G2 with Gaussian centres)::

      G^rad_{i,s,n} = Σ_{j∈s} exp(-(r_ij - μ_n)² / 2σ²) f_c(r_ij)

- angular, per unordered species pair (s, s'), basis n and order l = 0..L (three-body, computed in
  O(edges) via Cartesian moment tensors M_{i,s,n,l} = Σ_{j∈s} R_n(r_ij) r̂_ij^{⊗l})::

      G^ang_{i,ss',n,l} = <M_{i,s,n,l}, M_{i,s',n,l}> = Σ_{j∈s} Σ_{k∈s'} R_n(r_ij) R_n(r_ik) cos^l θ_jik

  which expands the angular distribution of the neighbours in powers of cos θ (j = k terms
  included, as in density-expansion descriptors such as SOAP/ACE).

f_c is the cosine cutoff 0.5 (cos(π r / r_c) + 1), smooth with zero slope at r_c, so energies and
forces are continuous when atoms cross the cutoff.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


from mlipops.neighbors import SINGULAR_CELL, neighbor_list, singular_cell  # noqa: F401  (re-exported)


class CosineCutoff(nn.Module):
    """f_c(r) = 0.5 (cos(π r / r_c) + 1) for r < r_c, else 0."""

    def __init__(self, cutoff: float):
        super().__init__()
        self.register_buffer("cutoff", torch.tensor(float(cutoff)))

    def forward(self, r: torch.Tensor) -> torch.Tensor:  # [n_edges] -> [n_edges]
        fc = 0.5 * (torch.cos(math.pi * r / self.cutoff) + 1.0)
        return fc * (r < self.cutoff).to(r.dtype)


class GaussianRadialBasis(nn.Module):
    """R_n(r) = exp(-(r - μ_n)² / 2σ²) f_c(r), μ_n evenly spaced on [r_min, r_c], σ = spacing."""

    def __init__(self, n: int, r_min: float, cutoff: float):
        super().__init__()
        mu = torch.linspace(r_min, cutoff, n + 1)[:-1] if n > 1 else torch.tensor([r_min])
        sigma = (cutoff - r_min) / max(n, 1)
        self.register_buffer("mu", mu)  # [n]
        self.register_buffer("inv_two_sigma2", torch.tensor(1.0 / (2.0 * sigma**2)))
        self.envelope = CosineCutoff(cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:  # [n_edges] -> [n_edges, n]
        g = torch.exp(-((r[:, None] - self.mu) ** 2) * self.inv_two_sigma2)
        return g * self.envelope(r)[:, None]


class AtomCentredDescriptor(nn.Module):
    """Radial + angular invariants per atom; see the module docstring for the equations."""

    def __init__(self, n_species: int, cutoff: float = 5.0, n_radial: int = 8, r_min: float = 0.8,
                 angular_cutoff: float = 4.0, n_angular: int = 4, max_l: int = 3):
        super().__init__()
        self.n_species = n_species
        self.cutoff = float(cutoff)
        self.angular_cutoff = float(angular_cutoff)
        self.n_radial, self.n_angular, self.max_l = n_radial, n_angular, max_l
        self.radial = GaussianRadialBasis(n_radial, r_min, cutoff)
        self.angular = GaussianRadialBasis(n_angular, r_min, angular_cutoff) if n_angular else None
        pairs = [(a, b) for a in range(n_species) for b in range(a, n_species)]
        self.register_buffer("pair_a", torch.tensor([p[0] for p in pairs], dtype=torch.long))
        self.register_buffer("pair_b", torch.tensor([p[1] for p in pairs], dtype=torch.long))
        # r̂^{⊗l} is symmetric: keep one component per multi-index (x^a y^b z^c, a+b+c = l) weighted by
        # √(multinomial multiplicity), so <M, M'> over the unique components equals the full 3^l sum
        # (1+3+6+10 instead of 1+3+9+27 components up to l = 3). Not persistent: saved models stay valid.
        expo, weight, group = [], [], []
        for l in range(max_l + 1):
            for a in range(l, -1, -1):
                for b in range(l - a, -1, -1):
                    c = l - a - b
                    expo.append((a, b, c))
                    weight.append(math.sqrt(math.factorial(l) / (math.factorial(a) * math.factorial(b)
                                                                  * math.factorial(c))))
                    group.append(l)
        self.register_buffer("mono_expo", torch.tensor(expo, dtype=torch.long), persistent=False)
        # each monomial of order l >= 1 is a monomial of order l - 1 (its parent) times one component of û
        index = {e: k for k, e in enumerate(expo)}
        self._mono_parent, self._mono_axis = [0], [0]
        for e in expo[1:]:
            d = next(q for q in range(3) if e[q] > 0)
            self._mono_parent.append(index[e[:d] + (e[d] - 1,) + e[d + 1:]])
            self._mono_axis.append(d)
        self._mono_weight = weight  # python floats: a float32 buffer would round √3 etc. for float64 models
        onehot = torch.zeros(len(group), max_l + 1)
        onehot[torch.arange(len(group)), torch.tensor(group)] = 1.0
        self.register_buffer("mono_group", onehot, persistent=False)  # [n_mono, L+1]: sums by order l

    def monomials(self, u: torch.Tensor) -> torch.Tensor:
        """Unweighted monomials x^a y^b z^c of the unit vectors u [E, 3], in ``mono_expo`` order: [E, n_mono]; each
        one its parent's column times one component (no powers, no gathers: differentiable, and 4x faster)."""
        cols = [torch.ones_like(u[:, 0])]
        comp = [u[:, 0], u[:, 1], u[:, 2]]
        for parent, axis in zip(self._mono_parent[1:], self._mono_axis[1:]):
            cols.append(cols[parent] * comp[axis])
        return torch.stack(cols, dim=1)

    def moment_terms(self, radial: torch.Tensor, unweighted: torch.Tensor) -> torch.Tensor:
        """Each edge's contribution m_{e,n,k} = R_n(r_e) μ_k(û_e) [E, n_angular, n_mono] to the moments M_{i,s,n,k}:
        ``radial`` the angular basis R_n(r_e) [E, n_angular], ``unweighted`` the monomials of û_e
        (:meth:`monomials`), μ_k = √(multiplicity) x^a y^b z^c."""
        weight = torch.tensor(self._mono_weight, dtype=unweighted.dtype, device=unweighted.device)
        return radial[:, :, None] * (unweighted * weight)[:, None, :]

    def angular_features(self, M: torch.Tensor) -> torch.Tensor:
        """The angular invariants of the moments M [n_atoms, S, n_angular, n_mono], G_{i,ab,n,l} = Σ_{k of order l}
        M_{i,a,n,k} M_{i,b,n,k}, as [n_atoms, (L+1) · pairs · n_angular], l-major (as the features are documented)."""
        inv = (M[:, self.pair_a] * M[:, self.pair_b]) @ self.mono_group.to(M.dtype)  # [n, pairs, n_ang, L+1]
        return inv.permute(0, 3, 1, 2).reshape(M.shape[0], -1)

    @property
    def n_features(self) -> int:
        n_pairs = self.n_species * (self.n_species + 1) // 2
        return self.n_species * self.n_radial + n_pairs * self.n_angular * (self.max_l + 1)

    def forward(self, species: torch.Tensor, edge_i: torch.Tensor, edge_j: torch.Tensor,
                vec: torch.Tensor) -> torch.Tensor:
        """species [n_atoms] (index), edges [n_edges], vec [n_edges, 3] -> G [n_atoms, n_features]."""
        n_atoms, S = species.shape[0], self.n_species
        r = torch.linalg.norm(vec, dim=1)  # [n_edges]
        sj = species[edge_j]
        slot = edge_i * S + sj  # [n_edges] (atom, neighbour species)
        # sums per (atom, species) slot: index_add_ where a gradient flows (training), else a sparse product with
        # the slots' incidence matrix (the same sums to rounding, several times faster on the CPU)
        plain = not (torch.is_grad_enabled() and (vec.requires_grad or any(q.requires_grad for q in self.parameters())))

        def per_slot(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            if plain:
                flat = _incidence(rows, n_atoms * S, 1.0, values.dtype) @ values.flatten(1)  # (no edges: [0, k])
                return flat.view(n_atoms * S, *values.shape[1:])
            return values.new_zeros(n_atoms * S, *values.shape[1:]).index_add_(0, rows, values)

        rad = self.radial(r)  # [n_edges, n_radial]
        g_rad = per_slot(slot, rad)
        feats = [g_rad.view(n_atoms, S * self.n_radial)]
        if self.angular is not None:
            keep = r < self.angular_cutoff
            ra = self.angular(r[keep])  # [n_ang_edges, n_angular]
            u = vec[keep] / r[keep, None]  # [n_ang_edges, 3]
            # monomials by repeated products (pow(0, 0) would have a NaN gradient)
            m = self.moment_terms(ra, self.monomials(u))  # [n_ang_edges, n_angular, n_mono]
            M = per_slot(slot[keep], m).view(n_atoms, S, *m.shape[1:])
            feats.append(self.angular_features(M))
        return torch.cat(feats, dim=1)


def _edge_jacobian(fn, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values [n_edges, ...] of a row-wise function of the edge vectors and their derivatives
    [n_edges, ..., 3] with respect to each row's own vector (three forward-mode products: exact,
    since row e depends on vec_e only)."""
    from torch.func import jvp

    out, ders = None, []
    for c in range(3):
        t = torch.zeros_like(vec)
        t[:, c] = 1.0
        out, d = jvp(fn, (vec,), (t,))
        ders.append(d)
    return out, torch.stack(ders, dim=-1)


def descriptor_with_jacobian(desc: "AtomCentredDescriptor", species: torch.Tensor, edge_i: torch.Tensor,
                             edge_j: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G [n_atoms, n_features] and J [n_edges, n_features, 3] = ∂G_{edge_i[e]} / ∂vec_e, analytically.

    G_i depends on the vectors of i's own edges only, so J holds the whole derivative of the
    descriptors: forces and stress of any energy E(G) follow as -∂E/∂R = Σ_e (∂E/∂G_i · J_e) (±1 on
    the edge's two atoms) and ε-derivative Σ_e vec_e ⊗ (∂E/∂G_i · J_e). Training on fixed frames
    computes J once instead of differentiating the descriptor twice in every step.

    Radial: ∂G_{i,s_j,n}/∂vec_e = ∂R_n(r_e)/∂vec_e. Angular, with m_e = R_n(r_e) r̂_e^{⊗l} (the moment
    contributions, per unique monomial k): ∂G_{i,ab,n,l}/∂vec_e = Σ_{k∈l} (δ_{s_j a} M_{i,b,n,k} +
    δ_{s_j b} M_{i,a,n,k}) ∂m_{e,n,k}/∂vec_e.
    """
    vec = vec.detach()
    n_atoms, S, E = species.shape[0], desc.n_species, vec.shape[0]
    sj = species[edge_j]
    slot = edge_i * S + sj
    rad, drad = _edge_jacobian(lambda v: desc.radial(torch.linalg.norm(v, dim=1)), vec)  # [E, nr], [E, nr, 3]
    g_rad = vec.new_zeros(n_atoms * S, desc.n_radial).index_add_(0, slot, rad)
    J = vec.new_zeros(E, desc.n_features, 3)
    cols = sj[:, None] * desc.n_radial + torch.arange(desc.n_radial, device=vec.device)  # [E, nr]
    J.scatter_(1, cols[:, :, None].expand(-1, -1, 3), drad)
    feats = [g_rad.view(n_atoms, S * desc.n_radial)]
    if desc.angular is not None:
        keep = torch.linalg.norm(vec, dim=1) < desc.angular_cutoff

        def moment(v):  # [E_ang, n_angular, n_mono]
            r = torch.linalg.norm(v, dim=1)
            return desc.moment_terms(desc.angular(r), desc.monomials(v / r[:, None]))

        m, dm = _edge_jacobian(moment, vec[keep])  # [Ea, na, k], [Ea, na, k, 3]
        M = vec.new_zeros(n_atoms * S, *m.shape[1:]).index_add_(0, slot[keep], m).view(n_atoms, S, *m.shape[1:])
        group = desc.mono_group.to(vec.dtype)  # [k, L+1]
        a, b = desc.pair_a, desc.pair_b
        inv = torch.einsum("ipnk,kl->iplnk", M[:, a] * M[:, b], group).sum(-1)  # [n, P, L+1, na]
        feats.append(inv.permute(0, 2, 1, 3).reshape(n_atoms, -1))  # l-major, as in forward()
        ik, sk = edge_i[keep], sj[keep]
        Mi = M[ik]  # [Ea, S, na, k]
        A = ((sk[:, None] == a)[:, :, None, None] * Mi[:, b]
             + (sk[:, None] == b)[:, :, None, None] * Mi[:, a])  # [Ea, P, na, k]
        T = A[..., None] * dm[:, None]  # [Ea, P, na, k, 3]
        ja = (T.transpose(3, 4) @ group).permute(0, 4, 1, 2, 3)  # Σ_k over each order l: [Ea, L+1, P, na, 3]
        J[keep, S * desc.n_radial:] = ja.reshape(ja.shape[0], -1, 3)
    return torch.cat(feats, dim=1), J


def _incidence(rows: torch.Tensor, n_rows: int, weight: float, dtype: torch.dtype) -> torch.Tensor:
    """Sparse [n_rows, len(rows)] matrix with ``weight`` at (rows[e], e): its product with per-edge values
    sums them per row (a scatter-add, several times faster on the CPU than ``index_add_``)."""
    if rows.device.type == "cpu" and n_rows <= np.iinfo(np.int16).max:
        # numpy's stable argsort of 16-bit keys (a radix sort) gives the same permutation: 43k edges 0.17 ms against
        # torch's 0.6 ms on one thread, and 190 ms with two intra-op threads on a loaded 2-core machine
        order = torch.from_numpy(np.argsort(rows.numpy().astype(np.int16), kind="stable"))
    else:
        order = torch.argsort(rows, stable=True)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)
    import warnings

    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is stable
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, order, torch.full((len(rows),), weight, dtype=dtype, device=rows.device),
                                       (n_rows, len(rows)))


def _gradient_table(desc: "AtomCentredDescriptor", dtype: torch.dtype, device) -> torch.Tensor:
    """The constant of :func:`summed_descriptor_gradient`: the table T [K, 4K] that maps the unweighted monomials
    U [E, K] to (μ_k, ∂μ_k/∂u_x, ∂μ_k/∂u_y, ∂μ_k/∂u_z) per monomial, U @ T: for monomial k = w x^a y^b z^c,
    μ_k = w U_k and ∂μ_k/∂u_d = w (a, b, c)_d U_{lower(k, d)}, lower(k, d) the monomial of one order less in d.
    Each column of T has at most one nonzero entry."""
    key = (dtype, str(device))
    cache = desc.__dict__.setdefault("_gradient_table", {})
    if key not in cache:
        expo = desc.mono_expo.tolist()
        index = {tuple(e): k for k, e in enumerate(expo)}
        table = torch.zeros(len(expo), 4 * len(expo), dtype=torch.float64)
        for k, e in enumerate(expo):
            table[k, 4 * k] = desc._mono_weight[k]
            for d in range(3):
                if e[d] > 0:
                    table[index[tuple(e[:d] + [e[d] - 1] + e[d + 1:])], 4 * k + 1 + d] = desc._mono_weight[k] * e[d]
        cache[key] = table.to(dtype=dtype, device=device)
    return cache[key]


def summed_descriptor_gradient(desc: "AtomCentredDescriptor", species: torch.Tensor, edge_i: torch.Tensor,
                               edge_j: torch.Tensor, vec: torch.Tensor, with_descriptors: bool = False):
    """∂(Σ_i G_i)/∂r_a [n_atoms, 3, n_features]: the gradient of the summed descriptor of the atoms'
    frames with respect to each atom's position, analytically in one pass over the edges (no autograd;
    the same numbers as one backward pass per feature, to rounding, ~50x faster). With
    ``with_descriptors``: (G [n_atoms, n_features], the gradient), G from the same pass (``desc``'s forward
    to rounding).

    Each edge e = (i→j) contributes D_e = ∂G_i/∂vec_e to atom j and −D_e to atom i (vec_e = r_j − r_i + shift).
    Radial: D_e = R_n'(r) û. Angular, with m_{e,n,k} = R_n(r) μ_k(û) (μ_k the weighted monomials of order l)
    and C_{e,ab,n,k} = δ_{s_j a} M_{i,b,n,k} + δ_{s_j b} M_{i,a,n,k}: D_e = Σ_{k∈l} C_{e,ab,n,k} ∂m_{e,n,k}/∂vec_e,
    ∂m/∂vec = R_n' μ_k û + (R_n / r) (I − û û') ∇_u μ_k. With A = Σ_{k∈l} C μ_k and B = Σ_{k∈l} C ∇_u μ_k,
    and B·û = l A (A is homogeneous of degree l in û: Euler), D = (R_n / r) B + (R_n' − l R_n / r) A û.
    """
    n_atoms, S, dt = species.shape[0], desc.n_species, vec.dtype
    vec = vec.detach()
    r = (vec * vec).sum(1).sqrt()
    u = vec / r[:, None]
    sj = species[edge_j]

    def basis_and_slope(basis: GaussianRadialBasis, r: torch.Tensor):  # R_n(r), R_n'(r): [E, n] each
        dr = r[:, None] - basis.mu
        g = torch.exp(-(dr**2) * basis.inv_two_sigma2)
        c = basis.envelope.cutoff
        inside = (r < c).to(dt)
        fc = 0.5 * (torch.cos(math.pi * r / c) + 1.0) * inside
        dfc = -0.5 * math.pi / c * torch.sin(math.pi * r / c) * inside
        return g * fc[:, None], g * (-2.0 * basis.inv_two_sigma2 * dr * fc[:, None] + dfc[:, None])

    def to_atoms(i, j, d):  # Σ_{e: j_e = a} d_e − Σ_{e: i_e = a} d_e, d [E, ...] -> [n_rows, ...]
        flat = d.flatten(1)
        out = _incidence(j, n_atoms, 1.0, dt) @ flat + _incidence(i, n_atoms, -1.0, dt) @ flat
        return out.reshape(n_atoms, *d.shape[1:])

    rad, drad = basis_and_slope(desc.radial, r)
    feats = []
    if with_descriptors:  # G^rad_{i,s,n} = Σ_{j∈s} R_n(r_ij)
        feats.append((_incidence(edge_i * S + sj, n_atoms * S, 1.0, dt) @ rad).view(n_atoms, S * desc.n_radial))
    d_rad = drad[:, :, None] * u[:, None, :]  # [E, nr, 3]
    if S > 1:  # the species channel of the neighbour: column block s_j
        full = d_rad.new_zeros(len(r), S, desc.n_radial, 3)
        full[torch.arange(len(r)), sj] = d_rad
        d_rad = full
    parts = [to_atoms(edge_i, edge_j, d_rad).reshape(n_atoms, S * desc.n_radial, 3)]
    if desc.angular is not None:
        keep = r < desc.angular_cutoff
        ia, ja, sa, ra_, ua = edge_i[keep], edge_j[keep], sj[keep], r[keep], u[keep]
        rb, drb = basis_and_slope(desc.angular, ra_)  # [Ea, na]
        L = desc.max_l
        table = _gradient_table(desc, dt, u.device)
        U = desc.monomials(ua)  # [Ea, K]: x^a y^b z^c
        n_mono = U.shape[1]
        # [Ea, K, 4]: μ_k and ∇_u μ_k (∂μ_k/∂u_d = coef · a lower-order monomial): one product with the table,
        # each entry one monomial times its coefficient (plus exact zeros), so the same numbers as a gather
        Z = (U @ table).view(-1, n_mono, 4)
        m = desc.moment_terms(rb, U)  # [Ea, na, K]
        rows = ia * S + sa
        M = (_incidence(rows, n_atoms * S, 1.0, dt) @ m.reshape(len(m), -1)).view(n_atoms, S, *m.shape[1:])
        a, b = desc.pair_a, desc.pair_b
        if with_descriptors:
            feats.append(desc.angular_features(M))  # as forward()
        if S == 1:  # one pair (0, 0): C = 2 M_i (the 2 is applied to D below)
            C, two = M.view(n_atoms, -1)[ia].view(len(ia), 1, *m.shape[1:]), 2.0
        else:
            Mi = M[ia]  # [Ea, S, na, K]
            C = ((sa[:, None] == a)[:, :, None, None] * Mi[:, b]
                 + (sa[:, None] == b)[:, :, None, None] * Mi[:, a])  # [Ea, P, na, K]
            two = 1.0
        P, na = C.shape[1], C.shape[2]
        C = C.reshape(len(C), P * na, -1)
        bounds = np.cumsum([0] + [(l + 1) * (l + 2) // 2 for l in range(L + 1)])  # monomials by order
        # l-major (as the features): [Ea, L+1, P, na, 4], Σ_{k∈l} C μ_k and Σ_{k∈l} C ∇_u μ_k
        AB = torch.stack([torch.bmm(C[:, :, lo:hi], Z[:, lo:hi, :]) for lo, hi in zip(bounds[:-1], bounds[1:])],
                         dim=1).view(len(C), L + 1, P, na, 4)
        A, B = AB[..., 0], AB[..., 1:]
        c = rb / ra_[:, None]  # [Ea, na]: R / r
        s_ = (drb[:, :, None] - c[:, :, None] * torch.arange(L + 1, dtype=dt, device=u.device))  # R' − l R / r
        s_ = s_.transpose(1, 2)[:, :, None] * A * two  # [Ea, L+1, P, na]
        D = (c * two)[:, None, None, :, None] * B + s_[..., None] * ua[:, None, None, None, :]  # [Ea, L+1, P, na, 3]
        D = D.reshape(len(D), -1, 3)
        parts.append(to_atoms(ia, ja, D))
    jac = torch.cat(parts, dim=1).transpose(1, 2)
    return (torch.cat(feats, dim=1), jac) if with_descriptors else jac


def frame_edges(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray, pbc, cutoff: float,
                z_to_index: dict[int, int], nl=None):
    """Edges of one frame for the descriptor: (species index [n], i, j, vec [n_edges, 3], unseen [n]).

    ``unseen[a]`` is True when atom a, or any neighbour within ``cutoff``, has an element outside
    ``z_to_index``: such an atom's environment cannot be represented in the descriptor space at all.
    Edges touching unseen elements are dropped, so the other atoms' descriptors stay exact.
    ``nl``: a neighbour list (i, j, S, d) of this frame computed with a cutoff ≥ ``cutoff``, to reuse.
    """
    known = np.array([z in z_to_index for z in numbers.tolist()], dtype=bool)
    sp = np.array([z_to_index.get(z, 0) for z in numbers.tolist()], dtype=np.int64)
    i, j, S, d = neighbor_list(positions, cell, pbc, cutoff) if nl is None else nl
    if nl is not None:
        inside = d < cutoff
        i, j, S = i[inside], j[inside], S[inside]
    unseen = ~known
    bad_edge = ~known[j]
    if bad_edge.any():
        unseen[i[bad_edge]] = True
    keep = known[i] & known[j]
    i, j, S = i[keep], j[keep], S[keep]
    vec = positions[j] - positions[i] + S @ np.asarray(cell, dtype=np.float64).reshape(3, 3)
    return sp, i, j, vec, unseen


class DescriptorBatcher:
    """Descriptors of a stream of frames, without gradients, batched into chunks of about
    ``chunk_atoms`` atoms (one neighbour list per frame, one descriptor call per chunk)."""

    def __init__(self, species: list[str], settings: dict, chunk_atoms: int = 4000,
                 dtype: torch.dtype = torch.float64, n_atoms: int | None = None):
        from ase.data import atomic_numbers

        self.z_to_index = {atomic_numbers[s]: k for k, s in enumerate(species)}
        self.desc = AtomCentredDescriptor(len(species), **settings).to(dtype)
        self.cutoff = self.desc.cutoff
        self.dtype, self.chunk_atoms = dtype, chunk_atoms
        self._g, self._u, self._buf, self._n_buf = [], [], [], 0
        # ``n_atoms`` known in advance: the chunks are written into one array (no concatenated copy at the end)
        self._out = None if n_atoms is None else np.empty((n_atoms, self.desc.n_features),
                                                           dtype=torch.empty(0, dtype=dtype).numpy().dtype)
        self._filled = 0

    def add(self, atoms, nl=None) -> None:
        """Queue one frame; ``nl`` is its neighbour list (i, j, S, d) if already computed (cutoff ≥ ours)."""
        self._buf.append(frame_edges(atoms.numbers, np.asarray(atoms.positions, np.float64), atoms.cell.array,
                                     atoms.pbc, self.cutoff, self.z_to_index, nl))
        self._n_buf += len(atoms)
        if self._n_buf >= self.chunk_atoms:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        offset, sps, ii, jj, vv = 0, [], [], [], []
        for sp, i, j, vec, unseen in self._buf:
            sps.append(sp), ii.append(i + offset), jj.append(j + offset), vv.append(vec)
            self._u.append(unseen)
            offset += len(sp)
        with torch.no_grad():
            g = self.desc(torch.from_numpy(np.concatenate(sps)), torch.from_numpy(np.concatenate(ii)),
                          torch.from_numpy(np.concatenate(jj)), torch.from_numpy(np.concatenate(vv)).to(self.dtype))
        if self._out is not None:
            self._out[self._filled:self._filled + len(g)] = g.numpy()
            self._filled += len(g)
        else:
            self._g.append(g.numpy())
        self._buf, self._n_buf = [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(G [n_atoms_total, n_features], unseen [n_atoms_total]) of every frame added, in order."""
        self._flush()
        if self._out is not None:
            if self._filled != len(self._out):
                raise ValueError(f"{self._filled} atoms added, {len(self._out)} announced")
            return self._out, (np.concatenate(self._u) if self._u else np.zeros(0, dtype=bool))
        if not self._g:
            return np.zeros((0, self.desc.n_features)), np.zeros(0, dtype=bool)
        return np.concatenate(self._g), np.concatenate(self._u)


def compute_descriptors(frames, species: list[str], settings: dict, chunk_atoms: int = 4000,
                        dtype: torch.dtype = torch.float64) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors of every atom of every frame, in frame order, without gradients.

    ``species`` fixes the descriptor's species channels (the same order as the potential's), and
    ``settings`` are the ``descriptors`` params. Returns (G [n_atoms_total, n_features],
    unseen [n_atoms_total]); see :func:`frame_edges`.
    """
    batcher = DescriptorBatcher(species, settings, chunk_atoms, dtype)
    for a in frames:
        batcher.add(a)
    return batcher.result()
