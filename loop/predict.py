"""Write a submission file: `python -m loop.predict --model RUN/best --input test.csv --output submission.csv`.

Also runs as `accelerate launch loop/predict.py ...`: each process generates every num_processes-th batch of the
length-sorted inputs, the main process gathers the summaries by row index and writes `fname,summary` in input
order. Decoding settings are the run's [generation] section (RUN/config.toml, else best/generation_config.json),
changed with --set generation.KEY=VALUE.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (`accelerate launch loop/predict.py`): make `loop` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loop.config import Config, load_config
from loop.data import read_examples, with_bos_eos
from loop.errors import UserError, run_cli

OUTPUT_COLUMNS = ("fname", "summary")
# What --set may change at prediction time; everything else about the model was fixed by training.
SETTABLE = ("generation.", "data.id_column", "data.dialogue_column", "model.max_source_length")
_GENERATION_KEYS = ("num_beams", "max_new_tokens", "no_repeat_ngram_size", "length_penalty")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m loop.predict", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a run's best/ directory (or the run directory holding it)")
    p.add_argument("--input", required=True, help="CSV or JSONL with columns fname, dialogue (summary not needed)")
    p.add_argument("--output", required=True, help="CSV to write: fname,summary in input order")
    p.add_argument("--batch-size", type=int, default=32, help="dialogues per generate() call per process")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override generation.*, data.id_column, data.dialogue_column or model.max_source_length")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    return args


def resolve_model_dir(path: str | Path) -> Path:
    """The saved model directory: `path` itself, or `path/best` when given a run directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: model directory not found (expected RUN/best from a training run)")
    for candidate in (path, path / "best"):
        if (candidate / "config.json").is_file():
            return candidate
    raise UserError(f"{path}: not a saved model (no config.json); pass a run's best/ directory")


def load_settings(model_dir: Path, overrides: list[str]) -> tuple[Config, str]:
    """The run's config with the overrides applied, and where its [generation] came from."""
    run_config = model_dir.parent / "config.toml"
    if run_config.is_file():
        cfg, source = load_config(run_config, overrides), str(run_config)
    else:
        from transformers import GenerationConfig

        base: list[str] = []
        if (model_dir / "generation_config.json").is_file():
            gen = GenerationConfig.from_pretrained(model_dir)
            base = [f"generation.{k}={getattr(gen, k)!r}" for k in _GENERATION_KEYS if getattr(gen, k) is not None]
        cfg, source = load_config(None, [*base, *overrides]), str(model_dir / "generation_config.json")
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith(SETTABLE):
            raise UserError(f"--set {key}: prediction can change only generation.*, data.id_column, "
                            "data.dialogue_column and model.max_source_length")
    return cfg, source


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar length, longest first (less padding; out-of-memory shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def write_csv_atomic(path: Path, rows: list[tuple[str, str]]) -> None:
    """Write `fname,summary` rows to a temp file next to `path`, then rename it over `path`."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(OUTPUT_COLUMNS)
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(buffer.getvalue(), encoding="utf-8", newline="")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_model(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        return AutoModelForSeq2SeqLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{model_dir}: cannot load the model: {first}") from None


def check_paths(output: Path, source: Path) -> None:
    """Refuse outputs that would overwrite the input or cannot be a file."""
    if output.is_dir():
        raise UserError(f"--output {output}: is a directory; name the CSV file to write")
    if output.resolve() == source.resolve():
        raise UserError(f"--output {output}: is the input file; choose another name")


def generate(accelerator: Any, model: Any, tokenizer: Any, inputs: list[list[int]], batches: list[list[int]],
             gen_cfg: Any) -> list[tuple[int, str]]:
    """(row index, summary) for the rows in `batches`, each batch right-padded to its longest dialogue."""
    import torch
    from tqdm.auto import tqdm

    from loop.evaluation import decode

    results: list[tuple[int, str]] = []
    pad = tokenizer.pad_token_id
    for batch in tqdm(batches, desc="predicting", unit="batch", disable=not accelerator.is_main_process):
        width = max(len(inputs[i]) for i in batch)
        input_ids = torch.tensor([inputs[i] + [pad] * (width - len(inputs[i])) for i in batch])
        mask = torch.tensor([[1] * len(inputs[i]) + [0] * (width - len(inputs[i])) for i in batch])
        with torch.inference_mode(), accelerator.autocast():  # autocast: accelerate launch --mixed_precision
            out = model.generate(input_ids=input_ids.to(accelerator.device),
                                 attention_mask=mask.to(accelerator.device), generation_config=gen_cfg)
        results.extend(zip(batch, decode(tokenizer, out), strict=True))
    return results


def main(argv: list[str] | None = None) -> int:
    """Generate a summary for every input row and write `fname,summary` in input order."""
    args = parse_args(argv)
    output, source = Path(args.output), Path(args.input)
    check_paths(output, source)
    model_dir = resolve_model_dir(args.model)
    cfg, gen_source = load_settings(model_dir, args.set)
    rows = read_examples(source, cfg.data, require_summary=False)  # all checks before the model loads

    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from loop.console import quiet_libraries
    from loop.evaluation import generation_config

    quiet_libraries()
    accelerator = Accelerator()
    model, tokenizer = _load_model(model_dir)
    model.to(accelerator.device).eval()
    gen_cfg = generation_config(model, cfg)
    max_len = min(cfg.model.max_source_length, getattr(model.config, "max_position_embeddings", None) or sys.maxsize)
    tokens = tokenizer([r["dialogue"] for r in rows], add_special_tokens=False)["input_ids"]
    inputs = [with_bos_eos(ids, tokenizer.bos_token_id, tokenizer.eos_token_id, max_len) for ids in tokens]
    settings = " ".join(f"{k}={getattr(gen_cfg, k)}" for k in _GENERATION_KEYS)
    accelerator.print(f"predict: {len(rows)} dialogues from {source} with {model_dir} on "
                      f"{accelerator.num_processes} process(es); {settings} (from {gen_source})")
    if cut := sum(len(ids) + 2 > max_len for ids in tokens):
        accelerator.print(f"warning: {cut} of {len(rows)} dialogues are longer than {max_len} tokens; truncated")

    # Every num_processes-th batch, so that each process gets long and short ones alike.
    batches = length_sorted_batches([len(ids) for ids in inputs], args.batch_size)
    mine = batches[accelerator.process_index :: accelerator.num_processes]
    results = gather_object(generate(accelerator, model, tokenizer, inputs, mine, gen_cfg))
    if accelerator.is_main_process:
        by_index = dict(results)
        write_csv_atomic(output, [(rows[i]["id"], by_index[i]) for i in range(len(rows))])
        accelerator.print(f"wrote {len(rows)} summaries to {output}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
