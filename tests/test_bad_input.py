"""Bad input through the real command line: one line naming file/key/row, exit code 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_train, train_env

HEADER = "fname,dialogue,summary\n"
GOOD_ROWS = "".join(f'd{i},"#Person1#: 안녕하세요 {i}번.\n#Person2#: 네, 반가워요.",#Person1#이 {i}번 인사했다.\n'
                    for i in range(20))


def snapshot(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def data_overrides(train: Path, dev: Path) -> tuple[str, ...]:
    return ("data.synthetic=false", f"data.train_file={train}", f"data.dev_file={dev}")


CONFIG_CASES = [
    ("[training\n", "invalid TOML"),
    ("[training]\nbatch_sise = 8\n", "unknown key `training.batch_sise`; did you mean `training.batch_size`?"),
    ("[training]\nbatch_size = 0\n", "`training.batch_size` must be ≥ 1, got 0"),
    ("[training]\nmax_steps = -1\n", "`training.max_steps` must be ≥ 0"),
    ("[evaluation]\nsave_steps = 0\n", "`evaluation.save_steps` must be ≥ 1"),
    ("[training]\nlearning_rate = '3e-5'\n", "`training.learning_rate` must be number"),
    ('extends = "self.toml"\n', "`extends` makes a cycle"),
    ('extends = "nowhere.toml"\n', "`extends` names config file not found"),
    ("[evaluation]\nmetric_for_best_model = 'loss'\n", "needs `evaluation.greater_is_better = false`"),
]


@pytest.mark.parametrize(("toml", "message"), CONFIG_CASES)
def test_bad_config_exits_2_with_one_line(tmp_path, toml, message):
    (tmp_path / "self.toml").write_text(toml, encoding="utf-8")
    (tmp_path / "old").mkdir()
    (tmp_path / "old/keep.txt").write_text("earlier run")
    before = snapshot(tmp_path)
    # No TINY overrides here: they would replace the bad values under test.
    proc = subprocess.run([sys.executable, str(ROOT / "loop/train.py"), "--config", str(tmp_path / "self.toml"),
                           "--set", "training.output_dir=old"], cwd=tmp_path, env=train_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "self.toml" in lines[0] and "Traceback" not in proc.stderr
    assert snapshot(tmp_path) == before


DATA_CASES = [
    ("fname,dialogue\nd1,안녕\n", "missing column(s) summary"),
    (HEADER + GOOD_ROWS + "d99,,요약\n", "row 21 (line 42): empty `dialogue`"),
    (HEADER + GOOD_ROWS + 'd99,"#Person1#: 네",\n', "row 21 (line 42): empty `summary`"),
    (HEADER, "no data rows"),
    ((HEADER + "d1,").encode() + b"\xc3\x28" + b",s\n", "line 2: byte 0xc3 is not valid UTF-8"),
    (HEADER + GOOD_ROWS + 'd0,"#Person1#: 네",요약\n', "row 21 (line 42): duplicate fname 'd0' (first at row 1"),
]


@pytest.mark.parametrize(("content", "message"), DATA_CASES)
def test_bad_training_data_exits_2_naming_file_and_row(tmp_path, content, message):
    train, dev = tmp_path / "train.csv", tmp_path / "dev.csv"
    if isinstance(content, bytes):
        train.write_bytes(content)
    else:
        train.write_text(content, encoding="utf-8", newline="")
    dev.write_text(HEADER + GOOD_ROWS, encoding="utf-8")
    before = snapshot(tmp_path)
    proc = run_train(tmp_path, *data_overrides(train, dev), "training.output_dir=out")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(train) in lines[0] and message in lines[0], lines
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_missing_data_file_points_at_the_demo(tmp_path):
    proc = run_train(tmp_path, *data_overrides(tmp_path / "train.csv", tmp_path / "dev.csv"))
    assert proc.returncode == 2
    assert "train.csv: data file not found (data.train_file)" in proc.stderr
    assert "configs/demo.toml" in proc.stderr


def test_bom_crlf_file_with_an_overlong_row_trains(tmp_path):
    long_row = 'long,"#Person1#: ' + "아주 긴 대화입니다 " * 400 + '",긴 대화를 요약했다.\n'
    text = (HEADER + GOOD_ROWS + long_row).replace("\n", "\r\n")
    train, dev = tmp_path / "train.csv", tmp_path / "dev.csv"
    train.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    dev.write_bytes(b"\xef\xbb\xbf" + (HEADER + GOOD_ROWS).replace("\n", "\r\n").encode("utf-8"))
    proc = run_train(tmp_path, *data_overrides(train, dev), "training.max_steps=2", "evaluation.eval_steps=100",
                     "training.output_dir=out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"warning: {train}: 1 of 21 dialogues are longer than model.max_source_length=128" in proc.stdout
    assert "21 train / 20 dev rows" in proc.stdout
