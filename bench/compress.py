"""Area `compress`: the main job end to end on the demo models, as `onnxecc compress ... --data digits` runs it.

Per demo model (models/digits_cnn.onnx, models/digits_resdw.onnx) and budget (MACs 0.3 and 0.5, params 0.5; quick:
MACs 0.3): `onnxecc.compress(model, budget, options=CompressOptions(metric, data="digits"))` with its default
method and fine-tuning; reported are the held-out digits accuracy before/after, the MACs (and parameter) ratio
counted on the output model, the ORT CPU latency ratio (1 thread, batch 1, measured side by side with the
original by `onnxecc.graph.runtime.measure_pair`) and the wall time of the `compress` call.

`torch_threads` pins torch's intra-op threads for the call (None: torch's default, as a user runs it). Quick mode
uses 1: on a shared 2-core machine, two OpenMP threads competing with other processes made the same fine-tuning
about 10× slower (measured: 200 Adam steps of a small CNN, 4.5 s with 1 thread vs 49 s with 2 while two other
processes kept both cores busy; 0.9 s either way on an idle machine), and the quick run must stay within minutes.
"""

from __future__ import annotations

import time

from rich.table import Table

from bench import _common

ORDER = 50
DESCRIPTION = "compress --data digits on the demo models: accuracy, MACs/params ratio, latency ratio, wall time"
MODELS = ["digits_cnn", "digits_resdw"]


def config(quick: bool) -> dict:
    runs = [["macs", "0.3"]] if quick else [["macs", "0.3"], ["macs", "0.5"], ["params", "0.5"]]
    return {"models": MODELS, "runs": runs, "data": "digits", "epochs": None, "seed": 0, "rounds": 7,
            "round_s": 0.1, "torch_threads": 1 if quick else None}


def run(quick: bool, **overrides) -> dict:
    cfg = _common.merge_config(config(quick), overrides, "compress")
    rows = []
    for name in cfg["models"]:
        for metric, budget in cfg["runs"]:
            try:
                rows.append(_row(name, metric, str(budget), cfg))
            except Exception as exc:
                rows.append({"model": name, "metric": metric, "budget": budget, "error": _common.error_text(exc)})
    return {"config": cfg, "rows": rows}


def _row(name: str, metric: str, budget: str, cfg: dict) -> dict:
    from onnxecc.compress import CompressOptions, compress
    from onnxecc.graph import ingest
    from onnxecc.graph.data import load_digits

    path = _common.MODELS / f"{name}.onnx"
    opts = CompressOptions(metric=metric, data=cfg["data"], seed=cfg["seed"])
    if cfg["epochs"] is not None:
        opts.epochs = int(cfg["epochs"])
    import torch

    with _common.torch_threads(cfg["torch_threads"] or torch.get_num_threads()):
        used = torch.get_num_threads()
        t = time.perf_counter()
        res = compress(str(path), budget, None, opts)
        wall = time.perf_counter() - t
    original = ingest.load(path)
    x = load_digits(cfg["seed"]).x_test[:1]
    latency = _common.latency_pair(original, res.model, x, rounds=cfg["rounds"], round_s=cfg["round_s"])
    report = res.as_dict()
    return {
        "model": name, "metric": metric, "budget": budget, "wall_s": wall, "timings_s": res.timings,
        "torch_threads": used,
        "accuracy_before": res.accuracy_before, "accuracy_after": res.accuracy_after,
        "top1_agreement": res.agreement, "meets_budget": res.meets_budget,
        "cost_fraction": report["cost_fraction"],
        "macs_ratio": _common.macs(res.model) / _common.macs(original),
        "params_ratio": _common.params(res.model) / _common.params(original),
        "latency": latency, "latency_ratio": latency["ratio"],
        "compress_latency_ratio": report["latency_ratio"], "epochs": opts.epochs,
        "method": report.get("method", opts.method),
        "warnings": res.warnings,
    }


def table(result: dict) -> Table:
    threads = result["config"]["torch_threads"] or "default"
    t = Table(title=f"compress --data digits (demo models; ratios output/original, ORT CPU 1 thread; "
                    f"torch threads: {threads})")
    for col in ("model", "budget", "method", "accuracy before → after", "MACs ratio", "params ratio", "latency ratio",
                "meets", "compress wall"):
        t.add_column(col, justify="left" if col in ("model", "budget", "method") else "right")
    for r in result["rows"]:
        budget = f"{r['metric']} {r['budget']}"
        if "error" in r:
            t.add_row(r["model"], budget, "", f"[red]{r['error']}[/]", *[""] * 5)
            continue
        accuracy = f"{_common.pct(r['accuracy_before'])} → {_common.pct(r['accuracy_after'])}"
        latency = f"{r['latency_ratio']:.2f}" + ("?" if r["latency"].get("noisy") else "")
        t.add_row(r["model"], budget, str(r["method"]), accuracy, f"{r['macs_ratio']:.3f}", f"{r['params_ratio']:.3f}",
                  latency, "yes" if r["meets_budget"] else "[red]no[/]", _common.secs(r["wall_s"]))
    return t
