"""The active-learning campaign's starting structures (:class:`~mlipops.params.ActiveStructure`) of a crystal:
used by the committee MD (``active/loop.py``) and by the oracle's hold-out trajectories (``active/holdout.py``)."""

from __future__ import annotations

from ase import Atoms

from mlipops.crystal import Crystal, a_from_volume, bulk_cell, slab, unit_cell
from mlipops.errors import ParamsError
from mlipops.params import ActiveStructure


def build_structure(s: ActiveStructure, crystal: Crystal) -> Atoms:
    """A starting structure (see :class:`~mlipops.params.ActiveStructure`) of ``crystal``; a structure that
    names another lattice gets that lattice at the crystal's volume per atom."""
    cr = crystal
    if s.lattice is not None and s.lattice != crystal.lattice:
        cell = unit_cell(crystal)
        cr = Crystal(crystal.element, s.lattice, a_from_volume(s.lattice, cell.get_volume() / len(cell)),
                     source=f"{s.lattice} at the density of {crystal.source or crystal.lattice}")
    try:
        if s.kind == "surface":
            a = slab(cr, s.miller, s.layers, (s.supercell, s.supercell), s.vacuum)
        else:
            a = bulk_cell(cr, s.supercell)
            if s.kind == "vacancy":
                del a[0]
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ParamsError(f"cannot build {s.kind} {cr.lattice} {cr.element}: {exc}",
                          field="active.structures") from None
    a.info = {"structure": s.kind}
    return a
