"""The melting-point stages around the coexistence core: the reference's phase runs (latent heat, snapshots),
member runs that fail, the ensemble statistics and P(±window), the liquid share of training (keep_in_train),
and the sweep's table and plot. The pipeline wiring itself runs in test_e2e.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from ase.calculators.emt import EMT
from scipy.stats import norm

from mlipops.errors import ParamsError
from mlipops.evaluate import melting_stage
from mlipops.evaluate.melting import CoexistenceSettings, phase_properties
from mlipops.evaluate.melting_reference import coexistence_task
from mlipops.ingest import assign_splits
from mlipops.params import MeltingParams, SplitParams


def test_phase_properties_emt_latent_heat_and_labelled_snapshots():
    s = CoexistenceSettings(supercell=(2, 2, 4), melt_steps=120)
    out = phase_properties(EMT, s, 1300.0, steps=80, snapshots=3, supercell=(2, 2, 2))
    frames = out.pop("frames")
    assert out["solid"]["solid_fraction"] > 0.8 and out["liquid"]["solid_fraction"] < 0.3
    # EMT Cu at 1300 K: L = 0.13 eV/atom (600 steps, 108 atoms); Richards' rule ΔS_m ≈ k_B; the liquid is less dense
    assert 0.05 < out["latent_heat_eV_per_atom"] < 0.25
    assert 0.4 < out["delta_s_kB"] < 2.5
    assert out["delta_v_A3_per_atom"] > 0
    assert [a.info["config_type"] for a in frames] == ["melting_solid"] * 3 + ["melting_liquid"] * 3
    for a in frames:  # labels are the calculator's, on a copy that no longer carries it
        e = a.get_potential_energy()
        b = a.copy()
        b.calc = EMT()
        assert b.get_potential_energy() == pytest.approx(e, abs=1e-8)
        assert a.get_forces().shape == (32, 3) and a.get_stress().shape == (6,)


class _Exploding(EMT):
    """EMT that raises after a few force calls, like a potential leaving its domain."""

    calls = 0

    def calculate(self, *args, **kwargs):
        type(self).calls += 1
        if type(self).calls > 40:
            raise FloatingPointError("descriptor overflow")
        super().calculate(*args, **kwargs)


def test_failing_calculator_becomes_a_rejected_run_not_a_crash():
    s = CoexistenceSettings(supercell=(2, 2, 4), melt_steps=10, equilibration_steps=10, production_steps=40,
                            max_retries=1, a=3.59, window_fraction=1.0)
    r = coexistence_task({"factory": _Exploding, "settings": s, "seed": 3, "start": -1})
    assert not r.coexisting and not r.accepted and r.seed == 3 and r.start == -1
    assert "FloatingPointError" in r.rejected_reason and "descriptor overflow" in r.rejected_reason
    assert math.isnan(r.tm) and len(r.temperatures) == 0


def _member(i, tm, err, n=2):
    return {"member": i, "tm_mean": tm, "tm_std": 0.0, "tm_stderr": err, "n_accepted": n, "n_rejected": 0, "runs": []}


def test_combine_mixture_probability_includes_reference_error():
    members = [_member(0, 1300.0, 20.0), _member(1, 1380.0, 10.0), _member(2, float("nan"), float("nan"), n=0)]
    ref = {"available": True, "tm_mean": 1320.0, "tm_stderr": 15.0}
    out = melting_stage.combine(members, ref, 50.0)
    assert out["tm_mean"] == pytest.approx(1340.0) and out["tm_std"] == pytest.approx(math.sqrt(3200.0))
    assert out["n_members_accepted"] == 2 and out["bias"] == pytest.approx(20.0)
    # by hand: each accepted member a Gaussian of width sqrt(err_k^2 + err_ref^2), equal weights
    expect = 0.0
    for mu, e in ((1300.0, 20.0), (1380.0, 10.0)):
        sd = math.hypot(e, 15.0)
        expect += 0.5 * (norm.cdf((1370.0 - mu) / sd) - norm.cdf((1270.0 - mu) / sd))
    assert out["p_within_window"] == pytest.approx(expect, rel=1e-12)
    none = melting_stage.combine(members, {"available": False, "tm_mean": None}, 50.0)
    assert none["p_within_window"] is None and none["p_reason"] == "no reference Tm"
    assert none["tm_mean"] == pytest.approx(1340.0)


def test_flat_metrics_and_conclusion_are_consistent():
    members = [_member(0, 1250.0, 12.0) | {"bias_estimate": -40.0}, _member(1, 1270.0, 8.0) | {"bias_estimate": -20.0}]
    ref = {"available": True, "tm_mean": 1300.0, "tm_stderr": 10.0, "oracle": {"calculator": "emt"},
           "phases": {"latent_heat_eV_per_atom": 0.13, "delta_s_kB": 1.19}}
    result = melting_stage.combine(members, ref, 50.0) | {"members": members, "model": "cu", "reference": ref,
                                                          "liquid_coverage": 0.9, "n_liquid_train_frames": 16}
    m = melting_stage.flat_metrics(result)
    assert m["bias"] == pytest.approx(-40.0) and m["bias_estimate"] == pytest.approx(-30.0)
    assert m["member.1.tm_mean"] == 1270.0 and m["latent_heat_eV_per_atom"] == 0.13
    text = " ".join(melting_stage.conclusion(result))
    assert "Tm = 1300 ± 10 K" in text and "Tm = 1260 ± 14 K" in text and "bias -40 K" in text
    assert "-30 K (δE/ΔS_m)" in text and "90 %" in text
    # the quick preset says what its numbers are, with the stated finite-size systematic when measured
    assert "finite size: not measured" in text
    quick = result | {"preset": "quick", "settings": {"supercell": (4, 4, 8)},
                      "finite_size": {"bias_K": -12.0, "error_K": 9.0, "source": "EMT Cu fcc, 4x4x8 vs 6x6x8"}}
    text = " ".join(melting_stage.conclusion(quick))
    assert "not the number to quote" in text and "4×4×8 cell melts -12 ± 9 K" in text and "EMT Cu fcc" in text
    assert "evaluate.melting.preset=production" in text
    assert "not the number to quote" not in " ".join(melting_stage.conclusion(quick | {"preset": "production"}))


def test_bias_significance_on_numbers():
    """se_ens² = max(s², mean err_k²)/n; σ = sqrt(se_ens² + err_ref²); excess = |bias| − max(window, t·σ) with
    Student's t at the Welch–Satterthwaite degrees of freedom."""
    from scipy.stats import t as student_t

    tms, errs = np.array([1340.0, 1360.0, 1380.0]), np.array([10.0, 20.0, 20.0])
    out = melting_stage.bias_significance(60.0, tms, errs, 12.0, 50.0, n_ref=4)
    # s² = 400 (ddof 1) > mean err² = 300: the members' spread rules (2 dof); se_ens = sqrt(400/3)
    se = math.sqrt(400.0 / 3)
    assert out["tm_se_ensemble"] == pytest.approx(se)
    sigma = math.sqrt(se**2 + 144.0)
    assert out["bias_combined_se"] == pytest.approx(sigma)
    dof = sigma**4 / (se**4 / 2 + 12.0**4 / 3)
    assert out["bias_dof"] == pytest.approx(dof)
    assert out["bias_bound_K"] == pytest.approx(student_t.ppf(0.975, dof) * sigma)  # 45 K < the window
    assert out["bias_significance_excess_K"] == pytest.approx(10.0) and out["abs_bias"] == 60.0
    # members that agree better than their own errors: floored at the noise those errors predict, whose
    # degrees of freedom are the reference's (a one-seed member's error is the reference seeds' scatter)
    tight = melting_stage.bias_significance(-60.0, np.array([1240.0, 1241.0, 1239.0]), np.array([40.0, 40.0, 40.0]),
                                            30.0, 50.0, n_ref=2)
    assert tight["tm_se_ensemble"] == pytest.approx(40.0 / math.sqrt(3))
    sigma = math.sqrt(1600.0 / 3 + 900.0)
    dof = sigma**4 / ((1600.0 / 3) ** 2 + 900.0**2)
    assert tight["bias_dof"] == pytest.approx(dof) and 1.0 < dof < 2.0
    assert tight["bias_significance_excess_K"] == pytest.approx(60.0 - student_t.ppf(0.975, dof) * sigma)
    # two reference seeds are one degree of freedom: the bound is far wider than 2σ
    assert tight["bias_t_factor"] > 4.0
    one = melting_stage.bias_significance(10.0, np.array([1310.0]), np.array([25.0]), 0.0, 50.0)
    assert one["tm_se_ensemble"] == pytest.approx(25.0)  # one member: its own error


@pytest.mark.parametrize("tms, errs, ref_err, n_ref, passes", [
    ((1400.0, 1410.0, 1420.0), (20.0, 20.0, 20.0), 12.0, 2, False),  # bias 110 K > window and > t·σ = 71 K
    ((1360.0, 1370.0, 1380.0), (20.0, 20.0, 20.0), 12.0, 2, True),   # bias 70 K: within t·σ = 71 K (2 ref seeds)
    ((1360.0, 1370.0, 1380.0), (20.0, 20.0, 20.0), 12.0, 8, False),  # the same bias against 8 ref seeds: t·σ 42 K
    ((1330.0, 1340.0, 1350.0), (20.0, 20.0, 20.0), 12.0, 2, True),   # bias 40 K within the window
    ((1300.0, 1370.0, 1440.0), (40.0, 40.0, 40.0), 25.0, 4, True),   # bias 70 K but t·σ ≈ 180 K: not significant
])
def test_the_melting_gate_of_params_yaml_fails_only_a_significant_bias(tmp_path, u_repo_root, tms, errs, ref_err,
                                                                        n_ref, passes):
    from mlipops.params import load_params
    from mlipops.promote.gates import check_gates
    from mlipops.report import write_metrics

    members = [_member(k, tm, e, n=1) for k, (tm, e) in enumerate(zip(tms, errs))]
    result = melting_stage.combine(members, {"available": True, "tm_mean": 1300.0, "tm_stderr": ref_err,
                                             "n_accepted": n_ref}, 50.0)
    write_metrics(tmp_path / "melting", melting_stage.flat_metrics(result | {"members": members}))
    key = "melting:bias_significance_excess_K"
    gate = load_params(u_repo_root / "params.yaml").promote.gates[key]
    (row,) = check_gates({key: gate}, tmp_path, always=False)
    assert row["passed"] is passes and row["value"] == pytest.approx(result["bias_significance_excess_K"])
    assert "p_within_window" in melting_stage.flat_metrics(result | {"members": members})  # still reported
    text = " ".join(melting_stage.conclusion(result | {"members": members, "model": "cu", "n_members": 3,
                                                       "reference": {"oracle": {"calculator": "emt"}}}))
    assert ("(significant)" in text) is not passes


def test_keep_in_train_moves_a_stable_share_to_unused_and_leaves_val_test():
    from ase import Atoms

    frames = [Atoms("Cu", info={"frame_id": f"f{i:04d}", "config_type": "liquid" if i % 2 else "crystal_fcc"})
              for i in range(2000)]
    base = SplitParams(val_fraction=0.1, test_fraction=0.1)
    assign_splits(frames, base)
    before = [a.info["split"] for a in frames]
    assign_splits(frames, base.model_copy(update={"keep_in_train": {"liquid": 0.25}}))
    after = [a.info["split"] for a in frames]
    for a, b0, b1 in zip(frames, before, after):
        if b0 == "test" or a.info["config_type"] != "liquid":
            assert b1 == b0  # test and other config_types untouched
        else:
            assert b1 in (b0, "unused")
    for split in ("train", "val"):  # validation thinned too: early stopping must not judge unseen kinds
        was = [b1 for a, b0, b1 in zip(frames, before, after) if b0 == split and a.info["config_type"] == "liquid"]
        assert abs(was.count(split) / len(was) - 0.25) < 0.07
    assert set(after) == {"train", "val", "test", "unused"}
    again = [a.info["split"] for a in (assign_splits(frames,
                                                     base.model_copy(update={"keep_in_train": {"liquid": 0.25}}))
                                       or frames)]
    assert again == after  # hashed, not random
    assign_splits(frames, base.model_copy(update={"keep_in_train": {"liquid": 0.0}}))
    assert not any(a.info["split"] in ("train", "val") and a.info["config_type"] == "liquid" for a in frames)
    with pytest.raises(ValueError, match="keep_in_train.liquid"):
        SplitParams(keep_in_train={"liquid": 1.5})


def test_presets_validate_and_build_settings():
    m = MeltingParams()
    assert m.settings("Cu").supercell == (4, 4, 8)  # at least 4 x 4 lateral in every preset (issue 23)
    prod = m.model_copy(update={"preset": "production"}).settings("Cu")
    assert prod.supercell == (4, 4, 8) and prod.production_steps == 2000 and not prod.require_agreement
    assert prod.production_limit() == 4000 and not m.settings("Cu").require_agreement
    bad = m.model_copy(update={"quick": m.quick.model_copy(update={"production_steps": 33})})
    with pytest.raises(ParamsError, match="melting.production_steps"):
        bad.settings("Cu")


def test_sweep_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(melting_stage, "SWEEP_DIR", tmp_path / "sweep")
    pts = [melting_stage.sweep_point(f, {"tm_mean": tm, "tm_std": sd, "tm_ref": 1300.0, "bias": tm - 1300.0,
                                         "bias_estimate": est, "p_within_window": p, "window_K": 120.0,
                                         "liquid_coverage": cov,
                                         "n_liquid_train_frames": n, "coverage_liquid_at_tm": cov - 0.1},
                                     {"members": [{"member": 0, "tm_mean": tm - 10},
                                                  {"member": 1, "tm_mean": tm + 10}]},
                                     src)
           for f, tm, sd, est, p, cov, n, src in ((1.0, 1290.0, 14.0, -8.0, 0.9, 0.97, 16, "workspace"),
                                                  (0.0, 1160.0, 60.0, -120.0, 0.05, 0.40, 0, "dvc exp liquid-keep-0"))]
    melting_stage.write_sweep({"config_type": "liquid", "param": "ingest.split.keep_in_train.liquid", "points": pts})
    out = json.loads((tmp_path / "sweep/sweep.json").read_text())
    assert [q["fraction"] for q in out["points"]] == [1.0, 0.0]
    md = (tmp_path / "sweep/sweep.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    assert len(rows) == 2 and rows[0].startswith("| 0 | 0 | 40 | 30 |")  # sorted by fraction
    assert "1160 ± 60" in rows[0] and "| -140 | -120 | 0.05 |" in rows[0]
    assert "| P(±120 K) |" in md  # the window the points were judged with, not a fixed one
    assert (tmp_path / "sweep/sweep.png").stat().st_size > 5000
    assert np.isfinite(out["points"][0]["tm_mean"])


def test_every_config_type_of_three_frames_or_more_gets_val_and_test_frames_whatever_the_seed():
    """20 liquid frames at 10 % val / 10 % test leave val or test empty for about one seed in eight; the split
    then moves the training draws nearest to the cut, never a group's last training frame."""
    from ase import Atoms

    def frames():
        return ([Atoms("Cu", info={"frame_id": f"liq{i:03d}", "config_type": "liquid"}) for i in range(20)]
                + [Atoms("Cu", info={"frame_id": f"fcc{i:03d}", "config_type": "crystal_fcc"}) for i in range(3)]
                + [Atoms("Cu", info={"frame_id": f"dim{i:03d}", "config_type": "dimer"}) for i in range(2)])

    lacking = 0
    for seed in range(40):
        plain = frames()
        assign_splits(plain, SplitParams(val_fraction=0.1, test_fraction=0.1, seed=seed, min_per_config_type=0))
        fs = frames()
        assign_splits(fs, SplitParams(val_fraction=0.1, test_fraction=0.1, seed=seed))
        liquid = [a.info["split"] for a in fs if a.info["config_type"] == "liquid"]
        before = [a.info["split"] for a in plain if a.info["config_type"] == "liquid"]
        lacking += "test" not in before or "val" not in before
        assert "test" in liquid and "val" in liquid and "train" in liquid
        fcc = {a.info["split"] for a in fs if a.info["config_type"] == "crystal_fcc"}
        assert {"test", "val"} <= fcc
        dimer = [a.info["split"] for a in fs if a.info["config_type"] == "dimer"]
        assert dimer == [a.info["split"] for a in plain if a.info["config_type"] == "dimer"]  # < 3: the plain draw
        # frames that drew val/test keep it; only training draws move
        assert all(b == a or b == "train" for a, b in zip(liquid, before))
    assert lacking >= 2  # the guarantee is doing something at these sizes


# ------------------------------------------------------------------------------ a given reference (issue 24 item 3)
GIVEN = {"tm_K": 2896.0, "uncertainty_K": 10.0, "source": "experiment (CRC Handbook)"}


def _project(tmp_path, root, melting: dict, element: str = "Mo") -> str:
    """A project folder with the repository's params.yaml for ``element`` and these evaluate.melting keys."""
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["generate"]["element"] = element
    params["validate"]["allowed_species"] = [element]  # the data's element: what the melting runs simulate
    params["evaluate"]["melting"].update(melting)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return str(tmp_path)


def _cli(cwd: str, *args: str):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MLIPOPS_DEBUG"}
    return subprocess.run([sys.executable, "-m", "mlipops.cli", "evaluate", "melting", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_given_reference_is_written_without_any_oracle_run(tmp_path, u_repo_root):
    """`mlipops evaluate melting --reference` with evaluate.melting.reference: Mo, whose oracle (EMT) cannot
    compute Mo at all, so any oracle run would fail: the given value, its uncertainty and source, no phases."""
    r = _cli(_project(tmp_path, u_repo_root, {"reference": GIVEN, "lattice": None}), "--reference")
    assert r.returncode == 0, r.stderr
    ref = json.loads((tmp_path / "data/melting/reference.json").read_text())
    assert ref["available"] is True and ref["given"] is True and ref["oracle"] is None
    assert (ref["tm_mean"], ref["tm_stderr"], ref["source"]) == (2896.0, 10.0, "experiment (CRC Handbook)")
    assert (ref["element"], ref["lattice"]) == ("Mo", "bcc") and ref["runs"] == []
    assert "given reference" in ref["phases_reason"] and "phases" not in ref
    assert (tmp_path / "data/melting/reference_phases.extxyz").stat().st_size == 0  # a DVC out: there, empty
    assert "tm_ref=2896.0" in r.stderr and "nan" not in r.stderr


def test_an_oracle_that_cannot_compute_the_element_stops_with_one_line(tmp_path, u_repo_root):
    r = _cli(_project(tmp_path, u_repo_root, {"reference": None, "lattice": None}), "--reference")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("mlipops: error: field 'generate.oracle': the reference oracle emt cannot compute Mo: "
                               "No EMT-potential for Mo; give evaluate.melting.reference: {tm_K, uncertainty_K, "
                               "source} or name an oracle that can"), lines[0]
    assert not (tmp_path / "data/melting/reference.json").exists()


def test_given_reference_params_are_checked():
    from mlipops.params import MeltingReference

    assert MeltingParams(reference=GIVEN).reference == MeltingReference(**GIVEN)
    for bad in ({"tm_K": -5, "uncertainty_K": 10, "source": "x"}, {"tm_K": 2896, "uncertainty_K": 10},
                {"tm_K": 2896, "uncertainty_K": 10, "source": "  "}, {"tm_K": 2896, "sigma_K": 10, "source": "x"}):
        with pytest.raises(ValueError):
            MeltingParams(reference=bad)
    assert MeltingParams(lattice="diamond", element="Si", q6_solid_threshold=None).settings("Si", "diamond").order() \
        == (4, 16)


def test_members_against_a_given_reference_report_na_not_nan(tmp_path, monkeypatch, u_repo_root):
    """The members' report against a given reference: bias, P and the gate metrics from the given uncertainty
    (infinitely many degrees of freedom); latent heat, energy cause and snapshot coverage say n/a."""
    from mlipops.evaluate.melting import CoexistenceRun
    from mlipops.evaluate.melting_reference import given_reference
    from mlipops.params import load_params

    monkeypatch.chdir(tmp_path)  # the report goes to reports/evaluate/melting of this project
    p = load_params(_project(tmp_path, u_repo_root, {"reference": GIVEN, "lattice": None}) + "/params.yaml")
    ref = given_reference(p, "Mo", "bcc")
    members = [_member(k, tm, 30.0, n=1) for k, tm in enumerate((2950.0, 3010.0, 2980.0))]
    result = melting_stage.combine(members, ref, 150.0)
    assert result["tm_ref"] == 2896.0 and result["tm_ref_stderr"] == 10.0
    assert result["bias"] == pytest.approx(2980.0 - 2896.0)
    se = math.sqrt(max(900.0, 900.0) / 3)  # s² = 900 = mean err²
    assert result["bias_combined_se"] == pytest.approx(math.hypot(se, 10.0))
    assert result["bias_dof"] == pytest.approx(math.hypot(se, 10.0) ** 4 / (se**4 / 2))  # reference: no dof term
    t = np.arange(0.0, 100.0, 10.0)
    runs = [CoexistenceRun(seed=k, t_start_liquid=3500.0, temperatures=np.full(10, m["tm_mean"]), times_fs=t,
                           solid_fraction=np.full(10, 0.5), tm=m["tm_mean"], tm_stderr=30.0, coexisting=True,
                           rejected_reason=None, attempts=1, wall_s=1.0, n_atoms=144, order_threshold=0.3)
            for k, m in enumerate(members)]
    s = p.evaluate.melting.settings("Mo", "bcc")
    result |= {"model": "mo", "preset": "quick", "settings": s.__dict__, "members": members,
               "reference": {k: ref.get(k) for k in ("available", "given", "source", "tm_mean", "tm_stderr",
                                                     "phases_reason", "oracle")}}
    melting_stage.write_report(result, runs, [{"member": k, "seed": k} for k in range(3)], ref)
    out = tmp_path / melting_stage.REPORT_DIR
    summary = (out / "summary.md").read_text()
    assert "Reference (given: experiment (CRC Handbook)): Tm = 2896 ± 10 K" in summary
    assert "n/a: given reference" in summary and "nan" not in summary.lower()
    assert "calibrated per run" in summary and "q̄6 (14 neighbours)" in summary
    metrics = json.loads((out / "metrics.json").read_text())
    assert "latent_heat_eV_per_atom" not in metrics and metrics["tm_ref"] == 2896.0
    assert metrics["bias_significance_excess_K"] == pytest.approx(result["bias_significance_excess_K"])
    assert (out / "traces_reference.png").stat().st_size > 5_000


def test_model_phases_at_a_given_reference_and_what_their_coverage_says():
    """The model's own solid and liquid at a given Tm_ref (EMT Cu standing in for the model): labelled snapshots,
    latent heat and ΔV, the runs' calibrated threshold; the summary says whether the bias is missing data."""
    from mlipops.evaluate.melting import CoexistenceRun

    m = MeltingParams(t_guess=1300.0, phase_steps=40, phase_snapshots=2, calibration_steps=10, window_fraction=1.0,
                      quick={"supercell": [2, 2, 4], "melt_steps": 60, "equilibration_steps": 10,
                             "production_steps": 40})
    s = m.settings("Cu", "fcc")
    runs = [CoexistenceRun(seed=0, t_start_liquid=1500.0, temperatures=np.zeros(0), times_fs=np.zeros(0),
                           solid_fraction=np.zeros(0), tm=1300.0, tm_stderr=10.0, coexisting=True,
                           rejected_reason=None, attempts=1, wall_s=1.0, n_atoms=64, order_threshold=0.31)]
    own, frames = melting_stage.model_phases(EMT, s, 1300.0, m, runs)
    assert own["order_parameter"]["threshold"] == 0.31 and own["temperature_K"] == 1300.0
    assert [a.info["config_type"] for a in frames] == ["melting_solid"] * 2 + ["melting_liquid"] * 2
    assert own["solid"]["solid_fraction"] > own["liquid"]["solid_fraction"]
    result = {"tm_ref": 1300.0, "tm_ref_stderr": 0.5, "tm_mean": 1200.0, "tm_std": 20.0, "n_members": 2,
              "n_members_accepted": 2, "bias": -100.0, "p_within_window": 0.1, "window_K": 50.0,
              "reference": {"given": True, "source": "a handbook"}, "model_phases": own, "settings": s.__dict__,
              "preset": "quick", "coverage_solid_at_tm": 0.97, "coverage_liquid_at_tm": 0.41,
              "coverage_test_atoms": 0.95}
    text = " ".join(melting_stage.conclusion(result))
    assert "Tm = 1300 ± 0.5 K" in text  # a sub-kelvin uncertainty is not printed as ± 0
    assert "The model's own solid and liquid at the given Tm_ref = 1300 K" in text
    assert "97 % of the solid's atoms and 41 % of the liquid's atoms (the test split's atoms: 95 %)" in text
    assert "liquid at Tm_ref lies largely outside the training hull" in text and "missing data" in text
    inside = melting_stage.coverage_verdict(result | {"coverage_liquid_at_tm": 0.95})
    assert inside.startswith("Both phases lie inside the training data, so the bias is not missing data")
    assert "DFT functional" in inside  # a measured Tm: the functional's and the nuclei's share too
    oracle = melting_stage.coverage_verdict(result | {"coverage_liquid_at_tm": 0.95, "reference": {"given": False}})
    assert "DFT functional" not in oracle
    assert melting_stage.coverage_verdict({"tm_ref": 1300.0}) == ""
