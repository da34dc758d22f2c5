"""The systolic-array energy model: description files, hand-computed energies of tiny layers, per-weight and
per-input costs against the exact model, masks read back from `Mul` nodes, `inspect --hardware`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxecc
from onnxecc.core.errors import UserError
from onnxecc.cost import hardware as hwm

REPO = Path(__file__).resolve().parents[1]
EYERISS = REPO / "profiles" / "eyeriss.json"


def tiny_hw(**over) -> hwm.Hardware:
    desc = {"pe_array": {"rows": 2, "cols": 1}, "input_cache": 5, "weight_cache": 3,
            "unit_energy": {"mac": 3, "rf": 1, "cache": 6, "dram": 200}}
    desc.update(over)
    return hwm.parse_hardware(desc, "tiny")


def model_of(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def gemm_model(w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    return model_of([helper.make_node("Gemm", ["x", "W"], ["y"], name="fc")],
                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], {"W": w})


def conv_model(w: np.ndarray, hw_in: tuple[int, int], mask: np.ndarray | None = None, **attrs) -> onnx.ModelProto:
    cin = w.shape[1] * attrs.get("group", 1)
    nodes, inits, src = [], {"W": w}, "x"
    if mask is not None:
        nodes.append(helper.make_node("Mul", ["x", "M"], ["xm"], name="mask"))
        inits["M"] = mask.astype(np.float32)
        src = "xm"
    nodes.append(helper.make_node("Conv", [src, "W"], ["y"], name="conv", **attrs))
    return model_of(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, *hw_in])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


# ------------------------------------------------------------------------------------------- hand-computed
def test_gemm_energy_by_hand():
    # K=3 inputs, N=2 outputs, P=1; 4 of 6 weights non-zero; m=2 → T=1, n=1 → R=⌈2/1⌉=2; s_w=3, s_i=5.
    w = np.array([[1, 0], [2, 3], [0, 4]], dtype=np.float32)
    e = hwm.model_energy(gemm_model(w), tiny_hw()).layers[0]
    assert e.compute == 3 * 4  # one MAC per non-zero weight
    assert e.weights == 6 * 1 * 4 + 1 * 1 * 4 + 200 * (3 + 1 * 1)  # cache, RF, DRAM (4th weight beyond cache)
    assert e.inputs == 6 * 2 * 3 + 1 * 2 * 3 + 200 * 3 + 200 * 2  # cache R·U, RF d·U, DRAM X, output writes
    assert e.total == 12 + 828 + 1042


def test_conv_energy_by_hand_with_input_mask():
    # 1→1 channel, 3×3 input, 2×2 kernel, no pad: output 2×2 (P=4, T=⌈4/2⌉=2, R=1). The mask zeroes the centre,
    # which every kernel offset meets once: each weight meets 3 non-zero inputs → 12 MACs; X=8, U=12.
    w = np.ones((1, 1, 2, 2), dtype=np.float32)
    mask = np.ones((1, 1, 3, 3), dtype=np.float32)
    mask[0, 0, 1, 1] = 0
    e = hwm.model_energy(conv_model(w, (3, 3), mask), tiny_hw()).layers[0]
    assert (e.nnz_inputs, e.macs_nonzero) == (8, 12)
    assert e.compute == 3 * 12
    assert e.weights == 6 * 2 * 4 + 1 * 4 * 4 + 200 * (3 + 2 * 1)  # the weight beyond s_w=3: once per row tile
    assert e.inputs == 6 * 1 * 12 + 1 * 1 * 12 + 200 * (5 + 1 * 3) + 200 * 1 * 4  # 3 inputs beyond s_i=5
    assert e.total == 36 + 1064 + 2484
    dense = hwm.model_energy(conv_model(w, (3, 3)), tiny_hw()).layers[0]
    assert (dense.nnz_inputs, dense.macs_nonzero) == (9, 16)


def test_depthwise_strided_padded_conv_by_hand():
    # 2 channels depthwise (group 2), 3×3 kernel, stride 2, pad 1 on a 3×3 input: output 2×2. Output (0,0) sees
    # the top-left 2×2 block of real inputs, (0,1) the top-right 2×2, (1,0) and (1,1) likewise: U = 16 per
    # channel, 16 MACs per dense channel. Tap (0,0) meets a real input only at output (1,1).
    w = np.ones((2, 1, 3, 3), dtype=np.float32)
    w[1, 0, 0, 0] = 0  # channel 1 loses its top-left tap: it only ever meets padding except at output (1,1)
    e = hwm.model_energy(conv_model(w, (3, 3), group=2, strides=[2, 2], pads=[1, 1, 1, 1]), tiny_hw()).layers[0]
    assert e.nnz_weights == 17 and e.nnz_inputs == 18
    assert e.macs_nonzero == 16 + 15  # channel 0: every real input once per output; channel 1 loses one MAC
    r = 1  # column tiles: d_g = 1 over n = 1
    assert e.inputs == 6 * r * 32 + 1 * 1 * 32 + 200 * (5 + r * 13) + 200 * 2 * 4


def test_conv_counts_match_a_brute_force_loop():
    rng = np.random.default_rng(0)
    c, h, wd, d, g = 4, 7, 6, 6, 2
    w = rng.standard_normal((d, c // g, 3, 2)).astype(np.float32) * (rng.random((d, c // g, 3, 2)) < 0.6)
    mask = (rng.random((1, c, h, wd)) < 0.7).astype(np.float32)
    attrs = {"group": g, "strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]}
    model = conv_model(w, (h, wd), mask, **attrs)
    e = hwm.model_energy(model, tiny_hw()).layers[0]
    out = onnx.shape_inference.infer_shapes(model).graph.output[0].type.tensor_type.shape.dim
    oh, ow = out[2].dim_value, out[3].dim_value
    macs = uses = 0
    for o in range(d):
        for ci in range(c // g):
            cin = (o // (d // g)) * (c // g) + ci
            for a in range(3):
                for b in range(2):
                    for py in range(oh):
                        for px in range(ow):
                            y, x = py * 2 + a - 1, px * 1 + b * 2 - 0
                            if 0 <= y < h and 0 <= x < wd and mask[0, cin, y, x]:
                                macs += w[o, ci, a, b] != 0
    for cin in range(c):
        for a in range(3):
            for b in range(2):
                for py in range(oh):
                    for px in range(ow):
                        y, x = py * 2 + a - 1, px + b * 2
                        uses += 0 <= y < h and 0 <= x < wd and bool(mask[0, cin, y, x])
    assert e.macs_nonzero == macs
    hw = tiny_hw()
    r = -(-(d // g) // hw.cols)
    x_nnz = int(mask.sum())
    assert e.inputs == pytest.approx(6 * r * uses + 1 * (d // g) * uses
                                     + 200 * (min(5, x_nnz) + r * max(0, x_nnz - 5)) + 200 * d * oh * ow)


# ------------------------------------------------------------------------------- relaxed costs vs exact
def _conv_geom(model):
    return hwm.geometries(hwm.densify(model))[0]


@pytest.mark.parametrize("weight_cache", [1000, 7])
def test_weight_costs_bound_the_exact_energy(weight_cache):
    rng = np.random.default_rng(1)
    hw = tiny_hw(weight_cache=weight_cache)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    mask = rng.random((3, 5, 5)) < 0.6
    geom = _conv_geom(conv_model(w, (5, 5), pads=[1, 1, 1, 1]))
    for keep_p in (0.0, 0.1, 0.5, 1.0):
        support = rng.random(w.shape) < keep_p
        cost = hwm.weight_costs(geom, hw, mask, score=np.square(w))
        exact = hwm.layer_energy(geom, hw, w * support, mask)
        relaxed = cost[support].sum() + hwm.inputs_energy(geom, hw, mask)[0]
        assert relaxed >= exact.total - 1e-9
        if weight_cache >= w.size:  # no cache overflow: the relaxation is exact
            assert relaxed == pytest.approx(exact.total)
    # keeping the top-s_w weights by score costs exactly what the model says even when the cache overflows
    top = np.zeros(w.size, bool)
    top[np.argsort(-np.square(w).reshape(-1))[:min(weight_cache, w.size)]] = True
    top = top.reshape(w.shape)
    cost = hwm.weight_costs(geom, hw, mask, score=np.square(w))
    exact = hwm.layer_energy(geom, hw, w * top, mask)
    assert cost[top].sum() + hwm.inputs_energy(geom, hw, mask)[0] == pytest.approx(exact.total)


@pytest.mark.parametrize("weight_cache", [1000, 7])
def test_min_support_energy_bounds_every_support_of_that_size(weight_cache):
    """Any k weights (relaxed cost, any input mask) and any k input elements add at most the bound to the floor;
    the bound is attained by some choice (the k costliest with every input kept)."""
    rng = np.random.default_rng(3)
    hw = tiny_hw(weight_cache=weight_cache)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    geom = _conv_geom(conv_model(w, (5, 5), pads=[1, 1, 1, 1], strides=[2, 2]))
    k = 5
    b_inputs, b_weights = hwm.min_support_energy(geom, hw, k, k)
    floor = hwm.inputs_energy(geom, hw, np.zeros(geom.in_shape, bool))[0]
    worst_in, worst_w = 0.0, 0.0
    for trial in range(300):
        mask = np.zeros(geom.input_size, bool)
        mask[rng.choice(geom.input_size, k, replace=False)] = True
        mask = mask.reshape(geom.in_shape)
        worst_in = max(worst_in, hwm.inputs_energy(geom, hw, mask)[0] - floor)
        support = np.zeros(w.size, bool)
        support[rng.choice(w.size, k, replace=False)] = True
        cost = hwm.weight_costs(geom, hw, mask if trial % 2 else None, score=rng.random(w.shape))
        worst_w = max(worst_w, float(cost.reshape(-1)[support].sum()))
    assert 0 < worst_in <= b_inputs + 1e-9 and 0 < worst_w <= b_weights + 1e-9
    everything = hwm.weight_costs(geom, hw, None, score=np.zeros(w.shape))  # no weight scored into the cache
    if weight_cache >= w.size:
        assert b_weights == pytest.approx(np.sort(everything.reshape(-1))[-k:].sum())
    fc = hwm.geometries(gemm_model(rng.standard_normal((6, 4)).astype(np.float32)))[0]
    assert hwm.min_support_energy(fc, hw, 100, 100)[0] == 0.0  # dense-layer inputs are not masked
    assert hwm.min_support_energy(fc, hw, 100, 100)[1] == pytest.approx(hwm.weight_costs(fc, hw).sum())


def test_mask_costs_add_up_to_the_exact_energy():
    rng = np.random.default_rng(2)
    hw = tiny_hw(input_cache=10_000)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32) * (rng.random((4, 2, 3, 3)) < 0.5)
    geom = _conv_geom(conv_model(w, (6, 5), strides=[2, 1], pads=[1, 1, 1, 1]))
    mask = rng.random(geom.in_shape) < 0.5
    cost = hwm.mask_costs(geom, hw, w)
    exact = hwm.layer_energy(geom, hw, w, mask)
    assert cost[mask].sum() + hwm.mask_fixed_energy(geom, hw, w) == pytest.approx(exact.total)


# ------------------------------------------------------------------------------------- description files
def test_shipped_eyeriss_description():
    hw = hwm.load_hardware(EYERISS)
    assert (hw.rows, hw.cols, hw.input_cache, hw.weight_cache) == (12, 14, 51200, 4096)
    assert (hw.e_mac, hw.e_rf, hw.e_cache, hw.e_dram) == (3, 1, 6, 200)
    assert hw.energy_unit == "pJ" and len(hw.sha256) == 64


@pytest.mark.parametrize("text, fragment", [
    ("{", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"pe_array": {"rows": 12, "cols": 14}, "input_cache": 1, "weight_cache": 1}', "missing 'unit_energy'"),
    ('{"pe_array": {"rows": 0, "cols": 14}, "input_cache": 1, "weight_cache": 1, '
     '"unit_energy": {"mac": 1, "rf": 1, "cache": 1, "dram": 1}}', "pe_array.rows"),
    ('{"pe_array": {"rows": 1, "cols": 1}, "input_cache": 1, "weight_cache": 1.5, '
     '"unit_energy": {"mac": 1, "rf": 1, "cache": 1, "dram": 1}}', "weight_cache"),
    ('{"pe_array": {"rows": 1, "cols": 1}, "input_cache": 1, "weight_cache": 1, '
     '"unit_energy": {"mac": -1, "rf": 1, "cache": 1, "dram": 1}}', "unit_energy.mac"),
    ('{"pe_array": {"rows": 1, "cols": 1}, "input_cache": 1, "weight_cache": 1, '
     '"unit_energy": {"mac": 1, "rf": 1, "cache": 1}}', "lacks 'dram'"),
    ('{"pe_array": {"rows": 1, "cols": 1}, "input_cache": 1, "weight_cache": 1, "cache": 3, '
     '"unit_energy": {"mac": 1, "rf": 1, "cache": 1, "dram": 1}}', "unknown key 'cache'"),
    ('{"pe_array": {"rows": 1, "cols": 1}, "input_cache": 1, "weight_cache": 1, "energy_unit": "kWh", '
     '"unit_energy": {"mac": 1, "rf": 1, "cache": 1, "dram": 1}}', "energy_unit"),
])
def test_bad_descriptions_are_one_line_user_errors(tmp_path, text, fragment):
    path = tmp_path / "hw.json"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        hwm.load_hardware(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_missing_hardware_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        hwm.load_hardware(tmp_path / "nope.json")


# ------------------------------------------------------------------------------------------------- models
def test_demo_model_energy_and_inspect_breakdown():
    path = REPO / "models" / "digits_cnn.onnx"
    result = onnxecc.inspect(path, hardware=str(EYERISS))
    energy = result.as_dict()["energy"]
    assert len(energy["layers"]) == len(result.layers)
    assert energy["total"] == pytest.approx(sum(r["total"] for r in energy["layers"]))
    assert energy["joules"] == pytest.approx(energy["total"] * 1e-12)
    for row, layer in zip(energy["layers"], result.layers):
        assert row["macs_nonzero"] == layer.macs - (0 if layer.op != "Conv" else _padding_macs(layer, path))
    json.dumps(result.as_dict())


def _padding_macs(layer, path) -> int:
    """MACs a padded conv spends on padding (not counted by the energy model: those inputs are zero)."""
    model = hwm.densify(onnx.load(path))
    geom = next(g for g in hwm.geometries(model) if g.name == layer.name)
    return layer.macs - int(geom.weight_uses(None).sum())


def test_sparse_initializers_are_read_back(tmp_path):
    w = np.zeros((4, 3), dtype=np.float32)
    w[1, 2] = 5.0
    model = gemm_model(w)
    tensor = model.graph.initializer[0]
    idx = np.flatnonzero(w).astype(np.int64)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(w.reshape(-1)[idx], "W"),
                                       numpy_helper.from_array(idx, "W_idx"), list(w.shape))
    model.graph.initializer.remove(tensor)
    model.graph.sparse_initializer.append(sparse)
    e = hwm.model_energy(model, tiny_hw()).layers[0]
    assert e.nnz_weights == 1 and e.weight_size == 12


# ------------------------------------------------------------------------------------------------ bit widths
UNITS_8 = {"mac": 1, "rf": 0.5, "cache": 3, "dram": 100}


def test_gemm_energy_by_hand_at_8_and_16_bits():
    # The layer of test_gemm_energy_by_hand with an input cache of 2 values: at 16 bits the 3 inputs overflow it
    # (one re-fetched per column tile, R=2); at 8 bits the caches hold twice as many values (s_i=4, s_w=6).
    w = np.array([[1, 0], [2, 3], [0, 4]], dtype=np.float32)
    hw = tiny_hw(input_cache=2, unit_energy_by_bits={"8": UNITS_8})
    at16 = hwm.model_energy(gemm_model(w), hw).layers[0]
    assert at16.bits == 16
    assert (at16.compute, at16.weights) == (3 * 4, 6 * 1 * 4 + 1 * 1 * 4 + 200 * (3 + 1 * 1))
    assert at16.inputs == 6 * 2 * 3 + 1 * 2 * 3 + 200 * (2 + 2 * 1) + 200 * 2
    at8 = hwm.model_energy(gemm_model(w), hw, bits=8).layers[0]
    assert at8.bits == 8
    assert at8.compute == 1 * 4
    assert at8.weights == 3 * 1 * 4 + 0.5 * 1 * 4 + 100 * 4  # all 4 weights fit the 6-value weight cache
    assert at8.inputs == 3 * 2 * 3 + 0.5 * 2 * 3 + 100 * 3 + 100 * 2  # all 3 inputs fit the 4-value input cache
    assert at8.total == 939 and at16.total == 2082


def test_conv_energy_by_hand_at_8_bits_with_the_larger_weight_cache():
    # The masked conv of test_conv_energy_by_hand_with_input_mask (T=2, R=1, 4 weights, X=8, U=12, 12 MACs):
    # at 16 bits one weight is beyond s_w=3 and is fetched from DRAM once per row tile; at 8 bits s_w=6.
    w = np.ones((1, 1, 2, 2), dtype=np.float32)
    mask = np.ones((1, 1, 3, 3), dtype=np.float32)
    mask[0, 0, 1, 1] = 0
    hw = tiny_hw(unit_energy_by_bits={"8": UNITS_8})
    e = hwm.model_energy(conv_model(w, (3, 3), mask), hw, bits=8).layers[0]
    assert e.compute == 1 * 12
    assert e.weights == 3 * 2 * 4 + 0.5 * 4 * 4 + 100 * 4
    assert e.inputs == 3 * 1 * 12 + 0.5 * 1 * 12 + 100 * 8 + 100 * 1 * 4  # X=8 fits s_i=10
    assert e.total == 12 + 432 + 1242
    assert hwm.model_energy(conv_model(w, (3, 3), mask), hw, bits=16).layers[0].total == 36 + 1064 + 2484


def test_at_bits_scales_capacities_and_keeps_the_reference():
    hw = hwm.parse_hardware({"pe_array": {"rows": 2, "cols": 1}, "input_cache": 10, "weight_cache": 3,
                             "reference_bits": 8, "unit_energy": UNITS_8,
                             "unit_energy_by_bits": {"4": {"mac": 0.3, "rf": 0.25, "cache": 1.5, "dram": 50},
                                                     "16": {"mac": 3, "rf": 1, "cache": 6, "dram": 200}}})
    assert hw.widths == (4, 8, 16) and hw.at_bits(8) is hw and hw.at_bits(None) is hw
    h4, h16 = hw.at_bits(4), hw.at_bits(16)
    assert (h4.input_cache, h4.weight_cache, h4.e_dram) == (20, 6, 50)
    assert (h16.input_cache, h16.weight_cache, h16.e_mac) == (5, 1, 3)  # ⌊3·8/16⌋ = 1
    assert h16.at_bits(8) == hw.at_bits(8).at_bits(8) and h16.at_bits(4).input_cache == 20
    with pytest.raises(UserError) as info:
        hw.at_bits(2)
    assert "2-bit" in str(info.value) and "unit_energy_by_bits" in str(info.value) and "\n" not in str(info.value)


_BASE = ('{"pe_array": {"rows": 1, "cols": 1}, "input_cache": 1, "weight_cache": 1, '
         '"unit_energy": {"mac": 1, "rf": 1, "cache": 1, "dram": 1}')


@pytest.mark.parametrize("extra, fragment", [
    (', "unit_energy_by_bits": [8]', "'unit_energy_by_bits' must be an object"),
    (', "unit_energy_by_bits": {"eight": {"mac": 1, "rf": 1, "cache": 1, "dram": 1}}', "key 'eight'"),
    (', "unit_energy_by_bits": {"0": {"mac": 1, "rf": 1, "cache": 1, "dram": 1}}', "key '0'"),
    (', "unit_energy_by_bits": {"8": {"mac": 1, "rf": 1, "cache": 1}}', "unit_energy_by_bits.8 lacks 'dram'"),
    (', "unit_energy_by_bits": {"8": {"mac": 1, "rf": 1, "cache": 1, "dram": -2}}', "unit_energy_by_bits.8.dram"),
    (', "unit_energy_by_bits": {"8": {"mac": 1, "rf": 1, "cache": 1, "dram": 1, "sram": 1}}', "'sram'"),
    (', "unit_energy_by_bits": {"8": 3}', "'unit_energy_by_bits.8' must be an object"),
    (', "unit_energy_by_bits": {"16": {"mac": 2, "rf": 1, "cache": 1, "dram": 1}}', "differs from unit_energy"),
    (', "reference_bits": 0', "reference_bits"),
    (', "reference_bits": 128', "at most 64"),
])
def test_bad_bit_width_entries_are_one_line_user_errors(tmp_path, extra, fragment):
    path = tmp_path / "hw.json"
    path.write_text(_BASE + extra + "}")
    with pytest.raises(UserError) as info:
        hwm.load_hardware(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_shipped_eyeriss_8_bit_entry():
    hw = hwm.load_hardware(EYERISS)
    assert hw.bits == 16 and hw.widths == (8, 16)
    h8 = hw.at_bits(8)
    assert (h8.e_mac, h8.e_rf, h8.e_cache, h8.e_dram) == (0.9, 0.5, 3, 100)
    assert (h8.input_cache, h8.weight_cache) == (102400, 8192)
    assert "Horowitz" in json.loads(EYERISS.read_text())["description"]


def _test_dequantize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, bool]]:
    """The test's own float view of a QDQ model: weights (q − zp)·scale per output channel, activations'
    Q→DQ pairs dropped; → (model, layer name → int8?)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    alias, values = {}, {}
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        if n.input[0] in inits:
            q, scale, zp = (inits[i].astype(np.float64) for i in n.input[:3])
            if scale.size > 1:
                shape = [1] * q.ndim
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                shape[axis] = -1
                scale, zp = scale.reshape(shape), zp.reshape(shape)
            values[n.output[0]] = ((q - zp) * scale).astype(np.float32)
        else:
            alias[n.output[0]] = producer[n.input[0]].input[0]
    nodes, int8 = [], {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        n2 = onnx.NodeProto()
        n2.CopyFrom(n)
        for i, name in enumerate(n2.input):
            n2.input[i] = alias.get(name, name)
        if n.op_type in ("Conv", "Gemm"):
            int8[n.name] = n.input[1] in values
        nodes.append(n2)
    used = {i for n in nodes for i in n.input}
    floats = {**{k: v for k, v in inits.items() if k in used}, **{k: v for k, v in values.items() if k in used}}
    return model_of(nodes, list(model.graph.input), list(model.graph.output), floats), int8


def test_qdq_model_is_counted_with_its_int8_layers_at_8_bits():
    from onnxecc.cost.quantize import quantize_layers
    from onnxecc.graph.data import load_digits

    path = REPO / "models" / "digits_cnn.onnx"
    model = onnx.load(path)
    chosen = ["/features/features.3/Conv", "/classifier/classifier.1/Gemm"]
    qdq = quantize_layers(model, load_digits().x_train[:64], chosen)
    hw = hwm.load_hardware(EYERISS)
    counted = hwm.model_energy(qdq, hw)
    assert [e.bits for e in counted.layers] == [16, 8, 16, 8, 16]
    floats, int8 = _test_dequantize(qdq)
    assert sorted(n for n, q in int8.items() if q) == sorted(chosen)
    expected = hwm.model_energy(floats, hw, bits={n: 8 for n in chosen})
    assert counted.total == pytest.approx(expected.total, rel=1e-12)
    for a, b in zip(counted.layers, expected.layers):
        assert (a.nnz_weights, a.total) == (b.nnz_weights, pytest.approx(b.total, rel=1e-12))
    # inspect reads the QDQ file too, and shows the energy with every layer at each width of the file
    energy = onnxecc.inspect(qdq.SerializeToString(), hardware=str(EYERISS)).as_dict()["energy"]
    assert energy["total"] == pytest.approx(counted.total)
    assert set(energy["at_bits"]) == {"8", "16"}
    assert energy["at_bits"]["8"]["total"] < energy["total"] < energy["at_bits"]["16"]["total"]
    dense = onnxecc.inspect(path, hardware=str(EYERISS)).as_dict()["energy"]
    assert set(dense["at_bits"]) == {"8"} and dense["at_bits"]["8"]["total"] < dense["total"]
