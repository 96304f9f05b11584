"""The run directory under hostile conditions: a launch that cannot start writes nothing; a directory whose last
launch stopped before its first checkpoint is reused; one lock per directory; names safe as paths; storage and
tracker failures are one line, never a crash."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from loop import rundir, tracking
from loop.config import load_config
from loop.errors import UserError
from tests.conftest import run_train, train_command, train_env

SHORT = ["training.max_steps=2", "evaluation.eval_steps=100", "evaluation.eval_on_start=false", "wandb.table_rows=0"]


def snapshot(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*") if "data" not in p.parts)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(("name", "expected"), [
    ("../escape", "___escape"), ("a/b", "a_b"), ("..", "__"), (".hidden", "_hidden"), ("", "run"),
    ("x\\y", "x_y"), ("kobart_v1_lr3e-05_bs16", "kobart_v1_lr3e-05_bs16"), ("a..b", "a..b"),
])
def test_run_names_become_safe_path_components(name, expected):
    assert rundir.path_component(name) == expected


def test_a_run_name_with_dots_and_slashes_stays_inside_output_dir(tmp_path):
    proc = run_train(tmp_path, *SHORT, "wandb.name=../../escape", "training.output_dir=outputs/{name}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["___.._escape"]
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path / "escape").exists()


def test_a_model_that_cannot_load_leaves_no_directory(tmp_path):
    proc = run_train(tmp_path, *SHORT, "model.from_scratch=false", "model.name_or_path=nowhere/model",
                     "model.tokenizer=nowhere/model", "training.output_dir=out")
    assert "cannot load tokenizer 'nowhere/model'" in one_error_line(proc)
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_is_one_line_and_untouched(tmp_path):
    (tmp_path / "out").write_text("my notes")
    proc = run_train(tmp_path, *SHORT, "training.output_dir=out")
    assert "out: exists and is a file; training.output_dir must name a directory" in one_error_line(proc)
    assert (tmp_path / "out").read_text() == "my notes"
    proc = run_train(tmp_path, *SHORT, "training.output_dir=out/run")
    assert "is a file, not a directory" in one_error_line(proc)


def test_output_dir_where_nothing_may_be_written_is_one_line(tmp_path):
    proc = run_train(tmp_path, *SHORT, "training.output_dir=/sys/loop-test-run")  # the kernel refuses, even root
    assert "cannot create the run directory" in one_error_line(proc)
    assert not Path("/sys/loop-test-run").exists()


def test_an_unwritable_directory_is_caught_before_anything_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a user without write permission
    with pytest.raises(UserError, match="is not writable"):
        rundir.check_output_dir(tmp_path / "new" / "run", fresh=True)


def test_a_directory_whose_launch_stopped_before_its_first_checkpoint_is_reused(tmp_path):
    # Diverges at step 1 (exit 3), before the first save at step 100: config.toml, tokenizer/, W&B and an
    # eval at step 0 stay behind, but no checkpoint.
    failed = run_train(tmp_path, "training.max_steps=4", "evaluation.save_steps=100", "evaluation.eval_steps=100",
                       "training.max_nonfinite_steps=1", "training.output_dir=out",
                       extra_env={"LOOP_FAULT_NAN_AT_STEPS": "1"})
    assert failed.returncode == 3, failed.stderr[-3000:]
    assert (tmp_path / "out/config.toml").exists() and not (tmp_path / "out/checkpoints/latest").exists()
    again = run_train(tmp_path, *SHORT, "training.output_dir=out", extra_args=("--resume", "auto"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "note: out: its last launch stopped before its first checkpoint; starting over there" in again.stdout
    assert len(list((tmp_path / "out/wandb").glob("offline-run-*"))) == 1  # the stale W&B run went too
    blocked = run_train(tmp_path, *SHORT, "training.output_dir=out")  # now it holds a run
    assert "already holds a run; continue it with --resume out" in one_error_line(blocked)


def test_a_second_launch_into_a_directory_in_use_names_the_process(tmp_path):
    argv = train_command("training.max_steps=400", "evaluation.eval_steps=1000", "evaluation.save_steps=1000",
                         "training.output_dir=out")
    first = subprocess.Popen(argv, cwd=tmp_path, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "out/config.toml").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.2)
        second = run_train(tmp_path, *SHORT, "training.output_dir=out")
        line = one_error_line(second)
        assert f"out: in use by process {first.pid} on " in line and "loop/train.py" in line
    finally:
        first.terminate()
        first.wait(timeout=120)


def test_two_launches_at_the_same_moment_one_runs_one_is_refused(tmp_path):
    argv = train_command(*SHORT, "training.output_dir=out")
    procs = [subprocess.Popen(argv, cwd=tmp_path, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [r[2][-2000:] for r in results]
    refused = next(err for code, _, err in results if code == 2)
    assert "in use by process" in refused or "already holds a run" in refused
    assert len(refused.strip().splitlines()) == 1


def test_a_full_disk_at_an_eval_write_is_one_warning_and_training_goes_on(tmp_path):
    common = ("training.max_steps=2", "evaluation.save_steps=2", "evaluation.eval_steps=2", "training.output_dir=out",
              "evaluation.metric_for_best_model=loss", "evaluation.greater_is_better=false")  # loss improves each eval
    first = run_train(tmp_path, *common, "evaluation.eval_on_start=false")
    assert first.returncode == 0, first.stderr[-3000:]
    (tmp_path / "out/eval_metrics.jsonl").unlink()
    (tmp_path / "out/eval_metrics.jsonl").symlink_to("/dev/full")  # every write there fails with ENOSPC
    (tmp_path / "out/best.tmp").write_text("in the way")  # the best export's scratch directory cannot be made
    more = run_train(tmp_path, "training.max_steps=4", *common[1:], extra_args=("--resume", "auto"))
    assert more.returncode == 0, more.stderr[-3000:]
    warnings = [line for line in more.stdout.splitlines() if line.startswith("warning: could not")]
    assert "warning: could not write the step 4 eval into out: no space left on the device; training goes on" \
        in warnings
    assert any(w.startswith("warning: could not export the best model to out/best") for w in warnings)
    assert (tmp_path / "out/checkpoints/step_4/manifest.json").exists()
    assert "done: best eval/loss" in more.stdout


class FailingRun:
    """A W&B run whose every call fails as on a full disk."""

    id = "x"

    def log(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    def log_artifact(self, *args, **kwargs):
        raise OSError(28, "No space left on device")


def test_a_failing_tracker_call_is_one_warning_not_a_crash(tmp_path, capsys):
    class Result:
        indices, references, predictions, per_sample_rouge_l = [0], ["요약"], ["요약"], [1.0]

    tracking.log_samples_table(FailingRun(), 3, Result(), [{"id": "d0", "dialogue": "대화"}], 4)
    cfg = load_config(None, [])
    (tmp_path / "best").mkdir()
    (tmp_path / "best/config.json").write_text("{}")
    tracking.log_model_artifact(FailingRun(), cfg, tmp_path / "best", 3, {"rouge_l": 0.5})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["warning: W&B eval samples table failed (OSError: [Errno 28] No space left on device); "
                     "training goes on",
                     "warning: W&B model artifact failed (OSError: [Errno 28] No space left on device); "
                     "training goes on"]
