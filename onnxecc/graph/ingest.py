"""Load an ONNX model robustly and check it, turning every failure into a one-line `UserError`.

Users hand us files from many exporters; anything malformed must stop here with a message that says what
is wrong, rather than surface later as a KeyError deep inside a converter.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from onnxecc.core import atomic
from onnxecc.core.errors import UserError

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
    try:  # on the skeleton: the weights' values play no part (and a model over 2 GB cannot be serialised)
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), strict_mode=True)
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


def check_skeleton(skel: onnx.ModelProto) -> None:
    """`onnx.checker.check_model` on a weight-free skeleton (its stubs point at an empty external-data file),
    written to a temporary folder: the checker reads a path without loading the (absent) weights."""
    with tempfile.TemporaryDirectory(prefix="onnxecc-check-") as tmp:
        open(os.path.join(tmp, _STUB_LOCATION), "wb").close()  # the checker wants external data to exist
        path = os.path.join(tmp, "model.onnx")
        with open(path, "wb") as f:
            f.write(skel.SerializeToString())
        onnx.checker.check_model(path)


def _check(model: onnx.ModelProto, path: Path | None) -> None:
    """The ONNX checker on the model's skeleton (see `skeleton`): the same verdict as on the whole model, whose
    weights are never copied (`check_model(model)` would serialise it once and parse it again in C++: three
    times its size in memory, and impossible over 2 GB)."""
    where = path or "model"
    try:
        check_skeleton(skeleton(model))
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
        return len(t.raw_data) == n * itemsize  # a copy of one tensor at a time
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


def save(model: onnx.ModelProto, path: str | os.PathLike, external: bool | None = None) -> Path:
    """Write `model` to `path` so that a crash or kill at any moment leaves `path` readable as the old model or
    the new one, never half of one. A model whose file would pass protobuf's 2 GB limit keeps its weights in
    `NAME.data` next to it (ONNX external data); `external=True`/`False` forces either layout
    (`runtime.session` writes external data so that onnxruntime can memory-map the weights). Data files named
    after `path` that the new model does not use (an earlier save's) are removed; no other file is touched.

    External data makes the model two files, and no rename swaps two files at once, so the header's rename is
    the one commit point, and the data a header names must exist, whole, from before that header is renamed
    into place until it is replaced (the old order — the data renamed onto `NAME.data`, then the header — left
    the old header over the new data when killed between): (1) the weights go to a file no header names:
    `NAME.data` if it does not exist, else a fresh `NAME.<token>.data` (created exclusively, fsynced: no
    existing file changes); (2) the header, whose `location` fields name that file relative to the header's
    folder (as ONNX resolves them), goes to a temp file renamed onto `path` — commit; (3) the old data files
    named after `path` are removed; (4) data under a token name is copied to `NAME.data` (the usual name,
    which scripts may expect), a header naming it is committed the same way, and the token file is removed.
    A kill between any two steps leaves a header whose data is whole (a left-over file is removed by the next
    save). Not a hard link in (4): onnx refuses to load external data with several links.

    `model` is not modified, and never serialised whole: tensors are written one at a time, so the memory
    needed is the model plus its largest tensor (`SerializeToString` would need the model twice, and fails over
    2 GB). The bytes of an inline model are exactly `model.SerializeToString()`'s."""
    path = atomic.check_output_path(path)
    if external is False or (external is None and _model_size(model) < _TWO_GB):
        atomic.write_with(path, lambda f: _write_model(f, model, {}))
        _remove_stale_data(path, keep=None)
        return path
    usual = _data_path(path)
    first = usual if not usual.exists() else path.with_name(f"{path.name}.{secrets.token_hex(_TOKEN_BYTES)}.data")
    try:
        stubs = _write_external(model, first, first.name)
        atomic.write_with(path, lambda f: _write_model(f, model, stubs))
    except BaseException:
        first.unlink(missing_ok=True)
        raise
    _remove_stale_data(path, keep=first)
    if first != usual:  # a save over an existing pair: its data back under the usual name
        shutil.copyfile(first, usual)
        with open(usual, "rb+") as f:
            os.fsync(f.fileno())
        for stub in stubs.values():
            next(e for e in stub.external_data if e.key == "location").value = usual.name
        atomic.write_with(path, lambda f: _write_model(f, model, stubs))
        first.unlink()
    return path


_TOKEN_BYTES = 6  # NAME.<12 hex digits>.data


def _data_path(path: Path) -> Path:
    """Where `save` keeps the external data of a model written to `path`."""
    return path.with_name(path.name + ".data")


def _data_files(path: Path) -> list[Path]:
    """The existing data files named after `path` that `save` writes: `NAME.data`, and `NAME.<token>.data` of a
    save that was killed (or ran where hard links are unavailable)."""
    token = re.compile(re.escape(path.name) + rf"\.[0-9a-f]{{{2 * _TOKEN_BYTES}}}\.data")
    found = [p for p in path.parent.glob(glob.escape(path.name) + ".*.data") if token.fullmatch(p.name)]
    return sorted(found) + ([_data_path(path)] if _data_path(path).is_file() else [])


def _remove_stale_data(path: Path, keep: Path | None) -> None:
    """After a commit: the data files named after `path` other than `keep` (the one its header now names) are no
    longer read by it. The folder is synced first, so that a power cut cannot keep the removal but lose the
    header's rename."""
    stale = [p for p in _data_files(path) if p != keep]
    if stale:
        atomic.fsync_dir(path.parent)
    for p in stale:
        p.unlink(missing_ok=True)


def files_written(path: str | os.PathLike) -> list[Path]:
    """The existing files a `save` to `path` replaces or removes: `path` and the data files named after it."""
    path = Path(path)
    return ([path] if path.exists() else []) + _data_files(path)


def model_files(src: ModelSource) -> list[Path]:
    """The files a model given by path is read from: the path, then the external-data files its tensors name
    (that exist). Empty for bytes and protos. Parses the file (without its external data)."""
    if not isinstance(src, (str, os.PathLike)):
        return []
    path = Path(src)
    try:
        model = _parse(path.read_bytes(), str(path))
    except (OSError, UserError):  # unreadable or not ONNX: loading it reports that
        return [path]
    found: dict[Path, None] = {}
    for t in _all_tensors(model):
        if _uses_external_data(t):
            location = next((e.value for e in t.external_data if e.key == "location"), None)
            if location and (path.parent / location).is_file():
                found[path.parent / location] = None
    return [path, *found]


def sha256(model: onnx.ModelProto) -> str:
    """The SHA-256 of `model.SerializeToString()`, computed on the streamed encoding (`_write_model`): no copy
    of the model is made, and models over 2 GB (which cannot be serialised) have one too."""
    sink = _HashSink()
    _write_model(sink, model, {})
    return sink.hash.hexdigest()


class _HashSink:
    """The `write`/`tell` of a binary file that only hashes what it is given."""

    def __init__(self):
        import hashlib

        self.hash, self.size = hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)

    def tell(self) -> int:
        return self.size


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether any tensor of `model` refers to external data instead of holding its values."""
    return any(_uses_external_data(t) for t in _all_tensors(model))


# ---- the skeleton and streamed serialisation (models of any size) ----------------------------------------

_STUB_BYTES = 1024  # tensors from this size on are left out of skeletons and go to external data over 2 GB
_STUB_LOCATION = "onnxecc-skeleton.data"
_ALIGN = 4096  # external data offsets (page-aligned: runtimes may memory-map them)


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose initializers of `_STUB_BYTES` or more carry their name, type and dims but no
    data (marked as external data in `_STUB_LOCATION`): what the checker and shape inference need, at the cost
    of the graph's structure rather than its weights. Small tensors (shapes, axes) keep their values."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip=("graph",))
    if model.HasField("graph"):
        _copy_fields(model.graph, out.graph, skip=("initializer",))
        out.graph.initializer.extend(_stub(t, _STUB_LOCATION) if _nbytes(t) >= _STUB_BYTES else t
                                     for t in model.graph.initializer)
    return out


def _copy_fields(src, dst, skip=()) -> None:
    """Copy every set field of `src` into `dst` except `skip` (no copy of the skipped fields is ever made)."""
    for fd in src.DESCRIPTOR.fields:
        if fd.name in skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(getattr(src, fd.name))
        elif src.HasField(fd.name):
            if fd.message_type is not None:
                getattr(dst, fd.name).CopyFrom(getattr(src, fd.name))
            else:
                setattr(dst, fd.name, getattr(src, fd.name))


def _stub(t: onnx.TensorProto, location: str, offset: int | None = None, length: int | None = None
          ) -> onnx.TensorProto:
    out = onnx.TensorProto()
    _copy_fields(t, out, skip=("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data",
                               "uint64_data", "external_data", "data_location"))
    out.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = out.external_data.add()
            entry.key, entry.value = key, str(value)
    return out


def _nbytes(t: onnx.TensorProto) -> int:
    """The size of the tensor's data from its dims and type (upb's `ByteSize()` encodes a tensor to count it,
    and reading `raw_data` copies it: either one holds the tensor twice in memory)."""
    n = 1
    for d in t.dims:
        n *= d
    try:
        return n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:  # undefined or exotic element type: count it as large
        return _STUB_BYTES


def _tensor_size(t: onnx.TensorProto) -> int:
    """The encoded size of `t` without encoding its data (raw data of a fixed-size type fills its dims: checked
    on load; `_write_model` verifies the total it wrote)."""
    if not t.HasField("raw_data") or t.data_type in _SUB_BYTE or t.data_type == onnx.TensorProto.STRING:
        return t.ByteSize()
    out = onnx.TensorProto()
    _copy_fields(t, out, skip=("raw_data",))
    length = _nbytes(t)
    return out.ByteSize() + len(_field(_RAW_DATA, length)) + length


_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number


def _plan(model: onnx.ModelProto, stubs: dict[int, onnx.TensorProto]):
    """The parts of `model`'s encoding in field-number order: model fields before/after the graph, graph fields
    before/after the initializers, and (tensor or its stub, encoded size) per initializer; and the total size."""
    m_head, m_tail = _split(model, _GRAPH)
    g_head, g_tail = _split(model.graph, _INITIALIZER)
    inits = [(stubs.get(i, t), _tensor_size(stubs.get(i, t))) for i, t in enumerate(model.graph.initializer)]
    graph = len(g_head) + len(g_tail) + sum(len(_field(_INITIALIZER, n)) + n for _, n in inits)
    total = len(m_head) + len(m_tail) + (len(_field(_GRAPH, graph)) + graph if model.HasField("graph") else 0)
    return m_head, m_tail, g_head, g_tail, inits, graph, total


def _model_size(model: onnx.ModelProto) -> int:
    """`model.ByteSize()` without encoding the weights (upb's ByteSize encodes the whole model to count it)."""
    return _plan(model, {})[-1]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload_size: int) -> bytes:
    """The tag and length prefix of a length-delimited field."""
    return _varint(number << 3 | 2) + _varint(payload_size)


def _write_external(model: onnx.ModelProto, data_path: Path, location: str) -> dict[int, onnx.TensorProto]:
    """Write the data of every initializer of `_STUB_BYTES` or more to `data_path` (one tensor in memory at a
    time); returns index → the stub that refers to it."""
    from onnx import numpy_helper

    stubs: dict[int, onnx.TensorProto] = {}
    with open(data_path, "xb") as f:  # a new file: never one that another model reads
        for i, t in enumerate(model.graph.initializer):
            if _nbytes(t) < _STUB_BYTES or _uses_external_data(t) or t.data_type == onnx.TensorProto.STRING:
                continue
            if t.HasField("raw_data"):
                data = t.raw_data
            else:  # typed fields: ONNX raw data is little-endian
                value = numpy_helper.to_array(t)
                data = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
            offset = -(-f.tell() // _ALIGN) * _ALIGN
            f.seek(offset)
            f.write(data)
            stubs[i] = _stub(t, location, offset, len(data))
            del data
        f.flush()
        os.fsync(f.fileno())
    return stubs


def _write_model(f, model: onnx.ModelProto, stubs: dict[int, onnx.TensorProto]) -> None:
    """`model`'s protobuf encoding, written field by field in field-number order (so the bytes equal
    `SerializeToString()`'s), each initializer encoded on its own, or replaced by its stub."""
    m_head, m_tail, g_head, g_tail, inits, graph, total = _plan(model, stubs)
    start = f.tell()
    f.write(m_head)
    if model.HasField("graph"):
        f.write(_field(_GRAPH, graph))
        f.write(g_head)
        for t, n in inits:
            f.write(_field(_INITIALIZER, n))
            written = 0
            for part in _tensor_parts(t):
                f.write(part)
                written += len(part)
            if written != n:
                raise RuntimeError(f"tensor '{t.name}' encodes to {written} bytes, not the {n} planned")
        f.write(g_tail)
    f.write(m_tail)
    if f.tell() - start != total:
        raise RuntimeError(f"wrote {f.tell() - start} bytes of the model, not the {total} planned")


def _tensor_parts(t: onnx.TensorProto):
    """`t.SerializeToString()` in pieces, in field-number order: for a tensor with raw data, the fields before it,
    its tag and length, the data (one copy: upb hands `raw_data` out as bytes) and the fields after it.
    `SerializeToString` builds the whole encoding and then copies it into bytes: twice the tensor at once."""
    if not t.HasField("raw_data"):
        yield t.SerializeToString()
        return
    head, tail = _split(t, _RAW_DATA)
    yield head
    data = t.raw_data
    yield _field(_RAW_DATA, len(data))
    yield data
    del data
    yield tail


def _split(msg, number: int) -> tuple[bytes, bytes]:
    """The encodings of `msg`'s fields numbered below and above `number` (that field left out)."""
    head, tail = type(msg)(), type(msg)()
    _copy_fields(msg, head, skip=tuple(fd.name for fd in msg.DESCRIPTOR.fields if fd.number >= number))
    _copy_fields(msg, tail, skip=tuple(fd.name for fd in msg.DESCRIPTOR.fields if fd.number <= number))
    return head.SerializeToString(), tail.SerializeToString()
