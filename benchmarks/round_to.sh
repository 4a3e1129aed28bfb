#!/usr/bin/env bash
# Kept channels rounded up to multiples of 8 and 16 (`prune --round-to`) on the shipped reference
# model: ONNX Runtime's blocked convolution kernels work on 8 or 16 channels at a time, so odd
# widths waste lanes. Latency against the default prune (`--round-to 1`) in one interleaved run.
#
#   bash benchmarks/round_to.sh
#
# Writes runs/reference.round{8,16}.onnx (not shipped) and
# benchmarks/results/round_to-{prune8,prune16,bench}.json, which the README quotes.
set -euo pipefail
hw=${HWTOOL:-hwtool}
res=benchmarks/results
mkdir -p "$res" runs

for r in 8 16; do
    $hw prune models/reference.onnx --threshold 0.05 --calib models/calib256.npy --round-to "$r" \
        -o "runs/reference.round$r.onnx" --json > "$res/round_to-prune$r.json"
done
$hw bench models/reference.onnx models/reference.pruned.onnx runs/reference.round8.onnx runs/reference.round16.onnx \
    --batch 1,64 --runs 60 --json "$res/round_to-bench.json"
