"""The run directory: its name on disk, the checks made before anything is written, the lock that keeps a
second launch out, and one-line messages for storage that cannot be written."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loop.checkpoints import list_checkpoints
from loop.config import Config
from loop.errors import UserError, storage_reason

LOCK_FILE = ".lock"
# What the loop itself writes into a run directory (a launch that stopped before its first checkpoint leaves
# only these, and the next launch into the directory starts over by removing them; nothing else is touched).
LOOP_FILES = ("config.toml", "tokenizer", "eval_metrics.jsonl", "predictions", "best", "best.tmp", "best.old",
              "artifacts", "wandb", "checkpoints", "final_metrics.json")

def storage_error(path: Path, what: str, err: OSError) -> UserError:
    """A one-line error naming the path, what was being written and why it failed."""
    return UserError(f"{path}: cannot {what}: {storage_reason(err)} (training.output_dir names the run directory)")


@contextlib.contextmanager
def storage_warning(warn: Any, what: str) -> Iterator[None]:
    """A storage error inside the block (a full disk, say) becomes one warning line, and training goes on."""
    try:
        yield
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        warn(f"warning: could not {what}{where}: {storage_reason(err)}; training goes on")


def path_component(name: str) -> str:
    """`name` as one safe path component: no separators or control characters, not `.`/`..`, not hidden."""
    safe = re.sub(r"[\x00-\x1f\x7f/\\]", "_", name).strip()
    safe = re.sub(r"^\.+", lambda m: "_" * len(m.group()), safe)
    return safe or "run"


def output_pattern(cfg: Config) -> str:
    """The output_dir template with the run name filled in (safely) and `{time}` left to match any start."""
    return cfg.training.output_dir.format(name=path_component(cfg.run_name()), time="{time}")


def output_path(cfg: Config, started: str) -> Path:
    """The run directory of a run started at `started`."""
    return Path(cfg.training.output_dir.format(name=path_component(cfg.run_name()), time=started))


def has_started(out: Path) -> bool:
    """Whether `out` holds a run that got as far as its first checkpoint (or finished)."""
    return bool(list_checkpoints(out / "checkpoints")) or (out / "final_metrics.json").is_file()


def _holder(out: Path) -> str:
    try:
        info = json.loads((out / LOCK_FILE).read_text(encoding="utf-8"))
        return f"process {info['pid']} on {info['host']} (since {info['since']}: {info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _in_use(out: Path) -> UserError:
    return UserError(f"{out}: in use by {_holder(out)}; wait for it to finish, or choose another directory with "
                     "--set training.output_dir=DIR (or use {time} in it)")


def _already_holds_a_run(out: Path) -> UserError:
    return UserError(f"{out}: already holds a run; continue it with --resume {out}, or choose another directory "
                     "with --set training.output_dir=DIR (or use {time} in it)")


def locked(out: Path) -> bool:
    """Whether a live process holds the run directory's lock."""
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken just now
    return False


def check_output_dir(out: Path, fresh: bool) -> None:
    """Before anything is built: the run directory can be created (or continued) and nobody else is using it."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is a file; training.output_dir must name a directory")
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{out}: {ancestor} is a file, not a directory; training.output_dir must name a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{out}: cannot create the run directory: {ancestor} is not writable "
                        "(training.output_dir names the run directory)")
    if out.is_dir() and locked(out):
        raise _in_use(out)
    if fresh and has_started(out):
        raise _already_holds_a_run(out)


class RunLock:
    """An exclusive lock on a run directory, held for the life of the process (the OS drops it on exit)."""

    def __init__(self, out: Path) -> None:
        self.fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise _in_use(out) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": shlex.join(["loop/train.py", *sys.argv[1:]])[:300]}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(info) + "\n").encode("utf-8"), 0)


def claim(out: Path, fresh: bool, cfg_toml: str | None, tokenizer: Any) -> tuple[RunLock, list[str]]:
    """Create (or take over) the run directory under its lock; write config.toml (unless None) and the tokenizer.

    A fresh run may reuse a directory whose last launch stopped before its first checkpoint: the files the loop
    wrote there are removed first. Returns the lock (keep it) and notes for the console.
    """
    created = not out.exists()
    notes: list[str] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out)
        if fresh:
            if has_started(out):  # another launch got there first
                raise _already_holds_a_run(out)
            leftovers = [name for name in LOOP_FILES if (out / name).exists()]
            if leftovers:
                notes.append(f"note: {out}: its last launch stopped before its first checkpoint; starting over "
                             f"there (removed {', '.join(leftovers)})")
            for name in leftovers:
                path = out / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if cfg_toml is not None:
            write_atomic(out / "config.toml", cfg_toml)
        if not (out / "tokenizer").is_dir():
            tokenizer.save_pretrained(out / "tokenizer.tmp")
            (out / "tokenizer.tmp").rename(out / "tokenizer")
    except OSError as err:
        if created:
            with contextlib.suppress(OSError):
                shutil.rmtree(out)
        raise storage_error(out, "create the run directory", err) from None
    except UserError:
        if created:
            with contextlib.suppress(OSError):
                shutil.rmtree(out)
        raise
    return lock, notes


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
