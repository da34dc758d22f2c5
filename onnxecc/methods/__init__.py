"""Stage 5, methods: the compression methods that choose widths and train — `ecc` (ADMM under the cost
constraint), the `uniform` and `greedy` baselines, and `wsp` (energy-constrained unstructured pruning).

May import every stage below (core, graph, cost, optimize, train); the user-facing verbs at the top
(`onnxecc.compress`, ...) import the methods, never the reverse. No re-exports here.
"""
