"""The token-level loss that training and evaluation share, with the LM head run only at real label tokens."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from loop.data import LABEL_PAD


class LabelLogits:
    """Run the LM head only at label positions, not at padding: the same loss with less work.

    A forward pre-hook on the model's output embedding replaces the decoder states [B, T, d] by the states at
    `batch["label_index"]` (flat positions of the real label tokens, made by the collator on the CPU, so no host
    sync), as [N, 1, d]; the model then returns logits [N, 1, V]. The hook is idle unless `index` is set, so
    generation is unaffected. A model whose logits do not come through that module keeps the full path.
    """

    def __init__(self, model: Any) -> None:
        head = model.get_output_embeddings()
        self.index: torch.Tensor | None = None
        self.handle = head.register_forward_pre_hook(self._select) if head is not None else None

    def _select(self, module: Any, args: tuple) -> tuple | None:
        if self.index is None:
            return None
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.index).unsqueeze(1), *args[1:])


def token_losses(model: Any, batch: dict[str, torch.Tensor], head: LabelLogits | None = None,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed cross-entropy over label tokens (smoothed over the vocabulary when `label_smoothing` >
    0; padding never counts), and per-sample label token counts."""
    labels = batch["labels"]
    index = batch.get("label_index") if head is not None and head.handle is not None else None
    if head is not None:
        head.index = index
    try:
        # No key/value cache: the loss never reads one, and gradient checkpointing would switch it off per layer.
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"], use_cache=False).logits
    finally:
        if head is not None:
            head.index = None
    counts = (labels != LABEL_PAD).sum(dim=1)
    if index is not None and logits.shape[:2] == (index.numel(), 1):
        flat = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1).index_select(0, index),
                               reduction="none", label_smoothing=label_smoothing)
        # Back to [B, T] (index_copy: deterministic, unlike a scatter-add) for the per-sample sums.
        full = torch.zeros(labels.numel(), dtype=flat.dtype, device=flat.device).index_copy(0, index, flat)
        return full.view(labels.shape).sum(dim=1), counts
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1), ignore_index=LABEL_PAD,
                           reduction="none", label_smoothing=label_smoothing).view(labels.shape)
    return loss.sum(dim=1), counts
