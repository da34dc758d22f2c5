"""onnxecc benchmark suite: `python -m bench [--quick] [--only AREA,...]` (see bench/README.md).

Every area is one module of this package (names starting with `_` are helpers) that defines

    run(quick: bool, **overrides) -> dict     # measures; the dict is JSON-serialisable
    table(result: dict) -> rich.table.Table   # the printed table of that dict

and optionally `ORDER` (int, where it appears in a full run; default 100), `DESCRIPTION` (one line) and
`OPT_IN = True` with `OPT_IN_REASON` (a few words: why it is not run by default): an area that takes far longer
than the others runs only when `--only` names it, so `make bench`'s total stays what the README says.
`areas()` finds them, so adding an area is adding one file. Speed and memory goals are stated as ratios
measured side by side in one run, never as timed unit tests.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

_SKIP = {"__main__"}


def areas() -> dict[str, ModuleType]:
    """Registry: area name → module (those with `run` and `table`), in run order."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in _SKIP:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if callable(getattr(module, "run", None)) and callable(getattr(module, "table", None)):
            found.append((getattr(module, "ORDER", 100), info.name, module))
    return {name: module for _, name, module in sorted(found, key=lambda t: (t[0], t[1]))}


def opt_in_reason(module: ModuleType) -> str | None:
    """Why the area runs only when named (`OPT_IN`), or None for an area of the default run."""
    if not getattr(module, "OPT_IN", False):
        return None
    return getattr(module, "OPT_IN_REASON", "opt-in")


def select(registry: dict[str, ModuleType], only: str = "") -> tuple[list[str], list[str]]:
    """The areas to run and the opt-in areas skipped: `only` (comma-separated names, unknown ones kept for the
    caller to refuse) runs exactly those, opt-in or not; without it every area but the opt-in ones runs."""
    named = [a.strip() for a in only.split(",") if a.strip()]
    if named:
        return named, []
    skipped = [name for name, module in registry.items() if opt_in_reason(module)]
    return [name for name in registry if name not in skipped], skipped
