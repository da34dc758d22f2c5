"""Data for fine-tuning, distillation and accuracy checks.

Numpy only at import time: this module sits on the ONNX side so that `onnxecc validate --data FILE.npz`
works on an edge device without the training extra. scikit-learn is imported only by `load_digits`.

Every problem with the user's data raises `UserError` with one line that names the problem and the fix,
because the CLI prints exactly that line (exit 2) and a traceback would not help the user.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxecc.errors import UserError

DIGITS_SHAPE = (1, 8, 8)
"""Per-sample shape of the built-in `digits` data (C×H×W)."""

TEST_FRACTION = 0.2
MIN_SAMPLES_FOR_SPLIT = 10


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split: x are float32 N×(sample shape), y int64 labels or None when unlabelled.

    `eq=False` because element-wise array comparison makes the generated `__eq__` ambiguous.
    The test part may be empty (see `load_npz`); callers that evaluate must check `len(x_test)`.
    """

    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None
    name: str

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def labelled(self) -> bool:
        return self.y_train is not None


def _fmt_shape(shape: Sequence[object]) -> str:
    return "×".join(str(d) if d is not None else "?" for d in shape) if len(shape) else "scalar"


def _one_line(exc: BaseException) -> str:
    """Exception text squeezed onto one line: the CLI promises one-line user errors."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _is_dynamic(dim: object) -> bool:
    """ONNX input dims that are symbolic (str), unknown (None) or non-positive match any size."""
    return not isinstance(dim, (int, np.integer)) or int(dim) <= 0


def check_sample_shape(
    sample_shape: tuple[int, ...], input_shape: Sequence[object] | None, what: str
) -> None:
    """Raise UserError unless samples of `sample_shape` fit a model input of `input_shape`.

    `input_shape` is the model's full input shape *including* the leading batch dimension, as an ONNX graph
    input reports it; dynamic dims (str/None/≤0) match anything. The batch dim itself is not checked: we
    feed our own batch sizes. One convention only, because guessing "with or without batch" can accept
    data that then fails inside onnxruntime.
    """
    if input_shape is None:
        return
    expected = tuple(input_shape)[1:]
    ok = len(expected) == len(sample_shape) and all(
        _is_dynamic(e) or int(e) == s for e, s in zip(expected, sample_shape, strict=True)
    )
    if not ok:
        raise UserError(
            f"{what} has per-sample shape {_fmt_shape(sample_shape)} but the model input is "
            f"{_fmt_shape(tuple(input_shape))} (batch first); provide data of shape N×{_fmt_shape(expected)}"
        )


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class random split with numpy's RandomState, so it is fixed by `seed` across library versions."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8×8 handwritten digits (1797 images, no download) as N×1×8×8 in [0, 1].

    The 80/20 split is stratified per class and fixed by `seed`, so every accuracy the tool reports on
    `digits` is measured on the same held-out images.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:
        raise UserError(
            "--data digits needs scikit-learn; install it with `pip install 'onnxecc[train]'` "
            "or pass your own FILE.npz"
        ) from exc
    bunch = _sk_load_digits()
    x = (np.asarray(bunch.images, dtype=np.float64) / 16.0).astype(np.float32)[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    train, test = _stratified_split(y, TEST_FRACTION, seed)
    return Dataset(
        x_train=np.ascontiguousarray(x[train]),
        y_train=y[train],
        x_test=np.ascontiguousarray(x[test]),
        y_test=y[test],
        name="digits",
    )


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Read `x` and optional `y` from an npz, turning every numpy/zip failure into a one-line UserError."""
    if not os.path.exists(path):
        raise UserError(f"data file {path} does not exist; pass an existing .npz file or --data digits")
    if os.path.isdir(path):
        raise UserError(f"data path {path} is a directory; pass a .npz file with arrays x (and y)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise UserError(
            # numpy's own text here talks about unpickling, which would mislead: we never unpickle.
            f"{path} is not an .npz archive (not a zip file); save it with numpy.savez(path, x=..., y=...)"
        ) from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(
            f"{path} cannot be read as .npz ({_one_line(exc)}); re-save it with numpy.savez"
        ) from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise UserError(
            f"{path} holds a single array, not an .npz archive; save it with numpy.savez(path, x=..., y=...)"
        )
    with loaded:
        keys = set(loaded.files)
        if "x" not in keys:
            found = ", ".join(sorted(keys)) or "none"
            raise UserError(
                f"{path} has no array named 'x' (found: {found}); save inputs as numpy.savez(path, x=...)"
            )
        try:
            x = loaded["x"]
            y = loaded["y"] if "y" in keys else None
        except ValueError as exc:  # object arrays need pickle, which we refuse
            raise UserError(
                f"{path} stores Python objects ({_one_line(exc)}); "
                "save plain numeric arrays (x float32, y int)"
            ) from exc
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise UserError(f"{path} is corrupt ({_one_line(exc)}); re-save it with numpy.savez") from exc
    return x, y


def _validate_x(x: np.ndarray, path: str, input_shape: Sequence[object] | None) -> np.ndarray:
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)) or x.dtype == np.bool_:
        raise UserError(f"{path}: x has dtype {x.dtype}, expected real numbers; save x as float32")
    if x.ndim == 0 or x.shape[0] == 0:
        raise UserError(f"{path}: x has shape {x.shape}, expected N×(sample shape) with N ≥ 1 samples")
    check_sample_shape(tuple(x.shape[1:]), input_shape, f"{path}: x")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported just below
        x32 = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x32)
    if bad.any():
        first = int(np.argwhere(bad)[0][0])
        raise UserError(
            f"{path}: x contains {int(bad.sum())} NaN/inf values after conversion to float32 (first in "
            f"sample {first}); clean or rescale the data"
        )
    return x32


def _validate_y(y: np.ndarray, n: int, path: str, num_classes: int | None) -> np.ndarray:
    if y.ndim != 1 or y.shape[0] != n:
        raise UserError(
            f"{path}: y has shape {y.shape} but x has {n} samples; y must be a 1-D array of {n} labels"
        )
    if not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        raise UserError(
            f"{path}: y has dtype {y.dtype}, expected integer class labels; save y as y.astype(numpy.int64)"
        )
    y64 = y.astype(np.int64)
    if n and int(y64.min()) < 0:
        raise UserError(
            f"{path}: y contains negative label {int(y64.min())}; labels must be class indices ≥ 0"
        )
    if num_classes is not None and n and int(y64.max()) >= num_classes:
        raise UserError(
            f"{path}: y contains label {int(y64.max())} but the model has {num_classes} classes; "
            f"labels must be in 0..{num_classes - 1}"
        )
    return y64


def load_npz(
    path: str | os.PathLike[str],
    input_shape: Sequence[object] | None = None,
    num_classes: int | None = None,
) -> Dataset:
    """Load user data from an .npz with `x` (N × sample shape) and optional integer `y` (N labels).

    Never unpickles (allow_pickle=False): data files come from users and pickle runs code.
    `input_shape` is the model's full input shape with batch first (see `check_sample_shape`).

    Split: the file's order is kept and the *last* 20% (floor) become the test part, so a user who
    appends a held-out set at the end gets exactly that; no shuffling, so results are reproducible.
    With fewer than 10 samples there is nothing meaningful to hold out: everything is train and the test
    arrays are empty (shape 0×sample shape).
    """
    p = os.fspath(path)
    x, y = _read_npz(p)
    x32 = _validate_x(x, p, input_shape)
    n = x32.shape[0]
    y64 = _validate_y(y, n, p, num_classes) if y is not None else None
    n_test = int(n * TEST_FRACTION) if n >= MIN_SAMPLES_FOR_SPLIT else 0
    cut = n - n_test
    return Dataset(
        x_train=x32[:cut],
        y_train=None if y64 is None else y64[:cut],
        x_test=x32[cut:],
        y_test=None if y64 is None else y64[cut:],
        name=os.path.basename(p),
    )


def load_data(
    spec: str,
    input_shape: Sequence[object] | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Resolve a CLI `--data` value: `digits` (built-in demo data) or a path ending in `.npz`.

    `seed` only affects `digits` (its split); an npz split follows the file's order.
    """
    s = str(spec).strip()
    if s.lower() == "digits":
        try:
            check_sample_shape(DIGITS_SHAPE, input_shape, "digits")
        except UserError:
            model = _fmt_shape(tuple(input_shape or ()))
            raise UserError(
                f"digits is N×1×8×8 but the model input is {model} (batch first); "
                "pass a FILE.npz that matches the model instead"
            ) from None
        if num_classes is not None and num_classes < 10:
            raise UserError(
                f"digits has 10 classes but the model outputs {num_classes}; use a model with ≥ 10 outputs "
                "or pass your own FILE.npz"
            )
        return load_digits(seed=seed)
    if s.lower().endswith(".npz"):
        return load_npz(s, input_shape=input_shape, num_classes=num_classes)
    raise UserError(
        f"cannot use --data {spec!r}: pass 'digits' (built-in N×1×8×8 demo data) or a FILE.npz with arrays "
        "x (N×input shape, float32) and optional y (N integer labels)"
    )
