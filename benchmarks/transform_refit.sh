#!/usr/bin/env bash
# Pruning past the channels the gates switched off: the shipped reference model at parameter
# budgets under the 9.0% its own prune keeps, three ways: the paper's plain drop (--no-refit), the
# kept gates refitted (--refit-gates-only), and the default, which also refits each transform conv
# whose input the pruning upstream has moved. Test accuracy on the full CIFAR-10 test set.
#
#   bash benchmarks/transform_refit.sh [DATA]
#
# Writes benchmarks/results/transform_refit-{plain,gates,transforms}.json (and .csv, .png beside
# them) and transform_refit-prune-{gates,transforms}.json (one prune each way at 8%, with its
# timings), which the README quotes.
set -euo pipefail
data=${1:-../shared/data/cifar10-jpeg.tar.gz}
hw=${HWTOOL:-hwtool}
res=benchmarks/results
mkdir -p "$res"

for mode in plain gates transforms; do
    case $mode in
        plain) flag=--no-refit ;;
        gates) flag=--refit-gates-only ;;
        transforms) flag= ;;
    esac
    # shellcheck disable=SC2086
    $hw sweep models/reference.onnx --data "$data" --calib models/calib256.npy --budgets 0.085,0.08,0.07,0.06 $flag \
        --csv "$res/transform_refit-$mode.csv" --json "$res/transform_refit-$mode.json" \
        --png "$res/transform_refit-$mode.png"
done
# The time it takes: one prune at the 8% budget each way (the JSON's `seconds`).
mkdir -p runs
$hw prune models/reference.onnx --budget 0.08 --calib models/calib256.npy --refit-gates-only \
    -o runs/reference.budget8-gates.onnx --json > "$res/transform_refit-prune-gates.json"
$hw prune models/reference.onnx --budget 0.08 --calib models/calib256.npy \
    -o runs/reference.budget8.onnx --json > "$res/transform_refit-prune-transforms.json"
