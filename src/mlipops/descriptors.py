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


def neighbor_list(positions: np.ndarray, cell: np.ndarray, pbc, cutoff: float):
    """Full neighbour list (i, j, integer cell shifts S, distances d) by vesin, any cell.

    Vector i→j is ``positions[j] - positions[i] + S @ cell``. Non-periodic directions need no cell.
    """
    from vesin import NeighborList

    pbc = np.asarray(pbc, dtype=bool).reshape(-1)
    pbc = np.repeat(pbc, 3) if pbc.size == 1 else pbc
    box = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    if not pbc.any():
        box = np.zeros((3, 3))
    nl = NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, S, d = nl.compute(points=np.asarray(positions, dtype=np.float64), box=box,
                            periodic=pbc.tolist(), quantities="ijSd")
    return i.astype(np.int64), j.astype(np.int64), S.astype(np.int64), d


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
        rad = self.radial(r)  # [n_edges, n_radial]
        g_rad = vec.new_zeros(n_atoms * S, self.n_radial).index_add_(0, slot, rad)
        feats = [g_rad.view(n_atoms, S * self.n_radial)]
        if self.angular is not None:
            keep = r < self.angular_cutoff
            ra = self.angular(r[keep])  # [n_ang_edges, n_angular]
            u = vec[keep] / r[keep, None]  # [n_ang_edges, 3]
            slot_a = slot[keep]
            tensor = torch.ones_like(u[:, :1])  # r̂^{⊗0}, [n_ang_edges, 1]
            for _ in range(self.max_l + 1):
                m = (ra[:, :, None] * tensor[:, None, :])  # [n_ang_edges, n_angular, 3^l]
                M = vec.new_zeros(n_atoms * S, *m.shape[1:]).index_add_(0, slot_a, m)
                M = M.view(n_atoms, S, *m.shape[1:])
                inv = (M[:, self.pair_a] * M[:, self.pair_b]).sum(-1)  # [n_atoms, n_pairs, n_angular]
                feats.append(inv.reshape(n_atoms, -1))
                tensor = (tensor[:, :, None] * u[:, None, :]).reshape(u.shape[0], 3 * tensor.shape[1])
        return torch.cat(feats, dim=1)
