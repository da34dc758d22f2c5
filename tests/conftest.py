"""Shared fixtures: real torchvision architectures exported to ONNX, cached for the session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # before torch is imported: two workers share the two cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import zoo  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
DEMO_MODELS = [MODELS / "digits_cnn.onnx", MODELS / "digits_resdw.onnx"]


@pytest.fixture(scope="session")
def zoo_model():
    """Call with an architecture name to get the path of its ONNX export."""
    return zoo.export


@pytest.fixture(params=zoo.ZOO, scope="session")
def zoo_arch(request):
    return request.param
