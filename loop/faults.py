"""Preemption signals, plus fault injection that the tests use to interrupt, poison or kill a real run.

The injection points are read from environment variables once; unset (the normal case) they do nothing.
- LOOP_FAULT_PREEMPT_AT_MICROSTEP=N: behave as if SIGTERM arrived while micro-batch N (1-based) was running.
- LOOP_FAULT_NAN_AT_STEPS=3,4,5: make the loss NaN in those optimizer steps (1-based).
- LOOP_FAULT_SAVE_PAUSE_S=S: sleep S seconds inside a checkpoint save, after writing and before the rename.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Set by SIGTERM/SIGUSR1 (or an injected preemption): finish the step, save, exit cleanly."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._preempt_at = int(os.environ.get("LOOP_FAULT_PREEMPT_AT_MICROSTEP", "0"))

    def install(self) -> None:
        """Catch the stop signals (main thread only, as Python requires)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def on_micro_step(self, micro_step: int) -> None:
        """Count a micro-batch; the injected preemption fires here."""
        if self._preempt_at and micro_step == self._preempt_at:
            self.signal_name = "SIGTERM (injected)"

    @property
    def requested(self) -> bool:
        """True once a stop was asked for on this process."""
        return self.signal_name is not None


def nan_steps() -> set[int]:
    """Optimizer steps whose loss is poisoned with NaN (tests of the non-finite guard)."""
    raw = os.environ.get("LOOP_FAULT_NAN_AT_STEPS", "")
    return {int(s) for s in raw.split(",") if s.strip()}


def pause_in_save() -> None:
    """Hold a save half-done so a test can SIGKILL it there."""
    seconds = float(os.environ.get("LOOP_FAULT_SAVE_PAUSE_S", "0"))
    if seconds:
        print("checkpoint save paused (fault injection)", flush=True)
        time.sleep(seconds)
