"""Model families: how BART, T5 and mBART want sources and labels formatted, and what generation needs to match.

The family comes from the model's config (`model_type`), never from its name; the rest from the tokenizer:
- bart (BART, KoBART, and any model type not named below): `<s> text </s>` whatever the tokenizer adds itself;
- t5 (t5, mt5, umt5): `text </s>`, no bos; decoding starts at the pad token;
- mbart (mBART, mBART-50): the language codes `data.source_lang`/`data.target_lang` placed exactly as the
  model's own tokenizer places them with `text_target=` (mBART-50: `[lang] text </s>`), and generation forced to
  start with the target language.
`model.source_prefix` (a task prefix such as "summarize:") and a space go before every dialogue in training, eval
and predict alike. One Formatter serves all three, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loop.config import Config
from loop.data import with_bos_eos
from loop.errors import UserError

FAMILIES = {"bart": "bart", "t5": "t5", "mt5": "t5", "umt5": "t5", "mbart": "mbart"}
Wrap = tuple[tuple[int, ...], tuple[int, ...]]  # special token ids before and after the text
_PROBE = "a"  # any text the tokenizer turns into at least one token, to see where it puts its special tokens


def family_of(model_type: str) -> str:
    """The formatting family of a `config.model_type`: t5, mbart, or bart (for every other type, as before)."""
    return FAMILIES.get(model_type, "bart")


def _wrap(ids: list[int], wrap: Wrap, max_len: int) -> list[int]:
    """`head ids tail`, the text cut so that the whole fits max_len (the special tokens are never cut)."""
    head, tail = wrap
    return [*head, *ids[: max(max_len - len(head) - len(tail), 0)], *tail]


def language_codes(tokenizer: Any) -> frozenset[int]:
    """The ids of the tokenizer's language codes (mBART's), empty for tokenizers without them."""
    return frozenset((getattr(tokenizer, "lang_code_to_id", None) or {}).values())


def dropped_when_decoding(tokenizer: Any) -> set[int]:
    """Token ids that are no part of a summary's text: pad, bos, eos and language codes (speaker tokens stay)."""
    return {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, *language_codes(tokenizer)}


@dataclass(frozen=True)
class Formatter:
    """How one model family turns dialogues and summaries into input ids and labels, and its generation ids."""

    family: str
    source_prefix: str = ""
    bos: int | None = None  # bart: the ids with_bos_eos puts around the text
    eos: int | None = None
    source_wrap: Wrap = ((), ())  # t5, mbart
    target_wrap: Wrap = ((), ())
    decoder_start_token_id: int | None = None  # None: the model's own
    forced_bos_token_id: int | None = None

    @property
    def as_before(self) -> bool:
        """Whether this is the BART formatting of before families existed (data.py keeps its cache key for it)."""
        return self.family == "bart" and not self.source_prefix

    @property
    def source_specials(self) -> int:
        """How many special tokens a formatted source holds (a dialogue longer than max_len minus these is cut)."""
        return 2 if self.family == "bart" else sum(map(len, self.source_wrap))

    def source_tokens(self, tokenizer: Any, dialogues: list[str]) -> list[list[int]]:
        """Each dialogue's tokens with the source prefix, before special tokens and truncation."""
        # `--set model.source_prefix=summarize: ` loses its trailing space to the shell and the config parser;
        # without one, the prefix's last word and the dialogue's first would be one word to the tokenizer.
        lead = self.source_prefix + (" " if self.source_prefix[-1:].strip() else "")
        return tokenizer([lead + d for d in dialogues], add_special_tokens=False)["input_ids"]

    def source(self, ids: list[int], max_len: int) -> list[int]:
        """A dialogue's input ids from its source_tokens, cut to max_len."""
        if self.family == "bart":
            return with_bos_eos(ids, self.bos, self.eos, max_len)
        return _wrap(ids, self.source_wrap, max_len)

    def target(self, ids: list[int], max_len: int) -> list[int]:
        """A summary's labels from its tokens (no special tokens), cut to max_len."""
        if self.family == "bart":
            return with_bos_eos(ids, self.bos, self.eos, max_len)
        return _wrap(ids, self.target_wrap, max_len)

    def encoder(self, tokenizer: Any, max_source: int, max_target: int) -> Callable[[dict, list[int]], dict]:
        """The batched `datasets.map` function of tokenize_file: input_ids, attention_mask, labels, idx, source_len."""
        def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            src = self.source_tokens(tokenizer, batch["dialogue"])
            tgt = tokenizer(batch["summary"], add_special_tokens=False)["input_ids"]
            input_ids = [self.source(s, max_source) for s in src]
            return {"input_ids": input_ids, "attention_mask": [[1] * len(s) for s in input_ids],
                    "labels": [self.target(t, max_target) for t in tgt], "idx": indices,
                    "source_len": [len(s) for s in src]}

        return encode

    def configure(self, model: Any) -> None:
        """Set the family's decoder start and forced first token in the model's generation config (and so in
        every generate call and in the exported generation_config.json)."""
        gen = model.generation_config
        if self.decoder_start_token_id is not None:
            gen.decoder_start_token_id = self.decoder_start_token_id
        if self.forced_bos_token_id is not None:
            gen.forced_bos_token_id = self.forced_bos_token_id


def formatter(model_config: Any, tokenizer: Any, cfg: Config) -> Formatter:
    """The Formatter for a model (its config) and tokenizer, with the run's prefix and language codes."""
    model_type = getattr(model_config, "model_type", "bart")
    family = family_of(model_type)
    name = cfg.model.name_or_path
    langs = {"data.source_lang": cfg.data.source_lang, "data.target_lang": cfg.data.target_lang}
    if family != "mbart" and any(langs.values()):
        key = next(k for k, v in langs.items() if v)
        raise UserError(f"`{key}` = {langs[key]!r}: language codes are for mBART models; {name} is a {model_type} "
                        "model, leave data.source_lang and data.target_lang empty")
    if family == "bart":
        return Formatter("bart", cfg.model.source_prefix, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id)
    tokenizer_name = cfg.model.tokenizer or name
    pad = tokenizer.pad_token_id
    if pad is None or tokenizer.eos_token_id is None:
        raise UserError(f"model.tokenizer {tokenizer_name!r}: a {model_type} model needs a tokenizer with a pad "
                        "and an eos token")
    if model_config.pad_token_id != pad:
        raise UserError(f"{name}: config.json has pad_token_id = {model_config.pad_token_id} but the tokenizer "
                        f"{tokenizer_name!r} pads with id {pad}; they must be the same")
    if family == "t5":
        if model_config.decoder_start_token_id != pad:
            raise UserError(f"{name}: config.json has decoder_start_token_id = {model_config.decoder_start_token_id}"
                            f"; a {model_type} model starts decoding at the pad token ({pad})")
        eos = (tokenizer.eos_token_id,)
        return Formatter("t5", cfg.model.source_prefix, source_wrap=((), eos), target_wrap=((), eos),
                         decoder_start_token_id=pad)
    return _mbart(tokenizer, tokenizer_name, cfg, langs)


def _mbart(tokenizer: Any, tokenizer_name: str, cfg: Config, langs: dict[str, str]) -> Formatter:
    """mBART: the language codes placed where the tokenizer itself places them with `text_target=`."""
    codes = getattr(tokenizer, "lang_code_to_id", None)
    if not codes or not hasattr(tokenizer, "src_lang"):
        raise UserError(f"model.tokenizer {tokenizer_name!r}: an mBART model needs an mBART tokenizer with language "
                        f"codes (MBartTokenizer, MBart50Tokenizer), got {type(tokenizer).__name__}")
    for key, code in langs.items():
        if not code:
            raise UserError(f"`{key}` must be set for the mBART model {cfg.model.name_or_path}: a language code "
                            "of its tokenizer, e.g. \"ko_KR\"")
        if code not in codes:
            known = ", ".join(sorted(codes))
            raise UserError(f"`{key}` = {code!r} is not a language code of the tokenizer {tokenizer_name!r} "
                            f"(it knows {known})")
    # Set on the tokenizer itself too, so that the run's tokenizer/ and best/ save the languages with it.
    tokenizer.src_lang, tokenizer.tgt_lang = langs["data.source_lang"], langs["data.target_lang"]
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    both = tokenizer(_PROBE, text_target=_PROBE)
    source, target = _split(both["input_ids"], plain), _split(both["labels"], plain)
    # MBart's shift_tokens_right starts the decoder input with the last label token; generation must start there
    # too, and a target language code in front of the labels (mBART-50) is the first token generation must emit.
    return Formatter("mbart", cfg.model.source_prefix, source_wrap=source, target_wrap=target,
                     decoder_start_token_id=target[1][-1] if target[1] else None,
                     forced_bos_token_id=target[0][0] if target[0] else None)


def _split(full: list[int], plain: list[int]) -> Wrap:
    """The special ids a tokenizer put before and after `plain` in `full`."""
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return tuple(full[:i]), tuple(full[i + len(plain):])
    raise ValueError(f"the tokenizer's output {full} does not contain its plain tokens {plain}")
