"""The torch bridge: ONNX → trainable torch module (onnx2torch) and trained weights → the original ONNX graph.

`to_torch` normalises the model (`onnxecc.graph.normalize`), converts it with onnx2torch, turns the constant
weights onnx2torch keeps as buffers (MatMul, non-Linear Gemm, the bias Add after a MatMul) into parameters,
and builds a *verified* map from every weight tensor name to its torch tensor: the module is found by the
node's name (onnx2torch's own naming), checked by its output names, and the torch value must equal the ONNX
value exactly (after the layout change of Gemm → nn.Linear). `write_back` puts the torch values into a copy
of the *original* proto through `Graph.set_const`, so node names, IO, opset and metadata stay as they were.

Only this module (and the rest of the torch side) imports torch; the ONNX side never imports it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import defs, numpy_helper
from torch import nn

from onnxecc.core.errors import UnsupportedModelError
from onnxecc.graph.graph import Graph
from onnxecc.graph.normalize import normalize

_MIN_OPSET = 7  # lowest opset tried when a model must be down-converted for onnx2torch
# A BatchNorm kept in the graph trains its weight and bias; its running statistics are constants of the function
# (training keeps BatchNorm in eval mode, `finetune`), so they are not mapped: mapped, they were "weights" to every
# trainer, and ADMM's proximal step pulled a pruned channel's running_var below zero (NaN outputs, a dead run).
_BN_ROLES = ("weight", "bias")


@dataclass(frozen=True)
class Layout:
    """How a torch tensor relates to its ONNX tensor: torch = scale · (ONNXᵀ if transpose else ONNX)."""

    transpose: bool = False
    scale: float = 1.0

    def to_torch(self, value: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(value))
        if self.transpose:
            t = t.T
        if self.scale != 1.0:
            t = t * self.scale  # the same float op onnx2torch applies, so the comparison can be exact
        return t.contiguous()

    def to_onnx(self, tensor: torch.Tensor) -> np.ndarray:
        value = tensor.detach().cpu().numpy()
        if self.scale != 1.0:
            value = value / np.asarray(self.scale, dtype=value.dtype)
        return np.ascontiguousarray(value.T if self.transpose else value)


@dataclass
class TorchModel:
    """A converted model: `params` maps an ONNX tensor name (as the compute node of the *original* graph
    uses it) to the qualified name of its torch parameter (BatchNorm running statistics are not mapped: see
    `_BN_ROLES`)."""

    module: nn.Module
    params: dict[str, str]
    original: onnx.ModelProto
    layouts: dict[str, Layout] = field(default_factory=dict, repr=False)
    input_names: list[str] = field(default_factory=list)
    target_opset: int | None = None  # the opset the model was converted to for onnx2torch (None: kept)
    modules: dict[str, str] = field(default_factory=dict, repr=False)  # ONNX node output -> its torch module

    def parameter(self, onnx_name: str) -> torch.Tensor:
        """The torch tensor holding ONNX tensor `onnx_name`."""
        qualified = self.params[onnx_name]
        try:
            return self.module.get_parameter(qualified)
        except AttributeError:
            return self.module.get_buffer(qualified)

    def onnx_value(self, onnx_name: str) -> np.ndarray:
        """The current torch value of `onnx_name` in the ONNX layout."""
        return self.layouts.get(onnx_name, Layout()).to_onnx(self.parameter(onnx_name))

    def run(self, *inputs) -> np.ndarray | list[np.ndarray]:
        return run_torch(self, *inputs)


# ---- conversion ------------------------------------------------------------------------------------------
def to_torch(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> TorchModel:
    """Convert `model` (left untouched) into a trainable torch module with a verified weight map. `input_shapes`
    (`inputs.resolve_shapes`) sizes symbolic input dims where onnx2torch needs a shape onnx cannot infer
    (`_complete_shapes`); the module itself takes any size the model does."""
    from onnx2torch import convert

    original = onnx.ModelProto()
    original.CopyFrom(model)
    source = original  # what is converted: the original, or a copy with ops onnx2torch lacks written out
    if any(n.op_type == "Gelu" and n.domain in ("", "ai.onnx") for n in original.graph.node):
        source = onnx.ModelProto()
        source.CopyFrom(original)
        _gelu_written_out(source)
    norm = normalize(source)
    _global_max_pool_as_reduce(norm)
    target = _target_opset(norm)
    if target is not None:
        norm = normalize(source, target_opset=target)
        missing = _missing_converters(norm)
        if missing:
            raise UnsupportedModelError(f"onnx2torch cannot convert {missing[0]} even at opset {target}")
    _relax_reshapes(norm)
    _check_conv_weights(norm)
    _complete_shapes(norm, input_shapes)
    try:
        gm = convert(norm, attach_onnx_mapping=True)
    except Exception as exc:  # onnx2torch raises NotImplementedError, KeyError, ValueError, ... on what it lacks
        raise UnsupportedModelError(f"onnx2torch cannot convert the model: {_first_line(exc)}") from exc
    params, layouts = _Binder(gm, norm, original).bind()
    modules = {out: name for name, mod in gm.named_modules() if "onnx_mapping" in mod.__dict__
               for out in mod.onnx_mapping.outputs if out}
    for mod in gm.modules():
        if "onnx_mapping" in mod.__dict__:
            del mod.__dict__["onnx_mapping"]
    init_names = {t.name for t in norm.graph.initializer}
    inputs = [i.name for i in norm.graph.input if i.name not in init_names]
    return TorchModel(gm, params, original, layouts, inputs, target, modules)


def _gelu_written_out(model: onnx.ModelProto) -> None:
    """Gelu (opset 20, what torch's dynamo exporter writes) has no onnx2torch converter and no older version to
    convert down to: written out as x·½·(1 + erf(x/√2)) (or its tanh form), with the Gelu's output name, in the copy
    that is converted; constants as Constant nodes, so no initializer is added to the model the weights map to."""
    if not any(n.op_type == "Gelu" and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return
    nodes, taken = [], {o for n in model.graph.node for o in n.output} | {t.name for t in model.graph.initializer}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    def const(base: str, value: float) -> str:
        name = fresh(base)
        nodes.append(onnx.helper.make_node("Constant", [], [name], name=name,
                                           value=numpy_helper.from_array(np.array(value, np.float32))))
        return name

    for node in model.graph.node:
        if node.op_type != "Gelu" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        x, y, base = node.input[0], node.output[0], node.name or node.output[0]
        t = [fresh(f"{base}_gelu{k}") for k in range(4)]
        if _attr(node, "approximate", b"none") in (b"tanh", "tanh"):  # ½x(1 + tanh(√(2/π)(x + 0.044715x³)))
            cube = fresh(f"{base}_gelu_cube")
            nodes += [onnx.helper.make_node("Pow", [x, const(f"{base}_three", 3.0)], [cube]),
                      onnx.helper.make_node("Mul", [cube, const(f"{base}_c", 0.044715)], [t[0]]),
                      onnx.helper.make_node("Add", [x, t[0]], [t[1]]),
                      onnx.helper.make_node("Mul", [t[1], const(f"{base}_k", float(np.sqrt(2 / np.pi)))], [t[2]]),
                      onnx.helper.make_node("Tanh", [t[2]], [t[3]])]
        else:
            nodes += [onnx.helper.make_node("Div", [x, const(f"{base}_sqrt2", float(np.sqrt(2.0)))], [t[0]]),
                      onnx.helper.make_node("Erf", [t[0]], [t[3]])]
        one_plus, half = fresh(f"{base}_gelu_sum"), fresh(f"{base}_gelu_half")
        nodes += [onnx.helper.make_node("Add", [t[3], const(f"{base}_one", 1.0)], [one_plus]),
                  onnx.helper.make_node("Mul", [x, const(f"{base}_half", 0.5)], [half]),
                  onnx.helper.make_node("Mul", [half, one_plus], [y], name=node.name)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _global_max_pool_as_reduce(model: onnx.ModelProto) -> None:
    """onnx2torch has no GlobalMaxPool (magika's tf2onnx graph ends its conv stack with one): ReduceMax over the
    spatial axes with keepdims computes the same thing, in the normalised copy only (below opset 18, where
    ReduceMax still takes its axes as an attribute; the error names GlobalMaxPool otherwise)."""
    pools = [n for n in model.graph.node if n.op_type == "GlobalMaxPool" and n.domain in ("", "ai.onnx")]
    if not pools or _opsets(model).get("", 0) >= 18:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # onnx raises InferenceError or bare RuntimeErrors: the converter check then names the op
        return
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in (*inferred.graph.value_info, *inferred.graph.input)
             if vi.type.tensor_type.HasField("shape")}
    for node in pools:
        rank = ranks.get(node.input[0])
        if rank is None or rank < 3:
            continue
        node.op_type = "ReduceMax"
        del node.attribute[:]
        node.attribute.extend([onnx.helper.make_attribute("axes", list(range(2, rank))),
                               onnx.helper.make_attribute("keepdims", 1)])


def _relax_reshapes(model: onnx.ModelProto) -> None:
    """The dynamo exporter writes Reshape(allowzero=1), which onnx2torch rejects; with a constant target
    shape that holds no 0 the attribute changes nothing, so it is dropped (in the normalised copy only). So it is
    for a computed target (its `view(B, T, heads, d)`): its entries are sizes of tensors, 0 only for an empty one."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or not _attr(node, "allowzero", 0):
            continue
        shape = inits.get(node.input[1]) if len(node.input) > 1 else None
        if shape is None or 0 not in numpy_helper.to_array(shape).tolist():
            keep = [a for a in node.attribute if a.name != "allowzero"]
            del node.attribute[:]
            node.attribute.extend(keep)


# onnx2torch converters that read their input's shape from value_info (the rank picks BatchNorm1d/2d/3d, a pool's
# spatial rank; LayerNorm reads the normalised dims): without one they fail ("spatial rank == -2").
_SHAPE_READERS = ("BatchNormalization", "InstanceNormalization", "AveragePool", "MaxPool", "GlobalAveragePool",
                  "LayerNormalization")


def _complete_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
    """Give the inputs of `_SHAPE_READERS` a shape where onnx's inference leaves none (in place, normalised copy).

    paddle2onnx's recogniser reshapes with a computed shape (Shape → Gather → Concat → Reshape) before three
    BatchNorms; onnx's inference stops there, onnx2torch then cannot choose the BatchNorm class. The static
    shapes (`layers.with_static_shapes`: onnx's inference, then one onnxruntime run for what it misses) fill
    them in, the batch dim left symbolic: these converters read the rank and the non-batch dims only."""
    from onnxecc.graph.layers import tensor_shapes, with_static_shapes

    readers = [n.input[0] for n in model.graph.node if n.op_type in _SHAPE_READERS and n.domain in ("", "ai.onnx")]
    if not readers:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # onnx raises InferenceError or bare RuntimeErrors; the static pass below decides
        inferred = model
    known = {vi.name for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
             if vi.type.tensor_type.HasField("shape")}
    missing = [name for name in dict.fromkeys(readers) if name not in known]
    if not missing:
        return
    shapes = tensor_shapes(with_static_shapes(model, input_shapes=input_shapes))  # UserError naming --input-shape
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    own = {vi.name: vi for vi in model.graph.value_info}
    for name in missing:
        if name in shapes:
            dims = ["batch", *shapes[name][1:]] if shapes[name] else []
            vi = onnx.helper.make_tensor_value_info(name, elem.get(name) or onnx.TensorProto.FLOAT, dims)
            if name in own:
                own[name].CopyFrom(vi)
            else:
                model.graph.value_info.append(vi)


def _check_conv_weights(model: onnx.ModelProto) -> None:
    """onnx2torch builds nn.ConvNd only from constant weights; a computed one (e.g. QDQ) would be a KeyError."""
    inits = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and node.domain in ("", "ai.onnx"):
            for i, role in ((1, "weight"), (2, "bias")):
                if len(node.input) > i and node.input[i] and node.input[i] not in inits:
                    raise UnsupportedModelError(
                        f"{node.op_type} '{node.name or node.output[0]}' has a computed {role} "
                        f"('{node.input[i]}'): only constant conv weights can be converted to torch")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _converter_ok(domain: str, op: str, version: int) -> bool:
    from onnx2torch.node_converters.registry import get_converter

    try:
        get_converter(operation_type=op, version=version, domain=domain)
    except NotImplementedError:
        return False
    return True


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {imp.domain: imp.version for imp in model.opset_import}


def _missing_converters(model: onnx.ModelProto) -> list[str]:
    """'op (domain, opset v)' for every op type onnx2torch has no converter for, in graph order."""
    opsets = _opsets(model)
    missing: list[str] = []
    for node in model.graph.node:
        version = opsets.get(node.domain)
        if version is None or not _converter_ok(node.domain, node.op_type, version):
            where = f"domain '{node.domain}'" if node.domain else "opset"
            desc = f"op {node.op_type} ({where} {version if version is not None else '?'})"
            if desc not in missing:
                missing.append(desc)
    return missing


def _target_opset(model: onnx.ModelProto) -> int | None:
    """None when onnx2torch converts every op at the model's opset; else the highest lower default-domain
    opset at which it converts them all (read from onnx2torch's registry, not hard-coded), else the lowest
    higher one: onnx2torch has no converter for some ops of opset 7-9 graphs (Upsample, Dropout-7,
    BatchNormalization-7, Gemm-7), which onnx's version converter rewrites on the way up (Upsample → Resize)."""
    missing = _missing_converters(model)
    if not missing:
        return None
    opsets = _opsets(model)
    custom = [n for n in model.graph.node if n.domain and not _converter_ok(n.domain, n.op_type,
                                                                          opsets.get(n.domain, -1))]
    if custom or "" not in opsets:
        raise UnsupportedModelError(f"onnx2torch has no converter for {missing[0]}")
    ops = sorted({n.op_type for n in model.graph.node if not n.domain})
    for version in range(opsets[""] - 1, _MIN_OPSET - 1, -1):
        if all(_op_exists(op, version) and _converter_ok("", op, version) for op in ops):
            return version
    upward = _upward_opset(model, opsets[""])
    if upward is not None:
        return upward
    raise UnsupportedModelError(f"onnx2torch has no converter for {missing[0]} at any opset")


_MAX_UPWARD = 13  # up to the opset whose versions onnx2torch covers best (its registry stops at 13 for most ops)


def _upward_opset(model: onnx.ModelProto, current: int) -> int | None:
    """The lowest opset above `current` at which the model, converted by onnx's version converter (op by op: the
    rewritten graph is what is checked), has a converter for every op; None if none up to _MAX_UPWARD. The
    model's skeleton is converted (op types are what matter, the weights stay out of the copies)."""
    from onnxecc.graph.layers import shape_skeleton

    step = shape_skeleton(model)
    for version in range(current + 1, _MAX_UPWARD + 1):
        try:
            step = onnx.version_converter.convert_version(step, version)
        except Exception:  # the converter raises bare RuntimeErrors: that step has no adapter, nor the ones above
            return None
        if not _missing_converters(step):
            return version
    return None


def _op_exists(op: str, version: int) -> bool:
    try:
        defs.get_schema(op, max_inclusive_version=version, domain="")
    except defs.SchemaError:
        return False
    return True


# ---- the verified map ------------------------------------------------------------------------------------
class _Binder:
    """Finds, for each weight of the normalised graph, the torch tensor onnx2torch made of it."""

    def __init__(self, gm: torch.fx.GraphModule, norm: onnx.ModelProto, original: onnx.ModelProto):
        from onnx2torch.onnx_graph import OnnxGraph

        self.gm = gm
        self.norm = norm
        self.onnx_graph = OnnxGraph(norm.graph)  # onnx2torch's own node → module naming
        self.inits = {t.name: t for t in norm.graph.initializer}
        self.original = Graph(original)
        self.fx_nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
        self.params: dict[str, str] = {}
        self.layouts: dict[str, Layout] = {}
        self.graph_changed = False

    def bind(self) -> tuple[dict[str, str], dict[str, Layout]]:
        g = Graph(self.norm)
        bias_adds = _matmul_bias_adds(self.norm, g, self.inits)
        for module_name, onode in self.onnx_graph.nodes.items():
            node = onode.proto
            for index, role in _roles(node, self.inits, bias_adds):
                self._bind(module_name, node, index, role)
        if self.graph_changed:
            self.gm.graph.eliminate_dead_code()
            self._drop_unused_initializer_buffers()
            self.gm.graph.lint()
            self.gm.recompile()
        return self.params, self.layouts

    def _bind(self, module_name: str, node: onnx.NodeProto, index: int, role: str) -> None:
        onnx_name = node.input[index]
        label = f"{node.op_type} '{node.name or node.output[0]}'"
        module = self._module(module_name, node, label)
        layout = Layout()
        target = _parameterised_submodule(module, node.op_type)
        if target is not None:
            sub_name, sub = target
            qualified = ".".join(p for p in (module_name, sub_name, role) if p)
            if node.op_type == "Gemm" and role == "weight":
                layout = Layout(transpose=not _attr(node, "transB", 0), scale=float(_attr(node, "alpha", 1.0)))
            elif node.op_type == "Gemm":
                layout = Layout(scale=float(_attr(node, "beta", 1.0)))
            if not isinstance(getattr(sub, role, None), torch.Tensor):
                raise UnsupportedModelError(f"cannot map '{onnx_name}' of {label} to a torch tensor ({role})")
        else:
            qualified = self._promote(module_name, module, node, onnx_name, role, label)
        self._verify(onnx_name, qualified, layout, label)
        if onnx_name in self.params:
            self._tie(onnx_name, qualified, layout, label)
            return
        self.params[onnx_name] = qualified
        self.layouts[onnx_name] = layout

    def _module(self, module_name: str, node: onnx.NodeProto, label: str) -> nn.Module:
        try:
            module = self.gm.get_submodule(module_name)
        except AttributeError:
            module = None
        mapping = getattr(module, "onnx_mapping", None)
        if module is None or mapping is None or tuple(mapping.outputs) != tuple(node.output):
            raise UnsupportedModelError(f"cannot find the torch module of {label} in onnx2torch's output")
        return module

    def _promote(self, module_name: str, module: nn.Module, node: onnx.NodeProto, onnx_name: str, role: str,
                 label: str) -> str:
        """A constant operand onnx2torch passes in as a buffer becomes a parameter of the consuming module."""
        fx_node = self.fx_nodes.get(module_name)
        mapping = module.onnx_mapping
        if fx_node is None or onnx_name not in mapping.inputs:
            raise UnsupportedModelError(f"cannot map '{onnx_name}' of {label} to a torch tensor")
        position = list(mapping.inputs).index(onnx_name)
        if position < len(fx_node.args):
            arg = fx_node.args[position]
        else:
            names = list(inspect.signature(module.forward).parameters)
            arg = fx_node.kwargs.get(names[position]) if position < len(names) else None
        if not isinstance(arg, torch.fx.Node) or arg.op != "get_attr":
            raise UnsupportedModelError(f"cannot map '{onnx_name}' of {label} to a torch tensor (not a constant)")
        qualified = f"{module_name}.{role}"
        if role in module.__dict__ or hasattr(module, role):
            raise UnsupportedModelError(f"cannot map '{onnx_name}' of {label}: module already has '{role}'")
        value = _get_tensor(self.gm, arg.target)
        module.register_parameter(role, nn.Parameter(value.detach().clone()))
        with self.gm.graph.inserting_before(fx_node):
            new = self.gm.graph.get_attr(qualified)
        fx_node.replace_input_with(arg, new)
        self.graph_changed = True
        return qualified

    def _verify(self, onnx_name: str, qualified: str, layout: Layout, label: str) -> None:
        norm_value = numpy_helper.to_array(self.inits[onnx_name])
        tensor = _get_tensor(self.gm, qualified)
        expected = layout.to_torch(norm_value)
        if tuple(tensor.shape) != tuple(expected.shape) or not torch.equal(tensor.detach(), expected):
            raise UnsupportedModelError(f"torch tensor '{qualified}' does not hold '{onnx_name}' of {label}")
        source = self.original.const(onnx_name)
        if source is None or source.shape != norm_value.shape or not np.array_equal(source, norm_value):
            raise UnsupportedModelError(f"'{onnx_name}' of {label} has no matching constant in the original graph")

    def _tie(self, onnx_name: str, qualified: str, layout: Layout, label: str) -> None:
        """A weight shared by several nodes: every use points at the first use's torch tensor."""
        first = self.params[onnx_name]
        if self.layouts[onnx_name] != layout:
            raise UnsupportedModelError(f"weight '{onnx_name}' is shared by layers with different layouts ({label})")
        owner_name, _, attr = qualified.rpartition(".")
        owner = self.gm.get_submodule(owner_name)
        shared = _get_tensor(self.gm, first)
        if isinstance(shared, nn.Parameter):
            owner.register_parameter(attr, shared)
        else:
            owner.register_buffer(attr, shared)

    def _drop_unused_initializer_buffers(self) -> None:
        used = {n.target for n in self.gm.graph.nodes if n.op == "get_attr"}
        container = getattr(self.gm, "initializers", None)
        if container is None:
            return
        for name in list(container._buffers):
            if f"initializers.{name}" not in used:
                del container._buffers[name]


def _get_tensor(module: nn.Module, qualified: str) -> torch.Tensor:
    owner_name, _, attr = qualified.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    value = getattr(owner, attr)
    if not isinstance(value, torch.Tensor):
        raise UnsupportedModelError(f"'{qualified}' is not a tensor of the converted module")
    return value


def _parameterised_submodule(module: nn.Module, op: str) -> tuple[str, nn.Module] | None:
    """The torch layer that owns the node's weights as attributes (Conv may sit in a Sequential after a pad)."""
    kinds: tuple[type, ...] = {
        "Conv": (nn.modules.conv._ConvNd,), "ConvTranspose": (nn.modules.conv._ConvNd,),
        "Gemm": (nn.Linear,), "BatchNormalization": (nn.modules.batchnorm._BatchNorm,),
        "LayerNormalization": (nn.LayerNorm,),
    }.get(op, ())
    if not kinds:
        return None
    found = [(name, sub) for name, sub in module.named_modules() if isinstance(sub, kinds)]
    return found[0] if len(found) == 1 else None


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _roles(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto],
           bias_adds: Mapping[str, int]) -> list[tuple[int, str]]:
    """(input index, torch attribute name) of the node's inputs that are trainable weights."""
    if node.domain not in ("", "ai.onnx"):
        return []
    inputs = list(node.input)

    def const(i: int) -> bool:
        return len(inputs) > i and inputs[i] in inits

    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        return [(i, role) for i, role in ((1, "weight"), (2, "bias")) if const(i)]
    if op == "Gemm":
        return [(i, role) for i, role in ((1, "weight"), (2, "bias")) if const(1) and const(i)]
    if op == "MatMul":
        return [(1, "weight")] if const(1) and not const(0) else []
    if op == "BatchNormalization":
        return [(i + 1, role) for i, role in enumerate(_BN_ROLES) if const(i + 1)]
    if op == "LayerNormalization":  # nn.LayerNorm trains its scale and bias: they must be written back too
        return [(i, role) for i, role in ((1, "weight"), (2, "bias")) if const(1) and const(i)]
    if op == "Add" and node.output[0] in bias_adds:
        return [(bias_adds[node.output[0]], "bias")]
    return []


def _matmul_bias_adds(model: onnx.ModelProto, g: Graph, inits: Mapping[str, onnx.TensorProto]) -> dict[str, int]:
    """Add nodes that add a constant bias (one value per output feature) to a MatMul by a constant weight:
    output name → index of the bias input. These biases are trained like a Linear layer's."""
    found: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.input[1] not in inits \
                or node.input[0] in inits:
            continue
        consumers = g.consumers.get(node.output[0], [])
        if len(consumers) != 1 or consumers[0].op_type != "Add" or node.output[0] in g.output_names:
            continue
        add = consumers[0]
        other = 1 if add.input[0] == node.output[0] else 0
        if add.input[other] not in inits or add.input[other] == node.output[0]:
            continue
        weight = tuple(inits[node.input[1]].dims)
        bias = tuple(inits[add.input[other]].dims)
        if weight and bias and bias[-1] == weight[-1] and int(np.prod(bias)) == weight[-1]:
            found[add.output[0]] = other
    return found


# ---- write-back ------------------------------------------------------------------------------------------
def write_back(tm: TorchModel) -> onnx.ModelProto:
    """A copy of the original proto whose mapped tensors hold the torch values (unchanged ones untouched)."""
    model = onnx.ModelProto()
    model.CopyFrom(tm.original)
    g = Graph(model)
    for onnx_name in tm.params:
        layout = tm.layouts.get(onnx_name, Layout())
        tensor = tm.parameter(onnx_name).detach().cpu()
        old = g.const(onnx_name)
        if old is not None and torch.equal(layout.to_torch(old).to(tensor.dtype), tensor):
            continue  # bit-identical: leave the original bytes (and structure) alone
        g.set_const(onnx_name, layout.to_onnx(tensor))
    return model


# ---- running ---------------------------------------------------------------------------------------------
def run_torch(model: TorchModel | nn.Module, *inputs, input_names: Sequence[str] | None = None):
    """Run the module in eval mode without gradients on numpy inputs (positional, or one dict keyed by graph
    input name); returns a numpy array, or a list of them for several outputs. The mode is restored."""
    module = model.module if isinstance(model, TorchModel) else model
    names = list(input_names or (model.input_names if isinstance(model, TorchModel) else []))
    if len(inputs) == 1 and isinstance(inputs[0], Mapping):
        feeds = inputs[0]
        missing = [n for n in names if n not in feeds]
        if not names or missing:
            raise ValueError(f"run_torch needs inputs by position or for every graph input ({missing})")
        inputs = tuple(feeds[n] for n in names)
    tensors = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(*tensors)
    finally:
        module.train(was_training)
    if isinstance(out, torch.Tensor):
        return out.numpy()
    return [o.numpy() for o in out]
