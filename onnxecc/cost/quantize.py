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
  slower than fp32 while a chain of int8 layers is faster). Which layers go int8 is decided on whole sets
  (`candidate_sets`): the layers faster one by one, and every layer but those measured slower, each timed
  against fp32; the fastest wins, a smaller one within the noise of it preferred (`choose_set`); nothing goes
  int8 when no set is faster. The result is a `PrecisionProfile` (JSON, never pickle).
- `PrecisionPlan` (built by `plan_precision` for `compress --knobs width,precision`): the measured choice, the
  latency cost model with the int8 layers' terms scaled down (`onnxecc.cost.precision.scaled_cost`: the width problem
  stays the same bilinear knapsack, so the budget buys more width), and `apply(model)`: quantize a pruned,
  fine-tuned model's chosen layers with calibration on `--data`.

Torch side: `onnxecc.train.qat` — quantization-aware fine-tuning of the chosen layers (`--qat`, default on).

Which layers QAT trains: the full-width choice measured again on the round's pruned model *before* the
fine-tuning (`PrecisionPlan.choose_at`), so the trained layers are the quantized ones. `compress` also times it at
the widths it plans for a round before the round trains; none of it saving there → `Int8Dropped`, and the round
runs as width alone.

What this does not do (the report says so, `NOT_DONE`): QAT does not model the int8 layers' *output*
requantization or int32 bias rounding; precision is a knob of measured latency budgets only; `--method wsp` has
its own int8 path (the hardware file's 8-bit energies, `onnxecc.methods.wsp`), with fp32 training and post-training
quantization.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxecc.core import atomic
from onnxecc.core.errors import UnsupportedModelError, UserError
from onnxecc.graph import runtime
from onnxecc.graph.inputs import graph_inputs, symbolic
from onnxecc.graph.layers import find_layers, node_name

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
    "quantization-aware training models the int8 layers' weights and input activations only: their output "
    "requantization (where an int8 chain feeds an fp32 layer), int32 bias rounding and onnxruntime's Conv+Relu "
    "range fusion are not fake-quantized",
    "precision as a knob of MACs or params budgets, or of a measured energy profile: not implemented (measured "
    "latency here; modelled energy via --method wsp --hardware H.json)",
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
                        "--profile P.json, or modelled energy with --method wsp --hardware H.json (int8 changes no "
                        "MACs or parameter count)")


def check_inputs(model: onnx.ModelProto) -> None:
    """int8 calibration here feeds one float input of one size: say so for any other model (not implemented)."""

    inputs = graph_inputs(model)
    if len(inputs) != 1 or inputs[0].dtype.kind != "f" or symbolic(model):
        kinds = ", ".join(f"{i.name} ({i.dtype})" for i in inputs)
        raise UnsupportedModelError(f"--knobs precision calibrates int8 layers on one float input of a fixed size; "
                                    f"this model takes {kinds}{' of symbolic sizes' if symbolic(model) else ''}: "
                                    "not implemented, use --knobs width")


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
    return [layer.name for layer in find_layers(named(model)) if layer.op in CANDIDATE_OPS and layer.weight]


class _Reader:
    """A `CalibrationDataReader` over a numpy array, in batches; a model with a fixed batch size (`fixed`) gets
    exactly that many samples each time (the last batch padded with copies of its last sample)."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 32, fixed: int | None = None):
        from onnxecc.graph.runtime import to_batch

        batch = fixed or batch
        self._it = iter([{name: to_batch(x[i:i + batch], fixed) if fixed else x[i:i + batch]}
                         for i in range(0, len(x), batch)])

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
            reader = _Reader(src.graph.input[0].name, x, fixed=graph_inputs(src)[0].fixed_batch)
            quantize_static(str(src_path), str(out_path), reader,
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
    sets: dict[str, dict] = field(default_factory=dict)  # label -> layers (count), ratio: the int8 sets timed whole

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
                "int8_layers": self.chosen, "sets": self.sets,
                "layers": {n: {"int8": v["int8"], "saving_ms": _ms(v["saving_s"]), "noise_ms": _ms(v["noise_s"]),
                               "saving_fraction": None if v["saving_s"] is None else v["saving_s"] / self.fp32_s,
                               "reason": v["reason"]}
                           for n, v in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> PrecisionProfile:
        return cls(d["provider"], int(d["threads"]), d["fp32_ms"] / 1e3, d["int8_all_ms"] / 1e3, d["chosen_ms"] / 1e3,
                   {n: {"int8": bool(v["int8"]), "saving_s": _s(v["saving_ms"]),
                        "noise_s": _s(v["noise_ms"]), "reason": v["reason"]} for n, v in d["layers"].items()},
                   float(d.get("min_saving", MIN_SAVING)), int(d.get("calibration_samples", 0)),
                   {k: {"layers": int(v["layers"]), "ratio": float(v["ratio"])} for k, v in d.get("sets", {}).items()})

    def save(self, path: str | os.PathLike) -> Path:
        return atomic.write_json(path, self.as_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PrecisionProfile:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: not a precision measurement JSON ({exc})") from None


def _floor(noise_s: float, reference_s: float, min_saving: float) -> float:
    """A saving (or loss) smaller than this is not told from none: the noise, or `min_saving` of `reference_s`."""
    return max(noise_s, min_saving * reference_s)


def _sign(saving_s: float, noise_s: float, reference_s: float, min_saving: float) -> int:
    """1: int8 measured faster, -1: slower, 0: not told apart (`_floor`) — the one rule behind `choose_layers`'
    verdicts and `candidate_sets`' sets."""
    floor = _floor(noise_s, reference_s, min_saving)
    return 1 if saving_s > floor else -1 if saving_s < -floor else 0


def _ms(seconds: float | None) -> float | None:  # None: a saving not measured one by one (`measure_precision`)
    return None if seconds is None else seconds * 1e3


def _s(ms: float | None) -> float | None:
    return None if ms is None else ms / 1e3


def choose_layers(savings: dict[str, tuple[float, float]], reference_s: float,
                  min_saving: float = MIN_SAVING) -> dict[str, tuple[bool, str]]:
    """Pure verdict per layer: `savings[name] = (saving_s, noise_s)` — the measured latency with the layer in fp32
    minus with it in int8 (negative: int8 is slower) and the noise of that difference. A layer is faster in int8
    when its saving exceeds both the noise and `min_saving` × `reference_s` (the fp32 model's latency). → name →
    (faster?, why). Which layers run int8 is decided on sets (`candidate_sets`, `choose_set`)."""
    out = {}
    for name, (saving, noise) in savings.items():
        pct = 100 * saving / reference_s
        sign = _sign(saving, noise, reference_s, min_saving)
        if sign > 0:
            out[name] = (True, f"int8 measured {saving * 1e6:.1f} µs faster ({pct:.1f}% of the fp32 latency; "
                               f"noise {noise * 1e6:.1f} µs)")
        elif sign < 0:
            out[name] = (False, f"int8 measured {-saving * 1e6:.1f} µs SLOWER than fp32 ({-pct:.1f}%): kept fp32")
        else:
            floor = _floor(noise, reference_s, min_saving)
            out[name] = (False, f"saving {saving * 1e6:.1f} µs is within the noise / {100 * min_saving:.1f}% floor "
                                f"({floor * 1e6:.1f} µs)")
    return out


FASTER, ALL_BUT_SLOWER = "faster one by one", "all but the slower"


def candidate_sets(savings: dict[str, tuple[float, float]], reference_s: float,
                   min_saving: float = MIN_SAVING) -> dict[str, list[str]]:
    """The int8 sets worth timing as a whole (distinct, non-empty): the layers faster one by one, and every layer
    but those measured slower. Why both: each marginal saving is measured with every other candidate in int8, so
    a layer within the noise there is what keeps its neighbours' chain int8 — dropping it splits the chain with
    Quantize/Dequantize pairs (mobilenet_v2 on ORT CPU: its 26 layers faster one by one ran 0.98× fp32 together,
    all 53 0.68×); and a chain is not always the faster (resnet18: its 11 faster layers 0.55×, 20 of 21 0.63×)."""
    signs = {n: _sign(s, z, reference_s, min_saving) for n, (s, z) in savings.items()}
    faster = [n for n, sign in signs.items() if sign > 0]
    kept = [n for n, sign in signs.items() if sign >= 0]
    sets = {FASTER: faster} if faster else {}
    if kept and kept != faster:
        sets[ALL_BUT_SLOWER] = kept
    return sets


def choose_set(ratios: dict[str, float], sizes: dict[str, int], tolerance: float) -> str | None:
    """Pure choice among measured sets (`ratios`: latency over fp32's, side by side): the fastest, or a smaller
    set within `tolerance` of it (fewer int8 layers, less quantization error, for no measurable speed); None when
    no set is faster than fp32 by more than `tolerance`."""
    ok = {k: r for k, r in ratios.items() if r < 1 - tolerance}
    if not ok:
        return None
    best = min(ok.values())
    return min((k for k, r in ok.items() if r <= best + tolerance), key=lambda k: (sizes[k], ok[k]))


def _repeats(sess, x: np.ndarray) -> int:
    probe = runtime.measure_latency(sess, x, warmup=2, repeats=3).median_s
    return int(np.clip(MEASURE_ROUND_S / max(probe, 1e-9), 20, 200))


def _pair(a, b, x: np.ndarray, repeats: int, rounds: int = 5) -> runtime.Pair:
    """`runtime.measure_pair`, measured again (up to twice) when its ratio is noisy; the steadier kept."""
    return runtime.steadiest_pair(a, b, x, rounds, repeats, noisy=0.05)[0]


def measure_precision(model: onnx.ModelProto, calibration_x: np.ndarray, provider: str = "CPUExecutionProvider",
                      threads: int = 1, x: np.ndarray | None = None, min_saving: float = MIN_SAVING,
                      on_layer=None, only=None) -> PrecisionProfile:
    """Measure what int8 saves per layer of `model` on `provider` (see the module doc) and choose the int8 set.
    One float input of a fixed size only (`check_inputs`).

    Every comparison is two sessions timed side by side (`runtime.measure_pair`, interleaved rounds), so a drift
    of the machine hits both. `x` (batch 1; default the first calibration sample) is the timed input.

    `only` (the set chosen before, on the full model): measured again as one set on `model` (pruned), kept or
    dropped whole — the cost model priced that set, and one by one the noise split resnet18's 11-layer chain into
    subsets of 3–8 that ran 0.80–0.87× fp32 where all 11 ran 0.56–0.60×. Its layers' savings are then not measured
    one by one (None)."""
    check_inputs(model)
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
        quantized = lambda layers: sess(quantize_layers(src, calibration_x, layers, cache=cache))  # noqa: E731
        all_int8 = quantized(names)
        repeats = _repeats(fp32, x)
        p_all = _pair(fp32, all_int8, x, repeats)
        if only is not None:
            return _set_verdict(provider, threads, p_all, names, min_saving, len(calibration_x))
        t_fp32 = p_all.a.median_s
        savings = {}
        for i, name in enumerate(names):
            rest = [n for n in names if n != name]
            p = _pair(all_int8, quantized(rest) if rest else fp32, x, repeats)  # the layer back in fp32 / all int8
            savings[name] = ((p.ratio - 1) * p.a.median_s, p.ratio_iqr * p.a.median_s)
            if on_layer is not None:
                on_layer(i + 1, len(names), name, savings[name])
        sets = candidate_sets(savings, t_fp32, min_saving)
        ratios, noise = {}, p_all.ratio_iqr
        for label, layers in sets.items():
            if layers == names:
                ratios[label] = p_all.ratio
            else:
                p = _pair(fp32, quantized(layers), x, repeats)
                ratios[label], noise = p.ratio, max(noise, p.ratio_iqr)
    pick = choose_set(ratios, {k: len(v) for k, v in sets.items()}, max(min_saving, noise))
    chosen = set(sets[pick]) if pick is not None else set()
    verdict = choose_layers(savings, t_fp32, min_saving)
    measured = "; ".join(f"{k} ({len(sets[k])}): {r:.3f}×" for k, r in ratios.items())
    layers = {}
    for n in names:
        faster, why = verdict[n]
        if n in chosen and not faster:
            why += f"; int8 with the set '{pick}', which measured fastest as a whole ({measured} fp32)"
        elif n not in chosen and faster:
            why += (f"; but no set with it measured faster than fp32 ({measured}): kept fp32" if pick is None else
                    f"; but the set '{pick}' measured faster without it ({measured} fp32): kept fp32")
        elif n not in chosen and "kept fp32" not in why:
            why += ": kept fp32"
        layers[n] = {"int8": n in chosen, "saving_s": savings[n][0], "noise_s": savings[n][1], "reason": why}
    chosen_s = ratios[pick] * t_fp32 if pick is not None else t_fp32  # on the first pair's scale
    return PrecisionProfile(provider, threads, t_fp32, p_all.ratio * t_fp32, chosen_s, layers, min_saving,
                            len(calibration_x), {k: {"layers": len(v), "ratio": ratios[k]} for k, v in sets.items()})


def _set_verdict(provider: str, threads: int, pair: runtime.Pair, names: list[str], min_saving: float,
                 samples: int) -> PrecisionProfile:
    """`measure_precision(only=…)`: the set (`pair.b`) kept whole when it is faster than fp32 (`pair.a`) by more
    than the noise of the side-by-side ratio."""
    ratio, tolerance = pair.ratio, max(min_saving, pair.ratio_iqr)
    keep = ratio < 1 - tolerance
    why = (f"the {len(names)} layers chosen on the full model measured {ratio:.3f}× fp32 together here"
           + ("" if keep else f" (not faster by more than the noise, {tolerance:.1%}): kept fp32"))
    layers = {n: {"int8": keep, "saving_s": None, "noise_s": None, "reason": why} for n in names}
    t_fp32 = pair.a.median_s
    return PrecisionProfile(provider, threads, t_fp32, ratio * t_fp32, ratio * t_fp32 if keep else t_fp32, layers,
                            min_saving, samples, sets={"chosen before": {"layers": len(names), "ratio": ratio}})


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
class Int8Dropped(Exception):
    """The int8 set chosen at full width saved nothing at a round's widths (`PrecisionPlan.choose_at`, `apply`)
    while the fp32 model reaches the budget: those widths were bought with savings that pruning took away, so
    `compress` chooses them again with the fp32 latency model (width alone). Raised as early as the widths are
    known — before the round trains when it can — so the knob costs no training round when int8 does not pay
    (mobilenet_v2 at latency 0.3: measured after the fine-tuning, it cost a whole re-trained round). `keep`: the
    widths measured (None: the caller's); `model`: the pruned fp32 model; `when`: for the report."""

    def __init__(self, model: onnx.ModelProto, when: str, keep=None):
        super().__init__(f"int8 dropped {when}")
        self.model, self.when, self.keep = model, when, keep


@dataclass
class PrecisionPlan:
    """What `compress --knobs width,precision` does with precision: the measured choice, the scaled cost model,
    and the calibration data used to quantize each closed-loop round's output."""

    measured: PrecisionProfile
    cost: object  # BilinearCost: the latency model with the int8 layers' terms scaled (`onnxecc.cost.precision`)
    factors: dict[str, float]  # layer -> factor on its latency term (1: fp32)
    calibration_x: np.ndarray
    rounds: list[dict] = field(default_factory=list)  # per closed-loop round: the choice measured on its output
    qat: list[str] | None = None  # the layers the last fine-tuning trained under fake quantization (None: no QAT)
    qat_epochs: tuple[int, int] = (0, 0)  # (fine-tuning epochs, the last ones of them under fake quantization)
    trained: bool = False  # a fine-tuning ran (with or without QAT)
    qat_off: bool = False  # a fine-tuning ran with QAT turned off (--no-qat)
    source: str = ""  # where the full-width measurement came from: the profile's precision section, or measured now
    correction: dict | None = None  # the int8 cost model refitted at the profile's pruned-width int8 samples
    fallbacks: list = field(default_factory=list)  # (cost, what) to use when `cost` cannot reach the budget
    at_widths: list[str] | None = None  # this round's int8 layers, measured at its widths before the fine-tuning
    fp32_reaches: bool = False  # the fp32 model reaches the budget: width alone is the fallback (`Int8Dropped`)
    _measured_at: tuple = ()  # (weight shapes, choice) of the last `_measure_at`: the same widths are not re-timed
    # runs a measurement once and gives every training process its result (`train.distributed.on_main` under
    # DDP, passed in by compress: this stage does not know the processes); None: here, in this one
    once: Callable | None = None

    def reachable_cost(self, check):
        """The first of `cost` and the `fallbacks` that `check(cost)` (compress's reachability check, raising
        UserError) accepts. Why: the pruned-width correction models the fixed int8 overhead, which makes int8
        slower than fp32 at the smallest widths — but there `apply` keeps those layers fp32, so the true cost is
        the lower of the two, which one bilinear model cannot express; a budget only the fp32 model reaches is
        not unreachable (digits_resdw at 0.5). The last error is raised when none does."""
        for k, (c, what) in enumerate([(self.cost, ""), *self.fallbacks]):
            try:
                check(c)
            except UserError:
                if k == len(self.fallbacks):
                    raise
                continue
            if what:
                self.correction = {**(self.correction or {}), "fallback": f"budget below the reachable cost of the "
                                   f"corrected int8 model: the width problem used {what}"}
                self.cost = c
            return c

    def choose_at(self, model: onnx.ModelProto, when: str, keep=None,
                  may_drop: bool = True) -> list[str]:
        """Measure, on `model` (pruned to this round's widths; its weights need not be trained: latency does
        not depend on their values), which of the full-width choice still save in int8 — before the fine-tuning,
        so QAT trains exactly the layers `apply` will quantize (measured after it, a layer dropped at the pruned
        widths had been fine-tuned for int8 and ran fp32: all 9 of digits_resdw's at latency 0.5). None left →
        `Int8Dropped` (unless `may_drop` is false: a resumed fine-tuning)."""
        self.at_widths = self._measure_at(model, when) if self.measured.chosen else []
        if may_drop:
            self._check_dropped(model, when, keep)
        return self.at_widths

    def _check_dropped(self, model: onnx.ModelProto, when: str, keep=None) -> None:
        if self.measured.chosen and not self.at_widths and self.fp32_reaches:
            raise Int8Dropped(model, when, keep)

    def _measure_at(self, model: onnx.ModelProto, when: str) -> list[str]:
        shapes = tuple(tuple(t.dims) for t in model.graph.initializer)
        if self._measured_at and self._measured_at[0] == shapes:  # the widths the round's plan already timed
            return list(self._measured_at[1])
        at = _once(self.once, lambda: measure_precision(  # one measurement: every rank quantizes the same layers
            model, self.calibration_x, self.measured.provider, self.measured.threads,
            min_saving=self.measured.min_saving, only=self.measured.chosen))
        self.rounds.append({**at.as_dict(), "when": when})
        self._measured_at = (shapes, list(at.chosen))
        return list(at.chosen)

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """`model` (pruned, fine-tuned) with int8 where it is faster *at these widths*: the layers `choose_at`
        measured before the fine-tuning, or, when it was not called (a round without training), the full-width
        choice measured again on `model` as one set against fp32 side by side (a saving at full width need not
        survive pruning); those go int8, calibrated on `model`. `model` itself (fp32) when the set does not save
        and the fp32 model cannot reach the budget; `Int8Dropped` when it can."""
        if not self.measured.chosen:
            return model
        if self.at_widths is None:
            self.at_widths = self._measure_at(model, "at the output's widths")
            self._check_dropped(model, "at the output's widths")
        chosen, self.at_widths = self.at_widths, None
        return quantize_layers(model, self.calibration_x, chosen) if chosen else model

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
                if name in (self.qat or []):
                    v["reason"] += " (its weights were fine-tuned under int8 fake quantization all the same)"
        return {
            "knobs": list(KNOBS),
            "format": "QDQ (onnxruntime.quantization static, MinMax calibration): per-channel int8 weights, uint8 "
                      "activations",
            "fine_tuning": self.fine_tuning(),
            "qat_layers": self.qat or [],
            "choice": "per layer, the latency with that layer back in fp32 minus with every candidate in int8, "
                      "measured side by side on the full model: the marginal saving in context; then whole sets "
                      "timed against fp32 (the layers faster one by one by more than the noise and "
                      f"{100 * self.measured.min_saving:.1f}% of the fp32 latency; every layer but those measured "
                      "slower): the fastest, or a smaller one within the noise of it; on each closed-loop round's "
                      "pruned model that set is timed again and kept or dropped whole (at_output_widths)",
            "source": self.source, "correction_at_pruned_widths": self.correction,
            "measured": m, "int8_layers": applied, "at_output_widths": self.rounds,
            "not_done": ["quantization-aware training: off (--no-qat): fine-tuning ran in fp32", *NOT_DONE[1:]]
            if self.qat_off else NOT_DONE,
        }

    def fine_tuning(self) -> str:
        """One line for the report and the warning: how the int8 layers' weights were trained."""
        n = len(self.calibration_x)
        if self.qat:
            total, last = self.qat_epochs
            return (f"quantization-aware (QAT): the last {last} of {total} fine-tuning epochs ran with the weights "
                    f"of {len(self.qat)} int8 layer(s) fake-quantized per channel (symmetric int8) and their input "
                    f"activations per tensor (uint8, MinMax ranges over the {n} calibration samples, recomputed "
                    "after every epoch; the first epochs in fp32, so the pruned network recovers first); then "
                    "static quantization with the same scheme")
        if self.qat_off:
            return ("fp32 (--no-qat): the int8 layers are post-training static quantization of the fine-tuned "
                    f"weights, calibrated on {n} samples of --data")
        if self.trained:
            return "fp32: no layer was chosen int8 at full width, so there was nothing to fake-quantize"
        return (f"no fine-tuning: post-training static quantization of the fp32 weights, calibrated on {n} samples "
                "of --data")


def _once(once: Callable | None, measure: Callable):
    return measure() if once is None else once(measure)


def plan_precision(proto: onnx.ModelProto, analysis, cost, profile, data, opts, emit=None,
                   once: Callable | None = None) -> PrecisionPlan:
    """Measure int8 per layer of `proto` on `opts.provider` and scale the latency `cost` accordingly. `once`: see
    `PrecisionPlan.once`."""
    from onnxecc.cost.precision import correct_at_widths, scaled_cost

    if profile is None:
        raise UserError("--knobs precision needs a measured latency profile: pass --profile P.json")
    check_inputs(proto)
    x = np.asarray(data.x_train[:CALIBRATION_SAMPLES], dtype=np.float32)
    if emit is not None:
        emit("stage", {"name": "precision"})
    measured = stored_precision(profile, proto)
    if measured is not None:
        source = (f"profile {profile.path}: measured by `onnxecc profile --knobs width,precision` on "
                  f"{measured.provider}, {measured.threads} thread(s) (calibration: "
                  f"{profile.precision.get('calibration', '?')}); not measured again at full width")
    else:  # measured on rank 0 only: under DDP every rank must fake-quantize (QAT) and scale the same layers
        measured = _once(once, lambda: measure_precision_cached(proto, x, opts.provider, opts.threads))
        source = (f"measured at compress time on {measured.provider}, {measured.threads} thread(s) (the profile "
                  "has no precision section: `onnxecc profile --knobs width,precision` stores one)")
    scaled, factors = scaled_cost(cost, profile, proto, analysis.graph, analysis.layers, analysis.variables,
                                  measured)
    samples = (getattr(profile, "precision", None) or {}).get("samples", []) if source.startswith("profile") else []
    corrected, correction = correct_at_widths(scaled, cost, samples)
    return PrecisionPlan(measured, corrected, factors, x, source=source, correction=correction, once=once,
                         fallbacks=[(scaled, "the int8 model without the pruned-width correction"),
                                    (cost, "the fp32 model (int8 still applied where measured faster)")])


def stored_precision(profile, proto: onnx.ModelProto) -> PrecisionProfile | None:
    """The int8 measurement stored in `profile` (its `precision` section), or None when it has none. The store
    checked fingerprint, provider and threads against the profile (which compress checked against `proto`);
    here the layers: the section must measure exactly `proto`'s int8 candidates (UserError otherwise — a
    hand-edited or stale section is never used silently)."""
    sec = getattr(profile, "precision", None)
    if sec is None:
        return None
    want = set(candidates(proto))
    if set(sec["layers"]) != want:
        missing, extra = sorted(want - set(sec["layers"])), sorted(set(sec["layers"]) - want)
        raise UserError(f"profile {profile.path}: its precision section does not measure this model's int8 "
                        f"candidates (missing {', '.join(missing) or '-'}; not candidates {', '.join(extra) or '-'}): "
                        "re-run `onnxecc profile --knobs width,precision`")
    try:
        return PrecisionProfile.from_dict(sec)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"profile {profile.path}: its precision section is not valid ({exc}): re-run "
                        "`onnxecc profile --knobs width,precision`") from None
