"""The command line: parse, call the Python API, print. No logic lives here."""

from __future__ import annotations

import json
import signal
import sys
import traceback

import typer
from rich.console import Console
from rich.table import Table

from onnxecc.cli_options import CLASS_AXIS_HELP, INPUT_SHAPE_HELP, with_options
from onnxecc.core.errors import ExplainedFailure, UserError
from onnxecc.methods.registry import METHODS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress an ONNX model so that it meets a hard resource budget.")
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False, "sigint": False}


def _remember_sigint(signum, frame) -> None:
    """Python's own Ctrl-C handler (raise KeyboardInterrupt) that also remembers it fired: a library may turn the
    KeyboardInterrupt raised inside it into an error of its own (seen once in CI: a sweep interrupted mid-point
    ended in numpy's TypeError 'Cannot compare structured arrays'), which is still the user's Ctrl-C, not an
    internal error."""
    _state["sigint"] = True
    signal.default_int_handler(signum, frame)


def _is_ctrl_c(exc: BaseException) -> bool:
    """A KeyboardInterrupt, or any error raised after a Ctrl-C (`_remember_sigint`): the user's interruption."""
    return isinstance(exc, KeyboardInterrupt) or _state["sigint"]


_INPUT_SHAPE = typer.Option(None, "--input-shape", help=INPUT_SHAPE_HELP)
_VALIDATE_INPUT_SHAPE = typer.Option(None, "--input-shape",
                                     help="Size to feed a model with symbolic input dims at (NAME:d0,d1,..., "
                                          "repeatable). Default: --data's, else the size compress counted at.")
_CLASS_AXIS = typer.Option(None, "--class-axis", help=CLASS_AXIS_HELP)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors.")) -> None:
    _state["debug"] = debug


@app.command()
def inspect(
    model: str = typer.Argument(..., help="Path to the .onnx file."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
    hardware: str = typer.Option(None, "--hardware", help="Accelerator JSON: add the modelled energy per layer."),
    input_shape: list[str] = _INPUT_SHAPE,
) -> None:
    """List the compute layers of MODEL with channels, kernel, MACs and parameters."""
    from onnxecc.graph.inputs import parse_input_shapes
    from onnxecc.inspection import group_status
    from onnxecc.inspection import inspect as run_inspect

    result = run_inspect(model, hardware=hardware, input_shapes=parse_input_shapes(input_shape))
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
        return
    table = Table(title=f"{result.source} (opset {result.opset})", show_footer=True)
    table.add_column("layer", footer="total")
    table.add_column("op")
    table.add_column("in", justify="right")
    table.add_column("out", justify="right")
    table.add_column("kernel")
    table.add_column("groups", justify="right")
    table.add_column("output", justify="right")
    table.add_column("MACs", justify="right", footer=f"{result.macs:,}")
    table.add_column("params", justify="right", footer=f"{result.layer_params:,}")
    table.add_column("in grp", justify="right")
    table.add_column("out grp", justify="right")
    for layer in result.layers:
        ins, outs = result.layer_groups.get(layer.name, ([], []))
        op = layer.op if layer.weight is not None else f"{layer.op} (A·B)"  # both operands computed, no weight
        table.add_row(layer.name, op, str(layer.cin), str(layer.cout),
                      "×".join(map(str, layer.kernel)) or "-", str(layer.groups),
                      "×".join(map(str, layer.out_spatial)) or "-", f"{layer.macs:,}", f"{layer.params:,}",
                      _group_ids(ins), _group_ids(outs))
    console.print(table)
    energy = result.extra.get("energy")
    if energy:
        et = Table(title=f"modelled energy on {energy['hardware']} (units: {energy['energy_unit']}; "
                         "the accelerator's model, not onnxruntime)", show_footer=True)
        for col, foot in (("layer", "total"), ("compute", "compute"), ("weights", "weights"), ("inputs", "inputs"),
                          ("total", "total"), ("share", None)):
            et.add_column(col, justify="left" if col == "layer" else "right",
                          footer=f"{energy[foot]:.4g}" if col != "layer" and foot else ("" if foot else "100%"))
        widths = energy.get("at_bits", {})
        for b, v in widths.items():  # every layer at each width the hardware file gives
            et.add_column(f"total @{b}-bit", justify="right", footer=f"{v['total']:.4g}")
        for row in energy["layers"]:
            et.add_row(row["name"], *(f"{row[k]:.4g}" for k in ("compute", "weights", "inputs", "total")),
                       f"{row['total'] / energy['total']:.1%}", *(f"{v['layers'][row['name']]:.4g}"
                                                                  for v in widths.values()))
        console.print(et)
        console.print(f"modelled energy per inference: {energy['joules']:.4g} J"
                      + "".join(f"; every layer at {b}-bit: {v['joules']:.4g} J" for b, v in widths.items()))
    groups = Table(title="channel groups (prune a group by choosing which of its units to keep)")
    for name in ("group", "units", "channels", "producers", "consumers", "status"):
        groups.add_column(name, justify="left" if name == "status" else "right")
    for g in result.groups:
        status = group_status(g, result.heads)
        groups.add_row(str(g.id), str(g.size), str(g.channels), str(len(g.producers)), str(len(g.consumers)),
                       status)
    console.print(groups)
    products = sum(layer.weight is None for layer in result.layers)
    console.print(f"{len(result.layers)} compute layers; {result.model_params:,} parameters in the model "
                  "(MACs count Conv/Gemm/MatMul multiply-accumulates for batch 1)")
    if products:
        console.print(f"{products} of them (A·B) multiply two computed tensors, as attention's Q·Kᵀ and softmax·V "
                      f"do: {result.activation_macs:,} MACs without weights, counted at the input size analysed",
                      highlight=False)
    if result.symbolic:
        from onnxecc.graph.inputs import shapes_text

        console.print(f"the model's input sizes are symbolic: counted at {shapes_text(result.inputs)}", highlight=False)


def _log_lines(quiet: bool):
    """Progress as plain lines (`onnxecc.core.progress.LogLines`) on stderr when it is not a terminal (CI, pipelines,
    log files: a bar would not show there); None on a terminal (the bar) or with --quiet."""
    if quiet or err_console.is_terminal:
        return None
    from onnxecc.core.progress import LogLines

    return LogLines(lambda line: err_console.print(line, highlight=False, markup=False, soft_wrap=True))


def _group_ids(ids: list[int]) -> str:
    return ",".join(map(str, ids)) if len(ids) <= 3 else f"{ids[0]},{ids[1]},… ({len(ids)})"


@app.command()
@with_options()
def compress(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Path to the .onnx file to compress."),
    budget: str = typer.Option(None, "--budget", "-b",
                               help="Required: 0.3 or 30% of the original's cost, or absolute: 120M (MACs), 300k "
                                    "(params)."),
    output: str = typer.Option(None, "--output", "-o", help="Required: where to write the compressed .onnx file."),
    report: str = typer.Option(None, "--report", help="Write a JSON report here (with the run's recipe)."),
    print_config: bool = typer.Option(False, "--print-config",
                                      help="Print the effective recipe (TOML) and exit without compressing."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Let -o replace the input model (or its external data); refused without."),
    checkpoint: str = typer.Option(None, "--checkpoint",
                                   help="Where Ctrl-C saves the training state (default: OUTPUT.ckpt)."),
    resume: str = typer.Option(None, "--resume", help="Continue the run interrupted into this checkpoint."),
    nproc: int = typer.Option(1, "--nproc",
                              help="Train in N local processes (DistributedDataParallel; gloo on CPU, nccl on "
                                   "CUDA), as `torchrun --nproc_per_node N -m onnxecc compress ...` does."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="No progress: neither the bar (terminal) nor the per-phase and per-epoch lines "
                                    "(logs)."),
    options=None,
) -> None:
    """Compress MODEL so that it meets the budget; train on --data (ECC: ADMM, then fine-tuning).

    Ctrl-C while it trains saves a checkpoint and prints the command that resumes it (a second Ctrl-C stops
    at once)."""
    from onnxecc.train import distributed

    if nproc != 1 and not print_config:  # the same command in N processes (train.distributed.launch); this waits
        if nproc < 1:
            raise UserError(f"--nproc {nproc}: give at least 1 process")
        raise SystemExit(distributed.launch(nproc, ["-m", "onnxecc", *_without_option(sys.argv[1:], "--nproc")]))
    if distributed.env_rank() > 0:  # under torchrun / --nproc rank 0 alone prints (and writes)
        console.quiet = err_console.quiet = True
    from onnxecc.compress import compress as run_compress
    from onnxecc.core import recipe
    from onnxecc.train.checkpoint import Interrupted, default_path

    if print_config:
        sys.stdout.write(recipe.to_toml(options))
        return
    for value, missing in ((budget, "--budget is missing: give e.g. --budget 0.3 (30% of the original's cost)"),
                           (output, "--output is missing: give -o FILE.onnx (where to write the compressed model)")):
        if value is None:
            raise UserError(missing)
    checkpoint = checkpoint or resume or str(default_path(model, output))
    display = _CompressDisplay(quiet, checkpoint)
    try:
        result = run_compress(model, budget, output, options, report=report, on_event=display,
                              checkpoint=checkpoint, resume=resume, overwrite=overwrite)
    except Interrupted as exc:  # exit here: typer turns a KeyboardInterrupt into a silent exit 130
        display.stop()
        if exc.path is None:
            err_console.print(f"interrupted: {exc.reason}", highlight=False, soft_wrap=True)
        else:
            err_console.print(f"interrupted: checkpoint saved to {exc.path}; resume with: "
                              f"{_resume_command(exc.path)}", highlight=False, soft_wrap=True, markup=False)
        raise SystemExit(130) from None
    except (KeyboardInterrupt, Exception) as exc:  # outside training, or a second Ctrl-C: nothing new was saved
        if not _is_ctrl_c(exc):
            raise
        display.stop()
        err_console.print("interrupted: no checkpoint written (not training, or Ctrl-C twice); no output written"
                          + (f"; {resume} still resumes the earlier state" if resume else ""), highlight=False,
                          soft_wrap=True, markup=False)
        raise SystemExit(130) from None
    finally:
        display.stop()
    if display.lines is not None:  # a run without training held its phase lines back until it succeeded
        display.lines.flush()
    _print_compressed(model, output, result, options.metric)
    if not result.meets_budget:
        raise typer.Exit(1)


class _CompressDisplay:
    """compress's progress (its `on_event`): a transient bar on a terminal, timed lines in logs (`_log_lines`),
    nothing with --quiet; and, at the first training batch, one line saying where Ctrl-C saves."""

    def __init__(self, quiet: bool, checkpoint: str):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                                 TimeRemainingColumn(), console=err_console, transient=True)
        self.quiet, self.checkpoint, self.lines = quiet, checkpoint, _log_lines(quiet)
        self.task: dict = {}

    def __call__(self, kind: str, info: dict) -> None:
        task, progress = self.task, self.progress
        if kind == "batch" and "told" not in task:  # every training method resumes (wsp and greedy too)
            task["told"] = True  # one line, also in logs: from here on Ctrl-C keeps the work done
            err_console.print(f"training: Ctrl-C stops and saves a checkpoint to {self.checkpoint}", highlight=False,
                              soft_wrap=True, markup=False)
        if self.lines is not None or self.quiet:  # logs and pipelines: lines with elapsed and estimated time
            if self.lines is not None:
                self.lines(kind, info)
            return
        if kind == "recovery":
            from onnxecc.core.progress import describe_recovery

            progress.console.print(f"[yellow]{describe_recovery(info)}[/]", highlight=False)
        if not progress.live.is_started:
            progress.start()
        if kind == "stage" and info["name"] == "finetune":
            task["id"] = progress.add_task("fine-tuning", total=None, info="")
        elif kind == "stage":  # transient: shown while it runs, gone afterwards (and never on a non-terminal)
            if "stage" not in task:
                task["stage"] = progress.add_task("", total=None, info="")
            progress.update(task["stage"], description=f"{info['name']}…")
        elif kind == "batch" and "id" in task:
            progress.update(task["id"], completed=info["step"], total=info["total"])
        elif kind == "epoch" and "id" in task:
            acc = info["train_accuracy"]
            progress.update(task["id"], info=f"epoch {info['epoch']} loss {info['loss']:.4f}"
                            + (f" train acc {acc:.3f}" if acc is not None else ""))

    def stop(self) -> None:
        if self.progress.live.is_started:
            self.progress.stop()


def _print_compressed(model: str, output: str, result, metric: str) -> None:
    """compress's outcome: warnings, the int8 choices, the table of cost/accuracy/latency and the verdict."""
    from onnxecc.cost.budget import format_cost

    for w in result.warnings:
        err_console.print(f"[yellow]warning:[/] {w}")
    for name, layer in ((result.precision or {}).get("measured", {}).get("layers", {})).items():
        err_console.print(f"  {layer['precision']:4s} {name}: {layer['reason']}", highlight=False, markup=False)

    def fmt(v):
        return format_cost(v, metric) if v is not None else "-"

    table = Table(title=f"{model} → {result.output or output}")  # an over-budget model: its own name
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("compressed", justify="right")
    table.add_column("ratio", justify="right")
    table.add_row(metric, fmt(result.original_cost), fmt(result.final_cost),
                  f"{result.final_cost / result.original_cost:.3f}")
    if result.accuracy_after is not None:
        table.add_row("accuracy (test)", f"{result.accuracy_before:.4f}", f"{result.accuracy_after:.4f}",
                      f"{result.accuracy_after - result.accuracy_before:+.4f}")
    elif result.agreement is not None:
        table.add_row("top-1 agreement", "1", f"{result.agreement:.3f}", "")
    elif result.relative_error is not None:  # no class axis (a score map): how far the output moved
        table.add_row("output relative sq. error", "0", f"{result.relative_error:.3g}", "")
    if result.latency_before is not None:
        table.add_row("ORT CPU latency (1 thread)", f"{result.latency_before.median_s * 1e3:.3f} ms",
                      f"{result.latency_after.median_s * 1e3:.3f} ms",
                      f"{result.latency_ratio:.3f}")
    console.print(table)
    if result.heads:
        console.print("attention heads: " + ", ".join(f"{h['layer']} {h['before']}→{h['after']}"
                                                      for h in result.heads), highlight=False, markup=False)
    verdict = "[green]meets the budget[/]" if result.meets_budget else "[red]misses the budget[/]"
    console.print(f"budget {result.budget.describe(result.original_cost)}: {verdict} "
                  f"({fmt(result.final_cost)}, {result.meets_budget_by})")
    if result.input_shapes:
        from onnxecc.graph.inputs import shapes_text

        console.print(f"costs at input size {shapes_text(result.input_shapes)}; the output keeps the symbolic sizes",
                      highlight=False)


@app.command()
def validate(
    original: str = typer.Argument(..., help="The original .onnx model."),
    compressed: str = typer.Argument(..., help="The compressed .onnx model."),
    data: str = typer.Option(None, "--data", help="digits or FILE.npz (accuracy when labels exist)."),
    provider: str = typer.Option("CPUExecutionProvider", "--provider", help="onnxruntime execution provider."),
    threads: int = typer.Option(1, "--threads", help="onnxruntime intra-op threads."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    hardware: str = typer.Option(None, "--hardware",
                                 help="Accelerator JSON an energy budget was compressed for: re-count its energy."),
    meter: str = typer.Option(None, "--meter",
                              help="Energy meter (as for profile) to re-measure an energy budget set with an energy "
                                   "profile; without it that budget is not re-checked."),
    input_shape: list[str] = _VALIDATE_INPUT_SHAPE,
    class_axis: int = _CLASS_AXIS,
) -> None:
    """Run ORIGINAL and COMPRESSED side by side: agreement, accuracy, latency, budget re-check (exit 1 if missed)."""
    from onnxecc.graph.inputs import parse_input_shapes
    from onnxecc.validate import validate as run_validate

    result = run_validate(original, compressed, data=data, provider=provider, threads=threads, hardware=hardware,
                          meter=meter, input_shapes=parse_input_shapes(input_shape) or None, class_axis=class_axis)
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        table = Table(title=f"{original} vs {compressed} on {provider}")
        table.add_column("")
        table.add_column("original", justify="right")
        table.add_column("compressed", justify="right")
        table.add_row("latency (median)", f"{result.latency_original.median_s * 1e3:.3f} ms",
                      f"{result.latency_compressed.median_s * 1e3:.3f} ms")
        if result.accuracy_original is not None:
            table.add_row("accuracy", f"{result.accuracy_original:.4f}", f"{result.accuracy_compressed:.4f}")
        console.print(table)
        agreement = "n/a (no class axis)" if result.top1_agreement is None else f"{result.top1_agreement:.4f}"
        console.print(f"top-1 agreement {agreement} on {result.samples} samples; "
                      f"max |Δoutput| {result.max_abs_diff:.3g}, mean {result.mean_abs_diff:.3g}")
        if result.budget:
            b = result.budget
            verdict = {True: "[green]met[/]", False: "[red]violated[/]", None: "not re-checked"}[b["meets_budget"]]
            if "fraction" in b:  # a relative latency or measured energy budget: the side-by-side ratio decides
                console.print(f"budget ({b['metric']} ≤ {b['fraction']:.3g}× the original): {verdict} — {b['how']} "
                              f"{b['ratio']:.3f}")
            else:
                console.print(f"budget ({b['metric']} ≤ {b['budget']:.6g}): {verdict}"
                              + (f" — {b.get('how', '')} {b['cost']:.6g}" if b.get("cost") is not None else
                                 f" — {b.get('note', '')}"))
    if result.meets_budget is False:
        raise typer.Exit(1)


_PROVIDER_OPTION = typer.Option(None, "--provider-option", help="KEY=VALUE passed to the provider (repeatable).")


@app.command()
def profile(
    model: str = typer.Argument(..., help="Path to the .onnx file to profile (on the target device)."),
    output: str = typer.Option(..., "--output", "-o", help="Profile JSON to write (resumed if it exists)."),
    provider: str = typer.Option("CPUExecutionProvider", "--provider", help="onnxruntime execution provider."),
    provider_option: list[str] = _PROVIDER_OPTION,
    meter: str = typer.Option("latency", "--meter",
                              help='latency | cputime | rapl[:DIR,...] | nvml[:GPU] | jetson[:FILE,...] | '
                                   'cmd:"COMMAND" (prints a cumulative energy reading in joules).'),
    samples: int = typer.Option(200, "--samples", help="Width variants to measure (4 anchors + random)."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(1, "--threads", help="onnxruntime intra-op threads (pinned)."),
    warmup: int = typer.Option(10, "--warmup", help="Runs before measuring each variant."),
    repeats: int = typer.Option(30, "--repeats", help="Measurements per variant (the median is kept)."),
    min_width: int = typer.Option(1, "--min-width", help="Smallest width sampled for a group."),
    step: str = typer.Option("auto", "--step",
                             help="Sample widths on multiples of this (auto: the provider's kernel block; 1: any)."),
    knobs: str = typer.Option("width", "--knobs",
                              help="width, or width,precision: also measure int8 per layer (and at a few pruned "
                                   "widths) for compress --knobs width,precision."),
    data: str = typer.Option(None, "--data", help="With --knobs width,precision: FILE.npz (array x) to calibrate "
                                                  "the int8 layers on (default: random inputs)."),
    paired: bool = typer.Option(True, "--paired/--no-paired",
                                help="Time each variant in rounds alternating with the full model and keep the "
                                     "ratio (a machine whose speed changes for seconds at a time moves the ratio "
                                     "less than the level); twice the measuring time."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="No progress: neither the bar (terminal) nor the lines every 30 s (logs)."),
    input_shape: list[str] = _INPUT_SHAPE,
) -> None:
    """Measure width variants of MODEL on this device and fit the bilinear latency/energy model."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from onnxecc.cost.budget import format_cost
    from onnxecc.cost.profiler import profile as run_profile
    from onnxecc.graph.inputs import parse_input_shapes

    options = {}
    for item in provider_option or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--provider-option {item!r}: use KEY=VALUE")
        options[key.strip()] = value.strip()
    progress = Progress(TextColumn("profiling"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeRemainingColumn(), console=err_console, transient=True)
    task = progress.add_task("profiling", total=None, info="")

    started = []
    lines = _log_lines(quiet)

    def on_progress(done: int, total: int, sample: dict) -> None:
        if lines is not None or quiet:  # logs: a line every 30 s with the time left (or nothing)
            if lines is not None:
                lines.count("profiling: variants measured", done, total)
            return
        if not started:  # only once the model loaded and the meter started: errors before print one line
            progress.start()
            started.append(True)
        info = f"last {sample['value']:.4g} ± {sample['iqr']:.2g}" if sample else ""
        progress.update(task, completed=done, total=total, info=info)

    try:
        result = run_profile(model, output, provider=provider, provider_options=options or None, meter=meter,
                             samples=samples, seed=seed, threads=threads, warmup=warmup, repeats=repeats,
                             min_width=min_width, step=step, on_progress=on_progress, knobs=knobs,
                             calibration=_calibration(data), paired=paired,
                             input_shapes=parse_input_shapes(input_shape) or None)
    finally:
        if started:
            progress.stop()
    if lines is not None:
        lines.flush()
    fit = result.fit
    full = next((s["value"] for s in result.samples if s.get("kind") == "full"), None)
    table = Table(title=f"{model} on {result.provider} ({result.meter.get('spec', meter)}) → {output}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("samples", f"{len(result.samples)} (widths on multiples of {result.settings.get('step', 1)})")
    if full is not None:
        table.add_row(f"full model {result.metric}", format_cost(full, result.metric))
    table.add_row("fitted model", f"{fit.variant} ({len(fit.layers)} layer coefficients)")
    if fit.holdout.get("n"):
        table.add_row(f"held-out error ({fit.holdout['n']} samples)",
                      f"mean {fit.holdout['mean_rel_error']:.1%}, max {fit.holdout['max_rel_error']:.1%}")
    noise = fit.variants.get("noise", {})
    if noise:
        table.add_row("measurement noise (IQR/median)", f"median {noise['median_rel_iqr']:.1%}")
    table.add_row("profiling time", f"{result.profiling_s:.1f} s")
    console.print(table)
    round_to = max(int(result.settings.get("step", 1)), int(fit.step))
    if result.precision is not None:
        p = result.precision
        console.print(f"int8: {len(p['int8_layers'])} of {len(p['layers'])} layer(s) measured faster, together "
                      f"{p['ratio_chosen']:.3f}× fp32 at full width; "
                      + ", ".join(f"{s['int8_ms'] / s['fp32_ms']:.3f}× at {s['kind']}" for s in p["samples"]))
    console.print(f"use it: onnxecc compress {model} --metric {result.metric} --profile {output} --round-to {round_to} "
                  + ("--knobs width,precision --data ... " if result.precision is not None else "") + "--budget ...")


def _calibration(data: str | None):
    """`profile --data FILE.npz`: its array `x` (no pickle), or None."""
    if not data:
        return None
    import numpy as np

    try:
        with np.load(data, allow_pickle=False) as f:
            return np.asarray(f["x"], dtype=np.float32)[:128]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"--data {data}: not an .npz with an array x ({exc})") from None


@app.command()
@with_options(exclude=("method",))
def sweep(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Path to the .onnx file to compress."),
    budgets: str = typer.Option(..., "--budgets", help="Comma-separated budgets, e.g. 0.2,0.4,0.6,0.8."),
    output: str = typer.Option(..., "--output", "-o", help="Directory for the models, reports and sweep.json."),
    methods: str = typer.Option("ecc,uniform,greedy", "--methods",
                               help=f"Comma-separated methods: {', '.join(METHODS)}."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Measure the latency ratio of every point."),
    plot: str = typer.Option(None, "--plot", help="Write the accuracy-vs-cost plot (PNG) here."),
    plot_x: str = typer.Option("cost", "--plot-x", help="x axis of the plot: cost | latency (measured ratio)."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="No per-phase and per-epoch progress lines in logs (the per-point lines stay)."),
    options=None,
) -> None:
    """Compress MODEL at several budgets with several methods; resumable (reruns skip finished points).

    Every point takes compress's options (the same flags, or --config); --methods replaces --method."""
    from onnxecc.sweep import sweep as run_sweep

    options.measure_latency = latency

    point = {"lines": None}

    def on_event(kind: str, info: dict) -> None:
        lines = point["lines"]
        if kind == "point" and info["status"] != "start":
            if lines is not None and info["status"] == "done":
                lines.flush()
            err_console.print(f"{info['name']}: {info['status']}", highlight=False)
        elif kind == "point":
            err_console.print(f"{info['name']}: running…", highlight=False)
            point["lines"] = _log_lines(quiet)  # the point's phases and epochs in logs, timed from its start
        elif lines is not None:
            lines(kind, info)

    try:
        result = run_sweep(model, budgets.split(","), methods.split(","), output, options, plot=plot,
                           on_event=on_event, plot_x=plot_x)
    except (KeyboardInterrupt, Exception) as exc:  # exit here: main() would see typer's 130 and exit 0
        if not _is_ctrl_c(exc):
            raise
        err_console.print(f"interrupted: {output}/sweep.json lists the finished points; rerun the same command "
                          "to continue", highlight=False, soft_wrap=True, markup=False)  # a path stays whole
        raise SystemExit(130) from None

    def num(v, spec):
        return format(v, spec) if v is not None else "-"

    table = Table(title=f"{model} sweep ({options.metric}) → {output}")
    for col in ("budget", "method", "cost fraction", "latency ratio", "accuracy", "time", "status"):
        table.add_column(col, justify="left" if col in ("method", "status") else "right")
    if result.original_accuracy is not None:
        table.add_row("original", "-", "1.000", "1.000", num(result.original_accuracy, ".4f"), "-", "")
    for row in result.points:
        if row["status"] == "skipped":
            status = f"[yellow]skipped[/]: {row['message']}"
        else:
            status = "[green]meets[/]" if row["meets_budget"] else "[red]misses[/]"
        table.add_row(row["budget"], row["method"], num(row.get("cost_fraction"), ".3f"),
                      num(row.get("latency_ratio"), ".3f"), num(row.get("accuracy_after"), ".4f"),
                      f"{row['time_s']:.1f} s", status)
    console.print(table)
    console.print(f"{result.computed} point(s) computed, {len(result.points) - result.computed} reused or skipped; "
                  f"summary {result.outdir / 'sweep.json'}" + (f", plot {result.plot}" if result.plot else ""))


def _without_option(args: list[str], option: str) -> list[str]:
    """`args` without `option` and its value (given as `option VALUE` or `option=VALUE`)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def _resume_command(path) -> str:
    """This process's command line with `--resume PATH` (an earlier --resume replaced), for the user to copy."""
    import shlex

    return shlex.join(["onnxecc", *_without_option(sys.argv[1:], "--resume"), "--resume", str(path)])


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Click's usage-error and abort classes. typer ≥ 0.2x raises those of the click it vendors (typer._click),
    which are not the classes of a separately installed click (another package may install one): check both."""
    import typer

    usage, aborts = [], [typer.Abort]
    try:
        from typer._click import ClickException

        usage.append(ClickException)
    except ImportError:  # an older typer that uses the installed click
        pass
    try:
        from click.exceptions import Abort, ClickException

        usage.append(ClickException)
        aborts.append(Abort)
    except ImportError:
        pass
    return tuple(usage), tuple(aborts)


def _exit_with_one_line(exc: Exception, code: int) -> None:
    """An error whose message says what to do: that one line (taken literally, not as rich markup), then exit."""
    if _state["debug"]:
        traceback.print_exc()
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    """Entry point: user errors print one line and exit 2; explained failures (e.g. training that diverged after
    every recovery) print one line and exit 1; internal errors exit 1; Ctrl-C exits 130."""
    _state["sigint"] = False
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup, &)
        signal.signal(signal.SIGINT, _remember_sigint)
    try:
        code = app(standalone_mode=False)  # returns typer.Exit / Ctrl-C codes instead of exiting
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as exc:
        _exit_with_one_line(exc, 2)
    except ExplainedFailure as exc:  # not the input, not a bug: its line says what to try
        _exit_with_one_line(exc, 1)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # click's usage errors carry their own exit code
        usage_errors, aborts = _click_exceptions()
        if isinstance(exc, usage_errors):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, aborts):
            sys.exit(130)
        if _is_ctrl_c(exc):  # an error that a Ctrl-C caused inside a library (`_remember_sigint`)
            err_console.print(f"interrupted ({type(exc).__name__} from inside a library)", highlight=False)
            sys.exit(130)
        if _state["debug"]:
            traceback.print_exc()
        err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} "
                          "(rerun with --debug for the traceback and report it)", highlight=False)
        sys.exit(1)
