"""`python -m loop.score`: CSV reading, the fname join, the JSON line, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loop.errors import EXIT_USER_ERROR, UserError
from loop.score import main, read_summaries

REPO_ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(list(argv)) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    return json.loads(out)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    # Row order differs between the files, and predictions carry an extra column before fname.
    preds = write(
        tmp_path / "pred.csv",
        "id,fname,summary\n1,b,나는 집에 갔다\n2,a,고양이는 밥을 먹는다\n",
    )
    refs = write(tmp_path / "ref.csv", "fname,summary\na,고양이가 밥을 먹었다\nb,나는 학교에 갔다\n")
    return preds, refs


def test_scores_joined_on_fname(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    preds, refs = pair
    scores = run_main(
        capsys, "--predictions", str(preds), "--references", str(refs), "--tokenizer", "whitespace"
    )
    # Hand-computed in test_rouge.py: a -> (1/3, 0, 1/3), b -> (2/3, 0, 2/3); a wrong join would give 0.
    assert scores == {
        "rouge_1": pytest.approx(0.5, abs=1e-6),
        "rouge_2": 0.0,
        "rouge_l": pytest.approx(0.5, abs=1e-6),
        "rouge_mean": pytest.approx(1 / 3, abs=1e-6),
        "rouge_mean_x100": pytest.approx(33.3333, abs=1e-4),
        "tokenizer": "whitespace",
        "aggregate": "mean",
        "references": 1,
        "n": 2,
    }
    assert list(scores) == ["rouge_1", "rouge_2", "rouge_l", "rouge_mean", "rouge_mean_x100", "tokenizer",
                            "aggregate", "references", "n"]


def test_default_tokenizer_is_mecab(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    preds, refs = pair
    scores = run_main(capsys, "--predictions", str(preds), "--references", str(refs))
    assert scores["tokenizer"] == "mecab"
    assert scores["rouge_1"] == pytest.approx((8 / 13 + 5 / 6) / 2, abs=1e-6)
    assert scores["rouge_2"] == pytest.approx((4 / 11 + 3 / 5) / 2, abs=1e-6)


def test_bom_crlf_and_quoted_multiline_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = 'fname,summary\r\nx,"나는, 학교에\r\n갔다"\r\ny,고양이\r\n'
    preds = write(tmp_path / "p.csv", "\ufeff" + text)
    refs = write(tmp_path / "r.csv", text)
    assert read_summaries(preds) == {"x": "나는, 학교에\r\n갔다", "y": "고양이"}
    scores = run_main(capsys, "--predictions", str(preds), "--references", str(refs), "--tokenizer", "char")
    assert scores["rouge_1"] == scores["rouge_2"] == scores["rouge_l"] == 1.0


def test_read_summaries_skips_blank_lines_and_strips_fname(tmp_path: Path) -> None:
    path = write(tmp_path / "s.csv", "fname , summary\n\n a ,요약 하나 \n\nb,\n")
    assert read_summaries(path) == {"a": "요약 하나 ", "b": ""}


def test_subprocess_error_is_one_line_exit_2(tmp_path: Path) -> None:
    refs = write(tmp_path / "ref.csv", "fname,summary\na,가\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("LOOP_DEBUG", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loop.score",
            "--predictions",
            str(tmp_path / "nope.csv"),
            "--references",
            str(refs),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode == EXIT_USER_ERROR
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert "nope.csv" in lines[0]
    assert "not found" in lines[0]


def expect_error(path: Path, *fragments: str) -> None:
    with pytest.raises(UserError) as info:
        read_summaries(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file(tmp_path: Path) -> None:
    expect_error(tmp_path / "missing.csv", "file not found", "fname,summary")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    expect_error(tmp_path, "cannot read file")


def test_missing_column(tmp_path: Path) -> None:
    expect_error(write(tmp_path / "c.csv", "fname,text\na,가\n"), "missing column(s) summary", "'fname,text'")


def test_undecodable_bytes(tmp_path: Path) -> None:
    path = write(tmp_path / "cp949.csv", "fname,summary\na,좋다\n", encoding="cp949")
    expect_error(path, "line 2", "not valid UTF-8")


def test_duplicate_fname(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", 'fname,summary\na,"여러\n줄"\nb,가\na,나\n')
    expect_error(path, "line 5", "duplicate fname 'a'", "first on line 2")


def test_empty_file(tmp_path: Path) -> None:
    expect_error(write(tmp_path / "empty.csv", ""), "file is empty")


def test_header_only(tmp_path: Path) -> None:
    expect_error(write(tmp_path / "h.csv", "\ufefffname,summary\r\n"), "no data rows")


def test_short_row(tmp_path: Path) -> None:
    expect_error(
        write(tmp_path / "s.csv", "fname,summary\na,가\nb\n"), "line 3", "expected 2 fields, found 1"
    )


def test_empty_fname(tmp_path: Path) -> None:
    expect_error(write(tmp_path / "f.csv", "fname,summary\n,가\n"), "line 2", "empty fname")


def test_fnames_missing_on_either_side(tmp_path: Path) -> None:
    refs = write(
        tmp_path / "ref.csv", "fname,summary\n" + "".join(f"r{i},가\n" for i in range(7)) + "both,가\n"
    )
    preds = write(tmp_path / "pred.csv", "fname,summary\nboth,가\nextra,나\n")
    with pytest.raises(UserError) as info:
        main(["--predictions", str(preds), "--references", str(refs)])
    message = str(info.value)
    assert "\n" not in message
    assert f"1 fname(s) in {preds} missing from {refs}: 'extra'" in message
    assert f"7 fname(s) in {refs} missing from {preds}: 'r0', 'r1', 'r2', 'r3', 'r4', ... (2 more)" in message


def test_unknown_tokenizer_is_rejected_by_argparse(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    preds, refs = pair
    with pytest.raises(SystemExit) as info:
        main(["--predictions", str(preds), "--references", str(refs), "--tokenizer", "kiwi"])
    assert info.value.code == 2
    assert "mecab" in capsys.readouterr().err


# ---- one reference: the numbers the scorer printed before multi-reference support ------------------------

PINNED_PREDICTIONS = ("fname,summary\na,고양이는 밥을 먹는다\nb,나는 집에 갔다\nc,밥을 먹고 밥을 먹었다\n"
                      "d,#Person1#은 내일 오후 3시에 #Person2#와 병원에 가기로 했다.\n")
PINNED_REFERENCES = ("fname,dialogue,summary\nd,x,#Person1#과 #Person2#는 내일 병원에 간다.\nc,x,밥을 먹었다\n"
                     "b,x,나는 학교에 갔다\na,x,고양이가 밥을 먹었다\n")
# `python -m loop.score --predictions p.csv --references r.csv --tokenizer T` at commit 092bcb0 printed these.
PINNED = {"mecab": (0.698646, 0.504798, 0.685488), "whitespace": (0.49359, 0.125, 0.49359),
          "char": (0.760636, 0.589321, 0.745011)}


@pytest.mark.parametrize("tokenizer", sorted(PINNED))
@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_one_reference_prints_the_previous_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   tokenizer: str, aggregate: str) -> None:
    preds = write(tmp_path / "p.csv", PINNED_PREDICTIONS)
    refs = write(tmp_path / "r.csv", PINNED_REFERENCES)
    scores = run_main(capsys, "--predictions", str(preds), "--references", str(refs), "--tokenizer", tokenizer,
                      "--aggregate", aggregate)
    assert (scores["rouge_1"], scores["rouge_2"], scores["rouge_l"]) == PINNED[tokenizer]
    assert scores["references"] == 1 and scores["n"] == 4


# ---- several references -----------------------------------------------------------------------------------

# The rows of test_rouge.py's hand computations (whitespace tokens): x has 3 references, y has 2 and an empty one.
MULTI = ("fname,dialogue,summary1,summary2,summary3\n"
         "x,대화,나는 학교에 갔다,나는 집에 왔다,집에 갔다\n"
         "y,대화,오늘 비가 온다,정말 온다 비가 오늘,\n")
MULTI_PREDICTIONS = "fname,summary\nx,나는 집에 갔다\ny,오늘 비가 온다 정말\n"
# Per row (test_rouge.py): x mean (32/45, 7/18, 32/45), max (4/5, 2/3, 4/5);
# y (its empty third reference left out) mean (13/14, 2/5, 31/56), max (1, 4/5, 6/7). The file is their average.
MULTI_EXPECTED = {
    "mean": ((32 / 45 + 13 / 14) / 2, (7 / 18 + 2 / 5) / 2, (32 / 45 + 31 / 56) / 2),
    "max": ((4 / 5 + 1) / 2, (2 / 3 + 4 / 5) / 2, (4 / 5 + 6 / 7) / 2),
}


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_numbered_references_are_found_and_combined(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    aggregate: str) -> None:
    preds = write(tmp_path / "p.csv", MULTI_PREDICTIONS)
    refs = write(tmp_path / "refs.csv", MULTI)
    scores = run_main(capsys, "--predictions", str(preds), "--references", str(refs), "--tokenizer", "whitespace",
                      "--aggregate", aggregate)
    rouge_1, rouge_2, rouge_l = MULTI_EXPECTED[aggregate]
    assert (scores["rouge_1"], scores["rouge_2"], scores["rouge_l"]) == pytest.approx((rouge_1, rouge_2, rouge_l),
                                                                                      abs=1e-6)
    mean = (rouge_1 + rouge_2 + rouge_l) / 3
    assert scores["rouge_mean"] == pytest.approx(mean, abs=1e-6)
    assert scores["rouge_mean_x100"] == pytest.approx(100 * mean, abs=1e-4)  # what the leaderboard shows
    assert (scores["aggregate"], scores["references"], scores["n"]) == (aggregate, 3, 2)


def test_rouge_mean_x100_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Row x alone, max: (4/5 + 2/3 + 4/5) / 3 = 34/45 = 0.755556, x100 = 75.5556.
    preds = write(tmp_path / "p.csv", "fname,summary\nx,나는 집에 갔다\n")
    refs = write(tmp_path / "refs.csv", MULTI.splitlines()[0] + "\n" + MULTI.splitlines()[1] + "\n")
    scores = run_main(capsys, "--predictions", str(preds), "--references", str(refs), "--tokenizer", "whitespace",
                      "--aggregate", "max")
    assert (scores["rouge_mean"], scores["rouge_mean_x100"]) == (0.755556, 75.5556)


def test_some_empty_references_are_left_out_with_a_warning(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    preds = write(tmp_path / "p.csv", MULTI_PREDICTIONS)
    refs = write(tmp_path / "refs.csv", MULTI)
    assert main(["--predictions", str(preds), "--references", str(refs), "--tokenizer", "whitespace"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"warning: 1 of 2 rows of {refs} have an empty reference among summary1, summary2, summary3; they are "
        "scored against their other references"]


def test_reference_columns_choose_the_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preds = write(tmp_path / "p.csv", MULTI_PREDICTIONS)
    # `summary` next to summary1..3 is ambiguous on its own, and fine once the columns are named.
    refs = write(tmp_path / "refs.csv", MULTI.replace("summary3\n", "summary3,summary\n")
                 .replace("집에 갔다\n", "집에 갔다,나는 학교에 갔다\n").replace("오늘,\n", "오늘,,오늘 비가 온다\n"))
    with pytest.raises(UserError, match=r"has both summary and summary1, summary2, summary3 columns.*"
                                        "--reference-columns"):
        main(["--predictions", str(preds), "--references", str(refs)])
    scores = run_main(capsys, "--predictions", str(preds), "--references", str(refs), "--tokenizer", "whitespace",
                      "--reference-columns", "summary1,summary2,summary3", "--aggregate", "max")
    assert scores["rouge_1"] == pytest.approx(MULTI_EXPECTED["max"][0], abs=1e-6) and scores["references"] == 3
    # One named column is a one-reference score: x against 나는 학교에 갔다 is (2/3, 0, 2/3), y against 오늘 비가
    # 온다 is (6/7, 4/5, 6/7).
    scores = run_main(capsys, "--predictions", str(preds), "--references", str(refs), "--tokenizer", "whitespace",
                      "--reference-columns", "summary")
    assert (scores["rouge_1"], scores["rouge_2"]) == pytest.approx(((2 / 3 + 6 / 7) / 2, (0 + 4 / 5) / 2), abs=1e-6)
    assert scores["references"] == 1


def test_a_step_file_with_numbered_references_scores_itself(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # What evaluation.write_predictions writes for a dev set with three references.
    step = write(tmp_path / "step_4.csv", "fname,prediction,reference1,reference2,reference3,rouge_l\n"
                                          "x,나는 집에 갔다,나는 학교에 갔다,나는 집에 왔다,집에 갔다,0.8\n")
    scores = run_main(capsys, "--predictions", str(step), "--tokenizer", "whitespace", "--aggregate", "max")
    assert (scores["rouge_1"], scores["rouge_2"], scores["rouge_l"]) == pytest.approx((4 / 5, 2 / 3, 4 / 5),
                                                                                      abs=1e-6)
    assert scores["references"] == 3


def test_every_reference_empty_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    preds = write(tmp_path / "p.csv", MULTI_PREDICTIONS)
    refs = write(tmp_path / "refs.csv", MULTI.replace("오늘 비가 온다,정말 온다 비가 오늘,", ",  ,"))
    with pytest.raises(UserError) as info:
        main(["--predictions", str(preds), "--references", str(refs)])
    assert str(info.value) == (f"{refs}: line 3: every reference (summary1, summary2, summary3) is empty for fname "
                               "'y' (1 such rows in all); each row needs at least one reference with text")


@pytest.mark.parametrize(("flag", "message"), [
    ("summary1,summary9", "missing column(s) summary9 in header"),
    ("summary1,,summary2", "expected distinct column names separated by commas, got 'summary1,,summary2'"),
    ("summary1,summary1", "expected distinct column names"),
    ("fname", "fname is the id column"),
])
def test_bad_reference_columns_are_one_line_errors(tmp_path: Path, flag: str, message: str) -> None:
    preds = write(tmp_path / "p.csv", MULTI_PREDICTIONS)
    refs = write(tmp_path / "refs.csv", MULTI)
    with pytest.raises(UserError) as info:
        main(["--predictions", str(preds), "--references", str(refs), "--reference-columns", flag])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_reference_columns_that_name_the_prediction_column_are_refused(tmp_path: Path) -> None:
    preds = write(tmp_path / "p.csv", "fname,summary,summary2\nx,가,나\n")
    with pytest.raises(UserError, match="it would score itself"):
        main(["--predictions", str(preds), "--reference-columns", "summary,summary2"])


def test_unknown_aggregate_is_rejected_by_argparse(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    preds, refs = pair
    with pytest.raises(SystemExit) as info:
        main(["--predictions", str(preds), "--references", str(refs), "--aggregate", "median"])
    assert info.value.code == 2 and "max" in capsys.readouterr().err


def test_help_names_the_new_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--reference-columns" in out and "--aggregate {mean,max}" in out and "rouge_mean_x100" in out
