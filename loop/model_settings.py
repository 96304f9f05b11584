"""best/loop_config.toml: the resolved settings a model was exported with, so that a best/ copied away from its run
(or downloaded from W&B) still gets the inputs it was trained on: source prefix, lengths, columns, cleaning,
languages and decoding.

Not named config.toml: predict's resolve_model_dir takes a directory holding config.toml for a run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from loop.config import Config, load_config, tomllib  # tomllib: tomli on Python 3.10
from loop.errors import UserError

SETTINGS_FILE = "loop_config.toml"
_HEADER = ("# The settings of the run that exported this model (loop/model_settings.py). predict and decode_search\n"
           "# read them; the weights and the tokenizer always come from this directory, never from\n"
           "# model.name_or_path or the data files named here.\n")


def settings_text(cfg: Config) -> str:
    """The TOML written into best/: every resolved setting, with the run's model short name kept."""
    data = cfg.to_dict()
    # Predict points model.name_or_path at the model directory; pinning the short name keeps run names and tags.
    data["model"]["short_name"] = cfg.model_short_name
    return f"{_HEADER}# resolved from {cfg.source}\n" + tomli_w.dumps(data)


def write_settings(cfg: Config, directory: Path) -> None:
    """Write best/'s settings file into `directory` (an export's temporary directory, swapped in whole)."""
    (directory / SETTINGS_FILE).write_text(settings_text(cfg), encoding="utf-8")


def saved_settings(model_dir: Path) -> tuple[Path, list[str]] | None:
    """(settings file, --set items that keep the model inside `model_dir`), or None for a best/ without the file.

    A damaged or invalid file is one line naming it: guessing the settings instead would change the inputs.
    """
    path = model_dir / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        data: Any = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # as load_config reads it
    except OSError as err:
        raise UserError(f"{path}: cannot read it: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: damaged: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: damaged: invalid TOML: {err}") from None
    if "extends" in data:  # a model directory must be self-contained; the export never writes `extends`
        raise UserError(f"{path}: `extends` is not allowed in a model directory's settings file")
    # The weights and tokenizer are this directory's, never a hub id or the training tokenizer. Resolved, so that
    # two spellings of one directory give one config (decode_search resumes only a search with the same config).
    pinned = [f"model.name_or_path={model_dir.resolve()}", "model.tokenizer="]
    try:
        load_config(path, pinned)
    except UserError as err:
        message = str(err)
        raise UserError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    return path, pinned
