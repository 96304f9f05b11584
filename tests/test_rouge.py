"""ROUGE on Korean: hand-computed F1 per tokenizer, and the reasons the stock tokenizer is not used."""

from __future__ import annotations

import unicodedata

import pytest
from rouge_score import rouge_scorer, tokenizers

from loop.errors import UserError
from loop.rouge import TOKENIZERS, MecabTokenizer, RougeResult, compute_rouge, get_tokenizer

# (prediction, reference). With both P and R > 0, F1 = 2PR/(P+R) = 2*overlap/(len_pred + len_ref).
CAT = ("고양이는 밥을 먹는다", "고양이가 밥을 먹었다")
SCHOOL = ("나는 집에 갔다", "나는 학교에 갔다")
REPEAT = ("밥을 먹고 밥을 먹었다", "밥을 먹었다")  # repeated tokens: overlap counts are clipped

# Expected (rouge_1, rouge_2, rouge_l) per tokenizer, worked out by hand:
EXPECTED = {
    "mecab": {
        # pred [고양이 는 밥 을 먹 는다] (6), ref [고양이 가 밥 을 먹 었 다] (7)
        # R1 overlap {고양이 밥 을 먹}=4 -> 8/13; R2 5 vs 6 bigrams, overlap {밥을, 을먹}=2 -> 4/11;
        # LCS 고양이 밥 을 먹 = 4 -> 8/13
        CAT: (8 / 13, 4 / 11, 8 / 13),
        # pred [나 는 집 에 갔 다] (6), ref [나 는 학교 에 갔 다] (6)
        # R1 5 -> 10/12; R2 5 vs 5 bigrams, overlap {나는, 에갔, 갔다}=3 -> 6/10; LCS 나 는 에 갔 다 = 5
        SCHOOL: (5 / 6, 3 / 5, 5 / 6),
        # pred [밥 을 먹 고 밥 을 먹 었 다] (9), ref [밥 을 먹 었 다] (5)
        # R1 clipped overlap 5: P=5/9, R=1 -> 5/7; R2 overlap 4 of 8 vs 4: P=1/2, R=1 -> 2/3; LCS 5 -> 5/7
        REPEAT: (5 / 7, 2 / 3, 5 / 7),
    },
    "whitespace": {
        # [고양이는 밥을 먹는다] vs [고양이가 밥을 먹었다]: only 밥을 shared -> 1/3, no bigram, LCS 1
        CAT: (1 / 3, 0.0, 1 / 3),
        # [나는 집에 갔다] vs [나는 학교에 갔다]: 2 shared -> 2/3, no shared bigram, LCS 2
        SCHOOL: (2 / 3, 0.0, 2 / 3),
        # [밥을 먹고 밥을 먹었다] (4) vs [밥을 먹었다] (2): R1 2 -> 4/6; R2 1 of 3 vs 1 -> 2/4; LCS 2 -> 4/6
        REPEAT: (2 / 3, 1 / 2, 2 / 3),
    },
    "char": {
        # 고양이는밥을먹는다 (9) vs 고양이가밥을먹었다 (9): R1 {고 양 이 밥 을 먹 다}=7 -> 14/18;
        # R2 8 vs 8 bigrams, overlap {고양, 양이, 밥을, 을먹}=4 -> 8/16; LCS 고양이밥을먹다 = 7 -> 14/18
        CAT: (7 / 9, 1 / 2, 7 / 9),
        # 나는집에갔다 (6) vs 나는학교에갔다 (7): R1 5 -> 10/13; R2 5 vs 6 bigrams (across word boundaries),
        # overlap {나는, 에갔, 갔다}=3 -> 6/11; LCS 나는에갔다 = 5 -> 10/13
        SCHOOL: (10 / 13, 6 / 11, 10 / 13),
        # same token sequences as mecab for this pair: 9 vs 5 syllables
        REPEAT: (5 / 7, 2 / 3, 5 / 7),
    },
}

CASES = [(name, pair, scores) for name, table in EXPECTED.items() for pair, scores in table.items()]


def test_tokenizer_names_are_exposed() -> None:
    assert TOKENIZERS == ("mecab", "whitespace", "char")
    assert set(EXPECTED) == set(TOKENIZERS)


def test_tokens_used_in_the_hand_computations() -> None:
    assert get_tokenizer("mecab").tokenize(CAT[0]) == ["고양이", "는", "밥", "을", "먹", "는다"]
    assert get_tokenizer("mecab").tokenize(CAT[1]) == ["고양이", "가", "밥", "을", "먹", "었", "다"]
    assert get_tokenizer("mecab").tokenize(SCHOOL[1]) == ["나", "는", "학교", "에", "갔", "다"]
    assert get_tokenizer("whitespace").tokenize(" 나는\t학교에\n갔다 ") == ["나는", "학교에", "갔다"]
    assert get_tokenizer("char").tokenize("나는 집에") == ["나", "는", "집", "에"]


@pytest.mark.parametrize(("tokenizer", "pair", "expected"), CASES)
def test_hand_computed_f1(
    tokenizer: str, pair: tuple[str, str], expected: tuple[float, float, float]
) -> None:
    result = compute_rouge([pair[0]], [pair[1]], tokenizer=tokenizer)
    assert (result.rouge_1, result.rouge_2, result.rouge_l) == pytest.approx(expected)
    assert result.per_sample_rouge_l == pytest.approx([expected[2]])
    assert result.tokenizer == tokenizer
    assert result.n == 1


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_mean_is_average_of_per_sample_scores(tokenizer: str) -> None:
    pairs = [CAT, SCHOOL, REPEAT]
    result = compute_rouge([p for p, _ in pairs], [r for _, r in pairs], tokenizer=tokenizer)
    expected = [EXPECTED[tokenizer][pair] for pair in pairs]
    assert result.n == 3
    assert len(result.per_sample_rouge_l) == 3
    assert result.per_sample_rouge_l == pytest.approx([e[2] for e in expected])
    assert result.rouge_l == pytest.approx(sum(result.per_sample_rouge_l) / 3)
    for i, value in enumerate((result.rouge_1, result.rouge_2, result.rouge_l)):
        assert value == pytest.approx(sum(e[i] for e in expected) / 3)


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_identical_korean_scores_exactly_one(tokenizer: str) -> None:
    text = "#Person1#은 내일 오후 3시에 #Person2#와 병원에 가기로 했다."
    result = compute_rouge([text, SCHOOL[1]], [text, SCHOOL[1]], tokenizer=tokenizer)
    assert (result.rouge_1, result.rouge_2, result.rouge_l) == (1.0, 1.0, 1.0)
    assert result.per_sample_rouge_l == [1.0, 1.0]


def test_stock_rouge_score_tokenizer_drops_hangul() -> None:
    # Why we pass our own tokenizer: the stock one keeps only [a-z0-9]+, so identical Korean scores 0.
    text = "고양이가 밥을 먹었다"
    assert tokenizers.DefaultTokenizer().tokenize(text) == []
    stock = rouge_scorer.RougeScorer(["rouge1", "rougeL"]).score(text, text)
    assert stock["rouge1"].fmeasure == 0.0
    assert stock["rougeL"].fmeasure == 0.0
    assert compute_rouge([text], [text]).rouge_1 > 0


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_tokenizer_objects_plug_into_rouge_scorer(tokenizer: str) -> None:
    scorer = rouge_scorer.RougeScorer(["rouge1"], tokenizer=get_tokenizer(tokenizer))
    assert scorer.score(SCHOOL[1], SCHOOL[0])["rouge1"].fmeasure == pytest.approx(
        EXPECTED[tokenizer][SCHOOL][0]
    )


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_decomposed_hangul_is_normalized(tokenizer: str) -> None:
    nfd = unicodedata.normalize("NFD", SCHOOL[1])
    assert nfd != SCHOOL[1]
    assert get_tokenizer(tokenizer).tokenize(nfd) == get_tokenizer(tokenizer).tokenize(SCHOOL[1])
    assert compute_rouge([nfd], [SCHOOL[1]], tokenizer=tokenizer).rouge_2 == 1.0


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_latin_case_is_kept(tokenizer: str) -> None:
    assert compute_rouge(["Tom 은"], ["tom 은"], tokenizer=tokenizer).rouge_1 < 1.0


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_empty_prediction_scores_zero(tokenizer: str) -> None:
    result = compute_rouge(["", "   "], [SCHOOL[1], CAT[1]], tokenizer=tokenizer)
    assert (result.rouge_1, result.rouge_2, result.rouge_l) == (0.0, 0.0, 0.0)
    assert result.per_sample_rouge_l == [0.0, 0.0]


def test_as_dict_has_summary_keys_only() -> None:
    result = compute_rouge([SCHOOL[0]], [SCHOOL[1]], tokenizer="whitespace")
    assert isinstance(result, RougeResult)
    assert result.as_dict() == {
        "rouge_1": pytest.approx(2 / 3),
        "rouge_2": 0.0,
        "rouge_l": pytest.approx(2 / 3),
        "tokenizer": "whitespace",
        "n": 1,
    }


def test_length_mismatch_is_value_error() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_rouge(["가", "나"], ["가"])


def test_empty_input_is_value_error() -> None:
    with pytest.raises(ValueError, match="no predictions"):
        compute_rouge([], [])


def test_single_string_instead_of_list_is_rejected() -> None:
    with pytest.raises(TypeError):
        compute_rouge("나는 집에 갔다", "나는 학교에 갔다")


def test_unknown_tokenizer_names_valid_choices() -> None:
    with pytest.raises(UserError, match=r"'kiwi'.*mecab, whitespace, char"):
        get_tokenizer("kiwi")
    with pytest.raises(UserError, match="mecab, whitespace, char"):
        compute_rouge(["가"], ["가"], tokenizer="Mecab")


def test_mecab_object_is_built_once_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    import mecab

    built = []
    real = mecab.MeCab

    def counting_mecab(*args: object, **kwargs: object) -> object:
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mecab, "MeCab", counting_mecab)
    tok = MecabTokenizer()
    assert built == []
    tok.tokenize(CAT[0])
    tok.tokenize(CAT[1])
    assert built == [1]
    assert get_tokenizer("mecab") is get_tokenizer("mecab")
