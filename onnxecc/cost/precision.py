"""The cost side of the precision knob: a fitted latency model with some layers in int8 (numpy only).

A profile (`onnxecc.cost.profiler`) models fp32 latency as b + Σ_l a_l·f_l(w) (f_l: layer l's MACs fraction, bilinear
in the widths). With the layers of a set P in int8 the model becomes

    b' + Σ_{l∉P} a_l·f_l(w) + Σ_{l∈P} ρ_l·a_l·f_l(w),

still bilinear in the widths, so the width projection is the same structured knapsack — only the int8 layers
are cheaper per channel, and the budget buys more width. The factors come from measurement
(`onnxecc.cost.quantize.measure_precision`, at full width): the total saving is the measured ratio of the chosen
int8 model to fp32, C₀·(1 − r); it is split over the int8 layers in proportion to their measured marginal
savings, each layer's share taken from its own term (ρ_l = 1 − share/a_l, at least `RHO_MIN`) and what a term
cannot absorb (a layer whose fitted coefficient is small: Quantize/Dequantize boundaries it removes are not
MACs) from the constant b; what neither can absorb (the fit put the cost of an int8 layer on others) is taken
from the whole model in proportion. So at full width the scaled model always equals the measured int8 latency —
the closed loop brackets with that point (`compress._next_internal`): a model too pessimistic there had it
creep towards full width round by round while the full-width int8 model already met the budget (resnet18 on
ORT CPU: int8 at 0.2× fp32, the scaled model said 0.66×). At pruned widths it assumes int8 saves the same
share of each layer's cost; `correct_at_widths` refits that with the int8 timings the profile took at pruned
widths (`onnxecc profile --knobs width,precision`), and the closed loop measures the final QDQ model anyway.
"""

from __future__ import annotations

import numpy as np

from onnxecc.cost.costs import BilinearCost, Term, _merge, layer_costs

RHO_MIN = 0.1  # an int8 layer costs at least this share of its fp32 term in the model


def scaled_cost(cost: BilinearCost, profile, model, graph, layers, variables, measured,
                ) -> tuple[BilinearCost, dict[str, float]]:
    """`cost` (the profile's fp32 latency model) with the measured int8 layers of `measured` scaled; and the
    factor ρ_l per int8 layer (1 − the share of its term removed)."""
    chosen = measured.chosen
    if not chosen or measured.ratio >= 1:
        return cost, {}
    full_cost = cost(None)
    total = full_cost * (1.0 - measured.ratio)
    weights = {n: max(measured.layers[n]["saving_s"], 0.0) for n in chosen}
    norm = sum(weights.values()) or 1.0
    lcs = {layer.name: lc for layer, lc in zip(layers, layer_costs(graph, layers, model, variables))}
    fitted = profile.fit.layers if profile is not None and profile.fit is not None else {}
    terms = list(cost.terms)
    constant = cost.constant
    residual = 0.0
    factors: dict[str, float] = {}
    for name in chosen:
        want = total * weights[name] / norm
        a = float(fitted.get(name, 0.0))
        lc = lcs.get(name)
        full = lc(None) if lc is not None else 0.0
        if a <= 0 or full <= 0:
            residual += want
            factors[name] = 1.0
            continue
        rho = max(RHO_MIN, 1.0 - want / a)
        cut = (1.0 - rho) * a
        residual += want - cut
        terms += [Term(-cut * t.coef / full, t.a, t.b, t.upper_bound) for t in lc.terms]
        constant -= cut * lc.constant / full
        factors[name] = rho
    constant -= min(residual, max(constant, 0.0))
    merged = [Term(max(t.coef, 0.0), t.a, t.b, t.upper_bound) for t in _merge(terms)]
    out = BilinearCost(cost.metric, cost.unit, dict(cost.full_widths), merged, max(constant, 0.0))
    want = full_cost * measured.ratio
    if out(None) > want > 0:  # the rest of the measured saving, from the whole model (exact at full width)
        out = _combine(out, 0.0, cost, 1.0, want / out(None))
    return out, factors


def _combine(s: BilinearCost, alpha: float, c: BilinearCost, beta: float, scale: float = 1.0) -> BilinearCost:
    """scale·(alpha·s + beta·c) when alpha > 0, else scale·s (the bilinear form is kept: a sum of terms)."""
    pairs = [(s, alpha if alpha > 0 else 1.0)] + ([(c, beta)] if alpha > 0 and beta > 0 else [])
    terms = [Term(t.coef * k * scale, t.a, t.b, t.upper_bound) for m, k in pairs for t in m.terms]
    return BilinearCost(s.metric, s.unit, dict(s.full_widths), _merge(terms),
                        sum(m.constant * k for m, k in pairs) * scale)


def correct_at_widths(scaled: BilinearCost, cost: BilinearCost, samples, full_weight: float = 3.0,
                      ) -> tuple[BilinearCost, dict | None]:
    """`scaled` refitted to int8 timings at pruned widths: `samples` (the profile's precision samples: widths per
    width variable, fp32_ms, int8_ms) give the int8 latency there on the fp32 model's scale, cost(w)·int8/fp32.
    The corrected model is α·scaled + β·cost + γ (α, β, γ ≥ 0: the per-layer int8 shape, an fp32-shaped part,
    and a fixed overhead — the Quantize/Dequantize boundaries do not shrink with the widths, which is why int8 can
    be slower than fp32 at small widths; still bilinear), non-negative least squares in relative error over the
    samples and full width (weight `full_weight`), then rescaled to stay exact at full width.
    → (model, report dict); (scaled, None) without samples."""
    if not samples:
        return scaled, None
    points = [(None, scaled(None), full_weight)]
    for smp in samples:
        w = {v: int(x) for v, x in enumerate(smp["widths"])}
        points.append((w, cost(w) * smp["int8_ms"] / smp["fp32_ms"], 1.0))
    sw = np.array([k for *_, k in points]) ** 0.5
    a = np.array([[scaled(w) / y, cost(w) / y, scaled(None) / y] for w, y, _ in points]) * sw[:, None]
    best = None
    for cols in ((0, 1, 2), (0, 2), (1, 2), (0, 1), (0,), (1,)):  # NNLS, three unknowns: every feasible sub-fit
        sol, *_ = np.linalg.lstsq(a[:, cols], sw, rcond=None)
        if (sol < 0).any():
            continue
        coef = np.zeros(3)
        coef[list(cols)] = sol
        err = float(np.sum((a @ coef - sw) ** 2))
        if best is None or err < best[1] - 1e-12:
            best = (coef, err)
    alpha, beta, gamma = best[0]
    terms = [Term(t.coef * k, t.a, t.b, t.upper_bound) for m, k in ((scaled, alpha), (cost, beta)) for t in m.terms]
    out = BilinearCost(scaled.metric, scaled.unit, dict(scaled.full_widths), _merge(terms),
                       alpha * scaled.constant + beta * cost.constant + gamma * scaled(None))
    out = _combine(out, 0.0, cost, 0.0, scaled(None) / out(None))  # exact at full width again
    rel = lambda m: [abs(m(w) / y - 1) for w, y, _ in points[1:]]  # noqa: E731
    return out, {"alpha": float(alpha), "beta": float(beta), "gamma_of_full": float(gamma), "samples": len(samples),
                 "max_rel_error_before": max(rel(scaled)), "max_rel_error_after": max(rel(out))}
