"""Shape inference and checking on the skeleton (weights left out) give what the whole model gave.

`layers.with_static_shapes` and `surgery.prune_channels` run onnx's shape inference and checker on
`layers.shape_skeleton(model)` so that large models are neither copied nor serialised for them (and models
over 2 GB work); `_full_model_static_shapes` below is the former whole-model path, kept as the reference."""

from __future__ import annotations

import onnx
import pytest
import zoo

from onnxecc.channels import analyze
from onnxecc.ingest import load
from onnxecc.layers import shape_skeleton, with_static_shapes
from onnxecc.surgery import prune_channels


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
    new = with_static_shapes(resnet18)
    old = _full_model_static_shapes(resnet18)
    assert _value_infos(new) == _value_infos(old)
    assert [n.SerializeToString() for n in new.graph.node] == [n.SerializeToString() for n in old.graph.node]
    assert [t.SerializeToString() for t in new.graph.initializer] == \
        [t.SerializeToString() for t in resnet18.graph.initializer]
    assert new.SerializeToString(deterministic=True) == old.SerializeToString(deterministic=True)


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


def _full_copy_prune(model: onnx.ModelProto, keep, graph) -> onnx.ModelProto:
    """The former `prune_channels`: edits on a full copy, then inference and the checker on the whole of it."""
    import numpy as np

    from onnxecc import surgery

    flat = graph.flat(surgery.validate_keep(graph, keep))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    writer = surgery._Writer(out)
    for name, per_node in surgery._cuts(graph, flat).items():
        value = writer.g.const(name)
        new = {}
        for index, axis_masks in per_node.items():
            sliced = value
            for axis, mask in axis_masks:
                sliced = np.compress(mask, sliced, axis=axis)
            new[index] = sliced
        writer.write(name, value, new)
    for e in graph.edits:
        surgery._EDITS[e.kind](writer, graph, e, flat)
    writer.finish()
    del out.graph.value_info[:]
    out = onnx.shape_inference.infer_shapes(out)
    onnx.checker.check_model(out)
    return out


@pytest.mark.parametrize("arch", ["resnet18", "shufflenet_v2_x1_0"])
def test_prune_matches_the_full_copy_path(arch):
    model = load(zoo.export(arch))
    graph = analyze(model)
    keep = {g.id: list(range(1, g.size, 3)) for g in graph.prunable_groups}
    new = prune_channels(model, keep, graph)
    assert new.SerializeToString(deterministic=True) == \
        _full_copy_prune(model, keep, graph).SerializeToString(deterministic=True)
