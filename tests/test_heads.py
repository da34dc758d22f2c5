"""Attention heads as channel groups: removing heads from the ONNX file computes what the torch model computes
with those heads' q, k and v projections zeroed (a head whose q, k and v are zero contributes nothing), for
three ways exporters write attention: Hugging-Face-style separate q/k/v with `view`, torchvision's
`nn.MultiheadAttention` (fused in-projection, sequence-first, batch × heads merged in one axis), Swin's fused qkv
Linear with relative position bias, and grouped-query attention (k/v heads shared by several q heads)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests import zoo

torch = pytest.importorskip("torch")


def _export(model, args, names, path, axes):
    # (not under no_grad: nn.MultiheadAttention would take its fused fast path, which has no ONNX export)
    torch.onnx.export(model, args, str(path), dynamo=False, input_names=names, output_names=["out"],
                      opset_version=17, dynamic_axes=axes)
    from onnxecc.graph import ingest
    return ingest.load(path)


def _analyse(proto, shapes):
    from onnxecc.graph import channels
    from onnxecc.graph.layers import with_static_shapes
    return channels.analyze(proto, with_static_shapes(proto, input_shapes=shapes))


def _run(proto, feeds, outputs=None):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def _random_keep(graph, rng):
    """A random non-empty, non-full subset of heads for every head group."""
    keep = {}
    for gid in graph.heads:
        size = graph.groups[gid].size
        keep[gid] = np.sort(rng.choice(size, rng.integers(1, size), replace=False))
    return keep


def _layer_of(graph, gid: int) -> int:
    """The block index in the product names of a head group ('/blocks.1/MatMul' → 1)."""
    return int(re.findall(r"(\d+)", graph.heads[gid][0])[-1 if "encoder_layer" not in graph.heads[gid][0] else 0])


def _zero_heads(rows_of, weight, bias, dropped, head_dim):
    """Zero the output rows of the dropped heads (rows_of: the row offsets of q, k and v in this projection)."""
    with torch.no_grad():
        for offset in rows_of:
            for h in dropped:
                weight[offset + h * head_dim:offset + (h + 1) * head_dim] = 0
                if bias is not None:
                    bias[offset + h * head_dim:offset + (h + 1) * head_dim] = 0


def test_hf_style_heads_pruned_equal_zeroed_heads_in_torch():
    from onnxecc.graph import ingest, surgery
    proto = ingest.load(zoo.export_encoder())
    graph = _analyse(proto, {"input_ids": (1, 16), "attention_mask": (1, 16)})
    model = zoo.build_encoder()
    blocks = list(model.blocks)
    assert sorted(graph.groups[g].size for g in graph.heads) == [b.heads for b in blocks]  # 4 heads each
    keep = _random_keep(graph, np.random.default_rng(0))
    for n, gid in enumerate(sorted(graph.heads)):
        b = blocks[n]
        dropped = sorted(set(range(b.heads)) - set(keep[gid].tolist()))
        for lin in (b.q, b.k, b.v):
            _zero_heads([0], lin.weight, lin.bias, dropped, b.head_dim)
    pruned = surgery.prune_channels(proto, keep, graph)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, zoo.ENCODER_VOCAB, (3, 23))  # another batch and length than analysed
    mask = np.ones((3, 23), np.int64)
    mask[1, 15:] = 0
    with torch.no_grad():
        want = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(_run(pruned, {"input_ids": ids, "attention_mask": mask})[0], want,
                               rtol=1e-4, atol=1e-5)


def test_hf_style_reshape_constants_hold_the_kept_heads():
    """The Shape-computed `view(B, T, heads, d)` is rewritten: at run time it yields the kept head count."""
    from onnxecc.graph import ingest, surgery
    proto = ingest.load(zoo.export_encoder())
    graph = _analyse(proto, {"input_ids": (1, 16), "attention_mask": (1, 16)})
    keep = {gid: np.arange(graph.groups[gid].size - 1 - n) for n, gid in enumerate(sorted(graph.heads))}
    pruned = surgery.prune_channels(proto, keep, graph)
    splits = [n.output[0] for n in pruned.graph.node if n.op_type == "Reshape"
              and re.fullmatch(r"/blocks\.\d+/Reshape(_\d)?", n.name) and n.name.rsplit("_", 1)[-1] != "3"]
    assert len(splits) == 6  # q, k, v in each of two blocks
    for name in splits:
        pruned.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    # the computed shapes stay what onnxruntime folds: Concats of Shape entries and constants, no arithmetic added
    ops = [n.op_type for n in proto.graph.node if n.op_type != "Constant"]
    assert sorted(ops) == sorted(n.op_type for n in pruned.graph.node if n.op_type != "Constant")
    feeds = {"input_ids": np.zeros((2, 9), np.int64), "attention_mask": np.ones((2, 9), np.int64)}
    shapes = [r.shape for r in _run(pruned, feeds, splits)]
    kept = [len(keep[g]) for g in sorted(graph.heads)]
    assert shapes == [(2, 9, kept[0], 8)] * 3 + [(2, 9, kept[1], 8)] * 3


def _small_vit():
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=10).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision zeroes it: outputs would all be 0
    return model


def test_multihead_attention_heads_pruned_equal_zeroed_heads_in_torch(tmp_path):
    """torchvision's ViT (vit_b_16's code at a small size): fused in_proj, sequence-first, and `view(T, B·heads,
    d)`, whose batch × heads entry surgery scales. Checked at batch 3 after analysing at batch 1."""
    from onnxecc.graph import surgery
    model = _small_vit()
    proto = _export(model, (torch.randn(1, 3, 32, 32),), ["input"], tmp_path / "vit.onnx",
                    {"input": {0: "batch"}, "out": {0: "batch"}})
    graph = _analyse(proto, None)
    assert sorted(graph.groups[g].size for g in graph.heads) == [4, 4]
    keep = _random_keep(graph, np.random.default_rng(2))
    layers = list(model.encoder.layers)
    for n, gid in enumerate(sorted(graph.heads)):
        attn = layers[n].self_attention
        dropped = sorted(set(range(4)) - set(keep[gid].tolist()))
        _zero_heads([0, 32, 64], attn.in_proj_weight, attn.in_proj_bias, dropped, 8)
    x = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = _run(surgery.prune_channels(proto, keep, graph), {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_swin_heads_pruned_equal_zeroed_heads_in_torch(tmp_path):
    """torchvision's Swin (swin_t's code at a small size): fused qkv Linear reshaped to (3, heads, d), relative
    position bias per head (a constant sliced with the heads), shifted windows."""
    from torchvision.models.swin_transformer import SwinTransformer

    from onnxecc.graph import surgery
    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                            num_classes=10).eval()
    proto = _export(model, (torch.randn(1, 3, 32, 32),), ["input"], tmp_path / "swin.onnx",
                    {"input": {0: "batch"}, "out": {0: "batch"}})
    graph = _analyse(proto, None)
    assert sorted(graph.groups[g].size for g in graph.heads) == [2, 2, 4, 4]
    # its windows are padded by amounts computed from the spatial size: that leaves the channels alone
    assert not any("computed pads" in (g.frozen_by or "") for g in graph.groups)
    keep = _random_keep(graph, np.random.default_rng(4))
    blocks = [blk for stage in (model.features[1], model.features[3]) for blk in stage]
    for n, gid in enumerate(sorted(graph.heads)):
        attn = blocks[n].attn
        heads, dim = attn.num_heads, attn.qkv.in_features
        dropped = sorted(set(range(heads)) - set(keep[gid].tolist()))
        _zero_heads([0, dim, 2 * dim], attn.qkv.weight, attn.qkv.bias, dropped, dim // heads)
    x = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = _run(surgery.prune_channels(proto, keep, graph), {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


class _GroupedQuery(torch.nn.Module):
    """One grouped-query attention layer as Llama-style code writes it: 4 q heads, 2 k/v heads, each k/v head
    repeated for the 2 q heads that share it (`expand` + `reshape`)."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, heads * self.d)
        self.k = torch.nn.Linear(dim, kv_heads * self.d)
        self.v = torch.nn.Linear(dim, kv_heads * self.d)
        self.o = torch.nn.Linear(heads * self.d, dim)

    def repeat(self, x):
        b, h, t, d = x.shape
        rep = self.heads // self.kv_heads
        return x[:, :, None, :, :].expand(b, h, rep, t, d).reshape(b, h * rep, t, d)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.d).transpose(1, 2)
        k = self.repeat(self.k(x).view(b, t, self.kv_heads, self.d).transpose(1, 2))
        v = self.repeat(self.v(x).view(b, t, self.kv_heads, self.d).transpose(1, 2))
        att = (q @ k.transpose(-1, -2) / self.d ** 0.5).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, self.heads * self.d))


def test_grouped_query_heads_prune_a_kv_head_with_its_q_heads(tmp_path):
    from onnxecc.graph import surgery
    torch.manual_seed(0)
    model = _GroupedQuery().eval()
    proto = _export(model, (torch.randn(1, 6, 32),), ["x"], tmp_path / "gqa.onnx",
                    {"x": {0: "batch", 1: "sequence"}, "out": {0: "batch", 1: "sequence"}})
    graph = _analyse(proto, {"x": (1, 6, 32)})
    assert [graph.groups[g].size for g in graph.heads] == [2]  # the unit is a k/v head and its two q heads
    (gid,) = graph.heads
    keep = {gid: np.array([1])}
    _zero_heads([0], model.q.weight, model.q.bias, [0, 1], 8)  # q heads 0 and 1 read k/v head 0
    for lin in (model.k, model.v):
        _zero_heads([0], lin.weight, lin.bias, [0], 8)
    x = np.random.default_rng(6).standard_normal((2, 11, 32)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = _run(surgery.prune_channels(proto, keep, graph), {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("full,per_unit,min_width,round_to", [(12, 64, 1, 16), (4, 8, 1, 16), (12, 64, 100, 16),
                                                               (16, 24, 1, 16), (32, 1, 1, 16)])
def test_min_width_and_round_to_count_channels_of_a_head(full, per_unit, min_width, round_to):
    """Widths allowed for a group whose unit holds `per_unit` channels: head counts whose channels are a multiple
    of --round-to and at least --min-width (and the full count), enumerated directly."""
    from onnxecc.optimize.projection import allowed_widths
    want = [w for w in range(1, full) if (w * per_unit) % round_to == 0 and w * per_unit >= max(min_width, 1)
            and w * per_unit >= min(round_to, per_unit * full)] + [full]
    assert allowed_widths(full, min_width, round_to, per_unit).tolist() == want


def test_data_free_compress_removes_heads_and_reports_them(tmp_path):
    """A MACs budget on the HF-style encoder removes heads (reported per layer, before → after, equal to the
    head groups' kept widths) and the output runs at another batch and length than analysed."""
    from onnxecc.compress import CompressOptions, compress
    out = tmp_path / "enc.onnx"
    result = compress(zoo.export_encoder(), 0.5, out, CompressOptions(
        metric="macs", input_shapes={"input_ids": (1, 16), "attention_mask": (1, 16)}))
    assert [h["layer"] for h in result.heads] == ["/blocks.0", "/blocks.1"]
    assert all(h["before"] == 4 and (h["after"], h["before"]) == result.widths[h["group"]] for h in result.heads)
    assert any(h["after"] < h["before"] for h in result.heads)
    feeds = {"input_ids": np.ones((2, 30), np.int64), "attention_mask": np.ones((2, 30), np.int64)}
    assert _run(onnx.load(out), feeds)[0].shape == (2, 5)


def test_dynamo_export_heads_pruned_equal_zeroed_heads_in_torch(tmp_path):
    """torch's dynamo exporter writes the head split as one Reshape with allowzero=1 and a shape computed from
    the symbolic batch and length, shared by q, k and v."""
    from onnxecc.graph import ingest, surgery
    model = zoo.build_encoder()
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=zoo.ENCODER_MAX_LEN)
    ids, mask = torch.randint(0, zoo.ENCODER_VOCAB, (2, 16)), torch.ones(2, 16, dtype=torch.int64)
    path = tmp_path / "dynamo.onnx"
    torch.onnx.export(model, (ids, mask), str(path), dynamo=True, input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}),
                      external_data=False)
    proto = ingest.load(path)
    assert any(a.name == "allowzero" and a.i == 1 for n in proto.graph.node if n.op_type == "Reshape"
               for a in n.attribute)
    graph = _analyse(proto, {"input_ids": (1, 16), "attention_mask": (1, 16)})
    assert sorted(graph.groups[g].size for g in graph.heads) == [4, 4]
    keep = _random_keep(graph, np.random.default_rng(7))
    for n, gid in enumerate(sorted(graph.heads)):
        b = model.blocks[n]
        dropped = sorted(set(range(4)) - set(keep[gid].tolist()))
        for lin in (b.q, b.k, b.v):
            _zero_heads([0], lin.weight, lin.bias, dropped, b.head_dim)
    ids = np.random.default_rng(8).integers(0, zoo.ENCODER_VOCAB, (3, 21))
    mask = np.ones((3, 21), np.int64)
    with torch.no_grad():
        want = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    got = _run(surgery.prune_channels(proto, keep, graph), {"input_ids": ids, "attention_mask": mask})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # and it trains: onnx2torch converts it (Gelu-20 written out, allowzero dropped on computed view shapes)
    from onnxecc.train.bridge import to_torch
    tm = to_torch(proto, {"input_ids": (1, 16), "attention_mask": (1, 16)})
    with torch.no_grad():
        converted = tm.module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(converted, _run(proto, {"input_ids": ids, "attention_mask": mask})[0],
                               rtol=1e-4, atol=1e-5)


def test_inspect_names_the_head_groups():
    from onnxecc.inspection import group_status, inspect
    result = inspect(zoo.export_encoder(), input_shapes={"input_ids": (1, 16), "attention_mask": (1, 16)})
    info = result.as_dict()
    heads = [g["id"] for g in info["groups"] if g["heads"]]
    assert len(heads) == info["totals"]["head_groups"] == 2
    for gid, block in zip(heads, ("/blocks.0", "/blocks.1")):
        assert group_status(result.groups[gid], result.heads) == f"prunable: 4 attention heads ({block})"


def test_vit_residual_width_with_class_token_is_approximate_and_masked_torch_equals_pruned_onnx(tmp_path):
    """ViT's residual width runs through the class token (`token.expand(B, -1, -1)` concatenated with the patch
    tokens), the position embedding and every LayerNorm: one approximate group. With heads, MLP and residual
    pruned at random, the masked torch model (pruned channels zero, LayerNorms over the kept ones) computes what
    onnxruntime computes on the physically pruned file."""
    from onnxecc.cost.analysis import analyse
    from onnxecc.graph.data import Dataset
    from onnxecc.graph.surgery import prune_channels
    from onnxecc.train.finetune import TrainConfig
    from onnxecc.train.masked import MaskedModel
    model = _small_vit()
    proto = _export(model, (torch.randn(1, 3, 32, 32),), ["input"], tmp_path / "vit.onnx",
                    {"input": {0: "batch"}, "out": {0: "batch"}})
    graph = analyse(proto).graph
    (residual,) = [g for g in graph.prunable_groups if g.approximate]
    assert residual.size == 32 and "LayerNormalization" in residual.approximate
    x = np.random.default_rng(9).standard_normal((16, 3, 32, 32)).astype(np.float32)
    mm = MaskedModel(proto, graph, Dataset(x, None, x[:0], None, "vit"), TrainConfig(batch_size=8, seed=0),
                     recalibration=False)
    rng = np.random.default_rng(10)
    keep = {g.id: np.sort(rng.choice(g.size, max(1, g.size // 2), replace=False)) for g in graph.prunable_groups}
    mm.set_keep(keep)
    with torch.no_grad():
        expected = mm.inputs(x[:4])(mm.tm.module.eval()).numpy()
    got = _run(prune_channels(mm.write_back(), keep, graph), {"input": x[:4]})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
