"""Error types that decide the exit code.

A `UserError` is something the user can fix (bad file, bad option, impossible budget): the CLI prints its
one-line message and exits 2. Anything else is our bug: exit 1.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message names the problem and what to do about it."""


class UnsupportedModelError(UserError):
    """The model uses something onnxecc cannot handle (yet); the message says what."""
