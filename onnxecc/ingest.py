"""Load an ONNX model robustly and check it, turning every failure into a one-line `UserError`.

Users hand us files from many exporters; anything malformed must stop here with a message that says what
is wrong, rather than surface later as a KeyError deep inside a converter.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

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
    yield from onnx.external_data_helper._get_all_tensors(model)


def _uses_external_data(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL


def save(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write atomically: a temp file in the same directory, fsync, rename — never a half-written model."""
    path = Path(path)
    if not path.parent.exists():
        raise UserError(f"output directory does not exist: {path.parent} — create it first")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        large = model.ByteSize() >= _TWO_GB
        if large:
            data_name = path.name + ".data"
            onnx.save_model(model, str(tmp), save_as_external_data=True, location=data_name)
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
