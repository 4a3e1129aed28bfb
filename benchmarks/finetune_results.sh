#!/usr/bin/env bash
# Results of a fine-tuning run (`hwtool finetune`), reported beside the shipped model's: export,
# prune at the fine-tune's threshold (exact: the removal is baked in), accuracy, int8.
#
#   bash benchmarks/finetune_results.sh RUN_DIR NAME [DATA] [THRESHOLD]
#
# Writes runs/NAME.onnx, runs/NAME.pruned.onnx, runs/NAME.pruned.int8.onnx (not shipped) and
# benchmarks/results/NAME-{train-log,train-config,export,prune,pruned-eval,pruned-int8}.json, which the README quotes.
set -euo pipefail
run=${1:?usage: benchmarks/finetune_results.sh RUN_DIR NAME [DATA] [THRESHOLD]}
name=${2:?usage: benchmarks/finetune_results.sh RUN_DIR NAME [DATA] [THRESHOLD]}
data=${3:-../shared/data/cifar10-jpeg.tar.gz}
threshold=${4:-0.05}
hw=${HWTOOL:-hwtool}
res=benchmarks/results
mkdir -p "$res" runs

cp "$run/log.json" "$res/$name-train-log.json"
cp "$run/config.json" "$res/$name-train-config.json"
$hw export "$run/checkpoint.pt" -o "runs/$name.onnx" --data "$data" --json > "$res/$name-export.json"
$hw prune "runs/$name.onnx" --threshold "$threshold" --calib models/calib256.npy \
    -o "runs/$name.pruned.onnx" --json > "$res/$name-prune.json"
$hw eval "runs/$name.pruned.onnx" --data "$data" --json > "$res/$name-pruned-eval.json"
$hw quantize "runs/$name.pruned.onnx" -o "runs/$name.pruned.int8.onnx" --data "$data" --json \
    > "$res/$name-pruned-int8.json"
