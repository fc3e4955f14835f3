"""The ``index`` stage: the DuckDB coverage index of the curated data, and read-only SQL over it."""

from mlipops.index.build import INDEX, build_index, check_structures, load_hull_index, query, run

__all__ = ["INDEX", "build_index", "check_structures", "load_hull_index", "query", "run"]
