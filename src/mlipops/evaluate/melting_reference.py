"""The reference oracle's melting point (DVC stage ``melting_reference``, ``mlipops evaluate melting --reference``).

The coexistence method of :mod:`mlipops.evaluate.melting` with the reference oracle (``generate.oracle``; EMT for
the default copper) for ``reference_seeds`` seeds, in parallel through Dask; then pure-solid and pure-liquid NPT
runs at its Tm give the latent heat L, ΔS_m = L/Tm and labelled snapshots of both phases at Tm. The outputs
(``data/melting/reference.json`` with the traces, ``data/melting/reference_phases.extxyz``) are cached DVC
outputs that depend only on the oracle, the element and ``evaluate.melting``: retraining never reruns them.
The runners here (:class:`MemberFactory`, :func:`run_many`) also serve the members (:mod:`melting_stage`).

Or the reference is given (``evaluate.melting.reference: {tm_K, uncertainty_K, source}``, e.g. an experimental
Tm for DFT data: no one runs DFT coexistence here): reference.json then holds that value as ``tm_mean`` and its
uncertainty as ``tm_stderr``, with ``given: true`` and the source; no oracle runs, so there are no latent heat
and no phase snapshots (reference_phases.extxyz is empty) and the members' stage says so. An oracle that cannot
compute the element (EMT has no Mo, no Si) stops the stage with one line (exit 2) before any run.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path

import numpy as np
from ase import Atoms

from mlipops.errors import MlipopsError, OracleError
from mlipops.evaluate.melting import (STARTS, CoexistenceRun, _unit_cell, clausius_clapeyron, failed_run,
                                      phase_properties, run_coexistence, summarize)
from mlipops.params import Params
from mlipops.report import jsonable
from mlipops.pipeline import MELTING_REFERENCE as REFERENCE_JSON, MELTING_REFERENCE_DIR as REFERENCE_DIR, \
    MELTING_REFERENCE_PHASES as PHASES



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
        return run_coexistence(spec["factory"], spec["settings"], spec["seed"], on_steps=_step_reporter(spec),
                               start=spec.get("start", 0))
    except MlipopsError as exc:
        run = failed_run(spec["seed"], f"failed: {exc}", time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - a broken potential must not stop the other runs
        run = failed_run(spec["seed"], f"MD failed: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}", time.perf_counter() - t0)
    run.start = spec.get("start", 0)
    return run


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
    expected = [sp["settings"].calibration_md_steps() + sp["settings"].equilibration_steps
                + sp["settings"].production_steps for sp in specs]
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
    return r.summary() | {"times_fs": np.asarray(r.times_fs).tolist(),
                          "temperatures": np.asarray(r.temperatures).tolist(),
                          "solid_fraction": np.asarray(r.solid_fraction).tolist(),
                          "production_start_fs": r.production_start_fs}


def _run_from_json(d: dict) -> CoexistenceRun:
    keys = CoexistenceRun.__dataclass_fields__
    kw = {k: v for k, v in d.items() if k in keys}
    for k in ("temperatures", "times_fs", "solid_fraction"):
        kw[k] = np.asarray(kw.get(k, []), dtype=float)
    for k in ("tm", "tm_stderr", "t_start_liquid", "t_start_solid", "final_solid_fraction", "pressure_GPa",
              "drift_meV_per_atom_ps", "pressure_zz_GPa", "pressure_zz_stderr", "window_start_fs", "window_end_fs",
              "drift_K", "drift_se_K", "tm_full_production"):
        if kw.get(k) is None:
            kw[k] = float("nan")
    return CoexistenceRun(**kw)


def _stats(summary: dict) -> dict:
    return {k: summary[k] for k in ("tm_mean", "tm_std", "tm_stderr", "n_accepted", "n_rejected", "n_runs",
                                    "n_runs_converged", "n_bracketed", "pressure_zz_GPa")} | {"seeds": summary["seeds"]}


def coexistence_specs(factory, s, seeds, **extra) -> list[dict]:
    """One spec per seed and start (above and below the guess: :data:`~mlipops.evaluate.melting.STARTS`)."""
    return [{"factory": factory, "settings": s, "seed": sd, "start": st, **extra} for sd in seeds for st in STARTS]


def pressure_systematic(tm: float, pressure_zz_GPa: float, phases: dict | None, source: str) -> dict:
    """The Clausius–Clapeyron shift of a Tm measured at P_zz to P = 0 (:func:`~mlipops.evaluate.melting.
    clausius_clapeyron`), with ΔV and L from ``phases`` (the reference's pure solid and liquid at its Tm,
    :func:`phase_properties`) and where they come from; None terms with the reason when there are no phases.
    ``applied`` (set by the caller): the runs' Tm were shifted to P = 0 with this slope (NVE); else the term is
    a stated systematic of the value at P_zz (NPH on z leaves only its residual P_zz)."""
    if not phases:
        return {"pressure_zz_GPa": pressure_zz_GPa, "dtm_dp_K_per_GPa": None, "correction_K": None, "applied": False,
                "reason": "n/a: no reference solid and liquid at Tm (no latent heat and ΔV)"}
    cc = clausius_clapeyron(tm, phases["delta_v_A3_per_atom"], phases["latent_heat_eV_per_atom"],
                            pressure_zz_GPa)
    return cc | {"pressure_zz_GPa": pressure_zz_GPa, "source": source, "applied": False,
                 "delta_v_A3_per_atom": phases["delta_v_A3_per_atom"],
                 "latent_heat_eV_per_atom": phases["latent_heat_eV_per_atom"]}


def melting_crystal(p: Params) -> tuple[str, str]:
    """(element, lattice) of every melting run, the reference's and the members'. Element:
    ``evaluate.melting.element``, else ``crystal.element``, else the one element of ``validate.allowed_species``
    (your data's), else ``generate.element``. Lattice: ``evaluate.melting.lattice``, else ``crystal.lattice``,
    else the element's ASE reference state when it is a lattice the cell builder knows (Cu fcc, Mo bcc, Li bcc,
    Si diamond, Ti hcp), else fcc. Params only, never the data: the reference stays cached while the data
    changes. The one place both stages take them from."""
    from ase.data import atomic_numbers, reference_states

    from mlipops.crystal import LATTICES

    m = p.evaluate.melting
    species = list(p.validate_.allowed_species)
    element = m.element or p.crystal.element or (species[0] if len(species) == 1 else None) or p.generate.element
    if m.lattice:
        return element, m.lattice
    if p.crystal.lattice and (p.crystal.element in (None, element)):
        return element, p.crystal.lattice
    sym = (reference_states[atomic_numbers[element]] or {}).get("symmetry")
    return element, sym if sym in LATTICES else "fcc"


def check_oracle(factory: "OracleFactory", element: str, lattice: str) -> None:
    """Can the oracle compute ``element`` at all? One energy and forces of its conventional cell at the
    covalent-radius guess; the calculator's exception (EMT: "No EMT-potential for Mo") becomes one line naming
    the ways out."""
    name = factory.calculator
    way_out = ("give evaluate.melting.reference: {tm_K, uncertainty_K, source} or name an oracle that can "
               "(generate.oracle)")
    try:
        calc = factory()
    except MlipopsError as exc:
        raise OracleError(f"the reference oracle {name} cannot be built: {exc.detail}; {way_out}",
                          field="generate.oracle") from None
    except Exception as exc:  # noqa: BLE001 - any calculator's own error
        raise OracleError(f"the reference oracle {name} cannot be built: {exc}; {way_out}",
                          field="generate.oracle") from None
    from ase.data import atomic_numbers, covalent_radii

    from mlipops.crystal import NN_PER_A

    atoms = _unit_cell(element, lattice, 2.0 * covalent_radii[atomic_numbers[element]] / NN_PER_A[lattice])
    atoms.calc = calc
    try:
        e = atoms.get_potential_energy()
        f = atoms.get_forces()
    except Exception as exc:  # noqa: BLE001 - the calculator's own error says why (no parameters for it, ...)
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OracleError(f"the reference oracle {name} cannot compute {element}: {why}; {way_out}",
                          field="generate.oracle") from None
    if not (math.isfinite(float(e)) and np.all(np.isfinite(f))):
        raise OracleError(f"the reference oracle {name} cannot compute {element}: non-finite energy or forces of "
                          f"{lattice} {element}; {way_out}", field="generate.oracle")


def given_reference(p: Params, element: str, lattice: str) -> dict:
    """reference.json of a given reference (``evaluate.melting.reference``): no runs, no phases."""
    ref = p.evaluate.melting.reference
    return {"available": True, "given": True, "source": ref.source, "oracle": None, "element": element,
            "lattice": lattice, "preset": p.evaluate.melting.preset, "tm_mean": float(ref.tm_K), "tm_std": None,
            "tm_stderr": float(ref.uncertainty_K), "n_accepted": 0, "n_rejected": 0, "runs": [],
            "phases_reason": "n/a: given reference (no oracle runs, so no latent heat and no phase snapshots)"}


def run(p: Params) -> dict:
    """The reference oracle's Tm over seeds, then its solid and liquid at Tm (latent heat, snapshots); or the
    given reference (module doc)."""
    from mlipops.frames import write_extxyz
    from mlipops.report import progress

    t0 = time.perf_counter()
    m = p.evaluate.melting
    element, lattice = melting_crystal(p)
    s = m.settings(element, lattice)
    REFERENCE_DIR.mkdir(parents=True, exist_ok=True)
    if m.reference is not None:
        out = given_reference(p, element, lattice)
        write_extxyz(PHASES, [])
        out["wall_s"] = round(time.perf_counter() - t0, 1)
        REFERENCE_JSON.write_text(json.dumps(jsonable(out), indent=2) + "\n")
        return {"tm_ref": out["tm_mean"], "tm_ref_stderr": out["tm_stderr"], "source": out["source"],
                "wall_s": out["wall_s"]}
    preset = getattr(m, m.preset)
    factory = OracleFactory(p.generate.oracle.calculator, p.generate.oracle.kwargs)
    check_oracle(factory, element, lattice)
    seeds = [m.seed + i for i in range(preset.reference_seeds)]
    runs = run_many(coexistence_specs(factory, s, seeds), p.compute)
    summ = summarize(runs, agree_sigma=s.agree_sigma, require_agreement=s.require_agreement)
    ok = [r for r in runs if r.accepted]  # converged two-phase runs, whether or not their seed's starts agree
    frames: list[Atoms] = []
    ph, tm_phase = None, summ["tm_mean"]
    if ok:
        _single_thread()
        tm_phase = summ["tm_mean"] if summ["n_accepted"] else float(np.mean([r.tm for r in ok]))
        threshold = s.q6_solid_threshold if s.q6_solid_threshold is not None else \
            float(np.mean([r.order_threshold for r in ok]))  # the accepted runs' calibrations
        total = 2 * m.phase_steps + s.melt_steps
        with progress(f"reference solid and liquid at Tm = {tm_phase:.0f} K (MD steps)", total) as advance:
            ph = phase_properties(factory, s, tm_phase, m.phase_steps, m.phase_snapshots, seed=m.seed,
                                  threshold=threshold, on_steps=lambda n: advance(completed=n))
        frames = ph.pop("frames")
    pressure = pressure_systematic(tm_phase, summ["pressure_zz_GPa"], ph,
                                   "the reference's own solid and liquid at its Tm (phase_properties)")
    if s.ensemble == "nve" and pressure.get("dtm_dp_K_per_GPa") is not None:
        # NVE ends at the cell's own P_zz, which depends on how much melted: every run to P = 0 first
        summ = summarize(runs, agree_sigma=s.agree_sigma, dtm_dp=pressure["dtm_dp_K_per_GPa"],
                         require_agreement=s.require_agreement)
        pressure["applied"] = True
    out = {"available": summ["n_accepted"] > 0, "given": False, "oracle": p.generate.oracle.model_dump(),
           "element": element, "lattice": lattice, "preset": m.preset, "settings": s.__dict__, **_stats(summ),
           "pressure": pressure, "runs": [_run_json(r) for r in runs]}
    if ph is not None:
        out["phases"] = ph
    if not out["available"]:
        out["reason"] = "no reference seed was accepted: " + "; ".join(
            f"seed {sd['seed']}: {sd['rejected_reason']}" for sd in summ["seeds"])
    write_extxyz(PHASES, frames)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    REFERENCE_JSON.write_text(json.dumps(jsonable(out), indent=2) + "\n")
    if not out["available"]:
        return {"available": False, "reason": out["reason"], "wall_s": out["wall_s"]}
    return {"tm_ref": out["tm_mean"], "tm_ref_stderr": out["tm_stderr"], "n_accepted": out["n_accepted"],
            "latent_heat_eV_per_atom": out.get("phases", {}).get("latent_heat_eV_per_atom"),
            "pressure_zz_GPa": out["pressure"]["pressure_zz_GPa"],
            "pressure_correction_K": out["pressure"]["correction_K"], "wall_s": out["wall_s"]}
