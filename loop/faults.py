"""Preemption signals, plus fault injection that the tests use to interrupt, poison or kill a real run.

The injection points are read from environment variables once; unset (the normal case) they do nothing.
- LOOP_FAULT_PREEMPT_AT_MICROSTEP=N: behave as if SIGTERM arrived while micro-batch N (1-based) was running.
- LOOP_FAULT_NAN_AT_STEPS=3,4,5: make the loss NaN in those optimizer steps (1-based).
- LOOP_FAULT_PREEMPT_RANK=R: only process R gets the injected preemption (tests that all processes agree).
- LOOP_FAULT_SAVE_PAUSE_S=S: sleep S seconds inside a checkpoint save, after writing and before the rename.
- LOOP_FAULT_SAVE_ERROR_AT=N: the save of checkpoint step_N fails there with an OSError (a full disk, say).
- LOOP_FAULT_COUNT_ALLREDUCE=PATH: count DDP gradient all-reduces and write the count to PATH at the end.
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
        rank = os.environ.get("LOOP_FAULT_PREEMPT_RANK")
        if rank is not None and rank != os.environ.get("RANK", "0"):
            self._preempt_at = 0

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


def pause_in_save(name: str = "") -> None:
    """Hold a save half-done so a test can SIGKILL it there (or fail it, for checkpoint `name`)."""
    if name and os.environ.get("LOOP_FAULT_SAVE_ERROR_AT") and name == f"step_{os.environ['LOOP_FAULT_SAVE_ERROR_AT']}":
        raise OSError(28, "No space left on device (injected)")
    seconds = float(os.environ.get("LOOP_FAULT_SAVE_PAUSE_S", "0"))
    if seconds:
        print("checkpoint save paused (fault injection)", flush=True)
        time.sleep(seconds)


class AllReduceCounter:
    """Counts the gradient buckets DDP all-reduces (proves no_sync on non-final accumulation micro-steps)."""

    def __init__(self) -> None:
        self.path = os.environ.get("LOOP_FAULT_COUNT_ALLREDUCE", "")
        self.calls = 0

    def attach(self, model: Any) -> None:
        """Register the counting hook on a DistributedDataParallel model (no-op when not asked or not DDP)."""
        if not self.path or not hasattr(model, "register_comm_hook"):
            return
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):  # DDP rejects annotations other than its own classes
            self.calls += 1
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_hook)

    def write(self, optimizer_steps: int) -> None:
        """Write the count on the main process."""
        if self.path and os.environ.get("RANK", "0") == "0":
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(f"{self.calls} {optimizer_steps}\n")
