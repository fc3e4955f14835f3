"""Dataset recipes: crystals by coordination, defects, liquid, reaction paths.

Every frame carries ``config_type``:

=================  =====================================================================
``crystal_<s>``    perfect crystal ``s`` in {fcc (z=12), bcc (8), sc (6), diamond (4), hcp (12)}
                   at its oracle equilibrium volume, isotropically and shear strained, rattled
``vacancy``        fcc supercell with one atom removed, rattled (unrelaxed)
``surface_<hkl>``  fcc (100)/(110)/(111) slabs with vacuum, rattled
``adatom``         an atom in the fcc hollow of a (111) slab
``liquid``         snapshots of oracle Langevin MD above the melting point (``temperature_K`` set)
``path_adatom``    the adatom pulled straight out of the (111) surface (``path_coordinate``: height, Å)
``path_dimer``     an isolated dimer stretched (``path_coordinate``: bond length, Å)
=================  =====================================================================

**Bitwise the same file on every CPU.** Floating-point sums give different last bits on CPUs with
different SIMD units or BLAS kernels (numpy's dispatch, OpenBLAS's kernels, FMA), and chaotic MD
amplifies a last-bit difference into a different liquid within a few hundred steps. So every number
that reaches the file is put on a fixed decimal grid at the point where it is made, far coarser than
the last-bit noise (≈1e-15 relative) and far finer than anything physical:

- geometries (positions, cells) on a 1e-8 Å grid *before* they are labelled (extxyz writes 8 decimals,
  so the labels belong to exactly the geometry in the file);
- labels: energies and forces on 1e-8 eV and eV/Å, stresses on 1e-10 eV/Å³ (1.6e-8 GPa), with the
  sign of zero normalised (a symmetric crystal's forces are ±1e-17 noise: "-0.0" must not appear);
- the MD state after every step: positions on 1e-6 Å, momenta on 1e-7 amu·Å/(ASE time) (the
  Langevin noise per step is ~1e-2 of either): a last-bit difference cannot survive a step, so it
  cannot grow.

A coordinate lands within one last bit of a grid boundary with probability ~1e-9 per rounding, about
1e-3 for a whole run of the default recipes; ``tests/test_generate_determinism.py`` runs the stage
with numpy's SIMD dispatch and OpenBLAS's kernel restricted and checks the md5 in ``dvc.lock``.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter

import numpy as np
from ase import Atoms, units
from ase.build import add_adsorbate, bulk, fcc100, fcc110, fcc111
from ase.data import atomic_numbers, covalent_radii

from mlipops.crystal import Crystal, bulk_cell, rattle, vacancy_cell
from mlipops.frames import write_extxyz, write_manifest
from mlipops.oracles import Oracle, get_oracle
from mlipops.params import GenerateParams
from mlipops.paths import ensure_writable
from mlipops.report import progress, write_markdown, write_metrics
from mlipops.pipeline import GENERATE_REPORTS as REPORT_DIR, RAW_DIR


# lattice constant in units of the nearest-neighbour distance d, and build options
_SHAPES = {
    "fcc": (math.sqrt(2.0), {"cubic": True}),
    "bcc": (2.0 / math.sqrt(3.0), {"cubic": True}),
    "sc": (1.0, {}),
    "diamond": (4.0 / math.sqrt(3.0), {"cubic": True}),
    "hcp": (1.0, {"orthorhombic": True}),
}


def snap(x, decimals: int):
    """``x`` on a decimal grid, with -0.0 turned into 0.0 (numpy's round is exact arithmetic)."""
    return np.round(np.asarray(x, dtype=float), decimals) + 0.0


def canonical_geometry(atoms: Atoms) -> Atoms:
    """Positions and cell on the 1e-8 Å grid of the extxyz file (in place; returns ``atoms``)."""
    atoms.set_cell(snap(atoms.cell.array, 8), scale_atoms=False)
    atoms.positions = snap(atoms.positions, 8)
    return atoms


def canonical_labels(frames: list[Atoms]) -> list[Atoms]:
    """Labels on the file's grid: energy and forces 1e-8, stress 1e-10 (in place)."""
    from mlipops.frames import set_labels

    for a in frames:
        r = a.calc.results
        stress = r.get("stress")
        set_labels(a, float(snap(r["energy"], 8)), snap(r["forces"], 8),
                   None if stress is None else snap(stress, 10))
    return frames


def _crystal(element: str, structure: str, d: float) -> Atoms:
    factor, opts = _SHAPES[structure]
    if structure == "hcp":
        return bulk(element, "hcp", a=d, c=d * math.sqrt(8.0 / 3.0), **opts)
    return bulk(element, structure, a=factor * d, **opts)


def equilibrium_nn_distance(element: str, structure: str, oracle: Oracle) -> float:
    """Nearest-neighbour distance minimising the oracle energy of ``structure`` (isotropic scan + parabola)."""
    calc = oracle.calculator()
    d0 = 2.0 * covalent_radii[atomic_numbers[element]]
    scales = np.linspace(0.80, 1.20, 17)

    def energy(d: float) -> float:
        a = _crystal(element, structure, d)
        a.calc = calc
        return a.get_potential_energy() / len(a)

    e = np.array([energy(d0 * s) for s in scales])
    k = int(np.clip(np.argmin(e), 1, len(e) - 2))
    x, y = d0 * scales[k - 1:k + 2], e[k - 1:k + 2]
    c2, c1, _ = np.polyfit(x, y, 2)  # LAPACK: last bits depend on the CPU, hence the grid
    return float(snap(-c1 / (2 * c2) if c2 > 0 else d0 * scales[k], 8))


def _supercell(atoms: Atoms, min_atoms: int) -> Atoms:
    n = max(1, math.ceil((min_atoms / len(atoms)) ** (1.0 / 3.0)))
    return atoms.repeat((n, n, n))


def _tag(atoms: Atoms, config_type: str, **info) -> Atoms:
    atoms.info["config_type"] = config_type
    atoms.info.update(info)
    return atoms


def crystals(p: GenerateParams, oracle: Oracle, rng: np.random.Generator) -> tuple[list[Atoms], dict]:
    frames, nn = [], {}
    r = p.crystals
    for s in r.structures:
        d = equilibrium_nn_distance(p.element, s, oracle)
        nn[s] = d
        base = _supercell(_crystal(p.element, s, d), r.min_atoms)
        strains = [("iso", e) for e in r.isotropic_strains] + [("shear", e) for e in r.shear_strains]
        for kind, e in strains:
            eps = np.eye(3) * e if kind == "iso" else np.array([[0, e, 0], [e, 0, 0], [0, 0, 0]]) / 2
            a = base.copy()
            a.set_cell(base.cell.array @ (np.eye(3) + eps), scale_atoms=True)
            for k in range(1 + r.rattles_per_strain):
                b = rattle(a.copy(), r.rattle_stdev, rng) if k else a.copy()
                frames.append(_tag(b, f"crystal_{s}", strain_kind=kind, strain=float(e)))
    return frames, nn


def _slab(element: str, hkl: str, a: float, size, vacuum: float) -> Atoms:
    builder = {"100": fcc100, "110": fcc110, "111": fcc111}[hkl]
    return builder(element, size=tuple(size), a=a, vacuum=vacuum)


def defects(p: GenerateParams, a_fcc: float, rng: np.random.Generator) -> list[Atoms]:
    r = p.defects
    frames = []
    fcc = Crystal(p.element, "fcc", a_fcc)
    for k in range(r.vacancy_cells):
        frames.append(_tag(rattle(vacancy_cell(fcc, r.vacancy_supercell, rng), r.rattle_stdev, rng), "vacancy"))
    for hkl in r.slabs:
        slab = _slab(p.element, hkl, a_fcc, r.slab_size, r.vacuum)
        for k in range(1 + r.slab_rattles):
            frames.append(_tag(rattle(slab.copy(), r.rattle_stdev, rng) if k else slab.copy(), f"surface_{hkl}"))
    if r.adatom:
        slab = _slab(p.element, "111", a_fcc, r.slab_size, r.vacuum)
        add_adsorbate(slab, p.element, height=a_fcc / math.sqrt(6.0), position="fcc")
        for k in range(1 + r.slab_rattles):
            frames.append(_tag(rattle(slab.copy(), r.rattle_stdev, rng) if k else slab.copy(), "adatom"))
    return frames


def liquid(p: GenerateParams, oracle: Oracle, a_fcc: float, rng: np.random.Generator) -> list[Atoms]:
    """Langevin MD with the oracle above the melting point; snapshots every ``interval`` steps."""
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    r = p.liquid
    if r.snapshots == 0:
        return []
    n = r.supercell
    # ~5 % lower density than the crystal, as a liquid metal
    atoms = bulk_cell(Crystal(p.element, "fcc", a_fcc * 1.05 ** (1 / 3)), n)
    rattle(atoms, 0.25, rng)  # break the lattice at once
    atoms.calc = oracle.calculator()
    MaxwellBoltzmannDistribution(atoms, temperature_K=2 * r.temperature_K, rng=rng)
    Stationary(atoms)
    _snap_state(atoms)
    dyn = Langevin(atoms, r.timestep_fs * units.fs, temperature_K=r.temperature_K,
                   friction=r.friction, fixcm=False, rng=rng)
    frames = []
    total = r.equilibration_steps + r.snapshots * r.interval
    with progress("liquid MD", total) as bar:
        for step in range(1, total + 1):
            dyn.run(1)
            _snap_state(atoms)  # a last-bit difference between CPUs cannot grow (module doc)
            bar(1)
            if step > r.equilibration_steps and (step - r.equilibration_steps) % r.interval == 0:
                snap = Atoms(numbers=atoms.numbers, positions=atoms.get_positions(wrap=True),
                             cell=atoms.cell, pbc=True)
                frames.append(_tag(snap, "liquid", temperature_K=float(r.temperature_K),
                                   md_step=step))
    return frames


def _snap_state(atoms: Atoms) -> None:
    """The MD state on its grid: positions 1e-6 Å, momenta 1e-7 amu·Å/(ASE time unit)."""
    atoms.set_positions(snap(atoms.positions, 6))
    atoms.set_momenta(snap(atoms.get_momenta(), 7))


def paths(p: GenerateParams, a_fcc: float) -> list[Atoms]:
    r = p.paths
    frames = []
    if r.adatom_points:
        h0 = a_fcc / math.sqrt(6.0)
        for k, h in enumerate(np.linspace(h0, h0 + r.adatom_max_height, r.adatom_points)):
            slab = _slab(p.element, "111", a_fcc, p.defects.slab_size, p.defects.vacuum)
            add_adsorbate(slab, p.element, height=float(h), position="fcc")
            slab.center(vacuum=p.defects.vacuum, axis=2)
            frames.append(_tag(slab, "path_adatom", path_coordinate=float(h), path_index=k))
    if r.dimer_points:
        lo, hi = r.dimer_range
        for k, d in enumerate(np.linspace(lo, hi, r.dimer_points)):
            dimer = Atoms(f"{p.element}2", positions=[[0, 0, 0], [0, 0, float(d)]], pbc=False)
            frames.append(_tag(dimer, "path_dimer", path_coordinate=float(d), path_index=k))
    return frames


def build_dataset(p: GenerateParams) -> tuple[list[Atoms], dict]:
    """Build and label every recipe; returns (frames, metadata)."""
    rng = np.random.default_rng(p.seed)
    oracle = get_oracle(p.oracle.calculator, p.oracle.kwargs)
    structures, nn = crystals(p, oracle, rng)
    d_fcc = nn.get("fcc") or equilibrium_nn_distance(p.element, "fcc", oracle)
    a_fcc = d_fcc * math.sqrt(2.0)
    unlabelled = structures + defects(p, a_fcc, rng) + paths(p, a_fcc)
    frames = [canonical_geometry(a) for a in unlabelled + liquid(p, oracle, a_fcc, rng)]
    frames = canonical_labels(oracle.label(frames))
    for a in frames:
        a.info["source"] = p.name
        a.info.pop("adsorbate_info", None)  # ase.build's slab metadata; not a frame property
    # frame_id is not stored here: extxyz keeps 8 decimals, so ingest computes it from the file
    meta = {"oracle": oracle.name, "oracle_version": oracle.version, "fcc_lattice_constant": a_fcc,
            "nn_distance": nn}
    return frames, meta


def run(p: GenerateParams) -> dict:
    t0 = time.perf_counter()
    out = ensure_writable(RAW_DIR / f"{p.name}.extxyz", what="write", follow=False)  # tmp + rename
    frames, meta = build_dataset(p)
    write_extxyz(out, frames)
    write_manifest(out, frames, "mlipops generate")  # its oracle_* survive ingest (mlipops.frames)
    counts = Counter(a.info["config_type"] for a in frames)
    metrics = {"n_frames": len(frames), "n_atoms": int(sum(len(a) for a in frames)),
               "fcc_lattice_constant": meta["fcc_lattice_constant"],
               "wall_time_s": round(time.perf_counter() - t0, 2)}
    metrics.update({f"n_frames.{k}": v for k, v in sorted(counts.items())})
    write_metrics(REPORT_DIR, metrics)
    rows = [(k, v) for k, v in sorted(counts.items())]
    write_markdown(REPORT_DIR / "summary.md", f"Generated dataset `{p.name}`", [
        f"Oracle: `{meta['oracle']}` ({meta['oracle_version']}); element {p.element}; "
        f"fcc lattice constant {meta['fcc_lattice_constant']:.4f} Å.",
        "Equilibrium nearest-neighbour distances (Å): "
        + json.dumps({k: round(v, 4) for k, v in meta["nn_distance"].items()}),
    ], table=(("config_type", "frames"), rows))
    return metrics
