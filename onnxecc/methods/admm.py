"""ECC's online phase: train under the cost constraint with ADMM (CVPR'19), torch side.

    min loss(W)  s.t.  cost(widths(W)) ≤ B
    W-step: epochs of Adam on loss(W) + ρ/2·‖W − Z + U‖²           (only the constrained tensors)
    Z-step: Z = structured projection of W + U onto {cost ≤ B_k}    (the knapsack of onnxecc.optimize.projection)
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

Why ρ₀ follows the length of the W-step (`--rho auto`, the default): the prox step shrinks the coordinates Z zeroes
by 1/(1+ρ) after every Adam step, so one W-step of S steps pulls them by (1+ρ)^S, and the same ρ is a different
subproblem on a different number of samples, batch size or epochs per iteration. The W-step should solve the same
subproblem however many optimizer steps it is given, so `auto` fixes the pull per W-step: ρ₀ = 2.5e-3 at 46 steps
(digits' 1438 training images at batch 64 × 2 epochs, the setting `make demo` and the digits benches run; bench
`tune` chose 2.5e-3 at 36 steps, within its grid's factor 2) and (1+2.5e-3)^(46/S) − 1 at S steps. Measured
(issue 27, PaddleOCR PP-OCRv4 at MACs 0.3, validation split, 3 seeds): the detector (1 step per W-step) reached an
F-score of 49.5 % with the unscaled 2.5e-3 and 58.3 % with auto (ρ₀ 0.12); the recogniser (2 steps) read 15.6 %
of the characters unscaled (33.9 / 3.4 / 9.6 by seed) and 3.4 % with auto, where every method breaks it.
A number given to `--rho` is ρ₀ per Adam step, as written (the textbook parameter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from onnxecc.optimize.problem import Problem
from onnxecc.optimize.projection import project
from onnxecc.train import checkpoint, distributed
from onnxecc.train.masked import MaskedModel


@dataclass
class AdmmConfig:
    iterations: int = 5
    epochs_per_iteration: int = 2
    rho: float | None = None  # ρ₀ per Adam step; None: the pull of RHO_REFERENCE per W-step (`reference_rho`)
    rho_growth: float = 2.0
    decay_iterations: int = 4  # B_k reaches the target after this many iterations
    lr: float | None = None  # W-step learning rate (None: the fine-tuning rate)
    verify: bool = False  # debug: solve every Z-step exactly too (cvxpy MILP; small models only), log the gap
    importance: str = "fisher"  # Z-step metric: "fisher" (Σ F·(W+U)², loss units) or "l2" (normalised ‖W+U‖²)
    w_step: str = "prox"  # how the W-step applies ρ/2‖W − Z + U‖²: "prox" or "penalty" (see the module docstring)

    @property
    def epochs(self) -> int:
        return self.iterations * self.epochs_per_iteration


RHO_REFERENCE = 2.5e-3  # ρ₀ per Adam step at REFERENCE_STEPS, chosen on a validation split of the training data
REFERENCE_STEPS = 46  # Adam steps of one W-step there: digits' 1438 training images at batch 64 (23) × 2 epochs


def reference_rho(steps: int) -> float:
    """ρ₀ per Adam step that pulls as hard over a W-step of `steps` steps as RHO_REFERENCE does over
    REFERENCE_STEPS: (1+ρ)^steps = (1+RHO_REFERENCE)^REFERENCE_STEPS (see the module docstring)."""
    if steps == REFERENCE_STEPS:  # exactly, not to 1 ulp: digits' runs keep the ρ₀ they were measured with
        return RHO_REFERENCE
    return math.expm1(REFERENCE_STEPS / steps * math.log1p(RHO_REFERENCE))


def budget_schedule(original: float, target: float, k: int, decay_iterations: int) -> float:
    """Geometric decay from the original cost to the target: B_k = original·(target/original)^((k+1)/K)."""
    if k + 1 >= decay_iterations:
        return target
    return original * (target / original) ** ((k + 1) / decay_iterations)


class AdmmVariables:
    """ADMM's variables besides the weights: Z (the last projection) and U (the scaled dual) of each constrained
    tensor, by name.

    Every operation takes the weights as they are now and first moves Z and U to each weight's device: training
    moves the model to its device for every W-step (CUDA under --device auto, `finetune.pick_device`) and back
    to the CPU after it, so the penalty and the prox step run where the weights train and the Z- and U-steps
    where they rest, and no step mixes devices."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        with torch.no_grad():
            self.u = {n: torch.zeros_like(w) for n, w in weights.items()}
            self.z = {n: w.detach().clone() for n, w in weights.items()}

    def _follow(self, weights: dict[str, torch.Tensor]) -> None:
        for held in (self.u, self.z):
            for n, t in held.items():
                if t.device != weights[n].device:
                    held[n] = t.to(weights[n].device)

    def shifted(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """W + U (detached): what the Z-step projects."""
        self._follow(weights)
        with torch.no_grad():
            return {n: weights[n].detach() + self.u[n] for n in self.u}

    def set_z(self, v: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
        """Z ← V with the units `masks` zero (0/1 tensors in torch layout, on any device; absent: all kept)."""
        for n, value in v.items():
            self.z[n] = value * masks[n].to(value.device, value.dtype) if n in masks else value.clone()

    def penalty(self, weights: dict[str, torch.Tensor], rho: float) -> torch.Tensor:
        """ρ/2‖W − Z + U‖², differentiable in W (the "penalty" W-step)."""
        self._follow(weights)
        total = 0.0
        for n, w in weights.items():
            total = total + (w - self.z[n] + self.u[n]).pow(2).sum()
        return 0.5 * rho * total

    def prox(self, weights: dict[str, torch.Tensor], rho: float) -> None:
        """Exact proximal step of ρ/2‖W − Z + U‖² on the coordinates Z zeroes (a convex combination), in place."""
        self._follow(weights)
        tau = rho / (1 + rho)
        with torch.no_grad():
            for n, w in weights.items():
                z, u = self.z[n], self.u[n]
                w.copy_(torch.where(z == 0, (1 - tau) * w + tau * (z - u), w))

    def dual_step(self, weights: dict[str, torch.Tensor]) -> tuple[float, float, float]:
        """U ← U + W − Z. Returns the primal gap ‖W − Z‖², ‖W‖² outside Z's support, and ‖W‖²."""
        self._follow(weights)
        gap, outside, total = 0.0, 0.0, 0.0
        with torch.no_grad():
            for n, w in weights.items():
                z = self.z[n]
                self.u[n] += w - z
                gap += float((w - z).pow(2).sum())
                outside += float(w.pow(2)[z == 0].sum())
                total += float(w.pow(2).sum())
        return gap, outside, total


def admm(problem: Problem, mm: MaskedModel, target: float, config: AdmmConfig, emit=None) -> list[dict]:
    """Run the ADMM iterations on `mm` in place; returns a log per iteration (budget, ρ, widths, gap)."""
    emit = emit or (lambda kind, info: None)
    names = [n for n in problem.producer_tensors() if n in mm.tm.params]
    constrained = sorted(_masked_names(problem, mm))
    tensors = {n: mm.tensor(n) for n in constrained}
    variables = AdmmVariables(tensors)
    u, z = variables.u, variables.z  # the same dicts (the checkpoint saves and restores them)
    rho = {"value": config.rho if config.rho is not None else
           reference_rho(mm.steps_per_epoch() * config.epochs_per_iteration)}
    log: list[dict] = []
    checks: list[dict] = []

    def z_step(budget: float) -> dict[int, np.ndarray]:
        v = variables.shifted(tensors)
        # several processes (onnxecc.train.distributed): rank 0 projects, every rank gets its keep sets and checks them
        keep = distributed.on_main(lambda: z_keep(v, budget))
        distributed.check_same(keep, "ADMM Z-step keep sets")
        variables.set_z(v, mm.torch_masks(keep))
        return keep

    def z_keep(v: dict[str, torch.Tensor], budget: float) -> dict[int, np.ndarray]:
        onnx_values = {n: mm.tm.layouts[n].to_onnx(v[n]) if n in mm.tm.layouts else v[n].detach().cpu().numpy()
                       for n in names if n in v}
        fisher = mm.fisher(names) if config.importance == "fisher" else None
        importance = problem.importance(onnx_values, fisher=fisher)
        proj = project(problem.cost, importance, budget, min_width=problem.min_width, round_to=problem.round_to,
                       fmt=problem.fmt)
        if config.verify:
            from onnxecc.optimize.exact import solve_exact

            exact = solve_exact(problem.cost, importance, budget, problem.min_width, problem.round_to)
            checks.append({"greedy": proj.kept_importance, "exact": exact.kept_importance,
                           "gap": (exact.kept_importance - proj.kept_importance) / max(exact.kept_importance, 1e-30),
                           "greedy_feasible": proj.cost <= budget * (1 + 1e-12)})
        return problem.variables.group_keep(proj.keep)

    def penalty() -> torch.Tensor:
        return variables.penalty(tensors, rho["value"])

    def prox(step: int, total: int) -> None:
        variables.prox(tensors, rho["value"])

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
            gap, outside, total = variables.dual_step(tensors)
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
