"""Stage 2, cost: what a width choice costs — the bilinear cost models (MACs, parameters), the budget grammar, the
analysed model's width variables, the accelerator energy model, precision-scaled costs and the measured profile
(`profiler`: latency/energy on the target, fitted to the same bilinear form).

May import `onnxecc.core` and `onnxecc.graph`; never torch. No re-exports here.
"""
