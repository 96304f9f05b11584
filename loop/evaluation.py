"""Evaluation: token-weighted loss, generation gathered across processes, Korean ROUGE."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from loop.config import Config
from loop.data import LABEL_PAD
from loop.rouge import compute_rouge


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over label tokens and the number of label tokens in the batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=batch["decoder_input_ids"]).logits
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1),
                           ignore_index=LABEL_PAD, reduction="sum")
    return loss, (labels != LABEL_PAD).sum()


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
             cfg: Config) -> EvalResult:
    """Eval loss, then generation gathered with gather_for_metrics (no duplicates), then ROUGE."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    gen_cfg = generation_config(unwrapped, cfg)
    loss_sum = torch.zeros((), device=accelerator.device)
    tokens = torch.zeros((), device=accelerator.device, dtype=torch.long)
    generated: list[list[int]] = []
    indices: list[int] = []
    for batch in loader:
        # Padding rows that even out the last batch across processes are dropped by gather_for_metrics,
        # but their loss would count: weight the loss by gathered rows only.
        loss, n = token_loss_sum(model, batch)
        loss_sum += loss.detach()
        tokens += n
        out = unwrapped.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 generation_config=gen_cfg)
        out = accelerator.pad_across_processes(out, dim=1, pad_index=tokenizer.pad_token_id)
        out, idx = accelerator.gather_for_metrics((out, batch["idx"]))
        generated.extend(out.cpu().tolist())
        indices.extend(idx.cpu().tolist())
    loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    tokens = accelerator.reduce(tokens, reduction="sum")
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
        "loss": (loss_sum / tokens.clamp(min=1)).item(),
        "rouge_1": rouge.rouge_1,
        "rouge_2": rouge.rouge_2,
        "rouge_l": rouge.rouge_l,
        "gen_len": gen_len,
        "num_samples": float(len(indices)),
    }
    return EvalResult(metrics, predictions, references, indices, rouge.per_sample_rouge_l)
