"""Ctrl-C: the first one stops like SIGTERM (finish the step, save, print the resume command, exit 0); a second
one stops at once with one line and exit code 130; under `accelerate launch` the training process still saves."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from loop.checkpoints import list_checkpoints, verify
from tests.conftest import train_command, train_env

LONG = ["training.max_steps=400", "evaluation.eval_steps=1000", "evaluation.save_steps=1000",
        "evaluation.logging_steps=1", "training.output_dir=out"]


def start(tmp_path: Path, launch: bool = False) -> subprocess.Popen:
    """A long run in its own session (so signals reach only it), once it is inside its training steps."""
    proc = subprocess.Popen(train_command(*LONG, launch=launch), cwd=tmp_path, env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while not any((tmp_path / "out/wandb").glob("offline-run-*/run-*.wandb")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
        time.sleep(0.2)
    time.sleep(3)  # into the training steps
    return proc


def test_first_ctrl_c_finishes_the_step_saves_and_exits_zero(tmp_path):
    proc = start(tmp_path)
    os.kill(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "Ctrl-C: stopping at the end of this step and saving a checkpoint; press Ctrl-C again" in stderr
    step = int(stdout.split("stopped by SIGINT (Ctrl-C) at step ")[1].split(";")[0])
    assert "resume with: accelerate launch loop/train.py" in stdout
    assert list_checkpoints(tmp_path / "out/checkpoints")[-1].name == f"step_{step}"
    verify(tmp_path / f"out/checkpoints/step_{step}")


def test_second_ctrl_c_stops_at_once_in_one_line(tmp_path):
    proc = start(tmp_path)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == ("error: interrupted (Ctrl-C); continue from the last checkpoint "
                                               "with --resume auto")


def test_ctrl_c_to_the_launchers_process_group_still_saves(tmp_path):
    launcher = start(tmp_path, launch=True)
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    assert workers
    os.killpg(launcher.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    stdout, _ = launcher.communicate(timeout=120)  # the pipes close once the training process has exited too
    deadline = time.monotonic() + 120
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert "stopped by SIGINT (Ctrl-C) at step" in stdout
    verify(list_checkpoints(tmp_path / "out/checkpoints")[-1])
