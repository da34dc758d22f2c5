"""Channel importance: the Fisher (loss-aware) criterion against independent computations."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import DEMO_MODELS

from onnxecc.compress import CompressOptions, compress
from onnxecc.core.errors import UserError
from onnxecc.graph.channels import analyze
from onnxecc.graph.data import load_digits
from onnxecc.graph.graph import Graph
from onnxecc.optimize.importance import l2_importance
from onnxecc.train.finetune import TrainConfig
from onnxecc.train.masked import MaskedModel


@pytest.fixture(scope="module")
def cnn():
    proto = onnx.load(DEMO_MODELS[0])
    graph = analyze(proto)
    return proto, graph, MaskedModel(proto, graph, load_digits(0), TrainConfig(batch_size=32))


def _producers(graph):
    return sorted({b.name for b in graph.binds if b.role == "producer"})


def test_fisher_equals_accumulated_squared_gradients_from_backward(cnn):
    proto, graph, mm = cnn
    names = [n for n in _producers(graph) if n in mm.tm.params]
    fisher = mm.fisher(names, max_samples=200)
    # independently: .backward() per batch and the parameters' .grad, mapped by qualified name
    module = mm.tm.module
    params = dict(module.named_parameters())
    total = {n: torch.zeros_like(params[mm.tm.params[n]]) for n in names}
    x, y = mm.data.x_train[:200], mm.data.y_train[:200]
    module.eval()
    for i in range(0, 200, 32):
        module.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(torch.as_tensor(x[i:i + 32])), torch.as_tensor(y[i:i + 32]))
        loss.backward()
        for n in names:
            total[n] += params[mm.tm.params[n]].grad.pow(2)
    consts = Graph(proto)
    for n in names:
        expected = total[n].numpy()
        if mm.tm.layouts.get(n) is not None and mm.tm.layouts[n].transpose:
            expected = expected.T
        assert fisher[n].shape == consts.const(n).shape  # ONNX layout, whatever the torch layout is
        np.testing.assert_allclose(fisher[n], expected, rtol=1e-5, atol=1e-12)
        assert fisher[n].max() > 0


def test_fisher_importance_is_the_sum_of_f_w2_over_each_unit(cnn):
    proto, graph, _ = cnn
    consts = Graph(proto)
    rng = np.random.default_rng(0)
    fisher = {n: rng.random(consts.const(n).shape) for n in _producers(graph)}
    got = l2_importance(proto, graph, diminishing=False, fisher=fisher)  # normalize is ignored with Fisher
    expected = {g: np.zeros(graph.groups[g].size) for g in got}
    for b in graph.binds:
        if b.role != "producer" or b.name not in fisher:
            continue
        saliency = fisher[b.name] * consts.const(b.name).astype(np.float64) ** 2
        per_unit = np.moveaxis(saliency, b.axis, 0).reshape(saliency.shape[b.axis], -1).sum(1)
        for k, (g, u) in enumerate(zip(b.pos.gid.ravel(), b.pos.unit.ravel())):
            if g in expected:
                expected[g][u] += per_unit[k]
    assert got.keys() == expected.keys() and got
    for g in got:
        np.testing.assert_allclose(got[g], expected[g], rtol=1e-12)


def test_fisher_needs_data_and_unknown_importance_is_refused():
    with pytest.raises(UserError, match="needs --data"):
        compress(DEMO_MODELS[0], "0.5", None, CompressOptions(importance="fisher", measure_latency=False))
    with pytest.raises(UserError, match="unknown importance"):
        compress(DEMO_MODELS[0], "0.5", None, CompressOptions(importance="taylor", measure_latency=False))
