"""Real architectures for tests: torchvision constructors with weights=None exported to ONNX (no download).

Exports are cached per session (and across runs in tests/.cache, keyed by torch version and settings),
so the suite pays for each export once.
"""

from __future__ import annotations

import os
from pathlib import Path

ZOO = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x1_0",
       "efficientnet_b0", "googlenet", "densenet121", "regnet_x_400mf", "mnasnet0_5"]
SIZE = 64  # input side: small enough for fast ORT runs, large enough for every architecture's downsampling
CACHE = Path(os.environ.get("ONNXECC_TEST_CACHE", Path(__file__).parent / ".cache"))


def build(arch: str):
    import torch
    import torchvision

    torch.manual_seed(0)
    kwargs = {"weights": None}
    if arch == "googlenet":
        kwargs.update(aux_logits=False, init_weights=True)
    model = getattr(torchvision.models, arch)(**kwargs).eval()
    # Random-but-not-trivial BatchNorm statistics, so folded/unfolded BN paths are really exercised.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def export(arch: str, dynamo: bool = False) -> Path:
    """Path to `arch` exported as ONNX (cached)."""
    import torch

    tag = f"{arch}-{SIZE}-{'dynamo' if dynamo else 'ts'}-torch{torch.__version__.split('+')[0]}"
    path = CACHE / f"{tag}.onnx"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    model = build(arch)
    x = torch.randn(1, 3, SIZE, SIZE)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(tmp), dynamo=dynamo, input_names=["input"], output_names=["logits"],
                          dynamic_axes=None if dynamo else {"input": {0: "batch"}, "logits": {0: "batch"}},
                          **({"external_data": False} if dynamo else {}))
    os.replace(tmp, path)
    return path


ENCODER_VOCAB = 1000  # token ids of the BERT-style encoder: its embedding table's rows
ENCODER_MAX_LEN = 64  # positions it has embeddings for


def build_encoder():
    """A BERT-style text classifier written like Hugging Face's: word, position and token-type embeddings
    (Gather on int64 `input_ids`), an additive attention mask from the 0/1 `attention_mask`, heads split with
    `view(x.size()[:-1] + (heads, dim))` (Shape-dependent Reshapes in the export), GELU feed-forward blocks,
    a tanh pooler on the first token."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, dim: int, heads: int):
            super().__init__()
            self.heads, self.head_dim = heads, dim // heads
            self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

        def split(self, x):
            return x.view(x.size()[:-1] + (self.heads, self.head_dim)).permute(0, 2, 1, 3)

        def forward(self, h, mask):
            q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
            scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5 + mask
            ctx = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).contiguous()
            ctx = ctx.view(ctx.size()[:-2] + (self.heads * self.head_dim,))
            h = self.norm1(h + self.o(ctx))
            return self.norm2(h + self.down(nn.functional.gelu(self.up(h))))

    class Encoder(nn.Module):
        def __init__(self, dim: int = 32, heads: int = 4, layers: int = 2, classes: int = 5):
            super().__init__()
            self.word = nn.Embedding(ENCODER_VOCAB, dim)
            self.position = nn.Embedding(ENCODER_MAX_LEN, dim)
            self.token_type = nn.Embedding(2, dim)
            self.norm = nn.LayerNorm(dim)
            self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
            self.pool, self.classify = nn.Linear(dim, dim), nn.Linear(dim, classes)

        def forward(self, input_ids, attention_mask):
            positions = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
            h = self.word(input_ids) + self.position(positions) + self.token_type(torch.zeros_like(input_ids))
            h = self.norm(h)
            mask = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -10000.0
            for block in self.blocks:
                h = block(h, mask)
            return self.classify(torch.tanh(self.pool(h[:, 0])))

    torch.manual_seed(0)
    return Encoder().eval()


def export_encoder() -> Path:
    """The BERT-style encoder exported by torch.onnx (TorchScript exporter) with batch and sequence dynamic
    (cached like `export`)."""
    import torch

    tag = f"encoder-{ENCODER_VOCAB}-ts-torch{torch.__version__.split('+')[0]}"
    path = CACHE / f"{tag}.onnx"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    model = build_encoder()
    ids = torch.randint(0, ENCODER_VOCAB, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    axes = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(model, (ids, mask), str(tmp), dynamo=False, input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], opset_version=17,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}})
    os.replace(tmp, path)
    return path
