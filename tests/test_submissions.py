"""`python -m loop.runs record RUN --lb SCORE`: the local record, its one-line errors, the `lb` column of
`compare`, and the push to W&B (run summary, submission artifact) with W&B's server replaced by fakes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from loop import registry, submissions
from loop.errors import run_cli
from loop.runs import main
from loop.wandb_offline import find_offline_runs, read_offline_run

SUBMISSION = "fname,summary\nt0,#Person1#이 커피 2개를 주문했다.\n"


@pytest.fixture
def run_dir(final_best_run, tmp_path) -> Path:
    """A copy of the final_best run's directory (records must not leak into other tests)."""
    shutil.copytree(final_best_run["out"], tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = run_cli(main, argv)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def offline_env(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


def test_record_appends_entries_to_the_run_directory(run_dir, tmp_path, capsys, monkeypatch):
    offline_env(monkeypatch, tmp_path)
    sub = tmp_path / "sub.csv"
    sub.write_text(SUBMISSION, encoding="utf-8")
    code, out, err = cli(["record", str(run_dir), "--lb", "47.86", "--submission", str(sub), "--note", "beams 4"],
                         capsys)
    assert code == 0, err
    assert out.splitlines() == [
        f"recorded lb 47.86 in {run_dir / 'leaderboard.json'}",
        f"note: only the local record was written: the leaderboard scores of {run_dir} wait for the run's upload: "
        f"`python -m loop.runs sync {run_dir}` pushes them after it"]
    assert cli(["record", str(run_dir), "--lb", "48.1"], capsys)[0] == 0
    first, second = json.loads((run_dir / "leaderboard.json").read_text(encoding="utf-8"))
    assert (first["lb"], first["submission"], first["note"], first["pushed"]) == (47.86, "sub.csv", "beams 4", False)
    assert first["sha256"] == hashlib.sha256(SUBMISSION.encode()).hexdigest()
    assert first["recorded_at"].endswith("+00:00")  # UTC
    assert (second["lb"], second["submission"], second["note"]) == (48.1, None, "")


@pytest.mark.parametrize(("args", "message"), [
    (["--lb", "nan"], "--lb must be the leaderboard score, a number from 0 to 100, got nan"),
    (["--lb", "120"], "--lb must be the leaderboard score, a number from 0 to 100, got 120"),
    (["--lb", "-1"], "--lb must be the leaderboard score, a number from 0 to 100, got -1"),
    (["--lb", "high"], "argument --lb: invalid float value: 'high'"),
    (["--lb", "40", "--submission", "{tmp}/missing.csv"], "--submission {tmp}/missing.csv: not found"),
    (["--lb", "40", "--submission", "{tmp}/wrong.csv"],
     "--submission {tmp}/wrong.csv: the first line is 'id,text', expected 'fname,summary'"),
])
def test_record_mistakes_are_one_line_and_write_nothing(run_dir, tmp_path, capsys, args, message):
    (tmp_path / "wrong.csv").write_text("id,text\na,b\n", encoding="utf-8")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, _, err = cli(["record", str(run_dir), *args], capsys)
    assert code == 2 and err.count("\n") == 1 and message.replace("{tmp}", str(tmp_path)) in err, err
    assert not (run_dir / "leaderboard.json").exists()


def test_record_needs_a_run_directory(run_dir, tmp_path, capsys):
    code, _, err = cli(["record", str(run_dir / "best"), "--lb", "40"], capsys)
    assert code == 2 and err == (f"error: {run_dir / 'best'}: not a run output directory (no config.toml); it is "
                                 f"inside the run directory {run_dir.resolve()}: pass that\n")
    code, _, err = cli(["record", str(tmp_path / "nope"), "--lb", "40"], capsys)
    assert code == 2 and "no such run directory" in err and err.count("\n") == 1


def test_a_damaged_record_is_one_line_and_left_alone(run_dir, capsys):
    (run_dir / "leaderboard.json").write_text("[{", encoding="utf-8")
    code, _, err = cli(["record", str(run_dir), "--lb", "40"], capsys)
    assert code == 2 and err.startswith(f"error: {run_dir / 'leaderboard.json'}: cannot read it") and "fix or" in err
    assert (run_dir / "leaderboard.json").read_text(encoding="utf-8") == "[{"


def test_compare_shows_the_best_lb_next_to_the_dev_metric(run_dir, tmp_path, capsys, monkeypatch):
    offline_env(monkeypatch, tmp_path)
    code, out, _ = cli(["compare", str(run_dir)], capsys)
    header, row = out.splitlines()[2:4]
    assert code == 0 and header.split()[6:9] == ["eval/rouge_l", "at", "step"] and header.split()[9] == "lb"
    assert row.split()[8] == "-"  # nothing recorded yet
    for score in ("47.86", "49.02", "48.5"):
        assert cli(["record", str(run_dir), "--lb", score], capsys)[0] == 0
    code, out, _ = cli(["compare", str(run_dir)], capsys)
    assert out.splitlines()[3].split()[8] == "49.02"  # the highest recorded
    code, out, _ = cli(["compare", str(run_dir), "--json"], capsys)
    assert json.loads(out)["runs"][0]["lb"] == 49.02


class FakeSummary(dict):
    def update(self, values=None, **kw):
        FakeWandb.calls.append(("summary", dict(values)))


class FakeApiRun:
    summary = FakeSummary()


class FakeArtifact:
    def __init__(self, name, type, metadata=None):
        self.name, self.type, self.metadata, self.files = name, type, metadata, []

    def add_file(self, path, name=None):
        self.files.append((Path(path).read_text(encoding="utf-8"), name))


class FakeSubmissionRun:
    summary = FakeSummary()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        FakeWandb.calls.append(("finish",))

    def use_artifact(self, name, type=None):
        FakeWandb.calls.append(("use_artifact", name, type))

    def log_artifact(self, art):
        FakeWandb.calls.append(("log_artifact", art.name, art.type, art.metadata, art.files))


class FakeWandb:
    """wandb.Api, wandb.init and wandb.Artifact with no server: they record what they were asked."""

    calls: list = []  # noqa: RUF012 (one list for the test, cleared by the fixture)

    class Api:
        default_entity = "team"

        def __init__(self, timeout=None):
            pass

        def run(self, path):
            FakeWandb.calls.append(("run", path))
            return FakeApiRun()

    @staticmethod
    def init(**kwargs):
        FakeWandb.calls.append(("init", kwargs))
        return FakeSubmissionRun()


@pytest.fixture
def fake_wandb(monkeypatch):
    import wandb

    FakeWandb.calls = []
    monkeypatch.setattr(wandb, "Api", FakeWandb.Api)
    monkeypatch.setattr(wandb, "init", FakeWandb.init)
    monkeypatch.setattr(wandb, "Artifact", FakeArtifact)
    monkeypatch.setattr(registry, "server_problem", lambda: None)
    return FakeWandb


def test_a_synced_run_gets_the_score_in_its_summary_and_the_submission_as_an_artifact(run_dir, tmp_path, capsys,
                                                                                     fake_wandb):
    run_id = read_offline_run(find_offline_runs(run_dir)[0]).id
    (find_offline_runs(run_dir)[0] / f"run-{run_id}.wandb.synced").touch()
    sub = tmp_path / "sub.csv"
    sub.write_text(SUBMISSION, encoding="utf-8")
    code, out, err = cli(["record", str(run_dir), "--lb", "47.86", "--submission", str(sub), "--note", "b4"],
                         capsys)
    assert code == 0, err
    assert f"pushed 1 leaderboard score(s) to W&B run team/dialogue-summarization/{run_id}" in out
    [entry] = json.loads((run_dir / "leaderboard.json").read_text(encoding="utf-8"))
    init = fake_wandb.calls[2][1]
    assert (init["job_type"], init["project"], init["entity"], init["mode"]) == (
        "submission", "dialogue-summarization", "team", "online")
    assert fake_wandb.calls == [
        ("run", f"team/dialogue-summarization/{run_id}"),
        ("summary", {"lb": 47.86, "lb_best": 47.86, "lb_count": 1}),
        ("init", init),
        # The submission job uses the model artifact, and logs the file: lineage model -> submission.
        ("use_artifact", f"team/dialogue-summarization/model-{run_id}:best", "model"),
        ("log_artifact", f"submission-{run_id}", "submission",
         {k: entry[k] for k in ("lb", "note", "sha256", "recorded_at")}, [(SUBMISSION, "sub.csv")]),
        ("summary", {"lb": 47.86}),
        ("finish",),
    ]
    assert entry["pushed"] is True
    # A second score: the summary has the latest and the best; the first is not pushed again.
    fake_wandb.calls.clear()
    assert cli(["record", str(run_dir), "--lb", "45"], capsys)[0] == 0
    assert fake_wandb.calls == [("run", f"team/dialogue-summarization/{run_id}"),
                                ("summary", {"lb": 45.0, "lb_best": 47.86, "lb_count": 2})]


def test_sync_pushes_the_scores_that_waited_for_the_upload(run_dir, tmp_path, capsys, monkeypatch, fake_wandb):
    from loop import runs

    offline_env(monkeypatch, tmp_path)
    monkeypatch.setattr(registry, "server_problem", lambda: "no W&B API key configured")
    assert cli(["record", str(run_dir), "--lb", "47.86"], capsys)[0] == 0
    assert fake_wandb.calls == []
    monkeypatch.setattr(registry, "server_problem", lambda: None)
    run_id = read_offline_run(find_offline_runs(run_dir)[0]).id
    monkeypatch.setattr(runs, "_run_sync", lambda d, timeout: (d / f"run-{run_id}.wandb.synced").touch())
    (run_dir / registry.PENDING_LINK).unlink()  # test_registry.py covers the link
    code, out, err = cli(["sync", str(run_dir)], capsys)
    assert code == 0, err
    assert fake_wandb.calls[:2] == [("run", f"team/dialogue-summarization/{run_id}"),
                                    ("summary", {"lb": 47.86, "lb_best": 47.86, "lb_count": 1})]
    assert json.loads((run_dir / "leaderboard.json").read_text(encoding="utf-8"))[0]["pushed"] is True
    assert "pushed 1 leaderboard score(s)" in out


def test_without_network_the_record_stays_local_with_one_note(run_dir, tmp_path, capsys, monkeypatch):
    run_id = read_offline_run(find_offline_runs(run_dir)[0]).id
    (find_offline_runs(run_dir)[0] / f"run-{run_id}.wandb.synced").touch()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    code, out, _ = cli(["record", str(run_dir), "--lb", "47.86"], capsys)
    assert code == 0
    note = out.splitlines()[1]
    assert note.startswith(f"note: only the local record was written: cannot push the leaderboard scores of "
                           f"{run_dir}: cannot reach the W&B server http://127.0.0.1:9")
    assert note.endswith("run `python -m loop.runs sync` when online")
    assert json.loads((run_dir / "leaderboard.json").read_text(encoding="utf-8"))[0]["pushed"] is False


def test_best_score_of_a_run_without_records_is_none(tmp_path):
    assert submissions.best_score(tmp_path) is None and submissions.best_score(None) is None
    assert (submissions.check_score(0.0), submissions.check_score(100)) == (0.0, 100)
