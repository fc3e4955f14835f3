"""The active-learning iterations: committee MD → trigger → de-duplicated batch → oracle (Dask) → data.

One iteration, in three phases, each persisted in ``<work_dir>/state.json`` (:mod:`mlipops.active.state`):

``md``
    Every structure of ``active.structures`` runs MD (Langevin NVT through ``md.temperatures_K`` in
    order, or NVE from Maxwell-Boltzmann velocities at the first temperature) with the ensemble
    (:class:`~mlipops.active.committee.CommitteeCalculator`). After each step the committee statistics
    (:func:`~mlipops.active.trigger.committee_stats`) go through the :class:`~mlipops.active.trigger.Trigger`;
    a step that fires adds a copy of the structure to the candidates, with ``info``: ``config_type``
    ``active_<mode>``, ``source`` ``active``, ``temperature_K``, ``active_iteration``, ``active_run``,
    ``active_step``, ``sigma_projected`` (eV), ``max_sigma_f`` (eV/Å), ``trigger_reason``. Every
    ``md.checkpoint_every`` steps the candidates, an MD snapshot (positions, momenta) and the Langevin
    generator's state are saved, so a restart goes on from the last checkpoint.
``select``
    The candidates are de-duplicated on descriptor fingerprints (also against the frames of earlier
    iterations' ``active_<i>.extxyz``), highest trigger statistic first, at most ``max_batch``; with
    an index, each selected frame gets its largest per-atom hull grade ``gamma_max``.
``label``
    The selected frames go to the oracle through Dask (:func:`~mlipops.active.dispatch.label_batch`:
    retries, time-outs, label files written on the worker); the labelled frames are written to
    ``<out_dir>/active_<iteration>.extxyz`` in selection order, the frames that kept failing to
    ``<work_dir>/iter_<i>/failed.json`` (frame id, attempts, last error).

``curate``
    The labelled file is ingested, validated and indexed on top of the campaign's curated data
    (:mod:`mlipops.active.curate`); quarantined frames keep their reason.
``train``
    Every member is warm-started from its last weights on the grown data (:mod:`mlipops.active.retrain`);
    the next iteration's MD runs with the new committee.
``score``
    The committee's errors on the fixed held-out trajectory (:mod:`mlipops.active.holdout`), logged with
    every count of the iteration to a nested MLflow run, appended to ``history``.
"""

from __future__ import annotations

import logging
import hashlib
import json
from pathlib import Path

import numpy as np
from ase import Atoms, units

from mlipops.active.committee import CommitteeCalculator
from mlipops.active.dispatch import label_batch
from mlipops.active.state import ActiveState, load_or_start
from mlipops.active.trigger import Trigger, committee_stats, deduplicate, fingerprints
from mlipops.active.structures import build_structure
from mlipops.crystal import Crystal, resolve, train_frames
from mlipops.errors import StageInputError
from mlipops.frames import file_md5, read_extxyz, write_extxyz, write_manifest
from mlipops.params import ActiveParams, ComputeParams, Params
from mlipops.paths import atomic_path, ensure_writable, safe_move, safe_remove
from mlipops.pipeline import ACCEPTED as DATA

# statistics used to rank candidates, per trigger mode
_SCORE = {"projected": "sigma_projected", "force": "max_sigma_f", "gamma": "gamma_max", "random": "random_score"}
# knobs that do not change what the loop computes: a state written with other values is still valid
_OPERATIONAL = {"retries", "backoff_s", "timeout_s", "iterations", "mlflow"}

logger = logging.getLogger(__name__)


def params_fingerprint(p: ActiveParams, model_dir: str | Path, params: Params | None = None) -> str:
    """What the campaign computes depends on: the active params (not the operational knobs), the seed
    model, and, when it curates and retrains, the split rule, validation, index, descriptor and training
    settings."""
    doc = {k: v for k, v in p.model_dump(mode="json").items() if k not in _OPERATIONAL}
    md, root = Path(model_dir).resolve(), Path.cwd().resolve()  # project-relative: a moved project resumes
    doc["model_dir"] = md.relative_to(root).as_posix() if md.is_relative_to(root) else str(md)
    weights = Path(model_dir) / "weights.pt"
    doc["model_md5"] = file_md5(weights) if weights.is_file() else None  # a retrained seed model: a new campaign
    if params is not None and p.base_data is not None:
        doc["pipeline"] = {"split": params.ingest.split.model_dump(mode="json"),
                           "validate": params.validate_.model_dump(mode="json"),
                           "index": params.index.model_dump(mode="json"),
                           "descriptors": params.descriptors.model_dump(mode="json"),
                           "train": {k: v for k, v in params.train.model_dump(mode="json").items()
                                     if k not in ("device", "tracking_uri", "experiment", "artifact_location")}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def active_crystal(params: Params) -> Crystal:
    """The crystal the starting structures are built from: the ``crystal`` params (``active.element`` where
    set), their nulls from the training split of ``active.base_data`` (or the curated data)."""
    a, cp = params.active, params.crystal
    if a.element is not None and a.element != cp.element:
        cp = cp.model_copy(update={"element": a.element, "a": None, "c": None})
    return resolve(cp, train_frames(a.base_data or DATA))


def _iter_dir(work_dir: Path, it: int) -> Path:
    d = work_dir / f"iter_{it:03d}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _read_plain(path: str | Path) -> Atoms:
    import ase.io

    return ase.io.read(str(path), format="extxyz")


def _save_candidates(path: Path, cands: list[Atoms]) -> None:
    write_extxyz(path, cands)  # tmp + rename


def _load_candidates(st: ActiveState) -> list[Atoms]:
    if not st.n_candidates or not st.candidates_file or not Path(st.candidates_file).is_file():
        return []
    frames, rejected = read_extxyz(st.candidates_file)
    if rejected:
        raise StageInputError("unreadable candidate frame", file=st.candidates_file, frame=rejected[0].source_index)
    return frames[: st.n_candidates]  # a file written after the last saved state holds a few more


class _Hull:
    """Per-atom γ of structures against the index's hulls (loaded once)."""

    def __init__(self, index: str | Path):
        from mlipops.index.build import load_hull_index

        self.h = load_hull_index(Path(index))

    def gamma(self, atoms: Atoms) -> np.ndarray:
        from mlipops.descriptors import compute_descriptors

        g, unseen = compute_descriptors([atoms], self.h.species, self.h.descriptor)
        return self.h.evaluate(np.array(atoms.get_chemical_symbols()), g, unseen)["extrapolation_grade"]


def _md_phase(p: ActiveParams, st: ActiveState, calc: CommitteeCalculator, crystal: Crystal, hull: _Hull | None,
              work_dir: Path, progress) -> None:
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    md, dt = p.md, p.md.timestep_fs
    trigger = Trigger(p.mode, p.sigma_projected_eV, p.sigma_force_eVA, p.gamma_max)
    it_dir = _iter_dir(work_dir, st.iteration)
    cands = _load_candidates(st)
    cand_path = it_dir / "candidates.extxyz"
    total = len(md.temperatures_K) * md.steps_per_temperature
    while st.md_run < len(p.structures):
        rng = np.random.default_rng([p.seed, st.iteration, st.md_run])
        if st.md_snapshot:
            atoms = _read_plain(st.md_snapshot)
            if st.md_rng:
                rng.bit_generator.state = st.md_rng
        else:
            atoms = build_structure(p.structures[st.md_run], crystal)
            MaxwellBoltzmannDistribution(atoms, temperature_K=md.temperatures_K[0], rng=rng)
            Stationary(atoms)
        atoms.calc = calc
        atoms.set_constraint(FixCom())  # the centre of mass stays put (Langevin noise would move it)
        if md.dynamics == "langevin":
            dyn = Langevin(atoms, dt * units.fs, temperature_K=md.temperatures_K[0], friction=md.friction / units.fs,
                           fixcm=False, rng=rng)
        else:
            dyn = VelocityVerlet(atoms, dt * units.fs)
        while st.md_step < total:
            temperature = md.temperatures_K[st.md_step // md.steps_per_temperature]
            if md.dynamics == "langevin":
                dyn.set_temperature(temperature_K=temperature)
            dyn.run(1)
            st.md_step += 1
            st.md_steps_total += 1
            atoms.get_forces()  # cached: the forces of the current positions
            stats = committee_stats(calc.results["forces_members"], atoms.get_velocities(), dt)
            gamma = float(np.max(hull.gamma(atoms))) if (hull is not None and p.mode == "gamma") else None
            fires, reason = trigger.check(stats, gamma)
            _accumulate(st.md_stats, stats, gamma)
            if fires:
                c = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
                c.info.update(config_type=f"active_{p.mode}", source="active", temperature_K=float(temperature),
                              structure=str(atoms.info.get("structure", p.structures[st.md_run].kind)),
                              active_iteration=st.iteration, active_run=st.md_run, active_step=st.md_step,
                              sigma_projected=stats["sigma_projected"], max_sigma_f=stats["max_sigma_f"],
                              trigger_reason=reason)
                if gamma is not None:
                    c.info["gamma_max"] = gamma
                if p.mode == "random":  # a uniform draw of its own (the MD's generator is not touched)
                    c.info["random_score"] = float(np.random.default_rng(
                        [p.seed, st.iteration, st.md_run, st.md_step, 7]).random())
                cands.append(c)
            if progress is not None:
                progress(st, stats, fires)
            if st.md_step % md.checkpoint_every == 0 or st.md_step == total:
                _checkpoint(st, atoms, rng, cands, cand_path, it_dir)
        st.md_run += 1
        st.md_step = 0
        old, st.md_snapshot, st.md_rng = st.md_snapshot, None, None
        st.save()
        if old:
            safe_remove(old)


def _accumulate(acc: dict, stats: dict, gamma: float | None) -> None:
    """Running sums and maxima of the trigger statistics over the iteration's MD steps."""
    values = {"sigma_projected": stats["sigma_projected"], "max_sigma_f": stats["max_sigma_f"]}
    if gamma is not None:
        values["gamma_max"] = gamma
    acc["steps"] = acc.get("steps", 0) + 1
    for k, v in values.items():
        acc[f"{k}_sum"] = acc.get(f"{k}_sum", 0.0) + float(v)
        acc[f"{k}_max"] = max(acc.get(f"{k}_max", float("-inf")), float(v))


def trigger_summary(acc: dict) -> dict:
    """Mean and maximum over the MD steps of each trigger statistic (eV, eV/Å, γ)."""
    n = acc.get("steps", 0)
    out = {}
    for k in ("sigma_projected", "max_sigma_f", "gamma_max"):
        if n and f"{k}_sum" in acc:
            out[f"{k}.mean"] = acc[f"{k}_sum"] / n
            out[f"{k}.max"] = acc[f"{k}_max"]
    return out


def _checkpoint(st: ActiveState, atoms: Atoms, rng, cands: list[Atoms], cand_path: Path, it_dir: Path) -> None:
    """Candidates, then a new snapshot, then the state that names both (so a kill between any two
    writes leaves a consistent state: the state always names complete files)."""
    import ase.io

    _save_candidates(cand_path, cands)
    snap = it_dir / f"md_run{st.md_run}_step{st.md_step}.extxyz"
    a = atoms.copy()  # positions and momenta, without the calculator and the constraint
    a.calc = None
    a.set_constraint()
    with atomic_path(snap) as tmp:
        ase.io.write(str(tmp), a, format="extxyz")
    old = st.md_snapshot
    st.md_snapshot, st.md_rng = str(snap), rng.bit_generator.state
    st.candidates_file, st.n_candidates = str(cand_path), len(cands)
    st.save()
    if old and old != str(snap):
        safe_remove(old)


def _previous_frames(out_dir: Path, iteration: int) -> list[Atoms]:
    prev = []
    for i in range(iteration):
        f = out_dir / f"active_{i}.extxyz"
        if f.is_file():
            prev += read_extxyz(f)[0]
    return prev


def _select_phase(p: ActiveParams, st: ActiveState, calc: CommitteeCalculator, hull: _Hull | None,
                  work_dir: Path, out_dir: Path) -> None:
    cands = _load_candidates(st)
    model = calc.model
    fps = fingerprints(cands, model.species, model.descriptor_params)
    prev = fingerprints(_previous_frames(out_dir, st.iteration), model.species, model.descriptor_params)
    scores = [float(c.info.get(_SCORE[p.mode], 0.0)) for c in cands]
    chosen = deduplicate(cands, fps, p.dedup_min_distance, p.max_batch, previous=prev, scores=scores)
    selected = [cands[k] for k in chosen]
    if hull is not None:
        for c in selected:
            c.info["gamma_max"] = float(np.max(hull.gamma(c)))
    path = _iter_dir(work_dir, st.iteration) / "selected.extxyz"
    frames = []
    if selected:
        write_extxyz(path, selected)
        frames, _ = read_extxyz(path)  # ids from the file's positions: the same as the label files will give
    st.selected, st.selected_file = [a.info["frame_id"] for a in frames], (str(path) if frames else None)
    st.phase = "label"
    st.save()


def _label_phase(p: ActiveParams, st: ActiveState, oracle, compute: ComputeParams, work_dir: Path,
                 out_dir: Path) -> dict:
    from mlipops.compute import dask_client

    frames = read_extxyz(st.selected_file)[0] if st.selected_file else []
    todo = [a for a in frames if a.info["frame_id"] not in st.labelled and a.info["frame_id"] not in st.failed]
    label_dir = _iter_dir(work_dir, st.iteration) / "labels"
    counts = {"oracle_calls": 0, "reused_labels": 0}

    def on_update(fid: str, status: str, record: dict) -> None:
        if status == "submitted" and fid not in st.pending:
            st.pending.append(fid)
        elif status in ("labelled", "failed"):
            if fid in st.pending:
                st.pending.remove(fid)
            if status == "labelled":
                st.labelled[fid] = record["file"]
            else:
                st.failed[fid] = {"attempts": record["attempts"], "error": record["error"]}
        else:
            return
        st.save()

    if todo:
        with dask_client(compute, len(todo)) as client:
            res = label_batch(todo, oracle, client, retries=p.retries, backoff_s=p.backoff_s, timeout_s=p.timeout_s,
                              label_dir=label_dir, on_update=on_update)
        counts = {"oracle_calls": res.oracle_calls, "reused_labels": res.reused}
    from mlipops.active.dispatch import read_label

    labelled = [read_label(Path(st.labelled[a.info["frame_id"]])) for a in frames if a.info["frame_id"] in st.labelled]
    failures = [{"frame_id": fid} | rec for fid, rec in st.failed.items()]
    (_iter_dir(work_dir, st.iteration) / "failed.json").write_text(json.dumps(failures, indent=1) + "\n")
    out = out_dir / f"active_{st.iteration}.extxyz"
    if labelled:
        write_extxyz(out, labelled)
        write_manifest(out, labelled, "mlipops active run")  # its oracle_* survive curate and ingest
    return counts | {"labelled": len(labelled), "failed": len(st.failed), "file": str(out) if labelled else None}


def _current_index(p: ActiveParams, st: ActiveState) -> Path | None:
    idx = st.curated.get("index") or p.index
    return Path(idx) if idx and Path(idx).is_file() else None


def _curate_phase(params: Params, st: ActiveState, work_dir: Path) -> None:
    from mlipops.active.curate import curate

    p = params.active
    out = st.info.get("file")
    if p.base_data is not None and out:
        prev_acc = st.curated.get("accepted") or p.base_data
        prev_q = st.curated.get("quarantine") or p.base_quarantine
        c = curate(out, prev_acc, prev_q, params, _iter_dir(work_dir, st.iteration) / "curated")
        st.curated = {k: c.pop(k) for k in ("accepted", "quarantine", "index")}
        st.info |= {f"curate.{k}": v for k, v in c.items()}
    st.phase = "train"
    st.save()


def _train_phase(params: Params, st: ActiveState, seed_model: Path, work_dir: Path, ml: "_Tracker | None") -> None:
    from mlipops.active.retrain import retrain

    p = params.active
    new = st.info.get("curate.n_accepted_new", 0)
    if p.retrain.enabled and new and st.curated.get("accepted"):
        it_dir = _iter_dir(work_dir, st.iteration)
        members = ml.member_runs(st, _n_members(st.model_dir or seed_model, params)) if ml else None
        m = retrain(st.model_dir or seed_model, st.curated["accepted"], params, it_dir / "model",
                    it_dir / "checkpoints", run_ids=members, tracking_uri=ml.uri if ml else None)
        st.model_dir = str(it_dir / "model")
        st.info |= {f"train.{k}": v for k, v in m.items()}
    st.phase = "score"
    st.save()


def _n_members(model_dir, params: Params) -> int:
    from mlipops.models.ensemble import read_config
    from mlipops.models.schema import trusted_calculators

    return int(read_config(model_dir, trusted_calculators(params)).get("n_members", 1))


class _Tracker:
    """MLflow runs of a campaign: a parent run, one nested run per iteration (its metrics: MD steps,
    triggers, oracle calls, labels, curation counts, hold-out errors, trigger statistics), and the
    retraining members nested under their iteration. Run ids live in the state, so a resumed campaign
    logs into the same runs."""

    CURVE = ("holdout.force_mae", "holdout.energy_mae_per_atom", "holdout.phase.liquid.force_mae")

    def __init__(self, params: Params, st: ActiveState, fingerprint: str, model_dir: Path):
        from mlipops.params import flatten
        from mlipops import tracking

        t = params.train
        self.uri = tracking.tracking_uri(t.tracking_uri)
        self.client = tracking.client(t.tracking_uri)
        self.exp = tracking.experiment_id(t.tracking_uri, t.experiment, t.artifact_location)
        self.tags = {"mlipops.stage": "active", "mlipops.model_name": t.model_name, "git.commit": tracking.git_commit(),
                     "mlipops.active_fingerprint": fingerprint, "active.mode": params.active.mode}
        if not st.mlflow.get("parent_run_id"):
            r = self.client.create_run(self.exp,
                                       run_name=f"active-{t.model_name}-{params.active.mode}-{fingerprint[:8]}",
                                       tags=self.tags | {"seed_model": str(model_dir)})
            self._params(r.info.run_id, {f"active.{k}": v for k, v in flatten(params.active).items()})
            st.mlflow["parent_run_id"] = r.info.run_id
            st.save()
        self.parent = st.mlflow["parent_run_id"]

    def _params(self, run_id: str, d: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in d.items()]
        for s in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[s:s + 100])

    def iteration_run(self, st: ActiveState) -> str:
        if not st.mlflow.get("iteration_run_id"):
            r = self.client.create_run(self.exp, run_name=f"active-iter-{st.iteration}",
                                       tags=self.tags | {"mlflow.parentRunId": self.parent,
                                                         "active.iteration": str(st.iteration)})
            st.mlflow["iteration_run_id"] = r.info.run_id
            st.save()
        return st.mlflow["iteration_run_id"]

    def member_runs(self, st: ActiveState, n: int) -> list[str]:
        if len(st.mlflow.get("member_run_ids") or []) != n:
            parent = self.iteration_run(st)
            ids = [self.client.create_run(self.exp, run_name=f"active-iter-{st.iteration}-member-{k}",
                                          tags=self.tags | {"mlflow.parentRunId": parent, "member": str(k)}).info.run_id
                   for k in range(n)]
            st.mlflow["member_run_ids"] = ids
            st.save()
        return st.mlflow["member_run_ids"]

    def log_iteration(self, st: ActiveState, row: dict) -> None:
        import time

        from mlflow.entities import Metric

        rid = self.iteration_run(st)
        ts = int(time.time() * 1000)
        nums = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and np.isfinite(v)}
        self.client.log_batch(rid, metrics=[Metric(k.replace("/", "_"), v, ts, 0) for k, v in nums.items()])
        # the parent carries the learning curve: step = oracle calls so far
        curve = {k: nums[k] for k in (*self.CURVE, "labelled", "triggers") if k in nums}
        self.client.log_batch(self.parent, metrics=[Metric(k, v, ts, int(nums.get("oracle_calls_total", 0)))
                                                    for k, v in curve.items()])
        self.client.set_terminated(rid, "FINISHED")

    def log_initial(self, scores: dict) -> None:
        """The seed committee's hold-out errors: the learning curve's point at 0 oracle calls."""
        from mlflow.entities import Metric

        self.client.log_batch(self.parent, metrics=[Metric(k, float(v), 0, 0) for k, v in scores.items()
                                                    if k in self.CURVE])

    def finish(self) -> None:
        self.client.set_terminated(self.parent, "FINISHED")


def _score(p: ActiveParams, holdout_frames, model_dir, trusted=None) -> dict:
    from mlipops.active.holdout import errors

    if holdout_frames is None:
        return {}
    return {f"holdout.{k}": v for k, v in errors(str(model_dir), holdout_frames, trusted).items()}


def archive_campaign(work_dir: Path, out_dir: Path) -> Path:
    """Move a campaign's files (everything in ``work_dir`` but earlier archives) and its labels
    (``out_dir/active_*.extxyz``) to ``<work_dir>/archive/<UTC time>/``: nothing is deleted."""
    import time

    dest = work_dir / "archive" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    k = 0
    while dest.exists():
        k += 1
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{k}")
    dest.mkdir(parents=True)
    for f in sorted(work_dir.iterdir()):
        if f.name != "archive":
            safe_move(f, dest / f.name)
    labels = sorted(out_dir.glob("active_*.extxyz")) if out_dir.is_dir() else []
    if labels:
        (dest / "labels").mkdir()
        for f in labels:
            safe_move(f, dest / "labels" / f.name)
    return dest


def run(params: Params, oracle, model_dir: str | Path, crystal: Crystal, progress=None) -> dict:
    """Run (or resume) ``active.iterations`` iterations; returns a summary (per-iteration ``history``).

    Each iteration: MD with the current committee → trigger → de-duplicated batch → oracle (Dask) →
    ``<out_dir>/active_<i>.extxyz`` → curation (ingest, validate, index: :mod:`mlipops.active.curate`)
    → warm-started retraining (:mod:`mlipops.active.retrain`) → the new committee's errors on the fixed
    held-out trajectory (:mod:`mlipops.active.holdout`). ``history[0]`` and later hold the numbers of each
    iteration; ``initial`` the seed model's hold-out errors (0 oracle calls)."""
    from mlipops.models.schema import trusted_calculators

    p, compute = params.active, params.compute
    trusted = trusted_calculators(params)  # the only baseline calculator besides the built-ins a model may name
    work_dir, out_dir, seed_model = Path(p.work_dir), Path(p.out_dir), Path(model_dir)
    for d in (work_dir, out_dir):  # validated in params; checked again where the files go
        ensure_writable(d, what="write to")
    work_dir.mkdir(parents=True, exist_ok=True)
    fp = params_fingerprint(p, model_dir, params)
    try:
        st = load_or_start(work_dir / "state.json", fp)
    except StageInputError as exc:
        if exc.field != "params_fingerprint":
            raise
        archive = archive_campaign(work_dir, out_dir)
        logger.warning(f"{work_dir / 'state.json'} belongs to a campaign of other params or another seed model; "
              f"it is kept, with its labels, in {archive}; starting a new campaign")
        st = load_or_start(work_dir / "state.json", fp)
    if p.mode == "gamma" and _current_index(p, st) is None:
        raise StageInputError("trigger mode 'gamma' needs the coverage index (run `dvc repro index`)",
                              file=str(p.index), field="active.index")
    holdout_frames = None
    if p.holdout.enabled:
        from mlipops.active.holdout import load_or_generate

        holdout_frames, _ = load_or_generate(p.holdout, crystal, oracle, work_dir)
    ml = _Tracker(params, st, fp, seed_model) if p.mlflow else None
    if "initial" not in st.mlflow and holdout_frames is not None:
        st.mlflow["initial"] = _score(p, holdout_frames, seed_model, trusted)
        if ml:
            ml.log_initial(st.mlflow["initial"])
        st.save()
    calc, calc_dir = None, None
    while st.iteration < p.iterations:
        current = Path(st.model_dir) if st.model_dir else seed_model
        if calc is None or calc_dir != current:
            calc, calc_dir = CommitteeCalculator(current, skin=0.5, trusted_calculators=trusted), current
        idx = _current_index(p, st)
        hull = _Hull(idx) if idx is not None else None
        if st.phase == "md":
            _md_phase(p, st, calc, crystal, hull, work_dir, progress)
            _select_phase(p, st, calc, hull, work_dir, out_dir)
        if st.phase == "label":
            counts = _label_phase(p, st, oracle, compute, work_dir, out_dir)
            st.oracle_calls_total += counts["oracle_calls"] + counts["reused_labels"]
            st.info |= counts | {"oracle_calls_total": st.oracle_calls_total}
            st.phase = "curate"
            st.save()
        if st.phase == "curate":
            _curate_phase(params, st, work_dir)
        if st.phase == "train":
            _train_phase(params, st, seed_model, work_dir, ml)
        row = {"iteration": st.iteration, "md_steps": st.md_steps_total, "triggers": st.n_candidates,
               "selected": len(st.selected), **st.info, **trigger_summary(st.md_stats),
               **_score(p, holdout_frames, st.model_dir or seed_model, trusted),
               "model": st.model_dir or str(seed_model)}
        if ml:
            ml.log_iteration(st, row)
        st.history.append(row)
        st.new_iteration()
        st.save()
    if ml:
        ml.finish()
    return {"iterations": st.iteration, "history": st.history, "initial": st.mlflow.get("initial", {}),
            "model": st.model_dir or str(seed_model), "curated": st.curated}
