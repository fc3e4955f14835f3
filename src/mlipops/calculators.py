"""ASE calculators named by import path (``package.module.Class``): the oracle's ``generate.oracle.calculator``
(:func:`mlipops.oracles.get_oracle`) and a Δ-learning baseline's (``train.baseline.calculator``, a model
config's ``baseline.calculator``: :mod:`mlipops.models.baseline`, :mod:`mlipops.models.schema`). One importer
and one check of the keywords for all of them; which paths may be imported at all is the caller's decision."""

from __future__ import annotations

import importlib

from mlipops.errors import MlipopsError


def import_calculator(path: str, *, what: str = "calculator", error: type[MlipopsError] = MlipopsError, **where):
    """The object ``path`` names (its module imported, then the attribute): a calculator class or factory. One
    that cannot be imported is a one-line ``error``, "cannot import <what> 'path': why", with ``where``
    (``file``, ``field``)."""
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise error(f"cannot import {what} {path!r}: {exc}", **where) from None


def calculator_version(path: str) -> str:
    """The provenance of the calculator ``path``: its top package and that package's version ("ase-3.23.0"),
    or the package alone when it has no ``__version__`` (or cannot be imported)."""
    top = path.split(".")[0]
    try:
        return f"{top}-{importlib.import_module(top).__version__}"
    except Exception:  # noqa: BLE001 - a package without __version__
        return top


def unknown_keywords(factory, kwargs) -> tuple[list[str], list[str]]:
    """The keywords of ``kwargs`` that the calculator class ``factory`` does not know, and those it knows (its
    ``default_parameters``), both sorted; none when it lists none. ASE calculators store an unknown keyword
    silently: a typo would change nothing."""
    known = getattr(factory, "default_parameters", None)
    if not (isinstance(known, dict) and known):
        return [], []
    return sorted(set(kwargs) - set(known)), sorted(known)
