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
        "rouge_mean": pytest.approx((2 / 3 + 0 + 2 / 3) / 3),
        "tokenizer": "whitespace",
        "aggregate": "mean",
        "references": 1,
        "n": 1,
    }


# ---- one reference: exactly the scorer's numbers from before multi-reference support -----------------------

PINNED_PREDICTIONS = [CAT[0], SCHOOL[0], REPEAT[0], "#Person1#은 내일 오후 3시에 #Person2#와 병원에 가기로 했다.", ""]
PINNED_REFERENCES = [CAT[1], SCHOOL[1], REPEAT[1], "#Person1#과 #Person2#는 내일 병원에 간다.", "비어 있는 예측"]
# compute_rouge(PINNED_PREDICTIONS, PINNED_REFERENCES, tok) printed by the one-reference scorer (commit 092bcb0):
# (rouge_1, rouge_2, rouge_l, per-sample ROUGE-L), compared with == below, not approximately.
PINNED = {
    "mecab": (0.5589165220744168, 0.40383838383838383, 0.5483902062849431,
              [0.6153846153846153, 0.8333333333333334, 0.7142857142857143, 0.5789473684210527, 0.0]),
    "whitespace": (0.39487179487179486, 0.1, 0.39487179487179486,
                   [0.3333333333333333, 0.6666666666666666, 0.6666666666666666, 0.3076923076923077, 0.0]),
    "char": (0.6085088522588522, 0.4714565004887586, 0.5960088522588523,
             [0.7777777777777778, 0.7692307692307692, 0.7142857142857143, 0.7187499999999999, 0.0]),
}


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
@pytest.mark.parametrize("aggregate", ["mean", "max"])
@pytest.mark.parametrize("as_lists", [False, True])
def test_one_reference_gives_exactly_the_previous_numbers(tokenizer: str, aggregate: str, as_lists: bool) -> None:
    references = [[r] for r in PINNED_REFERENCES] if as_lists else PINNED_REFERENCES
    result = compute_rouge(PINNED_PREDICTIONS, references, tokenizer=tokenizer, aggregate=aggregate)
    rouge_1, rouge_2, rouge_l, per_sample = PINNED[tokenizer]
    assert (result.rouge_1, result.rouge_2, result.rouge_l) == (rouge_1, rouge_2, rouge_l)
    assert result.per_sample_rouge_l == per_sample
    assert result.references == 1 and result.aggregate == aggregate


# ---- several references -----------------------------------------------------------------------------------

PRED = "나는 집에 갔다"  # whitespace tokens [나는 집에 갔다] (3), bigrams (나는 집에) (집에 갔다)
REFS = ["나는 학교에 갔다", "나는 집에 왔다", "집에 갔다"]
# Per reference, (R1, R2, RL) F1 = 2*overlap / (len_pred + len_ref) when both P and R > 0:
#   "나는 학교에 갔다": R1 {나는 갔다} 2 -> 4/6 = 2/3; no shared bigram -> 0; LCS 나는 갔다 = 2 -> 2/3
#   "나는 집에 왔다":   R1 {나는 집에} 2 -> 2/3; bigram (나는 집에) 1 -> 2/4 = 1/2; LCS 나는 집에 = 2 -> 2/3
#   "집에 갔다":        R1 2 -> 4/5; bigram (집에 갔다) 1 of 2 vs 1 -> 2/3; LCS 2 -> 4/5
# mean: R1 (2/3 + 2/3 + 4/5) / 3 = 32/45, R2 (0 + 1/2 + 2/3) / 3 = 7/18, RL 32/45,
#       rouge_mean (32/45 + 7/18 + 32/45) / 3 = (64 + 35 + 64) / 90 / 3 = 163/270
# max:  R1 4/5, R2 2/3, RL 4/5, rouge_mean (4/5 + 2/3 + 4/5) / 3 = 34/45
MULTI = {"mean": (32 / 45, 7 / 18, 32 / 45, 163 / 270), "max": (4 / 5, 2 / 3, 4 / 5, 34 / 45)}

PRED2 = "오늘 비가 온다 정말"  # [오늘 비가 온다 정말] (4), bigrams (오늘 비가) (비가 온다) (온다 정말)
REFS2 = ["오늘 비가 온다", "정말 온다 비가 오늘"]
#   "오늘 비가 온다":      R1 3 -> 6/7; bigrams (오늘 비가) (비가 온다) 2 -> 4/5; LCS 3 -> 6/7
#   "정말 온다 비가 오늘": R1 all 4 -> 1; bigrams (정말 온다) (온다 비가) (비가 오늘): none shared -> 0;
#                          LCS 1 -> 2/8 = 1/4
# max takes each type's best on its own: R1 1 (second reference), R2 4/5 and RL 6/7 (first);
# rouge_mean (1 + 4/5 + 6/7) / 3 = (35 + 28 + 30) / 105 = 31/35.
# mean: R1 (6/7 + 1) / 2 = 13/14, R2 (4/5 + 0) / 2 = 2/5, RL (6/7 + 1/4) / 2 = 31/56.
MULTI2 = {"mean": (13 / 14, 2 / 5, 31 / 56), "max": (1.0, 4 / 5, 6 / 7)}


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_several_references_hand_computed(aggregate: str) -> None:
    result = compute_rouge([PRED], [REFS], tokenizer="whitespace", aggregate=aggregate)
    rouge_1, rouge_2, rouge_l, rouge_mean = MULTI[aggregate]
    assert (result.rouge_1, result.rouge_2, result.rouge_l) == pytest.approx((rouge_1, rouge_2, rouge_l))
    assert result.rouge_mean == pytest.approx(rouge_mean)
    assert result.per_sample_rouge_l == pytest.approx([rouge_l])
    assert (result.references, result.aggregate, result.n) == (3, aggregate, 1)


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_max_takes_each_rouge_type_from_its_own_best_reference(aggregate: str) -> None:
    result = compute_rouge([PRED2], [REFS2], tokenizer="whitespace", aggregate=aggregate)
    assert (result.rouge_1, result.rouge_2, result.rouge_l) == pytest.approx(MULTI2[aggregate])
    if aggregate == "max":
        assert result.rouge_mean == pytest.approx(31 / 35)


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_rows_are_averaged_after_each_row_is_combined(aggregate: str) -> None:
    # A row with one reference (a plain string) next to rows with several.
    result = compute_rouge([PRED, PRED2, SCHOOL[0]], [REFS, REFS2, SCHOOL[1]], tokenizer="whitespace",
                           aggregate=aggregate)
    rows = [MULTI[aggregate][:3], MULTI2[aggregate], EXPECTED["whitespace"][SCHOOL]]
    for k, value in enumerate((result.rouge_1, result.rouge_2, result.rouge_l)):
        assert value == pytest.approx(sum(row[k] for row in rows) / 3)
    assert result.rouge_mean == pytest.approx((result.rouge_1 + result.rouge_2 + result.rouge_l) / 3)
    assert result.per_sample_rouge_l == pytest.approx([row[2] for row in rows])
    assert result.references == 3


def test_rouge_mean_is_the_mean_of_the_three_f1_scores() -> None:
    result = compute_rouge([CAT[0]], [CAT[1]], tokenizer="mecab")
    assert result.rouge_mean == pytest.approx((8 / 13 + 4 / 11 + 8 / 13) / 3)


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_an_empty_reference_among_others_is_left_out(aggregate: str) -> None:
    with_gap = compute_rouge([PRED], [["", REFS[0], "  ", REFS[1], REFS[2]]], tokenizer="whitespace",
                             aggregate=aggregate)
    assert (with_gap.rouge_1, with_gap.rouge_2, with_gap.rouge_l) == pytest.approx(MULTI[aggregate][:3])


@pytest.mark.parametrize("references", [["", " \n"], "", []])
def test_a_row_whose_references_are_all_empty_is_an_error(references: list[str] | str) -> None:
    with pytest.raises(ValueError, match="sample 1: every reference is empty"):
        compute_rouge([PRED, PRED], [REFS, references], tokenizer="whitespace")


def test_unknown_aggregate_names_the_choices() -> None:
    with pytest.raises(UserError, match=r"'median'.*mean, max"):
        compute_rouge(["가"], ["가"], aggregate="median")


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
