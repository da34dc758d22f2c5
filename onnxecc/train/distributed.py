"""Multi-process training (issue 10): `torchrun --nproc_per_node N -m onnxecc compress ...` or `--nproc N`.

Every rank runs the whole `compress` on the same model and data; what differs:
- **training** (`onnxecc.train.finetune._finetune`: ADMM W-steps, fine-tuning, greedy's short trainings) wraps the
  module in DistributedDataParallel. Batches are the *1-process run's* batches: one global permutation per epoch
  (same seeded generator on every rank), each global batch of B samples split into W contiguous shards
  (`shard`), the rank's loss scaled by W·n_rank/B. DDP averages gradients over the ranks, so every step's
  gradient is the mean over the global batch — the same step as one process with batch B, up to float
  reassociation (also for a last batch that does not split evenly). This replaces DistributedSampler, whose
  per-rank strided split of a padded permutation gives different global batches than the 1-process run.
- **projections** (which channels to keep) are computed on rank 0 only and broadcast (`on_main`); every rank
  then checks that all hold the same keep sets (`check_same`), and after every training run the same weights.
- **outputs**: rank 0 alone measures latency (the closed loop's verdict is broadcast), evaluates, writes the
  model, the report and the checkpoint.
- **interrupt/resume**: a stop request on any rank stops every rank after the same optimizer step; rank 0 writes
  the checkpoint with the global training state (it is the same on all ranks: the batch order, the position
  and the all-reduced running sums are global), so a run can be resumed with any number of processes.

gloo on CPU, nccl on CUDA (one GPU per rank: cuda:LOCAL_RANK). Importing this module does not import torch.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from onnxecc.core.errors import ExplainedFailure, UserError


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    backend: str  # "gloo" or "nccl"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ctx: Context | None = None


def launched() -> bool:
    """True in a process started by torchrun (or `launch`) with more than one process."""
    return _env_int("WORLD_SIZE", 1) > 1


def env_rank() -> int:
    """This process's rank from the environment (0 when not launched for several processes)."""
    return _env_int("RANK", 0) if launched() else 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def current() -> Context | None:
    """The process group this process joined (`init`), or None in a 1-process run."""
    return _ctx


def is_main() -> bool:
    return _ctx is None or _ctx.is_main


def check_device(device: str) -> None:
    """One-line UserError when `device` names CUDA and torch sees none (or not the GPU this rank needs)."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here (torch {torch.__version__}, "
                        f"torch.cuda.is_available() is False): use --device cpu or auto")
    index = int(device.split(":", 1)[1]) if ":" in device else _env_int("LOCAL_RANK", 0) if launched() else 0
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: GPU {index} is needed but only {torch.cuda.device_count()} "
                        "CUDA device(s) are visible: start fewer processes per node")


def init(device: str = "auto") -> Context | None:
    """Join the process group described by the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT as
    torchrun sets them); None when this is a 1-process run. nccl when training on CUDA, else gloo."""
    global _ctx
    if not launched():
        return None
    if _ctx is not None:
        return _ctx
    import datetime

    import torch
    import torch.distributed as dist

    check_device(device)
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    local_rank = _env_int("LOCAL_RANK", 0)
    if cuda:
        check_device(f"cuda:{local_rank}")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    _ctx = Context(dist.get_rank(), dist.get_world_size(), local_rank, backend)
    return _ctx


def shutdown() -> None:
    global _ctx
    if _ctx is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _ctx = None


def device() -> str | None:
    """The torch device of this rank when it trains on CUDA ("cuda:LOCAL_RANK"), else None."""
    return f"cuda:{_ctx.local_rank}" if _ctx is not None and _ctx.backend == "nccl" else None


# ---- collectives (every rank must call them, in the same order) ---------------------------------------------


def broadcast(obj):
    """Rank 0's `obj` on every rank (pickled; small objects: keep sets, measurements)."""
    if _ctx is None:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def on_main(fn: Callable[[], object]):
    """`fn()` computed on rank 0 only, its result broadcast to every rank. An exception on rank 0 is raised on
    every rank (as the same exception), so no rank waits forever for a result that never comes."""
    if _ctx is None:
        return fn()
    result, error = None, None
    if _ctx.is_main:
        try:
            result = fn()
        except Exception as exc:  # re-raised below on every rank, after the broadcast
            error = exc
    got = broadcast((result, _portable(error)) if _ctx.is_main else None)
    if _ctx.is_main and error is not None:
        raise error
    if got[1] is not None:
        raise got[1]
    return got[0]


def _portable(exc: BaseException | None):
    """What the other ranks raise for rank 0's exception: a UserError stays one (exit 2), an explained failure
    one (exit 1, its line), else RuntimeError."""
    if exc is None:
        return None
    if isinstance(exc, UserError):
        return UserError(str(exc))
    if isinstance(exc, ExplainedFailure):
        return ExplainedFailure(str(exc))
    return RuntimeError(f"rank 0 failed: {type(exc).__name__}: {exc}")


def digest(obj) -> str:
    """A hash of keep sets, numbers, tensors or arrays (nested dicts/lists), for cross-rank comparison."""
    import numpy as np

    h = hashlib.sha256()

    def feed(value):
        if isinstance(value, dict):
            h.update(b"{")
            for k in sorted(value, key=str):
                feed(str(k))
                feed(value[k])
            h.update(b"}")
        elif isinstance(value, (list, tuple)):
            h.update(b"[")
            for v in value:
                feed(v)
            h.update(b"]")
        elif hasattr(value, "detach"):  # torch tensor
            feed(value.detach().cpu().numpy())
        elif isinstance(value, np.ndarray):
            h.update(str((value.dtype.str, value.shape)).encode())
            h.update(np.ascontiguousarray(value).tobytes())
        else:
            h.update(repr(value).encode())

    feed(obj)
    return h.hexdigest()


def check_same(obj, what: str) -> None:
    """RuntimeError on every rank unless every rank holds the same `obj` (compared by `digest`)."""
    if _ctx is None:
        return
    import torch.distributed as dist

    mine = digest(obj)
    everyone = [None] * _ctx.world_size
    dist.all_gather_object(everyone, mine)
    differ = [r for r, d in enumerate(everyone) if d != everyone[0]]
    if differ:
        raise RuntimeError(f"ranks {differ} hold different {what} than rank 0: the processes diverged")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over the ranks (float64)."""
    if _ctx is None:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one."""
    if _ctx is None:
        return bool(flag)
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def _collective_device():
    import torch

    return torch.device(device()) if device() is not None else torch.device("cpu")


# ---- training helpers --------------------------------------------------------------------------------------


def shard(idx):
    """This rank's part of a global batch `idx` and its loss scale W·n_rank/B (DDP averages over W ranks, so
    the gradient is the global batch mean). A rank left without samples (B < W) gets the first sample and
    scale 0: it still takes part in the gradient all-reduce."""
    import torch

    if _ctx is None:
        return idx, 1.0, len(idx)
    local = torch.tensor_split(idx, _ctx.world_size)[_ctx.rank]
    count = len(local)
    if count == 0:
        return idx[:1], 0.0, 0
    return local, count * _ctx.world_size / len(idx), count


def wrap(module):
    """`module` in DistributedDataParallel (parameters already on this rank's device)."""
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    ids = [_ctx.local_rank] if _ctx.backend == "nccl" else None
    # a 1-input-channel conv's gradient has strides that differ from DDP's bucket view: harmless, only slower
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    # buffer sync in forward off: frozen BatchNorm statistics and onnx2torch's constant buffers are equal on every
    # rank (DDP syncs them at construction); re-sending them every step is waste
    try:
        return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)
    except TypeError:  # torch before `broadcast_buffers` was renamed
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


# ---- launching -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, args: Sequence[str], env: dict | None = None, grace_s: float = 10.0) -> int:
    """Run `python ARGS` in `nproc` local processes with torchrun's environment (RANK, LOCAL_RANK,
    WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); returns the first non-zero exit code, else 0.

    Like torchrun --standalone, but Ctrl-C is left to the workers (the terminal sends it to all of them; they
    stop after the same step and rank 0 saves the checkpoint) instead of being forwarded once more, which
    would be a second Ctrl-C (stop at once, no checkpoint). When a worker fails, the others are stopped after
    `grace_s` seconds."""
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: give at least 1 process")
    if launched():
        raise UserError("--nproc inside torchrun: launch either with torchrun or with --nproc, not both")
    port = free_port()
    procs = []
    for rank in range(nproc):
        child = {**os.environ, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank),
                 "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        procs.append(subprocess.Popen([sys.executable, *args], env=child))
    interrupts = 0
    failed_at = None
    while True:
        try:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            bad = [c for c in codes if c not in (None, 0)]
            if bad and failed_at is None:
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                failed_at = float("inf")
            time.sleep(0.05)
        except KeyboardInterrupt:  # the workers got it too; a second one stops them at once
            interrupts += 1
            if interrupts >= 2:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGINT)
    codes = [p.returncode for p in procs]
    nonzero = [c for c in codes if c != 0]
    if not nonzero:
        return 0
    if all(c == 130 for c in nonzero):
        return 130  # interrupted (checkpoint saved by rank 0, or not resumable)
    first = next(c for c in nonzero if c != 130)
    return first if first > 0 else 1  # killed by a signal: an internal failure
