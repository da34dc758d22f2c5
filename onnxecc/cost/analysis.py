"""Graph understanding in one call: static shapes, compute layers, channel groups, width variables.

Every command that prunes or profiles needs the same four views of a model, computed in this order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx

from onnxecc.core.errors import UserError
from onnxecc.cost.costs import Variables, unit_classes
from onnxecc.graph.channels import ChannelGraph, analyze
from onnxecc.graph.layers import Layer, find_layers, with_static_shapes


@dataclass
class Analysis:
    proto: onnx.ModelProto
    shaped: onnx.ModelProto  # batch fixed to 1, every tensor shaped
    layers: list[Layer]
    graph: ChannelGraph
    variables: Variables
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # the size analysed at (batch first)


def analyse(proto: onnx.ModelProto, purpose: str = "compress",
            input_shapes: Mapping[str, Sequence[int]] | None = None) -> Analysis:
    """Raises UserError when the model has no compute layer (nothing to `purpose`). Inputs with symbolic sizes
    are analysed at `input_shapes` (`onnxecc.graph.inputs.resolve_shapes`); the model itself keeps them symbolic."""
    from onnxecc.graph.inputs import resolve_shapes

    input_shapes = resolve_shapes(proto, input_shapes)
    shaped = with_static_shapes(proto, input_shapes=input_shapes)
    layers = find_layers(proto, shaped)
    if not any(layer.weight is not None for layer in layers):  # products of computed tensors alone: no weights
        raise UserError(f"the model has no compute layers (Conv, ConvTranspose, Gemm, MatMul): nothing to {purpose}")
    graph = analyze(proto, shaped)
    return Analysis(proto, shaped, layers, graph, unit_classes(graph), input_shapes)
