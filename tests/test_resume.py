"""Issue 9 (parts 3 and 5): Ctrl-C while training saves a checkpoint and exits 130 with the command that resumes;
`--resume` ends with the same weights as an uninterrupted run; checkpoints are read with weights_only=True and
user files are never unpickled."""

from __future__ import annotations

import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxecc.compress import CompressOptions, compress
from onnxecc.core.errors import UserError
from onnxecc.train import checkpoint
from onnxecc.train.checkpoint import Interrupted

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "digits_cnn.onnx"
# l2 importance: the Fisher pass is not what is tested here and costs seconds per Z-step on 2 cores
OPTS = CompressOptions(method="ecc", data="digits", epochs=2, admm_iterations=2, admm_epochs=1,
                       measure_latency=False, importance="l2")
STEPS_PER_EPOCH = 23  # ceil(1437 digits training samples / 64)


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _interrupt_at(stage: str, step: int):
    """on_event that requests the interrupt after optimizer step `step` of the training stage `stage`."""
    now = {"stage": None}

    def on_event(kind, info):
        if kind == "stage":
            now["stage"] = info["name"]
        elif kind == "batch" and now["stage"] == stage and info["step"] == step:
            checkpoint.request()

    return on_event


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.onnx"
    result = compress(MODEL, "0.5", out, OPTS)
    return out, result


@pytest.mark.parametrize("stage, step", [
    ("admm 2/2", 10),  # inside the second ADMM W-step: U, Z, ρ and the ADMM log come back
    ("finetune", STEPS_PER_EPOCH),  # the last batch of an epoch: the next epoch's order comes from the generator
], ids=["admm-wstep", "finetune-epoch-end"])
def test_interrupt_and_resume_is_bit_identical(reference, tmp_path, stage, step):
    ref_out, ref = reference
    out, ckpt = tmp_path / "out.onnx", tmp_path / "out.onnx.ckpt"
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as info:
        compress(MODEL, "0.5", out, OPTS, on_event=_interrupt_at(stage, step), checkpoint=ckpt)
    assert info.value.path == ckpt and ckpt.is_file()
    assert not out.exists()
    assert signal.getsignal(signal.SIGINT) is handler  # the previous handler was restored
    result = compress(MODEL, "0.5", out, OPTS, resume=ckpt)
    a, b = _weights(ref_out), _weights(out)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name  # bit-identical: CPU, same seed, full state restored
    assert result.accuracy_after == ref.accuracy_after
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(result.history) == strip(ref.history)
    assert not ckpt.exists()  # removed once the resumed run completed


def test_resume_with_other_options_or_files_is_a_user_error(tmp_path):
    ckpt = tmp_path / "c.ckpt"
    with pytest.raises(Interrupted):
        compress(MODEL, "0.5", None, OPTS, on_event=_interrupt_at("admm 1/2", 1), checkpoint=ckpt)
    other = CompressOptions(**{**OPTS.__dict__, "epochs": 5, "seed": 1})
    with pytest.raises(UserError, match=r"--epochs \(2 in the checkpoint, 5 now\).*--seed"):
        compress(MODEL, "0.5", None, other, resume=ckpt)
    with pytest.raises(UserError, match="--budget"):
        compress(MODEL, "0.4", None, OPTS, resume=ckpt)
    with pytest.raises(UserError, match="the model"):
        compress(REPO / "models" / "digits_resdw.onnx", "0.5", None, OPTS, resume=ckpt)
    assert ckpt.exists()  # a refused resume leaves the checkpoint alone
    not_a_checkpoint = tmp_path / "model-copy.ckpt"
    shutil.copyfile(MODEL, not_a_checkpoint)
    with pytest.raises(UserError, match="not an onnxecc checkpoint"):
        compress(MODEL, "0.5", None, OPTS, resume=not_a_checkpoint)
    with pytest.raises(UserError, match="would overwrite the input model"):  # resumed runs save where they read
        compress(MODEL, "0.5", None, OPTS, resume=MODEL)
    with pytest.raises(UserError, match="no such checkpoint"):
        compress(MODEL, "0.5", None, OPTS, resume=tmp_path / "missing.ckpt")


# 7 epochs in all: one per pruning step (5), the rest is the final fine-tuning
GREEDY = CompressOptions(**{**OPTS.__dict__, "method": "greedy", "epochs": 3, "admm_iterations": 4})


def _assert_same_run(ref_out: Path, ref, out: Path, result) -> None:
    a, b = _weights(ref_out), _weights(out)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert result.accuracy_after == ref.accuracy_after
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(result.history) == strip(ref.history)


@pytest.fixture(scope="module")
def greedy_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("gref") / "ref.onnx"
    return out, compress(MODEL, "0.5", out, GREEDY)


@pytest.mark.parametrize("stage, step", [
    ("greedy step 2", 5),  # inside a pruning step's short fine-tune: widths, choice and log come back
    ("finetune", 3),  # the final fine-tuning after the pruning steps
], ids=["greedy-step", "greedy-finetune"])
def test_greedy_interrupt_and_resume_is_bit_identical(greedy_reference, tmp_path, stage, step):
    ref_out, ref = greedy_reference
    assert sum(e.get("phase") == "greedy" for e in ref.history) >= 2
    out, ckpt = tmp_path / "g.onnx", tmp_path / "g.ckpt"
    with pytest.raises(Interrupted) as info:
        compress(MODEL, "0.5", out, GREEDY, on_event=_interrupt_at(stage, step), checkpoint=ckpt)
    assert info.value.path == ckpt and ckpt.is_file() and not out.exists()
    batches = []
    result = compress(MODEL, "0.5", out, GREEDY, resume=ckpt,
                      on_event=lambda kind, info: batches.append(info) if kind == "batch" else None)
    _assert_same_run(ref_out, ref, out, result)
    assert batches[0]["step"] == step + 1  # continued at the next batch, not started over
    assert not ckpt.exists()


WSP = CompressOptions(metric="energy", method="wsp", hardware=str(REPO / "profiles" / "eyeriss.json"),
                      data="digits", epochs=3, measure_latency=False)


RESDW = REPO / "models" / "digits_resdw.onnx"


@pytest.fixture(scope="module")
def wsp_references(tmp_path_factory):
    """digits_resdw at 0.4: a joint weights-and-input-masks phase (2 epochs) then 1 epoch of fine-tuning;
    digits_cnn at 0.5: frozen dead-input masks, a weights phase (1 epoch) then 2 epochs of fine-tuning."""
    tmp = tmp_path_factory.mktemp("wref")
    refs = {}
    for model in (RESDW, MODEL):
        out = tmp / f"{model.stem}.onnx"
        refs[model.stem] = out, compress(model, _WSP_BUDGET[model.stem], out, WSP)
    return refs


_WSP_BUDGET = {"digits_resdw": "0.4", "digits_cnn": "0.5"}


def _interrupt_at_batch(step: int):
    """on_event that requests the interrupt after wsp's (global) training step `step`."""
    def on_event(kind, info):
        if kind == "batch" and info["step"] == step:
            checkpoint.request()

    return on_event


@pytest.mark.parametrize("model, step, phase", [
    # in the joint phase, after a projection: input masks, Fisher averages, the budget schedule's position
    (RESDW, 15, "joint"),
    (RESDW, 2 * STEPS_PER_EPOCH + 4, "finetune"),  # the final fine-tuning: weight supports, earlier history
    (MODEL, 15, "weights"),  # the weights-only phase with frozen dead-input masks
], ids=["wsp-joint", "wsp-finetune", "wsp-weights-dead-inputs"])
def test_wsp_interrupt_and_resume_is_bit_identical(wsp_references, tmp_path, model, step, phase):
    ref_out, ref = wsp_references[model.stem]
    budget = _WSP_BUDGET[model.stem]
    assert any(e["phase"] == phase for e in ref.history)
    out, ckpt = tmp_path / "w.onnx", tmp_path / "w.ckpt"
    with pytest.raises(Interrupted) as info:
        compress(model, budget, out, WSP, on_event=_interrupt_at_batch(step), checkpoint=ckpt)
    assert info.value.path == ckpt and ckpt.is_file() and not out.exists()
    assert checkpoint.load(ckpt)["frames"]["wsp"]["phase"] == phase
    if phase == "joint":  # a resume with other options is refused, the checkpoint left alone
        other = CompressOptions(**{**WSP.__dict__, "epochs": 4})
        with pytest.raises(UserError, match=r"--epochs \(3 in the checkpoint, 4 now\)"):
            compress(model, budget, out, other, resume=ckpt)
        assert ckpt.is_file()
    batches = []
    result = compress(model, budget, out, WSP, resume=ckpt,
                      on_event=lambda kind, info: batches.append(info) if kind == "batch" else None)
    _assert_same_run(ref_out, ref, out, result)
    assert batches[0]["step"] == step + 1  # continued at the next batch, not started over
    assert not ckpt.exists()


def test_sigint_handler_requests_then_raises_and_is_restored():
    ck = checkpoint.Checkpointer("unused.ckpt", {})
    before = signal.getsignal(signal.SIGINT)
    with checkpoint.active(ck):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert ck.requested
        with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before
    assert checkpoint.current() is None


def test_checkpoints_never_unpickle_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(pickle.dumps({"format": "onnxecc-checkpoint", "x": Evil()}, protocol=2))
    with pytest.raises(UserError, match="not an onnxecc checkpoint"):
        checkpoint.load(bad)
    assert not (tmp_path / "pwned").exists()


def test_package_never_unpickles_user_files():
    pkg = REPO / "onnxecc"
    for path in pkg.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        for call in re.findall(r"np\.load\([^)]*\)", text):
            assert "allow_pickle=False" in call, (path, call)


def test_cli_sigint_exits_130_and_the_printed_command_resumes(tmp_path):
    out = tmp_path / "out.onnx"
    args = ["compress", str(MODEL), "--budget", "0.5", "--data", "digits", "--method", "ecc", "--importance", "l2",
            "--admm-iterations", "1", "--admm-epochs", "1", "--epochs", "4", "-o", str(out)]
    env = {**os.environ, "COLUMNS": "400", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "onnxecc", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    training = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "Ctrl-C stops and saves" in line:
                training.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert training.wait(120), "".join(lines)  # the handler is in place once this line is printed
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130, "".join(lines)
    reader.join(10)
    line = next((s for s in lines if s.startswith("interrupted:")), "")
    assert "--resume" in line and f"{out}.ckpt" in line, "".join(lines)
    assert not out.exists() and Path(f"{out}.ckpt").is_file()
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[0] == "onnxecc" and command[1:len(args) + 1] == args
    done = subprocess.run([sys.executable, "-m", "onnxecc", *command[1:]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    onnx.checker.check_model(onnx.load(str(out)))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 1, 8, 8), np.float32)})[0].shape == (1, 10)
    assert not Path(f"{out}.ckpt").exists()
