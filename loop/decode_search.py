"""Tune decoding on a trained model: `python -m loop.decode_search --model RUN/best --data dev.csv --sweep FILE`.

The search space is a W&B sweep file (configs/decode.toml) whose parameters are generation.* keys only; nothing
is trained. Optuna drives the search (grid, random or bayes), resumable from OUTPUT/optuna.db by running the same
command again. Every setting summarizes every row of --data and is scored with the run's ROUGE (its tokenizer,
reference columns and aggregation), as training's eval scores dev. Each batch is encoded once and its encoder
output reused by every setting (--no-encoder-reuse turns that off). The model's own decoding is scored first, as
the baseline. Writes results.md/results.csv (best first), best_generation.toml and generation_config.json in
OUTPUT (default RUN/decode_search/), and one W&B run (job type decode-search, the model's run group) with a
Table of every setting. Also runs as `accelerate launch loop/decode_search.py ...`: each process summarizes every
num_processes-th batch, as predict does.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

if __package__ in (None, ""):  # run as a script (`accelerate launch loop/decode_search.py`): make `loop` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loop.config import Config, load_config
from loop.data import read_examples
from loop.errors import ArgumentParser, UserError, run_cli
from loop.predict import length_sorted_batches, load_member, load_settings, resolve_model_dir, settings_base
from loop.sweep_spec import DECODE_METRICS, SweepSpec, load_sweep, override

SCORES = ("rouge_1", "rouge_2", "rouge_l", "rouge_mean")
GENERATION_KEYS = ("num_beams", "length_penalty", "no_repeat_ngram_size", "repetition_penalty", "min_new_tokens",
                   "max_new_tokens")
BASELINE = "model's own"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    p = ArgumentParser(prog="python -m loop.decode_search", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a run's best/ directory (or the run directory holding it)")
    p.add_argument("--data", required=True, help="CSV or JSONL with references (e.g. dev.csv) to score on")
    p.add_argument("--sweep", required=True, help="W&B sweep file of generation.* parameters (configs/decode.toml)")
    p.add_argument("--count", type=int, help="settings this invocation tries (default: run_cap, or the whole grid)")
    p.add_argument("--output", help="directory for results, optuna.db and W&B (default: RUN/decode_search)")
    p.add_argument("--batch-size", type=int, default=32, help="dialogues per generate() call per process")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override generation.*, data.id_column, data.dialogue_column or model.max_source_length "
                        "for every setting (as in predict)")
    p.add_argument("--no-encoder-reuse", dest="encoder_reuse", action="store_false",
                   help="run the encoder again for every setting (to measure what reusing it saves)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    if args.count is not None and args.count < 1:
        raise UserError(f"--count must be ≥ 1, got {args.count}")
    return args


@dataclass
class Search:
    """What every setting of one search shares: the spec, the settings it starts from, where results go."""

    spec: SweepSpec
    config: Path | None  # the run's config.toml (None: a model directory outside its run)
    overrides: list[str]  # rebuild the model's settings, then the user's --set
    base: Config
    directory: Path

    def settings(self, values: dict[str, Any]) -> Config:
        """The config for one setting: the model's, with the file's constants and the setting's values."""
        items = [override(k, v) for k, v in {**self.spec.constants, **values}.items()]
        return load_config(self.config, [*self.overrides, *items])


def output_dir(raw: str | None, model_dir: Path) -> Path:
    """The --output directory (default RUN/decode_search), created; a file in the way or no permission is one
    line."""
    from loop.sweep import make_output_dir

    return make_output_dir(Path(raw) if raw else model_dir.parent / "decode_search", "--output", "the search")


def identity(model_dir: Path, data: Path) -> str:
    """Hash of what makes settings comparable beyond the spec and config: the model weights' file and the rows."""
    digest = hashlib.sha256(data.read_bytes())
    for weights in sorted(model_dir.glob("*.safetensors")):
        stat = weights.stat()
        digest.update(f"{weights.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def score(predictions: list[str], rows: list[dict[str, Any]], cfg: Config, tokenizer: Any) -> dict[str, float]:
    """ROUGE as training's eval computes it, and the mean summary length in model tokens."""
    from loop.evaluation import dev_rouge

    rouge, _ = dev_rouge(predictions, rows, cfg)
    lengths = [len(ids) for ids in tokenizer(predictions, add_special_tokens=False)["input_ids"]]
    return {**{k: getattr(rouge, k) for k in SCORES}, "gen_len": sum(lengths) / max(len(lengths), 1)}


def main(argv: list[str] | None = None) -> int:
    """Search decoding settings on --data, score each, and write the results and the best settings."""
    args = parse_args(argv)
    model_dir = resolve_model_dir(args.model)
    cfg, source = load_settings(model_dir, args.set)  # refuses --set outside what prediction may change
    config, base_items, _ = settings_base(model_dir)
    overrides = [*base_items, *args.set]
    spec = load_sweep(args.sweep, config, tuple(overrides), metrics=DECODE_METRICS, section="generation",
                      logged_by="loop/decode_search.py scores for each setting")
    if args.count is None and spec.run_cap is None and spec.method != "grid":
        raise UserError(f"{spec.path}: a {spec.method} search never runs out of settings: pass --count N "
                        "or set run_cap in the sweep file")
    data = Path(args.data)
    rows = read_examples(data, cfg.data, require_summary=True, references=True)
    directory = output_dir(args.output, model_dir)
    search = Search(spec, config, overrides, cfg, directory)

    from accelerate import Accelerator

    from loop.console import quiet_libraries
    from loop.rouge import get_tokenizer

    get_tokenizer(cfg.evaluation.rouge_tokenizer).tokenize("요약")  # a missing python-mecab-ko is said now
    quiet_libraries()
    mode, why = wandb_mode(cfg)
    accelerator = Accelerator(log_with=None if mode == "disabled" else "wandb")
    member = load_member(model_dir, cfg, source, [r["dialogue"] for r in rows])
    member.model.to(accelerator.device).eval()
    batches = length_sorted_batches([len(ids) for ids in member.inputs], args.batch_size)
    runner = Runner(accelerator, member, batches[accelerator.process_index :: accelerator.num_processes], rows,
                    {} if args.encoder_reuse else None)
    study = open_search(search, identity(model_dir, data)) if accelerator.is_main_process else None
    accelerator.print(f"decode search: {spec.method} over {', '.join(p.name for p in spec.searched)} for "
                      f"{spec.metric} on {len(rows)} rows of {data} with {model_dir}, {accelerator.num_processes} "
                      f"process(es), encoder output {'reused' if args.encoder_reuse else 'recomputed'} per setting")
    if member.cut:
        accelerator.print(f"warning: {member.cut} of {len(rows)} dialogues are longer than {member.max_len} "
                          "tokens; truncated")
    return run_search(accelerator, search, study, runner, args.count, data, model_dir, len(rows), mode, why)


class Runner:
    """Summarize this process's batches with one generation config; the main process gets every row, in order."""

    def __init__(self, accelerator: Any, member: Any, batches: list[list[int]], rows: list[dict[str, Any]],
                 encoded: dict[tuple[int, ...], Any] | None):
        self.accelerator, self.member, self.batches, self.rows, self.encoded = (accelerator, member, batches,
                                                                                rows, encoded)

    def __call__(self, cfg: Config, label: str) -> tuple[dict[str, float] | None, float]:
        """(scores on the main process, else None; seconds) for one setting."""
        from accelerate.utils import gather_object

        from loop.evaluation import generation_config
        from loop.predict import generate

        m = self.member
        start = time.perf_counter()
        mine = generate(self.accelerator, m.model, m.tokenizer, m.inputs, self.batches,
                        generation_config(m.model, cfg), label, self.encoded, cfg.training.attention_backend)
        by_row = dict(gather_object(mine))
        seconds = time.perf_counter() - start
        if not self.accelerator.is_main_process:
            return None, seconds
        return score([by_row[i] for i in range(len(self.rows))], self.rows, cfg, m.tokenizer), seconds


def open_search(search: Search, ident: str) -> Any:
    """The Optuna study in the output directory (sweep.py's storage), refusing one made for other model or data."""
    from loop.sweep import Sweep, open_study, requeue_interrupted

    sweep = Sweep(search.spec, str(search.config) if search.config else None, search.overrides, search.base,
                  search.directory)
    storage, study = open_study(sweep)
    known = study.user_attrs.get("identity")
    if known is None:
        study.set_user_attr("identity", ident)
    elif known != ident:
        raise UserError(f"{search.directory}: this search was started with other model weights or another --data "
                        "file; restore them, or start a new search with --output NEW_DIR")
    requeue_interrupted(storage, study)
    return study


def run_search(accelerator: Any, search: Search, study: Any, runner: Runner, count: int | None, data: Path,
               model_dir: Path, n_rows: int, mode: str, why: str) -> int:
    """Score the baseline once, then each setting Optuna proposes; write the results even when interrupted.

    The main process runs the study; each proposal is broadcast so that every process summarizes its batches.
    """
    from accelerate.utils import broadcast_object_list

    from loop.sweep import raise_keyboard_interrupt, trials_to_run

    spec = search.spec
    plan: list[Any] = [None]
    if accelerator.is_main_process:
        plan = [(*trials_to_run(study, spec, count), "baseline" not in study.user_attrs)]
    todo, limit, need_baseline = broadcast_object_list(plan)[0]
    accelerator.print(f"{todo} setting(s) to try (limit: {limit}); results in {search.directory}")
    tracker = Tracker(accelerator, search, data, model_dir, mode, why)
    interrupted = False
    start = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        if need_baseline:
            scores, seconds = runner(search.base, BASELINE)
            if scores is not None:
                study.set_user_attr("baseline", {**scores, "seconds": seconds})
                tracker.log(0, scores, seconds, search.base)
                accelerator.print(f"{BASELINE}: {_describe(spec, search.base)}: {_scores(scores)} ({seconds:.1f} s)")
        if accelerator.is_main_process:
            if todo:
                import optuna

                optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per setting is printed below
                study.optimize(_objective(accelerator, search, runner, tracker), n_trials=todo,
                               catch=(SettingRefused,))
            broadcast_object_list([None])  # the other processes stop waiting for settings
        else:
            while (proposal := broadcast_object_list([None])[0]) is not None:
                number, values = proposal
                runner(search.settings(values), f"setting-{number:03d}")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        if accelerator.is_main_process:
            rows = table_rows(study, search)
            accelerator.print(f"{todo} setting(s) in {time.perf_counter() - start:.1f} s")
            write_outputs(search, rows, runner.member.model, data, model_dir, n_rows)
            tracker.finish(rows, _header(spec))
        tracker.end()
    if interrupted:
        accelerator.print("interrupted: run the same command again to resume (the interrupted setting runs again)")
        return 130
    return 0


class SettingRefused(Exception):
    """The config refuses a combination of values (min_new_tokens above max_new_tokens); the search goes on."""


def _objective(accelerator: Any, search: Search, runner: Runner, tracker: Tracker) -> Any:
    """Optuna's objective on the main process: one setting, scored on every row by all processes."""
    from accelerate.utils import broadcast_object_list
    from optuna.trial import TrialState

    from loop.sweep import suggest

    spec = search.spec

    def objective(trial: Any) -> float:
        # What requeue_interrupted reads to tell a dead search's setting from one still running.
        trial.set_user_attr("agent", [socket.gethostname(), os.getpid()])
        values = {p.key: suggest(trial, p, spec.method == "grid") for p in spec.searched}
        label = f"setting-{trial.number:03d}"
        try:
            cfg = search.settings(values)
        except UserError as err:  # each value valid, not together
            trial.set_user_attr("error", str(err))
            accelerator.print(f"{label}: refused: {err}")
            raise SettingRefused(str(err)) from None
        for done in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if done.params == values and "same_as" not in done.user_attrs:
                # bayes and random repeat categorical settings: the score is known.
                trial.set_user_attr("same_as", done.number)
                accelerator.print(f"{label}: the same as setting-{done.number:03d}; not generated again")
                return done.value
        broadcast_object_list([(trial.number, values)])
        try:
            scores, seconds = runner(cfg, label)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)  # queued again by the next run (sweep.requeue_interrupted)
            raise
        trial.set_user_attr("scores", scores)
        trial.set_user_attr("seconds", seconds)
        tracker.log(trial.number + 1, scores, seconds, cfg)
        accelerator.print(f"{label}: {_describe(spec, cfg)}: {_scores(scores)} ({seconds:.1f} s)")
        return scores[spec.metric_key]

    return objective


def _describe(spec: SweepSpec, cfg: Config) -> str:
    return " ".join(f"{p.name}={_leaf(cfg, p.key):g}" if isinstance(_leaf(cfg, p.key), float)
                    else f"{p.name}={_leaf(cfg, p.key)}" for p in spec.searched)


def _leaf(cfg: Config, key: str) -> Any:
    return getattr(cfg.generation, key.split(".", 1)[1])


def _scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {scores[k]:.4f}" for k in SCORES)


@dataclass
class Row:
    """One line of the results table: a scored setting (or the baseline), or one the config refused."""

    setting: str
    cfg: Config | None
    values: dict[str, Any]  # searched key -> value
    scores: dict[str, float] | None
    seconds: float | None
    note: str = ""


def table_rows(study: Any, search: Search) -> list[Row]:
    """Every distinct setting of the study, best first by the search metric, then the refused ones."""
    from optuna.trial import TrialState

    spec = search.spec
    rows = []
    baseline = study.user_attrs.get("baseline")
    if baseline is not None:
        rows.append(Row(BASELINE, search.base, {p.key: _leaf(search.base, p.key) for p in spec.searched},
                        {k: baseline[k] for k in (*SCORES, "gen_len")}, baseline["seconds"],
                        "the decoding the model was trained with"))
    for t in study.get_trials(deepcopy=False):
        label = f"setting-{t.number:03d}"
        if t.state == TrialState.COMPLETE and "same_as" not in t.user_attrs:
            rows.append(Row(label, search.settings(dict(t.params)), dict(t.params), t.user_attrs["scores"],
                            t.user_attrs["seconds"]))
        elif "error" in t.user_attrs:
            rows.append(Row(label, None, dict(t.params), None, None, f"refused: {t.user_attrs['error']}"))
    key = spec.metric_key
    return sorted(rows, key=lambda r: (r.scores is None, -(r.scores or {}).get(key, 0.0)))


def _header(spec: SweepSpec) -> list[str]:
    return ["rank", "setting", *(p.name for p in spec.searched), *SCORES, "gen_len", "seconds", "note"]


def _cells(rows: list[Row], spec: SweepSpec) -> list[list[Any]]:
    cells = []
    for rank, r in enumerate(rows, 1):
        scores = r.scores or {}
        cells.append([rank if r.scores else None, r.setting, *(r.values.get(p.key) for p in spec.searched),
                      *(scores.get(k) for k in (*SCORES, "gen_len")), r.seconds, r.note])
    return cells


def write_outputs(search: Search, rows: list[Row], model: Any, data: Path, model_dir: Path, n_rows: int) -> None:
    """results.md/.csv, and the best setting as best_generation.toml and generation_config.json."""
    from loop.evaluation import generation_config
    from loop.sweep import write_atomic, write_results

    spec = search.spec
    title = f"decode search: {spec.method} search for {spec.metric} on {data} ({n_rows} rows) with {model_dir}"
    note = (f"ROUGE F1 ({search.base.evaluation.rouge_tokenizer} tokens, references "
            f"{', '.join(search.base.data.reference_columns)} combined by {search.base.evaluation.rouge_aggregate}); "
            "gen_len: mean summary length in model tokens; seconds: time to summarize every row with the setting; "
            "best first.")
    write_results(search.directory, title, note, _header(spec), _cells(rows, spec))
    best = next((r for r in rows if r.scores is not None), None)
    if best is None or best.cfg is None:
        return
    baseline = next((r for r in rows if r.setting == BASELINE), None)
    values = {k: getattr(best.cfg.generation, k) for k in GENERATION_KEYS}
    items = " ".join(f"--set {override(f'generation.{k}', v)}" for k, v in values.items())
    than = f" (the model's own decoding: {baseline.scores[spec.metric_key]:.4f})" if baseline else ""
    header = (f"# The best decoding found by {spec.method} search on {data} ({n_rows} rows) with {model_dir}:\n"
              f"# {best.setting}, {spec.metric} {best.scores[spec.metric_key]:.4f}{than}.\n"
              f"# predict with it:  python -m loop.predict --model {model_dir} --input test.csv "
              f"--output submission.csv {items}\n"
              "# train with it: the same --set items on loop/train.py, or this [generation] table in its --config.\n")
    write_atomic(search.directory / "best_generation.toml", header + tomli_w.dumps({"generation": values}))
    gen = generation_config(model, best.cfg)
    tmp = search.directory / f".generation_config.json.tmp-{os.getpid()}"
    try:
        gen.to_json_file(tmp)
        os.replace(tmp, search.directory / "generation_config.json")
    finally:
        tmp.unlink(missing_ok=True)
    print(f"best: {best.setting}, {spec.metric} {best.scores[spec.metric_key]:.4f}{than}; written to "
          f"{search.directory / 'best_generation.toml'} and {search.directory / 'generation_config.json'}; "
          f"predict with: {items}", flush=True)


def wandb_mode(cfg: Config) -> tuple[str, str]:
    """The W&B mode for the search's run and why: online needs a key and a server that answers (as a sweep)."""
    from loop.sweep import choose_mode
    from loop.tracking import resolve_mode

    mode = resolve_mode(cfg.wandb.mode)
    if mode == "online":
        return choose_mode(None)
    return mode, f"wandb.mode = {cfg.wandb.mode!r}" + (f", WANDB_MODE={os.environ['WANDB_MODE']}"
                                                       if os.environ.get("WANDB_MODE") else "")


class Tracker:
    """The search's W&B run: one history row per setting, the results as a Table, the best in the summary."""

    def __init__(self, accelerator: Any, search: Search, data: Path, model_dir: Path, mode: str, why: str):
        from loop.tracking import init_tracking, wandb_run

        self.accelerator, self.spec, self.mode = accelerator, search.spec, mode
        self.run = None
        if mode == "disabled":
            accelerator.print("W&B: disabled")
            return
        cfg = copy.deepcopy(search.base)
        cfg.wandb.group = search.base.run_group()  # the model's run group
        cfg.wandb.name = f"{search.base.run_name()}-decode-search"
        cfg.wandb.job_type = "decode-search"
        mode = init_tracking(accelerator, cfg, search.directory, mode)
        self.run = wandb_run(accelerator)
        accelerator.print(f"W&B: {mode} ({why})")
        if self.run is not None:
            self.run.config.update({"decode_search": {"sweep": search.spec.to_wandb(), "data": str(data),
                                                      "model": str(model_dir)}}, allow_val_change=True)

    def log(self, step: int, scores: dict[str, float], seconds: float, cfg: Config) -> None:
        """One setting's scores, time and decoding at `step` (0: the baseline, n + 1: setting n)."""
        from loop.tracking import log

        if self.run is None:
            return
        values = {f"eval/{k}": v for k, v in scores.items()}
        values.update({"decode/seconds": seconds, **{f"generation/{k}": getattr(cfg.generation, k)
                                                     for k in GENERATION_KEYS}})
        log(self.accelerator, values, step)

    def finish(self, rows: list[Row], header: list[str]) -> None:
        """The whole results table (every invocation so far) and the best setting in the summary."""
        from loop.tracking import never_fatal

        if self.run is None:
            return
        never_fatal("decode search table")(self._finish)(rows, header)

    def _finish(self, rows: list[Row], header: list[str]) -> None:
        import wandb

        table = wandb.Table(columns=header, data=_cells(rows, self.spec), allow_mixed_types=True)
        self.run.log({"decode_search/results": table})
        best = next((r for r in rows if r.scores is not None), None)
        if best is not None and best.cfg is not None:
            self.run.summary.update({f"best/{k}": v for k, v in best.scores.items()})
            self.run.summary.update({"best/setting": best.setting, **{f"best/generation.{k}":
                                     getattr(best.cfg.generation, k) for k in GENERATION_KEYS}})
        baseline = next((r for r in rows if r.setting == BASELINE), None)
        if baseline is not None:
            self.run.summary.update({f"baseline/{k}": v for k, v in baseline.scores.items()})

    def end(self) -> None:
        """End the run (and flush its offline file)."""
        from loop.tracking import end, run_location

        if self.run is not None:
            self.accelerator.print(run_location(self.run, self.mode))
        end(self.accelerator, self.run)


if __name__ == "__main__":
    sys.exit(run_cli(main))
