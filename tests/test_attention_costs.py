"""The cost of a transformer (#25): attention's two products of computed tensors (Q·Kᵀ and softmax·V) counted in
MACs, and in the bilinear cost the budgets use, checked against the torch model's configuration and against a
recount on physically pruned files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import zoo

from onnxecc.graph.layers import find_layers


@pytest.fixture(scope="module")
def encoder():
    """(the ONNX encoder, the torch model it was exported from)."""
    return onnx.load(str(zoo.export_encoder())), zoo.build_encoder()


def shapes(length: int) -> dict[str, tuple[int, int]]:
    return {"input_ids": (1, length), "attention_mask": (1, length)}


def attention_macs(torch_model, length: int, heads: list[int] | None = None) -> int:
    """Per block, scores (heads × T × T, d_k each) and context (heads × T × d_k, T each): 2 · heads · T² · d_k."""
    blocks = torch_model.blocks
    heads = heads if heads is not None else [b.heads for b in blocks]
    return sum(2 * h * length * length * b.head_dim for b, h in zip(blocks, heads))


def linear_macs(torch_model, length: int) -> int:
    """The Linear layers: every block's per token, the pooler and classifier on the first token only."""
    import torch

    per_token = sum(m.in_features * m.out_features for m in torch_model.blocks.modules()
                    if isinstance(m, torch.nn.Linear))
    head = sum(m.in_features * m.out_features for m in (torch_model.pool, torch_model.classify))
    return per_token * length + head


@pytest.mark.parametrize("length", [16, 40])
def test_attention_macs_follow_heads_dk_and_length_squared(encoder, length):
    proto, torch_model = encoder
    layers = find_layers(proto, input_shapes=shapes(length))
    products = [layer for layer in layers if layer.weight is None]
    assert len(products) == 2 * len(torch_model.blocks)
    assert all(p.op == "MatMul" and p.kind == "activation" and p.params == 0 for p in products)
    assert sum(p.macs for p in products) == attention_macs(torch_model, length)
    assert sum(layer.macs for layer in layers) == attention_macs(torch_model, length) + linear_macs(torch_model, length)


def test_inspect_total_includes_attention(encoder):
    from onnxecc.inspection import inspect

    proto, torch_model = encoder
    result = inspect(proto, input_shapes=shapes(24))
    totals = result.as_dict()["totals"]
    assert totals["macs"] == attention_macs(torch_model, 24) + linear_macs(torch_model, 24)
    assert totals["activation_macs"] == attention_macs(torch_model, 24)
    products = [row for row in result.as_dict()["layers"] if row["kind"] == "activation"]
    assert len(products) == 2 * len(torch_model.blocks) and all(row["weight"] is None for row in products)


def test_bilinear_macs_equal_recount_of_pruned_files(encoder):
    """For random keep sets (heads removed in every block, MLP and pooler widths too), the MACs cost at the kept
    widths equals the MACs counted again on the physically pruned file, and its attention equals the formula at
    the kept head counts."""
    from onnxecc.cost.analysis import analyse
    from onnxecc.cost.costs import layer_costs, macs_cost
    from onnxecc.graph.surgery import prune_channels

    proto, torch_model = encoder
    a = analyse(proto, input_shapes=shapes(16))
    cost = macs_cost(a.graph, a.layers, proto, a.variables)
    per_layer = layer_costs(a.graph, a.layers, proto, a.variables)
    heads = sorted(g for g in a.graph.heads if a.graph.groups[g].prunable)  # numbered in layer order: by block
    assert len(heads) == len(torch_model.blocks)
    rng = np.random.default_rng(0)
    for _ in range(3):
        keep = {}
        for g in a.graph.prunable_groups:
            most = g.size - 1 if g.id in heads else g.size  # at least one head gone per block
            keep[g.id] = np.sort(rng.choice(g.size, int(rng.integers(1, most + 1)), replace=False))
        widths = {v: int(np.isin(units, keep[g]).sum())
                  for v, (g, units) in enumerate(zip(a.variables.group, a.variables.units)) if g in keep}
        recount = find_layers(prune_channels(proto, keep, a.graph), input_shapes=shapes(16))
        assert cost(widths) == sum(layer.macs for layer in recount)
        assert sum(c(widths) for c in per_layer) == cost(widths)
        kept_heads = [len(keep[g]) for g in heads]
        assert sum(layer.macs for layer in recount if layer.weight is None) == \
            attention_macs(torch_model, 16, kept_heads)


def test_profile_features_include_attention_products(encoder):
    """A fitted latency profile regresses on per-layer MACs fractions: the attention products are features of
    their own, varying with the kept heads."""
    from onnxecc.cost.profiler import ModelInfo

    proto, torch_model = encoder
    info = ModelInfo.of(proto, shapes(16))
    products = [k for k, layer in enumerate(info.layers) if layer.weight is None]
    assert len(products) == 2 * len(torch_model.blocks)
    assert info.features.active[products].all()
    full = np.array([len(u) for u in info.variables.units], dtype=np.float64)
    heads = [v for v, g in enumerate(info.variables.group) if g in info.graph.heads]
    half = full.copy()
    half[heads] = full[heads] / 2
    fractions = info.features.layers(half)[0]
    assert np.allclose(fractions[products], 0.5)  # half the heads: half the attention MACs
