"""Print the longest functions and methods of a source tree, longest first: `file:line  lines  kind  name`.

A unit too long to read in one screen is the first thing a newcomer trips over; this lists them so a layout
change can show its effect (run it before and after). Standard library only, reads the files' AST.

    python tools/longest_functions.py [ROOT=onnxecc] [-n 20]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def functions(path: Path, root: Path) -> list[tuple[int, str, str, str]]:
    """(line count, location, kind, qualified name) of every function, method and class in `path`, nested ones
    too (a class counts as a unit: a 400-line class is as hard to read as a 400-line function)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str, str, str]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                kind = "class" if isinstance(child, ast.ClassDef) else "def"
                found.append((child.end_lineno - start + 1, f"{path.relative_to(root)}:{child.lineno}", kind, name))
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="onnxecc", help="package directory to scan (default: onnxecc)")
    parser.add_argument("-n", type=int, default=20, help="how many to print (default: 20)")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    rows = [row for p in sorted(root.rglob("*.py")) for row in functions(p, root.parent)]
    rows.sort(key=lambda r: (-r[0], r[1]))
    for lines, where, kind, name in rows[: args.n]:
        print(f"{where:<44} {lines:>5}  {kind:<5} {name}")


if __name__ == "__main__":
    main()
