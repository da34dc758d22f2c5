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
from onnx import numpy_helper

from onnxecc.compress import CompressOptions, compress, cost_model
from onnxecc.core.errors import UserError
from onnxecc.cost import quantize
from onnxecc.cost.analysis import analyse
from onnxecc.cost.precision import scaled_cost
from onnxecc.cost.profiler import load_profile
from onnxecc.cost.quantize import (
    ALL_BUT_SLOWER,
    FASTER,
    PrecisionProfile,
    candidate_sets,
    candidates,
    choose_layers,
    choose_set,
    glue_nodes,
    int8_nodes,
    measure_precision,
    parse_knobs,
    quantize_layers,
)
from onnxecc.graph import ingest, runtime
from onnxecc.graph.data import load_digits
from onnxecc.train import checkpoint
from onnxecc.train.bridge import run_torch, to_torch
from onnxecc.train.checkpoint import Interrupted
from onnxecc.train.qat import fake_quantized, qat_start

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


def test_sets_timed_whole_keep_int8_chains_and_leave_slower_layers_out():
    t = 100e-6
    savings = {"a": (10e-6, 1e-6), "b": (1.5e-6, 2e-6), "slow": (-8e-6, 1e-6), "c": (12e-6, 1e-6)}
    sets = candidate_sets(savings, t, min_saving=0.002)
    assert sets == {FASTER: ["a", "c"], ALL_BUT_SLOWER: ["a", "b", "c"]}
    assert candidate_sets({"a": (10e-6, 1e-6)}, t) == {FASTER: ["a"]}  # the same set is timed once
    assert candidate_sets({"slow": (-8e-6, 1e-6)}, t) == {}
    sizes = {FASTER: 2, ALL_BUT_SLOWER: 3}
    # measured on ORT CPU (Intel Xeon): mobilenet_v2 faster-alone 0.98× vs the chain 0.68×; resnet18 0.55× vs 0.63×
    assert choose_set({FASTER: 0.98, ALL_BUT_SLOWER: 0.68}, sizes, 0.01) == ALL_BUT_SLOWER
    assert choose_set({FASTER: 0.55, ALL_BUT_SLOWER: 0.63}, sizes, 0.01) == FASTER
    assert choose_set({FASTER: 0.70, ALL_BUT_SLOWER: 0.69}, sizes, 0.02) == FASTER  # within the noise: fewer int8
    assert choose_set({FASTER: 0.995, ALL_BUT_SLOWER: 1.2}, sizes, 0.01) is None  # no set saves more than the noise
    assert choose_set({}, {}, 0.01) is None


def test_measured_choice_on_digits_cnn(digits, tmp_path):
    """One real measurement, checked against the file and against the documented rule written out here (not the
    product's `candidate_sets` / `choose_layers`): every Conv/Gemm of the file gets a measured saving; a layer is
    faster when its saving exceeds max(noise, min_saving × fp32 latency), slower when it is below minus that; the
    sets timed whole are the faster layers and all but the slower ones (distinct, non-empty); the int8 layers are
    one of them, measured below 1 − min_saving of fp32 (nothing when none is), never a slower layer, and exactly
    the layers whose weights the QDQ model of that set dequantizes; the JSON round-trips."""
    model = ingest.load(CNN)
    prof = measure_precision(model, digits.x_train[:64])
    in_file = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert list(prof.layers) == in_file and all(prof.layers[n]["saving_s"] is not None for n in in_file)

    def floor(n: str) -> float:
        return max(prof.layers[n]["noise_s"], prof.min_saving * prof.fp32_s)

    faster = [n for n in in_file if prof.layers[n]["saving_s"] > floor(n)]
    slower = {n for n in in_file if prof.layers[n]["saving_s"] < -floor(n)}
    all_but_slower = [n for n in in_file if n not in slower]
    expected = {FASTER: faster, ALL_BUT_SLOWER: all_but_slower} if all_but_slower != faster else {FASTER: faster}
    expected = {label: layers for label, layers in expected.items() if layers}
    assert {k: v["layers"] for k, v in prof.sets.items()} == {k: len(v) for k, v in expected.items()}
    ratios = {k: v["ratio"] for k, v in prof.sets.items()}
    for label, layers in expected.items():
        if layers == in_file:  # every layer int8: the first side-by-side pair, also recorded as int8_all
            assert ratios[label] == pytest.approx(prof.int8_all_s / prof.fp32_s)
    if prof.chosen:
        label = next(k for k, v in expected.items() if v == prof.chosen)
        assert prof.ratio == pytest.approx(ratios[label]) and prof.ratio < 1 - prof.min_saving
        assert ratios[label] <= min(ratios.values()) + 0.1  # the fastest, or a smaller set within the noise
        q = quantize_layers(model, digits.x_train[:64], prof.chosen)
        dequantized = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
        assert [n.name for n in q.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in dequantized] == \
            prof.chosen
    else:
        assert prof.ratio == 1.0 and all(r > 1 - prof.min_saving - 0.1 for r in ratios.values())
    assert not slower & set(prof.chosen)
    assert all(("SLOWER" in prof.layers[n]["reason"]) == (n in slower) for n in in_file)
    back = PrecisionProfile.load(prof.save(tmp_path / "p.json"))
    assert back.chosen == prof.chosen and _close(back.as_dict(), prof.as_dict())  # JSON keeps ms: last bits differ
    json.loads((tmp_path / "p.json").read_text())  # plain JSON, no pickle


def test_a_set_measured_again_is_kept_or_dropped_whole(digits):
    """`only` (a round's pruned model): the set is timed against fp32 as one; all its layers int8, or none, as
    the measured ratio says; the savings one by one are not measured (None in the JSON)."""
    model = ingest.load(CNN)
    names = candidates(model)[1:3]
    prof = measure_precision(model, digits.x_train[:32], only=names)
    assert sorted(prof.layers) == sorted(names)
    ratio = prof.sets["chosen before"]["ratio"]
    assert prof.int8_all_s / prof.fp32_s == pytest.approx(ratio)
    assert prof.chosen in ([], names) and (prof.chosen == names) == (ratio < 1 - prof.min_saving and prof.ratio < 1)
    assert all(v["saving_ms"] is None for v in prof.as_dict()["layers"].values())


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
    assert "fp32" in section["fine_tuning"] and section["qat_layers"] == []  # epochs=0: nothing trained
    for name, layer in section["measured"]["layers"].items():
        assert layer["precision"] == ("int8" if name in section["int8_layers"] else "fp32") and layer["reason"]
    sess = runtime.session(model)
    agree = (runtime.run_batched(runtime.session(ingest.load(CNN)), digits.x_test).argmax(1)
             == runtime.run_batched(sess, digits.x_test).argmax(1)).mean()
    assert agree == pytest.approx(result.agreement)


# ---- quantization-aware fine-tuning ------------------------------------------------------------------------------
CHOSEN = ["/features/features.3/Conv", "/features/features.7/Conv"]  # what this CPU measures faster in int8


def _dequantized_weights(q: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Independent of onnxecc: per int8 node of the QDQ model, the DequantizeLinear of its int8 weight
    initializer computed in numpy, (q − zp)·scale along the node's axis, and the scale broadcast (one step)."""
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    out = {}
    for node in q.graph.node:
        dq = producer.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type not in ("Conv", "Gemm", "MatMul") or dq is None or dq.op_type != "DequantizeLinear":
            continue
        w, scale, zero = (inits[i] for i in dq.input)
        assert w.dtype == np.int8 and not zero.any()  # symmetric int8
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        shape[axis] = -1
        step = np.broadcast_to(scale.reshape(shape), w.shape)
        out[node.name] = ((w.astype(np.float32) - zero.reshape(shape)) * step, step)
    return out


def test_fake_quant_weights_equal_what_the_qdq_model_dequantizes(digits):
    """Every candidate layer of both demo models: the torch fake-quantized weight equals the DequantizeLinear of
    the int8 initializer onnxruntime wrote (within one quantization step; in practice bit for bit), and the input
    activation's scale and zero point equal the QuantizeLinear's that feeds the layer."""
    for path in DEMO_MODELS:
        model = ingest.load(path)
        names = candidates(model)
        q = quantize_layers(model, digits.x_train[:128], names)
        deq = _dequantized_weights(q)
        inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
        producer = {o: n for n in q.graph.node for o in n.output}
        nodes = {n.name: n for n in q.graph.node}
        tm = to_torch(model)
        with fake_quantized(tm, names, digits.x_train[:128]) as fq:
            weights, acts = fq.weights(), fq.activation_qparams()
        assert set(weights) == set(names) == set(deq)
        for name in names:
            ref, step = deq[name]
            ours = weights[name]  # torch layout: an nn.Linear of a transB=1 Gemm is the ONNX layout too
            assert ours.shape == ref.shape, name
            assert np.all(np.abs(ours - ref) <= step * (1 + 1e-6)), name  # within one step ...
            assert np.mean(ours == ref) >= 0.999, name  # ... and in practice identical
            dq_in = producer[nodes[name].input[0]]  # the DequantizeLinear feeding the layer
            scale, zero = float(inits[dq_in.input[1]]), int(inits[dq_in.input[2]])
            assert acts[name][0] == pytest.approx(scale, rel=1e-5) and acts[name][1] == zero, name


def test_qat_torch_model_tracks_the_qdq_model_better_than_fp32(digits):
    """The torch model under fake quantization is closer to onnxruntime's QDQ model than the fp32 model is; and
    leaving the context restores the module exactly (same state keys, same fp32 outputs). Gradients reach the
    fp32 weights through the fake quantization (straight-through)."""
    import torch

    model = ingest.load(CNN)
    x = digits.x_test
    q = runtime.run_batched(runtime.session(quantize_layers(model, digits.x_train[:128], CHOSEN)), x)
    tm = to_torch(model)
    keys = set(tm.module.state_dict())
    fp32 = run_torch(tm, x)
    with fake_quantized(tm, CHOSEN, digits.x_train[:128]):
        qat = run_torch(tm, x)
        assert len(set(tm.module.state_dict()) - keys) == 2 * len(CHOSEN)  # the ranges: saved with a checkpoint
        tm.module.train()
        loss = tm.module(torch.as_tensor(digits.x_train[:32])).logsumexp(1).mean()
        loss.backward()
        assert all(float(tm.parameter(n).grad.abs().sum()) > 0 for n in ("onnx::Conv_42", "onnx::Conv_45"))
    err_qat, err_fp32 = np.abs(qat - q).mean(), np.abs(fp32 - q).mean()
    assert err_qat < 0.7 * err_fp32, (err_qat, err_fp32)
    assert (qat.argmax(1) == q.argmax(1)).mean() >= (fp32.argmax(1) == q.argmax(1)).mean()
    assert set(tm.module.state_dict()) == keys
    np.testing.assert_array_equal(run_torch(tm, x), fp32)


def _fixed_measurement(monkeypatch, chosen=CHOSEN, pruned=None) -> list:
    """A deterministic precision measurement (`chosen` int8, 40% faster): the wiring, not the timing, is tested.
    `pruned`: the layers still saving when measured again on a pruned model (`only` given; default `chosen`).
    Returns the list of `only` arguments the measurements were called with."""
    calls = []

    def fake(model, calibration_x, provider="CPUExecutionProvider", threads=1, only=None, **kw):
        calls.append(only)
        keep = set(chosen if only is None or pruned is None else pruned)
        names = [n for n in candidates(model) if only is None or n in set(only)]
        layers = {n: {"int8": n in keep, "saving_s": 10e-6 if n in keep else -1e-6, "noise_s": 0.1e-6,
                      "reason": "fixed"} for n in names}
        return PrecisionProfile(provider, threads, 50e-6, 30e-6, 30e-6, layers, calibration_samples=len(calibration_x))

    monkeypatch.setattr(quantize, "measure_precision", fake)
    monkeypatch.setattr(quantize, "measure_precision_cached", fake)
    return calls


QAT_OPTS = dict(metric="latency", profile=str(PROFILE), data="digits", method="project", epochs=2,
                importance="l2", closed_loop=False, measure_latency=False, knobs=("width", "precision"))


@pytest.fixture(scope="module")
def qat_reference(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        _fixed_measurement(mp)
        out = tmp_path_factory.mktemp("qat") / "qat.onnx"
        result = compress(CNN, "0.5", out, CompressOptions(**QAT_OPTS))
    return out, result


def test_compress_fine_tunes_the_int8_layers_under_fake_quantization(qat_reference, monkeypatch, tmp_path):
    _fixed_measurement(monkeypatch)
    out, result = qat_reference
    assert sorted(result.precision["qat_layers"]) == sorted(CHOSEN) == sorted(int8_nodes(onnx.load(out)))
    assert result.precision["fine_tuning"].startswith("quantization-aware")
    assert any("quantization-aware (QAT)" in w for w in result.warnings)
    plain = compress(CNN, "0.5", None, CompressOptions(**QAT_OPTS, qat=False))
    assert plain.precision["qat_layers"] == [] and plain.precision["fine_tuning"].startswith("fp32 (--no-qat)")
    assert any("off (--no-qat)" in item for item in plain.precision["not_done"])
    a = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in plain.model.graph.initializer}
    assert a.keys() == b.keys() and any(not np.array_equal(a[k], b[k]) for k in a)  # QAT changed the training


def test_int8_choice_at_the_pruned_widths_is_made_before_qat_trains_it(monkeypatch):
    """A layer that saves at full width but not at the output's widths is neither fake-quantized in training nor
    quantized in the output: the choice is measured once on the pruned model, before the fine-tuning."""
    calls = _fixed_measurement(monkeypatch, pruned=CHOSEN[:1])  # pruned: only the first still saves
    result = compress(CNN, "0.5", None, CompressOptions(**QAT_OPTS))
    assert len(CHOSEN) > 1 and calls[0] is None and [c for c in calls[1:]] == [CHOSEN]  # full width, then once
    assert result.precision["qat_layers"] == CHOSEN[:1] == int8_nodes(result.model)
    assert len(result.precision["at_output_widths"]) == 1


def _batches(opts: dict, max_rounds=None):
    """compress CNN at latency 0.3 with `opts`: the result and the number of training steps it took."""
    steps = []
    result = compress(CNN, "0.3", None, CompressOptions(**opts, max_rounds=max_rounds),
                      on_event=lambda kind, info: steps.append(1) if kind == "batch" else None)
    return result, len(steps)


@pytest.mark.parametrize("max_rounds", [None, 1])
def test_int8_that_does_not_survive_pruning_falls_back_to_width_alone(monkeypatch, max_rounds):
    """Int8 saves at full width but at none of the pruned widths: the widths bought with those savings are chosen
    again with the fp32 latency model, so the output is exactly the width-alone run's (not an fp32 model whose
    widths a wrong cost model chose) — also with one closed-loop round (max_rounds=1). Found at the widths
    projected before the round trains, so it costs no training step."""
    from onnxecc.compress import INT8_DROPPED

    _fixed_measurement(monkeypatch, pruned=[])  # at any pruned width nothing saves
    short = {**QAT_OPTS, "epochs": 1, "admm_iterations": 1, "admm_epochs": 1}  # 2 epochs: the widths are the point
    both, both_steps = _batches(short, max_rounds)
    alone, alone_steps = _batches({**short, "knobs": ("width",)}, max_rounds)
    assert both.rounds[0]["next"] == INT8_DROPPED and both.precision["dropped"] == INT8_DROPPED
    assert both.rounds[0]["int8_measured"].startswith("at the widths projected for the round, before it trains")
    assert int8_nodes(both.model) == [] and any(INT8_DROPPED in w for w in both.warnings)
    assert both.widths == alone.widths and both.estimated_cost == pytest.approx(alone.estimated_cost)
    assert both.accuracy_after == alone.accuracy_after
    assert both_steps == alone_steps > 0


def test_int8_dropped_at_the_trained_widths_stops_the_round_before_its_fine_tuning(monkeypatch):
    """The planned widths' check passed (here: not made) but the set saves nothing at the widths the method
    chose: the round stops before the fine-tuning and width alone follows — no step trained for nothing."""
    from onnxecc.compress import INT8_DROPPED

    _fixed_measurement(monkeypatch, pruned=[])
    monkeypatch.setattr(sys.modules["onnxecc.closed_loop"], "_plan_int8", lambda *a, **k: None)  # the module
    both, both_steps = _batches(QAT_OPTS)
    alone, alone_steps = _batches({**QAT_OPTS, "knobs": ("width",)})
    assert both.rounds[0]["next"] == INT8_DROPPED and both.rounds[0]["int8_measured"] == "before the fine-tuning"
    assert both.widths == alone.widths and both.accuracy_after == alone.accuracy_after
    assert both_steps == alone_steps > 0


def test_qat_interrupt_and_resume_is_bit_identical(qat_reference, monkeypatch, tmp_path):
    """Interrupted in the eighth of 12 fine-tuning epochs (QAT on since the sixth, ranges recomputed since): the
    checkpoint holds the activation ranges, the QAT layers and that QAT is on, and the resumed run ends with the
    reference's weights."""
    _fixed_measurement(monkeypatch)
    ref_out, ref = qat_reference
    out, ckpt = tmp_path / "out.onnx", tmp_path / "out.onnx.ckpt"

    def on_event(kind, info):
        if kind == "batch" and info["step"] == 7 * 23 + 5:  # 23 steps per epoch
            checkpoint.request()

    with pytest.raises(Interrupted):
        compress(CNN, "0.5", out, CompressOptions(**QAT_OPTS), on_event=on_event, checkpoint=ckpt)
    saved = checkpoint.load(ckpt)["frames"]
    assert saved["qat"]["layers"] == CHOSEN and saved["qat"]["active"] is True
    assert any(k.endswith("qat_act_scale") for k in saved["train"]["module"])
    compress(CNN, "0.5", out, CompressOptions(**QAT_OPTS), resume=ckpt)
    a = {t.name: numpy_helper.to_array(t) for t in onnx.load(ref_out).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_delayed_qat_runs_fp32_until_its_start_epoch(digits):
    """`start_epoch=2`: after epoch 1 the module is exactly the fp32 one; after epoch 2 it is exactly the one
    fake-quantized from the start (same ranges: recomputed from the same weights)."""
    model = ingest.load(CNN)
    x = digits.x_test[:64]
    tm = to_torch(model)
    fp32 = run_torch(tm, x)
    with fake_quantized(tm, CHOSEN, digits.x_train[:128]):
        from_start = run_torch(tm, x)
    with fake_quantized(tm, CHOSEN, digits.x_train[:128], start_epoch=2) as fq:
        np.testing.assert_array_equal(run_torch(tm, x), fp32)
        fq.epoch_done(1)
        np.testing.assert_array_equal(run_torch(tm, x), fp32)
        fq.epoch_done(2)
        np.testing.assert_array_equal(run_torch(tm, x), from_start)
    assert np.abs(from_start - fp32).max() > 0
    assert qat_start(12) == 6 and qat_start(1) == 0


def test_fake_quant_of_matmul_weights_onnx2torch_passes_as_arguments():
    """MatMul by a constant (the bridge promotes it to a parameter the module receives as an argument): its
    per-column int8 weights match onnxruntime's DequantizeLinear too (axis 1 of the [K, N] weight)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((128, 16)).astype(np.float32)
    q = quantize_layers(model, x, ["mm1", "mm2"])
    deq = _dequantized_weights(q)
    with fake_quantized(to_torch(model), ["mm1", "mm2"], x) as fq:
        for name, weight in fq.weights().items():
            ref, step = deq[name]
            assert np.all(np.abs(weight - ref) <= step * (1 + 1e-6)) and np.mean(weight == ref) >= 0.999, name


# ---- the measurement stored by `onnxecc profile --knobs width,precision` ------------------------------------------
@pytest.fixture(scope="module")
def precision_profile(tmp_path_factory, digits):
    """The shipped digits_cnn profile plus a precision section measured once (`profiler.precision_section`)."""
    from onnxecc.cost.profiler import ModelInfo, precision_section

    prof = load_profile(PROFILE, CNN)
    prof.precision = precision_section(ModelInfo.of(CNN), prof, digits.x_train[:64])
    return prof.save(tmp_path_factory.mktemp("prec") / "p.json")


def test_compress_uses_the_stored_measurement(precision_profile, monkeypatch):
    """No full-width measurement at compress time (it would raise); the report says where the measurement came
    from, and the int8 choice is the stored one."""
    def no_measure(*a, **k):
        raise AssertionError("measured again although the profile stores the measurement")

    monkeypatch.setattr(quantize, "measure_precision_cached", no_measure)
    stored = load_profile(precision_profile, CNN).precision
    result = compress(CNN, "0.5", None, CompressOptions(metric="latency", profile=str(precision_profile),
                                                        data="digits", method="project", epochs=0,
                                                        knobs=("width", "precision"), measure_latency=False))
    section = result.precision
    assert section["source"].startswith(f"profile {precision_profile}")
    assert section["measured"]["int8_layers"] == stored["int8_layers"]
    assert section["measured"]["fp32_ms"] == stored["fp32_ms"]
    if stored["samples"]:
        corr = section["correction_at_pruned_widths"]
        assert corr["samples"] == len(stored["samples"])
        assert corr["max_rel_error_after"] <= corr["max_rel_error_before"] + 1e-9


def test_a_stored_measurement_of_other_layers_is_a_one_line_error_exit_2(precision_profile, tmp_path):
    data = json.loads(precision_profile.read_text())
    data["precision"]["layers"].pop(next(iter(data["precision"]["layers"])))  # one candidate not measured
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(UserError, match="precision section"):
        compress(CNN, "0.5", None, CompressOptions(metric="latency", profile=str(bad), data="digits",
                                                   method="project", epochs=0, knobs=("width", "precision")))
    data["precision"]["provider"] = "CUDAExecutionProvider"
    bad.write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, "-m", "onnxecc", "compress", str(CNN), "--budget", "0.5", "--metric",
                           "latency", "--profile", str(bad), "--data", "digits", "--epochs", "0", "--knobs",
                           "width,precision", "-o", str(tmp_path / "out.onnx")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "precision.provider" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_scaled_cost_is_exact_at_full_width_and_corrected_at_pruned_widths():
    """Every chosen layer's fitted coefficient is tiny (the fit put its cost elsewhere): the scaled model is still
    the measured int8 latency at full width. Int8 timings at pruned widths that are slower than fp32 (fixed
    Quantize/Dequantize overhead) pull the model up there."""
    from onnxecc.cost.precision import correct_at_widths

    proto = ingest.load(CNN)
    a = analyse(proto, "compress")
    prof = load_profile(PROFILE, proto)
    cost = cost_model("latency", proto, a.graph, a.layers, a.variables, prof)
    names = [layer.name for layer in a.layers]
    for n in names:
        prof.fit.layers[n] = min(prof.fit.layers.get(n, 0.0), 1e-9) if n in names[1:3] else prof.fit.layers.get(n, 0)
    layers = {n: {"int8": n in names[1:3], "saving_s": 10e-6, "noise_s": 0.1e-6, "reason": ""} for n in names}
    measured = PrecisionProfile("CPUExecutionProvider", 1, 50e-6, 12e-6, 10e-6, layers)  # int8: 0.2× fp32
    scaled, _ = scaled_cost(cost, prof, proto, a.graph, a.layers, a.variables, measured)
    assert scaled(None) == pytest.approx(0.2 * cost(None), rel=1e-9)
    quarter = {v: max(1, f // 4) for v, f in cost.full_widths.items()}
    samples = [{"widths": [quarter[v] for v in sorted(quarter)], "fp32_ms": 1.0, "int8_ms": 1.05},
               {"widths": [max(1, f // 2) for v, f in sorted(cost.full_widths.items())], "fp32_ms": 1.0,
                "int8_ms": 0.6}]
    corrected, info = correct_at_widths(scaled, cost, samples)
    assert corrected(None) == pytest.approx(scaled(None), rel=1e-9)
    assert info["max_rel_error_after"] < info["max_rel_error_before"]
    assert corrected(quarter) > scaled(quarter)
    assert all(t.coef >= 0 for t in corrected.terms) and corrected.constant >= 0
    assert correct_at_widths(scaled, cost, []) == (scaled, None)


def _close(a, b) -> bool:
    """Equal, floats to 12 significant digits (a profile stores milliseconds and reads back seconds)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-12)
    return a == b
