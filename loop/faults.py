"""Fault injection that the tests use to interrupt, poison, slow down or fail a real run.

The injection points are read from environment variables; unset (the normal case) they do nothing.
- LOOP_FAULT_PREEMPT_AT_MICROSTEP=N: behave as if SIGTERM arrived while micro-batch N (1-based) was running.
- LOOP_FAULT_PREEMPT_RANK=R: only process R gets the injected preemption (tests that all processes agree).
- LOOP_FAULT_NAN_AT_STEPS=3,4,5: make the loss NaN in those optimizer steps (1-based).
- LOOP_FAULT_SAVE_PAUSE_S=S: sleep S seconds inside a checkpoint save, after writing and before the rename.
- LOOP_FAULT_SAVE_ERROR_AT=N: the save of checkpoint step_N fails there with an OSError (a full disk, say).
- LOOP_FAULT_COUNT_ALLREDUCE=PATH: count DDP gradient all-reduces and write the count to PATH at the end.
- LOOP_FAULT_COMPILE_ERROR=1: torch.compile fails in the first step.
"""

from __future__ import annotations

import os
import time
from typing import Any


class Faults:
    """The injections a training run takes part in, read once from the environment."""

    def __init__(self) -> None:
        self.preempt_at = int(os.environ.get("LOOP_FAULT_PREEMPT_AT_MICROSTEP", "0"))
        rank = os.environ.get("LOOP_FAULT_PREEMPT_RANK")
        if rank is not None and rank != os.environ.get("RANK", "0"):
            self.preempt_at = 0
        self.nan_steps = {int(s) for s in os.environ.get("LOOP_FAULT_NAN_AT_STEPS", "").split(",") if s.strip()}
        self.allreduce_path = os.environ.get("LOOP_FAULT_COUNT_ALLREDUCE", "")
        self.allreduce_calls = 0

    def micro_batch(self, loss_sum: Any, step: int, micro_step: int, stop: Any) -> Any:
        """The loss of one micro-batch of optimizer step `step`, poisoned if asked; fires the injected preemption."""
        if self.preempt_at and micro_step == self.preempt_at:
            stop.request("SIGTERM (injected)")
        return loss_sum * float("nan") if step in self.nan_steps else loss_sum

    def attach(self, model: Any) -> None:
        """Count the gradient buckets DDP all-reduces (proves no_sync on non-final accumulation micro-steps)."""
        if not self.allreduce_path or not hasattr(model, "register_comm_hook"):
            return
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):  # DDP rejects annotations other than its own classes
            self.allreduce_calls += 1
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_hook)

    def finish(self, optimizer_steps: int) -> None:
        """Write the all-reduce count on the main process."""
        if self.allreduce_path and os.environ.get("RANK", "0") == "0":
            with open(self.allreduce_path, "w", encoding="utf-8") as f:
                f.write(f"{self.allreduce_calls} {optimizer_steps}\n")


def pause_in_save(name: str = "") -> None:
    """Hold a save half-done so a test can SIGKILL it there (or fail it, for checkpoint `name`)."""
    if name and os.environ.get("LOOP_FAULT_SAVE_ERROR_AT") and name == f"step_{os.environ['LOOP_FAULT_SAVE_ERROR_AT']}":
        raise OSError(28, "No space left on device (injected)")
    seconds = float(os.environ.get("LOOP_FAULT_SAVE_PAUSE_S", "0"))
    if seconds:
        print("checkpoint save paused (fault injection)", flush=True)
        time.sleep(seconds)


def compile_attempt() -> None:
    """A compiler that fails on this machine, for the eager fallback's test."""
    if os.environ.get("LOOP_FAULT_COMPILE_ERROR"):
        raise RuntimeError("injected compile failure (LOOP_FAULT_COMPILE_ERROR)")
