"""Widths through normalisations (approximate groups) and embedding tables (issue 25).

A LayerNorm over the channels — fused (opset 17), written out as tf2onnx and older exporters do (ReduceSum/
ReduceMean, Sub, Pow, Sqrt, Reciprocal, Div), or as RMSNorm — no longer freezes the group: it is prunable but
approximate (pruning changes the function), pruned only with --data. The masked torch model then normalises over the
kept channels, as the pruned ONNX model does. An embedding table's columns are a group like a layer's outputs.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from zoo import export_encoder

from onnxecc.core.errors import UserError
from onnxecc.cost.analysis import analyse
from onnxecc.graph import ingest, runtime
from onnxecc.graph.surgery import prune_channels

ENCODER_SHAPES = {"input_ids": (1, 16), "attention_mask": (1, 16)}


# ---- small torch models, exported here ------------------------------------------------------------------------
class ConvLayerNorm(nn.Module):
    """A conv whose channels are layer-normalised (ConvNeXt-style permute → LayerNorm → permute back)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.norm = nn.Conv2d(3, 16, 3, padding=1), nn.LayerNorm(16)
        self.conv2, self.fc = nn.Conv2d(16, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.conv1(x)).permute(0, 2, 3, 1)
        h = self.norm(h).permute(0, 3, 1, 2)
        return self.fc(torch.relu(self.conv2(h)).mean((2, 3)))


class WrittenOutNorms(nn.Module):
    """LayerNorm written out as tf2onnx does (a keepdims=0 ReduceSum scaled by a constant, E[x²] − mean², the
    scale multiplied into 1/σ first), a residual block, then an RMSNorm written out (Pow, ReduceMean, Sqrt, Div)."""

    def __init__(self, width: int = 24):
        super().__init__()
        self.width = width
        self.inp, self.mid, self.out = nn.Linear(6, width), nn.Linear(width, width), nn.Linear(width, 3)
        self.gamma, self.beta = nn.Parameter(torch.rand(width) + 0.5), nn.Parameter(torch.randn(width) * 0.1)
        self.scale = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x):
        h = self.inp(x)
        mean = (h.sum(-1) * (1.0 / self.width)).unsqueeze(-1)
        var = (h * h).sum(-1, keepdim=True) / self.width - mean * mean
        h = (h - mean) * (torch.rsqrt(var + 1e-5) * self.gamma) + self.beta
        h = h + self.mid(torch.relu(h))
        h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale
        return self.out(h)


class LeakedMean(nn.Module):
    """A mean over the channels that is not applied back to them (an output feature): that still freezes."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(6, 24), nn.Linear(24, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return torch.cat([self.out(h), h.mean(-1, keepdim=True)], -1)


class Embedder(nn.Module):
    """An embedding table whose width a Linear consumes, averaged over the tokens: pruning it is exact."""

    def __init__(self):
        super().__init__()
        self.table, self.proj, self.out = nn.Embedding(50, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, ids):
        return self.out(torch.relu(self.proj(self.table(ids)).mean(1)))


def _export(module: nn.Module, example, path, opset: int = 17) -> onnx.ModelProto:
    torch.manual_seed(0)
    module.eval()
    names = ["input"] if not isinstance(example, tuple) else [f"input{i}" for i in range(len(example))]
    with torch.no_grad():
        torch.onnx.export(module, example if isinstance(example, tuple) else (example,), str(path), dynamo=False,
                          opset_version=opset, input_names=names, output_names=["out"],
                          dynamic_axes={n: {0: "batch"} for n in names + ["out"]})
    return ingest.load(path)


def _model(kind: str, tmp_path) -> onnx.ModelProto:
    torch.manual_seed(0)
    if kind in ("conv_ln", "conv_ln_14"):  # opset 14: torch writes the LayerNorm out (ReduceMean, Pow, Sqrt, Div)
        module = ConvLayerNorm()
        with torch.no_grad():  # a LayerNorm with non-trivial scale and bias
            module.norm.weight.uniform_(0.5, 1.5)
            module.norm.bias.uniform_(-0.2, 0.2)
        return _export(module, torch.randn(1, 3, 8, 8), tmp_path / f"{kind}.onnx", 14 if kind == "conv_ln_14" else 17)
    if kind == "written_out":
        return _export(WrittenOutNorms(), torch.randn(1, 6), tmp_path / "written_out.onnx")
    raise ValueError(kind)


def _inputs(model: onnx.ModelProto, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    shape[0] = n
    return rng.standard_normal(shape).astype(np.float32)


def _encoder_inputs(n: int, seed: int = 0):
    from onnxecc.graph.inputs import Feeds

    rng = np.random.default_rng(seed)
    mask = np.ones((n, 16), np.int64)
    mask[: n // 2, 12:] = 0  # padded tokens in half the samples
    return Feeds({"input_ids": rng.integers(0, 1000, (n, 16)).astype(np.int64), "attention_mask": mask})


def _random_keep(graph, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {g.id: np.sort(rng.choice(g.size, max(1, g.size // 2), replace=False)) for g in graph.prunable_groups}


# ---- the analysis -------------------------------------------------------------------------------------------------
def test_normalisations_over_channels_make_groups_approximate(tmp_path):
    """The group a LayerNorm (fused or written out, or RMSNorm) runs over is prunable and approximate, with the op
    that makes it so; the encoder's residual width (three embedding tables, five LayerNorms) is one such group."""
    conv = analyse(_model("conv_ln", tmp_path)).graph
    ln = next(g for g in conv.groups if g.size == 16)
    assert ln.prunable and ln.frozen_by is None and ln.approximate is not None
    assert ln.approximate.startswith("LayerNormalization") and "normalises over these channels" in ln.approximate
    assert {s.op for s in ln.members} >= {"LayerNormalization"}  # its scale and bias are sliced with the channels
    assert not next(g for g in conv.groups if g.size == 8).approximate  # the next conv's width stays exact
    older = next(g for g in analyse(_model("conv_ln_14", tmp_path)).graph.groups if g.size == 16)
    assert older.prunable and older.approximate.startswith("ReduceMean")

    written = analyse(_model("written_out", tmp_path)).graph
    hidden = next(g for g in written.groups if g.size == 24)
    assert hidden.prunable and hidden.approximate and hidden.approximate.startswith("ReduceSum")
    params = {s.op for s in hidden.members if s.role == "param"}
    assert {"Mul", "Add"} <= params  # γ (multiplied into 1/σ), β and the RMSNorm scale go with the channels
    assert sum(s.role == "param" for s in hidden.members) >= 3

    encoder = analyse(ingest.load(export_encoder()), input_shapes=ENCODER_SHAPES).graph
    residual = [g for g in encoder.groups if g.approximate]
    assert len(residual) == 1 and residual[0].size == 32 and residual[0].prunable
    tables = {s.tensor for s in residual[0].producers if s.op == "Gather"}
    assert tables == {"word.weight", "position.weight", "token_type.weight"}


def test_a_statistic_used_elsewhere_still_freezes(tmp_path):
    graph = analyse(_export(LeakedMean(), torch.randn(1, 6), tmp_path / "leak.onnx")).graph
    hidden = next(g for g in graph.groups if g.size == 24)
    assert not hidden.prunable and "uses a statistic of the channels" in hidden.frozen_by
    assert hidden.approximate is None


def test_magika_layernorm_is_approximate():
    """magika's tf2onnx graph: its written-out LayerNorm over the conv's 512 channels made every group frozen."""
    magika = pytest.importorskip("magika")
    from pathlib import Path

    path = next(Path(magika.__file__).parent.glob("models/*/model.onnx"))
    groups = analyse(ingest.load(path)).graph.groups
    approximate = [g for g in groups if g.prunable and g.approximate]
    assert [g.size for g in approximate] == [512]
    assert "LayerNorm_1" in approximate[0].approximate


# ---- compress without and with --data --------------------------------------------------------------------------
def test_data_free_compress_leaves_approximate_groups_whole(tmp_path):
    """Without --data the approximate group stays at full width and the report says why; when only it could meet
    the budget, the refusal names --data."""
    from onnxecc.compress import CompressOptions, compress

    model = _model("conv_ln", tmp_path)
    path = tmp_path / "conv_ln.onnx"
    graph = analyse(model).graph
    ln = next(g for g in graph.groups if g.approximate)
    opts = CompressOptions(metric="macs", method="project", closed_loop=False, round_to=1)
    result = compress(path, 0.7, tmp_path / "out.onnx", opts, report=tmp_path / "r.json")
    assert result.widths[ln.id] == (16, 16) and result.meets_budget
    assert any(w < f for g, (w, f) in result.widths.items() if g != ln.id)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["approximate_groups"] == [{"id": ln.id, "reason": ln.approximate, "pruned": False,
                                              "left": "approximate: needs --data"}]
    assert any("approximate: needs --data" in w for w in report["warnings"])
    with pytest.raises(UserError, match="--data") as refused:
        compress(path, 0.2, tmp_path / "low.onnx", opts)
    assert "\n" not in str(refused.value) and "approximate" in str(refused.value)
    assert not (tmp_path / "low.onnx").exists()


def test_compress_with_data_prunes_approximate_groups(tmp_path):
    """With --data the approximate group is pruned (and trained); the report records it and the output runs."""
    from onnxecc.compress import CompressOptions, compress

    model = _model("written_out", tmp_path)
    x = _inputs(model, 128)
    np.savez(tmp_path / "d.npz", x=x)
    graph = analyse(model).graph
    hidden = next(g for g in graph.groups if g.approximate)
    opts = CompressOptions(metric="macs", method="project", data=str(tmp_path / "d.npz"), epochs=1, round_to=1,
                           closed_loop=False)
    result = compress(tmp_path / "written_out.onnx", 0.4, tmp_path / "out.onnx", opts)
    assert result.widths[hidden.id][0] < 24 and result.meets_budget
    assert result.approximate_groups == [{"id": hidden.id, "reason": hidden.approximate, "pruned": True}]
    out = runtime.run_batched(runtime.session(ingest.load(tmp_path / "out.onnx")), x[:8])
    assert out.shape == (8, 3) and np.isfinite(out).all()


def test_keep_approximate_leaves_them_whole_with_data(tmp_path):
    """`compress --data --keep-approximate` prunes the exact groups only: the LayerNorm's width stays whole, the
    report says why, the output computes in ORT; a budget only the approximate group could reach is refused in one
    line naming the flag (a UserError: exit 2), no output."""
    from typer.testing import CliRunner

    from onnxecc.cli import app

    model = _model("conv_ln", tmp_path)
    np.savez(tmp_path / "d.npz", x=_inputs(model, 64))
    ln = next(g for g in analyse(model).graph.groups if g.approximate)
    args = ["compress", str(tmp_path / "conv_ln.onnx"), "--metric", "macs", "--method", "project", "--data",
            str(tmp_path / "d.npz"), "--epochs", "1", "--admm-iterations", "1", "--admm-epochs", "1", "--round-to", "1",
            "--keep-approximate"]
    runner = CliRunner()
    done = runner.invoke(app, [*args, "--budget", "0.7", "-o", str(tmp_path / "out.onnx"), "--report",
                               str(tmp_path / "r.json")])
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["approximate_groups"] == [{"id": ln.id, "reason": ln.approximate, "pruned": False,
                                              "left": "left whole: --keep-approximate"}]
    pruned = ingest.load(tmp_path / "out.onnx")
    assert dict((t.name, tuple(t.dims)) for t in pruned.graph.initializer)["norm.weight"] == (16,)
    assert report["cost_fraction"] <= 0.7
    x = _inputs(model, 4)
    assert np.isfinite(runtime.run_batched(runtime.session(pruned), x)).all()
    refused = runner.invoke(app, [*args, "--budget", "0.2", "-o", str(tmp_path / "low.onnx")])
    assert isinstance(refused.exception, UserError)  # `onnxecc.cli.main` prints it in one line, exit 2
    assert "drop --keep-approximate" in str(refused.exception) and "\n" not in str(refused.exception)
    assert not (tmp_path / "low.onnx").exists()


# ---- the torch side computes what the pruned ONNX computes -------------------------------------------------------
@pytest.mark.parametrize("kind", ["conv_ln", "conv_ln_14", "written_out", "encoder"])
def test_masked_torch_model_equals_the_pruned_onnx(kind, tmp_path):
    """For a random keep set over every prunable group (the approximate ones included), the masked torch model's
    outputs equal onnxruntime's on the physically pruned model — before and after a training epoch (which moves
    the LayerNorm's scale and bias too: they must reach the written model)."""
    from onnxecc.graph.data import Dataset
    from onnxecc.train.finetune import TrainConfig
    from onnxecc.train.masked import MaskedModel

    if kind == "encoder":
        model, shapes = ingest.load(export_encoder()), ENCODER_SHAPES
        x = _encoder_inputs(64)
    else:
        model, shapes = _model(kind, tmp_path), None
        x = _inputs(model, 64)
    analysis = analyse(model, input_shapes=shapes)
    graph = analysis.graph
    assert any(g.approximate for g in graph.prunable_groups)
    data = Dataset(x, None, x[:0], None, kind)
    mm = MaskedModel(model, graph, data, TrainConfig(batch_size=16, lr=1e-2, seed=0), recalibration=False)
    keep = _random_keep(graph)
    mm.set_keep(keep)
    # where a statistic is applied back (x − mean, x · 1/σ), the pruned positions stay zero as in the pruned model
    flat = graph.flat({g: np.isin(np.arange(graph.groups[g].size), k) for g, k in keep.items()})
    applied = {}
    for site in (s for s in mm.normalisations.sites if s.kind == "apply"):
        module = mm.tm.module.get_submodule(mm.tm.modules[site.output])
        module.register_forward_hook(lambda _, args, out, s=site: applied.__setitem__(s.output, (s, out.detach())))
    for trained in (False, True):
        if trained:
            mm.train(1)
        expected = mm.inputs(x[:8])(mm.tm.module.eval()).detach().numpy()
        pruned = prune_channels(mm.write_back(), keep, graph)
        got = runtime.run_batched(runtime.session(pruned), x[:8])
        np.testing.assert_allclose(expected, got, atol=1e-4, rtol=1e-4)
        assert bool(applied) == (kind in ("written_out", "conv_ln_14"))  # fused LayerNorms apply them inside
        for site, out in applied.values():
            pruned_at = ~site.pos.kept(flat, graph.offsets)
            moved = np.moveaxis(out.numpy(), site.pos.axes, range(out.dim() - len(site.pos.axes), out.dim()))
            assert pruned_at.any() and not moved[..., pruned_at].any()
    full = runtime.run_batched(runtime.session(model), x[:8])
    assert not np.allclose(full, got, atol=1e-3)  # the pruning did change the function


# ---- embedding tables -------------------------------------------------------------------------------------------
def test_embedding_width_is_pruned_with_its_group(tmp_path):
    """Gather(table, ids) produces the table's columns as a group: pruned, the model computes what numpy computes
    with those table columns and the consuming Linear's input rows removed."""
    module = Embedder()
    model = _export(module, torch.randint(0, 50, (1, 7)), tmp_path / "emb.onnx")
    graph = analyse(model).graph
    width = next(g for g in graph.groups if g.size == 16)
    assert width.prunable and not width.approximate
    assert [(s.op, s.tensor) for s in width.producers] == [("Gather", "table.weight")]
    keep = np.array([0, 3, 4, 9, 10, 15])
    pruned = prune_channels(model, {width.id: keep})
    ids = np.random.default_rng(1).integers(0, 50, (5, 7)).astype(np.int64)
    got = runtime.run_batched(runtime.session(pruned), ids)
    table = module.table.weight.detach().numpy()[:, keep]
    w1, b1 = module.proj.weight.detach().numpy()[:, keep], module.proj.bias.detach().numpy()
    w2, b2 = module.out.weight.detach().numpy(), module.out.bias.detach().numpy()
    reference = np.maximum((table[ids] @ w1.T + b1).mean(1), 0) @ w2.T + b2
    np.testing.assert_allclose(got, reference, atol=1e-5)
    assert pruned.graph.initializer and dict((t.name, tuple(t.dims)) for t in pruned.graph.initializer)[
        "table.weight"] == (50, 6)


# ---- inspect ----------------------------------------------------------------------------------------------------
def test_inspect_shows_approximate_groups(tmp_path):
    from typer.testing import CliRunner

    from onnxecc.cli import app

    _model("written_out", tmp_path)
    runner = CliRunner()
    shown = runner.invoke(app, ["inspect", str(tmp_path / "written_out.onnx")], terminal_width=400)
    assert shown.exit_code == 0 and "approximate (ReduceSum" in shown.output
    as_json = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "written_out.onnx"), "--json"]).output)
    assert as_json["totals"]["approximate_groups"] == 1
    group = next(g for g in as_json["groups"] if g["approximate"])
    assert group["prunable"] and group["size"] == 24
