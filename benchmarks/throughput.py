"""Training throughput of this loop against HF Seq2SeqTrainer, side by side, each run in a fresh process.

    python benchmarks/throughput.py                    # GPU: KoBART shape, bf16, batch 16, 30 + 100 steps
    python benchmarks/throughput.py --device cpu       # CPU: a small model, fp32, fewer steps
    python benchmarks/throughput.py --json out.json    # every figure as JSON

Variants, all on the same synthetic data (random token ids, KoBART-like lengths), the same model shape built by
loop.model.build_model, batch, LR schedule, precision and number of optimizer steps:
- loop: the real entry point, `loop.train.main([...])` with `--set` overrides. The clock is read (after a device
  synchronize) when the loop logs its training metrics at the end of the warmup steps and at the last step, so
  the timed span is exactly the optimizer steps after warmup, with the loop's own logging in it and its only
  evaluation and save after it (eval/save cadence beyond max_steps, eval on a 4-row dev file).
- loop_sdpa_default (not run unless named in --variants): the loop with torch's own SDPA kernel choice instead of
  training.attention_backend = auto, which on CUDA turns cuDNN attention off for varying shapes (cuDNN is torch's
  first choice on Hopper/Blackwell since torch 2.10, and builds a plan per new shape): the A/B of that choice.
- trainer: Seq2SeqTrainer as a typical user runs it (random order, DataCollatorForSeq2Seq dynamic padding,
  default optimizer), no eval, no saving, report_to none; a callback reads the clock at the same two steps.
- trainer_grouped: the same with length-grouped batches.
- trainer_grouped_nocudnn: the same with cuDNN attention off (`torch.backends.cuda.enable_cudnn_sdp(False)`, the
  fix for cuDNN's per-shape plans): the Trainer at its best, the one the loop's 4x GPU target is against.
Real and padded token counts come from wrapping each variant's collate function (training batches only).
Then a short profiled pass of the loop's step, rebuilt from its building blocks (make_collator, train_loader,
token_losses, build_optimizer, accelerator.prepare, the same accumulation and clipping code), synchronizing
after every phase; it is separate so that its synchronizations do not disturb the timed runs.

Isolation: this process writes the data and tokenizer to a temp dir once, then runs every (variant, repeat) and
the profiled pass in a fresh worker process of this script (benchmarks/common.py, `run_worker`), so no variant
reuses another's CUDA context, cuBLAS handles, kernel choices, allocator pool or imports: each pays its own
first-run costs, inside its untimed warmup steps. Repeats are interleaved and the order rotates per repeat
(repeat r starts with the r-th variant); each variant's figures are its median run. The settings record the run
order, and every run its worker's pid.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.common import (
    PRESETS,
    Preset,
    loop_overrides,
    pick_device,
    synchronize,
    table,
    train_flops,
    with_specials,
    write_csv,
    write_json,
)
from loop.flops import FLOPS_FORMULA

VARIANTS = ("loop", "loop_compiled", "loop_sdpa_default", "trainer", "trainer_grouped", "trainer_grouped_nocudnn")
# Compiling on 2 cores is slow; loop_sdpa_default is an extra minute on a GPU, asked for by name.
# On the CPU there is no cuDNN attention, so trainer_grouped_nocudnn would only repeat trainer_grouped.
DEFAULT_VARIANTS = {"cuda": ("loop", "loop_compiled", "trainer", "trainer_grouped", "trainer_grouped_nocudnn"),
                    "cpu": ("loop", "trainer", "trainer_grouped")}
# Per device: preset, untimed warmup steps, timed steps, profiled steps, repeats (a shared CPU stalls now and then).
DEFAULTS = {"cuda": ("kobart", 30, 100, 20, 1), "cpu": ("small", 3, 20, 6, 3)}
CHILD_TIMEOUT_S = 1800
LEARNING_RATE, WARMUP_RATIO, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 0.1, 0.01, 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments; unset ones take the device's defaults."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model shape and lengths (default: kobart on cuda, "
                   "small on cpu; tiny for smoke tests)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--warmup-steps", type=int, help="untimed optimizer steps first (at least 1)")
    p.add_argument("--steps", type=int, help="timed optimizer steps")
    p.add_argument("--compiled-warmup-steps", type=int,
                   help="untimed steps of loop_compiled (default: 120 on cuda, else --warmup-steps): compiling and "
                        "recording a CUDA graph per shape bucket are one-off costs that a real run amortizes; the "
                        "JSON keeps them as setup_and_warmup_s")
    p.add_argument("--profile-steps", type=int, help="steps of the profiled pass (0 = skip it)")
    p.add_argument("--repeats", type=int, help="run every variant this many times, interleaved; the median counts")
    p.add_argument("--variants", help="comma-separated subset of " + ", ".join(VARIANTS) + " (default: all but "
                   "loop_sdpa_default on cuda, all but that and loop_compiled on cpu); loop_compiled = loop + "
                   "--loop-set + torch.compile reduce-overhead + shape buckets (configs/fast.toml's settings, "
                   "scaled to the preset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loop-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --set override for this loop's run, e.g. data.group_by_length=true")
    p.add_argument("--json", help="write every figure to this file (rewritten after each variant)")
    common.add_isolation_args(p, CHILD_TIMEOUT_S)
    ns = p.parse_args(argv)
    ns.device = pick_device(ns.device)
    preset, warmup, steps, profile, repeats = DEFAULTS[ns.device]
    ns.preset = ns.preset or preset
    ns.warmup_steps = warmup if ns.warmup_steps is None else ns.warmup_steps
    ns.steps = steps if ns.steps is None else ns.steps
    if ns.compiled_warmup_steps is None:
        ns.compiled_warmup_steps = max(ns.warmup_steps, 120) if ns.device == "cuda" else ns.warmup_steps
    ns.profile_steps = profile if ns.profile_steps is None else ns.profile_steps
    ns.repeats = repeats if ns.repeats is None else ns.repeats
    ns.variants = [v for v in (ns.variants or ",".join(DEFAULT_VARIANTS[ns.device])).split(",") if v]
    if unknown := set(ns.variants) - set(VARIANTS):
        p.error(f"--variants: unknown {', '.join(sorted(unknown))}")
    if min(ns.warmup_steps, ns.steps, ns.repeats) < 1:
        p.error("--warmup-steps, --steps and --repeats must be at least 1")
    return ns


def counting(collate: Callable, log: list[dict[str, Any]]) -> Callable:
    """Wrap a collate function to record, per batch, real and padded lengths and the time it took."""
    from loop.data import LABEL_PAD

    def collate_and_count(features: list[dict]) -> dict:
        start = time.perf_counter()
        batch = collate(features)
        labels = batch["labels"]
        log.append({"n": labels.shape[0], "src": batch["attention_mask"].sum(1).tolist(),
                    "tgt": (labels != LABEL_PAD).sum(1).tolist(), "src_pad": batch["input_ids"].shape[1],
                    "tgt_pad": labels.shape[1], "collate_s": time.perf_counter() - start})
        return batch

    return collate_and_count


def figures(batches: list[dict[str, Any]], seconds: float, steps: int, preset: Preset,
            peak: float | None) -> dict[str, Any]:
    """samples/s, tokens/s, padding efficiency, FLOP/s and MFU of the timed batches."""
    samples = sum(b["n"] for b in batches)
    src = sum(sum(b["src"]) for b in batches)
    tgt = sum(sum(b["tgt"]) for b in batches)
    src_pad = sum(b["n"] * b["src_pad"] for b in batches)
    tgt_pad = sum(b["n"] * b["tgt_pad"] for b in batches)
    useful = sum(train_flops(preset, s, t) for b in batches for s, t in zip(b["src"], b["tgt"], strict=True))
    executed = sum(b["n"] * train_flops(preset, b["src_pad"], b["tgt_pad"]) for b in batches)
    return {
        "timed_steps": steps, "timed_s": seconds, "step_ms": 1000 * seconds / steps, "samples": samples,
        "samples_per_s": samples / seconds, "real_tokens": src + tgt, "real_tokens_per_s": (src + tgt) / seconds,
        "padded_tokens": src_pad + tgt_pad, "padding_efficiency": (src + tgt) / (src_pad + tgt_pad),
        "source_padding_efficiency": src / src_pad, "target_padding_efficiency": tgt / tgt_pad,
        "mean_source_tokens": src / samples, "mean_target_tokens": tgt / samples,
        "useful_tflops_per_s": useful / seconds / 1e12, "executed_tflops_per_s": executed / seconds / 1e12,
        "mfu_useful": useful / seconds / peak if peak else None,
        "mfu_executed": executed / seconds / peak if peak else None,
        # Equal fingerprints = the variants trained on exactly the same batches in the timed steps.
        "batches_fingerprint": hashlib.sha1(repr([(b["src"], b["tgt"]) for b in batches]).encode()).hexdigest()[:12],
    }


def timed_batches(log: list[dict[str, Any]], ns: argparse.Namespace) -> list[dict[str, Any]]:
    """The batches of the timed steps (the log is in batch order; loaders may have collated one batch ahead)."""
    end = (ns.warmup_steps + ns.steps) * ns.accum
    if len(log) < end:  # e.g. loop/train.py no longer builds its loader through loop.data.train_loader
        raise RuntimeError(f"the collate hook saw {len(log)} training batches, expected at least {end}")
    return log[ns.warmup_steps * ns.accum:end]


def run_loop(ns: argparse.Namespace, overrides: list[str], preset: Preset, peak: float | None,
             output_dir: Path) -> dict[str, Any]:
    """This loop through its real entry point; the clock is read where it logs (after warmup, at the end)."""
    from loop import attention, compiled, data, tracking, train

    total = ns.warmup_steps + ns.steps
    fell_back: list[str] = []
    log: list[dict[str, Any]] = []
    marks: dict[int, float] = {}
    logged: dict[int, dict[str, float]] = {}
    real_train_loader, real_log = data.train_loader, tracking.log

    def train_loader(ds, batch_size, collate, seed, num_workers, **kwargs):
        return real_train_loader(ds, batch_size, counting(collate, log), seed, num_workers, **kwargs)

    syncs: list[int] = []  # on CUDA: implicit host syncs (torch's sync debug mode) within the timed span

    def log_with_clock(accelerator, values, step):
        if "train/samples_per_s" in values:  # the training-metrics log: the step's work is queued or done
            synchronize(ns.device)
            marks[step] = time.perf_counter()
            logged[step] = dict(values)
            if ns.device == "cuda" and step in (ns.warmup_steps, total):
                import torch

                torch.cuda.set_sync_debug_mode("warn" if step == ns.warmup_steps else "default")
                syncs.append(len(caught))
        return real_log(accelerator, values, step=step)

    real_fall_back = compiled.CompiledLoss.fall_back

    def fall_back(self, err):
        fell_back.append(f"{type(err).__name__}: {err}"[:500])
        return real_fall_back(self, err)

    data.train_loader, tracking.log, compiled.CompiledLoss.fall_back = train_loader, log_with_clock, fall_back
    started = time.perf_counter()
    try:
        settings = [*overrides, *ns.loop_set, f"training.max_steps={total}",
                    f"evaluation.logging_steps={ns.warmup_steps}", f"training.output_dir={output_dir}"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = train.main(list(itertools.chain.from_iterable(("--set", o) for o in settings)))
    finally:
        data.train_loader, tracking.log, compiled.CompiledLoss.fall_back = real_train_loader, real_log, real_fall_back
    if code != 0 or ns.warmup_steps not in marks or total not in marks:
        raise RuntimeError(f"loop run did not finish (exit {code}, logged steps {sorted(marks)})")
    out = figures(timed_batches(log, ns), marks[total] - marks[ns.warmup_steps], ns.steps, preset, peak)
    # The loop's own figure: samples over training time in its logging windows after warmup.
    windows = sorted(s for s in logged if s > ns.warmup_steps)
    samples, seconds, prev = 0, 0.0, ns.warmup_steps
    for step in windows:
        n = (step - prev) * ns.batch_size * ns.accum
        samples, seconds, prev = samples + n, seconds + n / logged[step]["train/samples_per_s"], step
    out["loop_logged_samples_per_s"] = samples / seconds
    out["method"] = "real entry point loop.train.main; clock at its train-metrics logs (synchronized)"
    out["compile_failed"] = fell_back[0] if fell_back else None  # a compiled variant that fell back to eager
    out["warmup_steps"] = ns.warmup_steps
    if len(syncs) == 2:  # synchronizing calls in the timed steps, including those of its logs
        flagged = [w for w in caught[syncs[0]:syncs[1]] if "synchroniz" in str(w.message)]
        out["host_syncs_timed"] = {"count": len(flagged), "steps": ns.steps,
                                   "logs": len([s for s in logged if s > ns.warmup_steps]),
                                   "first": sorted({f"{w.filename}:{w.lineno}" for w in flagged})[:10]}
    out["setup_and_warmup_s"] = marks[ns.warmup_steps] - started  # model build, compile, untimed steps
    # Seconds compiling (inside setup_and_warmup_s when all compiles happen in the warmup) and the counts of
    # dynamo compiles, recompiles, backward compiles and CUDA graphs recorded, as the run reported them.
    out["compile"] = json.loads((output_dir / "final_metrics.json").read_text())["time"]["compile"]
    out["attention_kernels"] = attention.enabled_now()  # the SDPA kernel switches the run trained with
    return out


def trainer_kwargs(ns: argparse.Namespace, output_dir: Path, grouped: bool) -> dict[str, Any]:
    """Seq2SeqTrainingArguments for a plain, fair run; argument names checked against the installed version."""
    import dataclasses

    from transformers import Seq2SeqTrainingArguments

    names = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}
    kw: dict[str, Any] = {
        "output_dir": str(output_dir), "per_device_train_batch_size": ns.batch_size,
        "gradient_accumulation_steps": ns.accum, "max_steps": ns.warmup_steps + ns.steps,
        "learning_rate": LEARNING_RATE, "lr_scheduler_type": "linear", "weight_decay": WEIGHT_DECAY,
        "max_grad_norm": MAX_GRAD_NORM, "seed": ns.seed, "bf16": ns.device == "cuda", "use_cpu": ns.device == "cpu",
        "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "dataloader_num_workers": 0,
        "dataloader_pin_memory": ns.device == "cuda",
        # An int is a step count in every version (5.x dropped warmup_ratio; its float warmup_steps < 1 is a ratio).
        "warmup_steps": math.ceil(WARMUP_RATIO * (ns.warmup_steps + ns.steps)),
    }
    kw["eval_strategy" if "eval_strategy" in names else "evaluation_strategy"] = "no"
    if grouped:
        if "train_sampling_strategy" in names:  # transformers 5.x
            kw["train_sampling_strategy"] = "group_by_length"
        else:
            kw["group_by_length"] = True
    return kw


def run_trainer(ns: argparse.Namespace, cfg: Any, rows: list[dict[str, Any]], preset: Preset, peak: float | None,
                output_dir: Path, grouped: bool) -> dict[str, Any]:
    """Seq2SeqTrainer on the same ids, model shape and schedule; the clock is read at the same two steps."""
    import datasets
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        TrainerCallback,
        set_seed,
    )

    from loop.data import LABEL_PAD
    from loop.model import build_model

    total = ns.warmup_steps + ns.steps
    marks: dict[int, float] = {}

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (ns.warmup_steps, total):
                synchronize(ns.device)
                marks[state.global_step] = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    set_seed(ns.seed)
    model = build_model(cfg, tokenizer)
    src = [with_specials(r["src"]) for r in rows]
    ds = datasets.Dataset.from_dict({"input_ids": src, "attention_mask": [[1] * len(s) for s in src],
                                     "labels": [with_specials(r["tgt"]) for r in rows]})
    log: list[dict[str, Any]] = []
    collator = counting(DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=LABEL_PAD), log)
    args = Seq2SeqTrainingArguments(**trainer_kwargs(ns, output_dir, grouped))
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                             processing_class=tokenizer, callbacks=[StepClock()])
    if ns.accum > 1:  # transformers issue 47688: else the loss is mis-scaled under accumulation
        trainer.model_accepts_loss_kwargs = False
    output = trainer.train()
    out = figures(timed_batches(log, ns), marks[total] - marks[ns.warmup_steps], ns.steps, preset, peak)
    out["trainer_reported_samples_per_s"] = output.metrics.get("train_samples_per_second")
    out["optimizer"] = str(getattr(args.optim, "value", args.optim))
    out["method"] = "Seq2SeqTrainer.train(); clock in on_step_end (synchronized)"
    return out


def profile_loop(ns: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    """Step-time breakdown of the loop's step, rebuilt from its building blocks, with a sync after each phase."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from transformers import AutoTokenizer, get_scheduler

    from loop import data
    from loop import model as modeling
    from loop.compiled import CompiledLoss
    from loop.loss import LabelLogits, token_losses
    from loop.optim import build_optimizer
    from loop.step import HostCopy, device_skip_optimizer, found_inf

    t, d, accum = cfg.training, cfg.data, ns.accum
    # As loop/train.py builds its Accelerator, data, model, optimizer and loss (one process).
    accelerator = Accelerator(mixed_precision=t.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
                              step_scheduler_with_optimizer=False)
    set_seed(t.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    ds = data.tokenize_file(d.train_file, d, tokenizer, cfg.model.max_source_length, cfg.model.max_target_length)
    model = modeling.build_model(cfg, tokenizer)
    head = LabelLogits(model)
    log: list[dict[str, Any]] = []
    collate = counting(data.make_collator(tokenizer, model, d.source_buckets, d.target_buckets), log)
    loader = data.train_loader(ds, t.batch_size, collate, t.seed, 0,
                               group_size=t.batch_size * accum if d.group_by_length else 0)
    optimizer = build_optimizer(model, cfg)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    loss_fn = CompiledLoss(token_losses, t.torch_compile, print)
    skip_on_device = device_skip_optimizer(optimizer) if accelerator.scaler is None else None
    warm, syncs_steps = min(ns.warmup_steps, 5), 3 if ns.device == "cuda" else 0
    total = warm + 2 * ns.profile_steps + syncs_steps
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=math.ceil(WARMUP_RATIO * total),
                              num_training_steps=total)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    device = accelerator.device
    pending: list[Any] = [None]  # the previous step's gradient norm, read one step late as the loop does
    model.train()

    def step(clock: Callable[[str], None]) -> None:
        """One optimizer step as loop/train.py runs it; clock(phase) closes a phase."""
        group = [next(batches) for _ in range(accum)]
        clock("data (fetch, collate, copy to device)")
        global_tokens = sum((b["labels"] != data.LABEL_PAD).sum() for b in group).clamp(min=1)
        step_loss = torch.zeros((), device=device)
        real_tokens = torch.zeros((), device=device)
        for i, batch in enumerate(group):
            with contextlib.nullcontext() if i == accum - 1 else accelerator.no_sync(model):
                loss_sum = loss_fn(model, batch, None if loss_fn.active else head)[0].sum()
                clock("forward (token_losses)")
                accelerator.backward(loss_sum * accelerator.num_processes / global_tokens)
                clock("backward")
            step_loss += loss_sum.detach()
            real_tokens += batch["attention_mask"].sum() + (batch["labels"] != data.LABEL_PAD).sum()
            clock("bookkeeping (token counts, loss sum)")
        norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or float("inf"))
        finite = torch.isfinite(norm)
        clock("clip + isfinite")
        if pending[0] is not None and math.isfinite(float(pending[0].value())):
            scheduler.step()
        if skip_on_device is not None:
            with found_inf(skip_on_device, finite):
                optimizer.step()
        elif bool(finite):
            optimizer.step()
        pending[0] = HostCopy(norm)
        optimizer.zero_grad(set_to_none=True)
        clock("optimizer (late schedule step, step, zero_grad)")

    for _ in range(warm):
        step(lambda phase: None)
    synchronize(ns.device)
    start = time.perf_counter()
    for _ in range(ns.profile_steps):
        step(lambda phase: None)
    synchronize(ns.device)
    replica_ms = 1000 * (time.perf_counter() - start) / ns.profile_steps

    first = len(log)
    phases: dict[str, list[float]] = {}
    last = [time.perf_counter()]

    def clock(phase: str) -> None:
        issued = time.perf_counter()
        synchronize(ns.device)
        now = time.perf_counter()
        issue_total = phases.setdefault(phase, [0.0, 0.0])
        issue_total[0] += issued - last[0]
        issue_total[1] += now - last[0]
        last[0] = now

    for _ in range(ns.profile_steps):
        last[0] = time.perf_counter()
        step(clock)
    collate_ms = 1000 * sum(b["collate_s"] for b in log[first:][: ns.profile_steps * accum]) / ns.profile_steps

    host_syncs = None
    if syncs_steps:  # count synchronizing CUDA calls in unprofiled steps (our own synchronize() is not one)
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(syncs_steps):
                step(lambda phase: None)
        torch.cuda.set_sync_debug_mode("default")
        host_syncs = sum("synchronizing" in str(w.message) for w in caught) / syncs_steps

    ms = {name: {"ms": 1000 * v[1] / ns.profile_steps, "issue_ms": 1000 * v[0] / ns.profile_steps}
          for name, v in phases.items()}
    summed = sum(v["ms"] for v in ms.values())
    for v in ms.values():
        v["share"] = v["ms"] / summed
    return {"method": "replica of loop/train.py's step from its building blocks; device synchronize after each "
                      "phase; issue_ms = time until the Python call returned (before the synchronize)",
            "steps": ns.profile_steps, "phases": ms, "sum_ms": summed, "collate_ms": collate_ms,
            "replica_step_ms_unsynchronized": replica_ms, "host_syncs_per_step": host_syncs}


def report(result: dict[str, Any]) -> str:
    """The readable tables."""
    rows = []
    loop = result["variants"].get("loop")
    for name, v in result["variants"].items():
        ratio = loop["samples_per_s"] / v["samples_per_s"] if loop else None
        mfu = f"{100 * v['mfu_useful']:.2f}%" if v["mfu_useful"] is not None else "-"
        rows.append([name, v["samples_per_s"], v["real_tokens_per_s"], v["padding_efficiency"], v["step_ms"],
                     v["useful_tflops_per_s"], mfu, ratio])
    dev = result["device"]
    s = result["settings"]
    text = (f"device: {dev['name']} | torch {dev['torch']}, transformers {dev['transformers']}, "
            f"accelerate {dev['accelerate']}\n"
            f"model {s['parameters']:,} parameters ({result['preset']['name']}), {s['precision']}, batch "
            f"{s['batch_size']} x accum {s['accum']}, {s['warmup_steps']} warmup + {s['timed_steps']} timed steps, "
            f"median of {s['repeats']} interleaved run(s), each in its own process\n"
            f"run order: {' '.join(s['run_order'])}\n\n")
    text += table(rows, ["variant", "samples/s", "real tokens/s", "padding eff.", "step ms", "useful TFLOP/s",
                         "useful MFU", "loop / this"])
    same = [name.removeprefix("loop_vs_") for name, r in result.get("ratios", {}).items()
            if r["same_batches"] and name.startswith("loop_vs_")]
    text += f"\nsame timed batches as the loop: {', '.join(same) or 'none'}"
    for name, v in result["variants"].items():
        if "setup_and_warmup_s" in v:
            text += (f"\n{name}: setup + {v['warmup_steps']} untimed steps took {v['setup_and_warmup_s']:.1f} s"
                     + (" (compile and CUDA-graph recording included)" if name == "loop_compiled" else ""))
        if (c := v.get("compile")) and c["dynamo_compiles"]:
            text += (f"\n{name}: compiling took {c['seconds']:.1f} s ({c['dynamo_compiles']} dynamo compiles, "
                     f"{c['recompiles']} recompiles, {c['backward_compiles']} backward compiles, "
                     f"{c['cudagraphs_recorded']} CUDA graphs recorded)")
        if h := v.get("host_syncs_timed"):
            text += (f"\n{name}: {h['count']} implicit host syncs in {h['steps']} timed steps ({h['logs']} of them "
                     f"logging steps){': ' + ', '.join(h['first']) if h['first'] else ''}")
        if v.get("compile_failed"):
            text += f"\n{name}: torch.compile FAILED, the run fell back to eager: {v['compile_failed']}"
    for name, r in result.get("ratios", {}).items():
        if name.startswith("loop_compiled_vs_") or name == "loop_vs_loop_sdpa_default":
            text += f"\n{name.replace('_vs_', ' / ')}: {r['samples_per_s']:.3g}"
    if b := result.get("breakdown"):
        text += (f"\n\nloop step breakdown ({b['steps']} steps, synchronized after each phase; unsynchronized "
                 f"replica {b['replica_step_ms_unsynchronized']:.1f} ms/step; host syncs/step "
                 f"{b['host_syncs_per_step'] if b['host_syncs_per_step'] is not None else 'n/a on CPU'})\n")
        text += table([[k, v["ms"], v["issue_ms"], f"{100 * v['share']:.0f}%"] for k, v in b["phases"].items()]
                      + [["sum", b["sum_ms"], None, "100%"], ["  of which collate", b["collate_ms"], None, None]],
                      ["phase", "ms/step", "issue ms/step", "share"])
    return text


def compiled_overrides(preset: Preset) -> list[str]:
    """torch.compile with CUDA graphs and static shape buckets (8 source, 4 target lengths up to the preset's max)."""
    source = [preset.src_max * k // 8 for k in range(1, 9)]
    target = [preset.tgt_max * k // 4 for k in range(1, 5)]
    return ["training.torch_compile=reduce-overhead", f"data.source_buckets={source}", f"data.target_buckets={target}"]


def work(name: str, ns: argparse.Namespace, job: dict[str, Any], tmp: Path, repeat: int) -> dict[str, Any]:
    """In a worker process: one run of one variant (or the profiled pass) on the data the parent wrote to tmp."""
    from loop.config import load_config

    preset = PRESETS[ns.preset]
    if name == "loop":
        return run_loop(ns, job["overrides"], preset, job["peak"], tmp / f"loop-run-{repeat}")
    if name == "loop_sdpa_default":  # torch's own SDPA kernel choice, whatever training.attention_backend says
        from loop import attention

        attention.choose = lambda backend, device_type, static_shapes: attention.Decision()
        return run_loop(ns, job["overrides"], preset, job["peak"], tmp / f"loop-sdpa-default-run-{repeat}")
    if name == "loop_compiled":
        longer = argparse.Namespace(**{**vars(ns), "warmup_steps": ns.compiled_warmup_steps})
        return run_loop(longer, [*job["overrides"], *compiled_overrides(preset)], preset, job["peak"],
                        tmp / f"loop-compiled-run-{repeat}")
    # The profiled replica runs the loop's step with the loop's settings (--loop-set included), the Trainer without.
    extra = ns.loop_set if name == "profile" else []
    cfg = load_config(None, [*job["overrides"], *extra, f"training.max_steps={ns.warmup_steps + ns.steps}"])
    if name == "profile":
        return profile_loop(ns, cfg)
    if name == "trainer_grouped_nocudnn":  # this worker process only: no cuDNN plan per new attention shape
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)
    return run_trainer(ns, cfg, common.read_rows(tmp), preset, job["peak"], tmp / f"{name}-run-{repeat}",
                       name in ("trainer_grouped", "trainer_grouped_nocudnn"))


def main(argv: list[str] | None = None) -> int:
    """Write the data, run every variant run and the profiled pass in its own process; print and write figures."""
    argv = common.serve(argv, work)  # a worker process runs its one variant run in there, and exits
    ns = parse_args(argv)
    preset = PRESETS[ns.preset]
    per_step = ns.batch_size * ns.accum
    # Enough rows that no variant reaches the end of an epoch (plus a batch the loaders collate ahead).
    rows_needed = (max(ns.warmup_steps, ns.compiled_warmup_steps) + ns.steps + 2) * per_step
    with common.workspace("throughput", ns, argv, rows_needed) as (tmp, rows, result):
        from transformers import AutoTokenizer

        from loop.config import load_config
        from loop.model import build_model, count_parameters

        write_csv(tmp / "dev.csv", rows[:4])
        precision = "bf16" if ns.device == "cuda" else "no"
        overrides = [*loop_overrides(preset, tmp / "data.csv", tmp / "dev.csv", tmp / "tokenizer"),
                     f"training.batch_size={ns.batch_size}", f"training.gradient_accumulation_steps={ns.accum}",
                     f"training.learning_rate={LEARNING_RATE}", f"training.warmup_ratio={WARMUP_RATIO}",
                     f"training.weight_decay={WEIGHT_DECAY}", f"training.max_grad_norm={MAX_GRAD_NORM}",
                     f"training.mixed_precision={precision}", f"training.seed={ns.seed}",
                     "training.save_model_as_artifact=false",
                     "evaluation.eval_on_start=false", f"evaluation.eval_steps={10**9}",
                     f"evaluation.save_steps={10**9}", "evaluation.eval_batch_size=4", "evaluation.print_samples=0",
                     "evaluation.rouge_tokenizer=char", "generation.num_beams=1", "generation.max_new_tokens=4"]
        cfg = load_config(None, [*overrides, f"training.max_steps={ns.warmup_steps + ns.steps}"])
        peak = result["device"]["peak_bf16_flops"]
        order = common.rotated(ns.variants, ns.repeats) + ([("profile", 0)] if ns.profile_steps else [])
        result["settings"] = {
            "parameters": count_parameters(build_model(cfg, AutoTokenizer.from_pretrained(cfg.model.tokenizer))),
            "precision": precision, "batch_size": ns.batch_size, "accum": ns.accum, "warmup_steps": ns.warmup_steps,
            "compiled_warmup_steps": ns.compiled_warmup_steps,
            "timed_steps": ns.steps, "repeats": ns.repeats, "learning_rate": LEARNING_RATE, "lr_schedule": "linear",
            "lr_warmup_steps": math.ceil(WARMUP_RATIO * (ns.warmup_steps + ns.steps)), "rows": len(rows),
            "dataloader_workers": 0, "peak_flops": peak,
            "flops_formula": FLOPS_FORMULA + "; useful = real (non-pad) lengths, executed = padded batch shapes",
            **common.isolation_settings(order, ns.child_timeout),
        }
        common.write_job(tmp, ns, overrides=overrides, peak=peak)
        result["variants"], result["runs"] = {}, []
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ns.variants}
        try:
            for name, figures in common.isolated_runs(__file__, tmp, order, ns.child_timeout, result["runs"]):
                if name == "profile":
                    result["breakdown"] = figures
                else:
                    runs[name].append(figures)
                    print(f"{name}: {figures['samples_per_s']:.2f} samples/s (pid {figures['pid']})", flush=True)
                    median = sorted(runs[name], key=lambda r: r["samples_per_s"])[(len(runs[name]) - 1) // 2]
                    result["variants"][name] = {**median, "runs_pids": [r["pid"] for r in runs[name]],
                                                "runs_samples_per_s": [r["samples_per_s"] for r in runs[name]]}
                write_json(ns.json, result)
        except common.WorkerFailed as err:
            return common.fail(result, ns.json, err)
        # In the variants' order, whatever order they ran in.
        result["variants"] = {name: result["variants"][name] for name in ns.variants}
        result["ratios"] = {
            f"{mine}_vs_{name}": {"samples_per_s": ours["samples_per_s"] / v["samples_per_s"],
                                  "real_tokens_per_s": ours["real_tokens_per_s"] / v["real_tokens_per_s"],
                                  "same_batches": ours["batches_fingerprint"] == v["batches_fingerprint"]}
            for mine in ("loop", "loop_compiled") if (ours := result["variants"].get(mine))
            for name, v in result["variants"].items() if name.startswith("trainer") or (
                mine == "loop" and name in ("loop_compiled", "loop_sdpa_default"))}
        return common.finish(result, ns.json, report)


if __name__ == "__main__":
    sys.exit(main())
