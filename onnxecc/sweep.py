"""`onnxecc sweep`: one `compress` per (budget, method), a table of the points and an accuracy-vs-cost plot.

Every finished point is written to `OUTDIR/<method>_<budget>.onnx` + `.json` and then `OUTDIR/sweep.json`
is rewritten atomically, so an interrupted sweep leaves a valid summary and a rerun with the same settings
(same options, same model file) skips the points already done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from onnxecc.compress import CompressOptions, compress
from onnxecc.core import atomic
from onnxecc.core.errors import ExplainedFailure, UserError
from onnxecc.graph import ingest

SWEEP_FILE = "sweep.json"
FORMAT = 1


@dataclass
class SweepResult:
    """What `sweep` did; `as_dict()` is `sweep.json`."""

    model: str
    model_sha256: str
    outdir: Path
    metric: str
    options: dict
    points: list[dict] = field(default_factory=list)
    original_accuracy: float | None = None
    original_cost: float | None = None
    plot: Path | None = None
    computed: int = 0  # points computed in this run (the others were reused or skipped)

    def as_dict(self) -> dict:
        from onnxecc.methods.result import tool_version

        return {"tool": "onnxecc", "version": tool_version(), "format": FORMAT, "model": self.model,
                "model_sha256": self.model_sha256, "metric": self.metric, "options": self.options,
                "original": {"accuracy": self.original_accuracy, "cost": self.original_cost},
                "plot": str(self.plot) if self.plot else None, "points": self.points}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def point_name(method: str, budget: str) -> str:
    """`ecc_0.3`, `uniform_30pct`: a file-name-safe stem for one point."""
    text = budget.strip().replace("%", "pct")
    return f"{method}_{re.sub(r'[^A-Za-z0-9.]+', '_', text)}"


def _settings_key(model_sha: str, options: dict, budget: str, method: str) -> str:
    blob = json.dumps({"model": model_sha, "options": options, "budget": budget, "method": method}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_previous(path: Path) -> dict[str, dict]:
    """Rows of an earlier sweep.json by point name; an unreadable file means nothing to reuse."""
    try:
        data = json.loads(path.read_text())
        return {row["name"]: row for row in data.get("points", []) if isinstance(row, dict) and "name" in row}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _reusable(row: dict | None, key: str) -> bool:
    if not row or row.get("key") != key:
        return False
    if row.get("status") == "skipped":
        return True  # same settings, same refusal (e.g. below the reachable minimum)
    return row.get("status") == "done" and all(row.get(k) and Path(row[k]).exists() for k in ("model", "report"))


def sweep(model: str | os.PathLike, budgets: list[str], methods: list[str], outdir: str | os.PathLike,
          options: CompressOptions | None = None, plot: str | os.PathLike | None = None,
          on_event: Callable[[str, dict], None] | None = None, plot_x: str = "cost") -> SweepResult:
    """Compress `model` at every budget with every method into `outdir`; see the module docstring.

    `on_event(kind, info)`: "point" (info: budget, method, name, status = start|reused|done|skipped, row),
    and the events of `compress` while a point runs.
    """
    emit = on_event or (lambda kind, info: None)
    options = options or CompressOptions()
    budgets = [b.strip() for b in budgets if b.strip()]
    methods = [m.strip() for m in methods if m.strip()]
    if not budgets or not methods:
        raise UserError("--budgets and --methods need at least one value each (comma-separated)")
    if plot_x not in ("cost", "latency"):
        raise UserError(f"--plot-x {plot_x!r}: choose cost or latency")
    model_path = Path(model)
    if not model_path.is_file():
        raise UserError(f"model file not found: {model_path}")
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output directory {out} is a file: give a directory")
    out.mkdir(parents=True, exist_ok=True)
    if plot is not None:
        atomic.check_output_path(plot)

    sha = file_sha256(model_path)
    opts_dict = {k: v for k, v in dataclasses.asdict(options).items() if k != "method"}
    summary_path = out / SWEEP_FILE
    previous = _load_previous(summary_path)
    result = SweepResult(str(model_path), sha, out, options.metric, opts_dict)

    points = [(b, m) for b in budgets for m in methods]
    rows: dict[str, dict] = {}
    order = [point_name(m, b) for b, m in points]
    if len(set(order)) != len(order):
        raise UserError("two budgets or methods map to the same output name: remove the duplicates")
    _refuse_overwriting_input(model_path, out, order, plot)

    def save() -> None:
        result.points = [rows[n] for n in order if n in rows]
        _fill_original(result)
        atomic.write_json(summary_path, result.as_dict())

    for budget, method in points:
        name = point_name(method, budget)
        key = _settings_key(sha, opts_dict, budget, method)
        info = {"budget": budget, "method": method, "name": name}
        if _reusable(previous.get(name), key):
            rows[name] = previous[name]
            emit("point", {**info, "status": "reused", "row": rows[name]})
            continue
        emit("point", {**info, "status": "start"})
        model_out, report_out = out / f"{name}.onnx", out / f"{name}.json"
        t0 = time.perf_counter()
        try:
            res = compress(model_path, budget, model_out, dataclasses.replace(options, method=method),
                           report=report_out, on_event=on_event)
        except (UserError, ExplainedFailure) as exc:  # this point cannot be made (its line says why): the next ones can
            rows[name] = {"name": name, "key": key, "budget": budget, "method": method, "status": "skipped",
                          "message": str(exc), "time_s": time.perf_counter() - t0}
        else:
            rep = res.as_dict()
            rows[name] = {
                "name": name, "key": key, "budget": budget, "method": method, "status": "done",
                "budget_fraction": rep["budget"]["fraction"], "budget_absolute": rep["budget"]["absolute"],
                "original_cost": res.original_cost, "estimated_cost": res.estimated_cost,
                "counted_cost": res.counted_cost, "cost_fraction": rep["cost_fraction"],
                "latency_ratio": rep["latency_ratio"], "accuracy_before": res.accuracy_before,
                "accuracy_after": res.accuracy_after, "agreement": res.agreement,
                "meets_budget": res.meets_budget, "time_s": time.perf_counter() - t0,
                "model": str(res.output) if res.output else str(model_out), "report": str(report_out),
            }
            result.computed += 1
        save()  # after every point: an interrupted sweep leaves a valid summary to resume from
        emit("point", {**info, "status": rows[name]["status"], "row": rows[name]})

    if plot is not None:
        result.plot = plot_sweep(result, plot, x=plot_x)
    save()
    return result


def _refuse_overwriting_input(model: Path, out: Path, names: list[str], plot) -> None:
    """No output of the sweep (a point's model or report, sweep.json, the plot) may replace the input model or
    the external data it reads: every later point compresses it again. Checked before the first point."""
    written = [f for n in names for f in ingest.files_written(out / f"{n}.onnx")]
    written += [p for p in [*(out / f"{n}.json" for n in names), out / SWEEP_FILE] if p.exists()]
    inputs = ingest.model_files(model) if written or (plot is not None and Path(plot).exists()) else []
    atomic.refuse_input(out, written, inputs, "-o", "give the sweep another output directory")
    if plot is not None and Path(plot).exists():
        atomic.refuse_input(plot, [Path(plot)], inputs, "--plot", "give another --plot")


def _fill_original(result: SweepResult) -> None:
    for row in result.points:
        if row.get("status") == "done":
            result.original_accuracy = row.get("accuracy_before")
            result.original_cost = row.get("original_cost")
            return


def plot_sweep(result: SweepResult, path: str | os.PathLike, x: str = "cost") -> Path:
    """Accuracy (y) vs cost fraction or measured latency ratio (x), one line per method; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = atomic.check_output_path(path)
    xkey = "cost_fraction" if x == "cost" else "latency_ratio"
    xlabel = (f"{result.metric} of the original (fraction)" if x == "cost"
              else "measured latency / original (onnxruntime CPU, 1 thread)")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    try:
        methods = list(dict.fromkeys(row["method"] for row in result.points))
        plotted = 0
        for method in methods:
            pts = sorted((row[xkey], row["accuracy_after"]) for row in result.points
                         if row["method"] == method and row.get("status") == "done"
                         and row.get(xkey) is not None and row.get("accuracy_after") is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
                plotted += 1
        if result.original_accuracy is not None:
            ax.plot([1.0], [result.original_accuracy], marker="*", markersize=14, color="black",
                    linestyle="none", label="original")
        if x == "cost":
            fractions = sorted({row["budget_fraction"] for row in result.points
                                if row.get("budget_fraction") is not None})
            for i, f in enumerate(fractions):
                ax.axvline(f, color="gray", linestyle=":", linewidth=1, label="budgets" if i == 0 else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{Path(result.model).name}: accuracy vs {result.metric}")
        ax.grid(alpha=0.3)
        if plotted or result.original_accuracy is not None:
            ax.legend(loc="lower right")
        fig.tight_layout()
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
        try:
            fig.savefig(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)
    return path
