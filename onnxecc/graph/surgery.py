"""Structured surgery: physically remove channels of prunable groups from an ONNX model.

`prune_channels(model, keep)` takes, per prunable channel group (see `onnxecc.graph.channels`), the unit indices to
keep, and returns a new, smaller model: every producer's weight/bias, every consumer's input slice (at Concat
offsets, in H×W blocks after Flatten), BatchNorm and per-channel constants are sliced; conv `group` attributes,
Reshape/Expand target shapes, Slice bounds, Split sizes and constant Resize sizes are rewritten; value_info is
re-inferred. Node names, graph inputs/outputs and the opset are kept; a constant shared with a node that needs
other values gets a copy of its own (`<name>_pruned`); a file of IR 3 lists every new initializer among its
graph inputs, as that version requires.

`zero_channels(model, keep)` is the reference it must agree with: the original graph with every consumer-side
weight slice of the removed channels set to zero, so those channels contribute nothing.

Only onnx and numpy are used here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnxecc.core.errors import UserError
from onnxecc.graph.channels import ChannelGraph, Edit, analyze
from onnxecc.graph.graph import Graph, remove_dead_nodes
from onnxecc.graph.ingest import _copy_fields, _stub, check_skeleton
from onnxecc.graph.inputs import symbolic
from onnxecc.graph.layers import node_name, shape_skeleton

Keep = Mapping[int, Sequence[int]]


def validate_keep(graph: ChannelGraph, keep: Keep) -> dict[int, np.ndarray]:
    """Boolean keep masks per group id; every problem with `keep` is a one-line UserError."""
    if not isinstance(keep, Mapping):
        raise UserError("keep must map channel-group ids to lists of kept channel indices")
    n = len(graph.groups)
    masks: dict[int, np.ndarray] = {}
    for gid, chans in keep.items():
        if isinstance(gid, bool) or not isinstance(gid, (int, np.integer)) or not 0 <= gid < n:
            raise UserError(f"unknown channel group {gid!r}: group ids run from 0 to {n - 1} "
                            "(see `onnxecc inspect`)")
        group = graph.groups[int(gid)]
        if group.frozen_by:
            raise UserError(f"channel group {gid} cannot be pruned: it is frozen by {group.frozen_by}")
        try:
            arr = np.asarray(chans if isinstance(chans, np.ndarray) else list(chans))
        except TypeError:
            arr = np.asarray(chans)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise UserError(f"channel group {gid}: kept channels must be a flat list of integers")
        if arr.size == 0:
            raise UserError(f"channel group {gid}: the list of kept channels is empty "
                            f"(keep at least one of its {group.size})")
        bad = arr[(arr < 0) | (arr >= group.size)]
        if bad.size:
            raise UserError(f"channel group {gid}: kept channel {int(bad[0])} is out of range "
                            f"(the group has channels 0..{group.size - 1})")
        values, counts = np.unique(arr, return_counts=True)
        if (counts > 1).any():
            raise UserError(f"channel group {gid}: kept channel {int(values[counts > 1][0])} is listed twice")
        mask = np.zeros(group.size, bool)
        mask[arr] = True
        masks[int(gid)] = mask
    flat = graph.flat(masks)
    for name, pos in graph.tensor_positions().items():
        if pos.gid.size and not pos.kept(flat, graph.offsets).any():
            gids = sorted(set(pos.gid.ravel().tolist()))
            raise UserError(f"the kept channels leave tensor '{name}' with no channels: keep at least one "
                            f"channel of group(s) {', '.join(map(str, gids))} that it holds")
    return masks


def prune_channels(model: onnx.ModelProto, keep: Keep, graph: ChannelGraph | None = None) -> onnx.ModelProto:
    """A new model without the channels that `keep` leaves out (groups absent from `keep` stay whole)."""
    graph = graph if graph is not None else analyze(model)
    masks = validate_keep(graph, keep)
    flat = graph.flat(masks)
    cuts = _cuts(graph, flat)
    source = Graph(model)  # the cut constants are read from `model`: `out` holds no copy of their data yet
    stubbed = {source.weight_source(name) for name in cuts} & set(source.initializers)
    out = _copy(model, stubbed)
    writer = _Writer(out)
    writer.dynamic = symbolic(model)  # computed shapes stay computed: the output runs at any input size
    for name, per_node in cuts.items():
        value = source.const(name)  # decoded (never cached by Graph): one original in memory at a time
        new = {index: _sliced(value, axis_masks) for index, axis_masks in per_node.items()}
        shape, dtype = value.shape, value.dtype
        value = None  # freed before the slices are encoded into the output
        writer.write(name, np.broadcast_to(np.zeros((), dtype), shape), new, sliced=True)
        new = None
    for t in out.graph.initializer:  # constants left whole (or still used whole elsewhere) get their data
        if t.name in stubbed and _is_stub(t):
            t.CopyFrom(source.initializers[t.name])
    for e in graph.edits:
        _EDITS[e.kind](writer, graph, e, flat)
    writer.finish()
    del out.graph.value_info[:]
    _infer_shapes(out)
    _check(out)
    return out


def _sliced(value: np.ndarray, axis_masks: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """`value` keeping the masked positions along each axis, taken in one step (`np.ix_`) when every axis is
    cut once: slicing axis by axis would build an intermediate array (half a VGG fc6 layer) on the way."""
    axes = [axis for axis, _ in axis_masks]
    if len(set(axes)) != len(axes):
        for axis, mask in axis_masks:
            value = np.compress(mask, value, axis=axis)
        return value
    index = [np.arange(n) for n in value.shape]
    for axis, mask in axis_masks:
        index[axis] = np.flatnonzero(mask)
    cut = [axis for axis in range(value.ndim) if axis in axes]
    if len(cut) == 1:
        return np.take(value, index[cut[0]], axis=cut[0])
    return value[np.ix_(*index)]


def _infer_shapes(model: onnx.ModelProto) -> None:
    """`model` with its shapes inferred by onnx, in place: on its skeleton (`layers.shape_skeleton`), whose
    inferred graph then replaces everything but the initializers (the weights are neither copied nor
    serialised); on the whole model only if the skeleton fails. Shape inference is a courtesy: the checker is
    the real test, so a model it gives up on is left as it is."""
    try:
        inferred = onnx.shape_inference.infer_shapes(shape_skeleton(model))
    except Exception:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:
            return
        model.CopyFrom(inferred)
        return
    for fd in model.graph.DESCRIPTOR.fields:
        if fd.name != "initializer":
            model.graph.ClearField(fd.name)
    _copy_fields(inferred.graph, model.graph, skip=("initializer",))


def _check(model: onnx.ModelProto) -> None:
    """`onnx.checker.check_model(model)` (same checks, same ValidationError) run on the skeleton written to a
    temporary folder, as `ingest` does: the whole model would be serialised and parsed again (3× its size)."""
    check_skeleton(shape_skeleton(model))


def zero_channels(model: onnx.ModelProto, keep: Keep, graph: ChannelGraph | None = None) -> onnx.ModelProto:
    """The original model with every consumer-side weight slice of the removed channels set to zero."""
    graph = graph if graph is not None else analyze(model)
    masks = validate_keep(graph, keep)
    flat = graph.flat(masks)
    out = _copy(model)
    writer = _Writer(out)
    for name, per_node in _cuts(graph, flat, roles=("consumer",)).items():
        value = writer.g.const(name)
        new = {}
        for index, axis_masks in per_node.items():
            zeroed = value.copy()
            for axis, mask in axis_masks:
                index_ = [slice(None)] * zeroed.ndim
                index_[axis] = ~mask
                zeroed[tuple(index_)] = 0
            new[index] = zeroed
        writer.write(name, value, new)
    writer.finish()
    return out


def _cuts(graph: ChannelGraph, flat: np.ndarray, roles: tuple[str, ...] | None = None
          ) -> dict[str, dict[int, list[tuple[int, np.ndarray]]]]:
    """constant name -> node index -> [(axis, kept-position mask)] for every bind (of the given roles)."""
    cuts: dict[str, dict[int, list[tuple[int, np.ndarray]]]] = defaultdict(lambda: defaultdict(list))
    for b in graph.binds:
        if roles is None or b.role in roles:
            cuts[b.name][b.node_index].append((b.axis, b.pos.kept(flat, graph.offsets).ravel()))
    return cuts


def _copy(model: onnx.ModelProto, stubbed: set[str] = frozenset()) -> onnx.ModelProto:
    """A copy of `model` whose initializers named in `stubbed` carry no data (see `_is_stub`): they are about
    to be replaced, and copying them first would hold them twice."""
    out = onnx.ModelProto()
    if not stubbed:
        out.CopyFrom(model)
        return out
    _copy_fields(model, out, skip=("graph",))
    _copy_fields(model.graph, out.graph, skip=("initializer",))
    for t in model.graph.initializer:  # (`extend` would hold each tensor twice while it copies)
        out.graph.initializer.add().CopyFrom(_stub(t, _PENDING) if t.name in stubbed else t)
    return out


_PENDING = "onnxecc-pending.data"  # the external-data location that marks an initializer whose data is to come


def _is_stub(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL and \
        any(e.key == "location" and e.value == _PENDING for e in t.external_data)


class _Writer:
    """Edits a model in place while keeping node objects valid (dead nodes are dropped only at the end)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.g = Graph(model)
        self.nodes = list(model.graph.node)
        self.users: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(self.nodes):
            for inp in node.input:
                if inp:
                    self.users[inp].append(i)
        self.names = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input} | \
            {o for n in self.nodes for o in n.output} | {i for n in self.nodes for i in n.input}
        self.outputs = {o.name for o in model.graph.output}
        self.dynamic = False  # the model's input sizes are symbolic: see `computed_shape`
        self.before: dict[int, list[onnx.NodeProto]] = defaultdict(list)  # nodes to insert before node i

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}{k}"
        self.names.add(name)
        return name

    def write(self, name: str, old: np.ndarray, per_node: dict[int, np.ndarray], sliced: bool = False) -> None:
        """Give each node in `per_node` its value of constant `name`: in place when every user of `name`
        wants the same value, else a copy per node. `sliced`: the values are slices of `old`, hence unchanged
        exactly when their shape is, and `old` (only its shape and dtype are read) may be a zero-stride
        stand-in for the freed original."""
        values = list(per_node.values())
        if all(v.shape == old.shape and (sliced or np.array_equal(v, old)) for v in values):
            return
        same = all(v.shape == values[0].shape and np.array_equal(v, values[0]) for v in values)
        if same and set(self.users[name]) <= set(per_node) and name not in self.outputs:
            self._replace(name, values[0].astype(old.dtype, copy=False))
            return
        for index, value in per_node.items():
            new = self.add_const(f"{name}_pruned", value.astype(old.dtype, copy=False))
            node = self.nodes[index]
            for k, inp in enumerate(node.input):
                if inp == name:
                    node.input[k] = new

    def add_const(self, base: str, value: np.ndarray) -> str:
        name = self.unique(base)
        self._append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def _append(self, tensor: onnx.TensorProto) -> None:
        """A new initializer; IR 3 (caffe2-era exports) requires every initializer among the graph inputs too."""
        self.model.graph.initializer.append(tensor)
        if self.model.ir_version < 4:
            self.model.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                                             list(tensor.dims)))

    def _replace(self, name: str, value: np.ndarray) -> None:
        if self.g.weight_source(name) in self.g.initializers:
            self.g.set_const(name, value)  # follows Identity chains; never restructures the graph here
            for inp in self.model.graph.input:  # old IR: initializers listed as inputs carry a shape
                if inp.name == self.g.weight_source(name) and inp.type.HasField("tensor_type"):
                    inp.type.tensor_type.shape.CopyFrom(
                        onnx.helper.make_tensor_type_proto(1, list(value.shape)).tensor_type.shape)
            return
        producer = self.g.producer[name]  # computed constant: it becomes an initializer; the node dies later
        kept = [o for o in producer.output if o != name]
        del producer.output[:]
        producer.output.extend(kept)
        self._append(numpy_helper.from_array(np.ascontiguousarray(value), name))

    def set_input(self, index: int, position: int, value: np.ndarray, suffix: str) -> None:
        node = self.nodes[index]
        new = self.add_const(f"{node_name(node, index)}_{suffix}", value)
        while len(node.input) <= position:
            node.input.append("")
        node.input[position] = new

    def computed_shape(self, index: int, position: int, rank: int, replace: dict[int, int],
                       scaled: dict[int, tuple[int, int]] | None = None) -> None:
        """Input `position` of node `index` is a shape of `rank` entries computed in the graph (from `Shape` of a
        tensor): its entries at the axes of `replace` become those values and every other entry stays computed,
        `shape · keep + values` (keep 0 at the replaced axes, 1 elsewhere). The analysis ran at one input size; a
        constant written here would hold that size, and the output must run at any size the original runs at."""
        node = self.nodes[index]
        shape = node.input[position]
        base = node_name(node, index)
        if not scaled and self._concat_entries(index, position, rank, replace):
            return
        keep = np.ones(rank, np.int64)
        values = np.zeros(rank, np.int64)
        for axis, value in replace.items():
            keep[axis], values[axis] = 0, value
        if scaled:  # (shape · kept) / original at those entries first: integer division, exact by construction
            num, den = np.ones(rank, np.int64), np.ones(rank, np.int64)
            for axis, (old, new_count) in scaled.items():
                num[axis], den[axis] = new_count, old
            times, over = self.unique(f"{base}_times"), self.unique(f"{base}_over")
            self.before[index] += [
                onnx.helper.make_node("Mul", [shape, self.add_const(f"{base}_num", num)], [times], name=times),
                onnx.helper.make_node("Div", [times, self.add_const(f"{base}_den", den)], [over], name=over)]
            shape = over
        keep_name = self.add_const(f"{base}_keep", keep)
        values_name = self.add_const(f"{base}_values", values)
        kept, new = self.unique(f"{base}_kept"), self.unique(f"{base}_pruned")
        self.before[index] += [onnx.helper.make_node("Mul", [shape, keep_name], [kept], name=self.unique(kept)),
                               onnx.helper.make_node("Add", [kept, values_name], [new], name=self.unique(new))]
        node.input[position] = new

    def _concat_entries(self, index: int, position: int, rank: int, replace: dict[int, int]) -> bool:
        """`computed_shape` where the shape is a Concat whose entries at the replaced axes are constants
        (`view(B, T, heads, d)`: batch and length read from Shape, head count and width written in): a copy of
        the Concat with new constants there. onnxruntime still folds that into a constant shape; Mul/Add on the
        whole shape would keep every Shape and Gather of it running (a pruned small encoder ran slower)."""
        node = self.nodes[index]
        concat = self.g.producer.get(node.input[position])
        if concat is None or concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx"):
            return False
        values, lengths = [], []
        for name in concat.input:
            value = self.g.const(name)
            producer = self.g.producer.get(name)
            if value is None and (producer is None or producer.op_type != "Unsqueeze"):
                return False  # an entry of unknown length (Unsqueeze makes a scalar one entry)
            values.append(None if value is None else np.asarray(value).reshape(-1))
            lengths.append(1 if value is None else int(np.size(value)))
        if sum(lengths) != rank:
            return False
        starts = np.cumsum([0] + lengths)
        parts = {int(np.searchsorted(starts, axis, side="right") - 1) for axis in replace}
        if any(values[k] is None for k in parts):
            return False
        inputs = list(concat.input)
        for k in sorted(parts):
            new = values[k].copy()
            for axis, value in replace.items():
                if starts[k] <= axis < starts[k + 1]:
                    new[axis - starts[k]] = value
            inputs[k] = self.add_const(f"{node_name(node, index)}_entries", new)
        out = self.unique(f"{node_name(node, index)}_shape")
        self.before[index].append(onnx.helper.make_node("Concat", inputs, [out], name=out, axis=0))
        node.input[position] = out
        return True

    def finish(self) -> None:
        if self.before:  # inserted nodes go right before the node that reads them (topological order)
            nodes = [n for i, node in enumerate(self.nodes) for n in (*self.before.get(i, ()), node)]
            del self.model.graph.node[:]
            self.model.graph.node.extend(nodes)
        remove_dead_nodes(self.model)


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for k, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[k]
            break
    if value is not None:
        node.attribute.append(onnx.helper.make_attribute(name, value))


# ---- structural edits, one per kind recorded by the analysis --------------------------------------------------
def _edit_group(w: _Writer, graph: ChannelGraph, e: Edit, flat: np.ndarray) -> None:
    """Depthwise conv: one group per kept channel."""
    _set_attr(w.nodes[e.node_index], "group", int(e.data["lay"].kept(flat, graph.offsets).sum()))


def _new_dims(mask: np.ndarray) -> list[int]:
    dims = []
    for t in range(mask.ndim):
        others = tuple(o for o in range(mask.ndim) if o != t)
        dims.append(int(mask.any(axis=others).sum()) if others else int(mask.sum()))
    if int(np.prod(dims)) != int(mask.sum()):
        raise AssertionError("kept channels over several axes are not a product: cannot reshape")
    return dims


def _edit_reshape(w: _Writer, graph: ChannelGraph, e: Edit, flat: np.ndarray) -> None:
    out = e.data["out"]
    dims = _new_dims(out.kept(flat, graph.offsets))
    const, shape_out = e.data["const"], e.data["shape_out"]
    if const is not None:
        shape = const.copy()
        for k in range(1, len(shape)):  # 0 copies the input dim, which may be a pruned one: spell it out
            if shape[k] == 0 and not e.data["allowzero"]:
                shape[k] = shape_out[k]
        for t, ax in enumerate(out.axes):
            if shape[ax] != -1:
                shape[ax] = dims[t]
        if np.array_equal(shape, const):
            return
    elif w.dynamic or e.data.get("scaled") or e.data.get("moved") or e.data["allowzero"]:
        # computed from Shape at one of many input sizes (or batch sizes, or with allowzero, where a 0 written for
        # the batch would be a size of 0): only the channel entries change; an
        # entry that holds batch × channels (`view(T, B * heads, d)`) is scaled by kept / original channels
        scaled = {ax: (int(shape_out[ax]), int(dims[t])) for t, ax in enumerate(out.axes)
                  if ax in e.data.get("scaled", ())}
        w.computed_shape(e.node_index, 1, len(shape_out),
                         {ax: int(dims[t]) for t, ax in enumerate(out.axes) if ax not in scaled}, scaled)
        return
    else:  # computed from Shape: a constant now, the batch copied from the input
        shape = np.array(shape_out, np.int64)
        for t, ax in enumerate(out.axes):
            shape[ax] = dims[t]
        shape[0] = 0
    w.set_input(e.node_index, 1, shape.astype(np.int64), "shape")


def _edit_slice(w: _Writer, graph: ChannelGraph, e: Edit, flat: np.ndarray) -> None:
    d = e.data
    starts, ends = list(d["starts"]), list(d["ends"])
    if d["k"] is not None:
        mask = d["lay"].kept(flat, graph.offsets).ravel()
        start, stop = d["bounds"]
        starts[d["k"]], ends[d["k"]] = int(mask[:start].sum()), int(mask[:stop].sum())
    node = w.nodes[e.node_index]
    if graph.opset >= 10:
        for position, values, suffix in ((1, starts, "starts"), (2, ends, "ends"), (3, d["axes"], "axes"),
                                         (4, d["steps"], "steps")):
            w.set_input(e.node_index, position, np.array(values, np.int64), suffix)
    else:
        _set_attr(node, "starts", starts)
        _set_attr(node, "ends", ends)
        _set_attr(node, "axes", list(d["axes"]))


def _edit_split(w: _Writer, graph: ChannelGraph, e: Edit, flat: np.ndarray) -> None:
    mask = e.data["lay"].kept(flat, graph.offsets).ravel()
    sizes = [int(mask[a:b].sum()) for a, b in e.data["parts"]]
    node = w.nodes[e.node_index]
    if graph.opset >= 13:
        _set_attr(node, "num_outputs", None)
        w.set_input(e.node_index, 1, np.array(sizes, np.int64), "split")
    else:
        _set_attr(node, "split", sizes)


def _edit_expand(w: _Writer, graph: ChannelGraph, e: Edit, flat: np.ndarray) -> None:
    shape_in, shape_out = e.data["shape_in"], e.data["shape_out"]
    target = w.nodes[e.node_index].input[1]
    if w.dynamic and w.g.const(target) is None:  # computed at one input size: 1 (keep) on the channel axes only
        w.computed_shape(e.node_index, 1, len(shape_out), {ax: 1 for ax in e.data["out"].axes})
        return
    shift = len(shape_out) - len(shape_in)
    shape = [o if k < shift or shape_in[k - shift] != o else 1 for k, o in enumerate(shape_out)]
    w.set_input(e.node_index, 1, np.array(shape, np.int64), "shape")


def _edit_sizes(w: _Writer, graph: ChannelGraph, e: Edit, flat: np.ndarray) -> None:
    """Resize with constant sizes: the channel entry becomes the kept count."""
    sizes = e.data["sizes"].copy()
    sizes[e.data["at"]] = int(e.data["lay"].kept(flat, graph.offsets).sum())
    if not np.array_equal(sizes, e.data["sizes"]):
        w.set_input(e.node_index, 3, sizes, "sizes")


def _edit_permute(w: _Writer, graph: ChannelGraph, e: Edit, flat: np.ndarray) -> None:
    """Channel shuffle Reshape → Transpose → Reshape: the first becomes a Gather of the kept channels in
    shuffled order, the other two Identity (node names kept)."""
    mask = e.data["lay"].kept(flat, graph.offsets).ravel()
    order = e.data["order"]
    indices = (np.cumsum(mask) - 1)[order[mask[order]]]
    first, transpose, merge = (w.nodes[i] for i in e.data["nodes"])
    name = w.add_const(f"{node_name(first, e.data['nodes'][0])}_indices", indices.astype(np.int64))
    first.op_type = "Gather"
    del first.attribute[:]
    first.attribute.append(onnx.helper.make_attribute("axis", int(e.data["axis"])))
    first.input[1] = name
    for node in (transpose, merge):
        node.op_type = "Identity"
        del node.attribute[:]
        del node.input[1:]


_EDITS = {"permute": _edit_permute, "group": _edit_group, "reshape": _edit_reshape, "slice": _edit_slice,
          "split": _edit_split, "expand": _edit_expand, "sizes": _edit_sizes}
