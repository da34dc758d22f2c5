"""Area `quantize`: precision as a second knob (issue #11) — width alone vs width + int8 at one latency budget.

Per model and latency budget, `onnxecc.compress(..., metric="latency", method=M, knobs=K)` with
K = ("width",) and ("width", "precision"), the same data, epochs and seed; where it fine-tunes, width + precision
also with `qat=False` (the `PTQ` column: fp32 fine-tuning, then post-training quantization) next to the default
quantization-aware fine-tuning. The precision measurement at full width is memoised in the process, so both runs
start from the same int8 set; timed again at the output's widths, it may be kept or dropped differently.
Demo models (digits_cnn, digits_resdw): the shipped CPU latency profiles of this CPU (else measured here), `--data
digits` (fine-tuning, held-out accuracy), seeds 0–2, method project. Torchvision archs (resnet18, mobilenet_v2):
trained from scratch on digits upsampled to 3×32×32 (`_common.digits_trained`; the same 359 held-out test images),
profiled with the `guarantee` area's settings (cached), that npz as `--data`, compress seeds 0–2 (`arch_seeds`),
method project (`arch_method`: `--set arch_method=ecc` runs compress's default with data instead; at latency 0.3 it
was no steadier on mobilenet_v2 — 55/79/26 % vs project's 60/40/85 % — and took 1.7× as long). Per model and budget
the seeds are averaged and the two knobs compared image by image (`_means`: paired counts, sign-test p). Every
output is timed again side by side with the original (`_common.latency_pair`): the `fresh` column. The precision
runs' per-layer measured int8 savings (marginal, in context, at full width) are kept in the JSON; layers measured
*slower* in int8 are listed in the notes — the profile detected them and they stayed fp32. Each profile is used with
a precision section added once (`_with_precision`: what `onnxecc profile --knobs width,precision` stores — int8 per
layer at full width and at the 25/50/75 % width anchors, cached), so compress takes the full-width measurement from
the profile (`source`) and refits the int8 cost model at pruned widths (`correction`); widths where the profile
measured the int8 layers slower than fp32 are listed in the notes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from rich.table import Table

from bench import _common

ORDER = 58
DESCRIPTION = "width vs width+int8 (QDQ) at latency budgets 0.3/0.5: accuracy at equal measured latency"
KNOBS = {"width": ("width",), "width+precision": ("width", "precision"), "ptq": ("width", "precision")}


def config(quick: bool) -> dict:
    if quick:
        return {"models": ["digits_cnn"], "archs": [], "budgets": [0.5], "epochs": 5, "seed": 0, "seeds": [0],
                "rounds": 5, "round_s": 0.1, "torch_threads": 1, "arch_train_epochs": 12, "arch_epochs": 1,
                "arch_torch_threads": 2, "arch_seeds": [0], "method": "project", "arch_method": "project"}
    return {"models": ["digits_cnn", "digits_resdw"], "archs": ["resnet18", "mobilenet_v2"], "budgets": [0.3, 0.5],
            "epochs": None, "seed": 0, "seeds": [0, 1, 2], "rounds": 7, "round_s": 0.15, "torch_threads": 1,
            "arch_train_epochs": 12, "arch_epochs": 2, "arch_torch_threads": 2, "arch_seeds": [0, 1, 2],
            "method": "project", "arch_method": "project"}


def run(quick: bool, **overrides) -> dict:
    cfg = _common.merge_config(config(quick), overrides, "quantize")
    rows = []
    with _common.torch_threads(cfg["torch_threads"]):
        for name in cfg["models"]:
            path = _common.MODELS / f"{name}.onnx"
            prof = _with_precision(path, _profile_here(name, path), None)
            for budget in cfg["budgets"]:
                for seed in cfg["seeds"]:  # one test image is 0.28 %: the verdict is on the mean over seeds
                    row = _pair_row(name, path, str(prof), "digits", budget, {**cfg, "seed": seed})
                    rows.append({**row, "seed": seed, "profile": Path(prof).name})
        for arch in cfg["archs"]:
            try:
                path, prof, data, trained = _arch_setup(arch, cfg)
                prof = _with_precision(path, prof, data)
            except Exception as exc:
                rows.append({"model": arch, "error": _common.error_text(exc)})
                continue
            for budget in cfg["budgets"]:  # no PTQ column: every torchvision run is minutes (3 rounds that train)
                for seed in cfg["arch_seeds"]:  # compress's seed; the trained model is the same
                    with _common.torch_threads(cfg["arch_torch_threads"]):
                        row = _pair_row(arch, path, str(prof), str(data), budget,
                                        {**cfg, "epochs": cfg["arch_epochs"], "seed": seed,
                                         "method": cfg["arch_method"]}, ptq=False)
                    rows.append({**row, "seed": seed, "trained": trained})
    notes = [
        f"ORT CPUExecutionProvider, 1 thread, batch 1. method {cfg['method']} (demo models), {cfg['arch_method']} "
        "(torchvision archs). int8 layers: static QDQ quantization "
        "(per-channel int8 weights, uint8 activations, MinMax calibration on 128 samples of the data); "
        "width+precision fine-tunes them under fake quantization (QAT), PTQ (--no-qat) in fp32.",
        "closed = closed-loop measured latency ratio of the returned output (the verdict); fresh = timed again side "
        f"by side ({cfg['rounds']} rounds). Torchvision rows: the architecture (weights=None, 10 classes) trained "
        f"from scratch for {cfg['arch_train_epochs']} epochs on digits upsampled to 3×{_common.DIGITS_SIZE}×"
        f"{_common.DIGITS_SIZE} (the same held-out 359 images), profiled like area `guarantee`, compress "
        f"--epochs {cfg['arch_epochs']} (after ecc's 10 epochs of ADMM; method project trains as many in all) "
        f"with {cfg['arch_torch_threads']} torch threads (ORT still timed on 1); seeds {cfg['arch_seeds']}, no "
        "PTQ column (each run is minutes).",
        "Fine-tuning rate: --lr auto (from the pruned weights, one pass over up to 1024 training samples at each of "
        "2e-3, 5e-4, 1.25e-4, the lowest loss on them afterwards wins; each run's probe losses are in the JSON, "
        "`lr_probe`).",
        "mean rows: accuracy over the seeds; paired = held-out images width+precision classified right and width "
        "alone wrong / the reverse, summed over the seeds, with the exact two-sided sign-test p (McNemar): one test "
        "image is 0.28%, and a difference of a few images between two runs of the same knob is run-to-run noise.",
    ]
    for name in cfg["models"]:
        used = next((r["profile"] for r in rows if r["model"] == name and "profile" in r), None)
        if used:
            notes.append(f"{name}: latency profile {used}")
    for arch in cfg["archs"]:
        trained = next((r["trained"] for r in rows if r["model"] == arch and "trained" in r), None)
        if trained:
            notes.append(f"{arch} trained on digits: {100 * trained['accuracy']:.2f}% held-out accuracy "
                         f"({trained['train_s']:.0f} s)")
    for r in rows:
        if "error" in r:
            notes.append(f"error: {r['model']}: {r['error']}")
            continue
        p = r.get("width+precision", {})
        if "unreachable" in p or "unreachable" in r.get("width", {}):
            notes.append(f"unreachable: {r['model']}@{r['budget']}: "
                         f"{(p.get('unreachable') or r['width'].get('unreachable'))[:150]}")
        slow_widths = {k: v for k, v in (p.get("profile_int8_samples") or {}).items() if v > 1}
        if slow_widths and not any(n.startswith(f"{r['model']} profile:") for n in notes):
            notes.append(f"{r['model']} profile: the chosen int8 layers measured SLOWER than fp32 at "
                         + ", ".join(f"{k} ({v:.2f}×)" for k, v in slow_widths.items())
                         + f"; the int8 cost model was refitted to that (correction {p.get('correction')})")
        slower = p.get("slower_in_int8") or []
        if slower and not any(n.startswith(f"{r['model']}:") for n in notes):
            notes.append(f"{r['model']}: int8 measured slower than fp32 (kept fp32): "
                         + ", ".join(f"{n} {s * 1e6:+.1f} µs" for n, s in slower))
    return {"config": cfg, "rows": rows, "notes": notes, "means": _means(rows)}


def _means(rows: list[dict]) -> list[dict]:
    """Per model and budget: each variant's accuracy averaged over the seeds (reachable rows only), and the paired
    image counts of width+precision against width alone (`_paired`)."""
    out = {}
    for r in rows:
        if "seed" not in r or any("unreachable" in r.get(k, {}) for k in ("width", "width+precision")):
            continue
        m = out.setdefault((r["model"], r["budget"]), {"model": r["model"], "budget": r["budget"], "n": 0,
                                                       "better": 0, "worse": 0})
        m["n"] += 1
        for k in KNOBS:
            if r.get(k) and r[k].get("accuracy") is not None:
                m[k] = m.get(k, 0.0) + r[k]["accuracy"]
        better, worse = _paired(r["width"].get("wrong"), r["width+precision"].get("wrong"))
        m["better"], m["worse"] = m["better"] + better, m["worse"] + worse
    for m in out.values():
        for k in KNOBS:
            if k in m:
                m[k] /= m["n"]
        m["p"] = sign_test_p(m["better"], m["worse"])
    return list(out.values())


def _paired(wrong_width, wrong_both) -> tuple[int, int]:
    """(images width+precision got right and width alone wrong, the reverse), from each run's wrong test images."""
    if wrong_width is None or wrong_both is None:
        return 0, 0
    a, b = set(wrong_width), set(wrong_both)
    return len(a - b), len(b - a)


def sign_test_p(better: int, worse: int) -> float:
    """Exact two-sided sign test (McNemar's on the discordant images): the chance of a split at least this uneven
    if either knob were as likely to win each image."""
    n, k = better + worse, min(better, worse)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def _with_precision(path, prof, data) -> str:
    """A copy of the latency profile `prof` with its `precision` section (what `onnxecc profile --knobs
    width,precision` adds: int8 per layer at full width and at the 25/50/75 % width anchors), cached next to the
    other bench profiles; compress then uses it instead of measuring int8 at full width itself. Calibration: the
    bench data (digits training split, or the npz of random inputs)."""
    import json

    from onnxecc.cost.profiler import ModelInfo, load_profile, precision_section

    out = _common.cache_dir() / "profiles" / (Path(prof).stem + ".int8sets.json")  # the set choice (`candidate_sets`)
    try:
        if load_profile(out, str(path)).precision is not None:
            return str(out)
    except Exception:
        pass
    loaded = load_profile(prof, str(path))
    if data is None:
        from onnxecc.graph.data import load_digits

        x = load_digits(0).x_train[:128]
    else:
        x = np.load(data, allow_pickle=False)["x"][:128]
    loaded.precision = precision_section(ModelInfo.of(str(path)), loaded, x)
    out.parent.mkdir(parents=True, exist_ok=True)
    loaded.save(out)
    json.loads(out.read_text())  # plain JSON
    return str(out)


def _profile_here(name: str, path) -> Path:
    """The shipped profile when it was measured on this CPU, else one measured here (cached, area `guarantee`'s
    settings): a latency model fitted on another machine mispredicts this one (the AMD EPYC profiles on an Intel
    Xeon: every demo output over a 0.3/0.5 budget after the closed loop's rounds)."""
    from bench import guarantee
    from onnxecc.cost.profiler.store import for_this_cpu

    shipped = sorted((_common.MODELS.parent / "profiles").glob(f"{name}.cpu*.json"))
    return for_this_cpu(shipped, str(path)) or guarantee._profile(name, path, guarantee.config(False), {})[0]


def _arch_setup(arch: str, cfg: dict):
    """`arch` trained on upsampled digits (`_common.digits_trained`), its latency profile (cached like area
    `guarantee`'s), the npz of its data, and the trained model's test accuracy and training time."""
    from bench import guarantee

    path, data, trained = _common.digits_trained(arch, epochs=cfg["arch_train_epochs"])
    prof, _ = guarantee._profile(arch, path, guarantee.config(False), {})
    return path, prof, data, trained


def _pair_row(name: str, path, profile: str, data: str, budget: float, cfg: dict, ptq: bool = True) -> dict:
    row = {"model": name, "budget": budget}
    for label, knobs in KNOBS.items():
        if label == "ptq" and (not ptq or cfg["epochs"] == 0):
            continue  # no fine-tuning: QAT and PTQ are the same run
        row[label] = _run(path, profile, data, budget, knobs, cfg, qat=label != "ptq")
    return row


def _run(path, profile: str, data: str, budget: float, knobs, cfg: dict, qat: bool = True) -> dict:
    from onnxecc.compress import CompressOptions, compress
    from onnxecc.core.errors import UserError
    from onnxecc.graph import ingest, runtime
    from onnxecc.graph.data import load_data

    opts = CompressOptions(metric="latency", profile=profile, data=data, method=cfg["method"], seed=cfg["seed"],
                           measure_latency=False, knobs=knobs, qat=qat)
    if cfg["epochs"] is not None:
        opts.epochs = int(cfg["epochs"])
    t = time.perf_counter()
    try:
        res = compress(str(path), str(budget), None, opts)
    except UserError as exc:
        return {"unreachable": str(exc)}
    wall = time.perf_counter() - t
    test = load_data(data, num_classes=None)  # compress's split: its held-out images, and the timed input
    fresh = _common.latency_pair(ingest.load(path), res.model, test.x_test[:1], rounds=cfg["rounds"],
                                 round_s=cfg["round_s"])
    predicted = runtime.run_batched(runtime.session(res.model), test.x_test).argmax(1)
    chosen = next((r for r in res.rounds if r.get("selected")), res.rounds[-1] if res.rounds else {})
    out = {"accuracy": res.accuracy_after, "accuracy_before": res.accuracy_before,
           "agreement": res.agreement, "closed_ratio": chosen.get("ratio"), "fresh_ratio": fresh["ratio"],
           "noisy": fresh["noisy"], "meets": res.meets_budget, "rounds": len(res.rounds), "wall_s": wall,
           "estimated_fraction": res.estimated_cost / res.original_cost,
           "widths": {str(g): k for g, (k, _) in res.widths.items()},
           "wrong": np.flatnonzero(predicted != test.y_test).tolist(),  # held-out images, for the paired count
           "lr_probe": [{k: h[k] for k in ("lr", "loss", "chosen")} for h in res.history
                        if h.get("phase") == "lr_probe"]}
    if res.precision:
        layers = res.precision["measured"]["layers"]
        out["int8_layers"] = res.precision["int8_layers"]
        out["qat_layers"] = res.precision["qat_layers"]
        out["candidates"] = len(layers)
        out["ratio_all_int8"] = res.precision["measured"]["ratio_all_int8"]
        out["ratio_chosen_full_width"] = res.precision["measured"]["ratio_chosen"]
        out["sets_full_width"] = res.precision["measured"].get("sets", {})
        out["per_layer"] = {n: {"saving_us": v["saving_ms"] * 1e3, "saving_fraction": v["saving_fraction"],
                                "precision": v["precision"], "cost_factor": v["cost_factor"]}
                            for n, v in layers.items()}
        out["slower_in_int8"] = [(n, v["saving_ms"] / 1e3) for n, v in layers.items()
                                 if v["saving_ms"] < 0 and "SLOWER" in v["reason"]]
        out["at_output_widths"] = [{"ratio_chosen": r["ratio_chosen"], "int8": len(r["int8_layers"]),
                                    "when": r.get("when")} for r in res.precision["at_output_widths"]]
        out["source"] = res.precision["source"].split(":")[0]
        from onnxecc.cost.profiler import load_profile

        stored = load_profile(profile).precision or {}
        out["profile_int8_samples"] = {smp["kind"]: smp["int8_ms"] / smp["fp32_ms"]
                                       for smp in stored.get("samples", [])}
        out["correction"] = res.precision["correction_at_pruned_widths"]
        out["closed_rounds"] = [{k: r.get(k) for k in ("internal_budget", "estimated_cost", "ratio", "meets", "next",
                                                       "int8_measured")} for r in res.rounds]
    return out


def table(result: dict) -> Table:
    t = Table(title="width vs width+precision (int8 QDQ) at latency budgets — ORT CPU, 1 thread; held-out "
                    "accuracy at the measured latency ratio")
    for col in ("model", "budget", "width: acc / closed / fresh", "width+precision: acc / closed / fresh",
                "int8 layers", "≥ width?", "PTQ (no QAT): acc / int8", "meets"):
        t.add_column(col, justify="left" if col in ("model", "budget") else "right")
    for r in result["rows"]:
        if "error" in r:
            t.add_row(r["model"], "", f"[red]error[/] {r['error'][:60]}", "", "", "", "", "")
            continue
        w, p = r["width"], r["width+precision"]
        if "unreachable" in w or "unreachable" in p:
            t.add_row(r["model"], str(r["budget"]), "[yellow]unreachable[/]" if "unreachable" in w else _cell(w),
                      "[yellow]unreachable[/]" if "unreachable" in p else _cell(p), "", "", "", "")
            continue
        verdict = "yes" if p["accuracy"] >= w["accuracy"] - 1e-12 else "[red]no[/]"
        t.add_row(r["model"] + (f" s{r['seed']}" if "seed" in r else ""), str(r["budget"]), _cell(w), _cell(p),
                  f"{len(p.get('int8_layers', []))}/{p.get('candidates', 0)}",
                  verdict, _ptq_cell(r.get("ptq")),
                  ("yes" if w["meets"] else "[red]no[/]") + " / " + ("yes" if p["meets"] else "[red]no[/]"))
    for m in result.get("means", []):
        if m["n"] < 2:
            continue
        better = m["width+precision"] >= m["width"] - 1e-12
        paired = f" (+{m.get('better', 0)}/−{m.get('worse', 0)} images, p={m.get('p', 1.0):.2f})"
        t.add_row(f"{m['model']} (mean of {m['n']})", str(m["budget"]), f"{100 * m['width']:.2f}%",
                  f"{100 * m['width+precision']:.2f}%", "", ("yes" if better else "[red]no[/]") + paired,
                  f"{100 * m['ptq']:.2f}%" if "ptq" in m else "", "")
    return t


def _ptq_cell(d: dict | None) -> str:
    if not d:
        return "n/a"  # no fine-tuning (QAT = PTQ), or a result from before the column
    if "unreachable" in d:
        return "unreachable"
    return f"{100 * d['accuracy']:.2f}% / {len(d.get('int8_layers', []))}"


def _cell(d: dict) -> str:
    acc = f"{100 * d['accuracy']:.2f}%"
    noisy = "?" if d.get("noisy") else ""
    return f"{acc} / {_common.f2(d['closed_ratio'], 3)} / {d['fresh_ratio']:.3f}{noisy}"
