"""The one typed loader of ``params.yaml``.

Each stage reads only its own section: ``load_params(path).train`` etc. Every value is validated
on load; a bad value raises :class:`ParamsError` naming the file and the dotted key.

The file is read as plain data: at most :data:`MAX_PARAMS_BYTES`, YAML's safe subset, no duplicate key
(an error naming the key and both lines), anchors and aliases allowed but the document with every alias
expanded limited to :data:`MAX_YAML_NODES` nodes (a "billion laughs" file is refused at once); an error
quotes at most 200 characters of the file.

Paths and names (see :mod:`mlipops.paths`): a value used as a file or folder name (``generate.name``,
``bo_scan.name``, ``train.model_name``, ``evaluate.melting.sweep.config_type``) is letters, digits, ``_`` and
``-``; a folder a stage writes, moves or removes (``active.out_dir``, ``active.work_dir``,
``promote.registry_dir``) is a relative path that resolves, symlinks followed, inside ``data/``,
``registry/`` or ``reports/`` of the project root (the folder holding params.yaml); ``train.artifact_location``
lies inside the project (or is a remote store's URI). Read-only inputs (``ingest.sources``,
``evaluate.paths.files``, ``bo_scan.path.file``, ``active.model``, ``active.base_data``,
``active.base_quarantine``, ``active.index``, ``active.holdout.file``) may lie anywhere: they are never written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from mlipops.errors import ParamsError
from mlipops.paths import clip, cut, inside_error, name_error

DEFAULT_PARAMS = Path("params.yaml")
MAX_PARAMS_BYTES = 1_000_000  # params.yaml is a few kB
MAX_YAML_NODES = 200_000  # nodes of the document with every alias expanded (params.yaml: about 600)


def _name(v: str) -> str:
    err = name_error(v)
    if err:
        raise ValueError(err)
    return v


def _root(info: ValidationInfo) -> Path:
    """The project root: the folder of the params file being loaded (else the working directory)."""
    root = (info.context or {}).get("root") if isinstance(info.context, dict) else None
    return Path(root) if root is not None else Path.cwd()


def _output_dir(strict: bool):
    def check(v: str, info: ValidationInfo) -> str:
        err = inside_error(v, _root(info), writable=True, strict=strict)
        if err:
            raise ValueError(err)
        return v
    return check


def _project_path(v: str, info: ValidationInfo) -> str:
    err = inside_error(v, _root(info), writable=False)
    if err:
        raise ValueError(err)
    return v


def _artifact_location(v: str, info: ValidationInfo) -> str:
    if "://" in v and not v.lower().startswith("file:"):
        return v  # a remote artifact store (s3://, gs://, http(s)://): the user's server, not a project path
    return _project_path(v, info)


# a file or folder name: letters, digits, '_' and '-'
Name = Annotated[str, AfterValidator(_name)]
# a folder a stage writes, moves files into or out of, or removes: inside data/, registry/ or reports/
OutputDir = Annotated[str, AfterValidator(_output_dir(strict=True))]


# Tracing which params keys a command reads (MLIPOPS_PARAMS_TRACE=<folder>: tests/test_e2e.py checks each stage's
# reads against its declaration in mlipops.pipeline.STAGES): None unless tracing. "paths" maps id(section) to its
# dotted prefix, "read" collects the keys read (a scalar, list or mapping field; a whole section's dump: the
# section's key; the whole params: "*").
TRACE_ENV = "MLIPOPS_PARAMS_TRACE"
_TRACE: dict | None = None
_WHOLE = frozenset({"model_dump", "model_dump_json", "model_copy"})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def __getattribute__(self, name: str):
        t = _TRACE
        if t is None or name[0] == "_":
            return BaseModel.__getattribute__(self, name)
        prefix = t["paths"].get(id(self))
        if prefix is not None:
            field = type(self).model_fields.get(name)
            if field is not None:
                value = BaseModel.__getattribute__(self, name)
                if not isinstance(value, _Section):
                    t["read"].add(prefix + (field.alias or name))
                return value
            if name in _WHOLE:
                t["read"].add(prefix[:-1] or "*")
        return BaseModel.__getattribute__(self, name)


def trace_reads(folder: str | Path) -> None:
    """From now on, record the params keys this process reads from what :func:`load_params` returns; at exit,
    write them with the command line to ``<folder>/<pid>.json``."""
    import atexit
    import json
    import os
    import sys

    global _TRACE
    if _TRACE is not None:  # already tracing (a second load in this process): one record
        return
    _TRACE = {"paths": {}, "read": set()}

    def write():
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{os.getpid()}.json").write_text(
            json.dumps({"argv": sys.argv[1:], "read": sorted(_TRACE["read"])}))
    atexit.register(write)


def _tag(section: BaseModel, prefix: str) -> None:
    _TRACE["paths"][id(section)] = prefix
    for name, field in type(section).model_fields.items():
        value = BaseModel.__getattribute__(section, name)
        if isinstance(value, _Section):
            _tag(value, f"{prefix}{field.alias or name}.")


# --------------------------------------------------------------------------------------- generate
class OracleParams(_Section):
    calculator: str = "emt"  # "emt" or an import path "package.module.Class"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class CrystalRecipe(_Section):
    structures: list[Literal["fcc", "bcc", "sc", "diamond", "hcp"]] = ["fcc", "bcc", "sc", "diamond", "hcp"]
    isotropic_strains: list[float] = [-0.04, -0.02, 0.0, 0.02, 0.04]
    shear_strains: list[float] = [0.02, 0.04]
    rattles_per_strain: int = Field(3, ge=0)
    rattle_stdev: float = Field(0.03, ge=0.0)
    min_atoms: int = Field(24, ge=1)


class DefectRecipe(_Section):
    vacancy_cells: int = Field(4, ge=0)
    vacancy_supercell: int = Field(3, ge=2)
    slabs: list[Literal["100", "110", "111"]] = ["100", "110", "111"]
    slab_size: list[int] = [2, 2, 5]
    slab_rattles: int = Field(2, ge=0)
    vacuum: float = Field(6.0, gt=0.0)
    adatom: bool = True
    rattle_stdev: float = Field(0.05, ge=0.0)


class LiquidRecipe(_Section):
    temperature_K: float = Field(2200.0, gt=0.0)
    supercell: int = Field(3, ge=1)
    timestep_fs: float = Field(2.0, gt=0.0)
    equilibration_steps: int = Field(300, ge=0)
    snapshots: int = Field(20, ge=0)
    interval: int = Field(20, ge=1)
    friction: float = Field(0.02, gt=0.0)


class PathRecipe(_Section):
    adatom_points: int = Field(30, ge=0)
    adatom_max_height: float = Field(6.0, gt=0.0)
    dimer_points: int = Field(30, ge=0)
    dimer_range: list[float] = [1.8, 6.0]


class GenerateParams(_Section):
    name: Name = "cu_emt"  # -> data/raw/<name>.extxyz
    element: str = "Cu"
    seed: int = 0
    oracle: OracleParams = OracleParams()
    crystals: CrystalRecipe = CrystalRecipe()
    defects: DefectRecipe = DefectRecipe()
    liquid: LiquidRecipe = LiquidRecipe()
    paths: PathRecipe = PathRecipe()

    @field_validator("element")
    @classmethod
    def _known_element(cls, v: str) -> str:
        from ase.data import atomic_numbers

        if v not in atomic_numbers:
            raise ValueError(f"unknown element {v!r}")
        return v


# --------------------------------------------------------------------------------------- bo_scan
# k_B in eV/K (ase.units.kB); a literal so that the params module needs no ASE import at load time
_KB_EV = 8.617330337217213e-05
# ε_BO default: 10 k_B T at 1000 K = 0.862 eV. At a gap of gap_kT k_B T the excited state's thermal
# weight is exp(-gap_kT) (4.5e-5 for 10): below it, hot frames are no longer on one surface.
DEFAULT_BO_GAP_KT = 10.0
DEFAULT_BO_TEMPERATURE_K = 1000.0
DEFAULT_BO_GAP_EV = round(DEFAULT_BO_GAP_KT * _KB_EV * DEFAULT_BO_TEMPERATURE_K, 4)


class BoPathParams(_Section):
    """The coordinate s of a BO-aware scan: a diatomic bond length, or arc length along extxyz images."""
    kind: Literal["diatomic", "images"] = "diatomic"
    elements: list[str] = ["H", "H"]           # diatomic: the two atoms
    range: tuple[float, float] | None = None   # [s_min, s_max] Å; default diatomic [0.5, 6.0], images the whole path
    file: str | None = None                    # images: extxyz of ordered images (linear interpolation between them;
                                               # read only, may lie outside the project)
    config_type: str = "h2_dissociation"

    @field_validator("elements")
    @classmethod
    def _two_known(cls, v: list[str]) -> list[str]:
        from ase.data import atomic_numbers

        if len(v) != 2 or any(e not in atomic_numbers for e in v):
            raise ValueError(f"a diatomic needs two known elements (got {v})")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.kind == "images" and not self.file:
            raise ValueError("kind 'images' needs 'file' (an extxyz of the path's images)")
        if self.range is not None:
            lo, hi = self.range
            if not lo < hi:
                raise ValueError(f"range must be [s_min, s_max] with s_min < s_max (got {list(self.range)})")
            if self.kind == "diatomic" and lo <= 0:
                raise ValueError(f"a bond length range must be positive (got {list(self.range)})")
        return self


def _default_qc_oracle() -> "OracleParams":
    return OracleParams(calculator="pyscf", kwargs={"basis": "sto-3g", "method": "casscf", "active_space": [2, 2],
                                                    "n_states": 2, "states": "same_ms"})


class BoScanParams(_Section):
    """Born-Oppenheimer-aware sampling along a path (:mod:`mlipops.generate.bo_aware`)."""
    name: Name = "h2"                    # -> data/raw/bo_scan_<name>.extxyz, source bo_scan_<name>
    oracle: OracleParams = Field(default_factory=_default_qc_oracle)
    path: BoPathParams = BoPathParams()
    coarse_points: int = Field(12, ge=3)           # the first, uniform grid
    resolution: float = Field(0.01, gt=0.0)        # Å: crossings of ε bisected down to this width
    gap_tolerance_eV: float = Field(0.1, gt=0.0)   # eV: refine where linear interpolation of the gap errs more
    max_oracle_calls: int = Field(400, ge=3)       # a guard on the scan
    target_temperature_K: float = Field(DEFAULT_BO_TEMPERATURE_K, gt=0.0)
    gap_kT: float = Field(DEFAULT_BO_GAP_KT, gt=0.0)  # ε_BO = gap_kT k_B T_target ...
    epsilon_eV: float | None = Field(None, gt=0.0)    # ... unless given here (eV)
    margin: float = Field(0.1, ge=0.0)             # Å kept free of training frames before each region
    min_spacing: float = Field(0.02, gt=0.0)       # Å between training frames where the gap is at ε
    max_spacing: float = Field(0.25, gt=0.0)       # Å between training frames far from the cliff
    spacing_per_eV: float = Field(0.1, gt=0.0)     # Å of spacing per eV of gap above ε
    breakdown_frames: int = Field(4, ge=1)         # frames sampled inside each region (labelled bo_breakdown)

    @property
    def epsilon(self) -> float:
        """ε_BO in eV."""
        if self.epsilon_eV is not None:
            return float(self.epsilon_eV)
        return float(self.gap_kT * _KB_EV * self.target_temperature_K)

    @model_validator(mode="after")
    def _consistent(self):
        if self.margin < self.resolution:
            raise ValueError(f"margin ({self.margin} Å) must be at least the resolution ({self.resolution} Å): "
                             "the region's start is only known to within the resolution")
        if self.min_spacing > self.max_spacing:
            raise ValueError(f"min_spacing ({self.min_spacing}) exceeds max_spacing ({self.max_spacing})")
        return self


# ----------------------------------------------------------------------------------------- ingest
_SOURCE_FORMATS = ("auto", "extxyz", "db", "mlearn_json")  # mlipops' own readers (and auto detection)
_NOT_FILE_FORMATS = ("postgresql", "mysql", "bundletrajectory")  # ase.io names that are no file to read


class SourceParams(_Section):
    path: str  # read only: may lie outside the project (a shared dataset)
    # auto (extxyz, ASE database, mlearn JSON by content; else ASE's detection by name, content, suffix:
    # .traj, vasprun.xml, OUTCAR, QE .pwo/.out), one of mlipops' readers, or any format ase.io reads
    # (`ase info --formats`: traj, vasp-xml, vasp-out, espresso-out, lammps-dump-text, cif, ...)
    format: str = "auto"
    config_type: str | None = None  # used where a frame has none
    # train: its frames are train/val (val_fraction of them); test: all test (the held-out test file);
    # auto: ingest.split's rule. A split written in the file itself is never used (provenance).
    split: Literal["train", "test", "auto"] = "auto"
    # the stress in another info field (extxyz: e.g. mlearn's virial_stress_kbar), converted to ASE's
    # (eV/Å³, tensile positive, Voigt xx yy zz yz xz xy) from its units, sign (pressure_positive: VASP's
    # and mlearn's, compressive = positive) and, for 6 numbers, order (vasp: xx yy zz xy yz zx)
    stress_key: str | None = None
    stress_units: Literal["eV/A3", "kbar", "GPa"] = "eV/A3"
    stress_sign: Literal["ase", "pressure_positive"] = "ase"
    stress_order: Literal["ase", "vasp"] = "ase"

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v in _SOURCE_FORMATS:
            return v
        from ase.io.formats import ioformats

        io = ioformats.get(v)
        if v in _NOT_FILE_FORMATS:
            raise ValueError(f"format {v!r} reads a database server or a directory, not a file")
        if io is None:
            raise ValueError(f"unknown format {clip(v)}: auto, extxyz, db, mlearn_json or a format ase.io reads "
                             "(traj, vasp-xml, vasp-out, espresso-out, lammps-dump-text, ...; `ase info --formats`)")
        if not io.can_read:
            raise ValueError(f"format {v!r} ({io.description}) is one ase.io can write but not read")
        return v

    @model_validator(mode="after")
    def _stress(self) -> "SourceParams":
        # a value other than the default without a key is a mistake; the defaults themselves are harmless (a dumped
        # Params carries every field, and must validate again)
        unused = sorted(k for k in ("stress_units", "stress_sign", "stress_order")
                        if getattr(self, k) != type(self).model_fields[k].default)
        if self.stress_key is None and unused:
            raise ValueError(f"{', '.join(unused)} given without stress_key (the info field holding the stress)")
        return self


# the embedded copper dataset's held-out config_types (generate's defects and paths): ingest.split.test_config_types
# and validate.expected_test_config_types (one anchor in params.yaml)
DEFAULT_TEST_CONFIG_TYPES = ("vacancy", "surface_100", "surface_110", "surface_111", "adatom", "path_adatom",
                             "path_dimer")


class SplitParams(_Section):
    method: Literal["config_type", "random"] = "config_type"
    test_config_types: list[str] = Field(default_factory=lambda: list(DEFAULT_TEST_CONFIG_TYPES))
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0
    # every config_type split by the fractions that has at least 3 frames gets at least this many in val and in
    # test (the training draws nearest to the val/test cut move there): a per-config_type gate is never left
    # without frames by the luck of the draw (20 liquid frames at 10 %: no test frame for 12 % of the seeds)
    min_per_config_type: int = Field(1, ge=0)
    # config_type -> fraction of its would-be training and validation frames kept (stable hash draw); the rest
    # get split "unused": indexed (their γ counts), never trained on nor used for early stopping. Sweeps, e.g.
    # `dvc exp run -S ingest.split.keep_in_train.liquid=0`.
    keep_in_train: dict[str, float] = Field(default_factory=dict)

    @field_validator("keep_in_train")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        for ct, f in v.items():
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"keep_in_train.{ct} must be a fraction in [0, 1] (got {f})")
        return v


class IngestParams(_Section):
    sources: list[SourceParams] = Field(min_length=1)
    split: SplitParams = SplitParams()


# --------------------------------------------------------------------------------------- validate
# Per-composition energy window: VASP/PBE-like total energies per atom of solids lie in about
# [-14, 0] eV/atom (W -13.0, Mo -10.9, Cu -3.7, Li -1.9) and EMT's in [0, 4]; compressed or
# short-distance configurations rise a few eV above. [-20, 5] keeps all of those and still rejects
# a factor-10 error, eV->kcal/mol (x23) on any |E| > 0.9 eV/atom, or an all-electron total energy
# (thousands of eV/atom), which needs its own composition key.
DEFAULT_ENERGY_PER_ATOM_RANGE = (-20.0, 5.0)
_COMPOSITION_KEY = re.compile(r"[A-Z][a-z]?")


def composition_key(symbols) -> str:
    """The energy_per_atom_range key of a frame: its distinct elements, alphabetical, no counts."""
    return "".join(sorted(set(symbols)))


class OutlierParams(_Section):
    """Cook's-distance outliers of the training split (``mlipops.quality.outliers``)."""
    enabled: bool = True
    training_split: str = "train"
    cooks_threshold: float | None = Field(None, gt=0.0)  # None: 4/n
    energy_residual_threshold: float = Field(12.0, gt=0.0)  # robust t of the energy per atom
    force_residual_threshold: float = Field(25.0, gt=0.0)  # robust t of a force component
    forces: bool = True
    max_rounds: int = Field(5, ge=1, le=50)
    # frame-level force tests, thresholds in robust standard deviations (log scale) into the upper
    # tail of the frame statistic over the frames of the same config_type (None: test off)
    frame_z_threshold: float | None = Field(5.0, gt=0.0)  # χ² per force component / expected level
    atom_z_threshold: float | None = Field(4.0, gt=0.0)  # largest per-atom χ² / the frame's level
    frame_min_relative_residual: float = Field(0.25, ge=0.0)  # Σ|F − F̂|² / Σ|F̂|² a frame flag needs
    min_group_frames: int = Field(5, ge=2)  # a config_type with fewer frames is judged against all frames
    energy_gross_threshold: float | None = Field(200.0, gt=0.0)  # robust t (robust fit): out of the first fit


class ValidateParams(_Section):
    allowed_species: list[str]
    min_interatomic_distance: float = Field(1.5, gt=0.0)
    max_abs_force: float = Field(50.0, gt=0.0)  # eV/Å, largest per-atom force norm |F_i|
    # eV/atom, [low, high] by composition key ("Cu", "LiMo": elements in alphabetical order, no
    # counts); "default" covers every composition without its own key (filled in when omitted)
    energy_per_atom_range: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {"default": DEFAULT_ENERGY_PER_ATOM_RANGE})
    # eV/Å, largest |sum_i F_i| (translation invariance) on every frame with forces
    net_force_tolerance: float = Field(0.05, gt=0.0)
    # Å, how far an atom may lie outside the cell along a non-periodic direction with a cell vector
    box_margin: float = Field(5.0, ge=0.0)
    # config_types the test split must contain (a dataset-level check: warned, never quarantined)
    expected_test_config_types: list[str] = Field(default_factory=lambda: list(DEFAULT_TEST_CONFIG_TYPES))
    # eV: a frame whose ΔE₀₁ = E₁ − E₀ (info bo_gap, from an oracle with excited states) is below
    # max(this, the frame's own bo_epsilon), or that its generator flagged bo_breakdown, is quarantined
    # with check bo_breakdown (no single surface to fit). Frames without a gap are not affected.
    bo_gap_min_eV: float = Field(DEFAULT_BO_GAP_EV, ge=0.0)
    outliers: OutlierParams = OutlierParams()

    @field_validator("energy_per_atom_range")
    @classmethod
    def _energy_ranges(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        from ase.data import atomic_numbers

        for key, (low, high) in v.items():
            if key != "default":
                elements = _COMPOSITION_KEY.findall(key)
                if "".join(elements) != key or any(e not in atomic_numbers for e in elements) \
                        or elements != sorted(set(elements)):
                    raise ValueError(f"key {key!r} is not a composition: write its elements in "
                                     "alphabetical order without counts (e.g. 'Cu', 'LiMo') or use 'default'")
            if not low < high:
                raise ValueError(f"range of {key!r} must be [low, high] with low < high (got [{low}, {high}])")
        return {"default": DEFAULT_ENERGY_PER_ATOM_RANGE} | dict(v)


# ------------------------------------------------------------------------------------------ index
class IndexParams(_Section):
    coordination_cutoff: float = Field(2.8, gt=0.0)
    pca_components: int = Field(5, ge=1, le=6)  # k of the descriptor-space hull (qhull cost explodes above 6)
    training_split: str = "train"  # the split whose atoms span the hull


# ----------------------------------------------------------------------------------- model size caps
# The size a model may have, for params.yaml (checked here) and for a model folder's config.json
# (mlipops.models.schema): one place for both.
MAX_PARAMETERS = 50_000_000     # network parameters and buffers of all members together
MAX_MEMBERS = 64
MAX_LAYERS = 16
MAX_BASIS = 256                 # radial / angular basis functions
MAX_CUTOFF_A = 50.0             # Å, descriptor and dispersion cutoffs
MAX_ANGULAR_ORDER = 4


def parameter_count(species: int, descriptor: dict, hidden: list[int], n_members: int = 1) -> int:
    """Numbers a model of this configuration holds (network weights and biases, feature
    standardization, reference energies; descriptor index buffers), from the config alone."""
    pairs = species * (species + 1) // 2
    n_rad, n_ang, max_l = (descriptor.get(k, v) for k, v in (("n_radial", 8), ("n_angular", 4), ("max_l", 3)))
    nf = species * n_rad + pairs * n_ang * (max_l + 1)
    mlp, n_in = 0, nf
    for h in [*hidden, 1]:
        mlp += n_in * h + h
        n_in = h
    return n_members * (species * mlp + 2 * nf + species) + 2 * pairs


# -------------------------------------------------------------------------------------- crystal
Lattice = Literal["fcc", "bcc", "hcp", "diamond", "sc"]


class CrystalParams(_Section):
    """The crystal the structure-building stages (nve's hot crystal, the defects control's vacancy cells and
    slabs, active learning's starting structures) build from (:func:`mlipops.crystal.resolve`). A null is
    filled from the curated training data: ``element`` its species (one), ``lattice`` the classified lattice of
    its lowest-energy periodic frames, ``a`` their volume per atom."""
    element: str | None = None
    lattice: Lattice | None = None
    a: float | None = Field(None, gt=0.0)  # Å, conventional cubic cell (hcp: basal plane)
    c: float | None = Field(None, gt=0.0)  # Å, hcp only; null: ideal c/a = √(8/3)


# ------------------------------------------------------------------------------------ descriptors
class DescriptorParams(_Section):
    # the caps are those a model folder's config.json is held to (mlipops.models.schema)
    cutoff: float = Field(5.0, gt=0.0, le=MAX_CUTOFF_A)
    n_radial: int = Field(8, ge=1, le=MAX_BASIS)
    r_min: float = Field(0.8, ge=0.0)
    angular_cutoff: float = Field(4.0, gt=0.0, le=MAX_CUTOFF_A)
    n_angular: int = Field(4, ge=0, le=MAX_BASIS)
    max_l: int = Field(3, ge=0, le=MAX_ANGULAR_ORDER)

    @field_validator("angular_cutoff")
    @classmethod
    def _angular_within(cls, v: float, info) -> float:
        cutoff = info.data.get("cutoff")
        if cutoff is not None and v > cutoff:
            raise ValueError(f"angular_cutoff ({v}) must not exceed cutoff ({cutoff})")
        return v


# ------------------------------------------------------------------------------------------ train
class EnsembleParams(_Section):
    members: int = Field(5, ge=1, le=MAX_MEMBERS)  # M potentials differing in seed (seed + k) and bootstrap resample
    bootstrap: bool = True             # member k > 0 trains on a resample (with replacement) of the train split


class DispersionParams(_Section):
    """Grimme D2 pair term added to the network (see mlipops.models.dispersion)."""
    enabled: bool = False
    s6: float = Field(0.75, gt=0.0)            # global scaling (0.75 for PBE)
    damping: float = Field(20.0, gt=0.0)       # d of the Fermi damping
    cutoff: float = Field(12.0, gt=0.0, le=MAX_CUTOFF_A)  # Å, far beyond the network's cutoff
    switch_width: float = Field(2.0, gt=0.0)   # Å over which the term is switched off before the cutoff
    c6: dict[str, float] = Field(default_factory=dict)  # J nm^6 mol^-1 per element (default: Grimme's table)
    r0: dict[str, float] = Field(default_factory=dict)  # Å per element (default: Grimme's table)


class BaselineParams(_Section):
    """Δ-learning: the network learns E_ref - E_baseline (see mlipops.models.baseline)."""
    calculator: str | None = None      # null: off; emt | lj | morse | package.module.Class (any ASE calculator)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class CurriculumPhase(_Section):
    """One phase of curriculum training; unset fields take the final model's value."""
    epochs: int = Field(ge=1)
    cutoff: float | None = Field(None, gt=0.0, le=MAX_CUTOFF_A)  # Å (default: descriptors.cutoff)
    angular_cutoff: float | None = Field(None, gt=0.0)   # Å (default: min(descriptors.angular_cutoff, cutoff))
    hidden: list[int] | None = None                      # default: train.hidden
    learning_rate: float | None = Field(None, gt=0.0)    # default: train.learning_rate


def growth_error(old: list[int], new: list[int]) -> str | None:
    """Why ``old`` hidden widths cannot grow into ``new`` keeping the learnt function, or None.

    Layers may widen (new units start with zero output) and layers may be appended after the last
    one if each is at least twice as wide as the layer before it (it starts as an exact identity,
    SiLU(x) - SiLU(-x) = x, on the first 2x its units)."""
    if len(new) < len(old):
        return f"hidden {new} has fewer layers than the previous phase's {old}"
    for k, (a, b) in enumerate(zip(old, new)):
        if b < a:
            return f"layer {k} narrows from {a} to {b} units (layers may only widen)"
    for k in range(max(len(old), 1), len(new)):
        if new[k] < 2 * new[k - 1]:
            return (f"appended layer {k} has {new[k]} units; it must have at least 2 x {new[k - 1]} (the layer "
                    "before it) to start as an identity")
    return None


class TrainParams(_Section):
    model_name: Name = "cu"  # -> data/models/<model_name>, data/checkpoints/<model_name>, registry/<model_name>
    seed: int = 0
    hidden: list[int] = [32, 32]
    epochs: int = Field(400, ge=1)
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(3e-3, gt=0.0)
    optimizer: Literal["adam", "adamw"] = "adam"
    scheduler: Literal["cosine", "plateau", "none"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    # loss w_E <(ΔE/N)²> + w_F <ΔF²>: at 1 / 10 the forces outweigh DFT energies; 30 / 10 gave mlearn Mo a test
    # energy MAE of 4.0 instead of 12.9 meV/atom at the same force error (benchmarks/bench_energy_weight.py)
    energy_weight: float = Field(30.0, ge=0.0)
    force_weight: float = Field(10.0, ge=0.0)
    stress_weight: float = Field(0.0, ge=0.0)  # on frames that carry a stress (eV/Å³, Voigt)
    patience: int | None = Field(40, ge=1)  # early stopping: epochs without validation improvement (None: off)
    checkpoint_every: int = Field(5, ge=1)     # epochs between checkpoints (resume after a kill)
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present
    # train on fixed descriptors and their exact Jacobians, computed once (same numbers, 4-8x faster;
    # off: differentiate the descriptor in every step, for data whose Jacobians would not fit in memory)
    precompute_descriptors: bool = True
    ensemble: EnsembleParams = EnsembleParams()
    dispersion: DispersionParams = DispersionParams()
    baseline: BaselineParams = BaselineParams()
    # curriculum training: phases trained in order, each warm-started from the previous one (empty: off;
    # then `epochs` above is unused, each phase has its own). The last phase is the final model.
    curriculum: list[CurriculumPhase] = Field(default_factory=list)
    experiment: str = "mlipops"
    tracking_uri: str = "sqlite:///mlflow.db"
    # MLflow's artifact folder: inside the project (relative), or a remote store's URI (s3://...)
    artifact_location: Annotated[str, AfterValidator(_artifact_location)] = "mlartifacts"

    @model_validator(mode="after")
    def _curriculum_grows(self):
        if not self.curriculum:
            return self
        widths = [ph.hidden if ph.hidden is not None else self.hidden for ph in self.curriculum]
        if widths[-1] != self.hidden:
            raise ValueError(f"the last curriculum phase is the final model: its hidden {widths[-1]} must equal "
                             f"train.hidden {self.hidden} (or be left out)")
        for k in range(1, len(widths)):
            err = growth_error(widths[k - 1], widths[k])
            if err:
                raise ValueError(f"curriculum phase {k}: {err}")
        return self


# ---------------------------------------------------------------------------------------- compute
class ComputeParams(_Section):
    scheduler_address: str | None = None  # a running Dask scheduler (tcp://host:8786); null: a LocalCluster
    n_workers: int | None = Field(None, ge=1)  # LocalCluster workers; null: min(tasks, CPU cores)
    threads_per_worker: int = Field(1, ge=1)  # torch threads per worker


# --------------------------------------------------------------------------------------- evaluate
class PathParams(_Section):
    """Reaction coordinates followed to the point where the model leaves its training hull."""
    config_types: list[str] = ["path_dimer", "path_adatom"]  # curated frames of these config_types, one path each,
                                                             # ordered by info reaction_coordinate (or path_coordinate)
    files: list[str] = []             # user paths (read only, may lie outside the project): extxyz of ordered,
                                      # labelled frames with info reaction_coordinate
    tolerance_per_atom: float = Field(0.010, gt=0)  # eV/atom: |E_model - E_ref|/N beyond this is the tolerance point
    sigma_k: float = Field(2.0, gt=0)  # the ensemble "rose" where sigma_k * σ_E/N reaches the tolerance


class DefectParams(_Section):
    """Trained on perfect crystals, tested on imperfect ones: the error diagnosed (coordination vs angles)."""
    perfect_config_types: list[str] = ["crystal_fcc", "crystal_bcc", "crystal_sc", "crystal_diamond", "crystal_hcp"]
    imperfect_config_types: list[str] = ["vacancy", "surface_100", "surface_110", "surface_111", "adatom"]
    perfect_max_temperature_K: float | None = None  # perfect frames hotter than this are left out (MD snapshots)
    epochs: int = Field(300, ge=1)    # each of the two single potentials (perfect-only, control)
    control: Literal["recipes", "held_out", "none"] = "recipes"
    # recipes: the recommended structures are generated and labelled by generate.oracle (rattled vacancy
    #          cells, a rattled slab); held_out: a deterministic half of the imperfect frames is added to
    #          training instead and the other half is the test (real DFT data without an oracle)
    control_vacancy_cells: int = Field(4, ge=0)
    control_slabs: int = Field(3, ge=0)
    # slab orientations of the control (mlipops.crystal.miller_indices: three digits, hcp also 0001); None: hcp
    # 0001/100/010 (basal and prism planes of the orthorhombic cell), other lattices generate.defects.slabs
    control_slab_millers: list[Annotated[str, Field(pattern=r"^([0-9]{3}|0001)$")]] | None = None
    control_rattle_stdev: float = Field(0.08, gt=0)  # Å; larger than the test defects' (distorted angles)
    control_seed: int = 1234


class UncertaintyParams(_Section):
    """Ensemble σ against the errors: ranking, calibration, a recalibration scale fitted on validation."""
    min_spearman: float = Field(0.3, ge=-1, le=1)  # promotion fails when ρ(σ_F, |ΔF|) on validation is below


class FiniteSize(_Section):
    """The finite-size systematic of a preset's cell, as measured (``bench_melting_size.py``) and where."""
    bias_K: float  # Tm(this cell) − Tm(largest cell studied)
    error_K: float = Field(ge=0)  # its standard error
    source: str  # what was measured: calculator, element, lattice, cells, seeds


class MeltingPreset(_Section):
    """Sizes of the coexistence runs (:mod:`mlipops.evaluate.melting`)."""
    supercell: tuple[int, int, int] = (4, 4, 8)  # conventional cells; z split solid | liquid
    melt_steps: int = Field(150, ge=0)
    equilibration_steps: int = Field(200, ge=0)  # NPH: the cell relaxes at coexistence
    production_steps: int = Field(600, ge=20)  # NVE: Tm = <T> over its late window
    max_production_steps: int | None = Field(900, ge=20)  # extended up to it while the window drifts; None: 2x
    reference_seeds: int = Field(2, ge=1)  # independent seeds with the reference oracle (each: 2 starts)
    member_seeds: int = Field(1, ge=1)  # independent seeds per ensemble member (each: 2 starts)
    # a seed whose two starts disagree: rejected (true), or kept as a bracket, mean ± half the gap (false)
    require_agreement: bool = False
    # this cell's Tm minus that of the largest cell of a finite-size study (benchmarks/bench_melting_size.py): a
    # systematic the report states (not applied); None: not measured
    finite_size: FiniteSize | None = None


class MeltingSweepParams(_Section):
    """Tm against liquid coverage: `mlipops evaluate melting-sweep` runs one `dvc exp` per fraction."""
    config_type: Name = "liquid"  # the frames whose share of training is swept (names the `dvc exp`s)
    fractions: list[float] = [0.0, 0.25, 1.0]  # ingest.split.keep_in_train.<config_type>

    @field_validator("fractions")
    @classmethod
    def _in_unit_interval(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= f <= 1.0 for f in v):
            raise ValueError(f"fractions must be a non-empty list of values in [0, 1] (got {v})")
        return v


class MeltingBracketParams(_Section):
    """`mlipops evaluate melting-bracket` (on demand, not in `dvc repro`): the interface-velocity method
    (:mod:`mlipops.evaluate.melting_bracket`), NPT at fixed temperatures, the reference oracle's Tm bracketed."""
    temperatures: list[float] = [-150.0, -100.0, -50.0, 0.0, 50.0, 100.0, 150.0]  # K, one run each
    absolute: bool = False  # false: offsets from evaluate.melting.t_guess; true: the temperatures themselves
    supercell: tuple[int, int, int] = (4, 4, 8)  # conventional cells; z split solid | liquid
    melt_steps: int = Field(200, ge=0)  # the liquid half's melt (as the coexistence cell's)
    relax_steps: int = Field(200, ge=0)  # NPT, all cell lengths free: the solid's lateral lattice at T
    steps: int = Field(1600, ge=10)  # NPT, barostat on z only: the growth rate is fitted over these
    sample_interval: int = Field(10, ge=1)
    taut_fs: float = Field(100.0, gt=0)  # Berendsen thermostat
    taup_fs: float = Field(100.0, gt=0)  # Berendsen barostat (z relaxes with 3 taup_fs)
    fit_window_K: float | None = Field(None, gt=0)  # points this close to the first fit's Tm; None: all unsaturated
    seed: int = 0


class MeltingReference(_Section):
    """A given reference melting point (K) with its standard uncertainty (K) and where it comes from, instead of
    an oracle run (a DFT user cannot run DFT coexistence here): e.g. ``{tm_K: 2896, uncertainty_K: 10,
    source: "experiment (CRC Handbook)"}`` for Mo."""
    tm_K: float = Field(gt=0)
    uncertainty_K: float = Field(ge=0)
    source: str = Field(min_length=1)

    @field_validator("source")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("`source` must say where the value comes from")
        return v.strip()


class MeltingParams(_Section):
    """Melting point by solid-liquid coexistence for the reference oracle and each ensemble member."""
    preset: Literal["quick", "production"] = "quick"
    quick: MeltingPreset = MeltingPreset()
    production: MeltingPreset = MeltingPreset(supercell=(4, 4, 8), melt_steps=200, equilibration_steps=400,
                                              production_steps=2000, max_production_steps=4000, reference_seeds=4,
                                              member_seeds=3)
    element: str | None = None  # None: generate.element (see melting_reference.melting_crystal)
    lattice: Literal["fcc", "bcc", "hcp", "diamond", "sc"] | None = None  # None: the element's ASE reference state
    t_guess: float = Field(1300.0, gt=0)  # K, start guess for every run (the reference's Tm is not used)
    timestep_fs: float = Field(5.0, gt=0)
    window_K: float = Field(150.0, gt=0)  # P(|Tm - Tm_ref| <= window)
    # averaged q_l above this: solid-like; None: calibrated per run from the model's own solid and liquid
    q6_solid_threshold: float | None = Field(None, gt=0, lt=1)
    calibration_steps: int = Field(100, ge=2)  # MD steps of the pure solid and pure liquid that calibrate it
    # start volume of the liquid half relative to the solid half, minus 1 (signed); the NPH equilibration relaxes it
    liquid_volume_change: float = Field(0.09, gt=-0.5, lt=1.0)
    min_phase_fraction: float = Field(0.15, ge=0, lt=0.5)
    max_retries: int = Field(2, ge=0)
    retry_step_K: float | None = Field(None, gt=0)  # None: 0.115 x t_guess (melting.RETRY_STEP_FRACTION)
    ensemble: Literal["nve", "nph"] = "nph"  # production; nph: Berendsen barostat on z (the interface normal) only
    window_fraction: float = Field(0.5, gt=0, le=1)  # Tm from this last share of production
    drift_sigma: float = Field(2.0, gt=0)  # converged: |drift over the window| <= this x its standard error
    start_offset: float = Field(0.05, ge=0, lt=0.5)  # each seed starts at t_guess (1 ± this): above and below
    agree_sigma: float = Field(2.0, gt=0)  # a seed's two starts must agree within this x their combined error
    phase_steps: int = Field(400, ge=20)  # pure solid / pure liquid NPT MD at Tm_ref: latent heat, snapshots
    phase_snapshots: int = Field(10, ge=1)  # labelled frames per phase from the second half of each run
    reference: MeltingReference | None = None  # a given Tm_ref; None: the oracle's coexistence runs
    seed: int = 0
    sweep: MeltingSweepParams = MeltingSweepParams()
    bracket: MeltingBracketParams = MeltingBracketParams()

    @field_validator("element")
    @classmethod
    def _known_element(cls, v: str | None) -> str | None:
        from ase.data import atomic_numbers

        if v is not None and v not in atomic_numbers:
            raise ValueError(f"unknown element {v!r}")
        return v

    def settings(self, element: str, lattice: str | None = None, seed_offset: int = 0):
        """The :class:`CoexistenceSettings` of the selected preset for ``element`` in ``lattice`` (default:
        ``self.lattice``, else fcc)."""
        from mlipops.evaluate.melting import CoexistenceSettings

        pr = getattr(self, self.preset)
        return CoexistenceSettings(
            element=element, lattice=lattice or self.lattice or "fcc", supercell=tuple(pr.supercell),
            t_guess=self.t_guess, timestep_fs=self.timestep_fs, melt_steps=pr.melt_steps,
            equilibration_steps=pr.equilibration_steps, production_steps=pr.production_steps,
            q6_solid_threshold=self.q6_solid_threshold, calibration_steps=self.calibration_steps,
            liquid_volume_change=self.liquid_volume_change, min_phase_fraction=self.min_phase_fraction,
            max_retries=self.max_retries, retry_step_K=self.retry_step_K, seed=self.seed + seed_offset,
            max_production_steps=pr.max_production_steps, ensemble=self.ensemble, window_fraction=self.window_fraction,
            drift_sigma=self.drift_sigma, start_offset=self.start_offset, agree_sigma=self.agree_sigma,
            require_agreement=pr.require_agreement).validate()


class NveParams(_Section):
    """`mlipops evaluate nve`: energy conservation of the trained model in a short NVE run."""
    element: str | None = None  # null: the crystal section's (resolved from the data)
    structure: Lattice | None = None  # null: the crystal section's lattice (resolved from the data)
    supercell: int = Field(3, ge=1)  # repeats of the conventional cell (fcc: 4 N^3 atoms, bcc 2 N^3, diamond 8 N^3)
    temperature_K: float = Field(1000.0, gt=0)  # Maxwell-Boltzmann at 2 T, equipartition -> about T
    timestep_fs: float = Field(2.0, gt=0)
    steps: int = Field(500, ge=10)
    discard_fs: float = Field(100.0, ge=0)  # start-up transient left out of the drift fit
    skin: float = Field(1.0, ge=0)  # Å, Verlet skin of the model's neighbour list
    reference: bool = True  # the same run with the reference oracle (generate.oracle): the time step's own drift
    seed: int = 0


class EvaluateParams(_Section):
    splits: list[Literal["train", "val", "test"]] = ["val", "test"]
    uncertainty: UncertaintyParams = UncertaintyParams()
    paths: PathParams = PathParams()
    defects: DefectParams = DefectParams()
    melting: MeltingParams = MeltingParams()
    nve: NveParams = NveParams()


# ---------------------------------------------------------------------------------------- promote
class GateBound(_Section):
    """A gate's bound: the metric must be ≤ ``max`` and/or ≥ ``min``; or the gate is declared not applicable
    to this project, with the reason (``not_applicable``: neither passed nor failed, shown as n/a)."""
    max: float | None = None
    min: float | None = None
    not_applicable: str | None = None

    @model_validator(mode="after")
    def _one_bound(self):
        if self.not_applicable is not None:
            if not self.not_applicable.strip():
                raise ValueError("`not_applicable` needs the reason (a non-empty string)")
            if self.max is not None or self.min is not None:
                raise ValueError("a gate is either bounded (`max`/`min`) or `not_applicable`, not both")
        elif self.max is None and self.min is None:
            raise ValueError("a gate needs `max` or `min` (or `not_applicable: <reason>`)")
        return self


class PromoteParams(_Section):
    """``gates``: ``"[report:]metric": max`` or ``{max: x}`` / ``{min: x}`` / ``{not_applicable: reason}``.
    ``report`` is a folder of reports/evaluate/ (defects, melting, nve, uncertainty; none:
    reports/evaluate/metrics.json); a ``*`` in the metric matches one dotted part (a config_type), giving one
    gate per matching key."""
    gates: dict[str, GateBound] = Field(default_factory=dict)
    # written (versions, index.json, its lock): a relative path inside data/, registry/ or reports/
    registry_dir: Annotated[str, AfterValidator(_output_dir(strict=False))] = "registry"

    @field_validator("gates", mode="before")
    @classmethod
    def _numbers_are_max(cls, v):
        if isinstance(v, dict):
            return {k: {"max": b} if isinstance(b, (int, float)) and not isinstance(b, bool) else b
                    for k, b in v.items()}
        return v


# --------------------------------------------------------------------------------------- active
def _positive_temperatures(v: list[float]) -> list[float]:
    if not v or any(t <= 0 for t in v):
        raise ValueError("temperatures_K must be a non-empty list of positive temperatures")
    return v


Temperatures = Annotated[list[float], AfterValidator(_positive_temperatures)]  # K, a ramp in order


class ActiveStructure(_Section):
    """A starting structure of the active-learning MD, built from the crystal (:mod:`mlipops.crystal`: the
    ``crystal`` section, ``active.element`` where set, nulls from the data): ``bulk`` (the conventional cell
    repeated ``supercell`` times), ``vacancy`` (the same, first atom removed) or ``surface`` (a ``miller``
    slab of ``layers`` atomic planes, ``supercell`` × ``supercell`` surface cells, ``vacuum`` Å each side:
    :func:`mlipops.crystal.slab`). ``lattice`` null: the crystal's; another lattice: at the crystal's density."""
    kind: Literal["bulk", "vacancy", "surface"] = "bulk"
    lattice: Lattice | None = None
    supercell: int = Field(2, ge=1)
    miller: Annotated[str, Field(pattern=r"^([0-9]{3}|0001)$")] = "111"  # three digits; hcp also 0001 (basal)
    layers: int = Field(4, ge=2)
    vacuum: float = Field(6.0, gt=0)


class ActiveMdParams(_Section):
    """MD with the committee: ``langevin`` (NVT) or ``nve``; each structure runs through
    ``temperatures_K`` in order (a heating ramp), ``steps_per_temperature`` steps each."""
    dynamics: Literal["langevin", "nve"] = "langevin"
    temperatures_K: Temperatures = [600.0, 1200.0, 1800.0]
    steps_per_temperature: int = Field(50, ge=1)
    timestep_fs: float = Field(2.0, gt=0)
    friction: float = Field(0.02, gt=0)  # 1/fs, Langevin
    checkpoint_every: int = Field(10, ge=1)  # steps between persisted MD snapshots


class ActiveRetrainParams(_Section):
    """Retraining between iterations: every member warm-started from its weights of the last iteration
    (same architecture, standardisation and reference energies), on the curated data grown by the
    iteration's labels. Loss weights, batch size, optimizer and bootstrap come from ``train``."""
    enabled: bool = True
    epochs: int = Field(60, ge=1)
    learning_rate: float = Field(0.001, gt=0)  # below train.learning_rate: a warm start, not a fresh fit
    patience: int | None = Field(20, ge=1)


class ActiveHoldoutParams(_Section):
    """The fixed held-out trajectory every iteration's model is scored on: the oracle's own Langevin MD
    of ``structures`` through ``temperatures_K`` (the last one above melting gives a liquid part), a frame
    every ``sample_every`` steps. Generated once (``<work_dir>/holdout.extxyz``) and never trained on."""
    enabled: bool = True
    file: str | None = None  # an extxyz with reference labels instead of generating one (read only: anywhere)
    structures: list[ActiveStructure] = [ActiveStructure(kind="bulk"), ActiveStructure(kind="surface", supercell=3)]
    temperatures_K: Temperatures = [800.0, 1600.0, 3000.0]
    steps_per_temperature: int = Field(150, ge=1)
    sample_every: int = Field(10, ge=1)
    timestep_fs: float = Field(2.0, gt=0)
    friction: float = Field(0.02, gt=0)
    seed: int = 2026


class ActiveParams(_Section):
    """The active-learning loop (``mlipops active run``): committee MD, trigger, de-duplication, oracle."""
    model: str | None = None  # model directory or NAME@alias; default data/models/<train.model_name>
    element: str | None = None  # null: the crystal section's (resolved from the data)
    iterations: int = Field(2, ge=1)
    mode: Literal["projected", "force", "gamma", "random"] = "projected"
    sigma_projected_eV: float = Field(0.002, gt=0)  # σ of the energy change of the next step (eV)
    sigma_force_eVA: float = Field(0.1, gt=0)  # DP-GEN trust level on max_i σ_F,i (eV/Å)
    gamma_max: float = Field(2.0, gt=0)  # hull extrapolation grade bound
    index: str | None = "data/index.duckdb"  # hull for γ (candidates; every step in mode gamma); null: none
    structures: list[ActiveStructure] = [ActiveStructure(kind="bulk"), ActiveStructure(kind="vacancy"),
                                         ActiveStructure(kind="surface")]
    md: ActiveMdParams = ActiveMdParams()
    dedup_min_distance: float = Field(0.05, ge=0)  # RMS descriptor-fingerprint distance
    max_batch: int = Field(16, ge=1)  # frames labelled per iteration
    retries: int = Field(2, ge=0)
    backoff_s: float = Field(1.0, ge=0)
    timeout_s: float = Field(600.0, gt=0)
    # written (and archived: moved into work_dir/archive/): relative folders below data/, registry/ or reports/
    out_dir: OutputDir = "data/raw/active"  # active_<iteration>.extxyz (a DVC-tracked output of the active stage)
    work_dir: OutputDir = "data/active"  # state.json, snapshots, candidates, label files, curated data, models
    seed: int = 0
    # read only (model, index, base_data, base_quarantine): they may lie anywhere, they are never written
    base_data: str | None = "data/curated/accepted.extxyz"  # the curated data the campaign grows;
    base_quarantine: str = "data/curated/quarantine.parquet"  # null: label only (no curation, no retraining)
    retrain: ActiveRetrainParams = ActiveRetrainParams()
    holdout: ActiveHoldoutParams = ActiveHoldoutParams()
    mlflow: bool = True  # a parent run per campaign, a nested run per iteration (train.tracking_uri)


class Params(_Section):
    generate: GenerateParams = GenerateParams()
    bo_scan: BoScanParams = BoScanParams()
    ingest: IngestParams
    validate_: ValidateParams = Field(alias="validate")
    index: IndexParams = IndexParams()
    crystal: CrystalParams = CrystalParams()
    descriptors: DescriptorParams = DescriptorParams()
    train: TrainParams = TrainParams()
    compute: ComputeParams = ComputeParams()
    evaluate: EvaluateParams = EvaluateParams()
    promote: PromoteParams = PromoteParams()
    active: ActiveParams = ActiveParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _model_size_capped(self):
        """The network params.yaml asks for is held to the caps a model folder is (mlipops.models.schema), before
        anything is allocated: counted for one species, the least any dataset has."""
        d = self.descriptors.model_dump()
        phases = [("train.hidden", self.train.hidden)] + [
            (f"train.curriculum[{k}].hidden", ph.hidden) for k, ph in enumerate(self.train.curriculum) if ph.hidden]
        for where, hidden in phases:
            if len(hidden) > MAX_LAYERS or any(h < 1 for h in hidden):
                raise ValueError(f"{where}: at most {MAX_LAYERS} layers of positive widths, not {hidden}")
            n = parameter_count(1, d, hidden, self.train.ensemble.members)
            if n > MAX_PARAMETERS:
                raise ValueError(f"{where} {hidden} with {self.train.ensemble.members} member(s) makes {n:,} "
                                 f"parameters (one species), more than the cap of {MAX_PARAMETERS:,}")
        return self

    @model_validator(mode="after")
    def _curriculum_ends_at_descriptors(self):
        cur = self.train.curriculum
        if cur:
            last = cur[-1]
            if last.cutoff is not None and last.cutoff != self.descriptors.cutoff:
                raise ValueError(f"train.curriculum: the last phase is the final model: its cutoff {last.cutoff} must "
                                 f"equal descriptors.cutoff {self.descriptors.cutoff} (or be left out)")
            for k, ph in enumerate(cur):
                cut = ph.cutoff if ph.cutoff is not None else self.descriptors.cutoff
                if ph.angular_cutoff is not None and ph.angular_cutoff > cut:
                    raise ValueError(f"train.curriculum phase {k}: angular_cutoff {ph.angular_cutoff} exceeds its "
                                     f"cutoff {cut}")
        return self


def _format_error(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join("validate" if p == "validate_" else cut(p, 60) for p in first["loc"])
    got = first.get("input")
    got_txt = "" if isinstance(got, dict) else f" (got {clip(got)})"
    more = len(err.errors()) - 1
    tail = f" [+{more} more]" if more > 0 else ""
    return f"{path}: {cut(loc)}: {cut(first['msg'], 400)}{got_txt}{tail}"


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _expanded_nodes(root: yaml.Node, limit: int) -> int:
    """Nodes of the document with every alias expanded (capped at ``limit + 1``), in time linear in the
    distinct nodes; a node that contains itself (a recursive alias) is an error."""
    size: dict[int, int] = {}
    open_: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_.discard(key)
            size[key] = min(limit + 1, 1 + sum(size[id(c)] for c in _children(node)))
        elif key not in size:
            open_.add(key)
            stack.append((node, True))
            for c in _children(node):
                if id(c) in open_:
                    raise yaml.composer.ComposerError(None, None, "an alias refers to a node that contains it "
                                                      "(a recursive structure)", c.start_mark)
                if id(c) not in size:
                    stack.append((c, False))
    return size[id(root)]


class _Loader(yaml.SafeLoader):
    """YAML's safe subset, refusing a duplicate key in a mapping (merge keys ``<<`` excepted) and a
    document whose aliases expand to more than :data:`MAX_YAML_NODES` nodes."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None and _expanded_nodes(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"the document expands to more than {MAX_YAML_NODES} values through its aliases "
                "(anchors referenced over and over: a 'billion laughs')", node.start_mark)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {clip(key)} (first at line {first[key] + 1}, again at line "
                        f"{key_node.start_mark.line + 1})", key_node.start_mark)
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, max_bytes: int = MAX_PARAMS_BYTES):
    """The YAML document of ``path`` as plain data (see :class:`_Loader`); :class:`ParamsError` naming the file,
    the line and at most 200 characters of its text on any problem."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ParamsError(f"larger than {max_bytes // 1_000_000} MB: not a params file", file=str(path))
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"cannot read: {cut(exc)}", file=str(path)) from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader is a SafeLoader)
    except yaml.YAMLError as exc:
        mark, ctx, ctx_mark = (getattr(exc, a, None) for a in ("problem_mark", "context", "context_mark"))
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        also = (f" ({ctx} from line {ctx_mark.line + 1})" if ctx and ctx_mark is not None
                else (f" ({ctx})" if ctx else ""))
        raise ParamsError(f"not valid YAML: {where}{cut(what)}{cut(also)}", file=str(path)) from None
    except RecursionError:
        raise ParamsError("not valid YAML: nested too deeply", file=str(path)) from None


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml; raise ParamsError naming the file and key on any problem. Paths are
    judged against the project root, the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError("file not found (run from the project root or pass --params)", file=str(path))
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ParamsError("top level must be a mapping of stage sections", file=str(path))
    try:
        params = Params.model_validate(raw, context={"root": path.resolve().parent})
    except ValidationError as exc:
        raise ParamsError(_format_error(path, exc)) from None
    except RecursionError:
        raise ParamsError("nested too deeply", file=str(path)) from None
    if _TRACE is not None:
        _tag(params, "")
    return params


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested params/metrics into dotted keys (for MLflow params and metrics.json)."""
    if isinstance(d, BaseModel):
        d = d.model_dump(by_alias=True)
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out
