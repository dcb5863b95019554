"""User-facing errors.

Anything a user can cause (bad data, bad config, a wrong checkpoint) raises a :class:`CtsegError`
subclass with a message that names the file and the problem. The CLI prints such errors as one line
and exits non-zero without a traceback (``ctseg --debug ...`` shows it). Programming errors stay
ordinary exceptions.
"""

from __future__ import annotations

from pathlib import Path


class CtsegError(Exception):
    """Base class of errors caused by user input; the message must say what is wrong and where."""

    exit_code = 2


class DataError(CtsegError):
    """Bad or missing input data (images, labels, manifests, archives).

    Called as ``DataError(path, problem)``. PyTorch re-raises a ``DataLoader`` worker's exception in the
    main process as ``type(exc)(formatted_traceback)``; called with that one string, the path and problem
    are recovered from the traceback's last line, so the error keeps its type and message.
    """

    def __init__(self, path: str | Path | None, problem: str | None = None) -> None:
        if problem is None:
            text = str(path).rstrip()
            text = text.splitlines()[-1] if text else text
            prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
            text = text.split(prefix, 1)[-1]
            where, sep, what = text.partition(": ")
            path, problem = (where, what) if sep else (None, text)
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)

    def __reduce__(self):  # pickling keeps (path, problem)
        return (type(self), (self.path, self.problem))


class ConfigError(CtsegError):
    """An invalid configuration, caught before any work starts."""


class CheckpointError(CtsegError):
    """A checkpoint that cannot be used here (missing, corrupt, other model or protocol)."""


class OutputError(CtsegError):
    """An output location that cannot be written."""
