"""Tests for loop.wandb_offline: read back real offline W&B runs, and damaged or hand-built .wandb files."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from loop.errors import UserError
from loop.wandb_offline import OfflineRun, find_offline_runs, history_series, read_offline_run

BLOCK = 32 * 1024
HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4

CONFIG = {
    "lr": 3e-5,
    "epochs": 3,
    "use_fp16": False,
    "warmup": None,
    "model": {"name": "gogamza/kobart-base-v2", "max_len": {"source": 512, "target": 128}},
    "seeds": [1, 2, 3],
    "prompt": "대화를 요약하세요",
    # ~90 KB of UTF-8 in one record, so the run record spans blocks as FIRST/MIDDLE/LAST chunks.
    "long_text": "가" * 30000,
}
LOSSES = {0: 2.5, 10: 1.75, 20: 1.125, 30: 0.875}
ROUGE = {20: 0.3125, 30: 0.34375}
TABLE_STEP = 20
TABLE_ROWS = [[1, "요약"], [2, "b"]]
MODEL_FILES = {"model.safetensors": b"\x00\x01" * 64, "config.json": b'{"d_model": 768}'}
METADATA = {"step": 20, "rouge_l": 0.3125, "tokenizer": "kobart"}


@dataclass
class Logged:
    """What the fixture logged, to compare the read-back against."""

    run_dir: Path
    run_id: str
    second_dir: Path
    started: float
    finished: float
    files_dir: Path


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Logged:
    """Log two real offline runs with wandb (one full, one tiny), in an environment confined to tmp."""
    wandb = pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("wandb_offline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
            (root / var.lower()).mkdir()
            mp.setenv(var, str(root / var.lower()))
        files_dir = root / "checkpoint"
        files_dir.mkdir()
        for name, data in MODEL_FILES.items():
            (files_dir / name).write_bytes(data)

        # wandb caches its settings (WANDB_DIR included) at the first setup in a process: an earlier test in
        # this pytest process would otherwise send the first run to that test's directory.
        wandb.teardown()
        started = time.time()
        run = wandb.init(
            project="loop-test",
            name="kobart-lr3e-5",
            group="sweep-a",
            job_type="train",
            tags=["kobart", "dialogsum"],
            notes="offline read-back test",
            config=CONFIG,
        )
        run.config.update({"batch_size": 8})
        for step, loss in LOSSES.items():
            run.log({"train/loss": loss, "train/lr": 3e-5}, step=step)
            if step in ROUGE:
                # A second log call at the same step merges into the same history row.
                row = {"eval/rouge_l": ROUGE[step]}
                if step == TABLE_STEP:
                    row["eval/samples"] = wandb.Table(columns=["id", "summary"], data=TABLE_ROWS)
                run.log(row, step=step)
        run.summary["best/rouge_l"] = ROUGE[30]
        art = wandb.Artifact("kobart-best", type="model", description="best checkpoint", metadata=METADATA)
        for name in MODEL_FILES:
            art.add_file(str(files_dir / name))
        art.add_reference((files_dir / "config.json").as_uri(), name="ref/config.json")
        run.log_artifact(art, aliases=["best", "step-20"])
        run_id, run_dir = run.id, Path(run.dir).parent
        run.finish()
        finished = time.time()
        wandb.teardown()

        second = wandb.init(project="loop-test", name="second")
        second.log({"x": 1.0})
        second_dir = Path(second.dir).parent
        second.finish()
        wandb.teardown()
    return Logged(run_dir, run_id, second_dir, started, finished, files_dir)


@pytest.fixture(scope="module")
def full(logged: Logged) -> OfflineRun:
    return read_offline_run(logged.run_dir)


def test_run_fields(full: OfflineRun, logged: Logged) -> None:
    assert full.path == logged.run_dir
    assert full.path.name.startswith("offline-run-") and full.path.name.endswith(logged.run_id)
    assert (full.id, full.name, full.project) == (logged.run_id, "kobart-lr3e-5", "loop-test")
    assert full.entity == ""  # offline runs record no entity unless one is passed
    assert (full.group, full.job_type, full.notes) == ("sweep-a", "train", "offline read-back test")
    assert full.tags == ["kobart", "dialogsum"]
    assert full.start_time is not None and logged.started - 1 <= full.start_time <= logged.finished
    assert full.runtime_s is not None and 0 < full.runtime_s <= logged.finished - logged.started
    assert (full.exit_code, full.complete) == (0, True)


def test_config(full: OfflineRun) -> None:
    assert full.config == {**CONFIG, "batch_size": 8}


def test_history_rows(full: OfflineRun) -> None:
    assert [row["_step"] for row in full.history] == list(LOSSES)
    for row in full.history:
        step = row["_step"]
        assert row["train/loss"] == LOSSES[step]
        assert row["train/lr"] == 3e-5
        assert row.get("eval/rouge_l") == ROUGE.get(step)
        assert {"_runtime", "_timestamp"} <= set(row)


def test_table_appears_as_flattened_file_reference(full: OfflineRun, logged: Logged) -> None:
    row = next(r for r in full.history if r["_step"] == TABLE_STEP)
    assert row["eval/samples/_type"] == "table-file"
    assert (row["eval/samples/nrows"], row["eval/samples/ncols"]) == (2, 2)
    table = json.loads((logged.run_dir / "files" / row["eval/samples/path"]).read_text())
    assert table["columns"] == ["id", "summary"] and table["data"] == TABLE_ROWS
    assert not any(k.startswith("eval/samples") for r in full.history if r is not row for k in r)


def test_summary(full: OfflineRun) -> None:
    assert full.summary["best/rouge_l"] == ROUGE[30]
    assert full.summary["train/loss"] == LOSSES[30]
    assert full.summary["eval/rouge_l"] == ROUGE[30]
    assert full.summary["_step"] == 30
    assert not any(k.startswith("_wandb") for k in full.summary)


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def test_model_artifact(full: OfflineRun, logged: Logged) -> None:
    models = [a for a in full.artifacts if a["type"] == "model"]
    assert len(models) == 1
    art = models[0]
    assert (art["name"], art["description"], art["metadata"]) == ("kobart-best", "best checkpoint", METADATA)
    assert sorted(art["aliases"]) == ["best", "latest", "step-20"]
    assert set(art["manifest"]) == {*MODEL_FILES, "ref/config.json"}
    for name, data in MODEL_FILES.items():
        entry = dict(art["manifest"][name])
        assert Path(entry.pop("local_path")).read_bytes() == data  # the staged copy, kept until synced
        assert entry == {"digest": _md5_b64(data), "size": len(data)}
    config_json = MODEL_FILES["config.json"]
    assert art["manifest"]["ref/config.json"] == {
        "digest": _md5_b64(config_json),
        "size": len(config_json),
        "ref": (logged.files_dir / "config.json").as_uri(),
    }


def test_table_is_logged_as_run_table_artifact(full: OfflineRun, logged: Logged) -> None:
    tables = [a for a in full.artifacts if a["type"] == "run_table"]
    assert len(tables) == 1
    # A key with "/" gets a hash suffix: run-<id>-evalsamples-<hash>.
    assert tables[0]["name"].startswith(f"run-{logged.run_id}-evalsamples")
    assert list(tables[0]["manifest"]) == ["eval/samples.table.json"]


def test_history_series(full: OfflineRun) -> None:
    assert history_series(full, "train/loss") == list(LOSSES.items())
    assert history_series(full, "eval/rouge_l") == list(ROUGE.items())
    assert history_series(full, "missing") == []
    with pytest.raises(UserError, match="eval/samples/_type"):
        history_series(full, "eval/samples/_type")


def test_reads_the_wandb_file_itself(full: OfflineRun, logged: Logged) -> None:
    (wandb_file,) = logged.run_dir.glob("*.wandb")
    assert read_offline_run(str(wandb_file)) == full


def test_truncated_copies_read_a_prefix(full: OfflineRun, logged: Logged, tmp_path: Path) -> None:
    data = next(logged.run_dir.glob("*.wandb")).read_bytes()
    cut_file = tmp_path / f"run-{logged.run_id}.wandb"
    partial_seen = False
    for cut in [0, 3, len(HEADER), *range(len(HEADER) + 1, len(data), len(data) // 40), len(data) - 1]:
        cut_file.write_bytes(data[:cut])
        run = read_offline_run(cut_file)
        assert run.complete is False, cut
        assert run.id == logged.run_id
        assert run.history == full.history[: len(run.history)], cut
        partial_seen |= 0 < len(run.history) < len(full.history)
    assert partial_seen


def test_corrupt_chunk_stops_reading(full: OfflineRun, logged: Logged, tmp_path: Path) -> None:
    data = bytearray(next(logged.run_dir.glob("*.wandb")).read_bytes())
    middle = len(data) // 2
    if middle % BLOCK >= BLOCK - 7:  # a block trailer is padding, which no CRC covers
        middle -= 7
    data[middle] ^= 0xFF
    bad = tmp_path / "run-bad.wandb"
    bad.write_bytes(bytes(data))
    run = read_offline_run(bad)
    assert run.complete is False
    assert run.history == full.history[: len(run.history)]


def test_find_offline_runs(logged: Logged, tmp_path: Path) -> None:
    root = logged.run_dir.parent.parent
    found = find_offline_runs(root)
    assert set(found) == {logged.run_dir, logged.second_dir}
    assert found == sorted(found, key=lambda p: p.name)
    again = find_offline_runs(logged.run_dir, root / "wandb" / ".." / "wandb")
    assert [p.resolve() for p in again] == [p.resolve() for p in found]
    assert find_offline_runs(logged.run_dir) == [logged.run_dir]
    (tmp_path / "offline-run-20250101_000000-nofile").mkdir()
    (tmp_path / "offline-run-20250101_000000-file.txt").write_text("not a run")
    assert find_offline_runs(tmp_path) == []
    with pytest.raises(UserError, match="nope"):
        find_offline_runs(tmp_path / "nope")


def test_find_sorts_by_start_time_not_path(tmp_path: Path) -> None:
    later = tmp_path / "a" / "offline-run-20250101_000000-aaa"
    earlier = tmp_path / "b" / "offline-run-20240101_000000-zzz"
    for run_dir in (later, earlier):
        run_dir.mkdir(parents=True)
        (run_dir / f"run-{run_dir.name[-3:]}.wandb").write_bytes(HEADER)
    assert find_offline_runs(tmp_path) == [earlier, later]


def test_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=rf"{tmp_path}: no \.wandb file here \(expected an offline-run-"):
        read_offline_run(tmp_path)
    with pytest.raises(UserError, match="no such file"):
        read_offline_run(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"notes\.txt: not a \.wandb file"):
        read_offline_run(tmp_path / "notes.txt")
    (tmp_path / "run-x.wandb").write_bytes(b"SQLite format 3\x00")
    with pytest.raises(UserError, match="not a W&B run file"):
        read_offline_run(tmp_path / "run-x.wandb")
    (tmp_path / "run-y.wandb").write_bytes(HEADER)
    with pytest.raises(UserError, match=r"2 \.wandb files here"):
        read_offline_run(tmp_path)


def test_import_does_not_load_wandb() -> None:
    code = "import sys, loop.wandb_offline; sys.exit('wandb' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# Hand-built files: the edge cases a real run only hits by chance.


def _write_log(path: Path, records: list) -> None:
    """Write records in the .wandb framing: 32 KiB blocks, zero-padded trailers, split chunks."""
    out = bytearray(HEADER)
    for record in records:
        payload, first = record.SerializeToString(), True
        while first or payload:
            room = BLOCK - len(out) % BLOCK
            if room < 7:
                out += bytes(room)
                continue
            piece, payload = payload[: room - 7], payload[room - 7 :]
            kind = (FULL if not payload else FIRST) if first else (LAST if not payload else MIDDLE)
            out += struct.pack("<IHB", zlib.crc32(bytes([kind]) + piece), len(piece), kind) + piece
            first = False
    path.write_bytes(bytes(out))


def _config_record(pb, size: int, **values: object):
    """A config record serialized to exactly `size` bytes, padded with a filler string."""
    for filler in range(size, 0, -1):
        record = pb.Record()
        for key, value in {**values, "filler": "x" * filler}.items():
            record.config.update.add(key=key, value_json=json.dumps(value))
        if record.ByteSize() == size:
            return record
    raise AssertionError(size)


@pytest.fixture
def pb():
    return pytest.importorskip("wandb.proto.wandb_internal_pb2")


def _hand_built_records(pb, exit_runtime: int) -> list:
    """A run whose first record pair ends 3 bytes short of block 0, then a 3-block record, then updates."""
    run = pb.Record()
    run.run.run_id, run.run.display_name, run.run.project, run.run.notes = "abc", "first", "p", "n"
    run.run.tags.extend(["t1"])
    run.run.config.update.add(key="wrapped", value_json='{"value": 5, "desc": null}')
    run.run.config.update.add(key="gone", value_json="1")
    filler = _config_record(pb, BLOCK - len(HEADER) - 7 - run.ByteSize() - 7 - 3, a=1)
    big = _config_record(pb, 3 * BLOCK, b=2)
    nested = pb.Record()
    nested.config.update.add(nested_key=["model", "dropout"], value_json="0.25")
    nested.config.remove.add(key="gone")
    rename = pb.Record()
    rename.run.run_id, rename.run.display_name = "abc", "renamed"
    rename.run.tags.extend(["t1", "t2"])
    history = pb.Record()
    history.history.step.num = 7  # no `_step` item: the step comes from the record's step field
    history.history.item.add(nested_key=["eval", "rouge_l"], value_json="0.625")
    history.history.item.add(key="_runtime", value_json="12.5")
    summary = pb.Record()
    summary.summary.update.add(key="kept", value_json='"yes"')
    summary.summary.update.add(key="dropped", value_json="1")
    # As offline wandb-core does after the last history row.
    summary.summary.update.add(nested_key=["_wandb", "runtime"], value_json="0")
    summary.summary.update.add(key="_runtime", value_json="0")
    unsummary = pb.Record()
    unsummary.summary.remove.add(key="dropped")
    done = pb.Record()
    done.exit.exit_code, done.exit.runtime = 1, exit_runtime
    return [run, filler, big, nested, rename, history, summary, unsummary, done]


def test_hand_built_file(pb, tmp_path: Path) -> None:
    records = _hand_built_records(pb, exit_runtime=40)
    assert len(HEADER) + 7 + records[0].ByteSize() + 7 + records[1].ByteSize() == BLOCK - 3
    path = tmp_path / "run-abc.wandb"
    _write_log(path, records)

    got = read_offline_run(path)
    # The rename record leaves project and notes empty: earlier values stay.
    assert (got.id, got.name, got.project, got.notes, got.tags) == ("abc", "renamed", "p", "n", ["t1", "t2"])
    big_filler = json.loads(records[2].config.update[-1].value_json)
    assert got.config == {"wrapped": 5, "a": 1, "b": 2, "filler": big_filler, "model": {"dropout": 0.25}}
    assert got.history == [{"eval/rouge_l": 0.625, "_runtime": 12.5, "_step": 7}]
    assert got.summary == {"kept": "yes", "_runtime": 0}
    assert (got.exit_code, got.runtime_s, got.complete) == (1, 40.0, True)


def test_runtime_is_the_largest_seen(pb, tmp_path: Path) -> None:
    path = tmp_path / "run-abc.wandb"
    _write_log(path, _hand_built_records(pb, exit_runtime=0))
    assert read_offline_run(path).runtime_s == 12.5


def test_flipped_byte_fails_the_crc(pb, tmp_path: Path) -> None:
    path = tmp_path / "run-abc.wandb"
    _write_log(path, _hand_built_records(pb, exit_runtime=40))
    data = bytearray(path.read_bytes())
    data[data.index(b"0.625") + 4] ^= 0x01  # "0.625" -> "0.624": still valid protobuf and JSON
    path.write_bytes(bytes(data))
    got = read_offline_run(path)
    assert (got.name, got.history, got.complete) == ("renamed", [], False)


@pytest.mark.parametrize("cut", ["mid-chunk", "missing-last-chunk"])
def test_damage_after_the_exit_record_is_incomplete(pb, tmp_path: Path, cut: str) -> None:
    late = _config_record(pb, 2 * BLOCK, late=1)
    path = tmp_path / "run-abc.wandb"
    _write_log(path, [*_hand_built_records(pb, exit_runtime=40), late])
    data = path.read_bytes()
    # The late record's FIRST/MIDDLE chunks fill their blocks, so its LAST chunk starts the last block.
    path.write_bytes(data[:-2] if cut == "mid-chunk" else data[: len(data) - len(data) % BLOCK])
    got = read_offline_run(path)
    assert (got.exit_code, got.complete, "late" in got.config) == (1, False, False)
