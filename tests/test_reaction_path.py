"""Reaction-path analysis: exit, tolerance and σ-alarm points, error growth, barrier verdicts, the readers,
the plot, and a real path whose first half is the training data (trained ensemble + descriptor hull)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import write

from mlipops.descriptors import compute_descriptors
from mlipops.errors import FrameFormatError, MlipopsError
from mlipops.evaluate.reaction_path import (PathResult, analyse_path, collect_paths, evaluate_paths, path_arrays,
                                            plot_path, read_user_path)
from mlipops.frames import set_labels
from mlipops.index.hull import fit_hull_index
from mlipops.models import Ensemble, Potential
from mlipops.models.baseline import baseline_spec
from mlipops.oracles import get_oracle
from mlipops.params import DescriptorParams, TrainParams
from mlipops.train.loop import fit

from conftest import randomize_output

D = DescriptorParams(cutoff=4.5, n_radial=6, angular_cutoff=3.5, n_angular=2, max_l=2)
N = 8  # atoms per synthetic frame
S = np.round(np.linspace(1.0, 2.9, 20), 10)  # step 0.1; the exit is at index 10 (s = 2.0)
RATE = 3.0  # synthetic error growth per unit of s


def _synthetic(alarm: int | None = None, seed: int = 0) -> dict:
    """γ < 1 on the first half, > 1 on the second; |error|/N = 0.1 meV inside, 1 meV · exp(RATE (s − 2))
    (×5 % lognormal noise) from the exit on; σ/N = 1 meV, 6 meV (alarm level at k = 2) from ``alarm`` on."""
    rng = np.random.default_rng(seed)
    x = S - S[10]
    err = np.where(x < 0, 1e-4, 1e-3 * np.exp(RATE * x) * rng.lognormal(0.0, 0.05, len(S)))
    e_ref = -3.5 * N + N * 0.4 * np.sin(np.pi * (S - S[0]) / (S[-1] - S[0]))  # interior barrier at s ≈ 1.95
    sigma_pa = np.full(len(S), 1e-3) if alarm is None else np.where(np.arange(len(S)) >= alarm, 6e-3, 1e-3)
    gamma = np.where(x < 0, 0.3 + 0.05 * np.arange(len(S)), 1.2 + 2 * x)
    return {"s": S, "n_atoms": np.full(len(S), N), "e_ref": e_ref, "e_pred": e_ref - N * err,
            "sigma": N * sigma_pa, "max_gamma": gamma}


# ----------------------------------------------------------------------------------- synthetic paths
def test_exit_tolerance_growth_and_sigma_alarm():
    d = _synthetic(alarm=17)
    r = analyse_path("synthetic", **d, tolerance_per_atom=0.010, sigma_k=2.0)
    assert r.exit_index == 10 and r.exit_coordinate == pytest.approx(2.0)
    # 1 meV e^{3x} > 10 meV from x > ln(10)/3 = 0.77: s = 2.8 (index 18), noise permitting
    assert r.tolerance_index == 18
    assert r.lead_lag_points == 8 and r.lead_lag_coordinate == pytest.approx(0.8)
    assert r.growth_rate == pytest.approx(RATE, rel=0.05)
    assert r.efold_length == pytest.approx(1 / RATE, rel=0.05)
    assert r.growth_n_points == 10 and r.error_slope_per_atom > 0
    assert r.alarm_index == 17 and r.sigma_rose_before_error is True
    assert analyse_path("together", **_synthetic(alarm=18)).sigma_rose_before_error is True  # same point counts
    late = analyse_path("late", **_synthetic(alarm=19))
    assert late.alarm_index == 19 and late.sigma_rose_before_error is False
    m = r.metrics()
    assert m["exit_coordinate"] == pytest.approx(2.0) and m["tolerance_coordinate"] == pytest.approx(2.8)
    assert m["sigma_rose_before_error"] == 1 and late.metrics()["sigma_rose_before_error"] == 0
    assert m["n_points"] == 20 and m["n_points_outside_hull"] == 10
    assert m["max_abs_error_per_atom"] == pytest.approx(np.abs(d["e_pred"] - d["e_ref"]).max() / N)
    for key in ("lead_lag_coordinate", "lead_lag_points", "error_growth_rate", "error_efold_length",
                "error_slope_per_atom", "sigma_error_spearman", "barrier_coordinate", "barrier_inside_hull",
                "barrier_at_endpoint"):
        assert key in m
    assert all(v is None or type(v) in (int, float) for v in m.values()), m
    text = r.summary()
    assert "leaves the training hull at s = 2 Å" in text and "0.8 Å (8 points) after the exit" in text
    assert "σ rose before" in text


def test_spearman_follows_sigma_and_error():
    d = _synthetic()
    err = np.abs(d["e_pred"] - d["e_ref"])
    up = analyse_path("up", **(d | {"sigma": 0.5 * err}))
    assert up.sigma_error_spearman == pytest.approx(1.0)
    down = analyse_path("down", **(d | {"sigma": 0.5 * err[::-1]}))
    assert down.sigma_error_spearman < -0.5


def test_barrier_verdicts():
    d = _synthetic()
    b = int(np.argmax(d["e_ref"]))
    assert 0 < b < len(S) - 1
    inside = analyse_path("in", **(d | {"max_gamma": np.full(len(S), 0.7)}))
    assert inside.barrier_index == b and inside.barrier_inside is True and not inside.barrier_at_endpoint
    assert inside.verdict.startswith("barrier interpolated") and inside.metrics()["barrier_inside_hull"] == 1
    g = np.full(len(S), 0.7)
    g[b] = 1.3
    outside = analyse_path("out", **(d | {"max_gamma": g}))
    assert outside.barrier_inside is False and outside.verdict.startswith("barrier extrapolated")
    assert "Barrier extrapolated" in outside.summary()
    rising = analyse_path("rising", **(d | {"e_ref": np.linspace(-30.0, -20.0, len(S))}))
    assert rising.barrier_index == len(S) - 1 and rising.barrier_at_endpoint is True
    assert rising.barrier_inside is False  # γ at the end is > 1
    assert "no interior barrier" in rising.verdict and "last point" in rising.verdict
    assert "extrapolated" in rising.verdict and rising.metrics()["barrier_at_endpoint"] == 1


# ---------------------------------------------------------------------------------------- edge cases
def test_path_that_never_leaves_the_hull():
    d = _synthetic(alarm=17) | {"max_gamma": np.full(len(S), 1.0 + 5e-8)}  # within INSIDE_TOL: inside
    r = analyse_path("inside", **d)
    assert r.exit_index is None and r.lead_lag_points is None and r.lead_lag_coordinate is None
    assert np.isnan(r.growth_rate) and r.tolerance_index == 18
    m = r.metrics()
    assert m["exit_coordinate"] is None and m["error_growth_rate"] is None and m["n_points_outside_hull"] == 0
    assert "stays inside the training hull" in r.summary()


def test_error_that_never_exceeds_tolerance():
    r = analyse_path("accurate", **_synthetic(alarm=17), tolerance_per_atom=1.0)
    assert r.tolerance_index is None and r.sigma_rose_before_error is None
    assert r.lead_lag_points is None and r.metrics()["sigma_rose_before_error"] is None
    assert r.alarm_index is None  # 2 σ/N = 12 meV never reaches 1 eV/atom
    assert "never exceeds 1000 meV/atom" in r.summary()


def test_fewer_than_two_points_past_the_exit_and_single_member():
    d = _synthetic()
    d["max_gamma"] = np.where(np.arange(len(S)) == len(S) - 1, 5.0, 0.5)
    r = analyse_path("late_exit", **(d | {"sigma": np.zeros(len(S))}))
    assert r.exit_index == len(S) - 1 and r.growth_n_points == 1 and np.isnan(r.growth_rate)
    assert np.isnan(r.error_slope_per_atom) and r.lead_lag_points == 18 - (len(S) - 1)  # error broke first
    assert r.alarm_index is None and r.sigma_rose_before_error is False and np.isnan(r.sigma_error_spearman)
    assert r.metrics()["error_efold_length"] is None
    assert "before the exit" in r.summary() and "σ is zero" in r.summary()


def test_non_finite_values_and_no_hull():
    d = _synthetic(alarm=17)
    d["e_pred"][12] = np.nan
    d["max_gamma"][14] = np.inf
    d["sigma"][3] = np.nan
    r = analyse_path("nan", **d)
    assert r.tolerance_index == 12  # a NaN prediction is not within tolerance
    assert r.growth_n_points == 9
    m = r.metrics()
    assert m["n_nonfinite_errors"] == 1
    json.dumps(m, allow_nan=False)
    assert isinstance(r.summary(), str)
    nohull = analyse_path("nohull", **(d | {"max_gamma": np.full(len(S), np.nan)}))
    assert nohull.exit_index is None and nohull.barrier_inside is None
    assert nohull.metrics()["n_points_outside_hull"] is None and "not assessed" in nohull.verdict
    assert "not assessed" in nohull.summary()


def test_short_paths_raise():
    with pytest.raises(MlipopsError, match="at least 2"):
        analyse_path("one", [1.0], [4], [-10.0], [-10.0], [0.0], [0.5])
    with pytest.raises(MlipopsError, match="at least 2"):
        evaluate_paths(None, {"lonely": _labelled(1)}, None)
    with pytest.raises(MlipopsError, match="different lengths"):
        analyse_path("ragged", [1.0, 2.0], [4, 4], [-10.0, -9.0], [-10.0], [0.0, 0.0], [0.5, 0.5])


# ------------------------------------------------------------------------------------ readers
def _labelled(n: int, coord_key: str | None = "reaction_coordinate", values=None) -> list[Atoms]:
    out = []
    for k in range(n):
        a = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.0 + 0.2 * k]], pbc=False)
        a.calc = EMT()
        set_labels(a, a.get_potential_energy(), a.get_forces())
        if coord_key is not None:
            a.info[coord_key] = float(values[k] if values is not None else 2.0 + 0.2 * k)
        out.append(a)
    return out


def test_read_user_path_and_its_errors(tmp_path):
    good = tmp_path / "dimer_scan.extxyz"
    write(good, _labelled(4, values=[3.0, 2.5, 2.0, 1.5]), format="extxyz")  # decreasing: monotonic, kept
    name, frames = read_user_path(good)
    assert name == "dimer_scan" and [a.info["reaction_coordinate"] for a in frames] == [3.0, 2.5, 2.0, 1.5]

    frames = _labelled(3)
    del frames[1].info["reaction_coordinate"]
    bad = tmp_path / "no_coord.extxyz"
    write(bad, frames, format="extxyz")
    with pytest.raises(FrameFormatError) as exc:
        read_user_path(bad)
    assert (exc.value.file, exc.value.frame, exc.value.field) == (str(bad), 1, "reaction_coordinate")

    frames = _labelled(3)
    frames[2].calc = None
    bad = tmp_path / "no_energy.extxyz"
    write(bad, frames, format="extxyz")
    with pytest.raises(FrameFormatError) as exc:
        read_user_path(bad)
    assert (exc.value.file, exc.value.frame, exc.value.field) == (str(bad), 2, "energy")
    assert str(bad) in str(exc.value) and "frame 2" in str(exc.value)

    bad = tmp_path / "zigzag.extxyz"
    write(bad, _labelled(4, values=[1.0, 2.0, 1.5, 3.0]), format="extxyz")
    with pytest.raises(FrameFormatError, match="not strictly monotonic") as exc:
        read_user_path(bad)
    assert (exc.value.frame, exc.value.field) == (2, "reaction_coordinate")

    with pytest.raises(FrameFormatError) as exc:
        read_user_path(tmp_path / "missing.extxyz")
    assert exc.value.file == str(tmp_path / "missing.extxyz")


def test_collect_paths_orders_and_names_bad_frames():
    frames = _labelled(5, coord_key="path_coordinate", values=[2.4, 2.0, 2.8, 2.2, 2.6])
    for a in frames:
        a.info["config_type"] = "path_dimer"
    other = _labelled(1, coord_key=None)[0]
    other.info["config_type"] = "crystal_fcc"
    paths = collect_paths([other] + frames, ["path_dimer", "path_adatom"])
    assert list(paths) == ["path_dimer"]  # path_adatom is absent: skipped
    assert [a.info["path_coordinate"] for a in paths["path_dimer"]] == [2.0, 2.2, 2.4, 2.6, 2.8]
    for k, a in enumerate(frames):  # reaction_coordinate wins over path_coordinate where every frame has it
        a.info["reaction_coordinate"] = float(-k)
    assert [a.info["reaction_coordinate"] for a in collect_paths(frames, ["path_dimer"])["path_dimer"]] == \
        [-4.0, -3.0, -2.0, -1.0, 0.0]
    for a in frames:
        del a.info["reaction_coordinate"]
    del frames[3].info["path_coordinate"]
    with pytest.raises(MlipopsError) as exc:
        collect_paths([other] + frames, ["path_dimer"])
    assert (exc.value.frame, exc.value.field) == (4, "reaction_coordinate")  # index in the input list


# --------------------------------------------------------------------------------- model and plot
def test_path_arrays_adds_the_baseline_and_needs_energies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the baseline label cache goes under ./data/cache
    frames = _labelled(3)
    torch.manual_seed(0)
    delta = randomize_output(Potential(["Cu"], D.model_dump(), [8], None, baseline_spec("emt"))).double().eval()
    plain = Potential(["Cu"], D.model_dump(), [8]).double().eval()
    plain.load_state_dict(delta.state_dict())
    with_base, without = path_arrays(delta, frames, None), path_arrays(plain, frames, None)
    emt = np.array([a.calc.results["energy"] for a in frames])  # the labels are EMT's
    np.testing.assert_allclose(with_base["e_pred"], without["e_pred"] + emt, rtol=0, atol=1e-10)
    np.testing.assert_allclose(with_base["e_ref"], emt)
    assert np.all(with_base["sigma"] == 0) and np.all(np.isnan(with_base["max_gamma"]))
    assert list(with_base["n_atoms"]) == [2, 2, 2]
    frames[1].calc = None
    with pytest.raises(MlipopsError) as exc:
        path_arrays(plain, frames, None)
    assert (exc.value.frame, exc.value.field) == (1, "energy")


def test_plot_path_writes_png(tmp_path):
    d = _synthetic(alarm=17)
    d["max_gamma"][-1] = np.inf
    out = plot_path(analyse_path("synthetic", **d), tmp_path / "plots" / "synthetic.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


# ------------------------------------------------------------------------- end to end: a real path
@pytest.fixture(scope="module")
def expansion_path():
    """fcc Cu (32 atoms) expanded isotropically, s = lattice constant 3.47 → 4.19 Å in 16 points, EMT
    labels; a 2-member ensemble trained on the first 8 frames and the hull of their atoms."""
    base = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    frames = []
    for scale in np.linspace(0.96, 1.16, 16):
        a = base.copy()
        a.set_cell(base.cell * scale, scale_atoms=True)
        a.info.update(config_type="cu_expansion", reaction_coordinate=float(3.61 * scale))
        frames.append(a)
    frames = get_oracle("emt", {}).label(frames)
    train = frames[:8]
    p = TrainParams(hidden=[16, 16], epochs=200, batch_size=2, force_weight=1.0, dtype="float64", device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, and OpenMP spinning on a busy machine is avoided
    try:
        members = [fit(train, [], p.model_copy(update={"seed": seed}), D).model for seed in (0, 1)]
    finally:
        torch.set_num_threads(threads)
    g, unseen = compute_descriptors(train, ["Cu"], D.model_dump())
    symbols = np.concatenate([a.get_chemical_symbols() for a in train])
    hull = fit_hull_index(symbols, g, np.ones(len(symbols), bool), ["Cu"], D.model_dump(), 5)
    return frames, Ensemble(members).eval(), hull


def test_exit_between_training_and_unseen_halves(expansion_path, tmp_path):
    """First half of the path in the training data, second half not: the exit point lies between them,
    and the tolerance point of a smooth potential comes at or after it."""
    frames, model, hull = expansion_path
    results = evaluate_paths(model, collect_paths(frames, ["cu_expansion"]), hull, tolerance_per_atom=0.010,
                             sigma_k=2.0, plot_dir=tmp_path)
    r = results["cu_expansion"]
    assert isinstance(r, PathResult) and r.unit == "Å" and len(r.s) == 16
    assert np.all(r.max_gamma[:8] <= 1.0 + 1e-7)  # the training frames are inside their own hull
    assert r.exit_index in (8, 9)  # the first unseen frame, or the next
    assert np.all(r.error_per_atom[:8] < 0.010)  # interpolation is accurate
    assert r.tolerance_index is not None and r.tolerance_index >= r.exit_index
    assert r.lead_lag_points >= 0 and r.growth_rate > 0  # the error grows past the exit
    assert r.sigma[8:].mean() > r.sigma[:8].max() > 0  # the committee disagrees out of the hull
    assert r.barrier_at_endpoint and r.barrier_index == 15 and r.barrier_inside is False
    assert "leaves the training hull" in r.summary()
    assert (tmp_path / "cu_expansion.png").stat().st_size > 10_000
