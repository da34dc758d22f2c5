"""The `--budget` grammar and human formatting of costs.

A budget is either relative or absolute:

* relative: a bare number in (0, 1] (``0.3``) or a percentage (``30%``, ``150%`` is allowed and means "no
  pruning needed") — a fraction of the original model's cost under the chosen metric;
* absolute, with a unit that must agree with the metric:
    - counts (metric ``macs`` or ``params``): ``120M``, ``1.2G``, ``300k``, ``4500`` (a bare number above 1),
      optionally followed by the metric's name (``120M MACs``, ``300k params``);
    - latency (seconds internally): ``5ms``, ``250us``, ``0.01s``, ``80ns``;
    - energy (joules internally): ``8mJ``, ``2.5J``, ``500uJ``, ``40nJ``.

Internally latency is in seconds and energy in joules; `format_cost` turns them back into short strings
(``1.49G MACs``, ``11.7M params``, ``3.21 ms``, ``8 mJ``) that `parse_budget` reads again.

ONNX side: numpy-free even, no torch/cvxpy.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from onnxecc.core.errors import UserError

METRICS = ("macs", "params", "latency", "energy")

# unit text -> (dimension, multiplier)
_COUNT_UNITS = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}
_ENERGY_UNITS = {"J": 1.0, "kJ": 1e3, "mJ": 1e-3, "uJ": 1e-6, "µJ": 1e-6, "μJ": 1e-6, "nJ": 1e-9}

_DIMENSION_OF_METRIC = {"macs": "count", "params": "count", "latency": "time", "energy": "energy"}
_METRIC_WORDS = {"mac": "macs", "macs": "macs", "param": "params", "params": "params", "parameters": "params"}

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_BUDGET_RE = re.compile(
    rf"^\s*(?P<num>{_NUMBER})\s*(?P<unit>[A-Za-zµμ%]*?)\s*(?P<word>macs?|params?|parameters)?\s*$",
    re.IGNORECASE,
)

_EXAMPLES = {
    "macs": "0.3, 30%, 120M or 1.2G",
    "params": "0.3, 30%, 300k or 1.5M",
    "latency": "0.3, 30%, 5ms, 250us or 0.01s",
    "energy": "0.3, 30%, 8mJ, 500uJ or 2.5J",
}
_ABS_EXAMPLE = {"count": "120M", "time": "5ms", "energy": "8mJ"}
_METRIC_FOR_DIMENSION = {"count": "macs or params", "time": "latency", "energy": "energy"}


def _unit(unit: str) -> tuple[str, float] | None:
    """(dimension, multiplier) of a unit string, or None if unknown. Prefixes are case-sensitive
    (m = milli, M = mega); the base letter of joules may be written j."""
    if unit in _COUNT_UNITS:
        return "count", _COUNT_UNITS[unit]
    if unit in _TIME_UNITS:
        return "time", _TIME_UNITS[unit]
    if unit.endswith("j") and unit[:-1] + "J" in _ENERGY_UNITS:
        unit = unit[:-1] + "J"
    if unit in _ENERGY_UNITS:
        return "energy", _ENERGY_UNITS[unit]
    return None


def _check_metric(metric: str) -> str:
    m = str(metric).strip().lower()
    if m not in METRICS:
        raise UserError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    return m


@dataclass(frozen=True)
class Budget:
    """A parsed budget: exactly one of `fraction` (of the original's cost) and `absolute` is set."""

    text: str
    metric: str
    fraction: float | None = None
    absolute: float | None = None

    @property
    def is_relative(self) -> bool:
        return self.fraction is not None

    def resolve(self, original_cost: float) -> float:
        """The absolute target (in the metric's internal unit) for a model whose cost is `original_cost`."""
        if self.fraction is not None:
            return float(self.fraction) * float(original_cost)
        assert self.absolute is not None
        return float(self.absolute)

    def describe(self, original_cost: float) -> str:
        """One human line, e.g. '30% of 148.6M MACs = 44.6M MACs'."""
        target = self.resolve(original_cost)
        orig = format_cost(original_cost, self.metric)
        if self.fraction is not None:
            return f"{_percent(self.fraction)} of {orig} = {format_cost(target, self.metric)}"
        rel = f"{_percent(target / original_cost)} of {orig}" if original_cost > 0 else f"original {orig}"
        return f"{format_cost(target, self.metric)} ({rel})"


def _percent(fraction: float) -> str:
    p = 100.0 * fraction
    if abs(p) >= 10:
        return f"{p:.0f}%" if abs(p - round(p)) < 0.05 else f"{p:.1f}%"
    return f"{p:.2g}%"


def parse_budget(text: str, metric: str) -> Budget:
    """Parse a `--budget` value for `metric` ('macs', 'params', 'latency' or 'energy').

    Raises `UserError` (one line, with valid examples) for malformed text, non-positive or non-finite values,
    and units that disagree with the metric.
    """
    metric = _check_metric(metric)
    raw = "" if text is None else str(text)
    examples = _EXAMPLES[metric]
    m = _BUDGET_RE.match(raw)
    if m is None:
        raise UserError(
            f"cannot read budget {raw.strip()!r}: write a fraction of the original cost or a value with a unit, "
            f"e.g. --budget {examples}"
        )
    value = float(m.group("num"))
    unit = m.group("unit")
    word = m.group("word")
    if not math.isfinite(value):
        raise UserError(f"budget {raw.strip()!r} is not a finite number: use e.g. --budget {examples}")
    if value <= 0:
        raise UserError(f"budget {raw.strip()!r} must be positive: use e.g. --budget {examples}")

    if unit == "%":
        if word:
            raise UserError(f"cannot read budget {raw.strip()!r}: a percentage takes no unit, e.g. --budget 30%")
        return Budget(text=raw.strip(), metric=metric, fraction=value / 100.0)

    parsed = _unit(unit)
    if parsed is None:
        raise UserError(
            f"unknown unit {unit!r} in budget {raw.strip()!r}: use e.g. --budget {examples} "
            f"(k/M/G counts, s/ms/us/ns, J/mJ/uJ/nJ)"
        )
    dimension, mult = parsed
    want = _DIMENSION_OF_METRIC[metric]

    if word:  # '120M MACs', '300k params'
        word_metric = _METRIC_WORDS[word.lower()]
        if dimension != "count":
            raise UserError(f"cannot read budget {raw.strip()!r}: write e.g. --budget {examples}")
        if word_metric != metric:
            raise UserError(
                f"budget {raw.strip()!r} counts {word_metric} but the metric is {metric}: "
                f"use --metric {word_metric} or a budget like {examples}"
            )

    if dimension == "count" and unit == "" and not word:
        # a bare number: a fraction in (0, 1], an absolute count above 1 for count metrics
        if value <= 1.0:
            return Budget(text=raw.strip(), metric=metric, fraction=value)
        if want != "count":
            raise UserError(
                f"budget {raw.strip()!r} has no unit: for metric {metric} write a fraction in (0, 1] "
                f"or a value with a unit, e.g. --budget {examples}"
            )

    if dimension != want:
        kind = {"count": "a plain count", "time": "a latency", "energy": "an energy"}[dimension]
        raise UserError(
            f"budget {raw.strip()!r} is {kind} but the metric is {metric}: use --metric "
            f"{_METRIC_FOR_DIMENSION[dimension]} for it, or a budget like {examples} for metric {metric}"
        )
    absolute = value * mult
    if not math.isfinite(absolute) or absolute <= 0:
        raise UserError(f"budget {raw.strip()!r} is out of range: use e.g. --budget {examples}")
    return Budget(text=raw.strip(), metric=metric, absolute=absolute)


# ----------------------------------------------------------------------------------------------- formatting

_COUNT_LADDER = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")]
_TIME_LADDER = [(1.0, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns")]
_ENERGY_LADDER = [(1.0, "J"), (1e-3, "mJ"), (1e-6, "uJ"), (1e-9, "nJ")]


def _digits(v: float) -> str:
    """2 decimals below 10, 1 decimal from 10, trailing zeros dropped (1.49, 11.7, 148.6, 8, 120)."""
    text = f"{v:.2f}" if abs(v) < 9.995 else f"{v:.1f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _scaled(value: float, ladder: list[tuple[float, str]]) -> tuple[str, str]:
    a = abs(value)
    for i, (scale, prefix) in enumerate(ladder):
        if a >= scale * (1 - 5e-4) or i == len(ladder) - 1:
            v = value / scale
            # rounding may carry into the next prefix (999.96k -> 1000.0k): step up instead
            if i > 0 and abs(float(_digits(v))) >= 1000:
                scale, prefix = ladder[i - 1]
                v = value / scale
            if i == len(ladder) - 1 and 0 < abs(v) < 0.005:
                return f"{v:.3g}", prefix
            return _digits(v), prefix
    raise AssertionError("unreachable")


def format_cost(value: float, metric: str) -> str:
    """Short human form: '1.49G MACs', '11.7M params', '3.21 ms', '8 mJ' (parseable by `parse_budget`)."""
    metric = _check_metric(metric)
    value = float(value)
    if not math.isfinite(value):
        return f"{value} {_suffix(metric)}"
    if metric in ("macs", "params"):
        word = "MACs" if metric == "macs" else "params"
        if abs(value) < 999.5:
            num = f"{value:.0f}" if abs(value - round(value)) < 1e-9 or abs(value) >= 100 else _digits(value)
            return f"{num} {word}"
        num, prefix = _scaled(value, _COUNT_LADDER)
        return f"{num}{prefix} {word}"
    if value == 0:
        return "0 s" if metric == "latency" else "0 J"
    ladder = _TIME_LADDER if metric == "latency" else _ENERGY_LADDER
    num, prefix = _scaled(value, ladder)
    return f"{num} {prefix}"


def _suffix(metric: str) -> str:
    return {"macs": "MACs", "params": "params", "latency": "s", "energy": "J"}[metric]
