"""What the leaderboard scores: multi-reference ROUGE, rouge_mean, and input cleaning, from config to a real run.

One tiny real run trains on dialogues full of laughter (`ㅋㅋ`, `ㅎㅎㅎ`) with data.clean_patterns, evaluates on
a dev file with three references per row (one of them empty in a row) combined by max, and keeps the best model by
rouge_mean; its logs, files and W&B run are read back, and `predict` on its best model is checked against what
training encoded.
"""

from __future__ import annotations

import csv
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loop import resume
from loop.config import load_config
from loop.errors import UserError
from loop.evaluation import EvalResult, write_predictions
from loop.wandb_offline import find_offline_runs, history_series, read_offline_run
from tests.conftest import ROOT, run_train, train_env
from tests.test_runs import ITEMS

PATTERNS = ["ㅋ{2,}", "ㅎ{2,}"]
REFERENCES = ["summary1", "summary2", "summary3"]


# ---- config ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "message"), [
    ("data.clean_patterns=['ㅋ{2,}', '(ㅎ']", "`data.clean_patterns[1]` = '(ㅎ' is not a valid regular expression "
                                              "(missing ), unterminated subpattern at position 0)"),
    ("data.clean_patterns=['ㅋ*']", "`data.clean_patterns[0]` = 'ㅋ*' matches the empty string"),
    ("data.clean_patterns=['']", "`data.clean_patterns[0]` must be a non-blank string"),
    ("data.reference_columns=[]", "`data.reference_columns` must name at least one column"),
    ("data.reference_columns=['summary1', 'summary1']", "`data.reference_columns` names a column twice"),
    ("data.reference_columns=['dialogue']", "must not include the id or dialogue column, got 'dialogue'"),
    ("evaluation.rouge_aggregate=median", "`evaluation.rouge_aggregate` must be one of 'mean', 'max'"),
])
def test_bad_settings_are_one_line_naming_the_key(override, message):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_bad_pattern_in_a_config_file_stops_the_trainer_in_one_line(tmp_path):
    (tmp_path / "c.toml").write_text("[data]\nclean_patterns = ['ㅋ{2,}', 'ㅠ[']\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "loop/train.py"), "--config", str(tmp_path / "c.toml")],
                          cwd=tmp_path, capture_output=True, text=True, env=train_env(), timeout=300)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: {tmp_path / 'c.toml'}: `data.clean_patterns[1]` = 'ㅠ[' is not a valid regular expression "
        "(unterminated character set at position 1)"]
    assert not (tmp_path / "outputs").exists()


def test_rouge_mean_picks_the_best_model_when_asked_and_base_keeps_rouge_l():
    cfg = load_config(None, ["evaluation.metric_for_best_model=rouge_mean"])
    assert cfg.evaluation.greater_is_better
    with pytest.raises(UserError, match="greater_is_better = false` with a ROUGE metric would keep the worst"):
        load_config(None, ["evaluation.metric_for_best_model=rouge_mean", "evaluation.greater_is_better=false"])
    base = load_config(ROOT / "configs/base.toml")
    assert (base.evaluation.metric_for_best_model, base.evaluation.rouge_aggregate) == ("rouge_l", "mean")
    assert base.data.reference_columns == ["summary"] and base.data.clean_patterns == []


def test_a_resume_refuses_a_change_of_references_aggregation_or_cleaning():
    for key in ("data.reference_columns", "data.clean_patterns", "evaluation.rouge_aggregate"):
        assert resume.rule(key)[0] == resume.REFUSE, key


# ---- the predictions file ----------------------------------------------------------------------------------

def read_csv(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def test_predictions_file_has_one_reference_column_per_reference(tmp_path):
    examples = [{"id": "a"}, {"id": "b"}]
    one = EvalResult({}, ["p1", "p2"], ["r1", "r2"], [0, 1], [0.5, 0.25], [["r1"], ["r2"]])
    write_predictions(tmp_path / "one.csv", one, examples)
    assert read_csv(tmp_path / "one.csv") == [["fname", "prediction", "reference", "rouge_l"],
                                              ["a", "p1", "r1", "0.500000"], ["b", "p2", "r2", "0.250000"]]
    three = EvalResult({}, ["p1", "p2"], ["r1", "s2"], [1, 0], [0.5, 0.25], [["r1", "", "r3"], ["", "s2", "s3"]])
    write_predictions(tmp_path / "three.csv", three, examples)
    assert read_csv(tmp_path / "three.csv") == [
        ["fname", "prediction", "reference1", "reference2", "reference3", "rouge_l"],
        ["b", "p1", "r1", "", "r3", "0.500000"], ["a", "p2", "", "s2", "s3", "0.250000"]]


# ---- a real run --------------------------------------------------------------------------------------------

def laughing(item: str, count: int) -> str:
    """An ordering dialogue with laughter that data.clean_patterns removes."""
    return f"#Person1#: {item} {count}개 주세요ㅋㅋ\n#Person2#: 네ㅎㅎㅎ {item} {count}개 여기 있습니다.\nㅋㅋㅋ"


def write_data(root: Path) -> None:
    """train.csv (fname,dialogue,summary) and dev.csv (fname,dialogue,summary1..3: no `summary` column)."""
    for name, rows, seed in (("train", 64, 0), ("dev", 4, 1)):
        rng = random.Random(seed)
        with (root / f"{name}.csv").open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["fname", "dialogue", "summary"] if name == "train" else
                            ["fname", "dialogue", *REFERENCES])
            for i in range(rows):
                item, count = rng.choice(ITEMS), rng.randint(1, 3)
                summary = f"#Person1#이 {item} {count}개를 주문했다."
                others = [f"{item} {count}개 주문", "" if i == 0 else f"#Person2#가 {item}를 건넸다."]
                writer.writerow([f"{name}_{i:03d}", laughing(item, count), summary,
                                 *(others if name == "dev" else [])])


OVERRIDES = ["data.synthetic=false", "data.train_file=train.csv", "data.dev_file=dev.csv",
             "training.max_steps=8", "evaluation.eval_steps=4", "evaluation.logging_steps=2",
             "evaluation.save_steps=100", "training.warmup_ratio=0", "training.learning_rate=0.03",
             "training.output_dir=run", "evaluation.metric_for_best_model=rouge_mean",
             "evaluation.rouge_aggregate=max", f"data.reference_columns={json.dumps(REFERENCES)}",
             f"data.clean_patterns={json.dumps(PATTERNS, ensure_ascii=False)}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("leaderboard")
    write_data(root)
    proc = run_train(root, *OVERRIDES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = root / "run"
    logged = [json.loads(line) for line in (out / "eval_metrics.jsonl").read_text().splitlines()]
    return {"root": root, "out": out, "proc": proc, "logged": logged,
            "wandb": read_offline_run(find_offline_runs(out)[0])}


def test_rouge_mean_is_logged_at_every_eval(run):
    wb = run["wandb"]
    series = {key: dict(history_series(wb, f"eval/{key}")) for key in ("rouge_1", "rouge_2", "rouge_l", "rouge_mean")}
    assert sorted(series["rouge_mean"]) == [0, 4, 8]
    for step, value in series["rouge_mean"].items():
        parts = [series[key][step] for key in ("rouge_1", "rouge_2", "rouge_l")]
        assert value == pytest.approx(sum(parts) / 3, abs=1e-12)
    assert max(series["rouge_mean"].values()) > 0  # a run that scores 0 everywhere would prove little
    for row in run["logged"]:  # eval_metrics.jsonl
        assert row["rouge_mean"] == pytest.approx((row["rouge_1"] + row["rouge_2"] + row["rouge_l"]) / 3)
        assert row["rouge_mean"] == pytest.approx(series["rouge_mean"][row["step"]])


def test_best_model_is_chosen_by_rouge_mean(run):
    best = max(run["logged"], key=lambda row: row["rouge_mean"])  # the first eval that reached the max
    metrics = json.loads((run["out"] / "best/metrics.json").read_text())
    assert metrics["step"] == best["step"] and metrics["rouge_mean"] == pytest.approx(best["rouge_mean"])
    assert run["wandb"].summary["best/rouge_mean"] == pytest.approx(best["rouge_mean"])
    assert run["proc"].stdout.strip().splitlines()[-1].startswith("done: best eval/rouge_mean = ")


def score(*args: str, cwd: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "loop.score", *args], cwd=cwd, capture_output=True, text=True,
                          env=train_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_eval_uses_every_reference_combined_by_max_as_score_does(run):
    differs = False
    for row in run["logged"]:
        step_csv = run["out"] / f"predictions/step_{row['step']}.csv"
        assert read_csv(step_csv)[0] == ["fname", "prediction", "reference1", "reference2", "reference3", "rouge_l"]
        # The step file's own reference1..3 and dev.csv's summary1..3, found on their own, both give the run's
        # logged numbers under the run's aggregation.
        for extra in ([], ["--references", str(run["root"] / "dev.csv")]):
            scores = score("--predictions", str(step_csv), "--aggregate", "max", *extra, cwd=run["root"])
            assert scores["references"] == 3 and scores["n"] == 4
            for key in ("rouge_1", "rouge_2", "rouge_l", "rouge_mean"):
                assert scores[key] == pytest.approx(row[key], abs=1e-6), (step_csv, key)
            assert scores["rouge_mean_x100"] == pytest.approx(100 * row["rouge_mean"], abs=1e-4)
        mean = score("--predictions", str(step_csv), "--aggregate", "mean", cwd=run["root"])
        differs = differs or abs(mean["rouge_mean"] - row["rouge_mean"]) > 1e-3
    assert differs  # the mean of the references scores the same predictions differently: max was used


def test_eval_samples_table_shows_the_cleaned_dialogues(run):
    tables = sorted(Path(run["wandb"].path).glob("files/media/table/eval/samples_*.table.json"))
    assert len(tables) == 3  # steps 0, 4, 8
    for table in tables:
        data = json.loads(table.read_text(encoding="utf-8"))
        dialogues = [row[data["columns"].index("dialogue")] for row in data["data"]]
        assert dialogues and all("ㅋ" not in d and "ㅎ" not in d for d in dialogues), table


def test_training_and_predict_see_the_same_cleaned_dialogues(run, tmp_path, monkeypatch, capsys):
    from accelerate import Accelerator
    from transformers import AutoTokenizer, BartForConditionalGeneration

    from loop import predict
    from loop.data import clean_dialogue
    from loop.errors import run_cli
    from loop.evaluation import decode
    from loop.train import load_data

    best = run["out"] / "best"
    tokenizer = AutoTokenizer.from_pretrained(best)
    # What the training loop reads and tokenizes (its own load_data, with the run's config and tokenizer).
    monkeypatch.chdir(run["root"])
    cfg = load_config(run["out"] / "config.toml", [f"model.tokenizer={best}"])
    assert cfg.data.clean_patterns == PATTERNS
    _, train_rows, dev_rows, train_ds, dev_ds, _ = load_data(cfg, Accelerator(cpu=True), tmp_path / "unused")
    for row in (*train_rows, *dev_rows):
        assert "ㅋ" not in row["dialogue"] and "ㅎ" not in row["dialogue"] and row["dialogue"].count("\n") == 1
    assert decode(tokenizer, train_ds["input_ids"]) == decode(
        tokenizer, tokenizer([r["dialogue"] for r in train_rows], add_special_tokens=False)["input_ids"])
    trained = decode(tokenizer, dev_ds["input_ids"])

    # predict with a stand-in generate() that answers each dialogue with its own input ids.
    monkeypatch.setattr(BartForConditionalGeneration, "generate", lambda self, input_ids=None, **kw: input_ids)
    with (run["root"] / "dev.csv").open(encoding="utf-8", newline="") as f:
        noisy = [(r["fname"], r["dialogue"]) for r in csv.DictReader(f)]
    source = tmp_path / "test.csv"
    with source.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("fname", "dialogue"), *noisy])
    assert run_cli(predict.main, ["--model", str(best), "--input", str(source), "--output",
                                  str(tmp_path / "sub.csv")]) == 0, capsys.readouterr().err
    predicted = [summary for _, summary in read_csv(tmp_path / "sub.csv")[1:]]
    assert predicted == trained
    # Not a tokenizer that drops the laughter by itself: uncleaned, the same dialogues encode differently.
    raw = decode(tokenizer, tokenizer([d for _, d in noisy], add_special_tokens=False)["input_ids"])
    cleaned = [clean_dialogue(d, [re.compile(p) for p in PATTERNS]) for _, d in noisy]
    assert raw != predicted
    assert decode(tokenizer, tokenizer(cleaned, add_special_tokens=False)["input_ids"]) == predicted
