"""`onnxecc validate`: run the original and the compressed model side by side in onnxruntime.

The report a user trusts is a measurement: agreement of the outputs, accuracy where labels exist, latency
of both on the chosen provider, and the budget stored in the compressed model re-checked on the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxecc import ingest, runtime
from onnxecc.layers import count_params, find_layers

META_PREFIX = "onnxecc."


@dataclass
class ValidateResult:
    samples: int
    top1_agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    accuracy_original: float | None
    accuracy_compressed: float | None
    latency_original: runtime.Timing
    latency_compressed: runtime.Timing
    provider: str
    budget: dict = field(default_factory=dict)  # metric, budget, cost, meets_budget (empty if no metadata)

    @property
    def meets_budget(self) -> bool | None:
        return self.budget.get("meets_budget")

    def as_dict(self) -> dict:
        return {
            "samples": self.samples, "top1_agreement": self.top1_agreement, "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff, "accuracy_original": self.accuracy_original,
            "accuracy_compressed": self.accuracy_compressed, "provider": self.provider,
            "latency_original": self.latency_original.as_dict(),
            "latency_compressed": self.latency_compressed.as_dict(),
            "latency_ratio": self.latency_compressed.median_s / self.latency_original.median_s,
            "budget": self.budget, "meets_budget": self.meets_budget,
        }


def read_metadata(model: onnx.ModelProto) -> dict:
    """The onnxecc.* metadata_props written by `compress` (values are JSON)."""
    out = {}
    for prop in model.metadata_props:
        if prop.key.startswith(META_PREFIX):
            try:
                out[prop.key[len(META_PREFIX):]] = json.loads(prop.value)
            except json.JSONDecodeError:
                out[prop.key[len(META_PREFIX):]] = prop.value
    return out


def write_metadata(model: onnx.ModelProto, values: dict) -> None:
    for key, value in values.items():
        full = META_PREFIX + key
        for prop in model.metadata_props:
            if prop.key == full:
                prop.value = json.dumps(value)
                break
        else:
            model.metadata_props.add(key=full, value=json.dumps(value))


def analytic_cost(model: onnx.ModelProto, metric: str) -> float | None:
    """Costs that can be counted on the file itself (independently of how it was compressed)."""
    if metric == "macs":
        return float(sum(layer.macs for layer in find_layers(model)))
    if metric == "params":
        return float(count_params(model))
    return None


def validate(original: ingest.ModelSource, compressed: ingest.ModelSource, data: str | None = None,
             provider: str = "CPUExecutionProvider", threads: int = 1, samples: int = 256,
             seed: int = 0) -> ValidateResult:
    """Compare two models in onnxruntime on the test split of `data` (or random inputs without data)."""
    sess_o = runtime.session(runtime.on_disk(original, ingest.load(original)), provider, threads)  # checked, dropped
    comp_proto = ingest.load(compressed)
    sess_c = runtime.session(runtime.on_disk(compressed, comp_proto), provider, threads)
    labels = None
    if data is not None:
        from onnxecc.data import load_data

        ds = load_data(data, tuple(sess_o.get_inputs()[0].shape), seed=seed)
        x = ds.x_test if len(ds.x_test) else ds.x_train
        labels = ds.y_test if len(ds.x_test) else ds.y_train
    else:
        x = runtime.example_input(sess_o, batch=min(samples, 64), seed=seed)
    out_o, out_c = runtime.run_batched(sess_o, x), runtime.run_batched(sess_c, x)
    diff = np.abs(out_o - out_c)
    acc_o = acc_c = None
    if labels is not None:
        acc_o = float((out_o.argmax(1) == labels).mean())
        acc_c = float((out_c.argmax(1) == labels).mean())
    t_o, t_c = runtime.measure_pair(sess_o, sess_c, x[:1])
    budget = _budget_check(comp_proto, t_c)
    return ValidateResult(len(x), float((out_o.argmax(1) == out_c.argmax(1)).mean()), float(diff.max()),
                          float(diff.mean()), acc_o, acc_c, t_o, t_c, provider, budget)


def _budget_check(model: onnx.ModelProto, latency: runtime.Timing) -> dict:
    meta = read_metadata(model)
    if "metric" not in meta or "budget" not in meta:
        return {}
    metric, budget = meta["metric"], float(meta["budget"])
    cost = analytic_cost(model, metric)
    how = "counted"
    if cost is None and metric == "latency":
        cost, how = latency.median_s, "measured"
    if cost is None:
        return {"metric": metric, "budget": budget, "cost": None, "meets_budget": None,
                "note": f"{metric} cannot be re-measured here; see the compress report"}
    return {"metric": metric, "budget": budget, "cost": cost, "how": how, "meets_budget": cost <= budget}
