"""Checkpoints on disk: the exported best model (inference only) and the full resumable training state."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.json"


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


def save_training_state(accelerator: Any, ckpt_dir: Path, trainer_state: dict[str, Any], keep_last: int) -> None:
    """`accelerator.save_state` into `checkpoints/step_N` (via a temp dir), then drop the oldest beyond keep_last."""
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")
        _swap_in(tmp, ckpt_dir)
        if keep_last > 0:
            for old in list_checkpoints(ckpt_dir.parent)[:-keep_last]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete `step_N` checkpoint directories under root, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name[5:]))
