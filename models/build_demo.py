"""Train and export the two demo models on the built-in `digits` data.

    python models/build_demo.py

Why: the tool needs real, trained ONNX networks to demo and test on, without downloads. One is a plain
CNN chain (Conv/BN/ReLU/MaxPool, Flatten→Gemm); the other is a non-chain net (residual Adds, depthwise
convs, global pooling) that exercises channel groups. Deterministic on CPU (fixed seeds, deterministic
algorithms, 2 threads). Writes next to this file: digits_cnn.onnx, digits_resdw.onnx, demo_models.json
and README.md (generated, so the numbers in it cannot drift from the files).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # run from anywhere, even without `pip install -e .`
    sys.path.insert(0, REPO)

from onnxecc.graph.data import Dataset, load_digits  # noqa: E402

SEED = 0
THREADS = 2
BATCH = 64
LR = 2e-3
WEIGHT_DECAY = 1e-4
OPSET = 17
LOGIT_ATOL = 1e-4


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class DigitsCNN(nn.Module):
    """Plain chain; Flatten→Linear is kept on purpose (tests of Flatten→Gemm channel blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(1, 32),
            *conv_bn_relu(32, 64),
            nn.MaxPool2d(2),  # 8×8 → 4×4
            *conv_bn_relu(64, 128),
            nn.MaxPool2d(2),  # 4×4 → 2×2
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * 2 * 2, 128), nn.ReLU(inplace=True), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class InvertedResidual(nn.Module):
    """MobileNetV2-style block: 1×1 expand, 3×3 depthwise, 1×1 project (no ReLU), Add to the input."""

    def __init__(self, channels: int, expand: int = 2) -> None:
        super().__init__()
        hidden = channels * expand
        self.body = nn.Sequential(
            *conv_bn_relu(channels, hidden, k=1),
            *conv_bn_relu(hidden, hidden, k=3, groups=hidden),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class DigitsResDW(nn.Module):
    """Non-chain net: residual Adds tie channels into groups; depthwise convs tie their in/out channels."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(1, 32),
            InvertedResidual(32),
            InvertedResidual(32),
            *conv_bn_relu(32, 64, stride=2),  # 8×8 → 4×4
            InvertedResidual(64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def set_determinism() -> None:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)


def train(model: nn.Module, data: Dataset, epochs: int) -> None:
    """Adam with cosine decay; the shuffling generator is seeded so reruns give the same weights."""
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train)
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = (len(x) + BATCH - 1) // BATCH
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    model.eval()


def export_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is chosen on purpose (see README)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    return data


def write_atomic(path: str, data: bytes) -> None:
    """Temp file in the same directory, then os.replace: readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are shared build outputs
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def ort_logits(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def count_params(model_bytes: bytes) -> int:
    """Parameters as the tool sees them: elements of the exported ONNX initializers (BN folded or not)."""
    graph = onnx.load_from_string(model_bytes).graph
    return int(sum(int(np.prod(t.dims)) for t in graph.initializer))


def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates of Conv and Linear layers for one 1×8×8 sample (adds, pools, BN not counted)."""
    total = 0

    def hook(mod: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total += out.numel() * (mod.in_channels // mod.groups) * kh * kw
        else:
            total += out.numel() * mod.in_features

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model(torch.zeros(1, 1, 8, 8))
    for h in handles:
        h.remove()
    return total


def build(name: str, make: Callable[[], nn.Module], epochs: int, data: Dataset) -> dict[str, object]:
    set_determinism()
    model = make()
    t0 = time.perf_counter()
    train(model, data, epochs)
    train_s = time.perf_counter() - t0

    with torch.no_grad():
        torch_logits = model(torch.from_numpy(data.x_test)).numpy()
    model_bytes = export_bytes(model)
    logits = ort_logits(model_bytes, data.x_test)
    diff = float(np.max(np.abs(logits - torch_logits)))
    assert diff <= LOGIT_ATOL, f"{name}: torch and onnxruntime logits differ by {diff:.3g} > {LOGIT_ATOL}"

    torch_acc = float(np.mean(torch_logits.argmax(1) == data.y_test))
    acc = float(np.mean(logits.argmax(1) == data.y_test))
    path = os.path.join(HERE, name)
    write_atomic(path, model_bytes)
    record = {
        "test_accuracy": acc,
        "epochs": epochs,
        "seed": SEED,
        "sha256": hashlib.sha256(model_bytes).hexdigest(),
        "torch_version": torch.__version__,
        "params": count_params(model_bytes),
        "macs": count_macs(model),
        "n_test": int(len(data.y_test)),
        "max_abs_logit_diff_torch_vs_ort": diff,
    }
    print(
        f"{name}: test accuracy {acc:.4f} (onnxruntime; torch {torch_acc:.4f}), params {record['params']:,}, "
        f"MACs {record['macs']:,}, |torch-ort| {diff:.2e}, trained in {train_s:.1f}s"
    )
    return record


README = """# Demo models

Two small networks trained on scikit-learn's bundled handwritten digits (`--data digits`: 1797 8×8
grey images, 10 classes; the held-out test set is the deterministic stratified 20% split of
`onnxecc.graph.data.load_digits(seed=0)`, {n_test} images). They are the tool's built-in demo and test inputs:
real trained weights, no downloads.

This file, the `.onnx` files and `demo_models.json` are all written by

    python models/build_demo.py

(from any directory; CPU only). Accuracies below are measured with onnxruntime on the exported files.

| file | test accuracy | params (ONNX initializers) | MACs / sample (Conv+Gemm) | epochs |
|---|---|---|---|---|
{rows}

## digits_cnn.onnx — plain chain
Input `input` N×1×8×8 float32 in [0, 1], output `logits` N×10.
Conv(1→32, 3×3, pad 1)+BN+ReLU → Conv(32→64, 3×3)+BN+ReLU → MaxPool 2 → Conv(64→128, 3×3)+BN+ReLU →
MaxPool 2 → Flatten (128×2×2 = 512) → Linear(512→128) → ReLU → Linear(128→10).
The Flatten→Gemm link is deliberate: pruning a conv channel removes a block of 4 Gemm input columns.

## digits_resdw.onnx — residual + depthwise (non-chain)
Stem Conv(1→32, 3×3)+BN+ReLU → InvertedResidual(32) → InvertedResidual(32) →
Conv(32→64, 3×3, stride 2)+BN+ReLU → InvertedResidual(64) → global average pool → Linear(64→10).
InvertedResidual(c): 1×1 Conv(c→2c)+BN+ReLU → 3×3 depthwise Conv(2c, groups=2c)+BN+ReLU →
1×1 Conv(2c→c)+BN, plus a residual Add of the block input. The Adds tie the stem and both 32-channel
blocks' outputs into one channel group, and likewise at 64.

## Training settings
CPU, `torch.manual_seed({seed})`, `torch.use_deterministic_algorithms(True)`, {threads} threads; Adam
(lr {lr}, weight decay {wd}), cosine learning-rate decay to 0, batch {batch}, cross-entropy, no
augmentation. Exported in eval mode with `torch.onnx.export(dynamo=False, opset_version={opset})`, dynamic
batch axis; the exporter folds BatchNorm into the convolutions. The script asserts that torch and
onnxruntime logits agree within {atol} on the test set. Built with torch {torch_version}; the sha256
of each file is in `demo_models.json` (other torch versions or CPUs may give slightly different weights).
"""


def main() -> None:
    t0 = time.perf_counter()
    data = load_digits(seed=SEED)
    specs = [("digits_cnn.onnx", DigitsCNN, 30), ("digits_resdw.onnx", DigitsResDW, 40)]
    records = {name: build(name, make, epochs, data) for name, make, epochs in specs}
    rows = "\n".join(
        f"| `{n}` | {r['test_accuracy']:.4f} | {r['params']:,} | {r['macs']:,} | {r['epochs']} |"
        for n, r in records.items()
    )
    readme = README.format(
        n_test=len(data.y_test),
        rows=rows,
        seed=SEED,
        threads=THREADS,
        lr=LR,
        wd=WEIGHT_DECAY,
        batch=BATCH,
        opset=OPSET,
        atol=LOGIT_ATOL,
        torch_version=torch.__version__,
    )
    write_atomic(os.path.join(HERE, "demo_models.json"), (json.dumps(records, indent=2) + "\n").encode())
    write_atomic(os.path.join(HERE, "README.md"), readme.encode())
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
