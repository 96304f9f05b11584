"""What the terminal shows: the loop's own progress and messages, with the libraries' chatter turned down."""

from __future__ import annotations

from typing import Any


def quiet_libraries() -> None:
    """Keep the console to the loop's own progress bar and messages."""
    import logging

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # BART ties its embeddings: accelerate's notice that it saved the shared tensor once is expected.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


def progress_bar(total: int, initial: int, main_process: bool) -> Any:
    """A bar on a terminal; in a log file (no TTY) the bar is off and the loop prints plain lines instead."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=None if main_process else True, desc="training",
                unit="step", dynamic_ncols=True)
