"""The method registry (`onnxecc.methods.registry`): `compress` runs a method it finds there by name, with no
change to compress itself — a new method is one module and a test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxecc.compress import CompressOptions, compress
from onnxecc.core.errors import UserError
from onnxecc.methods import registry
from onnxecc.methods.base import Method, Selection
from onnxecc.methods.baselines import uniform_widths

CNN = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"


class FirstUnits(Method):
    """Uniform widths, but always the first units of every group (no importance): a selection no built-in
    method makes, so the output shows which method ran."""

    name = "first-units"

    def project(self, problem, target):
        widths = uniform_widths(problem, target)
        first = {v: -np.arange(problem.cost.full_widths[v], dtype=float) for v in widths}  # earlier = better
        return problem.keep_from_widths(widths, first)

    def select(self, problem, target, ctx):
        return Selection(self.project(problem, target))


def _first_conv_weight(model: onnx.ModelProto) -> np.ndarray:
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    init = {i.name: i for i in model.graph.initializer}
    return numpy_helper.to_array(init[conv.input[1]])


def test_a_registered_method_runs_without_a_change_to_compress(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.METHODS, FirstUnits.name, FirstUnits())
    out = tmp_path / "first.onnx"
    result = compress(CNN, "0.5", out, CompressOptions(method="first-units", epochs=0, measure_latency=False))
    assert result.method == "first-units" and result.meets_budget
    before, after = _first_conv_weight(onnx.load(CNN)), _first_conv_weight(onnx.load(out))
    kept = after.shape[0]
    assert 0 < kept < before.shape[0]
    np.testing.assert_array_equal(after, before[:kept])  # the first filters, as the method chose, written as they were
    # the built-in uniform method keeps the same number of filters, chosen by their L1 norm instead
    uniform = compress(CNN, "0.5", tmp_path / "u.onnx", CompressOptions(method="uniform", epochs=0,
                                                                       measure_latency=False))
    assert uniform.widths == result.widths
    norms = np.abs(before).reshape(before.shape[0], -1).sum(1)
    expected = before[np.sort(np.argsort(-norms, kind="stable")[:kept])]
    np.testing.assert_array_equal(_first_conv_weight(onnx.load(tmp_path / "u.onnx")), expected)


def test_an_unknown_method_lists_the_registered_ones(tmp_path):
    with pytest.raises(UserError, match="choose one of auto, project, ecc, uniform, greedy, wsp"):
        compress(CNN, "0.5", tmp_path / "x.onnx", CompressOptions(method="nope"))
    assert list(registry.METHODS) == ["project", "ecc", "uniform", "greedy", "wsp"]
