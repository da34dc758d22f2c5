"""Weighted sparse projection: the threshold search equals the sorted greedy, the greedy is within one item of
the exact knapsack (cvxpy + HiGHS), and `compress --method wsp` meets a modelled energy budget by an
independent recount of the written file, whose sparse initializers run in onnxruntime like the dense model."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxecc.compress import CompressOptions, compress
from onnxecc.core.errors import UserError
from onnxecc.optimize.sparse_projection import (
    greedy_knapsack,
    greedy_sorted,
    greedy_value,
    knapsack,
    prefix_by_score,
    project,
)

REPO = Path(__file__).resolve().parents[1]
EYERISS = REPO / "profiles" / "eyeriss.json"
CNN, RESDW = REPO / "models" / "digits_cnn.onnx", REPO / "models" / "digits_resdw.onnx"


# ---------------------------------------------------------------------------------- threshold == sort
def _instances(rng):
    n = 200_000  # above the direct-sort size: the histogram levels run
    yield "continuous", rng.standard_normal(n).astype(np.float32) ** 2, rng.integers(1, 5000, n).astype(float)
    # few distinct profits and costs: many exact ties in the ratio, a third of the profits zero
    yield "ties", rng.integers(-3, 4, n).astype(float) ** 2, rng.choice([1.0, 2.0, 4.0], n)
    costs = rng.integers(0, 50, n).astype(float)  # zero costs: free items (ratio +inf, or 0 without profit)
    yield "zero costs", np.abs(rng.standard_normal(n)) * (rng.random(n) < 0.8), costs
    yield "all equal", np.ones(n), np.full(n, 3.0)
    yield "narrow range", 1.0 + rng.random(n) * 1e-9, np.ones(n)  # needs several histogram levels


def test_threshold_search_equals_the_sorted_greedy():
    rng = np.random.default_rng(0)
    for name, profit, cost in _instances(rng):
        total = float(cost.sum())
        for capacity in (-1.0, 0.0, 1.0, 0.013 * total, 0.5 * total, math.floor(0.77 * total) + 0.5, total,
                         2 * total):
            fast, ref = greedy_knapsack(profit, cost, capacity), greedy_sorted(profit, cost, capacity)
            assert np.array_equal(fast, ref), (name, capacity)
            assert cost[fast].sum() <= max(capacity, 0.0) or capacity < 0 and not fast.any()
        if name == "continuous":
            assert greedy_knapsack(profit, cost, total).all() and not greedy_knapsack(profit, cost, -1).any()


def test_projection_of_values_matches_and_zeroes_exactly():
    rng = np.random.default_rng(1)
    v = rng.standard_normal((300, 400)).astype(np.float32)
    v[rng.random(v.shape) < 0.1] = 0
    cost = rng.choice([3.0, 7.0, 11.0], v.shape)
    capacity = 0.3 * cost.sum()
    projected, keep = project(v, cost, capacity)
    assert np.array_equal(keep.reshape(-1), greedy_sorted(np.square(v.astype(np.float64)), cost, capacity))
    assert projected.dtype == v.dtype and np.array_equal(projected[keep], v[keep]) and not projected[~keep].any()
    assert np.array_equal(project(v, cost, capacity, exact_sort=True)[1], keep)
    empty = project(np.zeros(0, np.float32), np.zeros(0), 5.0)
    assert empty[0].size == 0 and empty[1].size == 0
    with pytest.raises(ValueError):
        project(np.array([np.nan, 1.0]), np.ones(2), 1.0)
    with pytest.raises(ValueError):
        greedy_knapsack(np.ones(2), np.array([1.0, -1.0]), 1.0)


def test_reserved_items_are_kept_paid_first_and_the_rest_is_the_greedy_at_the_remaining_capacity():
    rng = np.random.default_rng(5)
    v = rng.standard_normal(100_000).astype(np.float32)
    cost = rng.integers(1, 40, v.size).astype(float)
    reserved = np.zeros(v.size, bool)
    reserved[rng.choice(v.size, 500, replace=False)] = True
    v[np.flatnonzero(reserved)[:10]] = 0  # a reserved weight may be zero: still reserved, costs nothing extra
    rest = ~reserved
    for capacity in (0.0, float(cost[reserved].sum()) - 1, 0.2 * cost.sum(), cost.sum()):
        for exact in (False, True):
            projected, keep = project(v, cost, capacity, reserved=reserved, exact_sort=exact)
            assert keep[reserved].all()
            left = capacity - cost[reserved].sum()
            expected = greedy_sorted(np.square(v[rest].astype(np.float64)), cost[rest], left)
            assert np.array_equal(keep[rest], expected), (capacity, exact)
            assert np.array_equal(projected, np.where(keep, v, 0))
        magnitude = prefix_by_score(np.abs(v), cost, capacity, reserved=reserved)
        assert magnitude[reserved].all()
        assert np.array_equal(magnitude[rest], prefix_by_score(np.abs(v[rest]), cost[rest],
                                                                capacity - cost[reserved].sum()))
    assert np.array_equal(project(v, cost, 1e6, reserved=np.zeros(v.size, bool))[1], project(v, cost, 1e6)[1])
    with pytest.raises(ValueError, match="reserved"):
        project(v, cost, 1.0, reserved=np.ones(3, bool))


def test_knapsack_on_profits_is_the_projection_on_values_and_keeps_the_reserved():
    rng = np.random.default_rng(4)
    v = rng.standard_normal(100_000).astype(np.float32)
    cost = rng.integers(1, 40, v.size).astype(float)
    reserved = rng.random(v.size) < 0.01
    profit = np.square(v.astype(np.float64)) * rng.gamma(1.0, 1.0, v.size)  # e.g. a saliency F·V²
    for capacity in (0.0, 0.1 * cost.sum(), cost.sum()):
        assert np.array_equal(knapsack(np.square(v.astype(np.float64)), cost, capacity, reserved=reserved),
                              project(v, cost, capacity, reserved=reserved)[1])
        keep = knapsack(profit, cost, capacity, reserved=reserved)
        assert keep[reserved].all()
        assert np.array_equal(keep[~reserved], greedy_sorted(profit[~reserved], cost[~reserved],
                                                             capacity - cost[reserved].sum()))


def test_prefix_by_score_cuts_the_score_order_at_the_budget():
    rng = np.random.default_rng(2)
    score = np.round(rng.random(100_000), 3)  # ties
    cost = rng.integers(1, 9, score.size).astype(float)
    for capacity in (0.0, 0.25 * cost.sum(), cost.sum()):
        keep = prefix_by_score(score, cost, capacity)
        order = np.argsort(-score, kind="stable")
        k = int(np.searchsorted(np.cumsum(cost[order]), capacity, side="right"))
        expected = np.zeros(score.size, bool)
        expected[order[:k]] = True
        assert np.array_equal(keep, expected)


# -------------------------------------------------------------------------------- greedy vs exact (cvxpy)
def test_greedy_is_feasible_and_within_one_item_of_the_exact_knapsack():
    exact = pytest.importorskip("onnxecc.optimize.exact", reason="needs the training extra (cvxpy)")
    rng = np.random.default_rng(3)
    gaps = []
    for _ in range(60):
        n = int(rng.integers(3, 40))
        profit = rng.gamma(1.5, 1.0, n) * (rng.random(n) < 0.9)
        cost = rng.integers(1, 25, n).astype(float)
        capacity = float(rng.uniform(0, 1.1) * cost.sum())
        keep_opt, opt = exact.exact_knapsack(profit, cost, capacity)
        value, used, critical = greedy_value(profit, cost, capacity)
        assert used <= capacity + 1e-9 and cost[keep_opt].sum() <= capacity + 1e-9
        assert value <= opt + 1e-7
        assert opt - value <= critical + 1e-7 <= profit.max() + 1e-7  # within one item (the critical one)
        gaps.append(opt - value)
    assert min(gaps) >= -1e-7 and any(g < 1e-9 for g in gaps)


# -------------------------------------------------------------------------------- compress --method wsp
HW = json.loads(EYERISS.read_text())


def _dense_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The test's own reading of (sparse) initializers: values scattered at linear indices."""
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for sp in model.graph.sparse_initializer:
        dense = np.zeros(int(np.prod(sp.dims)), dtype=np.float32)
        dense[numpy_helper.to_array(sp.indices)] = numpy_helper.to_array(sp.values)
        out[sp.values.name] = dense.reshape(tuple(sp.dims))
    return out


def _independent_energy(model: onnx.ModelProto) -> float:
    """The modelled energy (units) recounted from the file with torch's unfold/conv2d, not onnxecc.cost.hardware. A QDQ
    model is read through the test's own dequantization (test_hardware._test_dequantize); its int8 layers are
    counted with eyeriss.json's 8-bit unit energies and caches of twice as many (8-bit) values."""
    import torch
    import torch.nn.functional as F
    from test_hardware import _test_dequantize

    m, n = HW["pe_array"]["rows"], HW["pe_array"]["cols"]
    inits = _dense_initializers(model)
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    del dense.graph.sparse_initializer[:]
    for k, v in inits.items():
        if k not in {t.name for t in dense.graph.initializer}:
            dense.graph.initializer.append(numpy_helper.from_array(v, k))
    int8 = {}
    if any(node.op_type == "DequantizeLinear" for node in dense.graph.node):
        dense, int8 = _test_dequantize(dense)
        model = dense
        inits = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    shaped = onnx.shape_inference.infer_shapes(dense)
    shapes = {vi.name: [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
              for vi in list(shaped.graph.value_info) + list(shaped.graph.input) + list(shaped.graph.output)}
    producer = {o: node for node in model.graph.node for o in node.output}
    total = 0.0
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            w = inits[node.input[1]]
            c, h, wd = shapes[node.input[0]][1:]
            support = torch.ones(1, c, h, wd)
            mul = producer.get(node.input[0])
            if mul is not None and mul.op_type == "Mul" and mul.input[1] in inits:
                support = torch.from_numpy((np.broadcast_to(inits[mul.input[1]], (1, c, h, wd)) != 0)
                                           .astype(np.float32))
            pads, groups = attrs.get("pads", [0] * 4), attrs.get("group", 1)
            assert pads[:2] == pads[2:]
            stride, pad = attrs.get("strides", [1, 1]), pads[:2]
            kernel = tuple(w.shape[2:])
            nz = torch.from_numpy((w != 0).astype(np.float32))
            macs = float(F.conv2d(support, nz, None, stride, pad, 1, groups).sum())
            cols = F.unfold(support, kernel, padding=pad, stride=stride)
            positions, uses = cols.shape[-1], float((cols != 0).sum())
            d, dg = w.shape[0], w.shape[0] // groups
        elif node.op_type == "Gemm":
            w = inits[node.input[1]]
            k = w.shape[1] if attrs.get("transB", 0) else w.shape[0]
            d = dg = w.shape[0] if attrs.get("transB", 0) else w.shape[1]
            nnz_w = np.count_nonzero(w)
            macs, positions, uses, support = float(nnz_w), 1, float(k), torch.ones(k)
        else:
            continue
        u, scale = (HW["unit_energy_by_bits"]["8"], 2) if int8.get(node.name) else (HW["unit_energy"], 1)
        s_i, s_w = HW["input_cache"] * scale, HW["weight_cache"] * scale
        nnz = int(np.count_nonzero(w))
        t, r, x = math.ceil(positions / m), math.ceil(dg / n), float(support.sum())
        total += u["mac"] * macs
        total += u["cache"] * t * nnz + u["rf"] * positions * nnz + u["dram"] * (min(s_w, nnz) + t * max(0, nnz - s_w))
        total += u["cache"] * r * uses + u["rf"] * dg * uses + u["dram"] * (min(s_i, x) + r * max(0, x - s_i))
        total += u["dram"] * d * positions
    return total


@pytest.fixture(scope="module")
def resdw_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wsp") / "resdw_wsp.onnx"
    report = out.with_suffix(".json")
    opts = CompressOptions(metric="energy", method="wsp", hardware=str(EYERISS), data="digits", epochs=3,
                           proj_interval=5, measure_latency=False)
    result = compress(RESDW, "0.4", out, opts, report=report)
    return result, out, report


def test_wsp_meets_the_energy_budget_by_an_independent_recount(resdw_run):
    result, out, _ = resdw_run
    written = onnx.load(out)
    onnx.checker.check_model(written)
    assert len(written.graph.sparse_initializer) > 0  # pruned weights are stored sparse where smaller
    recount = _independent_energy(written) * 1e-12  # eyeriss.json: energy_unit pJ
    assert recount <= result.budget_abs * (1 + 1e-12)
    assert recount == pytest.approx(result.counted_cost, rel=1e-9)
    assert result.meets_budget and result.pruned
    original = _independent_energy(onnx.load(RESDW)) * 1e-12
    assert result.original_cost == pytest.approx(original, rel=1e-9)
    assert result.budget_abs == pytest.approx(0.4 * original, rel=1e-9)
    assert result.accuracy_after is not None and result.accuracy_after > 0.5  # 3 epochs: far from converged


def test_wsp_output_graph_masks_metadata_and_ort(resdw_run):
    result, out, report = resdw_run
    original, written = onnx.load(RESDW), onnx.load(out)
    names = [n.name for n in written.graph.node]
    assert {n.name for n in original.graph.node} <= set(names) and len(set(names)) == len(names)
    muls = [n for n in written.graph.node if n.name not in {m.name for m in original.graph.node}]
    assert muls and all(n.op_type == "Mul" for n in muls)  # resdw at 0.4 needs input masks
    meta = {p.key: json.loads(p.value) for p in written.metadata_props}
    assert meta["onnxecc.hardware_sha256"] == hashlib.sha256(EYERISS.read_bytes()).hexdigest()
    assert meta["onnxecc.modelled_energy_j"] == pytest.approx(result.counted_cost)
    assert meta["onnxecc.metric"] == "energy" and meta["onnxecc.method"] == "wsp"
    # ORT loads the sparse initializers: same output as the dense model with zeros in place
    dense = onnx.ModelProto()
    dense.CopyFrom(written)
    inits = _dense_initializers(written)
    del dense.graph.sparse_initializer[:]
    dense.graph.initializer.extend(numpy_helper.from_array(inits[sp.values.name], sp.values.name)
                                   for sp in written.graph.sparse_initializer)
    assert out.stat().st_size < len(dense.SerializeToString())
    x = np.random.default_rng(0).random((16, 1, 8, 8)).astype(np.float32)
    a = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    b = ort.InferenceSession(dense.SerializeToString()).run(None, {"input": x})[0]
    assert np.array_equal(a, b)
    doc = json.loads(report.read_text())
    assert doc["meets_budget"] and doc["metric"] == "energy"
    assert len(doc["wsp"]["energy"]["layers"]) == 12 and doc["wsp"]["storage"]["ort_loads_sparse"]
    assert any("densely" in w for w in doc["warnings"])


def test_one_shot_absolute_budget_and_no_pruning(tmp_path):
    out = tmp_path / "a.onnx"
    result = compress(CNN, "40uJ", out, CompressOptions(metric="energy", method="wsp", hardware=str(EYERISS),
                                                        epochs=0, measure_latency=False))
    assert result.meets_budget and result.counted_cost <= 40e-6
    assert _independent_energy(onnx.load(out)) * 1e-12 <= 40e-6
    same = compress(CNN, "150%", tmp_path / "b.onnx", CompressOptions(metric="energy", method="wsp",
                                                                      hardware=str(EYERISS), measure_latency=False))
    assert not same.pruned and any("no pruning" in w for w in same.warnings)


def test_wsp_user_errors(tmp_path):
    opts = CompressOptions(metric="energy", method="wsp", hardware=str(EYERISS), measure_latency=False)
    with pytest.raises(UserError, match="smallest reachable"):
        compress(RESDW, "0.1", tmp_path / "x.onnx", opts)  # output writes alone are 18% of the energy
    with pytest.raises(UserError, match="--metric energy"):
        compress(CNN, "0.5", tmp_path / "x.onnx", CompressOptions(metric="macs", method="wsp",
                                                                  hardware=str(EYERISS)))
    with pytest.raises(UserError, match="--hardware"):
        compress(CNN, "0.5", tmp_path / "x.onnx", CompressOptions(metric="energy", method="wsp"))
    with pytest.raises(UserError, match="input masks"):  # weights alone cannot reach it, and no data to learn masks
        compress(RESDW, "0.3", tmp_path / "x.onnx", CompressOptions(metric="energy", method="wsp",
                                                                    hardware=str(EYERISS), epochs=0))


def test_cli_bad_hardware_json_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "hw.json"
    bad.write_text('{"pe_array": {"rows": 12}}')
    proc = subprocess.run([sys.executable, "-m", "onnxecc", "compress", str(CNN), "--budget", "0.5", "--metric",
                           "energy", "--method", "wsp", "--hardware", str(bad), "--proj-interval", "5",
                           "-o", str(tmp_path / "o.onnx")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "hw.json" in lines[0] and "input_cache" in lines[0], proc.stderr


@pytest.fixture(scope="module")
def resdw_near_floor(tmp_path_factory):
    """digits_resdw at 0.2: 2.3% of the original energy above the floor (every weight and input zero). The
    global knapsack used to empty the stem conv and the blocks' first convs here (a chance-level model)."""
    out = tmp_path_factory.mktemp("wsp_floor") / "resdw_02.onnx"
    opts = CompressOptions(metric="energy", method="wsp", hardware=str(EYERISS), data="digits", epochs=15,
                           measure_latency=False)
    return compress(RESDW, "0.2", out, opts, report=out.with_suffix(".json")), out


def test_near_the_floor_every_layer_keeps_its_minimum_support(resdw_near_floor):
    from onnxecc.methods import wsp

    result, out = resdw_near_floor
    assert result.meets_budget and result.pruned
    written = onnx.load(out)
    inits = _dense_initializers(written)
    muls = {n.output[0]: n for n in written.graph.node if n.op_type == "Mul"}
    convs = [n for n in written.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(convs) == 12
    for node in convs:  # read from the file: weight supports, and the input masks in front of the convs
        assert np.count_nonzero(inits[node.input[1]]) >= wsp._MIN_WEIGHTS, node.name
        if node.op_type == "Conv" and node.input[0] in muls:
            assert np.count_nonzero(inits[muls[node.input[0]].input[1]]) >= wsp._MIN_INPUTS, node.name
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["wsp"]["floor_units"] < doc["wsp"]["reachable_units"] <= doc["wsp"]["budget_units"]
    assert _independent_energy(written) <= doc["wsp"]["budget_units"] * (1 + 1e-12)


def test_near_the_floor_accuracy_is_far_above_chance(resdw_near_floor):
    """The joint projection of weights and input masks (saliency profit) trains digits_resdw at 0.2 to ~0.94
    (the former weights-then-masks schedule: 0.10 on every seed)."""
    result, _ = resdw_near_floor
    assert result.accuracy_after > 0.8


def test_near_the_floor_a_trained_result_gives_no_chance_warning(resdw_near_floor):
    result, _ = resdw_near_floor
    assert result.accuracy_after >= 0.15
    assert not any("near chance" in w for w in result.warnings)


def test_near_the_floor_a_chance_level_result_is_not_silent(tmp_path):
    """A learning rate too small to recover anything (1e-9, 2 epochs) leaves digits_resdw at 0.2 at chance; the
    file's accuracy, measured here with a fresh onnxruntime session, is at chance and a warning says so."""
    from onnxecc.graph.data import load_digits

    out = tmp_path / "chance.onnx"
    opts = CompressOptions(metric="energy", method="wsp", hardware=str(EYERISS), data="digits", epochs=2, lr=1e-9,
                           measure_latency=False)
    result = compress(RESDW, "0.2", out, opts)
    ds = load_digits()
    accuracy = float((ort.InferenceSession(str(out)).run(None, {"input": ds.x_test})[0].argmax(1) == ds.y_test).mean())
    assert accuracy < 0.15 < result.accuracy_before
    assert result.accuracy_after == pytest.approx(accuracy)
    assert sum("near chance" in w and "smallest reachable" in w for w in result.warnings) == 1, result.warnings


def test_budget_between_the_floor_and_the_minimum_supports_is_a_one_line_error(tmp_path):
    """0.178 of the original is above the floor (0.177) but below floor + minimum supports (0.179)."""
    from onnxecc.cost.budget import Budget
    from onnxecc.methods.wsp import make_plan

    plan = make_plan(RESDW, str(EYERISS), Budget(text="0.178", metric="energy", fraction=0.178))
    assert plan.floor < plan.target < plan.reachable
    proc = subprocess.run([sys.executable, "-m", "onnxecc", "compress", str(RESDW), "--budget", "0.178", "--metric",
                           "energy", "--method", "wsp", "--hardware", str(EYERISS), "--data", "digits",
                           "-o", str(tmp_path / "o.onnx")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "smallest reachable" in lines[0], proc.stderr
    assert f"{plan.reachable * plan.jpu * 1e6:.3g} uJ" in lines[0] and not (tmp_path / "o.onnx").exists()
    # the trainer itself refuses it too (the bench drives it directly: a reason in its row, no internal error)
    from onnxecc.methods.wsp import _Trainer

    with pytest.raises(UserError, match="smallest reachable"):
        _Trainer(plan, None, CompressOptions(metric="energy", method="wsp", hardware=str(EYERISS)), print)


# -------------------------------------------------------------------------- finetune hooks (wsp's training)
def _tiny_problem(seed: int = 0):
    import torch

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((50, 6)).astype(np.float32)
    teacher = rng.standard_normal((50, 3)).astype(np.float32) * 2
    y = rng.integers(0, 3, 50)
    torch.manual_seed(seed)
    return torch.nn.Linear(6, 3), x, teacher, y


def _reference_training(module, x, teacher, y, *, epochs, lr, batch, t, mix, shuffle_seed, schedule, bias_lr,
                        l1):
    """The loop written out independently: own KL/CE formulas, torch's Adam, the same seeded batch order."""
    import torch

    opt = torch.optim.Adam([{"params": [module.weight]}, {"params": [module.bias], "lr": bias_lr}], lr=lr)
    base = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(shuffle_seed)
    n, total, step = len(x), epochs * math.ceil(len(x) / batch), 0
    xs, ts, ys = torch.from_numpy(x), torch.from_numpy(teacher), torch.from_numpy(y)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            out = module(xs[idx])
            p_t = torch.softmax(ts[idx] / t, 1)
            kd = (p_t * (torch.log(p_t) - torch.log_softmax(out / t, 1))).sum(1).mean() * t * t
            ce = -torch.log_softmax(out, 1)[torch.arange(len(idx)), ys[idx]].mean()
            loss = mix * kd + (1 - mix) * ce + l1 * module.weight.abs().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            factor = 0.5 * (1 + math.cos(math.pi * step / total)) if schedule == "cosine" else 1.0
            for g, b in zip(opt.param_groups, base):
                g["lr"] = b * factor


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_finetune_with_param_groups_and_penalty_matches_an_independent_loop(schedule):
    import torch

    from onnxecc.train.finetune import TrainConfig, finetune

    module, x, teacher, y = _tiny_problem()
    reference = _tiny_problem()[0]
    reference.load_state_dict(module.state_dict())
    start = module.weight.detach().clone()
    cfg = TrainConfig(epochs=3, lr=0.01, batch_size=16, temperature=2.0, distill_weight=0.7, seed=4,
                      shuffle_seed=11, lr_schedule=schedule, device="cpu")
    calls = []
    finetune(module, x, teacher, y, cfg, penalty=lambda: 1e-3 * module.weight.abs().sum(),
             param_groups=[{"params": [module.bias], "lr": 0.1}], after_step=lambda s, n: calls.append((s, n)))
    _reference_training(reference, x, teacher, y, epochs=3, lr=0.01, batch=16, t=2.0, mix=0.7, shuffle_seed=11,
                        schedule=schedule, bias_lr=0.1, l1=1e-3)
    assert calls == [(s, 12) for s in range(1, 13)]  # ceil(50/16) = 4 batches × 3 epochs
    assert not torch.allclose(module.weight, start, atol=1e-3)
    torch.testing.assert_close(module.weight, reference.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.bias, reference.bias, rtol=1e-5, atol=1e-6)
    other = _tiny_problem()[0]  # the batch order is the shuffle seed's: another one trains differently
    finetune(other, x, teacher, y, TrainConfig(**{**cfg.__dict__, "shuffle_seed": 12}),
             penalty=lambda: 1e-3 * other.weight.abs().sum(), param_groups=[{"params": [other.bias], "lr": 0.1}])
    assert not torch.allclose(other.weight, module.weight, atol=1e-6)


def test_finetune_after_step_sees_masked_entries_zero_and_its_zeros_last_until_the_next_step():
    import torch

    from onnxecc.train.finetune import Mask, TrainConfig, finetune

    module, x, teacher, y = _tiny_problem(1)
    mask = (torch.arange(18).reshape(3, 6) % 3 != 0).float()  # a third of the weights pruned
    seen = []

    def after_step(step, total):
        w = module.weight.detach()
        seen.append((step, total, bool((w[mask == 0] == 0).all())))
        if step % 5 == 0 or step == total:  # like wsp's projection: zero the smallest surviving weight
            alive = torch.where(w != 0, w.abs(), torch.full_like(w, float("inf")))
            with torch.no_grad():
                module.weight.view(-1)[int(alive.argmin())] = 0.0

    finetune(module, x, teacher, y, TrainConfig(epochs=4, batch_size=20, seed=0, device="cpu"),
             masks=[Mask(module.weight, mask)], after_step=after_step)
    assert [(s, n) for s, n, _ in seen] == [(s, 12) for s in range(1, 13)]  # ceil(50/20) = 3 × 4 epochs
    assert all(ok for _, _, ok in seen)  # the masks are applied before the hook
    w = module.weight.detach()
    assert (w[mask == 0] == 0).all() and int((w == 0).sum()) == 6 + 1  # the last step's zero is still there
    with pytest.raises(ValueError, match="lr_schedule"):
        finetune(module, x, teacher, y, TrainConfig(epochs=1, lr_schedule="linear", device="cpu"))


def test_wsp_projects_every_interval_and_after_the_last_batch_of_each_phase(resdw_run):
    """The fixture: 3 epochs → two epochs of joint projection (weights and masks), one of fine-tuning;
    proj_interval 5."""
    from onnxecc.graph.data import load_digits

    result, _, _ = resdw_run
    per_epoch = math.ceil(len(load_digits().x_train) / 64)
    expected = sorted({*range(5, 2 * per_epoch + 1, 5), 2 * per_epoch})
    assert {h.get("phase") for h in result.history} == {"joint", "finetune"}
    joint = [h for h in result.history if h.get("phase") == "joint"]
    assert [h["step"] for h in joint] == expected
    assert len([h for h in result.history if h.get("phase") == "finetune"]) == 1
    budgets = [h["budget"] for h in joint]
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # the budget only decays
    assert all(h["energy"] <= h["budget"] * (1 + 1e-12) for h in joint)
    assert all(0 < h["mask_keep"] <= 1 for h in joint) and joint[-1]["mask_keep"] < joint[0]["mask_keep"]
    assert budgets[-1] == pytest.approx(result.budget_abs, rel=1e-9)


def test_a_budget_without_masks_learns_none_and_masks_only_the_inputs_zero_in_all_training_data(tmp_path):
    """digits_cnn at 0.4 needs no input masks: no mask phase, and the only masked inputs are the image pixels
    that are blank in every training image (deeper inputs are ReLU outputs; checked by the test's own pass)."""
    from onnxecc.graph.data import load_digits

    out, report = tmp_path / "cnn.onnx", tmp_path / "cnn.json"
    opts = CompressOptions(metric="energy", method="wsp", hardware=str(EYERISS), data="digits", epochs=3,
                           proj_interval=5, measure_latency=False)
    result = compress(CNN, "0.4", out, opts, report=report)
    assert result.meets_budget and {h.get("phase") for h in result.history} == {"weights", "finetune"}
    assert json.loads(report.read_text())["wsp"]["mask_keep_fraction"] == 1.0
    written = onnx.load(out)
    inits = _dense_initializers(written)
    source = onnx.load(CNN)
    original = {n.name for n in source.graph.node}
    x = load_digits().x_train
    muls = {n.output[0]: n for n in written.graph.node if n.name not in original}
    masked = {}
    for node in written.graph.node:
        if node.op_type == "Conv" and node.input[0] in muls:
            masked[node.name] = inits[muls[node.input[0]].input[1]][0] != 0
    first = "/features/features.0/Conv"
    assert np.array_equal(masked.pop(first), (x != 0).any(axis=0))  # (1, 8, 8): the blank pixels go
    assert (x == 0).all(axis=0).any()
    # deeper convs (masks decided before training): what is masked was zero on every training image in the
    # original model
    for name, support in masked.items():
        node = next(n for n in source.graph.node if n.name == name)
        probe = onnx.ModelProto()
        probe.CopyFrom(source)
        probe.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
        acts = ort.InferenceSession(probe.SerializeToString()).run([node.input[0]], {"input": x})[0]
        assert not acts[:, ~support].any()


# ---------------------------------------------------------------------------- --knobs width,precision (int8)
@pytest.fixture(scope="module")
def cnn_int8_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wsp_int8") / "cnn_int8.onnx"
    opts = CompressOptions(metric="energy", method="wsp", hardware=str(EYERISS), data="digits", epochs=3,
                           proj_interval=5, measure_latency=False, knobs=("width", "precision"))
    return compress(CNN, "0.2", out, opts, report=out.with_suffix(".json")), out


def test_int8_wsp_writes_qdq_that_meets_the_budget_at_8_bit_energies(cnn_int8_run):
    from onnxecc.cost.quantize import int8_nodes

    result, out = cnn_int8_run
    written = onnx.load(out)
    onnx.checker.check_model(written)
    layers = [n.name for n in written.graph.node if n.op_type in ("Conv", "Gemm")]
    assert sorted(int8_nodes(written)) == sorted(layers) and len(layers) == 5  # every layer int8
    recount = _independent_energy(written) * 1e-12
    assert recount <= result.budget_abs * (1 + 1e-12) and recount == pytest.approx(result.counted_cost, rel=1e-9)
    assert result.meets_budget and result.pruned
    assert result.original_cost == pytest.approx(_independent_energy(onnx.load(CNN)) * 1e-12, rel=1e-9)
    doc = json.loads(out.with_suffix(".json").read_text())
    prec = doc["wsp"]["precision"]
    assert prec["bits"] == 8 and sorted(prec["int8_layers"]) == sorted(layers)
    assert prec["energy_units_counted"] <= prec["energy_units_planned"] * (1 + 1e-12)
    # the same supports at 16 bits would cost more than twice the budget: int8 bought that many weights
    assert prec["energy_units_all_reference_bits"] > 2 * doc["wsp"]["budget_units"]
    assert {v["bits"] for v in doc["wsp"]["sparsity"].values()} == {8}
    assert result.accuracy_after > 0.8 and prec["accuracy_int8"] == result.accuracy_after
    assert any(w.startswith("precision: 5 layer(s) in int8") for w in result.warnings)
    x = np.random.default_rng(0).random((4, 1, 8, 8)).astype(np.float32)
    assert ort.InferenceSession(str(out)).run(None, {"input": x})[0].shape == (4, 10)


def test_int8_plan_halves_the_floor_on_eyeriss():
    """Every unit memory energy of eyeriss.json halves at 8 bits and no floor term overflows a cache, so the
    floor (output writes and dense-layer inputs) of the all-int8 plan is exactly half the 16-bit one; the
    budget stays relative to the original at 16 bits."""
    from onnxecc.cost.budget import Budget
    from onnxecc.methods.wsp import make_plan

    budget = Budget(text="0.2", metric="energy", fraction=0.2)
    p16, p8 = make_plan(RESDW, str(EYERISS), budget), make_plan(RESDW, str(EYERISS), budget, 8)
    assert p8.floor == pytest.approx(p16.floor / 2, rel=1e-12)
    assert (p8.original, p8.target) == (p16.original, p16.target) and len(p8.bits) == 12
    assert p8.reachable < 0.1 * p8.original < p16.reachable  # 0.1 is refused at 16 bits, reachable in int8


def test_int8_wsp_user_errors(tmp_path):
    no8 = tmp_path / "no8.json"
    no8.write_text(json.dumps({k: v for k, v in HW.items() if k != "unit_energy_by_bits"}))
    opts = dict(metric="energy", method="wsp", data="digits", knobs=("width", "precision"), measure_latency=False)
    with pytest.raises(UserError) as info:
        compress(CNN, "0.3", tmp_path / "x.onnx", CompressOptions(hardware=str(no8), **opts))
    assert "unit_energy_by_bits" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="--data"):
        compress(CNN, "0.3", tmp_path / "x.onnx", CompressOptions(hardware=str(EYERISS), **{**opts, "data": None}))
    assert not (tmp_path / "x.onnx").exists()


def test_validate_recounts_the_energy_budget_with_the_hardware_file(resdw_run, tmp_path):
    """`validate --hardware`: the energy counted again on the file (independent recount), the stored budget
    re-checked (met; violated once the metadata budget is lowered under it); another hardware file is refused,
    and without one the budget is reported as not re-checked."""
    from onnxecc.core.errors import UserError
    from onnxecc.graph import ingest
    from onnxecc.validate import validate, write_metadata

    result, out, _ = resdw_run
    checked = validate(RESDW, out, hardware=str(EYERISS))
    recount = _independent_energy(onnx.load(out)) * 1e-12
    assert checked.meets_budget is True
    assert checked.budget["cost"] == pytest.approx(recount, rel=1e-9)
    assert checked.budget["budget"] == pytest.approx(result.budget_abs, rel=1e-12)
    assert validate(RESDW, out).meets_budget is None
    tight = ingest.load(out)
    write_metadata(tight, {"budget": 0.5 * recount})
    ingest.save(tight, tmp_path / "tight.onnx")
    assert validate(RESDW, tmp_path / "tight.onnx", hardware=str(EYERISS)).meets_budget is False
    other = json.loads(EYERISS.read_text())
    other["name"] = "another accelerator"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="pass the --hardware file it was compressed with"):
        validate(RESDW, out, hardware=str(tmp_path / "other.json"))
