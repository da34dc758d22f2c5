"""Quantization as a second knob: which compute layers run in int8, chosen by measurement (issue #11).

ONNX side (onnx, onnxruntime and its `quantization` package, numpy — no torch):

- `quantize_layers(model, x, nodes)`: post-training static quantization of the named Conv/Gemm/MatMul nodes to
  QDQ (per-channel int8 weights, uint8 activations: the U8S8 kernels ORT's CPU provider runs fastest on x86),
  calibrated (MinMax) on the numpy batch `x`. Every other node stays fp32. The QDQ model is what is written
  and what the closed loop measures.
- `measure_precision(model, x, provider, threads)`: on the target provider, the model with every candidate
  layer in int8 is timed side by side with the fp32 model; then, per layer, the model with that one layer back
  in fp32 side by side with the all-int8 model. The difference is the layer's *marginal* saving in context (it
  includes the Quantize/Dequantize boundaries it adds or removes, which is why a layer alone in int8 can be
  slower than fp32 while a chain of int8 layers is faster). `choose_layers` keeps the layers whose int8 is
  faster by more than the measurement noise; the chosen set is timed once more against fp32, and if it is not
  faster as a whole nothing goes int8. The result is a `PrecisionProfile` (JSON, never pickle).
- `PrecisionPlan` (built by `plan_precision` for `compress --knobs width,precision`): the measured choice, the
  latency cost model with the int8 layers' terms scaled down (`onnxecc.precision.scaled_cost`: the width problem
  stays the same bilinear knapsack, so the budget buys more width), and `apply(model)`: quantize a pruned,
  fine-tuned model's chosen layers with calibration on `--data`.

What this does not do (the report says so): fine-tuning is fp32 — no quantization-aware (fake-quant) training;
the known-hardware energy model (`--method wsp`) has no bit-width scaling; only latency budgets take int8.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxecc import atomic, runtime
from onnxecc.errors import UserError
from onnxecc.layers import find_layers, node_name

KNOBS = ("width", "precision")
CANDIDATE_OPS = ("Conv", "Gemm", "MatMul")
# ops between int8 layers that run int8 too when every activation input is int8 (a residual Add, the Relu after a
# conv, pooling, reshapes): without them each int8 layer is wrapped in its own Quantize/Dequantize pair and a
# residual network in int8 measured 1.28x fp32 on ORT CPU (digits_resdw), with them 0.95x.
GLUE_OPS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Add", "Mul", "Concat", "MaxPool", "AveragePool",
            "GlobalAveragePool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Pad", "Resize", "Split",
            "Slice")
CALIBRATION_SAMPLES = 128  # calibration inputs taken from --data (training split)
MIN_SAVING = 0.002  # a layer goes int8 only if it saves more than this share of the fp32 latency (and the noise)
MEASURE_ROUND_S = 0.03  # one measurement round of the reference model lasts at least this long (≥ 20 runs)
NOT_DONE = [
    "quantization-aware training: fine-tuning runs in fp32; the int8 layers are post-training static "
    "quantization of the fine-tuned weights",
    "bit-width energy scaling of the known-hardware model (--method wsp): not implemented",
    "precision as a knob of energy, MACs or params budgets: not implemented (latency only)",
]


def parse_knobs(knobs) -> tuple[str, ...]:
    """`"width,precision"` or a sequence → a tuple of known knobs (UserError for an unknown one)."""
    items = [k.strip() for k in (knobs.split(",") if isinstance(knobs, str) else knobs) if str(k).strip()]
    bad = [k for k in items if k not in KNOBS]
    if bad or not items:
        raise UserError(f"unknown knob '{','.join(bad) or knobs}': --knobs takes a comma-separated subset of "
                        f"{', '.join(KNOBS)}")
    if "width" not in items:
        raise UserError("--knobs must include width (precision alone is not supported yet): use width,precision")
    return tuple(k for k in KNOBS if k in items)


def check_knobs(opts) -> None:
    """The options `--knobs precision` needs: calibration data and a measured latency budget."""
    knobs = parse_knobs(opts.knobs)
    if "precision" not in knobs:
        return
    if not opts.data:
        raise UserError("--knobs precision calibrates int8 layers on data: pass --data (digits or FILE.npz)")
    if opts.metric != "latency" or opts.method == "wsp":
        raise UserError("--knobs precision chooses int8 layers by measured latency: use it with --metric latency "
                        "--profile P.json (int8 changes no MACs or parameter count, and --method wsp has no "
                        "bit-width model)")


# ---- quantization -----------------------------------------------------------------------------------------------
def named(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which every node has a name (`layers.node_name`: the names `find_layers` reports)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, node in enumerate(out.graph.node):
        if not node.name:
            node.name = node_name(node, i)
    return out


def candidates(model: onnx.ModelProto) -> list[str]:
    """Names of the compute layers that can go int8 (Conv, Gemm, MatMul with a constant weight)."""
    return [layer.name for layer in find_layers(named(model)) if layer.op in CANDIDATE_OPS]


class _Reader:
    """A `CalibrationDataReader` over a numpy array, in batches."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 32):
        self._it = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._it, None)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs a pre-processing hint through the root logger on every call: hide it."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_layers(model: onnx.ModelProto, calibration_x: np.ndarray, nodes, *,
                    cache: str | os.PathLike | None = None) -> onnx.ModelProto:
    """`model` with the compute nodes named in `nodes` quantized to int8 QDQ (see the module doc); a copy of
    `model` when `nodes` is empty. `cache`: a calibration-range JSON that onnxruntime writes on the first call
    and reads on later ones (same model, any subset of the nodes it was written for)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src = named(model)
    nodes = [str(n) for n in nodes]
    if not nodes:
        return src
    unknown = sorted(set(nodes) - {n.name for n in src.graph.node})
    if unknown:
        raise ValueError(f"no node named {', '.join(unknown)} in the model")
    x = np.ascontiguousarray(calibration_x, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="onnxecc-quant-") as tmp:
        src_path, out_path = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(src, str(src_path))
        with _quiet():
            quantize_static(str(src_path), str(out_path), _Reader(src.graph.input[0].name, x),
                            quant_format=QuantFormat.QDQ, op_types_to_quantize=None, per_channel=True,
                            reduce_range=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=nodes + glue_nodes(src, nodes), calibrate_method=CalibrationMethod.MinMax,
                            calibration_cache_path=str(cache) if cache is not None else None)
        out = onnx.load_model(str(out_path))
    keys = {p.key for p in out.metadata_props}
    for prop in src.metadata_props:
        if prop.key not in keys:
            out.metadata_props.add(key=prop.key, value=prop.value)
    return out


def glue_nodes(model: onnx.ModelProto, nodes) -> list[str]:
    """Nodes of `GLUE_OPS` whose every activation input is the output of an int8 layer in `nodes` (through other
    such nodes): quantized with them, so chains of int8 layers stay int8 (`model` with named nodes)."""
    chosen = set(nodes)
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    int8: set[str] = set()
    out = []
    for node in model.graph.node:
        acts = [i for i in node.input if i and i not in consts]
        if node.name in chosen:
            int8.update(node.output)
        elif node.op_type in GLUE_OPS and acts and all(i in int8 for i in acts):
            out.append(node.name)
            int8.update(node.output)
    return out


def int8_nodes(model: onnx.ModelProto) -> list[str]:
    """Compute nodes of a QDQ model whose weight comes through a DequantizeLinear (the int8 layers)."""
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [n.name for n in model.graph.node if n.op_type in CANDIDATE_OPS and len(n.input) > 1
            and n.input[1] in dq_out]


# ---- measurement ------------------------------------------------------------------------------------------------
@dataclass
class PrecisionProfile:
    """Measured int8 savings per layer on one provider (seconds; see `measure_precision`)."""

    provider: str
    threads: int
    fp32_s: float
    int8_all_s: float  # every candidate layer in int8
    chosen_s: float  # the chosen layers in int8 (= fp32_s when none)
    layers: dict[str, dict] = field(default_factory=dict)  # name -> saving_s, noise_s, int8, reason
    min_saving: float = MIN_SAVING
    calibration_samples: int = 0

    @property
    def chosen(self) -> list[str]:
        return [n for n, v in self.layers.items() if v["int8"]]

    @property
    def ratio(self) -> float:
        """Measured latency of the chosen int8 model over the fp32 model's, at full width."""
        return self.chosen_s / self.fp32_s

    def as_dict(self) -> dict:
        return {"provider": self.provider, "threads": self.threads, "fp32_ms": self.fp32_s * 1e3,
                "int8_all_ms": self.int8_all_s * 1e3, "chosen_ms": self.chosen_s * 1e3,
                "ratio_all_int8": self.int8_all_s / self.fp32_s, "ratio_chosen": self.ratio,
                "min_saving": self.min_saving, "calibration_samples": self.calibration_samples,
                "int8_layers": self.chosen,
                "layers": {n: {"int8": v["int8"], "saving_ms": v["saving_s"] * 1e3, "noise_ms": v["noise_s"] * 1e3,
                               "saving_fraction": v["saving_s"] / self.fp32_s, "reason": v["reason"]}
                           for n, v in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> PrecisionProfile:
        return cls(d["provider"], int(d["threads"]), d["fp32_ms"] / 1e3, d["int8_all_ms"] / 1e3, d["chosen_ms"] / 1e3,
                   {n: {"int8": bool(v["int8"]), "saving_s": v["saving_ms"] / 1e3, "noise_s": v["noise_ms"] / 1e3,
                        "reason": v["reason"]} for n, v in d["layers"].items()},
                   float(d.get("min_saving", MIN_SAVING)), int(d.get("calibration_samples", 0)))

    def save(self, path: str | os.PathLike) -> Path:
        return atomic.write_json(path, self.as_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PrecisionProfile:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: not a precision measurement JSON ({exc})") from None


def choose_layers(savings: dict[str, tuple[float, float]], reference_s: float,
                  min_saving: float = MIN_SAVING) -> dict[str, tuple[bool, str]]:
    """Pure choice: `savings[name] = (saving_s, noise_s)` — the measured latency with the layer in fp32 minus with
    it in int8 (negative: int8 is slower) and the noise of that difference. A layer goes int8 when its saving
    exceeds both the noise and `min_saving` × `reference_s` (the fp32 model's latency). → name → (int8?, why)."""
    out = {}
    for name, (saving, noise) in savings.items():
        floor = max(noise, min_saving * reference_s)
        pct = 100 * saving / reference_s
        if saving > floor:
            out[name] = (True, f"int8 measured {saving * 1e6:.1f} µs faster ({pct:.1f}% of the fp32 latency; "
                               f"noise {noise * 1e6:.1f} µs)")
        elif saving < -floor:
            out[name] = (False, f"int8 measured {-saving * 1e6:.1f} µs SLOWER than fp32 ({-pct:.1f}%): kept fp32")
        else:
            out[name] = (False, f"saving {saving * 1e6:.1f} µs is within the noise / {100 * min_saving:.1f}% floor "
                                f"({floor * 1e6:.1f} µs): kept fp32")
    return out


def _repeats(sess, x: np.ndarray) -> int:
    probe = runtime.measure_latency(sess, x, warmup=2, repeats=3).median_s
    return int(np.clip(MEASURE_ROUND_S / max(probe, 1e-9), 20, 200))


def _pair(a, b, x: np.ndarray, repeats: int, rounds: int = 5) -> tuple[runtime.Timing, runtime.Timing]:
    """`runtime.measure_pair`, measured again (up to twice) when either side is noisy; the steadier kept."""
    best = None
    for _ in range(3):
        ta, tb = runtime.measure_pair(a, b, x, rounds=rounds, repeats=repeats)
        noise = max(ta.iqr_s / ta.median_s, tb.iqr_s / tb.median_s)
        if best is None or noise < best[2]:
            best = (ta, tb, noise)
        if noise <= 0.05:
            break
    return best[0], best[1]


def measure_precision(model: onnx.ModelProto, calibration_x: np.ndarray, provider: str = "CPUExecutionProvider",
                      threads: int = 1, x: np.ndarray | None = None, min_saving: float = MIN_SAVING,
                      on_layer=None, only=None) -> PrecisionProfile:
    """Measure what int8 saves per layer of `model` on `provider` (see the module doc); choose the layers.

    Every comparison is two sessions timed side by side (`runtime.measure_pair`, interleaved rounds), so a drift
    of the machine hits both. `x` (batch 1; default the first calibration sample) is the timed input; `only`
    restricts the candidates to these layer names."""
    src = named(model)
    names = [n for n in candidates(src) if only is None or n in set(only)]
    x = np.ascontiguousarray(calibration_x[:1] if x is None else x, dtype=np.float32)
    sess = lambda m: runtime.session(m, provider, threads)  # noqa: E731
    fp32 = sess(src)
    if not names:
        t = runtime.measure_latency(fp32, x).median_s
        return PrecisionProfile(provider, threads, t, t, t, {}, min_saving, len(calibration_x))
    with tempfile.TemporaryDirectory(prefix="onnxecc-calib-") as tmp:
        cache = Path(tmp) / "ranges.json"
        all_int8 = sess(quantize_layers(src, calibration_x, names, cache=cache))
        repeats = _repeats(fp32, x)
        t_fp32, t_all = _pair(fp32, all_int8, x, repeats)
        savings = {}
        for i, name in enumerate(names):
            rest = [n for n in names if n != name]
            back = sess(quantize_layers(src, calibration_x, rest, cache=cache)) if rest else fp32
            t_int8, t_back = _pair(all_int8, back, x, repeats)
            savings[name] = (t_back.median_s - t_int8.median_s, float(np.hypot(t_int8.iqr_s, t_back.iqr_s)))
            if on_layer is not None:
                on_layer(i + 1, len(names), name, savings[name])
        choice = choose_layers(savings, t_fp32.median_s, min_saving)
        chosen = [n for n in names if choice[n][0]]
        t_chosen = t_all.median_s
        if chosen and chosen != names:
            t_ref, t_c = _pair(fp32, sess(quantize_layers(src, calibration_x, chosen, cache=cache)), x, repeats)
            t_chosen = t_c.median_s * t_fp32.median_s / t_ref.median_s  # on the scale of the first pair
    layers = {n: {"int8": choice[n][0], "saving_s": savings[n][0], "noise_s": savings[n][1], "reason": choice[n][1]}
              for n in names}
    prof = PrecisionProfile(provider, threads, t_fp32.median_s, t_all.median_s,
                            t_chosen if chosen else t_fp32.median_s, layers, min_saving, len(calibration_x))
    if chosen and prof.ratio >= 1 - min_saving:  # the chosen set as a whole is no faster: nothing goes int8
        for v in prof.layers.values():
            if v["int8"]:
                v["int8"] = False
                v["reason"] += f"; but the chosen layers together measured {prof.ratio:.3f}× fp32: kept fp32"
        prof.chosen_s = prof.fp32_s
    return prof


_MEMO: dict[tuple, PrecisionProfile] = {}  # in-process: one measurement per model, data, provider and threads


def measure_precision_cached(model: onnx.ModelProto, calibration_x: np.ndarray, provider: str, threads: int,
                             **kw) -> PrecisionProfile:
    h = hashlib.sha256(model.SerializeToString(deterministic=True))
    h.update(np.ascontiguousarray(calibration_x, dtype=np.float32).tobytes())
    key = (h.hexdigest(), provider, threads, tuple(sorted(kw.items())))
    if key not in _MEMO:
        _MEMO[key] = measure_precision(model, calibration_x, provider, threads, **kw)
    return copy.deepcopy(_MEMO[key])


# ---- the plan compress follows ----------------------------------------------------------------------------------
@dataclass
class PrecisionPlan:
    """What `compress --knobs width,precision` does with precision: the measured choice, the scaled cost model,
    and the calibration data used to quantize each closed-loop round's output."""

    measured: PrecisionProfile
    cost: object  # BilinearCost: the latency model with the int8 layers' terms scaled (`onnxecc.precision`)
    factors: dict[str, float]  # layer -> factor on its latency term (1: fp32)
    calibration_x: np.ndarray
    rounds: list[dict] = field(default_factory=list)  # per closed-loop round: the choice measured on its output

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """`model` (pruned, fine-tuned) with int8 where it is faster *at these widths*: the layers chosen on the
        full model are measured again on `model` (per layer in context, then the set against fp32 side by side;
        a saving at full width need not survive pruning), and those still faster go int8, calibrated on `model`.
        `model` itself (fp32) when none is."""
        if not self.measured.chosen:
            return model
        at = measure_precision(model, self.calibration_x, self.measured.provider, self.measured.threads,
                               min_saving=self.measured.min_saving, only=self.measured.chosen)
        self.rounds.append(at.as_dict())
        return quantize_layers(model, self.calibration_x, at.chosen) if at.chosen else model

    def as_dict(self, output: onnx.ModelProto | None = None) -> dict:
        """The report section; `output`: the model returned (its int8 layers are listed)."""
        m = self.measured.as_dict()
        for name, v in m["layers"].items():
            v["cost_factor"] = self.factors.get(name, 1.0)
        applied = int8_nodes(output) if output is not None else []
        for name, v in m["layers"].items():
            v["precision"] = "int8" if name in applied else "fp32"
            if v["int8"] and name not in applied:
                v["reason"] += "; measured again at the output's widths it did not save more than the noise: fp32"
        return {
            "knobs": list(KNOBS),
            "format": "QDQ (onnxruntime.quantization static, MinMax calibration): per-channel int8 weights, uint8 "
                      "activations",
            "fine_tuning": "fp32 (no quantization-aware training): the int8 layers are post-training static "
                           f"quantization of the fine-tuned weights, calibrated on {len(self.calibration_x)} "
                           "samples of --data",
            "choice": "per layer, the latency with that layer back in fp32 minus with every candidate in int8, "
                      "measured side by side on the full model and again on each closed-loop round's pruned model "
                      "(at_output_widths; only the layers chosen on the full model are candidates there): the "
                      "marginal saving in context; int8 where it is faster by more "
                      f"than the noise and {100 * self.measured.min_saving:.1f}% of the fp32 latency",
            "measured": m, "int8_layers": applied, "at_output_widths": self.rounds, "not_done": NOT_DONE,
        }


def plan_precision(proto: onnx.ModelProto, analysis, cost, profile, data, opts, emit=None) -> PrecisionPlan:
    """Measure int8 per layer of `proto` on `opts.provider` and scale the latency `cost` accordingly."""
    from onnxecc.precision import scaled_cost

    if profile is None:
        raise UserError("--knobs precision needs a measured latency profile: pass --profile P.json")
    x = np.asarray(data.x_train[:CALIBRATION_SAMPLES], dtype=np.float32)
    if emit is not None:
        emit("stage", {"name": "precision"})
    measured = measure_precision_cached(proto, x, opts.provider, opts.threads)
    scaled, factors = scaled_cost(cost, profile, proto, analysis.graph, analysis.layers, analysis.variables,
                                  measured)
    return PrecisionPlan(measured, scaled, factors, x)
