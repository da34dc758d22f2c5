"""Training never dies with an internal error (`onnxecc.train.guard`): a NaN injected into a real run is recovered from
(last good state, lower rate, recorded in the history) and the output still runs in onnxruntime; a run that
cannot recover exits 1 with one line naming the phase and what to try."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import DEMO_MODELS

from onnxecc.compress import CompressOptions, compress
from onnxecc.core.errors import TrainingDiverged
from onnxecc.graph.channels import analyze
from onnxecc.graph.data import Dataset, load_digits
from onnxecc.train.finetune import TrainConfig, finetune
from onnxecc.train.masked import MaskedModel

EYERISS = Path(__file__).resolve().parents[1] / "profiles" / "eyeriss.json"
RUNS = {  # method → options of a short real run on digits_cnn
    "ecc": dict(method="ecc", epochs=2, admm_iterations=2, admm_epochs=1),
    "greedy": dict(method="greedy", epochs=2, admm_iterations=2, admm_epochs=1),
    "wsp": dict(method="wsp", metric="energy", hardware=str(EYERISS), epochs=3),
}


class NanAtStep:
    """A global forward pre-hook: at the `at`-th forward of a convolution in training mode, one weight becomes NaN
    (what an overflowing step does to a real network, at a step we choose)."""

    def __init__(self, at: int):
        self.at, self.calls, self.fired = at, 0, False

    def __call__(self, module, args):
        if isinstance(module, torch.nn.Conv2d) and module.training:
            self.calls += 1
            if self.calls == self.at:
                with torch.no_grad():
                    module.weight.view(-1)[0] = float("nan")
                self.fired = True


@pytest.mark.parametrize("method", sorted(RUNS))
def test_a_nan_weight_mid_training_is_recovered_and_the_output_runs_in_onnxruntime(method, tmp_path):
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    nan = NanAtStep(30)  # digits_cnn has 3 convolutions: the 10th training step of the first phase
    handle = torch.nn.modules.module.register_module_forward_pre_hook(nan)
    try:
        result = compress(DEMO_MODELS[0], "0.4", out, CompressOptions(data="digits", measure_latency=False,
                                                                      **RUNS[method]), report=report)
    finally:
        handle.remove()
    assert nan.fired
    history = json.loads(report.read_text())["history"]
    recoveries = [h for h in history if h["phase"] == "recovery"]
    assert len(recoveries) == 1, recoveries
    rec = recoveries[0]
    assert rec["non_finite"] == "loss" and rec["epoch"] == 1 and rec["lr"] > 0
    assert rec["during"].startswith({"ecc": "admm 1/2", "greedy": "greedy step 1", "wsp": "wsp"}[method])
    assert any("recovered" in w for w in result.warnings)
    # the file is what the report says: a fresh onnxruntime session measures the same accuracy, finite logits
    ds = load_digits()
    logits = ort.InferenceSession(str(out)).run(None, {"input": ds.x_test})[0]
    assert np.isfinite(logits).all()
    assert float((logits.argmax(1) == ds.y_test).mean()) == pytest.approx(result.accuracy_after)
    assert result.accuracy_after >= result.accuracy_before - 0.05, (result.accuracy_before, result.accuracy_after)
    assert all(np.isfinite(onnx.numpy_helper.to_array(t)).all() for t in onnx.load(out).graph.initializer)


def _cli(*args):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "onnxecc", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_a_rate_that_diverges_every_time_exits_1_with_one_line_naming_the_phase(tmp_path):
    out = tmp_path / "small.onnx"
    proc = _cli("compress", str(DEMO_MODELS[0]), "--budget", "0.5", "--data", "digits", "--epochs", "1",
                "--admm-iterations", "1", "--admm-epochs", "1", "--lr", "1e30", "--quiet", "-o", str(out),
                "--report", str(tmp_path / "r.json"))
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr
    assert "admm 1/1, epoch 1" in errors[0] and "--lr" in errors[0] and "4 recoveries" in errors[0]
    assert not list(tmp_path.iterdir())  # no output, no report, no checkpoint


def test_nan_data_cannot_be_recovered_from_and_names_the_phase():
    """Every batch non-finite: the loop recovers MAX_RECOVERIES times, then TrainingDiverged names the phase."""
    proto = onnx.load(DEMO_MODELS[0])
    from onnxecc.train.bridge import to_torch

    module = to_torch(proto).module
    x = np.full((128, 1, 8, 8), np.nan, np.float32)
    teacher = np.zeros((128, 10), np.float32)
    with pytest.raises(TrainingDiverged, match=r"in finetune, epoch 1: the loss became non-finite after 4 "):
        finetune(module, x, teacher, None, TrainConfig(epochs=2, batch_size=16, phase="finetune"))


@pytest.fixture(scope="module")
def digits_cnn():
    proto = onnx.load(DEMO_MODELS[0])
    return proto, analyze(proto)


def test_fisher_leaves_out_a_batch_with_non_finite_gradients(digits_cnn):
    proto, graph = digits_cnn
    ds = load_digits(0)
    x = ds.x_train[:192].copy()
    x[70, 0, 3, 3] = np.inf  # the second batch of 64
    poisoned = MaskedModel(proto, graph, Dataset(x, ds.y_train[:192], x[:0], None, "nan"), TrainConfig(),
                           recalibration=False)
    names = sorted(poisoned.tm.params)
    fisher = poisoned.fisher(names)
    # independently: the same Fisher over the two clean batches only
    keep = np.r_[0:64, 128:192]
    clean = MaskedModel(proto, graph, Dataset(x[keep], ds.y_train[keep], x[:0], None, "clean"), TrainConfig(),
                        recalibration=False)
    expected = clean.fisher(names)
    for n in names:
        assert np.isfinite(fisher[n]).all()
        np.testing.assert_allclose(fisher[n], expected[n], rtol=1e-5, atol=1e-12)
    assert [r["during"] for r in poisoned.take_recoveries()] == ["importance"]


def test_the_rate_probe_drops_a_diverging_rate_and_restores_the_weights(digits_cnn):
    proto, graph = digits_cnn
    mm = MaskedModel(proto, graph, load_digits(0), TrainConfig(), recalibration=False)
    start = mm.state()
    lr, tried = mm.choose_lr((1e30, 1e-3), samples=256)
    assert all(torch.equal(start[k], v) for k, v in mm.state().items())
    assert tried[0]["loss"] is None and tried[0]["diverged"] and not tried[0]["chosen"]
    assert tried[1]["chosen"] and lr == 1e-3 and tried[1]["loss"] > 0
    with pytest.raises(TrainingDiverged, match="lr probe, epoch 1"):  # no rate left: one line naming the probe
        mm.choose_lr((1e30, 1e29), samples=256)


class JaxSoftmax(torch.nn.Module):
    """A conv classifier ending in softmax as jax2tf writes it (magika): the max subtracted first is
    Max(-inf, ReduceMax(x)), so the graph holds a -inf constant that the torch module keeps as a buffer."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv1d(3, 16, 3, padding=1), torch.nn.Linear(16, 5)
        self.register_buffer("floor", torch.tensor(float("-inf")))

    def forward(self, x):
        z = self.fc(torch.relu(self.conv(x)).amax(2))
        e = torch.exp(z - torch.maximum(z.amax(1, keepdim=True), self.floor))
        return e / e.sum(1, keepdim=True)


def test_a_model_constant_of_minus_inf_is_not_divergence(tmp_path):
    """A non-finite constant of the model itself (magika's -inf) is not a diverged state: the rate probe, the
    recalibration and the fine-tuning run, and the trained, pruned file equals the masked torch model in ORT.
    Before, the guard counted that buffer as non-finite weights and every rate of the probe 'diverged'."""
    from onnxecc.graph import ingest
    from onnxecc.graph.surgery import prune_channels

    torch.manual_seed(0)
    path = tmp_path / "jax_softmax.onnx"
    torch.onnx.export(JaxSoftmax().eval(), (torch.randn(1, 3, 12),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["p"], dynamic_axes={"x": {0: "n"}, "p": {0: "n"}})
    proto = ingest.load(path)
    assert any(np.isneginf(onnx.numpy_helper.to_array(t)).any() for t in proto.graph.initializer)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 3, 12)).astype(np.float32)
    graph = analyze(proto)
    mm = MaskedModel(proto, graph, Dataset(x, None, x[:0], None, "noise"), TrainConfig(batch_size=32))
    conv = next(g for g in graph.prunable_groups if g.size == 16)
    keep = {conv.id: np.arange(0, 16, 2)}
    mm.set_keep(keep)
    assert mm.recalibrate()["layers"] >= 1 and mm.take_recoveries() == []  # not undone as "non-finite weights"
    lr, tried = mm.choose_lr((1e-3,), samples=128)
    assert lr == 1e-3 and np.isfinite(tried[0]["loss"])
    start = mm.state()
    mm.train(1, lr=lr)
    assert mm.take_recoveries() == [] and any(not torch.equal(start[k], v) for k, v in mm.state().items())
    pruned = prune_channels(mm.write_back(), keep, graph)
    expected = mm.tm.run(x[:16])
    got = ort.InferenceSession(pruned.SerializeToString()).run(None, {"x": x[:16]})[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
