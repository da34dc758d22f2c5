"""Atomic outputs and the user's files (issues 9 and 28). SIGKILL `compress` and `profile` at seeded random moments
(and once right when the temp file appears, i.e. during the write): the output is either absent or complete and
valid. SIGKILL `ingest.save` of external data before each of its file-system steps: the pair on disk is the old
model or the new one. `-o` naming the input (or its external data) is refused unless `--overwrite`; a model kept
as `NAME.over-budget.onnx` never replaces a file the user did not name."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxecc.core.errors import UserError
from onnxecc.cost.profiler import load_profile, store
from onnxecc.graph import ingest

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "digits_cnn.onnx"
ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "onnxecc", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_at(proc: subprocess.Popen, delay: float | None, out: Path) -> bool:
    """SIGKILL after `delay` seconds, or (delay None) as soon as a temp file next to `out` appears. Returns
    whether the temp file was seen. The process must be killed, or have finished with exit code 0."""
    t0, seen = time.monotonic(), False
    while proc.poll() is None:
        if delay is not None and time.monotonic() - t0 >= delay:
            break
        if delay is None and any(p.startswith(f".{out.name}.tmp") for p in os.listdir(out.parent)):
            seen = True
            break
        time.sleep(0.002)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    rc = proc.wait(timeout=30)
    assert rc in (-signal.SIGKILL, 0), f"the command failed on its own (exit {rc}) instead of being killed"
    if rc == 0:
        assert out.exists(), "a run that finished wrote no output"
    return seen


def _check_model(path: Path) -> None:
    print(f"{path.name}: {'complete' if path.exists() else 'absent'}")  # shown with -s
    if not path.exists():
        return
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: np.zeros((1, 1, 8, 8), np.float32)})[0]
    assert out.shape == (1, 10)


def _check_profile(path: Path) -> int:
    """The number of samples in the profile at `path` (0 when absent); it must parse whole."""
    if not path.exists():
        print(f"{path.name}: absent")
        return 0
    data = json.loads(path.read_text())  # complete JSON, never half a file
    print(f"{path.name}: {len(data.get('samples', []))} samples, fit: {bool(data.get('fit'))}")  # shown with -s
    store.read(path, require_fit=False)
    if data.get("fit"):
        load_profile(path, str(MODEL))
    return len(data.get("samples", []))


def test_sigkill_compress_leaves_no_partial_model(tmp_path):
    rng = random.Random(9)
    delays = [rng.uniform(0.2, 6.0) for _ in range(4)] + [None]  # None: right when the temp file appears
    args = ["--budget", "0.5", "--data", "digits", "--epochs", "1", "--admm-iterations", "1", "--admm-epochs", "1"]
    for i, delay in enumerate(delays):
        out = tmp_path / f"out{i}.onnx"
        proc = _start(["compress", str(MODEL), *args, "-o", str(out)], tmp_path)  # every phase, short
        seen = _kill_at(proc, delay, out)
        if delay is None:  # killed while writing, or (the write was quicker than the polling) finished
            assert seen or proc.returncode == 0
        _check_model(out)
    out = tmp_path / "whole.onnx"  # the same command, not killed: it does write the model
    assert subprocess.run([sys.executable, "-m", "onnxecc", "compress", str(MODEL), *args, "-o", str(out)],
                          cwd=tmp_path, env=ENV, capture_output=True).returncode == 0
    _check_model(out)
    assert out.exists()


def test_sigkill_profile_leaves_no_partial_json(tmp_path):
    rng = random.Random(9)
    out = tmp_path / "p.json"  # one file across kills: each run resumes what the previous one left
    args = ["profile", str(MODEL), "--samples", "6", "--warmup", "2", "--repeats", "5", "-o", str(out)]
    samples = 0
    for _ in range(5):
        _kill_at(_start(args, tmp_path), rng.uniform(0.3, 1.5), out)
        now = _check_profile(out)
        assert now >= samples, "a killed run lost samples that an earlier run had written"
        samples = now
    assert subprocess.run([sys.executable, "-m", "onnxecc", *args], cwd=tmp_path, env=ENV,
                          capture_output=True).returncode == 0
    assert _check_profile(out) == 6 and store.read(out).fit is not None


# ---- ingest.save with external data, killed before each file-system step -------------------------------------

_SAVE_KILLED = r"""
import os, signal, sys
from onnxecc.graph import ingest

path, source, layout, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = ingest.load(source)
calls = 0

def killing(fn):
    def step(*args, **kwargs):
        global calls
        calls += 1
        if calls == n:  # SIGKILL before the n-th step: nothing of it or after it happens
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return step

for name in ("replace", "rename", "link", "unlink", "remove", "fsync"):
    setattr(os, name, killing(getattr(os, name)))
ingest.save(model, path, external=layout == "external")
"""


def _other_model(tmp_path: Path) -> Path:
    """digits_cnn with its weights halved and its initializers in reverse order: other outputs, and other offsets in
    its external data (old header over new data would not pass for either model)."""
    model = onnx.load(str(MODEL))
    inits = list(model.graph.initializer)[::-1]
    del model.graph.initializer[:]
    for t in inits:
        a = numpy_helper.to_array(t)
        model.graph.initializer.append(numpy_helper.from_array(a * 0.5 if a.dtype.kind == "f" else a, t.name))
    path = tmp_path / "other.onnx"
    onnx.save(model, str(path))
    return path


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("old,new", [("external", "external"), (None, "external"), ("inline", "external"),
                                     ("external", "inline")])
def test_sigkill_save_leaves_the_old_pair_or_the_new_one(tmp_path, old, new):
    """A save is killed before its 1st, 2nd, ... file-system step (rename, link, unlink, fsync: every point where
    what is on disk changes) until one completes: after each kill `m.onnx` with its external data loads in
    onnxruntime and computes the old model's outputs or the new one's (or, with no old model, is absent)."""
    other = _other_model(tmp_path)
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    expected = {"old": _outputs(MODEL, x), "new": _outputs(other, x)}
    assert not np.allclose(expected["old"], expected["new"], atol=1e-3)  # the two models tell apart
    for n in range(1, 40):
        folder = tmp_path / f"kill{n}"
        folder.mkdir()
        path = folder / "m.onnx"
        if old is not None:
            ingest.save(ingest.load(MODEL), path, external=old == "external")
            assert (folder / "m.onnx.data").exists() == (old == "external")
        proc = subprocess.run([sys.executable, "-c", _SAVE_KILLED, str(path), str(other), new, str(n)], env=ENV,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode in (-signal.SIGKILL, 0), proc.stderr
        if proc.returncode == 0 or path.exists():
            ingest.load(path)  # onnxecc's own reader: the header's data is there, whole
            got = _outputs(path, x)
            which = [k for k, v in expected.items() if np.allclose(got, v, rtol=0, atol=1e-6)]
            assert which == ["new"] if proc.returncode == 0 else which in (["old"], ["new"]), (n, which)
        else:
            assert old is None, f"killed before step {n}: m.onnx is gone"
        if proc.returncode == 0:
            break
        ingest.save(ingest.load(other), path, external=new == "external")  # the next save tidies up after a kill
        files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))  # temps: hidden
        assert files == ["m.onnx", "m.onnx.data"] if new == "external" else ["m.onnx"], (n, files)
    else:
        raise AssertionError("the save never completed")
    assert n > (3 if new == "external" else 2), "too few kill points: the hook did not see the save's steps"
    files = sorted(p.name for p in folder.iterdir())
    assert files == (["m.onnx", "m.onnx.data"] if new == "external" else ["m.onnx"])
    if new == "external":  # the header names its data relative to its folder
        locations = {e.value for t in onnx.load(str(path), load_external_data=False).graph.initializer
                     for e in t.external_data if e.key == "location"}
        assert locations == {"m.onnx.data"}


# ---- the user's files are never replaced unless they say so -------------------------------------------------


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxecc", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)


def _params(path: Path) -> int:
    model = onnx.load(str(path))
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def test_output_equal_to_the_input_is_refused_unless_overwrite(tmp_path, monkeypatch):
    src = tmp_path / "m.onnx"
    shutil.copy(MODEL, src)
    before = src.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.onnx").symlink_to(src)
    args = ["--budget", "0.5", "--metric", "macs", "--epochs", "0"]
    refused = _cli(["compress", "m.onnx", *args, "-o", "m.onnx"], tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "--overwrite" in refused.stderr
    assert src.read_bytes() == before
    from onnxecc.compress import CompressOptions, compress

    options = CompressOptions(metric="macs", epochs=0)
    monkeypatch.chdir(tmp_path)
    for out in ("sub/../m.onnx", tmp_path / "link.onnx", str(src)):  # relative, through a symlink, absolute
        with pytest.raises(UserError, match="--overwrite"):
            compress("m.onnx", "0.5", out, options)
    for option in ("report", "checkpoint"):  # never over the input, --overwrite or not
        with pytest.raises(UserError, match=f"--{option}"):
            compress(src, "0.5", tmp_path / "out.onnx", options, overwrite=True, **{option: tmp_path / "link.onnx"})
    assert src.read_bytes() == before and not (tmp_path / "out.onnx").exists()

    done = _cli(["compress", "m.onnx", *args, "-o", "m.onnx", "--overwrite"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert src.read_bytes() != before and _params(src) < _params(MODEL)  # the compressed model, in its place
    x = np.zeros((1, 1, 8, 8), np.float32)
    assert _outputs(src, x).shape == (1, 10)


def test_output_equal_to_the_inputs_external_data_is_refused(tmp_path):
    """The input with external data: `-o` naming the data file, or the header (whose save would remove the data
    named after it), is refused; with --overwrite the original is read whole before the pair is replaced."""
    src = tmp_path / "m.onnx"
    ingest.save(ingest.load(MODEL), src, external=True)
    data = tmp_path / "m.onnx.data"
    before = src.read_bytes(), data.read_bytes()
    from onnxecc.compress import CompressOptions, compress

    options = CompressOptions(metric="macs", epochs=0)
    with pytest.raises(UserError, match="external data of the input model"):
        compress(src, "0.5", data, options)
    with pytest.raises(UserError, match="--overwrite"):
        compress(src, "0.5", src, options)
    other = tmp_path / "other.onnx"  # another header reading m.onnx.data: a save to m.onnx would remove it
    other.write_bytes(src.read_bytes())
    with pytest.raises(UserError, match="external data of the input model"):
        compress(other, "0.5", src, options)
    assert (src.read_bytes(), data.read_bytes()) == before

    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    original = _outputs(MODEL, x)
    result = compress(src, "0.5", src, options, overwrite=True)
    assert result.agreement is not None  # measured against the original, read before it was replaced
    assert _params(src) < _params(MODEL) and not np.allclose(_outputs(src, x), original, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "other.onnx"]  # its stale data: removed


def test_sweep_and_profile_never_write_over_their_input(tmp_path):
    from onnxecc.compress import CompressOptions
    from onnxecc.cost.profiler import profile
    from onnxecc.sweep import sweep

    src = tmp_path / "uniform_0.5.onnx"  # the name of the sweep's own point output
    shutil.copy(MODEL, src)
    before = src.read_bytes()
    with pytest.raises(UserError, match="would overwrite the input model"):
        sweep(src, ["0.5"], ["uniform"], tmp_path, CompressOptions(metric="macs", epochs=0, measure_latency=False))
    with pytest.raises(UserError, match="would overwrite the input model"):
        profile(src, src, samples=2)
    assert src.read_bytes() == before


def test_over_budget_model_never_replaces_an_existing_file(tmp_path):
    """A latency budget the profile thinks reachable and the measurement misses (the profile without its fixed
    cost, 10 % of the original: digits_cnn measures over twice that at its smallest widths): the model is kept
    under a fresh name, past a file of that name and past one whose data file a save would remove."""
    from onnxecc.compress import CompressOptions, compress

    data = json.loads((REPO / "profiles" / "digits_cnn.cpu.json").read_text())
    data["fit"]["constant"] = 0.0
    prof = tmp_path / "optimistic.json"
    prof.write_text(json.dumps(data))
    taken = tmp_path / "m.over-budget.onnx"
    shutil.copy(MODEL, taken)
    taken_data = tmp_path / "m.over-budget-2.onnx.data"
    taken_data.write_bytes(b"someone else's data")
    before = taken.read_bytes()
    out, report = tmp_path / "m.onnx", tmp_path / "m.json"
    result = compress(MODEL, "0.1", out, CompressOptions(metric="latency", profile=str(prof), max_rounds=1),
                      report=report)
    assert result.measured_miss and not result.meets_budget and not out.exists()
    kept = tmp_path / "m.over-budget-3.onnx"
    assert result.output == kept and _outputs(kept, np.zeros((1, 1, 8, 8), np.float32)).shape == (1, 10)
    assert taken.read_bytes() == before and taken_data.read_bytes() == b"someone else's data"
    assert json.loads(report.read_text())["output"] == str(kept)
    assert any(str(kept) in w for w in result.warnings)
