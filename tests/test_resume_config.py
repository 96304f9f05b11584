"""A resume with a changed config: every key is either refused (one line naming the key and both values) or
applied and said in one line; `--resume auto` after a change to the run name says what it found."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomli_w

from loop import resume
from loop.config import Config, _hints_for, _rules_for, all_keys, load_config, tomllib
from loop.errors import UserError
from tests.conftest import finished_run, run_train

DEFAULTS = Config().to_dict()


def default(key: str) -> Any:
    value: Any = DEFAULTS
    for part in key.split("."):
        value = value[part]
    return value


# Keys whose only valid changes need another key changed with them (both are then refused).
COMPANIONS = {"evaluation.greater_is_better": ["evaluation.metric_for_best_model=loss"],
              "model.from_scratch": ["model.tokenizer=some/tokenizer"],
              "data.train_file": ["data.synthetic=false"], "data.dev_file": ["data.synthetic=false"]}


def candidates(key: str, value: Any) -> list[Any]:
    """Other values a user might set for `key` (the first that the config accepts is used)."""
    rules = _rules_for(key)
    if "choices" in rules:
        options = list(rules["choices"])
    elif isinstance(value, bool):
        options = [not value]
    elif isinstance(value, int):
        options = [value + 1, value * 2, value - 1, 64]
    elif isinstance(value, float):
        options = [value / 2, value * 0.9, 0.5, value + 1.0]
    elif isinstance(value, list):
        options = [[*value, "extra-item"]] if _hints_for(key) == list[str] else [[16, 32]]
    elif key.endswith("_file"):
        options = [value.replace("demo", "other")]
    else:
        options = [value + "x", "other"]
    return [v for v in options if v != value]


def changed(key: str) -> tuple[Config, Any]:
    for value in candidates(key, default(key)):
        try:
            raw = value if isinstance(value, str) else tomli_w.dumps({"v": value})[4:].strip()
            override = f"{key}={raw}"
            return load_config(None, [override, *COMPANIONS.get(key, [])]), value
        except UserError:
            continue
    raise AssertionError(f"no valid change found for {key}; extend candidates() or COMPANIONS")


def saved_run(tmp_path: Path) -> Path:
    """A checkpoint path whose run was trained with the default config."""
    (tmp_path / "run/checkpoints/step_1").mkdir(parents=True)
    (tmp_path / "run/config.toml").write_text(Config().to_toml())
    return tmp_path / "run/checkpoints/step_1"


def test_every_config_key_has_a_resume_decision():
    assert {resume.rule(key)[0] for key in all_keys()} <= {resume.REFUSE, resume.APPLY, resume.IGNORE}


@pytest.mark.parametrize("key", all_keys())
def test_each_key_is_refused_or_applied_as_its_rule_says(tmp_path, key):
    ckpt = saved_run(tmp_path)
    cfg, new = changed(key)
    decision, why = resume.rule(key)
    old = default(key)
    if decision == resume.REFUSE:
        with pytest.raises(UserError) as err:
            resume.check_resume(cfg, ckpt, 1, 1)
        if key not in COMPANIONS:  # else the companion key, refused too, may be the one named
            assert f"trained with {key} = {old!r}, the config says {new!r} ({why})" in str(err.value)
    else:
        notes = resume.check_resume(cfg, ckpt, 1, 1)
        expected = [f"note: resuming with {key} = {new!r} (was {old!r}): {why}"] if decision == resume.APPLY else []
        assert notes == expected


def test_the_decisions_that_keep_a_resume_honest():
    refused = ["training.learning_rate", "training.batch_size", "training.gradient_accumulation_steps",
               "training.seed", "training.weight_decay", "training.scheduler", "training.warmup_ratio",
               "model.name_or_path", "model.scratch.d_model", "data.train_file", "data.group_by_length",
               "evaluation.metric_for_best_model", "wandb.name", "wandb.project"]
    applied = ["training.max_steps", "training.num_epochs", "evaluation.eval_steps", "evaluation.save_steps",
               "generation.num_beams", "wandb.tags", "data.num_workers", "training.torch_compile"]
    assert [k for k in refused if resume.rule(k)[0] != resume.REFUSE] == []
    assert [k for k in applied if resume.rule(k)[0] != resume.APPLY] == []


def test_a_different_process_count_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"trained with 2 process\(es\), this launch has 1"):
        resume.check_resume(Config(), saved_run(tmp_path), 2, 1)


BASE = ["training.max_steps=2", "evaluation.save_steps=2", "evaluation.eval_steps=100",
        "evaluation.eval_on_start=false", "wandb.table_rows=0", "training.output_dir=out"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory, "finished", *BASE)


def test_resume_with_a_changed_learning_rate_is_refused_in_one_line(finished):
    proc = run_train(finished, *BASE, "training.learning_rate=0.001", extra_args=("--resume", "out"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert "trained with training.learning_rate = 0.002, the config says 0.001" in lines[0]


def test_resume_with_more_steps_applies_them_and_says_so(finished, tmp_path):
    import shutil

    shutil.copytree(finished / "out", tmp_path / "out")
    proc = run_train(tmp_path, *BASE, "training.max_steps=4", extra_args=("--resume", "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("note: resuming with training.max_steps = 4 (was 2): the learning-rate schedule is rebuilt for the new "
            "length") in proc.stdout
    assert (tmp_path / "out/checkpoints/step_4/manifest.json").exists()
    assert tomllib.loads((tmp_path / "out/config.toml").read_text())["training"]["max_steps"] == 4


def test_resume_auto_after_a_change_in_the_run_name_says_what_it_found(finished, tmp_path):
    import shutil

    shutil.copytree(finished / "out", tmp_path / "outputs" / "old-run")
    proc = run_train(tmp_path, *BASE[:-1], "training.batch_size=8", "training.output_dir=outputs/{name}-{time}",
                     extra_args=("--resume", "auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    note = next(line for line in proc.stdout.splitlines() if line.startswith("note: --resume auto"))
    assert "found no run named demo-bart_v1_lr0.002_bs8; starting it fresh" in note
    assert "differs only in training.batch_size = 16 there, 8 here" in note and "outputs/old-run" in note


def test_a_run_whose_config_is_missing_or_broken_is_refused(tmp_path):
    ckpt = saved_run(tmp_path)
    (tmp_path / "run/config.toml").write_text("[training\n")
    with pytest.raises(UserError, match="its run's config cannot be read"):
        resume.check_resume(Config(), ckpt, 1, 1)
    (tmp_path / "run/config.toml").unlink()
    with pytest.raises(UserError, match="its run has no config"):
        resume.check_resume(Config(), ckpt, 1, 1)


def test_resume_past_a_shortened_run_is_refused_and_an_empty_resume_is_an_error(finished):
    proc = run_train(finished, *BASE, "training.max_steps=1", extra_args=("--resume", "out"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1
    assert "the checkpoint is at step 2, past the 1 steps this config trains for" in lines[0]
    proc = run_train(finished, *BASE, extra_args=("--resume", ""))
    assert proc.returncode == 2 and "--resume needs `auto` or the path" in proc.stderr
