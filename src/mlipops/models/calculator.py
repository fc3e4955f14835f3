"""ASE calculator over a trained mlipops potential or ensemble: usable in any ASE MD run or optimizer.

A model trained by Δ-learning gets its baseline (an ASE calculator named in its config) added to
every result. With an ensemble, ``energy``/``forces``/``stress`` are the committee mean and the results also hold
``energy_std``, ``forces_std`` (per atom and component) and ``stress_std``
(``atoms.calc.results["forces_std"]`` or ``calc.get_property("forces_std", atoms)``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from mlipops.errors import MlipopsError
from mlipops.models.baseline import plus_baseline
from mlipops.models.ensemble import Ensemble, load_model
from mlipops.models.potential import Potential
from mlipops.models.schema import MAX_CONFIG_BYTES


def resolve_model(uri: str | Path, registry_dir: str | Path = "registry") -> Path:
    """A model directory from a path, or from ``NAME@alias`` / ``NAME@vN`` / ``NAME`` (``registry:`` prefix
    optional) looked up in ``registry_dir/index.json``: only a real version folder inside the registry
    (:func:`mlipops.paths.registry_version`)."""
    from mlipops.paths import registry_version

    path = Path(uri)
    if path.is_dir():
        return path
    return registry_version(str(uri), registry_dir)


def default_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def read_sigma_scale(directory: str | Path) -> dict[str, float]:
    """The σ recalibration stored next to a promoted model (``uncertainty.json``), or {}."""
    path = Path(directory) / "uncertainty.json"
    if not path.is_file():
        return {}
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise MlipopsError(f"more than {MAX_CONFIG_BYTES:,} bytes: not an uncertainty scale", file=str(path))
    try:
        scale = json.loads(path.read_bytes().decode("utf-8")).get("scale") or {}
        out = {k: scale[k] for k in ("energy", "forces") if k in scale}
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise MlipopsError(f"unreadable uncertainty scale: {str(exc)[:200]}", file=str(path), field="scale") from None
    for k, v in out.items():  # a factor on σ: finite, ≥ 0 (0 when the validation errors were all 0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            raise MlipopsError(f"expected a non-negative number, got {str(v)[:60]!r}", file=str(path),
                               field=f"scale.{k}")
    return {k: float(v) for k, v in out.items()}


class MlipopsCalculator(Calculator):
    """``MlipopsCalculator("data/models/cu")``, ``MlipopsCalculator("cu@champion")`` or a model object."""

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies",
                              "energy_std", "forces_std", "stress_std"]

    def __init__(self, model: str | Path | Potential | Ensemble, dtype: torch.dtype = torch.float64,
                 device: str = "cpu", registry_dir: str | Path = "registry", skin: float = 0.0,
                 sigma_scale: dict[str, float] | None = None, trusted_calculators=None, **kwargs):
        """``skin`` (Å): build the neighbour list to cutoff + skin and reuse it until an atom has
        moved more than skin/2 (a Verlet list; results are identical, MD steps skip the list).
        ``sigma_scale``: ``{"energy": s_E, "forces": s_F}`` multiplies ``energy_std`` / ``forces_std`` (the
        recalibration of the evaluate stage); by default read from the model directory's
        ``uncertainty.json`` (a promoted model has one), else 1. ``stress_std`` is not rescaled.
        ``trusted_calculators``: a model directory's config.json may name a Δ-learning baseline among the
        built-ins (emt, lj, morse) only, unless its calculator is trusted here
        (:func:`mlipops.models.schema.trusted_calculators` of the params)."""
        super().__init__(**kwargs)
        if skin < 0:
            raise MlipopsError(f"skin must be ≥ 0 (got {skin})", field="skin")
        self.skin = float(skin)
        self._cache = None  # (graph, reference positions, numbers, cell, pbc)
        self.n_neighbour_lists = 0
        device = default_device(device)
        self.sigma_scale = {"energy": 1.0, "forces": 1.0}
        if isinstance(model, (Potential, Ensemble)):
            self.model = model
        else:
            directory = resolve_model(model, registry_dir)
            self.model = load_model(directory, dtype=dtype, device=device, trusted_calculators=trusted_calculators)
            self.sigma_scale |= read_sigma_scale(directory)
        if sigma_scale is not None:
            self.sigma_scale |= {k: float(v) for k, v in sigma_scale.items()}
        self.model = self.model.to(dtype=dtype, device=device).eval()
        self.dtype, self.device = dtype, device
        self.is_ensemble = isinstance(self.model, Ensemble)

    @classmethod
    def from_registry(cls, ref: str, registry_dir: str | Path = "registry", **kwargs) -> "MlipopsCalculator":
        return cls(resolve_model(ref, registry_dir), **kwargs)

    def _graph(self, atoms):
        pos = np.asarray(atoms.positions, dtype=np.float64)
        c = self._cache
        if (c is not None and self.skin > 0 and np.array_equal(c[2], atoms.numbers)
                and np.array_equal(c[3], atoms.cell.array) and np.array_equal(c[4], atoms.pbc)
                and float(np.max(np.linalg.norm(pos - c[1], axis=1), initial=0.0)) < 0.5 * self.skin):
            return dataclasses.replace(c[0], positions=pos.copy())
        g = self.model.graph(atoms, self.skin)
        self.n_neighbour_lists += 1
        self._cache = (g, pos.copy(), atoms.numbers.copy(), atoms.cell.array.copy(), atoms.pbc.copy())
        return g

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        periodic = bool(self.atoms.pbc.all() and self.atoms.cell.rank == 3)
        want_stress = periodic and ("stress" in properties or "stress_std" in properties)
        batch = Potential.collate([self._graph(self.atoms)], self.dtype, self.device)
        out = self.model(batch, forces=True, stress=want_stress)

        def np_(key):
            return out[key].detach().cpu().numpy().astype(np.float64)

        e = float(out["energy"][0].detach().cpu())
        self.results = {"energy": e, "free_energy": e, "forces": np_("forces"), "energies": np_("atomic_energy")}
        if want_stress:
            self.results["stress"] = np_("stress")[0]
        base = getattr(self.model, "baseline", None)
        if base is not None:  # Δ-learning: the network predicts what the baseline leaves
            net = {k: self.results[k] for k in ("energy", "forces", "stress", "energies") if k in self.results}
            total = plus_baseline(net, base.compute(self.atoms, stress=want_stress, energies=True))
            if "energies" not in total:  # no per-atom split of the baseline: no wrong per-atom energies
                del self.results["energies"]
            self.results.update(total, free_energy=total["energy"])
        if self.is_ensemble:
            self.results["energy_std"] = self.sigma_scale["energy"] * float(out["energy_std"][0].detach().cpu())
            self.results["forces_std"] = self.sigma_scale["forces"] * np_("forces_std")
            if want_stress:
                self.results["stress_std"] = np_("stress_std")[0]
