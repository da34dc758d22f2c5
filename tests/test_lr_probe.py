"""The fine-tuning rate probe (`MaskedModel.choose_lr`, `--lr auto`): the rate with the lowest training loss after
one epoch, the weights untouched, and compress using it — checked against training each candidate again directly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import DEMO_MODELS

from onnxecc.compress import CompressOptions, compress
from onnxecc.graph.channels import analyze
from onnxecc.graph.data import load_digits
from onnxecc.train.finetune import TrainConfig, distillation_loss, finetune
from onnxecc.train.masked import MaskedModel

CANDIDATES = (2e-3, 1e-4)


@pytest.fixture(scope="module")
def pruned():
    proto = onnx.load(DEMO_MODELS[0])
    graph = analyze(proto)
    mm = MaskedModel(proto, graph, load_digits(0), TrainConfig(batch_size=64))
    group = graph.prunable_groups[0]
    mm.set_keep({group.id: np.arange(group.size // 4)})  # a quarter of the first group: the network is broken
    return mm


def test_probe_picks_the_lowest_loss_and_restores_the_weights(pruned):
    mm = pruned
    start = mm.state()
    lr, tried = mm.choose_lr(CANDIDATES, samples=512)
    assert all(torch.equal(start[k], v) for k, v in mm.state().items())  # restored, pruned entries still zero
    assert [t["lr"] for t in tried] == list(CANDIDATES)
    every = np.unique(np.round(np.linspace(0, len(mm.data.x_train) - 1, 512)).astype(int))  # spread over the set
    assert len(every) == 512
    x, teacher = mm.data.x_train[every], mm.teacher[every]
    y = torch.as_tensor(mm.data.y_train[every], dtype=torch.long)
    losses = {}
    for t in tried:  # again, by hand: one pass of finetune() at the rate, then the loss on those samples
        mm.load_state(start)
        finetune(mm.tm.module, x, teacher, mm.data.y_train[every],
                 TrainConfig(**{**mm.config.__dict__, "epochs": 1, "lr": t["lr"], "lr_schedule": "constant"}),
                 mm.masks)
        with torch.no_grad():
            out = mm.tm.module.eval()(torch.as_tensor(x))
            losses[t["lr"]] = float(distillation_loss(out, torch.as_tensor(teacher), y, mm.config.temperature,
                                                      mm.config.distill_weight))
        assert t["loss"] == pytest.approx(losses[t["lr"]], rel=1e-4)
    mm.load_state(start)
    assert lr == min(losses, key=losses.get)
    assert [t["chosen"] for t in tried] == [t["lr"] == lr for t in tried]


def test_compress_fine_tunes_at_the_probed_rate_unless_lr_is_given():
    opts = dict(metric="macs", data="digits", method="project", epochs=1, admm_iterations=0)
    auto = compress(DEMO_MODELS[0], "0.5", None, CompressOptions(**opts))
    probes = [h for h in auto.history if h.get("phase") == "lr_probe"]
    assert len(probes) == 3 and sum(h["chosen"] for h in probes) == 1
    assert min(probes, key=lambda h: h["loss"])["chosen"]
    fixed = compress(DEMO_MODELS[0], "0.5", None, CompressOptions(**opts, lr=1e-3))
    assert not [h for h in fixed.history if h.get("phase") == "lr_probe"]
    assert [h["phase"] for h in fixed.history] == ["recalibrate", "finetune"]
    recalibrated = fixed.history[0]
    assert recalibrated["layers"] > 0 and recalibrated["loss_before"] != recalibrated["loss_after"]
    plain = compress(DEMO_MODELS[0], "0.5", None, CompressOptions(**opts, lr=1e-3, recalibrate=False))
    assert [h["phase"] for h in plain.history] == ["finetune"]
    assert plain.history[0]["loss"] != fixed.history[1]["loss"]  # it trained from other weights
