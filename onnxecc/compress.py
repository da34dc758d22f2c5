"""`onnxecc compress`: the main job, as one function.

ONNX in → channel groups and a cost model → budget → structured projection (which channels to keep) →
optional fine-tuning in torch with the masks frozen and distillation from the original → the trained
weights written back into the *original* graph → channels physically removed → cost counted again on the
output file and the model checked in onnxruntime → atomic write with metadata, and a JSON report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxecc import atomic, ingest, runtime
from onnxecc.budget import Budget, format_cost, parse_budget
from onnxecc.channels import ChannelGraph, analyze
from onnxecc.costs import BilinearCost, Variables, macs_cost, params_cost, unit_classes
from onnxecc.errors import UserError
from onnxecc.importance import l2_importance
from onnxecc.layers import find_layers, with_static_shapes
from onnxecc.projection import check_reachable, project
from onnxecc.surgery import prune_channels
from onnxecc.validate import analytic_cost, write_metadata

METRICS = ("macs", "params", "latency", "energy")
METHODS = ("auto", "project", "ecc", "uniform", "greedy", "wsp")


@dataclass
class CompressOptions:
    """Every knob of `compress`, with defaults that work on the demo models without tuning."""

    metric: str = "macs"
    method: str = "auto"  # auto: ecc with --data, else project; see METHODS
    profile: str | None = None  # fitted latency/energy profile JSON (`onnxecc profile`), for those metrics
    hardware: str | None = None  # accelerator description JSON, for --method wsp
    data: str | None = None
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    round_to: int = 1
    min_width: int = 1
    temperature: float = 2.0
    distill_weight: float = 0.5
    device: str = "auto"
    measure_latency: bool = True


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
    agreement: float | None = None  # top-1 agreement with the original on the evaluation inputs
    latency_before: runtime.Timing | None = None
    latency_after: runtime.Timing | None = None
    history: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def final_cost(self) -> float:
        return self.counted_cost if self.counted_cost is not None else self.estimated_cost

    @property
    def meets_budget(self) -> bool:
        return self.final_cost <= self.budget_abs * (1 + 1e-12)

    def as_dict(self) -> dict:
        def timing(t):
            return t.as_dict() if t is not None else None

        return {
            "tool": "onnxecc", "version": _tool_version(), "output": str(self.output) if self.output else None,
            "metric": self.metric,
            "budget": {"text": self.budget.text, "absolute": self.budget_abs,
                       "fraction": self.budget_abs / self.original_cost if self.original_cost else None},
            "original_cost": self.original_cost, "estimated_cost": self.estimated_cost,
            "counted_cost": self.counted_cost, "cost_fraction": self.final_cost / self.original_cost,
            "meets_budget": self.meets_budget, "pruned": self.pruned,
            "widths": {str(g): {"kept": k, "full": f} for g, (k, f) in self.widths.items()},
            "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
            "top1_agreement": self.agreement,
            "latency_before": timing(self.latency_before), "latency_after": timing(self.latency_after),
            "latency_ratio": (self.latency_after.median_s / self.latency_before.median_s
                              if self.latency_after and self.latency_before else None),
            "history": self.history, "timings_s": self.timings, "warnings": self.warnings,
        }


def _tool_version() -> str:
    from onnxecc import __version__

    return __version__


def cost_model(metric: str, model: onnx.ModelProto, graph: ChannelGraph, layers, variables: Variables
               ) -> BilinearCost:
    """The cost of `metric` as a bilinear function of the widths of `variables` (classes of group units)."""
    if metric == "macs":
        return macs_cost(graph, layers, model, variables)
    if metric == "params":
        return params_cost(graph, model, variables)
    if metric in ("latency", "energy"):
        raise UserError(f"--metric {metric} needs a measured profile: run `onnxecc profile MODEL -o P.json` on the "
                        "target and pass --profile P.json")
    raise UserError(f"unknown metric '{metric}': choose one of {', '.join(METRICS)}")


def compress(model: ingest.ModelSource, budget: str | float, output: str | Path | None = None,
             options: CompressOptions | None = None, report: str | Path | None = None,
             on_event: Callable[[str, dict], None] | None = None) -> CompressResult:
    """Compress `model` to meet `budget` (see `onnxecc.budget` for the grammar); write `output` if given.

    `on_event(kind, info)` receives progress ("stage", "epoch", "batch") for a front end to display.
    """
    opts = options or CompressOptions()
    emit = on_event or (lambda kind, info: None)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if output is not None:
        atomic.check_output_path(output)
    if report is not None:
        atomic.check_output_path(report)
    if opts.epochs < 0 or opts.round_to < 1 or opts.min_width < 1:
        raise UserError("--epochs must be ≥ 0, --round-to and --min-width ≥ 1")
    if opts.method not in METHODS and opts.method != "netadapt":
        raise UserError(f"unknown method '{opts.method}': choose one of {', '.join(METHODS)}")
    parsed = parse_budget(str(budget), opts.metric)
    if opts.method == "wsp":
        from onnxecc.wsp import compress_wsp

        return compress_wsp(model, parsed, output, opts, report, emit)
    proto = ingest.load(model)

    emit("stage", {"name": "analyse"})
    shaped = with_static_shapes(proto)
    layers = find_layers(proto, shaped)
    if not layers:
        raise UserError("the model has no compute layers (Conv, ConvTranspose, Gemm, MatMul): nothing to compress")
    graph = analyze(proto, shaped)
    variables = unit_classes(graph)
    cost = cost_model(opts.metric, proto, graph, layers, variables)
    original = cost(None)
    target = parsed.resolve(original)
    fmt = lambda v: format_cost(v, opts.metric)  # noqa: E731
    data = _load_data(opts.data, shaped, layers) if opts.data else None
    timings["analyse"] = time.perf_counter() - t0

    warnings: list[str] = []
    history: list[dict] = []
    if target >= original:
        out_model, proj, pruned = proto, None, False
        warnings.append(f"budget {fmt(target)} is at or above the original cost {fmt(original)}: no pruning needed")
    else:
        prunable_groups = {g.id for g in graph.prunable_groups}
        prunable = [v for v, g in enumerate(variables.group) if g in prunable_groups]
        if not prunable:
            raise UserError("no channel group of this model can be pruned (all frozen; see `onnxecc inspect`)")
        check_reachable(cost, prunable, target, min_width=opts.min_width, round_to=opts.round_to, fmt=fmt)
        emit("stage", {"name": "project"})
        t = time.perf_counter()
        group_importance = l2_importance(proto, graph)
        importance = {v: group_importance[variables.group[v]][variables.units[v]] for v in prunable}
        proj = project(cost, importance, target, min_width=opts.min_width, round_to=opts.round_to, fmt=fmt)
        keep = variables.group_keep(proj.keep)
        timings["project"] = time.perf_counter() - t
        trained = proto
        if data is not None and opts.epochs > 0:
            emit("stage", {"name": "finetune", "epochs": opts.epochs})
            t = time.perf_counter()
            trained, history = _finetune(proto, graph, keep, data, opts, emit)
            timings["finetune"] = time.perf_counter() - t
        elif data is None:
            warnings.append("no --data: channels were chosen by weight magnitude only and accuracy is not "
                            "recovered by fine-tuning; pass --data to fine-tune")
        emit("stage", {"name": "prune"})
        out_model = prune_channels(trained, keep, graph)
        pruned = True

    counted = analytic_cost(out_model, opts.metric)
    estimated = proj.cost if proj is not None else original
    if counted is not None and abs(counted - estimated) > 1e-6 * max(1.0, original):
        raise RuntimeError(f"cost model disagrees with the count on the pruned file: {estimated} vs {counted}")
    result = CompressResult(
        out_model, Path(output) if output else None, opts.metric, parsed, target, original, estimated, counted,
        pruned, _widths(graph, keep if proj is not None else None), history=history, warnings=warnings,
    )
    emit("stage", {"name": "validate"})
    t = time.perf_counter()
    _evaluate(result, proto, data, opts)
    timings["validate"] = time.perf_counter() - t
    if not result.meets_budget:
        raise RuntimeError(f"internal error: output cost {fmt(result.final_cost)} exceeds the budget {fmt(target)}")

    write_metadata(out_model, {
        "version": _tool_version(), "metric": opts.metric, "budget": target, "budget_text": parsed.text,
        "original_cost": original, "estimated_cost": estimated, "counted_cost": counted, "pruned": pruned,
        "accuracy": result.accuracy_after,
    })
    timings["total"] = time.perf_counter() - t0
    result.timings = timings
    if output is not None:
        ingest.save(out_model, output)
    if report is not None:
        atomic.write_json(report, result.as_dict())
    return result


def _widths(graph: ChannelGraph, keep: dict[int, np.ndarray] | None) -> dict[int, tuple[int, int]]:
    out = {}
    for g in graph.prunable_groups:
        kept = len(keep[g.id]) if keep is not None and g.id in keep else g.size
        out[g.id] = (kept, g.size)
    return out


def _load_data(spec: str, shaped: onnx.ModelProto, layers):
    from onnxecc.data import load_data

    inp = shaped.graph.input[0]
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim)
    out_dim = layers[-1].cout
    return load_data(spec, shape, num_classes=out_dim)


def _finetune(proto: onnx.ModelProto, graph: ChannelGraph, keep: dict[int, np.ndarray], data, opts: CompressOptions,
              emit):
    """Train the full-size model with the pruned channels masked to zero, then write it back (still full
    size, zeros in place) so that surgery removes exactly what the masks removed."""
    import torch

    from onnxecc.bridge import to_torch, write_back
    from onnxecc.finetune import Mask, TrainConfig, finetune
    from onnxecc.importance import channel_masks

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tm = to_torch(proto)
    masks = []
    for name, mask in channel_masks(proto, graph, keep).items():
        if name not in tm.params:
            continue  # a constant torch does not train (e.g. a per-channel Mul): consumers are masked anyway
        tensor = tm.parameter(name)
        m = tm.layouts[name].to_torch(mask.astype(np.float32)) if name in tm.layouts else \
            torch.from_numpy(mask.astype(np.float32))
        if isinstance(tensor, torch.nn.Parameter):
            masks.append(Mask(tensor, m))
        else:
            with torch.no_grad():
                tensor.mul_(m.to(tensor.dtype))
    sess = runtime.session(proto)
    teacher = runtime.run_batched(sess, data.x_train)
    config = TrainConfig(epochs=opts.epochs, lr=opts.lr, batch_size=opts.batch_size, seed=opts.seed,
                         temperature=opts.temperature, distill_weight=opts.distill_weight, device=opts.device)
    history = finetune(tm.module, data.x_train, teacher, data.y_train, config, masks,
                       on_epoch=lambda log: emit("epoch", log.__dict__),
                       on_batch=lambda step, total: emit("batch", {"step": step, "total": total}))
    return write_back(tm), history.as_dict()


def _evaluate(result: CompressResult, original: onnx.ModelProto, data, opts: CompressOptions) -> None:
    """Measure the output in onnxruntime next to the original: accuracy, agreement, latency (1 thread)."""
    sess_o, sess_c = runtime.session(original), runtime.session(result.model)
    if data is not None and len(data.x_test):
        x, y = data.x_test, data.y_test
    else:
        x, y = runtime.example_input(sess_o, batch=32, seed=opts.seed), None
    out_o, out_c = runtime.run_batched(sess_o, x), runtime.run_batched(sess_c, x)
    result.agreement = float((out_o.argmax(1) == out_c.argmax(1)).mean())
    if y is not None:
        result.accuracy_before = float((out_o.argmax(1) == y).mean())
        result.accuracy_after = float((out_c.argmax(1) == y).mean())
    if opts.measure_latency:
        result.latency_before, result.latency_after = runtime.measure_pair(sess_o, sess_c, x[:1])
