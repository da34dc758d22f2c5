"""Structured surgery: pruning a group's channels gives the same outputs as zeroing their consumer-side weights,
the result is a valid, smaller model with the expected MACs, and bad keep lists are one-line user errors."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zoo
from test_channels import Net, out_group

from onnxecc.core.errors import UserError
from onnxecc.graph.channels import ChannelGraph, analyze
from onnxecc.graph.layers import find_layers
from onnxecc.graph.surgery import prune_channels, validate_keep, zero_channels

RTOL = 1e-5


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def random_keep(graph: ChannelGraph, seed: int) -> dict[int, np.ndarray]:
    """Remove a random 30–70 % of the units of every prunable group (redrawn if that empties a tensor)."""
    rng = np.random.default_rng(seed)
    for _ in range(100):
        keep = {}
        for group in graph.prunable_groups:
            removed = int(round(rng.uniform(0.3, 0.7) * group.size))
            kept = max(1, group.size - removed)
            keep[group.id] = np.sort(rng.choice(group.size, kept, replace=False))
        try:
            validate_keep(graph, keep)
            return keep
        except UserError:
            continue
    raise AssertionError("no feasible random keep found")


def masks_of(graph: ChannelGraph, keep) -> dict[int, np.ndarray]:
    masks = {}
    for gid, units in keep.items():
        masks[gid] = np.zeros(graph.groups[gid].size, bool)
        masks[gid][np.asarray(units)] = True
    return masks


def expected_macs(model: onnx.ModelProto, graph: ChannelGraph, keep) -> int:
    """Closed form from the kept widths and the original geometry, independent of the surgery code."""
    masks = masks_of(graph, keep)
    total = 0
    for layer in find_layers(model):
        lc = graph.layers[layer.name]
        cin, cout = graph.kept_counts(lc.input, masks), graph.kept_counts(lc.output, masks)
        if layer.op in ("Conv", "ConvTranspose"):
            groups = cin if layer.groups > 1 and layer.cin == layer.groups else layer.groups  # depthwise
            kernel = int(np.prod(layer.kernel))
            if layer.op == "Conv":
                total += cout * (cin // groups) * kernel * int(np.prod(layer.out_spatial))
            else:  # weight [cin, cout/groups, k…] used once per input pixel
                pixels = layer.macs // (layer.cin * (layer.cout // layer.groups) * kernel)
                total += cin * (cout // groups) * kernel * pixels
        elif layer.op == "Gemm":
            total += cin * cout
        else:
            total += int(np.prod(layer.out_spatial)) * cin * cout
    return total


def assert_equivalent(model: onnx.ModelProto, keep=None, seed: int = 0, batch: int = 2, graph=None):
    """Prune, check validity, compare ORT outputs with the zeroed reference; returns (pruned, graph, keep)."""
    graph = graph if graph is not None else analyze(model)
    keep = keep if keep is not None else random_keep(graph, seed)
    before = model.SerializeToString()
    pruned = prune_channels(model, keep, graph)
    reference = zero_channels(model, keep, graph)
    assert model.SerializeToString() == before, "the original model must be left untouched"
    onnx.checker.check_model(pruned)
    assert [i.name for i in pruned.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]
    assert list(pruned.opset_import) == list(model.opset_import)
    original_names = {n.name for n in model.graph.node}
    assert {n.name for n in pruned.graph.node} <= original_names
    shape = [d.dim_value or batch for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    for got, want in zip(run(pruned, x), run(reference, x)):
        assert got.shape == want.shape
        scale = max(float(np.abs(want).max()), 1e-12)
        assert float(np.abs(got - want).max()) <= RTOL * scale
    assert sum(layer.macs for layer in find_layers(pruned)) == expected_macs(model, graph, keep)
    return pruned, graph, keep


# ---- real architectures ---------------------------------------------------------------------------------------
@functools.cache
def zoo_graph(arch: str):
    model = onnx.load(str(zoo.export(arch)))
    return model, analyze(model)


def test_zoo_random_pruning_is_equivalent(zoo_arch):
    model, graph = zoo_graph(zoo_arch)
    pruned, graph, keep = assert_equivalent(model, graph=graph, seed=1)
    assert keep and sum(layer.macs for layer in find_layers(pruned)) < 0.8 * sum(
        layer.macs for layer in find_layers(model))
    # the reference really differs from the original: the check is not vacuous
    x = np.random.default_rng(0).standard_normal((1, 3, zoo.SIZE, zoo.SIZE)).astype(np.float32)
    zeroed, original = run(zero_channels(model, keep, graph), x)[0], run(model, x)[0]
    assert np.abs(zeroed - original).max() > 1e-3 * np.abs(original).max()


def test_keeping_everything_changes_nothing():
    model, graph = zoo_graph("resnet18")
    keep = {g.id: np.arange(g.size) for g in graph.prunable_groups}
    pruned = prune_channels(model, keep, graph)
    assert {t.name: t.dims for t in pruned.graph.initializer} == {t.name: t.dims for t in model.graph.initializer}


def test_shufflenet_shape_arithmetic_becomes_constants():
    model, graph = zoo_graph("shufflenet_v2_x1_0")
    pruned = prune_channels(model, random_keep(graph, 3), graph)
    assert not any(n.op_type == "Shape" for n in pruned.graph.node)
    dim = pruned.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "batch"  # still a dynamic batch


# ---- one graph per rule -----------------------------------------------------------------------------------------
def _residual_bn():
    n = Net()
    a = n.bn(n.conv("x", 3, 8, name="c1"), 8)
    b = n.conv(n.op("Relu", [a]), 8, 8, name="c2")
    s = n.op("Mul", [n.op("Add", [a, b]), n.const(np.linspace(0.5, 2, 8, dtype=np.float32).reshape(8, 1, 1))])
    return n.model(n.conv(n.op("PRelu", [s, n.const(np.full((8, 1, 1), 0.1, np.float32))]), 8, 4, name="c3"))


def _depthwise_se():
    n = Net()
    a = n.op("HardSwish", [n.conv("x", 3, 8, k=1, name="pw1")])
    d = n.conv(a, 8, 8, group=8, name="dw")
    s = n.op("GlobalAveragePool", [d])
    s = n.op("HardSigmoid", [n.conv(n.op("Relu", [n.conv(s, 8, 4, k=1)]), 4, 8, k=1)])
    m = n.conv(n.op("Mul", [d, s]), 8, 16, group=8, name="dwm")
    return n.model(n.conv(m, 16, 4, k=1, name="pw2"))


def _grouped():
    n = Net()
    a = n.op("Relu", [n.conv("x", 3, 8, k=1, name="c1")])
    b = n.op("Relu", [n.conv(a, 8, 12, group=2, name="grouped")])
    return n.model(n.conv(b, 12, 4, k=1, name="c3"))


def _concat_flatten_gemm():
    n = Net(shape=(1, 3, 8, 8))
    a = n.conv("x", 3, 4, name="a")
    b = n.conv("x", 3, 6, name="b")
    c = n.op("MaxPool", [n.op("Concat", [a, b], axis=1)], kernel_shape=[2, 2], strides=[2, 2])
    c = n.op("Relu", [n.conv(c, 10, 5, name="c")])
    h = n.op("Relu", [n.gemm(n.op("Flatten", [c], axis=1), 80, 12, name="fc1")])
    return n.model(n.gemm(h, 12, 3, name="fc2"))


def _reshape_flatten_gemm():
    n = Net(shape=(1, 3, 4, 4))
    c = n.conv("x", 3, 5, name="c")
    f = n.op("Reshape", [c, n.const(np.array([-1, 80]))])
    return n.model(n.gemm(f, 80, 3, name="fc"))


def _slice_split():
    n = Net()
    a = n.conv("x", 3, 8, name="c1")
    part = n.op("Slice", [a, n.const(np.array([2])), n.const(np.array([6])), n.const(np.array([1]))])
    lo, hi = n.op("Split", [n.conv("x", 3, 8, name="c2"), n.const(np.array([3, 5]))], axis=1, outputs=2)
    y = n.op("Add", [n.conv(part, 4, 2, name="c3"), n.conv(a, 8, 2, name="c4")])
    return n.model(n.op("Add", [y, n.op("Add", [n.conv(lo, 3, 2, name="c5"), n.conv(hi, 5, 2, name="c6")])]))


def _shuffle():
    n = Net()
    a = n.conv("x", 3, 4, name="a")
    b = n.conv("x", 3, 4, name="b")
    s = n.op("Reshape", [n.op("Concat", [a, b], axis=1), n.const(np.array([0, 2, 4, 8, 8]))])
    s = n.op("Reshape", [n.op("Transpose", [s], perm=[0, 2, 1, 3, 4]), n.const(np.array([0, 8, 8, 8]))])
    return n.model(n.conv(s, 8, 2, name="c"))


def _split_fold():
    n = Net()
    s = n.op("Reshape", [n.conv("x", 3, 8, name="a"), n.const(np.array([0, 2, 4, 8, 8]))])
    s = n.op("Reshape", [n.op("Relu", [s]), n.const(np.array([-1, 8, 8, 8]))])
    return n.model(n.conv(s, 8, 2, name="c"))


def _channels_last_matmul():
    n = Net()
    a = n.op("Transpose", [n.conv("x", 3, 6, name="c1")], perm=[0, 2, 3, 1])
    h = n.op("Relu", [n.op("Add", [n.op("MatMul", [a, n.weight(6, 10)]), n.const(np.ones(10, np.float32))])])
    h = n.op("Transpose", [n.op("MatMul", [h, n.weight(10, 6)])], perm=[0, 3, 1, 2])
    return n.model(n.conv(h, 6, 2, name="c2"))


def _pool_reduce_expand():
    n = Net()
    a = n.conv("x", 3, 6, name="c1")
    p = n.op("ReduceMean", [a], axes=[2, 3], keepdims=1)
    e = n.op("Expand", [p, n.const(np.array([1, 6, 8, 8]))])
    a = n.op("Add", [a, e])
    a = n.op("Pad", [a, n.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]))])
    a = n.op("AveragePool", [a], kernel_shape=[3, 3])
    a = n.op("Resize", [a, "", n.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    r = n.op("ReduceSum", [a, n.const(np.array([2, 3]))], keepdims=0)
    return n.model(n.gemm(r, 6, 3, name="fc"))


def _conv_transpose():
    n = Net()
    a = n.op("Relu", [n.conv("x", 3, 4, name="c1")])
    t = n.op("ConvTranspose", [a, n.weight(4, 6, 2, 2), n.const(np.ones(6, np.float32))], name="up",
             kernel_shape=[2, 2], strides=[2, 2])
    return n.model(n.conv(n.op("Relu", [t]), 6, 2, name="c2"))


TINY = {"residual_bn": _residual_bn, "depthwise_se": _depthwise_se, "grouped": _grouped,
        "concat_flatten_gemm": _concat_flatten_gemm, "reshape_flatten_gemm": _reshape_flatten_gemm,
        "slice_split": _slice_split, "shuffle": _shuffle, "split_fold": _split_fold,
        "channels_last_matmul": _channels_last_matmul, "pool_reduce_expand": _pool_reduce_expand,
        "conv_transpose": _conv_transpose}


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_graphs_prune_equivalently(name):
    model = TINY[name]()
    graph = analyze(model)
    assert graph.prunable_groups
    for seed in range(3):
        assert_equivalent(model, seed=seed, graph=graph)


def test_pruned_weights_have_kept_shapes():
    model = _concat_flatten_gemm()
    graph = analyze(model)
    ga, gb, gc = (out_group(graph, n) for n in ("a", "b", "c"))
    keep = {ga: [0, 3], gb: [1, 2, 5], gc: [4]}
    pruned, _, _ = assert_equivalent(model, keep=keep, graph=graph)
    weights = {layer.name: layer for layer in find_layers(pruned)}
    assert (weights["a"].cout, weights["b"].cout) == (2, 3)
    assert (weights["c"].cin, weights["c"].cout) == (5, 1)
    assert weights["fc1"].cin == 16  # one channel × 4×4 features after Flatten


# ---- bad keep lists ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    model = _residual_bn()
    return model, analyze(model)


@pytest.mark.parametrize("keep_of,message", [
    (lambda g, p, f: {p: [0, 99]}, "out of range"),
    (lambda g, p, f: {p: [-1]}, "out of range"),
    (lambda g, p, f: {p: []}, "empty"),
    (lambda g, p, f: {p: [1, 1, 2]}, "listed twice"),
    (lambda g, p, f: {f: [0]}, "frozen by graph"),
    (lambda g, p, f: {len(g.groups) + 5: [0]}, "unknown channel group"),
    (lambda g, p, f: {"a": [0]}, "unknown channel group"),
    (lambda g, p, f: {p: [[0, 1]]}, "flat list of integers"),
    (lambda g, p, f: {p: [0.5]}, "flat list of integers"),
    (lambda g, p, f: [0, 1], "keep must map"),
])
def test_bad_keep_lists_are_one_line_user_errors(small, keep_of, message):
    model, graph = small
    prunable = graph.prunable_groups[0].id
    frozen = next(g.id for g in graph.groups if g.frozen_by)
    for fn in (prune_channels, zero_channels):
        with pytest.raises(UserError) as err:
            fn(model, keep_of(graph, prunable, frozen), graph)
        assert message in str(err.value) and "\n" not in str(err.value)
