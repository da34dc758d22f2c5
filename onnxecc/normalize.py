"""Normalise a graph so converters see plain initializers: the fixes real exporters' output needs.

Modern `torch.onnx.export` puts Identity nodes over initializers, Constant nodes for weights and small
constant subgraphs (Reshape of a constant, ConstantOfShape); onnx2torch fails on these (KeyError). Folding
keeps every tensor *name*, so a weight found here under name N is the tensor N of the original graph, and
`Graph(original).set_const(N, value)` writes it back.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from onnxecc.errors import UnsupportedModelError
from onnxecc.graph import Graph, remove_dead_nodes


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
    if out.ir_version < 4:
        out.ir_version = 4
    if target_opset is not None:
        out = convert_opset(out, target_opset)
        out = fold_constants(out)  # conversion may introduce Constant nodes again
    return out
