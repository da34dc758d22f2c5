"""One round of a method inside `compress`: the method's selection (`methods.registry`) and the fine-tuning tail
every method shares (recalibration, the learning-rate probe, fine-tuning with the masks frozen and distillation from
the original), resumable from a checkpoint. A round that only projects (no data, or 0 epochs) needs no torch.
"""

from __future__ import annotations

from contextlib import nullcontext

from onnxecc.graph.surgery import prune_channels
from onnxecc.methods import registry
from onnxecc.methods.base import Context
from onnxecc.methods.options import CompressOptions
from onnxecc.optimize.problem import Problem
from onnxecc.train import checkpoint as checkpoints
from onnxecc.train import distributed
from onnxecc.train.qat import fake_quant


def select(method: str, problem: Problem, target: float, data, opts: CompressOptions, emit, precision=None):
    """Run one method (`methods.registry`) and the fine-tuning tail every method shares: (kept units per group,
    the model with trained weights, training history)."""
    chosen = registry.get(method)
    admm_epochs = opts.admm_iterations * opts.admm_epochs
    total_epochs = opts.epochs + admm_epochs  # every method gets the same training budget as ecc
    if projection_only(method, data, opts):
        emit("stage", {"name": "project"})
        keep = distributed.on_main(lambda: chosen.project(problem, target))
        distributed.check_same(keep, "channel keep sets")
        return keep, problem.proto, []
    mm = masked_model(problem, data, opts)
    emit("plan", {"epochs": total_epochs})  # what this round trains, for estimates of the time left
    history: list[dict] = []
    fisher = uses_fisher(opts, data)
    ck = checkpoints.current()  # interrupt and resume: the phase, the keep sets in force, the history
    saved = ck.take("select") if ck is not None else None
    now = {"phase": chosen.phase or chosen.name, "keep": None, "lr": None}
    state = lambda: {"phase": now["phase"], "keep": checkpoints.keep_to_plain(now["keep"]),  # noqa: E731
                     "history": history, "total_epochs": total_epochs, "lr": now["lr"]}
    with checkpoints.frame("select", state):
        if saved is not None and saved["phase"] == "finetune":  # resumed in the final fine-tuning
            keep, total_epochs = checkpoints.keep_from_plain(saved["keep"]), saved["total_epochs"]
            history += saved["history"]
            now["lr"] = saved.get("lr")
        else:
            selection = chosen.select(problem, target, Context(data, opts, emit, mm, fisher))
            keep = selection.keep
            history += selection.log
            total_epochs -= selection.epochs_spent
        history += mm.take_recoveries()  # non-finite steps undone so far (`onnxecc.train.guard`), as they are below
        distributed.check_same(keep, "channel keep sets")  # several processes: every rank masks the same channels
        now.update(phase="finetune", keep=keep)
        mm.set_keep(keep)
        if opts.recalibrate and total_epochs > 0:  # before the probe: it judges the rates from where training starts
            info = mm.recalibrate()  # again on resume (the probe may have been interrupted); the history has it once
            if not any(h["phase"] == "recalibrate" for h in history):
                emit("stage", {"name": "recalibrate", **info})
                history.append({"phase": "recalibrate", **info})
            history += mm.take_recoveries()
        if precision is not None and total_epochs > 0:  # int8 at these widths, measured before QAT trains it
            precision.choose_at(prune_channels(mm.write_back(), keep, problem.graph), "before the fine-tuning", keep,
                                may_drop=saved is None or saved["phase"] != "finetune")
        if now["lr"] is None:  # the probe trains from the pruned weights, in fp32, and restores them
            now["lr"], tried = finetune_lr(mm, opts, total_epochs, emit)
            history += [{"phase": "lr_probe", **t} for t in tried] + mm.take_recoveries()
        emit("stage", {"name": "finetune", "epochs": total_epochs, "lr": now["lr"]})
        qat = fake_quant(precision, mm.tm, opts.qat, total_epochs) if precision is not None else nullcontext()
        with qat as fq:  # QAT: the int8 layers fake-quantized, their activation ranges recomputed every epoch
            history += [{"phase": "finetune", **e} for e in mm.train(max(0, total_epochs), emit, lr=now["lr"],
                                                                    on_epoch=fq.epoch_done if fq else None,
                                                                    phase="finetune")]
        history += mm.take_recoveries()
    return keep, mm.write_back(), history


def projection_only(method: str, data, opts: CompressOptions) -> bool:
    """A round that only projects and measures (no torch): cheap enough for more closed-loop rounds."""
    chosen = registry.get(method)
    return not (chosen.needs_data or chosen.own_pipeline) and (data is None or opts.epochs == 0)


def uses_fisher(opts: CompressOptions, data) -> bool:
    """Fisher importance needs gradients of the loss on data; without data the weights' norms are all there is."""
    return opts.importance != "l2" and data is not None


def finetune_lr(mm, opts: CompressOptions, epochs: int, emit) -> tuple[float, list[dict]]:
    """The final fine-tuning's rate: --lr when given, else the probe's choice (`MaskedModel.choose_lr`), run
    outside the checkpointer (a resumed fine-tuning keeps the rate it started with; see `_select`)."""
    from onnxecc.train.finetune import PROBE_LRS, training_lr

    if opts.lr is not None or epochs <= 0:
        return training_lr(opts.lr), []
    emit("stage", {"name": "lr probe", "candidates": list(PROBE_LRS)})
    with checkpoints.suspended():
        return mm.choose_lr(PROBE_LRS)


def masked_model(problem: Problem, data, opts: CompressOptions):
    from onnxecc.train.finetune import TrainConfig, training_lr
    from onnxecc.train.masked import MaskedModel

    config = TrainConfig(epochs=opts.epochs, lr=training_lr(opts.lr), batch_size=opts.batch_size, seed=opts.seed,
                         temperature=opts.temperature, distill_weight=opts.distill_weight, device=opts.device)
    return MaskedModel(problem.proto, problem.graph, data, config, recalibration=opts.recalibrate,
                       class_axis=opts.class_axis)
