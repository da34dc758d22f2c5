"""Area `guarantee`: does a latency budget hold by measurement after the closed loop, and how tightly?

Per architecture of `tests/zoo.py` (torchvision, weights=None, exported at 64×64, the test suite's cached exports;
quick: 2 small ones): a latency profile (`onnxecc.profile`, ORT CPU, 1 thread, `samples` width variants; cached in
bench/.cache/profiles keyed by architecture, export, onnxruntime version and settings, so a re-run only refits
nothing and measures nothing), then for each budget (fractions of the original's latency)
`onnxecc.compress(model, budget, options=CompressOptions(metric="latency", profile=P, method="project"))` without
data — the projection only — with the closed loop on (default `max_rounds`). Per run: the rounds (internal budget
as a fraction of the original's estimated cost, the measured share of the budget, why a next round came), the
measured latency ratio of the returned output (closed loop: median side by side with the original), whether it
meets the budget, and whether it is within 10% under it (ratio ≥ 0.9 × budget; below that the output is
over-pruned and wastes accuracy). The returned model is then timed again side by side with the original
(`_common.latency_pair`, retries when noisy) — a fresh look at the verdict on a shared machine.

A budget below the smallest latency the profile can reach (frozen graph-IO groups, fixed costs) is a user error
of `compress` (exit 2, the message names the smallest reachable cost): reported as "unreachable", not as a miss.
"""

from __future__ import annotations

import time

import numpy as np
from rich.table import Table

from bench import _common

ORDER = 45
DESCRIPTION = "latency budgets 0.3/0.5/0.7 on the zoo: met by measurement after the closed loop? rounds, tightness"
WITHIN = 0.9  # a met run whose measured ratio is under WITHIN × budget is over-pruned


def config(quick: bool) -> dict:
    common = {"samples": 100, "warmup": 5, "repeats": 20, "seed": 0, "max_rounds": None, "rounds": 7, "round_s": 0.15}
    if quick:
        return {**common, "archs": ["mobilenet_v3_small", "squeezenet1_1"], "budgets": [0.3, 0.7], "samples": 40,
                "rounds": 5, "round_s": 0.1}
    return {**common, "archs": list(_common.zoo().ZOO), "budgets": [0.3, 0.5, 0.7]}


def run(quick: bool, **overrides) -> dict:
    cfg = _common.merge_config(config(quick), overrides, "guarantee")
    rows = _common.per_arch(cfg["archs"], _row, cfg)
    summary = _summary(rows)
    notes = [
        f"ORT CPUExecutionProvider, 1 thread, batch 1, 64×64 input; profiles of {cfg['samples']} samples "
        f"(warm-up {cfg['warmup']}, {cfg['repeats']} repeats); compress --method project, no data, "
        f"max_rounds {cfg['max_rounds'] or 'default (6 without data)'}.",
        "ratio = compressed / original median latency measured side by side by the closed loop (the verdict); "
        f"fresh = the returned model timed again ({cfg['rounds']} interleaved rounds; '?' = noisy). "
        "internal = the budget the projection was given, as a fraction of the original's estimated cost.",
        _summary_line(summary),
    ]
    for row in rows:
        if "error" in row:
            notes.append(f"error: {row['arch']}: {row['error']}")
        for run_ in row.get("runs", []):
            if "error" in run_:
                notes.append(f"error: {row['arch']}@{run_['budget']}: {run_['error']}")
            elif "unreachable" in run_:
                notes.append(f"unreachable: {row['arch']}@{run_['budget']}: {run_['unreachable']}")
    return {"config": cfg, "rows": rows, "summary": summary, "notes": notes}


def profile_path(export, cfg: dict):
    """The cached profile of export `export` (named after its architecture) with these settings."""
    from importlib import metadata

    ort = metadata.version("onnxruntime")
    tag = f"{export.stem}-ort{ort}-s{cfg['samples']}-w{cfg['warmup']}-r{cfg['repeats']}-seed{cfg['seed']}-paired"
    return _common.cache_dir() / "profiles" / f"{tag}.json"


def _profile(arch: str, path, cfg: dict, row: dict):
    """The cached profile of `path`, or a new one (an interrupted one resumes where it stopped)."""
    from onnxecc import profile
    from onnxecc.core.errors import UserError
    from onnxecc.cost.profiler import load_profile

    out = profile_path(path, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        try:
            prof = load_profile(out, str(path))
            row["profile_cached"] = True
            return out, prof
        except UserError:
            pass  # unfinished (no fit yet) or stale: profile() resumes or the file is replaced below
        except Exception:
            out.unlink()
    row["profile_cached"] = False
    try:
        prof = profile(str(path), out, samples=cfg["samples"], seed=cfg["seed"], warmup=cfg["warmup"],
                       repeats=cfg["repeats"], threads=1)
    except UserError:  # other settings or another structure under the same name: start again
        out.unlink(missing_ok=True)
        prof = profile(str(path), out, samples=cfg["samples"], seed=cfg["seed"], warmup=cfg["warmup"],
                       repeats=cfg["repeats"], threads=1)
    return out, prof


def _row(arch: str, cfg: dict) -> dict:
    from onnxecc.graph import ingest, runtime

    row: dict = {"arch": arch, "times_s": {}}
    path = _common.zoo().export(arch)
    with _common.timed(row["times_s"], "profile"):
        prof_path, prof = _profile(arch, path, cfg, row)
    row["profile"] = {"path": str(prof_path.relative_to(_common.REPO)) if prof_path.is_relative_to(_common.REPO)
                      else str(prof_path), "samples": len(prof.samples), "step": prof.fit.step,
                      "variant": prof.fit.variant, "profiling_s": prof.profiling_s,
                      "holdout_mean_rel_error": prof.fit.holdout.get("mean_rel_error"),
                      "holdout_max_rel_error": prof.fit.holdout.get("max_rel_error")}
    model = ingest.load(path)
    original = runtime.session(model, threads=1)
    x = runtime.example_input(original, batch=1, seed=cfg["seed"])
    row["runs"] = [_run_one(path, prof_path, budget, original, x, cfg) for budget in cfg["budgets"]]
    return row


def _run_one(path, prof_path, budget: float, original, x: np.ndarray, cfg: dict) -> dict:
    from onnxecc.compress import CompressOptions, _selected_round, compress
    from onnxecc.core.errors import UserError

    entry: dict = {"budget": budget}
    opts = CompressOptions(metric="latency", profile=str(prof_path), method="project", measure_latency=False,
                           max_rounds=cfg["max_rounds"], seed=cfg["seed"])
    t = time.perf_counter()
    try:
        res = compress(str(path), str(budget), None, opts)
    except UserError as exc:
        entry["unreachable"] = _common.error_text(exc).removeprefix("UserError: ")
        return entry
    except Exception as exc:
        entry["error"] = _common.error_text(exc)
        return entry
    entry["compress_s"] = time.perf_counter() - t
    full = res.original_cost
    entry["rounds"] = [{"round": r["round"], "internal": r["internal_budget"] / full,
                        "estimated": r["estimated_cost"] / full, "ratio": r.get("ratio"),
                        "of_budget": r.get("of_budget"), "meets": r.get("meets"), "next": r.get("next"),
                        "selected": bool(r.get("selected"))} for r in res.rounds]
    entry["n_rounds"] = len(res.rounds)
    entry["pruned"] = res.pruned
    chosen = _selected_round(res.rounds)
    entry["ratio"] = chosen.get("ratio") if chosen else None
    entry["of_budget"] = chosen.get("of_budget") if chosen else None
    entry["meets"] = bool(res.meets_budget)
    entry["within_10pct"] = entry["meets"] and entry["of_budget"] is not None and entry["of_budget"] >= WITHIN
    entry["warnings"] = [w for w in res.warnings if "no --data" not in w]
    try:
        fresh = _common.latency_pair(original, res.model, x, rounds=cfg["rounds"], round_s=cfg["round_s"])
        entry["fresh"] = fresh
        entry["fresh_ratio"] = fresh["ratio"]
        entry["fresh_meets"] = fresh["ratio"] <= budget
    except Exception as exc:
        entry["fresh"] = {"error": _common.error_text(exc)}
    return entry


def _summary(rows: list[dict]) -> dict:
    runs = [r for row in rows for r in row.get("runs", [])]
    measured = [r for r in runs if "meets" in r]
    first = [r["rounds"][0] for r in measured if r.get("rounds")]
    return {
        "runs": len(runs), "measured": len(measured),
        "unreachable": sum("unreachable" in r for r in runs),
        "errors": sum("error" in r for r in runs) + sum("error" in row for row in rows),
        "met": sum(r["meets"] for r in measured),
        "met_pct": 100.0 * sum(r["meets"] for r in measured) / len(measured) if measured else None,
        "second_round": sum(r["n_rounds"] >= 2 for r in measured),
        "first_round_over": sum(f.get("meets") is False for f in first),
        "first_round_far_under": sum(bool(f.get("meets")) and (f.get("of_budget") or 1) < WITHIN for f in first),
        "more_than_10pct_under": sum(r["meets"] and not r["within_10pct"] for r in measured),
        "fresh_met": sum(bool(r.get("fresh_meets")) for r in measured),
        "fresh_measured": sum("fresh_ratio" in r for r in measured),
    }


def _summary_line(s: dict) -> str:
    met = f"{s['met']}/{s['measured']} ({s['met_pct']:.0f}%)" if s["measured"] else "—"
    return (f"summary: budget met by measurement after the closed loop in {met} runs; "
            f"{s['second_round']} needed a 2nd round (first round over budget: {s['first_round_over']}, more than "
            f"10% under: {s['first_round_far_under']}); {s['more_than_10pct_under']} ended more than 10% under the "
            f"budget; fresh re-measurement within budget: {s['fresh_met']}/{s['fresh_measured']}; unreachable "
            f"budgets: {s['unreachable']}; errors: {s['errors']}.")


def table(result: dict) -> Table:
    cfg = result["config"]
    t = Table(title=f"Latency guarantee after the closed loop (zoo at 64×64, ORT CPU 1 thread; compress --method "
                    f"project, no data, max_rounds {cfg['max_rounds'] or 'default'}; summary under the table)")
    for col in ("arch", "profile (err, time)", "budget", "rounds", "internal budgets", "measured / budget",
                "ratio", "fresh", "met", "≥90% of budget", "time"):
        t.add_column(col, justify="left" if col in ("arch", "internal budgets", "measured / budget") else "right")
    for row in result["rows"]:
        if "error" in row:
            t.add_row(row["arch"], "[red]error[/]", *[""] * 9, end_section=True)
            continue
        p = row["profile"]
        prof = (f"{_common.pct(p['holdout_mean_rel_error'], 0)}, "
                f"{_common.secs(row['times_s']['profile'])}{' (cached)' if row.get('profile_cached') else ''}")
        runs = row["runs"]
        for k, r in enumerate(runs):
            head = (row["arch"], prof) if k == 0 else ("", "")
            last = k == len(runs) - 1
            if "unreachable" in r or "error" in r:
                what = "unreachable" if "unreachable" in r else "[red]error[/]"
                t.add_row(*head, f"{r['budget']:.2f}", what, *[""] * 7, end_section=last)
                continue
            internals = " → ".join(f"{x['internal']:.2f}" for x in r["rounds"])
            shares = " → ".join(_share(x) for x in r["rounds"])
            fresh = "—"
            if "fresh_ratio" in r:
                fresh = f"{r['fresh_ratio']:.2f}" + ("?" if r["fresh"].get("noisy") else "")
                if not r["fresh_meets"]:
                    fresh = f"[yellow]{fresh}[/]"
            t.add_row(*head, f"{r['budget']:.2f}", str(r["n_rounds"]), internals, shares,
                      _common.f2(r["ratio"]), fresh, "yes" if r["meets"] else "[red]no[/]",
                      "yes" if r["within_10pct"] else ("[yellow]no[/]" if r["meets"] else "—"),
                      _common.secs(r["compress_s"]), end_section=last)
    return t


def _share(x: dict) -> str:
    if x.get("of_budget") is None:
        return "—"
    text = f"{x['of_budget']:.2f}"
    if x.get("selected"):
        text = f"[bold]{text}[/]"
    return text if x.get("meets") else f"[red]{text}[/]"
