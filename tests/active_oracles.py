"""Oracles for the active-learning tests: ASE's EMT with a shared, file-based call log.

They are real ASE calculators, plugged in the way any user calculator is (``generate.oracle.calculator:
active_oracles.CountingEMT``); the Dask workers import this module (``tests/`` on their PYTHONPATH).
Every call appends ``start <frame_id>`` and, when it completes, ``end <frame_id>`` to ``counter``
(under an exclusive lock, as calls run in several worker processes)."""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

from ase.calculators.emt import EMT


def _append(path: str, line: str) -> int:
    """Append a line; return the number of ``start`` lines before it."""
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        n = sum(1 for ln in fh if ln.startswith("start "))
        fh.write(line + "\n")
        fh.flush()
        fcntl.flock(fh, fcntl.LOCK_UN)
    return n


def log_lines(path: str | Path, kind: str) -> list[str]:
    """Frame ids of the ``kind`` (start/end/fail) lines of a call log."""
    p = Path(path)
    if not p.is_file():
        return []
    return [ln.split()[1] for ln in p.read_text().splitlines() if ln.startswith(kind + " ")]


class CountingEMT(EMT):
    """EMT that logs its calls; ``fail_every``: the n-th call (over all processes) raises when
    n % fail_every == 0; ``always_fail``: every call raises; ``sleep_s``: each call first sleeps;
    ``corrupt_every``: the n-th call's energy is 1000 eV too high (logged ``corrupt <frame_id>``)."""

    def __init__(self, counter: str, fail_every: int = 0, always_fail: bool = False, sleep_s: float = 0.0,
                 corrupt_every: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.counter, self.fail_every, self.always_fail, self.sleep_s = counter, fail_every, always_fail, sleep_s
        self.corrupt_every = corrupt_every

    def calculate(self, atoms=None, properties=("energy",), system_changes=("positions",)):
        fid = str((atoms if atoms is not None else self.atoms).info.get("frame_id", "?"))
        n = _append(self.counter, f"start {fid}") + 1
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.always_fail or (self.fail_every and n % self.fail_every == 0):
            _append(self.counter, f"fail {fid}")
            raise RuntimeError(f"oracle failure on call {n}")
        super().calculate(atoms, list(properties) + ["stress"] if atoms is not None and atoms.pbc.all()
                          else properties, system_changes)
        if self.corrupt_every and n % self.corrupt_every == 0:  # a bad label: +1000 eV (a unit/offset error)
            for key in ("energy", "free_energy"):
                if key in self.results:
                    self.results[key] += 1000.0
            _append(self.counter, f"corrupt {fid}")
        _append(self.counter, f"end {fid}")
