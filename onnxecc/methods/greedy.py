"""Method `greedy` (NetAdapt-style, `baselines.greedy`): shrink one group at a time with a short fine-tune after
each step; each step's epoch comes out of the common training budget."""

from __future__ import annotations

from onnxecc.methods.base import Context, Method, Selection
from onnxecc.methods.baselines import greedy


class Greedy(Method):
    name = "greedy"
    needs_data = True

    def select(self, problem, target, ctx: Context) -> Selection:
        keep, log = greedy(problem, ctx.mm, target, emit=ctx.emit)  # resumable: see its "greedy" frame
        return Selection(keep, [{"phase": "greedy", **e} for e in log], epochs_spent=len(log))
