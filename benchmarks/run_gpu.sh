#!/usr/bin/env bash
# Issue 7's side-by-side speed benchmarks as one prepared run (on a lent GPU machine, from the repo root):
#   bash benchmarks/run_gpu.sh                  -> JSON, logs and summary.txt under ${OUT:-/tmp/bench}
#   DEVICE=cpu bash benchmarks/run_gpu.sh       -> the same scripts on the CPU (small model, fp32): the dry run
# Before it, where the package index is reachable: `bash benchmarks/gpu_wheels.sh` puts the wheels an image
# without datasets/rouge-score needs (and transformers >= 5.23, see there) in .whl/; carry .whl with the run.
# 1. throughput.py: this loop (its real entry point; length-grouped steps as in configs/base.toml), the same with
#    torch.compile reduce-overhead + static shape buckets (loop_compiled, as configs/fast.toml; GPU only), and
#    Seq2SeqTrainer with random and with length-grouped batches, the latter also with cuDNN attention off;
#    KoBART shape (d_model 768, 6+6 layers, 16 heads,
#    ffn 3072, vocab 30000), bf16, batch 16, 30 untimed + 100 timed optimizer steps each, then a 20-step profiled
#    pass of the loop's step (est. 5 min with the compile). The loop trains with training.attention_backend = auto
#    (cuDNN attention off on CUDA for its varying shapes); the JSON has each loop variant's compile seconds and
#    counts (dynamo compiles, recompiles, backward compiles, CUDA graphs recorded) and its SDPA kernel switches.
#    The A/B of the attention choice (about 1 min more; the loop with torch's own kernel choice, cuDNN first on
#    Hopper): THROUGHPUT_ARGS="--variants loop,loop_sdpa_default" alone (est. 2 min), or that variant added to
#    the full list;
# 2. overhead.py: seconds per checkpoint save / best export / W&B event for the KoBART shape and the share of wall
#    time they take at base.toml's cadences (est. 1 min; W&B events only where wandb is installed);
# 3. eval_speed.py: loop evaluate() vs Seq2SeqTrainer.predict(predict_with_generate) + the same ROUGE,
#    500 dev rows, batch 32 (and the Trainer also at its default eval batch, 8), beam 4, 64 new tokens, one
#    untimed warmup batch + one timed pass per side (est. 2.5 min; the batch-8 Trainer runs last, so a cap cuts it
#    first). The static KV cache (generation.cache = static, decoding step compiled by transformers) beside the
#    loop's dynamic cache: EVAL_ARGS="--static-cache" (one more loop side; its compiles may need EVAL_CAP_S raised).
# Every variant run (and the profiled pass) runs in a fresh Python process of its own, one after another, the
# order rotated per repeat: no variant inherits another's CUDA context, cuBLAS/kernel choices, allocator pool or
# imports (each such start costs ~10 s of setup outside the timed span; a worker's pid is in the JSON).
# Each script has a hard time cap (THROUGHPUT_CAP_S, OVERHEAD_CAP_S, EVAL_CAP_S; 9.5 minutes together) and
# rewrites its JSON as results come in, so a capped run still leaves what it finished (timeout's TERM reaches
# the workers too: same process group). No W&B; ROUGE on characters when the mecab dictionary is missing (the
# script says so). Extra arguments: THROUGHPUT_ARGS, OVERHEAD_ARGS, EVAL_ARGS, PYTHON.
set -uo pipefail
OUT=${OUT:-/tmp/bench}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -d .whl ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
{
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  fi
  "$PYTHON" -c "import sys, torch, transformers, accelerate; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | tee "$OUT/env.txt"

run() {  # name, time cap in seconds, then the script's arguments
  local name=$1 cap=$2
  shift 2
  local start
  start=$("$PYTHON" -c "import time; print(time.time())")
  timeout --signal=TERM --kill-after=10 "$cap" "$PYTHON" "benchmarks/$name.py" --device "$DEVICE" \
    --json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  "$PYTHON" -c "import sys, time; print(f'{sys.argv[1]} rc={sys.argv[2]} wall_s={time.time() - float(sys.argv[3]):.1f}')" \
    "$name" "$rc" "$start" | tee -a "$OUT/summary.txt"
  # The readable tables: every line from the device line on.
  sed -n '/^device: /,$p' "$OUT/$name.log" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || tail -20 "$OUT/$name.log" | tee -a "$OUT/summary.txt"
}

# shellcheck disable=SC2086  # word splitting of the extra arguments is intended
run throughput "${THROUGHPUT_CAP_S:-330}" --loop-set data.group_by_length=true ${THROUGHPUT_ARGS:-}
# shellcheck disable=SC2086
run overhead "${OVERHEAD_CAP_S:-90}" ${OVERHEAD_ARGS:-}
# shellcheck disable=SC2086
run eval_speed "${EVAL_CAP_S:-150}" ${EVAL_ARGS:-}
