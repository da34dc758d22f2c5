"""Channel importance and channel masks, computed on the ONNX graph (numpy only).

Kept apart from the projection (which only needs numbers per channel) and from surgery (which only needs
the kept indices), so another importance criterion is one new function here.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from onnxecc.graph.channels import ChannelGraph
from onnxecc.graph.graph import Graph


def l2_importance(model: onnx.ModelProto, graph: ChannelGraph, normalize: bool = True,
                  diminishing: bool = True, values: Mapping[str, np.ndarray] | None = None,
                  norm: str = "l2", fisher: Mapping[str, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """Squared L2 norm of every unit's producer weights, per prunable group.

    Raw squared norms are what a Euclidean projection (ADMM's Z-step) maximises. With `normalize`, each
    group's importances are divided by their mean, so the knapsack compares channels *within* their layer's
    scale: exporters fold BatchNorm into weights, which makes raw norms incomparable across layers.
    With `diminishing`, the k-th strongest unit of a group is worth its normalised norm divided by k, so a
    group's kept value grows like log(width). Without it, the knapsack empties whichever group saves the most
    cost per channel (on the digits residual demo: the 32-channel trunk cut to 1 channel, 43% accuracy after
    fine-tuning); with it, widths are traded like a proportional-fair allocation (same budget: 98%).
    `values` overrides tensors by name (e.g. the current torch weights during training); `norm="l1"` sums
    absolute values instead of squares (the classic L1 filter criterion).

    With `fisher` (per tensor, the diagonal empirical Fisher Σ(∂L/∂w)² of each weight: `MaskedModel.fisher`),
    a unit is worth Σ F·w² — the second-order estimate of how much the loss grows when it is removed (Optimal
    Brain Damage's saliency, summed over the unit). That is in units of loss, comparable across layers
    whatever BatchNorm folding did to the weights' scale, so `normalize` is not applied; producer tensors
    without a Fisher entry (untrained constants) count as zero.
    """
    consts = Graph(model)
    prunable = {g.id for g in graph.prunable_groups}
    out = {g: np.zeros(graph.groups[g].size) for g in prunable}
    for bind in graph.binds:
        if bind.role != "producer":
            continue
        value = values[bind.name] if values is not None and bind.name in values else consts.const(bind.name)
        if value is None:
            continue
        weight = fisher.get(bind.name) if fisher is not None else None
        if fisher is not None and weight is None:
            energy = np.zeros(value.shape[bind.axis])
        else:
            energy = _axis_energy(value, bind.axis, norm, weight)
        del value
        gid, unit, e = bind.pos.gid.ravel(), bind.pos.unit.ravel(), energy.ravel()
        for g in set(gid.tolist()) & prunable:
            sel = gid == g
            np.add.at(out[g], unit[sel], e[sel])
    if normalize and fisher is None:
        for g, values in out.items():
            mean = values.mean()
            out[g] = values / mean if mean > 0 else np.ones_like(values)
    if diminishing:
        for g, values in out.items():
            ranks = np.empty(len(values))
            ranks[np.argsort(-values, kind="stable")] = np.arange(1, len(values) + 1)
            out[g] = values / ranks
    return out


_CHUNK_BYTES = 64 * 2**20  # float64 work arrays of a large weight are built this many bytes at a time


def _axis_energy(value: np.ndarray, axis: int, norm: str, weight: np.ndarray | None) -> np.ndarray:
    """Σ |w| (l1) or Σ w² (times the Fisher `weight`, if given) over every axis but `axis`, in float64.

    A weight of more than `_CHUNK_BYTES` in float64 is summed in slabs along its first axis: whole, its float64
    square is twice its size again (a 1 GB float32 matrix would need 4 GB more). Small weights are summed
    whole, exactly as before."""
    def energy(v, w):
        m = np.abs(v.astype(np.float64)) if norm == "l1" else np.square(v.astype(np.float64))
        if w is not None:
            m = m * w
        return m.sum(axis=tuple(a for a in range(m.ndim) if a != axis))

    rows = max(1, _CHUNK_BYTES // max(1, 8 * value[:1].size)) if value.ndim else 0
    if value.ndim < 2 or value.size * 8 <= _CHUNK_BYTES or rows >= value.shape[0]:
        return energy(value, weight)
    parts = [energy(value[i:i + rows], None if weight is None else np.broadcast_to(weight, value.shape)[i:i + rows])
             for i in range(0, value.shape[0], rows)]
    return np.concatenate(parts) if axis == 0 else np.sum(parts, axis=0)


def channel_masks(model: onnx.ModelProto, graph: ChannelGraph, keep: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """0/1 mask (the tensor's shape) of every constant that carries a pruned group's channels. Zeroing these
    makes the full-size model compute exactly what the physically pruned one computes, so it can be trained
    as a stand-in for it."""
    consts = Graph(model)
    flags = {g: np.isin(np.arange(graph.groups[g].size), idx) for g, idx in keep.items()}
    flat = graph.flat(flags)
    masks: dict[str, np.ndarray] = {}
    for bind in graph.binds:
        kept = bind.pos.kept(flat, graph.offsets).ravel()
        if kept.all():
            continue
        value = consts.const(bind.name)
        if value is None:
            continue
        shape = [1] * value.ndim
        shape[bind.axis] = kept.size
        mask = np.broadcast_to(kept.reshape(shape), value.shape)
        masks[bind.name] = mask & masks[bind.name] if bind.name in masks else mask.copy()
    return masks
