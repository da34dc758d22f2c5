"""A budget below the smallest reachable cost is refused in one line (exit 2) that names the width options that
would reach it (`--round-to 1`, `--min-width 1`) — only options that change something, and only when they do
reach it: the suggestion is checked by running it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx
import pytest
from conftest import DEMO_MODELS

from onnxecc.graph.layers import find_layers

MODEL = DEMO_MODELS[0]  # digits_cnn: 2.44M MACs; widths ×16 floor ~195k, any width ~1.3k


def _compress(tmp_path, *args):
    env = {**os.environ, "COLUMNS": "200"}
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxecc", "compress", str(MODEL), "-o", str(out), "--report",
                           str(tmp_path / "r.json"), *args], capture_output=True, text=True, env=env, timeout=300)
    return proc, out


def _refusal(tmp_path, *args) -> str:
    proc, out = _compress(tmp_path, *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "smallest reachable cost" in lines[0], proc.stderr
    assert not out.exists()
    return lines[0]


def _named(message: str) -> list[str]:
    """The options the refusal suggests, e.g. ['--round-to 1'] from '... allow narrower layers: --round-to 1 (...)'."""
    if "allow narrower layers: " not in message:
        return []
    hints = message.split("allow narrower layers: ", 1)[1]
    return [hint.split(" (")[0] for hint in hints.split(" or ")]


CASES = {  # options → the options the refusal suggests (each reaches 0.05 of the MACs; the others do not)
    "x16": (["--round-to", "16"], ["--round-to 1"]),
    "x16, min 16": (["--round-to", "16", "--min-width", "16"], ["--round-to 1 --min-width 1"]),
    "any width, min 16": (["--round-to", "1", "--min-width", "16"], ["--min-width 1"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_refusal_names_the_options_that_reach_the_budget_and_they_do(case, tmp_path):
    options, expected = CASES[case]
    message = _refusal(tmp_path, "--budget", "0.05", *options)
    assert _named(message) == expected, message
    suggested = list(options)
    for flag in ("--round-to", "--min-width"):
        if flag in expected[0]:
            suggested[suggested.index(flag) + 1] = "1"
    proc, out = _compress(tmp_path, "--budget", "0.05", *suggested)
    assert proc.returncode == 0, proc.stderr
    original = sum(layer.macs for layer in find_layers(onnx.load(MODEL)))
    assert sum(layer.macs for layer in find_layers(onnx.load(out))) <= 0.05 * original
    assert json.loads((tmp_path / "r.json").read_text())["meets_budget"] is True


def test_no_option_is_named_when_none_would_reach_the_budget(tmp_path):
    message = _refusal(tmp_path, "--budget", "1k", "--round-to", "16")  # any width reaches ~1.3k only
    assert _named(message) == [] and "narrower layers would not reach it either" in message, message
    message = _refusal(tmp_path, "--budget", "1k", "--round-to", "1")  # already the narrowest: nothing to allow
    assert _named(message) == [] and "narrower" not in message, message
