"""Reports shared by all stages: flat metrics.json, markdown, progress, plots (PNG, labelled axes)."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


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


@contextmanager
def progress(description: str, total: int):
    """A rich progress bar; yields ``advance(n)``. Quiet when not attached to a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)


def parity_plot(path: str | Path, ref: np.ndarray, pred: np.ndarray, groups: Sequence[str],
                quantity: str, unit: str, title: str = "") -> Path:
    """Predicted vs reference, one colour per group (config_type), with the y=x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
