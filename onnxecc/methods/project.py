"""Method `project`: the structured projection alone (the knapsack of `optimize.projection`), channels ranked by
Fisher importance with data, else by weight norms; the fine-tuning tail then recovers accuracy."""

from __future__ import annotations

from onnxecc.methods.base import Context, Method, Selection
from onnxecc.train import distributed


class Project(Method):
    name = "project"

    def project(self, problem, target):
        return problem.project(target)[0]

    def select(self, problem, target, ctx: Context) -> Selection:
        return Selection(distributed.on_main(lambda: problem.project(
            target, fisher=ctx.mm.fisher(problem.producer_tensors()) if ctx.fisher else None)[0]))
