"""The ``index`` stage (:mod:`mlipops.index.build`): the DuckDB coverage index of the curated data, and
read-only SQL over it. Nothing is imported here, so that the bond-angle fingerprints
(:mod:`mlipops.index.angles`, used by :mod:`mlipops.crystal`) come without DuckDB and the quality stage."""
