"""Weights & Biases through `accelerator.init_trackers`: mode, naming conventions, tables, artifacts, charts.

Everything that touches the real run is guarded by `accelerator.is_main_process`: other ranks hold a blank
tracker with no `log_artifact`.
"""

from __future__ import annotations

import functools
import netrc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from loop.config import Config


def never_fatal(what: str) -> Callable[[Callable], Callable]:
    """A W&B call that fails (a full disk under W&B's files, a server error) prints one warning line and
    returns None: training never dies inside a tracker call."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # wandb raises many types (OSError, its own errors, ...)
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
                print(f"warning: W&B {what} failed ({type(err).__name__}: {first}); training goes on", flush=True)
                return None
        return guarded
    return wrap


def has_api_key() -> bool:
    """True when W&B credentials are configured (WANDB_API_KEY or a netrc entry for the W&B host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(configured: str) -> str:
    """`auto` means WANDB_MODE if set, else online with an API key and offline without one."""
    if configured != "auto":
        return configured
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env in ("dryrun",):
        return "offline"
    return "online" if has_api_key() else "offline"


def init_tracking(accelerator: Any, cfg: Config, output_dir: Path, mode: str, run_id: str | None = None) -> str:
    """Start (or resume, given run_id) the W&B run with the team's naming conventions; return the mode used.

    Offline runs live under output_dir/wandb. If an online start fails (no network, bad key, server error)
    the run continues offline with a warning, to be synced later.
    """
    os.environ.setdefault("WANDB_SILENT", "true")
    # Staged artifact files (tables) stay with the run, so a run directory is complete for `wandb sync`.
    os.environ.setdefault("WANDB_DATA_DIR", str((output_dir / "wandb").resolve()))
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "60")
    init_kwargs = {
        "name": cfg.run_name(),
        "group": cfg.run_group(),
        "job_type": cfg.wandb.job_type,
        "tags": cfg.run_tags(),
        "notes": cfg.wandb.notes or None,
        "entity": cfg.wandb.entity or None,
        "dir": str(output_dir.resolve()),
    }
    if run_id:
        init_kwargs.update(id=run_id, resume="allow")
    for attempt in (mode, "offline"):
        os.environ["WANDB_MODE"] = attempt
        try:
            accelerator.init_trackers(cfg.wandb.project, config=cfg.to_dict(),
                                      init_kwargs={"wandb": {**init_kwargs, "mode": attempt}})
            return attempt
        except Exception as err:  # wandb raises many types for network, auth, server and disk failures
            accelerator.trackers = []
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if attempt == "offline":
                accelerator.print(f"warning: W&B offline start failed ({first}); training goes on without "
                                  "tracking")
                return "disabled"
            accelerator.print(f"warning: W&B {attempt} start failed ({first}); continuing offline, "
                              "sync the run later with `wandb sync`")
    return "offline"


def log(accelerator: Any, values: dict[str, Any], step: int) -> None:
    """accelerator.log that never stops training: a tracking failure is a warning (the run file keeps it)."""
    try:
        accelerator.log(values, step=step)
    except Exception as err:  # same reason as in init_tracking
        first = (str(err).strip().splitlines() or [""])[0][:300]
        accelerator.print(f"warning: W&B logging failed at step {step}: {type(err).__name__}: {first}")


def wandb_run(accelerator: Any) -> Any:
    """The real wandb Run on the main process, else None."""
    if not accelerator.is_main_process or not accelerator.trackers:  # tracking off: get_tracker gives a blank
        return None
    return accelerator.get_tracker("wandb", unwrap=True)


@never_fatal("eval samples table")
def log_samples_table(run: Any, step: int, result: Any, examples: list[dict[str, str]], limit: int) -> None:
    """A W&B Table of the first `limit` predictions of an eval (fname, dialogue, reference, prediction, ROUGE-L)."""
    import wandb

    columns = ["fname", "dialogue", "reference", "prediction", "rouge_l"]
    rows = [[examples[i]["id"], examples[i]["dialogue"], ref, pred, score] for i, ref, pred, score in
            zip(result.indices, result.references, result.predictions, result.per_sample_rouge_l, strict=True)]
    table = wandb.Table(columns=columns, data=rows[:limit])
    run.log({"eval/samples": table}, step=step)


def model_artifact_due(cfg: Config, at_end: bool) -> bool:
    """Whether the best model is uploaded as a `model` artifact now: at a new best (at_end False) or once at the
    run's end (at_end True). training.save_model_as_artifact = false wins over wandb.model_artifacts."""
    if not cfg.training.save_model_as_artifact:
        return False
    return cfg.wandb.model_artifacts == ("final_best" if at_end else "every_best")


# The model artifact this process logged last, per W&B run id: what the registry link points to online.
_logged_models: dict[str, Any] = {}


@never_fatal("model artifact")
def log_model_artifact(run: Any, cfg: Config, model_dir: Path, step: int, metrics: dict[str, Any],
                       lora: dict[str, Any] | None = None) -> None:
    """Log `model_dir` as a `model` artifact with aliases best and step-N, metrics as metadata, and the TTL of
    wandb.artifact_ttl_days.

    The metadata's `weights` says what the files are: `full` (fine-tuned weights) or, with `lora` (the adapter's
    settings, also recorded), `merged` (the adapters merged into the base; the adapter alone is in adapter/).

    `policy="immutable"` records the files where they are instead of copying them into W&B's staging area:
    `model_dir` is a hard-linked snapshot that nothing rewrites, so no second copy of the weights is made.
    """
    import datetime as dt

    import wandb

    weights = {"weights": "merged" if lora else "full", "lora": lora}
    art = wandb.Artifact(f"model-{run.id}", type="model", metadata={"step": step, "run_name": cfg.run_name(),
                                                                    **weights, **metrics},
                         description=f"best {cfg.evaluation.metric_for_best_model} model of {cfg.run_name()}")
    if cfg.wandb.artifact_ttl_days:
        art.ttl = dt.timedelta(days=cfg.wandb.artifact_ttl_days)
    art.add_dir(str(model_dir.resolve()), policy="immutable")
    run.log_artifact(art, aliases=["best", f"step-{step}"])
    _logged_models[run.id] = art


@never_fatal("registry link")
def link_final_best(run: Any, cfg: Config, out_dir: Path, mode: str) -> None:
    """Link the run's final best model artifact to wandb.registry_collection (alias best): at once online, else
    recorded in RUN/registry_link.json for `python -m loop.runs sync` to link after the upload."""
    from loop import registry

    if not cfg.wandb.registry_collection or not cfg.training.save_model_as_artifact:
        return
    target = registry.registry_target(cfg.wandb.registry_collection)
    art = _logged_models.get(run.id)
    if mode == "online" and art is not None:
        run.link_artifact(art, target, aliases=["best"])
        print(f"linked model-{run.id}:best to {target} (alias best)", flush=True)
        return
    # Offline (run.link_artifact raises NotImplementedError there), or a resumed launch that logged no new best.
    registry.write_pending_link(out_dir, run.entity or cfg.wandb.entity, cfg.wandb.project, run.id, target)
    if mode == "online":
        if problem := registry.link_pending(out_dir):
            print(f"warning: W&B registry link failed ({problem})", flush=True)
    else:
        print(f"registry: {target} will be linked by `python -m loop.runs sync {out_dir}`", flush=True)


@never_fatal("dataset artifact")
def log_dataset_artifact(run: Any, cfg: Config, files: list[Path]) -> None:
    """Log the train/dev files once as a `dataset` artifact named after the data version."""
    import wandb

    art = wandb.Artifact(f"dialogsum-v{cfg.data.version}", type="dataset", metadata={"version": cfg.data.version})
    for f in files:
        art.add_file(str(f))
    run.log_artifact(art)


# Eval metrics that are not scores: no direction is better, so their summary keeps the last value.
NOT_SCORES = ("gen_len", "num_samples")
# Each eval metric's best so far in this process, per W&B run id: {metric: (step, value)}. The run summary
# holds these too, but reading it back means a round trip to wandb-core at every eval.
_best_so_far: dict[str, dict[str, tuple[int, float]]] = {}


def eval_goal(metric: str) -> str | None:
    """`min` for a loss, None for a metric that is not a score (NOT_SCORES), `max` for the rest (ROUGE)."""
    name = metric.rsplit("/", 1)[-1]
    if name in NOT_SCORES:
        return None
    return "min" if "loss" in name else "max"


@never_fatal("best summary")
def restore_best_summary(run: Any, metric: str, best_value: float | None, best_step: int | None) -> None:
    """On resume, the checkpoint's best/<metric> and best/step go into this launch's summary at once, so a
    launch stopped before its next new best still shows the best so far."""
    if run is None or best_value is None:
        return
    run.summary.update({f"best/{metric}": best_value, "best/step": best_step})


@never_fatal("best summary")
def summarize_eval(run: Any, step: int, metrics: dict[str, Any], metric: str, best_value: float | None,
                   best_step: int | None) -> None:
    """The best so far in the run summary at every eval, not only at the end (a killed or stopped run keeps it).

    Each scored eval/<m> gets `define_metric(summary="min"|"max")`, so the summary's eval/<m> is its best value
    (what a W&B sweep reads), and best_step/<m> the step where it was first reached; best/<metric> and
    best/step follow the best checkpoint (`metric` is evaluation.metric_for_best_model). Call it after the
    eval is logged at `step` and the best checkpoint is updated.
    """
    if run is None:
        return
    seen = _best_so_far.setdefault(run.id, {})
    updates: dict[str, Any] = {}
    for name, value in metrics.items():
        goal = eval_goal(name)
        if goal is None or isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            continue
        if name not in seen:
            # The eval's history row is committed at the next, higher step, so this still covers its value.
            run.define_metric(f"eval/{name}", summary=goal)
        old = seen.get(name)
        if old is None or (value > old[1] if goal == "max" else value < old[1]):
            seen[name] = (step, float(value))
            updates[f"best_step/{name}"] = step
    if best_value is not None and best_step == step:  # a new best checkpoint at this eval
        updates.update({f"best/{metric}": best_value, "best/step": best_step})
    if updates:
        run.summary.update(updates)


@never_fatal("run summary")
def write_summary(run: Any, metric: str, best_value: float | None, best_step: int | None,
                  times: dict[str, dict[str, float]]) -> None:
    """The run summary's best/<metric>, best/step, the time split (time/<part>_s, time/<part>_share) and the
    compile figures (time/compile_seconds, time/compile_recompiles, ...)."""
    run.summary[f"best/{metric}"] = best_value
    run.summary["best/step"] = best_step
    for key, seconds in times["seconds"].items():
        run.summary[f"time/{key}_s"] = seconds
        run.summary[f"time/{key}_share"] = times["share"].get(key)
    for key, value in times.get("compile", {}).items():
        run.summary[f"time/compile_{key}"] = value


@never_fatal("final charts")
def log_final_charts(run: Any, step: int, train_loss: list[tuple[int, float]], eval_loss: list[tuple[int, float]],
                     best: dict[str, float]) -> None:
    """The train-vs-eval loss line series and the best-ROUGE bar chart."""
    import wandb

    charts: dict[str, Any] = {}
    if train_loss and eval_loss:
        charts["charts/loss"] = wandb.plot.line_series(
            xs=[[s for s, _ in train_loss], [s for s, _ in eval_loss]],
            ys=[[v for _, v in train_loss], [v for _, v in eval_loss]],
            keys=["train/loss", "eval/loss"], title="Train vs eval loss", xname="step")
    table = wandb.Table(columns=["metric", "score"],
                        data=[[k, best[k]] for k in ("rouge_1", "rouge_2", "rouge_l") if k in best])
    charts["charts/rouge"] = wandb.plot.bar(table, "metric", "score", title="Best ROUGE (F1)")
    run.log(charts, step=step)


def run_location(run: Any, mode: str) -> str:
    """Where to see the run: its URL online, or the `wandb sync` command for an offline run."""
    if run is None or mode == "disabled":
        return "W&B: disabled"
    if mode == "offline":
        return f"W&B: offline run; upload it with: wandb sync {Path(run.dir).parent}"
    return f"W&B: {run.url}"


def end(accelerator: Any, run: Any) -> None:
    """End the trackers and the process group, then flush the W&B run file (offline files can be left
    header-only otherwise); a tracker that fails to finish is one warning line."""
    try:
        accelerator.end_training()
    except Exception as err:  # same reason as in never_fatal
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        print(f"warning: W&B could not finish the run ({type(err).__name__}: {first})", flush=True)
    if accelerator.is_main_process and run is not None:
        import wandb

        never_fatal("teardown")(wandb.teardown)()
