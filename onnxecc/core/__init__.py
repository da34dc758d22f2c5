"""Stage 0, core: what every stage uses — error types that decide the exit code, atomic file writes, progress lines,
and the recipe file format of the options (TOML/JSON, typed by the options dataclass it is given).

Imports nothing from onnxecc (standard library only); everything else may import it. Kept empty of re-exports so
that importing a module never drags in its neighbours.
"""
