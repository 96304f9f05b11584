"""FLOPs accounting for train/mfu: the seq2seq training FLOPs formula and known accelerators' peaks."""

from __future__ import annotations

from typing import Any

import torch

# Dense (no sparsity) bf16/fp16 tensor-core peaks in FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
              "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}

FLOPS_FORMULA = (
    "per sample with S source and T target tokens: 6 x forward multiply-adds, where forward = "
    "encoder L*(S*(4d^2+2d*ffn) + 2*S^2*d) + decoder L*(T*(6d^2+2d*ffn) + 2d^2*S [cross-attn K,V] "
    "+ 2*T^2*d + 2*T*S*d) + LM head T*d*V; embeddings, norms, softmax ignored, attention counted unmasked"
)


def seq2seq_shape(config: Any) -> dict[str, int] | None:
    """d_model, ffn, layers and vocab of a BART-family (or T5-style) config; None when they cannot be read."""
    get = lambda *names: next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)  # noqa: E731
    shape = {"d": get("d_model", "hidden_size"), "ffn": get("encoder_ffn_dim", "d_ff"),
             "enc": get("encoder_layers", "num_layers"), "dec": get("decoder_layers", "num_decoder_layers"),
             "vocab": get("vocab_size")}
    return shape if all(shape.values()) else None


def train_flops(shape: dict[str, int], src: Any, tgt: Any) -> Any:
    """Training FLOPs of samples with `src` source and `tgt` target tokens (numbers or tensors; see FLOPS_FORMULA)."""
    d, f = shape["d"], shape["ffn"]
    enc = shape["enc"] * (src * (4 * d * d + 2 * d * f) + 2 * src * src * d)
    dec = shape["dec"] * (tgt * (6 * d * d + 2 * d * f) + src * 2 * d * d + 2 * tgt * tgt * d + 2 * tgt * src * d)
    return 6.0 * (enc + dec + tgt * d * shape["vocab"])


def peak_flops(device: torch.device, configured_tflops: float = 0.0) -> float | None:
    """The accelerator's peak FLOP/s for MFU: the configured value, else a known GPU's bf16 dense peak."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
