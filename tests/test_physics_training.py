"""Δ-learning on an ASE baseline and curriculum training (growth that keeps the learnt function,
phases as nested MLflow runs, resume between phases)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from ase.calculators.emt import EMT

from mlipops.errors import MlipopsError, ParamsError
from mlipops.evaluate.predict import predict
from mlipops.frames import write_extxyz
from mlipops.models import MlipopsCalculator, Potential, load_model
from mlipops.models.baseline import Baseline, baseline_spec
from mlipops.params import TrainParams, load_params
from mlipops.train import curriculum
from mlipops.train.loop import evaluate_split, fit, prepare, target_statistics

from test_training import SMALL_D, _emt_frames, _env, _split

MORSE_CU = {"epsilon": 0.3429, "r0": 2.866, "rho0": 3.894}  # Girifalco & Weizer (1959)


@pytest.fixture(scope="module")
def frames():
    return _emt_frames(20)


def _tp(**kw) -> TrainParams:
    base = dict(epochs=30, hidden=[8], batch_size=4, dtype="float64", learning_rate=0.01, device="cpu",
                checkpoint_every=1)
    return TrainParams(**(base | kw))


# ------------------------------------------------------------------------------------- Δ-learning
def test_baseline_equal_to_the_reference_leaves_nothing_to_learn(frames, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the baseline cache goes to ./data/cache/baseline
    tr, va = _split(frames)
    r = fit(tr, va, _tp(baseline={"calculator": "emt"}), SMALL_D)
    model = r.model
    data = prepare(model, va)
    assert np.abs(data.energy).max() < 1e-12 and max(np.abs(f).max() for f in data.forces) < 1e-12
    np.testing.assert_allclose(model.e0.numpy(), 0.0, atol=1e-10)  # nothing for the reference energies either
    m = evaluate_split(model, data, torch.float64)
    assert m["energy_mae_per_atom"] < 2e-3 and m["force_mae"] < 2e-2  # the network learnt ≈ 0
    # its predictions are the baseline's, through the evaluation and the ASE calculator
    e, f = predict(model, va)
    e_emt = []
    for a in va:
        b = a.copy()
        b.calc = EMT()
        e_emt.append(b.get_potential_energy())
    n = np.array([len(a) for a in va])
    assert np.abs((e - np.array(e_emt)) / n).max() < 5e-3
    a = va[0].copy()
    a.calc = MlipopsCalculator(model)
    nn_only = model(Potential.collate([model.graph(a)], torch.float64), forces=True)
    assert a.get_potential_energy() == pytest.approx(float(nn_only["energy"][0].detach()) + e_emt[0], abs=1e-10)
    assert np.isfinite(a.get_stress()).all()


def test_delta_learning_targets_and_the_saved_model(frames, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tr, va = _split(frames)
    plain = prepare(Potential(["Cu"], SMALL_D.model_dump(), [8]), tr)
    delta = prepare(Potential(["Cu"], SMALL_D.model_dump(), [8], baseline=baseline_spec("morse", MORSE_CU)), tr)
    e_tot, f_tot = delta.totals()
    np.testing.assert_allclose(e_tot, plain.energy, atol=1e-9)  # targets + baseline = the reference
    np.testing.assert_allclose(np.concatenate(f_tot), np.concatenate(plain.forces), atol=1e-9)
    assert not np.allclose(delta.energy, plain.energy)
    s_plain, s_delta = target_statistics(plain, 1), target_statistics(delta, 1)
    assert s_delta["force_mean_square"] < s_plain["force_mean_square"]  # the Morse pair term explains part
    # a saved model carries its baseline as data; loading rebuilds it
    r = fit(tr, va, _tp(epochs=2, baseline={"calculator": "morse", "kwargs": MORSE_CU}), SMALL_D)
    r.model.save(tmp_path / "m")
    m2 = load_model(tmp_path / "m")
    assert m2.baseline == r.model.baseline and m2.baseline.spec["kwargs"] == MORSE_CU
    e1, _ = predict(r.model, va)
    e2, _ = predict(m2, va)
    np.testing.assert_allclose(e1, e2, atol=1e-10)


def test_baseline_cache_is_reused_and_invalidated_when_settings_change(frames, tmp_path):
    b = Baseline(baseline_spec("morse", MORSE_CU))
    first = b.labels(frames, tmp_path)
    assert b.n_computed == len(frames)
    again = Baseline(baseline_spec("morse", MORSE_CU))
    second = again.labels(frames, tmp_path)
    assert again.n_computed == 0  # all from the cache
    for x, y in zip(first, second):
        assert x["energy"] == y["energy"] and np.array_equal(x["forces"], y["forces"])
    changed = Baseline(baseline_spec("morse", MORSE_CU | {"epsilon": 0.4}))
    third = changed.labels(frames, tmp_path)
    assert changed.n_computed == len(frames) and changed.key != b.key
    assert not np.isclose(third[0]["energy"], first[0]["energy"])
    moved = frames[0].copy()
    moved.positions[0, 0] += 0.01
    b.labels([moved], tmp_path)
    assert b.n_computed == len(frames) + 1  # a changed frame is a new cache entry


def test_bad_baseline_settings_are_named():
    with pytest.raises(MlipopsError, match="neither"):
        baseline_spec("nonsense")
    with pytest.raises(MlipopsError, match="cannot import"):
        baseline_spec("ase.calculators.nope.Nope")
    with pytest.raises(MlipopsError, match="cannot build baseline"):
        baseline_spec("morse", {"no_such_parameter": 1.0})


# ------------------------------------------------------------------------------------- curriculum
def _random_potential(hidden, descriptor=SMALL_D, seed=0) -> Potential:
    torch.manual_seed(seed)
    m = Potential(["Cu"], descriptor.model_dump(), hidden).double()
    with torch.no_grad():
        m.feature_mean.normal_()
        m.feature_std.uniform_(0.5, 2.0)
        m.e0.normal_()
        for prm in m.parameters():
            prm.normal_(0, 0.5)
    return m.eval()


@pytest.mark.parametrize("old,new", [([8], [16]), ([8, 8], [12, 20]), ([8], [16, 32]), ([], [20]), ([6], [6, 12, 30])])
def test_grown_network_predicts_exactly_what_the_smaller_one_did(frames, old, new):
    small = _random_potential(old)
    big = curriculum.grow(small, new)
    assert big.hidden == new
    b = Potential.collate([small.graph(a) for a in frames[:4]], torch.float64)
    o1, o2 = small(b, forces=True, stress=True), big(b, forces=True, stress=True)
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(o2[key], o1[key], rtol=0, atol=1e-12, msg=key)
    # and it can learn: the new units receive gradient
    out = big(b, forces=False)
    out["energy"].sum().backward()
    last = [m for m in big.mlps[0].net if isinstance(m, torch.nn.Linear)][-1]
    assert float(last.weight.grad.abs().sum()) > 0


def test_impossible_growth_is_refused():
    with pytest.raises(MlipopsError, match="narrows"):
        curriculum.grow(_random_potential([16]), [8])
    with pytest.raises(MlipopsError, match="at least 2 x 16"):
        curriculum.grow(_random_potential([16]), [16, 20])


def test_curriculum_params_are_checked(tmp_path):
    def write(train, descriptors=None):
        p = tmp_path / "params.yaml"
        p.write_text(yaml.safe_dump({"ingest": {"sources": [{"path": "x"}]}, "validate": {"allowed_species": ["Cu"]},
                                     "descriptors": descriptors or SMALL_D.model_dump(), "train": train}))
        return p

    ok = load_params(write({"hidden": [16], "curriculum": [{"epochs": 2, "cutoff": 3.0, "hidden": [8]},
                                                           {"epochs": 3}]}))
    ph = curriculum.phases(ok.train, ok.descriptors)
    assert [(pp.hidden, dd.cutoff, dd.angular_cutoff, pp.epochs) for pp, dd in ph] == [
        ([8], 3.0, 3.0, 2), ([16], 4.0, 3.5, 3)]
    with pytest.raises(ParamsError, match="last curriculum phase"):
        load_params(write({"hidden": [16], "curriculum": [{"epochs": 2, "hidden": [8]}]}))
    with pytest.raises(ParamsError, match="descriptors.cutoff"):
        load_params(write({"hidden": [8], "curriculum": [{"epochs": 2, "cutoff": 3.0}]}))
    with pytest.raises(ParamsError, match="narrows"):
        load_params(write({"hidden": [8], "curriculum": [{"epochs": 2, "hidden": [16]}, {"epochs": 2}]}))


def test_curriculum_member_resumes_between_phases(frames, tmp_path, monkeypatch):
    """A member killed in phase 1 restarts at phase 1 (phase 0 is not retrained) and ends with the
    weights of an uninterrupted run."""
    import importlib

    run_mod = importlib.import_module("mlipops.train.run")  # (mlipops.train.run is also a function)

    write_extxyz(tmp_path / "data.extxyz", frames)
    p = _tp(epochs=1, hidden=[12], curriculum=[{"epochs": 3, "cutoff": 3.0, "hidden": [6]}, {"epochs": 3}])

    def spec(ckpt):
        return run_mod.MemberSpec(member=0, n_members=1, train=p.model_dump(), descriptors=SMALL_D.model_dump(),
                                  species=["Cu"], data_path=str(tmp_path / "data.extxyz"), key="k",
                                  checkpoint_dir=str(ckpt), bootstrap=True, threads=1, device="cpu",
                                  baseline_cache=str(tmp_path / "cache"))

    ref = run_mod.train_member(spec(tmp_path / "ref"))
    assert ref["n_phases"] == 2 and [h["phase"] for h in ref["history"]] == [0, 0, 0, 1, 1, 1]
    assert [h["epoch"] for h in ref["history"]] == [1, 2, 3, 4, 5, 6]

    calls = []
    real_fit = run_mod.fit

    def fit_then_die(tr, va, pp, dd, **kw):
        calls.append(dd.cutoff)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed at the start of phase 1
        return real_fit(tr, va, pp, dd, **kw)

    monkeypatch.setattr(run_mod, "fit", fit_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_mod.train_member(spec(tmp_path / "killed"))
    assert (tmp_path / "killed/member_0_phase_0.done.pt").is_file()
    out = run_mod.train_member(spec(tmp_path / "killed"))
    assert calls == [3.0, 4.0, 4.0]  # phase 0 once, phase 1 again after the kill
    assert out["resumed_from_epoch"] == 3
    for k, v in ref["state"].items():
        torch.testing.assert_close(out["state"][k], v, rtol=0, atol=1e-12, msg=k)


def test_curriculum_phases_are_nested_mlflow_runs(frames, tmp_path):
    from mlflow import MlflowClient

    root = tmp_path / "proj"
    root.mkdir()
    write_extxyz(root / "data/curated/accepted.extxyz", frames)
    params = {"ingest": {"sources": [{"path": "x.extxyz"}]}, "validate": {"allowed_species": ["Cu"]},
              "descriptors": SMALL_D.model_dump(),
              "train": {"hidden": [12], "batch_size": 4, "dtype": "float64", "learning_rate": 0.01, "device": "cpu",
                        "ensemble": {"members": 2},
                        "curriculum": [{"epochs": 2, "cutoff": 3.0, "hidden": [6]}, {"epochs": 3}]},
              "compute": {"n_workers": 2}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    res = subprocess.run([sys.executable, "-m", "mlipops.cli", "train"], cwd=root, env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = load_model(root / "data/models/cu")
    assert cfg.hidden == [12] and cfg.cutoff == SMALL_D.cutoff  # the final phase is the model
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mlipops").experiment_id])
    assert len(runs) == 1 + 2 + 2 * 2  # parent, members, phases
    by_id = {r.info.run_id: r for r in runs}
    phases = [r for r in runs if r.data.tags["curriculum_phase"] in ("0", "1")]
    assert len(phases) == 4
    for r in phases:
        member = by_id[r.data.tags["mlflow.parentRunId"]]
        assert member.data.tags["member"] == r.data.tags["member"] and member.data.tags["curriculum_phase"] == "all"
        assert r.info.status == "FINISHED"
        n = 2 if r.data.tags["curriculum_phase"] == "0" else 3
        steps = sorted({m.step for m in client.get_metric_history(r.info.run_id, "val_force_mae")})
        assert steps == list(range(1, n + 1))
        assert r.data.params["phase.cutoff"] == ("3.0" if n == 2 else "None")
    member_steps = sorted({m.step for m in client.get_metric_history(phases[0].data.tags["mlflow.parentRunId"],
                                                                      "val_force_mae")})
    assert member_steps == [1, 2, 3, 4, 5]  # one cumulative axis over the phases
    # the model's files name the store as configured, never an absolute path (a copied project reads its own)
    info = json.loads((root / "data/models/cu/run.json").read_text())
    assert info["tracking_uri"] == "sqlite:///mlflow.db" and "artifact_uri" not in info
    assert by_id[info["run_id"]].data.tags["member"] == "ensemble"  # the parent run
    for f in ("run.json", "config.json"):
        assert str(root) not in (root / "data/models/cu" / f).read_text(), f
