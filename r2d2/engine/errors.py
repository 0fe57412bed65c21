"""The two kinds of clean failure every ``r2d2`` command reports in one line.

Engine code raises :class:`UsageError` (the command cannot run as given: exit status 2) or
:class:`RunError` (the run started and cannot go on: exit status 1), or a subclass
(``ConfigError``, ``DataError``, ``TrainingError``, ...). The mapping to an exit status and a
message lives in :mod:`r2d2.cli`; these classes live here so that the engine never imports the
command-line layer.
"""

from __future__ import annotations

import pickle

USAGE_EXIT = 2
"""exit status of a command that cannot run as given (checked before any work starts)"""
RUN_EXIT = 1
"""exit status of a run that started and failed"""


class UsageError(Exception):
    """The command cannot run as given: a bad argument or config value, an input the command line
    or config names that does not exist, an output folder that cannot be written. Exit 2."""

    exit_code = USAGE_EXIT


class RunError(Exception):
    """The run started and cannot go on (bad data, a checkpoint that does not load, ...). Exit 1."""

    exit_code = RUN_EXIT


def exit_code(e: BaseException) -> int | None:
    """The status for a *clean* error (one line is enough): 2 for :class:`UsageError`, 1 for
    :class:`RunError`, operating-system failures (``OSError``: disk full, permission denied
    while running; a missing input checked up front is a UsageError) and files that do not
    unpickle; None for anything else, which is a bug and keeps its traceback."""
    if isinstance(e, UsageError):
        return USAGE_EXIT
    if isinstance(e, (RunError, OSError, EOFError, pickle.UnpicklingError)):  # a file that is
        return RUN_EXIT  # not what it should be
    return None


class TrainingError(RuntimeError, RunError):
    """The run cannot go on (too many bad steps, too many skipped samples, a checkpoint that does
    not load or cannot be written): one line, exit status 1."""
