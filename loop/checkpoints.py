"""Checkpoints on disk: the exported best model (inference only) and the full resumable training state."""

from __future__ import annotations

import json
import os
import shutil
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


def save_training_state(accelerator: Any, ckpt_dir: Path, trainer_state: dict[str, Any], keep_last: int) -> None:
    """`accelerator.save_state` into checkpoints/step_N atomically, then the `latest` marker, then rotation.

    Everything is written into `step_N.tmp` and renamed; trainer_state.json is written last inside it, so a
    directory named step_N is complete, and a process killed mid-save leaves only a .tmp that resume skips.
    """
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        faults.pause_in_save()
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")
        _swap_in(tmp, ckpt_dir)
        marker = ckpt_dir.parent / LATEST_FILE
        marker.with_suffix(".tmp").write_text(ckpt_dir.name + "\n", encoding="utf-8")
        os.replace(marker.with_suffix(".tmp"), marker)
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
