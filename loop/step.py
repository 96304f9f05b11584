"""One optimizer step, with no host sync inside it.

- The loss is the sum of token cross-entropies over the accumulated micro-batches, divided by the label tokens
  of the whole accumulated batch on all processes, so batch 16 x 1 and batch 8 x accumulation 2 (or 2 processes
  x batch 8) give the same update.
- Gradients are all-reduced only on the last micro-batch (`no_sync` on the others).
- A non-finite update is skipped on the device by fused AdamW (`found_inf`); fp16's GradScaler, FSDP's DTensors
  and DeepSpeed keep the host-side decision.
- The host bookkeeping of a step (advance the LR schedule after a finite update, count non-finite steps) is done
  late: inside the next step, or when the loop needs the outcome now (`settle`).
- With several processes the stop votes ride in the step's token all-reduce and are read at the step's end.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import DistributedType

from loop.data import LABEL_PAD


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
def found_inf(optimizer: Any, finite: torch.Tensor) -> Iterator[None]:
    """Within the block, `optimizer.step()` skips the update (on the device) where `finite` is False."""
    optimizer.found_inf = (~finite).float()
    try:
        yield
    finally:
        del optimizer.found_inf


@dataclass
class Settled:
    """The host's view of a finished optimizer step."""

    step: int
    grad_norm: float
    nonfinite: bool  # the loss itself was NaN/inf (divergence), not just an fp16 overflow the scaler handles


@dataclass
class StepResult:
    """What one optimizer step leaves on the device, plus the previous step settled inside it."""

    loss_sum: torch.Tensor  # summed token loss of this process's micro-batches
    tokens: torch.Tensor  # label tokens of this process's micro-batches
    finite: torch.Tensor  # False when the update was skipped
    previous: Settled | None


@dataclass
class _Pending:
    step: int
    norm: HostCopy
    loss_sum: torch.Tensor
    skipped: bool


class Stepper:
    """Runs optimizer steps over groups of micro-batches; `settle` does a step's host bookkeeping."""

    def __init__(self, accelerator: Any, model: Any, optimizer: Any, scheduler: Any, loss_fn: Any, head: Any,
                 max_grad_norm: float, faults: Any) -> None:
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.loss_fn, self.head, self.faults = loss_fn, head, faults
        self.max_grad_norm = max_grad_norm or float("inf")
        host_decides = accelerator.scaler is not None or accelerator.distributed_type in (
            DistributedType.FSDP, DistributedType.DEEPSPEED)
        self.skip_on_device = None if host_decides else device_skip_optimizer(optimizer)
        self.pending: _Pending | None = None
        self.votes: HostCopy | None = None
        self.stop_flag = torch.zeros((), dtype=torch.long, device=accelerator.device)

    def step(self, group: list[tuple[float, dict]], step: int, stop: Any) -> StepResult:
        """Forward/backward over the micro-batches of optimizer step `step + 1`, clip, and update."""
        acc = self.accelerator
        local_tokens = sum((b["labels"] != LABEL_PAD).sum() for _, b in group)
        if acc.num_processes > 1:  # one all-reduce carries the token count and the stop votes
            vote = self.stop_flag.fill_(int(stop.requested))  # fill_: a kernel, where torch.tensor(x, device) syncs
            counts = acc.reduce(torch.stack([local_tokens, vote]), reduction="sum")
            global_tokens, self.votes = counts[0].clamp(min=1), HostCopy(counts[1])
        else:
            global_tokens = local_tokens.clamp(min=1)
        try:
            loss_sum = self._forward_backward(group, global_tokens, step, stop)
        except Exception as err:  # a compiler that fails on this model/machine: say so once, continue eager
            if self.loss_fn.proven:
                raise
            self.loss_fn.fall_back(err)
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum = self._forward_backward(group, global_tokens, step, stop)
        self.loss_fn.proven = True
        norm = acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        # A (D)Tensor on DDP/FSDP, a float or None under DeepSpeed; all ranks see the same value.
        norm = torch.as_tensor(0.0 if norm is None else norm, device=acc.device, dtype=torch.float32)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a replicated DTensor
        finite = torch.isfinite(norm)
        previous = self.settle()  # the previous step's schedule update, before this step's optimizer step
        if self.skip_on_device is not None:
            with found_inf(self.skip_on_device, finite):
                self.optimizer.step()
        elif math.isfinite(float(norm)) or acc.scaler is not None:  # host sync
            self.optimizer.step()  # under fp16 the GradScaler skips a non-finite update itself and lowers its scale
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = _Pending(step + 1, HostCopy(norm), loss_sum, acc.optimizer_step_was_skipped)
        return StepResult(loss_sum, local_tokens, finite, previous)

    def _forward_backward(self, group: list[tuple[float, dict]], global_tokens: torch.Tensor, step: int,
                          stop: Any) -> torch.Tensor:
        acc, accum = self.accelerator, len(group)
        loss_sum_all = torch.zeros((), device=acc.device)
        for i, (_, batch) in enumerate(group):
            with contextlib.nullcontext() if i == accum - 1 else acc.no_sync(self.model):
                loss_sum = self.loss_fn(self.model, batch, None if self.loss_fn.active else self.head)[0].sum()
                loss_sum = self.faults.micro_batch(loss_sum, step + 1, step * accum + i + 1, stop)
                # DDP averages gradients over processes: scale up so the result is the global token mean.
                acc.backward(loss_sum * acc.num_processes / global_tokens)
            loss_sum_all += loss_sum.detach()
        return loss_sum_all

    def settle(self) -> Settled | None:
        """The host bookkeeping of the last step, if not done yet: advance the LR schedule after a finite update."""
        if self.pending is None:
            return None
        done, self.pending = self.pending, None
        grad_norm = float(done.norm.value())
        finite = math.isfinite(grad_norm)
        if finite and not done.skipped:
            self.scheduler.step()
        # fp16 overflow with a finite loss is the scaler's business; a non-finite loss is divergence.
        nonfinite = not finite and not bool(torch.isfinite(self.accelerator.reduce(done.loss_sum, "sum")))
        return Settled(done.step, grad_norm, nonfinite)

    def stop_agreed(self, stop: Any) -> bool:
        """Whether any process asked to stop (with several processes: as of this step's all-reduce)."""
        return stop.requested if self.votes is None else bool(self.votes.value() > 0)
