"""training.attention_backend: which SDPA kernels a run may use (the decision table), that the switches take effect,
and that `math` and `auto` train on the CPU."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from loop import attention
from loop.config import load_config
from loop.errors import UserError
from loop.resume import APPLY, rule
from loop.wandb_offline import find_offline_runs, history_series, read_offline_run
from tests.conftest import run_train

ONLY = {name: {k: k == name for k in attention.KERNELS} for name in attention.KERNELS}


@pytest.fixture
def restore_switches():
    """The process-wide kernel switches as they were before the test."""
    saved = attention.enabled_now()
    yield
    attention.apply(attention.Decision(saved))


@pytest.mark.parametrize("static_shapes, flags", [(False, {"cudnn": False}), (True, {})])
def test_auto_on_cuda_turns_cudnn_off_unless_both_lengths_are_bucketed(static_shapes, flags):
    decision = attention.choose("auto", "cuda", static_shapes)
    assert decision.flags == flags
    assert (decision.note is None) == static_shapes  # a note only when something changes
    if not static_shapes:
        assert decision.note.startswith("note: attention: cuDNN SDPA off") and "\n" not in decision.note


@pytest.mark.parametrize("static_shapes", [False, True])
def test_auto_on_the_cpu_changes_nothing(static_shapes):
    assert attention.choose("auto", "cpu", static_shapes) == attention.Decision()


@pytest.mark.parametrize("backend", attention.KERNELS)
@pytest.mark.parametrize("static_shapes", [False, True])
def test_a_named_backend_on_cuda_enables_only_that_kernel(backend, static_shapes):
    decision = attention.choose(backend, "cuda", static_shapes)
    assert decision.flags == ONLY[backend]
    assert decision.note == f"note: attention: SDPA {backend} kernel only (training.attention_backend = {backend!r})"


@pytest.mark.parametrize("backend", ["flash", "math"])
def test_flash_and_math_can_be_named_on_the_cpu(backend):
    assert attention.choose(backend, "cpu", False).flags == ONLY[backend]


@pytest.mark.parametrize("backend", ["efficient", "cudnn"])
def test_gpu_only_kernels_on_the_cpu_are_a_one_line_error(backend):
    with pytest.raises(UserError, match=re.escape(f"training.attention_backend = '{backend}' needs a CUDA GPU")) as err:
        attention.choose(backend, "cpu", True)
    assert "\n" not in str(err.value)


def test_a_bad_value_is_a_one_line_config_error():
    with pytest.raises(UserError, match=r"training\.attention_backend") as err:
        load_config(None, ["training.attention_backend=fastest"])
    assert "\n" not in str(err.value)
    assert load_config(None, []).training.attention_backend == "auto"


def test_resume_applies_a_changed_backend():
    assert rule("training.attention_backend") == (APPLY, "speed only")


def test_the_switches_take_effect_on_the_cpu(restore_switches):
    q = torch.randn(2, 2, 5, 8)
    mask = torch.zeros(2, 1, 5, 5)
    attention.apply(attention.choose("math", "cpu", False))
    assert attention.enabled_now() == {**ONLY["math"]}
    math_out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    attention.apply(attention.Decision(dict.fromkeys(attention.KERNELS, False)))
    with pytest.raises(RuntimeError):  # nothing enabled: the CPU has no kernel left, so the switches are obeyed
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    attention.apply(attention.choose("flash", "cpu", False))
    torch.testing.assert_close(F.scaled_dot_product_attention(q, q, q, attn_mask=mask), math_out)


@pytest.mark.parametrize("backend, device_type, flags", [
    ("auto", "cuda", {"cudnn": False}), ("auto", "cpu", {}), ("cudnn", "cuda", {}), ("math", "cuda", {})])
def test_decoding_keeps_cudnn_off_under_auto_on_cuda_only(backend, device_type, flags):
    assert attention.decoding_decision(backend, device_type).flags == flags


def test_decoding_sets_the_switches_inside_and_restores_them_after(restore_switches):
    attention.apply(attention.Decision({"cudnn": True}))
    with attention.decoding("auto", "cuda"):
        assert attention.enabled_now()["cudnn"] is False
    assert attention.enabled_now()["cudnn"] is True
    with pytest.raises(RuntimeError), attention.decoding("auto", "cuda"):
        raise RuntimeError("generation failed")
    assert attention.enabled_now()["cudnn"] is True  # restored on the way out of an error too


def test_the_demo_model_runs_sdpa_attention(tokenizer):
    from loop.model import build_model

    model = build_model(load_config(None, ["model.scratch.d_model=32", "model.scratch.ffn_dim=64"]), tokenizer)
    assert model.config._attn_implementation == "sdpa"
    assert attention.model_note(model, "math") is None


def test_a_model_without_sdpa_is_warned_about_when_a_kernel_is_named():
    eager = SimpleNamespace(config=SimpleNamespace(_attn_implementation="eager"))
    assert attention.model_note(eager, "auto") is None
    assert attention.model_note(eager, "math") == ("warning: training.attention_backend = 'math' has no effect: the "
                                                   "model runs 'eager' attention, not SDPA")


def test_math_and_auto_train_on_the_cpu(tmp_path):
    short = ["training.max_steps=2", "evaluation.logging_steps=1", "evaluation.eval_on_start=false",
             "model.scratch.dropout=0.0", "training.output_dir=out"]
    losses = {}
    for backend in ("auto", "math"):
        (tmp_path / backend).mkdir()
        proc = run_train(tmp_path / backend, *short, f"training.attention_backend={backend}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        notes = [line for line in proc.stdout.splitlines() if line.startswith("note: attention")]
        assert notes == ([] if backend == "auto" else
                         ["note: attention: SDPA math kernel only (training.attention_backend = 'math')"])
        assert json.loads((tmp_path / backend / "out/final_metrics.json").read_text())["step"] == 2
        losses[backend] = history_series(read_offline_run(find_offline_runs(tmp_path / backend / "out")[0]),
                                         "train/loss")
    assert [s for s, _ in losses["math"]] == [1, 2]
    assert [v for _, v in losses["math"]] == pytest.approx([v for _, v in losses["auto"]], rel=1e-4)
