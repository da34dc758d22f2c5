"""Fine-tuning with frozen channel masks and distillation from the original model.

After a projection the pruned channels must stay exactly zero (so the physically pruned ONNX model equals
the trained torch model), and the user often has few or no labels: the original model's logits are the
teacher, mixed with cross-entropy when labels exist.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from onnxecc.core.errors import UserError
from onnxecc.graph.outputs import OutputKind, output_kind
from onnxecc.train import checkpoint, distributed
from onnxecc.train.guard import MAX_RECOVERIES, Guard


@dataclass
class Mask:
    """A 0/1 tensor multiplied into a parameter after every optimizer step (and into its gradient)."""

    param: torch.nn.Parameter
    mask: torch.Tensor

    def apply(self) -> None:
        if self.mask.device != self.param.device:  # training moves the model to its device and back to the CPU
            self.mask = self.mask.to(self.param.device)
        with torch.no_grad():
            self.param.mul_(self.mask)


TRAIN_LR = 2e-3  # Adam; the training phases' rate (ADMM W-steps, greedy, wsp) unless --lr sets one
# Final fine-tuning under --lr auto: a short pass from the pruned weights at each, the lowest loss wins
# (`MaskedModel.choose_lr`).
# Factors of 4 around the training rate: resnet18 on digits (3×32×32) pruned to latency 0.5 with int8 kept 98.6 %
# test accuracy before fine-tuning and fell to 35 % after the first epoch at 2e-3 (97.8 % after 12), 99.4 % at
# 5e-4; digits_resdw at MACs 0.2 (ecc) ended at 99.2 % with 2e-3 and 92.8 % with 5e-4.
PROBE_LRS = (TRAIN_LR, TRAIN_LR / 4, TRAIN_LR / 16)


def training_lr(lr: float | None) -> float:
    """The training phases' rate (ADMM W-steps, greedy, wsp): --lr, else the one they were tuned with."""
    return TRAIN_LR if lr is None else lr


class TorchInputs:
    """A model's inputs as torch tensors — one per input of the converted module, in its order, each of its own
    dtype (token ids stay int64, masks bool) — indexed together along the sample axis like one tensor, so the
    loops below batch a BERT-style encoder's ids and mask as they batch an image tensor."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = tuple(tensors)

    @classmethod
    def of(cls, x, names: Sequence[str] | None = None) -> TorchInputs:
        """From numpy data: one array (float data as float32), or `inputs.Feeds` ordered by `names` (the
        module's input names; default: the data's order)."""
        if isinstance(x, TorchInputs):
            return x
        arrays = [x.arrays[n] for n in (names or x.names)] if hasattr(x, "arrays") else [x]
        return cls([torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32) if a.dtype.kind == "f" and
                                    a.dtype != np.float16 else np.ascontiguousarray(a)) for a in arrays])

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index) -> TorchInputs:
        return TorchInputs([t[index] for t in self.tensors])

    def to(self, device) -> TorchInputs:
        return TorchInputs([t.to(device) for t in self.tensors])

    def __call__(self, module: torch.nn.Module) -> torch.Tensor:
        """`module` run on these inputs (on the device of its parameters)."""
        device = next(module.parameters(), self.tensors[0]).device
        return module(*(t.to(device) for t in self.tensors))


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = TRAIN_LR
    batch_size: int = 64
    weight_decay: float = 0.0
    temperature: float = 2.0
    distill_weight: float = 0.5  # share of the distillation term when labels exist (1.0 without labels)
    seed: int = 0
    device: str = "auto"
    lr_schedule: str = "cosine"  # "cosine" (to zero over the run) or "constant"
    shuffle_seed: int | None = None  # seed of the batch order (None: `seed`, which also seeds torch)
    phase: str = "training"  # the loop's name in recovery records and divergence messages (`onnxecc.train.guard`)
    max_recoveries: int = MAX_RECOVERIES  # non-finite steps undone before TrainingDiverged (0: the first raises)


@dataclass
class EpochLog:
    epoch: int
    loss: float
    train_accuracy: float | None
    seconds: float


@dataclass
class TrainHistory:
    epochs: list[EpochLog] = field(default_factory=list)
    recoveries: list[dict] = field(default_factory=list)  # non-finite steps undone (`train.guard.Guard.recover`)
    lr_scale: float = 1.0  # the rate at the end over the configured one (halved by each recovery)

    def as_dict(self) -> list[dict]:
        return [e.__dict__ for e in self.epochs]


def pick_device(name: str = "auto") -> torch.device:
    """The training device; under DDP on CUDA this rank's GPU. UserError (one line) when CUDA is asked for and
    absent."""
    distributed.check_device(name)
    if distributed.device() is not None and name in ("auto", "cuda"):
        return torch.device(distributed.device())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                      temperature: float, distill_weight: float, kind: OutputKind | None = None) -> torch.Tensor:
    """Class scores (`outputs.OutputKind`: N×C logits, or probabilities along any axis, e.g. a recogniser's N×T×C
    per-step softmax): T²·KL(teacher‖student) at temperature T per position (probabilities enter as their log,
    which is the logits up to a constant), mixed with cross-entropy when labels are given. Any other output — a
    detector's score map, a regression — has no class axis to soften: a softmax over its one channel is constant,
    so its KL is zero and trains nothing. Those are matched by mean squared error relative to the teacher's mean
    square (comparable across models). Without `kind`, an N×C output with C ≥ 2 is taken as logits."""
    if kind is None:
        kind = OutputKind(1 if student.dim() == 2 and student.shape[1] >= 2 else None)
    if labels is not None and (kind.class_axis != 1 or student.dim() != 2):
        raise UserError(f"labels (y) need a model whose output is class scores N×C, this one outputs "
                        f"{list(student.shape[1:])} per sample: leave y out of the .npz to train by distillation")
    if kind.class_axis is None:
        return F.mse_loss(student, teacher) / teacher.detach().pow(2).mean().clamp_min(1e-12)
    t = temperature
    s_scores, t_scores = class_scores(student, kind), class_scores(teacher, kind)
    kd = F.kl_div(F.log_softmax(s_scores / t, dim=1), F.log_softmax(t_scores / t, dim=1),
                  reduction="batchmean", log_target=True) * (t * t)
    if labels is None:
        return kd
    return distill_weight * kd + (1.0 - distill_weight) * F.cross_entropy(s_scores, labels)


def class_scores(out: torch.Tensor, kind: OutputKind) -> torch.Tensor:
    """The output as rows of class logits (positions × classes): the class axis last, every other axis one row
    each; probabilities become their log (floored at 1e-30, where float32's softmax underflows)."""
    rows = out.movedim(kind.class_axis, -1)
    rows = rows.reshape(-1, rows.shape[-1])
    return rows.clamp_min(1e-30).log() if kind.probabilities else rows


def _freeze_batchnorm(module: torch.nn.Module) -> None:
    """Few samples make running statistics worse, not better: BatchNorm layers stay in eval mode."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def finetune(module: torch.nn.Module, x: np.ndarray, teacher_logits: np.ndarray, y: np.ndarray | None,
             config: TrainConfig, masks: list[Mask] = (),
             on_epoch: Callable[[EpochLog], None] | None = None,
             on_batch: Callable[[int, int], None] | None = None,
             penalty: Callable[[], torch.Tensor] | None = None,
             param_groups: Sequence[dict] = (),
             after_step: Callable[[int, int], None] | None = None,
             on_recovery: Callable[[dict], None] | None = None,
             kind: OutputKind | None = None) -> TrainHistory:
    """Train `module` in place; masked entries stay exactly zero throughout. Deterministic given the seed.

    Adam on the distillation loss, learning rate per `config.lr_schedule`, batch order seeded. `kind` says what
    the output is (`onnxecc.graph.outputs`: class scores along which axis, or a map); from `teacher_logits` if None.
    Hooks:
    `penalty()` is added to every batch's loss (ADMM's proximal term ρ/2·‖W − Z + U‖², wsp's mask L1 term);
    `param_groups` are extra Adam groups (dicts with "params" and e.g. their own "lr") whose parameters leave
    the default group (every other trainable parameter, at `config.lr`); `after_step(step, total_steps)` runs
    after every optimizer step and mask application (step counts from 1; wsp projects there). The masks are
    applied before `after_step`, which may zero more entries but must not revive masked ones.

    Non-finite numbers (`onnxecc.train.guard`): a step whose loss or gradients are non-finite is not applied; the
    weights and Adam's state go back to the last epoch boundary, every rate is halved and training goes on
    with the next batch (`TrainHistory.recoveries`, each also passed to `on_recovery` when it happens); after
    `guard.MAX_RECOVERIES` the loop raises `TrainingDiverged`, naming `config.phase`."""

    threads = torch.get_num_threads()
    if sum(p.numel() for p in module.parameters()) < _SMALL_MODEL:
        torch.set_num_threads(1)  # tiny layers: thread synchronisation costs more than it gives
    try:
        kind = kind if kind is not None else output_kind(teacher_logits)
        return _finetune(module, x, teacher_logits, y, config, masks, on_epoch, on_batch, penalty, param_groups,
                         after_step, on_recovery, kind)
    finally:
        torch.set_num_threads(threads)


_SMALL_MODEL = 2_000_000  # parameters


def _finetune(module, x, teacher_logits, y, config, masks, on_epoch, on_batch, penalty, param_groups=(),
              after_step=None, on_recovery=None, kind=None) -> TrainHistory:
    device = pick_device(config.device)
    module.to(device)
    for m in masks:
        m.mask = m.mask.to(device)
        m.apply()
    ddp = distributed.current()  # several processes (onnxecc.train.distributed): DDP, each rank a shard of every batch
    net = distributed.wrap(module) if ddp is not None else module
    try:
        return _loop(module, net, ddp, device, x, teacher_logits, y, config, masks, on_epoch, on_batch, penalty,
                     param_groups, after_step, on_recovery, kind)
    finally:
        del net  # DDP's gradient hooks must not outlive this run (rank 0 alone computes Fisher importances)
        module.to("cpu")  # also when training raises (a diverged rate of the lr probe is caught): callers evaluate,
        # project and write back on the CPU
        if ddp is not None:
            import gc

            gc.collect()


def steps_per_epoch(samples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch over `samples` (the last batch may be short; DDP shards each batch, not the
    epoch)."""
    return max(1, math.ceil(samples / batch_size))


def _loop(module, net, ddp, device, x, teacher_logits, y, config, masks, on_epoch, on_batch, penalty, param_groups,
          after_step, on_recovery, kind) -> TrainHistory:
    import time

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed if config.shuffle_seed is None else config.shuffle_seed)
    grouped = {id(p) for g in param_groups for p in g["params"]}
    params = [p for p in module.parameters() if p.requires_grad and id(p) not in grouped]
    optimizer = torch.optim.Adam([{"params": params}, *param_groups] if param_groups else params, lr=config.lr,
                                 weight_decay=config.weight_decay)
    xs = TorchInputs.of(x)
    ts = torch.as_tensor(teacher_logits, dtype=torch.float32)
    ys = torch.as_tensor(y, dtype=torch.long) if y is not None else None
    n = len(xs)
    total_steps = steps_per_epoch(n, config.batch_size) * config.epochs
    if config.lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}: 'cosine' or 'constant'")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))) \
        if config.lr_schedule == "cosine" else None
    weight = config.distill_weight if ys is not None else 1.0
    history = TrainHistory()
    step, first_epoch, skipped = 0, 0, 0
    ck = checkpoint.current()  # interrupt and resume (issue 9): see onnxecc.train.checkpoint
    resumed = ck.take("train") if ck is not None else None
    if resumed is not None:  # continue exactly where an interrupted run stopped
        if resumed["total_steps"] != total_steps or resumed["n"] != n:
            raise UserError("the checkpoint's training run does not match this one (steps or samples differ): "
                            "start over without --resume")
        module.load_state_dict(resumed["module"])
        optimizer.load_state_dict(resumed["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resumed["scheduler"])
        generator.set_state(resumed["generator"])
        torch.set_rng_state(resumed["torch_rng"])
        history.epochs = [EpochLog(**e) for e in resumed["history"]]
        step, first_epoch = resumed["step"], resumed["epoch"]
    watch = Guard(config.phase, module, optimizer, scheduler, max_recoveries=config.max_recoveries,
                  recoveries=resumed.get("recoveries") if resumed is not None else None, on_recovery=on_recovery)
    watch.start(first_epoch + 1)
    for epoch in range(first_epoch, config.epochs):
        start = time.perf_counter()
        module.train()
        _freeze_batchnorm(module)
        if resumed is not None:  # the interrupted epoch: same order, from the next batch, same running sums
            order, first = resumed["order"], resumed["position"]
            total_loss, correct = resumed["total_loss"], resumed["correct"]
            skipped = resumed.get("skipped", 0)
            if not distributed.is_main():  # the saved sums are global: rank 0 carries them, the others add to 0
                total_loss, correct, skipped = 0.0, 0, 0
            start -= resumed["epoch_seconds"]
            resumed = None
        else:
            order, first = torch.randperm(n, generator=generator), 0
            total_loss, correct, skipped = 0.0, 0, 0
        for i in range(first, n, config.batch_size):
            idx = order[i:i + config.batch_size]
            idx, scale, count = distributed.shard(idx)  # the whole batch in one process (scale 1)
            xb, tb = xs[idx].to(device), ts[idx].to(device)
            yb = ys[idx].to(device) if ys is not None else None
            out = xb(net)
            loss = distillation_loss(out, tb, yb, config.temperature, weight, kind)
            logged = loss
            if scale != 1.0:  # DDP averages over the ranks: Σ_ranks scale·mean_rank / W = the global batch mean
                loss = loss * scale
            if penalty is not None:
                term = penalty()
                loss, logged = loss + term, logged + term
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for m in masks:
                if m.param.grad is not None:
                    m.param.grad.mul_(m.mask)
            bad = watch.bad_step(logged)
            if bad is None:
                optimizer.step()
                if scheduler is not None:  # the schedule counts applied steps
                    scheduler.step()
            else:  # not applied: back to the last good state at a lower rate (`onnxecc.train.guard`)
                watch.recover(bad, epoch + 1, step + 1)
            for m in masks:  # Adam's moments could otherwise revive a pruned entry
                m.apply()
            if bad is None:
                total_loss += float(logged.detach()) * count
                if yb is not None and count:
                    correct += int((out.argmax(1) == yb).sum())
            else:
                skipped += count
            step += 1
            if after_step:
                after_step(step, total_steps)
            if on_batch:
                on_batch(step, total_steps)
            if ck is not None and (ck.requested if ddp is None else distributed.any_rank(ck.requested)):
                sums = distributed.all_reduce_sum([total_loss, correct, skipped]) if ddp is not None else None
                if ddp is not None and not ddp.is_main:  # every rank stops here; rank 0 alone writes the file
                    raise checkpoint.Interrupted(None if ck.not_resumable else ck.path, ck.not_resumable)
                if sums is not None:
                    total_loss, correct, skipped = sums[0], int(round(sums[1])), int(round(sums[2]))
                ck.stop({  # raises checkpoint.Interrupted
                    "module": module.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                    "step": step, "total_steps": total_steps, "n": n, "epoch": epoch, "order": order,
                    "position": i + config.batch_size, "total_loss": total_loss, "correct": correct,
                    "epoch_seconds": time.perf_counter() - start, "history": history.as_dict(),
                    "skipped": skipped, "recoveries": watch.recoveries})
        if ddp is not None:  # every rank logs the global sums
            total_loss, correct, skipped = distributed.all_reduce_sum([total_loss, correct, skipped])
            correct = int(round(correct))
        if (bad := watch.state_problem()) is not None:  # e.g. a projection after a step: the epoch is undone
            watch.recover(bad, epoch + 1, step)
        watch.save()
        counted = max(1, n - int(round(skipped)))  # the batches whose steps were undone are not in the averages
        log = EpochLog(epoch + 1, total_loss / counted, correct / counted if ys is not None else None,
                       time.perf_counter() - start)
        history.epochs.append(log)
        if on_epoch:
            on_epoch(log)
    history.recoveries, history.lr_scale = watch.recoveries, watch.lr_scale
    module.eval()
    module.to("cpu")
    if ddp is not None:  # DDP keeps the replicas equal; a rank that diverged would write a different model
        distributed.check_same(module.state_dict(), "weights after training")
    return history
