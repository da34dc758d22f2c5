"""Area `projection`: quality and speed of the structured knapsack projection (`onnxecc.optimize.projection.project`).

* Quality: `onnxecc.optimize.exact.greedy_vs_exact_gaps` — the greedy against the exact MILP (cvxpy + HiGHS) on random
  small instances with random budgets: worst and mean relative gap of the kept importance, share solved optimally.
* Speed: time of one `project` call (median of repeats) at budgets 0.3 / 0.5 / 0.7 of the full MACs, with
  round_to 1 and 8, on
  - a random instance shaped like ResNet-50 (stem, 4 stages of bottlenecks: 37 prunable groups, 11 456 channels,
    MACs-like coefficients k²·H·W perturbed at random, gamma-distributed importances), and
  - real ResNet-18 / ResNet-50 exports, with the cost of `onnxecc.compress`: analyze → unit_classes →
    cost_model("macs") → l2 importances → project (the set-up is timed once, separately).
"""

from __future__ import annotations

import time

import numpy as np
from rich.table import Table

from bench import _common

ORDER = 30
DESCRIPTION = "greedy vs exact projection gaps; projection time on ResNet-50-size and real models"


def config(quick: bool) -> dict:
    return {"gap_instances": 50 if quick else 200, "seed": 0, "budgets": [0.3, 0.5, 0.7], "round_to": [1, 8],
            "repeats": 3 if quick else 7, "real": ["resnet18", "resnet50"], "size": 128 if quick else 224,
            "random_instance": True}


def run(quick: bool, **overrides) -> dict:
    cfg = _common.merge_config(config(quick), overrides, "projection")
    out: dict = {"config": cfg}
    if cfg["gap_instances"]:
        out["gaps"] = _gaps(cfg["gap_instances"], cfg["seed"])
    instances = []
    if cfg["random_instance"]:
        cost, importance = resnet50_like(np.random.default_rng(cfg["seed"]))
        instances.append(_speed("random ResNet-50-like", cost, importance, {}, cfg))
    for arch in cfg["real"]:
        try:
            cost, importance, setup = _real(arch, cfg["size"])
            instances.append(_speed(f"{arch} {cfg['size']}×{cfg['size']} (MACs)", cost, importance, setup, cfg))
        except Exception as exc:
            instances.append({"instance": arch, "error": _common.error_text(exc)})
    out["speed"] = instances
    return out


def _gaps(n: int, seed: int) -> dict:
    from onnxecc.optimize.exact import greedy_vs_exact_gaps

    t = time.perf_counter()
    gaps = np.array(greedy_vs_exact_gaps(n, seed), dtype=np.float64)
    return {"instances": int(gaps.size), "worst": float(gaps.max()), "mean": float(gaps.mean()),
            "optimal_fraction": float(np.mean(gaps <= 1e-9)), "negative": int(np.sum(gaps < -1e-9)),
            "wall_s": time.perf_counter() - t}


def resnet50_like(rng: np.random.Generator):
    """(cost, importance): a random bilinear MACs-like cost with ResNet-50's group structure and widths."""
    from onnxecc.cost.costs import BilinearCost, Term

    full: dict[int, int] = {}
    terms: list[Term] = []

    def group(width: int) -> int:
        full[len(full)] = width
        return len(full) - 1

    def conv(a, b, k: int, hw: int) -> None:
        terms.append(Term(float(k * k * hw * rng.uniform(0.5, 1.5)), a, b))
        if b is not None:
            terms.append(Term(float(hw * rng.uniform(0.5, 1.5)), b, None))  # BatchNorm/bias-like linear term

    image = group(3)
    stem = group(64)
    conv(image, stem, 7, 112 * 112)
    prev, side = stem, 56
    for mid, width, blocks in ((64, 256, 3), (128, 512, 4), (256, 1024, 6), (512, 2048, 3)):
        res = group(width)
        for b in range(blocks):
            a, c = group(mid), group(mid)
            conv(prev if b == 0 else res, a, 1, side * side)
            conv(a, c, 3, side * side)
            conv(c, res, 1, side * side)
            if b == 0:
                conv(prev, res, 1, side * side)  # downsample branch
        prev, side = res, max(side // 2, 7)
    classes = group(1000)
    conv(prev, classes, 1, 1)
    prunable = [g for g in full if g not in (image, classes)]
    importance = {g: rng.gamma(1.5, 1.0, size=full[g]) for g in prunable}
    return BilinearCost("macs", "MACs", full, terms, constant=0.0), importance


def _real(arch: str, size: int):
    """The MACs cost and importances exactly as `onnxecc.compress` builds them, with set-up times."""
    from onnxecc.compress import cost_model
    from onnxecc.cost.costs import unit_classes
    from onnxecc.graph import ingest
    from onnxecc.graph.channels import analyze
    from onnxecc.graph.layers import find_layers, with_static_shapes
    from onnxecc.optimize.importance import l2_importance

    setup: dict = {}
    with _common.timed(setup, "export_s"):
        path = _common.export(arch, size)
    with _common.timed(setup, "load_s"):
        model = ingest.load(path)
    with _common.timed(setup, "analyze_s"):
        shaped = with_static_shapes(model)
        layers = find_layers(model, shaped)
        graph = analyze(model, shaped)
    with _common.timed(setup, "cost_model_s"):
        variables = unit_classes(graph)
        cost = cost_model("macs", model, graph, layers, variables)
    with _common.timed(setup, "importance_s"):
        prunable_groups = {g.id for g in graph.prunable_groups}
        group_importance = l2_importance(model, graph)
        importance = {v: group_importance[variables.group[v]][variables.units[v]]
                      for v, g in enumerate(variables.group) if g in prunable_groups}
    return cost, importance, setup


def _speed(name: str, cost, importance: dict, setup: dict, cfg: dict) -> dict:
    from onnxecc.optimize.projection import min_cost, project

    full = cost(None)
    row = {"instance": name, "variables": len(importance), "channels": int(sum(len(v) for v in importance.values())),
           "setup_s": setup, "full_cost": full, "budgets": []}
    for fraction in cfg["budgets"]:
        entry: dict = {"fraction": fraction}
        for r in cfg["round_to"]:
            budget = fraction * full
            if budget < min_cost(cost, importance, round_to=r):
                entry[f"r{r}"] = {"unreachable": True}
                continue
            times, proj = [], None
            for _ in range(cfg["repeats"]):
                t = time.perf_counter()
                proj = project(cost, importance, budget, round_to=r)
                times.append(time.perf_counter() - t)
            entry[f"r{r}"] = {"median_s": float(np.median(times)), "min_s": float(np.min(times)),
                              "cost_fraction": proj.cost / full, "kept_importance": proj.kept_fraction}
        row["budgets"].append(entry)
    return row


def table(result: dict) -> Table:
    cfg = result["config"]
    rs = cfg["round_to"]
    g = result.get("gaps")
    title = "structured projection: time per project() call (median)"
    if g:
        title += (f"\ngreedy vs exact (MILP) on {g['instances']} random instances: worst gap {g['worst']:.2%}, "
                  f"mean {g['mean']:.3%}, optimal {g['optimal_fraction']:.0%} ({g['wall_s']:.1f} s)")
    t = Table(title=title)
    t.add_column("instance")
    t.add_column("groups / channels", justify="right")
    t.add_column("set-up", justify="right")
    t.add_column("budget", justify="right")
    for r in rs:
        t.add_column(f"time r{r}", justify="right")
    for r in rs:
        t.add_column(f"cost / kept imp. r{r}", justify="right")
    for row in result.get("speed", []):
        if "error" in row:
            t.add_row(row["instance"], f"[red]{row['error']}[/]", *[""] * (2 + 2 * len(rs)))
            continue
        setup = sum(v for k, v in row["setup_s"].items() if k != "export_s")
        for k, b in enumerate(row["budgets"]):
            first = k == 0
            cells = [row["instance"] if first else "", f"{row['variables']} / {row['channels']}" if first else "",
                     (_common.secs(setup) if row["setup_s"] else "—") if first else "", f"{b['fraction']:.1f}"]
            cells += [_common.secs(b[f"r{r}"]["median_s"]) if "median_s" in b[f"r{r}"] else "unreachable" for r in rs]
            cells += [f"{b[f'r{r}']['cost_fraction']:.3f} / {b[f'r{r}']['kept_importance']:.3f}"
                      if "median_s" in b[f"r{r}"] else "—" for r in rs]
            t.add_row(*cells, end_section=k == len(row["budgets"]) - 1)
    return t
