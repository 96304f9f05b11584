"""The training/eval loss: the LM head at label positions only gives the same losses and gradients as the full path."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models
from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

from loop.data import LABEL_PAD, make_collator
from loop.loss import LabelLogits, token_losses


def tiny_model(vocab: int = 64) -> BartForConditionalGeneration:
    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=vocab, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2))
    with torch.no_grad():  # a non-zero bias, so that a dropped bias would show
        model.final_logits_bias.copy_(torch.randn_like(model.final_logits_bias))
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with BART's special-token ids (<s>=0, <pad>=1, </s>=2)."""
    vocab = {f"w{i}": i for i in range(64)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w3")),
                                   bos_token="w0", pad_token="w1", eos_token="w2", unk_token="w3")


def tiny_batch(model: BartForConditionalGeneration) -> dict[str, torch.Tensor]:
    """Three samples of different source and label lengths, collated by the loop's collator."""
    tokenizer = tiny_tokenizer()
    g = torch.Generator().manual_seed(1)
    features = []
    for i, (s, t) in enumerate(((9, 3), (5, 7), (12, 2))):
        src = [0, *torch.randint(5, 64, (s,), generator=g).tolist(), 2]
        tgt = [0, *torch.randint(5, 64, (t,), generator=g).tolist(), 2]
        features.append({"input_ids": src, "attention_mask": [1] * len(src), "labels": tgt, "idx": i})
    return make_collator(tokenizer, model)(features)


def losses_and_grads(model, batch, head):
    model.zero_grad()
    losses, counts = token_losses(model, batch, head)
    losses.sum().backward()
    return losses.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_label_positions_only_give_the_full_path_losses_and_gradients():
    model = tiny_model()
    batch = tiny_batch(model)
    assert (batch["labels"] == LABEL_PAD).any()  # padding exists, so the fast path has something to skip
    assert batch["label_index"].numel() == int((batch["labels"] != LABEL_PAD).sum())
    head = LabelLogits(model)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    fast, fast_counts, fast_grads = losses_and_grads(model, batch, head)
    full, full_counts, full_grads = losses_and_grads(model, batch, None)
    assert seen[0] == (batch["label_index"].numel(), 1, 64)  # the fast path really skipped the padding
    assert seen[1] == (*batch["labels"].shape, 64)
    assert torch.equal(fast_counts, full_counts)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    assert fast_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_hook_is_idle_outside_the_loss():
    model = tiny_model()
    batch = tiny_batch(model)
    head = LabelLogits(model)
    token_losses(model, batch, head)
    assert head.index is None
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=batch["decoder_input_ids"]).logits
    assert logits.shape == (*batch["labels"].shape, 64)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3)
    assert out.shape[0] == 3


def test_a_model_without_an_output_embedding_keeps_the_full_path():
    model = tiny_model()
    batch = tiny_batch(model)
    full = token_losses(model, batch)[0]
    model.get_output_embeddings = lambda: None  # e.g. a model that computes logits with its own function
    head = LabelLogits(model)
    assert head.handle is None
    torch.testing.assert_close(token_losses(model, batch, head)[0], full)


def test_no_label_smoothing_is_bitwise_the_plain_loss():
    model = tiny_model()
    batch = tiny_batch(model)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"]).logits
        plain = torch.nn.functional.cross_entropy(logits.float().view(-1, 64), batch["labels"].view(-1),
                                                  ignore_index=LABEL_PAD, reduction="none").view(batch["labels"].shape)
        assert torch.equal(token_losses(model, batch, None, label_smoothing=0.0)[0], plain.sum(dim=1))
        assert torch.equal(token_losses(model, batch)[0], plain.sum(dim=1))


def test_label_smoothing_is_cross_entropy_with_smoothing_over_real_label_tokens_only():
    model = tiny_model()
    batch = tiny_batch(model)
    eps = 0.1
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"]).logits.float()
        real = batch["labels"] != LABEL_PAD
        expected = torch.zeros(batch["labels"].shape)
        for b in range(logits.shape[0]):  # sample by sample, real tokens only: padding must not count
            expected[b, real[b]] = torch.nn.functional.cross_entropy(
                logits[b, real[b]], batch["labels"][b, real[b]], reduction="none", label_smoothing=eps)
            # The same by hand: (1 - eps) * NLL + eps * mean over the vocabulary of -log p.
            logp = logits[b, real[b]].log_softmax(-1)
            by_hand = -(1 - eps) * logp.gather(1, batch["labels"][b, real[b]].unsqueeze(1)).squeeze(1) \
                - eps * logp.mean(-1)
            torch.testing.assert_close(expected[b, real[b]], by_hand)
        full = token_losses(model, batch, None, label_smoothing=eps)[0]
        fast = token_losses(model, batch, LabelLogits(model), label_smoothing=eps)[0]  # the label-positions path
    torch.testing.assert_close(full, expected.sum(dim=1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full, token_losses(model, batch)[0])  # smoothing changes the loss
