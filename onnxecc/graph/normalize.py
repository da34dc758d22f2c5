"""Normalise a graph so converters see plain initializers: the fixes real exporters' output needs.

Modern `torch.onnx.export` puts Identity nodes over initializers, Constant nodes for weights and small
constant subgraphs (Reshape of a constant, ConstantOfShape); onnx2torch fails on these (KeyError). Folding
keeps every tensor *name*, so a weight found here under name N is the tensor N of the original graph, and
`Graph(original).set_const(N, value)` writes it back.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxecc.core.errors import UnsupportedModelError
from onnxecc.graph.graph import Graph, remove_dead_nodes


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which every constant tensor used by a non-constant node is an initializer."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = Graph(out)
    constant_nodes = [n for n in out.graph.node if n.output and all(g.is_constant(o) for o in n.output if o)]
    folded = {o for n in constant_nodes for o in n.output if o}
    needed = set()
    for node in out.graph.node:
        if node in constant_nodes:
            continue
        needed.update(i for i in node.input if i in folded)
    needed.update(o.name for o in out.graph.output if o.name in folded)
    new_inits = [numpy_helper.from_array(g.const(name), name) for name in sorted(needed)]
    keep = [n for n in out.graph.node if n not in constant_nodes]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    out.graph.initializer.extend(new_inits)
    remove_dead_nodes(out)
    return out


def drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """Old IR (< 4) lists initializers among graph inputs; converters then treat weights as runtime inputs."""
    names = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in names]
    if len(keep) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(keep)


def drop_unused_masks(model: onnx.ModelProto) -> None:
    """Caffe2-era exports (the onnx package's own test models) write Dropout with its optional mask output even
    when nothing reads it; onnx2torch maps such a node to a module that returns one tensor for two outputs, and
    the network computes on a piece of it. An unread mask is removed (in place): the node and its output stay."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "Dropout" and node.domain in ("", "ai.onnx") and len(node.output) > 1 \
                and not any(o in used for o in node.output[1:]):
            del node.output[1:]


def fill_clip_bounds(model: onnx.ModelProto) -> None:
    """Clip (opset ≥ 11) may leave its min out and give only a max (`Clip(x, "", max)`); onnx2torch reads an
    omitted input as a missing constant and refuses the node. The omitted bound becomes an initializer holding
    the lowest value of the bound's type (−inf for floats: the same function), in place."""
    g = Graph(model)
    taken = set(g.initializers) | set(g.producer) | {i.name for i in model.graph.input}
    for node in model.graph.node:
        if node.op_type != "Clip" or node.domain not in ("", "ai.onnx") or len(node.input) < 3 \
                or node.input[1] or not node.input[2]:
            continue
        bound = g.const(node.input[2])
        if bound is None:
            continue
        lowest = np.array(-np.inf if bound.dtype.kind == "f" else np.iinfo(bound.dtype).min, bound.dtype)
        name, k = f"{node.output[0]}__min", 1
        while name in taken:
            name, k = f"{node.output[0]}__min{k}", k + 1
        taken.add(name)
        model.graph.initializer.append(numpy_helper.from_array(lowest, name))
        node.input[1] = name


def convert_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Convert the default-domain opset (e.g. down to one whose op versions a converter knows)."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current is None or current == target:
        return model
    try:
        return onnx.version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises bare RuntimeErrors with C++ messages
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"cannot convert the model from opset {current} to {target} ({first}): re-export it with "
            f"opset_version={target}"
        ) from exc


def normalize(model: onnx.ModelProto, target_opset: int | None = None) -> onnx.ModelProto:
    """All passes, in order; returns a new model and leaves `model` untouched."""
    out = fold_constants(model)
    drop_initializer_inputs(out)
    drop_unused_masks(out)
    fill_clip_bounds(out)
    if out.ir_version < 4:
        out.ir_version = 4
    if target_opset is not None:
        out = convert_opset(out, target_opset)
        out = fold_constants(out)  # conversion may introduce Constant nodes again
    return out
