"""The architecture rules of DESIGN.md, checked: the ONNX side runs without torch, library never imports CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "onnxecc"
ONNX_SIDE = ["onnxecc", "onnxecc.graph.ingest", "onnxecc.graph.graph", "onnxecc.graph.normalize",
             "onnxecc.graph.layers", "onnxecc.graph.channels", "onnxecc.graph.surgery", "onnxecc.cost.costs",
             "onnxecc.cost.budget", "onnxecc.optimize.projection", "onnxecc.optimize.importance",
             "onnxecc.optimize.problem", "onnxecc.graph.runtime", "onnxecc.validate", "onnxecc.inspection",
             "onnxecc.compress", "onnxecc.core.atomic", "onnxecc.cli"]
BLOCK = "import sys\nfor m in ('torch', 'onnx2torch', 'cvxpy', 'torchvision'):\n    sys.modules[m] = None\n"


@pytest.mark.parametrize("module", ONNX_SIDE)
def test_onnx_side_imports_without_torch(module):
    code = BLOCK + f"import {module}\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_inspect_runs_without_torch():
    model = PKG.parent / "models" / "digits_resdw.onnx"
    code = BLOCK + f"import onnxecc\nprint(onnxecc.inspect({str(model)!r}).macs)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) > 0


def test_library_never_imports_the_cli():
    offenders = [p.name for p in PKG.rglob("*.py") if p.name not in ("cli.py", "__main__.py")
                 and re.search(r"^\s*(from onnxecc(\.cli)? import cli|from onnxecc\.cli|import onnxecc\.cli)",
                               p.read_text(), re.M)]
    assert offenders == []
