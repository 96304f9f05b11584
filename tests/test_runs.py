"""`python -m loop.runs` compare / report / sync on real offline runs of the tiny config."""

from __future__ import annotations

import csv
import datetime as dt
import http.server
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tomllib
from PIL import Image

from loop import predict
from loop.errors import run_cli
from loop.report import merge_launches
from loop.rouge import compute_rouge
from loop.runs import main
from loop.score import read_summaries
from loop.wandb_offline import OfflineRun, find_offline_runs, history_series, read_offline_run
from tests.conftest import ROOT, run_train

LEARNING_RATES = {"lr0.03": "alice", "lr0.01": "bob"}  # output dir -> experimenter
STEPS = 12
ITEMS = ("커피", "녹차", "우유", "주스", "빵", "케이크", "라면", "김밥")


def write_order_data(path: Path, rows: int, seed: int) -> Path:
    """An easy dialogue/summary CSV (ordering food): a tiny model scores ROUGE above zero within a few steps."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fname", "dialogue", "summary"])
        for i in range(rows):
            item, count = rng.choice(ITEMS), rng.randint(1, 3)
            writer.writerow([f"{path.stem}_{i:03d}",
                             f"#Person1#: {item} {count}개 주세요.\n#Person2#: 네, {item} {count}개 여기 있습니다.",
                             f"#Person1#이 {item} {count}개를 주문했다."])
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 12-step runs that differ only in learning rate (and experimenter), evaluated every 4 steps."""
    root = tmp_path_factory.mktemp("runs")
    write_order_data(root / "train.csv", 96, seed=0)
    write_order_data(root / "dev.csv", 8, seed=1)

    def train(out: str, who: str):
        return run_train(root, "data.synthetic=false", "data.train_file=train.csv", "data.dev_file=dev.csv",
                         f"training.max_steps={STEPS}", "evaluation.eval_steps=4", "evaluation.logging_steps=2",
                         "evaluation.save_steps=100", "training.warmup_ratio=0", f"training.learning_rate={out[2:]}",
                         f"training.output_dir={out}", f"wandb.experimenter={who}",
                         extra_env={"OMP_NUM_THREADS": "1"})  # two runs side by side, one core each

    with ThreadPoolExecutor(len(LEARNING_RATES)) as pool:
        procs = list(pool.map(train, LEARNING_RATES, LEARNING_RATES.values()))
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    logged = {out: read_offline_run(find_offline_runs(root / out)[0]) for out in LEARNING_RATES}
    return {"root": root, "logged": logged}


# A run logged through wandb itself with chosen numbers: the best ROUGE-L (step 3) is neither the last eval nor
# where ROUGE-2 peaks, so a report that took last or per-metric maxima would show different numbers.
SCRIPTED_RUN = """
import sys, wandb
config = {"model": {"name_or_path": "gogamza/kobart-base-v2"}, "evaluation": {"metric_for_best_model": "rouge_l",
          "greater_is_better": True, "rouge_tokenizer": "mecab"},
          "training": {"learning_rate": 3e-05, "batch_size": 8, "gradient_accumulation_steps": 2, "max_steps": 6}}
run = wandb.init(project="scripted", name="scripted-run", group="g", tags=["experimenter:carol"], config=config,
                 dir=sys.argv[1], mode="offline")
rows = {0: {"eval/loss": 5.0, "eval/rouge_1": 0.1, "eval/rouge_2": 0.05, "eval/rouge_l": 0.09},
        2: {"train/loss": 4.0, "train/epoch": 0.5},
        3: {"eval/loss": 3.0, "eval/rouge_1": 0.4, "eval/rouge_2": 0.2, "eval/rouge_l": 0.35},
        4: {"train/loss": 3.0, "train/epoch": 1.0},
        6: {"train/loss": 2.5, "train/epoch": 1.5, "eval/loss": 3.5, "eval/rouge_1": 0.3, "eval/rouge_2": 0.25,
            "eval/rouge_l": 0.3}}
for step, row in rows.items():
    run.log(row, step=step)
run.finish()
"""


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    """The offline-run-* directory of SCRIPTED_RUN."""
    root = tmp_path_factory.mktemp("scripted")
    proc = subprocess.run([sys.executable, "-c", SCRIPTED_RUN, str(root)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return find_offline_runs(root)[0]


def markdown_table(text: str) -> dict[str, str]:
    """The report's `| Item | Value |` rows."""
    rows = [line.strip("|").split(" | ", 1) for line in text.splitlines() if line.startswith("| ")]
    return {key.strip(): value.strip() for key, value in rows}


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `python -m loop.runs ARGV` in-process: exit code, stdout, stderr."""
    code = run_cli(main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def logged_best(run, key: str, maximize: bool) -> tuple[int, float]:
    """The best value of `key` in the logged history and the first step that reached it."""
    series = history_series(run, key)
    value = (max if maximize else min)(v for _, v in series)
    return min(s for s, v in series if v == value), value


def assert_one_line_error(result: tuple[int, str, str], *fragments: str) -> None:
    code, _, err = result
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err


@pytest.mark.parametrize(("metric", "maximize"), [("eval/rouge_l", True), ("eval/loss", False)])
def test_compare_picks_the_run_with_the_best_logged_metric(runs, capsys, metric, maximize):
    code, out, _ = cli(["compare", str(runs["root"]), "--metric", metric, "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    bests = {run.id: logged_best(run, metric, maximize) for run in runs["logged"].values()}
    expected = (max if maximize else min)(bests, key=lambda run_id: bests[run_id][1])
    assert result["best"] == expected
    assert result["goal"] == ("max" if maximize else "min")
    for row in result["runs"]:
        assert (row["best_step"], row["best_value"]) == bests[row["id"]]


def test_fixture_runs_make_the_comparison_meaningful(runs):
    # The runs' ROUGE-L differ, and each run's loss has distinct best and worst points: picking the wrong run
    # or the wrong direction fails the test above.
    rouge = {logged_best(r, "eval/rouge_l", True)[1] for r in runs["logged"].values()}
    assert len(rouge) == len(LEARNING_RATES) and max(rouge) > 0
    for run in runs["logged"].values():
        assert logged_best(run, "eval/loss", False) != logged_best(run, "eval/loss", True)


def test_compare_agrees_with_the_trainers_own_best_step(runs, capsys):
    _, out, _ = cli(["compare", str(runs["root"]), "--json"], capsys)
    for row in json.loads(out)["runs"]:
        out_dir = runs["root"] / row["config"]["training.output_dir"]
        final = json.loads((out_dir / "final_metrics.json").read_text())
        assert row["best_step"] == final["best_step"]
        assert row["best_value"] == pytest.approx(final["best"]["rouge_l"])
        assert row["steps"] == STEPS
        assert row["hyperparameters"]["lr"] == float(row["config"]["training.output_dir"][2:])


def test_compare_table_marks_best_and_shows_its_config_and_differences(runs, capsys):
    code, out, _ = cli(["compare", str(runs["root"])], capsys)
    assert code == 0
    best = max(runs["logged"].values(), key=lambda r: logged_best(r, "eval/rouge_l", True)[1])
    best_lines = [line for line in out.splitlines() if line.startswith("*  ")]
    assert len(best_lines) == 1 and best.id in best_lines[0] and best.name in best_lines[0]
    for run in runs["logged"].values():
        assert run.name in out
    # The printed config is dotted TOML: it reads back to exactly the logged config.
    config_block = out.split(f"config of {best.id}:\n", 1)[1].split("\n\n", 1)[0]
    assert tomllib.loads(config_block) == best.config
    diff_block = out.split("config keys that differ:\n", 1)[1]
    differing = {line.split()[0] for line in diff_block.splitlines()[1:]}
    assert differing == {"training.learning_rate", "training.output_dir", "wandb.experimenter"}


def test_predict_on_the_dev_file_scores_what_the_run_logged(runs, capsys, tmp_path):
    # loop.predict encodes and decodes as evaluation does: its dev predictions score the logged best ROUGE.
    best = max(runs["logged"].values(), key=lambda r: logged_best(r, "eval/rouge_l", True)[1])
    out_dir = runs["root"] / best.config["training"]["output_dir"]
    assert run_cli(predict.main, ["--model", str(out_dir / "best"), "--input", str(runs["root"] / "dev.csv"),
                                  "--output", str(tmp_path / "dev_pred.csv")]) == 0
    capsys.readouterr()
    predictions = read_summaries(tmp_path / "dev_pred.csv")
    references = read_summaries(runs["root"] / "dev.csv")
    assert list(predictions) == list(references)
    scores = compute_rouge(list(predictions.values()), list(references.values()), tokenizer="mecab")
    logged = json.loads((out_dir / "best/metrics.json").read_text())
    assert (scores.rouge_1, scores.rouge_2, scores.rouge_l) == pytest.approx(
        (logged["rouge_1"], logged["rouge_2"], logged["rouge_l"]), abs=1e-9)


def test_report_numbers_equal_the_logged_values(runs, capsys, tmp_path):
    run = runs["logged"]["lr0.01"]
    out_dir = runs["root"] / "lr0.01"
    code, _, _ = cli(["report", str(out_dir), "--out", str(tmp_path), "--lang", "en"], capsys)
    assert code == 0
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    table = markdown_table(text)
    best_step, _ = logged_best(run, "eval/rouge_l", True)
    at_best = {k: dict(history_series(run, f"eval/{k}"))[best_step] for k in ("rouge_1", "rouge_2", "rouge_l")}
    assert table["Run ID"] == f"`{run.id}`"
    assert table["Experimenter"] == "bob"
    assert table["Date"] == dt.datetime.fromtimestamp(run.start_time).strftime("%Y-%m-%d %H:%M")
    assert table["Model"] == run.config["model"]["name_or_path"]
    assert float(table["Learning rate"]) == run.config["training"]["learning_rate"] == 0.01
    assert int(table["Batch size"]) == run.config["training"]["batch_size"]
    epoch = history_series(run, "train/epoch")[-1][1]
    assert table["Epochs"] == f"{epoch:.2f} (max_steps {STEPS})"
    for key, label in (("rouge_1", "ROUGE-1"), ("rouge_2", "ROUGE-2"), ("rouge_l", "ROUGE-L")):
        assert float(table[f"Best {label}"]) == pytest.approx(at_best[key], abs=5e-5)
    # The trainer's exported best model says the same.
    exported = json.loads((out_dir / "best/metrics.json").read_text())
    assert exported["step"] == best_step
    assert float(table["Best ROUGE-L"]) == pytest.approx(exported["rouge_l"], abs=5e-5)
    seconds = round(run.runtime_s)
    assert table["Training time"] == f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d} (W&B runtime)"
    assert f"step {best_step} of {STEPS}" in text
    for heading in ("## Key findings", "## Next steps"):
        assert heading in text


def test_report_takes_every_score_from_the_best_step(scripted_run, capsys, tmp_path):
    code, _, err = cli(["report", str(scripted_run), "--out", str(tmp_path), "--lang", "en"], capsys)
    assert code == 0, err
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    table = markdown_table(text)
    assert (table["Best ROUGE-1"], table["Best ROUGE-2"], table["Best ROUGE-L"]) == ("0.4000", "0.2000", "0.3500")
    assert table["Experimenter"] == "carol" and table["Model"] == "gogamza/kobart-base-v2"
    assert (table["Learning rate"], table["Batch size"], table["Epochs"]) == ("3e-05", "8 × 2 accumulation",
                                                                             "1.50 (max_steps 6)")
    assert "step 3 of 6, chosen on eval/rouge_l (higher is better)" in text


KO_FIELDS = ["실험 ID", "실험자", "날짜", "모델", "학습률", "배치 크기", "에폭", "최고 ROUGE-1", "최고 ROUGE-2",
             "최고 ROUGE-L", "학습 시간"]
EN_FIELDS = ["Run ID", "Experimenter", "Date", "Model", "Learning rate", "Batch size", "Epochs", "Best ROUGE-1",
             "Best ROUGE-2", "Best ROUGE-L", "Training time"]


def test_report_defaults_to_the_guides_korean_template(runs, capsys, tmp_path):
    out_dir = runs["root"] / "lr0.01"
    assert cli(["report", str(out_dir), "--out", str(tmp_path / "ko")], capsys)[0] == 0
    assert cli(["report", str(out_dir), "--out", str(tmp_path / "en"), "--lang", "en"], capsys)[0] == 0
    ko = (tmp_path / "ko/report.md").read_text(encoding="utf-8")
    en = (tmp_path / "en/report.md").read_text(encoding="utf-8")
    run = runs["logged"]["lr0.01"]
    # The guide's headings in its order: 실험 결과 요약, 실험 ID, 실험자, the results, 주요 발견사항, 다음 단계.
    assert ko.startswith(f"# 실험 결과 요약: {run.name}\n")
    assert [line for line in ko.splitlines() if line.startswith("#")] == [
        f"# 실험 결과 요약: {run.name}", "## 차트", "## 주요 발견사항", "## 다음 단계"]
    assert [line for line in en.splitlines() if line.startswith("#")] == [
        f"# Experiment result: {run.name}", "## Charts", "## Key findings", "## Next steps"]
    ko_table, en_table = markdown_table(ko), markdown_table(en)
    assert list(ko_table) == ["항목", *KO_FIELDS] and list(en_table) == ["Item", *EN_FIELDS]
    # The same values, field by field, in both languages (the runtime's note is translated).
    for ko_key, en_key in zip(KO_FIELDS[:-1], EN_FIELDS[:-1], strict=True):
        assert ko_table[ko_key] == en_table[en_key], ko_key
    assert ko_table["학습 시간"] == en_table["Training time"].replace("W&B runtime", "W&B 실행 시간")
    best_step, _ = logged_best(run, "eval/rouge_l", True)
    assert f"최고 체크포인트: 전체 {STEPS} 스텝 중 {best_step} 스텝, eval/rouge_l 기준으로 선택 (높을수록 좋음)." in ko
    assert "ROUGE는 dev 세트의 F1이며 mecab 토큰 기준입니다." in ko
    assert ko.index("## 주요 발견사항") < ko.index("## 다음 단계") and ko.endswith("## 다음 단계\n\n- \n")


def test_report_language_must_be_ko_or_en(runs, capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(main, ["report", str(runs["root"] / "lr0.01"), "--lang", "fr"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "argument --lang: invalid choice: 'fr'" in err and err.count("\n") == 1


def test_every_best_uploads_each_new_best_with_no_ttl(runs):
    run = runs["logged"]["lr0.03"]  # the default wandb.model_artifacts = "every_best"
    evals = [json.loads(line) for line in (runs["root"] / "lr0.03/eval_metrics.jsonl").read_text().splitlines()]
    improvements = [row["step"] for i, row in enumerate(evals)
                    if all(row["rouge_l"] > earlier["rouge_l"] for earlier in evals[:i])]
    models = [a for a in run.artifacts if a["type"] == "model"]
    assert len(improvements) >= 2 and [a["metadata"]["step"] for a in models] == improvements
    assert all(a["ttl_s"] is None for a in models)


def test_report_charts_are_readable_pngs(runs, capsys, tmp_path):
    offline_dir = find_offline_runs(runs["root"] / "lr0.03")[0]  # RUN may also be the offline-run-* directory
    code, out, _ = cli(["report", str(offline_dir), "--out", str(tmp_path)], capsys)
    assert code == 0
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    for name in ("loss.png", "rouge.png", "best_scores.png"):
        assert f"]({name})" in text and str(tmp_path / name) in out
        with Image.open(tmp_path / name) as image:
            image.verify()
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width >= 800 and image.height >= 500
            darkest, lightest = image.convert("L").getextrema()
            assert lightest == 255 and darkest < 80  # white background with dark text and lines


def test_report_default_out_is_inside_the_run(runs, capsys):
    out_dir = runs["root"] / "lr0.03"
    code, _, _ = cli(["report", str(out_dir)], capsys)
    assert code == 0 and (out_dir / "report/report.md").is_file()


def test_resumed_launches_merge_into_one_run():
    # Each --resume writes a new offline-run-* with the same id, restarting from its checkpoint's step.
    first = OfflineRun(path=Path("a"), id="r1", name="old", start_time=1.0, runtime_s=10.0, complete=False,
                       history=[{"_step": s, "train/loss": 10.0 - s} for s in range(7)], summary={"x": 1, "y": 1})
    second = OfflineRun(path=Path("b"), id="r1", name="new", start_time=2.0, runtime_s=5.0, complete=True,
                        exit_code=0, history=[{"_step": s, "train/loss": 100.0 + s} for s in (4, 5, 6, 7)],
                        summary={"y": 2})
    merged = merge_launches([second, first])
    assert [(r["_step"], r["train/loss"]) for r in merged.history] == [
        (0, 10.0), (1, 9.0), (2, 8.0), (3, 7.0), (4, 104.0), (5, 105.0), (6, 106.0), (7, 107.0)]
    assert merged.summary == {"x": 1, "y": 2}
    assert (merged.name, merged.start_time, merged.runtime_s, merged.complete) == ("new", 1.0, 15.0, True)


def test_errors_are_one_line_exit_2(runs, capsys, tmp_path, monkeypatch):
    assert_one_line_error(cli(["compare", str(tmp_path / "missing")], capsys), "no such file or directory")
    assert_one_line_error(cli(["compare", str(tmp_path)], capsys), "no offline W&B runs")
    assert_one_line_error(cli(["compare", str(runs["root"]), "--metric", "eval/bleu"], capsys),
                          "no run logged eval/bleu", "eval/rouge_l")
    assert_one_line_error(cli(["report", str(tmp_path)], capsys), "no offline W&B run here")
    assert_one_line_error(cli(["report", str(runs["root"])], capsys), "holds 2 different runs")
    assert_one_line_error(cli(["compare", str(runs["root"]), "--project", "team/proj"], capsys), "not both")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert_one_line_error(cli(["compare", "--project", "team/proj"], capsys), "no W&B API key")
    assert_one_line_error(cli(["compare", "--project", "a/b/c"], capsys), "expected entity/project")


def test_sync_needs_an_api_key(runs, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert_one_line_error(cli(["sync", str(runs["root"])], capsys), "no W&B API key", "wandb login")


def test_sync_fails_fast_without_a_reachable_server(runs, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    assert_one_line_error(cli(["sync", str(runs["root"])], capsys), "cannot reach the W&B server")
    assert time.monotonic() - start < 15


class RejectingServer(http.server.BaseHTTPRequestHandler):
    """Answers the reachability check, rejects every W&B API call."""

    def do_HEAD(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


class HangingServer(RejectingServer):
    """Answers the reachability check, never answers a W&B API call."""

    def do_POST(self):
        time.sleep(60)


@pytest.fixture
def fake_server(monkeypatch, tmp_path, runs, request):
    """A local non-W&B server with an API key set, and a copy of one offline run to sync to it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), request.param)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    shutil.copytree(runs["root"] / "lr0.03" / "wandb", tmp_path / "wandb", symlinks=True)
    yield tmp_path
    server.shutdown()


@pytest.mark.parametrize("fake_server", [RejectingServer], indirect=True)
def test_sync_reports_a_failed_upload(fake_server, capsys):
    # `wandb sync` itself exits 0 here; only its missing .synced marker shows the upload failed.
    code, out, _ = cli(["sync", str(fake_server)], capsys)
    assert code == 1
    assert f"failed: {next((fake_server / 'wandb').glob('offline-run-*'))}: <!DOCTYPE HTML>" in out  # its answer
    assert "0 of 1 run(s) synced" in out


@pytest.mark.parametrize("fake_server", [RejectingServer], indirect=True)
def test_compare_project_reports_api_errors_in_one_line(fake_server, capsys):
    assert_one_line_error(cli(["compare", "--project", "team/proj"], capsys), "--project team/proj: ")


@pytest.mark.parametrize("fake_server", [HangingServer], indirect=True)
def test_sync_gives_up_after_the_timeout(fake_server, capsys):
    start = time.monotonic()
    code, out, _ = cli(["sync", str(fake_server), "--timeout", "3"], capsys)
    assert code == 1 and "timed out after 3 s" in out
    assert time.monotonic() - start < 20


def test_sync_skips_runs_already_synced(runs, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(runs["root"] / "lr0.03" / "wandb", tmp_path / "wandb", symlinks=True)
    launch = find_offline_runs(tmp_path)[0]
    (launch / f"run-{runs['logged']['lr0.03'].id}.wandb.synced").touch()
    code, out, _ = cli(["sync", str(tmp_path)], capsys)
    assert code == 0 and f"already synced: {launch}" in out


def test_module_entry_point(runs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "loop.runs", "compare", str(runs["root"])], capture_output=True,
                        text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "* = best" in ok.stdout, ok.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "loop.runs", "report", str(runs["root"] / "nope")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
