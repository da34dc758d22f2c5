"""`sweep`: every point written, a valid plot, resumable after a rerun or an interrupt (Ctrl-C)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import DEMO_MODELS, REPO

from onnxecc.compress import CompressOptions
from onnxecc.sweep import point_name, sweep

MODEL = DEMO_MODELS[0]  # digits_cnn
TINY = dict(metric="macs", data="digits", epochs=1, admm_iterations=1, admm_epochs=1, measure_latency=False)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _starts(events: list) -> int:
    return sum(1 for kind, info in events if kind == "point" and info["status"] == "start")


def test_sweep_writes_points_plot_and_reuses_them(tmp_path):
    out, plot = tmp_path / "sweep", tmp_path / "pareto.png"
    events: list = []
    budgets, methods = ["0.00001", "0.3", "0.6"], ["ecc", "uniform"]
    result = sweep(MODEL, budgets, methods, out, CompressOptions(**TINY), plot=plot,
                   on_event=lambda kind, info: events.append((kind, info)))
    assert _starts(events) == 6 and result.computed == 4
    summary = json.loads((out / "sweep.json").read_text())
    rows = {row["name"]: row for row in summary["points"]}
    assert len(rows) == 6
    for method in methods:  # far below the smallest reachable cost: recorded as skipped, the sweep went on
        row = rows[point_name(method, "0.00001")]
        assert row["status"] == "skipped" and "smallest reachable cost" in row["message"]
    done = [row for row in summary["points"] if row["status"] == "done"]
    for row in done:
        assert os.path.exists(row["model"]) and os.path.exists(row["report"])
        assert row["meets_budget"] and row["cost_fraction"] <= row["budget_fraction"] + 1e-9
        assert 0 <= row["accuracy_after"] <= 1 and row["latency_ratio"] is None
    assert summary["original"]["accuracy"] > 0.9 and summary["original"]["cost"] == done[0]["original_cost"]
    data = plot.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert not [p for p in plot.parent.iterdir() if p.name.startswith(".")]  # no temp file left

    mtimes = {row["name"]: os.stat(row["model"]).st_mtime_ns for row in done}
    events.clear()
    again = sweep(MODEL, budgets, methods, out, CompressOptions(**TINY), on_event=lambda k, i: events.append((k, i)))
    assert _starts(events) == 0 and again.computed == 0
    assert {row["name"]: os.stat(row["model"]).st_mtime_ns for row in again.points if row["status"] == "done"} == mtimes

    events.clear()  # other settings (here: the seed) are a different sweep: recomputed
    sweep(MODEL, ["0.3"], ["uniform"], out, CompressOptions(**{**TINY, "seed": 1}),
          on_event=lambda k, i: events.append((k, i)))
    assert _starts(events) == 1


def test_interrupted_cli_sweep_resumes_where_it_stopped(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "onnxecc", "sweep", str(MODEL), "--budgets", "0.3,0.6", "--methods",
           "uniform,ecc", "--data", "digits", "--epochs", "1", "--admm-iterations", "1", "--admm-epochs", "1",
           "--no-latency", "-o", str(out)]
    env = {**os.environ, "COLUMNS": "200"}
    # SIG_DFL: a test run in the background inherits SIGINT ignored, and Python would keep ignoring it.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first, summary_file = out / f"{point_name('uniform', '0.3')}.json", out / "sweep.json"
    deadline = time.monotonic() + 120
    # The first point's report, then the summary that lists it (written right after each point).
    while not (first.exists() and summary_file.exists()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.exists() and proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    summary = json.loads(summary_file.read_text())  # valid JSON, not half written
    finished = {row["name"]: os.stat(row["model"]).st_mtime_ns for row in summary["points"]
                if row["status"] == "done"}
    assert 1 <= len(finished) < 4
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left behind

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((out / "sweep.json").read_text())
    assert len(summary["points"]) == 4 and all(row["status"] == "done" for row in summary["points"])
    for row in summary["points"]:
        assert os.path.exists(row["model"]) and os.path.exists(row["report"])
        if row["name"] in finished:
            assert os.stat(row["model"]).st_mtime_ns == finished[row["name"]]  # not recomputed
    assert f"{len(finished)} reused or skipped" in rerun.stdout


def _library_that_turns_ctrl_c_into_its_own_error(*_args, **_kwargs):
    """What the CI run above once met mid-point: Ctrl-C raised inside numpy's C code, which reported a TypeError."""
    try:
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        raise TypeError("Cannot compare structured arrays unless they have a common dtype") from None


@pytest.mark.parametrize("command, told", [("sweep", "lists the finished points"),
                                           ("compress", "no checkpoint written")])
def test_ctrl_c_that_a_library_turns_into_another_error_still_exits_130(command, told, tmp_path, monkeypatch,
                                                                        capsys):
    import importlib

    from onnxecc import cli

    module = importlib.import_module(f"onnxecc.{command}")  # the CLI imports its function from there when run
    argv = {"sweep": ["--budgets", "0.5", "-o", str(tmp_path)],
            "compress": ["--budget", "0.5", "-o", str(tmp_path / "out.onnx")]}[command]
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (main() adds its own)
    try:
        monkeypatch.setattr(module, command, _library_that_turns_ctrl_c_into_its_own_error)
        monkeypatch.setattr(sys, "argv", ["onnxecc", command, str(MODEL), *argv])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        err = capsys.readouterr().err
        assert exit_.value.code == 130 and "interrupted: " in err and told in err  # the command's own message
        # the same error without a Ctrl-C is an internal error (exit 1), not an interruption
        monkeypatch.setattr(module, command, lambda *a, **k: (_ for _ in ()).throw(TypeError("a bug")))
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        assert exit_.value.code == 1 and "internal error: TypeError: a bug" in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGINT, previous)
