"""The logging window: running totals since the last train log, kept on the device (no host sync per step), and
the train/* metrics made from them."""

from __future__ import annotations

import time
from typing import Any

import torch

from loop.data import LABEL_PAD
from loop.flops import train_flops

TOTALS = ("loss", "tokens", "real_tokens", "flops")


class LogWindow:
    """Loss, label tokens, real tokens, FLOPs and samples of the optimizer steps since the last log."""

    def __init__(self, saved: dict[str, float], device: Any, shape: dict[str, int] | None,
                 peak: float | None) -> None:
        self.totals = {key: torch.tensor(float(saved.get(key, 0.0)), device=device) for key in TOTALS}
        self.samples = int(saved.get("samples", 0))
        self.shape, self.peak = shape, peak
        self.start = time.perf_counter()

    def add(self, group: list[tuple[float, dict]], result: Any) -> None:
        """Count one optimizer step: its micro-batches and its loss, if its update was applied."""
        for _, batch in group:
            self.samples += batch["input_ids"].shape[0]
            src, tgt = batch["attention_mask"].sum(1), (batch["labels"] != LABEL_PAD).sum(1)
            self.totals["real_tokens"] += src.sum() + tgt.sum()
            if self.peak is not None:
                self.totals["flops"] += train_flops(self.shape, src.double(), tgt.double()).sum()
        self.totals["loss"] += torch.where(result.finite, result.loss_sum, 0.0)
        self.totals["tokens"] += torch.where(result.finite, result.tokens, 0)

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside training (eval, saves) out of the throughput."""
        self.start += seconds

    def metrics(self, accelerator: Any) -> dict[str, float]:
        """train/loss (mean over label tokens), samples/s, real tokens/s and MFU, over all processes."""
        def total(key: str) -> torch.Tensor:
            return accelerator.reduce(self.totals[key], "sum")

        loss = total("loss") / total("tokens").clamp(min=1)
        real_tokens = total("real_tokens").item()
        elapsed = time.perf_counter() - self.start  # after .item(): the window's queued work is done
        logs = {"train/loss": loss.item(), "train/samples_per_s": self.samples * accelerator.num_processes / elapsed,
                "train/tokens_per_s": real_tokens / elapsed}
        if self.peak is not None:  # useful-token model FLOPs utilisation (padding does not count)
            logs["train/mfu"] = total("flops").item() / elapsed / (self.peak * accelerator.num_processes)
        return logs

    def reset(self) -> None:
        """Start a new window."""
        for value in self.totals.values():
            value.zero_()
        self.samples, self.start = 0, time.perf_counter()

    def saved(self) -> dict[str, float]:
        """The partial window as plain numbers, for a checkpoint (a resumed run logs the same losses)."""
        return {**{key: value.item() for key, value in self.totals.items()}, "samples": self.samples}
