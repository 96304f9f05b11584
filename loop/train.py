"""Fine-tune a seq2seq summarizer: `accelerate launch loop/train.py --config configs/base.toml`.

Without --config it trains the embedded demo (synthetic Korean dialogues, a small BART, no downloads).
The loop below reads top to bottom: setup, then one `while` loop with the eval/save/log blocks in the
order they run. Gradient accumulation is explicit (no_sync on all but the last micro-batch) so the loss
can be normalised by the label tokens of the whole accumulated batch across processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`accelerate launch loop/train.py`): make `loop` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loop.config import Config, load_config
from loop.errors import UserError, run_cli

DEMO_HINT = "to try the pipeline first, run: accelerate launch loop/train.py --config configs/demo.toml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="loop/train.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="TOML config (default: the embedded demo)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set training.max_steps=100")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p.parse_args(argv)


def check_inputs(cfg: Config) -> None:
    """Fail before anything is written when a data file is missing."""
    if cfg.data.synthetic:
        return
    for key in ("train_file", "dev_file"):
        path = Path(getattr(cfg.data, key))
        if not path.is_file():
            raise UserError(f"{path}: data file not found (data.{key}); put your CSV there with columns "
                            f"{cfg.data.id_column},{cfg.data.dialogue_column},{cfg.data.summary_column} "
                            f"or set --set data.{key}=PATH; {DEMO_HINT}")


def resolve_output_dir(cfg: Config, started: str) -> Path:
    """The run directory from the output_dir template; an existing run there is an error."""
    out = Path(cfg.training.output_dir.format(name=cfg.run_name(), time=started))
    if (out / "config.toml").exists():
        raise UserError(f"{out}: already holds a run; choose another with --set training.output_dir=DIR "
                        "(or use {time} in it)")
    return out


def quiet_libraries() -> None:
    """Keep the console to the loop's own progress bar and messages."""
    import logging

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # BART ties its embeddings: accelerate's notice that it saved the shared tensor once is expected.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


def build_optimizer(model, cfg: Config):
    """AdamW with no weight decay on biases and LayerNorm weights; fused where the device supports it."""
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    t = cfg.training
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                             eps=t.adam_epsilon, fused=fused)


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate every eval_steps, keep the best model, track in W&B."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)  # every config check happens here, before anything is written
    check_inputs(cfg)

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from loop import checkpoints, data, evaluation, tracking
    from loop import model as modeling

    quiet_libraries()

    mode = tracking.resolve_mode(cfg.wandb.mode)
    precision = cfg.training.mixed_precision
    if precision == "auto":
        precision = "fp16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(
        mixed_precision=precision,
        log_with=None if mode == "disabled" else "wandb",
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        step_scheduler_with_optimizer=False,
    )
    started = broadcast_object_list([time.strftime("%Y%m%d-%H%M%S")])[0]  # one name for all processes
    out_dir = resolve_output_dir(cfg, started)
    set_seed(cfg.training.seed)

    # ---- data, tokenizer, model -------------------------------------------------------------------------
    d = cfg.data
    with accelerator.main_process_first():
        if d.synthetic:
            from loop.synthetic import ensure_demo_data

            ensure_demo_data(Path(d.train_file).parent, d.synthetic_train_rows, d.synthetic_dev_rows,
                             d.synthetic_seed)
    train_rows = data.read_examples(d.train_file, d, d.max_train_samples)  # validates every row
    dev_rows = data.read_examples(d.dev_file, d, d.max_dev_samples)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    with accelerator.main_process_first():
        texts = [r["dialogue"] for r in train_rows] + [r["summary"] for r in train_rows]
        tokenizer = modeling.load_tokenizer(cfg, texts, out_dir / "tokenizer")
        m = cfg.model
        train_ds = data.tokenize_file(d.train_file, d, tokenizer, m.max_source_length, m.max_target_length,
                                      d.max_train_samples)
        dev_ds = data.tokenize_file(d.dev_file, d, tokenizer, m.max_source_length, m.max_target_length,
                                    d.max_dev_samples)
    for ds, name in ((train_ds, d.train_file), (dev_ds, d.dev_file)):
        if warning := data.truncation_report(ds, m.max_source_length, name):
            accelerator.print(f"warning: {warning}")
    model = modeling.build_model(cfg, tokenizer)
    collate = data.make_collator(tokenizer, model)
    train_dl = data.train_loader(train_ds, cfg.training.batch_size, collate, cfg.training.seed, d.num_workers)
    dev_dl = data.eval_loader(dev_ds, cfg.evaluation.eval_batch_size, collate, d.num_workers)

    # ---- optimisation: steps are optimizer steps ----------------------------------------------------------
    t, ev = cfg.training, cfg.evaluation
    accum = t.gradient_accumulation_steps
    optimizer = build_optimizer(model, cfg)
    model, optimizer, train_dl, dev_dl = accelerator.prepare(model, optimizer, train_dl, dev_dl)
    steps_per_epoch = max(len(train_dl) // accum, 1)
    total_steps = t.max_steps or steps_per_epoch * t.num_epochs
    # Not prepared: a prepared scheduler would step once per process per optimizer step.
    scheduler = get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=math.ceil(t.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    accelerator.register_for_checkpointing(scheduler)

    tracking.init_tracking(accelerator, cfg, out_dir, mode)
    run = tracking.wandb_run(accelerator)
    if run is not None and cfg.wandb.log_dataset:
        tracking.log_dataset_artifact(run, cfg, [Path(d.train_file), Path(d.dev_file)])
    accelerator.print(
        f"run {cfg.run_name()} -> {out_dir}\n"
        f"  {len(train_rows)} train / {len(dev_rows)} dev rows, {modeling.count_parameters(model):,} parameters, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, precision {precision}\n"
        f"  {total_steps} optimizer steps of {t.batch_size} x {accum} x {accelerator.num_processes} samples; "
        f"eval every {ev.eval_steps}, save every {ev.save_steps}, log every {ev.logging_steps}")

    def micro_batches():
        """Training batches forever, epoch after epoch, each epoch in its own seeded order."""
        epoch = 0
        while True:
            train_dl.set_epoch(epoch)
            for i, batch in enumerate(train_dl):
                yield epoch + i / len(train_dl), batch
            epoch += 1

    best_dir = out_dir / "best"
    better = (lambda a, b: a > b) if ev.greater_is_better else (lambda a, b: a < b)
    best = {"metric": None, "step": None, "metrics": {}}
    history = {"train_loss": [], "eval_loss": []}
    last_eval: dict[str, float] = {}

    def run_eval(step: int) -> None:
        """Evaluate, log, and export + upload the model when the configured metric improves."""
        nonlocal last_eval
        result = evaluation.evaluate(accelerator, model, dev_dl, tokenizer, dev_rows, cfg)
        last_eval = result.metrics
        accelerator.log({f"eval/{k}": v for k, v in result.metrics.items()}, step=step)
        history["eval_loss"].append((step, result.metrics["loss"]))
        if run is not None and cfg.wandb.table_rows:
            rows = [{"fname": dev_rows[i]["id"], "dialogue": dev_rows[i]["dialogue"], "reference": ref,
                     "prediction": pred, "rouge_l": r} for i, ref, pred, r in
                    zip(result.indices, result.references, result.predictions, result.per_sample_rouge_l,
                        strict=True)]
            tracking.log_samples_table(run, step, rows[: cfg.wandb.table_rows])
        value = result.metrics[ev.metric_for_best_model]
        shown = ", ".join(f"{k} {result.metrics[k]:.4f}" for k in ("loss", "rouge_1", "rouge_2", "rouge_l"))
        if accelerator.is_main_process:
            progress.write(f"step {step}: eval {shown}")
        if best["metric"] is None or better(value, best["metric"]):
            best.update(metric=value, step=step, metrics=dict(result.metrics))
            metrics = {"step": step, "rouge_tokenizer": ev.rouge_tokenizer, **result.metrics}
            checkpoints.export_best(accelerator, model, tokenizer,
                                    evaluation.generation_config(accelerator.unwrap_model(model), cfg),
                                    metrics, best_dir)
            if run is not None and t.save_model_as_artifact:
                snapshot = checkpoints.link_snapshot(best_dir, out_dir / "artifacts" / f"best-step_{step}")
                tracking.log_model_artifact(run, cfg, snapshot, step, metrics)
        return result

    def save(step: int, epoch: float) -> None:
        state = {"step": step, "epoch": epoch, "best_metric": best["metric"], "best_step": best["step"],
                 "wandb_run_id": run.id if run is not None else None}
        checkpoints.save_training_state(accelerator, out_dir / "checkpoints" / f"step_{step}", state,
                                        ev.keep_last_checkpoints)

    # ---- the loop ---------------------------------------------------------------------------------------
    step, epoch = 0, 0.0
    batches = micro_batches()
    progress = tqdm(total=total_steps, disable=not accelerator.is_main_process, desc="training", unit="step")
    if ev.eval_on_start:
        run_eval(0)
    window = {"loss": torch.zeros((), device=accelerator.device), "tokens": torch.zeros((), device=accelerator.device),
              "samples": 0, "real_tokens": torch.zeros((), device=accelerator.device), "start": time.perf_counter()}
    model.train()
    result = None
    while step < total_steps:
        group = [next(batches) for _ in range(accum)]
        epoch = group[-1][0]
        # Normalise by the label tokens of the whole accumulated batch on all processes, so that
        # batch 16 x accumulation 1 and batch 8 x accumulation 2 give the same update.
        local_tokens = sum((b["labels"] != data.LABEL_PAD).sum() for _, b in group)
        global_tokens = accelerator.reduce(local_tokens.clone(), reduction="sum").clamp(min=1)
        for i, (_, batch) in enumerate(group):
            sync = i == accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                loss_sum, _ = evaluation.token_loss_sum(model, batch)
                # DDP averages gradients over processes: scale up so the result is the global token mean.
                accelerator.backward(loss_sum * accelerator.num_processes / global_tokens)
            window["loss"] += loss_sum.detach()
            window["samples"] += batch["input_ids"].shape[0]
            window["real_tokens"] += batch["attention_mask"].sum() + (batch["labels"] != data.LABEL_PAD).sum()
        window["tokens"] += local_tokens
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or float("inf"))
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule in place
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.update(1)

        if step % ev.logging_steps == 0 or step == total_steps:
            elapsed = time.perf_counter() - window["start"]
            loss = accelerator.reduce(window["loss"], "sum") / accelerator.reduce(window["tokens"], "sum").clamp(min=1)
            samples = window["samples"] * accelerator.num_processes
            real_tokens = accelerator.reduce(window["real_tokens"], "sum").item()
            logs = {"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": float(grad_norm), "train/epoch": epoch,
                    "train/samples_per_s": samples / elapsed, "train/tokens_per_s": real_tokens / elapsed}
            accelerator.log(logs, step=step)
            history["train_loss"].append((step, logs["train/loss"]))
            progress.set_postfix(loss=f"{logs['train/loss']:.3f}", lr=f"{logs['train/lr']:.2e}")
            for key in ("loss", "tokens", "real_tokens"):
                window[key].zero_()
            window.update(samples=0, start=time.perf_counter())
        if step % ev.eval_steps == 0 or step == total_steps:
            result = run_eval(step)
        if step % ev.save_steps == 0 or step == total_steps:
            save(step, epoch)
    progress.close()

    # ---- the end: final metrics, charts, and where everything is ----------------------------------------
    accelerator.log({f"final/{k}": v for k, v in last_eval.items()}, step=step)
    if run is not None:
        run.summary[f"best/{ev.metric_for_best_model}"] = best["metric"]
        run.summary["best/step"] = best["step"]
        tracking.log_final_charts(run, step, history["train_loss"], history["eval_loss"], best["metrics"])
    if accelerator.is_main_process:
        (out_dir / "final_metrics.json").write_text(json.dumps({
            "step": step, "final": last_eval, "best_step": best["step"], "best": best["metrics"],
            "metric_for_best_model": ev.metric_for_best_model}, indent=2) + "\n", encoding="utf-8")
        for i in range(min(ev.print_samples, len(result.predictions) if result else 0)):
            accelerator.print(f"\nsample {i + 1} ({dev_rows[result.indices[i]]['id']})\n"
                              f"  reference:  {result.references[i]}\n  prediction: {result.predictions[i]}")
    location = tracking.run_location(run, mode)
    accelerator.print(
        f"\ndone: best eval/{ev.metric_for_best_model} = {best['metric']:.4f} at step {best['step']} "
        f"(ROUGE-L {best['metrics'].get('rouge_l', float('nan')):.4f}, tokenizer {ev.rouge_tokenizer}); "
        f"best model: {best_dir}; {location}")
    accelerator.end_training()
    if accelerator.is_main_process and run is not None:
        import wandb

        wandb.teardown()  # flush the offline run file before the process exits
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
