#!/usr/bin/env bash
# Results of the `long` run of benchmarks/train_reference.sh (phase 1 trained longer), unshipped:
# export, accuracy, gate statistics and the threshold sweep; the model stays in the run folder.
#
#   bash benchmarks/reference_long.sh [RUN_DIR] [DATA]
#
# Writes RUN_DIR/reference-long.onnx and benchmarks/results/run1b/reference-*.json.
set -euo pipefail
run=${1:-runs/ref-long}
data=${2:-../shared/data/cifar10-jpeg.tar.gz}
hw=${HWTOOL:-hwtool}
res=benchmarks/results/run1b
model="$run/reference-long.onnx"
mkdir -p "$res"

cp "$run/log.json" "$res/reference-train-log.json"
$hw export "$run/checkpoint.pt" -o "$model" --data "$data" --json > "$res/reference-export.json"
$hw eval "$model" --data "$data" --json > "$res/reference-eval.json"
$hw gates "$model" --calib models/calib256.npy --json "$res/reference-gates.json" > /dev/null
$hw sweep "$model" --data "$data" --calib models/calib256.npy --thresholds 0,0.01,0.02,0.05 \
    --csv "$res/reference-sweep.csv" --json "$res/reference-sweep.json"
