"""Cost models: one form, several sources.

Every cost onnxecc budgets — MACs, parameters, and (later) profiled latency/energy — is a *bilinear
polynomial in the channel-group widths*:

    cost(w) = constant + Σ_t coef_t · w[a_t] · w[b_t]

where a term may name one group (linear: biases, BatchNorm, depthwise convs) or none (constant). MACs of a
conv are exactly (kept in) × (kept out) × k×k×H×W / groups, so this form is exact for MACs and params, and it
is ECC's bilinear energy model when the coefficients are fitted. Keeping one form means one projection, one
report, and the same numbers in numpy (reporting) and torch (training, on soft widths).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Term:
    coef: float
    a: int | None = None  # group id, or None for a factor of 1
    b: int | None = None


@dataclass
class BilinearCost:
    """cost(w) = constant + Σ coef·w[a]·w[b]; `w` maps group id → kept channels (missing → full width)."""

    metric: str
    unit: str
    full_widths: dict[int, int]
    terms: list[Term] = field(default_factory=list)
    constant: float = 0.0

    def __call__(self, widths: dict[int, float] | None = None) -> float:
        widths = widths or {}
        total = self.constant
        for t in self.terms:
            total += t.coef * self._w(widths, t.a) * self._w(widths, t.b)
        return float(total)

    def _w(self, widths, g):
        if g is None:
            return 1.0
        return widths.get(g, self.full_widths[g])

    def marginal(self, widths: dict[int, float], group: int) -> float:
        """Cost removed per channel taken out of `group` (exact: the cost is linear in each single width)."""
        total = 0.0
        for t in self.terms:
            if t.a == group and t.b == group:
                raise ValueError("a term squares one group; the model is bilinear in distinct groups only")
            if t.a == group:
                total += t.coef * self._w(widths, t.b)
            elif t.b == group:
                total += t.coef * self._w(widths, t.a)
        return total

    def torch_cost(self, widths: dict):
        """Differentiable cost on torch width tensors (e.g. sums of soft channel masks)."""
        total = self.constant
        for t in self.terms:
            total = total + t.coef * self._w(widths, t.a) * self._w(widths, t.b)
        return total

    @property
    def groups(self) -> list[int]:
        return sorted(self.full_widths)

    def neighbours(self) -> dict[int, set[int]]:
        """Groups whose marginal cost changes when a group shrinks (for lazy heap re-evaluation)."""
        out: dict[int, set[int]] = {g: set() for g in self.full_widths}
        for t in self.terms:
            if t.a is not None and t.b is not None:
                out[t.a].add(t.b)
                out[t.b].add(t.a)
        return out

    def as_dict(self) -> dict:
        return {
            "metric": self.metric, "unit": self.unit, "constant": self.constant,
            "full_widths": {str(k): v for k, v in self.full_widths.items()},
            "terms": [[t.coef, t.a, t.b] for t in self.terms],
        }

    def vectorized(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(coef, a, b) arrays with -1 for a missing group: fast evaluation of many width vectors."""
        coef = np.array([t.coef for t in self.terms], dtype=np.float64)
        a = np.array([-1 if t.a is None else t.a for t in self.terms], dtype=np.int64)
        b = np.array([-1 if t.b is None else t.b for t in self.terms], dtype=np.int64)
        return coef, a, b
