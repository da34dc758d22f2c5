"""Graphs as exporters other than ours write them (#24 item 4): BatchNormalization kept in the graph (paddle2onnx,
tf2onnx, caffe2, torch with training=PRESERVE), HardSigmoid SE blocks and Clip as ReLU6 in every form, opset 9-12
attribute forms and Resize/Upsample to a size read from a tensor's shape, IR-3 files with Dropout masks.

Each graph is a real export (torch.onnx of a torch architecture written here, the onnx package's own caffe2 test
model, PaddleOCR's classifier shipped in rapidocr-onnxruntime) or, for the Clip forms no torch export writes, a
graph built node by node the way paddle2onnx writes it (a Constant node for every constant). The references are
computed independently of the tool: the torch module with the dropped channels zeroed by forward hooks, or the
ONNX graph with the dropped channels' consumer weights zeroed here in numpy.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from onnxecc.compress import CompressOptions, compress
from onnxecc.graph import runtime
from onnxecc.graph.channels import analyze
from onnxecc.graph.data import Dataset
from onnxecc.graph.surgery import prune_channels
from onnxecc.train.bridge import to_torch
from onnxecc.train.finetune import TrainConfig
from onnxecc.train.masked import MaskedModel

SIDE = 32


# ---- a paddle-style network, exported by torch with its BatchNorms kept ---------------------------------------
class _SE(nn.Module):
    """Squeeze-and-excite as MobileNetV3 / PP-LCNet write it: Conv → ReLU → Conv → HardSigmoid → Mul."""

    def __init__(self, c: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // 4, 1)
        self.fc2 = nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        s = torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))
        return x * nn.functional.hardsigmoid(self.fc2(s))


def _cbn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: nn.Module | None = None):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         act if act is not None else nn.ReLU6())


class PaddleStyleNet(nn.Module):
    """Stem Conv-BN-HardSwish, depthwise Conv-BN-ReLU6 (Clip), HardSigmoid SE, pointwise and residual Conv-BN-ReLU6,
    optionally an upsampling to the stem's size read from its shape (`interpolate(size=...)`), mean, Linear.

    Its prunable channel groups, by size: 16 (stem = depthwise = SE output), 4 (SE bottleneck), 24 (pointwise and
    residual branch); `MASKED` names the modules whose outputs hold each."""

    MASKED = {16: ("stem", "dw"), 4: ("se.fc1",), 24: ("pw", "b2")}

    def __init__(self, upsample: bool = False, classes: int = 5):
        super().__init__()
        self.stem = _cbn(3, 16, stride=2, act=nn.Hardswish())
        self.dw = _cbn(16, 16, groups=16)
        self.se = _SE(16)
        self.pw = _cbn(16, 24, k=1)
        self.b2 = _cbn(24, 24)
        self.upsample = upsample
        self.head = nn.Linear(24, classes)

    def forward(self, x):
        y = self.stem(x)
        y = self.pw(self.se(self.dw(y)))
        y = y + self.b2(y)
        if self.upsample:
            y = nn.functional.interpolate(y, size=(x.shape[2], x.shape[3]), mode="nearest")
        return self.head(y.mean((2, 3)))


def _net(upsample: bool = False) -> PaddleStyleNet:
    torch.manual_seed(0)
    net = PaddleStyleNet(upsample).eval()
    for m in net.modules():  # trained-looking BatchNorms: folded or not, they change the function
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


def _export(net: nn.Module, path: Path, opset: int) -> Path:
    """torch's TorchScript exporter with training=PRESERVE: the BatchNorms stay nodes of the graph."""
    torch.onnx.export(net, (torch.randn(1, 3, SIDE, SIDE),), str(path), dynamo=False, opset_version=opset,
                      input_names=["x"], output_names=["y"], training=torch.onnx.TrainingMode.PRESERVE,
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return path


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIDE, SIDE)).astype(np.float32)


def _masked_reference(net: nn.Module, keep: dict[int, np.ndarray], sizes: dict[int, int], x: np.ndarray) -> np.ndarray:
    """The torch network with every dropped channel zeroed where its group's modules output it: what the pruned
    graph must compute (a dropped channel contributes nothing anywhere)."""
    hooks = []
    for gid, kept in keep.items():
        mask = torch.zeros(sizes[gid])
        mask[torch.as_tensor(kept)] = 1
        for name in net.MASKED[sizes[gid]]:
            module = net.get_submodule(name)
            hooks.append(module.register_forward_hook(lambda _m, _i, out, mask=mask: out * mask.view(1, -1, 1, 1)))
    try:
        with torch.no_grad():
            return net(torch.as_tensor(x)).numpy()
    finally:
        for h in hooks:
            h.remove()


def _load_weights(net: nn.Module, model: onnx.ModelProto) -> nn.Module:
    """`net` with the values of the initializers named like its state (torch names them so when exporting)."""
    state = net.state_dict()
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in state}
    assert {k for k in state if not k.endswith("num_batches_tracked")} <= set(values)
    net.load_state_dict({k: torch.as_tensor(values[k]) if k in values else v for k, v in state.items()})
    return net


def _bn_outputs(model: onnx.ModelProto, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """onnxruntime's per-channel mean and standard deviation (ddof 1, like torch) of every BatchNormalization output."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    names = [n.output[0] for n in model.graph.node if n.op_type == "BatchNormalization"]
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    sess = runtime.session(model)
    outs = sess.run(names, {sess.get_inputs()[0].name: x})
    per_channel = [np.moveaxis(o, 1, 0).reshape(o.shape[1], -1).astype(np.float64) for o in outs]
    return {n: (c.mean(1), c.std(1, ddof=1)) for n, c in zip(names, per_channel)}


def _conv_macs(model: onnx.ModelProto) -> int:
    """MACs of the Conv and Gemm nodes (batch 1), counted here from the shapes onnx infers: weight size × output
    pixels for a Conv, weight size for a Gemm."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in (*inferred.graph.value_info, *inferred.graph.output)}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            total += int(np.prod(shapes[node.input[1]])) * int(np.prod(shapes[node.output[0]][2:]))
        elif node.op_type == "Gemm":
            total += int(np.prod(shapes[node.input[1]]))
    return total


def _by_size(graph) -> dict[int, int]:
    """Prunable group id → its size (unique per group in `PaddleStyleNet`)."""
    sizes = {g.id: g.size for g in graph.prunable_groups}
    assert sorted(sizes.values()) == sorted(PaddleStyleNet.MASKED), sizes
    return sizes


# ---- BatchNorm kept in the graph ------------------------------------------------------------------------------
def test_batchnorm_kept_in_the_graph_is_recalibrated_trained_and_written_back_exactly(tmp_path):
    """The BatchNorms' weight and bias carry the recalibration (the convolutions have no bias), the torch training
    writes back into the graph with its BatchNorm nodes, and the pruned graph computes what the torch architecture
    computes with the written-back weights and the dropped channels zeroed."""
    net = _net()
    proto = onnx.load(_export(net, tmp_path / "bn.onnx", opset=13))
    assert _ops(proto).count("BatchNormalization") == 4 and "HardSigmoid" in _ops(proto)
    graph = analyze(proto)
    sizes = _by_size(graph)
    x = _inputs(64)
    with torch.no_grad():
        y = net(torch.as_tensor(x)).argmax(1).numpy()
    data = Dataset(x, y, x[:0], y[:0], "test")
    mm = MaskedModel(proto, graph, data, TrainConfig(epochs=1, lr=1e-3))
    keep = {g: np.arange(0, n, 2) for g, n in sizes.items()}  # every other channel
    mm.set_keep(keep)
    original = _bn_outputs(proto, x)

    info = mm.recalibrate()
    assert info["layers"] == 4 + 2  # the four BatchNorms and the two biased SE convolutions
    assert info["samples"] == len(x)  # calibrated on every sample: the statistics below are over the same ones
    after = _bn_outputs(mm.write_back(), x)
    for name, (mean, std) in original.items():
        live = (after[name][0] != 0) | (after[name][1] != 0)
        assert live.sum() == len(live) // 2, name  # every other channel pruned, exactly zero
        np.testing.assert_allclose(after[name][0][live], mean[live], atol=2e-4 * (1 + np.abs(mean).max()), err_msg=name)
        np.testing.assert_allclose(after[name][1][live], std[live], rtol=1e-3, atol=1e-5, err_msg=name)

    mm.train(1)
    trained = mm.write_back()
    assert _ops(trained) == _ops(proto)  # the graph is the original one, BatchNorms included
    pruned = prune_channels(trained, keep, graph)
    x_test = _inputs(8, seed=1)
    got = runtime.session(pruned).run(None, {"x": x_test})[0]
    want = _masked_reference(_load_weights(_net(), trained), keep, sizes, x_test)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert not np.allclose(want, net(torch.as_tensor(x_test)).detach().numpy(), atol=1e-3)  # not vacuous


def test_admm_on_a_graph_with_batchnorm_keeps_its_running_variances(tmp_path):
    """The default method with data (ADMM) on a graph with BatchNorm nodes: the running statistics are constants of
    the function, never pulled towards zero by the proximal step (a negative variance made every output NaN and the
    run died). The output meets the budget by a count made here and keeps its BatchNorms, their variances positive."""
    net = _net()
    path = _export(net, tmp_path / "bn.onnx", opset=13)
    x = _inputs(96)
    with torch.no_grad():
        y = net(torch.as_tensor(x)).argmax(1).numpy()
    np.savez(tmp_path / "data.npz", x=x, y=y)
    out = tmp_path / "out.onnx"
    result = compress(path, "0.5", out, CompressOptions(data=str(tmp_path / "data.npz"), epochs=2, round_to=1,
                                                      measure_latency=False, closed_loop=False))
    original, written = onnx.load(path), onnx.load(out)
    assert _conv_macs(written) <= 0.5 * _conv_macs(original)
    assert _ops(written).count("BatchNormalization") == 4
    for node in written.graph.node:
        if node.op_type == "BatchNormalization":
            var = numpy_helper.to_array(next(t for t in written.graph.initializer if t.name == node.input[4]))
            assert (var > 0).all(), node.name
    recal = [h for h in result.history if h["phase"] == "recalibrate"]
    assert recal and recal[0]["layers"] == 4 + 2
    assert np.isfinite(runtime.session(written).run(None, {"x": x[:4]})[0]).all()


def _paddleocr_classifier(tmp_path: Path) -> Path:
    """PaddleOCR's text-orientation classifier as rapidocr-onnxruntime ships it (paddle2onnx, opset 11, BatchNorm
    kept, HardSigmoid SE), its symbolic height and width fixed to 48×192 in a copy."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None:
        pytest.skip("rapidocr-onnxruntime is not installed (pyproject's dev extra)")
    source = Path(next(iter(spec.submodule_search_locations))) / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    model = onnx.load(source)
    for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim, (1, 3, 48, 192)):
        if not dim.HasField("dim_value"):
            dim.Clear()
            dim.dim_value = value
    path = tmp_path / "cls.onnx"
    onnx.save(model, path)
    return path


def test_paddleocr_classifier_batchnorms_are_recalibrated_and_the_pruned_graph_matches_torch(tmp_path):
    proto = onnx.load(_paddleocr_classifier(tmp_path))
    assert _ops(proto).count("BatchNormalization") == 35 and _ops(proto).count("Constant") > 300
    graph = analyze(proto)
    assert len(graph.prunable_groups) == 26
    x = np.random.default_rng(0).uniform(-1, 1, (48, 3, 48, 192)).astype(np.float32)
    mm = MaskedModel(proto, graph, Dataset(x, None, x[:0], None, "test"), TrainConfig())
    keep = {g.id: np.arange(0, g.size, 2) for g in graph.prunable_groups}
    mm.set_keep(keep)
    assert mm.recalibrate()["layers"] >= 35  # was 0: no convolution of this graph has a bias
    pruned = prune_channels(mm.write_back(), keep, graph)
    got = runtime.session(pruned).run(None, {"x": x[:8]})[0]
    np.testing.assert_allclose(got, mm.tm.run(x[:8]), rtol=1e-4, atol=1e-5)


def test_paddleocr_recogniser_with_symbolic_width_converts_to_torch():
    """The recogniser reshapes with a computed shape before three BatchNorms: onnx infers no shape there, and
    onnx2torch needs their rank. MaskedModel converts it at the data's size; the module then reads any width."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None:
        pytest.skip("rapidocr-onnxruntime is not installed (pyproject's dev extra)")
    proto = onnx.load(Path(next(iter(spec.submodule_search_locations))) / "models" / "ch_PP-OCRv4_rec_infer.onnx")
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert not dims[3].HasField("dim_value")  # the width is symbolic
    from onnxecc.graph.layers import with_static_shapes

    graph = analyze(proto, with_static_shapes(proto, input_shapes={"x": (1, 3, 48, 320)}))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 48, 320)).astype(np.float32)
    mm = MaskedModel(proto, graph, Dataset(x, None, x[:0], None, "test"), TrainConfig(), recalibration=False)
    sess = runtime.session(proto)
    for width in (320, 640):
        x = np.random.default_rng(width).uniform(-1, 1, (1, 3, 48, width)).astype(np.float32)
        np.testing.assert_allclose(mm.tm.run(x), sess.run(None, {"x": x})[0], rtol=1e-3, atol=1e-5)


# ---- HardSigmoid SE and Clip as ReLU6, written node by node as paddle2onnx writes them ---------------------------
def _clip(opset: int, form: str, x: str, out: str, nodes: list) -> None:
    if form == "attributes":  # opset < 11
        nodes.append(helper.make_node("Clip", [x], [out], min=0.0, max=6.0))
        return
    lo, hi = f"{out}_min", f"{out}_max"
    shape = (1,) if form == "inputs [1]" else ()  # paddle2onnx writes 1-element bounds
    nodes.append(helper.make_node("Constant", [], [hi], value=numpy_helper.from_array(np.full(shape, 6, np.float32))))
    if form == "max only":
        nodes.append(helper.make_node("Clip", [x, "", hi], [out]))
        return
    nodes.append(helper.make_node("Constant", [], [lo], value=numpy_helper.from_array(np.zeros(shape, np.float32))))
    nodes.append(helper.make_node("Clip", [x, lo, hi], [out]))


def _se_graph(opset: int, clip: str, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x → Conv → BatchNorm → Clip (ReLU6) → SE (GlobalAveragePool → Conv → Relu → Conv → HardSigmoid → Mul) →
    Conv → y, every constant but the weights a Constant node. Returns the model and its weights."""
    rng = np.random.default_rng(seed)
    w = {"w1": rng.standard_normal((16, 3, 3, 3)), "gamma": rng.uniform(0.5, 1.5, 16), "beta": rng.uniform(-.2, .2, 16),
         "mean": rng.uniform(-.2, .2, 16), "var": rng.uniform(.5, 1.5, 16), "se1": rng.standard_normal((4, 16, 1, 1)),
         "se1_b": rng.standard_normal(4), "se2": rng.standard_normal((16, 4, 1, 1)), "se2_b": rng.standard_normal(16),
         "w2": rng.standard_normal((8, 16, 1, 1))}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"], name="bn1")]
    _clip(opset, clip, "bn", "act", nodes)
    nodes += [helper.make_node("GlobalAveragePool", ["act"], ["pool"]),
              helper.make_node("Conv", ["pool", "se1", "se1_b"], ["s1"], name="se_conv1"),
              helper.make_node("Relu", ["s1"], ["s1r"]),
              helper.make_node("Conv", ["s1r", "se2", "se2_b"], ["s2"], name="se_conv2"),
              helper.make_node("HardSigmoid", ["s2"], ["gate"], alpha=0.2, beta=0.5),
              helper.make_node("Mul", ["act", "gate"], ["se"]),
              helper.make_node("Conv", ["se", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "paddle_style",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model, w


@pytest.mark.parametrize("opset,clip", [(9, "attributes"), (11, "inputs"), (12, "inputs [1]"), (11, "max only")])
def test_hardsigmoid_se_and_clip_relu6_are_prunable_exact_and_train(opset, clip):
    """Groups, surgery, the torch module and its recalibration, on each form of Clip a ReLU6 takes."""
    model, w = _se_graph(opset, clip)
    graph = analyze(model)
    sizes = sorted(g.size for g in graph.prunable_groups)
    assert sizes == [4, 16], [(g.size, g.frozen_by) for g in graph.groups]  # conv1 = BN = SE output; SE bottleneck
    main = next(g.id for g in graph.prunable_groups if g.size == 16)
    bottleneck = next(g.id for g in graph.prunable_groups if g.size == 4)
    keep = {main: np.array([0, 3, 4, 9, 10, 15]), bottleneck: np.array([1, 2])}
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    got = runtime.session(prune_channels(model, keep, graph)).run(None, {"x": x})[0]

    reference = onnx.ModelProto()  # the dropped channels' consumer weights zeroed here: they contribute nothing
    reference.CopyFrom(model)
    drop16 = np.setdiff1d(np.arange(16), keep[main])
    drop4 = np.setdiff1d(np.arange(4), keep[bottleneck])
    zeroed = {"se1": w["se1"].copy(), "w2": w["w2"].copy(), "se2": w["se2"].copy()}
    zeroed["se1"][:, drop16] = 0
    zeroed["w2"][:, drop16] = 0
    zeroed["se2"][:, drop4] = 0
    for t in reference.graph.initializer:
        if t.name in zeroed:
            t.CopyFrom(numpy_helper.from_array(zeroed[t.name], t.name))
    want = runtime.session(reference).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

    tm = to_torch(model)  # training needs the torch module: it must compute what onnxruntime computes
    np.testing.assert_allclose(tm.run(x), runtime.session(model).run(None, {"x": x})[0], rtol=1e-4, atol=1e-4)
    samples = np.random.default_rng(2).standard_normal((16, 3, 16, 16)).astype(np.float32)
    mm = MaskedModel(model, graph, Dataset(samples, None, samples[:0], None, "test"), TrainConfig())
    mm.set_keep(keep)
    assert mm.recalibrate()["layers"] == 3  # the BatchNorm (its Conv has no bias) and the two SE convolutions


# ---- opset 9-12 exports: Upsample / Resize to a size read from the tensor's shape -------------------------------
@pytest.mark.parametrize("opset,resize", [(9, "Upsample"), (11, "Resize")])
def test_old_opset_export_with_upsampling_to_a_computed_size_compresses_end_to_end(tmp_path, opset, resize):
    """torch writes `interpolate(size=...)` as Upsample (opset 9: scales from Shape) or Resize (opset 10-12: sizes
    = Concat(Shape(y)[0:2], H, W)): computed at run time from the pruned tensor, they need no rewriting and freeze
    nothing. The data-free output meets the budget; with the channels the projection kept (found by their
    unchanged weight rows), it computes what the torch network computes with the others zeroed; and the graph
    converts to torch (onnx2torch has no Upsample: the model is converted up to an opset with Resize)."""
    net = _net(upsample=True)
    path = _export(net, tmp_path / f"opset{opset}.onnx", opset=opset)
    proto = onnx.load(path)
    assert resize in _ops(proto) and "Shape" in _ops(proto) and proto.opset_import[0].version == opset
    graph = analyze(proto)
    assert all(g.frozen_by is None for g in graph.groups if g.size in (4, 16, 24)), \
        [(g.size, g.frozen_by) for g in graph.groups]
    sizes = _by_size(graph)

    out = tmp_path / "out.onnx"
    compress(path, "0.5", out, CompressOptions(round_to=1, measure_latency=False, closed_loop=False))
    written = onnx.load(out)
    assert _conv_macs(written) <= 0.5 * _conv_macs(proto)
    old = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}

    def kept_rows(name: str, columns=slice(None)) -> np.ndarray:
        """Which rows of the original weight `name` the output kept (projection leaves weights as they were)."""
        before = old[name][:, columns]
        return np.array([np.flatnonzero((before == row).reshape(len(before), -1).all(1))[0] for row in new[name]])

    group = {n: g for g, n in sizes.items()}
    keep = {group[16]: kept_rows("stem.0.weight")}  # the stem reads the graph input, which is never pruned
    keep[group[4]] = kept_rows("se.fc1.weight", keep[group[16]])
    keep[group[24]] = kept_rows("pw.0.weight", keep[group[16]])
    assert sum(len(k) for k in keep.values()) < 16 + 4 + 24  # something was pruned
    x = _inputs(4, seed=2)
    got = runtime.session(written).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, _masked_reference(net, keep, sizes, x), rtol=1e-4, atol=1e-5)

    tm = to_torch(proto)
    np.testing.assert_allclose(tm.run(x), runtime.session(proto).run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_resize_to_constant_sizes_gets_the_kept_channel_count():
    """An exporter that folds shapes (onnx-simplifier, torch with static shapes) writes Resize's sizes as a constant
    [N, C, H, W]: it holds the channel count, so surgery rewrites it to the kept count (it froze the group before)."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32), rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    empty = numpy_helper.from_array(np.zeros(0, np.float32))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Constant", [], ["roi"], value=empty),
             helper.make_node("Constant", [], ["scales"], value=empty),
             helper.make_node("Constant", [], ["sizes"], value=numpy_helper.from_array(np.array([1, 8, 16, 16]))),
             helper.make_node("Resize", ["r", "roi", "scales", "sizes"], ["up"], mode="nearest"),
             helper.make_node("Conv", ["up", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    channels = analyze(model)
    (group,) = channels.prunable_groups
    assert group.size == 8
    kept = np.array([1, 2, 6])
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    got = runtime.session(prune_channels(model, {group.id: kept}, channels)).run(None, {"x": x})[0]
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    zeroed = w2.copy()
    zeroed[:, np.setdiff1d(np.arange(8), kept)] = 0
    reference.graph.initializer[1].CopyFrom(numpy_helper.from_array(zeroed, "w2"))
    want = runtime.session(reference).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# ---- IR 3 (caffe2-era) files ------------------------------------------------------------------------------------
def test_caffe2_squeezenet_from_the_onnx_package_compresses_and_converts(tmp_path):
    """The onnx package's own squeezenet test model (caffe2 export: IR 3, opset 9, weights from ConstantOfShape, a
    Dropout with its unread mask output). IR 3 wants every initializer among the graph inputs: the pruned weights
    (new initializers) are listed there too. onnx2torch has no converter for Dropout-7 and mis-converts the mask."""
    source = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"
    proto = onnx.load(source)
    assert proto.ir_version == 3 and "Dropout" in _ops(proto) and "ConstantOfShape" in _ops(proto)
    out = tmp_path / "out.onnx"
    result = compress(source, "0.5", out, CompressOptions(measure_latency=False, closed_loop=False))
    written = onnx.load(out)
    onnx.checker.check_model(written)
    assert written.ir_version == 3 and result.final_cost <= 0.5 * result.original_cost
    assert _conv_macs(written) <= 0.5 * _conv_macs(proto)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    assert runtime.session(written).run(None, {"data_0": x})[0].shape == (1, 1000, 1, 1)
    tm = to_torch(proto)
    np.testing.assert_allclose(tm.run(x), runtime.session(proto).run(None, {"data_0": x})[0], rtol=1e-4, atol=1e-6)
