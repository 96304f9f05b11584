"""Evaluation: token-weighted loss, generation gathered across processes, Korean ROUGE."""

from __future__ import annotations

import copy
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType

from loop.config import Config
from loop.data import LABEL_PAD
from loop.rouge import compute_rouge


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


def token_losses(model: Any, batch: dict[str, torch.Tensor],
                 head: LabelLogits | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed cross-entropy over label tokens, and per-sample label token counts."""
    labels = batch["labels"]
    index = batch.get("label_index") if head is not None and head.handle is not None else None
    if head is not None:
        head.index = index
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"]).logits
    finally:
        if head is not None:
            head.index = None
    counts = (labels != LABEL_PAD).sum(dim=1)
    if index is not None and logits.shape[:2] == (index.numel(), 1):
        flat = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1).index_select(0, index),
                               reduction="none")
        # Back to [B, T] (index_copy: deterministic, unlike a scatter-add) for the per-sample sums.
        full = torch.zeros(labels.numel(), dtype=flat.dtype, device=flat.device).index_copy(0, index, flat)
        return full.view(labels.shape).sum(dim=1), counts
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1),
                           ignore_index=LABEL_PAD, reduction="none").view(labels.shape)
    return loss.sum(dim=1), counts


def generation_config(model: Any, cfg: Config) -> Any:
    """The model's generation config with the [generation] settings applied."""
    gen = copy.deepcopy(model.generation_config)
    g = cfg.generation
    gen.num_beams = g.num_beams
    gen.max_new_tokens = g.max_new_tokens
    gen.max_length = None
    gen.no_repeat_ngram_size = g.no_repeat_ngram_size
    gen.length_penalty = g.length_penalty
    gen.early_stopping = g.num_beams > 1
    return gen


def decode(tokenizer: Any, sequences: torch.Tensor | list[list[int]]) -> list[str]:
    """Token ids to text, dropping only pad/bos/eos so speaker tokens such as #Person1# survive."""
    drop = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, LABEL_PAD}
    rows = sequences.tolist() if isinstance(sequences, torch.Tensor) else sequences
    texts = tokenizer.batch_decode([[t for t in row if t not in drop] for row in rows],
                                   skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return [" ".join(t.split()) for t in texts]


@dataclass
class EvalResult:
    """Metrics of one evaluation and the predictions, in dev-file order."""

    metrics: dict[str, float]
    predictions: list[str]
    references: list[str]
    indices: list[int]
    per_sample_rouge_l: list[float]


@torch.no_grad()
def evaluate(accelerator: Any, model: Any, loader: Any, tokenizer: Any, examples: list[dict[str, str]],
             cfg: Config, head: LabelLogits | None = None) -> EvalResult:
    """Eval loss, then generation gathered with gather_for_metrics (no duplicates), then ROUGE."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    gen_cfg = generation_config(unwrapped, cfg)
    # Sharded parameters (FSDP, ZeRO-3): every process must keep stepping until all have finished generating.
    sharded = accelerator.num_processes > 1 and (accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and getattr(accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3))
    generated: list[list[int]] = []
    indices: list[int] = []
    loss_sum, tokens = 0.0, 0
    for batch in loader:
        # The loss forward runs first on purpose: under FSDP2, generate works only after a full forward.
        losses, counts = token_losses(model, batch, head)
        out = unwrapped.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 generation_config=gen_cfg, synced_gpus=sharded)
        out = accelerator.pad_across_processes(out, dim=1, pad_index=tokenizer.pad_token_id)
        # gather_for_metrics drops the rows that even out the last batch across processes, so loss and
        # predictions cover each dev example exactly once, as in a one-process run.
        out, idx, losses, counts = accelerator.gather_for_metrics((out, batch["idx"], losses, counts))
        generated.extend(out.cpu().tolist())
        indices.extend(idx.cpu().tolist())
        loss_sum += losses.sum().item()
        tokens += counts.sum().item()
    model.train()

    order = sorted(range(len(indices)), key=indices.__getitem__)
    indices = [indices[i] for i in order]
    generated = [generated[i] for i in order]
    predictions = decode(tokenizer, generated)
    references = [examples[i]["summary"] for i in indices]
    rouge = compute_rouge(predictions, references, tokenizer=cfg.evaluation.rouge_tokenizer)
    drop = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    gen_len = sum(sum(t not in drop for t in row) for row in generated) / max(len(generated), 1)
    metrics = {
        "loss": loss_sum / max(tokens, 1),
        "rouge_1": rouge.rouge_1,
        "rouge_2": rouge.rouge_2,
        "rouge_l": rouge.rouge_l,
        "gen_len": gen_len,
        "num_samples": float(len(indices)),
    }
    return EvalResult(metrics, predictions, references, indices, rouge.per_sample_rouge_l)


def write_predictions(path: Path, result: EvalResult, examples: list[dict[str, str]]) -> None:
    """The dev predictions of one eval as CSV (fname, prediction, reference, rouge_l), in dev-file order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fname", "prediction", "reference", "rouge_l"])
        for i, pred, ref, score in zip(result.indices, result.predictions, result.references,
                                       result.per_sample_rouge_l, strict=True):
            writer.writerow([examples[i]["id"], pred, ref, f"{score:.6f}"])
