#!/usr/bin/env bash
# The shipped pruned model in float16 (`hwtool convert --to float16`): size, agreement with the
# float32 model, test accuracy, and ONNX Runtime CPU latency against the float32 model in the
# same run (float16 is for GPU, WebGPU and mobile accelerators; the CPU figure says what it costs
# where none is).
#
#   bash benchmarks/float16.sh [DATA]
#
# Writes runs/reference.pruned.fp16.onnx (not shipped) and
# benchmarks/results/float16-{convert,eval,bench}.json, which the README quotes.
set -euo pipefail
data=${1:-../shared/data/cifar10-jpeg.tar.gz}
hw=${HWTOOL:-hwtool}
res=benchmarks/results
half=runs/reference.pruned.fp16.onnx
mkdir -p "$res" runs

$hw convert models/reference.pruned.onnx --to float16 -o "$half" --calib models/calib256.npy --json \
    > "$res/float16-convert.json"
$hw eval "$half" --data "$data" --json > "$res/float16-eval.json"
$hw bench models/reference.pruned.onnx "$half" --batch 1,64 --runs 50 --json "$res/float16-bench.json"
