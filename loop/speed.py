"""Speed helpers of the training step: host reads that do not stall the device, torch.compile with a fallback,
and FLOPs/MFU accounting."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch

# Dense (no sparsity) bf16/fp16 tensor-core peaks in FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
              "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}

FLOPS_FORMULA = (
    "per sample with S source and T target tokens: 6 x forward multiply-adds, where forward = "
    "encoder L*(S*(4d^2+2d*ffn) + 2*S^2*d) + decoder L*(T*(6d^2+2d*ffn) + 2d^2*S [cross-attn K,V] "
    "+ 2*T^2*d + 2*T*S*d) + LM head T*d*V; embeddings, norms, softmax ignored, attention counted unmasked"
)


def seq2seq_shape(config: Any) -> dict[str, int] | None:
    """d_model, ffn, layers and vocab of a BART-family (or T5-style) config; None when they cannot be read."""
    get = lambda *names: next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)  # noqa: E731
    shape = {"d": get("d_model", "hidden_size"), "ffn": get("encoder_ffn_dim", "d_ff"),
             "enc": get("encoder_layers", "num_layers"), "dec": get("decoder_layers", "num_decoder_layers"),
             "vocab": get("vocab_size")}
    return shape if all(shape.values()) else None


def train_flops(shape: dict[str, int], src: Any, tgt: Any) -> Any:
    """Training FLOPs of samples with `src` source and `tgt` target tokens (numbers or tensors; see FLOPS_FORMULA)."""
    d, f = shape["d"], shape["ffn"]
    enc = shape["enc"] * (src * (4 * d * d + 2 * d * f) + 2 * src * src * d)
    dec = shape["dec"] * (tgt * (6 * d * d + 2 * d * f) + src * 2 * d * d + 2 * tgt * tgt * d + 2 * tgt * src * d)
    return 6.0 * (enc + dec + tgt * d * shape["vocab"])


def peak_flops(device: torch.device, configured_tflops: float = 0.0) -> float | None:
    """The accelerator's peak FLOP/s for MFU: the configured value, else a known GPU's bf16 dense peak."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class HostCopy:
    """A device scalar (or small tensor) copied to pinned host memory without waiting for later device work.

    `value()` waits only for the work queued before the copy, so reading it one step later costs nothing,
    where `.item()` would wait for everything queued since. On the CPU it is a plain copy.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self.event = None
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor.clone()

    def value(self) -> torch.Tensor:
        """The host tensor, once its copy has landed."""
        if self.event is not None:
            self.event.synchronize()
        return self.host


def device_skip_optimizer(optimizer: Any) -> Any | None:
    """The torch optimizer under accelerate's wrapper when it can skip a non-finite update on the device.

    Fused Adam/AdamW read an optional `found_inf` tensor and leave parameters and state untouched when it is 1,
    which makes the skip-on-NaN decision free of host syncs.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    fused = all(group.get("fused") for group in inner.param_groups)
    return inner if isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and fused else None


@contextlib.contextmanager
def found_inf(optimizer: Any, finite: torch.Tensor):
    """Within the block, `optimizer.step()` skips the update (on the device) where `finite` is False."""
    optimizer.found_inf = (~finite).float()
    try:
        yield
    finally:
        del optimizer.found_inf


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
        if os.environ.get("LOOP_FAULT_COMPILE_ERROR") and not self.proven:  # tests: a compiler that fails
            raise RuntimeError("injected compile failure (LOOP_FAULT_COMPILE_ERROR)")
        return self.compiled(*args)

    def fall_back(self, err: BaseException) -> None:
        """Use eager from now on, saying why in one line."""
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        self.warn(f"warning: torch.compile (mode {self.mode}) failed in the first step ({type(err).__name__}: "
                  f"{first}); training continues without it; set training.torch_compile = \"off\" to skip trying")
        self.compiled, self.proven = None, True
