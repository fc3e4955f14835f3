"""Issue 30, items 8 and 9: `check` decides as `validate` does, and large inputs stream.

- item 8: ``mlipops check FILES`` gives every frame the decision ``ingest`` + ``validate`` make for it (its
  split by ingest's rule, the suite, the outlier test on the training split only, the same rule for a kind
  the training data lacks), in an empty project and in the project that ingested the files;
- item 9: the extxyz reader streams (a file without line breaks, ``/dev/zero``, is one line of error in
  bounded memory), ingest holds one frame at a time and prints progress lines, and the scale paths of the
  outlier test (analytic descriptor gradient, chunked least squares, design rows on disk) give the
  in-memory path's numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from test_bad_input import QUARANTINE_FILES, error_line, make_project, mlipops

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ item 8
def _split_frames(tmp: Path):
    """~60 EMT Cu frames (crystals of several kinds, a held-out config_type), energies shifted to the corpus'
    DFT-like scale (-3.6 eV/atom: a reference energy, invisible to forces), three with a wrong energy: one that
    ingest puts in the training split, one in val, one in test."""
    from ase.build import bulk

    from mlipops.frames import canonicalize, labels, read_extxyz, set_labels, write_extxyz
    from mlipops.ingest import assign_splits
    from mlipops.oracles import get_oracle
    from mlipops.params import load_params

    rng = np.random.default_rng(30)
    made = []
    for kind, n in (("crystal_fcc", 24), ("crystal_bcc", 16), ("crystal_hcp", 12), ("vacancy", 6)):
        for _ in range(n):
            if kind == "crystal_bcc":
                a = bulk("Cu", "bcc", a=2.87, cubic=True).repeat((2, 2, 2))
            elif kind == "crystal_hcp":
                a = bulk("Cu", "hcp", a=2.55, c=4.16).repeat((2, 2, 2))
            else:
                a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
                if kind == "vacancy":
                    del a[0]
            a.set_cell(a.cell.array * (1 + rng.uniform(-0.02, 0.02)), scale_atoms=True)
            a.positions += rng.normal(0, 0.05, a.positions.shape)
            a.info["config_type"] = kind
            made.append(a)
    frames = get_oracle("emt").label(made)
    for a in frames:
        e, f, s = labels(a)
        set_labels(a, e - 3.6 * len(a), f, s)
    # as written and read back (positions to 1e-8 Å): the frame_ids, hence the splits, ingest will see
    write_extxyz(tmp / "splits.extxyz", frames)
    frames, _ = read_extxyz(tmp / "splits.extxyz")
    canon = [canonicalize(a, source="splits", source_index=k) for k, a in enumerate(frames)]
    assign_splits(canon, load_params(REPO / "params.yaml").ingest.split)
    split = [a.info["split"] for a in canon]
    wrong = {s: next(k for k, (a, t) in enumerate(zip(canon, split)) if t == s and a.info["config_type"] != "vacancy"
                     or t == s == "test") for s in ("train", "val", "test")}
    for k in wrong.values():
        e, f, s = labels(frames[k])
        set_labels(frames[k], e + 0.5 * len(frames[k]), f, s)  # 0.5 eV/atom off
    return frames, wrong, split


def _decisions_from_validate(root: Path) -> dict:
    """{(source, index): (quarantined, checks)} of every frame read, from the quarantine and the ingested file."""
    from mlipops.frames import read_extxyz

    q = pd.read_parquet(root / "data/curated/quarantine.parquet")
    out = {(r.source, int(r.source_index)): (True, frozenset(r.check.split(","))) for r in q.itertuples()}
    for a in read_extxyz(root / "data/curated/accepted.extxyz")[0]:
        out[(a.info["source"], int(a.info["source_index"]))] = (False, frozenset())
    return out


def _decisions_from_check(stdout: str) -> dict:
    rows = json.loads(stdout)
    return {(Path(r["file"]).stem, int(r["frame"])): (r["verdict"] != "accepted",
                                                       frozenset((r["checks"] or "").split(",")) - {""})
            for r in rows}


def test_check_decides_as_validate(tmp_path):
    """Old behaviour: check judged every readable frame as a training frame for the outlier test (and, with no
    training data, ran no outlier test): it disagreed with validate on frames of the val and test splits and
    on the training frames validate quarantines as outliers."""
    from mlipops.frames import write_extxyz

    frames, wrong, split = _split_frames(tmp_path)
    files = QUARANTINE_FILES + ["all_bad.extxyz", "splits.extxyz"]
    roots = {}
    for name in ("validated", "empty"):
        root = make_project(tmp_path / name, QUARANTINE_FILES + ["all_bad.extxyz"]
                            + [{"path": "raw/splits.extxyz"}])
        write_extxyz(root / "raw" / "splits.extxyz", frames)
        roots[name] = root
    args = ["check", *[f"raw/{f}" for f in files], "--json"]
    with ThreadPoolExecutor(2) as pool:
        empty = pool.submit(mlipops, roots["empty"], *args)  # no data at all: check = ingest + validate of FILES
        a = roots["validated"]
        for stage in ("ingest", "validate"):
            r = mlipops(a, stage)
            assert r.returncode == 0, r.stderr
        in_project = mlipops(a, *args)  # the project that ingested the files: the same decisions
        empty = empty.result()
    truth = _decisions_from_validate(a)
    n_read = json.loads((a / "reports/ingest/metrics.json").read_text())["n_read"]
    assert len(truth) == n_read == 63 + len(frames)  # every frame read is accepted or quarantined
    for name, r in (("empty project", empty), ("validated project", in_project)):
        assert r.returncode == 0, r.stderr
        got = _decisions_from_check(r.stdout)
        assert got == truth, (name, {k: (truth.get(k), got.get(k)) for k in set(truth) | set(got)
                                     if truth.get(k) != got.get(k)})
        rows = {(Path(x["file"]).stem, int(x["frame"])): x for x in json.loads(r.stdout)}
        for k, s in enumerate(split):  # ingest's split
            assert rows[("splits", k)]["split"] == s
    # the test covers what used to differ: the wrong training frame is an outlier, the others are not judged
    assert truth[("splits", wrong["train"])] == (True, frozenset({"influential_outlier"}))
    assert truth[("splits", wrong["val"])] == (False, frozenset())
    assert truth[("splits", wrong["test"])] == (False, frozenset())
    assert "examines the 'train' split only" in {
        (Path(x["file"]).stem, int(x["frame"])): x
        for x in json.loads(empty.stdout)}[("splits", wrong["val"])]["reason"]


def test_check_names_a_file_ingest_cannot_read_as_ingest_does(tmp_path):
    """A file that stops ingest (truncated, not UTF-8) is one `unreadable` row in check with ingest's reason."""
    for name in ("truncated.extxyz", "not_utf8.extxyz", "huge_natoms.extxyz"):
        root = make_project(tmp_path / name.split(".")[0], [name])
        r = mlipops(root, "ingest")
        line = error_line(r)
        c = mlipops(root, "check", f"raw/{name}", "--json")
        assert c.returncode == 0, c.stderr
        (row,) = json.loads(c.stdout)
        assert row["verdict"] == "unreadable"
        assert line == f"mlipops: error: {row['reason']}"


# ------------------------------------------------------------------------------------------ item 9
def test_a_file_without_line_breaks_is_one_line_of_error_in_bounded_memory(tmp_path):
    """Old behaviour: the reader read the whole file as text (and split it into lines) before looking at it:
    /dev/zero exhausted memory (MemoryError after 3.5 GB), a 10 MB line cost tens of MB."""
    from mlipops.errors import FrameFormatError
    from mlipops.frames import read_extxyz

    blob = tmp_path / "blob.extxyz"
    blob.write_bytes(b"1" * (10 << 20))  # 10 MB of digits, no newline: a natoms line that never ends
    _tiny_file(tmp_path / "one.extxyz", 1)
    read_extxyz(tmp_path / "one.extxyz")  # the reader's imports, before memory is counted
    for path in (blob, Path("/dev/zero")):
        tracemalloc.start()
        t0 = time.perf_counter()
        with pytest.raises(FrameFormatError) as info:
            read_extxyz(path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert time.perf_counter() - t0 < 60.0  # a hang guard, not a timing: the old reader never ended
        assert peak < 4 << 20, f"{path}: {peak / 2**20:.1f} MB traced"
        assert "line 1: longer than 1 MiB without a line break" in str(info.value)
        assert "\n" not in str(info.value) and len(str(info.value)) < 300
    root = make_project(tmp_path / "proj", [])
    (root / "raw").mkdir(exist_ok=True)
    (root / "raw" / "blob.extxyz").write_bytes(blob.read_bytes())
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"]["sources"] = [{"path": "raw/blob.extxyz"}]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    line = error_line(mlipops(root, "ingest"))
    # a user's source is sniffed first (its first 4 KiB): a "first line" of digits with no line break in
    # 4 KiB is no structure file, said without quoting it
    assert line == ("mlipops: error: raw/blob.extxyz: not a structure file (expected extxyz, an ASE database or "
                    "mlearn JSON): found text that is none of these (content not shown)"), line
    assert not (root / "data" / "ingested" / "frames.extxyz").exists()
    assert not [p for p in (root / "data" / "ingested").iterdir()] if (root / "data" / "ingested").exists() else True


def _tiny_file(path: Path, n: int) -> None:
    """n Cu dimers in a 6 Å box, written as text (fast, no oracle): bond length 2.2-2.8 Å along a random
    direction, labels of a harmonic bond (k = 2 eV/Å², r0 = 2.5 Å; forces sum to zero)."""
    rng = np.random.default_rng(9)
    parts = []
    for k in range(n):
        d = rng.uniform(2.2, 2.8)
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        a = rng.uniform(1.0, 2.0, 3)
        b = a + d * u
        f = -2.0 * (d - 2.5) * u  # force on the second atom
        e = -7.0 + (d - 2.5) ** 2
        parts.append(f"2\nLattice=\"6.0 0.0 0.0 0.0 6.0 0.0 0.0 0.0 6.0\" Properties=species:S:1:pos:R:3:forces:R:3 "
                     f"energy={e:.8f} config_type=dimer pbc=\"T T T\"\n"
                     f"Cu {a[0]:.8f} {a[1]:.8f} {a[2]:.8f} {-f[0]:.8f} {-f[1]:.8f} {-f[2]:.8f}\n"
                     f"Cu {b[0]:.8f} {b[1]:.8f} {b[2]:.8f} {f[0]:.8f} {f[1]:.8f} {f[2]:.8f}\n")
    path.write_text("".join(parts))


def test_ingest_holds_one_frame_at_a_time(tmp_path, monkeypatch):
    """Old behaviour: ingest read every source into a list of frames (~10 KB a frame), then wrote them. Now it
    holds a chunk of frames (``ingest._CHUNK_FRAMES``) at a time."""
    from mlipops import ingest
    from mlipops.params import load_params

    _tiny_file(tmp_path / "many.extxyz", 3000)
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["ingest"]["sources"] = [{"path": "many.extxyz"}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLIPOPS_PROGRESS_INTERVAL_S", "1000")
    params = load_params(tmp_path / "params.yaml")
    warm = tmp_path / "warm"  # a first, tiny run: the modules the stage imports on first use are not the frames
    warm.mkdir()
    _tiny_file(warm / "many.extxyz", 5)
    monkeypatch.chdir(warm)
    ingest.run(params.ingest)
    monkeypatch.chdir(tmp_path)
    tracemalloc.start()
    m = ingest.run(params.ingest)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (m["n_read"], m["n_frames"]) == (3000, 3000)
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MB traced for 3,000 frames"
    text = (tmp_path / "data/ingested/frames.extxyz").read_text()
    assert text.count("split=") == 3000 and "__mlipops_split__" not in text
    assert sorted(p.name for p in (tmp_path / "data/ingested").iterdir()) == ["frames.extxyz", "rejected.parquet"]


def test_validate_read_by_worker_processes_decides_the_same(tmp_path, monkeypatch):
    """Worker processes reading the ingested frames (a large file's path) give the same accepted file,
    quarantine and outlier table, byte for byte, as one process."""
    from mlipops.frames import write_extxyz
    from mlipops.params import load_params
    from mlipops.quality import validate

    frames, wrong, _ = _split_frames(tmp_path)
    root = make_project(tmp_path / "proj", QUARANTINE_FILES + [{"path": "raw/splits.extxyz"}])
    write_extxyz(root / "raw" / "splits.extxyz", frames)
    assert mlipops(root, "ingest").returncode == 0
    monkeypatch.chdir(root)
    monkeypatch.setattr(validate, "_CHUNK_FRAMES", 7)
    monkeypatch.setenv("MLIPOPS_READ_MIN_BYTES", "0")
    monkeypatch.setenv("MLIPOPS_PROGRESS_INTERVAL_S", "1000")
    p = load_params(root / "params.yaml")
    got = {}
    for workers in (1, 2):
        monkeypatch.setenv("MLIPOPS_READ_WORKERS", str(workers))
        m = validate.run(p.validate_, p.descriptors, p.ingest)
        got[workers] = (m["n_accepted"], m["n_quarantined"],
                        *((root / f).read_bytes() for f in ("data/curated/accepted.extxyz",
                                                             "data/curated/quarantine.parquet",
                                                             "reports/validate/outliers.csv")))
    assert got[1] == got[2]
    q = pd.read_parquet(root / "data/curated/quarantine.parquet")
    assert {"splits"} <= set(q["source"]) and got[1][0] > 0


@pytest.mark.slow
def test_large_file_streams_through_ingest_and_validate_with_progress(tmp_path):
    """20,000 frames through the CLI: progress lines in the log of both stages, every frame accounted for."""
    root = make_project(tmp_path / "proj", [])
    _tiny_file(root / "raw" / "many.extxyz", 20000)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"]["sources"] = [{"path": "raw/many.extxyz"}]
    params["validate"]["energy_per_atom_range"]["Cu"] = [-5.0, 0.0]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, MLIPOPS_PROGRESS_INTERVAL_S="0.5", GX_ANALYTICS_ENABLED="False")
    for stage, label in (("ingest", "ingest (MiB read): "), ("validate", "validate: reading the ingested frames")):
        r = subprocess.run([sys.executable, "-m", "mlipops.cli", stage], cwd=root, env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, r.stderr
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith(label.split(" (")[0])]
        assert len(lines) >= 2 and lines[-1].endswith("done") or "done" in lines[-1], r.stdout[-2000:]
    m = json.loads((root / "reports/validate/metrics.json").read_text())
    assert m["n_accepted"] + m["n_quarantined"] == 20000


def test_a_value_holding_the_split_mark_is_kept(tmp_path, monkeypatch):
    """Ingest writes frames before their split is known, with a mark in its place: a frame whose own value
    holds the mark text is written whole at the end, its value intact."""
    from mlipops import ingest
    from mlipops.frames import read_extxyz
    from mlipops.params import load_params

    _tiny_file(tmp_path / "x.extxyz", 3)
    text = (tmp_path / "x.extxyz").read_text().replace("config_type=dimer",
                                                       'config_type=dimer note="a split=__mlipops_split__"', 1)
    (tmp_path / "x.extxyz").write_text(text)
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["ingest"]["sources"] = [{"path": "x.extxyz"}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    monkeypatch.chdir(tmp_path)
    ingest.run(load_params(tmp_path / "params.yaml").ingest)
    frames, bad = read_extxyz(tmp_path / "data/ingested/frames.extxyz")
    assert not bad and len(frames) == 3
    assert frames[0].info["note"] == "a split=__mlipops_split__"
    assert {a.info["split"] for a in frames} <= {"train", "val", "test"}


# -------------------------------------------------------------- the outlier test's scale paths
def test_summed_descriptor_gradient_equals_autograd():
    """The force rows of the outlier surrogate, analytic in one pass (was: one backward pass per feature)."""
    import torch
    from ase.build import bulk, molecule
    from ase.data import atomic_numbers

    from mlipops.descriptors import AtomCentredDescriptor, frame_edges, summed_descriptor_gradient
    from mlipops.params import DescriptorParams

    species = ["C", "Cl", "Cu", "H", "Na", "O"]
    z = {atomic_numbers[s]: k for k, s in enumerate(species)}
    desc = AtomCentredDescriptor(len(species), **DescriptorParams().model_dump()).double()
    one = AtomCentredDescriptor(1, **DescriptorParams().model_dump()).double()
    cu = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    nacl = bulk("NaCl", "rocksalt", a=5.6, cubic=True)
    mol = molecule("CH3CH2OH")
    for a, seed in ((cu, 1), (nacl, 2), (mol, 3)):
        a.rattle(0.08, seed=seed)
        for d, zz in ((desc, z), (one, {29: 0})):
            if d is one and a is not cu:
                continue
            sp, i, j, vec, _ = frame_edges(a.numbers, a.positions, a.cell.array, a.pbc, d.cutoff, zz)
            pos = torch.tensor(a.positions, requires_grad=True)
            it, jt = torch.from_numpy(i), torch.from_numpy(j)
            v = pos[jt] - pos[it] + torch.from_numpy(vec - (a.positions[j] - a.positions[i]))
            total = d(torch.from_numpy(sp), it, jt, v).sum(0)
            ref = torch.stack([torch.autograd.grad(total[q], pos, retain_graph=True)[0]
                               for q in range(d.n_features)], dim=2)
            got = summed_descriptor_gradient(d, torch.from_numpy(sp), it, jt, v.detach())
            assert got.shape == ref.shape
            assert torch.allclose(got, ref, atol=1e-12, rtol=1e-10)
            g, again = summed_descriptor_gradient(d, torch.from_numpy(sp), it, jt, v.detach(), with_descriptors=True)
            assert torch.equal(again, got)  # the descriptors from the same pass are the forward's, to rounding
            assert torch.allclose(g, d(torch.from_numpy(sp), it, jt, v.detach()), atol=1e-12, rtol=1e-12)


def test_chunked_least_squares_equals_statsmodels(u_rng):
    from mlipops.quality.outliers import RowStore, _ols_chunked, ols_influence

    n = 3000
    x = np.column_stack([np.ones(n), u_rng.normal(size=(n, 5)) * [1, 10, 0.1, 3, 1]])
    x = np.column_stack([x, x[:, 1] + x[:, 2]])  # a collinear column: dropped by both
    y = x[:, :6] @ u_rng.normal(size=6) + u_rng.standard_normal(n) * 0.3
    y[7] += 5.0
    rows = u_rng.random(n) > 0.1
    ref = ols_influence(y, x, rows)
    store = RowStore(x.shape[1], None)
    for lo in range(0, n, 700):
        store.append(x[lo:lo + 700])
    for got in (_ols_chunked(y, x, rows, chunk=256), ols_influence(y, store, rows)):
        assert got.n == ref.n and got.p == ref.p and list(got.cols) == list(ref.cols)
        for f in ("fitted", "leverage", "cooks", "t_external", "dffit"):
            np.testing.assert_allclose(getattr(got, f), getattr(ref, f), rtol=1e-8, atol=1e-12, err_msg=f)
        np.testing.assert_allclose(got.beta, ref.beta, rtol=1e-9)
        np.testing.assert_allclose(got.xtx_inv, ref.xtx_inv, rtol=1e-7, atol=1e-12)


def test_chunked_refit_reuses_the_unchanged_chunks(u_rng):
    """The rounds of the outlier test drop rows: a refit with ``r_cache`` refactors only the chunks whose rows
    changed and gives the fit from scratch (and statsmodels')."""
    from mlipops.quality.outliers import _ols_chunked, ols_influence

    n = 2000
    x = np.column_stack([np.ones(n), u_rng.normal(size=(n, 4))])
    y = x @ u_rng.normal(size=5) + 0.2 * u_rng.standard_normal(n)
    cache: dict = {}
    rows = np.ones(n, dtype=bool)
    _ols_chunked(y, x, rows, chunk=300, r_cache=cache)
    first = {lo: v[1] for lo, v in cache.items() if lo != "key"}
    rows[[5, 7, 1500]] = False  # chunks 0 and 5 change
    got = _ols_chunked(y, x, rows, chunk=300, r_cache=cache)
    assert [lo for lo in first if cache[lo][1] is not first[lo]] == [0, 1500]
    ref = ols_influence(y, x, rows)
    for f in ("fitted", "leverage", "cooks", "t_external"):
        np.testing.assert_allclose(getattr(got, f), getattr(ref, f), rtol=1e-8, atol=1e-12, err_msg=f)
    np.testing.assert_allclose(got.beta, ref.beta, rtol=1e-9)


def test_outlier_test_at_scale_decides_as_in_memory(monkeypatch):
    """The large-set path (design rows in a file, chunked least squares) makes the in-memory path's decision."""
    from test_outliers import make_frames

    from mlipops.frames import labels, set_labels
    from mlipops.params import DescriptorParams
    from mlipops.quality import outliers

    frames = make_frames()
    e, f, s = labels(frames[5])
    set_labels(frames[5], e + 0.2 * len(frames[5]), f, s)
    e, f, s = labels(frames[9])
    set_labels(frames[9], e, -f, s)
    settings = DescriptorParams().model_dump()
    outliers.clear_design_cache()
    ref = outliers.detect(frames, ["Cu"], settings).frames
    monkeypatch.setattr(outliers, "_SPILL_CELLS", 0)
    monkeypatch.setattr(outliers, "_STATSMODELS_MAX_CELLS", 0)
    monkeypatch.setattr(outliers, "_DESIGN_CACHE_ROWS", 0)
    got = outliers.detect(frames, ["Cu"], settings).frames
    assert list(got.quarantine) == list(ref.quarantine) and {5, 9} <= set(np.flatnonzero(got.quarantine))
    assert list(got.kind) == list(ref.kind)
    for c in ("energy_cooks", "energy_t", "force_chi2", "atom_chi2"):  # QR vs SVD: rounding of a near-collinear fit
        np.testing.assert_allclose(got[c].astype(float), ref[c].astype(float), rtol=1e-5, err_msg=c)


@pytest.mark.parametrize("spill", [False, True])
def test_design_rows_by_worker_processes_equal_this_process(monkeypatch, tmp_path, spill):
    """The outlier surrogate's rows made by 2 worker processes (a large training split's path) are those made
    here, chunk for chunk, in memory and in a file."""
    from test_outliers import make_frames

    from mlipops.params import DescriptorParams
    from mlipops.quality import outliers

    frames = make_frames()
    settings = DescriptorParams().model_dump()
    monkeypatch.setattr(outliers, "_DESIGN_CACHE_ROWS", 0)
    monkeypatch.setattr(outliers, "_SPILL_CELLS", 0 if spill else 1 << 40)
    monkeypatch.setattr(outliers, "_TASK_CHUNKS", 2)
    monkeypatch.setenv("MLIPOPS_READ_WORKERS", "1")
    ref = outliers.design(frames, ["Cu"], settings, chunk_atoms=40, spill_dir=tmp_path)
    monkeypatch.setenv("MLIPOPS_READ_WORKERS", "2")
    monkeypatch.setattr(outliers, "_PARALLEL_MIN_ATOMS", 0)
    got = outliers.design(frames, ["Cu"], settings, chunk_atoms=40, spill_dir=tmp_path)
    dense = (lambda x: x.read(0, len(x)) if spill else x)  # noqa: E731
    assert len(frames) > 2 * 2 and isinstance(got["x_forces"], outliers.RowStore) == spill
    np.testing.assert_allclose(got["x_energy"], ref["x_energy"], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(dense(got["x_forces"]), dense(ref["x_forces"]), rtol=1e-12, atol=1e-12)


def test_index_hull_at_scale_equals_the_direct_fit(monkeypatch):
    """The index's large-set paths (the hull fitted chunk by chunk from the R factor, evaluated in row blocks,
    descriptors written into one preallocated array) give the direct path's hull and answers."""
    from ase.build import bulk

    from mlipops.descriptors import DescriptorBatcher
    from mlipops.index import hull as H
    from mlipops.params import DescriptorParams

    rng = np.random.default_rng(4)
    frames = []
    for k in range(40):
        a = bulk("Cu", ["fcc", "bcc"][k % 2], a=[3.6, 2.87][k % 2], cubic=True).repeat(2)
        a.positions += rng.normal(0, 0.08, a.positions.shape)
        frames.append(a)
    settings = DescriptorParams().model_dump()
    b1 = DescriptorBatcher(["Cu"], settings, chunk_atoms=300)
    b2 = DescriptorBatcher(["Cu"], settings, chunk_atoms=300, n_atoms=sum(len(a) for a in frames))
    for a in frames:
        b1.add(a)
        b2.add(a)
    (g, unseen), (g2, unseen2) = b1.result(), b2.result()
    assert np.array_equal(g, g2) and np.array_equal(unseen, unseen2)
    symbols = np.array(["Cu"] * len(g))
    train = rng.random(len(g)) < 0.7
    ref = H.fit_hull_index(symbols, g, train, ["Cu"], settings, 4)
    ev_ref = ref.evaluate(symbols, g, unseen)
    monkeypatch.setattr(H, "_LARGE_CELLS", 0)
    monkeypatch.setattr(H, "_CHUNK_ROWS", 97)
    monkeypatch.setattr(H, "_QHULL_POINTS", 101)  # extreme points pruned 101 points at a time
    got = H.fit_hull_index(symbols, g, train, ["Cu"], settings, 4)
    a, b = ref.hulls["Cu"], got.hulls["Cu"]
    for f in ("feature_mean", "feature_std", "components", "explained_variance_ratio", "centroid"):
        np.testing.assert_allclose(getattr(b, f), getattr(a, f), rtol=1e-9, atol=1e-12, err_msg=f)
    assert len(a.points) == len(b.points) and a.rank == b.rank
    ev = ref.evaluate(symbols, g, unseen)  # the reference hull, evaluated in blocks of 97 atoms
    assert np.array_equal(ev["inside_hull"], ev_ref["inside_hull"])
    np.testing.assert_allclose(ev["extrapolation_grade"], ev_ref["extrapolation_grade"], rtol=1e-9)
    np.testing.assert_allclose(ev["hull_distance"], ev_ref["hull_distance"], rtol=1e-7, atol=1e-12)
