"""The ensemble calculator with the committee's per-member forces, for the active-learning trigger."""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import all_changes

from mlipops.models.calculator import MlipopsCalculator


class CommitteeCalculator(MlipopsCalculator):
    """:class:`~mlipops.models.MlipopsCalculator` whose results also hold ``forces_members``
    [M, N, 3] (eV/Å): every member's forces, from the same single forward pass as the committee mean
    (captured with a forward hook on the model, nothing is recomputed). A Δ-learning baseline is added
    to every member, and the σ recalibration scales each member's deviation from the mean, so the
    members' mean is ``forces`` and their sample std (ddof = 1) is ``forces_std``. A single
    potential gives M = 1."""

    implemented_properties = MlipopsCalculator.implemented_properties + ["forces_members"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        captured = {}
        hook = self.model.register_forward_hook(lambda module, inputs, out: captured.update(out=out))
        try:
            super().calculate(atoms, properties, system_changes)
        finally:
            hook.remove()
        forces = self.results["forces"]
        members = captured["out"].get("forces_members") if self.is_ensemble else None
        if members is None:
            self.results["forces_members"] = forces[None].copy()
            return
        fm = members.detach().cpu().numpy().astype(np.float64)  # [M, N, 3]
        self.results["forces_members"] = forces[None] + self.sigma_scale["forces"] * (fm - fm.mean(axis=0))
