"""Issue 9: atomic outputs. SIGKILL `compress` and `profile` at seeded random moments (and once right when the
temp file appears, i.e. during the write): the output is either absent or complete and valid."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxecc.profiler import load_profile, store

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "digits_cnn.onnx"


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "onnxecc", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_at(proc: subprocess.Popen, delay: float | None, out: Path) -> None:
    """SIGKILL after `delay` seconds, or (delay None) as soon as a temp file next to `out` appears."""
    t0 = time.monotonic()
    while proc.poll() is None:
        if delay is not None and time.monotonic() - t0 >= delay:
            break
        if delay is None and any(p.startswith(f".{out.name}.tmp") for p in os.listdir(out.parent)):
            break
        time.sleep(0.002)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _check_model(path: Path) -> None:
    print(f"{path.name}: {'complete' if path.exists() else 'absent'}")  # shown with -s
    if not path.exists():
        return
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: np.zeros((1, 1, 8, 8), np.float32)})[0]
    assert out.shape == (1, 10)


def _check_profile(path: Path) -> None:
    if not path.exists():
        print(f"{path.name}: absent")
        return
    data = json.loads(path.read_text())  # complete JSON, never half a file
    print(f"{path.name}: {len(data.get('samples', []))} samples, fit: {bool(data.get('fit'))}")  # shown with -s
    store.read(path, require_fit=False)
    if data.get("fit"):
        load_profile(path, str(MODEL))


def test_sigkill_compress_leaves_no_partial_model(tmp_path):
    rng = random.Random(9)
    delays = [rng.uniform(0.2, 6.0) for _ in range(4)] + [None]  # None: right when the temp file appears
    for i, delay in enumerate(delays):
        out = tmp_path / f"out{i}.onnx"
        proc = _start(["compress", str(MODEL), "--budget", "0.5", "--data", "digits", "--epochs", "1",
                       "--admm-iterations", "1", "--admm-epochs", "1", "-o", str(out)], tmp_path)  # every phase, short
        _kill_at(proc, delay, out)
        _check_model(out)


def test_sigkill_profile_leaves_no_partial_json(tmp_path):
    rng = random.Random(9)
    out = tmp_path / "p.json"  # one file across kills: each run resumes what the previous one left
    for _ in range(5):
        proc = _start(["profile", str(MODEL), "--samples", "6", "--warmup", "2", "--repeats", "5",
                       "-o", str(out)], tmp_path)
        _kill_at(proc, rng.uniform(0.3, 1.5), out)
        _check_profile(out)
