"""Interrupt and resume a training `compress` (issue 9).

While `compress(..., checkpoint=PATH)` trains, the first SIGINT (Ctrl-C) only *requests* a stop (`request()`
does the same from code); a second one raises KeyboardInterrupt at once. The training loop
(`onnxecc.train.finetune._finetune`) looks at the request after every optimizer step and, when it is set, calls
`Checkpointer.stop`: every phase above it that registered a *frame* (closed-loop round, method phase and keep
sets, ADMM iteration with U, Z and ρ) adds its state, the loop adds its own (weights, Adam, scheduler, the
epoch's batch order and position, generator and torch RNG states, running sums, history), the file is written
atomically and `Interrupted` is raised. `compress(..., resume=PATH)` loads it, checks that model, budget and
options are the ones it was written for, and every phase `take`s its frame back on the way down, so the run
continues at the very next batch and ends with the same weights as an uninterrupted run (same seed, same
device).

Files are written with `torch.save` and read only with `torch.load(weights_only=True)`: tensors, numbers,
strings, bytes and plain containers, never arbitrary pickled objects (numpy values are converted on the
way in). Importing this module does not import torch (the CLI and `compress` import it on the ONNX side).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from pathlib import Path

import numpy as np

from onnxecc.core import atomic
from onnxecc.core.errors import UserError

FORMAT = "onnxecc-checkpoint"
VERSION = 1
IGNORED_OPTIONS = ("measure_latency",)  # options that change the report, never the output model


class Interrupted(KeyboardInterrupt):
    """`compress` stopped on request (SIGINT). `path` is the checkpoint written, or None with `reason` when the
    method cannot be resumed. A KeyboardInterrupt, so code that handles Ctrl-C handles it too."""

    def __init__(self, path: Path | None, reason: str | None = None, save_s: float | None = None):
        self.path = path
        self.reason = reason
        self.save_s = save_s
        super().__init__(f"interrupted: checkpoint saved to {path}" if path is not None else
                         f"interrupted: {reason}")


class Checkpointer:
    """The checkpoint of one `compress` run: where it goes, what it was for, and the phases' frames."""

    def __init__(self, path: str | Path, fingerprint: dict[str, str], resumed: dict | None = None):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.requested = False
        self.not_resumable: str | None = None  # set by a phase that cannot be resumed: stop without saving
        self.save_s: float | None = None
        self._saved = dict(resumed["frames"]) if resumed else {}
        self._frames: dict[str, Callable[[], dict]] = {}

    @property
    def resuming(self) -> bool:
        return bool(self._saved)

    def take(self, name: str) -> dict | None:
        """The saved state of phase `name` (once: the first call gets it, later calls None)."""
        return self._saved.pop(name, None)

    def peek(self, name: str) -> dict | None:
        return self._saved.get(name)

    @contextmanager
    def frame(self, name: str, state: Callable[[], dict]) -> Iterator[None]:
        """While inside, `state()` is saved under `name` if the run is interrupted."""
        self._frames[name] = state
        try:
            yield
        finally:
            self._frames.pop(name, None)

    def stop(self, train_state: dict) -> None:
        """Called by the training loop when `requested`: save everything and raise `Interrupted`."""
        if self.not_resumable:
            raise Interrupted(None, self.not_resumable)
        t = time.perf_counter()
        frames = {name: state() for name, state in self._frames.items()}
        frames["train"] = train_state
        save(self.path, {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "frames": frames})
        self.save_s = time.perf_counter() - t
        raise Interrupted(self.path, save_s=self.save_s)


_current: ContextVar[Checkpointer | None] = ContextVar("onnxecc_checkpointer", default=None)


def current() -> Checkpointer | None:
    """The checkpointer of the `compress` running in this thread, if it has one."""
    return _current.get()


def request() -> None:
    """Ask the running `compress` to stop after the current training step and save its checkpoint (SIGINT)."""
    ck = _current.get()
    if ck is not None:
        ck.requested = True


def frame(name: str, state: Callable[[], dict]):
    """`current().frame(name, state)`, or nothing when no checkpointer is active."""
    ck = _current.get()
    return ck.frame(name, state) if ck is not None else nullcontext()


@contextmanager
def suspended() -> Iterator[None]:
    """No checkpointer inside: a training run here is not saved or stopped (a short probe whose state no resume
    could restore); a SIGINT meanwhile stays requested and stops the next run that has one."""
    token = _current.set(None)
    try:
        yield
    finally:
        _current.reset(token)


@contextmanager
def active(ck: Checkpointer | None) -> Iterator[Checkpointer | None]:
    """Make `ck` current; in the main thread the first SIGINT becomes `ck.requested`, a second one raises
    KeyboardInterrupt. The previous handler is restored on exit."""
    if ck is None:
        yield None
        return
    token = _current.set(ck)
    installed = threading.current_thread() is threading.main_thread()
    previous = None
    if installed:
        def handler(signum, frame):
            if ck.requested:  # the second Ctrl-C: stop now, no checkpoint
                raise KeyboardInterrupt
            ck.requested = True

        previous = signal.signal(signal.SIGINT, handler)
    try:
        yield ck
    finally:
        if installed:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
        _current.reset(token)


# ---- files ------------------------------------------------------------------------------------------------


def save(path: str | Path, obj: dict) -> Path:
    """Atomic `torch.save` (temp file in the same directory, fsync, rename) of plain data (see `plain`)."""
    import torch

    data = plain(obj)
    return atomic.write_with(path, lambda f: torch.save(data, f))


def load(path: str | Path) -> dict:
    """Read a checkpoint written by `save`, with `torch.load(weights_only=True)` only."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--resume {path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler raises UnpicklingError, RuntimeError, EOFError, ...
        raise UserError(f"--resume {path}: not an onnxecc checkpoint or damaged ({type(exc).__name__})") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("frames"), dict):
        raise UserError(f"--resume {path}: not an onnxecc checkpoint")
    if obj.get("version") != VERSION:
        raise UserError(f"--resume {path}: checkpoint format {obj.get('version')} is not this version's "
                        f"({VERSION}): start over without --resume")
    return obj


def plain(obj):
    """Convert numpy values to what `torch.load(weights_only=True)` reads back: tensors and Python scalars."""
    import torch

    if isinstance(obj, dict):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    return obj


def keep_to_plain(keep: dict | None) -> dict | None:
    return None if keep is None else {int(g): np.asarray(idx) for g, idx in keep.items()}


def keep_from_plain(keep: dict | None) -> dict | None:
    return None if keep is None else {int(g): np.asarray(idx.numpy() if hasattr(idx, "numpy") else idx)
                                      for g, idx in keep.items()}


# ---- what a checkpoint was written for ----------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(model_sha256: str, budget: str, options) -> dict[str, str]:
    """The model's hash (`ingest.sha256`: streamed, a model over 2 GB cannot be serialised to bytes), the budget
    and every option that affects the result (files named by options: their contents)."""
    out = {"model": model_sha256, "budget": str(budget)}
    for f in dataclasses.fields(options):
        if f.name in IGNORED_OPTIONS:
            continue
        value = getattr(options, f.name)
        out[f.name] = json.dumps(value, sort_keys=True, default=str)
        if f.name in ("profile", "hardware", "data") and isinstance(value, (str, Path)) and Path(value).is_file():
            out[f"{f.name} file"] = _file_sha256(Path(value))
    return out


def check_fingerprint(path: Path, saved: dict, now: dict[str, str]) -> None:
    """UserError naming what differs between the checkpoint's run and this one."""
    diffs = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if key == "model":
            diffs.append("the model (its bytes differ)")
        elif key.endswith(" file"):
            diffs.append(f"the contents of the --{key[:-5]} file")
        elif key == "budget":
            diffs.append(f"--budget ({a} in the checkpoint, {b} now)")
        else:
            diffs.append(f"--{key.replace('_', '-')} ({_shown(a)} in the checkpoint, {_shown(b)} now)")
    if diffs:
        raise UserError(f"--resume {path} was written for a different run: {'; '.join(diffs)} — resume with the "
                        "same model, budget and options, or start over without --resume")


def _shown(value: str | None) -> str:
    return "unset" if value is None else value


def default_path(model, output) -> Path:
    """OUTPUT.ckpt, or without an output a file in the current directory named after the model."""
    if output is not None:
        return Path(f"{output}.ckpt")
    stem = Path(model).stem if isinstance(model, (str, Path)) else "model"
    return Path.cwd() / f"{stem}.onnxecc.ckpt"
