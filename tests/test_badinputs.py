"""Issue 9: every case of the generated bad-input corpus exits 2 with one line, no traceback, no output left."""

from __future__ import annotations

import os
import subprocess
import sys

import badinputs
import pytest


@pytest.mark.parametrize("name", sorted(badinputs.CASES))
def test_bad_input(name, tmp_path):
    d = tmp_path / name
    case = badinputs.build(name, d)
    before = {p: p.read_bytes() if p.is_file() else None for p in d.rglob("*")}
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "onnxecc", *case.args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]  # rich's transient progress leaves a blank
    assert len(lines) == 1, proc.stderr
    assert case.expected.lower() in lines[0].lower(), proc.stderr
    after = {p: p.read_bytes() if p.is_file() else None for p in d.rglob("*")}
    assert after == before, f"files changed: {sorted(set(after) ^ set(before))}"  # no output, no temp file
    for name_ in badinputs.OUTPUTS:
        assert name_ in case.keep or not (d / name_).exists()


def test_unknown_option_is_a_usage_error_with_click_installed_beside_typer(tmp_path):
    """typer vendors its own click; when another package installs click too, a usage error must still exit 2
    with click's usage message, not 'internal error' (it did, once the bench extra brought click in)."""
    proc = subprocess.run([sys.executable, "-m", "onnxecc", "inspect", "model.onnx", "--no-such-flag"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "No such option: --no-such-flag" in proc.stderr
    assert "internal error" not in proc.stderr
