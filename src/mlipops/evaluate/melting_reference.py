"""The reference oracle's melting point (DVC stage ``melting_reference``, ``mlipops evaluate melting --reference``).

The coexistence method of :mod:`mlipops.evaluate.melting` with the reference oracle (``generate.oracle``; EMT for
the default copper) for ``reference_seeds`` seeds, in parallel through Dask; then pure-solid and pure-liquid NPT
runs at its Tm give the latent heat L, ΔS_m = L/Tm and labelled snapshots of both phases at Tm. The outputs
(``data/melting/reference.json`` with the traces, ``data/melting/reference_phases.extxyz``) are cached DVC
outputs that depend only on the oracle, the element and ``evaluate.melting``: retraining never reruns them.
The runners here (:class:`MemberFactory`, :func:`run_many`) also serve the members (:mod:`melting_stage`).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path

import numpy as np
from ase import Atoms

from mlipops.errors import MlipopsError, StageInputError
from mlipops.evaluate.melting import CoexistenceRun, failed_run, phase_properties, run_coexistence, summarize
from mlipops.params import Params
from mlipops.report import jsonable

REFERENCE_DIR = Path("data/melting")
REFERENCE_JSON = REFERENCE_DIR / "reference.json"
PHASES = REFERENCE_DIR / "reference_phases.extxyz"


# ------------------------------------------------------------------------------------------ calculators
class OracleFactory:
    """Picklable factory of the reference oracle's ASE calculator (for Dask workers)."""

    def __init__(self, calculator: str, kwargs: dict):
        self.calculator, self.kwargs = calculator, dict(kwargs)

    def __call__(self):
        from mlipops.oracles import get_oracle

        return get_oracle(self.calculator, self.kwargs).calculator()


class MemberFactory:
    """Picklable factory of an ``MlipopsCalculator`` over one ensemble member (``member=None``: the whole model)."""

    def __init__(self, model_dir: str | Path, member: int | None, trusted_calculators=None):
        self.model_dir, self.member = str(Path(model_dir).resolve()), member
        self.trusted_calculators = trusted_calculators  # the params' baseline calculator (models.schema)

    def __call__(self):
        import torch

        from mlipops.models.calculator import MlipopsCalculator
        from mlipops.models.ensemble import Ensemble, load_model

        model = load_model(self.model_dir, dtype=torch.float64, trusted_calculators=self.trusted_calculators)
        if self.member is not None and isinstance(model, Ensemble):
            model = model.members[self.member]
        return MlipopsCalculator(model, dtype=torch.float64, skin=1.0)  # Verlet list: MD steps skip the rebuild


def _single_thread():
    import torch

    torch.set_num_threads(1)
    try:
        import freud

        freud.parallel.set_num_threads(1)
    except Exception:  # noqa: BLE001 - freud's thread pool is an optimisation only
        pass


def _step_reporter(spec: dict):
    """``on_steps`` of a run in a Dask worker: ``(index, done, expected)`` into the queue ``run_many`` reads
    (at most every 2 s: a put is a round trip to the scheduler). None outside a worker."""
    if not spec.get("queue"):
        return None
    try:
        from distributed import Queue

        queue = Queue(spec["queue"])
    except Exception:  # noqa: BLE001 - not in a Dask worker: no progress channel
        return None
    last = [-math.inf]

    def report(done: int, expected: int):
        if time.monotonic() - last[0] >= 2.0:
            last[0] = time.monotonic()
            try:
                queue.put((spec["index"], done, expected))
            except Exception:  # noqa: BLE001 - progress is cosmetic: never fail a run for it
                pass
    return report


def coexistence_task(spec: dict) -> CoexistenceRun:
    """One seed's coexistence run on a worker; any failure of the calculator or the MD becomes a rejected run."""
    _single_thread()
    t0 = time.perf_counter()
    try:
        return run_coexistence(spec["factory"], spec["settings"], spec["seed"], on_steps=_step_reporter(spec))
    except MlipopsError as exc:
        return failed_run(spec["seed"], f"failed: {exc}", time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - a broken potential must not stop the other runs
        return failed_run(spec["seed"], f"MD failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                          time.perf_counter() - t0)


def run_many(specs: list[dict], compute) -> list[CoexistenceRun]:
    """Every spec's coexistence run, in parallel through Dask (``compute``: ComputeParams); order kept.
    Progress in MD steps (equilibration + production of every run; a rerun adds its steps), sent by the workers."""
    from distributed import Queue

    from mlipops.compute import dask_client
    from mlipops.report import progress

    if not specs:
        return []
    name = f"mlipops-melting-{uuid.uuid4().hex[:8]}"
    specs = [sp | {"queue": name, "index": i} for i, sp in enumerate(specs)]
    expected = [sp["settings"].equilibration_steps + sp["settings"].production_steps for sp in specs]
    done, finished = [0] * len(specs), set()
    with dask_client(compute, len(specs)) as client:
        queue = Queue(name, client=client)
        futures = client.map(coexistence_task, specs, pure=False)
        with progress("coexistence runs (MD steps)", sum(expected)) as advance:
            while len(finished) < len(futures):
                for i, n, e in queue.get(batch=True):
                    if i not in finished:
                        done[i], expected[i] = n, max(e, expected[i])
                for i, f in enumerate(futures):
                    if i not in finished and f.done():
                        finished.add(i)
                        done[i] = expected[i]
                advance(completed=sum(done), total=sum(expected), note=f"{len(finished)}/{len(futures)} runs done")
                if len(finished) < len(futures):
                    time.sleep(0.5)
        return client.gather(futures)


# ------------------------------------------------------------------------------------------ reference
def _run_json(r: CoexistenceRun) -> dict:
    """A run as JSON, traces included (for plots made by the later stage)."""
    return r.summary() | {"times_fs": np.asarray(r.times_fs).tolist(), "temperatures": np.asarray(r.temperatures).tolist(),
                          "solid_fraction": np.asarray(r.solid_fraction).tolist(),
                          "production_start_fs": r.production_start_fs}


def _run_from_json(d: dict) -> CoexistenceRun:
    keys = CoexistenceRun.__dataclass_fields__
    kw = {k: v for k, v in d.items() if k in keys}
    for k in ("temperatures", "times_fs", "solid_fraction"):
        kw[k] = np.asarray(kw.get(k, []), dtype=float)
    for k in ("tm", "tm_stderr", "t_start_liquid", "t_start_solid", "final_solid_fraction", "pressure_GPa",
              "drift_meV_per_atom_ps"):
        if kw.get(k) is None:
            kw[k] = float("nan")
    return CoexistenceRun(**kw)


def _stats(summary: dict) -> dict:
    return {k: summary[k] for k in ("tm_mean", "tm_std", "tm_stderr", "n_accepted", "n_rejected")}


def run_reference(p: Params) -> dict:
    """The reference oracle's Tm over seeds, then its solid and liquid at Tm (latent heat, snapshots)."""
    from mlipops.frames import write_extxyz

    t0 = time.perf_counter()
    m = p.evaluate.melting
    s = m.settings(p.generate.element)
    preset = getattr(m, m.preset)
    factory = OracleFactory(p.generate.oracle.calculator, p.generate.oracle.kwargs)
    try:
        factory()
    except MlipopsError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise StageInputError(f"the reference oracle cannot be built: {exc}", field="generate.oracle") from None
    seeds = [m.seed + i for i in range(preset.reference_seeds)]
    runs = run_many([{"factory": factory, "settings": s, "seed": sd} for sd in seeds], p.compute)
    summ = summarize(runs)
    out = {"available": summ["n_accepted"] > 0, "oracle": p.generate.oracle.model_dump(), "element": s.element,
           "lattice": s.lattice, "preset": m.preset, "settings": s.__dict__, **_stats(summ),
           "runs": [_run_json(r) for r in runs]}
    REFERENCE_DIR.mkdir(parents=True, exist_ok=True)
    frames: list[Atoms] = []
    if out["available"]:
        _single_thread()
        ph = phase_properties(factory, s, summ["tm_mean"], m.phase_steps, m.phase_snapshots, seed=m.seed)
        frames = ph.pop("frames")
        out["phases"] = ph
    else:
        out["reason"] = "no reference run coexisted: " + "; ".join(str(r.rejected_reason) for r in runs)
    write_extxyz(PHASES, frames)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    REFERENCE_JSON.write_text(json.dumps(jsonable(out), indent=2) + "\n")
    return {"tm_ref": out["tm_mean"], "tm_ref_stderr": out["tm_stderr"], "n_accepted": out["n_accepted"],
            "latent_heat_eV_per_atom": out.get("phases", {}).get("latent_heat_eV_per_atom"),
            "wall_s": out["wall_s"]}
