"""Error types that decide the exit code.

A `UserError` is something the user can fix (bad file, bad option, impossible budget): the CLI prints its
one-line message and exits 2. An `ExplainedFailure` (training that diverged after every recovery) prints its
one line and exits 1. Anything else is our bug: exit 1.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message names the problem and what to do about it."""


class UnsupportedModelError(UserError):
    """The model uses something onnxecc cannot handle (yet); the message says what."""


class ExplainedFailure(Exception):
    """The run failed for a reason its one-line message explains, naming what to try — neither a bad input
    (exit 2) nor our bug: the CLI prints the line and exits 1, without a traceback."""


class TrainingDiverged(ExplainedFailure):
    """Training kept producing non-finite numbers after every recovery `onnxecc.train.guard` allows."""
