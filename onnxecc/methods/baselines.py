"""Baselines in the same code path as ECC, so comparisons are fair (same data, epochs, masks, export).

- `uniform`: the same keep ratio in every prunable group (the largest that meets the budget), channels
  ranked by the L1 norm of their filters.
- `greedy` (NetAdapt-style): repeatedly shrink the single group whose pruning loses the least accuracy per
  unit of cost saved, with a short fine-tune after each step.
"""

from __future__ import annotations

import numpy as np

from onnxecc.core.errors import UserError
from onnxecc.optimize.problem import Problem
from onnxecc.train import checkpoint


def uniform_widths(problem: Problem, target: float) -> dict[int, int]:
    """Largest common keep ratio r (bisection) with every prunable variable at its allowed width ≤ r·size."""

    def widths(r: float) -> dict[int, int]:
        out = {}
        for v in problem.prunable:
            allowed = problem.allowed(v)
            fit = allowed[allowed <= max(r * problem.cost.full_widths[v], allowed[0])]
            out[v] = int(fit[-1])
        return out

    lo, hi = 0.0, 1.0
    if problem.cost(widths(lo)) > target:
        raise UserError(f"budget {problem.fmt(target)} is below the smallest reachable cost "
                        f"{problem.fmt(problem.cost(widths(lo)))} of uniform pruning: raise the budget")
    for _ in range(50):
        mid = (lo + hi) / 2
        if problem.cost(widths(mid)) <= target:
            lo = mid
        else:
            hi = mid
    return widths(lo)


def uniform_keep(problem: Problem, target: float) -> dict[int, np.ndarray]:
    importance = problem.importance(norm="l1", diminishing=False)
    return problem.keep_from_widths(uniform_widths(problem, target), importance)


def greedy(problem: Problem, mm, target: float, steps: int = 5, short_epochs: int = 1, emit=None
           ) -> tuple[dict[int, np.ndarray], list[dict]]:
    """NetAdapt-style: `steps` rounds, each removing ~1/steps of the cost to cut, from the one variable whose
    cut costs the least on held-out training samples (measured on the masked model, no fine-tuning per candidate):
    accuracy on labels, else agreement with the original along the class axis, else its relative squared error
    (`outputs.fidelity`; the log's `val_score`)."""
    emit = emit or (lambda kind, info: None)
    importance = problem.importance(norm="l1", diminishing=False)
    widths = {v: problem.cost.full_widths[v] for v in problem.prunable}
    x_val, ref_val, y_val = _validation_split(mm)
    original = problem.original_cost
    per_step = (original - target) / steps
    log = []
    step = 0
    # interrupt and resume (issue 9): the step being fine-tuned, the widths chosen so far (its own included),
    # its choice and the log; the weights, optimizer and batch position come back from the training loop
    ck = checkpoint.current()
    saved = ck.take("greedy") if ck is not None else None
    now = {"choice": None}
    state = lambda: {"step": step, "widths": dict(widths), "choice": now["choice"], "log": log}  # noqa: E731
    if saved is not None:
        step, log = int(saved["step"]), list(saved["log"])
        widths = {int(v): int(w) for v, w in saved["widths"].items()}
    with checkpoint.frame("greedy", state):
        while saved is not None or problem.cost(widths) > target * (1 + 1e-12):
            if saved is not None:  # resumed inside this step's fine-tuning: its choice is already made
                v, w, acc = saved["choice"]["variable"], saved["choice"]["width"], saved["choice"]["val_score"]
                saved = None
                mm.set_keep(problem.keep_from_widths(widths, importance))  # the loop restores the weights
            else:
                step += 1
                v, w, acc = _choose(problem, mm, widths, importance, max(target, problem.cost(widths) - per_step),
                                    target, x_val, ref_val, y_val)
                widths[v] = w
            now["choice"] = {"variable": v, "width": w, "val_score": acc}
            emit("stage", {"name": f"greedy step {step}"})
            mm.train(short_epochs, emit, phase=f"greedy step {step}")
            log.append({"step": step, "variable": v, "width": w, "val_score": acc, "cost": problem.cost(widths)})
            now["choice"] = None
    return problem.keep_from_widths(widths, importance), log


def _choose(problem: Problem, mm, widths: dict[int, int], importance, goal: float, target: float, x_val, ref_val,
            y_val) -> tuple[int, int, float]:
    """The variable to shrink this step, its new width and the masked model's validation accuracy with it; the
    model is left masked with that choice, from the weights it had."""
    current = problem.cost(widths)
    best = None
    state = mm.state()  # masking zeroes weights: every candidate starts from the same weights
    for v in problem.prunable:
        candidate = _width_for(problem, widths, v, goal)
        if candidate is None or candidate == widths[v]:
            continue
        trial = {**widths, v: candidate}
        saved = current - problem.cost(trial)
        mm.load_state(state)
        mm.set_keep(problem.keep_from_widths(trial, importance))
        acc = mm.fidelity(x_val, ref_val, y_val)
        reaches = problem.cost(trial) <= goal * (1 + 1e-12)
        score = (reaches, acc / max(saved, 1e-30) if not reaches else acc)
        if best is None or score > best[0]:
            best = (score, v, candidate, acc)
    if best is None:
        raise UserError(f"greedy pruning cannot reach {problem.fmt(target)}: raise the budget")
    mm.load_state(state)
    mm.set_keep(problem.keep_from_widths({**widths, best[1]: best[2]}, importance))
    return best[1], best[2], best[3]


def _width_for(problem: Problem, widths: dict[int, int], v: int, goal: float) -> int | None:
    """Largest allowed width of `v` (below its current one) that brings the cost to `goal`, else its minimum."""
    allowed = problem.allowed(v)
    allowed = allowed[allowed < widths[v]]
    if not len(allowed):
        return None
    for w in allowed[::-1]:
        if problem.cost({**widths, v: int(w)}) <= goal * (1 + 1e-12):
            return int(w)
    return int(allowed[0])


def _validation_split(mm) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The last 20% of the training data (never the test split) scores candidates: its inputs, the original's
    outputs on them and its labels (None without: candidates are then scored against the original's outputs)."""
    x = mm.data.x_train
    n = max(1, len(x) // 5)
    y = mm.data.y_train[-n:] if mm.data.y_train is not None else None
    return x[-n:], mm.teacher[-n:], y
