"""ASE calculator over a trained mlipops potential: usable in any ASE MD run or optimizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from mlipops.models.potential import Potential


class MlipopsCalculator(Calculator):
    """``MlipopsCalculator("registry/cu/v1")`` or a directory holding weights.pt + config.json."""

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(self, model: str | Path | Potential, dtype: torch.dtype = torch.float64,
                 device: str = "cpu", **kwargs):
        super().__init__(**kwargs)
        self.model = model if isinstance(model, Potential) else Potential.load(model, dtype=dtype,
                                                                               device=device)
        self.model = self.model.to(dtype=dtype, device=device).eval()
        self.dtype, self.device = dtype, device

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        periodic = bool(self.atoms.pbc.all() and self.atoms.cell.rank == 3)
        batch = Potential.collate([self.model.graph(self.atoms)], self.dtype, self.device)
        out = self.model(batch, forces=True, stress=periodic and "stress" in properties)
        e = float(out["energy"][0].detach().cpu())
        self.results = {"energy": e, "free_energy": e,
                        "forces": out["forces"].detach().cpu().numpy().astype(np.float64),
                        "energies": out["atomic_energy"].detach().cpu().numpy().astype(np.float64)}
        if "stress" in out:
            self.results["stress"] = out["stress"][0].detach().cpu().numpy().astype(np.float64)
