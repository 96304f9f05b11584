"""Two real gloo processes on the CPU (accelerate launch) against one process with the same global batch."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loop.wandb_offline import find_offline_runs, history_series, read_offline_run
from tests.conftest import ROOT, TINY, run_train, train_env

# 13 dev rows with eval batch 4 on 2 processes: the last batch is uneven, so accelerate pads it with repeats
# that gather_for_metrics must drop. Dropout off so both runs compute the same function.
COMMON = ["data.synthetic_dev_rows=13", "evaluation.eval_batch_size=4", "model.scratch.dropout=0",
          "training.max_steps=6", "evaluation.logging_steps=1", "evaluation.eval_steps=3", "evaluation.save_steps=3",
          "training.output_dir=out"]


def launch_two(cwd: Path, *overrides: str, env: dict[str, str] | None = None,
               extra_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`accelerate launch` with two real MULTI_CPU processes (see shared NOTES: --multi_gpu + ACCELERATE_USE_CPU)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(ROOT / "loop/train.py")]
    for item in (*TINY, *COMMON, *overrides):
        cmd += ["--set", item]
    cmd += extra_args
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=train_env({"ACCELERATE_USE_CPU": "true", **(env or {})}))


def predictions(out: Path, step: int) -> list[list[str]]:
    with open(out / f"predictions/step_{step}.csv", encoding="utf-8") as f:
        return list(csv.reader(f))


def eval_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "eval_metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("one")
    proc = run_train(cwd, *COMMON, "training.batch_size=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "out"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("two")
    proc = launch_two(cwd, "training.batch_size=8", env={"LOOP_FAULT_COUNT_ALLREDUCE": str(cwd / "allreduce.txt")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    return cwd / "out"


def test_eval_gathers_each_dev_example_exactly_once(one_process, two_processes):
    for line in eval_lines(two_processes):
        assert line["num_samples"] == 13
    rows = predictions(two_processes, 0)
    assert [r[0] for r in rows[1:]] == [f"dev_{i:05d}" for i in range(13)]
    # Same initial weights (same seed): the step-0 eval must be the one-process eval, prediction for prediction.
    assert rows == predictions(one_process, 0)
    one, two = eval_lines(one_process)[0], eval_lines(two_processes)[0]
    assert two["rouge_l"] == one["rouge_l"] and two["gen_len"] == one["gen_len"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)


def test_training_matches_one_process_with_the_same_global_batch(one_process, two_processes):
    for key in ("train/loss", "train/grad_norm"):
        one = history_series(read_offline_run(find_offline_runs(one_process)[0]), key)
        two = history_series(read_offline_run(find_offline_runs(two_processes)[0]), key)
        assert [s for s, _ in two] == [1, 2, 3, 4, 5, 6]
        assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-4), key
    a, b = load_file(one_process / "checkpoints/step_6/model.safetensors"), \
        load_file(two_processes / "checkpoints/step_6/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_one_wandb_run_and_main_process_writes(two_processes):
    runs = find_offline_runs(two_processes)
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    assert run.complete and sum(1 for a in run.artifacts if a["type"] == "model") >= 1
    steps = [row["_step"] for row in run.history]
    assert steps == sorted(steps)
    assert len(eval_lines(two_processes)) == 3  # steps 0, 3, 6: written once, not once per process


def test_no_gradient_allreduce_on_non_final_micro_steps(tmp_path, two_processes):
    calls, steps = map(int, (two_processes.parent / "allreduce.txt").read_text().split())
    assert steps == 6 and calls % steps == 0  # a whole number of buckets per optimizer step
    proc = launch_two(tmp_path, "training.batch_size=4", "training.gradient_accumulation_steps=2",
                      env={"LOOP_FAULT_COUNT_ALLREDUCE": str(tmp_path / "allreduce.txt")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    accum_calls, accum_steps = map(int, (tmp_path / "allreduce.txt").read_text().split())
    assert (accum_calls, accum_steps) == (calls, steps)  # twice the micro-batches, the same all-reduces
    a, b = load_file(two_processes / "checkpoints/step_6/model.safetensors"), \
        load_file(tmp_path / "out/checkpoints/step_6/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_signal_on_one_rank_stops_both_and_resume_is_exact(tmp_path, two_processes):
    # Rank 1 alone is "preempted" during step 1. The processes vote in the next step's token all-reduce (no
    # per-step host sync), so both must stop together after step 2 and save.
    first = launch_two(tmp_path, "training.batch_size=8",
                       env={"LOOP_FAULT_PREEMPT_AT_MICROSTEP": "1", "LOOP_FAULT_PREEMPT_RANK": "1"})
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped by a signal on another process at step 2" in first.stdout
    assert (tmp_path / "out/checkpoints/step_2/trainer_state.json").exists()
    resumed = launch_two(tmp_path, "training.batch_size=8", extra_args=("--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from out/checkpoints/step_2 at step 2" in resumed.stdout
    a, b = load_file(two_processes / "checkpoints/step_6/model.safetensors"), \
        load_file(tmp_path / "out/checkpoints/step_6/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_length_grouped_batches_match_one_process(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = run_train(tmp_path / "one", *COMMON, "training.batch_size=16", "data.group_by_length=true")
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch_two(tmp_path / "two", "training.batch_size=8", "data.group_by_length=true")
    assert two.returncode == 0, two.stderr[-3000:]
    series = [history_series(read_offline_run(find_offline_runs(tmp_path / d / "out")[0]), "train/loss")
              for d in ("one", "two")]
    assert [v for _, v in series[1]] == pytest.approx([v for _, v in series[0]], rel=1e-4)


def test_early_stopping_stops_both_processes_at_the_same_step(tmp_path):
    # The stop follows from the gathered eval metrics, which are the same on every process; a disagreement would
    # leave one process waiting in a collective (a timeout) instead of both ending at step 4.
    proc = launch_two(tmp_path, "training.batch_size=8", "training.max_steps=12", "evaluation.eval_steps=2",
                      "evaluation.save_steps=100", "evaluation.metric_for_best_model=loss",
                      "evaluation.greater_is_better=false", "evaluation.early_stopping_patience=2",
                      "evaluation.early_stopping_threshold=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: stopped early at step 4 of 12" in proc.stdout
    assert (tmp_path / "out/checkpoints/step_4/manifest.json").exists()
