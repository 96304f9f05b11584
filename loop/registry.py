"""The W&B Registry: a run's final best model linked to `wandb-registry-model/<collection>`, and models fetched
by an artifact or registry reference (`entity/project/model-<id>:best`, `wandb-registry-model/<name>:best`).

Offline, `run.link_artifact` cannot work, so the link to make is written to RUN/registry_link.json and
`python -m loop.runs sync` makes it after the run is uploaded. Nothing here imports wandb until it is needed.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
from pathlib import Path
from typing import Any

from loop.errors import UserError, storage_reason

PENDING_LINK = "registry_link.json"
REGISTRY_PREFIX = "wandb-registry-"
# name:alias or name:vN, the name optionally prefixed by project or entity/project.
_REFERENCE = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+){0,2}:[A-Za-z0-9._-]+")


def registry_target(collection: str) -> str:
    """The registry path of a model collection."""
    return f"{REGISTRY_PREFIX}model/{collection}"


def is_reference(spec: str) -> bool:
    """True when `spec` names a W&B artifact (`[entity/]project/name:alias`) or a registry entry rather than a
    local directory: a registry path, or the artifact form when no such local path exists."""
    if spec.startswith(REGISTRY_PREFIX):
        return True
    return _REFERENCE.fullmatch(spec) is not None and not Path(spec).exists()


def server_problem() -> str | None:
    """Why W&B cannot be used from here (no API key, or no answer from the server in 5 s), else None."""
    from loop.tracking import has_api_key

    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not has_api_key():
        return "no W&B API key configured: run `wandb login` or set WANDB_API_KEY"
    import requests

    # wandb itself retries an unreachable server for minutes: ask once, briefly (requests honours proxy settings).
    try:
        requests.head(base, timeout=5.0)
    except requests.RequestException as err:
        return f"cannot reach the W&B server {base} ({type(err).__name__}); check the network or WANDB_BASE_URL"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def model_cache_dir() -> Path:
    """Where referenced models are downloaded: $LOOP_MODEL_CACHE, else ~/.cache/loop/models."""
    return Path(os.environ.get("LOOP_MODEL_CACHE") or Path.home() / ".cache" / "loop" / "models")


def download_model(reference: str) -> Path:
    """Download a referenced model artifact through wandb.Api and return its local directory."""
    problem = server_problem()
    if problem is not None:
        raise UserError(f"--model {reference}: cannot download this W&B reference: {problem} "
                        "(a local model directory works offline)")
    import wandb

    try:
        art = wandb.Api(timeout=30).artifact(reference, type="model")
    except Exception as err:  # wandb raises CommError, ValueError, requests errors, ... for a bad reference
        raise UserError(f"--model {reference}: cannot fetch it from W&B: {_first_line(err)}") from None
    # One directory per source version: `:best` moving on later downloads the new one beside the old.
    root = model_cache_dir() / re.sub(r"[^A-Za-z0-9._-]", "_", art.source_qualified_name)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        lock = open(root.with_name(root.name + ".lock"), "a")  # noqa: SIM115 (held across the download)
    except OSError as err:
        raise UserError(f"--model {reference}: cannot write the model cache {root.parent}: {storage_reason(err)} "
                        "(set LOOP_MODEL_CACHE to a writable directory)") from None
    with lock:
        # Every process of an `accelerate launch` (and any other predict on this machine) downloads into the same
        # directory: one at a time, so none reads files another is still writing; the later ones find them whole.
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        try:
            path = Path(art.download(root=str(root)))
        except Exception as err:  # network, auth, a full disk: all one line
            raise UserError(f"--model {reference}: cannot fetch it from W&B: {_first_line(err)}") from None
    print(f"model {reference} downloaded to {path}", flush=True)
    return path


def write_pending_link(out_dir: Path, entity: str, project: str, run_id: str, target: str) -> Path:
    """Record in RUN/registry_link.json which artifact to link where (atomically), for `runs sync`."""
    from loop.rundir import write_atomic

    path = out_dir / PENDING_LINK
    write_atomic(path, json.dumps({"entity": entity, "project": project, "artifact": f"model-{run_id}:best",
                                   "target": target, "aliases": ["best"], "linked_at": None}, indent=2) + "\n")
    return path


def read_pending_link(out_dir: Path) -> dict[str, Any] | None:
    """The link recorded in RUN/registry_link.json that is not made yet, else None."""
    path = out_dir / PENDING_LINK
    if not path.is_file():
        return None
    try:
        pending = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(pending, dict) or not all(isinstance(pending.get(k), str) and pending[k]
                                                    for k in ("project", "artifact", "target")):
            raise ValueError("not a registry link record")
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read it ({_first_line(err)}); delete it or write it again") from None
    return None if pending.get("linked_at") else pending


def link_pending(out_dir: Path) -> str | None:
    """Make the link that RUN/registry_link.json records, through wandb.Api; None when linked (or nothing was
    pending), else why not, in one line."""
    from loop.rundir import write_atomic

    pending = read_pending_link(out_dir)
    if pending is None:
        return None
    name = f"{pending['project']}/{pending['artifact']}"
    what = f"link {name} to {pending['target']}"
    if (problem := server_problem()) is not None:
        return f"cannot {what}: {problem}; run `python -m loop.runs sync {out_dir}` when online"
    import wandb

    try:
        api = wandb.Api(timeout=30)
        entity = pending.get("entity") or api.default_entity
        api.artifact(f"{entity}/{name}", type="model").link(pending["target"], aliases=pending.get("aliases"))
    except Exception as err:  # wandb raises many types for network, auth and server failures
        return f"cannot {what}: {_first_line(err)}"
    pending["linked_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    write_atomic(out_dir / PENDING_LINK, json.dumps(pending, indent=2) + "\n")
    print(f"linked {name} to {pending['target']} (alias {', '.join(pending.get('aliases') or [])})", flush=True)
    return None
