"""Checkpoints on disk: the exported best model (inference only) and the full resumable training state."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from loop import faults
from loop.errors import UserError

STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.json"
LATEST_FILE = "latest"


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace `final` by the finished `tmp` directory with renames, so a reader never sees half a copy."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def export_best(accelerator: Any, model: Any, tokenizer: Any, gen_config: Any, metrics: dict[str, Any],
                best_dir: Path) -> None:
    """Write the inference model (safetensors, tokenizer, generation config, metrics.json) to `best_dir`.

    Called on every process (the state dict may be sharded); only the main process writes.
    """
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = best_dir.with_name(best_dir.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, save_function=accelerator.save)
        tokenizer.save_pretrained(tmp)
        gen_config.save_pretrained(tmp)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _swap_in(tmp, best_dir)
    accelerator.wait_for_everyone()


def link_snapshot(src: Path, dst: Path) -> Path:
    """A hard-linked copy of `src` (no extra disk) that later exports cannot change; falls back to copying."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        try:
            os.link(f, dst / f.name)
        except OSError:  # a filesystem without hard links
            shutil.copy2(f, dst / f.name)
    return dst


def _publish(ckpt_dir: Path, trainer_state_text: str, keep_last: int) -> None:
    """Main process, after every file of step_N.tmp is written: trainer_state.json, rename, `latest`, rotation."""
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    faults.pause_in_save(ckpt_dir.name)
    (tmp / STATE_FILE).write_text(trainer_state_text, encoding="utf-8")
    _swap_in(tmp, ckpt_dir)
    marker = ckpt_dir.parent / LATEST_FILE
    marker.with_suffix(".tmp").write_text(ckpt_dir.name + "\n", encoding="utf-8")
    os.replace(marker.with_suffix(".tmp"), marker)
    if keep_last > 0:
        for old in list_checkpoints(ckpt_dir.parent)[:-keep_last]:
            shutil.rmtree(old)


def _fresh_tmp(accelerator: Any, ckpt_dir: Path) -> Path:
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    return tmp


def save_training_state(accelerator: Any, ckpt_dir: Path, trainer_state: dict[str, Any], keep_last: int) -> None:
    """`accelerator.save_state` into checkpoints/step_N atomically, then the `latest` marker, then rotation.

    Everything is written into `step_N.tmp` and renamed; trainer_state.json is written last inside it, so a
    directory named step_N is complete, and a process killed mid-save leaves only a .tmp that resume skips.
    """
    tmp = _fresh_tmp(accelerator, ckpt_dir)
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        _publish(ckpt_dir, json.dumps(trainer_state, indent=2) + "\n", keep_last)
    accelerator.wait_for_everyone()


def host_copy(obj: Any, memo: dict | None = None) -> Any:
    """`obj` (nested dicts/lists/tuples of tensors and plain values) with every tensor copied to CPU memory.

    Tensors that share storage (tied embeddings) stay shared in the copy, so safetensors still writes them once.
    """
    import torch

    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if key not in memo:
            memo[key] = t.to("cpu", copy=True)
        return memo[key]
    if isinstance(obj, dict):
        return type(obj)((k, host_copy(v, memo)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(host_copy(v, memo) for v in obj)
    return obj


class CheckpointWriter:
    """Resumable saves, by default written in the background: training waits only for an in-memory snapshot.

    The snapshot is what `accelerator.save_state` would write, taken at the same point: model and optimizer
    states and the registered objects (the LR scheduler) copied to host memory, and the RNG/scaler/sampler files
    written at once by accelerate's own `save_accelerator_state`. A thread then writes the large files with
    accelerate's `save` into step_N.tmp and publishes it as for a synchronous save, so `accelerator.load_state`
    reads either. One save is in flight at a time; `wait()` before anything reads the checkpoints (the thread is
    not a daemon: an exiting interpreter finishes the write first). Sharded states (FSDP, DeepSpeed) are saved
    synchronously.
    """

    def __init__(self, accelerator: Any, keep_last: int, background: bool, warn: Any = print) -> None:
        from accelerate.utils import DistributedType

        self.accelerator, self.keep_last, self.warn = accelerator, keep_last, warn
        self.background = background and accelerator.distributed_type not in (
            DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA)
        self.thread: threading.Thread | None = None
        self.failed: str | None = None

    def save(self, ckpt_dir: Path, trainer_state: dict[str, Any]) -> None:
        """Save the resumable state as checkpoints/step_N (complete when its directory has that name)."""
        self.wait()
        if not self.background:
            save_training_state(self.accelerator, ckpt_dir, trainer_state, self.keep_last)
            return
        from accelerate.checkpointing import save_accelerator_state

        acc = self.accelerator
        tmp = _fresh_tmp(acc, ckpt_dir)
        memo: dict = {}
        weights = [host_copy(acc.get_state_dict(m, unwrap=False), memo) for m in acc._models]
        optimizers = [host_copy(o.state_dict()) for o in acc._optimizers]
        custom = [host_copy(obj.state_dict()) for obj in acc._custom_objects]
        text = json.dumps(trainer_state, indent=2) + "\n"
        tmp.mkdir(parents=True, exist_ok=True)
        each_node = acc.project_configuration.save_on_each_node
        save_accelerator_state(str(tmp), [], [], acc._schedulers, acc._dataloaders, acc.state.process_index,
                               acc.step, acc.scaler, save_on_each_node=each_node)  # RNG states: now, on every rank
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.thread = threading.Thread(target=self._write, name=f"save-{ckpt_dir.name}", args=(
                ckpt_dir, tmp, weights, optimizers, custom, text, each_node))
            self.thread.start()

    def _write(self, ckpt_dir: Path, tmp: Path, weights: list, optimizers: list, custom: list, text: str,
               each_node: bool) -> None:
        from accelerate.utils import OPTIMIZER_NAME, SAFE_WEIGHTS_NAME, save

        try:
            for i, state in enumerate(weights):
                name = SAFE_WEIGHTS_NAME if i == 0 else SAFE_WEIGHTS_NAME.replace(".", f"_{i}.")
                save(state, tmp / name, save_on_each_node=each_node, safe_serialization=True)
            for i, state in enumerate(optimizers):
                save(state, tmp / (f"{OPTIMIZER_NAME}.bin" if i == 0 else f"{OPTIMIZER_NAME}_{i}.bin"),
                     save_on_each_node=each_node, safe_serialization=False)
            for i, state in enumerate(custom):
                save(state, tmp / f"custom_checkpoint_{i}.pkl", save_on_each_node=each_node)
            _publish(ckpt_dir, text, self.keep_last)
        except Exception as err:  # reported by wait(); the .tmp directory stays and resume skips it
            self.failed = f"{ckpt_dir}: {type(err).__name__}: {err}"

    def wait(self) -> None:
        """Block until the save in flight is on disk; say so in one warning line if it failed."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.failed:
            self.warn(f"warning: checkpoint {self.failed.splitlines()[0]} could not be written; the previous "
                      "checkpoint stays the newest")
            self.failed = None


def list_checkpoints(root: Path) -> list[Path]:
    """Complete `step_N` checkpoint directories under root, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def incomplete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories a killed save left behind (never chosen for resume)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and p not in list_checkpoints(root))


def _newest_in_run(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir / "checkpoints")
    return ckpts[-1] if ckpts else None


def find_resume_checkpoint(spec: str, output_dir_pattern: str) -> tuple[Path | None, list[Path]]:
    """The checkpoint `--resume` means, and the incomplete ones skipped on the way.

    `auto`: the newest complete checkpoint among the run directories matching the output_dir pattern
    ({time} matches any start time), or None to start fresh. A path: a checkpoint, or a run directory.
    """
    if spec == "auto":
        pattern = Path(output_dir_pattern.replace("{time}", "*"))
        anchor = Path(pattern.anchor) if pattern.is_absolute() else Path(".")
        relative = pattern.relative_to(anchor) if pattern.is_absolute() else pattern
        runs = sorted((p for p in anchor.glob(str(relative)) if p.is_dir()), key=lambda p: p.name, reverse=True)
        skipped = [c for run in runs for c in incomplete_checkpoints(run / "checkpoints")]
        for run in runs:
            if found := _newest_in_run(run):
                return found, skipped
        return None, skipped
    path = Path(spec)
    if not path.exists():
        raise UserError(f"--resume {spec}: no such checkpoint or run directory")
    if (path / STATE_FILE).is_file():
        return path, []
    if path.name.startswith("step_") and path.is_dir():
        raise UserError(f"--resume {spec}: incomplete checkpoint (no {STATE_FILE}; the save was interrupted); "
                        "use an earlier one or the run directory")
    found = _newest_in_run(path)
    if found is None:
        raise UserError(f"--resume {spec}: no complete checkpoint under {path / 'checkpoints'}")
    return found, incomplete_checkpoints(path / "checkpoints")


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """The loop's own resume state saved next to accelerator.save_state's files."""
    return json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
