"""The optimizer and the learning-rate schedule; steps are optimizer steps."""

from __future__ import annotations

import math
from typing import Any

import torch

from loop.config import Config


def build_optimizer(model: Any, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and LayerNorm weights; the fused kernel (CPU and CUDA)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    t = cfg.training
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                             eps=t.adam_epsilon, fused=True)


def build_scheduler(optimizer: Any, cfg: Config, total_steps: int) -> Any:
    """Linear warmup for training.warmup_ratio of the steps, then linear, cosine or constant.

    Not to be prepared by accelerate: a prepared scheduler would step once per process per optimizer step.
    """
    from transformers import get_scheduler

    t = cfg.training
    return get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup", optimizer,
                         num_warmup_steps=math.ceil(t.warmup_ratio * total_steps), num_training_steps=total_steps)
