"""Structured knapsack projection: which channels to keep so a bilinear cost meets a budget.

Problem. Given a `BilinearCost` cost(w) = constant + Σ coef·w[a]·w[b] over channel-group widths, a
non-negative importance per channel of every *prunable* group (all other groups stay at full width) and a
budget B, choose a kept width w_g for each prunable group (from its allowed widths) and keep the w_g most
important channels of each, so that cost(w) ≤ B and the total kept importance is as large as possible.
Keeping the most important channels is optimal for a fixed width, so the kept importance of a group at
width w is the prefix sum of its importances sorted in decreasing order.

Algorithm (greedy with lazy re-evaluation, then refill):

1. Every prunable group starts at full width. A group's *next step* goes down to its next allowed width and
   removes its least important remaining channels; its priority is importance lost / cost saved. The cost
   is linear in any single width, so the saving of a step is exact: marginal(g) · (channels removed), with
   marginal(g) = linear(g) + Σ coef·w[neighbour] — but it depends on the neighbours' current widths.
2. Pop the cheapest step; recompute its priority with the current widths (marginals are kept up to date
   incrementally, O(degree) per step). Bilinear coefficients are non-negative, so shrinking a neighbour
   can only *lower* a marginal, i.e. *raise* a priority: a heap entry is a lower bound on the true
   priority. If the fresh priority is still no larger than the heap's next entry, the step is the true
   minimum and is applied; otherwise it goes back with its fresh priority.
3. Stop as soon as cost ≤ B. The last step usually overshoots; a refill pass then adds back, best
   importance-per-cost first (same lazy scheme, mirrored), every next-wider step that still fits.

The final cost is recomputed exactly with the `BilinearCost` itself, and the result is feasible by
construction (cost ≤ B) whenever B is at least the smallest reachable cost; below that a `UserError` says
what that cost is. `onnxecc.optimize.exact` solves the same problem exactly (MILP) on small instances for checking.

ONNX side: numpy only.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from onnxecc.core.errors import UserError
from onnxecc.cost.costs import BilinearCost, allowed_widths


@dataclass
class Projection:
    """Result of a projection: the kept channels of every prunable group and what they cost."""

    keep: dict[int, np.ndarray]  # prunable group -> sorted kept channel indices
    widths: dict[int, int]  # every group of the cost -> kept width (full width if not prunable)
    cost: float
    kept_importance: float
    total_importance: float

    @property
    def kept_fraction(self) -> float:
        return self.kept_importance / self.total_importance if self.total_importance > 0 else 1.0


# --------------------------------------------------------------------------------------------- helpers


def _check_options(min_width: int, round_to: int) -> None:
    if int(min_width) != min_width or min_width < 1:
        raise ValueError(f"min_width must be a positive integer, got {min_width!r}")
    if int(round_to) != round_to or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")


@dataclass
class ReducedCost:
    """The cost restricted to the prunable groups (others frozen at full width):
    cost(w) = constant + Σ_i linear[i]·w[i] + Σ_(i,j) pair_coef·w[i]·w[j], i, j positions in `groups`."""

    groups: list[int]
    full: np.ndarray
    constant: float
    linear: np.ndarray
    pair_i: np.ndarray
    pair_j: np.ndarray
    pair_coef: np.ndarray

    def __call__(self, w: np.ndarray) -> float:
        w = np.asarray(w, dtype=np.float64)
        return float(self.constant + self.linear @ w + np.sum(self.pair_coef * w[self.pair_i] * w[self.pair_j]))


def reduce_cost(cost: BilinearCost, prunable: Iterable[int]) -> ReducedCost:
    """Fold every term into constant / linear / pairwise form over the prunable groups (sorted).

    Raises ValueError for a term that squares one group or a negative coefficient between two prunable
    groups (the lazy greedy relies on marginals only decreasing as widths shrink)."""
    groups = sorted(int(g) for g in prunable)
    pos = {g: i for i, g in enumerate(groups)}
    for g in groups:
        if g not in cost.full_widths:
            raise ValueError(f"group {g} has importances but is not a group of the cost model")
    full = np.array([cost.full_widths[g] for g in groups], dtype=np.int64)
    constant = float(cost.constant)
    linear = np.zeros(len(groups))
    pairs: dict[tuple[int, int], float] = {}
    for t in cost.terms:
        if t.a is not None and t.a == t.b:
            raise ValueError(f"a cost term squares group {t.a}; the model is bilinear in distinct groups only")
        factor = float(t.coef)
        free = []
        for g in (t.a, t.b):
            if g is None:
                continue
            if g in pos:
                free.append(pos[g])
            else:
                factor *= cost.full_widths[g]
        if not free:
            constant += factor
        elif len(free) == 1:
            linear[free[0]] += factor
        else:
            key = (min(free), max(free))
            pairs[key] = pairs.get(key, 0.0) + factor
    for (i, j), c in pairs.items():
        if c < 0:
            raise ValueError(
                f"negative bilinear coefficient {c} between groups {groups[i]} and {groups[j]}: "
                "the projection needs non-negative coefficients"
            )
    keys = list(pairs)
    return ReducedCost(
        groups=groups,
        full=full,
        constant=constant,
        linear=linear,
        pair_i=np.array([k[0] for k in keys], dtype=np.int64),
        pair_j=np.array([k[1] for k in keys], dtype=np.int64),
        pair_coef=np.array([pairs[k] for k in keys], dtype=np.float64),
    )


def importance_order(cost: BilinearCost, importance: dict[int, np.ndarray]) -> dict[int, tuple]:
    """Per prunable group: (channel order by decreasing importance, prefix sums of sorted importances)."""
    out = {}
    for g, imp in importance.items():
        g = int(g)
        if g not in cost.full_widths:
            raise ValueError(f"group {g} has importances but is not a group of the cost model")
        imp = np.asarray(imp, dtype=np.float64).reshape(-1)
        if imp.size != cost.full_widths[g]:
            raise ValueError(f"group {g}: {imp.size} importances for {cost.full_widths[g]} channels")
        if not np.all(np.isfinite(imp)) or np.any(imp < 0):
            raise ValueError(f"group {g}: importances must be finite and non-negative")
        order = np.argsort(-imp, kind="stable")  # ties: lower channel index kept first
        prefix = np.concatenate([[0.0], np.cumsum(imp[order])])
        out[g] = (order, prefix)
    return out


def projection_from_widths(
    cost: BilinearCost, importance: dict[int, np.ndarray], widths: dict[int, int], orders=None
) -> Projection:
    """Build the `Projection` that keeps the `widths[g]` most important channels of each prunable group."""
    orders = orders if orders is not None else importance_order(cost, importance)
    keep, kept, total = {}, 0.0, 0.0
    all_widths = {g: int(s) for g, s in cost.full_widths.items()}
    for g, (order, prefix) in orders.items():
        w = int(widths.get(g, cost.full_widths[g]))
        keep[g] = np.sort(order[:w])
        all_widths[g] = w
        kept += float(prefix[w])
        total += float(prefix[-1])
    return Projection(
        keep=keep, widths=all_widths, cost=float(cost(all_widths)), kept_importance=kept, total_importance=total
    )


def min_widths(cost: BilinearCost, prunable_groups: Iterable[int], min_width: int = 1, round_to: int = 1):
    """Every prunable group at its smallest allowed width."""
    return {int(g): int(allowed_widths(cost.full_widths[int(g)], min_width, round_to,
                                       cost.channels_per_unit.get(int(g), 1))[0]) for g in prunable_groups}


def min_cost(cost: BilinearCost, prunable_groups: Iterable[int], min_width: int = 1, round_to: int = 1) -> float:
    """The smallest reachable cost: every prunable group at its smallest allowed width (the cost only grows
    with widths, given non-negative bilinear coefficients and per-group marginals)."""
    _check_options(min_width, round_to)
    return float(cost(min_widths(cost, prunable_groups, min_width, round_to)))


def check_reachable(
    cost: BilinearCost,
    prunable_groups: Iterable[int],
    budget: float,
    *,
    min_width: int = 1,
    round_to: int = 1,
    fmt: Callable[[float], str] = str,
) -> float:
    """Raise `UserError` if `budget` is below the smallest reachable cost; return that cost. The message names
    the width options that would reach the budget (`narrower_options`), when any would."""
    prunable_groups = list(prunable_groups)
    mc = min_cost(cost, prunable_groups, min_width, round_to)
    if not np.isfinite(budget) or budget < mc - 1e-12 * abs(mc):
        narrower = narrower_options(cost, prunable_groups, budget, min_width, round_to) if np.isfinite(budget) else []
        if narrower:
            tail = ", or allow narrower layers: " + " or ".join(f"{o} (smallest cost {fmt(c)})" for o, c in narrower)
        elif (min_width, round_to) != (1, 1):
            tail = " (narrower layers would not reach it either)"
        else:
            tail = ""
        raise UserError(
            f"budget {fmt(budget)} is below the smallest reachable cost {fmt(mc)} (every prunable group at "
            f"its minimum width: --min-width {min_width}, multiples of --round-to {round_to}): raise the budget "
            f"to at least {fmt(mc)}{tail}"
        )
    return mc


def narrower_options(cost: BilinearCost, prunable_groups: Iterable[int], budget: float, min_width: int,
                     round_to: int) -> list[tuple[str, float]]:
    """The width options that would make `budget` reachable, with the smallest cost each reaches: `--round-to 1`
    and `--min-width 1` alone where either reaches it, else both together; only options that change something
    (not `--round-to 1` when it is 1) and only when they reach the budget (empty otherwise)."""
    groups, limit = list(prunable_groups), budget * (1 + 1e-12)
    alone = []
    if round_to > 1 and (c := min_cost(cost, groups, min_width, 1)) <= limit:
        alone.append(("--round-to 1", c))
    if min_width > 1 and (c := min_cost(cost, groups, 1, round_to)) <= limit:
        alone.append(("--min-width 1", c))
    if alone or round_to == 1 or min_width == 1:
        return alone
    c = min_cost(cost, groups, 1, 1)
    return [("--round-to 1 --min-width 1", c)] if c <= limit else []


# ------------------------------------------------------------------------------------------ the greedy


def project(
    cost: BilinearCost,
    importance: dict[int, np.ndarray],
    budget: float,
    *,
    min_width: int = 1,
    round_to: int = 1,
    fmt: Callable[[float], str] = str,
) -> Projection:
    """Keep the most important channels of the prunable groups (the keys of `importance`) such that
    cost ≤ budget; see the module docstring for the algorithm. Raises `UserError` if the budget is below
    the smallest reachable cost (numbers printed with `fmt`)."""
    _check_options(min_width, round_to)
    orders = importance_order(cost, importance)
    budget = float(budget)
    if np.isnan(budget):
        raise ValueError("budget is NaN")
    full_cost = float(cost(None))
    if budget >= full_cost:
        return projection_from_widths(cost, importance, {}, orders)
    check_reachable(cost, orders, budget, min_width=min_width, round_to=round_to, fmt=fmt)

    red = reduce_cost(cost, orders)
    n = len(red.groups)
    allowed = [allowed_widths(s, min_width, round_to, cost.channels_per_unit.get(g, 1)).tolist()
               for s, g in zip(red.full, red.groups)]
    prefix = [orders[g][1].tolist() for g in red.groups]
    idx = [len(a) - 1 for a in allowed]
    adj: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    for i, j, c in zip(red.pair_i.tolist(), red.pair_j.tolist(), red.pair_coef.tolist()):
        adj[i].append((j, c))
        adj[j].append((i, c))
    width = red.full.astype(np.float64)
    marg = red.linear.copy()
    np.add.at(marg, red.pair_i, red.pair_coef * width[red.pair_j])
    np.add.at(marg, red.pair_j, red.pair_coef * width[red.pair_i])
    m = marg.tolist()
    w_cur = red.full.tolist()

    def exact_cost() -> float:
        return float(cost({g: w_cur[i] for i, g in enumerate(red.groups)}))

    # ---- removal: cheapest importance-per-cost step first, lazily re-evaluated
    heap: list[tuple[float, int]] = []
    for i in range(n):
        if idx[i] > 0:
            w, w2 = w_cur[i], allowed[i][idx[i] - 1]
            saved = m[i] * (w - w2)
            if saved > 0:
                heap.append(((prefix[i][w] - prefix[i][w2]) / saved, i))
    heapq.heapify(heap)
    cur = full_cost
    pop, push = heapq.heappop, heapq.heappush
    while True:
        while cur > budget and heap:
            _, i = pop(heap)
            w, w2 = w_cur[i], allowed[i][idx[i] - 1]
            d = w - w2
            saved = m[i] * d
            if saved <= 0:  # marginals only decrease: this group never saves anything again
                continue
            fresh = (prefix[i][w] - prefix[i][w2]) / saved
            if heap and fresh > heap[0][0]:
                push(heap, (fresh, i))  # stale and no longer the cheapest
                continue
            idx[i] -= 1
            w_cur[i] = w2
            cur -= saved
            for j, c in adj[i]:
                m[j] -= c * d
            if idx[i] > 0:
                w3 = allowed[i][idx[i] - 1]
                saved = m[i] * (w2 - w3)
                if saved > 0:
                    push(heap, ((prefix[i][w2] - prefix[i][w3]) / saved, i))
        cur = exact_cost()  # drop the incremental rounding
        if cur <= budget or not heap:
            break

    # ---- refill: best importance-per-cost next-wider step that still fits, lazily re-evaluated
    slack = budget - cur
    heap = []
    for i in range(n):
        if idx[i] < len(allowed[i]) - 1:
            heap.append((-_gain_ratio(prefix[i], m[i], w_cur[i], allowed[i][idx[i] + 1]), i))
    heapq.heapify(heap)
    added: list[tuple[int, int, int]] = []  # (group position, old width, new width) for an exact-cost undo
    while heap and slack > 0:
        _, i = pop(heap)
        w, w2 = w_cur[i], allowed[i][idx[i] + 1]
        d = w2 - w
        add = m[i] * d
        gain = prefix[i][w2] - prefix[i][w]
        if add > slack or gain <= 0:  # marginals only grow and slack only shrinks: never fits later
            continue
        fresh = _gain_ratio(prefix[i], m[i], w, w2)
        if heap and fresh < -heap[0][0]:
            push(heap, (-fresh, i))
            continue
        idx[i] += 1
        w_cur[i] = w2
        slack -= add
        added.append((i, w, w2))
        for j, c in adj[i]:
            m[j] += c * d
        if idx[i] < len(allowed[i]) - 1:
            push(heap, (-_gain_ratio(prefix[i], m[i], w2, allowed[i][idx[i] + 1]), i))
    # Incremental rounding may have let the last addition exceed the budget by an ulp: undo until exact.
    while added and exact_cost() > budget:
        i, w, _ = added.pop()
        w_cur[i] = w

    return projection_from_widths(cost, importance, dict(zip(red.groups, w_cur)), orders)


def _gain_ratio(prefix: list[float], marginal: float, w: int, w2: int) -> float:
    gain = prefix[w2] - prefix[w]
    add = marginal * (w2 - w)
    return gain / add if add > 0 else float("inf")
