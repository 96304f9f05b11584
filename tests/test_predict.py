"""`python -m loop.predict`: a submission file from a real run's best model, in input order, on 1 or 2 processes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForSeq2SeqLM

from loop import evaluation, predict
from loop.data import with_bos_eos
from loop.errors import run_cli
from tests.conftest import ROOT, run_train
from tests.test_runs import ITEMS, write_order_data

# Lengths deliberately out of order (so batches are re-sorted) and ids that are not sorted either.
DIALOGUES = [
    (f"q{(7 * i) % 11:02d}",
     f"#Person1#: {ITEMS[i % len(ITEMS)]} {i % 3 + 1}개 주세요.\n#Person2#: 네, {ITEMS[3 * i % len(ITEMS)]} 있어요."
     + "\n#Person1#: 감사합니다." * (5 * i % 7))
    for i in range(11)
]
# Run as `accelerate launch ECHO_PREDICT ...`: loop.predict with a model that answers each dialogue with itself.
ECHO_PREDICT = """
import os
import sys
import time
from transformers import BartForConditionalGeneration
from loop import predict
from loop.errors import run_cli
BartForConditionalGeneration.generate = lambda self, input_ids=None, **kwargs: input_ids  # as echo() below
if os.environ.get("ECHO_PREDICT_FULL_DISK"):  # the disk fills up while generating
    def full(path, rows, header=None):
        raise OSError(28, "No space left on device")
    predict.write_csv_atomic = full
start = time.monotonic()
code = run_cli(predict.main)
if os.environ.get("ECHO_PREDICT_FULL_DISK"):  # each process says how it ended; the main one waits for the other's
    if os.environ.get("RANK") == "1":
        with open("rank1.exit", "w") as f:
            f.write(str(code))
    while os.environ.get("RANK") == "0" and not os.path.exists("rank1.exit") and time.monotonic() < start + 30:
        time.sleep(0.1)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real 4-step run on the ordering data; its best/ is the step-4 model."""
    root = tmp_path_factory.mktemp("predict")
    write_order_data(root / "train.csv", 64, seed=0)
    write_order_data(root / "dev.csv", 4, seed=1)
    proc = run_train(root, "data.synthetic=false", "data.train_file=train.csv", "data.dev_file=dev.csv",
                     "training.max_steps=4", "evaluation.eval_steps=4", "evaluation.eval_on_start=false",
                     "evaluation.save_steps=100", "training.learning_rate=0.03", "training.output_dir=run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def echo(self, input_ids=None, **kwargs):
    """A stand-in for generate(): every dialogue is its own summary, so a row given another row's summary shows."""
    return input_ids


def write_inputs(path: Path, rows: list[tuple[str, str]]) -> Path:
    """A prediction input: CSV with fname,dialogue (no summary), or JSONL by suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"fname": f, "dialogue": d}, ensure_ascii=False) + "\n" for f, d in rows),
                        encoding="utf-8")
        return path
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fname", "dialogue"])
        writer.writerows(rows)
    return path


def read_output(path: Path) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["fname", "summary"]
    return [tuple(r) for r in rows[1:]]


def one_by_one(model_dir: Path, dialogues: list[str], **generation) -> list[str]:
    """Summaries generated for each dialogue alone (no batching, no padding, no sorting), as training encodes."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from loop.evaluation import decode

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for text in dialogues:
        ids = with_bos_eos(tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.bos_token_id,
                            tokenizer.eos_token_id, model.config.max_position_embeddings)
        with torch.no_grad():
            out += decode(tokenizer, model.generate(input_ids=torch.tensor([ids]), **generation))
    return out


@pytest.fixture(scope="module")
def echoed(run_dir) -> list[tuple[str, str]]:
    """What each input row should get from `echo`: its own dialogue, through the tokenizer and back."""
    from transformers import AutoTokenizer

    from loop.evaluation import decode

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "best")
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for _, d in DIALOGUES]
    assert max(len(i) for i in ids) + 2 <= 128  # nothing truncated at the tiny run's max_source_length
    rows = [(f, s) for (f, _), s in zip(DIALOGUES, decode(tokenizer, ids), strict=True)]
    assert len({s for _, s in rows}) == len(rows)
    return rows


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = run_cli(predict.main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_rows_come_back_in_input_order_with_their_own_summaries(run_dir, echoed, tmp_path, capsys, monkeypatch):
    from transformers import BartForConditionalGeneration

    monkeypatch.setattr(BartForConditionalGeneration, "generate", echo)
    source = write_inputs(tmp_path / "test.csv", DIALOGUES)
    code, out, err = cli(["--model", str(run_dir / "best"), "--input", str(source), "--output",
                          str(tmp_path / "submission.csv"), "--batch-size", "3"], capsys)
    assert code == 0, err
    assert read_output(tmp_path / "submission.csv") == echoed
    assert f"wrote {len(DIALOGUES)} summaries" in out


def test_batched_generation_equals_one_dialogue_at_a_time(run_dir, tmp_path, capsys):
    source = write_inputs(tmp_path / "test.csv", DIALOGUES)
    code, out, err = cli(["--model", str(run_dir / "best"), "--input", str(source), "--output",
                          str(tmp_path / "submission.csv"), "--batch-size", "4"], capsys)
    assert code == 0, err
    assert "num_beams=1 max_new_tokens=24" in out and "config.toml" in out  # the run's [generation]
    alone = one_by_one(run_dir / "best", [d for _, d in DIALOGUES])
    assert read_output(tmp_path / "submission.csv") == [(f, s) for (f, _), s in zip(DIALOGUES, alone, strict=True)]


def test_two_processes_under_accelerate_launch_keep_input_order(run_dir, echoed, tmp_path):
    source = write_inputs(tmp_path / "test.csv", DIALOGUES)
    script = tmp_path / "echo_predict.py"
    script.write_text(ECHO_PREDICT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(script),
           "--model", str(run_dir / "best"), "--input", str(source), "--output", str(tmp_path / "sub.csv"),
           "--batch-size", "2"]
    # ACCELERATE_USE_CPU with --multi_gpu is a real 2-process gloo group on a CPU (see shared notes).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout and proc.stdout.count("wrote ") == 1  # only the main process writes
    assert read_output(tmp_path / "sub.csv") == echoed
    # A write that fails on the main process: the launch fails, the error is said once (the launcher adds its
    # own report of the failed child), nothing is written.
    proc = subprocess.run([*cmd[:-3], str(tmp_path / "full.csv"), *cmd[-2:]], capture_output=True, text=True,
                          env={**env, "ECHO_PREDICT_FULL_DISK": "1"}, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0 and not (tmp_path / "full.csv").exists()
    assert (tmp_path / "rank1.exit").read_text() == "2"  # the other process ended by itself, not by the launcher
    assert proc.stderr.count("error: --output") == 1, proc.stderr[-3000:]
    assert "No space left on device; nothing written" in proc.stderr


def test_set_overrides_the_runs_generation_settings(run_dir, tmp_path, capsys):
    source = write_inputs(tmp_path / "test.jsonl", DIALOGUES[:4])  # JSONL works the same; RUN stands for RUN/best
    code, out, err = cli(["--model", str(run_dir), "--input", str(source), "--output", str(tmp_path / "s.csv"),
                          "--set", "generation.max_new_tokens=3", "--set", "generation.num_beams=2"], capsys)
    assert code == 0, err
    assert "num_beams=2 max_new_tokens=3" in out
    short = one_by_one(run_dir / "best", [d for _, d in DIALOGUES[:4]], max_new_tokens=3, num_beams=2)
    assert read_output(tmp_path / "s.csv") == [(f, s) for (f, _), s in zip(DIALOGUES[:4], short, strict=True)]


def test_settings_come_from_the_export_else_config_toml_else_generation_config_json(run_dir, tmp_path):
    cfg, source = predict.load_settings(run_dir / "best", [])
    assert source == str(run_dir / "best/loop_config.toml") and cfg.generation.max_new_tokens == 24  # the run's
    cfg, _ = predict.load_settings(run_dir / "best", ["generation.num_beams=3"])
    assert cfg.generation.num_beams == 3 and cfg.generation.max_new_tokens == 24
    # An older run's best/ (no loop_config.toml) takes the run's config.toml.
    shutil.copytree(run_dir, tmp_path / "run")
    (tmp_path / "run/best/loop_config.toml").unlink()
    cfg, source = predict.load_settings(tmp_path / "run/best", [])
    assert source == str(tmp_path / "run/config.toml") and cfg.generation.max_new_tokens == 24
    # Copied away from its run, it keeps the settings in generation_config.json (the default would be 80).
    shutil.copytree(tmp_path / "run/best", tmp_path / "best")
    cfg, source = predict.load_settings(tmp_path / "best", ["generation.length_penalty=0.5"])
    assert source.endswith("generation_config.json")
    assert (cfg.generation.max_new_tokens, cfg.generation.length_penalty) == (24, 0.5)
    # A pretrained model's generation_config may allow more new tokens than the demo's from-scratch defaults.
    gen = json.loads((tmp_path / "best/generation_config.json").read_text())
    (tmp_path / "best/generation_config.json").write_text(json.dumps({**gen, "max_new_tokens": 200}))
    cfg, _ = predict.load_settings(tmp_path / "best", [])
    assert cfg.generation.max_new_tokens == 200 and not cfg.model.from_scratch


def test_a_static_kv_cache_gives_the_same_summaries(run_dir, tmp_path, capsys):
    source = write_inputs(tmp_path / "test.csv", DIALOGUES[:5])
    base = ["--model", str(run_dir / "best"), "--input", str(source), "--set", "generation.num_beams=2"]
    code, _, err = cli([*base, "--output", str(tmp_path / "dynamic.csv")], capsys)
    assert code == 0, err
    code, _, err = cli([*base, "--output", str(tmp_path / "static.csv"), "--set", "generation.cache=static"], capsys)
    assert code == 0, err
    assert read_output(tmp_path / "static.csv") == read_output(tmp_path / "dynamic.csv")
    # The setting travels with an older best/ (no loop_config.toml) copied away from its run, through
    # generation_config.json.
    cfg, _ = predict.load_settings(run_dir / "best", ["generation.cache=static"])
    shutil.copytree(run_dir / "best", tmp_path / "best")
    (tmp_path / "best/loop_config.toml").unlink()
    evaluation.generation_config(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "best"), cfg).save_pretrained(
        tmp_path / "best")
    assert predict.load_settings(tmp_path / "best", [])[0].generation.cache == "static"
    assert predict.load_settings(run_dir / "best", [])[0].generation.cache == "dynamic"


def test_length_sorted_batches_cover_every_row_once_longest_first():
    batches = predict.length_sorted_batches([3, 9, 1, 9, 5], 2)
    assert batches == [[1, 3], [4, 0], [2]]


BAD_INPUTS = {
    "missing_column": ("fname,text\na,안녕\n", "missing column(s) dialogue; found fname, text"),
    "empty_dialogue": ("fname,dialogue\na,안녕\nb,  \n", "row 2 (line 3): empty `dialogue`"),
    "empty_fname": ("fname,dialogue\n,안녕\n", "row 1 (line 2): empty `fname`"),
    "duplicate_fname": ("fname,dialogue\na,안녕\na,잘 가\n", "duplicate fname 'a' (first at row 1 (line 2))"),
    "header_only": ("fname,dialogue\n", "no data rows"),
    "not_utf8": (b"fname,dialogue\na,\xb0\xa1\n", "line 2: byte 0xb0 is not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_leaves_the_output_alone(run_dir, tmp_path, capsys, case):
    content, message = BAD_INPUTS[case]
    source = tmp_path / "test.csv"
    source.write_bytes(content if isinstance(content, bytes) else content.encode())
    output = tmp_path / "submission.csv"
    output.write_text("previous submission\n")
    code, _, err = cli(["--model", str(run_dir / "best"), "--input", str(source), "--output", str(output)], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {source}: "), err
    assert message in err
    assert output.read_text() == "previous submission\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv", "test.csv"]


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "{tmp}/nowhere"], "nowhere: model directory not found"),
    (["--model", "{tmp}"], "not a saved model (no config.json)"),
    (["--input", "{tmp}/missing.csv"], "missing.csv: file not found"),
    (["--input", "{tmp}/test.txt"], "data files must be .csv or .jsonl"),
    (["--output", "{tmp}/test.csv"], "is the input file"),
    (["--output", "{tmp}"], "is a directory"),
    (["--set", "training.learning_rate=1"], "prediction can change only generation.*"),
    (["--set", "generation.num_beam=2"], "did you mean `generation.num_beams`?"),
    (["--set", "generation.num_beams=0"], "`generation.num_beams` must be ≥ 1"),
    (["--batch-size", "0"], "--batch-size must be ≥ 1"),
])
def test_bad_arguments_are_one_line_errors(run_dir, tmp_path, capsys, args, message):
    source = write_inputs(tmp_path / "test.csv", DIALOGUES[:2])
    (tmp_path / "test.txt").write_text("x")
    argv = {"--model": str(run_dir / "best"), "--input": str(source), "--output": str(tmp_path / "out.csv")}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        argv[flag] = value.format(tmp=tmp_path)
    code, _, err = cli([x for pair in argv.items() for x in pair], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err
    assert not (tmp_path / "out.csv").exists()


def test_output_is_replaced_atomically(tmp_path, monkeypatch):
    output = tmp_path / "submission.csv"
    output.write_text("previous submission\n")

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        predict.write_csv_atomic(output, [("a", "요약")])
    assert output.read_text() == "previous submission\n"
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]  # no temp file left behind
    monkeypatch.undo()
    predict.write_csv_atomic(output, [("a", "요약, 쉼표"), ("b", "#Person1#이 \"인용\"")])
    assert read_output(output) == [("a", "요약, 쉼표"), ("b", "#Person1#이 \"인용\"")]
