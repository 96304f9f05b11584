"""Cost of the loop's checkpointing and tracking per event, and the share of wall time it takes at given cadences.

    python benchmarks/overhead.py                         # GPU: KoBART shape, bf16 state
    python benchmarks/overhead.py --device cpu            # here: the same shape on the CPU (disk-bound parts)
    python benchmarks/overhead.py --step-ms 20 --step-ms 300 --json out.json

It times the loop's own calls on a model of the preset's shape with a populated AdamW state: a resumable save
(a synchronous `checkpoints.CheckpointWriter` save: safetensors + JSON and the manifest, written atomically; and the
default background save,
of which training waits only for the in-memory snapshot), a best-model export
(`checkpoints.export_best`), and, in W&B offline mode, a training-metrics log (`tracking.log`), the eval samples
Table and the best-model artifact. Then, for the cadences of configs/base.toml (or --logging/--eval/--save) and
each step time, the share of wall time these take, counting an export + artifact at every eval (the worst case:
the metric improves every time). Eval itself (generation) is not part of this: the loop reports it separately.
A real run reports its own split in final_metrics.json ("time") and the W&B summary (time/*_share).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    PRESETS,
    header,
    loop_overrides,
    pick_device,
    setup_env,
    table,
    write_json,
    write_tokenizer,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--preset", choices=sorted(PRESETS), default="kobart")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of each event (median counts)")
    p.add_argument("--logging", type=int, default=100, help="logging cadence in steps (base.toml: 100)")
    p.add_argument("--eval", type=int, default=500, help="eval cadence in steps (base.toml: 500)")
    p.add_argument("--save", type=int, default=500, help="save cadence in steps (base.toml: 500)")
    p.add_argument("--step-ms", type=float, action="append",
                   help="training step times to project onto (repeatable; default 20, 50, 100, 300)")
    p.add_argument("--json", help="write every figure to this file")
    ns = p.parse_args(argv)
    ns.device = pick_device(ns.device)
    ns.step_ms = ns.step_ms or [20.0, 50.0, 100.0, 300.0]
    return ns


def timed(fn: Any, repeats: int) -> float:
    """Median seconds of fn() over repeats (after one untimed call)."""
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    """Time each event, project the shares, print and write the figures."""
    ns = parse_args(argv)
    preset = PRESETS[ns.preset]
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as name:
        tmp = Path(name)
        setup_env(tmp)
        import os

        import torch
        from accelerate import Accelerator

        from loop import checkpoints, evaluation, tracking
        from loop.config import load_config
        from loop.console import quiet_libraries
        from loop.model import build_model, count_parameters
        from loop.optim import build_optimizer, build_scheduler

        quiet_libraries()

        try:
            import wandb  # noqa: F401

            os.environ["WANDB_MODE"] = "offline"
        except ImportError:  # the GPU machines have no wandb: tracking is not timed there
            pass
        tokenizer = write_tokenizer(tmp / "tokenizer", preset.vocab)
        (tmp / "d.csv").write_text("fname,dialogue,summary\n", encoding="utf-8")
        overrides = [o for o in loop_overrides(preset, tmp / "d.csv", tmp / "d.csv", tmp / "tokenizer")
                     if not o.startswith("wandb.mode")]
        cfg = load_config(None, [*overrides, f"wandb.mode={os.environ['WANDB_MODE']}", "wandb.table_rows=16",
                                 f"training.mixed_precision={'bf16' if ns.device == 'cuda' else 'no'}"])
        accelerator = Accelerator(cpu=ns.device == "cpu", mixed_precision=cfg.training.mixed_precision,
                                  log_with=None if os.environ["WANDB_MODE"] == "disabled" else "wandb")
        model = build_model(cfg, tokenizer)
        optimizer = build_optimizer(model, cfg)
        model, optimizer = accelerator.prepare(model, optimizer)
        ids = torch.randint(5, preset.vocab, (2, 64), device=accelerator.device)
        model(input_ids=ids, labels=ids).loss.backward()  # one step, so the optimizer state exists
        optimizer.step()
        scheduler = build_scheduler(optimizer, cfg, 100)
        out = tmp / "run"
        mode = tracking.init_tracking(accelerator, cfg, out, os.environ["WANDB_MODE"])
        run = tracking.wandb_run(accelerator)
        state = {"step": 1}
        sync_writer = checkpoints.CheckpointWriter(accelerator, model, optimizer, scheduler, 2, background=False)
        counter = iter(range(10**6))
        gen = evaluation.generation_config(accelerator.unwrap_model(model), cfg)
        metrics = {"step": 1, "rouge_l": 0.5, "loss": 1.0}
        events = {
            "save (resumable state)": lambda: sync_writer.save(out / "checkpoints" / f"step_{next(counter)}", state),
            "export best model": lambda: checkpoints.export_best(accelerator, model, tokenizer, gen, metrics,
                                                                 out / "best", cfg=cfg),
        }
        if run is not None:
            logs = {"train/loss": 1.0, "train/lr": 1e-4, "train/grad_norm": 1.0, "train/epoch": 1.0,
                    "train/samples_per_s": 1.0, "train/tokens_per_s": 1.0}
            text = " ".join(["가나다"] * preset.src_mean)
            examples = [{"id": f"d{i}", "dialogue": text} for i in range(16)]
            result = SimpleNamespace(indices=list(range(16)), references=[text[:200]] * 16,
                                     predictions=[text[:200]] * 16, per_sample_rouge_l=[0.5] * 16)
            steps = iter(range(1, 10**6))
            events["log training metrics"] = lambda: tracking.log(accelerator, logs, step=next(steps))
            events["eval samples table"] = lambda: tracking.log_samples_table(run, next(steps), result, examples, 16)
            events["best-model artifact"] = lambda: tracking.log_model_artifact(
                run, cfg, checkpoints.link_snapshot(out / "best", out / "artifacts" / f"s{next(counter)}"), 1,
                metrics)
        seconds = {name: timed(fn, ns.repeats) for name, fn in events.items()}
        # The default background save: training waits for the snapshot only; the write overlaps training.
        writer = checkpoints.CheckpointWriter(accelerator, model, optimizer, scheduler, 2, background=True)
        blocking, written = [], []
        for _ in range(ns.repeats + 1):
            writer.wait()
            start = time.perf_counter()
            writer.save(out / "checkpoints" / f"step_{next(counter)}", state)
            blocking.append(time.perf_counter() - start)
            writer.wait()
            written.append(time.perf_counter() - start)
        seconds["save, background (training waits)"] = statistics.median(blocking[1:])
        background_write_s = statistics.median(written[1:])
        tracking.end(accelerator, run)

        per = {"log training metrics": ns.logging, "eval samples table": ns.eval, "best-model artifact": ns.eval,
               "export best model": ns.eval, "save (resumable state)": ns.save,
               "save, background (training waits)": ns.save}
        tracking_parts = [k for k in seconds if k not in ("save (resumable state)", "export best model",
                                                           "save, background (training waits)")]
        projections = []
        for save_event, label in (("save, background (training waits)", "async_save = true (default)"),
                                  ("save (resumable state)", "async_save = false")):
            for step_ms in ns.step_ms:
                ckpt = seconds[save_event] / ns.save + seconds["export best model"] / ns.eval  # s per step
                track = sum(seconds[k] / per[k] for k in tracking_parts)
                wall = step_ms / 1000 + ckpt + track
                projections.append({"save": label, "step_ms": step_ms, "checkpoint_share": ckpt / wall,
                                    "tracking_share": track / wall, "total_share": (ckpt + track) / wall})
        result = header("overhead", ns.device, ns.preset, sys.argv[1:] if argv is None else argv)
        result.update(parameters=count_parameters(model), wandb_mode=mode, seconds_per_event=seconds,
                      background_write_s=background_write_s,
                      cadence_steps=per, projections=projections,
                      checkpoint_bytes=sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file())
                      // 2)
        write_json(ns.json, result)
        print(f"device: {result['device']['name']} | {result['parameters']:,} parameters ({ns.preset}), "
              f"W&B {mode}, checkpoint {result['checkpoint_bytes'] / 2**20:.0f} MiB\n")
        print(table([[k, v, per[k]] for k, v in seconds.items()], ["event", "seconds (median)", "every N steps"]))
        print(f"\nbackground save: snapshot then write, {background_write_s:.2f} s until on disk (training goes on)")
        print("\n" + table([[p["save"], p["step_ms"], f"{100 * p['checkpoint_share']:.2f}%",
                             f"{100 * p['tracking_share']:.2f}%", f"{100 * p['total_share']:.2f}%"]
                            for p in projections],
                           ["resumable saves", "step ms", "checkpoints", "tracking", "together (target <= 3%)"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
