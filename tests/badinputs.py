"""A generated corpus of bad inputs for every CLI command (issue 9).

Every case is built from code (no binaries checked in): `build(name, directory)` writes the case's files into
`directory` and returns the CLI arguments and a substring that the one-line error must contain. `python
tests/badinputs.py DIR` writes the whole corpus (one sub-directory per case, with `args.json`).

Each case must make `python -m onnxecc ...` exit with code 2 and print exactly one line, without leaving
an output file (or a temp file) behind.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "digits_cnn.onnx"
OUTPUTS = ("out.onnx", "p.json", "r.json")
"""Output names the cases use; none of them may exist after a case ran (unless the case created it)."""


@dataclass
class Case:
    args: list[str]
    expected: str
    keep: tuple[str, ...] = ()
    """Files the case created itself and that must still exist (unchanged) afterwards."""


# ---- model builders ------------------------------------------------------------------------------------------------
def _rng():
    return np.random.default_rng(0)


def _conv_w(cout: int, cin: int, name: str) -> TensorProto:
    return numpy_helper.from_array(_rng().standard_normal((cout, cin, 3, 3)).astype(np.float32), name)


def _small_cnn(*, middle: str = "Relu", domain: str = "", opsets=None, in_dims=(1, 1, 8, 8),
               c1: int = 4) -> onnx.ModelProto:
    """input → Conv(c1) → MIDDLE → Conv(4) → Flatten → Gemm(10)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node(middle, ["a"], ["b"], domain=domain),
        helper.make_node("Conv", ["b", "w2"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("Gemm", ["f", "wg"], ["y"], transB=1),
    ]
    inits = [_conv_w(c1, in_dims[1] if isinstance(in_dims[1], int) else 1, "w1"), _conv_w(4, c1, "w2"),
             numpy_helper.from_array(_rng().standard_normal((10, 4 * 64)).astype(np.float32), "wg")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [in_dims[0], 10])], inits)
    return helper.make_model(graph, opset_imports=opsets or [helper.make_opsetid("", 17)])


def _save(model: onnx.ModelProto, path: Path) -> str:
    path.write_bytes(model.SerializeToString())
    return str(path)


def _demo(d: Path) -> str:
    shutil.copy(DEMO, d / "model.onnx")
    return str(d / "model.onnx")


def _npz(d: Path, **arrays) -> str:
    path = d / "data.npz"
    np.savez(path, **arrays)
    return str(path)


def _x(n: int = 20, shape=(1, 8, 8)) -> np.ndarray:
    return _rng().random((n, *shape), dtype=np.float32)


def _compress(d: Path, *extra: str, model: str | None = None, budget: str = "0.5") -> list[str]:
    return ["compress", model or _demo(d), "--budget", budget, "--epochs", "1", "-o", str(d / "out.onnx"), *extra]


def _inspect(path: str) -> list[str]:
    return ["inspect", path]


# ---- the cases -----------------------------------------------------------------------------------------------------
def c_missing(d):
    return Case(_inspect(str(d / "nope.onnx")), "not found")


def c_empty(d):
    (d / "m.onnx").write_bytes(b"")
    return Case(_inspect(str(d / "m.onnx")), "empty")


def c_truncated(d):
    data = DEMO.read_bytes()
    (d / "m.onnx").write_bytes(data[: len(data) // 3])
    return Case(_inspect(str(d / "m.onnx")), "not a valid onnx")


def c_text(d):
    (d / "m.onnx").write_text("this is not a model\nbut a text file\n")
    return Case(_inspect(str(d / "m.onnx")), "onnx")


def c_random_bytes(d):
    (d / "m.onnx").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return Case(_inspect(str(d / "m.onnx")), "onnx")


def c_png_magic(d):
    (d / "m.onnx").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(64))
    return Case(_inspect(str(d / "m.onnx")), "onnx")


def c_zip_magic(d):
    import zipfile

    with zipfile.ZipFile(d / "m.onnx", "w") as z:
        z.writestr("model.onnx", DEMO.read_bytes()[:100])
    return Case(_inspect(str(d / "m.onnx")), "onnx")


def c_cycle(d):
    m = _small_cnn()
    m.graph.node[0].input[0] = "c"  # the first conv now reads the second conv's output: a cycle
    return Case(_inspect(_save(m, d / "m.onnx")), "topologically sorted")


def c_dangling_input(d):
    m = _small_cnn()
    m.graph.node[2].input[0] = "nowhere"
    return Case(_inspect(_save(m, d / "m.onnx")), "'nowhere'")


def c_unknown_domain(d):
    m = _small_cnn(middle="Mystery", domain="com.example.unknown")
    return Case(_inspect(_save(m, d / "m.onnx")), "com.example.unknown")


def c_custom_op(d):
    """A custom-domain op onnxruntime cannot run: refused (shapes and the result are checked in onnxruntime)."""
    m = _small_cnn(middle="Mystery", domain="com.example", c1=16,
                   opsets=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    return Case(_compress(d, model=_save(m, d / "m.onnx"), budget="0.05"), "does not run in onnxruntime")


def c_unsupported_op_frozen_budget(d):
    """An op without a channel rule (LRN mixes channels) between two convs freezes their channels; a budget
    that needs those channels is refused with the smallest reachable cost."""
    m = _small_cnn(middle="LRN", c1=16)
    m.graph.node[1].attribute.append(helper.make_attribute("size", 3))
    return Case(_compress(d, model=_save(m, d / "m.onnx"), budget="0.05"), "smallest reachable")


def c_zero_channels(d):
    m = _small_cnn(c1=0)
    return Case(_inspect(_save(m, d / "m.onnx")), "zero-sized")


def c_dynamic_channels(d):
    m = _small_cnn(in_dims=("N", "C", 8, 8))
    return Case(_compress(d, model=_save(m, d / "m.onnx")), "--input-shape")


def c_missing_external_data(d):
    m = onnx.load(str(DEMO))
    onnx.save_model(m, str(d / "m.onnx"), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    (d / "m.onnx.data").unlink()
    return Case(_inspect(str(d / "m.onnx")), "external data")


def c_budget_zero(d):
    return Case(_compress(d, budget="0"), "budget")


def c_lr_not_a_number(d):
    return Case(_compress(d, "--lr", "fast"), "--lr")


def c_lr_zero(d):
    return Case(_compress(d, "--lr", "0"), "--lr")


def c_rho_negative(d):
    return Case(_compress(d, "--rho", "-1"), "--rho")


def c_budget_negative(d):
    return Case(_compress(d, budget="-0.5"), "budget")


def c_budget_abc(d):
    return Case(_compress(d, budget="abc"), "budget")


def c_budget_unit_mismatch(d):
    return Case(_compress(d, "--metric", "macs", budget="5ms"), "macs")


def c_budget_below_minimum(d):
    return Case(_compress(d, budget="1k"), "smallest reachable")


def c_unknown_metric(d):
    return Case(_compress(d, "--metric", "flops"), "metric")


def c_unknown_method(d):
    return Case(_compress(d, "--method", "magic"), "method")


def _profile_json(d: Path, obj) -> str:
    path = d / "prof.json"
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def c_profile_other_model(d):
    from onnxecc.cost.profiler import profile

    other = _save(_small_cnn(c1=8), d / "other.onnx")
    profile(other, str(d / "other.json"), samples=4, warmup=0, repeats=1)
    return Case(_compress(d, "--metric", "latency", "--profile", str(d / "other.json")), "profile",
                keep=("other.json",))


def c_profile_not_json(d):
    p = _profile_json(d, "{ this is: not json")
    return Case(_compress(d, "--metric", "latency", "--profile", p), "not valid json")


def c_profile_missing_fields(d):
    p = _profile_json(d, {"format": "onnxecc-profile", "schema": 1})
    return Case(_compress(d, "--metric", "latency", "--profile", p), "profile")


def c_profile_wrong_types(d):
    p = _profile_json(d, {"format": "onnxecc-profile", "schema": 1, "metric": 5, "samples": "many",
                          "fit": [1, 2], "model": "x"})
    return Case(_compress(d, "--metric", "latency", "--profile", p), "profile")


def c_profile_output_corrupt(d):
    """`profile -o P.json` resumes an existing file: a corrupt one is refused and left alone."""
    (d / "p.json").write_text("garbage, not a profile")
    return Case(["profile", _demo(d), "--samples", "3", "-o", str(d / "p.json")], "json", keep=("p.json",))


def c_npz_wrong_keys(d):
    return Case(_compress(d, "--data", _npz(d, images=_x())), "no array named 'x'")


def c_npz_wrong_shape(d):
    return Case(_compress(d, "--data", _npz(d, x=_x(shape=(3, 8, 8)))), "shape")


def c_npz_strings(d):
    return Case(_compress(d, "--data", _npz(d, x=np.array([["a", "b"]] * 20))), "dtype")


def c_npz_object_array(d):
    """Object arrays need pickle, which is never loaded from user files."""
    return Case(_compress(d, "--data", _npz(d, x=np.array([{"a": 1}] * 20, dtype=object))), "python objects")


def c_npz_nan(d):
    x = _x()
    x[3, 0, 2, 2] = np.nan
    return Case(_compress(d, "--data", _npz(d, x=x, y=np.arange(20) % 10)), "nan")


def c_npz_labels_out_of_range(d):
    return Case(_compress(d, "--data", _npz(d, x=_x(), y=np.full(20, 12))), "label")


def c_npz_not_zip(d):
    (d / "data.npz").write_text("x,y\n1,2\n")
    return Case(_compress(d, "--data", str(d / "data.npz")), "npz")


def c_validate_bad_data(d):
    return Case(["validate", _demo(d), _demo(d), "--data", _npz(d, x=_x(shape=(2, 8, 8)))], "shape")


def c_validate_missing_compressed(d):
    return Case(["validate", _demo(d), str(d / "small.onnx")], "not found")


def c_validate_corrupt_compressed(d):
    (d / "small.onnx").write_bytes(DEMO.read_bytes()[:500])
    return Case(["validate", _demo(d), str(d / "small.onnx")], "not a valid onnx")


def c_validate_missing_hardware(d):
    return Case(["validate", _demo(d), _demo(d), "--hardware", str(d / "hw.json")], "hw.json")


def c_validate_other_hardware(d):
    """An energy budget set for one accelerator file, re-checked with another one."""
    model = onnx.load(DEMO)
    model.metadata_props.add(key="onnxecc.metric", value='"energy"')
    model.metadata_props.add(key="onnxecc.budget", value="1e-06")
    model.metadata_props.add(key="onnxecc.hardware_sha256", value='"' + "0" * 64 + '"')
    onnx.save(model, d / "small.onnx")
    shutil.copy(REPO / "profiles" / "eyeriss.json", d / "hw.json")
    return Case(["validate", _demo(d), str(d / "small.onnx"), "--hardware", str(d / "hw.json")],
                "compressed with")


def c_output_missing_dir(d):
    return Case(["compress", _demo(d), "--budget", "0.5", "-o", str(d / "nodir" / "out.onnx")], "does not exist")


def c_output_is_dir(d):
    (d / "out.onnx").mkdir()
    return Case(_compress(d), "directory", keep=("out.onnx",))


def c_profile_output_missing_dir(d):
    return Case(["profile", _demo(d), "--samples", "3", "-o", str(d / "nodir" / "p.json")], "does not exist")


def c_profile_missing_model(d):
    return Case(["profile", str(d / "nope.onnx"), "--samples", "3", "-o", str(d / "p.json")], "not found")


def c_report_missing_dir(d):
    return Case(_compress(d, "--report", str(d / "nodir" / "r.json")), "does not exist")


CASES: dict[str, Callable[[Path], Case]] = {
    name[2:]: fn for name, fn in sorted(globals().items()) if name.startswith("c_") and callable(fn)
}


def build(name: str, directory: Path) -> Case:
    directory.mkdir(parents=True, exist_ok=True)
    return CASES[name](directory)


def build_all(root: Path) -> dict[str, Case]:
    cases = {}
    for name in CASES:
        case = cases[name] = build(name, root / name)
        (root / name / "args.json").write_text(json.dumps({"args": case.args, "expected": case.expected}))
    return cases


if __name__ == "__main__":
    built = build_all(Path(sys.argv[1] if len(sys.argv) > 1 else "badinputs"))
    print(f"{len(built)} cases")
