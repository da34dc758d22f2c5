"""Models whose output is not class scores (a detector's score map, per-step scores): distillation and Fisher
importance must see a signal there. A softmax over a map's single channel is constant, so the KL distillation
the classifiers use is zero for any student: fine-tuning a text detector with `--data` trained nothing."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from onnxecc.compress import CompressOptions, compress
from onnxecc.core.errors import UserError
from onnxecc.train.finetune import distillation_loss


def test_a_score_map_is_distilled_by_relative_squared_error():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.rand(4, 1, 8, 8, generator=g), torch.rand(4, 1, 8, 8, generator=g)
    softmax_kl = F.kl_div(F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1), reduction="batchmean",
                          log_target=True)
    assert float(softmax_kl) == 0.0  # what a one-channel map got before: nothing to learn from
    loss = distillation_loss(student.requires_grad_(), teacher, None, temperature=2.0, distill_weight=0.5)
    t, s = teacher.numpy().astype(np.float64), student.detach().numpy().astype(np.float64)
    assert float(loss) == pytest.approx(np.mean((s - t) ** 2) / np.mean(t ** 2), rel=1e-5)
    loss.backward()
    assert float(student.grad.abs().sum()) > 0
    assert float(distillation_loss(teacher, teacher, None, 2.0, 0.5)) == 0.0


def test_labels_for_a_model_without_class_scores_are_a_user_error():
    with pytest.raises(UserError, match="leave y out"):
        distillation_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long),
                          2.0, 0.5)


class _MapNet(torch.nn.Module):
    """A tiny text-detector-like network: features, then a one-channel probability map at input size."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Conv2d(32, 1, 1)

    def forward(self, x):
        return torch.sigmoid(self.head(self.body(x)))


def _map_model(tmp_path):
    torch.manual_seed(0)
    net = _MapNet().eval()
    path = tmp_path / "mapnet.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 24, 24),), str(path), dynamo=False, input_names=["x"],
                      output_names=["map"], dynamic_axes={"x": {0: "n"}, "map": {0: "n"}}, opset_version=17)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((384, 3, 24, 24)).astype(np.float32)
    data = tmp_path / "pages.npz"
    np.savez(data, x=x)
    return path, data, x


def test_finetuning_a_map_output_brings_it_back_towards_the_original(tmp_path):
    """Same pruning (project, Fisher-free l2 ranking), with and without --data: fine-tuning on unlabelled inputs
    must bring the map closer to the original's, measured in onnxruntime on inputs it did not train on."""
    path, data, _ = _map_model(tmp_path)
    opts = dict(metric="macs", method="project", importance="l2", epochs=6, lr=2e-3, seed=0, round_to=1,
                measure_latency=False)
    compress(path, "0.35", tmp_path / "free.onnx", CompressOptions(**opts))
    result = compress(path, "0.35", tmp_path / "tuned.onnx", CompressOptions(**opts, data=str(data)))
    x = np.random.default_rng(1).standard_normal((64, 3, 24, 24)).astype(np.float32)

    def run(p):
        return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    original = run(path)
    err_free = float(np.mean((run(tmp_path / "free.onnx") - original) ** 2))
    err_tuned = float(np.mean((run(tmp_path / "tuned.onnx") - original) ** 2))
    assert err_tuned < 0.5 * err_free, (err_tuned, err_free)
    losses = [h["loss"] for h in result.history if h.get("phase") == "finetune" and "loss" in h]
    assert losses and losses[-1] > 0


def test_fisher_importance_of_a_map_output_is_not_zero(tmp_path):
    """Fisher ranking (the default with --data) needs loss gradients; cross-entropy over a single channel has
    none, so every importance was 0 and the ranking a tie."""
    import onnx

    from onnxecc.graph.channels import analyze
    from onnxecc.graph.data import load_npz
    from onnxecc.train.finetune import TrainConfig
    from onnxecc.train.masked import MaskedModel

    path, data, _ = _map_model(tmp_path)
    proto = onnx.load(path)
    graph = analyze(proto)
    mm = MaskedModel(proto, graph, load_npz(data, input_shape=(1, 3, 24, 24)), TrainConfig(batch_size=32))
    names = sorted({b.name for b in graph.binds if b.role == "producer"} & set(mm.tm.params))
    assert len(names) == 4
    fisher = mm.fisher(names, max_samples=64)
    for name in names:
        assert np.isfinite(fisher[name]).all()
        assert float(fisher[name].sum()) > 0, name
