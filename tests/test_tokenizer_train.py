"""Tests for the offline BPE tokenizer trainer."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from loop.synthetic import MASK_TOKENS, SPEAKER_TOKENS, generate_rows
from loop.tokenizer_train import train_tokenizer

EXTRA = SPEAKER_TOKENS + MASK_TOKENS


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return generate_rows(300, seed=11)


@pytest.fixture(scope="module")
def corpus(rows) -> list[str]:
    return [text for r in rows for text in (r["dialogue"], r["summary"])]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(corpus, out, vocab_size=1200, extra_special_tokens=EXTRA), out


def test_special_tokens_have_bart_ids(trained):
    tok, _ = trained
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token, tok.mask_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
        "<mask>",
    )
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert list(tok.extra_special_tokens) == list(EXTRA)
    assert len(tok) == 1200


@pytest.mark.parametrize("token", (*EXTRA, "<mask>"))
def test_speaker_and_mask_tokens_are_single_ids(trained, token):
    tok, _ = trained
    token_id = tok.convert_tokens_to_ids(token)
    assert token_id != tok.unk_token_id
    assert tok(token, add_special_tokens=False)["input_ids"] == [token_id]
    glued = tok(f"{token}은 {token}:{token}에게", add_special_tokens=False)["input_ids"]
    assert glued.count(token_id) == 3


def test_encoding_adds_bos_and_eos(trained, rows):
    tok, _ = trained
    ids = tok(rows[0]["summary"])["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.bos_token_id not in ids[1:-1] and tok.eos_token_id not in ids[1:-1]
    pair = tok("가", "나")["input_ids"]
    assert pair[0] == tok.bos_token_id and pair.count(tok.eos_token_id) == 3


def test_decode_round_trips_dialogues_with_special_tokens(trained, rows):
    tok, _ = trained
    for r in rows[:50]:
        for text in (r["dialogue"], r["summary"], r["summary"].split(" ", 1)[1]):
            decoded = tok.decode(tok(text)["input_ids"], skip_special_tokens=False)
            assert decoded == f"<s>{text}</s>"


def test_hangul_stays_whole_characters(trained):
    tok, _ = trained
    # Byte-level BPE would split a syllable into three byte pieces; here pieces are whole syllables.
    ids = tok("네, 안녕하세요 감사합니다", add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert "".join(pieces) == "네,▁안녕하세요▁감사합니다"
    assert all(ch in "▁," or "가" <= ch <= "힣" for piece in pieces for ch in piece)
    unseen = tok.convert_ids_to_tokens(tok("뷁", add_special_tokens=False)["input_ids"])
    assert unseen[-1] == "<unk>" and len(unseen) <= 2


def test_auto_tokenizer_loads_the_same_tokenizer(trained, rows):
    tok, out = trained
    loaded = AutoTokenizer.from_pretrained(out)
    texts = [r["dialogue"] for r in rows[:30]] + [r["summary"] for r in rows[:30]]
    assert loaded(texts)["input_ids"] == tok(texts)["input_ids"]
    assert loaded.all_special_tokens == tok.all_special_tokens
    assert loaded.all_special_ids == tok.all_special_ids
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.mask_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
        tok.mask_token_id,
    )
    assert list(loaded.extra_special_tokens) == list(EXTRA)
    assert loaded.get_vocab() == tok.get_vocab()


def test_training_is_deterministic(tmp_path, corpus, trained):
    _, first = trained
    train_tokenizer(iter(corpus), tmp_path, vocab_size=1200, extra_special_tokens=EXTRA)
    a = json.loads((first / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    b = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert a["vocab"] == b["vocab"] and a["merges"] == b["merges"]


def test_extra_tokens_are_deduplicated_in_order(tmp_path, corpus):
    extra = ["#B#", "<s>", "#A#", "#B#"]
    tok = train_tokenizer(corpus[:40], tmp_path, vocab_size=300, extra_special_tokens=extra)
    assert list(tok.extra_special_tokens) == ["#B#", "#A#"]
    assert tok.convert_tokens_to_ids(["#B#", "#A#"]) == [5, 6]
