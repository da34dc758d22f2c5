"""Shared helpers of the benchmark areas: paths, cached exports, counting, side-by-side latency, formatting.

Nothing here imports torch at module level: an area that does not need it (groups, compress setup) starts fast.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np

from onnxecc.core import atomic

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
MODELS = REPO / "models"
RESULTS_ENV = "ONNXECC_BENCH_RESULTS"
CACHE_ENV = "ONNXECC_BENCH_CACHE"


def results_dir(override: str | os.PathLike | None = None) -> Path:
    """Where `<area>.json` files go: the argument, else $ONNXECC_BENCH_RESULTS, else bench/results."""
    return Path(override or os.environ.get(RESULTS_ENV) or REPO / "bench" / "results")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or REPO / "bench" / ".cache")


# ---- architectures ------------------------------------------------------------------------------------------
def zoo():
    """The test suite's `tests/zoo.py` (ZOO list, `build`, cached 64×64 `export`)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import zoo as zoo_module

    return zoo_module


def export(arch: str, size: int) -> Path:
    """`arch` (torchvision, weights=None, the test zoo's constructor settings) exported at size×size with a
    dynamic batch, cached under bench/.cache keyed by torch version."""
    import torch

    tag = f"{arch}-{size}-ts-torch{torch.__version__.split('+')[0]}"
    path = cache_dir() / f"{tag}.onnx"
    if not path.exists():
        _export_onnx(zoo().build(arch), size, path)
    return path


def _export_onnx(model, size: int, path: Path) -> None:
    """`model` (eval mode) written to `path` as ONNX, batch dynamic; atomically, so a cache never holds half."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.randn(1, 3, size, size)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with torch.no_grad():
            torch.onnx.export(model, (x,), str(tmp), dynamo=False, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


DIGITS_SIZE = 32  # digits upsampled for torchvision archs: every one of them downsamples 32× at most
TRAIN_BATCH = 64  # `digits_trained`: the batch its training and its learning-rate schedule count in


def digits_npz(size: int = DIGITS_SIZE) -> Path:
    """The built-in digits as an npz for a 3×size×size model: bilinear upsampling, gray copied to 3 channels,
    the train images first and the 359 test images last — exactly `load_digits(0)`'s split, which is the split
    `load_npz` makes (the last 20 %), so accuracies on it are held out like the demo models'."""
    path = cache_dir() / f"digits-3x{size}x{size}.npz"
    if path.exists():
        return path
    import torch

    from onnxecc.graph.data import load_digits

    d = load_digits(0)
    x = torch.nn.functional.interpolate(torch.from_numpy(np.concatenate([d.x_train, d.x_test])), size=(size, size),
                                        mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    np.savez(tmp, x=x.numpy().astype(np.float32), y=np.concatenate([d.y_train, d.y_test]))
    os.replace(tmp, path)
    return path


def digits_trained(arch: str, epochs: int = 10, size: int = DIGITS_SIZE, seed: int = 0) -> tuple[Path, Path, dict]:
    """`arch` (torchvision, weights=None, 10 classes) trained from scratch on `digits_npz(size)`'s training part
    and exported — a real architecture with a real accuracy to lose, where the random-weight exports only give
    agreement. Cached with its test accuracy in a JSON next to it. Returns (onnx, npz, {"accuracy", "train_s"})."""
    import json

    import torch
    import torchvision

    tag = f"{arch}-digits{size}-e{epochs}-seed{seed}-torch{torch.__version__.split('+')[0]}"
    path, info_path, data = cache_dir() / f"{tag}.onnx", cache_dir() / f"{tag}.json", digits_npz(size)
    if path.exists() and info_path.exists():
        return path, data, json.loads(info_path.read_text())
    from onnxecc.graph.data import load_npz

    d = load_npz(data)
    x, y = torch.from_numpy(d.x_train), torch.from_numpy(d.y_train)
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = -(-len(x) // TRAIN_BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps)
    t = time.perf_counter()
    model.train()
    with torch_threads(os.cpu_count() or 1):  # once per cache: not a timed comparison
        _train(model, x, y, opt, sched, epochs)
    model.eval()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(d.x_test)).argmax(1).numpy() == d.y_test).mean()
    info = {"accuracy": float(accuracy), "train_s": time.perf_counter() - t, "epochs": epochs, "size": size}
    _export_onnx(model, size, path)
    atomic.write_json(info_path, info)  # after the model: a cache hit needs both, each whole
    return path, data, info


def _train(model, x, y, opt, sched, epochs: int) -> None:
    import torch

    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), TRAIN_BATCH):
            b = order[i:i + TRAIN_BATCH]
            loss = torch.nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


# ---- counting -----------------------------------------------------------------------------------------------
def macs(model) -> int:
    from onnxecc.graph.layers import find_layers

    return int(sum(layer.macs for layer in find_layers(model)))


def params(model) -> int:
    from onnxecc.graph.layers import count_params

    return int(count_params(model))


# ---- latency ------------------------------------------------------------------------------------------------
NOISY = 0.10  # relative IQR (across rounds) above which a latency is flagged as noisy


def latency_pair(original, other, x: np.ndarray, rounds: int = 5, round_s: float = 0.2,
                 min_repeats: int = 5, max_repeats: int = 200, retries: int = 2) -> dict:
    """ORT CPU, 1 thread: `original` and `other` (protos or sessions) timed side by side with
    `onnxecc.graph.runtime.measure_pair` (interleaved rounds; the ratio is the median of per-round ratios). Repeats per
    round are chosen so one round of the original lasts about `round_s`. If the per-round ratios' IQR exceeds
    `NOISY` of their median (a burst of load from other processes), the pair is measured again, up to `retries`
    times, and the least noisy attempt is kept. Returns medians, IQRs, the ratio and the noise."""
    from onnxecc.graph import runtime

    a = original if hasattr(original, "run") else runtime.session(original, threads=1)
    b = other if hasattr(other, "run") else runtime.session(other, threads=1)
    probe = runtime.measure_latency(a, x, warmup=2, repeats=3).median_s
    repeats = int(np.clip(round_s / max(probe, 1e-6), min_repeats, max_repeats))
    pair, attempts = runtime.steadiest_pair(a, b, x, rounds, repeats, NOISY, tries=max(0, retries) + 1)
    ta, tb, noise = pair.a, pair.b, pair.noise
    return {"original_ms": ta.median_s * 1e3, "original_iqr_ms": ta.iqr_s * 1e3,
            "other_ms": tb.median_s * 1e3, "other_iqr_ms": tb.iqr_s * 1e3,
            "ratio": pair.ratio, "noise": noise, "noisy": noise > NOISY, "attempts": attempts,
            "rounds": rounds, "repeats": repeats}


# ---- timing and errors ----------------------------------------------------------------------------------------
@contextmanager
def timed(store: dict, key: str):
    """Wall time of the block into store[key] (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        store[key] = time.perf_counter() - start


def per_arch(archs, row, cfg: dict) -> list[dict]:
    """`row(arch, cfg)` for each architecture; a failing one becomes an error row and the others still run."""
    rows = []
    for arch in archs:
        try:
            rows.append(row(arch, cfg))
        except Exception as exc:
            rows.append({"arch": arch, "error": error_text(exc)})
    return rows


@contextmanager
def torch_threads(n: int):
    """torch pinned to `n` intra-op threads for an area's runs (every method timed alike), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def merge_config(defaults: dict, overrides: dict, area: str) -> dict:
    """`defaults` updated by `overrides`; an unknown key is an error that names the known ones."""
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"area '{area}' has no setting {', '.join(unknown)} (settings: {', '.join(sorted(defaults))})")
    return {**defaults, **overrides}


# ---- run metadata -----------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "cores_available": available,
            "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict:
    out = {}
    for pkg in ("onnxecc", "torch", "torchvision", "onnxruntime", "onnx", "onnx2torch", "numpy", "cvxpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ---- formatting -------------------------------------------------------------------------------------------------
def f2(v, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def pct(v, digits: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f}%"


def ms(v_s) -> str:
    if v_s is None:
        return "—"
    return f"{v_s * 1e3:.1f} ms" if v_s < 10 else f"{v_s:.1f} s"


def secs(v) -> str:
    if v is None:
        return "—"
    if v < 0.01:
        return f"{v * 1e3:.2f} ms"
    return f"{v * 1e3:.0f} ms" if v < 1 else f"{v:.2f} s"


def mean_std(values: list[float]) -> dict | None:
    """Mean, sample standard deviation (0 for one value) and count; None for no values."""
    import statistics

    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def probe_and_finetune(module, x, teacher: np.ndarray, y: np.ndarray | None, epochs: int, seed: int,
                       names=None, batch_size: int | None = None) -> tuple[float, list[dict]]:
    """onnxecc's fine-tuning for a torch module pruned outside onnxecc (Torch-Pruning): the learning rate chosen
    as `MaskedModel.choose_lr` does (one constant-rate pass over up to its probe's samples per candidate, lowest
    distillation loss after it), then `train.finetune.finetune` (Adam, cosine decay). Probe and training compare
    the outputs as the original's outputs say (`graph.outputs.output_kind`). `x`: an array or `inputs.Feeds`
    (ordered by `names`, the module's inputs); `batch_size`: compress's `--batch-size` (None: its default).
    Returns the rate and every candidate's loss."""
    import copy

    import torch

    from onnxecc.graph.outputs import output_kind
    from onnxecc.train.finetune import PROBE_LRS, TorchInputs, TrainConfig, distillation_loss, finetune
    from onnxecc.train.masked import PROBE_SAMPLES, _spread

    kind = output_kind(teacher)
    every = _spread(len(teacher), PROBE_SAMPLES)
    xs, ts, ys = x[every], teacher[every], (y[every] if y is not None else None)
    start = copy.deepcopy(module.state_dict())
    base = TrainConfig(epochs=epochs, seed=seed, device="cpu", **({"batch_size": batch_size} if batch_size else {}))
    tried = []
    for lr in PROBE_LRS:
        module.load_state_dict(start)
        probe = TrainConfig(**{**base.__dict__, "epochs": 1, "lr": lr, "lr_schedule": "constant", "max_recoveries": 0})
        try:
            finetune(module, xs, ts, ys, probe, kind=kind)
            module.eval()
            total = 0.0
            with torch.no_grad():
                for i in range(0, len(ts), 64):  # batches: a page detector's probe samples at once are large
                    out = TorchInputs.of(xs[i:i + 64], names)(module)
                    labels = torch.as_tensor(ys[i:i + 64]) if ys is not None else None
                    total += float(distillation_loss(out, torch.as_tensor(ts[i:i + 64]), labels, base.temperature,
                                                     base.distill_weight, kind)) * len(ts[i:i + 64])
            loss = total / len(ts)
        except Exception:  # a diverged rate is not a candidate
            loss = float("nan")
        tried.append({"lr": lr, "loss": loss if np.isfinite(loss) else None})
    module.load_state_dict(start)
    best = min((t for t in tried if t["loss"] is not None), key=lambda t: t["loss"])["lr"]
    finetune(module, x, teacher, y, TrainConfig(**{**base.__dict__, "lr": best}), kind=kind)
    module.eval()
    return best, tried
