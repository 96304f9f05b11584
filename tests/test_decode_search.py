"""`loop.decode_search`: a generation.* search on a tiny trained model, scored as predict + score would score it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loop import decode_search, predict, score
from loop.errors import run_cli
from loop.sweep_spec import override
from tests.conftest import ROOT, finished_run, train_env

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Short summaries and small batches keep every setting to a few seconds on a busy CPU.
FAST = ("--batch-size", "4", "--set", "generation.max_new_tokens=6")
GRID = """method = "grid"
[metric]
name = "eval/rouge_mean"
goal = "maximize"
[parameters.num_beams]
values = [1, 2]
[parameters.no_repeat_ngram_size]
values = [0, 2]
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 2-step tiny run (ROUGE on characters) whose best/ weights are perturbed so that it writes varied text."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    cwd = finished_run(tmp_path_factory, "decode", "training.max_steps=2", "evaluation.eval_steps=2",
                       "evaluation.eval_on_start=false", "evaluation.save_steps=100",
                       "evaluation.rouge_tokenizer=char", "training.output_dir=run")
    model = AutoModelForSeq2SeqLM.from_pretrained(cwd / "run/best")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(cwd / "run/best")
    (cwd / "grid.toml").write_text(GRID, encoding="utf-8")
    return cwd


def search(run: Path, out: Path, *extra: str, sweep: Path | None = None) -> int:
    return run_cli(decode_search.main, ["--model", str(run / "run/best"), "--data", str(run / "data/demo/dev.csv"),
                                        "--sweep", str(sweep or run / "grid.toml"), "--output", str(out),
                                        *FAST, *extra])


def read_results(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def searched(run, tmp_path_factory) -> Path:
    """The grid searched once, with its W&B run offline in the output directory."""
    out = tmp_path_factory.mktemp("searched") / "search"
    assert search(run, out) == 0
    return out


def test_the_best_settings_score_equals_predict_plus_score_with_them(run, searched, tmp_path, capsys):
    rows = read_results(searched)
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5"]  # 4 grid points and the model's own decoding
    assert {r["setting"] for r in rows} == {"model's own", *(f"setting-{n:03d}" for n in range(4))}
    means = [float(r["rouge_mean"]) for r in rows]
    assert means == sorted(means, reverse=True) and means[0] > means[-1]  # the settings really differ
    assert all(float(r["seconds"]) > 0 for r in rows)
    best = tomllib.loads((searched / "best_generation.toml").read_text(encoding="utf-8"))["generation"]
    assert (best["num_beams"], best["no_repeat_ngram_size"]) == (int(rows[0]["num_beams"]),
                                                                 int(rows[0]["no_repeat_ngram_size"]))
    sets = [x for k, v in best.items() for x in ("--set", override(f"generation.{k}", v))]
    dev, sub = run / "data/demo/dev.csv", tmp_path / "sub.csv"
    assert run_cli(predict.main, ["--model", str(run / "run/best"), "--input", str(dev), "--output", str(sub),
                                  "--batch-size", "4", *sets]) == 0
    capsys.readouterr()
    # The run's ROUGE: characters (evaluation.rouge_tokenizer), references combined by their mean.
    assert run_cli(score.main, ["--predictions", str(sub), "--references", str(dev), "--tokenizer", "char",
                                "--aggregate", "mean"]) == 0
    direct = json.loads(capsys.readouterr().out)
    for key in ("rouge_1", "rouge_2", "rouge_l", "rouge_mean"):
        assert float(rows[0][key]) == pytest.approx(direct[key], abs=1e-6)
    assert f"| 1 | {rows[0]['setting']} |" in (searched / "results.md").read_text(encoding="utf-8")


def test_the_best_generation_config_loads_beside_the_model_and_best_is_untouched(run, searched):
    from transformers import GenerationConfig

    best = tomllib.loads((searched / "best_generation.toml").read_text(encoding="utf-8"))["generation"]
    gen = GenerationConfig.from_pretrained(searched)
    assert {k: getattr(gen, k) for k in ("num_beams", "no_repeat_ngram_size", "max_new_tokens")} == {
        k: best[k] for k in ("num_beams", "no_repeat_ngram_size", "max_new_tokens")}
    assert not (run / "run/best/decode_search").exists()
    saved = GenerationConfig.from_pretrained(run / "run/best")
    assert saved.max_new_tokens == 24  # the run's own, not the search's 6


def test_the_w_and_b_run_has_every_setting_a_table_and_the_best(run, searched):
    from loop.config import load_config
    from loop.wandb_offline import find_offline_runs, read_offline_run

    (run_dir,) = find_offline_runs(searched)
    record = read_offline_run(run_dir)
    assert record.job_type == "decode-search"
    assert record.group == load_config(run / "run/config.toml").run_group()
    rows = read_results(searched)
    logged = [h["eval/rouge_mean"] for h in record.history if "eval/rouge_mean" in h]
    assert sorted(logged) == sorted(float(r["rouge_mean"]) for r in rows)
    (table,) = Path(record.path).glob("files/media/table/decode_search/results_*.table.json")
    data = json.loads(table.read_text(encoding="utf-8"))
    assert data["columns"][:2] == ["rank", "setting"]
    assert [row[1] for row in data["data"]] == [r["setting"] for r in rows]  # one row per setting, best first
    assert record.summary["best/rouge_mean"] == pytest.approx(float(rows[0]["rouge_mean"]))
    assert record.summary["best/setting"] == rows[0]["setting"]


def test_an_interrupted_search_resumes_without_repeating_finished_settings(run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    calls: list[str] = []
    real = decode_search.Runner.__call__

    def counted(self, cfg, label):
        calls.append(label)
        if len(calls) == 3 and stop:
            raise KeyboardInterrupt
        return real(self, cfg, label)

    monkeypatch.setattr(decode_search.Runner, "__call__", counted)
    stop = True
    out = tmp_path / "search"
    assert search(run, out) == 130
    assert calls == ["model's own", "setting-000", "setting-001"]
    assert len(read_results(out)) == 2  # what finished before the interruption is in the table
    stop = False
    calls.clear()
    assert search(run, out) == 0
    # The interrupted setting runs again as a new trial; the baseline and setting-000 are not repeated.
    assert calls == ["setting-002", "setting-003", "setting-004"]
    rows = read_results(out)
    points = {(r["num_beams"], r["no_repeat_ngram_size"]) for r in rows if r["setting"] != "model's own"}
    assert len(rows) == 5 and points == {("1", "0"), ("1", "2"), ("2", "0"), ("2", "2")}
    calls.clear()
    assert search(run, out) == 0 and calls == []  # the grid is exhausted


def test_encoder_reuse_changes_no_summary_and_encodes_each_batch_once(run):
    from accelerate import Accelerator

    from loop.config import load_config
    from loop.evaluation import generation_config

    cfg = load_config(run / "run/config.toml")
    rows = [{"dialogue": d} for d in ("#Person1#: 안녕하세요. 김밥 주세요.", "#Person2#: 네. 두 줄 드릴까요?",
                                       "#Person1#: 오늘 회의는 몇 시에 시작하나요? 자료는 제가 준비할게요.")]
    member = predict.load_member(run / "run/best", cfg, "test", [r["dialogue"] for r in rows])
    encoder = member.model.get_encoder()
    runs = []
    encoder.register_forward_hook(lambda *_: runs.append(1))
    batches = predict.length_sorted_batches([len(ids) for ids in member.inputs], 2)
    accelerator, cache = Accelerator(), {}
    for beams, ngram in ((1, 0), (3, 2), (2, 0)):
        cfg.generation.num_beams, cfg.generation.no_repeat_ngram_size = beams, ngram
        cfg.generation.max_new_tokens = 6
        gen = generation_config(member.model, cfg)
        fresh = predict.generate(accelerator, member.model, member.tokenizer, member.inputs, batches, gen)
        reused = predict.generate(accelerator, member.model, member.tokenizer, member.inputs, batches, gen,
                                  encoded=cache)
        assert reused == fresh and any(text for _, text in fresh)
    assert len(runs) == 3 * len(batches) + len(batches)  # every fresh call encodes; the cache once per batch


BAD_FILES = [
    ("[parameters.learning_rate]\nvalues = [1e-4]\n", "`parameters.learning_rate` sets `training.learning_rate`, "
     "but this search changes only generation.* keys"),
    ("bogus = 1\n[parameters.num_beams]\nvalues = [1]\n", "`bogus` is not a sweep key"),
    ("[parameters.length_penalty]\ndistribution = \"normal\"\nmin = 0.5\nmax = 1.5\n",
     "distribution 'normal' is not supported"),
    ("[parameters.num_beams]\nvalues = [0]\n", "value 0 is rejected by the config"),
    ("[parameters.num_beams]\nvalue = 2\nstep = 1\n", "unknown field `step`"),
    ("[parameters.num_beam]\nvalues = [1]\n", "did you mean `generation.num_beams`?"),
]


@pytest.mark.parametrize(("body", "message"), BAD_FILES, ids=["training key", "unknown key", "bad distribution",
                                                                "bad value", "bad field", "misspelt name"])
def test_a_bad_search_file_is_one_line_and_nothing_is_written(run, tmp_path, capsys, body, message):
    path = tmp_path / "bad.toml"
    path.write_text('method = "grid"\nmetric = {name = "eval/rouge_mean", goal = "maximize"}\n' + body,
                    encoding="utf-8")
    assert search(run, tmp_path / "out", sweep=path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("text", "message"), [
    ('name = "eval/loss"\ngoal = "minimize"', "must be a metric loop/decode_search.py scores for each setting"),
    ('name = "eval/rouge_l"\ngoal = "minimize"', "set goal = \"maximize\""),
])
def test_a_metric_the_search_does_not_score_is_refused(run, tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(f'method = "random"\nrun_cap = 2\n[metric]\n{text}\n[parameters.num_beams]\nvalues = [1, 2]\n',
                    encoding="utf-8")
    assert search(run, tmp_path / "out", sweep=path) == 2
    assert message in capsys.readouterr().err


def test_two_processes_split_the_rows_and_score_as_one(run, searched, tmp_path):
    one = tmp_path / "one.toml"
    one.write_text(GRID.replace("values = [1, 2]", "values = [2]").replace("values = [0, 2]", "values = [2]"),
                   encoding="utf-8")
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "loop/decode_search.py"), "--model", str(run / "run/best"),
           "--data", str(run / "data/demo/dev.csv"), "--sweep", str(one), "--output", str(out), *FAST]
    env = train_env({"ACCELERATE_USE_CPU": "true", "WANDB_MODE": "disabled"})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    alone = {r["setting"] if r["setting"] == "model's own" else (r["num_beams"], r["no_repeat_ngram_size"]): r
             for r in read_results(searched)}
    for row in read_results(out):
        key = row["setting"] if row["setting"] == "model's own" else (row["num_beams"], row["no_repeat_ngram_size"])
        assert float(row["rouge_mean"]) == pytest.approx(float(alone[key]["rouge_mean"]), abs=1e-9)


def test_the_default_search_space_reads_and_holds_only_generation_keys():
    from loop.sweep_spec import DECODE_METRICS, load_sweep

    spec = load_sweep(ROOT / "configs/decode.toml", metrics=DECODE_METRICS, section="generation")
    assert spec.metric == "eval/rouge_mean" and all(p.key.startswith("generation.") for p in spec.params)
    assert len(spec.grid()) == 36
