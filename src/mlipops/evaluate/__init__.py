"""The evaluation stages: ``errors`` (the ``evaluate`` stage: errors per split and config_type, parity
plots, reaction paths, uncertainty), ``defects``, ``melting_reference`` / ``melting_stage``, ``nve``.

Nothing is imported here: importing one stage's module must not pull in another's code (each stage's
``dvc.yaml`` deps are its import closure, checked by ``tests/test_dvc_contract.py``).
"""
