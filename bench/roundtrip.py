"""Area `roundtrip`: ONNX → torch → ONNX, how long each step takes and whether the model survives unchanged.

Per architecture of the test zoo (tests/zoo.py, 64×64 exports): wall time of `onnxecc.graph.ingest.load` (with the
checker), `onnxecc.graph.channels.analyze`, `onnxecc.train.bridge.to_torch` (normalise, onnx2torch, verified weight map)
and `onnxecc.train.bridge.write_back`; then the original and the written-back model run in onnxruntime on the same
random batch, and the max relative difference max|a − b| / max|a| is reported (it should be exactly 0: weights
that torch did not change are left bit-identical in the original graph).
"""

from __future__ import annotations

import numpy as np
from rich.table import Table

from bench import _common

ORDER = 40
DESCRIPTION = "load / analyze / to_torch / write_back times and the round trip's ORT difference"
STEPS = ("load", "analyze", "to_torch", "write_back")


def config(quick: bool) -> dict:
    return {"archs": ["resnet18"] if quick else list(_common.zoo().ZOO), "batch": 2, "seed": 0}


def run(quick: bool, **overrides) -> dict:
    cfg = _common.merge_config(config(quick), overrides, "roundtrip")
    import onnx2torch  # noqa: F401  (imports paid once, outside the first architecture's to_torch time)
    import torch  # noqa: F401

    rows = _common.per_arch(cfg["archs"], _row, cfg)
    return {"config": cfg, "rows": rows}


def _row(arch: str, cfg: dict) -> dict:
    from onnxecc.graph import ingest, runtime
    from onnxecc.graph.channels import analyze
    from onnxecc.train.bridge import to_torch, write_back

    path = _common.zoo().export(arch)
    times: dict = {}
    with _common.timed(times, "load"):
        model = ingest.load(path)
    with _common.timed(times, "analyze"):
        analyze(model)
    with _common.timed(times, "to_torch"):
        tm = to_torch(model)
    with _common.timed(times, "write_back"):
        back = write_back(tm)
    sess_a, sess_b = runtime.session(model), runtime.session(back)
    x = runtime.example_input(sess_a, batch=cfg["batch"], seed=cfg["seed"])
    a, b = runtime.run_batched(sess_a, x), runtime.run_batched(sess_b, x)
    diff = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-30))
    changed = sum(1 for t, u in zip(model.graph.initializer, back.graph.initializer) if t.raw_data != u.raw_data)
    return {"arch": arch, "times_s": times, "max_rel_diff": diff, "identical_bytes": back.SerializeToString() ==
            model.SerializeToString(), "initializers_changed": changed, "params_mapped": len(tm.params)}


def table(result: dict) -> Table:
    t = Table(title="round trip ONNX → torch → ONNX (tests/zoo.py exports, 64×64)")
    t.add_column("arch")
    for step in STEPS:
        t.add_column(step, justify="right")
    t.add_column("params mapped", justify="right")
    t.add_column("max rel. ORT diff", justify="right")
    t.add_column("bytes identical", justify="right")
    for r in result["rows"]:
        if "error" in r:
            t.add_row(r["arch"], f"[red]{r['error']}[/]", *[""] * (len(STEPS) + 2))
            continue
        d = r["max_rel_diff"]
        t.add_row(r["arch"], *[_common.secs(r["times_s"][s]) for s in STEPS], str(r["params_mapped"]),
                  f"{d:.1e}" if d else "0", "yes" if r["identical_bytes"] else "no")
    return t
