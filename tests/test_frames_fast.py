"""The fast extxyz frame reader (:func:`mlipops.frames._read_frame`) gives exactly what ASE's reader gives.

Every frame is read both ways, ``ase.io.read(StringIO(raw), format="extxyz")`` and the fast path: either both
raise the same error, or the two Atoms agree bit for bit (numbers, positions, cell, pbc, info with its types,
per-atom arrays, calculator results, constraints). The corpus: the hostile-input files of ``tests/data/bad``,
frames ASE writes from atoms carrying every kind of info value, hand-written comment lines that must take the
fallback, and seeded random mutations of a comment line.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from mlipops.frames import _comment_dict, _lines, _read_frame, _split_extxyz

BAD = Path(__file__).parent / "data" / "bad"


def _same(a, b, where=""):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), where
        assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype, a.shape, b.shape)
        assert a.tobytes() == b.tobytes() or (a.dtype == object and a.tolist() == b.tolist()), where
    elif isinstance(a, float) and np.isnan(a):
        assert type(a) is type(b) and np.isnan(b), where
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


def _same_atoms(a: Atoms, b: Atoms) -> None:
    _same(a.numbers, b.numbers, "numbers")
    _same(a.positions, b.positions, "positions")
    _same(a.cell.array, b.cell.array, "cell")
    _same(a.pbc, b.pbc, "pbc")
    assert list(a.info) == list(b.info)
    for k in a.info:
        if isinstance(a.info[k], list):
            assert a.info[k] == b.info[k] and [type(x) for x in a.info[k]] == [type(x) for x in b.info[k]], k
        else:
            _same(a.info[k], b.info[k], f"info[{k}]")
    assert sorted(a.arrays) == sorted(b.arrays)
    for k in a.arrays:
        _same(a.arrays[k], b.arrays[k], f"arrays[{k}]")
    ra, rb = (getattr(x.calc, "results", None) or {} for x in (a, b))
    assert sorted(ra) == sorted(rb)
    for k in ra:
        _same(np.asarray(ra[k]), np.asarray(rb[k]), f"results[{k}]")
    assert [repr(c) for c in a.constraints] == [repr(c) for c in b.constraints]


def _check(raw: str) -> None:
    try:
        want = ase.io.read(io.StringIO(raw), format="extxyz")
    except Exception as exc:  # noqa: BLE001 -- whatever ASE raises, the fast path must raise too
        with pytest.raises(Exception) as got:
            _read_frame(raw)
        assert str(got.value).splitlines()[0] == str(exc).splitlines()[0] or type(got.value) is type(exc)
        return
    _same_atoms(_read_frame(raw), want)


def _frames(path: Path) -> list[str]:
    with path.open("rb") as fh:
        try:
            return [raw for _, _, raw in _split_extxyz(_lines(fh, str(path)), str(path))]
        except Exception:  # noqa: BLE001 -- a file the splitter refuses as a whole is not a frame test
            return []


@pytest.mark.parametrize("path", sorted(BAD.glob("*.extxyz")), ids=lambda p: p.name)
def test_hostile_corpus_reads_as_ase_reads_it(path):
    for raw in _frames(path):
        _check(raw)


def _written(atoms: Atoms) -> str:
    buf = io.StringIO()
    ase.io.write(buf, atoms, format="extxyz")
    return buf.getvalue()


def test_frames_ase_writes_with_every_kind_of_info():
    rng = np.random.default_rng(0)
    a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    a.set_cell(a.cell.array @ np.array([[1, 0.1, 0], [0, 1, 0.05], [0.02, 0, 1]]), scale_atoms=True)  # not symmetric
    a.rattle(0.05, seed=1)
    a.info.update(config_type="crystal_fcc", temperature_K=300.0, n=7, flag=True, off=False,
                  vec=np.array([1.5, -2.0, 3e-12]), ivec=np.array([1, 2, 3]), bvec=np.array([True, False]),
                  name="a b", settings='{"kpts": [4, 4, 4], "xc": "PBE"}', empty="", uid="0012",
                  big=12345678901234567890, tiny=1e-300, neg=-0.0, sci="1e5", word="nan", huge=float("inf"),
                  excited_energies=np.array([0.5]), quoted='say "hi"', braces="{x}", eq="a=b")
    a.new_array("charges_extra", rng.normal(size=len(a)))
    a.new_array("vel", rng.normal(size=(len(a), 3)))
    a.calc = SinglePointCalculator(a, energy=-3.25, forces=rng.normal(size=(len(a), 3)),
                                   stress=rng.normal(size=6))
    _check(_written(a))
    b = a.copy()
    b.set_constraint(FixAtoms(indices=[0, 3]))
    b.calc = SinglePointCalculator(b, energy=1.0, forces=np.zeros((len(b), 3)))
    _check(_written(b))
    c = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])  # no cell, no pbc
    _check(_written(c))
    d = bulk("Mo", "bcc", a=3.16).repeat((2, 1, 1))
    d.pbc = [True, False, True]
    d.new_array("tags2", np.array([1, 2], dtype=int))
    d.set_initial_magnetic_moments([1.0, -1.0])
    _check(_written(d))


@pytest.mark.parametrize("comment", [
    "",
    "plain xyz comment",
    'Lattice="2 0 0 0 2 0 0 0 2" Properties=species:S:1:pos:R:3',
    'Lattice="2 0 0 0 2 0 0 0 2" Properties=species:S:1:pos:R:3 pbc="F F F"',
    'Lattice="2 0 0 0 2 0 0 0" Properties=species:S:1:pos:R:3',
    'Lattice="2 0 0 0 2 0 0 0 x" Properties=species:S:1:pos:R:3',
    "Properties=species:S:1:pos:R:3 energy=1.0 energy=2",
    "Properties=species:S:1:pos:R:3 energy=abc",
    "Properties=species:S:1:pos:R:3 energy=1.0 stress=\"1 2 3 4 5 6\"",
    "Properties=species:S:1:pos:R:3 energy=1.0 stress=\"1 2 3 2 5 6 3 6 9\"",
    "Properties=species:S:1:pos:R:3 key key2 =x a= b",
    "Properties=species:S:1:pos:R:3 a=b=c",
    "Properties=species:S:1:pos:R:3 x='single quoted' y={1 2 3} z=[4,5]",
    'Properties=species:S:1:pos:R:3 esc="a \\" b" t=T f=F tt="T F T" TRUE=true',
    "Properties=species:S:1:pos:R:3 n=1,2,3 big=99999999999999999999 hex=0x10 u=1_000 inf=inf",
    'Properties=species:S:1:pos:R:3 json="_JSON {\\"a\\": [1, 2]}"',
    "Properties=Z:I:1:pos:R:3",
    "Properties=species:S:1:pos:R:3:move_mask:L:1",
    "Properties=species:S:1:pos:R:3:forces:R:3",
    "Properties=species:S:1:pos:R:2",
    "Properties=species:S:1:pos:R:3:tag:I:1",
    "Properties=pos:R:3:species:S:1",
    "Properties=species:S:1:pos:X:3",
    "Properties=species:S:1:pos:R:3:forces:R:3:forces:R:3",
    "Properties=species:S:1",
    'Properties="species:S:1:pos:R:3" config_type="crystal fcc"',
    "  Properties=species:S:1:pos:R:3   trailing=1   ",
    "Properties=species:S:1:pos:R:3 \u00e9t\u00e9=2",
])
def test_comment_lines_and_columns(comment):
    cols = 7 if "forces" in comment else 4
    if "move_mask" in comment or "tag" in comment:
        cols = 5
    if "pos:R:2" in comment:
        cols = 3
    if comment.startswith("Properties=species:S:1") and comment.endswith("species:S:1"):
        cols = 1
    lines = []
    for i, sym in enumerate(["Cu", "cu", "CU"]):
        if comment.startswith("Properties=Z"):
            tokens = ["29", f"{i * 1.1}", "0.5", "-0.25"]
        elif comment.startswith("Properties=pos"):
            tokens = [f"{i * 1.1}", "0.5", "-0.25", sym]
        else:
            tokens = [sym, f"{i * 1.1}", "0.5", "-0.25", "1.0", "-2e-3", "3"][:cols]
            if cols == 5:
                tokens[4] = "T" if "move_mask" in comment else "4"
        lines.append("  ".join(tokens))
    _check(f"3\n{comment}\n" + "\n".join(lines) + "\n")


@pytest.mark.parametrize("atom_lines", [
    ["Cu 0 0 0", "Cu 1 1 1 extra"],
    ["Cu 0 0 0", "Cu 1 1"],
    ["Cu 0 0 0", "Cu 1 1 x"],
    ["Cu 0 0 0", "Xx 1 1 1"],
    ["Cu 0 0 0", "Cu nan inf 1"],
    ["Cu 0 0 0"],
])
def test_atom_lines(atom_lines):
    _check("2\nLattice=\"3 0 0 0 3 0 0 0 3\" Properties=species:S:1:pos:R:3\n" + "\n".join(atom_lines) + "\n")


def test_random_comment_mutations():
    """Seeded mutations of a real comment line (characters deleted, doubled, swapped for quotes, braces,
    backslashes, '=' and spaces): the fast comment parser and ASE's agree on every one."""
    from ase.io.extxyz import key_val_str_to_dict

    base = ('Lattice="5.76 -0.05 0.03 -0.05 5.64 0.04 0.05 0.07 8.34" Properties=species:S:1:pos:R:3:forces:R:3 '
            'config_type=crystal_bcc temperature_K=354.3 oracle_settings="{}" energy=2.49 '
            'stress="-0.05 -0.01 0.01 -0.01 -0.04 0.01 0.01 0.01 -0.04" pbc="T T T" n=3 flag')
    rng = random.Random(0)
    alphabet = ' "\'{}[]=\\,_-.eT0x'
    for _ in range(3000):
        s = list(base)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(s))
            op = rng.random()
            if op < 0.4:
                s[i] = rng.choice(alphabet)
            elif op < 0.7:
                del s[i]
            else:
                s.insert(i, rng.choice(alphabet))
        line = "".join(s)
        try:
            want = key_val_str_to_dict(line)
        except Exception as exc:  # noqa: BLE001
            with pytest.raises(type(exc)):
                _comment_dict(line)
            continue
        got = _comment_dict(line)
        assert list(got) == list(want), line
        for k in want:
            if isinstance(want[k], list):
                assert got[k] == want[k], line
            else:
                _same(got[k], want[k], f"{line!r}: {k}")


@pytest.mark.parametrize("name", ["Mo_training", "Mo_test", "Li_training", "Li_test"])
def test_real_dft_files_read_as_ase_reads_them(u_mlearn_dir, name):
    """Every frame of the real mlearn DFT sets (VASP/PBE, with descriptions, temperatures and a quoted
    virial_stress_kbar on the comment line) reads bit for bit as ASE reads it."""
    frames = _frames(u_mlearn_dir / f"{name}.extxyz")
    assert len(frames) > 20
    for raw in frames:
        _check(raw)


# ------------------------------------------------------------------ the reader and canonicalize in one step
def _check_canonical(raw: str) -> bool:
    """``_read_canonical`` gives what canonicalize gives for ASE's reading of the frame (for a user's file: no
    key trusted, and for mlipops' own: every provenance key), or None (the general path then decides). True when
    the one-step path took the frame."""
    from mlipops.frames import PROVENANCE_KEYS, _read_canonical, canonicalize

    took = []
    for trust in ((), PROVENANCE_KEYS):
        got = _read_canonical(raw, "src", 3, "dflt", trust, None)
        try:
            want = canonicalize(ase.io.read(io.StringIO(raw), format="extxyz"), source="src", source_index=3,
                                default_config_type="dflt", trust=trust)
        except Exception:  # noqa: BLE001 -- a frame the general path rejects is never taken by the fast one
            assert got is None
            continue
        if got is not None:
            _same_atoms(got, want)
            took.append(True)
    return bool(took)


@pytest.mark.parametrize("path", sorted(BAD.glob("*.extxyz")), ids=lambda p: p.name)
def test_hostile_corpus_canonical_in_one_step(path):
    for raw in _frames(path):
        _check_canonical(raw)


def test_pipeline_frames_canonical_in_one_step(tmp_path):
    """Frames as ingest writes them (energy, forces, 3x3 stress, provenance, a 1-element state array, a claimed
    source) take the one-step path and come out bit for bit as the general path gives them; frames it does not
    handle (another per-frame quantity, extra per-atom columns) still agree through the fallback."""
    from mlipops.frames import write_extxyz

    rng = np.random.default_rng(3)
    frames = []
    for k, (sym, a0) in enumerate([("Cu", 3.6), ("Mo", 3.16), ("Li", 3.44)]):
        at = bulk(sym, "bcc" if sym != "Cu" else "fcc", a=a0).repeat(2)
        at.rattle(0.05, seed=k)
        at.info.update(config_type="crystal", split="train", source="cu_emt", source_index=k, oracle_name="emt",
                       oracle_version="ase-3.29.0", oracle_settings="{}", temperature_K=300.0 + k,
                       excited_energies=np.array([0.5]), frame_id="x" * 64)
        at.calc = SinglePointCalculator(at, energy=-3.25 * (k + 1), forces=rng.normal(size=(len(at), 3)),
                                        stress=rng.normal(size=6))
        frames.append(at)
    slab = frames[0].copy()
    slab.pbc = [True, True, False]
    slab.calc = SinglePointCalculator(slab, energy=1.0, forces=np.zeros((len(slab), 3)))
    frames.append(slab)
    path = tmp_path / "f.extxyz"
    write_extxyz(path, frames)
    taken = [_check_canonical(raw) for raw in _frames(path)]
    assert all(taken), taken
    free = frames[1].copy()
    free.calc = SinglePointCalculator(free, free_energy=2.0, forces=np.zeros((len(free), 3)))
    free.new_array("vel", rng.normal(size=(len(free), 3)))
    _check_canonical(_written(free))


def test_token_kinds_are_what_numpy_makes_of_them():
    """A token called "i" casts to the same int64 as numpy's str cast, "f" to the same float64 (bit for bit),
    and "s" is refused by both casts: the comment parser may skip numpy for them."""
    from mlipops.frames import _token_kind

    rng = random.Random(1)
    tokens = ["0", "-0", "+7", "007", "123456789012345678", "1234567890123456789", "1.", ".5", "-.5e-3", "1e5",
              "1E+300", "1e400", "2.4955674414388938", "-0.055309238495536275", "nan", "-inf", "Infinity", "1_000",
              "crystal_bcc", "emt", "ase-3.29.0", "{}", "T", "F", "e", "E5", "0x10", "1.5d0", "a3f9", "\u0661\u0662",
              "--1", "1-", "+-1", ".", "e-", "inF"]
    for _ in range(3000):
        n = rng.randint(1, 12)
        tokens.append("".join(rng.choice("0123456789+-.eE_xTa") for _ in range(n)))
        tokens.append(repr(rng.uniform(-1e3, 1e3) * 10 ** rng.randint(-30, 30)))
    seen = set()
    for t in tokens:
        kind = _token_kind(t)
        seen.add(kind)
        try:
            as_int = np.array([t], dtype=int)
        except (ValueError, OverflowError):
            as_int = None
        try:
            as_float = np.array([t], dtype=float)
        except (ValueError, OverflowError):
            as_float = None
        if kind == "i":
            assert as_int is not None and as_int[0] == int(t) and as_int.dtype == np.array([int(t)]).dtype, t
        elif kind == "f":
            assert as_int is None and as_float is not None, t
            assert np.array([float(t)]).tobytes() == as_float.tobytes(), t
        elif kind == "s":
            assert as_int is None and as_float is None, t
    assert seen == {"i", "f", "s", None}


# ------------------------------------------------------------------ the writer: ASE's bytes
def _ase_written(atoms: Atoms) -> str:
    buf = io.StringIO()
    ase.io.write(buf, atoms, format="extxyz")
    return buf.getvalue()


def _check_written(atoms: Atoms) -> bool:
    """to_extxyz_string gives ASE's bytes (or ASE's error); True when the fast writer took the frame."""
    from mlipops.frames import _fast_extxyz, to_extxyz_string

    try:
        want = _ase_written(atoms)
    except Exception:  # noqa: BLE001 -- what ASE cannot write, the fast writer leaves to it
        assert _fast_extxyz(atoms) is None
        return False
    assert to_extxyz_string(atoms) == want
    return _fast_extxyz(atoms) is not None


def test_writer_gives_ases_bytes_for_pipeline_frames(u_mlearn_dir):
    """Frames as the pipeline holds them (read from extxyz, canonical, with provenance and a split) are written
    by the fast writer, byte for byte as ASE writes them: the mlearn DFT sets and EMT frames of several kinds."""
    from mlipops.frames import read_extxyz

    taken = []
    for name in ("Mo_training", "Li_test"):
        frames, _ = read_extxyz(u_mlearn_dir / f"{name}.extxyz", trust=())
        for k, a in enumerate(frames[:40]):
            a.info["split"] = ("train", "val", "\x00SPLIT\x00")[k % 3]
            taken.append(_check_written(a))
    rng = np.random.default_rng(5)
    for k, (sym, lat, a0) in enumerate([("Cu", "fcc", 3.6), ("Mo", "bcc", 3.16), ("Mg", "hcp", 3.2), ("H", "sc", 2.0)]):
        at = bulk(sym, lat, a=a0).repeat(2)
        at.rattle(0.05, seed=k)
        at.info.update(config_type="x y" if k == 1 else "crystal", temperature_K=300.0 + k, n=np.int64(k),
                       flag=bool(k % 2), vec=np.array([1.5, -2.0, 3e-12]), oracle_settings='{"a": 1}')
        at.calc = SinglePointCalculator(at, energy=-3.25 * (k + 1), forces=rng.normal(size=(len(at), 3)),
                                        stress=rng.normal(size=6))
        taken.append(_check_written(at))
        bare = at.copy()  # no labels, a slab
        bare.pbc = [True, True, False]
        taken.append(_check_written(bare))
    assert all(taken), taken


def test_writer_leaves_other_frames_to_ase(u_rng):
    """Frames the fast writer does not handle (constraints, extra per-atom arrays, other results, nested or None
    info values, a 3x3 info array, no cell) still come out as ASE writes them."""
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.calc = SinglePointCalculator(a, energy=1.0, forces=u_rng.normal(size=(len(a), 3)))
    variants = []
    b = a.copy()
    b.set_constraint(FixAtoms(indices=[0]))
    variants.append(b)
    c = a.copy()
    c.new_array("vel", u_rng.normal(size=(len(c), 3)))
    variants.append(c)
    d = a.copy()
    d.calc = SinglePointCalculator(d, energy=1.0, free_energy=0.5, magmom=0.0)
    variants.append(d)
    for value in ({"a": 1}, None, [1, 2], np.eye(3), np.float64(np.nan), "quote\"d", ""):
        e = a.copy()
        e.info["x"] = value
        variants.append(e)
    variants.append(Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]))
    for v in variants:
        _check_written(v)
