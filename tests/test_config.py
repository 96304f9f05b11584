"""Config: TOML parsing, `extends`, `--set` overrides, naming conventions, and each validation error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loop.config import Config, all_keys, load_config, reference_table
from loop.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_embedded_demo():
    cfg = load_config()
    assert cfg.model.from_scratch and cfg.model.tokenizer == "train" and cfg.data.synthetic
    assert cfg.source == "<defaults>"


def test_base_config_is_the_kobart_baseline():
    cfg = load_config(ROOT / "configs/base.toml")
    assert cfg.model.name_or_path == "gogamza/kobart-base-v2" and not cfg.model.from_scratch
    assert (cfg.data.train_file, cfg.data.dev_file) == ("data/train.csv", "data/dev.csv")
    t, ev = cfg.training, cfg.evaluation
    assert (t.learning_rate, t.batch_size, t.num_epochs, t.warmup_ratio, t.weight_decay) == (3e-5, 16, 20, 0.1, 0.01)
    assert (cfg.model.max_source_length, cfg.model.max_target_length) == (512, 128)
    assert (ev.eval_steps, ev.save_steps, ev.logging_steps) == (500, 500, 100)
    assert ev.metric_for_best_model == "rouge_l" and ev.greater_is_better
    assert t.mixed_precision == "auto" and t.max_steps == 0


def test_fast_config_is_the_baseline_with_compile_and_buckets():
    base, fast = load_config(ROOT / "configs/base.toml"), load_config(ROOT / "configs/fast.toml")
    assert fast.training.torch_compile == "reduce-overhead" and fast.training.mixed_precision == "bf16"
    assert fast.data.source_buckets[-1] == fast.model.max_source_length == 512
    assert fast.data.target_buckets[-1] == fast.model.max_target_length == 128
    assert fast.model == base.model and fast.evaluation == base.evaluation


@pytest.mark.parametrize("value", ["[128, 64]", "[0, 64]", "[64, 64]", "[64, 600]"])
def test_bad_buckets_are_one_line_errors(value):
    with pytest.raises(UserError, match=r"`data.source_buckets` must be increasing lengths from 1 to the model's max "
                                        r"length \(128\)"):
        load_config(overrides=[f"data.source_buckets={value}"])


def test_demo_config_loads():
    cfg = load_config(ROOT / "configs/demo.toml")
    assert cfg.data.synthetic and cfg.model.from_scratch


def test_extends_merges_child_over_parent(tmp_path):
    write(tmp_path, "parent.toml", '[training]\nlearning_rate = 1e-4\nbatch_size = 8\n[wandb]\ntags = ["a"]\n')
    child = write(tmp_path, "child.toml", 'extends = "parent.toml"\n[training]\nbatch_size = 4\n')
    cfg = load_config(child)
    assert cfg.training.learning_rate == 1e-4 and cfg.training.batch_size == 4
    assert cfg.wandb.tags == ["a"]


def test_extends_chain_and_nested_table(tmp_path):
    write(tmp_path, "a.toml", "[model.scratch]\nd_model = 64\nattention_heads = 4\n")
    write(tmp_path, "b.toml", 'extends = "a.toml"\n[model.scratch]\nencoder_layers = 3\n')
    c = write(tmp_path, "c.toml", 'extends = "b.toml"\n')
    s = load_config(c).model.scratch
    assert (s.d_model, s.encoder_layers, s.attention_heads) == (64, 3, 4)


def test_overrides_are_typed():
    cfg = load_config(overrides=["training.learning_rate=1e-4", "training.max_steps=7", "wandb.tags=['x','y']",
                                 "training.output_dir=outputs/my run", "data.version=2", "evaluation.eval_steps=3",
                                 "evaluation.save_steps=4", "evaluation.logging_steps=1", "model.scratch.d_model=64"])
    assert cfg.training.learning_rate == 1e-4 and cfg.training.max_steps == 7
    assert cfg.wandb.tags == ["x", "y"] and cfg.training.output_dir == "outputs/my run"
    assert cfg.data.version == "2"  # a string key keeps the text as typed
    assert (cfg.evaluation.eval_steps, cfg.evaluation.save_steps, cfg.evaluation.logging_steps) == (3, 4, 1)
    assert cfg.model.scratch.d_model == 64


def test_integer_accepted_where_a_number_is_expected():
    assert load_config(overrides=["training.learning_rate=1"]).training.learning_rate == 1.0


def test_naming_conventions():
    cfg = load_config(overrides=["model.short_name=kobart", "data.version=3", "training.learning_rate=3e-5",
                                 "training.batch_size=16", "wandb.experimenter=jiwoo"])
    assert cfg.run_name() == "kobart_v3_lr3e-05_bs16"
    assert cfg.run_group() == "kobart_experiments"
    assert cfg.run_tags() == ["model:kobart", "data:v3", "experimental", "experimenter:jiwoo"]
    named = load_config(overrides=["wandb.name=mine", "wandb.group=g", "wandb.baseline=true", "wandb.tags=['x']"])
    assert named.run_name() == "mine" and named.run_group() == "g"
    assert "baseline" in named.run_tags() and "x" in named.run_tags()


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(overrides=["training.learning_rate=5e-4", "wandb.tags=['k']"])
    saved = write(tmp_path, "resolved.toml", cfg.to_toml())
    again = load_config(saved)
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    ("toml", "overrides", "message"),
    [
        ("[training]\nlearning_rat = 1e-4\n", [],
         "unknown key `training.learning_rat`; did you mean `training.learning_rate`?"),
        ("[training]\neval_steps = 10\n", [], "did you mean `evaluation.eval_steps`?"),
        ("[trainng]\nseed = 1\n", [], "unknown section or key `trainng`; did you mean `training`?"),
        ("[training]\nbatch_size = 'big'\n", [], "`training.batch_size` must be integer, got 'big'"),
        ("[training]\nbatch_size = 0\n", [], "`training.batch_size` must be ≥ 1, got 0"),
        ("[training]\nlearning_rate = -1.0\n", [], "`training.learning_rate` must be > 0.0"),
        ("[training]\nmax_steps = -5\n", [], "`training.max_steps` must be ≥ 0"),
        ("[evaluation]\neval_steps = 0\n", [], "`evaluation.eval_steps` must be ≥ 1"),
        ("[training]\nwarmup_ratio = 1.5\n", [], "`training.warmup_ratio` must be ≤ 1.0"),
        ("[training]\nmixed_precision = 'fp8'\n", [], "must be one of 'auto', 'no', 'fp16', 'bf16'"),
        ("[wandb]\ntags = 'a'\n", [], "`wandb.tags` must be list of str"),
        ("[training]\nseed = true\n", [], "`training.seed` must be integer"),
        ("[model]\nscratch = 3\n", [], "`model.scratch` must be a table"),
        ("[evaluation]\nmetric_for_best_model = 'loss'\n", [], "needs `evaluation.greater_is_better = false`"),
        ("[evaluation]\ngreater_is_better = false\n", [], "would keep the worst model"),
        ("[model.scratch]\nd_model = 100\nattention_heads = 3\n", [], "must divide `model.scratch.d_model`"),
        ("[model]\nfrom_scratch = false\n", [], "only works with `model.from_scratch = true`"),
        ("[data]\ntrain_file = 'x.parquet'\n", [], "must end in .csv or .jsonl"),
        ("[training]\noutput_dir = 'out/{run}'\n", [], "may use only {name} and {time}"),
        ("", ["training.lr=1"], "--set: unknown key `training.lr`; did you mean `training.learning_rate`?"),
        ("", ["training.batch_size=-2"], "--set: `training.batch_size` must be ≥ 1, got -2"),
        ("", ["training.batch_size"], "expected section.key=value"),
        ("", ["wandb.mode=cloud"], "`wandb.mode` must be one of"),
    ],
)
def test_validation_errors_name_file_key_and_expectation(tmp_path, toml, overrides, message):
    path = write(tmp_path, "bad.toml", toml)
    with pytest.raises(UserError) as err:
        load_config(path, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    if not overrides:
        assert str(path) in str(err.value)


def test_bad_toml_syntax(tmp_path):
    path = write(tmp_path, "bad.toml", "[training\nbatch_size = 3\n")
    with pytest.raises(UserError, match=r"bad\.toml: invalid TOML"):
        load_config(path)


def test_missing_file_and_extends_errors(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    child = write(tmp_path, "child.toml", 'extends = "missing.toml"\n')
    with pytest.raises(UserError, match=r"child\.toml: `extends` names config file not found"):
        load_config(child)
    write(tmp_path, "a.toml", 'extends = "b.toml"\n')
    b = write(tmp_path, "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(UserError, match="`extends` makes a cycle"):
        load_config(b)


def test_every_key_is_documented():
    table = reference_table()
    for key in all_keys():
        assert f"`{key}`" in table
    assert len(all_keys()) > 60


def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path):
    bad = write(tmp_path, "bad.toml", "[training]\nbatch_sise = 8\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "loop/train.py"), "--config", str(bad),
                           "--set", f"training.output_dir={out}"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}: unknown key `training.batch_sise`; did you mean `training.batch_size`?"]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


def test_base_config_without_data_points_at_the_demo(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "loop/train.py"), "--config", str(ROOT / "configs/base.toml")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "data/train.csv: data file not found" in proc.stderr
    assert "configs/demo.toml" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_config_dataclass_has_sections():
    assert {"wandb", "model", "data", "training", "evaluation", "generation"} <= set(Config().to_dict())


def test_readme_config_reference_is_current():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"
    assert readme.split(start)[1].split(end)[0].strip() == reference_table().strip()
