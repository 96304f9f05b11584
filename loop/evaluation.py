"""Evaluation: token-weighted loss, generation gathered across processes, Korean ROUGE."""

from __future__ import annotations

import copy
import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from loop import attention
from loop.config import Config
from loop.data import LABEL_PAD
from loop.families import dropped_when_decoding
from loop.loss import LabelLogits, token_losses
from loop.rouge import RougeResult, compute_rouge


def generation_config(model: Any, cfg: Config) -> Any:
    """The model's generation config with the [generation] settings applied."""
    gen = copy.deepcopy(model.generation_config)
    g = cfg.generation
    gen.num_beams = g.num_beams
    gen.max_new_tokens = g.max_new_tokens
    gen.max_length = None
    gen.no_repeat_ngram_size = g.no_repeat_ngram_size
    gen.length_penalty = g.length_penalty
    gen.repetition_penalty = g.repetition_penalty
    gen.min_new_tokens = g.min_new_tokens or None  # None: no minimum-length processor at all
    gen.early_stopping = g.num_beams > 1
    gen.cache_implementation = "static" if g.cache == "static" else None
    return gen


def decode(tokenizer: Any, sequences: torch.Tensor | list[list[int]]) -> list[str]:
    """Token ids to text, dropping only pad/bos/eos and language codes so speaker tokens such as #Person1# survive."""
    drop = {*dropped_when_decoding(tokenizer), LABEL_PAD}
    rows = sequences.tolist() if isinstance(sequences, torch.Tensor) else sequences
    texts = tokenizer.batch_decode([[t for t in row if t not in drop] for row in rows],
                                   skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return [" ".join(t.split()) for t in texts]


def dev_rouge(predictions: list[str], examples: list[dict[str, Any]],
              cfg: Config) -> tuple[RougeResult, list[list[str]]]:
    """ROUGE of each prediction against its example's references, as evaluation scores a dev set; and the sets."""
    # Rows read as the dev file carry data.reference_columns; any other rows score against their summary.
    reference_sets = [list(example.get("references") or [example["summary"]]) for example in examples]
    rouge = compute_rouge(predictions, reference_sets, tokenizer=cfg.evaluation.rouge_tokenizer,
                          aggregate=cfg.evaluation.rouge_aggregate)
    return rouge, reference_sets


@dataclass
class EvalResult:
    """Metrics of one evaluation and the predictions, in dev-file order."""

    metrics: dict[str, float]
    predictions: list[str]
    references: list[str]  # each row's first non-empty reference (what a one-reference display shows)
    indices: list[int]
    per_sample_rouge_l: list[float]  # combined over a row's references by evaluation.rouge_aggregate
    reference_sets: list[list[str]] = field(default_factory=list)  # every reference of each row, "" where empty


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
        with attention.decoding(cfg.training.attention_backend, accelerator.device.type):
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
    rouge, reference_sets = dev_rouge(predictions, [examples[i] for i in indices], cfg)
    drop = dropped_when_decoding(tokenizer)
    gen_len = sum(sum(t not in drop for t in row) for row in generated) / max(len(generated), 1)
    metrics = {
        "loss": loss_sum / max(tokens, 1),
        "rouge_1": rouge.rouge_1,
        "rouge_2": rouge.rouge_2,
        "rouge_l": rouge.rouge_l,
        "rouge_mean": rouge.rouge_mean,
        "gen_len": gen_len,
        "num_samples": float(len(indices)),
    }
    shown = [next(t for t in refs if t.strip()) for refs in reference_sets]
    return EvalResult(metrics, predictions, shown, indices, rouge.per_sample_rouge_l, reference_sets)


def write_predictions(path: Path, result: EvalResult, examples: list[dict[str, Any]]) -> None:
    """The dev predictions of one eval as CSV, in dev-file order: fname, prediction, reference, rouge_l.

    With several references the reference columns are reference1..N (what `loop.score` reads back on its own).
    """
    sets = result.reference_sets or [[ref] for ref in result.references]
    width = max((len(refs) for refs in sets), default=1)
    header = ["reference"] if width == 1 else [f"reference{k}" for k in range(1, width + 1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fname", "prediction", *header, "rouge_l"])
        for i, pred, refs, score in zip(result.indices, result.predictions, sets, result.per_sample_rouge_l,
                                        strict=True):
            writer.writerow([examples[i]["id"], pred, *refs, *[""] * (width - len(refs)), f"{score:.6f}"])
