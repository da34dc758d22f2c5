"""The torch stand-in for a pruned model: the full-size converted model with pruned channels masked to zero.

Every trainer (fine-tuning, ADMM, the NetAdapt-style baseline) works on this object: it owns the torch
module, the teacher logits of the original model, and turns a keep set (kept units per channel group) into
masks on the right torch tensors. Because masked channels contribute exactly nothing, writing the weights
back and physically removing the channels gives the same function (`onnxecc.graph.surgery`).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from onnxecc.core.errors import TrainingDiverged, UnsupportedModelError
from onnxecc.graph import runtime
from onnxecc.graph.channels import ChannelGraph
from onnxecc.graph.inputs import graph_inputs, per_sample_shapes, resolve_shapes
from onnxecc.graph.outputs import fidelity, output_kind
from onnxecc.optimize.importance import channel_masks
from onnxecc.train import distributed, recalibrate
from onnxecc.train.bridge import TorchModel, to_torch, write_back
from onnxecc.train.finetune import (
    Mask,
    TorchInputs,
    TrainConfig,
    class_scores,
    distillation_loss,
    finetune,
    steps_per_epoch,
)
from onnxecc.train.guard import all_finite, diverged_message
from onnxecc.train.masked_norm import Normalisations

PROBE_SAMPLES = 1024  # the rate probe's training samples (16 batches of 64): digits' 35 %-vs-97 % split shows there


def _spread(n: int, count: int) -> np.ndarray:
    """Up to `count` indices spread evenly over range(n): a file ordered by class is not read from one class."""
    return np.unique(np.linspace(0, n - 1, min(n, count)).round().astype(np.int64))


class MaskedModel:
    def __init__(self, proto: onnx.ModelProto, graph: ChannelGraph, data, config: TrainConfig,
                 recalibration: bool = True, class_axis: int | None = None):
        self.proto = proto
        self.graph = graph
        self.data = data
        self.config = config
        # symbolic input sizes at the data's: onnx2torch reads some shapes onnx cannot infer (`bridge._complete_shapes`)
        names = [i.name for i in graph_inputs(proto)]
        self.tm: TorchModel = to_torch(proto, resolve_shapes(proto, samples=per_sample_shapes(data.x_train, names)))
        session = runtime.session(proto)
        self.teacher = runtime.run_batched(session, data.x_train)  # in chunks of a fixed batch size, if any
        # class scores along which axis (--class-axis, else detected), or a map: how outputs are compared
        self.kind = output_kind(self.teacher, class_axis)
        # a model exported with a fixed batch size: torch trains it at larger batches only if its converted module
        # computes each sample alone at those (`_free_batches`); else every pass is fed that many samples
        fixed = runtime.fixed_batch(session)
        self.batch_limit = None if fixed is None or self._free_batches(fixed) else fixed
        if self.batch_limit is not None and self.batch_limit > 1:
            raise UnsupportedModelError(
                f"the model takes batches of exactly {fixed} samples and its torch conversion cannot run other batch "
                "sizes: training such a model is not implemented; re-export it with a dynamic batch or a batch of 1 "
                "(or compress without --data)")
        if self.batch_limit is not None:
            self.config = TrainConfig(**{**config.__dict__, "batch_size": self.batch_limit})
        self.masks: list[Mask] = []
        self.normalisations = Normalisations(self.tm, graph)  # over the kept channels only, once some are pruned
        self.recoveries: list[dict] = []  # what `onnxecc.train.guard` undid since the last `take_recoveries`
        # the original model's per-channel statistics, before any training moves the weights (`recalibrate`);
        # one forward pass over the calibration samples, skipped when the caller will not recalibrate
        self._calibration = self._reference_stats = None
        if recalibration and self.batch_limit is None:  # (it passes every calibration sample at once)
            count = recalibrate.calibration_size(self.tm.module, self.inputs(data.x_train[:1]), len(data.x_train))
            every = _spread(len(data.x_train), count)
            self._calibration = self.inputs(data.x_train[every])
            self._reference_stats = recalibrate.channel_stats(self.tm.module, self._calibration)

    def inputs(self, x) -> TorchInputs:
        """Numpy samples (one array, or `inputs.Feeds`) as the converted module takes them."""
        return TorchInputs.of(x, self.tm.input_names)

    @torch.no_grad()
    def _free_batches(self, fixed: int) -> bool:
        """Whether the converted module of a model with a fixed batch size gives every sample of a larger batch
        the output it gives it at that size (an export can bake the batch into a Reshape, e.g. [1, -1])."""
        n = min(len(self.data.x_train), 4 * fixed)
        if n <= fixed:
            return False
        x = self.inputs(self.data.x_train[:n])
        self.tm.module.eval()
        try:
            together = x(self.tm.module)
        except Exception:  # the module refuses the larger batch (shape errors come as several exception types)
            return False
        alone = torch.cat([x[i:i + fixed](self.tm.module) for i in range(0, n - n % fixed, fixed)])
        return together.shape[0] == n and torch.allclose(together[:len(alone)], alone, rtol=1e-4, atol=1e-5)

    # ---- values in the ONNX layout (what importance and projection read) -----------------------------------
    def onnx_values(self, names) -> dict[str, np.ndarray]:
        return {n: self.tm.onnx_value(n) for n in names if n in self.tm.params}

    def tensor(self, name: str) -> torch.Tensor:
        return self.tm.parameter(name)

    def to_torch_layout(self, name: str, value: np.ndarray) -> torch.Tensor:
        layout = self.tm.layouts.get(name)
        return layout.to_torch(value) if layout is not None else torch.from_numpy(np.array(value))

    # ---- masks ---------------------------------------------------------------------------------------------
    def torch_masks(self, keep: dict[int, np.ndarray]) -> dict[str, torch.Tensor]:
        """Masks in torch layout for every trained tensor that carries a pruned channel."""
        out = {}
        for name, mask in channel_masks(self.proto, self.graph, keep).items():
            if name in self.tm.params:  # untrained constants (e.g. a per-channel Mul): consumers are masked
                out[name] = self.to_torch_layout(name, mask.astype(np.float32))
        return out

    def set_keep(self, keep: dict[int, np.ndarray]) -> None:
        """Zero the pruned channels now and keep them zero in every later training step."""
        self.masks = []
        for name, mask in self.torch_masks(keep).items():
            tensor = self.tensor(name)
            if isinstance(tensor, torch.nn.Parameter):
                self.masks.append(Mask(tensor, mask))
            with torch.no_grad():
                tensor.mul_(mask.to(tensor.dtype))
        self.normalisations.set_keep(keep)

    def recalibrate(self) -> dict:
        """Give every convolution's live output channels the original model's mean and standard deviation again
        (`onnxecc.train.recalibrate`), keeping the pruned channels zero. Returns what it did, with the training loss
        before and after on the rate probe's samples (the report shows both; the loss is not what it optimises)."""
        if self._reference_stats is None and self.batch_limit is not None:
            return {"layers": 0, "skipped": f"the model takes batches of {self.batch_limit} only, and recalibration "
                                            "passes every calibration sample at once"}
        if self._reference_stats is None:
            raise RuntimeError("this MaskedModel was built with recalibration=False: no reference statistics")
        every = _spread(len(self.data.x_train), PROBE_SAMPLES)
        before, start = self.loss(every), self.state()
        layers = recalibrate.recalibrate(self.tm.module, self._calibration, self._reference_stats)
        for m in self.masks:
            m.apply()
        after = self.loss(every)
        # it writes weights and biases (parameters) only; a constant buffer may be non-finite by design (magika's -inf)
        if not (all_finite(self.tm.module.parameters()) and np.isfinite(after)):
            self.load_state(start)  # e.g. a channel whose spread overflowed: training starts from the pruned weights
            self.recoveries.append({"phase": "recovery", "during": "recalibrate", "non_finite": "weights",
                                    "action": "recalibration undone"})
            layers, after = 0, before
        return {"layers": layers, "samples": len(self._calibration), "loss_before": before, "loss_after": after}

    def take_recoveries(self) -> list[dict]:
        """The recovery records (`onnxecc.train.guard`) since the last call, for the report's history; emptied."""
        out, self.recoveries = self.recoveries, []
        return out

    # ---- training and evaluation ---------------------------------------------------------------------------
    def train(self, epochs: int, emit=None, penalty=None, lr: float | None = None, after_step=None,
              on_epoch=None, phase: str = "training") -> list[dict]:
        """`on_epoch(epoch)` runs after every epoch, numbered from 1 (QAT starts and recomputes its activation
        ranges there: `onnxecc.train.qat.FakeQuant.epoch_done`). `phase` names the loop in recovery records
        (kept in `recoveries`, each also emitted as a "recovery" event) and divergence messages."""
        cfg = TrainConfig(**{**self.config.__dict__, "epochs": epochs, "phase": phase, **({"lr": lr} if lr else {})})
        emit = emit or (lambda kind, info: None)

        def epoch_done(log):
            if on_epoch is not None:
                on_epoch(log.epoch)
            emit("epoch", {**log.__dict__, "epochs": epochs, "phase": phase})

        def recovered(record):
            self.recoveries.append(record)
            emit("recovery", record)

        history = finetune(self.tm.module, self.data.x_train, self.teacher, self.data.y_train, cfg, self.masks,
                           on_epoch=epoch_done,
                           on_batch=lambda step, total: emit("batch", {"step": step, "total": total, "epochs": epochs}),
                           penalty=penalty, after_step=after_step, on_recovery=recovered, kind=self.kind)
        return history.as_dict()

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch of `train`."""
        return steps_per_epoch(len(self.data.x_train), self.config.batch_size)

    def choose_lr(self, candidates, samples: int = PROBE_SAMPLES) -> tuple[float, list[dict]]:
        """The fine-tuning learning rate for the current (pruned) weights: from these weights, one pass over up to
        `samples` training samples at each candidate (constant rate), and the lowest distillation loss on those
        samples afterwards wins; the weights are restored. Returns (rate, [{"lr", "loss", "chosen"} per
        candidate]).

        Why a probe: the rate a pruned network needs depends on how much pruning broke it, which no fixed default
        knows — a lightly pruned network is knocked off its minimum by a rate that a heavily pruned one needs to
        recover (numbers at `onnxecc.train.finetune.PROBE_LRS`). The first steps already tell them apart (35 % vs 97 %
        training accuracy after one epoch there); the loss is measured after them, not averaged over them. The
        samples are capped so that the probe costs a few batches on a large dataset, not epochs. A rate that meets
        non-finite numbers is out (`"diverged"`, no recovery: it is the wrong rate); TrainingDiverged if all are."""
        every = _spread(len(self.data.x_train), samples)
        x, teacher = self.data.x_train[every], self.teacher[every]
        y = self.data.y_train[every] if self.data.y_train is not None else None
        start = self.state()
        tried, reason = [], None
        for lr in candidates:
            self.load_state(start)
            config = TrainConfig(**{**self.config.__dict__, "epochs": 1, "lr": lr, "lr_schedule": "constant",
                                    "phase": "lr probe", "max_recoveries": 0})
            try:  # a rate that meets non-finite numbers (`onnxecc.train.guard`) is not a candidate
                finetune(self.tm.module, x, teacher, y, config, self.masks, kind=self.kind)
                loss = self.loss(every)
            except TrainingDiverged as exc:  # its message says what became non-finite (the loss, a weight, ...)
                loss, reason = float("nan"), exc
            tried.append({"lr": lr, "loss": loss} if np.isfinite(loss) else {"lr": lr, "loss": None, "diverged": True})
        self.load_state(start)
        finite = [t for t in tried if t["loss"] is not None]
        if not finite:
            raise reason if reason is not None else TrainingDiverged(diverged_message("lr probe", 1, "loss", 0,
                                                                                     min(candidates)))
        best = distributed.on_main(lambda: min(finite, key=lambda t: t["loss"])["lr"])  # every rank trains with it
        return best, [{**t, "chosen": t["lr"] == best} for t in tried]

    @torch.no_grad()
    def loss(self, samples: np.ndarray, batch: int = 512) -> float:
        """The training objective (`finetune.distillation_loss`) in eval mode on the training samples at the
        indices `samples`."""
        batch = self.batch_limit or batch
        self.tm.module.eval()
        y = self.data.y_train
        weight = self.config.distill_weight if y is not None else 1.0
        total = 0.0
        for i in range(0, len(samples), batch):
            idx = samples[i:i + batch]
            out = self.inputs(self.data.x_train[idx])(self.tm.module)
            labels = torch.as_tensor(y[idx], dtype=torch.long) if y is not None else None
            total += float(distillation_loss(out, torch.as_tensor(self.teacher[idx], dtype=torch.float32), labels,
                                             self.config.temperature, weight, self.kind)) * len(idx)
        return total / max(1, len(samples))

    @torch.no_grad()
    def fidelity(self, x: np.ndarray, reference: np.ndarray, labels: np.ndarray | None = None,
                 batch: int = 512) -> float:
        """How well the torch model's outputs on `x` match (`outputs.fidelity`): accuracy on `labels`, else top-1
        agreement with `reference` (the original's outputs on `x`) along the class axis, else 1/(1 + relative
        squared error) for outputs without one."""
        batch = self.batch_limit or batch
        self.tm.module.eval()
        out = np.concatenate([self.inputs(x[i:i + batch])(self.tm.module).numpy() for i in range(0, len(x), batch)])
        return fidelity(self.kind, out, reference, labels)

    def fisher(self, names, max_samples: int = 4096) -> dict[str, np.ndarray]:
        """Diagonal empirical Fisher of the named trained tensors (ONNX layout): Σ over batches of (∂L/∂w)².

        L is cross-entropy on the labels, or on the original model's own top-1 when there are none (the
        distillation loss has zero gradient where the student equals the teacher) — at every position for
        per-step class scores (N×T×C), on the log of probabilities. An output without a class axis (a score map)
        has no top-1: L is then the squared error to the teacher's output plus Gaussian noise, whose
        expected squared gradient is the Fisher of a Gaussian model of that output (JᵀJ, scaled). Masks in force stay in
        force: a pruned weight's Fisher is measured like any other, its value is zero. `max_samples` bounds
        the cost (one forward/backward pass over at most that many training samples)."""
        tensors = {n: self.tensor(n) for n in names if n in self.tm.params}
        trainable = {n: t for n, t in tensors.items() if isinstance(t, torch.nn.Parameter)}
        total = {n: torch.zeros_like(t) for n, t in trainable.items()}
        x = self.data.x_train[:max_samples]
        has_class = self.kind.class_axis is not None
        y = self.data.y_train[:max_samples] if self.data.y_train is not None else \
            self.kind.top1(self.teacher[:max_samples]) if has_class else None
        module = self.tm.module
        module.eval()  # deterministic: no dropout noise, BatchNorm statistics as trained
        step = self.config.batch_size
        skipped = 0
        noise = torch.Generator().manual_seed(0)
        for i in range(0, len(x), step):
            out = self.inputs(x[i:i + step])(module)
            if has_class:  # rows of class_scores follow top1's order of the other axes
                loss = torch.nn.functional.cross_entropy(class_scores(out, self.kind),
                                                         torch.as_tensor(y[i:i + step], dtype=torch.long).reshape(-1))
            else:  # no class axis (a score map): the Fisher of a Gaussian output, sampled at the teacher
                teacher = torch.as_tensor(self.teacher[i:i + step], dtype=torch.float32)
                target = teacher + torch.randn(teacher.shape, generator=noise) * teacher.std().clamp_min(1e-6)
                loss = 0.5 * (out - target).pow(2).sum() / len(teacher)
            grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
            squares = [g.detach().pow(2) if g is not None else None for g in grads]
            if not all_finite(squares):  # one bad batch must not make every importance NaN (`onnxecc.train.guard`)
                skipped += 1
                continue
            for (n, _), g2 in zip(trainable.items(), squares):
                if g2 is not None:
                    total[n] += g2
        batches = -(-len(x) // step)
        if skipped == batches or not all_finite(total.values()):
            raise TrainingDiverged("Fisher importances: the loss gradients are non-finite on the training data "
                                   "(weights or inputs overflow float32); try --importance l2, or "
                                   "check --data for extreme values")
        if skipped:
            self.recoveries.append({"phase": "recovery", "during": "importance", "non_finite": "gradients",
                                    "action": f"{skipped} of {batches} batches left out of the Fisher sums"})
        out = {}
        for n, f in total.items():
            layout = self.tm.layouts.get(n)
            scale = layout.scale if layout is not None else 1.0  # torch = scale·ONNX, so ∂L/∂ONNX = scale·∂L/∂torch
            transpose = layout.transpose if layout is not None else False
            value = f.cpu().numpy()
            out[n] = np.ascontiguousarray(value.T if transpose else value) * scale ** 2
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.tm.module.state_dict().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.tm.module.load_state_dict(state)

    def write_back(self) -> onnx.ModelProto:
        return write_back(self.tm)
