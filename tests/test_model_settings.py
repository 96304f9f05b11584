"""best/loop_config.toml: a best/ copied away from its run (or downloaded) predicts exactly as it does in place,
with the run's source prefix, lengths and cleaning; a damaged file is one line; an older best/ works as before."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, T5Tokenizer

from loop import decode_search, predict
from loop.config import load_config
from loop.errors import UserError, run_cli
from loop.model_settings import SETTINGS_FILE
from tests.conftest import run_train
from tests.test_families import PREFIX, t5_config, unigram_vocab

# Settings that change the model's inputs and that an older best/ copied away from its run would lose.
SHAPING = [f"model.source_prefix={PREFIX}", "model.max_source_length=40", "data.clean_patterns=['[?!.]']"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 2-step tiny T5 run trained with a source prefix, a short source length and a clean pattern."""
    root = tmp_path_factory.mktemp("t5-settings")
    tokenizer = T5Tokenizer(vocab=unigram_vocab(("<pad>", "</s>", "<unk>")), extra_ids=0)
    torch.manual_seed(0)
    AutoModelForSeq2SeqLM.from_config(t5_config(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    proc = run_train(root, "model.from_scratch=false", "model.tokenizer=", f"model.name_or_path={root / 'model'}",
                     *SHAPING, "data.synthetic_train_rows=32", "data.synthetic_dev_rows=6",
                     "training.learning_rate=0.01", "training.max_steps=2", "evaluation.eval_steps=2",
                     "evaluation.save_steps=100", "evaluation.eval_on_start=false", "evaluation.rouge_tokenizer=char",
                     "generation.max_new_tokens=8", "generation.no_repeat_ngram_size=2",
                     "training.output_dir=run", "wandb.mode=disabled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(root / "model")  # what the run started from is gone, as on another machine
    return root / "run"


@pytest.fixture
def dev(run) -> Path:
    return run.parent / "data/demo/dev.csv"


def copied(run: Path, where: Path, with_file: bool = True) -> Path:
    """best/ copied into a directory with no run around it (as a W&B download is), with or without the file."""
    where.mkdir(parents=True)
    copy = Path(shutil.copytree(run / "best", where / "model"))
    if not with_file:
        (copy / SETTINGS_FILE).unlink()
    return copy


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = run_cli(predict.main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def summaries(path: Path) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return [(r["fname"], r["summary"]) for r in csv.DictReader(f)]


def dialogues(dev: Path) -> list[str]:
    return [r["dialogue"] for r in csv.DictReader(dev.open(encoding="utf-8", newline=""))]


def test_the_export_holds_the_runs_resolved_settings(run):
    saved = load_config(run / "best" / SETTINGS_FILE)
    assert (saved.model.source_prefix, saved.model.max_source_length, saved.data.clean_patterns) == \
        ("summarize:", 40, ["[?!.]"])
    # The same settings as the run's config.toml; only the short name is written out (it names runs and tags).
    expected = load_config(run / "config.toml").to_dict()
    expected["model"]["short_name"] = "model"
    assert saved.to_dict() == expected


def test_a_copied_best_predicts_exactly_as_in_place(run, dev, tmp_path, capsys):
    copy = copied(run, tmp_path / "elsewhere")
    cfg, source = predict.load_settings(copy, [])
    assert source == str(copy / SETTINGS_FILE)
    assert (cfg.model.source_prefix, cfg.model.max_source_length, cfg.data.clean_patterns) == \
        ("summarize:", 40, ["[?!.]"])
    assert cfg.model.name_or_path == str(copy.resolve()) and cfg.model.tokenizer == ""  # never the gone model/
    assert cfg.generation.no_repeat_ngram_size == 2
    code, out, err = cli(["--model", str(run / "best"), "--input", str(dev), "--output", str(tmp_path / "here.csv")],
                         capsys)
    assert code == 0, err
    assert f"(from {run / 'best' / SETTINGS_FILE})" in out
    code, out, err = cli(["--model", str(copy), "--input", str(dev), "--output", str(tmp_path / "there.csv")], capsys)
    assert code == 0, err
    assert f"(from {copy / SETTINGS_FILE})" in out
    here = summaries(tmp_path / "here.csv")
    assert len(here) == 6 and summaries(tmp_path / "there.csv") == here
    # The consensus path reads each model's settings the same way: the copy agrees with the original everywhere.
    code, _, err = cli(["--model", str(run / "best"), "--model", str(copy), "--input", str(dev),
                        "--output", str(tmp_path / "both.csv")], capsys)
    assert code == 0, err
    assert summaries(tmp_path / "both.csv") == here


def test_without_the_file_a_copy_loses_the_settings_that_shape_its_inputs(run, dev, tmp_path):
    """What the file prevents: an older best/ copied away gets other inputs than the model was trained on."""
    texts = dialogues(dev)
    best = run / "best"
    cfg, source = predict.load_settings(best, [])
    trained = predict.load_member(best, cfg, source, texts).inputs
    old = copied(run, tmp_path / "old", with_file=False)
    cfg, source = predict.load_settings(old, [])
    assert source == str(old / "generation_config.json")
    assert (cfg.model.source_prefix, cfg.model.max_source_length, cfg.data.clean_patterns) == ("", 128, [])
    assert predict.load_member(old, cfg, source, texts).inputs != trained
    copy = copied(run, tmp_path / "new")
    cfg, source = predict.load_settings(copy, [])
    assert predict.load_member(copy, cfg, source, texts).inputs == trained


def test_set_still_applies_on_top_of_the_file(run, tmp_path):
    copy = copied(run, tmp_path / "elsewhere")
    cfg, _ = predict.load_settings(copy, ["model.source_prefix=요약:", "generation.num_beams=3"])
    assert (cfg.model.source_prefix, cfg.generation.num_beams, cfg.model.max_source_length) == ("요약:", 3, 40)
    with pytest.raises(UserError, match=r"--set training.seed: prediction can change only"):
        predict.load_settings(copy, ["training.seed=7"])


@pytest.mark.parametrize(("content", "message"), [
    (b"[model\nsource_prefix = 1", "damaged: invalid TOML"),
    (b"\xff\xfe[model]", "damaged: not UTF-8 text"),
    (b"[generation]\nnum_beams = 0\n", "`generation.num_beams` must be ≥ 1, got 0"),
    (b"[model]\nsource_prefixx = 'summarize:'\n", "unknown key `model.source_prefixx`"),
    (b'extends = "../../config.toml"\n', "`extends` is not allowed"),
])
def test_a_damaged_settings_file_is_one_line_naming_it_and_nothing_is_written(run, dev, tmp_path, capsys, content,
                                                                             message):
    copy = copied(run, tmp_path / "elsewhere")
    (copy / SETTINGS_FILE).write_bytes(content)
    output = tmp_path / "sub.csv"
    output.write_text("older\n", encoding="utf-8")
    code, out, err = cli(["--model", str(copy), "--input", str(dev), "--output", str(output)], capsys)
    assert code == 2 and not out
    assert err.startswith(f"error: {copy / SETTINGS_FILE}: ") and message in err and err.count("\n") == 1, err
    assert output.read_text(encoding="utf-8") == "older\n"


def test_an_older_best_without_the_file_works_as_before(run, dev, tmp_path, capsys):
    old = copied(run, tmp_path / "elsewhere", with_file=False)
    code, out, err = cli(["--model", str(old), "--input", str(dev), "--output", str(tmp_path / "sub.csv"),
                          "--set", f"model.source_prefix={PREFIX}"], capsys)
    assert code == 0, err
    assert f"(from {old / 'generation_config.json'})" in out and "no_repeat_ngram_size=2" in out
    assert len(summaries(tmp_path / "sub.csv")) == 6
    # Inside its run, an older best/ takes the run's config.toml.
    run_copy = Path(shutil.copytree(run, tmp_path / "run"))
    (run_copy / "best" / SETTINGS_FILE).unlink()
    cfg, source = predict.load_settings(run_copy / "best", [])
    assert source == str(run_copy / "config.toml") and cfg.model.source_prefix == "summarize:"


def test_decode_search_on_a_copy_scores_as_on_the_original(run, dev, tmp_path):
    (tmp_path / "grid.toml").write_text('method = "grid"\n[metric]\nname = "eval/rouge_mean"\ngoal = "maximize"\n'
                                        "[parameters.num_beams]\nvalues = [1, 2]\n", encoding="utf-8")
    copy = copied(run, tmp_path / "elsewhere")
    results = []
    for model, out in ((run / "best", tmp_path / "here"), (copy, tmp_path / "there")):
        assert run_cli(decode_search.main, ["--model", str(model), "--data", str(dev), "--sweep",
                                            str(tmp_path / "grid.toml"), "--output", str(out)]) == 0
        with (out / "results.csv").open(encoding="utf-8", newline="") as f:
            # The grid's order (and so rank among ties and setting names) is drawn per search: key by the values.
            results.append({(r["setting"] == "model's own", r["num_beams"]): {
                k: v for k, v in r.items() if k not in ("seconds", "rank", "setting")} for r in csv.DictReader(f)})
    assert len(results[0]) == 3 and results[1] == results[0]
