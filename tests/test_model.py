"""Model and tokenizer loading: from_pretrained on local paths, special tokens, and a pretrained-model run."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

from loop.config import load_config
from loop.errors import UserError
from loop.evaluation import decode
from loop.model import build_model, load_tokenizer
from loop.synthetic import generate_rows
from loop.tokenizer_train import train_tokenizer
from loop.wandb_offline import find_offline_runs, history_series, read_offline_run
from tests.conftest import run_train


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A local 'pretrained' model whose tokenizer lacks the DialogSum speaker and mask tokens."""
    path = tmp_path_factory.mktemp("pretrained")
    rows = generate_rows(160, seed=5)
    texts = [r["dialogue"] for r in rows] + [r["summary"] for r in rows]
    tokenizer = train_tokenizer(texts, path, vocab_size=400, extra_special_tokens=["#Person1#"])
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id))
    model.save_pretrained(path)
    return path


def test_missing_special_tokens_are_added_whole_and_survive_decoding(pretrained_dir, tmp_path):
    cfg = load_config(overrides=["model.from_scratch=false", "model.tokenizer=", f"model.name_or_path={pretrained_dir}",
                                 "model.max_source_length=128"])
    before = len(AutoTokenizer.from_pretrained(pretrained_dir))
    tokenizer = load_tokenizer(cfg, None, tmp_path)
    assert len(tokenizer) == before + len(cfg.data.special_tokens) - 1  # #Person1# was already there
    for token in ("#Person2#", "#PhoneNumber#", "#Address#"):
        ids = tokenizer(f"{token}에게", add_special_tokens=False)["input_ids"]
        assert ids[0] == tokenizer.convert_tokens_to_ids(token)
    ids = tokenizer("#Person2#는 #PhoneNumber#로 전화했다.")["input_ids"]
    assert decode(tokenizer, [ids]) == ["#Person2#는 #PhoneNumber#로 전화했다."]
    model = build_model(cfg, tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)


def test_unloadable_model_is_a_user_error(tmp_path):
    cfg = load_config(overrides=["model.from_scratch=false", "model.tokenizer=",
                                 f"model.name_or_path={tmp_path / 'nothing'}"])
    with pytest.raises(UserError, match="cannot load tokenizer"):
        load_tokenizer(cfg, None, tmp_path)


def test_too_long_source_for_the_model_is_a_user_error(pretrained_dir, tmp_path):
    cfg = load_config(overrides=["model.from_scratch=false", "model.tokenizer=", f"model.name_or_path={pretrained_dir}",
                                 "model.max_source_length=512"])
    with pytest.raises(UserError, match=r"exceeds what .* supports \(128 positions\)"):
        build_model(cfg, load_tokenizer(cfg, None, tmp_path))


def test_training_from_a_local_pretrained_path_in_bf16(pretrained_dir, tmp_path):
    proc = run_train(tmp_path, "model.from_scratch=false", "model.tokenizer=", f"model.name_or_path={pretrained_dir}",
                     "training.mixed_precision=bf16", "training.max_steps=4", "evaluation.eval_steps=2",
                     "evaluation.save_steps=4", "evaluation.logging_steps=2", "training.output_dir=out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = read_offline_run(find_offline_runs(tmp_path / "out")[0])
    assert run.name.startswith(f"{pretrained_dir.name}_v1_")
    assert run.config["training"]["mixed_precision"] == "bf16"
    assert [s for s, _ in history_series(run, "eval/loss")] == [0, 2, 4]
    assert (tmp_path / "out/best/model.safetensors").exists()


def test_repetition_penalty_and_min_new_tokens_reach_generation(tmp_path):
    from loop.evaluation import generation_config

    cfg = load_config(None, ["generation.repetition_penalty=1.3", "generation.min_new_tokens=6",
                             "generation.max_new_tokens=8"])
    tokenizer = load_tokenizer(cfg, ["가 나 다 라"] * 20, tmp_path)
    model = build_model(cfg, tokenizer).eval()
    gen = generation_config(model, cfg)
    assert (gen.repetition_penalty, gen.min_new_tokens) == (1.3, 6)
    ids = tokenizer(["가 나"], return_tensors="pt")
    out = model.generate(**ids, generation_config=gen)
    assert out.shape[1] - 1 >= 6  # at least min_new_tokens after the decoder start token
    off = generation_config(model, load_config(None, []))
    assert (off.repetition_penalty, off.min_new_tokens) == (1.0, None)  # defaults add no logits processor
