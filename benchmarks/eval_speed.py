"""Dev-set evaluation wall time: this loop's `evaluate` against Seq2SeqTrainer.predict, each in a fresh process.

    python benchmarks/eval_speed.py                   # GPU: KoBART shape, bf16, 500 dev rows, beam 4, 64 new tokens
    python benchmarks/eval_speed.py --device cpu      # CPU: a small model, fp32, 96 dev rows
    python benchmarks/eval_speed.py --json out.json

Both sides get the same model weights (built once with the seed, saved, loaded by each side), dev rows (synthetic,
KoBART-like lengths), eval batch size, precision and decoding settings (the loop's [generation] settings, also set
as the Trainer model's generation_config):
- loop: `loop.evaluation.evaluate` (eval loss + generation + decode + ROUGE) on the loop's own dev loader
  (`loop.data.eval_loader`, sorted by length), model and loader prepared by an Accelerator built as in train.py.
- trainer: `Seq2SeqTrainer.predict(predict_with_generate=True)` (eval loss + generation, file order, dynamic
  padding), then the loop's decode and the same `compute_rouge` on its outputs.
- trainer_default_batch: the same at the Trainer's default eval batch (`per_device_eval_batch_size` = 8), as a
  team that never sets it runs it.
- loop_static_cache (with --static-cache): the loop with `generation.cache = "static"` (a fixed-size KV cache; on
  a GPU transformers then compiles the decoding step).
An untrained model rarely emits </s>, so nearly every beam runs to max_new_tokens on both sides: the
generation-bound worst case. ROUGE counts mecab morphemes when python-mecab-ko works, else characters (said so).

Isolation: this process writes the data, tokenizer and weights to a temp dir once; every timed pass of each side
runs in a fresh worker process of this script (benchmarks/common.py, `run_worker`), after one untimed warmup
batch of its own, so neither side reuses the other's CUDA context, kernel choices, allocator pool or imports.
Repeats are interleaved and the order rotates per repeat (repeat r starts with the r-th side); each side's
figures are its median pass. The settings record the run order, and every pass its worker's pid.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.common import (
    PRESETS,
    loop_overrides,
    pick_device,
    synchronize,
    table,
    with_specials,
    write_json,
)

# Per device: preset, dev rows, max new tokens, repeats.
DEFAULTS = {"cuda": ("kobart", 500, 64, 1), "cpu": ("small", 96, 32, 2)}
SIDES = ("loop", "trainer", "trainer_default_batch")
STATIC_SIDE = "loop_static_cache"  # opt-in: --static-cache
TRAINER_DEFAULT_EVAL_BATCH = 8  # Seq2SeqTrainingArguments.per_device_eval_batch_size's default
CHILD_TIMEOUT_S = 1800
WEIGHTS = "weights.pt"  # in the work dir: the model both sides evaluate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments; unset ones take the device's defaults."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: kobart on cuda, small on cpu")
    p.add_argument("--dev-rows", type=int)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--repeats", type=int, help="timed passes per side, interleaved (after one untimed warmup)")
    p.add_argument("--rouge-tokenizer", default="auto", choices=("auto", "mecab", "whitespace", "char"),
                   help="auto = mecab when it works here, else char")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every figure to this file (rewritten after each pass)")
    p.add_argument("--static-cache", action="store_true",
                   help=f"also time the loop with generation.cache = static ({STATIC_SIDE})")
    common.add_isolation_args(p, CHILD_TIMEOUT_S)
    ns = p.parse_args(argv)
    ns.device = pick_device(ns.device)
    preset, rows, new_tokens, repeats = DEFAULTS[ns.device]
    ns.preset = ns.preset or preset
    ns.dev_rows = ns.dev_rows or rows
    ns.max_new_tokens = ns.max_new_tokens or new_tokens
    ns.repeats = ns.repeats or repeats
    return ns


def pick_rouge_tokenizer(requested: str) -> tuple[str, str]:
    """The ROUGE tokenizer to use and a sentence saying why."""
    if requested != "auto":
        return requested, f"{requested} (requested)"
    from loop.rouge import get_tokenizer

    try:
        get_tokenizer("mecab").tokenize("형태소 분석이 되는지 확인합니다")
    except Exception as err:  # no python-mecab-ko, or no dictionary (the GPU machines)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return "char", f"char: mecab is unavailable here ({reason[:120]}), so ROUGE counts characters"
    return "mecab", "mecab morphemes (python-mecab-ko)"


def source_padding(lengths: list[int], batch_size: int) -> float:
    """Real / padded source tokens when these lengths are batched in this order."""
    batches = [lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)]
    return sum(lengths) / sum(len(b) * max(b) for b in batches)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per side the median pass (by total time), the speedup, and how many predictions agree."""
    sides = {}
    for side, side_runs in runs.items():
        median = sorted(side_runs, key=lambda r: r["total_s"])[(len(side_runs) - 1) // 2]
        sides[side] = {k: v for k, v in median.items() if k != "predictions"}
        sides[side]["runs_total_s"] = [r["total_s"] for r in side_runs]
        sides[side]["runs_pids"] = [r["pid"] for r in side_runs]
        sides[side]["samples_per_s"] = len(median["predictions"]) / median["total_s"]
    loop, trainer = runs["loop"][-1]["predictions"], runs["trainer"][-1]["predictions"]
    out = {"sides": sides, "speedup_loop_vs_trainer": sides["trainer"]["total_s"] / sides["loop"]["total_s"],
           "speedup_loop_vs_trainer_default_batch": (sides["trainer_default_batch"]["total_s"]
                                                     / sides["loop"]["total_s"]),
           "identical_predictions": agreement(loop, trainer)}
    if STATIC_SIDE in runs:
        out["speedup_static_vs_dynamic_cache"] = sides["loop"]["total_s"] / sides[STATIC_SIDE]["total_s"]
        out["identical_predictions_static_cache"] = agreement(loop, runs[STATIC_SIDE][-1]["predictions"])
    return out


def agreement(a: list[str], b: list[str]) -> float:
    """The share of rows whose predictions are the same string."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def report(result: dict[str, Any]) -> str:
    """The readable table."""
    dev, s = result["device"], result["settings"]
    loop, tr, td = result["sides"]["loop"], result["sides"]["trainer"], result["sides"]["trainer_default_batch"]
    pad = s["source_padding_efficiency"]
    text = (f"device: {dev['name']} | torch {dev['torch']}, transformers {dev['transformers']}\n"
            f"{s['parameters']:,} parameters, {s['precision']}, {s['dev_rows']} dev rows, "
            f"batch {s['eval_batch_size']}, "
            f"{s['num_beams']} beams, {s['max_new_tokens']} new tokens, ROUGE {s['rouge_note']}; "
            f"median of {s['repeats']} pass(es), each in its own process\n"
            f"run order: {' '.join(s['run_order'])}\n\n")
    text += table([["loop evaluate()", loop["total_s"], loop["loss_generate_decode_s"], loop["rouge_s"],
                    loop["samples_per_s"], pad["loop"], loop["gen_len"], 1.0],
                   ["Trainer.predict + ROUGE", tr["total_s"], tr["predict_s"], tr["rouge_s"] + tr["decode_s"],
                    tr["samples_per_s"], pad["trainer"], tr["gen_len"], result["speedup_loop_vs_trainer"]],
                   [f"Trainer.predict + ROUGE, batch {TRAINER_DEFAULT_EVAL_BATCH}", td["total_s"], td["predict_s"],
                    td["rouge_s"] + td["decode_s"], td["samples_per_s"], pad["trainer_default_batch"], td["gen_len"],
                    result["speedup_loop_vs_trainer_default_batch"]]]
                  + ([["loop evaluate(), static KV cache", st["total_s"], st["loss_generate_decode_s"], st["rouge_s"],
                       st["samples_per_s"], pad["loop"], st["gen_len"], tr["total_s"] / st["total_s"]]]
                     if (st := result["sides"].get(STATIC_SIDE)) else []),
                  ["path", "total s", "loss + generate (+ decode, loop) s", "ROUGE (+ decode, trainer) s",
                   "samples/s", "source padding eff.", "gen len", "trainer time / loop time"])
    text += f"\nidentical predictions: {100 * result['identical_predictions']:.0f}%"
    if "identical_predictions_static_cache" in result:
        text += (f"\nstatic KV cache: {result['speedup_static_vs_dynamic_cache']:.2f}x the dynamic cache's speed, "
                 f"{100 * result['identical_predictions_static_cache']:.0f}% identical predictions")
    return text


def loop_side(ns: argparse.Namespace, cfg: Any, tokenizer: Any, model: Any, tmp: Path,
              rouge_name: str) -> Callable[[bool], dict[str, Any]]:
    """This loop, built as loop/train.py builds it: a pass over one batch (warmup) or all dev rows (timed)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from loop import data, evaluation
    from loop.rouge import compute_rouge

    accelerator = Accelerator(mixed_precision=cfg.training.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
                              step_scheduler_with_optimizer=False)
    dev_file = tmp / "data.csv"
    dev_rows = data.read_examples(dev_file, cfg.data)
    dev_ds = data.tokenize_file(dev_file, cfg.data, tokenizer, cfg.model.max_source_length,
                                cfg.model.max_target_length)
    collate = data.make_collator(tokenizer, model)
    dev_dl = data.eval_loader(dev_ds, ns.eval_batch_size, collate, 0)
    warm_dl = data.eval_loader(dev_ds.select(range(min(ns.eval_batch_size, len(dev_ds)))), ns.eval_batch_size,
                               collate, 0)
    model, dev_dl, warm_dl = accelerator.prepare(model, dev_dl, warm_dl)

    def run(full: bool) -> dict[str, Any]:
        synchronize(ns.device)
        start = time.perf_counter()
        result = evaluation.evaluate(accelerator, model, dev_dl if full else warm_dl, tokenizer, dev_rows, cfg)
        synchronize(ns.device)
        total = time.perf_counter() - start
        start = time.perf_counter()  # ROUGE again on the same predictions, to split the time
        compute_rouge(result.predictions, result.references, tokenizer=rouge_name)
        rouge_s = time.perf_counter() - start
        return {"total_s": total, "rouge_s": rouge_s, "loss_generate_decode_s": total - rouge_s,
                "predictions": result.predictions, "gen_len": result.metrics["gen_len"],
                "rouge_l": result.metrics["rouge_l"], "cache": cfg.generation.cache}

    return run


def trainer_side(ns: argparse.Namespace, cfg: Any, tokenizer: Any, model: Any, tmp: Path,
                 rouge_name: str, batch_size: int) -> Callable[[bool], dict[str, Any]]:
    """Seq2SeqTrainer.predict at `batch_size`, then the loop's decode and ROUGE: a pass over one batch (warmup) or
    all dev rows."""
    import datasets
    import torch
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    from loop import data, evaluation
    from loop.rouge import compute_rouge

    model.generation_config = evaluation.generation_config(model, cfg)
    rows = common.read_rows(tmp)
    src = [with_specials(r["src"]) for r in rows]
    test_ds = datasets.Dataset.from_dict({"input_ids": src, "attention_mask": [[1] * len(s) for s in src],
                                          "labels": [with_specials(r["tgt"]) for r in rows]})
    args = Seq2SeqTrainingArguments(output_dir=str(tmp / "trainer"), per_device_eval_batch_size=batch_size,
                                    predict_with_generate=True, bf16=ns.device == "cuda",
                                    use_cpu=ns.device == "cpu", report_to="none", disable_tqdm=True,
                                    dataloader_num_workers=0, dataloader_pin_memory=ns.device == "cuda")
    trainer = Seq2SeqTrainer(model=model, args=args, processing_class=tokenizer,
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=model,
                                                                  label_pad_token_id=data.LABEL_PAD))
    references = [r["summary"] for r in data.read_examples(tmp / "data.csv", cfg.data)]

    def run(full: bool) -> dict[str, Any]:
        ds = test_ds if full else test_ds.select(range(min(batch_size, len(test_ds))))
        synchronize(ns.device)
        start = time.perf_counter()
        out = trainer.predict(ds, max_new_tokens=ns.max_new_tokens, num_beams=ns.num_beams)
        synchronize(ns.device)
        predict_s = time.perf_counter() - start
        ids = torch.as_tensor(out.predictions)
        ids = ids.masked_fill(ids == data.LABEL_PAD, tokenizer.pad_token_id)
        predictions = evaluation.decode(tokenizer, ids)  # the loop's decode, so both are scored alike
        decode_s = time.perf_counter() - start - predict_s
        rouge = compute_rouge(predictions, references[: len(predictions)], tokenizer=rouge_name)
        total = time.perf_counter() - start
        drop = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
        gen_len = sum(sum(t not in drop for t in row) for row in ids.tolist()) / len(predictions)
        return {"total_s": total, "predict_s": predict_s, "decode_s": decode_s,
                "rouge_s": total - predict_s - decode_s, "predictions": predictions, "gen_len": gen_len,
                "rouge_l": rouge.rouge_l, "batch_size": batch_size}

    return run


def work(side: str, ns: argparse.Namespace, job: dict[str, Any], tmp: Path, repeat: int) -> dict[str, Any]:
    """In a worker process: one side on the parent's weights, an untimed warmup batch, then one timed pass."""
    import torch
    from transformers import AutoTokenizer

    from loop.config import load_config
    from loop.model import build_model

    cfg = load_config(None, job["overrides"])
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    model = build_model(cfg, tokenizer)
    model.load_state_dict(torch.load(tmp / WEIGHTS, map_location="cpu", weights_only=True))
    if side == STATIC_SIDE:
        cfg = load_config(None, [*job["overrides"], "generation.cache=static"])
    if side in ("loop", STATIC_SIDE):
        run = loop_side(ns, cfg, tokenizer, model, tmp, job["rouge_name"])
    else:
        batch = TRAINER_DEFAULT_EVAL_BATCH if side == "trainer_default_batch" else ns.eval_batch_size
        run = trainer_side(ns, cfg, tokenizer, model, tmp, job["rouge_name"], batch)
    print("warmup (one batch, untimed)", flush=True)
    run(False)
    return run(True)


def main(argv: list[str] | None = None) -> int:
    """Write data and weights, time each evaluation path in its own process per pass; print and write figures."""
    argv = common.serve(argv, work)  # a worker process runs its one variant run in there, and exits
    ns = parse_args(argv)
    preset = PRESETS[ns.preset]
    with common.workspace("eval_speed", ns, argv, ns.dev_rows) as (tmp, rows, result):
        import torch
        from accelerate.utils import set_seed
        from transformers import AutoTokenizer

        from loop.config import load_config
        from loop.model import build_model, count_parameters

        rouge_name, rouge_note = pick_rouge_tokenizer(ns.rouge_tokenizer)
        print(f"ROUGE tokenizer: {rouge_note}", flush=True)
        precision = "bf16" if ns.device == "cuda" else "no"
        overrides = [*loop_overrides(preset, tmp / "data.csv", tmp / "data.csv", tmp / "tokenizer"),
                     f"training.mixed_precision={precision}", f"training.seed={ns.seed}",
                     f"evaluation.eval_batch_size={ns.eval_batch_size}", f"evaluation.rouge_tokenizer={rouge_name}",
                     f"generation.num_beams={ns.num_beams}", f"generation.max_new_tokens={ns.max_new_tokens}"]
        cfg = load_config(None, overrides)
        set_seed(ns.seed)
        model = build_model(cfg, AutoTokenizer.from_pretrained(cfg.model.tokenizer))
        torch.save(model.state_dict(), tmp / WEIGHTS)
        lengths = [len(with_specials(r["src"])) for r in rows]
        sides = (*SIDES, STATIC_SIDE) if ns.static_cache else SIDES
        order = common.rotated(sides, ns.repeats)
        result["settings"] = {
            "parameters": count_parameters(model), "precision": precision, "dev_rows": len(rows),
            "eval_batch_size": ns.eval_batch_size, "num_beams": ns.num_beams, "max_new_tokens": ns.max_new_tokens,
            "repeats": ns.repeats, "rouge_tokenizer": rouge_name, "rouge_note": rouge_note,
            "mean_source_tokens": statistics.mean(lengths),
            "source_padding_efficiency": {"loop": source_padding(sorted(lengths, reverse=True), ns.eval_batch_size),
                                          "trainer": source_padding(lengths, ns.eval_batch_size),
                                          "trainer_default_batch": source_padding(lengths,
                                                                                  TRAINER_DEFAULT_EVAL_BATCH)},
            **common.isolation_settings(order, ns.child_timeout),
        }
        del model
        common.write_job(tmp, ns, overrides=overrides, rouge_name=rouge_name)
        result.update(runs=[], complete=False)
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        try:
            for side, figures in common.isolated_runs(__file__, tmp, order, ns.child_timeout, result["runs"]):
                runs[side].append(figures)
                print(f"{side}: {figures['total_s']:.2f} s (pid {figures['pid']})", flush=True)
                if all(runs.values()):
                    result.update(summarize(runs))
                write_json(ns.json, result)
        except common.WorkerFailed as err:
            return common.fail(result, ns.json, err)
        return common.finish(result, ns.json, report)


if __name__ == "__main__":
    sys.exit(main())
