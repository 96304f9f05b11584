"""Errors the user should read as one line, and the CLI wrapper that prints them with their exit codes."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C

_REASONS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.ENOTDIR: "a part of the path is a file, not a directory", errno.EEXIST: "a file is in the way",
            errno.ENAMETOOLONG: "the name is too long", errno.EISDIR: "a directory is in the way"}


def storage_reason(err: OSError) -> str:
    """A few words for a storage error (no space, read-only, a file in the way, ...)."""
    return _REASONS.get(err.errno, err.strerror or type(err).__name__)


class UserError(Exception):
    """A mistake in the user's input (config, data, arguments): one line, exit code 2, nothing written."""

    exit_code = EXIT_USER_ERROR


class TrainingDiverged(Exception):
    """Too many consecutive non-finite steps: one line, exit code 3, last good checkpoint kept."""

    exit_code = EXIT_DIVERGED


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: `error: PROG: message (see --help)`, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message} (see --help)\n")


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None,
            interrupted_hint: str = "") -> int:
    """Run `main`; print a UserError, TrainingDiverged or Ctrl-C as `error: <message>` (traceback with --debug)."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("LOOP_DEBUG") == "1"
    try:
        return int(main(args) or 0)
    except (UserError, TrainingDiverged) as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\nerror: interrupted (Ctrl-C){interrupted_hint}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
