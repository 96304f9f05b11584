"""A run's result in the team's sharing template (Markdown) with PNG charts, from its offline W&B run."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from pathlib import Path
from typing import Any

from loop.errors import UserError
from loop.wandb_offline import OfflineRun, find_offline_runs, history_series, read_offline_run

ROUGE_KEYS = ("rouge_1", "rouge_2", "rouge_l")
ROUGE_LABELS = {"rouge_1": "ROUGE-1", "rouge_2": "ROUGE-2", "rouge_l": "ROUGE-L"}
CHARTS = {"loss": "loss.png", "rouge": "rouge.png", "best": "best_scores.png"}
# Sections of the config loop/train.py logs (no hand-made run has all of them).
LOOP_SECTIONS = {"model", "data", "training", "evaluation", "generation", "wandb"}
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


def run_output_dir(run: OfflineRun) -> Path | None:
    """The training run's output directory when the offline run sits in its wandb/ (it holds config.toml)."""
    out = run.path.parent.parent
    return out if run.path.parent.name == "wandb" and (out / "config.toml").is_file() else None


def _trained_here(run: OfflineRun) -> bool:
    """True for a run that loop/train.py logged: its config has all of the loop's sections."""
    return set(run.config) >= LOOP_SECTIONS


def _finished(run: OfflineRun) -> bool:
    """True once the trainer reached its end: only then does it log final/* and write final_metrics.json."""
    out = run_output_dir(run)
    if out is not None:
        return (out / "final_metrics.json").is_file()
    return any(key.startswith("final/") for row in run.history for key in row)


def reached_step(run: OfflineRun) -> int | None:
    """The last step the run got to: its newest checkpoint (a stop saves one) or its last logged row."""
    steps = [row["_step"] for row in run.history]
    out = run_output_dir(run)
    if out is not None:
        steps += [int(p.name[5:]) for p in (out / "checkpoints").glob("step_*") if p.name[5:].isdigit()]
    return max(steps, default=None)


def run_state(run: OfflineRun) -> str:
    """`finished`, `stopped` (ended early, resumable), `failed (exit N)`, or `incomplete` (killed or running)."""
    if not run.complete:
        return "incomplete"
    if run.exit_code != 0:
        return f"failed (exit {run.exit_code})"
    # SIGTERM makes the trainer save and exit 0 before its last step: W&B calls that run finished too.
    if _trained_here(run) and not _finished(run):
        return "stopped"
    return "finished"


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
    for run_dir in offline_run_dirs(list(paths)):
        run = read_offline_run(run_dir)
        by_id.setdefault(run.id, []).append(run)
    return [merge_launches(launches) for launches in by_id.values()]


def enclosing_run_dir(path: Path) -> Path | None:
    """The run output directory that `path` (its best/, a checkpoint, ...) lies inside, if any."""
    for parent in list(path.resolve().parents)[:3]:
        if (parent / "config.toml").is_file() and any((parent / "wandb").glob("offline-run-*")):
            return parent
    return None


def _where_runs_are(path: Path) -> str:
    inside = enclosing_run_dir(path)
    if inside is not None:
        return f"; it is inside the run directory {inside}: pass that"
    return (" (expected a run output directory with wandb/offline-run-*, an offline-run-* directory, or a "
            "directory of runs)")


def offline_run_dirs(paths: list[str] | list[Path]) -> list[Path]:
    """find_offline_runs, where a path that holds no run is an error (a typo must not drop runs silently)."""
    found: dict[Path, Path] = {}
    for raw in paths:
        run_dirs = find_offline_runs(raw)
        if not run_dirs:
            path = Path(raw)
            raise UserError(f"{path}: no offline W&B runs (offline-run-* directories) under it{_where_runs_are(path)}")
        for run_dir in run_dirs:
            found.setdefault(run_dir.resolve(), run_dir)
    # As find_offline_runs orders them: by directory name, which starts with the start time.
    return sorted(found.values(), key=lambda p: (p.name, str(p)))


def read_run(path: Path | str) -> OfflineRun:
    """The one run that `path` (a run output directory, an offline-run-* directory or its .wandb file) holds."""
    path = Path(path)
    if path.is_file() and path.suffix == ".wandb":
        path = path.parent
    if path.exists() and not find_offline_runs(path):
        raise UserError(f"{path}: no offline W&B run here{_where_runs_are(path)}")
    runs = read_runs(path)
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


def _epochs(config: dict, epoch_series: list[tuple[int, float]], state: str, reached: int | None) -> str:
    """The epochs the run trained: as planned for a finished run, else how far it got and why it ended."""
    max_steps = _config_value(config, "training.max_steps", 0)
    planned = _config_value(config, "training.num_epochs", "-")
    if state == "finished":
        if max_steps and epoch_series:  # a max_steps run: the fraction of epochs it reached
            return f"{epoch_series[-1][1]:.2f} (max_steps {max_steps})"
        return str(planned)
    plan = f"max_steps {max_steps}" if max_steps else f"of {planned} planned"
    ended = f"{state} at step {reached}"
    if not epoch_series or not epoch_series[-1][0] or reached is None:
        return f"unknown ({plan}; {ended}, before train/epoch was first logged)"
    # The epoch grows in proportion to the step (a fixed number of batches per step): scale the last
    # logged value to the step the run reached after it.
    step, epoch = epoch_series[-1]
    return f"{epoch * reached / step:.2f} ({plan}; {ended})"


def summarize(run: OfflineRun) -> dict[str, Any]:
    """The template's fields as logged by the run: identity, hyperparameters, best-checkpoint ROUGE, series."""
    metric = _config_value(run.config, "evaluation.metric_for_best_model", "rouge_l")
    maximize = _config_value(run.config, "evaluation.greater_is_better", True)
    series = {key: history_series(run, key) for key in
              ("train/loss", "eval/loss", "train/epoch", *(f"eval/{k}" for k in ROUGE_KEYS))}
    best = best_point(history_series(run, f"eval/{metric}"), maximize)
    if best is None:
        damaged = "" if run.complete else " (its .wandb file ends early: the run was killed or is still running)"
        raise UserError(f"{run.path}: no eval/{metric} logged yet{damaged}; nothing to report")
    best_step = best[0]
    at_best = {k: dict(series[f"eval/{k}"]).get(best_step) for k in ROUGE_KEYS}
    state, reached = run_state(run), reached_step(run)
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
        "epochs": _epochs(run.config, series["train/epoch"], state, reached),
        "metric": metric, "maximize": maximize, "best_step": best_step, "best": at_best,
        "last_step": reached,
        "runtime": format_duration(run.runtime_s),
        "rouge_tokenizer": _config_value(run.config, "evaluation.rouge_tokenizer", "-"),
        "state": state,
        "series": series,
    }


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# The template's words per language: the English one, and the team guide's Korean one (its headings 실험 결과 요약,
# 실험 ID, 실험자, 주요 발견사항 and 다음 단계, in the guide's order).
TEMPLATES: dict[str, dict[str, str]] = {
    "en": {
        "title": "Experiment result", "item": "Item", "value": "Value", "id": "Run ID", "experimenter": "Experimenter",
        "date": "Date", "model": "Model", "learning_rate": "Learning rate", "batch_size": "Batch size",
        "epochs": "Epochs", "best": "Best {label}", "runtime": "Training time", "runtime_note": "W&B runtime",
        "higher": "higher is better", "lower": "lower is better",
        "chosen": "chosen on eval/{metric} ({direction})",
        "finished": "Best checkpoint: step {best_step} of {last_step}, {chosen}.",
        "unfinished": "Best checkpoint so far: step {best_step}, {chosen}; the run {ending}, so these are not its "
                      "final results.",
        "stopped": "was stopped at step {step}, before its end (resume it with --resume)",
        "incomplete": "was cut off at step {step} (killed, or still running)",
        "other": "{state} at step {step}",
        "scores": " ROUGE is F1 on the dev set, {tokenizer} tokens. W&B run `{project}/{id}`, group `{group}`, "
                  "{state}.",
        "charts": "Charts", "loss_alt": "Train vs eval loss", "rouge_alt": "ROUGE over steps",
        "best_alt": "Best ROUGE scores", "findings": "Key findings", "next": "Next steps",
    },
    "ko": {
        "title": "실험 결과 요약", "item": "항목", "value": "값", "id": "실험 ID", "experimenter": "실험자",
        "date": "날짜", "model": "모델", "learning_rate": "학습률", "batch_size": "배치 크기", "epochs": "에폭",
        "best": "최고 {label}", "runtime": "학습 시간", "runtime_note": "W&B 실행 시간",
        "higher": "높을수록 좋음", "lower": "낮을수록 좋음",
        "chosen": "eval/{metric} 기준으로 선택 ({direction})",
        "finished": "최고 체크포인트: 전체 {last_step} 스텝 중 {best_step} 스텝, {chosen}.",
        "unfinished": "지금까지의 최고 체크포인트: {best_step} 스텝, {chosen}. 실행이 {ending} 최종 결과가 아닙니다.",
        "stopped": "끝나기 전 {step} 스텝에서 중지되었으므로(--resume으로 이어서 학습할 수 있음)",
        "incomplete": "{step} 스텝에서 끊겼으므로(강제 종료되었거나 아직 실행 중)",
        "other": "{step} 스텝에서 {state} 상태로 끝났으므로",
        "scores": " ROUGE는 dev 세트의 F1이며 {tokenizer} 토큰 기준입니다. W&B 실행 `{project}/{id}`, 그룹 "
                  "`{group}`, 상태 {state}.",
        "charts": "차트", "loss_alt": "학습 손실과 평가 손실", "rouge_alt": "스텝별 ROUGE",
        "best_alt": "최고 ROUGE 점수", "findings": "주요 발견사항", "next": "다음 단계",
    },
}


def _best_sentence(info: dict[str, Any], words: dict[str, str]) -> str:
    direction = words["higher"] if info["maximize"] else words["lower"]
    chosen = words["chosen"].format(metric=info["metric"], direction=direction)
    if info["state"] == "finished":
        return words["finished"].format(best_step=info["best_step"], last_step=info["last_step"], chosen=chosen)
    ending = words.get(info["state"], words["other"]).format(step=info["last_step"], state=info["state"])
    return words["unfinished"].format(best_step=info["best_step"], chosen=chosen, ending=ending)


def render_markdown(info: dict[str, Any], lang: str = "ko") -> str:
    """The team's result-sharing Markdown in `lang` (TEMPLATES), with the findings and next steps left to fill in."""
    w = TEMPLATES[lang]
    lines = [
        f"# {w['title']}: {info['name']}",
        "",
        f"| {w['item']} | {w['value']} |",
        "|---|---|",
        f"| {w['id']} | `{info['id']}` |",
        f"| {w['experimenter']} | {info['experimenter']} |",
        *(f"| {w[key]} | {info[key]} |" for key in ("date", "model", "learning_rate", "batch_size", "epochs")),
        *(f"| {w['best'].format(label=ROUGE_LABELS[k])} | {_score(info['best'][k])} |" for k in ROUGE_KEYS),
        f"| {w['runtime']} | {info['runtime']} ({w['runtime_note']}) |",
        "",
        _best_sentence(info, w) + w["scores"].format(tokenizer=info["rouge_tokenizer"], project=info["project"],
                                                    id=info["id"], group=info["group"], state=info["state"]),
        "",
        f"## {w['charts']}",
        "",
        f"![{w['loss_alt']}]({CHARTS['loss']})",
        "",
        f"![{w['rouge_alt']}]({CHARTS['rouge']})",
        "",
        f"![{w['best_alt']}]({CHARTS['best']})",
        "",
        f"## {w['findings']}",
        "",
        "- ",
        "",
        f"## {w['next']}",
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


def draw_charts(info: dict[str, Any], paths: dict[str, Path]) -> None:
    """Loss over steps, ROUGE over steps and the best-checkpoint ROUGE bars as PNGs at paths[key of CHARTS]."""
    _loss_chart(info, paths["loss"])
    _rouge_chart(info, paths["rouge"])
    _best_chart(info, paths["best"])


def _output_dir(out: Path) -> bool:
    """Make `out` if needed (its parent must exist); True when it was made here."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"report directory {out}: is a file; name a directory for the report")
        return False
    if not out.parent.is_dir():
        what = "is not a directory" if out.parent.exists() else "does not exist; create it first"
        raise UserError(f"report directory {out}: {out.parent} {what}")
    try:
        out.mkdir()
    except OSError as err:
        raise UserError(f"report directory {out}: cannot create it: {err.strerror or err}") from None
    return True


def write_report(run_path: Path | str, out_dir: Path | str | None = None,
                 lang: str = "ko") -> tuple[Path, dict[str, Path]]:
    """Write report.md (in `lang`: ko or en) and the charts for one run (default out_dir: RUN/report); returns
    their paths.

    Every file is written under a temporary name first and renamed when all are done, so a failure leaves
    an earlier report as it was and no partial one.
    """
    run = read_run(run_path)
    info = summarize(run)
    markdown_text = render_markdown(info, lang)
    base = Path(run_path).parent if Path(run_path).is_file() else Path(run_path)
    out = Path(out_dir) if out_dir is not None else base / "report"
    made = _output_dir(out)
    final = {key: out / file for key, file in {**CHARTS, "markdown": "report.md"}.items()}
    temps = {key: path.with_name(f".tmp-{os.getpid()}-{path.name}") for key, path in final.items()}
    try:
        draw_charts(info, temps)
        temps["markdown"].write_text(markdown_text, encoding="utf-8")
        for key, tmp in temps.items():
            os.replace(tmp, final[key])
    except OSError as err:
        raise UserError(f"report directory {out}: cannot write the report: {err.strerror or err}; "
                        "nothing written") from None
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        if made and not any(out.iterdir()):
            out.rmdir()
    markdown = final.pop("markdown")
    return markdown, final
