"""What every ERDE click command shares: the one-line error contract of ``erde.runtime.common.cli``.

``friendly_errors`` wraps a command body: an ErdeError or OSError becomes one
``Error:`` line and exit code 2, any other exception one ``Error: unexpected``
line and exit code 1 (``--debug`` shows the traceback instead). ``run_click``
is the console-script entry: it also turns click's own usage errors into one
line (click prints a usage block otherwise).
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Any, Callable, Optional, Sequence

import click

from erde.runtime.common.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, UsageError, erde_version, run_cli
from erde.runtime.common.errors import ErdeError

debug_option = click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")


def version_option(prog: str):
    """``--version``, worded as the argparse commands word it (erde.runtime.common.cli.Parser)."""
    return click.version_option(erde_version(), "--version", message=f"{prog} (erde %(version)s)")


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn exceptions into ``Error: ...`` on stderr and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ErdeError, OSError) as e:
            if debug:
                traceback.print_exc()
            msg = str(e) if isinstance(e, ErdeError) else f"{getattr(e, 'filename', '') or ''}: {e.strerror or e}"
            click.echo(f"Error: {msg}", err=True)
            sys.exit(EXIT_USAGE)
        except KeyboardInterrupt:
            if debug:
                traceback.print_exc()
            click.echo("Error: interrupted; the last complete checkpoint (if any) is intact", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as e:  # a bug or an environment problem: still one line
            if debug:
                traceback.print_exc()
            click.echo(f"Error: unexpected {type(e).__name__}: {e} (run with --debug for the traceback)", err=True)
            sys.exit(EXIT_FAILED)

    return wrapper


def run_click(command: click.Command, argv: Optional[Sequence[str]] = None) -> int:
    """Run a click command as a console script under the one-line error contract; return the exit code."""
    prog = os.path.basename(sys.argv[0]) if argv is None else command.name

    def run() -> int:
        try:
            rv = command.main(args=None if argv is None else list(argv), prog_name=prog, standalone_mode=False)
        except click.ClickException as e:
            raise UsageError(f"{e.format_message()} (see {prog} --help)") from None
        except click.exceptions.Abort:
            raise KeyboardInterrupt from None
        return rv if isinstance(rv, int) else 0

    return run_cli(run, argv)
