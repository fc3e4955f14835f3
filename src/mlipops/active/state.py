"""The active-learning loop's persisted state: one JSON file, rewritten atomically after every step.

Fields: ``params_fingerprint`` (a state written with other params is refused), ``iteration``,
``phase`` of the iteration (``md`` → ``label`` → ``curate`` → ``train`` → ``score`` → next iteration),
MD progress (``md_run`` index of the
structure, ``md_step`` within it, ``md_snapshot`` extxyz with positions and momenta, ``md_rng`` the
Langevin generator's state, ``candidates`` file and count, ``md_stats`` running sums and maxima of
σ_proj and max σ_F), ``selected`` (frame ids, in order, and the
file holding the frames), ``pending`` (submitted to the oracle, no result recorded yet),
``labelled`` (frame id → label file), ``failed`` (frame id → attempts and last error) and
``history`` (per-iteration summaries), ``model_dir`` (the committee of the current iteration),
``curated`` (the campaign's latest curated data), ``info`` (the iteration's numbers so far),
``mlflow`` (run ids) and ``oracle_calls_total``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlipops.errors import StageInputError
from mlipops.paths import atomic_path

FORMAT = "mlipops.active_state/1"


@dataclass
class ActiveState:
    params_fingerprint: str
    iteration: int = 0
    phase: str = "md"
    md_run: int = 0
    md_step: int = 0
    md_snapshot: str | None = None
    md_rng: dict | None = None
    md_steps_total: int = 0
    md_stats: dict = field(default_factory=dict)  # running sums and maxima of the trigger statistics
    candidates_file: str | None = None
    n_candidates: int = 0
    selected: list[str] = field(default_factory=list)
    selected_file: str | None = None
    pending: list[str] = field(default_factory=list)
    labelled: dict[str, str] = field(default_factory=dict)
    failed: dict[str, dict] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    model_dir: str | None = None  # the committee the MD runs with (None: the seed model); retrained each iteration
    curated: dict = field(default_factory=dict)  # the campaign's latest curated data: accepted, quarantine, index
    info: dict = field(default_factory=dict)  # the current iteration's numbers (label, curate, train, hold-out)
    mlflow: dict = field(default_factory=dict)  # parent run id; the current iteration's run and member runs
    oracle_calls_total: int = 0
    path: str | None = None

    def save(self) -> None:
        """Write the state atomically (a temporary file in the same folder, fsync, rename)."""
        if self.path is None:
            raise StageInputError("state has no file", field="path")
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": FORMAT} | {k: v for k, v in asdict(self).items() if k != "path"}
        with atomic_path(path, fsync=True) as tmp, tmp.open("w") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)

    def new_iteration(self) -> None:
        """Clear the per-iteration fields and advance ``iteration`` (the caller saves)."""
        self.iteration += 1
        self.phase = "md"
        self.md_run = self.md_step = self.md_steps_total = self.n_candidates = 0
        self.md_snapshot = self.md_rng = self.candidates_file = self.selected_file = None
        self.selected, self.pending, self.labelled, self.failed, self.md_stats = [], [], {}, {}, {}
        self.info = {}
        self.mlflow = {k: v for k, v in self.mlflow.items() if k in ("parent_run_id", "initial")}


def load_or_start(path: str | Path, params_fingerprint: str) -> ActiveState:
    """The state in ``path``, or a fresh one (iteration 0) when the file does not exist. A state
    written for other params raises :class:`StageInputError` (delete it to start over)."""
    path = Path(path)
    if not path.is_file():
        s = ActiveState(params_fingerprint=params_fingerprint, path=str(path))
        s.save()
        return s
    doc = _read_doc(path)
    if doc.get("params_fingerprint") != params_fingerprint:
        raise StageInputError("the state was written with other active-learning params; delete it (or restore "
                              "the params) to go on", file=str(path), field="params_fingerprint")
    return _state(doc, path)


def read_state(path: str | Path) -> ActiveState:
    """The state in ``path`` whatever params wrote it (read only: ``mlipops active graduate``);
    :class:`StageInputError` if it is missing or is no state."""
    path = Path(path)
    if not path.is_file():
        raise StageInputError("no active-learning state", file=str(path))
    return _state(_read_doc(path), path)


def _read_doc(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StageInputError(f"unreadable active-learning state: {exc}", file=str(path)) from None
    if not isinstance(doc, dict) or doc.pop("format", None) != FORMAT:
        raise StageInputError(f"not an active-learning state (expected format {FORMAT})", file=str(path),
                              field="format")
    return doc


def _state(doc: dict, path: Path) -> ActiveState:
    try:
        return ActiveState(**doc, path=str(path))
    except TypeError as exc:
        raise StageInputError(f"malformed active-learning state: {exc}", file=str(path)) from None
