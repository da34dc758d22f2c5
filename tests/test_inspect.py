"""`inspect`: layers and MACs of real architectures, checked against an independent count in torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import zoo

import onnxecc
from onnxecc.core.errors import UserError


def torch_hook_count(arch: str) -> tuple[int, int, int]:
    """(MACs, compute layers, weight elements) counted by forward hooks on the torch model that produced the ONNX."""
    import torch

    model = zoo.build(arch)
    totals = {"macs": 0, "layers": 0, "weights": 0}

    def hook(module, inputs, output):
        per_sample = output[0].numel()
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            totals["macs"] += per_sample * (module.in_channels // module.groups) * k
        else:
            totals["macs"] += per_sample * module.in_features
        totals["layers"] += 1
        totals["weights"] += module.weight.numel()

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, zoo.SIZE, zoo.SIZE))
    return totals["macs"], totals["layers"], totals["weights"]


def test_macs_match_independent_torch_count(zoo_arch, zoo_model):
    result = onnxecc.inspect(zoo_model(zoo_arch))
    macs, n_layers, weights = torch_hook_count(zoo_arch)
    assert result.macs == macs
    assert len(result.layers) == n_layers
    # The exporter folds BatchNorm into conv biases, so compare weights only (params = weight + bias).
    assert sum(layer.params - (layer.cout if layer.bias else 0) for layer in result.layers) == weights
    assert all(layer.macs > 0 and layer.cin > 0 and layer.cout > 0 for layer in result.layers)


def test_dynamo_export_inspects_like_torchscript_export(zoo_model):
    ts = onnxecc.inspect(zoo_model("resnet18"))
    dyn = onnxecc.inspect(zoo.export("resnet18", dynamo=True))
    assert dyn.macs == ts.macs
    assert [(a.op, a.cin, a.cout, a.kernel) for a in dyn.layers] == [(b.op, b.cin, b.cout, b.kernel)
                                                                       for b in ts.layers]


def test_depthwise_and_gemm_fields(zoo_model):
    layers = onnxecc.inspect(zoo_model("mobilenet_v2")).layers
    dw = [layer for layer in layers if layer.depthwise]
    assert dw and all(layer.groups == layer.cin == layer.cout for layer in dw)
    gemm = layers[-1]
    assert gemm.op == "Gemm" and gemm.cout == 1000 and gemm.cin == 1280 and gemm.macs == 1280 * 1000


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # a wide virtual terminal so rich does not fold the table
    return subprocess.run([sys.executable, "-m", "onnxecc", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_cli_json_matches_api(zoo_model):
    path = zoo_model("squeezenet1_1")
    proc = _run_cli("inspect", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    api = onnxecc.inspect(path)
    assert data["totals"]["macs"] == api.macs
    assert [layer["name"] for layer in data["layers"]] == [layer.name for layer in api.layers]


def test_cli_table_lists_every_layer(zoo_model):
    path = zoo_model("resnet18")
    proc = _run_cli("inspect", str(path))
    assert proc.returncode == 0, proc.stderr
    assert f"{onnxecc.inspect(path).macs:,}" in proc.stdout
    assert proc.stdout.count("Conv") >= 20


def _no_compute_model(path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)


BAD_INPUTS = {
    "missing": (lambda p, good: None, "not found"),
    "not_onnx": (lambda p, good: p.write_text("this is a text file, not a model\n" * 20), "not"),
    "truncated": (lambda p, good: p.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3]), "ONNX"),
    "empty": (lambda p, good: p.write_bytes(b""), "empty"),
    "no_compute": (lambda p, good: _no_compute_model(p), "no compute layers"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_line_exit_2(case, tmp_path, zoo_model):
    make, expected = BAD_INPUTS[case]
    path = tmp_path / "model.onnx"
    make(path, zoo_model("squeezenet1_1"))
    proc = _run_cli("inspect", str(path))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert expected.lower() in lines[0].lower()
    assert "Traceback" not in proc.stderr
    with pytest.raises(UserError):
        onnxecc.inspect(path)


def test_symbolic_spatial_dims_need_a_size_and_are_counted_at_it(tmp_path):
    """Symbolic H, W: refused without a size (one line naming --input-shape), counted at the size given."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, "H", "W"])
    w = onnx.numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Conv", ["x", "w"], ["y"])], "g", [x], [y], [w])
    path = tmp_path / "dyn.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    with pytest.raises(UserError, match="symbolic dimension 2 .*--input-shape x:1,3,D2,D3"):
        onnxecc.inspect(path)
    result = onnxecc.inspect(path, input_shapes={None: (1, 3, 10, 12)})  # no padding: 8×10 outputs of 4×3×3×3
    assert result.macs == 4 * 3 * 3 * 3 * 8 * 10
    assert result.inputs == {"x": [1, 3, 10, 12]} and result.declared_inputs == {"x": ["N", 3, "H", "W"]}
    with pytest.raises(UserError, match="--input-shape for 'x' is 1,4,10,12 but the model declares N,3,H,W"):
        onnxecc.inspect(path, input_shapes={"x": (1, 4, 10, 12)})
