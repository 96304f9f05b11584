#!/usr/bin/env bash
# The wheels that benchmarks/run_gpu.sh (and gpu_check.sh) install on a GPU machine whose image lacks them, for
# Python 3.12 on x86-64, into .whl/ (git-ignored; both scripts install it into /tmp/site when it is there):
#   bash benchmarks/gpu_wheels.sh           -> .whl/*.whl, the versions installed here (what the tests passed on)
# - datasets, dill, multiprocess, rouge-score, nltk, tomli-w: imported by the loop, missing from such an image;
# - transformers: images with one older than 5.23 split a compiled BART's graph at every layer (its layer-drop
#   check; see loop/compiled.py graph_break_note), so the compiled figures would not be this loop's. Set
#   TRANSFORMERS= (empty) to measure the image's own transformers instead.
# Needs the package index (not the GPU machine). About 15 MB; the image's pandas, pyarrow, fsspec, regex, ... stay.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
version() { "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
TRANSFORMERS=${TRANSFORMERS-$(version transformers)}
wheels=()
for name in datasets dill multiprocess nltk tomli-w; do
  wheels+=("$name==$(version "$name")")
done
[ -n "$TRANSFORMERS" ] && wheels+=("transformers==$TRANSFORMERS")
rm -rf .whl
mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${wheels[@]}"
# rouge-score is published as a source archive only: build its (pure-Python) wheel here.
"$PYTHON" -m pip wheel -q --no-deps -w .whl "rouge-score==$(version rouge-score)"
ls -l .whl
du -sh .whl
