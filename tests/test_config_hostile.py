"""Hostile config values: each one that would break later is refused by load_config in one line that names the
file (or --set), the key and what is expected, before anything is written.

Classes of hostile values covered:
- NaN, inf and -inf in float keys (TOML `nan`/`inf`/`-inf`, `1e400`, `--set key=nan`), and integers too large
  for a float where a number is expected
- integers outside 64 bits (TOML's range and Python's sys.maxsize), and outside a library's own range: numpy
  seeds (0 to 2**32 - 1), the tokenizers trainer's vocabulary allocation
- bounds that a library makes exclusive: AdamW betas < 1
- booleans where numbers are expected, also inside lists
- empty, whitespace-only and padded strings where they break: W&B project, data columns, special tokens,
  training.output_dir
- control characters (newline, tab, NUL, line separators) and undecodable bytes from the command line
- what W&B refuses: project names with `/ \\ # ? % :` or over 128 characters, tags empty or over 64
  characters (the convention tags built from model.short_name, data.version and wandb.experimenter too), artifact
  names with other characters than letters, digits, `.`, `_`, `-`
- file names longer than the filesystem takes, and format fields other than plain {name} and {time} in
  training.output_dir
- settings that are fine one by one but not together: one column used twice, generation.max_new_tokens past the
  scratch model's positions, a beam-search length_penalty that overflows a float
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loop.config import INT64_MAX, Config, all_keys, load_config
from loop.errors import UserError
from tests.conftest import ROOT, train_env

# Every case tried: (--set items as a tuple, or TOML text; a fragment of the error, or None where the value is
# fine; what happened before these checks, found by running loop/train.py with the tiny test settings).
TRIED: list[tuple[tuple[str, ...] | str, str | None, str]] = [
    # non-finite floats
    (("training.learning_rate=nan",), "`training.learning_rate` must be a finite number, got nan",
     "ValueError in torch AdamW, traceback, exit 1"),
    ("[training]\nlearning_rate = inf\n", "`training.learning_rate` must be a finite number", "refused (≤ 1.0)"),
    ("[training]\nlearning_rate = -inf\n", "`training.learning_rate` must be a finite number", "refused (> 0.0)"),
    (("training.warmup_ratio=nan",), "`training.warmup_ratio` must be a finite number",
     "ValueError in math.ceil (warmup steps), traceback"),
    (("training.weight_decay=nan",), "`training.weight_decay` must be a finite number",
     "exit 0: torch takes NaN in a parameter group, so the weights become NaN"),
    (("training.weight_decay=inf",), "`training.weight_decay` must be a finite number", "exit 0, weights destroyed"),
    ("[training]\nweight_decay = 1e400\n", "`training.weight_decay` must be a finite number, got inf",
     "TOML reads 1e400 as inf; as above"),
    (("training.weight_decay=1" + "0" * 400,), "`training.weight_decay` must be a finite number",
     "OverflowError in load_config itself (int too large to convert to float), traceback"),
    (("training.max_grad_norm=nan",), "`training.max_grad_norm` must be a finite number",
     "exit 0: gradients scaled by NaN"),
    (("training.max_grad_norm=inf",), "must be a finite number (0 turns clipping off)",
     "exit 0, no clipping; refused so that 0 is the one way to say off and the config stays finite JSON"),
    (("training.adam_beta1=nan",), "`training.adam_beta1` must be a finite number", "ValueError in AdamW, traceback"),
    (("training.adam_epsilon=nan",), "`training.adam_epsilon` must be a finite number",
     "ValueError in AdamW, traceback"),
    (("training.adam_epsilon=inf",), "`training.adam_epsilon` must be a finite number",
     "exit 0, every update is zero"),
    (("model.scratch.dropout=nan",), "`model.scratch.dropout` must be a finite number",
     "RuntimeError in torch dropout, traceback"),
    (("generation.length_penalty=nan", "generation.num_beams=2"), "`generation.length_penalty` must be a finite",
     "exit 0, NaN written into best/generation_config.json (not JSON)"),
    (("generation.length_penalty=inf", "generation.num_beams=2"), "`generation.length_penalty` must be a finite",
     "exit 0, Infinity written into best/generation_config.json"),
    (("generation.length_penalty=-inf",), "`generation.length_penalty` must be a finite", "as above"),
    (("training.peak_tflops=nan",), "`training.peak_tflops` must be a finite number", "exit 0, train/mfu is NaN"),
    (("training.peak_tflops=inf",), "`training.peak_tflops` must be a finite number", "exit 0, train/mfu is 0"),
    # finite values at the edges that stay accepted
    (("training.warmup_ratio=1.0",), None, "fine with linear, cosine and constant schedules"),
    (("training.warmup_ratio=1.0", "training.scheduler=cosine"), None, "fine"),
    (("training.weight_decay=1e308",), None, "runs (finite, if useless)"),
    (("training.max_grad_norm=0",), None, "clipping off"),
    (("training.adam_beta1=0", "training.adam_beta2=0"), None, "fine in AdamW"),
    (("training.adam_beta1=1.0",), "`training.adam_beta1` must be < 1.0", "ValueError in AdamW, traceback"),
    (("training.adam_beta2=1.0",), "`training.adam_beta2` must be < 1.0", "ValueError in AdamW, traceback"),
    (("generation.length_penalty=1e308", "generation.num_beams=2"), "`generation.length_penalty` must be between -182 "
     "and 182 with beam search", "OverflowError in transformers beam search (length ** length_penalty), traceback"),
    (("generation.length_penalty=182", "generation.num_beams=2"), None, "fine"),
    (("generation.length_penalty=1e308",), None, "unused by greedy decoding"),
    (("generation.length_penalty=-1",), None, "fine"),
    # integers: seeds, 64 bits, library limits
    (("training.seed=-1",), "`training.seed` must be ≥ 0, got -1", "ValueError in numpy.random.seed, traceback"),
    (("training.seed=4294967296",), "`training.seed` must be ≤ 4294967295", "ValueError in numpy.random.seed"),
    (("training.seed=18446744073709551616",), "`training.seed` must be ≤ 4294967295", "as above"),
    (("training.seed=4294967295",), None, "fine"),
    (("training.seed=0",), None, "fine"),
    (("data.synthetic_seed=-5",), None, "fine (random.Random takes any integer)"),
    (("data.synthetic_seed=18446744073709551616",), "`data.synthetic_seed` must be ≤ 9223372036854775807 (64 bits)",
     "ran; refused now as outside TOML's 64-bit integers (the resolved config.toml would not be TOML)"),
    (("model.scratch.vocab_size=18446744073709551616",), "`model.scratch.vocab_size` must be ≤ 1048576",
     "OverflowError in the tokenizers trainer, traceback"),
    (("model.scratch.vocab_size=1099511627776",), "`model.scratch.vocab_size` must be ≤ 1048576",
     "process aborted (SIGABRT): the tokenizers trainer reserved 72 TB"),
    (("training.batch_size=1000000000000000000",), None, "fine: one batch of every row"),
    (("evaluation.eval_batch_size=9223372036854775807",), None, "fine"),
    (("evaluation.eval_batch_size=9223372036854775808",), "`evaluation.eval_batch_size` must be ≤ 9223372036854775807",
     "ValueError in the DataLoader (islice stop beyond sys.maxsize), traceback"),
    (("training.max_steps=100000000000000000000",), "`training.max_steps` must be ≤ 9223372036854775807", "not run"),
    (("generation.max_new_tokens=200",), "`generation.max_new_tokens` (200) must be ≤ the model's positions",
     "IndexError in the position embedding once generation runs past max(max_source_length, max_target_length)"),
    (("generation.max_new_tokens=128",), None, "fine: the scratch model has 128 positions"),
    (("generation.max_new_tokens=200", "model.from_scratch=false", "model.tokenizer=", "model.name_or_path=kobart"),
     None, "a pretrained model's positions are its own (KoBART: 1026); not checked here"),
    (("generation.no_repeat_ngram_size=1000000000000000000",), None, "fine"),
    (("wandb.table_rows=1000000000000000000", "evaluation.print_samples=1000000000000000000"), None, "fine"),
    (("data.max_train_samples=1000000000000000000", "data.max_dev_samples=1000000000000000000"), None, "fine"),
    (("model.max_target_length=1000000",), None, "fine"),
    (("generation.num_beams=2147483648",), None, "not fixed: out of memory (RuntimeError), depends on the machine"),
    (("model.max_source_length=1099511627776",), None, "not fixed: out of memory allocating the positions"),
    # booleans and floats where integers are expected
    (("training.seed=true",), "`training.seed` must be integer", "refused"),
    (("training.batch_size=1.5",), "`training.batch_size` must be integer", "refused"),
    (("data.source_buckets=[true]",), "`data.source_buckets` must be list of int", "accepted as a bucket of 1"),
    # strings: W&B
    (("wandb.project=team/proj",), "`wandb.project` must be free of the characters / \\ # ? % :",
     "UsageError in wandb.init, traceback"),
    (("wandb.project=a:b",), "`wandb.project` must be free of the characters", "as above"),
    (("wandb.project=",), "`wandb.project` must be a non-blank string", "exit 0, offline run with project ''"),
    (("wandb.project=" + "p" * 129,), "`wandb.project` must be at most 128 characters", "UsageError in wandb.init"),
    (("wandb.project=한국어 팀",), None, "W&B takes it"),
    (("wandb.tags=['']",), "`wandb.tags[0]` must be 1 to 64 characters, got ''",
     "pydantic ValidationError in wandb.init, traceback"),
    (("wandb.tags=['" + "t" * 65 + "']",), "`wandb.tags[0]` must be 1 to 64 characters", "as above"),
    (("wandb.tags=['" + "t" * 64 + "']",), None, "fine"),
    (("wandb.tags=['a','a']",), None, "fine: run_tags drops repeats"),
    (("wandb.tags=[]",), None, "fine"),
    (("model.short_name=" + "s" * 72,), "W&B tag 'model:sss", "ValidationError in wandb.init (tag over 64), traceback"),
    (("data.version=" + "v" * 71,), "W&B tag 'data:vvv", "as above"),
    (("wandb.experimenter=" + "e" * 72,), "W&B tag 'experimenter:eee", "as above"),
    (("data.version=1/2", "wandb.log_dataset=true"), "`data.version` must be only letters, digits",
     "ValueError in wandb.Artifact, traceback"),
    (("data.version=",), None, "fine: artifact dialogsum-v"),
    (("wandb.name=a\nb",), "`wandb.name` must be one line of text without control characters",
     "exit 0: W&B takes it, the default output_dir gets a newline"),
    ('[wandb]\nname = "a\\u0000b"\n', "`wandb.name` must be one line of text",
     "ValueError (embedded null byte) under the default output_dir, traceback"),
    (("wandb.name=../../escape",), None, "W&B takes it; train.py makes the path component safe"),
    (("wandb.name=" + "n" * 1000,), None, "W&B takes it"),
    (("wandb.notes=line one\nline two\tx",), None, "fine: notes may have several lines"),
    ('[wandb]\nnotes = "a\\u0000b"\n', "`wandb.notes` must be text without control characters other than newline",
     "exit 0 offline; NUL is never meant in notes"),
    (("wandb.group=",), None, "fine"),
    (("wandb.job_type=",), None, "fine"),
    (("wandb.group=" + "g" * 1000, "wandb.job_type=" + "j" * 1000, "wandb.entity=a/b"), None,
     "wandb.init takes them offline; an online failure falls back to offline with a warning"),
    # strings: training.output_dir
    (("training.output_dir=",), "`training.output_dir` must be a non-blank string",
     "exit 0, the run written into the current directory (config.toml, best/, checkpoints/)"),
    ('[training]\noutput_dir = "   "\n', "`training.output_dir` must be a non-blank string",
     "exit 0, a directory named '   '"),
    (("training.output_dir=out/{name:>300}",), "may use only {name} and {time}",
     "OSError (File name too long), traceback"),
    (("training.output_dir=out/{name.upper}",), "may use only {name} and {time}",
     "exit 0, a directory named '<built-in method upper of str object at 0x...>'"),
    (("training.output_dir=out/{name!r}",), "may use only {name} and {time}", "quotes in the directory name"),
    (("training.output_dir=out/{",), "may use only {name} and {time}", "refused"),
    (("training.output_dir=out/" + "x" * 300,), "names are at most 255 bytes", "OSError (File name too long)"),
    (("training.output_dir=out/" + "x/" * 2100,), "a path of at most 4095 bytes", "not run"),
    ('[training]\noutput_dir = "out/a\\u0000b"\n', "`training.output_dir` must be one line of text",
     "ValueError (embedded null byte), traceback"),
    (("training.output_dir=out/{{literal}}-{name}",), None, "fine"),
    # strings: data
    (("data.special_tokens=['']",), "`data.special_tokens[0]` must be a non-blank string",
     "exit 0, the tokenizer trainer split every character apart (no merges learned)"),
    (("data.special_tokens=[' ']",), "`data.special_tokens[0]` must be a non-blank string",
     "exit 0, the space became a special token"),
    (("data.special_tokens=[' #Person1#']",), "must be a string without leading or trailing whitespace",
     "exit 0, the token never matches the text"),
    (("data.special_tokens=['#Person1#','#Person1#']",), None, "fine: repeats are dropped"),
    (("data.special_tokens=[]",), None, "fine"),
    (("data.special_tokens=['my token']",), None, "fine: kept whole"),
    (("data.id_column=dialogue",), "must name three different columns",
     "exit 0, the dialogue text used as the id"),
    (("data.summary_column=dialogue",), "must name three different columns", "exit 0, the model learns to copy"),
    (("data.id_column=",), "`data.id_column` must be a non-blank string", "exit 2, 'missing column(s) ' with no name"),
    (("data.dialogue_column=a\tb",), "`data.dialogue_column` must be one line of text", "not run"),
    (("data.train_file=/tmp/" + "x" * 300 + "/train.csv", "data.synthetic=false"), None,
     "fine: exit 2, data file not found"),
    # strings: model
    ('[model]\nname_or_path = "a\\u0000b"\nfrom_scratch = false\ntokenizer = ""\n',
     "`model.name_or_path` must be one line of text", "exit 2, but only after writing the demo data"),
    (("model.name_or_path=", "model.from_scratch=false", "model.tokenizer="), None,
     "fine: exit 2, cannot load tokenizer ''"),
    (("model.name_or_path=/tmp/" + "x" * 300 + "/kobart", "model.from_scratch=false", "model.tokenizer="), None,
     "fine: exit 2, cannot load tokenizer"),
    (("model.name_or_path=/tmp/" + "x" * 300, "model.from_scratch=false", "model.tokenizer="), "W&B tag 'model:xxx",
     "exit 2, cannot load tokenizer (it does not exist); an existing directory would fail in wandb.init"),
    (("model.tokenizer=a\u2028b",), "`model.tokenizer` must be one line of text", "not run"),
]

REFUSED = [(case, message) for case, message, _ in TRIED if message is not None]
ACCEPTED = [case for case, message, _ in TRIED if message is None]


def load(tmp_path: Path, case: tuple[str, ...] | str):
    """load_config with the case's --set items, or with its TOML text as a file."""
    if isinstance(case, tuple):
        return load_config(None, list(case))
    path = tmp_path / "hostile.toml"
    path.write_text(case, encoding="utf-8")
    return load_config(path)


def case_id(case: tuple[str, ...] | str) -> str:
    """A short printable test id."""
    return ascii(" ".join(case) if isinstance(case, tuple) else case)[1:60]


@pytest.mark.parametrize(("case", "message"), REFUSED, ids=[case_id(c) for c, _ in REFUSED])
def test_hostile_value_is_refused_in_one_line(tmp_path, case, message):
    with pytest.raises(UserError) as err:
        load(tmp_path, case)
    text = str(err.value)
    assert message in text
    assert len(text.splitlines()) == 1 and "\x00" not in text
    where = (f"{tmp_path / 'hostile.toml'}: ",) if isinstance(case, str) else ("--set: ", "<defaults>: ")
    assert text.startswith(where), text


@pytest.mark.parametrize("case", ACCEPTED, ids=[case_id(c) for c in ACCEPTED])
def test_value_that_works_downstream_stays_accepted(tmp_path, case):
    cfg = load(tmp_path, case)
    again = tmp_path / "resolved.toml"
    again.write_text(cfg.to_toml(), encoding="utf-8")
    assert load_config(again).to_dict() == cfg.to_dict()  # what is accepted also round-trips


def default(key: str):
    """The default value of a dotted key."""
    value = Config().to_dict()
    for part in key.split("."):
        value = value[part]
    return value


KEYS = {t: [k for k in all_keys() if type(default(k)) is t] for t in (float, int, str)}


@pytest.mark.parametrize("key", KEYS[float])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_key_refuses_non_finite(key, value):
    with pytest.raises(UserError, match=rf"--set: `{key}` must be a finite number"):
        load_config(overrides=[f"{key}={value}"])


@pytest.mark.parametrize("key", KEYS[int])
def test_every_integer_key_refuses_more_than_64_bits(key):
    with pytest.raises(UserError, match=rf"--set: `{key}` must be ≤ \d+"):
        load_config(overrides=[f"{key}={INT64_MAX + 1}"])


@pytest.mark.parametrize("key", KEYS[str])
@pytest.mark.parametrize("char", ["\x00", "\x1b", "\x7f", "\u2029"])
def test_every_string_key_refuses_control_characters(key, char):
    with pytest.raises(UserError, match=rf"--set: `{key}` must be "):
        load_config(overrides=[f"{key}=a{char}b"])


@pytest.mark.parametrize("name", ["base.toml", "demo.toml", "fast.toml"])
def test_shipped_configs_pass(name):
    load_config(ROOT / "configs" / name)


CLI_CASES = [
    (["--set", "training.learning_rate=nan"], "error: --set: `training.learning_rate` must be a finite number"),
    (["--set", "wandb.name=a\nb"], "error: --set: `wandb.name` must be one line of text"),
    (["--set", b"wandb.name=caf\xe9"], "error: --set: `wandb.name` must be valid UTF-8 text, got 'caf\\udce9'"),
    (["--set", "wandb.tags=['" + "t" * 65 + "']"], "`wandb.tags[0]` must be 1 to 64 characters"),
    (["--config", "hostile.toml"], "hostile.toml: `training.seed` must be ≥ 0, got -1"),
]


@pytest.mark.parametrize(("args", "message"), CLI_CASES, ids=[ascii(a[-1])[1:40] for a, _ in CLI_CASES])
def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path, args, message):
    config = tmp_path / "hostile.toml"
    config.write_text("[training]\nseed = -1\n", encoding="utf-8")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = [str(config) if a == "hostile.toml" else a for a in args]
    proc = subprocess.run([sys.executable, str(ROOT / "loop/train.py"), *args], cwd=cwd, env=train_env(),
                          capture_output=True, timeout=120)
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert list(cwd.iterdir()) == []
