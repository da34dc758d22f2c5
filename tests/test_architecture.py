"""The architecture rules, checked: the package reads as the pipeline (core → graph → cost → optimize → train →
methods → the user-facing verbs), no stage imports a later one, no import cycles, the ONNX side runs without torch,
torch lives in `train/` and `methods/` only, cvxpy in `optimize/exact` only, and the library never imports the CLI.

The import graph is read from the source (AST of every module, imports inside functions included: a lazy import
is still a dependency, it only moves the failure to run time), not from `sys.modules`.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "onnxecc"
# The stages in pipeline order; a module outside them (onnxecc/*.py: compress, sweep, validate, inspection, cli)
# is a user-facing verb, the top.
STAGES = ("core", "graph", "cost", "optimize", "train", "methods")
TOP = len(STAGES)
TORCH = ("torch", "torchvision", "onnx2torch")
BLOCK = "import sys\nfor m in ('torch', 'onnx2torch', 'cvxpy', 'torchvision'):\n    sys.modules[m] = None\n"

# Cycles that today's code hides behind function-local imports. Each entry names its way out; when one is broken,
# remove it here (the test fails on an entry that no longer holds, so this list only shrinks).
KNOWN_CYCLES: set[frozenset[str]] = set()
# Imports from an earlier stage into a later one, each with its way out (none today; keep it so).
KNOWN_UPWARD: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def stage(module: str) -> int:
    """The pipeline position of a module: its subpackage's index in STAGES, TOP for onnxecc/*.py."""
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 2 and parts[1] in STAGES else TOP


def imports(module: str, source: str) -> tuple[set[str], set[str]]:
    """(onnxecc modules, other top-level packages) that `source` imports anywhere, function bodies included.

    `from P import x` counts as an import of the module P.x when that is a module, else of P. The version string
    (`from onnxecc import __version__`) is no dependency on the verbs: the root package is always loaded first."""
    own, other = set(), set()
    is_pkg = MODULES[module].name == "__init__.py"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_pkg]
                base = ".".join(anchor + ([base] if base else []))
            names = [a.name for a in node.names]
            if base == "onnxecc" and names == ["__version__"]:
                continue
            targets = [f"{base}.{n}" if f"{base}.{n}" in MODULES else base for n in names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] == "onnxecc":
                while t not in MODULES:  # `import onnxecc.x.y` of an attribute path: its module
                    t = t.rsplit(".", 1)[0]
                if t != module:
                    own.add(t)
            else:
                other.add(t.split(".")[0])
    return own, other


GRAPH = {m: imports(m, p.read_text()) for m, p in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_is_read_from_the_source():
    # the reader itself, on a case that needs each rule: lazy import, `from P import module`, relative import
    assert "onnxecc.methods.admm" in GRAPH["onnxecc.methods.ecc"][0]  # inside a function
    assert "onnxecc.core.atomic" in GRAPH["onnxecc.graph.ingest"][0]  # from onnxecc.core import atomic
    assert "onnxecc.optimize.projection" in GRAPH["onnxecc.optimize.exact"][0]  # from .projection import ...
    assert "torch" in GRAPH["onnxecc.train.bridge"][1]
    assert set(STAGES) <= {m.split(".")[1] for m in MODULES if m.count(".") >= 1}


def test_no_import_cycles_but_the_known_ones():
    found = cycles({m: own for m, (own, _) in GRAPH.items()})
    assert found - KNOWN_CYCLES == set(), "new import cycle(s)"
    assert KNOWN_CYCLES - found == set(), "a known cycle is gone: remove it from KNOWN_CYCLES"


def test_no_stage_imports_a_later_one():
    upward = {(m, t) for m, (own, _) in GRAPH.items() for t in own if stage(t) > stage(m)}
    assert upward - KNOWN_UPWARD == set(), f"a module imports a later stage ({' < '.join(STAGES)} < verbs)"
    assert KNOWN_UPWARD - upward == set(), "a known upward import is gone: remove it from KNOWN_UPWARD"


def test_torch_only_in_train_and_methods_cvxpy_only_in_exact():
    torch_users = {m for m, (_, other) in GRAPH.items() if other & set(TORCH)}
    assert {m for m in torch_users if stage(m) not in (STAGES.index("train"), STAGES.index("methods"))} == set()
    assert {m for m, (_, other) in GRAPH.items() if "cvxpy" in other} <= {"onnxecc.optimize.exact"}


def test_onnx_side_imports_without_torch():
    """Every module outside train/ and methods/ imports with torch, onnx2torch and cvxpy absent (the edge device)."""
    onnx_side = [m for m in MODULES if stage(m) < STAGES.index("train") or stage(m) == TOP]
    onnx_side = [m for m in onnx_side if m != "onnxecc.__main__" and m != "onnxecc.optimize.exact"]
    code = BLOCK + ("import importlib\nfailed = []\n"
                    f"for m in {onnx_side!r}:\n"
                    "    try:\n        importlib.import_module(m)\n"
                    "    except ImportError as exc:\n        failed.append(f'{m}: {exc}')\n"
                    "print('\\n'.join(failed))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
    assert len(onnx_side) > 20  # the whole ONNX side, not an empty list


def test_inspect_runs_without_torch():
    model = PKG.parent / "models" / "digits_resdw.onnx"
    code = BLOCK + f"import onnxecc\nprint(onnxecc.inspect({str(model)!r}).macs)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) > 0


def test_library_never_imports_the_cli():
    offenders = [p.name for p in PKG.rglob("*.py") if p.name not in ("cli.py", "__main__.py")
                 and re.search(r"^\s*(from onnxecc(\.cli)? import cli|from onnxecc\.cli|import onnxecc\.cli)",
                               p.read_text(), re.M)]
    assert offenders == []


@pytest.mark.parametrize("verb", ["compress", "inspect", "validate", "profile", "load", "save", "CompressOptions",
                                  "CompressResult", "InspectResult", "ValidateResult", "Profile", "load_profile",
                                  "UserError", "UnsupportedModelError", "__version__"])
def test_public_api_at_the_top(verb):
    import onnxecc

    assert verb in onnxecc.__all__ and getattr(onnxecc, verb) is not None
