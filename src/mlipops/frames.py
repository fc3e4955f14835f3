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
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.units import GPa

from mlipops.errors import FrameFormatError, MlipopsError

# mlipops' own info keys; everything else a source carries is kept as it is.
INFO_KEYS = ("frame_id", "config_type", "source", "source_index", "split", "oracle_name",
             "oracle_version", "oracle_settings", "temperature_K", "bo_gap", "bo_epsilon", "bo_breakdown",
             "excited_energies", "state_spin_square")
# per-state info values: always 1-D arrays (extxyz reads a one-element array back as a scalar)
_STATE_ARRAYS = ("excited_energies", "state_spin_square")
_ROUND = 1e-6


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


def canonicalize(atoms: Atoms, *, source: str, source_index: int,
                 default_config_type: str | None = None) -> Atoms:
    """Bring a frame read from anywhere to the canonical schema (labels in a SinglePointCalculator).

    Labels of the wrong shape are not silently fixed: forces whose shape differs from the
    positions' are removed from the labels and their shape recorded in ``info['forces_shape']``
    so the validate stage quarantines the frame with that reason.
    """
    if len(atoms) == 0:
        raise ValueError("frame has no atoms (field 'natoms')")
    for name, arr in (("positions", atoms.positions), ("cell", atoms.cell.array)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"non-finite value (NaN or inf) in field '{name}'")
    energy, forces, stress = labels(atoms)
    out = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    for k, v in atoms.info.items():
        if isinstance(v, (str, int, float, bool, np.integer, np.floating, np.bool_)) or (
            isinstance(v, np.ndarray) and v.ndim == 1
        ):
            out.info[k] = v
    for k in _STATE_ARRAYS:
        if k in out.info:
            out.info[k] = np.atleast_1d(np.asarray(out.info[k], dtype=float))
    if forces is not None and forces.shape != (len(atoms), 3):
        out.info["forces_shape"] = "x".join(str(s) for s in forces.shape)
        forces = None
    if stress is not None and stress.shape != (6,):
        out.info["stress_shape"] = "x".join(str(s) for s in stress.shape)
        stress = None
    set_labels(out, energy, forces, stress)
    out.info["frame_id"] = frame_id(out)
    out.info["source"] = str(out.info.get("source", source))
    out.info["source_index"] = int(out.info.get("source_index", source_index))
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
        return f"unknown element or missing key {exc.args[0]!r} (field 'species')"
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, ValueError) and raw is not None:
        where = _bad_value(raw, first_line or 1)
        if where is not None:
            return where
        item = re.match(r"Got info item (\w+)", msg)
        if item:
            return f"field '{item.group(1)}': {type(exc).__name__}: {msg}"
    return f"{type(exc).__name__}: {msg}"


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


def _decode_error(path: Path, exc: UnicodeDecodeError) -> FrameFormatError:
    """The file is not UTF-8 text: name the frame, the field and the line where the first bad byte
    sits (found by the natoms lines of what precedes it), and say what the file seems to be."""
    data = path.read_bytes()
    pos = exc.start
    bad_line = data.count(b"\n", 0, pos)  # 0-based line of the bad byte
    lines = data.split(b"\n")
    kind = next((what for magic, what in _MAGIC.items() if data.startswith(magic)), None)
    if kind is None and b"\x00" in data[:4096]:
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


def iter_extxyz(path: str | Path, *, source: str | None = None, default_config_type: str | None = None,
                progress: Callable[[int], None] | None = None, with_text: bool = False,
                **canon) -> Iterator[Atoms | Rejected]:
    """Stream the frames of an extxyz file in order: canonical frames, and Rejected records for the
    unparseable ones. Memory is bounded by the largest frame, not the file. ``progress(bytes)``: called
    after each frame with the bytes read so far; ``with_text``: yield (frame, its text in the file) pairs;
    ``canon``: passed on to :func:`canonicalize`."""
    path = Path(path)
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        raise FrameFormatError("file not found", file=str(path)) from None
    except OSError as exc:
        raise FrameFormatError(f"cannot read: {exc}", file=str(path)) from None
    with fh:
        yield from _iter_handle(fh, str(path), source or path.stem, default_config_type, progress, canon, with_text)


def parse_extxyz_text(text: str, *, source: str, name: str = "<text>", **canon) -> list[Atoms | Rejected]:
    """The frames of extxyz text held in memory (e.g. a quarantined frame's ``extxyz``), as
    :func:`iter_extxyz` reads them from a file named ``name``."""
    return list(_iter_handle(io.BytesIO(text.encode("utf-8")), name, source, None, None, canon))


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


def _ase_value(key: str, value: str):
    from ase.io.extxyz import SPECIAL_3_3_KEYS, UNPROCESSED_KEYS

    if key.lower() in UNPROCESSED_KEYS:
        return value
    split_value = _NUMBERS.findall(value)
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


def _ase_frame(raw: str) -> Atoms:
    try:
        from ase.io.extxyz import _read_xyz_frame
    except ImportError:  # a future ASE without the private frame reader: its public one
        import ase.io

        return ase.io.read(io.StringIO(raw), format="extxyz")
    lines = raw.splitlines(keepends=True)
    return _read_xyz_frame(iter(lines[1:]), int(lines[0]), properties_parser=_comment_dict)


def _iter_handle(fh, name: str, src: str, default_config_type: str | None,
                 progress: Callable[[int], None] | None, canon: dict, with_text: bool = False) -> Iterator:
    n = 0
    try:
        for k, line, raw in _split_extxyz(_lines(fh, name), name):
            n += 1
            if progress is not None:
                progress(fh.tell())
            try:
                atoms = _read_frame(raw)
                out = canonicalize(atoms, source=src, source_index=k, default_config_type=default_config_type,
                                   **canon)
            except Exception as exc:  # ASE raises many types on malformed frames
                out = Rejected(src, k, "parse", f"{name} frame {k}: {_explain(exc, raw, line)}", raw)
            yield (out, raw) if with_text else out
    except OSError as exc:  # a directory, an unreadable device
        raise FrameFormatError(f"cannot read: {exc}", file=name) from None
    if not n:
        raise FrameFormatError("contains no frames", file=name)


def read_extxyz(path: str | Path, *, source: str | None = None, default_config_type: str | None = None,
                **canon) -> tuple[list[Atoms], list[Rejected]]:
    """Read every frame of an extxyz file; unparseable frames come back as Rejected records
    (:func:`iter_extxyz` into two lists)."""
    frames: list[Atoms] = []
    rejected: list[Rejected] = []
    for item in iter_extxyz(path, source=source, default_config_type=default_config_type, **canon):
        (rejected if isinstance(item, Rejected) else frames).append(item)
    return frames, rejected


def read_db(path: str | Path, *, source: str | None = None,
            default_config_type: str | None = None) -> tuple[list[Atoms], list[Rejected]]:
    """Read an ASE database file (``.db``/``.json`` written by ``ase.db``)."""
    import ase.db

    path = Path(path)
    if not path.is_file():
        raise FrameFormatError("file not found", file=str(path))
    src = source or path.stem
    frames, rejected = [], []
    try:
        con = ase.db.connect(str(path))
        rows = list(con.select())
    except Exception as exc:
        raise FrameFormatError(f"not a readable ASE database: {_explain(exc)}", file=str(path)) from None
    for k, row in enumerate(rows):
        try:
            atoms = row.toatoms(add_additional_information=False)
            atoms.info.update({kk: vv for kk, vv in row.key_value_pairs.items()})
            frames.append(canonicalize(atoms, source=src, source_index=k, default_config_type=default_config_type))
        except Exception as exc:
            rejected.append(Rejected(src, k, "parse", f"{path} row {row.id}: {_explain(exc)}", str(dict(row))))
            continue
    return frames, rejected


def _mlearn_atoms(doc: dict) -> Atoms:
    struct = doc["structure"]
    cell = np.asarray(struct["lattice"]["matrix"], dtype=float)
    symbols, positions = [], []
    for site in struct["sites"]:
        species = site["species"]
        symbols.append(species[0]["element"])
        positions.append(site["xyz"] if "xyz" in site else np.asarray(site["abc"]) @ cell)
    atoms = Atoms(symbols=symbols, positions=positions, cell=cell, pbc=True)
    out = doc.get("outputs", {})
    stress = None
    if out.get("virial_stress") is not None:
        v = np.asarray(out["virial_stress"], dtype=float)  # VASP kBar, xx yy zz xy yz zx
        stress = -0.1 * GPa * v[[0, 1, 2, 4, 5, 3]]
    set_labels(atoms, out.get("energy"), out.get("forces"), stress)
    if "group" in doc:
        atoms.info["config_type"] = doc["group"]
    if "description" in doc:
        atoms.info["description"] = str(doc["description"]).replace(" ", "_")
    return atoms


def read_mlearn_json(path: str | Path, *, source: str | None = None,
                     default_config_type: str | None = None) -> tuple[list[Atoms], list[Rejected]]:
    """Read mlearn's json format (a list of {structure (pymatgen dict), outputs, group, ...})."""
    path = Path(path)
    if not path.is_file():
        raise FrameFormatError("file not found", file=str(path))
    try:
        docs = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FrameFormatError(f"not valid JSON: {exc}", file=str(path)) from None
    if not isinstance(docs, list):
        raise FrameFormatError("expected a JSON list of structures (mlearn format)", file=str(path))
    src = source or path.stem
    frames, rejected = [], []
    for k, doc in enumerate(docs):
        try:
            atoms = _mlearn_atoms(doc)
            frames.append(canonicalize(atoms, source=src, source_index=k, default_config_type=default_config_type))
        except Exception as exc:
            rejected.append(Rejected(src, k, "parse", f"{path} frame {k}: {_explain(exc)}",
                                     json.dumps(doc)[:100000]))
            continue
    return frames, rejected


def read_frames(path: str | Path, fmt: str = "auto", *, source: str | None = None,
                default_config_type: str | None = None) -> tuple[list[Atoms], list[Rejected]]:
    """Read a structure file of any supported format into canonical frames + rejected records."""
    p = Path(path)
    if fmt == "auto":
        suffix = p.suffix.lower()
        if suffix in (".xyz", ".extxyz"):
            fmt = "extxyz"
        elif suffix == ".db":
            fmt = "db"
        elif suffix == ".json":
            fmt = "mlearn_json" if _looks_like_mlearn(p) else "db"
        else:
            raise FrameFormatError(f"cannot tell the format from suffix {suffix!r}; set 'format' "
                                   "(extxyz, db, mlearn_json) in params.yaml", file=str(p))
    reader = {"extxyz": read_extxyz, "db": read_db, "mlearn_json": read_mlearn_json}[fmt]
    return reader(p, source=source, default_config_type=default_config_type)


def iter_frames(path: str | Path, fmt: str = "auto", *, source: str | None = None,
                default_config_type: str | None = None,
                progress: Callable[[int], None] | None = None) -> Iterator[Atoms | Rejected]:
    """:func:`read_frames` as a stream: extxyz frame by frame in file order (bounded memory); the other
    formats are read whole, then their frames and rejected records yielded. ``progress(bytes)`` is
    called with the bytes of the file read so far."""
    p = Path(path)
    if fmt == "extxyz" or (fmt == "auto" and p.suffix.lower() in (".xyz", ".extxyz")):
        yield from iter_extxyz(p, source=source, default_config_type=default_config_type, progress=progress)
        return
    frames, rejected = read_frames(p, fmt, source=source, default_config_type=default_config_type)
    if progress is not None:
        progress(p.stat().st_size)
    yield from frames
    yield from rejected


def _looks_like_mlearn(p: Path) -> bool:
    try:
        with p.open() as fh:
            head = fh.read(4096).lstrip()
    except OSError:
        return False
    return head.startswith("[") and '"structure"' in head


# -------------------------------------------------------------------------------------- writer
def write_extxyz(path: str | Path, frames: Iterable[Atoms]) -> int:
    """Write frames as extxyz (labels from their SinglePointCalculator); returns the count."""
    import ase.io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = list(frames)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as fh:
        for atoms in frames:
            ase.io.write(fh, atoms, format="extxyz")
    tmp.replace(path)
    return len(frames)


def to_extxyz_string(atoms: Atoms) -> str:
    import ase.io

    buf = io.StringIO()
    ase.io.write(buf, atoms, format="extxyz")
    return buf.getvalue()


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


__all__ = ["Rejected", "frame_id", "labels", "set_labels", "canonicalize", "iter_extxyz", "iter_frames",
           "read_extxyz", "read_db",
           "read_mlearn_json", "read_frames", "write_extxyz", "to_extxyz_string", "oracle_info",
           "formula", "MlipopsError", "INFO_KEYS"]
