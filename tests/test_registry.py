"""The W&B Registry: the final best model's link (made online, recorded offline and made by `runs sync`), and
`predict --model` with an artifact or registry reference. W&B's server is replaced by fakes where one is needed."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import ClassVar

import pytest

from loop import predict, registry, runs, tracking
from loop.config import load_config
from loop.errors import UserError, run_cli
from loop.wandb_offline import find_offline_runs, read_offline_run

TARGET = "wandb-registry-model/dialogsum-kobart"
UNREACHABLE = "http://127.0.0.1:9"  # nothing listens on the discard port


def no_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc


class FakeArtifact:
    """What wandb.Api().artifact returns, as far as loop uses it; `download` copies a real model directory."""

    def __init__(self, calls: list, source: Path | None = None):
        self.calls, self.source = calls, source
        self.source_qualified_name = "team/dialogue-summarization/model-abc123:v3"

    def link(self, target, aliases=None):
        self.calls.append(("link", target, list(aliases or [])))

    def download(self, root=None):
        self.calls.append(("download", root))
        shutil.copytree(self.source, root, dirs_exist_ok=True)
        return root


class FakeApi:
    """wandb.Api with no server behind it: it records what it was asked."""

    calls: ClassVar[list] = []
    source: ClassVar[Path | None] = None
    default_entity = "team"

    def __init__(self, timeout=None):
        pass

    def artifact(self, name, type=None):
        FakeApi.calls.append(("artifact", name, type))
        return FakeArtifact(FakeApi.calls, FakeApi.source)


@pytest.fixture
def fake_wandb(monkeypatch):
    """wandb.Api replaced by FakeApi, with the server check passing."""
    import wandb

    FakeApi.calls, FakeApi.source = [], None
    monkeypatch.setattr(wandb, "Api", FakeApi)
    monkeypatch.setattr(registry, "server_problem", lambda: None)
    return FakeApi


# ---- the link ------------------------------------------------------------------------------------------------

def test_an_offline_run_records_the_link_for_sync(final_best_run):
    out = final_best_run["out"]
    run_id = read_offline_run(find_offline_runs(out)[0]).id
    pending = registry.read_pending_link(out)
    assert pending == {"entity": "", "project": "dialogue-summarization", "artifact": f"model-{run_id}:best",
                       "target": TARGET, "aliases": ["best"], "linked_at": None}
    assert f"registry: {TARGET} will be linked by `python -m loop.runs sync run`" in final_best_run["stdout"]


class FakeRun:
    """The parts of a wandb Run that link_final_best uses."""

    id, entity = "abc123", "team"

    def __init__(self):
        self.linked = []

    def link_artifact(self, artifact, target_path, aliases=None):
        self.linked.append((artifact, target_path, aliases))


def test_an_online_run_links_the_artifact_it_logged(tmp_path, capsys, monkeypatch):
    cfg = load_config(None, ["wandb.registry_collection=dialogsum-kobart", "wandb.model_artifacts=final_best"])
    run, art = FakeRun(), object()
    monkeypatch.setitem(tracking._logged_models, run.id, art)
    tracking.link_final_best(run, cfg, tmp_path, "online")
    assert run.linked == [(art, TARGET, ["best"])]
    assert not (tmp_path / registry.PENDING_LINK).exists()
    assert f"linked model-abc123:best to {TARGET} (alias best)" in capsys.readouterr().out


def test_a_resumed_online_launch_with_no_new_best_links_through_the_api(tmp_path, capsys, fake_wandb):
    cfg = load_config(None, ["wandb.registry_collection=dialogsum-kobart"])
    run = FakeRun()
    tracking.link_final_best(run, cfg, tmp_path, "online")
    assert run.linked == []  # it has no artifact object of this launch to pass
    assert fake_wandb.calls == [("artifact", "team/dialogue-summarization/model-abc123:best", "model"),
                                ("link", TARGET, ["best"])]
    assert json.loads((tmp_path / registry.PENDING_LINK).read_text())["linked_at"]


def test_no_link_without_a_collection(tmp_path):
    run = FakeRun()
    tracking.link_final_best(run, load_config(None, []), tmp_path, "offline")
    assert run.linked == [] and not (tmp_path / registry.PENDING_LINK).exists()


def copied_run(final_best_run, tmp_path) -> Path:
    shutil.copytree(final_best_run["out"], tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def test_sync_links_the_model_right_after_the_upload(final_best_run, tmp_path, capsys, monkeypatch, fake_wandb):
    out = copied_run(final_best_run, tmp_path)
    run_id = read_offline_run(find_offline_runs(out)[0]).id
    uploaded = []

    def upload(run_dir, timeout):  # what a successful `wandb sync` leaves behind
        uploaded.append(run_dir)
        (run_dir / f"run-{run_id}.wandb.synced").touch()

    monkeypatch.setattr(runs, "_run_sync", upload)
    assert run_cli(runs.main, ["sync", str(out)]) == 0, capsys.readouterr().err
    assert uploaded == find_offline_runs(out)
    assert fake_wandb.calls == [("artifact", f"team/dialogue-summarization/model-{run_id}:best", "model"),
                                ("link", TARGET, ["best"])]
    assert f"linked dialogue-summarization/model-{run_id}:best to {TARGET} (alias best)" in capsys.readouterr().out
    assert json.loads((out / registry.PENDING_LINK).read_text())["linked_at"]
    # Linked once: the next sync has nothing left to do.
    fake_wandb.calls.clear()
    assert run_cli(runs.main, ["sync", str(out)]) == 0 and fake_wandb.calls == []


def test_a_link_without_network_is_one_line_naming_what_to_run(final_best_run, tmp_path, capsys, monkeypatch):
    out = copied_run(final_best_run, tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", UNREACHABLE)
    problem = registry.link_pending(out)
    assert problem.startswith("cannot link dialogue-summarization/model-") and f"to {TARGET}: " in problem
    assert f"cannot reach the W&B server {UNREACHABLE}" in problem
    assert problem.endswith(f"run `python -m loop.runs sync {out}` when online") and "\n" not in problem
    assert registry.read_pending_link(out) is not None  # still waiting
    assert run_cli(runs.main, ["sync", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the W&B server") and err.count("\n") == 1


def test_a_damaged_link_record_is_one_line(tmp_path):
    (tmp_path / registry.PENDING_LINK).write_text("{", encoding="utf-8")
    with pytest.raises(UserError, match=r"registry_link.json: cannot read it .*; delete it or write it"):
        registry.read_pending_link(tmp_path)


# ---- predict from a reference ------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "expected"), [
    ("wandb-registry-model/dialogsum-kobart:best", True),
    ("wandb-registry-model/dialogsum-kobart", True),
    ("team/dialogue-summarization/model-abc123:best", True),
    ("dialogue-summarization/model-abc123:v3", True),
    ("model-abc123:latest", True),
    ("outputs/run/best", False),
    ("outputs/run", False),
    ("team/project/model:", False),
    ("a/b/c/d:best", False),
])
def test_what_counts_as_a_reference(spec, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert registry.is_reference(spec) is expected


def test_a_local_directory_that_looks_like_a_reference_is_still_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model:best").mkdir()
    assert not registry.is_reference("model:best")


def write_input(path: Path) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("fname", "dialogue"),
                                 ("t0", "#Person1#: 커피 2개 주세요.\n#Person2#: 네, 커피 2개 여기 있습니다."),
                                 ("t1", "#Person1#: 빵 1개 주세요.\n#Person2#: 네, 빵 1개 여기 있습니다.")])
    return path


def test_predict_offline_with_a_reference_is_one_line(tmp_path, capsys, monkeypatch):
    no_key(monkeypatch, tmp_path)
    source = write_input(tmp_path / "test.csv")
    ref = "wandb-registry-model/dialogsum-kobart:best"
    code = run_cli(predict.main, ["--model", ref, "--input", str(source), "--output", str(tmp_path / "sub.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err == (f"error: --model {ref}: cannot download this W&B reference: no W&B API key configured: run "
                   "`wandb login` or set WANDB_API_KEY (a local model directory works offline)\n")
    assert not (tmp_path / "sub.csv").exists()


def test_predict_reports_a_reference_the_server_refuses_in_one_line(tmp_path, capsys, monkeypatch, fake_wandb):
    def refuse(self, name, type=None):
        raise ValueError(f"artifact '{name}' not found in 'team/dialogue-summarization'")

    monkeypatch.setattr(FakeApi, "artifact", refuse)
    source = write_input(tmp_path / "test.csv")
    ref = "team/dialogue-summarization/model-nope:best"
    code = run_cli(predict.main, ["--model", ref, "--input", str(source), "--output", str(tmp_path / "sub.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"error: --model {ref}: cannot fetch it from W&B: artifact '{ref}' not found in "
                                 "'team/dialogue-summarization'\n")


def test_predict_downloads_a_reference_and_predicts_with_it(final_best_run, tmp_path, capsys, monkeypatch,
                                                            fake_wandb):
    monkeypatch.setenv("LOOP_MODEL_CACHE", str(tmp_path / "cache"))
    fake_wandb.source = final_best_run["out"] / "best"  # what log_model_artifact uploads: best/'s files
    source = write_input(tmp_path / "test.csv")
    ref = "wandb-registry-model/dialogsum-kobart:best"
    assert run_cli(predict.main, ["--model", ref, "--input", str(source), "--output",
                                  str(tmp_path / "sub.csv")]) == 0, capsys.readouterr().err
    downloaded = tmp_path / "cache" / "team_dialogue-summarization_model-abc123_v3"
    assert fake_wandb.calls == [("artifact", ref, "model"), ("download", str(downloaded))]
    out = capsys.readouterr().out
    assert f"model {ref} downloaded to {downloaded}" in out
    # Away from its run, the model formats and decodes with the settings exported with it (best/loop_config.toml).
    assert f"with {downloaded} on 1 process(es)" in out and f"(from {downloaded / 'loop_config.toml'})" in out
    with (tmp_path / "sub.csv").open(encoding="utf-8", newline="") as f:
        assert [row[0] for row in csv.reader(f)] == ["fname", "t0", "t1"]


def test_concurrent_downloads_of_one_model_run_one_at_a_time(tmp_path, monkeypatch, fake_wandb):
    import threading
    import time

    monkeypatch.setenv("LOOP_MODEL_CACHE", str(tmp_path / "cache"))
    inside, most = [0], [0]

    def slow_download(self, root=None):  # as every process of an `accelerate launch` would call it at once
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.3)
        inside[0] -= 1
        return root

    monkeypatch.setattr(FakeArtifact, "download", slow_download)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(registry.download_model("team/p/model-abc:best")))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1 and len(set(paths)) == 1 and len(paths) == 3


def test_an_unwritable_model_cache_is_one_line(tmp_path, monkeypatch, fake_wandb):
    (tmp_path / "file").write_text("in the way")
    monkeypatch.setenv("LOOP_MODEL_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(UserError, match=r"^--model team/p/model-abc:best: cannot write the model cache .*file/cache: "
                                        r"a part of the path is a file, not a directory \(set LOOP_MODEL_CACHE"):
        registry.download_model("team/p/model-abc:best")
