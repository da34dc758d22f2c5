"""Atomic outputs: a temp file in the target's directory, fsync, rename. A pipeline never sees half a file.
An output that is the same file as one of the run's inputs is refused (`refuse_input`): the user's own file is
never replaced unless they say so."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from onnxecc.core.errors import UserError


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


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether `a` and `b` name the same file: symlinks, hard links and relative paths resolved
    (`os.path.samefile` when both exist, else the resolved paths compared)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def refuse_input(path: str | os.PathLike, written: list[Path], inputs: list[Path], option: str, fix: str) -> None:
    """UserError when a write to `path` would replace or remove one of the run's inputs: `written` are the
    existing files it replaces or removes, `inputs[0]` is the input model and the rest the external data it
    refers to. One line, naming the option and `fix` (what to do instead)."""
    for out in written:
        for i, src in enumerate(inputs):
            if same_file(out, src):
                what = (f"the input model {src}" if i == 0 else
                        f"{src}, the external data of the input model {inputs[0]}")
                raise UserError(f"{option} {path} would overwrite {what}: {fix}")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the renames in `folder` durable (a power cut after it keeps them); a no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
