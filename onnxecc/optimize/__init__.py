"""Stage 3, optimize: which channels to keep so the cost meets the budget — channel importance, the structured
knapsack projection, the weighted sparse projection, the problem every method solves, and exact (MILP) checks.

May import `onnxecc.core`, `onnxecc.graph` and `onnxecc.cost`; numpy only, except `exact`, the one module that
imports cvxpy (tests and benchmarks only). No re-exports here.
"""
