"""The torch side of the `transformers` bench area: small transformers written the way Hugging Face writes them,
the generated text task, training, export, and the Torch-Pruning baseline.

Separate q/k/v/o `nn.Linear`s and heads split by `view(x.size()[:-1] + (heads, head_dim))`, as in HF's BERT and
ViT: that is the form Torch-Pruning can remove whole heads of (it is told which Linear layers hold how many
heads) and the form most exported transformers have. `TextEncoder` with `zoo_encoder()`'s settings is the test
zoo's BERT-style encoder (`tests/zoo.py`: same modules in the same order, so seed 0 gives the same weights),
copied so that the bench does not import the tests. Helper module (leading `_`): `bench.areas()` skips it, so
torch is imported only when the area runs.
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

TEXT_PAD, TEXT_CLS = 0, 1  # token ids: padding, the first token the classifier reads; every id above is a word


class SelfAttention(nn.Module):
    """Multi-head self-attention as in HF's `BertSelfAttention` + `BertSelfOutput`'s projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def split(self, x):
        return x.view(x.size()[:-1] + (self.heads, self.head_dim)).permute(0, 2, 1, 3)

    def forward(self, h, mask=None):
        q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
        scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5
        if mask is not None:
            scores = scores + mask
        ctx = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).contiguous()
        return self.o(ctx.view(ctx.size()[:-2] + (self.heads * self.head_dim,)))


class Block(nn.Module):
    """Attention and a GELU feed-forward block, each with a residual; LayerNorm after (BERT) or before (ViT)."""

    def __init__(self, dim: int, heads: int, mlp: int, pre_norm: bool):
        super().__init__()
        self.attn = SelfAttention(dim, heads)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, mlp), nn.Linear(mlp, dim)
        self.pre_norm = pre_norm

    def ffn(self, h):
        return self.down(nn.functional.gelu(self.up(h)))

    def forward(self, h, mask=None):
        if self.pre_norm:
            h = h + self.attn(self.norm1(h), mask)
            return h + self.ffn(self.norm2(h))
        h = self.norm1(h + self.attn(h, mask))
        return self.norm2(h + self.ffn(h))


class TextEncoder(nn.Module):
    """BERT-style classifier: word, position and token-type embeddings on int64 `input_ids`, an additive mask from
    the 0/1 `attention_mask`, post-norm blocks, a tanh pooler on the first token."""

    def __init__(self, vocab: int, max_len: int, dim: int, heads: int, layers: int, classes: int):
        super().__init__()
        self.word = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(max_len, dim)
        self.token_type = nn.Embedding(2, dim)
        self.norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(Block(dim, heads, 4 * dim, pre_norm=False) for _ in range(layers))
        self.pool, self.classify = nn.Linear(dim, dim), nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask):
        positions = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
        h = self.word(input_ids) + self.position(positions) + self.token_type(torch.zeros_like(input_ids))
        h = self.norm(h)
        mask = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -10000.0
        for block in self.blocks:
            h = block(h, mask)
        return self.classify(torch.tanh(self.pool(h[:, 0])))

    def keep_whole(self, residual: bool) -> list[nn.Module]:
        """What Torch-Pruning must leave whole: the class scores and the pooler, and unless `residual` the
        embeddings (whose width is the residual width)."""
        return [self.classify, self.pool] + ([] if residual else [self.word, self.position, self.token_type])


class DigitsViT(nn.Module):
    """ViT for 1×8×8 digits: a Conv patch embedding (patch×patch, stride patch), a class token, learned positions,
    pre-norm blocks, a final LayerNorm and a linear head on the class token."""

    def __init__(self, patch: int = 2, dim: int = 64, heads: int = 4, layers: int = 2, mlp: int = 128,
                 classes: int = 10, size: int = 8, cls_token: bool = True):
        super().__init__()
        self.embed = nn.Conv2d(1, dim, patch, stride=patch)
        tokens = (size // patch) ** 2 + cls_token
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp, pre_norm=True) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.embed(x).flatten(2).transpose(1, 2)
        if self.cls is not None:
            h = torch.cat([self.cls.expand(h.size(0), -1, -1), h], dim=1)
        h = h + self.pos
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        return self.head(h[:, 0] if self.cls is not None else h.mean(1))

    def keep_whole(self, residual: bool) -> list[nn.Module]:
        return [self.head] + ([] if residual else [self.embed])


def zoo_encoder() -> TextEncoder:
    """`tests/zoo.py`'s `build_encoder()`: 1000 tokens, 64 positions, dim 32, 4 heads, 2 layers, 5 classes."""
    torch.manual_seed(0)
    return TextEncoder(vocab=1000, max_len=64, dim=32, heads=4, layers=2, classes=5).eval()


# ---- the generated text task ------------------------------------------------------------------------------------
def lexicon_task(n: int, seed: int, vocab: int, length: int, min_length: int, classes: int = 4
                 ) -> dict[str, np.ndarray]:
    """A generated sentiment-like task: every word id carries a fixed random score per class (a lexicon drawn
    from N(0, 1), centred so that no class dominates), and a sequence's label is the class with the highest total
    score over its words. Each sequence: the CLS token, `min_length-1` to `length-1` uniformly random words, then
    padding (id 0, attention_mask 0). Chance is about 25 %; a sequence whose two best classes nearly tie is hard,
    so accuracy grows with the data and the model instead of saturating. Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((vocab, classes))
    scores -= scores.mean(1, keepdims=True)
    scores -= scores.mean(0)
    scores[[TEXT_PAD, TEXT_CLS]] = 0.0
    ids = np.full((n, length), TEXT_PAD, dtype=np.int64)
    mask = np.zeros((n, length), dtype=np.int64)
    for i in range(n):
        real = int(rng.integers(min_length, length + 1))
        ids[i, 0], mask[i, :real] = TEXT_CLS, 1
        ids[i, 1:real] = rng.integers(TEXT_CLS + 1, vocab, size=real - 1)
    y = scores[ids].sum(1).argmax(1).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "y": y}


# ---- training and export ----------------------------------------------------------------------------------------
def as_inputs(x) -> tuple[torch.Tensor, ...]:
    """numpy data (one array, or a dict of input name → array in the model's order) as torch inputs."""
    arrays = list(x.values()) if isinstance(x, dict) else [x]
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def train(model: nn.Module, x, y: np.ndarray, epochs: int, seed: int, lr: float = 3e-3, batch: int = 64) -> None:
    """From scratch: AdamW, one-cycle schedule, cross-entropy, seeded batch order."""
    inputs, labels = as_inputs(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = -(-len(labels) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps, pct_start=0.15)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for i in range(0, len(labels), batch):
            b = order[i:i + batch]
            loss = nn.functional.cross_entropy(model(*(t[b] for t in inputs)), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def export_bytes(model: nn.Module, x, names: list[str]) -> bytes:
    """ONNX (TorchScript exporter, opset 17) with a dynamic batch; `x` a small numpy example batch."""
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model.eval(), as_inputs(x), buffer, dynamo=False, input_names=names,
                          output_names=["logits"], opset_version=17,
                          dynamic_axes={**{n: {0: "batch"} for n in names}, "logits": {0: "batch"}})
    return buffer.getvalue()


def export(model: nn.Module, x, names: list[str], path: Path, dynamic_sequence: bool = False) -> Path:
    """`model` written to `path` atomically (a cache never holds half a file); `dynamic_sequence` also leaves
    axis 1 of every input symbolic, as HF exports text models."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    axes = {0: "batch", 1: "sequence"} if dynamic_sequence else {0: "batch"}
    try:
        with torch.no_grad():
            torch.onnx.export(model.eval(), as_inputs(x), str(tmp), dynamo=False, input_names=names,
                              output_names=["logits"], opset_version=17,
                              dynamic_axes={**{n: axes for n in names}, "logits": {0: "batch"}})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_torchvision(arch: str, size: int, path: Path) -> Path:
    """torchvision's `arch` (weights=None, seed 0) at size×size, batch dynamic. Not under `no_grad`: in eval mode
    without gradients `nn.MultiheadAttention` takes its fused fast path, which has no ONNX export."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.onnx.export(model, (torch.randn(1, 3, size, size),), str(tmp), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---- Torch-Pruning ------------------------------------------------------------------------------------------------
def attention_layers(model: nn.Module) -> list[SelfAttention]:
    return [m for m in model.modules() if isinstance(m, SelfAttention)]


def heads_and_widths(model: nn.Module) -> dict:
    """Heads per attention layer, hidden width per feed-forward block (in block order) and the residual width."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    return {"heads": [b.attn.heads for b in blocks], "mlp": [b.up.out_features for b in blocks],
            "residual": blocks[0].up.in_features}


def tp_prune(model: nn.Module, x, ratio: float, round_to: int | None, residual: bool = False) -> nn.Module:
    """A pruned copy of `model` by Torch-Pruning's `MetaPruner` with its L2 magnitude importance: `ratio` of the
    heads of every attention layer (whole heads: `prune_num_heads`, head width kept) and of every feed-forward hidden
    width, per layer; with `residual` also of the residual width (the embeddings' width, through every LayerNorm).
    The classifier and the pooler stay whole. Each attention module's head count is then set from the pruner's, as
    Torch-Pruning's HF examples do."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    attention = attention_layers(pruned)
    num_heads = {linear: a.heads for a in attention for linear in (a.q, a.k, a.v)}
    # it removes ceil(ratio × heads) heads per layer: keep one (all heads gone would leave q/k/v unpruned)
    head_ratio = min(ratio, min((a.heads - 1) / a.heads for a in attention))
    loose = [(p, p.dim() - 1) for p in pruned.parameters(recurse=False)]  # a ViT's class token and positions
    pruner = tp.pruner.MetaPruner(
        pruned, as_inputs(x), importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=head_ratio,
        ignored_layers=pruned.keep_whole(residual), round_to=round_to, unwrapped_parameters=loose)
    pruner.step()
    for a in attention:
        a.heads = pruner.num_heads[a.q]
        if a.heads * a.head_dim != a.q.out_features:
            raise RuntimeError(f"Torch-Pruning left {a.q.out_features} q channels, not {a.heads} heads of "
                               f"{a.head_dim}: it pruned inside heads")
    return pruned
