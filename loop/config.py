"""Typed configuration: TOML files with `extends`, `--set` overrides, and validation before anything runs.

The dataclass defaults are the embedded demo: a small BART trained from scratch on synthetic Korean
dialogues that the project generates itself, so `loop/train.py` with no `--config` works offline on a CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import getpass
import math
import os
import re
import string
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import tomli_w

from loop.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DIALOGSUM_TOKENS = [
    "#Person1#", "#Person2#", "#Person3#", "#Person4#", "#Person5#", "#Person6#", "#Person7#",
    "#PhoneNumber#", "#Address#", "#PassportNumber#", "#DateOfBirth#", "#Email#", "#CarNumber#",
    "#CardNumber#", "#SSN#", "#PersonName#",
]  # fmt: skip

# Limits of what the values reach. TOML integers are 64-bit, and torch/numpy take no more.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The tokenizers BPE trainer reserves memory for vocab_size entries up front and aborts the whole process
# (no exception) when it cannot: 2**40 asked for 72 TB. Real vocabularies stay far below 2**20.
VOCAB_MAX = 2**20
SEED_MAX = 2**32 - 1  # accelerate.utils.set_seed calls numpy.random.seed, which takes 0 ... 2**32 - 1
WANDB_TAG_MAX = 64  # wandb.init refuses empty tags and tags longer than this, offline too
WANDB_PROJECT_MAX = 128
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"  # wandb.init refuses a project name with any of these
# What wandb.Artifact accepts in a name: (regular expression, what it says to the user).
ARTIFACT_NAME = (r"[A-Za-z0-9._-]*", "only letters, digits, '.', '_' and '-' (it names a W&B artifact)")
# Bytes in one file name (ext4, xfs, btrfs) and in a whole path (Linux); longer fails with "File name too long".
PATH_PART_MAX, PATH_MAX = 255, 4095


def _spec(default: Any = dataclasses.MISSING, *, factory: Any = None, help: str = "", **rules: Any) -> Any:
    """A dataclass field with a one-line help text and validation rules (see _check_value)."""
    meta = {"help": help, **rules}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class WandbConfig:
    """[wandb]: experiment tracking; empty strings take the team's naming conventions."""

    project: str = _spec("dialogue-summarization", nonblank=True, max_len=WANDB_PROJECT_MAX,
                         forbid=WANDB_PROJECT_FORBIDDEN, help="W&B project")
    entity: str = _spec("", help="W&B team or user; empty = your default entity")
    name: str = _spec("", help="run name; empty = {model}_{data_version}_lr{lr}_bs{batch}")
    group: str = _spec("", help="run group; empty = {model}_experiments")
    job_type: str = _spec("training", help="W&B job type")
    tags: list[str] = _spec(factory=list, item={"min_len": 1, "max_len": WANDB_TAG_MAX},
                            help="extra tags, added to the convention tags")
    notes: str = _spec("", multiline=True, help="free-text notes for the run")
    mode: str = _spec("auto", choices=("auto", "online", "offline", "disabled"),
                      help="auto = online when an API key is configured, else offline")
    experimenter: str = _spec("", help="who ran it; empty = the login user")
    baseline: bool = _spec(False, help="tag the run `baseline` instead of `experimental`")
    log_dataset: bool = _spec(False, help="log the train/dev files once as a `dataset` artifact")
    table_rows: int = _spec(16, min=0, help="sample predictions logged as a W&B Table at each eval")
    model_artifacts: str = _spec("every_best", choices=("every_best", "final_best", "off"),
                                 help="model artifact uploads: every new best, only the run's final best (at its "
                                      "end), or none; training.save_model_as_artifact = false means none whatever "
                                      "this says")
    artifact_ttl_days: int = _spec(0, min=0, max=36500, help="days W&B keeps each model artifact; 0 = keep")
    registry_collection: str = _spec("", pattern=ARTIFACT_NAME,
                                     help="link the final best model to wandb-registry-model/<collection> "
                                          "(alias best); empty = no link")


@dataclass
class ScratchConfig:
    """[model.scratch]: the shape of a BART built from a config when model.from_scratch is true."""

    d_model: int = _spec(192, min=8, help="hidden size")
    encoder_layers: int = _spec(2, min=1, help="encoder layers")
    decoder_layers: int = _spec(2, min=1, help="decoder layers")
    attention_heads: int = _spec(4, min=1, help="attention heads (must divide d_model)")
    ffn_dim: int = _spec(512, min=8, help="feed-forward size")
    dropout: float = _spec(0.1, min=0.0, max=0.9, help="dropout")
    vocab_size: int = _spec(4000, min=100, max=VOCAB_MAX, help="vocabulary size when the tokenizer is trained")


@dataclass
class LoraConfig:
    """[model.lora]: train low-rank adapters (peft) on frozen weights instead of the whole model."""

    enabled: bool = _spec(False, help="train LoRA adapters only (needs peft: pip install -e '.[lora]')")
    r: int = _spec(8, min=1, help="adapter rank")
    alpha: float = _spec(16.0, gt=0.0, help="adapter scale numerator (the update is scaled by alpha / r)")
    dropout: float = _spec(0.05, min=0.0, lt=1.0, help="dropout on the adapters' input")
    target_modules: list[str] = _spec(factory=list, item={"nonblank": True, "stripped": True},
                                      help="linear layers to adapt, by name; [] = the attention query and value "
                                           "projections (q_proj, v_proj for BART/mBART; q, v for T5)")


@dataclass
class ModelConfig:
    """[model]: which model and tokenizer, and sequence lengths."""

    name_or_path: str = _spec("demo-bart", help="hub id or local directory (a label when from_scratch)")
    tokenizer: str = _spec("train", help="hub id or dir; empty = name_or_path; `train` = train on train_file")
    from_scratch: bool = _spec(True, help="build the model from [model.scratch] instead of loading weights")
    short_name: str = _spec("", help="name in run names and tags; empty = last part of name_or_path")
    max_source_length: int = _spec(128, min=8, help="max encoder tokens (longer dialogues are truncated)")
    max_target_length: int = _spec(48, min=4, help="max label tokens (longer summaries are truncated)")
    source_prefix: str = _spec("", help="text put before every dialogue in training, eval and predict, then a space "
                                        "unless it ends in one (a T5 task prefix such as \"summarize:\"); empty = none")
    scratch: ScratchConfig = _spec(factory=ScratchConfig, help="architecture when from_scratch")
    lora: LoraConfig = _spec(factory=LoraConfig, help="LoRA adapters")


@dataclass
class DataConfig:
    """[data]: dialogue/summary files (CSV or JSONL) and their columns."""

    train_file: str = _spec("data/demo/train.csv", help="training file (.csv or .jsonl)")
    dev_file: str = _spec("data/demo/dev.csv", help="evaluation file (.csv or .jsonl)")
    id_column: str = _spec("fname", nonblank=True, help="id column")
    dialogue_column: str = _spec("dialogue", nonblank=True, help="source text column")
    summary_column: str = _spec("summary", nonblank=True, help="target text column")
    # The dev file's references; several make ROUGE multi-reference (combined by evaluation.rouge_aggregate).
    reference_columns: list[str] = _spec(factory=lambda: ["summary"], item={"nonblank": True, "stripped": True},
                                         help="dev-file column(s) ROUGE scores against; several = multi-reference "
                                              "(the eval loss uses summary_column if the dev file has it, else the "
                                              "first non-empty reference)")
    source_lang: str = _spec("", stripped=True, help="mBART only (required there): the dialogues' language code, "
                                                      "e.g. \"ko_KR\"")
    target_lang: str = _spec("", stripped=True, help="mBART only (required there): the summaries' language code, "
                                                      "e.g. \"ko_KR\"; generation starts with it")
    version: str = _spec("1", pattern=ARTIFACT_NAME,
                         help="data version, used in run names, the data:v tag and the dataset artifact name")
    # An empty token makes the tokenizer trainer split every character apart; a token with surrounding
    # whitespace never matches the text it was meant for.
    special_tokens: list[str] = _spec(factory=lambda: list(DIALOGSUM_TOKENS), item={"nonblank": True, "stripped": True},
                                      help="speaker and mask tokens kept whole by the tokenizer")
    clean_patterns: list[str] = _spec(factory=list, item={"nonblank": True},
                                      help="regular expressions removed from dialogues (never summaries) in "
                                           "training, eval and predict, line by line, e.g. 'ㅋ{2,}'; [] = off")
    synthetic: bool = _spec(True, help="generate synthetic demo data into train_file/dev_file if missing")
    synthetic_train_rows: int = _spec(3000, min=1, help="synthetic training rows")
    synthetic_dev_rows: int = _spec(100, min=1, help="synthetic dev rows")
    synthetic_seed: int = _spec(0, help="synthetic data seed")
    group_by_length: bool = _spec(False, help="batch dialogues of similar length (less padding; seeded, resumable)")
    source_buckets: list[int] = _spec(factory=list, help="pad training batches' source length up to the smallest of "
                                      "these that fits (few static shapes for training.torch_compile); [] = longest")
    target_buckets: list[int] = _spec(factory=list, help="the same for the summary (label) length")
    max_train_samples: int = _spec(0, min=0, help="use only the first N training rows; 0 = all")
    max_dev_samples: int = _spec(0, min=0, help="use only the first N dev rows; 0 = all")
    num_workers: int = _spec(0, min=0, help="DataLoader worker processes")


@dataclass
class TrainingConfig:
    """[training]: optimisation and where the run writes."""

    learning_rate: float = _spec(2e-3, gt=0.0, max=1.0, help="peak learning rate")
    batch_size: int = _spec(32, min=1, help="training batch size per process")
    num_epochs: int = _spec(20, min=1, help="epochs (ignored when max_steps > 0)")
    max_steps: int = _spec(600, min=0, help="optimizer steps; 0 = num_epochs worth")
    warmup_ratio: float = _spec(0.1, min=0.0, max=1.0, help="share of steps with linear warmup")
    weight_decay: float = _spec(0.01, min=0.0, help="AdamW decay (never on biases and LayerNorm)")
    gradient_accumulation_steps: int = _spec(1, min=1, help="micro-batches per optimizer step")
    mixed_precision: str = _spec("auto", choices=("auto", "no", "fp16", "bf16"),
                                 help="auto = fp16 on a GPU, no on a CPU")
    max_grad_norm: float = _spec(1.0, min=0.0, nonfinite="0 turns clipping off",
                                 help="gradient clipping; 0 = off (inf is not accepted)")
    max_nonfinite_steps: int = _spec(10, min=1, help="stop after this many consecutive NaN/inf steps (skipped)")
    label_smoothing: float = _spec(0.0, min=0.0, lt=1.0, help="label smoothing of the training loss (the eval loss "
                                                               "is never smoothed); 0 = off")
    seed: int = _spec(42, min=0, max=SEED_MAX, help="seed for model init, data order and dropout")
    scheduler: str = _spec("linear", choices=("linear", "cosine", "constant"), help="decay after warmup")
    adam_beta1: float = _spec(0.9, min=0.0, lt=1.0, help="AdamW beta1")
    adam_beta2: float = _spec(0.999, min=0.0, lt=1.0, help="AdamW beta2")
    adam_epsilon: float = _spec(1e-8, gt=0.0, help="AdamW epsilon")
    torch_compile: str = _spec("off", choices=("off", "default", "reduce-overhead", "max-autotune"),
                               help="compile forward+loss (reduce-overhead = CUDA graphs; pair with data.*_buckets); "
                                    "falls back to eager with a warning")
    attention_backend: str = _spec("auto", choices=("auto", "flash", "efficient", "cudnn", "math"),
                                   help="scaled-dot-product attention kernels: auto = torch's choice, but cuDNN off on "
                                        "CUDA unless data.source_buckets and data.target_buckets are both set (cuDNN "
                                        "plans per new shape); a name = only that kernel (flash, math also on a CPU)")
    peak_tflops: float = _spec(0.0, min=0.0, help="accelerator peak for train/mfu; 0 = known GPUs' bf16 dense peak")
    gradient_checkpointing: bool = _spec(False, help="recompute each layer's activations in the backward pass "
                                                      "(non-reentrant): less memory, slower steps, same gradients")
    save_model_as_artifact: bool = _spec(True, help="log best models as W&B `model` artifacts (which: "
                                                     "wandb.model_artifacts); false = none")
    output_dir: str = _spec("outputs/{name}-{time}", nonblank=True,
                            help="run directory; {name} = run name, {time} = start time")


@dataclass
class EvaluationConfig:
    """[evaluation]: cadence (in optimizer steps), best-model metric and ROUGE tokenizer."""

    eval_steps: int = _spec(120, min=1, help="evaluate every N optimizer steps")
    save_steps: int = _spec(120, min=1, help="save the resumable state every N optimizer steps")
    logging_steps: int = _spec(20, min=1, help="log training metrics every N optimizer steps")
    async_save: bool = _spec(True, help="write resumable checkpoints in a background thread after an in-memory "
                                          "snapshot (1 process, DDP); false = training waits for the disk")
    keep_last_checkpoints: int = _spec(2, min=0, help="resumable states kept (oldest removed); 0 = keep all")
    eval_on_start: bool = _spec(True, help="evaluate once at step 0")
    metric_for_best_model: str = _spec("rouge_l", choices=("rouge_1", "rouge_2", "rouge_l", "rouge_mean", "loss"),
                                       help="eval metric that picks the best checkpoint (rouge_mean = mean of "
                                            "ROUGE-1/2/L, the competition's score)")
    greater_is_better: bool = _spec(True, help="false for loss")
    rouge_tokenizer: str = _spec("mecab", choices=("mecab", "whitespace", "char"),
                                 help="tokens ROUGE counts: Korean morphemes, words or characters")
    rouge_aggregate: str = _spec("mean", choices=("mean", "max"),
                                 help="per dev row, each ROUGE type's F1 over data.reference_columns: mean or max")
    eval_batch_size: int = _spec(64, min=1, help="evaluation batch size per process")
    print_samples: int = _spec(2, min=0, help="sample predictions printed after the final eval")
    early_stopping_patience: int = _spec(0, min=0, help="stop after this many evals without an improvement of "
                                                        "metric_for_best_model above the threshold; 0 = off")
    early_stopping_threshold: float = _spec(0.0, min=0.0, help="smallest change of the metric that counts as an "
                                                               "improvement for early stopping")


@dataclass
class GenerationConfig:
    """[generation]: decoding settings used in evaluation and prediction."""

    num_beams: int = _spec(1, min=1, help="beam size; 1 = greedy")
    max_new_tokens: int = _spec(48, min=1, help="max generated tokens")
    no_repeat_ngram_size: int = _spec(0, min=0, help="forbid repeating n-grams of this size; 0 = off")
    length_penalty: float = _spec(1.0, help="beam length penalty")
    repetition_penalty: float = _spec(1.0, gt=0.0, help="divide the scores of tokens already generated by this; "
                                                       "1.0 = off")
    min_new_tokens: int = _spec(0, min=0, help="generate at least this many tokens; 0 = no minimum")
    cache: str = _spec("dynamic", choices=("dynamic", "static"),
                       help="key/value cache while decoding; static = fixed-size, and transformers compiles the "
                            "decoding step on a GPU (same summaries; a speed choice)")


@dataclass
class Config:
    """The whole run configuration."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})

    @property
    def model_short_name(self) -> str:
        """Model name used in run names and tags."""
        return self.model.short_name or Path(self.model.name_or_path.rstrip("/")).name

    def run_name(self) -> str:
        """The run name: configured, or `{model}_{data_version}_lr{lr}_bs{batch}`."""
        if self.wandb.name:
            return self.wandb.name
        t = self.training
        return f"{self.model_short_name}_v{self.data.version}_lr{t.learning_rate:g}_bs{t.batch_size}"

    def run_group(self) -> str:
        """The W&B group: configured, or `{model}_experiments`."""
        return self.wandb.group or f"{self.model_short_name}_experiments"

    def run_tags(self) -> list[str]:
        """Convention tags plus the configured ones, without duplicates."""
        experimenter = self.wandb.experimenter or _login_user()
        tags = [
            f"model:{self.model_short_name}",
            f"data:v{self.data.version}",
            "baseline" if self.wandb.baseline else "experimental",
            f"experimenter:{experimenter}",
            *self.wandb.tags,
        ]
        return list(dict.fromkeys(tags))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every setting (what is saved and logged)."""
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def to_toml(self) -> str:
        """The resolved config as TOML that `--config` accepts."""
        return f"# resolved from {self.source}\n" + tomli_w.dumps(self.to_dict())


def _login_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return os.environ.get("USER", "unknown")


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if not f.metadata.get("internal")}


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. `training.learning_rate`."""
    keys = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        hint = _hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys.extend(all_keys(hint, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


# Names people bring from transformers.TrainingArguments and elsewhere.
_ALIASES = {
    "lr": "learning_rate", "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "num_train_epochs": "num_epochs", "epochs": "num_epochs", "per_device_eval_batch_size": "eval_batch_size",
    "fp16": "mixed_precision", "bf16": "mixed_precision", "model_name": "name_or_path",
    "warmup_steps": "warmup_ratio", "lr_scheduler_type": "scheduler",
}  # fmt: skip


def _closest(key: str) -> str:
    """`; did you mean ...?` for a mistyped dotted key, or an empty string."""
    keys = all_keys()
    leaf = key.rsplit(".", 1)[-1]
    leaf = _ALIASES.get(leaf, leaf)
    match = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]  # right key, wrong section
    if "." not in key:
        match = match or difflib.get_close_matches(key, sorted(SECTIONS), n=1, cutoff=0.6)
    match = match or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return f"; did you mean `{match[0]}`?" if match else ""


def _type_name(hint: Any) -> str:
    if get_origin(hint) is list:
        return f"list of {get_args(hint)[0].__name__}"
    return {str: "string", int: "integer", float: "number", bool: "boolean (true/false)"}[hint]


def _text_problem(text: str, rules: dict[str, Any]) -> str | None:
    """What a string must be when it breaks its rules (multiline, nonblank, stripped, min_len, max_len, forbid,
    pattern), else None."""
    keep = "\n\r\t" if rules.get("multiline") else ""
    # Control characters and line separators would split the one-line messages that quote the value, NUL
    # breaks every file path, and a lone surrogate (undecodable bytes in argv) cannot be written as UTF-8.
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") and c not in keep for c in text):
        return ("text without control characters other than newline and tab" if keep else
                "one line of text without control characters (newline, tab, NUL)")
    if any(unicodedata.category(c) == "Cs" for c in text):
        return "valid UTF-8 text"
    if rules.get("nonblank") and not text.strip():
        return "a non-blank string"
    if rules.get("stripped") and text != text.strip():
        return "a string without leading or trailing whitespace"
    low, high = rules.get("min_len", 0), rules.get("max_len", math.inf)
    if not low <= len(text) <= high:
        return f"{low} to {high} characters" if low else f"at most {high} characters"
    if any(c in text for c in rules.get("forbid", "")):
        return "free of the characters " + " ".join(rules["forbid"])
    if "pattern" in rules and not re.fullmatch(rules["pattern"][0], text):
        return rules["pattern"][1]
    return None


def _path_problem(path: str) -> str | None:
    """What a path must be when the filesystem would refuse it as too long ("File name too long"), else None."""
    long = next((part for part in path.split("/") if len(part.encode("utf-8")) > PATH_PART_MAX), None)
    if long is not None:
        return f"a path whose file and directory names are at most {PATH_PART_MAX} bytes ({long[:16]}... is longer)"
    if len(path.encode("utf-8")) > PATH_MAX:
        return f"a path of at most {PATH_MAX} bytes"
    return None


def _check_value(where: str, key: str, hint: Any, value: Any, rules: dict[str, Any]) -> Any:
    """Type- and range-check one value; return it coerced (int -> float where a number is expected).

    Every number must be finite and every integer 64-bit, whatever the key; `rules` add min, max, gt, lt and
    choices, and for strings the rules of _text_problem. A list's items are checked with the rules in `item`.
    """
    def bad(expected: str) -> UserError:
        return UserError(f"{where}: `{key}` must be {expected}, got {value!r}")

    if get_origin(hint) is list:
        item = get_args(hint)[0]
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise bad(_type_name(hint))
        return [_check_value(where, f"{key}[{i}]", item, v, rules.get("item", {})) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # an integer literal beyond any float
            raise bad("a finite number") from None
    if (hint in (int, float) and isinstance(value, bool)) or not isinstance(value, hint):
        raise bad(_type_name(hint))
    # NaN passes every comparison below. inf is refused too, so that every setting, the saved config.toml and
    # the W&B config stay finite (0 is how a key says "off").
    if hint is float and not math.isfinite(value):
        raise bad("a finite number" + (f" ({rules['nonfinite']})" if "nonfinite" in rules else ""))
    if hint is str and (problem := _text_problem(value, rules)):
        raise bad(problem)
    if "choices" in rules and value not in rules["choices"]:
        raise bad("one of " + ", ".join(repr(c) for c in rules["choices"]))
    if "min" in rules and value < rules["min"]:
        raise bad(f"≥ {rules['min']}")
    if "gt" in rules and value <= rules["gt"]:
        raise bad(f"> {rules['gt']}")
    if "max" in rules and value > rules["max"]:
        raise bad(f"≤ {rules['max']}")
    if "lt" in rules and value >= rules["lt"]:
        raise bad(f"< {rules['lt']}")
    if hint is int and not INT64_MIN <= value <= INT64_MAX:
        raise bad(f"≤ {INT64_MAX} (64 bits)" if value > 0 else f"≥ {INT64_MIN} (64 bits)")
    return value


def _build(cls: type, data: dict[str, Any], where: str, prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise UserError(f"{where}: unknown key `{key}`{_closest(key)}")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(f"{where}: `{key}` must be a table ([{key}]), got {value!r}")
            kwargs[name] = _build(hint, value, where, f"{key}.")
        else:
            kwargs[name] = _check_value(where, key, hint, value, fields[name].metadata)
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_toml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a TOML file and everything it `extends`, child values winning."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise UserError(f"{chain[-1]}: `extends` makes a cycle: {cycle}")
    if not path.is_file():
        where = f"{chain[-1]}: `extends` names " if chain else ""
        raise UserError(f"{where}config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: invalid TOML: {err}") from None
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UserError(f"{path}: `extends` must be a file path string, got {parent!r}")
    return _merge(_read_toml(path.parent / parent, (*chain, path)), data)


def _parse_override(item: str) -> tuple[str, Any]:
    """Split `section.key=value`; the value is read as TOML, else taken as a plain string."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value")
    key, raw = (s.strip() for s in item.split("=", 1))
    if key not in all_keys():
        raise UserError(f"--set: unknown key `{key}`{_closest(key)}")
    hint = _hints_for(key)
    value: Any = raw
    if hint is not str:
        with contextlib.suppress(tomllib.TOMLDecodeError):  # else the type check names the expected type
            value = tomllib.loads(f"v = {raw}")["v"]
    return key, _check_value("--set", key, hint, value, _rules_for(key))


def _owner(key: str) -> tuple[Any, str]:
    """The dataclass that holds a dotted key, and the key's last part."""
    cls: Any = Config
    *path, leaf = key.split(".")
    for part in path:
        cls = _hints(cls)[part]
    return cls, leaf


def _hints_for(key: str) -> Any:
    cls, leaf = _owner(key)
    return _hints(cls)[leaf]


def _rules_for(key: str) -> dict[str, Any]:
    cls, leaf = _owner(key)
    return dict({f.name: f.metadata for f in dataclasses.fields(cls)}[leaf])


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a TOML config (or the embedded demo defaults), apply `--set` overrides and validate."""
    data: dict[str, Any] = _read_toml(Path(path)) if path is not None else {}
    where = str(path) if path is not None else "<defaults>"
    for item in overrides:
        key, value = _parse_override(item)
        *sections, leaf = key.split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    for name in data:
        if name not in SECTIONS:
            hint = _closest(name)
            raise UserError(f"{where}: unknown section or key `{name}`{hint}")
    cfg = _build(Config, data, where, "")
    cfg.source = where
    _check_consistency(cfg, where)
    return cfg


def _check_consistency(cfg: Config, where: str) -> None:
    """Reject settings that are valid one by one but not together."""
    ev, model = cfg.evaluation, cfg.model
    if cfg.generation.min_new_tokens > cfg.generation.max_new_tokens:
        raise UserError(f"{where}: `generation.min_new_tokens` ({cfg.generation.min_new_tokens}) must be ≤ "
                        f"`generation.max_new_tokens` ({cfg.generation.max_new_tokens})")
    if ev.metric_for_best_model == "loss" and ev.greater_is_better:
        raise UserError(f"{where}: `evaluation.metric_for_best_model = \"loss\"` needs "
                        "`evaluation.greater_is_better = false`")
    if ev.metric_for_best_model.startswith("rouge") and not ev.greater_is_better:
        raise UserError(f"{where}: `evaluation.greater_is_better = false` with a ROUGE metric would keep "
                        "the worst model; set it to true")
    if model.from_scratch and model.scratch.d_model % model.scratch.attention_heads:
        raise UserError(f"{where}: `model.scratch.attention_heads` ({model.scratch.attention_heads}) must "
                        f"divide `model.scratch.d_model` ({model.scratch.d_model})")
    if not model.from_scratch and model.tokenizer == "train":
        raise UserError(f"{where}: `model.tokenizer = \"train\"` only works with `model.from_scratch = true` "
                        "(a pretrained model needs its own tokenizer)")
    if not cfg.data.train_file or not cfg.data.dev_file:
        raise UserError(f"{where}: `data.train_file` and `data.dev_file` must name files")
    for fname in (cfg.data.train_file, cfg.data.dev_file):
        if Path(fname).suffix.lower() not in (".csv", ".jsonl", ".json"):
            raise UserError(f"{where}: data file {fname!r} must end in .csv or .jsonl")
    if cfg.data.synthetic and (Path(cfg.data.train_file).name, Path(cfg.data.dev_file).name,
                               Path(cfg.data.train_file).parent) != ("train.csv", "dev.csv",
                                                                     Path(cfg.data.dev_file).parent):
        raise UserError(f"{where}: with `data.synthetic = true`, data.train_file and data.dev_file must be "
                        "DIR/train.csv and DIR/dev.csv in one directory")
    for key, limit in (("source_buckets", model.max_source_length), ("target_buckets", model.max_target_length)):
        buckets = getattr(cfg.data, key)
        if buckets != sorted(set(buckets)) or any(b < 1 or b > limit for b in buckets):
            raise UserError(f"{where}: `data.{key}` must be increasing lengths from 1 to the model's max length "
                            f"({limit}), got {buckets}")
    if cfg.wandb.registry_collection and not (cfg.training.save_model_as_artifact
                                               and cfg.wandb.model_artifacts != "off"):
        raise UserError(f"{where}: `wandb.registry_collection` links the final best model artifact, but none is "
                        "logged: set wandb.model_artifacts to \"final_best\" or \"every_best\" and "
                        "training.save_model_as_artifact = true, or leave wandb.registry_collection empty")
    _check_output_dir(cfg.training.output_dir, where)
    _check_references_and_patterns(cfg, where)
    columns = (cfg.data.id_column, cfg.data.dialogue_column, cfg.data.summary_column)
    if len(set(columns)) < 3:
        raise UserError(f"{where}: `data.id_column`, `data.dialogue_column` and `data.summary_column` must name "
                        f"three different columns, got {columns}")
    positions = max(model.max_source_length, model.max_target_length)
    if model.from_scratch and cfg.generation.max_new_tokens > positions:
        # The scratch BART has that many positions; generating past them is an IndexError in the embedding.
        raise UserError(f"{where}: `generation.max_new_tokens` ({cfg.generation.max_new_tokens}) must be ≤ the "
                        f"model's positions, max(model.max_source_length, model.max_target_length) = {positions}")
    gen = cfg.generation
    # Beam search divides scores by length ** length_penalty, a Python float that overflows (OverflowError).
    penalty_max = math.floor(math.log(sys.float_info.max) / math.log(gen.max_new_tokens + 1))
    if gen.num_beams > 1 and abs(gen.length_penalty) > penalty_max:
        raise UserError(f"{where}: `generation.length_penalty` must be between -{penalty_max} and "
                        f"{penalty_max} with beam search and generation.max_new_tokens = {gen.max_new_tokens} "
                        f"(length ** length_penalty must fit a float), got {gen.length_penalty!r}")
    for tag in cfg.run_tags():
        if not 1 <= len(tag) <= WANDB_TAG_MAX:
            raise UserError(f"{where}: W&B tag {tag!r} is {len(tag)} characters, W&B takes 1 to {WANDB_TAG_MAX}; "
                            "shorten model.short_name, data.version or wandb.experimenter")


def _check_references_and_patterns(cfg: Config, where: str) -> None:
    """Reference columns: some, each once, not the id or dialogue; clean patterns: regexes that match some text."""
    refs, d = cfg.data.reference_columns, cfg.data
    if not refs:
        raise UserError(f"{where}: `data.reference_columns` must name at least one column, e.g. [\"summary\"]")
    if len(set(refs)) < len(refs):
        raise UserError(f"{where}: `data.reference_columns` names a column twice, got {refs}")
    if clash := [c for c in refs if c in (d.id_column, d.dialogue_column)]:
        raise UserError(f"{where}: `data.reference_columns` must not include the id or dialogue column, got "
                        f"{clash[0]!r}")
    for i, pattern in enumerate(d.clean_patterns):
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise UserError(f"{where}: `data.clean_patterns[{i}]` = {pattern!r} is not a valid regular "
                            f"expression ({err})") from None
        # Such a pattern matches between every two characters; with `*` for `+` it is nearly always a slip.
        if compiled.search("") is not None:
            raise UserError(f"{where}: `data.clean_patterns[{i}]` = {pattern!r} matches the empty string; write "
                            "it so that it matches at least one character (e.g. 'ㅋ+' rather than 'ㅋ*')")


def _check_output_dir(template: str, where: str) -> None:
    """Only plain {name} and {time} fields: a format spec or attribute would be applied to the run name."""
    def bad(why: str) -> UserError:
        return UserError(f"{where}: `training.output_dir` may use only {{name}} and {{time}}, got {template!r} ({why})")

    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as err:  # an unmatched brace
        raise bad(str(err)) from None
    if any(name not in ("name", "time") or spec or conv for name, spec, conv in fields):
        raise bad("no other fields, format specs or conversions; write {{ and }} for literal braces")
    if problem := _path_problem(template.format(name="", time="00000000-000000")):
        raise UserError(f"{where}: `training.output_dir` must be {problem}, got {template!r}")


def reference_table() -> str:
    """Markdown table of every key with its default and help (for the README)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    defaults = Config().to_dict()
    for key in all_keys():
        value: Any = defaults
        for part in key.split("."):
            value = value[part]
        meta = _rules_for(key)
        shown = tomli_w.dumps({"v": value})[4:].strip()
        lines.append(f"| `{key}` | `{shown}` | {meta.get('help', '')} |")
    return "\n".join(lines)
