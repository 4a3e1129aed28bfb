#!/usr/bin/env bash
# Results of a trained reference run: export, accuracy, prune, int8, latency, sweep, heat map.
#
#   bash benchmarks/reference.sh RUN_DIR [DATA] [THRESHOLD] [NAME]
#
# Writes models/NAME.onnx, models/NAME.pruned.onnx, models/NAME.pruned.int8.onnx,
# benchmarks/results/NAME-*.json and docs/*-NAME.png. The README's reference tables quote these.
set -euo pipefail
run=${1:?usage: benchmarks/reference.sh RUN_DIR [DATA] [THRESHOLD] [NAME]}
data=${2:-../shared/data/cifar10-jpeg.tar.gz}
threshold=${3:-0.05}
name=${4:-reference}
hw=${HWTOOL:-hwtool}
res=benchmarks/results
mkdir -p "$res" docs models

cp "$run/log.json" "$res/$name-train-log.json"

$hw export "$run/checkpoint.pt" -o "models/$name.onnx" --data "$data" --json > "$res/$name-export.json"
$hw eval "models/$name.onnx" --data "$data" --json > "$res/$name-eval.json"
$hw prune "models/$name.onnx" --threshold "$threshold" --calib models/calib256.npy \
    -o "models/$name.pruned.onnx" --json > "$res/$name-prune.json"
$hw eval "models/$name.pruned.onnx" --data "$data" --json > "$res/$name-pruned-eval.json"
$hw quantize "models/$name.pruned.onnx" -o "models/$name.pruned.int8.onnx" --data "$data" --json \
    > "$res/$name-pruned-int8.json"
$hw bench "models/$name.onnx" "models/$name.pruned.onnx" "models/$name.pruned.int8.onnx" \
    --batch 1,64 --runs 30 --json "$res/$name-bench.json"
$hw sweep "models/$name.onnx" --data "$data" --calib models/calib256.npy \
    --thresholds 0,0.01,0.02,0.03,0.05,0.1,0.2 \
    --csv "$res/$name-sweep.csv" --json "$res/$name-sweep.json" --png "docs/sweep-$name.png"
$hw gates "models/$name.onnx" --calib models/calib256.npy --png "docs/gates-$name.png" \
    --json "$res/$name-gates.json"
