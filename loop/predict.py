"""Write a submission file: `python -m loop.predict --model RUN/best --input test.csv --output submission.csv`.

Also runs as `accelerate launch loop/predict.py ...`: each process generates every num_processes-th batch of the
length-sorted inputs, the main process gathers the summaries by row index and writes `fname,summary` in input
order. The settings that shape the inputs and the decoding are the ones the model was exported with
(best/loop_config.toml; for an older best/, RUN/config.toml, else best/generation_config.json), changed with
--set generation.KEY=VALUE and the few other keys in SETTABLE.

With several --model, every model summarizes every row and the row gets the candidate the other models agree
with most (loop/consensus.py); --choices records which model won each row and every candidate's score.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

if __package__ in (None, ""):  # run as a script (`accelerate launch loop/predict.py`): make `loop` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loop.config import Config, load_config
from loop.data import read_examples
from loop.errors import EXIT_USER_ERROR, ArgumentParser, UserError, run_cli

OUTPUT_COLUMNS = ("fname", "summary")
# --choices: then one consensus score per model, score_0 .. score_{K-1}.
CHOICE_COLUMNS = ("fname", "model_index", "model_path")
# What --set may change at prediction time; everything else about the model was fixed by training.
SETTABLE = ("generation.", "data.id_column", "data.dialogue_column", "model.max_source_length", "model.source_prefix",
            "data.source_lang", "data.target_lang")
_GENERATION_KEYS = ("num_beams", "max_new_tokens", "no_repeat_ngram_size", "length_penalty", "repetition_penalty",
                    "min_new_tokens")
# save_pretrained always writes it; what a model directory must hold for its own tokenizer to load.
TOKENIZER_CONFIG = "tokenizer_config.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    p = ArgumentParser(prog="python -m loop.predict", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, action="append",
                   help="a run's best/ directory (or the run directory holding it), or a W&B reference "
                        "(entity/project/model-<id>:best, wandb-registry-model/<collection>:best); give it several "
                        "times for a consensus of models (each row gets the summary the other models agree with most)")
    p.add_argument("--input", required=True, help="CSV or JSONL with columns fname, dialogue (summary not needed)")
    p.add_argument("--output", required=True, help="CSV to write: fname,summary in input order")
    p.add_argument("--choices", metavar="CSV",
                   help="also write, per row, the winning model (index and path) and each model's consensus score")
    p.add_argument("--batch-size", type=int, default=32, help="dialogues per generate() call per process")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override generation.*, data.id_column, data.dialogue_column, model.max_source_length, "
                        "model.source_prefix, data.source_lang or data.target_lang (the model's own are in its "
                        "loop_config.toml; an older best/ copied away from its run has only its decoding settings "
                        "and languages)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    return args


def resolve_model_dir(path: str | Path) -> Path:
    """The saved model directory: `path` itself, `path/best` when given a run directory, or the download of a
    W&B artifact or registry reference (loop/registry.py)."""
    from loop import registry

    if registry.is_reference(str(path)):
        path = registry.download_model(str(path))
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: model directory not found (expected RUN/best from a training run)")
    if not path.is_dir():
        raise UserError(f"{path}: is a file; pass the model directory (a run's best/)")
    for candidate in (path, path / "best"):
        if (candidate / "config.json").is_file():
            # Without it transformers quietly builds an empty or different tokenizer: empty or wrong summaries.
            if not (candidate / TOKENIZER_CONFIG).is_file():
                raise UserError(f"{candidate}: no tokenizer ({TOKENIZER_CONFIG} is missing); the model directory "
                                "must hold the tokenizer the model was trained with, as a run's best/ does")
            return candidate
    if (path / "trainer_state.json").is_file():
        raise UserError(f"{path}: a resumable checkpoint (for --resume), not an exported model; "
                        f"pass the run's best/ directory ({path.parent.parent / 'best'})")
    if (path / "config.toml").is_file():
        raise UserError(f"{path}: this run has no best/ model yet (it is exported at the run's first eval)")
    raise UserError(f"{path}: not a saved model (no config.json); pass a run's best/ directory")


def resolve_model_dirs(paths: list[str]) -> list[Path]:
    """Each --model's saved model directory, refusing one model given twice (it would vote twice)."""
    dirs = [resolve_model_dir(path) for path in paths]
    seen: dict[Path, int] = {}
    for k, model_dir in enumerate(dirs):
        first = seen.setdefault(model_dir.resolve(), k)
        if first != k:
            raise UserError(f"--model {paths[k]}: the same model as --model {paths[first]} (model {first}); "
                            "give each model once")
    return dirs


def settings_base(model_dir: Path) -> tuple[Path | None, list[str], str]:
    """(config file, --set items) that rebuild the model's settings before any override, and their source.

    In order: best/loop_config.toml (what the model was exported with, wherever best/ now is), the run's
    config.toml next to an older best/, else generation_config.json and the tokenizer's languages only.
    """
    from loop.model_settings import saved_settings

    if (saved := saved_settings(model_dir)) is not None:
        # Read only to refuse damage: transformers would quietly replace a damaged generation_config.json.
        saved_generation(model_dir, ["model.from_scratch=false", "model.tokenizer="])
        path, pinned = saved
        return path, pinned, str(path)
    run_config = model_dir.parent / "config.toml"
    if run_config.is_file():
        return run_config, [], str(run_config)
    # An older best/ (no loop_config.toml) copied away from its run: only the decoding settings and languages are
    # known. A pretrained model, not the demo's from-scratch defaults
    # (whose position limits would refuse a KoBART generation_config).
    base: list[str] = ["model.from_scratch=false", "model.tokenizer=", f"model.name_or_path={model_dir}",
                       *saved_languages(model_dir)]
    return None, [*base, *saved_generation(model_dir, base)], str(model_dir / "generation_config.json")


def saved_generation(model_dir: Path, base: list[str]) -> list[str]:
    """generation_config.json's decoding settings as --set items ([] without the file), checked on top of `base`."""
    from transformers import GenerationConfig

    source = model_dir / "generation_config.json"
    if not source.is_file():
        return []
    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise UserError(f"{source}: cannot read it: {first_line(err)}") from None
    items = [f"generation.{k}={getattr(gen, k)!r}" for k in _GENERATION_KEYS if getattr(gen, k) is not None]
    if gen.cache_implementation == "static":
        items.append("generation.cache=static")
    try:
        load_config(None, [*base, *items])
    except UserError as err:  # the file's values, not the user's --set, are wrong
        raise UserError(f"{source}: {str(err).removeprefix('--set: ')}") from None
    return items


def load_settings(model_dir: Path, overrides: list[str]) -> tuple[Config, str]:
    """The run's config with the overrides applied, and where its [generation] came from."""
    config, base, source = settings_base(model_dir)
    cfg = load_config(config, [*base, *overrides])
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith(SETTABLE):
            raise UserError(f"--set {key}: prediction can change only generation.*, data.id_column, "
                            "data.dialogue_column, model.max_source_length, model.source_prefix, data.source_lang "
                            "and data.target_lang")
    return cfg, source


def saved_languages(model_dir: Path) -> list[str]:
    """An mBART model directory's languages, as its tokenizer saved them, as data.source_lang/target_lang overrides.

    The run set them on the tokenizer before saving it, so a best/ copied away from its run still knows them.
    """
    from loop.families import family_of

    try:
        model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type", "")
        saved = json.loads((model_dir / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, AttributeError):
        return []  # loading the model or the tokenizer then says what is wrong, in one line
    if family_of(model_type) != "mbart":
        return []
    return [f"data.{key}={saved[name]}" for name, key in (("src_lang", "source_lang"), ("tgt_lang", "target_lang"))
            if isinstance(saved.get(name), str) and saved[name]]


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar length, longest first (less padding; out-of-memory shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def write_csv_atomic(path: Path, rows: list[tuple[Any, ...]], header: tuple[str, ...] = OUTPUT_COLUMNS) -> None:
    """Write `header` and `rows` (default `fname,summary`) to a temp file next to `path`, then rename it over it."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(buffer.getvalue(), encoding="utf-8", newline="")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_lfs_pointer(path: Path) -> bool:
    # A clone without `git lfs pull` holds a small text file where the weights should be.
    try:
        with path.open("rb") as f:
            return f.read(24).startswith(b"version https://git-lfs")
    except OSError:
        return False


def _load_model(model_dir: Path) -> tuple[Any, Any]:
    from safetensors import SafetensorError
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    except SafetensorError as err:
        weights = model_dir / "model.safetensors"
        why = ("a Git LFS pointer, not the weights (git lfs pull)" if _is_lfs_pointer(weights)
               else f"damaged or truncated ({err})")
        raise UserError(f"{weights}: {why}") from None
    except RuntimeError as err:
        # transformers logs the per-tensor report (silenced) and raises a one-line summary of it.
        why = "its tensor shapes do not match config.json" if "mismatched" in str(err) else first_line(err)
        raise UserError(f"{model_dir}: cannot load the model: {why}") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{model_dir}: cannot load the model: {first_line(err)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{model_dir}: cannot load the tokenizer: {first_line(err).rstrip(' :')}") from None
    return model, tokenizer


def check_tokenizer(model_dir: Path, model: Any, tokenizer: Any, tokens: list[list[int]]) -> None:
    """Refuse a tokenizer that does not belong to the model, before anything is generated."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserError(f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but the model only {rows} "
                        "embeddings: tokenizer and weights come from different models")
    if all(all(t == tokenizer.unk_token_id for t in ids) for ids in tokens):
        raise UserError(f"{model_dir}: the tokenizer turns every dialogue into no tokens or only unknown ones; "
                        "it is not the tokenizer the model was trained with")


def check_paths(output: str | Path, source: Path, flag: str = "--output") -> Path:
    """The file `flag` names, once it is known to be writable, not a directory and not the input file."""
    raw = str(output)
    output = Path(output)
    if output.is_dir():
        raise UserError(f"{flag} {raw}: is a directory; name the CSV file to write")
    # Path() drops a trailing slash: `--output subs/` would otherwise write a file named `subs`.
    if raw.endswith(("/", os.sep)):
        raise UserError(f"{flag} {raw}: ends in a slash, which names a directory; name the CSV file to write")
    if output.resolve() == source.resolve() or (output.exists() and source.exists()
                                                  and os.path.samefile(output, source)):
        raise UserError(f"{flag} {raw}: is the input file; choose another name")
    parent = output.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist; create it first"
        raise UserError(f"{flag} {raw}: {parent} {what}")
    # Found now, not after an hour of generation: a file can be created there.
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".probe", dir=parent)
    except OSError as err:
        raise UserError(f"{flag} {raw}: cannot write in {parent}: {err.strerror or err}") from None
    os.close(fd)
    os.unlink(probe)
    return output


def generate(accelerator: Any, model: Any, tokenizer: Any, inputs: list[list[int]], batches: list[list[int]],
             gen_cfg: Any, desc: str = "predicting", encoded: dict[tuple[int, ...], Any] | None = None,
             attention_backend: str = "auto") -> list[tuple[int, str]]:
    """(row index, summary) for the rows in `batches`, each batch right-padded to its longest dialogue.

    With `encoded` (a dict kept across calls), each batch's encoder output is computed once, stored there under
    the batch's row indices, and handed to generate() on later calls instead of running the encoder again.
    """
    import torch
    from tqdm.auto import tqdm

    from loop.attention import decoding
    from loop.evaluation import decode

    results: list[tuple[int, str]] = []
    pad = tokenizer.pad_token_id
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not accelerator.is_main_process):
        width = max(len(inputs[i]) for i in batch)
        input_ids = torch.tensor([inputs[i] + [pad] * (width - len(inputs[i])) for i in batch])
        mask = torch.tensor([[1] * len(inputs[i]) + [0] * (width - len(inputs[i])) for i in batch])
        input_ids, mask = input_ids.to(accelerator.device), mask.to(accelerator.device)
        # autocast: accelerate launch --mixed_precision
        with torch.inference_mode(), accelerator.autocast(), decoding(attention_backend, accelerator.device.type):
            if encoded is None:
                out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen_cfg)
            else:
                key = tuple(batch)
                if key not in encoded:
                    encoded[key] = model.get_encoder()(input_ids=input_ids, attention_mask=mask,
                                                       return_dict=True).last_hidden_state
                out = model.generate(encoder_outputs=_encoder_output(encoded[key]), attention_mask=mask,
                                     generation_config=gen_cfg)
        results.extend(zip(batch, decode(tokenizer, out), strict=True))
    return results


def _encoder_output(hidden: Any) -> Any:
    from transformers.modeling_outputs import BaseModelOutput

    # A new wrapper every call: generate() replaces the tensors inside it with copies expanded for the beams.
    return BaseModelOutput(last_hidden_state=hidden)


class Member(NamedTuple):
    """One --model, loaded and checked: what it needs to summarize every row."""

    model_dir: Path
    model: Any
    tokenizer: Any
    gen_cfg: Any
    inputs: list[list[int]]  # each row's input ids formatted for the model's family, cut to max_len
    cut: int  # rows longer than max_len
    max_len: int
    settings: str  # the generation settings and where they came from, for the start-up line


def load_member(model_dir: Path, cfg: Config, gen_source: str, dialogues: list[str]) -> Member:
    """Load one model and its tokenizer, check they belong together, and encode every dialogue with them."""
    from loop.evaluation import generation_config
    from loop.families import formatter

    model, tokenizer = _load_model(model_dir)
    # The run's own formatting (family, source prefix, language codes), as in training and eval.
    fmt = formatter(model.config, tokenizer, cfg)
    fmt.configure(model)
    gen_cfg = generation_config(model, cfg)
    max_len = min(cfg.model.max_source_length, getattr(model.config, "max_position_embeddings", None) or sys.maxsize)
    plain = tokenizer(dialogues, add_special_tokens=False)["input_ids"]
    check_tokenizer(model_dir, model, tokenizer, plain)  # on the dialogues alone: a known prefix hides nothing
    # Without a prefix the formatted tokens are these same ones: tokenize the inputs only once.
    tokens = fmt.source_tokens(tokenizer, dialogues) if fmt.source_prefix else plain
    inputs = [fmt.source(ids, max_len) for ids in tokens]
    settings = " ".join(f"{k}={getattr(gen_cfg, k)}" for k in _GENERATION_KEYS) + f" (from {gen_source})"
    return Member(model_dir, model, tokenizer, gen_cfg, inputs,
                  sum(len(ids) + fmt.source_specials > max_len for ids in tokens), max_len, settings)


def check_choices(choices: str, source: Path, output: Path) -> Path:
    """The --choices file: writable like --output, and not the --output file itself."""
    path = check_paths(choices, source, flag="--choices")
    if path.resolve() == output.resolve() or (path.exists() and output.exists() and os.path.samefile(path, output)):
        raise UserError(f"--choices {choices}: is the --output file; choose another name")
    return path


def write_outputs(accelerator: Any, rows: list[dict[str, Any]], candidates: list[dict[int, str]],
                  rouge_tokenizer: str, output: Path, choices: Path | None, model_dirs: list[Path]) -> None:
    """On the main process: the consensus pick per row, then --output (and --choices) written atomically."""
    from loop.consensus import choose

    picks = [choose([by_row[i] for by_row in candidates], rouge_tokenizer) for i in range(len(rows))]
    summaries = [(rows[i]["id"], candidates[k][i]) for i, (k, _) in enumerate(picks)]
    try:
        write_csv_atomic(output, summaries)
    except OSError as err:  # the directory went away or filled up while generating
        raise UserError(f"--output {output}: cannot write: {err.strerror or err}; nothing written") from None
    accelerator.print(f"wrote {len(rows)} summaries to {output}")
    if len(model_dirs) > 1:
        wins = [sum(k == j for k, _ in picks) for j in range(len(model_dirs))]
        accelerator.print("chosen: " + ", ".join(f"model {j} on {n} rows" for j, n in enumerate(wins)))
    if choices is not None:
        header = (*CHOICE_COLUMNS, *(f"score_{j}" for j in range(len(model_dirs))))
        try:
            write_csv_atomic(choices, [(rows[i]["id"], k, str(model_dirs[k]), *scores)
                                       for i, (k, scores) in enumerate(picks)], header=header)
        except OSError as err:
            raise UserError(f"--choices {choices}: cannot write: {err.strerror or err}; "
                            f"the summaries are in {output}") from None
        accelerator.print(f"wrote the choice for each of {len(rows)} rows to {choices}")
    if empty := sum(not summary.strip() for _, summary in summaries):
        accelerator.print(f"warning: {empty} of {len(rows)} summaries are empty (the model generated "
                          "only special tokens)")


def main(argv: list[str] | None = None) -> int:
    """Generate a summary for every input row (by consensus when several models) and write them in input order."""
    args = parse_args(argv)
    source = Path(args.input)
    output = check_paths(args.output, source)
    choices = check_choices(args.choices, source, output) if args.choices is not None else None
    model_dirs = resolve_model_dirs(args.model)
    settings = [load_settings(model_dir, args.set) for model_dir in model_dirs]
    cfg = settings[0][0]  # the input's columns and the consensus's ROUGE tokenizer come from the first model's run
    rows = read_examples(source, cfg.data, require_summary=False)  # all checks before the model loads

    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, gather_object

    from loop.consensus import RULE
    from loop.console import quiet_libraries
    from loop.rouge import get_tokenizer

    rouge_tokenizer = cfg.evaluation.rouge_tokenizer
    if len(model_dirs) > 1:
        get_tokenizer(rouge_tokenizer).tokenize("요약")  # a missing python-mecab-ko is said now, not after generating

    quiet_libraries()
    accelerator = Accelerator()
    dialogues = [r["dialogue"] for r in rows]
    # Every model loads and passes its checks before any of them generates.
    members = [load_member(model_dir, model_cfg, gen_source, dialogues)
               for model_dir, (model_cfg, gen_source) in zip(model_dirs, settings, strict=True)]
    if len(members) == 1:
        accelerator.print(f"predict: {len(rows)} dialogues from {source} with {model_dirs[0]} on "
                          f"{accelerator.num_processes} process(es); {members[0].settings}")
    else:
        accelerator.print(f"predict: {len(rows)} dialogues from {source} with {len(members)} models on "
                          f"{accelerator.num_processes} process(es)")
        for k, member in enumerate(members):
            accelerator.print(f"model {k}: {member.model_dir}; {member.settings}")
        accelerator.print(f"consensus: {RULE.format(tokenizer=rouge_tokenizer)}")
    for k, member in enumerate(members):
        if member.cut:
            which = "" if len(members) == 1 else f"model {k}: "
            accelerator.print(f"warning: {which}{member.cut} of {len(rows)} dialogues are longer than "
                              f"{member.max_len} tokens; truncated")

    candidates: list[dict[int, str]] = []  # per model: row index -> its summary
    for k, member in enumerate(members):
        member.model.to(accelerator.device).eval()
        # Every num_processes-th batch, so that each process gets long and short ones alike.
        batches = length_sorted_batches([len(ids) for ids in member.inputs], args.batch_size)
        mine = batches[accelerator.process_index :: accelerator.num_processes]
        desc = "predicting" if len(members) == 1 else f"model {k}"
        candidates.append(dict(gather_object(generate(accelerator, member.model, member.tokenizer, member.inputs,
                                                      mine, member.gen_cfg, desc,
                                                      attention_backend=settings[k][0].training.attention_backend))))
        if k + 1 < len(members):
            member.model.to("cpu")  # one model on the accelerator at a time
    failure = [None]
    if accelerator.is_main_process:
        try:
            write_outputs(accelerator, rows, candidates, rouge_tokenizer, output, choices, model_dirs)
        except UserError as err:
            failure = [str(err)]
    if accelerator.num_processes > 1:  # the others learn of a failed write instead of waiting for the main one
        failure = broadcast_object_list(failure)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if failure[0] is not None:
        if accelerator.is_main_process:
            raise UserError(failure[0])
        return EXIT_USER_ERROR  # one error line, from the main process
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
