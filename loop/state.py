"""The loop's own run state: everything a resumed run needs beyond the model, optimizer, scheduler and RNG states.

Saved as `trainer_state.json` in every checkpoint and read back by `--resume`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

TIME_PARTS = ("loop", "eval", "checkpoint", "tracking")
COMPILE_COUNTS = ("dynamo_compiles", "recompiles", "backward_compiles", "cudagraphs_recorded")
# Fields added after checkpoints were first written, with the value an older checkpoint is read with: of the
# state itself, and of its `time`.
ADDED_LATER: dict[str, Any] = {"evals_without_improvement": 0}
TIME_ADDED_LATER: dict[str, Any] = {"compile": 0.0, "compiles": {}}


@dataclass
class TimeSplit:
    """Wall seconds inside the loop over all launches of a run, and the parts spent outside training; plus the
    seconds and counts of compiling (torch.compile, CUDA-graph recording), which are part of training."""

    loop: float = 0.0
    eval: float = 0.0
    checkpoint: float = 0.0
    tracking: float = 0.0
    compile: float = 0.0
    compiles: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMPILE_COUNTS, 0))
    _clock: tuple[float, float] | None = field(default=None, repr=False, compare=False)
    _events: tuple[Any, float, dict[str, int]] | None = field(default=None, repr=False, compare=False)

    def follow_compiles(self, events: Any) -> None:
        """Add what `events` (a loop.compiled.CompileEvents, or None) counts from now on, at each `read_clock`."""
        if events is not None:
            self._events = (events, self.compile, dict(self.compiles))

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Add the block's wall time to `part` (eval, checkpoint or tracking)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, part, getattr(self, part) + time.perf_counter() - start)

    def start_clock(self) -> None:
        """The loop starts (or resumes) now."""
        self._clock = (time.perf_counter(), self.loop)

    def read_clock(self) -> None:
        """Bring `loop` up to now."""
        if self._clock is not None:
            started, before = self._clock
            self.loop = before + time.perf_counter() - started
        if self._events is not None:
            events, seconds, counts = self._events
            self.compile = seconds + events.seconds
            self.compiles = {k: counts.get(k, 0) + events.counts.get(k, 0) for k in COMPILE_COUNTS}

    def report(self) -> dict[str, dict[str, Any]]:
        """Seconds in the loop split into training, evaluation, checkpoints and tracking, and their shares; and
        `compile`: the seconds of training spent compiling, their share of training, and the compile counts."""
        seconds = {"loop": self.loop,
                   "training": max(self.loop - self.eval - self.checkpoint - self.tracking, 0.0),
                   "evaluation": self.eval, "checkpoints": self.checkpoint, "tracking": self.tracking}
        share = {k: v / seconds["loop"] for k, v in seconds.items() if k != "loop"} if seconds["loop"] > 0 else {}
        training = seconds["training"]
        compiled = {"seconds": self.compile, "share_of_training": self.compile / training if training > 0 else None,
                    **self.compiles}
        return {"seconds": seconds, "share": share, "compile": compiled}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (the `time` of trainer_state.json)."""
        return {**{part: getattr(self, part) for part in TIME_PARTS}, "compile": self.compile,
                "compiles": dict(self.compiles)}

    @classmethod
    def from_dict(cls, times: dict[str, Any]) -> TimeSplit:
        """Read back `to_dict`'s output (one written before compiles were counted reads with zeros); ValueError
        when a part is missing or not a number."""
        times = {**TIME_ADDED_LATER, **times}
        if any(not isinstance(times.get(part), float | int) for part in (*TIME_PARTS, "compile")):
            raise ValueError("`time` lacks a part")
        counts = times["compiles"]
        if not isinstance(counts, dict) or any(not isinstance(counts.get(k, 0), int) for k in COMPILE_COUNTS):
            raise ValueError("`time.compiles` is not a dict of counts")
        return cls(**{part: float(times[part]) for part in TIME_PARTS}, compile=float(times["compile"]),
                   compiles={k: counts.get(k, 0) for k in COMPILE_COUNTS})


def _empty_window() -> dict[str, float]:
    return {"loss": 0.0, "tokens": 0.0, "real_tokens": 0.0, "flops": 0.0, "samples": 0}


def _empty_history() -> dict[str, list[tuple[int, float]]]:
    return {"train_loss": [], "eval_loss": []}


@dataclass
class TrainState:
    """Where a run stands: step, best eval, history, non-finite counters, early stopping's patience, logging
    window, W&B run id, process count, time."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=_empty_history)
    nonfinite_total: int = 0
    nonfinite_run: int = 0  # consecutive, up to now
    evals_without_improvement: int = 0  # for early stopping
    window: dict[str, float] = field(default_factory=_empty_window)  # the partial logging window, host numbers
    wandb_run_id: str | None = None
    num_processes: int = 1  # a resume must have as many (the global batch and the data position depend on it)
    time: TimeSplit = field(default_factory=TimeSplit)

    def improves(self, value: float, greater_is_better: bool) -> bool:
        """Whether an eval `value` of the best-model metric beats the best so far."""
        if self.best_metric is None:
            return True
        return value > self.best_metric if greater_is_better else value < self.best_metric

    def note_eval(self, value: float, greater_is_better: bool, threshold: float) -> None:
        """Count an eval that does not beat the best so far by more than `threshold` (early stopping's patience);
        call it before the best is updated."""
        if self.best_metric is None:
            improved = True
        else:
            improved = (value - self.best_metric if greater_is_better else self.best_metric - value) > threshold
        self.evals_without_improvement = 0 if improved else self.evals_without_improvement + 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (what trainer_state.json holds)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "time"}
        out["time"] = self.time.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Read back `to_dict`'s output; ValueError names the first field that is missing or of the wrong type."""
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        kinds = {"step": int, "best_metric": (float, int, type(None)), "best_step": (int, type(None)),
                 "best_metrics": dict, "last_eval": dict, "history": dict, "nonfinite_total": int,
                 "nonfinite_run": int, "evals_without_improvement": int, "window": dict,
                 "wandb_run_id": (str, type(None)), "num_processes": int, "time": dict}
        data = {**ADDED_LATER, **data}
        for name, kind in kinds.items():
            if name not in data:
                raise ValueError(f"no `{name}`")
            if not isinstance(data[name], kind) or isinstance(data[name], bool):
                raise ValueError(f"`{name}` has the wrong type ({type(data[name]).__name__})")
        if data["step"] < 0 or data["num_processes"] < 1:
            raise ValueError("`step` or `num_processes` is out of range")
        values = {name: data[name] for name in kinds if name != "time"}
        return cls(**values, time=TimeSplit.from_dict(data["time"]))
