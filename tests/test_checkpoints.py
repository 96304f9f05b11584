"""Checkpoints hold no pickles and never run code; each is verified against its manifest before use; a damaged
one is skipped by `--resume auto` (named, with the reason) and refused in one line by `--resume PATH`."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from loop import checkpoints
from loop.checkpoints import DamagedCheckpoint, encode_state, find_resume_checkpoint, read_state, verify, write_state
from loop.errors import UserError
from tests.conftest import finished_run, run_train

RUN = ["training.max_steps=4", "evaluation.save_steps=2", "evaluation.eval_steps=100", "evaluation.eval_on_start=false",
       "evaluation.keep_last_checkpoints=0", "wandb.table_rows=0", "training.output_dir=out"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run directory with two checkpoints, step_2 and step_4."""
    return finished_run(tmp_path_factory, "trained", *RUN) / "out"


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A fresh copy of the trained run (cwd = tmp_path), for one test to damage."""
    shutil.copytree(trained, tmp_path / "out")
    return tmp_path / "out"


def rewrite_manifest(ckpt: Path) -> None:
    """Recompute the manifest, as someone crafting a checkpoint would (the files then 'verify')."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"] = {p.relative_to(ckpt).as_posix(): {"size": p.stat().st_size,
                                                          "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                         for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


class WritesMarker:
    """A pickle that, when unpickled, creates a marker file (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_holds_only_safetensors_and_json(trained):
    for ckpt in (trained / "checkpoints/step_2", trained / "checkpoints/step_4"):
        names = sorted(p.name for p in ckpt.iterdir())
        assert names == ["manifest.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
                         "rng_0.json", "rng_0.safetensors", "scheduler.json", "trainer_state.json"]
        for path in ckpt.iterdir():
            head = path.read_bytes()[:2]
            assert head not in (b"\x80\x02", b"\x80\x04", b"PK"), f"{path.name} looks like a pickle / torch.save zip"
            if path.suffix == ".json":
                json.loads(path.read_text())
        verify(ckpt)


def test_a_pickle_planted_in_a_checkpoint_never_runs(run_copy):
    marker = run_copy.parent / "marker"
    ckpt = run_copy / "checkpoints/step_4"
    # Where accelerate, torch or transformers would look for a pickled state.
    for where in ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl", "scheduler.pkl",
                  "scheduler.bin", "scaler.pt", "sampler.bin", "pytorch_model.bin", "training_args.bin"):
        (ckpt / where).write_bytes(pickle.dumps(WritesMarker(marker)))
    rewrite_manifest(ckpt)  # even listed in the manifest, they are never opened
    verify(ckpt)
    proc = run_train(run_copy.parent, *RUN, "training.max_steps=6", extra_args=("--resume", str(ckpt)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and not marker.exists()


def test_a_pickle_in_place_of_a_state_file_is_refused_without_running(run_copy):
    marker = run_copy.parent / "marker"
    ckpt = run_copy / "checkpoints/step_4"
    (ckpt / "optimizer.safetensors").write_bytes(pickle.dumps(WritesMarker(marker)))
    rewrite_manifest(ckpt)
    proc = run_train(run_copy.parent, *RUN, "training.max_steps=6", extra_args=("--resume", str(ckpt)))
    assert proc.returncode == 2 and not marker.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "optimizer cannot be read" in lines[0], lines


def test_an_old_accelerate_checkpoint_with_pickles_is_skipped_unopened(run_copy):
    marker = run_copy.parent / "marker"
    old = run_copy / "checkpoints/step_6"
    old.mkdir()
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        (old / name).write_bytes(pickle.dumps(WritesMarker(marker)))
    shutil.copy(run_copy / "checkpoints/step_4/model.safetensors", old)
    state = json.loads((run_copy / "checkpoints/step_4/trainer_state.json").read_text())
    (old / "trainer_state.json").write_text(json.dumps({**state, "step": 6}))
    found, skipped = find_resume_checkpoint("auto", str(run_copy))
    assert found == run_copy / "checkpoints/step_4"
    assert any(path == old for path, _ in skipped)
    with pytest.raises(UserError, match=re.escape("no manifest.json")):
        find_resume_checkpoint(str(old), str(run_copy))
    assert not marker.exists()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = [
    ("model.safetensors", truncate, "model.safetensors has"),
    ("model.safetensors", flip_byte, "model.safetensors does not match its checksum"),
    ("optimizer.safetensors", flip_byte, "optimizer.safetensors does not match its checksum"),
    ("optimizer.json", lambda p: p.write_text("{"), "optimizer.json has"),
    ("scheduler.json", lambda p: p.unlink(), "scheduler.json is missing"),
    ("rng_0.safetensors", truncate, "rng_0.safetensors has"),
    ("rng_0.json", flip_byte, "rng_0.json does not match its checksum"),
    ("trainer_state.json", lambda p: p.write_text("not json"), "trainer_state.json has"),
    ("manifest.json", lambda p: p.write_text("{"), "manifest.json is damaged"),
    ("manifest.json", lambda p: p.unlink(), "no manifest.json"),
]


@pytest.mark.parametrize(("name", "damage", "reason"), DAMAGE, ids=[f"{n}-{d.__name__}" for n, d, _ in DAMAGE])
def test_each_damaged_file_is_detected_and_resume_auto_takes_the_older_one(run_copy, name, damage, reason):
    ckpt = run_copy / "checkpoints/step_4"
    damage(ckpt / name)
    with pytest.raises(DamagedCheckpoint, match=re.escape(reason)):
        verify(ckpt)
    found, skipped = find_resume_checkpoint("auto", str(run_copy))
    assert found == run_copy / "checkpoints/step_2"
    assert skipped and skipped[0][0] == ckpt and reason in skipped[0][1]
    with pytest.raises(UserError, match=re.escape(f"unusable checkpoint: {reason}")):
        find_resume_checkpoint(str(ckpt), str(run_copy))


def test_a_state_file_that_verifies_but_is_not_a_loop_state_is_refused(run_copy):
    ckpt = run_copy / "checkpoints/step_4"
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": "four"}))
    rewrite_manifest(ckpt)
    with pytest.raises(DamagedCheckpoint, match=re.escape("trainer_state.json is not a loop state")):
        verify(ckpt)


def test_resume_auto_skips_a_damaged_newest_checkpoint_and_names_it(run_copy):
    truncate(run_copy / "checkpoints/step_4/model.safetensors")
    proc = run_train(run_copy.parent, *RUN, extra_args=("--resume", "auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: skipping damaged checkpoint out/checkpoints/step_4: model.safetensors has" in proc.stdout
    assert "resumed from out/checkpoints/step_2 at step 2" in proc.stdout
    verify(run_copy / "checkpoints/step_4")  # written again, whole


def test_resume_path_to_a_damaged_checkpoint_is_one_line_and_touches_nothing(run_copy):
    flip_byte(run_copy / "checkpoints/step_4/optimizer.safetensors")
    before = sorted((str(p), p.stat().st_mtime_ns) for p in run_copy.rglob("*"))
    proc = run_train(run_copy.parent, *RUN, extra_args=("--resume", "out/checkpoints/step_4"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: --resume out/checkpoints/step_4: unusable checkpoint: optimizer.safetensors "
                               "does not match its checksum")
    assert sorted((str(p), p.stat().st_mtime_ns) for p in run_copy.rglob("*")) == before


def test_states_round_trip_through_json_and_safetensors(tmp_path):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([param], lr=0.1, betas=(0.8, 0.95), fused=True)
    param.grad = torch.randn(4, 3)
    opt.step()
    random.seed(3)
    np.random.seed(4)
    states = {"optimizer": opt.state_dict(), "rng": checkpoints.rng_state(),
              "odd": {1: (2.5, None, [True, "x"]), "nan": float("nan")}}
    for name, state in states.items():
        write_state(tmp_path, name, *encode_state(state, name))
    back = read_state(tmp_path, "optimizer")
    assert back["param_groups"][0]["betas"] == [0.8, 0.95] or back["param_groups"][0]["betas"] == (0.8, 0.95)
    assert torch.equal(back["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    rng = read_state(tmp_path, "rng")
    expected = random.random(), np.random.rand()
    checkpoints.set_rng_state(rng)
    assert (random.random(), np.random.rand()) == expected
    odd = read_state(tmp_path, "odd")
    assert odd[1] == (2.5, None, [True, "x"]) and odd["nan"] != odd["nan"]


def test_a_checkpoint_with_another_steps_state_or_foreign_paths_is_refused(run_copy):
    ckpts = run_copy / "checkpoints"
    shutil.copytree(ckpts / "step_2", ckpts / "step_5")  # a copy under the wrong name
    with pytest.raises(DamagedCheckpoint, match=re.escape("trainer_state.json says step 2")):
        verify(ckpts / "step_5")
    manifest = json.loads((ckpts / "step_4/manifest.json").read_text())
    manifest["files"]["../../config.toml"] = {"size": 1, "sha256": "0"}
    (ckpts / "step_4/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DamagedCheckpoint, match=re.escape("lists '../../config.toml', which is not a file")):
        verify(ckpts / "step_4")


def test_a_linked_file_in_a_checkpoint_is_refused(run_copy):
    ckpt = run_copy / "checkpoints/step_4"
    target = run_copy.parent / "elsewhere.safetensors"
    (ckpt / "model.safetensors").rename(target)
    (ckpt / "model.safetensors").symlink_to(target)
    with pytest.raises(DamagedCheckpoint, match=re.escape("model.safetensors is a link")):
        verify(ckpt)


def test_resume_paths_that_are_not_checkpoints_are_one_line(run_copy):
    (run_copy / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="is a file; give a checkpoint directory"):
        find_resume_checkpoint(str(run_copy / "notes.txt"), str(run_copy))
    with pytest.raises(UserError, match="no such checkpoint or run directory"):
        find_resume_checkpoint(str(run_copy / "nope"), str(run_copy))
    with pytest.raises(UserError, match="no intact checkpoint under"):
        find_resume_checkpoint(str(run_copy / "best"), str(run_copy))
