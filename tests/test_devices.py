"""Issue 28 item 2: nothing mixes devices or silently falls back.

Training moves the model to its device (CUDA under --device auto) for each run and back to the CPU after it.
There is no GPU here, so the second device is torch's own `meta` device (shapes only: placement, and the ops
refuse operands on another device) and, where values must be compared, torch's lazy-tensor backend (real numbers,
its own device type). The execution-provider checks run real onnxruntime sessions: AzureExecutionProvider is one
that this build lists and creates but that runs no node of these models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from onnxecc.core.errors import UserError
from onnxecc.graph import runtime
from onnxecc.methods.admm import AdmmVariables
from onnxecc.train import recalibrate
from onnxecc.train.bridge import to_torch
from onnxecc.train.finetune import Mask
from onnxecc.train.qat import FakeQuant
from onnxecc.validate import validate

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "digits_cnn.onnx"
RHO = 0.3


def _weights() -> dict[str, torch.Tensor]:
    """The trained tensors of a real converted model (CPU), by ONNX name."""
    tm = to_torch(onnx.load(MODEL))
    return {n: tm.parameter(n).detach().clone() for n in tm.params}


def _masks(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """0/1 masks (CPU) that prune the first half of every tensor's leading axis."""
    out = {}
    for n, w in weights.items():
        m = torch.ones_like(w)
        m[: max(1, w.shape[0] // 2)] = 0
        out[n] = m
    return out


def _admm_round(start: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]):
    """U and Z made from `start` (where a W-step begins: the CPU), then one Z-step, penalty, prox and U-step with
    the weights `weights` (wherever training put them)."""
    var = AdmmVariables(start)
    var.set_z(var.shifted(weights), _masks(start))
    penalty = var.penalty(weights, RHO)
    var.prox(weights, RHO)
    return var, penalty


def test_admm_variables_follow_the_weights_to_their_device():
    cpu = _weights()
    meta = {n: torch.empty_like(w, device="meta") for n, w in cpu.items()}  # the model moved by training
    var, penalty = _admm_round(cpu, meta)  # raises "not on the expected device" if U or Z stayed on the CPU
    assert penalty.device.type == "meta"
    assert {t.device.type for t in [*var.u.values(), *var.z.values()]} == {"meta"}
    assert {t.device.type for t in meta.values()} == {"meta"}


def test_admm_steps_compute_the_textbook_updates():
    """Penalty, prox and U-step against the formulas in float64 numpy (ρ/2‖W − Z + U‖²; W ← (W + ρ(Z − U))/(1+ρ)
    where Z = 0; U ← U + W − Z), from U = 0 and Z = W with half of each tensor masked."""
    cpu = _weights()
    w0 = {n: w.double().numpy() for n, w in cpu.items()}
    z = {n: w0[n] * m.double().numpy() for n, m in _masks(cpu).items()}
    weights = {n: w.clone() for n, w in cpu.items()}
    var, penalty = _admm_round(cpu, weights)
    assert float(penalty) == pytest.approx(0.5 * RHO * sum(np.square(w0[n] - z[n]).sum() for n in w0), rel=1e-6)
    gap, outside, total = var.dual_step(weights)
    w1 = {n: np.where(z[n] == 0, (w0[n] + RHO * z[n]) / (1 + RHO), w0[n]) for n in w0}
    for n in w0:
        np.testing.assert_allclose(weights[n].double().numpy(), w1[n], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(var.u[n].double().numpy(), w1[n] - z[n], rtol=1e-5, atol=1e-7)
    assert gap == pytest.approx(sum(np.square(w1[n] - z[n]).sum() for n in w0), rel=1e-5)
    assert outside == pytest.approx(sum(np.square(w1[n][z[n] == 0]).sum() for n in w0), rel=1e-5)
    assert total == pytest.approx(sum(np.square(w1[n]).sum() for n in w0), rel=1e-5)


def _lazy_device() -> str:
    try:
        import torch._lazy.ts_backend as ts
    except ImportError:  # pragma: no cover - torch builds without the lazy-tensor backend
        pytest.skip("this torch has no lazy-tensor backend (a second device with values)")
    ts.init()
    return "lazy"


def test_admm_round_trip_through_another_device_gives_the_cpu_numbers():
    """U and Z go to the training device and come back with the weights; the numbers equal an all-CPU run."""
    device = _lazy_device()
    results = {}
    for where in ("cpu", device):
        cpu = _weights()
        weights = {n: w.clone().to(where) for n, w in cpu.items()}
        var, penalty = _admm_round(cpu, weights)
        stats = var.dual_step(weights)
        assert {t.device.type for t in var.u.values()} == {where}
        back = {n: w.to("cpu") for n, w in weights.items()}  # training ends: the model is on the CPU again
        shifted = var.shifted(back)  # the next Z-step
        assert {t.device.type for t in [*var.u.values(), *var.z.values()]} == {"cpu"}
        results[where] = (float(penalty), stats, back, shifted)
    (p_a, s_a, w_a, v_a), (p_b, s_b, w_b, v_b) = results["cpu"], results[device]
    assert p_b == pytest.approx(p_a, rel=1e-6) and s_b == pytest.approx(s_a, rel=1e-6)
    for n in w_a:
        torch.testing.assert_close(w_b[n], w_a[n])
        torch.testing.assert_close(v_b[n], v_a[n])


def test_a_mask_follows_its_parameter():
    """finetune.Mask: training moves the mask to the device and the model back to the CPU; applying it then must
    not multiply across devices (meta's in-place multiply would not even complain)."""
    param = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
    mask = Mask(param, torch.ones(4, 3))
    mask.apply()
    assert mask.mask.device == param.device


def test_recalibration_statistics_run_where_the_model_is():
    tm = to_torch(onnx.load(MODEL))
    tm.module.to("meta")
    x = torch.zeros(4, 1, 8, 8)  # the calibration samples stay on the CPU
    stats = recalibrate.channel_stats(tm.module, x)
    assert stats and {t.device.type for pair in stats.values() for t in pair} == {"meta"}


def test_fake_quant_ranges_live_beside_the_weights():
    proto = onnx.load(MODEL)
    tm = to_torch(proto)
    tm.module.to("meta")
    layers = [n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    fq = FakeQuant(tm, layers, np.zeros((4, 1, 8, 8), np.float32), start_epoch=1)  # ranges computed later
    assert len(fq.sites) == len(layers)
    for s in fq.sites:
        assert getattr(s.owner, fq.SCALE).device == s.weight.device
        assert getattr(s.owner, fq.ZERO).device == s.weight.device


# ---- execution providers -------------------------------------------------------------------------------------------
def test_placement_counts_every_node_of_a_cpu_session():
    sess = runtime.session(MODEL)
    assert runtime.placement(sess) == {"CPUExecutionProvider": len(onnx.load(MODEL).graph.node)}
    assert runtime.check_provider(sess, "CPUExecutionProvider") == runtime.placement(sess)


def test_a_session_without_the_requested_provider_is_refused():
    """What onnxruntime gives when a listed provider fails to load (CUDA without its libraries): a session on
    the CPU alone, checked against the request."""
    sess = runtime.session(MODEL)
    with pytest.raises(UserError, match="CUDAExecutionProvider could not be created.*CPUExecutionProvider.*--provider"):
        runtime.check_provider(sess, "CUDAExecutionProvider")


AZURE = "AzureExecutionProvider"
needs_azure = pytest.mark.skipif(AZURE not in ort.get_available_providers(),
                                 reason="this onnxruntime build does not list AzureExecutionProvider")


@needs_azure
def test_a_provider_that_runs_no_node_is_refused():
    """Azure is available and created, but runs nothing: every node falls back to the CPU, whose latency would
    be reported under Azure's name."""
    with pytest.raises(UserError, match=f"{AZURE} runs none of the model's 12 nodes"):
        runtime.session(MODEL, AZURE)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # the one-line message is not wrapped
    return subprocess.run([sys.executable, "-m", "onnxecc", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


@pytest.mark.parametrize("provider", ["NoSuchExecutionProvider", pytest.param(AZURE, marks=needs_azure)])
def test_cli_refuses_a_provider_it_cannot_run_on(provider):
    proc = _cli("validate", str(MODEL), str(MODEL), "--provider", provider)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and provider in lines[0] and "--provider" in lines[0], proc.stderr


def test_validate_reports_where_each_model_ran():
    result = validate(MODEL, MODEL)
    nodes = len(onnx.load(MODEL).graph.node)
    assert result.placement == {"original": {"CPUExecutionProvider": nodes},
                                "compressed": {"CPUExecutionProvider": nodes}}
    assert json.loads(json.dumps(result.as_dict()))["placement"] == result.placement


def test_profile_records_where_its_samples_ran(tmp_path):
    from onnxecc.cost.profiler import load_profile, profile

    out = tmp_path / "p.json"
    prof = profile(MODEL, out, samples=2, warmup=0, repeats=1, paired=False)
    expected = {"CPUExecutionProvider": len(onnx.load(MODEL).graph.node)}
    assert prof.placement == expected
    assert json.loads(out.read_text())["placement"] == expected
    assert load_profile(out, MODEL).placement == expected
