"""training.gradient_checkpointing: layers really recompute in the backward pass, and the gradients are the same."""

from __future__ import annotations

import copy

import pytest
import torch

from loop.loss import LabelLogits, token_losses
from loop.model import enable_gradient_checkpointing
from tests.conftest import tiny_seq2seq

VOCAB = 120


def tiny(family: str) -> torch.nn.Module:
    """A tiny BART or T5 with dropout on: checkpointing must replay the same dropout masks."""
    return tiny_seq2seq(family, VOCAB, layers=2, dropout=0.1)


def a_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 11), generator=gen)
    labels = torch.randint(3, VOCAB, (3, 6), generator=gen)
    labels[0, 4:] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "decoder_input_ids": torch.randint(3, VOCAB, (3, 6), generator=gen),
            "label_index": (labels.view(-1) != -100).nonzero().view(-1)}


def gradients(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """The loop's loss (LM head at label positions) backpropagated once; and how often the first encoder layer's
    first linear layer ran (transformers checkpoints a layer's `forward`, so the hooks of the layer itself run once)."""
    encoder = model.get_encoder()
    layer = encoder.layers[0] if hasattr(encoder, "layers") else encoder.block[0]
    calls = []
    first_linear = next(m for m in layer.modules() if isinstance(m, torch.nn.Linear))
    handle = first_linear.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    torch.manual_seed(7)
    token_losses(model, a_batch(), LabelLogits(model))[0].sum().backward()
    handle.remove()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_checkpointed_gradients_equal_the_plain_ones(family):
    plain = tiny(family)
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed)
    expected, plain_calls = gradients(plain)
    actual, checkpointed_calls = gradients(checkpointed)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the layer ran again in the backward pass: it is on
    assert expected.keys() == actual.keys() and len(expected) > 10
    for name, grad in expected.items():
        assert torch.allclose(grad, actual[name], rtol=1e-5, atol=1e-7), name
