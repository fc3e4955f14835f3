"""Potentials and their ASE calculator."""

from mlipops.models.calculator import MlipopsCalculator
from mlipops.models.potential import Graph, Potential

__all__ = ["MlipopsCalculator", "Potential", "Graph"]
