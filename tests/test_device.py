"""CPU threads: a run through `accelerate launch` uses the machine's physical cores unless the user chose a thread
count; mixed precision `auto` resolves by device."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from loop.device import resolve_precision
from tests.conftest import ROOT, train_env

PROBE = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from accelerate import Accelerator
from loop.device import use_all_cores
print("threads before", torch.get_num_threads())
note = use_all_cores(Accelerator(cpu=True))
print("threads after", torch.get_num_threads(), "note", bool(note))
"""


def probe(tmp_path, **env: str) -> str:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    base = {k: v for k, v in train_env().items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**base, **env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_accelerate_launchs_one_thread_default_is_replaced_by_the_physical_cores(tmp_path):
    cores = min(psutil.cpu_count(logical=False) or 1, len(os.sched_getaffinity(0)))
    out = probe(tmp_path)
    assert "threads before 1" in out  # what the launcher exported
    assert f"threads after {cores} note {cores > 1}" in out


def test_a_thread_count_the_user_set_is_kept(tmp_path):
    out = probe(tmp_path, OMP_NUM_THREADS="1")
    assert "threads after 1 note False" in out


def test_auto_precision_follows_the_device():
    assert resolve_precision("auto", cuda=True) == "fp16" and resolve_precision("auto", cuda=False) == "no"
    assert resolve_precision("bf16", cuda=False) == "bf16"
