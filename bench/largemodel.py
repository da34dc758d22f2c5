"""Area `largemodel`: peak memory of load, analyse, prune+save and compress, as a multiple of the model's size
(issue 10).

Each model runs in a fresh process (ONNX side only: no torch imported). Per step, the kernel's peak-RSS mark is
reset (`/proc/self/clear_refs`) and read afterwards (`VmHWM`); the table shows (peak RSS − the process's RSS
after its imports, before loading) / the model's size on disk (.onnx plus external data), so 1.0× is the model
itself held once. Steps: `onnxecc.graph.ingest.load` (checker and shape checks included),
`onnxecc.cost.analysis.analyse`, then `onnxecc.graph.surgery.prune_channels` keeping half of every prunable group
plus `onnxecc.graph.ingest.save` of the result; then, from the file again, `compress` end to end (MACs budget 0.5,
projection only, the onnxruntime check of both models on a random batch, the output written; no latency timing).
Models: torchvision resnet152 and vgg16 (weights=None, 224×224, exported once and cached in bench/.cache); full
mode adds a synthetic model
over protobuf's 2 GB limit (three Gemm layers of 16384 inputs, ~2.4 GB of float32 weights, stored as external
data) when the machine has the RAM for it; quick mode: resnet18."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.table import Table

from bench import _common

ORDER = 90
DESCRIPTION = ("peak RSS / model size of load, analyse, prune+save and compress (resnet152, vgg16, a >2 GB synthetic "
               "model)")
STEPS = ("load", "analyse", "prune+save", "compress")


def config(quick: bool) -> dict:
    return {"models": ["resnet18"] if quick else ["resnet152", "vgg16", "synthetic-2.4GB"],
            "keep_fraction": 0.5, "compress_budget": 0.5, "synthetic_width": 16384, "min_free_gb_for_synthetic": 10}


def run(quick: bool, **overrides) -> dict:
    cfg = _common.merge_config(config(quick), overrides, "largemodel")
    rows = []
    for name in cfg["models"]:
        try:
            rows.append(_row(name, cfg))
        except Exception as exc:  # one model failing must not hide the others
            rows.append({"model": name, "error": _common.error_text(exc)})
    return {"config": cfg, "rows": rows,
            "notes": ["× = (peak RSS during the step − RSS before loading) / model size on disk; the loaded model "
                      "itself counts 1×"]}


def _row(name: str, cfg: dict) -> dict:
    if name.startswith("synthetic"):
        free = _available_gb()
        if free is not None and free < cfg["min_free_gb_for_synthetic"]:
            return {"model": name, "error": f"skipped: {free:.1f} GB of RAM available, "
                                            f"{cfg['min_free_gb_for_synthetic']} GB wanted"}
        path = _synthetic(cfg["synthetic_width"])
    else:
        path = _export(name)
    size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
    t = time.perf_counter()
    budget = cfg["compress_budget"]
    proc = subprocess.run([sys.executable, "-c", "import sys, json; from bench.largemodel import _measure; "
                           "print(json.dumps(_measure(sys.argv[1], float(sys.argv[2]), "
                           "float(sys.argv[3]) if sys.argv[3] != 'none' else None)))", str(path),
                           str(cfg["keep_fraction"]), "none" if budget is None else str(budget)],
                          capture_output=True, text=True, cwd=_common.REPO)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    steps = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"model": name, "size_bytes": size, "steps": steps, "wall_s": time.perf_counter() - t}


def _export(arch: str) -> Path:
    """torchvision `arch` (weights=None) at 224×224, cached; resnet18 is the benchmarks' shared export."""
    import torch

    if arch == "resnet18":
        return _common.export(arch, 224)
    path = _common.cache_dir() / f"large-{arch}-224-torch{torch.__version__.split('+')[0]}.onnx"
    if path.exists():
        return path
    import torchvision

    path.parent.mkdir(parents=True, exist_ok=True)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with torch.no_grad():
            torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(tmp), dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _synthetic(width: int) -> Path:
    """input (batch × width) → Gemm width×width → Relu → Gemm width×width → Relu → Gemm width×(width/4): over 2 GB
    of weights, saved by `onnxecc.graph.ingest.save` (external data). Built in a child process (its peak stays
    there)."""
    path = _common.cache_dir() / f"synthetic-gemm-{width}.onnx"
    if path.exists() and path.with_name(path.name + ".data").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    code = "import sys; from bench.largemodel import _build_synthetic; _build_synthetic(int(sys.argv[1]), sys.argv[2])"
    subprocess.run([sys.executable, "-c", code, str(width), str(path)], check=True, cwd=_common.REPO)
    return path


def _build_synthetic(width: int, path: str) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from onnxecc.graph import ingest

    rng = np.random.default_rng(0)
    dims = [width, width, width, width // 4]
    nodes, inits, x = [], [], "input"
    for i in range(3):
        w = onnx.TensorProto(name=f"W{i}", dims=[dims[i + 1], dims[i]], data_type=TensorProto.FLOAT)
        w.raw_data = (rng.standard_normal((dims[i + 1], dims[i]), dtype=np.float32) * 0.01).tobytes()
        b = onnx.numpy_helper.from_array(np.zeros(dims[i + 1], np.float32), f"B{i}")
        inits += [w, b]
        y = f"h{i}" if i < 2 else "logits"
        nodes.append(helper.make_node("Gemm", [x, f"W{i}", f"B{i}"], [y if i == 2 else f"g{i}"], name=f"fc{i}",
                                      transB=1))
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [y], name=f"relu{i}"))
        x = y
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, width])]
    graph = helper.make_graph(nodes, "synthetic", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, dims[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ingest.save(model, path)


# ---- in the measuring child -------------------------------------------------------------------------------


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)


def _measure(path: str, keep_fraction: float, compress_budget: float | None = None) -> dict:
    import gc
    import tempfile

    import numpy as np

    from onnxecc.cost.analysis import analyse
    from onnxecc.graph import ingest
    from onnxecc.graph.surgery import prune_channels

    p = Path(path)
    size_mb = (p.stat().st_size + sum(q.stat().st_size for q in p.parent.glob(p.name + ".data"))) / 2**20
    gc.collect()
    base = _rss_mb()
    out: dict[str, dict] = {}

    def step(name, fn):
        gc.collect()
        before = _rss_mb()
        _reset_peak()
        t = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:
            out[name] = {"error": _common.error_text(exc)}
            return None
        seconds = time.perf_counter() - t
        peak = _rss_mb("VmHWM")
        out[name] = {"peak_mb": peak - base, "before_mb": before - base, "ratio": (peak - base) / size_mb,
                     "seconds": seconds}
        return value

    model = step("load", lambda: ingest.load(p))
    if model is None:
        return out
    analysis = step("analyse", lambda: analyse(model, "compress"))

    def prune_save():
        graph = analysis.graph
        keep = {g.id: np.arange(max(1, int(g.size * keep_fraction))) for g in graph.prunable_groups}
        pruned = prune_channels(model, keep, graph)
        with tempfile.TemporaryDirectory(dir=p.parent) as tmp:
            ingest.save(pruned, Path(tmp) / "pruned.onnx")
        return True

    if analysis is not None:
        step("prune+save", prune_save)
    else:
        with tempfile.TemporaryDirectory(dir=p.parent) as tmp:  # write-back alone: the model saved again
            step("save", lambda: ingest.save(model, Path(tmp) / "saved.onnx"))
    model = analysis = None  # the end-to-end step starts from the file again, like the CLI
    if compress_budget is not None:
        with tempfile.TemporaryDirectory(dir=p.parent) as tmp:
            step("compress", lambda: _compress(p, compress_budget, Path(tmp) / "small.onnx"))
    out["size_mb"] = size_mb
    return out


def _compress(path: Path, budget: float, out: Path) -> bool:
    """`onnxecc compress PATH --budget B --metric macs --epochs 0` without its latency measurement: load, analyse,
    project, prune, the onnxruntime check of both models on one random batch (two sessions), write."""
    from onnxecc.compress import CompressOptions, compress

    result = compress(path, str(budget), out, CompressOptions(metric="macs", epochs=0, measure_latency=False),
                      checkpoint=out.with_name(out.name + ".ckpt"))
    if not result.meets_budget or result.agreement is None:
        raise RuntimeError(f"compress missed the budget or was not checked in onnxruntime: {result.final_cost}")
    return True


def _available_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def table(result: dict) -> Table:
    t = Table(title="largemodel: peak RSS / model size per step (fresh process per model; ONNX side only)")
    for col in ("model", "size", *STEPS, "save (no analysis)", "wall"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for row in result["rows"]:
        if "error" in row:
            t.add_row(row["model"], f"[red]{row['error']}[/]", *[""] * (len(STEPS) + 2))
            continue
        cells = []
        for name in (*STEPS, "save"):
            s = row["steps"].get(name)
            if s is None:
                cells.append("-")
            elif "error" in s:
                cells.append(f"[red]error[/] {s['error'][:60]}")
            else:
                cells.append(f"{s['ratio']:.2f}× ({s['peak_mb']:.0f} MB, {s['seconds']:.1f} s)")
        t.add_row(row["model"], f"{row['size_bytes'] / 2**20:.0f} MB", *cells, f"{row['wall_s']:.0f} s")
    return t
