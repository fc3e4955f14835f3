"""Born–Oppenheimer-aware sampling: the PySCF oracle, the adaptive gap scan, the breakdown region and
its quarantine through the real ingest → validate → index stages.

The PySCF tests are skipped when PySCF (the ``qc`` extra) is not installed. References are computed
with PySCF's own FCI module directly, never through the oracle under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.units import Hartree

from mlipops.errors import OracleError, ParamsError
from mlipops.generate.bo_aware import (adaptive_gap_scan, bo_scan, diatomic_path, find_regions, images_path,
                                       training_points, uniform_calls)
from mlipops.params import BoScanParams, load_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def qc():
    return pytest.importorskip("pyscf", reason="PySCF (the qc extra, pip install -e '.[qc]') is not installed")


def h2(d: float, x: float = 0.0, y: float = 0.0) -> Atoms:
    return Atoms("H2", positions=[[0.0, 0.0, 0.0], [x, y, d]], pbc=False)


def fci_states(d: float, basis: str = "sto-3g", nroots: int = 2) -> np.ndarray:
    """Lowest ``nroots`` FCI energies (eV) of H2 at bond length d (Å) with every M_s = 0 state (PySCF's
    spin-free direct_spin1 FCI on an RHF reference): the independent reference."""
    from pyscf import fci, gto, lib, scf

    lib.num_threads(1)
    mol = gto.M(atom=f"H 0 0 0; H 0 0 {d}", basis=basis, unit="Angstrom", verbose=0)
    mf = scf.RHF(mol)
    mf.conv_tol = 1e-12
    mf.kernel()
    solver = fci.FCI(mf, singlet=False)  # direct_spin1: every M_s = 0 state, triplets included
    solver.nroots = nroots
    solver.conv_tol = 1e-12
    e, _ = solver.kernel()
    return np.asarray(e) * Hartree


# --------------------------------------------------------------------------------------- oracle
def test_forces_match_finite_differences(qc):
    """Analytic SA-CASSCF root-0 forces against central differences of the root-0 energy, off-axis
    H2 in STO-3G and in 6-31G (where the state-averaged orbitals really relax)."""
    from mlipops.oracles import get_oracle

    for basis in ("sto-3g", "6-31g"):
        calc = get_oracle("pyscf", {"basis": basis}).calculator()
        a = h2(1.2, 0.1, 0.05)
        a.calc = calc
        forces = a.get_forces().copy()
        assert np.abs(forces).max() > 0.3  # a real, non-zero test
        np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-6)  # translation invariance

        def energy(pos):
            b = a.copy()
            b.positions = pos
            b.calc = calc
            return b.get_potential_energy()

        h = 1e-3
        fd = np.zeros(3)
        for j in range(3):
            plus, minus = a.positions.copy(), a.positions.copy()
            plus[1, j] += h
            minus[1, j] -= h
            fd[j] = -(energy(plus) - energy(minus)) / (2 * h)
        np.testing.assert_allclose(forces[1], fd, atol=1e-4, err_msg=basis)


def test_energies_equal_fci_in_minimal_basis(qc):
    """In STO-3G H2 has two spatial orbitals, so CAS(2,2) is full CI: SA-CASSCF roots == FCI roots."""
    from mlipops.oracles import get_oracle

    oracle = get_oracle("pyscf", {})
    ds = [0.6, 0.74, 1.3, 2.2, 3.5]
    frames = oracle.label([h2(d) for d in ds])
    for d, a in zip(ds, frames):
        ref = fci_states(d)
        assert a.get_potential_energy() == pytest.approx(ref[0], abs=1e-6)
        assert a.info["excited_energies"][0] == pytest.approx(ref[1], abs=1e-6)
        assert a.info["bo_gap"] == pytest.approx(ref[1] - ref[0], abs=1e-6)
        np.testing.assert_allclose(a.info["state_spin_square"], [0.0, 2.0], atol=1e-6)  # singlet, triplet


@pytest.mark.slow
def test_cas22_close_to_fci_in_631g(qc):
    """6-31G: CAS(2,2) misses dynamic correlation; the gap still follows FCI's at long range."""
    from mlipops.oracles import get_oracle

    oracle = get_oracle("pyscf", {"basis": "6-31g"})
    for d, tol in ((0.74, 0.5), (1.5, 0.1), (2.5, 0.01), (4.0, 1e-4)):
        (a,) = oracle.label([h2(d)])
        ref = fci_states(d, "6-31g")
        assert a.info["bo_gap"] == pytest.approx(ref[1] - ref[0], abs=tol)
        assert a.get_potential_energy() == pytest.approx(ref[0], abs=tol)


def test_same_spin_excludes_the_triplet(qc):
    """states: same_spin keeps only singlets; in a minimal basis H2's singlet excited state goes to
    the ionic limit and stays far above (the reason same_ms is the H2 default)."""
    from mlipops.oracles import get_oracle

    (a,) = get_oracle("pyscf", {"states": "same_spin"}).label([h2(4.0)])
    np.testing.assert_allclose(a.info["state_spin_square"], [0.0, 0.0], atol=1e-6)
    assert a.info["bo_gap"] > 5.0
    (b,) = get_oracle("pyscf", {"states": "same_ms"}).label([h2(4.0)])
    assert b.info["bo_gap"] < 1e-2


def test_provenance_and_round_trip(qc, tmp_path):
    from mlipops.frames import read_extxyz, write_extxyz
    from mlipops.oracles import get_oracle

    (a,) = get_oracle("pyscf", {"basis": "sto-3g", "n_states": 3}).label([h2(1.0)])
    assert a.info["oracle_name"] == "pyscf"
    assert a.info["oracle_version"].startswith("pyscf-2.")
    settings = json.loads(a.info["oracle_settings"])
    assert settings["method"] == "casscf" and settings["basis"] == "sto-3g"
    assert settings["active_space"] == [2, 2] and settings["n_states"] == 3 and settings["states"] == "same_ms"
    assert len(a.info["excited_energies"]) == 2 and len(a.info["state_spin_square"]) == 3
    write_extxyz(tmp_path / "x.extxyz", [a, get_oracle("pyscf", {}).label([h2(2.0)])[0]])
    back, bad = read_extxyz(tmp_path / "x.extxyz")
    assert not bad
    for orig, b in zip([a], back):
        assert b.info["bo_gap"] == pytest.approx(orig.info["bo_gap"], rel=1e-12)
        np.testing.assert_allclose(b.info["excited_energies"], orig.info["excited_energies"])
        assert json.loads(b.info["oracle_settings"]) == settings
    assert back[1].info["excited_energies"].shape == (1,)  # a one-state array stays an array


def test_periodic_and_bad_settings_refused(qc):
    from mlipops.oracles import get_oracle

    periodic = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], cell=[5, 5, 5], pbc=True)
    with pytest.raises(OracleError, match="periodic") as err:
        get_oracle("pyscf", {}).label([periodic])
    assert err.value.field == "pbc" and err.value.frame == 0
    with pytest.raises(OracleError, match="unknown PySCF oracle setting") as err:
        get_oracle("pyscf", {"basiss": "sto-3g"})
    assert err.value.field == "oracle.kwargs.basiss"
    with pytest.raises(OracleError, match="states"):
        get_oracle("pyscf", {"states": "singlets"})
    with pytest.raises(OracleError, match="n_states"):
        get_oracle("pyscf", {"n_states": 1})


# -------------------------------------------------------------------------------- scan, sampling
@pytest.fixture(scope="module")
def h2_scan(qc):
    """The default H2 scan, with every real PySCF calculation counted (bond length recorded)."""
    from mlipops.oracles import pyscf as qcmod

    seen: list[float] = []
    original = qcmod.PySCF.calculate

    def counting(self, atoms=None, properties=("energy",), system_changes=None):
        seen.append(float(np.linalg.norm(atoms.positions[1] - atoms.positions[0])))
        return original(self, atoms, properties, system_changes or qcmod.all_changes)

    qcmod.PySCF.calculate = counting
    try:
        p = BoScanParams()
        res = bo_scan(p)
    finally:
        qcmod.PySCF.calculate = original
    return {"p": p, "res": res, "calls": seen}


def test_gap_shrinks_monotonically_at_long_range(h2_scan):
    sc = h2_scan["res"].scan
    far = sc.s >= 1.5
    assert far.sum() >= 8
    g = sc.gap[far]
    assert np.all(np.diff(g[g > 1e-6]) < 0)  # strictly down while the gap is resolved
    assert np.all(np.diff(g) < 1e-7)          # and never up beyond numerical noise
    assert g[-1] < 1e-3 and sc.gap_at(0.74) > 10.0  # ~0 at dissociation, > 10 eV at equilibrium


def test_region_starts_at_the_fci_crossing(h2_scan):
    """The region found by the adaptive scan against an independent uniform FCI grid (step 0.005 Å)."""
    p, sc = h2_scan["p"], h2_scan["res"].scan
    eps = p.epsilon
    assert eps == pytest.approx(10 * 8.617333e-5 * 1000, rel=1e-5)
    grid = np.arange(1.5, 2.5 + 1e-9, 0.005)
    gap = np.array([np.diff(fci_states(d))[0] for d in grid])
    k = int(np.flatnonzero(gap < eps)[0])
    s_fci = grid[k - 1] + (eps - gap[k - 1]) * (grid[k] - grid[k - 1]) / (gap[k] - gap[k - 1])
    assert len(sc.regions) == 1
    r = sc.regions[0]
    assert r.end == pytest.approx(p.path.range[1] if p.path.range else 6.0)
    assert abs(r.start - s_fci) <= p.resolution
    assert r.start >= s_fci - 1e-6  # the first point below ε lies beyond the crossing
    assert r.bracket_start <= p.resolution
    assert abs(r.crossing_start - s_fci) <= p.resolution


def test_adaptive_scan_uses_fewer_calls_than_a_uniform_grid(h2_scan):
    p, res, calls = h2_scan["p"], h2_scan["res"], h2_scan["calls"]
    n_uniform = math.ceil((6.0 - 0.5) / p.resolution) + 1
    assert res.scan.n_calls_uniform == n_uniform == 551
    # every real PySCF calculation, scan and sampled frames together, counted outside the sampler
    assert len(calls) == res.n_oracle_calls
    assert len(set(np.round(calls, 9))) == len(calls)  # cached: no bond length computed twice
    assert res.scan.n_calls <= len(calls) < n_uniform / 5


def test_training_frames_stop_before_the_region(h2_scan):
    p, res = h2_scan["p"], h2_scan["res"]
    eps, r = p.epsilon, res.scan.regions[0]
    s_train = np.array(sorted(a.info["path_coordinate"] for a in res.train))
    assert len(res.train) >= 5 and len(res.breakdown) == p.breakdown_frames
    assert s_train.max() <= r.start - p.margin + 1e-9
    assert s_train.max() == pytest.approx(r.start - p.margin)  # sampled right up to the margin
    assert all(a.info["bo_gap"] > eps and not a.info["bo_breakdown"] for a in res.train)
    assert all(a.info["bo_breakdown"] and r.start <= a.info["path_coordinate"] <= r.end for a in res.breakdown)
    spacing = np.diff(s_train)
    assert spacing[-1] < spacing[0] and np.all(np.diff(spacing) <= 1e-9)  # denser as the gap closes
    assert all(a.info["bo_epsilon"] == pytest.approx(eps) for a in res.frames)


def test_scan_logic_finds_interior_and_multiple_regions():
    """Synthetic gaps (no oracle): an avoided crossing in the middle of the path is an interval; two
    dips give two regions; a region at the start works too; training frames avoid all of them."""
    calls = []

    def gap(s):
        calls.append(s)
        return 0.1 + 4.0 * (1 - np.exp(-((s - 2.0) / 0.3) ** 2)) * (1 - np.exp(-((s - 4.0) / 0.2) ** 2))

    sc = adaptive_gap_scan(gap, 0.5, 6.0, 1.0, coarse_points=23, resolution=0.01, gap_tolerance=0.1)
    assert sc.n_calls == len(calls) == len(set(calls)) and sc.n_calls < uniform_calls(0.5, 6.0, 0.01)
    assert len(sc.regions) == 2
    for r, centre in zip(sc.regions, (2.0, 4.0)):
        assert r.start < centre < r.end and r.bracket_start <= 0.01 and r.bracket_end <= 0.01
        assert gap(r.start) < 1.0 <= gap(r.start - r.bracket_start)
        assert gap(r.end) < 1.0 <= gap(r.end + r.bracket_end)
    p = BoScanParams(resolution=0.01, margin=0.05)
    pts = training_points(sc, 0.5, 6.0, p)
    for r in sc.regions:
        assert not any(r.start - p.margin + 1e-9 < s < r.end + p.margin - 1e-9 for s in pts)
    assert any(2.0 < s < 4.0 for s in pts)  # the safe interval between the two regions is sampled
    s = np.linspace(0, 1, 5)
    (r,) = find_regions(s, np.array([0.1, 0.5, 2.0, 3.0, 4.0]), 1.0)
    assert r.start == 0.0 and r.crossing_start is None and r.end == 0.25


def test_images_path_interpolates(tmp_path):
    import ase.io

    imgs = [h2(0.7), h2(1.7), h2(3.7)]
    ase.io.write(tmp_path / "path.extxyz", imgs, format="extxyz")
    path = images_path(tmp_path / "path.extxyz")
    assert path.s_min == 0.0 and path.s_max == pytest.approx(3.0)
    assert path(0.5).get_distance(0, 1) == pytest.approx(1.2)
    assert path(2.0).get_distance(0, 1) == pytest.approx(2.7)
    assert diatomic_path(["H", "H"])(1.3).get_distance(0, 1) == pytest.approx(1.3)


def test_bo_scan_params_are_validated(tmp_path):
    with pytest.raises(ValueError, match="margin"):
        BoScanParams(margin=0.001, resolution=0.01)
    with pytest.raises(ValueError, match="file"):
        BoScanParams(path={"kind": "images"})
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["bo_scan"]["path"]["elements"] = ["H", "Xx"]
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="bo_scan.path.elements"):
        load_params(bad)
    assert BoScanParams(epsilon_eV=0.5).epsilon == 0.5
    assert load_params(REPO / "params.yaml").validate_.bo_gap_min_eV == pytest.approx(BoScanParams().epsilon,
                                                                                      abs=1e-4)


# -------------------------------------------------------------------------- through the stages
def _molecular_params(tmp: Path, raw: str) -> Path:
    """The project's params.yaml turned into a small molecular H2 project ingesting ``raw``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"] = {"sources": [{"path": raw}],
                        "split": {"method": "random", "val_fraction": 0.2, "test_fraction": 0.2, "seed": 0}}
    v = params["validate"]
    v.update(allowed_species=["H"], min_interatomic_distance=0.3, expected_test_config_types=[])
    v["outliers"]["enabled"] = False
    v["energy_per_atom_range"] = {"default": [-20.0, 5.0]}
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_breakdown_frames_quarantined_through_ingest_validate_index(h2_scan, tmp_path, monkeypatch):
    import pandas as pd

    from mlipops import ingest, quality
    from mlipops.frames import read_extxyz, write_extxyz
    from mlipops.index.build import query
    from mlipops.index.build import run as index_run

    monkeypatch.chdir(tmp_path)
    res = h2_scan["res"]
    write_extxyz(tmp_path / "data/raw/bo_scan_h2.extxyz", res.frames)
    p = load_params(_molecular_params(tmp_path, "data/raw/bo_scan_h2.extxyz"))
    m_in = ingest.run(p.ingest)
    m_val = quality.run(p.validate_, p.descriptors)
    index_run(p.index, p.descriptors)

    q = pd.read_parquet("data/curated/quarantine.parquet")
    accepted, _ = read_extxyz("data/curated/accepted.extxyz")
    assert m_val["n_accepted"] + m_val["n_quarantined"] == m_in["n_read"] == len(res.frames)
    assert len(accepted) + len(q) == len(res.frames)
    n_brk = len(res.breakdown)
    brk = q[q["check"].str.contains("bo_breakdown")]
    assert len(brk) == n_brk and m_val["n_quarantined.bo_breakdown"] == n_brk
    flagged_idx = {a.info["source_index"] for a in read_extxyz("data/ingested/frames.extxyz")[0]
                   if a.info.get("bo_breakdown")}
    assert set(brk["source_index"]) == flagged_idx and len(flagged_idx) == n_brk
    assert all("ε_BO" in r or "ε" in r for r in brk["reason"])
    assert not any(a.info.get("bo_breakdown") for a in accepted)
    assert all(a.info["bo_gap"] >= p.validate_.bo_gap_min_eV for a in accepted)
    assert len(accepted) == len(res.train)  # the training frames all pass

    frames = query("SELECT split, status, bo_gap, quarantine_check FROM frames", Path("data/index.duckdb"))
    assert frames["bo_gap"].notna().all()
    in_train = query("SELECT min(bo_gap) AS g, count(*) AS n FROM frames WHERE split = 'train' AND status = "
                     "'accepted'", Path("data/index.duckdb"))
    assert in_train.loc[0, "n"] > 0 and in_train.loc[0, "g"] >= p.bo_scan.epsilon
    by_source = query("SELECT source, count(*) AS n, min(bo_gap) AS g FROM frames GROUP BY source",
                      Path("data/index.duckdb"))
    assert by_source.loc[0, "n"] == len(res.frames) and by_source.loc[0, "g"] < p.bo_scan.epsilon
    quarantined = frames[frames.status == "quarantined"]
    assert (quarantined["bo_gap"] < p.bo_scan.epsilon).all()
    assert quarantined["quarantine_check"].str.contains("bo_breakdown").all()


def test_gap_below_threshold_quarantined_without_flag():
    """Any frame with a gap, from any oracle: no flag needed, the gap alone decides; frames without a
    gap are untouched; a frame's own bo_epsilon wins where it is stricter."""
    from mlipops.oracles import get_oracle
    from mlipops.params import ValidateParams
    from mlipops.quality.validate import decide

    frames = get_oracle("emt").label([Atoms("Cu2", positions=[[0, 0, 0], [0, 0, d]]) for d in (2.2, 2.3, 2.4, 2.5)])
    frames[1].info["bo_gap"] = 0.2                                  # below the floor
    frames[2].info.update(bo_gap=1.5, bo_epsilon=2.0)               # above the floor, below its own ε
    frames[3].info["bo_gap"] = 3.0                                  # fine
    for k, a in enumerate(frames):
        a.info.update(frame_id=f"{k:064d}", source="unit", source_index=k, config_type="dimer", split="test")
    d = decide(frames, ValidateParams(allowed_species=["Cu"], min_interatomic_distance=1.0))
    checks = {k: [c for c, _ in v] for k, v in d.failures.items()}
    assert checks == {1: ["bo_breakdown"], 2: ["bo_breakdown"]}
    assert "0.2 eV below ε_BO = 0.8617 eV" in d.failures[1][0][1] and "unit frame 1" in d.failures[1][0][1]
    assert "ε_BO = 2 eV" in d.failures[2][0][1]


# ------------------------------------------------------------------------------------------- CLI
def test_cli_bo_scan_and_generate_group(qc, tmp_path):
    import subprocess
    import sys

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["bo_scan"].update(name="h2cli", coarse_points=6, resolution=0.05, margin=0.1, breakdown_frames=2)
    params["bo_scan"]["path"]["range"] = [1.0, 4.0]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, "-m", "mlipops.cli", "generate", "bo-scan", "--params", "p.yaml"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for f in ("data/raw/bo_scan_h2cli.extxyz", "reports/generate/bo_scan/gap.png",
              "reports/generate/bo_scan/summary.md", "reports/generate/bo_scan/metrics.json"):
        assert (tmp_path / f).is_file(), f
    m = json.loads((tmp_path / "reports/generate/bo_scan/metrics.json").read_text())
    assert m["n_calls_uniform"] == 61 and m["n_oracle_calls"] < 61 and m["n_breakdown"] == 2
    assert 1.85 < m["region_start"] < 2.0
    # the group still runs the default generate without a subcommand; bad params: one line, exit 2
    r = subprocess.run([sys.executable, "-m", "mlipops.cli", "generate", "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "bo-scan" in r.stdout and "--params" in r.stdout
    params["bo_scan"]["margin"] = 0.001
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = subprocess.run([sys.executable, "-m", "mlipops.cli", "generate", "--params", "bad.yaml", "bo-scan"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "bad.yaml" in r.stderr and "margin" in r.stderr and "Traceback" not in r.stderr
