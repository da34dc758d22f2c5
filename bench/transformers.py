"""Area `transformers`: attention heads and hidden widths of transformer exports (issue #25).

Two parts, each through the CLI as a user runs it (subprocesses):

- **data-free**: torchvision `vit_b_16` and `swin_t` (weights=None, 224², TorchScript exporter, dynamic batch) and
  the test zoo's BERT-style encoder (HF-style q/k/v, int64 `input_ids` + `attention_mask`, batch and sequence
  symbolic): `inspect --json`, `compress --budget 0.5 --metric macs`, `validate`. Per model: the channel groups
  (prunable / approximate / frozen), heads before → after per attention layer and the feed-forward widths
  before → after (the report's kept widths, named by `inspect`'s groups), the counted MACs ratio, compress's
  side-by-side ORT latency ratio and validate's exit code.
- **trained**: a small ViT on the bundled digits (`onnxecc.graph.data.load_digits(seed)`, the split `--data digits
  --seed S` uses) and a small BERT-style classifier on a generated word-score task (`lexicon_task`: 4 classes, a
  random lexicon, variable length, an attention mask), trained in torch per seed and exported. onnxecc compresses
  each at MACs 0.3 and at latency 0.5 (a profile measured here, `onnxecc profile`, cached; a latency budget under
  the smallest latency the model can reach is refused by compress in one line: it is then raised to the next 0.05
  above that floor, and both are recorded and shown) with `--data` (ecc: ADMM, then fine-tuning by distillation).
  Torch-Pruning prunes the same torch model — whole heads and the feed-forward widths; the residual width too only
  where those cannot reach the MACs; the pooler and classifier whole — to the MACs of the budget (latency: to the
  MACs onnxecc's output has), fine-tunes it for as many epochs as onnxecc trained in all (ADMM + fine-tuning) with
  the same loop and distillation (`train.finetune`, the rate chosen by the same probe), and is exported. Both files
  are then measured side by side in onnxruntime: test accuracy, MACs ratio (counted by onnxecc on the file) and the
  latency ratio against the original (`_common.latency_pair`). Mean ± std over the seeds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.table import Table

from bench import _common

ORDER = 97
DESCRIPTION = "transformers: heads + MLP widths data-free (vit_b_16, swin_t, BERT-style) and trained vs Torch-Pruning"

TRAINED = ("vit_digits", "text_lexicon")


def config(quick: bool) -> dict:
    cfg = {
        "datafree": ["vit_b_16", "swin_t", "bert_encoder"], "datafree_budget": "0.5", "image_size": 224,
        "text_shape": 64,  # the BERT-style encoder analysed at batch 1 × 64 tokens (its position table's length)
        "trained": list(TRAINED), "seeds": [0, 1, 2], "budgets": [["macs", "0.3"], ["latency", "0.5"]],
        "vit": {"patch": 2, "dim": 64, "heads": 4, "layers": 2, "mlp": 256, "cls_token": True},  # 16 patches + class
        "text": {"n": 5000, "vocab": 64, "length": 32, "min_length": 8, "seed": 0, "dim": 64, "heads": 4,
                 "layers": 2},
        "train_epochs": {"vit_digits": 30, "text_lexicon": 10},
        "epochs": 2, "admm_iterations": 4, "admm_epochs": 2,  # onnxecc trains 4×2 ADMM + 2 fine-tuning epochs
        "profile": {"samples": 40, "warmup": 5, "repeats": 15},
        "latency_step": 0.05,  # an unreachable latency budget is raised to the next multiple above the floor
        "rounds": 7, "round_s": 0.1, "torch_threads": 1,
    }
    if quick:
        cfg.update(datafree=["bert_encoder"], trained=["vit_digits"], seeds=[0],
                   train_epochs={"vit_digits": 15, "text_lexicon": 4}, epochs=1, admm_iterations=2, admm_epochs=1,
                   profile={"samples": 12, "warmup": 3, "repeats": 8}, rounds=5)
    return cfg


def run(quick: bool, **overrides) -> dict:
    cfg = _common.merge_config(config(quick), overrides, "transformers")
    with tempfile.TemporaryDirectory(prefix="onnxecc-transformers-") as tmp, \
            _common.torch_threads(cfg["torch_threads"]):
        datafree = [_datafree(name, cfg, Path(tmp)) for name in cfg["datafree"]]
        trained = [_trained(name, cfg, Path(tmp)) for name in cfg["trained"]]
    return {"config": cfg, "datafree": datafree, "trained": trained, "summary": _summary(trained, cfg),
            "notes": _notes(datafree, trained, cfg)}


# ---- the CLI ------------------------------------------------------------------------------------------------------
def _cli(*args: str, timeout: float = 3600) -> tuple[int, str, float, str]:
    """Exit code, the one line it ended with (an error's message), seconds, and its stdout."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnxecc", *args], capture_output=True, text=True,
                          timeout=timeout)
    text = " ".join((proc.stderr.strip() or proc.stdout.strip()).split())  # rich wraps long lines
    start = text.rfind("error:") if proc.returncode else -1  # a user error's line, else the verdict at the end
    return proc.returncode, text[start if start >= 0 else max(len(text) - 300, 0):], time.perf_counter() - t, \
        proc.stdout


def _shape_args(shapes: list[str]) -> list[str]:
    return [a for s in shapes for a in ("--input-shape", s)]


# ---- reading inspect and the report ------------------------------------------------------------------------------
def group_kinds(info: dict) -> dict[int, str]:
    """Each group of `inspect --json` as 'heads' (inspect's `heads`: carried by an attention product Q·Kᵀ or
    softmax·V, a unit is a head), 'approximate' (prunable with --data only), 'prunable' or 'frozen'."""
    heads = {g["id"] for g in info["groups"] if g.get("heads")}
    kinds = {}
    for g in info["groups"]:
        if not g["prunable"]:
            kinds[g["id"]] = "frozen"
        elif g["id"] in heads:
            kinds[g["id"]] = "heads"
        else:
            kinds[g["id"]] = "approximate" if g.get("approximate") else "prunable"
    return kinds


def group_name(group: dict) -> str:
    """A readable name of a group: its producer layers' common path (`/blocks.0/` for q, k and v;
    `/blocks.0/up` for a feed-forward hidden width)."""
    nodes = [s["node"] for s in group["producers"]] or [s["node"] for s in group["consumers"]] or ["?"]
    if len(nodes) == 1:
        return nodes[0].rsplit("/", 1)[0] or nodes[0]
    prefix = nodes[0]
    for n in nodes[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    prefix = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else prefix
    return prefix if prefix.strip("/") else f"{len(nodes)} layers' outputs (a residual width)"


def widths_by_kind(info: dict, report: dict | None) -> dict:
    """Per prunable group of `info`: its name, kind and width before → after (the report's kept units; a group
    the report does not list kept everything). Heads are in heads (the report's `heads` per attention layer when it
    has them), the others in channels."""
    kinds = group_kinds(info)
    widths = (report or {}).get("widths", {})
    out: dict[str, list[dict]] = {"heads": [], "prunable": [], "approximate": []}
    for g in info["groups"]:
        kind = kinds[g["id"]]
        if kind == "frozen":
            continue
        kept = widths.get(str(g["id"]), {}).get("kept", g["size"]) if report is not None else None
        out[kind].append({"group": g["id"], "name": group_name(g), "before": g["size"], "after": kept,
                          "channels": g["channels"]})
    if (report or {}).get("heads"):  # compress's own account: heads before -> after per attention layer
        out["heads"] = [{"group": h["group"], "name": h["layer"], "before": h["before"], "after": h["after"],
                         "frozen_by": h.get("frozen_by")} for h in report["heads"]]
    return out


def group_counts(info: dict) -> dict:
    kinds = list(group_kinds(info).values())
    return {"total": len(kinds), "prunable": sum(k != "frozen" for k in kinds), "heads": kinds.count("heads"),
            "approximate": kinds.count("approximate"), "frozen": kinds.count("frozen")}


# ---- data-free ------------------------------------------------------------------------------------------------------
def _datafree_model(name: str, cfg: dict) -> tuple[Path, list[str]]:
    """The export and the --input-shape it needs (none for the vision models: only their batch is symbolic)."""
    if name == "bert_encoder":
        import torch

        from bench import _transformer_models as tm

        path = _common.cache_dir() / f"bert_encoder-ts-torch{torch.__version__.split('+')[0]}.onnx"
        if not path.exists():
            ids = np.random.default_rng(0).integers(0, 1000, size=(2, 16))
            tm.export(tm.zoo_encoder(), {"input_ids": ids, "attention_mask": np.ones_like(ids)},
                      ["input_ids", "attention_mask"], path, dynamic_sequence=True)
        t = cfg["text_shape"]
        return path, [f"input_ids:1,{t}", f"attention_mask:1,{t}"]
    import torch

    from bench import _transformer_models as tm

    size = cfg["image_size"]
    path = _common.cache_dir() / f"{name}-{size}-grad-ts-torch{torch.__version__.split('+')[0]}.onnx"
    return (path if path.exists() else tm.export_torchvision(name, size, path)), []


def _datafree(name: str, cfg: dict, tmp: Path) -> dict:
    row: dict = {"model": name}
    try:
        path, shapes = _datafree_model(name, cfg)
    except Exception as exc:
        return row | {"error": f"export: {_common.error_text(exc)}"}
    row.update(input_shape=shapes or None, file_mb=round(path.stat().st_size / 2**20, 1))
    code, last, secs, stdout = _cli("inspect", str(path), "--json", *_shape_args(shapes))
    row["inspect"] = {"exit": code, "s": round(secs, 1)}
    if code != 0:
        return row | {"error": f"inspect exit {code}: {last}"}
    info = json.loads(stdout)
    row["groups"] = group_counts(info)
    row["macs"] = info["totals"]["macs"]
    out, report = tmp / f"{name}.onnx", tmp / f"{name}.json"
    code, last, secs, _ = _cli("compress", str(path), "--budget", cfg["datafree_budget"], "--metric", "macs",
                               "-o", str(out), "--report", str(report), *_shape_args(shapes))
    row["compress"] = {"exit": code, "s": round(secs, 1)}
    if code != 0 or not out.exists():
        row["widths"] = widths_by_kind(info, None)
        return row | {"error": f"compress exit {code}: {last}"}
    rep = json.loads(report.read_text())
    row["widths"] = widths_by_kind(info, rep)
    row.update(macs_ratio=rep["cost_fraction"], latency_ratio=rep["latency_ratio"],
               top1_agreement=rep["top1_agreement"], meets_budget=rep["meets_budget"], method=rep["method"],
               approximate_groups=rep.get("approximate_groups"))
    code, last, secs, _ = _cli("validate", str(path), str(out), *_shape_args(shapes))
    row["validate"] = {"exit": code, "s": round(secs, 1), "last": last[:200]}
    out.unlink(missing_ok=True)  # vit_b_16's output is ~170 MB: the temporary directory holds one at a time
    return row


# ---- trained models -----------------------------------------------------------------------------------------------
class _Task:
    """One trained model's data: torch training arrays, the ORT test arrays and the `--data` value."""

    def __init__(self, name: str, seed: int, cfg: dict, tmp: Path):
        from onnxecc.graph.inputs import Feeds

        self.name = name
        if name == "vit_digits":
            from onnxecc.graph.data import load_digits

            d = load_digits(seed)  # the split `--data digits --seed S` makes
            self.x_train, self.y_train, self.x_test, self.y_test = d.x_train, d.y_train, d.x_test, d.y_test
            self.names, self.data = ["input"], "digits"
            self.ort_train, self.ort_test = d.x_train, d.x_test
        else:
            from bench import _transformer_models as tm

            t = cfg["text"]
            task = tm.lexicon_task(t["n"], t["seed"], t["vocab"], t["length"], t["min_length"])
            cut = t["n"] - int(t["n"] * 0.2)  # `load_npz` holds out the last 20 %
            self.names = ["input_ids", "attention_mask"]
            self.x_train = {k: task[k][:cut] for k in self.names}
            self.x_test = {k: task[k][cut:] for k in self.names}
            self.y_train, self.y_test = task["y"][:cut], task["y"][cut:]
            self.data = str(tmp / f"text_lexicon-{t['seed']}.npz")
            if not Path(self.data).exists():
                np.savez(self.data, **{k: task[k] for k in self.names}, y=task["y"])
            self.ort_train, self.ort_test = Feeds(self.x_train), Feeds(self.x_test)

    def example(self, n: int = 2):
        return {k: v[:n] for k, v in self.x_test.items()} if isinstance(self.x_test, dict) else self.x_test[:n]

    def one(self):
        """The batch-1 input latency is measured at."""
        from onnxecc.graph.inputs import Feeds

        return Feeds(self.example(1)) if isinstance(self.x_test, dict) else self.x_test[:1]


def build(name: str, seed: int, cfg: dict):
    import torch

    from bench import _transformer_models as tm

    torch.manual_seed(seed)
    if name == "vit_digits":
        return tm.DigitsViT(**cfg["vit"])
    t = cfg["text"]
    return tm.TextEncoder(vocab=t["vocab"], max_len=t["length"], dim=t["dim"], heads=t["heads"], layers=t["layers"],
                          classes=4)


def _trained(name: str, cfg: dict, tmp: Path) -> dict:
    runs = []
    for seed in cfg["seeds"]:
        try:
            runs.append(_seed(name, seed, cfg, tmp))
        except Exception as exc:
            runs.append({"seed": seed, "error": _common.error_text(exc)})
    return {"model": name, "runs": runs}


def _seed(name: str, seed: int, cfg: dict, tmp: Path) -> dict:
    from bench import _transformer_models as tm
    from onnxecc.graph import ingest, runtime

    task = _Task(name, seed, cfg, tmp)
    model = build(name, seed, cfg)
    t = time.perf_counter()
    tm.train(model, task.x_train, task.y_train, cfg["train_epochs"][name], seed,
             lr=3e-3 if name == "vit_digits" else 2e-3)
    path = tm.export(model, task.example(), task.names, tmp / f"{name}-seed{seed}.onnx")
    original = ingest.load(path)
    run: dict = {"seed": seed, "train_s": time.perf_counter() - t, "accuracy": _accuracy(original, task),
                 "macs": _common.macs(original), "shape": tm.heads_and_widths(model)}
    teacher = runtime.run_batched(runtime.session(original), task.ort_train)
    for metric, budget in cfg["budgets"]:
        key = f"{metric}@{budget}"
        run[key] = {}
        try:
            run[key]["onnxecc"] = _onnxecc(path, original, task, metric, budget, seed, cfg, tmp)
        except Exception as exc:
            run[key]["onnxecc"] = {"error": _common.error_text(exc)}
        target = (float(budget) * run["macs"] if metric == "macs"
                  else run[key]["onnxecc"].get("macs_ratio", 0) * run["macs"])
        try:
            if not target:
                raise RuntimeError("no MACs to match: onnxecc's run failed")
            run[key]["torch_pruning"] = _torch_pruning(model, original, task, teacher, target, seed, cfg,
                                                       _epochs_in_all(cfg))
        except Exception as exc:
            run[key]["torch_pruning"] = {"error": _common.error_text(exc)}
    return run


def _epochs_in_all(cfg: dict) -> int:
    """What onnxecc trains in all with --data (ecc: ADMM's iterations × epochs, then --epochs of fine-tuning)."""
    return cfg["admm_iterations"] * cfg["admm_epochs"] + cfg["epochs"]


def _accuracy(model, task: _Task) -> float:
    from onnxecc.graph import runtime

    logits = runtime.run_batched(runtime.session(model), task.ort_test)
    return float((logits.argmax(1) == task.y_test).mean())


def _measure(original, out, task: _Task, cfg: dict) -> dict:
    """One output next to the original in ORT: test accuracy, counted MACs ratio, side-by-side latency."""
    pair = _common.latency_pair(original, out, task.one(), rounds=cfg["rounds"], round_s=cfg["round_s"])
    return {"accuracy": _accuracy(out, task), "macs_ratio": _common.macs(out) / _common.macs(original),
            "latency_ratio": pair["ratio"], "noisy": pair["noisy"], "latency": pair}


def profile_path(path: Path, name: str, cfg: dict) -> Path:
    """The cached profile of `name`'s architecture: keyed by the graph's structure (not its weights: one profile
    serves every seed), onnxruntime's version and the profile settings."""
    from importlib import metadata

    from onnxecc.cost.profiler.store import fingerprint

    p = cfg["profile"]
    tag = (f"transformers-{name}-{fingerprint(__import__('onnx').load(path))[:12]}-ort{metadata.version('onnxruntime')}"
           f"-s{p['samples']}-w{p['warmup']}-r{p['repeats']}")
    return _common.cache_dir() / "profiles" / f"{tag}.json"


def _profile(path: Path, name: str, cfg: dict) -> tuple[Path, dict]:
    """`onnxecc profile` through the CLI, once per architecture; a cached one that no longer matches the model's
    groups (the analysis changed) is measured again."""
    from onnxecc.core.errors import UserError
    from onnxecc.cost.profiler import load_profile

    out = profile_path(path, name, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        try:
            load_profile(out, str(path))
            return out, {"cached": True}
        except UserError:
            out.unlink()
    p = cfg["profile"]
    code, last, secs, _ = _cli("profile", str(path), "-o", str(out), "--samples", str(p["samples"]),
                               "--warmup", str(p["warmup"]), "--repeats", str(p["repeats"]))
    if code != 0:
        raise RuntimeError(f"profile exit {code}: {last}")
    return out, {"cached": False, "s": round(secs, 1)}


def _onnxecc(path: Path, original, task: _Task, metric: str, budget: str, seed: int, cfg: dict, tmp: Path) -> dict:
    from onnxecc.graph import ingest

    out, report = tmp / f"{path.stem}-{metric}{budget}.onnx", tmp / f"{path.stem}-{metric}{budget}.json"
    extra, row = [], {"budget": budget}
    if metric == "latency":
        prof, row["profile"] = _profile(path, task.name, cfg)
        extra = ["--profile", str(prof)]

    def compress(b: str):
        return _cli("compress", str(path), "--budget", b, "--metric", metric, "--data", task.data, "--seed", str(seed),
                    "--epochs", str(cfg["epochs"]), "--admm-iterations", str(cfg["admm_iterations"]),
                    "--admm-epochs", str(cfg["admm_epochs"]), "-o", str(out), "--report", str(report), *extra)

    code, last, secs, _ = compress(budget)
    floor = reachable_floor(last, float(budget), metric) if code == 2 else None
    if floor is not None:  # recorded and shown: the budget this machine can meet, not a silent change
        row.update(unreachable=last, floor=floor, budget=raised_budget(floor, cfg["latency_step"]))
        code, last, secs, _ = compress(row["budget"])
    row["compress"] = {"exit": code, "s": round(secs, 1)}
    if code != 0 or not out.exists():
        raise RuntimeError(f"compress exit {code}: {last}")
    rep = json.loads(report.read_text())
    code, last, vsecs, _ = _cli("validate", str(path), str(out), "--data", task.data)
    info_code, _, _, stdout = _cli("inspect", str(path), "--json")
    widths = widths_by_kind(json.loads(stdout), rep) if info_code == 0 else None
    compressed = ingest.load(out)
    row.update(_measure(original, compressed, task, cfg))
    row.update(validate_exit=code, validate_last=last if code else None, meets_budget=rep["meets_budget"],
               closed_loop_ratio=rep.get("latency_ratio"), rounds=len(rep.get("rounds") or []),
               accuracy_report=rep.get("accuracy_after"), widths=widths, wall_s=secs,
               approximate_groups=rep.get("approximate_groups"),
               lr=next((h["lr"] for h in rep.get("history", []) if h.get("phase") == "lr_probe" and h.get("chosen")),
                       None))
    return row


def reachable_floor(message: str, budget: float, metric: str) -> float | None:
    """The smallest reachable cost as a fraction of the original's, from compress's one-line refusal of a budget
    under it ("budget 43.2 us is below the smallest reachable cost 77.9 us ..."; both written by
    `onnxecc.cost.budget.format_cost`, so `parse_budget` reads them back); None for any other error."""
    import re

    from onnxecc.cost.budget import parse_budget

    found = re.search(r"budget (.+?) is below the smallest reachable cost (.+?) \(", message)
    if not found:
        return None
    asked, floor = (parse_budget(found.group(i), metric).absolute for i in (1, 2))
    return floor / asked * budget


def raised_budget(floor: float, step: float) -> str:
    """The first multiple of `step` at least 5 % above `floor` (room for the closed loop's measurement)."""
    return f"{math.ceil(floor * 1.05 / step - 1e-9) * step:.2f}"


def _torch_pruning(model, original, task: _Task, teacher: np.ndarray, target_macs: float, seed: int, cfg: dict,
                   epochs: int) -> dict:
    """Torch-Pruning at the largest ratio whose exported model fits `target_macs` (bisection; MACs counted by
    onnxecc on the file, like onnxecc's), fine-tuned `epochs` epochs by onnxecc's loop with distillation from the
    original's logits, at the rate the same probe picks, exported and measured."""
    import onnx

    from bench import _transformer_models as tm
    from onnxecc.cost.profiler.sampling import auto_step

    t = time.perf_counter()
    round_to = auto_step()  # onnxecc's default --round-to for its widths, given to Torch-Pruning's too

    def macs_at(ratio: float, residual: bool) -> tuple[int, object]:
        pruned = tm.tp_prune(model, task.example(), ratio, round_to, residual)
        return _common.macs(onnx.load_from_string(tm.export_bytes(pruned, task.example(), task.names))), pruned

    def top(residual: bool) -> float:
        """Above 1 - round_to / width Torch-Pruning's rounding keeps 0 channels of a layer: it leaves it whole."""
        shape = tm.heads_and_widths(model)
        return 1.0 - round_to / min(shape["mlp"] + ([shape["residual"]] if residual else []))

    residual, short = False, None  # heads and feed-forward widths; the residual width too only if they cannot reach
    if macs_at(top(False), False)[0] > target_macs:
        residual = True
        smallest = macs_at(top(True), True)[0]
        if smallest > target_macs:  # measured at its smallest instead, and said so
            short = (f"Torch-Pruning cannot reach {target_macs:.0f} MACs: the same ratio in every layer stops at "
                     f"{top(True):.3f} (one head, {round_to}-channel multiples), {smallest} MACs")
    lo, hi = 0.0, top(residual)
    while short is None and hi - lo > 1e-3:
        mid = (lo + hi) / 2
        if macs_at(mid, residual)[0] <= target_macs:
            hi = mid
        else:
            lo = mid
    _, pruned = macs_at(hi, residual)
    shape = tm.heads_and_widths(pruned)
    lr, tried = _common.probe_and_finetune(pruned, task.ort_train, teacher, task.y_train, epochs, seed, task.names)
    out = onnx.load_from_string(tm.export_bytes(pruned, task.example(), task.names))
    row = {"ratio": hi, "residual_pruned": residual, "short_of_target": short, "shape": shape, "epochs": epochs,
           "lr": lr, "lr_probe": tried, "wall_s": time.perf_counter() - t, "round_to": round_to}
    row.update(_measure(original, out, task, cfg))
    return row


# ---- summary ------------------------------------------------------------------------------------------------------
def _summary(trained: list[dict], cfg: dict) -> list[dict]:
    rows = []
    for entry in trained:
        ok = [r for r in entry["runs"] if "error" not in r]
        base = {"model": entry["model"], "original_accuracy": _common.mean_std([r["accuracy"] for r in ok])}
        for metric, budget in cfg["budgets"]:
            key = f"{metric}@{budget}"
            for tool in ("onnxecc", "torch_pruning"):
                done = [r[key][tool] for r in ok if key in r and "error" not in r[key].get(tool, {"error": 1})]
                used = sorted({r[key]["onnxecc"].get("budget", budget) for r in ok if key in r})
                errors = sorted({r[key][tool]["error"] for r in ok if "error" in r.get(key, {}).get(tool, {})}
                                | {r["error"] for r in entry["runs"] if "error" in r})
                rows.append({**base, "budget": key, "budgets_used": used, "tool": tool, "runs": len(done),
                             "accuracy": _common.mean_std([d["accuracy"] for d in done]),
                             "macs_ratio": _common.mean_std([d["macs_ratio"] for d in done]),
                             "latency_ratio": _common.mean_std([d["latency_ratio"] for d in done]),
                             "heads": [_heads_after(d, tool) for d in done], "errors": errors,
                             "residual_pruned": sum(bool(d.get("residual_pruned")) for d in done),
                             "short_of_target": sum(bool(d.get("short_of_target")) for d in done)})
    return rows


def _heads_after(run: dict, tool: str) -> list[int] | None:
    if tool == "torch_pruning":
        return run["shape"]["heads"]
    widths = run.get("widths")
    return [h["after"] for h in widths["heads"]] if widths else None


def _notes(datafree: list[dict], trained: list[dict], cfg: dict) -> list[str]:
    notes = []
    for row in datafree:
        if "widths" not in row:
            continue
        heads = " ".join(f"{h['before']}→{h['after']}" for h in row["widths"]["heads"])
        mlp = " ".join(f"{w['before']}→{w['after']}" for w in row["widths"]["prunable"])
        approx = " ".join(f"{w['before']}→{w['after']}" for w in row["widths"]["approximate"])
        notes.append(f"{row['model']}: heads per attention layer {heads or '(no head groups)'}; other widths {mlp}"
                     + (f"; approximate {approx}" if approx else ""))
        if "error" in row:
            notes.append(f"{row['model']}: {row['error']}")
    for entry in trained:
        for r in entry["runs"]:
            if "error" in r:
                notes.append(f"{entry['model']} seed {r['seed']}: {r['error']}")
                continue
            for metric, budget in cfg["budgets"]:
                for tool, res in r.get(f"{metric}@{budget}", {}).items():
                    if "error" in res or res.get("short_of_target"):
                        notes.append(f"{entry['model']} seed {r['seed']} {metric}@{budget} {tool}: "
                                     f"{res.get('error') or res['short_of_target']}")
    notes.append(f"trained: onnxecc `compress --data` (ecc: {cfg['admm_iterations']}×{cfg['admm_epochs']} ADMM + "
                 f"{cfg['epochs']} fine-tuning epochs); Torch-Pruning: MetaPruner, L2 group magnitude, whole heads + "
                 f"feed-forward widths (+ residual width where needed: '+res'), pooler kept, {_epochs_in_all(cfg)} "
                 "epochs of the same fine-tuning; latency budget: Torch-Pruning pruned to the MACs of onnxecc's "
                 "output. ORT CPU, 1 thread, batch 1.")
    return notes


# ---- table --------------------------------------------------------------------------------------------------------
def _ms(v: dict | None, pct: bool = False) -> str:
    if not v:
        return "—"
    if pct:
        return f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f} %"
    return f"{v['mean']:.3f} ± {v['std']:.3f}"


def table(result: dict) -> Table:
    cfg = result["config"]
    t = Table(title=f"transformers: data-free compress --budget {cfg['datafree_budget']} --metric macs, then "
                    f"trained models vs Torch-Pruning ({len(cfg['seeds'])} seed(s), mean ± std)")
    for col in ("model", "budget / tool", "groups (heads/approx/frozen)", "heads after", "accuracy",
                "MACs ratio", "latency ratio", "note"):
        t.add_column(col, justify="left" if col in ("model", "budget / tool", "note", "heads after") else "right")
    for r in result["datafree"]:
        g = r.get("groups")
        heads = r.get("widths", {}).get("heads", [])
        t.add_row(r["model"], f"data-free macs {cfg['datafree_budget']}",
                  f"{g['prunable']} ({g['heads']}/{g['approximate']}/{g['frozen']})" if g else "",
                  " ".join(str(h["after"]) + "/" + str(h["before"]) for h in heads) if heads else "-",
                  f"agree {r['top1_agreement']:.2f}" if r.get("top1_agreement") is not None else "",
                  _common.f2(r.get("macs_ratio")), _common.f2(r.get("latency_ratio")),
                  f"[red]{r['error'][:80]}[/]" if "error" in r else
                  f"validate exit {r['validate']['exit']}" if "validate" in r else "")
    for s in result["summary"]:
        heads = s["heads"][0] if s["heads"] and s["heads"][0] is not None else None
        used = [b for b in s.get("budgets_used", []) if b != s["budget"].split("@")[1]]
        budget = s["budget"] + (f"→{'/'.join(used)} (unreachable)" if used else "")
        tool = s["tool"] + ("+res" if s.get("residual_pruned") else "")
        t.add_row(f"{s['model']} ({_ms(s['original_accuracy'], True)})", f"{budget} {tool}", "",
                  " ".join(map(str, heads)) if heads else "-", _ms(s["accuracy"], True), _ms(s["macs_ratio"]),
                  _ms(s["latency_ratio"]), f"[red]{s['errors'][0][:80]}[/]" if s["errors"] else f"n={s['runs']}"
                  + (f", [yellow]{s['short_of_target']} at its smallest (MACs not reached)[/]"
                     if s.get("short_of_target") else ""))
    return t
