"""A committee of potentials: mean and spread of energy, forces and stress.

Members share species, descriptor settings and architecture (they differ in seed, bootstrap
resample, reference energies and feature standardization), so the descriptors of a batch are
computed once and every member's atomic networks read them. Forces of all members come from one
batched vector-Jacobian product through the descriptor (``is_grads_batched``), not M backward passes.

Saved as one ``weights.pt`` (state dict ``members.<k>.*``, loaded with ``weights_only=True``) and one
``config.json`` (``format: mlipops.ensemble/1``): the same two files as a single potential, so the
registry handles both alike. :func:`load_model` reads either.
"""

from __future__ import annotations

from pathlib import Path

import torch
from ase import Atoms
from torch import nn

from mlipops.errors import MlipopsError
from mlipops.models.potential import CONFIG, WEIGHTS, Graph, Potential, save_model
from mlipops.models.schema import ENSEMBLE_FORMAT, load_weights, read_config_file


class Ensemble(nn.Module):
    def __init__(self, members: list[Potential]):
        super().__init__()
        if not members:
            raise MlipopsError("an ensemble needs at least one member")
        ref = members[0]
        for k, m in enumerate(members[1:], 1):
            if (m.species != ref.species or m.descriptor_params != ref.descriptor_params or m.hidden != ref.hidden
                    or m.dispersion_params != ref.dispersion_params or m.baseline_spec != ref.baseline_spec):
                raise MlipopsError(f"ensemble member {k} differs from member 0 in species, descriptor, "
                                   "architecture, dispersion or baseline; members must share them")
        self.members = nn.ModuleList(members)

    # the interface of a single Potential -------------------------------------------------------
    @property
    def species(self) -> list[str]:
        return self.members[0].species

    @property
    def descriptor_params(self) -> dict:
        return self.members[0].descriptor_params

    @property
    def hidden(self) -> list[int]:
        return self.members[0].hidden

    @property
    def cutoff(self) -> float:
        return self.members[0].cutoff

    @property
    def baseline(self):
        """The members' shared Δ-learning baseline (or None)."""
        return self.members[0].baseline

    @property
    def baseline_spec(self) -> dict | None:
        return self.members[0].baseline_spec

    def __len__(self) -> int:
        return len(self.members)

    def graph(self, atoms: Atoms, skin: float = 0.0) -> Graph:
        return self.members[0].graph(atoms, skin)

    collate = staticmethod(Potential.collate)

    def forward(self, batch: dict, forces: bool = True, stress: bool = False,
                create_graph: bool = False) -> dict[str, torch.Tensor]:
        """Committee mean (``energy``, ``forces``, ``stress``, ``atomic_energy``), its spread
        (``*_std``, sample standard deviation over members; 0 for one member) and the members'
        values (``*_members``, leading dimension M)."""
        ref = self.members[0]
        n_frames, M = batch["cell"].shape[0], len(self.members)
        positions, cell, inputs = ref.strained_inputs(batch, forces, stress)
        g = ref.features(batch, positions, cell)  # computed once for all members
        e_atom = torch.stack([m.energies_from_features(batch, g) for m in self.members])  # [M, n_atoms]
        phys = ref.physics_energies(batch, positions, cell)  # the same analytic terms for every member
        if phys is not None:
            e_atom = e_atom + phys
        energy = e_atom.new_zeros(M, n_frames).index_add_(1, batch["batch"], e_atom)  # [M, n_frames]
        out = {"energy_members": energy, "atomic_energy_members": e_atom}
        if forces or stress:
            grads = self._member_grads(energy.sum(1), inputs, create_graph)
            if forces:
                out["forces_members"] = -grads[0]  # [M, n_atoms, 3]
            if stress:
                out["stress_members"] = torch.stack([Potential.stress_from_grad(batch, gs) for gs in grads[1]])
        for key in [k for k in out if k.endswith("_members")]:
            base = key[: -len("_members")]
            out[base] = out[key].mean(0)
            out[f"{base}_std"] = out[key].std(0) if M > 1 else torch.zeros_like(out[base])
        return out

    @staticmethod
    def _member_grads(energies: torch.Tensor, inputs: list[torch.Tensor], create_graph: bool):
        """∂E_m/∂inputs for every member m: [M, *input.shape] per input."""
        M = energies.shape[0]
        if M == 1:
            return [g.unsqueeze(0) for g in torch.autograd.grad(energies.sum(), inputs, create_graph=create_graph)]
        eye = torch.eye(M, dtype=energies.dtype, device=energies.device)
        try:
            return list(torch.autograd.grad(energies, inputs, grad_outputs=eye, is_grads_batched=True,
                                            create_graph=create_graph))
        except RuntimeError:  # an op without a batching rule: one backward pass per member
            per = [torch.autograd.grad(energies[m], inputs, retain_graph=True, create_graph=create_graph)
                   for m in range(M)]
            return [torch.stack([p[k] for p in per]) for k in range(len(inputs))]

    # ----------------------------------------------------------------------------------- I/O
    def config(self) -> dict:
        return {"format": ENSEMBLE_FORMAT, "species": self.species, "descriptor": self.descriptor_params,
                "hidden": self.hidden, "dispersion": self.members[0].dispersion_params,
                "baseline": self.members[0].baseline_spec,
                "n_members": len(self.members)}

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        return save_model(self, directory, extra)

    @classmethod
    def from_config(cls, cfg: dict) -> "Ensemble":
        n = cfg.get("n_members")
        if not isinstance(n, int) or n < 1:
            raise MlipopsError(f"n_members must be a positive integer (got {n!r})", field="n_members")
        return cls([Potential(cfg["species"], cfg["descriptor"], cfg["hidden"], cfg.get("dispersion"),
                              cfg.get("baseline")) for _ in range(n)])


def read_config(directory: str | Path, trusted_calculators=None) -> dict:
    """The validated ``config.json`` of a model directory (:mod:`mlipops.models.schema`: types, ranges,
    size bound, a baseline only from the built-ins or ``trusted_calculators``), nothing built or imported
    before; ``weights.pt`` must be there too."""
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise MlipopsError("model file missing", file=str(p))
    return read_config_file(cfg_path, trusted_calculators)


def load_model(directory: str | Path, dtype: torch.dtype = torch.float64, device: str = "cpu",
               trusted_calculators=None) -> Potential | Ensemble:
    """A single potential or an ensemble from weights.pt + config.json; executes no code: the config is
    data checked before anything is built (a Δ-learning baseline only among the built-ins or the
    ``trusted_calculators``, e.g. :func:`~mlipops.models.schema.trusted_calculators` of the params), the
    weights are a size-bounded ``torch.load(weights_only=True)`` checked tensor by tensor."""
    directory = Path(directory)
    cfg = read_config(directory, trusted_calculators)
    model = (Ensemble.from_config(cfg) if cfg["format"] == ENSEMBLE_FORMAT
             else Potential(cfg["species"], cfg["descriptor"], cfg["hidden"], cfg.get("dispersion"),
                            cfg.get("baseline")))
    model = model.to(dtype=dtype, device=device)
    load_weights(directory / WEIGHTS, model)
    return model.eval()
