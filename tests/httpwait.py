"""Helpers of the tests that start a real server process on a loopback port (`mlflow server`, `mlflow models serve`,
`mlipops ui`): a free port, the wait until it answers HTTP, and its end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(log: Path, n: int = 3000) -> str:
    """The last ``n`` characters of a server's log file (its stdout and stderr)."""
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError as exc:
        return f"(no log: {exc})"


def wait_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float = 120) -> None:
    """Wait until ``url`` answers 200; fail the test, with the tail of the process's ``log``, when the process
    exits first or ``timeout`` seconds pass (the process is stopped then)."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            why = f"exited with {proc.returncode}" if proc.poll() is not None else f"no answer in {timeout:.0f} s"
            stop(proc)
            pytest.fail(f"{what} did not come up at {url} ({why}); the end of its log {log}:\n{tail(log)}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """End a server started with ``start_new_session=True`` and its children (its own process group)."""
    try:  # the group, even when its leader has exited: a server's workers may outlive it
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)
