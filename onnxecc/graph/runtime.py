"""onnxruntime sessions: run a model on data, and time it honestly (warm-up, repeats, median and IQR)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtFail

from onnxecc.core.errors import UserError
from onnxecc.graph.inputs import Batch, Input, as_feed, concat, example_feeds, value_ranges

# Protos from this size on reach onnxruntime through a temporary file with external data rather than as bytes:
# over 2 GB they cannot be serialised at all, and below it a session from bytes holds more: on vgg16 (528 MB)
# +1.19 GB after creation and +1.58 GB at peak from bytes, +0.59 GB and +0.92 GB from a file, and it is no
# slower (writing the file included). Small models keep the bytes path (no disk round trip, no fsync).
FILE_SESSION_BYTES = 2**26


@contextlib.contextmanager
def model_source(model: onnx.ModelProto | bytes | str | os.PathLike, file_threshold: int | None = None):
    """What `ort.InferenceSession` is given for `model`: bytes or a path as they are; a proto serialised, or,
    from `file_threshold` bytes on (default `FILE_SESSION_BYTES`), written with external data to a temporary
    folder (removed on exit: onnxruntime has read the data by then, and an unlinked file it maps stays
    valid on POSIX)."""
    if not isinstance(model, onnx.ModelProto):
        yield str(model) if isinstance(model, (str, os.PathLike)) else model
        return
    from onnxecc.graph import ingest

    if ingest.uses_external_data(model):
        raise ValueError("the model refers to external data it does not hold: load it with onnxecc.graph.ingest.load "
                         "(which reads the data) or pass its path")
    threshold = FILE_SESSION_BYTES if file_threshold is None else file_threshold
    if ingest._model_size(model) < threshold:
        yield model.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="onnxecc-session-", ignore_cleanup_errors=True) as tmp:
        yield str(ingest.save(model, Path(tmp) / "model.onnx", external=True))


def on_disk(src, proto: onnx.ModelProto):
    """What a session of `proto`, loaded from `src` by `ingest.load`, is best made from: the user's file when
    `src` is a path (onnxruntime reads it, external data included: nothing to write or serialise), else
    `proto`."""
    return str(src) if isinstance(src, (str, os.PathLike)) else proto


def session(model: onnx.ModelProto | bytes | str | os.PathLike, provider: str = "CPUExecutionProvider",
            threads: int = 1, provider_options: dict | None = None, file_threshold: int | None = None
            ) -> ort.InferenceSession:
    """A session pinned to `threads` intra-op threads, so timings are comparable between models. A path is
    opened by onnxruntime itself (with its external data); a large proto goes through a file (`model_source`).

    The session runs on `provider`, checked (`check_provider`): the nodes it does not support run on the CPU
    (onnxruntime's partitioning: shape arithmetic stays on the CPU under CUDA), and `placement` tells how many."""
    available = ort.get_available_providers()
    if provider not in available:
        raise UserError(f"execution provider {provider} is not available here (available: "
                        f"{', '.join(available)}): install the onnxruntime build that has it, or choose another "
                        "--provider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry(_RECORD_PLACEMENT, "1")
    providers = [(provider, provider_options or {})]
    if provider != CPU:
        providers.append((CPU, {}))
    with model_source(model, file_threshold) as source:
        sess = ort.InferenceSession(source, options, providers=providers)
    check_provider(sess, provider)
    return sess


CPU = "CPUExecutionProvider"
_RECORD_PLACEMENT = "session.record_ep_graph_assignment_info"  # read back by `placement`


def placement(sess: ort.InferenceSession) -> dict[str, int] | None:
    """Nodes per execution provider as onnxruntime partitioned the graph of `sess` (after its basic rewrites such
    as constant folding, before the provider's own fusions); None when this onnxruntime cannot tell (an older
    release, or a session not made by `session`)."""
    try:
        subgraphs = sess.get_provider_graph_assignment_info()
    except (AttributeError, OrtFail):  # no such method / the session was made without `_RECORD_PLACEMENT`
        return None
    counts: dict[str, int] = {}
    for sub in subgraphs:
        counts[sub.ep_name] = counts.get(sub.ep_name, 0) + len(sub.get_nodes())
    return counts


def check_provider(sess: ort.InferenceSession, provider: str) -> dict[str, int] | None:
    """Refuse (one-line UserError) a session that would not run on `provider`: one onnxruntime created without it
    (a provider it lists as available can still fail to load, e.g. CUDA without its libraries, and onnxruntime
    then falls back to the CPU with a log line), or one where the provider runs none of the model's nodes — what
    would be timed is the CPU under the provider's name. Returns `placement(sess)`."""
    used = sess.get_providers()
    if not used or used[0] != provider:
        raise UserError(f"execution provider {provider} could not be created here (onnxruntime gave "
                        f"{', '.join(used) or 'none'} instead): fix its installation (drivers, libraries) or choose "
                        "another --provider")
    counts = placement(sess)
    if provider != CPU and counts and not counts.get(provider):
        raise UserError(f"execution provider {provider} runs none of the model's {sum(counts.values())} nodes "
                        f"(onnxruntime placed them on {', '.join(sorted(counts))}): its latency would be theirs; "
                        "choose another --provider")
    return counts


def run_batched(sess: ort.InferenceSession, x: Batch, batch_size: int = 256,
                max_batch_bytes: int = 2**22) -> np.ndarray:
    """First output of the model on every sample of `x` (one array, or `inputs.Feeds` for several inputs), in
    batches of at most `batch_size` samples and `max_batch_bytes` of input (at least one sample): activations
    grow with the input, and onnxruntime's arena keeps its peak (32 VGG16 images of 224×224 at once: ~2 GB, more
    than the weights; digits: 256 at once). A model with a fixed batch size is fed exactly that many samples at a
    time (the last chunk padded with copies of its last sample, whose outputs are dropped)."""
    fixed = fixed_batch(sess)
    if fixed is not None:
        batch_size = fixed
    elif len(x):
        batch_size = max(1, min(batch_size, max_batch_bytes // max(1, x[:1].nbytes)))
    names = [i.name for i in sess.get_inputs()]
    outs = []
    for i in range(0, len(x), batch_size):
        chunk = x[i:i + batch_size]
        n = len(chunk)
        out = sess.run(None, as_feed(names, to_batch(chunk, fixed) if fixed is not None else chunk))[0]
        outs.append(out[:n])
    return np.concatenate(outs, axis=0)


def quiet_run() -> ort.RunOptions:
    """Run options under which a failing run logs nothing (the caller reports the failure itself)."""
    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def fixed_batch(sess: ort.InferenceSession) -> int | None:
    """The batch size the model's first input insists on (axis 0 a fixed number), else None."""
    shape = sess.get_inputs()[0].shape
    return shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None


def to_batch(x: Batch, size: int) -> Batch:
    """Exactly `size` samples: the first ones of `x`, padded with copies of its last sample when it has fewer."""
    if len(x) >= size:
        return x[:size]
    return concat([x, x[np.full(size - len(x), len(x) - 1)]])


def feed(sess: ort.InferenceSession, x: Batch) -> dict[str, np.ndarray]:
    """The `sess.run` feed for `x`, at the model's fixed batch size if it has one."""
    fixed = fixed_batch(sess)
    return as_feed([i.name for i in sess.get_inputs()], to_batch(x, fixed) if fixed is not None else x)


@dataclass
class Timing:
    median_s: float
    iqr_s: float
    repeats: int

    def as_dict(self) -> dict:
        return {"median_ms": self.median_s * 1e3, "iqr_ms": self.iqr_s * 1e3, "repeats": self.repeats}


def measure_latency(sess: ort.InferenceSession, x: Batch, warmup: int = 10, repeats: int = 50) -> Timing:
    """Wall-clock latency of one `session.run` on `x` (median after warm-up; IQR reports the noise); a model
    with a fixed batch size runs on that many samples (`to_batch`)."""
    feeds = feed(sess, x)
    for _ in range(warmup):
        sess.run(None, feeds)
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        sess.run(None, feeds)
        times[i] = time.perf_counter() - start
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return Timing(float(med), float(q3 - q1), repeats)


@dataclass
class Pair:
    """Two models timed side by side (`measure_pair`): per-round medians of each. `ratio` is the median of the
    per-round ratios b/a, not the ratio of the medians: a shared machine changes speed for seconds at a time (an
    AMD EPYC VM here ran the same model at 0.42 and 0.72 ms in alternating spells), which moves both halves of a
    round alike, so each round's ratio cancels it where two medians taken from different rounds do not."""

    a_rounds: list[float]
    b_rounds: list[float]
    repeats: int  # runs per round and model

    @property
    def a(self) -> Timing:
        return _summary(self.a_rounds, self.repeats)

    @property
    def b(self) -> Timing:
        return _summary(self.b_rounds, self.repeats)

    @property
    def ratios(self) -> np.ndarray:
        return np.asarray(self.b_rounds) / np.asarray(self.a_rounds)

    @property
    def ratio(self) -> float:
        return float(np.median(self.ratios))

    @property
    def ratio_iqr(self) -> float:
        """The noise of `ratio`: the interquartile range of the per-round ratios."""
        q1, q3 = np.percentile(self.ratios, [25, 75])
        return float(q3 - q1)

    @property
    def noise(self) -> float:
        """`ratio_iqr` relative to `ratio`."""
        return self.ratio_iqr / max(self.ratio, 1e-300)

    def __add__(self, more: Pair) -> Pair:
        """The rounds of both measurements pooled (the same two models, timed again)."""
        return Pair(self.a_rounds + more.a_rounds, self.b_rounds + more.b_rounds, self.repeats)


def _summary(values: list[float], repeats: int) -> Timing:
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return Timing(float(med), float(q3 - q1), len(values) * repeats)


def measure_pair(a: ort.InferenceSession, b: ort.InferenceSession, x: Batch, rounds: int = 5,
                 repeats: int = 20) -> Pair:
    """Time two models interleaved, round by round, so drifts of the machine hit both alike (see `Pair`)."""
    ta, tb = [], []
    measure_latency(a, x, warmup=10, repeats=1)
    measure_latency(b, x, warmup=10, repeats=1)
    for _ in range(rounds):
        ta.append(measure_latency(a, x, warmup=2, repeats=repeats).median_s)
        tb.append(measure_latency(b, x, warmup=2, repeats=repeats).median_s)
    return Pair(ta, tb, repeats)


def steadiest_pair(a: ort.InferenceSession, b: ort.InferenceSession, x: Batch, rounds: int, repeats: int,
                   noisy: float, tries: int = 3) -> tuple[Pair, int]:
    """`measure_pair`, measured again (up to `tries` times in all) while its `noise` exceeds `noisy` (a burst of
    load from other processes); the steadiest measurement and the number of attempts."""
    best, attempts = None, 0
    while attempts < max(1, tries):
        attempts += 1
        pair = measure_pair(a, b, x, rounds=rounds, repeats=repeats)
        if best is None or pair.noise < best.noise:
            best = pair
        if pair.noise <= noisy:
            break
    return best, attempts


def example_input(sess: ort.InferenceSession, batch: int = 1, seed: int = 0, model=None,
                  shapes: Mapping[str, Sequence[int]] | None = None) -> Batch:
    """Seeded random inputs of `batch` samples for every input of `sess` (`inputs.example_feeds`: one array, or
    `Feeds` for several), of each input's dtype. `shapes` (`inputs.resolve_shapes`) give symbolic dims their size
    (UserError naming --input-shape when one is open and not given); `model` — the proto, bytes or path `sess`
    was made from — keeps integer inputs below the size of the embedding tables they index
    (`inputs.value_ranges`; else they are 0/1)."""
    specs = [Input(i.name, _ort_dtype(i.type), tuple(_dim(d) for d in i.shape)) for i in sess.get_inputs()]
    ranges = {}
    if model is not None and any(s.dtype.kind in "iu" for s in specs):
        ranges = value_ranges(_graph_only(model))
    return example_feeds(specs, shapes or {}, batch=batch, seed=seed, ranges=ranges)


def _dim(d) -> int | str | None:
    """onnxruntime's dim as `inputs.Input` holds it: a positive int, a dim_param, or None (-1, unnamed)."""
    if isinstance(d, int):
        return d if d > 0 else None
    return d or None


def _graph_only(model) -> onnx.ModelProto:
    """`model` as a proto, without reading external data (only the graph and the tensors' dims are needed)."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_model_from_string(model)
    return onnx.load(str(model), load_external_data=False)


def _ort_dtype(ort_type: str) -> np.dtype:
    """numpy's dtype for onnxruntime's 'tensor(int64)'-style type names."""
    name = ort_type.removeprefix("tensor(").removesuffix(")")
    table = {"float": np.float32, "double": np.float64, "float16": np.float16, "bool": np.bool_}
    try:
        return np.dtype(table.get(name, name))
    except TypeError:
        raise UserError(f"input type {ort_type} cannot be fed by onnxecc: export numeric or bool inputs") from None
