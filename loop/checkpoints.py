"""Checkpoints on disk: the exported best model (inference only) and the full resumable training state.

A resumable checkpoint `checkpoints/step_N/` holds no pickles, so loading one never runs code from it: tensors
are in safetensors files and everything else is JSON.

    model.safetensors                  the model's weights (unwrapped: any process count can read them); with
                                       model.lora only the adapters (and the rows of added tokens), and
                                       lora.json: the frozen base's sha256
    optimizer.safetensors, .json       the optimizer state's tensors, and its structure and hyperparameters
    scheduler.json                     the learning-rate schedule
    scaler.json                        fp16's GradScaler (fp16 runs only)
    rng_<rank>.safetensors, .json      each process's torch, and Python and NumPy, random states
    trainer_state.json                 the loop's own state (loop/state.py)
    manifest.json                      written last: the size and sha256 of every other file

Everything is written into `step_N.tmp`, renamed to `step_N` once the manifest is in it; `--resume` checks the
manifest (sizes and checksums) before it uses a checkpoint, so a truncated or damaged one is skipped. Sharded
states (FSDP, DeepSpeed) are written by `accelerator.save_state` in those libraries' own formats, which use
pickle: the loop adds its JSON files and the manifest next to them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from loop import faults
from loop.config import Config
from loop.errors import UserError, storage_reason

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.json"
LATEST_FILE = "latest"
FORMAT = 2  # bump when the files of a checkpoint change


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be used; the message says why, in a few words."""


# ---- JSON + safetensors for nested states -------------------------------------------------------------------

def _encode(obj: Any, tensors: dict[str, Any], path: str) -> Any:
    """`obj` as JSON values, its tensors moved into `tensors` under their path (the inverse of `_decode`)."""
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{path}.k{i}"), _encode(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at {path}")


def _decode(obj: Any, tensors: dict[str, Any]) -> Any:
    import numpy as np

    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        if obj["__tensor__"] not in tensors:
            raise DamagedCheckpoint(f"tensor {obj['__tensor__']} is missing")
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def encode_state(obj: Any, name: str) -> tuple[str, dict[str, Any]]:
    """A nested state as JSON text plus the tensors to store beside it (`name` prefixes their keys)."""
    tensors: dict[str, Any] = {}
    text = json.dumps(_encode(obj, tensors, name), indent=1) + "\n"
    return text, tensors


def write_state(directory: Path, name: str, text: str, tensors: dict[str, Any]) -> None:
    """`name.json`, and `name.safetensors` when the state has tensors."""
    from safetensors.torch import save_file

    (directory / f"{name}.json").write_text(text, encoding="utf-8")
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))


def read_state(directory: Path, name: str) -> Any:
    """The state `write_state` wrote (JSON and safetensors only: nothing in them can run code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensor_file = directory / f"{name}.safetensors"
    try:
        tensors = load_file(str(tensor_file)) if tensor_file.is_file() else {}
        return _decode(json.loads((directory / f"{name}.json").read_text(encoding="utf-8")), tensors)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise DamagedCheckpoint(f"{name} cannot be read ({type(err).__name__}: {err})") from None


# ---- what a checkpoint holds --------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """This process's random states: Python, NumPy, torch on the CPU and on every visible GPU."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`'s output."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sharded(accelerator: Any) -> bool:
    """Whether the model and optimizer states are sharded across processes (saved by accelerate itself)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                            DistributedType.MEGATRON_LM, DistributedType.XLA)


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_manifest(directory: Path, step: int) -> None:
    """The manifest: every file under `directory` with its size and sha256; written last."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _file_digest(path)}
    manifest = {"format": FORMAT, "step": step, "files": files}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


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


def _publish(ckpt_dir: Path, texts: dict[str, str], step: int, keep_last: int) -> None:
    """Main process, once every state file of step_N.tmp is written: the JSON states, the manifest, the rename,
    the `latest` marker and the rotation of old checkpoints."""
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    for name, text in texts.items():
        (tmp / name).write_text(text, encoding="utf-8")
    faults.pause_in_save(ckpt_dir.name)
    _write_manifest(tmp, step)
    _swap_in(tmp, ckpt_dir)
    marker = ckpt_dir.parent / LATEST_FILE
    marker.with_suffix(".tmp").write_text(ckpt_dir.name + "\n", encoding="utf-8")
    os.replace(marker.with_suffix(".tmp"), marker)
    if keep_last > 0:
        for old in list_checkpoints(ckpt_dir.parent)[:-keep_last]:
            shutil.rmtree(old)


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

    The snapshot is taken on the main thread: model and optimizer tensors copied to host memory, the small
    states (schedule, scaler, loop state, optimizer structure) encoded as JSON, and every process's random
    states written at once. A thread then writes the large files and publishes step_N.tmp as step_N. One save
    is in flight at a time; `wait()` before anything reads the checkpoints (the thread is not a daemon: an
    exiting interpreter finishes the write first). Sharded states (FSDP, DeepSpeed) are saved synchronously.
    A save that fails (a full disk) is one warning line; the previous checkpoint stays the newest.
    """

    def __init__(self, accelerator: Any, model: Any, optimizer: Any, scheduler: Any, keep_last: int,
                 background: bool, warn: Any = print, lora_record: dict[str, Any] | None = None) -> None:
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.keep_last, self.warn = keep_last, warn
        self.lora_record = lora_record  # set: save the trainable adapters only, with this as lora.json
        self.background = background and not sharded(accelerator)
        self.thread: threading.Thread | None = None
        self.failed: str | None = None

    def save(self, ckpt_dir: Path, trainer_state: dict[str, Any]) -> None:
        """Save the resumable state as checkpoints/step_N (complete when its directory has that name)."""
        self.wait()
        acc = self.accelerator
        tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
        step = trainer_state["step"]
        try:
            if acc.is_main_process and tmp.exists():
                shutil.rmtree(tmp)
            acc.wait_for_everyone()
            if sharded(acc):
                acc.save_state(str(tmp))
            else:
                tmp.mkdir(parents=True, exist_ok=True)
                write_state(tmp, f"rng_{acc.process_index}", *encode_state(rng_state(), "rng"))
        except OSError as err:
            self._warn_failed(f"{ckpt_dir}: {type(err).__name__}: {err}")
            return
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        texts = {STATE_FILE: json.dumps(trainer_state, indent=2) + "\n",
                 "scheduler.json": encode_state(self.scheduler.state_dict(), "scheduler")[0]}
        if acc.scaler is not None:
            texts["scaler.json"] = encode_state(acc.scaler.state_dict(), "scaler")[0]
        if self.lora_record is not None:
            from loop.lora import BASE_FILE

            texts[BASE_FILE] = json.dumps(self.lora_record, indent=1) + "\n"
        weights = optimizer = None
        if not sharded(acc):
            if self.lora_record is not None:
                from loop.lora import trainable_state

                weights = trainable_state(acc.unwrap_model(self.model))
            else:
                weights = acc.get_state_dict(self.model)
            weights = host_copy(weights) if self.background else weights
            opt_state = host_copy(self.optimizer.state_dict()) if self.background else self.optimizer.state_dict()
            optimizer = encode_state(opt_state, "optimizer")
        args = (ckpt_dir, tmp, weights, optimizer, texts, step)
        if self.background:
            self.thread = threading.Thread(target=self._write, name=f"save-{ckpt_dir.name}", args=args)
            self.thread.start()
        else:
            self._write(*args)
            self.wait()

    def _write(self, ckpt_dir: Path, tmp: Path, weights: Any, optimizer: Any, texts: dict[str, str],
               step: int) -> None:
        from accelerate.utils import SAFE_WEIGHTS_NAME, save

        try:
            if weights is not None:
                save(OrderedDict(weights), tmp / SAFE_WEIGHTS_NAME, safe_serialization=True)
                write_state(tmp, "optimizer", *optimizer)
            _publish(ckpt_dir, texts, step, self.keep_last)
        except Exception as err:  # reported by wait(); the .tmp directory stays and resume skips it
            self.failed = f"{ckpt_dir}: {type(err).__name__}: {err}"

    def _warn_failed(self, what: str) -> None:
        self.warn(f"warning: checkpoint {what.splitlines()[0]} could not be written; the previous "
                  "checkpoint stays the newest")

    def wait(self) -> None:
        """Block until the save in flight is on disk; say so in one warning line if it failed."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.failed:
            self._warn_failed(self.failed)
            self.failed = None


def load_checkpoint(accelerator: Any, model: Any, optimizer: Any, scheduler: Any, ckpt: Path,
                    lora_record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore model, optimizer, schedule, scaler and random states from a verified checkpoint; the loop state.

    Only safetensors and JSON are read (sharded states: through accelerate's own loader). With LoRA
    (`lora_record`: this run's lora.json) the checkpoint's base must be this one, and it holds the adapters.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        if sharded(accelerator):
            accelerator.load_state(str(ckpt))
        else:
            if lora_record is not None:
                from loop.lora import check_base

                check_base(ckpt, lora_record)
                _load_trainable(accelerator.unwrap_model(model), ckpt / "model.safetensors")
            else:
                load_model(accelerator.unwrap_model(model), str(ckpt / "model.safetensors"))  # copied into the params
            optimizer.load_state_dict(_matching_groups(read_state(ckpt, "optimizer"), optimizer.state_dict()))
            set_rng_state(read_state(ckpt, f"rng_{accelerator.process_index}"))
        scheduler.load_state_dict(read_state(ckpt, "scheduler"))
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(read_state(ckpt, "scaler"))
    except DamagedCheckpoint as err:
        raise UserError(f"--resume {ckpt}: {err}") from None
    except (RuntimeError, ValueError, KeyError, TypeError, SafetensorError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise UserError(f"--resume {ckpt}: the checkpoint does not fit this model ({first})") from None
    return read_trainer_state(ckpt)


def _load_trainable(model: Any, path: Path) -> None:
    """Copy the saved trainable parameters into `model`; they must be exactly the ones that train now."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    if set(saved) != trainable:
        odd = sorted(set(saved) ^ trainable)
        raise ValueError(f"{len(odd)} adapter tensors differ from this model's, e.g. {odd[0]}")
    model.load_state_dict(saved, strict=False)


def _matching_groups(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The saved optimizer state with each hyperparameter in the type the live optimizer uses (betas: a tuple)."""
    for group, live in zip(saved.get("param_groups", []), current["param_groups"], strict=False):
        for key, value in group.items():
            if isinstance(live.get(key), tuple) and isinstance(value, list):
                group[key] = tuple(value)
    return saved


# ---- finding and checking checkpoints -----------------------------------------------------------------------

def verify(ckpt: Path) -> None:
    """Raise DamagedCheckpoint unless every file the manifest lists is there with its size and checksum."""
    from loop.state import TrainState

    manifest_file = ckpt / MANIFEST_FILE
    if not manifest_file.is_file():
        raise DamagedCheckpoint(f"no {MANIFEST_FILE} (its save was interrupted, or an older version of the loop "
                                "wrote it)")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        files = manifest["files"]
        assert manifest["format"] == FORMAT and isinstance(files, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise DamagedCheckpoint(f"{MANIFEST_FILE} is damaged") from None
    for name in (STATE_FILE, "scheduler.json"):
        if name not in files:
            raise DamagedCheckpoint(f"the manifest lists no {name}")
    for name, entry in files.items():
        path = ckpt / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not isinstance(entry, dict):
            raise DamagedCheckpoint(f"{MANIFEST_FILE} lists {name!r}, which is not a file of the checkpoint")
        if path.is_symlink():
            raise DamagedCheckpoint(f"{name} is a link; a checkpoint holds its own files")
        if not path.is_file():
            raise DamagedCheckpoint(f"{name} is missing")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise DamagedCheckpoint(f"{name} has {size} bytes, the manifest says {entry.get('size')} (truncated?)")
        if _file_digest(path) != entry.get("sha256"):
            raise DamagedCheckpoint(f"{name} does not match its checksum (damaged)")
    try:
        state = TrainState.from_dict(json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8")))
    except ValueError as err:
        raise DamagedCheckpoint(f"{STATE_FILE} is not a loop state ({err})") from None
    if ckpt.name.startswith("step_") and ckpt.name != f"step_{state.step}":
        raise DamagedCheckpoint(f"{STATE_FILE} says step {state.step}")


def list_checkpoints(root: Path) -> list[Path]:
    """Complete `step_N` checkpoint directories under root (their manifest is written), oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.name[5:].isdigit() and (p / MANIFEST_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def incomplete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories a killed save left behind (never chosen for resume)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and p not in list_checkpoints(root))


def _passed_over(root: Path) -> list[tuple[Path, str]]:
    """The incomplete checkpoint directories under root, each with the reason it is not used."""
    return [(p, "its save was interrupted" if p.name.endswith(".tmp") else
             f"no {MANIFEST_FILE} (its save was interrupted, or an older version of the loop wrote it)")
            for p in incomplete_checkpoints(root)]


def _newest_verified(run_dir: Path, damaged: list[tuple[Path, str]]) -> Path | None:
    """The newest checkpoint of a run that verifies; the ones passed over go into `damaged` with the reason."""
    for ckpt in reversed(list_checkpoints(run_dir / "checkpoints")):
        try:
            verify(ckpt)
            return ckpt
        except DamagedCheckpoint as err:
            damaged.append((ckpt, str(err)))
    return None


def find_resume_checkpoint(spec: str, output_dir_pattern: str) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint `--resume` means, and the ones passed over on the way, each with the reason.

    `auto`: the newest checkpoint that verifies among the run directories matching the output_dir pattern
    ({time} matches any start time), or None to start fresh. A path: a checkpoint, or a run directory.
    """
    if spec == "auto":
        pattern = Path(output_dir_pattern.replace("{time}", "*"))
        anchor = Path(pattern.anchor) if pattern.is_absolute() else Path(".")
        relative = pattern.relative_to(anchor) if pattern.is_absolute() else pattern
        runs = sorted((p for p in anchor.glob(str(relative)) if p.is_dir()), key=lambda p: p.name, reverse=True)
        skipped = [item for run in runs for item in _passed_over(run / "checkpoints")]
        for run in runs:
            if found := _newest_verified(run, skipped):
                return found, skipped
        return None, skipped
    path = Path(spec)
    if not path.exists():
        raise UserError(f"--resume {spec}: no such checkpoint or run directory")
    if not path.is_dir():
        raise UserError(f"--resume {spec}: is a file; give a checkpoint directory (RUN/checkpoints/step_N), a run "
                        "directory, or auto")
    if path.name.startswith("step_") or (path / MANIFEST_FILE).exists() or (path / STATE_FILE).exists():
        try:
            verify(path)
        except DamagedCheckpoint as err:
            raise UserError(f"--resume {spec}: unusable checkpoint: {err}; use an earlier one, or the run "
                            "directory (which takes the newest one that is intact)") from None
        return path, []
    skipped = _passed_over(path / "checkpoints")
    found = _newest_verified(path, skipped)
    if found is None:
        raise UserError(f"--resume {spec}: no intact checkpoint under {path / 'checkpoints'}")
    return found, skipped


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """The loop's own resume state saved next to the model, optimizer and random states."""
    return json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))


# ---- the exported best model --------------------------------------------------------------------------------

def export_best(accelerator: Any, model: Any, tokenizer: Any, gen_config: Any, metrics: dict[str, Any],
                best_dir: Path, warn: Any = print, *, cfg: Config) -> bool:
    """Write the inference model (safetensors, tokenizer, generation config, metrics.json, and the run's settings
    as loop_config.toml) to `best_dir`; with LoRA the merged model, and the adapter alone in best_dir/adapter.

    Called on every process (the state dict may be sharded); only the main process writes. A storage error is
    one warning line and leaves the previous best/ in place; the return value (the same on every process) says
    whether the export was written.
    """
    from accelerate.utils import broadcast_object_list

    from loop.lora import is_adapted, save_best
    from loop.model_settings import write_settings

    state_dict = accelerator.get_state_dict(model)
    written = [True]
    if accelerator.is_main_process:
        tmp = best_dir.with_name(best_dir.name + ".tmp")
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            unwrapped = accelerator.unwrap_model(model)
            if is_adapted(unwrapped):
                save_best(unwrapped, tmp, accelerator.save)  # merged, plus the adapter alone in adapter/
            else:
                unwrapped.save_pretrained(tmp, state_dict=state_dict, save_function=accelerator.save)
            tokenizer.save_pretrained(tmp)
            gen_config.save_pretrained(tmp)
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
            # A copied or downloaded best/ then still formats its inputs as in training (source prefix, ...).
            write_settings(cfg, tmp)
            _swap_in(tmp, best_dir)  # the whole directory at once, so each file in it is written atomically
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            warn(f"warning: could not export the best model to {best_dir}: {storage_reason(err)}; the previous "
                 "best stays; training goes on")
            written = [False]
    if accelerator.num_processes > 1:
        written = broadcast_object_list(written)
    accelerator.wait_for_everyone()
    return written[0]


def link_snapshot(src: Path, dst: Path) -> Path:
    """A hard-linked copy of `src` (no extra disk) that later exports cannot change; falls back to copying."""
    def link(f: str, target: str) -> None:
        try:
            os.link(f, target)
        except OSError:  # a filesystem without hard links
            shutil.copy2(f, target)

    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst, copy_function=link)  # subdirectories too (best/adapter with LoRA)
    return dst
