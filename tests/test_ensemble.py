"""`predict` with several --model: the consensus choice (loop/consensus.py) and how predict wires it in."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loop import consensus, predict
from loop.errors import run_cli
from tests.conftest import ROOT, run_train
from tests.test_predict import DIALOGUES, read_output, write_inputs
from tests.test_runs import write_order_data

# The commit before predict took several models: the single-model path it had is the reference for one --model.
SINGLE_MODEL_COMMIT = "6146d77"
ROWS = DIALOGUES[:6]
SHORT = ("--batch-size", "2", "--set", "generation.max_new_tokens=6")  # short summaries keep these tests quick


def test_two_agreeing_candidates_beat_the_odd_one_hand_computed():
    # "가 나 다" vs "가 나 라" (whitespace tokens): ROUGE-1 F1 2/3, ROUGE-2 1/2, ROUGE-L 2/3 -> mean 11/18.
    index, scores = consensus.choose(["가 나 라", "가 나 다", "가 나 다"], "whitespace")
    assert index == 1  # candidates 1 and 2 tie at (1 + 11/18) / 2; the earlier one wins
    assert scores == pytest.approx([11 / 18, 29 / 36, 29 / 36], abs=1e-12)


def test_ties_go_to_the_first_candidate_and_one_candidate_is_chosen_alone():
    assert consensus.choose(["나", "가"], "whitespace") == (0, [0.0, 0.0])  # order, not the text, breaks ties
    assert consensus.choose(["가", "나"], "whitespace") == (0, [0.0, 0.0])
    assert consensus.choose(["아무 요약"], "mecab") == (0, [1.0])
    assert consensus.choose(["", ""], "whitespace") == (0, [1.0, 1.0])  # identical, even empty, is agreement
    assert consensus.choose(["", "가 나", "가 나"], "whitespace") == (1, [0.0, 0.5, 0.5])


def test_the_choice_is_deterministic_and_uses_the_projects_rouge():
    from loop.rouge import compute_rouge

    candidates = ["#Person1#이 김밥 2개를 주문했다.", "#Person1#이 김밥을 주문했다.", "#Person2#가 라면을 샀다."]
    first = consensus.choose(candidates, "mecab")
    assert all(consensus.choose(candidates, "mecab") == first for _ in range(3))
    r01, r02, r12 = (compute_rouge([candidates[a]], [candidates[b]], "mecab").rouge_mean
                     for a, b in ((0, 1), (0, 2), (1, 2)))
    assert first[1] == [(r01 + r02) / 2, (r01 + r12) / 2, (r02 + r12) / 2]
    assert first[0] == max(range(3), key=lambda i: (first[1][i], -i))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A real 4-step run's best/ ("quiet": it generates empty summaries), a noisy copy of it that writes text
    ("noisy"), and a byte-for-byte copy of the noisy one in another directory ("twin")."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    root = tmp_path_factory.mktemp("ensemble")
    write_order_data(root / "train.csv", 64, seed=0)
    write_order_data(root / "dev.csv", 4, seed=1)
    proc = run_train(root, "data.synthetic=false", "data.train_file=train.csv", "data.dev_file=dev.csv",
                     "training.max_steps=4", "evaluation.eval_steps=4", "evaluation.eval_on_start=false",
                     "evaluation.save_steps=100", "training.learning_rate=0.03", "training.output_dir=run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    quiet, noisy = root / "run/best", root / "noisy"
    shutil.copytree(quiet, noisy)
    model = AutoModelForSeq2SeqLM.from_pretrained(quiet)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(noisy)
    shutil.copytree(noisy, root / "twin")
    return {"quiet": quiet, "noisy": noisy, "twin": root / "twin", "root": root}


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = run_cli(predict.main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def predict_with(models: dict[str, Path], names: list[str], tmp_path: Path, capsys, *extra: str) -> tuple[str, Path]:
    source = tmp_path / "test.csv"
    if not source.exists():
        write_inputs(source, ROWS)
    argv = [x for name in names for x in ("--model", str(models[name]))]
    code, out, err = cli([*argv, "--input", str(source), "--output", str(tmp_path / "sub.csv"),
                          *SHORT, *extra], capsys)
    assert code == 0, err
    return out, tmp_path / "sub.csv"


def read_choices(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def test_one_model_writes_what_the_single_model_predict_wrote(models, tmp_path, capsys):
    source = write_inputs(tmp_path / "test.csv", ROWS)
    old = subprocess.run(["git", "show", f"{SINGLE_MODEL_COMMIT}:loop/predict.py"], cwd=ROOT, capture_output=True)
    if old.returncode != 0:
        pytest.skip(f"git history with commit {SINGLE_MODEL_COMMIT} is not available")
    (tmp_path / "old_predict.py").write_bytes(old.stdout)
    proc = subprocess.run([sys.executable, str(tmp_path / "old_predict.py"), "--model", str(models["noisy"]),
                           "--input", str(source), "--output", str(tmp_path / "old.csv"), *SHORT],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out, sub = predict_with(models, ["noisy"], tmp_path, capsys, "--choices", str(tmp_path / "choices.csv"))
    assert sub.read_bytes() == (tmp_path / "old.csv").read_bytes()
    assert any(summary for _, summary in read_output(sub))  # the comparison is not between empty files
    assert "consensus:" not in out  # no rule to state for one model
    assert read_choices(tmp_path / "choices.csv") == [
        ["fname", "model_index", "model_path", "score_0"],
        *([fname, "0", str(models["noisy"]), "1.0"] for fname, _ in ROWS)]


def test_two_copies_of_one_model_tie_everywhere_and_the_first_wins(models, tmp_path, capsys):
    _, alone = predict_with(models, ["noisy"], tmp_path, capsys)
    expected = alone.read_bytes()
    out, sub = predict_with(models, ["noisy", "twin"], tmp_path, capsys, "--choices", str(tmp_path / "ch.csv"))
    assert sub.read_bytes() == expected
    assert out.count("consensus: ") == 1 and "ties go to the earliest --model" in out
    assert "mean of ROUGE-1/2/L F1, tokenizer mecab" in out  # the first run's evaluation.rouge_tokenizer
    assert f"chosen: model 0 on {len(ROWS)} rows, model 1 on 0 rows" in out
    assert {(row[1], row[3], row[4]) for row in read_choices(tmp_path / "ch.csv")[1:]} == {("0", "1.0", "1.0")}


def test_choices_record_the_winner_and_every_candidates_score(models, tmp_path, capsys):
    _, sub = predict_with(models, ["noisy"], tmp_path, capsys)
    noisy = read_output(sub)
    _, sub = predict_with(models, ["quiet"], tmp_path, capsys)
    quiet = read_output(sub)
    assert all(not s for _, s in quiet) and all(noisy_s for _, noisy_s in noisy)
    # quiet's empty summary agrees with neither noisy candidate (0.0); the two identical noisy ones agree (1.0).
    out, sub = predict_with(models, ["quiet", "noisy", "twin"], tmp_path, capsys, "--choices",
                            str(tmp_path / "ch.csv"))
    assert read_output(sub) == noisy
    assert read_choices(tmp_path / "ch.csv") == [
        ["fname", "model_index", "model_path", "score_0", "score_1", "score_2"],
        *([fname, "1", str(models["noisy"]), "0.0", "0.5", "0.5"] for fname, _ in ROWS)]
    assert f"model 0 on 0 rows, model 1 on {len(ROWS)} rows, model 2 on 0 rows" in out


def test_two_processes_choose_as_one_does(models, tmp_path, capsys):
    names = ["quiet", "noisy", "twin"]
    predict_with(models, names, tmp_path, capsys, "--choices", str(tmp_path / "ch.csv"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(ROOT / "loop/predict.py"), *[x for name in names for x in ("--model", str(models[name]))],
           "--input", str(tmp_path / "test.csv"), "--output", str(tmp_path / "sub2.csv"),
           "--choices", str(tmp_path / "ch2.csv"), *SHORT]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout and proc.stdout.count("consensus: ") == 1
    assert (tmp_path / "sub2.csv").read_bytes() == (tmp_path / "sub.csv").read_bytes()
    assert (tmp_path / "ch2.csv").read_bytes() == (tmp_path / "ch.csv").read_bytes()


@pytest.mark.parametrize(("extra", "message"), [
    (["--model", "{quiet}", "--model", "{run}"], "the same model as --model {quiet} (model 0); give each model once"),
    (["--model", "{quiet}", "--choices", "{tmp}/missing/ch.csv"], "--choices {tmp}/missing/ch.csv: {tmp}/missing "
                                                                  "does not exist; create it first"),
    (["--model", "{quiet}", "--choices", "{tmp}/out.csv"], "--choices {tmp}/out.csv: is the --output file"),
    (["--model", "{quiet}", "--model", "{broken}"], "model.safetensors: damaged or truncated"),
])
def test_bad_input_is_one_line_before_any_generation_and_writes_nothing(models, tmp_path, capsys, monkeypatch,
                                                                        extra, message):
    from transformers import BartForConditionalGeneration

    def no_generation(*_, **__):
        raise AssertionError("generate() ran before every model was checked")

    monkeypatch.setattr(BartForConditionalGeneration, "generate", no_generation)
    broken = tmp_path / "broken"
    shutil.copytree(models["quiet"], broken)
    with (broken / "model.safetensors").open("r+b") as f:
        f.truncate(1000)
    source = write_inputs(tmp_path / "test.csv", DIALOGUES[:2])
    paths = {"quiet": models["quiet"], "run": models["quiet"].parent, "broken": broken, "tmp": tmp_path}
    argv = [x.format(**paths) for x in extra]
    code, _, err = cli([*argv, "--input", str(source), "--output", str(tmp_path / "out.csv")], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert message.format(**paths) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "test.csv"]
