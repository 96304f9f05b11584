"""One error type for user mistakes, and the CLI wrapper that turns it into one line and exit code 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input (config, data, arguments): reported as one line, exit code 2."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run `main`, printing a UserError as `error: <message>` (traceback only with --debug or LOOP_DEBUG=1)."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("LOOP_DEBUG") == "1"
    try:
        return int(main(args) or 0)
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
