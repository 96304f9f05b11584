"""Fine-tune a seq2seq summarizer: `accelerate launch loop/train.py --config configs/base.toml`.

Without --config it trains the embedded demo (synthetic Korean dialogues, a small BART, no downloads).
`main` is the table of contents: parse and validate, set up, train, finish. `train` is the loop: one `while`
whose blocks run in order: take the micro-batches of a step, run the step (loop/step.py), then log, evaluate
and keep the best, save, and stop, each when due. The run state is a `TrainState` (loop/state.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a script (`accelerate launch loop/train.py`): make `loop` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loop.config import Config, load_config
from loop.errors import ArgumentParser, TrainingDiverged, UserError, run_cli
from loop.signals import StopRequest
from loop.state import TrainState

if TYPE_CHECKING:
    from loop.evaluation import EvalResult
    from loop.step import Settled
    from loop.window import LogWindow

DEMO_HINT = "to try the pipeline first, run: accelerate launch loop/train.py --config configs/demo.toml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    p = ArgumentParser(prog="loop/train.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="TOML config (default: the embedded demo)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set training.max_steps=100")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue from the newest complete checkpoint of this config's runs (auto), "
                        "or from a checkpoint or run directory")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate every eval_steps, keep the best model, track in W&B; resume and stop cleanly."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)  # every config check happens here, before anything is written
    check_inputs(cfg)
    resume_from, notes = find_resume(args.resume, cfg)

    run, state = setup(cfg, args, resume_from, notes)
    stop = StopRequest()
    stop.install()
    try:
        outcome = train(run, state, stop)
    except TrainingDiverged:
        close(run)
        raise
    if outcome.stopped_by is not None:
        step = state.step
        run.accelerator.print(f"\nstopped by {outcome.stopped_by} at step {step}; checkpoint saved in "
                              f"{run.out_dir / 'checkpoints' / f'step_{step}'}\nresume with: {resume_command(args)}")
    else:
        finish(run, state, outcome)
    close(run)
    return 0


# ---- before anything is written -----------------------------------------------------------------------------

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


def find_resume(spec: str | None, cfg: Config) -> tuple[Path | None, list[str]]:
    """The checkpoint `--resume` names (None: start fresh), checked against the config; lines to print first."""
    from loop import resume, rundir
    from loop.checkpoints import find_resume_checkpoint, read_trainer_state

    out = rundir.output_path(cfg, time.strftime("%Y%m%d-%H%M%S"))
    if spec is not None and not spec.strip():
        raise UserError("--resume needs `auto` or the path of a checkpoint or run directory")
    if not spec:
        rundir.check_output_dir(out, fresh=True)
        return None, []
    pattern = rundir.output_pattern(cfg)
    resume_from, skipped = find_resume_checkpoint(spec, pattern)
    notes = [f"warning: skipping incomplete checkpoint {path} ({why})" if path.name.endswith(".tmp")
             else f"warning: skipping damaged checkpoint {path}: {why}" for path, why in skipped]
    if resume_from is None:
        rundir.check_output_dir(out, fresh=True)
        return None, [*notes, *filter(None, [resume.renamed_run_note(cfg, pattern)])]
    rundir.check_output_dir(resume_from.parent.parent, fresh=False)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    saved_processes = read_trainer_state(resume_from)["num_processes"]
    return resume_from, [*notes, *resume.check_resume(cfg, resume_from, saved_processes, processes)]


# ---- setup: every component, built from the config ----------------------------------------------------------

@dataclass
class Run:
    """The parts of a training run, built once by `setup`."""

    cfg: Config
    args: argparse.Namespace
    accelerator: Any
    out_dir: Path
    tokenizer: Any
    dev_rows: list[dict[str, str]]
    model: Any  # prepared (wrapped for DDP/FSDP)
    head: Any  # loop.loss.LabelLogits: the LM head at label tokens only
    train_dl: Any
    dev_dl: Any
    scheduler: Any
    stepper: Any  # loop.step.Stepper
    writer: Any  # loop.checkpoints.CheckpointWriter
    tracker: Any  # the W&B run on the main process, else None
    mode: str  # W&B mode in use
    total_steps: int
    accum: int
    flops_shape: dict[str, int] | None
    peak_flops: float | None
    faults: Any  # loop.faults.Faults (test injections; inert unless asked for)
    progress: Any
    lock: Any  # loop.rundir.RunLock on the main process: held until the process exits
    lora: dict[str, Any] | None = None  # the adapter's settings and base fingerprint (model.lora), else None


def setup(cfg: Config, args: argparse.Namespace, resume_from: Path | None,
          notes: list[str]) -> tuple[Run, TrainState]:
    """Accelerator, data, tokenizer, model, optimizer, schedule and run state, all built before the run directory
    is claimed and written to (so a launch that cannot start writes nothing); then tracking."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType, broadcast_object_list, set_seed

    from loop import attention, checkpoints, data, device, faults, flops, lora, rundir, tracking
    from loop import model as modeling
    from loop.compiled import CompiledLoss, graph_break_note
    from loop.console import progress_bar, quiet_libraries
    from loop.loss import LabelLogits, token_losses
    from loop.optim import build_optimizer, build_scheduler
    from loop.step import Stepper

    quiet_libraries()
    mode = tracking.resolve_mode(cfg.wandb.mode)
    d, t, ev = cfg.data, cfg.training, cfg.evaluation
    precision = device.resolve_precision(t.mixed_precision, torch.cuda.is_available())
    accelerator = Accelerator(
        mixed_precision=precision,
        log_with=None if mode == "disabled" else "wandb",
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        step_scheduler_with_optimizer=False,
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise UserError(f"launched {os.environ['WORLD_SIZE']} processes but each runs alone: on a machine "
                        "without GPUs set ACCELERATE_USE_CPU=true (see launch/cpu_2proc.yaml)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and t.gradient_accumulation_steps > 1:
        raise UserError("training.gradient_accumulation_steps > 1 under DeepSpeed: the DeepSpeed engine steps "
                        "inside backward, which this loop's token-exact accumulation cannot use; set it to 1 "
                        "and raise training.batch_size, or use FSDP")
    if cfg.model.lora.enabled and checkpoints.sharded(accelerator):
        raise UserError("model.lora under FSDP or DeepSpeed: this loop saves and merges adapters from an unsharded "
                        "model; train LoRA on one process or with DDP (its point is to need less memory anyway)")
    for line in [*notes, device.use_all_cores(accelerator)]:
        if line:
            accelerator.print(line)
    if resume_from is not None:
        out_dir = resume_from.parent.parent
    else:  # one start time, so one directory, for all processes
        out_dir = rundir.output_path(cfg, broadcast_object_list([time.strftime("%Y%m%d-%H%M%S")])[0])
    set_seed(t.seed)

    tokenizer, train_rows, dev_rows, train_ds, dev_ds, fmt = load_data(cfg, accelerator, out_dir)
    model = modeling.build_model(cfg, tokenizer)
    fmt.configure(model)  # the family's decoder start and first token, for eval and the exported best/
    lora_record = lora.base_record(cfg.model.lora, model) if cfg.model.lora.enabled else None
    for line in attention.setup(t.attention_backend, accelerator.device.type,
                                bool(d.source_buckets and d.target_buckets), model):
        accelerator.print(line)
    head = LabelLogits(model)  # the LM head only at real label tokens: same loss, less work
    if head.handle is None:
        accelerator.print(f"note: {type(model).__name__} has no output embedding module; the LM head runs at every "
                          "position, padding included (the same loss, more work)")
    collate = data.make_collator(tokenizer, model)
    train_collate = data.make_collator(tokenizer, model, d.source_buckets, d.target_buckets)
    accum = t.gradient_accumulation_steps
    group_size = t.batch_size * accum * accelerator.num_processes if d.group_by_length else 0
    train_dl = data.train_loader(train_ds, t.batch_size, train_collate, t.seed, d.num_workers, group_size=group_size)
    dev_dl = data.eval_loader(dev_ds, ev.eval_batch_size, collate, d.num_workers)

    optimizer = build_optimizer(model, cfg)
    model, optimizer, train_dl, dev_dl = accelerator.prepare(model, optimizer, train_dl, dev_dl)
    injected = faults.Faults()
    injected.attach(model)
    total_steps = t.max_steps or max(len(train_dl) // accum, 1) * t.num_epochs
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    loss_fn = CompiledLoss(functools.partial(token_losses, label_smoothing=t.label_smoothing), t.torch_compile,
                           accelerator.print)
    if note := graph_break_note(accelerator.unwrap_model(model), t.torch_compile):
        accelerator.print(note)
    stepper = Stepper(accelerator, model, optimizer, scheduler, loss_fn, head, t.max_grad_norm, injected)
    writer = checkpoints.CheckpointWriter(accelerator, model, optimizer, scheduler, ev.keep_last_checkpoints,
                                          ev.async_save, accelerator.print, lora_record)
    shape = flops.seq2seq_shape(accelerator.unwrap_model(model).config)
    peak = flops.peak_flops(accelerator.device, t.peak_tflops) if shape is not None else None

    state = TrainState(num_processes=accelerator.num_processes)
    if resume_from is not None:
        state = TrainState.from_dict(checkpoints.load_checkpoint(
            accelerator, model, optimizer, scheduler, resume_from, lora_record))
        if state.step > total_steps:
            raise UserError(f"--resume {resume_from}: the checkpoint is at step {state.step}, past the "
                            f"{total_steps} steps this config trains for (training.max_steps / num_epochs)")
    state.time.follow_compiles(loss_fn.events)

    # Everything that can fail on bad input has run: only now is the run directory created and written to.
    rewrite = resume_from is None or any(line.startswith("note: resuming with") for line in notes)
    lock, claim_notes = on_main_process(accelerator, lambda: rundir.claim(
        out_dir, resume_from is None, cfg.to_toml() if rewrite else None, tokenizer)) or (None, [])
    for line in claim_notes:
        accelerator.print(line)
    if resume_from is not None:
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    mode = tracking.init_tracking(accelerator, cfg, out_dir, mode, run_id=state.wandb_run_id)
    tracker = tracking.wandb_run(accelerator)
    tracking.restore_best_summary(tracker, ev.metric_for_best_model, state.best_metric, state.best_step)
    if tracker is not None and cfg.wandb.log_dataset and resume_from is None:
        tracking.log_dataset_artifact(tracker, cfg, [Path(d.train_file), Path(d.dev_file)])
    accelerator.print(
        f"run {cfg.run_name()} -> {out_dir}\n"
        f"  {len(train_rows)} train / {len(dev_rows)} dev rows, {modeling.describe_parameters(model)}, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, precision {precision}\n"
        f"  {total_steps} optimizer steps of {t.batch_size} x {accum} x {accelerator.num_processes} samples; "
        f"eval every {ev.eval_steps}, save every {ev.save_steps}, log every {ev.logging_steps}")
    progress = progress_bar(total_steps, state.step, accelerator.is_main_process)
    run = Run(cfg, args, accelerator, out_dir, tokenizer, dev_rows, model, head, train_dl, dev_dl, scheduler,
              stepper, writer, tracker, mode, total_steps, accum, shape, peak, injected, progress, lock, lora_record)
    return run, state


def on_main_process(accelerator: Any, fn: Any) -> Any:
    """`fn()` on the main process (None elsewhere); its UserError is raised on every process, so none is left
    waiting for the others."""
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except UserError as err:
            error = str(err)
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    accelerator.wait_for_everyone()
    if error:
        raise UserError(error)
    return result


def load_data(cfg: Config, accelerator: Any, out_dir: Path) -> tuple[Any, list, list, Any, Any, Any]:
    """Validated rows, the tokenizer, the tokenized train/dev sets and the model family's Formatter (nothing is
    written to the run directory)."""
    from accelerate.utils import broadcast_object_list

    from loop import data, families
    from loop import model as modeling

    d, m = cfg.data, cfg.model
    with accelerator.main_process_first():
        if d.synthetic:
            from loop.synthetic import ensure_demo_data

            ensure_demo_data(Path(d.train_file).parent, d.synthetic_train_rows, d.synthetic_dev_rows,
                             d.synthetic_seed)
    train_rows = data.read_examples(d.train_file, d, d.max_train_samples)  # validates every row
    dev_rows = data.read_examples(d.dev_file, d, d.max_dev_samples)
    texts = [r["dialogue"] for r in train_rows] + [r["summary"] for r in train_rows]
    if cfg.model.tokenizer == "train" and accelerator.num_processes > 1:  # trained once, the same everywhere
        tokenizer = modeling.load_tokenizer(cfg, texts, out_dir / "tokenizer") if accelerator.is_main_process else None
        tokenizer = broadcast_object_list([tokenizer])[0]
    with accelerator.main_process_first():
        if cfg.model.tokenizer != "train" or accelerator.num_processes == 1:
            tokenizer = modeling.load_tokenizer(cfg, texts, out_dir / "tokenizer")
        fmt = families.formatter(modeling.load_model_config(cfg), tokenizer, cfg)
        train_ds = data.tokenize_file(d.train_file, d, tokenizer, m.max_source_length, m.max_target_length,
                                      rows=train_rows, fmt=fmt)
        dev_ds = data.tokenize_file(d.dev_file, d, tokenizer, m.max_source_length, m.max_target_length,
                                    rows=dev_rows, fmt=fmt)
    for ds, name in ((train_ds, d.train_file), (dev_ds, d.dev_file)):
        if warning := data.truncation_report(ds, m.max_source_length, name, fmt.source_specials):
            accelerator.print(f"warning: {warning}")
    return tokenizer, train_rows, dev_rows, train_ds, dev_ds, fmt


# ---- the loop -----------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """How `train` ended: the stop signal's name (None: not stopped by a signal), the last evaluation, and why
    the run stopped early (None: it did not)."""

    stopped_by: str | None
    last_eval: EvalResult | None
    early_stop: str | None = None


def train(run: Run, state: TrainState, stop: StopRequest) -> Outcome:
    """Optimizer steps until all are done or a stop is asked for; log, evaluate and save when due."""
    from loop.window import LogWindow

    ev, total = run.cfg.evaluation, run.total_steps
    batches = micro_batches(run.accelerator, run.train_dl, state.step * run.accum)
    state.time.start_clock()
    last_eval = evaluate(run, state, 0) if ev.eval_on_start and state.step == 0 else None
    window = LogWindow(state.window, run.accelerator.device, run.flops_shape, run.peak_flops)
    run.model.train()
    try:
        if out_of_patience(run.cfg, state):  # a resumed run that had stopped early: nothing left to train
            return Outcome(None, last_eval, early_stop_reason(run.cfg))
        while state.step < total:
            group = [next(batches) for _ in range(run.accum)]  # (epoch progress, batch) per micro-batch
            result = run.stepper.step(group, state.step, stop)  # forward/backward, clip, update
            count_nonfinite(run, state, result.previous)
            window.add(group, result)
            state.step += 1
            step = state.step
            run.progress.update(1)

            stopping = run.stepper.stop_agreed(stop)
            logging = step % ev.logging_steps == 0 or step == total
            evaluating = step % ev.eval_steps == 0 or step == total
            saving = step % ev.save_steps == 0 or step == total or stopping
            settled = run.stepper.settle() if logging or evaluating or saving else None  # host needs it now
            count_nonfinite(run, state, settled)
            if logging:
                log_train(run, state, window, settled.grad_norm, epoch=group[-1][0])
            paused = time.perf_counter()
            if evaluating:
                last_eval = evaluate(run, state, step)
            early = evaluating and out_of_patience(run.cfg, state)  # the same on every process: gathered metrics
            if saving or early:
                save(run, state, window, step)
            window.exclude(time.perf_counter() - paused)  # throughput counts training time only
            if stopping:
                return Outcome(stop.signal_name or "a signal on another process", last_eval)
            if early:
                return Outcome(None, last_eval, early_stop_reason(run.cfg))
    finally:
        run.progress.close()
        with state.time.timed("checkpoint"):
            run.writer.wait()
        state.time.read_clock()
    return Outcome(None, last_eval)


def out_of_patience(cfg: Config, state: TrainState) -> bool:
    """Early stopping: evaluation.early_stopping_patience evals in a row without an improvement."""
    patience = cfg.evaluation.early_stopping_patience
    return patience > 0 and state.evals_without_improvement >= patience


def early_stop_reason(cfg: Config) -> str:
    """Why the run stopped early, in words."""
    ev = cfg.evaluation
    return (f"no eval/{ev.metric_for_best_model} improvement above {ev.early_stopping_threshold:g} in "
            f"{ev.early_stopping_patience} evals")


def micro_batches(accelerator: Any, loader: Any, consumed: int) -> Iterator[tuple[float, dict]]:
    """Training batches forever from position `consumed`, each epoch in its own seeded order, with the epoch
    progress (epochs done as a float) after each batch."""
    epoch, skip = divmod(consumed, len(loader))
    while True:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for i, batch in enumerate(batches, start=skip):
            yield epoch + (i + 1) / len(loader), batch
        epoch, skip = epoch + 1, 0


def count_nonfinite(run: Run, state: TrainState, settled: Settled | None) -> None:
    """Count a settled step whose loss was NaN/inf (its update was skipped); stop after too many in a row."""
    from loop import checkpoints, tracking

    if settled is None:
        return
    if not settled.nonfinite:
        state.nonfinite_run = 0
        return
    state.nonfinite_total += 1
    state.nonfinite_run += 1
    tracking.log(run.accelerator, {"train/nonfinite_steps": state.nonfinite_total}, step=settled.step)
    if run.accelerator.is_main_process:
        run.progress.write(f"step {settled.step}: non-finite loss or gradient, update skipped "
                           f"({state.nonfinite_run} in a row)")
    limit = run.cfg.training.max_nonfinite_steps
    if state.nonfinite_run >= limit:
        run.writer.wait()
        last = checkpoints.list_checkpoints(run.out_dir / "checkpoints")
        raise TrainingDiverged(
            f"training stopped at step {settled.step}: {state.nonfinite_run} consecutive non-finite steps "
            f"(training.max_nonfinite_steps = {limit}); last good checkpoint: {last[-1] if last else 'none'}; "
            "lower the learning rate or check the data")


def log_train(run: Run, state: TrainState, window: LogWindow, grad_norm: float, epoch: float) -> None:
    """The window's train/* metrics to W&B (and as a plain line without a terminal); then a new window."""
    from loop import tracking

    logs = {**window.metrics(run.accelerator), "train/lr": run.scheduler.get_last_lr()[0],
            "train/grad_norm": grad_norm, "train/epoch": epoch}
    with state.time.timed("tracking"):
        tracking.log(run.accelerator, logs, step=state.step)
    state.history["train_loss"].append((state.step, logs["train/loss"]))
    run.progress.set_postfix(loss=f"{logs['train/loss']:.3f}", lr=f"{logs['train/lr']:.2e}")
    if run.progress.disable and run.accelerator.is_main_process:
        run.progress.write(f"step {state.step}/{run.total_steps}: loss {logs['train/loss']:.4f}, "
                           f"lr {logs['train/lr']:.2e}, {logs['train/samples_per_s']:.1f} samples/s")
    window.reset()


def evaluate(run: Run, state: TrainState, step: int) -> EvalResult:
    """Evaluate, log and record the eval; keep the model as the best when the configured metric improves."""
    from loop import evaluation, rundir, tracking

    acc, cfg = run.accelerator, run.cfg
    with state.time.timed("eval"):
        result = evaluation.evaluate(acc, run.model, run.dev_dl, run.tokenizer, run.dev_rows, cfg, run.head)
    state.last_eval = result.metrics
    state.history["eval_loss"].append((step, result.metrics["loss"]))
    with state.time.timed("tracking"):
        tracking.log(acc, {f"eval/{k}": v for k, v in result.metrics.items()}, step=step)
        if run.tracker is not None and cfg.wandb.table_rows:
            tracking.log_samples_table(run.tracker, step, result, run.dev_rows, cfg.wandb.table_rows)
    if acc.is_main_process:  # for tools that follow a run while it trains (sweeps, reports)
        with state.time.timed("eval"), rundir.storage_warning(run.progress.write,
                                                                     f"write the step {step} eval into {run.out_dir}"):
            with open(run.out_dir / "eval_metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **result.metrics}) + "\n")
            evaluation.write_predictions(run.out_dir / "predictions" / f"step_{step}.csv", result, run.dev_rows)
        shown = ", ".join(f"{k} {result.metrics[k]:.4f}" for k in ("loss", "rouge_1", "rouge_2", "rouge_l"))
        run.progress.write(f"step {step}: eval {shown}")
    ev = cfg.evaluation
    value = result.metrics[ev.metric_for_best_model]
    state.note_eval(value, ev.greater_is_better, ev.early_stopping_threshold)
    if state.improves(value, ev.greater_is_better):
        keep_best(run, state, step, result.metrics)
    tracking.summarize_eval(run.tracker, step, result.metrics, cfg.evaluation.metric_for_best_model,
                            state.best_metric, state.best_step)
    return result


def keep_best(run: Run, state: TrainState, step: int, metrics: dict[str, float]) -> None:
    """Export the model to best/ and, under wandb.model_artifacts = "every_best", log it as a W&B artifact."""
    from loop import checkpoints, evaluation, tracking

    acc, cfg, best_dir = run.accelerator, run.cfg, run.out_dir / "best"
    info = {"step": step, "rouge_tokenizer": cfg.evaluation.rouge_tokenizer, **metrics}
    with state.time.timed("checkpoint"):
        exported = checkpoints.export_best(acc, run.model, run.tokenizer,
                                           evaluation.generation_config(acc.unwrap_model(run.model), cfg), info,
                                           best_dir, run.progress.write, cfg=cfg)
    if not exported:  # best/ keeps the previous best, and so does the run state: a later eval may export again
        return
    state.best_metric, state.best_step = metrics[cfg.evaluation.metric_for_best_model], step
    state.best_metrics = dict(metrics)
    if run.tracker is not None and tracking.model_artifact_due(cfg, at_end=False):
        with state.time.timed("tracking"):
            upload_best(run, step, info)


def upload_best(run: Run, step: int, info: dict[str, Any]) -> None:
    """Log best/ as a W&B `model` artifact (aliases best, step-N) through a hard-linked snapshot of it."""
    from loop import checkpoints, tracking

    snapshot = checkpoints.link_snapshot(run.out_dir / "best", run.out_dir / "artifacts" / f"best-step_{step}")
    tracking.log_model_artifact(run.tracker, run.cfg, snapshot, step, info, run.lora)


def save(run: Run, state: TrainState, window: LogWindow, step: int) -> None:
    """The full resumable state into checkpoints/step_N (atomic; written in the background), rotating old ones."""
    state.wandb_run_id = run.tracker.id if run.tracker is not None else state.wandb_run_id
    state.window = window.saved()
    state.time.read_clock()
    with state.time.timed("checkpoint"):  # the in-memory snapshot; the files are written in the background
        run.writer.save(run.out_dir / "checkpoints" / f"step_{step}", state.to_dict())


# ---- the end --------------------------------------------------------------------------------------------------

def finish(run: Run, state: TrainState, outcome: Outcome) -> None:
    """Final metrics and charts, final_metrics.json, sample predictions, the time split and the closing line."""
    from loop import rundir, tracking

    acc, ev, step, last_eval = run.accelerator, run.cfg.evaluation, state.step, outcome.last_eval
    run.faults.finish(step)
    early = {"step": step, "reason": outcome.early_stop} if outcome.early_stop else None
    final = {f"final/{k}": v for k, v in state.last_eval.items()}
    tracking.log(acc, {**final, **({"final/early_stopped_at_step": step} if early else {})}, step=step)
    times = state.time.report()
    if run.tracker is not None:
        # final_best: only now, at the real end (a stopped or preempted launch uploads when its resume ends).
        if state.best_step is not None:
            if tracking.model_artifact_due(run.cfg, at_end=True):
                upload_best(run, state.best_step, {"step": state.best_step,
                                                   "rouge_tokenizer": ev.rouge_tokenizer, **state.best_metrics})
            tracking.link_final_best(run.tracker, run.cfg, run.out_dir, run.mode)
        tracking.write_summary(run.tracker, ev.metric_for_best_model, state.best_metric, state.best_step, times)
        tracking.log_final_charts(run.tracker, step, state.history["train_loss"], state.history["eval_loss"],
                                  state.best_metrics)
    if acc.is_main_process:
        with rundir.storage_warning(acc.print, "write final_metrics.json"):
            rundir.write_atomic(run.out_dir / "final_metrics.json", json.dumps({
                "step": step, "final": state.last_eval, "best_step": state.best_step, "best": state.best_metrics,
                "metric_for_best_model": ev.metric_for_best_model, "early_stopped": early, "time": times},
                indent=2) + "\n")
        for i in range(min(ev.print_samples, len(last_eval.predictions) if last_eval else 0)):
            acc.print(f"\nsample {i + 1} ({run.dev_rows[last_eval.indices[i]]['id']})\n"
                      f"  reference:  {last_eval.references[i]}\n  prediction: {last_eval.predictions[i]}")
    c = times["compile"]
    compiled = (f"; compiling {c['seconds']:.1f} s of training ({c['dynamo_compiles']} dynamo compiles, "
                f"{c['recompiles']} recompiles, {c['backward_compiles']} backward compiles, "
                f"{c['cudagraphs_recorded']} CUDA graphs recorded)") if run.stepper.loss_fn.events else ""
    acc.print(f"\ntime in the loop {times['seconds']['loop']:.1f} s: " + ", ".join(
        f"{key} {100 * share:.1f}%" for key, share in times["share"].items()) + compiled)
    stopped = f"stopped early at step {step} of {run.total_steps} ({outcome.early_stop}); " if early else ""
    acc.print(
        f"done: {stopped}best eval/{ev.metric_for_best_model} = {state.best_metric:.4f} at step {state.best_step} "
        f"(ROUGE-L {state.best_metrics.get('rouge_l', float('nan')):.4f}, tokenizer {ev.rouge_tokenizer}); "
        f"best model: {run.out_dir / 'best'}; {tracking.run_location(run.tracker, run.mode)}")


def close(run: Run) -> None:
    """End the trackers and the process group, and flush the W&B run file."""
    from loop import tracking

    run.progress.close()
    tracking.end(run.accelerator, run.tracker)


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run."""
    parts = ["accelerate", "launch", "loop/train.py"]
    if args.config:
        parts += ["--config", args.config]
    for item in args.set:
        parts += ["--set", item]
    return shlex.join([*parts, "--resume", "auto"])


if __name__ == "__main__":
    sys.exit(run_cli(main, interrupted_hint="; continue from the last checkpoint with --resume auto"))
