"""Issue 26 (3): `CompressOptions` as a recipe file. Options → TOML/JSON → options is the identity for every field
type (read back by the standard library's parsers, not ours); `compress --config` reads a file whose keys override
the defaults, flags given on the command line override the file (flags left at their defaults do not);
`--print-config` shows the effective recipe; bad files exit 2 with one line; the report's recipe repeats the run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing

import pytest
from conftest import DEMO_MODELS
from typer.main import get_command
from typer.testing import CliRunner

from onnxecc.cli import app
from onnxecc.compress import CompressOptions
from onnxecc.core import recipe
from onnxecc.core.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser before the standard library took it in (what core.recipe reads with there)
    import tomli as tomllib

MODEL = str(DEMO_MODELS[0])  # digits_cnn
# compress's parameters that are not options of the run (where it reads and writes, how it reports)
NOT_SETTINGS = {"ctx", "model", "budget", "output", "report", "config", "print_config", "overwrite", "checkpoint",
                "resume", "nproc", "quiet"}
ODD = 'quote " backslash \\ newline \n tab \t DEL \x7f é ∑ 😀'  # what a TOML writer must escape, or must not


def _other(hint, default, step: int):
    """A value of type `hint` that differs from `default` (and, with another `step`, from the first one)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if type(None) in args:  # X | None, default None: a value of X
        return _other(next(a for a in args if a is not type(None)), None, step)
    if hint is bool:
        return not default if default is not None else bool(step % 2)
    if hint is int:
        return (default or 0) + 3 + step
    if hint is float:
        return (default or 0.0) * 1.5 + 0.125 * (step + 1) + 1e-7  # not a short decimal: repr round trip
    if hint is str:
        return f"{default or ''}-{step}{ODD}"
    if origin is tuple:
        return ("width", "precision") if step == 0 else ("precision", "width", f"k{step}")
    if origin is dict:
        return {None: (1, 3, 8, 8 + step), "input.1": (2, 5 + step), "ids:0": (1,)}
    raise AssertionError(f"add a non-default value for {hint}")


def _all_changed(step: int = 0) -> CompressOptions:
    hints = typing.get_type_hints(CompressOptions)
    defaults = CompressOptions()
    opts = CompressOptions(**{f.name: _other(hints[f.name], getattr(defaults, f.name), step)
                              for f in dataclasses.fields(CompressOptions)})
    assert all(getattr(opts, f.name) != getattr(defaults, f.name) for f in dataclasses.fields(CompressOptions))
    return opts


def test_every_field_round_trips_through_toml_and_json(tmp_path):
    opts = _all_changed()
    text = recipe.to_toml(opts)
    assert recipe.from_dict(CompressOptions, tomllib.loads(text), "toml") == opts  # stdlib parser reads ours
    assert recipe.from_dict(CompressOptions, json.loads(json.dumps(recipe.as_dict(opts))), "json") == opts
    for name in ("r.toml", "r.json"):
        recipe.save(opts, tmp_path / name)
        assert recipe.load(tmp_path / name, CompressOptions) == opts
    # the defaults too: None fields are left out of TOML (no null there) and read back as their defaults
    defaults = recipe.to_toml(CompressOptions())
    assert recipe.from_dict(CompressOptions, tomllib.loads(defaults), "t") == CompressOptions()
    # types as annotated: a float given as an integer reads as a float, tuples stay tuples
    text = "rho = 3\nknobs = ['width']\n[input_shapes]\n'' = [1, 2]"
    back = recipe.from_dict(CompressOptions, tomllib.loads(text), "t")
    assert back.rho == 3.0 and isinstance(back.rho, float) and back.knobs == ("width",)
    assert back.input_shapes == {None: (1, 2)}


@pytest.mark.parametrize("text, words", [
    ("epoch = 3", ["unknown key 'epoch'", "'epochs'"]),
    ("input_shape = {x = [1, 2]}", ["unknown key 'input_shape'", "'input_shapes'"]),
    ('epochs = "3"', ["epochs", "an integer"]),
    ("epochs = 3.0", ["epochs", "an integer"]),
    ("epochs = true", ["epochs", "an integer"]),
    ("closed_loop = 1", ["closed_loop", "true or false"]),
    ('knobs = "width"', ["knobs", "a list of strings"]),
    ('lr = "auto"', ["lr", "a number"]),
    ('[input_shapes]\n"input.1" = [1, "a"]', ['input_shapes."input.1"', "a list of integers"]),
])
def test_bad_key_or_type_is_one_line_naming_it(tmp_path, text, words):
    (tmp_path / "r.toml").write_text(text + "\n")
    with pytest.raises(UserError) as err:
        recipe.load(tmp_path / "r.toml", CompressOptions)
    message = str(err.value)
    assert "\n" not in message and f"--config {tmp_path / 'r.toml'}" in message
    for word in words:
        assert word in message


def _cli(*args, cwd=None):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "onnxecc", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


def _one_line_exit_2(proc) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_cli_bad_recipe_files_exit_2_in_one_line(tmp_path):
    (tmp_path / "unknown.toml").write_text("epochs = 2\nadmm_iteration = 3\n")
    line = _one_line_exit_2(_cli("compress", MODEL, "-b", "0.5", "-o", str(tmp_path / "o.onnx"),
                                 "--config", str(tmp_path / "unknown.toml")))
    assert "admm_iteration" in line and "'admm_iterations'" in line
    (tmp_path / "broken.toml").write_text("epochs = = 2\n")
    line = _one_line_exit_2(_cli("compress", MODEL, "--config", str(tmp_path / "broken.toml"), "--print-config"))
    assert "--config" in line and "broken.toml" in line and "not valid TOML" in line
    line = _one_line_exit_2(_cli("compress", MODEL, "--config", str(tmp_path / "none.json"), "--print-config"))
    assert "--config" in line and "none.json" in line
    assert "--budget is missing" in _one_line_exit_2(_cli("compress", MODEL, "-o", str(tmp_path / "o.onnx")))
    assert not (tmp_path / "o.onnx").exists()


def _print_config(*args) -> CompressOptions:
    done = CliRunner().invoke(app, ["compress", MODEL, *args, "--print-config"])
    assert done.exit_code == 0, (done.output, done.exception)
    return recipe.from_dict(CompressOptions, tomllib.loads(done.stdout), "--print-config")


def test_print_config_alone_shows_the_defaults():
    """The CLI's defaults are `CompressOptions`' own: no flag, no file → the dataclass defaults."""
    assert _print_config() == CompressOptions()


def _flag_args(param, value) -> list[str]:
    """Command-line arguments that set `param` (a click option of compress) to `value`."""
    if param.is_flag:
        return [param.opts[0] if value else param.secondary_opts[0]]
    if param.name == "knobs":
        return [param.opts[0], ",".join(value)]
    if param.name == "input_shapes":
        return [arg for name, dims in value.items() for arg in (param.opts[0], f"{name}:{','.join(map(str, dims))}")]
    return [param.opts[0], str(value)]


def test_file_overrides_defaults_and_every_given_flag_overrides_the_file(tmp_path):
    """The file sets (almost) every setting to a value other than its default; each flag of compress that is a
    setting is given with a third value: the flags win where given, the file elsewhere (settings without a flag, as
    temperature). A flag given with its default value still overrides; a flag not given does not."""
    command = get_command(app).commands["compress"]
    hints, defaults = typing.get_type_hints(CompressOptions), CompressOptions()
    from_file = dataclasses.replace(_all_changed(step=0), input_shapes={"x": (1, 1, 8, 8)},  # the CLI names inputs
                                    knobs=("precision", "width"), closed_loop_loosen=True)  # unlike the flags
    flags, args = {}, []
    for param in command.params:
        setting = param.name  # compress's flags are named by their setting (`onnxecc.cli_options`)
        if setting not in hints:
            assert param.name in NOT_SETTINGS, f"compress --{param.name}: neither a setting nor listed as not one"
            continue
        value = {"knobs": ("width", "precision"), "input_shapes": {"x": (2, 1, 8, 8)}, "lr": 1e-3,
                 "closed_loop_loosen": False}.get(setting)
        if param.is_flag and not param.secondary_opts:  # --verify-projection: only on; the file keeps it off
            value = not getattr(defaults, setting)
            from_file = dataclasses.replace(from_file, **{setting: getattr(defaults, setting)})
        elif value is None:  # a value unlike the file's and the default's
            value = _other(hints[setting], getattr(from_file, setting), step=1)
            value = value.replace("\n", " ").replace("\x7f", "") if isinstance(value, str) else value
        flags[setting] = value
        args += _flag_args(param, value)
    assert len(flags) >= 25  # the run's settings are flags (a few only in files: temperature, distill_weight, ...)
    recipe.save(from_file, tmp_path / "r.toml")
    assert _print_config("--config", str(tmp_path / "r.toml")) == from_file  # file over defaults, no flag
    merged = _print_config("--config", str(tmp_path / "r.toml"), *args)
    assert merged == dataclasses.replace(from_file, **flags)
    assert all(getattr(merged, s) != getattr(from_file, s) for s in flags)  # each flag changed something

    # given with the default value: still given
    assert _print_config("--config", str(tmp_path / "r.toml"), "--epochs", str(defaults.epochs)) == \
        dataclasses.replace(from_file, epochs=defaults.epochs)


def test_report_recipe_repeats_the_run(tmp_path):
    """A projection-only run from a recipe plus flags: the report's recipe is the effective options
    (`--print-config` of the same command); the report given as --config, or its recipe extracted to a file,
    gives those options again, and the repeated run chooses the same widths."""
    (tmp_path / "r.toml").write_text('method = "project"\nepochs = 0\nmeasure_latency = false\nround_to = 4\n'
                                     "seed = 5\n")
    args = ["--config", str(tmp_path / "r.toml"), "--min-width", "2", "--round-to", "1"]
    expected = _print_config(*args)
    assert (expected.method, expected.round_to, expected.min_width, expected.measure_latency) == ("project", 1, 2,
                                                                                                  False)
    first = _cli("compress", MODEL, "-b", "0.4", "-o", str(tmp_path / "a.onnx"), "--report", str(tmp_path / "a.json"),
                 *args)
    assert first.returncode == 0, first.stderr
    report = json.loads((tmp_path / "a.json").read_text())
    assert recipe.from_dict(CompressOptions, report["recipe"], "report") == expected
    (tmp_path / "extracted.json").write_text(json.dumps(report["recipe"]))
    assert _print_config("--config", str(tmp_path / "extracted.json")) == expected
    assert _print_config("--config", str(tmp_path / "a.json")) == expected  # the report itself

    again = _cli("compress", MODEL, "-b", "0.4", "-o", str(tmp_path / "b.onnx"), "--report", str(tmp_path / "b.json"),
                 "--config", str(tmp_path / "a.json"))
    assert again.returncode == 0, again.stderr
    repeated = json.loads((tmp_path / "b.json").read_text())
    assert repeated["recipe"] == report["recipe"]
    assert repeated["widths"] == report["widths"] and repeated["counted_cost"] == report["counted_cost"]


def test_wsp_report_embeds_the_recipe_too(tmp_path):
    """--method wsp writes its own report (onnxecc.methods.wsp): the recipe is there as well. Data-free: seconds."""
    from onnxecc.compress import compress

    opts = CompressOptions(metric="energy", method="wsp", hardware=str(DEMO_MODELS[0].parents[1] / "profiles"
                                                                       / "eyeriss.json"),
                           measure_latency=False, proj_interval=7, seed=3)
    compress(MODEL, "0.6", tmp_path / "w.onnx", opts, report=tmp_path / "w.json")
    report = json.loads((tmp_path / "w.json").read_text())
    assert "wsp" in report and recipe.from_dict(CompressOptions, report["recipe"], "report") == opts
