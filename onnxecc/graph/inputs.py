"""A model's graph inputs: names, dtypes, the concrete sizes the analysis works at, and data-free feeds.

Exporters leave input sizes symbolic (a text detector takes any page size, a BERT encoder any sequence
length). Counting MACs, finding channel groups and training need one concrete size, so it is chosen here —
from `--input-shape NAME:d0,d1,...` or from the first sample of `--data` — and used on an internal copy
only: the compressed model is the original graph, still symbolic. The batch (axis 0) is always fed by us
and never needs a size; a batch fixed by the model (often 1) is kept.

Inputs of every dtype get data-free feeds that the model accepts: floats are standard-normal, integers
that index an embedding table (Gather) stay below the table's size, other integers and booleans (attention
masks) are 0/1. Several inputs travel together as `Feeds`, indexed like one array along the sample axis.

numpy and onnx only: this module is on the ONNX side.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxecc.core.errors import UserError

Shapes = dict[str, tuple[int, ...]]  # input name -> concrete shape, batch first


@dataclass(frozen=True)
class Input:
    """One graph input as the model declares it: `dims` hold ints (fixed), strings (a dim_param) or None."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model insists on (axis 0 fixed), else None."""
        return self.dims[0] if self.dims and isinstance(self.dims[0], int) else None

    def symbolic_axes(self) -> list[int]:
        """Axes after the batch whose size the model leaves open."""
        return [a for a, d in enumerate(self.dims) if a > 0 and not isinstance(d, int)]


def graph_inputs(model: onnx.ModelProto) -> list[Input]:
    """The inputs a caller feeds (initializers listed as inputs by old exporters are not among them)."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if not vi.type.HasField("tensor_type"):
            raise UserError(f"input '{vi.name}' is not a tensor (sequence or map inputs are not supported): "
                            "export a model whose inputs are tensors")
        t = vi.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        except Exception:
            raise UserError(f"input '{vi.name}' has an element type onnxecc cannot feed "
                            f"({onnx.TensorProto.DataType.Name(t.elem_type)}): export numeric inputs") from None
        if dtype.kind not in "fiub":
            raise UserError(f"input '{vi.name}' has dtype {dtype}: onnxecc feeds numeric and bool inputs only")
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                     for d in t.shape.dim)
        out.append(Input(vi.name, dtype, dims))
    return out


# ---- --input-shape ---------------------------------------------------------------------------------------

def parse_input_shapes(texts: Sequence[str] | None) -> dict[str | None, tuple[int, ...]]:
    """`--input-shape` values, `NAME:d0,d1,...` or `d0,d1,...` (no name: the model's only input), batch first.
    Repeatable; `x` is accepted between dims as well as `,` (`1x3x640x640`)."""
    out: dict[str | None, tuple[int, ...]] = {}
    for text in texts or ():
        name, sep, dims = str(text).rpartition(":")
        name = name.strip() if sep else None
        parts = [p for p in re.split(r"[,x×\s]+", dims.strip()) if p]
        try:
            shape = tuple(int(p) for p in parts)
        except ValueError:
            shape = ()
        if not shape or any(d < 1 for d in shape) or (sep and not name):
            raise UserError(f"--input-shape {text!r}: give NAME:d0,d1,... (batch first, positive sizes), e.g. "
                            "--input-shape x:1,3,640,640; the name may be left out for a single-input model")
        if name in out:
            raise UserError(f"--input-shape is given twice for {name or 'the input'}: give each input once")
        out[name] = shape
    return out


def resolve_shapes(model: onnx.ModelProto, given: Mapping[str | None, Sequence[int]] | None = None,
                   samples: Mapping[str, Sequence[int]] | None = None, batch: int = 1) -> Shapes:
    """The concrete shape of every input, batch first: `batch` where the model leaves the batch open, its own
    where it fixes it; other open dims from `given` (parsed `--input-shape`), else from `samples` (per-sample
    shapes of the first sample of --data, without the batch), else from another input that shares the
    dim_param (BERT's `input_ids` and `attention_mask` share `sequence`). UserError (one line, naming
    --input-shape) when a size is still open, or when a given shape does not fit the model."""
    inputs = graph_inputs(model)
    by_name = {i.name: i for i in inputs}
    given = dict(given or {})
    if None in given:
        if len(inputs) != 1:
            raise UserError(f"--input-shape without a name, but the model has {len(inputs)} inputs "
                            f"({', '.join(by_name)}): give NAME:d0,d1,... for each")
        given[inputs[0].name] = given.pop(None)
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        raise UserError(f"--input-shape names '{unknown[0]}', which is not an input of the model (inputs: "
                        f"{', '.join(by_name) or 'none'})")
    params: dict[str, int] = {}  # dim_param -> size, from any input that fixes it
    chosen: dict[str, tuple[int, ...]] = {}
    for inp in inputs:
        source = "--input-shape" if inp.name in given else "--data" if samples and inp.name in samples else None
        if source is None:
            continue
        if source == "--input-shape" and samples and inp.name in samples and \
                tuple(samples[inp.name]) != tuple(given[inp.name])[1:]:
            raise UserError(f"--input-shape {inp.name}:{','.join(map(str, given[inp.name]))} but the samples of --data "
                            f"are {'×'.join(map(str, samples[inp.name]))}: give one size (without --input-shape "
                            "the data's is used)")
        shape = tuple(int(d) for d in given[inp.name]) if source == "--input-shape" \
            else (1, *(int(d) for d in samples[inp.name]))
        _check_fits(inp, shape, source)
        chosen[inp.name] = shape
        for d, s in zip(inp.dims[1:], shape[1:]):
            if isinstance(d, str) and d not in ("?", ""):
                params.setdefault(d, s)
    out: Shapes = {}
    for inp in inputs:
        if not inp.dims:
            out[inp.name] = ()
            continue
        first = inp.fixed_batch or batch
        if inp.name in chosen:
            out[inp.name] = (first, *chosen[inp.name][1:])
            continue
        rest = []
        for axis, d in enumerate(inp.dims[1:], start=1):
            if isinstance(d, int):
                rest.append(d)
            elif isinstance(d, str) and d in params:
                rest.append(params[d])
            else:
                raise UserError(missing_shape_message(inp, axis))
        out[inp.name] = (first, *rest)
    return out


def missing_shape_message(inp: Input, axis: int) -> str:
    """The one line for an input size nobody gave: which dim, and the option that gives it."""
    example = ",".join("1" if a == 0 else str(d) if isinstance(d, int) else f"D{a}" for a, d in enumerate(inp.dims))
    return (f"input '{inp.name}' has a symbolic dimension {axis} ({inp.dims[axis] or '?'}): give the size to "
            f"analyse at with --input-shape {inp.name}:{example} (or --data, whose first sample fixes it); the "
            "output keeps the dimension symbolic")


def _check_fits(inp: Input, shape: tuple[int, ...], source: str) -> None:
    what = f"{source} for '{inp.name}'" if source == "--input-shape" else f"--data for input '{inp.name}'"
    fits = len(shape) == len(inp.dims) and all(
        a == 0 or not isinstance(d, int) or d == s for a, (d, s) in enumerate(zip(inp.dims, shape)))
    if not fits:
        declared = ",".join(str(d) if isinstance(d, int) else (d or "?") for d in inp.dims)
        got = ",".join(map(str, shape if source == "--input-shape" else shape[1:]))
        raise UserError(f"{what} is {got} but the model declares {declared} (batch first): give a shape of "
                        f"rank {len(inp.dims)} that keeps the fixed sizes")


def fix_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> None:
    """Set the graph inputs' dims to `shapes` in place (only inputs named there are touched)."""
    for vi in model.graph.input:
        if vi.name not in shapes or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        for dim, size in zip(dims, shapes[vi.name]):
            dim.Clear()
            dim.dim_value = int(size)


def with_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy of `model` whose inputs have the concrete `shapes` (and no stale inferred shapes): the working copy
    that analysis, costs and onnxruntime sessions with fixed sizes use. Never written as the output."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    fix_shapes(out, shapes)
    del out.graph.value_info[:]
    for o in out.graph.output:  # their sizes follow from the inputs' (the checker wants a shape: of unknown dims)
        if o.type.HasField("tensor_type") and o.type.tensor_type.HasField("shape"):
            for dim in o.type.tensor_type.shape.dim:
                dim.Clear()
    return out


def shapes_text(shapes: Mapping[str, Sequence[int]]) -> str:
    """`x:1,3,640,640 mask:1,128`, as --input-shape takes it back."""
    return " ".join(f"{n}:{','.join(map(str, s))}" for n, s in shapes.items())


def symbolic(model: onnx.ModelProto) -> bool:
    """Whether an input leaves a size after the batch open (then costs depend on the size chosen)."""
    return any(i.symbolic_axes() for i in graph_inputs(model))


# ---- several inputs as one batch ---------------------------------------------------------------------------

class Feeds:
    """Arrays for several named inputs that share their first (sample) axis, indexed like one array: `len` is
    the number of samples and `feeds[idx]` selects samples of every array, so the code that batches, splits and
    samples a single input array does the same to these."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = {n: np.asarray(a) for n, a in arrays.items()}
        counts = {len(a) if a.ndim else None for a in self.arrays.values()}
        if not self.arrays or len(counts) != 1 or None in counts:
            raise ValueError("Feeds needs arrays of at least one dim with the same number of samples")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index) -> Feeds:
        return Feeds({n: a[index] for n, a in self.arrays.items()})

    @property
    def names(self) -> list[str]:
        return list(self.arrays)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def __repr__(self) -> str:
        return "Feeds(" + ", ".join(f"{n}: {a.dtype}{list(a.shape)}" for n, a in self.arrays.items()) + ")"


Batch = np.ndarray | Feeds  # what the data and the feeds of the tool are: one input's array, or several


def as_feed(names: Sequence[str], x: Batch) -> dict[str, np.ndarray]:
    """The `run` feed of a model with inputs `names` for `x` (one array: the first input)."""
    if isinstance(x, Feeds):
        missing = [n for n in names if n not in x.arrays]
        if missing:
            raise ValueError(f"no array for input '{missing[0]}' (have {', '.join(x.names)})")
        return {n: x.arrays[n] for n in names}
    if len(names) != 1:
        raise ValueError(f"one array given for a model with {len(names)} inputs ({', '.join(names)})")
    return {names[0]: x}


def per_sample_shapes(x: Batch, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """The shape of one sample of each input in `x` (a single array is the first of `names`)."""
    if isinstance(x, Feeds):
        return {n: tuple(a.shape[1:]) for n, a in x.arrays.items()}
    return {names[0]: tuple(x.shape[1:])}


def concat(parts: Sequence[Batch]) -> Batch:
    if parts and isinstance(parts[0], Feeds):
        return Feeds({n: np.concatenate([p.arrays[n] for p in parts]) for n in parts[0].names})
    return np.concatenate(parts)


# ---- data-free feeds -----------------------------------------------------------------------------------------

_PASS_THROUGH = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand"}  # values unchanged


def value_ranges(model: onnx.ModelProto) -> dict[str, int]:
    """For each integer input, the exclusive upper bound its values must stay under, where the graph tells: the
    size of every embedding table a Gather indexes with it (through value-preserving ops), or one more than the
    largest constant an Equal compares it with (one-hot by comparison, as tf2onnx writes it). Inputs absent here
    take 0/1. Reads only the tables' dims, so a model loaded without its external data will do."""
    from onnxecc.graph.graph import Graph

    g = Graph(model)
    out: dict[str, int] = {}
    for inp in graph_inputs(model):
        if inp.dtype.kind not in "iu":
            continue
        bounds, todo, seen = [], [inp.name], set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for node in g.consumers.get(name, []):
                if node.domain not in ("", "ai.onnx"):
                    continue
                if node.op_type in _PASS_THROUGH and node.input[0] == name:
                    todo.extend(o for o in node.output if o)
                elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
                    dims = _dims(g, node.input[0])
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if dims:
                        bounds.append(int(dims[axis]))
                elif node.op_type == "Equal":
                    other = next((i for i in node.input if i != name), None)
                    value = None
                    if other and (other not in g.initializers or _small(g.initializers[other])):
                        value = g.const(other)
                    if value is not None and value.size and value.dtype.kind in "iu":
                        bounds.append(int(value.max()) + 1)
        if bounds:
            out[inp.name] = max(1, min(bounds))
    return out


def _dims(g, name: str) -> tuple[int, ...] | None:
    """The shape of constant `name` without reading its data when it is an initializer (or an Identity of one)."""
    source = g._initializer_behind(name)
    if source is not None:
        return tuple(g.initializers[source].dims)
    value = g.const(name)
    return value.shape if value is not None else None


def _small(t: onnx.TensorProto) -> bool:
    return t.data_location != onnx.TensorProto.EXTERNAL and int(np.prod(t.dims)) <= 1 << 16


def example_feeds(inputs: Sequence[Input], shapes: Mapping[str, Sequence[int]], batch: int = 1, seed: int = 0,
                  ranges: Mapping[str, int] | None = None) -> Batch:
    """Seeded data-free inputs of `batch` samples at `shapes` (also for a model with a fixed batch:
    `runtime.run_batched` feeds them in chunks it accepts). One input gets one array, several `Feeds`. Floats:
    standard normal; integers: uniform below `ranges` (`value_ranges`), else 0/1 like bools: 1 at the first
    position of the last axis and random after it (an attention mask that masks everything out can make a
    softmax NaN)."""
    rng = np.random.default_rng(seed)
    ranges = ranges or {}
    arrays = {}
    for inp in inputs:
        if inp.name not in shapes:
            axes = inp.symbolic_axes()
            if axes:
                raise UserError(missing_shape_message(inp, axes[0]))
        full = tuple(shapes[inp.name]) if inp.name in shapes else tuple(d if isinstance(d, int) else 1
                                                                         for d in inp.dims)
        shape = (batch, *full[1:]) if full else ()
        if inp.dtype.kind == "f":
            arrays[inp.name] = rng.standard_normal(shape).astype(inp.dtype)
        elif inp.name in ranges:
            arrays[inp.name] = rng.integers(0, ranges[inp.name], size=shape).astype(inp.dtype)
        else:
            value = rng.integers(0, 2, size=shape)
            if value.ndim > 1:
                value[..., 0] = 1
            arrays[inp.name] = value.astype(inp.dtype)
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    return Feeds(arrays)
