"""Area `separation`: the methods compared where they can separate (issue #27) — a real pretrained model at
aggressive budgets, ground truth exact.

PaddleOCR's text recogniser (PP-OCRv4, paddle2onnx, inside `rapidocr-onnxruntime`'s wheel, its character
dictionary in the file's metadata) reads lines rendered here (`bench.textdata.rec_lines`: strings of characters no
face confuses, upright DejaVu faces; train, validation and test lines drawn with different seeds). Its output is
per-step scores (N×T×C): greedy CTC decoding with that dictionary gives a string; a line's score is its edit
distance to the drawn string (character accuracy = 1 − errors / characters; exact-line accuracy). The detector
(PP-OCRv4 det) is scored on rendered pages (`textdata.text_pages`): the F-score of its text map thresholded at
`det.threshold` against the drawn text boxes (ground truth), and the IoU with the original's thresholded map.

Every onnxecc method runs through the CLI as a user runs it, on the same `--data` npz (train lines, then the
validation lines as its last 20 %, which `compress` holds out: it never trains on them; the test lines never reach
it). The npz has no labels: an output without a class axis is distilled from the original's outputs (relative
squared error, `onnxecc.train.finetune.distillation_loss`):

    onnxecc compress MODEL --budget B --metric M --method {ecc,project,greedy,uniform} --data TRAIN.npz
        --epochs E --admm-iterations I --admm-epochs A --admm-decay I --max-rounds R --input-shape x:1,3,48,W
        [--profile P]                              (latency: `onnxecc profile`, cached per graph structure)

compress gives every method ecc's training in all (I·A + E epochs; greedy's one epoch per step may exceed it).
Torch-Pruning (MetaPruner, L2 group magnitude) prunes the torch module onnxecc's bridge converts
(`onnxecc.train.bridge.to_torch`, onnx2torch) to the MACs of the budget (a latency budget: the MACs of onnxecc's ecc
output of the same seed), is fine-tuned by `onnxecc.train.finetune` with the same distillation for as many epochs at the
rate the same probe picks, and is exported. Where Torch-Pruning cannot handle part of the converted graph, the area
finds it out (`tp_plan`: groups whose dependency propagation does not close, a trial step that raises) and leaves
that part whole; the reasons are recorded word for word.

Every output is measured next to the original in onnxruntime (CPU, 1 thread, batch 1): test accuracy, MACs ratio
(counted by onnxecc on the file at the analysed size), side-by-side latency ratio, wall time of the method. Per
budget: mean ± std over the seeds, and ecc against the best other method by a paired per-line test on the same
test lines (McNemar's exact test on exact-line correctness; a sign test on the per-line character errors).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.table import Table

from bench import _common

ORDER = 98
DESCRIPTION = "ecc vs project/greedy/uniform/Torch-Pruning on PaddleOCR's recogniser (and detector), rendered text"
OPT_IN = True  # not in `make bench`: its full configuration alone takes many hours on 2 cores
OPT_IN_REASON = "many hours"

MODELS = {"rec": "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
          "det": "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"}
ONNXECC_METHODS = ("ecc", "project", "greedy", "uniform")
METHODS = (*ONNXECC_METHODS, "torch_pruning")
VARIANTS = ("full", "reduced", "separates", "quick")


def config(variant: str = "full") -> dict:
    """The settings of a variant. `full`: both models, 4 budgets, 5 methods, 3 seeds (many hours on 2 cores);
    `reduced` (`--set variant=reduced`): the recogniser at MACs 0.3 and latency 0.5, 5 methods, 2 seeds, small
    data (fits about an hour here); `separates` (`--set variant=separates`): both models at MACs 0.3, 5 methods,
    3 seeds, sized to about 65 minutes on one core; `quick` (`--quick`): the recogniser, MACs 0.3, seed 0, tiny
    data."""
    if variant not in VARIANTS:
        raise ValueError(f"area 'separation' has no variant {variant!r} (variants: {', '.join(VARIANTS)})")
    cfg = {
        "variant": variant, "models": ["rec", "det"],
        "budgets": [["macs", "0.3"], ["macs", "0.15"], ["latency", "0.5"], ["latency", "0.3"]],
        "methods": list(METHODS), "seeds": [0, 1, 2],
        # validation = train // 4: the last 20 % of the npz, what compress holds out
        "rec": {"train": 1024, "test": 400, "width": 160, "length": [3, 8], "sizes": [20, 40]},
        "det": {"train": 256, "test": 64, "size": 320, "threshold": 0.3},
        "data_seeds": {"train": 1001, "val": 2002, "test": 3003},
        "admm_iterations": 3, "admm_epochs": 2, "admm_decay": 3, "epochs": 4,  # 10 training epochs per method
        "rho": None,  # ecc's initial ADMM ρ per Adam step (`--rho`); None: onnxecc's default, `--rho auto`
        # training batch (`--batch-size`) of every method; None: compress's 64 — at 40 detector pages that is one
        # Adam step per epoch, so a small variant trains little whatever the method
        "batch_size": None,
        "max_rounds": 2,  # closed loop (latency budgets): measured rounds at most, each re-trains
        "profile": {"samples": 60, "warmup": 5, "repeats": 15},
        "latency_step": 0.05,  # an unreachable latency budget is raised to the next multiple above the floor
        "rounds": 7, "round_s": 0.1, "torch_threads": 1,
        "tp_grid": 0.05, "tp_search_steps": 4,  # Torch-Pruning's ratio: a scan of this grid, then bisection steps
        "tp_close_cap": 20000,  # dependencies one Torch-Pruning group may collect before it counts as not closing
    }
    if variant == "reduced":
        cfg.update(models=["rec"], budgets=[["macs", "0.3"], ["latency", "0.5"]], seeds=[0, 1],
                   rec={**cfg["rec"], "train": 64, "test": 200}, admm_iterations=2, admm_epochs=1, admm_decay=2,
                   epochs=2, profile={"samples": 40, "warmup": 5, "repeats": 15})
    elif variant == "separates":
        # Sized for at most ~75 min on one core (torch_threads 1), reduced's schedule (4 epochs per method). Timed
        # once through this area (reduced schedule, 1 thread; CPU time of the compress process, the 2-core machine
        # loaded ~2×): the detector at MACs 0.3 with 64 training pages of 320², 32 test pages: ecc 225 s (F-score
        # 52.0 %, original 57.8 %), uniform 175 s (1.2 %); the recogniser's ecc ~70 s at 64 training lines
        # (measured). Both scale about linearly in the training samples. The 5 methods of one seed take ~6.1× ecc
        # (reduced run, recogniser: project 0.8×, greedy 2.9×, uniform 0.8× — 0.78× on the detector too —,
        # Torch-Pruning ~0.6× with its one-off plan). det 40 pages: ecc ≈ 225 × 40/64 ≈ 141 s; rec 64 lines: 70 s;
        # 3 seeds × 6.1 × (141 + 70) s + data and originals (~1 min) ≈ 3920 s ≈ 65 min, the margin for greedy on
        # the detector (untimed). Latency 0.5 on the detector (a profile, up to 2 measured rounds, each
        # re-training: ~1.5× a MACs row) would add ~65 min more: it does not fit and is left out.
        # The recogniser gets 128 lines: with KL distillation per step, ecc at 128 lines read 28.4 % of the
        # characters and uniform 0.0 % (seed 0, 284 s and 227 s wall on the loaded machine); 64 lines left every
        # method near 0 %. Run one model per process (`--set 'models=["det"]'`) to use both cores.
        cfg.update(budgets=[["macs", "0.3"]], seeds=[0, 1, 2],
                   rec={**cfg["rec"], "train": 128, "test": 200}, det={**cfg["det"], "train": 40, "test": 64},
                   admm_iterations=2, admm_epochs=1, admm_decay=2, epochs=2,
                   profile={"samples": 40, "warmup": 5, "repeats": 15})
    elif variant == "quick":
        cfg.update(models=["rec"], budgets=[["macs", "0.3"]], seeds=[0], rec={**cfg["rec"], "train": 16, "test": 16},
                   admm_iterations=1, admm_epochs=1, admm_decay=1, epochs=1, rounds=5, tp_grid=0.2, tp_search_steps=2,
                   profile={"samples": 12, "warmup": 3, "repeats": 8})
    return cfg


def run(quick: bool, **overrides) -> dict:
    variant = overrides.pop("variant", "quick" if quick else "full")
    cfg = _common.merge_config(config(variant), overrides, "separation")
    with tempfile.TemporaryDirectory(prefix="onnxecc-separation-") as tmp, \
            _common.torch_threads(cfg["torch_threads"]):
        models = []
        for name in cfg["models"]:
            try:
                models.append(_model(name, cfg, Path(tmp)))
            except Exception as exc:  # one model that cannot run must not hide the other
                models.append({"model": name, "error": _common.error_text(exc)})
    return {"config": cfg, "models": models, "notes": _notes(models, cfg), "torch_pruning_version": _version()}


def _version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("torch-pruning")
    except metadata.PackageNotFoundError:
        return None


def model_path(name: str) -> Path:
    """The file inside the installed `rapidocr-onnxruntime` package."""
    for root in site.getsitepackages():
        path = Path(root) / MODELS[name]
        if path.exists():
            return path
    raise FileNotFoundError(f"{MODELS[name]} not found in {site.getsitepackages()}: `make install` installs the "
                            "bench extra (rapidocr-onnxruntime)")


# ---- scoring -----------------------------------------------------------------------------------------------------
def dictionary(path: Path) -> list[str]:
    """The recogniser's classes: CTC blank, the characters of the file's `character` metadata, then the space
    (PaddleOCR's `use_space_char`): index i of the output's last axis is `dictionary[i]`."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return ["", *meta["character"].splitlines(), " "]


def ctc_greedy(scores: np.ndarray, chars: list[str]) -> list[str]:
    """Greedy CTC decoding of N×T×C scores: the best class per step, repeats merged, blanks (class 0) dropped."""
    best = scores.argmax(-1)
    out = []
    for row in best:
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        out.append("".join(chars[c] for c in row[keep & (row != 0)]))
    return out


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), one row of the table at a time."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ca != cb))
    return row[-1]


def f_score(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Pixel F1 of a boolean map against the true one (1.0 when both are empty)."""
    tp = float((predicted & truth).sum())
    denominator = float(predicted.sum() + truth.sum())
    return 1.0 if denominator == 0 else 2 * tp / denominator


class _Lines:
    """The recogniser's data and score: rendered lines with their strings."""

    def __init__(self, path: Path, cfg: dict, tmp: Path):
        from bench import textdata

        r, seeds = cfg["rec"], cfg["data_seeds"]
        shape = (48, r["width"])
        kw = {"shape": shape, "length": tuple(r["length"]), "sizes": tuple(r["sizes"])}
        x_train, _ = textdata.rec_lines(r["train"], seeds["train"], **kw)
        self.x_val, self.val_truth = textdata.rec_lines(r["train"] // 4, seeds["val"], **kw)
        self.x_test, self.truth = textdata.rec_lines(r["test"], seeds["test"], **kw)
        self.x_train, self.shape = x_train, (1, 3, *shape)
        self.npz = _npz(tmp / "rec_train_val.npz", x_train, self.x_val)
        self.chars = dictionary(path)

    def describe(self) -> dict:
        return {"train": len(self.x_train), "val": len(self.x_val), "test": len(self.x_test),
                "input": list(self.shape), "classes": len(self.chars)}

    def per_sample(self, outputs: np.ndarray, truth) -> list[int]:
        """Character errors of each line: the edit distance of the decoded string to the drawn one, at most the
        line's length (a line cannot lose more than its characters; a string of garbage longer than the line would
        otherwise make the accuracy negative)."""
        return [min(edit_distance(p, str(t)), len(str(t))) for p, t in zip(ctc_greedy(outputs, self.chars), truth)]

    def summary(self, errors: list[int], truth) -> dict:
        chars = sum(len(str(t)) for t in truth)
        return {"char_accuracy": 1 - sum(errors) / chars, "line_accuracy": float(np.mean(np.asarray(errors) == 0))}


class _Pages:
    """The detector's data and score: rendered pages with the drawn text boxes."""

    def __init__(self, path: Path, cfg: dict, tmp: Path):
        from bench import textdata

        d, seeds = cfg["det"], cfg["data_seeds"]
        size = (d["size"], d["size"])
        x_train, _ = textdata.text_pages(d["train"], seeds["train"], size)
        self.x_val, self.val_truth = textdata.text_pages(d["train"] // 4, seeds["val"], size)
        self.x_test, self.truth = textdata.text_pages(d["test"], seeds["test"], size)
        self.x_train, self.shape, self.threshold = x_train, (1, 3, *size), d["threshold"]
        self.npz = _npz(tmp / "det_train_val.npz", x_train, self.x_val)
        self.reference: np.ndarray | None = None  # the original's thresholded test maps, once measured

    def describe(self) -> dict:
        return {"train": len(self.x_train), "val": len(self.x_val), "test": len(self.x_test),
                "input": list(self.shape), "threshold": self.threshold}

    def per_sample(self, outputs: np.ndarray, truth) -> list[float]:
        """Each page's F-score of the thresholded text map against the drawn boxes."""
        maps = outputs[:, 0] > self.threshold
        return [f_score(m, t) for m, t in zip(maps, truth)]

    def summary(self, scores: list[float], truth) -> dict:
        return {"f_score": float(np.mean(scores))}


def _npz(path: Path, x_train: np.ndarray, x_val: np.ndarray) -> str:
    """Train then validation samples, x only (distillation): `load_npz` holds out the last 20 % — exactly the
    validation part, because it is a quarter of the training part."""
    x = np.concatenate([x_train, x_val])
    assert int(len(x) * 0.2) == len(x_val), "validation must be a quarter of the training part"
    np.savez(path, x=x)
    return str(path)


def _evaluate(task, model) -> dict:
    """Test outcomes per sample and the summaries on the test and validation parts (ORT CPU)."""
    from onnxecc.graph import runtime

    sess = runtime.session(model, threads=1)
    test = runtime.run_batched(sess, task.x_test, batch_size=16)
    val = runtime.run_batched(sess, task.x_val, batch_size=16)
    per = task.per_sample(test, task.truth)
    out = {"test": task.summary(per, task.truth), "val": task.summary(task.per_sample(val, task.val_truth),
                                                                     task.val_truth), "per_sample": per}
    if isinstance(task, _Pages):
        maps = test[:, 0] > task.threshold
        if task.reference is None:
            task.reference = maps
        out["test"]["iou_original"] = float((maps & task.reference).sum() / max((maps | task.reference).sum(), 1))
    return out


def _macs(model, shape) -> int:
    from onnxecc.graph.layers import find_layers

    return int(sum(layer.macs for layer in find_layers(model, input_shapes={"x": tuple(shape)})))


# ---- one model ---------------------------------------------------------------------------------------------------
def _model(name: str, cfg: dict, tmp: Path) -> dict:
    from onnxecc.graph import ingest

    path = model_path(name)
    t = time.perf_counter()
    task = (_Lines if name == "rec" else _Pages)(path, cfg, tmp)
    original = ingest.load(path)
    entry = {"model": name, "file": MODELS[name], "data": task.describe(), "data_s": time.perf_counter() - t,
             "macs": _macs(original, task.shape), "original": _evaluate(task, original)}
    tp_state: dict = {}
    rows = []
    for metric, budget in cfg["budgets"]:
        row = {"budget": f"{metric}@{budget}", "metric": metric, "asked": budget, "used": budget,
               "methods": {m: [] for m in cfg["methods"]}}
        if metric == "latency":
            try:
                row["profile_path"], row["profile"] = _profile(path, name, task, cfg)
            except Exception as exc:
                row["error"] = _common.error_text(exc)
                rows.append(row)
                continue
        for seed in cfg["seeds"]:
            done: dict = {}
            for method in (m for m in cfg["methods"] if m in ONNXECC_METHODS):
                try:
                    done[method] = _onnxecc(path, original, task, row, method, seed, cfg, tmp)
                except Exception as exc:
                    done[method] = {"error": _common.error_text(exc)}
                row["methods"][method].append({"seed": seed, **done[method]})
            if "torch_pruning" in cfg["methods"]:
                row["methods"]["torch_pruning"].append({"seed": seed, **_tp_row(path, original, task, row, done, seed,
                                                                               cfg, tp_state)})
        row["summary"] = {m: _summary(runs, task) for m, runs in row["methods"].items()}
        row["paired"] = _paired(row, task)
        rows.append(row)
    entry["rows"] = rows
    entry["torch_pruning_plan"] = tp_state.get("plan_record")
    return entry


# ---- onnxecc through the CLI -------------------------------------------------------------------------------------
def _cli(*args: str, threads: int, timeout: float = 4 * 3600) -> tuple[int, str, float]:
    """Exit code, the one line it ended with (an error's message) and seconds. torch in the child gets `threads`
    intra-op threads, as Torch-Pruning's fine-tuning in this process does."""
    t = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "onnxecc", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)
    text = " ".join((proc.stderr.strip() or proc.stdout.strip()).split())  # rich wraps long lines
    found = text.rfind("error:")
    if proc.returncode and found < 0:  # no one-line error: the end of what it printed, library warnings left out
        lines = [line for line in (proc.stderr or proc.stdout).splitlines()
                 if line.strip() and "Warning" not in line and not line.startswith("  ")]
        return proc.returncode, f"no error line; it ended with: {' | '.join(lines[-6:])[-600:]}", \
            time.perf_counter() - t
    start = max(found, 0) if proc.returncode else max(len(text) - 300, 0)
    return proc.returncode, text[start:], time.perf_counter() - t


def _shape_arg(task) -> str:
    return "x:" + ",".join(map(str, task.shape))


def profile_path(path: Path, name: str, task, cfg: dict) -> Path:
    """The cached profile of this architecture at this input size: keyed by the graph's structure, the size,
    onnxruntime's version and the profile settings."""
    from importlib import metadata

    import onnx

    from onnxecc.cost.profiler.store import fingerprint

    p = cfg["profile"]
    tag = (f"separation-{name}-{'x'.join(map(str, task.shape[2:]))}-{fingerprint(onnx.load(path))[:12]}"
           f"-ort{metadata.version('onnxruntime')}-s{p['samples']}-w{p['warmup']}-r{p['repeats']}")
    return _common.cache_dir() / "profiles" / f"{tag}.json"


def _profile(path: Path, name: str, task, cfg: dict) -> tuple[str, dict]:
    """`onnxecc profile` through the CLI, once per architecture and size (cached)."""
    from onnxecc.core.errors import UserError
    from onnxecc.cost.profiler import load_profile

    out = profile_path(path, name, task, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        try:
            load_profile(out, str(path))
            return str(out), {"cached": True}
        except UserError:
            out.unlink()
    p = cfg["profile"]
    code, last, secs = _cli("profile", str(path), "-o", str(out), "--samples", str(p["samples"]), "--warmup",
                            str(p["warmup"]), "--repeats", str(p["repeats"]), "--input-shape", _shape_arg(task),
                            "--quiet", threads=cfg["torch_threads"])
    if code != 0:
        raise RuntimeError(f"profile exit {code}: {last}")
    return str(out), {"cached": False, "s": round(secs, 1)}


def _onnxecc(path: Path, original, task, row: dict, method: str, seed: int, cfg: dict, tmp: Path) -> dict:
    """One `onnxecc compress` run, measured. A latency budget under the smallest reachable latency is raised once
    for the whole row (every method and seed then gets the same budget), recorded in the row."""
    from bench.transformers import raised_budget, reachable_floor
    from onnxecc.graph import ingest

    out, report = tmp / f"{method}-{row['budget']}-{seed}.onnx", tmp / f"{method}-{row['budget']}-{seed}.json"
    extra = ["--profile", row["profile_path"]] if row["metric"] == "latency" else []
    if method == "ecc" and cfg["rho"] is not None:
        extra += ["--rho", str(cfg["rho"])]
    if cfg["batch_size"] is not None:
        extra += ["--batch-size", str(cfg["batch_size"])]

    def compress(budget: str):
        return _cli("compress", str(path), "--budget", budget, "--metric", row["metric"], "--method", method,
                    "--data", task.npz, "--seed", str(seed), "--epochs", str(cfg["epochs"]),
                    "--admm-iterations", str(cfg["admm_iterations"]), "--admm-epochs", str(cfg["admm_epochs"]),
                    "--admm-decay", str(cfg["admm_decay"]), "--max-rounds", str(cfg["max_rounds"]),
                    "--input-shape", _shape_arg(task), "-o", str(out), "--report", str(report), "--quiet", *extra,
                    threads=cfg["torch_threads"])

    code, last, secs = compress(row["used"])
    floor = reachable_floor(last, float(row["used"]), row["metric"]) if code == 2 else None
    if floor is not None and row["used"] == row["asked"]:
        row.update(unreachable=last, floor=floor, used=raised_budget(floor, cfg["latency_step"]))
        code, last, secs = compress(row["used"])
    kept = over_budget_output(code, out, report)
    if kept is None and (code != 0 or not out.exists()):
        raise RuntimeError(f"compress exit {code}: {last}")
    rep = json.loads(report.read_text())
    res = _measure(original, ingest.load(kept or out), task, cfg)
    if kept is not None:  # compress kept its promise: measured, over the budget, set apart from the mean
        res.update(missed_budget=True, kept_as=kept.name)
    res.update(wall_s=secs, meets_budget=rep.get("meets_budget"), closed_loop_ratio=rep.get("latency_ratio"),
               rounds=len(rep.get("rounds") or []),
               epochs_trained=_epochs_trained(rep.get("history", []), cfg["admm_epochs"]),
               lr=next((h["lr"] for h in rep.get("history", []) if h.get("phase") == "lr_probe" and h.get("chosen")),
                       None))
    return res


def over_budget_output(code: int, out: Path, report: Path) -> Path | None:
    """The file `compress` kept when its closed loop missed the measured budget after every round, else None.
    compress then exits 1, writes the model to `NAME.over-budget.onnx` instead of `-o NAME.onnx` and names it in
    the report (`output`, `meets_budget` false): a run that did what it promises, not a failure of the harness."""
    if code != 1 or not report.exists():
        return None
    rep = json.loads(report.read_text())
    kept = Path(rep["output"]) if rep.get("output") else None
    if rep.get("meets_budget") is not False or kept is None or kept == out or not kept.exists() \
            or ".over-budget" not in kept.name:
        return None
    return kept


def _epochs_trained(history: list[dict], admm_epochs: int) -> int:
    """Training epochs in a compress report's history: fine-tuning epochs, ADMM iterations × their epochs, and
    greedy's steps (one short fine-tuning epoch each)."""
    count = {p: sum(1 for h in history if h.get("phase") == p) for p in ("finetune", "admm", "greedy")}
    return count["finetune"] + count["admm"] * admm_epochs + count["greedy"]


def _measure(original, out, task, cfg: dict) -> dict:
    """One output next to the original in ORT: test (and validation) accuracy, MACs ratio, latency ratio."""
    res = _evaluate(task, out)
    pair = _common.latency_pair(original, out, task.x_test[:1], rounds=cfg["rounds"], round_s=cfg["round_s"])
    return {**res, "macs_ratio": _macs(out, task.shape) / _macs(original, task.shape), "latency_ratio": pair["ratio"],
            "noisy": pair["noisy"], "latency": pair}


# ---- Torch-Pruning on the converted module -----------------------------------------------------------------------
@contextlib.contextmanager
def _capped_groups(cap: int):
    """Torch-Pruning's group building with a limit: a group that collects more than `cap` dependencies raises
    `_NotClosing` (its propagation revisits nodes with ever new index lists and does not end). Restored after."""
    from torch_pruning.dependency import group as tp_group

    add_dep = tp_group.Group.add_dep

    def capped(self, dep, idxs):
        if len(self.items) >= cap:
            raise _NotClosing(f"{len(self.items)} dependencies, last {dep.target.name}")
        return add_dep(self, dep, idxs)

    tp_group.Group.add_dep = capped
    try:
        yield
    finally:
        tp_group.Group.add_dep = add_dep


class _NotClosing(RuntimeError):
    pass


def _wrapped(module) -> set[str]:
    """Qualified names of the parameters Torch-Pruning knows how to prune (those of Conv, Linear, BatchNorm)."""
    import torch

    known = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.BatchNorm2d)
    return {f"{n}.{p}" if n else p for n, m in module.named_modules() if isinstance(m, known)
            for p, _ in m.named_parameters(recurse=False)}


def tp_plan(module, example, cfg: dict) -> dict:
    """What Torch-Pruning can prune in `module` (an onnx2torch conversion), found by trying, with the reasons:

    - parameters outside Conv/Linear/BatchNorm (onnx2torch's MatMul weights and the Adds of their biases, its
      ConvTranspose weights) are "unwrapped parameters" to Torch-Pruning, whose last axis it would prune without
      knowing the op: left whole;
    - each convolution's group is built with a cap on its dependencies (`_capped_groups`): roots whose group does
      not close are left whole;
    - a trial prune (ratio 0.3) with those left whole: if it raises or the pruned module no longer runs, every
      convolution from the first non-closing root on is left whole as well (the backbone alone is pruned), and
      that is tried too.
    Returns {"ignored_modules", "ignored_params" (qualified names), "reasons", "pruned_convs", "whole_convs"}."""
    import torch
    import torch_pruning as tp

    convs = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d)]
    unwrapped = sorted(n for n, _ in module.named_parameters() if n not in _wrapped(module))
    reasons = []
    if unwrapped:
        reasons.append(f"{len(unwrapped)} parameters outside Conv/Linear/BatchNorm modules (weights onnx2torch "
                       f"keeps in its own modules, e.g. {unwrapped[0]}) are unwrapped parameters to Torch-Pruning: "
                       "left whole")
    graph = tp.DependencyGraph().build_dependency(module, example_inputs=example)
    open_roots = []
    with _capped_groups(cfg["tp_close_cap"]):
        for name in convs:
            try:
                graph.get_pruning_group(module.get_submodule(name), tp.prune_conv_out_channels, idxs=[0])
            except _NotClosing as exc:
                open_roots.append(name)
                reasons.append(f"the group of {name} does not close: dependency propagation passed {exc} "
                               f"(cap {cfg['tp_close_cap']}); left whole")
    plan = {"ignored_modules": open_roots, "ignored_params": unwrapped}
    failure = _trial(module, example, plan)
    if failure and open_roots:
        reasons.append(f"with only those left whole, a trial prune fails: {failure}")
        first = convs.index(open_roots[0])
        plan = {"ignored_modules": convs[first:], "ignored_params": unwrapped}
        reasons.append(f"so every convolution from {open_roots[0]} on ({len(convs) - first} of {len(convs)}) is "
                       "left whole: Torch-Pruning prunes the convolutions before it")
        failure = _trial(module, example, plan)
    if failure:
        raise RuntimeError(f"Torch-Pruning cannot prune the converted graph: a trial prune fails: {failure}"
                           + (f"; before that: {'; '.join(reasons)}" if reasons else ""))
    whole = set(plan["ignored_modules"])
    return {**plan, "reasons": reasons, "pruned_convs": [c for c in convs if c not in whole],
            "whole_convs": [c for c in convs if c in whole]}


def _pruner(module, example, plan: dict, ratio: float, round_to: int | None):
    import torch_pruning as tp

    ignored = [module.get_submodule(n) for n in plan["ignored_modules"]]
    ignored += [module.get_parameter(n) for n in plan["ignored_params"]]
    return tp.pruner.MetaPruner(module, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to)


def _trial(module, example, plan: dict) -> str | None:
    """None when a prune at ratio 0.3 under `plan` works and the pruned copy runs, else what went wrong."""
    import torch

    trial = copy.deepcopy(module)
    entered: list[str] = []  # the converted node running when the pruned copy fails names the place
    try:
        _pruner(trial, example, plan, 0.3, None).step()
        for name, m in trial.named_modules():  # a throwaway copy: the hooks go with it
            if name and not list(m.children()):
                m.register_forward_pre_hook(lambda mod, args, name=name: entered.append(name))
        with torch.no_grad():
            trial(example)
    except Exception as exc:
        where = f" (in {entered[-1]}: {type(trial.get_submodule(entered[-1])).__name__})" if entered else ""
        return _common.error_text(exc) + where
    return None


def _export(module, example) -> bytes:
    """The torch module as ONNX (TorchScript exporter, opset 17). onnx2torch's Softmax over the last axis is a
    Reshape to the example's shape, so the file's batch is the example's: 1 (ORT runs it one sample at a time)."""
    import torch

    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module.eval(), (example,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                          opset_version=17)
    return buffer.getvalue()


def _tp_row(path: Path, original, task, row: dict, done: dict, seed: int, cfg: dict, state: dict) -> dict:
    """Torch-Pruning for one seed of a row: the MACs target (the budget's, or for latency the MACs of onnxecc's
    ecc output — else another onnxecc output — of this seed); the plan is found once per model."""
    if row["metric"] == "macs":
        target = float(row["used"]) * _macs(original, task.shape)
    else:
        ref = next((done[m] for m in ONNXECC_METHODS if met_budget([done.get(m, {"error": ""})])), None)
        if ref is None:
            return {"error": "no onnxecc output of this seed within the budget to take the MACs target from"}
        target = ref["macs_ratio"] * _macs(original, task.shape)
    try:
        return _torch_pruning(path, original, task, target, seed, cfg, state)
    except Exception as exc:
        return {"error": _common.error_text(exc)}


def _torch_pruning(path: Path, original, task, target: float, seed: int, cfg: dict, state: dict) -> dict:
    """The smallest ratio whose export fits `target` MACs (`tp_ratio`; MACs counted by onnxecc on the file), then
    the probe and fine-tuning, export, measurement."""
    import onnx
    import torch

    from onnxecc.cost.profiler.sampling import auto_step
    from onnxecc.graph import runtime
    from onnxecc.train.bridge import to_torch

    t = time.perf_counter()
    torch.manual_seed(seed)
    module = to_torch(onnx.load(path), {"x": task.shape}).module.eval()
    example = torch.from_numpy(task.x_test[:1])
    if "plan" not in state:
        try:
            state["plan"] = tp_plan(module, example, cfg)
            state["plan_record"] = {k: v for k, v in state["plan"].items() if k != "ignored_params"} | {
                "ignored_params": len(state["plan"]["ignored_params"])}
        except Exception as exc:
            state["plan"] = None
            state["plan_record"] = {"error": _common.error_text(exc)}
    plan = state["plan"]
    if plan is None:
        raise RuntimeError(state["plan_record"]["error"])
    round_to = auto_step()  # onnxecc's default --round-to, given to Torch-Pruning too

    def pruned_at(ratio: float):
        pruned = copy.deepcopy(module)
        _pruner(pruned, example, plan, ratio, round_to).step()
        return pruned, _macs(onnx.load_from_string(_export(pruned, example)), task.shape)

    ratio, best = tp_ratio(pruned_at, target, cfg, state.setdefault("macs_at", {}))
    if best is None:
        best, _ = pruned_at(ratio)  # found in the cache of an earlier seed: the same weights prune alike
    epochs = cfg["admm_iterations"] * cfg["admm_epochs"] + cfg["epochs"]
    teacher = runtime.run_batched(runtime.session(original, threads=1), task.x_train, batch_size=16)
    lr, tried = _common.probe_and_finetune(best, task.x_train, teacher, None, epochs, seed,
                                           batch_size=cfg["batch_size"])
    out = onnx.load_from_string(_export(best, example))
    res = {"ratio": ratio, "epochs_trained": epochs, "lr": lr, "lr_probe": tried, "wall_s": time.perf_counter() - t,
           "round_to": round_to}
    res.update(_measure(original, out, task, cfg))
    return res


def tp_ratio(pruned_at, target: float, cfg: dict, cache: dict) -> tuple[float, object]:
    """The smallest pruning ratio whose model has at most `target` MACs: a scan of the grid `tp_grid` (with
    `round_to` the MACs are not monotone in the ratio: a layer whose kept width would round to zero is left whole
    by Torch-Pruning, so past some ratio the MACs grow again), then `tp_search_steps` bisection steps between
    the last grid ratio over the target and the first under it. `pruned_at(ratio)` → (model, MACs); `cache` keeps
    ratio → MACs across calls (the pretrained weights prune alike for every seed). Returns (ratio, model or None
    when the ratio's model was not built in this call)."""
    built: dict = {}

    def macs(ratio: float) -> int:
        ratio = round(ratio, 6)
        if ratio not in cache:
            built[ratio], cache[ratio] = pruned_at(ratio)
        return cache[ratio]

    grid = [round(cfg["tp_grid"] * i, 6) for i in range(1, int(round(1 / cfg["tp_grid"])))]
    first = next((r for r in grid if macs(r) <= target), None)
    if first is None:
        raise RuntimeError(f"Torch-Pruning reaches {min(cache.values()) / target:.2f}× the MACs target at best on "
                           f"the ratios {grid[0]}–{grid[-1]}: the budget is out of its reach")
    lo, hi = grid[grid.index(first) - 1] if first != grid[0] else 0.0, first
    for _ in range(cfg["tp_search_steps"]):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if macs(mid) <= target else (mid, hi)
    hi = round(hi, 6)
    return hi, built.get(hi)


# ---- summary and the paired test ---------------------------------------------------------------------------------
def met_budget(runs: list[dict]) -> list[dict]:
    """The runs that produced an output within the budget (not an error, not a missed measured budget)."""
    return [r for r in runs if "error" not in r and not r.get("missed_budget")]


def _summary(runs: list[dict], task) -> dict:
    """Mean ± std over the runs that met the budget; a run that missed it (compress's `.over-budget.onnx`) is
    listed apart with its own measurement, never averaged in."""
    ok = met_budget(runs)
    keys = list(ok[0]["test"]) if ok else []
    missed = [{"seed": r["seed"], **r["test"], "macs_ratio": r["macs_ratio"], "latency_ratio": r["latency_ratio"],
               "closed_loop_ratio": r.get("closed_loop_ratio"), "wall_s": r["wall_s"],
               "epochs_trained": r.get("epochs_trained")} for r in runs if r.get("missed_budget")]
    return {"runs": len(ok), "errors": sorted({r["error"] for r in runs if "error" in r}), "missed": missed,
            **{k: _common.mean_std([r["test"][k] for r in ok]) for k in keys},
            "val": {k: _common.mean_std([r["val"][k] for r in ok]) for k in (list(ok[0]["val"]) if ok else [])},
            "macs_ratio": _common.mean_std([r["macs_ratio"] for r in ok]),
            "latency_ratio": _common.mean_std([r["latency_ratio"] for r in ok]),
            "wall_s": _common.mean_std([r["wall_s"] for r in ok]),
            "epochs_trained": sorted({r.get("epochs_trained") for r in ok if r.get("epochs_trained") is not None})}


def primary(task_or_name) -> str:
    """The score a row ranks methods by: character accuracy (recogniser), F-score against the boxes (detector)."""
    name = task_or_name if isinstance(task_or_name, str) else ("rec" if isinstance(task_or_name, _Lines) else "det")
    return "char_accuracy" if name == "rec" else "f_score"


def sign_test_p(better: int, worse: int) -> float:
    """Exact two-sided sign test = McNemar's exact test on the discordant pairs (`bench.quantize.sign_test_p`,
    checked against scipy's binomial test in tests/test_bench.py)."""
    from bench.quantize import sign_test_p as exact

    return exact(better, worse)


def paired_counts(a: list, b: list, higher_is_better: bool) -> tuple[int, int]:
    """Per sample, how often `a` is better than `b` and how often worse (ties dropped)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not higher_is_better:
        a, b = -a, -b
    return int((a > b).sum()), int((a < b).sum())


def _paired(row: dict, task) -> dict | None:  # `task`: the task, or its model's name (`merge`)
    """ecc against the best other method of the row (by mean test score), seed by seed on the same test samples
    (runs that met the budget only), counts summed over the seeds: recogniser — McNemar on exact lines and a sign
    test on character errors; detector — a sign test on page F-scores."""
    key = primary(task)
    summary = row["summary"]
    others = [m for m in summary if m != "ecc" and summary[m].get(key)]
    if not summary.get("ecc", {}).get(key) or not others:
        return None
    best = max(others, key=lambda m: summary[m][key]["mean"])
    ecc = {r["seed"]: r["per_sample"] for r in met_budget(row["methods"]["ecc"])}
    other = {r["seed"]: r["per_sample"] for r in met_budget(row["methods"][best])}
    seeds = sorted(set(ecc) & set(other))
    out: dict = {"versus": best, "seeds": seeds}
    if key == "char_accuracy":  # the recogniser
        exact = [paired_counts(np.asarray(ecc[s]) == 0, np.asarray(other[s]) == 0, True) for s in seeds]
        errors = [paired_counts(ecc[s], other[s], False) for s in seeds]
        tests = {"exact_line_mcnemar": exact, "char_errors_sign": errors}
    else:
        tests = {"page_f_sign": [paired_counts(ecc[s], other[s], True) for s in seeds]}
    for name, counts in tests.items():
        better, worse = sum(c[0] for c in counts), sum(c[1] for c in counts)
        out[name] = {"ecc_better": better, "ecc_worse": worse, "p": sign_test_p(better, worse)}
    return out


def _notes(models: list[dict], cfg: dict) -> list[str]:
    notes = []
    for m in models:
        if "error" in m:
            notes.append(f"{m['model']}: {m['error']}")
            continue
        plan = m.get("torch_pruning_plan")
        if plan:
            for reason in plan.get("reasons", [plan.get("error")]):
                notes.append(f"{m['model']} Torch-Pruning: {reason}")
        for row in m["rows"]:
            if row.get("unreachable"):
                notes.append(f"{m['model']} {row['budget']}: unreachable, raised to {row['used']}: "
                             f"{row['unreachable'][:160]}")
            for method, s in row.get("summary", {}).items():
                for err in s["errors"]:
                    notes.append(f"{m['model']} {row['budget']} {method}: {err[:200]}")
                for r in s.get("missed", []):
                    closed = r["closed_loop_ratio"]
                    notes.append(f"{m['model']} {row['budget']} {method} seed {r['seed']}: missed the measured budget "
                                 f"(compress's closed loop read {closed if closed is None else f'{closed:.3f}'} "
                                 f"after its rounds, exit 1, output kept as NAME.over-budget.onnx); measured here at "
                                 f"latency {r['latency_ratio']:.3f}: its own row, not in the mean of the runs that "
                                 "met the budget")
    total = cfg["admm_iterations"] * cfg["admm_epochs"] + cfg["epochs"]
    notes.append(f"variant {cfg['variant']}: every method {total} training epochs (ecc: {cfg['admm_iterations']}×"
                 f"{cfg['admm_epochs']} ADMM + {cfg['epochs']} fine-tuning; greedy: one per step, column 'epochs'), "
                 "distilled from the original's outputs, rate by onnxecc's probe; ORT CPU, 1 thread, batch 1")
    return notes


# ---- runs put together ------------------------------------------------------------------------------------------
PART_KEYS = ("command", "date", "wall_s", "load_average_before", "load_average_after")


def merge(files: list[dict]) -> dict:
    """Result files of this area as one (one model per process, or one method re-run): rows of the same model
    and budget are joined, a method's runs in a later file replacing an earlier file's, and each joined row's
    summary and paired test are computed again. Each file's command, date, wall time and settings stay under
    "parts"; "wall_s" is the longest part's (the parts may have run at the same time)."""
    out = copy.deepcopy(files[0])
    parts = [part for f in files
             for part in (f.get("parts") or [{**{k: f.get(k) for k in PART_KEYS}, "config": f["result"]["config"]}])]
    out.update(parts=parts, command="  &&  ".join(p["command"] for p in parts), wall_s=max(p["wall_s"] for p in parts),
               cpu_s=sum(f.get("cpu_s") or 0 for f in files))
    result = out["result"]
    by_name = {m["model"]: m for m in result["models"]}
    for f in files[1:]:
        for model in f["result"]["models"]:
            if model["model"] not in by_name:
                by_name[model["model"]] = copy.deepcopy(model)
                result["models"].append(by_name[model["model"]])
                continue
            rows = {r["budget"]: r for r in by_name[model["model"]]["rows"]}
            for row in model["rows"]:
                if row["budget"] not in rows:
                    by_name[model["model"]]["rows"].append(copy.deepcopy(row))
                    continue
                joined = rows[row["budget"]]
                joined["methods"].update({m: copy.deepcopy(runs) for m, runs in row["methods"].items() if runs})
                joined["summary"] = {m: _summary(runs, model["model"]) for m, runs in joined["methods"].items()}
                joined["paired"] = _paired(joined, model["model"])
    cfg = result["config"]
    for f in files[1:]:
        other = f["result"]["config"]
        for key in ("models", "methods", "seeds", "budgets"):
            cfg[key] += [v for v in other[key] if v not in cfg[key]]
    result["notes"] = list(dict.fromkeys(n for f in files for n in f["result"]["notes"]))
    return out


# ---- table -------------------------------------------------------------------------------------------------------
def _pm(v: dict | None, pct: bool = True) -> str:
    if not v:
        return "—"
    return f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}" if pct else f"{v['mean']:.3f}"


def _p(test: dict | None) -> str:
    return "" if not test else f"+{test['ecc_better']}/−{test['ecc_worse']} p={test['p']:.3g}"


def table(result: dict) -> Table:
    cfg = result["config"]
    t = Table(title=f"separation ({cfg['variant']}): PaddleOCR on rendered text, {len(cfg['seeds'])} seed(s), "
                    "mean ± std; ecc vs the row's best other method, paired per test sample")
    for col in ("model / budget", "method", "accuracy %", "exact lines %", "MACs", "latency", "epochs", "wall / run",
                "paired (ecc vs best)"):
        t.add_column(col, justify="left" if col in ("model / budget", "method", "paired (ecc vs best)") else "right")
    for m in result["models"]:
        if "error" in m:
            t.add_row(m["model"], "", f"[red]{m['error'][:90]}[/]", *[""] * 6)
            continue
        key = primary(m["model"])
        orig = m["original"]["test"]
        t.add_row(f"{m['model']} original", "", f"{100 * orig[key]:.1f}",
                  f"{100 * orig['line_accuracy']:.1f}" if "line_accuracy" in orig else "—", "1", "1", "", "", "")
        for row in m["rows"]:
            label = row["budget"] + (f"→{row['used']}" if row["used"] != row["asked"] else "")
            if "error" in row:
                t.add_row(f"{m['model']} {label}", "", f"[red]{row['error'][:90]}[/]", *[""] * 6)
                continue
            paired = row.get("paired") or {}
            for method, s in row["summary"].items():
                missed = s.get("missed", [])
                if not s["runs"]:
                    what = "no run met the budget" if missed else f"[red]{(s['errors'] or ['no run'])[0][:70]}[/]"
                    t.add_row(f"{m['model']} {label}", method, what, *[""] * 6)
                    _missed_rows(t, f"{m['model']} {label}", method, missed, key)
                    continue
                note = ""
                if method == "ecc" and paired:
                    note = (f"vs {paired['versus']}: exact {_p(paired.get('exact_line_mcnemar'))}; chars "
                            f"{_p(paired.get('char_errors_sign'))}" if "exact_line_mcnemar" in paired
                            else f"vs {paired['versus']}: pages {_p(paired.get('page_f_sign'))}")
                if s["runs"] < len(cfg["seeds"]):  # a failed seed (its error is in the notes) or a missed budget
                    why = f" ({len(missed)} missed, below)" if missed else ""
                    note = f"n={s['runs']} of {len(cfg['seeds'])}{why}" + (f"; {note}" if note else "")
                t.add_row(f"{m['model']} {label}", method, _pm(s.get(key)), _pm(s.get("line_accuracy")),
                          _pm(s["macs_ratio"], False), _pm(s["latency_ratio"], False),
                          "/".join(map(str, s["epochs_trained"])), _common.secs(s["wall_s"]["mean"]), note)
                _missed_rows(t, f"{m['model']} {label}", method, missed, key)
    return t


def _missed_rows(t: Table, label: str, method: str, missed: list[dict], key: str) -> None:
    """One row per run that missed the measured budget: the over-budget file's own accuracy and latency ratio,
    apart from the mean of the runs that met it."""
    for r in missed:
        t.add_row(label, f"{method} seed {r['seed']}", f"{100 * r[key]:.1f} (over budget)",
                  f"{100 * r['line_accuracy']:.1f}" if "line_accuracy" in r else "—", f"{r['macs_ratio']:.3f}",
                  f"missed ({r['latency_ratio']:.2f})", str(r.get("epochs_trained") or ""), _common.secs(r["wall_s"]),
                  "missed the budget: not in the mean above")


if __name__ == "__main__":  # python -m bench.separation OUT.json IN.json...: the result files, `merge`d
    target, *sources = sys.argv[1:]
    Path(target).write_text(json.dumps(merge([json.loads(Path(p).read_text()) for p in sources]), indent=1) + "\n")
