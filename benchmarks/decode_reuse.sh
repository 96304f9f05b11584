#!/usr/bin/env bash
# What reusing encoder outputs saves in loop.decode_search: the same search with and without reuse, one after the
# other, into two output directories; prints each total wall time and checks that the two tables score alike.
#   benchmarks/decode_reuse.sh MODEL_DIR DATA SWEEP_FILE OUT_DIR [extra decode_search args...]
set -euo pipefail
model=$1 data=$2 sweep=$3 out=$4
shift 4
python=${PYTHON:-python}
for variant in reuse no-reuse; do
    flag=()
    [[ $variant == no-reuse ]] && flag=(--no-encoder-reuse)
    rm -rf "$out/$variant"
    start=$(date +%s.%N)
    "$python" -m loop.decode_search --model "$model" --data "$data" --sweep "$sweep" --output "$out/$variant" \
        "${flag[@]}" "$@" > "$out/$variant.log" 2>&1
    end=$(date +%s.%N)
    settings=$("$python" -c "import csv,sys; print(round(sum(float(r['seconds'] or 0) for r in csv.DictReader(open(sys.argv[1]))), 1))" \
        "$out/$variant/results.csv")
    echo "$variant: $(echo "$end - $start" | bc) s wall in total, $settings s summarizing (sum of the seconds column)"
done
# Scores must not depend on reuse: compare every column but seconds, rank, setting (its number) and note.
strip() { "$python" -c "import csv,sys; r=list(csv.DictReader(open(sys.argv[1]))); print(sorted(tuple((k,v) for k,v in x.items() if k not in ('seconds','rank','setting','note')) for x in r))" "$1"; }
if [[ "$(strip "$out/reuse/results.csv")" == "$(strip "$out/no-reuse/results.csv")" ]]; then
    echo "scores: identical with and without reuse"
else
    echo "scores: DIFFER with and without reuse"; exit 1
fi
