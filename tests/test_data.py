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


# ---- the dev file's references (data.reference_columns) ---------------------------------------------------

MULTI_HEADER = "fname,dialogue,summary1,summary2,summary3\n"


def dev_config(path: Path, **kwargs) -> DataConfig:
    return DataConfig(dev_file=str(path), **kwargs)


def test_the_dev_file_rows_carry_their_references(tmp_path):
    path = write(tmp_path, HEADER + ROW1 + ROW2, "dev.csv")
    rows = read_examples(path, dev_config(path))
    assert rows[0]["references"] == ["#Person1#과 #Person2#가 인사했다."] == [rows[0]["summary"]]
    # A training file is read as before: the summary only, whatever data.reference_columns says.
    train = write(tmp_path, HEADER + ROW1, "train.csv")
    assert "references" not in read_examples(train, dev_config(path, reference_columns=["summary1"]))[0]


def test_several_references_and_the_loss_target(tmp_path):
    text = MULTI_HEADER + 'a,"#Person1#: 안녕",첫 요약,둘째 요약,셋째 요약\nb,"#Person1#: 잘 가",,둘째만,\n'
    path = write(tmp_path, text, "dev.csv")
    cfg = dev_config(path, reference_columns=["summary1", "summary2", "summary3"])
    rows = read_examples(path, cfg)
    # An empty reference stays "" (scoring leaves it out); without a `summary` column the eval loss uses the
    # first non-empty reference.
    assert [r["references"] for r in rows] == [["첫 요약", "둘째 요약", "셋째 요약"], ["", "둘째만", ""]]
    assert [r["summary"] for r in rows] == ["첫 요약", "둘째만"]
    # With data.summary_column in the file, the loss learns that column, as training does.
    path = write(tmp_path, text.replace("summary3\n", "summary3,summary\n").replace("셋째 요약\n", "셋째 요약,정답\n")
                 .replace(",둘째만,\n", ",둘째만,,정답2\n"), "dev.csv")
    assert [r["summary"] for r in read_examples(path, cfg)] == ["정답", "정답2"]
    # Predict's reading (no summaries) never asks for references.
    assert "references" not in read_examples(path, cfg, require_summary=False)[0]


def test_a_dev_row_whose_references_are_all_empty_names_file_and_row(tmp_path):
    path = write(tmp_path, MULTI_HEADER + "a,대화,가,나,다\nb,대화,, ,\n", "dev.csv")
    with pytest.raises(UserError) as err:
        read_examples(path, dev_config(path, reference_columns=["summary1", "summary2", "summary3"]))
    assert str(err.value) == (f"{path}: row 2 (line 3): every reference is empty (summary1, summary2, summary3); "
                              "each dev row needs at least one (data.reference_columns)")


def test_a_missing_reference_column_names_the_key(tmp_path):
    path = write(tmp_path, HEADER + ROW1, "dev.csv")
    with pytest.raises(UserError) as err:
        read_examples(path, dev_config(path, reference_columns=["summary", "summary2"]))
    assert f"{path}: missing column(s) summary2; found dialogue, fname, summary" in str(err.value)
    assert "data.reference_columns" in str(err.value)


def test_jsonl_references_must_be_strings(tmp_path):
    path = write(tmp_path, json.dumps({"fname": "a", "dialogue": "d", "s1": "가", "s2": 3}) + "\n", "dev.jsonl")
    with pytest.raises(UserError, match=r"line 1: `s2` must be a string, got a number \(3\)"):
        read_examples(path, dev_config(path, reference_columns=["s1", "s2"]))


# ---- input cleaning (data.clean_patterns) -----------------------------------------------------------------

LAUGHS = ["ㅋ{2,}", "ㅎ{2,}", "ㅠ+", r"\b[ㄱ-ㅣ]+\b"]


def test_clean_patterns_remove_matches_from_dialogues_only(tmp_path):
    dialogue = ("#Person1#: 진짜ㅋㅋㅋ 웃기다  ㅎㅎ\n#Person2#: ㅠㅠ\nㅋㅋㅋ\n#Person1#: ㅇㅇ 알겠어ㅋ.\n"
                "#Person2#:  그래  요")
    path = write(tmp_path, "fname,dialogue,summary\n" + f'a,"{dialogue}",요약 ㅋㅋ ㅠㅠ\n')
    rows = read_examples(path, DataConfig(clean_patterns=LAUGHS))
    # A match becomes a space, a line that lost text is collapsed and stripped (and dropped when nothing is
    # left: the bare ㅋㅋㅋ line), a line without a match is kept as it was (the last one, double spaces and
    # all); a single ㅋ is not a laughter run and stays.
    assert rows[0]["dialogue"] == "#Person1#: 진짜 웃기다\n#Person2#:\n#Person1#: 알겠어ㅋ.\n#Person2#:  그래  요"
    assert rows[0]["summary"] == "요약 ㅋㅋ ㅠㅠ"  # never the summaries
    assert read_examples(path, DataConfig())[0]["dialogue"] == dialogue  # off by default


def test_clean_patterns_are_applied_the_same_for_training_and_prediction(tmp_path):
    # predict reads its input with read_examples(..., require_summary=False) and the run's data config.
    path = write(tmp_path, HEADER + 'a,"#Person1#: 네ㅋㅋ 좋아요ㅠㅠ",요약\n')
    cfg = DataConfig(clean_patterns=LAUGHS)
    trained = read_examples(path, cfg)[0]["dialogue"]
    predicted = read_examples(path, cfg, require_summary=False)[0]["dialogue"]
    assert trained == predicted == "#Person1#: 네 좋아요"


def test_a_dialogue_left_empty_by_cleaning_names_file_and_row(tmp_path):
    path = write(tmp_path, HEADER + ROW1 + "a2,ㅋㅋㅋ ㅎㅎ,요약\n")
    with pytest.raises(UserError) as err:
        read_examples(path, DataConfig(clean_patterns=LAUGHS))
    assert str(err.value) == (f"{path}: row 2 (line 4): `dialogue` is empty once data.clean_patterns are removed "
                              "(it was 'ㅋㅋㅋ ㅎㅎ'); drop the row or narrow the patterns")


def test_cleaned_dialogues_are_what_gets_tokenized(tmp_path, tokenizer):
    path = write(tmp_path, HEADER + 'a,"#Person1#: 커피ㅋㅋㅋ 주세요",요약\n')
    plain = write(tmp_path, HEADER + 'a,"#Person1#: 커피 주세요",요약\n', "plain.csv")
    cleaned = tokenize_file(path, DataConfig(clean_patterns=LAUGHS), tokenizer, 64, 16)
    assert cleaned["input_ids"] == tokenize_file(plain, DataConfig(), tokenizer, 64, 16)["input_ids"]
