"""The --budget grammar: relative and absolute budgets, unit/metric agreement, one-line errors, formatting."""

from __future__ import annotations

import math

import pytest

from onnxecc.core.errors import UserError
from onnxecc.cost.budget import Budget, format_cost, parse_budget


@pytest.mark.parametrize(
    "text, metric, fraction",
    [
        ("0.3", "macs", 0.3),
        ("30%", "macs", 0.3),
        (" 30 % ", "params", 0.3),
        ("12.5%", "latency", 0.125),
        ("0.25", "energy", 0.25),
        (".5", "latency", 0.5),
        ("1", "macs", 1.0),
        ("1.0", "energy", 1.0),
        ("150%", "energy", 1.5),  # above the original: met without pruning
        ("3e-1", "params", 0.3),
        ("0.3", "MACs", 0.3),  # metric names are case-insensitive
    ],
)
def test_relative_budgets(text, metric, fraction):
    b = parse_budget(text, metric)
    assert b.fraction == pytest.approx(fraction)
    assert b.absolute is None
    assert b.is_relative
    assert b.metric == metric.lower()
    assert b.resolve(200.0) == pytest.approx(200.0 * fraction)


@pytest.mark.parametrize(
    "text, metric, absolute",
    [
        ("120M", "macs", 120e6),
        ("1.2G", "macs", 1.2e9),
        ("300k", "params", 300e3),
        ("300K", "params", 300e3),
        ("2T", "macs", 2e12),
        ("4500", "params", 4500.0),  # a bare number above 1 is a count
        ("1.5e6", "macs", 1.5e6),
        ("120M MACs", "macs", 120e6),
        ("120MMACs", "macs", 120e6),
        ("300k params", "params", 300e3),
        ("1.5 Mparams", "params", 1.5e6),
        ("5ms", "latency", 5e-3),
        ("5 ms", "latency", 5e-3),
        ("250us", "latency", 250e-6),
        ("250µs", "latency", 250e-6),
        ("0.01s", "latency", 0.01),
        ("80ns", "latency", 80e-9),
        ("8mJ", "energy", 8e-3),
        ("8mj", "energy", 8e-3),
        ("2.5J", "energy", 2.5),
        ("500uJ", "energy", 500e-6),
        ("500µJ", "energy", 500e-6),
        ("40nJ", "energy", 40e-9),
    ],
)
def test_absolute_budgets(text, metric, absolute):
    b = parse_budget(text, metric)
    assert b.absolute == pytest.approx(absolute, rel=1e-12)
    assert b.fraction is None
    assert not b.is_relative
    assert b.text == text.strip()
    assert b.resolve(1.0) == pytest.approx(absolute, rel=1e-12)  # the original cost is irrelevant


def _one_line_error(text, metric) -> str:
    with pytest.raises(UserError) as info:
        parse_budget(text, metric)
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "text, metric, unit_word, metric_word",
    [
        ("5ms", "energy", "latency", "energy"),
        ("8mJ", "macs", "energy", "macs"),
        ("8mJ", "latency", "energy", "latency"),
        ("120M", "latency", "count", "latency"),
        ("300k", "energy", "count", "energy"),
        ("0.01s", "params", "latency", "params"),
    ],
)
def test_unit_disagreeing_with_metric(text, metric, unit_word, metric_word):
    msg = _one_line_error(text, metric)
    assert unit_word in msg and metric_word in msg
    assert "--metric" in msg  # says what to do


def test_count_word_disagreeing_with_metric():
    msg = _one_line_error("300k params", "macs")
    assert "params" in msg and "macs" in msg and "--metric params" in msg


@pytest.mark.parametrize("text", ["0", "0%", "-0.3", "-5ms", "0ms"])
def test_non_positive(text):
    metric = "latency" if "ms" in text else "macs"
    msg = _one_line_error(text, metric)
    assert "positive" in msg and "e.g." in msg


@pytest.mark.parametrize(
    "text",
    [
        "nan",
        "NaN",
        "inf",
        "-inf",
        "1e400",
        "",
        "   ",
        "abc",
        "0.3.1",
        "5 m",
        "5 mm",
        "--0.3",
        "30%%",
        "30% MACs",
        "5ms MACs",
        "1,5",
        "ms",
        "5 parsecs",
        None,
    ],
)
def test_malformed(text):
    msg = _one_line_error(text, "latency" if text and "ms" in str(text) else "macs")
    assert "e.g." in msg or "--budget" in msg  # an example of valid syntax


def test_bare_number_above_one_needs_a_unit_for_latency_and_energy():
    for metric, example in [("latency", "5ms"), ("energy", "8mJ")]:
        msg = _one_line_error("5", metric)
        assert "unit" in msg and example in msg


def test_unknown_metric():
    msg = _one_line_error("0.3", "flops")
    assert "flops" in msg and "macs" in msg and "latency" in msg


def test_errors_give_metric_specific_examples():
    assert "5ms" in _one_line_error("abc", "latency")
    assert "8mJ" in _one_line_error("abc", "energy")
    assert "120M" in _one_line_error("abc", "macs")
    assert "300k" in _one_line_error("abc", "params")


def test_resolve_and_describe_relative():
    b = parse_budget("0.3", "macs")
    assert b.resolve(148.6e6) == pytest.approx(44.58e6)
    assert b.describe(148.6e6) == "30% of 148.6M MACs = 44.6M MACs"
    assert parse_budget("30%", "macs").describe(148.6e6) == "30% of 148.6M MACs = 44.6M MACs"
    assert parse_budget("50%", "latency").describe(6.42e-3) == "50% of 6.42 ms = 3.21 ms"


def test_resolve_and_describe_absolute():
    b = parse_budget("5ms", "latency")
    assert b.resolve(20e-3) == pytest.approx(5e-3)
    assert b.describe(20e-3) == "5 ms (25% of 20 ms)"
    assert parse_budget("8mJ", "energy").describe(32e-3) == "8 mJ (25% of 32 mJ)"
    assert parse_budget("300k", "params").describe(11.7e6) == "300k params (2.6% of 11.7M params)"


def test_budget_is_a_plain_dataclass():
    b = Budget(text="0.5", metric="macs", fraction=0.5)
    assert b.resolve(10) == 5
    assert b == parse_budget("0.5", "macs")


@pytest.mark.parametrize(
    "value, metric, text",
    [
        (1.49e9, "macs", "1.49G MACs"),
        (148.6e6, "macs", "148.6M MACs"),
        (120e6, "macs", "120M MACs"),
        (11.7e6, "params", "11.7M params"),
        (300e3, "params", "300k params"),
        (812, "macs", "812 MACs"),
        (0, "params", "0 params"),
        (999.96e3, "macs", "1M MACs"),  # rounding carries into the next prefix
        (3.21e-3, "latency", "3.21 ms"),
        (0.25, "latency", "250 ms"),
        (12.5, "latency", "12.5 s"),
        (250e-6, "latency", "250 us"),
        (8e-3, "energy", "8 mJ"),
        (2.5, "energy", "2.5 J"),
        (500e-6, "energy", "500 uJ"),
        (0, "latency", "0 s"),
    ],
)
def test_format_cost(value, metric, text):
    assert format_cost(value, metric) == text


@pytest.mark.parametrize(
    "metric, value",
    [(m, v) for m in ("macs", "params") for v in (1.0, 7.0, 42.0, 999.0, 1234.0, 5.67e5, 1.49e9, 2.2e13)]
    + [(m, v) for m in ("latency", "energy") for v in (1.0, 7.0, 999.0, 3.3e-3, 2.5e-7, 8e-10, 4.2e-5)],
)
def test_format_cost_parses_back(metric, value):
    text = format_cost(value, metric)
    back = parse_budget(text, metric)
    target = back.absolute if back.absolute is not None else back.fraction
    assert math.isclose(target, value, rel_tol=6e-3), (text, target, value)
