"""Active learning: committee MD, the velocity-projected trigger, and oracle calls through Dask.

What exists (``mlipops active run``, params section ``active``):

- :mod:`mlipops.active.trigger`: the committee statistics of one MD step (per-atom force spread σ_F,
  the velocity-projected uncertainty σ_proj = std over members of Σᵢ Fᵢ·vᵢ times Δt, in eV), the
  trigger (projected, DP-GEN force trust level, or hull γ), and descriptor-fingerprint
  de-duplication of candidate frames.
- :mod:`mlipops.active.committee`: the ensemble ASE calculator with every member's forces.
- :mod:`mlipops.active.dispatch`: a batch of frames labelled by the oracle on a Dask cluster
  (LocalCluster, or ``compute.scheduler_address``), with retries with exponential back-off,
  time-outs, recorded failures, and label files written on the worker (resumable).
- :mod:`mlipops.active.state`: the loop's JSON state, written atomically after every step.
- :mod:`mlipops.active.loop`: iterations of MD → trigger → de-duplicated batch → oracle →
  ``data/raw/active_<iteration>.extxyz``; killed at any point and restarted, it resumes with no
  duplicate oracle call and no lost label.
- :mod:`mlipops.active.graduate`: ``mlipops active graduate``: a campaign's labels become a DVC-tracked
  source of the pipeline's dataset (``ingest.sources``, the ingest stage's deps), with the campaign's record.

Not yet here: retraining warm-started between iterations, the validate + index rerun on the new
frames, the ``dvc.yaml`` stage, MLflow logging of the iterations and the held-out trajectory error.
"""

from mlipops.active.trigger import Trigger, committee_stats, deduplicate, fingerprints

__all__ = ["Trigger", "committee_stats", "deduplicate", "fingerprints"]
