"""ECC's online phase: train under the cost constraint with ADMM (CVPR'19), torch side.

    min loss(W)  s.t.  cost(widths(W)) ≤ B
    W-step: epochs of Adam on loss(W) + ρ/2·‖W − Z + U‖²           (only the constrained tensors)
    Z-step: Z = structured projection of W + U onto {cost ≤ B_k}    (the knapsack of onnxecc.projection)
            in the metric of the diagonal Fisher F at W: a unit is worth Σ F·(W+U)², the loss its removal
            costs to second order, so units of different layers are compared in the same currency
    U-step: U ← U + W − Z;  ρ ← ρ·growth
with the budget B_k decaying geometrically from the original cost to the target over the first iterations,
so the network is pulled towards the constraint gradually rather than cut at once. The caller then makes a
hard projection of W (feasible by construction) and fine-tunes with the masks frozen.

How the W-step treats the quadratic term (`w_step`):
- "prox" (default): Adam steps on the loss alone, each followed by the exact proximal step of the quadratic,
  W ← (W + ρ·(Z − U)) / (1 + ρ), on the coordinates Z zeroes. Adam's step is bounded by its learning rate
  whatever the gradient, so as a loss term the pull could not move a weight of size 1 to zero in a few epochs:
  measured on digits_resdw, ‖W‖² outside Z's support stayed at 50% and the primal gap grew 1.3k → 7.5k over
  5 iterations, while the prox form ends at 1% and 35. The kept coordinates are free in the constraint set;
  anchoring them to their value at the last Z-step (what the full proximal step does) slowed learning there
  (digits_resdw @ latency 0.5: 97.8% vs 99.4% after fine-tuning, seed 0), so they are left to the loss.
- "penalty": the quadratic added to the loss and differentiated (the textbook form).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from onnxecc import checkpoint, distributed
from onnxecc.masked import MaskedModel
from onnxecc.problem import Problem
from onnxecc.projection import project


@dataclass
class AdmmConfig:
    iterations: int = 5
    epochs_per_iteration: int = 2
    rho: float = 2.5e-3  # defaults chosen on a validation split of the training data (bench `tune`)
    rho_growth: float = 2.0
    decay_iterations: int = 4  # B_k reaches the target after this many iterations
    lr: float | None = None  # W-step learning rate (None: the fine-tuning rate)
    verify: bool = False  # debug: solve every Z-step exactly too (cvxpy MILP; small models only), log the gap
    importance: str = "fisher"  # Z-step metric: "fisher" (Σ F·(W+U)², loss units) or "l2" (normalised ‖W+U‖²)
    w_step: str = "prox"  # how the W-step applies ρ/2‖W − Z + U‖²: "prox" or "penalty" (see the module docstring)

    @property
    def epochs(self) -> int:
        return self.iterations * self.epochs_per_iteration


def budget_schedule(original: float, target: float, k: int, decay_iterations: int) -> float:
    """Geometric decay from the original cost to the target: B_k = original·(target/original)^((k+1)/K)."""
    if k + 1 >= decay_iterations:
        return target
    return original * (target / original) ** ((k + 1) / decay_iterations)


def admm(problem: Problem, mm: MaskedModel, target: float, config: AdmmConfig, emit=None) -> list[dict]:
    """Run the ADMM iterations on `mm` in place; returns a log per iteration (budget, ρ, widths, gap)."""
    emit = emit or (lambda kind, info: None)
    names = [n for n in problem.producer_tensors() if n in mm.tm.params]
    constrained = sorted(_masked_names(problem, mm))
    tensors = {n: mm.tensor(n) for n in constrained}
    u = {n: torch.zeros_like(t) for n, t in tensors.items()}
    z = {n: t.detach().clone() for n, t in tensors.items()}
    rho = {"value": config.rho}
    log: list[dict] = []
    checks: list[dict] = []

    def z_step(budget: float) -> dict[int, np.ndarray]:
        with torch.no_grad():
            v = {n: tensors[n] + u[n] for n in constrained}
        # several processes (onnxecc.distributed): rank 0 projects, every rank gets its keep sets and checks them
        keep = distributed.on_main(lambda: z_keep(v, budget))
        distributed.check_same(keep, "ADMM Z-step keep sets")
        masks = mm.torch_masks(keep)
        for n in constrained:
            z[n] = v[n].detach() * masks[n] if n in masks else v[n].detach().clone()
        return keep

    def z_keep(v: dict[str, torch.Tensor], budget: float) -> dict[int, np.ndarray]:
        onnx_values = {n: mm.tm.layouts[n].to_onnx(v[n]) if n in mm.tm.layouts else v[n].detach().numpy()
                       for n in names if n in v}
        fisher = mm.fisher(names) if config.importance == "fisher" else None
        importance = problem.importance(onnx_values, fisher=fisher)
        proj = project(problem.cost, importance, budget, min_width=problem.min_width, round_to=problem.round_to,
                       fmt=problem.fmt)
        if config.verify:
            from onnxecc.exact import solve_exact

            exact = solve_exact(problem.cost, importance, budget, problem.min_width, problem.round_to)
            checks.append({"greedy": proj.kept_importance, "exact": exact.kept_importance,
                           "gap": (exact.kept_importance - proj.kept_importance) / max(exact.kept_importance, 1e-30),
                           "greedy_feasible": proj.cost <= budget * (1 + 1e-12)})
        return problem.variables.group_keep(proj.keep)

    def penalty() -> torch.Tensor:
        total = 0.0
        for n in constrained:
            total = total + (tensors[n] - z[n] + u[n]).pow(2).sum()
        return 0.5 * rho["value"] * total

    def prox(step: int, total: int) -> None:
        """Exact proximal step of ρ/2‖W − Z + U‖² on the coordinates Z zeroes (a convex combination)."""
        tau = rho["value"] / (1 + rho["value"])
        with torch.no_grad():
            for n in constrained:
                off = z[n] == 0
                tensors[n][off] = (1 - tau) * tensors[n][off] + tau * (z[n] - u[n])[off]

    if config.w_step not in ("prox", "penalty"):
        raise ValueError(f"unknown ADMM W-step '{config.w_step}': prox or penalty")
    original = problem.original_cost
    ck = checkpoint.current()  # interrupt and resume (issue 9): the W-step in progress, with U, Z and ρ
    saved = ck.take("admm") if ck is not None else None
    first = 0
    if saved is not None:
        first = saved["k"]
        for n in constrained:
            u[n], z[n] = saved["u"][n].to(u[n].dtype), saved["z"][n].to(z[n].dtype)
        rho["value"] = saved["rho"]
        log[:], checks[:] = saved["log"], saved["checks"]
    now = {"k": first, "keep": None}
    state = lambda: {"k": now["k"], "keep": checkpoint.keep_to_plain(now["keep"]), "u": u, "z": z,  # noqa: E731
                     "rho": rho["value"], "log": log, "checks": checks}
    with checkpoint.frame("admm", state):
        for k in range(first, config.iterations):
            budget = budget_schedule(original, target, k, config.decay_iterations)
            if saved is not None and k == first:  # resumed inside this iteration's W-step: Z is restored
                keep = checkpoint.keep_from_plain(saved["keep"])
            else:
                keep = z_step(budget)
            now.update(k=k, keep=keep)
            emit("stage", {"name": f"admm {k + 1}/{config.iterations}"})
            if config.w_step == "penalty":
                history = mm.train(config.epochs_per_iteration, emit, penalty=penalty, lr=config.lr,
                                   phase=f"admm {k + 1}/{config.iterations}")
            else:
                history = mm.train(config.epochs_per_iteration, emit, lr=config.lr, after_step=prox,
                                   phase=f"admm {k + 1}/{config.iterations}")
            with torch.no_grad():
                gap, outside, total = 0.0, 0.0, 0.0
                for n in constrained:
                    u[n] += tensors[n] - z[n]
                    gap += float((tensors[n] - z[n]).pow(2).sum())
                    outside += float(tensors[n].pow(2)[z[n] == 0].sum())
                    total += float(tensors[n].pow(2).sum())
            log.append({"iteration": k + 1, "budget": budget, "rho": rho["value"], "primal_gap": gap,
                        "pruned_energy": outside / max(total, 1e-30),  # share of ‖W‖² outside Z's support
                        "widths": {int(g): int(len(idx)) for g, idx in keep.items()},
                        "loss": history[-1]["loss"] if history else None,
                        **({"zstep_check": checks[-1]} if checks else {})})
            rho["value"] *= config.rho_growth
    return log


def _masked_names(problem: Problem, mm: MaskedModel) -> list[str]:
    """Every trained tensor that carries channels of a prunable group (what a projection may zero)."""
    everything = {g: np.arange(problem.graph.groups[g].size)[:0] for g in
                  {problem.variables.group[v] for v in problem.prunable}}
    return list(mm.torch_masks(everything))
