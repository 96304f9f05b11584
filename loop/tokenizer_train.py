"""Train a small BART-style BPE tokenizer (sentencepiece-like, Metaspace) from raw texts, fully offline."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
# BART's order, so ids match the usual layout: <s>=0, <pad>=1, </s>=2, <unk>=3.
SPECIAL_TOKENS: tuple[str, ...] = (BOS, PAD, EOS, UNK, MASK)


def _split_specials(texts: Iterable[str], specials: Sequence[str]) -> Iterator[str]:
    # The trainer does not extract added tokens itself; without this it would spend merges on "#Person1#:".
    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
    for text in texts:
        yield from (piece for piece in pattern.split(text) if piece)


def _build_backend(texts: Iterable[str], vocab_size: int, specials: Sequence[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # NFC, not NFKC: NFKC would turn compatibility jamo such as "ㅋㅋ" into other code points.
    tok.normalizer = normalizers.NFC()
    # Metaspace instead of byte-level: a Hangul syllable stays one character instead of three bytes.
    # No "▁" is prepended, so text right after a special token ("#Person1#: ...") encodes the same in
    # training (where it is its own piece) and in use, and decoding restores the text exactly.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False)
    tok.train_from_iterator(_split_specials(texts, specials), trainer)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} {EOS} $B {EOS}",
        special_tokens=[(BOS, bos_id), (EOS, eos_id)],
    )
    return tok


def train_tokenizer(
    texts: Iterable[str],
    out_dir: Path | str | None,
    vocab_size: int = 4000,
    extra_special_tokens: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer on texts and return it, saved with save_pretrained(out_dir) unless out_dir is None."""
    from transformers import PreTrainedTokenizerFast

    # Order-preserving dedupe (not a set) keeps ids identical from run to run.
    extras = list(dict.fromkeys(t for t in extra_special_tokens if t not in SPECIAL_TOKENS))
    backend = _build_backend(texts, vocab_size, [*SPECIAL_TOKENS, *extras])
    # additional_special_tokens is the name transformers 4.x knows; 5.x maps it to extra_special_tokens.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        mask_token=MASK,
        additional_special_tokens=extras,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer
