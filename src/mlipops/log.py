"""The package's logging: one handler, installed once per process.

Every module logs to ``logging.getLogger(__name__)`` (a child of ``mlipops``). :func:`setup` gives the ``mlipops``
logger its one handler: standard error, a line per message, ``mlipops: <message>`` and ``mlipops: warning:
<message>`` (the form of the CLI's ``mlipops: error: ...``). The CLI calls it before any command; so do the
functions that run in Dask worker processes (a training member), which do not inherit the parent's handlers.
Imported as a library (a notebook), mlipops installs nothing: Python's defaults apply (warnings shown, info not)
until the user configures logging or calls :func:`setup`.
"""

from __future__ import annotations

import logging
import sys

ROOT = "mlipops"


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        kind = "" if record.levelno < logging.WARNING else \
            "warning: " if record.levelno == logging.WARNING else "error: "
        return f"mlipops: {kind}{record.getMessage()}"


class _Stderr(logging.StreamHandler):
    """A handler on the *current* ``sys.stderr`` (a test's capture, a redirected stream), looked up per record."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the current sys.stderr is always used
        pass


def setup(level: int = logging.INFO) -> logging.Logger:
    """The ``mlipops`` logger with its one handler (added once; a second call only sets the level)."""
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_Format())
        logger.addHandler(handler)
        logger.propagate = False  # the one handler: no second copy through the root logger's
    logger.setLevel(level)
    return logger
