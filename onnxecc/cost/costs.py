"""Cost models: one form, several sources.

Every cost onnxecc budgets — MACs, parameters, and (later) profiled latency/energy — is a *bilinear
polynomial in the channel-group widths*:

    cost(w) = constant + Σ_t coef_t · w[a_t] · w[b_t]

where a term may name one group (linear: biases, BatchNorm, depthwise convs) or none (constant). MACs of a
conv are exactly (kept in) × (kept out) × k×k×H×W / groups, so this form is exact for MACs and params, and it
is ECC's bilinear energy model when the coefficients are fitted. Keeping one form means one projection, one
report, and the same numbers in numpy (reporting) and torch (training, on soft widths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from onnxecc.core.errors import UnsupportedModelError


def allowed_widths(full: int, min_width: int = 1, round_to: int = 1, per_unit: int = 1) -> np.ndarray:
    """Ascending allowed widths of a group of `full` channels: `full` itself and the multiples of `round_to`
    below it that are at least max(min_width, round_to); `full` only if it is below that floor. For units of
    `per_unit` channels each (heads), both options count channels and are turned into units first."""
    if per_unit > 1:
        min_width = -(-int(min_width) // per_unit)
        round_to = int(round_to) // math.gcd(int(round_to), int(per_unit))
    full = int(full)
    lo = max(int(min_width), int(round_to))
    if full <= lo:
        return np.array([full], dtype=np.int64)
    first = -(-lo // round_to) * round_to  # smallest multiple of round_to >= lo
    steps = np.arange(first, full, round_to, dtype=np.int64)
    return np.concatenate([steps, np.array([full], dtype=np.int64)])


@dataclass(frozen=True)
class Term:
    coef: float
    a: int | None = None  # group id, or None for a factor of 1
    b: int | None = None
    upper_bound: bool = False  # a linear bound of a w² term (the cost is then an upper bound, not exact)


@dataclass
class BilinearCost:
    """cost(w) = constant + Σ coef·w[a]·w[b]; `w` maps group id → kept channels (missing → full width)."""

    metric: str
    unit: str
    full_widths: dict[int, int]
    terms: list[Term] = field(default_factory=list)
    constant: float = 0.0
    # channels one unit of a variable stands for, where not 1 (an attention head: its head width): `--min-width`
    # and `--round-to` count channels, so they allow any head count once a head holds a multiple of the step
    channels_per_unit: dict[int, int] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """False when some term is an upper bound (see `Term.upper_bound`): counted cost ≤ this model."""
        return not any(t.upper_bound for t in self.terms)

    def __call__(self, widths: dict[int, float] | None = None) -> float:
        widths = widths or {}
        total = self.constant
        for t in self.terms:
            total += t.coef * self._w(widths, t.a) * self._w(widths, t.b)
        return float(total)

    def _w(self, widths, g):
        if g is None:
            return 1.0
        return widths.get(g, self.full_widths[g])

    def marginal(self, widths: dict[int, float], group: int) -> float:
        """Cost removed per channel taken out of `group` (exact: the cost is linear in each single width)."""
        total = 0.0
        for t in self.terms:
            if t.a == group and t.b == group:
                raise ValueError("a term squares one group; the model is bilinear in distinct groups only")
            if t.a == group:
                total += t.coef * self._w(widths, t.b)
            elif t.b == group:
                total += t.coef * self._w(widths, t.a)
        return total

    def torch_cost(self, widths: dict):
        """Differentiable cost on torch width tensors (e.g. sums of soft channel masks)."""
        total = self.constant
        for t in self.terms:
            total = total + t.coef * self._w(widths, t.a) * self._w(widths, t.b)
        return total

    @property
    def groups(self) -> list[int]:
        return sorted(self.full_widths)

    def neighbours(self) -> dict[int, set[int]]:
        """Groups whose marginal cost changes when a group shrinks (for lazy heap re-evaluation)."""
        out: dict[int, set[int]] = {g: set() for g in self.full_widths}
        for t in self.terms:
            if t.a is not None and t.b is not None:
                out[t.a].add(t.b)
                out[t.b].add(t.a)
        return out

    def as_dict(self) -> dict:
        return {
            "metric": self.metric, "unit": self.unit, "constant": self.constant,
            "full_widths": {str(k): v for k, v in self.full_widths.items()},
            "terms": [[t.coef, t.a, t.b] for t in self.terms],
        }

    def vectorized(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(coef, a, b) arrays with -1 for a missing group: fast evaluation of many width vectors."""
        coef = np.array([t.coef for t in self.terms], dtype=np.float64)
        a = np.array([-1 if t.a is None else t.a for t in self.terms], dtype=np.int64)
        b = np.array([-1 if t.b is None else t.b for t in self.terms], dtype=np.int64)
        return coef, a, b


# ---- analytic costs from the channel groups --------------------------------------------------------------------
@dataclass
class Variables:
    """The width variables of a cost: classes of units of one channel group that occur identically (same
    tensors, same multiplicity) everywhere. Usually one class per group; a group whose units reach different
    tensors (a Split of a shuffled group, say) has several, and only per class is the cost a function of
    widths alone — which units are kept matters otherwise."""

    group: list[int]  # variable -> channel group id
    units: list[np.ndarray]  # variable -> unit indices in its group (sorted)

    def of_group(self, gid: int) -> list[int]:
        return [v for v, g in enumerate(self.group) if g == gid]

    def group_keep(self, keep: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Kept units per group from kept indices per variable (indices into `units[v]`)."""
        out: dict[int, list[np.ndarray]] = {}
        for v, idx in keep.items():
            out.setdefault(self.group[v], []).append(self.units[v][np.asarray(idx, dtype=np.int64)])
        return {g: np.sort(np.concatenate(parts)) for g, parts in out.items()}

    def group_widths(self, widths: dict[int, int]) -> dict[int, int]:
        out: dict[int, int] = {}
        for v, w in widths.items():
            out[self.group[v]] = out.get(self.group[v], 0) + int(w)
        return out


def unit_classes(graph) -> Variables:
    """Split every group's units by where they occur (see `Variables`): in the constants sliced (binds) and in
    the outputs of the products of two computed tensors (whose MACs count their kept positions)."""
    signature: dict[tuple[int, int], list] = {}
    for i, pos in enumerate([b.pos for b in graph.binds] + _product_positions(graph)):
        gid, unit = pos.gid.ravel(), pos.unit.ravel()
        keys, counts = np.unique(np.stack([gid, unit]), axis=1, return_counts=True)
        for (g, u), c in zip(keys.T.tolist(), counts.tolist()):
            signature.setdefault((g, u), []).append((i, c))
    groups, units = [], []
    for g in graph.groups:
        classes: dict[tuple, list[int]] = {}
        for u in range(g.size):
            classes.setdefault(tuple(signature.get((g.id, u), ())), []).append(u)
        for members in sorted(classes.values()):
            groups.append(g.id)
            units.append(np.array(members, dtype=np.int64))
    return Variables(groups, units)


def _product_positions(graph) -> list:
    """Channel positions of the products' outputs (`ChannelGraph.products`; those that carry tracked channels)."""
    found = (graph.positions(p.output) for p in getattr(graph, "products", []))
    return [pos for pos in found if pos is not None]


def _per_unit(graph, variables: Variables):
    """A function Positions -> {variable: positions per kept unit}: the positions keep Σ_v coef_v · w_v of
    themselves (exact: the units of one variable occur equally often there, see `unit_classes`)."""
    lookup = np.full((len(graph.groups), max((g.size for g in graph.groups), default=0)), -1, dtype=np.int64)
    for v, (g, us) in enumerate(zip(variables.group, variables.units)):
        lookup[g, us] = v
    sizes = np.array([len(u) for u in variables.units], dtype=np.float64)

    def per_unit(pos) -> dict[int, float]:
        var, counts = np.unique(lookup[pos.gid.ravel(), pos.unit.ravel()], return_counts=True)
        return {int(v): float(c) / sizes[v] for v, c in zip(var, counts)}

    return per_unit


def _bound_axes(graph, variables: Variables) -> dict[str, dict[int, dict[int, dict[int, float]]]]:
    """name -> node index -> axis -> {variable: positions per kept unit}: the axis keeps Σ_v coef_v · w_v
    positions (exact: the units of one variable occur equally often)."""
    per_unit = _per_unit(graph, variables)
    out: dict[str, dict[int, dict[int, dict[int, float]]]] = {}
    for bind in graph.binds:
        axes = out.setdefault(bind.name, {}).setdefault(bind.node_index, {})
        if bind.axis in axes:
            continue
        axes[bind.axis] = per_unit(bind.pos)
    return out


def _axes_of(bound, name: str, node_index: int | None) -> dict[int, dict[int, float]]:
    per_node = bound.get(name, {})
    if node_index is not None:
        return per_node.get(node_index, {})
    return next(iter(per_node.values()), {})


def _tensor_terms(shape: tuple[int, ...], axes: dict[int, dict[int, float]], scale: float, label: str, full,
                  ) -> tuple[list[Term], float]:
    """Terms of scale · Π dims, where bound axes are linear in group widths (at most two bound axes)."""
    rest = float(np.prod([d for i, d in enumerate(shape) if i not in axes], dtype=np.float64)) * scale
    bound = [axes[a] for a in sorted(axes)]
    if not bound:
        return [], rest
    if len(bound) == 1:
        return [Term(rest * c, g) for g, c in bound[0].items()], 0.0
    if len(bound) == 2:
        terms = []
        for g, c in bound[0].items():
            for h, d in bound[1].items():
                if g == h:  # e.g. a 1×1 conv inside a residual depthwise block: w², not bilinear.
                    # Bound it by w·full (exact at full width, never below the true cost: budgets stay safe).
                    terms.append(Term(rest * c * d * full[g], g, None, upper_bound=True))
                else:
                    terms.append(Term(rest * c * d, g, h))
        return terms, 0.0
    raise ValueError(f"{label}: channels bound on {len(bound)} axes; the cost is not bilinear")


def macs_cost(graph, layers, model, variables: Variables) -> BilinearCost:
    """MACs of the compute layers as a function of group widths: each layer's MACs scale with the kept
    positions of its weight's two channel axes (exact for plain, depthwise, Concat and Flatten→Gemm layers);
    a product of two computed tensors' with the kept positions of its output (see `_product_terms`)."""
    terms: list[Term] = []
    constant = 0.0
    for t, c in _layer_terms(graph, layers, model, variables):
        terms += t
        constant += c
    return BilinearCost("macs", "MACs", _full(variables), _merge(terms), constant)


def _layer_terms(graph, layers, model, variables: Variables) -> list[tuple[list[Term], float]]:
    """(terms, constant) of each layer's MACs, in the order of `layers`."""
    from onnxecc.graph.graph import Graph

    consts = Graph(model)
    bound = _bound_axes(graph, variables)
    per_unit = _per_unit(graph, variables)
    products = {p.node_index: p for p in getattr(graph, "products", [])}
    full = _full(variables)
    out = []
    for layer in layers:
        if layer.weight is None:
            node = model.graph.node[layer.node_index]
            out.append(_product_terms(layer, node, products.get(layer.node_index), graph, per_unit))
            continue
        w_shape = consts.const(layer.weight).shape
        per_weight = layer.macs / float(np.prod(w_shape, dtype=np.float64))
        out.append(_tensor_terms(w_shape, _axes_of(bound, layer.weight, layer.node_index), per_weight,
                                 layer.name, full))
    return out


def _product_terms(layer, node, product, graph, per_unit) -> tuple[list[Term], float]:
    """A product of two computed tensors (attention's Q·Kᵀ, softmax·V) makes k MACs per output element: its MACs
    are (kept positions of the output over its channel axes) × (the output's other dims) × k, linear in the
    widths — one term per variable, coefficient = positions per kept unit × other dims × k. Its count at full
    width is `layer.macs`, so other dims × k = layer.macs / the positions. A product the channel analysis did
    not record, or whose output carries no tracked channel, costs its full MACs whatever the widths.

    A prunable group on the operands but not on the output lies on the contraction axis (every other axis of
    the operands reaches the output): k would shrink with it, which this form does not model — said so rather
    than a cost that is off."""
    pos = graph.positions(product.output) if product is not None else None
    operands = [graph.positions(t) for t in node.input]
    inner = set().union(*(set(o.gid.ravel().tolist()) for o in operands if o is not None))
    inner = (inner - (set() if pos is None else set(pos.gid.ravel().tolist()))) & \
        {g.id for g in graph.groups if g.prunable}
    if inner:
        raise UnsupportedModelError(
            f"{layer.name}: channel group(s) {sorted(inner)} lie on the contraction axis of a product of two "
            "computed tensors; pruning them changes its MACs in a way onnxecc does not model yet")
    if pos is None:
        return [], float(layer.macs)
    if product.k != layer.cin:
        raise ValueError(f"{layer.name}: the channel analysis contracts {product.k} positions, the layer "
                         f"count {layer.cin}")
    per_position = layer.macs / float(pos.gid.size)
    return [Term(per_position * c, v) for v, c in per_unit(pos).items()], 0.0


def params_cost(graph, model, variables: Variables) -> BilinearCost:
    """Parameters (every floating-point constant used by a node, as `layers.count_params` counts them)."""
    from onnxecc.graph.layers import used_float_constants

    bound = _bound_axes(graph, variables)
    terms: list[Term] = []
    constant = 0.0
    for name, shape in used_float_constants(model).items():
        t, c = _tensor_terms(shape, _axes_of(bound, name, None), 1.0, name, _full(variables))
        terms += t
        constant += c
    return BilinearCost("params", "params", _full(variables), _merge(terms), constant)


def _full(variables: Variables) -> dict[int, int]:
    return {v: len(u) for v, u in enumerate(variables.units)}


def _merge(terms: list[Term]) -> list[Term]:
    """One term per (a, b) pair: fewer terms, faster evaluation and projection."""
    merged: dict[tuple, float] = {}
    for t in terms:
        key = (t.a, t.b) if t.b is None or (t.a is not None and t.a <= t.b) else (t.b, t.a)
        key = (*key, t.upper_bound)
        merged[key] = merged.get(key, 0.0) + t.coef
    return [Term(c, a, b, bound) for (a, b, bound), c in merged.items() if c != 0.0]


def layer_costs(graph, layers, model, variables: Variables) -> list[BilinearCost]:
    """Each compute layer's MACs as a bilinear cost of its own (the per-layer terms `macs_cost` sums; products
    of two computed tensors included): the features of a fitted profile are these divided by their full-width
    value."""
    return [BilinearCost("macs", "MACs", _full(variables), _merge(t), c)
            for t, c in _layer_terms(graph, layers, model, variables)]
