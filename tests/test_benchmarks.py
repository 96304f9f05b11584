"""The benchmark scripts keep working: each runs in a tiny mode and its JSON holds every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.common import ISOLATION, WorkerFailed, rotated, run_worker
from tests.conftest import ROOT, train_env

VARIANTS = ("loop", "trainer", "trainer_grouped")
RATES = ("samples_per_s", "real_tokens_per_s", "step_ms", "useful_tflops_per_s", "executed_tflops_per_s")


def run_benchmark(name: str, cwd: Path, *args: str, code: int = 0) -> tuple[dict[str, Any], str]:
    """Run benchmarks/<name>.py on the CPU with the tiny preset; its JSON and stderr."""
    out = cwd / f"{name}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--device", "cpu", "--preset", "tiny",
           "--json", str(out), *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=train_env(), timeout=300)
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text(encoding="utf-8")), proc.stderr


def assert_isolated(result: dict[str, Any], pids: list[int]) -> None:
    """Every run in a worker process of its own, none of them the benchmark's own process."""
    assert result["settings"]["isolation"] == ISOLATION
    assert len(set(pids)) == len(pids) == len(result["runs"]), pids
    assert result["settings"]["parent_pid"] not in pids


def test_throughput_reports_all_variants_ratios_and_breakdown(tmp_path):
    result, _ = run_benchmark("throughput", tmp_path, "--batch-size", "4", "--warmup-steps", "2", "--steps", "2",
                              "--profile-steps", "1", "--repeats", "1")
    assert result["complete"] is True
    assert result["device"]["kind"] == "cpu" and "cores" in result["device"]["name"]
    assert result["settings"]["parameters"] > 0 and result["settings"]["timed_steps"] == 2
    for name in VARIANTS:
        figures = result["variants"][name]
        assert all(figures[key] > 0 for key in RATES), figures
        assert 0 < figures["padding_efficiency"] <= 1
        assert figures["samples"] == 2 * 4  # timed steps x batch: warmup batches are excluded
    assert result["variants"]["loop"]["loop_logged_samples_per_s"] > 0
    for name in ("trainer", "trainer_grouped"):
        ratios = result["ratios"][f"loop_vs_{name}"]
        assert ratios["samples_per_s"] > 0 and ratios["real_tokens_per_s"] > 0
    breakdown = result["breakdown"]
    assert breakdown["sum_ms"] > 0 and breakdown["replica_step_ms_unsynchronized"] > 0
    assert {"forward (token_losses)", "backward"} <= set(breakdown["phases"])
    assert all(phase["ms"] >= 0 for phase in breakdown["phases"].values())
    assert result["settings"]["run_order"] == [*(f"{name}#1" for name in VARIANTS), "profile#1"]
    assert_isolated(result, [result["variants"][name]["pid"] for name in VARIANTS] + [breakdown["pid"]])


def test_throughput_compiled_variant_runs_compiled_with_buckets(tmp_path):
    result, _ = run_benchmark("throughput", tmp_path, "--batch-size", "4", "--warmup-steps", "2", "--steps", "2",
                              "--profile-steps", "0", "--repeats", "1", "--variants", "loop_compiled,loop")
    compiled, plain = result["variants"]["loop_compiled"], result["variants"]["loop"]
    assert compiled["samples_per_s"] > 0 and compiled["samples"] == plain["samples"] == 8
    assert compiled["compile_failed"] is None and plain["compile_failed"] is None
    assert compiled["padding_efficiency"] < plain["padding_efficiency"]  # padded up to the buckets
    assert result["ratios"]["loop_vs_loop_compiled"]["same_batches"]  # same samples, only the padding differs


def test_throughput_reports_a_failed_variant_and_keeps_what_finished(tmp_path):
    result, stderr = run_benchmark("throughput", tmp_path, "--batch-size", "4", "--warmup-steps", "1", "--steps", "1",
                                   "--profile-steps", "0", "--repeats", "1", "--variants", "trainer,loop",
                                   "--loop-set", "no_such.key=1", code=1)
    assert result["complete"] is False and list(result["variants"]) == ["trainer"]
    assert result["failed"]["run"] == "loop" and result["failed"]["reason"] == "exit status 1"
    assert "FAILED: loop (run 1)" in stderr and "no_such.key" in stderr  # the end of the worker's output


def test_runs_rotate_their_order_per_repeat():
    assert rotated(("a", "b", "c"), 3) == [("a", 0), ("b", 0), ("c", 0), ("b", 1), ("c", 1), ("a", 1),
                                           ("c", 2), ("a", 2), ("b", 2)]


def test_a_worker_past_its_time_limit_is_stopped_and_reported(tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(120)\n", encoding="utf-8")
    with pytest.raises(WorkerFailed) as caught:
        run_worker(script, tmp_path, "stuck", 0, timeout_s=5)
    assert caught.value.reason == "timed out after 5 s" and "started" in caught.value.tail


def test_eval_speed_times_both_paths_on_the_same_predictions(tmp_path):
    result, _ = run_benchmark("eval_speed", tmp_path, "--dev-rows", "8", "--eval-batch-size", "4",
                              "--max-new-tokens", "4", "--repeats", "1", "--rouge-tokenizer", "char",
                              "--static-cache")
    assert result["complete"] is True and result["settings"]["rouge_tokenizer"] == "char"
    loop, trainer = result["sides"]["loop"], result["sides"]["trainer"]
    assert loop["total_s"] > 0 and loop["rouge_s"] > 0 and loop["samples_per_s"] > 0
    assert trainer["total_s"] > 0 and trainer["predict_s"] > 0 and trainer["samples_per_s"] > 0
    assert result["speedup_loop_vs_trainer"] > 0
    assert loop["gen_len"] > 0 and trainer["gen_len"] > 0
    assert 0 <= result["identical_predictions"] <= 1
    default = result["sides"]["trainer_default_batch"]  # Trainer.predict at its own default eval batch, 8
    assert default["total_s"] > 0 and default["predict_s"] > 0 and default["gen_len"] > 0
    assert result["speedup_loop_vs_trainer_default_batch"] > 0
    assert (trainer["batch_size"], default["batch_size"]) == (4, 8)
    assert 0 < result["settings"]["source_padding_efficiency"]["trainer_default_batch"] <= 1
    static = result["sides"]["loop_static_cache"]  # --static-cache: the loop with generation.cache = static
    assert (loop["cache"], static["cache"]) == ("dynamic", "static")
    assert static["total_s"] > 0 and result["speedup_static_vs_dynamic_cache"] > 0
    assert result["identical_predictions_static_cache"] == 1.0  # a cache choice must not change a summary
    assert result["settings"]["run_order"] == ["loop#1", "trainer#1", "trainer_default_batch#1",
                                               "loop_static_cache#1"]
    assert_isolated(result, [loop["pid"], trainer["pid"], default["pid"], static["pid"]])


def test_overhead_times_each_event_and_projects_shares(tmp_path):
    result, _ = run_benchmark("overhead", tmp_path, "--repeats", "1", "--step-ms", "10", "--step-ms", "1000")
    seconds = result["seconds_per_event"]
    assert {"save (resumable state)", "export best model", "log training metrics", "eval samples table",
            "best-model artifact"} <= set(seconds) and all(v > 0 for v in seconds.values())
    assert seconds["save, background (training waits)"] > 0 and result["background_write_s"] > 0
    fast, slow = result["projections"][:2]  # async_save = true, then false
    assert fast["step_ms"] == 10 and 0 < slow["total_share"] < fast["total_share"] < 1
    assert fast["total_share"] == pytest.approx(fast["checkpoint_share"] + fast["tracking_share"])


def test_the_trainer_without_cudnn_attention_is_the_grouped_trainer_on_the_same_batches(tmp_path):
    # On a CPU the cuDNN switch changes nothing; what this checks is that the variant is the grouped Trainer.
    result, _ = run_benchmark("throughput", tmp_path, "--batch-size", "4", "--warmup-steps", "2", "--steps", "2",
                              "--profile-steps", "0", "--repeats", "1",
                              "--variants", "trainer_grouped,trainer_grouped_nocudnn")
    grouped, nocudnn = result["variants"]["trainer_grouped"], result["variants"]["trainer_grouped_nocudnn"]
    assert nocudnn["samples_per_s"] > 0 and nocudnn["samples"] == 2 * 4
    assert nocudnn["batches_fingerprint"] == grouped["batches_fingerprint"]


def test_memory_measures_each_variant_in_its_own_process(tmp_path):
    pytest.importorskip("peft")
    result, _ = run_benchmark("memory", tmp_path, "--batch-size", "2", "--warmup-steps", "1", "--steps", "1",
                              "--variants", "checkpointing,lora")  # plain and both: the same code, other keys
    assert result["complete"] is True and list(result["variants"]) == ["checkpointing", "lora"]
    runs = result["variants"]
    for figures in runs.values():
        assert figures["step_ms"] > 0 and figures["peak_rss_mb"] >= figures["start_rss_mb"] > 0
    full, lora = runs["checkpointing"], runs["lora"]
    assert full["keys"] == ["training.gradient_checkpointing=true"] and lora["keys"] == ["model.lora.enabled=true"]
    assert lora["trainable_parameters"] < full["trainable_parameters"] == full["parameters"] < lora["parameters"]
    assert_isolated(result, [figures["pid"] for figures in runs.values()])
