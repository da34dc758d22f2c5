"""Channel groups: which channel dimensions of an ONNX graph must be pruned together.

A *group* is an abstract channel space of `size` units. Every tracked tensor has a *layout*: for each position
along its channel axis (or axes), the group and the unit it holds. Pruning unit u of group g removes every
position that holds (g, u) — in every tensor, weight, bias, BatchNorm parameter and per-channel constant at
once — so the pruned model computes exactly what the original computes when those channels contribute nothing.

Most tensors hold one group in order (unit i at position i). Concat lays several groups side by side (each
consumer then slices each group at its offset); Flatten repeats every unit over the H×W features that follow
it; grouped convolutions and channel shuffles *fold* a group, so that one unit stands for several channels
that can only go together. Ops couple groups by unifying two layouts position by position: a union-find over
groups in which a merged group's units are the classes of identified channels. Residual Adds, SE Muls,
depthwise convolutions, Concat offsets and shuffles all reduce to that one operation.

Each op's channel rule is one small function registered in `RULES`, so supporting a new op is one local
change. An op without a rule freezes every group it touches, and so does reaching a graph output; graph inputs
are never pruned. A frozen group records what froze it (`frozen_by`). A group that a normalisation runs over
(LayerNormalization, or its mean and variance written out as reductions: see `Statistic`) stays prunable but
*approximate* (`approximate`): pruning it changes the function, so only training recovers it. Channel counts
read by `Shape` are tracked too: they may only flow, through shape arithmetic, into the shape inputs of
Reshape/Slice/Split/Expand (which surgery rewrites as constants); any other use freezes the groups whose counts
were read. Whether a value really carries a count is checked by evaluating the arithmetic again under two
prunings (`follows_pruning`): `Shape(x)[2:]` does not, and Resize/Upsample sizes read from the resized tensor's
own shape (torch's `interpolate(size=...)` at every opset) follow the pruning at run time, so neither freezes
anything.

The analysis runs on `layers.with_static_shapes(model)` (every tensor has a static shape, batch 1); surgery
(`onnxecc.graph.surgery`) applies its result to the original model. Only onnx and numpy are used here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxecc.graph.graph import Graph, _evaluate_node
from onnxecc.graph.layers import node_name, tensor_shapes, with_static_shapes

_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout"}


# ---- public result ------------------------------------------------------------------------------------------
@dataclass
class Slot:
    """One place where a group's channels are sliced: positions `offset ..` along `axis` of `tensor`.

    `count` positions belong to the group; `block` is the number of positions per unit (1 for a plain
    channel, H×W for features after Flatten, the number of conv groups for a folded grouped-conv channel;
    0 when units have unequal multiplicity)."""

    role: str  # producer | consumer | param | concat | reshape | slice | split | expand | input | output
    node: str
    op: str
    tensor: str
    axis: int
    offset: int
    count: int
    block: int

    def as_dict(self) -> dict:
        return {"role": self.role, "node": self.node, "op": self.op, "tensor": self.tensor, "axis": self.axis,
                "offset": self.offset, "count": self.count, "block": self.block}


@dataclass
class ChannelGroup:
    """A set of channel slots that must keep the same channels. Prune it by choosing kept unit indices."""

    id: int
    size: int  # units: the indices a keep list chooses from
    channels: int  # channels of its (widest) producer output; size × block for a folded group
    producers: list[Slot] = field(default_factory=list)
    consumers: list[Slot] = field(default_factory=list)
    members: list[Slot] = field(default_factory=list)
    frozen_by: str | None = None
    # why pruning it is not exact (a normalisation over its channels): still prunable, but the pruned model computes
    # another function, so it is pruned only when training follows (`compress --data`)
    approximate: str | None = None

    @property
    def prunable(self) -> bool:
        return self.frozen_by is None and self.size > 1

    def as_dict(self) -> dict:
        return {"id": self.id, "size": self.size, "channels": self.channels, "prunable": self.prunable,
                "frozen_by": self.frozen_by, "approximate": self.approximate,
                "producers": [s.as_dict() for s in self.producers],
                "consumers": [s.as_dict() for s in self.consumers], "members": [s.as_dict() for s in self.members]}


@dataclass
class LayerChannels:
    """A compute layer's place in the groups: the groups of its input and of its output channels."""

    name: str
    op: str
    node_index: int
    input: str
    output: str
    in_groups: list[int]
    out_groups: list[int]

    def as_dict(self) -> dict:
        return {"name": self.name, "in_groups": self.in_groups, "out_groups": self.out_groups}


@dataclass
class Product:
    """A MatMul of two computed operands (attention's Q·Kᵀ and softmax·V): no weight, but MACs that scale with
    the channels its output carries (the heads): k multiply-accumulates per output position."""

    name: str
    node_index: int
    output: str
    k: int

    def as_dict(self) -> dict:
        return {"name": self.name, "output": self.output, "k": self.k}


@dataclass
class Positions:
    """Resolved layout of one tensor (or weight axis): group id and unit per position, shaped like the axes."""

    axes: tuple[int, ...]
    gid: np.ndarray
    unit: np.ndarray

    def kept(self, flat_keep: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Boolean mask of kept positions, given all groups' masks concatenated (see `ChannelGraph.flat`)."""
        return flat_keep[offsets[self.gid] + self.unit]


@dataclass
class Bind:
    """A constant tensor axis sliced like a layout, for the node at `node_index`."""

    name: str
    node_index: int
    axis: int
    pos: Positions
    role: str


@dataclass
class Edit:
    """A structural change surgery must make at a node (Reshape shape, Slice bounds, conv group, ...)."""

    kind: str
    node_index: int
    data: dict


class ChannelGraph:
    """The channel groups of a model, per-layer group ids, and what surgery needs to slice them."""

    def __init__(self, groups: list[ChannelGroup], layers: dict[str, LayerChannels],
                 positions: dict[str, Positions], binds: list[Bind], edits: list[Edit], opset: int,
                 products: list[Product] | None = None, heads: dict[int, list[str]] | None = None):
        self.groups = groups
        self.layers = layers
        self.products = products or []
        self.heads = heads or {}  # group id -> the attention products whose heads it holds (one unit per head)
        self._positions = positions
        self.binds = binds
        self.edits = edits
        self.opset = opset
        self.offsets = np.cumsum([0] + [g.size for g in groups]).astype(np.int64)

    def positions(self, tensor: str) -> Positions | None:
        """Group id and unit of every channel position of `tensor` (None when it carries no tracked channel)."""
        return self._positions.get(tensor)

    def tensor_positions(self) -> dict[str, Positions]:
        """Every tensor that carries tracked channels, with its resolved layout."""
        return dict(self._positions)

    def layer_prunable(self, name: str) -> bool:
        """Whether layer `name` can lose output channels: they hold two or more units of prunable groups."""
        pos = self._positions[self.layers[name].output]
        gid, unit = pos.gid.ravel(), pos.unit.ravel()
        ok = np.array([self.groups[g].prunable for g in gid.tolist()], bool)
        return len(set(zip(gid[ok].tolist(), unit[ok].tolist()))) >= 2

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def flat(self, masks: dict[int, np.ndarray]) -> np.ndarray:
        """All groups' keep masks back to back (groups missing from `masks` keep everything)."""
        parts = [masks.get(g.id, np.ones(g.size, bool)) for g in self.groups]
        return np.concatenate(parts) if parts else np.zeros(0, bool)

    def products_order(self, name: str) -> int:
        """Graph position of the product `name` (attention layers listed in the order they run)."""
        return next((p.node_index for p in self.products if p.name == name), -1)

    def kept_counts(self, tensor: str, masks: dict[int, np.ndarray]) -> int | None:
        pos = self._positions.get(tensor)
        return None if pos is None else int(pos.kept(self.flat(masks), self.offsets).sum())

    def as_dict(self) -> dict:
        return {"groups": [g.as_dict() for g in self.groups],
                "layers": {name: lc.as_dict() for name, lc in self.layers.items()},
                "products": [p.as_dict() for p in self.products],
                "heads": {str(g): names for g, names in self.heads.items()}}


# ---- layouts and the group union-find ------------------------------------------------------------------------
@dataclass
class Layout:
    """Per position along `axes` (ascending tensor axes; arrays shaped like those dims): group and unit."""

    axes: tuple[int, ...]
    grp: np.ndarray
    idx: np.ndarray

    def moved(self, axes) -> Layout:
        return Layout(tuple(axes), self.grp, self.idx)

    def part(self, start: int, stop: int) -> Layout:
        return Layout(self.axes, self.grp[start:stop], self.idx[start:stop])


class _Groups:
    """Union-find over groups; a merged group's parent maps each of its units onto the parent's units."""

    def __init__(self):
        self.parent: list[int] = []
        self.map: list[np.ndarray | None] = []
        self.size: list[int] = []
        self.frozen: dict[int, str] = {}
        self.unions = 0  # merges so far (a merge renumbers units: values derived from them are stale)

    def new(self, size: int, frozen: str | None = None) -> int:
        g = len(self.parent)
        self.parent.append(g)
        self.map.append(None)
        self.size.append(int(size))
        if frozen:
            self.frozen[g] = frozen
        return g

    def find(self, g: int) -> tuple[int, np.ndarray | None]:
        path = []
        while self.parent[g] != g:
            path.append(g)
            g = self.parent[g]
        root, above = g, None
        for node in reversed(path):  # compress: map every node on the path straight onto the root
            m = self.map[node] if above is None else above[self.map[node]]
            self.parent[node], self.map[node], above = root, m, m
        return root, above

    def resolve(self, lay: Layout) -> tuple[np.ndarray, np.ndarray]:
        grp, idx = lay.grp.ravel(), lay.idx.ravel()
        roots, units = np.empty_like(grp), np.empty_like(idx)
        for g in (np.unique(grp) if grp.size and grp.min() != grp.max() else grp[:1]):
            r, m = self.find(int(g))
            sel = grp == g
            roots[sel] = r
            units[sel] = idx[sel] if m is None else m[idx[sel]]
        return roots, units

    def unify(self, l1: Layout, l2: Layout) -> None:
        """Identify the channel at each position of l1 with the one at the same position of l2."""
        r1, u1 = self.resolve(l1)
        r2, u2 = self.resolve(l2)
        if r1.shape != r2.shape:
            raise AssertionError("unify: layouts of different lengths")
        if np.array_equal(r1, r2) and np.array_equal(u1, u2):
            return
        self.unions += 1
        roots = list(dict.fromkeys(np.concatenate([r1, r2]).tolist()))
        if len(roots) == 2 and (r1 == roots[0]).all() and (r2 == roots[1]).all() \
                and self.size[roots[0]] == self.size[roots[1]] == r1.size \
                and np.array_equal(u1, u2) and np.array_equal(np.sort(u1), np.arange(r1.size)):
            a, b = roots  # the common case: two whole groups in the same order
            self.parent[b], self.map[b] = a, np.arange(self.size[b])
            if b in self.frozen and a not in self.frozen:
                self.frozen[a] = self.frozen[b]
            return
        base, n = {}, 0
        for r in roots:
            base[r] = n
            n += self.size[r]
        a_atoms = u1 + np.array([base[r] for r in r1.tolist()], dtype=np.int64)
        b_atoms = u2 + np.array([base[r] for r in r2.tolist()], dtype=np.int64)
        parent = list(range(n))

        def top(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for x, y in zip(a_atoms.tolist(), b_atoms.tolist()):
            rx, ry = top(x), top(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)
        labels, ids = np.empty(n, np.int64), {}
        for x in range(n):
            labels[x] = ids.setdefault(top(x), len(ids))
        reason = next((self.frozen[r] for r in roots if r in self.frozen), None)
        new = self.new(len(ids), reason)
        for r in roots:
            self.parent[r], self.map[r] = new, labels[base[r]:base[r] + self.size[r]]


# ---- the analysis ------------------------------------------------------------------------------------------------
Rule = Callable[["_Analysis", onnx.NodeProto], None]
RULES: dict[str, Rule] = {}

# Where a channel count read by Shape may end up: these inputs are rewritten as constants by surgery.
SINKS = {"Reshape": {1}, "Slice": {1, 2, 3, 4}, "Split": {1}, "Expand": {1}}
# Ops that only compute on shape values (a channel count flows through them to a sink).
SHAPE_ARITH = {"Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Div", "Mul", "Add", "Sub",
               "Slice", "Identity", "Floor", "Ceil", "ReduceProd", "Max", "Min", "Equal", "Where", "Neg", "Abs",
               "Mod", "Reshape", "ConstantOfShape", "Transpose"}


def register(*ops: str) -> Callable[[Rule], Rule]:
    """Decorator: `fn(analysis, node)` is the channel rule of `ops`."""
    def deco(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn
    return deco


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class _Analysis:
    def __init__(self, shaped: onnx.ModelProto):
        self.model = shaped
        self.g = Graph(shaped)
        self.shapes = tensor_shapes(shaped)
        self.opset = self.g.opset("")
        self.groups = _Groups()
        self.layouts: dict[str, Layout] = {}
        self.const_names: set[str] = set(self.g.initializers)
        self.taint: dict[str, set[int]] = {}
        self.notes: dict[str, str] = {}  # untracked tensor -> what made it untracked
        self.binds: list[tuple[str, int, int, Layout, str]] = []
        self.edits: list[tuple[str, int, dict]] = []
        self.io: dict[int, tuple[str, str, Layout]] = {}  # compute node index -> (input, output, input layout)
        self.concats: list[int] = []
        self.products: list[tuple[int, str, int, Layout | None]] = []  # (node index, output, k, head layout)
        self.gathered: list[tuple[Layout, int, str]] = []  # (layout, axis, where): an axis indexed by a Gather
        self.source: onnx.ModelProto | None = None  # the model before its batch was fixed (for `batch_shapes`)
        self._batch_shapes: dict[str, tuple[int, ...]] | None = None
        self.static: dict[str, np.ndarray | None] = {}
        self.pruned: dict[str, dict[str, np.ndarray | None]] = {}  # `shape_value` under a pruning
        self.pruned_at = 0  # `_Groups.unions` when `pruned` was computed
        self.skip: set[int] = set()  # nodes already handled by an earlier rule (a channel-shuffle chain)
        self.stats: dict[str, Statistic | None] = {}  # tensor -> the statistic over channels it is (`statistic`)
        self.reductions: list[str] = []  # outputs of reductions over exactly the channels (each a `Statistic`)
        self.stat_uses: set[tuple[str, int]] = set()  # (statistic, node index): applied back to channels there
        self.normalised: list[tuple[Layout, list[Layout], str]] = []  # (channels, their statistics' sources, why)
        self.node_at = {n.output[0]: i for i, n in enumerate(shaped.graph.node) if n.output}
        self.index, self.where, self.cur_taint = -1, "", set()

    # -- queries --
    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.shapes.get(name)

    def is_const(self, name: str) -> bool:
        return name in self.const_names

    def const(self, name: str) -> np.ndarray | None:
        return self.g.const(name) if name in self.const_names else None

    def lay(self, name: str) -> Layout | None:
        return self.layouts.get(name) if name else None

    def static_value(self, name: str) -> np.ndarray | None:
        """Value of a constant or of shape arithmetic on static shapes (batch 1)."""
        return self.shape_value(name, None)

    def shape_value(self, name: str, pruning: str | None) -> np.ndarray | None:
        """`static_value`, or with `pruning` ("one" or "last", see `pruned_shape`) the value the same shape
        arithmetic computes at run time once the channels are pruned that way (None: not known)."""
        if not name:
            return None
        memo = self.static if pruning is None else self.pruned.setdefault(pruning, {})
        if name in memo:
            return memo[name]
        value = self.const(name)
        node = self.g.producer.get(name)
        if value is None and node is not None and node.domain in ("", "ai.onnx"):
            if node.op_type == "Shape":
                x = node.input[0]
                shape = self.shape(x) if pruning is None else self.batch_shapes().get(x) \
                    if pruning == "batch2" else self.pruned_shape(x, pruning)
                if shape is not None:
                    value = np.array(shape, np.int64)[_attr(node, "start", 0):_attr(node, "end", None)]
            elif node.op_type in SHAPE_ARITH:
                inputs = [self.shape_value(i, pruning) if i else None for i in node.input]
                if all(v is not None for i, v in zip(node.input, inputs) if i):
                    value = _evaluate_node(node, inputs, self.model)[list(node.output).index(name)]
        memo[name] = value
        return value

    def batch_shapes(self) -> dict[str, tuple[int, ...]]:
        """Static shapes at batch 2 (empty when the batch is fixed or inference fails): a computed Reshape entry on
        a channel axis that doubles with the batch holds batch × channels (torch's `view(T, B * heads, d)`)."""
        if self._batch_shapes is None:
            self._batch_shapes = {}
            open_batch = [vi.name for vi in (self.source.graph.input if self.source is not None else [])
                          if vi.type.HasField("tensor_type") and vi.type.tensor_type.shape.dim
                          and not vi.type.tensor_type.shape.dim[0].HasField("dim_value")]
            if open_batch:
                probe = onnx.ModelProto()
                probe.CopyFrom(self.model)
                for vi in probe.graph.input:
                    if vi.name in open_batch:
                        vi.type.tensor_type.shape.dim[0].dim_value = 2
                del probe.graph.value_info[:]
                for o in probe.graph.output:
                    o.type.tensor_type.ClearField("shape")
                try:
                    self._batch_shapes = tensor_shapes(onnx.shape_inference.infer_shapes(probe, data_prop=True))
                except Exception:  # onnx raises InferenceError or bare RuntimeErrors: then no entry scales
                    pass
        return self._batch_shapes

    def pruned_shape(self, name: str, pruning: str) -> tuple[int, ...] | None:
        """The shape of `name` once every channel group keeps only its first unit ("one") or loses its last unit
        ("last"): two prunings far apart, under which shape arithmetic that copies a channel count shows it and
        arithmetic that does not read one stays put."""
        shape = self.shape(name)
        lay = self.lay(name)
        if shape is None or lay is None:
            return shape
        roots, units = self.groups.resolve(lay)
        sizes = np.array([self.groups.size[r] for r in roots.tolist()], np.int64)
        kept = (units == 0 if pruning == "one" else units < np.maximum(sizes - 1, 1)).reshape(lay.grp.shape)
        out = list(shape)
        for t, ax in enumerate(lay.axes):  # over several axes (heads × head width): what each axis keeps
            others = tuple(o for o in range(kept.ndim) if o != t)
            out[ax] = int(kept.any(axis=others).sum()) if others else int(kept.sum())
        return tuple(out)

    def follows_pruning(self, name: str, expected: Callable[[str | None], np.ndarray | None]) -> bool:
        """Whether shape arithmetic `name` computes `expected(pruning)` statically and under both prunings: the
        run-time computation then stays right for the pruned model without being rewritten."""
        if self.pruned_at != self.groups.unions:  # groups merged since the last check: their units changed
            self.pruned, self.pruned_at = {}, self.groups.unions
        for pruning in (None, "one", "last"):
            value, want = self.shape_value(name, pruning), expected(pruning)
            if value is None or want is None or np.shape(value) != np.shape(want) or \
                    not np.array_equal(np.asarray(value), np.asarray(want)):
                return False
        return True

    # -- building blocks for rules --
    def fresh(self, dims: tuple[int, ...], axes: tuple[int, ...], frozen: str | None = None) -> Layout:
        n = int(np.prod(dims))
        g = self.groups.new(n, frozen)
        return Layout(tuple(axes), np.full(dims, g, np.int64), np.arange(n, dtype=np.int64).reshape(dims))

    def need(self, name: str, axes: tuple[int, ...]) -> Layout:
        """The layout of non-constant `name` on `axes`; untracked (or tracked elsewhere): a frozen fresh one."""
        lay = self.lay(name)
        if lay is not None and lay.axes == tuple(axes):
            return lay
        if lay is not None:
            self.freeze(lay, f"{self.where} (channels on an unexpected axis)")
        shp = self.shape(name)
        dims = tuple(shp[a] for a in axes)
        why = self.notes.get(name) or f"{self.where} (input '{name}' carries no tracked channels)"
        fresh = self.fresh(dims, axes, why)
        if lay is None:
            self.layouts[name] = fresh  # later users of `name` share this (frozen) group
        return fresh

    def set(self, name: str, lay: Layout | None) -> None:
        if name and lay is not None:
            self.layouts[name] = lay

    def freeze(self, lay: Layout | None, reason: str | None = None) -> None:
        reason = reason or self.where
        if lay is not None:
            for r in set(self.groups.resolve(lay)[0].tolist()):
                self.groups.frozen.setdefault(r, reason)
        self._freeze_ids(self.cur_taint, reason)

    def _freeze_ids(self, ids, reason: str) -> None:
        for g in ids:
            self.groups.frozen.setdefault(self.groups.find(g)[0], reason)

    def freeze_all(self, node: onnx.NodeProto, reason: str) -> None:
        """Freeze every input layout; outputs carry no tracked channels."""
        for name in node.input:
            self.freeze(self.lay(name), reason)
        for out in node.output:
            if out:
                self.notes[out] = reason

    def unify(self, l1: Layout, l2: Layout) -> None:
        self.groups.unify(l1, l2)

    def bind(self, name: str, axis: int, lay: Layout, role: str) -> None:
        """Constant `name` is sliced along `axis` like `lay` (for the current node)."""
        value = self.const(name)
        if value is None or len(lay.axes) != 1 or axis >= value.ndim or value.shape[axis] != lay.grp.size:
            self.freeze(lay, f"{self.where} ('{name}' cannot be sliced with the channels)")
            return
        self.binds.append((name, self.index, axis, lay, role))

    def edit(self, kind: str, **data) -> None:
        self.edits.append((kind, self.index, data))

    # -- driver --
    def run(self) -> None:
        for inp in self.model.graph.input:
            shp = self.shape(inp.name)
            if inp.name not in self.g.initializers and shp is not None and len(shp) >= 2:
                self.layouts[inp.name] = self.fresh((shp[1],), (1,), f"graph input '{inp.name}'")
        for index, node in enumerate(self.model.graph.node):
            if index in self.skip:
                continue
            self.index = index
            self.where = f"{node.op_type} '{node_name(node, index)}'"
            self.cur_taint = set()
            inputs = [i for i in node.input if i]
            if node.op_type not in _NONDETERMINISTIC and all(i in self.const_names for i in inputs) \
                    and not _has_subgraph(node):
                self.const_names.update(o for o in node.output if o)
                continue
            if not self._taint_gate(node):
                continue
            rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            unknown = [n for n in (*node.input, *node.output) if n and n not in self.const_names
                       and self.shape(n) is None]
            if unknown:  # rules reason on static shapes: without one, be safe
                self.freeze_all(node, f"{self.where} (shape of '{unknown[0]}' unknown)")
                continue
            (rule or _unknown)(self, node)
        self.index, self.cur_taint = -1, set()
        for lay, axis, where in self.gathered:
            roots, units = self.groups.resolve(lay)
            key = (roots * (units.max() + 1) + units).reshape(lay.grp.shape)
            if not (key == np.take(key, [0], axis=lay.axes.index(axis))).all():
                self.freeze(lay, f"{where} (indexes an axis whose channels would be pruned)")
        for out in self.model.graph.output:
            self.freeze(self.lay(out.name), f"graph output '{out.name}'")
            if out.name in self.taint:
                self._freeze_ids(self.taint[out.name], f"graph output '{out.name}' (a channel count)")

    def _taint_gate(self, node: onnx.NodeProto) -> bool:
        """Channel counts read by Shape: let them flow through shape arithmetic into sinks, else freeze."""
        tainted = {k: self.taint[n] for k, n in enumerate(node.input) if n in self.taint}
        if not tainted:
            return True
        sources = set().union(*tainted.values())
        tracked = any(self.lay(n) is not None for n in node.input)
        if set(tainted) <= SINKS.get(node.op_type, set()) and self.lay(node.input[0]) is not None:
            self.cur_taint = sources  # the rule rewrites these inputs; if it gives up, these freeze too
            return True
        if node.op_type in SHAPE_ARITH and not tracked and _embedding_table(self, node) is None:
            for out in node.output:  # e.g. Shape(x)[2:] reads no channel count: its users are free
                if out and not self.follows_pruning(out, lambda p, o=out: self.shape_value(o, None)):
                    self.taint[out] = sources
            return False
        if node.op_type in ("Resize", "Upsample") and set(tainted) <= {1, 2, 3} and self.resize_follows(node):
            return True  # sizes computed from the pruned tensor's own shape at run time: nothing to rewrite
        self._freeze_ids(sources, f"{self.where} (uses a channel count)")
        return True

    def resize_follows(self, node: onnx.NodeProto) -> bool:
        """Whether every computed input of Resize/Upsample stays right after pruning: roi and scales unchanged,
        sizes (torch's `interpolate(size=...)`: Concat(Shape(x)[0:2], H, W)) with the pruned channel count of
        its input at the channel axis."""
        x = node.input[0]
        lay = self.lay(x)
        if all(not name or self.is_const(name) for name in node.input[1:]):
            return True
        if lay is None or len(lay.axes) != 1:
            return False
        axes = _attr(node, "axes")
        axes = list(range(len(self.shape(x)))) if axes is None else [int(v) % len(self.shape(x)) for v in axes]
        at = axes.index(lay.axes[0]) if lay.axes[0] in axes else None
        for k, name in enumerate(node.input[1:], 1):
            if not name or self.is_const(name):
                continue

            def want(pruning, name=name, sizes=node.op_type == "Resize" and k == 3):
                value = self.shape_value(name, None)
                shape = self.shape(x) if pruning is None else self.pruned_shape(x, pruning)
                if value is None or shape is None or not sizes or at is None:
                    return value
                value = np.array(value, copy=True)
                value[at] = shape[lay.axes[0]]
                return value

            if not self.follows_pruning(name, want):
                return False
        return True

    # -- result --
    def finish(self) -> ChannelGraph:
        approximate = _settle_statistics(self)
        nodes = list(self.model.graph.node)
        order: dict[int, int] = {}

        def dense(root: int) -> int:
            return order.setdefault(root, len(order))

        for index in sorted(self.io):  # number groups in the order layers produce them
            dense(self.groups.resolve(self.layouts[self.io[index][1]])[0][0])
        resolved: dict[int, Positions] = {}

        def pos(lay: Layout) -> Positions:
            key = id(lay)
            if key not in resolved:
                roots, units = self.groups.resolve(lay)
                gid = np.array([dense(r) for r in roots.tolist()], np.int64)
                resolved[key] = Positions(lay.axes, gid.reshape(lay.grp.shape), units.reshape(lay.grp.shape))
            return resolved[key]

        positions = {name: pos(lay) for name, lay in self.layouts.items()}
        binds = [Bind(n, i, ax, pos(lay), role) for n, i, ax, lay, role in self.binds]
        edits = [Edit(kind, i, {k: pos(v) if isinstance(v, Layout) else v for k, v in d.items()})
                 for kind, i, d in self.edits]
        roots = sorted(order, key=order.get)
        groups = [ChannelGroup(order[r], self.groups.size[r], 0, frozen_by=self.groups.frozen.get(r),
                               approximate=None if r in self.groups.frozen else approximate.get(r)) for r in roots]

        def label(i: int) -> tuple[str, str]:
            return node_name(nodes[i], i), nodes[i].op_type

        def add_slots(role: str, i: int, tensor: str, p: Positions) -> None:
            name, op = label(i) if i >= 0 else (tensor, role)
            gid, unit = p.gid.ravel(), p.unit.ravel()
            for g in np.unique(gid).tolist():
                sel = np.flatnonzero(gid == g)
                counts = np.bincount(unit[sel])
                counts = counts[counts > 0]
                block = int(counts[0]) if (counts == counts[0]).all() else 0
                slot = Slot(role, name, op, tensor, int(p.axes[0]), int(sel[0]), int(sel.size), block)
                target = {"producer": "producers", "consumer": "consumers"}.get(role, "members")
                getattr(groups[g], target).append(slot)

        for b in binds:
            add_slots(b.role, b.node_index, b.name, b.pos)
        for i in self.concats:
            out = nodes[i].output[0]
            add_slots("concat", i, out, positions[out])
        for e in edits:
            if e.kind in ("reshape", "slice", "expand") and "out" in e.data:
                add_slots(e.kind, e.node_index, nodes[e.node_index].output[0], e.data["out"])
            elif e.kind in ("split", "permute"):
                add_slots(e.kind, e.node_index, nodes[e.node_index].input[0], e.data["lay"])
        for inp in self.model.graph.input:
            if inp.name in positions:
                add_slots("input", -1, inp.name, positions[inp.name])
        for out in self.model.graph.output:
            if out.name in positions:
                add_slots("output", -1, out.name, positions[out.name])
        for g in groups:
            g.channels = max((s.count for s in g.producers), default=g.size)
        layers = {}
        for index in sorted(self.io):
            x, y, lin = self.io[index]
            name, op = label(index)
            ins = list(dict.fromkeys(pos(lin).gid.ravel().tolist()))
            outs = list(dict.fromkeys(positions[y].gid.ravel().tolist()))
            layers[name] = LayerChannels(name, op, index, x, y, ins, outs)
        products, heads = [], {}
        for index, out, k, head in self.products:
            products.append(Product(label(index)[0], index, out, k))
            for g in ([] if head is None else np.unique(pos(head).gid).tolist()):
                heads.setdefault(g, []).append(label(index)[0])
        return ChannelGraph(groups, layers, positions, binds, edits, self.opset, products, heads)


def attention_name(products: list[str]) -> str:
    """An attention layer's name: the node path its products share ('/blocks.0'), else its first product's name."""
    shared = os.path.commonprefix(products) if len(products) > 1 else ""
    return shared.rsplit("/", 1)[0] if "/" in shared.strip("/") else products[0]


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def analyze(model: onnx.ModelProto, shaped: onnx.ModelProto | None = None) -> ChannelGraph:
    """Channel groups of `model`. `shaped` may pass `layers.with_static_shapes(model)` if already computed."""
    analysis = _Analysis(shaped if shaped is not None else with_static_shapes(model))
    analysis.source = model
    analysis.run()
    return analysis.finish()


def prunable_fraction(model: onnx.ModelProto | ChannelGraph, ops: tuple[str, ...] = ("Conv", "ConvTranspose"))\
        -> float:
    """Fraction of the model's `ops` layers (conv layers by default) whose output channels can be pruned
    (see `ChannelGraph.layer_prunable`)."""
    graph = model if isinstance(model, ChannelGraph) else analyze(model)
    layers = [lc for lc in graph.layers.values() if lc.op in ops]
    if not layers:
        return 0.0
    return sum(graph.layer_prunable(lc.name) for lc in layers) / len(layers)


# ---- rules -------------------------------------------------------------------------------------------------------
def _unknown(a: _Analysis, node: onnx.NodeProto) -> None:
    a.freeze_all(node, f"{a.where} (channel semantics unknown)")


UNARY = ("Relu", "LeakyRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Gelu", "Sigmoid", "HardSigmoid",
         "HardSwish", "Tanh", "Softplus", "Softsign", "Mish", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal",
         "Floor", "Ceil", "Round", "Erf", "Sign", "Sin", "Cos", "Not", "IsNaN", "IsInf", "Identity", "Cast",
         "CastLike", "Clip", "Dropout")


@register(*UNARY)
def _unary(a: _Analysis, node: onnx.NodeProto) -> None:
    """Element by element: every output of the input's shape has the input's channels."""
    x = node.input[0]
    lay = a.lay(x)
    if lay is None:
        return
    for out in node.output:
        if out and a.shape(out) == a.shape(x):
            a.set(out, lay)


ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal",
               "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift",
               "BitwiseAnd", "BitwiseOr", "BitwiseXor")


@register(*ELEMENTWISE)
def _elementwise(a: _Analysis, node: onnx.NodeProto) -> None:
    """Broadcasting ops: operands that carry the full channel dim share channels; constants are sliced."""
    out = node.output[0]
    tracked = [n for n in node.input if a.lay(n) is not None]
    if not tracked:
        return
    oshape = a.shape(out)
    rank = len(oshape)
    first = a.lay(tracked[0])
    axes = tuple(ax + rank - len(a.shape(tracked[0])) for ax in first.axes)
    result, consts, stats = None, [], []
    for name in node.input:
        if not name:
            continue
        shp, lay = a.shape(name), a.lay(name)
        own = tuple(ax - (rank - len(shp)) for ax in axes)
        stat = _statistic(a, name) if lay is None and not a.is_const(name) else None
        if any(o < 0 for o in own) or all(shp[o] == 1 for o in own):  # broadcast along the channels
            if lay is not None and lay.grp.size > 1:
                a.freeze(lay, f"{a.where} (channels broadcast against another channel axis)")
            elif stat is not None:  # x − mean, x · 1/σ: a normalisation
                stats.append((name, own, stat))
            continue
        if any(shp[o] != oshape[x] for o, x in zip(own, axes)):
            a.freeze_all(node, f"{a.where} (partial broadcast over the channel axes)")
            return
        if a.is_const(name):
            consts.append((name, own))
            continue
        if stat is not None and stat.params:  # 1/σ · γ, per channel
            stats.append((name, own, stat))
            continue
        lay = lay if lay is not None and lay.axes == own else a.need(name, own)
        if result is None:
            result = lay
        else:
            a.unify(result, lay)
    result = result if result is not None else first
    for name, own in consts:
        if len(own) != 1:
            a.freeze(result, f"{a.where} (constant over split channel axes)")
        else:
            a.bind(name, own[0], result.moved(own), "param")
    for name, own, stat in stats:
        _apply_statistic(a, name, own, stat, result)
    a.set(out, result.moved(axes))


@register("BatchNormalization", "InstanceNormalization")
def _norm(a: _Analysis, node: onnx.NodeProto) -> None:
    """Per-channel normalisation: channels pass through; scale, bias, mean, var are sliced."""
    lay = a.lay(node.input[0])
    if lay is None:
        return
    if lay.axes != (1,) or any(node.output[1:]):
        a.freeze_all(node, f"{a.where} (statistics outputs or channels off axis 1)")
        return
    for p in node.input[1:]:
        if p:
            a.bind(p, 0, lay, "param")
    a.set(node.output[0], lay)


# ---- normalisations: statistics of the channels ------------------------------------------------------------------
# A sum or mean over exactly the channel axes (LayerNorm's mean and variance, RMSNorm's mean square) is a *statistic*:
# it holds no channels, and once channels are pruned it is computed from the kept ones alone. Applied back to the
# channels it was taken over (x − mean, x / rms) it makes a normalisation, which pruning changes rather than just
# shortens: those groups are *approximate* (prunable, but only when training follows). Used anywhere else, a
# statistic freezes the channels it was taken over.
STATISTICS = ("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2")
# ops whose result is a statistic when each input is a statistic or a constant: arithmetic ...
_STAT_MATH = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log",
              "Clip", "Cast", "Identity", "Erf", "Tanh", "Sigmoid", "Relu"}
# ... and moves that keep its size (tf2onnx reshapes and broadcasts a keepdims=0 mean back to rank)
_STAT_MOVES = {"Reshape", "Expand", "Squeeze", "Unsqueeze", "Transpose", "Flatten"}


@dataclass
class Statistic:
    """A value computed from reductions over channels and from constants; it holds no channels itself."""

    sources: list[Layout]  # the channels it was reduced over
    reason: str  # why a group it is applied back to is approximate
    # constants broadcast over it (LayerNorm's γ and β multiplied into 1/σ first): sliced with the channels when
    # they run along them; (name, node index)
    params: list[tuple[str, int]] = field(default_factory=list)


def _statistic(a: _Analysis, name: str) -> Statistic | None:
    """The statistic that tensor `name` is (None: not one), found back through its producers (iteratively: a long
    chain of untracked tensors must not exhaust the stack)."""
    stack = [name]
    while stack:
        top = stack[-1]
        if top in a.stats:
            stack.pop()
            continue
        node = a.g.producer.get(top)
        inputs = None
        if node is not None and node.domain in ("", "ai.onnx") and not a.is_const(top) and a.lay(top) is None:
            inputs = [i for i in node.input if i] if node.op_type in _STAT_MATH else \
                node.input[:1] if node.op_type in _STAT_MOVES else None
        pending = [i for i in inputs or () if not a.is_const(i) and i not in a.stats]
        if pending:
            stack.extend(pending)
            continue
        a.stats[top] = None if inputs is None else _derived_statistic(a, node, inputs)
        stack.pop()
    return a.stats[name]


def _derived_statistic(a: _Analysis, node: onnx.NodeProto, inputs: list[str]) -> Statistic | None:
    stats = [(i, a.stats[i]) for i in inputs if not a.is_const(i)]
    if not stats or any(s is None for _, s in stats):
        return None
    sources = [lay for _, s in stats for lay in s.sources]
    params = [p for _, s in stats for p in s.params]
    out = node.output[0]
    if node.op_type in _STAT_MOVES:  # a move after per-channel constants would lose where their channels are
        shape_in, shape_out = a.shape(node.input[0]), a.shape(out)
        if params or shape_in is None or shape_out is None or np.prod(shape_in) != np.prod(shape_out):
            return None
        return Statistic(sources, stats[0][1].reason)
    shapes = [a.shape(i) for i, _ in stats]
    if a.shape(out) is None or any(s is None for s in shapes):
        return None
    rank = len(a.shape(out))
    shapes = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    for i in inputs:
        value = a.const(i) if a.is_const(i) else None
        if value is None:
            continue
        dims = (1,) * (rank - value.ndim) + value.shape
        if any(d != 1 and all(s[k] == 1 for s in shapes) for k, d in enumerate(dims)):
            params.append((i, a.node_at[out]))  # broadcast over the statistic: maybe one value per channel
    return Statistic(sources, stats[0][1].reason, params)


def _apply_statistic(a: _Analysis, name: str, own: tuple[int, ...], stat: Statistic, lay: Layout) -> None:
    """Statistic `name` meets channels `lay` (at its axes `own`) in the current elementwise node: a normalisation if
    they are the channels it was taken over (checked once the groups are final, `_settle_statistics`). Per-channel
    constants multiplied into it are sliced with those channels."""
    a.stat_uses.add((name, a.index))
    shp = a.shape(name)
    along = any(o >= 0 and shp[o] != 1 for o in own)  # it runs along the channels: only through constants
    for param, index in stat.params:
        value = a.const(param)
        at = [o - len(shp) + value.ndim for o in own]
        if all(k < 0 or value.shape[k] == 1 for k in at):
            continue
        if len(at) != 1 or value.shape[at[0]] != lay.grp.size:
            a.freeze(lay, f"{a.where} ('{param}' cannot be sliced with the channels)")
            return
        a.binds.append((param, index, at[0], lay.moved(at), "param"))
        along = False
    if along:
        a.freeze(lay, f"{a.where} (a statistic broadcast along the channels)")
        return
    a.normalised.append((lay, stat.sources, stat.reason))


def _settle_statistics(a: _Analysis) -> dict[int, str]:
    """Once every rule has run: freeze the channels of a statistic used anywhere but applied back to channels, and
    of one applied to other channels than it was taken over; the approximate groups' reasons, by root."""
    seen, todo = set(), list(a.reductions)
    outputs = set(a.g.output_names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        leaks = [f"graph output '{name}'"] if name in outputs else []
        for user in a.g.consumers.get(name, []):
            index = a.node_at.get(user.output[0]) if user.output else None
            if (name, index) in a.stat_uses or user.op_type in ("Shape", "Size"):
                continue
            if user.output and user.output[0] and _statistic(a, user.output[0]) is not None:
                todo.append(user.output[0])
                continue
            leaks.append(f"{user.op_type} '{node_name(user, -1 if index is None else index)}'")
        if leaks:
            stat = a.stats[name]
            for lay in stat.sources:
                a.freeze(lay, f"{leaks[0]} (uses a statistic of the channels: {stat.reason})")
    approximate: dict[int, str] = {}
    for lay, sources, reason in a.normalised:
        roots, units = a.groups.resolve(lay)
        if all(np.array_equal(roots, r) and np.array_equal(units, u) for r, u in map(a.groups.resolve, sources)):
            for root in roots.tolist():
                approximate.setdefault(root, reason)
        else:
            for other in (lay, *sources):
                a.freeze(other, f"{reason} (applied back to other channels)")
    return approximate


def _reduced_axes(node: onnx.NodeProto, rank: int, a: _Analysis) -> list[int] | None:
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = a.const(node.input[1])
        if value is None:
            return None
        axes = value.ravel().tolist()
    if not axes:
        return [] if _attr(node, "noop_with_empty_axes", 0) else list(range(rank))
    return [int(x) % rank for x in axes]


@register("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
def _reduce(a: _Analysis, node: onnx.NodeProto) -> None:
    """Reductions over spatial axes keep the channels (moved when keepdims=0). A sum or mean over exactly the
    channels is a statistic of them (see `Statistic`); any other reduction over channels freezes them."""
    lay = a.lay(node.input[0])
    if lay is None:
        return
    axes = _reduced_axes(node, len(a.shape(node.input[0])), a)
    if axes is not None and set(axes) == set(lay.axes) and node.op_type in STATISTICS:
        a.stats[node.output[0]] = Statistic([lay], f"{a.where} normalises over these channels")
        a.reductions.append(node.output[0])
        return
    if axes is None or set(axes) & set(lay.axes):
        a.freeze_all(node, f"{a.where} (reduces over channels)")
        return
    keep = _attr(node, "keepdims", 1)
    a.set(node.output[0], lay if keep else lay.moved(ax - sum(r < ax for r in axes) for ax in lay.axes))


@register("ArgMax", "ArgMin")
def _arg(a: _Analysis, node: onnx.NodeProto) -> None:
    lay = a.lay(node.input[0])
    if lay is None:
        return
    axis = _attr(node, "axis", 0) % len(a.shape(node.input[0]))
    if axis in lay.axes:
        a.freeze_all(node, f"{a.where} (reduces over channels)")
        return
    keep = _attr(node, "keepdims", 1)
    a.set(node.output[0], lay if keep else lay.moved(ax - (axis < ax) for ax in lay.axes))


@register("Softmax", "LogSoftmax", "Hardmax", "LpNormalization", "LayerNormalization")
def _normalize_over(a: _Analysis, node: onnx.NodeProto) -> None:
    """Ops that mix values along some axes: fine unless those include the channels."""
    lay = a.lay(node.input[0])
    if lay is None:
        return
    rank = len(a.shape(node.input[0]))
    default = 1 if node.op_type == "LpNormalization" else -1
    axis = _attr(node, "axis", default) % rank
    if node.op_type == "LayerNormalization" or (node.op_type != "LpNormalization" and a.opset < 13):
        mixed = set(range(axis, rank))
    else:
        mixed = {axis}
    if node.op_type == "LayerNormalization" and mixed == set(lay.axes) == {rank - 1} and not any(node.output[1:]):
        # over exactly the channels: a normalisation (approximate, see `Statistic`); scale and bias are per channel
        for p in node.input[1:3]:
            value = a.const(p) if p else None
            if p and (value is None or value.size > 1):
                a.bind(p, max(value.ndim - 1, 0) if value is not None else 0, lay, "param")
        a.normalised.append((lay, [lay], f"{a.where} normalises over these channels"))
        a.set(node.output[0], lay)
        return
    if mixed & set(lay.axes) or any(node.output[1:]):
        a.freeze_all(node, f"{a.where} (mixes values across channels)")
        return
    a.set(node.output[0], lay)


@register("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _pool(a: _Analysis, node: onnx.NodeProto) -> None:
    """Spatial pooling works per channel."""
    lay = a.lay(node.input[0])
    if lay is None:
        return
    if lay.axes != (1,) or any(node.output[1:]):
        a.freeze_all(node, f"{a.where} (pooling indices or channels off axis 1)")
        return
    a.set(node.output[0], lay)


@register("Resize", "Upsample")
def _resize(a: _Analysis, node: onnx.NodeProto) -> None:
    lay = a.lay(node.input[0])
    if lay is None:
        return
    if a.shape(node.output[0]) is None or any(a.shape(node.output[0])[ax] != a.shape(node.input[0])[ax]
                                              for ax in lay.axes):
        a.freeze_all(node, f"{a.where} (resizes the channel axis)")
        return
    sizes = node.input[3] if node.op_type == "Resize" and len(node.input) > 3 else ""
    axes = _attr(node, "axes")
    rank = len(a.shape(node.input[0]))
    if sizes and a.is_const(sizes) and (axes is None or any(int(v) % rank in lay.axes for v in axes)):
        if len(lay.axes) != 1:  # constant sizes hard-code the channel count: rewritten by surgery
            a.freeze_all(node, f"{a.where} (constant sizes over split channel axes)")
            return
        at = lay.axes[0] if axes is None else [int(v) % rank for v in axes].index(lay.axes[0])
        a.edit("sizes", lay=lay, at=at, sizes=a.const(sizes).astype(np.int64))
    elif not a.resize_follows(node):  # computed: right after pruning only if it reads the pruned shape
        a.freeze_all(node, f"{a.where} (computed scales or sizes that do not follow the channel count)")
        return
    a.set(node.output[0], lay)


@register("Pad")
def _pad(a: _Analysis, node: onnx.NodeProto) -> None:
    """Padding that leaves the channel axes alone."""
    lay = a.lay(node.input[0])
    if lay is None:
        return
    rank = len(a.shape(node.input[0]))
    pads = _attr(node, "pads")
    if pads is None and len(node.input) > 1:  # computed (Swin pads its windows): its value at the analysed size;
        pads = a.static_value(node.input[1])  # one that read a channel count was frozen by the taint gate
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        value = a.const(node.input[3])
        axes = None if value is None else [int(x) % rank for x in value.ravel()]
    if pads is None or axes is None:
        a.freeze_all(node, f"{a.where} (computed pads)")
        return
    pads = np.asarray(pads).ravel().tolist()
    n = len(axes)
    if any(pads[k] or pads[k + n] for k, ax in enumerate(axes) if ax in lay.axes):
        a.freeze_all(node, f"{a.where} (pads the channel axis)")
        return
    a.set(node.output[0], lay)


@register("Shape", "Size")
def _shape(a: _Analysis, node: onnx.NodeProto) -> None:
    """Reading the channel count makes the result depend on pruning: it is tracked (see SINKS)."""
    lay = a.lay(node.input[0])
    if lay is None:
        return
    rank = len(a.shape(node.input[0]))
    covered = set(range(rank)[_attr(node, "start", 0):_attr(node, "end", None)]) \
        if node.op_type == "Shape" else set(range(rank))
    if covered & set(lay.axes):
        a.taint[node.output[0]] = set(np.unique(lay.grp).tolist()) | a.cur_taint


@register("Transpose")
def _transpose(a: _Analysis, node: onnx.NodeProto) -> None:
    lay = a.lay(node.input[0])
    if lay is None:
        return
    rank = len(a.shape(node.input[0]))
    a.set(node.output[0], _transposed(lay, list(_attr(node, "perm", list(reversed(range(rank)))))))


def _transposed(lay: Layout, perm: list[int]) -> Layout:
    new = [perm.index(ax) for ax in lay.axes]
    order = np.argsort(new)
    return Layout(tuple(sorted(new)), lay.grp.transpose(order), lay.idx.transpose(order))


def _reshape_layout(lay: Layout, shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> Layout | None:
    """Where a contiguous span of channel axes lands after a reshape: split, merged, or merged with the
    trailing axes (Flatten: each channel repeated over the H×W features that follow it)."""
    axes = lay.axes
    if list(axes) != list(range(axes[0], axes[-1] + 1)):
        return _blockwise_layout(lay, shape_in, shape_out)
    a0, b = axes[0], axes[-1]
    lead, span = int(np.prod(shape_in[:a0])), int(np.prod(shape_in[a0:b + 1]))
    if span <= 1:
        return None
    for f in range(b + 1, len(shape_in) + 1):
        target = span * int(np.prod(shape_in[b + 1:f]))
        tail = int(np.prod(shape_in[f:]))
        starts = [k for k in range(len(shape_out) + 1) if int(np.prod(shape_out[:k])) == lead]
        for start in reversed(starts):
            end, p = start, 1
            while end < len(shape_out) and p < target:
                p *= shape_out[end]
                end += 1
            if p == target and end > start and int(np.prod(shape_out[end:])) == tail:
                full = shape_in[a0:f]
                expand = lay.grp.shape + (1,) * (f - b - 1)
                dims = tuple(shape_out[start:end])
                grp = np.broadcast_to(lay.grp.reshape(expand), full).reshape(dims)
                idx = np.broadcast_to(lay.idx.reshape(expand), full).reshape(dims)
                return Layout(tuple(range(start, end)), grp, idx)
    return None


_PASS_AXES = {"Mul", "Div", "Add", "Sub", "Cast", "Identity", "Where", "Neg", "Expand"}  # keep every axis in place


def _head_split(a: _Analysis, name: str, axis: int, depth: int = 8) -> bool:
    """Whether `axis` of `name` (the inner axis of a split channel span) reaches a MatMul of two computed operands
    as its contracted axis or its columns: it is then the head width of attention (q, k and v), and the outer
    axes are the heads. Followed through transposes, scalings and reshapes that leave it whole."""
    if depth == 0 or name in a.g.output_names:
        return False
    shape = a.shape(name)
    for user in a.g.consumers.get(name, []):
        op, out = user.op_type, user.output[0] if user.output else ""
        oshape = a.shape(out)
        if oshape is None:
            continue
        moved = None
        if op == "MatMul":
            other = user.input[1] if user.input[0] == name else user.input[0]
            if not a.is_const(other):
                first = user.input[0] == name
                if axis == len(shape) - 1 if first else axis >= len(shape) - 2:
                    return True
            continue
        if op == "Transpose":
            moved = list(_attr(user, "perm", list(reversed(range(len(shape)))))).index(axis)
        elif op in _PASS_AXES:
            moved = axis + len(oshape) - len(shape)
        elif op == "Gather" and user.input[0] == name and a.const(user.input[1]) is not None \
                and a.const(user.input[1]).ndim == 0 and _attr(user, "axis", 0) % len(shape) != axis:
            moved = axis - (_attr(user, "axis", 0) % len(shape) < axis)  # q, k or v of a fused projection
        elif op in ("Reshape", "Squeeze", "Unsqueeze"):
            blocks = _reshape_blocks(shape, oshape) or []
            for ins, outs in blocks:
                big_in = [k for k in ins if shape[k] != 1]
                big_out = [k for k in outs if oshape[k] != 1]
                if axis in ins and big_in == [axis] and len(big_out) == 1 and oshape[big_out[0]] == shape[axis]:
                    moved = big_out[0]
        if moved is not None and _head_split(a, out, moved, depth - 1):
            return True
    return False


def _reshape_blocks(shape_in, shape_out) -> list[tuple[list[int], list[int]]] | None:
    """The reshape as consecutive blocks of input axes and output axes with equal products (a block splits one
    axis, merges several, or keeps one)."""
    blocks, i, j = [], 0, 0
    while i < len(shape_in) or j < len(shape_out):
        ins, outs, p, q = [], [], 1, 1
        while True:
            if p <= q and i < len(shape_in) and (not ins or p < q or shape_in[i] == 1):
                ins.append(i)
                p *= shape_in[i]
                i += 1
            elif j < len(shape_out) and (not outs or q < p or shape_out[j] == 1):
                outs.append(j)
                q *= shape_out[j]
                j += 1
            else:
                break
            if p == q and ins and outs and (i == len(shape_in) or shape_in[i] != 1) \
                    and (j == len(shape_out) or shape_out[j] != 1):
                break
        if p != q:
            return None
        blocks.append((ins, outs))
    return blocks


def _blockwise_layout(lay: Layout, shape_in, shape_out) -> Layout | None:
    """A channel span over axes that are not contiguous (heads with the sequence between them): the reshape's
    blocks (`_reshape_blocks`) that hold a channel axis give the output's channel axes; a block may also merge a
    channel axis with others (grouped-query attention repeats each k/v head over the q heads that share it)."""
    blocks = _reshape_blocks(shape_in, shape_out)
    if blocks is None:
        return None
    axes = sorted({k for ins, outs in blocks if set(ins) & set(lay.axes) for k in outs if shape_out[k] != 1})
    if not axes:
        return None
    view = [shape_in[k] if k in lay.axes else 1 for k in range(len(shape_in))]

    def spread(arr: np.ndarray) -> np.ndarray:
        whole = np.broadcast_to(arr.reshape(view), tuple(shape_in)).reshape(tuple(shape_out))
        return whole[tuple(slice(None) if k in axes else 0 for k in range(len(shape_out)))]

    return Layout(tuple(axes), spread(lay.grp), spread(lay.idx))


def _fold_rectangular(a: _Analysis, lay: Layout) -> None:
    """A channel span over several axes must prune as a product (all of some axes × a subset of one):
    units may vary along one axis only (the last varying one); fold the others."""
    if len(lay.axes) < 2:
        return
    roots, units = a.groups.resolve(lay)
    key = (roots * (units.max() + 1) + units).reshape(lay.grp.shape)
    varying = [t for t in range(key.ndim) if not (key == np.take(key, [0], axis=t)).all()]
    if len(varying) <= 1:
        return
    t = varying[-1]
    n = key.shape[t]
    g = a.groups.new(n)
    shape = [1] * key.ndim
    shape[t] = n
    idx = np.broadcast_to(np.arange(n, dtype=np.int64).reshape(shape), key.shape)
    a.unify(lay, Layout(lay.axes, np.full(key.shape, g, np.int64), idx))


@register("Reshape", "Flatten")
def _reshape(a: _Analysis, node: onnx.NodeProto) -> None:
    """Follow the channel span through the new shape; Reshape's target shape is rewritten by surgery. A span
    split over several axes prunes as a product: along the heads when it is split into heads × head width
    (`_head_split`), else along its last axis."""
    x, out = node.input[0], node.output[0]
    lay = a.lay(x)
    if lay is None:
        return
    shape_in, shape_out = a.shape(x), a.shape(out)
    new = _reshape_layout(lay, shape_in, shape_out) if shape_out is not None else None
    if new is None:
        a.freeze_all(node, f"{a.where} (reshapes the channel axis in an unsupported way)")
        return
    if len(new.axes) > 1 and _permutation_chain(a, node, lay):
        return
    if len(new.axes) > 1 and _head_split(a, out, new.axes[-1]):
        _fold_to(a, new, list(new.axes[:-1]))  # heads × head width: a head is the unit
    else:
        _fold_rectangular(a, new)
    if node.op_type == "Reshape":
        shape_value = a.const(node.input[1])
        allowzero = _attr(node, "allowzero", 0)
        if shape_value is None and 0 in new.axes:
            a.freeze_all(node, f"{a.where} (computed shape with the channels on the batch axis)")
            return
        scaled, moved = [], shape_in[0] != shape_out[0]  # entries computed as batch × channels; batch off axis 0
        if shape_value is None:
            one, two = a.shape_value(node.input[1], None), a.shape_value(node.input[1], "batch2")
            if one is not None and two is not None and np.shape(one) == np.shape(two) == (len(shape_out),):
                scaled = [ax for ax in new.axes if int(two[ax]) == 2 * int(one[ax]) != 0]
                differ = [ax for ax in range(len(shape_out)) if int(two[ax]) != int(one[ax])]
                x2 = a.batch_shapes().get(x)  # a constant shape copies the batch as a 0 at axis 0 only
                moved = moved or any(differ) or (differ == [0] and (x2 is None or x2[0] != int(two[0])))
        a.edit("reshape", out=new, shape_in=shape_in, shape_out=shape_out,
               const=None if shape_value is None else shape_value.astype(np.int64), allowzero=allowzero,
               scaled=scaled, moved=moved)
    a.set(out, new)


@register("Squeeze", "Unsqueeze")
def _squeeze(a: _Analysis, node: onnx.NodeProto) -> None:
    """Removing or inserting axes of size 1 moves the channel axes and nothing else (whatever axes lie between
    them: the fused q/k/v of `nn.MultiheadAttention` is squeezed between its two channel axes)."""
    x, out = node.input[0], node.output[0]
    lay = a.lay(x)
    if lay is None:
        return
    shape_in, shape_out = a.shape(x), a.shape(out)
    axes = _ints(a, node, 1, "axes")
    if node.op_type == "Squeeze":
        axes = [k for k, d in enumerate(shape_in) if d == 1] if axes is None else [v % len(shape_in) for v in axes]
        if set(axes) & set(lay.axes):
            a.freeze_all(node, f"{a.where} (squeezes a channel axis)")
            return
        kept = [k for k in range(len(shape_in)) if k not in axes]
        moved = [kept.index(ax) for ax in lay.axes]
    else:
        if axes is None:
            a.freeze_all(node, f"{a.where} (axes not known statically)")
            return
        axes = [v % len(shape_out) for v in axes]
        place = [k for k in range(len(shape_out)) if k not in axes]
        moved = [place[ax] for ax in lay.axes]
    a.set(out, lay.moved(moved))


def _permutation_chain(a: _Analysis, node: onnx.NodeProto, lay: Layout) -> bool:
    """Reshape (split the channel axis) → Transpose → Reshape (merge it back) only reorders the channels (a
    channel shuffle). Handled here as one fixed permutation, which surgery turns into a Gather, so that any
    channels may go (the Transpose and the second Reshape are skipped by the driver)."""
    if node.op_type != "Reshape" or len(lay.axes) != 1:
        return False
    outputs = set(a.g.output_names)
    chain = [node]
    for op in ("Transpose", "Reshape"):
        out = chain[-1].output[0]
        users = a.g.consumers.get(out, [])
        if len(users) != 1 or users[0].op_type != op or out in outputs:
            return False
        chain.append(users[0])
    _, transpose, merge = chain
    x = node.input[0]
    shapes = [a.shape(x), a.shape(node.output[0]), a.shape(transpose.output[0]), a.shape(merge.output[0])]
    if any(shp is None for shp in shapes) or shapes[3] != shapes[0]:
        return False
    probe = Layout(lay.axes, np.zeros_like(lay.idx), np.arange(lay.idx.size, dtype=np.int64))
    split = _reshape_layout(probe, shapes[0], shapes[1])
    perm = list(_attr(transpose, "perm", list(reversed(range(len(shapes[1]))))))
    if split is None or any(perm[k] != k for k in range(len(perm)) if k not in split.axes):
        return False
    merged = _reshape_layout(_transposed(split, perm), shapes[2], shapes[3])
    if merged is None or merged.axes != lay.axes:
        return False
    order = merged.idx.ravel()
    indices = [a.node_at[transpose.output[0]], a.node_at[merge.output[0]]]
    a.skip.update(indices)
    a.set(merge.output[0], Layout(lay.axes, lay.grp[order], lay.idx[order]))
    a.edit("permute", lay=lay, order=order, axis=lay.axes[0], nodes=(a.index, *indices))
    return True


@register("Concat")
def _concat(a: _Analysis, node: onnx.NodeProto) -> None:
    """On the channel axis: the output holds the inputs' channels side by side (offsets follow from that).
    On another axis: the inputs share channels."""
    out = node.output[0]
    names = [n for n in node.input if n]
    tracked = [n for n in names if a.lay(n) is not None]
    if not tracked:
        return
    rank = len(a.shape(out))
    axis = _attr(node, "axis", 0) % rank
    if any(axis in a.lay(n).axes for n in tracked):
        parts = []
        for n in names:
            shp = a.shape(n)
            if a.is_const(n):
                parts.append(a.fresh((shp[axis],), (axis,), f"{a.where} (constant input '{n}')"))
            else:
                parts.append(a.need(n, (axis,)))
        a.set(out, Layout((axis,), np.concatenate([p.grp for p in parts]), np.concatenate([p.idx for p in parts])))
        a.concats.append(a.index)
        return
    first = a.lay(tracked[0])
    for n in names:
        if a.is_const(n):
            if len(first.axes) != 1:
                a.freeze(first, f"{a.where} (constant input over split channel axes)")
            else:
                a.bind(n, first.axes[0], first, "param")
        elif a.lay(n) is None and len(first.axes) == 1 and _expanded_constant(a, n, first):
            a.set(n, first)
        else:
            a.unify(first, a.need(n, first.axes))
    a.set(out, first)


def _expanded_constant(a: _Analysis, name: str, lay: Layout) -> bool:
    """Whether `name` is a constant broadcast to the batch (ViT's class token: `token.expand(B, -1, -1)`), whose
    channel axis the Expand leaves at the constant's size: then the constant is sliced with `lay` (bound for the
    Expand) and the broadcast follows the pruned channels by itself."""
    node = a.g.producer.get(name)
    if node is None or node.op_type != "Expand" or not a.is_const(node.input[0]):
        return False
    value, target = a.const(node.input[0]), a.static_value(node.input[1])
    rank, (axis,) = len(a.shape(name)), lay.axes
    at = axis - (rank - value.ndim)  # the constant's channel axis
    if target is None or at < 0 or value.shape[at] != lay.grp.size:
        return False
    if int(np.asarray(target).ravel()[axis - (rank - np.size(target))]) not in (1, -1):
        return False  # a size written into the target would stay after pruning
    index, a.index = a.index, a.node_at[name]
    a.bind(node.input[0], at, lay, "param")
    a.index = index
    return True


def _ints(a: _Analysis, node: onnx.NodeProto, position: int, attr: str) -> list[int] | None:
    """An integer list given as input `position` (opset ≥ 10/13) or as attribute `attr` (older)."""
    if len(node.input) > position and node.input[position]:
        value = a.static_value(node.input[position])
        return None if value is None else [int(v) for v in np.asarray(value).ravel()]
    value = _attr(node, attr)
    return None if value is None else [int(v) for v in value]


@register("Slice")
def _slice(a: _Analysis, node: onnx.NodeProto) -> None:
    """A range of the channel axis (step 1): surgery rewrites the bounds for the kept channels."""
    x, out = node.input[0], node.output[0]
    lay = a.lay(x)
    if lay is None:
        return
    shp = a.shape(x)
    rank = len(shp)
    starts, ends = _ints(a, node, 1, "starts"), _ints(a, node, 2, "ends")
    axes = _ints(a, node, 3, "axes")
    steps = _ints(a, node, 4, "steps")
    if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None) \
            or (len(node.input) > 4 and node.input[4] and steps is None):
        a.freeze_all(node, f"{a.where} (bounds not known statically)")
        return
    axes = [ax % rank for ax in (axes if axes is not None else range(len(starts)))]
    steps = steps if steps is not None else [1] * len(starts)
    computed = any(n in a.taint or (n and not a.is_const(n)) for n in node.input[1:5])
    if computed and 0 in axes:
        a.freeze_all(node, f"{a.where} (computed bounds on the batch axis)")
        return
    hit = [k for k, ax in enumerate(axes) if ax in lay.axes]
    if not hit:
        if any(a.shape(out)[ax] != shp[ax] for ax in lay.axes):
            a.freeze_all(node, f"{a.where} (changes the channel axis)")
            return
        if computed:
            a.edit("slice", lay=lay, starts=starts, ends=ends, axes=axes, steps=steps, k=None)
        a.set(out, lay)
        return
    if len(lay.axes) != 1 or len(hit) != 1 or steps[hit[0]] != 1:
        a.freeze_all(node, f"{a.where} (strided or multi-axis slice of the channels)")
        return
    k = hit[0]
    start, stop, _ = slice(starts[k], ends[k], 1).indices(shp[axes[k]])
    stop = max(stop, start)
    new = lay.part(start, stop)
    a.edit("slice", lay=lay, out=new, starts=starts, ends=ends, axes=axes, steps=steps, k=k,
           bounds=(start, stop))
    a.set(out, new)


@register("Split")
def _split(a: _Analysis, node: onnx.NodeProto) -> None:
    """Consecutive ranges of the channel axis: surgery rewrites the split sizes."""
    lay = a.lay(node.input[0])
    if lay is None:
        return
    rank = len(a.shape(node.input[0]))
    axis = _attr(node, "axis", 0) % rank
    outs = list(node.output)
    if axis not in lay.axes:
        if len(node.input) > 1 and node.input[1] in a.taint:
            a.freeze_all(node, f"{a.where} (computed split sizes)")
            return
        for o in outs:
            a.set(o, lay)
        return
    if len(lay.axes) != 1 or any(not o for o in outs):
        a.freeze_all(node, f"{a.where} (split of split channel axes)")
        return
    sizes = [a.shape(o)[axis] for o in outs]
    offset, parts = 0, []
    for o, n in zip(outs, sizes):
        parts.append((offset, offset + n))
        a.set(o, lay.part(offset, offset + n))
        offset += n
    a.edit("split", lay=lay, parts=parts, axis=axis)


@register("Gather")
def _gather(a: _Analysis, node: onnx.NodeProto) -> None:
    """Indexing along another axis keeps the channels (moved by the index rank). Rows of a constant table (an
    embedding) produce its columns as channels: the table is sliced along them like a layer's weight."""
    table = _embedding_table(a, node)
    if table is not None:
        lout = a.fresh((table.shape[1],), (len(a.shape(node.output[0])) - 1,))
        a.bind(node.input[0], 1, lout, "producer")
        a.set(node.output[0], lout)
        return
    lay = a.lay(node.input[0])
    if lay is None:
        return
    rank = len(a.shape(node.input[0]))
    axis = _attr(node, "axis", 0) % rank
    ind = a.shape(node.input[1])
    index = a.const(node.input[1])
    if axis in lay.axes and len(lay.axes) > 1 and index is not None and index.ndim == 0:
        # one row of a span over several axes: q, k or v of a fused in-projection reshaped to (3, channels)
        t = lay.axes.index(axis)
        at = int(index) % lay.grp.shape[t]
        a.gathered.append((lay, axis, a.where))
        a.set(node.output[0], Layout(tuple(ax - (ax > axis) for ax in lay.axes if ax != axis),
                                     np.take(lay.grp, at, axis=t), np.take(lay.idx, at, axis=t)))
        return
    if axis in lay.axes or ind is None:
        a.freeze_all(node, f"{a.where} (indexes the channel axis)")
        return
    a.set(node.output[0], lay.moved(ax if ax < axis else ax + len(ind) - 1 for ax in lay.axes))


def _embedding_table(a: _Analysis, node: onnx.NodeProto) -> np.ndarray | None:
    """The constant 2-D float table whose rows a Gather looks up (an embedding; its ids are no shape arithmetic even
    when computed from a shape, as BERT's token-type ids are), or None."""
    if node.op_type != "Gather" or len(node.input) < 2 or a.is_const(node.input[1]):
        return None
    table = a.const(node.input[0])
    ok = table is not None and table.ndim == 2 and table.dtype.kind == "f" and _attr(node, "axis", 0) % 2 == 0
    return table if ok else None


@register("Expand")
def _expand(a: _Analysis, node: onnx.NodeProto) -> None:
    """Broadcast to a larger shape without touching the channels: the target shape is rewritten."""
    x, out = node.input[0], node.output[0]
    lay = a.lay(x)
    if lay is None:
        return
    shape_in, shape_out = a.shape(x), a.shape(out)
    shift = len(shape_out) - len(shape_in)
    axes = tuple(ax + shift for ax in lay.axes)
    if any(shape_out[o] != shape_in[i] for i, o in zip(lay.axes, axes)):
        a.freeze_all(node, f"{a.where} (broadcasts the channel axis)")
        return
    new = lay.moved(axes)
    a.edit("expand", out=new, shape_in=shape_in, shape_out=shape_out)
    a.set(out, new)


@register("Tile")
def _tile(a: _Analysis, node: onnx.NodeProto) -> None:
    lay = a.lay(node.input[0])
    if lay is None:
        return
    reps = a.const(node.input[1])
    if reps is None or any(int(reps[ax]) != 1 for ax in lay.axes):
        a.freeze_all(node, f"{a.where} (repeats the channel axis)")
        return
    a.set(node.output[0], lay)


@register("Conv", "ConvTranspose")
def _conv(a: _Analysis, node: onnx.NodeProto) -> None:
    """Input channels are consumed, output channels produced. Depthwise (one input channel per group): input
    and output are the same channels. Other grouped convs: every group keeps the same in/out channels."""
    x, w, out = node.input[0], node.input[1], node.output[0]
    weight = a.const(w)
    if weight is None or a.is_const(x):
        a.freeze_all(node, f"{a.where} (non-constant weight)")
        return
    transposed = node.op_type == "ConvTranspose"
    groups = int(_attr(node, "group", 1))
    cin, cout = a.shape(x)[1], a.shape(out)[1]
    m_in, m_out = cin // groups, cout // groups
    lin = a.need(x, (1,))
    a.io[a.index] = (x, out, lin)
    if groups == 1:
        lout = a.fresh((cout,), (1,))
        a.bind(w, 0 if transposed else 1, lin, "consumer")
        a.bind(w, 1 if transposed else 0, lout, "producer")
    elif m_in == 1:  # depthwise (with channel multiplier m_out): removing a channel removes its whole group
        lout = Layout((1,), np.repeat(lin.grp, m_out), np.repeat(lin.idx, m_out))
        a.bind(w, 0, lin if transposed else lout, "producer")
        a.edit("group", lay=lin)
    else:  # grouped: unit j of the input (output) is channel j of every group
        fold = a.groups.new(m_in)
        a.unify(lin, Layout((1,), np.full(cin, fold, np.int64), np.tile(np.arange(m_in, dtype=np.int64), groups)))
        g_out = a.groups.new(m_out)
        lout = Layout((1,), np.full(cout, g_out, np.int64), np.tile(np.arange(m_out, dtype=np.int64), groups))
        if transposed:
            a.bind(w, 0, lin, "consumer")
            a.bind(w, 1, lout.part(0, m_out), "producer")
        else:
            a.bind(w, 1, lin.part(0, m_in), "consumer")
            a.bind(w, 0, lout, "producer")
    if len(node.input) > 2 and node.input[2]:
        a.bind(node.input[2], 0, lout, "param")
    a.set(out, lout)


@register("Gemm")
def _gemm(a: _Analysis, node: onnx.NodeProto) -> None:
    """A (M×K) · B (K×N): input features consumed, output features produced, bias sliced."""
    x, w, out = node.input[0], node.input[1], node.output[0]
    weight = a.const(w)
    if weight is None or weight.ndim != 2 or a.is_const(x):
        a.freeze_all(node, f"{a.where} (non-constant weight)")
        return
    trans_a, trans_b = int(_attr(node, "transA", 0)), int(_attr(node, "transB", 0))
    lin = a.need(x, (0 if trans_a else 1,))
    a.io[a.index] = (x, out, lin)
    n = a.shape(out)[1]
    lout = a.fresh((n,), (1,))
    a.bind(w, 1 if trans_b else 0, lin, "consumer")
    a.bind(w, 0 if trans_b else 1, lout, "producer")
    if len(node.input) > 2 and node.input[2]:
        c = node.input[2]
        value = a.const(c)
        if value is None:
            a.freeze(lout, f"{a.where} (non-constant bias)")
        elif value.ndim >= 1 and value.shape[-1] == n and n > 1:
            a.bind(c, value.ndim - 1, lout, "param")
    a.set(out, lout)


@register("MatMul")
def _matmul(a: _Analysis, node: onnx.NodeProto) -> None:
    """X (…×K) · W (K×N) with a constant 2-D W: features of the last axis consumed / produced."""
    x, w, out = node.input[0], node.input[1], node.output[0]
    weight = a.const(w)
    if weight is None and not a.is_const(x):
        _product(a, node)
        return
    if weight is None or weight.ndim != 2 or a.is_const(x):
        a.freeze_all(node, f"{a.where} (no constant 2-D weight)")
        return
    rank_x, rank_out = len(a.shape(x)), len(a.shape(out))
    lin = a.need(x, (rank_x - 1,))
    a.io[a.index] = (x, out, lin)
    lout = a.fresh((weight.shape[1],), (rank_out - 1,))
    a.bind(w, 0, lin, "consumer")
    a.bind(w, 1, lout, "producer")
    a.set(out, lout)


def _fold_to(a: _Analysis, lay: Layout, axes: list[int]) -> None:
    """Identify the positions of `lay` that differ only off `axes`: its units then vary along `axes` alone."""
    t = [lay.axes.index(ax) for ax in axes]
    dims = [lay.grp.shape[k] for k in t]
    g = a.groups.new(int(np.prod(dims)))
    shape = [lay.grp.shape[k] if k in t else 1 for k in range(lay.grp.ndim)]
    idx = np.broadcast_to(np.arange(int(np.prod(dims)), dtype=np.int64).reshape(shape), lay.grp.shape)
    a.unify(lay, Layout(lay.axes, np.full(lay.grp.shape, g, np.int64), idx))


def _restrict(lay: Layout, axes: list[int], to: dict[int, int]) -> Layout:
    """`lay` on `axes` only (the first position along the others), renumbered to output axes by `to`."""
    pick = tuple(slice(None) if ax in axes else 0 for ax in lay.axes)
    return Layout(tuple(to[ax] for ax in lay.axes if ax in axes), lay.grp[pick], lay.idx[pick])


@dataclass
class _Operand:
    """One operand of a product: its layout, where its axes land in the output, its batch and contracted axes."""

    name: str
    shape: tuple[int, ...]
    lay: Layout | None
    to: dict[int, int]
    batch: list[int]
    contracted: int


def _product(a: _Analysis, node: onnx.NodeProto) -> None:
    """A · B with both operands computed (attention: Q·Kᵀ, then softmax·V). Channels on the batch axes are the
    heads: a head is the unit, so a span over a batch axis and a matrix axis (heads × head width) is folded to
    vary along the batch axis only, and both operands share it. Channels on the contracted axis go together in
    both operands; A's rows and B's columns pass to the output. Removing a head removes its scores, its softmax
    and its context: the rest is computed exactly as before."""
    x, y, out = node.input[0], node.input[1], node.output[0]
    sa, sb, so = a.shape(x), a.shape(y), a.shape(out)
    if len(sa) < 2 or len(sb) < 2:
        a.freeze_all(node, f"{a.where} (a 1-D operand)")
        return
    r = len(so)
    ops = []
    for name, shp, first in ((x, sa, True), (y, sb, False)):
        rank = len(shp)
        to = {ax: ax + r - rank for ax in range(rank - 2)}  # operand axis -> output axis
        to.update({rank - 2: r - 2} if first else {rank - 1: r - 1})
        op = _Operand(name, shp, a.lay(name), to, list(range(rank - 2)), rank - 1 if first else rank - 2)
        if op.lay is not None and set(op.lay.axes) & set(op.batch) and not set(op.lay.axes) <= set(op.batch):
            _fold_to(a, op.lay, [ax for ax in op.lay.axes if ax in op.batch])
        ops.append(op)
    A, B = ops
    # the batch axes: the heads of both operands are the same heads
    heads = None
    for op, other in ((A, B), (B, A)):
        mine = [ax for ax in (op.lay.axes if op.lay is not None else ()) if ax in op.batch]
        if not mine:
            continue
        part = _restrict(op.lay, mine, op.to)
        heads = part if heads is None else heads
        back = {v: k for k, v in other.to.items()}
        theirs = [back.get(ax) for ax in part.axes]
        if any(t is None for t in theirs) or all(other.shape[t] == 1 for t in theirs):
            continue  # broadcast along the heads
        if other.lay is not None and set(theirs) <= set(other.lay.axes):
            a.unify(part, _restrict(other.lay, theirs, other.to))
        else:
            a.unify(part, a.need(other.name, tuple(theirs)).moved(part.axes))
    # the contracted axis (when it is not part of a head): both operands drop the same channels
    if any(op.lay is not None and op.lay.axes == (op.contracted,) for op in ops):
        a.unify(a.need(x, (A.contracted,)), a.need(y, (B.contracted,)))
    elif any(op.lay is not None and op.contracted in op.lay.axes and not set(op.lay.axes) & set(op.batch)
             for op in ops):
        a.freeze_all(node, f"{a.where} (channels on the contracted axis and a matrix axis)")
        return
    # the output: A's rows or B's columns, with the heads
    rows = A.lay is not None and len(sa) - 2 in A.lay.axes
    cols = B.lay is not None and len(sb) - 1 in B.lay.axes
    if rows and cols:
        a.freeze_all(node, f"{a.where} (channels on both operands' free axes)")
        return
    result = heads
    if rows or cols:
        op = A if rows else B
        result = _restrict(op.lay, [ax for ax in op.lay.axes if ax != op.contracted], op.to)
    a.products.append((a.index, out, int(sa[-1]), heads))
    a.set(out, result)

