"""What a model's output is, read from the original's outputs: class scores along an axis (logits, or
probabilities that a softmax in the graph already made), or a map/regression with no class axis.

Distillation, importance, greedy's candidate scoring and the agreement every report prints all compare an output
with the original's, and the right comparison depends on this: a text recogniser's N×T×C per-step
probabilities are compared class by class at every step (KL, top-1 per step), a detector's N×1×H×W score map by
its squared error. Treating the recogniser's probabilities as a map (mean squared error over 6625 classes that
are nearly all zero) trains almost nothing; taking argmax(1) of the map calls every model perfect.

numpy only: the ONNX side (`validate`) uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxecc.core.errors import UserError

PROBABILITY_TOLERANCE = 1e-3  # |Σ p − 1| along the axis, float32 softmax sums are off by ~1e-6


@dataclass(frozen=True)
class OutputKind:
    """`class_axis`: the axis of class scores (None: a map or a regression); `probabilities`: the scores are
    already a softmax along it (non-negative, summing to 1), so their log is the logits up to a constant."""

    class_axis: int | None
    probabilities: bool = False

    def top1(self, out: np.ndarray) -> np.ndarray:
        """The best class at every position (N, or N×T for per-step scores)."""
        return np.asarray(out).argmax(self.class_axis)

    def agreement(self, a: np.ndarray, b: np.ndarray) -> float | None:
        """Fraction of positions where two outputs pick the same class; None without a class axis."""
        if self.class_axis is None:
            return None
        return float((self.top1(a) == self.top1(b)).mean())

    def describe(self) -> str:
        if self.class_axis is None:
            return "no class axis: matched by relative squared error"
        what = "probabilities" if self.probabilities else "scores"
        return f"class {what} along axis {self.class_axis}"


def output_kind(reference: np.ndarray, class_axis: int | None = None) -> OutputKind:
    """The kind of output `reference` (the original model's outputs on the data, N×...) is; `class_axis`
    (--class-axis) names the axis of class scores where detection cannot know it, e.g. N×T×C logits per step.

    Probabilities along an axis of size ≥ 2 (every entry ≥ 0, every sum along it within 1e-3 of 1) are class
    probabilities, the last such axis winning (per-step scores put classes last). Otherwise an N×C output with
    C ≥ 2 is class scores (logits). Anything else — N×1×H×W maps, N×T×C logits, N×1 regressions — has no
    class axis we can know of."""
    ref = np.asarray(reference)
    if class_axis is not None:
        return _given_axis(ref, class_axis)
    if ref.ndim >= 2 and np.issubdtype(ref.dtype, np.floating) and ref.size and np.isfinite(ref).all() \
            and ref.min() >= 0:
        for axis in range(ref.ndim - 1, 0, -1):
            if ref.shape[axis] >= 2 and np.abs(ref.sum(axis=axis) - 1).max() <= PROBABILITY_TOLERANCE:
                return OutputKind(axis, probabilities=True)
    if ref.ndim == 2 and ref.shape[1] >= 2:
        return OutputKind(1)
    return OutputKind(None)


def class_axis_index(axis: int, shape: tuple[int | None, ...]) -> int:
    """--class-axis as an axis of an output of `shape` (batch first, None: a size not known yet), from 1; a
    negative axis counts from the end. One line naming the option when the output has no such axis."""
    positive = axis + len(shape) if axis < 0 else axis
    if not 1 <= positive < len(shape) or (shape[positive] or 2) < 2:
        dims = "×".join("?" if d is None else str(d) for d in shape)
        raise UserError(f"--class-axis {axis}: the model's output is {dims} (batch first); give an axis from 1 to "
                        f"{len(shape) - 1} of size ≥ 2, or leave --class-axis out to detect it")
    return positive


def declared_shape(proto) -> tuple[int | None, ...] | None:
    """The first output's shape as the graph declares it (the output the comparisons read; a size None: symbolic
    or unknown); None when the graph does not declare its rank."""
    tensor = proto.graph.output[0].type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)


def _given_axis(ref: np.ndarray, axis: int) -> OutputKind:
    """The kind with the user's class axis; probabilities when they are ones."""
    positive = class_axis_index(axis, ref.shape)
    sums = ref.sum(axis=positive) if ref.size else np.ones(1)
    probabilities = bool(ref.size and ref.min() >= 0 and np.abs(sums - 1).max() <= PROBABILITY_TOLERANCE)
    return OutputKind(positive, probabilities=probabilities)


def fidelity(kind: OutputKind, out: np.ndarray, reference: np.ndarray, labels: np.ndarray | None = None) -> float:
    """How well `out` matches, higher is better, in [0, 1]: accuracy on `labels` when given, else top-1 agreement
    with `reference` along the class axis, else 1 / (1 + relative squared error) for outputs without one (a
    score that orders candidates the way their error does and stays positive, as greedy's ratio needs)."""
    if labels is not None:
        return float((kind.top1(out) == labels).mean())
    if kind.class_axis is not None:
        return kind.agreement(out, reference)
    return 1.0 / (1.0 + relative_error(out, reference))


def relative_error(out: np.ndarray, reference: np.ndarray) -> float:
    """‖out − reference‖² / ‖reference‖², in float64: how far an output moved, comparable across models."""
    ref = np.asarray(reference, dtype=np.float64)
    return float(np.sum((np.asarray(out, dtype=np.float64) - ref) ** 2) / max(float(np.sum(ref ** 2)), 1e-30))
