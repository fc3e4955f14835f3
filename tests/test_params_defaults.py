"""params.yaml is the single source of defaults (issue 28): where the code has a default for a key that params.yaml
sets, the two are equal.

The code's default of a key is the value the key takes when its section is left out of params.yaml: a field's own
default, inside the default of the field holding it (``evaluate.melting.production.melt_steps`` is the production
preset's, not :class:`~mlipops.params.MeltingPreset`'s); a section without a default (``ingest``, ``validate``) is
built from its class's field defaults. Both sides are compared as validated JSON data (a tuple and a list alike,
400 and 400.0 alike).

What has no code default is not compared:

- a field without one (``validate.allowed_species``, ``ingest.sources``);
- an entry of a map whose keys the user chooses (``promote.gates``, ``validate.energy_per_atom_range``,
  ``ingest.split.keep_in_train``, an oracle's ``kwargs``): each entry is a key of its own, compared where the code's
  default map holds it (``validate.energy_per_atom_range.default``, ``bo_scan.oracle.kwargs.basis``) and params.yaml's
  own where it does not (the gates, the ``Cu`` energy window);
- the keys of :data:`NO_CODE_DEFAULT`, whose ``None`` in the code means "not given", with the reason.

Keys the code has and params.yaml lacks (``train.precompute_descriptors``, ``evaluate.nve.element``,
``bo_scan.path.file``) are allowed: the code's default is then the only source.
"""

from __future__ import annotations

import copy
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from mlipops.params import Params, load_params, read_yaml

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"

# key -> why the code's None is no default that params.yaml's value could equal
NO_CODE_DEFAULT = {
    "bo_scan.path.range": "None: by the path's kind, diatomic [0.5, 6.0] Å (generate/bo_aware.py _DIATOMIC_RANGE), "
                          "images the whole path",
    "evaluate.melting.quick.finite_size": "a measurement of one calculator's cell (EMT Cu), None: not measured",
    "evaluate.melting.production.finite_size": "a measurement of one calculator's cell (EMT Cu), None: not measured",
}


def _model_class(annotation) -> type[BaseModel] | None:
    """The model class of a field annotated ``M`` or ``M | None``, else None."""
    unions = (typing.Union, types.UnionType)
    for a in (annotation, *(typing.get_args(annotation) if typing.get_origin(annotation) in unions else ())):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _json(value):
    return to_jsonable_python(value, by_alias=True)


def code_defaults(cls: type[BaseModel]) -> dict:
    """Every field of ``cls`` that has a default, as JSON data by alias; a required model field (a section without
    a default) recursively by its own class's defaults; other required fields left out."""
    out = {}
    for name, f in cls.model_fields.items():
        key = f.alias or name
        if f.is_required():
            sub = _model_class(f.annotation)
            if sub is not None:
                out[key] = code_defaults(sub)
            continue
        out[key] = _json(f.get_default(call_default_factory=True))
    return out


def disagreements(raw: dict, default: dict, loaded: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, code default, params value) of every key of ``raw`` (the plain YAML) that has a code default
    differing from the validated value; mappings are walked key by key."""
    out = []
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in default or where in NO_CODE_DEFAULT:
            continue
        d, v = default[key], loaded[key]
        if isinstance(value, dict) and isinstance(d, dict) and isinstance(v, dict):
            out += disagreements(value, d, v, where + ".")
        elif d != v:
            out.append((where, d, v))
    return out


def _report(rows) -> str:
    return "\n".join([f"{len(rows)} code default(s) differ from params.yaml (key: code default != params.yaml):"]
                     + [f"  {k}: {d!r} != {v!r}" for k, d, v in rows])


def test_the_shipped_params_yaml_validates():
    p = load_params(PARAMS)
    assert isinstance(p, Params)
    dumped = p.model_dump(by_alias=True)
    assert Params.model_validate(dumped, context={"root": REPO}) == p  # its dump validates again


def test_code_defaults_equal_params_yaml():
    raw = read_yaml(PARAMS)
    rows = disagreements(raw, code_defaults(Params), _json(load_params(PARAMS)))
    assert not rows, _report(rows)


def test_the_exceptions_are_keys_of_params_yaml_with_a_none_default():
    """NO_CODE_DEFAULT names keys params.yaml sets and the code leaves None (it cannot outlive them)."""
    raw, default = read_yaml(PARAMS), code_defaults(Params)
    for key in NO_CODE_DEFAULT:
        r, d = raw, default
        for part in key.split("."):
            r, d = r[part], d[part]
        assert r is not None and d is None, key


def test_a_changed_default_or_value_is_named_with_both_values():
    """The comparison is not vacuous: a changed scalar, a nested preset value and an entry of a default map are each
    reported by dotted key with both values."""
    raw = copy.deepcopy(read_yaml(PARAMS))
    raw["train"]["epochs"] = 7
    raw["evaluate"]["melting"]["production"]["melt_steps"] = 9
    raw["bo_scan"]["oracle"]["kwargs"]["basis"] = "6-31g"
    raw["validate"]["energy_per_atom_range"]["default"] = [-30.0, 5.0]
    raw["promote"]["gates"]["val.force_mae"] = 0.2  # a gate: the code has none
    loaded = _json(Params.model_validate(raw, context={"root": REPO}))
    rows = disagreements(raw, code_defaults(Params), loaded)
    assert [(k, d, v) for k, d, v in rows] == [
        ("bo_scan.oracle.kwargs.basis", "sto-3g", "6-31g"),
        ("validate.energy_per_atom_range.default", [-20.0, 5.0], [-30.0, 5.0]),
        ("train.epochs", 400, 7),
        ("evaluate.melting.production.melt_steps", 200, 9)]
    text = _report(rows)
    assert "train.epochs: 400 != 7" in text and text.startswith("4 code default(s) differ")


@pytest.mark.parametrize("key", ["train.precompute_descriptors", "evaluate.nve.element", "bo_scan.path.file"])
def test_keys_only_the_code_has_are_left_to_it(key):
    raw, default = read_yaml(PARAMS), code_defaults(Params)
    *parents, last = key.split(".")
    for part in parents:
        raw, default = raw[part], default[part]
    assert last not in raw and last in default
