"""A read/write view of an ONNX graph: who produces and consumes each tensor, and which tensors are constants.

Exporters hide weights behind Identity, Constant and small constant subgraphs. Every later stage (layer
analysis, channel groups, surgery, write-back) asks the same two questions — "what is the constant value of
this tensor?" and "replace it by this array" — so they are answered once, here, on the *original* graph,
which keeps its node names, IO and opset untouched.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxecc.graph.ingest import _STUB_LOCATION

# Ops whose outputs are constant when all their inputs are: folded when asked for a value.
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout"}


class Graph:
    """Indexes of a ModelProto's main graph. Cheap to rebuild; rebuild after structural edits."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        init_names = set(self.initializers)
        self.input_names = [i.name for i in self.graph.input if i.name not in init_names]
        self.output_names = [o.name for o in self.graph.output]
        self._const_cache: dict[str, np.ndarray | None] = {}

    # ---- constants ---------------------------------------------------------------------------------
    def is_constant(self, name: str) -> bool:
        return self._initializer_behind(name) is not None or self.const(name) is not None  # (weights not decoded)

    def const(self, name: str) -> np.ndarray | None:
        """The value of `name` if it depends on no graph input, else None (folding small subgraphs).

        An initializer (or an Identity chain over one) is decoded on every call and never cached: a pass over
        all the weights then holds one of them at a time, not a second copy of the model. Folded values are
        cached. A weight left out of a skeleton (`ingest.skeleton`, `layers.with_static_shapes`) has no values:
        it stands as a read-only zero-stride array of its dims and type (what shape reasoning needs)."""
        source = self._initializer_behind(name)
        if source is not None:
            return _tensor_value(self.initializers[source])
        if name in self._const_cache:
            return self._const_cache[name]
        self._const_cache[name] = None  # guards against cycles
        value = self._compute_const(name)
        self._const_cache[name] = value
        return value

    def _compute_const(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is None or node.op_type in _NONDETERMINISTIC or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Constant":
            return _constant_node_value(node)
        if node.op_type == "Identity":
            return self.const(node.input[0])
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        inputs = []
        for inp in node.input:
            if not inp:
                inputs.append(None)
                continue
            value = self.const(inp)
            if value is None:
                return None
            inputs.append(value)
        return _evaluate_node(node, inputs, self.model)[list(node.output).index(name)]

    def _initializer_behind(self, name: str) -> str | None:
        """The initializer `name` is, or is an Identity chain of; None when it is anything else."""
        seen = set()
        while name not in self.initializers:
            node = self.producer.get(name)
            if node is None or node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or name in seen:
                return None
            seen.add(name)
            name = node.input[0]
        return name

    def weight_source(self, name: str) -> str:
        """The tensor whose bytes really hold `name`'s value, following Identity chains with one consumer."""
        while name not in self.initializers:
            node = self.producer.get(name)
            if node is None or node.op_type != "Identity" or len(self.consumers[node.input[0]]) != 1:
                break
            name = node.input[0]
        return name

    def set_const(self, name: str, value: np.ndarray) -> None:
        """Give constant tensor `name` a new value (shape may change), keeping every node name intact."""
        source = self.weight_source(name)
        value = np.ascontiguousarray(value)
        if source in self.initializers:
            tensor = numpy_helper.from_array(value.astype(_np_dtype(self.initializers[source]), copy=False),
                                             source)
            self.initializers[source].CopyFrom(tensor)
        else:
            node = self.producer.get(source)
            if node is not None and node.op_type == "Constant" and len(self.consumers[source]) == 1 \
                    and len(node.attribute) == 1 and node.attribute[0].name == "value":
                old = node.attribute[0].t
                node.attribute[0].t.CopyFrom(numpy_helper.from_array(value.astype(_np_dtype(old)), old.name))
            elif node is not None and node.op_type == "Identity":
                self._private_identity_input(node, value)
                return
            else:
                self._detach_into_initializer(name, value)
                return
        self._const_cache.clear()

    def _add_initializer(self, tensor: onnx.TensorProto) -> None:
        self.graph.initializer.append(tensor)
        if self.model.ir_version < 4:  # IR 3 requires every initializer to be listed as a graph input
            self.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                                       list(tensor.dims)))

    def _private_identity_input(self, node: onnx.NodeProto, value: np.ndarray) -> None:
        """An Identity over a shared tensor (exporters deduplicate equal initializers this way) gets an
        initializer of its own as input, so the Identity node and its name stay."""
        old = self.const(node.input[0])
        taken = set(self.initializers) | set(self.producer) | {i.name for i in self.graph.input}
        fresh, k = f"{node.output[0]}__value", 1
        while fresh in taken:
            fresh, k = f"{node.output[0]}__value{k}", k + 1
        dtype = old.dtype if old is not None else value.dtype
        self._add_initializer(numpy_helper.from_array(value.astype(dtype), fresh))
        node.input[0] = fresh
        remove_dead_nodes(self.model)
        self.__init__(self.model)

    def _detach_into_initializer(self, name: str, value: np.ndarray) -> None:
        """`name` is computed (or shared): it becomes an initializer of its own; dead producers are removed."""
        old = self.const(name)
        dtype = old.dtype if old is not None else value.dtype
        self._add_initializer(numpy_helper.from_array(value.astype(dtype), name))
        node = self.producer.get(name)
        if node is not None:
            keep = [o for o in node.output if o != name]
            del node.output[:]
            node.output.extend(keep)
        remove_dead_nodes(self.model)
        self.__init__(self.model)

    # ---- structure ---------------------------------------------------------------------------------
    def nodes(self) -> Iterable[onnx.NodeProto]:
        return self.graph.node

    def opset(self, domain: str = "") -> int:
        for imp in self.model.opset_import:
            if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
                return imp.version
        return 0


def remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers that no graph output depends on (left behind by folding)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output) or _has_subgraph(node):
            kept.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_subgraph_inputs(node))
    if len(kept) != len(graph.node):
        kept.reverse()
        del graph.node[:]
        graph.node.extend(kept)
    needed.update(i.name for i in graph.input)
    for k in reversed([k for k, t in enumerate(graph.initializer) if t.name not in needed]):
        del graph.initializer[k]  # in place: `extend` would copy every weight kept into the model's arena again


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for n in g.node:
                names.update(n.input)
    return names


def _tensor_value(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values (one copy: upb hands `raw_data` out as new bytes, viewed by `np.frombuffer`); a
    skeleton's stub: zeros of its shape and type that take no memory."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL and \
            any(e.key == "location" and e.value == _STUB_LOCATION for e in tensor.external_data):
        return np.broadcast_to(np.zeros((), _np_dtype(tensor)), tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def _np_dtype(tensor: onnx.TensorProto) -> np.dtype:
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    attr = node.attribute[0] if node.attribute else None
    if attr is None:
        return None
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name == "value_float":
        return np.array(attr.f, dtype=np.float32)
    if attr.name == "value_floats":
        return np.array(list(attr.floats), dtype=np.float32)
    if attr.name == "value_int":
        return np.array(attr.i, dtype=np.int64)
    if attr.name == "value_ints":
        return np.array(list(attr.ints), dtype=np.int64)
    return None


def _evaluate_node(node: onnx.NodeProto, inputs: list[np.ndarray | None], model: onnx.ModelProto):
    """Run one node with onnx's reference evaluator (numpy only; used for small constant subgraphs)."""
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if v is not None else "" for i, v in enumerate(inputs)]
    single = onnx.helper.make_node(node.op_type, names, [f"out{i}" for i in range(len(node.output))],
                                   domain=node.domain)
    single.attribute.extend(node.attribute)
    graph = onnx.helper.make_graph(
        [single], "fold", [],
        [onnx.helper.make_value_info(f"out{i}", onnx.TypeProto()) for i in range(len(node.output))],
        initializer=[numpy_helper.from_array(np.asarray(v), n) for n, v in zip(names, inputs) if n],
    )
    tiny = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return ReferenceEvaluator(tiny).run(None, {})
