"""Descriptors saved by validate for the index (mlipops.descriptor_store): rows back as written, and refused
for anything but the data file, species and settings they were made for."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlipops.descriptor_store import SavedDescriptors, SavedDescriptorsWriter, write_no_saved_descriptors

SETTINGS = {"cutoff": 5.0, "n_radial": 8}


def _write(tmp_path, order=(2, 0, 1)):
    rng = np.random.default_rng(0)
    counts = [3, 1, 4, 2]
    rows = [rng.normal(size=(n, 5)).astype(np.float32) for n in counts]
    w = SavedDescriptorsWriter(tmp_path / "saved", ["Cu"], SETTINGS, 5, ["a", "b", "c", "d"], counts)
    for k in order:  # any order; frame 3 never given
        w.add(np.array([k]), rows[k])
    w.finish("md5-of-data")
    return rows


def test_rows_come_back_as_written(tmp_path):
    rows = _write(tmp_path)
    meta, why = SavedDescriptors.check(tmp_path / "saved", "md5-of-data", ["Cu"], SETTINGS)
    assert why == "" and meta["frame_id"] == ["a", "b", "c"]
    s = SavedDescriptors(tmp_path / "saved", meta)
    for k, f in enumerate("abc"):
        start, n = s.where[f]
        assert s.read(start, start + n).tobytes() == rows[k].tobytes()
    assert "d" not in s.where  # never given: the reader computes it


def test_consecutive_frames_in_one_call(tmp_path):
    rng = np.random.default_rng(1)
    w = SavedDescriptorsWriter(tmp_path / "s", ["Cu"], SETTINGS, 2, ["a", "b", "c", "d"], [1, 2, 3, 1])
    g = rng.normal(size=(7, 2)).astype(np.float32)
    w.add(np.array([0, 1, 3, 2]), np.concatenate([g[:3], g[6:], g[3:6]]))  # two runs: 0-1 and 3, then 2
    w.finish("x")
    s = SavedDescriptors(tmp_path / "s", SavedDescriptors.check(tmp_path / "s", "x", None, SETTINGS)[0])
    assert s.read(0, 7).tobytes() == g.tobytes()
    with pytest.raises(ValueError, match="rows"):
        w.add(np.array([0]), g[:2])


@pytest.mark.parametrize("md5,species,settings,why", [
    ("other", ["Cu"], SETTINGS, "another version"),
    ("md5-of-data", ["Ag", "Cu"], SETTINGS, "species"),
    ("md5-of-data", ["Cu"], {"cutoff": 4.0, "n_radial": 8}, "settings"),
])
def test_refused_for_other_data_species_or_settings(tmp_path, md5, species, settings, why):
    _write(tmp_path)
    meta, note = SavedDescriptors.check(tmp_path / "saved", md5, species, settings)
    assert meta is None and why in note


def test_refused_when_missing_empty_foreign_or_short(tmp_path):
    assert SavedDescriptors.check(None, "x", None, SETTINGS) == (None, "none saved")
    meta, note = SavedDescriptors.check(tmp_path / "nowhere", "x", None, SETTINGS)
    assert meta is None and "unreadable" in note
    write_no_saved_descriptors(tmp_path / "empty", "outlier detection disabled")
    assert SavedDescriptors.check(tmp_path / "empty", "x", None, SETTINGS) == (None, "outlier detection disabled")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "meta.json").write_text(json.dumps({"format": "something else"}))
    assert "not mlipops.saved_descriptors/1" in SavedDescriptors.check(tmp_path / "foreign", "x", None, SETTINGS)[1]
    _write(tmp_path)
    rows = tmp_path / "saved" / "rows.npy"
    rows.write_bytes(rows.read_bytes()[:-8])  # cut short
    meta, _ = SavedDescriptors.check(tmp_path / "saved", "md5-of-data", ["Cu"], SETTINGS)
    s = SavedDescriptors(tmp_path / "saved", meta)
    with pytest.raises(ValueError, match="shorter"):
        s.read(0, meta["n_rows"])
