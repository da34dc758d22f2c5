"""The torch stand-in for a pruned model: the full-size converted model with pruned channels masked to zero.

Every trainer (fine-tuning, ADMM, the NetAdapt-style baseline) works on this object: it owns the torch
module, the teacher logits of the original model, and turns a keep set (kept units per channel group) into
masks on the right torch tensors. Because masked channels contribute exactly nothing, writing the weights
back and physically removing the channels gives the same function (`onnxecc.surgery`).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from onnxecc import runtime
from onnxecc.bridge import TorchModel, to_torch, write_back
from onnxecc.channels import ChannelGraph
from onnxecc.finetune import Mask, TrainConfig, finetune
from onnxecc.importance import channel_masks


class MaskedModel:
    def __init__(self, proto: onnx.ModelProto, graph: ChannelGraph, data, config: TrainConfig):
        self.proto = proto
        self.graph = graph
        self.data = data
        self.config = config
        self.tm: TorchModel = to_torch(proto)
        self.teacher = runtime.run_batched(runtime.session(proto), data.x_train)
        self.masks: list[Mask] = []

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

    # ---- training and evaluation ---------------------------------------------------------------------------
    def train(self, epochs: int, emit=None, penalty=None, lr: float | None = None, after_step=None,
              on_epoch=None) -> list[dict]:
        """`on_epoch(epoch)` runs after every epoch, numbered from 1 (QAT starts and recomputes its activation
        ranges there: `onnxecc.quantize.FakeQuant.epoch_done`)."""
        cfg = TrainConfig(**{**self.config.__dict__, "epochs": epochs, **({"lr": lr} if lr else {})})
        emit = emit or (lambda kind, info: None)

        def epoch_done(log):
            if on_epoch is not None:
                on_epoch(log.epoch)
            emit("epoch", log.__dict__)

        history = finetune(self.tm.module, self.data.x_train, self.teacher, self.data.y_train, cfg, self.masks,
                           on_epoch=epoch_done,
                           on_batch=lambda step, total: emit("batch", {"step": step, "total": total}),
                           penalty=penalty, after_step=after_step)
        return history.as_dict()

    @torch.no_grad()
    def accuracy(self, x: np.ndarray, y: np.ndarray, batch: int = 512) -> float:
        self.tm.module.eval()
        correct = 0
        for i in range(0, len(x), batch):
            out = self.tm.module(torch.as_tensor(x[i:i + batch]))
            correct += int((out.argmax(1).numpy() == y[i:i + batch]).sum())
        return correct / max(1, len(x))

    def fisher(self, names, max_samples: int = 4096) -> dict[str, np.ndarray]:
        """Diagonal empirical Fisher of the named trained tensors (ONNX layout): Σ over batches of (∂L/∂w)².

        L is cross-entropy on the labels, or on the original model's own top-1 when there are none (the
        distillation loss has zero gradient where the student equals the teacher). Masks in force stay in
        force: a pruned weight's Fisher is measured like any other, its value is zero. `max_samples` bounds
        the cost (one forward/backward pass over at most that many training samples)."""
        tensors = {n: self.tensor(n) for n in names if n in self.tm.params}
        trainable = {n: t for n, t in tensors.items() if isinstance(t, torch.nn.Parameter)}
        total = {n: torch.zeros_like(t) for n, t in trainable.items()}
        x = self.data.x_train[:max_samples]
        y = self.data.y_train[:max_samples] if self.data.y_train is not None else self.teacher[:max_samples].argmax(1)
        module = self.tm.module
        module.eval()  # deterministic: no dropout noise, BatchNorm statistics as trained
        step = self.config.batch_size
        for i in range(0, len(x), step):
            out = module(torch.as_tensor(x[i:i + step]))
            loss = torch.nn.functional.cross_entropy(out, torch.as_tensor(y[i:i + step], dtype=torch.long))
            grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
            for (n, _), g in zip(trainable.items(), grads):
                if g is not None:
                    total[n] += g.detach().pow(2)
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
