"""User-facing error hierarchy.

Every error a user can cause (bad input file, bad params value, missing stage output) raises a
subclass of :class:`MlipopsError` whose message names the file, the frame and the field. The CLI
prints it on one line and exits with status 2.
"""

from __future__ import annotations


class MlipopsError(Exception):
    """Base class of every error caused by user input."""

    def __init__(self, message: str, *, file: str | None = None, frame: int | None = None,
                 field: str | None = None):
        self.file = file
        self.frame = frame
        self.field = field
        where = []
        if file is not None:
            where.append(str(file))
        if frame is not None:
            where.append(f"frame {frame}")
        if field is not None:
            where.append(f"field '{field}'")
        self.detail = message
        super().__init__(f"{': '.join(where)}: {message}" if where else message)

    def __reduce__(self):  # pickled whole (an error raised in a worker process keeps its file, frame and field)
        return (_rebuild, (type(self), self.detail, self.file, self.frame, self.field))


def _rebuild(cls, message, file, frame, field):
    return cls(message, file=file, frame=frame, field=field)


class ParamsError(MlipopsError):
    """An invalid or missing value in params.yaml."""


class FrameFormatError(MlipopsError):
    """A structure file that cannot be read (missing, malformed, wrong schema)."""


class StageInputError(MlipopsError):
    """A stage input (output of an upstream stage) is missing or inconsistent."""


class OracleError(MlipopsError):
    """The reference calculator could not be built or failed on a frame."""
