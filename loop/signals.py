"""Stop requests: the preemption signals that make the loop finish its step, save and exit cleanly."""

from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Set by SIGTERM/SIGUSR1: finish the step, save, exit cleanly."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> None:
        """Catch the stop signals (main thread only, as Python requires)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        """Ask for a stop at the end of the current optimizer step."""
        self.signal_name = reason

    @property
    def requested(self) -> bool:
        """True once a stop was asked for on this process."""
        return self.signal_name is not None
