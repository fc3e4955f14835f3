"""Active learning: the committee trigger on hand-made committee outputs, fingerprint de-duplication,
oracle dispatch on a real Dask LocalCluster (flaky, failing and slow EMT oracles), and the loop killed
after an oracle call wrote its label but before the loop recorded it, then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ase import Atoms, units
from ase.build import bulk

from active_oracles import log_lines
from conftest import randomize_output
from mlipops.active.committee import CommitteeCalculator
from mlipops.active.dispatch import label_batch
from mlipops.active.state import load_or_start
from mlipops.active.trigger import Trigger, committee_stats, deduplicate, fingerprints
from mlipops.crystal import Crystal
from mlipops.errors import StageInputError
from mlipops.frames import frame_id, read_extxyz
from mlipops.models import Ensemble, Potential
from mlipops.oracles import get_oracle
from mlipops.params import DescriptorParams

CU = Crystal("Cu", "fcc", 3.61)  # ASE's reference fcc copper, as the structures were built before

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
SMALL_D = DescriptorParams(cutoff=4.0, n_radial=4, angular_cutoff=3.5, n_angular=2, max_l=2)


def _ensemble(n: int = 3, seed0: int = 0) -> Ensemble:
    ms = []
    for k in range(n):
        torch.manual_seed(seed0 + k)
        m = randomize_output(Potential(["Cu"], SMALL_D.model_dump(), [8, 8])).double()
        with torch.no_grad():
            m.feature_mean.normal_()
            m.feature_std.uniform_(0.5, 2.0)
        ms.append(m.eval())
    return Ensemble(ms).double().eval()


def _frames(n: int, seed: int = 0) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.61, cubic=True)
        a.rattle(0.05, seed=int(rng.integers(1 << 30)))
        a.info.update(frame_id=frame_id(a), config_type="active_test")
        out.append(a)
    return out


# ------------------------------------------------------------------------------------------ trigger
def test_zero_velocity_gives_zero_projected_uncertainty_even_with_large_force_spread():
    rng = np.random.default_rng(0)
    f = rng.normal(0.0, 5.0, size=(4, 6, 3))  # members disagree by several eV/Å
    s = committee_stats(f, np.zeros((6, 3)), dt_fs=2.0)
    assert s["sigma_projected"] == 0.0 and np.all(s["sigma_projected_per_atom"] == 0.0)
    assert s["max_sigma_f"] > 2.0
    assert Trigger("force", sigma_force_eVA=0.3).fires(s)
    assert not Trigger("projected", sigma_projected_eV=1e-6).fires(s)


def test_disagreement_along_velocity_fires_and_perpendicular_does_not():
    v = np.zeros((3, 3))
    v[:, 0] = 0.05 / units.fs  # 0.05 Å/fs along x for every atom
    base = np.ones((3, 3, 3))
    along, perp = base.copy(), base.copy()
    along[:, :, 0] += np.array([-0.5, 0.0, 0.5])[:, None]  # members differ along v
    perp[:, :, 1] += np.array([-0.5, 0.0, 0.5])[:, None]  # members differ perpendicular to v
    s_along, s_perp = committee_stats(along, v, 2.0), committee_stats(perp, v, 2.0)
    assert s_along["max_sigma_f"] == pytest.approx(s_perp["max_sigma_f"]) == pytest.approx(0.5)
    assert s_perp["sigma_projected"] == pytest.approx(0.0, abs=1e-15)
    # σ_proj = std_k(Σ_i F_i^k·v_i)·Δt = std(-0.5, 0, 0.5)·3 atoms·0.05 Å/fs·2 fs = 0.5·0.3 = 0.15 eV
    assert s_along["sigma_projected"] == pytest.approx(0.15)
    t = Trigger("projected", sigma_projected_eV=0.1)
    assert t.fires(s_along) and not t.fires(s_perp)
    fires, reason = t.check(s_along)
    assert fires and "sigma_projected=0.15" in reason


def test_projected_uncertainty_units_match_the_kinetic_energy_change_in_ase():
    """P_k·Δt (our eV/fs × fs) equals ΔE_kin of one impulse step with member k's force, computed by ASE
    from momenta (p += F Δt in ASE time units): the velocity unit conversion is right."""
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]])
    v_fs = np.array([[0.01, 0.02, 0.0], [-0.03, 0.0, 0.01]])  # Å/fs
    atoms.set_velocities(v_fs * (1 / units.fs))
    f = np.array([[[0.2, -0.1, 0.3], [0.1, 0.0, -0.2]], [[-0.4, 0.2, 0.1], [0.3, 0.1, 0.0]]])  # [2, 2, 3] eV/Å
    dt_fs = 1e-3
    s = committee_stats(f, atoms.get_velocities(), dt_fs)
    k0 = atoms.get_kinetic_energy()
    for m in range(2):
        b = atoms.copy()
        b.set_momenta(atoms.get_momenta() + f[m] * dt_fs * units.fs)
        assert s["power"][m] * dt_fs == pytest.approx(b.get_kinetic_energy() - k0, rel=1e-3)
    assert s["sigma_projected"] == pytest.approx(abs(s["power"][0] - s["power"][1]) / np.sqrt(2) * dt_fs)


def test_single_member_and_gamma_mode():
    s = committee_stats(np.ones((1, 2, 3)), np.ones((2, 3)), 1.0)
    assert s["sigma_projected"] == 0.0 and s["max_sigma_f"] == 0.0
    assert Trigger("gamma", gamma_max=2.0).fires(s, gamma_max=3.5)
    assert not Trigger("gamma", gamma_max=2.0).fires(s, gamma_max=1.5)
    with pytest.raises(Exception, match="gamma"):
        Trigger("gamma").fires(s)
    with pytest.raises(Exception, match="mode"):
        Trigger("bogus")


def test_committee_calculator_member_forces_match_forces_std():
    """σ_F of committee_stats is the norm of MlipopsCalculator's forces_std rows."""
    ens = _ensemble(3)
    a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    a.rattle(0.05, seed=1)
    a.calc = CommitteeCalculator(ens)
    a.get_forces()
    res = a.calc.results
    assert res["forces_members"].shape == (3, len(a), 3)
    np.testing.assert_allclose(res["forces_members"].mean(0), res["forces"], atol=1e-12)
    np.testing.assert_allclose(res["forces_members"].std(0, ddof=1), res["forces_std"], atol=1e-12)
    s = committee_stats(res["forces_members"], np.zeros((len(a), 3)), 1.0)
    np.testing.assert_allclose(s["sigma_f"], np.linalg.norm(res["forces_std"], axis=1), atol=1e-12)
    assert s["max_sigma_f"] > 0


# ------------------------------------------------------------------------------------------ dedup
def test_deduplicate_on_descriptor_fingerprints():
    d = SMALL_D.model_dump()
    base = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    same = base.copy()
    same.translate([0.3, 0.1, 0.2])  # a rigid shift: the same structure
    strained = base.copy()
    strained.set_cell(base.cell * 1.05, scale_atoms=True)
    bcc = bulk("Cu", "bcc", a=2.87, cubic=True).repeat(2)
    vac = base.copy()
    del vac[0]  # another composition (31 atoms): never a duplicate
    frames = [base, same, strained, bcc, vac]
    fps = fingerprints(frames, ["Cu"], d)
    assert fps[0].distance(fps[1]) < 1e-6 and fps[0].distance(fps[2]) > 0.05
    assert fps[0].distance(fps[4]) == float("inf")
    assert deduplicate(frames, fps, 0.01, 10) == [0, 2, 3, 4]  # identical collapse, distinct kept
    assert deduplicate(frames, fps, 0.01, 2) == [0, 2]  # max_batch
    assert deduplicate(frames, fps, 0.01, 10, scores=[0, 5, 1, 0, 0]) == [1, 2, 3, 4]  # best score first
    assert deduplicate(frames, fps, 0.01, 10, previous=[fps[2]]) == [0, 3, 4]  # earlier selections respected
    assert deduplicate(frames, fps, 0.0, 10) == [0, 1, 2, 3, 4]  # distance 0: no de-duplication


# ------------------------------------------------------------------------------------------ dispatch
@pytest.fixture(scope="module")
def client():
    """A real LocalCluster: two worker processes, one thread each (tests/ on their path for the oracles)."""
    import logging

    from distributed import Client, LocalCluster

    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(SRC)] + ([old] if old else []))
    try:
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR)
    finally:
        os.environ["PYTHONPATH"] = old
    with Client(cluster) as c:
        yield c
    cluster.close()


def test_flaky_oracle_every_frame_labelled_after_retries(client, tmp_path):
    counter = tmp_path / "calls.log"
    oracle = get_oracle("active_oracles.CountingEMT", {"counter": str(counter), "fail_every": 3})
    frames = _frames(6)
    events = []
    res = label_batch(frames, oracle, client, retries=2, backoff_s=0.05, timeout_s=60, label_dir=tmp_path / "labels",
                      on_update=lambda fid, status, rec: events.append((fid, status)))
    assert not res.failed
    assert [a.info["frame_id"] for a in res.labelled] == [a.info["frame_id"] for a in frames]
    starts, ends, fails = (log_lines(counter, k) for k in ("start", "end", "fail"))
    assert len(fails) == len(starts) // 3 >= 2  # every third call failed ...
    assert sorted(ends) == sorted(a.info["frame_id"] for a in frames)  # ... and each frame completed exactly once
    assert res.oracle_calls == len(starts)
    assert sum(s == "retry" for _, s in events) == len(fails)
    for a, ref in zip(res.labelled, frames):
        b = ref.copy()
        from ase.calculators.emt import EMT

        b.calc = EMT()
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=1e-6)
        assert a.info["oracle_name"] == "active_oracles.CountingEMT"
    # a second call finds every label on disk: no oracle call at all
    again = label_batch(frames, oracle, client, retries=2, backoff_s=0.05, timeout_s=60, label_dir=tmp_path / "labels")
    assert again.oracle_calls == 0 and again.reused == 6 and len(log_lines(counter, "start")) == len(starts)


def test_always_failing_oracle_is_recorded_not_raised(client, tmp_path):
    counter = tmp_path / "calls.log"
    oracle = get_oracle("active_oracles.CountingEMT", {"counter": str(counter), "always_fail": True})
    frames = _frames(2, seed=1)
    t0 = time.monotonic()
    res = label_batch(frames, oracle, client, retries=2, backoff_s=0.1, timeout_s=60, label_dir=tmp_path / "labels")
    assert res.labelled == []
    assert sorted(f.frame_id for f in res.failed) == sorted(a.info["frame_id"] for a in frames)
    assert all(f.attempts == 3 and "oracle failure" in f.error for f in res.failed)
    assert len(log_lines(counter, "start")) == 6
    assert time.monotonic() - t0 >= 0.1 + 0.2  # the back-off: 0.1 s, then 0.2 s


def test_slow_oracle_times_out_and_is_recorded(client, tmp_path):
    counter = tmp_path / "calls.log"
    oracle = get_oracle("active_oracles.CountingEMT", {"counter": str(counter), "sleep_s": 2.0})
    res = label_batch(_frames(1, seed=2), oracle, client, retries=1, backoff_s=0.0, timeout_s=0.5,
                      label_dir=tmp_path / "labels")
    assert res.labelled == [] and len(res.failed) == 1
    assert res.failed[0].attempts == 2 and "timeout" in res.failed[0].error


# ------------------------------------------------------------------------------------------ state
def test_state_refuses_other_params(tmp_path):
    st = load_or_start(tmp_path / "state.json", "abc")
    st.pending.append("f1")
    st.save()
    assert load_or_start(tmp_path / "state.json", "abc").pending == ["f1"]
    with pytest.raises(StageInputError, match="other active-learning params"):
        load_or_start(tmp_path / "state.json", "xyz")


def test_md_phase_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    """Interrupted after step 5 (checkpoints every 2 steps), the MD goes on from step 4's snapshot and
    Langevin generator state and finds the same candidates as an uninterrupted run."""
    from mlipops.active.loop import _load_candidates, _md_phase, params_fingerprint
    from mlipops.params import ActiveParams

    monkeypatch.chdir(tmp_path)  # the project: work_dir and out_dir lie below its data/
    model_dir = tmp_path / "model"
    _ensemble(3).save(model_dir)
    calc = CommitteeCalculator(model_dir, skin=0.5)

    def params(name):
        return ActiveParams.model_validate({
            "model": str(model_dir), "mode": "force", "sigma_force_eVA": 1e-3, "index": None,
            "structures": [{"kind": "bulk", "supercell": 1}, {"kind": "vacancy", "supercell": 1}],
            "md": {"temperatures_K": [300.0, 900.0], "steps_per_temperature": 4, "timestep_fs": 1.0,
                   "checkpoint_every": 2}, "work_dir": f"data/{name}", "out_dir": "data/raw"})

    pa, pb = params("a"), params("b")
    sa = load_or_start(tmp_path / "data/a/state.json", params_fingerprint(pa, model_dir))
    _md_phase(pa, sa, calc, CU, None, Path(pa.work_dir), None)
    full = _load_candidates(sa)
    assert len(full) >= 12 and sa.md_run == 2 and sa.md_steps_total == 16

    class Killed(Exception):
        pass

    def kill_at_step_5(st, stats, fires):
        if st.md_run == 0 and st.md_step == 5:
            raise Killed

    fp = params_fingerprint(pb, model_dir)
    with pytest.raises(Killed):
        _md_phase(pb, load_or_start(tmp_path / "data/b/state.json", fp), calc, CU, None, Path(pb.work_dir),
                  kill_at_step_5)
    sb = load_or_start(tmp_path / "data/b/state.json", fp)
    assert (sb.md_run, sb.md_step, sb.n_candidates) == (0, 4, 4) and Path(sb.md_snapshot).is_file()
    _md_phase(pb, sb, calc, CU, None, Path(pb.work_dir), None)
    resumed = _load_candidates(sb)
    assert [(a.info["active_run"], a.info["active_step"]) for a in resumed] == \
        [(a.info["active_run"], a.info["active_step"]) for a in full]
    for a, b in zip(resumed, full):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-5)
    assert not list((tmp_path / "data/b/iter_000").glob("md_run*.extxyz"))  # snapshots of finished runs removed
    assert sb.md_stats["steps"] == sa.md_stats["steps"] == sb.md_steps_total == 16  # no step counted twice
    assert sb.md_stats["max_sigma_f_max"] == pytest.approx(sa.md_stats["max_sigma_f_max"], rel=1e-4)


def test_nve_md_with_the_committee_conserves_energy(tmp_path, monkeypatch):
    """NVE through the loop's MD: the committee-mean forces drive the atoms, total energy is conserved."""
    from mlipops.active.loop import _md_phase, params_fingerprint
    from mlipops.params import ActiveParams

    monkeypatch.chdir(tmp_path)
    model_dir = tmp_path / "model"
    _ensemble(2).save(model_dir)
    energies = []

    class Recording(CommitteeCalculator):
        def calculate(self, atoms=None, properties=("energy",), system_changes=()):
            super().calculate(atoms, properties, system_changes)
            energies.append(self.results["energy"] + self.atoms.get_kinetic_energy())

    p = ActiveParams.model_validate({
        "model": str(model_dir), "mode": "projected", "index": None,
        "structures": [{"kind": "vacancy", "supercell": 1}],
        "md": {"dynamics": "nve", "temperatures_K": [600.0], "steps_per_temperature": 20, "timestep_fs": 0.5,
               "checkpoint_every": 20}, "work_dir": "data/w", "out_dir": "data/raw"})
    st = load_or_start(tmp_path / "data/w/state.json", params_fingerprint(p, model_dir))
    _md_phase(p, st, Recording(model_dir), CU, None, Path(p.work_dir), None)
    assert st.md_steps_total == 20 and len(energies) >= 20
    kinetic_scale = 1.5 * 3 * units.kB * 600.0
    assert np.ptp(energies) < 0.05 * kinetic_scale


def test_gamma_mode_fires_outside_the_training_hull(tmp_path, monkeypatch):
    """A hull of bulk fcc only: the MD of a surface leaves it (γ > bound on every step), the MD of the
    bulk at 300 K stays near it; selected frames carry their largest per-atom γ."""
    from mlipops.active.loop import _Hull, _load_candidates, _md_phase, _select_phase, params_fingerprint
    from mlipops.index.build import build_index
    from mlipops.params import ActiveParams, IndexParams
    from mlipops.quarantine import rejected_frame

    train = []
    for k in range(4):
        a = bulk("Cu", "fcc", a=3.61 * (1 + 0.01 * (k - 1.5)), cubic=True).repeat(2)
        a.rattle(0.04, seed=k)
        train.append(a)
    train = get_oracle("emt").label(train)
    for k, a in enumerate(train):
        a.info.update(frame_id=frame_id(a), config_type="crystal_fcc", split="train", source="unit", source_index=k)
    from mlipops.frames import write_extxyz

    write_extxyz(tmp_path / "accepted.extxyz", train)
    rejected_frame([]).to_parquet(tmp_path / "quarantine.parquet", index=False)
    build_index(IndexParams(), DescriptorParams(), tmp_path / "accepted.extxyz", tmp_path / "quarantine.parquet",
                tmp_path / "index.duckdb")
    hull = _Hull(tmp_path / "index.duckdb")

    monkeypatch.chdir(tmp_path)
    model_dir = tmp_path / "model"
    _ensemble(2).save(model_dir)
    calc = CommitteeCalculator(model_dir, skin=0.5)
    p = ActiveParams.model_validate({
        "model": str(model_dir), "mode": "gamma", "gamma_max": 2.0, "index": str(tmp_path / "index.duckdb"),
        "structures": [{"kind": "bulk", "supercell": 2}, {"kind": "surface", "supercell": 2, "layers": 4}],
        "md": {"temperatures_K": [300.0], "steps_per_temperature": 3, "timestep_fs": 1.0, "checkpoint_every": 3},
        "dedup_min_distance": 0.0, "max_batch": 10, "work_dir": "data/w", "out_dir": "data/raw"})
    st = load_or_start(tmp_path / "data/w/state.json", params_fingerprint(p, model_dir))
    _md_phase(p, st, calc, CU, hull, Path(p.work_dir), None)
    cands = _load_candidates(st)
    assert {a.info["structure"] for a in cands} == {"surface"} and len(cands) == 3
    assert all(a.info["gamma_max"] > 2.0 and a.info["config_type"] == "active_gamma" for a in cands)
    _select_phase(p, st, calc, hull, Path(p.work_dir), Path(p.out_dir))
    sel = read_extxyz(st.selected_file)[0]
    assert len(sel) == 3 and all(a.info["gamma_max"] > 2.0 for a in sel)
    assert [a.info["frame_id"] for a in sel] == st.selected and st.phase == "label"


# ------------------------------------------------------------------------------------------ kill + resume
def test_loop_killed_after_a_label_was_written_resumes_without_duplicate_calls(tmp_path, u_repo_root):
    """The loop runs in a subprocess (`mlipops active run`); the driver is stopped (SIGSTOP) while an oracle
    call runs on a worker, the workers finish and write their label files, then the whole process group is
    SIGKILLed: labels on disk that the state has not recorded. The restart must reuse them."""
    model_dir = tmp_path / "model"
    _ensemble(3).save(model_dir)
    counter = tmp_path / "calls.log"
    params = yaml.safe_load((u_repo_root / "params.yaml").read_text())
    params["generate"]["oracle"] = {"calculator": "active_oracles.CountingEMT",
                                    "kwargs": {"counter": str(counter), "sleep_s": 1.0}}
    params["compute"] = {"scheduler_address": None, "n_workers": 2, "threads_per_worker": 1}
    params["crystal"] = {"element": "Cu", "lattice": "fcc", "a": 3.61}  # no curated data to resolve it from
    params["active"] = {"model": str(model_dir), "element": "Cu", "iterations": 1, "mode": "force",
                        "sigma_force_eVA": 1e-3, "index": None,
                        "structures": [{"kind": "bulk", "supercell": 1}, {"kind": "vacancy", "supercell": 1}],
                        "md": {"temperatures_K": [300.0, 900.0], "steps_per_temperature": 2, "timestep_fs": 1.0,
                               "checkpoint_every": 2},
                        "dedup_min_distance": 0.0, "max_batch": 5, "retries": 1, "backoff_s": 0.1,
                        "timeout_s": 60.0, "out_dir": "data/raw/active", "work_dir": "data/active",
                        "seed": 3, "base_data": None, "holdout": {"enabled": False}, "mlflow": False}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mlipops.cli", "active", "run", "-p", str(tmp_path / "params.yaml")]
    state_path = tmp_path / "data/active/state.json"
    label_dir = tmp_path / "data/active/iter_000/labels"

    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not log_lines(counter, "start"):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "no oracle call started"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGSTOP)  # the driver (and its scheduler) stop; the running calls go on
        stable_since, seen = time.monotonic(), None
        while time.monotonic() - stable_since < 1.5:  # until every started call has written its label
            now = (len(set(log_lines(counter, "start"))), len(list(label_dir.glob("*.extxyz"))))
            if now != seen or now[0] != now[1]:
                stable_since, seen = time.monotonic(), now
            assert time.monotonic() < deadline + 30, f"calls did not finish: {now}"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    st = json.loads(state_path.read_text())
    written = {p.stem for p in label_dir.glob("*.extxyz")}
    assert st["phase"] == "label" and written
    assert set(st["pending"]) >= written and not (written & set(st["labelled"]))  # written, not recorded
    selected = st["selected"]
    assert len(selected) == 5 and len(set(selected)) == 5
    calls_before = len(log_lines(counter, "end"))

    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    ends = log_lines(counter, "end")
    assert calls_before == len(written) and len(ends) == len(selected)
    assert sorted(ends) == sorted(selected)  # every selected frame labelled by exactly one completed call
    out, rejected = read_extxyz(tmp_path / "data/raw/active/active_0.extxyz")
    assert not rejected and [a.info["frame_id"] for a in out] == selected
    assert all(a.calc is not None and "forces" in a.calc.results for a in out)
    assert {a.info["config_type"] for a in out} == {"active_force"}
    final = json.loads(state_path.read_text())
    assert json.loads((tmp_path / "data/active/iter_000/failed.json").read_text()) == []
    assert final["iteration"] == 1 and final["pending"] == [] and final["history"][0]["labelled"] == 5
    h = final["history"][0]
    assert h["reused_labels"] == len(written) and h["oracle_calls"] == 5 - len(written) and h["failed"] == 0
    assert h["md_steps"] == 8 and 5 <= h["triggers"] <= 8 and h["max_sigma_f.max"] > 1e-3
    assert 0 <= h["sigma_projected.mean"] <= h["sigma_projected.max"]
    assert Counter(a.info["frame_id"] for a in out).most_common(1)[0][1] == 1


# ----------------------------------------------------------------------------- structures of any crystal
def test_starting_structures_are_built_from_the_crystal_for_any_lattice(tmp_path):
    from ase.build import fcc111
    from ase.calculators.lj import LennardJones
    from ase.calculators.singlepoint import SinglePointCalculator

    from mlipops.active.loop import active_crystal
    from mlipops.active.structures import build_structure
    from mlipops.crystal import _planes
    from mlipops.errors import ParamsError
    from mlipops.frames import write_extxyz
    from mlipops.params import ActiveStructure, Params

    mo = Crystal("Mo", "bcc", 3.16)
    b = build_structure(ActiveStructure(kind="bulk"), mo)  # lattice null: the crystal's
    assert len(b) == 16 and b.get_volume() / len(b) == pytest.approx(3.16 ** 3 / 2)
    assert len(build_structure(ActiveStructure(kind="vacancy"), mo)) == 15
    s = build_structure(ActiveStructure(kind="surface", miller="110", layers=4), mo)
    assert tuple(s.pbc) == (True, True, False) and len(_planes(s.positions[:, 2])) == 4
    f = build_structure(ActiveStructure(kind="bulk", lattice="fcc", supercell=1), mo)  # another lattice: same density
    assert len(f) == 4 and f.get_volume() / 4 == pytest.approx(3.16 ** 3 / 2)
    si = build_structure(ActiveStructure(kind="surface", miller="111", layers=4), Crystal("Si", "diamond", 5.43))
    assert set(si.get_chemical_symbols()) == {"Si"} and len(_planes(si.positions[:, 2])) == 4
    mg = build_structure(ActiveStructure(kind="surface", miller="0001", layers=3), Crystal("Mg", "hcp", 3.2))
    assert len(_planes(mg.positions[:, 2])) == 3
    cu = build_structure(ActiveStructure(kind="surface"), CU)  # fcc(111): the slab the loop always built
    assert np.array_equal(cu.positions, fcc111("Cu", size=(2, 2, 4), a=3.61, vacuum=6.0).positions)
    with pytest.raises(ParamsError, match="three digits"):
        build_structure(ActiveStructure(kind="surface", miller="000"), mo)
    # the crystal: active.element over the crystal section, nulls from the training split of base_data
    frames = []
    for s_ in (0.99, 1.0, 1.01):
        a = bulk("Mo", "bcc", a=3.16 * s_, cubic=True)
        a.calc = LennardJones(sigma=2.5, epsilon=0.5, rc=6.0)
        e = a.get_potential_energy()
        a.calc = SinglePointCalculator(a, energy=e, forces=np.zeros((2, 3)))
        frames.append(a)
    write_extxyz(tmp_path / "mo.extxyz", frames)
    p = Params.model_validate({"ingest": {"sources": [{"path": "x.extxyz"}]}, "validate": {"allowed_species": ["Mo"]},
                               "crystal": {"element": "Cu", "a": 3.6},
                               "active": {"element": "Mo", "base_data": str(tmp_path / "mo.extxyz")}})
    cr = active_crystal(p)
    assert (cr.element, cr.lattice) == ("Mo", "bcc") and cr.a == pytest.approx(3.16, rel=1e-6)
