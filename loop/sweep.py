"""Hyperparameter sweeps from one W&B sweep file: `python -m loop.sweep configs/sweep.toml --count 10`.

Online (a W&B API key and a reachable server) it creates or joins a W&B sweep and runs `wandb.agent`.
Offline it runs the same file with Optuna, resumable from a sqlite file in the sweep directory. Either way
each trial is a full `accelerate launch loop/train.py` with its hyperparameters as `--set` overrides,
followed through the eval_metrics.jsonl it writes, and ends up in a results table and `best_config.toml`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import hashlib
import io
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from loop.config import Config, load_config
from loop.errors import ArgumentParser, UserError, run_cli
from loop.sweep_spec import RESERVED, Param, SweepSpec, load_sweep, override
from loop.tracking import has_api_key
from loop.train import check_inputs

TRAIN_SCRIPT = Path(__file__).resolve().with_name("train.py")
POLL_S = 0.5
# A broken setup (a bad data file, OOM at every size) fails every trial: stop instead of burning --count.
MAX_CONSECUTIVE_FAILURES = 3
# TPE models the results after this many random trials; Optuna's default of 10 would leave a
# 10-trial `bayes` sweep purely random.
BAYES_STARTUP_TRIALS = 5
STUDY_NAME = "sweep"

say = functools.partial(print, flush=True)


class TrialFailed(Exception):
    """A trial's training process failed; the sweep goes on with the next trial."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    p = ArgumentParser(prog="python -m loop.sweep", description=__doc__.splitlines()[0])
    p.add_argument("sweep_file", help="W&B sweep file (.toml, .yaml or .yml)")
    p.add_argument("--config", help="training config every trial starts from (default: the embedded demo)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key for every trial (repeatable)")
    p.add_argument("--count", type=int, help="trials this agent runs (default: up to run_cap, or the whole grid)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--online", dest="mode", action="store_const", const="online",
                      help="require a W&B server (default: online when a key is set and the server answers)")
    mode.add_argument("--offline", dest="mode", action="store_const", const="offline",
                      help="run locally with Optuna even when W&B is reachable")
    p.add_argument("--sweep-dir", help="where trials, optuna.db and results go (default: sweeps/<file name>)")
    p.add_argument("--sweep-id", help="online: join this W&B sweep instead of creating one")
    p.add_argument("--launcher", choices=("accelerate", "python"), default="accelerate",
                   help="run each trial with `accelerate launch` (default) or plain `python`")
    p.add_argument("--accelerate-config", metavar="FILE",
                   help="accelerate launch --config_file for every trial, e.g. launch/cpu_2proc.yaml")
    p.add_argument("--grace-period", type=float, default=30.0, metavar="S",
                   help="seconds between SIGTERM and SIGKILL when a trial is stopped (default 30)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = p.parse_args(argv)
    if args.count is not None and args.count < 1:
        raise UserError(f"--count must be ≥ 1, got {args.count}")
    if args.accelerate_config and args.launcher != "accelerate":
        raise UserError("--accelerate-config needs --launcher accelerate")
    if args.accelerate_config and not Path(args.accelerate_config).is_file():
        # Found now, not as the same failure in every trial's log.
        raise UserError(f"--accelerate-config {args.accelerate_config}: file not found")
    if not 0 <= args.grace_period < math.inf:
        raise UserError(f"--grace-period must be a number of seconds ≥ 0, got {args.grace_period:g}")
    return args


def server_reachable(url: str, timeout_s: float = 3.0) -> bool:
    """True when a TCP connection to the W&B server opens within timeout_s."""
    parts = urlparse(url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    opened: list[bool] = []

    def probe() -> None:
        with contextlib.suppress(OSError), socket.create_connection((parts.hostname, port), timeout=timeout_s):
            opened.append(True)

    # A DNS lookup with no network can hang well past the socket timeout: stop waiting regardless.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(opened)


def choose_mode(requested: str | None) -> tuple[str, str]:
    """("online" or "offline", why): online needs an API key and a W&B server that answers."""
    if requested == "offline":
        return "offline", "--offline"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if requested is None and env in ("offline", "dryrun", "disabled"):
        return "offline", f"WANDB_MODE={env}"
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not has_api_key():
        why = "no W&B API key configured (run `wandb login` or set WANDB_API_KEY)"
    elif not server_reachable(url):
        why = f"W&B server {url} is not reachable"
    else:
        return "online", f"API key set and {url} reachable"
    if requested == "online":
        raise UserError(f"--online: {why}; leave out --online to run the sweep locally with Optuna")
    return "offline", why


@dataclass
class Sweep:
    """What every trial of one sweep shares."""

    spec: SweepSpec
    config: str | None
    sets: list[str]
    base: Config
    directory: Path
    launcher: str = "accelerate"
    accelerate_config: str | None = None
    grace_s: float = 30.0
    id: str = ""

    def trial_overrides(self, values: dict[str, Any], out_dir: Path, run_suffix: str | None,
                        offline: bool) -> list[str]:
        """`--set` items for one trial, validated by loop.config before anything is launched."""
        items = [*self.sets, *(override(k, v) for k, v in {**self.spec.constants, **values}.items()),
                 f"training.output_dir={out_dir}", f"wandb.group=sweep-{self.id}", "wandb.job_type=sweep"]
        if offline and self.base.wandb.mode == "online":
            items.append("wandb.mode=offline")
        try:
            cfg = load_config(self.config, items)
        except UserError as err:
            raise UserError(f"{out_dir.name}: {values} is rejected by the config: {err}") from None
        if run_suffix:  # keeps the run-name convention and tells trials with the same lr and batch apart
            items.append(f"wandb.name={cfg.run_name()}-{run_suffix}")
        return items

    def command(self, overrides: list[str]) -> list[str]:
        """The trial's command line: `accelerate launch loop/train.py ...` (or plain python)."""
        args = [str(TRAIN_SCRIPT), *(["--config", self.config] if self.config else [])]
        for item in overrides:
            args += ["--set", item]
        if self.launcher == "python":
            return [sys.executable, *args]
        launch = [sys.executable, "-m", "accelerate.commands.launch"]
        if self.accelerate_config:
            launch += ["--config_file", self.accelerate_config]
        return [*launch, *args]


class TrialProcess:
    """One trial's training process, in its own process group, with its eval_metrics.jsonl read as it grows."""

    def __init__(self, cmd: list[str], out_dir: Path, env: dict[str, str]):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.log = out_dir / "train.log"
        self.metrics = out_dir / "eval_metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        self._offset = 0
        self._lines = 0
        with self.log.open("ab") as log:
            # Its own group, so that stopping the trial also stops accelerate's workers.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        """The process id, which is also the process group id."""
        return self.proc.pid

    def follow(self, on_eval: Callable[[int, dict[str, Any]], bool]) -> int | None:
        """Wait for the process; on_eval(n, row) sees each new eval and returns True to stop early (-> None)."""
        while True:
            exited = self.proc.poll() is not None  # checked before reading, so the last eval is never missed
            for row in self._new_rows():
                self.rows.append(row)
                if on_eval(len(self.rows), row):
                    return None
            if exited:
                return self.proc.returncode
            time.sleep(POLL_S)

    def _new_rows(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        with self.metrics.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written is read next time
        self._offset += len(complete)
        rows = []
        for line in complete.splitlines():
            self._lines += 1
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:  # bad UTF-8 too
                raise TrialFailed(f"{self.metrics}: line {self._lines}: not a JSON line of eval metrics "
                                  f"({err})") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise TrialFailed(f"{self.metrics}: line {self._lines}: expected an object with the step, "
                                  f"got {line[:80]!r}")
            rows.append(row)
        return rows

    def stop(self, grace_s: float) -> None:
        """SIGTERM the process group, then SIGKILL it after grace_s seconds; nothing to do once it has exited."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        # accelerate's single-process launcher dies at once on SIGTERM while train.py is still saving its
        # checkpoint: wait for the whole group, not just the launcher.
        while (self.proc.poll() is None or _group_has_live_process(self.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait()

    def completed(self, code: int | None) -> bool:
        """True when training ran to its last step (a SIGTERM makes train.py save and exit 0 early)."""
        return code == 0 and bool(self.rows) and (self.out_dir / "final_metrics.json").exists()

    def failure(self, code: int | None) -> str:
        """What went wrong: how it ended, the trial's own error line (else the log's last line), the log."""
        lines = [ln for ln in self.log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error: ")]
        how = "stopped before its last step" if code == 0 else f"failed (exit {code})"
        return f"{self.out_dir.name} {how}: {(errors or lines or ['(empty log)'])[-1].strip()} (log: {self.log})"


def metric_value(row: dict[str, Any], key: str, source: Path) -> float:
    """The sweep's metric from one eval line; a line without it as a number fails the trial."""
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrialFailed(f"{source}: the eval at step {row['step']} has no number {key!r} (got {value!r})")
    return float(value)


def best_eval(rows: list[dict[str, Any]], key: str, goal: str, source: Path) -> tuple[float, int] | None:
    """(value, step) of the best eval on the sweep metric, the earliest on ties; None when no eval has a number."""
    best = None
    for row in rows:
        value = metric_value(row, key, source)
        if value != value:  # NaN (a diverged eval) is never the best
            continue
        if best is None or (value > best[0] if goal == "maximize" else value < best[0]):
            best = (value, row["step"])
    return best


def _group_has_live_process(pgid: int) -> bool:
    """True while a process other than a zombie is in the group (Linux /proc; elsewhere always False)."""
    # os.killpg(pgid, 0) also counts zombies, which a container's init may never reap.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # gone while we looked
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


@dataclass
class Row:
    """One line of the results table."""

    trial: str
    status: str
    values: dict[str, Any] = field(default_factory=dict)  # config key -> value
    metric: float | None = None  # the best eval of the trial on the sweep metric
    step: int | None = None  # the step of that eval
    run_dir: str = ""


# ---- offline: Optuna ------------------------------------------------------------------------------------


def run_offline(sweep: Sweep, count: int | None) -> int:
    """Run up to `count` trials with Optuna in the sweep directory, resuming what is already there."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep prints its own line per trial and eval
    storage, study = open_study(sweep)
    requeue_interrupted(storage, study)
    todo, limit = trials_to_run(study, sweep.spec, count)
    spec = sweep.spec
    say(f"sweep-{sweep.id}: {spec.method} search for {spec.metric} ({spec.goal}) in {sweep.directory}; "
        f"{todo} trial(s) to run (limit: {limit})")
    failed: list[str] = []
    interrupted = False
    previous = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        if todo:
            study.optimize(_objective(sweep, failed), n_trials=todo, catch=(TrialFailed,))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        finish(sweep, study_rows(study), offline=True)
    if interrupted:
        say("interrupted: run the same command again to resume (the interrupted trial is run again)")
        return 130
    return 1 if failed else 0


def raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    """A signal handler: SIGTERM stops a search the way Ctrl-C does (interrupted trials are requeued)."""
    raise KeyboardInterrupt


def open_study(sweep: Sweep) -> tuple[Any, Any]:
    """(storage, study) for the sweep directory: created on first use, checked against the files on resume."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    sweep.directory.mkdir(parents=True, exist_ok=True)
    db = (sweep.directory / "optuna.db").resolve()
    try:
        # A long lock timeout: several agents may run from one sweep directory.
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}", engine_kwargs={"connect_args": {"timeout": 60}})
        resuming = STUDY_NAME in optuna.study.get_all_study_names(storage)
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=sweep.spec.goal,
                                    load_if_exists=True)
    except SQLAlchemyError as err:
        why = str(getattr(err, "orig", None) or err).splitlines()[0]
        raise UserError(f"{db}: cannot open the sweep's database ({why}); move it away, or start a new sweep "
                        "with --sweep-dir NEW_DIR") from None
    marks = {"spec": sweep.spec.fingerprint(),
             "base": hashlib.sha256(json.dumps(sweep.base.to_dict(), sort_keys=True).encode()).hexdigest()[:16]}
    if resuming:
        for key, what in (("spec", f"sweep file ({sweep.spec.path})"), ("base", "training config (--config/--set)")):
            if study.user_attrs.get(key) != marks[key]:
                raise UserError(f"{sweep.directory}: this sweep was started with a different {what}; "
                                "restore it, or start a new sweep with --sweep-dir NEW_DIR")
        sweep.id = study.user_attrs["sweep_id"]
    else:
        sweep.id = secrets.token_hex(4)
        for key, value in {"sweep_id": sweep.id, **marks}.items():
            study.set_user_attr(key, value)
    study.sampler = _sampler(sweep.spec, int(sweep.id, 16), len(study.trials))
    hb = sweep.spec.hyperband
    # W&B's hyperband with min_iter and eta is one successive-halving bracket: rungs at min_iter * eta**k
    # evaluations, where only the top 1/eta of the trials that reached a rung go on.
    study.pruner = (optuna.pruners.SuccessiveHalvingPruner(min_resource=hb.min_iter, reduction_factor=hb.eta)
                    if hb else optuna.pruners.NopPruner())
    return storage, study


def _sampler(spec: SweepSpec, sweep_seed: int, trials_so_far: int) -> Any:
    import optuna

    if spec.method == "grid":
        # GridSampler numbers its shuffled points by the seed: one seed per sweep, or resumes revisit points.
        return optuna.samplers.GridSampler({p.key: p.grid_values() for p in spec.searched}, seed=sweep_seed)
    # Seeded by the sweep and its progress: reproducible, yet a resumed search does not replay the
    # parameters it already tried.
    seed = sweep_seed + trials_so_far
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=BAYES_STARTUP_TRIALS)


def requeue_interrupted(storage: Any, study: Any) -> None:
    """Fail trials whose agent died on this host, then queue every interrupted trial's parameters again."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        agent = t.user_attrs.get("agent")  # missing: its agent died before launching anything
        if agent and (agent[0] != host or _pid_alive(agent[1])):
            continue  # another agent's trial, still running
        _kill_orphan(t.user_attrs.get("pgid"), t.user_attrs.get("run_dir", ""))
        # Optuna's public API only changes the state of the caller's own trial; this one's agent is gone.
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if t.user_attrs.get("interrupted") and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            say(f"trial-{t.number:03d} was interrupted: its parameters are queued to run again as a new trial")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0, ...) would signal our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_orphan(pgid: int | None, run_dir: str) -> None:
    """Stop a trial left training by a sweep that was killed outright (its parameters run again anyway)."""
    try:
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes()
    except (OSError, TypeError):
        return
    if run_dir and f"training.output_dir={run_dir}".encode() in cmdline:  # not a reused pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def trials_to_run(study: Any, spec: SweepSpec, count: int | None) -> tuple[int, str]:
    """How many trials this invocation starts, and which limit decided it."""
    from optuna.trial import TrialState

    started = [t for t in study.get_trials(deepcopy=False)
               if t.state != TrialState.WAITING and not t.user_attrs.get("interrupted")]
    limits: dict[str, int] = {}
    if count is not None:
        limits["--count"] = count
    if spec.run_cap:
        limits[f"run_cap {spec.run_cap}, {len(started)} used"] = spec.run_cap - len(started)
    if spec.method == "grid":
        done = [{p.key: t.params.get(p.key) for p in spec.searched} for t in started]
        limits["grid points left"] = sum(point not in done for point in spec.grid())
    name, todo = min(limits.items(), key=lambda item: item[1])
    return max(todo, 0), name


def suggest(trial: Any, p: Param, grid: bool) -> Any:
    """Sample one parameter the way its W&B distribution does."""
    if grid or p.distribution == "categorical":
        return trial.suggest_categorical(p.key, p.grid_values())
    if p.integer:
        return trial.suggest_int(p.key, p.low, p.high, step=p.q or 1)
    return trial.suggest_float(p.key, p.low, p.high, log=p.distribution.startswith("log_"), step=p.q)


def _objective(sweep: Sweep, failed: list[str]) -> Callable[[Any], float]:
    import optuna

    spec, host = sweep.spec, socket.gethostname()
    env = dict(os.environ)
    if env.get("WANDB_MODE") != "disabled":
        env["WANDB_MODE"] = "offline"
    streak = [0]

    def objective(trial: Any) -> float:
        values = {p.key: suggest(trial, p, spec.method == "grid") for p in spec.searched}
        label = f"trial-{trial.number:03d}"
        out_dir = sweep.directory / label
        overrides = sweep.trial_overrides(values, out_dir, label, offline=True)
        say(f"{label}: {_describe(spec, values)} -> {out_dir}")
        trial.set_user_attr("run_dir", str(out_dir))
        trial.set_user_attr("agent", [host, os.getpid()])
        proc = TrialProcess(sweep.command(overrides), out_dir, env)
        trial.set_user_attr("pgid", proc.pid)  # lets a resumed sweep stop this process if this agent dies

        def on_eval(n: int, row: dict[str, Any]) -> bool:
            value = metric_value(row, spec.metric_key, proc.metrics)
            # n counts evaluations: W&B's hyperband iterations are the times the metric was logged.
            trial.report(value, n)
            best = best_eval(proc.rows, spec.metric_key, spec.goal, proc.metrics)
            if best is not None and best[1] == row["step"]:  # a new best: the results table shows it and its step
                trial.set_user_attr("best_step", row["step"])
            say(f"  {label} eval {n} (step {row['step']}): {spec.metric} {value:.4f}")
            return trial.should_prune()

        unreadable = None
        try:
            code = proc.follow(on_eval)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        except TrialFailed as err:  # its eval_metrics.jsonl cannot be read: the trial has no result
            code, unreadable = -1, f"{label} failed: {err}"
        finally:
            proc.stop(sweep.grace_s)
        if code is None:
            streak[0] = 0
            say(f"{label}: pruned after eval {len(proc.rows)} (step {proc.rows[-1]['step']})")
            raise optuna.TrialPruned
        if unreadable or not proc.completed(code):
            failed.append(label)
            streak[0] += 1
            message = unreadable or proc.failure(code)
            say(message)
            if streak[0] >= MAX_CONSECUTIVE_FAILURES:
                raise UserError(f"{streak[0]} trials in a row failed; stopping the sweep. Last: {message}")
            raise TrialFailed(message)
        streak[0] = 0
        # The trial's best eval, not its last: one that peaks and then gets worse is ranked by its peak, as a
        # W&B sweep ranks it by the best value in the run summary.
        value, step = best_eval(proc.rows, spec.metric_key, spec.goal, proc.metrics) or (math.nan, None)
        say(f"{label}: complete, best {spec.metric} {value:.4f} at step {step}")
        return value

    return objective


def study_rows(study: Any) -> list[Row]:
    """A results row for every trial in the study, queued ones included."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    status = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
              TrialState.RUNNING: "running", TrialState.WAITING: "queued"}
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = "interrupted" if t.user_attrs.get("interrupted") else status[t.state]
        # The best of the trial's reported evals: a finished trial's value, and what a pruned or stopped one
        # reached before it stopped.
        reports = [v for v in t.intermediate_values.values() if v == v]
        metric = (max if study.direction == StudyDirection.MAXIMIZE else min)(reports) if reports else None
        rows.append(Row(f"trial-{t.number:03d}", state, dict(t.params), metric, t.user_attrs.get("best_step"),
                        t.user_attrs.get("run_dir", "")))
    return rows


# ---- online: W&B ------------------------------------------------------------------------------------------


def run_online(sweep: Sweep, count: int | None, sweep_id: str | None) -> int:
    """Create (or join) the W&B sweep and run its agent; each trial is a training subprocess."""
    import wandb
    import yaml

    project, entity = sweep.base.wandb.project, sweep.base.wandb.entity or None
    sweep.id = sweep_id or wandb.sweep(sweep.spec.to_wandb(), entity=entity, project=project)
    say(f"sweep-{sweep.id}: W&B agent for {sweep.spec.metric} ({sweep.spec.goal}); trials in {sweep.directory}")
    by_name = {p.name: p for p in sweep.spec.searched}
    rows: list[Row] = []

    def trial() -> None:
        # wandb.agent sets these for the run it hands out; the training subprocess inherits them and
        # joins the sweep as that run.
        run_id = os.environ["WANDB_RUN_ID"]
        given = yaml.safe_load(Path(os.environ["WANDB_SWEEP_PARAM_PATH"]).read_text(encoding="utf-8"))
        values = {by_name[k].key: v["value"] for k, v in given.items() if k in by_name}
        out_dir = sweep.directory / f"trial-{run_id}"
        overrides = sweep.trial_overrides(values, out_dir, None, offline=False)
        say(f"trial-{run_id}: {_describe(sweep.spec, values)} -> {out_dir}")
        proc = TrialProcess(sweep.command(overrides), out_dir, dict(os.environ))
        row = Row(f"trial-{run_id}", "stopped", values, run_dir=str(out_dir))
        rows.append(row)

        def on_eval(n: int, ev: dict[str, Any]) -> bool:
            # The best so far, as the run's W&B summary holds it (define_metric in loop/tracking.py).
            row.metric, row.step = best_eval(proc.rows, sweep.spec.metric_key, sweep.spec.goal,
                                             proc.metrics) or (None, None)
            return False

        try:
            # W&B's early termination stops a run by raising inside this thread: `finally` ends the process.
            code = proc.follow(on_eval)
        except TrialFailed:
            row.status = "failed"
            raise
        finally:
            proc.stop(sweep.grace_s)
        row.status = "complete" if proc.completed(code) else "failed"
        if row.status == "failed":
            raise TrialFailed(proc.failure(code))

    wandb.agent(sweep.id, function=trial, count=count, entity=entity, project=project)
    finish(sweep, rows, offline=False)
    return 1 if any(r.status == "failed" for r in rows) else 0


# ---- results --------------------------------------------------------------------------------------------


def finish(sweep: Sweep, rows: list[Row], offline: bool) -> None:
    """Write results.md, results.csv and best_config.toml into the sweep directory and print the table."""
    spec = sweep.spec
    sign = -1 if spec.goal == "maximize" else 1
    rank = {"complete": 0, "pruned": 1}
    rows = sorted(rows, key=lambda r: (rank.get(r.status, 2), r.metric is None,
                                       sign * r.metric if r.metric is not None else 0, r.trial))
    # The metric column is each trial's best eval on it, "at step" the step of that eval.
    header = ["trial", "status", *(p.name for p in spec.searched), spec.metric, "at step", "run dir"]

    cells = [[r.trial, r.status, *(r.values.get(p.key) for p in spec.searched), r.metric, r.step, r.run_dir]
             for r in rows]
    title = f"sweep-{sweep.id}: {spec.method} search for {spec.metric} ({spec.goal}) from {spec.path}"
    note = f"{spec.metric}: the best eval of each trial, at step: the step of that eval; best trial first."
    write_results(sweep.directory, title, note, header, cells)
    best = next((r for r in rows if r.status == "complete"), None)
    if best is not None:
        items = [*sweep.sets, *(override(k, v) for k, v in {**spec.constants, **best.values}.items())]
        cfg = load_config(sweep.config, items)
        cfg.source = (f"{sweep.config or '<defaults>'} with the parameters of {best.trial} of sweep-{sweep.id} "
                      f"({spec.metric} {best.metric:.4f})")
        path = sweep.directory / "best_config.toml"
        write_atomic(path, cfg.to_toml())
        say(f"best: {best.trial}, {spec.metric} {best.metric:.4f} at step {best.step}; train it with: "
            f"accelerate launch loop/train.py --config {path}")
    if offline and rows:
        say(f"upload the trials' offline W&B runs later with: wandb sync {sweep.directory}/trial-*/wandb/offline-run-*")


def write_results(directory: Path, title: str, note: str, header: list[str], rows: list[list[Any]]) -> str:
    """Write results.md (floats to 4 significant digits) and results.csv (full values) and print the table."""

    def shown(value: Any) -> str:
        return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    table = "\n".join("| " + " | ".join(line) + " |"
                      for line in [header, ["---"] * len(header), *([shown(v) for v in r] for r in rows)])
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / "results.md", f"# {title}\n\n{note}\n\n{table}\n")
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(["" if v is None else str(v) for v in r] for r in rows)
    write_atomic(directory / "results.csv", buffer.getvalue())
    say(f"\n{title}\n{table}\nresults: {directory / 'results.md'}, {directory / 'results.csv'}")
    return table


def write_atomic(path: Path, text: str) -> None:
    """Write UTF-8 text to a temp file next to `path`, then rename it over `path` (readers never see half)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8", newline="")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _describe(spec: SweepSpec, values: dict[str, Any]) -> str:
    return " ".join(f"{p.name}={values[p.key]:.4g}" if isinstance(values[p.key], float)
                    else f"{p.name}={values[p.key]}" for p in spec.searched)


def make_output_dir(directory: Path, flag: str, what: str) -> Path:
    """Create a tool's output directory (and its parents); a file in the way or no permission is one line naming
    `flag` (the option that chose it) and `what` goes there."""
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{flag} {directory}: is a file; name a directory for {what}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag} {directory}: cannot create it: {err.strerror or err}") from None
    return directory


def main(argv: list[str] | None = None) -> int:
    """Validate the sweep file and base config, decide online or offline, run the trials, write the results."""
    args = parse_args(argv)
    for item in args.set:
        key = item.split("=", 1)[0].strip()
        if key in RESERVED:
            raise UserError(f"--set {key}: the sweep sets it for every trial")
    base = load_config(args.config, args.set)
    check_inputs(base)
    spec = load_sweep(args.sweep_file, args.config, tuple(args.set))
    if args.count is None and spec.run_cap is None and spec.method != "grid":
        raise UserError(f"{spec.path}: a {spec.method} search never runs out of trials: pass --count N "
                        "or set run_cap in the sweep file")
    sweep = Sweep(spec, args.config, list(args.set), base,
                  Path(args.sweep_dir) if args.sweep_dir else Path("sweeps") / spec.path.stem,
                  launcher=args.launcher, accelerate_config=args.accelerate_config, grace_s=args.grace_period)
    mode, why = choose_mode(args.mode)
    if mode == "offline" and args.sweep_id:
        raise UserError(f"--sweep-id joins an online W&B sweep, but W&B is offline ({why}); "
                        "a local sweep resumes from its --sweep-dir")
    make_output_dir(sweep.directory, "--sweep-dir", "the sweep")
    if mode == "online":
        say(f"W&B: online ({why})")
        return run_online(sweep, args.count, args.sweep_id)
    say(f"W&B: offline ({why}); running the sweep locally with Optuna")
    return run_offline(sweep, args.count)


if __name__ == "__main__":
    sys.exit(run_cli(main))
