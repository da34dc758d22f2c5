"""`onnxecc inspect`: what is in a model — its compute layers, their MACs and parameters, its channel groups."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from onnxecc.core.errors import UserError
from onnxecc.graph import ingest
from onnxecc.graph.channels import ChannelGroup, analyze, attention_name
from onnxecc.graph.inputs import graph_inputs, resolve_shapes, symbolic, with_input_shapes
from onnxecc.graph.layers import Layer, count_params, find_layers, with_static_shapes


@dataclass
class InspectResult:
    """Everything `inspect` reports; `as_dict()` is the `--json` output."""

    source: str
    opset: int
    inputs: dict[str, list[int]]
    outputs: dict[str, list[int]]
    layers: list[Layer]
    model_params: int
    extra: dict = field(default_factory=dict)
    groups: list[ChannelGroup] = field(default_factory=list)  # channel groups (onnxecc.graph.channels)
    layer_groups: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)  # layer -> (in, out) ids
    declared_inputs: dict[str, list] = field(default_factory=dict)  # the model's own dims (str: symbolic)
    symbolic: bool = False  # the model leaves input sizes open: the counts hold at `inputs` (the size analysed)
    heads: dict[int, list[str]] = field(default_factory=dict)  # head groups -> their attention products

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def activation_macs(self) -> int:
        """MACs of the products of two computed tensors (attention's Q·Kᵀ and softmax·V), part of `macs`."""
        return sum(layer.macs for layer in self.layers if layer.weight is None)

    @property
    def layer_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def as_dict(self) -> dict:
        return {
            "source": self.source, "opset": self.opset, "inputs": self.inputs, "outputs": self.outputs,
            "declared_inputs": self.declared_inputs, "symbolic_inputs": self.symbolic,
            "layers": [{**layer.as_dict(), **self._group_ids(layer.name)} for layer in self.layers],
            "groups": [{**g.as_dict(), "heads": g.id in self.heads} for g in self.groups],
            "totals": {"macs": self.macs, "activation_macs": self.activation_macs, "layer_params": self.layer_params,
                       "model_params": self.model_params, "layers": len(self.layers), "groups": len(self.groups),
                       "prunable_groups": sum(g.prunable for g in self.groups), "head_groups": len(self.heads),
                       "approximate_groups": sum(g.prunable and g.approximate is not None for g in self.groups)},
            **self.extra,
        }

    def _group_ids(self, name: str) -> dict:
        ins, outs = self.layer_groups.get(name, ([], []))
        return {"in_groups": list(ins), "out_groups": list(outs)}


def group_status(group: ChannelGroup, heads: Mapping[int, list[str]] | None = None) -> str:
    """What `inspect` says of a group: prunable (attention heads: how many, of how many channels, and where),
    approximate (prunable with --data only: why), frozen (by what)."""
    if group.prunable and heads and group.id in heads:
        return f"prunable: {group.size} attention heads ({attention_name(heads[group.id])})"
    if group.prunable:
        return f"approximate ({group.approximate})" if group.approximate else "prunable"
    return f"frozen by {group.frozen_by}" if group.frozen_by else "single unit"


def inspect(model: ingest.ModelSource, hardware: str | None = None,
            input_shapes: Mapping[str | None, Sequence[int]] | None = None) -> InspectResult:
    """Load, check and analyse a model. Raises UserError when it has no compute layer to compress.
    With `hardware` (an accelerator description JSON), `extra["energy"]` holds the modelled energy per layer.
    Inputs with symbolic sizes are counted at `input_shapes` (parsed --input-shape; UserError naming it when a
    size is open and not given); `inputs`/`outputs` are the shapes analysed, `declared_inputs` the model's own."""
    source = str(model) if isinstance(model, (str, Path)) else "<model>"
    proto = raw = ingest.load(model)
    if len(proto.graph.sparse_initializer):  # e.g. `compress --method wsp` output: analyse the dense weights
        from onnxecc.cost.hardware import densify

        proto = densify(proto)
    if any(n.op_type == "DequantizeLinear" for n in proto.graph.node):  # a QDQ (int8) model: its float weights
        from onnxecc.cost.hardware import dequantized

        proto = dequantized(proto)[0]
    shapes = resolve_shapes(proto, input_shapes)
    shaped = with_static_shapes(proto, input_shapes=shapes)
    layers = find_layers(proto, shaped)
    if not any(layer.weight is not None for layer in layers):  # products of computed tensors alone: no weights
        raise UserError(f"{source} has no compute layers (Conv, ConvTranspose, Gemm, MatMul with constant "
                        "weights): nothing to compress")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    channels = analyze(proto, shaped)
    extra = {}
    if hardware:
        from onnxecc.cost.hardware import energy_summary, load_hardware

        fixed = with_input_shapes(raw, shapes) if symbolic(raw) else raw  # energy is counted at one size too
        extra["energy"] = energy_summary(fixed, load_hardware(hardware))  # + every width the file gives
    return InspectResult(source, opset, _io_shapes(shaped, shaped.graph.input, proto),
                         _io_shapes(shaped, shaped.graph.output, proto), layers, count_params(proto), extra,
                         groups=channels.groups,
                         layer_groups={**{n: (lc.in_groups, lc.out_groups) for n, lc in channels.layers.items()},
                                       **_product_groups(layers, shaped, channels)},
                         declared_inputs={i.name: list(i.dims) for i in graph_inputs(proto)}, symbolic=symbolic(proto),
                         heads=channels.heads)


def _product_groups(layers: list[Layer], shaped: onnx.ModelProto, channels) -> dict[str, tuple[list, list]]:
    """(in, out) channel groups of each product of two computed tensors: the groups its operands and its output
    carry (the heads of an attention's scores and context), so that its MACs show which groups shrink them."""
    def ids(*tensors: str) -> list[int]:
        out: list[int] = []
        for t in tensors:
            pos = channels.positions(t)
            out += [] if pos is None else pos.gid.ravel().tolist()
        return list(dict.fromkeys(out))

    out = {}
    for layer in layers:
        if layer.weight is None:
            node = shaped.graph.node[layer.node_index]
            out[layer.name] = (ids(*node.input), ids(node.output[0]))
    return out


def _io_shapes(shaped: onnx.ModelProto, values, original: onnx.ModelProto) -> dict[str, list[int]]:
    init_names = {t.name for t in original.graph.initializer}
    out = {}
    for vi in values:
        if vi.name in init_names:
            continue
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    return out
