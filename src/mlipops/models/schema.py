"""A model folder is data: ``config.json`` and ``weights.pt`` checked before anything is built or imported.

``config.json`` is read field by field (types, ranges, known keys) and the size of the model it
describes is computed from it and bounded (:data:`MAX_PARAMETERS`) before a tensor is allocated. Its
Δ-learning baseline may name only the built-in calculators (:data:`~mlipops.models.baseline.BUILTIN`,
by short name or import path, with plain numeric keywords) or a calculator the caller trusts
explicitly: the one ``params.yaml``'s ``train.baseline.calculator`` names (:func:`trusted_calculators`),
with the keywords params.yaml gives it. Nothing the file names is imported before that check.

``weights.pt`` must be a PyTorch zip archive no larger than the tensors of the configured model can
fill; it is read with ``torch.load(weights_only=True, mmap=True)`` (no code runs, no storage the file
declares is allocated) and every tensor is checked against the configured model's name and shape.
Every failure is one line naming the file and the key.
"""

from __future__ import annotations

import json
import math
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from ase.data import atomic_numbers

from mlipops.errors import MlipopsError
from mlipops.params import (  # noqa: F401 -- the caps live with params.yaml's, one place for both
    MAX_ANGULAR_ORDER, MAX_BASIS, MAX_CUTOFF_A, MAX_LAYERS, MAX_MEMBERS, MAX_PARAMETERS, parameter_count)

CONFIG_FORMAT = "mlipops.potential/1"
ENSEMBLE_FORMAT = "mlipops.ensemble/1"
MAX_CONFIG_BYTES = 4 << 20      # a config.json is a few kB
_IMPORT_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_DESCRIPTOR_KEYS = ("cutoff", "n_radial", "r_min", "angular_cutoff", "n_angular", "max_l")
_DISPERSION_KEYS = ("kind", "s6", "damping", "cutoff", "switch_width", "c6_eV_A6", "r0_A")
# written by train / active retrain next to the architecture: provenance, never used to build anything
_META = {"model_name": str, "dtype": str, "mlflow_run_id": (str, type(None)), "trained_on": dict,
         "members": list, "warm_started_from": dict}


def _show(v) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _expected(file, key: str, what: str, got) -> MlipopsError:
    return MlipopsError(f"expected {what}, got {_show(got)}", file=str(file), field=key)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(file, key: str, v, lo: int, hi: int) -> int:
    if not _is_int(v) or not lo <= v <= hi:
        raise _expected(file, key, f"an integer in [{lo}, {hi}]", v)
    return v


def _num(file, key: str, v, lo: float, hi: float, open_lo: bool = False) -> float:
    if not _is_num(v) or v > hi or v < lo or (open_lo and v == lo):
        raise _expected(file, key, f"a number in {'(' if open_lo else '['}{lo:g}, {hi:g}]", v)
    return float(v)


def _object(file, key: str, v, allowed: Iterable[str]) -> dict:
    if not isinstance(v, dict):
        raise _expected(file, key, "a JSON object", v)
    unknown = sorted(set(v) - set(allowed))
    if unknown:
        raise MlipopsError(f"unknown key(s) {unknown} (known: {sorted(allowed)})", file=str(file), field=key)
    return v


# ------------------------------------------------------------------------------------------- trust
def builtin_path(name: str) -> str:
    """The import path of a built-in baseline's short name (``emt`` ...); other names unchanged."""
    from mlipops.models.baseline import BUILTIN

    name = str(name).strip()
    return BUILTIN.get(name.lower(), name)


def trusted_calculators(params) -> dict[str, dict]:
    """``{import path: kwargs}`` of the baseline calculator ``params.yaml`` names (``train.baseline``;
    ``params`` is the whole :class:`~mlipops.params.Params`): the one calculator besides the built-ins
    that a model's config.json may name, and then only with these keywords. {} without a baseline."""
    b = params.train.baseline
    return {builtin_path(b.calculator): json.loads(json.dumps(b.kwargs))} if b.calculator else {}


def _trust(trusted) -> dict[str, dict | None]:
    """{import path: the keywords it is trusted with, or None (any plain keywords)} of the caller's
    ``trusted_calculators``: a mapping path -> kwargs (as :func:`trusted_calculators` gives), or paths."""
    if not trusted:
        return {}
    if isinstance(trusted, str):
        trusted = [trusted]
    items = trusted.items() if isinstance(trusted, Mapping) else ((t, None) for t in trusted)
    return {builtin_path(k): (None if v is None else json.loads(json.dumps(v))) for k, v in items}


def _plain(v, depth: int = 0) -> bool:
    """A JSON value of numbers, strings, booleans and null, in lists or objects at most two deep."""
    if v is None or isinstance(v, (bool, str)) or _is_num(v):
        return not isinstance(v, str) or len(v) <= 1000
    if depth < 2 and isinstance(v, list):
        return len(v) <= 10_000 and all(_plain(x, depth + 1) for x in v)
    if depth < 2 and isinstance(v, dict):
        return len(v) <= 1000 and all(isinstance(k, str) and _plain(x, depth + 1) for k, x in v.items())
    return False


def check_baseline(spec, file, trusted=None) -> dict:
    """The validated baseline spec (calculator as its import path) of a model config; refuses any
    calculator but the built-ins and the caller's ``trusted`` ones before importing anything."""
    from mlipops.models.baseline import BUILTIN

    spec = _object(file, "baseline", spec, ("calculator", "kwargs", "version"))
    name = spec.get("calculator")
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise _expected(file, "baseline.calculator", "a calculator name", name)
    path, trust = builtin_path(name), _trust(trusted)
    if path not in BUILTIN.values() and path not in trust:
        raise MlipopsError(f"{_show(name)} is not an allowed baseline (built-ins: {', '.join(BUILTIN)}; or the "
                           "calculator params.yaml's train.baseline.calculator names)",
                           file=str(file), field="baseline.calculator")
    if not _IMPORT_PATH.match(path):
        raise _expected(file, "baseline.calculator", "an import path package.module.Class", name)
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise _expected(file, "baseline.kwargs", "a JSON object", kwargs)
    for k, v in kwargs.items():
        if path in BUILTIN.values() and not (v is None or isinstance(v, bool) or _is_num(v)):
            raise _expected(file, f"baseline.kwargs.{k}", "a number, true/false or null", v)
        if not _plain(v):
            raise _expected(file, f"baseline.kwargs.{k}", "a plain JSON value", v)
    pinned = trust.get(path)
    if path not in BUILTIN.values() and pinned is not None and kwargs != pinned:
        raise MlipopsError(f"{_show(kwargs)} differ from the keywords params.yaml's train.baseline.kwargs trusts "
                           f"{path} with ({_show(pinned)})", file=str(file), field="baseline.kwargs")
    version = spec.get("version")
    if version is not None and (not isinstance(version, str) or len(version) > 100):
        raise _expected(file, "baseline.version", "a version string", version)
    # allowed: import it now (its unknown-keyword check, with the file named, before the first frame)
    from mlipops.calculators import import_calculator, unknown_keywords

    factory = import_calculator(path, what="baseline calculator", file=str(file), field="baseline.calculator")
    unknown, known = unknown_keywords(factory, kwargs)
    if unknown:
        raise MlipopsError(f"unknown parameter(s) {unknown} of {path} (known: {known})", file=str(file),
                           field="baseline.kwargs")
    return {"calculator": path, "kwargs": dict(kwargs)} | ({"version": version} if version is not None else {})


# ------------------------------------------------------------------------------------------ config
def _check_descriptor(file, d) -> dict:
    d = _object(file, "descriptor", d, _DESCRIPTOR_KEYS)
    cutoff = _num(file, "descriptor.cutoff", d.get("cutoff", 5.0), 0.0, MAX_CUTOFF_A, open_lo=True)
    out = {"cutoff": cutoff,
           "n_radial": _int(file, "descriptor.n_radial", d.get("n_radial", 8), 1, MAX_BASIS),
           "r_min": _num(file, "descriptor.r_min", d.get("r_min", 0.8), 0.0, cutoff),
           "angular_cutoff": _num(file, "descriptor.angular_cutoff", d.get("angular_cutoff", 4.0), 0.0, cutoff,
                                  open_lo=True),
           "n_angular": _int(file, "descriptor.n_angular", d.get("n_angular", 4), 0, MAX_BASIS),
           "max_l": _int(file, "descriptor.max_l", d.get("max_l", 3), 0, MAX_ANGULAR_ORDER)}
    if out["r_min"] >= cutoff or (out["n_angular"] and out["r_min"] == out["angular_cutoff"]):
        raise MlipopsError(f"r_min ({out['r_min']:g} Å) must lie below the cutoff and differ from the angular "
                           "cutoff (zero-width basis)", file=str(file), field="descriptor.r_min")
    return {k: out[k] for k in _DESCRIPTOR_KEYS if k in d}  # as written: the config round-trips unchanged


def _check_dispersion(file, d, n_species: int) -> dict:
    d = _object(file, "dispersion", d, _DISPERSION_KEYS)
    missing = [k for k in _DISPERSION_KEYS if k not in d]
    if missing:
        raise MlipopsError(f"dispersion term lacks {missing}", file=str(file), field="dispersion")
    if d["kind"] != "d2":
        raise _expected(file, "dispersion.kind", "'d2'", d["kind"])
    _num(file, "dispersion.s6", d["s6"], 0.0, 1e3, open_lo=True)
    _num(file, "dispersion.damping", d["damping"], 0.0, 1e3, open_lo=True)
    cutoff = _num(file, "dispersion.cutoff", d["cutoff"], 0.0, MAX_CUTOFF_A, open_lo=True)
    _num(file, "dispersion.switch_width", d["switch_width"], 0.0, cutoff, open_lo=True)
    for key, lo in (("c6_eV_A6", 0.0), ("r0_A", 0.0)):
        v = d[key]
        if not isinstance(v, list) or len(v) != n_species:
            raise _expected(file, f"dispersion.{key}", f"a list of {n_species} numbers (one per species)", v)
        for k, x in enumerate(v):
            _num(file, f"dispersion.{key}[{k}]", x, lo, 1e6, open_lo=key == "r0_A")
    return d


def check_config(cfg, file, trusted=None) -> dict:
    """The validated config dict of a model's ``config.json`` (see the module docstring)."""
    if not isinstance(cfg, dict):
        raise _expected(file, "format", "a JSON object", cfg)
    fmt = cfg.get("format")
    if fmt not in (CONFIG_FORMAT, ENSEMBLE_FORMAT):
        raise MlipopsError(f"unsupported model format {fmt!r} (expected {CONFIG_FORMAT} or {ENSEMBLE_FORMAT})",
                           file=str(file), field="format")
    known = {"format", "species", "descriptor", "hidden", "dispersion", "baseline", *_META}
    known |= {"n_members"} if fmt == ENSEMBLE_FORMAT else set()
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise MlipopsError(f"unknown key(s) {unknown} (known: {sorted(known)})", file=str(file), field=unknown[0])
    for key in ("species", "descriptor", "hidden"):
        if key not in cfg:
            raise MlipopsError(f"model config lacks {key!r}", file=str(file), field=key)
    for key, typ in _META.items():
        if key in cfg and not isinstance(cfg[key], typ):
            raise _expected(file, key, typ.__name__ if isinstance(typ, type) else "a string or null", cfg[key])
    if cfg.get("dtype", "float32") not in ("float32", "float64"):
        raise _expected(file, "dtype", "'float32' or 'float64'", cfg["dtype"])
    species = cfg["species"]
    if (not isinstance(species, list) or not 1 <= len(species) <= 118
            or not all(isinstance(s, str) and atomic_numbers.get(s, 0) > 0 for s in species)):
        raise _expected(file, "species", "a list of chemical symbols", species)
    if len(set(species)) != len(species):
        raise _expected(file, "species", "distinct chemical symbols", species)
    descriptor = _check_descriptor(file, cfg["descriptor"])
    hidden = cfg["hidden"]
    if not isinstance(hidden, list) or len(hidden) > MAX_LAYERS:
        raise _expected(file, "hidden", f"a list of at most {MAX_LAYERS} layer widths", hidden)
    for k, h in enumerate(hidden):
        if not _is_int(h) or h < 1:
            raise _expected(file, f"hidden[{k}]", "a positive integer", h)
    n_members = _int(file, "n_members", cfg.get("n_members"), 1, MAX_MEMBERS) if fmt == ENSEMBLE_FORMAT else 1
    n = parameter_count(len(species), descriptor, hidden, n_members)
    if n > MAX_PARAMETERS:
        raise MlipopsError(f"species {len(species)}, descriptor, hidden {_show(hidden)} and {n_members} member(s) "
                           f"make {n:,} parameters, more than the cap of {MAX_PARAMETERS:,}", file=str(file),
                           field="hidden")
    out = dict(cfg)
    if cfg.get("dispersion") is not None:
        out["dispersion"] = _check_dispersion(file, cfg["dispersion"], len(species))
    if cfg.get("baseline") is not None:
        out["baseline"] = check_baseline(cfg["baseline"], file, trusted)
    return out


def read_config_file(path: str | Path, trusted=None) -> dict:
    """``config.json`` read (size-bounded) and validated by :func:`check_config`."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise MlipopsError(f"{size:,} bytes, more than a model config can be ({MAX_CONFIG_BYTES:,})", file=str(path))
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise MlipopsError("not valid JSON: not UTF-8 text", file=str(path)) from None
    except json.JSONDecodeError as exc:
        raise MlipopsError(f"not valid JSON: {exc}", file=str(path)) from None
    except RecursionError:
        raise MlipopsError("not valid JSON: nested too deeply", file=str(path)) from None
    return check_config(cfg, path, trusted)


# ----------------------------------------------------------------------------------------- weights
_BOILERPLATE = ("weights only load failed", "please file an issue", "check the documentation")


def _reason(exc: BaseException) -> str:
    """The informative first line of a loader's error, at most 200 characters (PyTorch's messages
    open with advice to reload the file unsafely: skipped)."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    useful = [x for x in lines if not x.lower().startswith(_BOILERPLATE)]
    text = (useful or lines or [""])[0] or type(exc).__name__
    if len(text) > 200:
        cut = text.rfind(". ", 0, 199)
        text = text[:cut + 1] if cut > 40 else text[:197] + "..."
    return text


def load_weights(path: str | Path, model) -> None:
    """Load ``weights.pt`` into ``model`` (whose state dict the config defined): a bounded-size PyTorch
    zip archive read with ``weights_only=True`` whose every tensor matches the model's by name and shape."""
    import torch

    path = Path(path)
    expected = model.state_dict()

    def bad(reason: str) -> MlipopsError:
        return MlipopsError(f"not a valid weights file: {reason}", file=str(path))

    size = path.stat().st_size
    cap = sum(8 * t.numel() + 4096 for t in expected.values()) + (1 << 20)  # float64 data + zip/pickle overhead
    if size > cap:
        raise bad(f"{size:,} bytes, more than the {len(expected)} tensors config.json describes can fill ({cap:,})")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":
        raise bad("empty file" if not magic else "not a PyTorch zip archive")
    try:  # the archive's directory: stored (never inflated) entries, as torch.save writes them, within the cap
        with zipfile.ZipFile(path) as zf:
            entries = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise bad(f"not a PyTorch zip archive ({_reason(exc)})") from None
    if (len(entries) > len(expected) + 16 or any(e.compress_type != zipfile.ZIP_STORED for e in entries)
            or sum(e.file_size for e in entries) > cap):
        raise bad(f"an archive of {len(entries)} entries, compressed or larger than the {len(expected)} tensors "
                  "config.json describes")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": not a second line on stderr
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError (zip), KeyError, EOFError ...
        raise bad(_reason(exc)) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise bad(f"expected a state dict of named tensors, got {type(state).__name__}")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if unexpected:
        raise MlipopsError(f"tensor not in the model config.json describes ({len(unexpected)} such, "
                           f"{len(missing)} missing)", file=str(path), field=unexpected[0][:200])
    if missing:
        raise MlipopsError(f"tensor missing ({len(missing)} of {len(expected)}); config.json describes another model",
                           file=str(path), field=missing[0])
    for key, t in expected.items():
        if tuple(state[key].shape) != tuple(t.shape):
            raise MlipopsError(f"shape {list(state[key].shape)} in the file, {list(t.shape)} from config.json",
                               file=str(path), field=key)
    try:
        model.load_state_dict(state)  # into the model's dtype: float64 weights keep full precision
    except Exception as exc:  # noqa: BLE001 - e.g. a complex tensor that does not cast
        raise bad(_reason(exc)) from None
