"""Model families: T5 and mBART inputs and labels exactly as their own tokenizers make them, BART as before, and
tiny T5 and mBART models through training, eval, export and predict."""

from __future__ import annotations

import csv
import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForSeq2SeqLM,
    BartConfig,
    MBart50Tokenizer,
    MBartConfig,
    MBartForConditionalGeneration,
    MBartTokenizer,
    MT5Config,
    T5Config,
    T5ForConditionalGeneration,
    T5Tokenizer,
    UMT5Config,
)

from loop import predict
from loop.config import load_config
from loop.data import LABEL_PAD, make_collator, read_examples, tokenize_file
from loop.errors import UserError
from loop.evaluation import decode, generation_config
from loop.families import family_of, formatter
from loop.loss import LabelLogits, token_losses
from loop.synthetic import generate_rows
from tests.conftest import ROOT, run_train

ROWS = [{"id": f"r{i}", "dialogue": r["dialogue"], "summary": r["summary"]}
        for i, r in enumerate(generate_rows(12, seed=3))]
PREFIX = "summarize: "


@functools.cache
def unigram_vocab(specials: tuple[str, ...]) -> list[tuple[str, float]]:
    """A small sentencepiece-like Unigram vocabulary, trained here on synthetic Korean dialogues."""
    rows = generate_rows(120, seed=7)
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator([r["dialogue"] for r in rows] + [r["summary"] + " summarize:" for r in rows],
                            trainers.UnigramTrainer(vocab_size=600, special_tokens=list(specials), unk_token="<unk>",
                                                    show_progress=False))
    return [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]


@pytest.fixture(scope="module")
def t5_tokenizer() -> T5Tokenizer:
    """transformers' T5 tokenizer (<pad>=0, </s>=1, <unk>=2) over a locally trained vocabulary."""
    return T5Tokenizer(vocab=unigram_vocab(("<pad>", "</s>", "<unk>")), extra_ids=0)


@pytest.fixture(scope="module")
def mbart50_tokenizer() -> MBart50Tokenizer:
    """transformers' mBART-50 tokenizer (language codes added by the class itself) over a local vocabulary."""
    return MBart50Tokenizer(vocab=unigram_vocab(("<unk>", "<s>", "</s>")))


def t5_config(tokenizer, **extra) -> T5Config:
    return T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                    num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0,
                    eos_token_id=1, decoder_start_token_id=0, **extra)


def mbart_config(tokenizer, **extra) -> MBartConfig:
    return MBartConfig(**{"vocab_size": len(tokenizer), "d_model": 16, "encoder_layers": 1, "decoder_layers": 1,
                          "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 32,
                          "decoder_ffn_dim": 32, "max_position_embeddings": 128, "dropout": 0.0, "pad_token_id": 1,
                          "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2,
                          "forced_eos_token_id": 2, **extra})


def cfg_with(*overrides: str):
    return load_config(None, ["model.from_scratch=false", "model.tokenizer=", "model.name_or_path=tiny",
                              *overrides])


def own_tokenizer_output(tokenizer, prefix: str, max_source: int, max_target: int) -> dict[str, list]:
    """What the family's own tokenizer makes of each row, one row at a time, with `text_target=`."""
    sources = [tokenizer(prefix + row["dialogue"], max_length=max_source, truncation=True)["input_ids"]
               for row in ROWS]
    labels = [tokenizer(text_target=row["summary"], max_length=max_target, truncation=True)["input_ids"]
              for row in ROWS]
    whole = [tokenizer(prefix + row["dialogue"], text_target=row["summary"]) for row in ROWS]
    if max_source >= 512:  # uncut, the one call with text_target= gives both at once
        assert [e["input_ids"] for e in whole] == sources and [e["labels"] for e in whole] == labels
    return {"input_ids": sources, "labels": labels}


def tokenized(fmt, tokenizer, max_source: int, max_target: int) -> dict[str, list]:
    ds = tokenize_file("rows.csv", load_config().data, tokenizer, max_source, max_target, rows=ROWS, fmt=fmt)
    return {k: v for k, v in ds.to_dict().items() if k in ("input_ids", "labels")}


def test_the_family_comes_from_the_model_type():
    assert [family_of(c.model_type) for c in (T5Config(), MT5Config(), UMT5Config(), MBartConfig(), BartConfig())] \
        == ["t5", "t5", "t5", "mbart", "bart"]
    assert family_of("pegasus") == "bart"  # any other model type: formatted as before


@pytest.mark.parametrize(("max_source", "max_target"), [(512, 128), (24, 6)])  # whole, and cut by truncation
def test_t5_inputs_and_labels_are_what_its_tokenizer_makes(t5_tokenizer, max_source, max_target):
    fmt = formatter(t5_config(t5_tokenizer), t5_tokenizer, cfg_with(f"model.source_prefix={PREFIX}"))
    got = tokenized(fmt, t5_tokenizer, max_source, max_target)
    assert got == own_tokenizer_output(t5_tokenizer, PREFIX, max_source, max_target)
    assert got["input_ids"][0][:3] == t5_tokenizer(PREFIX, add_special_tokens=False)["input_ids"][:3]
    assert all(ids[-1] == t5_tokenizer.eos_token_id for ids in got["input_ids"] + got["labels"])
    assert fmt.decoder_start_token_id == t5_tokenizer.pad_token_id == 0


@pytest.mark.parametrize(("max_source", "max_target"), [(512, 128), (24, 6)])
def test_mbart50_inputs_and_labels_are_what_its_tokenizer_makes(mbart50_tokenizer, max_source, max_target):
    # Two different languages, so that a swapped source and target would show.
    cfg = cfg_with("data.source_lang=ko_KR", "data.target_lang=en_XX")
    fmt = formatter(mbart_config(mbart50_tokenizer), mbart50_tokenizer, cfg)
    reference = MBart50Tokenizer(vocab=unigram_vocab(("<unk>", "<s>", "</s>")), src_lang="ko_KR", tgt_lang="en_XX")
    got = tokenized(fmt, mbart50_tokenizer, max_source, max_target)
    assert got == own_tokenizer_output(reference, "", max_source, max_target)
    ko, en = (mbart50_tokenizer.convert_tokens_to_ids(c) for c in ("ko_KR", "en_XX"))
    assert {ids[0] for ids in got["input_ids"]} == {ko} and {ids[0] for ids in got["labels"]} == {en}
    # Generation starts where training's decoder input starts (mBART's shift wraps the last label token, eos),
    # and is forced to emit the target language first, as the labels begin.
    model = MBartForConditionalGeneration(mbart_config(mbart50_tokenizer))
    batch = make_collator(mbart50_tokenizer, model)([{"input_ids": s, "attention_mask": [1] * len(s), "labels": t,
                                                      "idx": i} for i, (s, t) in
                                                     enumerate(zip(got["input_ids"], got["labels"], strict=True))])
    assert set(batch["decoder_input_ids"][:, 0].tolist()) == {fmt.decoder_start_token_id} == {2}
    assert set(batch["decoder_input_ids"][:, 1].tolist()) == {fmt.forced_bos_token_id} == {en}


def test_mbart_cc25_language_codes_follow_the_text_as_its_tokenizer_puts_them():
    tokenizer = MBartTokenizer(vocab=unigram_vocab(("<s>", "<pad>", "</s>", "<unk>")))
    fmt = formatter(mbart_config(tokenizer), tokenizer, cfg_with("data.source_lang=ko_KR", "data.target_lang=ko_KR"))
    reference = MBartTokenizer(vocab=unigram_vocab(("<s>", "<pad>", "</s>", "<unk>")), src_lang="ko_KR",
                               tgt_lang="ko_KR")
    assert tokenized(fmt, tokenizer, 40, 8) == own_tokenizer_output(reference, "", 40, 8)
    ko = tokenizer.convert_tokens_to_ids("ko_KR")
    assert fmt.source_wrap == ((), (2, ko)) and fmt.decoder_start_token_id == ko and fmt.forced_bos_token_id is None


def test_bart_keeps_its_formatting_and_cache_key(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    fmt = formatter(BartConfig(), tokenizer, load_config())
    assert fmt.as_before and fmt.source_specials == 2
    before = tokenize_file("rows.csv", load_config().data, tokenizer, 32, 8, rows=ROWS)
    now = tokenize_file("rows.csv", load_config().data, tokenizer, 32, 8, rows=ROWS, fmt=fmt)
    assert now.cache_files == before.cache_files and now.to_dict() == before.to_dict()
    prefixed = formatter(None, tokenizer, load_config(None, [f"model.source_prefix={PREFIX}"]))
    ids = tokenize_file("rows.csv", load_config().data, tokenizer, 512, 8, rows=ROWS, fmt=prefixed)["input_ids"]
    assert ids[0] == tokenizer(PREFIX + ROWS[0]["dialogue"])["input_ids"]  # BART: <s> prefix dialogue </s>


@pytest.mark.parametrize(("family", "overrides", "message"), [
    ("mbart", [], "`data.source_lang` must be set for the mBART model tiny: a language code of its tokenizer"),
    ("mbart", ["data.source_lang=ko_KR"], "`data.target_lang` must be set"),
    ("mbart", ["data.source_lang=ko", "data.target_lang=ko_KR"],
     "`data.source_lang` = 'ko' is not a language code of the tokenizer 'tiny' (it knows af_ZA, ar_AR, "),
    ("t5", ["data.target_lang=ko_KR"], "`data.target_lang` = 'ko_KR': language codes are for mBART models; tiny is "
                                       "a t5 model"),
])
def test_language_code_mistakes_are_one_line_naming_the_key(t5_tokenizer, mbart50_tokenizer, family, overrides,
                                                            message):
    tokenizer, config = ((mbart50_tokenizer, mbart_config(mbart50_tokenizer)) if family == "mbart"
                         else (t5_tokenizer, t5_config(t5_tokenizer)))
    with pytest.raises(UserError) as err:
        formatter(config, tokenizer, cfg_with(*overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_model_and_tokenizer_that_disagree_are_one_line(t5_tokenizer, tokenizer):
    with pytest.raises(UserError, match="an mBART model needs an mBART tokenizer with language codes"):
        formatter(mbart_config(tokenizer, pad_token_id=tokenizer.pad_token_id), tokenizer,
                  cfg_with("data.source_lang=ko_KR", "data.target_lang=ko_KR"))
    with pytest.raises(UserError, match="config.json has decoder_start_token_id = 1; a t5 model starts decoding at "
                                        r"the pad token \(0\)"):
        formatter(T5Config(pad_token_id=0, decoder_start_token_id=1), t5_tokenizer, cfg_with())
    with pytest.raises(UserError, match=r"config\.json has pad_token_id = 5 but the tokenizer 'tiny' pads with id 0"):
        formatter(T5Config(pad_token_id=5), t5_tokenizer, cfg_with())


def test_generation_and_decoding_follow_the_family(t5_tokenizer, mbart50_tokenizer):
    cfg = cfg_with("data.source_lang=ko_KR", "data.target_lang=ko_KR")
    model = MBartForConditionalGeneration(mbart_config(mbart50_tokenizer, forced_bos_token_id=None))
    formatter(model.config, mbart50_tokenizer, cfg).configure(model)
    ko = mbart50_tokenizer.convert_tokens_to_ids("ko_KR")
    gen = generation_config(model, cfg)
    assert (gen.forced_bos_token_id, gen.decoder_start_token_id) == (ko, 2)
    out = model.generate(**mbart50_tokenizer(["안녕"], return_tensors="pt"), generation_config=gen)
    assert out[0, :2].tolist() == [2, ko]
    text = "#Person1#은 내일 온다."
    ids = mbart50_tokenizer(text_target=text)["input_ids"]
    assert ids[0] == ko and decode(mbart50_tokenizer, [[2, *ids, 1]]) == decode(mbart50_tokenizer, [ids[1:-1]])
    assert "ko_KR" not in decode(mbart50_tokenizer, [[2, *ids]])[0]
    t5 = T5ForConditionalGeneration(t5_config(t5_tokenizer))
    formatter(t5.config, t5_tokenizer, cfg_with()).configure(t5)
    assert generation_config(t5, cfg_with()).decoder_start_token_id == t5_tokenizer.pad_token_id


def family_model(family: str, t5_tokenizer, mbart50_tokenizer):
    """A tiny model of the family with tied embeddings (T5 then scales the decoder output before its LM head)
    and, for mBART, a non-zero final_logits_bias, so that a path that skipped either would show."""
    torch.manual_seed(0)
    if family == "t5":
        return T5ForConditionalGeneration(t5_config(t5_tokenizer)), t5_tokenizer, cfg_with()
    model = MBartForConditionalGeneration(mbart_config(mbart50_tokenizer))
    with torch.no_grad():
        model.final_logits_bias.copy_(torch.randn_like(model.final_logits_bias))
    return model, mbart50_tokenizer, cfg_with("data.source_lang=ko_KR", "data.target_lang=ko_KR")


def family_features(family: str, t5_tokenizer, mbart50_tokenizer, n: int = 4):
    model, tokenizer, cfg = family_model(family, t5_tokenizer, mbart50_tokenizer)
    fmt = formatter(model.config, tokenizer, cfg)
    ds = tokenize_file("rows.csv", cfg.data, tokenizer, 512, 48, rows=ROWS[:n], fmt=fmt)
    features = [{k: ds[i][k] for k in ("input_ids", "attention_mask", "labels", "idx")} for i in range(n)]
    return model, make_collator(tokenizer, model), features


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["t5", "mbart"])
def test_label_positions_only_give_the_models_own_loss_and_gradients(family, t5_tokenizer, mbart50_tokenizer):
    model, collate, features = family_features(family, t5_tokenizer, mbart50_tokenizer)
    batch = collate(features)
    assert (batch["labels"] == LABEL_PAD).any()  # padding, so the fast path has something to skip
    head = LabelLogits(model)
    assert head.handle is not None  # the family can use the path: no fallback
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    fast, counts = token_losses(model, batch, head)
    (fast.sum() / counts.sum()).backward()
    fast_grads = grads(model)
    model.zero_grad()
    own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    own.backward()
    assert seen[0] == (batch["label_index"].numel(), 1, model.config.vocab_size)
    torch.testing.assert_close(fast.sum() / counts.sum(), own, rtol=1e-5, atol=1e-6)
    for name, grad in grads(model).items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["t5", "mbart"])
def test_accumulated_micro_batches_give_the_full_batch_gradient(family, t5_tokenizer, mbart50_tokenizer):
    model, collate, features = family_features(family, t5_tokenizer, mbart50_tokenizer)
    head = LabelLogits(model)
    full = collate(features)
    tokens = (full["labels"] != LABEL_PAD).sum()
    (token_losses(model, full, head)[0].sum() / tokens).backward()
    whole = grads(model)
    model.zero_grad()
    shapes = set()
    for part in (features[:2], features[2:]):  # padded to their own lengths, as the loop's micro-batches are
        micro = collate(part)
        shapes.add((micro["input_ids"].shape[1], micro["labels"].shape[1]))
        (token_losses(model, micro, head)[0].sum() / tokens).backward()
    assert len(shapes | {(full["input_ids"].shape[1], full["labels"].shape[1])}) == 3  # padding differs
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, whole[name], rtol=1e-4, atol=1e-6, msg=name)


def saved_model(path: Path, family: str, t5_tokenizer, mbart50_tokenizer) -> Path:
    """A tiny 'pretrained' model directory with its own tokenizer, as a hub download would be."""
    tokenizer = t5_tokenizer if family == "t5" else mbart50_tokenizer
    config = t5_config(tokenizer) if family == "t5" else mbart_config(tokenizer)
    torch.manual_seed(0)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(("family", "overrides"), [
    ("t5", [f"model.source_prefix={PREFIX}"]),
    ("mbart", ["data.source_lang=ko_KR", "data.target_lang=ko_KR"]),
])
def test_a_tiny_model_trains_evaluates_exports_and_predicts(family, overrides, t5_tokenizer, mbart50_tokenizer,
                                                            tmp_path):
    model_dir = saved_model(tmp_path / "model", family, t5_tokenizer, mbart50_tokenizer)
    proc = run_train(tmp_path, "model.from_scratch=false", "model.tokenizer=", f"model.name_or_path={model_dir}",
                     *overrides, "data.synthetic_train_rows=32", "data.synthetic_dev_rows=6",
                     "training.learning_rate=0.01", "training.max_steps=2", "evaluation.eval_steps=2",
                     "evaluation.save_steps=100", "evaluation.eval_on_start=false", "evaluation.rouge_tokenizer=char",
                     "generation.max_new_tokens=8", "training.output_dir=run", "wandb.mode=disabled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LM head runs at every position" not in proc.stdout + proc.stderr
    run = tmp_path / "run"
    evals = [json.loads(line) for line in (run / "eval_metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2] and evals[0]["loss"] > 0 and 0 <= evals[0]["rouge_l"] <= 1
    best = run / "best"
    gen = json.loads((best / "generation_config.json").read_text())
    model = AutoModelForSeq2SeqLM.from_pretrained(best)
    assert model.config.model_type == family
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(best)
    if family == "t5":
        assert gen["decoder_start_token_id"] == tokenizer.pad_token_id
    else:
        ko = tokenizer.convert_tokens_to_ids("ko_KR")
        assert (gen["forced_bos_token_id"], gen["decoder_start_token_id"]) == (ko, tokenizer.eos_token_id)
        assert (tokenizer.src_lang, tokenizer.tgt_lang) == ("ko_KR", "ko_KR")  # saved with the model
    predictions = list(csv.DictReader((run / "predictions/step_2.csv").open(encoding="utf-8")))
    assert len(predictions) == 6 and not any("ko_KR" in p["prediction"] for p in predictions)

    # predict formats the dialogues as training did: from the run's config.toml, through the same Formatter.
    dev = read_examples(tmp_path / "data/demo/dev.csv", load_config().data)
    cfg, source = predict.load_settings(best, [])
    member = predict.load_member(best, cfg, source, [dev[0]["dialogue"]])
    trained = tokenize_file("dev.csv", cfg.data, tokenizer, 128, 48, rows=dev[:1],
                            fmt=formatter(model.config, tokenizer, cfg))
    assert member.inputs == trained["input_ids"]
    plain = tokenizer(dev[0]["dialogue"], add_special_tokens=False)["input_ids"]
    expected_start = tokenizer(PREFIX, add_special_tokens=False)["input_ids"][:2] if family == "t5" else [ko, plain[0]]
    assert member.inputs[0][:2] == expected_start
    # A best/ copied away from its run: its loop_config.toml holds the T5 prefix and the languages.
    copy = shutil.copytree(best, tmp_path / "copied")
    cfg, source = predict.load_settings(copy, [])
    assert predict.load_member(copy, cfg, source, [dev[0]["dialogue"]]).inputs == member.inputs
    # An older best/ without it: the languages come from its tokenizer, a T5 prefix from --set.
    (copy / "loop_config.toml").unlink()
    cfg, source = predict.load_settings(copy, [f"model.source_prefix={PREFIX}"] if family == "t5" else [])
    assert predict.load_member(copy, cfg, source, [dev[0]["dialogue"]]).inputs == member.inputs
    assert predict.main(["--model", str(run), "--input", str(tmp_path / "data/demo/dev.csv"),
                         "--output", str(tmp_path / "sub.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "sub.csv").open(encoding="utf-8")))
    assert [r["fname"] for r in rows] == [r["id"] for r in dev] and not any("ko_KR" in r["summary"] for r in rows)


def test_the_family_configs_load_without_downloading():
    kot5, mbart50 = (load_config(ROOT / f"configs/{name}.toml") for name in ("kot5", "mbart50"))
    assert (kot5.model.name_or_path, kot5.model.source_prefix, kot5.data.source_lang) == \
        ("paust/pko-t5-base", "summarize: ", "")
    assert kot5.training.mixed_precision == "bf16" and kot5.data.train_file == "data/train.csv"  # extends base.toml
    assert (mbart50.model.name_or_path, mbart50.data.source_lang, mbart50.data.target_lang) == \
        ("facebook/mbart-large-50", "ko_KR", "ko_KR")
    assert mbart50.training.batch_size * mbart50.training.gradient_accumulation_steps == 16
