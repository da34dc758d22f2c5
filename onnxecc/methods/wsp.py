"""`compress --method wsp`: energy-constrained unstructured pruning for a known accelerator.

Weighted sparse projection with layer input masking, on the systolic-array energy model of
`onnxecc.cost.hardware`:

1. **projected training** — Adam at a constant step on the distillation loss (`onnxecc.train.finetune`'s loop; its
   hooks carry the projections and the masks' parameter group); every `--proj-interval` batches the model is
   projected onto {E(W, M) ≤ B_t}, B_t decaying geometrically from the current energy to the target B:
   * when the budget does not need input masks (`_Trainer._mask_keep`) — the **weights** only
     (`onnxecc.optimize.sparse_projection`: a knapsack over every weight of every layer, profit V², cost = the energy
     the weight adds); only the conv inputs that are zero on every training sample (e.g. the blank border of
     digit images) are masked, before training — free energy for the weights (`_Trainer.drop_dead_inputs`);
   * when it does — **weights and input masks jointly** (`_Trainer.project_joint`): a learnable mask on the
     input of every conv trains with the weights, and every weight and every mask element is an item of one
     knapsack, cost the energy it adds, profit its saliency ½·F·θ² (F: running mean of the squared loss
     gradient, the empirical Fisher diagonal — the loss increase of zeroing θ, in the same units for a weight
     and an input element), so each projection takes the energy from wherever it costs the least accuracy
     and each layer's kept input fraction follows from it; the weights are then re-projected on their exact
     costs under the new masks. The masks keep their learned values (positive gains, most > 1, zero outside
     the support): rounding them to {0, 1} cost digits_resdw at 0.2 about 0.11 of test accuracy, clamping
     them to [0, 1] 0.15. At the end the weights are projected to the target B;
2. **fine-tune** with both supports (and the mask values) fixed (`onnxecc.train.finetune`, distillation from the
   original model).

Why joint: the former schedule (weights alone to the target plus the masks' expected saving, V² profit, then
a masks phase at a uniform kept fraction per layer) squeezed digits_resdw at 0.2 to ~1k weights while its
inputs were still dense — the V²/c ranking emptied features.5 and the fc down to their minimum supports —
and the network never recovered (test accuracy 0.10 on every seed; now ~0.94). V² is not comparable with a
mask value (a global knapsack over mask elements with profit M², tried earlier, ranked by cost alone and
emptied whole layers); the saliency is comparable across layers and between weights and inputs.

**Minimum support.** Every projection keeps at least `_MIN_WEIGHTS` weights of every layer (its largest |W|
among the weights that meet a kept input) and every mask at least `_MIN_INPUTS` input elements (the live ones:
largest |M·x|, then input power), reserved before the knapsack and paid from its capacity
(`sparse_projection.knapsack(reserved=…)`): a global ranking otherwise empties whole layers near the floor
(digits_resdw at 0.2: the stem conv and the blocks' first convs), which disconnects the network. Their
energy is bounded in the plan (`hardware.min_support_energy`): a budget below floor + that bound
(`Plan.reachable`) is a `UserError` naming it; a trained result at chance level gets a warning.

The trained weights go back into the *original* graph (`onnxecc.train.bridge.write_back`): pruned weights are exact
zeros, input masks become a `Mul` by a constant in front of their conv (new, unique node and tensor names;
every original node keeps its name; the constant is the learned mask — the energy model counts its zeros,
not the one multiply per kept element a non-binary mask adds), and a weight is stored as an ONNX sparse
initializer when that is smaller. The energy is then counted again on the written file
(`hardware.model_energy`). ORT executes such a model densely: no speed-up on CPU/GPU — the energy is the
modelled accelerator's, and the file is smaller.

**Precision** (`--knobs width,precision`, issue #11): every layer that onnxruntime's static quantization takes
runs at the hardware file's 8-bit unit energies (`hardware.Hardware.at_bits`; the caches hold twice as many
values), in the plan, the floor and every projection — so the same budget keeps more weights. Training stays
fp32; the output is the pruned model's layers as int8 QDQ (`onnxecc.cost.quantize.quantize_layers`, MinMax
calibration on `--data`), whose energy is counted again from the file with its int8 layers at 8 bits
(`hardware.dequantized`). All layers go int8 because on the modelled accelerator each one is cheaper at 8 bits
at any sparsity; the report's `precision` section gives the accuracy before and after quantization.
digits_cnn at 0.05 of the 16-bit energy: 0.981 width alone, 0.990 with int8 (3 seeds, bench area `wsp`).

Torch side: imports torch (through the bridge); the ONNX side never imports this module.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxecc.core import atomic
from onnxecc.core.errors import UnsupportedModelError, UserError
from onnxecc.cost import hardware as hwm
from onnxecc.cost.budget import Budget, format_cost
from onnxecc.graph import ingest, runtime
from onnxecc.graph.inputs import graph_inputs, symbolic
from onnxecc.graph.layers import with_static_shapes
from onnxecc.methods.base import Method
from onnxecc.optimize.sparse_projection import knapsack, prefix_by_score, project
from onnxecc.train import checkpoint

DENSE_NOTE = ("onnxruntime executes this model densely (zeros are multiplied like any value): no speed-up on "
              "CPU/GPU; the energy is the modelled accelerator's (hardware file), and the gain on ORT is file size")
_DECAY_SHARE = 0.75  # budgets reach their target after this share of a phase's projections
_MASK_LR_SCALE = 10.0  # masks (values ~1, one per input element): a larger step than the weights
_WEIGHT_SHARE = 0.5  # masks are used when the weights would get less than this share of the budget above the floor
_SMALL_MACS = 50_000_000  # below this many MACs per sample, train on one CPU thread
_FISHER_DECAY = 0.95  # saliency: running mean of g² over about the last 20 batches (joint phase)
_MIN_WEIGHTS = 8  # minimum support: every layer keeps at least this many weights …
_MIN_INPUTS = 8  # … and every masked conv this many input elements (see `_Trainer._reserved_weights`)
PRECISION_BITS = 8  # --knobs width,precision: the width of the int8 (QDQ) layers on the modelled accelerator
PRECISION_NOT_DONE = [
    "which layers go int8: every layer onnxruntime's static quantization can take (all of them save energy on the "
    "modelled accelerator); no per-layer choice by accuracy sensitivity",
    "quantization-aware training: training is fp32, the int8 layers are post-training static quantization",
]


# ------------------------------------------------------------------------------------------------- planning
@dataclass
class Plan:
    """The model, the hardware, the energies (hardware units) and the target of one wsp run."""

    proto: onnx.ModelProto  # dense, as loaded
    shaped: onnx.ModelProto
    hw: hwm.Hardware
    geoms: list[hwm.LayerGeometry]
    start_masks: dict[str, np.ndarray]  # masks already in the model (Mul by a constant before a conv)
    original: float  # E0
    target: float  # B
    floor: float  # every weight zero and every conv input masked
    inputs_full: float  # Σ E_inputs with the starting masks (includes output writes)
    reserve_inputs: float = 0.0  # ≥ what the minimum input supports add to the floor (_MIN_INPUTS per conv)
    reserve_weights: float = 0.0  # ≥ the relaxed energy of the minimum weight supports (_MIN_WEIGHTS per layer)
    bits: dict[str, int] = field(default_factory=dict)  # layer name → data width (absent: hw.bits); see `make_plan`

    def hw_of(self, geom: hwm.LayerGeometry) -> hwm.Hardware:
        """The accelerator as this layer sees it at its bit width (`Hardware.at_bits`)."""
        return self.hw.at_bits(self.bits.get(geom.name))

    @property
    def reachable(self) -> float:
        """The smallest energy the projection reaches: the floor plus every layer's minimum support."""
        return self.floor + self.reserve_inputs + self.reserve_weights

    @property
    def jpu(self) -> float:
        return self.hw.joules_per_unit

    def exact(self, weights: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> list[hwm.LayerEnergy]:
        return [hwm.layer_energy(g, self.hw_of(g), weights[g.weight], masks.get(g.name)) for g in self.geoms]


def make_plan(model: ingest.ModelSource, hardware: str | hwm.Hardware, budget: Budget,
              precision_bits: int | None = None) -> Plan:
    """The energies of one run. `precision_bits` (`--knobs width,precision`): every layer that onnxruntime's
    static quantization can put in QDQ (`int8_layers`) runs at that width — on the modelled accelerator every
    unit energy is lower at 8 bits and the caches hold more values, so each such layer is cheaper at any
    sparsity; what int8 costs is accuracy, which the report measures (fp32 and QDQ accuracy side by side). The
    budget stays relative to the original model at the reference width (`original`); the floor, the minimum
    supports and every projection use the lower widths, so the same budget buys more weights."""
    hw = hardware if isinstance(hardware, hwm.Hardware) else hwm.load_hardware(hardware)
    proto = hwm.densify(ingest.load(model))
    inputs = graph_inputs(proto)
    if len(inputs) != 1 or inputs[0].dtype.kind != "f" or symbolic(proto):  # (a plan of one float input's size)
        kinds = ", ".join(f"{i.name} ({i.dtype}, {list(i.dims)})" for i in inputs)
        raise UnsupportedModelError(f"--method wsp works on one float input of a fixed size; this model takes "
                                    f"{kinds}: not implemented, use --method project or ecc")
    shaped = with_static_shapes(proto)
    geoms = hwm.geometries(proto, shaped)
    if not geoms:
        raise UserError("the model has no compute layers (Conv, Gemm, MatMul): nothing to compress")
    names = [g.weight for g in geoms]
    if len(set(names)) != len(names):
        raise UnsupportedModelError("--method wsp needs one weight tensor per layer (a weight is shared)")
    masks = hwm.input_masks(proto, geoms)
    from onnxecc.graph.graph import Graph

    g = Graph(proto)
    bits = dict.fromkeys(int8_layers(proto, geoms), precision_bits) if precision_bits else {}
    layer_hw = {geom.name: hw.at_bits(bits.get(geom.name)) for geom in geoms}
    original = float(sum(hwm.layer_energy(geom, hw, g.const(geom.weight), masks.get(geom.name)).total
                         for geom in geoms))
    inputs_full = float(sum(hwm.inputs_energy(geom, layer_hw[geom.name], masks.get(geom.name))[0] for geom in geoms))
    floor = reserve_inputs = reserve_weights = 0.0
    for geom in geoms:
        zero_mask = np.zeros(geom.in_shape, dtype=bool) if geom.is_conv else None
        floor += hwm.inputs_energy(geom, layer_hw[geom.name], zero_mask)[0]
        extra_inputs, extra_weights = hwm.min_support_energy(geom, layer_hw[geom.name], _MIN_WEIGHTS, _MIN_INPUTS)
        reserve_inputs += extra_inputs
        reserve_weights += extra_weights
    target_j = budget.resolve(original * hw.joules_per_unit)
    return Plan(proto, shaped, hw, geoms, masks, original, target_j / hw.joules_per_unit, floor, inputs_full,
                reserve_inputs, reserve_weights, bits)


def int8_layers(proto: onnx.ModelProto, geoms: list[hwm.LayerGeometry]) -> list[str]:
    """The layers `onnxecc.cost.quantize.quantize_layers` can put in int8 QDQ (its candidates), in model order."""
    from onnxecc.cost.quantize import candidates

    names = set(candidates(proto))
    return [g.name for g in geoms if g.name in names]


def check_reachable(plan: Plan) -> None:
    """A one-line `UserError` when the budget is below the smallest reachable energy (`Plan.reachable`)."""
    if plan.target < plan.original and plan.target < plan.reachable:
        fmt = lambda units: format_cost(units * plan.jpu, "energy")  # noqa: E731
        raise UserError(f"budget {fmt(plan.target)} is below the smallest reachable modelled energy "
                        f"{fmt(plan.reachable)} ({plan.reachable / plan.original:.1%} of the original "
                        f"{fmt(plan.original)}): every layer keeps at least {_MIN_WEIGHTS} weights and every conv "
                        f"{_MIN_INPUTS} input elements so that no layer is disconnected, and output writes and "
                        f"dense-layer inputs remain")


def _check_options(budget: Budget, opts) -> None:
    if opts.metric != "energy" or budget.metric != "energy":
        raise UserError("--method wsp optimises the modelled energy of a known accelerator: use --metric energy "
                        "with --hardware profiles/eyeriss.json (or your own description)")
    if not opts.hardware:
        raise UserError("--method wsp needs --hardware H.json (an accelerator description, e.g. "
                        "profiles/eyeriss.json)")
    if getattr(opts, "proj_interval", 10) < 1:
        raise UserError("--proj-interval must be ≥ 1 (batches between projections)")
    if "precision" in tuple(getattr(opts, "knobs", ("width",))) and not opts.data:
        raise UserError("--knobs precision calibrates the int8 layers on data: pass --data (digits or FILE.npz)")


def _precision_bits(hw: hwm.Hardware, opts) -> int | None:
    """`PRECISION_BITS` with `--knobs width,precision` (the hardware file must give that width's energies)."""
    if "precision" not in tuple(getattr(opts, "knobs", ("width",))):
        return None
    if PRECISION_BITS not in hw.widths:
        raise UserError(f"--knobs precision with --method wsp runs int8 layers at the hardware file's "
                        f"{PRECISION_BITS}-bit unit energies, and {hw.source} has none: add \"unit_energy_by_bits\": "
                        f"{{\"{PRECISION_BITS}\": {{\"mac\": …, \"rf\": …, \"cache\": …, \"dram\": …}}}} "
                        "(see profiles/eyeriss.json)")
    return PRECISION_BITS


def quantize_output(model: onnx.ModelProto, plan: Plan, data) -> onnx.ModelProto:
    """The trained, pruned model with `plan.bits`' layers in int8 QDQ (`onnxecc.cost.quantize.quantize_layers`,
    MinMax calibration on the first training samples). Quantization keeps every zero weight and mask element
    an exact zero (symmetric int8 weights; a zero point represents 0 exactly), and may round more weights to 0:
    the energy counted on the file is at most the plan's."""
    from onnxecc.cost.quantize import CALIBRATION_SAMPLES, quantize_layers

    return quantize_layers(model, np.asarray(data.x_train[:CALIBRATION_SAMPLES], dtype=np.float32),
                           [name for name, b in plan.bits.items() if b == PRECISION_BITS])


# ------------------------------------------------------------------------------------------------- training
@dataclass
class _LayerState:
    geom: hwm.LayerGeometry
    param: object  # torch.nn.Parameter (torch layout)
    transpose: bool  # torch = ONNXᵀ
    module: object | None = None  # the module whose input the mask multiplies
    hw: hwm.Hardware | None = None  # the accelerator at this layer's bit width (`Plan.hw_of`)
    mask: object | None = None  # torch.nn.Parameter (1, c, h, w) / (1, c, w)
    hook: object | None = None
    fisher_w: object | None = None  # torch tensors: running mean of the squared loss gradient (weight, mask)
    fisher_m: object | None = None

    def onnx_weight(self) -> np.ndarray:
        w = self.param.detach().cpu().numpy()
        return np.ascontiguousarray(w.T if self.transpose else w)

    def to_torch_layout(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.T if self.transpose else a)

    def mask_support(self) -> np.ndarray | None:
        if self.mask is None:
            return None
        return (self.mask.detach().cpu().numpy() != 0).reshape(self.geom.in_shape)


@dataclass
class TrainOutcome:
    weights: dict[str, np.ndarray]  # ONNX layout, pruned entries exact zeros
    masks: dict[str, np.ndarray]  # layer name → (c, h, w) mask, only where not full: boolean, or the learned
    # values (zero outside the support) after a joint phase
    model: onnx.ModelProto  # trained weights in the original graph (no masks yet)
    energy: list[hwm.LayerEnergy]
    history: list[dict] = field(default_factory=list)
    mask_keep: float = 1.0


class _Structure:
    """`_Trainer`'s model structure: the input-mask modules of the convs, installed, frozen and read back (state
    from `_Trainer.__init__`)."""

    def _input_module(self, qualified: str):
        """The module that receives the conv's input (a padded conv sits in a Sequential after its Pad)."""
        owner_name = qualified.rpartition(".")[0]
        owner = self.tm.module.get_submodule(owner_name)
        parent_name = owner_name.rpartition(".")[0]
        if parent_name:
            parent = self.tm.module.get_submodule(parent_name)
            if isinstance(parent, self.torch.nn.Sequential):
                return parent
        return owner

    def _mask_keep(self, mask_keep: float | None) -> float:
        """Below 1 when the budget needs input masks: the kept fraction of the conv inputs that would leave the
        weights `_WEIGHT_SHARE` of what the budget leaves above the floor (1.0 — no masks, only the dead inputs
        — when dense inputs leave them that anyway). It decides whether there is a joint phase; the joint
        projection then sets each layer's kept fraction itself (after training: the kept fraction of all conv
        input elements). digits_cnn needs no masks at 0.2 or 0.4, digits_resdw needs them at both."""
        plan = self.plan
        maskable = plan.inputs_full - plan.floor
        if maskable <= 0:
            return 1.0
        if mask_keep is not None:
            return float(min(1.0, max(0.0, mask_keep)))
        return float(min(1.0, (1.0 - _WEIGHT_SHARE) * (plan.target - plan.floor) / maskable))

    def install_masks(self) -> None:
        torch = self.torch
        for s in self.states:
            if not s.geom.is_conv:
                continue
            c, h, w = s.geom.in_shape
            shape = (1, c, h, w) if len(s.geom.weight_shape) == 4 else (1, c, w)
            start = self.plan.start_masks.get(s.geom.name)
            value = torch.ones(shape) if start is None else torch.from_numpy(start.astype(np.float32)).reshape(shape)
            s.mask = torch.nn.Parameter(value)
            s.module.register_parameter("wsp_input_mask", s.mask)
            s.module.register_buffer("wsp_input_power", torch.zeros(shape))
            s.module.wsp_input_seen = 0
            s.hook = s.module.register_forward_pre_hook(_mask_hook)

    def freeze_masks(self) -> None:
        for s in self.states:
            if s.mask is not None:
                if not self.joint:
                    with self.torch.no_grad():
                        s.mask.copy_((s.mask != 0).to(s.mask.dtype))
                s.mask.requires_grad_(False)

    def drop_dead_inputs(self) -> None:
        """Mask (frozen) every conv input element that is exactly zero on every training sample (e.g. the blank
        border of digit images): it costs energy on the accelerator and changes no output on the training
        data, so the weights get its energy. One pass over the training data, no gradients."""
        torch = self.torch
        self.install_masks()
        module = self.tm.module
        module.eval()  # the rest of the model as in inference; the masks' hooks record the inputs' power
        for s in self.states:
            if s.mask is not None:
                s.module.training = True
        xs = torch.as_tensor(self.data.x_train, dtype=torch.float32)
        with torch.no_grad():
            for i in range(0, len(xs), 256):
                module(xs[i:i + 256])
        for s in self.states:
            if s.mask is not None:
                s.module.training = False
        self.project_masks(1.0)  # keeps every element whose input power is > 0
        self.freeze_masks()


class _Projections:
    """`_Trainer`'s projections: weights, input masks, or both jointly onto the energy budget, and the final one
    (state from `_Trainer.__init__`)."""

    def masks_now(self) -> dict[str, np.ndarray]:
        out = {}
        for s in self.states:
            support = s.mask_support() if s.mask is not None else self.plan.start_masks.get(s.geom.name)
            if support is not None and not support.all():
                out[s.geom.name] = support
        return out

    def project_weights(self, budget: float) -> dict:
        """Project every weight onto {E ≤ budget} given the current input masks; returns the exact energy."""
        torch = self.torch
        masks = self.masks_now()
        fixed = sum(hwm.inputs_energy(s.geom, s.hw, masks.get(s.geom.name))[0] for s in self.states)
        capacity = budget - fixed
        values, costs, scores, reserved = [], [], [], []
        for s in self.states:
            w = s.onnx_weight()
            mask = masks.get(s.geom.name)
            cost = hwm.weight_costs(s.geom, s.hw, mask, score=np.square(w))
            values.append(self._weight_profit(s, w).reshape(-1))
            costs.append(cost.reshape(-1))
            scores.append(np.abs(w).reshape(-1))
            reserved.append(self._reserved_weights(s, w, mask))
        v, c, r = np.concatenate(values), np.concatenate(costs), np.concatenate(reserved)
        if self.order == "wsp":
            keep = knapsack(v, c, capacity, reserved=r)
        else:  # global magnitude pruning cut at the same energy (same minimum support)
            keep = prefix_by_score(np.concatenate(scores), c, capacity, reserved=r)
        offset = 0
        for s in self.states:
            n = s.geom.weight_size
            k = s.to_torch_layout(keep[offset:offset + n].reshape(s.geom.weight_shape))
            offset += n
            with torch.no_grad():
                s.param.mul_(torch.from_numpy(k).to(s.param.device, s.param.dtype))
        return self.energy()

    def _weight_profit(self, s: _LayerState, w: np.ndarray) -> np.ndarray:
        """A weight's profit in the knapsack (ONNX layout, float64): W² — the projection's ‖W − V‖² — or, in the
        joint projection, its saliency F·W² (`_saliency_step`)."""
        w2 = np.square(w.astype(np.float64))
        if not self.joint or s.fisher_w is None:
            return w2
        return w2 * s.to_torch_layout(s.fisher_w.detach().cpu().numpy().astype(np.float64))

    def project_joint(self, budget: float) -> dict:
        """Weights and input elements in one knapsack under {E ≤ budget}: profit the saliency F·θ² of each
        (`_saliency_step`), cost the relaxed energy it adds (the MACs of a weight–input pair split half to each, so
        the sum bounds the exact energy from above); each layer keeps its minimum supports. The masks are set
        from its answer, then the weights are projected again on the exact costs under the new masks
        (`project_weights`), which fills what the relaxation left."""
        masks = self.masks_now()
        profits, costs, reserved, spans = [], [], [], []
        fixed = 0.0
        for s in self.states:
            w = s.onnx_weight()
            mask = masks.get(s.geom.name)
            half_macs = 0.5 * s.hw.e_mac * s.geom.weight_uses(mask).astype(np.float64)
            cost = hwm.weight_costs(s.geom, s.hw, mask, score=np.square(w)) - half_macs
            profits.append(self._weight_profit(s, w).reshape(-1))
            costs.append(cost.reshape(-1))
            reserved.append(self._reserved_weights(s, w, mask))
            if s.mask is None:
                fixed += hwm.inputs_energy(s.geom, s.hw, mask)[0]
                continue
            m = s.mask.detach().cpu().numpy().reshape(-1).astype(np.float64)
            f = np.ones_like(m) if s.fisher_m is None else \
                s.fisher_m.detach().cpu().numpy().reshape(-1).astype(np.float64)
            _, macs = s.geom.element_uses(w)
            cost = hwm.mask_costs(s.geom, s.hw, w, score=m * m * f).reshape(-1) \
                - 0.5 * s.hw.e_mac * macs.reshape(-1)
            spans.append((s, sum(p.size for p in profits), m.size))
            profits.append(f * m * m)
            costs.append(cost)
            reserved.append(self._top_inputs(s, _MIN_INPUTS / m.size))
            fixed += hwm.inputs_energy(s.geom, s.hw, np.zeros(s.geom.in_shape, dtype=bool))[0]
        keep = knapsack(np.concatenate(profits), np.maximum(np.concatenate(costs), 0.0), budget - fixed,
                        reserved=np.concatenate(reserved))
        for s, start, n in spans:
            self._apply_inputs(s, keep[start:start + n])
        return self.project_weights(budget)

    @staticmethod
    def _reserved_weights(s: _LayerState, w: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """The layer's minimum support (flat, ONNX layout): its `_MIN_WEIGHTS` largest |W| among the weights that
        meet a kept input element (then the others). The global knapsack ranks weights by V²/c across layers
        and, at budgets near the floor, empties whole layers — the stem conv, the first conv of a block — which
        disconnects the network (digits_resdw at 0.2 fell to chance). Reserved before the knapsack, this keeps
        a path through every layer; with `_MIN_INPUTS` kept inputs per conv (`_top_inputs`) each layer passes a
        signal. Its energy is bounded in the plan (`Plan.reachable`)."""
        n = s.geom.weight_size
        k = min(_MIN_WEIGHTS, n)
        magnitude = np.abs(w.reshape(-1)).astype(np.float64)
        live = s.geom.weight_uses(mask).reshape(-1) > 0
        order = np.lexsort((-magnitude, ~live))  # live weights first, each part by |W| descending (stable)
        keep = np.zeros(n, dtype=bool)
        keep[order[:k]] = True
        return keep

    def project_masks(self, keep_fraction: float) -> None:
        """Clamp the masks to [0, 1] and keep, in every masked layer, the `keep_fraction` of its input elements
        with the largest |M·x| (x: RMS of the element's input over the batches seen); elements whose masked
        input is always zero are dropped in any case (they cost energy and change nothing)."""
        torch = self.torch
        for s in self.states:
            if s.mask is None:
                continue
            with torch.no_grad():
                s.mask.clamp_(0.0, 1.0)
                self._apply_inputs(s, self._top_inputs(s, keep_fraction))

    def _top_inputs(self, s: _LayerState, keep_fraction: float) -> np.ndarray:
        """The `keep_fraction` of the layer's input elements with the largest |M·x| (none whose score is 0), and
        at least the minimum support of `_MIN_INPUTS`: filled, when the score leaves fewer, by input power
        (live inputs first, even where the mask went to 0 — `_apply_inputs` revives those)."""
        m = s.mask.detach().cpu().numpy().reshape(-1).astype(np.float64)
        power = s.module.wsp_input_power.detach().cpu().numpy().reshape(-1) if s.module.wsp_input_seen else \
            np.ones_like(m)
        score = m * m * power
        k = int(math.ceil(keep_fraction * m.size - 1e-9))
        order = np.argsort(-score, kind="stable")[:k]
        keep = np.zeros(m.size, dtype=bool)
        keep[order] = True
        keep &= score > 0
        short = min(_MIN_INPUTS, m.size) - int(keep.sum())
        if short > 0:
            rest = np.flatnonzero(~keep)
            keep[rest[np.argsort(-power[rest], kind="stable")[:short]]] = True
        return keep

    def _apply_inputs(self, s: _LayerState, keep: np.ndarray) -> None:
        """Zero the mask outside `keep`; kept elements whose mask value is 0 (minimum support) restart at 1."""
        torch = self.torch
        k = torch.from_numpy(keep).reshape(s.mask.shape).to(s.mask.device)
        with torch.no_grad():
            s.mask.mul_(k.to(s.mask.dtype))
            s.mask.masked_fill_(k & (s.mask == 0), 1.0)

    def energy(self) -> dict:
        layers = self.plan.exact({s.geom.weight: s.onnx_weight() for s in self.states}, self.masks_now())
        return {"total": float(sum(e.total for e in layers)),
                "nnz": int(sum(e.nnz_weights for e in layers)),
                "inputs_kept": int(sum(e.nnz_inputs for e in layers))}


class _FinalPhase:
    """`_Trainer`'s last phase: the final projection, masks repaired where it emptied them, fine-tuning with the
    support fixed, and the outcome written back into the ONNX graph (state from `_Trainer.__init__`)."""

    def project_final(self) -> None:
        """Project the weights to the target (the masks are fixed by now); shrink the masks first if the inputs and
        the minimum weight supports would leave the other weights less than a tenth of what the budget leaves
        above the smallest reachable energy (`Plan.reachable`)."""
        plan = self.plan
        masks = self.masks_now()
        inputs = sum(hwm.inputs_energy(s.geom, s.hw, masks.get(s.geom.name))[0] for s in self.states)
        slack = plan.target - plan.reachable
        if plan.target - inputs - plan.reserve_weights < 0.1 * slack:
            if not any(s.mask is not None for s in self.states):
                self.install_masks()
            self._repair_masks(plan.floor + plan.reserve_inputs + 0.5 * slack)
            self.freeze_masks()
        for shrink in (1.0, 1 - 1e-9, 1 - 1e-6, 1 - 1e-3):
            info = self.project_weights(plan.target * shrink)
            if info["total"] <= plan.target:
                return
        raise RuntimeError(f"internal error: projection left {info['total']} > {plan.target} energy units")

    def _repair_masks(self, allowed_inputs: float) -> None:
        """Shrink every layer's mask to the same kept fraction of its current support (bisection) until the
        input energy is ≤ allowed_inputs."""
        torch = self.torch
        states = [s for s in self.states if s.mask is not None]
        start = {id(s): s.mask.detach().clone() for s in states}

        def apply(fraction: float) -> float:
            for s in states:
                with torch.no_grad():
                    s.mask.copy_(start[id(s)])
                self._apply_inputs(s, self._top_inputs(s, fraction * float((start[id(s)] != 0).float().mean())))
            masks = self.masks_now()
            return sum(hwm.inputs_energy(s.geom, s.hw, masks.get(s.geom.name))[0] for s in self.states)

        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if apply(mid) <= allowed_inputs:
                lo = mid
            else:
                hi = mid
        apply(lo)

    def _finetune(self, epochs: int, teacher: np.ndarray) -> None:
        torch = self.torch
        from onnxecc.train.finetune import Mask, TrainConfig, finetune, training_lr

        opts = self.opts
        if self._phase != "finetune":  # else resumed in it (`_restore`): the supports and start step saved then
            self._phase, self._loop_start = "finetune", (self._step, len(self.history))
            self._weight_masks = [(s.param.detach() != 0).cpu() for s in self.states]
        weight_masks = [Mask(s.param, m.to(s.param.device, s.param.dtype)) for s, m in
                        zip(self.states, self._weight_masks, strict=True)]
        config = TrainConfig(epochs=epochs, lr=training_lr(opts.lr), batch_size=opts.batch_size, seed=opts.seed + 1,
                             temperature=opts.temperature, distill_weight=opts.distill_weight, device=opts.device,
                             phase="wsp finetune")
        offset = self._loop_start[0]

        def on_batch(step, total):
            self.emit("batch", {"step": offset + step, "total": self._total_steps, "epochs": opts.epochs})

        def on_epoch(log):
            self.emit("epoch", {**log.__dict__, "phase": "finetune", "epochs": epochs})

        history = finetune(self.tm.module, self.data.x_train, teacher, self.data.y_train, config, weight_masks,
                           on_epoch=on_epoch, on_batch=on_batch, on_recovery=self._recovered)
        with torch.no_grad():
            for m in weight_masks:
                m.param.mul_(m.mask.cpu())
        self.history.extend({"phase": "finetune", **e} for e in history.as_dict())

    def outcome(self) -> TrainOutcome:
        from onnxecc.train.bridge import write_back

        weights = {s.geom.weight: s.onnx_weight() for s in self.states}
        masks = self.masks_now()
        if self.joint:  # the learned values (zero outside the support)
            for s in self.states:
                if s.geom.name in masks and s.mask is not None:
                    masks[s.geom.name] = s.mask.detach().cpu().numpy().reshape(s.geom.in_shape).copy()
        for s in self.states:  # write_back reads parameters: take the hooks and masks away first
            if s.hook is not None:
                s.hook.remove()
                s.hook = None
        model = write_back(self.tm)
        return TrainOutcome(weights, masks, model, self.plan.exact(weights, masks), self.history, self.mask_keep)


class _Trainer(_Structure, _Projections, _FinalPhase):
    """Projection-interleaved training on a converted model (see the module docstring): the training loops here,
    the phases they call in `_Structure`, `_Projections` and `_FinalPhase`."""

    def __init__(self, plan: Plan, data, opts, emit, *, order: str = "wsp", use_masks: bool = True,
                 mask_keep: float | None = None):
        import torch

        from onnxecc.train.bridge import to_torch

        check_reachable(plan)
        self.torch = torch
        self.plan, self.hw, self.data, self.opts, self.emit = plan, plan.hw, data, opts, emit
        self.order = order
        self.joint = False  # weights and input masks projected together (`project_joint`)
        self.tm = to_torch(plan.proto)
        self.states: list[_LayerState] = []
        for geom in plan.geoms:
            qualified = self.tm.params.get(geom.weight)
            tensor = self.tm.parameter(geom.weight) if qualified else None
            if not isinstance(tensor, torch.nn.Parameter):
                raise UnsupportedModelError(f"the weight of {geom.op} '{geom.name}' is not trainable in torch")
            layout = self.tm.layouts.get(geom.weight)
            self.states.append(_LayerState(geom, tensor, bool(layout and layout.transpose),
                                           self._input_module(qualified) if geom.is_conv else None,
                                           hw=plan.hw_of(geom)))
        self.history: list[dict] = []
        self.use_masks = use_masks and data is not None and opts.epochs > 0
        self.mask_keep = self._mask_keep(mask_keep) if self.use_masks else 1.0
        if not self.use_masks and plan.target < plan.inputs_full + plan.reserve_weights:
            need = "pass --data so input masks can be learned" if data is None or opts.epochs == 0 else \
                "input masks are off"
            raise UserError(f"the budget is below the modelled energy of the layer inputs alone plus every layer's "
                            f"minimum of {_MIN_WEIGHTS} weights "
                            f"({format_cost((plan.inputs_full + plan.reserve_weights) * plan.jpu, 'energy')}): {need}")

    # -- loops ------------------------------------------------------------------------------------------
    def run(self) -> TrainOutcome:
        torch = self.torch
        threads = torch.get_num_threads()
        if sum(g.weight_size * g.positions for g in self.plan.geoms) < _SMALL_MACS:
            torch.set_num_threads(1)  # tiny layers: threads cost more in synchronisation than they give
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> TrainOutcome:
        plan, opts = self.plan, self.opts
        if self.data is None or opts.epochs == 0:
            self.project_final()
            return self.outcome()
        epochs = opts.epochs
        # masks not needed by the budget (see _mask_keep): no mask learning — weights only, then fine-tuning —
        # and only the inputs that are zero on every training sample are masked
        dead_only = self.use_masks and self.mask_keep >= 1.0
        e_w = max(1, round(0.4 * epochs))
        e_m = max(1, round(0.3 * epochs)) if self.use_masks and not dead_only and epochs >= 2 else 0
        e_f = max(0, epochs - e_w - e_m)
        if not self.use_masks or e_m == 0:
            self.use_masks, self.mask_keep = False, 1.0
        teacher = runtime.run_batched(runtime.session(plan.proto), self.data.x_train)
        self.emit("plan", {"epochs": epochs})
        self.emit("stage", {"name": "finetune", "epochs": epochs})
        self._total_steps = epochs * max(1, math.ceil(len(self.data.x_train) / opts.batch_size))
        self._step = 0
        # interrupt and resume (issue 9): the phase and the trainer's state (`_state`); the weights, the mask
        # parameters and the input power (module state), Adam and the batch position come back from the loop
        ck = checkpoint.current()
        saved = ck.take("wsp") if ck is not None else None
        self._phase, self._current, self._loop_start, self._done, self._weight_masks = None, None, None, 0, None
        with checkpoint.frame("wsp", self._state):
            if saved is not None:
                self._restore(saved)
            else:
                if dead_only:
                    self.drop_dead_inputs()
                self._current = self.energy()["total"]
            current = self._current
            if saved is None or saved["phase"] in ("joint", "weights"):
                if e_m:  # weights and input masks together, one decaying budget (see the module docstring)
                    if saved is None:
                        self.joint = True
                        self.install_masks()
                    self._loop("joint", e_w + e_m, teacher, lambda t: _geometric(current, plan.target, t))
                    self.freeze_masks()
                    self.mask_keep = self._kept_fraction()
                else:
                    self._loop("weights", e_w, teacher, lambda t: _geometric(current, plan.target, t))
                self.project_final()
            if e_f:
                self._finetune(e_f, teacher)
        return self.outcome()

    def _state(self) -> dict:
        """What an interrupted `_run` needs besides the training loop's own state (see `_restore`)."""
        return {"phase": self._phase, "current": self._current, "step": self._step, "history": self.history,
                "joint": self.joint, "use_masks": self.use_masks, "mask_keep": self.mask_keep,
                "loop_start": self._loop_start, "done": self._done, "weight_masks": self._weight_masks,
                "layers": [{"mask": s.mask is not None,
                            "mask_trained": bool(s.mask is not None and s.mask.requires_grad),
                            "seen": int(getattr(s.module, "wsp_input_seen", 0)) if s.mask is not None else 0,
                            "fisher_w": s.fisher_w, "fisher_m": s.fisher_m} for s in self.states]}

    def _restore(self, saved: dict) -> None:
        """Back to the state `_state` saved: masks installed (their values and input power come back with the
        module's state in the loop), flags, counters, running Fisher averages and history."""
        if any(layer["mask"] for layer in saved["layers"]):
            self.install_masks()
        for s, layer in zip(self.states, saved["layers"], strict=True):
            if s.mask is not None:
                if not layer["mask"]:
                    raise UserError("the checkpoint does not match this --method wsp run: start over without --resume")
                s.mask.requires_grad_(layer["mask_trained"])
                s.module.wsp_input_seen = layer["seen"]
            s.fisher_w, s.fisher_m = layer["fisher_w"], layer["fisher_m"]
        self.history[:] = saved["history"]
        self._phase, self._current, self._step = saved["phase"], saved["current"], saved["step"]
        self.joint, self.use_masks, self.mask_keep = saved["joint"], saved["use_masks"], saved["mask_keep"]
        self._loop_start = tuple(saved["loop_start"]) if saved["loop_start"] is not None else None
        self._done, self._weight_masks = saved["done"], saved["weight_masks"]

    def _kept_fraction(self) -> float:
        masked = [s for s in self.states if s.mask is not None]
        total = sum(s.geom.input_size for s in masked)
        return float(sum(int(s.mask_support().sum()) for s in masked) / total) if total else 1.0

    def _saliency_step(self) -> None:
        """After every optimizer step of the joint phase: the running mean (EMA) of g² per weight and mask element,
        the diagonal of the empirical Fisher; ½·F·θ² estimates the loss increase of setting θ to zero."""
        torch = self.torch
        with torch.no_grad():
            for s in self.states:
                for attr, param in (("fisher_w", s.param), ("fisher_m", s.mask)):
                    if param is None or param.grad is None:
                        continue
                    acc = getattr(s, attr)
                    g2 = param.grad.detach().square()
                    if acc is not None and acc.device != g2.device:  # a resumed run's averages come back on the CPU
                        acc = acc.to(g2.device)
                        setattr(s, attr, acc)
                    if acc is None:
                        setattr(s, attr, g2.clone())
                    else:
                        acc.mul_(_FISHER_DECAY).add_(g2, alpha=1.0 - _FISHER_DECAY)

    def _loop(self, phase: str, epochs: int, teacher: np.ndarray, schedule) -> None:
        """`onnxecc.train.finetune` at a constant learning rate (the masks, if any, in their own Adam group at a larger
        step); every proj_interval batches and after the last one the weights — in the joint phase the weights
        and the masks (`project_joint`) — are projected to the budget `schedule(t)` returns (t: 0 → 1 over the
        first `_DECAY_SHARE` of the phase's projections)."""
        from onnxecc.train.finetune import TrainConfig, finetune, training_lr

        opts, data = self.opts, self.data
        masks = [s for s in self.states if s.mask is not None and s.mask.requires_grad]
        per_epoch = max(1, math.ceil(len(data.x_train) / opts.batch_size))
        interval = max(1, int(getattr(opts, "proj_interval", 10)))
        decay = max(1, int(_DECAY_SHARE * max(1, (per_epoch * epochs) // interval)))
        if self._phase == phase:  # resumed inside this loop (`_restore`): its start and projections so far
            offset, start = self._loop_start
        else:
            offset, start = self._step, len(self.history)
            self._phase, self._loop_start, self._done = phase, (offset, start), 0
        lr = training_lr(opts.lr)
        config = TrainConfig(epochs=epochs, lr=lr, batch_size=opts.batch_size, temperature=opts.temperature,
                             distill_weight=opts.distill_weight, device=opts.device, lr_schedule="constant",
                             seed=opts.seed + start, shuffle_seed=opts.seed + 7 * start, phase=f"wsp {phase}")

        def after_step(step: int, total: int) -> None:
            if self.joint:
                self._saliency_step()
            if step % interval and step < total:
                return
            self._done += 1
            budget = schedule(min(1.0, self._done / decay))
            info = self.project_joint(budget) if self.joint else self.project_weights(budget)
            self.history.append({"phase": phase, "step": offset + step, "budget": budget * self.plan.jpu,
                                 "energy": info["total"] * self.plan.jpu, "nnz": info["nnz"],
                                 "mask_keep": self._kept_fraction() if self.joint else None})

        def on_batch(step: int, total: int) -> None:
            self._step = offset + step
            self.emit("batch", {"step": self._step, "total": self._total_steps, "epochs": opts.epochs})

        finetune(self.tm.module, data.x_train, teacher, data.y_train, config,
                 on_epoch=lambda log: self.emit("epoch", {**log.__dict__, "phase": phase, "epochs": epochs}),
                 on_batch=on_batch, after_step=after_step, on_recovery=self._recovered,
                 param_groups=[{"params": [s.mask for s in masks], "lr": lr * _MASK_LR_SCALE}] if masks else ())

    def _recovered(self, record: dict) -> None:
        """A non-finite step undone by the training loop (`onnxecc.train.guard`): into the history, and told."""
        self.history.append(record)
        self.emit("recovery", record)


def _mask_hook(module, args):
    x = args[0]
    if module.training:  # running mean of the input's power per element: the masks' importance
        with torch_no_grad():
            seen = module.wsp_input_seen
            power = x.detach().square().mean(dim=0, keepdim=True)
            module.wsp_input_power.mul_(seen / (seen + 1)).add_(power / (seen + 1))
            module.wsp_input_seen = seen + 1
    return (x * module.wsp_input_mask,) + tuple(args[1:])


def torch_no_grad():
    import torch

    return torch.no_grad()


def _geometric(start: float, end: float, t: float) -> float:
    """start → end geometrically as t goes 0 → 1 (linear if either is ≤ 0)."""
    t = min(1.0, max(0.0, t))
    if start <= 0 or end <= 0:
        return start + (end - start) * t
    return float(start * (end / start) ** t)


# ------------------------------------------------------------------------------------------------- writing
def insert_input_masks(model: onnx.ModelProto, plan: Plan, masks: dict[str, np.ndarray]) -> list[str]:
    """Put `Mul(input, constant mask)` in front of each masked conv (in place); returns the new node names."""
    graph = model.graph
    taken_nodes = {n.name for n in graph.node}
    taken_tensors = {t.name for t in graph.initializer} | {i.name for i in graph.input} | \
        {o for n in graph.node for o in n.output} | {i for n in graph.node for i in n.input}
    by_name = {g.name: g for g in plan.geoms}
    new_nodes = []
    for name, support in masks.items():
        geom = by_name[name]
        if name in plan.start_masks and np.array_equal(plan.start_masks[name], support):
            continue  # the model's own mask Mul is still there
        index = _node_index(graph, geom)
        node = graph.node[index]
        c, h, w = geom.in_shape
        shape = (1, c, h, w) if len(geom.weight_shape) == 4 else (1, c, w)
        dtype = _tensor_dtype(plan.shaped, node.input[0])
        base = (node.name or node.output[0]).strip("/").replace("/", "_") or "conv"
        const_name = _unique(f"{base}_wsp_input_mask", taken_tensors)
        out_name = _unique(f"{node.input[0]}_wsp_masked", taken_tensors)
        node_name = _unique(f"{node.name or base}_wsp_input_mask", taken_nodes)
        graph.initializer.append(numpy_helper.from_array(support.reshape(shape).astype(dtype), const_name))
        if model.ir_version < 4:
            graph.input.append(onnx.helper.make_tensor_value_info(const_name, onnx.helper.np_dtype_to_tensor_dtype(
                np.dtype(dtype)), list(shape)))
        mul = onnx.helper.make_node("Mul", [node.input[0], const_name], [out_name], name=node_name)
        node.input[0] = out_name
        graph.node.insert(index, mul)
        new_nodes.append(node_name)
    return new_nodes


def _node_index(graph: onnx.GraphProto, geom: hwm.LayerGeometry) -> int:
    for i, node in enumerate(graph.node):
        if node.op_type == geom.op and len(node.input) > 1 and node.input[1] == geom.weight \
                and (node.name or node.output[0]) == geom.name:
            return i
    raise RuntimeError(f"cannot find layer '{geom.name}' in the output graph")


def _tensor_dtype(shaped: onnx.ModelProto, name: str) -> np.dtype:
    for vi in list(shaped.graph.input) + list(shaped.graph.value_info) + list(shaped.graph.output):
        if vi.name == name and vi.type.tensor_type.elem_type:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
    return np.dtype(np.float32)


def _unique(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def sparsify(model: onnx.ModelProto, names: list[str]) -> dict:
    """Store each named initializer as a sparse initializer where that is smaller (in place).

    Returns {"converted": [...], "dense_bytes": …, "sparse_bytes": …} over the named tensors."""
    graph = model.graph
    listed = {i.name for i in graph.input}
    by_name = {t.name: t for t in graph.initializer}
    converted, dense_bytes, sparse_bytes = [], 0, 0
    for name in dict.fromkeys(names):
        tensor = by_name.get(name)
        if tensor is None or name in listed:
            continue
        value = numpy_helper.to_array(tensor)
        size = tensor.ByteSize()
        dense_bytes += size
        flat = value.reshape(-1)
        idx = np.flatnonzero(flat).astype(np.int64)
        sparse = onnx.helper.make_sparse_tensor(numpy_helper.from_array(flat[idx], name),
                                                numpy_helper.from_array(idx, f"{name}_indices"), list(value.shape))
        if sparse.ByteSize() < size:
            graph.initializer.remove(tensor)
            graph.sparse_initializer.append(sparse)
            converted.append(name)
            sparse_bytes += sparse.ByteSize()
        else:
            sparse_bytes += size
    return {"converted": converted, "dense_bytes": dense_bytes, "sparse_bytes": sparse_bytes}


def _weight_initializers(model: onnx.ModelProto, plan: Plan) -> list[str]:
    """The initializers holding the layers' weights: in a QDQ model, an int8 layer's is the integer tensor its
    weight's DequantizeLinear reads."""
    from onnxecc.graph.graph import Graph

    g = Graph(model)
    inits = {t.name for t in model.graph.initializer}
    dq = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and dq.get(node.input[1]) in inits:
            out.append(dq[node.input[1]])
    return out + [g.weight_source(geom.weight) for geom in plan.geoms if geom.weight in g.producer or
                  geom.weight in inits]


def _accuracy(model: onnx.ModelProto, data) -> float | None:
    """Test accuracy of `model` in onnxruntime (None without labelled test data)."""
    if data is None or not len(data.x_test) or data.y_test is None:
        return None
    logits = runtime.run_batched(runtime.session(model), data.x_test)
    return float((logits.argmax(1) == data.y_test).mean())


# ------------------------------------------------------------------------------------------------- compress
def compress_wsp(model: ingest.ModelSource, budget: Budget, output, options, report, emit):
    """`compress --method wsp --metric energy --hardware H.json` (see the module docstring)."""
    from onnxecc.core.recipe import as_dict as recipe_of
    from onnxecc.graph.metadata import write_metadata
    from onnxecc.methods.result import CompressResult, evaluate, recovery_warnings, tool_version

    opts = options
    _check_options(budget, opts)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    emit("stage", {"name": "analyse"})
    hw = hwm.load_hardware(opts.hardware)
    plan = make_plan(model, hw, budget, _precision_bits(hw, opts))
    jpu = plan.jpu
    fmt = lambda units: format_cost(units * jpu, "energy")  # noqa: E731
    check_reachable(plan)
    data = None
    if opts.data:
        from onnxecc.graph.data import load_data

        inp = plan.shaped.graph.input[0]
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim)
        data = load_data(opts.data, shape, num_classes=plan.geoms[-1].out_channels)
    timings["analyse"] = time.perf_counter() - t0
    warnings: list[str] = []
    history: list[dict] = []
    mask_keep = 1.0
    precision = None
    if plan.target >= plan.original:
        out_model = onnx.ModelProto()
        out_model.CopyFrom(plan.proto)
        weights = {g.weight: _const(plan.proto, g.weight) for g in plan.geoms}
        energy = plan.exact(weights, plan.start_masks)
        pruned, new_nodes = False, []
        warnings.append(f"budget {fmt(plan.target)} is at or above the original modelled energy "
                        f"{fmt(plan.original)}: no pruning needed")
    else:
        t = time.perf_counter()
        trainer = _Trainer(plan, data, opts, emit)
        outcome = trainer.run()
        timings["train"] = time.perf_counter() - t
        out_model, energy, history, mask_keep = outcome.model, outcome.energy, outcome.history, outcome.mask_keep
        warnings += recovery_warnings(history)
        new_nodes = insert_input_masks(out_model, plan, outcome.masks)
        pruned = True
        if plan.bits:  # --knobs width,precision: the pruned model's int8 layers written as QDQ
            int8 = [n for n, b in plan.bits.items() if b == PRECISION_BITS]
            precision = {"bits": PRECISION_BITS, "int8_layers": int8,
                         "accuracy_fp32_pruned": _accuracy(out_model, data),
                         "energy_units_all_reference_bits": float(sum(
                             hwm.layer_energy(g, hw, outcome.weights[g.weight], outcome.masks.get(g.name)).total
                             for g in plan.geoms)),
                         "energy_units_planned": float(sum(e.total for e in energy)), "not_done": PRECISION_NOT_DONE}
            out_model = quantize_output(out_model, plan, data)
        if data is None or opts.epochs == 0:
            warnings.append("no --data (or --epochs 0): weights were chosen by one weighted projection only and "
                            "accuracy is not recovered by training; pass --data to train")
    estimated = float(sum(e.total for e in energy))
    dense_model = onnx.ModelProto()
    dense_model.CopyFrom(out_model)
    storage = sparsify(out_model, _weight_initializers(out_model, plan)) if pruned else \
        {"converted": [], "dense_bytes": 0, "sparse_bytes": 0}
    storage.update(_check_sparse_in_ort(out_model, dense_model, data, opts.seed) if storage["converted"] else {})
    if storage.get("ort_error"):
        warnings.append(f"onnxruntime cannot load the sparse initializers ({storage['ort_error']}): weights "
                        "stored densely")
        out_model = dense_model
        storage["converted"] = []
    counted_model = hwm.model_energy(out_model, hw)
    counted = counted_model.total
    tol = 1e-9 * max(1.0, plan.original)
    if precision is not None:  # quantization may round more weights to 0, never a 0 to non-zero
        widths = {e.name: e.bits for e in counted_model.layers}
        if widths != {g.name: plan.hw_of(g).bits for g in plan.geoms} or counted > estimated + tol:
            raise RuntimeError(f"the QDQ model's widths {widths} or energy {counted} disagree with the plan's "
                               f"({estimated})")
        precision["energy_units_counted"] = counted
    elif abs(counted - estimated) > tol:
        raise RuntimeError(f"energy model disagrees with the count on the written model: {estimated} vs {counted}")
    result = CompressResult(out_model, Path(output) if output else None, "energy", budget, plan.target * jpu,
                            plan.original * jpu, estimated * jpu, counted * jpu, pruned, {}, history=history,
                            warnings=warnings)
    result.method = "wsp" if pruned else "none"
    result.recipe = recipe_of(opts)  # wsp changes no option: the options as given
    emit("stage", {"name": "validate"})
    t = time.perf_counter()
    evaluate(result, plan.proto, data, opts)
    timings["validate"] = time.perf_counter() - t
    if precision is not None:
        precision["accuracy_int8"] = result.accuracy_after
        result.precision = precision
        before = precision["accuracy_fp32_pruned"]
        warnings.append(f"precision: {len(precision['int8_layers'])} layer(s) in int8 (QDQ) at the hardware's "
                        f"{PRECISION_BITS}-bit energies ({fmt(precision['energy_units_all_reference_bits'])} for the "
                        f"same supports at {hw.bits} bits); post-training quantization after fp32 training"
                        + (f": accuracy {before:.4f} fp32 → {result.accuracy_after:.4f} int8"
                           if before is not None and result.accuracy_after is not None else ""))
    if not result.meets_budget:
        raise RuntimeError(f"internal error: modelled energy {fmt(counted)} exceeds the budget {fmt(plan.target)}")
    chance = 1.0 / max(2, plan.geoms[-1].out_channels)
    if pruned and result.accuracy_after is not None and result.accuracy_before is not None \
            and result.accuracy_after < 1.5 * chance < result.accuracy_before:
        warnings.append(f"accuracy {result.accuracy_after:.3f} is near chance ({chance:.3f}; original "
                        f"{result.accuracy_before:.3f}): training collapsed at this budget, {fmt(plan.target)} is only "
                        f"{(plan.target - plan.reachable) / plan.original:.1%} of the original above the smallest "
                        f"reachable {fmt(plan.reachable)} — give a larger budget")
    warnings.append(DENSE_NOTE)
    parts = counted_model.as_dict()
    top = max(counted_model.layers, key=lambda e: e.total)
    warnings.append(f"modelled energy {fmt(counted)}: compute {fmt(parts['compute'])}, weight accesses "
                    f"{fmt(parts['weights'])}, input/output accesses {fmt(parts['inputs'])}; largest layer {top.name} "
                    f"({top.total / counted:.0%}); per layer: the report's wsp.energy or `onnxecc inspect OUT "
                    f"--hardware {opts.hardware}`")
    write_metadata(out_model, {
        "version": tool_version(), "method": "wsp", "metric": "energy", "budget": plan.target * jpu,
        "budget_text": budget.text, "original_cost": plan.original * jpu, "estimated_cost": estimated * jpu,
        "counted_cost": counted * jpu, "pruned": pruned, "accuracy": result.accuracy_after,
        "hardware": hw.name, "hardware_sha256": hw.sha256, "energy_unit": hw.energy_unit,
        "modelled_energy_units": counted, "modelled_energy_j": counted * jpu,
        "note": "energy modelled for the accelerator in the hardware file; onnxruntime runs the model densely",
    })
    timings["total"] = time.perf_counter() - t0
    result.timings = timings
    if output is not None:
        ingest.save(out_model, output)
    if report is not None:
        doc = result.as_dict()
        doc["wsp"] = {
            "hardware": hw.as_dict(), "energy_unit": hw.energy_unit, "joules_per_unit": jpu,
            "original_units": plan.original, "budget_units": plan.target, "counted_units": counted,
            "floor_units": plan.floor, "reachable_units": plan.reachable,
            "min_support": {"weights_per_layer": _MIN_WEIGHTS, "inputs_per_conv": _MIN_INPUTS},
            "mask_keep_fraction": mask_keep, "mask_nodes": new_nodes,
            "energy": counted_model.as_dict(), "storage": storage, "note": DENSE_NOTE,
            "proj_interval": getattr(opts, "proj_interval", 10),
            "sparsity": {e.name: {"nnz": e.nnz_weights, "size": e.weight_size, "bits": e.bits,
                                  "inputs_kept": e.nnz_inputs, "inputs": e.input_size} for e in counted_model.layers},
            "precision": precision,
        }
        atomic.write_json(report, doc)
    return result


def _const(model: onnx.ModelProto, name: str) -> np.ndarray:
    from onnxecc.graph.graph import Graph

    return Graph(model).const(name)


def _check_sparse_in_ort(sparse: onnx.ModelProto, dense: onnx.ModelProto, data, seed: int) -> dict:
    """Load the sparse-initializer model in onnxruntime and compare it with the dense one with zeros."""
    try:
        s_sparse = runtime.session(sparse)
    except Exception as exc:  # onnxruntime has no common exception base
        return {"ort_error": " ".join(str(exc).split())[:200]}
    s_dense = runtime.session(dense)
    x = data.x_test[:64] if data is not None and len(data.x_test) else runtime.example_input(s_dense, 8, seed)
    a, b = runtime.run_batched(s_sparse, x), runtime.run_batched(s_dense, x)
    return {"ort_loads_sparse": True, "ort_max_abs_diff_sparse_vs_dense": float(np.abs(a - b).max()),
            "file_bytes_sparse": sparse.ByteSize(), "file_bytes_dense": dense.ByteSize()}


# ------------------------------------------------------------------------------------------------- benches
def bench_wsp_projection(sizes=(1e6, 5e6, 25e6), seed: int = 0, layers: int = 50) -> list[dict]:
    """Time the threshold search against the full sort on synthetic weights of `sizes` elements (float32
    values, integer per-layer costs like the energy model's); both must give the same support."""
    from onnxecc.optimize.sparse_projection import greedy_sorted

    rng = np.random.default_rng(seed)
    rows = []
    for size in sizes:
        n = int(size)
        values = (rng.standard_normal(n) * rng.choice(np.geomspace(0.01, 1, layers), n)).astype(np.float32)
        costs = rng.choice(np.arange(200.0, 20_000.0, 37.0), layers)[rng.integers(0, layers, n)]
        capacity = 0.3 * float(costs.sum())
        t = time.perf_counter()
        _, keep_fast = project(values, costs, capacity)
        fast = time.perf_counter() - t
        t = time.perf_counter()
        keep_sort = greedy_sorted(np.square(values.astype(np.float64)), costs, capacity)
        full = time.perf_counter() - t
        rows.append({"weights": n, "threshold_s": fast, "sort_s": full, "speedup": full / fast,
                     "same_answer": bool(np.array_equal(keep_fast.reshape(-1), keep_sort)),
                     "kept": int(keep_sort.sum())})
    return rows


def bench_wsp_accuracy(seeds=(0, 1, 2), budgets=(0.2, 0.4), models=None, epochs: int = 15,
                       hardware: str | None = None, methods=("wsp", "magnitude"), log=None) -> list[dict]:
    """wsp (weighted projection + input masks) against global magnitude pruning cut at the same modelled
    energy, with the same training schedule (projection every proj_interval batches, decaying budget, then
    fine-tuning with the support fixed). One row per (model, budget, method, seed): test accuracy measured
    by onnxruntime on the written graph, modelled energy counted on it, file sizes; `summarise_accuracy`
    aggregates mean ± std. A method that cannot reach a budget (magnitude pruning has no input masks) gets
    accuracy None and the reason. Method "wsp+int8" is `--knobs width,precision`: every layer at the hardware's
    8-bit energies during the projections, the output written as int8 QDQ (its row also has the accuracy of the
    pruned fp32 model before quantization, `accuracy_fp32`). Returns `summarise_accuracy(rows)`: one row per
    (model, budget, method) with the per-seed runs under "runs"."""
    from onnxecc.graph.data import load_digits
    from onnxecc.methods.options import CompressOptions

    repo = Path(__file__).resolve().parents[2]
    models = models or [repo / "models" / "digits_cnn.onnx", repo / "models" / "digits_resdw.onnx"]
    hw = hwm.load_hardware(hardware or repo / "profiles" / "eyeriss.json")
    data = load_digits()
    rows = []
    for path in models:
        for fraction in budgets:
            budget = Budget(text=str(fraction), metric="energy", fraction=float(fraction))
            plans = {}
            for method in methods:
                bits = PRECISION_BITS if method.endswith("+int8") else None
                plan = plans[bits] = plans.get(bits) or make_plan(path, hw, budget, bits)
                for seed in seeds:
                    opts = CompressOptions(metric="energy", method="wsp", hardware=str(hw.source), data="digits",
                                           epochs=epochs, seed=seed, measure_latency=False)
                    row = {"model": Path(path).stem, "budget": fraction, "method": method, "seed": seed}
                    t = time.perf_counter()
                    try:
                        trainer = _Trainer(plan, data, opts, lambda *a: None,
                                           order="wsp" if method.startswith("wsp") else "magnitude",
                                           use_masks=method in ("wsp", "magnitude+masks"))
                        outcome = trainer.run()
                    except UserError as exc:
                        row.update(accuracy=None, reason=str(exc))
                        rows.append(row)
                        if log:
                            log(row)
                        continue
                    out = outcome.model
                    insert_input_masks(out, plan, outcome.masks)
                    if plan.bits:
                        row["accuracy_fp32"] = _accuracy(out, data)
                        out = quantize_output(out, plan, data)
                    dense_bytes = out.ByteSize()
                    sparse_model = onnx.ModelProto()
                    sparse_model.CopyFrom(out)
                    sparsify(sparse_model, _weight_initializers(sparse_model, plan))
                    s_dense, s_sparse = runtime.session(out), runtime.session(sparse_model)
                    logits = runtime.run_batched(s_sparse, data.x_test)
                    same = bool(np.array_equal(logits, runtime.run_batched(s_dense, data.x_test)))
                    counted = hwm.model_energy(sparse_model, hw).total
                    row.update(accuracy=float((logits.argmax(1) == data.y_test).mean()),
                               energy_fraction=counted / plan.original, meets=counted <= plan.target,
                               nnz=int(sum(e.nnz_weights for e in outcome.energy)),
                               inputs_kept=int(sum(e.nnz_inputs for e in outcome.energy)),
                               file_ratio=sparse_model.ByteSize() / dense_bytes, ort_sparse_equals_dense=same,
                               seconds=time.perf_counter() - t)
                    rows.append(row)
                    if log:
                        log(row)
    return summarise_accuracy(rows)


def summarise_accuracy(rows: list[dict]) -> list[dict]:
    """Mean ± std (over seeds) per (model, budget, method)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["budget"], r["method"]), []).append(r)
    out = []
    for (model, budget, method), rs in groups.items():
        acc = [r["accuracy"] for r in rs if r.get("accuracy") is not None]
        out.append({"model": model, "budget": budget, "method": method, "n": len(acc),
                    "accuracy_mean": float(np.mean(acc)) if acc else None,
                    "accuracy_std": float(np.std(acc)) if acc else None,
                    "file_ratio": float(np.mean([r["file_ratio"] for r in rs if "file_ratio" in r])) if acc else None,
                    "energy_fraction": float(np.max([r["energy_fraction"] for r in rs if "energy_fraction" in r]))
                    if acc else None, "accuracies": acc,
                    "ort_sparse_equals_dense": all(r.get("ort_sparse_equals_dense", True) for r in rs),
                    "note": rs[0].get("reason"), "runs": rs,
                    **({"accuracy_fp32_mean": float(np.mean([r["accuracy_fp32"] for r in rs]))}
                       if acc and all(r.get("accuracy_fp32") is not None for r in rs) else {})})
    return out


class Wsp(Method):
    """`--method wsp` in the method registry: a pipeline of its own (`compress_wsp`), not a width selection."""

    name = "wsp"
    own_pipeline = True

    @staticmethod
    def run(model, budget, output, options, report, emit):
        return compress_wsp(model, budget, output, options, report, emit)
