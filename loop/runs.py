"""Review runs: `python -m loop.runs compare|report|record|sync`.

compare: which run is best on a metric, its config, and what differs from the others (offline runs from their
files, or a project's runs through wandb.Api). report: the team's result Markdown and charts for one run.
record: a leaderboard score against a run (loop/submissions.py). sync: upload offline runs with `wandb sync`,
after checking for an API key and a reachable server, then make their registry links and push their scores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loop.errors import ArgumentParser, UserError, run_cli
from loop.registry import link_pending, read_pending_link
from loop.report import best_point, format_duration, offline_run_dirs, reached_step, read_runs, run_state
from loop.submissions import LEADERBOARD, best_score, push_pending, read_entries
from loop.submissions import record as record_score
from loop.wandb_offline import history_series

DEFAULT_PATHS = ["outputs"]  # where train.py's default output_dir puts runs
# Column label -> dotted config key, for the key hyperparameters shown per run.
HYPERPARAMETERS = {
    "lr": "training.learning_rate", "batch": "training.batch_size", "accum": "training.gradient_accumulation_steps",
    "epochs": "training.num_epochs", "max_steps": "training.max_steps", "warmup": "training.warmup_ratio",
    "weight_decay": "training.weight_decay",
}  # fmt: skip


@dataclass
class RunSummary:
    """One run as compare shows it, from an offline run file or the W&B API."""

    id: str
    name: str
    group: str
    tags: list[str]
    state: str
    location: str
    steps: int | None
    best_value: float | None
    best_step: int | None
    runtime_s: float | None
    config: dict[str, Any] = field(repr=False)
    lb: float | None = None  # the highest leaderboard score recorded for the run

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The key hyperparameters (HYPERPARAMETERS) from the flattened config."""
        return {label: self.config.get(key) for label, key in HYPERPARAMETERS.items()}


def maximizes(metric: str) -> bool:
    """Loss metrics are minimised, everything else (ROUGE) maximised."""
    return "loss" not in metric.rsplit("/", 1)[-1]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config to dotted keys; W&B's own `_`-prefixed keys are dropped."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def offline_summaries(paths: list[str], metric: str) -> list[RunSummary]:
    """Every offline run under the paths, with the best value of `metric` in its history."""
    runs = read_runs(*paths)  # a path without runs is already an error there
    summaries = []
    for run in runs:
        best = best_point(history_series(run, metric), maximizes(metric))
        summaries.append(RunSummary(
            id=run.id, name=run.name, group=run.group, tags=run.tags, state=run_state(run), location=str(run.path),
            steps=reached_step(run),
            best_value=best[1] if best else None, best_step=best[0] if best else None,
            runtime_s=run.runtime_s, config=flatten(run.config), lb=best_score(_output_dir_of(run.path))))
    if all(s.best_value is None for s in summaries):
        numeric = {k for run in runs for row in run.history for k, v in row.items() if isinstance(v, (int, float))}
        logged = sorted(k for k in numeric if not k.startswith("_"))
        raise UserError(f"no run logged {metric}; numeric keys logged: {', '.join(logged) or 'none'}")
    return summaries


def require_wandb_server() -> None:
    """Check that an API key is configured and the W&B server answers; else a one-line UserError."""
    from loop.registry import server_problem

    problem = server_problem()
    if problem is None:
        return
    if problem.startswith("no W&B API key"):
        problem += " (offline runs can be compared from their directories: python -m loop.runs compare DIR)"
    raise UserError(problem)


def online_summaries(project: str, metric: str) -> list[RunSummary]:
    """A W&B project's runs through wandb.Api, with the best value of `metric` in each full history."""
    if project.count("/") > 1 or not all(project.split("/")):
        raise UserError(f"--project {project!r}: expected entity/project or project")
    require_wandb_server()
    import requests
    import wandb

    try:
        api = wandb.Api(timeout=30)
        summaries = []
        for run in api.runs(project):
            series = [(int(row["_step"]), float(row[metric])) for row in run.scan_history(keys=["_step", metric])
                      if isinstance(row.get(metric), (int, float))]
            best = best_point(series, maximizes(metric))
            summary = dict(run.summary)
            summaries.append(RunSummary(
                id=run.id, name=run.name, group=run.group or "", tags=list(run.tags), state=run.state,
                location=run.url, steps=summary.get("_step"),
                best_value=best[1] if best else None, best_step=best[0] if best else None,
                runtime_s=summary.get("_runtime"), config=flatten(dict(run.config)), lb=summary.get("lb_best")))
    except (wandb.errors.Error, requests.RequestException, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--project {project}: {first}") from None
    if not summaries:
        raise UserError(f"--project {project}: no runs")
    return summaries


def pick_best(runs: list[RunSummary], maximize: bool) -> RunSummary | None:
    """The run with the best metric value (the first listed on ties); None when no run logged it."""
    scored = [r for r in runs if r.best_value is not None]
    if not scored:
        return None
    return (max if maximize else min)(scored, key=lambda r: r.best_value)


def differing_keys(runs: list[RunSummary]) -> dict[str, dict[str, Any]]:
    """Config keys whose values are not the same in every run: {key: {run id: value}} (None when absent)."""
    keys = sorted({k for r in runs for k in r.config})
    diffs = {}
    for key in keys:
        values = {r.id: r.config.get(key) for r in runs}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            diffs[key] = values
    return diffs


def _show(value: Any) -> str:
    """A value as a TOML literal (so the printed config reads back with --config), `-` when absent."""
    return "-" if value is None else json.dumps(value, ensure_ascii=False)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in (headers, *rows))


def _length(h: dict[str, Any]) -> str:
    if h["max_steps"]:
        return f"{h['max_steps']} steps"
    return "-" if h["epochs"] is None else f"{h['epochs']} epochs"


def _batch(h: dict[str, Any]) -> str:
    return _show(h["batch"]) + (f"x{h['accum']}" if h["accum"] and h["accum"] > 1 else "")


def render_comparison(runs: list[RunSummary], best: RunSummary | None, metric: str) -> str:
    """The runs table (best marked *), the best run's config and the config keys that differ."""
    goal = "higher is better" if maximizes(metric) else "lower is better"
    headers = ["", "name", "id", "group", "tags", "steps", f"best {metric}", "at step", "lb", "lr", "batch", "length",
               "warmup", "weight_decay", "runtime", "state"]
    rows = []
    for r in runs:
        h = r.hyperparameters
        rows.append(["*" if r is best else "", r.name, r.id, r.group, ",".join(r.tags), _show(r.steps),
                     "-" if r.best_value is None else f"{r.best_value:.4f}", _show(r.best_step),
                     "-" if r.lb is None else f"{r.lb:g}", _show(h["lr"]),
                     _batch(h), _length(h), _show(h["warmup"]), _show(h["weight_decay"]),
                     format_duration(r.runtime_s), r.state])
    out = [f"{len(runs)} run(s); metric {metric} ({goal}); * = best; lb = best leaderboard score recorded",
           "", _table(headers, rows)]
    if best is None:
        return "\n".join(out)
    out += ["", f"best: {best.name} ({best.id}) {metric} = {best.best_value:.4f} at step {best.best_step}",
            f"  {best.location}", "", f"config of {best.id}:"]
    out += [f"  {key} = {_show(value)}" for key, value in sorted(best.config.items())]
    diffs = differing_keys(runs)
    if len(runs) > 1:
        out += ["", "config keys that differ:" if diffs else "config keys that differ: none"]
    if diffs:
        others = [r for r in runs if r is not best]
        head = ["  key", f"*{best.id}", *(r.id for r in others)]
        out.append(_table(head, [[f"  {k}", _show(v[best.id]), *(_show(v[r.id]) for r in others)]
                                 for k, v in diffs.items()]))
    return "\n".join(out)


def compare(args: argparse.Namespace) -> int:
    """The `compare` subcommand."""
    if args.project and args.paths:
        raise UserError("give either run directories or --project, not both")
    if args.project:
        runs = online_summaries(args.project, args.metric)
    else:
        runs = offline_summaries(args.paths or DEFAULT_PATHS, args.metric)
    best = pick_best(runs, maximizes(args.metric))
    if args.json:
        print(json.dumps({
            "metric": args.metric, "goal": "max" if maximizes(args.metric) else "min",
            "best": best.id if best else None,
            "runs": [{**asdict(r), "hyperparameters": r.hyperparameters} for r in runs],
            "differences": differing_keys(runs),
        }, indent=2, ensure_ascii=False))
    else:
        print(render_comparison(runs, best, args.metric))
    return 0


def report(args: argparse.Namespace) -> int:
    """The `report` subcommand."""
    from loop.report import write_report

    markdown, charts = write_report(args.run, args.out, args.lang)
    print(f"wrote {markdown}")
    for path in charts.values():
        print(f"wrote {path}")
    return 0


def record(args: argparse.Namespace) -> int:
    """The `record` subcommand: the score into RUN/leaderboard.json, and into W&B where it can go now."""
    out_dir = Path(args.run)
    entry = record_score(out_dir, args.lb, Path(args.submission) if args.submission else None, args.note)
    print(f"recorded lb {entry['lb']:g} in {out_dir / LEADERBOARD}")
    problem = push_pending(out_dir)
    if problem is not None:
        print(f"note: only the local record was written: {problem}")
    return 0


def _output_dir_of(run_dir: Path) -> Path | None:
    """The training run's output directory holding an offline-run-* directory, if it is one."""
    out = run_dir.parent.parent
    return out if run_dir.parent.name == "wandb" and (out / "config.toml").is_file() else None


def _after_upload(out_dir: Path) -> list[str]:
    """The registry link and the leaderboard scores that waited for the run's upload; why any did not go."""
    return [problem for problem in (link_pending(out_dir), push_pending(out_dir)) if problem is not None]


def _synced(run_dir: Path) -> bool:
    # `wandb sync` leaves run-<id>.wandb.synced next to a run it uploaded.
    return any(run_dir.glob("*.wandb.synced"))


def _sync_error(output: str) -> str:
    """The first error message wandb sync printed, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line.split("ERROR", 1)[1].strip() for line in lines if "ERROR" in line]
    return next((e for e in errors if e), lines[-1] if lines else "nothing uploaded")


def _run_sync(run_dir: Path, timeout: float) -> str | None:
    """Run `wandb sync` on one run; None when it uploaded, else why not."""
    # Its own process group, so a timeout also ends the wandb-core helper it starts; not silent, so that
    # its error messages can be reported.
    proc = subprocess.Popen([sys.executable, "-m", "wandb", "sync", str(run_dir)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "WANDB_SILENT": "false"})
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return f"wandb sync timed out after {timeout:g} s"
    # wandb sync exits 0 even when the upload failed: only its marker file says the run arrived.
    return None if _synced(run_dir) else _sync_error(output)


def sync(args: argparse.Namespace) -> int:
    """The `sync` subcommand: 0 when every pending run uploaded, 1 when one failed."""
    if not 0 < args.timeout < math.inf:  # nan and inf too: subprocess cannot wait for those
        raise UserError(f"--timeout must be a number of seconds > 0, got {args.timeout:g}")
    paths = args.paths or DEFAULT_PATHS
    run_dirs = offline_run_dirs(paths)  # oldest first: a resumed run's launches upload in order
    pending = [d for d in run_dirs if not _synced(d)]
    for d in run_dirs:
        if d not in pending:
            print(f"already synced: {d}")
    outputs = list(dict.fromkeys(out for d in run_dirs if (out := _output_dir_of(d)) is not None))
    waiting = [out for out in outputs if read_pending_link(out) or any(not e.get("pushed") for e in read_entries(out))]
    if not pending and not waiting:
        return 0
    require_wandb_server()
    failed = 0
    for d in pending:
        problem = _run_sync(d, args.timeout)
        print(f"synced: {d}" if problem is None else f"failed: {d}: {problem}", flush=True)
        failed += problem is not None
    if pending:
        print(f"{len(pending) - failed} of {len(pending)} run(s) synced")
    # A run whose launches are not all uploaded keeps its link and scores for the next sync.
    for out in waiting:
        if all(_synced(d) for d in run_dirs if _output_dir_of(d) == out):
            for problem in _after_upload(out):
                print(f"failed: {problem}", flush=True)
                failed += 1
    return 1 if failed else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    common = ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p = ArgumentParser(prog="python -m loop.runs", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compare", parents=[common], help="table of runs, the best one, its config and what differs")
    c.add_argument("paths", nargs="*", help=f"directories holding offline runs (default: {DEFAULT_PATHS[0]})")
    c.add_argument("--project", help="entity/project: compare the project's runs through the W&B API instead")
    c.add_argument("--metric", default="eval/rouge_l", help="history key to rank by; *loss is minimised "
                                                            "(default: eval/rouge_l)")
    c.add_argument("--json", action="store_true", help="print JSON instead of tables")
    c.set_defaults(func=compare)

    r = sub.add_parser("report", parents=[common], help="result Markdown and PNG charts for one run")
    r.add_argument("run", help="a run output directory or its offline-run-* directory")
    r.add_argument("--out", help="output directory (default: RUN/report)")
    r.add_argument("--lang", choices=("ko", "en"), default="ko",
                   help="ko = the team guide's Korean template (default), en = the English one")
    r.set_defaults(func=report)

    rec = sub.add_parser("record", parents=[common], help="record a leaderboard score against a run")
    rec.add_argument("run", help="the run output directory the submission came from")
    rec.add_argument("--lb", type=float, required=True, help="the public leaderboard score, e.g. 47.86")
    rec.add_argument("--submission", help="the submission CSV that got the score (logged as an artifact online)")
    rec.add_argument("--note", default="", help="free text, e.g. the decoding settings used")
    rec.set_defaults(func=record)

    s = sub.add_parser("sync", parents=[common], help="upload offline runs with `wandb sync`")
    s.add_argument("paths", nargs="*", help=f"directories holding offline runs (default: {DEFAULT_PATHS[0]})")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per run (default: 600)")
    s.set_defaults(func=sync)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand."""
    args = parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
