"""The accelerate configs in launch/ and the SLURM script: valid for accelerate 1.x, documented, launchable."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SBATCH = LAUNCH / "slurm_multinode.sbatch"

# file -> (distributed_type, mixed_precision, num_processes, the launcher accelerate picks for it)
EXPECTED = {
    "single_gpu.yaml": ("NO", "fp16", 1, "simple"),
    "multi_gpu_bf16.yaml": ("MULTI_GPU", "bf16", 8, "multi_gpu"),
    "multi_gpu_fp16.yaml": ("MULTI_GPU", "fp16", 8, "multi_gpu"),
    "fsdp.yaml": ("FSDP", "bf16", 8, "fsdp"),
    "deepspeed_zero2.yaml": ("DEEPSPEED", "bf16", 8, "deepspeed"),
    "deepspeed_zero3.yaml": ("DEEPSPEED", "bf16", 8, "deepspeed"),
    # MULTI_GPU on purpose: it is the only type whose launcher starts 2 processes (see the file's header).
    "cpu_2proc.yaml": ("MULTI_GPU", "no", 2, "multi_gpu"),
}
# Nested blocks whose keys `accelerate launch` copies onto its own arguments (with these prefixes added).
NESTED = {"fsdp_config": "fsdp_", "dynamo_config": "dynamo_", "deepspeed_config": ""}


@pytest.fixture(scope="module")
def parser():
    """accelerate's own `accelerate launch` argument parser."""
    return launch_command_parser()


def launch_dests(parser) -> set[str]:
    """Every argument name (dest) of `accelerate launch`."""
    return {a.dest for a in parser._actions}


def nested_key_errors(config: dict, dests: set[str]) -> list[str]:
    """Keys of fsdp_config/deepspeed_config/dynamo_config that `accelerate launch` would silently ignore."""
    bad = []
    for block, prefix in NESTED.items():
        for key in config.get(block) or {}:
            name = key if key.startswith(prefix) else prefix + key
            if name not in dests:
                bad.append(f"{block}.{key}")
    return bad


def resolve(parser, path: Path):
    """What `accelerate launch --config_file path train.py` would resolve to, without launching anything."""
    args = parser.parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def launcher_of(args) -> str:
    """The launcher `accelerate launch` would pick (mirrors launch_command's order)."""
    if args.use_deepspeed and not args.cpu:
        return "deepspeed"
    if args.use_fsdp and not args.cpu:
        return "fsdp"
    if args.multi_gpu and not args.cpu:
        return "multi_gpu"
    return "simple"


def header(path: Path) -> str:
    """The leading comment block of a file (after a shebang), as text."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].startswith("#!"):
        lines = lines[1:]
    block = []
    for line in lines:
        if not line.startswith("#") or line.startswith("#SBATCH"):
            break
        block.append(line)
    return "\n".join(block)


def test_every_config_is_listed():
    """Each launch/*.yaml has an expected row here, and each expected file exists."""
    assert sorted(p.name for p in LAUNCH.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_is_valid_and_sensible(name, parser):
    """Parses with PyYAML and accelerate's ClusterConfig; sensible type/precision/processes; known nested keys."""
    path = LAUNCH / name
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(raw, dict)
    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    dist_type, precision, processes, _ = EXPECTED[name]
    assert cfg.distributed_type.value == dist_type
    assert cfg.mixed_precision == precision
    assert cfg.num_processes == processes
    assert cfg.num_machines == 1 and cfg.machine_rank == 0
    assert nested_key_errors(raw, launch_dests(parser)) == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_header_gives_the_command(name):
    """The file starts with a comment that says when to use it and the exact launch command."""
    text = header(LAUNCH / name)
    assert text.count("\n") >= 1, f"{name}: no header comment"
    assert f"accelerate launch --config_file launch/{name}" in text
    assert "loop/train.py" in text


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_resolves_to_the_intended_launcher(name, parser):
    """`accelerate launch` would pick the intended launcher with the intended process count and precision."""
    args, _ = resolve(parser, LAUNCH / name)
    _, precision, processes, launcher = EXPECTED[name]
    assert launcher_of(args) == launcher
    assert args.num_processes == processes
    assert args.mixed_precision == precision


def test_typo_in_top_level_key_is_rejected(tmp_path):
    """accelerate's config loader refuses unknown top-level keys (so the positive tests mean something)."""
    raw = yaml.safe_load((LAUNCH / "multi_gpu_bf16.yaml").read_text(encoding="utf-8"))
    raw["num_proceses"] = raw.pop("num_processes")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ValueError, match="unknown keys"):
        load_config_from_file(str(bad))


def test_typo_in_nested_key_is_caught(parser):
    """accelerate ignores unknown fsdp_config/deepspeed_config keys silently; our check does not."""
    raw = yaml.safe_load((LAUNCH / "fsdp.yaml").read_text(encoding="utf-8"))
    raw["fsdp_config"]["fsdp_transformer_layer_cls_to_warp"] = "BartEncoderLayer"
    raw["deepspeed_config"] = {"zero3_save_16bit_modle": True}
    assert nested_key_errors(raw, launch_dests(parser)) == [
        "fsdp_config.fsdp_transformer_layer_cls_to_warp", "deepspeed_config.zero3_save_16bit_modle"]


def test_fsdp_reaches_the_workers_as_intended(parser, monkeypatch):
    """FSDP2, full shard, BART layers wrapped, sharded checkpoints: the env the workers get builds that plugin."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers.models.bart import modeling_bart

    args, _ = resolve(parser, LAUNCH / "fsdp.yaml")
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FSDP2's FULL_SHARD
    assert plugin.transformer_cls_names_to_wrap == ["BartEncoderLayer", "BartDecoderLayer"]
    assert all(hasattr(modeling_bart, name) for name in plugin.transformer_cls_names_to_wrap)
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert type(plugin.cpu_offload).__name__ == "OffloadPolicy"  # FSDP2's "no offload"; CPUOffloadPolicy offloads


@pytest.mark.parametrize(("name", "stage"), [("deepspeed_zero2.yaml", "2"), ("deepspeed_zero3.yaml", "3")])
def test_deepspeed_reaches_the_workers_as_intended(name, stage, parser):
    """ZeRO stage, no offload, 16-bit save for ZeRO-3, and no accumulation value forced on the loop."""
    args, defaults = resolve(parser, LAUNCH / name)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == stage
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == "none"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] == "none"
    # Set, this would override the Accelerator's gradient_accumulation_steps in code; absent, DeepSpeed uses "auto".
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env
    if stage == "3":
        assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
        assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"


def test_cpu_2proc_header_gives_the_required_env():
    """The CPU config says that ACCELERATE_USE_CPU=true is required (the yaml alone starts unconnected processes)."""
    assert "ACCELERATE_USE_CPU=true accelerate launch --config_file launch/cpu_2proc.yaml" in header(
        LAUNCH / "cpu_2proc.yaml")


# ---- SLURM ----------------------------------------------------------------------------------------------------

def launch_flags(script: str) -> list[str]:
    """The --flags of every `accelerate launch` in the script's code (comments skipped), up to the training script."""
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    flags = []
    for chunk in code.split("accelerate launch")[1:]:
        args = chunk.split("loop/train.py")[0]
        flags += [tok for tok in args.replace("\\\n", " ").split() if tok.startswith("--")]
    return flags


def test_sbatch_is_valid_bash_with_the_slurm_settings():
    """bash -n passes; one task per node, 8 GPUs, USR1 before the limit, resume auto; header present."""
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text(encoding="utf-8")
    for line in ("#SBATCH --nodes=", "#SBATCH --ntasks-per-node=1", "#SBATCH --gres=gpu:8",
                 "#SBATCH --signal=USR1@"):
        assert line in text
    assert "--resume auto" in text
    assert "sbatch --nodes=" in header(SBATCH)


def test_sbatch_uses_only_real_launch_flags(parser):
    """Every flag passed to `accelerate launch` in the script exists in accelerate's launch parser."""
    flags = launch_flags(SBATCH.read_text(encoding="utf-8"))
    assert {"--config_file", "--machine_rank", "--main_process_ip", "--rdzv_backend"} <= set(flags)
    known = {s for a in parser._actions for s in a.option_strings}
    assert [f for f in flags if f not in known] == []
    assert launch_flags("accelerate launch --config_file x.yaml --num_machine 2 loop/train.py") == [
        "--config_file", "--num_machine"]  # the extractor sees a typo, which the check above would reject
    assert "--num_machine" not in known


FAKE_ACCELERATE = """#!{python}
import json, os, signal, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:],
                         "usr1_ignored": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN}}) + "\\n")
print("stopped by SIGUSR1 at step 3" if os.environ.get("FAKE_STOP") else "done: best eval/rouge_l = 0.3")
"""
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == -* ]]; do shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit $?; done
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-node-7\\ngpu-node-8\\n'; else echo "$*" >> "$FAKE_REQUEUE"; fi
"""


def run_sbatch(tmp_path: Path, stop: bool, restart: int) -> tuple[list[dict], str]:
    """Run the batch script with fake srun/scontrol/accelerate on 2 nodes; return each task's launch and requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("accelerate", FAKE_ACCELERATE.format(python=sys.executable)), ("srun", FAKE_SRUN),
                       ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body, encoding="utf-8")
        (bin_dir / name).chmod(stat.S_IRWXU)
    log, requeue = tmp_path / "launches.jsonl", tmp_path / "requeue.txt"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[7-8]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "t", "SLURM_SUBMIT_DIR": str(tmp_path),
           "SLURM_RESTART_COUNT": str(restart), "FAKE_LOG": str(log), "FAKE_REQUEUE": str(requeue),
           "FAKE_STOP": "1" if stop else ""}
    env.pop("MASTER_PORT", None)
    done = subprocess.run(["bash", str(SBATCH), "--set", "training.learning_rate=5e-5"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    runs = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    return runs, requeue.read_text(encoding="utf-8") if requeue.exists() else ""


def test_sbatch_launches_one_accelerate_per_node_with_its_own_rank(tmp_path, parser):
    """Each node's task gets its own --machine_rank, the shared rendezvous and 16 processes; USR1 is ignored."""
    runs, requeued = run_sbatch(tmp_path, stop=False, restart=0)
    assert len(runs) == 2 and requeued == ""
    for rank, run in enumerate(runs):
        argv = run["argv"]
        assert argv[0] == "launch" and run["usr1_ignored"]
        args = parser.parse_args(argv[1:])  # the real parser accepts the exact command line
        assert args.machine_rank == rank
        assert (args.num_machines, args.num_processes) == (2, 16)
        assert (args.main_process_ip, args.main_process_port) == ("gpu-node-7", 4242 + 20000)
        assert args.rdzv_backend == "c10d" and args.config_file == "launch/multi_gpu_bf16.yaml"
        assert args.training_script == "loop/train.py"
        assert args.training_script_args == ["--config", "configs/base.toml", "--resume", "auto",
                                             "--set", "training.learning_rate=5e-5"]
        args, _, _ = _validate_launch_command(args)  # the per-node config accepts these overrides
        assert launcher_of(args) == "multi_gpu"
        assert prepare_multi_gpu_env(args) and args.rdzv_endpoint == "gpu-node-7:24242"


def test_sbatch_requeues_only_a_run_that_stopped_early(tmp_path):
    """A run stopped by the signal is requeued; a later start that finishes is not (per-start logs)."""
    _, requeued = run_sbatch(tmp_path, stop=True, restart=0)
    assert requeued.split() == ["requeue", "4242"]
    (tmp_path / "requeue.txt").unlink()
    _, requeued = run_sbatch(tmp_path, stop=False, restart=1)
    assert requeued == ""


def test_stop_signals_are_the_ones_slurm_sends():
    """The loop stops cleanly on the signal the script asks SLURM for (and on SIGTERM)."""
    from loop.signals import STOP_SIGNALS

    assert signal.SIGUSR1 in STOP_SIGNALS and signal.SIGTERM in STOP_SIGNALS
    assert "--signal=USR1@" in SBATCH.read_text(encoding="utf-8")
