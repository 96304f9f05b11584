"""Data: validation errors that name file and row, BOM/CRLF/JSONL input, tokenization and padding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loop.config import DataConfig
from loop.data import LABEL_PAD, eval_loader, make_collator, read_examples, tokenize_file, train_loader
from loop.errors import UserError

HEADER = "fname,dialogue,summary\n"
ROW1 = 'a1,"#Person1#: 안녕하세요.\n#Person2#: 네, 안녕하세요.",#Person1#과 #Person2#가 인사했다.\n'
ROW2 = 'a2,"#Person1#: 내일 3시에 봐요.\n#Person2#: 좋아요.",#Person1#과 #Person2#는 내일 3시에 만난다.\n'


def write(tmp_path: Path, text: str | bytes, name: str = "train.csv") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def test_reads_csv_with_multiline_dialogues(tmp_path):
    rows = read_examples(write(tmp_path, HEADER + ROW1 + ROW2), DataConfig())
    assert [r["id"] for r in rows] == ["a1", "a2"]
    assert rows[0]["dialogue"] == "#Person1#: 안녕하세요.\n#Person2#: 네, 안녕하세요."


def test_bom_and_crlf_files_work(tmp_path):
    text = (HEADER + ROW1 + ROW2).replace("\n", "\r\n")
    rows = read_examples(write(tmp_path, b"\xef\xbb\xbf" + text.encode("utf-8")), DataConfig())
    assert [r["id"] for r in rows] == ["a1", "a2"]
    assert rows[1]["summary"] == "#Person1#과 #Person2#는 내일 3시에 만난다."


def test_jsonl_and_custom_columns(tmp_path):
    lines = [json.dumps({"id": "x", "text": "#Person1#: 안녕", "target": "인사"}, ensure_ascii=False), ""]
    cfg = DataConfig(id_column="id", dialogue_column="text", summary_column="target")
    rows = read_examples(write(tmp_path, "\n".join(lines), "train.jsonl"), cfg)
    assert rows == [{"id": "x", "dialogue": "#Person1#: 안녕", "summary": "인사"}]


def test_limit_keeps_first_rows(tmp_path):
    assert len(read_examples(write(tmp_path, HEADER + ROW1 + ROW2), DataConfig(), limit=1)) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("fname,dialogue\na,b\n", "missing column(s) summary; found dialogue, fname"),
        (HEADER + ROW1 + 'a2,"",요약\n', "row 2 (line 4): empty `dialogue`"),
        (HEADER + ROW1 + "a2,대화,   \n", "row 2 (line 4): empty `summary`"),
        (HEADER + ROW1 + "a3,대화\n", "row 2 (line 4): empty `summary`"),
        # The line where the (two-line) row starts, not the one where it ends.
        (HEADER + ROW1 + ROW1, "row 2 (line 4): duplicate fname 'a1' (first at row 1 (line 2))"),
        (HEADER, "no data rows"),
        ("", "no data rows"),
        (HEADER.encode() + b"a,\xff\xfe,b\n", "line 2: byte 0xff is not valid UTF-8"),
        (HEADER + 'a,"unterminated,b\n', "malformed CSV"),
    ],
)
def test_bad_csv_names_file_and_row(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(UserError) as err:
        read_examples(path, DataConfig())
    assert str(path) in str(err.value) and message in str(err.value)


def test_bad_jsonl_line(tmp_path):
    path = write(tmp_path, '{"fname": "a", "dialogue": "d", "summary": "s"}\n{oops\n', "train.jsonl")
    with pytest.raises(UserError, match=r"train\.jsonl: line 2: invalid JSON"):
        read_examples(path, DataConfig())


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        read_examples(tmp_path / "none.csv", DataConfig())


def test_tokenize_adds_bos_eos_and_truncates(tmp_path, tokenizer):
    long_dialogue = "#Person1#: " + " ".join(["안녕하세요"] * 200)
    path = write(tmp_path, HEADER + ROW1 + f'a9,"{long_dialogue}",짧은 요약\n')
    ds = tokenize_file(path, DataConfig(), tokenizer, max_source=32, max_target=8)
    assert len(ds) == 2 and ds[1]["idx"] == 1
    for row in ds:
        assert row["input_ids"][0] == tokenizer.bos_token_id and row["input_ids"][-1] == tokenizer.eos_token_id
        assert row["labels"][0] == tokenizer.bos_token_id and row["labels"][-1] == tokenizer.eos_token_id
        assert len(row["input_ids"]) <= 32 and len(row["labels"]) <= 8
    assert len(ds[1]["input_ids"]) == 32 and ds[1]["source_len"] > 32
    speaker = tokenizer.convert_tokens_to_ids("#Person1#")
    assert ds[0]["input_ids"][1] == speaker  # kept whole


def test_fname_like_numbers_stay_text(tmp_path, tokenizer):
    path = write(tmp_path, HEADER + '007,"#Person1#: 네",NA\n')
    rows = read_examples(path, DataConfig())
    assert rows[0]["id"] == "007" and rows[0]["summary"] == "NA"
    ds = tokenize_file(path, DataConfig(), tokenizer, 64, 16)
    assert len(ds) == 1


def test_collator_pads_dynamically_with_minus_100(tmp_path, tokenizer):
    from transformers import BartConfig, BartForConditionalGeneration

    model = BartForConditionalGeneration(BartConfig(
        vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id))
    ds = tokenize_file(write(tmp_path, HEADER + ROW1 + ROW2), DataConfig(), tokenizer, 64, 32)
    collate = make_collator(tokenizer, model)
    batch = next(iter(eval_loader(ds, 2, collate, 0)))
    lengths = [len(r["input_ids"]) for r in ds]
    assert batch["input_ids"].shape == (2, max(lengths))  # padded to the longest in the batch only
    assert (batch["labels"] == LABEL_PAD).any() or len({len(r["labels"]) for r in ds}) == 1
    assert batch["decoder_input_ids"][:, 0].eq(tokenizer.eos_token_id).all()
    assert torch.equal(batch["decoder_input_ids"][:, 1:].ne(tokenizer.pad_token_id),
                       batch["labels"][:, :-1].ne(LABEL_PAD))
    assert sorted(batch["idx"].tolist()) == [0, 1]
    first = [b["idx"].tolist() for b in train_loader(ds, 1, collate, seed=3, num_workers=0)]
    again = [b["idx"].tolist() for b in train_loader(ds, 1, collate, seed=3, num_workers=0)]
    assert first == again


def test_length_grouped_sampler_is_a_seeded_resumable_permutation():
    import random

    from loop.data import LengthGroupedSampler

    lengths = [random.Random(i).randint(5, 300) for i in range(1000)]
    sampler = LengthGroupedSampler(lengths, group_size=16, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert sorted(first) == list(range(1000)) and list(sampler) == first  # every row once, same order again
    assert second != first and list(LengthGroupedSampler(lengths, 16, seed=4)) != first

    def padding_efficiency(order: list[int]) -> float:
        groups = [[lengths[i] for i in order[k:k + 16]] for k in range(0, len(order), 16)]
        return sum(map(sum, groups)) / sum(max(g) * len(g) for g in groups)

    shuffled = list(range(1000))
    random.Random(0).shuffle(shuffled)
    assert padding_efficiency(first) > 0.75 > 0.6 > padding_efficiency(shuffled)


def test_length_grouping_with_target_lengths_pads_both_sides_less():
    import random

    from loop.data import LengthGroupedSampler

    rng = random.Random(0)
    src = [rng.randint(20, 500) for _ in range(1600)]
    tgt = [rng.randint(5, 120) for _ in range(1600)]  # independent of the source length: the hard case

    def efficiency(order: list[int], lengths: list[int]) -> float:
        groups = [[lengths[i] for i in order[k:k + 16]] for k in range(0, len(order), 16)]
        return sum(map(sum, groups)) / sum(max(g) * len(g) for g in groups)

    by_source = list(LengthGroupedSampler(src, 16, seed=1))
    both = list(LengthGroupedSampler(src, 16, seed=1, target_lengths=tgt))
    assert sorted(both) == list(range(1600))
    assert efficiency(both, tgt) > efficiency(by_source, tgt) + 0.15  # targets grouped too
    assert efficiency(both, src) > 0.85  # at a small cost on the source side

    def padded(order: list[int], lengths: list[int]) -> int:
        return sum(max(lengths[i] for i in order[k:k + 16]) * 16 for k in range(0, len(order), 16))

    assert padded(both, src) + padded(both, tgt) < padded(by_source, src) + padded(by_source, tgt)
