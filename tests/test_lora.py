"""LoRA ([model.lora]): adapters only train and are checkpointed, resume is exact, best/ is merged + the adapter."""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForSeq2SeqLM,
)

from loop import lora, predict
from loop.config import LoraConfig, load_config
from loop.errors import UserError, run_cli
from loop.wandb_offline import find_offline_runs, read_offline_run
from tests.conftest import run_train, tiny_seq2seq

pytest.importorskip("peft")

# 4 optimizer steps of batch 8, dropout on, gradient checkpointing on (so this also trains with it through the
# command), a checkpoint at step 2 and 4; one short eval at the end, so best/ and the artifact exist.
LORA = ["model.lora.enabled=true", "model.lora.r=4", "training.gradient_checkpointing=true",
        "training.batch_size=8", "training.max_steps=4", "evaluation.eval_steps=100", "evaluation.save_steps=2",
        "evaluation.eval_on_start=false", "evaluation.logging_steps=1", "generation.max_new_tokens=8",
        "data.synthetic_dev_rows=4", "evaluation.rouge_tokenizer=char", "wandb.table_rows=0",
        "training.output_dir=out"]

def tiny(family: str, vocab: int = 120) -> torch.nn.Module:
    """A tiny BART or T5 from a config, dropout off (logits compare exactly)."""
    return tiny_seq2seq(family, vocab)


def batch(vocab: int = 120) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 9), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "decoder_input_ids": torch.randint(3, vocab, (2, 5), generator=gen)}


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_trained_adapters_merge_into_a_plain_model_with_the_same_logits(family, tmp_path):
    model = lora.wrap(tiny(family), LoraConfig(enabled=True, r=4, dropout=0.0))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # lora_B starts at zero: train so that the merge has something to add
        model(**batch(), labels=batch()["decoder_input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    model.eval()
    with torch.no_grad():
        expected = model(**batch()).logits
        plain = tiny(family).eval()
        assert not torch.allclose(plain(**batch()).logits, expected, atol=1e-4)  # the adapters changed something

        lora.save_best(model, tmp_path, torch.save)
        merged, info = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert torch.allclose(merged.eval()(**batch()).logits, expected, atol=1e-5)
        assert not any("lora" in k for k in load_file(tmp_path / "model.safetensors"))

        from peft import PeftModel

        adapter = tmp_path / lora.ADAPTER_DIR
        assert (adapter / "adapter_model.safetensors").is_file() and not list(adapter.glob("*.bin"))
        reloaded = PeftModel.from_pretrained(tiny(family), adapter).eval()
        assert torch.allclose(reloaded(**batch()).logits, expected, atol=1e-5)
    # The export left the training model as it was (no merge into its frozen weights).
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)


def test_default_targets_are_the_query_and_value_projections_per_family():
    assert lora.target_modules(tiny("bart"), LoraConfig()) == ["q_proj", "v_proj"]
    assert lora.target_modules(tiny("t5"), LoraConfig()) == ["q", "v"]


def test_a_target_module_that_matches_nothing_is_one_line_naming_the_key():
    with pytest.raises(UserError, match=r"^`model.lora.target_modules`: 'query' matches no linear layer of this "
                                        r"t5 model \(its linear layers are named .*\bq\b"):
        lora.target_modules(tiny("t5"), LoraConfig(target_modules=["q", "query"]))


def test_lora_without_peft_says_how_to_install_it(monkeypatch):
    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("No module named 'peft'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(UserError, match=r"^model.lora needs peft: pip install -e '\.\[lora\]'$"):
        lora.wrap(tiny("bart"), LoraConfig(enabled=True))


def test_lora_is_off_by_default():
    assert load_config().model.lora.enabled is False
    assert load_config().training.gradient_checkpointing is False


# ---- through the real command ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted LoRA run (with gradient checkpointing on): its run directory."""
    cwd = tmp_path_factory.mktemp("lora-reference")
    proc = run_train(cwd, *LORA)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parameters trainable" in proc.stdout
    return cwd / "out"


@pytest.fixture(scope="module")
def resumed(reference, tmp_path_factory) -> Path:
    """A copy of the reference run resumed from its step 2 checkpoint (a fresh process, the base rebuilt from
    the seed): its run directory. (A stop by a signal before the resume is tested without LoRA, test_resume.py.)"""
    cwd = tmp_path_factory.mktemp("lora-resumed")
    shutil.copytree(reference.parent, cwd, dirs_exist_ok=True)
    for later in ("checkpoints/step_4", "best", "artifacts"):
        shutil.rmtree(cwd / "out" / later)
    proc = run_train(cwd, *LORA, extra_args=("--resume", "out/checkpoints/step_2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from out/checkpoints/step_2 at step 2" in proc.stdout
    return cwd / "out"


def test_checkpoints_hold_only_the_adapters_and_the_base_fingerprint(reference):
    ckpt = reference / "checkpoints/step_4"
    tensors = load_file(ckpt / "model.safetensors")
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors), sorted(tensors)[:4]
    record = json.loads((ckpt / lora.BASE_FILE).read_text(encoding="utf-8"))
    assert record["target_modules"] == ["q_proj", "v_proj"] and record["r"] == 4 and len(record["base_sha256"]) == 64
    assert lora.BASE_FILE in json.loads((ckpt / "manifest.json").read_text(encoding="utf-8"))["files"]
    moments = [t for k, t in load_file(ckpt / "optimizer.safetensors").items() if "exp_avg" in k]
    assert sum(t.numel() for t in moments) == 2 * sum(t.numel() for t in tensors.values())  # AdamW's, adapters only


def test_a_lora_run_resumed_from_its_checkpoint_equals_the_uninterrupted_one_bit_for_bit(reference, resumed):
    for name in ("checkpoints/step_4/model.safetensors", "checkpoints/step_4/optimizer.safetensors",
                 "best/model.safetensors"):
        expected, actual = load_file(reference / name), load_file(resumed / name)
        assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected), name


def test_a_resume_onto_another_base_is_refused(resumed):
    with pytest.raises(UserError, match=r"frozen base weights differ from the ones the adapters were trained on"):
        lora.check_base(resumed / "checkpoints/step_4", "0" * 64)


def test_best_is_a_merged_model_that_plain_from_pretrained_and_predict_load(reference, tmp_path, capsys):
    best = reference / "best"
    _, info = AutoModelForSeq2SeqLM.from_pretrained(best, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not any("lora" in k for k in load_file(best / "model.safetensors"))
    source = tmp_path / "test.csv"
    source.write_text('fname,dialogue\nt1,"#Person1#: 내일 몇 시에 만날까요?\n#Person2#: 세 시요."\n', encoding="utf-8")
    argv = ["--model", str(best), "--input", str(source), "--output", str(tmp_path / "sub.csv")]
    assert run_cli(predict.main, argv) == 0, capsys.readouterr().err
    assert (tmp_path / "sub.csv").read_text(encoding="utf-8").startswith("fname,summary\nt1,")
    cfg, source = predict.load_settings(best, [])  # the run's settings, exported with the merged model
    assert source == str(best / "loop_config.toml") and cfg.model.lora.enabled and cfg.model.lora.r == 4
    config = json.loads((best / lora.ADAPTER_DIR / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_the_model_artifact_records_merged_weights_and_the_adapter(reference):
    run = read_offline_run(find_offline_runs(reference)[0])
    (art,) = [a for a in run.artifacts if a["type"] == "model"]
    meta = art["metadata"]
    assert meta["weights"] == "merged"
    assert meta["lora"]["r"] == 4 and meta["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert {"model.safetensors", "loop_config.toml", "adapter/adapter_model.safetensors",
            "adapter/adapter_config.json"} <= set(
        art["manifest"])
