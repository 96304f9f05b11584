"""Which kernels `scaled_dot_product_attention` may use (`training.attention_backend`), chosen once per run.

Since torch 2.10, on Hopper/Blackwell GPUs with cuDNN > 9.15, SDPA prefers the cuDNN kernel, which builds an
execution plan for every new (batch, query length, key length): 23 ms to about 1 s each. With dynamic padding
nearly every step is a new shape, so `auto` turns cuDNN off on CUDA unless both data.source_buckets and
data.target_buckets are set (then training sees few shapes and each plan is built once). On the CPU `auto`
changes nothing. A named backend enables that one kernel only, for the whole process (training and eval).
While generating (eval and predict), `auto` also keeps cuDNN off on CUDA: every decoding step attends over a new
key length, so each step would be a new plan.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from loop.errors import UserError

BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
KERNELS = ("flash", "efficient", "cudnn", "math")
# torch.backends.cuda switches per kernel (they steer the CPU's choice between flash and math too).
_SWITCHES = {"flash": "enable_flash_sdp", "efficient": "enable_mem_efficient_sdp", "cudnn": "enable_cudnn_sdp",
             "math": "enable_math_sdp"}
_ON_CPU = ("flash", "math")  # the SDPA kernels torch has for the CPU


@dataclass(frozen=True)
class Decision:
    """The SDPA kernel switches to set (kernel -> enabled; empty = leave torch's defaults) and why, in one line."""

    flags: dict[str, bool] = field(default_factory=dict)
    note: str | None = None


def choose(backend: str, device_type: str, static_shapes: bool) -> Decision:
    """The kernel switches for `training.attention_backend = backend` on `device_type` ("cuda", "cpu", ...);
    `static_shapes`: training batches are padded to buckets in both lengths."""
    key = f"training.attention_backend = {backend!r}"
    if backend not in BACKENDS:
        raise UserError(f"{key}: must be one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device_type != "cuda" or static_shapes:
            return Decision()
        return Decision({"cudnn": False}, f"note: attention: cuDNN SDPA off ({key}: training shapes vary without "
                        "both data.source_buckets and data.target_buckets, and cuDNN builds a plan per new shape); "
                        "flash, efficient and math as torch chooses")
    if device_type != "cuda" and backend not in _ON_CPU:
        raise UserError(f"{key} needs a CUDA GPU (this run is on {device_type}); use auto, flash or math")
    return Decision({k: k == backend for k in KERNELS}, f"note: attention: SDPA {backend} kernel only ({key})")


def apply(decision: Decision) -> None:
    """Set the decision's kernel switches for the whole process (a switch this torch lacks is skipped)."""
    import torch

    for kernel, enabled in decision.flags.items():
        switch = getattr(torch.backends.cuda, _SWITCHES[kernel], None)
        if switch is not None:
            switch(enabled)


def decoding_decision(backend: str, device_type: str) -> Decision:
    """The kernel switches while generating: under `auto` on CUDA, cuDNN off; otherwise the run's own choice."""
    if backend == "auto" and device_type == "cuda":
        return Decision({"cudnn": False})
    return Decision()


@contextmanager
def decoding(backend: str, device_type: str) -> Iterator[None]:
    """Generate inside this: `decoding_decision`'s switches, restored to what they were on the way out."""
    decision = decoding_decision(backend, device_type)
    saved = enabled_now()
    apply(decision)
    try:
        yield
    finally:
        apply(Decision({k: saved[k] for k in decision.flags if k in saved}))


def enabled_now() -> dict[str, bool]:
    """The current kernel switches (what `apply` would restore them to)."""
    import torch

    getters = {"flash": "flash_sdp_enabled", "efficient": "mem_efficient_sdp_enabled",
               "cudnn": "cudnn_sdp_enabled", "math": "math_sdp_enabled"}
    return {k: bool(getattr(torch.backends.cuda, g)()) for k, g in getters.items()
            if hasattr(torch.backends.cuda, g)}


def model_note(model: Any, backend: str) -> str | None:
    """A warning when the model's attention does not go through SDPA, so that the setting has no effect."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    if backend == "auto" or impl == "sdpa":
        return None
    return (f"warning: training.attention_backend = {backend!r} has no effect: the model runs {impl!r} attention, "
            "not SDPA")


def setup(backend: str, device_type: str, static_shapes: bool, model: Any) -> list[str]:
    """Choose and apply the run's SDPA kernels; the lines to print (none when nothing changes)."""
    decision = choose(backend, device_type, static_shapes)
    apply(decision)
    return [line for line in (decision.note, model_note(model, backend)) if line]
