"""Precision as a second knob (issue #11): int8 QDQ layers chosen by measurement, under the same latency budget.

Real onnxruntime throughout (quantization, sessions, timings); the choice and the cost scaling are also checked as
pure functions on given measurements.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import DEMO_MODELS, REPO

from onnxecc import ingest, runtime
from onnxecc.analysis import analyse
from onnxecc.compress import CompressOptions, compress, cost_model
from onnxecc.data import load_digits
from onnxecc.errors import UserError
from onnxecc.precision import scaled_cost
from onnxecc.profiler import load_profile
from onnxecc.quantize import (
    PrecisionProfile,
    candidates,
    choose_layers,
    glue_nodes,
    int8_nodes,
    measure_precision,
    parse_knobs,
    quantize_layers,
)

CNN = DEMO_MODELS[0]
PROFILE = REPO / "profiles" / "digits_cnn.cpu.json"


@pytest.fixture(scope="module")
def digits():
    return load_digits(0)


def test_qdq_output_runs_in_ort_and_agrees_with_fp32(digits):
    model = ingest.load(CNN)
    names = candidates(model)
    assert len(names) == 5  # 3 convs, 2 Gemms
    q = quantize_layers(model, digits.x_train[:128], names)
    onnx.checker.check_model(q)
    assert sorted(int8_nodes(q)) == sorted(names)
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    out_f = runtime.run_batched(runtime.session(model), digits.x_test)
    out_q = runtime.run_batched(runtime.session(q), digits.x_test)
    assert (out_f.argmax(1) == out_q.argmax(1)).mean() >= 0.95
    # the quantized model's weights are int8 initializers (4× smaller than fp32)
    int8 = [t for t in q.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(int8) == len(names)


def test_subset_leaves_other_layers_fp32_and_glue_follows(digits):
    model = ingest.load(CNN)
    names = candidates(model)
    q = quantize_layers(model, digits.x_train[:64], names[1:3])
    assert sorted(int8_nodes(q)) == sorted(names[1:3])
    # the Relu after an int8 conv is quantized with it; the first conv's Relu is not (its input is fp32)
    glue = glue_nodes(model, names[1:3])
    assert "/features/features.5/Relu" in glue and "/features/features.2/Relu" not in glue
    assert quantize_layers(model, digits.x_train[:8], []).SerializeToString() == model.SerializeToString()


def test_choice_avoids_a_layer_whose_int8_is_slower():
    t = 100e-6
    savings = {"faster": (10e-6, 1e-6), "slower": (-8e-6, 1e-6), "noise": (1.5e-6, 2e-6), "tiny": (0.1e-6, 0.01e-6)}
    choice = choose_layers(savings, t, min_saving=0.002)
    assert choice["faster"][0] and "faster" in choice["faster"][1]
    assert not choice["slower"][0] and "SLOWER" in choice["slower"][1]
    assert not choice["noise"][0] and "noise" in choice["noise"][1]
    assert not choice["tiny"][0]  # 0.1 µs < 0.2% of 100 µs


def test_measured_choice_on_digits_cnn(digits, tmp_path):
    """One real measurement: every candidate gets a measured saving; the choice is `choose_layers` of it; the
    chosen set measured as a whole is faster than fp32 (or nothing is chosen); the JSON round-trips."""
    model = ingest.load(CNN)
    prof = measure_precision(model, digits.x_train[:64])
    assert set(prof.layers) == set(candidates(model))
    savings = {n: (v["saving_s"], v["noise_s"]) for n, v in prof.layers.items()}
    expected = {n for n, (ok, _) in choose_layers(savings, prof.fp32_s, prof.min_saving).items() if ok}
    assert set(prof.chosen) <= expected
    for name in prof.chosen:
        assert prof.layers[name]["saving_s"] > 0
    assert prof.ratio < 1 or not prof.chosen
    back = PrecisionProfile.load(prof.save(tmp_path / "p.json"))
    assert back.chosen == prof.chosen and back.as_dict() == prof.as_dict()
    json.loads((tmp_path / "p.json").read_text())  # plain JSON, no pickle


def test_scaled_cost_matches_the_measured_ratio_at_full_width():
    proto = ingest.load(CNN)
    a = analyse(proto, "compress")
    prof = load_profile(PROFILE, proto)
    cost = cost_model("latency", proto, a.graph, a.layers, a.variables, prof)
    names = [layer.name for layer in a.layers]
    t = 50e-6
    layers = {n: {"int8": n in names[1:3], "saving_s": 10e-6 if n in names[1:3] else -1e-6, "noise_s": 0.1e-6,
                  "reason": ""} for n in names}
    measured = PrecisionProfile("CPUExecutionProvider", 1, t, 0.7 * t, 0.6 * t, layers)
    scaled, factors = scaled_cost(cost, prof, proto, a.graph, a.layers, a.variables, measured)
    assert set(factors) == set(names[1:3])
    assert scaled(None) == pytest.approx(0.6 * cost(None), rel=1e-9)
    assert all(term.coef >= 0 for term in scaled.terms) and scaled.constant >= 0
    # cheaper at every width: the budget buys more width
    rng = np.random.default_rng(0)
    for _ in range(20):
        w = {v: int(rng.integers(1, f + 1)) for v, f in cost.full_widths.items()}
        assert scaled(w) <= cost(w) + 1e-15
    # nothing int8: the cost is unchanged
    fp32_only = {n: {**v, "int8": False} for n, v in layers.items()}
    none = PrecisionProfile("CPUExecutionProvider", 1, t, 0.7 * t, t, fp32_only)
    assert scaled_cost(cost, prof, proto, a.graph, a.layers, a.variables, none)[0] is cost


def test_knobs_are_checked():
    assert parse_knobs("width,precision") == ("width", "precision")
    assert parse_knobs(["precision", "width"]) == ("width", "precision")
    with pytest.raises(UserError, match="unknown knob"):
        parse_knobs("width,bits")
    with pytest.raises(UserError, match="--data"):
        compress(CNN, "0.5", None, CompressOptions(metric="latency", profile=str(PROFILE),
                                                   knobs=("width", "precision")))
    with pytest.raises(UserError, match="--metric latency"):
        compress(CNN, "0.5", None, CompressOptions(metric="macs", data="digits", knobs=("width", "precision")))


def test_cli_precision_without_data_is_a_one_line_user_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "onnxecc", "compress", str(CNN), "--budget", "0.5", "--metric",
                           "latency", "--profile", str(PROFILE), "--knobs", "width,precision", "-o",
                           str(tmp_path / "out.onnx")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "--data" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_compress_width_precision_meets_the_budget_by_measurement(tmp_path, digits):
    """The QDQ output is written, valid, run by ORT, and measured within the budget by the closed loop."""
    out, report = tmp_path / "q.onnx", tmp_path / "q.json"
    result = compress(CNN, "0.6", out, CompressOptions(metric="latency", profile=str(PROFILE), data="digits",
                                                       method="project", epochs=0,
                                                       knobs=("width", "precision")), report=report)
    assert result.meets_budget and result.output == out
    chosen = result.rounds[-1] if not any(r.get("selected") for r in result.rounds) else \
        next(r for r in result.rounds if r.get("selected"))
    assert chosen["meets"] and chosen["measured"] <= chosen["budget"]
    model = onnx.load(out)
    onnx.checker.check_model(model)
    section = json.loads(report.read_text())["precision"]
    assert sorted(section["int8_layers"]) == sorted(int8_nodes(model))
    assert any("quantization-aware" in item for item in section["not_done"])
    assert "fp32" in section["fine_tuning"]
    for name, layer in section["measured"]["layers"].items():
        assert layer["precision"] == ("int8" if name in section["int8_layers"] else "fp32") and layer["reason"]
    sess = runtime.session(model)
    agree = (runtime.run_batched(runtime.session(ingest.load(CNN)), digits.x_test).argmax(1)
             == runtime.run_batched(sess, digits.x_test).argmax(1)).mean()
    assert agree == pytest.approx(result.agreement)
