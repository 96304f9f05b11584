"""The best eval so far in the W&B run summary during the run: read back from real offline runs that were
stopped, killed or finished, and from the tracking calls on their own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from loop import tracking
from loop.wandb_offline import find_offline_runs, history_series, read_offline_run
from tests.conftest import train_command, train_env

# A tiny run whose learning rate is too high: ROUGE-L peaks early and then collapses, so the last eval is worse
# than an earlier one. 8 steps, an eval every 2 (and at 0), no checkpoint before the end.
PEAKED = ["training.max_steps=8", "evaluation.eval_steps=2", "evaluation.save_steps=100",
          "training.learning_rate=0.05", "training.warmup_ratio=0", "data.max_dev_samples=6",
          "generation.max_new_tokens=12", "evaluation.rouge_tokenizer=char", "wandb.table_rows=0",
          "evaluation.print_samples=0", "training.save_model_as_artifact=false", "training.output_dir=out"]
SCORES = ("loss", "rouge_1", "rouge_2", "rouge_l")


def run(cwd: Path, *overrides: str, env: dict[str, str] | None = None,
        args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_command(*PEAKED, *overrides, extra_args=args), cwd=cwd, capture_output=True,
                          text=True, env=train_env({"OMP_NUM_THREADS": "1", **(env or {})}), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def evals(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "eval_metrics.jsonl").read_text().splitlines()]


def best_of(rows: list[dict], name: str) -> tuple[int, float]:
    """(step, value) of the best eval of `name`, the earliest on ties."""
    pick = min if tracking.eval_goal(name) == "min" else max
    value = pick(r[name] for r in rows)
    return next(r["step"] for r in rows if r[name] == value), value


def check_best_summary(summary: dict, rows: list[dict]) -> None:
    """Every scored eval/<m> holds its best over `rows` and best_step/<m> its step; best/* the best ROUGE-L."""
    for name in SCORES:
        step, value = best_of(rows, name)
        goal = tracking.eval_goal(name)
        assert summary[f"eval/{name}"] == {goal: pytest.approx(value)}, name
        assert summary[f"best_step/{name}"] == step, name
    step, value = best_of(rows, "rouge_l")
    assert (summary["best/rouge_l"], summary["best/step"]) == (pytest.approx(value), step)
    assert summary["eval/num_samples"] == rows[-1]["num_samples"]  # not a score: the last value, as before


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped (as a preemption's SIGTERM does) at step 7, after its evals at 0, 2, 4 and 6."""
    cwd = tmp_path_factory.mktemp("stopped")
    proc = run(cwd, env={"LOOP_FAULT_PREEMPT_AT_MICROSTEP": "7"})
    assert "stopped by SIGTERM (injected) at step 7" in proc.stdout
    return cwd / "out"


def test_a_stopped_run_has_the_best_so_far_in_its_summary(stopped):
    rows = evals(stopped)
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    best_step, best = best_of(rows, "rouge_l")
    # What makes this run a test of "best, not last": ROUGE-L got worse after its best eval.
    assert rows[-1]["rouge_l"] < best and best_step < 6, rows
    (run_dir,) = find_offline_runs(stopped)
    wandb_run = read_offline_run(run_dir)
    assert wandb_run.complete and not (stopped / "final_metrics.json").exists()  # finish() never ran
    assert [s for s, _ in history_series(wandb_run, "eval/rouge_l")] == [0, 2, 4, 6]
    check_best_summary(wandb_run.summary, rows)
    assert wandb_run.summary["best/step"] == json.loads((stopped / "best/metrics.json").read_text())["step"]


def test_a_resumed_launch_starts_with_the_checkpoint_best(stopped):
    # The second launch evaluates only step 8 (no new best) and is stopped again before its end: the best/*
    # its own run file shows can only come from the checkpoint it resumed.
    cwd = stopped.parent
    first = {p.name for p in find_offline_runs(stopped)}
    proc = run(cwd, env={"LOOP_FAULT_PREEMPT_AT_MICROSTEP": "8"}, args=("--resume", "auto"))
    assert "resumed from out/checkpoints/step_7 at step 7" in proc.stdout and "stopped by SIGTERM" in proc.stdout
    rows = evals(stopped)
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8] and rows[-1]["rouge_l"] < best_of(rows, "rouge_l")[1]
    (second,) = [p for p in find_offline_runs(stopped) if p.name not in first]
    summary = read_offline_run(second).summary
    step, value = best_of(rows, "rouge_l")
    assert (summary["best/rouge_l"], summary["best/step"]) == (pytest.approx(value), step)
    # Each launch's eval/<m> aggregates its own evals (wandb-core starts over); compare/report join launches.
    assert summary["eval/rouge_l"] == {"max": pytest.approx(rows[-1]["rouge_l"])}


def test_a_finished_run_keeps_the_final_summary(tmp_path):
    run(tmp_path)
    out = tmp_path / "out"
    rows, final = evals(out), json.loads((out / "final_metrics.json").read_text())
    summary = read_offline_run(find_offline_runs(out)[0]).summary
    check_best_summary(summary, rows)
    assert summary["best/step"] == final["best_step"]
    assert summary["eval/rouge_l"]["max"] > rows[-1]["rouge_l"]  # what a W&B sweep reads is the best, not the last
    assert {"time/loop_s", "time/training_share"} <= set(summary)  # written at the end, as before
    assert summary["time/compile_seconds"] == final["time"]["compile"]["seconds"] == 0  # an eager run
    assert summary["time/compile_recompiles"] == final["time"]["compile"]["recompiles"] == 0


def test_a_killed_run_file_shows_the_best_up_to_what_wandb_flushed(tmp_path):
    # wandb-core writes the .wandb file in whole 32 KiB blocks and the last partial block is lost with the
    # process: an eval every 3 steps and a train row every step fill blocks, then SIGKILL mid-training.
    argv = train_command(*PEAKED, "training.max_steps=2000", "evaluation.eval_steps=3", "evaluation.logging_steps=1",
                         "training.learning_rate=0.02", "data.max_dev_samples=4", "generation.max_new_tokens=8")
    proc = subprocess.Popen(argv, cwd=tmp_path, env=train_env({"OMP_NUM_THREADS": "1"}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while sum(f.stat().st_size for f in (tmp_path / "out/wandb").glob("offline-run-*/*.wandb")) < 3 * 32768:
            assert proc.poll() is None and time.monotonic() < deadline, "the run never wrote 3 blocks"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wandb_run = read_offline_run(find_offline_runs(tmp_path / "out")[0])
    assert not wandb_run.complete and not (tmp_path / "out/final_metrics.json").exists()
    readable = history_series(wandb_run, "eval/rouge_l")
    assert len(readable) >= 3, readable
    summary, rows = wandb_run.summary, evals(tmp_path / "out")  # eval_metrics.jsonl has every eval
    # best/* at every new best: never behind the history that reached the file (it is written before the row).
    assert summary["best/rouge_l"] >= max(v for _, v in readable)
    by_step = {r["step"]: r for r in rows}
    step = summary["best/step"]
    assert summary["best/rouge_l"] == pytest.approx(by_step[step]["rouge_l"])
    assert all(r["rouge_l"] < by_step[step]["rouge_l"] for r in rows if r["step"] < step)
    assert summary["best_step/loss"] in by_step and summary["eval/loss"]["min"] <= min(
        row["eval/loss"] for row in wandb_run.history if "eval/loss" in row)


# ---- the tracking calls on their own ------------------------------------------------------------------------


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """A real offline wandb in tmp (wandb caches its settings at the first setup in a process)."""
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        (tmp_path / var.lower()).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()
    yield wandb
    wandb.teardown()


def test_summary_holds_each_metric_best_and_its_step(offline_wandb):
    # Evals as train.py logs them: one row per step, the tracking call after the eval's log. ROUGE peaks at
    # step 2, the loss at step 4; rouge_mean is a key train.py did not log before (handled like any other).
    history = [(0, 3.0, 0.1), (2, 2.0, 0.5), (4, 1.5, 0.3), (6, 2.5, 0.2)]
    run = offline_wandb.init(project="best-summary", name="peaked")
    tracking.restore_best_summary(run, "rouge_l", None, None)  # a fresh run: nothing to restore
    for step, loss, rouge in history:
        run.log({"train/loss": loss}, step=step)
        metrics = {"loss": loss, "rouge_l": rouge, "rouge_mean": rouge / 2, "gen_len": 10.0 + step,
                   "num_samples": 4.0}
        run.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        best_step = 2 if step >= 2 else 0  # what keep_best keeps: the best ROUGE-L so far
        tracking.summarize_eval(run, step, metrics, "rouge_l", {0: 0.1, 2: 0.5}[best_step], best_step)
    run_dir = Path(run.dir).parent
    run.finish()
    offline_wandb.teardown()  # finish() may return before the run file is flushed (shared notes)
    summary = read_offline_run(run_dir).summary
    assert summary["eval/rouge_l"] == {"max": 0.5} and summary["eval/rouge_mean"] == {"max": 0.25}
    assert summary["eval/loss"] == {"min": 1.5}
    assert (summary["best_step/rouge_l"], summary["best_step/rouge_mean"], summary["best_step/loss"]) == (2, 2, 4)
    assert (summary["best/rouge_l"], summary["best/step"]) == (0.5, 2)
    # Not scores: last values, and no best step.
    assert (summary["eval/gen_len"], summary["eval/num_samples"]) == (16.0, 4.0)
    assert not {"best_step/gen_len", "best_step/num_samples"} & set(summary)


def test_restore_writes_the_resumed_best(offline_wandb):
    run = offline_wandb.init(project="best-summary", name="resumed")
    tracking.restore_best_summary(run, "loss", 1.25, 40)
    run.log({"train/loss": 2.0}, step=41)  # as a resumed launch does next (not a best: nothing else writes best/*)
    run_dir = Path(run.dir).parent
    run.finish()
    offline_wandb.teardown()  # finish() may return before the run file is flushed (shared notes)
    summary = read_offline_run(run_dir).summary
    assert (summary["best/loss"], summary["best/step"]) == (1.25, 40)


@pytest.mark.parametrize(("name", "goal"), [("loss", "min"), ("eval/loss", "min"), ("label_smoothed_loss", "min"),
                                            ("rouge_l", "max"), ("rouge_mean", "max"), ("gen_len", None),
                                            ("num_samples", None)])
def test_eval_goal(name, goal):
    assert tracking.eval_goal(name) == goal


class BrokenRun:
    """A W&B run whose every call fails, as with a full disk under W&B's files."""

    id = "broken"

    def define_metric(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    @property
    def summary(self):
        raise OSError(28, "No space left on device")


def test_a_failing_wandb_call_is_one_warning(capsys):
    tracking.summarize_eval(BrokenRun(), 2, {"loss": 1.0, "rouge_l": 0.5}, "rouge_l", 0.5, 2)
    tracking.restore_best_summary(BrokenRun(), "rouge_l", 0.5, 2)
    out = capsys.readouterr().out.splitlines()
    line = "warning: W&B best summary failed (OSError: [Errno 28] No space left on device); training goes on"
    assert out == [line] * 2
    tracking.summarize_eval(None, 2, {"loss": 1.0}, "rouge_l", 0.5, 2)  # tracking off (or not the main process)
