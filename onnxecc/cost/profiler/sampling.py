"""Width sampling: which variants of the model the profiler measures, and how they are built.

Sample i is reproducible from (seed, i) alone, so an interrupted profile resumes with exactly the samples it
would have measured. The first samples are anchors — the full model and every prunable group at 25 %, 50 %
and 75 % of its width — then each random sample draws, per prunable channel group, a width uniformly in
[min_width, size] (with `step` > 1: among the multiples of `step` in that range, and the full width) and which
units to keep (at random: timing does not depend on which channels go). `min_width` and `step` count channels,
as compress's `--min-width`/`--round-to` do: a unit of an attention-head group is a head of many channels, so
a 12-head group of 64-channel heads takes any head count at step 16 (`costs.allowed_widths`).
The variant is the ORIGINAL model with those channels physically removed by `onnxecc.graph.surgery.prune_channels`
(its weights are slices of the original ones). The cost model only sees the width of each width variable
(`costs.Variables`): the number of kept units of that class.

onnx and numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxecc.cost.costs import allowed_widths
from onnxecc.graph.surgery import prune_channels

ANCHORS = (("full", None), ("uniform0.25", 0.25), ("uniform0.5", 0.5), ("uniform0.75", 0.75))


@dataclass
class Sample:
    index: int
    kind: str  # full | uniformF | random
    widths: dict[int, int]  # prunable group id -> kept units
    keep: dict[int, np.ndarray]  # prunable group id -> kept unit indices (groups at full width omitted)


def plan(graph, n: int, seed: int = 0, min_width: int = 1, step: int = 1) -> list[Sample]:
    """The first `n` samples (anchors first; fewer anchors when n is smaller than their number)."""
    return [sample(graph, i, seed, min_width, step) for i in range(n)]


def allowed(size: int, min_width: int = 1, step: int = 1, per_unit: int = 1) -> np.ndarray:
    """Widths in units a group of `size` units of `per_unit` channels each may take: those whose channels are
    multiples of `step` and at least max(min_width, step), and `size` — the widths compress may choose."""
    return allowed_widths(size, max(1, int(min_width)), step, per_unit)


def channels_per_unit(graph) -> dict[int, int]:
    """Channels one unit of a group stands for, where not 1: a head of an attention-head group (`graph.heads`)."""
    return {g: graph.groups[g].channels // graph.groups[g].size for g in graph.heads
            if graph.groups[g].channels > graph.groups[g].size}


def sample(graph, index: int, seed: int = 0, min_width: int = 1, step: int = 1) -> Sample:
    """Sample `index`: an anchor, or uniform random widths among the allowed ones of every prunable group."""
    rng = np.random.default_rng([int(seed), int(index)])
    groups = graph.prunable_groups
    per_unit = channels_per_unit(graph)
    choices = {g.id: allowed(g.size, min_width, step, per_unit.get(g.id, 1)) for g in groups}
    if index < len(ANCHORS):
        kind, fraction = ANCHORS[index]
        if fraction is None:
            widths = {g.id: g.size for g in groups}
        else:  # the allowed width nearest to fraction × size
            widths = {g.id: int(choices[g.id][np.argmin(np.abs(choices[g.id] - fraction * g.size))]) for g in groups}
    else:
        kind = "random"
        widths = {g.id: int(rng.choice(choices[g.id])) for g in groups}
    keep = {}
    for g in groups:
        w = widths[g.id]
        if w < g.size:
            keep[g.id] = np.sort(rng.choice(g.size, size=w, replace=False))
    return Sample(index, kind, widths, keep)


def variable_widths(variables, keep: dict[int, np.ndarray]) -> list[int]:
    """Kept units per width variable (a variable of a group absent from `keep` is at full width)."""
    out = []
    for g, units in zip(variables.group, variables.units):
        if g in keep:
            out.append(int(np.isin(units, keep[g]).sum()))
        else:
            out.append(int(len(units)))
    return out


def build(model: onnx.ModelProto, graph, s: Sample) -> onnx.ModelProto:
    """The variant of `s`: the original model with the unkept channels removed."""
    if not s.keep:
        return model
    return prune_channels(model, s.keep, graph)


def auto_step(provider: str = "CPUExecutionProvider") -> int:
    """The channel block the target's kernels like: on ORT CPU the NCHWc block of MLAS — 16 with AVX-512F,
    8 with AVX2 or elsewhere (off that grid a convolution falls back to a slower kernel: measured 26 % slower
    for 31 channels than for 32 on the demo CNN); 8 for other execution providers (tensor-core tiles)."""
    if provider != "CPUExecutionProvider":
        return 8
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return 16 if "avx512f" in line.split() else 8
    except OSError:
        pass
    return 8
