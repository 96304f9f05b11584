"""A compiled step sees only the padded batch shapes: with buckets, each bucket compiles once (no recompile for a new
number of label tokens), the loss is the label-position path's, and the compile counts and seconds are reported."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from packaging.version import Version

from loop.compiled import LAYERDROP_GUARDED, CompiledLoss, graph_break_note
from loop.data import LABEL_PAD, make_collator
from loop.loss import LabelLogits, token_losses
from loop.state import TimeSplit, TrainState
from tests.conftest import run_train
from tests.test_losses import tiny_model, tiny_tokenizer

SOURCE_BUCKETS, TARGET_BUCKETS = [16, 24], [8, 12]


def features(seed: int, source_max: int, target_max: int) -> list[dict]:
    """Four samples whose lengths fall in the buckets of (source_max, target_max), with a random label count."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(4):
        s = int(torch.randint(source_max - 6, source_max - 1, (1,), generator=g))
        t = int(torch.randint(2, target_max - 1, (1,), generator=g))
        source, target = (torch.randint(5, 64, (n,), generator=g).tolist() for n in (s, t))
        out.append({"input_ids": [0, *source, 2], "attention_mask": [1] * (s + 2), "labels": [0, *target, 2], "idx": i})
    return out


@pytest.fixture
def fresh_dynamo(monkeypatch):
    """No compiled code left from other tests in this process (their cache entries would hide compiles), and
    torch.compile with the aot_eager backend: dynamo's guards, which decide every recompile, and the lazy backward
    compile are the same as with inductor, without inductor's C++ builds (80 s on 2 cores). The run test below
    compiles with the real default backend."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="aot_eager", **kw))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_each_bucket_compiles_once_whatever_its_label_count(fresh_dynamo):
    model = tiny_model().train()
    collate = make_collator(tiny_tokenizer(), model, SOURCE_BUCKETS, TARGET_BUCKETS)
    head = LabelLogits(model)  # handed in as the eager path would be: the compiled path must not use it
    loss_fn = CompiledLoss(token_losses, "default", print)
    # Bucket (16, 8) three times, (24, 12) twice, then both again; the label counts differ from step to step.
    plan = [(16, 8), (16, 8), (16, 8), (24, 12), (24, 12), (16, 8), (24, 12)]
    seen, label_counts = set(), {}
    try:
        for step, (source, target) in enumerate(plan):
            batch = collate(features(step, source, target))
            shape = (tuple(batch["input_ids"].shape), tuple(batch["labels"].shape))
            assert shape == ((4, source), (4, target))
            label_counts.setdefault(shape, set()).add(int((batch["labels"] != LABEL_PAD).sum()))
            before = dict(loss_fn.events.counts)
            loss_fn(model, batch, head)[0].sum().backward()
            after = dict(loss_fn.events.counts)
            if shape in seen:
                assert after == before, f"step {step} (bucket {shape}, seen before) compiled again: {after} vs {before}"
            else:
                assert after["dynamo_compiles"] > before["dynamo_compiles"]
            seen.add(shape)
    finally:
        loss_fn.events.close()
    assert all(len(counts) > 1 for counts in label_counts.values())  # the label count did change within a bucket
    assert loss_fn.events.counts["cudagraphs_recorded"] == 0 and loss_fn.events.seconds > 0


def test_the_compiled_loss_is_the_label_position_loss(fresh_dynamo):
    model = tiny_model().eval()
    feats = features(3, 16, 6)  # labels of at most 6 tokens: the bucket of 8 pads them further
    plain = make_collator(tiny_tokenizer(), model)(feats)
    bucketed = make_collator(tiny_tokenizer(), model, SOURCE_BUCKETS, TARGET_BUCKETS)(feats)
    assert bucketed["labels"].shape[1] > plain["labels"].shape[1]  # padded further
    loss_fn = CompiledLoss(token_losses, "default", print)
    try:
        with torch.no_grad():
            compiled, compiled_counts = loss_fn(model, bucketed, LabelLogits(model))
            eager, eager_counts = token_losses(model, plain, LabelLogits(model))
    finally:
        loss_fn.events.close()
    assert torch.equal(compiled_counts, eager_counts)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.xfail(Version(transformers.__version__) < Version(LAYERDROP_GUARDED), strict=True,
                   reason="BART's layer-drop check splits the compiled graph at every layer before transformers 5.23")
def test_a_compiled_run_reports_its_compiles_and_their_seconds(tmp_path):
    proc = run_train(tmp_path, "training.max_steps=3", "evaluation.eval_steps=100", "evaluation.logging_steps=1",
                     "evaluation.eval_on_start=false", "training.output_dir=out", "training.torch_compile=default",
                     "data.source_buckets=[128]", "data.target_buckets=[48]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = json.loads((tmp_path / "out/final_metrics.json").read_text())["time"]["compile"]
    # backward_compiles may be 0: with inductor's on-disk caches warm, the backward graph is loaded, not compiled.
    assert compiled["dynamo_compiles"] >= 1
    assert compiled["recompiles"] == 0  # one bucket: one shape, whatever the label counts
    assert compiled["cudagraphs_recorded"] == 0  # no CUDA graphs on the CPU
    assert 0 < compiled["share_of_training"] <= 1
    line = next(line for line in proc.stdout.splitlines() if line.startswith("time in the loop"))
    assert f"compiling {compiled['seconds']:.1f} s of training" in line and "0 recompiles" in line
    saved = json.loads((tmp_path / "out/checkpoints/step_3/trainer_state.json").read_text())["time"]
    assert saved["compile"] == pytest.approx(compiled["seconds"], abs=1.0) and saved["compiles"]["recompiles"] == 0


def test_an_eager_run_reports_no_compiles():
    split = TimeSplit(loop=10.0, eval=2.0)
    assert split.report()["compile"] == {"seconds": 0.0, "share_of_training": 0.0, "dynamo_compiles": 0,
                                         "recompiles": 0, "backward_compiles": 0, "cudagraphs_recorded": 0}


def test_a_trainer_state_written_before_compiles_were_counted_still_reads():
    old = TrainState(step=5).to_dict()
    old["time"] = {k: v for k, v in old["time"].items() if k not in ("compile", "compiles")}
    state = TrainState.from_dict(json.loads(json.dumps(old)))
    assert state.step == 5 and state.time.compile == 0.0 and state.time.compiles["recompiles"] == 0
    with pytest.raises(ValueError, match=r"time\.compiles"):
        TrainState.from_dict({**old, "time": {**old["time"], "compiles": {"recompiles": "many"}}})


def test_compile_counts_add_up_over_launches():
    class Events:
        seconds, counts = 2.0, {"dynamo_compiles": 3, "recompiles": 1}

    split = TimeSplit.from_dict({"loop": 5.0, "eval": 0.0, "checkpoint": 0.0, "tracking": 0.0, "compile": 1.5,
                                 "compiles": {"dynamo_compiles": 2, "recompiles": 0}})
    split.follow_compiles(Events())
    split.read_clock()
    assert split.compile == 3.5 and split.compiles["dynamo_compiles"] == 5 and split.compiles["recompiles"] == 1


@pytest.mark.parametrize(("version", "said"),
                         [("5.17.0", True), ("4.46.3", True), ("5.23.0", False), ("5.24.1", False)])
def test_a_transformers_that_breaks_the_compiled_graph_at_every_layer_is_named(version, said):
    note = graph_break_note(tiny_model(), "default", version)
    assert (note is not None) == said
    if said:
        assert note.startswith(f"note: with transformers {version}, bart's layer-drop check splits")
        assert "transformers >= 5.23 compiles it whole" in note
    assert graph_break_note(tiny_model(), "off", version) is None


def test_a_model_without_layer_drop_gets_no_note():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    assert graph_break_note(t5, "reduce-overhead", "5.17.0") is None
