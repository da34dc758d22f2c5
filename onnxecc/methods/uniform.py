"""Method `uniform`: the same keep ratio in every prunable group (`baselines.uniform_keep`), a baseline."""

from __future__ import annotations

from onnxecc.methods.base import Context, Method, Selection
from onnxecc.methods.baselines import uniform_keep


class Uniform(Method):
    name = "uniform"

    def project(self, problem, target):
        return uniform_keep(problem, target)

    def select(self, problem, target, ctx: Context) -> Selection:
        return Selection(uniform_keep(problem, target))
