"""Dask for the project's parallel work (ensemble members, oracle calls).

``compute.scheduler_address`` in params.yaml connects to a running scheduler (a real cluster,
e.g. dask-jobqueue on SLURM: the workers must see the project's files at the same paths);
left null, a ``LocalCluster`` of worker processes is started for the job and shut down after it.
"""

from __future__ import annotations

import contextlib
import os
import warnings

from mlipops.errors import StageInputError
from mlipops.params import ComputeParams


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def dask_client(p: ComputeParams, n_tasks: int):
    """A ``distributed.Client``: to ``p.scheduler_address``, or to a LocalCluster of
    ``p.n_workers`` (default min(n_tasks, cores)) single-process workers with
    ``p.threads_per_worker`` threads each."""
    import logging

    from distributed import Client, LocalCluster

    for name in ("distributed", "distributed.worker", "distributed.scheduler", "distributed.nanny",
                 "distributed.core", "distributed.http.proxy"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if p.scheduler_address:
        try:
            client = Client(p.scheduler_address, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise StageInputError(f"cannot reach the Dask scheduler: {exc}",
                                  field="compute.scheduler_address") from None
        with client:
            yield client
        return
    n_workers = p.n_workers or max(1, min(n_tasks, cpu_count() // p.threads_per_worker or 1))
    import dask

    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 (give freed memory back to the OS at
    # once). Our tasks (MD steps, training batches) allocate and free many mid-sized numpy/torch buffers per
    # step; with that setting a coexistence MD run took 46 s instead of 15 s. Keep the thread limits only.
    environ = {k: v for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ") or {}).items()
               if k != "MALLOC_TRIM_THRESHOLD_"}
    with warnings.catch_warnings(), dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        warnings.simplefilter("ignore")
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=p.threads_per_worker, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()
