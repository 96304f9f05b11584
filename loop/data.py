"""Dialogue/summary files: validation with row-precise errors, cached tokenization through `datasets`, batching."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Features, Value, load_dataset
from torch.utils.data import DataLoader

from loop.config import DataConfig
from loop.errors import UserError

LABEL_PAD = -100


def read_text(path: Path, expected: str) -> str:
    """A UTF-8 file as text (BOM dropped); missing, unreadable or undecodable files are one-line errors."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found ({expected})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read file: {err.strerror or err} ({expected})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: byte 0x{raw[err.start]:02x} is not valid UTF-8 ({expected}; "
                        "save the file as UTF-8)") from None


def _csv_records(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines(keepends=True), strict=True)
    try:
        return [(f"row {i} (line {reader.line_num})", row) for i, row in enumerate(reader, start=1)]
    except csv.Error as err:
        raise UserError(f"{path}: line {reader.line_num}: malformed CSV ({err})") from None


def _jsonl_records(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: line {line_no}: invalid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {line_no}: expected a JSON object per line")
        records.append((f"line {line_no}", obj))
    return records


def read_examples(path: str | Path, cfg: DataConfig, limit: int = 0,
                  require_summary: bool = True) -> list[dict[str, str]]:
    """Read and validate a CSV/JSONL file into rows of {id, dialogue[, summary]}; errors name file and row."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".jsonl", ".json"):
        raise UserError(f"{path}: data files must be .csv or .jsonl")
    text = read_text(path, "expected a UTF-8 CSV or JSONL data file")
    is_csv = path.suffix.lower() == ".csv"
    records = _csv_records(path, text) if is_csv else _jsonl_records(path, text)
    if not records:
        raise UserError(f"{path}: no data rows; expected a header and at least one row")
    columns = {"id": cfg.id_column, "dialogue": cfg.dialogue_column}
    if require_summary:
        columns["summary"] = cfg.summary_column
    present = set(records[0][1])
    missing = [c for c in columns.values() if c not in present]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(sorted(present))} "
                        "(set data.id_column / data.dialogue_column / data.summary_column)")
    rows, seen = [], {}
    for where, record in records[: limit or None]:
        row = {}
        for key, column in columns.items():
            value = record.get(column)
            if value is None or not str(value).strip():
                raise UserError(f"{path}: {where}: empty `{column}`; every row needs "
                                + ("an id, a dialogue and a summary" if require_summary else "an id and a dialogue"))
            row[key] = str(value).strip()
        if row["id"] in seen:
            raise UserError(f"{path}: {where}: duplicate {cfg.id_column} {row['id']!r} (first at {seen[row['id']]})")
        seen[row["id"]] = where
        rows.append(row)
    return rows


def with_bos_eos(ids: list[int], bos: int | None, eos: int | None, max_len: int) -> list[int]:
    """`<s> ids </s>` cut to max_len whatever the tokenizer adds by itself (KoBART's adds neither)."""
    ids = [i for i in ids if i not in (bos, eos)]
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    return head + ids[: max_len - len(head) - len(tail)] + tail


def tokenize_file(path: str | Path, cfg: DataConfig, tokenizer: Any, max_source: int, max_target: int,
                  limit: int = 0) -> Any:
    """Tokenize a validated file through `datasets` (cached on disk): input_ids, attention_mask, labels, idx."""
    path = Path(path)
    columns = [cfg.id_column, cfg.dialogue_column, cfg.summary_column]
    features = Features({c: Value("string") for c in columns})
    if path.suffix.lower() == ".csv":
        ds = load_dataset("csv", data_files=str(path), split="train", encoding="utf-8-sig", na_filter=False,
                          usecols=columns, features=features)
    else:
        ds = load_dataset("json", data_files=str(path), split="train", features=features)
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        src = tokenizer([s.strip() for s in batch[cfg.dialogue_column]], add_special_tokens=False)["input_ids"]
        tgt = tokenizer([s.strip() for s in batch[cfg.summary_column]], add_special_tokens=False)["input_ids"]
        input_ids = [with_bos_eos(s, bos, eos, max_source) for s in src]
        return {
            "input_ids": input_ids,
            "attention_mask": [[1] * len(s) for s in input_ids],
            "labels": [with_bos_eos(t, bos, eos, max_target) for t in tgt],
            "idx": indices,
            "source_len": [len(s) for s in src],
        }

    return ds.map(encode, batched=True, with_indices=True, remove_columns=columns,
                  desc=f"tokenizing {path.name}")


def truncation_report(ds: Any, max_source: int, name: str) -> str | None:
    """A warning line when dialogues were cut at max_source_length, else None."""
    cut = sum(1 for n in ds["source_len"] if n + 2 > max_source)
    if not cut:
        return None
    return (f"{name}: {cut} of {len(ds)} dialogues are longer than model.max_source_length={max_source} "
            "tokens and were truncated")


def bucket_length(length: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `length`; the length itself when none does (or no buckets)."""
    return next((b for b in buckets if b >= length), length)


def make_collator(tokenizer: Any, model: Any, source_buckets: list[int] | None = None,
                  target_buckets: list[int] | None = None) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Dynamic padding; labels padded with -100; decoder inputs made from labels by the model.

    With buckets, source and target lengths are padded further up to the smallest bucket that fits, so a
    compiled step sees few shapes. Also `label_index`: the flat positions of the real label tokens, for the LM
    head to skip padding.
    """
    from transformers import DataCollatorForSeq2Seq

    pad = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=LABEL_PAD, return_tensors="pt")
    right = getattr(tokenizer, "padding_side", "right") == "right"

    def grow(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
        extra = length - t.shape[1]
        return torch.nn.functional.pad(t, (0, extra) if right else (extra, 0), value=value) if extra > 0 else t

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        idx = torch.tensor([f["idx"] for f in features])
        if target_buckets:  # labels first: the collator builds decoder_input_ids from them
            length = bucket_length(max(len(f["labels"]) for f in features), target_buckets)
            features = [{**f, "labels": f["labels"] + [LABEL_PAD] * (length - len(f["labels"]))} for f in features]
        batch = pad([{k: f[k] for k in ("input_ids", "attention_mask", "labels")} for f in features])
        if source_buckets:
            length = bucket_length(batch["input_ids"].shape[1], source_buckets)
            batch["input_ids"] = grow(batch["input_ids"], length, tokenizer.pad_token_id)
            batch["attention_mask"] = grow(batch["attention_mask"], length, 0)
        batch["idx"] = idx
        batch["label_index"] = (batch["labels"].view(-1) != LABEL_PAD).nonzero().squeeze(1)
        return batch

    return collate


class LengthGroupedSampler(torch.utils.data.Sampler):
    """A seeded shuffle in which each run of `group_size` indices (one optimizer step's samples) has similar lengths.

    Per epoch: permute all rows with (seed, epoch), cut the permutation into windows of 50 steps, sort each window
    by source length, re-sort each run of 4 steps' worth by target length (so both padded lengths stay short),
    cut it into steps, and shuffle the steps. The order is a pure function of (seed, epoch), so a resumed run sees
    the same batches; grouping whole optimizer steps keeps N processes x batch B identical to one process x batch
    N*B, and accumulation identical to a larger batch.
    """

    WINDOW_STEPS = 50
    TARGET_SORT_STEPS = 4

    def __init__(self, lengths: list[int], group_size: int, seed: int,
                 target_lengths: list[int] | None = None) -> None:
        self.lengths, self.group_size, self.seed, self.epoch = lengths, group_size, seed, 0
        self.target_lengths = target_lengths

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order __iter__ yields (accelerate calls this)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        window, run = self.group_size * self.WINDOW_STEPS, self.group_size * self.TARGET_SORT_STEPS
        steps = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: -self.lengths[i])
            if self.target_lengths is not None:
                chunk = [i for k in range(0, len(chunk), run)
                         for i in sorted(chunk[k:k + run], key=lambda i: -self.target_lengths[i])]
            steps += [chunk[i:i + self.group_size] for i in range(0, len(chunk), self.group_size)]
        for k in torch.randperm(len(steps), generator=g).tolist():
            yield from steps[k]


def train_loader(ds: Any, batch_size: int, collate: Callable, seed: int, num_workers: int,
                 group_size: int = 0) -> DataLoader:
    """Shuffled training batches, the order a function of the seed and the epoch; `group_size` > 0 groups by length.

    `group_size` is the number of samples in one optimizer step (batch x accumulation x processes).
    """
    lengths = ds["source_len"]
    target_lengths = [len(labels) for labels in ds["labels"]] if group_size else None
    ds = ds.remove_columns(["source_len"]).with_format(None)
    # The loader's own generator also seeds each new iterator; without it that draw would come from the global
    # RNG, and a resumed run (which makes one more iterator) would get different dropout masks.
    common = {"batch_size": batch_size, "collate_fn": collate, "num_workers": num_workers,
              "generator": torch.Generator().manual_seed(seed), "pin_memory": torch.cuda.is_available()}
    if group_size:
        return DataLoader(ds, sampler=LengthGroupedSampler(lengths, group_size, seed, target_lengths), **common)
    return DataLoader(ds, shuffle=True, **common)


def eval_loader(ds: Any, batch_size: int, collate: Callable, num_workers: int) -> DataLoader:
    """Evaluation batches sorted by source length (less padding in generate); `idx` restores the order."""
    lengths = ds["source_len"]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    ds = ds.select(order).remove_columns(["source_len"])
    return DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available())
