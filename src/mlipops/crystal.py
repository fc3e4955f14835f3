"""The crystal a stage builds its structures from: element, lattice and lattice constant.

Stages that build structures of their own (nve's hot crystal, the defects control's vacancy cells and
slabs, the melting cell, active learning's starting structures) build them from one :class:`Crystal`,
never from a hard-coded fcc copper. Lattices: ``fcc`` (z = 12), ``bcc`` (8), ``hcp`` (12, ideal
c/a = √(8/3) unless ``c`` is given), ``diamond`` (4), ``sc`` (6). ``a`` is the conventional cubic
lattice constant in Å (hcp: the basal-plane constant).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
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


# ------------------------------------------------------------------------------------ builders
def vacancy_cell(cr: Crystal, repeat, rng) -> Atoms:
    """:func:`bulk_cell` with one atom, drawn by ``rng`` (a numpy Generator), removed (unrelaxed)."""
    a = bulk_cell(cr, repeat)
    del a[int(rng.integers(len(a)))]
    return a


def rattle(atoms: Atoms, stdev: float, rng) -> Atoms:
    """``atoms`` with every position component displaced by a normal draw of ``rng`` (a numpy Generator; σ =
    ``stdev`` Å), in place; returned. Generate's rattled crystals, vacancy cells and slabs and the defects
    control's are rattled by this."""
    atoms.positions += rng.normal(0.0, stdev, atoms.positions.shape)
    return atoms


_FCC_BUILDERS = {"100": "fcc100", "110": "fcc110", "111": "fcc111"}


def miller_indices(cr: Crystal, miller: str) -> tuple[int, int, int]:
    """``miller`` ("100", "110", "111", any three digits; hcp also "0001") as indices of :func:`unit_cell`'s cell.

    hcp: the indices are those of the orthorhombic 4-atom cell (a, √3 a, c); "0001", the basal plane, is its
    (001). Four-index notation other than 0001 is not accepted (write the orthorhombic cell's three indices)."""
    s = str(miller).strip()
    if cr.lattice == "hcp" and s == "0001":
        return (0, 0, 1)
    if len(s) != 3 or not s.isdigit() or s == "000":
        raise ValueError(f"miller {miller!r}: three digits such as '100', '110', '111'"
                         + (" (or '0001' for the hcp basal plane)" if cr.lattice == "hcp" else ""))
    return tuple(int(ch) for ch in s)


def slab(cr: Crystal, miller: str, layers: int, size=(1, 1), vacuum: float = 6.0) -> Atoms:
    """A slab of ``layers`` atomic planes with ``vacuum`` Å on each side, periodic in x and y only.

    fcc (100)/(110)/(111): ASE's ``fcc100``/``fcc110``/``fcc111`` with ``size`` = (nx, ny) repeats of the
    primitive surface cell (the embedded dataset's own slabs, bit for bit). Every other lattice and plane:
    ``ase.build.surface`` of :func:`unit_cell` with the indices of :func:`miller_indices`, ``size`` = repeats of
    the surface cell it finds, cut to ``layers`` consecutive distinct heights (a plane: atoms within 0.05 Å in
    height; diamond (111) counts the two planes of a bilayer apart), starting at the plane that breaks the fewest
    nearest-neighbour bonds (diamond (111): between bilayers, one dangling bond per surface atom, not three).
    """
    from ase import build

    nx, ny = int(size[0]), int(size[1])
    if layers < 1 or nx < 1 or ny < 1:
        raise ValueError(f"slab needs layers >= 1 and size >= 1, not layers={layers}, size={tuple(size)}")
    if cr.lattice == "fcc" and str(miller) in _FCC_BUILDERS:
        s = getattr(build, _FCC_BUILDERS[str(miller)])(cr.element, size=(nx, ny, layers), a=cr.a, vacuum=vacuum,
                                                       periodic=True)
    else:
        from mlipops.descriptors import neighbor_list

        hkl = miller_indices(cr, miller)
        unit = unit_cell(cr)
        one = build.surface(unit, hkl, 1, vacuum=1.0, periodic=True)
        per_rep = len(_planes(one.positions[:, 2]))
        thick = build.surface(unit, hkl, -(-layers // per_rep) + 2, vacuum=1.0, periodic=True)
        z = thick.positions[:, 2]
        planes = _planes(z)
        best = None
        for k in range(min(per_rep, len(planes) - layers + 1)):  # the termination that breaks the fewest bonds
            cut = thick[(z > planes[k] - 0.05) & (z < planes[k + layers - 1] + 0.05)]
            cut.pbc = (True, True, False)
            bonds = len(neighbor_list(cut.positions, cut.cell.array, cut.pbc, 1.05 * cr.nn_distance)[0])
            if best is None or bonds > best[0]:
                best = (bonds, cut)
        s = best[1].repeat((nx, ny, 1))
        s.center(vacuum=vacuum, axis=2)
    s.pbc = (True, True, False)
    s.info.pop("adsorbate_info", None)
    return s


def _planes(z, tol: float = 0.05) -> list[float]:
    """Distinct heights (ascending) of ``z``, heights within ``tol`` Å of the last plane's lowest atom merged."""
    out: list[float] = []
    for v in sorted(float(x) for x in z):
        if not out or v > out[-1] + tol:
            out.append(v)
    return out


# ------------------------------------------------------------------------------- classification
# distance of the second neighbour shell in units of the first (hcp: ideal c/a)
SECOND_SHELL = {"fcc": math.sqrt(2.0), "bcc": 2.0 / math.sqrt(3.0), "hcp": math.sqrt(2.0),
                "diamond": math.sqrt(8.0 / 3.0), "sc": math.sqrt(2.0)}
ATOMS_PER_CELL = {"fcc": 4, "bcc": 2, "diamond": 8, "sc": 1}
DEGENERATE_EV = 0.005  # eV/atom: lattices whose lowest frames lie closer than this are not told apart by energy
MIN_SCORE = 0.5  # a frame is of lattice L when more than half its atoms have L's first shell (count and angles)
N_LOWEST = 20  # frames per element kept for the classification: the lowest energies per atom


def a_from_volume(lattice: str, volume_per_atom: float) -> float:
    """The lattice constant (Å) at which ``lattice`` has ``volume_per_atom`` Å³ (hcp: ideal c/a, V = a³/√2)."""
    if lattice == "hcp":
        return (volume_per_atom * math.sqrt(2.0)) ** (1.0 / 3.0)
    return (volume_per_atom * ATOMS_PER_CELL[lattice]) ** (1.0 / 3.0)


def lattice_scores(atoms: Atoms) -> dict[str, float]:
    """Per lattice L: the share of the atoms whose first shell is L's, for a fully periodic frame.

    For each L, the frame's volume per atom gives L's lattice constant and nearest-neighbour distance d_L; the
    first shell is every neighbour within d_L (1 + s_L)/2, midway to L's second shell s_L d_L (bcc 1.155,
    fcc/hcp/sc 1.414, diamond 1.633). An atom counts for L when it has L's coordination (fcc/hcp 12, bcc 8,
    sc 6, diamond 4) and its bond angles are nearest L's ideal ones (:mod:`mlipops.index.angles`, the
    Wasserstein distance to each ideal crystal). A bcc crystal at the fcc cutoff has 14 neighbours, an fcc
    one at the bcc cutoff the fcc angles: neither counts for the other; fcc and hcp differ in their angles."""
    import numpy as np

    from mlipops.index.angles import _bond_vectors, deviation_from_bonds

    n = len(atoms)
    v = atoms.get_volume() / n
    out = {}
    for lat in LATTICES:
        d = NN_PER_A[lat] * a_from_volume(lat, v)
        i, vec = _bond_vectors(atoms.positions, atoms.cell.array, atoms.pbc, d * (1.0 + SECOND_SHELL[lat]) / 2.0)
        z = np.bincount(i, minlength=n)
        ok = z == COORDINATION[lat]
        if not ok.any():
            out[lat] = 0.0
            continue
        _, name = deviation_from_bonds(n, i, vec)
        out[lat] = float(np.mean(ok & (name == lat)))
    return out


def classify(atoms: Atoms) -> tuple[str | None, float]:
    """(lattice, a Å from the volume per atom) of a fully periodic single-element frame; (None, nan) when no
    lattice has more than :data:`MIN_SCORE` of the atoms (a liquid, a slab with vacuum, a distorted cell)."""
    scores = lattice_scores(atoms)
    best = max(scores, key=scores.get)
    if scores[best] <= MIN_SCORE:
        return None, float("nan")
    return best, a_from_volume(best, atoms.get_volume() / len(atoms))


# ------------------------------------------------------------------------------------- resolve
def train_frames(path) -> Iterator[Atoms]:
    """The training split of a curated extxyz file, streamed (bounded memory: the file may hold 100k frames)."""
    from pathlib import Path

    from mlipops.errors import StageInputError
    from mlipops.frames import iter_extxyz

    if not Path(path).is_file():
        raise StageInputError("curated data missing (run `dvc repro validate` first, or set crystal.element, "
                              "crystal.lattice and crystal.a)", file=str(path))
    for a in iter_extxyz(path):
        if isinstance(a, Atoms) and str(a.info.get("split", "train")) == "train":
            yield a


def _lowest(frames, element: str | None, n: int) -> tuple[set[str], dict[str, list]]:
    """One pass: the species seen, and per element the ``n`` fully periodic single-element frames of lowest
    energy per atom, as sorted (energy per atom, counter, frame) lists."""
    import heapq

    from mlipops.frames import labels

    species: set[str] = set()
    heaps: dict[str, list] = {}
    for k, a in enumerate(frames):
        sym = set(a.get_chemical_symbols())
        species |= sym
        if len(sym) != 1 or not (a.pbc.all() and a.cell.rank == 3):
            continue
        el = next(iter(sym))
        if element is not None and el != element:
            continue
        e = labels(a)[0]
        if e is None or not math.isfinite(e):
            continue
        h = heaps.setdefault(el, [])
        item = (-e / len(a), -k, a)  # max-heap on energy per atom: the highest of the n kept is popped
        if len(h) < n:
            heapq.heappush(h, item)
        elif item[0] > h[0][0]:
            heapq.heapreplace(h, item)
    return species, {el: sorted((-x[0], -x[1], x[2]) for x in h) for el, h in heaps.items()}


def _ground_state(element: str, classified: list) -> tuple[str, str]:
    """The lattice of the lowest-energy frame among ``classified`` (energy per atom, lattice, ...) rows, and
    why. Lattices within :data:`DEGENERATE_EV` of it are near-degenerate (EMT copper: hcp 1 meV/atom below
    fcc): among them the element's experimental structure (ASE's ``reference_states``) is taken; when it is
    not among them the data cannot tell and the user must say (StageInputError naming crystal.lattice)."""
    from ase.data import atomic_numbers, reference_states

    from mlipops.errors import StageInputError

    e_min: dict[str, float] = {}
    for row in classified:
        e_min.setdefault(row[1], row[0])  # rows are sorted by energy: the first of a lattice is its lowest
    best = min(e_min, key=e_min.get)
    near = sorted((lat for lat, e in e_min.items() if e - e_min[best] <= DEGENERATE_EV), key=e_min.get)
    if len(near) == 1:
        return best, "the lowest-energy classified frame"
    ref = (reference_states[atomic_numbers[element]] or {}).get("symmetry")
    gaps = ", ".join(f"{lat} {1000 * (e_min[lat] - e_min[best]):+.1f}" for lat in near)
    if ref in near:
        return ref, (f"{element}'s experimental structure among the near-degenerate lowest frames ({gaps} meV/atom, "
                     f"within {1000 * DEGENERATE_EV:g})")
    raise StageInputError(f"the lowest {element} frames of lattices {', '.join(near)} lie within "
                          f"{1000 * DEGENERATE_EV:g} meV/atom ({gaps}): the data cannot tell its crystal, "
                          "set crystal.lattice",
                          field="crystal.lattice")


def resolve(cp, frames=(), n_lowest: int = N_LOWEST) -> Crystal:
    """The crystal of params ``cp`` (:class:`~mlipops.params.CrystalParams`), its nulls filled from ``frames``.

    ``frames``: the curated training frames (an iterable, read once and only when a value is null, e.g.
    :func:`train_frames`). ``element`` null: the frames' species, which must be one. ``lattice`` null: among
    the ``n_lowest`` fully periodic single-element frames of the element with the lowest energy per atom, each
    is classified (:func:`classify`: coordination and bond angles at the shell its volume per atom gives);
    the lattice is that of the lowest-energy classified frame (the data's ground state), ``a`` the median of
    the lattice constants its volume per atom gives over those frames of that lattice. With ``lattice`` given
    and no frame of it among them, ``a`` is the given lattice at the lowest frames' volume per atom (the same
    density: a starting guess). ``source`` says which numbers came from where.
    """
    import numpy as np
    from ase.data import chemical_symbols

    from mlipops.errors import ParamsError, StageInputError

    if cp.element is not None and cp.element not in chemical_symbols[1:]:
        raise ParamsError(f"{cp.element!r} is not a chemical symbol", field="crystal.element")
    if cp.element is not None and cp.lattice is not None and cp.a is not None:
        return Crystal(cp.element, cp.lattice, float(cp.a), cp.c, "params")
    species, lowest = _lowest(frames, cp.element, n_lowest)
    element = cp.element
    if element is None:
        if len(species) != 1:
            names = ", ".join(sorted(species)) or "none"
            raise StageInputError(f"the training data holds {len(species)} species ({names}): "
                                  "set crystal.element to the element whose crystal the stages build",
                                  field="crystal.element")
        element = next(iter(species))
    got = lowest.get(element, [])
    if not got:
        raise StageInputError(f"no fully periodic {element} frame with an energy in the training data to classify its "
                              "crystal: set crystal.lattice and crystal.a", field="crystal.lattice")
    rows = [(e, *classify(a), a.get_volume() / len(a)) for e, _, a in got]
    classified = [r for r in rows if r[1] is not None]
    votes = {lat: sum(r[1] == lat for r in classified) for lat in LATTICES}
    tally = ", ".join(f"{v} {lat}" for lat, v in votes.items() if v)
    what = f"the {len(rows)} lowest-energy periodic {element} training frames"
    lattice = cp.lattice
    if lattice is None:
        if not classified:
            raise StageInputError(f"none of {what} is a recognisable fcc/bcc/hcp/diamond/sc crystal: "
                                  "set crystal.lattice",
                                  field="crystal.lattice")
        lattice, why = _ground_state(element, classified)
        where = [f"lattice {lattice}: {why} of {what} ({tally})"]
    else:
        where = ["lattice: params"]
    if cp.a is not None:
        a, c = float(cp.a), cp.c
        where.append("a: params")
    else:
        mine = [r[2] for r in classified if r[1] == lattice]
        if mine:
            a = float(np.median(mine))
            where.append(f"a {a:.4f} Å: median over the {len(mine)} {lattice} frames of them (volume per atom)")
        else:
            a = float(np.median([a_from_volume(lattice, r[3]) for r in rows]))
            where.append(f"a {a:.4f} Å: {lattice} at the volume per atom of {what} (none of them is {lattice})")
        c = cp.c
    where.insert(0, "element: params" if cp.element else f"element {element}: the training data")
    return Crystal(element, lattice, a, c if lattice == "hcp" else None, "; ".join(where))
