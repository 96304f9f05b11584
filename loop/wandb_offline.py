"""Read offline W&B runs back from their `.wandb` files, with no server and no `wandb` CLI."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from loop.errors import UserError

# File layout: a 7-byte header, then LevelDB-log chunks in 32 KiB blocks counted from byte 0.
_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_CHUNK = struct.Struct("<IHB")  # crc32 of (type byte + data), data length, chunk type
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_EXPECTED = "an offline-run-* directory holding one run-<id>.wandb file, or that .wandb file"


@dataclass
class OfflineRun:
    """What one offline W&B run recorded, as plain Python values."""

    path: Path
    id: str = ""
    name: str = ""
    project: str = ""
    entity: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    notes: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)
    start_time: float | None = None
    runtime_s: float | None = None
    exit_code: int | None = None
    complete: bool = False  # an exit record was seen and the file after it is intact


class _DamagedTail(Exception):
    """The file ends in a truncated or corrupt chunk (a killed or still-running writer)."""


def find_offline_runs(*paths: Path | str) -> list[Path]:
    """Every offline-run-* directory (holding a .wandb file) under the given paths, oldest first."""
    found: dict[Path, Path] = {}
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            raise UserError(f"{root}: no such file or directory (expected a directory of offline W&B runs)")
        candidates = [root] if root.name.startswith("offline-run-") else []
        candidates += root.rglob("offline-run-*") if root.is_dir() else []
        for run_dir in candidates:
            if run_dir.is_dir() and any(run_dir.glob("*.wandb")):
                found.setdefault(run_dir.resolve(), run_dir)
    # The directory name starts with the run's start time (offline-run-YYYYmmdd_HHMMSS-<id>).
    return sorted(found.values(), key=lambda p: (p.name, str(p)))


def read_offline_run(run_dir: Path | str) -> OfflineRun:
    """Read an offline run's config, history, summary, artifacts and exit state from its .wandb file."""
    wandb_file = _locate_wandb_file(Path(run_dir))
    # Importing the protobuf module imports all of wandb (~0.3 s): only pay that when reading a run.
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    run = OfflineRun(path=wandb_file.parent, id=wandb_file.stem.removeprefix("run-"))
    runtimes: list[float] = []
    exited = intact = False
    with wandb_file.open("rb") as fh:
        head = fh.read(len(_HEADER))
        # A header cut short is a run killed at startup: it reads as empty and incomplete.
        if head != _HEADER[: len(head)]:
            raise UserError(f"{wandb_file}: not a W&B run file (bad header {head!r}, expected {_HEADER!r})")
        try:
            for payload in _payloads(fh):
                record = wandb_internal_pb2.Record()
                try:
                    record.ParseFromString(payload)
                except DecodeError as err:  # a good CRC over bad bytes is still damage
                    raise _DamagedTail from err
                exited = _apply(run, record, runtimes) or exited
            intact = True
        except _DamagedTail:
            pass
    run.config.pop("_wandb", None)
    # Like config's "_wandb", summary's "_wandb/..." keys are the SDK's own bookkeeping.
    run.summary = {k: v for k, v in run.summary.items() if k != "_wandb" and not k.startswith("_wandb/")}
    # Offline, wandb-core writes later summary records with `_runtime` 0, so the last value is not the
    # runtime; runtime only grows, so the largest value seen anywhere is.
    run.runtime_s = max(runtimes) if runtimes else None
    run.complete = exited and intact
    return run


def history_series(run: OfflineRun, key: str) -> list[tuple[int, float]]:
    """(step, value) for every history row that logged `key` (rows where it is null are skipped)."""
    series = []
    for row in run.history:
        value = row.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)):
            step = row["_step"]
            raise UserError(f"{run.path}: history key {key!r} at step {step} is not a number: {value!r}")
        series.append((int(row["_step"]), float(value)))
    return series


def _locate_wandb_file(path: Path) -> Path:
    """The .wandb file that `path` names or holds."""
    if path.is_file():
        if path.suffix != ".wandb":
            raise UserError(f"{path}: not a .wandb file (expected {_EXPECTED})")
        return path
    if not path.is_dir():
        raise UserError(f"{path}: no such file or directory (expected {_EXPECTED})")
    files = sorted(path.glob("*.wandb"))
    if len(files) != 1:
        what = "no .wandb file" if not files else f"{len(files)} .wandb files"
        raise UserError(f"{path}: {what} here (expected {_EXPECTED})")
    return files[0]


def _payloads(fh: IO[bytes]) -> Iterator[bytes]:
    """Reassembled record payloads after the header; raises _DamagedTail where the data stops making sense."""
    pending: bytes | None = None  # FIRST and MIDDLE fragments of a record split across blocks
    start = len(_HEADER)  # where the next bytes read sit inside their 32 KiB block
    while block := fh.read(_BLOCK - start):
        offset = 0
        # Fewer bytes than a chunk header before the block's end are the writer's zero padding.
        while _BLOCK - start - offset >= _CHUNK.size and offset < len(block):
            if len(block) - offset < _CHUNK.size:
                raise _DamagedTail
            crc, length, kind = _CHUNK.unpack_from(block, offset)
            data = block[offset + _CHUNK.size : offset + _CHUNK.size + length]
            if len(data) < length or zlib.crc32(bytes([kind]) + data) != crc:
                raise _DamagedTail
            offset += _CHUNK.size + length
            if kind == _FULL and pending is None:
                yield data
            elif kind == _FIRST and pending is None:
                pending = data
            elif kind == _MIDDLE and pending is not None:
                pending += data
            elif kind == _LAST and pending is not None:
                yield pending + data
                pending = None
            else:
                raise _DamagedTail
        start = 0
    if pending is not None:
        raise _DamagedTail


def _apply(run: OfflineRun, record: Any, runtimes: list[float]) -> bool:
    """Fold one Record into `run`; returns True for the exit record."""
    kind = record.WhichOneof("record_type")
    if kind == "run":
        _apply_run(run, record.run)
    elif kind == "config":
        _apply_config(run.config, record.config)
    elif kind == "summary":
        _apply_summary(run.summary, record.summary, runtimes)
    elif kind == "history":
        row = {_key(item): _decode(item.value_json) for item in record.history.item}
        # `_step` comes as an item; the record's step field is the same number, used if the item is absent.
        row.setdefault("_step", record.history.step.num)
        if isinstance(row.get("_runtime"), (int, float)):
            runtimes.append(float(row["_runtime"]))
        run.history.append(row)
    elif kind == "artifact":
        run.artifacts.append(_artifact(record.artifact))
    elif kind == "exit":
        run.exit_code = record.exit.exit_code
        if record.exit.runtime:  # proto3 ints have no "unset": 0 is what offline runs write
            runtimes.append(float(record.exit.runtime))
        return True
    return False


def _apply_run(run: OfflineRun, rec: Any) -> None:
    """Take a RunRecord's identity fields, tags, start time, config and summary."""
    # wandb writes a fresh run record, holding the whole current state, each time name/tags/notes change.
    for attr, value in (
        ("id", rec.run_id),
        ("name", rec.display_name),
        ("project", rec.project),
        ("entity", rec.entity),
        ("group", rec.run_group),
        ("job_type", rec.job_type),
        ("notes", rec.notes),
    ):
        if value:
            setattr(run, attr, value)
    run.tags = list(rec.tags)
    if rec.HasField("start_time"):
        run.start_time = rec.start_time.seconds + rec.start_time.nanos / 1e9
    _apply_config(run.config, rec.config)
    _apply_summary(run.summary, rec.summary, [])


def _apply_config(config: dict, rec: Any) -> None:
    """Merge a ConfigRecord's updates into `config`, then drop its removals."""
    for item in rec.update:
        path = list(item.nested_key) or [item.key]
        target = config
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = _unwrap(_decode(item.value_json))
    for item in rec.remove:
        path = list(item.nested_key) or [item.key]
        target = config
        for part in path[:-1]:
            target = target.get(part, {})
        target.pop(path[-1], None)


def _apply_summary(summary: dict, rec: Any, runtimes: list[float]) -> None:
    """Apply a SummaryRecord's updates and removals, noting any `_runtime` seen."""
    for item in rec.update:
        key, value = _key(item), _decode(item.value_json)
        summary[key] = value
        if key == "_runtime" and isinstance(value, (int, float)):
            runtimes.append(float(value))
    for item in rec.remove:
        summary.pop(_key(item), None)


def _artifact(rec: Any) -> dict:
    """An ArtifactRecord as a plain dict, its manifest keyed by path inside the artifact."""
    manifest = {}
    for entry in rec.manifest.contents:
        info: dict[str, Any] = {"digest": entry.digest, "size": entry.size}
        if entry.local_path:
            info["local_path"] = entry.local_path
        if entry.ref:
            info["ref"] = entry.ref
        manifest[entry.path] = info
    return {
        "name": rec.name,
        "type": rec.type,
        "aliases": list(rec.aliases),
        "metadata": json.loads(rec.metadata) if rec.metadata else {},
        "manifest": manifest,
        "description": rec.description,
        "ttl_s": rec.ttl_duration_seconds or None,  # None: no TTL of its own (kept, or the team default)
    }


def _key(item: Any) -> str:
    # wandb sends logged keys as nested_key: ["train/loss"] for a flat key, ["tbl", "_type"] for dict values.
    return "/".join(item.nested_key) if item.nested_key else item.key


def _decode(value_json: str) -> Any:
    # json.loads accepts the NaN/Infinity spellings wandb writes for non-finite floats.
    return json.loads(value_json) if value_json else None


def _unwrap(value: Any) -> Any:
    # config.yaml-style items wrap each value as {"value": ..., "desc": ...}.
    if isinstance(value, dict) and "value" in value and set(value) <= {"value", "desc"}:
        return value["value"]
    return value
