"""Dialogue/summary files: validation with row-precise errors, cached tokenization through `datasets`, batching."""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets.config
import torch
from datasets import Dataset, is_caching_enabled
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader

from loop.config import DataConfig
from loop.errors import UserError

if TYPE_CHECKING:
    from loop.families import Formatter

LABEL_PAD = -100
# Part of tokenize_file's cache key: bump it when the output for the same rows and tokenizer changes outside
# `encode` itself (with_bos_eos and loop/families.py's Formatter methods, for two, are hashed by their names only).
_TOKENIZED_FORMAT = 1
# Python's csv stops at 131,072 characters a field by default; one long but valid dialogue is not "malformed".
_CSV_FIELD_LIMIT = 2**31 - 1
_JSON_SPACE = re.compile(r"[ \t\r\n]*")  # the only whitespace JSON allows between values


def _line_at(text: str | bytes, index: int) -> int:
    """The 1-based line of text[index]; lines end in \\n, \\r\\n or a lone \\r, as the csv module splits them."""
    head = text[:index]
    lf, cr, crlf = ("\n", "\r", "\r\n") if isinstance(head, str) else (b"\n", b"\r", b"\r\n")
    return head.count(lf) + head.count(cr) - head.count(crlf) + 1


def read_text(path: Path, expected: str) -> str:
    """A UTF-8 file as text (BOM dropped); missing, unreadable, UTF-16 or undecodable files are one-line errors."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found ({expected})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read file: {err.strerror or err} ({expected})") from None
    # The UTF-32 little-endian mark begins with the UTF-16 one; without this check the user reads "byte 0xff".
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_BE)):
        raise UserError(f"{path}: the file is UTF-16 or UTF-32 (it starts with the byte order mark "
                        f"{raw[:2].hex(' ')}); save it as UTF-8 ({expected})")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        hint = "save the file as UTF-8"
        if b"\x00" in raw[:4096]:  # UTF-16 without a byte order mark: every ASCII character comes with a NUL
            hint = "it looks like UTF-16; save the file as UTF-8"
        else:
            try:
                raw.decode("cp949")
                hint = "it reads as CP949/EUC-KR (Korean Windows); save the file as UTF-8"
            except UnicodeDecodeError:
                pass
        raise UserError(f"{path}: line {_line_at(raw, err.start)}: byte 0x{raw[err.start]:02x} is not valid UTF-8 "
                        f"({expected}; {hint})") from None


def _csv_header(path: Path, fields: list[str], line: int, wanted: list[str]) -> list[str]:
    """Column names (trimmed, stray BOMs dropped); a column we read that is named twice is ambiguous, an error."""
    names = [name.replace("\ufeff", "").strip() for name in fields]
    for column in wanted:
        where = [str(i + 1) for i, name in enumerate(names) if name == column]
        if len(where) > 1:
            raise UserError(f"{path}: line {line}: column `{column}` appears {len(where)} times in the header "
                            f"(columns {', '.join(where)}); rename or remove all but one")
    return names


def _csv_record(path: Path, where: str, header: list[str], fields: list[str]) -> dict[str, str | None]:
    """One data row as {column: value}; None for a column the row is too short to have."""
    extra = fields[len(header):]
    if any(value.strip() for value in extra):
        raise UserError(f"{path}: {where}: {len(fields)} fields but the header has {len(header)}; a field that "
                        "contains a comma must be quoted")
    if [value.strip() for value in fields[: len(header)]] == header:
        raise UserError(f"{path}: {where}: the header again (files joined together?); remove this row")
    return {name: fields[i] if i < len(fields) else None for i, name in enumerate(header)}


def _csv_records(path: Path, text: str, wanted: list[str]) -> list[tuple[str, dict[str, str | None]]]:
    """The data rows of a CSV text as (where, {column: value}), `where` naming the row and its first line."""
    # newline="" splits lines exactly where the csv module ends them (\n, \r\n, \r) and leaves quoted ones intact.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, records, start = None, [], 1  # start: the physical line where the next row begins
    saved_limit = csv.field_size_limit(_CSV_FIELD_LIMIT)  # a process-wide setting, restored below
    try:
        for fields in reader:
            line, start = start, reader.line_num + 1
            if not any(value.strip() for value in fields):
                continue  # blank lines, and the ",,," rows spreadsheets leave
            if header is None and fields[0].strip().lower().startswith("sep="):
                if fields == ["sep=", ""]:
                    continue  # Excel's `sep=,` line: it declares the separator this reader uses anyway
                raise UserError(f"{path}: line {line}: the file declares {','.join(fields)!r}; expected "
                                "comma-separated fields")
            if header is None:
                header = _csv_header(path, fields, line, wanted)
                continue
            where = f"row {len(records) + 1} (line {line})"
            records.append((where, _csv_record(path, where, header, fields)))
    except csv.Error as err:
        if "unexpected end of data" in str(err):
            raise UserError(f"{path}: line {start}: malformed CSV: a quoted field in the row that starts on this "
                            "line is never closed") from None
        raise UserError(f"{path}: line {reader.line_num}: malformed CSV ({err}; a `\"` inside a quoted field "
                        "is written `\"\"`)") from None
    finally:
        csv.field_size_limit(saved_limit)
    return records


class _DuplicateKey(ValueError):
    """A JSON object that names one key twice; json would keep only the last value, silently."""


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: a dict, or _DuplicateKey for a key named twice."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def _json_array_records(path: Path, text: str, start: int) -> list[tuple[str, dict[str, Any]]]:
    """The objects of a JSON array that opens at text[start], as (where, object)."""
    # Parsed item by item, so that every item's error and row name carry its own line.
    decoder = json.JSONDecoder(object_pairs_hook=_json_object)
    records = []
    pos = _JSON_SPACE.match(text, start + 1).end()
    while not text.startswith("]", pos):
        line = _line_at(text, pos)
        if pos == len(text):
            raise UserError(f"{path}: line {line}: invalid JSON (the array that starts on line "
                            f"{_line_at(text, start)} is never closed)")
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: line {_line_at(text, err.pos)}: invalid JSON ({err.msg})") from None
        except _DuplicateKey as err:
            raise UserError(f"{path}: line {line}: key {err} appears twice in one object") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {line}: expected a JSON object in the array, found {_json_type(obj)}")
        records.append((f"item {len(records) + 1} (line {line})", obj))
        pos = _JSON_SPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _JSON_SPACE.match(text, pos + 1).end()
        elif pos < len(text) and text[pos] != "]":
            raise UserError(f"{path}: line {_line_at(text, pos)}: invalid JSON (expected `,` or `]` after an item "
                            "of the array)")
    rest = _JSON_SPACE.match(text, pos + 1).end()
    if rest != len(text):
        raise UserError(f"{path}: line {_line_at(text, rest)}: invalid JSON (extra data after the array)")
    return records


def _jsonl_records(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    """The objects of a JSON lines text (or of a JSON array) as (where, object)."""
    first = _JSON_SPACE.match(text).end()
    if text.startswith("[", first):  # a JSON array of objects (what many exporters write), not JSON lines
        return _json_array_records(path, text, first)
    records = []
    # Not str.splitlines: it also splits at U+2028, U+0085 and others, which JSON strings may hold unescaped.
    for line_no, line in enumerate(io.StringIO(text, newline=""), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_json_object)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: line {line_no}: invalid JSON ({err.msg}); expected one JSON object per "
                            "line") from None
        except _DuplicateKey as err:
            raise UserError(f"{path}: line {line_no}: key {err} appears twice in one object") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {line_no}: expected a JSON object per line, found {_json_type(obj)}")
        records.append((f"line {line_no}", obj))
    return records


def _json_type(value: Any) -> str:
    """How a JSON value reads in an error: its kind, then the value itself, cut short."""
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)
    shown = json.dumps(value, ensure_ascii=False)
    return f"{kind} ({shown if len(shown) <= 40 else shown[:37] + '...'})"


def _field(path: Path, where: str, record: dict[str, Any], column: str, is_id: bool, needs: str) -> str:
    """One validated value, stripped: text, non-empty and encodable; a JSON id may be an integer."""
    value = record.get(column)
    if is_id and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # numeric ids are common in JSON; 7 and "7" then name the same row
    if value is not None and not isinstance(value, str):
        raise UserError(f"{path}: {where}: `{column}` must be {'a string or an integer' if is_id else 'a string'}, "
                        f"got {_json_type(value)}")
    value = (value or "").strip()
    if not value:
        raise UserError(f"{path}: {where}: empty `{column}`; every row needs {needs}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # only JSON can smuggle one in, as a \ud800-\udfff escape with no partner
        raise UserError(f"{path}: {where}: `{column}` contains an unpaired surrogate escape; it is not text") from None
    return value


def _show_columns(names: Any) -> str:
    """Column names for an error, sorted; empty or unprintable ones (a tab, a BOM) quoted."""
    return ", ".join(sorted(n if n and n.isprintable() else repr(n) for n in names))


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (relative or absolute, through links)."""
    return Path(a).resolve() == Path(b).resolve()


def _references(path: Path, where: str, record: dict[str, Any], columns: list[str]) -> list[str]:
    """One row's reference texts, stripped, in column order; an empty one stays "" (left out when scoring)."""
    texts = []
    for column in columns:
        value = record.get(column)
        if value is not None and not isinstance(value, str):
            raise UserError(f"{path}: {where}: `{column}` must be a string, got {_json_type(value)}")
        texts.append((value or "").strip())
    if not any(texts):
        raise UserError(f"{path}: {where}: every reference is empty ({', '.join(columns)}); each dev row needs at "
                        "least one (data.reference_columns)")
    return texts


def clean_dialogue(text: str, patterns: list[re.Pattern[str]]) -> str:
    """`text` with every match of `patterns` removed, line by line (a match never joins two turns).

    A match becomes a space, so the words on either side stay apart; a line that lost text then has its runs of
    whitespace collapsed to one space and its ends stripped, and is dropped if nothing is left of it. Lines without
    a match are kept exactly as they were.
    """
    lines = []
    for line in text.split("\n"):
        cleaned = line
        for pattern in patterns:
            # A zero-width match (a lookahead, \b) removes nothing, so it must not insert a space either.
            cleaned = pattern.sub(lambda m: " " if m.group() else "", cleaned)
        if cleaned != line:
            cleaned = " ".join(cleaned.split())
            if not cleaned:
                continue
        lines.append(cleaned)
    return "\n".join(lines).strip()


def read_examples(path: str | Path, cfg: DataConfig, limit: int = 0, require_summary: bool = True,
                  references: bool | None = None) -> list[dict[str, Any]]:
    """Read and validate a CSV/JSONL file into rows of {id, dialogue[, summary, references]}; errors name file, row.

    `references` (default: when this is data.dev_file and summaries are required) also reads data.reference_columns
    into `references`, a list of texts; the dev file's `summary` (the eval loss's target) is then data.summary_column
    when the file has it, else the row's first non-empty reference. Dialogues lose data.clean_patterns' matches.
    """
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".jsonl", ".json"):
        raise UserError(f"{path}: data files must be .csv or .jsonl (or a .json array of objects)")
    text = read_text(path, "expected a UTF-8 CSV or JSONL data file")
    if "\x00" in text:  # no text file holds NUL bytes; UTF-16 without a byte order mark is full of them
        raise UserError(f"{path}: line {_line_at(text, text.index(chr(0)))}: NUL byte; expected UTF-8 text "
                        "(is the file UTF-16 or binary?)")
    if references is None:  # the dev file is the one evaluation scores, so it is the one with references
        references = require_summary and _same_file(path, cfg.dev_file)
    is_csv = path.suffix.lower() == ".csv"
    columns = {"id": cfg.id_column, "dialogue": cfg.dialogue_column}
    if require_summary:
        columns["summary"] = cfg.summary_column
    ref_columns = list(cfg.reference_columns) if references else []
    wanted = list(dict.fromkeys([*columns.values(), *ref_columns]))
    records = _csv_records(path, text, wanted) if is_csv else _jsonl_records(path, text)
    if not records:
        raise UserError(f"{path}: no data rows; expected " + ("a header and at least one row" if is_csv
                                                             else "at least one JSON object"))
    present = records[0][1]
    if ref_columns and require_summary and cfg.summary_column not in present:
        del columns["summary"]  # a multi-reference dev file without the training column: the loss uses a reference
    missing = [c for c in dict.fromkeys([*columns.values(), *ref_columns]) if c not in present]
    if missing:
        hint = ""
        if is_csv and len(present) == 1 and any(sep in next(iter(present)) for sep in "\t;|"):
            hint = "; the header has no commas: save the file comma-separated"
        keys = "data.id_column / data.dialogue_column / data.summary_column"
        if any(c in ref_columns for c in missing):
            keys += " / data.reference_columns"
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; found {_show_columns(present)} "
                        f"(set {keys}){hint}")
    needs = "an id, a dialogue and a summary" if require_summary else "an id and a dialogue"
    patterns = [re.compile(p) for p in cfg.clean_patterns]  # validated when the config was loaded
    rows, seen = [], {}
    for where, record in records[: limit or None]:
        row: dict[str, Any] = {key: _field(path, where, record, column, key == "id", needs)
                               for key, column in columns.items()}
        if row["id"] in seen:
            raise UserError(f"{path}: {where}: duplicate {cfg.id_column} {row['id']!r} (first at {seen[row['id']]})")
        seen[row["id"]] = where
        if patterns:
            original, row["dialogue"] = row["dialogue"], clean_dialogue(row["dialogue"], patterns)
            if not row["dialogue"]:
                shown = original if len(original) <= 40 else original[:37] + "..."
                raise UserError(f"{path}: {where}: `{cfg.dialogue_column}` is empty once data.clean_patterns are "
                                f"removed (it was {shown!r}); drop the row or narrow the patterns")
        if ref_columns:
            row["references"] = _references(path, where, record, ref_columns)
            if require_summary and "summary" not in row:
                row["summary"] = next(t for t in row["references"] if t)
        rows.append(row)
    return rows


def with_bos_eos(ids: list[int], bos: int | None, eos: int | None, max_len: int) -> list[int]:
    """`<s> ids </s>` cut to max_len whatever the tokenizer adds by itself (KoBART's adds neither)."""
    ids = [i for i in ids if i not in (bos, eos)]
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    return head + ids[: max_len - len(head) - len(tail)] + tail


def _tokenized_cache_file(key: str) -> str | None:
    """Where tokenize_file keeps the result for `key`; None when `datasets` caching is off."""
    if not is_caching_enabled():
        return None
    # The environment first: datasets.config reads HF_DATASETS_CACHE once, when datasets is imported.
    root = os.environ.get("HF_DATASETS_CACHE") or datasets.config.HF_DATASETS_CACHE
    return str(Path(root) / "loop-tokenized" / f"{key}.arrow")


def tokenize_file(path: str | Path, cfg: DataConfig, tokenizer: Any, max_source: int, max_target: int,
                  limit: int = 0, rows: list[dict[str, str]] | None = None, fmt: Formatter | None = None) -> Any:
    """Tokenize validated rows (`rows`, else read_examples(path)): input_ids, attention_mask, labels, idx, source_len.

    `fmt` is the model family's formatting (loop/families.py); None is BART's. The result is cached on disk under
    HF_DATASETS_CACHE, keyed by the texts, the tokenizer, the formatting and the lengths.
    """
    path = Path(path)
    # One source of truth: the rows the validator accepted, never a second parse of the file by another reader.
    rows = read_examples(path, cfg, limit) if rows is None else rows[: limit or None]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        src = tokenizer(batch["dialogue"], add_special_tokens=False)["input_ids"]
        tgt = tokenizer(batch["summary"], add_special_tokens=False)["input_ids"]
        input_ids = [with_bos_eos(s, bos, eos, max_source) for s in src]
        return {
            "input_ids": input_ids,
            "attention_mask": [[1] * len(s) for s in input_ids],
            "labels": [with_bos_eos(t, bos, eos, max_target) for t in tgt],
            "idx": indices,
            "source_len": [len(s) for s in src],
        }

    # BART keeps the function above, and with it the cache keys of the data it already tokenized.
    if fmt is not None and not fmt.as_before:
        encode = fmt.encoder(tokenizer, max_source, max_target)
    texts = {"dialogue": [r["dialogue"] for r in rows], "summary": [r["summary"] for r in rows]}
    # An in-memory dataset has no file to fingerprint, so the cache key is built here: the texts, and `encode`
    # hashed as datasets hashes map functions (its code and closure: tokenizer, bos/eos, max lengths).
    digest = hashlib.sha256()
    for text in (*texts["dialogue"], *texts["summary"]):
        raw = text.encode("utf-8")
        digest.update(len(raw).to_bytes(8, "little") + raw)  # length first: no two lists hash alike
    key = Hasher.hash([_TOKENIZED_FORMAT, digest.hexdigest(), encode])
    return Dataset.from_dict(texts).map(encode, batched=True, with_indices=True, remove_columns=list(texts),
                                        new_fingerprint=key, cache_file_name=_tokenized_cache_file(key),
                                        desc=f"tokenizing {path.name}")


def truncation_report(ds: Any, max_source: int, name: str, specials: int = 2) -> str | None:
    """A warning line when dialogues were cut at max_source_length (`specials` tokens added to each), else None."""
    cut = sum(1 for n in ds["source_len"] if n + specials > max_source)
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
