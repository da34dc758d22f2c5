"""Channel-group analysis: one hand-made graph per registry rule, the couplings of real architectures, and the
groups that `inspect` reports."""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import pytest
import zoo
from onnx import TensorProto, helper, numpy_helper

from onnxecc.graph.channels import RULES, analyze, prunable_fraction
from onnxecc.graph.layers import find_layers


# ---- a tiny graph builder (also used by test_surgery) --------------------------------------------------------
class Net:
    """Builds small NCHW graphs: `x` is the input (dynamic batch), ops return their output name."""

    def __init__(self, shape=(1, 3, 8, 8), seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape[1:]])
        self.shape = shape
        self.count = 0

    def const(self, value, name: str | None = None) -> str:
        self.count += 1
        name = name or f"c{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op: str, inputs, name: str | None = None, outputs: int = 1, **attrs):
        self.count += 1
        name = name or f"{op.lower()}{self.count}"
        outs = [f"{name}_out{k}" if k else f"{name}_out" for k in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs[0] if outputs == 1 else outs

    def weight(self, *shape) -> str:
        return self.const((self.rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32))

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, name: str | None = None,
             bias: bool = True) -> str:
        inputs = [x, self.weight(cout, cin // group, k, k)]
        if bias:
            inputs.append(self.const(self.rng.standard_normal(cout).astype(np.float32)))
        return self.op("Conv", inputs, name=name, kernel_shape=[k, k], pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int, name: str | None = None) -> str:
        r = self.rng
        params = [r.uniform(0.5, 1.5, c), r.standard_normal(c), r.standard_normal(c) * 0.1, r.uniform(0.5, 1.5, c)]
        return self.op("BatchNormalization", [x, *(self.const(p.astype(np.float32)) for p in params)], name=name)

    def gemm(self, x: str, fin: int, fout: int, name: str | None = None) -> str:
        return self.op("Gemm", [x, self.weight(fout, fin), self.const(np.zeros(fout, np.float32))], name=name,
                       transB=1)

    def model(self, *outputs: str, opset: int = 17) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "tiny", [self.input],
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                                  initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model = onnx.shape_inference.infer_shapes(model)  # gives the outputs their (symbolic) shapes
        onnx.checker.check_model(model)
        return model


def out_group(graph, layer: str) -> int:
    (gid,) = graph.layers[layer].out_groups
    return gid


# ---- one graph per rule ---------------------------------------------------------------------------------------
def test_unary_ops_pass_channels_and_graph_io_is_frozen():
    n = Net()
    y = n.op("Relu", [n.conv("x", 3, 8, name="c1")])
    y = n.op("Clip", [n.op("Sigmoid", [y]), n.const(np.float32(0)), n.const(np.float32(1))])
    y = n.conv(n.op("Dropout", [y]), 8, 4, name="c2")
    g = analyze(n.model(y))
    assert g.layers["c2"].in_groups == g.layers["c1"].out_groups
    assert g.groups[out_group(g, "c1")].prunable
    assert g.groups[g.layers["c1"].in_groups[0]].frozen_by == "graph input 'x'"
    assert g.groups[out_group(g, "c2")].frozen_by == "graph output 'c2_out'"


def test_residual_add_ties_both_branches_and_bias_constants():
    n = Net()
    a = n.conv("x", 3, 8, name="c1")
    b = n.conv(n.op("Relu", [a]), 8, 8, name="c2")
    s = n.op("Add", [a, b])
    s = n.op("Mul", [s, n.const(np.ones((8, 1, 1), np.float32))], name="scale")
    y = n.conv(s, 8, 4, name="c3")
    g = analyze(n.model(y))
    gid = out_group(g, "c1")
    assert out_group(g, "c2") == gid and g.layers["c3"].in_groups == [gid]
    assert any(m.node == "scale" and m.role == "param" for m in g.groups[gid].members)
    assert [p.node for p in g.groups[gid].producers] == ["c1", "c2"]


def test_squeeze_excitation_mul_ties_scale_to_features():
    n = Net()
    a = n.conv("x", 3, 8, name="c1")
    s = n.op("GlobalAveragePool", [a])
    s = n.op("Sigmoid", [n.conv(n.op("Relu", [n.conv(s, 8, 2, k=1, name="fc1")]), 2, 8, k=1, name="fc2")])
    y = n.conv(n.op("Mul", [a, s]), 8, 4, name="c3")
    g = analyze(n.model(y))
    assert out_group(g, "fc2") == out_group(g, "c1")
    assert g.layers["fc1"].in_groups == [out_group(g, "c1")]


def test_batchnorm_and_instancenorm_params_are_members():
    n = Net()
    a = n.bn(n.conv("x", 3, 8, name="c1"), 8, name="bn")
    a = n.op("InstanceNormalization", [a, n.const(np.ones(8, np.float32)), n.const(np.zeros(8, np.float32))],
             name="inorm")
    g = analyze(n.model(n.conv(a, 8, 4, name="c2")))
    members = g.groups[out_group(g, "c1")].members
    assert sum(m.node == "bn" for m in members) == 4 and sum(m.node == "inorm" for m in members) == 2


def test_depthwise_conv_ties_input_and_output():
    n = Net()
    a = n.conv("x", 3, 8, k=1, name="pw1")
    d = n.conv(a, 8, 8, group=8, name="dw")
    m = n.conv(d, 8, 16, group=8, name="dwm")  # channel multiplier 2: still one channel per group
    g = analyze(n.model(n.conv(m, 16, 4, k=1, name="pw2")))
    gid = out_group(g, "pw1")
    assert g.layers["dw"].in_groups == g.layers["dw"].out_groups == [gid]
    assert g.layers["dwm"].out_groups == [gid]
    assert g.groups[gid].size == 8 and g.groups[gid].prunable


def test_grouped_conv_folds_units_across_groups():
    n = Net()
    a = n.conv("x", 3, 8, k=1, name="c1")
    b = n.conv(a, 8, 12, group=2, name="grouped")
    g = analyze(n.model(n.conv(b, 12, 4, k=1, name="c3")))
    gin, gout = g.groups[out_group(g, "c1")], g.groups[out_group(g, "grouped")]
    assert (gin.size, gin.channels, gin.producers[0].block) == (4, 8, 2)
    assert (gout.size, gout.channels) == (6, 12)
    assert gin.prunable and gout.prunable


def test_concat_offsets_for_consumers():
    n = Net()
    a = n.conv("x", 3, 4, name="a")
    b = n.conv("x", 3, 6, name="b")
    y = n.conv(n.op("Concat", [a, b], axis=1, name="cat"), 10, 5, name="c")
    g = analyze(n.model(y))
    ga, gb = out_group(g, "a"), out_group(g, "b")
    assert g.layers["c"].in_groups == [ga, gb]
    offsets = {gid: [(s.offset, s.count) for s in g.groups[gid].consumers if s.node == "c"] for gid in (ga, gb)}
    assert offsets == {ga: [(0, 4)], gb: [(4, 6)]}
    assert any(m.role == "concat" and m.offset == 4 for m in g.groups[gb].members)


def test_concat_on_spatial_axis_unifies():
    n = Net()
    y = n.op("Concat", [n.conv("x", 3, 4, name="a"), n.conv("x", 3, 4, name="b")], axis=2)
    g = analyze(n.model(n.conv(y, 4, 2, name="c")))
    assert out_group(g, "a") == out_group(g, "b") == g.layers["c"].in_groups[0]


def test_flatten_then_gemm_sees_hw_blocks():
    n = Net(shape=(1, 3, 4, 4))
    y = n.gemm(n.op("Flatten", [n.op("Relu", [n.conv("x", 3, 5, name="c1")])], axis=1), 80, 10, name="fc")
    g = analyze(n.model(y))
    (slot,) = [s for s in g.groups[out_group(g, "c1")].consumers if s.node == "fc"]
    assert (slot.offset, slot.count, slot.block) == (0, 80, 16)


def test_gemm_chain_and_matmul_features():
    n = Net(shape=(1, 16))
    n.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])
    h = n.op("Relu", [n.gemm("x", 16, 32, name="fc1")])
    y = n.gemm(h, 32, 10, name="fc2")
    g = analyze(n.model(y))
    assert g.layers["fc2"].in_groups == [out_group(g, "fc1")] and g.groups[out_group(g, "fc1")].prunable

    n = Net()
    n.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 16])
    h = n.op("MatMul", ["x", n.weight(16, 32)], name="mm1")
    h = n.op("Relu", [n.op("Add", [h, n.const(np.ones(32, np.float32))], name="bias")])
    g = analyze(n.model(n.op("MatMul", [h, n.weight(32, 8)], name="mm2")))
    gid = out_group(g, "mm1")
    assert g.layers["mm2"].in_groups == [gid] and g.groups[gid].prunable
    assert any(m.node == "bias" for m in g.groups[gid].members)


def test_transpose_to_channels_last_and_back():
    n = Net()
    a = n.op("Transpose", [n.conv("x", 3, 6, name="c1")], perm=[0, 2, 3, 1])
    a = n.op("Mul", [a, n.const(np.arange(6, dtype=np.float32))], name="scale")
    a = n.op("Transpose", [a], perm=[0, 3, 1, 2])
    g = analyze(n.model(n.conv(a, 6, 2, name="c2")))
    gid = out_group(g, "c1")
    assert g.layers["c2"].in_groups == [gid] and g.groups[gid].prunable
    assert [m.axis for m in g.groups[gid].members if m.node == "scale"] == [0]


def test_reductions_over_space_keep_channels_over_channels_freeze():
    n = Net()
    a = n.conv("x", 3, 6, name="c1")
    r = n.op("ReduceMean", [a, n.const(np.array([2, 3]))], keepdims=0, name="mean")
    y1 = n.gemm(r, 6, 3, name="fc")
    b = n.conv("x", 3, 6, name="c2")
    y2 = n.op("ReduceMax", [b, n.const(np.array([1]))], keepdims=1, name="chmax")
    g = analyze(n.model(y1, y2, opset=18))
    assert g.layers["fc"].in_groups == [out_group(g, "c1")] and g.groups[out_group(g, "c1")].prunable
    assert "ReduceMax 'chmax'" in g.groups[out_group(g, "c2")].frozen_by


@pytest.mark.parametrize("op,attrs", [("Softmax", {"axis": 1}), ("LRN", {"size": 3}),
                                      ("DepthToSpace", {"blocksize": 2})])
def test_cross_channel_or_unknown_ops_freeze_with_reason(op, attrs):
    n = Net()
    a = n.op(op, [n.conv("x", 3, 8, name="c1")], name="mixer", **attrs)
    c = 2 if op == "DepthToSpace" else 8
    g = analyze(n.model(n.conv(a, c, 2, name="c2")))
    frozen = g.groups[out_group(g, "c1")].frozen_by
    assert frozen is not None and f"{op} 'mixer'" in frozen
    assert op not in RULES or op == "Softmax"
    assert g.groups[g.layers["c2"].in_groups[0]].frozen_by  # what comes out of it is not tracked either


def test_softmax_over_space_and_spatial_pad_pass():
    n = Net()
    a = n.op("Softmax", [n.conv("x", 3, 8, name="c1")], axis=3)
    a = n.op("Pad", [a, n.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]))], name="pad")
    g = analyze(n.model(n.conv(a, 8, 2, name="c2")))
    assert g.groups[out_group(g, "c1")].prunable
    n = Net()
    a = n.op("Pad", [n.conv("x", 3, 8, name="c1"), n.const(np.array([0, 1, 0, 0, 0, 1, 0, 0]))], name="pad")
    g = analyze(n.model(n.conv(a, 10, 2, name="c2")))
    assert "Pad 'pad'" in g.groups[out_group(g, "c1")].frozen_by


def test_slice_and_split_of_the_channel_axis():
    n = Net()
    a = n.conv("x", 3, 8, name="c1")
    part = n.op("Slice", [a, n.const(np.array([2])), n.const(np.array([6])), n.const(np.array([1]))], name="sl")
    lo, hi = n.op("Split", [n.conv("x", 3, 8, name="c2"), n.const(np.array([3, 5]))], axis=1, outputs=2,
                  name="sp")
    y = n.op("Add", [n.conv(part, 4, 2, name="c3"), n.conv(a, 8, 2, name="c4")])
    z = n.op("Add", [n.conv(lo, 3, 2, name="c5"), n.conv(hi, 5, 2, name="c6")])
    g = analyze(n.model(y, z))
    gid = out_group(g, "c1")
    assert g.layers["c3"].in_groups == [gid] and g.groups[gid].prunable
    assert [(m.offset, m.count) for m in g.groups[gid].members if m.role == "slice"] == [(0, 4)]
    assert g.layers["c5"].in_groups == g.layers["c6"].in_groups == [out_group(g, "c2")]


def test_channel_shuffle_is_a_permutation():
    n = Net()
    a = n.conv("x", 3, 4, name="a")
    b = n.conv("x", 3, 4, name="b")
    s = n.op("Reshape", [n.op("Concat", [a, b], axis=1), n.const(np.array([0, 2, 4, 8, 8]))])
    s = n.op("Reshape", [n.op("Transpose", [s], perm=[0, 2, 1, 3, 4]), n.const(np.array([0, 8, 8, 8]))],
             name="merge")
    g = analyze(n.model(n.conv(s, 8, 2, name="c")))
    ga, gb = out_group(g, "a"), out_group(g, "b")
    assert ga != gb and g.groups[ga].prunable and g.groups[gb].prunable
    pos = g.positions("merge_out")  # a0 b0 a1 b1 …
    assert pos.gid.tolist() == [ga, gb] * 4 and pos.unit.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_split_channel_axis_folds_into_rectangles():
    n = Net()
    s = n.op("Reshape", [n.conv("x", 3, 8, name="a"), n.const(np.array([0, 2, 4, 8, 8]))])
    s = n.op("Reshape", [n.op("Relu", [s]), n.const(np.array([0, 8, 8, 8]))])
    g = analyze(n.model(n.conv(s, 8, 2, name="c")))
    grp = g.groups[out_group(g, "a")]
    assert (grp.size, grp.channels, grp.producers[0].block, grp.prunable) == (4, 8, 2, True)


def test_channel_count_used_as_data_freezes():
    n = Net()
    a = n.conv("x", 3, 8, name="c1")
    count = n.op("Cast", [n.op("Gather", [n.op("Shape", [a]), n.const(np.array(1))])], to=TensorProto.FLOAT)
    y = n.op("Div", [a, count], name="div")
    g = analyze(n.model(n.conv(y, 8, 2, name="c2")))
    assert "uses a channel count" in g.groups[out_group(g, "c1")].frozen_by


def test_untracked_operand_freezes_what_it_meets():
    n = Net()
    a = n.conv("x", 3, 8, name="c1")
    noise = n.op("RandomNormalLike", [a], name="rnd")
    g = analyze(n.model(n.conv(n.op("Add", [a, noise]), 8, 2, name="c2")))
    assert "RandomNormalLike 'rnd'" in g.groups[out_group(g, "c1")].frozen_by


# ---- real architectures ---------------------------------------------------------------------------------------
@functools.cache
def zoo_graph(arch: str):
    model = onnx.load(str(zoo.export(arch)))
    return model, analyze(model)


def test_prunable_fraction_per_architecture(zoo_arch):
    model, graph = zoo_graph(zoo_arch)
    frac = prunable_fraction(graph)
    assert frac >= 0.9, (zoo_arch, frac)
    convs = [lc for lc in graph.layers.values() if lc.op == "Conv"]
    assert len(convs) == sum(layer.op == "Conv" for layer in find_layers(model))
    for lc in convs:  # whatever is not prunable says why
        for gid in lc.out_groups:
            assert graph.groups[gid].prunable or graph.groups[gid].frozen_by


def test_resnet18_residual_stages_are_one_group_each():
    _, g = zoo_graph("resnet18")
    stages = []
    for k in range(1, 5):
        ids = {out_group(g, f"/layer{k}/layer{k}.{b}/conv2/Conv") for b in (0, 1)}
        if k > 1:
            ids.add(out_group(g, f"/layer{k}/layer{k}.0/downsample/downsample.0/Conv"))
        else:
            ids.add(out_group(g, "/conv1/Conv"))
        assert len(ids) == 1
        stages.append(ids.pop())
        assert g.groups[stages[-1]].prunable
    assert len(set(stages)) == 4
    inner = {out_group(g, f"/layer{k}/layer{k}.{b}/conv1/Conv") for k in range(1, 5) for b in (0, 1)}
    assert len(inner) == 8 and not inner & set(stages)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "mnasnet0_5",
                                  "shufflenet_v2_x1_0"])
def test_depthwise_pairs_are_tied(arch):
    model, g = zoo_graph(arch)
    depthwise = [layer for layer in find_layers(model) if layer.depthwise]
    assert depthwise
    for layer in depthwise:
        lc = g.layers[layer.name]
        assert lc.in_groups == lc.out_groups and g.groups[lc.out_groups[0]].prunable


def test_squeezenet_fire_concat_offsets():
    _, g = zoo_graph("squeezenet1_1")
    for fire, nxt in ((3, "/features/features.4/squeeze/Conv"), (12, "/classifier/classifier.1/Conv")):
        e1 = out_group(g, f"/features/features.{fire}/expand1x1/Conv")
        e3 = out_group(g, f"/features/features.{fire}/expand3x3/Conv")
        assert g.layers[nxt].in_groups == [e1, e3]
        width = g.groups[e1].channels
        assert [s.offset for s in g.groups[e1].consumers if s.node == nxt] == [0]
        assert [s.offset for s in g.groups[e3].consumers if s.node == nxt] == [width]
    final = g.groups[out_group(g, "/classifier/classifier.1/Conv")]
    assert final.frozen_by == "graph output 'logits'"


def test_googlenet_and_densenet_concats():
    _, g = zoo_graph("googlenet")
    branches = ["/inception3a/branch1/conv/Conv", "/inception3a/branch2/branch2.1/conv/Conv",
                "/inception3a/branch3/branch3.1/conv/Conv", "/inception3a/branch4/branch4.1/conv/Conv"]
    assert g.layers["/inception3b/branch1/conv/Conv"].in_groups == [out_group(g, b) for b in branches]
    _, g = zoo_graph("densenet121")
    grown = [out_group(g, "/features/conv0/Conv")] + \
        [out_group(g, f"/features/denseblock1/denselayer{k}/conv2/Conv") for k in range(1, 6)]
    assert g.layers["/features/denseblock1/denselayer6/conv1/Conv"].in_groups == grown
    assert all(g.groups[gid].prunable for gid in grown)


def test_regnet_grouped_convs_prune_in_units_of_groups():
    model, g = zoo_graph("regnet_x_400mf")
    grouped = [layer for layer in find_layers(model) if layer.groups > 1 and not layer.depthwise]
    assert grouped
    for layer in grouped:
        (gid,) = g.layers[layer.name].in_groups
        group = g.groups[gid]
        assert group.prunable and group.size * layer.groups == layer.cin


# ---- inspect -------------------------------------------------------------------------------------------------
def test_inspect_reports_groups(monkeypatch):
    from typer.testing import CliRunner

    from onnxecc.cli import app
    from onnxecc.inspection import inspect

    path = str(zoo.export("squeezenet1_1"))
    result = inspect(path).as_dict()
    assert result["totals"]["groups"] == len(result["groups"]) and result["totals"]["prunable_groups"] > 20
    layer = next(x for x in result["layers"] if x["name"] == "/features/features.4/squeeze/Conv")
    assert len(layer["in_groups"]) == 2 and len(layer["out_groups"]) == 1
    frozen = [grp for grp in result["groups"] if not grp["prunable"]]
    assert {grp["frozen_by"] for grp in frozen} == {"graph input 'input'", "graph output 'logits'"}
    json.dumps(result)

    from onnxecc import cli

    # rich fixed the console's width when onnxecc.cli was imported (80 without a terminal, as under pytest-xdist)
    monkeypatch.setattr(cli.console, "width", 300)
    out = CliRunner().invoke(app, ["inspect", path])
    assert out.exit_code == 0, out.output
    assert "in grp" in out.output and "channel groups" in out.output
    assert "frozen by graph output 'logits'" in out.output
    out = CliRunner().invoke(app, ["inspect", path, "--json"])
    assert json.loads(out.output)["groups"]
