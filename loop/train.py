"""Fine-tune a seq2seq summarizer: `accelerate launch loop/train.py --config configs/base.toml`.

Without --config it trains the embedded demo (synthetic Korean dialogues, a small BART, no downloads).
The loop below reads top to bottom: setup, then one `while` loop with the log/eval/save blocks in the
order they run. Gradient accumulation is explicit (no_sync on all but the last micro-batch) so the loss
can be normalised by the label tokens of the whole accumulated batch across processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`accelerate launch loop/train.py`): make `loop` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loop.config import Config, load_config
from loop.errors import TrainingDiverged, UserError, run_cli

DEMO_HINT = "to try the pipeline first, run: accelerate launch loop/train.py --config configs/demo.toml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="loop/train.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="TOML config (default: the embedded demo)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set training.max_steps=100")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue from the newest complete checkpoint of this config's runs (auto), "
                        "or from a checkpoint or run directory")
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
        raise UserError(f"{out}: already holds a run; continue it with --resume {out}, or choose another "
                        "directory with --set training.output_dir=DIR (or use {time} in it)")
    return out


def check_same_model(cfg: Config, ckpt: Path) -> None:
    """A checkpoint only resumes into the model it was trained with; name the first key that differs."""
    saved_file = ckpt.parent.parent / "config.toml"
    if not saved_file.is_file():
        return
    saved = load_config(saved_file).to_dict()["model"]
    now = cfg.to_dict()["model"]
    keys = ["name_or_path", "from_scratch", "tokenizer"]
    if cfg.model.from_scratch:
        keys += [f"scratch.{k}" for k in now["scratch"]]
    for key in keys:
        old, new = saved, now
        for part in key.split("."):
            old, new = old[part], new[part]
        if old != new:
            raise UserError(f"--resume {ckpt}: the checkpoint was trained with model.{key} = {old!r}, "
                            f"the config says {new!r}; resume with the original model settings")


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
    """AdamW with no weight decay on biases and LayerNorm weights; the fused kernel (CPU and CUDA)."""
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    t = cfg.training
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                             eps=t.adam_epsilon, fused=True)


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate every eval_steps, keep the best model, track in W&B; resume and stop cleanly."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)  # every config check happens here, before anything is written
    check_inputs(cfg)
    resume_from, skipped = None, []
    if args.resume:
        from loop.checkpoints import find_resume_checkpoint

        pattern = cfg.training.output_dir.format(name=cfg.run_name(), time="{time}")
        resume_from, skipped = find_resume_checkpoint(args.resume, pattern)
        if resume_from is not None:
            check_same_model(cfg, resume_from)

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType, broadcast_object_list, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from loop import checkpoints, data, evaluation, faults, speed, tracking
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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise UserError(f"launched {os.environ['WORLD_SIZE']} processes but each runs alone: on a machine "
                        "without GPUs set ACCELERATE_USE_CPU=true (see launch/cpu_2proc.yaml)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and cfg.training.gradient_accumulation_steps > 1:
        raise UserError("training.gradient_accumulation_steps > 1 under DeepSpeed: the DeepSpeed engine steps "
                        "inside backward, which this loop's token-exact accumulation cannot use; set it to 1 "
                        "and raise training.batch_size, or use FSDP")
    for path in skipped:
        accelerator.print(f"warning: skipping incomplete checkpoint {path} (its save was interrupted)")
    if resume_from is not None:
        out_dir = resume_from.parent.parent
    else:
        started = broadcast_object_list([time.strftime("%Y%m%d-%H%M%S")])[0]  # one name for all processes
        out_dir = resolve_output_dir(cfg, started)
    set_seed(cfg.training.seed)

    # ---- data, tokenizer, model -------------------------------------------------------------------------
    d, m, t, ev = cfg.data, cfg.model, cfg.training, cfg.evaluation
    with accelerator.main_process_first():
        if d.synthetic:
            from loop.synthetic import ensure_demo_data

            ensure_demo_data(Path(d.train_file).parent, d.synthetic_train_rows, d.synthetic_dev_rows,
                             d.synthetic_seed)
    train_rows = data.read_examples(d.train_file, d, d.max_train_samples)  # validates every row
    dev_rows = data.read_examples(d.dev_file, d, d.max_dev_samples)
    if accelerator.is_main_process and resume_from is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    with accelerator.main_process_first():
        texts = [r["dialogue"] for r in train_rows] + [r["summary"] for r in train_rows]
        tokenizer = modeling.load_tokenizer(cfg, texts, out_dir / "tokenizer")
        train_ds = data.tokenize_file(d.train_file, d, tokenizer, m.max_source_length, m.max_target_length,
                                      d.max_train_samples)
        dev_ds = data.tokenize_file(d.dev_file, d, tokenizer, m.max_source_length, m.max_target_length,
                                    d.max_dev_samples)
    for ds, name in ((train_ds, d.train_file), (dev_ds, d.dev_file)):
        if warning := data.truncation_report(ds, m.max_source_length, name):
            accelerator.print(f"warning: {warning}")
    model = modeling.build_model(cfg, tokenizer)
    head = evaluation.LabelLogits(model)  # the LM head only at real label tokens: same loss, less work
    collate = data.make_collator(tokenizer, model)
    train_collate = data.make_collator(tokenizer, model, d.source_buckets, d.target_buckets)
    group_size = t.batch_size * t.gradient_accumulation_steps * accelerator.num_processes if d.group_by_length else 0
    train_dl = data.train_loader(train_ds, t.batch_size, train_collate, t.seed, d.num_workers, group_size=group_size)
    dev_dl = data.eval_loader(dev_ds, ev.eval_batch_size, collate, d.num_workers)

    # ---- optimisation: steps are optimizer steps ----------------------------------------------------------
    accum = t.gradient_accumulation_steps
    optimizer = build_optimizer(model, cfg)
    model, optimizer, train_dl, dev_dl = accelerator.prepare(model, optimizer, train_dl, dev_dl)
    allreduce_counter = faults.AllReduceCounter()
    allreduce_counter.attach(model)
    steps_per_epoch = max(len(train_dl) // accum, 1)
    total_steps = t.max_steps or steps_per_epoch * t.num_epochs
    # Not prepared: a prepared scheduler would step once per process per optimizer step.
    scheduler = get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=math.ceil(t.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    accelerator.register_for_checkpointing(scheduler)
    # Fused AdamW skips a non-finite update on the device (no host sync per step); fp16's GradScaler, FSDP's
    # DTensors and DeepSpeed keep the host-side decision.
    skip_on_device = (speed.device_skip_optimizer(optimizer) if accelerator.scaler is None and
                      accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED) else None)
    loss_fn = speed.CompiledLoss(evaluation.token_losses, t.torch_compile, accelerator.print)
    writer = checkpoints.CheckpointWriter(accelerator, ev.keep_last_checkpoints, ev.async_save, accelerator.print)
    shape = speed.seq2seq_shape(accelerator.unwrap_model(model).config)
    peak = speed.peak_flops(accelerator.device, t.peak_tflops) if shape is not None else None

    # Everything a resumed run needs beyond accelerator.save_state (model, optimizer, scheduler, scaler, RNG).
    state = {"step": 0, "best_metric": None, "best_step": None, "best_metrics": {}, "last_eval": {},
             "history": {"train_loss": [], "eval_loss": []}, "nonfinite_total": 0, "nonfinite_run": 0,
             "window": {"loss": 0.0, "tokens": 0.0, "real_tokens": 0.0, "flops": 0.0, "samples": 0},
             "wandb_run_id": None, "time": {"loop": 0.0, "eval": 0.0, "checkpoint": 0.0, "tracking": 0.0}}
    if resume_from is not None:
        try:
            accelerator.load_state(str(resume_from))
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0]
            raise UserError(f"--resume {resume_from}: the checkpoint does not fit this model ({first})") from None
        state.update(checkpoints.read_trainer_state(resume_from))
        accelerator.print(f"resumed from {resume_from} at step {state['step']}")

    mode = tracking.init_tracking(accelerator, cfg, out_dir, mode, run_id=state["wandb_run_id"])
    run = tracking.wandb_run(accelerator)
    if run is not None and cfg.wandb.log_dataset and resume_from is None:
        tracking.log_dataset_artifact(run, cfg, [Path(d.train_file), Path(d.dev_file)])
    accelerator.print(
        f"run {cfg.run_name()} -> {out_dir}\n"
        f"  {len(train_rows)} train / {len(dev_rows)} dev rows, {modeling.count_parameters(model):,} parameters, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, precision {precision}\n"
        f"  {total_steps} optimizer steps of {t.batch_size} x {accum} x {accelerator.num_processes} samples; "
        f"eval every {ev.eval_steps}, save every {ev.save_steps}, log every {ev.logging_steps}")

    def micro_batches(consumed: int):
        """Training batches forever from position `consumed`, each epoch in its own seeded order."""
        epoch, skip = divmod(consumed, len(train_dl))
        while True:
            train_dl.set_epoch(epoch)
            loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
            for i, batch in enumerate(loader, start=skip):
                yield epoch + (i + 1) / len(train_dl), batch
            epoch, skip = epoch + 1, 0

    best_dir = out_dir / "best"
    better = (lambda a, b: a > b) if ev.greater_is_better else (lambda a, b: a < b)
    result = None

    @contextlib.contextmanager
    def timed(part: str):
        """Add the block's wall time to state["time"][part] (evaluation, checkpoints, tracking)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            state["time"][part] += time.perf_counter() - start

    def run_eval(step: int):
        """Evaluate, log, and export + upload the model when the configured metric improves."""
        with timed("eval"):
            result = evaluation.evaluate(accelerator, model, dev_dl, tokenizer, dev_rows, cfg, head)
        state["last_eval"] = result.metrics
        state["history"]["eval_loss"].append((step, result.metrics["loss"]))
        with timed("tracking"):
            tracking.log(accelerator, {f"eval/{k}": v for k, v in result.metrics.items()}, step=step)
            if run is not None and cfg.wandb.table_rows:
                rows = [{"fname": dev_rows[i]["id"], "dialogue": dev_rows[i]["dialogue"], "reference": ref,
                         "prediction": pred, "rouge_l": r} for i, ref, pred, r in
                        zip(result.indices, result.references, result.predictions, result.per_sample_rouge_l,
                            strict=True)]
                tracking.log_samples_table(run, step, rows[: cfg.wandb.table_rows])
        if accelerator.is_main_process:  # for tools that follow a run while it trains (sweeps, reports)
            with timed("eval"):
                with open(out_dir / "eval_metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": step, **result.metrics}) + "\n")
                evaluation.write_predictions(out_dir / "predictions" / f"step_{step}.csv", result, dev_rows)
            shown = ", ".join(f"{k} {result.metrics[k]:.4f}" for k in ("loss", "rouge_1", "rouge_2", "rouge_l"))
            progress.write(f"step {step}: eval {shown}")
        value = result.metrics[ev.metric_for_best_model]
        if state["best_metric"] is None or better(value, state["best_metric"]):
            state.update(best_metric=value, best_step=step, best_metrics=dict(result.metrics))
            metrics = {"step": step, "rouge_tokenizer": ev.rouge_tokenizer, **result.metrics}
            with timed("checkpoint"):
                checkpoints.export_best(accelerator, model, tokenizer,
                                        evaluation.generation_config(accelerator.unwrap_model(model), cfg),
                                        metrics, best_dir)
            if run is not None and t.save_model_as_artifact:
                with timed("tracking"):
                    snapshot = checkpoints.link_snapshot(best_dir, out_dir / "artifacts" / f"best-step_{step}")
                    tracking.log_model_artifact(run, cfg, snapshot, step, metrics)
        return result

    def save(step: int) -> None:
        """Full resumable state into checkpoints/step_N (atomic), rotating old ones."""
        state["wandb_run_id"] = run.id if run is not None else state["wandb_run_id"]
        state["window"] = {k: (v.item() if torch.is_tensor(v) else v) for k, v in window.items() if k != "start"}
        state["time"]["loop"] = loop_time()
        with timed("checkpoint"):  # the in-memory snapshot; the files are written in the background
            writer.save(out_dir / "checkpoints" / f"step_{step}", state)

    def settle(pending: tuple) -> float:
        """Host bookkeeping of an optimizer step, done late (next step, or before logging/eval/save) so the host
        never waits for the device mid-step: advance the LR schedule after a finite update, count non-finite
        steps and stop after too many in a row. Returns the step's gradient norm."""
        done_step, norm, step_loss, skipped = pending
        grad_norm = float(norm.value())
        finite = math.isfinite(grad_norm)
        if finite and not skipped:
            scheduler.step()
        # fp16 overflow with a finite loss is the scaler's business; a non-finite loss is divergence.
        if finite or bool(torch.isfinite(accelerator.reduce(step_loss, "sum"))):
            state["nonfinite_run"] = 0
            return grad_norm
        state["nonfinite_total"] += 1
        state["nonfinite_run"] += 1
        tracking.log(accelerator, {"train/nonfinite_steps": state["nonfinite_total"]}, step=done_step)
        if accelerator.is_main_process:
            progress.write(f"step {done_step}: non-finite loss or gradient, update skipped "
                           f"({state['nonfinite_run']} in a row)")
        if state["nonfinite_run"] >= t.max_nonfinite_steps:
            writer.wait()
            last = checkpoints.list_checkpoints(out_dir / "checkpoints")
            progress.close()
            accelerator.end_training()
            tracking.teardown(accelerator, run)
            raise TrainingDiverged(
                f"training stopped at step {done_step}: {state['nonfinite_run']} consecutive non-finite steps "
                f"(training.max_nonfinite_steps = {t.max_nonfinite_steps}); last good checkpoint: "
                f"{last[-1] if last else 'none'}; lower the learning rate or check the data")
        return grad_norm

    def forward_backward(group: list, global_tokens: torch.Tensor) -> torch.Tensor:
        """Forward and backward over the accumulated micro-batches; the summed loss of the step."""
        step_loss = torch.zeros((), device=device)
        for i, (_, batch) in enumerate(group):
            stop.on_micro_step(step * accum + i + 1)
            with contextlib.nullcontext() if i == accum - 1 else accelerator.no_sync(model):
                loss_sum = loss_fn(model, batch, None if loss_fn.active else head)[0].sum()
                if step + 1 in poisoned:
                    loss_sum = loss_sum * float("nan")
                # DDP averages gradients over processes: scale up so the result is the global token mean.
                accelerator.backward(loss_sum * accelerator.num_processes / global_tokens)
            step_loss += loss_sum.detach()
        return step_loss

    # ---- the loop ---------------------------------------------------------------------------------------
    step = state["step"]
    batches = micro_batches(step * accum)
    stop = faults.StopRequest()
    stop.install()
    poisoned = faults.nan_steps()
    # A bar on a terminal; in a log file (no TTY) plain lines at each logging step instead of a redrawn bar.
    progress = tqdm(total=total_steps, initial=step, disable=None if accelerator.is_main_process else True,
                    desc="training", unit="step", dynamic_ncols=True)
    loop_start, loop_before = time.perf_counter(), state["time"]["loop"]

    def loop_time() -> float:
        """Wall time inside the loop over all launches of this run."""
        return loop_before + time.perf_counter() - loop_start

    if ev.eval_on_start and step == 0:
        result = run_eval(0)
    device = accelerator.device
    window = {key: torch.tensor(float(state["window"].get(key, 0.0)), device=device)
              for key in ("loss", "tokens", "real_tokens", "flops")}
    window.update(samples=state["window"]["samples"], start=time.perf_counter())
    pending, grad_norm, stop_votes = None, 0.0, None
    stop_flag = torch.zeros((), dtype=torch.long, device=device)
    model.train()
    while step < total_steps:
        group = [next(batches) for _ in range(accum)]
        epoch = group[-1][0]
        # Normalise by the label tokens of the whole accumulated batch on all processes, so that
        # batch 16 x accumulation 1 and batch 8 x accumulation 2 give the same update. With several processes
        # the same all-reduce carries the stop votes (read at the end of the step, without a host sync).
        local_tokens = sum((b["labels"] != data.LABEL_PAD).sum() for _, b in group)
        if accelerator.num_processes > 1:
            vote = stop_flag.fill_(int(stop.requested))  # fill_: a kernel, where torch.tensor(x, device) would sync
            counts = accelerator.reduce(torch.stack([local_tokens, vote]), reduction="sum")
            global_tokens, stop_votes = counts[0].clamp(min=1), speed.HostCopy(counts[1])
        else:
            global_tokens = local_tokens.clamp(min=1)
        try:
            step_loss = forward_backward(group, global_tokens)
        except Exception as err:  # a compiler that fails on this model/machine: say so once, continue eager
            if loss_fn.proven:
                raise
            loss_fn.fall_back(err)
            optimizer.zero_grad(set_to_none=True)
            step_loss = forward_backward(group, global_tokens)
        loss_fn.proven = True
        for _, batch in group:
            window["samples"] += batch["input_ids"].shape[0]
            src, tgt = batch["attention_mask"].sum(1), (batch["labels"] != data.LABEL_PAD).sum(1)
            window["real_tokens"] += src.sum() + tgt.sum()
            if peak is not None:
                window["flops"] += speed.train_flops(shape, src.double(), tgt.double()).sum()
        norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or float("inf"))
        # A (D)Tensor on DDP/FSDP, a float or None under DeepSpeed; all ranks see the same value.
        norm = torch.as_tensor(0.0 if norm is None else norm, device=device, dtype=torch.float32)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a replicated DTensor
        finite = torch.isfinite(norm)
        if pending is not None:  # the previous step's schedule update, before this step's optimizer step
            grad_norm, pending = settle(pending), None
        if skip_on_device is not None:
            with speed.found_inf(skip_on_device, finite):
                optimizer.step()
        elif math.isfinite(float(norm)) or accelerator.scaler is not None:  # host sync
            optimizer.step()  # under fp16 the GradScaler skips a non-finite update itself and lowers its scale
        window["loss"] += torch.where(finite, step_loss, 0.0)
        window["tokens"] += torch.where(finite, local_tokens, 0)
        optimizer.zero_grad(set_to_none=True)
        pending = (step + 1, speed.HostCopy(norm), step_loss, accelerator.optimizer_step_was_skipped)
        step += 1
        state["step"] = step
        progress.update(1)

        stopping = stop.requested if stop_votes is None else bool(stop_votes.value() > 0)
        logging = step % ev.logging_steps == 0 or step == total_steps
        evaluating = step % ev.eval_steps == 0 or step == total_steps
        saved = step % ev.save_steps == 0 or step == total_steps
        if logging or evaluating or saved or stopping:  # the host needs this step's outcome now
            grad_norm, pending = settle(pending), None
        if logging:
            loss = accelerator.reduce(window["loss"], "sum") / accelerator.reduce(window["tokens"], "sum").clamp(min=1)
            samples = window["samples"] * accelerator.num_processes
            real_tokens = accelerator.reduce(window["real_tokens"], "sum").item()
            elapsed = time.perf_counter() - window["start"]  # after .item(): the window's queued work is done
            logs = {"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": grad_norm, "train/epoch": epoch,
                    "train/samples_per_s": samples / elapsed, "train/tokens_per_s": real_tokens / elapsed}
            if peak is not None:  # useful-token model FLOPs utilisation (padding does not count)
                logs["train/mfu"] = accelerator.reduce(window["flops"], "sum").item() / elapsed / (
                    peak * accelerator.num_processes)
            with timed("tracking"):
                tracking.log(accelerator, logs, step=step)
            state["history"]["train_loss"].append((step, logs["train/loss"]))
            progress.set_postfix(loss=f"{logs['train/loss']:.3f}", lr=f"{logs['train/lr']:.2e}")
            if progress.disable and accelerator.is_main_process:
                progress.write(f"step {step}/{total_steps}: loss {logs['train/loss']:.4f}, lr {logs['train/lr']:.2e}, "
                               f"{logs['train/samples_per_s']:.1f} samples/s")
            for key in ("loss", "tokens", "real_tokens", "flops"):
                window[key].zero_()
            window.update(samples=0, start=time.perf_counter())
        paused = time.perf_counter()
        if evaluating:
            result = run_eval(step)
        if saved:
            save(step)
        window["start"] += time.perf_counter() - paused  # throughput counts training time only
        if stopping:
            if not saved:
                save(step)
            writer.wait()
            progress.close()
            accelerator.print(f"\nstopped by {stop.signal_name or 'a signal on another process'} at step {step}; "
                              f"checkpoint saved in {out_dir / 'checkpoints' / f'step_{step}'}\n"
                              f"resume with: {resume_command(args)}")
            accelerator.end_training()
            tracking.teardown(accelerator, run)
            return 0
    progress.close()
    with timed("checkpoint"):
        writer.wait()
    state["time"]["loop"] = loop_time()
    allreduce_counter.write(step)

    # ---- the end: final metrics, charts, and where everything is ----------------------------------------
    best = {"metric": state["best_metric"], "step": state["best_step"], "metrics": state["best_metrics"]}
    tracking.log(accelerator, {f"final/{k}": v for k, v in state["last_eval"].items()}, step=step)
    times = time_report(state["time"])
    if run is not None:
        run.summary[f"best/{ev.metric_for_best_model}"] = best["metric"]
        run.summary["best/step"] = best["step"]
        for key, seconds in times["seconds"].items():
            run.summary[f"time/{key}_s"] = seconds
            run.summary[f"time/{key}_share"] = times["share"].get(key)
        tracking.log_final_charts(run, step, state["history"]["train_loss"], state["history"]["eval_loss"],
                                  best["metrics"])
    if accelerator.is_main_process:
        (out_dir / "final_metrics.json").write_text(json.dumps({
            "step": step, "final": state["last_eval"], "best_step": best["step"], "best": best["metrics"],
            "metric_for_best_model": ev.metric_for_best_model, "time": times}, indent=2) + "\n", encoding="utf-8")
        for i in range(min(ev.print_samples, len(result.predictions) if result else 0)):
            accelerator.print(f"\nsample {i + 1} ({dev_rows[result.indices[i]]['id']})\n"
                              f"  reference:  {result.references[i]}\n  prediction: {result.predictions[i]}")
    accelerator.print(f"\ntime in the loop {times['seconds']['loop']:.1f} s: " + ", ".join(
        f"{key} {100 * share:.1f}%" for key, share in times["share"].items()))
    accelerator.print(
        f"done: best eval/{ev.metric_for_best_model} = {best['metric']:.4f} at step {best['step']} "
        f"(ROUGE-L {best['metrics'].get('rouge_l', float('nan')):.4f}, tokenizer {ev.rouge_tokenizer}); "
        f"best model: {best_dir}; {tracking.run_location(run, mode)}")
    accelerator.end_training()
    tracking.teardown(accelerator, run)
    return 0


def time_report(parts: dict[str, float]) -> dict[str, dict[str, float]]:
    """Seconds in the loop (all launches of the run) split into training, evaluation, checkpoints and tracking."""
    seconds = {"loop": parts["loop"], "training": max(parts["loop"] - parts["eval"] - parts["checkpoint"]
                                                      - parts["tracking"], 0.0),
               "evaluation": parts["eval"], "checkpoints": parts["checkpoint"], "tracking": parts["tracking"]}
    share = {k: v / seconds["loop"] for k, v in seconds.items() if k != "loop"} if seconds["loop"] > 0 else {}
    return {"seconds": seconds, "share": share}


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run."""
    parts = ["accelerate", "launch", "loop/train.py"]
    if args.config:
        parts += ["--config", args.config]
    for item in args.set:
        parts += ["--set", item]
    return shlex.join([*parts, "--resume", "auto"])


if __name__ == "__main__":
    sys.exit(run_cli(main))
