"""Real DFT data (mlearn Mo test set) through the readers and the ingest stage."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from mlipops.frames import labels, read_frames
from mlipops.ingest import ingest
from mlipops.params import IngestParams, SourceParams, SplitParams
from mlipops.quarantine import REJECT_COLUMNS

N_FRAMES, N_ATOMS = 23, 1189  # the dataset README's table


def _independent_parse(path):
    """Header values of every frame, parsed with regexes only (no ASE)."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        n = int(lines[i])
        head = lines[i + 1]
        first_atom = lines[i + 2].split()
        out.append({
            "n": n,
            "energy": float(re.search(r"(?:^|\s)energy=(\S+)", head).group(1)),
            "config_type": re.search(r"config_type=(\S+)", head).group(1),
            "first_force": [float(x) for x in first_atom[4:7]],
        })
        i += 2 + n
    return out


@pytest.fixture
def u_mo_test(u_mlearn_dir):
    return u_mlearn_dir / "Mo_test.extxyz"


def test_read_frames_mo_test_matches_file(u_mo_test):
    expected = _independent_parse(u_mo_test)
    assert len(expected) == N_FRAMES
    frames, rejected = read_frames(u_mo_test)
    assert rejected == []
    assert len(frames) == N_FRAMES
    assert sum(len(a) for a in frames) == N_ATOMS
    for a, ref in zip(frames, expected):
        e, f, _ = labels(a)
        assert len(a) == ref["n"]
        assert e == pytest.approx(ref["energy"], abs=1e-8)
        np.testing.assert_allclose(f[0], ref["first_force"], atol=1e-8)
        assert f.shape == (len(a), 3)
        assert set(a.get_chemical_symbols()) == {"Mo"}
        assert a.info["config_type"] == ref["config_type"]
        assert a.pbc.all()
    assert Counter(a.info["config_type"] for a in frames) == Counter(r["config_type"] for r in expected)
    assert set(a.info["config_type"] for a in frames) == {"AIMD-NVT", "Elastic", "Surface", "Vacancy"}
    # DFT energies of Mo: about -10.9 eV/atom (bulk) and never positive
    epa = np.array([labels(a)[0] / len(a) for a in frames])
    assert np.all((epa > -11.5) & (epa < -9.0))


def test_ingest_mo_test_random_split(u_mo_test, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ingest() writes nothing, but never let it touch the repo
    expected = _independent_parse(u_mo_test)
    p = IngestParams(sources=[SourceParams(path=str(u_mo_test))],
                     split=SplitParams(method="random", val_fraction=0.2, test_fraction=0.2, seed=3))
    frames, rejected, stats = ingest(p)
    assert stats == {"n_read": N_FRAMES, "n_frames": N_FRAMES, "n_rejected": 0}
    assert len(rejected) == 0
    assert list(rejected.columns) == REJECT_COLUMNS
    assert sum(len(a) for a in frames) == N_ATOMS
    assert [labels(a)[0] for a in frames] == pytest.approx([r["energy"] for r in expected], abs=1e-8)
    assert [a.info["config_type"] for a in frames] == [r["config_type"] for r in expected]
    assert len({a.info["frame_id"] for a in frames}) == N_FRAMES
    assert [a.info["source_index"] for a in frames] == list(range(N_FRAMES))
    splits = [a.info["split"] for a in frames]
    assert set(splits) <= {"train", "val", "test"}
    assert "train" in splits
    # the split is a pure function of (seed, frame_id): the same on a second run
    again, _, _ = ingest(p)
    assert [a.info["split"] for a in again] == splits
