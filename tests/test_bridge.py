"""The torch bridge: conversion agrees with ORT, the weight map is complete and verified, training reaches
every compute layer, and write-back into the original graph is an identity (and exact for changed weights)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import zoo
from onnx import TensorProto, helper, numpy_helper

from onnxecc.core.errors import UnsupportedModelError
from onnxecc.graph.graph import Graph
from onnxecc.graph.layers import find_layers
from onnxecc.train.bridge import TorchModel, run_torch, to_torch, write_back

TORCH_VS_ORT = 1e-4  # max |torch − ORT| / max |ORT output|: float32 kernels differ in summation order
ROUND_TRIP = 1e-5  # max |ORT(written) − ORT(original)| / max |ORT(original)|

_CACHE: dict[tuple[str, bool], tuple[onnx.ModelProto, TorchModel]] = {}


def _converted(arch: str, dynamo: bool = False) -> tuple[onnx.ModelProto, TorchModel]:
    key = (arch, dynamo)
    if key not in _CACHE:
        model = onnx.load(zoo.export(arch, dynamo=dynamo))
        _CACHE[key] = (model, to_torch(model))
    return _CACHE[key]


def _batch(model: onnx.ModelProto, n: int = 2, seed: int = 0) -> np.ndarray:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.dim_value > 0 else n for d in dims]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _assert_same_structure(written: onnx.ModelProto, original: onnx.ModelProto) -> None:
    assert [n.name for n in written.graph.node] == [n.name for n in original.graph.node]
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in original.graph.node]
    assert [i.name for i in written.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in written.graph.output] == [o.name for o in original.graph.output]
    assert list(written.opset_import) == list(original.opset_import)
    assert list(written.metadata_props) == list(original.metadata_props)
    assert (written.ir_version, written.producer_name, written.producer_version) == \
        (original.ir_version, original.producer_name, original.producer_version)


def _check_round_trip(model: onnx.ModelProto, tm: TorchModel, x: np.ndarray) -> None:
    ref = _ort(model, x)
    assert _rel(tm.run(x), ref) <= TORCH_VS_ORT
    written = write_back(tm)
    assert _rel(_ort(written, x), ref) <= ROUND_TRIP
    _assert_same_structure(written, model)


def _check_training(model: onnx.ModelProto, tm: TorchModel, x: np.ndarray) -> None:
    """Every compute layer's weight is mapped and gets a gradient; after an SGD step on all of them the
    written-back ONNX model computes what the torch module computes."""
    layers = find_layers(model)
    assert layers
    for layer in layers:
        assert layer.weight in tm.params, f"{layer.op} {layer.name}: weight {layer.weight} not mapped"
        if layer.bias:
            assert layer.bias in tm.params, f"{layer.op} {layer.name}: bias {layer.bias} not mapped"
    module = tm.module
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    module.eval()
    try:
        module.zero_grad(set_to_none=True)
        out = module(torch.from_numpy(x))
        out.sum().backward()
        for layer in layers:
            param = tm.parameter(layer.weight)
            assert isinstance(param, torch.nn.Parameter) and param.requires_grad, layer.name
            assert param.grad is not None and float(param.grad.abs().sum()) > 0, f"no gradient at {layer.name}"
        with torch.no_grad():
            for p in module.parameters():
                if p.grad is not None:
                    p -= 1e-3 * p.grad / (p.grad.abs().max() + 1e-12) * (p.abs().max() + 1e-3)
        trained = run_torch(tm, x)
        written = write_back(tm)
        onnx.checker.check_model(written)
        _assert_same_structure(written, model)
        assert _rel(trained, _ort(model, x)) > 1e-4  # the step really changed the function
        assert _rel(_ort(written, x), trained) <= TORCH_VS_ORT
    finally:
        module.zero_grad(set_to_none=True)
        module.load_state_dict(saved)


def _check_perturbation(model: onnx.ModelProto, tm: TorchModel) -> None:
    """A known delta on one conv weight in torch shows up exactly at that ONNX tensor, nowhere else."""
    convs = [layer for layer in find_layers(model) if layer.op == "Conv"]
    conv = convs[len(convs) // 2]
    param = tm.parameter(conv.weight)
    before = param.detach().clone()
    delta = np.random.default_rng(1).uniform(-0.5, 0.5, before.shape).astype(np.float32)
    try:
        with torch.no_grad():
            param += torch.from_numpy(delta)
        written = Graph(write_back(tm))
        original = Graph(model)
        np.testing.assert_array_equal(written.const(conv.weight),
                                      (original.const(conv.weight) + delta).astype(np.float32))
        for name in tm.params:
            if name != conv.weight:
                np.testing.assert_array_equal(written.const(name), original.const(name), err_msg=name)
    finally:
        with torch.no_grad():
            param.copy_(before)


@pytest.mark.parametrize("check", ["round_trip", "training", "perturbation"])
def test_zoo(zoo_arch, check):
    model, tm = _converted(zoo_arch)
    x = _batch(model)
    if check == "round_trip":
        _check_round_trip(model, tm, x)
    elif check == "training":
        _check_training(model, tm, x)
    else:
        _check_perturbation(model, tm)


def test_dynamo_export_round_trip():
    """The default (dynamo) exporter: opset 20 ReduceMean, Reshape(allowzero=1), fixed batch of 1."""
    model, tm = _converted("resnet18", dynamo=True)
    assert tm.target_opset is not None and tm.target_opset < 18  # ReduceMean-18 has no onnx2torch converter
    x = _batch(model, n=1)
    _check_round_trip(model, tm, x)
    _check_training(model, tm, x)
    _check_perturbation(model, tm)


def test_write_back_untouched_is_bit_identical():
    model, tm = _converted("mobilenet_v3_small")
    assert write_back(tm).SerializeToString() == model.SerializeToString()


def test_linear_layout_and_parameter_names():
    model, tm = _converted("resnet18")
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    weight = tm.parameter(gemm.input[1])
    assert isinstance(weight, torch.nn.Parameter)
    np.testing.assert_array_equal(tm.onnx_value(gemm.input[1]), Graph(model).const(gemm.input[1]))
    assert set(tm.params.values()) <= {name for name, _ in tm.module.named_parameters()}


# ---- a hand-made graph with every normalisation case ----------------------------------------------------
def _hand_made(ir_version: int = 3) -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    nodes = [
        helper.make_node("Identity", ["w1_raw"], ["w1"], name="weight_identity"),
        helper.make_node("Constant", [], ["b1"], name="bias_constant",
                         value=numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1_value")),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Reshape", ["w2_flat", "w2_shape"], ["w2"], name="weight_reshape"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[0, 1, 1, 0]),  # padded module
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc_w"], ["mm"], name="fc/MatMul"),
        helper.make_node("Add", ["fc_b", "mm"], ["y"], name="fc.Add"),
    ]
    inits = [init("w1_raw", 8, 3, 3, 3), init("w2_flat", 6 * 8 * 3 * 3),
             numpy_helper.from_array(np.array([6, 8, 3, 3], np.int64), "w2_shape"),
             init("b2", 6), init("fc_w", 6, 5), init("fc_b", 5)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]  # IR 3 style
    graph = helper.make_graph(nodes, "hand", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                    ["n", 5])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="hand",
                              producer_version="1.0")
    model.ir_version = ir_version
    helper.set_model_props(model, {"author": "test"})
    return model


def test_hand_made_graph():
    model = _hand_made()
    onnx.checker.check_model(model)
    tm = to_torch(model)
    assert set(tm.params) == {"w1", "b1", "w2", "b2", "fc_w", "fc_b"}
    for name in tm.params:
        assert isinstance(tm.parameter(name), torch.nn.Parameter), name
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ref = _ort(model, x)
    assert _rel(tm.run(x), ref) <= TORCH_VS_ORT
    assert _rel(_ort(write_back(tm), x), ref) <= ROUND_TRIP
    assert write_back(tm).SerializeToString() == model.SerializeToString()

    tm.module.zero_grad()
    tm.module(torch.from_numpy(x)).sum().backward()
    for name in tm.params:
        assert float(tm.parameter(name).grad.abs().sum()) > 0, name
    with torch.no_grad():
        for name in tm.params:
            tm.parameter(name).add_(0.05)
    written = write_back(tm)
    onnx.checker.check_model(written)
    names = [n.name for n in written.graph.node]
    # Identity and Constant keep their nodes (the new values sit behind them); the Reshape of an
    # initializer cannot be inverted in general, so its output becomes an initializer of its own.
    assert names == [n.name for n in model.graph.node if n.name != "weight_reshape"]
    g = Graph(written)
    assert g.producer["w1"].op_type == "Identity" and g.producer["b1"].op_type == "Constant"
    for name in tm.params:
        np.testing.assert_array_equal(g.const(name), Graph(model).const(name) + np.float32(0.05))
    # IR 3 lists every initializer as an input: the detached Reshape output joins the list; the real input
    # (the one a caller feeds) is unchanged.
    assert [i.name for i in written.graph.input] == [i.name for i in model.graph.input] + ["w2"]
    assert Graph(written).input_names == ["x"]
    assert list(written.metadata_props) == list(model.metadata_props)
    assert _rel(_ort(written, x), tm.run(x)) <= TORCH_VS_ORT


def _single_op_model(node: onnx.NodeProto, opsets) -> onnx.ModelProto:
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=opsets)


def test_custom_domain_op_is_unsupported():
    node = helper.make_node("FancyOp", ["x"], ["y"], name="fancy", domain="com.example")
    model = _single_op_model(node, [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedModelError, match="FancyOp") as info:
        to_torch(model)
    assert "\n" not in str(info.value)


def test_loop_is_unsupported():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Relu", ["v_in"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 4])])
    node = helper.make_node("Loop", ["trip", "", "x"], ["y"], name="the_loop", body=body)
    model = _single_op_model(node, [helper.make_opsetid("", 17)])
    model.graph.initializer.append(numpy_helper.from_array(np.array(3, np.int64), "trip"))
    with pytest.raises(UnsupportedModelError, match="Loop") as info:
        to_torch(model)
    assert "\n" not in str(info.value)


def test_computed_conv_weight_is_unsupported():
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="dyn_conv")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4]),
                                            helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedModelError, match="dyn_conv"):
        to_torch(model)
