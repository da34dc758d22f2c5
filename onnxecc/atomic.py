"""Atomic outputs: a temp file in the target's directory, fsync, rename. A pipeline never sees half a file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from onnxecc.errors import UserError


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early (before hours of work) if the output cannot be written."""
    path = Path(path)
    if not path.parent.exists():
        raise UserError(f"output directory does not exist: {path.parent} — create it first")
    if path.is_dir():
        raise UserError(f"output path {path} is a directory: give a file name")
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"output directory {path.parent} is not writable")
    return path


def write_with(path: str | os.PathLike, writer: Callable[[BinaryIO], None]) -> Path:
    path = check_output_path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return write_with(path, lambda f: f.write(data))


def write_json(path: str | os.PathLike, obj) -> Path:
    return write_with(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))
