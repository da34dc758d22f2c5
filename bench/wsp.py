"""Area `wsp`: the known-hardware path (weighted sparse projection, `onnxecc.methods.wsp`).

* Projection speed: the threshold search (weighted histogram of log-ratios, then a sort of one bin) against
  the full sort of all V²/c ratios, on 1 M / 5 M / 25 M synthetic weights — same support required.
* Accuracy (full run only): wsp against global magnitude pruning cut at the same *modelled* energy, same
  training schedule, on the digits demos at budgets 0.2 / 0.4, mean ± std over seeds; file-size ratio of the
  sparse ONNX vs dense; onnxruntime output of the sparse file equals the dense-with-zeros model.
* Precision (full run only): on digits_cnn at modelled-energy budget 0.2, wsp with width alone (16-bit energies)
  against `--knobs width,precision` (every layer at eyeriss.json's 8-bit energies, written as int8 QDQ).
"""

from __future__ import annotations

from rich.table import Table

from bench import _common

ORDER = 60
DESCRIPTION = "weighted sparse projection speed (1M/5M/25M) and wsp vs magnitude pruning accuracy"


def config(quick: bool) -> dict:
    return {"sizes": [1e6, 5e6] if quick else [1e6, 5e6, 25e6], "accuracy": not quick, "seeds": [0, 1, 2],
            "budgets": [0.2, 0.4], "epochs": 15, "precision": not quick, "precision_budgets": [0.2, 0.05]}


def run(quick: bool, **overrides) -> dict:
    from onnxecc.methods.wsp import bench_wsp_accuracy, bench_wsp_projection

    cfg = _common.merge_config(config(quick), overrides, "wsp")
    out: dict = {"config": cfg, "projection": bench_wsp_projection(tuple(cfg["sizes"]))}
    if cfg["accuracy"]:  # already one row per (model, budget, method): mean ± std over the seeds
        summary = bench_wsp_accuracy(tuple(cfg["seeds"]), tuple(cfg["budgets"]), epochs=cfg["epochs"])
        out["accuracy"] = [{k: v for k, v in r.items() if k != "runs"} for r in summary]
    if cfg.get("precision"):  # width alone vs width + int8 on the modelled accelerator
        from pathlib import Path

        cnn = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"
        summary = bench_wsp_accuracy(tuple(cfg["seeds"]), tuple(cfg["precision_budgets"]), models=[cnn],
                                     epochs=cfg["epochs"], methods=("wsp", "wsp+int8"))
        out["precision"] = [{k: v for k, v in r.items() if k != "runs"} for r in summary]
    return out


def table(result: dict) -> Table:
    t = Table(title="weighted sparse projection: threshold search vs full sort (same support)")
    for name in ("weights", "threshold", "full sort", "speed-up", "same answer"):
        t.add_column(name, justify="right")
    for r in result["projection"]:
        t.add_row(f"{r['weights'] / 1e6:.0f} M", _common.secs(r["threshold_s"]), _common.secs(r["sort_s"]),
                  f"{r['speedup']:.1f}×", "yes" if r["same_answer"] else "[red]NO[/]")
    for r in result.get("accuracy", []) + result.get("precision", []):
        acc = (f"{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f} (n={r['n']})" if r["accuracy_mean"] is not None
               else f"— ({r['note']})")
        ratio = f"file {r['file_ratio']:.2f}" if r["file_ratio"] is not None else ""
        energy = f"energy ≤ {r['energy_fraction']:.4f}" if r["energy_fraction"] is not None else ""
        same = "" if r["accuracy_mean"] is None else ("ort ok" if r["ort_sparse_equals_dense"] else "[red]ORT DIFF[/]")
        t.add_row(f"{r['model']} @{r['budget']} {r['method']}", acc, ratio, energy, same)
    return t
