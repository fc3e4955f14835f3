"""The torch potential: E = Σ_i [E0_{s_i} + ε_{s_i}(Ĝ_i)], forces -∂E/∂R and stress ∂E/∂ε / V by autograd.

ε_s is a per-species MLP on the standardized atom-centred descriptors Ĝ = (G - mean) / std, and
E0_s a per-species reference energy fitted by least squares before training, so the network
learns only what the composition does not explain.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.data import atomic_numbers
from torch import nn

from mlipops.descriptors import AtomCentredDescriptor, neighbor_list
from mlipops.models.baseline import Baseline
from mlipops.models.dispersion import D2Dispersion
from mlipops.errors import MlipopsError
from mlipops.models.schema import CONFIG_FORMAT
WEIGHTS = "weights.pt"
CONFIG = "config.json"


class AtomicEnergyMLP(nn.Module):
    """ε_s(Ĝ): Linear → SiLU → ... → Linear(1).

    The output layer starts at zero, so an untrained model is exactly its reference energies (plus its
    analytic terms and baseline): the network only ever adds what the data asks for (with a Δ-learning
    baseline equal to the reference it stays exactly zero), and training starts from a physical model
    rather than from random per-atom energies."""

    def __init__(self, n_in: int, hidden: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(n_in, h), nn.SiLU()]
            n_in = h
        out = nn.Linear(n_in, 1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        layers.append(out)
        self.net = nn.Sequential(*layers)

    def forward(self, g: torch.Tensor) -> torch.Tensor:  # [n, n_features] -> [n]
        return self.net(g).squeeze(-1)


@dataclass
class Graph:
    """One frame prepared for the model (numpy; positions-independent neighbour topology)."""

    species: np.ndarray  # [n_atoms] species index
    positions: np.ndarray  # [n_atoms, 3]
    cell: np.ndarray  # [3, 3]
    edge_i: np.ndarray
    edge_j: np.ndarray
    shifts: np.ndarray  # [n_edges, 3] integer cell shifts
    periodic: bool
    disp_i: np.ndarray | None = None  # long-range pairs of the dispersion term (to its own cutoff)
    disp_j: np.ndarray | None = None
    disp_shifts: np.ndarray | None = None


class Potential(nn.Module):
    def __init__(self, species: list[str], descriptor: dict, hidden: list[int], dispersion: dict | None = None,
                 baseline: dict | None = None):
        super().__init__()
        self.species = list(species)
        self.descriptor_params = dict(descriptor)
        self.hidden = list(hidden)
        self.descriptor = AtomCentredDescriptor(len(species), **descriptor)
        nf = self.descriptor.n_features
        self.register_buffer("feature_mean", torch.zeros(nf))
        self.register_buffer("feature_std", torch.ones(nf))
        self.register_buffer("e0", torch.zeros(len(species)))
        self.mlps = nn.ModuleList([AtomicEnergyMLP(nf, hidden) for _ in species])
        self._z_to_index = {atomic_numbers[s]: k for k, s in enumerate(self.species)}
        self.dispersion_params = dict(dispersion) if dispersion else None
        self.dispersion = D2Dispersion(dispersion) if dispersion else None
        # Δ-learning: an ASE calculator whose labels the network's output is added to (not a torch term:
        # MlipopsCalculator and the evaluation add it; training subtracts it from the targets)
        self.baseline_spec = dict(baseline) if baseline else None
        self.baseline = Baseline(baseline) if baseline else None

    @property
    def cutoff(self) -> float:
        return self.descriptor.cutoff

    # ------------------------------------------------------------------------------- preparation
    def graph(self, atoms: Atoms, skin: float = 0.0) -> Graph:
        """Neighbour topology within cutoff + ``skin`` (pairs beyond the cutoff contribute exactly
        zero: the descriptors mask them), so a graph stays valid while no atom moves more than skin/2."""
        try:
            species = np.array([self._z_to_index[z] for z in atoms.numbers], dtype=np.int64)
        except KeyError as exc:
            from ase.data import chemical_symbols

            raise MlipopsError(f"element {chemical_symbols[exc.args[0]]} is not one of the model's "
                               f"species {self.species}", field="species") from None
        periodic = bool(atoms.pbc.all() and atoms.cell.rank == 3)
        pos, cell = np.asarray(atoms.positions, float), np.asarray(atoms.cell.array, float)
        if self.dispersion is None:
            i, j, S, _ = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, self.cutoff + skin)
            return Graph(species, pos, cell, i, j, S, periodic)
        # one list to the longer cutoff; the descriptor's edges are its short part
        i, j, S, d = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc,
                                   max(self.cutoff, self.dispersion.cutoff) + skin)
        short = d < self.cutoff + skin
        return Graph(species, pos, cell, i[short], j[short], S[short], periodic, i, j, S)

    @staticmethod
    def collate(graphs: list[Graph], dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor]:
        offsets = np.cumsum([0] + [len(g.species) for g in graphs[:-1]])
        cat = np.concatenate
        sp = cat([g.species for g in graphs]) if graphs else np.zeros(0, np.int64)
        as_t = lambda x, dt=dtype: torch.as_tensor(x, dtype=dt, device=device)  # noqa: E731
        return {
            "species": as_t(cat([g.species for g in graphs]), torch.long),
            "positions": as_t(cat([g.positions for g in graphs])),
            "cell": as_t(np.stack([g.cell for g in graphs])),
            "batch": as_t(cat([np.full(len(g.species), k) for k, g in enumerate(graphs)]), torch.long),
            "edge_i": as_t(cat([g.edge_i + o for g, o in zip(graphs, offsets)]), torch.long),
            "edge_j": as_t(cat([g.edge_j + o for g, o in zip(graphs, offsets)]), torch.long),
            "shifts": as_t(cat([g.shifts for g in graphs])),
            "n_atoms": as_t(np.array([len(g.species) for g in graphs])),
            "periodic": torch.as_tensor([g.periodic for g in graphs], device=device),
            # atoms of each species, found on the host: no device sync in the per-species MLP dispatch
            "species_atoms": [torch.as_tensor(np.flatnonzero(sp == k), dtype=torch.long, device=device)
                              for k in range(int(sp.max()) + 1 if sp.size else 0)],
        } | ({
            "disp_edge_i": as_t(cat([g.disp_i + o for g, o in zip(graphs, offsets)]), torch.long),
            "disp_edge_j": as_t(cat([g.disp_j + o for g, o in zip(graphs, offsets)]), torch.long),
            "disp_shifts": as_t(cat([g.disp_shifts for g in graphs])),
        } if graphs and all(g.disp_i is not None for g in graphs) else {})

    # ----------------------------------------------------------------------------------- physics
    def features(self, batch: dict, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        bi = batch["batch"][batch["edge_i"]]
        vec = (positions[batch["edge_j"]] - positions[batch["edge_i"]]
               + torch.einsum("ek,ekl->el", batch["shifts"], cell[bi]))  # [n_edges, 3]
        return self.descriptor(batch["species"], batch["edge_i"], batch["edge_j"], vec)

    def atomic_energies(self, batch: dict, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        e = self.energies_from_features(batch, self.features(batch, positions, cell))
        phys = self.physics_energies(batch, positions, cell)
        return e if phys is None else e + phys

    def physics_energies(self, batch: dict, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor | None:
        """Per-atom energies of the analytic terms (D2 dispersion) [n_atoms], or None without any."""
        if self.dispersion is None:
            return None
        if "disp_edge_i" not in batch:
            raise MlipopsError("this model has a dispersion term: build the batch from graphs made by "
                               "its own graph()", field="dispersion")
        i, j = batch["disp_edge_i"], batch["disp_edge_j"]
        vec = (positions[j] - positions[i]
               + torch.einsum("ek,ekl->el", batch["disp_shifts"], cell[batch["batch"][i]]))  # [n_pairs, 3]
        return self.dispersion(batch["species"], i, j, vec)

    def energies_from_features(self, batch: dict, features: torch.Tensor) -> torch.Tensor:
        """E0_s + ε_s(Ĝ) per atom [n_atoms] from the raw descriptors [n_atoms, n_features]."""
        g = (features - self.feature_mean) / self.feature_std
        species = batch["species"]
        groups = batch.get("species_atoms")
        if groups is None:  # a batch not made by collate
            groups = [(species == k).nonzero().squeeze(1) for k in range(len(self.mlps))]
        if len(self.mlps) == 1 and len(groups) == 1 and groups[0].numel() == g.shape[0]:
            eps = self.mlps[0](g)
        else:
            eps = g.new_zeros(g.shape[0])
            for k, idx in enumerate(groups[:len(self.mlps)]):
                if idx.numel():
                    eps = eps.index_put((idx,), self.mlps[k](g[idx]))
        return eps + self.e0[species]  # [n_atoms]

    def strained_inputs(self, batch: dict, forces: bool, stress: bool):
        """(positions, cell, leaves): positions and cell under a symmetric strain when stress is wanted."""
        pos_leaf = batch["positions"]
        if forces or stress:
            pos_leaf = pos_leaf.detach().requires_grad_(True)
        positions, cell = pos_leaf, batch["cell"]
        inputs = [pos_leaf]
        if stress:
            strain = torch.zeros_like(cell).requires_grad_(True)
            sym = 0.5 * (strain + strain.transpose(1, 2))  # [n_frames, 3, 3]
            positions = positions + torch.einsum("ni,nij->nj", positions, sym[batch["batch"]])
            cell = cell + torch.bmm(cell, sym)
            inputs.append(strain)
        return positions, cell, inputs

    @staticmethod
    def stress_from_grad(batch: dict, grad_strain: torch.Tensor) -> torch.Tensor:
        """σ = (1/V) ∂E/∂ε in ASE's Voigt order (xx, yy, zz, yz, xz, xy) [n_frames, 6]."""
        vol = torch.abs(torch.linalg.det(batch["cell"]))
        sigma = grad_strain / vol[:, None, None]
        return sigma[:, [0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]

    def forward(self, batch: dict, forces: bool = True, stress: bool = False,
                create_graph: bool = False) -> dict[str, torch.Tensor]:
        n_frames = batch["cell"].shape[0]
        positions, cell, inputs = self.strained_inputs(batch, forces, stress)
        e_atom = self.atomic_energies(batch, positions, cell)  # [n_atoms]
        energy = e_atom.new_zeros(n_frames).index_add_(0, batch["batch"], e_atom)  # [n_frames]
        out = {"energy": energy, "atomic_energy": e_atom}
        if forces or stress:
            grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph)
            if forces:
                out["forces"] = -grads[0]  # [n_atoms, 3]
            if stress:
                out["stress"] = self.stress_from_grad(batch, grads[1])  # [n_frames, 6] ASE Voigt
        return out

    # --------------------------------------------------------------------------------------- I/O
    def config(self) -> dict:
        return {"format": CONFIG_FORMAT, "species": self.species, "descriptor": self.descriptor_params,
                "hidden": self.hidden, "dispersion": self.dispersion_params, "baseline": self.baseline_spec}

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        return save_model(self, directory, extra)


def save_model(model: torch.nn.Module, directory: str | Path, extra: dict | None = None) -> Path:
    """``model``'s tensors (``weights.pt``, loaded back with ``weights_only=True``) and its JSON config
    (``model.config()`` with ``extra`` merged, ``config.json``) written into ``directory``: a potential's or an
    ensemble's folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, directory / WEIGHTS)
    cfg = model.config() | (extra or {})
    (directory / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return directory
