"""Data for fine-tuning, distillation and accuracy checks.

Numpy only at import time: this module sits on the ONNX side so that `onnxecc validate --data FILE.npz`
works on an edge device without the training extra. scikit-learn is imported only by `load_digits`.

Every problem with the user's data raises `UserError` with one line that names the problem and the fix,
because the CLI prints exactly that line (exit 2) and a traceback would not help the user.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from onnxecc.core.errors import UserError
from onnxecc.graph.inputs import Feeds, Input

DIGITS_SHAPE = (1, 8, 8)
"""Per-sample shape of the built-in `digits` data (C×H×W)."""

TEST_FRACTION = 0.2
MIN_SAMPLES_FOR_SPLIT = 10


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split: x are N×(sample shape) arrays of the model input's dtype (float32 for the usual
    float input), or `inputs.Feeds` (one array per input) for a model with several inputs; y int64 labels or
    None when unlabelled.

    `eq=False` because element-wise array comparison makes the generated `__eq__` ambiguous.
    The test part may be empty (see `load_npz`); callers that evaluate must check `len(x_test)`.
    """

    x_train: np.ndarray | Feeds
    y_train: np.ndarray | None
    x_test: np.ndarray | Feeds
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


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an npz, turning every numpy/zip failure into a one-line UserError."""
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
        try:
            return {name: loaded[name] for name in loaded.files}
        except ValueError as exc:  # object arrays need pickle, which we refuse
            raise UserError(
                f"{path} stores Python objects ({_one_line(exc)}); "
                "save plain numeric arrays (x float32, y int)"
            ) from exc
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise UserError(f"{path} is corrupt ({_one_line(exc)}); re-save it with numpy.savez") from exc


def _input_arrays(arrays: dict[str, np.ndarray], path: str, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The array of each model input: `x` (or the input's own name) for a single-input model, one array per input
    name for several."""
    found = ", ".join(sorted(arrays)) or "none"
    if len(names) <= 1:
        name = names[0] if names else "x"
        key = "x" if "x" in arrays else name if name in arrays else None
        if key is None:
            raise UserError(
                f"{path} has no array named 'x' (found: {found}); save inputs as numpy.savez(path, x=...)"
            )
        return {name: arrays[key]}
    missing = [n for n in names if n not in arrays]
    if missing:
        example = ", ".join(f"{n}=..." for n in names)
        raise UserError(f"{path} has no array for input '{missing[0]}' (found: {found}); the model has inputs "
                        f"{', '.join(names)}: save one array per input, numpy.savez(path, {example}, y=...)")
    return {n: arrays[n] for n in names}


def _validate_x(x: np.ndarray, path: str, input_shape: Sequence[object] | None, what: str = "x",
                inp: Input | None = None, bound: int | None = None) -> np.ndarray:
    """One input's array, checked against the model input `inp` (its dtype decides the conversion) or, without
    it, a float input of `input_shape`."""
    where = f"{path}: {what}"
    kind = inp.dtype.kind if inp is not None else "f"
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_) or \
            (x.dtype == np.bool_ and kind != "b"):
        expected = "float32" if kind == "f" else "bool" if kind == "b" else str(inp.dtype)
        raise UserError(f"{where} has dtype {x.dtype}, expected real numbers; save {what} as {expected}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise UserError(f"{where} has shape {x.shape}, expected N×(sample shape) with N ≥ 1 samples")
    check_sample_shape(tuple(x.shape[1:]), inp.dims if inp is not None else input_shape, where)
    if kind == "f":
        dtype = inp.dtype if inp is not None else np.dtype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported just below
            x32 = np.ascontiguousarray(x, dtype=dtype)
        bad = ~np.isfinite(x32)
        if bad.any():
            first = int(np.argwhere(bad)[0][0])
            raise UserError(
                f"{where} contains {int(bad.sum())} NaN/inf values after conversion to {dtype} (first in "
                f"sample {first}); clean or rescale the data"
            )
        return x32
    return _integers(x, where, what, inp, bound)


def _integers(x: np.ndarray, where: str, what: str, inp: Input, bound: int | None) -> np.ndarray:
    """An integer or bool input: integer data only (a float would be truncated silently), within the range the
    model can use — 0/1 for bools, below the size of the embedding table an index input reads (`bound`)."""
    if x.dtype.kind == "f":
        raise UserError(f"{where} has dtype {x.dtype} but input '{inp.name}' takes {inp.dtype}: save {what} as "
                        f"integers ({what}.astype(numpy.{inp.dtype}))")
    low, high = (int(x.min()), int(x.max())) if x.size else (0, 0)
    if inp.dtype.kind == "b":
        if low < 0 or high > 1:
            raise UserError(f"{where} holds {low if low < 0 else high} but input '{inp.name}' is bool: save 0/1 "
                            "or True/False")
        return np.ascontiguousarray(x, dtype=np.bool_)
    info = np.iinfo(inp.dtype)
    if low < info.min or high > info.max:
        raise UserError(f"{where} holds {low if low < info.min else high}, outside {inp.dtype} of input "
                        f"'{inp.name}': save values that fit {inp.dtype}")
    if bound is not None and (high >= bound or low < -bound):
        raise UserError(f"{where} holds {high if high >= bound else low} but input '{inp.name}' indexes a table "
                        f"of {bound} entries: values must be in 0..{bound - 1}")
    return np.ascontiguousarray(x, dtype=inp.dtype)


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
    inputs: Sequence[Input] | None = None,
    ranges: Mapping[str, int] | None = None,
) -> Dataset:
    """Load user data from an .npz with `x` (N × sample shape) and optional integer `y` (N labels); for a model
    with several inputs, one array per input name instead of `x` (then x_train/x_test are `inputs.Feeds`).

    Never unpickles (allow_pickle=False): data files come from users and pickle runs code.
    `input_shape` is the model's full input shape with batch first (see `check_sample_shape`); `inputs`
    (`inputs.graph_inputs(model)`) replaces it with every input's dims and dtype: float data of a float input is
    converted to its dtype; integer and bool inputs take integer data (floats are refused, not truncated), within
    the input's dtype, 0/1 for bools, and below `ranges` (`inputs.value_ranges`: embedding-table sizes).

    Split: the file's order is kept and the *last* 20% (floor) become the test part, so a user who
    appends a held-out set at the end gets exactly that; no shuffling, so results are reproducible.
    With fewer than 10 samples there is nothing meaningful to hold out: everything is train and the test
    arrays are empty (shape 0×sample shape).
    """
    p = os.fspath(path)
    arrays = _read_npz(p)
    names = [i.name for i in inputs] if inputs else []
    by_name = {i.name: i for i in inputs or ()}
    single = len(names) <= 1
    checked = {name: _validate_x(a, p, input_shape, "x" if single else name, by_name.get(name),
                                 (ranges or {}).get(name))
               for name, a in _input_arrays(arrays, p, names).items()}
    counts = {name: len(a) for name, a in checked.items()}
    if len(set(counts.values())) > 1:
        (a, na), (b, nb) = min(counts.items(), key=lambda kv: kv[1]), max(counts.items(), key=lambda kv: kv[1])
        raise UserError(f"{p}: input '{a}' has {na} samples but '{b}' has {nb}: every input array needs the "
                        "same number of samples")
    x = next(iter(checked.values())) if single else Feeds(checked)
    n = len(x)
    y = arrays.get("y")
    y64 = _validate_y(y, n, p, num_classes) if y is not None else None
    n_test = int(n * TEST_FRACTION) if n >= MIN_SAMPLES_FOR_SPLIT else 0
    cut = n - n_test
    return Dataset(
        x_train=x[:cut],
        y_train=None if y64 is None else y64[:cut],
        x_test=x[cut:],
        y_test=None if y64 is None else y64[cut:],
        name=os.path.basename(p),
    )


def check_classes(ds: Dataset, num_classes: int | None) -> None:
    """`load_data`'s label check, for data loaded before the model's output size was known (a model with
    symbolic input sizes is analysed at the size of its data's first sample)."""
    if num_classes is None:
        return
    if ds.name == "digits" and num_classes < 10:
        raise UserError(
            f"digits has 10 classes but the model outputs {num_classes}; use a model with ≥ 10 outputs "
            "or pass your own FILE.npz"
        )
    for y in (ds.y_train, ds.y_test):
        if y is not None and len(y) and int(y.max()) >= num_classes:
            raise UserError(
                f"{ds.name}: y contains label {int(y.max())} but the model has {num_classes} classes; "
                f"labels must be in 0..{num_classes - 1}"
            )


def load_data(
    spec: str,
    input_shape: Sequence[object] | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    inputs: Sequence[Input] | None = None,
    ranges: Mapping[str, int] | None = None,
) -> Dataset:
    """Resolve a CLI `--data` value: `digits` (built-in demo data) or a path ending in `.npz`.

    `seed` only affects `digits` (its split); an npz split follows the file's order. `inputs` and `ranges`: see
    `load_npz` (digits needs a single float input).
    """
    s = str(spec).strip()
    if s.lower() == "digits":
        if inputs:
            if len(inputs) != 1 or inputs[0].dtype.kind != "f":
                kinds = ", ".join(f"{i.name} ({i.dtype})" for i in inputs)
                raise UserError(f"digits is one float image input but the model takes {kinds}; pass a FILE.npz "
                                "with one array per input")
            input_shape = inputs[0].dims
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
        return load_npz(s, input_shape=input_shape, num_classes=num_classes, inputs=inputs, ranges=ranges)
    raise UserError(
        f"cannot use --data {spec!r}: pass 'digits' (built-in N×1×8×8 demo data) or a FILE.npz with arrays "
        "x (N×input shape, float32) and optional y (N integer labels)"
    )


def load_for_model(spec: str, model, seed: int = 0) -> Dataset:
    """`load_data` checked against every input of `model` (an onnx.ModelProto): names, dims, dtypes and the
    ranges of index inputs (`inputs.value_ranges`). Labels are checked later (`check_classes`), once the model's
    output size is known."""
    from onnxecc.graph.inputs import graph_inputs, value_ranges

    inputs = graph_inputs(model)
    ranges = value_ranges(model) if any(i.dtype.kind in "iu" for i in inputs) else {}
    return load_data(spec, seed=seed, inputs=inputs, ranges=ranges)
