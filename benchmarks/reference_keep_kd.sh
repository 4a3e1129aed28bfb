#!/usr/bin/env bash
# Results of the `keep-kd` run of benchmarks/train_reference.sh (phase 3 again, distilled from
# phase 1), unshipped: export, accuracy, prune at 0.05 and the pruned model's accuracy; the models
# stay in the run folder.
#
#   bash benchmarks/reference_keep_kd.sh [RUN_DIR] [DATA]
#
# Writes RUN_DIR/reference-keep-kd{,.pruned}.onnx and benchmarks/results/keep-kd/reference-*.json.
set -euo pipefail
run=${1:-runs/ref-keep-kd}
data=${2:-../shared/data/cifar10-jpeg.tar.gz}
hw=${HWTOOL:-hwtool}
res=benchmarks/results/keep-kd
model="$run/reference-keep-kd.onnx"
mkdir -p "$res"

cp "$run/log.json" "$res/reference-train-log.json"
$hw export "$run/checkpoint.pt" -o "$model" --data "$data" --json > "$res/reference-export.json"
$hw eval "$model" --data "$data" --json > "$res/reference-eval.json"
$hw prune "$model" --threshold 0.05 --calib models/calib256.npy -o "${model%.onnx}.pruned.onnx" --json \
    > "$res/reference-prune.json"
$hw eval "${model%.onnx}.pruned.onnx" --data "$data" --json > "$res/reference-pruned-eval.json"
