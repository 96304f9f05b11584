#!/usr/bin/env bash
# One prepared run of every GPU check for the core loop (run on a lent GPU machine, from the repo root):
#   bash benchmarks/gpu_check.sh            -> logs and a summary under ${OUT:-/tmp/gpu_check}
# 1. the demo config through `accelerate launch` (mixed_precision auto = fp16 on a GPU);
# 2. a KoBART-shaped BART (d_model 768, 6+6 layers, 16 heads, ffn 3072) built from a config on the demo data,
#    300 optimizer steps at batch 16, in fp16 and in bf16, with beam-4 evaluation every 100 steps.
# The GPU image has no wandb and no mecab dictionary: W&B is disabled and ROUGE counts characters there.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/gpu.txt"
COMMON=(--set evaluation.rouge_tokenizer=char --set wandb.mode=disabled ${GPU_CHECK_EXTRA:-})

run() {  # name, then train.py arguments
  local name=$1; shift
  local start
  start=$(date +%s.%N)
  accelerate launch --num_processes 1 --num_machines 1 --dynamo_backend no loop/train.py "$@" "${COMMON[@]}" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  python3 -c "import sys, time; print(f'{sys.argv[1]} rc={sys.argv[2]} wall_s={time.time() - float(sys.argv[3]):.1f}')" \
    "$name" "$rc" "$start" | tee -a "$OUT/summary.txt"
  grep -E "^step [0-9]+: eval|^done:|samples/s" "$OUT/$name.log" | tail -8 | tee -a "$OUT/summary.txt"
}

run demo_fp16 --config configs/demo.toml --set training.output_dir=/tmp/gc/demo
KOBART=(--config configs/demo.toml --set model.scratch.d_model=768 --set model.scratch.encoder_layers=6
  --set model.scratch.decoder_layers=6 --set model.scratch.attention_heads=16 --set model.scratch.ffn_dim=3072
  --set model.scratch.vocab_size=30000 --set training.batch_size=16 --set training.learning_rate=3e-4
  --set training.max_steps=300 --set evaluation.eval_steps=100 --set evaluation.save_steps=300
  --set evaluation.logging_steps=50 --set evaluation.eval_batch_size=32 --set generation.num_beams=4
  --set generation.max_new_tokens=64)
run kobart_shape_fp16 "${KOBART[@]}" --set training.mixed_precision=fp16 --set training.output_dir=/tmp/gc/k16
run kobart_shape_bf16 "${KOBART[@]}" --set training.mixed_precision=bf16 --set training.output_dir=/tmp/gc/kbf
