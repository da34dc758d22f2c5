"""Find the compute layers of a graph (Conv, ConvTranspose, Gemm, MatMul with a constant operand, and MatMul of
two computed tensors) and count their MACs and parameters exactly, for a batch of one.

These are the layers whose channels or weights a budget can remove; everything else (activations,
pooling, BatchNorm) is cheap or follows them. Counting convention: one multiply-accumulate per weight use,
bias additions not counted. A MatMul of two computed tensors (attention's Q·Kᵀ and softmax·V) has no weight
but its MACs grow with heads × d_k × T²: it is a layer with `weight=None`, counted at the analysed input size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxecc.core.errors import UnsupportedModelError, UserError
from onnxecc.graph.graph import Graph
from onnxecc.graph.ingest import _STUB_BYTES, _STUB_LOCATION, _copy_fields, _nbytes, _stub

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Layer:
    """One compute node. `cin`/`cout` are channel counts (features for Gemm/MatMul; for a product of two
    computed tensors, the contraction length K and the output's last dim N)."""

    name: str  # ONNX node name (or its first output when the node is unnamed)
    op: str
    weight: str | None  # tensor name of the weight; None for a MatMul of two computed tensors (kind "activation")
    bias: str | None
    cin: int
    cout: int
    kernel: tuple[int, ...]
    groups: int
    out_spatial: tuple[int, ...]
    macs: int
    params: int
    node_index: int = field(repr=False, default=-1)

    @property
    def kind(self) -> str:
        """Whether a constant operand holds its weights ("weight") or both operands are computed ("activation")."""
        return "weight" if self.weight is not None else "activation"

    @property
    def depthwise(self) -> bool:
        return self.op == "Conv" and self.groups > 1 and self.groups == self.cin and self.cin == self.cout

    def as_dict(self) -> dict:
        return {
            "name": self.name, "op": self.op, "kind": self.kind, "weight": self.weight, "bias": self.bias,
            "cin": self.cin, "cout": self.cout, "kernel": list(self.kernel), "groups": self.groups,
            "out_spatial": list(self.out_spatial), "macs": self.macs, "params": self.params,
        }


def node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or (node.output[0] if node.output else f"{node.op_type}_{index}")


def with_static_shapes(model: onnx.ModelProto, batch: int = 1,
                       input_shapes: Mapping[str, Sequence[int]] | None = None) -> onnx.ModelProto:
    """The model's skeleton (`shape_skeleton`) with the batch dimension fixed and shapes inferred for every
    tensor (for counting and channel analysis). Inputs whose other dims are symbolic take their size from
    `input_shapes` (`inputs.resolve_shapes`: --input-shape or the first sample of --data); a UserError naming
    --input-shape when none is given.

    Its large float weights carry their name, type and dims but no data (`Graph.const` gives them as
    zero-stride arrays of their shape): every user of the shaped model reasons on shapes, and a copy of the
    weights would hold the model twice for as long as the analysis lives. Values come from `model`."""
    skel = shape_skeleton(model)
    _fix_batch(skel, batch, input_shapes)
    try:
        out = onnx.shape_inference.infer_shapes(skel, data_prop=True)
    except Exception:  # onnx raises InferenceError or bare RuntimeErrors here
        out = None
    del skel
    if out is None:  # the whole model: its result or its error message (the skeleton's may be less clear)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        _fix_batch(out, batch, input_shapes)
        try:
            out = onnx.shape_inference.infer_shapes(out, data_prop=True)
        except Exception as exc:  # onnx raises InferenceError or bare RuntimeErrors here
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"shape inference failed on the model ({first}): check that it runs in onnxruntime")\
                from exc
        del out.graph.initializer[:]
        out.graph.initializer.extend(shape_skeleton(model).graph.initializer)
    known = tensor_shapes(out)
    missing = [o for n in out.graph.node for o in n.output if o and o not in known]
    if missing:
        _shapes_from_onnxruntime(out, missing, model)
    return out


def shape_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """`ingest.skeleton(model)` that also keeps integer tensors whole: shape inference reads the values of
    shape-like inputs (Reshape targets, Slice bounds, ...), which are int64/int32 whatever their size, and
    never those of weights. The large float/quantised weights are the only tensors left without data."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip=("graph",))
    if model.HasField("graph"):
        _copy_fields(model.graph, out.graph, skip=("initializer",))
        out.graph.initializer.extend(
            _stub(t, _STUB_LOCATION) if t.data_type not in _DATA_TYPES and _nbytes(t) >= _STUB_BYTES else t
            for t in model.graph.initializer)
    return out


_DATA_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)  # tensors whose values shape inference may read


def _fix_batch(model: onnx.ModelProto, batch: int, input_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
    """Fix the inputs' dims (the batch to `batch` where the model leaves it open, the other symbolic dims to
    `input_shapes`) and clear every inferred shape (in place)."""
    from onnxecc.graph.inputs import fix_shapes, resolve_shapes

    fix_shapes(model, resolve_shapes(model, input_shapes, batch=batch))
    del model.graph.value_info[:]
    for o in model.graph.output:  # stale symbolic output shapes would conflict with the fixed batch
        if o.type.HasField("tensor_type"):
            o.type.tensor_type.ClearField("shape")


def _shapes_from_onnxruntime(model: onnx.ModelProto, names: list[str], weights: onnx.ModelProto) -> None:
    """onnx's inference gives up on data-dependent shapes (Reshape of a computed shape, as in channel
    shuffles); one onnxruntime run on zeros measures them, and they are recorded as value_info. The probe is
    `model` (a skeleton) with the initializers of `weights`."""
    import onnxruntime as ort

    from onnxecc.graph.runtime import model_source

    probe = onnx.ModelProto()
    _copy_fields(model, probe, skip=("graph",))
    _copy_fields(model.graph, probe.graph, skip=("initializer",))
    for t in weights.graph.initializer:  # (`extend` would hold each tensor twice while it copies)
        probe.graph.initializer.add().CopyFrom(t)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        with model_source(probe) as source:
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        del probe
        feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], _ort_dtype(i.type))
                 for i in session.get_inputs()}
        values = session.run(names, feeds)
    except Exception as exc:  # onnxruntime raises its own exception types without a common base
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the model does not run in onnxruntime ({first}): check the export") from exc
    by_type = {vi.name: vi for vi in model.graph.value_info}
    for name, value in zip(names, values):
        value = np.asarray(value)
        elem = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        vi = onnx.helper.make_tensor_value_info(name, elem, list(value.shape))
        if name in by_type:
            by_type[name].CopyFrom(vi)
        else:
            model.graph.value_info.append(vi)


def _ort_dtype(ort_type: str) -> np.dtype:
    table = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
             "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}
    if ort_type not in table:
        raise UserError(f"unsupported input type {ort_type}: onnxecc handles numeric tensor inputs")
    return np.dtype(table[ort_type])


def tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Static shapes known in a shape-inferred model (inputs, value_info, outputs, initializers)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[vi.name] = tuple(d.dim_value for d in t.shape.dim)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def find_layers(model: onnx.ModelProto, shaped: onnx.ModelProto | None = None,
                input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[Layer]:
    """Compute layers in graph order, products of two computed tensors included (`weight=None`: filter on
    `layer.weight` where weights are needed). `shaped` may pass a model already through `with_static_shapes`,
    else it is made at `input_shapes` (needed when the inputs have symbolic sizes)."""
    shaped = shaped if shaped is not None else with_static_shapes(model, input_shapes=input_shapes)
    shapes = tensor_shapes(shaped)
    g = Graph(shaped)
    layers = []
    for index, node in enumerate(shaped.graph.node):
        if node.op_type not in COMPUTE_OPS or node.domain not in ("", "ai.onnx"):
            continue
        layer = _layer(node, index, g, shapes)
        g._const_cache.clear()  # only the shapes of the weights are kept: one weight in memory at a time
        if layer is not None:
            layers.append(layer)
    return layers


def _shape(shapes: dict[str, tuple[int, ...]], name: str, node: onnx.NodeProto, index: int) -> tuple[int, ...]:
    if name not in shapes:
        raise UnsupportedModelError(
            f"cannot infer the shape of '{name}' at {node.op_type} '{node_name(node, index)}': "
            "re-export the model with static shapes"
        )
    return shapes[name]


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _layer(node: onnx.NodeProto, index: int, g: Graph, shapes) -> Layer | None:
    name = node_name(node, index)
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        w = _const_like(g, node.input[1]) if len(node.input) > 1 else None
        if w is None:
            return None  # dynamic weights: not a prunable layer
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        groups = int(_attr(node, "group", 1))
        out_shape = _shape(shapes, node.output[0], node, index)
        kernel = tuple(int(k) for k in w.shape[2:])
        if op == "Conv":
            cout, cin = int(w.shape[0]), int(w.shape[1]) * groups
            macs = int(w.size) * int(np.prod(out_shape[2:]))
        else:
            in_shape = _shape(shapes, node.input[0], node, index)
            cin, cout = int(w.shape[0]), int(w.shape[1]) * groups
            macs = int(w.size) * int(np.prod(in_shape[2:]))
        params = int(w.size) + (_size(g, bias) if bias else 0)
        return Layer(name, op, node.input[1], bias, cin, cout, kernel, groups, tuple(out_shape[2:]), macs,
                     params, index)
    if op == "Gemm":
        b = _const_like(g, node.input[1])
        if b is None or b.ndim != 2:
            return None
        trans_a, trans_b = int(_attr(node, "transA", 0)), int(_attr(node, "transB", 0))
        k, n = (b.shape[1], b.shape[0]) if trans_b else (b.shape[0], b.shape[1])
        a_shape = _shape(shapes, node.input[0], node, index)
        m = a_shape[1] if trans_a else a_shape[0]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        params = int(b.size) + (_size(g, bias) if bias else 0)
        return Layer(name, op, node.input[1], bias, int(k), int(n), (), 1, (), int(m * k * n), params, index)
    if op == "MatMul":
        b = _const_like(g, node.input[1])
        a_const = _const_like(g, node.input[0]) is not None
        if b is None and not a_const:
            return _product(node, index, shapes)
        if b is None or b.ndim != 2 or a_const:
            return None
        out_shape = _shape(shapes, node.output[0], node, index)
        k, n = int(b.shape[0]), int(b.shape[1])
        return Layer(name, op, node.input[1], None, k, n, (), 1, tuple(out_shape[1:-1]),
                     int(np.prod(out_shape)) * k, int(b.size), index)
    return None


def _product(node: onnx.NodeProto, index: int, shapes) -> Layer:
    """A MatMul of two computed tensors (…×M×K)·(…×K×N): one MAC per output element and step of K, whatever
    broadcasting or 1-D operand the ONNX MatMul semantics give (the output's shape says which)."""
    a_shape = _shape(shapes, node.input[0], node, index)
    b_shape = _shape(shapes, node.input[1], node, index)
    out_shape = _shape(shapes, node.output[0], node, index)
    k = int(a_shape[-1])
    n = int(b_shape[-1]) if len(b_shape) > 1 else 1
    return Layer(node_name(node, index), node.op_type, None, None, k, n, (), 1, tuple(out_shape[1:-1]),
                 int(np.prod(out_shape, dtype=np.int64)) * k, 0, index)


def _const_like(g: Graph, name: str) -> np.ndarray | None:
    """`g.const(name)` where only its shape counts: an initializer (or an Identity of one) is not decoded but
    stands as a zero-copy array of its dims; anything else is folded by `g.const`."""
    source = name
    while source not in g.initializers:
        node = g.producer.get(source)
        if node is None or node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
            return g.const(name)
        source = node.input[0]
    return np.broadcast_to(np.zeros((), np.float32), tuple(g.initializers[source].dims))


def _size(g: Graph, name: str) -> int:
    value = _const_like(g, name)
    return int(value.size) if value is not None else 0


def used_float_constants(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes of the floating-point constants that nodes use (weights, biases, BatchNorm statistics, …).

    Counted by the name a node uses: an initializer reached through an Identity counts at the Identity's
    output (exporters deduplicate equal tensors that way; they are separate parameters of the network)."""
    g = Graph(model)
    out: dict[str, tuple[int, ...]] = {}
    for node in model.graph.node:
        if node.op_type in ("Identity", "Constant"):
            continue
        for name in node.input:
            if not name or name in out:
                continue
            source = g.initializers.get(name)
            if source is not None:
                if onnx.helper.tensor_dtype_to_np_dtype(source.data_type).kind == "f":
                    out[name] = tuple(source.dims)
                continue
            producer = g.producer.get(name)
            if producer is not None and producer.op_type in ("Identity", "Constant"):
                value = g.const(name)
                if value is not None and value.dtype.kind == "f":
                    out[name] = value.shape
    return out


def count_params(model: onnx.ModelProto) -> int:
    """Parameters of the model: elements of every floating-point constant a node uses."""
    return int(sum(np.prod(shape, dtype=np.int64) for shape in used_float_constants(model).values()))
