"""The command-line contract (runtime/common/cli.py): one framework, one meaning per flag, one error funnel.

The end-to-end runs of every console script (``--help``, ``--version``, a bad option, a failing input) are in
test_hostile_inputs.py; this file checks the contract on the commands themselves, in-process.
"""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import click
import pytest

from erde.runtime.common import cli as contract
from erde.runtime.common.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, ErdeError

SCRIPTS = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]


def _commands():
    """{console script: its click command} for every console script in pyproject.toml, sub-commands included."""
    found = {}
    for name, target in SCRIPTS.items():
        module, attr = target.split(":")
        main = getattr(importlib.import_module(module), attr)
        cmd = importlib.import_module(module).cli
        assert main.__doc__.startswith(f"Run {cmd.name} "), f"{name}: main is not console_script(cli)"
        found[name] = cmd
        for sub in getattr(cmd, "commands", {}).values():
            found[f"{name} {sub.name}"] = sub
    return found


COMMANDS = _commands()


def _options(cmd):
    return {opt: p for p in cmd.params if isinstance(p, click.Option) for opt in p.opts}


def test_one_framework_for_every_command():
    for name, cmd in COMMANDS.items():
        assert isinstance(cmd, (contract.Command, contract.Group)), name
        assert cmd.name == name.split(" ")[0] or " " in name, name


@pytest.mark.parametrize("flag,kind", [("--json", "flag"), ("--force", "flag"), ("--debug", "flag"),
                                       ("--no-verify", "flag"), ("--model", str), ("--threads", "positive"),
                                       ("--max-images", "positive"), ("--data", "path"), ("--images", "path")])
def test_a_flag_means_the_same_everywhere(flag, kind):
    having = {name: _options(cmd)[flag] for name, cmd in COMMANDS.items() if flag in _options(cmd)}
    assert having, flag
    for name, p in having.items():
        if kind == "flag":
            assert p.is_flag, (name, flag)
        elif kind == "positive":
            assert isinstance(p.type, click.IntRange) and p.type.min == 1, (name, flag)
        elif kind == "path":
            assert isinstance(p.type, click.Path), (name, flag)  # a folder or file, never a count
        else:
            assert p.type.name == "text", (name, flag)
    if flag == "--json":  # always JSON on stdout, never a file name
        assert all("as JSON on stdout" in p.help for p in having.values())
    if flag in ("--model", "--no-verify"):  # the same words wherever it appears
        assert len({p.help for p in having.values()}) == 1


def test_every_command_that_reads_a_model_folder_takes_it_as_model():
    for name in ("erde-run", "erde-calibrate", "erde-profile", "erde-verify", "erde-quantize", "erde-bench"):
        assert "--model" in _options(COMMANDS[name]), name
        positional = [p for p in COMMANDS[name].params if isinstance(p, click.Argument)]
        assert all(p.name == "inputs" for p in positional), name  # only erde-run's images are positional


def test_every_command_has_version_help_and_debug(capsys):
    for name, cmd in COMMANDS.items():
        script, *sub = name.split(" ")
        module, attr = SCRIPTS[script].split(":")
        main = getattr(importlib.import_module(module), attr)
        assert main(sub + ["-h"]) == 0, name
        shown = capsys.readouterr().out
        assert "--help" in shown and ("--version" in shown if not sub else "--debug" in shown), name
        if not isinstance(cmd, contract.Group):
            assert "--debug" in _options(cmd), name


def test_usage_errors_are_one_line_with_the_command_and_code_2(capsys):
    from erde.runtime.tools.verify_cli import main

    assert main(["--no-such-option"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err == "Error: No such option '--no-such-option'. (see erde-verify --help)\n"
    assert main(["some/folder"]) == EXIT_USAGE  # the old positional model folder: the rule is named
    assert "a model folder is given as --model DIR" in capsys.readouterr().err


@contract.command("erde-demo")
@click.option("--fail", type=click.Choice(["erde", "os", "bug", "ctrl-c", "mismatch"]))
def _demo(fail, debug):
    from erde.runtime.core.selftest import MismatchError

    raise {"erde": ErdeError("bad thing; fix it"), "os": FileNotFoundError(2, "No such file", "x.png"),
           "bug": ZeroDivisionError("oops"), "ctrl-c": KeyboardInterrupt(), "mismatch": MismatchError("differs")}[fail]


@pytest.mark.parametrize("fail,code,line", [
    ("erde", EXIT_USAGE, "Error: bad thing; fix it"),
    ("os", EXIT_USAGE, "Error: x.png: No such file"),
    ("bug", EXIT_FAILED, "Error: unexpected ZeroDivisionError: oops (run with --debug for the traceback)"),
    ("ctrl-c", EXIT_INTERRUPTED, "Error: interrupted; every file erde writes is written whole or not at all"),
    ("mismatch", 3, "Error: differs"),
])
def test_every_failure_is_one_line_and_its_code(capsys, fail, code, line):
    main = contract.console_script(_demo)
    assert main(["--fail", fail]) == code
    assert capsys.readouterr().err == line + "\n"
    assert main(["--fail", fail, "--debug"]) == code
    err = capsys.readouterr().err
    assert err.endswith(line + "\n") and ("Traceback" in err) == (fail != "ctrl-c")


def test_the_funnel_holds_under_clicks_test_runner_too():
    from click.testing import CliRunner

    r = CliRunner().invoke(_demo, ["--fail", "erde"])
    assert r.exit_code == EXIT_USAGE and r.output.strip().endswith("Error: bad thing; fix it")


def test_exclusive_names_the_options():
    contract.exclusive(a=None, b_c=1)
    with pytest.raises(contract.UsageError, match="--a and --b-c exclude each other"):
        contract.exclusive(a=True, b_c=1)
