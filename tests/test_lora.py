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


# ---- the embedding rows of added tokens ------------------------------------------------------------------------

ADDED = [120, 121, 122, 123]  # rows the resize adds to the tiny models' 120, as for tokens added to a tokenizer


def resized(family: str) -> torch.nn.Module:
    """A tiny model resized by 4 rows (fresh values), as build_model resizes for tokens load_tokenizer added."""
    if family == "bart-untied":  # every vocabulary module its own weight: peft's dict form
        from transformers import BartConfig, BartForConditionalGeneration

        torch.manual_seed(0)
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=120, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
            dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
            scale_embedding=True, tie_word_embeddings=False))
    else:
        model = tiny(family)
    model.resize_token_embeddings(124)
    return model


def token_batch() -> dict[str, torch.Tensor]:
    """Inputs and targets that contain every added token (a speaker token in a dialogue and its summary)."""
    ids = batch()
    ids["input_ids"][:, :4] = torch.tensor(ADDED)
    ids["decoder_input_ids"][:, 1:5] = torch.tensor(ADDED)
    return ids


def vocab_rows(model) -> dict[str, torch.Tensor]:
    """Each vocabulary module's weight as the forward pass sees it (added rows included), by name."""
    from peft.utils.other import TrainableTokensWrapper

    base = model.get_base_model()
    return {n: m.token_adapter.get_merged_weights(["default"]).detach().clone()
            for n, m in base.named_modules() if isinstance(m, TrainableTokensWrapper)}


@pytest.mark.parametrize("family", ["bart", "t5", "bart-untied"])
def test_added_token_rows_train_and_merge_into_a_plain_model_with_the_same_logits(family, tmp_path):
    model = lora.wrap(resized(family), LoraConfig(enabled=True, r=4, dropout=0.0), ADDED)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert trainable and all(n.endswith(".token_adapter.trainable_tokens_delta.default") for n in trainable)
    # Tied: one set of rows for every module. Untied: the resized input embedding (the encoder's and decoder's
    # too) and the LM head each have theirs.
    assert len(trainable) == (2 if family == "bart-untied" else 1)
    assert lora.describe(LoraConfig(), model)["trainable_tokens"] == 4
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    fingerprint, before = lora.base_fingerprint(model), vocab_rows(model)
    assert "lm_head" in before
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(**token_batch(), labels=token_batch()["decoder_input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    # The added rows trained in every module that reads them; the pretrained rows and every frozen weight did not.
    after = vocab_rows(model)
    for name in before:
        assert not torch.equal(after[name][ADDED], before[name][ADDED]), name
        assert torch.equal(after[name][:120], before[name][:120]), name
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    assert lora.base_fingerprint(model) == fingerprint

    model.eval()
    with torch.no_grad():
        expected = model(**token_batch()).logits
        lora.save_best(model, tmp_path, torch.save)
        merged, info = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert torch.allclose(merged.eval()(**token_batch()).logits, expected, atol=1e-5)
        saved = load_file(tmp_path / "model.safetensors")
        assert not any("lora" in k or "token_adapter" in k or "trainable_tokens" in k for k in saved)
        assert torch.equal(merged.get_output_embeddings().weight[ADDED], after["lm_head"][ADDED])

        from peft import PeftModel

        # The adapter holds the trained rows: it loads onto any base resized to the tokenizer (fresh rows there).
        config = json.loads((tmp_path / lora.ADAPTER_DIR / "adapter_config.json").read_text(encoding="utf-8"))
        assert config["trainable_token_indices"] in (ADDED, {n: ADDED for n in before})
        reloaded = PeftModel.from_pretrained(resized(family), tmp_path / lora.ADAPTER_DIR).eval()
        if family == "bart-untied":  # peft wraps `shared` only; its other paths need pointing at the wrapper
            assert not torch.allclose(reloaded(**token_batch()).logits, expected, atol=1e-5)
            lora.point_aliases_at_wrappers(reloaded.get_base_model())
        assert torch.allclose(reloaded(**token_batch()).logits, expected, atol=1e-5)
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)


def test_without_added_tokens_the_trainable_parameters_are_the_same_as_before():
    def shapes(model):
        return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}

    plain, none = (lora.wrap(tiny("bart"), LoraConfig(enabled=True, r=4), rows) for rows in (None, []))
    assert shapes(plain) == shapes(none) and all("lora_" in n for n in shapes(none))
    assert next(iter(none.peft_config.values())).trainable_token_indices is None
    assert lora.describe(LoraConfig(), none)["trainable_tokens"] == 0


def test_partly_tied_embeddings_that_peft_cannot_cover_are_refused_in_one_line():
    from transformers import MarianConfig, MarianMTModel

    # The encoder has its own embedding; the decoder's is tied to the LM head: peft's list form reaches the
    # encoder's only, and its dict form would train the tied pair as two.
    model = MarianMTModel(MarianConfig(
        vocab_size=124, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        pad_token_id=1, eos_token_id=2, decoder_start_token_id=1, share_encoder_decoder_embeddings=False))
    with pytest.raises(UserError, match=r"^model.lora: the embedding rows of the tokens added to the tokenizer "
                                        r"cannot train in .*lm_head of this marian model"):
        lora.wrap(model, LoraConfig(enabled=True, r=4), ADDED)


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
        lora.check_base(resumed / "checkpoints/step_4", {"base_sha256": "0" * 64, "trainable_tokens": 0})


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


# ---- through the real command, from a pretrained model whose tokenizer lacks the speaker tokens -----------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A local 'pretrained' BART (scaled embeddings, tied) whose tokenizer has #Person1# only: the loop adds the
    other speaker and mask tokens, and resizes the embeddings for them."""
    from transformers import BartConfig, BartForConditionalGeneration

    from loop.synthetic import generate_rows
    from loop.tokenizer_train import train_tokenizer

    path = tmp_path_factory.mktemp("pretrained")
    rows = generate_rows(160, seed=5)
    tokenizer = train_tokenizer([r["dialogue"] for r in rows] + [r["summary"] for r in rows], path, vocab_size=400,
                                extra_special_tokens=["#Person1#"])
    torch.manual_seed(0)
    BartForConditionalGeneration(BartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        scale_embedding=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id)).save_pretrained(path)
    return path


def from_pretrained_args(path: Path) -> list[str]:
    return [*LORA, "model.from_scratch=false", "model.tokenizer=", f"model.name_or_path={path}"]


@pytest.fixture(scope="module")
def tok_reference(pretrained, tmp_path_factory) -> Path:
    """An uninterrupted LoRA run on the pretrained model (tokens added): its run directory."""
    cwd = tmp_path_factory.mktemp("lora-tokens-reference")
    proc = run_train(cwd, *from_pretrained_args(pretrained))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "out"


@pytest.fixture(scope="module")
def tok_resumed(pretrained, tok_reference, tmp_path_factory) -> Path:
    """The tokens run resumed from its step 2 checkpoint in a fresh process: its run directory."""
    cwd = tmp_path_factory.mktemp("lora-tokens-resumed")
    shutil.copytree(tok_reference.parent, cwd, dirs_exist_ok=True)
    for later in ("checkpoints/step_4", "best", "artifacts"):
        shutil.rmtree(cwd / "out" / later)
    proc = run_train(cwd, *from_pretrained_args(pretrained), extra_args=("--resume", "out/checkpoints/step_2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from out/checkpoints/step_2 at step 2" in proc.stdout
    return cwd / "out"


def added_ids(pretrained: Path, run: Path) -> list[int]:
    """The ids of the tokens the loop added: those of the run's tokenizer beyond the pretrained vocabulary."""
    from transformers import AutoTokenizer

    return list(range(len(AutoTokenizer.from_pretrained(pretrained)), len(AutoTokenizer.from_pretrained(run / "best"))))


def test_added_token_rows_are_checkpointed_trained_and_merged_into_best(pretrained, tok_reference):
    added = added_ids(pretrained, tok_reference)
    assert len(added) >= 5  # the speaker and mask tokens but #Person1#
    step2, step4 = (load_file(tok_reference / f"checkpoints/step_{n}/model.safetensors") for n in (2, 4))
    (delta,) = [k for k in step4 if "trainable_tokens_delta" in k]
    assert all(".lora_A." in k or ".lora_B." in k for k in step4 if k != delta)
    assert step4[delta].shape == (len(added), 32) and not torch.equal(step2[delta], step4[delta])  # they train
    record = json.loads((tok_reference / "checkpoints/step_4" / lora.BASE_FILE).read_text(encoding="utf-8"))
    assert record["trainable_tokens"] == len(added)
    moments = [t for k, t in load_file(tok_reference / "checkpoints/step_4/optimizer.safetensors").items()
               if "exp_avg" in k]
    assert sum(t.numel() for t in moments) == 2 * sum(t.numel() for t in step4.values())

    # best/ (the step 4 eval): the trained rows in the embedding and the tied LM head; the pretrained rows as they were.
    best, original = load_file(tok_reference / "best/model.safetensors"), load_file(pretrained / "model.safetensors")
    assert torch.equal(best["model.shared.weight"][added], step4[delta])
    assert torch.equal(best["model.shared.weight"][: added[0]], original["model.shared.weight"])
    model = AutoModelForSeq2SeqLM.from_pretrained(tok_reference / "best")
    assert torch.equal(model.get_output_embeddings().weight[added], step4[delta])
    run = read_offline_run(find_offline_runs(tok_reference)[0])
    (art,) = [a for a in run.artifacts if a["type"] == "model"]
    assert art["metadata"]["lora"]["trainable_tokens"] == len(added)


def test_the_merged_best_and_the_adapter_give_the_peft_models_logits_on_a_speaker_token(pretrained, tok_reference):
    from peft import PeftModel
    from transformers import AutoTokenizer

    best = tok_reference / "best"
    tokenizer = AutoTokenizer.from_pretrained(best)
    inputs = tokenizer(["#Person2#: 내일 몇 시에 만날까요? #Person1#: 세 시요."], return_tensors="pt")
    assert tokenizer.convert_tokens_to_ids("#Person2#") in inputs["input_ids"][0].tolist()
    decoder = torch.tensor([[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("#Person2#")]])
    base = AutoModelForSeq2SeqLM.from_pretrained(pretrained)
    base.resize_token_embeddings(len(tokenizer))
    adapted = PeftModel.from_pretrained(base, best / lora.ADAPTER_DIR).eval()
    with torch.no_grad():
        expected = adapted(**inputs, decoder_input_ids=decoder).logits
        merged = AutoModelForSeq2SeqLM.from_pretrained(best).eval()(**inputs, decoder_input_ids=decoder).logits
    assert torch.allclose(merged, expected, atol=1e-5)


def test_a_lora_run_with_added_tokens_resumes_bit_for_bit(tok_reference, tok_resumed):
    for name in ("checkpoints/step_4/model.safetensors", "checkpoints/step_4/optimizer.safetensors",
                 "best/model.safetensors"):
        expected, actual = load_file(tok_reference / name), load_file(tok_resumed / name)
        assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected), name


def test_a_resume_with_another_number_of_added_tokens_is_refused_in_one_line(tok_reference):
    ckpt = tok_reference / "checkpoints/step_4"
    record = json.loads((ckpt / lora.BASE_FILE).read_text(encoding="utf-8"))
    with pytest.raises(UserError, match=rf"^--resume {ckpt}: the adapters were trained with "
                                        rf"{record['trainable_tokens']} added token rows, this run adds 0 "):
        lora.check_base(ckpt, {**record, "trainable_tokens": 0})
    lora.check_base(ckpt, record)  # the same record: accepted
