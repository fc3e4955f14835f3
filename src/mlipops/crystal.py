"""The crystal a stage builds its structures from: element, lattice and lattice constant.

Stages that build structures of their own (nve's hot crystal, the defects control's vacancy cells and
slabs, the melting cell, active learning's starting structures) build them from one :class:`Crystal`,
never from a hard-coded fcc copper. Lattices: ``fcc`` (z = 12), ``bcc`` (8), ``hcp`` (12, ideal
c/a = √(8/3) unless ``c`` is given), ``diamond`` (4), ``sc`` (6). ``a`` is the conventional cubic
lattice constant in Å (hcp: the basal-plane constant).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ase import Atoms

LATTICES = ("fcc", "bcc", "hcp", "diamond", "sc")
COORDINATION = {"fcc": 12, "bcc": 8, "hcp": 12, "diamond": 4, "sc": 6}
# nearest-neighbour distance = NN_PER_A * a (hcp with the ideal c/a: a)
NN_PER_A = {"fcc": 1.0 / math.sqrt(2.0), "bcc": math.sqrt(3.0) / 2.0, "hcp": 1.0, "diamond": math.sqrt(3.0) / 4.0,
            "sc": 1.0}
IDEAL_C_OVER_A = math.sqrt(8.0 / 3.0)


@dataclass(frozen=True)
class Crystal:
    """One element's crystal: ``lattice`` in :data:`LATTICES`, ``a`` Å (conventional cell), ``c`` Å (hcp only;
    None: ideal c/a), ``source``: where the numbers come from (params, the data, ASE's reference table)."""
    element: str
    lattice: str
    a: float
    c: float | None = None
    source: str = ""

    def __post_init__(self):
        if self.lattice not in LATTICES:
            raise ValueError(f"lattice {self.lattice!r} is not one of {', '.join(LATTICES)}")
        if not (self.a > 0 and math.isfinite(self.a)):
            raise ValueError(f"lattice constant a = {self.a} Å is not a positive number")

    @property
    def z(self) -> int:
        """Bulk coordination (first shell)."""
        return COORDINATION[self.lattice]

    @property
    def nn_distance(self) -> float:
        """Nearest-neighbour distance, Å."""
        return NN_PER_A[self.lattice] * self.a

    def with_a(self, a: float, source: str | None = None) -> "Crystal":
        """The same crystal with another lattice constant (hcp: c scaled with it)."""
        c = None if self.c is None else self.c * a / self.a
        return Crystal(self.element, self.lattice, float(a), c, self.source if source is None else source)


def unit_cell(cr: Crystal) -> Atoms:
    """The conventional cell: cubic for fcc/bcc/diamond/sc (4/2/8/1 atoms), orthorhombic for hcp (4 atoms)."""
    from ase.build import bulk

    if cr.lattice == "hcp":
        c = cr.c if cr.c is not None else IDEAL_C_OVER_A * cr.a
        return bulk(cr.element, "hcp", a=cr.a, c=c, orthorhombic=True)
    return bulk(cr.element, cr.lattice, a=cr.a, cubic=True)


def bulk_cell(cr: Crystal, repeat) -> Atoms:
    """The conventional cell repeated ``repeat`` (an int or three ints) times, periodic."""
    reps = (repeat,) * 3 if isinstance(repeat, int) else tuple(int(r) for r in repeat)
    return unit_cell(cr).repeat(reps)
