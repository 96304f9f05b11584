"""Peak memory and step time of training with and without gradient checkpointing and LoRA, side by side.

    python benchmarks/memory.py                          # GPU: KoBART shape, bf16
    python benchmarks/memory.py --device cpu --preset small
    python benchmarks/memory.py --variants plain,checkpointing --json out.json

Each variant (plain; training.gradient_checkpointing; model.lora; both) runs in a fresh process of its own
(benchmarks/common.py), which builds the model with loop.model.build_model from the same config plus that
variant's keys and trains it with the loop's loss (LM head at label positions) and fused AdamW on the same
batches: untimed warmup steps, then timed steps. Peak memory: on a GPU `torch.cuda.max_memory_allocated` over the
steps (what tensors hold, the allocator's cache excluded); on the CPU the process's peak resident set
(`getrusage` max RSS), and that peak minus the resident set just before the first step (imports and the model
are in both; the steps add gradients, optimizer state and activations). tracemalloc would miss torch's tensors.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.common import PRESETS, loop_overrides, pick_device, synchronize, table, write_json

VARIANTS = {
    "plain": [],
    "checkpointing": ["training.gradient_checkpointing=true"],
    "lora": ["model.lora.enabled=true"],
    "lora_checkpointing": ["model.lora.enabled=true", "training.gradient_checkpointing=true"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--preset", choices=sorted(PRESETS), default="kobart")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (the optimizer state is made)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median step time)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from " + ", ".join(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every figure to this file")
    common.add_isolation_args(p, default_timeout_s=1800)
    ns = p.parse_args(argv)
    ns.device = pick_device(ns.device)
    ns.variants = [v.strip() for v in ns.variants.split(",") if v.strip()]
    unknown = [v for v in ns.variants if v not in VARIANTS]
    if unknown or not ns.variants:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    return ns


def rss_mb() -> float:
    """This process's resident set now, in MiB (Linux /proc)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def work(variant: str, ns: argparse.Namespace, job: dict[str, Any], tmp: Path, repeat: int) -> dict[str, Any]:
    """In a worker process: build the variant's model, train warmup + timed steps, measure peak memory."""
    import torch
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    from loop import data
    from loop.config import load_config
    from loop.loss import LabelLogits, token_losses
    from loop.model import build_model, count_parameters
    from loop.optim import build_optimizer

    cfg = load_config(None, [*job["overrides"], *VARIANTS[variant]])
    set_seed(ns.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    ds = data.tokenize_file(cfg.data.train_file, cfg.data, tokenizer, cfg.model.max_source_length,
                            cfg.model.max_target_length)
    model = build_model(cfg, tokenizer).to(ns.device)
    model.train()
    head = LabelLogits(model)
    collate = data.make_collator(tokenizer, model)
    loader = data.train_loader(ds, ns.batch_size, collate, ns.seed, 0)
    batches = iter(loader)
    optimizer = build_optimizer(model, cfg)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ns.device == "cuda" else torch.autocast("cpu",
                                                                                                      enabled=False)

    def step() -> None:
        batch = {k: v.to(ns.device) for k, v in next(batches).items()}
        with autocast:
            loss_sum, counts = token_losses(model, batch, head)
        (loss_sum.sum() / counts.sum().clamp(min=1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    print(f"{variant}: {count_parameters(model):,} trainable parameters; {ns.warmup_steps} warmup steps", flush=True)
    start_rss = rss_mb()
    if ns.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start_allocated = torch.cuda.memory_allocated() / 2**20
    times = []
    for i in range(ns.warmup_steps + ns.steps):
        synchronize(ns.device)
        began = time.perf_counter()
        step()
        synchronize(ns.device)
        if i >= ns.warmup_steps:
            times.append(time.perf_counter() - began)
    out = {"variant": variant, "keys": VARIANTS[variant], "trainable_parameters": count_parameters(model),
           "parameters": sum(p.numel() for p in model.parameters()), "step_ms": 1000 * statistics.median(times),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "start_rss_mb": start_rss, "torch_threads": torch.get_num_threads()}
    out["peak_over_start_mb"] = out["peak_rss_mb"] - start_rss
    if ns.device == "cuda":
        out["peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["start_allocated_mb"] = start_allocated
    return out


def report(result: dict[str, Any]) -> str:
    """The side-by-side table, each variant against plain."""
    runs = result["variants"]
    cuda = result["device"]["kind"] == "cuda"
    key = "peak_allocated_mb" if cuda else "peak_over_start_mb"
    base = runs.get("plain")
    rows = []
    for name, r in runs.items():
        rows.append([name, f"{r['trainable_parameters']:,}", r["peak_rss_mb"], r.get("peak_allocated_mb"),
                     r["peak_over_start_mb"], r["step_ms"],
                     r[key] / base[key] if base else None, r["step_ms"] / base["step_ms"] if base else None])
    head = ["variant", "trainable", "peak RSS MiB", "peak CUDA MiB", "RSS added by steps MiB", "step ms",
            "memory vs plain", "step time vs plain"]
    device, preset, batch = result["device"]["name"], result["preset"]["name"], result["settings"]["batch_size"]
    return f"{device}, preset {preset}, batch {batch}\n" + table(rows, head)


def main(argv: list[str] | None = None) -> int:
    """Write data and a tokenizer, run every variant in its own process, print and write the figures."""
    argv = common.serve(argv, work)  # a worker process runs its one variant here, and exits
    ns = parse_args(argv)
    preset = PRESETS[ns.preset]
    n_rows = ns.batch_size * (ns.warmup_steps + ns.steps)
    with common.workspace("memory", ns, argv, n_rows) as (tmp, _, result):
        precision = "bf16" if ns.device == "cuda" else "no"
        overrides = [*loop_overrides(preset, tmp / "data.csv", tmp / "data.csv", tmp / "tokenizer"),
                     f"training.seed={ns.seed}", "model.scratch.dropout=0.1"]
        order = [(name, 0) for name in ns.variants]
        result["settings"] = {"batch_size": ns.batch_size, "warmup_steps": ns.warmup_steps, "steps": ns.steps,
                              "precision": precision, **common.isolation_settings(order, ns.child_timeout)}
        result.update(variants={}, runs=[], complete=False)
        common.write_job(tmp, ns, overrides=overrides)
        try:
            for name, figures in common.isolated_runs(__file__, tmp, order, ns.child_timeout, result["runs"]):
                result["variants"][name] = figures
                write_json(ns.json, result)
        except common.WorkerFailed as err:
            return common.fail(result, ns.json, err)
        return common.finish(result, ns.json, report)


if __name__ == "__main__":
    sys.exit(main())
