"""Shared test setup: offline W&B and caches in temporary directories, and a helper to run the trainer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A tiny model and dataset: every run of the real trainer in the tests finishes in seconds.
TINY = [
    "data.synthetic_train_rows=160", "data.synthetic_dev_rows=12",
    "model.scratch.d_model=32", "model.scratch.ffn_dim=64", "model.scratch.vocab_size=400",
    "model.max_source_length=128", "model.max_target_length=48", "generation.max_new_tokens=24",
    "training.batch_size=16", "evaluation.eval_batch_size=8", "wandb.table_rows=4",
]


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """W&B offline with every directory under a temp dir; datasets cache too."""
    base = tmp_path_factory.mktemp("env")
    env = {
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(base / "wandb"),
        "WANDB_DATA_DIR": str(base / "wandb-data"), "WANDB_CACHE_DIR": str(base / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(base / "wandb-config"), "HF_DATASETS_CACHE": str(base / "hf-datasets"),
        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A BPE tokenizer trained on 200 synthetic dialogues, with the speaker and mask tokens."""
    from loop.synthetic import MASK_TOKENS, SPEAKER_TOKENS, generate_rows
    from loop.tokenizer_train import train_tokenizer

    rows = generate_rows(200, seed=1)
    texts = [r["dialogue"] for r in rows] + [r["summary"] for r in rows]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=600,
                           extra_special_tokens=[*SPEAKER_TOKENS, *MASK_TOKENS])


def finished_run(tmp_path_factory, name: str, *overrides: str) -> Path:
    """The working directory of a completed tiny run with the given overrides (for module-scoped fixtures)."""
    cwd = tmp_path_factory.mktemp(name)
    proc = run_train(cwd, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd


def train_command(*overrides: str, launch: bool = False, config: str | None = None,
                  extra_args: tuple[str, ...] = ()) -> list[str]:
    """The command line of loop/train.py (optionally under `accelerate launch`) with TINY plus overrides."""
    args = [str(ROOT / "loop/train.py")]
    if config:
        args += ["--config", config]
    for item in (*TINY, *overrides):
        args += ["--set", item]
    args += extra_args
    if launch:
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    return [sys.executable, *args]


def train_env(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a trainer subprocess: the test env plus the repo on PYTHONPATH."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}


def run_train(cwd: Path, *overrides: str, launch: bool = False, config: str | None = None,
              extra_env: dict[str, str] | None = None, extra_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the trainer to completion with the tiny settings plus overrides."""
    cmd = train_command(*overrides, launch=launch, config=config, extra_args=extra_args)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=train_env(extra_env), timeout=600)


@pytest.fixture(scope="session")
def final_best_run(tmp_path_factory) -> dict:
    """The output directory ("out") and stdout of one run under wandb.model_artifacts = "final_best" with a TTL
    and a registry collection, trained on easy data so that later evals beat the first (several new bests)."""
    from tests.test_runs import write_order_data

    root = tmp_path_factory.mktemp("final_best")
    write_order_data(root / "train.csv", 96, seed=0)
    write_order_data(root / "dev.csv", 8, seed=1)
    proc = run_train(root, "data.synthetic=false", "data.train_file=train.csv", "data.dev_file=dev.csv",
                     "training.max_steps=8", "evaluation.eval_steps=4", "evaluation.logging_steps=4",
                     "evaluation.save_steps=100", "training.warmup_ratio=0", "training.learning_rate=0.03",
                     "training.output_dir=run", "evaluation.print_samples=0", "wandb.model_artifacts=final_best",
                     "wandb.artifact_ttl_days=7", "wandb.registry_collection=dialogsum-kobart")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": root / "run", "stdout": proc.stdout}


def tiny_seq2seq(family: str, vocab: int = 120, layers: int = 1, dropout: float = 0.0) -> Any:
    """A tiny BART or T5 built from a config (seeded), for tests that need a model but no tokenizer."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if family == "bart":
        return BartForConditionalGeneration(BartConfig(
            vocab_size=vocab, d_model=16, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
            dropout=dropout, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2))
    return T5ForConditionalGeneration(T5Config(
        vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=layers, num_decoder_layers=layers, num_heads=2,
        dropout_rate=dropout, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
