"""Graduate an active-learning campaign: its labels become a versioned source of the pipeline's own dataset.

``mlipops active graduate [--iteration N] [--name NAME]`` (run in the project root, a DVC repository):

1. takes the labelled frames of iterations ``0..N`` of the campaign in ``<active.work_dir>/state.json``
   (``<active.out_dir>/active_<i>.extxyz``; default N: the last iteration whose labels are written).
   **All** labelled frames, not only those the campaign's own curation accepted: the pipeline's validate
   stage judges them again, against the whole data, and quarantines a bad one with its reason in
   ``data/curated/quarantine.parquet`` (nothing is lost either way; a label-only campaign has no
   acceptance at all). Each label file's manifest must verify (the bytes the campaign wrote);
2. writes them to ``data/raw/<NAME>.extxyz`` (default NAME ``active_<first 8 of the campaign id>``, the
   id being the campaign's params fingerprint, as in its MLflow run name) with their info (``active_iteration``,
   ``trigger_reason``, ``oracle_*``, ...; ``source``/``source_index`` those of the new file, no ``split``: ingest
   sets it) plus ``active_campaign`` = the campaign id, and its provenance manifest
   ``<file>.provenance.json`` (writer ``mlipops active graduate``; ingest keeps the frames' ``oracle_*``
   because it verifies) whose ``campaign`` records where the frames came from: id, work_dir, iterations,
   frames per iteration, frames the campaign's curation accepted, MLflow parent run id, label files and
   their md5, date;
3. ``dvc add``\\ s both files (DVC tracks them: ``<file>.dvc``), appends ``{path, split: train}`` to
   ``ingest.sources`` in params.yaml and both files to the ingest stage's deps in dvc.yaml (ruamel.yaml round
   trip: comments and layout stay).

Idempotent: graduating again (a later N) rewrites the file and its manifest, updates the DVC tracking and adds
no second entry; the same frames again change no byte (the manifest keeps its date). The next ``dvc repro``
re-ingests, re-curates, re-indexes and retrains; a promoted version's model card names the campaign
(:mod:`mlipops.promote.registry`, from the manifest).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mlipops.active.state import ActiveState, read_state
from mlipops.errors import MlipopsError
from mlipops.examples import round_trip_yaml
from mlipops.frames import manifest_path, read_extxyz, source_name, verified_manifest, write_extxyz, write_manifest
from mlipops.params import load_params
from mlipops.pipeline import RAW_DIR

WRITER = "mlipops active graduate"
LABEL_WRITER = "mlipops active run"
DVC_YAML = Path("dvc.yaml")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_LABELLED_PHASES = ("curate", "train", "score")  # phases of an iteration whose label file is written


@dataclass
class Graduation:
    """What :func:`graduate` did."""

    data: Path  # data/raw/<name>.extxyz
    manifest: Path  # its provenance manifest
    campaign: dict  # the record in the manifest
    changed: bool  # the file or its manifest changed (False: the same frames were graduated before)
    params_added: bool  # ingest.sources got the entry
    deps_added: list[str] = field(default_factory=list)  # added to the ingest stage's deps
    dvc_files: list[str] = field(default_factory=list)  # the .dvc files of the two files


def labelled_iterations(st: ActiveState) -> list[int]:
    """The iterations whose label phase is done (their ``active_<i>.extxyz`` is written, if they labelled any)."""
    done = list(range(st.iteration))
    return done + [st.iteration] if st.phase in _LABELLED_PHASES else done


def _campaign_frames(st: ActiveState, out_dir: Path, upto: int) -> tuple[list, dict[int, dict]]:
    frames, per = [], {}
    for i in range(upto + 1):
        f = out_dir / f"active_{i}.extxyz"
        if not f.is_file():
            continue  # an iteration that labelled nothing writes no file
        m = verified_manifest(f)
        if m is None or m.get("writer") != LABEL_WRITER:
            raise MlipopsError(f"label file not as the campaign wrote it (its manifest {manifest_path(f).name} is "
                               "missing or does not verify): its oracle provenance cannot be vouched for", file=str(f))
        got, bad = read_extxyz(f)
        if bad:
            raise MlipopsError(f"unreadable labelled frame: {bad[0].reason}", file=str(f), frame=bad[0].source_index)
        frames += got
        per[i] = {"file": f.as_posix(), "md5": m["md5"], "n_frames": len(got)}
    return frames, per


def _accepted_by_campaign(st: ActiveState, upto: int) -> int | None:
    rows = [h for h in st.history if h.get("iteration", -1) <= upto and "curate.n_accepted_new" in h]
    return sum(int(h["curate.n_accepted_new"]) for h in rows) if rows else None


def _load_yaml(path: Path):
    y = round_trip_yaml(width=4096)  # no re-wrapping of long lines
    return y, y.load(path.read_text())


def _dump_yaml(y, doc, path: Path) -> None:
    import io

    from mlipops.paths import atomic_write_text

    buf = io.StringIO()
    y.dump(doc, buf)
    atomic_write_text(path, buf.getvalue())


def _add_source(params_path: Path, data: str) -> bool:
    y, doc = _load_yaml(params_path)
    sources = (doc.get("ingest") or {}).get("sources")
    if sources is None:
        raise MlipopsError("no ingest.sources to add the graduated file to", file=str(params_path),
                           field="ingest.sources")
    if any(Path(str(s.get("path"))) == Path(data) for s in sources):
        return False
    from ruamel.yaml.comments import CommentedMap

    entry = CommentedMap(path=data, split="train")
    entry.fa.set_flow_style()  # {path: ..., split: train}: one line
    sources.append(entry)
    _dump_yaml(y, doc, params_path)
    return True


def _add_deps(dvc_yaml: Path, paths: list[str]) -> list[str]:
    y, doc = _load_yaml(dvc_yaml)
    stage = ((doc.get("stages") or {}).get("ingest"))
    if stage is None:
        raise MlipopsError("no ingest stage", file=str(dvc_yaml), field="stages.ingest")
    deps = stage.setdefault("deps", [])
    have = {str(next(iter(d))) if isinstance(d, dict) else str(d) for d in deps}
    added = [p for p in paths if p not in have]
    if added:
        deps.extend(added)
        _dump_yaml(y, doc, dvc_yaml)
    return added


def _dvc_add(paths: list[str]) -> list[str]:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(".") as repo:
            repo.add(paths)
    except DvcException as exc:
        raise MlipopsError(f"dvc add failed: {exc}", file=", ".join(paths)) from None
    return [p + ".dvc" for p in paths]


def graduate(params_path: str | Path = "params.yaml", iteration: int | None = None, name: str | None = None,
             dvc_yaml: str | Path = DVC_YAML) -> Graduation:
    """Graduate the campaign of ``params_path``'s ``active`` section (module doc), in the current directory
    (the project root). :class:`MlipopsError` naming the file and field: no campaign, ``iteration`` not labelled
    yet, a ``name`` that would overwrite a file ``mlipops active graduate`` did not write, no DVC repository."""
    params_path, dvc_yaml = Path(params_path), Path(dvc_yaml)
    if not Path(".dvc").is_dir():
        raise MlipopsError("not a DVC repository (no .dvc folder here): run it in the project root, after "
                           "`dvc init`", file=str(Path.cwd()))
    if not dvc_yaml.is_file():
        raise MlipopsError("no pipeline file", file=str(dvc_yaml))
    p = load_params(params_path)
    work_dir, out_dir = Path(p.active.work_dir), Path(p.active.out_dir)
    state_file = work_dir / "state.json"
    if not state_file.is_file():
        raise MlipopsError("no active-learning campaign: run `mlipops active run` (or `dvc repro active`) first",
                           file=str(state_file))
    st = read_state(state_file)
    done = labelled_iterations(st)
    if not done:
        raise MlipopsError(f"no iteration of the campaign is labelled yet (iteration {st.iteration}, phase "
                           f"{st.phase!r}): run `mlipops active run` on", file=str(state_file), field="iteration")
    upto = done[-1] if iteration is None else iteration
    if upto not in done:
        raise MlipopsError(f"iteration {upto} is not labelled yet (labelled: 0..{done[-1]})", file=str(state_file),
                           field="iteration")
    campaign_id = st.params_fingerprint
    name = name or f"active_{campaign_id[:8]}"
    name = name.removesuffix(".extxyz")
    if not _NAME.match(name):
        raise MlipopsError(f"{name!r} is no file name (letters, digits, '_', '.', '-')", field="name")
    data = RAW_DIR / f"{name}.extxyz"
    manifest = manifest_path(data)
    if data.exists() or manifest.exists():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict) or old.get("writer") != WRITER:
            raise MlipopsError("exists and was not written by `mlipops active graduate`: choose another --name",
                               file=str(data), field="name")
    else:
        old = None
    for k, src in enumerate(p.ingest.sources):
        if source_name(src.path) == name and Path(src.path) != data:
            raise MlipopsError(f"ingest.sources[{k}] ({src.path}) has the source name {name!r} already: choose "
                               "another --name", file=str(params_path), field=f"ingest.sources[{k}]")
    frames, per = _campaign_frames(st, out_dir, upto)
    if not frames:
        raise MlipopsError(f"iterations 0..{upto} labelled no frame", file=str(out_dir), field="iteration")
    for k, a in enumerate(frames):
        a.info.pop("split", None)  # ingest sets it (the source's split: train)
        a.info.update(source=name, source_index=k, active_campaign=campaign_id)
    record = {"id": campaign_id, "work_dir": work_dir.as_posix(), "iterations": sorted(per), "up_to_iteration": upto,
              "n_frames": len(frames), "label_files": [per[i] for i in sorted(per)],
              "n_accepted_by_campaign": _accepted_by_campaign(st, upto),
              "mlflow_run_id": st.mlflow.get("parent_run_id"),
              "graduated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    old_record = (old or {}).get("campaign") or {}
    same = ({k: v for k, v in old_record.items() if k != "graduated"}
            == {k: v for k, v in record.items() if k != "graduated"})
    if same and "graduated" in old_record:
        record["graduated"] = old_record["graduated"]  # the same frames: the same bytes, nothing for DVC to redo
    before = (verified_manifest(data) or {}).get("md5") if data.is_file() else None
    old_text = manifest.read_text() if manifest.is_file() else None
    write_extxyz(data, frames)
    write_manifest(data, frames, WRITER, extra={"campaign": record})
    changed = not (same and before is not None and old_text == manifest.read_text())
    dvc_files = _dvc_add([data.as_posix(), manifest.as_posix()])
    added = _add_source(params_path, data.as_posix())
    deps = _add_deps(dvc_yaml, [data.as_posix(), manifest.as_posix()])
    return Graduation(data, manifest, record, changed, added, deps, dvc_files)


__all__ = ["Graduation", "graduate", "labelled_iterations", "WRITER"]
