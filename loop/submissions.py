"""Leaderboard scores recorded against a run: `python -m loop.runs record RUN --lb 47.86 --submission sub.csv`.

Every score goes into RUN/leaderboard.json (a list of entries, appended atomically). Where W&B can be reached
and the run is on the server (an online run, or an offline one already synced), it also goes into the W&B run
summary (`lb` = the latest score, `lb_best` = the highest), and the submission file is logged as a
`submission` artifact by a short `submission` job that uses the run's best model artifact, so the lineage
reads model -> submission. Otherwise the entry waits, marked unpushed, for `python -m loop.runs sync`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from loop.errors import UserError

LEADERBOARD = "leaderboard.json"
SUBMISSION_HEADER = "fname,summary"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def check_run_dir(path: Path) -> Path:
    """`path` when it is a training run's output directory (it holds config.toml), else a one-line UserError."""
    from loop.report import enclosing_run_dir

    if not path.is_dir():
        raise UserError(f"{path}: no such run directory (expected a run output directory holding config.toml)")
    if not (path / "config.toml").is_file():
        inside = enclosing_run_dir(path)
        hint = f"; it is inside the run directory {inside}: pass that" if inside else ""
        raise UserError(f"{path}: not a run output directory (no config.toml){hint}")
    return path


def check_score(lb: float) -> float:
    """The leaderboard score, when it is a finite number from 0 to 100 (the x100 scale the leaderboard shows)."""
    if not (math.isfinite(lb) and 0 <= lb <= 100):
        raise UserError(f"--lb must be the leaderboard score, a number from 0 to 100, got {lb:g}")
    return lb


def check_submission(path: Path) -> str:
    """The sha256 of a submission CSV whose first line is `fname,summary`, else a one-line UserError."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise UserError(f"--submission {path}: {what} (expected the submission CSV that was uploaded)")
    try:
        data = path.read_bytes()
        header = data.decode("utf-8-sig").splitlines()[0].strip() if data else ""
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--submission {path}: cannot read it as UTF-8 text ({_first_line(err)})") from None
    if header != SUBMISSION_HEADER:
        raise UserError(f"--submission {path}: the first line is {header[:60]!r}, expected {SUBMISSION_HEADER!r} "
                        "(a file written by python -m loop.predict)")
    return hashlib.sha256(data).hexdigest()


def read_entries(out_dir: Path) -> list[dict[str, Any]]:
    """The entries of RUN/leaderboard.json ([] when there is none yet)."""
    path = out_dir / LEADERBOARD
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("lb"), int | float)
                                                    for e in entries):
            raise ValueError("expected a list of entries with an `lb` number")
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read it ({_first_line(err)}); fix or delete it") from None
    return entries


def best_score(out_dir: Path | None) -> float | None:
    """The highest leaderboard score recorded for the run, None when none is."""
    if out_dir is None:
        return None
    return max((e["lb"] for e in read_entries(out_dir)), default=None)


def _write_entries(out_dir: Path, entries: list[dict[str, Any]]) -> None:
    from loop.rundir import write_atomic

    try:
        write_atomic(out_dir / LEADERBOARD, json.dumps(entries, indent=2, ensure_ascii=False) + "\n")
    except OSError as err:
        raise UserError(f"{out_dir / LEADERBOARD}: cannot write it: {err.strerror or err}; nothing recorded") from None


def wandb_run_ref(out_dir: Path) -> tuple[str, bool] | None:
    """(W&B run id, whether the run is on the server: logged online or synced) from RUN/wandb, else None."""
    files = sorted((out_dir / "wandb").glob("*run-*/run-*.wandb"))
    if not files:
        return None
    on_server = any(f.parent.name.startswith("run-") or f.with_name(f.name + ".synced").exists() for f in files)
    return files[-1].stem.removeprefix("run-"), on_server


def record(out_dir: Path, lb: float, submission: Path | None, note: str) -> dict[str, Any]:
    """Append a leaderboard entry to RUN/leaderboard.json (validated first; nothing written on a mistake)."""
    check_run_dir(out_dir)
    check_score(lb)
    entry: dict[str, Any] = {"lb": lb, "submission": None, "sha256": None, "submission_path": None,
                             "note": note,
                             "recorded_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                             "pushed": False}
    if submission is not None:
        entry.update(submission=submission.name, sha256=check_submission(submission),
                     submission_path=str(submission.resolve()))
    entries = read_entries(out_dir)
    _write_entries(out_dir, [*entries, entry])
    return entry


def push_pending(out_dir: Path) -> str | None:
    """Push the unpushed entries of RUN/leaderboard.json to W&B: the run summary, then a submission artifact per
    entry with a file; None when all are pushed (or none waited), else why not, in one line."""
    from loop.config import load_config
    from loop.registry import server_problem
    from loop.tracking import model_artifact_due

    entries = read_entries(out_dir)
    waiting = [e for e in entries if not e.get("pushed")]
    if not waiting:
        return None
    ref = wandb_run_ref(out_dir)
    if ref is None:
        return f"cannot push the leaderboard scores of {out_dir}: the run has no W&B run (tracking was disabled)"
    run_id, on_server = ref
    if not on_server:
        return (f"the leaderboard scores of {out_dir} wait for the run's upload: "
                f"`python -m loop.runs sync {out_dir}` pushes them after it")
    if (problem := server_problem()) is not None:
        return f"cannot push the leaderboard scores of {out_dir}: {problem}; run `python -m loop.runs sync` when online"
    cfg = load_config(out_dir / "config.toml")
    has_model = model_artifact_due(cfg, at_end=False) or model_artifact_due(cfg, at_end=True)
    import wandb

    try:
        api = wandb.Api(timeout=30)
        entity = cfg.wandb.entity or api.default_entity
        api_run = api.run(f"{entity}/{cfg.wandb.project}/{run_id}")
        scores = [e["lb"] for e in entries]
        api_run.summary.update({"lb": scores[-1], "lb_best": max(scores), "lb_count": len(scores)})
        for entry in waiting:
            if entry.get("submission_path"):
                _log_submission(wandb, entity, cfg.wandb.project, run_id, entry, has_model)
            entry["pushed"] = True
    except Exception as err:  # wandb raises many types for network, auth and server failures
        _write_entries(out_dir, entries)  # the entries pushed before the failure stay marked
        return f"cannot push the leaderboard scores of {out_dir}: {_first_line(err)}"
    _write_entries(out_dir, entries)
    print(f"pushed {len(waiting)} leaderboard score(s) to W&B run {entity}/{cfg.wandb.project}/{run_id}", flush=True)
    return None


def _log_submission(wandb: Any, entity: str, project: str, run_id: str, entry: dict[str, Any],
                    has_model: bool) -> None:
    """The submission file as a `submission` artifact, logged by a `submission` job that uses the model."""
    path = Path(entry["submission_path"])
    if check_submission(path) != entry["sha256"]:
        raise UserError(f"--submission {path}: changed since its score was recorded; record it again")
    with wandb.init(entity=entity, project=project, job_type="submission", name=f"submission-{run_id}",
                    config={"run_id": run_id}, mode="online") as sub:
        if has_model:
            sub.use_artifact(f"{entity}/{project}/model-{run_id}:best", type="model")
        art = wandb.Artifact(f"submission-{run_id}", type="submission",
                             metadata={k: entry[k] for k in ("lb", "note", "sha256", "recorded_at")})
        art.add_file(str(path), name=entry["submission"])
        sub.log_artifact(art)
        sub.summary.update({"lb": entry["lb"]})
