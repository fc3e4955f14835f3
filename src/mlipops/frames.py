"""The canonical frame: schema, readers, writer, content hash, units.

A frame is an :class:`ase.Atoms` whose ``info`` holds

- ``frame_id``: sha256 of species, positions, cell and pbc rounded to 1e-6 (see :func:`frame_id`),
- ``config_type``, ``source``, ``source_index`` (position in its source file),
- ``oracle_name``, ``oracle_version``, ``oracle_settings`` (JSON) where the labels came from,
- optional ``temperature_K``, ``split``,
- from an oracle with excited states (:mod:`mlipops.oracles.pyscf`): ``bo_gap`` (ΔE₀₁ = E₁ − E₀, eV),
  ``excited_energies`` (eV, total energies of roots 1…n−1) and ``state_spin_square`` (⟨S²⟩ of roots
  0…n−1), both 1-D arrays; from ``mlipops generate bo-scan`` also ``bo_epsilon`` (eV),
  ``bo_breakdown`` (bool) and ``path_coordinate`` (Å),

and whose labels sit in a :class:`~ase.calculators.singlepoint.SinglePointCalculator`
(``energy`` eV total, ``forces`` eV/Å, ``stress`` eV/Å³ in ASE's sign and Voigt order).

Units are ASE's throughout. Readers never crash on a bad frame: a frame that cannot be parsed is
returned as a :class:`Rejected` record carrying its raw text, so nothing read is ever lost.

Provenance comes from the pipeline, never from a user's file. ``frame_id``, ``source``,
``source_index``, ``split`` and ``oracle_*`` (:data:`PROVENANCE_KEYS`) say where a frame came from;
a frame's ``info`` could claim anything (``source=cu_emt source_index=7 oracle_name=emt`` in a file
of one's own). So :func:`read_frames`, the reader of files a user names (``ingest.sources``,
``mlipops check``, ``hull check``, ``registry load -s``), sets ``frame_id`` from the content,
``source`` from the file's name and ``source_index`` from the frame's position, and leaves
``oracle_*`` and ``split`` unset; a value the file gave under one of these keys is kept as
``file_<key>`` (``file_source=cu_emt``) when it differs from the pipeline's, for the record only.
The one exception is verifiable: a file that ``mlipops generate``, ``generate bo-scan`` or
``active run`` wrote gets a manifest next to it, ``<file>.provenance.json`` (:func:`write_manifest`),
with the md5 of the bytes written, the writer and the oracle(s) that labelled them. When the file's
md5 still equals the manifest's (:func:`verified_manifest`), mlipops itself wrote those exact bytes,
so the frames' ``oracle_*`` are kept; ``source`` and ``source_index`` are still the pipeline's. Edit
one byte of the file and its oracle is no longer trusted (moved to ``file_oracle_*``). A manifest is
an integrity record against a forged or mislabelled frame, not a signature: whoever can write both
files can forge both. mlipops' own intermediates (``data/ingested``, ``data/curated``, an active
campaign's candidates and labels) are read with :func:`read_extxyz`, which keeps these keys
(``trust=PROVENANCE_KEYS``, its default): only mlipops writes them.

A file a user names is checked before it is read: it must be a regular file (a symlink is followed
and its target checked: ``/dev/zero``, a FIFO or a directory is refused in one line before any byte
is read), its first 4 KiB decide the format when ``format`` is ``auto`` (``[``/``{``: JSON, a
number: extxyz, the SQLite header: an ASE database; the suffix only breaks ties; any other file is
given to the ``ase.io`` format ASE's own detection names, by the file's name (``OUTCAR``,
``vasprun.xml``), first bytes (``.traj``, QE's ``Program PWSCF``) or suffix (``.pwo``, ``.out``), and
read by :func:`iter_ase`; ``format`` may also name any ``ase.io`` format), ``.gz`` is
decompressed (at most :data:`MAX_DECOMPRESSED` bytes), and no error quotes a byte of a file that is
not a structure file (an ``/etc/passwd`` named ``x.extxyz`` is "not a structure file", nothing more).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io.extxyz import escape as ase_escape  # the writer's quoting, byte for byte ASE's
from ase.units import GPa

from mlipops.errors import FrameFormatError, MlipopsError, StageInputError
from mlipops.paths import atomic_path, atomic_write_text
from mlipops.pipeline import ACCEPTED

# mlipops' own info keys; everything else a source carries is kept as it is.
INFO_KEYS = ("frame_id", "config_type", "source", "source_index", "split", "oracle_name",
             "oracle_version", "oracle_settings", "temperature_K", "bo_gap", "bo_epsilon", "bo_breakdown",
             "excited_energies", "state_spin_square")
# per-state info values: always 1-D arrays (extxyz reads a one-element array back as a scalar)
_STATE_ARRAYS = ("excited_energies", "state_spin_square")
_ROUND = 1e-6
# where a frame came from: set by the pipeline; a file's own values are kept as file_<key> (module doc)
PROVENANCE_KEYS = ("frame_id", "source", "source_index", "split", "oracle_name", "oracle_version",
                   "oracle_settings")
ORACLE_KEYS = ("oracle_name", "oracle_version", "oracle_settings")
MANIFEST_SUFFIX = ".provenance.json"
MANIFEST_FORMAT = "mlipops.frames.manifest/1"
MAX_DECOMPRESSED = 4 << 30  # bytes a .gz source may decompress to (a gzip bomb stops here)
_HEAD = 4096  # bytes read to tell a file's format (and all that is read of a file that is not one)


@dataclass
class Rejected:
    """A frame read from a source but not usable as a structure (kept, never dropped)."""

    source: str
    source_index: int
    check: str
    reason: str
    raw: str
    frame_id: str | None = None
    config_type: str | None = None


def frame_id(atoms: Atoms) -> str:
    """Content hash of a structure: sha256 over species, positions, cell and pbc, rounded to 1e-6 Å."""
    h = hashlib.sha256()
    h.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    h.update(np.rint(np.asarray(atoms.positions, dtype=np.float64) / _ROUND).astype(np.int64).tobytes())
    h.update(np.rint(np.asarray(atoms.cell.array, dtype=np.float64) / _ROUND).astype(np.int64).tobytes())
    h.update(np.asarray(atoms.pbc, dtype=np.int8).tobytes())
    return h.hexdigest()


def labels(atoms: Atoms) -> tuple[float | None, np.ndarray | None, np.ndarray | None]:
    """(energy, forces, stress) of a frame, None where absent. Never triggers a calculation."""
    calc = atoms.calc
    res = getattr(calc, "results", None) or {}
    energy = res.get("energy", res.get("free_energy"))
    forces = res.get("forces")
    stress = res.get("stress")
    if stress is not None:
        stress = np.asarray(stress, dtype=float)
        if stress.shape == (3, 3):
            stress = stress.reshape(9)[[0, 4, 8, 5, 2, 1]]
    if energy is not None:
        try:
            energy = float(energy)
        except (TypeError, ValueError):
            raise ValueError(f"field 'energy' is not a number: {energy!r}") from None
    return (energy,
            None if forces is None else np.asarray(forces, dtype=float), stress)


def set_labels(atoms: Atoms, energy: float | None, forces: np.ndarray | None,
               stress: np.ndarray | None = None) -> Atoms:
    results = {}
    if energy is not None:
        results["energy"] = float(energy)
    if forces is not None:
        results["forces"] = np.asarray(forces, dtype=float)
    if stress is not None:
        results["stress"] = np.asarray(stress, dtype=float)
    atoms.calc = SinglePointCalculator(atoms, **results) if results else None
    return atoms


# stress in a frame's own field (an extxyz info key such as mlearn's ``virial_stress_kbar``, a VASP habit):
# its units, sign and Voigt order, converted to ASE's stress (eV/Å³, tensile positive, xx yy zz yz xz xy)
STRESS_UNITS = {"eV/A3": 1.0, "GPa": GPa, "kbar": 0.1 * GPa}  # 1 kbar = 0.1 GPa; ase.units.GPa in eV/Å³
STRESS_ORDERS = {"ase": (0, 1, 2, 3, 4, 5),  # xx yy zz yz xz xy (ASE, Voigt)
                 "vasp": (0, 1, 2, 4, 5, 3)}  # given xx yy zz xy yz zx (VASP's OUTCAR/vasprun, mlearn): reordered


def stress_to_ase(values, units: str = "eV/A3", sign: str = "ase", order: str = "ase") -> np.ndarray:
    """ASE's Voigt stress (eV/Å³, xx yy zz yz xz xy, positive when the cell pulls inward: tensile) of a
    stress given in ``units`` (``eV/A3``, ``GPa``, ``kbar``), with ``sign`` ``ase`` or ``pressure_positive``
    (VASP's "in kB" line, mlearn's ``virial_stress``: compressive = positive, so negated here), as 9
    numbers (a 3x3 tensor, row by row) or 6 in ``order`` (``ase``, or ``vasp``: xx yy zz xy yz zx).
    The one place mlipops converts a stress (mlearn JSON and the ``stress_key`` of a source use it)."""
    v = np.asarray(values, dtype=float).reshape(-1)
    if v.size == 9:
        v = v.reshape(3, 3)[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    elif v.size == 6:
        v = v[list(STRESS_ORDERS[order])]
    else:
        raise ValueError(f"expected 6 (Voigt) or 9 (3x3) numbers, found {v.size}")
    return (-1.0 if sign == "pressure_positive" else 1.0) * STRESS_UNITS[units] * v


@dataclass(frozen=True)
class StressField:
    """Where a source keeps its stress when not in ASE's ``stress``: the info ``key``, its units, sign and
    Voigt order (:func:`stress_to_ase`). ``ingest.sources[*].stress_key`` / ``stress_units`` /
    ``stress_sign`` / ``stress_order`` in params.yaml."""

    key: str
    units: str = "eV/A3"
    sign: str = "ase"
    order: str = "ase"

    def convert(self, value) -> np.ndarray:
        try:
            out = stress_to_ase(value, self.units, self.sign, self.order)
        except (TypeError, ValueError) as exc:
            msg = str(exc) if str(exc).startswith("expected") else \
                f"expected 6 or 9 numbers, found {_clip(str(value))!r}"
            raise ValueError(f"field '{self.key}': {msg}") from None
        if not np.all(np.isfinite(out)):
            raise ValueError(f"field '{self.key}': non-finite value (NaN or inf)")
        return out


def canonicalize(atoms: Atoms, *, source: str, source_index: int,
                 default_config_type: str | None = None, trust: Iterable[str] = (),
                 stress_field: StressField | None = None) -> Atoms:
    """Bring a frame read from anywhere to the canonical schema (labels in a SinglePointCalculator).

    Provenance (module doc): ``frame_id`` is always the content hash; ``source`` and ``source_index``
    are the given ones and ``split``/``oracle_*`` unset, unless the key is in ``trust`` (the keys of
    :data:`PROVENANCE_KEYS` whose value in ``info`` is honoured: all of them for mlipops' own files,
    :data:`ORACLE_KEYS` for a file with a verified manifest, none for a user's file). A value in
    ``info`` under an untrusted key is kept as ``file_<key>`` where it differs from the pipeline's.

    Labels of the wrong shape are not silently fixed: forces whose shape differs from the
    positions' are removed from the labels and their shape recorded in ``info['forces_shape']``
    so the validate stage quarantines the frame with that reason.

    ``stress_field``: the frame's stress is ``info[stress_field.key]`` converted to ASE's (a frame
    without that key has no stress label unless it has ASE's own; a malformed value is an error).
    """
    if len(atoms) == 0:
        raise ValueError("frame has no atoms (field 'natoms')")
    _check_finite(atoms.positions, atoms.cell.array)
    energy, forces, stress = labels(atoms)
    if stress_field is not None and atoms.info.get(stress_field.key) is not None:
        stress = stress_field.convert(atoms.info[stress_field.key])
    return _canonical(atoms.numbers, atoms.positions, atoms.cell, atoms.pbc, atoms.info, energy, forces, stress,
                      source=source, source_index=source_index, default_config_type=default_config_type,
                      trust=trust)


def _check_finite(positions: np.ndarray, cell: np.ndarray) -> None:
    for name, arr in (("positions", positions), ("cell", cell)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"non-finite value (NaN or inf) in field '{name}'")


def _canonical(numbers, positions, cell, pbc, info: dict, energy: float | None, forces: np.ndarray | None,
               stress: np.ndarray | None, *, source: str, source_index: int, default_config_type: str | None,
               trust: Iterable[str]) -> Atoms:
    """The canonical frame of :func:`canonicalize` from its parts (checked finite; labels as :func:`labels`
    gives them): a new Atoms, ``info`` filtered and given its provenance."""
    out = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
    if forces is not None and forces.shape != (len(out), 3):
        shape_note = ("forces_shape", "x".join(str(s) for s in forces.shape))
        forces = None
    else:
        shape_note = None
    if stress is not None and stress.shape != (6,):
        stress_note = ("stress_shape", "x".join(str(s) for s in stress.shape))
        stress = None
    else:
        stress_note = None
    set_labels(out, energy, forces, stress)  # before info is filled: the calculator's copy of out has none to copy
    for k, v in info.items():
        if isinstance(v, (str, int, float, bool, np.integer, np.floating, np.bool_)) or (
            isinstance(v, np.ndarray) and v.ndim == 1
        ):
            out.info[k] = v
    for k in _STATE_ARRAYS:
        if k in out.info:
            out.info[k] = np.atleast_1d(np.asarray(out.info[k], dtype=float))
    for note in (shape_note, stress_note):
        if note is not None:
            out.info[note[0]] = note[1]
    trust = set(trust)
    claimed = {k: out.info.pop(k) for k in PROVENANCE_KEYS if k in out.info and k not in trust}
    out.info["frame_id"] = frame_id(out)
    out.info["source"] = str(out.info.get("source", source))
    out.info["source_index"] = int(out.info.get("source_index", source_index))
    for k, v in claimed.items():
        if k not in out.info or str(v) != str(out.info[k]):
            out.info[f"file_{k}"] = v
    ct = out.info.get("config_type", default_config_type)
    out.info["config_type"] = str(ct) if ct is not None else "unknown"
    return out


# ------------------------------------------------------------------------------------- readers
MAX_LINE_BYTES = 1 << 20  # a longer line is no extxyz (a header, comment or atom line is far shorter)
MAX_FRAME_BYTES = 1 << 28  # 256 MiB of text in one frame: refused before it is held in memory


def _lines(fh, path: str) -> Iterator[tuple[int, str]]:
    """(line number, text with its end) of a binary file handle, read line by line, as
    ``Path.read_text().splitlines(keepends=True)`` would give them (universal newlines, UTF-8), without
    holding the file: a line over :data:`MAX_LINE_BYTES` (a binary file, ``/dev/zero``) is an error."""
    number, offset = 0, 0
    while True:
        raw = fh.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES:
            raise FrameFormatError(f"line {number + 1}: longer than {MAX_LINE_BYTES // 2**20} MiB without a "
                                   "line break: not an (ext)xyz file", file=path, field="natoms")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:  # _decode_error wants the offset in the file
            exc.start, exc.end = exc.start + offset, exc.end + offset
            raise _decode_error(Path(path), exc) from None
        offset += len(raw)
        for line in text.replace("\r\n", "\n").replace("\r", "\n").splitlines(keepends=True):
            number += 1
            yield number, line


def _split_extxyz(lines: Iterable[tuple[int, str]], path: str) -> Iterator[tuple[int, int, str]]:
    """Yield (frame index, first line number, raw text) of every frame of an (ext)xyz file, from its
    (line number, text) pairs (:func:`_lines`); one frame is held at a time."""
    lines = iter(lines)
    k = 0
    for number, line in lines:
        head = line.strip()
        if not head:
            continue
        try:
            n = int(head)
            if n < 0:
                raise ValueError
        except ValueError:
            raise FrameFormatError(
                f"line {number}: expected the number of atoms, found {head[:40]!r}",
                file=path, frame=k, field="natoms") from None
        frame, size = [line], len(line)
        for _ in range(n + 1):
            nxt = next(lines, None)
            if nxt is None:
                raise FrameFormatError(
                    f"line {number}: file ends after {len(frame) - 2} of {n} atom lines (truncated?)",
                    file=path, frame=k, field="natoms")
            frame.append(nxt[1])
            size += len(nxt[1])
            if size > MAX_FRAME_BYTES:
                raise FrameFormatError(
                    f"line {number}: a frame of {n} atoms over {MAX_FRAME_BYTES // 2**20} MiB of text: too large "
                    "to read", file=path, frame=k, field="natoms")
        yield k, number, "".join(frame)
        k += 1


def _explain(exc: Exception, raw: str | None = None, first_line: int | None = None) -> str:
    """One line saying what is wrong with a frame, naming the field; ``raw`` (the frame's extxyz
    text, starting at line ``first_line`` of its file) lets a bad value be located exactly."""
    if isinstance(exc, KeyError):
        key = exc.args[0] if exc.args else ""
        if isinstance(key, str) and not key.isascii():
            return f"field 'species': {_clip(key)!r} is not an element ({_non_ascii(key)})"
        return f"unknown element or missing key {_clip(key)!r} (field 'species')"
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, ValueError) and raw is not None:
        where = _bad_value(raw, first_line or 1)
        if where is not None:
            return where
        item = re.match(r"Got info item (\w+)", msg)
        if item:
            return f"field '{item.group(1)}': {type(exc).__name__}: {msg}"
    return f"{type(exc).__name__}: {msg}"


def _clip(value, n: int = 40):
    """A value quoted in a message, at most ``n`` characters of it."""
    return value[:n] + "..." if isinstance(value, str) and len(value) > n else value


def _non_ascii(text: str) -> str:
    """'contains non-ASCII character U+0421 — a Cyrillic letter?' for the first non-ASCII character:
    a look-alike (Cyrillic С, Greek Α) typed or pasted into an element symbol."""
    import unicodedata

    ch = next(c for c in text if not c.isascii())
    name = unicodedata.name(ch, "")
    script = name.split()[0].capitalize() if name and "LETTER" in name else None
    hint = f" — a {script} letter?" if script else ""
    return f"contains non-ASCII character U+{ord(ch):04X}{hint}"


_PROPERTIES = re.compile(r"""(?:^|\s)Properties=(?:"([^"]*)"|(\S+))""", re.IGNORECASE)
_LOGICAL = {"T", "F", "TRUE", "FALSE"}


def _properties(comment: str) -> list[tuple[str, str, int]]:
    """(name, type, columns) of each per-atom field of an extxyz comment line (ASE's default
    ``species:S:1:pos:R:3`` when it has none)."""
    m = _PROPERTIES.search(comment)
    spec = (m.group(1) or m.group(2)) if m else "species:S:1:pos:R:3"
    parts = spec.split(":")
    out = []
    for q in range(0, len(parts) - 2, 3):
        try:
            out.append((parts[q], parts[q + 1].upper(), int(parts[q + 2])))
        except ValueError:
            return []
    return out


def _bad_value(raw: str, first_line: int) -> str | None:
    """'field '<name>': atom <i> (line <n>): '<token>' is not a number' for the first value of an
    atom line that does not parse as its Properties type; None when every value does."""
    lines = raw.splitlines()
    if len(lines) < 2:
        return None
    props = _properties(lines[1])
    if not props:
        return None
    for i, line in enumerate(lines[2:]):
        tokens = line.split()
        col = 0
        for name, kind, n in props:
            for token in tokens[col:col + n]:
                try:
                    if kind == "R":
                        float(token)
                    elif kind == "I":
                        int(token)
                    elif kind == "L" and token.upper() not in _LOGICAL:
                        raise ValueError
                except ValueError:
                    what = {"R": "a number", "I": "an integer", "L": "a logical (T or F)"}[kind]
                    return f"field '{name}': atom {i} (line {first_line + 2 + i}): {token!r} is not {what}"
            col += n
    return None


_MAGIC = {b"\x1f\x8b": "gzip-compressed", b"BZh": "bzip2-compressed", b"\xfd7zXZ\x00": "xz-compressed",
          b"PK\x03\x04": "a zip archive", b"\x89HDF": "an HDF5 file", b"SQLite format 3": "an SQLite database"}


def _decode_error(path: Path, exc: UnicodeDecodeError, base: int = 0) -> FrameFormatError:
    """The file is not UTF-8 text: name the frame, the field and the line where the first bad byte
    sits (found by the natoms lines of what precedes it), and say what the file seems to be.

    ``base``: the file offset of the text ``exc`` was raised on (a reader decoding in chunks). Only
    the bytes up to the bad one are read, and none of them is quoted."""
    pos = base + exc.start
    with open(path, "rb") as fh:
        data = fh.read(max(pos + 1, _HEAD))
    bad_line = data.count(b"\n", 0, pos)  # 0-based line of the bad byte
    lines = data.split(b"\n")
    kind = next((what for magic, what in _MAGIC.items() if data.startswith(magic)), None)
    if kind is None and b"\x00" in data[:_HEAD]:
        kind = "binary"
    frame, field, i, k = 0, "natoms", 0, 0
    while i < len(lines) and i <= bad_line:
        if not lines[i].strip():
            i += 1
            continue
        try:
            n = int(lines[i].decode("utf-8", "replace").strip())
        except ValueError:
            frame, field = k, "natoms"
            break
        if bad_line <= i + 1 + n:
            frame = k
            if bad_line == i:
                field = "natoms"
            elif bad_line == i + 1:  # the comment line: the key whose value holds the byte
                col = pos - (data.rfind(b"\n", 0, pos) + 1)
                keys = re.findall(r"([A-Za-z_][\w-]*)=", lines[i + 1][:col].decode("utf-8", "replace"))
                field = keys[-1] if keys else "comment"
            else:  # an atom line: the Properties column that holds the byte
                props = _properties(lines[i + 1].decode("utf-8", "replace"))
                col = pos - (data.rfind(b"\n", 0, pos) + 1)
                token = len(lines[bad_line][:col].split())
                field, seen = "species", 0
                for name, _, ncol in props:
                    if token < seen + ncol:
                        field = name
                        break
                    seen += ncol
            break
        i += 2 + n
        k += 1
    what = (f"not a text file ({kind}{': decompress it first' if 'compressed' in kind else ''})" if kind
            else "not UTF-8 text (re-save it as UTF-8)")
    return FrameFormatError(f"line {bad_line + 1}: {what}: byte 0x{data[pos]:02x} at offset {pos} is not UTF-8 "
                            f"({exc.reason})", file=str(path), frame=frame, field=field)


def _open_binary(path: Path):
    """``path`` opened for reading bytes, or a one-line FrameFormatError naming it."""
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise FrameFormatError("file not found", file=str(path)) from None
    except OSError as exc:
        raise FrameFormatError(f"cannot read: {exc}", file=str(path)) from None


def iter_extxyz(path: str | Path, *, source: str | None = None, default_config_type: str | None = None,
                progress: Callable[[int], None] | None = None, with_text: bool = False,
                trust: Iterable[str] = PROVENANCE_KEYS, stress_field: StressField | None = None) -> Iterator:
    """Stream the frames of an extxyz file in order: canonical frames, and Rejected records for the
    unparseable ones. Memory is bounded by the largest frame, not the file. ``progress(bytes)``: called
    after each frame with the bytes read so far; ``with_text``: yield (frame, its text in the file) pairs.
    ``trust``: see :func:`canonicalize`; the default keeps the provenance the file records, for mlipops' own
    files. A file a user names goes through :func:`read_frames` / :func:`iter_frames` instead.
    ``stress_field``: see :func:`canonicalize`."""
    path = Path(path)
    fh = _open_binary(path)
    with fh:
        yield from _iter_handle(fh, str(path), source or path.stem, default_config_type, progress,
                                {"trust": tuple(trust), "stress_field": stress_field}, with_text)


def parse_extxyz_text(text: str, *, source: str, name: str = "<text>",
                      trust: Iterable[str] = PROVENANCE_KEYS) -> list[Atoms | Rejected]:
    """The frames of extxyz text held in memory (e.g. a quarantined frame's ``extxyz``, mlipops' own), as
    :func:`iter_extxyz` reads them from a file named ``name``."""
    return list(_iter_handle(io.BytesIO(text.encode("utf-8")), name, source, None, None, {"trust": tuple(trust)}))


# ------------------------------------------------------------------- fast comment-line parsing
# ASE's extxyz reader parses the comment line character by character (``key_val_str_to_dict``), which is
# about half of its time per frame. The common case -- keys, unquoted values and double-quoted values without
# escapes, as ASE itself writes them -- is tokenised here with one regex; each value is then converted by
# exactly ASE's rules (``_ase_value``, a copy of the loop body of ASE 3.29's ``key_val_str_to_dict``). A line
# with anything else (a backslash, single quotes, brackets or braces outside double quotes, ``k=""``, ``a=b=c``)
# goes to ASE's own parser. tests/test_frames_fast.py checks both give the same frames.
_KV_TOKEN = re.compile(r"""([A-Za-z_][\w.\-]*)(?:=(?:"([^"\\]+)"|([^\s"\\'{}\[\]=]+)))?(?:\s+|$)""")
_NUMBERS = re.compile(r"[^\s,]+")
_STR_TO_BOOL = {"T": True, "F": False, "true": True, "false": False, "True": True, "False": False,
                "TRUE": True, "FALSE": False}


_INT_TOKEN = re.compile(r"[+-]?[0-9]{1,18}")
# a point or an exponent
_FLOAT_TOKEN = re.compile(r"[+-]?(?:(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+)")
_NUMBER_CHARS = frozenset("0123456789+-.eE_")


def _token_kind(token: str) -> str | None:
    """"i" for a decimal integer numpy casts to int64, "f" for a plain decimal float, "s" for a word that
    neither int() nor float() reads (ASCII with a character no number has, not nan/inf), else None: let numpy
    decide (``1_000``, ``nan``, a 30-digit integer, non-ASCII digits)."""
    if _INT_TOKEN.fullmatch(token):
        return "i"
    if _FLOAT_TOKEN.fullmatch(token):
        return "f"
    if token.isascii() and not _NUMBER_CHARS.issuperset(token) and \
            token.lstrip("+-").lower() not in ("nan", "inf", "infinity"):
        return "s"
    return None


def _ase_value(key: str, value: str):
    from ase.io.extxyz import SPECIAL_3_3_KEYS, UNPROCESSED_KEYS

    if key.lower() in UNPROCESSED_KEYS:
        return value
    split_value = _NUMBERS.findall(value)
    kinds = {_token_kind(t) for t in split_value}
    if split_value and kinds <= {"i", "f"}:  # plain decimal numbers: what numpy's str casts give, without raising
        numvalue = np.array([int(t) for t in split_value], dtype=int) if kinds == {"i"} else \
            np.array([float(t) for t in split_value], dtype=float)
        value = numvalue[0] if len(numvalue) == 1 else numvalue
    elif kinds != {"s"}:  # (words are neither ints nor floats: no need to try)
        try:
            try:
                numvalue = np.array(split_value, dtype=int)
            except (ValueError, OverflowError):
                numvalue = np.array(split_value, dtype=float)
            if len(numvalue) == 1:
                numvalue = numvalue[0]
            value = numvalue
        except (ValueError, OverflowError):
            pass
    if key in SPECIAL_3_3_KEYS:
        if not isinstance(value, np.ndarray) or value.shape != (9,):
            raise ValueError(f"Got info item {key}, expecting special 3x3 matrix, but value is not in the form "
                             "of a 9-long numerical vector")
        value = np.array(value).reshape((3, 3), order="F")
    if isinstance(value, str):
        try:
            boolvalue = [_STR_TO_BOOL[v] for v in _NUMBERS.findall(value)]
            value = boolvalue[0] if len(boolvalue) == 1 else boolvalue
        except KeyError:
            if value.startswith("_JSON "):
                d = json.loads(value.replace("_JSON ", "", 1))
                value = np.array(d)
                if value.dtype.kind not in ["i", "f", "b"]:
                    value = d
    return value


def _comment_dict(line: str) -> dict:
    """ASE's ``key_val_str_to_dict(line)``, fast for the lines ASE writes (see above)."""
    from ase.io.extxyz import key_val_str_to_dict

    line = line.strip()
    pairs, pos, end = [], 0, len(line)
    while pos < end:
        m = _KV_TOKEN.match(line, pos)
        if m is None:
            return key_val_str_to_dict(line)
        pairs.append(m.groups())
        pos = m.end()
    out = {}
    for key, quoted, plain in pairs:
        value = quoted if quoted is not None else plain if plain is not None else "T"
        out[key] = _ase_value(key, value)
    return out


def _simple_columns(spec: str) -> list[tuple[str, str, int]] | None:
    """The Properties of a frame when the fast reader handles them (``species:S:1``, ``pos:R:3`` and any
    further real-valued columns, each once), else None."""
    parts = spec.split(":")
    if len(parts) % 3:
        return None
    out, seen = [], set()
    for q in range(0, len(parts), 3):
        name, kind, n = parts[q], parts[q + 1], parts[q + 2]
        if not n.isdigit() or int(n) < 1 or name in seen or name in ("Z", "charge", "move_mask", "symbols",
                                                                      "positions", "numbers", "charges"):
            return None
        if not ((name == "species" and kind == "S" and n == "1") or (name != "species" and kind == "R")):
            return None
        if name == "pos" and n != "3":
            return None
        seen.add(name)
        out.append((name, kind, int(n)))
    return out if {"species", "pos"} <= seen else None


def _read_frame(raw: str) -> Atoms:
    """One extxyz frame's text (natoms line, comment line, atom lines) as ASE's extxyz reader gives it
    (``ase.io.read(StringIO(raw), format="extxyz")``): fast for species, positions and real-valued columns,
    ASE's own frame reader for anything else."""
    from ase.io.extxyz import REV_PROPERTY_NAME_MAP, set_calc_and_arrays

    lines = raw.splitlines()
    natoms = int(lines[0])
    comment = lines[1].strip() if len(lines) > 1 else ""
    info = _comment_dict(comment) if comment else {}
    columns = _simple_columns(info["Properties"] if "Properties" in info else "species:S:1:pos:R:3") \
        if isinstance(info.get("Properties", ""), str) else None
    rows = [ln.split() for ln in lines[2:]]
    ncol = sum(n for _, _, n in columns) if columns else 0
    if columns is None or len(rows) != natoms or natoms == 0 or any(len(r) != ncol for r in rows):
        return _ase_frame(raw)
    pbc = info.pop("pbc") if "pbc" in info else [True, True, True] if "Lattice" in info else None
    cell = info.pop("Lattice").T if "Lattice" in info else None
    info.pop("Properties", None)
    flat = [t for r in rows for t in r]
    arrays, col = {}, 0
    try:
        for name, kind, n in columns:
            if kind == "S":
                arrays[name] = [s.capitalize() for s in flat[col::ncol]]
            else:
                cols = [np.array(list(map(float, flat[col + c::ncol])), dtype=float) for c in range(n)]
                arrays[REV_PROPERTY_NAME_MAP.get(name, name)] = cols[0] if n == 1 else np.vstack(cols).T
            col += n
    except ValueError:  # a value that is no number: ASE's reader says which
        return _ase_frame(raw)
    atoms = Atoms(arrays.pop("species"), positions=arrays.pop("positions"), cell=cell, pbc=pbc, info=info)
    set_calc_and_arrays(atoms, arrays)
    return atoms


_NO_FAST_INFO = None  # the per-frame quantities ASE's reader moves from info to the calculator (set on first use)


def _read_canonical(raw: str, source: str, source_index: int, default_config_type: str | None,
                    trust: Iterable[str] = (), stress_field: StressField | None = None) -> Atoms | None:
    """``canonicalize(_read_frame(raw), ...)`` in one step for the frames mlipops itself writes (species, positions
    and real-valued columns; ``energy`` and a 3x3 ``stress`` in the comment line): the same frame, bit for bit,
    without the reader's Atoms and calculator that canonicalize copies and drops (half of a small frame's time).
    None for any other frame (and for one with an error), which then takes the general path."""
    global _NO_FAST_INFO
    if stress_field is not None:
        return None
    try:
        from ase.data import atomic_numbers

        if _NO_FAST_INFO is None:
            from ase.io.extxyz import per_config_properties

            _NO_FAST_INFO = frozenset(per_config_properties) - {"energy", "stress"}
        lines = raw.splitlines()
        natoms = int(lines[0])
        comment = lines[1].strip() if len(lines) > 1 else ""
        info = _comment_dict(comment) if comment else {}
        spec = info.pop("Properties", "species:S:1:pos:R:3")
        columns = _simple_columns(spec) if isinstance(spec, str) else None
        if columns is None or natoms == 0 or len(lines) != natoms + 2 or not _NO_FAST_INFO.isdisjoint(info):
            return None
        energy = info.pop("energy", None)
        if energy is not None:
            if not isinstance(energy, (np.floating, np.integer)):
                return None
            energy = float(energy)
        stress = info.pop("stress", None)
        if stress is not None:
            if not (isinstance(stress, np.ndarray) and stress.shape == (3, 3)):
                return None
            stress = np.array([stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]],
                              dtype=float)
        pbc = info.pop("pbc") if "pbc" in info else [True, True, True] if "Lattice" in info else None
        cell = info.pop("Lattice").T if "Lattice" in info else None
        ncol = sum(n for _, _, n in columns)
        rows = [ln.split() for ln in lines[2:]]
        if any(len(r) != ncol for r in rows):
            return None
        flat = [t for r in rows for t in r]
        positions = forces = numbers = None
        col = 0
        for name, kind, n in columns:  # the species column (one): its numbers, and taken out of flat
            if kind == "S":
                numbers = np.array([atomic_numbers[t.capitalize()] for t in flat[col::ncol]], dtype=int)
                del flat[col::ncol]
                break
            col += n
        values = np.array(list(map(float, flat)), dtype=float).reshape(natoms, ncol - 1)  # the real columns
        col = 0
        for name, kind, n in columns:
            if kind == "S":
                continue
            if name == "pos":
                positions = values[:, col:col + 3]
            elif name == "forces":
                if n != 3:
                    return None
                forces = values[:, col:col + 3]
            elif name in ("stress", "energy", "free_energy") or name in _NO_FAST_INFO:
                return None
            col += n
        if cell is not None and not isinstance(cell, np.ndarray):
            return None
        _check_finite(positions, np.zeros((3, 3)) if cell is None else cell)
        return _canonical(numbers, positions, cell, pbc, info, energy, forces, stress, source=source,
                          source_index=source_index, default_config_type=default_config_type, trust=trust)
    except Exception:  # noqa: BLE001 -- the general path says what is wrong, in its own words
        return None


def _ase_frame(raw: str) -> Atoms:
    try:
        from ase.io.extxyz import _read_xyz_frame
    except ImportError:  # a future ASE without the private frame reader: its public one
        import ase.io

        return ase.io.read(io.StringIO(raw), format="extxyz")
    lines = raw.splitlines(keepends=True)
    return _read_xyz_frame(iter(lines[1:]), int(lines[0]), properties_parser=_comment_dict)


def _parse_one(k: int, line: int, raw: str, name: str, src: str, default_config_type: str | None,
               canon: dict) -> Atoms | Rejected:
    """Frame ``k`` (its text ``raw``, starting at line ``line`` of file ``name``) read and canonicalized, or
    the Rejected record saying why it cannot be."""
    try:
        fast = _read_canonical(raw, src, k, default_config_type, **canon)
        if fast is not None:
            return fast
        atoms = _read_frame(raw)
        return canonicalize(atoms, source=src, source_index=k, default_config_type=default_config_type, **canon)
    except Exception as exc:  # ASE raises many types on malformed frames
        return Rejected(src, k, "parse", f"{name} frame {k}: {_explain(exc, raw, line)}", raw)


def _iter_handle(fh, name: str, src: str, default_config_type: str | None,
                 progress: Callable[[int], None] | None, canon: dict, with_text: bool = False) -> Iterator:
    n = 0
    try:
        for k, line, raw in _split_extxyz(_lines(fh, name), name):
            n += 1
            if progress is not None:
                progress(fh.tell())
            out = _parse_one(k, line, raw, name, src, default_config_type, canon)
            yield (out, raw) if with_text else out
    except OSError as exc:  # a directory, an unreadable device
        raise FrameFormatError(f"cannot read: {exc}", file=name) from None
    if not n:
        raise FrameFormatError("contains no frames", file=name)


# ------------------------------------------------------------------- chunks of a large file in worker processes
PARALLEL_MIN_BYTES = 64 << 20  # files from this size are read by worker processes (below: start-up costs more)


def read_workers(size: int) -> int:
    """Worker processes for reading a file of ``size`` bytes: the CPUs this process may use (at most 4), or
    ``MLIPOPS_READ_WORKERS`` (0 or 1: read here, in this process); 1 below :data:`PARALLEL_MIN_BYTES`
    (``MLIPOPS_READ_MIN_BYTES`` overrides it)."""
    try:
        given = os.environ.get("MLIPOPS_READ_WORKERS")
        n = int(given) if given is not None else min(4, len(os.sched_getaffinity(0)))
        floor = int(os.environ.get("MLIPOPS_READ_MIN_BYTES", PARALLEL_MIN_BYTES))
    except (ValueError, AttributeError):
        n, floor = 1, PARALLEL_MIN_BYTES
    return max(1, n) if size >= floor else 1


def _worker_init() -> None:
    """A reading worker runs one thread of its own: the workers are the parallelism."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def _chunk_task(work: Callable, context, chunk: list[tuple[int, int, str]], name: str, src: str,
                default_config_type: str | None, canon: dict):
    items = [(_parse_one(k, line, raw, name, src, default_config_type, canon), raw) for k, line, raw in chunk]
    return work(items, context)


def map_extxyz(path: str | Path, work: Callable, context=None, *, chunk_frames: int = 1000,
               workers: int | None = None, progress: Callable[[int], None] | None = None,
               source: str | None = None, default_config_type: str | None = None,
               trust: Iterable[str] = PROVENANCE_KEYS, stress_field: StressField | None = None,
               first_context: Callable | None = None) -> Iterator:
    """``work(items, context)`` for consecutive chunks of ``chunk_frames`` frames of an extxyz file, in file
    order; ``items`` is a list of (frame or Rejected, its text), as ``iter_extxyz(..., with_text=True)`` gives
    them. The same results, bit for bit, with any number of workers: each chunk is read and worked on alike.

    With more than one worker (:func:`read_workers`), the chunks are read and worked on in that many worker
    processes (spawned: ``work`` must be a module-level function and its result picklable), at most two chunks
    per worker in flight, so memory is bounded by the chunks, not the file; this process only splits the file
    into frames. ``first_context(first_result)``: when given, the first chunk is done alone and the others get
    ``first_context(its result)`` as their context (a choice that needs some frames first).
    ``progress(bytes)``: the bytes split off so far. Errors of the file's layout (a bad atom count, a
    truncated frame) are raised here as by :func:`iter_extxyz`."""
    from collections import deque

    path = Path(path)
    fh = _open_binary(path)
    name, src = str(path), source or path.stem
    canon = {"trust": tuple(trust), "stress_field": stress_field}
    n_workers = workers if workers is not None else read_workers(path.stat().st_size if path.is_file() else 0)

    def chunks():
        chunk, n = [], 0
        try:
            for item in _split_extxyz(_lines(fh, name), name):
                chunk.append(item)
                n += 1
                if len(chunk) >= chunk_frames:
                    if progress is not None:
                        progress(fh.tell())
                    yield chunk
                    chunk = []
        except OSError as exc:
            raise FrameFormatError(f"cannot read: {exc}", file=name) from None
        if progress is not None:
            progress(fh.tell())
        if chunk:
            yield chunk
        if not n:
            raise FrameFormatError("contains no frames", file=name)

    with fh:
        if n_workers <= 1:
            ctx = context
            for q, chunk in enumerate(chunks()):
                out = _chunk_task(work, ctx, chunk, name, src, default_config_type, canon)
                if q == 0 and first_context is not None:
                    ctx = first_context(out)
                yield out
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init) as pool:
            pending: deque = deque()
            ctx = context
            it = chunks()
            try:
                if first_context is not None:
                    first = next(it, None)
                    if first is None:
                        return
                    out = pool.submit(_chunk_task, work, ctx, first, name, src, default_config_type,
                                      canon).result()
                    ctx = first_context(out)
                    yield out
                for chunk in it:
                    pending.append(pool.submit(_chunk_task, work, ctx, chunk, name, src, default_config_type,
                                               canon))
                    if len(pending) >= 2 * n_workers:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()


def read_extxyz(path: str | Path, *, source: str | None = None, default_config_type: str | None = None,
                trust: Iterable[str] = PROVENANCE_KEYS,
                stress_field: StressField | None = None) -> tuple[list[Atoms], list[Rejected]]:
    """Read every frame of an extxyz file; unparseable frames come back as Rejected records
    (:func:`iter_extxyz` into two lists)."""
    return _split(iter_extxyz(path, source=source, default_config_type=default_config_type, trust=trust,
                              stress_field=stress_field))


def read_db(path: str | Path, *, source: str | None = None, default_config_type: str | None = None,
            trust: Iterable[str] = (), db_type: str | None = None,
            stress_field: StressField | None = None) -> tuple[list[Atoms], list[Rejected]]:
    """Read an ASE database file (``.db``/``.json`` written by ``ase.db``); ``db_type`` (``db``,
    ``json``) when the content, not the suffix, told the kind. ``trust``: see :func:`canonicalize`."""
    import ase.db

    path = Path(path)
    if not path.is_file():
        raise FrameFormatError("file not found", file=str(path))
    src = source or path.stem
    frames, rejected = [], []
    try:
        con = ase.db.connect(str(path), type=db_type or "extract_from_name")
        rows = list(con.select())
    except Exception as exc:
        raise FrameFormatError(f"not a readable ASE database: {_explain(exc)}", file=str(path)) from None
    for k, row in enumerate(rows):
        try:
            atoms = row.toatoms(add_additional_information=False)
            atoms.info.update({kk: vv for kk, vv in row.key_value_pairs.items()})
            frames.append(canonicalize(atoms, source=src, source_index=k, default_config_type=default_config_type,
                                       trust=trust, stress_field=stress_field))
        except Exception as exc:
            rejected.append(Rejected(src, k, "parse", f"{path} row {row.id}: {_explain(exc)}", str(dict(row))))
            continue
    return frames, rejected


class _Schema(ValueError):
    """A field of an mlearn entry missing or of the wrong type: 'field '<dotted path>': expected ...'."""

    def __init__(self, field: str, expected: str, value=None, missing: bool = False):
        super().__init__(f"field '{field}': missing (expected {expected})" if missing
                         else f"field '{field}': expected {expected}, found {_kind_of(value)}")


def _kind_of(value) -> str:
    """What a JSON value is, without quoting it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _member(obj: dict, key: str, field: str, expected: str):
    if key not in obj:
        raise _Schema(field, expected, missing=True)
    return obj[key]


def _obj(value, field: str, what: str) -> dict:
    if not isinstance(value, dict):
        raise _Schema(field, f"an object ({what})", value)
    return value


def _numbers(value, field: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """A nested list of numbers of ``shape`` (None: any length) as an array; `field`[i] named on error."""
    n = shape[0]
    what = ("a list of " + (f"{n} " if n is not None else "")
            + ("numbers" if len(shape) == 1 else "lists of " + " x ".join(str(s) for s in shape[1:]) + " numbers"))
    if not isinstance(value, list) or (n is not None and len(value) != n):
        raise _Schema(field, what, value)
    if len(shape) == 1:
        for i, x in enumerate(value):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise _Schema(f"{field}[{i}]", "a number", x)
        return np.asarray(value, dtype=float)
    return np.array([_numbers(v, f"{field}[{i}]", shape[1:]) for i, v in enumerate(value)], dtype=float).reshape(
        (len(value),) + tuple(s if s is not None else -1 for s in shape[1:]))


def _element(value, field: str) -> str:
    from ase.data import atomic_numbers

    if not isinstance(value, str):
        raise _Schema(field, "an element symbol (a string)", value)
    if value not in atomic_numbers:
        hint = f" ({_non_ascii(value)})" if not value.isascii() else ""
        raise ValueError(f"field '{field}': {_clip(value)!r} is not an element{hint}")
    return value


def _mlearn_atoms(doc) -> Atoms:
    """One mlearn entry: {structure: pymatgen Structure dict (lattice.matrix Å, sites with species and
    xyz Å or abc fractional), outputs: {energy eV, forces eV/Å, virial_stress kBar}, group, description}.
    A field of the wrong type raises ValueError 'field '<dotted path>': expected ..., found ...'."""
    doc = _obj(doc, "entry", "an mlearn entry with 'structure' and 'outputs'")
    struct = _obj(_member(doc, "structure", "structure", "a pymatgen Structure dict"), "structure",
                  "a pymatgen Structure dict")
    lattice = _obj(_member(struct, "lattice", "structure.lattice", "an object with 'matrix'"), "structure.lattice",
                   "with 'matrix'")
    cell = _numbers(_member(lattice, "matrix", "structure.lattice.matrix", "3 x 3 numbers (Å)"),
                    "structure.lattice.matrix", (3, 3))
    sites = _member(struct, "sites", "structure.sites", "a list of sites")
    if not isinstance(sites, list) or not sites:
        raise _Schema("structure.sites", "a non-empty list of sites", sites)
    symbols, positions = [], []
    for i, site in enumerate(sites):
        f = f"structure.sites[{i}]"
        site = _obj(site, f, "with 'species' and 'xyz' or 'abc'")
        species = _member(site, "species", f"{f}.species", "a list of {\"element\": ...}")
        if not isinstance(species, list) or not species:
            raise _Schema(f"{f}.species", "a non-empty list of {\"element\": ...}", species)
        first = _obj(species[0], f"{f}.species[0]", "with 'element'")
        el = f"{f}.species[0].element"
        symbols.append(_element(_member(first, "element", el, "an element symbol"), el))
        if "xyz" in site:
            positions.append(_numbers(site["xyz"], f"{f}.xyz", (3,)))
        elif "abc" in site:
            positions.append(_numbers(site["abc"], f"{f}.abc", (3,)) @ cell)
        else:
            raise _Schema(f"{f}.xyz", "Cartesian coordinates (or 'abc', fractional)", missing=True)
    atoms = Atoms(symbols=symbols, positions=positions, cell=cell, pbc=True)
    out = {} if doc.get("outputs") is None else _obj(doc["outputs"], "outputs", "energy, forces, virial_stress")
    energy = out.get("energy")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))):
        raise _Schema("outputs.energy", "a number (eV)", energy)
    forces = None if out.get("forces") is None else _numbers(out["forces"], "outputs.forces", (len(atoms), 3))
    stress = None
    if out.get("virial_stress") is not None:
        v = _numbers(out["virial_stress"], "outputs.virial_stress", (6,))  # VASP kBar, xx yy zz xy yz zx
        stress = stress_to_ase(v, "kbar", "pressure_positive", "vasp")
    set_labels(atoms, energy, forces, stress)
    if "group" in doc:
        atoms.info["config_type"] = str(doc["group"])
    if "description" in doc:
        atoms.info["description"] = str(doc["description"]).replace(" ", "_")
    return atoms


def read_mlearn_json(path: str | Path, *, source: str | None = None, default_config_type: str | None = None,
                     trust: Iterable[str] = (), stress_field: StressField | None = None
                     ) -> tuple[list[Atoms], list[Rejected]]:
    """Read mlearn's json format (a list of {structure (pymatgen dict), outputs, group, ...}); an entry
    of the wrong schema is a Rejected record '<file>: entry <k>: field '<f>': expected ...'."""
    path = Path(path)
    if not path.is_file():
        raise FrameFormatError("file not found", file=str(path))
    try:
        docs = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FrameFormatError(f"not valid JSON: {exc}", file=str(path)) from None
    if not isinstance(docs, list):
        raise FrameFormatError(f"expected a JSON list of structures (mlearn format), found {_kind_of(docs)}",
                               file=str(path))
    src = source or path.stem
    frames, rejected = [], []
    for k, doc in enumerate(docs):
        try:
            atoms = _mlearn_atoms(doc)
            frames.append(canonicalize(atoms, source=src, source_index=k, default_config_type=default_config_type,
                                       trust=trust, stress_field=stress_field))
        except Exception as exc:
            reason = str(exc) if isinstance(exc, _Schema) or str(exc).startswith("field '") else _explain(exc)
            rejected.append(Rejected(src, k, "parse", f"{path}: entry {k}: {reason}", json.dumps(doc)[:100000]))
            continue
    return frames, rejected


# ------------------------------------------------------------------ files a user names
_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
_EXPECTED = "a structure file (extxyz, an ASE database or mlearn JSON)"


def source_name(path: str | Path) -> str:
    """The ``source`` of a file's frames: its name less the suffix (``x.extxyz.gz``: ``x``)."""
    p = Path(path)
    return Path(p.stem).stem if p.suffix.lower() == ".gz" else p.stem


def _regular(path: Path) -> os.stat_result:
    """stat of a regular file (a symlink followed); one-line errors before any byte is read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FrameFormatError("file not found" + (" (a broken symbolic link)" if path.is_symlink() else ""),
                               file=str(path)) from None
    except OSError as exc:
        raise FrameFormatError(f"cannot read: {exc.strerror or type(exc).__name__}", file=str(path)) from None
    if not stat.S_ISREG(st.st_mode):
        what = next((name for test, name in _NOT_REGULAR if test(st.st_mode)), "not a plain file")
        raise FrameFormatError(f"not a regular file ({what}): expected {_EXPECTED}", file=str(path))
    return st


def _gzip_error(path: Path, exc: Exception) -> FrameFormatError:
    what = ("truncated (the gzip stream ends early)" if isinstance(exc, EOFError)
            else "not gzip-compressed, though named .gz" if "gzip" in type(exc).__name__.lower()
            or "Not a gzipped" in str(exc) else "corrupt gzip data")
    return FrameFormatError(what, file=str(path))


def _head(path: Path, gz: bool) -> bytes:
    """The first bytes of a file (decompressed when ``gz``): all that is read to tell its format."""
    import gzip
    import zlib

    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            return fh.read(_HEAD)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _gzip_error(path, exc) from None
    except OSError as exc:
        raise FrameFormatError(f"cannot read: {exc.strerror or type(exc).__name__}", file=str(path)) from None


def _sniff(head: bytes) -> str:
    """What a file's first bytes say it is: ``extxyz`` (a first line that is a number), ``json``
    (``[`` or ``{``), ``sqlite``, ``empty``, ``binary`` (a known compressed or binary format, or not
    UTF-8: the reader of its suffix says which byte, quoting none) or ``text`` (anything else, NUL
    bytes included: not a structure file)."""
    if head.startswith(b"SQLite format 3\x00"):
        return "sqlite"
    if any(head.startswith(magic) for magic in _MAGIC):
        return "binary"
    body = head.lstrip()
    if not body:
        return "empty"
    if body[:1] in (b"[", b"{"):
        return "json"
    line, newline, _ = body.partition(b"\n")
    if re.fullmatch(rb"\d+\s*", line) and (newline or len(head) < _HEAD):
        return "extxyz"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3 and b"\x00" not in head:  # not a character cut by the 4 KiB
            return "binary"
    return "text"


def _not_structure(path: Path, fmt: str, kind: str, head: bytes) -> FrameFormatError:
    """'not a structure file': what was expected, what the first bytes are; none of them quoted."""
    expected = {"extxyz": "extxyz, a first line with the number of atoms", "db": "an ASE database",
                "mlearn_json": "mlearn JSON, a list of structures"}.get(fmt, "extxyz, an ASE database or mlearn JSON")
    if kind == "binary" or b"\x00" in head:
        magic = next((what for m, what in _MAGIC.items() if head.startswith(m)), "binary data")
        found = magic + (": decompress it or name it .gz" if magic == "gzip-compressed" else "")
    else:
        found = "text that is none of these" if fmt == "auto" else "other text"
    return FrameFormatError(f"not a structure file (expected {expected}): found {found} (content not shown)",
                            file=str(path))


def _gunzip(path: Path, dest: Path) -> None:
    """Decompress ``path`` into ``dest``, at most :data:`MAX_DECOMPRESSED` bytes."""
    import gzip
    import zlib

    n = 0
    try:
        with gzip.open(path, "rb") as src, open(dest, "wb") as out:
            while chunk := src.read(1 << 20):
                n += len(chunk)
                if n > MAX_DECOMPRESSED:
                    raise FrameFormatError(f"decompresses to more than {MAX_DECOMPRESSED / 2**30:g} GiB "
                                           "(the most a .gz source may hold): decompress it yourself",
                                           file=str(path))
                out.write(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _gzip_error(path, exc) from None


NATIVE_FORMATS = ("extxyz", "db", "mlearn_json")  # read by mlipops' own readers (line-exact messages)
_NATIVE_ALIASES = {"xyz": "extxyz", "json": "db"}  # ase.io names of formats the native readers cover
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"PK\x03\x04")
_ASE_NOT_FILES = ("postgresql", "mysql", "bundletrajectory")  # ase.io "formats" that are no file
# ase.io readers that attach an energy the file does not hold (ASE's LAMMPS dump reader sets 0.0 beside the
# forces): that placeholder is dropped, the frame has no energy label (validate quarantines it, saying so)
_NO_ENERGY = ("lammps-dump-text", "lammps-dump-binary")


@dataclass(frozen=True)
class _Resolved:
    """How a file a user names is read: ``fmt`` (a native format or an ``ase.io`` format name), the ASE db
    type, gzip, and for an ASE format whether its name or first bytes are that format's (ASE's own globs and
    magic: then ASE's messages may be quoted; a format known only from the suffix or params is not trusted
    to be a structure file, and ASE's message, which can quote the file, is not shown)."""

    fmt: str
    db_type: str | None
    gz: bool
    recognized: bool = True

    @property
    def native(self) -> bool:
        return self.fmt in NATIVE_FORMATS


def _ase_detect(basename: str, head: bytes, suffix: str) -> tuple[str, bool] | None:
    """ASE's own format detection (``ase.io.formats.filetype``) without its side roads (database URLs,
    directories): the file's name (``OUTCAR``, ``vasprun.xml``), then its first bytes (a ``.traj``'s
    ``- of UlmASE-Trajectory``, QE's ``Program PWSCF``), then its suffix (``.pwo``, ``.out``, ``.cif``);
    (format, recognized: by name or content), or None. Only formats ASE can read."""
    from ase.io.formats import extension2format, ioformats

    readable = [f for f in ioformats.values() if f.can_read and f.name not in _ASE_NOT_FILES]
    for f in readable:
        if f.match_name(basename):
            return f.name, True
    for f in readable:
        if f.match_magic(head):
            return f.name, True
    f = extension2format.get(suffix.lstrip("."))
    if f is not None and f.can_read and f.name not in _ASE_NOT_FILES:
        return f.name, False
    return None



def _resolve(p: Path, fmt: str) -> _Resolved:
    """How to read a file a user names (:class:`_Resolved`), from its first bytes (the suffix breaks ties;
    a format ``ase.io`` reads is detected as ASE does, by name, content, then suffix); one-line errors,
    quoting none of it, for what is not a regular structure file."""
    _regular(p)
    gz = p.suffix.lower() == ".gz"
    head = _head(p, gz)
    kind = _sniff(head)
    plain_name = p.stem if gz else p.name
    suffix = Path(plain_name).suffix.lower()
    fmt = _NATIVE_ALIASES.get(fmt, fmt)
    if fmt not in NATIVE_FORMATS and fmt != "auto":  # an ase.io format named in params: ASE reads it
        if kind == "empty":
            raise FrameFormatError("contains no frames", file=str(p))
        from ase.io.formats import ioformats

        io_ = ioformats.get(fmt)
        if io_ is None or not io_.can_read or fmt in _ASE_NOT_FILES:
            raise FrameFormatError(f"format {fmt!r} is not one ase.io can read from a file", file=str(p))
        return _Resolved(fmt, None, gz, io_.match_name(plain_name) or io_.match_magic(head))
    by_suffix = {".xyz": "extxyz", ".extxyz": "extxyz", ".db": "db",
                 ".json": "mlearn_json" if kind == "json" and head.lstrip()[:1] == b"[" else "db"}.get(suffix)
    db_type = None
    if fmt == "auto" and kind in ("text", "binary") and by_suffix is None \
            and not any(head.startswith(m) for m in _COMPRESSED):
        found = _ase_detect(plain_name, head, suffix)
        if found is not None:
            return _Resolved(found[0], None, gz, found[1])
    if kind == "text":
        raise _not_structure(p, fmt, kind, head)
    if fmt == "extxyz" and kind in ("json", "sqlite"):
        raise FrameFormatError(f"not extxyz: it looks like {'JSON' if kind == 'json' else 'an SQLite database'} "
                               "(set its format to auto, db or mlearn_json)", file=str(p))
    if fmt == "auto":
        if kind == "extxyz":
            fmt = "extxyz"
        elif kind == "json":
            fmt, db_type = ("mlearn_json", None) if head.lstrip()[:1] == b"[" else ("db", "json")
        elif kind == "sqlite":
            fmt, db_type = "db", "db"
        elif by_suffix is not None:
            fmt = by_suffix
        elif kind == "empty":
            raise FrameFormatError("contains no frames", file=str(p))
        else:
            raise _not_structure(p, fmt, kind, head)
    return _Resolved(fmt, db_type, gz)


def _ase_message(exc: BaseException) -> str:
    """ASE's error in one line (at most 200 characters of it)."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {_clip(msg, 200)}" if msg else type(exc).__name__


def _steps_started(path: Path, fmt: str) -> int | None:
    """The ionic steps a VASP output begins (``<calculation>`` elements of a vasprun.xml; the largest ionic
    index of an OUTCAR's ``Iteration N(M)`` lines), counted line by line; None for other formats. ASE's
    readers end quietly at a step the file cuts off: this count tells that a step was lost."""
    if fmt == "vasp-xml":
        pattern = re.compile(rb"<calculation[\s>]")
    elif fmt == "vasp-out":
        pattern = re.compile(rb"Iteration\s+(\d+)\s*\(")
    else:
        return None
    n = 0
    with open(path, "rb") as fh:
        for line in fh:
            for m in pattern.finditer(line):
                n = max(n, int(m.group(1))) if m.groups() else n + 1
    return n


def _ase_frames(path: Path, fmt: str) -> Iterator[Atoms]:
    """``ase.io.iread`` of a file; an OUTCAR through ASE's own chunk generator (``iread`` would parse
    the whole file first: a long AIMD run held in memory, and an error in its last step losing the rest)."""
    import ase.io

    if fmt == "vasp-out":
        from ase.io.vasp import iread_vasp_out

        with open(path) as fd:
            yield from iread_vasp_out(fd, index=slice(None))
        return
    yield from ase.io.iread(str(path), index=":", format=fmt, do_not_split_by_at_sign=True)


def iter_ase(path: str | Path, fmt: str, *, source: str | None = None, default_config_type: str | None = None,
             trust: Iterable[str] = (), stress_field: StressField | None = None, quote: bool = True,
             name: str | None = None) -> Iterator[Atoms | Rejected]:
    """Stream the frames of a file in an ``ase.io`` format (``traj``, ``vasp-xml``, ``vasp-out``,
    ``espresso-out``, ``lammps-dump-text``, ...) with ``ase.io.iread``, each through :func:`canonicalize`:
    labels from the calculator ASE attaches (energy, forces; stress as ASE gives it: eV/Å³, ASE's sign,
    which ASE's VASP readers get by negating VASP's kbar and its QE reader from Ry/bohr³; a LAMMPS dump
    has forces but no energy, whatever placeholder ASE sets). The energy is ASE's ``energy``: for VASP the
    energy extrapolated to zero smearing (sigma -> 0), not the free energy TOTEN (ASE's ``free_energy``).

    Nothing is lost silently: ASE's reader stops at the first frame it cannot parse; a failure before
    any frame is a :class:`FrameFormatError` (the file is not readable as ``fmt``), one at frame k a
    :class:`Rejected` record for frames k on with ASE's message; a VASP output cut off inside an ionic
    step (which ASE passes over) gives one such record too. ``quote``: ASE's message may be shown (the
    file's name or first bytes are the format's); else only its type. ``name``: the file named in
    messages (default ``path``)."""
    import warnings

    path = Path(path)
    name = name or str(path)
    src = source or source_name(path)
    what = f"ASE's {fmt} reader"
    frames = _ase_frames(path, fmt)
    k = n_energy = 0
    while True:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                atoms = next(frames)
        except StopIteration:
            break
        except Exception as exc:  # ASE raises many types on malformed files
            msg = _ase_message(exc) if quote or k else f"{type(exc).__name__} (content not shown: neither the " \
                f"name nor the first bytes of the file are {fmt}'s)"
            if k == 0:  # (most ASE readers parse the whole file before the first frame: no frame index)
                raise FrameFormatError(f"{what} cannot read it (no frame read): {msg}", file=name) from None
            yield Rejected(src, k, "parse", f"{name} frame {k}: {what} stopped here: {msg}; frames {k} on "
                           "are not read", "")
            return
        results = getattr(atoms.calc, "results", None) or {}
        if fmt in _NO_ENERGY:
            results.pop("energy", None), results.pop("free_energy", None)
        n_energy += "energy" in results or "free_energy" in results  # a complete step as ASE read it
        try:
            out = canonicalize(atoms, source=src, source_index=k, default_config_type=default_config_type,
                               trust=trust, stress_field=stress_field)
            if caught:  # e.g. "badly formatted stress line": the reason a label is missing
                out.info["read_warning"] = _clip(str(caught[0].message).splitlines()[0], 200)
            yield out
        except Exception as exc:
            try:
                raw = to_extxyz_string(atoms)
            except Exception:
                raw = ""
            yield Rejected(src, k, "parse", f"{name} frame {k}: {_explain(exc)}", raw)
        k += 1
    started = _steps_started(path, fmt)
    if started is not None and started > n_energy:
        yield Rejected(src, k, "parse", f"{name} frame {k}: the file ends inside ionic step {started} (truncated?): "
                       f"{what} read {n_energy} complete step(s) of {started}; the step cut off is not read", "")
    elif k == 0:
        raise FrameFormatError(f"contains no frames ({what} found none)", file=name)


def _reader(r: _Resolved, stress_field: StressField | None, quote_name: str | None = None):
    """The reader of a resolved file: (path, source, default_config_type, trust) -> iterator or lists."""
    if not r.native:
        return lambda path, **kw: iter_ase(path, r.fmt, stress_field=stress_field, quote=r.recognized,
                                           name=quote_name, **kw)
    kw = {"db_type": r.db_type} if r.fmt == "db" else {}
    kw["stress_field"] = stress_field
    reader = {"extxyz": read_extxyz, "db": read_db, "mlearn_json": read_mlearn_json}[r.fmt]
    return lambda path, **more: reader(path, **more, **kw)


def _split(items: Iterable[Atoms | Rejected]) -> tuple[list[Atoms], list[Rejected]]:
    frames: list[Atoms] = []
    rejected: list[Rejected] = []
    for item in items:
        (rejected if isinstance(item, Rejected) else frames).append(item)
    return frames, rejected


def read_frames(path: str | Path, fmt: str = "auto", *, source: str | None = None,
                default_config_type: str | None = None,
                stress_field: StressField | None = None) -> tuple[list[Atoms], list[Rejected]]:
    """Read a structure file a user names (any supported format) into canonical frames + rejected records.

    Provenance is the pipeline's (module doc): ``source`` (default: :func:`source_name`), the frame's
    position, the content hash; ``oracle_*`` only from a file whose manifest verifies. The file must be
    a regular file; ``fmt`` ``auto`` reads the format from the first bytes (the suffix breaks ties; a
    format ``ase.io`` reads is found by name, content or suffix, as ASE finds it), or names one:
    ``extxyz``, ``db``, ``mlearn_json`` or any ``ase.io`` format (:func:`iter_ase`); ``.gz`` is
    decompressed first. ``stress_field``: see :func:`canonicalize`.
    """
    p = Path(path)
    r = _resolve(p, fmt)
    trust = ORACLE_KEYS if verified_manifest(p) else ()
    src = source or source_name(p)
    if not r.gz:
        got = _reader(r, stress_field)(p, source=src, default_config_type=default_config_type, trust=trust)
        return got if isinstance(got, tuple) else _split(got)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mlipops-gz-") as tmp:
        plain = Path(tmp) / p.stem
        _gunzip(p, plain)
        try:
            got = _reader(r, stress_field, str(p))(plain, source=src, default_config_type=default_config_type,
                                                   trust=trust)
            frames, rejected = got if isinstance(got, tuple) else _split(got)
        except FrameFormatError as exc:  # name the file the user gave, not the temporary one
            raise FrameFormatError(exc.detail.replace(str(plain), str(p)), file=str(p), frame=exc.frame,
                                   field=exc.field) from None
    for rec in rejected:
        rec.reason = rec.reason.replace(str(plain), str(p), 1)
    return frames, rejected


def iter_frames(path: str | Path, fmt: str = "auto", *, source: str | None = None,
                default_config_type: str | None = None,
                progress: Callable[[int], None] | None = None,
                stress_field: StressField | None = None) -> Iterator[Atoms | Rejected]:
    """:func:`read_frames` as a stream: a plain extxyz file frame by frame in file order (bounded memory,
    the same checks and provenance), a plain file in an ``ase.io`` format as ``ase.io.iread`` gives its
    frames (:func:`iter_ase`); the other formats and ``.gz`` are read whole, then their frames and
    rejected records yielded. ``progress(bytes)`` is called with the bytes of the file read so far."""
    p = Path(path)
    r = _resolve(p, fmt)
    if r.fmt == "extxyz" and not r.gz:
        trust = ORACLE_KEYS if verified_manifest(p) else ()
        yield from iter_extxyz(p, source=source or source_name(p), default_config_type=default_config_type,
                               progress=progress, trust=trust, stress_field=stress_field)
        return
    if not r.native and not r.gz:
        trust = ORACLE_KEYS if verified_manifest(p) else ()
        yield from iter_ase(p, r.fmt, source=source or source_name(p), default_config_type=default_config_type,
                            trust=trust, stress_field=stress_field, quote=r.recognized)
        if progress is not None:
            progress(p.stat().st_size)
        return
    frames, rejected = read_frames(p, fmt, source=source, default_config_type=default_config_type,
                                   stress_field=stress_field)
    if progress is not None:
        progress(p.stat().st_size)
    yield from frames
    yield from rejected


def map_frames(path: str | Path, fmt: str, work: Callable, context=None, *, chunk_frames: int = 1000,
               source: str | None = None, default_config_type: str | None = None,
               progress: Callable[[int], None] | None = None,
               stress_field: StressField | None = None) -> Iterator:
    """:func:`iter_frames` a chunk at a time: ``work(items, context)`` for consecutive chunks of
    (frame or Rejected, its text or None) in file order. A plain extxyz file goes through :func:`map_extxyz`
    (worker processes for a large one), any other format is read here as :func:`iter_frames` reads it."""
    p = Path(path)
    r = _resolve(p, fmt)
    if r.fmt == "extxyz" and not r.gz:
        trust = ORACLE_KEYS if verified_manifest(p) else ()
        yield from map_extxyz(p, work, context, chunk_frames=chunk_frames, progress=progress,
                              source=source or source_name(p), default_config_type=default_config_type,
                              trust=trust, stress_field=stress_field)
        return
    chunk = []
    for a in iter_frames(p, fmt, source=source, default_config_type=default_config_type, progress=progress,
                         stress_field=stress_field):
        chunk.append((a, None))
        if len(chunk) >= chunk_frames:
            yield work(chunk, context)
            chunk = []
    if chunk:
        yield work(chunk, context)


def manifest_path(path: str | Path) -> Path:
    return Path(str(path) + MANIFEST_SUFFIX)


def write_manifest(path: str | Path, frames: Iterable[Atoms], writer: str, extra: dict | None = None) -> Path:
    """``<path>.provenance.json`` for a file of labelled frames mlipops has just written (module doc):
    the md5 of its bytes, the command that wrote it, the frame count and the oracle(s) of its frames;
    ``extra``: more keys the writer records (e.g. ``campaign``: where ``mlipops active graduate`` took the
    frames from), never in place of those."""
    frames = list(frames)
    oracles = sorted({tuple(str(a.info[k]) for k in ORACLE_KEYS) for a in frames
                      if all(k in a.info for k in ORACLE_KEYS)})
    doc = dict(extra or {}) | {
        "format": MANIFEST_FORMAT, "file": Path(path).name, "md5": file_md5(path), "writer": writer,
        "n_frames": len(frames), "oracles": [dict(zip(ORACLE_KEYS, o)) for o in oracles]}
    out = manifest_path(path)
    atomic_write_text(out, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return out


def verified_manifest(path: str | Path) -> dict | None:
    """The manifest of ``path`` if it is one (a small regular file, :data:`MANIFEST_FORMAT`) and its md5
    is the file's: mlipops wrote these exact bytes. None otherwise (no manifest, or the file changed)."""
    m = manifest_path(path)
    try:
        st = os.stat(m)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:
            return None
        doc = json.loads(m.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        return None
    try:
        return doc if doc.get("md5") == file_md5(path) else None
    except OSError:
        return None


# -------------------------------------------------------------------------------------- writer
def write_extxyz(path: str | Path, frames: Iterable[Atoms]) -> int:
    """Write frames as extxyz (labels from their SinglePointCalculator), as ASE writes them
    (:func:`to_extxyz_string`); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = list(frames)
    with atomic_path(path) as tmp, tmp.open("w") as fh:
        for atoms in frames:
            fh.write(to_extxyz_string(atoms))
    return len(frames)


def to_extxyz_string(atoms: Atoms) -> str:
    """The frame as ASE's extxyz writer writes it (``ase.io.write(..., format="extxyz")``), byte for byte: by
    :func:`_fast_extxyz` for the frames mlipops writes, by ASE for any other."""
    text = _fast_extxyz(atoms)
    if text is not None:
        return text
    import ase.io

    buf = io.StringIO()
    ase.io.write(buf, atoms, format="extxyz")
    return buf.getvalue()


def _ase_scalar(value) -> str | None:
    """ASE's extxyz text of an info scalar (``known_types_to_str``), None for a type left to ASE."""
    if isinstance(value, (bool, np.bool_)):
        return "T" if value else "F"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return f"{value}"
    if isinstance(value, str):
        return value
    return None


_FAST_RESULTS = ("energy", "forces", "stress")


def _fast_extxyz(atoms: Atoms) -> str | None:
    """``ase.io.write(buf, atoms, format="extxyz")``'s text for a frame of species, positions, cell, pbc, scalar or
    1-D numeric info values and SinglePointCalculator energy, forces and stress (what mlipops writes); None for
    anything else (other per-atom arrays, constraints, other results, nested info values), which ASE then
    writes. Three times faster than ASE's writer; tests/test_frames_fast.py checks the bytes are ASE's."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io.extxyz import SPECIAL_3_3_KEYS

    try:
        if set(atoms.arrays) != {"numbers", "positions"} or atoms.constraints:
            return None
        n = len(atoms)
        positions = atoms.arrays["positions"]
        if positions.dtype.kind != "f" or positions.shape != (n, 3) or n == 0:
            return None
        results = {}
        calc = atoms.calc
        if calc is not None:
            if type(calc) is not SinglePointCalculator or not set(calc.results) <= set(_FAST_RESULTS):
                return None
            results = calc.results
        info = atoms.info
        if "pbc" in info or any(k in info for k in results) or any(k in SPECIAL_3_3_KEYS for k in info):
            return None
        parts = []
        if atoms.cell.any():
            parts.append('Lattice="' + " ".join(str(x) for x in np.reshape(atoms.cell.T, 9, order="F")) + '"')
        forces = results.get("forces")
        if forces is not None and (np.shape(forces) != (n, 3) or np.asarray(forces).dtype.kind != "f"):
            return None
        parts.append("Properties=species:S:1:pos:R:3" + (":forces:R:3" if forces is not None else ""))
        items = list(info.items())
        for key in results:
            if key == "energy":
                items.append((key, results[key]))
            elif key == "stress":
                st = np.asarray(results[key])
                if st.shape == (6,):
                    from ase.stress import voigt_6_to_full_3x3_stress

                    st = voigt_6_to_full_3x3_stress(st)
                items.append((key, st))
        items.append(("pbc", atoms.get_pbc()))
        kv = []
        for key, value in items:
            if not isinstance(key, str):
                return None
            if isinstance(value, np.ndarray):
                if key in SPECIAL_3_3_KEYS:
                    value = value.reshape(value.size, order="F")
                if value.ndim != 1 or value.dtype.kind not in "ifb":
                    return None
                text = " ".join(_ase_scalar(v) for v in value)
            else:
                text = _ase_scalar(value)
                if text is None:
                    return None
            kv.append(f"{ase_escape(key)}={ase_escape(text)}")
        parts.append(" ".join(kv).strip())
        symbols = atoms.get_chemical_symbols()
        if forces is None:
            rows = [f"{s:<2s} {x:16.8f} {y:16.8f} {z:16.8f}\n" for s, (x, y, z) in zip(symbols, positions.tolist())]
        else:
            rows = [f"{s:<2s} {x:16.8f} {y:16.8f} {z:16.8f} {fx:16.8f} {fy:16.8f} {fz:16.8f}\n"
                    for s, (x, y, z), (fx, fy, fz) in zip(symbols, positions.tolist(),
                                                          np.asarray(forces, dtype=float).tolist())]
        return f"{n}\n" + " ".join(parts) + "\n" + "".join(rows)
    except Exception:  # noqa: BLE001 -- whatever this does not foresee, ASE writes
        return None


def file_md5(path: str | Path) -> str:
    """md5 of a file's bytes: the hash DVC 3 records for it in dvc.lock (the dataset version)."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def oracle_info(name: str, version: str, settings: dict) -> dict[str, str]:
    """The provenance keys that every labelled frame carries in ``info``."""
    return {"oracle_name": name, "oracle_version": version,
            "oracle_settings": json.dumps(settings, sort_keys=True, default=str)}


def formula(atoms: Atoms) -> str:
    return atoms.get_chemical_formula(mode="hill", empirical=False)


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def safe_name(name: str) -> str:
    return _SAFE.sub("_", name)


__all__ = ["Rejected", "StressField", "stress_to_ase", "iter_ase", "NATIVE_FORMATS",
           "frame_id", "labels", "set_labels", "canonicalize", "iter_extxyz", "iter_frames",
           "parse_extxyz_text", "read_extxyz", "read_db", "read_mlearn_json", "read_frames", "source_name",
           "write_extxyz", "to_extxyz_string", "oracle_info", "write_manifest", "verified_manifest", "formula",
           "MlipopsError", "INFO_KEYS", "PROVENANCE_KEYS", "ORACLE_KEYS"]


def load_split(path: Path = ACCEPTED) -> dict[str, list[Atoms]]:
    """The curated frames of ``path`` by their ``split`` (train, val, test; a frame without one is train)."""
    if not path.is_file():
        raise StageInputError("curated data missing: run `dvc repro validate` first", file=str(path))
    frames, rejected = read_extxyz(path)
    if rejected:
        raise StageInputError(f"{len(rejected)} unreadable frame(s) in curated data; first: {rejected[0].reason}",
                              file=str(path))
    out: dict[str, list[Atoms]] = {"train": [], "val": [], "test": []}
    for a in frames:
        out.setdefault(str(a.info.get("split", "train")), []).append(a)
    if not out["train"]:
        raise StageInputError("no frames in the train split (check ingest.split)", file=str(path),
                              field="split")
    return out
