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
        "tokenizer": "whitespace",
        "n": 2,
    }
    assert list(scores) == ["rouge_1", "rouge_2", "rouge_l", "tokenizer", "n"]


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
