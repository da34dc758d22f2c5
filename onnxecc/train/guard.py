"""Keep training alive through non-finite numbers: restore the last good state, lower the rate, go on.

Every training loop of onnxecc (ADMM's W-steps, the learning-rate probe, fine-tuning, greedy's short
fine-tunings, wsp's phases) runs `onnxecc.train.finetune`, and that loop watches every step with a `Guard`: a
non-finite loss or gradient (checked before the optimizer applies it) or non-finite weights (checked at the
end of each epoch) put back the weights and the optimizer's state of the last good epoch boundary, halve the
learning rate of every parameter group and continue with the next batch. Each recovery is recorded (phase,
epoch, step, what was non-finite, the new rate) for the report's history. After `MAX_RECOVERIES` in one loop
the run stops with `TrainingDiverged`: one line naming the phase, the epoch and what to try (exit 1).

Why: on the PaddleOCR text-line classifier (a paddle2onnx export, BatchNorm kept in the graph) ADMM at the
default rate sent weights to inf after 138 s and the run ended in an internal error about importances, with
nothing to tell the user what to change. A diverging step is a property of the rate at that point of
training, which a lower rate fixes; a state that is non-finite at any rate is reported, not retried forever.

The other places where non-finite numbers enter use `all_finite` too: Fisher importances skip a batch whose
gradients are non-finite, and a recalibration that produced non-finite weights is undone
(`onnxecc.train.masked.MaskedModel`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from onnxecc.core.errors import TrainingDiverged
from onnxecc.train import distributed

MAX_RECOVERIES = 4  # per training loop (one call of `onnxecc.train.finetune`): the rate ends at 1/16 of where it was
LR_FACTOR = 0.5  # each recovery multiplies every parameter group's rate by this


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every floating-point element of `tensors` is finite (one synchronisation per device: Adam keeps
    its step counts on the CPU beside parameters on a GPU)."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None and t.is_floating_point():
            flags.setdefault(t.device, []).append(torch.isfinite(t.detach()).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())


def _to_cpu(obj):
    """A deep copy of a state dict (nested dicts/lists of tensors and numbers) with every tensor on the CPU: the
    last good state must not change when training mutates the live tensors in place, nor cost device memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class Guard:
    """The watch over one training loop (see the module docstring).

    `phase` names the loop in records and messages (e.g. "admm 2/5", "finetune", "lr probe"). The loop calls
    `save()` where its state is good (at its start and after each epoch), `bad_step(loss)` after the backward
    pass and before the optimizer step, and `recover(...)` when something was non-finite."""

    def __init__(self, phase: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
                 max_recoveries: int = MAX_RECOVERIES, recoveries: list[dict] | None = None,
                 on_recovery: Callable[[dict], None] | None = None):
        self.phase, self.module, self.optimizer, self.scheduler = phase, module, optimizer, scheduler
        self.on_recovery = on_recovery  # told each record as it happens (a log line while training goes on)
        self.max_recoveries = max_recoveries
        self.recoveries: list[dict] = list(recoveries or [])  # a resumed loop continues its count
        self._good: tuple[dict, dict] | None = None
        self.lr_scale = LR_FACTOR ** len(self.recoveries)
        # buffers that are non-finite before any step are constants of the function, not divergence: jax2tf writes
        # softmax's max as Max(-inf, ReduceMax(x)) (magika), and that -inf must not fail every loop's first check
        trained = {name for name, _ in module.named_parameters(remove_duplicate=False)}
        self._constants = {name for name, t in module.state_dict().items()
                           if name not in trained and t.is_floating_point() and not bool(torch.isfinite(t).all())}

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        return [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]

    def state_problem(self) -> str | None:
        """"weights" when a parameter, buffer or optimizer moment is non-finite, else None (same on every rank);
        buffers that were non-finite when the guard was made are the model's own constants and are not counted."""
        state = [v for k, v in self.module.state_dict().items() if k not in self._constants]
        ok = all_finite([*state, *self._optimizer_tensors()])
        return None if not distributed.any_rank(not ok) else "weights"

    def start(self, epoch: int) -> None:
        """At the loop's start: the state it starts from is the first good one (TrainingDiverged if it is not
        finite: nothing to go back to)."""
        if self.state_problem() is not None:
            raise TrainingDiverged(diverged_message(self.phase, epoch, "weights", 0, None))
        self.save()

    def save(self) -> None:
        """Remember the module and the optimizer as the last good state (the caller checked them)."""
        self._good = (_to_cpu(self.module.state_dict()), _to_cpu(self.optimizer.state_dict()))

    def bad_step(self, loss: torch.Tensor) -> str | None:
        """After `loss.backward()`: "loss" or "gradients" when that is non-finite, else None; every rank of a
        distributed run decides alike (a rank's non-finite loss may leave the averaged gradients finite)."""
        what = None
        if not all_finite([loss]):
            what = "loss"
        elif not all_finite(p.grad for p in self._params()):
            what = "gradients"
        if distributed.any_rank(what is not None) and what is None:
            what = "loss on another process"
        return what

    def recover(self, what: str, epoch: int, step: int) -> dict:
        """Back to the last good state with every rate times `LR_FACTOR`; returns the record. Raises
        `TrainingDiverged` once this loop has recovered `max_recoveries` times already."""
        rates = [g["lr"] for g in self.optimizer.param_groups]
        if len(self.recoveries) >= self.max_recoveries or self._good is None:
            raise TrainingDiverged(diverged_message(self.phase, epoch, what, len(self.recoveries), min(rates)))
        module_state, optimizer_state = self._good
        self.module.load_state_dict(module_state)
        self.optimizer.load_state_dict(optimizer_state)  # restores the groups' rates too: set them below
        self.optimizer.zero_grad(set_to_none=True)  # hooks after the step must not see the bad gradients
        for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
            group["lr"] = rate * LR_FACTOR
            if "initial_lr" in group:
                group["initial_lr"] *= LR_FACTOR
        if self.scheduler is not None:  # a schedule multiplies its base rates: lower those, it sets the rest
            self.scheduler.base_lrs = [lr * LR_FACTOR for lr in self.scheduler.base_lrs]
        self.lr_scale *= LR_FACTOR
        record = {"phase": "recovery", "during": self.phase, "epoch": epoch, "step": step, "non_finite": what,
                  "lr": self.optimizer.param_groups[0]["lr"]}
        self.recoveries.append(record)
        if self.on_recovery is not None:
            self.on_recovery(record)
        return record


def diverged_message(phase: str, epoch: int | None, what: str, recoveries: int, lr: float | None) -> str:
    """The one line of a `TrainingDiverged`: where, what, what was tried, what to try."""
    where = phase if epoch is None else f"{phase}, epoch {epoch}"
    tried = (f" after {recoveries} recoveries (each restored the last good weights and halved the learning rate, "
             f"last {lr:.3g})" if recoveries and lr else "")
    rate = f"--lr {lr * LR_FACTOR ** 2:.2g}" if lr else "--lr 1e-4"
    return (f"training diverged in {where}: the {what} became non-finite{tried}; try a smaller learning rate "
            f"({rate}), or check --data for extreme values")
