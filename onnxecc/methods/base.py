"""The interface every compression method implements, so that `compress` runs any of them the same way and a new
method is one module (plus its line in `methods.registry` and a test).

A method chooses which channels to keep under the cost model (`select`); `compress` owns everything around it —
the closed loop, the shared fine-tuning tail (recalibration, learning-rate probe, fine-tuning with the masks
frozen), the write-back and the measurement — so that every method gets the same data, epochs and export and
the comparison between them is fair. A method with a pipeline of its own (`wsp`: unstructured pruning for an
accelerator model) sets `own_pipeline` and supplies `run` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from onnxecc.methods.options import CompressOptions
from onnxecc.optimize.problem import Problem


@dataclass
class Context:
    """What a method may use besides the problem and the target: the training data, the options, the progress
    callback and the masked torch model the fine-tuning tail trains (`train.masked.MaskedModel`)."""

    data: object
    opts: CompressOptions
    emit: Callable[[str, dict], None]
    mm: object  # MaskedModel (torch side); the selection trains it in place
    fisher: bool  # channel importance by the loss's Fisher information (needs data), else weight norms


@dataclass
class Selection:
    """A method's choice: kept units per group, its history entries (each with its "phase"), and the epochs of
    the common training budget it spent (the fine-tuning tail trains the rest)."""

    keep: dict[int, np.ndarray]
    log: list[dict] = field(default_factory=list)
    epochs_spent: int = 0


class Method:
    """One compression method, registered by `name` (`methods.registry.METHODS`)."""

    name: str = ""
    needs_data: bool = False  # trains while it selects: --data required
    phase: str = ""  # its phase in the training checkpoint and history (default: `name`)
    own_pipeline: bool = False  # runs its own pipeline (`run`) instead of `select` inside compress's

    def project(self, problem: Problem, target: float) -> dict[int, np.ndarray]:
        """The keep sets without training (no data, or 0 epochs): only methods that do not need data."""
        raise NotImplementedError(f"method {self.name} has no selection without training")

    def select(self, problem: Problem, target: float, ctx: Context) -> Selection:
        """The keep sets at `target`, training `ctx.mm` as the method needs."""
        raise NotImplementedError(f"method {self.name} does not select inside compress's pipeline")
