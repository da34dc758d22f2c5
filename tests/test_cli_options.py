"""The flags of `CompressOptions` are declared once (`onnxecc.cli_options`): every setting has a flag or is said
to be recipe-only, every flag's default is the library's, and compress and sweep take the same flags."""

from __future__ import annotations

import json
import subprocess
import sys

import typer
from conftest import DEMO_MODELS

from onnxecc.cli import app
from onnxecc.cli_options import FLAGS, NOT_ON_THE_COMMAND_LINE
from onnxecc.core import recipe
from onnxecc.methods.options import CompressOptions


def test_every_setting_has_one_flag_or_is_recipe_only():
    fields = set(recipe.settings(CompressOptions))
    flagged = [f.field for f in FLAGS]
    assert len(flagged) == len(set(flagged))
    assert set(flagged) | set(NOT_ON_THE_COMMAND_LINE) == fields
    assert not set(flagged) & set(NOT_ON_THE_COMMAND_LINE)


def test_a_flag_left_at_its_default_gives_the_librarys_default():
    defaults = CompressOptions()
    for flag in FLAGS:
        assert flag.value(flag.default()) == getattr(defaults, flag.field), flag.field


def _declared(command: str) -> set[str]:
    click_command = typer.main.get_command(app).commands[command]
    return {name for param in click_command.params for name in (*param.opts, *param.secondary_opts)}


def test_sweep_takes_every_flag_of_compress_but_method():
    compress, sweep = _declared("compress"), _declared("sweep")
    for flag in FLAGS:
        names = {n for decl in flag.decls for n in decl.split("/")}
        assert names <= compress, flag.decls
        assert (names <= sweep) == (flag.field != "method"), flag.decls
    assert "--config" in sweep and "--methods" in sweep


def test_the_flags_given_reach_the_options(tmp_path):
    """--print-config (the effective recipe) after flags of every parse: numbers, auto, switches, lists."""
    proc = subprocess.run([sys.executable, "-m", "onnxecc", "compress", str(DEMO_MODELS[0]), "--print-config",
                           "--epochs", "7", "--rho", "0.05", "--lr", "auto", "--keep-approximate", "--no-loosen",
                           "--class-axis", "1", "--knobs", "width", "--input-shape", "1,1,8,8", "-m", "params"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "r.toml"
    path.write_text(proc.stdout)
    got = recipe.load(path, CompressOptions)
    assert got == CompressOptions(epochs=7, rho=0.05, lr=None, prune_approximate=False, closed_loop_loosen=False,
                                  class_axis=1, knobs=("width",), input_shapes={None: (1, 1, 8, 8)}, metric="params")


def test_sweep_reads_a_recipe_and_the_flags_given_override_it(tmp_path):
    config = tmp_path / "recipe.toml"
    config.write_text("epochs = 0\nmin_width = 2\nround_to = 1\n")
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "onnxecc", "sweep", str(DEMO_MODELS[0]), "--budgets", "0.5",
                           "--methods", "project", "-o", str(out), "--config", str(config), "--min-width", "3",
                           "--no-latency", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    point = json.loads((out / "sweep.json").read_text())["points"][0]
    used = json.loads(open(point["report"]).read())["recipe"]
    assert (used["epochs"], used["min_width"], used["round_to"], used["measure_latency"]) == (0, 3, 1, False)
