"""Area `groups`: how much of each real architecture the channel analysis can prune.

Per torchvision architecture of the test zoo (tests/zoo.py, 64×64 exports cached in tests/.cache): conv
layers, the fraction whose output channels are prunable (`onnxecc.graph.channels.prunable_fraction`), channel
groups (all / prunable / frozen) and what froze them. Graph input and output groups are always frozen; the
"frozen by" column shows the first *other* reason when there is one.
"""

from __future__ import annotations

import time

from rich.table import Table

from bench import _common

ORDER = 10
DESCRIPTION = "channel groups per architecture: prunable conv layers, frozen groups and why"
QUICK_ARCHS = ["resnet18", "mobilenet_v2", "shufflenet_v2_x1_0", "regnet_x_400mf"]
_IO = ("graph input", "graph output")


def config(quick: bool) -> dict:
    return {"archs": QUICK_ARCHS if quick else list(_common.zoo().ZOO)}


def run(quick: bool, **overrides) -> dict:
    cfg = _common.merge_config(config(quick), overrides, "groups")
    rows = [_row(arch) for arch in cfg["archs"]]
    return {"config": cfg, "rows": rows}


def _row(arch: str) -> dict:
    from onnxecc.graph import ingest
    from onnxecc.graph.channels import analyze, prunable_fraction

    row: dict = {"arch": arch}
    try:
        path = _common.zoo().export(arch)
        model = ingest.load(path)
        t = time.perf_counter()
        graph = analyze(model)
        row["analyze_s"] = time.perf_counter() - t
    except Exception as exc:
        row["error"] = _common.error_text(exc)
        return row
    convs = [lc for lc in graph.layers.values() if lc.op in ("Conv", "ConvTranspose")]
    frozen = [g for g in graph.groups if g.frozen_by]
    reasons = [g.frozen_by for g in frozen]
    other = [r for r in reasons if not r.startswith(_IO)]
    blocks = sorted({g.channels // g.size for g in graph.prunable_groups if g.size})
    row.update({
        "conv_layers": len(convs),
        "prunable_fraction": prunable_fraction(graph),
        "groups": len(graph.groups),
        "prunable_groups": len(graph.prunable_groups),
        "trivial_groups": sum(1 for g in graph.groups if g.frozen_by is None and g.size <= 1),
        "frozen_groups": len(frozen),
        "frozen_other_than_io": len(other),
        "first_reason": other[0] if other else (reasons[0] if reasons else None),
        "reasons": sorted(set(reasons)),
        "unit_blocks": blocks,  # channels per unit among prunable groups (>1: folded grouped convs)
    })
    return row


def table(result: dict) -> Table:
    t = Table(title="channel groups (tests/zoo.py exports, 64×64)")
    for col, just in (("arch", "left"), ("conv layers", "right"), ("prunable convs", "right"),
                      ("groups", "right"), ("prunable", "right"), ("frozen", "right"), ("frozen by (first)", "left"),
                      ("analyze", "right")):
        t.add_column(col, justify=just)
    for r in result["rows"]:
        if "error" in r:
            t.add_row(r["arch"], "", "", "", "", "", f"[red]{r['error']}[/]", "")
            continue
        first = r["first_reason"] or "—"
        if r["frozen_other_than_io"] == 0 and r["frozen_groups"]:
            first = "graph IO only"
        t.add_row(r["arch"], str(r["conv_layers"]), _common.pct(r["prunable_fraction"], 0), str(r["groups"]),
                  str(r["prunable_groups"]), str(r["frozen_groups"]), first, _common.secs(r["analyze_s"]))
    return t
