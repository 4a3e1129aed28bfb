#!/usr/bin/env bash
# Kept channels rounded up to multiples of 8 and 16 (`prune --round-to`) on the shipped reference
# model: ONNX Runtime's blocked convolution kernels work on 8 or 16 channels at a time, so odd
# widths waste lanes. Latency against the default prune (`--round-to 1`) in one interleaved run.
#
#   bash benchmarks/round_to.sh [DATA]
#
# Then at most 10% of the parameters with widths of 8 (`--budget 0.1 --round-to 8`) and its accuracy.
# Writes runs/reference.round{8,16}.onnx, runs/reference.budget10round8.onnx (not shipped) and
# benchmarks/results/round_to-{prune8,prune16,bench,budget10-prune,budget10-eval}.json, which the
# README quotes.
set -euo pipefail
data=${1:-../shared/data/cifar10-jpeg.tar.gz}
hw=${HWTOOL:-hwtool}
res=benchmarks/results
mkdir -p "$res" runs

for r in 8 16; do
    $hw prune models/reference.onnx --threshold 0.05 --calib models/calib256.npy --round-to "$r" \
        -o "runs/reference.round$r.onnx" --json > "$res/round_to-prune$r.json"
done
$hw bench models/reference.onnx models/reference.pruned.onnx runs/reference.round8.onnx runs/reference.round16.onnx \
    --batch 1,64 --runs 60 --json "$res/round_to-bench.json"
$hw prune models/reference.onnx --budget 0.1 --round-to 8 --calib models/calib256.npy \
    -o runs/reference.budget10round8.onnx --json > "$res/round_to-budget10-prune.json"
$hw eval runs/reference.budget10round8.onnx --data "$data" --json > "$res/round_to-budget10-eval.json"
