"""A run's result in the team's sharing template (Markdown) with PNG charts, from its offline W&B run."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

from loop.errors import UserError
from loop.wandb_offline import OfflineRun, find_offline_runs, history_series, read_offline_run

ROUGE_KEYS = ("rouge_1", "rouge_2", "rouge_l")
ROUGE_LABELS = {"rouge_1": "ROUGE-1", "rouge_2": "ROUGE-2", "rouge_l": "ROUGE-L"}
CHARTS = {"loss": "loss.png", "rouge": "rouge.png", "best": "best_scores.png"}
_FIGSIZE = (8.0, 4.8)
_DPI = 120


def best_point(series: list[tuple[int, float]], maximize: bool) -> tuple[int, float] | None:
    """The (step, value) with the best value, the earliest on ties (as the trainer keeps it); None if empty."""
    best = None
    for step, value in series:
        if best is None or (value > best[1] if maximize else value < best[1]):
            best = (step, value)
    return best


def format_duration(seconds: float | None) -> str:
    """`H:MM:SS` for a runtime in seconds, `-` when unknown."""
    if seconds is None:
        return "-"
    total = round(seconds)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def run_state(run: OfflineRun) -> str:
    """`finished`, `failed (exit N)`, or `incomplete` for a run killed or still writing."""
    if not run.complete:
        return "incomplete"
    return "finished" if run.exit_code == 0 else f"failed (exit {run.exit_code})"


def merge_launches(launches: list[OfflineRun]) -> OfflineRun:
    """One run from the offline-run-* directories of its launches (each `--resume` writes a new one, same id).

    A resumed launch restarts from a checkpoint, so its rows replace the earlier launches' rows from its first
    step on; runtime is the sum over launches, identity and config are the latest launch's.
    """
    launches = sorted(launches, key=lambda r: (r.start_time or 0.0, r.path.name))
    history: list[dict] = []
    summary: dict = {}
    for launch in launches:
        if launch.history:
            first = min(row["_step"] for row in launch.history)
            history = [row for row in history if row["_step"] < first]
        history += launch.history
        summary.update(launch.summary)
    runtimes = [r.runtime_s for r in launches if r.runtime_s is not None]
    return dataclasses.replace(launches[-1], history=history, summary=summary,
                               artifacts=[a for r in launches for a in r.artifacts],
                               start_time=launches[0].start_time, runtime_s=sum(runtimes) if runtimes else None)


def read_runs(*paths: Path | str) -> list[OfflineRun]:
    """Every offline run under the paths, its launches merged, in order of first start."""
    by_id: dict[str, list[OfflineRun]] = {}
    for run_dir in find_offline_runs(*paths):
        run = read_offline_run(run_dir)
        by_id.setdefault(run.id, []).append(run)
    return [merge_launches(launches) for launches in by_id.values()]


def read_run(path: Path | str) -> OfflineRun:
    """The one run that `path` (a run output directory or an offline-run-* directory) holds."""
    runs = read_runs(path)
    if not runs:
        raise UserError(f"{path}: no offline W&B run here (expected a run output directory with wandb/offline-run-*, "
                        "or an offline-run-* directory)")
    if len(runs) > 1:
        raise UserError(f"{path}: holds {len(runs)} different runs ({', '.join(r.id for r in runs)}); "
                        "pass one run's output directory or offline-run-* directory")
    return runs[0]


def _config_value(config: dict, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _experimenter(tags: list[str]) -> str:
    return next((t.split(":", 1)[1] for t in tags if t.startswith("experimenter:")), "-")


def summarize(run: OfflineRun) -> dict[str, Any]:
    """The template's fields as logged by the run: identity, hyperparameters, best-checkpoint ROUGE, series."""
    metric = _config_value(run.config, "evaluation.metric_for_best_model", "rouge_l")
    maximize = _config_value(run.config, "evaluation.greater_is_better", True)
    series = {key: history_series(run, key) for key in
              ("train/loss", "eval/loss", "train/epoch", *(f"eval/{k}" for k in ROUGE_KEYS))}
    best = best_point(history_series(run, f"eval/{metric}"), maximize)
    if best is None:
        raise UserError(f"{run.path}: no eval/{metric} logged yet; nothing to report")
    best_step = best[0]
    at_best = {k: dict(series[f"eval/{k}"]).get(best_step) for k in ROUGE_KEYS}
    max_steps = _config_value(run.config, "training.max_steps", 0)
    epochs = _config_value(run.config, "training.num_epochs", "-")
    if max_steps and series["train/epoch"]:  # a max_steps run: the fraction of epochs it reached
        epochs = f"{series['train/epoch'][-1][1]:.2f} (max_steps {max_steps})"
    lr = _config_value(run.config, "training.learning_rate")
    batch = _config_value(run.config, "training.batch_size", "-")
    accum = _config_value(run.config, "training.gradient_accumulation_steps", 1)
    started = dt.datetime.fromtimestamp(run.start_time) if run.start_time is not None else None
    return {
        "name": run.name, "id": run.id, "project": run.project, "group": run.group,
        "experimenter": _experimenter(run.tags),
        "date": started.strftime("%Y-%m-%d %H:%M") if started else "-",
        "model": _config_value(run.config, "model.name_or_path", "-"),
        "learning_rate": "-" if lr is None else f"{lr:g}",
        "batch_size": f"{batch} × {accum} accumulation" if accum and accum > 1 else str(batch),
        "epochs": str(epochs),
        "metric": metric, "maximize": maximize, "best_step": best_step, "best": at_best,
        "last_step": max((row["_step"] for row in run.history), default=None),
        "runtime": format_duration(run.runtime_s),
        "rouge_tokenizer": _config_value(run.config, "evaluation.rouge_tokenizer", "-"),
        "state": run_state(run),
        "series": series,
    }


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def render_markdown(info: dict[str, Any]) -> str:
    """The team's result-sharing Markdown, with Key findings and Next steps left to fill in."""
    direction = "higher is better" if info["maximize"] else "lower is better"
    lines = [
        f"# Experiment result: {info['name']}",
        "",
        "| Item | Value |",
        "|---|---|",
        f"| Run ID | `{info['id']}` |",
        f"| Experimenter | {info['experimenter']} |",
        f"| Date | {info['date']} |",
        f"| Model | {info['model']} |",
        f"| Learning rate | {info['learning_rate']} |",
        f"| Batch size | {info['batch_size']} |",
        f"| Epochs | {info['epochs']} |",
        *(f"| Best {ROUGE_LABELS[k]} | {_score(info['best'][k])} |" for k in ROUGE_KEYS),
        f"| Training time | {info['runtime']} (W&B runtime) |",
        "",
        f"Best checkpoint: step {info['best_step']} of {info['last_step']}, chosen on eval/{info['metric']} "
        f"({direction}). ROUGE is F1 on the dev set, {info['rouge_tokenizer']} tokens. "
        f"W&B run `{info['project']}/{info['id']}`, group `{info['group']}`, {info['state']}.",
        "",
        "## Charts",
        "",
        f"![Train vs eval loss]({CHARTS['loss']})",
        "",
        f"![ROUGE over steps]({CHARTS['rouge']})",
        "",
        f"![Best ROUGE scores]({CHARTS['best']})",
        "",
        "## Key findings",
        "",
        "- ",
        "",
        "## Next steps",
        "",
        "- ",
        "",
    ]
    return "\n".join(lines)


def _figure() -> tuple[Any, Any]:
    # A bare Figure renders with Agg and leaves pyplot's global state (and any GUI backend) alone.
    from matplotlib.figure import Figure

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI, layout="constrained")
    return fig, fig.subplots()


def _plot(ax: Any, series: list[tuple[int, float]], label: str, **style: Any) -> None:
    ax.plot([s for s, _ in series], [v for _, v in series], label=label, **style)


def _loss_chart(info: dict[str, Any], path: Path) -> None:
    fig, ax = _figure()
    _plot(ax, info["series"]["train/loss"], "train loss", color="tab:blue")
    _plot(ax, info["series"]["eval/loss"], "eval loss", color="tab:orange", marker="o")
    ax.set(title=f"Train vs eval loss: {info['name']}", xlabel="step (optimizer steps)",
           ylabel="loss (per label token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)


def _rouge_chart(info: dict[str, Any], path: Path) -> None:
    fig, ax = _figure()
    # Distinct widths, markers and dashes keep a series visible when it coincides with another (R-1 = R-L often).
    styles = ({"color": "tab:blue", "marker": "o", "markersize": 9, "linewidth": 3.5},
              {"color": "tab:green", "marker": "s", "linestyle": "--"},
              {"color": "tab:red", "marker": "^", "linestyle": ":", "linewidth": 2})
    for key, style in zip(ROUGE_KEYS, styles, strict=True):
        _plot(ax, info["series"][f"eval/{key}"], ROUGE_LABELS[key], **style)
    ax.axvline(info["best_step"], color="gray", linestyle="--", label=f"best checkpoint (step {info['best_step']})")
    ax.set(title=f"Eval ROUGE F1 over steps: {info['name']}", xlabel="step (optimizer steps)", ylabel="ROUGE F1")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)


def _best_chart(info: dict[str, Any], path: Path) -> None:
    fig, ax = _figure()
    scores = [info["best"][k] or 0.0 for k in ROUGE_KEYS]
    bars = ax.bar([ROUGE_LABELS[k] for k in ROUGE_KEYS], scores, color=["tab:blue", "tab:green", "tab:red"])
    ax.bar_label(bars, labels=[_score(info["best"][k]) for k in ROUGE_KEYS], padding=3)
    ax.set_ylim(0, max(max(scores) * 1.2, 0.05))
    ax.set(title=f"Best checkpoint (step {info['best_step']}) ROUGE F1: {info['name']}", ylabel="ROUGE F1")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def draw_charts(info: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Loss over steps, ROUGE over steps and the best-checkpoint ROUGE bars as PNGs in out_dir."""
    paths = {key: out_dir / file for key, file in CHARTS.items()}
    _loss_chart(info, paths["loss"])
    _rouge_chart(info, paths["rouge"])
    _best_chart(info, paths["best"])
    return paths


def write_report(run_path: Path | str, out_dir: Path | str | None = None) -> tuple[Path, dict[str, Path]]:
    """Write report.md and the charts for one run (default out_dir: RUN/report); returns their paths."""
    run = read_run(run_path)
    info = summarize(run)
    out = Path(out_dir) if out_dir is not None else Path(run_path) / "report"
    out.mkdir(parents=True, exist_ok=True)
    charts = draw_charts(info, out)
    markdown = out / "report.md"
    markdown.write_text(render_markdown(info), encoding="utf-8")
    return markdown, charts
