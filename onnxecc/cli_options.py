"""The command-line flags of `CompressOptions`, declared once: flag, help and how the text becomes the option.
`compress` and `sweep` take them all (`with_options`), so a new knob is one field in `methods/options.py` and one
`Flag` here, and the two commands cannot drift apart (sweep used to expose 9 of them).

A flag's default is the field's default (`CompressOptions()`), written as the command line would write it (None
as "auto" where the text says so): the help shows what the library does, and the test checks the two agree.
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import typer

from onnxecc.core.errors import UserError
from onnxecc.methods.options import CompressOptions
from onnxecc.methods.registry import METHODS


def auto_number(text: str, option: str, example: str) -> float | None:
    """--lr, --rho: auto → None (the tool chooses), else a positive number."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or math.isinf(value):
        raise UserError(f"{option} {text!r}: give auto or a positive number such as {example}")
    return value


def _input_shapes(texts: list[str] | None):
    from onnxecc.graph.inputs import parse_input_shapes  # onnx: not needed for --help

    return parse_input_shapes(texts) or None


@dataclass(frozen=True)
class Flag:
    """One option on the command line. `decls`: click's declarations (`--a/--no-a` for a switch); `kind`: the
    type the command line parses (list[str] for a repeatable flag); `parse`: its text → the option's value;
    `cli_default`: the default as the command line writes it, when that is not the field's default."""

    field: str
    decls: tuple[str, ...]
    kind: Any
    help: str | None = None
    parse: Callable[[Any], Any] | None = None
    cli_default: Any = None

    def default(self) -> Any:
        return self.cli_default if self.cli_default is not None else getattr(CompressOptions(), self.field)

    def value(self, given: Any) -> Any:
        return self.parse(given) if self.parse is not None else given


INPUT_SHAPE_HELP = ("Size to analyse a model with symbolic input dims at: NAME:d0,d1,... batch first (repeatable; "
                    "the name may be left out for a single-input model). compress and sweep default to the first "
                    "sample of --data. A compressed model keeps the dims symbolic.")
CONFIG_HELP = ("Recipe file (.toml or .json, or a compress --report JSON) with the options; flags given on the "
               "command line override it.")
CLASS_AXIS_HELP = ("The output axis that holds class scores (e.g. 2 for N×T×C logits per step), for distillation and "
                   "top-1 agreement; default: detected from the original's outputs (N×C, or probabilities summing to "
                   "1 along an axis; else a map).")

FLAGS: tuple[Flag, ...] = (
    Flag("metric", ("--metric", "-m"), str, "macs | params | latency | energy."),
    Flag("method", ("--method",), str, "auto (ecc with --data, else project) | " + " | ".join(METHODS) + "."),
    Flag("profile", ("--profile",), str, "Fitted profile JSON (latency/energy metrics)."),
    Flag("hardware", ("--hardware",), str, "Accelerator description JSON (--method wsp)."),
    Flag("data", ("--data",), str, "digits (built-in) or FILE.npz with x and optional y."),
    Flag("epochs", ("--epochs",), int, "Fine-tuning epochs (0: projection only)."),
    Flag("lr", ("--lr",), str, "Learning rate (Adam): auto = the final fine-tuning's rate chosen by a probe of 2e-3, "
         "5e-4, 1.25e-4 (one pass over up to 1024 training samples each; training phases: 2e-3); a number fixes "
         "every phase's rate.", lambda text: auto_number(text, "--lr", "5e-4"), "auto"),
    Flag("batch_size", ("--batch-size",), int, "Training batch size."),
    Flag("seed", ("--seed",), int, "Random seed of the training (batch order) and of the digits split."),
    Flag("round_to", ("--round-to",), int, "Keep channel counts at multiples of this (default: the CPU kernels' "
         "block, 8 or 16; 1: any)."),
    Flag("min_width", ("--min-width",), int, "Never keep fewer channels than this in a group."),
    Flag("device", ("--device",), str, "Training device: auto, cpu, cuda."),
    Flag("proj_interval", ("--proj-interval",), int, "wsp: batches between weighted sparse projections."),
    Flag("admm_iterations", ("--admm-iterations",), int, "ECC: ADMM iterations."),
    Flag("admm_epochs", ("--admm-epochs",), int, "ECC: training epochs per ADMM iteration."),
    Flag("rho", ("--rho",), str, "ECC: initial ADMM penalty ρ per Adam step (doubles every iteration); auto = "
         "2.5e-3 at 46 steps per W-step, scaled so that every W-step pulls as hard whatever its number of steps.",
         lambda text: auto_number(text, "--rho", "0.1"), "auto"),
    Flag("rho_growth", ("--rho-growth",), float, "ECC: the factor ρ grows by after every ADMM iteration."),
    Flag("admm_decay", ("--admm-decay",), int, "ECC: ADMM iterations over which the budget decays from the original "
         "cost to the target."),
    Flag("admm_w_step", ("--admm-w-step",), str, "ECC: prox (proximal step after each Adam step) | penalty (in the "
         "loss)."),
    Flag("provider", ("--provider",), str, "Where latency is measured."),
    Flag("threads", ("--threads",), int, "onnxruntime threads for latency measurements."),
    Flag("closed_loop", ("--closed-loop/--no-closed-loop",), bool, "Measure a latency or energy (measured profile) "
         "output side by side with the original, correct misses; --no-closed-loop: the estimate only."),
    Flag("max_rounds", ("--max-rounds",), int, "Closed loop: measured rounds at most (default 6 without training, "
         "else 3)."),
    Flag("verify_projection", ("--verify-projection",), bool, "Debug: check each ADMM Z-step against the exact MILP "
         "(small models)."),
    Flag("importance", ("--importance",), str, "Channel importance (project/ecc): fisher (loss-aware, needs --data), "
         "l2 (weight norms); auto: fisher with --data."),
    Flag("prune_approximate", ("--prune-approximate/--keep-approximate",), bool, "With --data, prune the approximate "
         "groups too (a normalisation runs over them, e.g. a transformer's residual width); --keep-approximate leaves "
         "them whole and prunes heads and other widths only."),
    Flag("closed_loop_loosen", ("--loosen/--no-loosen",), bool, "Closed loop: re-project an output measured >10% "
         "under the budget (default: only when no training)."),
    Flag("knobs", ("--knobs",), str, "What compress may change: width (channels), or width,precision (also int8 QDQ "
         "layers where measured faster; needs --data and --metric latency).",
         lambda text: tuple(k.strip() for k in text.split(",")), "width"),
    Flag("qat", ("--qat/--no-qat",), bool, "With --knobs width,precision: fine-tune with the int8 layers "
         "fake-quantized (quantization-aware training); --no-qat: fp32 fine-tuning, then post-training "
         "quantization."),
    Flag("recalibrate", ("--recalibrate/--no-recalibrate",), bool, "Before fine-tuning, give each convolution's "
         "output channels the original model's mean and spread on up to 512 training inputs again (re-estimating "
         "the BatchNorm that export folded away)."),
    Flag("class_axis", ("--class-axis",), int, CLASS_AXIS_HELP),
    Flag("input_shapes", ("--input-shape",), list[str], INPUT_SHAPE_HELP,
         lambda texts: _input_shapes(texts)),
)
BY_FIELD = {f.field: f for f in FLAGS}
# settings with no flag: set them in a --config recipe (or the Python API)
NOT_ON_THE_COMMAND_LINE = ("temperature", "distill_weight", "measure_latency")


def with_options(exclude: tuple[str, ...] = (), after: str = "output"):
    """Give a typer command (with a `typer.Context` parameter) every flag of FLAGS but `exclude` and `--config`, as
    keyword parameters named by their field, listed after its parameter `after` (its required inputs first in
    --help); the command receives them as one `options: CompressOptions`: the --config recipe's, with the flags the
    command line gave over it (a flag left at its default does not override the file)."""
    flags = [f for f in FLAGS if f.field not in exclude]

    def wrap(command):
        hints = typing.get_type_hints(command)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(command).parameters.values() if p.name != "options"]
        own = [p.replace(kind=p.KEYWORD_ONLY) for p in own]  # typer passes every parameter by name
        added = [inspect.Parameter(f.field, inspect.Parameter.KEYWORD_ONLY, annotation=f.kind,
                                   default=typer.Option(f.default(), *f.decls, help=f.help)) for f in flags]
        added.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                                       default=typer.Option(None, "--config", help=CONFIG_HELP)))
        cut = [p.name for p in own].index(after) + 1

        # the command's typer.Context parameter: where each flag's value came from (typer passes its own click's)
        context = next(p.name for p in own if p.annotation is typer.Context)

        @functools.wraps(command)
        def run(**kwargs):
            ctx = kwargs[context]
            options = CompressOptions(**{f.field: f.value(kwargs.pop(f.field)) for f in flags})
            config = kwargs.pop("config")
            if config:  # the file's options, with the flags given on the command line over them
                from onnxecc.core import recipe

                given = {f.field for f in flags
                         if ctx.get_parameter_source(f.field).name not in ("DEFAULT", "DEFAULT_MAP")}
                options = recipe.merge(recipe.load(config, CompressOptions), options, given)
            return command(options=options, **kwargs)

        params = own[:cut] + added + own[cut:]
        run.__signature__ = inspect.Signature(params)  # what typer reads, with the types resolved:
        run.__annotations__ = {p.name: p.annotation for p in params}
        del run.__wrapped__
        return run

    return wrap
