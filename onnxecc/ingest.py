"""Load an ONNX model robustly and check it, turning every failure into a one-line `UserError`.

Users hand us files from many exporters; anything malformed must stop here with a message that says what
is wrong, rather than surface later as a KeyError deep inside a converter.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from onnxecc import atomic
from onnxecc.errors import UserError

ModelSource = str | os.PathLike | bytes | onnx.ModelProto

_TWO_GB = 2**31


def load(src: ModelSource, *, check: bool = True) -> onnx.ModelProto:
    """Load a model from a path, raw bytes or a ModelProto (copied), with external data, and check it."""
    if isinstance(src, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(src)
        path = None
    elif isinstance(src, bytes):
        model = _parse(src, "<bytes>")
        path = None
    else:
        path = Path(src)
        model = _read(path)
    if not model.HasField("graph") or not model.opset_import:
        where = path or "the model"
        raise UserError(f"{where} is not an ONNX model (no graph or no opset): pass a .onnx file")
    if check:
        _check(model, path)
        _check_sizes(model, path)
    return model


_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _check_sizes(model: onnx.ModelProto, path: Path | None) -> None:
    """What the ONNX checker lets through: tensors whose data does not fill their dims, shapes that
    contradict each other (strict shape inference), zero-sized channel dims (nothing to compute or prune)."""
    where = path or "model"
    for t in _all_tensors(model):
        if not _uses_external_data(t) and not _data_fits(t):
            raise UserError(f"{where}: tensor '{t.name}' holds a different amount of data than its shape "
                            f"{tuple(t.dims)} needs: the file is corrupt, re-export it")
    try:  # a model over 2 GB cannot be serialised for inference: the checker ran on its path instead
        inferred = model if model.ByteSize() >= _TWO_GB else onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{where} has inconsistent shapes: {first} — re-export the model") from exc
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim if inp.type.HasField("tensor_type") else []
        if any(d.HasField("dim_value") and d.dim_value == 0 for d in dims):
            raise UserError(f"{where}: input '{inp.name}' has a zero-sized dimension: re-export the model with a "
                            "real input size")
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in _WEIGHTED and node.domain in ("", "ai.onnx"):
            label = f"{node.op_type} '{node.name or node.output[0]}'"
            for name in node.input[1:2]:
                if name in inits and 0 in inits[name].dims:
                    raise UserError(f"{where}: {label} has a zero-sized weight {tuple(inits[name].dims)}: "
                                    "re-export the model without empty layers")
            if node.op_type in ("Conv", "ConvTranspose"):
                _check_conv(node, inits, f"{where}: {label}", _channels(inferred, node.input[0]))


def _channels(model: onnx.ModelProto, name: str) -> int | None:
    """The static dim 1 of a tensor after shape inference, or None when unknown."""
    for vi in (*model.graph.input, *model.graph.value_info):
        if vi.name == name and vi.type.HasField("tensor_type"):
            dims = vi.type.tensor_type.shape.dim
            return dims[1].dim_value if len(dims) > 1 and dims[1].HasField("dim_value") else None
    return None


def _check_conv(node: onnx.NodeProto, inits: dict, label: str, cin: int | None) -> None:
    """Attributes and weight shapes that the checker does not relate to each other but every later step needs."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    group = attrs.get("group", 1)
    if not isinstance(group, int) or group < 1:
        raise UserError(f"{label} has group={group!r}; it must be a positive integer: re-export the model")
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    if w is None:
        return
    dims = tuple(w.dims)
    kernel = attrs.get("kernel_shape")
    if len(dims) < 3 or (kernel is not None and len(kernel) != len(dims) - 2):
        raise UserError(f"{label} has a weight of shape {dims}, not (out, in/group, *kernel): re-export the model")
    out = dims[0] if node.op_type == "Conv" else dims[1] * group
    expected_in = dims[1] * group if node.op_type == "Conv" else dims[0]
    if cin is not None and cin != expected_in:
        raise UserError(f"{label} receives {cin} channels but its weight {dims} with group={group} expects "
                        f"{expected_in}: re-export the model")
    if (node.op_type == "Conv" and dims[0] % group) or (node.op_type == "ConvTranspose" and dims[0] % group):
        raise UserError(f"{label}: weight shape {dims} does not split into group={group}: re-export the model")
    b = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if b is not None and tuple(b.dims) != (out,):
        raise UserError(f"{label} has a bias of shape {tuple(b.dims)}, expected ({out},): re-export the model")


def _read(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise UserError(f"model file not found: {path} — check the path")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not an ONNX file")
    data = path.read_bytes()
    if not data:
        raise UserError(f"{path} is empty — re-export the model")
    model = _parse(data, str(path))
    if any(_uses_external_data(t) for t in _all_tensors(model)):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (FileNotFoundError, OSError, onnx.checker.ValidationError) as exc:
            why = getattr(exc, "strerror", None) or " ".join(str(exc).split()) or type(exc).__name__
            raise UserError(
                f"{path} stores weights in external data that cannot be read ({why}): "
                "keep the data file next to the model"
            ) from exc
    return model


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise UserError(f"{where} is not a valid ONNX file (protobuf parse failed): re-export it") from exc
    return model


def _check(model: onnx.ModelProto, path: Path | None) -> None:
    where = path or "model"
    try:
        if model.ByteSize() >= _TWO_GB and path is not None:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{where} fails the ONNX checker: {first}") from exc


def _data_fits(t: onnx.TensorProto) -> bool:
    """Does the tensor's stored data have as many elements as its dims say? (Unknown layouts: assume yes.)"""
    n = 1
    for d in t.dims:
        n *= d
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:  # undefined or exotic element type: the checker's business
        return True
    if t.data_type in _SUB_BYTE or t.data_type == onnx.TensorProto.STRING:
        return True
    if t.HasField("raw_data"):
        return len(t.raw_data) == n * itemsize
    try:
        return onnx.numpy_helper.to_array(t).size == n
    except Exception:
        return False


_SUB_BYTE = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
             if hasattr(onnx.TensorProto, name)}


def _all_tensors(model: onnx.ModelProto):
    """Initializers and Constant-node tensors of the main graph and every subgraph."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                graphs.extend([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)


def _uses_external_data(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL


def save(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write atomically (never a half-written model); models over 2 GB keep their weights in `NAME.data`."""
    if model.ByteSize() < _TWO_GB:
        return atomic.write_bytes(path, model.SerializeToString())
    path = atomic.check_output_path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        onnx.save_model(model, str(tmp), save_as_external_data=True, location=path.name + ".data")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
