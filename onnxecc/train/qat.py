"""Quantization-aware fine-tuning (QAT) for `compress --knobs width,precision` (torch side; the ONNX side — which
layers go int8, measured, and the QDQ model — is `onnxecc.cost.quantize`).

`FakeQuant` / `fake_quantized(tm, layers, x)`: the second half of `compress`'s final fine-tuning runs with the chosen
layers' weights and input activations fake-quantized exactly as `cost.quantize.quantize_layers` will quantize them
(`fake_quant(plan, ...)`, `--qat`, default on; the first half recovers the pruned network in fp32). What QAT does
not model is listed in `cost.quantize.NOT_DONE`.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx

from onnxecc.cost.quantize import CANDIDATE_OPS, named


@contextlib.contextmanager
def fake_quant(plan, tm, enabled: bool = True, epochs: int = 1):
    """Context manager for the final fine-tuning (`epochs`) of `tm` (a `bridge.TorchModel` of the full model) under
    `plan` (a `cost.quantize.PrecisionPlan`, which records what was trained for its `apply` and report):
    QAT of this round's int8 layers (`choose_at`; the full-width choice when it was not called) over the last
    epochs (`qat_start`), yielding the `FakeQuant` (None: `enabled` false, no epoch or no layer chosen) whose
    `epoch_done` the training calls after every epoch."""
    plan.trained, plan.qat_off = epochs > 0, epochs > 0 and not enabled
    plan.qat_epochs = (epochs, epochs - qat_start(epochs))
    layers = plan.measured.chosen if plan.at_widths is None else plan.at_widths
    with fake_quantized(tm, layers if enabled and epochs > 0 else [], plan.calibration_x,
                        qat_start(epochs)) as fq:
        plan.qat = [s.name for s in fq.sites] if fq is not None else None
        if enabled and epochs > 0:  # `apply` quantizes what was trained (a resumed run: the checkpoint's layers)
            plan.at_widths = plan.qat or []
        yield fq


def ort_activation_qparams(rmin: float, rmax: float) -> tuple[np.float32, int]:
    """Scale and zero point onnxruntime gives a uint8 activation with the calibrated range [rmin, rmax]
    (`quant_utils.compute_scale_zp`, asymmetric: the range widened to hold 0, float64, scale stored float32)."""
    lo, hi = min(float(rmin), 0.0), max(float(rmax), 0.0)
    scale = (hi - lo) / 255.0
    if scale < np.finfo(np.float32).tiny:
        return np.float32(1.0), 0
    return np.float32(scale), int(np.clip(np.round(0.0 - lo / scale), 0, 255))


def ort_weight_qparams(weight, axis: int):
    """Per-channel scale (float32 tensor) of a symmetric int8 weight along `axis`, as onnxruntime computes it:
    absmax/127 in float64 (range [-127, 127], zero point 0), 1 for an all-zero channel. Detached: the scale
    follows the weights but gets no gradient (straight-through estimator)."""
    import torch

    dims = [d for d in range(weight.dim()) if d != axis % weight.dim()]
    absmax = weight.detach().abs().amax(dim=dims) if dims else weight.detach().abs()
    scale = (absmax.double() * 2.0 / 254.0).float()
    return torch.where(scale.double() < np.finfo(np.float32).tiny, torch.ones_like(scale), scale)


def fake_quant_weight(weight, axis: int):
    """`weight` as its int8 QDQ dequantizes (per channel along `axis`, symmetric); gradient passes straight
    through (every value is inside the range absmax defines)."""
    import torch

    scale = ort_weight_qparams(weight, axis)
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, axis % weight.dim(), -127, 127)


class _Site:
    """One int8 layer in the torch module: its weight, the weight's output-channel axis, the input range."""

    def __init__(self, name: str, owner, weight, axis: int):
        self.name, self.owner, self.weight, self.axis = name, owner, weight, axis
        self.lo, self.hi = float("inf"), float("-inf")


class FakeQuant:
    """The final fine-tuning of a `bridge.TorchModel` under the quantization `quantize_layers` will apply to
    `layers` (ONNX node names of Conv/Gemm/MatMul): QAT with straight-through gradients.

    Weights: fake-quantized per output channel (symmetric int8, absmax/127 — `ort_weight_qparams`) at every
    forward, from the current fp32 weights; the fp32 weights stay the trained parameters, and onnxruntime later
    quantizes them with the same formula, so the torch forward sees the very weights the QDQ model runs.
    Input activations: per tensor, uint8 asymmetric, with the MinMax range of that tensor over the calibration
    samples in the fp32 model (what onnxruntime's MinMax calibrator measures). The ranges are **recomputed after
    every epoch** (and once before the first), not frozen after the first epoch: onnxruntime calibrates the *final*
    weights, and just after pruning the weights (hence the ranges) still move a lot; with the cosine schedule the
    last epochs barely move them, so training ends on ranges close to the ones the QDQ model gets. A pass over
    the 128 calibration samples costs about one training batch per epoch. (A per-batch moving average would see
    training batches and the fake-quantized model, not the calibrator's fixed samples through the fp32 model.)

    Delayed start (`start_epoch`, see `qat_start`): before it the module runs in fp32. Just after pruning the
    network is broken (resnet18 on digits at 3×32×32, latency 0.5: distillation loss 16–19, 16–40 % training
    accuracy) and ranges taken from it are wrong; fake-quantized from the first epoch it was at 72 % training
    accuracy after 3 epochs where width alone (fp32) was at 96 %, and at latency 0.3 it ended at 51.5 % test
    accuracy against 98.3 % for width alone. So the first epochs recover in fp32 and QAT runs over the last
    ones, from ranges of the recovered network and at the schedule's lower learning rates (the usual QAT recipe:
    start from a converged float model).

    State: each range is two buffers of the layer's module (`qat_act_scale`, `qat_act_zero_point`), so the
    training checkpoint saves them with the weights and a resumed run continues with the ranges of the
    interrupted one (recomputed from the weights at the next epoch boundary, as uninterrupted); under DDP rank 0's
    ranges are broadcast. `remove()` restores the module exactly (forward, hooks and buffers)."""

    SCALE, ZERO = "qat_act_scale", "qat_act_zero_point"

    def __init__(self, tm, layers, calibration_x: np.ndarray, batch: int = 32, start_epoch: int = 0):
        import torch
        from torch import nn

        self.tm, self.x, self.batch = tm, np.ascontiguousarray(calibration_x, dtype=np.float32), batch
        self.observing = False
        self.start_epoch, self.active = start_epoch, start_epoch == 0  # inactive: the module runs in fp32
        self.sites: list[_Site] = []
        self._undo: list = []
        nodes = {n.name: n for n in named(tm.original).graph.node}
        for name in dict.fromkeys(layers):
            node = nodes.get(name)
            if node is None or node.op_type not in CANDIDATE_OPS or len(node.input) < 2 \
                    or node.input[1] not in tm.params:
                raise ValueError(f"no trained weight of layer '{name}' in the torch model")
            qualified = tm.params[node.input[1]]
            owner_name, _, attr = qualified.rpartition(".")
            owner = tm.module.get_submodule(owner_name)
            weight = getattr(owner, attr)
            axis = {"Conv": 0, "Gemm": 0 if _attr_int(node, "transB") else 1}.get(node.op_type, -1)  # output axis
            if tm.layouts.get(node.input[1]) is not None and tm.layouts[node.input[1]].transpose:
                axis = weight.dim() - 1 - axis % weight.dim()  # torch holds Wᵀ (nn.Linear of a transB=0 Gemm)
            site = _Site(name, owner, weight, axis)
            # beside the weight, wherever the module is now (`module.to` moves them with it afterwards)
            owner.register_buffer(self.SCALE, torch.ones((), dtype=torch.float32, device=weight.device))
            owner.register_buffer(self.ZERO, torch.zeros((), dtype=torch.int32, device=weight.device))
            if isinstance(owner, nn.modules.conv._ConvNd) and attr == "weight":
                owner.forward = lambda x, o=owner, s=site: o._conv_forward(self._act(s, x), self._weight(s), o.bias)
            elif isinstance(owner, nn.Linear) and attr == "weight":
                owner.forward = lambda x, o=owner, s=site: torch.nn.functional.linear(self._act(s, x),
                                                                                      self._weight(s), o.bias)
            else:  # a weight onnx2torch passes in as an argument (MatMul: promoted by the bridge)
                self._undo.append(owner.register_forward_pre_hook(
                    lambda mod, args, s=site: (self._act(s, args[0]),
                                               *(self._weight(s) if a is s.weight else a for a in args[1:]))))
            self.sites.append(site)
        if self.sites and self.active:
            self.calibrate()

    def epoch_done(self, epoch: int) -> None:
        """After training epoch `epoch` (1-based): from `start_epoch` on, fake-quantize with ranges recomputed
        now (before it, nothing: the module stays fp32)."""
        if epoch >= self.start_epoch:
            self.active = True
            self.calibrate()

    def _act(self, site: _Site, x):
        import torch

        if self.observing:
            site.lo, site.hi = min(site.lo, float(x.min())), max(site.hi, float(x.max()))
            return x
        if not self.active:
            return x
        scale, zero = getattr(site.owner, self.SCALE), getattr(site.owner, self.ZERO)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)

    def _weight(self, site: _Site):
        return site.weight if self.observing or not self.active else fake_quant_weight(site.weight, site.axis)

    def calibrate(self) -> None:
        """MinMax of every int8 layer's input over the calibration samples, in the fp32 model (fake quantization
        off, eval mode, as onnxruntime's calibrator runs it) → the layers' activation scale and zero point."""
        import torch

        from onnxecc.train import distributed

        if not self.sites:
            return
        module = self.tm.module
        modes = {m: m.training for m in module.modules()}
        device = next(module.parameters()).device
        for s in self.sites:
            s.lo, s.hi = float("inf"), float("-inf")
        self.observing = True
        try:
            module.eval()
            with torch.no_grad():
                for i in range(0, len(self.x), self.batch):
                    module(torch.from_numpy(self.x[i:i + self.batch]).to(device))
        finally:
            self.observing = False
            for m, mode in modes.items():
                m.training = mode
        ranges = distributed.broadcast([(s.lo, s.hi) for s in self.sites])  # every rank: rank 0's ranges
        for s, (lo, hi) in zip(self.sites, ranges):
            scale, zero = ort_activation_qparams(lo, hi)
            getattr(s.owner, self.SCALE).fill_(float(scale))
            getattr(s.owner, self.ZERO).fill_(zero)

    def activation_qparams(self) -> dict[str, tuple[float, int]]:
        """Layer name → (scale, zero point) of its input activation now."""
        return {s.name: (float(getattr(s.owner, self.SCALE)), int(getattr(s.owner, self.ZERO))) for s in self.sites}

    def weights(self) -> dict[str, np.ndarray]:
        """Layer name → its fake-quantized weight (torch layout), what the QDQ model's DequantizeLinear yields."""
        import torch

        with torch.no_grad():
            return {s.name: fake_quant_weight(s.weight, s.axis).cpu().numpy() for s in self.sites}

    def remove(self) -> None:
        for s in self.sites:
            s.owner.__dict__.pop("forward", None)
            s.owner._buffers.pop(self.SCALE, None)
            s.owner._buffers.pop(self.ZERO, None)
        for handle in self._undo:
            handle.remove()
        self.sites, self._undo = [], []


def _attr_int(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def qat_start(epochs: int) -> int:
    """The fine-tuning epoch after which QAT starts (`FakeQuant`'s delayed start): the first half in fp32."""
    return epochs // 2


@contextlib.contextmanager
def fake_quantized(tm, layers, calibration_x: np.ndarray, start_epoch: int = 0):
    """`FakeQuant(tm, layers, calibration_x, start_epoch=...)` while inside (None when `layers` is empty), removed
    on the way out: call its `epoch_done` after every epoch (`MaskedModel.train(on_epoch=...)`)."""
    from onnxecc.train import checkpoint

    ck = checkpoint.current()  # resume: the layers the interrupted run trained (its buffers are in the checkpoint)
    saved = ck.take("qat") if ck is not None else None
    layers = saved["layers"] if saved is not None else list(layers)
    fq = FakeQuant(tm, layers, calibration_x, start_epoch=start_epoch) if layers else None
    if fq is not None and saved is not None:
        fq.active = saved.get("active", True)  # its ranges: the checkpoint's buffers, loaded with the weights
    try:
        with checkpoint.frame("qat", lambda: {"layers": layers, "active": fq is not None and fq.active}):
            yield fq
    finally:
        if fq is not None:
            fq.remove()
