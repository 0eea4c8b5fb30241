"""The command-line contract every ERDE tool shares (argparse here; the click tools use it too).

Every problem is one ``Error: what, where, how to fix`` line on stderr;
``--debug`` adds the traceback. The exit codes are defined once, in ``erde.runtime.common.errors``; an error
type carries its own (``ErdeError.exit_code``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from typing import Callable, Dict, NoReturn, Optional, Sequence, Type

from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_MISMATCH, EXIT_OK, EXIT_USAGE, ErdeError  # noqa: F401


class UsageError(ErdeError):
    """A bad command line."""


def erde_version() -> str:
    """The installed erde's version ("unknown" when run from a checkout that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("erde")
    except PackageNotFoundError:
        return "unknown"


class Parser(argparse.ArgumentParser):
    """argparse with the shared contract: one-line usage errors, and ``--version``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=f"{self.prog} (erde {erde_version()})")

    def error(self, message: str) -> NoReturn:  # argparse would print the whole usage; we print one line
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_verify_option(p: argparse.ArgumentParser) -> None:
    """``--no-verify``: the same words in every command that checks a model folder's self-test first."""
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check that this machine gives the answers the model folder was built with "
                        "(its self-test, run once per machine and model; see erde-verify)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def finite_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def safe_console() -> None:
    """Never fail on printing a name the console's encoding cannot show (e.g. a non-UTF-8 file name)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):  # not a text stream we may reconfigure (tests' StringIO)
            pass


def run_cli(run: Callable[[], int], argv: Optional[Sequence[str]],
            exit_codes: Optional[Dict[Type[ErdeError], int]] = None) -> int:
    """Call ``run`` and turn every failure into one ``Error:`` line and an exit code.

    ErdeError -> its ``exit_code`` (2 unless the type says otherwise) or the code ``exit_codes`` maps it to; Ctrl-C -> 130; a closed
    pipe (``tool | head``) -> 0, quietly; anything else (a bug) -> 1, still one line.
    """
    safe_console()
    err = sys.stderr
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        return run()
    except ErdeError as e:
        if debug and not isinstance(e, UsageError):
            traceback.print_exc(file=err)
        print(f"Error: {e}", file=err)
        return next((code for kind, code in (exit_codes or {}).items() if isinstance(e, kind)), e.exit_code)
    except KeyboardInterrupt:
        print("Error: interrupted", file=err)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_OK
    except Exception as e:  # a bug or an environment problem
        if debug:
            traceback.print_exc(file=err)
        print(f"Error: unexpected {type(e).__name__}: {e} (run with --debug for the traceback)", file=err)
        return EXIT_FAILED
