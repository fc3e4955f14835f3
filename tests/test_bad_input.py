"""The bad-input corpus (tests/data/bad/) through the real CLI.

The rule: bad input never crashes with a traceback and never loses data. It either stops the
stage with one line ``mlipops: error: <file>: frame <k>: field '<f>': ...`` on stderr and exit
status 2 (nothing written), or the frame goes to ``data/curated/quarantine.parquet`` with its
``check``, ``reason`` and raw extxyz text, and accepted + quarantined = frames read.

Each CLI test runs ``python -m mlipops.cli <stage>`` in a fresh temporary project whose
``raw/`` holds copies of the corpus files and whose params.yaml is the repository's with
``ingest.sources`` pointing at them (relative paths, so messages are compared exactly) and the
``validate`` thresholds pinned.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mlipops.errors import FrameFormatError
from mlipops.frames import labels, read_extxyz

REPO = Path(__file__).resolve().parents[1]
BAD = Path(__file__).resolve().parent / "data" / "bad"
PARAMS = BAD / "params"

# Frames in each corpus file that the CLI can read, counted by hand.
N_FRAMES = {
    "good.extxyz": 3,
    "no_energy.extxyz": 3,
    "nan_energy.extxyz": 4,
    "nan_forces.extxyz": 2,
    "forces_wrong_shape.extxyz": 3,
    "unknown_element.extxyz": 3,
    "disallowed_species.extxyz": 2,
    "overlapping_atoms.extxyz": 2,
    "huge_force.extxyz": 2,
    "duplicate_frame.extxyz": 3,
    "zero_atoms.extxyz": 2,
    "nan_positions.extxyz": 2,
    "energy_not_number.extxyz": 2,
    "all_bad.extxyz": 2,
    "inf_forces.extxyz": 2,
    "forces_not_number.extxyz": 2,
    "zero_volume_cell.extxyz": 3,
    "mixed_units.extxyz": 4,
    "stress_wrong_shape.extxyz": 3,
    "energy_out_of_range.extxyz": 3,
    "net_force_corrupted.extxyz": 4,
    "outside_box.extxyz": 3,
    "one_atom.extxyz": 4,
}
QUARANTINE_FILES = [f for f in N_FRAMES if f != "all_bad.extxyz"]

# (source, source_index) -> (stage, check, reason) of every frame that must be quarantined;
# reason None: checked separately.
ZERO_CELL = ("periodic cell is degenerate: the 3 periodic cell vector(s) span 0 Å^3 "
             "(zero or collinear lattice vectors)")
NET_FORCE = ("net force |ΣF| = {:.3g} eV/Å above 0.1 eV/Å "
             "(forces must sum to zero: corrupted or mixed-up force labels?)")
EXPECTED_QUARANTINE = {
    ("unknown_element", 1): (
        "ingest", "parse",
        "raw/unknown_element.extxyz frame 1: unknown element or missing key 'Xx' (field 'species')"),
    ("zero_atoms", 1): (
        "ingest", "parse", "raw/zero_atoms.extxyz frame 1: ValueError: frame has no atoms (field 'natoms')"),
    ("nan_positions", 1): (
        "ingest", "parse",
        "raw/nan_positions.extxyz frame 1: ValueError: non-finite value (NaN or inf) in field 'positions'"),
    ("energy_not_number", 1): (
        "ingest", "parse",
        "raw/energy_not_number.extxyz frame 1: ValueError: field 'energy' is not a number: 'abc'"),
    ("duplicate_frame", 2): ("ingest", "duplicate", None),
    ("no_energy", 1): ("validate", "has_energy", "no energy label"),
    ("nan_energy", 1): ("validate", "finite_labels", "non-finite label (NaN or inf) in energy"),
    ("nan_energy", 3): ("validate", "finite_labels", "non-finite label (NaN or inf) in energy"),
    ("nan_forces", 1): (
        "validate", "finite_labels",
        "non-finite label (NaN or inf) in forces; atom 0: force (nan, 0.01, 0) not finite (+1 more atom)"),
    ("forces_wrong_shape", 1): (
        "validate", "forces_shape", "forces array shape differs from positions (4x2 vs 4x3)"),
    ("disallowed_species", 1): (
        "validate", "species_allowed", "atom 1: species Ag not in validate.allowed_species ['Cu']"),
    ("overlapping_atoms", 1): (
        "validate", "min_distance", "atoms 0.300 Å apart (overlapping; minimum 1.5 Å)"),
    ("huge_force", 1): ("validate", "max_force", "atom 0: |F| = 120 eV/Å above 50.0 eV/Å (+1 more atom)"),
    ("inf_forces", 1): (
        "validate", "finite_labels",
        "non-finite label (NaN or inf) in forces; atom 1: force (inf, -0.01, 0) not finite (+1 more atom)"),
    ("forces_not_number", 1): (
        "ingest", "parse",
        "raw/forces_not_number.extxyz frame 1: field 'forces': atom 2 (line 11): '0.0o0' is not a number"),
    ("zero_volume_cell", 1): ("validate", "cell_volume", ZERO_CELL),
    ("zero_volume_cell", 2): ("validate", "cell_volume", ZERO_CELL),
    ("mixed_units", 2): (
        "validate", "energy_range",
        "energy -81.53 eV/atom below the range [-5, 0] eV/atom of Cu (validate.energy_per_atom_range.Cu)"),
    ("mixed_units", 3): (
        "validate", "energy_range,max_force",
        "energy -3536 eV/atom below the range [-5, 0] eV/atom of Cu (validate.energy_per_atom_range.Cu); "
        "atom 0: |F| = 51 eV/Å above 50.0 eV/Å"),
    ("stress_wrong_shape", 1): (
        "ingest", "parse",
        "raw/stress_wrong_shape.extxyz frame 1: field 'stress': ValueError: Got info item stress, expecting special "
        "3x3 matrix, "
        "but value is not in the form of a 9-long numerical vector"),
    ("stress_wrong_shape", 2): ("validate", "finite_labels", "non-finite label (NaN or inf) in stress"),
    ("energy_out_of_range", 1): (
        "validate", "energy_range",
        "energy -35.41 eV/atom below the range [-5, 0] eV/atom of Cu (validate.energy_per_atom_range.Cu)"),
    ("energy_out_of_range", 2): (
        "validate", "energy_range",
        "energy 3.541 eV/atom above the range [-5, 0] eV/atom of Cu (validate.energy_per_atom_range.Cu)"),
    ("net_force_corrupted", 1): ("validate", "net_force", NET_FORCE.format(0.948)),
    ("net_force_corrupted", 2): ("validate", "net_force", NET_FORCE.format(0.831)),
    ("net_force_corrupted", 3): ("validate", "net_force", NET_FORCE.format(0.451)),
    ("outside_box", 1): (
        "validate", "box_margin",
        "atom 3 lies 15 Å outside the cell along a non-periodic direction (margin 5.0 Å)"),
    ("outside_box", 2): (
        "validate", "box_margin",
        "atom 3 lies 8 Å outside the cell along a non-periodic direction (margin 5.0 Å)"),
    ("one_atom", 2): ("validate", "net_force", NET_FORCE.format(0.5)),
    ("one_atom", 3): ("validate", "min_distance", "atoms 1.200 Å apart (overlapping; minimum 1.5 Å)"),
}
N_QUARANTINED = len(EXPECTED_QUARANTINE)  # 30
N_CORPUS = 61


# ------------------------------------------------------------------------------------ helpers
def split_frames(path: Path) -> list[str]:
    """Raw text of each frame, found by the natoms lines alone (independent of mlipops)."""
    lines = path.read_text().splitlines(keepends=True)
    out, i = [], 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        n = int(lines[i])
        out.append("".join(lines[i:i + 2 + n]))
        i += 2 + n
    return out


def mlipops(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLIPOPS_DEBUG"}
    env["GX_ANALYTICS_ENABLED"] = "False"
    return subprocess.run([sys.executable, "-m", "mlipops.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def make_project(root: Path, sources: list) -> Path:
    """A project dir with the named corpus files in raw/ and params.yaml pointing at them.

    ``sources``: corpus file names, or dicts (a source entry; ``path`` relative to the project).
    """
    (root / "raw").mkdir(parents=True, exist_ok=True)
    entries = []
    for s in sources:
        entry = dict(s) if isinstance(s, dict) else {"path": f"raw/{s}"}
        name = Path(entry["path"]).name
        if (BAD / name).is_file():
            shutil.copy(BAD / name, root / "raw" / name)
        entries.append(entry)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["sources"] = entries
    # the thresholds the expected reasons below quote, whatever the repository's values become;
    # the corpus is DFT-like Cu (about -3.5 eV/atom), hence its own energy window
    params["validate"].update(allowed_species=["Cu"], min_interatomic_distance=1.5, max_abs_force=50.0,
                              energy_per_atom_range={"default": [-20.0, 5.0], "Cu": [-5.0, 0.0]},
                              net_force_tolerance=0.1, box_margin=5.0, expected_test_config_types=[])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def error_line(r: subprocess.CompletedProcess) -> str:
    """Assert the one-line user error contract and return that line."""
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert "internal error" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{r.stderr}"
    assert lines[0].startswith("mlipops: error: "), lines[0]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout == ""
    return lines[0]


def assert_ok(r: subprocess.CompletedProcess, stage: str) -> None:
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "error" not in r.stderr.lower(), r.stderr
    assert f"{stage} done" in r.stderr


# ------------------------------------------------------------------------- corpus, unit level
def test_corpus_frame_counts_match_the_files():
    for name, n in N_FRAMES.items():
        assert len(split_frames(BAD / name)) == n, name
    assert sum(N_FRAMES[f] for f in QUARANTINE_FILES) == N_CORPUS


@pytest.mark.parametrize("name, n_ok, bad_indices", [
    ("good.extxyz", 3, []),
    ("no_energy.extxyz", 3, []),
    ("nan_energy.extxyz", 4, []),
    ("nan_forces.extxyz", 2, []),
    ("forces_wrong_shape.extxyz", 3, []),
    ("unknown_element.extxyz", 2, [1]),
    ("disallowed_species.extxyz", 2, []),
    ("overlapping_atoms.extxyz", 2, []),
    ("huge_force.extxyz", 2, []),
    ("duplicate_frame.extxyz", 3, []),
    ("zero_atoms.extxyz", 1, [1]),
    ("nan_positions.extxyz", 1, [1]),
    ("energy_not_number.extxyz", 1, [1]),
    ("all_bad.extxyz", 0, [0, 1]),
    ("inf_forces.extxyz", 2, []),
    ("forces_not_number.extxyz", 1, [1]),
    ("zero_volume_cell.extxyz", 3, []),
    ("mixed_units.extxyz", 4, []),
    ("stress_wrong_shape.extxyz", 2, [1]),
    ("energy_out_of_range.extxyz", 3, []),
    ("net_force_corrupted.extxyz", 4, []),
    ("outside_box.extxyz", 3, []),
    ("one_atom.extxyz", 4, []),
])
def test_read_extxyz_keeps_every_frame(name, n_ok, bad_indices):
    path = BAD / name
    frames, rejected = read_extxyz(path)
    assert len(frames) == n_ok
    assert [r.source_index for r in rejected] == bad_indices
    assert len(frames) + len(rejected) == N_FRAMES[name]
    assert sorted([a.info["source_index"] for a in frames] + bad_indices) == list(range(N_FRAMES[name]))
    raw = split_frames(path)
    for r in rejected:
        assert r.check == "parse"
        assert r.raw == raw[r.source_index]  # the exact text of the file, nothing lost
        assert r.reason.startswith(f"{path} frame {r.source_index}: ")
        assert re.search(r"field '\w+'", r.reason), r.reason  # every parse failure names its field
        assert "\n" not in r.reason


def test_read_extxyz_labels_of_bad_frames():
    frames, _ = read_extxyz(BAD / "nan_energy.extxyz")
    energies = [labels(a)[0] for a in frames]
    assert energies[0] == pytest.approx(-14.021) and energies[2] == pytest.approx(-14.023)
    assert math.isnan(energies[1]) and energies[3] == math.inf

    frames, _ = read_extxyz(BAD / "no_energy.extxyz")
    e, f, _ = labels(frames[1])
    assert e is None and f.shape == (4, 3)

    frames, _ = read_extxyz(BAD / "nan_forces.extxyz")
    f = labels(frames[1])[1]
    assert np.isnan(f[0, 0]) and np.isnan(f[2, 1]) and np.isfinite(f).sum() == 10

    frames, _ = read_extxyz(BAD / "forces_wrong_shape.extxyz")
    e, f, _ = labels(frames[1])
    assert frames[1].info["forces_shape"] == "4x2" and f is None and e == pytest.approx(-14.042)
    assert "forces_shape" not in frames[0].info and labels(frames[0])[1].shape == (4, 3)

    frames, _ = read_extxyz(BAD / "overlapping_atoms.extxyz")
    d = frames[1].get_distance(0, 1, mic=True)
    assert len(frames[1]) == 5 and d == pytest.approx(0.3)


def test_corpus_frames_are_distinct_except_the_duplicate():
    ids = {}
    for name in N_FRAMES:
        for a in read_extxyz(BAD / name)[0]:
            ids.setdefault(a.info["frame_id"], []).append((name, a.info["source_index"]))
    repeated = [v for v in ids.values() if len(v) > 1]
    assert repeated == [[("duplicate_frame.extxyz", 0), ("duplicate_frame.extxyz", 2)]]


@pytest.mark.parametrize("name, frame, field, message", [
    ("truncated.extxyz", 1, "natoms", "line 7: file ends after 2 of 4 atom lines (truncated?)"),
    ("natoms_not_integer.extxyz", 1, "natoms", "line 7: expected the number of atoms, found 'four'"),
    ("empty.extxyz", None, None, "contains no frames"),
    ("huge_natoms.extxyz", 1, "natoms", "line 7: file ends after 4 of 2000000000 atom lines (truncated?)"),
    ("binary.extxyz", 0, "natoms",
     "line 1: not a text file (gzip-compressed: decompress it first): byte 0x8b at offset 1 is not UTF-8 "
     "(invalid start byte)"),
    ("not_utf8.extxyz", 1, "config_type",
     "line 8: not UTF-8 text (re-save it as UTF-8): byte 0xe9 at offset 432 is not UTF-8 (invalid continuation byte)"),
])
def test_read_extxyz_unreadable_files_raise(name, frame, field, message):
    with pytest.raises(FrameFormatError) as info:
        read_extxyz(BAD / name)
    exc = info.value
    assert (exc.file, exc.frame, exc.field, exc.detail) == (str(BAD / name), frame, field, message)


def test_unreadable_file_messages_name_file_frame_and_field():
    """The one-line error of a file that cannot be read names the file, the frame and the field."""
    for name in ("truncated.extxyz", "natoms_not_integer.extxyz", "huge_natoms.extxyz", "binary.extxyz",
                 "not_utf8.extxyz"):
        with pytest.raises(FrameFormatError) as info:
            read_extxyz(BAD / name)
        text = str(info.value)
        assert text.startswith(f"{BAD / name}: frame {info.value.frame}: field '{info.value.field}': "), text
        assert info.value.frame is not None and info.value.field and "\n" not in text


def test_non_numeric_values_name_their_field(tmp_path):
    """A value that is not a number is reported with its field, atom and line, wherever it sits."""
    head = ('Lattice="3.61 0.0 0.0 0.0 3.61 0.0 0.0 0.0 3.61" pbc="T T T" '
            "Properties=species:S:1:pos:R:3:forces:R:3:tags:I:1 energy=-3.5")
    cases = {"Cu 0.1x0 0.0 0.0 0.0 0.0 0.0 1": "field 'pos': atom 0 (line 3): '0.1x0' is not a number",
             "Cu 0.1 0.0 0.0 0.0 0.0 zero 1": "field 'forces': atom 0 (line 3): 'zero' is not a number",
             "Cu 0.1 0.0 0.0 0.0 0.0 0.0 one": "field 'tags': atom 0 (line 3): 'one' is not an integer"}
    for q, (line, message) in enumerate(cases.items()):
        path = tmp_path / f"case{q}.extxyz"
        path.write_text(f"1\n{head}\n{line}\n")
        frames, rejected = read_extxyz(path)
        assert frames == [] and [r.reason for r in rejected] == [f"{path} frame 0: {message}"]


# ------------------------------------------------------------------------------- CLI runs
# Every CLI case is a job: (corpus sources, params file from tests/data/bad/params or None for
# the repository's params.yaml with those sources, commands run one after another). All jobs
# start at once in the module fixture below (each is a few seconds of imports), the tests then
# read their results.
SOURCE_ERRORS = {
    "truncated": (
        ["good.extxyz", "truncated.extxyz"],
        "mlipops: error: raw/truncated.extxyz: frame 1: field 'natoms': line 7: "
        "file ends after 2 of 4 atom lines (truncated?)"),
    "natoms_not_integer": (
        ["good.extxyz", "natoms_not_integer.extxyz"],
        "mlipops: error: raw/natoms_not_integer.extxyz: frame 1: field 'natoms': line 7: "
        "expected the number of atoms, found 'four'"),
    "missing_source": (
        ["good.extxyz", "does_not_exist.extxyz"],
        "mlipops: error: raw/does_not_exist.extxyz: source listed in params.yaml ingest.sources[1] not found"),
    "empty_file": (["empty.extxyz"], "mlipops: error: raw/empty.extxyz: contains no frames"),
    "huge_natoms": (
        ["good.extxyz", "huge_natoms.extxyz"],
        "mlipops: error: raw/huge_natoms.extxyz: frame 1: field 'natoms': line 7: "
        "file ends after 4 of 2000000000 atom lines (truncated?)"),
    "binary": (
        ["good.extxyz", "binary.extxyz"],
        "mlipops: error: raw/binary.extxyz: frame 0: field 'natoms': line 1: not a text file (gzip-compressed: "
        "decompress it first): byte 0x8b at offset 1 is not UTF-8 (invalid start byte)"),
    "not_utf8": (
        ["not_utf8.extxyz"],
        "mlipops: error: raw/not_utf8.extxyz: frame 1: field 'config_type': line 8: not UTF-8 text (re-save it as "
        "UTF-8): byte 0xe9 at offset 432 is not UTF-8 (invalid continuation byte)"),
    "not_utf8_as_json": (
        [{"path": "raw/not_utf8.extxyz", "format": "mlearn_json"}],
        "mlipops: error: raw/not_utf8.extxyz: not valid JSON: 'utf-8' codec can't decode byte 0xe9 in position 432: "
        "invalid continuation byte"),
    "extxyz_as_db": (
        [{"path": "raw/good.extxyz", "format": "db"}],
        "mlipops: error: raw/good.extxyz: not a readable ASE database: ValueError: Unknown database type: extxyz"),
}

# params corpus file -> (start of the message after "mlipops: error: ", a part of the rest)
PARAMS_ERRORS = {
    "epochs_not_int.yaml": ("params.yaml: train.epochs: ", "(got 'abc')"),
    "unknown_key.yaml": ("params.yaml: validate.min_distance: ", "Extra inputs are not permitted"),
    "unknown_source_key.yaml": ("params.yaml: ingest.sources.0.fromat: ", "Extra inputs are not permitted"),
    "unknown_section.yaml": ("params.yaml: trian: ", "Extra inputs are not permitted"),
    "bad_format.yaml": ("params.yaml: ingest.sources.0.format: ", "unknown format 'vasprun'"),
    "missing_required.yaml": ("params.yaml: validate.allowed_species: ", "Field required"),
    "yaml_syntax.yaml": ("params.yaml: not valid YAML: line 6, column 6: ",
                         "(while parsing a flow sequence from line 5)"),
    "not_a_mapping.yaml": ("params.yaml: ", "top level must be a mapping of stage sections"),
    "not_utf8.yaml": ("params.yaml: cannot read: ", "can't decode byte 0xe9"),
}

JOBS: dict[str, tuple[list, str | None, list[list[str]]]] = {
    "quarantine": (QUARANTINE_FILES, None, [["ingest"], ["validate"], ["index"]]),
    "all_bad": (["all_bad.extxyz"], None, [["ingest"], ["validate"], ["index"]]),
    "validate_first": (["good.extxyz"], None, [["validate"]]),
    "dataset_check": (["good.extxyz"], None, [["ingest"], ["validate"]]),
    "params_ok": (["good.extxyz"], "ok_minimal.yaml", [["ingest"]]),
    "params_path": (["good.extxyz"], None, [["validate", "--params", "conf/custom.yaml"],
                                            ["ingest", "--params", "nope.yaml"]]),
    **{f"source:{k}": (srcs, None, [["ingest"]]) for k, (srcs, _) in SOURCE_ERRORS.items()},
    **{f"params:{k}": (["good.extxyz"], k, [["ingest"]]) for k in PARAMS_ERRORS},
}

# per-job changes to the params.yaml written by make_project
PARAMS_OVERRIDES = {
    # the test split (config_type 'rattled' of good.extxyz) lacks a declared config_type
    "dataset_check": {"ingest": {"split": {"test_config_types": ["rattled"]}},
                      "validate": {"expected_test_config_types": ["rattled", "vacancy"]}},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, list[subprocess.CompletedProcess]]]:
    # projects are prepared sequentially (tmp_path_factory is not thread-safe); only the CLI runs overlap
    roots = {}
    for name in JOBS:
        sources, params_file, _ = JOBS[name]
        root = make_project(tmp_path_factory.mktemp(name.replace(":", "_").replace(".", "_")), sources)
        if params_file:
            shutil.copy(PARAMS / params_file, root / "params.yaml")
        if name in PARAMS_OVERRIDES:
            params = yaml.safe_load((root / "params.yaml").read_text())
            for section, values in PARAMS_OVERRIDES[name].items():
                for key, value in values.items():
                    if isinstance(value, dict):
                        params[section][key].update(value)
                    else:
                        params[section][key] = value
            (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        if name == "params_path":
            (root / "conf").mkdir()
            shutil.copy(PARAMS / "epochs_not_int.yaml", root / "conf" / "custom.yaml")
        roots[name] = root

    def job(name: str):
        root = roots[name]
        return root, [mlipops(root, *c) for c in JOBS[name][2]]

    with ThreadPoolExecutor(max_workers=max(2, min(6, (os.cpu_count() or 2) + 1))) as pool:
        futures = {name: pool.submit(job, name) for name in JOBS}  # the longest job first
        return {name: f.result() for name, f in futures.items()}


# ---------------------------------------------------------- CLI: quarantine, count invariant
def test_pipeline_runs_clean(runs):
    root, (r_ingest, r_validate, _) = runs["quarantine"]
    assert_ok(r_ingest, "ingest")
    assert_ok(r_validate, "validate")
    ingest_metrics = json.loads((root / "reports/ingest/metrics.json").read_text())
    assert (ingest_metrics["n_read"], ingest_metrics["n_frames"], ingest_metrics["n_rejected"]) == (61, 54, 7)
    assert (ingest_metrics["n_rejected.parse"], ingest_metrics["n_rejected.duplicate"]) == (6, 1)
    m = json.loads((root / "reports/validate/metrics.json").read_text())
    assert (m["n_ingested"], m["n_accepted"], m["n_quarantined"]) == (N_CORPUS, N_CORPUS - N_QUARANTINED, N_QUARANTINED)
    assert m["gx_success"] is False
    assert m["dataset_checks_failed"] == 0
    assert {k: v for k, v in m.items() if k.startswith("n_quarantined.")} == {
        "n_quarantined.parse": 6, "n_quarantined.duplicate": 1, "n_quarantined.has_energy": 1,
        "n_quarantined.finite_labels": 5, "n_quarantined.forces_shape": 1,
        "n_quarantined.species_allowed": 1, "n_quarantined.min_distance": 2, "n_quarantined.max_force": 2,
        "n_quarantined.cell_volume": 2, "n_quarantined.energy_range": 4, "n_quarantined.net_force": 4,
        "n_quarantined.box_margin": 2}
    summary = (root / "reports/validate/summary.md").read_text()
    for section in ("## Frame table (54 rows)", "## Atom table", "## Dataset checks"):
        assert section in summary
    for check in ("energy_range", "net_force", "cell_volume", "box_margin", "species_allowed", "max_force",
                  "test_split_config_types", "schema"):
        assert f"| {check} |" in summary, check


def test_quarantine_has_every_bad_frame_with_its_reason(runs):
    root, _ = runs["quarantine"]
    q = pd.read_parquet(root / "data/curated/quarantine.parquet")
    assert {"check", "reason", "extxyz", "source", "source_index", "stage"} <= set(q.columns)
    got = {(r.source, int(r.source_index)): (r.stage, r.check, r.reason) for r in q.itertuples()}
    assert len(got) == len(q) == N_QUARANTINED
    assert set(got) == set(EXPECTED_QUARANTINE)
    for key, (stage, check, reason) in EXPECTED_QUARANTINE.items():
        assert got[key][:2] == (stage, check), key
        if reason is not None:
            assert got[key][2] == reason, key
    # the duplicate names the frame it repeats, by source, index and content hash
    first = read_extxyz(BAD / "duplicate_frame.extxyz")[0][0].info["frame_id"]
    assert got[("duplicate_frame", 2)][2] == f"same structure as duplicate_frame frame 0 (frame_id {first[:12]})"


def test_quarantined_frames_keep_their_text(runs, tmp_path):
    root, _ = runs["quarantine"]
    q = pd.read_parquet(root / "data/curated/quarantine.parquet")
    for r in q.itertuples():
        src = BAD / f"{r.source}.extxyz"
        raw = split_frames(src)[r.source_index]
        if r.check == "parse":
            assert r.extxyz == raw  # unparseable: the text of the source, verbatim
            continue
        # parsed frames: the same structure (content hash) and labels as the source frame
        tmp = tmp_path / f"{r.source}_{r.source_index}.extxyz"
        tmp.write_text(r.extxyz)
        (back,), bad = read_extxyz(tmp)
        original = next(a for a in read_extxyz(src)[0] if a.info["source_index"] == r.source_index)
        assert bad == [] and back.info["frame_id"] == original.info["frame_id"] == r.frame_id
        e0, f0, _ = labels(original)
        e1, f1, _ = labels(back)
        assert (e0 is None and e1 is None) or e0 == e1 or (math.isnan(e0) and math.isnan(e1))
        assert (f0 is None and f1 is None) or np.array_equal(f0, f1, equal_nan=True)
    shaped = q[q["check"] == "forces_shape"]["extxyz"].iloc[0]
    assert "forces_shape=4x2" in shaped


def test_accepted_plus_quarantined_equals_frames_read(runs):
    root, _ = runs["quarantine"]
    q = pd.read_parquet(root / "data/curated/quarantine.parquet")
    accepted, unreadable = read_extxyz(root / "data/curated/accepted.extxyz")
    assert unreadable == []
    n_corpus = sum(len(split_frames(BAD / f)) for f in QUARANTINE_FILES)
    assert len(accepted) + len(q) == n_corpus == N_CORPUS
    got = {(a.info["source"], a.info["source_index"]) for a in accepted}
    expected = {(Path(f).stem, k) for f in QUARANTINE_FILES for k in range(N_FRAMES[f])} - set(EXPECTED_QUARANTINE)
    assert len(got) == len(accepted) == N_CORPUS - N_QUARANTINED
    assert got == expected
    # accepted frames keep their labels
    good0 = next(a for a in accepted if (a.info["source"], a.info["source_index"]) == ("good", 0))
    e, f, _ = labels(good0)
    assert e == pytest.approx(-14.001)
    assert f[0].tolist() == pytest.approx([-0.05, 0.01, 0.0])


def test_every_frame_bad_still_accounts_for_all(runs):
    root, (r_ingest, r_validate, r_index) = runs["all_bad"]
    assert_ok(r_ingest, "ingest")
    assert json.loads((root / "reports/ingest/metrics.json").read_text())["n_frames"] == 0
    assert_ok(r_validate, "validate")
    assert (root / "data/curated/accepted.extxyz").read_text() == ""
    q = pd.read_parquet(root / "data/curated/quarantine.parquet")
    assert q["check"].tolist() == ["parse", "parse"]
    assert q["source_index"].tolist() == [0, 1]
    assert q["reason"].iloc[0] == "raw/all_bad.extxyz frame 0: unknown element or missing key 'Xx' (field 'species')"
    assert q["reason"].iloc[1] == "raw/all_bad.extxyz frame 1: field 'pos': atom 1 (line 10): 'abc' is not a number"
    assert q["extxyz"].tolist() == split_frames(BAD / "all_bad.extxyz")
    m = json.loads((root / "reports/validate/metrics.json").read_text())
    assert (m["n_ingested"], m["n_accepted"], m["n_quarantined"]) == (2, 0, 2)
    # no training atom at all: the hull cannot be built, said in one line; no index is left behind
    assert "'train' split is empty" in error_line(r_index)
    assert not (root / "data/index.duckdb").exists()


def test_index_of_quarantined_corpus(runs):
    """The index holds every frame (accepted and quarantined, with reasons) and a hull of the accepted."""
    from mlipops.index.build import query

    root, (_, _, r_index) = runs["quarantine"]
    assert_ok(r_index, "index")
    db = root / "data/index.duckdb"
    fr = query("SELECT status, count(*) AS n FROM frames GROUP BY status ORDER BY status", db)
    assert fr.values.tolist() == [["accepted", N_CORPUS - N_QUARANTINED], ["quarantined", N_QUARANTINED]]
    reasons = query("SELECT quarantine_check FROM frames WHERE status = 'quarantined'", db)
    assert reasons["quarantine_check"].notna().all()
    n_atoms = query("SELECT count(*) AS n FROM atoms", db).loc[0, "n"]
    n_acc = query("SELECT sum(n_atoms) AS n FROM frames WHERE status = 'accepted'", db).loc[0, "n"]
    assert n_atoms == n_acc
    assert query("SELECT count(*) AS n FROM hull", db).loc[0, "n"] == 1


# ----------------------------------------------------------------- CLI: one-line user errors
@pytest.mark.parametrize("case", list(SOURCE_ERRORS))
def test_unreadable_source_is_one_line_error(runs, case):
    root, (r,) = runs[f"source:{case}"]
    assert error_line(r) == SOURCE_ERRORS[case][1]
    assert not (root / "data").exists() and not (root / "reports").exists()  # nothing half-written
    for p in (root / "raw").iterdir():
        assert p.read_bytes() == (BAD / p.name).read_bytes()  # inputs untouched


def test_dataset_check_warns_and_quarantines_nothing(runs):
    """A test split lacking a declared config_type: one warning line, nothing quarantined, exit 0."""
    root, (r_ingest, r_validate) = runs["dataset_check"]
    assert_ok(r_ingest, "ingest")
    assert_ok(r_validate, "validate")
    warnings = [line for line in r_validate.stderr.splitlines() if "warning" in line]
    assert warnings == ["mlipops: warning: dataset check test_split_config_types: the test split holds no "
                        "accepted frame of config_type(s) vacancy (validate.expected_test_config_types)"]
    m = json.loads((root / "reports/validate/metrics.json").read_text())
    assert (m["n_accepted"], m["n_quarantined"], m["dataset_checks_failed"]) == (3, 0, 1)
    assert m["gx_success"] is True and m["dataset_check_failed.test_split_config_types"] == 1
    assert "| test_split_config_types | FAIL |" in (root / "reports/validate/summary.md").read_text()


def test_validate_without_ingest_is_one_line_error(runs):
    _, (r,) = runs["validate_first"]
    assert error_line(r) == ("mlipops: error: data/ingested/frames.extxyz: "
                             "ingested frames missing: run `dvc repro ingest` first")


def test_minimal_params_control(runs):
    """The control for the params corpus: the same layout with nothing wrong runs."""
    root, (r,) = runs["params_ok"]
    assert_ok(r, "ingest")
    assert len(read_extxyz(root / "data/ingested/frames.extxyz")[0]) == 3


@pytest.mark.parametrize("name", list(PARAMS_ERRORS))
def test_invalid_params_is_one_line_error(runs, name):
    root, (r,) = runs[f"params:{name}"]
    prefix, contains = PARAMS_ERRORS[name]
    line = error_line(r)
    assert line.startswith("mlipops: error: " + prefix), line
    assert contains in line
    assert not (root / "data").exists()


def test_invalid_params_named_by_its_path_in_any_stage(runs):
    _, (r_validate, r_missing) = runs["params_path"]
    line = error_line(r_validate)
    assert line.startswith("mlipops: error: conf/custom.yaml: train.epochs: "), line
    assert "(got 'abc')" in line
    assert error_line(r_missing) == ("mlipops: error: nope.yaml: file not found "
                                     "(run from the project root or pass --params)")


# ----------------------------------------------------------------- quarantine release, recorded
def test_quarantine_release_round_trip(tmp_path):
    root = make_project(tmp_path, ["good.extxyz", "huge_force.extxyz"])
    assert_ok(mlipops(root, "ingest"), "ingest")
    assert_ok(mlipops(root, "validate"), "validate")
    q = pd.read_parquet(root / "data/curated/quarantine.parquet")
    hot = q[q["check"].str.contains("max_force")]
    assert len(hot) == 1
    fid = hot["frame_id"].iloc[0]
    n_acc = json.loads((root / "reports/validate/metrics.json").read_text())["n_accepted"]
    # an unknown frame and a missing reason are one-line errors; nothing is written
    assert "not in the quarantine" in error_line(mlipops(root, "quarantine", "release", "0" * 64, "--why", "x"))
    assert "say why" in error_line(mlipops(root, "quarantine", "release", fid, "--why", " "))
    assert not (root / "data/quarantine_releases.yaml").exists()
    r = mlipops(root, "quarantine", "release", fid[:16], "--why", "DFT rerun with tighter SCF gives the same force")
    assert r.returncode == 0, r.stderr
    assert "dvc repro" in r.stdout
    doc = yaml.safe_load((root / "data/quarantine_releases.yaml").read_text())
    (entry,) = doc["releases"]
    assert entry["frame_id"] == fid and entry["checks"] == ["max_force"] and "tighter SCF" in entry["why"]
    assert entry["released_at"] and entry["released_by"]
    assert_ok(mlipops(root, "validate"), "validate")
    m = json.loads((root / "reports/validate/metrics.json").read_text())
    assert m["n_accepted"] == n_acc + 1 and m["n_released"] == 1
    q2 = pd.read_parquet(root / "data/curated/quarantine.parquet")
    assert fid not in set(q2["frame_id"])
    assert "tighter SCF" in (root / "reports/validate/summary.md").read_text()
    listed = mlipops(root, "quarantine", "list", "--csv")
    assert listed.returncode == 0 and fid[:12] not in listed.stdout
