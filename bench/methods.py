"""Area `methods`: ecc against the baselines at equal *measured* latency (issue #6's table).

Per demo model and latency budget (the shipped CPU latency profiles `profiles/<model>.cpu.json`), every method
(`ecc`, `project`, `uniform`, `greedy`) runs `onnxecc.compress(..., metric="latency", data="digits")` with the
same data, the same total epochs (ADMM's epochs count against ecc's fine-tuning; the others fine-tune that much
longer) and the same seeds. Reported per method: held-out digits accuracy mean ± std over the seeds, and the
measured ORT latency ratio (output / original, side by side, 1 thread, batch 1) — so a method that lands lower
shows it. A budget below the smallest latency the model can reach (every group at its minimum width) is shown
as "unreachable", not as a loss. With `verify` the ecc runs check every ADMM Z-step against the exact MILP
(cvxpy/HiGHS): the worst and mean relative gap over all checked instances are in the summary.
"""

from __future__ import annotations

import statistics
import time

from rich.table import Table

from bench import _common

ORDER = 55
DESCRIPTION = "ecc vs project/uniform/greedy on the demo models at latency budgets (mean ± std over seeds)"


def config(quick: bool) -> dict:
    return {
        "runs": [["digits_cnn", "0.3"]] if quick else [["digits_cnn", "0.3"], ["digits_cnn", "0.5"],
                                                          ["digits_resdw", "0.3"], ["digits_resdw", "0.5"]],
        "methods": ["ecc", "uniform"] if quick else ["ecc", "project", "uniform", "greedy"],
        "seeds": [0] if quick else [0, 1, 2],
        "epochs": 5 if quick else None,  # None: compress's default
        "verify": True, "rounds": 7, "round_s": 0.1, "torch_threads": 1,
    }


def run(quick: bool, **overrides) -> dict:
    cfg = _common.merge_config(config(quick), overrides, "methods")
    rows = []
    with _common.torch_threads(cfg["torch_threads"]):
        for name, budget in cfg["runs"]:
            for method in cfg["methods"]:
                runs = [_run(name, str(budget), method, seed, cfg) for seed in cfg["seeds"]]
                rows.append({"model": name, "budget": budget, "method": method, **_summary(runs), "runs": runs})
    checks = [c for r in rows for run in r["runs"] for c in run.get("zstep_checks", [])]
    gaps = [c["gap"] for c in checks]
    return {"config": cfg, "rows": rows,
            "zstep": {"instances": len(checks), "worst_gap": max(gaps) if gaps else None,
                      "mean_gap": statistics.fmean(gaps) if gaps else None,
                      "all_feasible": all(c["greedy_feasible"] for c in checks)}}


def _run(name: str, budget: str, method: str, seed: int, cfg: dict) -> dict:
    from onnxecc.compress import CompressOptions, compress
    from onnxecc.core.errors import UserError
    from onnxecc.graph import ingest
    from onnxecc.graph.data import load_digits

    opts = CompressOptions(metric="latency", profile=str(_common.MODELS.parent / "profiles" / f"{name}.cpu.json"),
                           data="digits", method=method, seed=seed, measure_latency=False,
                           verify_projection=bool(cfg["verify"]) and method == "ecc")
    if cfg["epochs"] is not None:
        opts.epochs = int(cfg["epochs"])
    path = _common.MODELS / f"{name}.onnx"
    t = time.perf_counter()
    try:
        res = compress(str(path), budget, None, opts)
    except UserError as exc:
        return {"seed": seed, "unreachable": str(exc)}
    wall = time.perf_counter() - t
    x = load_digits(seed).x_test[:1]
    latency = _common.latency_pair(ingest.load(path), res.model, x, rounds=cfg["rounds"], round_s=cfg["round_s"])
    checks = [h["zstep_check"] for h in res.history if h.get("phase") == "admm" and "zstep_check" in h]
    return {"seed": seed, "accuracy": res.accuracy_after, "accuracy_before": res.accuracy_before,
            "latency_ratio": latency["ratio"], "noisy": bool(latency.get("noisy")), "meets": res.meets_budget,
            "estimated_fraction": res.estimated_cost / res.original_cost, "wall_s": wall,
            "widths": {str(g): k for g, (k, _) in res.widths.items()}, "rounds": len(res.rounds),
            "zstep_checks": checks}


def _summary(runs: list[dict]) -> dict:
    done = [r for r in runs if "accuracy" in r]
    if not done:
        return {"unreachable": runs[0].get("unreachable")}
    acc = [r["accuracy"] for r in done]
    lat = [r["latency_ratio"] for r in done]
    return {"n": len(done), "accuracy_mean": statistics.fmean(acc),
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "latency_ratio_mean": statistics.fmean(lat), "latency_ratio_max": max(lat),
            "all_meet": all(r["meets"] for r in done), "wall_s_mean": statistics.fmean(r["wall_s"] for r in done),
            "accuracy_before": done[0]["accuracy_before"]}


def table(result: dict) -> Table:
    z = result["zstep"]
    title = "ecc vs baselines at latency budgets (digits, CPU latency profile; accuracy mean ± std over seeds)"
    if z["instances"]:
        title += (f"\nADMM Z-step greedy vs exact MILP: {z['instances']} instances, worst gap {z['worst_gap']:.2%}, "
                  f"mean {z['mean_gap']:.2%}, all feasible: {z['all_feasible']}")
    t = Table(title=title)
    for col in ("model", "budget", "method", "n", "accuracy", "latency ratio (max)", "meets", "wall / run"):
        t.add_column(col, justify="left" if col in ("model", "budget", "method") else "right")
    for r in result["rows"]:
        if "unreachable" in r:
            t.add_row(r["model"], r["budget"], r["method"], "", f"[yellow]unreachable[/]: {r['unreachable'][:70]}",
                      "", "", "")
            continue
        t.add_row(r["model"], r["budget"], r["method"], str(r["n"]),
                  f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} %",
                  f"{r['latency_ratio_mean']:.3f} ({r['latency_ratio_max']:.3f})",
                  "yes" if r["all_meet"] else "[red]no[/]", _common.secs(r["wall_s_mean"]))
    return t
