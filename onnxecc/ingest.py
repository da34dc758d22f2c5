"""Load an ONNX model robustly and check it, turning every failure into a one-line `UserError`.

Users hand us files from many exporters; anything malformed must stop here with a message that says what
is wrong, rather than surface later as a KeyError deep inside a converter.
"""

from __future__ import annotations

import os
from pathlib import Path

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
    return model


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
        except (FileNotFoundError, OSError) as exc:
            raise UserError(
                f"{path} stores weights in external data that cannot be read ({exc.strerror or exc}): "
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
