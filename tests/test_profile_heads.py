"""The latency profile of a transformer (#25): head counts are width variables the profiler samples and fits.

A unit of an attention-head group is a head of `head_dim` channels, and the width step (16 on AVX-512 CPUs)
counts channels as compress's `--round-to` does: heads of 8 channels are sampled and snapped in steps of 2 heads,
not of 16 (which an 8-head group never goes below). Checked against the torch model's configuration, the MACs
counted again on the pruned files, and timings of the pruned variants.

The model is tests/zoo.py's BERT-style encoder made wider (dim 64, 8 heads of 8 channels) at 64 tokens: the
zoo's own (dim 32, 16 tokens) runs in ~65 µs, mostly per-node overhead, and its pruned variants time slower
than the full model (the Mul/Add that surgery puts on computed Reshape shapes stop onnxruntime folding them),
so its latency does not follow its widths at all."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import zoo

from onnxecc.core.errors import UserError
from onnxecc.cost.profiler import ModelInfo, load_profile, profile, profile_cost, sampling, store
from onnxecc.graph import runtime
from onnxecc.graph.layers import find_layers
from onnxecc.graph.surgery import prune_channels
from onnxecc.optimize.projection import allowed_widths

TOKENS = 64
SHAPES = {"input_ids": (1, TOKENS), "attention_mask": (1, TOKENS)}
STEP = 16


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """(ModelInfo of the wider encoder at 1 × 64 tokens, the torch model it was exported from)."""
    import torch

    torch.manual_seed(0)
    model = type(zoo.build_encoder())(dim=64, heads=8).eval()
    path = tmp_path_factory.mktemp("encoder") / "encoder.onnx"
    axes = {0: "batch", 1: "sequence"}
    ids, mask = torch.randint(0, zoo.ENCODER_VOCAB, (1, TOKENS)), torch.ones(1, TOKENS, dtype=torch.int64)
    with torch.no_grad():
        torch.onnx.export(model, (ids, mask), str(path), dynamo=False, input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], opset_version=17,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes})
    return ModelInfo.of(onnx.load(str(path)), SHAPES), model


def head_variables(info: ModelInfo) -> list[int]:
    return [v for v, g in enumerate(info.variables.group) if g in info.graph.heads]


def q_columns(model: onnx.ModelProto) -> list[int]:
    """Output channels of every block's query projection (its weight's columns) in an ONNX file."""
    weights = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and "/q/" in node.name:
            out.append(int(weights[node.input[1]].dims[1]))
    return out


def test_head_groups_are_sampled_below_full_width_in_steps_of_channels(encoder):
    info, torch_model = encoder
    head_dim = torch_model.blocks[0].head_dim  # 8 channels: 2 heads make the 16-channel block
    heads = sorted(info.graph.heads)
    assert len(heads) == len(torch_model.blocks)
    samples = sampling.plan(info.graph, 24, seed=0, step=STEP)
    for s in samples:
        for gid, w in s.widths.items():
            channels = w * (head_dim if gid in heads else 1)
            assert channels % STEP == 0 or w == info.graph.groups[gid].size
    kept = [[s.widths[g] for g in heads] for s in samples]
    assert any(w < torch_model.blocks[0].heads for row in kept for w in row)  # heads are removed in the samples
    # the variants hold those head counts: their query projections have kept heads × head width columns, and run
    for s in samples[:6]:
        variant = sampling.build(info.model, info.graph, s)
        assert q_columns(variant) == [s.widths[g] * head_dim for g in heads]
        sess = runtime.session(variant)
        x = runtime.example_input(sess, batch=1, model=info.model, shapes=info.input_shapes)
        assert np.isfinite(sess.run(None, runtime.feed(sess, x))[0]).all()


def test_fit_features_at_the_channel_step_are_the_recounted_macs(encoder):
    """At widths on the 16-channel grid, the step-16 features (per-layer MACs fractions after the snap) are the
    MACs of the physically pruned file over the full model's, layer by layer, attention products included."""
    info, torch_model = encoder
    head_dim = torch_model.blocks[0].head_dim
    feats = info.features
    names = [layer.name for layer in info.layers]
    products = [k for k, layer in enumerate(info.layers) if layer.weight is None]
    assert len(products) == 2 * len(torch_model.blocks)
    full_macs = np.array([layer.macs for layer in info.layers], dtype=np.float64)
    rng = np.random.default_rng(0)
    heads_removed = 0
    for _ in range(3):
        keep = {}
        for g in info.graph.prunable_groups:
            per = head_dim if g.id in info.graph.heads else 1
            choices = [w for w in range(1, g.size + 1) if (w * per) % STEP == 0]  # multiples of 16 channels
            keep[g.id] = np.sort(rng.choice(g.size, int(rng.choice(choices)), replace=False))
        widths = np.array(sampling.variable_widths(info.variables, keep), dtype=np.float64)
        heads_removed += sum(widths[v] < feats.full[v] for v in head_variables(info))
        recount = find_layers(prune_channels(info.model, keep, info.graph), input_shapes=SHAPES)
        assert [layer.name for layer in recount] == names
        fractions = np.array([layer.macs for layer in recount], dtype=np.float64) / full_macs
        assert np.allclose(feats.layers(widths, STEP)[0], fractions, rtol=1e-12)
    assert heads_removed  # some of those widths removed heads (whose products then cost less)
    # off the grid, a head count snaps up to whole 16-channel blocks: 1 head of 8 channels costs what 2 do
    one = feats.full.copy()
    one[head_variables(info)] = 1
    assert feats.snap(one[None, :], STEP)[0][head_variables(info)].tolist() == [2] * len(torch_model.blocks)


PROFILE_OPTIONS = {"samples": 12, "meter": "cputime", "warmup": 2, "repeats": 6, "step": STEP, "input_shapes": SHAPES}


@pytest.fixture(scope="module")
def encoder_profile(encoder, tmp_path_factory):
    info, _ = encoder
    path = tmp_path_factory.mktemp("prof") / "encoder.json"
    return path, profile(info.model, path, **PROFILE_OPTIONS)


def test_encoder_profile_learns_head_counts(encoder, encoder_profile):
    info, torch_model = encoder
    head_dim = torch_model.blocks[0].head_dim
    path, prof = encoder_profile
    hv = head_variables(info)
    # what was measured: head counts below the full one, on the channel grid
    head_widths = {s["widths"][v] for s in prof.samples for v in hv}
    assert min(head_widths) < torch_model.blocks[0].heads
    assert all(w * head_dim % STEP == 0 for w in head_widths)
    # the JSON records a head's channels, and the cost compress projects with carries them (its --round-to in
    # channels then allows these head counts too)
    again = store.read(path)
    assert [v.get("channels_per_unit", 1) for v in again.variables] == \
        [head_dim if v in hv else 1 for v in range(len(info.variables.group))]
    cost = profile_cost(load_profile(path, info.model), info.model, info.graph, info.layers, info.variables)
    assert cost.channels_per_unit == {v: head_dim for v in hv}
    assert all(allowed_widths(8, 1, STEP, cost.channels_per_unit[v]).tolist() == [2, 4, 6, 8] for v in hv)
    # the fit regresses on the attention products, which vary over the samples with the kept heads at the sampling
    # step (cross-validation may still choose a coarser step, where the snap keeps pairs of heads whole)
    products = [layer.name for layer in info.layers if layer.weight is None]
    assert set(products) <= set(prof.fit.layers)
    widths = np.array([s["widths"] for s in prof.samples], dtype=np.float64)
    columns = info.features.layers(widths, prof.settings["step"])
    for k, layer in enumerate(info.layers):
        if layer.weight is None:
            assert columns[:, k].min() < 1.0
    # the cost at a sample with heads removed is the fitted model there: constant + Σ a_l × (MACs of layer l in
    # the pruned file / full) + linear terms, recounted on the variant
    full_macs = {layer.name: layer.macs for layer in info.layers}
    checked = 0
    for s in prof.samples:
        if all(s["widths"][v] == info.features.full[v] for v in hv):
            continue
        variant = sampling.build(info.model, info.graph, sampling.sample(info.graph, s["index"], 0, 1, STEP))
        recount = {layer.name: layer.macs for layer in find_layers(variant, input_shapes=SHAPES)}
        expected = prof.fit.constant + sum(a * recount[n] / full_macs[n] for n, a in prof.fit.layers.items())
        expected += sum(c * s["widths"][v] / info.features.full[v] for v, c in prof.fit.linear.items())
        assert cost(dict(enumerate(s["widths"]))) == pytest.approx(expected, rel=1e-9)
        checked += 1
    assert checked


def test_encoder_profile_estimates_timings(encoder, encoder_profile):
    """As for CNNs (tests/test_profiler.py): the full model's cost within 2× of a timing made now (this shared VM
    changes speed in spells), and the cost ratios of variants with heads removed within 30 % of their timed ratios
    (measured side by side with the full model now)."""
    info, torch_model = encoder
    path, prof = encoder_profile
    cost = profile_cost(load_profile(path, info.model), info.model, info.graph, info.layers, info.variables)
    full = runtime.session(info.model)
    x = runtime.example_input(full, batch=1, model=info.model, shapes=info.input_shapes)
    feed = runtime.feed(full, x)
    from onnxecc.cost.profiler.meters import CpuTimeMeter

    measured = min(CpuTimeMeter().measure(lambda: full.run(None, feed), 10, 50).value for _ in range(3))
    assert measured / 2 < cost(None) < measured * 2
    hv = head_variables(info)
    half = next(s for s in prof.samples if s["kind"] == "uniform0.5")
    assert all(half["widths"][v] < torch_model.blocks[0].heads for v in hv)  # the anchor removes heads
    variant = runtime.session(sampling.build(info.model, info.graph, sampling.sample(
        info.graph, half["index"], 0, 1, STEP)))
    timed = runtime.measure_pair(full, variant, x, rounds=9, repeats=50).ratio
    assert cost(dict(enumerate(half["widths"]))) / cost(None) == pytest.approx(timed, rel=0.3)
    # heads alone: two heads kept per block, every other width full
    keep = {g: np.arange(2) for g in info.graph.heads}
    heads_only = runtime.session(prune_channels(info.model, keep, info.graph))
    timed = runtime.measure_pair(full, heads_only, x, rounds=9, repeats=50).ratio
    estimate = cost({v: 2 for v in hv}) / cost(None)
    assert estimate < 1 and estimate == pytest.approx(timed, rel=0.3)


def test_a_head_profile_from_before_channel_steps_is_refused(encoder, encoder_profile, tmp_path):
    """A profile whose head variables carry no channels per head was fitted with head counts snapped in steps of 16
    heads: compress refuses it, and `profile` does not resume it (its samples came from that other plan)."""
    info, _ = encoder
    path, _ = encoder_profile
    data = json.loads(path.read_text())
    for v in data["variables"]:
        v.pop("channels_per_unit", None)
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"does not match this model's channel groups \(measured before #25"):
        profile_cost(load_profile(old, info.model), info.model, info.graph, info.layers, info.variables)
    data["fit"] = None
    old.write_text(json.dumps(data))
    with pytest.raises(UserError, match="other width variables"):
        profile(info.model, old, **PROFILE_OPTIONS)
