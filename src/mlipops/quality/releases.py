"""Releasing quarantined frames by hand, with a recorded reason.

A release never edits the quarantine (a DVC output of the validate stage). It appends an entry to
``data/quarantine_releases.yaml`` (tracked by git, a dependency of the validate stage): the frame_id,
why, who and when, and the checks the frame had failed. On the next ``dvc repro`` the validate
stage accepts the released frames despite those checks, and says so in its summary and metrics.
A frame that later fails a *different* check is quarantined again: a release covers the checks
it names, nothing else.

Releases from several processes at once all land: the read-modify-write of the file runs under an
exclusive ``fcntl.flock`` on ``data/quarantine_releases.yaml.lock`` (released by the kernel when the
process ends, even on kill -9), and the new content goes to a temporary file of this process in the
same directory, then ``os.replace`` (a reader sees the old file or the new one, never a part).
"""

from __future__ import annotations

import fcntl
import getpass
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml

from mlipops.errors import MlipopsError
from mlipops.paths import atomic_write_text
from mlipops.pipeline import RELEASES


HEADER = ("# Quarantined frames released by hand (`mlipops quarantine release FRAME_ID --why ...`).\n"
          "# The validate stage accepts a released frame despite the checks listed; keep this file in git.\n")


@contextmanager
def _locked(path: Path):
    """Hold the exclusive lock of ``path`` (``<path>.lock``, created if absent; never removed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _write(path: Path, releases: dict[str, dict]) -> None:
    """Atomic: a temporary file of this process next to ``path``, flushed to disk, then renamed."""
    text = HEADER + yaml.safe_dump({"releases": list(releases.values())}, sort_keys=False, allow_unicode=True)
    atomic_write_text(path, text, fsync=True)


def load_releases(path: Path = RELEASES) -> dict[str, dict]:
    """{frame_id: entry}; an absent file means no releases."""
    if not path.is_file():
        return {}
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MlipopsError(f"not valid YAML: {str(exc).splitlines()[0]}", file=str(path)) from None
    entries = doc.get("releases") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "frame_id" in e and "checks" in e
                                                for e in entries):
        raise MlipopsError("expected 'releases:' as a list of entries with frame_id and checks", file=str(path),
                           field="releases")
    return {str(e["frame_id"]): e for e in entries}


def covering_release(releases: dict[str, dict], frame_id: str, checks) -> dict | None:
    """The release of ``frame_id`` (``releases``: :func:`load_releases`) when it names every check the frame
    failed (``checks``: (check, reason) pairs), else None: a release covers the checks it names, nothing else."""
    entry = releases.get(frame_id)
    return entry if entry and {c for c, _ in checks} <= set(entry["checks"]) else None


def release(frame_id: str, why: str, quarantine: Path, path: Path = RELEASES) -> dict:
    """Record the release of one quarantined frame; returns the entry written."""
    if not why or not why.strip():
        raise MlipopsError("say why the frame is released (--why)", field="why")
    if not quarantine.is_file():
        raise MlipopsError("no quarantine: run `dvc repro validate` first", file=str(quarantine))
    q = pd.read_parquet(quarantine)
    rows = q[q["frame_id"] == frame_id] if len(frame_id) == 64 else q[q["frame_id"].str.startswith(frame_id)]
    if rows.empty:
        raise MlipopsError(f"frame {frame_id} is not in the quarantine", file=str(quarantine), field="frame_id")
    if rows["frame_id"].nunique() > 1:
        raise MlipopsError(f"prefix {frame_id} matches {rows['frame_id'].nunique()} frames: give more of the id",
                           file=str(quarantine), field="frame_id")
    row = rows.iloc[0]
    if row.get("stage") == "ingest":
        raise MlipopsError(f"frame {row['frame_id'][:12]} was rejected at ingest ({row['check']}: an unreadable "
                           "frame or a duplicate); fix the source file instead", file=str(quarantine),
                           field="frame_id")
    entry = {"frame_id": str(row["frame_id"]), "checks": str(row["check"]).split(","), "why": why.strip(),
             "released_by": os.environ.get("GIT_AUTHOR_NAME") or getpass.getuser(),
             "released_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "source": str(row["source"]), "source_index": int(row["source_index"]),
             "reason_at_release": str(row["reason"])}
    with _locked(path):  # read, add, write: one release at a time, none lost
        releases = load_releases(path)
        releases[entry["frame_id"]] = entry
        _write(path, releases)
    return entry
