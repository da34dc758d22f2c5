"""Stage 5, methods: the compression methods that choose widths and train, one module per method behind one
interface (`base.Method`), registered by name in `registry` — `project`, `ecc` (ADMM under the cost constraint,
`admm`), the `uniform` and `greedy` baselines (`baselines`), and `wsp` (energy-constrained unstructured pruning) —
plus what every method shares: the options, the result and its evaluation, and one round of a method with the
fine-tuning tail (`select`).

May import every stage below (core, graph, cost, optimize, train); the user-facing verbs at the top
(`onnxecc.compress`, ...) import the methods, never the reverse. No re-exports here.
"""
