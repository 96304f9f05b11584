"""What `--resume` may change: each config key either must match the checkpoint's run (refused with one line
naming the key and both values) or is applied from the new config (said in one line)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loop.config import Config, all_keys, load_config
from loop.errors import UserError

REFUSE, APPLY, IGNORE = "refuse", "apply", "ignore"

# The most specific prefix wins. Refused: whatever defines the model, the data and its order, the optimizer's
# trajectory, what "best" means, or the run's identity (its name, W&B project). Applied: cadence, decoding,
# speed and logging settings, and the run's length (the schedule is rebuilt for it).
RULES: dict[str, tuple[str, str]] = {
    "model": (REFUSE, "it defines the model"),
    "data": (REFUSE, "it defines the training data and its order"),
    "data.source_buckets": (APPLY, "padding only; the loss is the same"),
    "data.target_buckets": (APPLY, "padding only; the loss is the same"),
    "data.num_workers": (APPLY, "loader processes only"),
    "data.reference_columns": (REFUSE, "they define the dev set the best checkpoint so far was scored on"),
    "data.clean_patterns": (REFUSE, "they change the dialogues the model was trained and scored on"),
    "training": (REFUSE, "the optimizer state and schedule in the checkpoint were made with it"),
    "training.max_steps": (APPLY, "the learning-rate schedule is rebuilt for the new length"),
    "training.num_epochs": (APPLY, "the learning-rate schedule is rebuilt for the new length"),
    "training.max_grad_norm": (APPLY, "clipping from now on"),
    "training.max_nonfinite_steps": (APPLY, "from now on"),
    "training.torch_compile": (APPLY, "speed only"),
    "training.attention_backend": (APPLY, "speed only"),
    "training.gradient_checkpointing": (APPLY, "memory and speed only; the gradients are the same"),
    "training.peak_tflops": (APPLY, "train/mfu only"),
    "training.save_model_as_artifact": (APPLY, "from now on"),
    "training.output_dir": (IGNORE, "the run continues in its own directory"),
    "evaluation": (APPLY, "from now on"),
    "evaluation.metric_for_best_model": (REFUSE, "the best checkpoint so far was chosen by it"),
    "evaluation.greater_is_better": (REFUSE, "the best checkpoint so far was chosen by it"),
    "evaluation.rouge_tokenizer": (REFUSE, "the best checkpoint so far was scored with it"),
    "evaluation.rouge_aggregate": (REFUSE, "the best checkpoint so far was scored with it"),
    "generation": (APPLY, "eval scores from now on are decoded with it"),
    "wandb": (APPLY, "the W&B run's settings from now on"),
    "wandb.name": (REFUSE, "it names the run being continued"),
    "wandb.project": (REFUSE, "the W&B run being continued lives in it"),
    "wandb.entity": (REFUSE, "the W&B run being continued lives in it"),
}

# Keys that make up the default run name (and so the run directory that `--resume auto` looks for).
NAME_KEYS = ("model.name_or_path", "model.short_name", "data.version", "training.learning_rate",
             "training.batch_size", "wandb.name")


def rule(key: str) -> tuple[str, str]:
    """The decision for a dotted config key, and why."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RULES:
            return RULES[".".join(parts[:n])]
    raise KeyError(key)


def _value(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def changes(saved: Config, now: Config) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every key that differs."""
    old, new = saved.to_dict(), now.to_dict()
    return [(key, _value(old, key), _value(new, key)) for key in all_keys() if _value(old, key) != _value(new, key)]


def check_resume(cfg: Config, ckpt: Path, saved_processes: int, processes: int) -> list[str]:
    """Refuse a resume that would silently train something else; the notes for the changes that are applied."""
    saved_file = ckpt.parent.parent / "config.toml"
    if not saved_file.is_file():
        raise UserError(f"--resume {ckpt}: its run has no config.toml ({saved_file}); resume from a run directory "
                        "this loop wrote")
    try:
        saved = load_config(saved_file)
    except UserError as err:
        raise UserError(f"--resume {ckpt}: its run's config cannot be read ({err})") from None
    notes = []
    for key, old, new in changes(saved, cfg):
        decision, why = rule(key)
        if decision == REFUSE:
            raise UserError(f"--resume {ckpt}: the checkpoint was trained with {key} = {old!r}, the config says "
                            f"{new!r} ({why}); resume with the original settings, or start a new run")
        if decision == APPLY:
            notes.append(f"note: resuming with {key} = {new!r} (was {old!r}): {why}")
    if saved_processes != processes:
        raise UserError(f"--resume {ckpt}: the checkpoint was trained with {saved_processes} process(es), this "
                        f"launch has {processes} (the global batch and the data position depend on it); launch "
                        f"{saved_processes} process(es)")
    return notes


def renamed_run_note(cfg: Config, pattern: str) -> str | None:
    """When `--resume auto` finds no run of this name: a started run that differs from this config in keys of the
    run name (and otherwise only in keys a resume may change), named with those keys: the likely mistake is a
    changed learning rate or batch size."""
    from loop.rundir import has_started

    parent = Path(pattern).parent
    if not parent.is_dir():
        return None
    candidates = sorted((p for p in parent.iterdir() if p.is_dir() and (p / "config.toml").is_file()),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    for run_dir in candidates:
        try:
            saved = load_config(run_dir / "config.toml")
        except UserError:
            continue
        differ = changes(saved, cfg)
        named = [(key, old, new) for key, old, new in differ if key in NAME_KEYS]
        others_allowed = all(key in NAME_KEYS or rule(key)[0] != REFUSE for key, _, _ in differ)
        if named and others_allowed and has_started(run_dir):
            shown = ", ".join(f"{key} = {old!r} there, {new!r} here" for key, old, new in named)
            return (f"note: --resume auto found no run named {cfg.run_name()}; starting it fresh ({run_dir} differs "
                    f"only in {shown}; to continue that one: --resume {run_dir} with its settings)")
    return None
