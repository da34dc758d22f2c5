"""Normalisations of the masked torch model over the kept channels only, as the pruned ONNX model computes them.

Pruning a group that a normalisation runs over (`ChannelGroup.approximate`) changes the function: the pruned
model's LayerNormalization, ReduceMean, ReduceSum ... see the kept channels alone. The masked stand-in
(`train.masked`) keeps every channel, and masked weights leave the pruned positions of a residual stream anything
but zero (x − mean is not). So, while a keep set is in force, every converted node that reduces over such channels
reads its input through the keep mask (a mean divides by the kept count, a LayerNormalization normalises over the
kept channels), and every node that applies a statistic back to them writes zeros to the pruned positions. The
nodes are found on the ONNX graph the channel analysis ran on, their torch modules by their outputs
(`TorchModel.modules`); forward hooks make the change, so parameters and state dicts stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from onnxecc.core.errors import UnsupportedModelError
from onnxecc.graph.channels import ELEMENTWISE, STATISTICS, ChannelGraph, Positions
from onnxecc.graph.graph import Graph
from onnxecc.train.bridge import TorchModel


@dataclass
class Site:
    """A node whose torch module must see the pruned channels of `tensor` as absent."""

    kind: str  # "reduce" (reads through the mask), "mean" (and divides by the kept count), "layernorm", "apply"
    output: str  # the node's first output: finds its torch module
    pos: Positions  # the channels it reads (reduce, mean, layernorm) or writes (apply)
    axes: list[int] | None = None  # a reduction's axes as the node gives them (None: every axis)


def find_sites(model: onnx.ModelProto, graph: ChannelGraph) -> list[Site]:
    """The nodes that compute across channels of approximate groups: reductions over exactly those channels,
    LayerNormalizations over them, and elementwise nodes that apply a computed value without channels (a statistic)
    to them. The channel analysis froze every other way of reading across a prunable group's channels."""
    approximate = {g.id for g in graph.groups if g.approximate and g.prunable}
    consts = Graph(model)

    def held(tensor: str) -> Positions | None:
        pos = graph.positions(tensor)
        return pos if pos is not None and set(pos.gid.ravel().tolist()) & approximate else None

    found = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or not node.output or not node.input:
            continue
        op, x, out = node.op_type, node.input[0], node.output[0]
        if op in STATISTICS and (pos := held(x)) is not None:
            found.append(Site("mean" if op == "ReduceMean" else "reduce", out, pos, _axes(node, consts)))
        elif op == "LayerNormalization" and (pos := held(x)) is not None:
            found.append(Site("layernorm", out, pos))
        elif op in ELEMENTWISE and (pos := held(out)) is not None and any(
                n and graph.positions(n) is None and consts.const(n) is None for n in node.input):
            found.append(Site("apply", out, pos))
    return found


def _axes(node: onnx.NodeProto, consts: Graph) -> list[int] | None:
    for a in node.attribute:
        if a.name == "axes":
            return list(onnx.helper.get_attribute_value(a))
    value = consts.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    return None if value is None or value.size == 0 else [int(v) for v in value.ravel()]


class Normalisations:
    """The hooks that one keep set puts on a converted module (`set_keep` replaces them)."""

    def __init__(self, tm: TorchModel, graph: ChannelGraph):
        self.tm = tm
        self.graph = graph
        self.sites = find_sites(tm.original, graph)
        self.handles: list = []

    def set_keep(self, keep: dict[int, np.ndarray]) -> None:
        """Hook every site whose channels lose a unit under `keep` (kept unit indices per group); unhook the rest."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if not self.sites:
            return
        flags = {g: np.isin(np.arange(self.graph.groups[g].size), idx) for g, idx in keep.items()}
        flat = self.graph.flat(flags)
        for site in self.sites:
            kept = site.pos.kept(flat, self.graph.offsets)
            if kept.all():
                continue
            name = self.tm.modules.get(site.output)
            if name is None:
                raise UnsupportedModelError(f"cannot find the torch module that computes '{site.output}', a "
                                            "normalisation over pruned channels")
            self.handles += _hook(self.tm.module.get_submodule(name), site, kept)


def _mask(kept: np.ndarray, axes: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """The keep mask shaped to broadcast against `like` (its channels on `axes`)."""
    shape = [1] * like.dim()
    for t, ax in enumerate(axes):
        shape[ax] = kept.shape[t]
    return torch.from_numpy(kept.astype(np.float32)).reshape(shape).to(like.device, like.dtype)


def _hook(module: nn.Module, site: Site, kept: np.ndarray) -> list:
    axes = site.pos.axes
    if site.kind in ("reduce", "mean"):
        scale = kept.size / kept.sum()

        def over_channels(x: torch.Tensor) -> bool:
            reduced = range(x.dim()) if site.axes is None else [a % x.dim() for a in site.axes]
            return set(reduced) == set(axes)

        def masked_input(_, args):
            x = args[0]
            return (x * _mask(kept, axes, x), *args[1:]) if over_channels(x) else None

        def kept_mean(_, args, output):
            return output * scale if over_channels(args[0]) else None

        handles = [module.register_forward_pre_hook(masked_input)]
        if site.kind == "mean":
            handles.append(module.register_forward_hook(kept_mean))
        return handles
    if site.kind == "layernorm":
        def kept_layer_norm(_, args, output):
            x = args[0]
            if isinstance(module, nn.LayerNorm):
                weight, bias, eps = module.weight, module.bias, module.eps
            else:  # onnx2torch's OnnxLayerNorm: computed scale and bias come as inputs
                weight, bias, eps = args[1], args[2] if len(args) > 2 else None, module.epsilon
            return masked_layer_norm(x, _mask(kept, axes, x), weight, bias, eps)

        return [module.register_forward_hook(kept_layer_norm)]
    return [module.register_forward_hook(lambda _, args, output: output * _mask(kept, axes, output))]


def masked_layer_norm(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      eps: float) -> torch.Tensor:
    """LayerNorm over the last axis counting only the positions where `mask` is 1 (0 elsewhere in the result)."""
    count = mask.sum()
    mean = (x * mask).sum(-1, keepdim=True) / count
    centred = (x - mean) * mask
    var = (centred * centred).sum(-1, keepdim=True) / count
    y = centred / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y * mask
