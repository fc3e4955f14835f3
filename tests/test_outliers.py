"""Cook's-distance outliers: the statistics against closed forms, and the decisions on injected errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk

from mlipops.frames import frame_id, labels, set_labels
from mlipops.oracles import get_oracle
from mlipops.params import DescriptorParams, OutlierParams
from mlipops.quality.outliers import (
    added_influence,
    detect,
    force_frame_stats,
    frame_cooks,
    gross_errors,
    ols_influence,
    residual_level,
    robust_t,
    tail_z,
)

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = DescriptorParams(n_radial=6, n_angular=3, max_l=2).model_dump()


def test_cooks_distance_and_studentized_residuals_closed_form(u_rng):
    x = np.column_stack([np.ones(30), u_rng.standard_normal((30, 3))])
    y = x @ np.array([1.0, 2.0, -1.0, 0.5]) + 0.1 * u_rng.standard_normal(30)
    y[7] += 2.0  # one gross error
    s = ols_influence(y, x)
    n, p = x.shape
    h = np.diag(x @ np.linalg.inv(x.T @ x) @ x.T)
    e = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
    s2 = e @ e / (n - p)
    cooks = e**2 / (p * s2) * h / (1 - h) ** 2
    np.testing.assert_allclose(s.leverage, h, rtol=1e-10)
    np.testing.assert_allclose(s.cooks, cooks, rtol=1e-8)
    # leave-one-out refits: the externally studentized residual by brute force
    t_ext = []
    for i in range(n):
        m = np.arange(n) != i
        beta = np.linalg.lstsq(x[m], y[m], rcond=None)[0]
        r = y[m] - x[m] @ beta
        t_ext.append(e[i] / np.sqrt(r @ r / (n - 1 - p) * (1 - h[i])))
    np.testing.assert_allclose(s.t_external, t_ext, rtol=1e-8)
    np.testing.assert_allclose(s.dffit, h * e / (1 - h), rtol=1e-10)
    assert int(np.argmax(s.cooks)) == 7


def test_collinear_columns_are_dropped(u_rng):
    x = u_rng.standard_normal((20, 3))
    x = np.column_stack([x, x[:, 0] + x[:, 1]])  # exactly collinear
    s = ols_influence(x[:, 0] + u_rng.standard_normal(20) * 0.1, x)
    assert s.p == 3 and np.isfinite(s.cooks).all()


def test_robust_t_uses_the_group_scale():
    r = np.concatenate([np.linspace(-1, 1, 21) * 0.01, np.linspace(-1, 1, 21)])
    g = np.array(["crystal"] * 21 + ["liquid"] * 21)
    t = robust_t(r, np.zeros(42), g)
    assert np.abs(t[:21]).max() == pytest.approx(np.abs(t[21:]).max())


def test_group_scale_from_members_counts_only_informative_rows_as_from_groups():
    from mlipops.quality.outliers import _group_scale

    rng = np.random.default_rng(5)
    r = rng.standard_normal(60) * np.repeat([0.1, 1.0, 5.0], 20)
    g = np.repeat(["a", "b", "c"], 20)
    informative = rng.random(60) > 0.3
    members = {k: np.flatnonzero(g == k) for k in ("a", "b", "c")}
    by_groups = _group_scale(r, g, min_group=5, informative=informative)
    assert _group_scale(r, None, min_group=5, informative=informative, members=members) == by_groups
    assert set(by_groups) == {None, "a", "b", "c"}
    assert _group_scale(r, None, min_group=5, members=members) == _group_scale(r, g, min_group=5)


@pytest.fixture(scope="module")
def u_frames():
    return make_frames()


def make_frames():
    rng = np.random.default_rng(3)
    frames = []
    for k in range(96):
        kind = ["fcc", "bcc", "sc"][k % 3]
        a = bulk("Cu", kind, a={"fcc": 3.61, "bcc": 2.87, "sc": 2.40}[kind], cubic=True).repeat(2)
        a.set_cell(a.cell * (1 + rng.uniform(-0.03, 0.03)), scale_atoms=True)
        a.positions += rng.normal(0, 0.04, a.positions.shape)
        a.info["config_type"] = f"crystal_{kind}"
        frames.append(a)
    for k in range(6):  # rare but correct: hot, strongly disordered frames among the crystals
        a = bulk("Cu", "fcc", a=3.65, cubic=True).repeat(2)
        a.positions += rng.normal(0, 0.15, a.positions.shape)
        a.info["config_type"] = "hot"
        frames.append(a)
    frames = get_oracle("emt").label(frames)
    for a in frames:
        a.info["frame_id"] = frame_id(a)
    return frames


def _copy(frames):
    out = []
    for a in frames:
        b = a.copy()
        e, f, s = labels(a)
        set_labels(b, e, None if f is None else f.copy(), s)
        out.append(b)
    return out


def test_clean_data_keeps_everything_and_rare_frames_are_explained(u_frames):
    rep = detect(_copy(u_frames), ["Cu"], SETTINGS)
    df = rep.frames
    assert not df["quarantine"].any(), df.loc[df.quarantine, "reason"].tolist()
    hot = df[df.config_type == "hot"]
    # the hot frames sit far from the crystals in descriptor space: high leverage, not an error
    assert hot["energy_leverage"].mean() > 2 * df.loc[df.config_type != "hot", "energy_leverage"].mean()
    assert set(hot["kind"]) <= {"high leverage, consistent label", "ok"}


def test_injected_errors_are_quarantined_with_reasons(u_frames):
    frames = _copy(u_frames)
    e, f, s = labels(frames[4])
    set_labels(frames[4], e + 0.1 * len(frames[4]), f, s)  # energy off by 0.1 eV/atom
    e, f, s = labels(frames[10])
    set_labels(frames[10], e, -f, s)  # sign-flipped forces
    e, f, s = labels(frames[20])
    f = f.copy()
    f[3] = labels(frames[21])[1][3] + 1.0  # one atom's force from elsewhere, off by 1 eV/Å
    set_labels(frames[20], e, f, s)
    rep = detect(frames, ["Cu"], SETTINGS)
    df = rep.frames
    assert set(np.flatnonzero(df["quarantine"])) == {4, 10, 20}
    assert df.loc[4, "energy_flag"] and df.loc[4, "energy_residual"] == pytest.approx(0.1, abs=0.02)
    assert "eV/atom off the surrogate" in df.loc[4, "reason"] and "Cook's D" in df.loc[4, "reason"]
    assert df.loc[10, "force_flag"] and "force on atom" in df.loc[10, "reason"]
    assert int(df.loc[20, "force_atom"]) == 3
    assert (df.loc[[4, 10, 20], "kind"] == "influential_outlier").all()


# ------------------------------------------------------------------- frame-level force tests
def test_added_and_frame_cooks_equal_refits(u_rng):
    """The closed forms behind the recheck and the frame test against brute-force refits."""
    x = np.column_stack([np.ones(40), u_rng.standard_normal((40, 3))])
    y = x @ np.array([0.5, 1.0, -2.0, 0.3]) + 0.1 * u_rng.standard_normal(40)
    p = x.shape[1]
    # a row added to a fit of the other 39: its Cook's D in the 40-row fit
    fit = ols_influence(y[1:], x[1:])
    pred, h0 = fit.predict(x[:1])
    cooks, lev, dffit = added_influence(y[:1] - pred, h0, fit)
    full = ols_influence(y, x)
    # statsmodels' D uses the 40-row s²; the closed form the 39-row one: rescale to compare
    s2_39 = np.sum((fit.y - fit.fitted) ** 2) / (39 - p)
    s2_40 = np.sum((full.y - full.fitted) ** 2) / (40 - p)
    assert cooks[0] * s2_39 / s2_40 == pytest.approx(full.cooks[0], rel=1e-8)
    assert lev[0] == pytest.approx(full.leverage[0], rel=1e-10)
    assert dffit[0] == pytest.approx(full.dffit[0], rel=1e-8)
    # a block of rows (a "frame") dropped at once: D = Δβ' X'X Δβ / (p s²)
    frame = np.repeat(np.arange(10), 4)
    got, deleted = frame_cooks(x, y - full.fitted, frame, full, np.arange(10))
    s2 = np.sum((y - full.fitted) ** 2) / (40 - p)
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    for f in range(10):
        m = frame != f
        db = beta - np.linalg.lstsq(x[m], y[m], rcond=None)[0]
        assert got[f] == pytest.approx(db @ x.T @ x @ db / (p * s2), rel=1e-8)
        beta_f = np.linalg.lstsq(x[m], y[m], rcond=None)[0]
        np.testing.assert_allclose(deleted[~m], y[~m] - x[~m] @ beta_f, rtol=1e-8)


@pytest.mark.parametrize("block_rows", [1 << 16, 7])
def test_frame_cooks_of_frame_major_rows_in_a_row_store(u_rng, monkeypatch, block_rows):
    """frame_cooks of frame-major rows (some frames not asked for, rows in a RowStore, as at scale; read in blocks
    of frames and solved as stacks of equal row counts) gives what it gives for the same rows shuffled in memory
    (frame by frame)."""
    from mlipops.quality import outliers
    from mlipops.quality.outliers import RowStore

    monkeypatch.setattr(outliers, "_COOKS_BLOCK_ROWS", block_rows)
    frame = np.repeat(np.arange(30), u_rng.integers(1, 9, 30))
    x = np.column_stack([np.ones(len(frame)), u_rng.standard_normal((len(frame), 4))])
    y = x @ np.array([0.5, 1.0, -2.0, 0.3, 0.0]) + 0.1 * u_rng.standard_normal(len(frame))
    fit = ols_influence(y, x)
    res = y - fit.fitted
    asked = np.array([0, 1, 2, 5, 6, 11, 12, 13, 20, 29])
    shuffled = np.argsort(u_rng.random(len(frame)))  # rows not frame-major: the frame-by-frame path
    ref, ref_del = frame_cooks(x[shuffled], res[shuffled], frame[shuffled], fit, asked)
    store = RowStore(x.shape[1], None)
    store.append(x)
    for xx in (x, store):
        got, got_del = frame_cooks(xx, res, frame, fit, asked)
        np.testing.assert_allclose(got, ref, rtol=1e-10)
        np.testing.assert_allclose(got_del[shuffled], ref_del, rtol=1e-10)
        assert np.array_equal(got_del[~np.isin(frame, asked)], res[~np.isin(frame, asked)])


def test_theil_sen_slope_is_scipys(u_rng):
    from scipy.stats import theilslopes

    from mlipops.quality.outliers import theil_sen_slope

    for n in (3, 4, 57, 400):
        x = np.round(u_rng.random(n) * 5, 1)  # ties in x: those pairs have no slope
        y = 0.3 * x + u_rng.standard_normal(n)
        assert theil_sen_slope(y, x) == theilslopes(y, x).slope


def test_residual_level_follows_the_force_scale(u_rng):
    """Hot frames have proportionally larger residuals: the level a + b P is recovered robustly."""
    big_p = np.geomspace(0.1, 10.0, 60)
    big_r = (0.02 + 0.03 * big_p) * np.exp(0.1 * u_rng.standard_normal(60))
    big_r[[5, 40]] *= 50  # two bad frames do not move the robust line
    level, coef = residual_level(big_r, big_p, np.array(["g"] * 60, dtype=object), np.ones(60, bool))
    a, b, _ = coef[0]
    assert a == pytest.approx(0.02, rel=0.3) and b == pytest.approx(0.03, rel=0.15)
    z = tail_z(big_r / level, np.array(["g"] * 60, dtype=object), np.ones(60, bool))
    assert set(np.flatnonzero(z > 5)) == {5, 40}
    assert np.abs(np.delete(z, [5, 40])).max() < 4


def test_force_frame_stats_on_a_flipped_and_a_displaced_frame(u_rng):
    """χ² per component ≈ 1 for clean frames whatever their force scale, ≈ 4 P / level for flipped
    forces; the per-atom statistic points at the one atom whose force is off."""
    n_frames, n_atoms = 30, 8
    scale = np.repeat(np.geomspace(0.3, 3.0, n_frames), 3 * n_atoms)  # cold to hot frames
    pred = scale * u_rng.standard_normal(n_frames * n_atoms * 3)
    res = 0.15 * pred + 0.05 * u_rng.standard_normal(len(pred))  # residual grows with the force scale
    frame = np.repeat(np.arange(n_frames), 3 * n_atoms)
    atom = np.tile(np.repeat(np.arange(n_atoms), 3), n_frames)
    res[frame == 3] = -2 * pred[frame == 3] + res[frame == 3]  # label = -prediction: flipped
    res[(frame == 7) & (atom == 5)] += 3.0  # one atom's force off by 3 eV/Å (stale after a move)
    groups = np.array(["bulk"] * n_frames, dtype=object)
    st = force_frame_stats(res, pred, frame, atom, groups, np.ones(n_frames, bool))
    zf = tail_z(st.force_chi2.to_numpy(), groups, np.ones(n_frames, bool))
    za = tail_z(st.atom_chi2.to_numpy(), groups, np.ones(n_frames, bool))
    assert zf[3] > 5 and np.delete(zf, [3, 7]).max() < 4  # (one bad atom in 8 raises frame 7's χ² too)
    assert st.force_rel[3] > 3 and st.force_rel.drop([3, 7]).max() < 0.1
    assert np.argmax(za) == 7 and za[7] > 5 and int(st.atom_chi2_atom[7]) == 5
    assert np.delete(za, [3, 7]).max() < 4


def test_swapped_forces_and_a_displaced_atom_are_found_by_the_frame_tests(u_frames):
    """With the per-component rule off, the frame tests alone find another frame's forces and a
    moved atom with stale labels; the hot (rare but correct) frames stay."""
    frames = _copy(u_frames)
    e, _, s = labels(frames[30])
    set_labels(frames[30], e, labels(frames[33])[1].copy(), s)  # forces of another frame (same size)
    a = frames[40]
    e, f, s = labels(a)
    a.positions[6] += [0.3, 0.0, 0.1]  # moved, not relabelled
    a.info["frame_id"] = frame_id(a)
    set_labels(a, e, f, s)
    rep = detect(frames, ["Cu"], SETTINGS, OutlierParams(force_residual_threshold=1e9))
    df = rep.frames
    assert set(np.flatnonzero(df["quarantine"])) == {30, 40}, df.loc[df.quarantine, "reason"].tolist()
    assert df.loc[30, "frame_flag"] and "forces of the whole frame" in df.loc[30, "reason"]
    assert df.loc[40, "atom_flag"] and int(df.loc[40, "atom_chi2_atom"]) == 6
    assert "concentrated on atom 6" in df.loc[40, "reason"]
    assert not df.loc[df.config_type == "hot", "quarantine"].any()


def test_clean_data_passes_the_frame_tests_with_margin(u_frames):
    df = detect(_copy(u_frames), ["Cu"], SETTINGS).frames
    assert df["force_chi2_z"].max() < 4 and df["atom_chi2_z"].max() < 3.5
    assert not (df["frame_flag"] | df["atom_flag"]).any()


def test_gross_error_does_not_mask_a_small_one(u_frames):
    """A kcal/mol energy drags a least-squares fit and hides a 0.05 eV/atom error next to it; the
    robust start leaves it out of the first fit, and both are quarantined with Cook's D."""
    frames = _copy(u_frames)
    e, f, s = labels(frames[12])
    set_labels(frames[12], e * 23.0605 + 23.0605 * 4 * len(frames[12]), f, s)  # kcal/mol, off the window
    e, f, s = labels(frames[50])
    set_labels(frames[50], e + 0.05 * len(frames[50]), f, s)
    assert gross_errors(*_energy_rows(frames), np.array([a.info["config_type"] for a in frames]), 200.0)[12]
    df = detect(frames, ["Cu"], SETTINGS).frames
    assert set(np.flatnonzero(df["quarantine"])) == {12, 50}
    assert df.loc[12, "flag_round"] == 0 and "Cook's D" in df.loc[12, "reason"]
    assert df.loc[50, "energy_residual"] == pytest.approx(0.05, abs=0.01)


def _energy_rows(frames):
    from mlipops.quality.outliers import design

    d = design(frames, ["Cu"], SETTINGS, forces=False)
    return d["y_energy"], d["x_energy"]


def test_cli_check_gives_a_verdict_per_frame_and_writes_nothing(u_frames, tmp_path):
    import shutil
    import subprocess
    import sys

    from mlipops.frames import write_extxyz

    train = _copy(u_frames)
    for a in train:
        a.info["split"] = "train"
    (tmp_path / "data/curated").mkdir(parents=True)
    write_extxyz(tmp_path / "data/curated/accepted.extxyz", train)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    new = _copy(u_frames[:3])
    e, f, s = labels(new[1])
    set_labels(new[1], e + 0.2 * len(new[1]), f, s)  # a wrong energy
    e, f, s = labels(new[2])
    f = f.copy()
    f[0] += [0.5, 0.0, 0.0]  # breaks Σ F = 0
    set_labels(new[2], e, f, s)
    write_extxyz(tmp_path / "new.extxyz", new)
    (tmp_path / "broken.extxyz").write_text("3\nnot a frame\nCu 0 0 0\n")
    before = sorted(p.name for p in (tmp_path / "data/curated").iterdir())
    res = subprocess.run([sys.executable, "-c", "from mlipops.cli import main; main()", "check", "new.extxyz",
                          "broken.extxyz", "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    import json

    rows = {(r["file"], r["frame"]): r for r in json.loads(res.stdout)}
    assert rows[("new.extxyz", 0)]["verdict"] == "accepted"
    assert rows[("new.extxyz", 1)]["verdict"] == "would be quarantined"
    assert rows[("new.extxyz", 1)]["checks"] == "influential_outlier"
    assert "net_force" in rows[("new.extxyz", 2)]["checks"]
    assert rows[("broken.extxyz", 0)]["verdict"] == "unreadable"
    assert "4 frames: " in res.stderr
    assert sorted(p.name for p in (tmp_path / "data/curated").iterdir()) == before
    assert not (tmp_path / "reports").exists()


def test_last_round_flagging_frames_does_not_break_the_recheck(u_frames):
    """With max_rounds = 1 the only round flags frames after its force fit: the recheck refits the forces on the
    frames actually kept (it used to index the old fit's residuals with the new mask: IndexError)."""
    frames = _copy(u_frames)
    e, f, s = labels(frames[10])
    set_labels(frames[10], e, -f, s)  # sign-flipped forces, flagged in round 1
    rep = detect(frames, ["Cu"], SETTINGS, OutlierParams(max_rounds=1))
    assert rep.rounds == 1 and bool(rep.frames.loc[10, "quarantine"])
    assert rep.forces.n < sum(len(a) * 3 for a in frames)  # the final force fit leaves the flagged frame out


def test_symmetric_zero_forces_do_not_collapse_the_residual_scale():
    """Mostly unrattled strained crystals (forces zero by symmetry) and a few rattled ones: the zero rows
    must not set the robust scale to zero (every real force would then be 'infinitely' off)."""
    rng = np.random.default_rng(5)
    frames = []
    for k in range(40):
        a = bulk("Cu", "fcc", a=3.61 * (1 + rng.uniform(-0.03, 0.03)), cubic=True).repeat(2)
        if k % 5 == 0:
            a.positions += rng.normal(0, 0.03, a.positions.shape)
        a.info["config_type"] = "crystal_fcc"
        frames.append(a)
    frames = get_oracle("emt").label(frames)
    for a in frames:
        a.info["frame_id"] = frame_id(a)
    df = detect(frames, ["Cu"], SETTINGS).frames
    # (the energy surrogate fits the 32 perfect frames exactly and judges the rattled ones by that: a separate
    # limit of the energy test, not this one)
    forces = df["force_flag"] | df["frame_flag"] | df["atom_flag"]
    assert not forces.any(), df.loc[forces, "reason"].tolist()


def test_growing_fit_equals_a_refit_on_the_same_rows(u_rng):
    """The energy releases of the recheck grow the fit by QR row updates: the same coefficients, fitted values,
    (X'X)⁻¹ and rmse as a least-squares refit over the rows in the same order."""
    from mlipops.quality.outliers import _GrowingFit, _ols_fit

    x = np.column_stack([np.ones(400), u_rng.standard_normal((400, 6)) * [1, 10, 0.1, 3, 1, 100]])
    y = x @ u_rng.standard_normal(7) + 0.01 * u_rng.standard_normal(400)
    rows = list(range(300))
    grow = _GrowingFit(x, y, rows)
    for k in (350, 301, 399, 320):
        grow.add(k)
        rows.append(k)
        got, ref = grow.surrogate(), _ols_fit(y[rows], x[rows])
        assert got.n == ref.n == len(rows) and got.p == ref.p == 7
        np.testing.assert_allclose(got.beta, ref.beta, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got.fitted, ref.fitted, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got.xtx_inv, ref.xtx_inv, rtol=1e-8, atol=1e-16)
        assert abs(got.rmse - ref.rmse) <= 1e-9 * ref.rmse
        np.testing.assert_allclose(got.predict(x[360:370])[0], ref.predict(x[360:370])[0], rtol=1e-9)
