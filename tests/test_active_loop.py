"""The active-learning loop across iterations: labels curated (ingest split, validate, index) on top of
the seed data, a bad label quarantined with its reason, the committee retrained warm-started from its
last weights, every iteration scored on one fixed held-out trajectory and logged to MLflow as nested
runs; a campaign of other params archived, never deleted; the projected trigger on a committee that
is wrong along the velocities. Real EMT oracle through a real Dask LocalCluster, real DuckDB, real MLflow."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from active_oracles import log_lines
from mlipops.crystal import Crystal
from mlipops.frames import file_md5, read_extxyz, write_extxyz
from mlipops.oracles import get_oracle
from mlipops.params import Params, load_params
from mlipops.quarantine import rejected_frame

CU = Crystal("Cu", "fcc", 3.61)  # ASE's reference fcc copper, as the structures were built before

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TINY_D = {"cutoff": 4.0, "n_radial": 4, "angular_cutoff": 3.5, "n_angular": 2, "max_l": 2}


def _labelled(a: Atoms, ct: str, split: str) -> Atoms:
    a = a.copy()
    a.calc = EMT()
    e, f = a.get_potential_energy(), a.get_forces()
    a.calc = SinglePointCalculator(a, energy=e, forces=f)
    a.info.update(config_type=ct, split=split)
    return a


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    """Seed data (rattled, strained 4-atom fcc cells: crystal only), an empty quarantine and a 2-member
    committee trained on them for a few epochs."""
    from mlipops.frames import frame_id
    from mlipops.train.run import train_ensemble

    d = tmp_path_factory.mktemp("seed")
    rng = np.random.default_rng(0)
    frames = []
    for k in range(16):
        a = bulk("Cu", "fcc", a=3.61 * (1 + rng.uniform(-0.02, 0.02)), cubic=True)
        a.rattle(0.05, seed=k)
        a.info["frame_id"] = frame_id(a)
        frames.append(_labelled(a, "crystal_fcc", "val" if k % 5 == 0 else "train"))
    write_extxyz(d / "accepted.extxyz", frames)
    q = rejected_frame([])
    q["stage"] = pd.Series(dtype="string")
    q.to_parquet(d / "quarantine.parquet", index=False)
    p = _params(d, d / "unused")
    tp = p.train.model_copy(update={"epochs": 8})
    ens, _, _ = train_ensemble(d / "accepted.extxyz", ["Cu"], tp, p.descriptors, p.compute)
    ens.save(d / "model", extra={"model_name": "cu", "dtype": tp.dtype})
    return d


def _params(seed_dir: Path, run_dir: Path, **active) -> Params:
    """The campaign's params; ``run_dir`` is the project (the tests chdir there): its outputs go below data/."""
    doc = load_params(ROOT / "params.yaml").model_dump(by_alias=True, mode="json")
    doc["descriptors"] = TINY_D
    doc["train"] |= {"hidden": [8], "batch_size": 4, "epochs": 8, "ensemble": {"members": 2, "bootstrap": True},
                     "tracking_uri": f"sqlite:///{run_dir / 'mlflow.db'}", "artifact_location": "mlart"}
    doc["compute"] = {"scheduler_address": None, "n_workers": 2, "threads_per_worker": 1}
    doc["validate"]["outliers"]["min_group_frames"] = 3
    doc["active"] = doc["active"] | {
        "element": "Cu", "iterations": 2, "mode": "force", "sigma_force_eVA": 1e-4, "index": None,
        "structures": [{"kind": "bulk", "supercell": 1}, {"kind": "vacancy", "supercell": 2}],
        "md": {"temperatures_K": [600.0, 1500.0], "steps_per_temperature": 4, "timestep_fs": 2.0,
               "checkpoint_every": 4},
        "dedup_min_distance": 0.0, "max_batch": 3, "retries": 1, "backoff_s": 0.1, "timeout_s": 60.0,
        "out_dir": "data/raw/active", "work_dir": "data/active", "seed": 1,
        "base_data": str(seed_dir / "accepted.extxyz"), "base_quarantine": str(seed_dir / "quarantine.parquet"),
        "retrain": {"enabled": True, "epochs": 3, "learning_rate": 0.001, "patience": None},
        "holdout": {"structures": [{"kind": "bulk", "supercell": 2}], "temperatures_K": [800.0, 4000.0],
                    "steps_per_temperature": 150, "sample_every": 25}} | active
    return Params.model_validate(doc)


@pytest.fixture
def counting_oracle(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))  # the Dask workers (spawned by the loop) import active_oracles too
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(x for x in [str(TESTS), os.environ.get("PYTHONPATH")] if x))

    def make(**kw):
        return get_oracle("active_oracles.CountingEMT", {"counter": str(tmp_path / "calls.log")} | kw)
    return make


def test_two_iterations_curate_retrain_warm_score_and_log(seed, tmp_path, counting_oracle, monkeypatch):
    """Two iterations end to end; the 2nd oracle call returns a label 1000 eV off."""
    from mlflow import MlflowClient

    from mlipops.active.loop import run as run_loop

    from mlipops.active.holdout import load_or_generate

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    p = _params(seed, run)
    # the held-out trajectory from plain EMT (the counting oracle below is for the labels only)
    hold, hold_file = load_or_generate(p.active.holdout, CU, get_oracle("emt"), tmp_path / "holdout")
    p = Params.model_validate(p.model_dump(by_alias=True) | {"active": p.active.model_copy(update={
        "holdout": p.active.holdout.model_copy(update={"file": str(hold_file)})})})
    oracle = counting_oracle(corrupt_every=2)
    summary = run_loop(p, oracle, seed / "model", CU)
    calls = tmp_path / "calls.log"
    hist = summary["history"]
    assert summary["iterations"] == 2 and len(hist) == 2

    # labels: one file per iteration, each frame labelled by exactly one completed call
    labelled = [read_extxyz(run / "data/raw/active" / f"active_{i}.extxyz")[0] for i in range(2)]
    ids = [a.info["frame_id"] for fr in labelled for a in fr]
    assert (sorted(ids) == sorted(log_lines(calls, "end"))
            and len(set(ids)) == len(ids) == sum(h["labelled"] for h in hist))
    corrupt = set(log_lines(calls, "corrupt"))
    assert corrupt

    # curation: the bad label quarantined with its reason, never accepted; nothing lost
    final = read_extxyz(summary["curated"]["accepted"])[0]
    q = pd.read_parquet(summary["curated"]["quarantine"])
    acc_ids = {a.info["frame_id"] for a in final}
    assert corrupt <= set(q["frame_id"]) and not (corrupt & acc_ids)
    bad = q[q["frame_id"].isin(corrupt)]
    assert (bad["stage"] == "active").all() and bad["check"].str.contains("energy").all()
    assert bad["reason"].str.len().min() > 10 and bad["extxyz"].str.len().min() > 0
    seed_ids = {a.info["frame_id"] for a in read_extxyz(seed / "accepted.extxyz")[0]}
    assert seed_ids <= acc_ids and acc_ids | set(q["frame_id"]) == seed_ids | set(ids)  # accepted + quarantined = all
    new = [a for a in final if a.info["frame_id"] in set(ids)]
    assert {a.info["split"] for a in new} <= {"train", "val", "test"}
    assert sum(h["curate.n_accepted_new"] + h["curate.n_quarantined_new"] for h in hist) == len(ids)
    # the campaign's index holds the new frames, queryable in SQL
    con = duckdb.connect(summary["curated"]["index"], read_only=True)
    n = con.execute("SELECT count(*) FROM frames WHERE config_type = 'active_force' "
                    "AND status = 'accepted'").fetchone()[0]
    nq = con.execute("SELECT count(*) FROM frames WHERE frame_id IN (SELECT unnest(?))",
                     [sorted(corrupt)]).fetchone()[0]
    con.close()
    assert n == len(new) and nq == len(corrupt)
    # the pipeline's own files were not touched
    assert not (run / "data/curated").exists() and not (run / "data/index.duckdb").exists()

    # retraining: iteration i's model warm-started from iteration i-1's weights
    m0, m1 = run / "data/active/iter_000/model", run / "data/active/iter_001/model"
    c0, c1 = (json.loads((m / "config.json").read_text()) for m in (m0, m1))
    assert c0["warm_started_from"]["weights_md5"] == file_md5(seed / "model" / "weights.pt")
    assert c1["warm_started_from"]["weights_md5"] == file_md5(m0 / "weights.pt")
    assert c1["trained_on"]["dvc_md5"] == file_md5(summary["curated"]["accepted"])
    assert run / hist[1]["model"] == m1 and run / summary["model"] == m1  # project-relative
    # the second iteration's MD ran with the first retrained committee (its candidates' statistics differ)
    assert hist[0]["max_sigma_f.max"] != hist[1]["max_sigma_f.max"]

    # one fixed held-out trajectory, with a liquid part, scored after every iteration
    assert {a.info["phase"] for a in hold} == {"solid", "liquid"}
    for h in [summary["initial"], *hist]:
        assert h["holdout.n_frames"] == len(hold) and np.isfinite(h["holdout.force_mae"])
        assert h["holdout.phase.liquid.n_frames"] >= 1
    assert not (set(a.info["frame_id"] for a in hold) & acc_ids)  # never trained on

    # MLflow: parent run, one nested run per iteration with its numbers, members nested under iterations
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    exp = client.get_experiment_by_name(p.train.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = [r for r in runs
              if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("mlipops.stage") == "active"]
    assert len(parent) == 1
    pid = parent[0].info.run_id
    iters = sorted([r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid], key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in iters] == ["active-iter-0", "active-iter-1"]
    for r, h in zip(iters, hist):
        m = r.data.metrics
        assert m["oracle_calls"] == h["oracle_calls"] and m["triggers"] == h["triggers"] and m["md_steps"] == 16
        assert m["holdout.force_mae"] == pytest.approx(h["holdout.force_mae"])
        assert "max_sigma_f.max" in m and "sigma_projected.mean" in m and r.info.status == "FINISHED"
        members = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == r.info.run_id]
        assert len(members) == 2 and all("final_val_force_mae" in x.data.metrics for x in members)
    curve = client.get_metric_history(pid, "holdout.force_mae")
    assert sorted(c.step for c in curve) == [0, hist[0]["oracle_calls_total"], hist[1]["oracle_calls_total"]]

    # a rerun with the same params resumes at the end: no oracle call
    before = len(log_lines(calls, "start"))
    again = run_loop(p, oracle, seed / "model", CU)
    assert len(log_lines(calls, "start")) == before and again["history"] == hist


def test_warm_start_continues_from_the_weights(seed, tmp_path, monkeypatch):
    """With a vanishing learning rate the retrained committee is the seed committee: nothing was
    re-initialised (weights, standardisation, reference energies)."""
    from mlipops.active.curate import curate
    from mlipops.active.retrain import retrain
    from mlipops.models.ensemble import load_model

    monkeypatch.chdir(tmp_path)  # retrain writes (and replaces) its folders below the project's data/
    p = _params(seed, tmp_path)
    p = Params.model_validate(p.model_dump(by_alias=True) | {"active": p.active.model_copy(update={
        "retrain": p.active.retrain.model_copy(update={"epochs": 1, "learning_rate": 1e-12})})})
    a = _labelled(bulk("Cu", "fcc", a=3.7, cubic=True), "active_force", "train")
    a.rattle(0.1, seed=3)
    a = _labelled(a, "active_force", "train")
    write_extxyz(tmp_path / "new.extxyz", [a])
    c = curate(tmp_path / "new.extxyz", seed / "accepted.extxyz", seed / "quarantine.parquet", p, tmp_path / "cur")
    assert c["n_accepted_new"] == 1 and c["n_accepted"] == 17
    retrain(seed / "model", c["accepted"], p, tmp_path / "data/m", tmp_path / "data/ck")
    old, new = load_model(seed / "model").state_dict(), load_model(tmp_path / "data/m").state_dict()
    assert old.keys() == new.keys()
    for k in old:
        torch.testing.assert_close(new[k], old[k], rtol=1e-5, atol=1e-6)


def test_retrain_refuses_a_model_of_another_target(seed, tmp_path):
    from mlipops.active.retrain import warm_start_settings
    from mlipops.errors import StageInputError

    p = _params(seed, tmp_path)
    doc = p.model_dump(by_alias=True)
    doc["train"]["baseline"] = {"calculator": "emt", "kwargs": {}}
    with pytest.raises(StageInputError, match="baseline"):
        warm_start_settings(seed / "model", Params.model_validate(doc))


def test_a_campaign_of_other_params_is_archived_not_deleted(seed, tmp_path, monkeypatch):
    """Also: the oracle calls go to an existing Dask scheduler (``compute.scheduler_address``, as on a
    real cluster) instead of a LocalCluster of the loop's own."""
    import logging

    from distributed import LocalCluster

    from mlipops.active.loop import run as run_loop

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    p = _params(seed, run, iterations=1, base_data=None, mlflow=False, holdout={"enabled": False},
                md={"temperatures_K": [600.0], "steps_per_temperature": 2, "timestep_fs": 2.0, "checkpoint_every": 2})
    p = Params.model_validate(p.model_dump(by_alias=True)
                              | {"compute": {"scheduler_address": cluster.scheduler_address}})
    oracle = get_oracle("emt")
    try:
        first = run_loop(p, oracle, seed / "model", CU)
        with __import__("distributed").Client(cluster.scheduler_address) as c:
            assert c.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.task_prefixes)) >= 1  # tasks ran there
    finally:
        cluster.close()
    labels = (run / "data/raw/active/active_0.extxyz").read_bytes()
    assert first["history"][0]["labelled"] >= 1 and "curate.n_accepted_new" not in first["history"][0]
    q = Params.model_validate(p.model_dump(by_alias=True) | {"active": p.active.model_copy(update={"seed": 7}),
                                                             "compute": {"n_workers": 1}})
    second = run_loop(q, oracle, seed / "model", CU)
    arch = list((run / "data/active/archive").iterdir())
    assert len(arch) == 1 and (arch[0] / "labels" / "active_0.extxyz").read_bytes() == labels
    assert (arch[0] / "state.json").is_file() and second["history"][0]["iteration"] == 0
    assert (run / "data/raw/active/active_0.extxyz").read_bytes() != labels


def test_projected_trigger_on_a_committee_wrong_along_the_velocities():
    """A committee whose members disagree by ±δ along each atom's velocity (a wrong force field along
    the direction of motion) fires the projected trigger with σ_proj = δ·Σ|v|·Δt·√(M/(M-1))... computed
    by hand; the same disagreement rotated perpendicular to the velocities does not fire, while the
    force-only trigger cannot tell the two apart."""
    from ase import units

    from mlipops.active.trigger import Trigger, committee_stats

    rng = np.random.default_rng(4)
    n, delta, dt = 8, 0.2, 2.0
    v = rng.normal(size=(n, 3)) * 0.05  # ASE units
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    base = rng.normal(size=(n, 3))
    along = np.stack([base + delta * u, base - delta * u])  # member 0 pushes along v, member 1 against
    perp_dir = np.cross(u, [0.0, 0.0, 1.0])
    perp_dir /= np.linalg.norm(perp_dir, axis=1, keepdims=True)
    perp = np.stack([base + delta * perp_dir, base - delta * perp_dir])
    s_along, s_perp = committee_stats(along, v, dt), committee_stats(perp, v, dt)
    speed = np.linalg.norm(v * units.fs, axis=1)  # Å/fs
    # P_0 - P_1 = 2 δ Σ|v|; sample std of two values = |P_0 - P_1| / √2
    assert s_along["sigma_projected"] == pytest.approx(2 * delta * speed.sum() / np.sqrt(2) * dt, rel=1e-10)
    assert s_perp["sigma_projected"] == pytest.approx(0.0, abs=1e-12)
    assert s_along["max_sigma_f"] == pytest.approx(s_perp["max_sigma_f"])  # σ_F: the same in both
    proj, force = Trigger("projected", sigma_projected_eV=1e-3), Trigger("force", sigma_force_eVA=0.1)
    assert proj.fires(s_along) and not proj.fires(s_perp)
    assert force.fires(s_along) and force.fires(s_perp)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))
