"""Models as users bring them (#24 items 1-3): symbolic input sizes, inputs of every dtype, fixed batch sizes.

Real ONNX files nobody here wrote: the PaddleOCR text classifier and detector shipped in rapidocr-onnxruntime's
wheel (paddle2onnx exports with symbolic H×W), a BERT-style encoder (int64 token ids and an attention mask, batch
and sequence symbolic) exported by torch.onnx, and the demo digits CNN with its batch fixed to 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zoo

from onnxecc import CompressOptions, compress, validate
from onnxecc.core.errors import UserError
from onnxecc.graph.inputs import Feeds, parse_input_shapes, resolve_shapes, with_input_shapes

REPO = Path(__file__).resolve().parents[1]


def _ocr_model(name: str) -> Path:
    package = pytest.importorskip("rapidocr_onnxruntime")
    return Path(package.__file__).parent / "models" / name


CLASSIFIER = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
DETECTOR = "ch_PP-OCRv4_det_infer.onnx"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "onnxecc", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (proc.returncode,
                                                                                         proc.stderr)
    return lines[0]


def _dims(values) -> list[list]:
    return [[d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in values]


def _run(path_or_model, feeds: dict) -> np.ndarray:
    source = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


# ---- --input-shape and the sizes chosen -------------------------------------------------------------------------

def test_input_shape_parsing_and_resolution():
    assert parse_input_shapes(["x:1,3,48,192", "mask:1x16"]) == {"x": (1, 3, 48, 192), "mask": (1, 16)}
    assert parse_input_shapes(["1,3,32,100"]) == {None: (1, 3, 32, 100)}
    for bad in ("x:", "x:1,a", "1,0,3", ":1,2"):
        with pytest.raises(UserError, match="--input-shape"):
            parse_input_shapes([bad])
    encoder = onnx.load(zoo.export_encoder(), load_external_data=False)
    # the sequence length given for input_ids also sizes attention_mask (they share the dim_param); the batch is 1
    assert resolve_shapes(encoder, {"input_ids": (8, 24)}) == {"input_ids": (1, 24), "attention_mask": (1, 24)}
    assert resolve_shapes(encoder, None, {"input_ids": (12,), "attention_mask": (12,)}) == \
        {"input_ids": (1, 12), "attention_mask": (1, 12)}
    with pytest.raises(UserError, match=r"input 'input_ids' has a symbolic dimension 1 \(sequence\).*--input-shape"):
        resolve_shapes(encoder)
    with pytest.raises(UserError, match="2 inputs .*NAME:d0,d1"):
        resolve_shapes(encoder, {None: (1, 16)})
    with pytest.raises(UserError, match="'ids', which is not an input"):
        resolve_shapes(encoder, {"ids": (1, 16)})
    with pytest.raises(UserError, match="--input-shape for 'input_ids' is 1,16,2 .* rank 2"):
        resolve_shapes(encoder, {"input_ids": (1, 16, 2)})


def test_missing_input_shape_exits_2_naming_the_option(tmp_path):
    out = tmp_path / "out.onnx"
    line = _error_line(_cli("compress", str(_ocr_model(CLASSIFIER)), "--budget", "0.5", "--metric", "macs",
                            "-o", str(out)))
    assert "symbolic dimension 2" in line and "--input-shape x:1,3,D2,D3" in line
    assert not out.exists()


def test_paddleocr_classifier_round_trip_keeps_symbolic_sizes(tmp_path):
    """Compressed at 48×192 from the command line, data-free: the output keeps the input and output names and
    dims (dim_params included) and runs at other sizes, where it computes what the same pruning of a copy of the
    model fixed by hand to 48×192 computes once that copy's sizes are opened again."""
    original = _ocr_model(CLASSIFIER)
    out = tmp_path / "cls.onnx"
    proc = _cli("compress", str(original), "--input-shape", "x:1,3,48,192", "--budget", "0.5", "--metric", "macs",
                "-o", str(out), "--report", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    src, got = onnx.load(original), onnx.load(out)
    assert [i.name for i in got.graph.input] == [i.name for i in src.graph.input]
    assert [o.name for o in got.graph.output] == [o.name for o in src.graph.output]
    assert _dims(got.graph.input) == _dims(src.graph.input) and _dims(got.graph.output) == _dims(src.graph.output)
    meta = {p.key: p.value for p in got.metadata_props}
    assert meta["onnxecc.input_shapes"] == '{"x": [1, 3, 48, 192]}'
    checked = validate(original, out)  # no size given: fed and counted at the size compress used
    assert checked.budget["how"] == "counted at x:1,3,48,192" and checked.meets_budget

    fixed = with_input_shapes(src, {"x": (1, 3, 48, 192)})  # the hand-made copy: its sizes are numbers
    by_hand = compress(fixed, 0.5, options=CompressOptions(metric="macs", measure_latency=False)).model
    for mine, theirs in zip((*by_hand.graph.input, *by_hand.graph.output), (*src.graph.input, *src.graph.output)):
        mine.type.CopyFrom(theirs.type)  # its sizes opened again, as the original declares them
    del by_hand.graph.value_info[:]
    for size in ((1, 3, 48, 192), (3, 3, 32, 100), (2, 3, 48, 320)):
        x = np.random.default_rng(sum(size)).standard_normal(size).astype(np.float32)
        a, b = _run(out, {"x": x}), _run(by_hand, {"x": x})
        assert a.shape == (size[0], 2)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_paddleocr_detector_output_runs_at_two_page_sizes(tmp_path):
    original = _ocr_model(DETECTOR)
    out = tmp_path / "det.onnx"
    result = compress(original, 0.5, out, CompressOptions(metric="macs", measure_latency=False,
                                                           input_shapes=parse_input_shapes(["x:1,3,320,320"])))
    assert result.input_shapes == {"x": [1, 3, 320, 320]} and result.meets_budget
    assert result.counted_cost <= 0.5 * result.original_cost
    src = onnx.load(original)
    got = onnx.load(out)
    assert _dims(got.graph.input) == _dims(src.graph.input) and _dims(got.graph.output) == _dims(src.graph.output)
    for size in ((1, 3, 320, 320), (1, 3, 640, 480)):
        x = np.random.default_rng(0).random(size, dtype=np.float32)
        assert _run(out, {"x": x}).shape == (1, 1, *size[2:])


# ---- integer inputs: the BERT-style encoder ---------------------------------------------------------------------

def test_encoder_feeds_respect_dtype_and_embedding_size():
    from onnxecc.graph import runtime

    path = zoo.export_encoder()
    sess = runtime.session(path)
    feeds = runtime.example_input(sess, batch=64, seed=0, model=path,
                                  shapes={"input_ids": (1, 16), "attention_mask": (1, 16)})
    assert isinstance(feeds, Feeds) and feeds.names == ["input_ids", "attention_mask"] and len(feeds) == 64
    ids, mask = feeds.arrays["input_ids"], feeds.arrays["attention_mask"]
    table = next(t for t in onnx.load(path).graph.initializer if t.name == "word.weight")  # the word embeddings
    assert ids.dtype == np.int64 and ids.shape == (64, 16) and 0 <= ids.min() and ids.max() < table.dims[0]
    assert ids.max() > table.dims[0] // 2  # spread over the table, not 0/1
    assert mask.dtype == np.int64 and set(np.unique(mask)) == {0, 1} and (mask[:, 0] == 1).all()
    assert runtime.run_batched(sess, feeds).shape == (64, 5)


def test_encoder_compresses_data_free_and_runs_at_any_length(tmp_path):
    path = zoo.export_encoder()
    out = tmp_path / "encoder.onnx"
    result = compress(path, 0.5, out, CompressOptions(metric="macs", input_shapes={"input_ids": (1, 16)}))
    assert result.input_shapes == {"input_ids": [1, 16], "attention_mask": [1, 16]} and result.pruned
    assert result.counted_cost <= 0.5 * result.original_cost
    src, got = onnx.load(path), onnx.load(out)
    assert _dims(got.graph.input) == _dims(src.graph.input) == [["batch", "sequence"], ["batch", "sequence"]]
    rng = np.random.default_rng(1)
    for n, length in ((1, 16), (3, 40)):
        feeds = {"input_ids": rng.integers(0, zoo.ENCODER_VOCAB, (n, length)), "attention_mask": np.ones((n, length),
                                                                                                        np.int64)}
        assert _run(out, feeds).shape == (n, 5)


def test_pruned_encoder_equals_zeroed_channels_at_another_length():
    """Surgery on a model analysed at length 16 keeps the Shape-computed Reshapes of its attention heads computed:
    at length 40 the pruned file computes what the original with the same channels zeroed computes."""
    from onnxecc.cost.analysis import analyse
    from onnxecc.cost.costs import macs_cost
    from onnxecc.graph import ingest
    from onnxecc.graph.surgery import prune_channels, zero_channels
    from onnxecc.optimize.problem import Problem

    proto = ingest.load(zoo.export_encoder())
    a = analyse(proto, "compress", {"input_ids": (1, 16)})
    cost = macs_cost(a.graph, a.layers, proto, a.variables)
    # exact groups only: the residual width is approximate (LayerNorm runs over it), zeroing it is not removing it
    prunable = {g.id for g in a.graph.prunable_groups if not g.approximate}
    problem = Problem(proto, a.graph, a.variables, cost, [v for v, g in enumerate(a.variables.group) if g in prunable],
                      1, 1, str)
    keep = problem.project(0.5 * cost(None))[0]
    assert keep and any(len(k) < a.graph.groups[g].size for g, k in keep.items())
    pruned, zeroed = prune_channels(proto, keep, a.graph), zero_channels(proto, keep, a.graph)
    rng = np.random.default_rng(2)
    feeds = {"input_ids": rng.integers(0, zoo.ENCODER_VOCAB, (3, 40)),
             "attention_mask": (rng.random((3, 40)) < 0.8).astype(np.int64)}
    np.testing.assert_allclose(_run(pruned, feeds), _run(zeroed, feeds), rtol=1e-4, atol=1e-5)


def test_an_output_that_holds_the_analysed_size_is_refused(tmp_path, monkeypatch):
    """Were surgery to write the encoder's Shape-computed Reshapes as constants of the analysed length (as it does
    for fixed-size models), the output would run at length 16 only: compress tries it at twice the symbolic sizes,
    where the original runs, and refuses it (one line) instead of writing it."""
    from onnxecc.core.errors import UnsupportedModelError
    from onnxecc.graph import surgery

    monkeypatch.setattr(surgery, "symbolic", lambda model: False)
    out = tmp_path / "encoder.onnx"
    with pytest.raises(UnsupportedModelError, match=r"runs at input_ids:1,16 attention_mask:1,16 but not at "
                                                     r"input_ids:1,32 attention_mask:1,32") as info:
        compress(zoo.export_encoder(), 0.5, out, CompressOptions(metric="macs", input_shapes={"input_ids": (1, 16)}))
    assert "\n" not in str(info.value) and not out.exists()


def _encoder_npz(path: Path, n: int = 120, **override) -> dict:
    rng = np.random.default_rng(0)
    arrays = {"input_ids": rng.integers(0, zoo.ENCODER_VOCAB, (n, 12)), "attention_mask": np.ones((n, 12), np.int64)}
    arrays["attention_mask"][:, 9:] = rng.integers(0, 2, (n, 3))
    arrays["y"] = _run(zoo.export_encoder(), {k: arrays[k] for k in ("input_ids", "attention_mask")}).argmax(1)
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_encoder_trains_on_npz_with_one_array_per_input(tmp_path):
    """--data with input_ids, attention_mask (int64) and y: its first sample fixes the sequence length (12), torch
    trains on the integer inputs, and the accuracies are those of the last 20 % measured here in onnxruntime."""
    data = tmp_path / "tokens.npz"
    arrays = _encoder_npz(data)
    result = compress(zoo.export_encoder(), 0.5, tmp_path / "out.onnx",
                      CompressOptions(metric="macs", data=str(data), method="project", epochs=1, lr=1e-3,
                                      measure_latency=False))
    assert result.input_shapes == {"input_ids": [1, 12], "attention_mask": [1, 12]}
    assert "finetune" in [h["phase"] for h in result.history]
    test = slice(len(arrays["y"]) - len(arrays["y"]) // 5, None)
    feeds = {k: arrays[k][test] for k in ("input_ids", "attention_mask")}
    assert result.accuracy_before == 1.0  # y is the original's own answer
    assert result.accuracy_after == pytest.approx(float((_run(tmp_path / "out.onnx", feeds).argmax(1)
                                                         == arrays["y"][test]).mean()))


@pytest.mark.parametrize(("override", "expected"), [
    ({"input_ids": None, "ids": np.zeros((120, 12), np.int64)}, "no array for input 'input_ids'"),
    ({"input_ids": np.zeros((120, 12), np.float32)}, "takes int64: save input_ids as integers"),
    ({"input_ids": np.full((120, 12), zoo.ENCODER_VOCAB)}, "table of 1000 entries"),
    ({"attention_mask": np.ones((100, 12), np.int64)}, "has 100 samples but 'input_ids' has 120"),
])
def test_npz_that_does_not_match_the_inputs_exits_2(tmp_path, override, expected):
    data = tmp_path / "bad.npz"
    _encoder_npz(data, **override)
    out = tmp_path / "out.onnx"
    line = _error_line(_cli("compress", str(zoo.export_encoder()), "--budget", "0.5", "--data", str(data),
                            "-o", str(out)))
    assert expected in line and str(data) in line
    assert not out.exists()


# ---- fixed batch sizes ----------------------------------------------------------------------------------------

def _fixed_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in (*out.graph.input, *out.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch
    return out


def test_run_batched_feeds_a_fixed_batch_in_chunks():
    from onnxecc.graph import runtime

    model = onnx.load(REPO / "models" / "digits_cnn.onnx")
    x = np.random.default_rng(0).random((10, 1, 8, 8), dtype=np.float32)
    expected = _run(model, {"input": x})
    for batch in (1, 3):
        got = runtime.run_batched(runtime.session(_fixed_batch(model, batch)), x)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_batch_one_model_compresses_with_digits(tmp_path):
    """The digits CNN with its batch fixed to 1: teacher logits, fine-tuning and evaluation all run; the accuracy
    before is the original's on the test split, counted here one image at a time."""
    from onnxecc.graph.data import load_digits

    path = tmp_path / "digits_b1.onnx"
    onnx.save(_fixed_batch(onnx.load(REPO / "models" / "digits_cnn.onnx"), 1), path)
    result = compress(path, 0.5, tmp_path / "out.onnx", CompressOptions(
        metric="macs", data="digits", method="project", epochs=1, lr=1e-3, recalibrate=False))
    digits = load_digits()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    right = sum(int(sess.run(None, {"input": x[None]})[0].argmax() == y) for x, y in zip(digits.x_test,
                                                                                        digits.y_test))
    assert result.accuracy_before == pytest.approx(right / len(digits.y_test))
    assert result.accuracy_after > 0.9 and result.latency_ratio is not None
    assert onnx.load(tmp_path / "out.onnx").graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_batch_baked_into_a_reshape_trains_at_that_batch():
    """A batch-1 export whose Flatten is a Reshape to [1, -1]: its torch module cannot run 64 samples at once, so
    training feeds one at a time (and the plain Flatten model trains at the configured batch)."""
    from onnxecc.cost.analysis import analyse
    from onnxecc.graph.data import Dataset, load_digits
    from onnxecc.train.finetune import TrainConfig
    from onnxecc.train.masked import MaskedModel

    flat = _fixed_batch(onnx.load(REPO / "models" / "digits_cnn.onnx"), 1)
    baked = onnx.ModelProto()
    baked.CopyFrom(flat)
    node = next(n for n in baked.graph.node if n.op_type == "Flatten")
    node.op_type = "Reshape"
    del node.attribute[:]
    node.input.append("batch_one_shape")
    baked.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, -1], np.int64), "batch_one_shape"))
    digits = load_digits()
    small = Dataset(digits.x_train[:96], digits.y_train[:96], digits.x_test[:32], digits.y_test[:32], "digits")
    for model, limit in ((flat, None), (baked, 1)):
        a = analyse(model)
        mm = MaskedModel(model, a.graph, small, TrainConfig(epochs=1, batch_size=32))
        assert mm.batch_limit == limit and mm.config.batch_size == (32 if limit is None else 1)
        log = mm.train(1)
        assert len(log) == 1 and np.isfinite(log[0]["loss"])
        assert mm.fidelity(small.x_test, None, small.y_test) > 0.5  # accuracy on the labels


def test_int8_calibration_feeds_a_fixed_batch():
    """onnxruntime's static quantization calibrates a batch-1 model one sample at a time (32 at once fails); the
    int8 model then answers as the fp32 one on held-out digits."""
    from onnxecc.cost import quantize
    from onnxecc.graph import runtime
    from onnxecc.graph.data import load_digits

    model = _fixed_batch(onnx.load(REPO / "models" / "digits_cnn.onnx"), 1)
    digits = load_digits()
    int8 = quantize.quantize_layers(model, digits.x_train[:40], quantize.candidates(model))
    assert quantize.int8_nodes(int8)
    x = digits.x_test[:100]
    fp32, q = (runtime.run_batched(runtime.session(m), x) for m in (model, int8))
    assert (fp32.argmax(1) == q.argmax(1)).mean() >= 0.95
