"""Reports shared by all stages: flat metrics.json, markdown, progress, plots (PNG, labelled axes)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mlipops.errors import MlipopsError
from mlipops.paths import atomic_write_text


def _clean(v):
    if isinstance(v, (np.floating, float)):
        v = float(v)
        return v if math.isfinite(v) else None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def jsonable(o):
    """Nested dicts/lists of numpy scalars -> plain JSON values (non-finite floats -> null)."""
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in o]
    return _clean(o)


def write_metrics(report_dir: str | Path, metrics: dict) -> Path:
    """Write ``reports/<stage>/metrics.json`` with flat keys (for ``dvc metrics show``)."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "metrics.json"
    path.write_text(json.dumps({k: _clean(v) for k, v in metrics.items()}, indent=2, sort_keys=True) + "\n")
    return path


def read_metrics(report_dir: str | Path) -> dict:
    path = Path(report_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_csv(path: str | Path, columns: dict[str, Sequence]) -> Path:
    """A data table as CSV (6 significant digits, empty cell for a missing or non-finite value), written
    atomically: the data of a DVC plot (mlipops.pipeline.DATA_PLOTS)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(columns)
    n = {len(v) for v in columns.values()}
    if len(n) > 1:
        raise ValueError(f"{path}: columns of different lengths {sorted(n)}")

    def cell(v):
        v = _clean(v)
        return "" if v is None else f"{v:.6g}" if isinstance(v, float) else v

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    w.writerows([cell(columns[c][i]) for c in names] for i in range(n.pop() if n else 0))
    atomic_write_text(path, buf.getvalue())
    return path


def md_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.4g}" if math.isfinite(x) else str(x)
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(path: str | Path, title: str, paragraphs: Sequence[str] = (),
                   table: tuple[Sequence[str], Iterable[Sequence]] | None = None,
                   extra: Sequence[str] = ()) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", *paragraphs]
    if table is not None:
        parts.append(md_table(*table))
    parts += list(extra)
    path.write_text("\n\n".join(parts) + "\n")
    return path


PROGRESS_INTERVAL_S = 30.0  # s between two progress lines in a log (MLIPOPS_PROGRESS_INTERVAL_S overrides)
_live: list = []  # the rich Progress of the outermost progress() on a terminal: nested ones add a task to it
_write_lock = threading.Lock()


def _hms(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


def _interval_from_env() -> float:
    raw = os.environ.get("MLIPOPS_PROGRESS_INTERVAL_S")
    if raw is None or not raw.strip():
        return PROGRESS_INTERVAL_S
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise MlipopsError(f"must be a positive number of seconds, got {raw!r}", field="MLIPOPS_PROGRESS_INTERVAL_S")
    return v


class Heartbeat:
    """Progress as plain lines for a log: ``<description>: 37/120 (31 %), 2m05s elapsed, ~3m40s left``.

    :meth:`update` only records the position (cheap: called every MD step); :meth:`tick` writes a line
    when ``interval_s`` has passed since the last one (``progress`` calls it from a timer thread, so a
    log gets a line at a steady pace even when nothing advances); :meth:`start` and :meth:`finish`
    write the first and the last line. The time left extrapolates the rate since the first update that moved
    the position (start-up, and work done before a resume, do not count)."""

    def __init__(self, description: str, total: int, stream, interval_s: float, clock=time.monotonic):
        self.description, self.total, self.stream, self.interval_s, self.clock = (description, total, stream,
                                                                                   interval_s, clock)
        self.completed, self.note = 0, ""
        self.t0 = self.last = None
        self.ref = None  # (time, completed) just after the first update that moved the position

    def update(self, n: int = 1, *, completed: int | None = None, total: int | None = None, note: str | None = None):
        before, self.completed = self.completed, self.completed + n if completed is None else completed
        if self.ref is None and self.completed != before:
            self.ref = (self.clock(), self.completed)
        if total is not None:
            self.total = total
        if note is not None:
            self.note = note

    def line(self, end: str | None = None) -> str:
        now = self.clock()
        done, total = self.completed, self.total
        text = (f"{self.description}: {done}/{total} ({100 * done / total:.0f} %)" if total > 0
                else f"{self.description}: {done}") + f", {_hms(now - self.t0)} elapsed"
        if end:
            text += f", {end}"
        elif self.ref is not None and done > self.ref[1] and total > done:
            text += f", ~{_hms((now - self.ref[0]) * (total - done) / (done - self.ref[1]))} left"
        return text + (f", {self.note}" if self.note else "")

    written = False  # a line has been written

    def _write(self, end: str | None = None):
        self.written = True
        text = self.line(end)
        self.last = self.clock()
        with _write_lock:
            self.stream.write(text + "\n")
            self.stream.flush()

    def start(self):
        self.t0 = self.clock()
        self._write()

    def due_in(self) -> float:
        """Seconds until the next line is due (<= 0: due now)."""
        return self.last + self.interval_s - self.clock()

    def tick(self) -> bool:
        if self.due_in() > 0:
            return False
        self._write()
        return True

    def finish(self, ok: bool = True):
        self._write("done" if ok else "stopped")


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


@contextmanager
def progress(description: str, total: int, *, stream=None, interval_s: float | None = None, quiet_start: bool = False):
    """Progress of a long loop; yields ``advance(n=1, *, completed=None, total=None, note=None)`` (``completed``:
    set the position instead of adding ``n``; ``total``: a new total, e.g. after a rerun; ``note``: text after
    the numbers).

    On a terminal (``stream``, default stdout): a transient rich bar (a nested call adds a bar to the live one).
    Otherwise (a log file, a pipe: CI, ``dvc repro``): a :class:`Heartbeat` line at the start, then every
    ``interval_s`` seconds (default ``MLIPOPS_PROGRESS_INTERVAL_S`` or 30 s) whether or not the loop advanced,
    and a last line at the end. ``quiet_start``: no line at the start, and none at the end unless one was
    written: work that ends (or fails, with its one-line error) within an interval prints nothing."""
    stream = sys.stdout if stream is None else stream
    if _is_terminal(stream):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TextColumn

        def bar(prog):
            task = prog.add_task(description, total=total)

            def advance(n=1, *, completed=None, total=None, note=None):
                prog.update(task, advance=None if completed is not None else n, completed=completed, total=total,
                            description=f"{description} {note}" if note else None)
            return task, advance

        if _live:  # one live display per console: a nested progress is a second bar of the outer one
            task, advance = bar(_live[-1])
            try:
                yield advance
            finally:
                _live[-1].remove_task(task)
            return
        console = None if stream is sys.stdout else Console(file=stream)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), transient=True, console=console) as prog:
            _live.append(prog)
            try:
                yield bar(prog)[1]
            finally:
                _live.pop()
        return
    hb = Heartbeat(description, total, stream, _interval_from_env() if interval_s is None else interval_s)
    if quiet_start:
        hb.t0 = hb.last = hb.clock()
    else:
        hb.start()
    stop = threading.Event()

    def beat():
        while not stop.wait(max(0.01, hb.due_in())):
            hb.tick()

    timer = threading.Thread(target=beat, name=f"progress: {description}", daemon=True)
    timer.start()
    ok = False
    try:
        yield hb.update
        ok = True
    finally:
        stop.set()
        timer.join()
        if not quiet_start or hb.written:
            hb.finish(ok)


def trim_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``): after a phase that parsed or
    computed in many small pieces, the process's resident size then says what it holds, not what it held.
    A no-op where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def pyplot():
    """matplotlib's pyplot on the Agg backend (figures go to files; no display is needed or opened): the one
    figure set-up of every report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """``fig`` laid out tight, written to ``path`` (PNG at ``dpi``) and closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def parity_plot(path: str | Path, ref: np.ndarray, pred: np.ndarray, groups: Sequence[str],
                quantity: str, unit: str, title: str = "") -> Path:
    """Predicted vs reference, one colour per group (config_type), with the y=x line."""
    plt = pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ref, pred, groups = np.asarray(ref), np.asarray(pred), np.asarray(groups)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for g in sorted(set(groups.tolist())):
        m = groups == g
        ax.scatter(ref[m], pred[m], s=6, alpha=0.6, label=f"{g} (n={int(m.sum())})")
    finite = np.isfinite(ref) & np.isfinite(pred)
    if finite.any():
        lo = float(min(ref[finite].min(), pred[finite].min()))
        hi = float(max(ref[finite].max(), pred[finite].max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel(f"reference {quantity} ({unit})")
    ax.set_ylabel(f"predicted {quantity} ({unit})")
    ax.set_title(title or f"{quantity} parity")
    ax.legend(fontsize=6, markerscale=2, loc="upper left")
    save_figure(fig, path, dpi=110)
    return path
