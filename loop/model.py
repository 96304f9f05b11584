"""Tokenizer and model: load a pretrained seq2seq model (hub id or local path) or build a small BART."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from loop.config import Config
from loop.errors import UserError


def _load_error(what: str, name: str, err: Exception) -> UserError:
    hint = "" if Path(name).exists() else " (no network? download it once and point to the local directory)"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"cannot load {what} {name!r}: {first}{hint}")


def load_tokenizer(cfg: Config, train_texts: Iterable[str] | None, run_tokenizer: Path) -> Any:
    """The configured tokenizer (trained on train_texts when `model.tokenizer = "train"`), speaker tokens added.

    A trained tokenizer is returned unsaved (the run saves it once its directory is claimed); a resumed run
    keeps the one it was trained with, in `run_tokenizer`.
    """
    from transformers import AutoTokenizer

    if cfg.model.tokenizer == "train":
        from loop.tokenizer_train import train_tokenizer

        if (run_tokenizer / "tokenizer.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(run_tokenizer)
            except (OSError, ValueError) as err:
                raise _load_error("tokenizer", str(run_tokenizer), err) from None
        if train_texts is None:
            raise ValueError("training a tokenizer needs train_texts")
        return train_tokenizer(train_texts, None, vocab_size=cfg.model.scratch.vocab_size,
                               extra_special_tokens=cfg.data.special_tokens)
    name = cfg.model.tokenizer or cfg.model.name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise _load_error("tokenizer", name, err) from None
    missing = [t for t in cfg.data.special_tokens if t not in tokenizer.get_vocab()]
    if missing:
        # Special so BPE never splits them; decoding keeps them (see evaluation.decode).
        tokenizer.add_tokens(missing, special_tokens=True)
    return tokenizer


def build_model(cfg: Config, tokenizer: Any) -> Any:
    """The model to train: pretrained or from [model.scratch], then gradient checkpointing and LoRA if asked for."""
    model, new_rows = _base_model(cfg, tokenizer)
    if cfg.training.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.model.lora.enabled:
        from loop import lora

        model = lora.wrap(model, cfg.model.lora, new_rows)
    return model


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant: works with frozen inputs)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _base_model(cfg: Config, tokenizer: Any) -> tuple[Any, list[int]]:
    """A pretrained seq2seq model resized to the tokenizer, or a BART built from [model.scratch]; and the ids of the
    embedding rows the resize added (the tokens load_tokenizer added: fresh values that LoRA has to train)."""
    from transformers import AutoModelForSeq2SeqLM, BartConfig, BartForConditionalGeneration

    if cfg.model.from_scratch:
        s = cfg.model.scratch
        config = BartConfig(
            vocab_size=len(tokenizer), d_model=s.d_model, encoder_layers=s.encoder_layers,
            decoder_layers=s.decoder_layers, encoder_attention_heads=s.attention_heads,
            decoder_attention_heads=s.attention_heads, encoder_ffn_dim=s.ffn_dim, decoder_ffn_dim=s.ffn_dim,
            dropout=s.dropout, max_position_embeddings=max(cfg.model.max_source_length, cfg.model.max_target_length),
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
            forced_eos_token_id=tokenizer.eos_token_id, scale_embedding=True,
        )
        return BartForConditionalGeneration(config), []
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(cfg.model.name_or_path)
    except (OSError, ValueError) as err:
        raise _load_error("model", cfg.model.name_or_path, err) from None
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and cfg.model.max_source_length > positions:
        raise UserError(f"model.max_source_length={cfg.model.max_source_length} exceeds what "
                        f"{cfg.model.name_or_path} supports ({positions} positions)")
    return model, list(range(rows, len(tokenizer)))


def load_model_config(cfg: Config) -> Any:
    """The pretrained model's config (what loop/families.py reads the family from); None for a scratch BART."""
    from transformers import AutoConfig

    if cfg.model.from_scratch:
        return None
    try:
        return AutoConfig.from_pretrained(cfg.model.name_or_path)
    except (OSError, ValueError) as err:
        raise _load_error("model", cfg.model.name_or_path, err) from None


def count_parameters(model: Any) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe_parameters(model: Any) -> str:
    """`N parameters`, or `N of M parameters trainable` when some are frozen (LoRA)."""
    trainable, total = count_parameters(model), sum(p.numel() for p in model.parameters())
    return f"{total:,} parameters" if trainable == total else f"{trainable:,} of {total:,} parameters trainable"
