"""Tests for onnxecc.graph.data and the demo models it trains (models/build_demo.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from onnxecc.core.errors import UserError
from onnxecc.graph.data import Dataset, load_data, load_digits, load_npz

MODELS = Path(__file__).resolve().parent.parent / "models"
DEMO_FILES = ["digits_cnn.onnx", "digits_resdw.onnx"]
MODEL_SHAPE = ("batch", 1, 8, 8)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    pytest.importorskip("sklearn")
    return load_digits()


def _raises_one_line(fn, *args, match: str, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


# ---------------------------------------------------------------- digits


def test_digits_shapes_dtypes_range(digits: Dataset) -> None:
    assert digits.name == "digits"
    assert digits.x_train.shape == (1438, 1, 8, 8) and digits.x_test.shape == (359, 1, 8, 8)
    assert digits.x_train.dtype == np.float32 and digits.x_test.dtype == np.float32
    assert digits.y_train.dtype == np.int64 and digits.y_test.dtype == np.int64
    x = np.concatenate([digits.x_train, digits.x_test])
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(digits.y_train)) == set(range(10)) == set(np.unique(digits.y_test))
    assert digits.x_train.flags.c_contiguous and digits.sample_shape == (1, 8, 8)


def test_digits_split_deterministic_and_seeded(digits: Dataset) -> None:
    again = load_digits()
    np.testing.assert_array_equal(digits.x_test, again.x_test)
    np.testing.assert_array_equal(digits.y_train, again.y_train)
    other = load_digits(seed=1)
    assert not np.array_equal(digits.x_test, other.x_test)


def test_digits_split_stratified_and_disjoint(digits: Dataset) -> None:
    from sklearn.datasets import load_digits as sk_load

    n_train, n_test = np.bincount(digits.y_train), np.bincount(digits.y_test)
    frac = n_test / (n_train + n_test)
    assert np.all(np.abs(frac - 0.2) < 0.01), frac
    # Disjoint and complete: every original image lands in exactly one side.
    flat = lambda a: {r.tobytes() for r in a.reshape(len(a), -1)}  # noqa: E731
    orig = (sk_load().images / 16.0).astype(np.float32)
    train, test = flat(digits.x_train), flat(digits.x_test)
    assert not (train & test)
    assert train | test == flat(orig)


# ---------------------------------------------------------------- npz happy path


def test_load_npz_happy_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((50, 1, 8, 8))  # float64: cast to float32
    y = rng.integers(0, 10, 50).astype(np.int32)
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y)
    ds = load_npz(path, input_shape=MODEL_SHAPE, num_classes=10)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert len(ds.x_train) == 40 and len(ds.x_test) == 10  # last 20% in file order
    np.testing.assert_allclose(ds.x_test, x[40:].astype(np.float32))
    np.testing.assert_array_equal(ds.y_train, y[:40])
    assert ds.name == "data.npz" and ds.labelled


def test_load_npz_unlabelled_small_and_via_load_data(tmp_path: Path) -> None:
    path = tmp_path / "few.npz"
    np.savez(path, x=np.zeros((5, 1, 8, 8), np.float32))
    ds = load_data(str(path), input_shape=(1, 1, 8, 8))
    assert ds.y_train is None and ds.y_test is None and not ds.labelled
    assert ds.x_train.shape == (5, 1, 8, 8) and ds.x_test.shape == (0, 1, 8, 8)


def test_load_npz_int_x_is_cast(tmp_path: Path) -> None:
    path = tmp_path / "ints.npz"
    np.savez(path, x=np.arange(10 * 4, dtype=np.uint8).reshape(10, 4))
    ds = load_npz(path, input_shape=(None, 4))
    assert ds.x_train.dtype == np.float32 and ds.x_train.shape == (8, 4)


# ---------------------------------------------------------------- npz errors


def _save(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


X = np.zeros((12, 1, 8, 8), np.float32)


@pytest.mark.parametrize(
    ("arrays", "kwargs", "match"),
    [
        ({"inputs": X}, {}, r"no array named 'x'.*found: inputs"),
        ({"x": X}, {"input_shape": ("batch", 3, 32, 32)}, r"1×8×8.*batch×3×32×32"),
        ({"x": X[:, 0]}, {"input_shape": MODEL_SHAPE}, r"8×8.*batch×1×8×8"),
        ({"x": np.full_like(X, np.nan)}, {}, r"NaN/inf"),
        ({"x": np.full((12, 3), 1e300)}, {}, r"NaN/inf.*float32"),
        ({"x": np.array(["a"] * 12)}, {}, r"dtype <U1.*float32"),
        ({"x": np.ones((12, 2), np.complex64)}, {}, r"dtype complex64"),
        ({"x": np.zeros((0, 1, 8, 8), np.float32)}, {}, r"N ≥ 1"),
        ({"x": X, "y": np.zeros(11, np.int64)}, {}, r"12 samples"),
        ({"x": X, "y": np.zeros((12, 1), np.int64)}, {}, r"1-D"),
        ({"x": X, "y": np.zeros(12, np.float32)}, {}, r"integer class labels"),
        ({"x": X, "y": np.full(12, -1)}, {}, r"negative label -1"),
        ({"x": X, "y": np.arange(12)}, {"num_classes": 10}, r"label 11.*10 classes.*0\.\.9"),
    ],
)
def test_load_npz_bad_files(tmp_path: Path, arrays: dict, kwargs: dict, match: str) -> None:
    _raises_one_line(load_npz, _save(tmp_path, **arrays), match=match, **kwargs)


def test_load_npz_labels_in_range_accepted(tmp_path: Path) -> None:
    ds = load_npz(_save(tmp_path, x=X, y=np.arange(12) % 10), num_classes=10)
    assert ds.y_train.max() == 9


def test_load_npz_missing_file(tmp_path: Path) -> None:
    _raises_one_line(load_npz, tmp_path / "nope.npz", match="does not exist")
    _raises_one_line(load_data, str(tmp_path / "nope.npz"), match="does not exist")


def test_load_npz_directory(tmp_path: Path) -> None:
    d = tmp_path / "d.npz"
    d.mkdir()
    _raises_one_line(load_npz, d, match="directory")


@pytest.mark.parametrize(
    "content",
    [b"this is not a zip file at all\n" * 3, b"PK\x03\x04" + b"\x00" * 40, b""],
    ids=["text", "truncated-zip", "empty"],
)
def test_load_npz_corrupt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "corrupt.npz"
    path.write_bytes(content)
    _raises_one_line(load_npz, path, match="npz")


def test_load_npz_corrupt_member(tmp_path: Path) -> None:
    path = _save(tmp_path, x=np.arange(4000, dtype=np.float32).reshape(1000, 4))
    raw = bytearray(path.read_bytes())
    raw[200:260] = b"\xff" * 60  # damage x's data inside an otherwise valid archive
    path.write_bytes(bytes(raw))
    _raises_one_line(load_npz, path, match=str(path.name))


def test_load_npz_single_npy(tmp_path: Path) -> None:
    path = tmp_path / "single.npz"
    with open(path, "wb") as f:
        np.save(f, X)
    _raises_one_line(load_npz, path, match="single array")


def test_load_npz_refuses_pickle(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}] * 12, dtype=object))
    _raises_one_line(load_npz, path, match="Python objects")


# ---------------------------------------------------------------- load_data


def test_load_data_digits(digits: Dataset) -> None:
    ds = load_data(" Digits ", input_shape=MODEL_SHAPE, num_classes=10)
    np.testing.assert_array_equal(ds.y_test, digits.y_test)


def test_load_data_digits_wrong_shape() -> None:
    msg = _raises_one_line(load_data, "digits", input_shape=(1, 3, 224, 224), match=r"N×1×8×8")
    assert "1×3×224×224" in msg


def test_load_data_digits_too_few_classes() -> None:
    _raises_one_line(load_data, "digits", input_shape=MODEL_SHAPE, num_classes=2, match="10 classes")


@pytest.mark.parametrize("spec", ["mnist", "data.csv", ""])
def test_load_data_unknown_spec(spec: str) -> None:
    _raises_one_line(load_data, spec, match=r"'digits'.*\.npz")


# ---------------------------------------------------------------- demo models


@pytest.fixture(scope="module")
def demo_record() -> dict:
    path = MODELS / "demo_models.json"
    if not path.exists():
        pytest.skip("models/demo_models.json missing: run python models/build_demo.py")
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", DEMO_FILES)
def test_demo_model_record_is_honest(name: str, demo_record: dict, digits: Dataset) -> None:
    ort = pytest.importorskip("onnxruntime")
    path = MODELS / name
    rec = demo_record[name]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == rec["sha256"], "re-run models/build_demo.py"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": digits.x_test})[0]
    acc = float(np.mean(logits.argmax(1) == digits.y_test))
    assert acc >= rec["test_accuracy"] - 1e-9
    assert acc >= 0.97


@pytest.mark.parametrize("name", DEMO_FILES)
@pytest.mark.parametrize("batch", [1, 7])
def test_demo_model_dynamic_batch(name: str, batch: int, digits: Dataset) -> None:
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(MODELS / name), providers=["CPUExecutionProvider"])
    x = digits.x_test[:batch]
    out = sess.run(["logits"], {"input": x})[0]
    assert out.shape == (batch, 10) and out.dtype == np.float32 and np.isfinite(out).all()
    # Batched and one-at-a-time inference agree.
    single = np.concatenate([sess.run(["logits"], {"input": x[i : i + 1]})[0] for i in range(batch)])
    np.testing.assert_allclose(out, single, atol=1e-5)
