"""What a compression run returns and how its output is measured against the original: `CompressResult` (the
`--report` JSON) and `evaluate`. Shared by `compress` and by methods with their own pipeline (`wsp`), so that no
method imports the verb.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

from onnxecc.core.errors import UnsupportedModelError
from onnxecc.cost.budget import Budget
from onnxecc.graph import runtime
from onnxecc.graph.inputs import shapes_text
from onnxecc.graph.outputs import output_kind, relative_error


@dataclass
class CompressResult:
    """What `compress` did; `as_dict()` is the `--report` JSON."""

    model: onnx.ModelProto
    output: Path | None
    metric: str
    budget: Budget
    budget_abs: float
    original_cost: float
    estimated_cost: float
    counted_cost: float | None  # counted again on the output file (MACs/params), independently of the model
    pruned: bool
    widths: dict[int, tuple[int, int]]  # group -> (kept, full)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    agreement: float | None = None  # top-1 agreement with the original along the class axis (None: no class axis)
    relative_error: float | None = None  # ‖out − original‖² / ‖original‖² on the evaluation inputs
    latency_before: runtime.Timing | None = None
    latency_after: runtime.Timing | None = None
    latency_ratio: float | None = None  # after / before, the median of per-round ratios (`runtime.Pair`)
    history: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    method: str = "none"
    rounds: list[dict] = field(default_factory=list)  # closed-loop rounds: internal budget, measurement
    measured_miss: bool = False  # the measurement missed the budget after every round
    precision: dict | None = None  # --knobs precision: int8 layers, measured savings, why (onnxecc.cost.quantize)
    input_shapes: dict | None = None  # inputs with symbolic sizes: the size costs were counted at (batch first)
    heads: list[dict] = field(default_factory=list)  # per attention layer: {"layer", "group", "before", "after"}
    # groups a normalisation runs over: pruned only with --data; {"id", "reason", "pruned", "left" (why not)}
    approximate_groups: list[dict] = field(default_factory=list)
    recipe: dict | None = None  # the options as given (`core.recipe`): `--config REPORT` repeats the run

    @property
    def final_cost(self) -> float:
        return self.counted_cost if self.counted_cost is not None else self.estimated_cost

    @property
    def meets_budget(self) -> bool:
        if self.measured_miss:
            return False
        measured = selected_round(self.rounds)
        if measured is not None and "meets" in measured:  # measured metrics: the measurement is the verdict
            return bool(measured["meets"])
        return self.final_cost <= self.budget_abs * (1 + 1e-12)

    @property
    def meets_budget_by(self) -> str:
        """How `meets_budget` was decided: measured on the output, counted on the file, or only estimated."""
        measured = selected_round(self.rounds)
        if measured is not None and "meets" in measured:
            how = f"with the meter {measured['meter']}" if "meter" in measured else "in latency"
            return f"measured {how} side by side with the original"
        if self.counted_cost is not None:
            return "counted on the output file"
        return "estimated by the cost model (not measured on the output)"

    def as_dict(self) -> dict:
        def timing(t):
            return t.as_dict() if t is not None else None

        return {
            "tool": "onnxecc", "version": tool_version(), "output": str(self.output) if self.output else None,
            "metric": self.metric,
            "budget": {"text": self.budget.text, "absolute": self.budget_abs,
                       "fraction": self.budget_abs / self.original_cost if self.original_cost else None},
            "original_cost": self.original_cost, "estimated_cost": self.estimated_cost,
            "counted_cost": self.counted_cost, "cost_fraction": self.final_cost / self.original_cost,
            "meets_budget": self.meets_budget, "meets_budget_by": self.meets_budget_by, "pruned": self.pruned,
            "method": self.method,
            "rounds": self.rounds,
            "widths": {str(g): {"kept": k, "full": f} for g, (k, f) in self.widths.items()},
            "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
            "top1_agreement": self.agreement, "relative_error": self.relative_error,
            "latency_before": timing(self.latency_before), "latency_after": timing(self.latency_after),
            "latency_ratio": self.latency_ratio,
            "history": self.history, "timings_s": self.timings, "warnings": self.warnings,
            "precision": self.precision, "input_shapes": self.input_shapes,
            "approximate_groups": self.approximate_groups, "heads": self.heads, "recipe": self.recipe,
        }


def tool_version() -> str:
    from onnxecc import __version__

    return __version__


def selected_round(rounds: list[dict]) -> dict | None:
    """The closed-loop round whose output was returned (the last one in reports written before the mark)."""
    return next((r for r in rounds if r.get("selected")), rounds[-1] if rounds else None)


def recovery_warnings(history: list[dict]) -> list[str]:
    """A warning when training recovered from non-finite numbers (`onnxecc.train.guard`; the history has each)."""
    recovered = [h for h in history if h.get("phase") == "recovery"]
    return [f"training met non-finite numbers {len(recovered)} time(s) and recovered: see the 'recovery' entries "
            "of the report's history"] if recovered else []


def _check_other_size(sess_o, sess_c, original, opts) -> None:
    """A model with symbolic input sizes was analysed and pruned at one size (`opts.input_shapes`): its output must
    still run at others. At twice every symbolic size, where the original runs, the output must run and give
    outputs of the original's shape, else UnsupportedModelError (nothing is written): something the graph computes
    from the size was turned into a constant."""
    open_axes = {i.name: [a for a, d in enumerate(i.shape) if a > 0 and not (isinstance(d, int) and d > 0)]
                 for i in sess_o.get_inputs()}
    if not any(open_axes.values()):
        return
    other = {n: tuple(2 * d if a in open_axes.get(n, ()) else d for a, d in enumerate(shape))
             for n, shape in opts.input_shapes.items()}
    x = runtime.example_input(sess_o, batch=1, seed=opts.seed, model=original, shapes=other)
    quiet = runtime.quiet_run()  # a failure here is reported in one line below, not in onnxruntime's log
    try:
        expected = sess_o.run(None, runtime.feed(sess_o, x), quiet)
    except Exception:  # the original does not take that size (a fixed size in disguise): nothing to compare
        return
    try:
        got = sess_c.run(None, runtime.feed(sess_c, x), quiet)
    except Exception as exc:  # onnxruntime's errors have no common base class
        raise UnsupportedModelError(
            f"the compressed model runs at {shapes_text(opts.input_shapes)} but not at {shapes_text(other)}, where the "
            f"original runs ({str(exc).strip().splitlines()[0][:200]}): a size the graph computes was fixed; not "
            "supported for this graph yet — compress a copy with fixed input sizes instead") from None
    if [a.shape for a in got] != [a.shape for a in expected]:
        raise UnsupportedModelError(
            f"at {shapes_text(other)} the compressed model's outputs have shapes {[a.shape for a in got]}, the "
            f"original's {[a.shape for a in expected]}: a size the graph computes was fixed; not supported for this "
            "graph yet — compress a copy with fixed input sizes instead")


def evaluate(result: CompressResult, original: onnx.ModelProto, data, opts) -> None:
    """Measure the output in onnxruntime next to the original: accuracy, agreement, latency (1 thread)."""
    sess_o, sess_c = runtime.session(original), runtime.session(result.model)
    if data is not None and len(data.x_test):
        x, y = data.x_test, data.y_test
    else:
        x, y = runtime.example_input(sess_o, batch=32, seed=opts.seed, model=original, shapes=opts.input_shapes), None
    out_o, out_c = runtime.run_batched(sess_o, x), runtime.run_batched(sess_c, x)
    _check_other_size(sess_o, sess_c, original, opts)
    # per step for N×T×C scores; a map has none
    result.agreement = output_kind(out_o, opts.class_axis).agreement(out_o, out_c)
    result.relative_error = relative_error(out_c, out_o)
    if y is not None:
        result.accuracy_before = float((out_o.argmax(1) == y).mean())
        result.accuracy_after = float((out_c.argmax(1) == y).mean())
    if opts.measure_latency:
        pair = runtime.measure_pair(sess_o, sess_c, x[:1])
        result.latency_before, result.latency_after, result.latency_ratio = pair.a, pair.b, pair.ratio
