"""Potentials, committees of them, and their ASE calculator."""

from mlipops.models.calculator import MlipopsCalculator
from mlipops.models.ensemble import Ensemble, load_model
from mlipops.models.potential import Graph, Potential

__all__ = ["MlipopsCalculator", "Potential", "Ensemble", "Graph", "load_model"]
