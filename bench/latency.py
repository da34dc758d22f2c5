"""Area `latency`: do fewer MACs mean less time on ORT CPU? Arbitrary vs kernel-friendly channel counts.

Per architecture (torchvision, weights=None, exported at size×size with a dynamic batch, cached in bench/.cache):

* uniform: every prunable channel group keeps the same fraction of its units (50%; and 70%, which leaves about
  half the MACs), chosen at random (seed 0) — once with arbitrary counts, once with the kept *channel* count
  rounded to a multiple of 8 (a group whose unit is a block of b channels — RegNet's grouped convs — keeps u
  units with u·b a multiple of 8 where the group allows it). Halving the power-of-two widths of most
  torchvision models already gives multiples of 8, so at 50% the two often coincide; 70% is where arbitrary
  counts (e.g. 45 of 64) show their cost. Also with multiples of 16 (`extra_multiples`): with AVX-512, ORT's
  NCHWc convolution kernels work on blocks of 16 channels;
* `onnxecc.compress(path, "0.5", CompressOptions(metric="macs", measure_latency=False))`: the projection only
  (no data, no fine-tuning), with round_to 1 and round_to 8.

For each: the MACs ratio (`onnxecc.graph.layers.find_layers` counts) and the ORT CPU latency ratio, 1 thread, batch 1,
measured side by side with the original by `onnxecc.graph.runtime.measure_pair` (interleaved rounds, the median of
the per-round ratios), so load from other processes hits both models alike; a pair whose per-round ratios' IQR
stays above 10% of their median after two re-measurements is flagged noisy ('?').
"""

from __future__ import annotations

import math
import time

import numpy as np
from rich.table import Table

from bench import _common

ORDER = 20
DESCRIPTION = "MACs ratio vs measured ORT CPU latency ratio: arbitrary vs ×8 channel counts, compress@0.5"
EXTRA = ["resnet50", "mobilenet_v3_large", "efficientnet_b1", "mnasnet1_0", "regnet_y_400mf"]


def config(quick: bool) -> dict:
    common = {"keeps": [0.5, 0.7], "multiple": 8, "extra_multiples": [16], "budget": "0.5", "seed": 0}
    if quick:
        return {"archs": ["resnet18", "mobilenet_v2", "regnet_x_400mf"], "size": 128, "rounds": 5, "round_s": 0.12,
                **common}
    return {"archs": list(_common.zoo().ZOO) + EXTRA, "size": 224, "rounds": 7, "round_s": 0.25, **common}


def run(quick: bool, **overrides) -> dict:
    cfg = _common.merge_config(config(quick), overrides, "latency")
    rows = _common.per_arch(cfg["archs"], _row, cfg)
    notes = [f"ORT CPUExecutionProvider, 1 thread, input 1×3×{cfg['size']}×{cfg['size']}; ratio = pruned / original "
             f"median latency, {cfg['rounds']} interleaved rounds per pair (<1 is faster); '?' = still noisy after "
             f"retries (IQR across rounds > {_common.NOISY:.0%} of the median): treat with care."]
    for row in rows:
        notes += [f"error: {e}" for e in ([f"{row['arch']}: {row['error']}"] if "error" in row else _errors(row))]
    return {"config": cfg, "rows": rows, "notes": notes}


def kept_units(size: int, block: int, keep: float, multiple: int) -> int:
    """Units to keep of a group of `size` units of `block` channels: round(keep·size), or — with `multiple` > 1 —
    the nearest count u ≥ one step with u·block a multiple of `multiple` (the whole group if none fits)."""
    if multiple <= 1:
        return max(1, min(size, int(size * keep + 0.5)))
    step = multiple // math.gcd(multiple, max(block, 1))
    if size < step:
        return size
    return int(min(size, max(step, step * int(size * keep / step + 0.5))))


def uniform_keep(graph, keep: float, multiple: int, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for g in graph.prunable_groups:
        k = kept_units(g.size, g.channels // g.size, keep, multiple)
        if k < g.size:
            out[g.id] = np.sort(rng.choice(g.size, size=k, replace=False))
    return out


def _row(arch: str, cfg: dict) -> dict:
    from onnxecc.compress import CompressOptions, compress
    from onnxecc.graph import ingest, runtime
    from onnxecc.graph.channels import analyze
    from onnxecc.graph.layers import with_static_shapes
    from onnxecc.graph.surgery import prune_channels

    row: dict = {"arch": arch, "times_s": {}}
    with _common.timed(row["times_s"], "export"):
        path = _common.export(arch, cfg["size"])
    model = ingest.load(path)
    graph = analyze(model, with_static_shapes(model))
    base_macs = _common.macs(model)
    x = np.random.default_rng(cfg["seed"]).standard_normal((1, 3, cfg["size"], cfg["size"])).astype(np.float32)
    original = runtime.session(model, threads=1)
    row["original_macs"] = base_macs

    def measure(make) -> dict:
        """One variant: build it, count its MACs, time it next to the original; errors stay in the row."""
        try:
            pruned, extra = make()
            entry = {"macs_ratio": _common.macs(pruned) / base_macs, **extra}
            entry["latency"] = _common.latency_pair(original, runtime.session(pruned, threads=1), x,
                                                    rounds=cfg["rounds"], round_s=cfg["round_s"])
            entry["latency_ratio"] = entry["latency"]["ratio"]
            return entry
        except Exception as exc:
            return {"error": _common.error_text(exc)}

    for fraction in cfg["keeps"]:
        for label, multiple in _uniform_variants(cfg):
            def uniform(fraction=fraction, multiple=multiple):
                keep = uniform_keep(graph, fraction, multiple, cfg["seed"])
                return prune_channels(model, keep, graph), {}

            row[f"uniform_{fraction}_{label}"] = measure(uniform)
    for r in (1, cfg["multiple"]):
        def projected(r=r):
            t = time.perf_counter()
            res = compress(str(path), cfg["budget"], None,
                           CompressOptions(metric="macs", measure_latency=False, round_to=r, seed=cfg["seed"]))
            return res.model, {"compress_s": time.perf_counter() - t,
                               "compress_counted_ratio": res.counted_cost / res.original_cost}

        row[f"compress_r{r}"] = measure(projected)
    return row


def _uniform_variants(cfg: dict) -> list[tuple[str, int]]:
    return [("arbitrary", 1)] + [(f"x{m}", int(m)) for m in [cfg["multiple"], *cfg["extra_multiples"]]]


def _errors(row: dict) -> list[str]:
    return [f"{row['arch']} {k}: {v['error']}" for k, v in row.items() if isinstance(v, dict) and "error" in v]


def table(result: dict) -> Table:
    cfg = result["config"]
    m = cfg["multiple"]
    labels = [label for label, _ in _uniform_variants(cfg)]
    names = ["arb" if label == "arbitrary" else label.replace("x", "×") for label in labels]
    t = Table(title=f"MACs vs ORT CPU latency ({cfg['size']}×{cfg['size']}, 1 thread; ratios pruned/original)")
    columns = ["arch", "original", "uniform keep", f"MACs {' / '.join(names)}"]
    columns += [f"latency {'arbitrary' if n == 'arb' else n}" for n in names]
    columns += [f"compress@{cfg['budget']} MACs r1 / r{m}", f"latency r1 / r{m}"]
    for col in columns:
        t.add_column(col, justify="left" if col == "arch" else "right")
    for r in result["rows"]:
        if "error" in r:
            t.add_row(r["arch"], "[red]error[/]", *[""] * (len(columns) - 2), end_section=True)
            continue
        c1, c8 = r["compress_r1"], r[f"compress_r{m}"]
        for k, fraction in enumerate(cfg["keeps"]):
            us = [r[f"uniform_{fraction}_{label}"] for label in labels]
            originals = [v["latency"]["original_ms"] for v in (*us, c1, c8) if "latency" in v]
            original = float(np.median(originals)) if originals else None
            first = k == 0
            t.add_row(
                r["arch"] if first else "", _common.ms(original / 1e3) if first and original else "",
                f"{fraction:.0%}", " / ".join(_cell(u, "macs_ratio") for u in us),
                *[_cell(u, "latency_ratio") for u in us],
                f"{_cell(c1, 'macs_ratio')} / {_cell(c8, 'macs_ratio')}" if first else "",
                f"{_cell(c1, 'latency_ratio')} / {_cell(c8, 'latency_ratio')}" if first else "",
                end_section=k == len(cfg["keeps"]) - 1,
            )
    return t


def _cell(entry: dict, key: str) -> str:
    if "error" in entry:
        return "[red]error[/]"
    value = entry[key]
    if key != "latency_ratio":
        return f"{value:.2f}"
    return _styled(value) + ("?" if entry["latency"].get("noisy") else "")


def _styled(ratio: float) -> str:
    text = f"{ratio:.2f}"
    return f"[red]{text}[/]" if ratio >= 1.0 else text
