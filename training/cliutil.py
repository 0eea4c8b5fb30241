"""What every ERDE click command shares: one ``Error:`` line instead of a traceback."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

from erde.runtime.errors import ErdeError

debug_option = click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ErdeError (and a few OS errors) into ``Error: ...`` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ErdeError, OSError) as e:
            if debug:
                raise
            msg = str(e) if isinstance(e, ErdeError) else f"{getattr(e, 'filename', '') or ''}: {e.strerror or e}"
            click.echo(f"Error: {msg}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("Error: interrupted; the last complete checkpoint (if any) is intact", err=True)
            sys.exit(130)

    return wrapper
