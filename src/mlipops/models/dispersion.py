"""Analytic long-range dispersion: Grimme's D2 pair term, added to the network's short-range energy.

    E_disp = -s6 Σ_{i<j} C6_ij / r_ij^6 · f_damp(r_ij) · f_sw(r_ij)

    C6_ij = sqrt(C6_i C6_j)                       (eV Å^6; Grimme's table is in J nm^6 mol^-1)
    f_damp(r) = 1 / (1 + exp(-d (r / R0_ij - 1))), R0_ij = R0_i + R0_j, d = 20
    f_sw(r) = 1 below cutoff - width, ½(1 + cos(π (r - r_on) / width)) up to the cutoff, 0 beyond

The damping makes the term vanish smoothly at short range, where the network (trained on
E_ref - E_disp) describes the bonding; the switch makes energy and forces continuous at the
dispersion cutoff, which is far beyond the network's. S. Grimme, J. Comput. Chem. 27, 1787 (2006).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mlipops.errors import MlipopsError

J_NM6_PER_MOL_TO_EV_A6 = 1e6 / 96485.33212  # 1 J nm^6 mol^-1 in eV Å^6 (= 10.364)

# Grimme D2 (2006) C6 (J nm^6 mol^-1) and van der Waals radii R0 (Å) of the elements the project uses;
# others are given in params (train.dispersion.c6 / r0).
D2_C6 = {"H": 0.14, "He": 0.08, "Li": 1.61, "Be": 1.61, "B": 3.13, "C": 1.75, "N": 1.23, "O": 0.70,
         "F": 0.75, "Ne": 0.63, "Na": 5.71, "Mg": 5.71, "Al": 10.79, "Si": 9.23, "P": 7.84, "S": 5.57,
         "Cl": 5.07, "Ar": 4.61, "Cu": 10.80, "Mo": 24.67, "Ag": 24.67, "Au": 40.62, "Ni": 10.80, "Pd": 24.67,
         "Pt": 40.62}
D2_R0 = {"H": 1.001, "He": 1.012, "Li": 0.825, "Be": 1.408, "B": 1.485, "C": 1.452, "N": 1.397, "O": 1.342,
         "F": 1.287, "Ne": 1.243, "Na": 1.144, "Mg": 1.364, "Al": 1.639, "Si": 1.716, "P": 1.705, "S": 1.683,
         "Cl": 1.639, "Ar": 1.595, "Cu": 1.562, "Mo": 1.639, "Ag": 1.639, "Au": 1.772, "Ni": 1.562, "Pd": 1.639,
         "Pt": 1.772}


def d2_settings(species: list[str], s6: float = 0.75, damping: float = 20.0, cutoff: float = 12.0,
                switch_width: float = 2.0, c6: dict | None = None, r0: dict | None = None) -> dict:
    """The model-config dict of a D2 term for ``species`` (C6 in eV Å^6, in species order); ``c6``
    (J nm^6 mol^-1) and ``r0`` (Å) override Grimme's table per element."""
    c6 = D2_C6 | (c6 or {})
    r0 = D2_R0 | (r0 or {})
    missing = [s for s in species if s not in c6 or s not in r0]
    if missing:
        raise MlipopsError(f"no D2 C6/R0 for {missing}: give them in train.dispersion.c6 and r0",
                           field="train.dispersion")
    if not 0 < switch_width <= cutoff:
        raise MlipopsError(f"switch_width must be in (0, cutoff] (got {switch_width})", field="train.dispersion")
    return {"kind": "d2", "s6": float(s6), "damping": float(damping), "cutoff": float(cutoff),
            "switch_width": float(switch_width),
            "c6_eV_A6": [float(c6[s]) * J_NM6_PER_MOL_TO_EV_A6 for s in species],
            "r0_A": [float(r0[s]) for s in species]}


class D2Dispersion(nn.Module):
    """Per-atom D2 energies [n_atoms] from a full edge list (each pair in both directions)."""

    def __init__(self, settings: dict):
        super().__init__()
        self.settings = dict(settings)
        # not persistent: the model's config.json holds the values (one place per fact)
        self.register_buffer("c6", torch.tensor(settings["c6_eV_A6"], dtype=torch.float64), persistent=False)
        self.register_buffer("r0", torch.tensor(settings["r0_A"], dtype=torch.float64), persistent=False)
        self.s6, self.damping = float(settings["s6"]), float(settings["damping"])
        self.cutoff, self.width = float(settings["cutoff"]), float(settings["switch_width"])

    def pair_energy(self, r: torch.Tensor, si: torch.Tensor, sj: torch.Tensor) -> torch.Tensor:
        """-s6 C6_ij / r^6 f_damp f_sw for each pair [n_pairs]."""
        c6 = torch.sqrt(self.c6[si] * self.c6[sj]).to(r.dtype)
        rr = (self.r0[si] + self.r0[sj]).to(r.dtype)
        f_damp = torch.sigmoid(self.damping * (r / rr - 1.0))
        r_on = self.cutoff - self.width
        x = ((r - r_on) / self.width).clamp(0.0, 1.0)
        f_sw = 0.5 * (1.0 + torch.cos(math.pi * x))  # 1 below r_on, 0 at the cutoff, C¹
        return -self.s6 * c6 / r**6 * f_damp * f_sw * (r < self.cutoff).to(r.dtype)

    def forward(self, species: torch.Tensor, edge_i: torch.Tensor, edge_j: torch.Tensor,
                vec: torch.Tensor) -> torch.Tensor:
        r = torch.linalg.norm(vec, dim=1)  # [n_edges]
        e = self.pair_energy(r, species[edge_i], species[edge_j])  # [n_edges]
        # a full list holds each pair twice: half of each pair energy to each of its atoms
        return vec.new_zeros(species.shape[0]).index_add_(0, edge_i, 0.5 * e)  # [n_atoms]
