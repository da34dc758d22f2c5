"""`onnxecc validate`: run the original and the compressed model side by side in onnxruntime.

The report a user trusts is a measurement: agreement of the outputs, accuracy where labels exist, latency
of both on the chosen provider, and the budget stored in the compressed model re-checked on the file (a measured
energy budget only when given the meter to measure it with: otherwise it says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxecc.core.errors import UserError
from onnxecc.cost.budget import parse_budget
from onnxecc.graph import ingest, runtime
from onnxecc.graph.inputs import resolve_shapes, shapes_text
from onnxecc.graph.layers import count_params, find_layers
from onnxecc.graph.metadata import read_metadata, write_metadata  # noqa: F401 (write_metadata: public here too)
from onnxecc.graph.outputs import output_kind


@dataclass
class ValidateResult:
    samples: int
    top1_agreement: float | None  # along the class axis (`outputs.output_kind`); None for a map
    max_abs_diff: float
    mean_abs_diff: float
    accuracy_original: float | None
    accuracy_compressed: float | None
    latency_original: runtime.Timing
    latency_compressed: runtime.Timing
    latency_ratio: float  # compressed / original: the median of per-round ratios (`runtime.Pair`)
    provider: str
    budget: dict = field(default_factory=dict)  # metric, budget, cost, meets_budget (empty if no metadata)
    placement: dict = field(default_factory=dict)  # "original"/"compressed": nodes per provider (`runtime.placement`)

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
            "latency_ratio": self.latency_ratio,
            "budget": self.budget, "meets_budget": self.meets_budget, "placement": self.placement,
        }


def analytic_cost(model: onnx.ModelProto, metric: str, input_shapes=None) -> float | None:
    """Costs that can be counted on the file itself (independently of how it was compressed); MACs of a model
    with symbolic input sizes at `input_shapes` (`inputs.resolve_shapes`)."""
    if metric == "macs":
        return float(sum(layer.macs for layer in find_layers(model, input_shapes=input_shapes)))
    if metric == "params":
        return float(count_params(model))
    return None


def validate(original: ingest.ModelSource, compressed: ingest.ModelSource, data: str | None = None,
             provider: str = "CPUExecutionProvider", threads: int = 1, samples: int = 256,
             seed: int = 0, hardware: str | None = None, meter: str | None = None,
             input_shapes=None, class_axis: int | None = None) -> ValidateResult:
    """Compare two models in onnxruntime on the test split of `data` (or random inputs without data, of every
    input's dtype: `inputs.example_feeds`).

    Inputs with symbolic sizes are fed at `input_shapes` (parsed --input-shape), else the size of `data`, else
    the size `compress` counted at (the compressed model's metadata); a MACs budget is counted again at
    compress's size.

    `hardware` (the accelerator JSON an energy budget was compressed for, `--method wsp`): the modelled energy
    is counted again on the compressed file; without it an energy budget is not re-checked.

    `meter` (a `--meter` spec, e.g. `rapl` or `cmd:...`): the energy of both models is measured side by side with it
    and a measured energy budget (compressed with an energy profile, whose meter the file records) judged on that,
    as compress's closed loop judged it. Without it such a budget is reported as not re-checked: the meter the
    file records is never run on the file's say-so (a `cmd:` meter is a shell command).

    `class_axis`: the output axis of class scores for the agreement (`outputs.output_kind`; None: detected)."""
    hw = None
    if hardware is not None:  # a bad file fails before any session is built
        from onnxecc.cost.hardware import load_hardware

        hw = load_hardware(hardware)
    orig_proto = ingest.load(original)
    sess_o = runtime.session(runtime.on_disk(original, orig_proto), provider, threads)  # checked
    orig = ingest.skeleton(orig_proto)  # its graph and inputs: the weights are not needed again
    del orig_proto
    comp_proto = ingest.load(compressed)
    sess_c = runtime.session(runtime.on_disk(compressed, comp_proto), provider, threads)
    labels = None
    counted_at = read_metadata(comp_proto).get("input_shapes")
    if data is not None:
        from onnxecc.graph.data import load_for_model

        ds = load_for_model(data, orig, seed=seed)
        x = ds.x_test if len(ds.x_test) else ds.x_train
        labels = ds.y_test if len(ds.x_test) else ds.y_train
    else:
        shapes = resolve_shapes(orig, input_shapes or counted_at)
        x = runtime.example_input(sess_o, batch=min(samples, 64), seed=seed, model=orig, shapes=shapes)
    out_o, out_c = runtime.run_batched(sess_o, x), runtime.run_batched(sess_c, x)
    diff = np.abs(out_o - out_c)
    acc_o = acc_c = None
    if labels is not None:
        acc_o = float((out_o.argmax(1) == labels).mean())
        acc_c = float((out_c.argmax(1) == labels).mean())
    pair = runtime.measure_pair(sess_o, sess_c, x[:1])
    energy = _measure_energy(comp_proto, meter, sess_o, sess_c, x[:1]) if meter is not None else None
    budget = _budget_check(comp_proto, pair, hw, energy, counted_at)
    return ValidateResult(len(x), output_kind(out_o, class_axis).agreement(out_o, out_c), float(diff.max()),
                          float(diff.mean()), acc_o, acc_c, pair.a, pair.b, pair.ratio, provider, budget,
                          {"original": runtime.placement(sess_o), "compressed": runtime.placement(sess_c)})


def _measure_energy(model: onnx.ModelProto, spec: str, sess_o, sess_c, x: np.ndarray) -> tuple[runtime.Pair, str]:
    """Energy of the original (a) and the compressed model (b) measured side by side with the meter `spec`
    (`profiler.measure_pair`, one window per model and round), and the spec. The window the file records for the
    same meter is kept. A file without a measured energy budget is a UserError: --meter would re-check nothing."""
    from onnxecc.cost.profiler import measure_pair, recorded_meter

    meta = read_metadata(model)
    recorded = meta.get("meter") if isinstance(meta.get("meter"), dict) else None
    if meta.get("metric") != "energy" or recorded is None:
        raise UserError(f"--meter re-measures an energy budget set with an energy profile, and this file holds "
                        f"{'a ' + str(meta['metric']) + ' budget' if 'metric' in meta else 'no onnxecc budget'}: "
                        "leave out --meter")
    description = recorded if recorded.get("spec") == spec else {"spec": spec}
    feed_o, feed_c = runtime.feed(sess_o, x), runtime.feed(sess_c, x)
    with recorded_meter(description, "leave out --meter (the budget is then reported as not re-checked)") as m:
        pair = measure_pair(m, lambda: sess_o.run(None, feed_o), lambda: sess_c.run(None, feed_c), ENERGY_ROUNDS,
                            repeats=1, warmup=10)
    return pair, spec


ENERGY_ROUNDS = 5  # side-by-side rounds of an energy re-check (as many as the latency measurement's)


def _budget_check(model: onnx.ModelProto, latency: runtime.Pair, hw=None,
                  energy: tuple[runtime.Pair, str] | None = None, input_shapes=None) -> dict:
    """The budget in the file's metadata, checked again. MACs and params: counted on the file. Latency: a budget
    given as a fraction of the original is checked as the ratio of the two latencies measured side by side (the
    median of per-round ratios, `runtime.Pair`, as compress's closed loop checks it: an absolute time from another
    run of a shared machine drifts by 20 %), an absolute one against the compressed model's median. Energy:
    modelled again with `hw`, which must be the hardware file the model was compressed for (its SHA-256 is in the
    metadata); measured (a budget set with an energy profile: the file records its meter) with `energy`, the pair
    `_measure_energy` measured, judged as latency is; without it, not re-checked ("needs the meter")."""
    meta = read_metadata(model)
    if "metric" not in meta or "budget" not in meta:
        return {}
    metric, budget = meta["metric"], float(meta["budget"])
    cost = analytic_cost(model, metric, input_shapes)  # at compress's size (`input_shapes` from the metadata)
    how = "counted" + (f" at {shapes_text(input_shapes)}" if input_shapes else "")
    if cost is None and metric == "latency":
        fraction = _fraction(meta.get("budget_text"), metric)
        if fraction is not None:
            ratio = latency.ratio
            return {"metric": metric, "budget": budget, "fraction": fraction, "ratio": ratio,
                    "cost": latency.b.median_s, "how": "measured side by side with the original: latency ratio",
                    "meets_budget": ratio <= fraction}
        cost, how = latency.b.median_s, "measured"
    if cost is None and metric == "energy" and isinstance(meta.get("meter"), dict):  # measured with a meter
        spec = meta["meter"].get("spec")
        if energy is None:
            return {"metric": metric, "budget": budget, "cost": None, "meets_budget": None, "meter": spec,
                    "note": f"not re-checked: needs the meter it was measured with (pass --meter '{spec}' where it "
                            "runs)"}
        pair, used = energy
        out = {"metric": metric, "budget": budget, "meter": used, "ratios": [float(r) for r in pair.ratios]}
        fraction = _fraction(meta.get("budget_text"), metric)
        if fraction is not None:
            return out | {"fraction": fraction, "ratio": pair.ratio, "cost": pair.b.median_s,
                          "how": f"measured with {used} side by side with the original: energy ratio",
                          "meets_budget": pair.ratio <= fraction}
        return out | {"cost": pair.b.median_s, "how": f"measured with {used}",
                      "meets_budget": pair.b.median_s <= budget}
    if cost is None and metric == "energy" and hw is not None and "hardware_sha256" in meta:
        if meta["hardware_sha256"] != hw.sha256:
            raise UserError(f"the compressed model's energy budget was set for hardware {meta.get('hardware')!r} "
                            f"(file SHA-256 {meta['hardware_sha256'][:12]}…), not {hw.source} ({hw.sha256[:12]}…): "
                            "pass the --hardware file it was compressed with")
        from onnxecc.cost.hardware import model_energy

        cost, how = model_energy(model, hw).joules, f"modelled for {hw.name}"
    if cost is None:
        hint = " (pass --hardware H.json, the file it was compressed for)" if metric == "energy" else ""
        return {"metric": metric, "budget": budget, "cost": None, "meets_budget": None,
                "note": f"{metric} cannot be re-measured here{hint}; see the compress report"}
    return {"metric": metric, "budget": budget, "cost": cost, "how": how, "meets_budget": cost <= budget}


def _fraction(text, metric: str) -> float | None:
    """The budget's fraction of the original cost when it was given as one (`--budget 0.3`), else None."""
    if not isinstance(text, str):
        return None
    try:
        return parse_budget(text, metric).fraction
    except UserError:
        return None
