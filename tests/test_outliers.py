"""Cook's-distance outliers: the statistics against closed forms, and the decisions on injected errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk

from mlipops.frames import frame_id, labels, set_labels
from mlipops.oracles import get_oracle
from mlipops.params import DescriptorParams
from mlipops.quality.outliers import detect, ols_influence, robust_t

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
