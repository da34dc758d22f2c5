"""The command line: parse, call the Python API, print. No logic lives here."""

from __future__ import annotations

import json
import sys
import traceback

import typer
from rich.console import Console
from rich.table import Table

from onnxecc.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress an ONNX model so that it meets a hard resource budget.")
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors.")) -> None:
    _state["debug"] = debug


@app.command()
def inspect(
    model: str = typer.Argument(..., help="Path to the .onnx file."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """List the compute layers of MODEL with channels, kernel, MACs and parameters."""
    from onnxecc.inspection import inspect as run_inspect

    result = run_inspect(model)
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
        return
    table = Table(title=f"{result.source} (opset {result.opset})", show_footer=True)
    table.add_column("layer", footer="total")
    table.add_column("op")
    table.add_column("in", justify="right")
    table.add_column("out", justify="right")
    table.add_column("kernel")
    table.add_column("groups", justify="right")
    table.add_column("output", justify="right")
    table.add_column("MACs", justify="right", footer=f"{result.macs:,}")
    table.add_column("params", justify="right", footer=f"{result.layer_params:,}")
    for layer in result.layers:
        table.add_row(layer.name, layer.op, str(layer.cin), str(layer.cout),
                      "×".join(map(str, layer.kernel)) or "-", str(layer.groups),
                      "×".join(map(str, layer.out_spatial)) or "-", f"{layer.macs:,}", f"{layer.params:,}")
    console.print(table)
    console.print(f"{len(result.layers)} compute layers; {result.model_params:,} parameters in the model "
                  "(MACs count Conv/Gemm/MatMul multiply-accumulates for batch 1)")


def main() -> None:
    """Entry point: user errors print one line and exit 2; internal errors exit 1."""
    try:
        app(standalone_mode=False)
    except UserError as exc:
        if _state["debug"]:
            traceback.print_exc()
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # click's usage errors carry their own exit code
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        if _state["debug"]:
            traceback.print_exc()
        err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} "
                          "(rerun with --debug for the traceback and report it)", highlight=False)
        sys.exit(1)
