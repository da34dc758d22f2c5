"""`onnxecc compress`: the main job, as one function.

ONNX in → channel groups and a cost model → budget → structured projection (which channels to keep) →
optional fine-tuning in torch with the masks frozen and distillation from the original → the trained
weights written back into the *original* graph → channels physically removed → MACs/params counted again on the
output file, latency or energy (with a measured profile) measured on it side by side with the original, and the
model checked in onnxruntime → atomic write with metadata, and a JSON report.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import onnx

from onnxecc.core import atomic
from onnxecc.core.errors import UserError
from onnxecc.core.recipe import as_dict as recipe_of
from onnxecc.cost.analysis import analyse
from onnxecc.cost.budget import Budget, format_cost, parse_budget
from onnxecc.cost.costs import BilinearCost, Variables, macs_cost, params_cost
from onnxecc.graph import ingest, runtime
from onnxecc.graph.channels import ChannelGraph, attention_name
from onnxecc.graph.inputs import graph_inputs, per_sample_shapes, resolve_shapes, shapes_text, symbolic
from onnxecc.graph.metadata import write_metadata
from onnxecc.graph.surgery import prune_channels
from onnxecc.methods import registry
from onnxecc.methods.base import Context
from onnxecc.methods.options import METRICS, CompressOptions
from onnxecc.methods.result import CompressResult, evaluate, recovery_warnings, selected_round, tool_version
from onnxecc.optimize.problem import Problem
from onnxecc.optimize.projection import check_reachable
from onnxecc.train import checkpoint as checkpoints
from onnxecc.train import distributed
from onnxecc.train.quantize import Int8Dropped
from onnxecc.validate import analytic_cost

_selected_round = selected_round  # its name here before the move (bench/guarantee.py, tests)

METHODS = ("auto", *registry.METHODS)  # as imported; `_check_options` reads the registry itself


def cost_model(metric: str, model: onnx.ModelProto, graph: ChannelGraph, layers, variables: Variables,
               profile=None) -> BilinearCost:
    """The cost of `metric` as a bilinear function of the widths of `variables` (classes of group units)."""
    if metric == "macs":
        return macs_cost(graph, layers, model, variables)
    if metric == "params":
        return params_cost(graph, model, variables)
    if metric in ("latency", "energy"):
        if not profile:
            raise UserError(f"--metric {metric} needs a measured profile: run `onnxecc profile MODEL -o P.json` on "
                            "the target and pass --profile P.json")
        from onnxecc.cost.profiler import load_profile, profile_cost

        prof = load_profile(profile, model) if isinstance(profile, (str, Path)) else profile
        if prof.metric != metric:
            raise UserError(f"profile {prof.path or profile} measures {prof.metric}, not {metric}: "
                            f"pass --metric {prof.metric} or a profile measured with an {metric} meter")
        return profile_cost(prof, model, graph, layers, variables)
    raise UserError(f"unknown metric '{metric}': choose one of {', '.join(METRICS)}")


def compress(model: ingest.ModelSource, budget: str | float, output: str | Path | None = None,
             options: CompressOptions | None = None, report: str | Path | None = None,
             on_event: Callable[[str, dict], None] | None = None, checkpoint: str | Path | None = None,
             resume: str | Path | None = None, overwrite: bool = False) -> CompressResult:
    """Compress `model` to meet `budget` (see `onnxecc.cost.budget` for the grammar); write `output` if given.
    An `output` that would replace the input model or its external data is a UserError unless `overwrite`
    (`_refuse_overwriting_input`); a report or checkpoint over them always is.

    `on_event(kind, info)` receives progress ("stage", "epoch", "batch") for a front end to display.

    Closed loop (latency, and energy with a measured profile: its meter): each output is measured side by side
    with the original on the target provider, in
    up to `max_rounds` rounds. Over the budget → the internal budget is tightened; more than 10% under it
    (over-pruned) → loosened, by default only when a round does not train (projection without data: a round
    costs seconds; with training every round re-trains, so a meeting output is kept — see `_loosens` and
    `closed_loop_loosen`). The returned output is the least over-pruned one that met the budget, never a miss
    when a round met it; `result.rounds` records every round (`next`: why another followed; `selected`).

    Interrupt and resume (`onnxecc.train.checkpoint`): with `checkpoint=PATH`, while it trains the first SIGINT (or
    `onnxecc.train.checkpoint.request()`) stops after the current optimizer step, saves the training state to PATH and
    raises `onnxecc.train.checkpoint.Interrupted` (nothing else is written). `resume=PATH` continues such a run (same
    model, budget and options, else UserError) and ends with the weights of an uninterrupted run; the checkpoint
    is then removed. Without `checkpoint` (and `resume`), SIGINT is left alone. Every training method resumes
    (wsp and greedy included).
    """
    opts = copy.copy(options or CompressOptions())
    emit = on_event or (lambda kind, info: None)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    checkpoint = checkpoint if checkpoint is not None else resume
    for path in (output, report, checkpoint):
        if path is not None:
            atomic.check_output_path(path)
    _refuse_overwriting_input(model, output, report, checkpoint, overwrite)
    _check_options(opts)
    recipe = recipe_of(opts)  # before the run fills in sizes, rounding and provider it resolved
    parsed = parse_budget(str(budget), opts.metric)
    _check_devices(opts)
    if distributed.launched():  # torchrun / --nproc: DDP training, rank 0 projects, measures and writes
        if opts.method == "wsp":
            raise UserError("--method wsp trains in one process: run it without torchrun / --nproc")
        distributed.init(opts.device)
    resumed = checkpoints.load(resume) if resume is not None else None
    proto = ingest.load(model)
    ck = None
    if checkpoint is not None:
        fingerprint = checkpoints.fingerprint(ingest.sha256(proto), str(budget), opts)
        if resumed is not None:
            checkpoints.check_fingerprint(Path(resume), resumed["fingerprint"], fingerprint)
        ck = checkpoints.Checkpointer(checkpoint, fingerprint, resumed)
    own = registry.METHODS.get(opts.method)
    if own is not None and own.own_pipeline:  # wsp: its trainer saves and restores its own state (frame "wsp")
        with checkpoints.active(ck):
            result = own.run(model, parsed, output, opts, report, emit)
        if resume is not None:  # the run the checkpoint was for is complete
            Path(resume).unlink(missing_ok=True)
        return result

    emit("stage", {"name": "analyse"})
    data = _load_data(opts.data, proto) if opts.data else None  # first: its first sample may fix symbolic sizes
    analysis = analyse(proto, "compress", _input_shapes(proto, opts, data))
    opts.input_shapes = analysis.input_shapes
    layers, graph, variables = analysis.layers, analysis.graph, analysis.variables
    profile = None
    if opts.profile and opts.metric in ("latency", "energy"):
        from onnxecc.cost.profiler import load_profile

        profile = load_profile(opts.profile, proto)
        # The fit is exact on the width grid it was sampled on; measure where the profile was measured.
        opts.round_to = opts.round_to or int(profile.settings.get("step", 1))
        opts.provider = profile.provider
        opts.threads = int(profile.settings.get("threads", opts.threads))
    _check_devices(opts)  # again: a profile names its provider
    if not opts.round_to:  # channel counts the target's kernels like (MLAS on AVX-512: 16; measured in DESIGN)
        from onnxecc.cost.profiler.sampling import auto_step

        opts.round_to = auto_step(opts.provider)
    cost = cost_model(opts.metric, proto, graph, layers, variables, profile or opts.profile)
    if opts.metric == "energy" and opts.closed_loop:  # the closed loop measures with the profile's meter: here?
        from onnxecc.cost.profiler import recorded_meter

        with recorded_meter(profile.meter, WITHOUT_METER):
            pass
    original = cost(None)
    target = parsed.resolve(original)
    fmt = lambda v: format_cost(v, opts.metric)  # noqa: E731
    method = opts.method if opts.method != "auto" else _auto_method(opts)
    method = "greedy" if method == "netadapt" else method
    if registry.get(method).needs_data and not opts.data:
        raise UserError(f"--method {method} trains the network and needs --data (digits or FILE.npz); "
                        "without data use --method project or uniform")
    if data is not None:
        from onnxecc.graph.data import check_classes

        check_classes(data, next(layer.cout for layer in reversed(layers) if layer.weight is not None))
    precision, fp32_cost, int8_dropped = None, cost, None
    if "precision" in opts.knobs and target < original:  # int8 layers by measurement; their terms scaled down
        from onnxecc.train.quantize import plan_precision

        precision = plan_precision(proto, analysis, cost, profile, data, opts, emit)
        cost = precision.cost
    cost.channels_per_unit = {v: graph.groups[g].channels // graph.groups[g].size
                              for v, g in enumerate(variables.group) if g in graph.heads}  # a head: many channels
    # approximate groups (a normalisation runs over them) change the function when pruned: only training recovers it
    approximate = {g.id: g.approximate for g in graph.prunable_groups if g.approximate}
    left_whole = data is None or not opts.prune_approximate  # approximate groups kept at full width
    prunable_groups = {g.id for g in graph.prunable_groups if not left_whole or g.id not in approximate}
    how = "pass --data" if data is None else "drop --keep-approximate"  # what lets them be pruned
    problem = Problem(proto, graph, variables, cost, [v for v, g in enumerate(variables.group) if g in prunable_groups],
                      opts.min_width, opts.round_to, fmt)
    timings["analyse"] = time.perf_counter() - t0

    warnings: list[str] = [] if profile is None else _other_machine(profile, opts)
    if profile is not None and not opts.closed_loop:
        warnings.append(f"closed loop off: the output's {opts.metric} is not measured; whether it meets the budget is "
                        "the profile's estimate")
    history: list[dict] = []
    rounds: list[dict] = []
    keep = None
    estimated = original
    if target >= original:
        out_model, pruned = proto, False
        warnings.append(f"budget {fmt(target)} is at or above the original cost {fmt(original)}: no pruning needed")
    else:
        if not problem.prunable and approximate:
            raise UserError(f"no channel group of this model can be pruned exactly: {len(approximate)} group(s) have a "
                            f"normalisation over their channels (approximate), which only fine-tuning recovers: {how} "
                            "(see `onnxecc inspect`)")
        if not problem.prunable:
            raise UserError("no channel group of this model can be pruned (all frozen; see `onnxecc inspect`)")
        reach = lambda c: check_reachable(c, problem.prunable, target, min_width=opts.min_width,  # noqa: E731
                                          round_to=opts.round_to, fmt=fmt)
        if precision is not None:  # the int8 model, else a fallback that reaches the budget (quantize.PrecisionPlan)
            problem.cost = cost = precision.reachable_cost(reach)
            precision.fp32_reaches = _reaches(reach, fp32_cost)
        else:
            _reach_or_name_data(reach, cost, problem, approximate if left_whole else {}, target, fmt, how)
        if data is None:
            warnings.append("no --data: channels were chosen by weight magnitude only and accuracy is not "
                            "recovered by fine-tuning; pass --data to fine-tune")
        internal = target
        t = time.perf_counter()
        loosen = _loosens(opts, method, data)
        max_rounds = opts.max_rounds or (6 if _projection_only(method, data, opts) else 3)
        outputs: dict[int, tuple] = {}  # round -> (keep, model, estimated cost, history) of measured rounds
        first_round = 1
        if ck is not None and (saved := ck.take("compress")) is not None:  # resume: the closed-loop round
            first_round, internal, rounds[:] = saved["round"], saved["internal"], saved["rounds"]
            outputs = {int(r): _unpack_output(o) for r, o in saved["outputs"].items()}
            if precision is not None and any(r.get("next") == INT8_DROPPED for r in rounds):
                int8_dropped, precision, problem.cost, cost = saved["int8_dropped"], None, fp32_cost, fp32_cost
        since = next((i + 1 for i, r in enumerate(rounds) if r.get("next") == INT8_DROPPED), 0)  # this cost model's
        max_rounds += since > 0  # a round whose int8 did not survive is chosen again, not measured: not counted
        round_ = first_round - 1
        while round_ < max_rounds:
            round_ += 1
            round_state = lambda r=round_, b=internal, d=int8_dropped: {  # noqa: E731
                "round": r, "internal": b, "rounds": rounds, "int8_dropped": d,
                "outputs": {k: _pack_output(o) for k, o in outputs.items()}}
            trains = not _projection_only(method, data, opts)
            try:
                with checkpoints.active(ck if trains else None), checkpoints.frame("compress", round_state):
                    if precision is not None and trains and not (ck is not None and ck.peek("select")):
                        _plan_int8(problem, internal, precision)  # before it trains: int8 at the planned widths
                    keep, trained, history = _select(method, problem, internal, data, opts, emit, precision)
                emit("stage", {"name": "prune"})
                out_model = prune_channels(trained, keep, graph)
                if precision is not None:  # the closed loop measures the QDQ model that is written
                    out_model = precision.apply(out_model)
            except Int8Dropped as drop:
                # the widths were bought with int8 savings that pruning took away: choose them again as width alone
                # (in one more round even after the last: resnet18 at latency 0.3 lost its int8 in the third round
                # and, kept, measured 0.42)
                rounds.append({"round": round_, "internal_budget": internal, "estimated_cost": cost(
                    variables_widths(variables, drop.keep if drop.keep is not None else keep)),
                    "next": INT8_DROPPED, "int8_measured": drop.when})
                int8_dropped, precision, problem.cost, cost = precision.as_dict(drop.model), None, fp32_cost, fp32_cost
                internal, since = target, len(rounds)
                max_rounds += 1
                continue
            estimated = cost(variables_widths(variables, keep))
            record = {"round": round_, "internal_budget": internal, "estimated_cost": estimated}
            rounds.append(record)
            check = distributed.on_main(  # rank 0 measures, every rank follows its verdict
                lambda m=out_model: _closed_loop_check(opts, runtime.on_disk(model, proto), m, parsed, target,
                                                       profile.meter if profile is not None else None))
            if check is None:
                break
            record.update(check)
            outputs[round_] = (keep, out_model, estimated, history)
            step = (_next_internal(rounds[since:], original, loosen) if precision is None else  # top: full int8
                    _next_internal(rounds, cost(None), loosen, precision.measured.ratio))
            if step is None or round_ == max_rounds:
                break
            internal, reason = step
            if reason == "over budget" and internal < (floor := min_cost_or_zero(problem)):
                if estimated <= floor * (1 + 1e-9):  # the smallest widths measured over the budget: nothing left
                    break
                internal = floor  # the smallest widths, measured once before giving up (the model was optimistic)
            record["next"] = reason
        chosen = _choose_round(rounds)
        warnings += _floor_missed(rounds, min_cost_or_zero(problem), opts, fmt)
        if chosen["round"] in outputs:  # the best measured output: never a miss when a round met the budget
            keep, out_model, estimated, history = outputs[chosen["round"]]
            if chosen["meets"] and estimated > target:
                warnings.append(f"the profile estimates the output at {fmt(estimated)}, above the budget "
                                f"{fmt(target)}, but it measured {chosen['of_budget']:.0%} of the budget on "
                                f"{opts.provider}: the measurement decides (the profile is pessimistic here)")
        timings["select"] = time.perf_counter() - t
        pruned = True

    counted = analytic_cost(out_model, opts.metric, opts.input_shapes)
    tolerance = 1e-6 * max(1.0, original)
    if counted is not None and (counted - estimated > tolerance or (cost.exact and estimated - counted > tolerance)):
        raise RuntimeError(f"cost model disagrees with the count on the pruned file: {estimated} vs {counted}")
    if not cost.exact:
        warnings.append("some layers' cost is quadratic in one channel group (1×1 conv inside a residual block): "
                        "the projection used an upper bound there, so the output may land below the budget")
    result = CompressResult(
        out_model, Path(output) if output else None, opts.metric, parsed, target, original, estimated, counted,
        pruned, _widths(graph, keep), history=history, warnings=warnings,
    )
    result.method = method if pruned else "none"
    result.recipe = recipe
    result.rounds = rounds
    result.heads = attention_heads(graph, keep)
    left = "approximate: needs --data" if data is None else "left whole: --keep-approximate"
    result.approximate_groups = [
        {"id": g, "reason": why, "pruned": result.widths[g][0] < result.widths[g][1]} if not left_whole
        else {"id": g, "reason": why, "pruned": False, "left": left}
        for g, why in approximate.items()]
    if approximate and left_whole and pruned:
        warnings.append(f"{len(approximate)} approximate group(s) left at full width (a normalisation runs over their "
                        f"channels; {left}): {', '.join(map(str, approximate))}")
    if symbolic(proto):  # the costs hold at this size; the output keeps the sizes symbolic
        result.input_shapes = {n: list(v) for n, v in opts.input_shapes.items()}
        write_metadata(out_model, {"input_shapes": result.input_shapes})
    warnings += recovery_warnings(history)
    if int8_dropped is not None:
        result.precision = {**int8_dropped, "int8_layers": [], "dropped": INT8_DROPPED}
        warnings.append(f"precision: {INT8_DROPPED}")
    elif precision is not None:
        result.precision = precision.as_dict(out_model)
        warnings.append(f"precision: {len(result.precision['int8_layers'])} layer(s) in int8 (QDQ); fine-tuning: "
                        f"{result.precision['fine_tuning'].split(':')[0]}")
    emit("stage", {"name": "validate"})
    t = time.perf_counter()
    if distributed.is_main():  # the other ranks hold the same model: rank 0 alone evaluates and writes
        evaluate(result, runtime.on_disk(model, proto), data, opts)  # the user's file: not written again
    timings["validate"] = time.perf_counter() - t
    measured_fail = (chosen := selected_round(rounds)) is not None and chosen.get("meets") is False
    if not result.meets_budget and not measured_fail:
        raise RuntimeError(f"internal error: output cost {fmt(result.final_cost)} exceeds the budget {fmt(target)}")

    write_metadata(out_model, {
        "version": tool_version(), "metric": opts.metric, "budget": target, "budget_text": parsed.text,
        "original_cost": original, "estimated_cost": estimated, "counted_cost": counted, "pruned": pruned,
        "method": result.method, "accuracy": result.accuracy_after,
    })
    if opts.metric == "energy" and profile is not None:  # what `validate --meter` measures it with again
        write_metadata(out_model, {"meter": profile.meter, "provider": opts.provider, "threads": opts.threads})
    timings["total"] = time.perf_counter() - t0
    result.timings = timings
    if not distributed.is_main():
        return result
    if measured_fail:
        result.measured_miss = True
        if output is not None:  # never hand an over-budget model over under the requested name
            kept_as = over_budget_path(output)
            ingest.save(out_model, kept_as)
            result.output = kept_as
            warnings.append(f"the output missed the measured budget: written to {kept_as}, not to {output}")
    elif output is not None:
        ingest.save(out_model, output)
    if report is not None:
        atomic.write_json(report, result.as_dict())
    if resume is not None:  # the run the checkpoint was for is complete
        Path(resume).unlink(missing_ok=True)
    return result


def _reach_or_name_data(reach, cost, problem: Problem, approximate: dict[int, str], target: float, fmt,
                        how: str = "pass --data") -> None:
    """`reach(cost)`; when it refuses but the approximate groups left out (no --data, or --keep-approximate) would
    reach the budget, the refusal says so and `how` they are pruned too and fine-tuned."""
    from onnxecc.optimize.projection import min_cost

    try:
        reach(cost)
    except UserError as exc:
        more = [v for v, g in enumerate(problem.variables.group) if g in approximate]
        smallest = min_cost(cost, problem.prunable + more, problem.min_width, problem.round_to) if more else None
        if smallest is None or smallest > target * (1 + 1e-12):
            raise
        raise UserError(f"{exc}; or {how}: the {len(approximate)} approximate group(s) (a normalisation runs "
                        f"over their channels) are then pruned too and fine-tuned (smallest cost {fmt(smallest)})") \
            from None


def _refuse_overwriting_input(model, output, report, checkpoint, overwrite: bool) -> None:
    """The user's model is never replaced by accident: `-o` naming the input (or a data file it reads, which
    the save would replace or remove) needs `overwrite`; the report and checkpoint never replace it. With
    `overwrite` the input is still read whole before anything is written: `ingest.load` reads it at the
    start, the sessions of the original are made before the output is saved, and `ingest.save` writes new
    files and renames them (a session mapping the old data keeps it)."""
    checks = [(report, "--report", "give another --report"), (checkpoint, "--checkpoint", "give another --checkpoint")]
    if not overwrite:
        checks.insert(0, (output, "-o", "pass --overwrite to replace it, or give another -o"))
    inputs = None
    for path, option, fix in checks:
        if path is None:
            continue
        written = ingest.files_written(path) if option == "-o" else [Path(path)] if Path(path).exists() else []
        if written:
            inputs = inputs if inputs is not None else ingest.model_files(model)  # parsed only when needed
            atomic.refuse_input(path, written, inputs, option, fix)


def over_budget_path(output: str | Path) -> Path:
    """Where a model that missed its measured budget is kept: `NAME.over-budget.onnx`, or `-2`, `-3`, … when that
    exists — never a file (or a data file a save would remove) that the user did not name."""
    output = Path(output)
    for n in itertools.count(1):
        path = output.with_name(output.stem + (".over-budget.onnx" if n == 1 else f".over-budget-{n}.onnx"))
        if not ingest.files_written(path):
            return path


def _pack_output(output: tuple) -> dict:
    """A measured closed-loop round's output as checkpoint data (see `onnxecc.train.checkpoint.plain`)."""
    keep, model, estimated, history = output
    return {"keep": checkpoints.keep_to_plain(keep), "model": model.SerializeToString(), "estimated": estimated,
            "history": history}


def _unpack_output(saved: dict) -> tuple:
    model = onnx.ModelProto()
    model.ParseFromString(saved["model"])
    return checkpoints.keep_from_plain(saved["keep"]), model, saved["estimated"], saved["history"]


def _check_options(opts: CompressOptions) -> None:
    bad_round = opts.round_to is not None and opts.round_to < 1
    if opts.epochs < 0 or bad_round or opts.min_width < 1 or (opts.max_rounds or 1) < 1:
        raise UserError("--epochs must be ≥ 0; --round-to, --min-width and --max-rounds ≥ 1")
    if opts.lr is not None and not opts.lr > 0:
        raise UserError(f"--lr must be > 0 (or auto), got {opts.lr}")
    if opts.admm_w_step not in ("prox", "penalty"):
        raise UserError(f"unknown --admm-w-step '{opts.admm_w_step}': choose prox or penalty")
    if opts.importance not in ("auto", "fisher", "l2"):
        raise UserError(f"unknown importance '{opts.importance}': choose auto, fisher or l2")
    if opts.importance == "fisher" and not opts.data:
        raise UserError("--importance fisher needs --data (loss gradients define it): pass --data or use l2")
    if opts.method not in ("auto", "netadapt", *registry.METHODS):
        raise UserError(f"unknown method '{opts.method}': choose one of auto, {', '.join(registry.METHODS)}")
    if tuple(opts.knobs) != ("width",):
        from onnxecc.train.quantize import check_knobs, parse_knobs

        if opts.method != "wsp":  # wsp checks its own: int8 at the hardware file's 8-bit energies (onnxecc.methods.wsp)
            check_knobs(opts)
        opts.knobs = parse_knobs(opts.knobs)


def variables_widths(variables: Variables, keep: dict[int, np.ndarray]) -> dict[int, int]:
    """Kept units per variable, from kept units per group."""
    out = {}
    for v, (g, units) in enumerate(zip(variables.group, variables.units)):
        if g in keep:
            out[v] = int(np.isin(units, keep[g]).sum())
    return out


def min_cost_or_zero(problem: Problem) -> float:
    from onnxecc.optimize.projection import min_cost

    return min_cost(problem.cost, problem.prunable, problem.min_width, problem.round_to)


def _select(method: str, problem: Problem, target: float, data, opts: CompressOptions, emit, precision=None):
    """Run one method (`methods.registry`) and the fine-tuning tail every method shares: (kept units per group,
    the model with trained weights, training history)."""
    chosen = registry.get(method)
    admm_epochs = opts.admm_iterations * opts.admm_epochs
    total_epochs = opts.epochs + admm_epochs  # every method gets the same training budget as ecc
    if _projection_only(method, data, opts):
        emit("stage", {"name": "project"})
        keep = distributed.on_main(lambda: chosen.project(problem, target))
        distributed.check_same(keep, "channel keep sets")
        return keep, problem.proto, []
    mm = _masked_model(problem, data, opts)
    emit("plan", {"epochs": total_epochs})  # what this round trains, for estimates of the time left
    history: list[dict] = []
    fisher = _uses_fisher(opts, data)
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
            now["lr"], tried = _finetune_lr(mm, opts, total_epochs, emit)
            history += [{"phase": "lr_probe", **t} for t in tried] + mm.take_recoveries()
        emit("stage", {"name": "finetune", "epochs": total_epochs, "lr": now["lr"]})
        qat = precision.fake_quant(mm.tm, opts.qat, total_epochs) if precision is not None else nullcontext()
        with qat as fq:  # QAT: the int8 layers fake-quantized, their activation ranges recomputed every epoch
            history += [{"phase": "finetune", **e} for e in mm.train(max(0, total_epochs), emit, lr=now["lr"],
                                                                    on_epoch=fq.epoch_done if fq else None,
                                                                    phase="finetune")]
        history += mm.take_recoveries()
    return keep, mm.write_back(), history


def _check_devices(opts: CompressOptions) -> None:
    """Fail in one line, before any work, when --device cuda or a latency provider is not available here."""
    if opts.device.startswith("cuda"):
        distributed.check_device(opts.device)
    if opts.metric in ("latency", "energy") and opts.closed_loop:  # the provider the closed loop measures on
        import onnxruntime as ort

        if opts.provider not in ort.get_available_providers():
            raise UserError(f"execution provider {opts.provider} is not available here (available: "
                            f"{', '.join(ort.get_available_providers())}): install the onnxruntime build that has "
                            "it, or measure on CPUExecutionProvider")


def _auto_method(opts: CompressOptions) -> str:
    """ECC (ADMM) whenever there is data to train on; without data, the projection alone.

    Measured (Fisher importance, proximal W-step): on digits_resdw at 0.2/0.3/0.5/0.7 of MACs, ecc 0.9916 / 0.9944
    / 0.9916 / 0.9916 vs project 0.9861 / 0.9944 / 0.9916 / 0.9889 vs uniform 0.9833 / 0.9916 / 0.9861 / 0.9861
    (README, Accuracy vs cost); at latency budgets see the bench area `methods`."""
    return "ecc" if opts.data else "project"


def _uses_fisher(opts: CompressOptions, data) -> bool:
    """Fisher importance needs gradients of the loss on data; without data the weights' norms are all there is."""
    return opts.importance != "l2" and data is not None


def _finetune_lr(mm, opts: CompressOptions, epochs: int, emit) -> tuple[float, list[dict]]:
    """The final fine-tuning's rate: --lr when given, else the probe's choice (`MaskedModel.choose_lr`), run
    outside the checkpointer (a resumed fine-tuning keeps the rate it started with; see `_select`)."""
    from onnxecc.train.finetune import PROBE_LRS, training_lr

    if opts.lr is not None or epochs <= 0:
        return training_lr(opts.lr), []
    emit("stage", {"name": "lr probe", "candidates": list(PROBE_LRS)})
    with checkpoints.suspended():
        return mm.choose_lr(PROBE_LRS)


def _masked_model(problem: Problem, data, opts: CompressOptions):
    from onnxecc.train.finetune import TrainConfig, training_lr
    from onnxecc.train.masked import MaskedModel

    config = TrainConfig(epochs=opts.epochs, lr=training_lr(opts.lr), batch_size=opts.batch_size, seed=opts.seed,
                         temperature=opts.temperature, distill_weight=opts.distill_weight, device=opts.device)
    return MaskedModel(problem.proto, problem.graph, data, config, recalibration=opts.recalibrate)


def _closed_loop_check(opts: CompressOptions, original: onnx.ModelProto, compressed: onnx.ModelProto,
                       budget: Budget, target: float, meter: dict | None = None) -> dict | None:
    """Measure the output on the target provider, side by side with the original: its latency, or for an energy
    budget its energy with the profile's meter (`meter`: the profile's record of it, `profiler.meters.reopen`;
    `meter` names it in the verdict). None when the metric is not measured (MACs, params: counted on the file) or
    the closed loop is off. A fraction budget is checked on `ratio`, the median of per-round ratios (`runtime.Pair`:
    a change of the machine's speed hits both halves of a round); `measured` is then the ratio times the original's
    median, the compressed model's cost on the original's scale (`measured_median`: its own median). An absolute
    budget is checked on the compressed model's median. `of_budget` = measured / allowed.

    A miss, or a verdict within the noise of the budget, is measured again (`CONFIRM_ROUNDS` more rounds, pooled
    with the first ones; `first_look` keeps the first verdict): a miss re-trains and prunes deeper, and on a VM
    whose speed changes in spells one 5-round look timed the same mobilenet_v2 QDQ file at 0.37 and 0.62 of the
    original. Latency runs per round: at least 20, more for a fast model (one round of the original lasts at least
    `CHECK_ROUND_S`, up to 200 runs), so that a sub-millisecond model's median is not a handful of
    milliseconds of a shared machine. Energy: one window of the meter per model and round (as long as the meter
    needs for its resolution, `EnergyMeter.window_s`)."""
    if opts.metric not in ("latency", "energy") or not opts.closed_loop:
        return None
    sess_o = runtime.session(original, opts.provider, opts.threads)
    sess_c = runtime.session(compressed, opts.provider, opts.threads)
    x = runtime.example_input(sess_o, batch=1, seed=opts.seed, model=original, shapes=opts.input_shapes)
    with _pair_measurer(opts.metric, meter, sess_o, sess_c, x) as measure:
        pair = measure(CHECK_ROUNDS)
        verdict = _latency_verdict(pair, budget, target)
        if not verdict["meets"] or verdict["of_budget"] > 1 - verdict["noise_of_budget"]:
            first = {k: verdict[k] for k in ("ratio", "of_budget", "meets")} | {"rounds": CHECK_ROUNDS}
            pair = pair + measure(CONFIRM_ROUNDS)
            verdict = _latency_verdict(pair, budget, target) | {"first_look": first}
    if opts.metric == "energy":  # which meter decided, and every round's ratio (the verdict is their median)
        verdict |= {"meter": meter["spec"], "ratios": [float(r) for r in pair.ratios]}
    # where it ran: nodes per execution provider (`runtime.placement`; the provider was checked to run some)
    return verdict | {"placement": {"original": runtime.placement(sess_o), "compressed": runtime.placement(sess_c)}}


@contextmanager
def _pair_measurer(metric: str, meter: dict | None, sess_o, sess_c, x: np.ndarray):
    """`measure(rounds)` → a `runtime.Pair` of the original (a) and the compressed model (b) measured in that many
    alternating rounds: latency with `runtime.measure_pair`, energy with the profile's meter
    (`profiler.measure_pair`; the meter is opened once here and closed on exit)."""
    if metric == "latency":
        probe = runtime.measure_latency(sess_o, x, warmup=2, repeats=3).median_s
        repeats = int(np.clip(CHECK_ROUND_S / max(probe, 1e-9), 20, 200))
        yield lambda rounds: runtime.measure_pair(sess_o, sess_c, x, rounds=rounds, repeats=repeats)
        return
    if not meter:
        raise ValueError("an energy budget is measured with the meter of its profile: pass the profile's `meter`")
    from onnxecc.cost.profiler import measure_pair, recorded_meter

    feed_o, feed_c = runtime.feed(sess_o, x), runtime.feed(sess_c, x)
    run_o, run_c = (lambda: sess_o.run(None, feed_o)), (lambda: sess_c.run(None, feed_c))
    with recorded_meter(meter, WITHOUT_METER) as m:
        yield lambda rounds: measure_pair(m, run_o, run_c, rounds, repeats=1, warmup=10)


WITHOUT_METER = "pass --no-closed-loop to keep the profile's estimate as the verdict (the output is then not measured)"


def _latency_verdict(pair: runtime.Pair, budget: Budget, target: float) -> dict:
    """`_closed_loop_check`'s record of one side-by-side measurement (original a, compressed b): latency in
    seconds, or energy in joules (the `Timing` fields then hold joules)."""
    t_o, t_c, ratio = pair.a, pair.b, pair.ratio
    if budget.fraction is not None:
        allowed, measured = budget.fraction * t_o.median_s, ratio * t_o.median_s
        noise = pair.ratio_iqr / budget.fraction
    else:
        allowed, measured, noise = target, t_c.median_s, t_c.iqr_s / target
    return {"measured": measured, "measured_original": t_o.median_s, "measured_median": t_c.median_s,
            "budget": allowed, "iqr": t_c.iqr_s, "ratio_iqr": pair.ratio_iqr, "meets": measured <= allowed,
            "ratio": ratio, "of_budget": measured / allowed, "noise_of_budget": noise, "timed_rounds": len(pair.ratios)}


INT8_DROPPED = ("the int8 layers, timed as one set, saved no latency at the pruned widths: the widths were chosen "
                "again with the fp32 latency model (width alone)")


def _reaches(reach, cost) -> bool:
    """Whether the cost model `cost` reaches the budget (`reach`: compress's reachability check, raising)."""
    try:
        reach(cost)
    except UserError:
        return False
    return True


def _floor_missed(rounds: list[dict], floor: float, opts: CompressOptions, fmt) -> list[str]:
    """A warning when no round met the budget and one measured the smallest widths allowed: then the budget is
    out of this machine's reach at these settings, whatever the profile estimated (digits_resdw at latency 0.5
    on an AMD EPYC: the smallest widths estimated at 0.40 of the original, measured 0.48–0.53)."""
    if any(r.get("meets") for r in rounds):
        return []
    at_floor = [r for r in rounds if "ratio" in r and r["estimated_cost"] <= floor * (1 + 1e-9)]
    if not at_floor:
        return []
    best = min(at_floor, key=lambda r: r["measured"])
    return [f"the smallest widths allowed (every prunable group at --min-width {opts.min_width}, multiples of "
            f"--round-to {opts.round_to}) measured {fmt(best['measured'])} ({best['ratio']:.3f} of the original) "
            f"on {opts.provider}: the budget is out of reach on this machine at these settings; raise it to at "
            "least that, or allow narrower layers (--round-to, --min-width)"]


def _plan_int8(problem: Problem, internal: float, precision) -> None:
    """Before a round trains: time the full-width int8 set at the widths the projection plans for `internal`
    (the untrained model pruned; latency does not depend on the weights), raising `quantize.Int8Dropped` when
    none of it saves there. Why: an output whose int8 is dropped is an fp32 model with widths a wrong cost model
    chose (digits_resdw at latency 0.5: 9 layers int8 at full width, none at half width), and finding that out
    after the training cost mobilenet_v2 at latency 0.3 a whole re-trained round (width+precision 91.1 % vs
    width alone 95.3 %); found here, width+precision follows width alone's run from its first round."""
    keep = distributed.on_main(lambda: problem.project(internal)[0])
    precision.choose_at(prune_channels(problem.proto, keep, problem.graph),
                        "at the widths projected for the round, before it trains", keep)


CHECK_ROUND_S = 0.03  # closed loop: shortest wall time of one measurement round of the original
CHECK_ROUNDS = 7  # closed loop: side-by-side rounds of a first look
CONFIRM_ROUNDS = 14  # closed loop: more rounds when the first look missed or is within its noise of the budget
LOOSEN_BELOW = 0.9  # closed loop: an output measured under this share of the budget is over-pruned
AIM = 0.98  # closed loop: the share of the budget a corrected internal budget aims at (2% margin for noise)


def _other_machine(profile, opts: CompressOptions) -> list[str]:
    """A warning when the profile was measured on another CPU than the one the closed loop measures on: its fit
    may not hold here (the shipped AMD EPYC demo profiles on an Intel Xeon: outputs 0.42× for a 0.3 budget)."""
    from onnxecc.cost.profiler.store import cpu_name, same_cpu

    if same_cpu(profile.machine) is not False or opts.provider != "CPUExecutionProvider":
        return []
    return [f"the profile was measured on {profile.machine['cpu']} and this machine is {cpu_name()}: its cost "
            "model may not fit here "
            f"({'the closed loop measures here' if opts.closed_loop else 'nothing measures it here'}); profile the "
            "model on the target with `onnxecc profile MODEL -o P.json`"]


def _loosens(opts: CompressOptions, method: str, data) -> bool:
    """Whether the closed loop loosens an over-pruned output (`closed_loop_loosen`; None = automatic).

    Automatic: only when a round does not train (projection / uniform without data or with 0 epochs), the
    case `_select` handles without torch — a round is then a projection and a measurement (seconds). With
    training every round re-trains from scratch, so an output that meets the budget is kept as it is; pass
    `closed_loop_loosen=True` to trade that time for the accuracy the unused budget could buy."""
    if opts.closed_loop_loosen is not None:
        return bool(opts.closed_loop_loosen)
    return _projection_only(method, data, opts)


def _projection_only(method: str, data, opts: CompressOptions) -> bool:
    """A round that only projects and measures (no torch): cheap enough for more closed-loop rounds."""
    chosen = registry.get(method)
    return not (chosen.needs_data or chosen.own_pipeline) and (data is None or opts.epochs == 0)


def _next_internal(rounds: list[dict], original: float, loosen: bool, top_ratio: float | None = None,
                   ) -> tuple[float, str] | None:
    """The internal budget of the next closed-loop round and why, or None when the last round is final.

    The last round's measurement (median, side by side with the original, as `_closed_loop_check` returns it)
    is over the budget → tighten; under `LOOSEN_BELOW` of it and `loosen` → loosen. Each measured round is a
    point (estimated cost, measured share of the budget), and so is the original (its estimated cost, its
    measured latency over the budget: always a miss). Once a round met the budget, the next internal budget is
    the secant between the nearest point that met it (below) and the nearest that missed it (above — the
    original if no round missed), aiming at `AIM` of the budget (regula falsi, Illinois variant: when two
    rounds in a row land on the same side, the far end's weight is halved), so a loosening step is bracketed by the
    original, which a proportional step is not (a profile whose fixed cost is too high over-prunes, and
    scaling by measured/budget overshoots). With no round under the budget yet: proportional tightening,
    estimated × AIM / (measured / budget) — the model error observed, applied to the cost the round's widths
    were estimated at, not to its internal budget: the widths come in steps (`round_to`), so a budget 2% under
    the last one often projects the same widths, and digits_cnn spent 4 of its 6 rounds measuring one model
    again; below the last estimate, the widths that missed are out of reach. A loosened budget stays below the
    original cost.

    `top_ratio` (--knobs width,precision): `original` is then the estimated cost of the full-width int8 model and
    this its measured latency ratio to the fp32 original (`quantize.measure_precision`) — the upper end of the
    bracket instead of the fp32 original, which no pruned int8 model approaches (with the fp32 end the secant
    crept up by small steps and rounds ran out, 0.14 at budget 0.3 on resnet18). When that model meets the
    budget and no round measured it yet, the next round is full width (nothing left to prune)."""
    last = rounds[-1]
    share = last["of_budget"]
    if last["meets"] and (share >= LOOSEN_BELOW or not loosen):
        return None
    met = [(r["estimated_cost"], r["of_budget"]) for r in rounds if r["meets"]]
    if not met:
        return last["estimated_cost"] * AIM / share, "over budget"
    missed = [(r["estimated_cost"], r["of_budget"]) for r in rounds if not r["meets"]]
    top_share = last["measured_original"] / last["budget"] * (1.0 if top_ratio is None else top_ratio)
    at_top = any(r["estimated_cost"] >= original * (1 - 1e-9) for r in rounds)
    if top_share <= 1.0 and not at_top and last["meets"]:
        return original, "more than 10% under"
    if not at_top:
        missed.append((original, top_share))
    if not missed:  # full width measured and met: nothing left to loosen
        return None
    (a, sa), (b, sb) = max(met), min(missed)
    if a < b and sb > sa:
        fa, fb = sa - AIM, sb - AIM
        if len(rounds) >= 2 and rounds[-2]["meets"] == last["meets"]:  # Illinois: the far end stayed twice,
            fa, fb = (fa, fb / 2) if last["meets"] else (fa / 2, fb)  # halve its weight to stop creeping
        step = a + (b - a) * -fa / (fb - fa)
        step = min(max(step, a + 0.05 * (b - a)), b - 0.05 * (b - a))
    else:  # the measurements contradict the model's order (noise): proportional from the last round
        step = min(last["estimated_cost"] * AIM / share, original)
    if not last["meets"]:
        return step, "over budget"
    if step <= last["estimated_cost"] * (1 + 1e-9):
        return None  # no room left to loosen
    return step, "more than 10% under"


def _choose_round(rounds: list[dict]) -> dict:
    """Mark and return the round whose output `compress` returns: of the measured rounds that met the budget,
    the one with the highest measured latency (share of its budget) — the least over-pruned; else the last."""
    met = [r for r in rounds if r.get("meets")]
    chosen = max(met, key=lambda r: r["of_budget"]) if met else rounds[-1]
    chosen["selected"] = True
    return chosen


def attention_heads(graph: ChannelGraph, keep: dict[int, np.ndarray] | None) -> list[dict]:
    """Heads before → after per attention layer (named by the path its products share, e.g. '/blocks.0'; a head
    group's unit is one head, or one k/v head with the q heads that share it)."""
    out = []
    for gid, products in sorted(graph.heads.items(), key=lambda kv: graph.products_order(kv[1][0])):
        size = graph.groups[gid].size
        kept = len(keep[gid]) if keep is not None and gid in keep else size
        out.append({"layer": attention_name(products), "group": gid, "before": size, "after": kept,
                    "frozen_by": graph.groups[gid].frozen_by})
    return out


def _widths(graph: ChannelGraph, keep: dict[int, np.ndarray] | None) -> dict[int, tuple[int, int]]:
    out = {}
    for g in graph.prunable_groups:
        kept = len(keep[g.id]) if keep is not None and g.id in keep else g.size
        out[g.id] = (kept, g.size)
    return out


def _load_data(spec: str, proto: onnx.ModelProto):
    from onnxecc.graph.data import load_for_model

    return load_for_model(spec, proto)


def _input_shapes(proto: onnx.ModelProto, opts: CompressOptions, data) -> dict[str, tuple[int, ...]]:
    """The size to analyse inputs with symbolic dims at: --input-shape, else the size a --profile was measured at
    (its latencies hold there), else the first sample of --data."""
    names = [i.name for i in graph_inputs(proto)]
    samples = per_sample_shapes(data.x_train, names) if data is not None and len(data.x_train) else None
    measured = None
    if opts.profile and opts.metric in ("latency", "energy") and symbolic(proto):
        from onnxecc.cost.profiler import store

        measured = store.read(opts.profile).settings.get("input_shapes")
    if not measured:
        return resolve_shapes(proto, opts.input_shapes, samples)
    shapes = resolve_shapes(proto, measured)
    if opts.input_shapes and resolve_shapes(proto, opts.input_shapes) != shapes:
        raise UserError(f"--input-shape differs from the size profile {opts.profile} was measured at "
                        f"({shapes_text(shapes)}): give that size, or profile the model at yours")
    if samples and any(tuple(shapes[n][1:]) != tuple(s) for n, s in samples.items()):
        raise UserError(f"the samples of --data are not the size profile {opts.profile} was measured at "
                        f"({shapes_text(shapes)}): profile the model at the data's size (--input-shape)")
    return shapes

