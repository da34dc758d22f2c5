"""A measured energy budget is checked on the output with the profile's own meter (issue #28 item 1).

No RAPL, NVML or Jetson rails exist on these machines, so the meter is a real `cmd:` meter (`CmdMeter`: a shell
command run before and after every window, its printed joules differenced) reading a fixture energy source: the
CPU time of the measuring process's main thread (`/proc/PID/schedstat`, nanoseconds; onnxruntime with one intra-op
thread runs the model on the calling thread) at a constant `WATTS`. The energy it reports follows the work the
model does, so a pruned model reads less than the original, and the test can check the closed loop's ratios
against CPU time measured independently (`time.thread_time`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import DEMO_MODELS

from onnxecc.compress import CompressOptions, _selected_round, compress
from onnxecc.core.errors import UserError
from onnxecc.cost.profiler import load_profile, profile
from onnxecc.cost.profiler.meters import CmdMeter
from onnxecc.graph import ingest, runtime
from onnxecc.validate import read_metadata, validate

CNN = DEMO_MODELS[0]
WATTS = 15
WINDOW_S = 0.05


def _meter_command(log) -> str:
    """Cumulative joules of this process's main thread at `WATTS`; every reading appends a line to `log`. `$PPID`
    in the shell CmdMeter starts is the measuring Python process (pytest, or the `onnxecc` CLI)."""
    return f"read ns rest < /proc/$PPID/schedstat; echo >> '{log}'; echo \"$((ns * {WATTS}))e-9 J\""


@pytest.fixture(scope="module")
def energy_profile(tmp_path_factory):
    """A real energy profile of digits_cnn, measured with the fixture meter (20 samples: ~8 s)."""
    root = tmp_path_factory.mktemp("energy")
    log = root / "meter.log"
    command = _meter_command(log)
    meter = CmdMeter(f"cmd:{command}", command, window_s=WINDOW_S)
    path = root / "digits_cnn.energy.json"
    profile(CNN, path, meter=meter, samples=20, repeats=3, warmup=2, paired=False, step=16)
    return path, f"cmd:{command}", log


def _one_conv(tmp_path, source, layer: str = "/features/features.7/Conv"):
    """The profile with every joule of its fit moved onto one convolution (no fixed energy, nothing elsewhere): it
    believes pruning that layer's two channel groups saves everything, while the meter still reads the other
    layers and the fixed cost (together about half of the original's energy here) — a model error the
    measurement must catch, whatever the fit of the day."""
    data = json.loads(source.read_text())
    fit = data["fit"]
    total = fit["constant"] + sum(fit["layers"].values()) + sum(fit["linear"].values())
    fit["constant"], fit["linear"] = 0.0, {}
    fit["layers"] = {name: total if name == layer else 0.0 for name in fit["layers"]}
    path = tmp_path / "one_conv.json"
    path.write_text(json.dumps(data))
    return path


def _reads(log) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def _cpu_time_ratio(original, compressed, rounds: int = 9, runs: int = 100) -> float:
    """The compressed model's CPU time over the original's, measured here with `time.thread_time` in alternating
    rounds (median of per-round ratios): what the fixture meter's energy ratio must be, measured without it."""
    sess_o, sess_c = runtime.session(original), runtime.session(compressed)
    x = runtime.example_input(sess_o)
    feed = {sess_o.get_inputs()[0].name: x}

    def cpu(sess):
        for _ in range(5):
            sess.run(None, feed)
        start = time.thread_time()
        for _ in range(runs):
            sess.run(None, feed)
        return time.thread_time() - start

    return float(np.median([cpu(sess_c) / cpu(sess_o) for _ in range(rounds)]))


def test_the_profile_records_its_energy_meter(energy_profile):
    path, spec, _ = energy_profile
    prof = load_profile(path, CNN)
    assert prof.metric == "energy" and prof.unit == "J"
    assert prof.meter["spec"] == spec and prof.meter["window_s"] == WINDOW_S


def test_an_energy_budget_is_judged_by_measuring_the_output_with_the_profiles_meter(tmp_path, energy_profile):
    path, spec, log = energy_profile
    out = tmp_path / "e.onnx"
    before = _reads(log)
    result = compress(CNN, "0.5", out, CompressOptions(metric="energy", profile=str(path), closed_loop_loosen=False))
    for r in result.rounds:  # every round measured with the profile's meter, its verdict from the per-round ratios
        assert r["meter"] == spec and len(r["ratios"]) == r["timed_rounds"] >= 7
        assert r["ratio"] == pytest.approx(np.median(r["ratios"]))
        assert r["meets"] == (r["ratio"] <= 0.5) and r["of_budget"] == pytest.approx(r["ratio"] / 0.5)
    # the meter ran: two readings per window, one window per model and side-by-side round (plus the start check)
    assert _reads(log) - before >= 2 * 2 * sum(r["timed_rounds"] for r in result.rounds)
    chosen = _selected_round(result.rounds)
    assert result.meets_budget == chosen["meets"]
    assert result.meets_budget_by.startswith(f"measured with the meter {spec}")
    report = result.as_dict()
    assert [r["ratio"] for r in report["rounds"]] == [r["ratio"] for r in result.rounds]
    # the measured ratio is this output's: CPU time measured independently of the meter agrees
    independent = _cpu_time_ratio(ingest.load(CNN), result.model)
    assert abs(np.log(chosen["ratio"] / independent)) < np.log(1.4), (chosen["ratio"], independent)
    if result.meets_budget:
        assert out.exists()
        meta = read_metadata(ingest.load(out))
        assert meta["metric"] == "energy" and meta["meter"]["spec"] == spec


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxecc", *args], capture_output=True, text=True, timeout=600)


def test_a_measured_miss_tightens_and_is_never_written_under_the_requested_name(tmp_path, energy_profile):
    """The one-conv profile estimates its first output within the budget; the meter reads it over, the loop
    tightens below that estimate, and misses again (the layers the profile ignores read more than 0.3 of the
    original on their own): the output is kept as NAME.over-budget.onnx, exit 1. `validate --meter` measures the
    kept file over the budget again; without the meter it says it did not re-check it."""
    path, spec, _ = energy_profile
    wrong = _one_conv(tmp_path, path)
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    proc = _cli("compress", str(CNN), "--metric", "energy", "--profile", str(wrong), "--budget", "0.3",
                "--max-rounds", "2", "-o", str(out), "--report", str(report))
    assert proc.returncode == 1, proc.stderr
    kept = tmp_path / "m.over-budget.onnx"
    assert not out.exists() and kept.exists()
    printed = " ".join(proc.stdout.split())  # rich wraps long lines
    assert "misses the budget" in printed and "measured with the meter" in printed
    data = json.loads(report.read_text())
    first, second = data["rounds"]
    budget = data["budget"]["absolute"]
    assert first["estimated_cost"] <= budget and first["meter"] == spec and not first["meets"], first
    assert first["ratio"] > 0.3 and first["next"] == "over budget"
    assert second["internal_budget"] < first["estimated_cost"] and second["estimated_cost"] < first["estimated_cost"]
    assert not second["meets"] and data["meets_budget"] is False
    assert data["meets_budget_by"].startswith("measured with the meter")
    checked = _cli("validate", str(CNN), str(kept), "--meter", spec, "--json")
    assert checked.returncode == 1, checked.stderr
    budget = json.loads(checked.stdout)["budget"]
    assert budget["meter"] == spec and budget["ratio"] > 0.3 and budget["meets_budget"] is False
    unchecked = _cli("validate", str(CNN), str(kept), "--json")
    assert unchecked.returncode == 0, unchecked.stderr
    budget = json.loads(unchecked.stdout)["budget"]
    assert budget["meets_budget"] is None and "needs the meter" in budget["note"] and spec in budget["note"]


def test_validate_measures_an_energy_budget_with_the_meter_and_refuses_it_without_one(tmp_path, energy_profile):
    path, spec, _ = energy_profile
    out = tmp_path / "e.onnx"
    compress(CNN, "0.6", out, CompressOptions(metric="energy", profile=str(path), closed_loop_loosen=False))
    unchecked = validate(CNN, out)
    assert unchecked.meets_budget is None and "needs the meter" in unchecked.budget["note"]
    checked = validate(CNN, out, meter=spec)
    b = checked.budget
    assert b["meter"] == spec and len(b["ratios"]) == 5 and b["ratio"] == pytest.approx(np.median(b["ratios"]))
    assert checked.meets_budget == (b["ratio"] <= 0.6) and b["fraction"] == pytest.approx(0.6)
    independent = _cpu_time_ratio(ingest.load(CNN), ingest.load(out))
    assert abs(np.log(b["ratio"] / independent)) < np.log(1.4), (b["ratio"], independent)
    macs = tmp_path / "macs.onnx"
    compress(CNN, "0.5", macs, CompressOptions(metric="macs", measure_latency=False))
    with pytest.raises(UserError, match="leave out --meter"):
        validate(CNN, macs, meter=spec)


def test_a_meter_that_cannot_run_here_is_one_line_naming_the_way_out(tmp_path, energy_profile):
    """A profile measured with RAPL, compressed on a machine without RAPL counters: refused before anything is
    written (never the estimate passed off as a measurement); `--no-closed-loop` keeps the estimate, and says so."""
    path, _, _ = energy_profile
    data = json.loads(path.read_text())
    data["meter"] = {"spec": f"rapl:{tmp_path / 'no-such-zone'}", "name": "rapl", "metric": "energy", "unit": "J"}
    rapl = tmp_path / "rapl.json"
    rapl.write_text(json.dumps(data))
    out = tmp_path / "m.onnx"
    with pytest.raises(UserError, match="cannot run here.*--no-closed-loop"):
        compress(CNN, "0.5", out, CompressOptions(metric="energy", profile=str(rapl)))
    assert not out.exists()
    proc = _cli("compress", str(CNN), "--metric", "energy", "--profile", str(rapl), "--budget", "0.5", "-o", str(out))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--no-closed-loop" in proc.stderr
    assert not out.exists()
    result = compress(CNN, "0.5", out, CompressOptions(metric="energy", profile=str(rapl), closed_loop=False))
    assert all("meets" not in r for r in result.rounds) and out.exists()
    assert result.meets_budget_by.startswith("estimated") and any("not measured" in w for w in result.warnings)
