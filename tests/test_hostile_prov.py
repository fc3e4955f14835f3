"""Hostile inputs (issue 30), provenance and readers: forged provenance, concurrent releases, no echo of
files that are not structure files, clear reader errors (mlearn schema, content sniffing, .gz,
look-alike element symbols), a singular cell in ``hull check``.

Each test failed on the code before issue 30 and asserts the one-line error (exit 2, file/frame/field
named, no traceback) or the record kept. CLI runs go through ``python -m mlipops.cli`` in a temporary
project (the helpers of tests/test_bad_input.py).
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from ase import Atoms
from ase.build import bulk

from mlipops.errors import FrameFormatError
from mlipops.frames import frame_id, read_extxyz, read_frames, write_extxyz
from mlipops.oracles import get_oracle
from test_bad_input import error_line, make_project, mlipops

SECRET = "root:x:0:0:s3cr3t-Line:/root:/bin/bash\nhunter2:x:1:1::/:/bin/sh\n"


def _cu(a0: float = 3.61, shift: float = 0.0) -> Atoms:
    a = bulk("Cu", "fcc", a=a0, cubic=True)
    a.positions[0, 0] += shift
    return a


def _labelled(*atoms: Atoms) -> list[Atoms]:
    return get_oracle("emt").label(list(atoms))


# ------------------------------------------------------------------------------ 3: provenance
def _generate_params(root: Path) -> None:
    """The repository's params with a tiny generate recipe and the ingest sources used below."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["generate"].update({
        "crystals": {"isotropic_strains": [-0.02, 0.0, 0.02], "shear_strains": [0.02], "rattles_per_strain": 0,
                     "min_atoms": 4},
        "defects": {"vacancy_cells": 1, "vacancy_supercell": 2, "slab_size": [2, 2, 3], "slab_rattles": 0},
        "liquid": {"snapshots": 2, "equilibration_steps": 5, "interval": 2, "supercell": 2},
        "paths": {"adatom_points": 2, "dimer_points": 3}})
    params["ingest"]["sources"] = [{"path": "data/raw/cu_emt.extxyz"}, {"path": "raw/mine.extxyz"}]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _ingested(root: Path) -> tuple[list[Atoms], pd.DataFrame]:
    frames, bad = read_extxyz(root / "data/ingested/frames.extxyz")
    assert bad == []
    return frames, pd.read_parquet(root / "data/ingested/rejected.parquet")


def test_a_frame_cannot_fake_its_source_index_or_oracle(tmp_path):
    """Issue 30 item 3: `source=cu_emt source_index=7 oracle_name=emt` in a user's file is recorded as that
    file's frame, with no oracle; the claim is kept as file_*; generate's own frames keep their oracle
    (its manifest verifies), until one byte of the file changes."""
    root = make_project(tmp_path, [])
    _generate_params(root)
    r = mlipops(root, "generate")
    assert r.returncode == 0, r.stderr
    raw = root / "data/raw/cu_emt.extxyz"
    generated = read_extxyz(raw)[0]
    honest, forged = _labelled(_cu(3.55), _cu(3.58, shift=0.05))  # not duplicates of generated frames
    forged.info.update(source="cu_emt", source_index=7, oracle_name="emt", oracle_version="ase-0",
                       oracle_settings="{}", split="train", frame_id="f" * 64)
    for k in ("oracle_name", "oracle_version", "oracle_settings"):
        del honest.info[k]  # a user's own frame, no provenance claimed
    write_extxyz(root / "raw/mine.extxyz", [honest, forged])

    r = mlipops(root, "ingest")
    assert r.returncode == 0, r.stderr
    frames, rejected = _ingested(root)
    mine = [a for a in frames if a.info["source"] == "mine"]
    assert [a.info["source_index"] for a in mine] == [0, 1]
    f = mine[1]
    assert f.info["frame_id"] == frame_id(f) != "f" * 64
    assert not {"oracle_name", "oracle_version", "oracle_settings"} & set(f.info)
    assert (f.info["file_source"], f.info["file_source_index"], f.info["file_oracle_name"]) == ("cu_emt", 7, "emt")
    assert f.info["file_frame_id"] == "f" * 64 and f.info["file_split"] == "train"
    assert f.info["split"] in ("train", "val", "test", "unused")  # drawn by ingest, not the file's word
    ours = [a for a in frames if a.info["source"] == "cu_emt"]
    assert len(ours) + int((rejected["source"] == "cu_emt").sum()) == len(generated)
    assert all(a.info["oracle_name"] == "emt" and not any(k.startswith("file_") for k in a.info) for a in ours)
    claims = [(a.info["source"], a.info["source_index"]) for a in frames]
    claims += list(zip(rejected["source"], rejected["source_index"]))
    assert len(claims) == len(set(claims)) == len(generated) + 2  # no two frames claim one (source, index)
    manifest = json.loads((root / "data/raw/cu_emt.extxyz.provenance.json").read_text())
    assert manifest["writer"] == "mlipops generate" and [o["oracle_name"] for o in manifest["oracles"]] == ["emt"]
    assert "`oracle_*` kept from `data/raw/cu_emt.extxyz`" in (root / "reports/ingest/summary.md").read_text()

    # one byte of the generated file changed: its frames' oracle is no longer trusted
    from mlipops.frames import verified_manifest

    text = raw.read_text()
    raw.write_text(text.replace("config_type=", "config_type=x", 1))
    assert verified_manifest(raw) is None
    assert mlipops(root, "ingest").returncode == 0
    frames, _ = _ingested(root)
    first = [a for a in frames if a.info["source"] == "cu_emt" and a.info["source_index"] == 0][0]
    assert "oracle_name" not in first.info and first.info["file_oracle_name"] == "emt"


def test_two_sources_with_one_name_are_refused(tmp_path):
    """Frames are named (source, source_index) by the file's name: two files of one name cannot both be sources."""
    root = make_project(tmp_path, [])
    (root / "raw/a").mkdir(parents=True)
    (root / "raw/b").mkdir()
    write_extxyz(root / "raw/a/cu.extxyz", _labelled(_cu(3.55)))
    write_extxyz(root / "raw/b/cu.extxyz", _labelled(_cu(3.65)))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"]["sources"] = [{"path": "raw/a/cu.extxyz"}, {"path": "raw/b/cu.extxyz"}]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert error_line(mlipops(root, "ingest")) == (
        "mlipops: error: raw/b/cu.extxyz: ingest.sources[1] has the source name 'cu' (the file's name) of "
        "ingest.sources[0]: rename one file")
    assert not (root / "data/ingested").exists()


def test_check_numbers_frames_by_position_not_by_their_claim(tmp_path):
    """`mlipops check` reports frame k of the file, whatever source_index the frame claims."""
    a, b = _labelled(_cu(3.55), _cu(3.65))
    a.info["source_index"], b.info["source_index"] = 7, 7
    write_extxyz(tmp_path / "new.extxyz", [a, b])
    got, _ = read_frames(tmp_path / "new.extxyz")
    assert [(x.info["source"], x.info["source_index"], x.info["file_source_index"]) for x in got] == [
        ("new", 0, 7), ("new", 1, 7)]


# ------------------------------------------------------------------------------ 5: releases
RACER = """
import sys, time
from pathlib import Path
import yaml
import mlipops.quality.releases, mlipops.quality.validate
from mlipops.cli import main
me, other, ids, sync = sys.argv[1], sys.argv[2], sys.argv[3].split(","), Path(sys.argv[4])
dump = yaml.safe_dump
def slow(*a, **k):  # widen the read-modify-write window: unlocked, the two writes of a round overlap
    time.sleep(0.01)
    return dump(*a, **k)
yaml.safe_dump = slow
codes = []
for i, fid in enumerate(ids):
    (sync / f"{me}.{i}").touch()  # a barrier: both processes start round i together
    t = time.time()
    while not (sync / f"{other}.{i}").exists():
        if time.time() - t > 120:
            sys.exit("barrier timed out")
        time.sleep(0.0005)
    sys.argv = ["mlipops", "quarantine", "release", fid, "--why", f"round {i} by {me}"]
    try:
        main()
        codes.append(0)
    except SystemExit as exc:
        codes.append(exc.code)
print(codes)
"""


def test_thirty_synchronized_pairs_of_releases_keep_all_sixty(tmp_path):
    """Issue 30 item 5: two processes release different frames in 30 synchronized rounds; every release
    exits 0 and all 60 entries are kept (file lock + a temporary file per process)."""
    from mlipops.frames import Rejected
    from mlipops.quarantine import rejected_frame

    ids = [f"{k:02d}" + "ab" * 31 for k in range(60)]
    q = rejected_frame([Rejected("hot", k, "max_force", f"atom 0: |F| = {60 + k} eV/Å above 50.0 eV/Å",
                                 "1\n\nCu 0 0 0\n", fid, "liquid") for k, fid in enumerate(ids)])
    q["stage"] = "validate"
    (tmp_path / "data/curated").mkdir(parents=True)
    q.to_parquet(tmp_path / "data/curated/quarantine.parquet", index=False)
    (tmp_path / "sync").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLIPOPS_DEBUG"}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, me, other, ",".join(part), str(tmp_path / "sync")],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me, other, part in (("a", "b", ids[:30]), ("b", "a", ids[30:]))]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        lines = out.strip().splitlines()
        assert p.returncode == 0 and lines[-1] == str([0] * 30), (out[-2000:], err[-2000:])
        assert sum(x.startswith("released ") for x in lines) == 30 and err == ""
    doc = yaml.safe_load((tmp_path / "data/quarantine_releases.yaml").read_text())
    assert sorted(e["frame_id"] for e in doc["releases"]) == ids
    assert not [f.name for f in (tmp_path / "data").iterdir() if f.name.endswith(".tmp")]


# ------------------------------------------------------------------------------ 6: no echo
def _ingest(root: Path, source: dict, *, limit_memory: bool = False) -> str:
    """`mlipops ingest` of one source: its one-line error (nothing written)."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"]["sources"] = [source]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "MLIPOPS_DEBUG"}

    def cap():  # an unbounded read of /dev/zero fails at 2 GiB instead of taking the machine's memory
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    r = subprocess.run([sys.executable, "-m", "mlipops.cli", "ingest"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=120, preexec_fn=cap if limit_memory else None)
    line = error_line(r)
    assert not (root / "data/ingested").exists()
    return line


@pytest.mark.parametrize("name, content", [
    ("passwd.extxyz", SECRET),  # a text file that is no structure file (via a symlink, as /etc/passwd)
    ("blob.extxyz", "\x00\x01s3cr3t-Line binary\x00"),  # binary, no known magic
    ("long.extxyz", "s3cr3t-Line" + "A" * 2_000_000 + "\n"),  # one very long line
    ("notes.json", "s3cr3t-Line: not json\n"),
])
def test_a_file_that_is_not_a_structure_file_is_named_not_quoted(tmp_path, name, content):
    """Issue 30 item 6: the error names the file and what was expected; no byte of the file is printed."""
    root = make_project(tmp_path, [])
    target = tmp_path / "secret.txt"
    target.write_text(content)
    (root / "raw" / name).symlink_to(target)  # symlinks are followed: the target is judged, not quoted
    line = _ingest(root, {"path": f"raw/{name}"})
    assert line.startswith(f"mlipops: error: raw/{name}: not a structure file (expected extxyz, an ASE database "
                           "or mlearn JSON): found "), line
    assert line.endswith("(content not shown)")
    for word in ("s3cr3t", "root:x", "AAAA", "hunter2", "\\x00"):
        assert word not in line


def test_real_etc_passwd_through_a_symlink(tmp_path):
    if not Path("/etc/passwd").is_file():
        pytest.skip("no /etc/passwd")
    root = make_project(tmp_path, [])
    (root / "raw/users.extxyz").symlink_to("/etc/passwd")
    line = _ingest(root, {"path": "raw/users.extxyz", "format": "extxyz"})
    first = Path("/etc/passwd").read_text().split(":")[0]
    assert line == ("mlipops: error: raw/users.extxyz: not a structure file (expected extxyz, a first line with "
                    "the number of atoms): found other text (content not shown)")
    assert first not in line.split(":", 2)[2].replace("raw/users.extxyz", "")


def test_dev_zero_and_a_fifo_are_refused_before_reading(tmp_path):
    """/dev/zero exhausted memory; a FIFO blocked forever. Both: one line, nothing read."""
    root = make_project(tmp_path, [])
    line = _ingest(root, {"path": "/dev/zero", "format": "extxyz"}, limit_memory=True)
    assert line == ("mlipops: error: /dev/zero: not a regular file (a character device): expected a structure file "
                    "(extxyz, an ASE database or mlearn JSON)")
    os.mkfifo(root / "raw/pipe.extxyz")
    line = _ingest(root, {"path": "raw/pipe.extxyz"})
    assert line.startswith("mlipops: error: raw/pipe.extxyz: not a regular file (a FIFO)")
    (root / "raw/dir.extxyz").mkdir()
    with pytest.raises(FrameFormatError, match=r"dir.extxyz: not a regular file \(a directory\)"):
        read_frames(root / "raw/dir.extxyz")


# ------------------------------------------------------------------------------ 7: readers
def _mo(**over) -> dict:
    doc = {"structure": {"lattice": {"matrix": [[3.2, 0, 0], [0, 3.2, 0], [0, 0, 3.2]]},
                         "sites": [{"species": [{"element": "Mo", "occu": 1}], "xyz": [0, 0, 0]},
                                   {"species": [{"element": "Mo", "occu": 1}], "abc": [0.5, 0.5, 0.5]}]},
           "outputs": {"energy": -21.5, "forces": [[0.1, 0, 0], [-0.1, 0, 0]]}, "group": "Bulk"}
    doc.update(over)
    return doc


def test_mlearn_wrong_schema_names_entry_and_field(tmp_path):
    bad_sites = _mo()
    bad_sites["structure"]["sites"][1]["species"] = "Mo"
    bad_xyz = _mo()
    bad_xyz["structure"]["sites"][0]["xyz"] = [0, 0, "zero"]
    docs = [_mo(), _mo(structure="Mo2"), bad_sites, bad_xyz, _mo(outputs={"energy": "-21.5"}),
            _mo(outputs={"forces": [[0, 0, 0]]}), 7]
    (tmp_path / "mo.json").write_text(json.dumps(docs))
    frames, rejected = read_frames(tmp_path / "mo.json")
    assert len(frames) == 1
    p = tmp_path / "mo.json"
    assert [r.reason for r in rejected] == [
        f"{p}: entry 1: field 'structure': expected an object (a pymatgen Structure dict), found a string",
        f"{p}: entry 2: field 'structure.sites[1].species': expected a non-empty list of {{\"element\": ...}}, "
        "found a string",
        f"{p}: entry 3: field 'structure.sites[0].xyz[2]': expected a number, found a string",
        f"{p}: entry 4: field 'outputs.energy': expected a number (eV), found a string",
        f"{p}: entry 5: field 'outputs.forces': expected a list of 2 lists of 3 numbers, found a list of 1",
        f"{p}: entry 6: field 'entry': expected an object (an mlearn entry with 'structure' and 'outputs'), "
        "found a number"]
    assert [r.source_index for r in rejected] == [1, 2, 3, 4, 5, 6]


def test_extxyz_named_json_is_read_by_its_content(tmp_path):
    frames = _labelled(_cu(3.55), _cu(3.65))
    write_extxyz(tmp_path / "cu.extxyz", frames)
    (tmp_path / "cu.json").write_text((tmp_path / "cu.extxyz").read_text())
    got, bad = read_frames(tmp_path / "cu.json")
    assert bad == [] and [a.info["frame_id"] for a in got] == [a.info["frame_id"] for a in read_frames(
        tmp_path / "cu.extxyz")[0]]
    assert got[0].info["source"] == "cu"
    # format given as extxyz, content JSON: said so, not parsed as extxyz
    (tmp_path / "mo.extxyz").write_text(json.dumps([_mo()]))
    with pytest.raises(FrameFormatError) as info:
        read_frames(tmp_path / "mo.extxyz", "extxyz")
    assert str(info.value) == (f"{tmp_path / 'mo.extxyz'}: not extxyz: it looks like JSON (set its format to auto, "
                               "db or mlearn_json)")


def test_gz_is_read_transparently_and_errors_name_the_gz(tmp_path, monkeypatch):
    frames = _labelled(_cu(3.55), _cu(3.65))
    write_extxyz(tmp_path / "cu.extxyz", frames)
    data = (tmp_path / "cu.extxyz").read_bytes()
    (tmp_path / "cu.extxyz.gz").write_bytes(gzip.compress(data))
    got, bad = read_frames(tmp_path / "cu.extxyz.gz")
    assert bad == [] and [a.info["frame_id"] for a in got] == [frame_id(a) for a in frames]
    assert {a.info["source"] for a in got} == {"cu"}
    # a frame the reader rejects: its reason names the .gz file
    bad_text = data.decode().replace("Cu ", "Xx ", 1)
    (tmp_path / "bad.extxyz.gz").write_bytes(gzip.compress(bad_text.encode()))
    got, bad = read_frames(tmp_path / "bad.extxyz.gz")
    assert [r.reason for r in bad] == [f"{tmp_path / 'bad.extxyz.gz'} frame 0: unknown element or missing key 'Xx' "
                                       "(field 'species')"]
    # a whole-file error names the .gz file, not a temporary one
    (tmp_path / "trunc.extxyz.gz").write_bytes(gzip.compress(data.decode().rsplit("\n", 3)[0].encode() + b"\n"))
    with pytest.raises(FrameFormatError) as info:
        read_frames(tmp_path / "trunc.extxyz.gz")
    assert info.value.file == str(tmp_path / "trunc.extxyz.gz") and "truncated?" in info.value.detail
    assert "mlipops-gz" not in str(info.value)
    (tmp_path / "cut.extxyz.gz").write_bytes(gzip.compress(data)[:-20])
    with pytest.raises(FrameFormatError, match=r"cut.extxyz.gz: truncated \(the gzip stream ends early\)"):
        read_frames(tmp_path / "cut.extxyz.gz")
    (tmp_path / "plain.extxyz.gz").write_bytes(data)
    with pytest.raises(FrameFormatError, match="plain.extxyz.gz: not gzip-compressed, though named .gz$"):
        read_frames(tmp_path / "plain.extxyz.gz")
    (tmp_path / "secret.gz").write_bytes(gzip.compress(SECRET.encode()))
    with pytest.raises(FrameFormatError) as info:
        read_frames(tmp_path / "secret.gz")
    assert "s3cr3t" not in str(info.value) and "secret.gz: not a structure file" in str(info.value)
    monkeypatch.setattr("mlipops.frames.MAX_DECOMPRESSED", 1000)  # a gzip bomb stops at the cap
    with pytest.raises(FrameFormatError, match=r"cu.extxyz.gz: decompresses to more than .* GiB"):
        read_frames(tmp_path / "cu.extxyz.gz")


def test_cyrillic_element_symbol_is_named(tmp_path):
    (a,) = _labelled(_cu())
    write_extxyz(tmp_path / "cu.extxyz", [a])
    text = (tmp_path / "cu.extxyz").read_text().replace("\nCu ", "\n\u0421u ", 1)  # Cyrillic Es, Latin u
    (tmp_path / "cyr.extxyz").write_text(text)
    frames, rejected = read_frames(tmp_path / "cyr.extxyz")
    assert frames == [] and [r.reason for r in rejected] == [
        f"{tmp_path / 'cyr.extxyz'} frame 0: field 'species': '\u0421u' is not an element "
        "(contains non-ASCII character U+0421 — a Cyrillic letter?)"]


# ------------------------------------------------------------------------------ hull check
@pytest.fixture(scope="module")
def small_index(tmp_path_factory) -> Path:
    from mlipops.index.build import build_index
    from mlipops.quarantine import rejected_frame
    from mlipops.params import DescriptorParams, IndexParams

    d = tmp_path_factory.mktemp("index")
    frames = _labelled(_cu().repeat(2), _cu(3.65).repeat(2))
    for k, a in enumerate(frames):
        a.info.update(frame_id=frame_id(a), source="unit", source_index=k, config_type="crystal_fcc", split="train")
    write_extxyz(d / "accepted.extxyz", frames)
    rejected_frame([]).to_parquet(d / "quarantine.parquet", index=False)
    build_index(IndexParams(), DescriptorParams(), d / "accepted.extxyz", d / "quarantine.parquet", d / "index.duckdb")
    return d / "index.duckdb"


@pytest.mark.parametrize("cell, pbc", [
    ([[3.6, 0, 0], [0, 3.6, 0], [0, 0, 0]], "T T T"),  # zero volume: 'box matrix is not invertible'
    ([[3.6, 0, 0], [3.6, 0, 0], [0, 0, 3.6]], "T T F"),  # two equal periodic vectors: vesin died of SIGFPE
])
def test_hull_check_on_a_singular_cell_is_one_line(tmp_path, small_index, cell, pbc):
    lattice = " ".join(str(x) for row in cell for x in row)
    good = _cu()
    write_extxyz(tmp_path / "s.extxyz", [good])
    text = (tmp_path / "s.extxyz").read_text()
    bad = f'2\nLattice="{lattice}" Properties=species:S:1:pos:R:3 pbc="{pbc}"\nCu 0 0 0\nCu 1.8 1.8 0\n'
    (tmp_path / "s.extxyz").write_text(text + bad)
    r = subprocess.run([sys.executable, "-m", "mlipops.cli", "hull", "check", "s.extxyz", "--db", str(small_index)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert error_line(r) == (f"mlipops: error: s.extxyz: frame 1: field 'cell': cell is singular (volume 0) with "
                             f"periodic boundaries (pbc {pbc}): periodic cell vectors zero or linearly dependent")
