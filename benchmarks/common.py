"""Shared parts of the benchmarks: synthetic KoBART-length data, model presets, device facts, FLOPs, output.

The data is random token ids written as text in a word-level vocabulary (one word = one token, every word a
made-up two-syllable Hangul word), so the loop's own CSV -> tokenizer -> `datasets` path reproduces exactly the
ids the Trainer variants get, and ROUGE has Korean text to tokenize.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py`: make `loop` importable
    sys.path.insert(0, str(ROOT))

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # BART's order: <s>=0, <pad>=1, </s>=2
HANGUL_FIRST, HANGUL_COUNT = 0xAC00, 11172
# Bf16 dense tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


@dataclass(frozen=True)
class Preset:
    """Model shape and the length distribution of the synthetic data."""

    d_model: int
    layers: int  # encoder layers = decoder layers
    heads: int
    ffn: int
    vocab: int
    src_mean: int  # mean source tokens, before <s> and </s>
    src_max: int  # including <s> and </s> (= model.max_source_length)
    tgt_mean: int
    tgt_max: int


PRESETS = {
    "kobart": Preset(768, 6, 16, 3072, 30000, 220, 512, 45, 128),  # KoBART's shape and DialogSum-like lengths
    "small": Preset(256, 2, 4, 1024, 8000, 110, 256, 23, 64),  # half the lengths, a model a 2-core CPU can train
    "tiny": Preset(32, 1, 2, 64, 500, 40, 96, 10, 24),  # smoke tests
}


def setup_env(tmp: Path) -> None:
    """No W&B, no Hub, no tokenizer threads; datasets' cache in the temp dir."""
    os.environ["WANDB_MODE"] = "disabled"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf-datasets")


def word(i: int) -> str:
    """The i-th vocabulary word: two Hangul syllables, distinct for every i < 11172**2."""
    # 7919 is prime and does not divide 11172**2, so i -> i * 7919 mod 11172**2 is a bijection.
    a, b = divmod(i * 7919 % HANGUL_COUNT**2, HANGUL_COUNT)
    return chr(HANGUL_FIRST + a) + chr(HANGUL_FIRST + b)


def lengths(rng: Any, n: int, mean: int, max_len: int, sigma: float = 0.5) -> list[int]:
    """Content lengths (without <s>/</s>) from a lognormal with the given mean, clipped to [4, max_len - 2]."""
    median = mean / math.exp(sigma**2 / 2)
    raw = rng.lognormal(math.log(median), sigma, size=n)
    return [int(x) for x in raw.round().clip(4, max_len - 2)]


def make_rows(preset: Preset, n: int, seed: int) -> list[dict[str, Any]]:
    """n samples: random content ids for source and target, with KoBART-like lengths."""
    import numpy as np

    rng = np.random.default_rng(seed)
    src_len = lengths(rng, n, preset.src_mean, preset.src_max)
    tgt_len = lengths(rng, n, preset.tgt_mean, preset.tgt_max, sigma=0.45)
    first = len(SPECIALS)
    return [{"src": rng.integers(first, preset.vocab, s).tolist(), "tgt": rng.integers(first, preset.vocab, t).tolist()}
            for s, t in zip(src_len, tgt_len, strict=True)]


def text_of(ids: list[int]) -> str:
    """Content token ids as text: their words joined by spaces."""
    return " ".join(word(t - len(SPECIALS)) for t in ids)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """The rows as the loop's CSV (fname, dialogue, summary)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["fname", "dialogue", "summary"])
        for i, row in enumerate(rows):
            out.writerow([f"s{i}", text_of(row["src"]), text_of(row["tgt"])])


def check_round_trip(tokenizer: Any, rows: list[dict[str, Any]]) -> None:
    """Fail unless the text of the rows tokenizes back to exactly their ids."""
    got = tokenizer([text_of(r["src"]) for r in rows], add_special_tokens=False)["input_ids"]
    if got != [r["src"] for r in rows]:
        raise RuntimeError("synthetic text does not tokenize back to its ids; the variants would see different data")


def write_tokenizer(path: Path, vocab: int) -> Any:
    """A word-level tokenizer over the synthetic vocabulary (BART special-token ids), saved to path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {tok: i for i, tok in enumerate(SPECIALS)}
    table.update({word(i): len(SPECIALS) + i for i in range(vocab - len(SPECIALS))})
    backend = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", pad_token="<pad>",
                                        eos_token="</s>", unk_token="<unk>", mask_token="<mask>")
    tokenizer.save_pretrained(str(path))
    return tokenizer


def with_specials(ids: list[int]) -> list[int]:
    """`<s> ids </s>`, as the loop's tokenize_file builds its inputs."""
    return [0, *ids, 2]


def loop_overrides(preset: Preset, train_file: Path, dev_file: Path, tokenizer_dir: Path) -> list[str]:
    """`--set` overrides that point the loop at the synthetic files and tokenizer and build the preset's model."""
    return [
        f"data.train_file={train_file}", f"data.dev_file={dev_file}", "data.synthetic=false",
        "data.special_tokens=[]", "data.num_workers=0", "model.from_scratch=true", f"model.tokenizer={tokenizer_dir}",
        f"model.max_source_length={preset.src_max}", f"model.max_target_length={preset.tgt_max}",
        f"model.scratch.d_model={preset.d_model}", f"model.scratch.encoder_layers={preset.layers}",
        f"model.scratch.decoder_layers={preset.layers}", f"model.scratch.attention_heads={preset.heads}",
        f"model.scratch.ffn_dim={preset.ffn}", "wandb.mode=disabled",
    ]


def train_flops(preset: Preset, src: int, tgt: int) -> float:
    """Training FLOPs of one sample: 6 x multiply-adds of the forward pass (see FLOPS_FORMULA)."""
    d, f, n = preset.d_model, preset.ffn, preset.layers
    enc = n * (src * (4 * d * d + 2 * d * f) + 2 * src * src * d)
    dec = n * (tgt * (6 * d * d + 2 * d * f) + src * 2 * d * d + 2 * tgt * tgt * d + 2 * tgt * src * d)
    head = tgt * d * preset.vocab
    return 6.0 * (enc + dec + head)


FLOPS_FORMULA = (
    "per sample with S source and T target tokens: 6 x forward multiply-adds, where forward = "
    "encoder L*(S*(4d^2+2d*ffn) + 2*S^2*d) + decoder L*(T*(6d^2+2d*ffn) + 2d^2*S [cross-attn K,V] "
    "+ 2*T^2*d + 2*T*S*d) + LM head T*d*V; embeddings, norms, softmax ignored, attention counted unmasked. "
    "Useful = real (non-pad) lengths; executed = padded batch shapes."
)


def device_info(device: str) -> dict[str, Any]:
    """The machine in words, with the peak bf16 FLOP/s where known."""
    import accelerate
    import torch
    import transformers

    info: dict[str, Any] = {"kind": device, "python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "accelerate": accelerate.__version__}
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        mem = torch.cuda.get_device_properties(0).total_memory / 2**30
        info.update(name=f"{name} ({mem:.0f} GiB)",
                    peak_bf16_flops=next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None))
    else:
        model = platform.processor() or platform.machine()
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        info.update(name=f"{model}, {cores} cores", peak_bf16_flops=None, torch_threads=torch.get_num_threads())
    return info


def pick_device(requested: str | None) -> str:
    """cuda when available unless asked otherwise; `cpu` also hides the GPU from accelerate."""
    import torch

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible; use --device cpu")
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    return device


def synchronize(device: str) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def fresh_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons so the next Accelerator (loop or Trainer) starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    # Several Accelerators in one process are not supported; this is how accelerate's own tests reset them.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def release_memory(device: str) -> None:
    """Free what the previous variant left, so each variant starts from the same memory state."""
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def header(benchmark: str, device: str, preset_name: str, argv: list[str]) -> dict[str, Any]:
    """The common head of a result file: what, where, when, how."""
    return {"benchmark": benchmark, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(["python", *sys.argv[:1], *argv]), "device": device_info(device),
            "preset": {"name": preset_name, **asdict(PRESETS[preset_name])}}


def write_json(path: str | None, result: dict[str, Any]) -> None:
    """Write the result file (when asked), replacing any earlier partial one."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)


def table(rows: list[list[Any]], head: list[str]) -> str:
    """A Markdown table, numbers rounded for reading."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 10 else f"{v:,.1f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
