"""The constrained problem every method solves: which channels to keep so that cost(widths) ≤ budget.

It bundles what the methods share — channel groups, width variables, the cost model, the prunable
variables, the projection options — so that `ecc`, `project`, `uniform` and `greedy` differ only in how
they choose the kept channels and train the weights (ONNX side: numpy only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from onnxecc.cost.costs import BilinearCost, Variables
from onnxecc.graph.channels import ChannelGraph
from onnxecc.optimize.importance import l2_importance
from onnxecc.optimize.projection import Projection, allowed_widths, project


@dataclass
class Problem:
    proto: onnx.ModelProto
    graph: ChannelGraph
    variables: Variables
    cost: BilinearCost
    prunable: list[int]  # prunable variables
    min_width: int = 1
    round_to: int = 1
    fmt: Callable[[float], str] = str

    @property
    def original_cost(self) -> float:
        return self.cost(None)

    def importance(self, values: Mapping[str, np.ndarray] | None = None, norm: str = "l2",
                   diminishing: bool = True, fisher: Mapping[str, np.ndarray] | None = None) -> dict[int, np.ndarray]:
        """Per prunable variable: importance of each of its units (see `onnxecc.optimize.importance`)."""
        per_group = l2_importance(self.proto, self.graph, values=values, norm=norm, diminishing=diminishing,
                                  fisher=fisher)
        return {v: per_group[self.variables.group[v]][self.variables.units[v]] for v in self.prunable}

    def project(self, target: float, values: Mapping[str, np.ndarray] | None = None,
                fisher: Mapping[str, np.ndarray] | None = None) -> tuple[dict[int, np.ndarray], Projection]:
        """Kept units per *group* meeting `target`, and the projection (per variable) that chose them."""
        proj = project(self.cost, self.importance(values, fisher=fisher), target, min_width=self.min_width,
                       round_to=self.round_to, fmt=self.fmt)
        return self.variables.group_keep(proj.keep), proj

    def keep_from_widths(self, widths: dict[int, int], importance: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Kept units per group when each variable keeps its `widths[v]` most important units."""
        keep = {v: np.sort(np.argsort(-importance[v], kind="stable")[:w]) for v, w in widths.items()}
        return self.variables.group_keep(keep)

    def allowed(self, v: int) -> np.ndarray:
        return allowed_widths(self.cost.full_widths[v], self.min_width, self.round_to,
                              self.cost.channels_per_unit.get(v, 1))

    def producer_tensors(self) -> list[str]:
        """Tensors whose values decide the importance of prunable channels."""
        groups = {self.variables.group[v] for v in self.prunable}
        return sorted({b.name for b in self.graph.binds if b.role == "producer"
                       and set(np.unique(b.pos.gid).tolist()) & groups})
