"""Progress in logs (`onnxecc.core.progress`): off a terminal, one line per phase and per epoch (and at most every 30 s
within an epoch) with the time elapsed and an estimate of the time left; `--quiet` turns them off."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import DEMO_MODELS

from onnxecc.core.progress import LogLines

STAMP = r"^\[\d+:\d\d:\d\d\] "
LEFT = r"; training ~\d+:\d\d:\d\d left$"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_lines_carry_elapsed_time_and_the_training_time_left():
    clock, out = Clock(), []
    log = LogLines(out.append, clock=clock)
    log("plan", {"epochs": 4})
    log("stage", {"name": "admm 1/2"})
    assert out == []  # held back until training runs: a refused input prints its error line only
    clock.now += 10
    log("batch", {"step": 5, "total": 20, "epochs": 2})  # half of the first epoch, 10 s in: no line before 30 s
    assert out == ["[0:00:00] admm 1/2"]  # nothing trained yet then: no estimate
    clock.now += 21
    log("batch", {"step": 8, "total": 20, "epochs": 2})
    # 0.8 epochs in 31 s: 3.2 epochs left at 31 / 0.8 s each = 124 s
    assert out[-1] == "[0:00:31] admm 1/2: epoch 1/2, batch 8/10; training ~0:02:04 left"
    clock.now += 9
    log("epoch", {"epoch": 1, "epochs": 2, "loss": 0.25, "train_accuracy": 0.5, "seconds": 40.0, "phase": "admm 1/2"})
    assert out[-1] == "[0:00:40] admm 1/2: epoch 1/2, loss 0.2500, train acc 0.500 (40.0 s); training ~0:02:00 left"
    clock.now += 5
    log("batch", {"step": 11, "total": 20, "epochs": 2})  # 5 s after the last line: none
    assert len(out) == 3
    log("recovery", {"phase": "recovery", "during": "admm 1/2", "epoch": 2, "step": 11, "non_finite": "loss",
                     "lr": 5e-4})
    assert out[-1].startswith("[0:00:45] recovered in admm 1/2, epoch 2 step 11: non-finite loss; learning rate now "
                              "0.0005")
    for _ in range(3):
        log("epoch", {"epoch": 2, "epochs": 2, "loss": 0.1, "train_accuracy": None, "seconds": 1.0})
    assert out[-1] == "[0:00:45] admm 1/2: epoch 2/2, loss 0.1000 (1.0 s)"  # all 4 epochs done: no estimate


def test_a_counted_job_reports_its_start_every_30_s_and_its_end():
    clock, out = Clock(), []
    log = LogLines(out.append, clock=clock)
    log.count("profiling", 2, 10)  # resumed with 2 done: the rate counts this run's only
    clock.now += 5
    log.count("profiling", 3, 10)
    clock.now += 26
    log.count("profiling", 5, 10)  # 3 in 31 s: 5 left take 51.7 s
    clock.now += 9
    log.count("profiling", 10, 10)
    assert out == ["[0:00:00] profiling: 2/10", "[0:00:31] profiling: 5/10; ~0:00:52 left",
                   "[0:00:40] profiling: 10/10"]


def _cli(*args):
    """The CLI with stdout and stderr pipes, as in a CI job or a deployment pipeline."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "onnxecc", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_compress_in_a_pipeline_prints_phase_and_epoch_lines_and_quiet_removes_them(tmp_path):
    args = ["compress", str(DEMO_MODELS[0]), "--budget", "0.5", "--data", "digits", "--epochs", "2",
            "--admm-iterations", "1", "--admm-epochs", "2"]
    proc = _cli(*args, "-o", str(tmp_path / "a.onnx"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    stamped = [line for line in lines if re.match(STAMP, line)]
    texts = [re.sub(STAMP, "", line).split(";")[0] for line in stamped]
    phases = [text for text in texts if ":" not in text]
    assert phases == ["analyse", "admm 1/1", "recalibrate", "lr probe", "finetune", "prune", "validate"], stamped
    for phase in ("admm 1/1", "finetune"):
        first = [line for line in stamped if f"] {phase}: epoch 1/2, loss " in line]
        last = [line for line in stamped if f"] {phase}: epoch 2/2, loss " in line]
        assert len(first) == 1 and len(last) == 1, stamped
        assert re.search(LEFT, first[0]), first  # an estimate while epochs remain
    assert not re.search(LEFT, [line for line in stamped if "] finetune: epoch 2/2" in line][0])  # none after the last
    elapsed = [int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in
               (re.match(r"^\[(\d+):(\d\d):(\d\d)\]", line).groups() for line in stamped)]
    assert elapsed == sorted(elapsed)
    assert "meets the budget" in proc.stdout

    quiet = _cli(*args, "-o", str(tmp_path / "b.onnx"), "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert not [line for line in quiet.stderr.splitlines() if re.match(STAMP, line)], quiet.stderr
    assert "meets the budget" in quiet.stdout
