"""Label a batch of frames with the oracle through Dask, with retries, time-outs and resumable results.

Protocol (what makes killing and restarting safe):

1. Before anything is submitted, ``label_dir/<frame_id>.extxyz`` is looked up for every frame: a frame
   whose label file exists is labelled already and is never sent to the oracle again.
2. The task on the worker calls the oracle on one frame and writes the labelled frame to
   ``label_dir/<frame_id>.extxyz`` atomically (a temporary file, then a rename) *before* returning:
   a finished oracle call is on disk even if the process that submitted it is gone.
3. The caller's ``on_update(frame_id, status, record)`` is called on ``submitted``, ``labelled`` and
   ``failed`` so it can persist its state (:mod:`mlipops.active.state`).

At most as many tasks are in flight as the cluster has worker threads, so a task's time-out
(``timeout_s``, from its submission) measures the oracle call, not a queue. A failure (an exception
in the oracle, or no result within ``timeout_s``) is retried after ``backoff_s · 2^(attempt-1)`` s, up
to ``retries`` times; a frame that fails ``retries + 1`` times is recorded as failed (frame id,
attempts, last error) and the batch goes on. A timed-out task is cancelled; a Python call already
running on a worker cannot be interrupted, so that worker slot is busy until the call returns (if it
returns, its label file is still written, and a later run reuses it).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ase import Atoms

from mlipops.errors import MlipopsError
from mlipops.frames import read_extxyz, safe_name, write_extxyz


@dataclass
class Failure:
    frame_id: str
    attempts: int
    error: str


@dataclass
class BatchResult:
    labelled: list[Atoms] = field(default_factory=list)  # in the order of the input frames
    failed: list[Failure] = field(default_factory=list)
    oracle_calls: int = 0  # tasks submitted by this call (reused labels are not counted)
    reused: int = 0  # frames whose label file existed already


def label_path(label_dir: str | Path, fid: str) -> Path:
    return Path(label_dir) / f"{safe_name(fid)}.extxyz"


def read_label(path: Path) -> Atoms:
    frames, rejected = read_extxyz(path)
    if rejected or len(frames) != 1:
        raise MlipopsError("unreadable label file (expected one labelled frame)", file=str(path))
    return frames[0]


def _label_one(oracle, atoms: Atoms, out: str) -> str:
    """Worker task: label ``atoms`` with ``oracle`` and write it atomically to ``out``."""
    labelled = oracle.label([atoms])[0]
    # atomic, through a temporary file of its own (a retry may run while a timed-out call finishes): the label
    # file is complete or absent
    write_extxyz(out, [labelled])
    return out


def _frame_id(atoms: Atoms, k: int) -> str:
    fid = atoms.info.get("frame_id")
    if not fid:
        raise MlipopsError("frame has no frame_id", frame=k, field="frame_id")
    return str(fid)


def label_batch(frames: Sequence[Atoms], oracle, client, *, retries: int = 2, backoff_s: float = 1.0,
                timeout_s: float = 600.0, label_dir: str | Path,
                on_update: Callable[[str, str, dict], None] | None = None) -> BatchResult:
    """Label ``frames`` (each with ``info['frame_id']``) with ``oracle`` (an :class:`~mlipops.oracles.Oracle`,
    or anything picklable with ``label([atoms]) -> [labelled]``) on the Dask ``client``.

    Returns the labelled frames (in input order) and the failures; never raises for an oracle failure."""
    from distributed import wait

    if retries < 0 or backoff_s < 0 or timeout_s <= 0:
        raise MlipopsError("retries and backoff_s must be ≥ 0 and timeout_s > 0", field="active.retries")
    label_dir = Path(label_dir)
    label_dir.mkdir(parents=True, exist_ok=True)
    notify = on_update or (lambda fid, status, record: None)
    ids = [_frame_id(a, k) for k, a in enumerate(frames)]
    result = BatchResult()
    done: dict[int, Atoms] = {}
    todo: list[tuple[float, int, int]] = []  # heap of (ready time, frame index, attempt)
    for k, fid in enumerate(ids):
        path = label_path(label_dir, fid)
        if path.is_file():
            try:
                done[k] = read_label(path)
            except MlipopsError:  # cannot happen with atomic writes; kept aside and labelled again
                path.replace(path.with_name(path.name + ".unreadable"))
            else:
                result.reused += 1
                notify(fid, "labelled", {"file": str(path), "reused": True})
                continue
        if k not in done and fid not in ids[:k]:
            heapq.heappush(todo, (0.0, k, 1))
    slots = max(1, sum(client.nthreads().values()))
    active: dict = {}  # future -> (frame index, attempt, deadline)
    last_error: dict[int, str] = {}

    def fail_or_retry(k: int, attempt: int, error: str) -> None:
        last_error[k] = error
        if attempt <= retries:
            heapq.heappush(todo, (time.monotonic() + backoff_s * 2 ** (attempt - 1), k, attempt + 1))
            notify(ids[k], "retry", {"attempt": attempt, "error": error})
        else:
            f = Failure(ids[k], attempt, error)
            result.failed.append(f)
            notify(ids[k], "failed", {"attempts": attempt, "error": error})

    while todo or active:
        now = time.monotonic()
        while todo and todo[0][0] <= now and len(active) < slots:
            _, k, attempt = heapq.heappop(todo)
            notify(ids[k], "submitted", {"attempt": attempt})
            fut = client.submit(_label_one, oracle, frames[k], str(label_path(label_dir, ids[k])), pure=False)
            active[fut] = (k, attempt, time.monotonic() + timeout_s)
            result.oracle_calls += 1
        if not active:
            time.sleep(max(0.0, min(0.5, todo[0][0] - time.monotonic())))
            continue
        wake = min(d for _, _, d in active.values())
        if todo and len(active) < slots:
            wake = min(wake, todo[0][0])
        try:
            finished = wait(list(active), timeout=max(0.01, wake - time.monotonic()),
                            return_when="FIRST_COMPLETED").done
        except TimeoutError:  # distributed.wait raises when nothing finished in time
            finished = set()
        now = time.monotonic()
        for fut in list(active):
            k, attempt, deadline = active[fut]
            if fut in finished or fut.done():
                del active[fut]
                if fut.status == "finished":
                    path = Path(fut.result())
                    done[k] = read_label(path)
                    notify(ids[k], "labelled", {"file": str(path), "attempts": attempt})
                else:
                    try:
                        exc = fut.exception()
                    except Exception as err:  # a cancelled future has no exception to give
                        exc = err
                    fail_or_retry(k, attempt, f"{type(exc).__name__}: {exc}" if exc is not None else fut.status)
            elif now >= deadline:
                del active[fut]
                fut.cancel()
                fail_or_retry(k, attempt, f"timeout after {timeout_s:g} s")
    result.labelled = [done[k] for k in sorted(done)]
    return result
