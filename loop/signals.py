"""Stop requests: the signals that make the loop finish its step, save a checkpoint and exit cleanly.

SIGTERM and SIGUSR1 (what schedulers send before preemption) and a first Ctrl-C (SIGINT) ask for a stop at
the end of the current optimizer step; a second Ctrl-C stops at once (KeyboardInterrupt, reported in one line).
"""

from __future__ import annotations

import signal
import sys
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Set by SIGTERM/SIGUSR1 or a first Ctrl-C: finish the step, save, exit cleanly."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.interrupts = 0

    def install(self) -> None:
        """Catch the stop signals and Ctrl-C (main thread only, as Python requires)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        signal.signal(signal.SIGINT, self._interrupt)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.request(signal.Signals(signum).name)

    def _interrupt(self, _signum: int, _frame: Any) -> None:
        self.interrupts += 1
        if self.interrupts > 1:
            raise KeyboardInterrupt
        print("\nCtrl-C: stopping at the end of this step and saving a checkpoint; press Ctrl-C again to stop "
              "at once", file=sys.stderr, flush=True)
        if self.signal_name is None:
            self.request("SIGINT (Ctrl-C)")

    def request(self, reason: str) -> None:
        """Ask for a stop at the end of the current optimizer step (the first reason is kept)."""
        if self.signal_name is None:
            self.signal_name = reason

    @property
    def requested(self) -> bool:
        """True once a stop was asked for on this process."""
        return self.signal_name is not None
