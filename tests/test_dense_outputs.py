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


def _exported(tmp_path, net_class, name: str, output: str, sample: tuple[int, ...], samples: int):
    """`net_class` (seeded) exported with a dynamic batch, and `samples` standard-normal inputs as an x-only npz:
    (model path, npz path, x)."""
    torch.manual_seed(0)
    net = net_class().eval()
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(net, (torch.randn(1, *sample),), str(path), dynamo=False, input_names=["x"],
                      output_names=[output], dynamic_axes={"x": {0: "n"}, output: {0: "n"}}, opset_version=17)
    x = np.random.default_rng(0).standard_normal((samples, *sample)).astype(np.float32)
    data = tmp_path / f"{name}.npz"
    np.savez(data, x=x)
    return path, data, x


def _map_model(tmp_path):
    return _exported(tmp_path, _MapNet, "mapnet", "map", (3, 24, 24), 384)


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


# ---- per-step class probabilities (a text recogniser's N×T×C softmax) ---------------------------------------------
def test_output_kind_reads_the_class_axis_from_the_original_outputs():
    from onnxecc.graph.outputs import output_kind

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 7, 11))
    per_step = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert (output_kind(per_step).class_axis, output_kind(per_step).probabilities) == (2, True)
    assert (output_kind(per_step[:, 0]).class_axis, output_kind(per_step[:, 0]).probabilities) == (1, True)
    assert (output_kind(logits[:, 0]).class_axis, output_kind(logits[:, 0]).probabilities) == (1, False)
    assert output_kind(1 / (1 + np.exp(-logits[:, None]))).class_axis is None  # a sigmoid map: no class axis
    assert output_kind(logits).class_axis is None  # N×T×C logits: nothing says which axis holds classes
    assert output_kind(np.abs(logits[:, :1, 0])).class_axis is None  # N×1 regression


def test_per_step_probabilities_are_distilled_by_kl_at_every_step():
    """KL(teacher‖student) per step on the classes, averaged over steps, T² scaled, computed in numpy."""
    from onnxecc.graph.outputs import OutputKind

    g = torch.Generator().manual_seed(0)
    teacher = torch.softmax(3 * torch.randn(4, 6, 9, generator=g), -1)
    student = torch.softmax(3 * torch.randn(4, 6, 9, generator=g), -1).requires_grad_()
    kind = OutputKind(2, probabilities=True)
    for t in (1.0, 2.0):
        loss = distillation_loss(student, teacher, None, temperature=t, distill_weight=0.5, kind=kind)
        lt = np.log(teacher.numpy().astype(np.float64)) / t
        ls = np.log(student.detach().numpy().astype(np.float64)) / t
        pt = np.exp(lt) / np.exp(lt).sum(-1, keepdims=True)
        ps = np.exp(ls) / np.exp(ls).sum(-1, keepdims=True)
        expected = t * t * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=-1))
        assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert float(distillation_loss(teacher, teacher, None, 2.0, 0.5, kind)) == pytest.approx(0.0, abs=1e-6)


class _StepNet(torch.nn.Module):
    """A tiny text-recogniser-like network: features over a line image, pooled over its height, class
    probabilities at every horizontal step (N×T×C, softmax in the graph like PaddleOCR's recogniser)."""

    def __init__(self, classes: int = 12):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 24, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(24, 24, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(24, 24, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Conv2d(24, classes, 1)

    def forward(self, x):
        scores = self.head(self.body(x)).mean(2)  # N×C×T
        return torch.softmax(3 * scores.transpose(1, 2), dim=-1)


def _step_model(tmp_path):
    return _exported(tmp_path, _StepNet, "stepnet", "probs", (1, 8, 20), 320)


def test_per_step_model_trains_and_reports_per_step_agreement(tmp_path):
    """compress distils the N×T×C probabilities by KL and its report's agreement is per step (argmax over the
    class axis), recomputed here from onnxruntime on the samples it held out; fine-tuning must raise it above the
    data-free output's. Before, agreement was argmax over axis 1 — the steps."""
    from onnxecc.graph.data import load_npz

    path, data, _ = _step_model(tmp_path)
    opts = dict(metric="macs", method="project", importance="l2", epochs=6, lr=2e-3, seed=0, round_to=1,
                measure_latency=False)
    result = compress(path, "0.15", tmp_path / "tuned.onnx", CompressOptions(**opts, data=str(data)))
    x_test = load_npz(data, input_shape=(1, 1, 8, 20)).x_test

    def run(p, x):
        return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    original, tuned = run(path, x_test), run(tmp_path / "tuned.onnx", x_test)
    assert result.agreement == pytest.approx(float((original.argmax(-1) == tuned.argmax(-1)).mean()))
    rel = np.sum((tuned.astype(np.float64) - original) ** 2) / np.sum(original.astype(np.float64) ** 2)
    assert result.relative_error == pytest.approx(rel, rel=1e-6)
    compress(path, "0.15", tmp_path / "free.onnx", CompressOptions(**opts))
    free = run(tmp_path / "free.onnx", x_test)
    assert result.agreement > float((original.argmax(-1) == free.argmax(-1)).mean()) + 0.05


def test_greedy_scores_candidates_of_a_map_model_by_their_error(tmp_path):
    """Greedy (NetAdapt-style) on a score map: argmax over the map's single channel is 0 everywhere, so every
    candidate used to score 1.0 and the choice was arbitrary. Each step's score is now 1/(1 + relative squared
    error) on held-out training samples: below 1 once channels are cut, and what the loop logs."""
    path, data, _ = _map_model(tmp_path)
    result = compress(path, "0.5", tmp_path / "greedy.onnx",
                      CompressOptions(metric="macs", method="greedy", importance="l2", epochs=1, seed=0, round_to=1,
                                      measure_latency=False, data=str(data)))
    steps = [h for h in result.history if "val_score" in h]
    assert steps and all(0 < h["val_score"] < 1 for h in steps), steps
    assert result.agreement is None and result.relative_error is not None


# ---- per-step logits: nothing in the numbers says which axis holds classes, --class-axis does ------------------
def test_class_axis_names_the_axis_that_detection_cannot_know():
    from onnxecc.graph.outputs import output_kind

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 7, 11))
    per_step = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for axis in (2, -1):
        assert (output_kind(logits, axis).class_axis, output_kind(logits, axis).probabilities) == (2, False)
        assert (output_kind(per_step, axis).class_axis, output_kind(per_step, axis).probabilities) == (2, True)
    assert (output_kind(per_step, 1).class_axis, output_kind(per_step, 1).probabilities) == (1, False)
    for axis in (0, 3, -3):  # the batch, past the last axis
        with pytest.raises(UserError, match="--class-axis"):
            output_kind(logits, axis)
    with pytest.raises(UserError, match="--class-axis 1: the model's output is 5×1"):
        output_kind(logits[:, :1, 0], 1)  # one class is no class axis


class _StepLogitsNet(_StepNet):
    """_StepNet without the softmax: N×T×C logits per step, as a CTC recogniser may be exported."""

    def forward(self, x):
        return 3 * self.head(self.body(x)).mean(2).transpose(1, 2)


def test_class_axis_makes_per_step_logits_compared_per_step(tmp_path):
    """Without --class-axis N×T×C logits are a map (agreement None); with it compress and validate report
    top-1 agreement per step, recomputed here from onnxruntime on the held-out samples."""
    from onnxecc.graph.data import load_npz
    from onnxecc.validate import validate

    path, data, _ = _exported(tmp_path, _StepLogitsNet, "steplogits", "logits", (1, 8, 20), 320)
    opts = dict(metric="macs", method="project", importance="l2", epochs=2, lr=2e-3, seed=0, round_to=1,
                measure_latency=False, data=str(data))
    assert compress(path, "0.3", tmp_path / "map.onnx", CompressOptions(**opts)).agreement is None
    result = compress(path, "0.3", tmp_path / "steps.onnx", CompressOptions(**opts, class_axis=2))
    x_test = load_npz(data, input_shape=(1, 1, 8, 20)).x_test

    def run(p):
        return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x_test})[0]

    expected = float((run(path).argmax(-1) == run(tmp_path / "steps.onnx").argmax(-1)).mean())
    assert result.agreement == pytest.approx(expected)
    checked = validate(path, tmp_path / "steps.onnx", data=str(data), class_axis=-1)
    assert checked.top1_agreement == pytest.approx(expected)
    assert validate(path, tmp_path / "steps.onnx", data=str(data)).top1_agreement is None


def test_class_axis_out_of_range_fails_before_training(tmp_path):
    import subprocess
    import sys

    path, data, _ = _exported(tmp_path, _StepLogitsNet, "steplogits", "logits", (1, 8, 20), 320)
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxecc", "compress", str(path), "--budget", "0.3", "--data",
                           str(data), "--class-axis", "3", "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (proc.stdout, proc.stderr)
    assert "--class-axis 3: the model's output is ?×20×12" in proc.stderr and "epoch" not in proc.stdout
    assert not out.exists()
