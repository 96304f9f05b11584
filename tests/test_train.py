"""The training loop end to end: a real `accelerate launch` of a tiny config, read back from its files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from loop.config import load_config
from loop.wandb_offline import find_offline_runs, history_series, read_offline_run
from tests.conftest import run_train

HISTORY_KEYS = {
    "train/loss", "train/lr", "train/grad_norm", "train/epoch", "train/samples_per_s", "train/tokens_per_s",
    "eval/loss", "eval/rouge_1", "eval/rouge_2", "eval/rouge_l", "eval/gen_len", "eval/num_samples",
}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One launched run: 8 steps, eval every 4 (and at 0), save every 4, log every 2."""
    cwd = tmp_path_factory.mktemp("demo")
    proc = run_train(cwd, "training.max_steps=8", "evaluation.eval_steps=4", "evaluation.save_steps=4",
                     "evaluation.logging_steps=2", "training.output_dir=out", "wandb.experimenter=tester",
                     "wandb.notes=tiny e2e", "wandb.log_dataset=true", launch=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = cwd / "out"
    return {"proc": proc, "out": out, "run": read_offline_run(find_offline_runs(out)[0])}


def test_run_prints_final_line_and_samples(demo_run):
    stdout = demo_run["proc"].stdout
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("done: best eval/rouge_l = ")
    assert "best model: out/best" in last and "wandb sync " in last
    assert stdout.count("  reference:  ") == 2 and stdout.count("  prediction: ") == 2
    assert "Traceback" not in demo_run["proc"].stderr


def test_resolved_config_is_saved_and_logged(demo_run):
    out, run = demo_run["out"], demo_run["run"]
    saved = load_config(out / "config.toml")
    assert saved.training.max_steps == 8 and saved.model.scratch.d_model == 32
    assert run.config == saved.to_dict()


def test_wandb_run_follows_naming_conventions(demo_run):
    run = demo_run["run"]
    assert run.name == "demo-bart_v1_lr0.002_bs16"
    assert run.group == "demo-bart_experiments" and run.job_type == "training"
    assert run.tags == ["model:demo-bart", "data:v1", "experimental", "experimenter:tester"]
    assert run.notes == "tiny e2e" and run.project == "dialogue-summarization"
    assert run.complete and run.exit_code == 0
    assert Path(run.path).parent == (demo_run["out"] / "wandb").resolve()


def test_history_on_one_monotonic_step_axis(demo_run):
    run = demo_run["run"]
    keys = {k for row in run.history for k in row}
    assert keys >= HISTORY_KEYS
    steps = [row["_step"] for row in run.history]
    assert steps == sorted(steps)
    assert [s for s, _ in history_series(run, "eval/rouge_l")] == [0, 4, 8]
    assert [s for s, _ in history_series(run, "train/loss")] == [2, 4, 6, 8]
    assert all(v == 12 for _, v in history_series(run, "eval/num_samples"))
    losses = [v for _, v in history_series(run, "train/loss")]
    assert losses[-1] < losses[0]  # it learns
    assert any(k.startswith("eval/samples") for k in keys)  # the predictions table
    assert any(k.startswith("charts/loss") for k in keys) and any(k.startswith("charts/rouge") for k in keys)
    assert {"final/rouge_l", "final/loss"} <= keys


def test_best_model_exported_and_summarised(demo_run):
    out, run = demo_run["out"], demo_run["run"]
    final = json.loads((out / "final_metrics.json").read_text())
    evals = history_series(run, "eval/rouge_l")
    best_step, best_value = max(evals, key=lambda sv: sv[1])  # the first step that reached the max
    assert run.summary["best/rouge_l"] == pytest.approx(best_value)
    assert run.summary["best/step"] == best_step == final["best_step"]
    metrics = json.loads((out / "best/metrics.json").read_text())
    assert metrics["step"] == best_step and metrics["rouge_l"] == pytest.approx(best_value)
    assert metrics["rouge_tokenizer"] == "mecab"
    assert not list((out / "best").glob("optimizer*"))


def test_best_model_loads_with_auto_classes(demo_run):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    best = demo_run["out"] / "best"
    model = AutoModelForSeq2SeqLM.from_pretrained(best)
    tokenizer = AutoTokenizer.from_pretrained(best)
    assert tokenizer.convert_tokens_to_ids("#Person1#") != tokenizer.unk_token_id
    ids = tokenizer("#Person1#: 안녕하세요.", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=5)
    assert generated.shape[0] == 1
    saved = load_file(best / "model.safetensors")
    assert any(k.endswith("embed_tokens.weight") or k == "model.shared.weight" for k in saved)


def test_best_artifact_logged_with_aliases_and_manifest(demo_run):
    out, run = demo_run["out"], demo_run["run"]
    models = [a for a in run.artifacts if a["type"] == "model"]
    assert models, "no model artifact"
    last = models[-1]
    best_step = run.summary["best/step"]
    assert {"best", f"step-{best_step}"} <= set(last["aliases"])
    assert last["metadata"]["step"] == best_step
    assert last["metadata"]["rouge_l"] == pytest.approx(run.summary["best/rouge_l"])
    assert last["metadata"]["weights"] == "full" and not last["metadata"].get("lora")  # no LoRA: the model itself
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json",
            "metrics.json"} <= set(last["manifest"])
    assert not any("optimizer" in name for name in last["manifest"])
    # No second copy of the weights: the artifact's file is a hard link to the exported best model.
    local = Path(last["manifest"]["model.safetensors"]["local_path"])
    assert local.stat().st_ino == (out / "best/model.safetensors").stat().st_ino


def test_dataset_logged_once_as_an_artifact(demo_run):
    datasets = [a for a in demo_run["run"].artifacts if a["type"] == "dataset"]
    assert len(datasets) == 1 and datasets[0]["name"] == "dialogsum-v1"
    assert set(datasets[0]["manifest"]) == {"train.csv", "dev.csv"}


def test_resumable_state_saved_every_save_steps(demo_run):
    ckpts = demo_run["out"] / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_4", "step_8"]
    assert (ckpts / "latest").read_text().strip() == "step_8"
    state = json.loads((ckpts / "step_8/trainer_state.json").read_text())
    assert state["step"] == 8 and state["wandb_run_id"] == demo_run["run"].id
    assert (ckpts / "step_8/optimizer.safetensors").exists() and (ckpts / "step_8/manifest.json").exists()


def _grad_norm_and_weights(cwd: Path, batch: int, accum: int, *extra: str) -> tuple[list[float], dict]:
    proc = run_train(cwd, *extra, f"training.batch_size={batch}", f"training.gradient_accumulation_steps={accum}",
                     "training.max_steps=2", "training.max_grad_norm=0", "model.scratch.dropout=0",
                     "evaluation.logging_steps=1", "evaluation.eval_steps=100", "evaluation.save_steps=100",
                     "evaluation.eval_on_start=false", "training.output_dir=out", "training.warmup_ratio=0",
                     "wandb.table_rows=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = read_offline_run(find_offline_runs(cwd / "out")[0])
    norms = [v for _, v in history_series(run, "train/grad_norm")]
    losses = [v for _, v in history_series(run, "train/loss")]
    return norms + losses, load_file(cwd / "out/checkpoints/step_2/model.safetensors")


@pytest.mark.parametrize("smoothing", ["0.0", "0.1"])
def test_gradient_accumulation_matches_the_full_batch(tmp_path, smoothing):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    extra = f"training.label_smoothing={smoothing}"
    full, full_weights = _grad_norm_and_weights(tmp_path / "a", 16, 1, extra)
    split, split_weights = _grad_norm_and_weights(tmp_path / "b", 8, 2, extra)
    assert split == pytest.approx(full, rel=1e-5)  # grad norms and token-weighted losses of both steps
    for name, tensor in full_weights.items():
        assert (tensor - split_weights[name]).abs().max().item() < 1e-5, name
