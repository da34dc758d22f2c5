"""Weighted sparse projection: the 0/1 knapsack behind energy-constrained unstructured pruning.

    min ‖W − V‖²  s.t.  Σ_j c_j·[W_j ≠ 0] ≤ C

keeps W_j = V_j on a support S and zero elsewhere; the best S maximises Σ_{j∈S} V_j² under Σ_{j∈S} c_j ≤ C,
a 0/1 knapsack with profit p_j = V_j² and weight c_j. The greedy answer used here is the canonical one:

    order items by ratio r_j = p_j / c_j, descending, ties by index ascending (r = +inf when c_j = 0 < p_j,
    r = 0 when p_j = 0); keep the longest prefix of that order whose cost sum is ≤ C.

It is within one item of the optimum: the LP relaxation is that prefix plus a fraction of the next item k,
so OPT − greedy ≤ p_k ≤ max_j p_j. Global across layers, so layers with expensive weights lose more.

Two implementations of the same answer:

* `greedy_sorted` — a full sort, cumulative sum and cut, O(N log N): the reference;
* `greedy_knapsack` — a threshold search, O(N): since r ≥ 0, the IEEE-754 bit pattern of r is monotone in r
  and its top bits are a histogram of log2(r) (exponent + leading mantissa bits, 2^16 bins over the range
  present). A cost-weighted histogram and a cumulative sum over the bins find the one bin where the cut
  falls; bins above it are kept, bins below dropped, and only the items of that bin are refined (again by
  histogram while it is large, then by a sort). Ties and zeros fall into the same bins as in the sorted
  order, so the answer is identical whenever the cost sums are exact in float64 (e.g. integer costs below
  2^53, as the energy model's are with integer unit energies); with arbitrary float costs the cut can
  differ from the sort's by rounding of the running sums at the boundary item.

A *minimum support* (`reserved=`) is kept outside the knapsack: its items are paid from the capacity first
and the greedy above fills the rest (wsp reserves a few weights of every layer so that no layer is emptied).

Numpy only (the torch side passes `.numpy()` views of CPU tensors).
"""

from __future__ import annotations

import numpy as np

_BITS = 16  # histogram bins per level: 2^16
_SMALL = 1 << 15  # sort directly below this many candidates


def _check(a: np.ndarray, what: str) -> None:
    """Non-negative and finite, in two reductions (NaN propagates through max)."""
    if a.size and not (float(a.min()) >= 0 and np.isfinite(a.max())):
        raise ValueError(f"{what} must be finite and non-negative")


def _as_arrays(profit, cost) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(profit, dtype=np.float64).reshape(-1)
    c = np.asarray(cost, dtype=np.float64).reshape(-1)
    if p.shape != c.shape:
        raise ValueError(f"profit and cost must have the same size ({p.size} vs {c.size})")
    _check(p, "profits")
    _check(c, "costs")
    return p, c


def ratios(profit: np.ndarray, cost: np.ndarray, *, square: bool = False) -> np.ndarray:
    """r_j = p_j / c_j as a new float64 array, r = +inf for free items with a profit and r = 0 for p = 0.
    With `square`, `profit` holds values V and p = V² (computed in float64, exact for float32 V)."""
    r = np.empty(profit.shape, dtype=np.float64)
    if square:
        np.multiply(profit, profit, out=r, dtype=np.float64)
    else:
        r[...] = profit
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(r, cost, out=r)
    if cost.size and float(cost.min()) == 0:
        r[np.isnan(r)] = 0.0  # 0/0: no profit, no cost
    return r


def greedy_sorted(profit, cost, capacity: float) -> np.ndarray:
    """The canonical greedy by a full (stable) sort: a boolean keep-mask."""
    p, c = _as_arrays(profit, cost)
    keep = np.zeros(p.size, dtype=bool)
    if p.size == 0 or capacity < 0:
        return keep
    bits = ratios(p, c).view(np.int64)
    order = np.argsort(-bits, kind="stable")
    cum = np.cumsum(c[order])
    keep[order[: int(np.searchsorted(cum, capacity, side="right"))]] = True
    return keep


def greedy_knapsack(profit, cost, capacity: float) -> np.ndarray:
    """The canonical greedy by threshold search (same answer as `greedy_sorted`): a boolean keep-mask."""
    p, c = _as_arrays(profit, cost)
    if p.size == 0 or capacity < 0:
        return np.zeros(p.size, dtype=bool)
    return _threshold(ratios(p, c), c, float(capacity), lambda ids: ratios(p[ids], c[ids]))


def _threshold(r: np.ndarray, c: np.ndarray, remaining: float, ratio_of) -> np.ndarray:
    """The greedy's keep-mask from ratios `r` (overwritten) and costs; `ratio_of(ids)` recomputes ratios."""
    n = r.size
    bins = r.view(np.int64)  # r ≥ 0: the bit pattern is monotone in r
    keep: np.ndarray | None = None
    ids: np.ndarray | None = None  # None: every item is a candidate (no index array of size N)
    ccost = c
    while ccost.size > _SMALL:
        lo, hi = int(bins.min()), int(bins.max())
        if lo == hi:
            break  # all tied: index order decides
        shift = max(0, (hi - lo).bit_length() - _BITS)
        np.subtract(bins, lo, out=bins)
        if shift:
            np.right_shift(bins, shift, out=bins)
        nb = ((hi - lo) >> shift) + 1
        cum = np.cumsum(np.bincount(bins, weights=ccost, minlength=nb)[::-1])  # cost of the top 1, 2, … bins
        k = int(np.searchsorted(cum, remaining, side="right"))  # top bins that fit entirely
        if k >= nb:  # all candidates fit (possible through rounding only)
            keep = _mark(keep, n, ids, slice(None))
            return keep
        crit = nb - 1 - k
        if k:
            remaining -= float(cum[k - 1])
        keep = _mark(keep, n, ids, bins > crit)
        inside = np.flatnonzero(bins == crit)
        ids = inside if ids is None else ids[inside]
        ccost = ccost[inside]
        bins = ratio_of(ids).view(np.int64)
    if keep is None:
        keep = np.zeros(n, dtype=bool)
    if ids is None:
        ids = np.arange(n)
    order = np.argsort(-bins, kind="stable")  # candidates are in index order: ties keep it
    cum = np.cumsum(ccost[order])
    keep[ids[order[: int(np.searchsorted(cum, remaining, side="right"))]]] = True
    return keep


def _mark(keep: np.ndarray | None, n: int, ids: np.ndarray | None, selector) -> np.ndarray:
    if ids is None:
        if keep is None and not isinstance(selector, slice):
            return selector  # the first level's comparison is the keep-mask itself
        keep = np.zeros(n, dtype=bool) if keep is None else keep
        keep[selector] = True
        return keep
    keep = np.zeros(n, dtype=bool) if keep is None else keep
    keep[ids[selector]] = True
    return keep


def _reserve(reserved, c: np.ndarray, capacity: float) -> tuple[np.ndarray | None, np.ndarray, float]:
    """Take the reserved items out of the knapsack: (their mask, costs with theirs set to 0, the capacity left).
    Zero-cost items do not move any cumulative cost sum, so the greedy cut of the other items is exactly the one
    it would make without the reserved items at the reduced capacity."""
    if reserved is None:
        return None, c, capacity
    res = np.asarray(reserved, dtype=bool).reshape(-1)
    if res.size != c.size:
        raise ValueError(f"reserved and costs must have the same size ({res.size} vs {c.size})")
    if not res.any():
        return None, c, capacity
    return res, np.where(res, 0.0, c), float(capacity) - float(c[res].sum())


def project(values, cost, capacity: float, *, exact_sort: bool = False,
            reserved=None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sparse projection of `values` (any shape): (projected values, boolean keep-mask), profit V².

    `reserved` (boolean, same size): items kept whatever their ratio — a minimum support — whose costs are
    paid first; the knapsack fills what is left of the capacity (nothing more when they exceed it)."""
    v = np.asarray(values)
    flat = v.reshape(-1)
    c = np.asarray(cost, dtype=np.float64).reshape(-1)
    if c.size != flat.size:
        raise ValueError(f"values and costs must have the same size ({flat.size} vs {c.size})")
    if flat.size and not np.isfinite(flat.max() - flat.min()):
        raise ValueError("values must be finite")
    _check(c, "costs")
    res, c, capacity = _reserve(reserved, c, capacity)
    if exact_sort:
        keep = greedy_sorted(np.square(flat.astype(np.float64)), c, capacity)
    elif flat.size == 0 or capacity < 0:
        keep = np.zeros(flat.size, dtype=bool)
    else:
        keep = _threshold(ratios(flat, c, square=True), c, float(capacity),
                          lambda ids: ratios(flat[ids], c[ids], square=True))
    if res is not None:
        keep = keep | res
    keep = keep.reshape(v.shape)
    return np.where(keep, v, np.zeros((), dtype=v.dtype)), keep


def knapsack(profit, cost, capacity: float, *, reserved=None) -> np.ndarray:
    """The canonical greedy (threshold search) for arbitrary non-negative profits: a boolean keep-mask.
    `reserved` items are kept first and paid from the capacity, as in `project` (which is this with
    profit = V²)."""
    p, c = _as_arrays(profit, cost)
    res, c, capacity = _reserve(reserved, c, capacity)
    if p.size == 0 or capacity < 0:
        keep = np.zeros(p.size, dtype=bool)
    else:
        keep = _threshold(ratios(p, c), c, float(capacity), lambda ids: ratios(p[ids], c[ids]))
    return keep if res is None else keep | res


def greedy_value(profit, cost, capacity: float) -> tuple[float, float, float]:
    """(greedy profit, greedy cost, profit of the critical item — the first one the greedy leaves out)."""
    p, c = _as_arrays(profit, cost)
    keep = greedy_knapsack(p, c, capacity)
    order = np.argsort(-ratios(p, c).view(np.int64), kind="stable")
    k = int(keep.sum())
    critical = float(p[order[k]]) if k < p.size else 0.0
    return float(p[keep].sum()), float(c[keep].sum()), critical


def prefix_by_score(score, cost, capacity: float, *, reserved=None) -> np.ndarray:
    """Keep the longest prefix of the items ordered by `score` (descending, ties by index) whose cost sum is
    ≤ capacity — e.g. global magnitude pruning cut at an energy budget (order by |V|, pay c_j). `reserved`
    items are kept first and paid from the capacity, as in `project`."""
    s, c = _as_arrays(score, cost)
    res, c, capacity = _reserve(reserved, c, capacity)
    if s.size == 0 or capacity < 0:
        keep = np.zeros(s.size, dtype=bool)
    else:
        keep = _threshold(s.copy(), c, float(capacity), lambda ids: s[ids].copy())
    return keep if res is None else keep | res
