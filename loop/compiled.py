"""`torch.compile` of the training forward + loss, falling back to eager (with one warning) if compiling fails;
and the count of what was compiled (`CompileEvents`)."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from loop import faults
from loop.state import COMPILE_COUNTS


class CompileEvents:
    """Counts and wall seconds of torch's compile events from now on, through dynamo's compile callbacks.

    `dynamo_compiles`: frames traced and compiled (each graph break adds one); `recompiles`: those of a frame
    compiled before (compile id `F/N` with N > 0: a new shape or another guard failed); `backward_compiles`: the
    lazily compiled backward graphs; `cudagraphs_recorded`: CUDA graphs recorded (reduce-overhead, CUDA only).
    `seconds` is the wall time inside all of them. A torch without the callbacks reports zeros.
    """

    TRIGGERS: ClassVar[dict[str, str]] = {"DYNAMO": "dynamo_compiles", "LAZY_BACKWARD": "backward_compiles",
                                          "CUDAGRAPH_RECORDING": "cudagraphs_recorded"}

    def __init__(self) -> None:
        self.counts = dict.fromkeys(COMPILE_COUNTS, 0)
        self.seconds = 0.0
        self._started: float | None = None
        import torch._dynamo

        self._handler = getattr(torch._dynamo, "callback_handler", None)
        if self._handler is not None:
            self._handler.register_start_callback(self._start)
            self._handler.register_end_callback(self._end)

    def _start(self, args: Any = None) -> None:
        self._started = time.perf_counter()
        trigger = getattr(getattr(args, "callback_trigger", None), "name", "DYNAMO")
        if trigger in self.TRIGGERS:
            self.counts[self.TRIGGERS[trigger]] += 1
        if trigger == "DYNAMO" and (m := re.match(r"(\d+)/(\d+)", str(getattr(args, "compile_id", "")))):
            self.counts["recompiles"] += int(m.group(2)) > 0

    def _end(self, args: Any = None) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def close(self) -> None:
        """Stop counting."""
        if self._handler is not None:
            with contextlib.suppress(ValueError):  # torch._dynamo.reset() clears the callbacks
                self._handler.remove_start_callback(self._start)
                self._handler.remove_end_callback(self._end)
            self._handler = None


class CompiledLoss:
    """`fn(model, batch, head)` through torch.compile, falling back to eager (with one warning) if compiling fails.

    The compiled function never sees `batch["label_index"]` and runs with no `head`: the number of label tokens
    changes from batch to batch, so it would make a new shape (a recompile, a new CUDA graph) nearly every step.
    The LM head then runs at every position of the [B, T] labels, the full path (same loss as the label-position
    path, tested), whose shapes are the batch's padded shapes only: with data.*_buckets, few. Any static length
    that always holds the label tokens is B x T anyway. mode "reduce-overhead" adds CUDA graphs: each call starts a
    new graph step. `events` counts the compiles (None when not compiling).
    """

    # Recompilations allowed per code object before dynamo silently runs it eager: room for every shape bucket.
    RECOMPILE_LIMIT = 64

    def __init__(self, fn: Callable, mode: str, warn: Callable[[str], None]) -> None:
        self.eager, self.mode, self.warn = fn, mode, warn
        self.compiled, self.events = None, None
        if mode != "off":
            import torch._dynamo

            for name in ("recompile_limit", "cache_size_limit"):  # the newer name, then the older one
                if isinstance(getattr(torch._dynamo.config, name, None), int):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), self.RECOMPILE_LIMIT))
                    break
            self.compiled = torch.compile(fn, mode=None if mode == "default" else mode)
            self.events = CompileEvents()
        self.proven = self.compiled is None  # becomes True after the first compiled step has run forward+backward

    @property
    def active(self) -> bool:
        """Whether calls go through the compiled function."""
        return self.compiled is not None

    def __call__(self, model: Any, batch: dict[str, torch.Tensor], head: Any = None) -> Any:
        if self.compiled is None:
            return self.eager(model, batch, head)
        if self.mode == "reduce-overhead" and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()
        if not self.proven:
            faults.compile_attempt()
        return self.compiled(model, {k: v for k, v in batch.items() if k != "label_index"}, None)

    def fall_back(self, err: BaseException) -> None:
        """Use eager from now on, saying why in one line."""
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        self.warn(f"warning: torch.compile (mode {self.mode}) failed in the first step ({type(err).__name__}: "
                  f"{first}); training continues without it; set training.torch_compile = \"off\" to skip trying")
        self.compiled, self.proven = None, True


# The first transformers whose BART-family encoder and decoder skip layer drop's random draw at layerdrop 0.
LAYERDROP_GUARDED = "5.23"


def graph_break_note(model: Any, mode: str, version: str | None = None) -> str | None:
    """A note when this transformers (`version`, default the installed one) splits the compiled graph at every
    layer: before 5.23, BART-family models draw a random number for layer drop in each layer even at layerdrop 0,
    and branch on it (a data-dependent branch)."""
    if mode == "off" or not hasattr(getattr(model, "config", None), "encoder_layerdrop"):
        return None
    from packaging.version import Version

    if version is None:
        import transformers

        version = transformers.__version__
    if Version(version) >= Version(LAYERDROP_GUARDED):
        return None
    return (f"note: with transformers {version}, {model.config.model_type}'s layer-drop check splits "
            f"torch.compile's graph at every layer (more compiles, slower compiled steps); transformers >= "
            f"{LAYERDROP_GUARDED} compiles it whole: pip install -U 'transformers>={LAYERDROP_GUARDED}'")
