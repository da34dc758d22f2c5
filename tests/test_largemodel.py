"""Shape inference and checking on the skeleton (weights left out) give what the whole model gave.

`layers.with_static_shapes` and `surgery.prune_channels` run onnx's shape inference and checker on
`layers.shape_skeleton(model)` so that large models are neither copied nor serialised for them (and models
over 2 GB work); `_full_model_static_shapes` below is the former whole-model path, kept as the reference."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zoo

from onnxecc.graph import ingest, runtime
from onnxecc.graph.channels import analyze
from onnxecc.graph.graph import Graph
from onnxecc.graph.ingest import load
from onnxecc.graph.layers import shape_skeleton, tensor_shapes, with_static_shapes
from onnxecc.graph.surgery import prune_channels


def _full_model_static_shapes(model: onnx.ModelProto, batch: int = 1) -> onnx.ModelProto:
    """The former `with_static_shapes` without its onnxruntime fallback: inference on a full copy."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    init_names = {t.name for t in out.graph.initializer}
    for inp in out.graph.input:
        if inp.name in init_names or not inp.type.HasField("tensor_type"):
            continue
        dim = inp.type.tensor_type.shape.dim[0]
        if not (dim.HasField("dim_value") and dim.dim_value > 0):
            dim.Clear()
            dim.dim_value = batch
    del out.graph.value_info[:]
    for o in out.graph.output:
        if o.type.HasField("tensor_type"):
            o.type.tensor_type.ClearField("shape")
    return onnx.shape_inference.infer_shapes(out, data_prop=True)


def _value_infos(model: onnx.ModelProto) -> dict[str, bytes]:
    g = model.graph
    return {f"{kind}:{vi.name}": vi.SerializeToString(deterministic=True)
            for kind, values in (("input", g.input), ("value_info", g.value_info), ("output", g.output))
            for vi in values}


@pytest.fixture(scope="module")
def resnet18() -> onnx.ModelProto:
    return load(zoo.export("resnet18"))


def test_skeleton_leaves_out_the_weights(resnet18):
    skel = shape_skeleton(resnet18)
    assert skel.ByteSize() < resnet18.ByteSize() / 100
    assert [t.name for t in skel.graph.initializer] == [t.name for t in resnet18.graph.initializer]
    assert [list(t.dims) for t in skel.graph.initializer] == [list(t.dims) for t in resnet18.graph.initializer]


def test_static_shapes_match_the_whole_model_path(resnet18):
    """Same shapes, nodes and everything else; the shaped model's weights are the skeleton's stubs."""
    new = with_static_shapes(resnet18)
    old = _full_model_static_shapes(resnet18)
    assert _value_infos(new) == _value_infos(old)
    assert [n.SerializeToString() for n in new.graph.node] == [n.SerializeToString() for n in old.graph.node]
    stubs = shape_skeleton(resnet18).graph.initializer
    assert [t.SerializeToString() for t in new.graph.initializer] == [t.SerializeToString() for t in stubs]
    del old.graph.initializer[:]
    old.graph.initializer.extend(stubs)
    assert new.SerializeToString(deterministic=True) == old.SerializeToString(deterministic=True)


def test_shaped_weights_are_shapes_only_and_graph_does_not_cache_weights(resnet18):
    """`Graph.const` of a stub: zero-stride zeros of the weight's shape and type; of a real initializer: its
    value, decoded again on each call (never cached: a pass over all weights holds one at a time)."""
    shaped = with_static_shapes(resnet18)
    assert shaped.ByteSize() < resnet18.ByteSize() / 100
    g, real = Graph(shaped), Graph(resnet18)
    for t in resnet18.graph.initializer:
        stub, value = g.const(t.name), real.const(t.name)
        assert stub.shape == value.shape == tuple(t.dims) and stub.dtype == value.dtype
        if value.nbytes >= 1024:
            assert stub.strides == (0,) * stub.ndim and not stub.any()
        else:
            assert np.array_equal(stub, value)
    assert not real._const_cache


def test_pruned_model_shapes_match_the_whole_model_path(resnet18):
    graph = analyze(resnet18)
    keep = {gid: list(range(0, g.size, 2)) for gid, g in enumerate(graph.groups) if g.prunable}
    pruned = prune_channels(resnet18, keep, graph)
    bare = onnx.ModelProto()
    bare.CopyFrom(pruned)
    del bare.graph.value_info[:]
    reference = onnx.shape_inference.infer_shapes(bare)
    assert pruned.SerializeToString(deterministic=True) == reference.SerializeToString(deterministic=True)
    onnx.checker.check_model(pruned)


def _masked_original(model: onnx.ModelProto, graph, keep) -> onnx.ModelProto:
    """What the pruned model must compute, built without surgery: the original with a Mul by a 0/1 mask in front
    of every compute layer, zeroing the channels it reads that `keep` drops (positions from the analysis)."""
    masks = {gid: np.isin(np.arange(graph.groups[gid].size), units) for gid, units in keep.items()}
    flat = graph.flat(masks)
    ranks = {name: len(dims) for name, dims in tensor_shapes(with_static_shapes(model)).items()}
    readers = {lc.node_index: lc.input for lc in graph.layers.values()}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for index, node in enumerate(model.graph.node):
        pos = graph.positions(readers[index]) if index in readers else None
        if pos is not None and not (kept := pos.kept(flat, graph.offsets)).all():
            shape = [1] * ranks[node.input[0]]
            for axis, size in zip(pos.axes, kept.shape):
                shape[axis] = size
            name = f"mask_{index}"
            out.graph.initializer.append(onnx.numpy_helper.from_array(kept.astype(np.float32).reshape(shape), name))
            nodes.append(onnx.helper.make_node("Mul", [node.input[0], name], [f"{name}_out"]))
            node = onnx.NodeProto()
            node.CopyFrom(model.graph.node[index])
            node.input[0] = f"{name}_out"
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


@pytest.mark.parametrize("arch", ["resnet18", "shufflenet_v2_x1_0"])
def test_prune_computes_what_the_masked_original_computes(arch):
    """Every third unit kept in every prunable group: onnxruntime on the pruned model gives the outputs of the
    original whose dropped channels are zeroed where layers read them (and that differs from the original)."""
    model = load(zoo.export(arch))
    graph = analyze(model)
    keep = {g.id: list(range(1, g.size, 3)) for g in graph.prunable_groups}
    pruned = prune_channels(model, keep, graph)
    x = np.random.default_rng(0).standard_normal((2, 3, zoo.SIZE, zoo.SIZE)).astype(np.float32)

    def run(m: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"input": x})[0]

    def weight_bytes(m: onnx.ModelProto) -> int:
        return sum(t.ByteSize() for t in m.graph.initializer)

    got, want, original = run(pruned), run(_masked_original(model, graph, keep)), run(model)
    assert weight_bytes(pruned) < 0.5 * weight_bytes(model)
    assert got.shape == want.shape == original.shape
    scale = float(np.abs(want).max())
    assert float(np.abs(got - want).max()) <= 1e-5 * scale
    assert float(np.abs(original - want).max()) > 1e-2 * scale  # the masks change the result: not a vacuous match


# ---- sessions and compress through files with external data (the >2 GB path, forced on small models) --------

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"


def test_file_session_equals_bytes_session(resnet18, tmp_path, monkeypatch):
    """A proto from `file_threshold` bytes on reaches onnxruntime as a temporary file with external data (the only
    way over 2 GB): same outputs as the bytes session; the temporary folder is gone afterwards."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    via_bytes = runtime.session(resnet18, file_threshold=2**40)
    via_file = runtime.session(resnet18, file_threshold=0)
    assert list(tmp_path.iterdir()) == []
    x = runtime.example_input(via_bytes, batch=2)
    assert np.array_equal(runtime.run_batched(via_bytes, x), runtime.run_batched(via_file, x))


def test_sha256_streams_the_serialised_bytes(resnet18):
    assert ingest.sha256(resnet18) == hashlib.sha256(resnet18.SerializeToString()).hexdigest()


def test_streamed_importance_equals_the_whole_tensor_sum(monkeypatch):
    from onnxecc.optimize import importance

    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 5, 3, 3)).astype(np.float32)
    f = rng.random((37, 5, 3, 3))
    for axis in (0, 1):
        for norm, fisher in (("l2", None), ("l1", None), ("l2", f)):
            whole = importance._axis_energy(w, axis, norm, fisher)
            monkeypatch.setattr(importance, "_CHUNK_BYTES", 8 * 45 * 4)  # slabs of 4 rows
            assert np.allclose(importance._axis_energy(w, axis, norm, fisher), whole, rtol=1e-12)
            monkeypatch.undo()


def test_compress_external_data_model_end_to_end(tmp_path, monkeypatch):
    """The >2 GB path on digits_cnn: the limit lowered so the input is external data, every onnxruntime session
    goes through a file, and the output is written with external data; `compress` (projection only, the CLI's
    checkpoint fingerprint included) writes a model that onnxruntime loads from its path."""
    from onnxecc.compress import CompressOptions, compress
    from onnxecc.validate import validate

    monkeypatch.setattr(ingest, "_TWO_GB", 10_000)
    monkeypatch.setattr(runtime, "FILE_SESSION_BYTES", 0)
    src = tmp_path / "big.onnx"
    ingest.save(ingest.load(DIGITS), src)
    assert (tmp_path / "big.onnx.data").exists()
    out = tmp_path / "small.onnx"
    result = compress(src, "0.5", out, CompressOptions(metric="macs", epochs=0, measure_latency=False),
                      checkpoint=tmp_path / "small.onnx.ckpt")
    assert result.meets_budget and result.agreement is not None
    assert (tmp_path / "small.onnx.data").exists()
    moved = [t for t in onnx.load(str(out), load_external_data=False).graph.initializer
             if t.data_location == onnx.TensorProto.EXTERNAL]
    assert moved
    sess = runtime.session(str(out))
    x = runtime.example_input(sess, batch=4)
    expected = runtime.session(result.model, file_threshold=2**40)
    assert np.allclose(runtime.run_batched(sess, x), runtime.run_batched(expected, x), atol=1e-6)
    report = validate(src, out)
    assert report.meets_budget and report.samples > 0
