"""Real architectures for tests: torchvision constructors with weights=None exported to ONNX (no download).

Exports are cached per session (and across runs in tests/.cache, keyed by torch version and settings),
so the suite pays for each export once.
"""

from __future__ import annotations

import os
from pathlib import Path

ZOO = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x1_0",
       "efficientnet_b0", "googlenet", "densenet121", "regnet_x_400mf", "mnasnet0_5"]
SIZE = 64  # input side: small enough for fast ORT runs, large enough for every architecture's downsampling
CACHE = Path(os.environ.get("ONNXECC_TEST_CACHE", Path(__file__).parent / ".cache"))


def build(arch: str):
    import torch
    import torchvision

    torch.manual_seed(0)
    kwargs = {"weights": None}
    if arch == "googlenet":
        kwargs.update(aux_logits=False, init_weights=True)
    model = getattr(torchvision.models, arch)(**kwargs).eval()
    # Random-but-not-trivial BatchNorm statistics, so folded/unfolded BN paths are really exercised.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def export(arch: str, dynamo: bool = False) -> Path:
    """Path to `arch` exported as ONNX (cached)."""
    import torch

    tag = f"{arch}-{SIZE}-{'dynamo' if dynamo else 'ts'}-torch{torch.__version__.split('+')[0]}"
    path = CACHE / f"{tag}.onnx"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    model = build(arch)
    x = torch.randn(1, 3, SIZE, SIZE)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(tmp), dynamo=dynamo, input_names=["input"], output_names=["logits"],
                          dynamic_axes=None if dynamo else {"input": {0: "batch"}, "logits": {0: "batch"}},
                          **({"external_data": False} if dynamo else {}))
    os.replace(tmp, path)
    return path
