"""Speed features change nothing that is learned: shape buckets, compiled steps (and their fallback), the
sync-free skip of non-finite updates; plus the throughput/MFU and time-share accounting."""

from __future__ import annotations

import json

import pytest
import torch

from loop import flops, step
from loop.data import LABEL_PAD, bucket_length
from loop.wandb_offline import find_offline_runs, history_series, read_offline_run
from tests.conftest import run_train
from tests.test_losses import tiny_batch, tiny_model, tiny_tokenizer

SHORT = ["training.max_steps=6", "evaluation.eval_steps=100", "evaluation.logging_steps=1",
         "evaluation.eval_on_start=false", "model.scratch.dropout=0.0", "training.output_dir=out"]


def losses(path) -> list[tuple[int, float]]:
    return history_series(read_offline_run(find_offline_runs(path)[0]), "train/loss")


def test_fused_adamw_skips_a_non_finite_update_on_the_device():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(6))
    opt = torch.optim.AdamW([param], lr=0.1, fused=True)
    assert step.device_skip_optimizer(opt) is opt
    assert step.device_skip_optimizer(torch.optim.AdamW([param], lr=0.1)) is None  # not fused: host decides
    param.grad = torch.randn(6)
    opt.step()
    before = param.detach().clone()
    state = {k: v.clone() for k, v in opt.state[param].items()}
    param.grad = torch.full((6,), float("nan"))
    with step.found_inf(opt, torch.isfinite(torch.tensor(float("nan")))):
        opt.step()
    assert not hasattr(opt, "found_inf")
    assert torch.equal(param.detach(), before)
    assert all(torch.equal(v, opt.state[param][k]) for k, v in state.items())  # step count included
    param.grad = torch.randn(6)
    with step.found_inf(opt, torch.tensor(True)):
        opt.step()
    assert not torch.equal(param.detach(), before) and opt.state[param]["step"].item() == 2


def test_host_copy_keeps_the_value_at_copy_time():
    value = torch.tensor(3.0)
    copy = step.HostCopy(value)
    value.add_(1)
    assert copy.value().item() == 3.0


def test_flops_formula_and_peaks():
    from transformers import BartConfig

    shape = flops.seq2seq_shape(BartConfig(vocab_size=100, d_model=8, encoder_layers=2, decoder_layers=1,
                                           encoder_ffn_dim=16, decoder_ffn_dim=16))
    assert shape == {"d": 8, "ffn": 16, "enc": 2, "dec": 1, "vocab": 100}
    enc = 2 * (10 * (4 * 64 + 2 * 8 * 16) + 2 * 100 * 8)
    dec = 1 * (4 * (6 * 64 + 2 * 8 * 16) + 10 * 2 * 64 + 2 * 16 * 8 + 2 * 4 * 10 * 8)
    assert flops.train_flops(shape, 10, 4) == 6.0 * (enc + dec + 4 * 8 * 100)
    as_tensor = flops.train_flops(shape, torch.tensor([10.0, 10.0]), torch.tensor([4.0, 4.0]))
    assert as_tensor.tolist() == [6.0 * (enc + dec + 4 * 8 * 100)] * 2
    assert flops.peak_flops(torch.device("cpu")) is None
    assert flops.peak_flops(torch.device("cpu"), 2.5) == 2.5e12


def test_buckets_pad_to_few_shapes_without_changing_the_loss():
    from loop.data import make_collator
    from loop.loss import token_losses

    assert [bucket_length(n, [16, 32]) for n in (3, 16, 17, 33)] == [16, 16, 32, 33]
    model = tiny_model().eval()
    plain = tiny_batch(model)
    # Re-collate the same features through bucketed padding.
    features = [{"input_ids": ids[m.bool()].tolist(), "attention_mask": [1] * int(m.sum()),
                 "labels": lab[lab != LABEL_PAD].tolist(), "idx": i}
                for i, (ids, m, lab) in enumerate(zip(plain["input_ids"], plain["attention_mask"], plain["labels"],
                                                      strict=True))]
    collate = make_collator(tiny_tokenizer(), model, [20, 40], [12])
    bucketed = collate(features)
    assert bucketed["input_ids"].shape[1] == 20 and bucketed["labels"].shape[1] == 12
    assert plain["input_ids"].shape[1] < 20 and plain["labels"].shape[1] < 12
    # Decoder inputs are the labels shifted right: beyond the longest label they are pad, never -100.
    assert (bucketed["decoder_input_ids"][:, plain["labels"].shape[1] + 1:] == 1).all()
    with torch.no_grad():
        a, count_a = token_losses(model, plain)
        b, count_b = token_losses(model, bucketed)
    assert torch.equal(count_a, count_b)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_step_with_buckets_learns_what_eager_learns(tmp_path):
    buckets = ["data.source_buckets=[64, 128]", "data.target_buckets=[24, 48]"]
    (tmp_path / "eager").mkdir()
    (tmp_path / "compiled").mkdir()
    eager = run_train(tmp_path / "eager", *SHORT, *buckets)
    compiled = run_train(tmp_path / "compiled", *SHORT, *buckets, "training.torch_compile=default")
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-3000:]
    assert "torch.compile" not in compiled.stdout  # no fallback warning: it really ran compiled
    a, b = losses(tmp_path / "eager/out"), losses(tmp_path / "compiled/out")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=2e-4)


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(tmp_path):
    (tmp_path / "eager").mkdir()
    (tmp_path / "broken").mkdir()
    run_train(tmp_path / "eager", *SHORT)
    broken = run_train(tmp_path / "broken", *SHORT, "training.torch_compile=reduce-overhead",
                       extra_env={"LOOP_FAULT_COMPILE_ERROR": "1"})
    assert broken.returncode == 0, broken.stderr[-3000:]
    warnings = [line for line in broken.stdout.splitlines() if "torch.compile" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: torch.compile (mode reduce-overhead) failed")
    assert "training continues without it" in warnings[0]
    assert losses(tmp_path / "broken/out") == losses(tmp_path / "eager/out")  # the failed try left no trace


def test_time_shares_and_mfu_are_reported(tmp_path):
    proc = run_train(tmp_path, "training.max_steps=4", "evaluation.eval_steps=2", "evaluation.save_steps=2",
                     "evaluation.logging_steps=2", "training.peak_tflops=1", "training.output_dir=out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out/final_metrics.json").read_text())["time"]
    share = report["share"]
    assert set(share) == {"training", "evaluation", "checkpoints", "tracking"}
    assert sum(share.values()) == pytest.approx(1.0) and all(v > 0 for v in share.values())
    assert report["seconds"]["checkpoints"] > 0 and report["seconds"]["loop"] > report["seconds"]["training"]
    assert "time in the loop" in proc.stdout
    run = read_offline_run(find_offline_runs(tmp_path / "out")[0])
    assert run.summary["time/checkpoints_share"] == pytest.approx(share["checkpoints"])
    mfu = history_series(run, "train/mfu")
    assert [s for s, _ in mfu] == [2, 4] and all(0 < v < 1 for _, v in mfu)
    assert all(v > 0 for _, v in history_series(run, "train/tokens_per_s"))
