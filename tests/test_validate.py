"""`validate`: ORT side-by-side comparison, accuracy, and the budget re-check from metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DEMO_MODELS, MODELS

from onnxecc.graph import ingest
from onnxecc.graph.layers import find_layers
from onnxecc.validate import read_metadata, validate, write_metadata


def test_identical_models_agree_and_accuracy_matches_record():
    path = DEMO_MODELS[0]
    result = validate(path, path, data="digits")
    record = json.loads((MODELS / "demo_models.json").read_text())[path.name]
    assert result.top1_agreement == 1.0 and result.max_abs_diff == 0.0
    assert result.accuracy_original == pytest.approx(record["test_accuracy"], abs=1e-9)
    assert result.latency_original.median_s > 0 and result.latency_compressed.median_s > 0
    assert result.budget == {}


def test_disagreement_is_measured(tmp_path):
    """Perturb the last layer's bias: validate must see exactly that change in the logits."""
    model = ingest.load(DEMO_MODELS[0])
    last = find_layers(model)[-1]
    init = next(t for t in model.graph.initializer if t.name == last.bias)
    bias = onnx.numpy_helper.to_array(init).copy()
    bias[3] += 0.25
    init.CopyFrom(onnx.numpy_helper.from_array(bias, init.name))
    changed = tmp_path / "changed.onnx"
    ingest.save(model, changed)
    result = validate(DEMO_MODELS[0], changed)
    x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    a = ort.InferenceSession(str(DEMO_MODELS[0])).run(None, {"input": x})[0]
    b = ort.InferenceSession(str(changed)).run(None, {"input": x})[0]
    assert result.max_abs_diff == pytest.approx(float(np.abs(a - b).max()), rel=1e-5)
    assert result.max_abs_diff == pytest.approx(0.25, rel=1e-4)


@pytest.mark.parametrize("factor,meets", [(1.0, True), (0.5, False)])
def test_budget_recheck_counts_macs_on_the_file(tmp_path, factor, meets):
    model = ingest.load(DEMO_MODELS[1])
    macs = sum(layer.macs for layer in find_layers(model))
    write_metadata(model, {"metric": "macs", "budget": macs * factor})
    path = tmp_path / "m.onnx"
    ingest.save(model, path)
    assert read_metadata(ingest.load(path))["metric"] == "macs"
    result = validate(DEMO_MODELS[1], path)
    assert result.meets_budget is meets
    assert result.budget["cost"] == macs


@pytest.mark.parametrize("text,absolute,meets", [("30%", 1.0, False), ("1s", 1.0, True)])
def test_latency_budget_recheck_relative_is_the_side_by_side_ratio(tmp_path, text, absolute, meets):
    """A relative latency budget is re-checked as the measured ratio (the same model: ≈1, never ≤ 0.3) even
    though its stored absolute target (1 s) would pass; an absolute one against the compressed median."""
    model = ingest.load(DEMO_MODELS[0])
    write_metadata(model, {"metric": "latency", "budget": absolute, "budget_text": text})
    path = tmp_path / "m.onnx"
    ingest.save(model, path)
    result = validate(DEMO_MODELS[0], path)
    assert result.meets_budget is meets
    if text.endswith("%"):
        assert result.budget["ratio"] == result.latency_ratio and result.budget["fraction"] == 0.3
        assert 0.75 < result.latency_ratio < 1.33  # the same model on both sides
    else:
        assert result.budget["cost"] == result.latency_compressed.median_s and "fraction" not in result.budget
