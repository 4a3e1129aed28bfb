#!/usr/bin/env bash
# Figures of the reference network trained without the incentive (λ = 0), the comparison run of
# issue 5: accuracy, the gate heat map, and what pruning at the usual thresholds does to it. The
# model itself is not shipped (models/ stays small); its export goes to the run folder.
#
#   bash benchmarks/reference_plain.sh RUN_DIR [DATA] [NAME]
set -euo pipefail
run=${1:?usage: benchmarks/reference_plain.sh RUN_DIR [DATA] [NAME]}
data=${2:-../shared/data/cifar10-jpeg.tar.gz}
name=${3:-reference-plain}
hw=${HWTOOL:-hwtool}
res=benchmarks/results
mkdir -p "$res" docs

cp "$run/log.json" "$res/$name-train-log.json"

$hw export "$run/checkpoint.pt" -o "$run/$name.onnx" --data "$data" --json > "$res/$name-export.json"
$hw eval "$run/$name.onnx" --data "$data" --json > "$res/$name-eval.json"
$hw gates "$run/$name.onnx" --calib models/calib256.npy --png "docs/gates-$name.png" --json "$res/$name-gates.json"
$hw sweep "$run/$name.onnx" --data "$data" --calib models/calib256.npy --thresholds 0,0.02,0.05,0.1 \
    --csv "$res/$name-sweep.csv" --json "$res/$name-sweep.json" --png "docs/sweep-$name.png"
