"""Reading the registry: ``mlipops registry list|show|load`` (read-only; no MLflow needed).

``registry/index.json`` is written by promotion (under the registry's file lock) from the MLflow
Model Registry; these functions only read it and the version folders. A reference is
``NAME@alias``, ``NAME@vN`` or a bare ``NAME`` (= ``NAME@champion``), or the path of one of the registry's
version folders (``registry/cu/v3``); it never resolves to a folder outside the registry, nor to one
without a version's files (:func:`mlipops.paths.registry_version`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from mlipops.errors import MlipopsError
from mlipops.paths import NAME, read_registry_index, registry_version


def read_index(registry_dir: Path) -> dict:
    return read_registry_index(registry_dir, missing="promote a model first: `dvc repro promote`")


def versions_table(registry_dir: Path) -> pd.DataFrame:
    """One row per registered version: name, version, aliases, created, data md5, run, gates passed, path."""
    rows = []
    for name, entry in sorted(read_index(registry_dir)["models"].items()):
        by_version: dict[int, list[str]] = {}
        for alias, v in entry.get("aliases", {}).items():
            by_version.setdefault(int(v), []).append(alias)
        for v in entry.get("versions", []):
            n = int(v["version"])
            rows.append({"name": name, "version": n, "aliases": ",".join(sorted(by_version.get(n, []))),
                         "created": v.get("created"), "data_md5": (v.get("data_md5") or "")[:12],
                         "run_id": (v.get("run_id") or "")[:12],
                         "gates": f"{v['n_gates_passed']}/{v['n_gates']}" if "n_gates" in v else "",
                         "path": str(Path(registry_dir) / name / f"v{n}")})
    return pd.DataFrame(rows, columns=["name", "version", "aliases", "created", "data_md5", "run_id", "gates", "path"])


def _ref(ref: str) -> str:
    return ref if "@" in ref or not NAME.fullmatch(ref.removeprefix("registry:")) else f"{ref}@champion"


def resolve(ref: str, registry_dir: Path) -> Path:
    """The version folder of ``ref`` (``NAME@alias``, ``NAME@vN``, ``NAME`` = ``NAME@champion``, or the path
    of a version folder of this registry); nothing outside the registry (:func:`mlipops.paths.registry_version`)."""
    read_index(registry_dir)
    return registry_version(ref, registry_dir)


MAX_CARD_BYTES = 1_000_000


def show(ref: str, registry_dir: Path) -> str:
    """The model card of the version, then its files (symlinks are neither followed nor listed)."""
    d = resolve(ref, registry_dir)
    card = d / "model_card.md"
    if card.is_file() and not card.is_symlink() and card.stat().st_size <= MAX_CARD_BYTES:
        text = card.read_text(errors="replace")
    else:
        text = f"(no readable model card in {d})"
    files = []
    for top, dirs, names in os.walk(d):  # does not descend into symlinked folders
        files += [str((Path(top) / n).relative_to(d)) for n in names if not (Path(top) / n).is_symlink()]
    files.sort()
    return f"{text}\n---\n{d}: {len(files)} files\n" + "\n".join(f"  {f}" for f in files)


def load(ref: str, registry_dir: Path, structure: Path | None = None,
         trusted_calculators=None) -> tuple[str, pd.DataFrame | None]:
    """Load the version with ``MlipopsCalculator`` (weights_only, JSON config checked before anything is
    built; a baseline among the built-ins or ``trusted_calculators``) and, given structures, evaluate them:
    energy, energy σ, largest force and its σ per frame."""
    import numpy as np

    from mlipops.frames import read_frames
    from mlipops.models.calculator import MlipopsCalculator
    from mlipops.models.ensemble import read_config

    d = resolve(ref, registry_dir)
    calc = MlipopsCalculator(d, trusted_calculators=trusted_calculators)
    cfg = read_config(d, trusted_calculators)
    n_par = sum(p.numel() for p in calc.model.parameters())
    summary = (f"{_ref(ref)} -> {d}: {'ensemble of ' + str(cfg['n_members']) if cfg.get('n_members') else 'single'} "
               f"potential, species {cfg['species']}, cutoff {cfg['descriptor'].get('cutoff')} Å, {n_par} parameters, "
               f"σ scale {calc.sigma_scale}")
    if structure is None:
        return summary, None
    frames, bad = read_frames(structure)  # refuses missing and non-regular files (devices, FIFOs) in one line
    if not frames:
        raise MlipopsError("no readable frame" + (f": {bad[0].reason}" if bad else ""), file=str(structure))
    rows = []
    for i, a in enumerate(frames):
        a = a.copy()
        a.calc = calc
        e = a.get_potential_energy()
        f = a.get_forces()
        r = {"frame": i, "n_atoms": len(a), "energy": e, "energy_per_atom": e / len(a),
             "max_force": float(np.linalg.norm(f, axis=1).max())}
        if calc.is_ensemble:
            r |= {"energy_std": float(calc.results["energy_std"]),
                  "max_force_std": float(np.linalg.norm(calc.results["forces_std"], axis=1).max())}
        rows.append(r)
    return summary, pd.DataFrame(rows)
