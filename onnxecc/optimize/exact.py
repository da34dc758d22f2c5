"""Exact (mixed-integer) solutions of the projection subproblems, for checking the fast greedies.

Training side: imports cvxpy, solver HiGHS (bundled with cvxpy through `highspy`). Never on the hot path —
tests, benchmarks and a `--verify-projection` style debug option only. Small instances only.

* `solve_exact` — the structured channel projection of `onnxecc.optimize.projection.project`, as a MILP:
  one-hot binaries y[g, k] pick one allowed width per prunable group; the objective is the prefix sum of g's
  sorted importances at that width (keeping the most important channels is optimal for a fixed width).
  Each bilinear term c·w_a·w_b becomes c·Σ_k Σ_l k·l·p[a,b,k,l] with p ≥ 0 linearising y[a,k]·y[b,l].
  We use the transportation form Σ_l p[k,l] = y[a,k], Σ_k p[k,l] = y[b,l]: for one-hot y it forces
  p = y_a y_bᵀ exactly and its LP relaxation is much tighter than the McCormick inequality
  p ≥ y[a,k] + y[b,l] − 1 (which is also exact here because c ≥ 0 and the cost is only bounded above).
* `exact_knapsack` — the plain 0/1 knapsack (unstructured weighted sparse projection checks).
* `greedy_vs_exact_gaps` — relative gaps of the greedy on random small instances (benchmarks, tests).
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np

from onnxecc.cost.costs import BilinearCost, Term

from .projection import (
    Projection,
    _check_options,
    allowed_widths,
    check_reachable,
    importance_order,
    project,
    projection_from_widths,
    reduce_cost,
)

SOLVER = "HIGHS"
# Solve to proven optimality (HiGHS' default relative MIP gap is 1e-4) with tight feasibility.
_HIGHS_OPTIONS = {"output_flag": False, "mip_rel_gap": 0.0, "mip_abs_gap": 1e-12, "mip_feasibility_tolerance": 1e-9}


def _solver() -> str:
    if SOLVER in cp.installed_solvers():
        return SOLVER
    mip = [s for s in ("SCIP", "GUROBI", "CPLEX", "MOSEK", "CBC", "GLPK_MI", "SCIPY") if s in cp.installed_solvers()]
    if not mip:
        raise RuntimeError("no mixed-integer solver for cvxpy is installed (expected HiGHS via highspy)")
    return mip[0]


def _solve(problem: cp.Problem) -> None:
    solver = _solver()
    opts = _HIGHS_OPTIONS if solver == "HIGHS" else {}
    problem.solve(solver=solver, **opts)
    if problem.status not in (cp.OPTIMAL,):
        raise RuntimeError(f"exact solver {solver} ended with status {problem.status}")


def solve_exact(
    cost: BilinearCost,
    importance: dict[int, np.ndarray],
    budget: float,
    min_width: int = 1,
    round_to: int = 1,
    *,
    fmt=str,
) -> Projection:
    """The optimal structured projection (same contract and result type as `projection.project`)."""
    _check_options(min_width, round_to)
    orders = importance_order(cost, importance)
    budget = float(budget)
    if budget >= float(cost(None)):
        return projection_from_widths(cost, importance, {}, orders)
    check_reachable(cost, orders, budget, min_width=min_width, round_to=round_to, fmt=fmt)
    red = reduce_cost(cost, orders)
    allowed = [allowed_widths(s, min_width, round_to, cost.channels_per_unit.get(g, 1))
               for s, g in zip(red.full, red.groups)]
    values = [orders[g][1][a] for g, a in zip(red.groups, allowed)]
    # normalise the constraint so the solver's absolute tolerances are relative to the budget
    scale = max(abs(budget), 1e-300)

    ys = [cp.Variable(len(a), boolean=True) for a in allowed]
    cons = [cp.sum(y) == 1 for y in ys]
    lin_expr = 0.0
    for i, (y, a) in enumerate(zip(ys, allowed)):
        if red.linear[i] != 0:
            lin_expr = lin_expr + (red.linear[i] / scale) * (a.astype(float) @ y)
    for i, j, c in zip(red.pair_i, red.pair_j, red.pair_coef):
        if c == 0:
            continue
        ai, aj = allowed[i], allowed[j]
        p = cp.Variable((len(ai), len(aj)), nonneg=True)
        cons += [cp.sum(p, axis=1) == ys[i], cp.sum(p, axis=0) == ys[j]]
        lin_expr = lin_expr + cp.sum(cp.multiply((c / scale) * np.outer(ai, aj).astype(float), p))
    # and the objective to O(1): importances in loss units (Fisher) can be ~1e-6, below the solver's tolerances
    vscale = max((float(np.max(np.abs(v))) for v in values if len(v)), default=1.0) or 1.0
    objective = cp.Maximize(sum((v / vscale) @ y for v, y in zip(values, ys)) if ys else cp.Constant(0.0))

    # Re-solve with a slightly tighter row if the solver's tolerance let a hair-infeasible point through.
    slack = 0.0
    for _ in range(4):
        row = [lin_expr <= (budget - red.constant) / scale - slack]
        problem = cp.Problem(objective, cons + row)
        _solve(problem)
        widths = {g: int(a[int(np.argmax(y.value))]) for g, a, y in zip(red.groups, allowed, ys)}
        result = projection_from_widths(cost, importance, widths, orders)
        if result.cost <= budget + 1e-12 * abs(budget):
            return result
        slack = max(2 * slack, 1e-9)
    raise RuntimeError("exact solver kept returning budget-violating solutions")


def exact_knapsack(values, weights, capacity: float) -> tuple[np.ndarray, float]:
    """0/1 knapsack: max values·x s.t. weights·x ≤ capacity, x binary. Returns (boolean mask, objective)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if values.shape != weights.shape:
        raise ValueError("values and weights must have the same length")
    if values.size == 0:
        return np.zeros(0, dtype=bool), 0.0
    x = cp.Variable(values.size, boolean=True)
    problem = cp.Problem(cp.Maximize(values @ x), [weights @ x <= float(capacity)])
    _solve(problem)
    mask = np.asarray(x.value) > 0.5
    # the solver's tolerance could admit a hair-infeasible mask; drop the worst-ratio item until it fits
    while weights[mask].sum() > capacity and mask.any():
        cand = np.flatnonzero(mask)
        mask[cand[np.argmin(values[cand] / np.maximum(weights[cand], 1e-300))]] = False
    return mask, float(values[mask].sum())


# ------------------------------------------------------------------------------- random test instances


def random_instance(rng: np.random.Generator, *, max_groups: int = 5, max_channels: int = 8):
    """A small random projection problem: (cost, importance) with 2–max_groups prunable groups of
    2–max_channels channels, a random chain or branching graph of positive bilinear terms (like conv
    layers between groups), positive linear terms (biases, BatchNorm, depthwise), a fixed input group and
    a constant."""
    n = int(rng.integers(2, max_groups + 1))
    full = {g: int(rng.integers(2, max_channels + 1)) for g in range(n)}
    fixed = n  # e.g. the image channels: not prunable
    full[fixed] = int(rng.integers(1, 4))
    terms = [Term(float(rng.uniform(0.5, 5.0)), fixed, 0)]
    for g in range(1, n):
        # chain (previous group) or branch (any earlier group: residual/skip-like fan-out)
        src = g - 1 if rng.random() < 0.6 else int(rng.integers(0, g))
        terms.append(Term(float(rng.uniform(0.5, 5.0)), src, g))
    if n >= 3 and rng.random() < 0.4:  # an extra long-range term (concat / second consumer)
        a, b = sorted(rng.choice(n, size=2, replace=False).tolist())
        terms.append(Term(float(rng.uniform(0.1, 3.0)), a, b))
    for g in range(n):
        if rng.random() < 0.7:
            terms.append(Term(float(rng.uniform(0.0, 4.0)), g, None))
    cost = BilinearCost("macs", "MACs", full, terms, constant=float(rng.uniform(0, 5)))
    importance = {g: rng.gamma(1.5, 1.0, size=full[g]) for g in range(n)}
    return cost, importance


def max_step_importance(cost: BilinearCost, importance: dict[int, np.ndarray], min_width=1, round_to=1) -> float:
    """The largest importance a single greedy step can remove (the greedy's additive error scale)."""
    best = 0.0
    for g, (_, prefix) in importance_order(cost, importance).items():
        a = allowed_widths(cost.full_widths[g], min_width, round_to, cost.channels_per_unit.get(g, 1))
        if len(a) > 1:
            best = max(best, float(np.max(np.diff(prefix[a]))))
    return best


def greedy_vs_exact_gaps(n_instances: int, seed: int, *, round_to_choices=(1, 2), min_width: int = 1) -> list[float]:
    """Relative gaps (exact − greedy) / exact of the kept importance on random small instances with random
    budgets between the smallest reachable and the full cost."""
    rng = np.random.default_rng(seed)
    gaps = []
    for _ in range(n_instances):
        cost, imp = random_instance(rng)
        r = int(rng.choice(round_to_choices))
        lo = float(cost(dict(_min_widths(cost, imp, min_width, r))))
        hi = float(cost(None))
        budget = lo + float(rng.uniform(0.0, 1.0)) * (hi - lo)
        g = project(cost, imp, budget, min_width=min_width, round_to=r)
        e = solve_exact(cost, imp, budget, min_width=min_width, round_to=r)
        gaps.append((e.kept_importance - g.kept_importance) / e.kept_importance if e.kept_importance else 0.0)
    return gaps


def _min_widths(cost, importance, min_width, round_to):
    return {g: int(allowed_widths(cost.full_widths[g], min_width, round_to, cost.channels_per_unit.get(g, 1))[0])
            for g in importance}
