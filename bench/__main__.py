"""`python -m bench [--quick] [--only AREA,...] [--results DIR] [--set KEY=VALUE ...]` from the repo root.

Runs each selected area (without --only: every area but the opt-in ones, which the header line names), writes
`<results>/<area>.json` atomically (date, machine, versions, command, load average, wall time and the area's own
result) and prints one rich table per area.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
import traceback

from rich.console import Console
from rich.table import Table

from bench import _common, areas, opt_in_reason, select


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _parser(names: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="onnxecc benchmarks (see bench/README.md).")
    p.add_argument("--quick", action="store_true", help="the reduced configuration (a few minutes in all)")
    p.add_argument("--only", default="",
                   help=f"comma-separated areas (default: all of {', '.join(names)} but the opt-in ones; "
                        "--list marks them)")
    p.add_argument("--results", default=None,
                   help=f"directory of the JSON results (default: ${_common.RESULTS_ENV} or bench/results)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the selected areas (VALUE is JSON, else a string); "
                        "e.g. --set 'archs=[\"resnet18\"]'")
    p.add_argument("--list", action="store_true", help="list the areas and exit")
    return p


def skipped_text(registry: dict, skipped: list[str]) -> str:
    """The header's note of the opt-in areas a default run leaves out, and how to run them."""
    if not skipped:
        return ""
    names = ", ".join(f"{name} ({opt_in_reason(registry[name])})" for name in skipped)
    return f"; skipped opt-in areas: {names}: run with --only {','.join(skipped)}"


def main(argv: list[str] | None = None, console: Console | None = None) -> int:
    registry = areas()
    args = _parser(list(registry)).parse_args(argv)
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    if args.list:
        for name, module in registry.items():
            reason = opt_in_reason(module)
            mark = f" [opt-in: {reason}; run with --only {name}]" if reason else ""
            console.print(f"{name:12s} {getattr(module, 'DESCRIPTION', '')}{mark}", markup=False, highlight=False,
                          soft_wrap=True)
        return 0
    selected, skipped = select(registry, args.only)
    unknown = [a for a in selected if a not in registry]
    if unknown:
        console.print(f"unknown area(s): {', '.join(unknown)} (areas: {', '.join(registry)})")
        return 2
    overrides = _parse_set(args.overrides)
    out_dir = _common.results_dir(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = f"python -m bench {shlex.join(sys.argv[1:] if argv is None else argv)}".strip()
    common = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": _common.machine(),
              "versions": _common.versions(), "command": command, "quick": args.quick}
    console.print(f"[bold]onnxecc benchmarks[/] ({'quick' if args.quick else 'full'}): {', '.join(selected)} — "
                  f"{common['machine']['cpu']}, {common['machine']['cores']} cores, load {_common.load_average()}"
                  + skipped_text(registry, skipped))
    summary, failed, t_all = [], [], time.perf_counter()
    for name in selected:
        module = registry[name]
        console.rule(f"{name}{' (quick)' if args.quick else ''}")
        load_before, t0, c0 = _common.load_average(), time.perf_counter(), time.process_time()
        try:
            result = module.run(args.quick, **overrides)
        except Exception as exc:  # one broken area must not hide the others' results
            console.print(f"[red]area {name} failed:[/] {_common.error_text(exc)}")
            console.print(traceback.format_exc(), markup=False, highlight=False)
            failed.append(name)
            summary.append((name, time.perf_counter() - t0, time.process_time() - c0, None))
            continue
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        payload = {"area": name, **common, "load_average_before": load_before,
                   "load_average_after": _common.load_average(), "wall_s": wall, "cpu_s": cpu, "result": result}
        from onnxecc.core.atomic import write_json

        path = write_json(out_dir / f"{name}.json", payload)
        console.print(module.table(result))
        for note in result.get("notes", []):
            console.print(f"  [dim]{note}[/]")
        summary.append((name, wall, cpu, path))
    total = time.perf_counter() - t_all
    table = Table(title=f"bench {'--quick ' if args.quick else ''}wall time: {total:.0f} s",
                  caption=f"load average now: {_common.load_average()}")
    table.add_column("area")
    table.add_column("wall", justify="right")
    table.add_column("CPU (all threads)", justify="right")
    table.add_column("result")
    for name, wall, cpu, path in summary:
        table.add_row(name, f"{wall:.1f} s", f"{cpu:.1f} s", str(path) if path else "[red]failed[/]")
    console.print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
