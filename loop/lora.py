"""LoRA through peft ([model.lora]): only low-rank adapters on frozen weights train and are checkpointed.

peft is optional (`pip install -e '.[lora]'`) and imported only when LoRA is on. A resumable checkpoint holds the
adapters and a fingerprint of the frozen base weights, so a resume refuses a base that is not the one trained on
(a changed model directory, or a from-scratch init that a new torch draws differently). best/ holds the merged
model, which plain `AutoModelForSeq2SeqLM.from_pretrained` loads, and the adapter alone in best/adapter/.
The embedding rows of tokens the loop added to a pretrained tokenizer train too (peft's trainable tokens): frozen,
they would stay at the fresh values the resize gave them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from loop.config import LoraConfig
from loop.errors import UserError

ADAPTER_DIR = "adapter"  # in best/
BASE_FILE = "lora.json"  # in a resumable checkpoint
# The attention query and value projections, per model family (the original LoRA paper's choice).
DEFAULT_TARGETS = {
    "bart": ["q_proj", "v_proj"], "mbart": ["q_proj", "v_proj"], "marian": ["q_proj", "v_proj"],
    "pegasus": ["q_proj", "v_proj"], "t5": ["q", "v"], "mt5": ["q", "v"], "umt5": ["q", "v"],
}  # fmt: skip


def require_peft() -> Any:
    """The peft module, or the one-line error that says how to install it."""
    try:
        import peft
    except ImportError:
        raise UserError("model.lora needs peft: pip install -e '.[lora]'") from None
    return peft


def is_adapted(model: Any) -> bool:
    """Whether `model` (unwrapped) is a peft model; without importing peft, which a full fine-tune never needs."""
    return type(model).__module__.startswith("peft.")


def target_modules(model: Any, lora: LoraConfig) -> list[str]:
    """The configured target modules, or the family's default; each must name at least one linear layer."""
    import torch

    kind = getattr(model.config, "model_type", "")
    names = lora.target_modules or DEFAULT_TARGETS.get(kind)
    if names is None:
        raise UserError(f"`model.lora.target_modules` has no default for model type {kind!r}; name the layers to "
                        "adapt, e.g. [\"q_proj\", \"v_proj\"]")
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for target in names:
        # peft's rule for a list of names: the module's full name is the target or ends in `.target`.
        if not any(name == target or name.endswith(f".{target}") for name in linear):
            leaves = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in linear}))
            raise UserError(f"`model.lora.target_modules`: {target!r} matches no linear layer of this {kind} model "
                            f"(its linear layers are named {leaves})")
    return names


def wrap(model: Any, lora: LoraConfig, new_rows: list[int] | None = None) -> Any:
    """`model` with LoRA adapters on its target modules and the embedding rows `new_rows` trainable (the tokens the
    loop added); every other weight frozen."""
    peft = require_peft()
    # Without added tokens the config is the one it always was: the same trainable parameters, bit for bit.
    tokens = {"trainable_token_indices": token_targets(model, new_rows)} if new_rows else {}
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_2_SEQ_LM, r=lora.r, lora_alpha=lora.alpha,
                             lora_dropout=lora.dropout, target_modules=target_modules(model, lora), **tokens)
    wrapped = peft.get_peft_model(model, config)
    if new_rows:
        if isinstance(tokens["trainable_token_indices"], dict):
            point_aliases_at_wrappers(wrapped.get_base_model())
        _check_token_rows(wrapped)
    return wrapped


def vocab_modules(model: Any) -> dict[str, Any]:
    """The modules that read vocabulary rows in the forward pass (encoder and decoder token embeddings, LM head)."""
    wanted = [getattr(model.get_encoder(), "embed_tokens", None), getattr(model.get_decoder(), "embed_tokens", None),
              model.get_output_embeddings()]
    return {name: module for name, module in model.named_modules() if any(module is w for w in wanted if w is not None)}


def token_targets(model: Any, rows: list[int]) -> list[int] | dict[str, list[int]]:
    """peft's `trainable_token_indices` for `rows`: a list (the input embedding, its tied modules sharing its
    trainable rows), or, when no two vocabulary modules share a weight, the rows of each module by name."""
    modules = vocab_modules(model)
    if len(modules) > 1 and len({id(m.weight) for m in modules.values()}) == len(modules):
        return {name: rows for name in modules}  # untied: peft's list would reach the input embedding only
    return rows


def point_aliases_at_wrappers(base: Any) -> None:
    """Make every other path to a module peft wrapped use the wrapper: peft replaces one attribute, and an untied
    BART resized by transformers reaches its `shared` embedding as encoder.embed_tokens and decoder.embed_tokens."""
    from peft.utils.other import TrainableTokensWrapper

    wrappers = {id(m.original_module): m for m in base.modules() if isinstance(m, TrainableTokensWrapper)}
    for name, module in list(base.named_modules(remove_duplicate=False)):
        if id(module) in wrappers and not name.endswith(".token_adapter.base_layer"):  # not the wrapper's own
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, wrappers[id(module)])


def _check_token_rows(model: Any) -> None:
    """Refuse a model where peft's trainable tokens missed a module that reads the added rows (they would stay
    frozen there, silently): partly tied embeddings that neither of peft's forms covers."""
    from peft.utils.other import TrainableTokensWrapper

    base = model.get_base_model()
    modules = vocab_modules(base)
    missed = [name for name, module in modules.items() if not isinstance(module, TrainableTokensWrapper)]
    # Modules over one weight must train one set of rows (peft ties them), or the export could keep only one.
    rows: dict[int, set[int]] = {}
    for module in modules.values():
        if isinstance(module, TrainableTokensWrapper):
            delta = module.token_adapter.trainable_tokens_delta
            rows.setdefault(id(module.original_module.weight), set()).add(id(delta))
    missed += [f"{len(ids)} copies of one weight" for ids in rows.values() if len(ids) > 1]
    if missed:
        raise UserError(f"model.lora: the embedding rows of the tokens added to the tokenizer cannot train in "
                        f"{', '.join(missed)} of this {base.config.model_type} model (its embeddings are partly "
                        "tied); use a tokenizer that already has data.special_tokens, or full fine-tuning")


def token_rows(model: Any) -> int:
    """How many embedding rows train besides the adapters (the added tokens; 0 when none were added)."""
    indices = next(iter(model.peft_config.values())).trainable_token_indices
    if isinstance(indices, dict):
        indices = next(iter(indices.values()), [])
    return len(indices or [])


def describe(lora: LoraConfig, model: Any) -> dict[str, Any]:
    """The adapter's settings as recorded in checkpoints and W&B (target modules resolved, trainable token rows)."""
    targets = sorted(next(iter(model.peft_config.values())).target_modules)
    return {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": targets,
            "trainable_tokens": token_rows(model)}


def base_fingerprint(model: Any) -> str:
    """sha256 over the frozen weights (names, dtypes, shapes and bytes): what the adapters were trained on."""
    import torch

    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        data = param.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def base_record(lora: LoraConfig, model: Any) -> dict[str, Any]:
    """What a checkpoint's lora.json holds: the adapter's settings and the base weights' fingerprint."""
    return {**describe(lora, model), "base_sha256": base_fingerprint(model)}


def trainable_state(model: Any) -> dict[str, Any]:
    """The parameters that train (the adapters), by name: all a LoRA checkpoint needs of the model."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def check_base(ckpt: Path, record: dict[str, Any]) -> None:
    """Refuse to resume adapters onto frozen weights other than the ones they were trained on, or with another
    number of trainable token rows (`record`: this run's base_record)."""
    try:
        saved = json.loads((ckpt / BASE_FILE).read_text(encoding="utf-8"))
        fingerprint, rows = saved["base_sha256"], saved.get("trainable_tokens", 0)  # absent: written before them
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"--resume {ckpt}: {BASE_FILE} is missing or damaged, so the frozen base weights cannot be "
                        "checked; resume from a checkpoint this loop wrote with model.lora on") from None
    if rows != record["trainable_tokens"]:
        raise UserError(f"--resume {ckpt}: the adapters were trained with {rows} added token rows, this run adds "
                        f"{record['trainable_tokens']} (the tokenizer of model.name_or_path changed); resume with "
                        "the same tokenizer, or start a new run")
    if fingerprint != record["base_sha256"]:
        raise UserError(f"--resume {ckpt}: the frozen base weights differ from the ones the adapters were trained on "
                        "(model.name_or_path changed on disk, or another torch built the from-scratch init); "
                        "resume with the same base model, or start a new run")


def merged_state_dict(model: Any) -> dict[str, Any]:
    """The base model's state dict with every adapter merged into its layer's weight; the model is unchanged.

    Merging in place and unmerging afterwards would round the frozen weights, and training goes on after an
    export: this keeps them bit for bit (exact resume) at the cost of one merged copy per adapted layer.
    """
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import TrainableTokensWrapper

    base = model.get_base_model()
    adapter = model.active_adapter
    merged = {}
    with torch.no_grad():
        for name, tensor in base.state_dict().items():
            if ".lora_" not in name and ".trainable_tokens_" not in name:
                merged[name.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", ".")] = tensor
        # Every path to a module (an untied BART reaches one embedding as shared, encoder and decoder embed_tokens).
        for name, module in base.named_modules(remove_duplicate=False):
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                weight = module.get_base_layer().weight
                merged[f"{name}.weight"] = weight + module.get_delta_weight(adapter).to(weight.dtype)
            elif isinstance(module, TrainableTokensWrapper):
                # The trained rows written into a copy of the embedding: one copy per path (tied ones are equal).
                merged[f"{name}.weight"] = module.token_adapter.get_merged_weights([adapter])
    return merged


def save_best(model: Any, directory: Path, save_function: Any) -> None:
    """The merged model (config, safetensors) into `directory`, and the adapter alone into directory/adapter."""
    model.get_base_model().save_pretrained(directory, state_dict=merged_state_dict(model), save_function=save_function)
    # The adapter holds the adapted layers only: no embedding rows (peft's "auto" would ask the Hub about the base).
    model.save_pretrained(directory / ADAPTER_DIR, safe_serialization=True, save_embedding_layers=False)
