"""Sweeps: sweep-file validation, the online/offline decision, Optuna search, pruning and resume.

Grid, interruption and per-trial validation use a stand-in trainer that only writes eval_metrics.jsonl;
random, bayes and pruning run the real trainer on the tiny config.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loop import sweep as sweep_mod
from loop.config import load_config
from loop.errors import UserError, run_cli
from loop.sweep_spec import config_key, load_sweep
from loop.wandb_offline import find_offline_runs, read_offline_run
from tests.conftest import ROOT, TINY

# The tiny model, shorter still: 4 steps, evals at steps 0, 2 and 4 on 6 dev rows; nothing the sweep doesn't read.
REAL = [*TINY, "training.max_steps=4", "evaluation.eval_steps=2", "evaluation.save_steps=100",
        "model.max_source_length=64", "model.max_target_length=24", "generation.max_new_tokens=8",
        "data.max_dev_samples=6", "evaluation.rouge_tokenizer=char", "training.save_model_as_artifact=false",
        "wandb.table_rows=0", "evaluation.print_samples=0"]

HEADER = '\nmetric = {name = "eval/loss", goal = "minimize"}\n'

# Stands in for loop/train.py: records its --set items and writes one eval line per 2 steps.
FAKE_TRAINER = """
import json, os, sys, time
from pathlib import Path
sets = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
out = Path(sets["training.output_dir"])
out.mkdir(parents=True, exist_ok=True)
(out / "args.json").write_text(json.dumps(sets))
(out / "pid").write_text(str(os.getpid()))
if os.environ.get("FAKE_FAIL"):
    sys.exit("error: the stand-in trainer was told to fail")
lr = float(sets.get("training.learning_rate", "0.002"))
for step in range(0, int(sets.get("training.max_steps", "4")) + 1, 2):
    # FAKE_PEAKED: the scores peak at step 2 and fall back after it, so the last eval is not the best.
    rouge = lr * (min(step, 4 - step) if os.environ.get("FAKE_PEAKED") else step)
    with open(out / "eval_metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "loss": 1 / (1 + rouge), "rouge_l": rouge}) + "\\n")
    time.sleep(float(os.environ.get("FAKE_EVAL_SECONDS", "0")))
(out / "final_metrics.json").write_text("{}")
"""

# Runs the sweep CLI in its own process with the stand-in trainer, so that it can be killed.
SWEEP_WITH_FAKE = """
import sys
from pathlib import Path
from loop import sweep
from loop.errors import UserError, run_cli
sweep.TRAIN_SCRIPT = Path(sys.argv.pop(1))
sys.exit(run_cli(sweep.main))
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def results(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "results.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def eval_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "eval_metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch):
    """The stand-in trainer as TRAIN_SCRIPT, with the test in its own working directory."""
    script = write(tmp_path / "fake_train.py", FAKE_TRAINER)
    monkeypatch.setattr(sweep_mod, "TRAIN_SCRIPT", script)
    monkeypatch.setattr(sweep_mod, "POLL_S", 0.05)
    monkeypatch.chdir(tmp_path)
    return script


@pytest.fixture
def real_trials(tmp_path, monkeypatch):
    """Real trials in the test's own directory, one torch thread each (the 2 CPU cores are shared)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(sweep_mod, "POLL_S", 0.1)
    monkeypatch.chdir(tmp_path)


# ---- the sweep file ---------------------------------------------------------------------------------------


def test_team_sweep_file_is_the_guide_search_space():
    spec = load_sweep(ROOT / "configs/sweep.toml", ROOT / "configs/base.toml")
    by_key = {p.key: p for p in spec.params}
    lr = by_key["training.learning_rate"]
    assert (lr.distribution, lr.low, lr.high) == ("log_uniform_values", 1e-5, 5e-4)
    assert by_key["training.batch_size"].values == (8, 16, 32)
    assert by_key["training.num_epochs"].values == (15, 20, 25)
    warmup = by_key["training.warmup_ratio"]
    assert (warmup.distribution, warmup.low, warmup.high) == ("uniform", 0.0, 0.2)
    assert by_key["training.weight_decay"].values == (0.0, 0.01, 0.1)
    assert (spec.metric, spec.goal, spec.method) == ("eval/rouge_l", "maximize", "bayes")
    assert spec.to_wandb()["parameters"]["epochs"] == {"values": [15, 20, 25]}


@pytest.mark.parametrize(("name", "key"), [
    ("learning_rate", "training.learning_rate"), ("lr", "training.learning_rate"),
    ("batch_size", "training.batch_size"), ("epochs", "training.num_epochs"),
    ("num_epochs", "training.num_epochs"), ("warmup_ratio", "training.warmup_ratio"),
    ("weight_decay", "training.weight_decay"), ("training.max_steps", "training.max_steps"),
    ("num_beams", "generation.num_beams"),
])
def test_short_parameter_names_map_to_config_keys(name, key):
    assert config_key(name, "sweep.toml") == key


def test_yaml_sweep_file_reads_like_toml(tmp_path):
    # PyYAML reads 1e-5 (no dot) as a string: the bound still has to come out as a number.
    path = write(tmp_path / "s.yaml", "method: random\nmetric: {name: eval/rouge_l, goal: maximize}\n"
                 "parameters:\n  lr: {distribution: log_uniform_values, min: 1e-5, max: 1e-3}\n"
                 "  batch_size: {values: [8, 16]}\nearly_terminate: {type: hyperband, min_iter: 2}\n")
    spec = load_sweep(path)
    assert (spec.params[0].low, spec.params[0].high) == (1e-5, 1e-3)
    assert spec.params[1].values == (8, 16)
    assert (spec.hyperband.min_iter, spec.hyperband.eta) == (2, 3)


def test_each_distribution_samples_within_its_bounds(tmp_path):
    import math

    import optuna

    path = write(tmp_path / "s.toml", 'method = "random"' + HEADER + """
[parameters.learning_rate]
distribution = "log_uniform"
min = -9.2
max = -4.6
[parameters.warmup_ratio]
distribution = "q_uniform"
min = 0.0
max = 0.2
q = 0.05
[parameters.batch_size]
distribution = "q_uniform"
min = 8
max = 32
q = 8
[parameters.num_beams]
min = 1
max = 4
[parameters.weight_decay]
min = 0.0
max = 0.1
[parameters.scheduler]
values = ["linear", "cosine"]
""")
    spec = load_sweep(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        v = {p.key: sweep_mod.suggest(trial, p, grid=False) for p in spec.searched}
        study.tell(trial, 0.0)
        assert math.exp(-9.2) <= v["training.learning_rate"] <= math.exp(-4.6)
        assert round(v["training.warmup_ratio"] / 0.05, 9).is_integer() and 0 <= v["training.warmup_ratio"] <= 0.2
        assert v["training.batch_size"] in (8, 16, 24, 32) and isinstance(v["training.batch_size"], int)
        assert v["generation.num_beams"] in (1, 2, 3, 4)  # whole-number bounds: int_uniform, as W&B infers
        assert 0.0 <= v["training.weight_decay"] <= 0.1
        assert v["training.scheduler"] in ("linear", "cosine")
    by_name = {p.name: p for p in spec.params}
    assert by_name["batch_size"].grid_values() == [8, 16, 24, 32]
    assert by_name["warmup_ratio"].grid_values() == [0.0, 0.05, 0.1, 0.15, 0.2]


BAD_FILES = [
    ('method = "grd"\n[parameters.lr]\nvalues = [0.1]', "`method` must be one of grid, random, bayes", "`grid`"),
    ('method = "random"\n[parameters.lr]\ndistribution = "uniform"\nmin = 0.01\nmax = 0.001',
     "`parameters.lr`: `min` (0.01) must be less than `max` (0.001)", ""),
    ('method = "random"\n[parameters.lr]\ndistribution = "log_uniform_values"\nmin = 0.0\nmax = 0.1',
     "`parameters.lr`: log_uniform_values needs `min` > 0", ""),
    ('method = "random"\n[parameters.learnin_rate]\nvalues = [0.1]',
     "`parameters.learnin_rate` is not a config key", "did you mean `training.learning_rate`?"),
    ('method = "random"\n[parameters.batch_size]\nvalues = [0, 8]',
     "`parameters.batch_size`: value 0 is rejected by the config", "`training.batch_size` must be ≥ 1"),
    ('method = "random"\n[parameters.batch_size]\ndistribution = "uniform"\nmin = 4\nmax = 8',
     "`training.batch_size` is an integer but uniform samples fractions", ""),
    ('method = "grid"\n[parameters.warmup_ratio]\ndistribution = "uniform"\nmin = 0.0\nmax = 0.2',
     "`parameters.warmup_ratio` uses `uniform`, which a grid cannot enumerate", ""),
    ('method = "random"\n[parameters.training.learning_rate]\nvalues = [0.1]',
     "`parameters.training` has no values/value/distribution", "[parameters.\"training.learning_rate\"]"),
    ('method = "random"\n[parameters.output_dir]\nvalues = ["a"]',
     "sets `training.output_dir`, which the sweep sets for every trial", ""),
    ('method = "random"\n[parameters.lr]\nvalues = [0.1]\n[early_terminate]\ntype = "hyperband"',
     "`early_terminate` needs `min_iter`", ""),
    ('method = "random"\nrun_cap = 0\n[parameters.lr]\nvalues = [0.1]', "`run_cap` must be a whole number ≥ 1", ""),
]


@pytest.mark.parametrize(("body", "message", "hint"), BAD_FILES)
def test_bad_sweep_file_is_one_line_error_before_any_trial(tmp_path, monkeypatch, capsys, body, message, hint):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "bad.toml", HEADER + body)
    code = run_cli(sweep_mod.main, [str(path), "--count", "1", *sets(*TINY)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ")
    assert message in err and hint in err
    assert not (tmp_path / "sweeps").exists()  # nothing was started


@pytest.mark.parametrize(("metric", "message"), [
    ('name = "eval/rougeL"\ngoal = "maximize"', "must be a metric loop/train.py logs at each eval"),
    ('name = "best/rouge_l"\ngoal = "maximize"', "got 'best/rouge_l'"),
    ('name = "eval/rouge_l"\ngoal = "maximise"', '`metric.goal` must be "minimize" or "maximize"'),
    ('name = "eval/rouge_l"', "(W&B minimizes when goal is missing)"),
    ('name = "eval/loss"\ngoal = "maximize"', 'eval/loss is better when it is lower: set goal = "minimize"'),
])
def test_bad_metric_is_rejected(tmp_path, metric, message):
    path = write(tmp_path / "bad.toml", f'method = "random"\n[metric]\n{metric}\n[parameters.lr]\nvalues = [0.1]')
    with pytest.raises(UserError) as info:
        load_sweep(path)
    assert message in str(info.value)


def test_search_without_an_end_needs_count_or_run_cap(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "s.toml", 'method = "random"' + HEADER + "[parameters.lr]\nvalues = [0.1]")
    assert run_cli(sweep_mod.main, [str(path), *sets(*TINY)]) == 2
    assert "pass --count N or set run_cap" in capsys.readouterr().err


# ---- online or offline ------------------------------------------------------------------------------------


def test_online_needs_a_key_and_a_server_and_says_which_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a real key
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    path = write(tmp_path / "s.toml", 'method = "random"' + HEADER + "[parameters.lr]\nvalues = [0.1]")
    argv = [str(path), "--count", "1", "--online", *sets(*TINY)]

    assert run_cli(sweep_mod.main, argv) == 2
    assert "--online: no W&B API key configured" in capsys.readouterr().err
    assert sweep_mod.choose_mode(None)[0] == "offline"

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    assert run_cli(sweep_mod.main, argv) == 2
    assert "--online: W&B server http://127.0.0.1:9 is not reachable" in capsys.readouterr().err
    # A refused connection answers at once, long before the probe's timeout (the bound leaves room for a busy
    # machine; the whole command's time is mostly config loading and is not what this checks).
    started = time.monotonic()
    assert sweep_mod.server_reachable("http://127.0.0.1:9", timeout_s=30) is False
    assert time.monotonic() - started < 10
    assert sweep_mod.choose_mode(None) == ("offline", "W&B server http://127.0.0.1:9 is not reachable")
    assert not (tmp_path / "sweeps").exists()


def test_online_agent_runs_each_wandb_run_as_a_trial(tmp_path, fake_trainer, monkeypatch):
    # No server here: stand in for wandb.sweep and for wandb.agent, which hands its function each run
    # through WANDB_RUN_ID and a parameter file, as wandb's own agent does.
    import wandb
    import yaml

    created = {}

    def fake_sweep(config, entity=None, project=None):
        created.update(config=config, project=project)
        return "abc123"

    def fake_agent(sweep_id, function, count, entity=None, project=None):
        for i, lr in enumerate((1e-3, 2e-3)[:count]):
            given = {"lr": {"value": lr}, "batch_size": {"value": 2}, "seed": {"value": 7}}
            param_file = tmp_path / f"params-{i}.yaml"
            param_file.write_text("wandb_version: 1\n\n" + yaml.safe_dump(given))
            monkeypatch.setenv("WANDB_RUN_ID", f"run{i}")
            monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(param_file))
            function()

    monkeypatch.setattr(wandb, "sweep", fake_sweep)
    monkeypatch.setattr(wandb, "agent", fake_agent)
    monkeypatch.setattr(sweep_mod, "choose_mode", lambda requested: ("online", "test"))
    monkeypatch.setenv("FAKE_PEAKED", "1")
    path = write(tmp_path / "grid.toml", GRID)
    assert run_cli(sweep_mod.main, [str(path), "--launcher", "python", "--count", "2"]) == 0

    assert created["config"] == load_sweep(path).to_wandb() and created["project"] == "dialogue-summarization"
    args = [json.loads((tmp_path / f"sweeps/grid/trial-run{i}/args.json").read_text()) for i in (0, 1)]
    assert [a["training.learning_rate"] for a in args] == ["0.001", "0.002"]
    assert all(a["wandb.group"] == "sweep-abc123" and a["training.seed"] == "7" for a in args)
    rows = results(tmp_path / "sweeps/grid")
    assert [r["status"] for r in rows] == ["complete", "complete"]
    # Ranked by the best eval (step 2), as the W&B summary holds it, not by the last one (step 4).
    assert [(float(r["eval/loss"]), r["at step"]) for r in rows] == [
        (pytest.approx(1 / (1 + 2 * 2e-3)), "2"), (pytest.approx(1 / (1 + 2 * 1e-3)), "2")]


# ---- offline search with the stand-in trainer --------------------------------------------------------------


GRID = 'method = "grid"' + HEADER + """
[parameters.lr]
values = [1e-3, 2e-3]
[parameters.batch_size]
distribution = "int_uniform"
min = 1
max = 3
[parameters.seed]
value = 7
"""

# 40 steps: long enough to interrupt when FAKE_EVAL_SECONDS slows the stand-in trainer down.
RANDOM_SLOW = 'method = "random"' + HEADER + """
[parameters.lr]
distribution = "log_uniform_values"
min = 1e-4
max = 1e-2
[parameters.max_steps]
value = 40
"""


def test_grid_visits_exactly_its_points_across_resumptions(tmp_path, fake_trainer):
    path = write(tmp_path / "grid.toml", GRID)
    points = [{"training.batch_size": b, "training.learning_rate": lr} for b in (1, 2, 3) for lr in (1e-3, 2e-3)]
    spec = load_sweep(path)
    assert sorted(map(sorted, (p.items() for p in spec.grid()))) == sorted(map(sorted, (p.items() for p in points)))

    argv = [str(path), "--launcher", "python"]
    assert run_cli(sweep_mod.main, [*argv, "--count", "4"]) == 0
    assert run_cli(sweep_mod.main, argv) == 0  # the rest of the grid: 2 more
    assert run_cli(sweep_mod.main, argv) == 0  # nothing left
    sweep_dir = tmp_path / "sweeps/grid"
    trials = sorted(sweep_dir.glob("trial-*"))
    assert [t.name for t in trials] == [f"trial-{i:03d}" for i in range(6)]
    seen = [json.loads((t / "args.json").read_text()) for t in trials]
    visited = sorted((int(a["training.batch_size"]), float(a["training.learning_rate"])) for a in seen)
    assert visited == sorted((p["training.batch_size"], p["training.learning_rate"]) for p in points)
    assert all(a["training.seed"] == "7" and a["wandb.job_type"] == "sweep" for a in seen)
    assert len({a["wandb.group"] for a in seen}) == 1 and seen[0]["wandb.group"].startswith("sweep-")
    rows = results(sweep_dir)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"complete"}
    assert float(rows[0]["eval/loss"]) == min(float(r["eval/loss"]) for r in rows)  # best first
    best = load_config(sweep_dir / "best_config.toml")
    assert best.training.learning_rate == 2e-3 and best.training.seed == 7
    assert best.training.output_dir == "outputs/{name}-{time}" and best.wandb.group == ""  # ready to train


PEAKED = """method = "grid"
metric = {name = "eval/rouge_l", goal = "maximize"}
[parameters.lr]
values = [1e-3, 2e-3]
"""


def test_a_trial_is_ranked_by_its_best_eval_not_its_last(tmp_path, fake_trainer, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_PEAKED", "1")  # rouge_l at steps 0, 2, 4: 0, 2 lr, 0
    path = write(tmp_path / "peaked.toml", PEAKED)
    assert run_cli(sweep_mod.main, [str(path), "--launcher", "python"]) == 0
    sweep_dir = tmp_path / "sweeps/peaked"
    rows = results(sweep_dir)
    assert [(r["status"], float(r["eval/rouge_l"]), r["at step"]) for r in rows] == [
        ("complete", pytest.approx(4e-3), "2"), ("complete", pytest.approx(2e-3), "2")]
    assert "the best eval of each trial" in (sweep_dir / "results.md").read_text()
    assert "best eval/rouge_l 0.0040 at step 2" in capsys.readouterr().out
    assert load_config(sweep_dir / "best_config.toml").training.learning_rate == 2e-3


@pytest.mark.parametrize(("goal", "values", "best"), [
    ("maximize", [0.1, 0.5, 0.5, float("nan"), 0.2], (0.5, 2)),  # the earliest of a tie, NaN never best
    ("minimize", [3.0, 1.0, 2.0, 0.5, float("nan")], (0.5, 6)),
    ("maximize", [float("nan")], None),
])
def test_best_eval_of_a_trial(goal, values, best):
    rows = [{"step": 2 * i, "rouge_l": v} for i, v in enumerate(values)]
    assert sweep_mod.best_eval(rows, "rouge_l", goal, Path("eval_metrics.jsonl")) == best


def test_sampler_and_pruner_follow_the_sweep_file(tmp_path):
    import optuna

    path = write(tmp_path / "s.toml", GRID + "[early_terminate]\ntype = \"hyperband\"\nmin_iter = 2\neta = 2\n")
    grid = load_sweep(path)
    assert isinstance(sweep_mod._sampler(grid, 1, 0), optuna.samplers.GridSampler)
    for method, sampler in (("random", optuna.samplers.RandomSampler), ("bayes", optuna.samplers.TPESampler)):
        grid.method = method
        assert isinstance(sweep_mod._sampler(grid, 1, 0), sampler)
    sweep = sweep_mod.Sweep(grid, None, [], load_config(), tmp_path / "sw")
    _, study = sweep_mod.open_study(sweep)
    assert isinstance(study.pruner, optuna.pruners.SuccessiveHalvingPruner)


def test_trial_values_are_checked_together_before_launch(tmp_path, fake_trainer, capsys):
    # Each value is valid alone, but 3 heads cannot split d_model 32.
    path = write(tmp_path / "s.toml", 'method = "grid"' + HEADER + """
[parameters.d_model]
values = [48, 32]
[parameters.attention_heads]
values = [3]
""")
    code = run_cli(sweep_mod.main, [str(path), "--launcher", "python", *sets("model.scratch.d_model=48")])
    assert code == 2
    err = capsys.readouterr().err
    assert "is rejected by the config" in err and "`model.scratch.attention_heads` (3) must divide" in err
    launched = [json.loads((t / "args.json").read_text()) for t in (tmp_path / "sweeps/s").glob("trial-*")]
    assert len(launched) <= 1 and all(a["model.scratch.d_model"] == "48" for a in launched)


def test_failed_trials_are_recorded_and_a_failing_streak_stops_the_sweep(tmp_path, fake_trainer, monkeypatch,
                                                                         capsys):
    path = write(tmp_path / "r.toml", RANDOM_SLOW)
    monkeypatch.setenv("FAKE_FAIL", "1")
    assert run_cli(sweep_mod.main, [str(path), "--launcher", "python", "--count", "2"]) == 1
    assert [r["status"] for r in results(tmp_path / "sweeps/r")] == ["failed", "failed"]
    assert "the stand-in trainer was told to fail (log: sweeps/r/trial-000/train.log)" in capsys.readouterr().out

    assert run_cli(sweep_mod.main, [str(path), "--launcher", "python", "--count", "5"]) == 2
    assert "error: 3 trials in a row failed; stopping the sweep" in capsys.readouterr().err
    assert len(results(tmp_path / "sweeps/r")) == 5  # 2 before, then 3 in a row


def _sweep_process(tmp_path: Path, script: Path, sweep_file: Path, *extra: str) -> subprocess.Popen:
    wrapper = write(tmp_path / "run_sweep.py", SWEEP_WITH_FAKE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAKE_EVAL_SECONDS": "0.5"}
    return subprocess.Popen([sys.executable, str(wrapper), str(script), str(sweep_file), "--launcher", "python",
                             "--grace-period", "2", *extra], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_evals(run_dir: Path, n: int = 2, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not (run_dir / "eval_metrics.jsonl").exists() or len(eval_steps(run_dir)) < n:
        assert time.monotonic() < deadline, "the trial never evaluated"
        time.sleep(0.1)


def test_sigterm_stops_the_trial_and_resume_runs_its_parameters_again(tmp_path, fake_trainer):
    path = write(tmp_path / "r.toml", RANDOM_SLOW)
    sweep = _sweep_process(tmp_path, fake_trainer, path, "--count", "2")
    first = tmp_path / "sweeps/r/trial-000"
    _wait_for_evals(first)
    sweep.send_signal(signal.SIGTERM)
    out, _ = sweep.communicate(timeout=60)
    assert sweep.returncode == 130, out
    assert not running(int((first / "pid").read_text()))  # the trial did not outlive the sweep
    assert eval_steps(first)[-1] < 40
    assert [r["status"] for r in results(tmp_path / "sweeps/r")] == ["interrupted"]

    assert run_cli(sweep_mod.main, [str(path), "--launcher", "python", "--count", "1"]) == 0
    rows = {r["trial"]: r for r in results(tmp_path / "sweeps/r")}
    assert rows["trial-001"]["status"] == "complete" and rows["trial-000"]["status"] == "interrupted"
    assert rows["trial-001"]["lr"] == rows["trial-000"]["lr"]  # the same parameters, run again


def test_resume_after_the_sweep_was_killed_stops_its_orphan_and_requeues(tmp_path, fake_trainer):
    path = write(tmp_path / "r.toml", RANDOM_SLOW)
    sweep = _sweep_process(tmp_path, fake_trainer, path, "--count", "2")
    first = tmp_path / "sweeps/r/trial-000"
    _wait_for_evals(first)
    sweep.kill()  # no chance to clean up: the trial keeps training and its state stays "running"
    sweep.wait()
    orphan = int((first / "pid").read_text())
    assert running(orphan)

    assert run_cli(sweep_mod.main, [str(path), "--launcher", "python", "--count", "1"]) == 0
    assert not running(orphan)
    rows = {r["trial"]: r for r in results(tmp_path / "sweeps/r")}
    assert rows["trial-000"]["status"] == "interrupted" and rows["trial-001"]["status"] == "complete"
    assert rows["trial-001"]["lr"] == rows["trial-000"]["lr"]


# ---- offline search with the real trainer ---------------------------------------------------------------


@pytest.mark.slow
def test_random_search_runs_real_trials_resumes_without_repeating_and_groups_runs(tmp_path, real_trials):
    path = write(tmp_path / "random.toml", 'method = "random"' + HEADER + """
[parameters.learning_rate]
distribution = "log_uniform_values"
min = 1e-4
max = 1e-2
[parameters.batch_size]
values = [8, 16]
[parameters.warmup_ratio]
distribution = "uniform"
min = 0.0
max = 0.2
""")
    argv = [str(path), *sets(*REAL)]
    assert run_cli(sweep_mod.main, [*argv, "--count", "2", "--launcher", "python"]) == 0
    sweep_dir = tmp_path / "sweeps/random"
    first = {t.name: (t / "final_metrics.json").stat().st_mtime_ns for t in sweep_dir.glob("trial-*")}
    assert sorted(first) == ["trial-000", "trial-001"]

    assert run_cli(sweep_mod.main, [*argv, "--count", "1", "--launcher", "python"]) == 0
    trials = sorted(sweep_dir.glob("trial-*"))
    assert [t.name for t in trials] == ["trial-000", "trial-001", "trial-002"]
    assert {t: (sweep_dir / t / "final_metrics.json").stat().st_mtime_ns for t in first} == first  # not re-run

    rows = {r["trial"]: r for r in results(sweep_dir)}
    assert {r["status"] for r in rows.values()} == {"complete"}
    assert len({r["learning_rate"] for r in rows.values()}) == 3
    groups = set()
    for t in trials:
        cfg = load_config(t / "config.toml")
        row = rows[t.name]
        assert cfg.training.learning_rate == pytest.approx(float(row["learning_rate"]))
        assert cfg.training.batch_size == int(row["batch_size"]) and eval_steps(t) == [0, 2, 4]
        assert float(row["eval/loss"]) == pytest.approx(json.loads((t / "eval_metrics.jsonl").read_text()
                                                                   .splitlines()[-1])["loss"])
        (run_dir,) = find_offline_runs(t / "wandb")
        run = read_offline_run(run_dir)
        assert run.job_type == "sweep" and run.name.endswith(f"-{t.name}")
        groups.add(run.group)
    (group,) = groups
    assert group.startswith("sweep-") and f"# {group}:" in (sweep_dir / "results.md").read_text()
    best_row = min(rows.values(), key=lambda r: float(r["eval/loss"]))
    best = load_config(sweep_dir / "best_config.toml")
    assert best.training.learning_rate == pytest.approx(float(best_row["learning_rate"]))
    assert best.training.max_steps == 4 and best.wandb.job_type == "training"


@pytest.mark.slow
def test_bayes_search_runs_three_real_trials_then_stops_at_run_cap(tmp_path, real_trials, capsys):
    path = write(tmp_path / "bayes.toml", 'method = "bayes"\nrun_cap = 3' + HEADER + """
[parameters.lr]
distribution = "log_uniform_values"
min = 1e-4
max = 1e-2
[parameters.weight_decay]
values = [0.0, 0.1]
""")
    argv = [str(path), "--launcher", "python", *sets(*REAL)]
    assert run_cli(sweep_mod.main, argv) == 0
    rows = results(tmp_path / "sweeps/bayes")
    assert len(rows) == 3 and {r["status"] for r in rows} == {"complete"}
    assert run_cli(sweep_mod.main, argv) == 0
    assert "0 trial(s) to run (limit: run_cap 3, 3 used)" in capsys.readouterr().out
    assert len(list((tmp_path / "sweeps/bayes").glob("trial-*"))) == 3


@pytest.mark.slow
def test_hyperband_prunes_the_poor_trial_before_max_steps(tmp_path, real_trials):
    path = write(tmp_path / "prune.toml", 'method = "random"' + HEADER + """
[parameters.lr]
values = [1e-2, 1e-7]
[parameters.max_steps]
values = [4, 40]
[parameters.warmup_ratio]
value = 0.0
[early_terminate]
type = "hyperband"
min_iter = 2
eta = 2
""")
    overrides = REAL
    # A good trial first, then one whose learning rate cannot move the loss: at the eval-2 rung (step 2)
    # the second is not in the top 1/eta and must stop there instead of training 40 steps.
    base = load_config(None, overrides)
    sweep = sweep_mod.Sweep(load_sweep(path, None, tuple(overrides)), None, overrides, base,
                            tmp_path / "sweeps/prune")
    _, study = sweep_mod.open_study(sweep)
    study.enqueue_trial({"training.learning_rate": 1e-2, "training.max_steps": 4})
    study.enqueue_trial({"training.learning_rate": 1e-7, "training.max_steps": 40})

    # The default launcher, accelerate launch, whose launcher process dies at once on SIGTERM.
    assert run_cli(sweep_mod.main, [str(path), "--count", "2", "--grace-period", "60", *sets(*overrides)]) == 0
    rows = {r["trial"]: r for r in results(tmp_path / "sweeps/prune")}
    good, poor = tmp_path / "sweeps/prune/trial-000", tmp_path / "sweeps/prune/trial-001"
    assert rows["trial-000"]["status"] == "complete" and eval_steps(good) == [0, 2, 4]
    assert rows["trial-001"]["status"] == "pruned"
    steps = eval_steps(poor)
    assert steps[:2] == [0, 2] and steps[-1] < 40
    assert not (poor / "final_metrics.json").exists()
    # SIGTERM, not SIGKILL, stopped it: train.py saved a checkpoint at the step it had reached.
    assert "stopped by SIGTERM" in (poor / "train.log").read_text()
    (saved,) = (poor / "checkpoints").glob("step_*")
    assert int(saved.name.removeprefix("step_")) < 40
