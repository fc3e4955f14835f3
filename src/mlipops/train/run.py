"""The ``train`` stage: an ensemble of potentials trained in parallel through Dask, tracked in MLflow,
resumable after a kill.

MLflow layout (one experiment, ``train.experiment``): a parent run ``<model>-ensemble`` holding the
params, the ensemble's final metrics, plots and the model files (artifact path ``model``: the same
weights.pt + config.json the registry uses), and one nested run ``<model>-member-<k>`` per member with
its per-epoch metrics (overall and per ``config_type``, train and val). With ``train.curriculum`` each
member run holds one nested run ``<model>-member-<k>-phase-<i>`` per phase (tag ``curriculum_phase: i``,
the phase's own epoch numbers; the member run has all phases on one cumulative epoch axis).
Tags: ``stage``, ``dataset``,
``member``, ``curriculum_phase``, ``model_name``, ``data.dvc_md5``, ``git.commit``.

Resume: ``data/checkpoints/<model>/`` holds ``state.json`` (the run's fingerprint and MLflow run ids)
and one checkpoint per member (every ``train.checkpoint_every`` epochs; ``member_<k>.done.pt`` once a
member has finished). Running the stage again with the same params and data continues the same MLflow
runs from the last checkpoints; finished members are not retrained. A different fingerprint starts
afresh. The directory is removed when the ensemble is saved.
"""

from __future__ import annotations

import logging
import dataclasses
import json
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from mlipops.models.ensemble import Ensemble
from mlipops.models.potential import Potential
from mlipops.errors import StageInputError
from mlipops.params import ComputeParams, DescriptorParams, TrainParams, flatten
from mlipops.paths import safe_remove
from mlipops.report import parity_plot, progress, write_csv, write_markdown, write_metrics
from mlipops import tracking
from mlipops.frames import load_split
from mlipops.pipeline import (ACCEPTED as DATA, BASELINE_CACHE, CHECKPOINT_DIR, LEARNING_CURVE_COLUMNS,
                              LEARNING_CURVE_CSV, MODELS_DIR, TRAIN_REPORTS as REPORT_DIR)
from mlipops.train.loop import (DTYPES, Checkpointer, Prepared,
                                _cpu_state, evaluate_split, fingerprint, fit, make_potential, prepare,
                                feature_statistics, resolve_device, species_of, target_statistics)
from mlipops.train import curriculum

# params that do not change the numbers: a run may resume across them
_NON_NUMERIC = {"experiment", "tracking_uri", "artifact_location", "device", "checkpoint_every"}

logger = logging.getLogger(__name__)


def run_fingerprint(p: TrainParams, d: DescriptorParams, data_md5: str) -> str:
    train = {k: v for k, v in p.model_dump().items() if k not in _NON_NUMERIC}
    return fingerprint({"train": train, "descriptors": d.model_dump(), "data": data_md5})


def bootstrap_indices(n: int, seed: int, member: int, enabled: bool, n_members: int) -> np.ndarray:
    """Frames of member ``member``: a resample with replacement (seeded by seed and member) when
    bootstrapping an ensemble of more than one member, else every frame once."""
    if not enabled or n_members == 1:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, member, 0xB007]).integers(0, n, n))


def _retrying(fn, *args, tries: int = 6, **kwargs):
    """MLflow calls from several processes into one sqlite store can meet a lock: retry, never crash."""
    for attempt in range(tries):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if attempt == tries - 1:
                logger.warning(f"MLflow logging failed ({type(exc).__name__}: {str(exc)[:200]}); training goes on")
                return None
            time.sleep(0.1 * 2**attempt)


@dataclasses.dataclass(frozen=True)
class MemberSpec:
    """What one ensemble member's training needs, sent to a Dask worker (plain data: it is pickled there)."""

    member: int
    n_members: int
    train: dict  # TrainParams.model_dump() of the ensemble (the member's seed is train["seed"] + member)
    descriptors: dict  # DescriptorParams.model_dump()
    species: list[str]
    data_path: str  # the curated extxyz (absolute: the worker's cwd may differ)
    key: str  # the run fingerprint: checkpoints of other settings or data are ignored
    checkpoint_dir: str
    bootstrap: bool
    threads: int
    device: str
    baseline_cache: str
    tracking_uri: str | None = None
    run_id: str | None = None  # the member's MLflow run (None: no MLflow, e.g. benchmarks)
    phase_run_ids: list[str] | None = None  # one MLflow run per curriculum phase
    queue: str | None = None  # the Dask queue of per-epoch progress
    init_state: dict | None = None  # warm start (active learning): the member's last weights

    def params(self) -> tuple[TrainParams, DescriptorParams]:
        p = TrainParams.model_validate(self.train).model_copy(update={"seed": self.train["seed"] + self.member})
        return p, DescriptorParams.model_validate(self.descriptors)


class _EpochLog:
    """Per-epoch metrics to MLflow, sent in batches at each checkpoint epoch (one sqlite write per run every
    ``checkpoint_every`` epochs instead of every epoch: with fast epochs the writes dominated), and the
    epoch to the progress queue. Epochs after the last checkpoint are re-run, and re-logged, after a kill."""

    def __init__(self, client, run_ids: list[str], offset: int, every: int, queue, member: int):
        self.client, self.run_ids, self.offset, self.every = client, run_ids, offset, every
        self.queue, self.member = queue, member
        self.pending: dict[str, list] = {rid: [] for rid in run_ids}

    def __call__(self, row):
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for rid, step in zip(self.run_ids, (self.offset + row["epoch"], row["epoch"])):
            self.pending[rid] += [Metric(key, float(v), ts, step) for key, v in row.items()
                                  if key != "epoch" and np.isfinite(v)]
        if row["epoch"] % self.every == 0:
            self.flush()
        if self.queue is not None:
            _retrying(self.queue.put, (self.member, self.offset + row["epoch"]), tries=2)

    def flush(self):
        for rid, batch in self.pending.items():
            for s in range(0, len(batch) if self.client is not None else 0, 1000):
                _retrying(self.client.log_batch, rid, metrics=batch[s:s + 1000])
            batch.clear()


def _progress_queue(name: str | None):
    """The Dask queue ``name`` of per-epoch progress, or None (none asked, or not in a Dask worker)."""
    if not name:
        return None
    try:
        from distributed import Queue

        return Queue(name)
    except Exception:  # noqa: BLE001 - not in a Dask worker: no progress channel
        return None


def _log_final(client, run_id: str, metrics: dict, best_epoch: int, wall: float) -> None:
    """A finished run's final metrics (per split, ``by_config`` left to the reports), best epoch and wall time;
    the run marked FINISHED."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    _retrying(client.log_batch, run_id, metrics=[
        Metric(f"final_{s}_{m}", float(v), ts, 0) for s, ms in metrics.items()
        for m, v in ms.items() if m != "by_config" and np.isfinite(v)]
        + [Metric("best_epoch", best_epoch, ts, 0), Metric("wall_time_s", wall, ts, 0)])
    _retrying(client.set_terminated, run_id, "FINISHED")


def train_member(spec: MemberSpec) -> dict:
    """One ensemble member, run in a Dask worker (or in-process): its curriculum's phases in turn (one phase
    without a curriculum), each resumable from its checkpoints. Logs to its own MLflow run."""
    from mlflow import MlflowClient

    from mlipops.log import setup

    setup()  # a worker process has no handler of its own
    torch.set_num_threads(spec.threads)
    p, d = spec.params()
    k, species = spec.member, spec.species
    ckpt_dir = Path(spec.checkpoint_dir)
    done = Checkpointer(ckpt_dir / f"member_{k}.done.pt", spec.key, 1)
    finished = done.load()
    if finished is not None:  # trained before an interruption of another member: do not redo it
        return finished["result"] | {"skipped": True}
    splits = load_split(Path(spec.data_path))
    cache = spec.baseline_cache
    client = MlflowClient(tracking_uri=spec.tracking_uri) if spec.run_id else None
    queue = _progress_queue(spec.queue)
    plan = curriculum.phases(p, d)
    multi = len(plan) > 1
    phase_runs = spec.phase_run_ids or [None] * len(plan)
    history, model, offset, walls, resumed, prev_d, last = [], None, 0, 0.0, 0, None, {}
    idx = None
    for i, (pp, dd) in enumerate(plan):
        proto = make_potential(species, pp, dd)
        tr_all, va = prepare(proto, splits["train"], cache), prepare(proto, splits["val"], cache)
        if idx is None:  # the same resample in every phase
            idx = bootstrap_indices(len(tr_all.graphs), spec.train["seed"], k, spec.bootstrap, spec.n_members)
        tr = tr_all.subset(idx)
        phase_done = Checkpointer(ckpt_dir / f"member_{k}_phase_{i}.done.pt", spec.key, 1) if multi else None
        st = phase_done.load() if phase_done is not None else None
        if st is not None:  # this phase finished before an interruption
            model = proto.to(DTYPES[pp.dtype])
            model.load_state_dict(st["state"])
            history += st["history"]
            offset += pp.epochs
            walls += st["wall"]
            last = st["last"]
            resumed = offset  # epochs done before this run (all phases so far)
            prev_d = dd
            continue
        init = None
        if i == 0 and spec.init_state is not None:  # warm start (active learning): the member's last weights
            init = proto.to(DTYPES[pp.dtype])
            init.load_state_dict(spec.init_state)
        if model is not None:
            init = curriculum.grow(model, pp.hidden, dd.model_dump(), seed=pp.seed * 1009 + i)
            if dd != prev_d:  # new cutoff: new descriptors, standardised on the new values
                mean, std = feature_statistics(init, tr, DTYPES[pp.dtype], spec.device)
                init.feature_mean.copy_(mean)
                init.feature_std.copy_(std)
        ckpt = Checkpointer(ckpt_dir / (f"member_{k}_phase_{i}.pt" if multi else f"member_{k}.pt"), spec.key,
                            pp.checkpoint_every)
        rids = [r for r in (spec.run_id, phase_runs[i]) if r] if client is not None else []
        t0 = time.perf_counter()
        epoch_log = _EpochLog(client, rids, offset, pp.checkpoint_every, queue, k)
        result = fit(tr, va, pp, dd, log=epoch_log, checkpoint=ckpt, species=species, device=spec.device,
                     init=init)
        epoch_log.flush()
        wall = time.perf_counter() - t0
        rows = [h | {"epoch": offset + h["epoch"], "phase": i, "phase_epoch": h["epoch"]} for h in result.history]
        model, walls, prev_d = result.model, walls + wall, dd
        if result.resumed_from_epoch:
            resumed = offset + result.resumed_from_epoch
        last = {"metrics": result.metrics, "best_epoch": result.best_epoch, "stopped_early": result.stopped_early}
        if multi:
            if client is not None and phase_runs[i]:
                _log_final(client, phase_runs[i], result.metrics, result.best_epoch, wall)
            phase_done.save({"state": _cpu_state(model), "history": rows, "wall": wall, "last": last})
        ckpt.remove()
        history += rows
        offset += pp.epochs
    best = offset - plan[-1][0].epochs + last["best_epoch"]
    if client is not None:
        _log_final(client, spec.run_id, last["metrics"], best, walls)
    out = {"member": k, "state": _cpu_state(model), "history": history,
           "best_epoch": best, "stopped_early": last["stopped_early"],
           "resumed_from_epoch": resumed, "metrics": last["metrics"], "n_phases": len(plan),
           "n_train": len(tr.graphs), "n_train_unique": int(len(np.unique(idx))), "wall_time_s": walls}
    done.save({"result": out})
    for i in range(len(plan)):
        (ckpt_dir / f"member_{k}_phase_{i}.done.pt").unlink(missing_ok=True)
    return out


def train_ensemble(data_path: str | Path, species: list[str], p: TrainParams, d: DescriptorParams,
                   c: ComputeParams | None = None, checkpoint_dir: str | Path | None = None, key: str | None = None,
                   tracking_uri: str | None = None, run_ids: list[str] | None = None,
                   phase_run_ids: list[list[str]] | None = None, init_states: list[dict] | None = None):
    """Train ``p.ensemble.members`` potentials on the train/val splits of ``data_path`` (an extxyz
    whose frames carry ``split``) in parallel through Dask. Returns (Ensemble on the CPU, per-member
    result dicts, timings). MLflow logging only when ``run_ids`` (one per member) are given.
    ``init_states`` (one state dict per member, of the params' architecture): each member starts from
    its weights instead of a fresh initialisation (a warm start; the curriculum's first phase)."""
    import tempfile

    from mlipops.compute import dask_client

    c = c or ComputeParams()
    M = p.ensemble.members
    tmp = None
    if checkpoint_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mlipops-ckpt-")
        checkpoint_dir = tmp.name
    key = key or run_fingerprint(p, d, tracking.file_md5(data_path))
    queue_name = f"mlipops-train-{uuid.uuid4().hex[:8]}"
    cache = Path(BASELINE_CACHE).resolve()
    if p.baseline.calculator:  # Δ-learning: label every frame with the baseline once, here, not in each member
        splits = load_split(Path(data_path))
        make_potential(species, p, d).baseline.labels(splits["train"] + splits["val"], cache)
    specs = [MemberSpec(member=k, n_members=M, train=p.model_dump(), descriptors=d.model_dump(),
                        species=list(species), data_path=str(Path(data_path).resolve()), key=key,
                        checkpoint_dir=str(Path(checkpoint_dir).resolve()), tracking_uri=tracking_uri,
                        run_id=run_ids[k] if run_ids else None, bootstrap=p.ensemble.bootstrap,
                        threads=c.threads_per_worker, device=resolve_device(p.device), queue=queue_name,
                        baseline_cache=str(cache), phase_run_ids=phase_run_ids[k] if phase_run_ids else None,
                        init_state=init_states[k] if init_states else None)
             for k in range(M)]
    if init_states is not None and len(init_states) != M:
        raise StageInputError(f"{len(init_states)} initial states for {M} ensemble members",
                              field="train.ensemble.members")
    timing = {}
    t1 = time.perf_counter()
    try:
        with dask_client(c, M) as dc:
            timing["cluster_start"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            futures = dc.map(train_member, specs, pure=False)
            total = sum(ph.epochs for ph in p.curriculum) if p.curriculum else p.epochs
            members = sorted(_gather(dc, futures, queue_name, M * total), key=lambda r: r["member"])
            timing["members"] = time.perf_counter() - t1
            t1 = time.perf_counter()
        timing["cluster_stop"] = time.perf_counter() - t1
    finally:
        if tmp is not None:
            tmp.cleanup()
    ensemble = Ensemble([make_potential(species, p, d) for _ in range(M)]).to(DTYPES[p.dtype])
    for k, r in enumerate(members):
        ensemble.members[k].load_state_dict(r["state"])
    return ensemble.eval(), members, timing


def _run_state(ckpt_dir: Path, key: str) -> dict | None:
    path = ckpt_dir / "state.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return state if state.get("key") == key else None


def _start_runs(client, exp_id: str, p: TrainParams, ckpt_dir: Path, key: str, tags: dict, params: dict,
                resume: dict | None) -> dict:
    if resume is not None:
        for rid in [resume["parent_run_id"], *resume["member_run_ids"], *sum(resume.get("phase_run_ids") or [], [])]:
            try:
                if client.get_run(rid).info.status != "FINISHED":
                    client.update_run(rid, status="RUNNING")
            except Exception:  # noqa: BLE001 - a deleted run: start afresh
                resume = None
                break
    if resume is not None:
        return resume
    # names: the model, the ensemble, and the first 8 hex of the run key (settings + data): in the MLflow
    # UI's run list and compare view two trainings of one model are told apart at a glance
    tag = key[:8]
    parent = client.create_run(exp_id, run_name=f"{p.model_name}-ensemble-{tag}",
                               tags=tags | {"member": "ensemble", "mlipops.n_members": str(p.ensemble.members),
                                            "mlipops.run_key": key})
    members = []
    for k in range(p.ensemble.members):
        r = client.create_run(exp_id, run_name=f"{p.model_name}-{tag}-member-{k}",
                              tags=tags | {"member": str(k), "mlflow.parentRunId": parent.info.run_id})
        members.append(r.info.run_id)
        _retrying(client.log_batch, r.info.run_id, params=_params(params | {"member.index": k,
                                                                            "member.seed": p.seed + k}))
    _retrying(client.log_batch, parent.info.run_id, params=_params(params))
    phase_runs = []
    for k, mid in enumerate(members if p.curriculum else []):  # each phase: a nested run under its member
        ids = []
        for i, ph in enumerate(p.curriculum):
            r = client.create_run(exp_id, run_name=f"{p.model_name}-{tag}-member-{k}-phase-{i}",
                                  tags=tags | {"member": str(k), "curriculum_phase": str(i), "mlflow.parentRunId": mid})
            _retrying(client.log_batch, r.info.run_id, params=_params(
                {f"phase.{f}": v for f, v in ph.model_dump().items()} | {"member.index": k, "member.seed": p.seed + k}))
            ids.append(r.info.run_id)
        phase_runs.append(ids)
    state = {"key": key, "parent_run_id": parent.info.run_id, "member_run_ids": members,
             "phase_run_ids": phase_runs or None}
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    return state


def _params(d: dict):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in d.items()]


def _gather(client, futures, queue_name: str, total: int) -> list[dict]:
    from distributed import Queue

    queue = Queue(queue_name, client=client)
    seen: dict[int, int] = {}
    with progress("training ensemble (member-epochs)", total) as bar:
        while True:
            for item in queue.get(batch=True):
                k, epoch = item
                bar(max(0, epoch - seen.get(k, 0)))
                seen[k] = max(seen.get(k, 0), epoch)
            if all(f.done() for f in futures):
                break
            time.sleep(0.3)
    return client.gather(futures)


def run(p: TrainParams, d: DescriptorParams, c: ComputeParams | None = None, data_path: Path = DATA) -> dict:
    import mlflow

    c = c or ComputeParams()
    t0 = time.perf_counter()
    splits = load_split(data_path)
    species = species_of(splits["train"] + splits["val"])
    data_md5 = tracking.file_md5(data_path)
    key = run_fingerprint(p, d, data_md5)
    ckpt_dir = CHECKPOINT_DIR / p.model_name
    resume = _run_state(ckpt_dir, key)
    if resume is None and ckpt_dir.exists():
        safe_remove(ckpt_dir)  # checkpoints of other settings or data: never resumed
    uri = tracking.tracking_uri(p.tracking_uri)
    client = tracking.client(p.tracking_uri)
    exp_id = tracking.experiment_id(p.tracking_uri, p.experiment, p.artifact_location)
    tags = {"curriculum_phase": "all" if p.curriculum else "none",
            "mlipops.stage": "train", "mlipops.model_name": p.model_name, "data.path": str(data_path),
            "data.dvc_md5": data_md5, "git.commit": tracking.git_commit(),
            "data.n_train": str(len(splits["train"])), "data.n_val": str(len(splits["val"]))}
    params = ({f"train.{k}": v for k, v in flatten(p).items()} | {f"descriptors.{k}": v for k, v in flatten(d).items()}
              | {f"compute.{k}": v for k, v in flatten(c).items()})
    state = _start_runs(client, exp_id, p, ckpt_dir, key, tags, params, resume)
    if resume is None:
        tracking.log_dataset(client, state["parent_run_id"], data_path, data_md5, splits)
    device = resolve_device(p.device)
    M = p.ensemble.members
    if resume is not None:
        logger.info(f"resuming training of {p.model_name} from {ckpt_dir} (MLflow run {state['parent_run_id']})")
    timing = {"setup": time.perf_counter() - t0}
    t1 = time.perf_counter()
    ensemble, members, t_dask = train_ensemble(data_path, species, p, d, c, checkpoint_dir=ckpt_dir, key=key,
                                               tracking_uri=uri, run_ids=state["member_run_ids"],
                                               phase_run_ids=state.get("phase_run_ids"))
    timing |= t_dask
    t1 = time.perf_counter()
    dtype = DTYPES[p.dtype]
    ensemble = ensemble.to(device).eval()
    proto = ensemble.members[0]
    tr, va = prepare(proto, splits["train"]), prepare(proto, splits["val"])
    target_stats = {}
    if proto.baseline is not None:  # Δ-learning: how much the baseline leaves for the network to learn
        e_tot, f_tot = tr.totals()
        for tag, data in (("without", dataclasses.replace(tr, energy=e_tot, forces=f_tot)), ("with", tr)):
            target_stats |= {f"target.{k}_{tag}_baseline": v for k, v in target_statistics(data, len(species)).items()}
    ens_metrics = {"train": evaluate_split(ensemble, tr, dtype, device=device, by_config=True)}
    if va.graphs:
        ens_metrics["val"] = evaluate_split(ensemble, va, dtype, device=device, by_config=True)
    wall = time.perf_counter() - t0
    final = {f"{s}.{k}": v for s, m in ens_metrics.items() for k, v in m.items() if k != "by_config"}
    by_config = {f"{s}.{ct}.{k}": v for s, m in ens_metrics.items() for ct, mm in m["by_config"].items()
                 for k, v in mm.items()}
    out_dir = MODELS_DIR / p.model_name
    safe_remove(out_dir)
    extra = {"model_name": p.model_name, "trained_on": {"path": str(data_path), "dvc_md5": data_md5},
             "mlflow_run_id": state["parent_run_id"], "dtype": p.dtype,
             "members": [{"seed": p.seed + r["member"], "best_epoch": r["best_epoch"], "n_train": r["n_train"],
                          "n_train_unique": r["n_train_unique"]} for r in members]}
    ensemble.to("cpu").save(out_dir, extra=extra)
    plots = _plots(ensemble.to("cpu"), tr, va, members, dtype)
    parent = state["parent_run_id"]
    with mlflow.start_run(run_id=parent):
        mlflow.log_metrics({f"final_{k.replace('.', '_')}": v for k, v in final.items() if np.isfinite(v)}
                           | {k.replace(".", "_"): v for k, v in target_stats.items()} | {"wall_time_s": wall})
        mlflow.log_artifacts(str(out_dir), artifact_path="model")
        for png in plots:
            mlflow.log_artifact(str(png), artifact_path="plots")
        # the store as configured (relative to the project root; a tracking server: its URL) and run ids: no
        # absolute path, so a copied or moved project reads its own store (tracking.relocate); the artifact URI
        # is the store's to say
        run_info = {"run_id": parent, "experiment_id": exp_id, "tracking_uri": tracking.recorded_uri(p.tracking_uri),
                    "data_md5": data_md5, "member_run_ids": state["member_run_ids"]}
    (out_dir / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    safe_remove(ckpt_dir, ignore_errors=True)
    timing["finalize"] = time.perf_counter() - t1
    timing["member_fit_max"] = max(r["wall_time_s"] for r in members)
    metrics = final | target_stats | {f"time.{k}_s": round(v, 2) for k, v in timing.items()} | {"n_members": M,
                       "epochs": p.epochs, "wall_time_s": round(wall, 2), "device": device,
                       "n_train": len(splits["train"]), "n_val": len(splits["val"]),
                       "members_resumed": sum(1 for r in members if r["resumed_from_epoch"] or r.get("skipped")),
                       "best_epochs": [r["best_epoch"] for r in members]}
    write_metrics(REPORT_DIR, metrics | {"by_config": by_config})
    tracking.log_headline(out_dir / "run.json", {REPORT_DIR / "metrics.json": metrics})
    member_rows = [(f"member {r['member']}", r["best_epoch"], r["n_train_unique"],
                    r["metrics"].get("val", r["metrics"]["train"])["energy_mae_per_atom"],
                    r["metrics"].get("val", r["metrics"]["train"])["force_mae"]) for r in members]
    split_name = "val" if va.graphs else "train"
    member_rows.append(("**ensemble mean**", "", len(splits["train"]), ens_metrics[split_name]["energy_mae_per_atom"],
                        ens_metrics[split_name]["force_mae"]))
    write_markdown(REPORT_DIR / "summary.md", f"Training of `{p.model_name}` ({M}-member ensemble)", [
        f"MLflow parent run `{parent}` in experiment `{p.experiment}` (members are its nested runs); "
        f"data md5 `{data_md5}`; device {device}.",
        f"{len(splits['train'])} train / {len(splits['val'])} val frames, up to {p.epochs} epochs, {wall:.1f} s.",
        f"Errors below on the {split_name} split (energy per atom in eV/atom, force components in eV/Å); "
        "members train on bootstrap resamples (unique frames column).",
        *[f"![{png.stem}]({png.name})" for png in plots],
    ], table=(("model", "best epoch", "unique train frames", "E MAE", "F MAE"), member_rows))
    return metrics


def learning_curve_csv(members: list[dict], path: Path = LEARNING_CURVE_CSV) -> Path:
    """Per epoch, the mean over the members that reached it of their train and val MAEs (meV/Å, meV/atom): the
    data of the DVC plots ``learning_curve_forces`` and ``learning_curve_energy`` (mlipops.pipeline.DATA_PLOTS),
    so ``dvc plots diff`` overlays two commits' learning curves. An empty cell: no member has that value."""
    keys = {"train_force_mae_meV_per_A": "train_force_mae", "val_force_mae_meV_per_A": "val_force_mae",
            "train_energy_mae_meV_per_atom": "train_energy_mae_per_atom",
            "val_energy_mae_meV_per_atom": "val_energy_mae_per_atom"}
    by_epoch: dict[int, list[dict]] = {}
    for r in members:
        for h in r["history"]:
            by_epoch.setdefault(int(h["epoch"]), []).append(h)
    epochs = sorted(by_epoch)

    def mean(rows: list[dict], key: str) -> float | None:
        v = [float(h[key]) for h in rows if h.get(key) is not None and np.isfinite(h[key])]
        return 1000.0 * float(np.mean(v)) if v else None

    cols = {"epoch": epochs} | {name: [mean(by_epoch[e], k) for e in epochs] for name, k in keys.items()}
    return write_csv(path, {c: cols[c] for c in LEARNING_CURVE_COLUMNS})


def _plots(ensemble: Ensemble, tr: Prepared, va: Prepared, members: list[dict], dtype) -> list[Path]:
    from mlipops.report import pyplot

    plt = pyplot()

    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    for ax, key, unit in ((axes[0], "energy_mae_per_atom", "eV/atom"), (axes[1], "force_mae", "eV/Å")):
        for r in members:
            ep = [h["epoch"] for h in r["history"]]
            for split, ls in (("train", "-"), ("val", "--")):
                ys = [h.get(f"{split}_{key}") for h in r["history"]]
                if any(y is not None for y in ys):
                    ax.semilogy(ep, ys, ls, color=f"C{r['member'] % 10}", lw=1,
                                label=f"m{r['member']} {split}" if r["member"] < 3 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{key.replace('_', ' ')} ({unit})")
        ax.legend(fontsize=7)
    fig.suptitle("learning curves (solid: train, dashed: val)")
    fig.tight_layout()
    paths.append(REPORT_DIR / "learning_curve.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    learning_curve_csv(members)
    data = va if va.graphs else tr
    e_tot, f_tot = data.totals()  # with a Δ-learning baseline: plot totals, not what the network learnt
    e_base = e_tot - data.energy
    e_ref, e_pred, f_ref, f_pred, cts, fcts = [], [], [], [], [], []
    for s in range(0, len(data.graphs), 16):
        idx = np.arange(s, min(s + 16, len(data.graphs)))
        b = Potential.collate([data.graphs[k] for k in idx], dtype)
        out = ensemble(b, forces=True)
        e_pred += list(((out["energy"].detach().numpy() + e_base[idx]) / data.n_atoms[idx]))
        e_ref += list(e_tot[idx] / data.n_atoms[idx])
        cts += list(data.config_type[idx])
        f_base = np.concatenate([f_tot[k] - data.forces[k] for k in idx])
        f_pred.append((out["forces"].detach().numpy() + f_base).ravel())
        f_ref.append(np.concatenate([f_tot[k] for k in idx]).ravel())
        fcts += [ct for k in idx for ct in [data.config_type[k]] * (3 * int(data.n_atoms[k]))]
    split = "val" if va.graphs else "train"
    paths.append(REPORT_DIR / "parity_energy.png")
    parity_plot(paths[-1], np.array(e_ref), np.array(e_pred), cts, "energy per atom", "eV/atom",
                f"ensemble mean, {split} energies")
    paths.append(REPORT_DIR / "parity_forces.png")
    parity_plot(paths[-1], np.concatenate(f_ref), np.concatenate(f_pred), fcts, "force component", "eV/Å",
                f"ensemble mean, {split} forces")
    return paths
