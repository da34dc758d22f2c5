"""onnxruntime sessions: run a model on data, and time it honestly (warm-up, repeats, median and IQR)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxecc.errors import UserError


def session(model: onnx.ModelProto | bytes | str, provider: str = "CPUExecutionProvider", threads: int = 1,
            provider_options: dict | None = None) -> ort.InferenceSession:
    """A session pinned to `threads` intra-op threads, so timings are comparable between models."""
    available = ort.get_available_providers()
    if provider not in available:
        raise UserError(f"execution provider {provider} is not available here (available: "
                        f"{', '.join(available)}): install the onnxruntime build that has it")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    providers = [(provider, provider_options or {})]
    if provider != "CPUExecutionProvider":
        providers.append(("CPUExecutionProvider", {}))
    return ort.InferenceSession(data, options, providers=providers)


def run_batched(sess: ort.InferenceSession, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """First output of the model on every sample of `x`, in batches."""
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs, axis=0)


@dataclass
class Timing:
    median_s: float
    iqr_s: float
    repeats: int

    def as_dict(self) -> dict:
        return {"median_ms": self.median_s * 1e3, "iqr_ms": self.iqr_s * 1e3, "repeats": self.repeats}


def measure_latency(sess: ort.InferenceSession, x: np.ndarray, warmup: int = 10, repeats: int = 50) -> Timing:
    """Wall-clock latency of one `session.run` on `x` (median after warm-up; IQR reports the noise)."""
    name = sess.get_inputs()[0].name
    feed = {name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times[i] = time.perf_counter() - start
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return Timing(float(med), float(q3 - q1), repeats)


def measure_pair(a: ort.InferenceSession, b: ort.InferenceSession, x: np.ndarray, rounds: int = 5,
                 repeats: int = 20) -> tuple[Timing, Timing]:
    """Time two models interleaved, round by round, so drifts of the machine hit both alike."""
    ta, tb = [], []
    measure_latency(a, x, warmup=10, repeats=1)
    measure_latency(b, x, warmup=10, repeats=1)
    for _ in range(rounds):
        ta.append(measure_latency(a, x, warmup=2, repeats=repeats).median_s)
        tb.append(measure_latency(b, x, warmup=2, repeats=repeats).median_s)

    def summary(values):
        q1, med, q3 = np.percentile(values, [25, 50, 75])
        return Timing(float(med), float(q3 - q1), rounds * repeats)

    return summary(ta), summary(tb)


def example_input(sess: ort.InferenceSession, batch: int = 1, seed: int = 0) -> np.ndarray:
    """A random input of the model's first input shape (symbolic dims → `batch`)."""
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else batch for d in inp.shape]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
