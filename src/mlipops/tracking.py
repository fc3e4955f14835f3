"""MLflow plumbing: the project's store (sqlite + local artifacts by default), provenance tags.

The store is the project's: ``train.tracking_uri: sqlite:///mlflow.db`` and ``train.artifact_location:
mlartifacts`` are relative to the project root (the working directory of every stage) and resolved
when a stage runs; what the pipeline writes (``data/models/<name>/run.json``, the registry's copy of
it) holds that configured URI and run ids, never an absolute path. ``MLFLOW_TRACKING_URI`` overrides
the params (a user's tracking server).

A tracking server (``http(s)://``, from ``MLFLOW_TRACKING_URI`` or ``train.tracking_uri``: :func:`is_server`) keeps
its own artifact store: an experiment mlipops creates there gets the server's default artifact root (served
artifacts: ``mlflow-artifacts:/``, uploaded and downloaded through the server), never a folder of this project
(a project-relative ``train.artifact_location`` is ignored; a remote store's URI is kept), and ``run.json``
records the server's URI, the same from every project (:func:`recorded_uri`).

MLflow itself records absolute artifact locations in its sqlite file (experiments, runs, model
versions, logged models, trace tags, the workspace's default root). A project copied or moved with its
``mlflow.db`` and ``mlartifacts/`` would therefore log artifacts into, and register models from, the
*original* project. :func:`client` relocates such a store first (:func:`relocate`): it finds the root
the store was made in from each experiment's artifact location and the relative location it was
created with (experiment tag ``mlipops.artifact_location``; stores made before the tag existed: the
default ``mlartifacts``), and when that root is not this project's, rewrites the old root's prefix to
this root in those columns, in one sqlite transaction. Only a project-local sqlite store is ever
rewritten (a relative ``sqlite:///`` path inside the project, no ``MLFLOW_TRACKING_URI``); an absolute
or shared sqlite path and any tracking server are left alone.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from mlipops.errors import StageInputError
from mlipops.frames import file_md5  # noqa: F401  (re-exported: the DVC hash of a data file)

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

ARTIFACT_TAG = "mlipops.artifact_location"  # experiment tag: its artifact location as configured (relative)
# MLflow 3's UI shows an experiment as GenAI (traces, judges, prompts) or as model training (runs, metrics); the
# experiment tag says which, and `mlipops ui` opens its runs with ?workflowType=machine_learning (3.17 reads the
# view from that URL parameter, or the user's last choice, before the tag)
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
DEFAULT_ARTIFACT_LOCATION = "mlartifacts"  # TrainParams' default: what a store without the tag was made with
# MLflow's columns that hold artifact locations (table, column, row filter); those this MLflow lacks are skipped
LOCATION_COLUMNS = (("experiments", "artifact_location", ""), ("runs", "artifact_uri", ""),
                    ("model_versions", "source", ""), ("model_versions", "storage_location", ""),
                    ("logged_models", "artifact_location", ""), ("workspaces", "default_artifact_root", ""),
                    ("trace_tags", "value", "key = 'mlflow.artifactLocation'"))

logger = logging.getLogger(__name__)


def tracking_uri(uri: str) -> str:
    """Resolve ``sqlite:///relative.db`` against the current directory so every stage agrees."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def is_server(uri: str) -> bool:
    """A tracking server (``http://``, ``https://``, ``databricks``), not a store this process opens itself."""
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    return scheme in ("http", "https", "databricks") or uri.strip().lower() == "databricks"


def without_credentials(uri: str) -> str:
    """``uri`` without a ``user:password@`` part (written to files and messages; MLflow also reads
    ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``)."""
    u = urllib.parse.urlsplit(uri)
    if "@" not in u.netloc:
        return uri
    return urllib.parse.urlunsplit(u._replace(netloc=u.netloc.rsplit("@", 1)[1]))


def recorded_uri(uri: str) -> str:
    """The store as a model's ``run.json`` records it: the tracking server that ``MLFLOW_TRACKING_URI`` names (a
    URL, the same from every project, so a later stage finds the run there without the variable; no
    credentials), else the configured ``uri`` (project-relative: no absolute path)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return without_credentials(env) if env and is_server(env) else uri


def project_store(uri: str) -> Path | None:
    """The sqlite file of a project-local store (``sqlite:///<relative path>`` inside the project root,
    not overridden by ``MLFLOW_TRACKING_URI``); None for anything else."""
    if os.environ.get("MLFLOW_TRACKING_URI") or not uri.startswith("sqlite:///") or uri.startswith("sqlite:////"):
        return None
    root = Path.cwd().resolve()
    db = (root / uri[len("sqlite:///"):]).resolve()
    return db if db.is_relative_to(root) else None


def _local_path(loc: str | None) -> Path | None:
    if not loc:
        return None
    if loc.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(loc).path))
    return Path(loc) if loc.startswith("/") else None


def _moved_roots(con: sqlite3.Connection, root: Path) -> set[Path]:
    """The project roots, other than ``root``, that the store's experiments were created in."""
    rows = con.execute("SELECT e.artifact_location, t.value FROM experiments e LEFT JOIN experiment_tags t "
                       "ON t.experiment_id = e.experiment_id AND t.key = ?", (ARTIFACT_TAG,)).fetchall()
    old = set()
    for loc, rel in rows:
        path, rel = _local_path(loc), PurePosixPath(rel or DEFAULT_ARTIFACT_LOCATION)
        n = len(rel.parts)
        if (path is None or rel.is_absolute() or ":" in str(rel) or ".." in rel.parts or n == 0
                or len(path.parts) <= n or path.parts[-n:] != rel.parts):
            continue  # not made from a project-relative location: not ours to move
        made_in = Path(*path.parts[:-n])
        if made_in != root:
            old.add(made_in)
    return old


def relocate(uri: str) -> list[Path]:
    """Point a copied or moved project's own sqlite store at this project: every artifact location
    under the root the store was made in (``file://`` URI or plain path) is rewritten to the same
    place under the current root, in one transaction (concurrent stages: the second finds nothing to
    do). Returns the old roots (empty: nothing moved, or not a project-local store)."""
    db = project_store(uri)
    if db is None or not db.is_file():
        return []
    root = Path.cwd().resolve()
    con = sqlite3.connect(db, timeout=120, isolation_level=None)
    try:
        tables = {t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"experiments", "experiment_tags"} <= tables or not _moved_roots(con, root):
            return []  # the usual case: one read, no lock
        con.execute("BEGIN IMMEDIATE")
        try:
            old = sorted(_moved_roots(con, root))
            columns = {t: {r[1] for r in con.execute(f"PRAGMA table_info({t})")} for t, _, _ in LOCATION_COLUMNS}
            n = 0
            for o in old:
                pairs = dict.fromkeys([(o.as_uri() + "/", root.as_uri() + "/"),
                                       (f"file://{o}/", f"file://{root}/"), (f"{o}/", f"{root}/")])
                for a, b in pairs:
                    for table, col, where in LOCATION_COLUMNS:
                        if col in columns[table]:
                            n += con.execute(f"UPDATE {table} SET {col} = ? || substr({col}, ?) "
                                             f"WHERE substr({col}, 1, ?) = ?" + (f" AND {where}" if where else ""),
                                             (b, len(a) + 1, len(a), a)).rowcount
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.close()
    if old:
        try:  # this process's MLflow caches one artifact repository per run: drop the old locations
            from mlflow.tracking._tracking_service import utils as mlflow_utils

            mlflow_utils._artifact_repos_cache.clear()
        except (ImportError, AttributeError):  # another MLflow: no such cache
            pass
        logger.info(f"this project was copied or moved from {', '.join(map(str, old))}: its MLflow store "
              f"{db.name} now points at {root} ({n} artifact locations rewritten)")
    return old


_ANSWERED: set[str] = set()  # the tracking servers this process has reached


def check_server(resolved: str) -> None:
    """An ``http(s)://`` tracking server that does not answer is an error of the settings, said at once (MLflow
    would retry each request for minutes, then fail with its own exception); checked once per process."""
    if resolved in _ANSWERED or urllib.parse.urlparse(resolved).scheme.lower() not in ("http", "https"):
        return
    shown = without_credentials(resolved)
    try:
        with urllib.request.urlopen(shown.rstrip("/") + "/health", timeout=15):
            pass
    except urllib.error.HTTPError:
        pass  # it answered (a server without /health, or one that wants a login first)
    except (OSError, ValueError) as exc:
        env = bool(os.environ.get("MLFLOW_TRACKING_URI"))
        raise StageInputError(f"the MLflow tracking server {shown} does not answer ({getattr(exc, 'reason', exc)}):"
                              " start it, or point " + ("MLFLOW_TRACKING_URI" if env else
                                                        "train.tracking_uri (or MLFLOW_TRACKING_URI)")
                              + " at one that runs",
                              field="MLFLOW_TRACKING_URI" if env else "train.tracking_uri") from None
    _ANSWERED.add(resolved)


def client(uri: str):
    """The MLflow client of the store ``uri`` (also the fluent API's), relocated first when the project
    was copied or moved (:func:`relocate`); a tracking server is checked to answer first (:func:`check_server`)."""
    import mlflow
    from mlflow import MlflowClient

    relocate(uri)
    resolved, env = tracking_uri(uri), os.environ.get("MLFLOW_TRACKING_URI")
    check_server(resolved)
    mlflow.set_tracking_uri(resolved)  # the fluent API's store (mlflow.start_run) in this process; MLflow also
    if env is None:  # exports it as MLFLOW_TRACKING_URI: keep that variable the user's (an override), so that a
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # later store, subprocess or copy is not sent to this one
    return MlflowClient(tracking_uri=resolved)


def experiment_id(uri: str, name: str, artifact_location: str) -> str:
    """The experiment ``name``, created with ``artifact_location`` (relative: under the project root)
    when missing; a relative location is recorded in the tag ``mlipops.artifact_location``. On a tracking
    server a local location means nothing (it is the client's disk): the server chooses (its served
    artifacts), and only a remote store's URI (``s3://``...) is passed on."""
    c = client(uri)
    local = "://" not in artifact_location or artifact_location.lower().startswith("file:")
    if local and is_server(tracking_uri(uri)):
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            if KIND_TAG not in exp.tags:
                c.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
            return exp.experiment_id
        return _create_experiment(c, name, tags={KIND_TAG: KIND})
    relative = "://" not in artifact_location and not Path(artifact_location).is_absolute()
    loc = Path(artifact_location).resolve().as_uri() if "://" not in artifact_location else artifact_location
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if (relative and ARTIFACT_TAG not in exp.tags
                and _local_path(exp.artifact_location) == Path(artifact_location).resolve()):
            c.set_experiment_tag(exp.experiment_id, ARTIFACT_TAG, artifact_location)  # a store made before the tag
        if KIND_TAG not in exp.tags:
            c.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
        return exp.experiment_id
    return _create_experiment(c, name, artifact_location=loc,
                              tags={KIND_TAG: KIND} | ({ARTIFACT_TAG: artifact_location} if relative else {}))


def _create_experiment(c, name: str, **kwargs) -> str:
    """Create the experiment ``name``; when another process created it since we looked (two trainings of a team
    starting at once against one server, or two stages on one sqlite store), take that one."""
    from mlflow.exceptions import MlflowException

    try:
        return c.create_experiment(name, **kwargs)
    except MlflowException as exc:
        exp = c.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage != "active":
            raise
        logger.info(f"experiment {name!r} was created by another process meanwhile ({exc.error_code}): using it")
        return exp.experiment_id


def find_run(c, run_id: str):
    """The run ``run_id`` of the client's store, or None when the store does not hold it (a model trained
    against another store, or fetched by ``dvc pull`` into a fresh project or a ``dvc exp run --temp`` copy)."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_run(run_id)
    except MlflowException:
        return None


def get_run(c, run_id: str, run_json: str | Path):
    """The MLflow run that ``run_json`` names, from this project's store; a run it does not hold is an
    error that says so."""
    run = find_run(c, run_id)
    if run is None:
        raise StageInputError(f"MLflow run {run_id} is not in the tracking store {c.tracking_uri}: the model was "
                              "trained against another store; retrain it here (`dvc repro -f train`) or point "
                              "MLFLOW_TRACKING_URI at that store", file=str(run_json), field="run_id")
    return run


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


EVALUATION = "evaluation"  # the nested run of a training run that holds its detailed evaluation metrics


def log_metrics(run_json: str | Path, metrics: dict, prefix: str = "", into: str | None = EVALUATION) -> None:
    """A stage's numeric, finite ``metrics`` logged for the training run that ``run_json`` (a model's
    ``run.json``) names, in batches of 500: by default (``into`` = ``"evaluation"``) into its nested run
    ``<training run>-evaluation`` (created once, tagged ``mlipops.stage=evaluate``) as ``<prefix><key>`` with dots
    made ``/`` (MLflow groups a run's charts by the part before the first ``/``: ``test/…``, ``uncertainty/…``,
    ``melting/…``), so that the training run itself keeps a short list a compare view can show; with ``into``
    None into the training run itself, dots made ``_``. When the run is not in the store (e.g. a ``dvc exp run
    --temp`` copy) the metrics stay in the reports, and this says so."""
    import json
    import time

    import numpy as np
    from mlflow.entities import Metric

    info = json.loads(Path(run_json).read_text())
    c = client(info["tracking_uri"])
    parent = find_run(c, info["run_id"])
    if parent is None:
        logger.info(f"MLflow run {info['run_id']} ({run_json}) is not in the store {c.tracking_uri}: "
                    "the metrics are in the reports only")
        return
    run_id, sep = info["run_id"], "_"
    if into is not None:
        run_id, sep = _nested_run(c, parent, into), "/"
    ts = int(time.time() * 1000)
    safe = {prefix + k.replace(".", sep): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}
    batch = [Metric(k, v, ts, 0) for k, v in safe.items()]
    for k in range(0, len(batch), 500):
        c.log_batch(run_id, metrics=batch[k:k + 500])
    if into is not None:
        c.set_terminated(run_id)


def _nested_run(c, parent, name: str) -> str:
    """The id of ``parent``'s nested run ``<parent name>-<name>`` (``mlipops.stage=evaluate``), created once."""
    found = c.search_runs([parent.info.experiment_id],
                          f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`mlipops.nested` = '{name}'")
    if found:
        return found[0].info.run_id
    tags = {"mlflow.parentRunId": parent.info.run_id, "mlipops.nested": name, "mlipops.stage": "evaluate"}
    if "mlipops.model_name" in parent.data.tags:
        tags["mlipops.model_name"] = parent.data.tags["mlipops.model_name"]
    return c.create_run(parent.info.experiment_id, run_name=f"{parent.info.run_name}-{name}", tags=tags).info.run_id


def log_headline(run_json: str | Path, metrics_by_source: dict) -> None:
    """The headline numbers (:mod:`mlipops.headline`) among a stage's flat metrics (``{metrics.json path: its
    metrics}``) logged into the training run that ``run_json`` names under their own names (no prefix: the
    MLflow runs list's columns)."""
    from mlipops.headline import pick

    values = {k: v for source, metrics in metrics_by_source.items() for k, v in pick(source, metrics).items()}
    if values:
        log_metrics(run_json, values, into=None)


def log_dataset(c, run_id: str, data_path: str | Path, data_md5: str, splits: dict) -> None:
    """The training data as the run's input dataset (the runs list's Dataset column): named after the file, its
    digest the DVC md5's first 8 hex, its source the project-relative path, its profile the frames, atoms,
    species and config_types per split. Metadata only: the frames stay in DVC."""
    import json
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    class _Curated(MetaDataset):
        @property
        def profile(self):
            return prof

        def to_dict(self):
            return super().to_dict() | {"profile": json.dumps(prof)}

    prof: dict = {"dvc_md5": data_md5}
    for name, frames in splits.items():
        if frames:
            cts: dict[str, int] = {}
            for a in frames:
                ct = str(a.info.get("config_type", "unknown"))
                cts[ct] = cts.get(ct, 0) + 1
            prof[name] = {"frames": len(frames), "atoms": int(sum(len(a) for a in frames)),
                          "species": sorted({s for a in frames for s in a.get_chemical_symbols()}),
                          "config_types": dict(sorted(cts.items()))}
    with warnings.catch_warnings():  # "can be interpreted in multiple ways: LocalArtifactDatasetSource, Local…"
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(data_path).as_posix())
    ds = _Curated(source, name=Path(data_path).name, digest=data_md5[:8])
    c.log_inputs(run_id, [DatasetInput(ds._to_mlflow_entity(),
                                             tags=[InputTag("mlflow.data.context", "training")])])
