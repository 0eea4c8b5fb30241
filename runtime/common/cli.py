"""The command-line contract every erde command shares, on click (docs/reference.md, "Commands").

- ``command(prog)`` makes a click command (``group(prog)`` a group) with ``-h/--help``, ``--version`` and
  ``--debug``; ``console_script(cmd)`` is its console script: it returns the exit code.
- Every problem is one ``Error: what, where, how to fix`` line on stderr; ``--debug`` adds the traceback.
  The exit codes are defined once, in ``erde.runtime.common.errors``; an error type carries its own
  (``ErdeError.exit_code``).
- The options below mean the same in every command that has them. The rule for the model folder: every command
  that reads one takes it as ``--model DIR`` (default: the bundled model); positional arguments are what the
  command works on (images for erde-run, a checkpoint for erde-export and erde-train).
"""

from __future__ import annotations

import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import click

from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, ErdeError  # noqa: F401

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class UsageError(ErdeError):
    """A bad command line."""


def erde_version() -> str:
    """The installed erde's version ("unknown" when run from a checkout that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("erde")
    except PackageNotFoundError:
        return "unknown"


# ---- commands ---------------------------------------------------------------------------------------------

debug_option = click.option("--debug", is_flag=True, help="Show the traceback of an error.")


class Command(click.Command):
    """A click command whose errors become one ``Error:`` line and the documented exit code, however it is
    invoked (console script, ``python -m``, click's test runner)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise
        except BaseException as e:  # noqa: B036 - KeyboardInterrupt too: one line and 130
            raise click.exceptions.Exit(report(e, bool(ctx.params.get("debug")))) from None


class Group(click.Group):
    command_class = Command


def _common(prog: str, fn: Callable) -> Callable:
    return click.version_option(erde_version(), "--version", message=f"{prog} (erde %(version)s)")(fn)


def command(prog: str) -> Callable[[Callable], click.Command]:
    """Decorator: a command named ``prog`` under the contract (``-h/--help``, ``--version``, ``--debug``)."""
    return lambda fn: click.command(prog, cls=Command, context_settings=CONTEXT)(_common(prog, debug_option(fn)))


def group(prog: str) -> Callable[[Callable], click.Group]:
    """Decorator: a group of commands under the contract (each sub-command adds ``debug_option``)."""
    return lambda fn: click.group(prog, cls=Group, context_settings=CONTEXT)(_common(prog, fn))


def console_script(cmd: click.Command) -> Callable[[Optional[Sequence[str]]], int]:
    """The console script of ``cmd``: ``main(argv=None) -> exit code``; click's own usage errors are one line too."""

    def main(argv: Optional[Sequence[str]] = None) -> int:
        safe_console()
        prog = os.path.basename(sys.argv[0]) if argv is None else cmd.name
        args = list(sys.argv[1:] if argv is None else argv)
        try:
            rv = cmd.main(args=args, prog_name=prog, standalone_mode=False, obj={"argv": args})
        except click.ClickException as e:
            return report(UsageError(_usage_message(cmd, e, prog)), False)
        except click.exceptions.Abort:
            return report(KeyboardInterrupt(), False)
        return rv if isinstance(rv, int) else EXIT_OK

    main.__doc__ = f"Run {cmd.name} under erde's command-line contract; return the exit code."
    return main


def _usage_message(cmd: click.Command, e: click.ClickException, prog: str) -> str:
    msg = e.format_message()
    takes_model = any(p.name == "model" for p in getattr(cmd, "params", []))
    if takes_model and "unexpected extra argument" in msg:
        msg += "; a model folder is given as --model DIR"
    return f"{msg} (see {prog} --help)"


def report(e: BaseException, debug: bool) -> int:
    """Print one ``Error:`` line for ``e`` on stderr (with ``debug``, the traceback first); return the exit code.

    ErdeError -> its ``exit_code``; OSError -> 2, with the file; Ctrl-C -> 130; a closed pipe (``tool | head``)
    -> 0, quietly; anything else (a bug) -> 1, still one line.
    """
    err = sys.stderr
    if isinstance(e, BrokenPipeError):  # the reader went away: stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_OK
    if debug and not isinstance(e, (UsageError, KeyboardInterrupt)):
        traceback.print_exception(type(e), e, e.__traceback__, file=err)
    if isinstance(e, ErdeError):
        print(f"Error: {e}", file=err)
        return e.exit_code
    if isinstance(e, OSError):
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"Error: {where}{e.strerror or e}", file=err)
        return EXIT_USAGE
    if isinstance(e, KeyboardInterrupt):
        print("Error: interrupted; every file erde writes is written whole or not at all", file=err)
        return EXIT_INTERRUPTED
    print(f"Error: unexpected {type(e).__name__}: {e} (run with --debug for the traceback)", file=err)
    return EXIT_FAILED


def safe_console() -> None:
    """Never fail on printing a name the console's encoding cannot show (e.g. a non-UTF-8 file name)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):  # not a text stream we may reconfigure (tests' StringIO)
            pass


# ---- value types ------------------------------------------------------------------------------------------

POSITIVE = click.IntRange(min=1)
COUNT = click.IntRange(min=0)


class _Finite(click.ParamType):
    name = "number"

    def convert(self, value: Any, param, ctx) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = math.nan
        if not math.isfinite(v):
            self.fail(f"expected a finite number, got {value!r}", param, ctx)
        return v


FINITE = _Finite()
PATH = click.Path(path_type=Path)


class _Threshold(click.ParamType):
    """An exit threshold as erde prints it: ``0.9`` for every early exit, or ``0.66/0.5`` (exit 1, exit 2, ...).
    Only numbers here; the engine checks the range and the count against the model."""

    name = "threshold"

    def convert(self, value: Any, param, ctx):
        if isinstance(value, (float, tuple)):
            return value
        try:
            parts = [float(v) for v in str(value).split("/")]
        except ValueError:
            self.fail(f"expected a number, or one per early exit as T1/T2/..., got {value!r}", param, ctx)
        return parts[0] if len(parts) == 1 else tuple(parts)


THRESHOLD = _Threshold()


# ---- options that mean the same everywhere ----------------------------------------------------------------

model_option = click.option("--model", metavar="DIR", type=str, default=None,
                            help="Model folder written by erde-export or erde-quantize (default: the bundled "
                                 "cifar10 model).")
threads_option = click.option("--threads", type=POSITIVE, default=None, metavar="N",
                              help="onnxruntime threads (default: one per core).")
force_option = click.option("--force", is_flag=True,
                            help="Replace --out if an erde tool wrote it and nothing in it was added or changed since.")
no_verify_option = click.option("--no-verify", is_flag=True,
                                help="Skip the check that this machine gives the answers the model folder was built "
                                     "with (its self-test, run once per machine and model; see erde-verify).")


def json_option(what: str) -> Callable:
    """``--json``: always a flag that prints JSON on stdout (never a file name)."""
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as JSON on stdout.")


def data_option(required: bool, what: str = "The dataset") -> Callable:
    return click.option("--data", type=PATH, envvar="ERDE_DATA", required=required, metavar="PATH",
                        help=f"{what}: an image folder with train/ and test/ (also $ERDE_DATA).")


def command_line() -> str:
    """The command line being run, as a shell would take it back (for records)."""
    import shlex

    root = click.get_current_context().find_root()
    return " ".join([root.command.name or ""] + [shlex.quote(a) for a in (root.obj or {}).get("argv", [])])


def exclusive(**given: Any) -> None:
    """UsageError if more than one of the options (name -> value; None or False: not given) was given."""
    names = ["--" + k.replace("_", "-") for k, v in given.items() if v not in (None, False, ())]
    if len(names) > 1:
        raise UsageError(f"{' and '.join(names)} exclude each other; pass one")
