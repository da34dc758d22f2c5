"""The cost side of the precision knob: a fitted latency model with some layers in int8 (numpy only).

A profile (`onnxecc.profiler`) models fp32 latency as b + Σ_l a_l·f_l(w) (f_l: layer l's MACs fraction, bilinear
in the widths). With the layers of a set P in int8 the model becomes

    b' + Σ_{l∉P} a_l·f_l(w) + Σ_{l∈P} ρ_l·a_l·f_l(w),

still bilinear in the widths, so the width projection is the same structured knapsack — only the int8 layers
are cheaper per channel, and the budget buys more width. The factors come from measurement
(`onnxecc.quantize.measure_precision`, at full width): the total saving is the measured ratio of the chosen
int8 model to fp32, C₀·(1 − r); it is split over the int8 layers in proportion to their measured marginal
savings, each layer's share taken from its own term (ρ_l = 1 − share/a_l, at least `RHO_MIN`) and what a term
cannot absorb (a layer whose fitted coefficient is small: Quantize/Dequantize boundaries it removes are not
MACs) from the constant b. At full width the scaled model equals the measured int8 latency; at pruned widths it
assumes int8 saves the same share of each layer's cost — an approximation the closed loop checks, since it
measures the final QDQ model.
"""

from __future__ import annotations

from onnxecc.costs import BilinearCost, Term, _merge, layer_costs

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
    return BilinearCost(cost.metric, cost.unit, dict(cost.full_widths), merged, max(constant, 0.0)), factors
