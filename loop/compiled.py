"""`torch.compile` of the training forward + loss, falling back to eager (with one warning) if compiling fails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from loop import faults


class CompiledLoss:
    """`fn(model, batch)` through torch.compile, falling back to eager (with one warning) if compiling fails.

    mode "reduce-overhead" adds CUDA graphs: each call starts a new graph step, and static shapes (the
    data.*_buckets settings) keep the number of graphs small.
    """

    # Recompilations allowed per code object before dynamo silently runs it eager: room for every shape bucket.
    RECOMPILE_LIMIT = 64

    def __init__(self, fn: Callable, mode: str, warn: Callable[[str], None]) -> None:
        self.eager, self.mode, self.warn = fn, mode, warn
        self.compiled = None
        if mode != "off":
            import torch._dynamo

            for name in ("recompile_limit", "cache_size_limit"):  # the newer name, then the older one
                if isinstance(getattr(torch._dynamo.config, name, None), int):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), self.RECOMPILE_LIMIT))
                    break
            self.compiled = torch.compile(fn, mode=None if mode == "default" else mode)
        self.proven = self.compiled is None  # becomes True after the first compiled step has run forward+backward

    @property
    def active(self) -> bool:
        """Whether calls go through the compiled function."""
        return self.compiled is not None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.eager(*args)
        if self.mode == "reduce-overhead" and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()
        if not self.proven:
            faults.compile_attempt()
        return self.compiled(*args)

    def fall_back(self, err: BaseException) -> None:
        """Use eager from now on, saying why in one line."""
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        self.warn(f"warning: torch.compile (mode {self.mode}) failed in the first step ({type(err).__name__}: "
                  f"{first}); training continues without it; set training.torch_compile = \"off\" to skip trying")
        self.compiled, self.proven = None, True
