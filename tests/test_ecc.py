"""ECC (ADMM) and the baselines: budgets met by the count on the file, ADMM converging, Z-step vs exact."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import DEMO_MODELS

from onnxecc.compress import CompressOptions, compress, cost_model
from onnxecc.core.errors import UserError
from onnxecc.cost.costs import unit_classes
from onnxecc.graph.channels import analyze
from onnxecc.graph.layers import find_layers
from onnxecc.methods.admm import budget_schedule
from onnxecc.methods.baselines import uniform_widths
from onnxecc.optimize.problem import Problem

FAST = dict(metric="macs", data="digits", epochs=2, admm_iterations=3, admm_epochs=1, measure_latency=False)


def _problem(path, round_to=1):
    proto = onnx.load(path)
    graph = analyze(proto)
    variables = unit_classes(graph)
    cost = cost_model("macs", proto, graph, find_layers(proto), variables)
    prunable = {g.id for g in graph.prunable_groups}
    return Problem(proto, graph, variables, cost, [v for v, g in enumerate(variables.group) if g in prunable],
                   1, round_to)


def test_budget_schedule_decays_geometrically_to_target():
    values = [budget_schedule(100.0, 25.0, k, 3) for k in range(5)]
    assert values[0] == pytest.approx(100 * 0.25 ** (1 / 3))
    assert values[2:] == [25.0, 25.0, 25.0]
    assert all(a > b for a, b in zip(values[:2], values[1:3]))


@pytest.mark.parametrize("round_to", [1, 8])
def test_uniform_widths_is_the_largest_common_ratio(round_to):
    problem = _problem(DEMO_MODELS[1], round_to)
    target = 0.4 * problem.original_cost
    widths = uniform_widths(problem, target)
    assert problem.cost(widths) <= target
    # one step wider in every variable that can grow breaks the budget (else the ratio was not the largest)
    ratios = [widths[v] / problem.cost.full_widths[v] for v in problem.prunable]
    grown = {}
    for v in problem.prunable:
        wider = problem.allowed(v)[problem.allowed(v) > widths[v]]
        grown[v] = int(wider[0]) if len(wider) else widths[v]
    assert problem.cost(grown) > target
    if round_to == 1:
        assert max(ratios) - min(ratios) < 0.2


@pytest.mark.parametrize("method", ["ecc", "uniform", "greedy", "project"])
def test_every_method_meets_the_budget_on_the_file(method, tmp_path):
    out = tmp_path / f"{method}.onnx"
    result = compress(DEMO_MODELS[0], "0.4", out, CompressOptions(method=method, **FAST))
    macs = sum(layer.macs for layer in find_layers(onnx.load(out)))
    original = sum(layer.macs for layer in find_layers(onnx.load(DEMO_MODELS[0])))
    assert macs <= 0.4 * original and macs == result.counted_cost
    assert result.method == method
    assert result.accuracy_after > 0.8  # a few epochs on digits: far above chance (0.1)


def test_reference_rho_keeps_the_pull_per_w_step():
    """The prox step shrinks a pruned coordinate by 1/(1+ρ) per Adam step: applied S times at reference_rho(S),
    it shrinks it as far as the reference ρ over the reference steps, for any S."""
    import torch

    from onnxecc.methods.admm import REFERENCE_STEPS, RHO_REFERENCE, AdmmVariables, reference_rho

    assert reference_rho(REFERENCE_STEPS) == RHO_REFERENCE
    for steps in (1, 2, 7, REFERENCE_STEPS, 300):
        w = torch.tensor([1.0, 2.0], dtype=torch.float64)
        variables = AdmmVariables({"w": w})
        zero_first = {"w": torch.tensor([0.0, 1.0], dtype=torch.float64)}  # Z zeroes the first coordinate
        variables.set_z({"w": w.clone()}, zero_first)
        for _ in range(steps):
            variables.prox({"w": w}, reference_rho(steps))
        assert float(w[0]) == pytest.approx(1.0025 ** -46, rel=1e-9) and float(w[1]) == 2.0
    assert reference_rho(1) > reference_rho(2) > RHO_REFERENCE > reference_rho(300)


def test_explicit_rho_is_per_step():
    result = compress(DEMO_MODELS[0], "0.5", None, CompressOptions(method="ecc", rho=0.01, **FAST))
    assert [h["rho"] for h in result.history if h.get("phase") == "admm"] == pytest.approx([0.01, 0.02, 0.04])


def test_admm_schedule_and_zstep_matches_exact(tmp_path):
    result = compress(DEMO_MODELS[0], "0.5", None,
                      CompressOptions(method="ecc", round_to=8, verify_projection=True,
                                      **{**FAST, "admm_iterations": 4}))
    admm = [h for h in result.history if h.get("phase") == "admm"]
    assert len(admm) == 4
    # --rho auto: digits' 1438 training images at batch 64 are 23 Adam steps, one epoch per W-step, so ρ₀ pulls
    # as hard over 23 steps as 2.5e-3 over 46: (1 + ρ₀)^23 = 1.0025^46
    assert [h["rho"] for h in admm] == pytest.approx([(1.0025 ** 2 - 1) * 2**k for k in range(4)])
    assert admm[-1]["budget"] == pytest.approx(0.5 * result.original_cost)
    assert all(a["budget"] > b["budget"] for a, b in zip(admm[:2], admm[1:3]))
    for h in admm:
        assert 0 <= h["pruned_energy"] <= 1
        check = h["zstep_check"]
        assert check["greedy_feasible"]
        assert check["greedy"] <= check["exact"] * (1 + 1e-9)  # the exact optimum is never beaten
        assert check["gap"] < 0.25


def test_methods_that_train_need_data():
    with pytest.raises(UserError, match="needs --data"):
        compress(DEMO_MODELS[0], "0.5", None, CompressOptions(method="ecc", measure_latency=False))


def test_zero_epochs_project_equals_projection_without_training():
    result = compress(DEMO_MODELS[1], "0.5", None, CompressOptions(method="project", metric="macs", round_to=1,
                                                                   measure_latency=False))
    problem = _problem(DEMO_MODELS[1])
    keep, proj = problem.project(0.5 * problem.original_cost)
    assert {g: k for g, (k, _) in result.widths.items()} == {g: len(v) for g, v in keep.items()}
    assert result.estimated_cost == pytest.approx(proj.cost)
    assert np.isfinite(result.agreement)


def test_prox_w_step_closes_the_gap_that_the_penalty_form_leaves_open():
    """The proximal W-step drives the channels Z removes towards zero; the loss-term form, limited by Adam's
    bounded steps, leaves much of their energy in place (the reason prox is the default)."""
    logs = {}
    for w_step in ("prox", "penalty"):
        result = compress(DEMO_MODELS[1], "0.5", None,
                          CompressOptions(method="ecc", admm_w_step=w_step, rho=5e-3, admm_decay=3,
                                          **{**FAST, "admm_iterations": 5, "admm_epochs": 2, "epochs": 0}))
        logs[w_step] = [h for h in result.history if h.get("phase") == "admm"]
    prox, penalty = logs["prox"], logs["penalty"]
    assert prox[-1]["pruned_energy"] < 0.05
    assert prox[-1]["pruned_energy"] < penalty[-1]["pruned_energy"] / 3
    assert prox[-1]["primal_gap"] < prox[0]["primal_gap"]


def test_unknown_w_step_is_a_user_error():
    with pytest.raises(UserError, match="admm-w-step"):
        compress(DEMO_MODELS[0], "0.5", None, CompressOptions(method="ecc", admm_w_step="sgd", **FAST))
