"""Where the pipeline may write: names, project paths, and the one guard every removal and move goes through.

The project root is the directory that holds ``params.yaml`` and the working directory of every stage.
What is trusted, and what is not:

* **Names** used as a file or folder name (``train.model_name``, ``generate.name``, ``bo_scan.name``, the
  melting sweep's ``config_type``, a registry model name or alias) are letters, digits, ``_`` and ``-``
  only (:data:`NAME`): no ``/``, no ``..``, never empty.
* **Outputs** (folders a stage writes, moves or removes: ``active.out_dir``, ``active.work_dir``,
  ``promote.registry_dir``) are relative paths that resolve, symlinks followed, inside ``data/``,
  ``registry/`` or ``reports/`` of the project (:data:`WRITABLE`); the MLflow artifact folder
  (``train.artifact_location``) inside the project.
* **Read-only inputs** (``ingest.sources``, ``evaluate.paths.files``, ``active.holdout.file``,
  ``bo_scan.path.file``, ``active.model`` as a folder, ``active.base_data``, ``active.base_quarantine``,
  ``active.index``) may lie anywhere (a shared dataset such as ``../shared/datasets/mlearn``): they are
  only read, never written, moved or removed.
* **Removal and moves** go through :func:`safe_remove` / :func:`safe_move`, which refuse, whatever the params
  said, any path that does not resolve strictly inside ``data/``, ``registry/`` or ``reports/`` of the
  current project (the folders themselves included): even with validation bypassed, ``rm -rf /`` cannot
  happen.
* **Files** are replaced whole: written to a hidden temporary sibling, then renamed over the old one
  (:func:`atomic_path`, :func:`atomic_write_text`): a reader, or a run killed half-way, sees the old file or
  the new one, never a part.
* **Registry references** (``NAME``, ``NAME@alias``, ``NAME@vN``) resolve only to ``<registry>/NAME/vN``
  folders that hold a registry version's files (:func:`registry_version`); a path given instead must be
  such a folder.

Error messages quote at most :data:`SHOWN` characters of what the user wrote (:func:`clip`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

from mlipops.errors import MlipopsError

NAME = re.compile(r"^[A-Za-z0-9_-]+$")
WRITABLE = ("data", "registry", "reports")  # the only top-level folders a stage writes into or removes from
SHOWN = 200  # characters of user content an error message may quote
# the files every promoted version holds (promote/registry.py writes them before the folder gets its name)
REGISTRY_VERSION_FILES = ("weights.pt", "config.json", "gates.json", "model_card.md")
_VERSION = re.compile(r"^v([0-9]{1,9})$")


def cut(text: str, limit: int = SHOWN) -> str:
    """``text`` cut to ``limit`` characters (an error message never echoes a whole file or document)."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"…(+{len(text) - limit} chars)"


def clip(value, limit: int = SHOWN) -> str:
    """``repr`` of a user value, cut to ``limit`` characters."""
    return cut(repr(value), limit)


def name_error(value) -> str | None:
    """Why ``value`` is not a name usable as a file or folder name, or None."""
    if not isinstance(value, str) or NAME.fullmatch(value) is None:
        return (f"{clip(value)} is not a name: use letters, digits, '_' and '-' only (it becomes a file or "
                "folder name)")
    return None


def relative_error(value: str) -> str | None:
    """Why ``value`` is not a plain project-relative path (lexically), or None."""
    if not isinstance(value, str) or not value.strip():
        return "an empty path"
    if "\x00" in value:
        return f"{clip(value)} contains a NUL character"
    if value.startswith("~") or PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute() \
            or PureWindowsPath(value).drive:
        return f"{clip(value)} is an absolute path: write it relative to the project root"
    if "://" in value or value.startswith("file:"):
        return f"{clip(value)} is a URI: write a path relative to the project root"
    if ".." in PurePosixPath(value.replace("\\", "/")).parts:
        return f"{clip(value)} contains '..': a path must stay inside the project"
    return None


def project_root() -> Path:
    """The current project's root (the working directory of every stage), symlinks resolved."""
    return Path.cwd().resolve()


def writable_roots(root: str | Path | None = None) -> list[Path]:
    """``data/``, ``registry/``, ``reports/`` of the project, resolved; a folder whose symlink leads out of the
    project is left out (nothing is written through it)."""
    base = Path(root).resolve() if root is not None else project_root()
    out = []
    for d in WRITABLE:
        r = (base / d).resolve()
        if r.is_relative_to(base):
            out.append(r)
    return out


def _location(path: Path, follow: bool) -> Path:
    """Where ``path`` leads (``follow``: symlinks followed all the way), or where its own entry lies (its parent
    resolved by the file system, ``link/..`` being the link target's parent as the kernel sees it, its own
    name kept: a symlink to remove or move is not followed)."""
    path = Path(path)
    if follow or path.name in ("", ".", ".."):
        return path.resolve()
    return path.parent.resolve() / path.name


def inside_error(value: str, root: str | Path, *, writable: bool, strict: bool = False) -> str | None:
    """Why the project-relative ``value`` does not resolve (symlinks followed) inside ``root`` (``writable``:
    inside one of its ``data/``, ``registry/``, ``reports/``; ``strict``: below, not equal to, that folder)."""
    err = relative_error(value)
    if err:
        return err
    base = Path(root).resolve()
    target = (base / value).resolve()
    if not writable:
        return None if target.is_relative_to(base) else f"{clip(value)} leads out of the project (symlink)"
    for r in writable_roots(base):
        if target.is_relative_to(r) and not (strict and target == r):
            return None
    below = "a folder below" if strict else "inside"
    return f"{clip(value)} must lie {below} data/, registry/ or reports/ of the project (outputs are written there)"


def ensure_writable(path: str | Path, *, what: str = "write to", strict: bool = True, follow: bool = True) -> Path:
    """``path`` if it lies inside ``data/``, ``registry/`` or ``reports/`` of the current project (``strict``:
    not one of those folders itself), else a one-line :class:`MlipopsError`. Symlinks are followed (what is
    written goes where they lead), but with ``follow=False`` the path's own entry is judged where it lies (an
    entry to remove or move: a symlink is removed, not its target)."""
    loc = _location(Path(path), follow)
    for r in writable_roots():
        if loc.is_relative_to(r) and not (strict and loc == r):
            return Path(path)
    raise MlipopsError(f"refusing to {what} {clip(str(path))}: only folders inside data/, registry/ or reports/ "
                       f"of the project ({project_root()}) are written or removed")


def safe_remove(path: str | Path, *, ignore_errors: bool = False) -> None:
    """Remove a file, a symlink (not its target) or a folder tree inside ``data/``, ``registry/`` or
    ``reports/`` of the current project; anything else is refused (:func:`ensure_writable`). A missing
    path is nothing to do."""
    path = ensure_writable(path, what="remove", follow=False)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=ignore_errors)


def safe_move(src: str | Path, dst: str | Path) -> None:
    """``shutil.move`` with both ends inside ``data/``, ``registry/`` or ``reports/`` (:func:`ensure_writable`)."""
    ensure_writable(src, what="move", follow=False)
    ensure_writable(dst, what="move to")
    shutil.move(str(src), str(dst))


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Replace the file ``path`` whole or not at all: yields a temporary sibling to write (same folder, a hidden
    name with the pid and a random part: concurrent writers, processes or threads, never share one), renamed
    over ``path`` (``os.replace``) when the block ends, removed when it raises. ``fsync``: its bytes reach the
    disk before the rename. The folder must exist."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = False) -> None:
    """``Path(path).write_text(text)``, atomically (:func:`atomic_path`)."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text)


def read_registry_index(registry_dir: str | Path, *, missing: str = "promote a model first") -> dict:
    """The registry's ``index.json`` (``{"models": {NAME: {"versions": [...], "aliases": {...}}}}``), checked to
    be JSON with a ``models`` mapping; a one-line error when it is missing (``missing``: what to do) or not."""
    path = Path(registry_dir) / "index.json"
    if not path.is_file():
        raise MlipopsError(f"registry index missing ({missing})", file=str(path))
    try:
        index = json.loads(path.read_text())
        index["models"].items()
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise MlipopsError(f"unreadable registry index: {cut(exc)}", file=str(path)) from None
    return index


def registry_version(ref: str | Path, registry_dir: str | Path) -> Path:
    """The folder ``<registry_dir>/NAME/vN`` of a registry reference: ``NAME@alias``, ``NAME@vN`` (a
    ``registry:`` prefix is optional), a bare ``NAME`` (= ``NAME@champion``), or the path of such a
    folder. Names and aliases are :data:`NAME`\\ s; the version comes from ``index.json``, the folder from
    the name and version alone (never from a path written in the index), must resolve inside the registry
    and hold a version's files (:data:`REGISTRY_VERSION_FILES`). Anything else is a one-line error."""
    registry_dir = Path(registry_dir)
    text = str(ref)
    index_path = registry_dir / "index.json"
    if "@" not in text and not NAME.fullmatch(text.removeprefix("registry:")):
        return _version_folder(Path(text), registry_dir)
    name, _, alias = text.removeprefix("registry:").partition("@")
    alias = alias or "champion"
    if NAME.fullmatch(name) is None or NAME.fullmatch(alias) is None:
        raise MlipopsError(f"{clip(text)} is not a registry reference NAME@alias, NAME@vN or NAME (letters, digits, "
                           "'_' and '-')")
    entry = read_registry_index(registry_dir)["models"].get(name)
    if entry is not None and not isinstance(entry, dict):
        raise MlipopsError("unreadable registry index: a model entry is not a mapping", file=str(index_path))
    if entry is None:
        raise MlipopsError(f"model {name!r} is not in the registry", file=str(index_path))
    m = _VERSION.fullmatch(alias)
    aliases = entry.get("aliases") or {}
    version = int(m[1]) if m else aliases.get(alias) if isinstance(aliases, dict) else None
    if version is None:
        raise MlipopsError(f"{name} has no alias {alias!r} (aliases: {clip(sorted(aliases))})", file=str(index_path))
    try:
        known = {int(v["version"]) for v in entry.get("versions", [])}
        version = int(version)
    except (ValueError, KeyError, TypeError):
        raise MlipopsError(f"unreadable registry index entry of {name}", file=str(index_path)) from None
    if version not in known:
        raise MlipopsError(f"{name} has no version {version}", file=str(index_path))
    return _checked(registry_dir / name / f"v{version}", registry_dir)


def _version_folder(path: Path, registry_dir: Path) -> Path:
    """A folder given by path: accepted only as ``<registry_dir>/NAME/vN`` of a real version."""
    try:
        loc = path.resolve()
        reg = registry_dir.resolve()
    except (OSError, RuntimeError):
        loc, reg = None, None
    if (loc is None or loc.parent.parent != reg or NAME.fullmatch(loc.parent.name) is None
            or _VERSION.fullmatch(loc.name) is None):
        raise MlipopsError(f"{clip(str(path))}: not a registry reference (NAME@alias, NAME@vN, NAME) nor a "
                           f"version folder <registry>/NAME/vN of the registry {registry_dir}")
    return _checked(path, registry_dir)


def _checked(folder: Path, registry_dir: Path) -> Path:
    """``folder`` if it resolves to a real version folder inside ``registry_dir``."""
    reg = registry_dir.resolve()
    loc = folder.resolve()
    if not loc.is_relative_to(reg) or loc.parent.parent != reg:
        raise MlipopsError(f"{clip(str(folder))} leads out of the registry {registry_dir} (symlink)")
    missing = [f for f in REGISTRY_VERSION_FILES if not (loc / f).is_file() or (loc / f).is_symlink()]
    if not loc.is_dir() or missing:
        raise MlipopsError(f"not a registry version folder (missing {', '.join(missing) or 'the folder'})",
                           file=str(folder))
    return folder
