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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxecc import closed_loop
from onnxecc.closed_loop import INT8_DROPPED, WITHOUT_METER
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
from onnxecc.graph.outputs import class_axis_index, declared_shape
from onnxecc.methods import registry
from onnxecc.methods.options import METRICS, CompressOptions
from onnxecc.methods.result import CompressResult, evaluate, recovery_warnings, selected_round, tool_version
from onnxecc.optimize.problem import Problem
from onnxecc.optimize.projection import check_reachable
from onnxecc.train import checkpoint as checkpoints
from onnxecc.train import distributed
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
    costs seconds; with training every round re-trains, so a meeting output is kept — see `closed_loop._loosens` and
    `closed_loop_loosen`). The returned output is the least over-pruned one that met the budget, never a miss
    when a round met it; `result.rounds` records every round (`next`: why another followed; `selected`).

    Interrupt and resume (`onnxecc.train.checkpoint`): with `checkpoint=PATH`, while it trains the first SIGINT (or
    `onnxecc.train.checkpoint.request()`) stops after the current optimizer step, saves the training state to PATH and
    raises `onnxecc.train.checkpoint.Interrupted` (nothing else is written). `resume=PATH` continues such a run (same
    model, budget and options, else UserError) and ends with the weights of an uninterrupted run; the checkpoint
    is then removed. Without `checkpoint` (and `resume`), SIGINT is left alone. Every training method resumes
    (wsp and greedy included).
    """
    run = _start(model, budget, output, options, report, on_event, checkpoint, resume, overwrite)
    own = registry.METHODS.get(run.opts.method)
    if own is not None and own.own_pipeline:  # wsp: its trainer saves and restores its own state (frame "wsp")
        with checkpoints.active(run.ck):
            result = own.run(model, run.parsed, output, run.opts, report, run.emit)
        _finished(run)
        return result
    _analyse(run)  # data, channel groups, the profile's settings
    _cost(run)  # cost model, budget, method, int8 plan → the width problem
    chosen = _choose(run)  # closed loop: choose, train, write back, measure
    result = _describe(run, *chosen)  # counted on the file, the report's fields
    measured_fail = _measure(run, result)  # next to the original in onnxruntime
    if distributed.is_main():  # the other ranks hold the same model: rank 0 alone writes
        _save(run, result, measured_fail)
    return result


@dataclass
class _Run:
    """The state of one `compress` run, filled in by its steps in order."""

    model: ingest.ModelSource
    output: str | Path | None
    report: str | Path | None
    resume: str | Path | None
    opts: CompressOptions
    emit: Callable[[str, dict], None]
    t0: float
    recipe: dict
    parsed: Budget
    proto: onnx.ModelProto
    ck: object  # checkpoints.Checkpointer or None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    data: object = None
    analysis: object = None
    profile: object = None
    cost: BilinearCost | None = None
    fp32_cost: BilinearCost | None = None
    original: float = 0.0
    target: float = 0.0
    fmt: Callable[[float], str] | None = None
    method: str = ""
    precision: object = None  # quantize.PrecisionPlan with --knobs precision
    int8_dropped: dict | None = None
    approximate: dict[int, str] = field(default_factory=dict)
    left_whole: bool = True  # approximate groups kept at full width
    how: str = ""  # what lets the approximate groups be pruned
    problem: Problem | None = None


def _start(model, budget, output, options, report, on_event, checkpoint, resume, overwrite) -> _Run:
    """Check the options and paths, load the model, open the checkpoint: nothing is computed yet."""
    opts = copy.copy(options or CompressOptions())
    emit = on_event or (lambda kind, info: None)
    t0 = time.perf_counter()
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
    declared = declared_shape(proto)
    if opts.class_axis is not None and declared is not None:  # before any training (a declared rank)
        class_axis_index(opts.class_axis, declared)
    ck = None
    if checkpoint is not None:
        fingerprint = checkpoints.fingerprint(ingest.sha256(proto), str(budget), opts)
        if resumed is not None:
            checkpoints.check_fingerprint(Path(resume), resumed["fingerprint"], fingerprint)
        ck = checkpoints.Checkpointer(checkpoint, fingerprint, resumed)
    return _Run(model, output, report, resume, opts, emit, t0, recipe, parsed, proto, ck)


def _finished(run: _Run) -> None:
    if run.resume is not None:  # the run the checkpoint was for is complete
        Path(run.resume).unlink(missing_ok=True)


def _analyse(run: _Run) -> None:
    """The data (its first sample may fix symbolic sizes), the channel groups, and the settings a profile fixes."""
    opts, proto = run.opts, run.proto
    run.emit("stage", {"name": "analyse"})
    run.data = _load_data(opts.data, proto) if opts.data else None
    run.analysis = analyse(proto, "compress", _input_shapes(proto, opts, run.data))
    opts.input_shapes = run.analysis.input_shapes
    if opts.profile and opts.metric in ("latency", "energy"):
        from onnxecc.cost.profiler import load_profile

        run.profile = load_profile(opts.profile, proto)
        # The fit is exact on the width grid it was sampled on; measure where the profile was measured.
        opts.round_to = opts.round_to or int(run.profile.settings.get("step", 1))
        opts.provider = run.profile.provider
        opts.threads = int(run.profile.settings.get("threads", opts.threads))
    _check_devices(opts)  # again: a profile names its provider
    if not opts.round_to:  # channel counts the target's kernels like (MLAS on AVX-512: 16; measured in DESIGN)
        from onnxecc.cost.profiler.sampling import auto_step

        opts.round_to = auto_step(opts.provider)


def _cost(run: _Run) -> None:
    """The cost model, the budget in its units, the method, the int8 plan, and the problem the methods solve."""
    opts, proto, data, profile = run.opts, run.proto, run.data, run.profile
    layers, graph, variables = run.analysis.layers, run.analysis.graph, run.analysis.variables
    cost = cost_model(opts.metric, proto, graph, layers, variables, profile or opts.profile)
    if opts.metric == "energy" and opts.closed_loop:  # the closed loop measures with the profile's meter: here?
        from onnxecc.cost.profiler import recorded_meter

        with recorded_meter(profile.meter, WITHOUT_METER):
            pass
    run.original = original = cost(None)
    run.target = target = run.parsed.resolve(original)
    run.fmt = fmt = lambda v: format_cost(v, opts.metric)  # noqa: E731
    method = opts.method if opts.method != "auto" else _auto_method(opts)
    run.method = method = "greedy" if method == "netadapt" else method
    if registry.get(method).needs_data and not opts.data:
        raise UserError(f"--method {method} trains the network and needs --data (digits or FILE.npz); "
                        "without data use --method project or uniform")
    if data is not None:
        from onnxecc.graph.data import check_classes

        check_classes(data, next(layer.cout for layer in reversed(layers) if layer.weight is not None))
    run.fp32_cost = cost
    if "precision" in opts.knobs and target < original:  # int8 layers by measurement; their terms scaled down
        from onnxecc.cost.quantize import plan_precision

        run.precision = plan_precision(proto, run.analysis, cost, profile, data, opts, run.emit,
                                       once=distributed.on_main)
        cost = run.precision.cost
    cost.channels_per_unit = {v: graph.groups[g].channels // graph.groups[g].size
                              for v, g in enumerate(variables.group) if g in graph.heads}  # a head: many channels
    # approximate groups (a normalisation runs over them) change the function when pruned: only training recovers it
    run.approximate = approximate = {g.id: g.approximate for g in graph.prunable_groups if g.approximate}
    run.left_whole = left_whole = data is None or not opts.prune_approximate
    prunable_groups = {g.id for g in graph.prunable_groups if not left_whole or g.id not in approximate}
    run.how = "pass --data" if data is None else "drop --keep-approximate"
    run.cost = cost
    run.problem = Problem(proto, graph, variables, cost,
                          [v for v, g in enumerate(variables.group) if g in prunable_groups],
                          opts.min_width, opts.round_to, fmt)
    run.timings["analyse"] = time.perf_counter() - run.t0
    run.warnings = [] if profile is None else _other_machine(profile, opts)
    if profile is not None and not opts.closed_loop:
        run.warnings.append(f"closed loop off: the output's {opts.metric} is not measured; whether it meets the "
                            "budget is the profile's estimate")


def _choose(run: _Run) -> tuple:
    """(keep sets, the pruned model, its estimated cost, history, closed-loop rounds, pruned): the rounds of
    `closed_loop.run`, after checking that the budget is reachable."""
    problem, opts, fmt, target, original = run.problem, run.opts, run.fmt, run.target, run.original
    if target >= original:
        run.warnings.append(f"budget {fmt(target)} is at or above the original cost {fmt(original)}: no pruning "
                            "needed")
        return None, run.proto, original, [], [], False
    if not problem.prunable and run.approximate:
        raise UserError(f"no channel group of this model can be pruned exactly: {len(run.approximate)} group(s) "
                        "have a normalisation over their channels (approximate), which only fine-tuning recovers: "
                        f"{run.how} (see `onnxecc inspect`)")
    if not problem.prunable:
        raise UserError("no channel group of this model can be pruned (all frozen; see `onnxecc inspect`)")
    reach = lambda c: check_reachable(c, problem.prunable, target, min_width=opts.min_width,  # noqa: E731
                                      round_to=opts.round_to, fmt=fmt)
    if run.precision is not None:  # the int8 model, else a fallback that reaches the budget (quantize.PrecisionPlan)
        problem.cost = run.cost = run.precision.reachable_cost(reach)
        run.precision.fp32_reaches = _reaches(reach, run.fp32_cost)
    else:
        _reach_or_name_data(reach, run.cost, problem, run.approximate if run.left_whole else {}, target, fmt, run.how)
    if run.data is None:
        run.warnings.append("no --data: channels were chosen by weight magnitude only and accuracy is not "
                            "recovered by fine-tuning; pass --data to fine-tune")
    t = time.perf_counter()
    out = closed_loop.run(run.model, run.proto, problem, run.method, run.parsed, target, original, run.data, opts,
                          run.emit, run.ck, run.precision, run.fp32_cost, run.profile, fmt)
    run.precision, run.int8_dropped, run.cost = out.precision, out.int8_dropped, problem.cost
    run.warnings += out.warnings
    run.timings["select"] = time.perf_counter() - t
    return out.keep, out.model, out.estimated, out.history, out.rounds, True


def _describe(run: _Run, keep, out_model, estimated, history, rounds, pruned) -> CompressResult:
    """The result: the cost counted again on the pruned file (it must agree with the model's estimate), the
    widths, heads, approximate groups and int8 layers, and the warnings that go with them."""
    opts, graph, warnings, cost = run.opts, run.analysis.graph, run.warnings, run.cost
    counted = analytic_cost(out_model, opts.metric, opts.input_shapes)
    tolerance = 1e-6 * max(1.0, run.original)
    if counted is not None and (counted - estimated > tolerance or (cost.exact and estimated - counted > tolerance)):
        raise RuntimeError(f"cost model disagrees with the count on the pruned file: {estimated} vs {counted}")
    if not cost.exact:
        warnings.append("some layers' cost is quadratic in one channel group (1×1 conv inside a residual block): "
                        "the projection used an upper bound there, so the output may land below the budget")
    result = CompressResult(
        out_model, Path(run.output) if run.output else None, opts.metric, run.parsed, run.target, run.original,
        estimated, counted, pruned, _widths(graph, keep), history=history, warnings=warnings,
    )
    result.method = run.method if pruned else "none"
    result.recipe = run.recipe
    result.rounds = rounds
    result.heads = attention_heads(graph, keep)
    approximate, left_whole = run.approximate, run.left_whole
    left = "approximate: needs --data" if run.data is None else "left whole: --keep-approximate"
    result.approximate_groups = [
        {"id": g, "reason": why, "pruned": result.widths[g][0] < result.widths[g][1]} if not left_whole
        else {"id": g, "reason": why, "pruned": False, "left": left}
        for g, why in approximate.items()]
    if approximate and left_whole and pruned:
        warnings.append(f"{len(approximate)} approximate group(s) left at full width (a normalisation runs over their "
                        f"channels; {left}): {', '.join(map(str, approximate))}")
    if symbolic(run.proto):  # the costs hold at this size; the output keeps the sizes symbolic
        result.input_shapes = {n: list(v) for n, v in opts.input_shapes.items()}
        write_metadata(out_model, {"input_shapes": result.input_shapes})
    warnings += recovery_warnings(history)
    if run.int8_dropped is not None:
        result.precision = {**run.int8_dropped, "int8_layers": [], "dropped": INT8_DROPPED}
        warnings.append(f"precision: {INT8_DROPPED}")
    elif run.precision is not None:
        result.precision = run.precision.as_dict(out_model)
        warnings.append(f"precision: {len(result.precision['int8_layers'])} layer(s) in int8 (QDQ); fine-tuning: "
                        f"{result.precision['fine_tuning'].split(':')[0]}")
    return result


def _measure(run: _Run, result: CompressResult) -> bool:
    """Evaluate the output next to the original and write its metadata; whether the measured budget was missed."""
    opts, out_model = run.opts, result.model
    run.emit("stage", {"name": "validate"})
    t = time.perf_counter()
    if distributed.is_main():  # the other ranks hold the same model: rank 0 alone evaluates and writes
        evaluate(result, runtime.on_disk(run.model, run.proto), run.data, opts)  # the user's file: not written again
    run.timings["validate"] = time.perf_counter() - t
    measured_fail = (chosen := selected_round(result.rounds)) is not None and chosen.get("meets") is False
    if not result.meets_budget and not measured_fail:
        raise RuntimeError(f"internal error: output cost {run.fmt(result.final_cost)} exceeds the budget "
                           f"{run.fmt(run.target)}")
    write_metadata(out_model, {
        "version": tool_version(), "metric": opts.metric, "budget": run.target, "budget_text": run.parsed.text,
        "original_cost": run.original, "estimated_cost": result.estimated_cost, "counted_cost": result.counted_cost,
        "pruned": result.pruned, "method": result.method, "accuracy": result.accuracy_after,
    })
    if opts.metric == "energy" and run.profile is not None:  # what `validate --meter` measures it with again
        write_metadata(out_model, {"meter": run.profile.meter, "provider": opts.provider, "threads": opts.threads})
    run.timings["total"] = time.perf_counter() - run.t0
    result.timings = run.timings
    return measured_fail


def _save(run: _Run, result: CompressResult, measured_fail: bool) -> None:
    """Write the output (an over-budget one under another name), the report, and retire the checkpoint."""
    output = run.output
    if measured_fail:
        result.measured_miss = True
        if output is not None:  # never hand an over-budget model over under the requested name
            kept_as = over_budget_path(output)
            ingest.save(result.model, kept_as)
            result.output = kept_as
            result.warnings.append(f"the output missed the measured budget: written to {kept_as}, not to {output}")
    elif output is not None:
        ingest.save(result.model, output)
    if run.report is not None:
        atomic.write_json(run.report, result.as_dict())
    _finished(run)


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


def _check_options(opts: CompressOptions) -> None:
    bad_round = opts.round_to is not None and opts.round_to < 1
    if opts.epochs < 0 or bad_round or opts.min_width < 1 or (opts.max_rounds or 1) < 1:
        raise UserError("--epochs must be ≥ 0; --round-to, --min-width and --max-rounds ≥ 1")
    if opts.lr is not None and not opts.lr > 0:
        raise UserError(f"--lr must be > 0 (or auto), got {opts.lr}")
    if opts.rho is not None and not opts.rho > 0:
        raise UserError(f"--rho must be > 0 (or auto), got {opts.rho}")
    if opts.admm_w_step not in ("prox", "penalty"):
        raise UserError(f"unknown --admm-w-step '{opts.admm_w_step}': choose prox or penalty")
    if opts.importance not in ("auto", "fisher", "l2"):
        raise UserError(f"unknown importance '{opts.importance}': choose auto, fisher or l2")
    if opts.importance == "fisher" and not opts.data:
        raise UserError("--importance fisher needs --data (loss gradients define it): pass --data or use l2")
    if opts.method not in ("auto", "netadapt", *registry.METHODS):
        raise UserError(f"unknown method '{opts.method}': choose one of auto, {', '.join(registry.METHODS)}")
    if tuple(opts.knobs) != ("width",):
        from onnxecc.cost.quantize import check_knobs, parse_knobs

        if opts.method != "wsp":  # wsp checks its own: int8 at the hardware file's 8-bit energies (onnxecc.methods.wsp)
            check_knobs(opts)
        opts.knobs = parse_knobs(opts.knobs)


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


def _reaches(reach, cost) -> bool:
    """Whether the cost model `cost` reaches the budget (`reach`: compress's reachability check, raising)."""
    try:
        reach(cost)
    except UserError:
        return False
    return True


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
