"""Recalibration after pruning (`onnxecc.train.recalibrate`, `MaskedModel.recalibrate`): checked on the written-back
ONNX model with onnxruntime — every live convolution output channel has the original model's mean and standard deviation
on the calibration inputs again, and pruned channels stay exactly zero (compress's record of it: test_lr_probe)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import DEMO_MODELS

from onnxecc.graph import runtime
from onnxecc.graph.channels import analyze
from onnxecc.graph.data import load_digits
from onnxecc.train import recalibrate
from onnxecc.train.finetune import TrainConfig
from onnxecc.train.masked import MaskedModel, _spread


def _conv_stats(model: onnx.ModelProto, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """onnxruntime's per-channel mean and standard deviation of every biased Conv's output over `x` (float64, ddof 1
    like torch): those outputs made graph outputs."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    names = [n.output[0] for n in model.graph.node if n.op_type == "Conv" and len(n.input) == 3 and n.input[2]]
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    sess = runtime.session(model)
    outs = sess.run(names, {sess.get_inputs()[0].name: x})
    per_channel = [np.moveaxis(o, 1, 0).reshape(o.shape[1], -1).astype(np.float64) for o in outs]
    return {n: (c.mean(1), c.std(1, ddof=1)) for n, c in zip(names, per_channel)}


@pytest.mark.parametrize("path", DEMO_MODELS, ids=lambda p: p.stem)
def test_live_channels_get_the_original_statistics_back_and_pruned_ones_stay_zero(path):
    proto = onnx.load(path)
    graph = analyze(proto)
    data = load_digits(0)
    mm = MaskedModel(proto, graph, data, TrainConfig())
    mm.set_keep({g.id: np.arange(0, g.size, 2) for g in graph.prunable_groups})  # every other channel
    x = data.x_train[_spread(len(data.x_train), recalibrate.CALIBRATION_SAMPLES)]
    original = _conv_stats(mm.proto, x)
    pruned = _conv_stats(mm.write_back(), x)
    live = {n: (m != 0) | (s != 0) for n, (m, s) in pruned.items()}  # pruned channels output exactly 0
    for k in (0, 1):  # not vacuous: pruning moved both statistics
        assert max(np.abs(pruned[n][k] - original[n][k])[live[n]].max() for n in original) > 0.05

    info = mm.recalibrate()
    assert info["layers"] == len(original) and info["samples"] == len(x)
    after = _conv_stats(mm.write_back(), x)
    for n, (mean, std) in original.items():
        alive = live[n]
        np.testing.assert_allclose(after[n][0][alive], mean[alive], atol=2e-4 * (1 + np.abs(mean).max()), err_msg=n)
        np.testing.assert_allclose(after[n][1][alive], std[alive], rtol=1e-3, atol=1e-5, err_msg=n)
        assert np.all(after[n][0][~alive] == 0) and np.all(after[n][1][~alive] == 0)
    assert info["loss_after"] == pytest.approx(mm.loss(_spread(len(data.x_train), 1024)), rel=1e-6)


@pytest.mark.parametrize("path", DEMO_MODELS, ids=lambda p: p.stem)
def test_calibration_batch_is_bounded_by_the_largest_convolution_output(path, monkeypatch):
    """The bound is twice the largest biased Conv output of one sample, taken here from the ONNX shape analysis
    (`find_layers`), not from torch: a budget of k such pairs gives k samples, clamped to [MIN, CALIBRATION_SAMPLES]."""
    from onnxecc.graph.layers import find_layers
    from onnxecc.train.bridge import to_torch

    proto = onnx.load(path)
    largest = max(layer.cout * int(np.prod(layer.out_spatial)) * 4 for layer in find_layers(proto)
                  if layer.op == "Conv" and layer.bias)
    module, x = to_torch(proto).module, load_digits(0).x_train
    sample = torch.as_tensor(x[:1])
    for pairs in (recalibrate.MIN_CALIBRATION_SAMPLES + 5, 3):
        monkeypatch.setattr(recalibrate, "ACTIVATION_BYTES", pairs * 2 * largest + 1)
        assert recalibrate.calibration_size(module, sample, len(x)) == max(recalibrate.MIN_CALIBRATION_SAMPLES, pairs)
    monkeypatch.setattr(recalibrate, "ACTIVATION_BYTES", 1 << 40)
    assert recalibrate.calibration_size(module, sample, len(x)) == recalibrate.CALIBRATION_SAMPLES
    assert recalibrate.calibration_size(module, sample, 100) == 100
