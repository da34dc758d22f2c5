"""Benchmark of the offline phase: how well the bilinear model fits measured latency/energy, and what it costs.

    from onnxecc.cost.profiler.bench import bench_profile, format_table
    rows = [bench_profile("models/digits_cnn.onnx", samples=200), ...]
    print(format_table(rows))

or `python -m onnxecc.cost.profiler.bench MODEL.onnx ... [--samples N] [--step auto|1|16] [--meter latency|cputime]`.
For every model it profiles from scratch (a temporary file unless `output` is given) and reports the held-out
mean/max relative error of plain NNLS (the paper's fit), NNLS weighted by 1/measurement, and the variant
chosen by cross-validation; the error of the chosen fit when evaluated on actual (unsnapped) widths, which is
what the projection uses; the same fit on each sample's fastest run ("on min"); on the held-out samples that
cost 30–70 % of the full model, the global fit against one weighted around 50 % (`profile_cost(around=0.5)`);
the measurement noise (median IQR/median over samples); and the wall time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxecc.cost.profiler import ModelInfo, profile, sample_arrays
from onnxecc.cost.profiler import fit as fitting


def _pair(info: dict | None) -> tuple[float | None, float | None]:
    if not info:
        return None, None
    return info.get("mean_rel_error"), info.get("max_rel_error")


def bench_profile(model: str | os.PathLike, *, samples: int = 200, step: int | str = "auto", meter: str = "latency",
                  warmup: int = 10, repeats: int = 30, seed: int = 0, threads: int = 1,
                  output: str | os.PathLike | None = None, on_progress=None) -> dict:
    """Profile `model` and report the fit quality of each model form on the held-out samples."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(output) if output is not None else Path(tmp) / "profile.json"
        prof = profile(model, path, samples=samples, step=step, meter=meter, warmup=warmup, repeats=repeats,
                       seed=seed, threads=threads, on_progress=on_progress)
    wall = time.perf_counter() - t0
    cands = prof.fit.variants["candidates"]
    row = {
        "model": Path(model).name, "samples": len(prof.samples), "step": prof.settings["step"],
        "meter": prof.meter["spec"], "metric": prof.metric, "layers": len(prof.layers),
        "prunable_variables": sum(1 for v in prof.variables if v.get("prunable")),
        "full": next((s["value"] for s in prof.samples if s["kind"] == "full"), None),
        "noise_median_rel_iqr": prof.fit.variants["noise"]["median_rel_iqr"],
        "plain": _pair(cands.get("plain", {}).get("holdout")),
        "weighted": _pair(cands.get("weighted", {}).get("holdout")),
        "chosen": prof.fit.variant, "chosen_err": _pair(prof.fit.holdout),
        "as_bilinear": _pair(prof.fit.variants["bilinear_holdout"]),
        "profiling_s": prof.profiling_s, "wall_s": wall,
    }
    info = ModelInfo.of(model)
    widths, y, kinds = sample_arrays(prof)
    cand = fitting.Candidate(prof.fit.weighting, int(prof.fit.step), "linear" in prof.fit.variant)
    if all(s.get("min") for s in prof.samples):  # the same fit on each sample's fastest run (for reference)
        y_min = np.array([s["min"] for s in prof.samples])
        res = fitting.fit_profile(info.features, widths, y_min, kinds, seed=seed, only=cand)
        row["chosen_err_on_min"] = _pair(res.holdout)
    # near a budget of half the full cost: the global fit vs a fit weighted around it (profile_cost(around=0.5))
    train, test = fitting.split(kinds, seed)
    full = y[kinds.index("full")] if "full" in kinds else y.max()
    band = test[(y[test] >= 0.3 * full) & (y[test] <= 0.7 * full)]
    if len(band):
        glob = fitting.fit_candidate(info.features, widths[train], y[train], cand)
        weights = np.maximum(0.05, np.exp(-0.5 * (np.log(y[train] / (0.5 * full)) / 0.35) ** 2))
        local = fitting.fit_candidate(info.features, widths[train], y[train], cand, sample_weights=weights)
        row["near_half"] = {"n": len(band),
                            "global": _pair(fitting.errors(glob.predict(info.features, widths[band]), y[band])),
                            "local": _pair(fitting.errors(local.predict(info.features, widths[band]), y[band]))}
    return row


def _pct(pair) -> str:
    mean, mx = pair if pair else (None, None)
    return "-" if mean is None else f"{mean:.1%} / {mx:.1%}"


def format_table(rows: list[dict]) -> str:
    head = ["model", "samples", "step", "meter", "plain NNLS", "weighted", "chosen (variant)", "as bilinear",
            "on min", "0.3-0.7 global → local (n)", "noise", "time"]
    lines = [head]
    for r in rows:
        near = r.get("near_half")
        near = f"{_pct(near['global'])} → {_pct(near['local'])} ({near['n']})" if near else "-"
        lines.append([r["model"], str(r["samples"]), str(r["step"]), r["meter"], _pct(r["plain"]), _pct(r["weighted"]),
                      f"{_pct(r['chosen_err'])} ({r['chosen']})", _pct(r["as_bilinear"]),
                      _pct(r.get("chosen_err_on_min")), near, f"{r['noise_median_rel_iqr']:.1%}",
                      f"{r['wall_s']:.0f} s"])
    widths = [max(len(line[k]) for line in lines) for k in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n(held-out relative error, mean / max; noise = median IQR/median of the samples)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--step", default="auto")
    parser.add_argument("--meter", default="latency")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    rows = []
    for m in args.models:
        rows.append(bench_profile(m, samples=args.samples, step=args.step, meter=args.meter, repeats=args.repeats,
                                  warmup=args.warmup))
        print(format_table(rows[-1:]), flush=True)
    print(format_table(rows))


if __name__ == "__main__":
    main()
