"""``mlipops gates init``: a promotion gate set generated from the data's own config_types and splits.

The curated data (``data/curated/accepted.extxyz``: the frames the model is trained and evaluated on, with
their ``split``) is streamed once; per config_type it gives the frames of each split, the RMS force
component and the spread of E/N. The gates follow these rules (each generated line says which one):

- **forces** (``<split>.<config_type>.force_mae``, eV/Å): ``max(FORCE_FLOOR, FORCE_FRACTION x RMS force
  component of the config_type)`` over all its frames, so a 3000 K liquid (RMS ~2 eV/Å) is not held to a
  crystal's bound (RMS ~0.1 eV/Å); config_types held out of training (none of their frames in ``train``: the
  defects the model never saw) get ``HELD_OUT_FACTOR`` times that and no energy gate (the energy of a class
  never trained on is the defects report's diagnosis, not a promotion bound).
- **energies** (``<split>.<config_type>.energy_mae_per_atom``, eV/atom): ``max(ENERGY_FLOOR, ENERGY_FRACTION x
  standard deviation of E/N within the config_type)``; the floor is the accuracy a DFT-trained potential of this
  size reaches on crystals (measured: benchmarks/bench_energy_weight.py).
- **split totals** (``<split>.force_mae``, ``<split>.energy_mae_per_atom``): the mean of the split's
  per-config_type gates weighted as the metric weights them (force components; frames), emitted only when
  every config_type of the split was trained on.
- **uncertainty** (``uncertainty:test.all.force_spearman``): ``evaluate.uncertainty.min_spearman``, with an
  ensemble of two or more members only.
- **paths** (``path.<config_type>.*``): for each ``evaluate.paths.config_types`` in the data; held out of
  training: ``exit_coordinate`` at least the path's first coordinate (the hull exit is found and reported);
  trained on: ``max_abs_error_per_atom`` within ``evaluate.paths.tolerance_per_atom``.
- **melting**, **nve**: when the element they simulate is in the data and (melting) a reference melting
  point can exist (the reference oracle can label the element, or a reference is already computed).

A gate that does not apply is written ``{not_applicable: "<reason>"}`` (shown n/a by ``mlipops promote``,
never blocking). The result is YAML text with a comment per gate; ``write_into_params`` puts it in place of
``promote.gates`` in params.yaml, editing the file as text (every other line and comment kept: a YAML round trip,
even ruamel.yaml's, rewrites ``null``s and list indentation), else it goes to ``gates.yaml`` to paste.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mlipops.errors import MlipopsError, StageInputError
from mlipops.params import Params, PromoteParams
from mlipops.paths import atomic_path
from mlipops.pipeline import ACCEPTED as DATA, MELTING_REFERENCE


FORCE_FRACTION = 0.25  # of the config_type's RMS force component
FORCE_FLOOR = 0.1  # eV/Å: below it the error is the model's, not the data's (mlearn Mo relaxed surfaces: RMS 0.02)
HELD_OUT_FACTOR = 1.5  # force gates of config_types never trained on
ENERGY_FRACTION = 0.05  # of the standard deviation of E/N within the config_type
# eV/atom: the embedded copper's default energy gates (mlearn Mo surfaces, 9 training frames: 10-13 meV/atom)
ENERGY_FLOOR = 0.02
MELTING_MIN_MEMBERS = 3  # members that must reach coexistence (at most the ensemble's size)
NVE_MAX_DRIFT = 0.1  # meV/atom/ps: 100 meV/atom/ns, a kink or non-conservative force shows
SPLITS = ("train", "val", "test")


@dataclass
class Group:
    """Statistics of one config_type in one split."""
    n_frames: int = 0
    n_force: int = 0  # force components
    sum_f2: float = 0.0  # Σ F² (eV/Å)²
    sum_e: float = 0.0  # Σ E/N
    sum_e2: float = 0.0
    coords: list[float] = field(default_factory=list)  # reaction coordinates (path frames)

    def add(self, other: "Group") -> "Group":
        return Group(self.n_frames + other.n_frames, self.n_force + other.n_force, self.sum_f2 + other.sum_f2,
                     self.sum_e + other.sum_e, self.sum_e2 + other.sum_e2, self.coords + other.coords)

    @property
    def rms_force(self) -> float:
        return math.sqrt(self.sum_f2 / self.n_force) if self.n_force else 0.0

    @property
    def std_e(self) -> float:
        if not self.n_frames:
            return 0.0
        m = self.sum_e / self.n_frames
        return math.sqrt(max(self.sum_e2 / self.n_frames - m * m, 0.0))


@dataclass
class DataStats:
    path: str
    groups: dict[tuple[str, str], Group]  # (config_type, split) -> statistics
    species: set[str]
    n_frames: int

    def split_cts(self, split: str) -> list[str]:
        return sorted(ct for ct, s in self.groups if s == split)

    def config_types(self) -> list[str]:
        return sorted({ct for ct, _ in self.groups})

    def total(self, ct: str) -> Group:
        g = Group()
        for (c, _), x in self.groups.items():
            if c == ct:
                g = g.add(x)
        return g


def data_stats(path: Path = DATA) -> DataStats:
    """Stream the curated data once: per (config_type, split) frame counts, force and E/N moments."""
    import numpy as np

    from mlipops.evaluate.reaction_path import COORDINATE_KEYS
    from mlipops.frames import Rejected, iter_extxyz, labels

    if not Path(path).is_file():
        raise StageInputError("curated data missing: run `dvc repro validate` first (gates are generated from the "
                              "accepted frames)", file=str(path))
    groups: dict[tuple[str, str], Group] = defaultdict(Group)
    species: set[str] = set()
    n = 0
    for a in iter_extxyz(path):
        if isinstance(a, Rejected):
            raise StageInputError(f"unreadable frame in the curated data: {a.reason}", file=str(path))
        e, f, _ = labels(a)
        g = groups[(str(a.info.get("config_type", "unknown")), str(a.info.get("split", "train")))]
        g.n_frames += 1
        if f is not None:
            f = np.asarray(f, float)
            g.n_force += f.size
            g.sum_f2 += float((f * f).sum())
        if e is not None:
            g.sum_e += e / len(a)
            g.sum_e2 += (e / len(a)) ** 2
        for k in COORDINATE_KEYS:
            if k in a.info:
                g.coords.append(float(a.info[k]))
                break
        species.update(a.get_chemical_symbols())
        n += 1
    if not n:
        raise StageInputError("the curated data hold no frame", file=str(path))
    return DataStats(str(path), dict(groups), species, n)


def _num(x: float) -> float:
    """Three significant digits (a gate is a bound, not a measurement)."""
    return float(f"{x:.3g}")


def _key(k: str) -> str:
    return json.dumps(k)


def force_gate(g: Group, held_out: bool) -> tuple[float, str]:
    v = max(FORCE_FLOOR, FORCE_FRACTION * g.rms_force) * (HELD_OUT_FACTOR if held_out else 1.0)
    rule = (f"max({FORCE_FLOOR:g}, {FORCE_FRACTION:g} x RMS force {g.rms_force:.3g} eV/Å)"
            + (f" x {HELD_OUT_FACTOR:g} (held out of training)" if held_out else ""))
    return _num(v), rule


def energy_gate(g: Group) -> tuple[float, str]:
    v = max(ENERGY_FLOOR, ENERGY_FRACTION * g.std_e)
    return _num(v), f"max({ENERGY_FLOOR:g}, {ENERGY_FRACTION:g} x std of E/N {g.std_e:.3g} eV/atom)"


def _oracle_can_label(p: Params, element: str) -> str | None:
    """None if the reference oracle can label ``element`` (or cannot be asked cheaply); else why not."""
    if p.generate.oracle.calculator.lower() == "emt":
        from ase.calculators.emt import parameters

        if element not in parameters:
            return (f"the reference oracle (EMT) has no parameters for {element} (it knows "
                    f"{', '.join(sorted(parameters))})")
    return None


def melting_reason(p: Params, stats: DataStats, reference: Path = MELTING_REFERENCE) -> str | None:
    """None if the melting gates apply to this data; else the reason they do not."""
    from mlipops.evaluate.melting_reference import melting_crystal

    el, _ = melting_crystal(p)
    if el not in stats.species:
        return (f"the melting stage simulates {el} "
                "(evaluate.melting.element, crystal.element, validate.allowed_species "
                f"or generate.element), which is not in this data ({', '.join(sorted(stats.species))})")
    if p.evaluate.melting.reference is not None:
        return None  # a given reference melting point
    if reference.is_file():
        try:
            ref = json.loads(reference.read_text())
        except (OSError, ValueError):
            ref = {}
        if ref.get("element") == el and not ref.get("available", False):
            return f"no reference melting point ({reference}: {ref.get('reason', 'not available')})"
        if ref.get("element") == el:
            return None
    why = _oracle_can_label(p, el)
    return None if why is None else f"no reference melting point: {why}"


def nve_reason(p: Params, stats: DataStats) -> str | None:
    el = p.evaluate.nve.element or p.crystal.element
    if el is not None and el not in stats.species:
        return (f"the nve stage runs a crystal of {el} (evaluate.nve.element or crystal.element), which is not in "
                f"this data ({', '.join(sorted(stats.species))})")
    return None  # null: the data's own crystal


def generate(p: Params, stats: DataStats) -> str:
    """The gate set as YAML text (the value of ``promote.gates``, indented under it), a comment per gate."""
    lines: list[str] = []
    gates: dict[str, dict] = {}

    def gate(key: str, bound: dict, rule: str) -> None:
        gates[key] = bound
        if "not_applicable" in bound:
            val = "{not_applicable: " + json.dumps(bound["not_applicable"]) + "}"
        elif list(bound) == ["max"]:
            val = f"{bound['max']:g}"
        else:
            val = "{" + ", ".join(f"{k}: {v:g}" for k, v in bound.items()) + "}"
        lines.append(f"    {_key(key)}: {val}" + (f"   # {rule}" if rule else ""))

    train_cts = set(stats.split_cts("train"))
    path_cts = [ct for ct in p.evaluate.paths.config_types if ct in stats.config_types()]
    lines.append(f"    # generated by `mlipops gates init` from {stats.path} ({stats.n_frames} frames; "
                 + "; ".join(f"{s}: {', '.join(stats.split_cts(s)) or 'none'}" for s in SPLITS) + ")")
    lines.append(f"    # forces: max({FORCE_FLOOR:g} eV/Å, {FORCE_FRACTION:g} x the config_type's "
                 "RMS force component), "
                 "x "
                 f"{HELD_OUT_FACTOR:g} held out of training; energies: max({ENERGY_FLOOR:g} eV/atom, "
                 f"{ENERGY_FRACTION:g} x its std of E/N)")
    for split in p.evaluate.splits:
        cts = [ct for ct in stats.split_cts(split) if ct not in path_cts]
        if not cts:
            lines.append(f"    # no {split} frames" + (" outside the reaction paths" if stats.split_cts(split) else ""))
            continue
        rows = []
        for ct in cts:
            held_out = ct not in train_cts
            whole = stats.total(ct)
            fv, frule = force_gate(whole, held_out)
            ev, erule = energy_gate(whole) if not held_out else (None, "")
            rows.append((ct, held_out, fv, frule, ev, erule, stats.groups[(ct, split)]))
        if not any(r[1] for r in rows):
            nf = sum(r[6].n_force for r in rows) or 1
            nfr = sum(r[6].n_frames for r in rows)
            gate(f"{split}.energy_mae_per_atom", {"max": _num(sum(r[4] * r[6].n_frames for r in rows) / nfr)},
                 f"eV/atom: the {split} config_types' energy gates weighted by frames")
            gate(f"{split}.force_mae", {"max": _num(sum(r[2] * r[6].n_force for r in rows) / nf)},
                 f"eV/Å: the {split} config_types' force gates weighted by force components")
        else:
            lines.append(f"    # no {split} totals: {', '.join(r[0] for r in rows if r[1])} held out of training "
                         "(their own gates below)")
        for ct, held_out, fv, frule, ev, erule, g in rows:
            if ev is not None:
                gate(f"{split}.{ct}.energy_mae_per_atom", {"max": ev}, f"eV/atom: {erule}")
            gate(f"{split}.{ct}.force_mae", {"max": fv}, f"eV/Å: {frule}")
    # uncertainty: σ ranks the test errors
    if p.train.ensemble.members < 2:
        gate("uncertainty:test.all.force_spearman", {"not_applicable": "a single-member model has no ensemble σ"}, "")
    elif not stats.split_cts("test"):
        gate("uncertainty:test.all.force_spearman", {"not_applicable": "no test split in this data"}, "")
    else:
        gate("uncertainty:test.all.force_spearman", {"min": p.evaluate.uncertainty.min_spearman},
             "σ ranks the test errors: evaluate.uncertainty.min_spearman")
    # reaction paths
    missing = [ct for ct in p.evaluate.paths.config_types if ct not in path_cts]
    if missing:
        lines.append(f"    # evaluate.paths.config_types not in this data (no gate): {', '.join(missing)}")
    for ct in path_cts:
        whole = stats.total(ct)
        if ct in train_cts:
            gate(f"path.{ct}.max_abs_error_per_atom", {"max": p.evaluate.paths.tolerance_per_atom},
                 "eV/atom: trained on: within evaluate.paths.tolerance_per_atom along the whole path")
        else:
            first = min(whole.coords) if whole.coords else 0.0
            gate(f"path.{ct}.exit_coordinate", {"min": math.floor(first * 100) / 100},
                 "held out of training: the hull exit is found, at or after the path's first coordinate "
                 "(raise it to where the model must stay inside)")
    if not path_cts:
        gate("path.*.exit_coordinate", {"not_applicable": "no reaction path: evaluate.paths.config_types are not in "
                                        "this data" + (" (user path files: gate them by hand)"
                                                       if p.evaluate.paths.files else "")}, "")
    # melting
    why = melting_reason(p, stats)
    if why:
        gate("melting:bias_significance_excess_K", {"not_applicable": why}, "")
        gate("melting:n_members_accepted", {"not_applicable": why}, "")
    else:
        gate("melting:bias_significance_excess_K", {"max": 0.0},
             "K: |Tm - Tm_ref| beyond both evaluate.melting.window_K and its own 95 % bound")
        gate("melting:n_members_accepted", {"min": min(MELTING_MIN_MEMBERS, p.train.ensemble.members)},
             "members that reached coexistence")
    why = nve_reason(p, stats)
    if why:
        gate("nve:abs_energy_drift_meV_per_atom_per_ps", {"not_applicable": why}, "")
        gate("nve:finite", {"not_applicable": why}, "")
    else:
        gate("nve:abs_energy_drift_meV_per_atom_per_ps", {"max": NVE_MAX_DRIFT},
             "meV/atom/ps: 100 meV/atom/ns, a kink or non-conservative force shows")
        gate("nve:finite", {"min": 1}, "the run finished without a non-finite energy")
    PromoteParams(gates=gates)  # what promote reads: the generated set must validate
    return "\n".join(lines) + "\n"


def fragment(text: str) -> str:
    """The gate lines as a YAML fragment to paste into params.yaml."""
    return "promote:\n  gates:\n" + text


GENERATED = "# generated by `mlipops gates init`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def splice_gates(params_text: str, text: str) -> str | None:
    """``params_text`` with its ``promote.gates`` block replaced by ``text`` (generated with 4 spaces of
    indentation), every other byte kept; the ``gates:`` line and the comment lines right below it (the file's
    own documentation of the gates) stay. None if the block cannot be found in block style."""
    lines = params_text.splitlines(keepends=True)
    top = [k for k, ln in enumerate(lines) if ln.startswith("promote:") and ln[8:].strip()[:1] in ("", "#")]
    if len(top) != 1:
        return None
    k0 = top[0]
    end = next((k for k in range(k0 + 1, len(lines)) if lines[k].strip() and not lines[k].startswith((" ", "#"))),
               len(lines))
    children = [k for k in range(k0 + 1, end) if lines[k].strip() and not lines[k].lstrip().startswith("#")]
    if not children:
        return None
    child = min(_indent(lines[k]) for k in children)
    at = [k for k in children if _indent(lines[k]) == child and lines[k].lstrip().startswith("gates:")]
    body = [(" " * (child + 2)) + ln[4:] if ln.startswith("    ") else ln for ln in text.splitlines(keepends=True)]
    if not at:  # no gates yet: a new block at the end of the section
        last = max(children) + 1
        while last < end and lines[last].strip().startswith("#") and _indent(lines[last]) > child:
            last += 1
        return "".join(lines[:last] + [" " * child + "gates:\n"] + body + lines[last:])
    g = at[0]
    after = lines[g].lstrip()[len("gates:"):].split("#", 1)[0].strip()
    if after:  # flow style (gates: {...}): the line itself is replaced
        comment = lines[g].split("#", 1)[1] if "#" in lines[g] else None
        head = " " * child + "gates:" + (f"  #{comment}" if comment else "\n")
        return "".join(lines[:g] + [head] + body + lines[g + 1:])
    k = g + 1
    while k < end and lines[k].strip().startswith("#") and not lines[k].strip().startswith(GENERATED):
        k += 1  # the file's own comments on the gates
    keep_to = k
    while k < end and (not lines[k].strip() or _indent(lines[k]) > child):
        k += 1
    while k > keep_to and not lines[k - 1].strip():
        k -= 1  # blank lines after the block stay
    return "".join(lines[:keep_to] + body + lines[k:])


def write_into_params(params_path: Path, text: str) -> Path:
    """Replace ``promote.gates`` of ``params_path`` with the generated set, every other line and comment
    kept (the file is edited as text, then validated as ``mlipops`` reads it). Where the gates block cannot
    be found in block style, or the result would not validate, the fragment goes to ``gates.yaml`` beside
    it to paste. Returns the file written."""
    from mlipops.params import load_params

    new = splice_gates(params_path.read_text(), text)
    if new is not None:
        try:
            with atomic_path(params_path) as tmp:  # replaced only once the new text validates
                tmp.write_text(new)
                load_params(tmp)
            return params_path
        except MlipopsError:
            pass
    out = params_path.parent / "gates.yaml"
    out.write_text(f"# paste in place of promote.gates in {params_path.name} (its gates block could not be "
                   "replaced in place)\n" + fragment(text))
    return out
