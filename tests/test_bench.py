"""Smoke test of the benchmark suite (`python -m bench`): one tiny area through the real code path.

No timing is asserted anywhere: speed goals live in the benchmark tables (ratios measured side by side).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from test_closed_loop import floor_here as _floor_here  # noqa: E402, F401  (fixtures: a measured latency miss)
from test_closed_loop import profile_here as _profile_here  # noqa: E402, F401

from bench import areas  # noqa: E402
from bench.__main__ import main  # noqa: E402

EXPECTED_AREAS = {"groups", "latency", "projection", "roundtrip", "compress", "guarantee", "methods", "wsp",
                  "transformers", "separation"}


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=160)


def test_registry_has_the_areas():
    registry = areas()
    assert EXPECTED_AREAS <= set(registry)
    for name, module in registry.items():
        assert callable(module.run) and callable(module.table), name


def test_opt_in_areas_run_only_when_named(tmp_path):
    """A run without --only goes through every area but the opt-in ones (separation: many hours) and its header
    says which it skipped and how to run them; --only runs an opt-in area; --list marks it. A setting no area has
    makes each selected area fail at once, so the default run is real but takes seconds."""
    from bench import opt_in_reason, select

    registry = areas()
    opt_in = [name for name, module in registry.items() if opt_in_reason(module)]
    assert opt_in == ["separation"]
    default, skipped = select(registry)
    assert skipped == ["separation"] and "separation" not in default
    assert set(default) == set(registry) - {"separation"}
    assert select(registry, "separation") == (["separation"], [])
    assert select(registry, "groups, separation") == (["groups", "separation"], [])

    console = _quiet()
    assert main(["--quick", "--results", str(tmp_path), "--set", "nosuch=1"], console=console) == 1
    text = console.file.getvalue()
    header = " ".join(text.split("─")[0].split())  # the line before the first area's rule, unwrapped
    assert "skipped opt-in areas: separation (many hours): run with --only separation" in header, header
    failed = {line.split()[1] for line in text.splitlines() if line.startswith("area ") and " failed:" in line}
    assert failed == set(default)  # every default area was started (and refused the setting); separation was not
    console = _quiet()
    assert main(["--quick", "--only", "separation", "--results", str(tmp_path), "--set", "nosuch=1"],
                console=console) == 1
    text = console.file.getvalue()
    assert "skipped" not in text.split("─")[0] and "area separation failed:" in text
    console = _quiet()
    assert main(["--list"], console=console) == 0
    listed = {line.split()[0]: line for line in console.file.getvalue().splitlines() if line.strip()}
    assert "[opt-in: many hours; run with --only separation]" in listed["separation"]
    assert all("opt-in" not in listed[name] for name in default)


def test_groups_area_writes_json(tmp_path):
    console = _quiet()
    rc = main(["--quick", "--only", "groups", "--results", str(tmp_path), "--set", 'archs=["squeezenet1_1"]'],
              console=console)
    assert rc == 0, console.file.getvalue()
    data = json.loads((tmp_path / "groups.json").read_text())
    for key in ("area", "date", "machine", "versions", "command", "quick", "wall_s", "result"):
        assert key in data, key
    assert data["area"] == "groups" and data["quick"] is True
    assert data["machine"]["cpu"] and data["machine"]["cores"] >= 1
    assert {"torch", "onnxruntime"} <= set(data["versions"])
    assert data["command"].startswith("python -m bench") and "--only groups" in data["command"]
    rows = data["result"]["rows"]
    assert [r["arch"] for r in rows] == ["squeezenet1_1"]
    row = rows[0]
    assert "error" not in row, row
    assert row["conv_layers"] > 0 and 0 < row["prunable_fraction"] <= 1
    assert row["groups"] >= row["prunable_groups"] > 0
    assert row["frozen_groups"] >= 2  # graph input and output
    assert "channel groups" in console.file.getvalue()  # the table was printed
    assert not list(tmp_path.glob("*.tmp*"))  # atomic write left nothing behind


def test_results_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXECC_BENCH_RESULTS", str(tmp_path / "env"))
    assert main(["--quick", "--only", "groups", "--set", 'archs=["squeezenet1_1"]'], console=_quiet()) == 0
    assert (tmp_path / "env" / "groups.json").exists()


def test_unknown_area_and_setting(tmp_path):
    assert main(["--only", "nosuch", "--results", str(tmp_path)], console=_quiet()) == 2
    console = _quiet()
    assert main(["--quick", "--only", "groups", "--results", str(tmp_path), "--set", "nosuch=1"],
                console=console) == 1
    assert "no setting nosuch" in console.file.getvalue()
    assert not (tmp_path / "groups.json").exists()


@pytest.mark.parametrize("multiple", [1, 8])
def test_latency_kept_units_rule(multiple):
    from bench.latency import kept_units

    assert kept_units(64, 1, 0.5, multiple) == 32
    assert kept_units(3, 1, 0.5, 1) == 2
    if multiple == 8:
        assert kept_units(96, 1, 0.7, 8) == 64  # 67.2 channels → nearest multiple of 8
        assert kept_units(16, 4, 0.5, 8) * 4 % 8 == 0  # folded group: units × block a multiple of 8
        assert kept_units(4, 1, 0.5, 8) == 4  # too small for a multiple of 8: kept whole


def test_latency_table_renders_errors_and_noise():
    from bench import latency

    cfg = {**latency.config(True), "archs": ["a", "b"]}
    ok = {"macs_ratio": 0.5, "latency_ratio": 1.2,
          "latency": {"original_ms": 2.0, "other_ms": 2.4, "ratio": 1.2, "noisy": True}}
    row = {"arch": "a", **{f"uniform_{f}_{label}": ok for f in cfg["keeps"]
                           for label, _ in latency._uniform_variants(cfg)},
           "compress_r1": {"error": "ValueError: not bilinear"}, "compress_r8": ok}
    result = {"config": cfg, "rows": [row, {"arch": "b", "error": "RuntimeError: export failed"}]}
    console = _quiet()
    console.print(latency.table(result))
    text = console.file.getvalue()
    assert "1.20?" in text and "error" in text


def test_quantize_paired_sign_test_matches_scipy():
    """The quantize area's paired verdict: exact two-sided sign test, checked against scipy's binomial test."""
    from scipy.stats import binomtest

    from bench.quantize import _paired, sign_test_p

    for better, worse in [(0, 0), (3, 0), (0, 3), (2, 5), (7, 7), (1, 12), (20, 9)]:
        want = binomtest(min(better, worse), better + worse, 0.5).pvalue if better + worse else 1.0
        assert sign_test_p(better, worse) == pytest.approx(want, rel=1e-12)
    assert _paired([1, 2, 3], [3, 4]) == (2, 1) and _paired(None, [1]) == (0, 0)


def _encoder_analysis():
    """The test zoo's BERT-style encoder (4 heads of 8 in each of 2 layers) and its `inspect` JSON at 1×32 tokens."""
    import zoo

    from onnxecc.inspection import inspect

    shapes = {"input_ids": (1, 32), "attention_mask": (1, 32)}
    path = zoo.export_encoder()
    return path, shapes, inspect(str(path), input_shapes=shapes).as_dict()


def test_transformers_area_reads_heads_per_layer_from_inspect_and_report():
    """The area's heads before → after per attention layer (inspect's groups, compress's kept widths) equal the
    head count of the compressed file itself: its q projections' output columns over the head width (8)."""
    from bench.transformers import group_counts, widths_by_kind
    from onnxecc import compress
    from onnxecc.compress import CompressOptions
    from onnxecc.graph.ingest import load

    path, shapes, info = _encoder_analysis()
    result = compress(str(path), "0.4", options=CompressOptions(metric="macs", measure_latency=False,
                                                                input_shapes=shapes, round_to=1))
    widths = widths_by_kind(info, result.as_dict())
    heads = widths["heads"]
    assert [h["name"] for h in heads] == ["/blocks.0", "/blocks.1"] and [h["before"] for h in heads] == [4, 4]
    assert [h["group"] for h in heads] == [g["id"] for g in info["groups"] if g["heads"]]
    init = {t.name: t for t in load(result.model).graph.initializer}
    q_columns = [init[n.input[1]].dims[1] for n in result.model.graph.node
                 if n.op_type == "MatMul" and "/q/" in n.name]
    assert [h["after"] for h in heads] == [c // 8 for c in q_columns]
    assert any(h["after"] < 4 for h in heads)  # the budget needs heads removed, not only feed-forward widths
    assert [w["name"] for w in widths["prunable"] if "/up" in w["name"]] == ["/blocks.0/up", "/blocks.1/up"]
    counts = group_counts(info)
    assert counts["heads"] == 2 and counts["total"] == counts["prunable"] + counts["frozen"]


def test_transformers_area_raises_an_unreachable_budget_to_one_compress_meets():
    """compress's one-line refusal of a budget under the smallest reachable cost is read back as a fraction; the
    budget the area then uses is met by compress (and the floor itself is not a usable budget below it)."""
    from bench.transformers import raised_budget, reachable_floor
    from onnxecc import compress
    from onnxecc.compress import CompressOptions
    from onnxecc.core.errors import UserError

    path, shapes, _ = _encoder_analysis()
    opts = CompressOptions(metric="macs", measure_latency=False, input_shapes=shapes)
    with pytest.raises(UserError) as refused:
        compress(str(path), "0.05", options=opts)
    floor = reachable_floor(str(refused.value), 0.05, "macs")
    assert floor is not None and 0.05 < floor < 1
    raised = raised_budget(floor, 0.05)
    assert float(raised) >= floor * 1.05 and round(float(raised) / 0.05, 6).is_integer()
    result = compress(str(path), raised, options=opts)
    assert floor * (1 - 1e-3) <= result.final_cost / result.original_cost <= float(raised)
    assert reachable_floor("error: --data digits is N×1×8×8 but the model input is 1×32", 0.5, "macs") is None


def test_separation_reads_lines_as_rapidocr_does():
    """The area's greedy CTC decoding with the dictionary from the recogniser's metadata gives the strings the
    package's own decoder (rapidocr's CTCLabelDecode) gives on the same ORT outputs, and the original reads the
    rendered lines (the comparison would mean nothing otherwise). Edit distance against a brute-force recursion."""
    from functools import cache

    from rapidocr_onnxruntime.ch_ppocr_rec.utils import CTCLabelDecode

    from bench import separation, textdata
    from onnxecc.graph import runtime

    path = separation.model_path("rec")
    x, truth = textdata.rec_lines(12, seed=7)
    scores = runtime.run_batched(runtime.session(str(path)), x)
    chars = separation.dictionary(path)
    ours = separation.ctc_greedy(scores, chars)
    theirs = [text for text, _ in CTCLabelDecode(character=chars[1:-1])(scores)]
    assert ours == theirs
    errors = [min(separation.edit_distance(p, str(t)), len(str(t))) for p, t in zip(ours, truth)]
    assert 1 - sum(errors) / sum(len(str(t)) for t in truth) >= 0.9, list(zip(ours, truth))

    @cache
    def reference(a: str, b: str) -> int:
        if not a or not b:
            return len(a) + len(b)
        return min(reference(a[1:], b) + 1, reference(a, b[1:]) + 1, reference(a[1:], b[1:]) + (a[0] != b[0]))

    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = ("".join(rng.choice(list("abc"), size=int(rng.integers(0, 7)))) for _ in range(2))
        assert separation.edit_distance(a, b) == reference(a, b), (a, b)


def test_separation_torch_pruning_ratio_scans_past_a_non_monotone_region():
    """Torch-Pruning with round_to leaves a layer whole when its kept width would round to zero, so the MACs grow
    again past some ratio: the search must find the smallest ratio under the target, not bisect into the region
    where the MACs rise again, and reuse the MACs it has counted."""
    from bench.separation import tp_ratio

    def macs_of(r: float) -> float:  # falls to 0.2 at ratio 0.6, then grows again (layers left whole)
        return 1.0 - r * 4 / 3 if r <= 0.6 else 0.2 + (r - 0.6) * 2

    calls = []

    def pruned_at(r):
        calls.append(r)
        return f"model@{r}", macs_of(r)

    cache: dict = {}
    ratio, model = tp_ratio(pruned_at, 0.5, {"tp_grid": 0.1, "tp_search_steps": 6}, cache)
    assert macs_of(ratio) <= 0.5 and abs(ratio - 0.375) <= 0.1 / 2 ** 6 and model == f"model@{ratio}"
    assert calls[:4] == [0.1, 0.2, 0.3, 0.4]  # the grid upwards to the first ratio under the target
    count = len(calls)
    again, model = tp_ratio(pruned_at, 0.5, {"tp_grid": 0.1, "tp_search_steps": 6}, cache)
    assert again == ratio and len(calls) == count and model is None  # counted before: nothing pruned again
    with pytest.raises(RuntimeError, match="out of its reach"):
        tp_ratio(pruned_at, 0.1, {"tp_grid": 0.1, "tp_search_steps": 2}, {})


def test_separation_area_quick(tmp_path):
    """The area through `python -m bench` on a few lines, one method: the original's accuracy and each output's
    are recomputed here from the per-line errors the JSON keeps and the strings drawn again from the same seed."""
    from bench import textdata

    console = _quiet()
    rec = {"train": 8, "test": 8, "width": 160, "length": [3, 8], "sizes": [20, 40]}
    rc = main(["--quick", "--only", "separation", "--results", str(tmp_path), "--set", 'methods=["uniform"]',
               "--set", f"rec={json.dumps(rec)}"], console=console)
    assert rc == 0, console.file.getvalue()
    result = json.loads((tmp_path / "separation.json").read_text())["result"]
    assert result["config"]["variant"] == "quick"
    model = result["models"][0]
    assert model["model"] == "rec" and model["data"]["train"] == 8 and model["data"]["val"] == 2
    cfg = result["config"]
    _, truth = textdata.rec_lines(8, cfg["data_seeds"]["test"], shape=(48, 160), length=(3, 8), sizes=(20, 40))
    chars = sum(len(t) for t in truth)

    def check(outcome):
        errors = outcome["per_sample"]
        assert len(errors) == 8 and all(0 <= e <= len(t) for e, t in zip(errors, truth))
        assert outcome["test"]["char_accuracy"] == pytest.approx(1 - sum(errors) / chars)
        assert outcome["test"]["line_accuracy"] == pytest.approx(np.mean(np.asarray(errors) == 0))

    check(model["original"])
    assert model["original"]["test"]["char_accuracy"] >= 0.9
    row = model["rows"][0]
    assert row["budget"] == "macs@0.3" and list(row["methods"]) == ["uniform"]
    run = row["methods"]["uniform"][0]
    assert "error" not in run, run
    check(run)
    assert run["macs_ratio"] <= 0.3 + 1e-9 and run["latency_ratio"] > 0 and run["wall_s"] > 0
    assert "separation" in console.file.getvalue()
    assert main(["--only", "separation", "--results", str(tmp_path), "--set", "variant=nosuch"],
                console=_quiet()) == 1


def test_separation_merge_joins_a_re_run_method_into_its_row():
    """The committed MACs 0.3 row and the committed ecc-only re-run (ρ₀ 0.25): the merged row takes ecc's runs
    from the re-run, keeps the other methods, and its summary and paired test are those recomputed here in numpy
    from the per-sample scores."""
    from bench.separation import merge

    results = REPO / "bench" / "results"
    full, rerun = (json.loads((results / name).read_text()) for name in ("separation.json",
                                                                          "separation-ecc-rho0.25.json"))
    merged = merge([full, rerun])
    row = lambda d, model: next(m for m in d["result"]["models"] if m["model"] == model)["rows"][0]  # noqa: E731
    for model, key, higher in (("det", "f_score", True), ("rec", "char_accuracy", False)):
        joined, ecc_runs, old = row(merged, model), row(rerun, model)["methods"]["ecc"], row(full, model)
        assert joined["methods"]["ecc"] == ecc_runs and joined["methods"]["project"] == old["methods"]["project"]
        assert joined["summary"]["ecc"][key]["mean"] == pytest.approx(np.mean([r["test"][key] for r in ecc_runs]))
        assert joined["summary"]["greedy"] == old["summary"]["greedy"]
        best = max((m for m in joined["summary"] if m != "ecc" and joined["summary"][m].get(key)),
                   key=lambda m: joined["summary"][m][key]["mean"])
        assert joined["paired"]["versus"] == best
        other = {r["seed"]: np.asarray(r["per_sample"], float) for r in joined["methods"][best]}
        ecc = {r["seed"]: np.asarray(r["per_sample"], float) for r in ecc_runs}
        # the recogniser's per-sample scores are character errors: fewer is better
        better = sum(int(((ecc[s] > other[s]) if higher else (ecc[s] < other[s])).sum()) for s in ecc)
        worse = sum(int(((ecc[s] < other[s]) if higher else (ecc[s] > other[s])).sum()) for s in ecc)
        test = joined["paired"]["page_f_sign" if model == "det" else "char_errors_sign"]
        assert (test["ecc_better"], test["ecc_worse"]) == (better, worse)
    assert len(merged["parts"]) == len(full["parts"]) + len(rerun["parts"]) and merged["wall_s"] == max(
        p["wall_s"] for p in merged["parts"])


def test_separation_reads_a_missed_measured_budget_as_its_own_outcome(tmp_path, request):
    """compress through the CLI as the area runs it, on a budget the (optimistic) profile believes reachable and
    this machine measures over (test_closed_loop's injected model error): exit 1, the model kept as
    NAME.over-budget.onnx. The area reads that file back as a missed budget; a run that met its budget and a
    refused one are not read as misses."""
    from test_closed_loop import DEMO_MODELS, _below_the_floor, _optimistic_profile

    from bench.separation import _cli, over_budget_output

    profile_here, floor_here = request.getfixturevalue("_profile_here"), request.getfixturevalue("_floor_here")
    model = str(DEMO_MODELS[0])
    out, report = tmp_path / "m.onnx", tmp_path / "m.json"
    code, last, _ = _cli("compress", model, "--metric", "latency", "--profile",
                         str(_optimistic_profile(tmp_path, profile_here)), "--max-rounds", "1", "--budget",
                         _below_the_floor(tmp_path, profile_here, floor_here), "-o", str(out), "--report",
                         str(report), "--quiet", threads=1)
    assert code == 1, last
    kept = over_budget_output(code, out, report)
    assert kept == tmp_path / "m.over-budget.onnx" and kept.exists() and not out.exists()
    assert json.loads(report.read_text())["meets_budget"] is False

    met, met_report = tmp_path / "ok.onnx", tmp_path / "ok.json"
    code, last, _ = _cli("compress", model, "--metric", "macs", "--budget", "0.5", "-o", str(met), "--report",
                         str(met_report), "--quiet", threads=1)
    assert code == 0 and met.exists(), last
    assert over_budget_output(code, met, met_report) is None
    code, last, _ = _cli("compress", model, "--metric", "macs", "--budget", "0.0001", "-o", str(tmp_path / "no.onnx"),
                         "--report", str(tmp_path / "no.json"), "--quiet", threads=1)
    assert code == 2 and over_budget_output(code, tmp_path / "no.onnx", tmp_path / "no.json") is None, last
