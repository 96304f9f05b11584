"""Never lose a run: exact resume, graceful preemption, atomic checkpoints, retention, non-finite steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loop.checkpoints import read_state
from loop.wandb_offline import find_offline_runs, history_series, read_offline_run
from tests.conftest import run_train, train_command, train_env

# Batch 8 x accumulation 2: 160 rows = 20 micro-batches = 10 optimizer steps per epoch. Dropout stays on
# (0.1), so an exact resume also needs the RNG states back. Loss is logged every 3 steps, so a resume between
# two logs must carry the partial logging window.
EXACT = ["training.batch_size=8", "training.gradient_accumulation_steps=2", "training.max_steps=14",
         "evaluation.logging_steps=3", "evaluation.eval_steps=7", "evaluation.save_steps=100",
         "evaluation.eval_on_start=false", "wandb.table_rows=0", "training.output_dir=out"]


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / f"checkpoints/step_{step}/model.safetensors")


def logged(out: Path, key: str) -> tuple[list[tuple[int, float]], set[str]]:
    """A metric over every offline file of the run (a resumed run writes a second one with the same id)."""
    series, ids = [], set()
    for path in find_offline_runs(out):
        run = read_offline_run(path)
        ids.add(run.id)
        series += history_series(run, key)
    return series, ids


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("reference")
    proc = run_train(cwd, *EXACT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "out"


@pytest.mark.parametrize(("micro_step", "stops_at", "where"), [
    (6, 3, "mid-epoch, at the end of an optimizer step"),
    (7, 4, "between the two micro-batches of an accumulated step"),
    (21, 11, "right after the epoch boundary"),
])
def test_interrupted_run_resumes_bitwise_identical(tmp_path, reference, micro_step, stops_at, where):
    first = run_train(tmp_path, *EXACT, extra_env={"LOOP_FAULT_PREEMPT_AT_MICROSTEP": str(micro_step)})
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"at step {stops_at}; checkpoint saved" in first.stdout, where
    assert "--resume auto" in first.stdout.splitlines()[-1]
    assert not (tmp_path / "out/checkpoints/step_14").exists()

    second = run_train(tmp_path, *EXACT, extra_args=("--resume", "auto"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from out/checkpoints/step_{stops_at} at step {stops_at}" in second.stdout

    expected, actual = weights(reference, 14), weights(tmp_path / "out", 14)
    assert all(torch.equal(expected[k], actual[k]) for k in expected), where
    ref_losses, _ = logged(reference, "train/loss")
    losses, ids = logged(tmp_path / "out", "train/loss")
    assert losses == ref_losses  # same steps, same values, none dropped or duplicated
    assert len(ids) == 1  # one W&B run, continued
    ref_rouge, _ = logged(reference, "eval/rouge_l")
    assert logged(tmp_path / "out", "eval/rouge_l")[0] == ref_rouge


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def child_pids(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_a_launched_run_saves_and_exits_zero(tmp_path, signum):
    argv = train_command("training.max_steps=400", "evaluation.eval_steps=1000", "evaluation.save_steps=1000",
                         "evaluation.logging_steps=1", "training.output_dir=out", launch=True)
    launcher = subprocess.Popen(argv, cwd=tmp_path, env=train_env({"PYTHONUNBUFFERED": "1"}),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    err: list[str] = []
    training = threading.Event()

    def collect(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)
            if line.startswith("step "):  # a logged step: the loop runs, its signal handlers are in place
                training.set()

    readers = [threading.Thread(target=collect, args=pair, daemon=True)
               for pair in ((launcher.stdout, out), (launcher.stderr, err))]
    for reader in readers:
        reader.start()
    wait_for(lambda: training.is_set() or launcher.poll() is not None)
    workers = child_pids(launcher.pid)
    assert workers, "accelerate launch started no training process"
    for pid in workers:  # what a scheduler's preemption does to the job's training processes
        os.kill(pid, signum)
    launcher.wait(timeout=120)
    for reader in readers:
        reader.join(timeout=10)
    stdout, stderr = "".join(out), "".join(err)
    assert launcher.returncode == 0, stderr[-3000:]
    assert f"stopped by {signal.Signals(signum).name} at step" in stdout
    assert "resume with: accelerate launch loop/train.py" in stdout
    step = int(stdout.split("stopped by")[1].split("at step ")[1].split(";")[0])
    assert 0 < step < 400
    assert (tmp_path / f"out/checkpoints/step_{step}/trainer_state.json").exists()
    run = read_offline_run(find_offline_runs(tmp_path / "out")[0])
    assert run.complete and run.exit_code == 0  # the tracker was closed cleanly


def test_killed_save_leaves_no_checkpoint_that_resume_would_choose(tmp_path):
    common = ("evaluation.save_steps=3", "evaluation.eval_steps=100", "evaluation.eval_on_start=false",
              "training.output_dir=out")
    ok = run_train(tmp_path, "training.max_steps=3", *common)
    assert ok.returncode == 0, ok.stderr[-3000:]
    argv = train_command("training.max_steps=6", *common, launch=True, extra_args=("--resume", "auto"))
    launcher = subprocess.Popen(argv, cwd=tmp_path, env=train_env({"LOOP_FAULT_SAVE_PAUSE_S": "60"}),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = tmp_path / "out/checkpoints"
    wait_for(lambda: (ckpts / "step_6.tmp/optimizer.safetensors").exists() or launcher.poll() is not None)
    os.killpg(launcher.pid, signal.SIGKILL)  # the whole job, mid-save
    launcher.wait(timeout=60)
    assert (ckpts / "step_6.tmp").exists() and not (ckpts / "step_6").exists()
    assert (ckpts / "latest").read_text().strip() == "step_3"

    resumed = run_train(tmp_path, "training.max_steps=6", *common, extra_args=("--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "warning: skipping incomplete checkpoint out/checkpoints/step_6.tmp" in resumed.stdout
    assert "resumed from out/checkpoints/step_3 at step 3" in resumed.stdout
    assert (ckpts / "step_6/trainer_state.json").exists() and not (ckpts / "step_6.tmp").exists()


def test_retention_keeps_last_n_and_never_the_best_export(tmp_path):
    proc = run_train(tmp_path, "training.max_steps=8", "evaluation.save_steps=2", "evaluation.eval_steps=2",
                     "evaluation.keep_last_checkpoints=2", "training.output_dir=out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out/checkpoints").glob("step_*")) == ["step_6", "step_8"]
    assert (tmp_path / "out/best/model.safetensors").exists()


def test_nonfinite_steps_are_skipped_counted_and_logged(tmp_path):
    proc = run_train(tmp_path, "training.max_steps=6", "evaluation.eval_steps=100", "evaluation.logging_steps=1",
                     "training.output_dir=out", extra_env={"LOOP_FAULT_NAN_AT_STEPS": "2,3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = read_offline_run(find_offline_runs(tmp_path / "out")[0])
    assert history_series(run, "train/nonfinite_steps") == [(2, 1.0), (3, 2.0)]
    losses = history_series(run, "train/loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert all(v == v for _, v in losses)  # NaN never reaches the logged loss or the weights
    weights_ = load_file(tmp_path / "out/checkpoints/step_6/model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights_.values())


def test_too_many_nonfinite_steps_stop_with_exit_3_and_keep_the_checkpoint(tmp_path):
    proc = run_train(tmp_path, "training.max_steps=10", "evaluation.eval_steps=100", "evaluation.save_steps=2",
                     "training.max_nonfinite_steps=3", "training.output_dir=out",
                     extra_env={"LOOP_FAULT_NAN_AT_STEPS": "5,6,7,8"})
    assert proc.returncode == 3
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training stopped at step 7: 3 consecutive non-finite steps")
    assert "last good checkpoint: out/checkpoints/step_6" in last and "Traceback" not in proc.stderr
    kept = load_file(tmp_path / "out/checkpoints/step_6/model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())


def test_unreachable_wandb_server_falls_back_to_offline(tmp_path):
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9",
           "WANDB_INIT_TIMEOUT": "15"}
    proc = run_train(tmp_path, "training.max_steps=2", "evaluation.eval_steps=100", "training.output_dir=out",
                     "wandb.mode=auto", extra_env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: W&B online start failed" in proc.stdout
    assert "wandb sync" in proc.stdout.splitlines()[-1]
    run = read_offline_run(find_offline_runs(tmp_path / "out")[0])
    assert history_series(run, "train/loss")


def test_resume_errors_are_one_line_and_touch_nothing(tmp_path):
    proc = run_train(tmp_path, "training.max_steps=2", "evaluation.eval_steps=100", "training.output_dir=out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = sorted((str(p), p.stat().st_mtime_ns) for p in (tmp_path / "out").rglob("*"))

    missing = run_train(tmp_path, "training.output_dir=out", extra_args=("--resume", str(tmp_path / "nope")))
    assert missing.returncode == 2 and "no such checkpoint or run directory" in missing.stderr
    shape = run_train(tmp_path, "training.output_dir=out", "model.scratch.d_model=64", extra_args=("--resume", "auto"))
    assert shape.returncode == 2
    assert "trained with model.scratch.d_model = 32, the config says 64" in shape.stderr
    again = run_train(tmp_path, "training.output_dir=out")
    assert again.returncode == 2 and "already holds a run; continue it with --resume" in again.stderr
    for proc in (missing, shape, again):
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert sorted((str(p), p.stat().st_mtime_ns) for p in (tmp_path / "out").rglob("*")) == before


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path):
    proc = run_train(tmp_path, "training.max_steps=2", "evaluation.eval_steps=100", "training.output_dir=out",
                     extra_args=("--resume", "auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed" not in proc.stdout and (tmp_path / "out/checkpoints/step_2").exists()


def test_length_grouped_batches_resume_bitwise_identical(tmp_path):
    grouped = [*EXACT, "data.group_by_length=true"]
    (tmp_path / "ref").mkdir()
    reference = run_train(tmp_path / "ref", *grouped)
    assert reference.returncode == 0, reference.stderr[-3000:]
    first = run_train(tmp_path, *grouped, extra_env={"LOOP_FAULT_PREEMPT_AT_MICROSTEP": "13"})
    assert first.returncode == 0 and "at step 7; checkpoint saved" in first.stdout, first.stderr[-3000:]
    second = run_train(tmp_path, *grouped, extra_args=("--resume", "auto"))
    assert second.returncode == 0, second.stderr[-3000:]
    expected, actual = weights(tmp_path / "ref/out", 14), weights(tmp_path / "out", 14)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert logged(tmp_path / "out", "train/loss")[0] == logged(tmp_path / "ref/out", "train/loss")[0]


def test_background_save_writes_what_a_synchronous_save_writes(tmp_path):
    common = ("training.max_steps=4", "evaluation.save_steps=2", "evaluation.eval_steps=2",
              "evaluation.keep_last_checkpoints=0", "training.output_dir=out")
    for mode in ("true", "false"):
        (tmp_path / mode).mkdir()
        proc = run_train(tmp_path / mode, *common, f"evaluation.async_save={mode}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    for step in ("step_2", "step_4"):
        a, b = tmp_path / "true/out/checkpoints" / step, tmp_path / "false/out/checkpoints" / step
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size  # ties kept
        wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        for name in ("optimizer", "scheduler", "rng_0"):
            assert same(read_state(a, name), read_state(b, name)), name
        sa, sb = (json.loads((d / "trainer_state.json").read_text()) for d in (a, b))
        for key in ("time", "wandb_run_id"):  # wall times and the W&B run differ by nature
            sa.pop(key), sb.pop(key)
        assert sa == sb
    assert (tmp_path / "true/out/checkpoints/latest").read_text().strip() == "step_4"


def same(x, y) -> bool:
    """Deep equality of nested containers of tensors, numpy arrays and plain values."""
    import numpy as np

    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, np.ndarray):
        return isinstance(y, np.ndarray) and np.array_equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, list | tuple):
        return type(x) is type(y) and len(x) == len(y) and all(same(i, j) for i, j in zip(x, y, strict=True))
    return x == y


def test_a_failed_background_save_warns_and_training_goes_on(tmp_path):
    proc = run_train(tmp_path, "training.max_steps=4", "evaluation.save_steps=2", "evaluation.eval_steps=100",
                     "training.output_dir=out", extra_env={"LOOP_FAULT_SAVE_ERROR_AT": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = [line for line in proc.stdout.splitlines() if "could not be written" in line]
    assert warning == ["warning: checkpoint out/checkpoints/step_2: OSError: [Errno 28] No space left on device "
                       "(injected) could not be written; the previous checkpoint stays the newest"]
    ckpts = tmp_path / "out/checkpoints"
    assert (ckpts / "step_2.tmp").exists() and not (ckpts / "step_2").exists()
    assert (ckpts / "latest").read_text().strip() == "step_4"
