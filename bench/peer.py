"""Area `peer`: onnxecc next to Torch-Pruning, the tool users reach for today for structured pruning.

Same model (the digits demos, converted to torch by `onnxecc.train.bridge.to_torch`), same MACs budget, same
kernel-friendly widths (multiples of 16), same fine-tuning (`onnxecc.train.finetune.finetune`: epochs, Adam, cosine
decay, distillation from the original's logits), both exported to ONNX and measured by onnxruntime side by side
with the original: MACs counted on the file, test accuracy, latency ratio. Torch-Pruning's `MagnitudePruner`
(L2 magnitude, the same ratio in every layer, the classifier left whole) gets the largest pruning ratio whose
model fits the budget (bisection). Needs the `bench` extra (`pip install torch-pruning`).
"""

from __future__ import annotations

import copy
import io
import time

from rich.table import Table

from bench import _common

ORDER = 70
DESCRIPTION = "onnxecc vs Torch-Pruning (magnitude pruner) at the same MACs budget and fine-tuning"


def config(quick: bool) -> dict:
    return {"models": ["digits_cnn"] if quick else ["digits_cnn", "digits_resdw"], "budget": 0.3,
            "epochs": 5 if quick else 30, "seed": 0, "round_to": 16}


def run(quick: bool, **overrides) -> dict:
    cfg = _common.merge_config(config(quick), overrides, "peer")
    rows = []
    with _common.torch_threads(1):
        for name in cfg["models"]:
            for tool in ("onnxecc", "torch-pruning"):
                try:
                    rows.append(_row(name, tool, cfg))
                except Exception as exc:
                    rows.append({"model": name, "tool": tool, "error": _common.error_text(exc)})
    return {"config": cfg, "rows": rows}


def _row(name: str, tool: str, cfg: dict) -> dict:
    import onnx

    from onnxecc.graph.data import load_digits

    path = _common.REPO / "models" / f"{name}.onnx"
    original = onnx.load(path)
    data = load_digits(cfg["seed"])
    t = time.perf_counter()
    model = _onnxecc(path, cfg) if tool == "onnxecc" else _torch_pruning(original, data, cfg)
    wall = time.perf_counter() - t
    from onnxecc.graph import runtime

    logits = runtime.run_batched(runtime.session(model), data.x_test)
    pair = _common.latency_pair(original, model, data.x_test[:1])
    return {"model": name, "tool": tool, "macs_ratio": _common.macs(model) / _common.macs(original),
            "accuracy": float((logits.argmax(1) == data.y_test).mean()), "latency": pair, "wall_s": wall}


def _onnxecc(path, cfg):
    from onnxecc.compress import CompressOptions, compress

    return compress(path, str(cfg["budget"]), None, CompressOptions(
        metric="macs", method="project", data="digits", epochs=cfg["epochs"], seed=cfg["seed"],
        round_to=cfg["round_to"], measure_latency=False)).model


def _torch_pruning(original, data, cfg):
    import onnx
    import torch
    import torch_pruning as tp

    from onnxecc.graph import runtime
    from onnxecc.train.bridge import to_torch
    from onnxecc.train.finetune import TrainConfig, finetune

    base = to_torch(original).module.eval()
    x = torch.zeros(1, *data.x_train.shape[1:])
    full = _common.macs(original)

    def pruned(ratio: float):
        model = copy.deepcopy(base)
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[last], round_to=cfg["round_to"]).step()
        return model

    def exported(model) -> onnx.ModelProto:
        buffer = io.BytesIO()
        with torch.no_grad():
            torch.onnx.export(model.eval(), (x,), buffer, dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        return onnx.load_from_string(buffer.getvalue())

    lo, hi = 0.0, 0.95  # largest ratio that meets the budget (MACs counted on the exported file)
    for _ in range(12):
        mid = (lo + hi) / 2
        if _common.macs(exported(pruned(mid))) <= cfg["budget"] * full:
            hi = mid
        else:
            lo = mid
    model = pruned(hi)
    teacher = runtime.run_batched(runtime.session(original), data.x_train)
    config = TrainConfig(epochs=cfg["epochs"], seed=cfg["seed"])
    finetune(model, data.x_train, teacher, data.y_train, config)
    out = exported(model)
    assert _common.macs(out) <= cfg["budget"] * full
    return out


def table(result: dict) -> Table:
    cfg = result["config"]
    t = Table(title=f"onnxecc vs Torch-Pruning at {cfg['budget']:.0%} of MACs, widths ×{cfg['round_to']}, "
                    f"{cfg['epochs']} fine-tuning epochs (same loop, distillation), ORT CPU 1 thread")
    for name in ("model", "tool", "MACs ratio", "accuracy", "latency ratio", "wall"):
        t.add_column(name, justify="left" if name in ("model", "tool") else "right")
    for r in result["rows"]:
        if "error" in r:
            t.add_row(r["model"], r["tool"], f"[red]{r['error']}[/]", "", "", "")
            continue
        t.add_row(r["model"], r["tool"], f"{r['macs_ratio']:.3f}", f"{r['accuracy']:.4f}",
                  f"{r['latency']['ratio']:.2f}", _common.secs(r["wall_s"]))
    return t
