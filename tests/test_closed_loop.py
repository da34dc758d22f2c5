"""Closed-loop guarantee: a latency budget is checked by measurement; a wrong model is corrected or refused."""

from __future__ import annotations

import json

import pytest
from conftest import DEMO_MODELS, REPO

from onnxecc.compress import CompressOptions, compress

PROFILE = REPO / "profiles" / "digits_cnn.cpu.json"


def _optimistic_profile(tmp_path, constant_scale: float):
    """The shipped profile with its fixed cost shrunk: it then believes pruning saves more than it does —
    the kind of model error the measurement must catch."""
    data = json.loads(PROFILE.read_text())
    data["fit"]["constant"] *= constant_scale
    path = tmp_path / "optimistic.json"
    path.write_text(json.dumps(data))
    return path


def test_latency_budget_is_met_by_measurement():
    result = compress(DEMO_MODELS[0], "0.5", None, CompressOptions(metric="latency", profile=str(PROFILE)))
    last = result.rounds[-1]
    assert last["meets"] and last["measured"] <= last["budget"]
    assert result.meets_budget
    # measured side by side with the original: the ratio is what the budget fraction promises
    assert last["measured"] / last["measured_original"] <= 0.5


def test_model_error_tightens_the_budget_until_the_measurement_meets_it(tmp_path):
    profile = _optimistic_profile(tmp_path, 0.0)
    out = tmp_path / "m.onnx"
    result = compress(DEMO_MODELS[0], "0.45", out, CompressOptions(metric="latency", profile=str(profile),
                                                                   max_rounds=5))
    assert len(result.rounds) >= 2, result.rounds  # the first round's measurement missed
    assert not result.rounds[0]["meets"]
    assert result.rounds[1]["internal_budget"] < result.rounds[0]["internal_budget"]
    assert result.rounds[-1]["meets"] and result.meets_budget and out.exists()


def test_a_miss_after_every_round_is_never_returned_under_the_requested_name(tmp_path):
    profile = _optimistic_profile(tmp_path, 0.0)
    out = tmp_path / "m.onnx"
    result = compress(DEMO_MODELS[0], "0.45", out, CompressOptions(metric="latency", profile=str(profile),
                                                                   max_rounds=1))
    assert not result.rounds[-1]["meets"]
    assert not result.meets_budget
    assert not out.exists()
    assert result.output == tmp_path / "m.over-budget.onnx" and result.output.exists()


@pytest.mark.parametrize("metric", ["macs"])
def test_counted_metrics_need_no_measurement_round(metric):
    result = compress(DEMO_MODELS[1], "0.5", None, CompressOptions(metric=metric, measure_latency=False))
    assert result.rounds and "measured" not in result.rounds[-1]
